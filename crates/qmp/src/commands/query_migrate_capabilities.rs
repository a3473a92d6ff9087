//! `query-migrate-capabilities`: `[{"capability", "state"}]`.

use super::{Command, CommandSpec};
use crate::machine::Request;

pub(crate) const SPEC: CommandSpec = CommandSpec {
    name: "query-migrate-capabilities",
    params: &[],
    build: |_| Ok(Command::Vm(Request::QueryMigrateCapabilities)),
};
