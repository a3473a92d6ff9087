//! The controller's internal-snapshot jobs: `snapshot-save` (live),
//! `snapshot-load`, `snapshot-delete`, their HMP forms (`savevm`, `loadvm`,
//! `delvm`, `info snapshots`) and `--loadvm`. See savevm.rs for the pipeline.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use qmp::{CommandError, RunState, SnapshotEntry, SnapshotJob};
use serde_json::{json, Value};

use super::bridge::Reply;
use super::{AppEvent, Controller};
use crate::jobs::{Kind, Status};
use crate::snapshot::cut::{cut, Capture, Cut, Outcome};
use crate::snapshot::savevm;
use crate::snapshot::{Cmd, SnapshotError};

/// A live save between the cut and the commit.
pub struct PendingSave {
    pub job_id: String,
    pub tag: String,
    pub vmstate: usize,
    /// Frozen disks other than the vmstate disk.
    pub frozen: Vec<(usize, qcow2::Frozen)>,
    /// The vmstate disk's frozen state, shared with the capture's sink.
    pub vm_frozen: Arc<Mutex<Option<qcow2::Frozen>>>,
    pub image_len: Arc<AtomicU64>,
    pub capture: Option<livesnap::Capture>,
    pub vm_clock_ns: u64,
    pub pause: Duration,
    pub started: Instant,
    /// HMP `savevm` waits for the end.
    pub waiter: Option<Reply>,
    /// Captured by a fork (its faults split huge pages: rebuild them after).
    pub forked: bool,
}

/// Figures of the latest save (query via `x-` fields of query-jobs).
#[derive(Debug, Clone, Copy, Default)]
pub struct SaveFigures {
    pub pause: Duration,
    pub total: Duration,
}

impl Controller {
    fn disk_ids(&self) -> Vec<String> {
        self.disks.ids()
    }

    fn is_qcow2(&self, i: usize) -> bool {
        self.disks.is_qcow2(i)
    }

    fn job_event(&self, data: Value) {
        if !crate::jobs::is_internal(&data) {
            self.emit("JOB_STATUS_CHANGE", Some(data));
        }
    }

    fn job_events(&self, evs: Vec<Value>) {
        for e in evs {
            self.job_event(e);
        }
    }

    fn fail_job(&mut self, id: &str, why: SnapshotError, waiter: Option<Reply>) {
        let why = why.to_string();
        tracing::warn!(job = id, "snapshot job failed: {why}");
        let evs = self.jobs.fail(id, why.clone());
        self.job_events(evs);
        if let Some(w) = waiter {
            let _ = w.send(Err(CommandError::generic(why)));
        }
    }

    /// Creates the job (created → running); an id in use is a command error.
    fn start_job(&mut self, id: &str, kind: Kind) -> Result<(), CommandError> {
        let ev = match id.strip_prefix(crate::jobs::INTERNAL) {
            Some(name) => self.jobs.create_internal(name, kind)?,
            None => self.jobs.create(id, kind)?,
        };
        self.job_event(ev);
        if let Some(ev) = self.jobs.set(id, Status::Running) {
            self.job_event(ev);
        }
        Ok(())
    }

    /// The job's disks and vmstate disk, and how many of the disks hold its tag.
    fn resolve_job(&self, job: &SnapshotJob) -> Result<(Vec<usize>, usize, usize), SnapshotError> {
        let ids = self.disk_ids();
        let vmstate = job.vmstate.as_deref().ok_or(SnapshotError::NoVmstateArg)?;
        let (devices, vm) =
            savevm::resolve(&ids, &job.devices, Some(vmstate), |i| self.is_qcow2(i))?;
        let holders = devices
            .iter()
            .filter(|&&i| {
                self.disks
                    .with_qcow2(i, |q| q.snapshots().iter().any(|s| s.name == job.tag))
                    == Some(true)
            })
            .count();
        Ok((devices, vm.expect("vmstate resolved"), holders))
    }

