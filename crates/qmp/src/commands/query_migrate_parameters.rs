//! `query-migrate-parameters`.

use serde_json::Value;

use super::{Command, CommandSpec, Context};
use crate::error::CommandError;

pub(crate) const SPEC: CommandSpec = CommandSpec {
    name: "query-migrate-parameters",
    params: &[],
    build: |_| Ok(Command::QueryMigrateParameters),
};

pub(crate) fn execute(ctx: &mut Context<'_>) -> Result<Value, CommandError> {
    ctx.machine.query_migrate_parameters()
}
