//! The pause window, written once for every snapshot operation (`migrate`
//! with either method, live `snapshot-save` / `savevm`):
//!
//! 1. pause the vCPUs (if some vCPU does not stop in time, resume the others);
//! 2. the vCPU threads save their registers (in parallel) while this thread
//!    runs the operation's `freeze` hook (a savevm freezes its disks' qcow2
//!    metadata here; no memory-map lock is involved);
//! 3. collect the machine state;
//! 4. capture method: **fork** starts the prepared capture child (after the
//!    state: the fork holds the memory-map lock the vCPU ioctls wait on, so
//!    the two in parallel were slower) and resumes the guest; the state is
//!    serialized after the resume. **stop** keeps the guest paused and
//!    returns the state for a copy made while it stays stopped.
//!
//! Any failure before the capture starts resumes the guest (if it ran) and
//! leaves it as it was. A new capture method is one more [`Capture`] arm.

use std::time::{Duration, Instant};

/// What the cut needs of a machine (vmm's, or a fake in tests).
pub trait Pausable {
    /// Registers being saved by the vCPU threads.
    type Pending;
    /// The saved machine state.
    type State;
    fn is_running(&self) -> bool;
    /// Pauses every vCPU, then device I/O; the time the vCPUs took.
    fn pause(&mut self) -> Result<Duration, String>;
    /// How long the last pause waited for device I/O in progress.
    fn io_drain(&self) -> Duration;
    fn resume(&mut self);
    fn begin_save_state(&self) -> Result<Self::Pending, String>;
    fn finish_save_state(&self, p: Self::Pending) -> Result<Self::State, String>;
    /// Keeps the calling thread ahead of the host's other work until the
    /// returned guard drops (the pause window). Default: nothing.
    fn hurry(&self) -> Option<Box<dyn std::any::Any>> {
        None
    }
}

impl Pausable for vmm::Machine {
    type Pending = vmm::PendingState;
    type State = vmm::MachineState;
    fn is_running(&self) -> bool {
        vmm::Machine::is_running(self)
    }
    fn pause(&mut self) -> Result<Duration, String> {
        vmm::Machine::pause(self).map_err(|e| e.to_string())
    }
    fn io_drain(&self) -> Duration {
        vmm::Machine::io_drain(self)
    }
    fn resume(&mut self) {
        vmm::Machine::resume(self)
    }
    fn begin_save_state(&self) -> Result<vmm::PendingState, String> {
        vmm::Machine::begin_save_state(self).map_err(|e| e.to_string())
    }
    fn finish_save_state(&self, p: vmm::PendingState) -> Result<vmm::MachineState, String> {
        vmm::Machine::finish_save_state(self, p).map_err(|e| e.to_string())
    }
    fn hurry(&self) -> Option<Box<dyn std::any::Any>> {
        Some(Box::new(vmm::sched::boost(&[0])))
    }
}

/// How RAM is captured once the state is saved.
pub enum Capture {
    /// A prepared fork capture (its pipe and sink set up with the guest running).
    Fork(livesnap::PreparedCapture),
    /// A prepared write-protect capture: RAM is write-protected inside the
    /// pause (one call per range) and copied 2 MiB at a time afterwards.
    Wp(livesnap::wp::PreparedWpCapture),
    /// Stop-and-copy: the guest stays paused while RAM is written.
    Stop,
}

/// Why the cut failed; the guest runs again if it ran before.
#[derive(Debug, thiserror::Error)]
pub enum CutError {
    #[error("{0}")]
    Pause(String),
    #[error("cannot save machine state: {0}")]
    State(String),
    #[error("{0}")]
    Freeze(String),
    #[error(transparent)]
    Fork(livesnap::SnapError),
}

/// Figures of one cut.
#[derive(Debug, Clone, Copy, Default)]
pub struct Times {
    /// Pausing the vCPUs alone.
    pub vcpu_pause: Duration,
    /// Then waiting for device I/O in progress to end.
    pub io_drain: Duration,
    /// Saving the non-RAM state (and the freeze hook).
    pub state: Duration,
    /// Starting the capture alone: the `fork()` of a fork capture, the
    /// protection of a write-protect one (QMP's `x-fork-us`).
    pub start: Duration,
    /// The guest's pause: vCPUs paused → resumed (fork); zero for stop, whose
    /// pause lasts until the copy ends.
    pub downtime: Duration,
}

/// A cut that succeeded.
pub enum Outcome<S> {
    /// The guest runs again; the capture streams RAM. The state goes to
    /// `sender` (or its failure, which fails the capture). `wp` has the
    /// write-protect capture's counters.
    Running {
        capture: livesnap::Capture,
        sender: livesnap::StateSender,
        state: Result<S, String>,
        wp: Option<std::sync::Arc<livesnap::wp::WpCounters>>,
    },
    /// The guest stays paused (if it ran); copy RAM, then resume or not.
    Stopped { state: S },
}

