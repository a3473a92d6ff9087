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
use crate::snapshot::live;
use crate::snapshot::migrate::{self as migration, Status};
use crate::snapshot::transport::{self, Uri};

/// The connection a live migration's cut goes on with.
enum Conn {
    /// Nothing sent yet (no pre-copy).
    Fresh(OwnedFd),
    /// After a pre-copy pass.
    Pre(Precopy),
}

/// The controller as [`live::LiveSource`]: its VM and migration job, and
/// the connection (or pass) a call of the policy goes on with.
struct Source<'a> {
    c: &'a mut Controller,
    conn: Option<Conn>,
    /// The write-protect engine that marked RAM for a pass.
    engine: Option<Arc<livesnap::wp::WpEngine>>,
}

impl Source<'_> {
    /// The live migration's own parts of the job.
    fn live(&mut self) -> &mut migration::LiveSource {
        self.job()
            .engine
            .live_mut()
            .expect("a live migration's job runs the live engine")
    }

    fn job(&mut self) -> &mut migration::Job {
        self.c
            .migration
            .job
            .as_mut()
            .expect("a live migration's job")
    }
}

impl live::LiveSource for Source<'_> {
    fn status(&self) -> Option<Status> {
        self.c.migration.job.as_ref().map(|j| j.status())
    }

    fn set_status(&mut self, to: Status) {
        let _ = self.c.migration.set_status(to, &self.c.events);
    }

    fn fail(&mut self, why: String) -> CommandError {
        self.c.fail_migration(why)
    }

    fn ram_bytes(&self) -> u64 {
        migration::ram_ranges(&self.c.machine)
            .iter()
            .map(|r| r.len())
            .sum()
    }

    fn mark_for_pass(&mut self) -> Result<(), String> {
        let engine = self.c.wp_registration()?;
        engine.mark().map_err(|e| e.to_string())?;
        self.engine = Some(engine);
        Ok(())
    }

    fn start_pass(&mut self, budget: u64) -> Result<(), String> {
        let Some(Conn::Fresh(sock)) = self.conn.take() else {
            return Err("no connection for the pre-copy pass".into());
        };
        let log: Arc<dyn WriteLog> = self
            .engine
            .take()
            .ok_or("the pass has no record of writes")?;
        let ranges = migration::ram_ranges(&self.c.machine);
        static PASSES: AtomicU64 = AtomicU64::new(1);
        let id = PASSES.fetch_add(1, Ordering::Relaxed);
        let tx = std::sync::Mutex::new(self.c.tx.clone());
        let events = Box::new(move |e: PrecopyEvent| {
            let tx = tx.lock().unwrap_or_else(|p| p.into_inner());
            let _ = tx.send(AppEvent::Precopy(id, e));
        });
        // SAFETY: the machine, whose RAM this is, outlives the pass: it is
        // dropped with the job, before the machine (`end_captures`). The
        // guest writing meanwhile is what the pass expects.
        let pass = unsafe { Precopy::start(sock, &ranges, log, budget, events) }
            .map_err(|e| e.to_string())?;
        let live = self.live();
        live.precopy_figures = Some(migration::PrecopyFigures {
            counters: pass.counters(),
            chunks: pass.progress().1,
            end: None,
            took: None,
        });
        live.precopy = Some(pass);
        live.precopy_id = id;
        Ok(())
    }

    fn pass_running(&self) -> bool {
        self.c
            .migration
            .job
            .as_ref()
            .and_then(|j| j.engine.live())
            .is_some_and(|l| l.precopy.is_some())
    }

    fn end_pass(&mut self) {
        drop(self.live().precopy.take());
    }

    fn cut_and_send(&mut self) -> Result<bool, (String, bool)> {
        let conn = self
            .conn
            .take()
            .ok_or(("no connection to the target".to_string(), false))?;
        let paused_at = Instant::now();
        let c = cut(&mut self.c.machine, Capture::Stop, |_| Ok(()))
            .map_err(|e| (e.to_string(), false))?;
        let Outcome::Stopped { state } = c.outcome else {
            unreachable!("a stop cut keeps the guest paused");
        };
        // The pages KVM touches when the target loads the state go with it,
        // and those the vCPUs go through first when they run there.
        let mut early = state.pv_area_addresses();
        early.extend(state.pages_touched_first(self.c.machine.ram().memory()));
        early.sort_unstable();
        early.dedup();
        let state = state.to_bytes();
        tracing::debug!(
            us = paused_at.elapsed().as_micros() as u64,
            bytes = state.len(),
            "live migration: state serialized"
        );
        let tx = std::sync::Mutex::new(self.c.tx.clone());
        let events = Box::new(move |e: SourceEvent| {
            let tx = tx.lock().unwrap_or_else(|p| p.into_inner());
            let _ = tx.send(AppEvent::PostcopySource(e));
        });
        let ranges = migration::ram_ranges(&self.c.machine);
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
        }
        .map_err(|e| (e.to_string(), c.was_running))?;
        let job = self.job();
        job.vcpu_pause = c.times.vcpu_pause;
        job.io_drain = c.times.io_drain;
        job.state_time = c.times.state;
        job.resume_after = c.was_running;
        let live = self.live();
        live.paused_at = Some(paused_at);
        live.sender = Some(sender);
        Ok(c.was_running)
    }

    fn cancel_sender(&mut self) -> bool {
        // Decided under the sender's lock: the target may have just run the guest.
        self.live()
            .sender
            .as_ref()
            .is_some_and(PostcopySender::cancel)
    }

    fn drop_sender(&mut self) {
        self.live().sender = None;
    }

    fn guest_ran(&self) -> bool {
        self.c
            .migration
            .job
            .as_ref()
            .is_some_and(|j| j.resume_after)
    }

    fn resume_guest(&mut self) {
        self.c.machine.resume();
        self.c.set_status(RunState::Running);
    }

    fn set_run_state(&mut self, s: RunState) {
        self.c.set_status(s);
    }

    fn note_switch(&mut self) {
        let job = self.job();
        job.downtime = (job.engine.live().and_then(|l| l.paused_at))
            .map(|t| t.elapsed())
            .unwrap_or_default();
        tracing::info!(
            downtime_us = job.downtime.as_micros() as u64,
            "live migration: the guest runs on the target"
        );
    }

    fn note_end(&mut self) {
        let job = self.job();
        job.total_time = Some(job.started_elapsed());
    }

    fn note_paused(&mut self, why: Option<String>) {
        self.job().engine.set_paused_why(why);
    }
}

