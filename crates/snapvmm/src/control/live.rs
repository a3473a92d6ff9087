//! Live migration on the controller thread (`livesnap::postcopy` does the
//! work): the source's cut, switch, pause, recovery and end; the target's
//! switch, pause, recovery and end.
//!
//! Source: `migrate unix:/tcp:/fd:` without background-snapshot. The
//! connection is made with the guest running; the cut pauses the guest for
//! good (the same pause window as every snapshot) and the device state goes
//! first. Until the target says it runs the guest, a broken connection
//! gives the guest back here (status `failed`, the VM runs on); after it,
//! this VM keeps all its RAM until the target has every page, and refuses
//! `cont` and `quit`.

use std::sync::Arc;
use std::time::Instant;

use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicU64, Ordering};

use livesnap::postcopy::{PostcopySender, SourceEvent, TargetEvent};
use livesnap::precopy::{Precopy, PrecopyEvent, WriteLog};
use qmp::{CommandError, RunState};
use serde_json::json;

use super::event::AppEvent;
use super::Controller;
use crate::snapshot::cut::{cut, Capture, Outcome};
use crate::snapshot::migrate::{self as migration, Status};
use crate::snapshot::transport::{self, Uri};

/// A pre-copy pass gives up once the chunks it sent and the guest wrote
/// again reach RAM / PRECOPY_BUDGET: about 1/8 of RAM is sent twice, and a
/// guest whose working set is smaller than that still gets a whole pass.
const PRECOPY_BUDGET: u64 = 8;

/// The connection a live migration's cut goes on with.
enum Conn {
    /// Nothing sent yet (no pre-copy).
    Fresh(OwnedFd),
    /// After a pre-copy pass.
    Pre(Precopy),
}

impl Controller {
    /// `migrate URI` without background-snapshot over a socket: a live migration.
    pub(super) fn migrate_live(&mut self, uri: &Uri) -> Result<(), CommandError> {
        let t0 = self.begin_job(&[RunState::Running, RunState::Paused], "migrate")?;
        if let Some(j) = self.migration.job.as_mut() {
            j.method = migration::Method::Postcopy;
        }
        // Connected with the guest running: a target that is not there
        // fails the job before any pause.
        let sock = match transport::connect_socket(uri) {
            Ok(s) => s,
            Err(e) => return Err(self.fail_migration(format!("cannot connect: {e}"))),
        };
        if let Some(j) = self.migration.job.as_mut() {
            j.setup_time = t0.elapsed();
        }
        if !self.migration.precopy {
            return self.cut_live(Conn::Fresh(sock));
        }
        // The pass needs the write-protect engine's record of written chunks.
        let engine = match self.wp_registration() {
            Ok(e) => e,
            Err(why) => {
                tracing::info!("live migration without pre-copy: {why}");
                return self.cut_live(Conn::Fresh(sock));
            }
        };
        if let Err(e) = engine.mark() {
            tracing::warn!("live migration without pre-copy: {e}");
            return self.cut_live(Conn::Fresh(sock));
        }
        let ranges = migration::ram_ranges(&self.machine);
        let ram: u64 = ranges.iter().map(|r| r.len()).sum();
        static PASSES: AtomicU64 = AtomicU64::new(1);
        let id = PASSES.fetch_add(1, Ordering::Relaxed);
        let tx = std::sync::Mutex::new(self.tx.clone());
        let events = Box::new(move |e: PrecopyEvent| {
            let tx = tx.lock().unwrap_or_else(|p| p.into_inner());
            let _ = tx.send(AppEvent::Precopy(id, e));
        });
        let log: Arc<dyn WriteLog> = engine;
        // SAFETY: the machine, whose RAM this is, outlives the pass: it is
        // dropped with the job, before the machine (`end_captures`). The
        // guest writing meanwhile is what the pass expects.
        let pass = unsafe { Precopy::start(sock, &ranges, log, ram / PRECOPY_BUDGET, events) };
        let pass = match pass {
            Ok(p) => p,
            Err(e) => return Err(self.fail_migration(e.to_string())),
        };
        let job = self.migration.job.as_mut().expect("job just created");
        job.precopy_figures = Some(migration::PrecopyFigures {
            counters: pass.counters(),
            chunks: pass.progress().1,
            end: None,
            took: None,
        });
        job.precopy = Some(pass);
        job.precopy_id = id;
        let _ = self.migration.set_status(Status::Active, &self.events);
        Ok(())
    }

