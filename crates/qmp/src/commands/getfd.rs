//! `getfd {"fdname"}`: names the descriptor passed (SCM_RIGHTS) with this
//! command over a unix socket, for `migrate fd:NAME` and the like.
//! `closefd {"fdname"}` closes a named one.

use serde_json::Value;

use super::{empty, Command, CommandSpec, Context};
use crate::args::{Param, ParamType};
use crate::error::CommandError;

const FDNAME: &[Param] = &[Param {
    name: "fdname",
    ty: ParamType::Str,
    optional: false,
}];

fn name(a: &serde_json::Map<String, Value>) -> Result<String, CommandError> {
    let n = a.get("fdname").and_then(Value::as_str).unwrap_or_default();
    if n.is_empty() || n.starts_with(|c: char| c.is_ascii_digit()) {
        return Err(CommandError::generic(
            "Parameter 'fdname' expects a name not starting with a digit",
        ));
    }
    Ok(n.to_string())
}

pub(crate) const SPEC: CommandSpec = CommandSpec {
    name: "getfd",
    params: FDNAME,
    build: |a| Ok(Command::Getfd(name(&a)?)),
};

pub(crate) const CLOSE_SPEC: CommandSpec = CommandSpec {
    name: "closefd",
    params: FDNAME,
    build: |a| Ok(Command::Closefd(name(&a)?)),
};

pub(crate) fn execute(name: String, ctx: &mut Context<'_>) -> Result<Value, CommandError> {
    // The descriptor that came with this message (the latest received).
    let fd = ctx
        .fds
        .pop()
        .ok_or_else(|| CommandError::generic("No file descriptor supplied via SCM_RIGHTS"))?;
    crate::fds::put(name, fd);
    Ok(empty())
}

pub(crate) fn close(name: String, _ctx: &mut Context<'_>) -> Result<Value, CommandError> {
    if crate::fds::close(&name) {
        Ok(empty())
    } else {
        Err(CommandError::generic(format!(
            "File descriptor named '{name}' not found"
        )))
    }
}
