//! `system_powerdown`: ACPI power-button press; the guest decides what to do. Returns `{}`.

use serde_json::Value;

use super::{empty, Command, CommandSpec, Context};
use crate::error::CommandError;

pub(crate) const SPEC: CommandSpec = CommandSpec {
    name: "system_powerdown",
    params: &[],
    build: |_| Ok(Command::SystemPowerdown),
};

pub(crate) fn execute(ctx: &mut Context<'_>) -> Result<Value, CommandError> {
    ctx.machine.system_powerdown()?;
    Ok(empty())
}
