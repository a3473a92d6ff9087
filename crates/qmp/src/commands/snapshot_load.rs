//! `snapshot-load {"job-id", "tag", "vmstate", "devices"}` (QEMU 6.0, all
//! mandatory): start a job loading an internal snapshot. Returns `{}` at
//! once; completion is reported by `JOB_STATUS_CHANGE` and `query-jobs`.

use serde_json::Value;

use super::snapshot_save::{job_from_args, JOB_PARAMS};
use super::{empty, Command, CommandSpec, Context};
use crate::error::CommandError;
use crate::machine::SnapshotJob;

pub(crate) const SPEC: CommandSpec = CommandSpec {
    name: "snapshot-load",
    params: JOB_PARAMS,
    build: |a| Ok(Command::SnapshotLoad(job_from_args(&a))),
};

pub(crate) fn execute(job: SnapshotJob, ctx: &mut Context<'_>) -> Result<Value, CommandError> {
    ctx.machine.snapshot_load(job)?;
    Ok(empty())
}
