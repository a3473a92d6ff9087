//! Building the machine: booted, restored from an image (cold, or warm
//! into a VM built ahead for `--incoming defer`), or loaded from a qcow2
//! snapshot; and `--incoming defer`'s wait for `migrate-incoming`.

use std::io::{LineWriter, Write};
use std::path::PathBuf;
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use livesnap::fill::Fill;
use qmp::{CommandError, EventBus};
use serde_json::{json, Value};
use vmm::{Machine, MachineConfig};

use super::bridge::Reply;
use super::event::AppEvent;
use crate::cli::{RunConfig, SerialTarget};
use crate::disk::Disks;
use crate::snapshot::migrate::{self as migration, Migration};
use crate::snapshot::restore;

/// Environment variable naming the KVM device (tests point it elsewhere).
const KVM_PATH_ENV: &str = "SNAPVMM_KVM_DEVICE";

/// The KVM device (`SNAPVMM_KVM_DEVICE` overrides it, for tests).
pub(super) fn kvm_path() -> PathBuf {
    std::env::var_os(KVM_PATH_ENV)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(vmm::kvm::vm::KVM_DEVICE))
}

/// A machine, and the fill of its RAM when that is still under way.
pub(super) type Built = (Machine, Option<Fill>);

/// `--incoming defer`, or `--incoming` with a stream URI: answers QMP until
/// `migrate-incoming` names an image that loads, or the stream being
/// received is complete; returns the machine and the command's pending
/// reply (none for a stream: `migrate-incoming` returns once it listens),
/// or None when asked to quit first.
pub(super) fn wait_incoming(
    cfg: &mut RunConfig,
    tx: &mpsc::Sender<AppEvent>,
    rx: &mpsc::Receiver<AppEvent>,
    migration: &mut Migration,
    events: Option<&EventBus>,
) -> Result<Option<(Built, Disks, Option<Reply>)>> {
    use qmp::Request::*;
    let ev: Option<EventBus> = events.cloned();
    let quit = |reason: &str| {
        if let Some(ev) = events {
            ev.emit("SHUTDOWN", Some(json!({"guest": false, "reason": reason})));
            ev.flush(Duration::from_millis(500));
        }
    };
    // `--incoming unix:/tcp:/exec:/fd:`: listen (or start reading) now; a
    // failure ends the process, as a bad --incoming file does.
    let from_cli = cfg.incoming_stream.is_some();
    let mut receiving = false;
    if let Some(uri) = &cfg.incoming_stream {
        start_stream(uri, tx, migration, &ev).map_err(|e| anyhow::anyhow!("--incoming: {e}"))?;
        receiving = true;
    }
    // Warm restore: the VM and its memory slots are built now, before the
    // image is known; migrate-incoming then only loads state (and RAM, while
    // the guest runs). An image of another RAM size is restored cold.
    // So is the VM of a live migration's target given --mem (its switch then
    // only loads state: the downtime does not include building a VM).
    let mut prepared = None;
    let ahead = cfg.defer_incoming || (from_cli && cfg.mem_given);
    if ahead && cfg.restore_mode == restore::RamMode::Fill && restore::fill_available() {
        match vmm::PreparedVm::new(&kvm_path(), cfg.mem_bytes, cfg.cpus) {
            Ok(p) => prepared = Some(p),
            Err(e) => tracing::warn!("cannot build the VM ahead of migrate-incoming: {e}"),
        }
    }
    loop {
        let Ok(ev_in) = rx.recv() else {
            return Ok(None);
        };
        let (req, reply) = match ev_in {
            AppEvent::Qmp(req, reply) => (req, reply),
            AppEvent::Signal(_) => {
                quit("host-signal");
                return Ok(None);
            }
            // No guest yet: typed input is dropped (the console thread goes on).
            AppEvent::ConsoleInput(bytes, took) => {
                let _ = took.send(bytes.len());
                continue;
            }
            AppEvent::Incoming(r) => {
                receiving = false;
                let live = matches!(r.as_deref(), Ok(super::incoming::Received::Live { .. }));
                let built = r
                    .map_err(anyhow::Error::msg)
                    .and_then(|rec| build_received(cfg, tx, *rec, migration, &mut prepared));
                match built {
                    Ok(built) => {
                        if let Some(j) = migration.job.as_mut() {
                            j.total_time = Some(j.started_elapsed());
                        }
                        // A live migration's status goes on (postcopy-active, completed).
                        if !live {
                            let _ = migration.set_status(migration::Status::Completed, &ev);
                        }
                        cfg.incoming_stream
                            .get_or_insert(crate::snapshot::transport::Uri::Exec(String::new()));
                        return Ok(Some(built));
                    }
                    Err(e) => {
                        let why = crate::describe(&e);
                        migration.postcopy_in = None;
                        let _ = migration.fail(why.clone(), &ev);
                        if from_cli {
                            anyhow::bail!("{why}");
                        }
                        tracing::error!("incoming migration failed: {why}");
                        continue;
                    }
                }
            }
            _ => continue,
        };
        let r: Result<Value, CommandError> = match req {
            MigrateIncoming(_) if receiving => Err(CommandError::generic(
                "an incoming migration is already under way",
            )),
            MigrateIncoming(uri) => {
                match crate::cli::parse_incoming(&uri).and_then(|u| open_nets(cfg).map(|()| u)) {
                    Err(e) => Err(CommandError::generic(crate::describe(&e))),
                    Ok(crate::snapshot::transport::Uri::File(path)) => {
                        cfg.incoming = Some(path);
                        let t0 = Instant::now();
                        let mut warm = false;
                        let built = crate::disk::open_all(&cfg.disks).and_then(|(c, d)| {
                            match prepared.take() {
                                Some(p) => build_warm(cfg, tx, c, &d, p, &mut warm),
                                None => build_machine(cfg, tx, c, &d),
                            }
                            .map(|m| (m, d))
                        });
                        migration.last_restore = Some(migration::RestoreInfo {
                            mode: cfg.restore_mode,
                            warm,
                            load: t0.elapsed(),
                            at: Instant::now(),
                        });
                        match built {
                            Ok((m, d)) => return Ok(Some((m, d, Some(reply)))),
                            Err(e) => {
                                cfg.incoming = None;
                                Err(CommandError::generic(crate::describe(&e)))
                            }
                        }
                    }
                    Ok(uri) => match start_stream(&uri, tx, migration, &ev) {
                        Ok(()) => {
                            receiving = true;
                            Ok(json!({}))
                        }
                        Err(e) => Err(CommandError::generic(e)),
                    },
                }
            }
            Quit | SystemPowerdown => {
                let _ = reply.send(Ok(json!({})));
                quit("host-qmp-quit");
                return Ok(None);
            }
            QueryMigrate => Ok(migration.query()),
            MigrateSetCapabilities(caps) => migration.set_capabilities(&caps).map(|_| json!({})),
            QueryMigrateCapabilities => Ok(migration.query_capabilities()),
            MigrateSetParameters(p) => migration.set_parameters(&p).map(|_| json!({})),
            QueryMigrateParameters => Ok(migration.query_parameters()),
            QueryJobs => Ok(json!([])),
            // Everything else needs a VM: one is loaded by migrate-incoming first.
            _ => Err(CommandError::generic(
                "The VM is waiting for an incoming migration: load it with migrate-incoming first",
            )),
        };
        let _ = reply.send(r);
    }
}

