//! `migrate-start-postcopy`: switch a running migration to post-copy.
//! Returns `{}`.

use super::{Command, CommandSpec};
use crate::machine::Request;

pub(crate) const SPEC: CommandSpec = CommandSpec {
    name: "migrate-start-postcopy",
    params: &[],
    build: |_| Ok(Command::Vm(Request::MigrateStartPostcopy)),
};
