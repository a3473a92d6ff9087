//! The QMP side of the controller: implements `qmp::Machine` by sending each
//! [`qmp::Request`] to the controller thread as it is and waiting for its
//! answer, so every lifecycle change is made by the one thread that owns the
//! machine.

use std::sync::mpsc::{self, Sender};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use qmp::{CommandError, CpuInfo, Request, RunState};
use serde_json::Value;

use super::AppEvent;

/// Reply channel for one request.
pub type Reply = mpsc::SyncSender<Result<Value, CommandError>>;

/// What QMP reads without asking the controller.
#[derive(Debug, Clone)]
pub struct Shared {
    pub status: RunState,
    pub cpus: Vec<CpuInfo>,
}

/// `qmp::Machine` for snapvmm.
pub struct Bridge {
    pub tx: Mutex<Sender<AppEvent>>,
    pub shared: Arc<Mutex<Shared>>,
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
        rx.recv_timeout(limit)
            .unwrap_or_else(|_| Err(CommandError::generic("the VM is shutting down")))
    }

    fn shared(&self) -> Shared {
        self.shared
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

impl qmp::Machine for Bridge {
    fn status(&self) -> RunState {
        self.shared().status
    }
    fn name(&self) -> Option<String> {
        self.name.clone()
    }
    fn cpus(&self) -> Vec<CpuInfo> {
        self.shared().cpus
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
