//! `query-kvm`: always `{"enabled": true, "present": true}` (snapvmm is
//! KVM only).

use serde_json::{json, Value};

use super::{Command, CommandSpec, Context};
use crate::error::CommandError;

pub(crate) const SPEC: CommandSpec = CommandSpec {
    name: "query-kvm",
    params: &[],
    build: |_| Ok(Command::QueryKvm),
};

pub(crate) fn execute(_ctx: &mut Context<'_>) -> Result<Value, CommandError> {
    Ok(json!({ "enabled": true, "present": true }))
}
