//! Guest RAM: the one module that owns mmap/munmap of guest memory.
//!
//! RAM is anonymous private memory with `MADV_HUGEPAGE` and deliberately
//! without `MADV_DONTFORK`: the live snapshot forks the process, and the child
//! must see a copy-on-write image of guest RAM. Regions are 2 MiB aligned so
//! transparent huge pages can back them from the first touch.

use std::os::fd::{AsRawFd, BorrowedFd};
use std::ptr::NonNull;

use vm_memory::{GuestAddress, GuestMemoryMmap, GuestRegionMmap, MmapRegion};

use crate::layout;

const HUGE_PAGE: usize = 2 << 20;

/// Errors from setting up guest RAM.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("cannot map {size} bytes of guest RAM: {source}")]
    Mmap { size: u64, source: std::io::Error },
    #[error("guest memory layout rejected: {0}")]
    Layout(String),
}

/// One contiguous range of guest RAM and where it lives in this process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RamRegion {
    /// Guest-physical start address.
    pub gpa: u64,
    /// Length in bytes.
    pub len: u64,
    /// Host virtual address of the first byte.
    pub host: *mut u8,
}

// SAFETY: a RamRegion is a plain description of a mapping owned by GuestRam;
// dereferencing `host` is the holder's job and always goes through unsafe code
// that names the GuestRam keeping the mapping alive.
unsafe impl Send for RamRegion {}
// SAFETY: as above; the struct itself has no interior mutability.
unsafe impl Sync for RamRegion {}

/// A file (and offset) to map a RAM region from, privately (copy-on-write).
#[derive(Debug, Clone, Copy)]
pub struct FileBacking<'a> {
    pub fd: BorrowedFd<'a>,
    pub offset: u64,
}

/// Guest RAM of one VM: owns its mappings and unmaps them on drop.
#[derive(Debug)]
pub struct GuestRam {
    regions: Vec<RamRegion>,
    /// (mapping start, mapping length) to munmap, including alignment slack.
    maps: Vec<(NonNull<u8>, usize)>,
    mem: GuestMemoryMmap,
    /// The file RAM is mapped from (a lazy restore), kept open and locked while
    /// it backs RAM, and how long it must stay for every page to be readable.
    backing: Option<(std::fs::File, u64, String)>,
}

// SAFETY: the mappings are plain memory; concurrent access from vCPU threads is
// the normal way guest RAM is used, and GuestMemoryMmap is itself Send + Sync.
unsafe impl Send for GuestRam {}
// SAFETY: see above.
unsafe impl Sync for GuestRam {}

impl GuestRam {
    /// Maps `size` bytes of anonymous guest RAM laid out by [`layout::ram_ranges`].
    pub fn anonymous(size: u64) -> Result<Self, MemoryError> {
        Self::build(size, |_| None)
    }

