//! The machine: guest RAM, the KVM VM, devices and vCPU threads, and the
//! lifecycle operations on them (boot, pause, resume). The event loop that
//! decides *when* to do these lives in the binary, which also speaks QMP.

use std::path::PathBuf;
use std::sync::mpsc::{self, Receiver};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use vmm_sys_util::eventfd::EventFd;

use crate::boot::{self, BootSpec};
use crate::devices::io_thread::{IoDevice, IoGate, IoThread, Wakeups};
use crate::devices::virtio::net::{NetBackend, VirtioNet};
use crate::devices::virtio::vsock::VirtioVsock;
use crate::devices::virtio::{self, BlockBackend, VirtioBlk};
use crate::devices::{
    acpi::AcpiPm, debug_exit::DebugExit, i8042::I8042, serial, DeviceRequest, PioBus,
};
use crate::kvm::vcpu::{self, Vcpu};
use crate::kvm::vm::{GsiRoutes, KvmVm};
use crate::kvm::{cpuid, ioctl};
use crate::memory::GuestRam;
use crate::snapshot::MachineState;
use crate::vcpu_thread::{self, VcpuHandle};
use crate::VmmError;

/// Asks the guest to re-plug NIC `j` so that its driver reads its new MAC
/// (virtio-pci, images that describe the NICs' slots); elsewhere says what
/// the guest will go on using.
fn replug_nic(
    bus: &PioBus,
    j: usize,
    image_minor: u32,
    old: &[u8; 6],
    new: &[u8; 6],
) -> Result<(), VmmError> {
    use virtio::net::format_mac;
    let (old, new) = (format_mac(old), format_mac(new));
    let id = crate::devices::lock(&bus.nets[j]).id().to_string();
    // Images before state minor 4 were booted without re-pluggable slots.
    if bus.pci.is_some() && image_minor >= 4 {
        bus.replug(bus.virtio.len() + j).map_err(VmmError::Io)?;
        tracing::info!(nic = %id, "MAC {old} -> {new}: the guest is asked to re-plug the NIC");
    } else {
        tracing::warn!(
            nic = %id,
            "the device now has MAC {new}, but the guest's driver keeps {old} until it probes \
             the device again: only a VM booted with --virtio-transport pci (by this version) \
             can re-plug its NICs"
        );
    }
    Ok(())
}

fn transport_name(pci: bool) -> &'static str {
    if pci {
        "virtio-pci"
    } else {
        "virtio-mmio"
    }
}

/// Smallest RAM snapvmm boots (the reference guest needs room above 4 MiB).
pub const MIN_MEM: u64 = 32 << 20;
/// Largest number of vCPUs (bounded by the MP table and the reference guest).
pub const MAX_CPUS: u8 = boot::mptable::MAX_CPUS;

/// Something that happened in the machine, delivered to the controller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MachineEvent {
    /// The guest wrote its exit status to the debug-exit port.
    PowerOff(i32),
    /// The guest asked for a reset (i8042 command 0xfe).
    GuestReset,
    /// A vCPU triple-faulted or reported a system event.
    GuestShutdown(u8),
    /// KVM failed on a vCPU; it is stopped.
    VcpuFailed(u8, String),
}

/// Where machine events go (called from vCPU threads).
pub type EventSink = Arc<dyn Fn(MachineEvent) + Send + Sync>;

/// How the machine starts.
pub enum Start {
    /// Load a kernel and boot it.
    Kernel {
        kernel: Vec<u8>,
        initrd: Option<Vec<u8>>,
        cmdline: String,
    },
    /// Continue from saved state, with guest RAM already filled or mapped from the image.
    Snapshot {
        ram: GuestRam,
        state: Box<MachineState>,
    },
    /// Continue from saved state in a VM built beforehand ([`PreparedVm`]):
    /// its RAM is being filled by the caller.
    Prepared {
        vm: PreparedVm,
        state: Box<MachineState>,
    },
}

