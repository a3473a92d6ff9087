//! The virtio transport every device shares: feature negotiation, device
//! status, queue setup, notifications and interrupts, behind one of two
//! register layouts — a virtio-mmio window (virtio 1.x §4.2.2, version 2;
//! one interrupt line) or, once [`Transport::attach_pci`] was called, the
//! virtio-pci common configuration, ISR and notification blocks in a PCI
//! BAR with an MSI-X vector per queue ([`super::pci`]). Each device adds its
//! own configuration space and what a notification or a status change means
//! to it ([`Effect`]).

use serde::{Deserialize, Serialize};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use vmm_sys_util::eventfd::EventFd;

use super::pci::{self, Pci, PciState, NO_VECTOR};
use super::queue::{Desc, QueueError, QueueRegs, VirtQueue, QUEUE_MAX};
use vm_memory::GuestMemoryMmap;

const MAGIC: u32 = 0x7472_6976; // "virt"
const VERSION: u32 = 2;
const VENDOR_ID: u32 = 0x534e_4150; // "SNAP"

pub const STATUS_DRIVER_OK: u32 = 4;
pub const STATUS_FEATURES_OK: u32 = 8;
pub const STATUS_NEEDS_RESET: u32 = 64;

/// Where the device's configuration space starts in the window.
pub const CONFIG: u64 = 0x100;
/// The QueueNotify register (what an ioeventfd watches).
pub const QUEUE_NOTIFY: u64 = 0x050;

pub const fn bit(b: u32) -> u64 {
    1 << b
}

/// The transport's registers: part of every such device's saved state.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransportState {
    pub status: u32,
    pub device_features_sel: u32,
    pub driver_features_sel: u32,
    pub driver_features: u64,
    pub queue_sel: u32,
    /// The queues as saved (live in [`Transport::queues`]).
    pub queues: Vec<QueueRegs>,
    pub interrupt_status: u32,
    pub config_generation: u32,
    /// The PCI registers of a device on virtio-pci (absent on virtio-mmio,
    /// and in images from before virtio-pci).
    #[serde(default)]
    pub pci: Option<PciState>,
}

/// What a register write means to the device behind it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Effect {
    None,
    /// The driver reset the device: the transport is back at its reset state.
    Reset,
    /// The driver set DRIVER_OK: the device is live.
    DriverOk,
}

pub struct Transport {
    device_id: u32,
    /// Features offered.
    features: u64,
    pub st: TransportState,
    /// The live queues (`st.queues` is stale while running).
    pub queues: Vec<VirtQueue>,
    irq: EventFd,
    /// Queue notifications, one per queue: KVM signals them (ioeventfd), or
    /// the MMIO handler does where that could not be registered.
    kicks: Vec<EventFd>,
    /// The PCI side, on virtio-pci (its registers are `st.pci` when saved).
    pci: Option<Pci>,
}

impl Transport {
    pub fn new(
        device_id: u32,
        features: u64,
        queues: usize,
        irq: EventFd,
    ) -> std::io::Result<Self> {
        let kicks = (0..queues)
            .map(|_| EventFd::new(libc::EFD_NONBLOCK))
            .collect::<std::io::Result<Vec<_>>>()?;
        Ok(Transport {
            device_id,
            features,
            st: TransportState::default(),
            queues: (0..queues).map(|_| VirtQueue::new()).collect(),
            irq,
            kicks,
            pci: None,
        })
    }

    /// Moves the device onto virtio-pci: `vectors` (one per queue and one
    /// for configuration changes, connected to GSIs `gsi_base..`) replace
    /// the interrupt line; a restored state's PCI registers are kept (and
    /// its MSI-X table routed again), otherwise BAR 0 starts at `bar0`.
    pub fn attach_pci(
        &mut self,
        bar0: u32,
        vectors: Vec<EventFd>,
        gsi_base: u32,
        routes: std::sync::Arc<dyn pci::MsiRoutes>,
    ) -> Result<(), String> {
        let st = match self.st.pci.take() {
            Some(st) if st.queue_vectors.len() == self.queues.len() => st,
            Some(st) => {
                return Err(format!(
                    "the saved PCI state has {} queues, the device has {}",
                    st.queue_vectors.len(),
                    self.queues.len()
                ))
            }
            None => PciState::new(bar0, self.queues.len()),
        };
        self.pci = Some(Pci::new(self.device_id, st, vectors, gsi_base, routes)?);
        Ok(())
    }

