//! # QMP: the QEMU Machine Protocol, as spoken by snapvmm
//!
//! This crate implements the server side of QMP closely enough that QEMU's
//! own clients (`qemu.qmp`'s `QMPClient`, `qmp-shell`, libvirt-style
//! scripts) work unchanged. It knows nothing of the VMM: the VMM implements
//! [`Machine`], starts a [`Server`] and emits events on its [`EventBus`].
//!
//! ```no_run
//! # use std::sync::Arc;
//! # fn demo(machine: Arc<dyn qmp::Machine>) -> Result<(), qmp::QmpError> {
//! let addr = qmp::ListenAddr::parse("unix:/run/vm0/qmp.sock,server=on,wait=off")?;
//! let server = qmp::Server::start(&addr, machine)?;
//! let events = server.events();
//! events.emit("STOP", None);
//! events.emit("SHUTDOWN", Some(serde_json::json!({"guest": false, "reason": "host-qmp-quit"})));
//! events.flush(std::time::Duration::from_millis(500)); // before exiting
//! # Ok(()) }
//! ```
//!
//! ## Addresses
//!
//! See [`ListenAddr`]: `unix:PATH` and `tcp:HOST:PORT` / `tcp::PORT` /
//! `tcp:PORT`, with the optional QEMU suffixes `,server`, `,server=on`,
//! `,wait=off`, `,nowait`. `wait=on` is refused (the VMM never waits for a
//! client). The unix socket is created with mode 0600 (never visible with
//! wider permissions), a stale socket file is replaced, a live one is an
//! error ("QMP socket PATH is in use by another process"), any other kind
//! of file is left alone and refused. The socket file is removed when the
//! server is dropped. TCP port 0 picks a free port, reported by
//! [`Server::local_addr`].
//!
//! ## Wire protocol
//!
//! Every server message is one JSON object on one line, terminated by
//! `\r\n`, formatted like QEMU (`", "` and `": "` separators, non-ASCII
//! escaped as `\uXXXX`).
//!
//! * Greeting: `{"QMP": {"version": {"qemu": {"major": 10, "minor": 0,
//!   "micro": 0}, "package": "snapvmm-VERSION"}, "capabilities": []}}`.
//! * Capabilities negotiation: until `qmp_capabilities` succeeds every
//!   other command fails with `CommandNotFound` "Expecting capabilities
//!   negotiation with 'qmp_capabilities'", and no event is sent. Asking
//!   for `{"enable": ["oob"]}` fails with `GenericError` "Capability oob
//!   not available". A second `qmp_capabilities` fails with
//!   `CommandNotFound` "Capabilities negotiation is already complete,
//!   command ignored".
//! * Commands: `{"execute": NAME, "arguments": {...}, "id": ANY}`;
//!   success `{"return": VALUE, "id": ID}` (`{}` when there is nothing to
//!   return); failure `{"error": {"class": CLASS, "desc": TEXT}, "id": ID}`.
//!   The id (any JSON value) is echoed whenever the input parsed as an
//!   object. Commands of one connection run one at a time, in order.
//! * Input errors (all `GenericError`, no id): JSON syntax errors
//!   ("JSON parse error, ..."), invalid UTF-8 ("JSON parse error, invalid
//!   UTF-8 sequence in string"), messages over [`MAX_MESSAGE_SIZE`] (1 MiB:
//!   "JSON token size limit exceeded") or nested deeper than
//!   [`MAX_NESTING`] (64: "JSON nesting depth limit exceeded"). Limits are
//!   checked while streaming, before parsing; the rest of an oversized
//!   message is skipped without being stored. The connection stays usable.
//! * Structure errors (`GenericError`, id echoed): "QMP input must be a
//!   JSON object", "QMP input lacks member 'execute'", "QMP input member
//!   'execute' must be a string", "QMP input member 'arguments' must be an
//!   object", "QMP input member 'foo' is unexpected" (also for `exec-oob`,
//!   as OOB is never enabled).
//! * Unknown command: `CommandNotFound` "The command NAME has not been
//!   found". Bad arguments (the command is not run): "Parameter 'x' is
//!   unexpected", "Parameter 'x' is missing", "Invalid parameter type for
//!   'x', expected: string|integer|boolean|array", "Parameter 'x\[0\]' does
//!   not accept value 'v'".
//! * Resynchronisation: a message ends when its brackets balance. A raw
//!   control character inside a string (typically the newline after an
//!   unterminated string) and the bytes `0xFE`/`0xFF` reset the parser to
//!   the top level, as in QEMU.
//!
//! ## Commands
//!
//! | command | arguments | returns |
//! |---|---|---|
//! | `qmp_capabilities` | `enable`?: `["oob"]` (always refused) | `{}` |
//! | `query-version` | | `{"qemu": {"major", "minor", "micro"}, "package"}` |
//! | `query-commands` | | `[{"name": ...}]` |
//! | `query-status` | | `{"running": bool, "status": RunState}` |
//! | `query-name` | | `{"name": ...}` or `{}` |
//! | `query-kvm` | | `{"enabled": true, "present": true}` |
//! | `query-cpus-fast` | | `[{"cpu-index", "qom-path", "thread-id", "props", "target"}]` |
//! | `stop`, `cont`, `system_reset`, `system_powerdown` | | `{}` |
//! | `quit` | | `{}`, written before [`Request::Quit`] is sent |
//! | `human-monitor-command` | `command-line`: str, `cpu-index`?: int | str |
//! | `snapshot-save`, `snapshot-load` | `job-id`, `tag`, `vmstate`: str, `devices`: [str] (all mandatory) | `{}` at once |
//! | `snapshot-delete` | `job-id`, `tag`: str, `devices`: [str] | `{}` at once |
//! | `query-jobs` | | `[{"id", "type", "status", "current-progress", "total-progress", "error"?}]` |
//! | `job-dismiss`, `job-cancel`, `job-finalize` | `id`: str | `{}` |
//! | `migrate` | `uri`: str, `detach`?, `resume`?: bool | `{}` at once |
//! | `migrate-incoming` | `uri`: str | `{}` once loaded |
//! | `migrate_cancel` | | `{}` |
//! | `query-migrate` | | MigrationInfo (the VMM's) |
//! | `migrate-set-capabilities` | `capabilities`: [{`capability`: str, `state`: bool}] | `{}` |
//! | `query-migrate-capabilities` | | `[{"capability", "state"}]` |
//! | `migrate-set-parameters` | any parameters (an object) | `{}` |
//! | `query-migrate-parameters` | | the VMM's parameters |
//!
//! Every command the VMM executes reaches it as one [`Request`] through
//! [`Machine::request`]; commands are checked against their schema first.
//!
//! `human-monitor-command` understands `help`/`?` (with an optional command name), `info`
//! (`status`, `version`, `name`, `kvm`, `cpus`, `snapshots`), `stop`/`s`, `cont`/`c`,
//! `system_reset`, `system_powerdown`, `quit`/`q`, `savevm [tag]`, `loadvm tag`
//! and `delvm tag`, printing exactly
//! what QEMU's HMP prints: lines end in `\r\n`; `info status` gives
//! `VM status: running`, `VM status: paused` or `VM status: paused
//! (postmigrate)` (the run state in parentheses unless it is `paused`);
//! `info version` gives `10.0.0snapvmm-VERSION` (QEMU concatenates version
//! and package); an unknown command prints `unknown command: 'foo'` (a
//! string result, not an error); a failing command prints `Error: DESC`;
//! an empty line returns `""`; bad arguments print QEMU's parser
//! messages, e.g. `stop|s: extraneous characters at the end of line` or
//! `loadvm: string expected`, followed by `Try "help stop" for more
//! information`. A `cpu-index` that names no vCPU is refused
//! with "Parameter 'cpu-index' expects a CPU number".
//!
//! ## Events
//!
//! `{"timestamp": {"seconds": S, "microseconds": U}, "event": NAME,
//! "data": {...}}` (wall clock; `data` omitted when `None`), sent to every
//! negotiated client by [`EventBus::emit`], which never blocks. The VMM
//! emits `STOP`, `RESUME`, `RESET` `{"guest": bool, "reason": str}`,
//! `POWERDOWN`, `SHUTDOWN` `{"guest": bool, "reason": str}` and
//! `JOB_STATUS_CHANGE` `{"id", "status"}` (`created` → `running` → `waiting` →
//! `pending` → `concluded`, `null` after `job-dismiss`); the crate
//! does not check names or payloads. [`EventBus::flush`] waits (bounded)
//! until queued messages are written, e.g. so a final `SHUTDOWN` reaches
//! the clients before the process exits.
//!
//! ## Clients and threads
//!
//! Any number of clients (up to [`MAX_CLIENTS`]) may be connected, each
//! with its own negotiation. Threads: one accept thread per server, and
//! per client a reader (parses and runs commands) and a writer (drains a
//! queue of at most [`CLIENT_QUEUE_CAPACITY`] messages). A client whose
//! queue overflows, because it does not read, is disconnected and logged,
//! so a stuck client never slows the VM or the other clients. Dropping the
//! [`Server`] stops accepting, disconnects its clients and removes the
//! socket file.
//!
//! ## Differences from QEMU
//!
//! * `tcp::PORT` / `tcp:PORT` listen on 127.0.0.1, not on every
//!   interface (QMP has no authentication); write `tcp:0.0.0.0:PORT` to
//!   listen publicly.
//! * No out-of-band execution: the greeting offers no `oob` capability.
//! * Several clients may be connected to one socket at once (QEMU serves
//!   one client per `-qmp` chardev at a time).
//! * Input limits are 1 MiB per message and 64 nesting levels (QEMU: 64 MiB
//!   and 1024).
//! * The JSON extensions of QEMU's parser (single-quoted strings,
//!   `%`-interpolation) are not accepted; error texts for JSON syntax
//!   errors after "JSON parse error, " differ.
//! * `wait=on` and `server=off` are refused.
//! * Only the commands above exist; `query-qmp-schema` is not implemented.
//!   `info snapshots` lists only the snapshots present on all disks (no
//!   "partial" lists).
#![warn(missing_docs)]

mod addr;
mod args;
mod commands;
mod error;
mod events;
mod fds;
#[cfg(test)]
mod fuzz_tests;
#[cfg(any(test, feature = "fuzzing"))]
#[doc(hidden)]
pub mod fuzzing;
mod json;
mod machine;
mod protocol;
mod server;
mod session;
mod socket;
mod stream;

pub use addr::ListenAddr;
pub use error::{CommandError, ErrorClass, QmpError};
pub use events::{EventBus, CLIENT_QUEUE_CAPACITY};
pub use fds::{peek_fd, take_fd};
pub use machine::{CpuInfo, CpuProps, Machine, Request, RunState, SnapshotEntry, SnapshotJob};
pub use protocol::{package, QEMU_VERSION};
pub use server::{Server, MAX_CLIENTS};
pub use stream::{MAX_MESSAGE_SIZE, MAX_NESTING};