    /// `snapshot-save`: the cut happens here; the commit in [`Self::save_done`].
    pub fn snapshot_save(
        &mut self,
        job: SnapshotJob,
        waiter: Option<Reply>,
    ) -> Result<(), CommandError> {
        self.start_job(&job.job_id, Kind::Save)?;
        if let Err(why) = self.begin_save(&job, waiter.is_some()) {
            self.fail_job(&job.job_id, why, waiter);
            return Ok(());
        }
        if let Some(p) = self.pending_save.as_mut() {
            p.waiter = waiter;
        }
        Ok(())
    }

    fn begin_save(&mut self, job: &SnapshotJob, _hmp: bool) -> Result<(), SnapshotError> {
        self.check(Cmd::SnapshotSave)?;
        if !matches!(
            self.status(),
            RunState::Running | RunState::Paused | RunState::Postmigrate
        ) {
            return Err(SnapshotError::VmState(self.status()));
        }
        let ids = self.disk_ids();
        let (devices, vm, holders) = self.resolve_job(job)?;
        if holders > 0 {
            return Err(SnapshotError::Exists(job.tag.clone()));
        }
        self.ram_complete().map_err(SnapshotError::Rebuild)?;
        self.stop_collapse();
        // Prepared with the guest running: the capture's pipe and its sink.
        let vm_frozen = Arc::new(Mutex::new(None));
        let image_len = Arc::new(AtomicU64::new(0));
        let sink = savevm::VmStateSink {
            image: self
                .disks
                .get(vm)
                .and_then(|d| d.qcow2.clone())
                .expect("checked qcow2"),
            frozen: vm_frozen.clone(),
            image_len: image_len.clone(),
        };
        let tx = self.tx.clone();
        let on_done: livesnap::DoneCallback = Box::new(move |_| {
            let _ = tx.send(AppEvent::SaveVmDone);
        });
        let ranges = crate::snapshot::migrate::ram_ranges(&self.machine);
        // The capture method set for migrate applies here too when it is the
        // write-protect one (stop-and-copy is no live savevm: fork then).
        let forked = {
            use crate::snapshot::migrate::Method;
            // Stop-and-copy is no live savevm: the fork capture then.
            let m = if self.migration.method == Method::Stop {
                Method::Fork
            } else {
                self.migration.method
            };
            m != Method::Wp || self.capture_method() != Method::Wp
        };
        let capture = if forked {
            let opts = livesnap::ForkOptions {
                on_done: Some(on_done),
                ..livesnap::ForkOptions::default()
            };
            Capture::Fork(livesnap::prepare_fork_capture(
                &ranges,
                livesnap::Destination::Sink(Box::new(sink)),
                opts,
            )?)
        } else {
            let engine = self
                .wp_engine_for_capture()
                .map_err(SnapshotError::MethodUnavailable)?;
            let opts = livesnap::wp::WpOptions {
                on_done: Some(on_done),
                ..self.migration.wp_options()
            };
            Capture::Wp(livesnap::wp::prepare_wp_capture(
                &engine,
                livesnap::Destination::Sink(Box::new(sink)),
                opts,
            )?)
        };

        // The cut; the disks are frozen while the vCPU threads save their registers.
        let t_pause = Instant::now();
        let mut frozen = Vec::new();
        let disks = &self.disks;
        let freeze = |_: &vmm::Machine| {
            for &i in &devices {
                let r = disks
                    .with_qcow2(i, |q| q.freeze(&job.tag))
                    .expect("checked qcow2");
                match r {
                    Ok(f) if i == vm => {
                        *vm_frozen.lock().unwrap_or_else(|e| e.into_inner()) = Some(f);
                    }
                    Ok(f) => frozen.push((i, f)),
                    Err(e) => return Err(SnapshotError::disk(&ids[i], e).to_string()),
                }
            }
            Ok(())
        };
        let c = cut(&mut self.machine, capture, freeze);
        let pause = t_pause.elapsed();
        let capture = match c {
            Ok(Cut {
                outcome:
                    Outcome::Running {
                        capture,
                        sender,
                        state,
                        ..
                    },
                ..
            }) => {
                // Serialized with the guest running again; a failed state fails
                // the capture, and save_done aborts the frozen disks.
                match state {
                    Ok(state) => sender.send(state.to_bytes()),
                    Err(e) => sender.fail(format!("cannot save machine state: {e}")),
                }
                capture
            }
            Ok(Cut {
                outcome: Outcome::Stopped { .. },
                ..
            }) => unreachable!("a fork cut never stops"),
            Err(e) => {
                self.abort_frozen(frozen, &vm_frozen, vm);
                return Err(e.into());
            }
        };
        tracing::debug!(pause_us = pause.as_micros() as u64, "savevm cut");
        self.jobs
            .set_progress(&job.job_id, 0, self.machine.ram().size());
        self.pending_save = Some(PendingSave {
            job_id: job.job_id.clone(),
            tag: job.tag.clone(),
            vmstate: vm,
            frozen,
            vm_frozen,
            image_len,
            capture: Some(capture),
            vm_clock_ns: self.vm_clock_ns(),
            pause,
            started: t_pause,
            waiter: None,
            forked,
        });
        Ok(())
    }