impl Controller {
    fn source(&mut self, conn: Option<Conn>) -> Source<'_> {
        Source {
            c: self,
            conn,
            engine: None,
        }
    }

    /// `migrate URI` without background-snapshot over a socket: a live migration.
    pub(super) fn migrate_live(&mut self, uri: &Uri) -> Result<(), CommandError> {
        let t0 = self.begin_job(
            &[RunState::Running, RunState::Paused],
            "migrate",
            migration::Method::Live,
        )?;
        // Connected with the guest running: a target that is not there
        // fails the job before any pause.
        let sock = match transport::connect_socket(uri) {
            Ok(s) => s,
            Err(e) => return Err(self.fail_migration(format!("cannot connect: {e}"))),
        };
        if let Some(j) = self.migration.job.as_mut() {
            j.setup_time = t0.elapsed();
        }
        let precopy = self.migration.precopy;
        live::start(&mut self.source(Some(Conn::Fresh(sock))), precopy)
    }

    /// The pre-copy pass reports: over, so cut; or its connection failed
    /// (the guest never stopped: the job fails, the VM runs on).
    pub(super) fn precopy_event(&mut self, id: u64, e: PrecopyEvent) {
        let Some(job) = self.migration.job.as_mut() else {
            return;
        };
        // Cancelled or ended meanwhile (perhaps another pass runs now):
        // nothing to do.
        let took = job.started_elapsed().saturating_sub(job.setup_time);
        let Some(live) = job.engine.live_mut() else {
            return;
        };
        if live.precopy_id != id {
            return;
        }
        let Some(pass) = live.precopy.take() else {
            return;
        };
        match e {
            PrecopyEvent::Ready(end) => {
                if let Some(f) = live.precopy_figures.as_mut() {
                    f.end = Some(end);
                    f.took = Some(took);
                }
                tracing::info!(
                    ended = end.name(),
                    ms = took.as_millis() as u64,
                    "live migration: pre-copy pass over"
                );
                live::pass_over(&mut self.source(Some(Conn::Pre(pass))));
            }
            PrecopyEvent::Failed(why) => {
                drop(pass);
                live::pass_failed(&mut self.source(None), why);
            }
        }
    }

    /// What the source's migration threads report.
    pub(super) fn postcopy_source_event(&mut self, e: SourceEvent) {
        // A late event of a sender whose job ended (another may run now).
        if (self.migration.job.as_ref())
            .and_then(|j| j.engine.live())
            .is_none()
        {
            return;
        }
        live::sender_event(&mut self.source(None), e);
        if !self.quit_after_migration {
            return;
        }
        match self.on_quit() {
            live::OnQuit::Now => {
                tracing::info!("the live migration ended: quitting as asked");
                self.exit = Some(0);
            }
            live::OnQuit::GiveUp => self.quit_giving_up(),
            live::OnQuit::Wait => {}
        }
    }

    fn on_quit(&self) -> live::OnQuit {
        let status = self.migration.job.as_ref().map(|j| j.status());
        live::on_quit(
            status,
            self.migration.migrated_away(),
            self.migration.active(),
        )
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
        match self.on_quit() {
            live::OnQuit::Now => false,
            live::OnQuit::GiveUp => {
                self.quit_after_migration = true;
                self.quit_giving_up();
                true
            }
            live::OnQuit::Wait => {
                tracing::warn!(
                    "quit: the target still needs this VM's RAM; snapvmm exits when the live migration ends"
                );
                self.quit_after_migration = true;
                true
            }
        }
    }

    /// `migrate {"uri", "resume": true}`: a paused live migration carries on.
    pub(super) fn migrate_resume(&mut self, uri: &str) -> Result<(), CommandError> {
        let uri = Uri::parse(uri).map_err(CommandError::generic)?;
        live::resume(&mut self.source(None), |s| {
            let sock =
                transport::connect_socket(&uri).map_err(|e| format!("cannot connect: {e}"))?;
            let sender = (s.job().engine.live())
                .and_then(|l| l.sender.as_ref())
                .ok_or("the migration has no sender")?;
            sender.resume(sock).map_err(|e| e.to_string())
        })
    }

    /// `migrate_cancel` of a live migration (`live::cancel`). Returns false
    /// when the job is not an active live migration.
    pub(super) fn cancel_live(&mut self) -> Result<bool, CommandError> {
        let active = self.migration.active();
        let live = self
            .migration
            .job
            .as_ref()
            .is_some_and(|j| j.engine.method() == Some(migration::Method::Live));
        if !live || !active {
            return Ok(false);
        }
        live::cancel(&mut self.source(None)).map(|()| true)
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
                    .and_then(|j| j.engine.live()?.sender.as_ref()),
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
        if let Some(pass) = self
            .migration
            .job
            .as_ref()
            .and_then(|j| j.engine.live()?.precopy.as_ref())
        {
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
        let Some(pages) = self.migration.postcopy_in.clone() else {
            return Ok(());
        };
        live::target_switch(&mut Target::new(self, pages))
    }

    /// What the target's migration threads report.
    pub(super) fn postcopy_target_event(&mut self, e: TargetEvent) {
        if let Some(pages) = self.migration.postcopy_in.clone() {
            live::target_event(&mut Target::new(self, pages), e);
        }
    }

    /// Target: every page may be here.
    pub(super) fn postcopy_target_done(&mut self) {
        // Kept (for its figures) once done.
        if let Some(pages) = self.migration.postcopy_in.clone() {
            live::target_done(&mut Target::new(self, pages));
        }
    }

    /// `migrate-recover URI` (target): listen for the source's resume.
    pub(super) fn migrate_recover(&mut self, uri: &str) -> Result<(), CommandError> {
        let uri = Uri::parse(uri).map_err(CommandError::generic)?;
        let Some(pages) = self.migration.postcopy_in.clone() else {
            return Err(CommandError::generic(
                "migrate-recover needs a paused incoming post-copy migration",
            ));
        };
        let mut t = Target::new(self, pages);
        t.recover_at = Some(uri);
        live::target_recover(&mut t)
    }
}