/// Opens the NICs' taps if they wait for descriptors passed with `getfd`
/// (`--net fd=NAME`): at `migrate-incoming`, once. A missing descriptor
/// fails that command and leaves the VM waiting for another.
fn open_nets(cfg: &mut RunConfig) -> Result<()> {
    if cfg.nets.is_empty() && !cfg.net_specs.is_empty() {
        cfg.nets = crate::net::open_all(&cfg.net_specs)?;
    }
    Ok(())
}

/// Builds the machine from what an incoming stream delivered: an image's
/// RAM, or (live migration) fresh RAM filled from the source while the
/// guest runs.
fn build_received(
    cfg: &RunConfig,
    tx: &mpsc::Sender<AppEvent>,
    rec: super::incoming::Received,
    migration: &mut Migration,
    prepared: &mut Option<vmm::PreparedVm>,
) -> Result<(Built, Disks, Option<Reply>)> {
    use super::incoming::Received;
    let t0 = Instant::now();
    let (configs, disks) = crate::disk::open_all(&cfg.disks)?;
    match rec {
        Received::Image {
            restored,
            bytes,
            peer,
        } => {
            tracing::info!(bytes, peer = %peer, "incoming stream received");
            let m = build_from_state(
                cfg,
                tx,
                StartRam::Ram(restored.ram),
                restored.state,
                configs,
                GenId::New,
            )?;
            migration.last_restore = Some(migration::RestoreInfo {
                mode: restore::RamMode::Copy,
                warm: false,
                load: t0.elapsed(),
                at: Instant::now(),
            });
            Ok(((m, None), disks, None))
        }
        Received::Live {
            switch,
            state,
            peer,
        } => {
            tracing::info!(peer = %peer, "live migration: state received, RAM follows");
            // Into the VM built ahead when it is of this size, else a new one.
            let warm =
                prepared.take_if(|p| p.ram().size() == state.mem_bytes && p.cpus() == state.cpus);
            let ram = match &warm {
                Some(_) => None,
                None => Some(
                    vmm::memory::GuestRam::anonymous(state.mem_bytes)
                        .map_err(|e| anyhow::anyhow!("cannot set up guest RAM: {e}"))?,
                ),
            };
            let regions = match (&warm, &ram) {
                (Some(p), _) => p.ram().regions(),
                (None, Some(r)) => r.regions(),
                (None, None) => unreachable!("one of the two"),
            };
            let done_tx = tx.clone();
            let done: livesnap::fill::FillDone = Box::new(move |r| {
                let _ = done_tx.send(AppEvent::FillDone(r));
            });
            let ranges: Vec<livesnap::RamRange> = regions
                .iter()
                // SAFETY: the regions are the mappings of `ram` (or of the VM
                // built ahead). The fill names them only in userfaultfd ioctls
                // (the kernel checks the range; nothing is dereferenced), and is
                // dropped before them by the controller, or at once if the build
                // below fails (its prefetch has not been let go by then).
                .map(|r| unsafe { livesnap::RamRange::new(r.gpa, r.host, r.len) })
                .collect();
            let fill = livesnap::fill::start_fill_with(
                &ranges,
                &switch.layout.ranges,
                switch.pages.clone(),
                Some(done),
                &switch.early,
            )
            .map_err(|e| anyhow::anyhow!("cannot fill guest RAM from the source: {e}"))?;
            let is_warm = warm.is_some();
            let start = match (warm, ram) {
                (Some(p), _) => StartRam::Prepared(p),
                (None, Some(r)) => StartRam::Ram(r),
                (None, None) => unreachable!("one of the two"),
            };
            let m = match build_from_state(cfg, tx, start, state, configs, GenId::Kept) {
                Ok(m) => m,
                Err(e) => {
                    // The failed build unmapped RAM: stop the fill at once.
                    drop(fill);
                    return Err(e);
                }
            };
            tracing::debug!(
                us = t0.elapsed().as_micros() as u64,
                warm = is_warm,
                "live migration: machine built"
            );
            migration.postcopy_in = Some(switch.pages);
            migration.last_restore = Some(migration::RestoreInfo {
                mode: restore::RamMode::Fill,
                warm: is_warm,
                load: t0.elapsed(),
                at: Instant::now(),
            });
            Ok(((m, Some(fill)), disks, None))
        }
    }
}

