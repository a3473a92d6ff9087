//! The QMP side of the controller: implements `qmp::Machine` by sending each
//! request to the controller thread and waiting for its answer, so every
//! lifecycle change is made by the one thread that owns the machine.

use std::sync::mpsc::{self, Sender};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use qmp::{CommandError, CpuInfo, RunState};
use serde_json::Value;

use crate::controller::AppEvent;

/// A QMP request the controller executes.
#[derive(Debug)]
pub enum Request {
    Stop,
    Cont,
    SystemReset,
    SystemPowerdown,
    Quit,
    Migrate(String),
    MigrateCancel,
    MigrateIncoming(String),
    QueryMigrate,
    SetCapabilities(Vec<(String, bool)>),
    QueryCapabilities,
    SetParameters(serde_json::Map<String, Value>),
    QueryParameters,
    SnapshotSave(qmp::SnapshotJob),
    SnapshotLoad(qmp::SnapshotJob),
    SnapshotDelete(qmp::SnapshotJob),
    QueryJobs,
    JobDismiss(String),
    JobCancel(String),
    SaveVm(String),
    LoadVm(String),
    DelVm(String),
    ListSnapshots,
}

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
    fn call(&self, req: Request) -> Result<Value, CommandError> {
        self.call_for(req, Duration::from_secs(120))
    }

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
    fn stop(&self) -> Result<(), CommandError> {
        self.call(Request::Stop).map(drop)
    }
    fn cont(&self) -> Result<(), CommandError> {
        self.call(Request::Cont).map(drop)
    }
    fn system_reset(&self) -> Result<(), CommandError> {
        self.call(Request::SystemReset).map(drop)
    }
    fn system_powerdown(&self) -> Result<(), CommandError> {
        self.call(Request::SystemPowerdown).map(drop)
    }
    fn quit(&self) {
        let _ = self.call(Request::Quit);
    }
    fn name(&self) -> Option<String> {
        self.name.clone()
    }
    fn cpus(&self) -> Vec<CpuInfo> {
        self.shared().cpus
    }
    fn migrate(&self, uri: &str) -> Result<(), CommandError> {
        self.call(Request::Migrate(uri.to_string())).map(drop)
    }
    fn migrate_incoming(&self, uri: &str) -> Result<(), CommandError> {
        self.call(Request::MigrateIncoming(uri.to_string()))
            .map(drop)
    }
    fn migrate_cancel(&self) -> Result<(), CommandError> {
        self.call(Request::MigrateCancel).map(drop)
    }
    fn query_migrate(&self) -> Result<Value, CommandError> {
        self.call(Request::QueryMigrate)
    }
    fn migrate_set_capabilities(&self, caps: Vec<(String, bool)>) -> Result<(), CommandError> {
        self.call(Request::SetCapabilities(caps)).map(drop)
    }
    fn query_migrate_capabilities(&self) -> Result<Value, CommandError> {
        self.call(Request::QueryCapabilities)
    }
    fn migrate_set_parameters(
        &self,
        params: serde_json::Map<String, Value>,
    ) -> Result<(), CommandError> {
        self.call(Request::SetParameters(params)).map(drop)
    }
    fn query_migrate_parameters(&self) -> Result<Value, CommandError> {
        self.call(Request::QueryParameters)
    }
    fn snapshot_save(&self, job: qmp::SnapshotJob) -> Result<(), CommandError> {
        self.call(Request::SnapshotSave(job)).map(drop)
    }
    fn snapshot_load(&self, job: qmp::SnapshotJob) -> Result<(), CommandError> {
        self.call(Request::SnapshotLoad(job)).map(drop)
    }
    fn snapshot_delete(&self, job: qmp::SnapshotJob) -> Result<(), CommandError> {
        self.call(Request::SnapshotDelete(job)).map(drop)
    }
    fn query_jobs(&self) -> Result<Value, CommandError> {
        self.call(Request::QueryJobs)
    }
    fn job_dismiss(&self, id: &str) -> Result<(), CommandError> {
        self.call(Request::JobDismiss(id.to_string())).map(drop)
    }
    fn job_cancel(&self, id: &str) -> Result<(), CommandError> {
        self.call(Request::JobCancel(id.to_string())).map(drop)
    }
    fn savevm(&self, tag: &str) -> Result<(), CommandError> {
        // HMP savevm returns when the save is complete, however long that takes.
        self.call_for(
            Request::SaveVm(tag.to_string()),
            Duration::from_secs(24 * 3600),
        )
        .map(drop)
    }
    fn loadvm(&self, tag: &str) -> Result<(), CommandError> {
        self.call_for(Request::LoadVm(tag.to_string()), Duration::from_secs(3600))
            .map(drop)
    }
    fn delvm(&self, tag: &str) -> Result<(), CommandError> {
        self.call(Request::DelVm(tag.to_string())).map(drop)
    }
    fn list_snapshots(&self) -> Result<Vec<qmp::SnapshotEntry>, CommandError> {
        let v = self.call(Request::ListSnapshots)?;
        serde_json::from_value(v).map_err(|e| CommandError::generic(e.to_string()))
    }
}