pub struct Cut<S> {
    pub outcome: Outcome<S>,
    /// The guest ran before the cut (a stop-and-copy resumes only then).
    pub was_running: bool,
    pub times: Times,
}

/// Runs the pause window; see the module documentation.
pub fn cut<M: Pausable>(
    m: &mut M,
    capture: Capture,
    freeze: impl FnOnce(&M) -> Result<(), String>,
) -> Result<Cut<M::State>, CutError> {
    let t0 = Instant::now();
    // The controller's thread too: it saves the device state inside the
    // pause (the vCPU threads are raised by the machine's own pause).
    let _hurry = m.hurry();
    let was_running = m.is_running();
    let mut times = Times::default();
    if was_running {
        match m.pause() {
            Ok(d) => {
                times.vcpu_pause = d;
                times.io_drain = m.io_drain();
            }
            Err(e) => {
                // Some vCPU did not stop in time: let the others run again.
                m.resume();
                return Err(CutError::Pause(e));
            }
        }
    }
    let resume = |m: &mut M| {
        if was_running {
            m.resume();
        }
    };
    let t_state = Instant::now();
    let pending = match m.begin_save_state() {
        Ok(p) => p,
        Err(e) => {
            resume(m);
            return Err(CutError::State(e));
        }
    };
    let frozen = freeze(m);
    let state = m.finish_save_state(pending);
    times.state = t_state.elapsed();
    // Back to normal priority before the capture starts: a thread it spawns
    // or a process it forks would inherit real-time priority for its whole
    // life, and a writer at SCHED_FIFO starves everything else on one CPU.
    drop(_hurry);
    if let Err(e) = frozen {
        resume(m);
        return Err(CutError::Freeze(e));
    }
    match capture {
        Capture::Stop => match state {
            Ok(state) => Ok(Cut {
                outcome: Outcome::Stopped { state },
                was_running,
                times,
            }),
            Err(e) => {
                resume(m);
                Err(CutError::State(e))
            }
        },
        Capture::Fork(prepared) => {
            let started = prepared.start_deferred();
            resume(m);
            times.downtime = t0.elapsed();
            let (capture, sender) = started.map_err(CutError::Fork)?;
            times.start = capture.pause_time();
            Ok(Cut {
                outcome: Outcome::Running {
                    capture,
                    sender,
                    state,
                    wp: None,
                },
                was_running,
                times,
            })
        }
        Capture::Wp(prepared) => {
            let t = Instant::now();
            let started = prepared.start_deferred();
            times.start = t.elapsed();
            resume(m);
            times.downtime = t0.elapsed();
            let (capture, sender, wp) = started.map_err(CutError::Fork)?;
            Ok(Cut {
                outcome: Outcome::Running {
                    capture,
                    sender,
                    state,
                    wp: Some(wp),
                },
                was_running,
                times,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;

    use super::*;

    /// A machine that logs what the cut does to it and fails where told.
    #[derive(Default)]
    struct Fake {
        running: bool,
        log: RefCell<Vec<&'static str>>,
        fail_pause: bool,
        fail_begin: bool,
        fail_finish: bool,
    }

    impl Pausable for Fake {
        type Pending = ();
        type State = Vec<u8>;
        fn is_running(&self) -> bool {
            self.running
        }
        fn pause(&mut self) -> Result<Duration, String> {
            self.log.borrow_mut().push("pause");
            if self.fail_pause {
                return Err("vCPU 1 did not pause".into());
            }
            self.running = false;
            Ok(Duration::from_micros(150))
        }
        fn io_drain(&self) -> Duration {
            Duration::from_micros(20)
        }
        fn resume(&mut self) {
            self.log.borrow_mut().push("resume");
            self.running = true;
        }
        fn begin_save_state(&self) -> Result<(), String> {
            self.log.borrow_mut().push("begin");
            if self.fail_begin {
                return Err("KVM_GET_REGS failed".into());
            }
            Ok(())
        }
        fn finish_save_state(&self, _: ()) -> Result<Vec<u8>, String> {
            self.log.borrow_mut().push("finish");
            if self.fail_finish {
                return Err("KVM_GET_XSAVE failed".into());
            }
            Ok(b"state".to_vec())
        }
    }

    fn freeze_ok(m: &Fake) -> Result<(), String> {
        m.log.borrow_mut().push("freeze");
        Ok(())
    }

    fn running() -> Fake {
        Fake {
            running: true,
            ..Fake::default()
        }
    }

    #[test]
    fn stop_and_copy_keeps_the_guest_paused_with_its_state() {
        let mut m = running();
        let c = cut(&mut m, Capture::Stop, freeze_ok).unwrap();
        assert!(c.was_running);
        assert!(!m.running, "still paused for the copy");
        assert_eq!(*m.log.borrow(), ["pause", "begin", "freeze", "finish"]);
        assert_eq!(c.times.vcpu_pause, Duration::from_micros(150));
        assert_eq!(c.times.io_drain, Duration::from_micros(20));
        let Outcome::Stopped { state } = c.outcome else {
            panic!("stop gives a stopped outcome")
        };
        assert_eq!(state, b"state");
        // A paused guest is not paused again, nor resumed.
        let mut m = Fake::default();
        let c = cut(&mut m, Capture::Stop, freeze_ok).unwrap();
        assert!(!c.was_running);
        assert_eq!(*m.log.borrow(), ["begin", "freeze", "finish"]);
    }

    #[test]
    fn every_failure_before_the_capture_resumes_a_running_guest() {
        type Setup = fn(&mut Fake);
        let cases: [(&str, Setup, &[&str]); 4] = [
            ("pause", |m| m.fail_pause = true, &["pause", "resume"]),
            (
                "begin",
                |m| m.fail_begin = true,
                &["pause", "begin", "resume"],
            ),
            (
                "finish",
                |m| m.fail_finish = true,
                &["pause", "begin", "freeze", "finish", "resume"],
            ),
            (
                "freeze",
                |_| {},
                &["pause", "begin", "freeze", "finish", "resume"],
            ),
        ];
        for (what, setup, expected) in cases {
            let mut m = running();
            setup(&mut m);
            let freeze = |m: &Fake| {
                m.log.borrow_mut().push("freeze");
                if what == "freeze" {
                    Err("Device 'disk0': no space left".to_string())
                } else {
                    Ok(())
                }
            };
            let e = match cut(&mut m, Capture::Stop, freeze) {
                Err(e) => e,
                Ok(_) => panic!("{what}: the cut succeeded"),
            };
            assert_eq!(*m.log.borrow(), expected, "{what}");
            assert!(m.running, "{what}: the guest runs again");
            let text = e.to_string();
            match what {
                "pause" => {
                    assert!(matches!(e, CutError::Pause(_)) && text.contains("did not pause"))
                }
                "freeze" => assert!(matches!(e, CutError::Freeze(_)) && text.contains("no space")),
                _ => assert!(
                    text.starts_with("cannot save machine state: KVM_"),
                    "{text}"
                ),
            }
        }
        // A paused guest stays paused when the cut fails.
        let mut m = Fake {
            fail_begin: true,
            ..Fake::default()
        };
        assert!(cut(&mut m, Capture::Stop, freeze_ok).is_err());
        assert!(!m.running);
        assert_eq!(*m.log.borrow(), ["begin"]);
    }

    #[test]
    fn fork_resumes_at_once_and_the_capture_gets_the_state() {
        // 16 KiB of page-aligned "guest RAM" and an in-memory destination.
        let mut backing = vec![0x5au8; 5 * 4096];
        let off = backing.as_ptr().align_offset(4096);
        let ram = &mut backing[off..off + 4 * 4096];
        ram[4096..8192].fill(0); // a zero page: a hole in the image
                                 // SAFETY: `backing` outlives the capture (waited for below).
        let range = unsafe { livesnap::RamRange::new(0, ram.as_ptr(), ram.len() as u64) };
        struct Mem(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);
        impl livesnap::Sink for Mem {
            fn write_at(&mut self, buf: &[u8], offset: u64) -> std::io::Result<()> {
                let mut v = self.0.lock().unwrap();
                let end = offset as usize + buf.len();
                if v.len() < end {
                    v.resize(end, 0);
                }
                v[offset as usize..end].copy_from_slice(buf);
                Ok(())
            }
            fn finish(&mut self, s: &livesnap::ImageSummary) -> std::io::Result<()> {
                self.0.lock().unwrap().resize(s.image_len as usize, 0);
                Ok(())
            }
            fn abort(&mut self) {}
        }
        let out = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let prepared = livesnap::prepare_fork_capture(
            &[range],
            livesnap::Destination::Sink(Box::new(Mem(out.clone()))),
            livesnap::ForkOptions::default(),
        )
        .unwrap();
        let mut m = running();
        let c = cut(&mut m, Capture::Fork(prepared), freeze_ok).unwrap();
        assert!(m.running, "resumed before the RAM is written");
        assert_eq!(
            *m.log.borrow(),
            ["pause", "begin", "freeze", "finish", "resume"]
        );
        assert!(
            c.times.downtime >= c.times.start,
            "the fork is inside the pause"
        );
        let Outcome::Running {
            capture,
            sender,
            state,
            ..
        } = c.outcome
        else {
            panic!("fork gives a forked outcome")
        };
        // The guest writes after the cut; the image keeps the cut's RAM.
        ram[0] = 0xee;
        sender.send(state.unwrap());
        capture.wait().unwrap();
        let image = livesnap::Image::from_source(Box::new(out.lock().unwrap().clone())).unwrap();
        assert_eq!(image.device_state().unwrap(), b"state");
        let mut back = vec![0u8; 4 * 4096];
        image.read_ram_into(0, &mut back).unwrap();
        assert_eq!(back[0], 0x5a, "RAM of the cut, not of later writes");
        assert!(back[4096..8192].iter().all(|&b| b == 0));
    }
}
