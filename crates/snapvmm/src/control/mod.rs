//! The controller: one thread that owns the machine and reacts, in order, to
//! everything that can change its state — guest power-off or reset, vCPU
//! failures, signals and QMP commands — and emits QMP events for each change.

use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use qmp::{CommandError, CpuInfo, EventBus, RunState};
use serde_json::{json, Value};
use signal_hook::consts::{SIGINT, SIGTERM};
use vmm::{Machine, MachineEvent};

mod bridge;
mod build;
mod event;
mod incoming;
mod live;
mod runstate;
mod snapjobs;
mod snapshot;

pub use event::AppEvent;
use runstate::RunStates;

use crate::cli::{RunConfig, SerialTarget};
use crate::disk::Disks;
use crate::snapshot::collapse::Collapse;
use crate::snapshot::migrate::{self as migration, Migration, Status};
use crate::snapshot::{Busy, Cmd, Op};
use bridge::Bridge;
pub(crate) use build::{build_from_state, GenId, StartRam};
use build::{build_machine, wait_incoming};
use livesnap::fill::Fill;
use livesnap::wp::WpEngine;

/// Boots the machine and runs it until it powers off; returns the exit status.
pub fn run(mut cfg: RunConfig) -> Result<u8> {
    // A tap passed with getfd comes later: the NICs open at migrate-incoming.
    if !crate::net::any_named(&cfg.net_specs) {
        cfg.nets = crate::net::open_all(&cfg.net_specs)?;
    }
    let (tx, rx) = mpsc::channel::<AppEvent>();
    let status = if cfg.incoming.is_some() || cfg.incoming_stream.is_some() || cfg.defer_incoming {
        RunState::Inmigrate
    } else {
        RunState::Prelaunch
    };
    let runstate = RunStates::new(status);
    let qmp_server = match &cfg.qmp {
        Some(addr) => {
            let bridge = Bridge {
                tx: Mutex::new(tx.clone()),
                runstate: runstate.clone(),
                name: cfg.name.clone(),
            };
            Some(
                qmp::Server::start(addr, Arc::new(bridge))
                    .context("cannot start the QMP server")?,
            )
        }
        None => None,
    };
    let events = qmp_server.as_ref().map(|s| s.events());
    spawn_signal_thread(tx.clone())?;
    if matches!(cfg.serial, SerialTarget::Stdio) {
        spawn_console_thread(tx.clone())?;
    }
    let mut migration = Migration::default();
    let mut incoming_reply = None;
    let (machine, disks) = if cfg.defer_incoming || cfg.incoming_stream.is_some() {
        match wait_incoming(&mut cfg, &tx, &rx, &mut migration, events.as_ref())? {
            Some((m, d, reply)) => {
                incoming_reply = reply;
                (m, d)
            }
            None => {
                migration.remove_listening_socket();
                drop(qmp_server);
                return Ok(0);
            }
        }
    } else {
        let (configs, disks) = crate::disk::open_all(&cfg.disks)?;
        (build_machine(&cfg, &tx, configs, &disks)?, disks)
    };
    let (machine, fill) = machine;
    // The VM clock goes on from a loaded snapshot's, as after snapshot-load.
    let vm_clock_base = cfg.loadvm.as_deref().map_or(0, |tag| {
        crate::snapshot::savevm::snapshot_clock(&disks, tag)
    });
    // A reset of a restored VM boots the kernel afresh (as QEMU reboots the firmware).
    let restored = cfg.incoming.take().is_some()
        | cfg.incoming_stream.take().is_some()
        | cfg.loadvm.take().is_some();
    if restored {
        cfg.mem_bytes = machine.ram().size();
        cfg.cpus = machine.cpus();
        // The transport too: the guest's drivers and the image's DSDT expect it.
        cfg.virtio_pci = Some(machine.bus().pci.is_some());
    }
    let mut c = Controller {
        cfg,
        tx,
        machine,
        runstate,
        events,
        migration,
        disks,
        wp_engine: None,
        fill,
        collapse: None,
        exit: None,
        jobs: crate::jobs::Jobs::default(),
        pending_save: None,
        vm_started: Instant::now(),
        vm_clock_base,
        fatal: None,
        quit_after_migration: false,
        restored_at: restored.then(Instant::now),
        reset_pending: false,
    };
    c.publish_cpus();
    // The guest is here now: a live migration's target tells the source
    // before its vCPUs run (the source gives it back only before this).
    if let Err(why) = c.postcopy_switch() {
        anyhow::bail!("{why}");
    }
    if c.cfg.start_paused {
        c.runstate.start(RunState::Paused);
    } else {
        c.machine.resume();
        c.runstate.start(RunState::Running);
        // As QEMU's target when an incoming migration starts the guest.
        if restored {
            c.emit("RESUME", None);
        }
    }
    // migrate-incoming returns once the VM is in its new state.
    if let Some(reply) = incoming_reply {
        let _ = reply.send(Ok(json!({})));
    }
    // The restore is done: fill the rest of RAM in the background.
    if let Some(f) = c.fill.as_mut() {
        f.go();
    }
    while c.exit.is_none() {
        let Ok(ev) = rx.recv() else { break };
        c.handle(ev)?;
        c.reset_when_idle();
    }
    tracing::debug!("ending the VM");
    c.migration.remove_listening_socket();
    c.stop_collapse();
    c.end_captures();
    let _ = c.machine.pause();
    // RAM goes with the machine: stop filling it first (the vCPUs are paused).
    c.fill = None;
    c.machine.flush_serial();
    if let Some(ev) = &c.events {
        ev.flush(Duration::from_millis(500));
    }
    drop(qmp_server);
    tracing::debug!("VM ended");
    if let Some(why) = c.fatal.take() {
        anyhow::bail!(why);
    }
    Ok(c.exit.unwrap_or(1))
}

