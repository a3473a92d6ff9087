//! `stop`: pause all vCPUs (QEMU's `stop`). Returns `{}`.

use serde_json::Value;

use super::{empty, Command, CommandSpec, Context};
use crate::error::CommandError;

pub(crate) const SPEC: CommandSpec = CommandSpec {
    name: "stop",
    params: &[],
    build: |_| Ok(Command::Stop),
};

pub(crate) fn execute(ctx: &mut Context<'_>) -> Result<Value, CommandError> {
    ctx.machine.stop()?;
    Ok(empty())
}
