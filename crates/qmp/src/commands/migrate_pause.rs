//! `migrate-pause`: break the connection of a post-copy migration (either
//! side) so that it can be recovered over another one. Returns `{}`.

use super::{Command, CommandSpec};
use crate::machine::Request;

pub(crate) const SPEC: CommandSpec = CommandSpec {
    name: "migrate-pause",
    params: &[],
    build: |_| Ok(Command::Vm(Request::MigratePause)),
};
