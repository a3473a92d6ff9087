//! `job-finalize {"id"}`: finalize a job in the `pending` state. Returns `{}`.

use serde_json::Value;

use super::{Command, CommandSpec};
use crate::args::{Param, ParamType};
use crate::machine::Request;

pub(crate) const SPEC: CommandSpec = CommandSpec {
    name: "job-finalize",
    params: &[Param {
        name: "id",
        ty: ParamType::Str,
        optional: false,
    }],
    build: |a| {
        Ok(Command::Vm(Request::JobFinalize(
            a.get("id")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string(),
        )))
    },
};
