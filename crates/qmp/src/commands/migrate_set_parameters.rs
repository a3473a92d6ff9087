//! `migrate-set-parameters`: snapvmm's `x-snapshot-method` (`fork` | `stop`) and
//! `x-collapse-huge-pages` (bool). Returns `{}`.

use serde_json::Value;

use super::{empty, Command, CommandSpec, Context};
use crate::args::{Param, ParamType};
use crate::error::CommandError;

pub(crate) const SPEC: CommandSpec = CommandSpec {
    name: "migrate-set-parameters",
    params: &[
        Param {
            name: "x-snapshot-method",
            ty: ParamType::Str,
            optional: true,
        },
        Param {
            name: "x-collapse-huge-pages",
            ty: ParamType::Bool,
            optional: true,
        },
    ],
    build: |a| Ok(Command::MigrateSetParameters(a)),
};

pub(crate) fn execute(
    params: serde_json::Map<String, Value>,
    ctx: &mut Context<'_>,
) -> Result<Value, CommandError> {
    ctx.machine.migrate_set_parameters(params)?;
    Ok(empty())
}