pub(crate) struct Controller {
    pub(crate) cfg: RunConfig,
    pub(crate) tx: mpsc::Sender<AppEvent>,
    pub(crate) machine: Machine,
    /// The run state QMP sees; changed only by `set_status`.
    pub(crate) runstate: RunStates,
    events: Option<EventBus>,
    pub(crate) migration: Migration,
    /// The disks, by id, for snapshot operations (the devices hold them too).
    pub(crate) disks: Disks,
    /// Guest RAM's userfaultfd for write-protect captures, keyed by the RAM's
    /// first host address (a rebuilt machine registers again).
    pub(crate) wp_engine: Option<(usize, Arc<WpEngine>)>,
    /// A restore's RAM fill still under way (after `machine`: dropped once
    /// the vCPUs are gone).
    pub(crate) fill: Option<Fill>,
    collapse: Option<Collapse>,
    exit: Option<u8>,
    /// Internal-snapshot jobs (snapjobs.rs).
    pub(crate) jobs: crate::jobs::Jobs,
    pub(crate) pending_save: Option<snapjobs::PendingSave>,
    /// When the current machine started (its virtual clock for snapshots).
    pub(crate) vm_started: Instant,
    /// The virtual clock when the current machine started (a loaded snapshot's).
    pub(crate) vm_clock_base: u64,
    /// Why the VM ended abnormally (reported once everything is cleaned up).
    fatal: Option<String>,
    /// `quit` came while a live migration still needed this VM's RAM.
    quit_after_migration: bool,
    /// When this VM was restored (from an image, a stream, a live migration
    /// or `--loadvm`), if it was.
    restored_at: Option<Instant>,
    /// The guest reset itself while a snapshot ran: its vCPUs wait, and it
    /// reboots when the snapshot ends (see `reset_when_idle`).
    reset_pending: bool,
}

/// A guest that triple-faults this soon after its restore makes the restore
/// a failure (see `handle`).
const RESTORE_GRACE: Duration = Duration::from_secs(2);

