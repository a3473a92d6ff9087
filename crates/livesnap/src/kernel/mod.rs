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

/// Lowers the calling thread, one doing background work (filling RAM ahead
/// of the guest), below the vCPU threads: to nice 10 at least, so a vCPU
/// that wakes on the same CPU runs at once instead of after this thread's
/// time slice. Needs no privilege; left as it is if refused.
pub(crate) fn background() {
    // SAFETY: gettid, getpriority and setpriority on this thread's own id;
    // no memory is involved (a nice value of -1 is below 10 whether or not
    // it is an error, so errno needs no check).
    let r = unsafe {
        let tid = libc::gettid() as libc::id_t;
        let now = libc::getpriority(libc::PRIO_PROCESS, tid);
        if now >= 10 {
            return;
        }
        libc::setpriority(libc::PRIO_PROCESS, tid, 10)
    };
    if r != 0 {
        tracing::debug!(
            "a background thread keeps its priority: {}",
            std::io::Error::last_os_error()
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nice() -> i32 {
        // SAFETY: getpriority on this thread's own id.
        unsafe { libc::getpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t) }
    }

    #[test]
    fn a_background_thread_yields_to_the_others() {
        let own = nice();
        let theirs = std::thread::spawn(|| {
            background();
            nice()
        })
        .join()
        .unwrap();
        assert!(
            theirs >= 10 && theirs >= own,
            "{theirs} (this thread: {own})"
        );
        // Only the calling thread is lowered.
        assert_eq!(nice(), own);
    }

    #[test]
    fn the_monotonic_clock_moves_on() {
        let a = monotonic_us();
        std::thread::sleep(std::time::Duration::from_millis(2));
        assert!(monotonic_us() >= a + 2000);
    }
}
