//! `query-name`: `{"name": NAME}`, or `{}` when the VM has no name.

use serde_json::{json, Value};

use super::{empty, Command, CommandSpec, Context};
use crate::error::CommandError;

pub(crate) const SPEC: CommandSpec = CommandSpec {
    name: "query-name",
    params: &[],
    build: |_| Ok(Command::QueryName),
};

pub(crate) fn execute(ctx: &mut Context<'_>) -> Result<Value, CommandError> {
    Ok(match ctx.machine.name() {
        Some(name) => json!({ "name": name }),
        None => empty(),
    })
}