/// Starts receiving a stream: an incoming job in `active` (QEMU's target
/// statuses), with the address it listens on.
fn start_stream(
    uri: &crate::snapshot::transport::Uri,
    tx: &mpsc::Sender<AppEvent>,
    migration: &mut Migration,
    ev: &Option<EventBus>,
) -> Result<(), String> {
    migration
        .new_job(0, migration::Engine::incoming(), ev)
        .map_err(|e| e.to_string())?;
    match super::incoming::start(uri, tx) {
        Ok(addr) => {
            if let Some(j) = migration.job.as_mut() {
                j.engine.set_listening(addr);
            }
            let _ = migration.set_status(migration::Status::Active, ev);
            Ok(())
        }
        Err(e) => Err(migration.fail(e, ev).desc),
    }
}

/// Builds the machine from the configuration over open disks (`configs`, the
/// devices' backends; `disks`, the same disks for snapshot operations).
pub(super) fn build_machine(
    cfg: &RunConfig,
    tx: &mpsc::Sender<AppEvent>,
    configs: Vec<vmm::DiskConfig>,
    disks: &Disks,
) -> Result<Built> {
    if let Some(path) = &cfg.incoming {
        let done_tx = tx.clone();
        let done: livesnap::fill::FillDone = Box::new(move |r| {
            let _ = done_tx.send(AppEvent::FillDone(r));
        });
        let r = restore::from_file(path, cfg.restore_mode, Some(done))
            .with_context(|| format!("cannot restore from {}", path.display()))?;
        // The fill goes on while the machine is built (it touches no RAM).
        let m = build_from_state(cfg, tx, StartRam::Ram(r.ram), r.state, configs, GenId::New)?;
        return Ok((m, r.fill));
    }
    if let Some(tag) = &cfg.loadvm {
        let (ram, state) = crate::snapshot::savevm::load_from_disks(disks, tag)
            .map_err(|e| anyhow::anyhow!("cannot load snapshot '{tag}': {e}"))?;
        return Ok((
            build_from_state(cfg, tx, StartRam::Ram(ram), state, configs, GenId::New)?,
            None,
        ));
    }
    let start = vmm::Start::Kernel {
        kernel: cfg.kernel.clone(),
        initrd: cfg.initrd.clone(),
        cmdline: cfg.cmdline.clone(),
    };
    Ok((
        create(cfg, tx, start, cfg.mem_bytes, cfg.cpus, configs, GenId::New)?,
        None,
    ))
}