    /// The device is on virtio-pci.
    pub fn is_pci(&self) -> bool {
        self.pci.is_some()
    }

    /// Where BAR 0 is (virtio-pci, memory decoding on).
    pub fn pci_bar(&self) -> Option<u64> {
        self.pci.as_ref().and_then(Pci::bar)
    }

    /// A guest read of the PCI configuration space.
    pub fn pci_config_read(&self, off: usize, data: &mut [u8]) {
        match &self.pci {
            Some(p) => p.config_read(off, data),
            None => data.fill(0xff),
        }
    }

    /// A guest write to the PCI configuration space.
    pub fn pci_config_write(&mut self, off: usize, data: &[u8]) {
        if let Some(p) = &mut self.pci {
            p.config_write(off, data);
        }
    }

    /// Takes saved registers (the device checked they fit).
    pub fn restore(&mut self, st: &TransportState) -> Result<(), String> {
        if st.queues.len() != self.queues.len() {
            return Err(format!(
                "the saved state has {} queues, the device has {}",
                st.queues.len(),
                self.queues.len()
            ));
        }
        self.st = st.clone();
        self.queues = st.queues.iter().map(VirtQueue::restore).collect();
        Ok(())
    }

    pub fn save(&self) -> TransportState {
        TransportState {
            queues: self.queues.iter().map(VirtQueue::save).collect(),
            pci: self.pci.as_ref().map(|p| p.st.clone()),
            ..self.st.clone()
        }
    }

    /// The notification eventfd of queue `q`.
    pub fn kick(&self, q: usize) -> &EventFd {
        &self.kicks[q]
    }

    pub fn negotiated(&self, b: u32) -> bool {
        self.st.driver_features & bit(b) != 0
    }

    /// DRIVER_OK and not broken.
    pub fn driver_ok(&self) -> bool {
        self.st.status & STATUS_DRIVER_OK != 0 && self.st.status & STATUS_NEEDS_RESET == 0
    }

    /// Raises queue `q`'s used-buffer interrupt.
    pub fn interrupt(&mut self, q: usize) {
        self.st.interrupt_status |= 1;
        match &mut self.pci {
            Some(p) => {
                let v = p.st.queue_vectors.get(q).copied().unwrap_or(NO_VECTOR);
                p.signal(v);
            }
            None => {
                let _ = self.irq.write(1);
            }
        }
    }

    /// Raises the configuration-change interrupt.
    pub fn config_changed(&mut self) {
        self.st.config_generation = self.st.config_generation.wrapping_add(1);
        self.st.interrupt_status |= 2;
        match &mut self.pci {
            Some(p) => {
                let v = p.st.config_vector;
                p.signal(v);
            }
            None => {
                let _ = self.irq.write(1);
            }
        }
    }

    /// The device was re-plugged: the transport and its PCI registers are
    /// as at power-on (the device resets its own state, as for
    /// [`Effect::Reset`]).
    pub fn power_on(&mut self) {
        self.set_status(0);
        if let Some(p) = &mut self.pci {
            p.power_on();
        }
    }

    /// The device cannot go on until the driver resets it (virtio 2.1.2).
    pub fn needs_reset(&mut self) {
        self.st.status |= STATUS_NEEDS_RESET;
        self.config_changed();
    }