impl Controller {
    fn handle(&mut self, ev: AppEvent) -> Result<()> {
        match ev {
            AppEvent::Machine(MachineEvent::PowerOff(code)) => {
                self.guest_shutdown(code as u8, "guest-shutdown")
            }
            AppEvent::Machine(MachineEvent::GuestReset) => self.guest_reset(),
            AppEvent::Machine(MachineEvent::GuestShutdown(id)) => {
                // A lazily restored guest whose image was truncated under it crashes
                // this way on PVM hosts: that is snapvmm's failure, not the guest's.
                if let Some(why) = self.machine.ram().backing_damaged() {
                    self.machine.flush_serial();
                    self.fail_fatally(format!("vCPU {id} stopped: {why}"));
                    return Ok(());
                }
                // Right after a restore, a triple fault means the image did
                // not hold a machine that runs: a failed restore, not a reset.
                let at = self.migration.last_restore.as_ref().map(|r| r.at);
                if let Some(since) = at.or(self.restored_at).map(|t| t.elapsed()) {
                    if since < RESTORE_GRACE {
                        self.machine.flush_serial();
                        self.fail_fatally(format!(
                            "the restore failed: vCPU {id} triple-faulted {} ms after it (the image does not hold a machine that can run: damaged or crafted?)",
                            since.as_millis()
                        ));
                        return Ok(());
                    }
                }
                // A triple fault: the guest crashed rather than asked; say so.
                tracing::warn!("vCPU {id} triple-faulted (KVM shutdown exit): the guest is reset");
                self.guest_reset()
            }
            AppEvent::Machine(MachineEvent::VcpuFailed(id, why)) => {
                // End through the normal exit path, which also ends captures.
                self.machine.flush_serial();
                self.set_status(RunState::InternalError);
                let hint = if self.machine.ram().file_backed() && why.contains("Bad address") {
                    " (guest RAM is mapped from the snapshot image: was it truncated or changed under the VM?)"
                } else {
                    ""
                };
                self.fatal = Some(format!("vCPU {id} failed: {why}{hint}"));
                self.exit = Some(1);
            }
            AppEvent::Signal(sig) => {
                tracing::info!(signal = sig, "shutting down on signal");
                self.emit(
                    "SHUTDOWN",
                    Some(json!({"guest": false, "reason": "host-signal"})),
                );
                self.exit = Some(0);
            }
            AppEvent::Qmp(qmp::Request::SaveVm(tag), reply) => {
                // Replies when the save ends (see save_done).
                self.hmp_savevm(&tag, reply);
            }
            AppEvent::Qmp(req, reply) => {
                use qmp::Request::*;
                let r = match req {
                    LoadVm(tag) => self.hmp_loadvm(&tag).map(|_| json!({})),
                    DelVm(tag) => self.hmp_delvm(&tag).map(|_| json!({})),
                    ListSnapshots => self.list_snapshots().map(|l| json!(l)),
                    req => self.qmp(req),
                };
                let _ = reply.send(r);
            }
            AppEvent::ConsoleInput(bytes, took) => {
                let _ = took.send(self.machine.serial_input(&bytes));
            }
            AppEvent::CaptureDone => self.capture_done(),
            AppEvent::StopCopyDone(r) => self.stop_copy_done(r),
            AppEvent::SaveVmDone => {
                self.save_done();
                self.dismiss_hmp_jobs();
            }
            AppEvent::FillDone(r) => self.fill_done(r),
            // Only before the machine exists (wait_incoming) is one expected.
            AppEvent::Incoming(_) => {}
            AppEvent::Precopy(id, e) => self.precopy_event(id, e),
            AppEvent::PostcopySource(e) => self.postcopy_source_event(e),
            AppEvent::PostcopyTarget(e) => self.postcopy_target_event(e),
            AppEvent::CollapseDone(st, took) => {
                tracing::info!(
                    collapsed = st.collapsed,
                    skipped = st.skipped,
                    ms = took.as_millis() as u64,
                    "huge pages rebuilt"
                );
                self.migration.last_collapse = Some((st, took));
                // Reap the thread if this message is its own (a stopped one was joined already).
                if self.collapse.as_ref().is_some_and(Collapse::is_finished) {
                    self.stop_collapse();
                }
            }
        }
        Ok(())
    }