/// The controller as [`live::LiveTarget`]: its job and the pages coming
/// from the source.
struct Target<'a> {
    c: &'a mut Controller,
    pages: Arc<livesnap::postcopy::RemotePages>,
    /// Where `migrate-recover` listens.
    recover_at: Option<Uri>,
}

impl<'a> Target<'a> {
    fn new(c: &'a mut Controller, pages: Arc<livesnap::postcopy::RemotePages>) -> Target<'a> {
        Target {
            c,
            pages,
            recover_at: None,
        }
    }
}

impl live::LiveTarget for Target<'_> {
    fn status(&self) -> Option<Status> {
        self.c.migration.job.as_ref().map(|j| j.status())
    }

    fn set_status(&mut self, to: Status) {
        let _ = self.c.migration.set_status(to, &self.c.events);
    }

    fn tell_running(&mut self) -> Result<(), String> {
        let tx = std::sync::Mutex::new(self.c.tx.clone());
        self.pages.on_event(Box::new(move |e| {
            let tx = tx.lock().unwrap_or_else(|p| p.into_inner());
            let _ = tx.send(AppEvent::PostcopyTarget(e));
        }));
        self.pages.running().map_err(|e| e.to_string())
    }

    fn note_paused(&mut self, why: Option<String>) {
        if let Some(j) = self.c.migration.job.as_mut() {
            j.engine.set_paused_why(why);
        }
    }

    fn note_end(&mut self) {
        if let Some(j) = self.c.migration.job.as_mut() {
            j.total_time = Some(j.started_elapsed());
        }
    }

    fn all_here(&self) -> bool {
        self.pages.done()
    }

    fn source_told(&self) -> bool {
        self.pages.source_told()
    }

    fn listen_for_recovery(&mut self) -> Result<(), String> {
        let uri = self.recover_at.take().ok_or("no address to listen on")?;
        let mut l = transport::Listening::bind(&uri).map_err(|e| e.to_string())?;
        if let Some(j) = self.c.migration.job.as_mut() {
            j.engine.set_listening(l.local_addr());
        }
        let (pages, tx) = (self.pages.clone(), self.c.tx.clone());
        std::thread::Builder::new()
            .name("postcopy-recover".into())
            .spawn(move || recover(&mut l, &pages, &tx))
            .map(|_| ())
            .map_err(|e| e.to_string())
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
