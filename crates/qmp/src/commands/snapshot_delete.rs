//! `snapshot-delete {"job-id", "tag", "devices"}` (QEMU 6.0, all
//! mandatory; no `vmstate`): start a job deleting an internal snapshot.
//! Returns `{}` at once; completion via `JOB_STATUS_CHANGE`/`query-jobs`.

use serde_json::Value;

use super::snapshot_save::job_from_args;
use super::{empty, Command, CommandSpec, Context};
use crate::args::{Param, ParamType};
use crate::error::CommandError;
use crate::machine::SnapshotJob;

pub(crate) const SPEC: CommandSpec = CommandSpec {
    name: "snapshot-delete",
    params: &[
        Param {
            name: "job-id",
            ty: ParamType::Str,
            optional: false,
        },
        Param {
            name: "tag",
            ty: ParamType::Str,
            optional: false,
        },
        Param {
            name: "devices",
            ty: ParamType::StrList,
            optional: false,
        },
    ],
    build: |a| Ok(Command::SnapshotDelete(job_from_args(&a))),
};

pub(crate) fn execute(job: SnapshotJob, ctx: &mut Context<'_>) -> Result<Value, CommandError> {
    ctx.machine.snapshot_delete(job)?;
    Ok(empty())
}