    /// The pre-copy pass reports: over, so cut; or its connection failed
    /// (the guest never stopped: the job fails, the VM runs on).
    pub(super) fn precopy_event(&mut self, id: u64, e: PrecopyEvent) {
        let Some(job) = self.migration.job.as_mut() else {
            return;
        };
        // Cancelled or ended meanwhile (perhaps another pass runs now):
        // nothing to do.
        if job.precopy_id != id {
            return;
        }
        let Some(pass) = job.precopy.take() else {
            return;
        };
        let took = job.started_elapsed().saturating_sub(job.setup_time);
        match e {
            PrecopyEvent::Ready(end) => {
                if let Some(f) = job.precopy_figures.as_mut() {
                    f.end = Some(end);
                    f.took = Some(took);
                }
                tracing::info!(
                    ended = end.name(),
                    ms = took.as_millis() as u64,
                    "live migration: pre-copy pass over"
                );
                // A failed cut has failed the job and said why.
                let _ = self.cut_live(Conn::Pre(pass));
            }
            PrecopyEvent::Failed(why) => {
                drop(pass);
                job.total_time = Some(job.started_elapsed());
                tracing::warn!("live migration failed during pre-copy: {why}; the VM runs on here");
                let _ = self.migration.fail(why, &self.events);
            }
        }
    }

    /// The cut of a live migration: pause for good, save the state, hand
    /// RAM to the post-copy sender.
    fn cut_live(&mut self, conn: Conn) -> Result<(), CommandError> {
        let paused_at = Instant::now();
        let c = match cut(&mut self.machine, Capture::Stop, |_| Ok(())) {
            Ok(c) => c,
            Err(e) => return Err(self.fail_migration(e.to_string())),
        };
        let Outcome::Stopped { state } = c.outcome else {
            unreachable!("a stop cut keeps the guest paused");
        };
        // The pages KVM touches when the target loads the state go with it.
        let early = state.pv_area_addresses();
        let state = state.to_bytes();
        tracing::debug!(
            us = paused_at.elapsed().as_micros() as u64,
            bytes = state.len(),
            "live migration: state serialized"
        );
        let tx = self.tx.clone();
        let tx = std::sync::Mutex::new(tx);
        let events = Box::new(move |e: SourceEvent| {
            let tx = tx.lock().unwrap_or_else(|p| p.into_inner());
            let _ = tx.send(AppEvent::PostcopySource(e));
        });
        let ranges = migration::ram_ranges(&self.machine);
        let sender = match conn {
            // SAFETY: the guest is paused for good from here (`cont` is
            // refused while the migration lives, see
            // `Migration::migrated_away`) and the machine, whose RAM this
            // is, outlives the sender: it is dropped with the job, before
            // the machine (`end_captures`).
            Conn::Fresh(sock) => unsafe {
                PostcopySender::start(sock, &ranges, state, &early, events)
            },
            // SAFETY: as above; the pass's record is final, the guest paused.
            Conn::Pre(pass) => pass.finish().and_then(|done| unsafe {
                PostcopySender::after_precopy(done, &ranges, state, &early, events)
            }),
        };
        let sender = match sender {
            Ok(s) => s,
            Err(e) => {
                if c.was_running {
                    self.machine.resume();
                }
                return Err(self.fail_migration(e.to_string()));
            }
        };
        if c.was_running {
            self.set_status(RunState::FinishMigrate);
        }
        let job = self.migration.job.as_mut().expect("a live migration's job");
        job.vcpu_pause = c.times.vcpu_pause;
        job.io_drain = c.times.io_drain;
        job.state_time = c.times.state;
        job.paused_at = Some(paused_at);
        job.resume_after = c.was_running;
        job.postcopy = Some(sender);
        if job.status() == Status::Setup {
            let _ = self.migration.set_status(Status::Active, &self.events);
        }
        Ok(())
    }

