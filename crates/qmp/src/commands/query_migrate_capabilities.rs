//! `query-migrate-capabilities`: `[{"capability", "state"}]`.

use serde_json::Value;

use super::{Command, CommandSpec, Context};
use crate::error::CommandError;

pub(crate) const SPEC: CommandSpec = CommandSpec {
    name: "query-migrate-capabilities",
    params: &[],
    build: |_| Ok(Command::QueryMigrateCapabilities),
};

pub(crate) fn execute(ctx: &mut Context<'_>) -> Result<Value, CommandError> {
    ctx.machine.query_migrate_capabilities()
}