    /// A guest read of the window (virtio-mmio) or BAR 0 (virtio-pci);
    /// `config` is the device's configuration space.
    pub fn read(&mut self, offset: u64, data: &mut [u8], config: &[u8]) {
        if self.pci.is_some() {
            self.pci_read(offset, data, config);
            return;
        }
        if offset >= CONFIG {
            for (i, b) in data.iter_mut().enumerate() {
                *b = config
                    .get((offset - CONFIG) as usize + i)
                    .copied()
                    .unwrap_or(0);
            }
            return;
        }
        let q = self.queues.get(self.st.queue_sel as usize);
        let v: u32 = match offset {
            0x000 => MAGIC,
            0x004 => VERSION,
            0x008 => self.device_id,
            0x00c => VENDOR_ID,
            0x010 => match self.st.device_features_sel {
                0 => self.features as u32,
                1 => (self.features >> 32) as u32,
                _ => 0,
            },
            0x034 if q.is_some() => u32::from(QUEUE_MAX),
            0x044 => q.map(|q| u32::from(q.ready())).unwrap_or(0),
            0x060 => self.st.interrupt_status,
            0x070 => self.st.status,
            0x0fc => self.st.config_generation,
            _ => 0,
        };
        let bytes = v.to_le_bytes();
        let n = data.len().min(4);
        data[..n].copy_from_slice(&bytes[..n]);
    }

    /// A guest write to the window or BAR 0 (the configuration space is read-only).
    pub fn write(&mut self, offset: u64, data: &[u8]) -> Effect {
        if self.pci.is_some() {
            return self.pci_write(offset, data);
        }
        if data.len() != 4 {
            return Effect::None; // registers are 32-bit
        }
        let v = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
        let lo = |old: u64| (old & !0xffff_ffff) | u64::from(v);
        let hi = |old: u64| (old & 0xffff_ffff) | (u64::from(v) << 32);
        let sel = self.st.queue_sel as usize;
        let setup = self.st.status & STATUS_FEATURES_OK != 0
            && self.queues.get(sel).is_some_and(|q| !q.ready());
        match offset {
            0x014 => self.st.device_features_sel = v,
            0x020 => match self.st.driver_features_sel {
                0 => self.st.driver_features = lo(self.st.driver_features),
                1 => self.st.driver_features = hi(self.st.driver_features),
                _ => {}
            },
            0x024 => self.st.driver_features_sel = v,
            0x030 => self.st.queue_sel = v,
            0x038 => {
                if let Some(q) = self.queues.get_mut(sel) {
                    q.set_size(v);
                }
            }
            0x044 => {
                if let Some(q) = self.queues.get_mut(sel) {
                    q.set_ready(v == 1);
                }
            }
            QUEUE_NOTIFY => {
                if let Some(k) = self.kicks.get(v as usize) {
                    let _ = k.write(1);
                }
            }
            0x064 => self.st.interrupt_status &= !v,
            0x070 => return self.set_status(v),
            0x080..=0x0a4 if setup => {
                let which = ((offset - 0x080) / 0x10) as u8;
                let (low, high) = if offset.is_multiple_of(0x10) {
                    (Some(v), None)
                } else {
                    (None, Some(v))
                };
                if let Some(q) = self.queues.get_mut(sel) {
                    q.set_addr(which, low, high);
                }
            }
            _ => {}
        }
        Effect::None
    }

    /// A read of BAR 0 on virtio-pci.
    fn pci_read(&mut self, offset: u64, data: &mut [u8], config: &[u8]) {
        let region = offset & !(pci::REGION - 1);
        let at = (offset - region) as usize;
        match region {
            pci::COMMON => {
                let c = self.common_config();
                for (i, b) in data.iter_mut().enumerate() {
                    *b = c.get(at + i).copied().unwrap_or(0);
                }
            }
            pci::ISR => {
                // Reading the ISR acknowledges it.
                data.fill(0);
                if at == 0 {
                    data[0] = self.st.interrupt_status as u8;
                    self.st.interrupt_status = 0;
                }
            }
            pci::DEVICE => {
                for (i, b) in data.iter_mut().enumerate() {
                    *b = config.get(at + i).copied().unwrap_or(0);
                }
            }
            pci::MSIX_TABLE | pci::MSIX_PBA => {
                if let Some(p) = &self.pci {
                    p.msix_read(offset, data);
                }
            }
            _ => data.fill(0),
        }
    }

