//! `human-monitor-command {"command-line": str, "cpu-index"?: int}`: runs
//! a line of QEMU's human monitor (HMP) and returns its output as a string.
//!
//! Output follows QEMU's HMP byte for byte: lines end in `"\r\n"`, an
//! unknown command is *output* (`unknown command: 'foo'`), not a QMP error,
//! and command failures print `Error: <desc>`.

use serde::Deserialize;
use serde_json::Value;

use super::{Command, CommandSpec, Context};
use crate::args::{from_map, Param, ParamType};
use crate::error::CommandError;
use crate::protocol::{package, QEMU_VERSION};

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub(crate) struct Args {
    command_line: String,
    #[serde(default)]
    cpu_index: Option<i64>,
}

pub(crate) const SPEC: CommandSpec = CommandSpec {
    name: "human-monitor-command",
    params: &[
        Param {
            name: "command-line",
            ty: ParamType::Str,
            optional: false,
        },
        Param {
            name: "cpu-index",
            ty: ParamType::Int,
            optional: true,
        },
    ],
    build: |a| Ok(Command::HumanMonitorCommand(from_map(a)?)),
};

/// One HMP command: (names separated by `|`, parameter summary, help).
type HelpEntry = (&'static str, &'static str, &'static str);

/// Top-level HMP commands we implement, in `help` order.
pub(crate) const HMP_COMMANDS: &[HelpEntry] = &[
    ("cont|c", "", "resume emulation"),
    ("help|?", "[cmd]", "show the help"),
    (
        "info",
        "[subcommand]",
        "show various information about the system state",
    ),
    ("quit|q", "", "quit the emulator"),
    ("stop|s", "", "stop emulation"),
    ("system_powerdown", "", "send system power down event"),
    ("system_reset", "", "reset the system"),
];

/// `info` sub-commands we implement.
pub(crate) const HMP_INFO_COMMANDS: &[HelpEntry] = &[
    ("cpus", "", "show infos for each CPU"),
    ("kvm", "", "show KVM information"),
    ("name", "", "show the current VM name"),
    ("status", "", "show the current VM status (running|paused)"),
    ("version", "", "show the version of QEMU"),
];

fn matches(entry: &HelpEntry, name: &str) -> bool {
    entry.0.split('|').any(|n| n == name)
}

fn help_lines(out: &mut String, prefix: &str, table: &[HelpEntry], only: Option<&str>) {
    for e in table
        .iter()
        .filter(|e| only.map_or(true, |n| matches(e, n)))
    {
        out.push_str(&format!("{prefix}{} {} -- {}\r\n", e.0, e.1, e.2));
    }
}

pub(crate) fn execute(args: Args, ctx: &mut Context<'_>) -> Result<Value, CommandError> {
    if let Some(index) = args.cpu_index {
        if !ctx.machine.cpus().iter().any(|c| c.cpu_index == index) {
            return Err(CommandError::generic(
                "Parameter 'cpu-index' expects a CPU number",
            ));
        }
    }
    Ok(Value::String(run_line(
        &args.command_line,
        ctx,
        args.cpu_index,
    )))
}

/// Runs one HMP line and returns what QEMU's HMP would print.
pub(crate) fn run_line(line: &str, ctx: &mut Context<'_>, cpu: Option<i64>) -> String {
    let mut words = line.split_ascii_whitespace();
    let Some(cmd) = words.next() else {
        return String::new();
    };
    let rest: Vec<&str> = words.collect();
    let mut out = String::new();
    let Some(entry) = HMP_COMMANDS.iter().find(|e| matches(e, cmd)) else {
        return format!("unknown command: '{cmd}'\r\n");
    };
    let name = entry.0.split('|').next().unwrap_or_default();
    let takes_args = matches!(name, "help" | "info");
    if (!takes_args && !rest.is_empty()) || rest.len() > 1 {
        return format!("{name}: extraneous characters at the end of line\r\n");
    }
    let arg = rest.first().copied();
    let result = match name {
        "help" => {
            match arg {
                Some("info") => help_lines(&mut out, "info ", HMP_INFO_COMMANDS, None),
                Some(a) => help_lines(&mut out, "", HMP_COMMANDS, Some(a)),
                None => help_lines(&mut out, "", HMP_COMMANDS, None),
            }
            Ok(())
        }
        "info" => match arg {
            None => {
                help_lines(&mut out, "info ", HMP_INFO_COMMANDS, None);
                Ok(())
            }
            Some(item) => {
                if !info(item, ctx, cpu, &mut out) {
                    return format!("unknown command: 'info {item}'\r\n");
                }
                Ok(())
            }
        },
        "stop" => ctx.machine.stop(),
        "cont" => ctx.machine.cont(),
        "system_reset" => ctx.machine.system_reset(),
        "system_powerdown" => ctx.machine.system_powerdown(),
        "quit" => {
            ctx.quit_requested = true;
            Ok(())
        }
        _ => Ok(()),
    };
    if let Err(e) = result {
        out.push_str(&format!("Error: {}\r\n", e.desc));
    }
    out
}

/// `info ITEM`; false if ITEM is unknown.
fn info(item: &str, ctx: &mut Context<'_>, cpu: Option<i64>, out: &mut String) -> bool {
    match item {
        "status" => {
            let state = ctx.machine.status();
            let running = state.is_running();
            out.push_str("VM status: ");
            out.push_str(if running { "running" } else { "paused" });
            if !running && state != crate::RunState::Paused {
                out.push_str(&format!(" ({state})"));
            }
            out.push_str("\r\n");
        }
        "version" => {
            let (major, minor, micro) = QEMU_VERSION;
            out.push_str(&format!("{major}.{minor}.{micro}{}\r\n", package()));
        }
        "name" => {
            if let Some(name) = ctx.machine.name() {
                out.push_str(&format!("{name}\r\n"));
            }
        }
        "kvm" => out.push_str("kvm support: enabled\r\n"),
        "cpus" => {
            let current = cpu.unwrap_or(0);
            for c in ctx.machine.cpus() {
                let mark = if c.cpu_index == current { '*' } else { ' ' };
                out.push_str(&format!(
                    "{mark} CPU #{}: thread_id={}\r\n",
                    c.cpu_index, c.thread_id
                ));
            }
        }
        _ => return false,
    }
    true
}
