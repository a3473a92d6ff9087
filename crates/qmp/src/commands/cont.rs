//! `cont`: resume all vCPUs (QEMU's `cont`). Returns `{}`.

use serde_json::Value;

use super::{empty, Command, CommandSpec, Context};
use crate::error::CommandError;

pub(crate) const SPEC: CommandSpec = CommandSpec {
    name: "cont",
    params: &[],
    build: |_| Ok(Command::Cont),
};

pub(crate) fn execute(ctx: &mut Context<'_>) -> Result<Value, CommandError> {
    ctx.machine.cont()?;
    Ok(empty())
}
