//! Live snapshots to a file, spoken as QEMU's migration API, and restore.
//!
//! `migrate file:PATH` with the `background-snapshot` capability (method
//! `fork`, the default): pause the vCPUs, save non-RAM state in memory, fork a
//! child that holds a copy-on-write image of RAM, resume. The pause contains
//! no RAM I/O. The livesnap writer thread streams the child's RAM into the
//! image and calls back when done. Without the capability (or with
//! `x-snapshot-method: stop`) the VM stays stopped while RAM is written —
//! QEMU's behaviour, and our baseline — and ends in `postmigrate` (or resumes,
//! for `background-snapshot` with the `stop` method).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use livesnap::{CaptureStats, ForkOptions, RamRange};
use qmp::CommandError;
use serde_json::{json, Value};

use super::Events;

pub use super::job::{Captured, Engine, LiveSource, Method, PrecopyFigures};

/// QEMU's MigrationStatus values we use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Setup,
    Active,
    Completed,
    Failed,
    Cancelling,
    Cancelled,
    PostcopyActive,
    PostcopyPaused,
    PostcopyRecover,
}

impl Status {
    pub fn name(self) -> &'static str {
        match self {
            Status::PostcopyActive => "postcopy-active",
            Status::PostcopyPaused => "postcopy-paused",
            Status::PostcopyRecover => "postcopy-recover",
            Status::Setup => "setup",
            Status::Active => "active",
            Status::Completed => "completed",
            Status::Failed => "failed",
            Status::Cancelling => "cancelling",
            Status::Cancelled => "cancelled",
        }
    }
}

/// One migration job (a snapshot, a live migration, or an incoming stream),
/// active or finished.
pub struct Job {
    /// Changed only by [`Migration::set_status`].
    status: Status,
    /// What runs, with what only that engine keeps.
    pub engine: Engine,
    /// The VM resumes after the job (a stop-and-copy of background-snapshot;
    /// a live migration's source whose guest ran, if it fails).
    pub resume_after: bool,
    /// The guest ran when the stop-and-copy cut it: a failed one resumes it
    /// (as QEMU resumes the source of a failed migration).
    pub was_running: bool,
    started: Instant,
    pub setup_time: Duration,
    /// The guest pause caused by the snapshot (vCPUs paused → resumed).
    pub downtime: Duration,
    /// Starting the capture alone (the `fork()`, or the protection).
    pub capture_start: Duration,
    /// Pausing the vCPUs alone.
    pub vcpu_pause: Duration,
    /// Waiting, once the vCPUs stopped, for the device I/O in progress (a disk
    /// request, a batch of frames) to end.
    pub io_drain: Duration,
    /// Saving and serializing the non-RAM state (inside the pause).
    pub state_time: Duration,
    pub total_time: Option<Duration>,
    pub ram_total: u64,
    pub error: Option<String>,
}

/// Migration settings and the latest job.
pub struct Migration {
    pub background_snapshot: bool,
    pub events: bool,
    /// QEMU's `postcopy-ram` and `return-path` capabilities, as set.
    pub postcopy_ram: bool,
    pub return_path: bool,
    pub method: Method,
    /// `x-snapshot-method` was given: no fallback from `uffd` to `fork`.
    pub method_set: bool,
    /// Rebuild transparent huge pages after a fork capture (`x-collapse-huge-pages`).
    pub collapse: bool,
    /// Copy buffers of the write-protect capture, bytes (`x-wp-pool-size`).
    pub wp_pool: u64,
    /// What they may grow to while the destination lags behind the guest's
    /// writes (`x-wp-pool-max-size`; never more than the RAM captured).
    pub wp_pool_max: u64,
    /// The share of host memory the growth leaves available, percent
    /// (`x-wp-pool-keep-free-percent`).
    pub wp_keep_free_percent: u8,
    /// A guest write waiting this long for a buffer abandons the snapshot
    /// (`x-wp-stall-limit-ms`).
    pub wp_stall_limit: Duration,
    /// Keep the pool's buffers between snapshots (`x-wp-keep-pool`).
    pub wp_keep_pool: bool,
    /// The image snapshots are incremental to (`x-parent`: `file:PATH`).
    pub parent: Option<PathBuf>,
    /// A live migration sends RAM once with the guest running before it
    /// cuts (`x-precopy`).
    pub precopy: bool,
    pub job: Option<Job>,
    /// The latest huge-page rebuild: pages collapsed and time taken.
    pub last_collapse: Option<(vmm::memory::CollapseStats, Duration)>,
    /// How the restore of this VM's RAM went (`--restore-mode uffd`).
    pub last_fill: Option<livesnap::fill::FillStats>,
    /// The latest `migrate-incoming`.
    pub last_restore: Option<RestoreInfo>,
    /// An incoming live migration's pages (target), until RAM is all here.
    pub postcopy_in: Option<std::sync::Arc<livesnap::postcopy::RemotePages>>,
}

