//! A QMP server over a fake machine, for trying real QMP clients:
//! `cargo run -p qmp --example mock_server -- unix:/tmp/qmp.sock`
//! then e.g. `qmp-shell /tmp/qmp.sock`. Emits a `STOP`/`RESUME` event
//! when the fake machine is stopped/continued. Internal snapshots live in
//! memory: HMP `savevm`/`loadvm`/`delvm`/`info snapshots`, and the
//! `snapshot-save`/`-load`/`-delete` jobs, which finish at once with the
//! `JOB_STATUS_CHANGE` sequence created, running, waiting, pending,
//! concluded (and `null` on `job-dismiss`). The fake runs each job inside
//! the command, so its events precede the `{}` reply; a real VMM runs the
//! job in a thread and QEMU's order is reply first.

use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{SystemTime, UNIX_EPOCH};

use qmp::{
    CommandError, CpuInfo, EventBus, ListenAddr, Machine, Request, RunState, Server, SnapshotEntry,
    SnapshotJob,
};
use serde_json::{json, Value};

#[derive(Default)]
struct Fake {
    state: Mutex<Option<RunState>>,
    bus: OnceLock<EventBus>,
    snapshots: Mutex<Vec<SnapshotEntry>>,
    /// (id, type, error)
    jobs: Mutex<Vec<(String, &'static str, Option<String>)>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Fake {
    fn set(&self, s: RunState, event: &str) {
        *lock(&self.state) = Some(s);
        if let Some(bus) = self.bus.get() {
            bus.emit(event, None);
        }
    }
}

impl Fake {
    fn job_status(&self, id: &str, status: &str) {
        if let Some(bus) = self.bus.get() {
            bus.emit(
                "JOB_STATUS_CHANGE",
                Some(json!({"id": id, "status": status})),
            );
        }
    }

    fn save(&self, tag: &str) -> Result<(), CommandError> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let mut snaps = lock(&self.snapshots);
        snaps.retain(|s| s.name != tag);
        let id = (snaps.len() + 1).to_string();
        snaps.push(SnapshotEntry {
            id,
            name: tag.to_string(),
            vm_state_size: 31_768_576,
            date_sec: now.as_secs(),
            date_nsec: now.subsec_nanos(),
            vm_clock_nsec: 12_345_678_901,
            icount: None,
        });
        Ok(())
    }

    fn remove(&self, tag: &str) -> Result<(), CommandError> {
        self.exists(tag)?;
        lock(&self.snapshots).retain(|s| s.name != tag);
        Ok(())
    }

    fn exists(&self, tag: &str) -> Result<(), CommandError> {
        if lock(&self.snapshots).iter().any(|s| s.name == tag) {
            Ok(())
        } else {
            Err(CommandError::generic(format!(
                "Snapshot '{tag}' does not exist in one or more devices"
            )))
        }
    }

    /// Runs a snapshot job to completion, emitting QEMU's event sequence.
    fn run_job(
        &self,
        job: &SnapshotJob,
        kind: &'static str,
        work: impl FnOnce() -> Result<(), CommandError>,
    ) -> Result<(), CommandError> {
        if lock(&self.jobs).iter().any(|j| j.0 == job.job_id) {
            return Err(CommandError::generic(format!(
                "Job ID '{}' already in use",
                job.job_id
            )));
        }
        self.job_status(&job.job_id, "created");
        self.job_status(&job.job_id, "running");
        let error = work().err().map(|e| e.desc);
        let path: &[&str] = if error.is_some() {
            &["aborting"]
        } else {
            &["waiting", "pending"]
        };
        for s in path {
            self.job_status(&job.job_id, s);
        }
        self.job_status(&job.job_id, "concluded");
        lock(&self.jobs).push((job.job_id.clone(), kind, error));
        Ok(())
    }
}

impl Machine for Fake {
    fn status(&self) -> RunState {
        lock(&self.state).unwrap_or(RunState::Running)
    }
    fn name(&self) -> Option<String> {
        Some("mock".into())
    }
    fn cpus(&self) -> Vec<CpuInfo> {
        vec![CpuInfo::x86_64(0, i64::from(std::process::id()))]
    }
    fn request(&self, req: Request) -> Result<Value, CommandError> {
        let done = |r: Result<(), CommandError>| r.map(|()| json!({}));
        match req {
            Request::Stop => {
                self.set(RunState::Paused, "STOP");
                done(Ok(()))
            }
            Request::Cont => {
                self.set(RunState::Running, "RESUME");
                done(Ok(()))
            }
            Request::SystemReset | Request::SystemPowerdown => done(Ok(())),
            Request::Quit => {
                if let Some(bus) = self.bus.get() {
                    bus.emit(
                        "SHUTDOWN",
                        Some(json!({"guest": false, "reason": "host-qmp-quit"})),
                    );
                    bus.flush(std::time::Duration::from_secs(1));
                }
                std::process::exit(0);
            }
            Request::SnapshotSave(job) => {
                done(self.run_job(&job, "snapshot-save", || self.save(&job.tag)))
            }
            Request::SnapshotLoad(job) => {
                done(self.run_job(&job, "snapshot-load", || self.exists(&job.tag)))
            }
            Request::SnapshotDelete(job) => {
                done(self.run_job(&job, "snapshot-delete", || self.remove(&job.tag)))
            }
            Request::QueryJobs => {
                let jobs = lock(&self.jobs);
                Ok(Value::Array(
                    jobs.iter()
                        .map(|(id, kind, error)| {
                            let mut j = json!({"id": id, "type": kind, "status": "concluded",
                                "current-progress": 1, "total-progress": 1});
                            if let Some(e) = error {
                                j["error"] = json!(e);
                            }
                            j
                        })
                        .collect(),
                ))
            }
            Request::JobDismiss(id) => {
                let mut jobs = lock(&self.jobs);
                let before = jobs.len();
                jobs.retain(|j| j.0 != id);
                if jobs.len() == before {
                    return Err(CommandError::generic("Job not found"));
                }
                drop(jobs);
                self.job_status(&id, "null");
                done(Ok(()))
            }
            Request::JobCancel(id) => {
                if lock(&self.jobs).iter().any(|j| j.0 == id) {
                    return Err(CommandError::generic(format!(
                        "Job '{id}' in state 'concluded' cannot accept command verb 'cancel'"
                    )));
                }
                Err(CommandError::generic("Job not found"))
            }
            Request::SaveVm(tag) => done(self.save(&tag)),
            Request::LoadVm(tag) => done(self.exists(&tag)),
            Request::DelVm(tag) => done(self.remove(&tag)),
            Request::ListSnapshots => Ok(json!(lock(&self.snapshots).clone())),
            other => Err(other.unsupported()),
        }
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let arg = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "unix:/tmp/qmp.sock".into());
    let machine = Arc::new(Fake::default());
    let server = Server::start(&ListenAddr::parse(&arg)?, machine.clone())?;
    let _ = machine.bus.set(server.events());
    println!("{}", server.local_addr());
    loop {
        std::thread::park();
    }
}
