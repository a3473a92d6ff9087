//! The snapshot job (`migrate` to a file or a stream): choosing its
//! capture, the cut, and the end of its capture or stop-and-copy.

use std::sync::Arc;
use std::time::Instant;

use qmp::{CommandError, RunState};

use super::{AppEvent, Controller};
use crate::snapshot::cut::{cut, Capture, Outcome};
use crate::snapshot::migrate::{self as migration, Status};
use crate::snapshot::Cmd;
use livesnap::wp::WpEngine;

impl Controller {
    /// `migrate URI`: see migration.rs for the methods, transport.rs for the
    /// URIs, live.rs for live migration.
    pub(super) fn migrate(&mut self, uri: &str) -> Result<(), CommandError> {
        self.check(Cmd::Migrate)?;
        let uri = crate::snapshot::transport::Uri::parse(uri).map_err(CommandError::generic)?;
        if !self.migration.background_snapshot && crate::snapshot::transport::is_connection(&uri) {
            return self.migrate_live(&uri);
        }
        if uri.is_stream() && self.migration.parent.is_some() {
            return Err(CommandError::generic(
                "an incremental snapshot can only be written to a file: set x-parent to \"\" to stream a full one",
            ));
        }
        let effective = self.migration.effective_method();
        let t0 = self.begin_job(
            &[RunState::Running, RunState::Paused, RunState::Postmigrate],
            "snapshot",
            effective,
        )?;
        // Everything that can be done with the guest running is done here:
        // an unusable destination fails now, without pausing the guest.
        // The write-protect capture may fall back to fork (still in setup).
        let method = self.capture_method();
        let parent = self.migration.parent.clone();
        if let Some(j) = self.migration.job.as_mut() {
            if method != effective {
                j.engine = migration::Engine::new(method);
            }
            if let migration::Engine::Wp { parent: p, .. } = &mut j.engine {
                *p = parent;
            }
        }
        // A stream connects (or starts its command) now: a peer that is not
        // there fails the job before the guest is paused.
        let mut dest = match migration::Dest::open(&uri, &self.machine) {
            Ok(d) => Some(d),
            Err(e) => return Err(self.fail_migration(e)),
        };
        let capture = match method {
            migration::Method::Fork => {
                let tx = self.tx.clone();
                let done = move || {
                    let _ = tx.send(AppEvent::CaptureDone);
                };
                match migration::prepare_fork(&self.machine, dest.take().expect("opened"), done) {
                    Ok(p) => Capture::Fork(p),
                    Err(e) => return Err(self.fail_migration(e.to_string())),
                }
            }
            migration::Method::Wp => {
                let engine = match self.wp_engine_for_capture() {
                    Ok(u) => u,
                    Err(e) => return Err(self.fail_migration(e)),
                };
                let tx = self.tx.clone();
                let done = move || {
                    let _ = tx.send(AppEvent::CaptureDone);
                };
                let opts = self.migration.wp_options();
                let parent = self.migration.parent.clone();
                let d = dest.take().expect("opened");
                match migration::prepare_wp(&engine, d, parent.as_deref(), opts, done) {
                    Ok(p) => Capture::Wp(p),
                    Err(e) => return Err(self.fail_migration(e.to_string())),
                }
            }
            migration::Method::Stop => Capture::Stop,
            migration::Method::Live => unreachable!("a live migration is migrate_live's"),
        };
        let setup_time = t0.elapsed();
        let c = match cut(&mut self.machine, capture, |_| Ok(())) {
            Ok(c) => c,
            Err(e) => return Err(self.fail_migration(e.to_string())),
        };
        let job = self.migration.job.as_mut().expect("job just created");
        job.setup_time = setup_time;
        job.vcpu_pause = c.times.vcpu_pause;
        job.io_drain = c.times.io_drain;
        job.state_time = c.times.state;
        job.downtime = c.times.downtime;
        job.capture_start = c.times.start;
        match c.outcome {
            Outcome::Stopped { state } => {
                // Stop-and-copy: the guest stays stopped; no hurry.
                let t = Instant::now();
                let state = state.to_bytes();
                job.state_time += t.elapsed();
                job.resume_after = job.resume_after && c.was_running;
                job.was_running = c.was_running;
                if c.was_running {
                    self.set_status(RunState::Paused);
                }
                let _ = self.migration.set_status(Status::Active, &self.events);
                let tx = self.tx.clone();
                let done = move |r| {
                    let _ = tx.send(AppEvent::StopCopyDone(r));
                };
                let dest = dest.take().expect("a stop-and-copy keeps its destination");
                let t = migration::start_stop_copy(&self.machine, state, dest, done);
                if let Some(migration::Engine::Stop { thread, .. }) =
                    self.migration.job.as_mut().map(|j| &mut j.engine)
                {
                    *thread = Some(t);
                }
            }
            Outcome::Running {
                capture,
                sender,
                state,
                wp,
            } => {
                match &mut job.engine {
                    migration::Engine::Fork(run) => run.capture = Some(capture),
                    migration::Engine::Wp { run, counters, .. } => {
                        run.capture = Some(capture);
                        *counters = wp;
                    }
                    _ => unreachable!("a running capture is a fork or write-protect job's"),
                }
                // Serialized with the guest running again.
                match state {
                    Ok(s) => sender.send(s.to_bytes()),
                    Err(e) => sender.fail(format!("cannot save machine state: {e}")),
                }
                tracing::debug!(
                    downtime_us = c.times.downtime.as_micros() as u64,
                    "live snapshot started"
                );
                let _ = self.migration.set_status(Status::Active, &self.events);
            }
        }
        Ok(())
    }