    /// Keeps `file` (the one RAM is mapped from, called `name` in messages, of
    /// which RAM needs the first `needed` bytes) open for as long as this RAM
    /// lives, with a shared `flock` on it: tools that honour locks see it is in use.
    pub fn hold_backing(
        &mut self,
        file: std::fs::File,
        needed: u64,
        name: String,
    ) -> std::io::Result<()> {
        use std::os::fd::AsRawFd;
        // SAFETY: flock on a file descriptor we own; no memory is involved.
        let r = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_SH | libc::LOCK_NB) };
        if r != 0 {
            return Err(std::io::Error::last_os_error());
        }
        self.backing = Some((file, needed, name));
        Ok(())
    }

    /// Why the file RAM is mapped from can no longer back it (it was truncated
    /// under the VM), if it cannot.
    pub fn backing_damaged(&self) -> Option<String> {
        let (file, needed, name) = self.backing.as_ref()?;
        match file.metadata() {
            Ok(m) if m.len() < *needed => Some(format!(
                "{name}, which guest RAM is mapped from, was truncated to {} bytes under the VM (it needs {needed})",
                m.len()
            )),
            Ok(_) => None,
            Err(e) => Some(format!("{name}, which guest RAM is mapped from, is unreadable: {e}")),
        }
    }

    /// True if RAM is mapped from a file (a lazy restore) rather than anonymous.
    pub fn file_backed(&self) -> bool {
        self.backing.is_some()
    }

    /// Maps guest RAM privately from a file: region `i` from `backing(i)`.
    /// Pages are read lazily by the kernel on first touch; writes stay private.
    pub fn from_file<'a>(
        size: u64,
        backing: impl Fn(usize) -> Option<FileBacking<'a>>,
    ) -> Result<Self, MemoryError> {
        Self::build(size, backing)
    }

    fn build<'a>(
        size: u64,
        backing: impl Fn(usize) -> Option<FileBacking<'a>>,
    ) -> Result<Self, MemoryError> {
        let mut ram = GuestRam {
            regions: Vec::new(),
            maps: Vec::new(),
            mem: GuestMemoryMmap::new(),
            backing: None,
        };
        let mut vm_regions = Vec::new();
        for (i, (gpa, len)) in layout::ram_ranges(size).into_iter().enumerate() {
            let host = ram.map_region(len, backing(i))?;
            ram.regions.push(RamRegion { gpa, len, host });
            // SAFETY: `host` points to `len` bytes mapped read/write just above and owned by
            // `ram`, which outlives the GuestMemoryMmap it holds (both are dropped together,
            // the mappings last, in Drop).
            let region = unsafe {
                MmapRegion::build_raw(
                    host,
                    len as usize,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                )
            }
            .map_err(|e| MemoryError::Layout(e.to_string()))?;
            let region = GuestRegionMmap::new(region, GuestAddress(gpa))
                .ok_or_else(|| MemoryError::Layout(format!("region at {gpa:#x} overflows")))?;
            vm_regions.push(region);
        }
        ram.mem = GuestMemoryMmap::from_regions(vm_regions)
            .map_err(|e| MemoryError::Layout(e.to_string()))?;
        Ok(ram)
    }

    fn map_region(
        &mut self,
        len: u64,
        file: Option<FileBacking<'_>>,
    ) -> Result<*mut u8, MemoryError> {
        let len_us = len as usize;
        let err = |source| MemoryError::Mmap { size: len, source };
        // Reserve len + 2 MiB, then place the region at a 2 MiB boundary inside it.
        let reserve = len_us
            .checked_add(HUGE_PAGE)
            .ok_or_else(|| err(std::io::Error::from_raw_os_error(libc::ENOMEM)))?;
        // SAFETY: a fresh PROT_NONE anonymous reservation; touches no existing mapping.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                reserve,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(err(std::io::Error::last_os_error()));
        }
        let base = base as *mut u8;
        self.maps
            .push((NonNull::new(base).expect("mmap returned null"), reserve));
        let aligned = ((base as usize + HUGE_PAGE - 1) & !(HUGE_PAGE - 1)) as *mut u8;
        let (flags, fd, off) = match file {
            Some(f) => (
                libc::MAP_PRIVATE | libc::MAP_FIXED | libc::MAP_NORESERVE,
                f.fd.as_raw_fd(),
                f.offset,
            ),
            None => (
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED | libc::MAP_NORESERVE,
                -1,
                0,
            ),
        };
        // SAFETY: MAP_FIXED replaces only pages of the reservation made above
        // (aligned + len <= base + reserve), which nothing else references yet.
        let p = unsafe {
            libc::mmap(
                aligned as *mut _,
                len_us,
                libc::PROT_READ | libc::PROT_WRITE,
                flags,
                fd,
                off as libc::off_t,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(err(std::io::Error::last_os_error()));
        }
        // SAFETY: advice on our own fresh mapping; failure only means no THP.
        unsafe { libc::madvise(p, len_us, libc::MADV_HUGEPAGE) };
        Ok(p as *mut u8)
    }

    /// The vm-memory view of guest RAM, for loaders and devices.
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    /// Every RAM region with its host address.
    pub fn regions(&self) -> &[RamRegion] {
        &self.regions
    }

    /// Region `i` as a mutable byte slice, e.g. to copy a saved image in before
    /// any vCPU runs. Exclusive access to `self` means no vCPU can be using it.
    pub fn region_bytes_mut(&mut self, i: usize) -> &mut [u8] {
        let r = self.regions[i];
        // SAFETY: the region is a live read/write mapping of r.len bytes owned by self;
        // `&mut self` guarantees no other reference derived from this GuestRam exists.
        unsafe { std::slice::from_raw_parts_mut(r.host, r.len as usize) }
    }

    /// Every region as a mutable byte slice (see [`GuestRam::region_bytes_mut`]).
    pub fn regions_bytes_mut(&mut self) -> Vec<&mut [u8]> {
        self.regions
            .iter()
            // SAFETY: as in region_bytes_mut; the regions never overlap, so the
            // slices are disjoint, and all borrow `self` mutably.
            .map(|r| unsafe { std::slice::from_raw_parts_mut(r.host, r.len as usize) })
            .collect()
    }

    /// Total RAM in bytes.
    pub fn size(&self) -> u64 {
        self.regions.iter().map(|r| r.len).sum()
    }

    /// Gives every page of RAM back to the host (`MADV_DONTNEED`): the
    /// guest's memory is gone (anonymous RAM reads as zeros, RAM mapped from
    /// a file as the file). For a machine about to be replaced, so that its
    /// RAM and the new machine's are never both resident. The vCPUs must
    /// not run.
    pub fn discard(&self) -> std::io::Result<()> {
        for r in &self.regions {
            // SAFETY: the region is a mapping owned by self; dropping its pages
            // invalidates no Rust reference (guest memory is only reached
            // through raw host addresses, and the caller keeps vCPUs stopped).
            if unsafe { libc::madvise(r.host.cast(), r.len as usize, libc::MADV_DONTNEED) } != 0 {
                return Err(std::io::Error::last_os_error());
            }
        }
        Ok(())
    }
}

