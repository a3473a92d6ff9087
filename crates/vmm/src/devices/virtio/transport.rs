//! The virtio-mmio register window (virtio 1.x §4.2.2, version 2) shared by
//! the devices that move data on the I/O thread (network, vsock): feature
//! negotiation, device status, queue setup and the interrupt status. Each
//! device adds its own configuration space and what a notification or a
//! status change means to it ([`Effect`]).

use serde::{Deserialize, Serialize};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use vmm_sys_util::eventfd::EventFd;

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
        })
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

    /// Raises the used-buffer interrupt.
    pub fn interrupt(&mut self) {
        self.st.interrupt_status |= 1;
        let _ = self.irq.write(1);
    }

    /// Raises the configuration-change interrupt.
    pub fn config_changed(&mut self) {
        self.st.config_generation = self.st.config_generation.wrapping_add(1);
        self.st.interrupt_status |= 2;
        let _ = self.irq.write(1);
    }

    /// The device cannot go on until the driver resets it (virtio 2.1.2).
    pub fn needs_reset(&mut self) {
        self.st.status |= STATUS_NEEDS_RESET;
        self.config_changed();
    }

    /// A guest read of the window; `config` is the device's configuration space.
    pub fn read(&self, offset: u64, data: &mut [u8], config: &[u8]) {
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

    /// A guest write to the window (the configuration space is read-only).
    pub fn write(&mut self, offset: u64, data: &[u8]) -> Effect {
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

    fn set_status(&mut self, v: u32) -> Effect {
        if v == 0 {
            self.st = TransportState {
                config_generation: self.st.config_generation,
                ..TransportState::default()
            };
            self.queues = (0..self.queues.len()).map(|_| VirtQueue::new()).collect();
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
        t(dev).interrupt();
    }
    Ok(())
}
