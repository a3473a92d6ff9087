//! Zero-page detection and run splitting over host RAM.
//!
//! Everything here is allocation-free and panic-free so that it can run in
//! the forked capture child, where only async-signal-safe work is allowed.

use super::PAGE_SIZE;

/// One RAM range prepared for scanning: host memory and its place in the file.
#[derive(Clone, Copy, Debug)]
pub(crate) struct ScanRange {
    /// Page-aligned host address of the first byte.
    pub host: *const u8,
    /// Length in bytes, a multiple of [`PAGE_SIZE`].
    pub len: u64,
    /// Offset in the image file of the first byte.
    pub file_offset: u64,
}

/// Whether every byte of `b` is zero.
pub(crate) fn is_zero(b: &[u8]) -> bool {
    let (pre, words, post) = {
        // SAFETY: u64 has no invalid bit patterns; align_to only reinterprets
        // the aligned middle of the byte slice.
        unsafe { b.align_to::<u64>() }
    };
    pre.iter().all(|&x| x == 0) && words.iter().all(|&w| w == 0) && post.iter().all(|&x| x == 0)
}

/// Whether the page at `p` is all zeros.
///
/// # Safety
/// `p` must be 8-byte aligned and `PAGE_SIZE` bytes at `p` must be readable
/// and not written concurrently.
#[inline]
unsafe fn is_zero_page(p: *const u8) -> bool {
    // SAFETY: the caller guarantees PAGE_SIZE readable, aligned, unaliased-by-writers bytes.
    let words = unsafe { core::slice::from_raw_parts(p.cast::<u64>(), (PAGE_SIZE / 8) as usize) };
    // OR 64-byte blocks so the compiler vectorizes; bail out at the first non-zero block.
    words
        .chunks_exact(8)
        .all(|c| c.iter().fold(0u64, |a, &w| a | w) == 0)
}

/// Calls `emit(file_offset, host_ptr, len, zero_pages_so_far)` for each run of
/// non-zero pages of `r`, runs being at most `max_run` bytes (a multiple of
/// the page size), in increasing order. Zero pages are counted into `zero_pages`.
/// Stops at the first error of `emit`.
///
/// # Safety
/// `r.host` must be page-aligned, `r.len` a multiple of `PAGE_SIZE`, and the
/// `r.len` bytes at `r.host` readable and not written concurrently for the
/// duration of the call.
pub(crate) unsafe fn for_each_run<E>(
    r: &ScanRange,
    max_run: u64,
    zero_pages: &mut u64,
    mut emit: impl FnMut(u64, *const u8, u64, u64) -> Result<(), E>,
) -> Result<(), E> {
    let max_run = if max_run < PAGE_SIZE {
        PAGE_SIZE
    } else {
        max_run
    };
    let mut off: u64 = 0;
    let mut run_start: u64 = 0;
    let mut run_len: u64 = 0;
    while off < r.len {
        // SAFETY: off < r.len, so the page at host+off lies inside the readable range.
        let page = unsafe { r.host.add(off as usize) };
        // SAFETY: page-aligned (host page-aligned, off a page multiple), readable per contract.
        if unsafe { is_zero_page(page) } {
            *zero_pages = zero_pages.wrapping_add(1);
            if run_len != 0 {
                // SAFETY: run_start < r.len, inside the range.
                let p = unsafe { r.host.add(run_start as usize) };
                emit(
                    r.file_offset.wrapping_add(run_start),
                    p,
                    run_len,
                    *zero_pages,
                )?;
                run_len = 0;
            }
        } else {
            if run_len == 0 {
                run_start = off;
            }
            run_len = run_len.wrapping_add(PAGE_SIZE);
            if run_len >= max_run {
                // SAFETY: run_start < r.len, inside the range.
                let p = unsafe { r.host.add(run_start as usize) };
                emit(
                    r.file_offset.wrapping_add(run_start),
                    p,
                    run_len,
                    *zero_pages,
                )?;
                run_len = 0;
            }
        }
        off = off.wrapping_add(PAGE_SIZE);
    }
    if run_len != 0 {
        // SAFETY: run_start < r.len, inside the range.
        let p = unsafe { r.host.add(run_start as usize) };
        emit(
            r.file_offset.wrapping_add(run_start),
            p,
            run_len,
            *zero_pages,
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_split_on_zero_pages_and_max_run() {
        let ps = PAGE_SIZE as usize;
        // Page-aligned buffer of 10 pages via Vec<u64> over-allocation.
        let mut backing = vec![0u64; (11 * ps) / 8];
        let base = backing.as_mut_ptr() as usize;
        let start = (base + ps - 1) & !(ps - 1);
        let off = (start - base) / 8;
        let buf = &mut backing[off..off + 10 * ps / 8];
        for p in [1usize, 2, 3, 4, 7, 9] {
            buf[p * ps / 8 + 511] = 1; // last word of the page
        }
        let r = ScanRange {
            host: buf.as_ptr().cast(),
            len: 10 * PAGE_SIZE,
            file_offset: 1 << 20,
        };
        let mut zeros = 0;
        let mut runs = vec![];
        // SAFETY: the buffer is page-aligned, 10 pages long and not written during the scan.
        unsafe {
            for_each_run::<()>(&r, 3 * PAGE_SIZE, &mut zeros, |fo, _, len, _| {
                runs.push((fo - (1 << 20), len));
                Ok(())
            })
        }
        .unwrap();
        let p = PAGE_SIZE;
        assert_eq!(runs, vec![(p, 3 * p), (4 * p, p), (7 * p, p), (9 * p, p)]);
        assert_eq!(zeros, 4);
    }
}
