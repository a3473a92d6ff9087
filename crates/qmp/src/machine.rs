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

/// What QMP asks the VMM to do: one variant per command the VMM executes
/// (QMP commands and the HMP forms that reach the machine). This is the one
/// list: a new command is a `commands/` module that builds its variant, and
/// one arm in the VMM's exhaustive match.
#[derive(Debug, Clone, PartialEq)]
pub enum Request {
    /// `stop`: pause all vCPUs. Pausing a paused VM is not an error.
    Stop,
    /// `cont`: resume all vCPUs.
    Cont,
    /// `system_reset`: hard reset.
    SystemReset,
    /// `system_powerdown`: press the ACPI power button.
    SystemPowerdown,
    /// `query-vm-generation-id`: returns `{"guid": ...}`.
    QueryVmGenerationId,
    /// `quit`: terminate the VMM. Sent after the `{"return": {}}` reply
    /// has been written to the client (or a short timeout expired).
    Quit,
    /// `migrate {"uri"}`: start a snapshot/migration to the URI.
    Migrate(String),
    /// `migrate {"uri", "resume": true}`: carry a paused post-copy migration on.
    MigrateResume(String),
    /// `migrate-incoming {"uri"}`: load the VM from the URI (`-incoming defer`).
    MigrateIncoming(String),
    /// `migrate-recover {"uri"}`: a paused post-copy target listens again.
    MigrateRecover(String),
    /// `migrate-start-postcopy`.
    MigrateStartPostcopy,
    /// `migrate-pause`: break a post-copy migration's connection.
    MigratePause,
    /// `migrate_cancel`.
    MigrateCancel,
    /// `query-migrate`: returns a MigrationInfo object.
    QueryMigrate,
    /// `migrate-set-capabilities`: (capability, state) pairs, all or nothing.
    MigrateSetCapabilities(Vec<(String, bool)>),
    /// `query-migrate-capabilities`: returns a list of {"capability", "state"}.
    QueryMigrateCapabilities,
    /// `migrate-set-parameters`: the parameters given (an object).
    MigrateSetParameters(serde_json::Map<String, serde_json::Value>),
    /// `query-migrate-parameters`.
    QueryMigrateParameters,
    /// `snapshot-save`: start a job saving an internal snapshot; return once
    /// the job exists (progress via `query-jobs` and `JOB_STATUS_CHANGE`).
    SnapshotSave(SnapshotJob),
    /// `snapshot-load`: start a job loading an internal snapshot.
    SnapshotLoad(SnapshotJob),
    /// `snapshot-delete`: start a job deleting one (`vmstate` is `None`).
    SnapshotDelete(SnapshotJob),
    /// `query-jobs`: returns a list of JobInfo objects.
    QueryJobs,
    /// `job-cancel {"id"}`.
    JobCancel(String),
    /// `job-dismiss {"id"}`: remove a concluded job.
    JobDismiss(String),
    /// `job-finalize {"id"}`: finalize a pending job.
    JobFinalize(String),
    /// HMP `savevm TAG`: save an internal snapshot, returning when done. A
    /// bare `savevm` passes a generated tag, `vm-YYYYMMDDhhmmss` (local time).
    SaveVm(String),
    /// HMP `loadvm TAG`: load an internal snapshot, returning when done.
    LoadVm(String),
    /// HMP `delvm TAG`: delete an internal snapshot from every disk.
    DelVm(String),
    /// HMP `info snapshots`: returns the [`SnapshotEntry`] list of the
    /// snapshots present on all snapshot-capable disks. With no such disk,
    /// QEMU fails with "no block device can store vmstate for snapshot".
    ListSnapshots,
}

impl Request {
    /// The command's wire name (for messages).
    pub fn command(&self) -> &'static str {
        match self {
            Request::Stop => "stop",
            Request::Cont => "cont",
            Request::SystemReset => "system_reset",
            Request::SystemPowerdown => "system_powerdown",
            Request::QueryVmGenerationId => "query-vm-generation-id",
            Request::Quit => "quit",
            Request::Migrate(_) => "migrate",
            Request::MigrateResume(_) => "migrate",
            Request::MigrateIncoming(_) => "migrate-incoming",
            Request::MigrateRecover(_) => "migrate-recover",
            Request::MigrateStartPostcopy => "migrate-start-postcopy",
            Request::MigratePause => "migrate-pause",
            Request::MigrateCancel => "migrate_cancel",
            Request::QueryMigrate => "query-migrate",
            Request::MigrateSetCapabilities(_) => "migrate-set-capabilities",
            Request::QueryMigrateCapabilities => "query-migrate-capabilities",
            Request::MigrateSetParameters(_) => "migrate-set-parameters",
            Request::QueryMigrateParameters => "query-migrate-parameters",
            Request::SnapshotSave(_) => "snapshot-save",
            Request::SnapshotLoad(_) => "snapshot-load",
            Request::SnapshotDelete(_) => "snapshot-delete",
            Request::QueryJobs => "query-jobs",
            Request::JobCancel(_) => "job-cancel",
            Request::JobDismiss(_) => "job-dismiss",
            Request::JobFinalize(_) => "job-finalize",
            Request::SaveVm(_) => "savevm",
            Request::LoadVm(_) => "loadvm",
            Request::DelVm(_) => "delvm",
            Request::ListSnapshots => "info snapshots",
        }
    }

    /// The error of a request a machine does not implement: loud, never a
    /// silent success.
    pub fn unsupported(&self) -> CommandError {
        CommandError::generic(format!(
            "{} is not supported by this machine",
            self.command()
        ))
    }
}

/// What the VMM exposes to QMP. Every method is called from a QMP client
/// thread.
pub trait Machine: Send + Sync + 'static {
    /// Current run state (`query-status`, `info status`); must not block.
    fn status(&self) -> RunState;
    /// The VM name given by the user (`query-name`), if any.
    fn name(&self) -> Option<String>;
    /// The vCPUs (`query-cpus-fast`, `info cpus`); must not block.
    fn cpus(&self) -> Vec<CpuInfo>;
    /// Executes a request; returns the reply's `return` value (`{}` for
    /// commands that return nothing).
    fn request(&self, req: Request) -> Result<serde_json::Value, CommandError>;
}
