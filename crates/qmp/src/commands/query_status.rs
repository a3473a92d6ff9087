//! `query-status`: `{"running": bool, "status": RunState}`. QEMU 9 dropped
//! the deprecated `singlestep` member, so it is not emitted.

use serde_json::{json, Value};

use super::{Command, CommandSpec, Context};
use crate::error::CommandError;

pub(crate) const SPEC: CommandSpec = CommandSpec {
    name: "query-status",
    params: &[],
    build: |_| Ok(Command::QueryStatus),
};

pub(crate) fn execute(ctx: &mut Context<'_>) -> Result<Value, CommandError> {
    let state = ctx.machine.status();
    Ok(json!({ "running": state.is_running(), "status": state.as_str() }))
}
