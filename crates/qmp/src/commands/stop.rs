//! `stop`: pause all vCPUs (QEMU's `stop`). Returns `{}`.

use super::{Command, CommandSpec};
use crate::machine::Request;

pub(crate) const SPEC: CommandSpec = CommandSpec {
    name: "stop",
    params: &[],
    build: |_| Ok(Command::Vm(Request::Stop)),
};
