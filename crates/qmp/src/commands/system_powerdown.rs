//! `system_powerdown`: ACPI power-button press; the guest decides what to do. Returns `{}`.

use super::{Command, CommandSpec};
use crate::machine::Request;

pub(crate) const SPEC: CommandSpec = CommandSpec {
    name: "system_powerdown",
    params: &[],
    build: |_| Ok(Command::Vm(Request::SystemPowerdown)),
};
