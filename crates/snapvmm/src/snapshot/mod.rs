//! Snapshot orchestration without the controller: what may run while a
//! snapshot operation is under way ([`Op`], [`check`]), the migration state
//! machine ([`migrate`]), the pause window ([`cut`]), a live migration's policy on the source
//! ([`live`]), internal snapshots in
//! qcow2 disks ([`savevm`]), restore ([`restore`]) and the huge-page rebuild
//! after a capture ([`collapse`]). Nothing here knows the controller's event
//! type: completions are callbacks, QMP events go through [`Events`].

pub mod collapse;
pub mod cut;
mod error;
pub mod job;
pub mod live;
pub mod migrate;
pub mod restore;
pub mod savevm;
pub mod transport;

use serde_json::Value;

pub use error::SnapshotError;

/// Where QMP events go: the controller's event bus, or a recorder in tests.
pub trait Events {
    fn emit(&self, name: &str, data: Option<Value>);
}

impl Events for Option<qmp::EventBus> {
    fn emit(&self, name: &str, data: Option<Value>) {
        if let Some(bus) = self {
            bus.emit(name, data);
        }
    }
}

/// The snapshot operation under way: at most one at a time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Idle,
    /// `migrate` with a fork capture: the guest runs.
    Migrate,
    /// `migrate` stop-and-copy: the guest stays stopped until it ends.
    StopCopy,
    /// A live `snapshot-save` / HMP `savevm` between its cut and its commit.
    SaveVm,
}

/// Commands whose answer depends on the operation under way.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cmd {
    Migrate,
    MigrateSetCapabilities,
    MigrateSetParameters,
    SnapshotSave,
    SnapshotLoad,
    SnapshotDelete,
    SystemReset,
    Cont,
}

impl Cmd {
    pub const ALL: [Cmd; 8] = [
        Cmd::Migrate,
        Cmd::MigrateSetCapabilities,
        Cmd::MigrateSetParameters,
        Cmd::SnapshotSave,
        Cmd::SnapshotLoad,
        Cmd::SnapshotDelete,
        Cmd::SystemReset,
        Cmd::Cont,
    ];
}

/// A command refused because of the operation under way (QEMU's wording).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("There's a migration process in progress")]
pub struct Busy;

/// The single answer to "may `cmd` run during `op`?".
pub fn check(op: Op, cmd: Cmd) -> Result<(), Busy> {
    let allowed = match (op, cmd) {
        (Op::Idle, _) => true,
        // A fork capture or a live savevm does not need the guest stopped.
        (Op::Migrate | Op::SaveVm, Cmd::Cont) => true,
        // Migration settings are the migration's only while it runs.
        (Op::SaveVm, Cmd::MigrateSetCapabilities | Cmd::MigrateSetParameters) => true,
        // Anything that starts a snapshot operation, changes disks or
        // replaces guest RAM waits for the one under way to end.
        (_, _) => false,
    };
    if allowed {
        Ok(())
    } else {
        Err(Busy)
    }
}

impl From<Busy> for qmp::CommandError {
    fn from(b: Busy) -> Self {
        qmp::CommandError::generic(b.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_operation_at_a_time_for_every_command_pair() {
        for cmd in Cmd::ALL {
            assert_eq!(check(Op::Idle, cmd), Ok(()), "{cmd:?} when idle");
            assert_eq!(
                check(Op::StopCopy, cmd),
                Err(Busy),
                "{cmd:?} during stop-and-copy"
            );
            for op in [Op::Migrate, Op::SaveVm] {
                let expected = match cmd {
                    Cmd::Cont => true,
                    Cmd::MigrateSetCapabilities | Cmd::MigrateSetParameters => op == Op::SaveVm,
                    Cmd::Migrate
                    | Cmd::SnapshotSave
                    | Cmd::SnapshotLoad
                    | Cmd::SnapshotDelete
                    | Cmd::SystemReset => false,
                };
                assert_eq!(check(op, cmd).is_ok(), expected, "{cmd:?} during {op:?}");
            }
        }
        assert_eq!(
            qmp::CommandError::from(Busy).desc,
            "There's a migration process in progress"
        );
    }
}