/// How `migrate-incoming` loaded this VM.
#[derive(Debug, Clone, Copy)]
pub struct RestoreInfo {
    pub mode: super::restore::RamMode,
    /// Into a VM built ahead (`--incoming defer` with `--restore-mode uffd`).
    pub warm: bool,
    /// The command's start to the machine built (state loaded, RAM mapped or being filled).
    pub load: Duration,
    /// When the machine was built: a guest that triple-faults soon after
    /// was not restored to anything that runs.
    pub at: Instant,
}

impl Default for Migration {
    fn default() -> Self {
        Migration {
            background_snapshot: false,
            events: false,
            postcopy_ram: false,
            return_path: false,
            method: Method::Wp,
            method_set: false,
            collapse: true,
            wp_pool: 64 << 20,
            // In effect: as much as the RAM captured, while the host keeps
            // 15 % of its memory available.
            wp_pool_max: 1 << 40,
            wp_keep_free_percent: 15,
            wp_stall_limit: Duration::from_millis(500),
            wp_keep_pool: true,
            parent: None,
            precopy: true,
            job: None,
            last_collapse: None,
            last_fill: None,
            last_restore: None,
            postcopy_in: None,
        }
    }
}

/// A `file:PATH` URI (what `x-parent` takes), parsed by the one URI parser
/// ([`super::transport::Uri`]); any other transport is refused.
pub fn parse_uri(uri: &str) -> Result<PathBuf, CommandError> {
    match super::transport::Uri::parse(uri) {
        Ok(super::transport::Uri::File(p)) => Ok(p),
        Ok(_) => Err(CommandError::generic(format!(
            "Invalid migration URI '{uri}': only 'file:PATH' is possible here"
        ))),
        Err(e) => Err(CommandError::generic(e)),
    }
}

impl Job {
    pub fn started_elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    pub fn status(&self) -> Status {
        self.status
    }
}

/// A status change the state machine does not allow (a bug in the caller).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("migration status cannot go from {} to {}", from.map_or("none", Status::name), to.name())]
pub struct IllegalTransition {
    pub from: Option<Status>,
    pub to: Status,
}

/// QEMU's MigrationStatus transitions, as far as snapvmm goes: a new job from
/// nothing or a finished one; setup → active → completed / failed; cancel
/// from setup or active, ending cancelled (or completed / failed when the
/// capture ended first). A live migration goes active → postcopy-active at
/// the switch, → postcopy-paused when its connection breaks, → postcopy-recover
/// on a new one, → postcopy-active again, and ends completed (or failed).
pub fn legal(from: Option<Status>, to: Status) -> bool {
    use Status::*;
    matches!(
        (from, to),
        (None | Some(Completed | Failed | Cancelled), Setup)
            | (Some(Setup), Active | Failed | Cancelling)
            | (
                Some(Active),
                Completed | Failed | Cancelling | PostcopyActive
            )
            | (Some(Cancelling), Cancelled | Completed | Failed)
            | (Some(PostcopyActive), PostcopyPaused | Completed | Failed)
            | (
                Some(PostcopyPaused),
                PostcopyRecover | PostcopyActive | Failed
            )
            | (
                Some(PostcopyRecover),
                PostcopyActive | PostcopyPaused | Failed
            )
    )
}

impl Migration {
    pub fn active(&self) -> bool {
        self.job.as_ref().is_some_and(|j| {
            matches!(
                j.status,
                Status::Setup
                    | Status::Active
                    | Status::Cancelling
                    | Status::PostcopyActive
                    | Status::PostcopyPaused
                    | Status::PostcopyRecover
            )
        })
    }

    /// At exit: a unix socket this VM still listens on (an incoming stream or
    /// a recovery never came) is removed, as the listener would have.
    pub fn remove_listening_socket(&self) {
        // Only while its listener may still wait (the thread removes it
        // otherwise; another process may have bound the path since).
        let path = self
            .job
            .as_ref()
            .filter(|j| matches!(j.status, Status::Active | Status::PostcopyRecover))
            .and_then(|j| j.engine.listening())
            .and_then(|a| a.strip_prefix("unix:"));
        if let Some(p) = path {
            use std::os::unix::fs::FileTypeExt;
            if std::fs::symlink_metadata(p).is_ok_and(|m| m.file_type().is_socket()) {
                let _ = std::fs::remove_file(p);
            }
        }
    }

    /// This VM was (or is being) live-migrated away: its guest must not run
    /// here again unless the migration failed before the switch.
    pub fn migrated_away(&self) -> bool {
        self.job.as_ref().is_some_and(|j| {
            j.engine.live().is_some_and(|l| l.precopy.is_none())
                && !matches!(j.status, Status::Failed | Status::Cancelled)
        })
    }

    /// True while a stop-and-copy runs (the guest must stay stopped).
    pub fn active_stop_copy(&self) -> bool {
        self.active()
            && self
                .job
                .as_ref()
                .is_some_and(|j| j.engine.method() == Some(Method::Stop))
    }

    /// The method a new `migrate` uses.
    pub fn effective_method(&self) -> Method {
        if self.background_snapshot {
            self.method
        } else {
            Method::Stop
        }
    }

