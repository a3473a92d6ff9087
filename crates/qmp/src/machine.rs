//! The interface between the QMP server and the VMM: the [`Machine`] trait.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::error::CommandError;

/// QEMU's `RunState` enumeration (qapi/run-state.json), serialised in
/// QEMU's kebab-case spelling.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum RunState {
    /// QEMU is running on a debugger.
    Debug,
    /// Guest is paused waiting for an incoming migration.
    Inmigrate,
    /// An internal error occurred; a restart is required.
    InternalError,
    /// The last I/O operation failed and the VM was stopped.
    IoError,
    /// Guest has been paused by the user.
    Paused,
    /// Guest is paused following a successful migrate.
    Postmigrate,
    /// QEMU was started with `-S` and the guest has not started.
    Prelaunch,
    /// Guest is paused to finish the migration process.
    FinishMigrate,
    /// Guest is paused to restore the VM state.
    RestoreVm,
    /// Guest is actively running.
    Running,
    /// Guest is paused to save the VM state.
    SaveVm,
    /// Guest is shut down (and `-no-shutdown` is in use).
    Shutdown,
    /// Guest is suspended (ACPI S3).
    Suspended,
    /// The watchdog action is configured to pause and has been triggered.
    Watchdog,
    /// Guest has panicked as a result of guest OS panic.
    GuestPanicked,
    /// Guest is paused to save/restore VM state under COLO.
    Colo,
}

impl RunState {
    /// QEMU's wire name, e.g. `"finish-migrate"`.
    pub fn as_str(self) -> &'static str {
        match self {
            RunState::Debug => "debug",
            RunState::Inmigrate => "inmigrate",
            RunState::InternalError => "internal-error",
            RunState::IoError => "io-error",
            RunState::Paused => "paused",
            RunState::Postmigrate => "postmigrate",
            RunState::Prelaunch => "prelaunch",
            RunState::FinishMigrate => "finish-migrate",
            RunState::RestoreVm => "restore-vm",
            RunState::Running => "running",
            RunState::SaveVm => "save-vm",
            RunState::Shutdown => "shutdown",
            RunState::Suspended => "suspended",
            RunState::Watchdog => "watchdog",
            RunState::GuestPanicked => "guest-panicked",
            RunState::Colo => "colo",
        }
    }

    /// Whether QEMU reports `"running": true` for this state.
    pub fn is_running(self) -> bool {
        self == RunState::Running
    }
}

impl fmt::Display for RunState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Topology properties of a vCPU (QEMU's `CpuInstanceProperties`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct CpuProps {
    /// NUMA node, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node_id: Option<i64>,
    /// Socket number.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub socket_id: Option<i64>,
    /// Die number.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub die_id: Option<i64>,
    /// Core number.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub core_id: Option<i64>,
    /// Thread number within the core.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub thread_id: Option<i64>,
}

/// One vCPU as reported by `query-cpus-fast` (QEMU's `CpuInfoFast`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct CpuInfo {
    /// Index of the vCPU.
    pub cpu_index: i64,
    /// QOM path, e.g. `/machine/unattached/device[0]`.
    pub qom_path: String,
    /// Host thread id (TID) of the vCPU thread.
    pub thread_id: i64,
    /// Topology properties.
    pub props: CpuProps,
    /// QEMU target name, e.g. `x86_64`.
    pub target: String,
}

impl CpuInfo {
    /// An x86_64 vCPU with QEMU's default QOM path layout
    /// (`/machine/unattached/device[N]`) and a flat topology
    /// (one socket, one core per vCPU, one thread per core).
    pub fn x86_64(cpu_index: i64, host_thread_id: i64) -> Self {
        CpuInfo {
            cpu_index,
            qom_path: format!("/machine/unattached/device[{cpu_index}]"),
            thread_id: host_thread_id,
            props: CpuProps {
                socket_id: Some(0),
                core_id: Some(cpu_index),
                thread_id: Some(0),
                ..CpuProps::default()
            },
            target: "x86_64".to_string(),
        }
    }
}

/// The arguments of `snapshot-save`, `snapshot-load` and `snapshot-delete`
/// (qapi/migration.json, QEMU 6.0): start a background job named `job_id`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotJob {
    /// `job-id`: identifier of the new job (`query-jobs`, `JOB_STATUS_CHANGE`).
    pub job_id: String,
    /// `tag`: name of the snapshot.
    pub tag: String,
    /// `vmstate`: block node that stores (or holds) the VM state; `None`
    /// for `snapshot-delete`, which has no such argument.
    pub vmstate: Option<String>,
    /// `devices`: block node names to snapshot, load or delete from.
    pub devices: Vec<String>,
}

/// One internal snapshot present on every snapshot-capable disk, as
/// listed by HMP `info snapshots` (QEMU's `QEMUSnapshotInfo`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotEntry {
    /// Snapshot id (QEMU prints `--` for snapshots present on all disks,
    /// since ids may differ between images; kept for completeness).
    pub id: String,
    /// Tag (name) of the snapshot.
    pub name: String,
    /// Size of the saved VM state in bytes.
    pub vm_state_size: u64,
    /// Creation time, seconds since the Unix epoch.
    pub date_sec: u64,
    /// Creation time, nanoseconds part.
    pub date_nsec: u32,
    /// Guest clock (`QEMU_CLOCK_VIRTUAL`) at save time, in nanoseconds.
    pub vm_clock_nsec: u64,
    /// Instruction count (record/replay only); `None` prints `--`.
    pub icount: Option<u64>,
}