    /// A new migration job, once the VM is in one of `states` (else "cannot
    /// `verb` a VM in state ..."), its RAM complete and no huge-page rebuild
    /// competes; when it started.
    fn begin_job(
        &mut self,
        states: &[RunState],
        verb: &str,
        method: migration::Method,
    ) -> Result<Instant, CommandError> {
        if !states.contains(&self.status()) {
            return Err(CommandError::generic(format!(
                "cannot {verb} a VM in state '{}'",
                self.status()
            )));
        }
        self.ram_complete().map_err(CommandError::generic)?;
        // A huge-page rebuild still running would only slow the capture: end it.
        self.stop_collapse();
        let t0 = Instant::now();
        self.migration
            .new_job(
                self.machine.ram().size(),
                migration::Engine::new(method),
                &self.events,
            )
            .map_err(|e| CommandError::generic(e.to_string()))?;
        Ok(t0)
    }

    fn fail_migration(&mut self, why: String) -> CommandError {
        self.migration.fail(why, &self.events)
    }

    fn fill_done(&mut self, r: Result<livesnap::fill::FillStats, String>) {
        if self.fill.is_none() {
            // Its machine was replaced (reset, load) before this arrived.
            return;
        }
        match r {
            Ok(st) => {
                tracing::info!(
                    ms = st.elapsed.as_secs_f64() * 1e3,
                    faults = st.faults,
                    by_fault = st.chunks_by_fault,
                    by_prefetch = st.chunks_by_prefetch,
                    "guest RAM restored"
                );
                self.migration.last_fill = Some(st);
                self.postcopy_target_done();
                // The fill leaves 4 KiB-mapped RAM. Only the fork capture
                // needs huge pages (it copies page tables); rebuilding them
                // takes the guest's memory away 2 MiB at a time for seconds
                // (measured: a migrated guest at 2 % of its speed meanwhile).
                if self.migration.collapse && self.migration.method == migration::Method::Fork {
                    self.start_collapse();
                }
            }
            Err(why) => {
                self.machine.flush_serial();
                self.fail_fatally(format!("cannot restore guest RAM: {why}"));
            }
        }
    }

    /// Before a snapshot of a restored VM: RAM must be complete (a fork would
    /// give the capture holes; write-protect needs the fill's registration
    /// gone). Waits for the fill, which runs at disk speed.
    pub(crate) fn ram_complete(&mut self) -> Result<(), String> {
        let Some(fill) = &mut self.fill else {
            return Ok(());
        };
        if !fill.is_finished() {
            tracing::info!("waiting for the restore of guest RAM to finish before the snapshot");
        }
        fill.wait()
            .map(|_| ())
            .map_err(|e| format!("guest RAM could not be restored: {e}"))
    }

    /// Rebuilds the huge pages the capture's copy-on-write faults split, in the
    /// background, so the next fork is as cheap as the first.
    pub(crate) fn start_collapse(&mut self) {
        self.stop_collapse();
        let tx = self.tx.clone();
        let done = move |st, took| {
            let _ = tx.send(AppEvent::CollapseDone(st, took));
        };
        match Collapse::start(self.machine.ram().spans(), done) {
            Ok(c) => self.collapse = Some(c),
            Err(e) => tracing::warn!("cannot start the huge-page rebuild: {e}"),
        }
    }

    /// The machine cannot go on (its replacement failed): end the process
    /// through the normal exit path, reporting `why`.
    pub(crate) fn fail_fatally(&mut self, why: String) {
        // Not logged here: the exit path prints it once, as `snapvmm: error: ...`.
        self.set_status(RunState::InternalError);
        self.fatal = Some(why);
        self.exit = Some(1);
    }

