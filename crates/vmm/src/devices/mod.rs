//! Port-I/O devices and the bus that routes guest `in`/`out` to them.
//!
//! The irqchip (PIC, IOAPIC) and the PIT are KVM's in-kernel ones; the legacy
//! devices here are small register state machines (vm-superio) whose saved
//! state is plain data (see each device's `State`).

pub mod acpi;
pub mod debug_exit;
pub mod hotplug;
pub mod i8042;
pub mod io_thread;
pub mod serial;
pub mod virtio;

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// Something a device asks of the machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceRequest {
    /// Power off with this process exit status (debug-exit port).
    PowerOff(i32),
    /// CPU reset requested by the guest (i8042 command 0xfe).
    Reset,
}

/// Where devices send their requests.
pub type RequestSink = Box<dyn Fn(DeviceRequest) + Send + Sync>;

/// PCI configuration mechanism #1: the address port, then the data ports.
pub const PCI_CONFIG_ADDRESS: u16 = 0xcf8;
const PCI_CONFIG_DATA: u16 = 0xcfc;
const PCI_CONFIG_DATA_LAST: u16 = 0xcff;

/// PCI bus 0 when the virtio devices are on virtio-pci: a host bridge at
/// device 0, then virtio device `i` at device `i + 1`.
pub struct PciHost {
    /// The configuration address the guest last wrote (0xcf8).
    address: AtomicU32,
    /// Each device's BAR 0 while decoded (0: not), kept here so that MMIO
    /// finds its device without locking every device.
    bars: Vec<AtomicU64>,
    /// The VM, to move a device's queue notifications (ioeventfds) with
    /// its BAR.
    vm: Arc<kvm_ioctls::VmFd>,
    /// The re-plug registers (ACPI PCI hotplug).
    pub hotplug: hotplug::PciHotplug,
}

impl PciHost {
    /// Bus 0 for `devices` virtio devices, whose queue notifications were
    /// registered (ioeventfds) at their BARs' addresses; `hotplug`: a
    /// re-plug in progress when the machine was saved.
    pub fn new(
        devices: usize,
        vm: Arc<kvm_ioctls::VmFd>,
        hotplug: &hotplug::PciHotplugState,
    ) -> PciHost {
        PciHost {
            address: AtomicU32::new(0),
            bars: (0..devices).map(|_| AtomicU64::new(0)).collect(),
            vm,
            hotplug: hotplug::PciHotplug::new(hotplug),
        }
    }

    /// Device `i`'s BAR after its registers changed: published for MMIO,
    /// and its notifications moved with it.
    fn bar_changed(&self, i: usize, t: &virtio::transport::Transport) {
        let Some(slot) = self.bars.get(i) else {
            return;
        };
        let bar = t.pci_bar().unwrap_or(0);
        let was = slot.swap(bar, Ordering::AcqRel);
        if was != bar {
            self.move_notifications(t, was, bar);
        }
    }

    /// The guest moved a device's BAR (or turned decoding off or on): its
    /// notifications follow, so that KVM signals them at the new address
    /// and nothing at the old one swallows another device's writes. Where
    /// one cannot be registered, the MMIO handler signals it instead.
    fn move_notifications(&self, t: &virtio::transport::Transport, from: u64, to: u64) {
        use kvm_ioctls::{IoEventAddress, NoDatamatch};
        let at = |bar: u64, q: usize| {
            IoEventAddress::Mmio(
                bar + virtio::pci::NOTIFY + virtio::pci::NOTIFY_MULTIPLIER * q as u64,
            )
        };
        for q in 0..t.queues.len() {
            if from != 0 {
                let _ = self
                    .vm
                    .unregister_ioevent(t.kick(q), &at(from, q), NoDatamatch);
            }
            if to != 0 {
                if let Err(e) = self.vm.register_ioevent(t.kick(q), &at(to, q), NoDatamatch) {
                    tracing::debug!("no ioeventfd for queue {q} at BAR {to:#x}: {e}");
                }
            }
        }
    }

    /// The host bridge's configuration space (QEMU's generic host bridge IDs).
    fn bridge_read(reg: usize, data: &mut [u8]) {
        let mut c = [0u8; 64];
        c[0..2].copy_from_slice(&0x1b36u16.to_le_bytes());
        c[2..4].copy_from_slice(&0x0008u16.to_le_bytes());
        c[0x0b] = 0x06; // class: bridge, host
        for (i, b) in data.iter_mut().enumerate() {
            *b = c.get(reg + i).copied().unwrap_or(0);
        }
    }
}

