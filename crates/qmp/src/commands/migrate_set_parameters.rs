//! `migrate-set-parameters`: snapvmm's `x-snapshot-method` (`fork` | `uffd` |
//! `stop`), `x-collapse-huge-pages` (bool), `x-wp-pool-size` and
//! `x-wp-pool-max-size` (bytes of copy buffers of the `uffd` method, and what
//! they may grow to), `x-wp-pool-keep-free-percent` (the share of host
//! memory that growth leaves available), `x-wp-stall-limit-ms` (how long a guest write may wait
//! for a buffer before the snapshot is abandoned), `x-wp-keep-pool` (bool:
//! keep the buffers between snapshots), `x-parent` (`file:PATH` of the image the
//! next snapshots are incremental to; `""` for full snapshots) and
//! `x-precopy` (bool: a live migration sends RAM once before its cut).
//! Returns `{}`.

use super::{Command, CommandSpec};
use crate::args::{Param, ParamType};
use crate::machine::Request;

pub(crate) const SPEC: CommandSpec = CommandSpec {
    name: "migrate-set-parameters",
    params: &[
        Param {
            name: "x-snapshot-method",
            ty: ParamType::Str,
            optional: true,
        },
        Param {
            name: "x-collapse-huge-pages",
            ty: ParamType::Bool,
            optional: true,
        },
        Param {
            name: "x-wp-pool-size",
            ty: ParamType::Int,
            optional: true,
        },
        Param {
            name: "x-wp-pool-max-size",
            ty: ParamType::Int,
            optional: true,
        },
        Param {
            name: "x-wp-pool-keep-free-percent",
            ty: ParamType::Int,
            optional: true,
        },
        Param {
            name: "x-wp-stall-limit-ms",
            ty: ParamType::Int,
            optional: true,
        },
        Param {
            name: "x-wp-keep-pool",
            ty: ParamType::Bool,
            optional: true,
        },
        Param {
            name: "x-parent",
            ty: ParamType::Str,
            optional: true,
        },
        Param {
            name: "x-precopy",
            ty: ParamType::Bool,
            optional: true,
        },
    ],
    build: |a| Ok(Command::Vm(Request::MigrateSetParameters(a))),
};
