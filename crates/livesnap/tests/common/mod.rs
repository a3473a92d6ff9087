//! Shared helpers of the integration tests.
#![allow(dead_code)]

use std::path::Path;

use livesnap::RamRange;

/// Anonymous private mapping standing in for guest RAM.
/// 2 MiB-aligned, as a VMM's guest RAM is.
pub struct Mem {
    ptr: *mut u8,
    len: usize,
    map: *mut libc::c_void,
    map_len: usize,
}

const ALIGN: usize = 2 << 20;

impl Mem {
    pub fn new(len: usize) -> Mem {
        let map_len = len + ALIGN;
        // SAFETY: anonymous private mapping with no address hint; the result
        // is checked against MAP_FAILED.
        let map = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                map_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(map, libc::MAP_FAILED, "mmap failed");
        let ptr = (map as usize).next_multiple_of(ALIGN) as *mut libc::c_void;
        // SAFETY: ptr..ptr+len lies in the mapping just created; the advice is a hint.
        unsafe { libc::madvise(ptr, len, libc::MADV_HUGEPAGE) };
        Mem {
            ptr: ptr.cast(),
            len,
            map,
            map_len,
        }
    }

    pub fn bytes(&self) -> &[u8] {
        // SAFETY: the mapping is live, readable and len bytes long.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }

    pub fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: the mapping is live, writable, len bytes long, and uniquely borrowed.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }

    pub fn words_mut(&mut self) -> &mut [u64] {
        // SAFETY: mmap returns page-aligned memory, len is a multiple of 8.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.cast(), self.len / 8) }
    }

    /// A RamRange over `[off, off + len)` of this mapping at guest address `gpa`.
    pub fn range(&self, off: usize, len: usize, gpa: u64) -> RamRange {
        assert!(off + len <= self.len);
        // SAFETY: off + len <= self.len, so the range lies in the mapping, which
        // stays mapped until this test memory is dropped, after its captures end.
        unsafe { RamRange::new(gpa, self.ptr.add(off), len as u64) }
    }
}

impl Drop for Mem {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping created in new().
        unsafe { libc::munmap(self.map, self.map_len) };
    }
}

/// Fills every word with a value derived from `seed` and its index (never zero).
pub fn fill_dense(words: &mut [u64], seed: u64) {
    for (i, w) in words.iter_mut().enumerate() {
        *w = (i as u64 ^ seed).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    }
}

/// Mostly-zero pattern: one page in `every` is non-zero (in varying places,
/// some only in their last byte).
pub fn fill_sparse(bytes: &mut [u8], every: usize, seed: u8) {
    bytes.fill(0);
    for (i, page) in bytes.chunks_mut(4096).enumerate() {
        if i % every == 0 {
            match i % 3 {
                0 => page
                    .iter_mut()
                    .enumerate()
                    .for_each(|(j, b)| *b = (j as u8) ^ seed),
                1 => page[4095] = seed | 1,
                _ => page[i % 4096] = 0x80 | seed,
            }
        }
    }
}

/// Names in `dir` (to check that no temp file is left behind).
pub fn dir_names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// Reads a whole image's RAM, range by range.
pub fn image_ram(img: &livesnap::Image) -> Vec<Vec<u8>> {
    (0..img.ranges().len())
        .map(|i| {
            let mut v = vec![0xAAu8; img.ranges()[i].len as usize];
            img.read_ram_into(i, &mut v).unwrap();
            v
        })
        .collect()
}

/// Two image files are the same but for their identities (header bytes
/// 3200..3216, a random id per image, and so the header checksum).
pub fn same_but_identity(a: &Path, b: &Path) -> bool {
    same_bytes_but_identity(&std::fs::read(a).unwrap(), &std::fs::read(b).unwrap())
}

/// [`same_but_identity`] for images in memory.
pub fn same_bytes_but_identity(a: &[u8], b: &[u8]) -> bool {
    let (mut x, mut y) = (a.to_vec(), b.to_vec());
    for v in [&mut x, &mut y] {
        if v.len() >= 4096 {
            v[3200..3216].fill(0);
            v[4092..4096].fill(0);
        }
    }
    x == y
}

/// A connected unix socket pair, as two owned descriptors.
pub fn socket_pair() -> (std::os::fd::OwnedFd, std::os::fd::OwnedFd) {
    let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
    (a.into(), b.into())
}

/// Whether this kernel gives userfaultfd in missing mode (a test that needs
/// it says it is skipped when not).
/// A userfaultfd in write-protect mode, or `None` (and a note) where the
/// kernel has none: the test is then skipped.
pub fn uffd_wp() -> Option<std::sync::Arc<livesnap::uffd::Uffd>> {
    match livesnap::uffd::Uffd::new_wp() {
        Ok(u) => Some(std::sync::Arc::new(u)),
        Err(e) => {
            eprintln!("skipped: no userfaultfd write-protect here: {e}");
            None
        }
    }
}

pub fn uffd_missing_ok() -> bool {
    match livesnap::uffd::Uffd::new_missing() {
        Ok(_) => true,
        Err(e) => {
            eprintln!("skipped: no userfaultfd here: {e}");
            false
        }
    }
}

/// Starts filling `ranges` from a live migration's pages (at its switch);
/// the fill, and where its outcome arrives.
pub fn fill_from(
    sw: &livesnap::postcopy::Switch,
    ranges: &[RamRange],
) -> (
    livesnap::fill::Fill,
    std::sync::mpsc::Receiver<Result<livesnap::fill::FillStats, String>>,
) {
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    let fill = livesnap::fill::start_fill(
        ranges,
        &sw.layout.ranges,
        sw.pages.clone(),
        Some(Box::new(move |r| {
            let _ = done_tx.send(r);
        })),
    )
    .unwrap();
    (fill, done_rx)
}