    pub(super) fn capture_done(&mut self) {
        let Some(job) = self.migration.job.as_mut() else {
            return;
        };
        let Some(capture) = job.engine.captured_mut().and_then(|c| c.capture.take()) else {
            return;
        };
        let status = capture.status();
        let result = capture.wait();
        job.total_time = Some(job.started_elapsed());
        let end = match (status, result) {
            (_, Ok(stats)) => {
                if let Some(c) = job.engine.captured_mut() {
                    c.stats = Some(stats);
                }
                Status::Completed
            }
            (livesnap::CaptureStatus::Cancelled, _) => Status::Cancelled,
            (_, Err(e)) => {
                job.error = Some(e.to_string());
                Status::Failed
            }
        };
        let forked = job.engine.method() == Some(migration::Method::Fork);
        let _ = self.migration.set_status(end, &self.events);
        // Only a fork splits huge pages (its copy-on-write faults).
        if self.migration.collapse && forked {
            self.start_collapse();
        }
    }

    /// A restore's RAM fill ended: RAM is ordinary memory now (rebuild its
    /// huge pages), or it can never be complete (end the VM: a vCPU touching
    /// what is missing would wait for ever).
    pub(super) fn stop_copy_done(
        &mut self,
        r: Result<livesnap::CaptureStats, livesnap::SnapError>,
    ) {
        let Some(job) = self.migration.job.as_mut() else {
            return;
        };
        if let migration::Engine::Stop { thread, .. } = &mut job.engine {
            if let Some(t) = thread.take() {
                let _ = t.join();
            }
        }
        let total = job.started_elapsed();
        job.total_time = Some(total);
        let end = match r {
            Ok(s) => {
                if let migration::Engine::Stop { stats, .. } = &mut job.engine {
                    *stats = Some(s);
                }
                Status::Completed
            }
            Err(e) => {
                job.error = Some(e.to_string());
                Status::Failed
            }
        };
        // A failed one resumes a guest that ran, as QEMU resumes the source.
        let resume = job.resume_after || (end == Status::Failed && job.was_running);
        if resume {
            job.downtime = total;
            self.machine.resume();
            self.set_status(RunState::Running);
        } else if end == Status::Completed {
            job.downtime = total;
            self.set_status(RunState::Postmigrate);
        } else {
            // A failed stop-and-copy of a paused VM leaves it paused.
            job.downtime = total;
        }
        let _ = self.migration.set_status(end, &self.events);
    }

    /// The capture method of the next snapshot: the one set, except that
    /// the default (`uffd`) falls back to `fork` where it cannot work (RAM
    /// mapped from an image, a kernel without userfaultfd write-protect).
    pub(crate) fn capture_method(&mut self) -> migration::Method {
        let m = self.migration.effective_method();
        if m != migration::Method::Wp || self.migration.method_set {
            return m;
        }
        match self.wp_registration() {
            Ok(_) => m,
            Err(why) => {
                tracing::info!("snapshots use the fork capture here: {why}");
                migration::Method::Fork
            }
        }
    }

    /// The write-protect engine of this machine's RAM (built on first use,
    /// again after the machine was rebuilt): it lives as long as the
    /// machine, recording changed chunks between captures.
    pub(crate) fn wp_registration(&mut self) -> Result<Arc<WpEngine>, String> {
        let ram = self.machine.ram();
        let key = ram.regions().first().map_or(0, |r| r.host as usize);
        if let Some((k, u)) = &self.wp_engine {
            if *k == key && u.is_alive() {
                return Ok(u.clone());
            }
        }
        // Another machine's, or one whose fault handler stopped: its
        // registration must go before RAM is registered again.
        self.wp_engine = None;
        if ram.file_backed() {
            return Err("x-snapshot-method 'uffd' needs anonymous guest RAM: this VM's RAM is mapped from its snapshot image (restore with --restore-mode uffd or copy)".into());
        }
        let ranges = crate::snapshot::migrate::ram_ranges(&self.machine);
        let engine = WpEngine::new(&ranges)
            .map_err(|e| format!("x-snapshot-method 'uffd' is not available here: {e}"))?;
        let engine = Arc::new(engine);
        self.wp_engine = Some((key, engine.clone()));
        Ok(engine)
    }

    /// The engine for a write-protect capture about to be prepared (the
    /// guest runs): with its pool made now rather than while the capture's
    /// faults wait (the first capture's; later ones find it kept, see
    /// x-wp-keep-pool). A live migration's pre-copy pass, which only marks
    /// written chunks, takes [`Controller::wp_registration`] and no pool.
    pub(crate) fn wp_engine_for_capture(&mut self) -> Result<Arc<WpEngine>, String> {
        let engine = self.wp_registration()?;
        if self.migration.wp_keep_pool {
            let t0 = std::time::Instant::now();
            let kept = livesnap::wp::prepare_pool(&engine, self.migration.wp_pool);
            tracing::debug!(
                mib = kept >> 20,
                ms = t0.elapsed().as_secs_f64() * 1e3,
                "write-protect pool ready before the capture"
            );
        }
        Ok(engine)
    }
}