    /// What the source's migration threads report.
    pub(super) fn postcopy_source_event(&mut self, e: SourceEvent) {
        let Some(job) = self.migration.job.as_mut() else {
            return;
        };
        match e {
            SourceEvent::Switched => {
                // The guest runs on the target from now on.
                job.downtime = job.paused_at.map(|t| t.elapsed()).unwrap_or_default();
                tracing::info!(
                    downtime_us = job.downtime.as_micros() as u64,
                    "live migration: the guest runs on the target"
                );
                let _ = self
                    .migration
                    .set_status(Status::PostcopyActive, &self.events);
            }
            SourceEvent::Failed(why) => {
                // Before the switch: the target never ran the guest; it runs here again.
                let resume = job.resume_after;
                job.postcopy = None;
                job.total_time = Some(job.started_elapsed());
                tracing::warn!(
                    "live migration failed before the switch: {why}; the VM runs on here"
                );
                let _ = self.migration.fail(why, &self.events);
                if resume {
                    self.machine.resume();
                    self.set_status(RunState::Running);
                }
            }
            SourceEvent::Paused(why) => {
                tracing::warn!(
                    "live migration paused: {why}; waiting for migrate with resume=true"
                );
                job.paused_why = Some(why);
                let _ = self
                    .migration
                    .set_status(Status::PostcopyPaused, &self.events);
            }
            SourceEvent::Completed => {
                job.total_time = Some(job.started_elapsed());
                job.paused_why = None;
                // The run state first: a client that sees `completed` and
                // asks query-status at once must read `postmigrate`.
                self.set_status(RunState::Postmigrate);
                let _ = self.migration.set_status(Status::Completed, &self.events);
            }
        }
        if self.quit_after_migration && !self.migration.active() {
            tracing::info!("the live migration ended: quitting as asked");
            self.exit = Some(0);
        } else if self.quit_after_migration && self.postcopy_paused() {
            self.quit_giving_up();
        }
    }

    /// `quit` of a source whose live migration is paused: nothing ends it
    /// by itself, so the process ends now, saying what is lost.
    fn quit_giving_up(&mut self) {
        tracing::warn!(
            "quit: the live migration is paused (the target is gone or cut off); the guest RAM the target still lacks is given up with this process: the guest there cannot go on, and it does not run here"
        );
        self.emit(
            "SHUTDOWN",
            Some(json!({"guest": false, "reason": "host-qmp-quit"})),
        );
        self.exit = Some(0);
    }

    /// `quit` while the target still needs this VM's RAM: the process ends
    /// once the migration does (SIGTERM still ends it at once), or at once
    /// when the migration is paused (see [`Self::quit_giving_up`]).
    pub(super) fn quit_needs_to_wait(&mut self) -> bool {
        if self.migration.migrated_away() && self.postcopy_paused() {
            self.quit_after_migration = true;
            self.quit_giving_up();
            return true;
        }
        let needed = self.migration.active() && self.migration.migrated_away();
        if needed {
            tracing::warn!(
                "quit: the target still needs this VM's RAM; snapvmm exits when the live migration ends"
            );
            self.quit_after_migration = true;
        }
        needed
    }

    fn postcopy_paused(&self) -> bool {
        self.migration
            .job
            .as_ref()
            .is_some_and(|j| j.status() == Status::PostcopyPaused)
    }

