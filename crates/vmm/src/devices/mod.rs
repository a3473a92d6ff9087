//! Port-I/O devices and the bus that routes guest `in`/`out` to them.
//!
//! The irqchip (PIC, IOAPIC) and the PIT are KVM's in-kernel ones; the legacy
//! devices here are small register state machines (vm-superio) whose saved
//! state is plain data (see each device's `State`).

pub mod acpi;
pub mod debug_exit;
pub mod i8042;
pub mod io_thread;
pub mod serial;
pub mod virtio;

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

/// The device buses: port I/O — serial (0x3f8–0x3ff), i8042 (0x60, 0x64),
/// debug-exit (0xf4–0xf7), ACPI power management (0x600–0x603) — and MMIO — virtio devices from
/// [`virtio::MMIO_BASE`], one 4 KiB window each: the disks first, then the NICs.
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
}

/// The virtio device behind an MMIO window.
enum Slot<'a> {
    Disk(&'a Mutex<virtio::VirtioBlk>),
    Nic(&'a Mutex<virtio::net::VirtioNet>),
    Vsock(&'a Mutex<virtio::vsock::VirtioVsock>),
}

impl PioBus {
    fn virtio_at(&self, addr: u64) -> Option<(Slot<'_>, u64)> {
        let off = addr.checked_sub(virtio::MMIO_BASE)?;
        let i = (off / virtio::MMIO_SIZE) as usize;
        let at = off % virtio::MMIO_SIZE;
        let nics = self.virtio.len() + self.nets.len();
        if let Some(d) = self.virtio.get(i) {
            Some((Slot::Disk(d), at))
        } else if let Some(n) = self.nets.get(i - self.virtio.len()) {
            Some((Slot::Nic(n), at))
        } else if i == nics {
            self.vsock.as_deref().map(|v| (Slot::Vsock(v), at))
        } else {
            None
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
            _ => {}
        }
    }
}

/// Locks a device; a poisoned lock (a panic while holding it) still yields the device,
/// whose register state is always consistent between two accesses.
pub fn lock<T: ?Sized>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
