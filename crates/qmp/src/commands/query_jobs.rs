//! `query-jobs`: the VMM's JobInfo list, `[{"id", "type", "status",
//! "current-progress", "total-progress", "error"?}]`.

use super::{Command, CommandSpec};
use crate::machine::Request;

pub(crate) const SPEC: CommandSpec = CommandSpec {
    name: "query-jobs",
    params: &[],
    build: |_| Ok(Command::Vm(Request::QueryJobs)),
};