/// The device buses: port I/O — serial (0x3f8–0x3ff), i8042 (0x60, 0x64),
/// debug-exit (0xf4–0xf7), ACPI power management (0x600–0x609), PCI
/// configuration (0xcf8–0xcff), PCI re-plug (0xae00–0xae0b) — and MMIO — virtio devices from
/// [`virtio::MMIO_BASE`], one 4 KiB window each, or at their BARs on
/// virtio-pci: the disks first, then the NICs, then vsock.
pub struct PioBus {
    pub serial: Mutex<serial::Serial>,
    pub i8042: Mutex<i8042::I8042>,
    pub debug_exit: debug_exit::DebugExit,
    pub acpi: acpi::AcpiPm,
    /// Disks, shared with the I/O thread that runs their requests.
    pub virtio: Vec<Arc<Mutex<virtio::VirtioBlk>>>,
    /// NICs, shared with the I/O thread that moves their frames.
    pub nets: Vec<Arc<Mutex<virtio::net::VirtioNet>>>,
    /// The vsock device (after the NICs), shared with the I/O thread.
    pub vsock: Option<Arc<Mutex<virtio::vsock::VirtioVsock>>>,
    /// Guest memory, for devices that read their rings and buffers.
    pub mem: vm_memory::GuestMemoryMmap,
    /// Bus 0, when the virtio devices are on virtio-pci.
    pub pci: Option<PciHost>,
}