    /// Exit with a capture still running: cancel it, so that no temp file
    /// stays behind and a pending savevm leaves its disks as they were.
    fn end_captures(&mut self) {
        // A live migration's senders read guest RAM: they go first.
        if let Some(l) = self
            .migration
            .job
            .as_mut()
            .and_then(|j| j.engine.live_mut())
        {
            drop(l.precopy.take());
            if let Some(p) = l.sender.take() {
                p.stop();
            }
        }
        let captured = (self.migration.job.as_mut()).and_then(|j| j.engine.captured_mut());
        if let Some(c) = captured.and_then(|c| c.capture.take()) {
            c.cancel();
            let _ = c.wait();
        }
        // A stop-and-copy reads guest RAM directly: let it finish first.
        let stop = (self.migration.job.as_mut()).and_then(|j| match &mut j.engine {
            migration::Engine::Stop { thread, .. } => thread.take(),
            _ => None,
        });
        if let Some(t) = stop {
            let _ = t.join();
        }
        if let Some(p) = self.pending_save.as_mut() {
            if let Some(c) = &p.capture {
                c.cancel();
            }
            self.save_done();
        }
    }

    /// Ends a running huge-page rebuild (before a fork, a reset or exit).
    pub(crate) fn stop_collapse(&mut self) {
        if let Some(c) = self.collapse.take() {
            c.stop();
        }
    }

    /// The snapshot operation under way.
    pub(crate) fn op(&self) -> Op {
        if self.pending_save.is_some() {
            Op::SaveVm
        } else if self.migration.active_stop_copy() {
            Op::StopCopy
        } else if self.migration.active() {
            Op::Migrate
        } else {
            Op::Idle
        }
    }

    /// Whether `cmd` may run now ([`crate::snapshot::check`]).
    pub(crate) fn check(&self, cmd: Cmd) -> Result<(), Busy> {
        crate::snapshot::check(self.op(), cmd)
    }

    fn qmp(&mut self, req: qmp::Request) -> Result<Value, CommandError> {
        use qmp::Request::*;
        match req {
            Stop => {
                if self.runstate.is_running() {
                    self.pause()?;
                    self.set_status(RunState::Paused);
                }
            }
            Cont => {
                if self.migration.migrated_away() {
                    return Err(CommandError::generic(
                        "the VM was migrated: its guest runs on the target now",
                    ));
                }
                // A fork capture does not need the guest stopped; a stop-and-copy does.
                self.check(Cmd::Cont)?;
                if self.status() == RunState::Shutdown {
                    return Err(CommandError::generic(
                        "Resetting the Virtual Machine is required",
                    ));
                }
                if !self.runstate.is_running() {
                    self.machine.resume();
                    self.set_status(RunState::Running);
                }
            }
            SystemReset => {
                self.check(Cmd::SystemReset)?;
                self.reset(false, "host-qmp-system-reset")
                    .map_err(|e| CommandError::generic(crate::describe(&e)))?
            }
            QueryVmGenerationId => {
                if !self.cfg.vmgenid {
                    return Err(CommandError::generic(
                        "this VM has no generation ID device (--vmgenid off)",
                    ));
                }
                let id = self
                    .machine
                    .vmgenid()
                    .map_err(|e| CommandError::generic(e.to_string()))?;
                return Ok(json!({ "guid": guid_string(&id) }));
            }
            SystemPowerdown => {
                // The ACPI power button: a guest with ACPI shuts down (S5 through the
                // sleep control register ends the VM); one without ignores it, as in QEMU.
                self.machine
                    .press_power_button()
                    .map_err(|e| CommandError::generic(e.to_string()))?;
                self.emit("POWERDOWN", None);
            }
            Migrate(uri) => self.migrate(&uri)?,
            MigrateResume(uri) => self.migrate_resume(&uri)?,
            MigrateRecover(uri) => self.migrate_recover(&uri)?,
            MigrateStartPostcopy => self.start_postcopy()?,
            MigratePause => self.migrate_pause()?,
            SnapshotSave(job) => self.snapshot_save(job, None)?,
            SnapshotLoad(job) => self.snapshot_load(job)?,
            SnapshotDelete(job) => self.snapshot_delete(job)?,
            QueryJobs => return Ok(self.jobs.query()),
            JobDismiss(id) => {
                let ev = self.jobs.dismiss(&id)?;
                self.emit("JOB_STATUS_CHANGE", Some(ev));
            }
            JobCancel(id) => self.job_cancel(&id)?,
            SaveVm(_) | LoadVm(_) | DelVm(_) | ListSnapshots => {
                unreachable!("handled in handle()")
            }
            MigrateIncoming(_) => {
                return Err(CommandError::generic(
                    "migrate-incoming needs snapvmm to be started with --incoming defer",
                ))
            }
            MigrateCancel => {
                if self.cancel_live()? {
                    return Ok(json!({}));
                }
                let job = self.migration.job.as_ref();
                if let Some(c) = job.and_then(|j| j.engine.capture()) {
                    c.cancel();
                    // A second cancel while cancelling changes nothing.
                    if job.is_some_and(|j| j.status() != Status::Cancelling) {
                        let _ = self.migration.set_status(Status::Cancelling, &self.events);
                    }
                }
            }
            QueryMigrate => return Ok(self.migration.query()),
            MigrateSetCapabilities(caps) => {
                self.check(Cmd::MigrateSetCapabilities)?;
                self.migration.set_capabilities(&caps)?
            }
            QueryMigrateCapabilities => return Ok(self.migration.query_capabilities()),
            MigrateSetParameters(p) => {
                self.check(Cmd::MigrateSetParameters)?;
                self.migration.set_parameters(&p)?;
                if !self.migration.wp_keep_pool {
                    if let Some((_, engine)) = &self.wp_engine {
                        engine.release_pool();
                    }
                }
            }
            QueryMigrateParameters => return Ok(self.migration.query_parameters()),
            r @ JobFinalize(_) => return Err(r.unsupported()),
            Quit => {
                if self.quit_needs_to_wait() {
                    return Ok(json!({}));
                }
                self.emit(
                    "SHUTDOWN",
                    Some(json!({"guest": false, "reason": "host-qmp-quit"})),
                );
                self.exit = Some(0);
            }
        }
        Ok(json!({}))
    }

