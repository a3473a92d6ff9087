//! `snapshot-save {"job-id", "tag", "vmstate", "devices"}` (QEMU 6.0,
//! qapi/migration.json; every argument is mandatory): start a job saving
//! an internal snapshot. Returns `{}` at once; completion is reported by
//! `JOB_STATUS_CHANGE` events and `query-jobs`.

use serde_json::{Map, Value};

use super::{Command, CommandSpec};
use crate::args::{Param, ParamType};
use crate::machine::Request;
use crate::machine::SnapshotJob;

/// `job-id`, `tag`, `vmstate`, `devices`: the schema of `snapshot-save`
/// and `snapshot-load`.
pub(crate) const JOB_PARAMS: &[Param] = &[
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
        name: "vmstate",
        ty: ParamType::Str,
        optional: false,
    },
    Param {
        name: "devices",
        ty: ParamType::StrList,
        optional: false,
    },
];

fn string(a: &Map<String, Value>, key: &str) -> String {
    a.get(key)
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string()
}

/// Builds a [`SnapshotJob`] from arguments already checked against
/// [`JOB_PARAMS`] (or the `snapshot-delete` schema, without `vmstate`).
pub(crate) fn job_from_args(a: &Map<String, Value>) -> SnapshotJob {
    SnapshotJob {
        job_id: string(a, "job-id"),
        tag: string(a, "tag"),
        vmstate: a.get("vmstate").and_then(Value::as_str).map(str::to_string),
        devices: a
            .get("devices")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .map(str::to_string)
            .collect(),
    }
}

pub(crate) const SPEC: CommandSpec = CommandSpec {
    name: "snapshot-save",
    params: JOB_PARAMS,
    build: |a| Ok(Command::Vm(Request::SnapshotSave(job_from_args(&a)))),
};