    /// The common configuration block (virtio 1.x §4.1.4.3) as read now.
    fn common_config(&self) -> [u8; 0x38] {
        let mut c = [0u8; 0x38];
        let sel = self.st.queue_sel as usize;
        let q = self.queues.get(sel);
        let p = self.pci.as_ref().map(|p| &p.st);
        let features = match self.st.device_features_sel {
            0 => self.features as u32,
            1 => (self.features >> 32) as u32,
            _ => 0,
        };
        let driver = match self.st.driver_features_sel {
            0 => self.st.driver_features as u32,
            1 => (self.st.driver_features >> 32) as u32,
            _ => 0,
        };
        let regs = q.map(VirtQueue::save).unwrap_or_default();
        c[0x00..0x04].copy_from_slice(&self.st.device_features_sel.to_le_bytes());
        c[0x04..0x08].copy_from_slice(&features.to_le_bytes());
        c[0x08..0x0c].copy_from_slice(&self.st.driver_features_sel.to_le_bytes());
        c[0x0c..0x10].copy_from_slice(&driver.to_le_bytes());
        let config_vector = p.map(|p| p.config_vector).unwrap_or(NO_VECTOR);
        c[0x10..0x12].copy_from_slice(&config_vector.to_le_bytes());
        c[0x12..0x14].copy_from_slice(&(self.queues.len() as u16).to_le_bytes());
        c[0x14] = self.st.status as u8;
        c[0x15] = self.st.config_generation as u8;
        c[0x16..0x18].copy_from_slice(&(self.st.queue_sel as u16).to_le_bytes());
        if q.is_some() {
            let vector = p
                .and_then(|p| p.queue_vectors.get(sel).copied())
                .unwrap_or(NO_VECTOR);
            c[0x18..0x1a].copy_from_slice(&regs.size.to_le_bytes());
            c[0x1a..0x1c].copy_from_slice(&vector.to_le_bytes());
            c[0x1c..0x1e].copy_from_slice(&u16::from(regs.ready).to_le_bytes());
            c[0x1e..0x20].copy_from_slice(&(sel as u16).to_le_bytes());
            c[0x20..0x28].copy_from_slice(&regs.desc.to_le_bytes());
            c[0x28..0x30].copy_from_slice(&regs.avail.to_le_bytes());
            c[0x30..0x38].copy_from_slice(&regs.used.to_le_bytes());
        }
        c
    }

    /// A write to BAR 0 on virtio-pci.
    fn pci_write(&mut self, offset: u64, data: &[u8]) -> Effect {
        let region = offset & !(pci::REGION - 1);
        let at = offset - region;
        if data.is_empty() || data.len() > 8 {
            return Effect::None;
        }
        let mut b = [0u8; 8];
        b[..data.len()].copy_from_slice(data);
        let v = u64::from_le_bytes(b);
        match region {
            pci::COMMON => return self.common_write(at, data.len(), v),
            pci::NOTIFY => {
                // Normally KVM signals the eventfd itself (ioeventfd).
                let q = (at / pci::NOTIFY_MULTIPLIER) as usize;
                if let Some(k) = self.kicks.get(q) {
                    let _ = k.write(1);
                }
            }
            pci::MSIX_TABLE | pci::MSIX_PBA => {
                if let Some(p) = &mut self.pci {
                    p.msix_write(offset, data);
                }
            }
            _ => {}
        }
        Effect::None
    }

