//! `query-cpus-fast`: list of `CpuInfoFast` from [`crate::Machine::cpus`].

use serde_json::Value;

use super::{Command, CommandSpec, Context};
use crate::error::CommandError;

pub(crate) const SPEC: CommandSpec = CommandSpec {
    name: "query-cpus-fast",
    params: &[],
    build: |_| Ok(Command::QueryCpusFast),
};

pub(crate) fn execute(ctx: &mut Context<'_>) -> Result<Value, CommandError> {
    serde_json::to_value(ctx.machine.cpus()).map_err(|e| CommandError::generic(e.to_string()))
}
