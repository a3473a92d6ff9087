//! Real-time priority for the threads of a pause window. On a host whose
//! CPUs are all busy, a vCPU thread kicked out of `KVM_RUN`, or the thread
//! saving the machine's state, waits for the scheduler to run it: the pause
//! grows by milliseconds that are none of the VMM's work. For the few
//! hundred microseconds of a pause those threads run `SCHED_FIFO` (lowest
//! real-time priority) where the process may (root, `CAP_SYS_NICE` or an
//! `RLIMIT_RTPRIO`), and go back to their own policy before a vCPU runs the
//! guest again. Where it may not, nothing changes.
//!
//! Also the device I/O thread's policy for streams ([`yield_on_wakeup`]):
//! `SCHED_BATCH`, whose wakeups do not preempt a vCPU on the same CPU.

use std::sync::atomic::{AtomicBool, Ordering};

/// Threads raised by [`boost`], with what they had before; dropping it (or
/// [`Boost::end`]) gives it back.
#[derive(Debug, Default)]
pub struct Boost {
    saved: Vec<(i32, libc::c_int, libc::sched_param)>,
}

/// Raises each thread of `tids` (0: the calling thread) to `SCHED_FIFO`
/// priority 1, where allowed; those that could not be raised are left as
/// they were.
pub fn boost(tids: &[i32]) -> Boost {
    static REFUSED: AtomicBool = AtomicBool::new(false);
    let mut saved = Vec::new();
    for &tid in tids {
        if REFUSED.load(Ordering::Relaxed) {
            break;
        }
        // SAFETY: plain syscalls on a thread id; `param` is a valid
        // sched_param the kernel fills or reads.
        unsafe {
            let policy = libc::sched_getscheduler(tid);
            let mut param: libc::sched_param = std::mem::zeroed();
            if policy < 0 || libc::sched_getparam(tid, &mut param) != 0 {
                continue;
            }
            if policy == libc::SCHED_FIFO || policy == libc::SCHED_RR {
                continue;
            }
            let rt = libc::sched_param { sched_priority: 1 };
            if libc::sched_setscheduler(tid, libc::SCHED_FIFO, &rt) == 0 {
                saved.push((tid, policy, param));
            } else if std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM) {
                // Not allowed here: do not try again for every pause.
                REFUSED.store(true, Ordering::Relaxed);
                tracing::debug!("pauses run at normal priority (no permission for SCHED_FIFO)");
            }
        }
    }
    Boost { saved }
}

impl Boost {
    /// How many threads were raised.
    pub fn raised(&self) -> usize {
        self.saved.len()
    }

    /// Gives every raised thread its own policy back.
    pub fn end(mut self) {
        self.restore();
    }

    fn restore(&mut self) {
        for (tid, policy, param) in self.saved.drain(..) {
            // SAFETY: as in `boost`; a thread that ended meanwhile makes
            // the call fail with ESRCH, which is fine.
            unsafe { libc::sched_setscheduler(tid, policy, &param) };
        }
    }
}

impl Drop for Boost {
    fn drop(&mut self) {
        self.restore();
    }
}

/// Puts the calling thread under `SCHED_BATCH`: it gets the same share of
/// the CPU, but its wakeups do not preempt the thread running on a busy CPU.
///
/// For the device I/O thread: where a vCPU has a CPU to itself nothing
/// changes, but where the vCPU shares its CPU with the I/O thread, a queue
/// notification no longer stops the guest at once. The guest runs on until
/// it halts or its time slice ends, and meanwhile queues more. A guest that
/// sends in small writes then makes fewer, larger frames (Linux coalesces
/// writes while an earlier frame is not yet completed) and takes fewer
/// interrupts (docs/BENCHMARKS.md, "Linux networking beside QEMU", run G).
/// Returns whether the policy took; where it did not, nothing changed.
pub fn yield_on_wakeup() -> bool {
    // SAFETY: sched_setscheduler on the calling thread (0) with a valid,
    // zeroed sched_param (priority 0, which SCHED_BATCH requires).
    let r = unsafe {
        let p: libc::sched_param = std::mem::zeroed();
        libc::sched_setscheduler(0, libc::SCHED_BATCH, &p)
    };
    if r != 0 {
        tracing::debug!(
            "the I/O thread keeps its scheduling policy: {}",
            std::io::Error::last_os_error()
        );
    }
    r == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(tid: i32) -> libc::c_int {
        // SAFETY: a plain syscall.
        unsafe { libc::sched_getscheduler(tid) }
    }

    #[test]
    fn a_raised_thread_gets_its_own_policy_back() {
        let (tx, rx) = std::sync::mpsc::channel();
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        let t = std::thread::spawn(move || {
            // SAFETY: gettid has no preconditions.
            tx.send(unsafe { libc::gettid() }).unwrap();
            let _ = done_rx.recv();
        });
        let tid = rx.recv().unwrap();
        let before = policy(tid);
        let b = boost(&[tid]);
        if b.raised() == 1 {
            assert_eq!(policy(tid), libc::SCHED_FIFO);
        } else {
            // No permission here: nothing changed.
            assert_eq!(policy(tid), before);
        }
        b.end();
        assert_eq!(policy(tid), before);
        {
            let _b = boost(&[tid]);
        }
        assert_eq!(policy(tid), before, "dropping the boost gives it back too");
        done_tx.send(()).unwrap();
        t.join().unwrap();
    }

    #[test]
    fn a_thread_that_yields_on_wakeup_runs_batch() {
        let t = std::thread::spawn(|| {
            let took = yield_on_wakeup();
            // SAFETY: a plain syscall on the calling thread.
            let now = unsafe { libc::sched_getscheduler(0) };
            (took, now)
        });
        let (took, now) = t.join().unwrap();
        assert!(took, "SCHED_BATCH needs no privilege");
        assert_eq!(now, libc::SCHED_BATCH);
    }
}