/// A VM with its RAM (anonymous, never touched) already in its memory slots,
/// built before the state it will run is known (`--incoming defer`): what
/// is left for the restore is loading that state. Creating the memory slot
/// is the dearest part of building a VM on these hosts (6-7 ms for 1 GiB).
pub struct PreparedVm {
    vm: KvmVm,
    ram: GuestRam,
    /// What KVM supports, and `cpus` vCPUs created (used when the state has
    /// as many), with the MSRs they can save.
    ahead: Ahead,
}

/// The parts of building a machine that depend on no state.
struct Ahead {
    base_cpuid: kvm_bindings::CpuId,
    vcpus: Vec<Vcpu>,
    /// Probed with this host's CPUID set on vCPU 0 (as a booted machine
    /// probes them); `None`: probe once the vCPUs are configured.
    msrs: Option<Arc<[u32]>>,
}

impl Ahead {
    fn build(vm: &KvmVm, cpus: u8, probe: bool) -> Result<Ahead, VmmError> {
        let base_cpuid = vm
            .kvm
            .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
            .map_err(ioctl("KVM_GET_SUPPORTED_CPUID"))?;
        let mut vcpus = Vec::new();
        for id in 0..cpus {
            let fd = vm
                .fd
                .create_vcpu(u64::from(id))
                .map_err(ioctl("KVM_CREATE_VCPU"))?;
            vcpus.push(Vcpu { id, fd });
        }
        let msrs = if probe {
            let v = &vcpus[0].fd;
            let mut c = base_cpuid.clone();
            let tsc_khz = v.get_tsc_khz().unwrap_or(0);
            cpuid::patch(&mut c, 0, cpus, tsc_khz).map_err(VmmError::Config)?;
            v.set_cpuid2(&c).map_err(ioctl("KVM_SET_CPUID2"))?;
            Some(vcpu::probe_msrs(v, vcpu::SAVED_MSRS).into())
        } else {
            None
        };
        Ok(Ahead {
            base_cpuid,
            vcpus,
            msrs,
        })
    }
}

impl PreparedVm {
    /// Creates a VM at `kvm_path` with `mem_bytes` of anonymous RAM mapped
    /// and `cpus` vCPUs (a state with another count is refused by
    /// [`Machine::create`]).
    pub fn new(kvm_path: &std::path::Path, mem_bytes: u64, cpus: u8) -> Result<Self, VmmError> {
        if cpus == 0 || cpus > MAX_CPUS {
            return Err(VmmError::Config(format!(
                "--cpus must be between 1 and {MAX_CPUS}"
            )));
        }
        let vm = KvmVm::new(kvm_path)?;
        if usize::from(cpus) > vm.max_vcpus() {
            return Err(VmmError::Config(format!(
                "this host's KVM supports at most {} vCPUs",
                vm.max_vcpus()
            )));
        }
        let ram = GuestRam::anonymous(mem_bytes)?;
        vm.map_ram(&ram)?;
        let ahead = Ahead::build(&vm, cpus, true)?;
        Ok(PreparedVm { vm, ram, ahead })
    }

    /// The vCPUs created ahead.
    pub fn cpus(&self) -> u8 {
        self.ahead.vcpus.len() as u8
    }

    /// The VM's RAM (for the caller to fill).
    pub fn ram(&self) -> &GuestRam {
        &self.ram
    }
}

/// A disk for a virtio-blk device.
pub struct DiskConfig {
    /// Name (QMP node name; also the virtio-blk serial the guest reads).
    pub id: String,
    pub backend: Box<dyn BlockBackend>,
    pub readonly: bool,
}

/// A NIC: a virtio-net device on a backend (a tap).
#[derive(Clone)]
pub struct NetConfig {
    /// Name (QMP id; the default MAC derives from it).
    pub id: String,
    /// The MAC: at boot the default is [`virtio::net::default_mac`] of the
    /// id; on a restore, given replaces the image's, absent keeps it.
    pub mac: Option<[u8; 6]>,
    pub backend: Arc<dyn NetBackend>,
}

impl std::fmt::Debug for NetConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NetConfig")
            .field("id", &self.id)
            .field("mac", &self.mac)
            .field("backend", &self.backend.name())
            .finish()
    }
}

/// A vsock device: the guest's CID and the host side's unix socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VsockConfig {
    pub cid: u64,
    pub path: PathBuf,
}