    fn pause(&mut self) -> Result<Duration, CommandError> {
        self.machine
            .pause()
            .map_err(|e| CommandError::generic(e.to_string()))
    }

    /// The guest powered off or reset itself: the VM ends (as QEMU's -no-reboot),
    /// or with --no-shutdown stays in the shutdown state until `quit`.
    fn guest_shutdown(&mut self, code: u8, reason: &str) {
        tracing::debug!(reason, "the guest ends the VM");
        let _ = self.machine.pause();
        self.machine.flush_serial();
        self.set_status(RunState::Shutdown);
        self.emit("SHUTDOWN", Some(json!({"guest": true, "reason": reason})));
        if !self.cfg.no_shutdown {
            self.exit = Some(code);
        } else if self.events.is_some() {
            self.emit("STOP", None);
        }
    }

    /// The guest reset itself (ACPI reset, i8042, triple fault): it reboots in
    /// place (`RESET`), or ends the VM with `--no-reboot` (`SHUTDOWN`), as
    /// QEMU. During a snapshot the reboot waits for it to end, the vCPUs
    /// paused: the snapshot holds the guest as of its cut, and the old RAM
    /// stays until the capture has read it.
    fn guest_reset(&mut self) {
        if self.cfg.no_reboot {
            return self.guest_shutdown(0, "guest-reset");
        }
        if self.op() != crate::snapshot::Op::Idle {
            tracing::info!(
                "the guest reset itself during a snapshot: it reboots when the snapshot ends"
            );
            let _ = self.machine.pause();
            self.reset_pending = true;
            return;
        }
        let _ = self.reset(true, "guest-reset");
    }

    /// A reboot that waited for a snapshot, once none runs. A live migration
    /// that completed took the guest (and its reset) to the target.
    fn reset_when_idle(&mut self) {
        if !self.reset_pending || self.op() != crate::snapshot::Op::Idle {
            return;
        }
        self.reset_pending = false;
        if self.status() == RunState::Postmigrate {
            return;
        }
        let _ = self.reset(true, "guest-reset");
    }