    /// The one place the status changes: checks the transition and emits
    /// `MIGRATION` (with the `events` capability), as QEMU's
    /// `migrate_set_state`. An illegal transition changes nothing.
    pub fn set_status(&mut self, to: Status, ev: &dyn Events) -> Result<(), IllegalTransition> {
        let from = self.job.as_ref().map(|j| j.status);
        // A new job starts with `new_job` (which also resets its figures).
        if to == Status::Setup || !legal(from, to) {
            let e = IllegalTransition { from, to };
            tracing::error!("internal error: {e}");
            return Err(e);
        }
        if let Some(j) = self.job.as_mut() {
            j.status = to;
        }
        if self.events {
            ev.emit("MIGRATION", Some(json!({"status": to.name()})));
        }
        Ok(())
    }

    /// Ends the job failed with `why` (its `error-desc`); returns the command error.
    pub fn fail(&mut self, why: String, ev: &dyn Events) -> CommandError {
        if let Some(j) = self.job.as_mut() {
            j.error = Some(why.clone());
        }
        let _ = self.set_status(Status::Failed, ev);
        CommandError::generic(why)
    }

    /// Starts a job in `setup` (the previous one must have ended).
    pub fn new_job(
        &mut self,
        ram_total: u64,
        engine: Engine,
        ev: &dyn Events,
    ) -> Result<&mut Job, IllegalTransition> {
        let from = self.job.as_ref().map(|j| j.status);
        if !legal(from, Status::Setup) {
            return Err(IllegalTransition {
                from,
                to: Status::Setup,
            });
        }
        self.job = Some(Job {
            status: Status::Setup,
            engine,
            resume_after: self.background_snapshot,
            was_running: false,
            started: Instant::now(),
            setup_time: Duration::ZERO,
            downtime: Duration::ZERO,
            capture_start: Duration::ZERO,
            vcpu_pause: Duration::ZERO,
            io_drain: Duration::ZERO,
            state_time: Duration::ZERO,
            total_time: None,
            ram_total,
            error: None,
        });
        if self.events {
            ev.emit("MIGRATION", Some(json!({"status": Status::Setup.name()})));
        }
        Ok(self.job.as_mut().expect("job just created"))
    }

    /// `query-migrate`.
    pub fn query(&self) -> Value {
        let mut v = self.query_job();
        if let Some(r) = &self.last_restore {
            v["x-restore"] = json!({
                "mode": r.mode.name(),
                "warm": r.warm,
                "load-us": r.load.as_micros() as u64,
            });
        }
        if let Some(f) = &self.last_fill {
            v["x-restore-fill"] = json!({
                "ms": f.elapsed.as_secs_f64() * 1e3,
                "faults": f.faults,
                "chunks-by-fault": f.chunks_by_fault,
                "chunks-by-prefetch": f.chunks_by_prefetch,
                "zero-chunks": f.zero_chunks,
                "pages-first": f.pages_first,
                "bytes-read": f.bytes_read,
                "fault-fills": waits_json(&f.fault_fills),
                "fault-source-waits": waits_json(&f.fault_source_waits),
            });
        }
        v
    }

