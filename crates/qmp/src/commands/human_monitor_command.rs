//! `human-monitor-command {"command-line": str, "cpu-index"?: int}`: runs
//! a line of QEMU's human monitor (HMP) and returns its output as a string.
//!
//! Output follows QEMU's HMP byte for byte: lines end in `"\r\n"`, an
//! unknown command is *output* (`unknown command: 'foo'`), not a QMP error,
//! and command failures print `Error: <desc>`.

use serde::Deserialize;
use serde_json::Value;

use super::hmp_snapshots::{self, get_str, is_space};
use super::{Command, CommandSpec, Context};
use crate::args::{from_map, Param, ParamType};
use crate::error::CommandError;
use crate::machine::Request;
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

/// Top-level HMP commands we implement, in `help` order (QEMU sorts by name).
pub(crate) const HMP_COMMANDS: &[HelpEntry] = &[
    ("cont|c", "", "resume emulation"),
    ("delvm", "tag", "delete a VM snapshot from its tag"),
    ("help|?", "[cmd]", "show the help"),
    (
        "info",
        "[subcommand]",
        "show various information about the system state",
    ),
    ("loadvm", "tag", "restore a VM snapshot from its tag"),
    ("quit|q", "", "quit the emulator"),
    (
        "savevm",
        "tag",
        "save a VM snapshot. If no tag is provided, a new snapshot is created",
    ),
    ("stop|s", "", "stop emulation"),
    ("system_powerdown", "", "send system power down event"),
    ("system_reset", "", "reset the system"),
];

/// `info` sub-commands we implement.
pub(crate) const HMP_INFO_COMMANDS: &[HelpEntry] = &[
    ("cpus", "", "show infos for each CPU"),
    ("kvm", "", "show KVM information"),
    ("name", "", "show the current VM name"),
    ("snapshots", "", "show the currently saved VM snapshots"),
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

/// Splits the command name (up to white space) off `line`, after
/// leading white space: (name, rest).
fn command_name(line: &str) -> (&str, &str) {
    let p = line.trim_start_matches(is_space);
    let end = p.find(is_space).unwrap_or(p.len());
    (&p[..end], &p[end..])
}

/// What QEMU's `monitor_parse_arguments()` failures print: the message
/// (naming the command as in its table, e.g. `stop|s`), then a hint
/// repeating the line as typed up to the end of the command name.
fn parse_error(msg: &str, typed: &str) -> String {
    format!("{msg}\r\nTry \"help {typed}\" for more information\r\n")
}

fn extraneous(table_name: &str, typed: &str) -> String {
    parse_error(
        &format!("{table_name}: extraneous characters at the end of line"),
        typed,
    )
}

/// Runs one HMP line and returns what QEMU's HMP would print.
pub(crate) fn run_line(line: &str, ctx: &mut Context<'_>, cpu: Option<i64>) -> String {
    let (cmd, rest) = command_name(line);
    if cmd.is_empty() {
        return String::new();
    }
    let typed = &line[..line.len() - rest.len()];
    let mut out = String::new();
    let Some(entry) = HMP_COMMANDS.iter().find(|e| matches(e, cmd)) else {
        return format!("unknown command: '{cmd}'\r\n");
    };
    let name = entry.0.split('|').next().unwrap_or_default();
    let words: Vec<&str> = rest.split(is_space).filter(|w| !w.is_empty()).collect();
    let result = match name {
        "help" => {
            if words.len() > 1 {
                return extraneous(entry.0, typed);
            }
            match words.first().copied() {
                Some("info") => help_lines(&mut out, "info ", HMP_INFO_COMMANDS, None),
                Some(a) => help_lines(&mut out, "", HMP_COMMANDS, Some(a)),
                None => help_lines(&mut out, "", HMP_COMMANDS, None),
            }
            Ok(())
        }
        "info" => {
            let (item, sub_rest) = command_name(rest);
            if item.is_empty() {
                help_lines(&mut out, "info ", HMP_INFO_COMMANDS, None);
                return out;
            }
            let Some(sub) = HMP_INFO_COMMANDS.iter().find(|e| matches(e, item)) else {
                return format!("unknown command: 'info {item}'\r\n");
            };
            if !sub_rest.trim_start_matches(is_space).is_empty() {
                return extraneous(sub.0, &line[..line.len() - sub_rest.len()]);
            }
            info(item, ctx, cpu, &mut out)
        }
        "savevm" | "loadvm" | "delvm" => {
            // args_type "name:s?" (savevm) or "name:s".
            let tag = if name == "savevm" && rest.trim_start_matches(is_space).is_empty() {
                None
            } else {
                match get_str(rest) {
                    Some((tag, after)) => {
                        if !after.trim_start_matches(is_space).is_empty() {
                            return extraneous(entry.0, typed);
                        }
                        Some(tag)
                    }
                    None => return parse_error(&format!("{name}: string expected"), typed),
                }
            };
            match name {
                "savevm" => hmp_snapshots::savevm(ctx.machine, tag.as_deref()),
                "loadvm" => vm(ctx, Request::LoadVm(tag.unwrap_or_default())),
                _ => vm(ctx, Request::DelVm(tag.unwrap_or_default())),
            }
        }
        _ if !words.is_empty() => return extraneous(entry.0, typed),
        "stop" => vm(ctx, Request::Stop),
        "cont" => vm(ctx, Request::Cont),
        "system_reset" => vm(ctx, Request::SystemReset),
        "system_powerdown" => vm(ctx, Request::SystemPowerdown),
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

/// A request whose HMP form prints nothing on success.
fn vm(ctx: &mut Context<'_>, req: Request) -> Result<(), CommandError> {
    ctx.machine.request(req).map(drop)
}

/// `info ITEM` (ITEM is known).
fn info(
    item: &str,
    ctx: &mut Context<'_>,
    cpu: Option<i64>,
    out: &mut String,
) -> Result<(), CommandError> {
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
        "snapshots" => out.push_str(&hmp_snapshots::info_snapshots(ctx.machine)?),
        _ => {}
    }
    Ok(())
}
