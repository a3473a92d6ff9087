//! `job-cancel {"id"}`: cancel a job (QEMU 10.0 schema: `id` only). Returns `{}`.

use serde_json::Value;

use super::{Command, CommandSpec};
use crate::args::{Param, ParamType};
use crate::machine::Request;

pub(crate) const SPEC: CommandSpec = CommandSpec {
    name: "job-cancel",
    params: &[Param {
        name: "id",
        ty: ParamType::Str,
        optional: false,
    }],
    build: |a| {
        Ok(Command::Vm(Request::JobCancel(
            a.get("id")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string(),
        )))
    },
};