    fn query_job(&self) -> Value {
        let Some(j) = &self.job else { return json!({}) };
        let page = livesnap::PAGE_SIZE;
        let (transferred, normal, zero, elapsed) = match (j.engine.stats(), j.engine.capture()) {
            (Some(s), _) => (s.ram_bytes, s.normal_pages, s.zero_pages, s.total_time),
            (None, Some(c)) => {
                let p = c.progress();
                (p.transferred_bytes, p.normal_pages, p.zero_pages, p.elapsed)
            }
            (None, None) => (0, 0, 0, j.started.elapsed()),
        };
        let total_time = j.total_time.unwrap_or_else(|| j.started.elapsed());
        let secs = elapsed.as_secs_f64().max(1e-6);
        let mut v = json!({
            "status": j.status.name(),
            "total-time": total_time.as_millis() as u64,
            "setup-time": j.setup_time.as_millis() as u64,
            "ram": {
                "total": j.ram_total,
                "transferred": normal * page,
                "remaining": j.ram_total.saturating_sub(transferred),
                "mbps": (normal * page) as f64 * 8.0 / 1e6 / secs,
                "normal": normal,
                "normal-bytes": normal * page,
                "duplicate": zero,
                "page-size": page,
                "skipped": 0,
                "dirty-sync-count": 1,
                "postcopy-requests": 0,
                "multifd-bytes": 0,
                "pages-per-second": ((normal + zero) as f64 / secs) as u64,
                "precopy-bytes": normal * page,
                "downtime-bytes": 0,
                "postcopy-bytes": 0,
                "dirty-pages-rate": 0
            },
            "x-snapshot-method": j.engine.method().unwrap_or(self.effective_method()).name(),
            "x-downtime-us": j.downtime.as_micros() as u64,
            "x-vcpu-pause-us": j.vcpu_pause.as_micros() as u64,
            "x-io-drain-us": j.io_drain.as_micros() as u64,
            "x-fork-us": j.capture_start.as_micros() as u64,
            "x-state-save-us": j.state_time.as_micros() as u64,
        });
        if let Some((st, took)) = &self.last_collapse {
            v["x-huge-pages-rebuilt"] = json!({
                "collapsed-2m": st.collapsed,
                "skipped-2m": st.skipped,
                "ms": took.as_millis() as u64,
            });
        }
        if matches!(j.status, Status::Completed) || j.engine.method() == Some(Method::Stop) {
            v["downtime"] = json!(j.downtime.as_millis() as u64);
        } else {
            v["expected-downtime"] = json!(0);
            v["downtime"] = json!(j.downtime.as_millis() as u64);
        }
        if let Some(e) = &j.error {
            v["error-desc"] = json!(e);
        }
        if let Some(a) = j.engine.listening() {
            // QEMU's SocketAddress list of an incoming migration.
            v["socket-address"] = match a.split_once(':') {
                Some(("unix", p)) => json!([{"type": "unix", "path": p}]),
                Some(("tcp", hp)) => {
                    let (h, p) = hp.rsplit_once(':').unwrap_or((hp, ""));
                    json!([{"type": "inet", "host": h.trim_matches(['[', ']']), "port": p}])
                }
                _ => json!([]),
            };
        }
        if let Some(why) = j.engine.paused_why() {
            v["x-paused-reason"] = json!(why);
        }
        if let Some(p) = j.engine.live().and_then(|l| l.sender.as_ref()) {
            use std::sync::atomic::Ordering::Relaxed;
            let c = p.counters();
            let (sent, chunks) = p.progress();
            let bytes = c.bytes_sent.load(Relaxed);
            v["ram"]["transferred"] = json!(bytes);
            v["ram"]["postcopy-bytes"] = json!(bytes);
            v["ram"]["postcopy-requests"] = json!(c.requests.load(Relaxed));
            v["ram"]["remaining"] = json!((chunks - sent) as u64 * livesnap::CHUNK);
            v["x-postcopy"] = json!({
                "chunks": chunks,
                "chunks-sent": sent,
                "chunks-pushed": c.chunks_pushed.load(Relaxed),
                "push-limit": c.push_limit.load(Relaxed),
                "min-rtt-us": c.min_rtt_us.load(Relaxed),
                "delivery-rate": c.delivery_rate.load(Relaxed),
                "chunks-requested": c.chunks_requested.load(Relaxed),
                "pages-requested": c.pages_requested.load(Relaxed),
                "zero-chunks": c.zero_chunks.load(Relaxed),
                "bytes-sent": bytes,
                "connections": c.connections.load(Relaxed),
            });
        }
        if let Some(f) = j.engine.live().and_then(|l| l.precopy_figures.as_ref()) {
            use std::sync::atomic::Ordering::Relaxed;
            let c = &f.counters;
            let bytes = c.bytes_sent.load(Relaxed);
            v["ram"]["precopy-bytes"] = json!(bytes);
            v["ram"]["transferred"] = json!(v["ram"]["transferred"].as_u64().unwrap_or(0) + bytes);
            v["x-precopy"] = json!({
                "chunks": f.chunks,
                "chunks-sent": c.chunks_sent.load(Relaxed),
                "zero-chunks": c.zero_chunks.load(Relaxed),
                "chunks-rewritten": c.chunks_rewritten.load(Relaxed),
                "bytes-sent": bytes,
                "drain-us": c.drain_us.load(Relaxed),
                "ended": f.end.map(|e| e.name()),
                "ms": f.took.map(|t| t.as_millis() as u64),
            });
        }
        if let Some(p) = &self.postcopy_in {
            let f = p.figures();
            v["x-postcopy-target"] = json!({
                "precopy-chunks-kept": f.precopy.chunks_kept,
                "precopy-chunks-dropped": f.precopy.chunks_dropped,
                "precopy-bytes": f.precopy.bytes,
                "requests": f.requests,
                "chunks-requested": f.chunks_requested,
                "requests-before-switch": f.requests_before_switch,
                "chunks-received": f.chunks_received,
                "bytes-received": f.bytes,
                "connections": f.connections,
            });
        }
        if let Engine::Wp {
            counters: Some(c),
            parent,
            ..
        } = &j.engine
        {
            use std::sync::atomic::Ordering::Relaxed;
            v["x-write-protect"] = json!({
                "faults": c.faults.load(Relaxed),
                "chunks-by-fault": c.chunks_by_fault.load(Relaxed),
                "chunks-by-writer": c.chunks_by_writer.load(Relaxed),
                "pool-high-water": c.pool_high_water.load(Relaxed),
                "pool-size": self.wp_pool,
                "pool-grown": c.pool_grown.load(Relaxed) * livesnap::CHUNK,
                "pool-kept": c.pool_kept.load(Relaxed) * livesnap::CHUNK,
                "chunks-unchanged": c.chunks_unchanged.load(Relaxed),
                "direct-io": c.direct_io.load(Relaxed),
                "fault-waits": c.waits.summaries().iter().map(|(k, w)| (k.to_string(), waits_json(w))).collect::<serde_json::Map<_, _>>(),
            });
            if let Some(p) = parent {
                v["x-incremental"] = json!({
                    "parent": format!("file:{}", p.display()),
                    "chunks-unchanged": c.chunks_unchanged.load(Relaxed),
                    "ram-bytes-written": normal * page,
                    "full-image-ram-bytes": j.ram_total,
                });
            }
        }
        v
    }

