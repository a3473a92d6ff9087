//! `snapshot-delete {"job-id", "tag", "devices"}` (QEMU 6.0, all
//! mandatory; no `vmstate`): start a job deleting an internal snapshot.
//! Returns `{}` at once; completion via `JOB_STATUS_CHANGE`/`query-jobs`.

use super::snapshot_save::job_from_args;
use super::{Command, CommandSpec};
use crate::args::{Param, ParamType};
use crate::machine::Request;

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
    build: |a| Ok(Command::Vm(Request::SnapshotDelete(job_from_args(&a)))),
};
