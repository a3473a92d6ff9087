//! `query-migrate`: MigrationInfo (`status`, `total-time`, `downtime`, `setup-time`, `ram`, ...).

use serde_json::Value;

use super::{Command, CommandSpec, Context};
use crate::error::CommandError;

pub(crate) const SPEC: CommandSpec = CommandSpec {
    name: "query-migrate",
    params: &[],
    build: |_| Ok(Command::QueryMigrate),
};

pub(crate) fn execute(ctx: &mut Context<'_>) -> Result<Value, CommandError> {
    ctx.machine.query_migrate()
}