    fn abort_frozen(
        &mut self,
        frozen: Vec<(usize, qcow2::Frozen)>,
        vm_frozen: &Mutex<Option<qcow2::Frozen>>,
        vm: usize,
    ) {
        for (i, f) in frozen {
            let _ = self.disks.with_qcow2(i, |q| q.abort_frozen(f));
        }
        if let Some(f) = vm_frozen.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = self.disks.with_qcow2(vm, |q| q.abort_frozen(f));
        }
        self.heal_disks();
    }

    /// A failed update (no space, I/O error) leaves a handle that must reload
    /// its metadata before the guest's disk works again.
    fn heal_disks(&self) {
        for i in 0..self.disks.len() {
            self.disks.with_qcow2(i, crate::disk::heal);
        }
    }

    /// The vmstate is written (or the capture failed): commit or abort.
    pub fn save_done(&mut self) {
        let Some(mut p) = self.pending_save.take() else {
            return;
        };
        let result = p
            .capture
            .take()
            .map(|c| c.wait())
            .unwrap_or_else(|| Err(livesnap::SnapError::Cancelled));
        let ids = self.disk_ids();
        if let Err(e) = result {
            self.abort_frozen(std::mem::take(&mut p.frozen), &p.vm_frozen, p.vmstate);
            self.fail_job(&p.job_id, e.into(), p.waiter.take());
            return;
        }
        let len = p.image_len.load(Ordering::SeqCst);
        let mut error = None;
        let vm_f = p.vm_frozen.lock().unwrap_or_else(|e| e.into_inner()).take();
        // A disk whose handle failed meanwhile (and was recovered) lost its
        // frozen state: then the snapshot cannot be complete on every disk.
        let lost = p
            .frozen
            .iter()
            .map(|(i, _)| *i)
            .chain(std::iter::once(p.vmstate))
            .find(|&i| self.disks.with_qcow2(i, |q| !q.is_frozen()).unwrap_or(true));
        if let Some(i) = lost {
            error = Some(SnapshotError::LostDuringSave(ids[i].clone()));
        }
        // Every other disk first, the vmstate disk last (only then is the
        // snapshot loadable); on a failure, the disks that already committed
        // drop the tag again, so no disk keeps a partial snapshot.
        let mut committed = Vec::new();
        for (i, f) in std::mem::take(&mut p.frozen) {
            let r = self.disks.with_qcow2(i, |q| {
                if error.is_some() {
                    q.abort_frozen(f).map(|_| false)
                } else {
                    q.commit_frozen(f, p.vm_clock_ns, 0).map(|_| true)
                }
            });
            match r {
                Some(Ok(true)) => committed.push(i),
                Some(Err(e)) => {
                    error.get_or_insert(SnapshotError::disk(&ids[i], e));
                }
                _ => {}
            }
        }
        if let Some(f) = vm_f {
            let r = self.disks.with_qcow2(p.vmstate, |q| {
                if error.is_some() {
                    q.abort_frozen(f).map(|_| ())
                } else {
                    q.commit_frozen(f, p.vm_clock_ns, len).map(|_| ())
                }
            });
            if let Some(Err(e)) = r {
                error.get_or_insert(SnapshotError::disk(&ids[p.vmstate], e));
            }
        }
        if error.is_some() {
            for i in committed {
                let _ = self.disks.with_qcow2(i, |q| q.delete_snapshot(&p.tag));
            }
        }
        self.heal_disks();
        let fig = savevm_figures(&p);
        self.jobs.set_extra(
            &p.job_id,
            json!({
                "x-pause-us": fig.pause.as_micros() as u64,
                "x-total-ms": fig.total.as_millis() as u64,
                "x-vmstate-bytes": len,
            }),
        );
        match error {
            Some(why) => self.fail_job(&p.job_id, why, p.waiter.take()),
            None => {
                let evs = self.jobs.succeed(&p.job_id);
                self.job_events(evs);
                if let Some(w) = p.waiter.take() {
                    let _ = w.send(Ok(json!({})));
                }
            }
        }
        if self.migration.collapse && p.forked {
            self.start_collapse();
        }
    }

    /// `snapshot-load`: the VM continues from the snapshot (disks reverted,
    /// RAM and devices loaded); it runs afterwards if it ran before.
    pub fn snapshot_load(&mut self, job: SnapshotJob) -> Result<(), CommandError> {
        self.start_job(&job.job_id, Kind::Load)?;
        match self.load(&job) {
            Ok(()) => {
                let evs = self.jobs.succeed(&job.job_id);
                self.job_events(evs);
            }
            Err(why) => self.fail_job(&job.job_id, why, None),
        }
        Ok(())
    }

    fn load(&mut self, job: &SnapshotJob) -> Result<(), SnapshotError> {
        self.check(Cmd::SnapshotLoad)?;
        let ids = self.disk_ids();
        let (devices, vm, holders) = self.resolve_job(job)?;
        if holders != devices.len() {
            return Err(SnapshotError::NotOnEveryDisk(job.tag.clone()));
        }
        // Everything that can fail is checked before the running VM is touched.
        let image = self.disks.get(vm).and_then(|d| d.qcow2.as_ref());
        let source = savevm::vmstate_source(image.expect("checked qcow2"), &job.tag)?;
        let (vmstate, state) = crate::snapshot::restore::open_source(source)?;
        let loaded_clock = self
            .disks
            .with_qcow2(vm, |q| {
                q.snapshots()
                    .iter()
                    .find(|s| s.name == job.tag)
                    .map_or(0, |s| s.vm_clock_nsec)
            })
            .unwrap_or(0);
        if state.virtio.len() != ids.len() {
            return Err(SnapshotError::DiskCount {
                had: state.virtio.len(),
                has: ids.len(),
            });
        }
        for (i, dev) in self.machine.bus().virtio.iter().enumerate() {
            let mut d = vmm::devices::lock(dev);
            let size = d.backend_mut().size();
            if state.virtio[i].capacity_bytes != size {
                return Err(SnapshotError::DiskCapacity {
                    dev: ids[i].clone(),
                    has: size,
                    had: state.virtio[i].capacity_bytes,
                });
            }
            if devices.contains(&i) && d.is_readonly() {
                return Err(SnapshotError::ReadOnly(ids[i].clone()));
            }
        }
        for &i in &devices {
            let fits = self.disks.with_qcow2(i, |q| {
                q.find_snapshot(&job.tag)
                    .is_some_and(|s| s.disk_size == q.size())
            });
            if fits != Some(true) {
                return Err(SnapshotError::DiskSize {
                    dev: ids[i].clone(),
                    tag: job.tag.clone(),
                });
            }
        }
        // Its RAM is read once now, with the guest running, so that nothing
        // the load reads fails after the point of no return below; then
        // the old RAM is given back before the new is read in (RAM + a
        // constant, not twice RAM).
        crate::snapshot::restore::verify_ram(&vmstate)?;
        let was_running = self.runstate.is_running();
        self.stop_collapse();
        let _ = self.machine.pause();
        self.set_status(RunState::RestoreVm);
        self.machine.flush_serial();
        // Past this point the old machine is gone; a failure (an I/O error
        // reverting a disk) ends the VM loudly instead of leaving it dead.
        let disks = self
            .machine
            .take_disks()
            .map_err(|e| SnapshotError::Rebuild(e.to_string()));
        let applied = disks.and_then(|disks| {
            devices.iter().try_for_each(|&i| {
                self.disks
                    .with_qcow2(i, |q| q.apply_snapshot(&job.tag))
                    .unwrap_or(Ok(()))
                    .map_err(|e| SnapshotError::disk(&ids[i], e))
            })?;
            Ok(disks)
        });
        // The old machine's RAM goes first: its fill and write-protect
        // registrations, then its pages.
        self.wp_engine = None;
        self.fill = None;
        let built = applied.and_then(|disks| {
            if let Err(e) = self.machine.ram().discard() {
                tracing::warn!("cannot give the old RAM back before the load: {e}");
            }
            let ram = crate::snapshot::restore::copy_ram_sparse(&vmstate, &state)
                .map_err(|e| SnapshotError::Rebuild(e.to_string()))?;
            super::build_from_state(
                &self.cfg,
                &self.tx,
                super::StartRam::Ram(ram),
                state,
                disks,
                super::GenId::New,
            )
            .map_err(|e| SnapshotError::Rebuild(crate::describe(&e)))
        });
        self.machine = match built {
            Ok(m) => m,
            Err(why) => {
                self.fail_fatally(format!("loading snapshot '{}' failed: {why}", job.tag));
                return Err(why);
            }
        };
        self.vm_started = Instant::now();
        self.vm_clock_base = loaded_clock;
        self.publish_cpus();
        self.run_or_pause(was_running);
        Ok(())
    }

    /// `snapshot-delete`: removes the tag from every listed disk that has it.
    pub fn snapshot_delete(&mut self, job: SnapshotJob) -> Result<(), CommandError> {
        self.start_job(&job.job_id, Kind::Delete)?;
        let r = self.delete(&job.tag, &job.devices);
        match r {
            Ok(()) => {
                let evs = self.jobs.succeed(&job.job_id);
                self.job_events(evs);
            }
            Err(why) => self.fail_job(&job.job_id, why, None),
        }
        Ok(())
    }

    fn delete(&mut self, tag: &str, devices: &[String]) -> Result<(), SnapshotError> {
        self.check(Cmd::SnapshotDelete)?;
        let ids = self.disk_ids();
        let (devices, _) = savevm::resolve(&ids, devices, None, |i| self.is_qcow2(i))?;
        let mut found = false;
        for &i in &devices {
            let r = self
                .disks
                .with_qcow2(i, |q| {
                    if q.snapshots().iter().any(|s| s.name == tag) {
                        q.delete_snapshot(tag).map(|_| true)
                    } else {
                        Ok(false)
                    }
                })
                .expect("checked qcow2");
            match r {
                Ok(f) => found |= f,
                Err(e) => {
                    self.disks.with_qcow2(i, crate::disk::heal);
                    return Err(SnapshotError::disk(&ids[i], e));
                }
            }
        }
        if !found {
            return Err(SnapshotError::NotFound(tag.to_string()));
        }
        Ok(())
    }

    /// Devices for the HMP forms: every qcow2 disk; the vmstate goes to the first.
    fn hmp_job(&self, tag: &str) -> Result<SnapshotJob, CommandError> {
        // As QEMU: read-only disks are not part of a VM snapshot.
        let ids: Vec<String> = self
            .disk_ids()
            .into_iter()
            .enumerate()
            .filter(|(i, _)| self.disks.get(*i).is_some_and(|d| !d.readonly))
            .map(|(_, id)| id)
            .collect();
        let index = |id: &str| self.disk_ids().iter().position(|d| d == id).unwrap_or(0);
        if let Some(id) = ids.iter().find(|id| !self.is_qcow2(index(id))) {
            return Err(CommandError::generic(format!(
                "Device '{id}' is writable but does not support snapshots"
            )));
        }
        let first = ids
            .first()
            .ok_or_else(|| CommandError::generic("No block device can accept snapshots"))?;
        Ok(SnapshotJob {
            job_id: format!("{}hmp-savevm", crate::jobs::INTERNAL),
            tag: tag.to_string(),
            vmstate: Some(first.clone()),
            devices: ids,
        })
    }

    /// HMP `savevm TAG`: replies when the save ends.
    pub fn hmp_savevm(&mut self, tag: &str, reply: Reply) {
        let job = match self.hmp_job(tag) {
            Ok(j) => j,
            Err(e) => {
                let _ = reply.send(Err(e));
                return;
            }
        };
        let id = job.job_id.clone();
        if let Err(e) = self.snapshot_save(job, Some(reply)) {
            tracing::warn!("savevm: {}", e.desc);
        }
        // HMP jobs dismiss themselves once concluded.
        if self.pending_save.as_ref().map(|p| p.job_id.as_str()) != Some(id.as_str()) {
            let _ = self.jobs.dismiss(&id);
        }
    }

    /// Dismisses concluded HMP jobs (they are internal).
    pub fn dismiss_hmp_jobs(&mut self) {
        self.jobs.dismiss_internal();
    }

    pub fn hmp_loadvm(&mut self, tag: &str) -> Result<(), CommandError> {
        let mut job = self.hmp_job(tag)?;
        job.job_id = format!("{}hmp-loadvm", crate::jobs::INTERNAL);
        let id = job.job_id.clone();
        self.start_job(&id, Kind::Load)?;
        let r = self.load(&job);
        let _ = match &r {
            Ok(()) => self.jobs.succeed(&id),
            Err(e) => self.jobs.fail(&id, e.to_string()),
        };
        let _ = self.jobs.dismiss(&id);
        r.map_err(CommandError::from)
    }

    pub fn hmp_delvm(&mut self, tag: &str) -> Result<(), CommandError> {
        self.delete(tag, &[]).map_err(CommandError::from)
    }

    /// `info snapshots`: snapshots present on every qcow2 disk (by tag).
    pub fn list_snapshots(&self) -> Result<Vec<SnapshotEntry>, CommandError> {
        let mut lists = Vec::new();
        for i in 0..self.disks.len() {
            if let Some(l) = self.disks.with_qcow2(i, |q| q.snapshots().to_vec()) {
                lists.push(l);
            }
        }
        let Some(first) = lists.first() else {
            return Err(CommandError::generic(
                "no block device can store vmstate for snapshot",
            ));
        };
        Ok(first
            .iter()
            .filter(|s| lists.iter().all(|l| l.iter().any(|t| t.name == s.name)))
            .map(|s| SnapshotEntry {
                id: s.id.clone(),
                name: s.name.clone(),
                vm_state_size: s.vm_state_size,
                date_sec: u64::from(s.date_sec),
                date_nsec: s.date_nsec,
                vm_clock_nsec: s.vm_clock_nsec,
                icount: s.icount,
            })
            .collect())
    }

    /// `job-cancel`: only a save in progress can be cancelled.
    pub fn job_cancel(&mut self, id: &str) -> Result<(), CommandError> {
        self.jobs.check_cancel(id)?;
        match &self.pending_save {
            Some(p) if p.job_id == id => {
                if let Some(c) = &p.capture {
                    c.cancel();
                }
                Ok(())
            }
            _ => Err(CommandError::generic(format!(
                "Job '{id}' cannot be cancelled now"
            ))),
        }
    }

    /// Guest-visible virtual clock: time the VM has existed (as QEMU's vm clock
    /// roughly is), in nanoseconds.
    pub fn vm_clock_ns(&self) -> u64 {
        self.vm_clock_base + self.vm_started.elapsed().as_nanos() as u64
    }
}

fn savevm_figures(p: &PendingSave) -> SaveFigures {
    SaveFigures {
        pause: p.pause,
        total: p.started.elapsed(),
    }
}