    /// A reset rebuilds the machine from its configuration: fresh RAM, the kernel
    /// loaded again, every vCPU at its boot state.
    fn reset(&mut self, guest: bool, reason: &str) -> Result<()> {
        let was_running = matches!(self.status(), RunState::Running | RunState::Shutdown);
        self.stop_collapse();
        let _ = self.machine.pause();
        self.machine.flush_serial();
        // The disks move to the new machine.
        let built = self
            .machine
            .take_disks()
            .map_err(anyhow::Error::from)
            .and_then(|configs| build_machine(&self.cfg, &self.tx, configs, &self.disks));
        // A new machine has new RAM: register it again for write-protect captures.
        self.wp_engine = None;
        self.machine = match built {
            Ok((m, fill)) => {
                self.fill = fill;
                m
            }
            Err(e) => {
                // The old machine is gone: end the VM rather than pretend it runs.
                self.fail_fatally(format!("reset failed: {}", crate::describe(&e)));
                return Err(e);
            }
        };
        self.publish_cpus();
        self.emit("RESET", Some(json!({"guest": guest, "reason": reason})));
        self.run_or_pause(was_running);
        Ok(())
    }

    /// After the machine was rebuilt: running again if it ran before.
    pub(crate) fn run_or_pause(&mut self, running: bool) {
        if running {
            self.machine.resume();
            self.set_status(RunState::Running);
        } else {
            self.set_status(RunState::Paused);
        }
    }

    pub(crate) fn status(&self) -> RunState {
        self.runstate.get()
    }

    /// Changes the run state; `STOP`/`RESUME` are emitted by the transition.
    pub(crate) fn set_status(&self, s: RunState) {
        let _ = self.runstate.set(s, &self.events);
    }

    pub(crate) fn publish_cpus(&self) {
        let cpus = self
            .machine
            .vcpus()
            .iter()
            .map(|v| CpuInfo::x86_64(i64::from(v.id), i64::from(v.tid)))
            .collect();
        self.runstate.set_cpus(cpus);
    }

    pub(crate) fn emit(&self, name: &str, data: Option<Value>) {
        if let Some(ev) = &self.events {
            ev.emit(name, data);
        }
    }
}

/// With `--serial stdio`, what is typed on stdin goes to the guest's console
/// (line by line when stdin is a terminal: it is not put in raw mode). The UART
/// holds 64 bytes; the rest waits here until the guest has read them.
fn spawn_console_thread(tx: mpsc::Sender<AppEvent>) -> Result<()> {
    std::thread::Builder::new()
        .name("console".into())
        .spawn(move || {
            use std::io::Read;
            let mut buf = [0u8; 256];
            let mut stdin = std::io::stdin().lock();
            loop {
                let n = match stdin.read(&mut buf) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                let mut off = 0;
                while off < n {
                    let (took_tx, took_rx) = mpsc::channel();
                    if tx
                        .send(AppEvent::ConsoleInput(buf[off..n].to_vec(), took_tx))
                        .is_err()
                    {
                        return;
                    }
                    let Ok(took) = took_rx.recv() else { return };
                    off += took;
                    if took == 0 {
                        std::thread::sleep(Duration::from_millis(5));
                    }
                }
            }
        })?;
    Ok(())
}

fn spawn_signal_thread(tx: mpsc::Sender<AppEvent>) -> Result<()> {
    let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM])
        .context("cannot install signal handlers")?;
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            for s in signals.forever() {
                if tx.send(AppEvent::Signal(s)).is_err() {
                    break;
                }
            }
        })?;
    Ok(())
}

/// A generation ID's 16 bytes (as the guest reads them, in order) in the
/// usual GUID text form.
fn guid_string(id: &[u8; 16]) -> String {
    let h: Vec<String> = id.iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        h[0..4].concat(),
        h[4..6].concat(),
        h[6..8].concat(),
        h[8..10].concat(),
        h[10..16].concat()
    )
}
