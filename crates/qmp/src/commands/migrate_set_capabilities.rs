//! `migrate-set-capabilities {"capabilities": [{"capability", "state"}]}`. Returns `{}`.

use serde_json::Value;

use super::{Command, CommandSpec};
use crate::args::{Param, ParamType};
use crate::error::CommandError;
use crate::machine::Request;

pub(crate) const SPEC: CommandSpec = CommandSpec {
    name: "migrate-set-capabilities",
    params: &[Param {
        name: "capabilities",
        ty: ParamType::ObjectList,
        optional: false,
    }],
    build,
};

fn build(a: serde_json::Map<String, Value>) -> Result<Command, CommandError> {
    let mut caps = Vec::new();
    for c in a
        .get("capabilities")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let obj = c.as_object().expect("checked by ParamType::ObjectList");
        if let Some(k) = obj.keys().find(|k| *k != "capability" && *k != "state") {
            return Err(CommandError::generic(format!(
                "Parameter '{k}' is unexpected"
            )));
        }
        let name = obj
            .get("capability")
            .and_then(Value::as_str)
            .ok_or_else(|| CommandError::generic("Parameter 'capability' is missing"))?;
        let state = obj.get("state").and_then(Value::as_bool).ok_or_else(|| {
            CommandError::generic("Invalid parameter type for 'state', expected: boolean")
        })?;
        caps.push((name.to_string(), state));
    }
    Ok(Command::Vm(Request::MigrateSetCapabilities(caps)))
}
