//! `system_reset`: hard reset of the machine. Returns `{}`.

use serde_json::Value;

use super::{empty, Command, CommandSpec, Context};
use crate::error::CommandError;

pub(crate) const SPEC: CommandSpec = CommandSpec {
    name: "system_reset",
    params: &[],
    build: |_| Ok(Command::SystemReset),
};

pub(crate) fn execute(ctx: &mut Context<'_>) -> Result<Value, CommandError> {
    ctx.machine.system_reset()?;
    Ok(empty())
}
