//! `quit`: terminate the VMM. The `{}` reply is written first, then
//! [`crate::Machine::quit`] is called (QEMU also replies before SHUTDOWN).

use serde_json::Value;

use super::{empty, Command, CommandSpec, Context};
use crate::error::CommandError;

pub(crate) const SPEC: CommandSpec = CommandSpec {
    name: "quit",
    params: &[],
    build: |_| Ok(Command::Quit),
};

pub(crate) fn execute(ctx: &mut Context<'_>) -> Result<Value, CommandError> {
    ctx.quit_requested = true;
    Ok(empty())
}