/// Huge pages rebuilt by [`collapse_huge_pages`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CollapseStats {
    /// 2 MiB steps now backed by a huge page.
    pub collapsed: u64,
    /// 2 MiB steps the kernel could not (or need not) collapse.
    pub skipped: u64,
    /// True when `stop` ended the walk early.
    pub stopped: bool,
}

/// Address ranges of guest RAM, detached from [`GuestRam`] so a background
/// thread can ask the kernel to rebuild huge pages over them.
#[derive(Debug, Clone)]
pub struct RamSpans(Vec<(usize, usize)>);

impl GuestRam {
    /// The host address ranges of guest RAM (see [`collapse_huge_pages`]).
    pub fn spans(&self) -> RamSpans {
        RamSpans(
            self.regions
                .iter()
                .map(|r| (r.host as usize, r.len as usize))
                .collect(),
        )
    }
}

/// `MADV_COLLAPSE` (Linux 6.1+): synchronously rebuild transparent huge pages.
const MADV_COLLAPSE: libc::c_int = 25;

/// Rebuilds transparent huge pages over `spans` with `MADV_COLLAPSE`, 2 MiB
/// at a time, checking `stop` between steps. A copy-on-write fault after a
/// fork splits a huge page into 4 KiB pages; without this, every later fork
/// copies 512 times as many page-table entries and the next snapshot's pause
/// grows. Runs alongside the guest (the kernel copies each 2 MiB under its own
/// locks); the memory's content is unchanged.
pub fn collapse_huge_pages(
    spans: &RamSpans,
    stop: &std::sync::atomic::AtomicBool,
) -> CollapseStats {
    let mut st = CollapseStats::default();
    for &(start, len) in &spans.0 {
        let mut at = start.next_multiple_of(HUGE_PAGE);
        while at + HUGE_PAGE <= start + len {
            if stop.load(std::sync::atomic::Ordering::Relaxed) {
                st.stopped = true;
                return st;
            }
            // SAFETY: madvise only gives the kernel advice about the range; it
            // never dereferences user memory, and MADV_COLLAPSE keeps the
            // content. Should the range have been unmapped meanwhile, the
            // kernel fails the call with ENOMEM.
            let r = unsafe { libc::madvise(at as *mut _, HUGE_PAGE, MADV_COLLAPSE) };
            if r == 0 {
                st.collapsed += 1;
            } else {
                st.skipped += 1;
            }
            at += HUGE_PAGE;
        }
    }
    st
}

