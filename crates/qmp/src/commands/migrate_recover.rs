//! `migrate-recover {"uri"}` (target of a paused post-copy migration):
//! listen on `uri` for the source's `migrate {"uri", "resume": true}`.
//! Returns `{}` once listening.

use serde_json::Value;

use super::{Command, CommandSpec};
use crate::args::{Param, ParamType};
use crate::machine::Request;

pub(crate) const SPEC: CommandSpec = CommandSpec {
    name: "migrate-recover",
    params: &[Param {
        name: "uri",
        ty: ParamType::Str,
        optional: false,
    }],
    build: |a| {
        Ok(Command::Vm(Request::MigrateRecover(
            a.get("uri")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string(),
        )))
    },
};