/// What to build. For [`Start::Snapshot`], `mem_bytes` and `cpus` must match the state.
pub struct MachineConfig {
    pub mem_bytes: u64,
    pub cpus: u8,
    pub start: Start,
    pub serial: serial::Output,
    pub kvm_path: PathBuf,
    /// virtio-blk disks, in device order (a snapshot restores onto the same list).
    pub disks: Vec<DiskConfig>,
    /// virtio-net NICs, in device order after the disks (a snapshot restores
    /// onto as many).
    pub nets: Vec<NetConfig>,
    /// A vsock device (after the NICs); a restore needs one exactly when the
    /// image has one, and gives it this CID and socket.
    pub vsock: Option<VsockConfig>,
    /// The VM generation ID to give the guest ([`layout::VMGENID_ADDR`]):
    /// a booted guest finds its device in the DSDT; a restored one is told
    /// of the new ID (ACPI notification through the GED). `None`: no device
    /// at boot, and a restore leaves the ID in RAM as it is (a live
    /// migration moves the one VM).
    pub vmgenid: Option<[u8; 16]>,
    /// The virtio devices' transport: `Some(true)` virtio-pci (a PCI bus
    /// with a host bridge in the DSDT, MSI-X, a queue per vCPU for disks),
    /// `Some(false)` virtio-mmio; `None`: the image's on a restore,
    /// virtio-mmio at boot. A restore refuses the other one.
    pub virtio_pci: Option<bool>,
}

/// The interrupt line of virtio device `i` on virtio-mmio (connected to
/// its IOAPIC pin); on virtio-pci an unconnected eventfd (the device's
/// MSI-X vectors replace it).
fn line(vm: &KvmVm, pci: bool, i: usize) -> Result<EventFd, VmmError> {
    let irq = EventFd::new(libc::EFD_NONBLOCK).map_err(VmmError::Io)?;
    if !pci {
        vm.irqfd(&irq, virtio::irq(i))?;
    }
    Ok(irq)
}

/// Puts virtio device `i` on its transport: on virtio-pci its MSI-X
/// vectors (an irqfd each, on GSIs from `next_gsi`) and BAR; then a queue
/// notification of each queue straight to the I/O thread (ioeventfd;
/// without one, the MMIO handler signals the same eventfd).
fn wire(
    vm: &KvmVm,
    routes: Option<&Arc<GsiRoutes>>,
    next_gsi: &mut u32,
    i: usize,
    t: &mut virtio::transport::Transport,
) -> Result<(), VmmError> {
    if let Some(routes) = routes {
        let n = t.queues.len() + 1;
        let mut vectors = Vec::with_capacity(n);
        for v in 0..n {
            let fd = EventFd::new(libc::EFD_NONBLOCK).map_err(VmmError::Io)?;
            vm.irqfd(&fd, *next_gsi + v as u32)?;
            vectors.push(fd);
        }
        let bar0 = crate::layout::PCI_MMIO_START + virtio::pci::BAR_SIZE * i as u64;
        t.attach_pci(bar0 as u32, vectors, *next_gsi, routes.clone())
            .map_err(VmmError::Config)?;
        *next_gsi += n as u32;
    }
    for q in 0..t.queues.len() {
        let r = match t.pci_bar() {
            Some(bar) => vm.ioeventfd_any(
                t.kick(q),
                bar + virtio::pci::NOTIFY + virtio::pci::NOTIFY_MULTIPLIER * q as u64,
            ),
            None if routes.is_some() => continue,
            None => vm.ioeventfd(
                t.kick(q),
                virtio::mmio_base(i) + virtio::transport::QUEUE_NOTIFY,
                q as u32,
            ),
        };
        if let Err(e) = r {
            tracing::debug!("no ioeventfd for virtio device {i}, queue {q}: {e}");
        }
    }
    Ok(())
}

