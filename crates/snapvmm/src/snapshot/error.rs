//! Why a snapshot operation failed: the job's `error` (QMP `query-jobs`) or
//! the command's `desc`, with the cause chain in the text. Wording follows
//! QEMU's where QEMU has the same error.

use super::cut::CutError;
use super::restore::RestoreError;
use super::Busy;

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error(transparent)]
    Busy(#[from] Busy),
    #[error("cannot save a VM in state '{0}'")]
    VmState(qmp::RunState),
    #[error("Parameter 'vmstate' is missing")]
    NoVmstateArg,
    #[error("No block device node '{0}'")]
    NoDevice(String),
    #[error("Device '{0}' is writable but does not support snapshots")]
    NotSnapshotCapable(String),
    #[error("No block device can accept snapshots")]
    NoSnapshotDisk,
    #[error("vmstate block device '{0}' does not exist in the list of devices")]
    VmstateNotListed(String),
    #[error("Snapshot '{0}' already exists in one or more devices")]
    Exists(String),
    #[error("Snapshot '{0}' does not exist in one or more devices")]
    NotOnEveryDisk(String),
    #[error("Snapshot '{0}' does not exist")]
    NoSuchSnapshot(String),
    #[error("Snapshot '{0}' not found")]
    NotFound(String),
    #[error("Snapshot '{0}' has no VM state")]
    NoVmState(String),
    #[error("no disk holds a snapshot '{0}' with VM state")]
    NoVmStateDisk(String),
    #[error("cannot read the VM state of '{tag}': {source}")]
    ReadVmState { tag: String, source: qcow2::Error },
    #[error("Device '{dev}': {source}")]
    Disk { dev: String, source: qcow2::Error },
    #[error("Device '{0}' failed during the save; the snapshot was not taken")]
    LostDuringSave(String),
    #[error("the snapshot was taken with {had} disk(s), this VM has {has}")]
    DiskCount { had: usize, has: usize },
    #[error("Device '{dev}' has {has} bytes, the snapshot's disk had {had}")]
    DiskCapacity { dev: String, has: u64, had: u64 },
    #[error("Device '{0}' is read-only: its snapshot cannot be applied")]
    ReadOnly(String),
    #[error("Device '{dev}': snapshot '{tag}' is of a disk of another size")]
    DiskSize { dev: String, tag: String },
    #[error("the VM state is not usable: {0}")]
    Restore(#[from] RestoreError),
    #[error(transparent)]
    Cut(#[from] CutError),
    #[error(transparent)]
    Capture(livesnap::SnapError),
    #[error("Operation canceled")]
    Cancelled,
    /// The capture method cannot be used on this VM or host.
    #[error("{0}")]
    MethodUnavailable(String),
    /// The machine could not be rebuilt from the snapshot.
    #[error("{0}")]
    Rebuild(String),
}

impl SnapshotError {
    /// A qcow2 failure on disk `dev`.
    pub fn disk(dev: &str, source: qcow2::Error) -> SnapshotError {
        SnapshotError::Disk {
            dev: dev.to_string(),
            source,
        }
    }
}

impl From<livesnap::SnapError> for SnapshotError {
    fn from(e: livesnap::SnapError) -> Self {
        match e {
            livesnap::SnapError::Cancelled => SnapshotError::Cancelled,
            e => SnapshotError::Capture(e),
        }
    }
}

impl From<SnapshotError> for qmp::CommandError {
    fn from(e: SnapshotError) -> Self {
        qmp::CommandError::generic(e.to_string())
    }
}
