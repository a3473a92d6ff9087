//! `migrate-incoming {"uri"}`: load the VM from `uri` (snapvmm: `file:PATH`)
//! when it was started with `--incoming defer`. Returns `{}` once loaded.

use serde_json::Value;

use super::{Command, CommandSpec};
use crate::args::{Param, ParamType};
use crate::machine::Request;

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
        Ok(Command::Vm(Request::MigrateIncoming(
            a.get("uri")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string(),
        )))
    },
};
