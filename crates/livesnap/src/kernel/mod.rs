//! The lowest layer: thin wrappers over what the kernel gives the engine
//! (userfaultfd, fork and pipes with splice, page scanning, aligned
//! buffers for direct I/O) and the lock helper every thread uses. Nothing
//! here knows of images, chunks or captures.

use std::sync::{Mutex, MutexGuard};

pub mod buf;
pub(crate) mod fork;
pub(crate) mod scan;
pub mod uffd;

/// The base page: 4 KiB on x86-64, the unit of zero-page detection,
/// userfaultfd fills and the image format's alignment.
pub const PAGE_SIZE: u64 = 4096;

/// Locks `m`, going on with the data if a thread panicked holding it (every
/// structure behind these locks stays consistent between statements).
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// `CLOCK_MONOTONIC` in microseconds: the clock other processes on the host
/// (a benchmark placing events of two VMMs on one timeline) read too.
pub(crate) fn monotonic_us() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec into `ts`, which lives on
    // this stack frame for the call.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000 + ts.tv_nsec as u64 / 1000
}