    pub fn query_capabilities(&self) -> Value {
        let mut caps: Vec<Value> = QEMU_CAPABILITIES
            .iter()
            .map(|c| json!({"capability": c, "state": false}))
            .collect();
        for c in caps.iter_mut() {
            match c["capability"].as_str() {
                Some("background-snapshot") => c["state"] = json!(self.background_snapshot),
                Some("events") => c["state"] = json!(self.events),
                Some("postcopy-ram") => c["state"] = json!(self.postcopy_ram),
                Some("return-path") => c["state"] = json!(self.return_path),
                _ => {}
            }
        }
        Value::Array(caps)
    }

    /// `migrate-set-capabilities` (the caller checked that no migration runs).
    pub fn set_capabilities(&mut self, caps: &[(String, bool)]) -> Result<(), CommandError> {
        for (name, state) in caps {
            match name.as_str() {
                "background-snapshot" | "events" | "postcopy-ram" | "return-path" => {}
                n if QEMU_CAPABILITIES.contains(&n) => {
                    if *state {
                        return Err(CommandError::generic(format!(
                            "Migration capability '{n}' is not supported by snapvmm"
                        )));
                    }
                }
                n => {
                    return Err(CommandError::generic(format!(
                        "Parameter 'capability' does not accept value '{n}'"
                    )))
                }
            }
        }
        for (name, state) in caps {
            match name.as_str() {
                "background-snapshot" => self.background_snapshot = *state,
                "events" => self.events = *state,
                // A live migration is post-copy over a connection both ways
                // whatever these say; they are kept for QEMU's clients.
                "postcopy-ram" => self.postcopy_ram = *state,
                "return-path" => self.return_path = *state,
                _ => {}
            }
        }
        Ok(())
    }

    /// The write-protect capture's options from these parameters.
    pub fn wp_options(&self) -> livesnap::wp::WpOptions {
        livesnap::wp::WpOptions {
            pool_bytes: self.wp_pool,
            pool_max_bytes: self.wp_pool_max.max(self.wp_pool),
            pool_keep_free_percent: self.wp_keep_free_percent,
            stall_limit: self.wp_stall_limit,
            keep_pool: self.wp_keep_pool,
            ..Default::default()
        }
    }

    pub fn query_parameters(&self) -> Value {
        json!({
            "x-snapshot-method": self.method.name(),
            "x-collapse-huge-pages": self.collapse,
            "x-wp-pool-size": self.wp_pool,
            "x-wp-pool-max-size": self.wp_pool_max.max(self.wp_pool),
            "x-wp-pool-keep-free-percent": self.wp_keep_free_percent,
            "x-wp-stall-limit-ms": self.wp_stall_limit.as_millis() as u64,
            "x-wp-keep-pool": self.wp_keep_pool,
            "x-parent": self.parent.as_ref().map_or(String::new(), |p| format!("file:{}", p.display())),
            "x-precopy": self.precopy,
        })
    }

    /// `migrate-set-parameters` (the schema was checked by the QMP layer; the
    /// caller checked that no migration runs); all or nothing.
    pub fn set_parameters(
        &mut self,
        p: &serde_json::Map<String, Value>,
    ) -> Result<(), CommandError> {
        let method = match p.get("x-snapshot-method").and_then(Value::as_str) {
            Some(m) => Self::parse_method(m)?,
            None => self.method,
        };
        let pool = match p.get("x-wp-pool-size").and_then(Value::as_i64) {
            Some(n) if n < livesnap::CHUNK as i64 => {
                return Err(CommandError::generic(format!(
                    "Parameter 'x-wp-pool-size' must be at least {} (one 2 MiB chunk)",
                    livesnap::CHUNK
                )))
            }
            Some(n) => n as u64,
            None => self.wp_pool,
        };
        let pool_max = match p.get("x-wp-pool-max-size").and_then(Value::as_i64) {
            Some(n) if n < 0 => {
                return Err(CommandError::generic(
                    "Parameter 'x-wp-pool-max-size' must not be negative",
                ))
            }
            Some(n) => n as u64,
            None => self.wp_pool_max,
        };
        let keep_free = match p.get("x-wp-pool-keep-free-percent").and_then(Value::as_i64) {
            Some(n) if !(0..=100).contains(&n) => {
                return Err(CommandError::generic(
                    "Parameter 'x-wp-pool-keep-free-percent' must be between 0 and 100",
                ))
            }
            Some(n) => n as u8,
            None => self.wp_keep_free_percent,
        };
        let stall = match p.get("x-wp-stall-limit-ms").and_then(Value::as_i64) {
            Some(n) if !(1..=3_600_000).contains(&n) => {
                return Err(CommandError::generic(
                    "Parameter 'x-wp-stall-limit-ms' must be between 1 and 3600000",
                ))
            }
            Some(n) => Duration::from_millis(n as u64),
            None => self.wp_stall_limit,
        };
        let parent =
            match p.get("x-parent").and_then(Value::as_str) {
                Some("") => None,
                Some(uri) => Some(parse_uri(uri).map_err(|e| {
                    CommandError::generic(format!("Parameter 'x-parent': {}", e.desc))
                })?),
                None => self.parent.clone(),
            };
        self.method_set |= p.contains_key("x-snapshot-method");
        self.method = method;
        self.wp_pool = pool;
        self.wp_pool_max = pool_max;
        self.wp_keep_free_percent = keep_free;
        self.wp_stall_limit = stall;
        self.parent = parent;
        if let Some(c) = p.get("x-collapse-huge-pages").and_then(Value::as_bool) {
            self.collapse = c;
        }
        if let Some(c) = p.get("x-precopy").and_then(Value::as_bool) {
            self.precopy = c;
        }
        if let Some(c) = p.get("x-wp-keep-pool").and_then(Value::as_bool) {
            self.wp_keep_pool = c;
        }
        Ok(())
    }

