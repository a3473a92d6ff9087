//! `qmp_capabilities {"enable"?: [QMPCapability]}`: leaves capabilities
//! negotiation mode. We offer no capability (no `oob`), so enabling any
//! fails like QEMU does when OOB is unavailable.

use serde::Deserialize;
use serde_json::Value;

use super::{empty, Command, CommandSpec, Context};
use crate::args::{from_map, Param, ParamType};
use crate::error::CommandError;

/// QEMU's `QMPCapability` enumeration.
const QMP_CAPABILITIES: &[&str] = &["oob"];

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Args {
    #[serde(default)]
    enable: Option<Vec<String>>,
}

pub(crate) const SPEC: CommandSpec = CommandSpec {
    name: "qmp_capabilities",
    params: &[Param {
        name: "enable",
        ty: ParamType::EnumList(QMP_CAPABILITIES),
        optional: true,
    }],
    build: |a| Ok(Command::QmpCapabilities(from_map(a)?)),
};

pub(crate) fn execute(args: Args, ctx: &mut Context<'_>) -> Result<Value, CommandError> {
    if ctx.negotiated {
        return Err(CommandError::command_not_found(
            "Capabilities negotiation is already complete, command ignored",
        ));
    }
    let requested = args.enable.unwrap_or_default();
    if !requested.is_empty() {
        // None of the requested capabilities is offered.
        return Err(CommandError::generic(format!(
            "Capability {} not available",
            requested.join(", ")
        )));
    }
    ctx.negotiated = true;
    Ok(empty())
}