/// What the VMM exposes to QMP. Every method is called from a QMP client
/// thread; implementations must not block for long.
pub trait Machine: Send + Sync + 'static {
    /// Current run state (`query-status`, `info status`).
    fn status(&self) -> RunState;
    /// Pause all vCPUs (`stop`). Pausing a paused VM is not an error.
    fn stop(&self) -> Result<(), CommandError>;
    /// Resume all vCPUs (`cont`).
    fn cont(&self) -> Result<(), CommandError>;
    /// Hard reset (`system_reset`).
    fn system_reset(&self) -> Result<(), CommandError>;
    /// Ask the guest to power down, ACPI style (`system_powerdown`).
    fn system_powerdown(&self) -> Result<(), CommandError>;
    /// Terminate the VMM (`quit`). Called after the `{"return": {}}`
    /// reply has been written to the client (or a short timeout expired).
    fn quit(&self);
    /// The VM name given by the user (`query-name`), if any.
    fn name(&self) -> Option<String>;
    /// The vCPUs (`query-cpus-fast`).
    fn cpus(&self) -> Vec<CpuInfo>;

    /// `migrate {"uri"}`: start a snapshot/migration to `uri`.
    fn migrate(&self, uri: &str) -> Result<(), CommandError> {
        Err(unsupported("migrate", uri))
    }
    /// `migrate-incoming {"uri"}`: load the VM from `uri` (started with `-incoming defer`).
    fn migrate_incoming(&self, uri: &str) -> Result<(), CommandError> {
        Err(unsupported("migrate-incoming", uri))
    }
    /// `migrate_cancel`.
    fn migrate_cancel(&self) -> Result<(), CommandError> {
        Err(unsupported("migrate_cancel", ""))
    }
    /// `query-migrate`: a MigrationInfo object.
    fn query_migrate(&self) -> Result<serde_json::Value, CommandError> {
        Err(unsupported("query-migrate", ""))
    }
    /// `migrate-set-capabilities`: (capability, state) pairs, applied all or nothing.
    fn migrate_set_capabilities(&self, caps: Vec<(String, bool)>) -> Result<(), CommandError> {
        let _ = caps;
        Err(unsupported("migrate-set-capabilities", ""))
    }
    /// `query-migrate-capabilities`: a list of {"capability", "state"}.
    fn query_migrate_capabilities(&self) -> Result<serde_json::Value, CommandError> {
        Err(unsupported("query-migrate-capabilities", ""))
    }
    /// `migrate-set-parameters`: the parameters given (an object).
    fn migrate_set_parameters(
        &self,
        params: serde_json::Map<String, serde_json::Value>,
    ) -> Result<(), CommandError> {
        let _ = params;
        Err(unsupported("migrate-set-parameters", ""))
    }
    /// `query-migrate-parameters`.
    fn query_migrate_parameters(&self) -> Result<serde_json::Value, CommandError> {
        Err(unsupported("query-migrate-parameters", ""))
    }

    /// `snapshot-save`: start a job that saves an internal snapshot. Return
    /// once the job exists (QEMU returns `{}` at once); report progress via
    /// `query-jobs` and `JOB_STATUS_CHANGE` events.
    fn snapshot_save(&self, job: SnapshotJob) -> Result<(), CommandError> {
        let _ = job;
        Err(unsupported("snapshot-save", ""))
    }
    /// `snapshot-load`: start a job that loads an internal snapshot.
    fn snapshot_load(&self, job: SnapshotJob) -> Result<(), CommandError> {
        let _ = job;
        Err(unsupported("snapshot-load", ""))
    }
    /// `snapshot-delete`: start a job that deletes an internal snapshot
    /// (`job.vmstate` is always `None`).
    fn snapshot_delete(&self, job: SnapshotJob) -> Result<(), CommandError> {
        let _ = job;
        Err(unsupported("snapshot-delete", ""))
    }
    /// `query-jobs`: a list of JobInfo objects, `[{"id", "type", "status",
    /// "current-progress", "total-progress", "error"?}]`.
    fn query_jobs(&self) -> Result<serde_json::Value, CommandError> {
        Err(unsupported("query-jobs", ""))
    }
    /// `job-dismiss {"id"}`: remove a concluded job.
    fn job_dismiss(&self, id: &str) -> Result<(), CommandError> {
        Err(unsupported("job-dismiss", id))
    }
    /// `job-cancel {"id"}`: cancel a job.
    fn job_cancel(&self, id: &str) -> Result<(), CommandError> {
        Err(unsupported("job-cancel", id))
    }
    /// `job-finalize {"id"}`: finalize a pending job.
    fn job_finalize(&self, id: &str) -> Result<(), CommandError> {
        Err(unsupported("job-finalize", id))
    }
    /// HMP `savevm TAG`: save an internal snapshot, returning when done.
    /// A bare `savevm` passes a generated tag, `vm-YYYYMMDDhhmmss` (local time).
    fn savevm(&self, tag: &str) -> Result<(), CommandError> {
        Err(unsupported("savevm", tag))
    }
    /// HMP `loadvm TAG`: load an internal snapshot, returning when done.
    fn loadvm(&self, tag: &str) -> Result<(), CommandError> {
        Err(unsupported("loadvm", tag))
    }
    /// HMP `delvm TAG`: delete an internal snapshot from every disk.
    fn delvm(&self, tag: &str) -> Result<(), CommandError> {
        Err(unsupported("delvm", tag))
    }
    /// HMP `info snapshots`: the snapshots present on all snapshot-capable
    /// disks. With no such disk, QEMU fails with "no block device can
    /// store vmstate for snapshot".
    fn list_snapshots(&self) -> Result<Vec<SnapshotEntry>, CommandError> {
        Err(unsupported("info snapshots", ""))
    }
}

/// The error of a command this machine does not implement: loud, never a silent success.
fn unsupported(cmd: &str, _arg: &str) -> CommandError {
    CommandError::generic(format!("{cmd} is not supported by this machine"))
}