    fn common_write(&mut self, at: u64, len: usize, v: u64) -> Effect {
        let v32 = v as u32;
        let lo = |old: u64| (old & !0xffff_ffff) | u64::from(v32);
        let hi = |old: u64| (old & 0xffff_ffff) | (u64::from(v32) << 32);
        let sel = self.st.queue_sel as usize;
        let setup = self.st.status & STATUS_FEATURES_OK != 0
            && self.queues.get(sel).is_some_and(|q| !q.ready());
        match (at, len) {
            (0x00, 4) => self.st.device_features_sel = v32,
            (0x08, 4) => self.st.driver_features_sel = v32,
            (0x0c, 4) => match self.st.driver_features_sel {
                0 => self.st.driver_features = lo(self.st.driver_features),
                1 => self.st.driver_features = hi(self.st.driver_features),
                _ => {}
            },
            (0x10, 2) => {
                if let Some(p) = &mut self.pci {
                    p.st.config_vector = p.valid_vector(v as u16);
                }
            }
            (0x14, 1) => return self.set_status(v32 & 0xff),
            (0x16, 2) => self.st.queue_sel = v32 & 0xffff,
            (0x18, 2) if setup => self.queues[sel].set_size(v32 & 0xffff),
            (0x1a, 2) => {
                if let Some(p) = &mut self.pci {
                    let vector = p.valid_vector(v as u16);
                    if let Some(slot) = p.st.queue_vectors.get_mut(sel) {
                        *slot = vector;
                    }
                }
            }
            (0x1c, 2) if setup && v == 1 => self.queues[sel].set_ready(true),
            (0x20..=0x37, 4) if setup => {
                let which = ((at - 0x20) / 8) as u8;
                let (low, high) = if at.is_multiple_of(8) {
                    (Some(v32), None)
                } else {
                    (None, Some(v32))
                };
                self.queues[sel].set_addr(which, low, high);
            }
            (0x20..=0x37, 8) if setup && at.is_multiple_of(8) => {
                let which = ((at - 0x20) / 8) as u8;
                self.queues[sel].set_addr(which, Some(v32), Some((v >> 32) as u32));
            }
            _ => {}
        }
        Effect::None
    }

    fn set_status(&mut self, v: u32) -> Effect {
        if v == 0 {
            self.st = TransportState {
                config_generation: self.st.config_generation,
                ..TransportState::default()
            };
            self.queues = (0..self.queues.len()).map(|_| VirtQueue::new()).collect();
            if let Some(p) = &mut self.pci {
                p.reset();
            }
            return Effect::Reset;
        }
        let mut v = v;
        // FEATURES_OK sticks only for a feature set we offered, with VERSION_1.
        if v & STATUS_FEATURES_OK != 0
            && (self.st.driver_features & !self.features != 0
                || self.st.driver_features & bit(VIRTIO_F_VERSION_1) == 0)
        {
            v &= !STATUS_FEATURES_OK;
        }
        let now_ok = v & STATUS_DRIVER_OK != 0 && self.st.status & STATUS_DRIVER_OK == 0;
        self.st.status = v;
        let event_idx = self.negotiated(VIRTIO_RING_F_EVENT_IDX);
        for q in &mut self.queues {
            q.set_event_idx(event_idx);
        }
        if now_ok {
            Effect::DriverOk
        } else {
            Effect::None
        }
    }
}

/// Serves queue `q` of device `dev` (whose transport `t` returns): hands
/// every chain the driver made available to `handle` (which returns the
/// bytes it wrote into the chain), completes each, re-arms notifications
/// (taking what slipped in meanwhile) and interrupts if the driver wants.
/// `Err`: the rings themselves are unusable.
pub fn serve<D>(
    dev: &mut D,
    t: fn(&mut D) -> &mut Transport,
    q: usize,
    mem: &GuestMemoryMmap,
    mut handle: impl FnMut(&mut D, Result<Vec<Desc>, QueueError>) -> u32,
) -> Result<(), QueueError> {
    let mut used = false;
    loop {
        while let Some((head, chain)) = t(dev).queues[q].pop(mem)? {
            let written = handle(dev, chain);
            t(dev).queues[q].push_used(mem, head, written)?;
            used = true;
        }
        if !t(dev).queues[q].rearm(mem)? {
            break;
        }
    }
    if used && t(dev).queues[q].needs_interrupt(mem)? {
        t(dev).interrupt(q);
    }
    Ok(())
}