    /// `migrate {"uri", "resume": true}`: a paused live migration carries on.
    pub(super) fn migrate_resume(&mut self, uri: &str) -> Result<(), CommandError> {
        let uri = Uri::parse(uri).map_err(CommandError::generic)?;
        if !self.postcopy_paused() {
            return Err(CommandError::generic(
                "migrate with resume=true needs a paused post-copy migration",
            ));
        }
        let sock = transport::connect_socket(&uri)
            .map_err(|e| CommandError::generic(format!("cannot connect: {e}")))?;
        let job = self.migration.job.as_mut().expect("checked above");
        let sender = job
            .postcopy
            .as_ref()
            .expect("a paused migration has its sender");
        sender
            .resume(sock)
            .map_err(|e| CommandError::generic(e.to_string()))?;
        job.paused_why = None;
        let _ = self
            .migration
            .set_status(Status::PostcopyRecover, &self.events);
        let _ = self
            .migration
            .set_status(Status::PostcopyActive, &self.events);
        Ok(())
    }

    /// `migrate_cancel` of a live migration: before the switch the guest
    /// runs here again; after it, the target runs it and needs this RAM.
    /// Returns false when the job is not a live migration.
    pub(super) fn cancel_live(&mut self) -> Result<bool, CommandError> {
        let active = self.migration.active();
        let Some(job) = self.migration.job.as_mut() else {
            return Ok(false);
        };
        if job.method != migration::Method::Postcopy || !active {
            return Ok(false);
        }
        // During the pre-copy pass the guest never stopped: the connection
        // closes, and that is all.
        if let Some(pass) = job.precopy.take() {
            drop(pass);
            job.total_time = Some(job.started_elapsed());
            let _ = self.migration.set_status(Status::Cancelling, &self.events);
            let _ = self.migration.set_status(Status::Cancelled, &self.events);
            return Ok(true);
        }
        // Decided under the sender's lock: the target may have just run the guest.
        let cancelled = job.status() == Status::Active
            && job.postcopy.as_ref().is_some_and(PostcopySender::cancel);
        if !cancelled {
            return Err(CommandError::generic(
                "the guest runs on the target now: a post-copy migration cannot be cancelled",
            ));
        }
        job.postcopy = None;
        let resume = job.resume_after;
        job.total_time = Some(job.started_elapsed());
        let _ = self.migration.set_status(Status::Cancelling, &self.events);
        let _ = self.migration.set_status(Status::Cancelled, &self.events);
        if resume {
            self.machine.resume();
            self.set_status(RunState::Running);
        }
        Ok(true)
    }

    /// `migrate-pause`: break a post-copy migration's connection (either side).
    pub(super) fn migrate_pause(&mut self) -> Result<(), CommandError> {
        let postcopy = self
            .migration
            .job
            .as_ref()
            .is_some_and(|j| j.status() == Status::PostcopyActive);
        let broke = postcopy
            && match (
                self.migration
                    .job
                    .as_ref()
                    .and_then(|j| j.postcopy.as_ref()),
                &self.migration.postcopy_in,
            ) {
                (Some(s), _) => s.break_connection(),
                (None, Some(p)) => p.break_connection(),
                (None, None) => false,
            };
        if broke {
            Ok(())
        } else {
            Err(CommandError::generic(
                "migrate-pause is only supported by postcopy migration",
            ))
        }
    }

    /// `migrate-start-postcopy`: ends the pre-copy pass now (the cut and
    /// the switch to post-copy follow); after it, only checks a live
    /// migration was started (it may even have ended already).
    pub(super) fn start_postcopy(&self) -> Result<(), CommandError> {
        if let Some(pass) = self.migration.job.as_ref().and_then(|j| j.precopy.as_ref()) {
            pass.switch_now();
            return Ok(());
        }
        if self.migration.migrated_away() {
            Ok(())
        } else {
            Err(CommandError::generic(
                "Postcopy must be started after migration has been started",
            ))
        }
    }

