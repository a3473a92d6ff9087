//! `system_reset`: hard reset of the machine. Returns `{}`.

use super::{Command, CommandSpec};
use crate::machine::Request;

pub(crate) const SPEC: CommandSpec = CommandSpec {
    name: "system_reset",
    params: &[],
    build: |_| Ok(Command::Vm(Request::SystemReset)),
};
