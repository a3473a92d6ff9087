//! `migrate_cancel`: abort the running snapshot. Returns `{}`.

use serde_json::Value;

use super::{empty, Command, CommandSpec, Context};
use crate::error::CommandError;

pub(crate) const SPEC: CommandSpec = CommandSpec {
    name: "migrate_cancel",
    params: &[],
    build: |_| Ok(Command::MigrateCancel),
};

pub(crate) fn execute(ctx: &mut Context<'_>) -> Result<Value, CommandError> {
    ctx.machine.migrate_cancel()?;
    Ok(empty())
}
