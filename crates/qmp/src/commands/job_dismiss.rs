//! `job-dismiss {"id"}`: remove a concluded job (its `JOB_STATUS_CHANGE` goes to `null`). Returns `{}`.

use serde_json::Value;

use super::{Command, CommandSpec};
use crate::args::{Param, ParamType};
use crate::machine::Request;

pub(crate) const SPEC: CommandSpec = CommandSpec {
    name: "job-dismiss",
    params: &[Param {
        name: "id",
        ty: ParamType::Str,
        optional: false,
    }],
    build: |a| {
        Ok(Command::Vm(Request::JobDismiss(
            a.get("id")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string(),
        )))
    },
};
