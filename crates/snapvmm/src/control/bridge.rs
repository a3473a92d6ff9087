//! The QMP side of the controller: implements `qmp::Machine` by sending each
//! [`qmp::Request`] to the controller thread as it is and waiting for its
//! answer, so every lifecycle change is made by the one thread that owns the
//! machine.

use std::sync::mpsc::{self, Sender};
use std::sync::Mutex;
use std::time::Duration;

use qmp::{CommandError, CpuInfo, Request, RunState};
use serde_json::Value;

use super::event::AppEvent;
use super::runstate::RunStates;

/// Reply channel for one request.
pub type Reply = mpsc::SyncSender<Result<Value, CommandError>>;

/// `qmp::Machine` for snapvmm.
pub struct Bridge {
    pub tx: Mutex<Sender<AppEvent>>,
    pub runstate: RunStates,
    pub name: Option<String>,
}

impl Bridge {
    fn call_for(&self, req: Request, limit: Duration) -> Result<Value, CommandError> {
        let (tx, rx) = mpsc::sync_channel(1);
        let sent = self
            .tx
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .send(AppEvent::Qmp(req, tx));
        if sent.is_err() {
            return Err(CommandError::generic("the VM is shutting down"));
        }
        match rx.recv_timeout(limit) {
            Ok(reply) => reply,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                let msg = format!(
                    "the VM's controller did not answer within {} s (busy with an earlier request or stuck); the command may still take effect",
                    limit.as_secs()
                );
                tracing::error!("{msg}");
                Err(CommandError::generic(msg))
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                Err(CommandError::generic("the VM is shutting down"))
            }
        }
    }
}

impl qmp::Machine for Bridge {
    fn status(&self) -> RunState {
        self.runstate.get()
    }
    fn name(&self) -> Option<String> {
        self.name.clone()
    }
    fn cpus(&self) -> Vec<CpuInfo> {
        self.runstate.cpus()
    }
    fn request(&self, req: Request) -> Result<Value, CommandError> {
        let limit = match req {
            // HMP savevm returns when the save is complete, however long that takes.
            Request::SaveVm(_) => Duration::from_secs(24 * 3600),
            Request::LoadVm(_) => Duration::from_secs(3600),
            _ => Duration::from_secs(120),
        };
        self.call_for(req, limit)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bridge() -> (Bridge, mpsc::Receiver<AppEvent>) {
        let (tx, rx) = mpsc::channel();
        let b = Bridge {
            tx: Mutex::new(tx),
            runstate: RunStates::new(RunState::Running),
            name: None,
        };
        (b, rx)
    }

    /// A controller that takes the request but never answers is reported as
    /// such, not as a VM shutting down; a controller that is gone is.
    #[test]
    fn a_controller_that_does_not_answer_is_not_called_a_shutdown() {
        let (b, rx) = bridge();
        let e = b
            .call_for(Request::Stop, Duration::from_millis(50))
            .unwrap_err();
        assert!(e.to_string().contains("did not answer within"), "{e}");
        assert!(rx.try_recv().is_ok(), "the request reached the controller");
        drop(rx);
        let e = b
            .call_for(Request::Stop, Duration::from_millis(50))
            .unwrap_err();
        assert!(e.to_string().contains("shutting down"), "{e}");
    }
}
