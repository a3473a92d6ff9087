//! `migrate {"uri"}`: start saving or migrating the VM to `uri`; with
//! `"resume": true`, carry a paused post-copy migration on over `uri`. Returns `{}` at once; progress via `query-migrate` and `MIGRATION` events.

use serde_json::Value;

use super::{Command, CommandSpec};
use crate::args::{Param, ParamType};
use crate::machine::Request;

pub(crate) const SPEC: CommandSpec = CommandSpec {
    name: "migrate",
    params: &[
        Param {
            name: "uri",
            ty: ParamType::Str,
            optional: false,
        },
        Param {
            name: "detach",
            ty: ParamType::Bool,
            optional: true,
        },
        Param {
            name: "resume",
            ty: ParamType::Bool,
            optional: true,
        },
    ],
    build: |a| {
        let uri = a
            .get("uri")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        Ok(Command::Vm(
            if a.get("resume").and_then(Value::as_bool) == Some(true) {
                Request::MigrateResume(uri)
            } else {
                Request::Migrate(uri)
            },
        ))
    },
};
