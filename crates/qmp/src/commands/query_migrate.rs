//! `query-migrate`: MigrationInfo (`status`, `total-time`, `downtime`, `setup-time`, `ram`, ...).

use super::{Command, CommandSpec};
use crate::machine::Request;

pub(crate) const SPEC: CommandSpec = CommandSpec {
    name: "query-migrate",
    params: &[],
    build: |_| Ok(Command::Vm(Request::QueryMigrate)),
};
