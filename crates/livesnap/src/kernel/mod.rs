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

/// The debug timeline of a live migration's switch
/// (`SNAPVMM_LOG=livesnap::timeline=debug`): events with their
/// [`monotonic_us`] time, which `scripts/bench-live-migration.py` lines up.
pub(crate) mod timeline {
    /// Whether the timeline is logged (when not, nothing reads the clock).
    pub(crate) fn on() -> bool {
        tracing::enabled!(target: "livesnap::timeline", tracing::Level::DEBUG)
    }

    /// `what` happened now.
    pub(crate) fn event(what: &str) {
        tracing::debug!(target: "livesnap::timeline", at_us = super::monotonic_us(), "{what}");
    }

    /// A fault at `addr` read at `at_us`, done with now.
    pub(crate) fn fault(at_us: u64, addr: u64) {
        tracing::debug!(
            target: "livesnap::timeline",
            at_us,
            done_us = super::monotonic_us(),
            addr = format_args!("{addr:#x}"),
            "fault"
        );
    }
}

/// Raises the calling thread, one that serves page faults a vCPU waits on,
/// above the VMM's other threads where CPUs are scarce, where allowed:
/// real-time (`SCHED_FIFO`, the lowest priority) if `realtime` (a fault is
/// then served the moment it comes, not after a time slice of whatever
/// runs; only for a thread that runs short bursts between sleeps), else or
/// failing that a higher share (nice -10); else it stays as it is.
pub(crate) fn serve_faults_first(who: &str, realtime: bool) {
    let param = libc::sched_param { sched_priority: 1 };
    // SAFETY: sched_setscheduler on this thread's own id with a valid,
    // initialised parameter; no memory is shared with the kernel after it.
    if realtime && unsafe { libc::sched_setscheduler(0, libc::SCHED_FIFO, &param) } == 0 {
        return;
    }
    // SAFETY: setpriority on this thread's own id; no memory is involved.
    if unsafe { libc::setpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t, -10) } != 0 {
        tracing::debug!(
            "{who} keeps its priority: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// Lets another runnable thread on this CPU go first (a vCPU the writer
/// preempted), without lowering this thread's share of the CPU.
pub(crate) fn let_others_run() {
    // SAFETY: sched_yield takes no arguments and touches no memory.
    unsafe { libc::sched_yield() };
}

/// The host's available memory (`MemAvailable` of `/proc/meminfo`), bytes;
/// `None` where it cannot be read.
pub(crate) fn mem_available() -> Option<u64> {
    meminfo("MemAvailable:")
}

/// The host's memory (`MemTotal`), bytes.
pub(crate) fn mem_total() -> Option<u64> {
    meminfo("MemTotal:")
}

fn meminfo(key: &str) -> Option<u64> {
    let s = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = s.lines().find(|l| l.starts_with(key))?;
    let kib: u64 = line[key.len()..]
        .trim()
        .strip_suffix("kB")?
        .trim()
        .parse()
        .ok()?;
    Some(kib << 10)
}

/// Lowers the calling thread to run only on a CPU nothing else wants
/// (`SCHED_IDLE`); failing that, as [`background`].
pub(crate) fn idle_only() {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: sched_setscheduler on this thread's own id with a valid,
    // initialised parameter; no memory is shared with the kernel after it.
    if unsafe { libc::sched_setscheduler(0, libc::SCHED_IDLE, &param) } != 0 {
        background();
    }
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
