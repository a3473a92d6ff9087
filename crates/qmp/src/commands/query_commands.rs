//! `query-commands`: `[{"name": ...}]` for every supported command.

use serde_json::{json, Value};

use super::{Command, CommandSpec, Context, COMMANDS};
use crate::error::CommandError;

pub(crate) const SPEC: CommandSpec = CommandSpec {
    name: "query-commands",
    params: &[],
    build: |_| Ok(Command::QueryCommands),
};

pub(crate) fn execute(_ctx: &mut Context<'_>) -> Result<Value, CommandError> {
    Ok(Value::Array(
        COMMANDS.iter().map(|c| json!({ "name": c.name })).collect(),
    ))
}