/// `migrate-incoming` into the VM built ahead (`prepared`): its RAM is
/// filled from the image while the guest runs. An image of another RAM size
/// is restored cold.
pub(super) fn build_warm(
    cfg: &RunConfig,
    tx: &mpsc::Sender<AppEvent>,
    configs: Vec<vmm::DiskConfig>,
    disks: &Disks,
    prepared: vmm::PreparedVm,
    warm: &mut bool,
) -> Result<Built> {
    let path = cfg
        .incoming
        .as_deref()
        .expect("migrate-incoming names the image");
    let t0 = Instant::now();
    let cannot = || format!("cannot restore from {}", path.display());
    let (chain, state) = restore::open(path).with_context(cannot)?;
    if state.mem_bytes != prepared.ram().size() || state.cpus != prepared.cpus() {
        tracing::info!(
            "the image is of a {} MiB, {}-vCPU machine, the VM built ahead has {} MiB and {} vCPU(s): restoring cold",
            state.mem_bytes >> 20,
            state.cpus,
            prepared.ram().size() >> 20,
            prepared.cpus(),
        );
        drop(prepared);
        return build_machine(cfg, tx, configs, disks);
    }
    let done_tx = tx.clone();
    let done: livesnap::fill::FillDone = Box::new(move |r| {
        let _ = done_tx.send(AppEvent::FillDone(r));
    });
    let fill =
        restore::fill_ram(Arc::new(chain), prepared.ram(), Some(done)).with_context(cannot)?;
    let m = build_from_state(
        cfg,
        tx,
        StartRam::Prepared(prepared),
        state,
        configs,
        GenId::New,
    )?;
    *warm = true;
    tracing::info!(
        ms = t0.elapsed().as_secs_f64() * 1e3,
        "warm restore: state loaded"
    );
    Ok((m, Some(fill)))
}