    fn parse_method(m: &str) -> Result<Method, CommandError> {
        Ok(match m {
            "fork" => Method::Fork,
            "uffd" => Method::Wp,
            "stop" => Method::Stop,
            other => {
                return Err(CommandError::generic(format!(
                    "Parameter 'x-snapshot-method' does not accept value '{other}' (expected 'fork', 'uffd' or 'stop')"
                )))
            }
        })
    }
}

/// QEMU's migration capabilities (all listed by query-migrate-capabilities).
const QEMU_CAPABILITIES: &[&str] = &[
    "xbzrle",
    "rdma-pin-all",
    "auto-converge",
    "zero-blocks",
    "events",
    "postcopy-ram",
    "x-colo",
    "release-ram",
    "return-path",
    "pause-before-switchover",
    "multifd",
    "dirty-bitmaps",
    "postcopy-blocktime",
    "late-block-activate",
    "x-ignore-shared",
    "validate-uuid",
    "background-snapshot",
    "zero-copy-send",
    "postcopy-preempt",
    "switchover-ack",
    "dirty-limit",
    "mapped-ram",
];

/// Guest RAM as the snapshot engine sees it.
pub(crate) fn ram_ranges(m: &vmm::Machine) -> Vec<RamRange> {
    m.ram()
        .regions()
        .iter()
        // SAFETY: the regions are the machine's RAM mappings. They are unmapped
        // only when the machine is replaced (reset, snapshot-load) or dropped
        // (exit). The controller refuses a reset or load while a capture runs
        // (`snapshot::check`: only Op::Idle allows them) and at exit cancels and
        // waits for every capture (`end_captures`) before the machine goes.
        .map(|r| unsafe { RamRange::new(r.gpa, r.host, r.len) })
        .collect()
}

/// Where a capture writes: an image file written in place, or a stream
/// (unix, tcp, exec, fd) through its sink.
pub enum Dest {
    File(PathBuf),
    Stream(Box<dyn livesnap::Sink>),
}

impl Dest {
    /// Where a live capture writes.
    fn into_capture(self) -> livesnap::Destination {
        match self {
            Dest::File(p) => livesnap::Destination::File(p),
            Dest::Stream(s) => livesnap::Destination::Sink(s),
        }
    }

    /// Opens the destination named by `uri` for the RAM of `m`: a stream
    /// connects (or starts its command) now, with the guest running.
    pub fn open(uri: &super::transport::Uri, m: &vmm::Machine) -> Result<Dest, String> {
        use super::transport::{Outgoing, Uri};
        match uri {
            Uri::File(p) => Ok(Dest::File(p.clone())),
            _ => {
                let out =
                    Outgoing::connect(uri).map_err(|e| format!("cannot open the stream: {e}"))?;
                let pairs: Vec<(u64, u64)> =
                    ram_ranges(m).iter().map(|r| (r.gpa(), r.len())).collect();
                let sink =
                    livesnap::stream::StreamSink::new(out, &pairs).map_err(|e| e.to_string())?;
                Ok(Dest::Stream(Box::new(sink)))
            }
        }
    }
}

/// Prepares a fork capture (before the pause); once started, `done` is
/// called when it ends, whatever the outcome.
pub(crate) fn prepare_fork(
    m: &vmm::Machine,
    dest: Dest,
    done: impl FnOnce() + Send + 'static,
) -> Result<livesnap::PreparedCapture, livesnap::SnapError> {
    let opts = ForkOptions {
        on_done: Some(Box::new(move |_| done())),
        ..ForkOptions::default()
    };
    livesnap::prepare_fork_capture(&ram_ranges(m), dest.into_capture(), opts)
}

