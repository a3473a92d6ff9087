//! Snapshot orchestration without the controller: the migration state
//! machine ([`migrate`]), internal snapshots in qcow2 disks ([`savevm`]).

pub mod migrate;
pub mod restore;
pub mod savevm;
