//! `query-version`: `{"qemu": {"major", "minor", "micro"}, "package"}`.

use serde_json::Value;

use super::{Command, CommandSpec, Context};
use crate::error::CommandError;

pub(crate) const SPEC: CommandSpec = CommandSpec {
    name: "query-version",
    params: &[],
    build: |_| Ok(Command::QueryVersion),
};

pub(crate) fn execute(_ctx: &mut Context<'_>) -> Result<Value, CommandError> {
    serde_json::to_value(crate::protocol::version_info())
        .map_err(|e| CommandError::generic(e.to_string()))
}
