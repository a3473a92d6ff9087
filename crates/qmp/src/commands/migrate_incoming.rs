//! `migrate-incoming {"uri"}`: load the VM from `uri` (snapvmm: `file:PATH`)
//! when it was started with `--incoming defer`. Returns `{}` once loaded.

use serde_json::Value;

use super::{empty, Command, CommandSpec, Context};
use crate::args::{Param, ParamType};
use crate::error::CommandError;

pub(crate) const SPEC: CommandSpec = CommandSpec {
    name: "migrate-incoming",
    params: &[
        Param {
            name: "uri",
            ty: ParamType::Str,
            optional: false,
        },
        Param {
            name: "exit-on-error",
            ty: ParamType::Bool,
            optional: true,
        },
    ],
    build: |a| {
        Ok(Command::MigrateIncoming(
            a.get("uri")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string(),
        ))
    },
};

pub(crate) fn execute(uri: String, ctx: &mut Context<'_>) -> Result<Value, CommandError> {
    ctx.machine.migrate_incoming(&uri)?;
    Ok(empty())
}
