//! `migrate_cancel`: abort the running snapshot. Returns `{}`.

use super::{Command, CommandSpec};
use crate::machine::Request;

pub(crate) const SPEC: CommandSpec = CommandSpec {
    name: "migrate_cancel",
    params: &[],
    build: |_| Ok(Command::Vm(Request::MigrateCancel)),
};