/// The virtio device behind an MMIO window.
enum Slot<'a> {
    Disk(&'a Mutex<virtio::VirtioBlk>),
    Nic(&'a Mutex<virtio::net::VirtioNet>),
    Vsock(&'a Mutex<virtio::vsock::VirtioVsock>),
}

impl PioBus {
    /// Virtio device `i` (disks, then NICs, then vsock).
    fn slot(&self, i: usize) -> Option<Slot<'_>> {
        let nics = self.virtio.len() + self.nets.len();
        if let Some(d) = self.virtio.get(i) {
            Some(Slot::Disk(d))
        } else if let Some(n) = self.nets.get(i - self.virtio.len()) {
            Some(Slot::Nic(n))
        } else if i == nics {
            self.vsock.as_deref().map(Slot::Vsock)
        } else {
            None
        }
    }

    fn virtio_at(&self, addr: u64) -> Option<(Slot<'_>, u64)> {
        if let Some(pci) = &self.pci {
            return pci.bars.iter().enumerate().find_map(|(i, b)| {
                let bar = b.load(Ordering::Acquire);
                let at = addr.checked_sub(bar)?;
                (bar != 0 && at < virtio::pci::BAR_SIZE).then(|| Some((self.slot(i)?, at)))?
            });
        }
        let off = addr.checked_sub(virtio::MMIO_BASE)?;
        let i = (off / virtio::MMIO_SIZE) as usize;
        Some((self.slot(i)?, off % virtio::MMIO_SIZE))
    }

    /// The transport of virtio device `i`, locked, for `f`.
    fn with_transport<R>(
        &self,
        i: usize,
        f: impl FnOnce(&mut virtio::transport::Transport) -> R,
    ) -> Option<R> {
        Some(match self.slot(i)? {
            Slot::Disk(d) => f(lock(d).transport_mut()),
            Slot::Nic(n) => f(lock(n).transport_mut()),
            Slot::Vsock(v) => f(lock(v).transport_mut()),
        })
    }

    /// A read of the PCI configuration data ports: (device, register).
    fn pci_config(&self, pci: &PciHost, port: u16) -> Option<(usize, usize)> {
        let a = pci.address.load(Ordering::Acquire);
        let (bus, dev, func) = ((a >> 16) & 0xff, (a >> 11) & 0x1f, (a >> 8) & 7);
        if a & (1 << 31) == 0 || bus != 0 || func != 0 {
            return None;
        }
        Some((
            dev as usize,
            (a & 0xfc) as usize + usize::from(port - PCI_CONFIG_DATA),
        ))
    }

    fn pci_read(&self, pci: &PciHost, port: u16, data: &mut [u8]) {
        if port == PCI_CONFIG_ADDRESS && data.len() == 4 {
            data.copy_from_slice(&pci.address.load(Ordering::Acquire).to_le_bytes());
            return;
        }
        if port < PCI_CONFIG_DATA {
            return;
        }
        match self.pci_config(pci, port) {
            Some((0, reg)) => PciHost::bridge_read(reg, data),
            Some((dev, reg)) => {
                self.with_transport(dev - 1, |t| t.pci_config_read(reg, data));
            }
            None => {}
        }
    }

    fn pci_write(&self, pci: &PciHost, port: u16, data: &[u8]) {
        if port == PCI_CONFIG_ADDRESS && data.len() == 4 {
            let a = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
            pci.address.store(a, Ordering::Release);
            return;
        }
        if port < PCI_CONFIG_DATA {
            return;
        }
        if let Some((dev, reg)) = self.pci_config(pci, port).filter(|(d, _)| *d > 0) {
            self.with_transport(dev - 1, |t| {
                t.pci_config_write(reg, data);
                pci.bar_changed(dev - 1, t);
            });
        }
    }

    /// Asks the guest to re-plug virtio device `i` (on virtio-pci), so that
    /// its driver probes it again ([`hotplug`]): a NIC given a new MAC at a
    /// restore. `Ok(false)`: not on virtio-pci, nothing asked.
    pub fn replug(&self, i: usize) -> std::io::Result<bool> {
        let Some(pci) = &self.pci else {
            return Ok(false);
        };
        if i + 1 >= 32 || self.slot(i).is_none() {
            return Ok(false);
        }
        pci.hotplug.request(i as u8 + 1);
        self.acpi.notify_pci_hotplug()?;
        Ok(true)
    }

    /// The guest ejected what it was asked to: each such device is put in
    /// its power-on state and the guest told to scan its slot again.
    fn hotplug_write(&self, pci: &PciHost, port: u16, data: &[u8]) {
        let slots = pci.hotplug.eject(port, data);
        if slots == 0 {
            return;
        }
        for dev in (1..32).filter(|d| slots & (1 << d) != 0) {
            let i = dev - 1;
            match self.slot(i) {
                Some(Slot::Nic(n)) => {
                    let mut n = lock(n);
                    n.power_on();
                    tracing::info!(
                        nic = n.id(),
                        "the guest let the NIC go: plugged in again with MAC {}",
                        virtio::net::format_mac(&n.mac())
                    );
                    pci.bar_changed(i, n.transport_mut());
                }
                _ => tracing::warn!("PCI device {dev} ejected: not a device that re-plugs"),
            }
        }
        pci.hotplug.inserted(slots);
        if let Err(e) = self.acpi.notify_pci_hotplug() {
            tracing::warn!("cannot tell the guest to scan its PCI slots: {e}");
        }
    }

    /// Publishes every device's BAR (after the devices were built or restored).
    pub fn pci_refresh(&self) {
        if let Some(pci) = &self.pci {
            for (i, slot) in pci.bars.iter().enumerate() {
                let bar = self.with_transport(i, |t| t.pci_bar().unwrap_or(0));
                slot.store(bar.unwrap_or(0), Ordering::Release);
            }
        }
    }

    /// Handles a guest MMIO read; unclaimed addresses read as all ones.
    pub fn mmio_read(&self, addr: u64, data: &mut [u8]) {
        match self.virtio_at(addr) {
            Some((Slot::Disk(d), off)) => lock(d).read(off, data),
            Some((Slot::Nic(n), off)) => lock(n).read(off, data),
            Some((Slot::Vsock(v), off)) => lock(v).read(off, data),
            None => data.fill(0xff),
        }
    }

    /// Handles a guest MMIO write; writes to unclaimed addresses are ignored.
    pub fn mmio_write(&self, addr: u64, data: &[u8]) {
        match self.virtio_at(addr) {
            Some((Slot::Disk(d), off)) => lock(d).write(off, data),
            Some((Slot::Nic(n), off)) => lock(n).write(off, data),
            Some((Slot::Vsock(v), off)) => lock(v).write(off, data),
            None => {}
        }
    }

    /// Handles a guest `in`; unclaimed ports read as all ones, like an empty ISA bus.
    pub fn read(&self, port: u16, data: &mut [u8]) {
        data.fill(0xff);
        match port {
            serial::BASE..=serial::LAST => {
                data[0] = lock(&self.serial).read((port - serial::BASE) as u8);
            }
            i8042::DATA | i8042::COMMAND => data[0] = lock(&self.i8042).read(port),
            acpi::BASE..=acpi::LAST => self.acpi.read(port, data),
            PCI_CONFIG_ADDRESS..=PCI_CONFIG_DATA_LAST => {
                if let Some(pci) = &self.pci {
                    self.pci_read(pci, port, data);
                }
            }
            hotplug::BASE..=hotplug::LAST => {
                if let Some(pci) = &self.pci {
                    pci.hotplug.read(port, data);
                }
            }
            _ => {}
        }
    }

    /// Handles a guest `out`; writes to unclaimed ports are ignored.
    pub fn write(&self, port: u16, data: &[u8]) {
        match port {
            serial::BASE..=serial::LAST => {
                lock(&self.serial).write((port - serial::BASE) as u8, data[0])
            }
            i8042::DATA | i8042::COMMAND => lock(&self.i8042).write(port, data[0]),
            debug_exit::BASE..=debug_exit::LAST => self.debug_exit.write(data),
            acpi::BASE..=acpi::LAST => self.acpi.write(port, data),
            PCI_CONFIG_ADDRESS..=PCI_CONFIG_DATA_LAST => {
                if let Some(pci) = &self.pci {
                    self.pci_write(pci, port, data);
                }
            }
            hotplug::BASE..=hotplug::LAST => {
                if let Some(pci) = &self.pci {
                    self.hotplug_write(pci, port, data);
                }
            }
            _ => {}
        }
    }
}

/// Locks a device; a poisoned lock (a panic while holding it) still yields the device,
/// whose register state is always consistent between two accesses.
pub fn lock<T: ?Sized>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
