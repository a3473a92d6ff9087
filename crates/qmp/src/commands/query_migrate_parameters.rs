//! `query-migrate-parameters`.

use super::{Command, CommandSpec};
use crate::machine::Request;

pub(crate) const SPEC: CommandSpec = CommandSpec {
    name: "query-migrate-parameters",
    params: &[],
    build: |_| Ok(Command::Vm(Request::QueryMigrateParameters)),
};
