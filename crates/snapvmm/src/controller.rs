//! The controller: one thread that owns the machine and reacts, in order, to
//! everything that can change its state — guest power-off or reset, vCPU
//! failures, and signals.

use std::io::{LineWriter, Write};
use std::path::PathBuf;
use std::sync::mpsc;
use std::sync::Arc;

use anyhow::{Context, Result};
use signal_hook::consts::{SIGINT, SIGTERM};
use vmm::{Machine, MachineConfig, MachineEvent};

use crate::cli::{RunConfig, SerialTarget};

/// Everything the controller reacts to.
#[derive(Debug)]
pub enum AppEvent {
    Machine(MachineEvent),
    Signal(i32),
}

/// Environment variable naming the KVM device (tests point it elsewhere).
const KVM_PATH_ENV: &str = "SNAPVMM_KVM_DEVICE";

/// Boots the machine and runs it until it powers off; returns the exit status.
pub fn run(cfg: RunConfig) -> Result<u8> {
    let (tx, rx) = mpsc::channel::<AppEvent>();
    let serial: Box<dyn Write + Send> = match &cfg.serial {
        SerialTarget::Stdio => Box::new(LineWriter::new(std::io::stdout())),
        SerialTarget::File(p) => Box::new(LineWriter::new(
            std::fs::File::create(p)
                .with_context(|| format!("cannot create serial output file {}", p.display()))?,
        )),
        SerialTarget::None => Box::new(std::io::sink()),
    };
    let kvm_path = std::env::var_os(KVM_PATH_ENV)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(vmm::kvm::vm::KVM_DEVICE));
    let events_tx = tx.clone();
    let sink: vmm::EventSink = Arc::new(move |e| {
        let _ = events_tx.send(AppEvent::Machine(e));
    });
    let mut machine = Machine::create(
        MachineConfig {
            mem_bytes: cfg.mem_bytes,
            cpus: cfg.cpus,
            start: vmm::Start::Kernel {
                kernel: cfg.kernel,
                initrd: cfg.initrd,
                cmdline: cfg.cmdline,
            },
            serial,
            kvm_path,
        },
        sink,
    )?;
    spawn_signal_thread(tx.clone())?;
    machine.resume();

    let code = match rx.recv() {
        Err(_) => 1,
        Ok(AppEvent::Machine(MachineEvent::PowerOff(code))) => code as u8,
        Ok(AppEvent::Machine(MachineEvent::GuestReset | MachineEvent::GuestShutdown(_))) => 0,
        Ok(AppEvent::Machine(MachineEvent::VcpuFailed(id, why))) => {
            machine.flush_serial();
            anyhow::bail!("vCPU {id} failed: {why}");
        }
        Ok(AppEvent::Signal(sig)) => {
            tracing::info!(signal = sig, "shutting down on signal");
            0
        }
    };
    let _ = machine.pause();
    machine.flush_serial();
    Ok(code)
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