/// Prepares a write-protect capture (before the pause) of the RAM of
/// `engine` (incremental to `parent`); once started, `done` is called when
/// it ends, whatever the outcome.
pub(crate) fn prepare_wp(
    engine: &livesnap::wp::WpEngine,
    dest: Dest,
    parent: Option<&Path>,
    opts: livesnap::wp::WpOptions,
    done: impl FnOnce() + Send + 'static,
) -> Result<livesnap::wp::PreparedWpCapture, livesnap::SnapError> {
    let opts = livesnap::wp::WpOptions {
        parent: parent.map(Path::to_path_buf),
        on_done: Some(Box::new(move |_| done())),
        ..opts
    };
    livesnap::wp::prepare_wp_capture(engine, dest.into_capture(), opts)
}

/// Runs a stop-and-copy capture on a worker thread; `done` gets its result.
/// The caller keeps the VM paused until then.
pub(crate) fn start_stop_copy(
    m: &vmm::Machine,
    state: Vec<u8>,
    dest: Dest,
    done: impl FnOnce(Result<CaptureStats, livesnap::SnapError>) + Send + 'static,
) -> std::thread::JoinHandle<()> {
    let ranges = ram_ranges(m);
    std::thread::spawn(move || {
        done(match dest {
            Dest::File(p) => livesnap::capture_stopped(&ranges, &state, &p),
            Dest::Stream(mut s) => livesnap::capture_stopped(&ranges, &state, &mut *s),
        });
    })
}

