//! `query-jobs`: the VMM's JobInfo list, `[{"id", "type", "status",
//! "current-progress", "total-progress", "error"?}]`.

use serde_json::Value;

use super::{Command, CommandSpec, Context};
use crate::error::CommandError;

pub(crate) const SPEC: CommandSpec = CommandSpec {
    name: "query-jobs",
    params: &[],
    build: |_| Ok(Command::QueryJobs),
};

pub(crate) fn execute(ctx: &mut Context<'_>) -> Result<Value, CommandError> {
    ctx.machine.query_jobs()
}