impl Drop for GuestRam {
    fn drop(&mut self) {
        // Drop vm-memory's view first; it does not own the mappings.
        self.mem = GuestMemoryMmap::new();
        for (p, len) in self.maps.drain(..) {
            // SAFETY: (p, len) is a reservation made by map_region and not yet unmapped;
            // no RamRegion or GuestMemoryMmap referring to it survives this drop.
            unsafe { libc::munmap(p.as_ptr() as *mut _, len) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    #[test]
    fn regions_are_huge_page_aligned_and_writable() {
        let ram = GuestRam::anonymous(64 << 20).unwrap();
        assert_eq!(ram.size(), 64 << 20);
        for r in ram.regions() {
            assert_eq!(r.host as usize % HUGE_PAGE, 0);
        }
        ram.memory()
            .write_obj(0xdead_beef_u32, GuestAddress(0x1000))
            .unwrap();
        let v: u32 = ram.memory().read_obj(GuestAddress(0x1000)).unwrap();
        assert_eq!(v, 0xdead_beef);
        // SAFETY: 0x1000 lies inside the first region of `ram`, which is alive.
        let direct = unsafe { *(ram.regions()[0].host.add(0x1000) as *const u32) };
        assert_eq!(direct, 0xdead_beef);
    }

    /// AnonHugePages (kB) of the mapping that contains `addr`, from smaps.
    fn huge_kb_at(addr: usize) -> u64 {
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let mut inside = false;
        for l in smaps.lines() {
            if let Some((range, _)) = l.split_once(' ') {
                if let Some((a, b)) = range.split_once('-') {
                    if let (Ok(a), Ok(b)) =
                        (usize::from_str_radix(a, 16), usize::from_str_radix(b, 16))
                    {
                        inside = a <= addr && addr < b;
                        continue;
                    }
                }
            }
            if inside {
                if let Some(v) = l.strip_prefix("AnonHugePages:") {
                    return v.trim().trim_end_matches("kB").trim().parse().unwrap();
                }
            }
        }
        0
    }

    #[test]
    fn collapse_rebuilds_huge_pages_split_by_fork_and_keeps_content() {
        let mut ram = GuestRam::anonymous(64 << 20).unwrap();
        let host = ram.regions()[0].host as usize;
        let bytes = ram.region_bytes_mut(0);
        for (i, b) in bytes.iter_mut().enumerate().step_by(4096) {
            *b = (i / 4096) as u8 | 1;
        }
        let before = huge_kb_at(host);
        // Split: a forked child keeps the pages shared, the parent writes one
        // byte per huge page, and copy-on-write breaks each into 4 KiB pages.
        // SAFETY: the child only sleeps and exits; no locks or allocation.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            // SAFETY: async-signal-safe calls only, in the child.
            unsafe {
                libc::usleep(300_000);
                libc::_exit(0);
            }
        }
        let bytes = ram.region_bytes_mut(0);
        for i in (0..bytes.len()).step_by(HUGE_PAGE) {
            bytes[i] = bytes[i].wrapping_add(1);
        }
        // SAFETY: pid is our child.
        unsafe { libc::waitpid(pid, std::ptr::null_mut(), 0) };
        let split = huge_kb_at(host);
        let stop = std::sync::atomic::AtomicBool::new(false);
        let st = collapse_huge_pages(&ram.spans(), &stop);
        let after = huge_kb_at(host);
        eprintln!("AnonHugePages kB: before {before}, split {split}, after {after}; {st:?}");
        if before == 0 {
            eprintln!("skipped: no transparent huge pages on this host");
            return;
        }
        assert!(split < before, "the fork + writes split huge pages");
        assert!(after > split, "MADV_COLLAPSE rebuilt them: {st:?}");
        assert!(st.collapsed > 0);
        let bytes = ram.region_bytes_mut(0);
        for (i, b) in bytes.iter().enumerate().step_by(4096) {
            let mut want = (i / 4096) as u8 | 1;
            if i % HUGE_PAGE == 0 {
                want = want.wrapping_add(1);
            }
            assert_eq!(*b, want, "content kept at {i}");
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let st = collapse_huge_pages(&ram.spans(), &stop);
        assert!(st.stopped && st.collapsed == 0);
    }
}
