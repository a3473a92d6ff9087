//! `cont`: resume all vCPUs (QEMU's `cont`). Returns `{}`.

use super::{Command, CommandSpec};
use crate::machine::Request;

pub(crate) const SPEC: CommandSpec = CommandSpec {
    name: "cont",
    params: &[],
    build: |_| Ok(Command::Vm(Request::Cont)),
};
