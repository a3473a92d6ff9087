//! `query-vm-generation-id`: `{"guid": "xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx"}`,
//! the VM generation ID the guest sees; GenericError when the VM has none.

use super::{Command, CommandSpec};
use crate::machine::Request;

pub(crate) const SPEC: CommandSpec = CommandSpec {
    name: "query-vm-generation-id",
    params: &[],
    build: |_| Ok(Command::Vm(Request::QueryVmGenerationId)),
};
