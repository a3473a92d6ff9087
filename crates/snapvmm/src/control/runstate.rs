//! The VM's run state as QMP sees it (`query-status`), and the one place it
//! changes: [`RunStates::set`] checks the transition and emits `STOP` and
//! `RESUME` itself, as QEMU's `vm_stop`/`vm_start` do. QMP client threads
//! read it (and the vCPU list) without asking the controller.

use std::sync::{Arc, Mutex};

use qmp::{CpuInfo, RunState};

use crate::snapshot::Events;

/// What QMP reads without asking the controller.
#[derive(Debug, Clone)]
pub struct Shared {
    pub status: RunState,
    pub cpus: Vec<CpuInfo>,
}

/// A transition the run-state machine does not allow (a bug in the caller).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("run state cannot go from {from} to {to}")]
pub struct IllegalRunState {
    pub from: RunState,
    pub to: RunState,
}

/// The run state, shared with the QMP bridge.
#[derive(Clone)]
pub struct RunStates(Arc<Mutex<Shared>>);

/// Whether `from → to` is allowed: `internal-error` is final; a shut-down
/// VM leaves `shutdown` only through a reset (to running or paused), a
/// snapshot load (`restore-vm`) or an internal error.
pub fn legal(from: RunState, to: RunState) -> bool {
    use RunState::*;
    match from {
        InternalError => to == InternalError,
        Shutdown => matches!(to, Shutdown | Running | Paused | RestoreVm | InternalError),
        _ => true,
    }
}

/// The event a transition emits: `STOP` when a running VM stops (except into
/// `shutdown`, whose `SHUTDOWN` event comes first and `STOP` only with
/// `--no-shutdown`, as in QEMU), `RESUME` when it starts running.
pub fn event(from: RunState, to: RunState) -> Option<&'static str> {
    match (from, to) {
        (f, t) if f == t => None,
        (RunState::Running, RunState::Shutdown) => None,
        (RunState::Running, _) => Some("STOP"),
        (_, RunState::Running) => Some("RESUME"),
        _ => None,
    }
}

impl RunStates {
    /// The state before the machine runs (no event: nobody has seen a state yet).
    pub fn new(initial: RunState) -> RunStates {
        RunStates(Arc::new(Mutex::new(Shared {
            status: initial,
            cpus: Vec::new(),
        })))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Shared> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn get(&self) -> RunState {
        self.lock().status
    }

    pub fn is_running(&self) -> bool {
        self.get() == RunState::Running
    }

    /// The one place the state changes; see [`legal`] and [`event`].
    pub fn set(&self, to: RunState, ev: &dyn Events) -> Result<(), IllegalRunState> {
        let from = {
            let mut s = self.lock();
            let from = s.status;
            if !legal(from, to) {
                let e = IllegalRunState { from, to };
                tracing::error!("internal error: {e}");
                return Err(e);
            }
            s.status = to;
            from
        };
        if let Some(name) = event(from, to) {
            ev.emit(name, None);
        }
        Ok(())
    }

    /// The first state of a machine that was just built (at start-up, no event).
    pub fn start(&self, to: RunState) {
        self.lock().status = to;
    }

    pub fn cpus(&self) -> Vec<CpuInfo> {
        self.lock().cpus.clone()
    }

    pub fn set_cpus(&self, cpus: Vec<CpuInfo>) {
        self.lock().cpus = cpus;
    }
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;

    use super::*;

    #[derive(Default)]
    struct Recorder(RefCell<Vec<String>>);

    impl Events for Recorder {
        fn emit(&self, name: &str, _: Option<serde_json::Value>) {
            self.0.borrow_mut().push(name.to_string());
        }
    }

    #[test]
    fn stop_and_resume_come_from_the_transition() {
        use RunState::*;
        let ev = Recorder::default();
        let rs = RunStates::new(Prelaunch);
        rs.start(Running);
        rs.set(Paused, &ev).unwrap();
        rs.set(Paused, &ev).unwrap();
        rs.set(Running, &ev).unwrap();
        rs.set(RestoreVm, &ev).unwrap();
        rs.set(Running, &ev).unwrap();
        rs.set(Paused, &ev).unwrap();
        rs.set(Postmigrate, &ev).unwrap();
        rs.set(Running, &ev).unwrap();
        assert_eq!(
            *ev.0.borrow(),
            ["STOP", "RESUME", "STOP", "RESUME", "STOP", "RESUME"]
        );
        assert!(rs.is_running());
    }

    #[test]
    fn shutdown_and_internal_error() {
        use RunState::*;
        let ev = Recorder::default();
        let rs = RunStates::new(Running);
        // SHUTDOWN (the caller's) comes first; STOP only with --no-shutdown.
        rs.set(Shutdown, &ev).unwrap();
        assert!(ev.0.borrow().is_empty());
        assert_eq!(
            rs.set(Postmigrate, &ev),
            Err(IllegalRunState {
                from: Shutdown,
                to: Postmigrate
            })
        );
        assert_eq!(rs.get(), Shutdown, "an illegal transition changes nothing");
        rs.set(Running, &ev).unwrap(); // a reset
        rs.set(InternalError, &ev).unwrap();
        assert_eq!(*ev.0.borrow(), ["RESUME", "STOP"]);
        for to in [Running, Paused, Shutdown] {
            assert!(rs.set(to, &ev).is_err(), "internal-error is final");
        }
        assert_eq!(rs.get(), InternalError);
    }
}