/// Where a restored machine's RAM is.
pub(crate) enum StartRam {
    /// Filled or mapped already, or being filled.
    Ram(vmm::memory::GuestRam),
    /// In a VM built ahead, being filled.
    Prepared(vmm::PreparedVm),
}

/// Builds a machine that continues from saved state.
pub(crate) fn build_from_state(
    cfg: &RunConfig,
    tx: &mpsc::Sender<AppEvent>,
    ram: StartRam,
    state: vmm::MachineState,
    disks: Vec<vmm::DiskConfig>,
    genid: GenId,
) -> Result<Machine> {
    let (mem, cpus) = (state.mem_bytes, state.cpus);
    // A restore takes the image's machine; options that say otherwise are refused,
    // never silently ignored.
    if cfg.mem_given && mem != cfg.mem_bytes {
        anyhow::bail!(
            "the snapshot is of a machine with {} MiB of RAM, --mem says {} MiB",
            mem >> 20,
            cfg.mem_bytes >> 20
        );
    }
    if cfg.cpus_given && cpus != cfg.cpus {
        anyhow::bail!(
            "the snapshot is of a machine with {cpus} vCPU(s), --cpus says {}",
            cfg.cpus
        );
    }
    let state = Box::new(state);
    let start = match ram {
        StartRam::Ram(ram) => vmm::Start::Snapshot { ram, state },
        StartRam::Prepared(vm) => vmm::Start::Prepared { vm, state },
    };
    create(cfg, tx, start, mem, cpus, disks, genid)
}

/// What a machine's VM generation ID becomes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum GenId {
    /// A new one (a boot, a restore of an image or stream), unless
    /// `--vmgenid off`.
    New,
    /// Whatever RAM holds (a live migration moves the one VM).
    Kept,
}

/// 16 random bytes as a version-4 UUID.
fn new_generation_id() -> [u8; 16] {
    let mut id = [0u8; 16];
    // SAFETY: getrandom writes at most id.len() bytes into `id`.
    let n = unsafe { libc::getrandom(id.as_mut_ptr().cast(), id.len(), 0) };
    if n != id.len() as isize {
        // Never twice the same: the clock and the process, if getrandom fails.
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos()
            ^ (u128::from(std::process::id()) << 64);
        id = t.to_le_bytes();
    }
    id[6] = (id[6] & 0x0f) | 0x40;
    id[8] = (id[8] & 0x3f) | 0x80;
    id
}

pub(super) fn create(
    cfg: &RunConfig,
    tx: &mpsc::Sender<AppEvent>,
    start: vmm::Start,
    mem_bytes: u64,
    cpus: u8,
    disks: Vec<vmm::DiskConfig>,
    genid: GenId,
) -> Result<Machine> {
    let serial: Box<dyn Write + Send> = match &cfg.serial {
        SerialTarget::Stdio => Box::new(LineWriter::new(std::io::stdout())),
        SerialTarget::File(p) => Box::new(LineWriter::new(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .with_context(|| format!("cannot open serial output file {}", p.display()))?,
        )),
        SerialTarget::None => Box::new(std::io::sink()),
    };
    let kvm_path = kvm_path();
    let events_tx = tx.clone();
    let sink: vmm::EventSink = Arc::new(move |e| {
        let _ = events_tx.send(AppEvent::Machine(e));
    });
    let mc = MachineConfig {
        mem_bytes,
        cpus,
        start,
        serial,
        kvm_path,
        disks,
        nets: cfg.nets.clone(),
        vsock: cfg.vsock.clone(),
        vmgenid: (cfg.vmgenid && genid == GenId::New).then(new_generation_id),
        virtio_pci: cfg.virtio_pci,
    };
    Ok(Machine::create(mc, sink)?)
}