    /// Target: the guest runs here; tell the source (before the vCPUs run).
    pub(super) fn postcopy_switch(&mut self) -> Result<(), String> {
        let Some(p) = self.migration.postcopy_in.clone() else {
            return Ok(());
        };
        let tx = std::sync::Mutex::new(self.tx.clone());
        p.on_event(Box::new(move |e| {
            let tx = tx.lock().unwrap_or_else(|p| p.into_inner());
            let _ = tx.send(AppEvent::PostcopyTarget(e));
        }));
        p.running()
            .map_err(|e| format!("the source went away before the guest could run here: {e}"))?;
        let _ = self
            .migration
            .set_status(Status::PostcopyActive, &self.events);
        Ok(())
    }

    /// What the target's migration threads report.
    pub(super) fn postcopy_target_event(&mut self, e: TargetEvent) {
        match e {
            TargetEvent::Paused(why) => {
                tracing::warn!(
                    "live migration paused: {why}; the guest waits for its RAM (migrate-recover)"
                );
                if let Some(j) = self.migration.job.as_mut() {
                    j.paused_why = Some(why);
                }
                let _ = self
                    .migration
                    .set_status(Status::PostcopyPaused, &self.events);
            }
            TargetEvent::Recovered => {
                if let Some(j) = self.migration.job.as_mut() {
                    j.paused_why = None;
                }
                let _ = self
                    .migration
                    .set_status(Status::PostcopyActive, &self.events);
                // RAM was all here; the recovery only told the source.
                if self
                    .migration
                    .postcopy_in
                    .as_ref()
                    .is_some_and(|p| p.source_told())
                {
                    self.complete_incoming();
                }
            }
        }
    }

    /// Target: every page is here. Completed once the source knows (if the
    /// link is down, after a recovery).
    pub(super) fn postcopy_target_done(&mut self) {
        // Kept (for its figures) once done.
        if let Some(p) = self.migration.postcopy_in.clone() {
            if p.done() {
                self.complete_incoming();
            }
        }
    }

    fn complete_incoming(&mut self) {
        if let Some(j) = self.migration.job.as_mut() {
            if j.status() == Status::Completed {
                return;
            }
            j.total_time = Some(j.started_elapsed());
        }
        let _ = self.migration.set_status(Status::Completed, &self.events);
    }

    /// `migrate-recover URI` (target): listen for the source's resume.
    pub(super) fn migrate_recover(&mut self, uri: &str) -> Result<(), CommandError> {
        let uri = Uri::parse(uri).map_err(CommandError::generic)?;
        let pages = match self.migration.postcopy_in.clone() {
            Some(p) if self.postcopy_paused() => p,
            _ => {
                return Err(CommandError::generic(
                    "migrate-recover needs a paused incoming post-copy migration",
                ))
            }
        };
        let mut l =
            transport::Listening::bind(&uri).map_err(|e| CommandError::generic(e.to_string()))?;
        if let Some(j) = self.migration.job.as_mut() {
            j.listening = l.local_addr();
        }
        let _ = self
            .migration
            .set_status(Status::PostcopyRecover, &self.events);
        let tx = self.tx.clone();
        std::thread::Builder::new()
            .name("postcopy-recover".into())
            .spawn(move || recover(&mut l, &pages, &tx))
            .map_err(|e| CommandError::generic(e.to_string()))?;
        Ok(())
    }
}

/// Accepts connections until one is the source resuming this migration.
fn recover(
    l: &mut transport::Listening,
    pages: &Arc<livesnap::postcopy::RemotePages>,
    tx: &std::sync::mpsc::Sender<AppEvent>,
) {
    loop {
        let inc = match l.accept() {
            Ok(i) => i,
            Err(e) => {
                let _ = tx.send(AppEvent::PostcopyTarget(TargetEvent::Paused(format!(
                    "recovery listener failed: {e}"
                ))));
                return;
            }
        };
        let Some(sock) = inc.socket() else {
            let _ = tx.send(AppEvent::PostcopyTarget(TargetEvent::Paused(
                "recovery needs a connection both ways".into(),
            )));
            return;
        };
        match pages.recover(sock) {
            // `recover` reports Recovered itself.
            Ok(()) => return,
            Err(e) => tracing::warn!("{}: not a recovery of this migration: {e}", inc.peer),
        }
    }
}
