//! `job-dismiss {"id"}`: remove a concluded job (its `JOB_STATUS_CHANGE` goes to `null`). Returns `{}`.

use serde_json::Value;

use super::{empty, Command, CommandSpec, Context};
use crate::args::{Param, ParamType};
use crate::error::CommandError;

pub(crate) const SPEC: CommandSpec = CommandSpec {
    name: "job-dismiss",
    params: &[Param {
        name: "id",
        ty: ParamType::Str,
        optional: false,
    }],
    build: |a| {
        Ok(Command::JobDismiss(
            a.get("id")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string(),
        ))
    },
};

pub(crate) fn execute(id: String, ctx: &mut Context<'_>) -> Result<Value, CommandError> {
    ctx.machine.job_dismiss(&id)?;
    Ok(empty())
}