/// A booted machine whose vCPUs start paused; call [`Machine::resume`] to run.
pub struct Machine {
    // Field order is drop order: vCPU threads and the I/O threads stop before
    // the VM and RAM go away.
    vcpus: Vec<VcpuHandle>,
    _io: Vec<IoThread>,
    /// Open while the vCPUs run: device I/O happens only then.
    gate: Arc<IoGate>,
    /// How long the last pause waited for device I/O in progress.
    io_drain: Duration,
    acks: Receiver<(u8, u64)>,
    bus: Arc<PioBus>,
    vm: KvmVm,
    ram: GuestRam,
    cpus: u8,
    running: bool,
    /// The vCPU threads raised for a pause ([`crate::sched`]), until resume.
    boost: Option<crate::sched::Boost>,
}

impl Machine {
    /// Creates the VM, loads the kernel and starts one (paused) thread per vCPU.
    pub fn create(cfg: MachineConfig, events: EventSink) -> Result<Self, VmmError> {
        if cfg.mem_bytes < MIN_MEM {
            return Err(VmmError::Config(format!(
                "--mem must be at least {} MiB",
                MIN_MEM >> 20
            )));
        }
        if cfg.cpus == 0 || cfg.cpus > MAX_CPUS {
            return Err(VmmError::Config(format!(
                "--cpus must be between 1 and {MAX_CPUS}"
            )));
        }
        let (vm, start, ahead) = match cfg.start {
            Start::Prepared { vm, state } => (
                vm.vm,
                Start::Snapshot { ram: vm.ram, state },
                Some(vm.ahead),
            ),
            start => (KvmVm::new(&cfg.kvm_path)?, start, None),
        };
        let premapped = ahead.is_some();
        if usize::from(cfg.cpus) > vm.max_vcpus() {
            return Err(VmmError::Config(format!(
                "this host's KVM supports at most {} vCPUs",
                vm.max_vcpus()
            )));
        }
        let n_devices = cfg.disks.len() + cfg.nets.len() + usize::from(cfg.vsock.is_some());
        if n_devices > virtio::MAX_DEVICES {
            return Err(VmmError::Config(format!(
                "at most {} virtio devices (disks and NICs together), {n_devices} given",
                virtio::MAX_DEVICES
            )));
        }
        let (ram, entry, state) = match start {
            Start::Kernel {
                kernel,
                initrd,
                cmdline,
            } => {
                let ram = GuestRam::anonymous(cfg.mem_bytes)?;
                // Guests find virtio-mmio devices in the ACPI DSDT (stock kernels)
                // or on the command line (the reference guest, kernels without
                // ACPI); virtio-pci devices on the PCI bus the DSDT describes.
                let pci = cfg.virtio_pci.unwrap_or(false);
                let mmio: Vec<_> = (0..n_devices)
                    .filter(|_| !pci)
                    .map(|i| boot::acpi::MmioDevice {
                        base: virtio::mmio_base(i),
                        size: virtio::MMIO_SIZE,
                        irq: virtio::irq(i),
                    })
                    .collect();
                let mut cmdline = cmdline;
                for i in 0..mmio.len() {
                    cmdline.push(' ');
                    cmdline.push_str(&virtio::cmdline_entry(i));
                }
                // The NICs can be re-plugged (a clone restored with its own MAC).
                let replug: Vec<u8> = (0..cfg.nets.len())
                    .map(|j| (cfg.disks.len() + j + 1) as u8)
                    .collect();
                let spec = BootSpec {
                    kernel: &kernel,
                    initrd: initrd.as_deref(),
                    cmdline: &cmdline,
                    cpus: cfg.cpus,
                    virtio: &mmio,
                    pci: pci.then_some(boot::acpi::PciSpec { replug: &replug }),
                    vmgenid: cfg.vmgenid.is_some(),
                };
                let entry = boot::load_kernel(ram.memory(), cfg.mem_bytes, &spec)?;
                (ram, Some(entry), None)
            }
            Start::Snapshot { ram, state } => {
                if ram.size() != state.mem_bytes
                    || state.cpus != cfg.cpus
                    || state.mem_bytes != cfg.mem_bytes
                {
                    return Err(VmmError::Config(format!(
                        "snapshot is of a {}-vCPU, {} MiB machine, RAM given is {} MiB",
                        state.cpus,
                        state.mem_bytes >> 20,
                        ram.size() >> 20
                    )));
                }
                if state.virtio.len() != cfg.disks.len() {
                    return Err(VmmError::Config(format!(
                        "the snapshot has {} disk(s), {} given",
                        state.virtio.len(),
                        cfg.disks.len()
                    )));
                }
                if state.nets.len() != cfg.nets.len() {
                    return Err(VmmError::Config(format!(
                        "the snapshot has {} NIC(s), {} given (--net)",
                        state.nets.len(),
                        cfg.nets.len()
                    )));
                }
                match (state.vsock.is_some(), cfg.vsock.is_some()) {
                    (true, false) => {
                        return Err(VmmError::Config(
                            "the snapshot has a vsock device, none given (--vsock)".into(),
                        ))
                    }
                    (false, true) => {
                        return Err(VmmError::Config(
                            "the snapshot has no vsock device, one given (--vsock)".into(),
                        ))
                    }
                    _ => {}
                }
                (ram, None, Some(state))
            }
            Start::Prepared { .. } => unreachable!("turned into Start::Snapshot above"),
        };
        if !premapped {
            vm.map_ram(&ram)?;
        }
        let pci = match (&state, cfg.virtio_pci) {
            (Some(st), Some(want)) if st.pci != want => {
                return Err(VmmError::Config(format!(
                    "the snapshot's devices are on {}, {} was asked for",
                    transport_name(st.pci),
                    transport_name(want)
                )))
            }
            (Some(st), _) => st.pci,
            (None, want) => want.unwrap_or(false),
        };
        let routes = pci.then(|| Arc::new(GsiRoutes::new(vm.fd.clone())));
        let mut next_gsi = crate::kvm::vm::FIRST_MSI_GSI;

        let serial_irq = EventFd::new(libc::EFD_NONBLOCK).map_err(VmmError::Io)?;
        vm.irqfd(&serial_irq, serial::IRQ)?;
        let ged_irq = EventFd::new(libc::EFD_NONBLOCK).map_err(VmmError::Io)?;
        vm.irqfd(&ged_irq, crate::devices::acpi::GED_IRQ)?;
        let sink = |events: &EventSink| {
            let ev = events.clone();
            Box::new(move |r: DeviceRequest| {
                ev(match r {
                    DeviceRequest::PowerOff(code) => MachineEvent::PowerOff(code),
                    DeviceRequest::Reset => MachineEvent::GuestReset,
                })
            })
        };
        let mut virtio_devs = Vec::new();
        for (i, d) in cfg.disks.into_iter().enumerate() {
            let irq = line(&vm, pci, i)?;
            let mut dev = match &state {
                Some(st) => VirtioBlk::restore(d.id, d.backend, d.readonly, irq, &st.virtio[i])
                    .map_err(VmmError::Config)?,
                // On virtio-pci a queue per vCPU, each with its own vector.
                None if pci => {
                    VirtioBlk::with_queues(d.id, d.backend, d.readonly, irq, usize::from(cfg.cpus))
                }
                None => VirtioBlk::new(d.id, d.backend, d.readonly, irq),
            };
            wire(&vm, routes.as_ref(), &mut next_gsi, i, dev.transport_mut())?;
            virtio_devs.push(Arc::new(Mutex::new(dev)));
        }
        let mut nets = Vec::new();
        for (j, n) in cfg.nets.into_iter().enumerate() {
            let i = virtio_devs.len() + j;
            let irq = line(&vm, pci, i)?;
            let mut dev = match &state {
                Some(st) => VirtioNet::restore(n.id, n.mac, n.backend, irq, &st.nets[j])
                    .map_err(VmmError::Config)?,
                None => {
                    let mac = n.mac.unwrap_or_else(|| virtio::net::default_mac(&n.id));
                    VirtioNet::new(n.id, mac, n.backend, irq).map_err(VmmError::Io)?
                }
            };
            wire(&vm, routes.as_ref(), &mut next_gsi, i, dev.transport_mut())?;
            nets.push(Arc::new(Mutex::new(dev)));
        }
        let vsock = match &cfg.vsock {
            Some(v) => {
                let i = virtio_devs.len() + nets.len();
                let irq = line(&vm, pci, i)?;
                let saved = state.as_ref().and_then(|s| s.vsock.as_ref());
                let mut dev = match saved {
                    Some(st) => {
                        VirtioVsock::restore(v.cid, &v.path, irq, st).map_err(VmmError::Config)?
                    }
                    None => VirtioVsock::new(v.cid, &v.path, irq).map_err(VmmError::Io)?,
                };
                wire(&vm, routes.as_ref(), &mut next_gsi, i, dev.transport_mut())?;
                Some(Arc::new(Mutex::new(dev)))
            }
            None => None,
        };
        let gate = Arc::new(IoGate::default());
        // Closed until the vCPUs first run.
        gate.close();
        // Disks on one thread, streams (NICs, vsock) on another: a disk
        // request the guest waits on runs at once, frames batch up while the
        // guest runs (`Wakeups`), and neither queues behind the other.
        let disks: Vec<Arc<Mutex<dyn IoDevice>>> = virtio_devs
            .iter()
            .map(|d| d.clone() as Arc<Mutex<dyn IoDevice>>)
            .collect();
        let streams: Vec<Arc<Mutex<dyn IoDevice>>> = nets
            .iter()
            .map(|n| n.clone() as Arc<Mutex<dyn IoDevice>>)
            .chain(vsock.iter().map(|v| v.clone() as Arc<Mutex<dyn IoDevice>>))
            .collect();
        let mut io = Vec::new();
        for (name, devices, wakeups) in [
            ("snapvmm-io-disk", disks, Wakeups::Preempt),
            ("snapvmm-io-net", streams, Wakeups::Yield),
        ] {
            if !devices.is_empty() {
                io.push(
                    IoThread::spawn(name, devices, ram.memory().clone(), gate.clone(), wakeups)
                        .map_err(VmmError::Io)?,
                );
            }
        }
        let bus = Arc::new(PioBus {
            virtio: virtio_devs,
            nets,
            vsock,
            mem: ram.memory().clone(),
            pci: pci.then(|| {
                let hotplug = state.as_ref().map(|s| s.pci_hotplug).unwrap_or_default();
                crate::devices::PciHost::new(n_devices, vm.fd.clone(), &hotplug)
            }),
            serial: Mutex::new(match &state {
                Some(st) => serial::Serial::restore(serial_irq, cfg.serial, &st.serial)
                    .map_err(VmmError::Io)?,
                None => serial::Serial::new(serial_irq, cfg.serial),
            }),
            i8042: Mutex::new(I8042::new(sink(&events))),
            debug_exit: DebugExit::new(sink(&events)),
            acpi: AcpiPm::new(
                ged_irq,
                sink(&events),
                &state.as_ref().map(|s| s.acpi.clone()).unwrap_or_default(),
            ),
        });
        bus.pci_refresh();

        if let Some(id) = cfg.vmgenid {
            vm_memory::Bytes::write_slice(
                ram.memory(),
                &id,
                vm_memory::GuestAddress(crate::layout::VMGENID_ADDR),
            )
            .map_err(|e| VmmError::Config(format!("cannot write the VM generation ID: {e}")))?;
        }

        let ahead = match ahead {
            Some(a) if a.vcpus.len() == usize::from(cfg.cpus) => a,
            Some(a) => {
                return Err(VmmError::Config(format!(
                    "the VM was built with {} vCPU(s), the state has {}",
                    a.vcpus.len(),
                    cfg.cpus
                )))
            }
            None => Ahead::build(&vm, cfg.cpus, false)?,
        };
        let Ahead {
            base_cpuid,
            vcpus: fds,
            msrs,
        } = ahead;
        match &state {
            None => {
                let tsc_khz = fds[0].fd.get_tsc_khz().unwrap_or(0);
                for v in &fds {
                    let mut c = base_cpuid.clone();
                    cpuid::patch(&mut c, v.id, cfg.cpus, tsc_khz).map_err(VmmError::Config)?;
                    v.configure(&c, if v.id == 0 { entry } else { None })?;
                }
            }
            Some(st) => {
                // A guest that saw CPU features this host cannot give would crash on
                // its first such instruction: refuse the restore instead. "Can give" is
                // what a vCPU booted here sees (KVM may add to its supported list, as
                // PVM does), read back from vCPU 0 before its saved CPUID replaces it.
                let here = {
                    let tsc_khz = fds[0].fd.get_tsc_khz().unwrap_or(0);
                    let mut c = base_cpuid.clone();
                    cpuid::patch(&mut c, 0, cfg.cpus, tsc_khz).map_err(VmmError::Config)?;
                    fds[0].fd.set_cpuid2(&c).map_err(ioctl("KVM_SET_CPUID2"))?;
                    fds[0]
                        .fd
                        .get_cpuid2(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
                        .map_err(ioctl("KVM_GET_CPUID2"))?
                };
                for s in &st.vcpus {
                    let missing = cpuid::missing_features(&s.cpuid, here.as_slice());
                    if !missing.is_empty() {
                        return Err(VmmError::CpuFeatures {
                            vcpu: s.id,
                            missing: missing.join(", "),
                        });
                    }
                }
                for (v, s) in fds.iter().zip(&st.vcpus) {
                    v.restore(s)?;
                }
                st.vm.restore(&vm)?;
                // Restored with a new generation ID: the guest learns of it
                // when it runs. Raised only now: restoring the interrupt
                // controllers above would have dropped an earlier one.
                if cfg.vmgenid.is_some() {
                    bus.acpi.notify_vmgenid().map_err(VmmError::Io)?;
                }
                // The NICs may sit on another port of the network now.
                for n in &bus.nets {
                    crate::devices::lock(n).announce();
                }
                // A NIC given a MAC other than the image's: its driver read
                // the MAC when it probed, so it must probe again.
                for (j, saved) in st.nets.iter().enumerate() {
                    let mac = crate::devices::lock(&bus.nets[j]).mac();
                    if mac != saved.mac {
                        replug_nic(&bus, j, st.minor, &saved.mac, &mac)?;
                    }
                }
                // Its connections did not come along: the guest hears they were reset.
                if let Some(v) = &bus.vsock {
                    crate::devices::lock(v).transport_reset(ram.memory());
                }
                // Requests the driver made available before the snapshot and
                // the device had not taken yet run once the guest does.
                for d in &bus.virtio {
                    let d = crate::devices::lock(d);
                    for q in 0..d.queues() {
                        let _ = d.kick(q).write(1);
                    }
                }
                for n in &bus.nets {
                    let d = crate::devices::lock(n);
                    for q in 0..virtio::net::QUEUES {
                        let _ = d.kick(q).write(1);
                    }
                }
            }
        }

        let msrs: Arc<[u32]> =
            msrs.unwrap_or_else(|| vcpu::probe_msrs(&fds[0].fd, vcpu::SAVED_MSRS).into());

        vcpu_thread::install_kick_handler().map_err(VmmError::Io)?;
        let (ack_tx, acks) = mpsc::channel();
        let mut vcpus = Vec::new();
        for v in fds {
            vcpus.push(
                VcpuHandle::spawn(
                    v,
                    bus.clone(),
                    ack_tx.clone(),
                    events.clone(),
                    msrs.clone(),
                    true,
                )
                .map_err(VmmError::Io)?,
            );
        }
        // Threads acknowledge their initial paused state.
        for _ in 0..cfg.cpus {
            acks.recv_timeout(Duration::from_secs(10))
                .map_err(|_| VmmError::VcpuStart)?;
        }
        Ok(Machine {
            vcpus,
            _io: io,
            gate,
            io_drain: Duration::ZERO,
            acks,
            bus,
            vm,
            ram,
            cpus: cfg.cpus,
            running: false,
            boost: None,
        })
    }

    /// Lets every vCPU run.
    pub fn resume(&mut self) {
        // Back to their own policy before they run the guest again.
        drop(self.boost.take());
        self.gate.open();
        vcpu_thread::resume_all(&self.vcpus);
        self.running = true;
    }

    /// Stops every vCPU outside `KVM_RUN`; returns how long that took.
    pub fn pause(&mut self) -> Result<Duration, VmmError> {
        // Raised before the kick, so that each runs to acknowledge it at once
        // even where every CPU is busy; a paused vCPU thread only waits.
        if self.boost.is_none() {
            let tids: Vec<i32> = self.vcpus.iter().map(|v| v.tid).collect();
            self.boost = Some(crate::sched::boost(&tids));
        }
        let took = vcpu_thread::pause_all(&self.vcpus, &self.acks).ok_or(VmmError::PauseTimeout)?;
        // Device I/O stops too: nothing writes guest RAM or a disk while
        // paused. A request in progress ends first (how long: `io_drain`).
        let t = std::time::Instant::now();
        self.gate.close();
        self.io_drain = t.elapsed();
        self.running = false;
        Ok(took)
    }

    /// How long the last [`Machine::pause`] waited, after the vCPUs stopped,
    /// for device I/O in progress (a disk request, a batch of frames) to end.
    pub fn io_drain(&self) -> Duration {
        self.io_drain
    }

    /// True while the vCPUs run.
    pub fn is_running(&self) -> bool {
        self.running
    }

    /// Number of vCPUs.
    pub fn cpus(&self) -> u8 {
        self.cpus
    }

    /// Guest RAM.
    pub fn ram(&self) -> &GuestRam {
        &self.ram
    }

    /// vCPU handles (for saving their state while paused).
    pub fn vcpus(&self) -> &[VcpuHandle] {
        &self.vcpus
    }

    /// The KVM VM.
    pub fn vm(&self) -> &KvmVm {
        &self.vm
    }

    /// The NICs' counters, in device order (id, counters).
    pub fn net_stats(&self) -> Vec<(String, virtio::net::NetStats)> {
        self.bus
            .nets
            .iter()
            .map(|n| {
                let d = crate::devices::lock(n);
                (d.id().to_string(), d.stats)
            })
            .collect()
    }

    /// Port-I/O devices.
    pub fn bus(&self) -> &PioBus {
        &self.bus
    }

    /// The device buses, shared (e.g. with a snapshot writer thread).
    pub fn bus_arc(&self) -> Arc<PioBus> {
        self.bus.clone()
    }

    /// Stops the vCPUs for good and hands the disks back, e.g. to build the
    /// next machine on a reset without opening the images twice. The machine
    /// is unusable afterwards: drop it. Fails if another thread still holds
    /// the device buses ([`Machine::bus_arc`]).
    pub fn take_disks(&mut self) -> Result<Vec<DiskConfig>, VmmError> {
        let _ = self.pause();
        // Joining the vCPU threads and the I/O threads drops their references
        // to the bus and the devices.
        self.vcpus.clear();
        self._io.clear();
        let Some(bus) = Arc::get_mut(&mut self.bus) else {
            return Err(VmmError::DisksInUse);
        };
        let disks = std::mem::take(&mut bus.virtio)
            .into_iter()
            .map(Arc::try_unwrap)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|_| VmmError::DisksInUse)?;
        Ok(disks
            .into_iter()
            .map(|d| {
                let (id, backend, readonly) = d
                    .into_inner()
                    .unwrap_or_else(|e| e.into_inner())
                    .into_parts();
                DiskConfig {
                    id,
                    backend,
                    readonly,
                }
            })
            .collect())
    }

    /// Presses the ACPI power button (`system_powerdown`); what happens next is
    /// up to the guest (one without ACPI ignores it).
    pub fn press_power_button(&self) -> Result<(), VmmError> {
        self.bus.acpi.press_power_button().map_err(VmmError::Io)
    }

    /// The VM generation ID as the guest reads it now.
    pub fn vmgenid(&self) -> Result<[u8; 16], VmmError> {
        let mut id = [0u8; 16];
        vm_memory::Bytes::read_slice(
            self.ram.memory(),
            &mut id,
            vm_memory::GuestAddress(crate::layout::VMGENID_ADDR),
        )
        .map_err(|e| VmmError::Config(format!("cannot read the VM generation ID: {e}")))?;
        Ok(id)
    }

    /// Console input for the guest's serial port; returns how many bytes it took.
    pub fn serial_input(&self, bytes: &[u8]) -> usize {
        crate::devices::lock(&self.bus.serial).input(bytes)
    }

    /// Flushes serial output (before the process exits).
    pub fn flush_serial(&self) {
        crate::devices::lock(&self.bus.serial).flush();
    }
}
