//! QMP commands: one module per command, dispatched through [`Command`].
//!
//! Adding a command the VMM executes: write a module with a `SPEC`
//! ([`CommandSpec`]: name, parameter schema, constructor building
//! `Command::Vm(Request::…)`), add the variant to [`crate::Request`] and list
//! the `SPEC` in [`COMMANDS`]; the VMM's exhaustive match over `Request` then
//! asks for its arm. Commands QMP answers itself (negotiation, versions,
//! `query-status`) get their own [`Command`] variant and `execute` function.

use serde_json::{Map, Value};

use crate::args::{self, Param};
use crate::error::CommandError;
use crate::machine::Machine;

pub(crate) mod cont;
pub(crate) mod getfd;
pub(crate) mod hmp_snapshots;
pub(crate) mod human_monitor_command;
pub(crate) mod job_cancel;
pub(crate) mod job_dismiss;
pub(crate) mod job_finalize;
pub(crate) mod migrate;
pub(crate) mod migrate_cancel;
pub(crate) mod migrate_incoming;
pub(crate) mod migrate_pause;
pub(crate) mod migrate_recover;
pub(crate) mod migrate_set_capabilities;
pub(crate) mod migrate_set_parameters;
pub(crate) mod migrate_start_postcopy;
pub(crate) mod qmp_capabilities;
pub(crate) mod query_commands;
pub(crate) mod query_cpus_fast;
pub(crate) mod query_jobs;
pub(crate) mod query_kvm;
pub(crate) mod query_migrate;
pub(crate) mod query_migrate_capabilities;
pub(crate) mod query_migrate_parameters;
pub(crate) mod query_name;
pub(crate) mod query_status;
pub(crate) mod query_version;
pub(crate) mod query_vm_generation_id;
pub(crate) mod quit;
pub(crate) mod snapshot_delete;
pub(crate) mod snapshot_load;
pub(crate) mod snapshot_save;
pub(crate) mod stop;
pub(crate) mod system_powerdown;
pub(crate) mod system_reset;

/// Static description of a command.
pub(crate) struct CommandSpec {
    /// Wire name, e.g. `query-status`.
    pub(crate) name: &'static str,
    /// Parameter schema, checked before `build` is called.
    pub(crate) params: &'static [Param],
    /// Builds the typed command from checked arguments.
    pub(crate) build: fn(Map<String, Value>) -> Result<Command, CommandError>,
}

/// Every supported command, in `query-commands` order.
pub(crate) const COMMANDS: &[CommandSpec] = &[
    qmp_capabilities::SPEC,
    query_version::SPEC,
    query_commands::SPEC,
    query_status::SPEC,
    query_name::SPEC,
    query_kvm::SPEC,
    query_cpus_fast::SPEC,
    query_vm_generation_id::SPEC,
    stop::SPEC,
    cont::SPEC,
    system_reset::SPEC,
    system_powerdown::SPEC,
    quit::SPEC,
    human_monitor_command::SPEC,
    migrate::SPEC,
    migrate_cancel::SPEC,
    migrate_incoming::SPEC,
    migrate_recover::SPEC,
    migrate_pause::SPEC,
    migrate_start_postcopy::SPEC,
    query_migrate::SPEC,
    migrate_set_capabilities::SPEC,
    query_migrate_capabilities::SPEC,
    migrate_set_parameters::SPEC,
    query_migrate_parameters::SPEC,
    snapshot_save::SPEC,
    snapshot_load::SPEC,
    snapshot_delete::SPEC,
    query_jobs::SPEC,
    job_cancel::SPEC,
    job_dismiss::SPEC,
    job_finalize::SPEC,
    getfd::SPEC,
    getfd::CLOSE_SPEC,
];

/// Per-connection state a command may read or change.
pub(crate) struct Context<'a> {
    pub(crate) machine: &'a dyn Machine,
    /// Capabilities negotiation is complete (command mode).
    pub(crate) negotiated: bool,
    /// `quit` was requested: send [`crate::Request::Quit`] once the reply is out.
    pub(crate) quit_requested: bool,
    /// Descriptors received on this connection and not named yet.
    pub(crate) fds: &'a mut Vec<std::os::fd::OwnedFd>,
}

/// A parsed, type-checked command.
// Variants are named after QMP commands, one of which ends in "Command".
#[allow(clippy::enum_variant_names)]
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Command {
    QmpCapabilities(qmp_capabilities::Args),
    QueryVersion,
    QueryCommands,
    QueryStatus,
    QueryName,
    QueryKvm,
    QueryCpusFast,
    Quit,
    HumanMonitorCommand(human_monitor_command::Args),
    Getfd(String),
    Closefd(String),
    /// Executed by the VMM ([`Machine::request`]).
    Vm(crate::machine::Request),
}

impl Command {
    /// Looks `name` up and checks its arguments (QEMU's order: unknown
    /// command first, then arguments).
    pub(crate) fn parse(name: &str, args: Map<String, Value>) -> Result<Command, CommandError> {
        let spec = COMMANDS.iter().find(|s| s.name == name).ok_or_else(|| {
            CommandError::command_not_found(format!("The command {name} has not been found"))
        })?;
        args::check(&args, spec.params)?;
        (spec.build)(args)
    }

    /// Runs the command.
    pub(crate) fn execute(self, ctx: &mut Context<'_>) -> Result<Value, CommandError> {
        match self {
            Command::QmpCapabilities(a) => qmp_capabilities::execute(a, ctx),
            Command::QueryVersion => query_version::execute(ctx),
            Command::QueryCommands => query_commands::execute(ctx),
            Command::QueryStatus => query_status::execute(ctx),
            Command::QueryName => query_name::execute(ctx),
            Command::QueryKvm => query_kvm::execute(ctx),
            Command::QueryCpusFast => query_cpus_fast::execute(ctx),
            Command::Quit => quit::execute(ctx),
            Command::HumanMonitorCommand(a) => human_monitor_command::execute(a, ctx),
            Command::Getfd(n) => getfd::execute(n, ctx),
            Command::Closefd(n) => getfd::close(n, ctx),
            Command::Vm(req) => ctx.machine.request(req),
        }
    }
}

/// `{}`: what commands without a return value reply.
pub(crate) fn empty() -> Value {
    Value::Object(Map::new())
}

/// Runs one request in the connection's current mode.
pub(crate) fn dispatch(
    name: &str,
    args: Map<String, Value>,
    ctx: &mut Context<'_>,
) -> Result<Value, CommandError> {
    if !ctx.negotiated && name != qmp_capabilities::SPEC.name {
        // In negotiation mode only qmp_capabilities exists.
        return Err(CommandError::command_not_found(
            "Expecting capabilities negotiation with 'qmp_capabilities'",
        ));
    }
    Command::parse(name, args)?.execute(ctx)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_unique_and_parse() {
        for (i, spec) in COMMANDS.iter().enumerate() {
            assert!(
                COMMANDS[..i].iter().all(|s| s.name != spec.name),
                "{}",
                spec.name
            );
            let r = Command::parse(spec.name, Map::new());
            // Commands with a mandatory argument refuse an empty argument object.
            let required = spec.params.iter().find(|p| !p.optional);
            if let Some(p) = required {
                assert_eq!(
                    r.unwrap_err().desc,
                    format!("Parameter '{}' is missing", p.name)
                );
            } else {
                assert!(r.is_ok(), "{}", spec.name);
            }
        }
    }
}