/// A wait summary as `query-migrate` shows it.
fn waits_json(w: &livesnap::waits::WaitSummary) -> Value {
    json!({
        "count": w.count,
        "total-us": w.total_us,
        "p50-us": w.p50_us,
        "p99-us": w.p99_us,
        "max-us": w.max_us,
    })
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;

    use super::*;

    /// Records the events the state machine emits.
    #[derive(Default)]
    struct Recorder(RefCell<Vec<String>>);

    impl Events for Recorder {
        fn emit(&self, name: &str, data: Option<Value>) {
            let status = data
                .as_ref()
                .and_then(|d| d["status"].as_str())
                .unwrap_or("");
            self.0.borrow_mut().push(format!("{name} {status}"));
        }
    }

    impl Recorder {
        fn take(&self) -> Vec<String> {
            std::mem::take(&mut self.0.borrow_mut())
        }
    }

    fn with_events() -> Migration {
        let mut m = Migration::default();
        m.set_capabilities(&[("events".into(), true)]).unwrap();
        m
    }

    #[test]
    fn a_job_goes_setup_active_completed_with_one_event_each() {
        let ev = Recorder::default();
        let mut m = with_events();
        assert!(!m.active());
        m.new_job(1 << 20, Engine::new(Method::Fork), &ev).unwrap();
        assert!(m.active());
        m.set_status(Status::Active, &ev).unwrap();
        m.set_status(Status::Completed, &ev).unwrap();
        assert!(!m.active());
        assert_eq!(
            ev.take(),
            ["MIGRATION setup", "MIGRATION active", "MIGRATION completed"]
        );
        assert_eq!(m.query()["status"], "completed");
        // The next job may start.
        m.new_job(1 << 20, Engine::new(Method::Fork), &ev).unwrap();
        assert_eq!(ev.take(), ["MIGRATION setup"]);
    }

    #[test]
    fn illegal_transitions_change_nothing_and_emit_nothing() {
        use Status::*;
        let all = [
            Setup,
            Active,
            Completed,
            Failed,
            Cancelling,
            Cancelled,
            PostcopyActive,
            PostcopyPaused,
            PostcopyRecover,
        ];
        let ev = Recorder::default();
        // Every pair: legal ones take effect with their event, others do not.
        for from in all {
            for to in all {
                let mut m = with_events();
                m.new_job(4096, Engine::new(Method::Fork), &ev).unwrap();
                // Reach `from` by a legal path.
                let path: &[Status] = match from {
                    Setup => &[],
                    Active => &[Active],
                    Completed => &[Active, Completed],
                    Failed => &[Failed],
                    Cancelling => &[Cancelling],
                    Cancelled => &[Cancelling, Cancelled],
                    PostcopyActive => &[Active, PostcopyActive],
                    PostcopyPaused => &[Active, PostcopyActive, PostcopyPaused],
                    PostcopyRecover => &[Active, PostcopyActive, PostcopyPaused, PostcopyRecover],
                };
                for &s in path {
                    m.set_status(s, &ev).unwrap();
                }
                ev.take();
                let r = m.set_status(to, &ev);
                let expect = legal(Some(from), to) && to != Setup;
                assert_eq!(r.is_ok(), expect, "{from:?} -> {to:?}");
                let now = m.job.as_ref().unwrap().status();
                if expect {
                    assert_eq!(now, to);
                    assert_eq!(ev.take(), [format!("MIGRATION {}", to.name())]);
                } else {
                    assert_eq!(now, from, "{from:?} -> {to:?} changed the status");
                    assert!(ev.take().is_empty());
                    assert_eq!(
                        r.unwrap_err(),
                        IllegalTransition {
                            from: Some(from),
                            to
                        }
                    );
                }
            }
        }
        // A second job while one runs is refused; a status without a job too.
        let mut m = with_events();
        assert!(m.set_status(Active, &ev).is_err());
        m.new_job(4096, Engine::new(Method::Fork), &ev).unwrap();
        assert!(m.new_job(4096, Engine::new(Method::Fork), &ev).is_err());
        m.set_status(Active, &ev).unwrap();
        assert!(m.new_job(4096, Engine::new(Method::Fork), &ev).is_err());
        assert!(legal(Some(Completed), Setup) && legal(Some(Failed), Setup));
        assert!(!legal(Some(Completed), Active) && !legal(Some(Setup), Completed));
        // A live migration cannot be cancelled once the target runs the guest.
        assert!(
            !legal(Some(PostcopyActive), Cancelling) && !legal(Some(PostcopyPaused), Cancelled)
        );
    }

    #[test]
    fn without_the_events_capability_nothing_is_emitted() {
        let ev = Recorder::default();
        let mut m = Migration::default();
        m.new_job(4096, Engine::new(Method::Fork), &ev).unwrap();
        let e = m.fail("disk full".into(), &ev);
        assert_eq!(e.desc, "disk full");
        assert!(ev.take().is_empty());
        assert_eq!(m.query()["status"], "failed");
        assert_eq!(m.query()["error-desc"], "disk full");
    }

    #[test]
    fn settings_and_uris() {
        let mut m = Migration::default();
        assert_eq!(
            m.effective_method(),
            Method::Stop,
            "no background-snapshot: QEMU's stop"
        );
        m.set_capabilities(&[("background-snapshot".into(), true)])
            .unwrap();
        assert_eq!(m.effective_method(), Method::Wp);
        // postcopy-ram is accepted (live migration is always post-copy) and shown.
        m.set_capabilities(&[("postcopy-ram".into(), true)])
            .unwrap();
        let caps = m.query_capabilities();
        assert!(caps
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["capability"] == "postcopy-ram" && c["state"] == true));
        assert!(m.set_capabilities(&[("multifd".into(), true)]).is_err());
        assert!(m.set_capabilities(&[("no-such".into(), false)]).is_err());
        let mut p = serde_json::Map::new();
        p.insert("x-snapshot-method".into(), json!("stop"));
        m.set_parameters(&p).unwrap();
        assert_eq!(m.effective_method(), Method::Stop);
        p.insert("x-snapshot-method".into(), json!("teleport"));
        assert!(m.set_parameters(&p).is_err());
        assert_eq!(m.effective_method(), Method::Stop, "all or nothing");
        // The write-protect method and its pool (at least one 2 MiB chunk).
        let mut p = serde_json::Map::new();
        p.insert("x-snapshot-method".into(), json!("uffd"));
        p.insert("x-wp-pool-size".into(), json!(1 << 20));
        assert!(m.set_parameters(&p).is_err());
        assert_eq!(m.effective_method(), Method::Stop, "all or nothing");
        p.insert("x-wp-pool-size".into(), json!(16 << 20));
        m.set_parameters(&p).unwrap();
        assert_eq!(m.effective_method(), Method::Wp);
        assert_eq!(m.query_parameters()["x-wp-pool-size"], 16 << 20);
        assert_eq!(m.query_parameters()["x-snapshot-method"], "uffd");
        // What the pool may grow to (never below the pool) and the stall limit.
        assert_eq!(m.query_parameters()["x-wp-pool-max-size"], 1u64 << 40);
        assert_eq!(m.query_parameters()["x-wp-pool-keep-free-percent"], 15);
        assert_eq!(m.query_parameters()["x-wp-stall-limit-ms"], 500);
        let mut p = serde_json::Map::new();
        p.insert("x-wp-pool-max-size".into(), json!(4 << 20));
        p.insert("x-wp-stall-limit-ms".into(), json!(0));
        assert!(m.set_parameters(&p).is_err(), "a zero stall limit");
        assert_eq!(
            m.query_parameters()["x-wp-pool-max-size"],
            1u64 << 40,
            "all or nothing"
        );
        p.insert("x-wp-stall-limit-ms".into(), json!(250));
        p.insert("x-wp-pool-keep-free-percent".into(), json!(101));
        assert!(m.set_parameters(&p).is_err(), "more than all of memory");
        p.insert("x-wp-pool-keep-free-percent".into(), json!(40));
        m.set_parameters(&p).unwrap();
        let o = m.wp_options();
        assert_eq!((o.pool_bytes, o.pool_max_bytes), (16 << 20, 16 << 20));
        assert_eq!(o.stall_limit, Duration::from_millis(250));
        assert_eq!(o.pool_keep_free_percent, 40);
        assert_eq!(m.query_parameters()["x-wp-pool-max-size"], 16 << 20);
        assert_eq!(parse_uri("file:/x").unwrap(), PathBuf::from("/x"));
        assert!(parse_uri("tcp:1.2.3.4:5").is_err());
        assert!(parse_uri("file:/x,offset=4").is_err());
        assert!(parse_uri("file:").is_err());
    }
}
