//! `snapshot-load {"job-id", "tag", "vmstate", "devices"}` (QEMU 6.0, all
//! mandatory): start a job loading an internal snapshot. Returns `{}` at
//! once; completion is reported by `JOB_STATUS_CHANGE` and `query-jobs`.

use super::snapshot_save::{job_from_args, JOB_PARAMS};
use super::{Command, CommandSpec};
use crate::machine::Request;

pub(crate) const SPEC: CommandSpec = CommandSpec {
    name: "snapshot-load",
    params: JOB_PARAMS,
    build: |a| Ok(Command::Vm(Request::SnapshotLoad(job_from_args(&a)))),
};
