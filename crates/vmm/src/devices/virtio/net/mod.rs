//! virtio-net over the virtio-mmio transport (version 2, "modern"), with a
//! receive, a transmit and a control queue.
//!
//! The vCPU thread only touches registers: a queue notification wakes the
//! network I/O thread ([`super::super::io_thread`]), which moves frames
//! between the rings and the backend (a TAP device, [`tap::Tap`]). Frames
//! carry the 12-byte `virtio_net_hdr_v1` both ways, so checksum and
//! segmentation offloads pass between the guest and the host kernel as they
//! are. While the machine is paused the I/O thread holds off (the machine's
//! I/O gate), so a snapshot never sees a frame half-written into guest RAM;
//! a frame read from the backend but not yet delivered is dropped at a
//! snapshot, as a network may drop any frame.

pub mod tap;

use std::io;
use std::os::fd::RawFd;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_net as vn;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::queue::{Desc, QueueError, QueueRegs, VirtQueue, QUEUE_MAX};

const MAGIC: u32 = 0x7472_6976; // "virt"
const VERSION: u32 = 2;
const DEVICE_ID_NET: u32 = 1;
const VENDOR_ID: u32 = 0x534e_4150; // "SNAP"

const STATUS_DRIVER_OK: u32 = 4;
const STATUS_FEATURES_OK: u32 = 8;
const STATUS_NEEDS_RESET: u32 = 64;

/// The queues: receive, transmit, control.
pub const RX: usize = 0;
pub const TX: usize = 1;
pub const CTRL: usize = 2;
pub const QUEUES: usize = 3;

/// `virtio_net_hdr_v1`: what precedes every frame, both ways (and what the
/// tap is told to use, `TUNSETVNETHDRSZ`).
pub const HDR_LEN: usize = 12;
/// Largest frame with its header: a 64 KiB GSO frame plus an Ethernet header
/// and a VLAN tag. A guest cannot make the device read or write more.
pub const MAX_FRAME: usize = HDR_LEN + 65_535 + 14 + 4;

// tun offload flags (<linux/if_tun.h>).
const TUN_F_CSUM: u32 = 1;
const TUN_F_TSO4: u32 = 2;
const TUN_F_TSO6: u32 = 4;

const fn bit(b: u32) -> u64 {
    1 << b
}

/// Features the device offers.
const FEATURES: u64 = bit(VIRTIO_F_VERSION_1)
    | bit(VIRTIO_RING_F_EVENT_IDX)
    | bit(VIRTIO_RING_F_INDIRECT_DESC)
    | bit(vn::VIRTIO_NET_F_MAC)
    | bit(vn::VIRTIO_NET_F_STATUS)
    | bit(vn::VIRTIO_NET_F_MRG_RXBUF)
    | bit(vn::VIRTIO_NET_F_CTRL_VQ)
    | bit(vn::VIRTIO_NET_F_GUEST_ANNOUNCE)
    | bit(vn::VIRTIO_NET_F_CSUM)
    | bit(vn::VIRTIO_NET_F_HOST_TSO4)
    | bit(vn::VIRTIO_NET_F_HOST_TSO6)
    | bit(vn::VIRTIO_NET_F_GUEST_CSUM)
    | bit(vn::VIRTIO_NET_F_GUEST_TSO4)
    | bit(vn::VIRTIO_NET_F_GUEST_TSO6);

/// Where frames come from and go to: one frame (with its header) per call.
pub trait NetBackend: Send + Sync {
    /// A descriptor that polls readable when a frame can be received.
    fn fd(&self) -> RawFd;
    /// The host interface's name (for messages).
    fn name(&self) -> &str;
    /// One frame, or `WouldBlock` when none is waiting.
    fn recv(&self, buf: &mut [u8]) -> io::Result<usize>;
    /// Sends one frame.
    fn send(&self, frame: &[u8]) -> io::Result<usize>;
    /// Which offloads the guest can take in received frames (`TUN_F_*`).
    fn set_offloads(&self, flags: u32) -> io::Result<()>;
}

/// The MAC a NIC gets when none is given: stable for its id, locally
/// administered, in QEMU's 52:54:00 range.
pub fn default_mac(id: &str) -> [u8; 6] {
    // FNV-1a: a fixed, well-spread hash of the id.
    let mut h: u32 = 0x811c_9dc5;
    for b in id.bytes() {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    let b = h.to_be_bytes();
    [0x52, 0x54, 0x00, b[1], b[2], b[3]]
}

/// `aa:bb:cc:dd:ee:ff`.
pub fn format_mac(m: &[u8; 6]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// The device's registers: everything a snapshot needs.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VirtioNetState {
    pub mac: [u8; 6],
    pub status: u32,
    pub device_features_sel: u32,
    pub driver_features_sel: u32,
    pub driver_features: u64,
    pub queue_sel: u32,
    /// Receive, transmit and control queue, as saved (live in [`VirtioNet`]).
    pub queues: Vec<QueueRegs>,
    pub interrupt_status: u32,
    pub config_generation: u32,
    /// The config space's `status` (link up, announce).
    pub net_status: u16,
}

/// Counters for tests and figures.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NetStats {
    pub rx_frames: u64,
    pub rx_bytes: u64,
    pub tx_frames: u64,
    pub tx_bytes: u64,
    /// Frames dropped: no driver, a buffer too small, a backend that could not take one.
    pub dropped: u64,
    /// Malformed requests from the driver.
    pub errors: u64,
}

/// What a receive pass ended with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RxState {
    /// The backend has nothing more.
    Drained,
    /// The guest has no room: wait for it to add receive buffers.
    NeedBuffers,
    /// The backend failed for good (the interface went away).
    BackendGone,
}

pub struct VirtioNet {
    id: String,
    backend: Arc<dyn NetBackend>,
    irq: EventFd,
    /// Queue notifications: written by KVM (ioeventfd) or the MMIO handler,
    /// read by the I/O thread.
    kicks: [EventFd; QUEUES],
    /// Registers; `st.queues` is stale while running (the live ones are `queues`).
    st: VirtioNetState,
    queues: [VirtQueue; QUEUES],
    /// A received frame waiting for guest buffers, and its length.
    pending: Option<usize>,
    buf: Vec<u8>,
    gone: bool,
    pub stats: NetStats,
}

impl std::fmt::Debug for VirtioNet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VirtioNet")
            .field("id", &self.id)
            .field("backend", &self.backend.name())
            .field("state", &self.st)
            .finish_non_exhaustive()
    }
}

fn new_kicks() -> io::Result<[EventFd; QUEUES]> {
    Ok([
        EventFd::new(libc::EFD_NONBLOCK)?,
        EventFd::new(libc::EFD_NONBLOCK)?,
        EventFd::new(libc::EFD_NONBLOCK)?,
    ])
}

impl VirtioNet {
    pub fn new(
        id: String,
        mac: [u8; 6],
        backend: Arc<dyn NetBackend>,
        irq: EventFd,
    ) -> io::Result<Self> {
        Ok(VirtioNet {
            id,
            backend,
            irq,
            kicks: new_kicks()?,
            st: VirtioNetState {
                mac,
                net_status: vn::VIRTIO_NET_S_LINK_UP as u16,
                ..VirtioNetState::default()
            },
            queues: Default::default(),
            pending: None,
            buf: vec![0; MAX_FRAME],
            gone: false,
            stats: NetStats::default(),
        })
    }

    /// Rebuilds the device from saved state over a new backend; `mac` (when
    /// given) replaces the image's.
    pub fn restore(
        id: String,
        mac: Option<[u8; 6]>,
        backend: Arc<dyn NetBackend>,
        irq: EventFd,
        st: &VirtioNetState,
    ) -> Result<Self, String> {
        if st.queues.len() != QUEUES {
            return Err(format!(
                "NIC '{id}': the saved state has {} queues, expected {QUEUES}",
                st.queues.len()
            ));
        }
        let mut d =
            VirtioNet::new(id, mac.unwrap_or(st.mac), backend, irq).map_err(|e| e.to_string())?;
        d.st = st.clone();
        d.st.mac = mac.unwrap_or(st.mac);
        d.st.net_status |= vn::VIRTIO_NET_S_LINK_UP as u16;
        for (q, r) in d.queues.iter_mut().zip(&st.queues) {
            *q = VirtQueue::restore(r);
        }
        if d.st.status & STATUS_DRIVER_OK != 0 {
            d.apply_offloads();
        }
        Ok(d)
    }

    pub fn save(&self) -> VirtioNetState {
        VirtioNetState {
            queues: self.queues.iter().map(VirtQueue::save).collect(),
            ..self.st.clone()
        }
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn mac(&self) -> [u8; 6] {
        self.st.mac
    }

    pub fn backend(&self) -> &Arc<dyn NetBackend> {
        &self.backend
    }

    /// The notification eventfd of queue `q`.
    pub fn kick(&self, q: usize) -> &EventFd {
        &self.kicks[q]
    }

    fn negotiated(&self, b: u32) -> bool {
        self.st.driver_features & bit(b) != 0
    }

    fn driver_ok(&self) -> bool {
        self.st.status & STATUS_DRIVER_OK != 0 && self.st.status & STATUS_NEEDS_RESET == 0
    }

    /// Tells the backend which offloads received frames may use.
    fn apply_offloads(&self) {
        let mut f = 0;
        if self.negotiated(vn::VIRTIO_NET_F_GUEST_CSUM) {
            f |= TUN_F_CSUM;
            if self.negotiated(vn::VIRTIO_NET_F_GUEST_TSO4) {
                f |= TUN_F_TSO4;
            }
            if self.negotiated(vn::VIRTIO_NET_F_GUEST_TSO6) {
                f |= TUN_F_TSO6;
            }
        }
        if let Err(e) = self.backend.set_offloads(f) {
            tracing::warn!(nic = %self.id, "cannot set the tap's offloads: {e}");
        }
    }

    fn reset(&mut self) {
        self.st = VirtioNetState {
            mac: self.st.mac,
            net_status: self.st.net_status & vn::VIRTIO_NET_S_LINK_UP as u16,
            config_generation: self.st.config_generation,
            ..VirtioNetState::default()
        };
        self.queues = Default::default();
        self.pending = None;
        let _ = self.backend.set_offloads(0);
    }

    /// A guest read of the register window.
    pub fn read(&self, offset: u64, data: &mut [u8]) {
        if offset >= 0x100 {
            // virtio_net_config: mac[6], status.
            let mut cfg = [0u8; 8];
            cfg[..6].copy_from_slice(&self.st.mac);
            cfg[6..].copy_from_slice(&self.st.net_status.to_le_bytes());
            for (i, b) in data.iter_mut().enumerate() {
                *b = cfg.get((offset - 0x100) as usize + i).copied().unwrap_or(0);
            }
            return;
        }
        let q = self.queues.get(self.st.queue_sel as usize);
        let v: u32 = match offset {
            0x000 => MAGIC,
            0x004 => VERSION,
            0x008 => DEVICE_ID_NET,
            0x00c => VENDOR_ID,
            0x010 => match self.st.device_features_sel {
                0 => FEATURES as u32,
                1 => (FEATURES >> 32) as u32,
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

    /// A guest write to the register window.
    pub fn write(&mut self, offset: u64, data: &[u8]) {
        if data.len() != 4 {
            return; // registers are 32-bit; the config space is read-only
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
            0x050 => {
                // Normally KVM signals the eventfd itself (ioeventfd); this
                // is the path where it could not be registered.
                if let Some(k) = self.kicks.get(v as usize) {
                    let _ = k.write(1);
                }
            }
            0x064 => self.st.interrupt_status &= !v,
            0x070 => self.set_status(v),
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
    }

    fn set_status(&mut self, v: u32) {
        if v == 0 {
            self.reset();
            return;
        }
        let mut v = v;
        // FEATURES_OK sticks only for a feature set we offered, with VERSION_1.
        if v & STATUS_FEATURES_OK != 0
            && (self.st.driver_features & !FEATURES != 0
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
            self.apply_offloads();
            // Frames may have waited for the driver: look at once.
            let _ = self.kicks[RX].write(1);
        }
    }

    /// Raises the used-buffer interrupt.
    fn interrupt(&mut self) {
        self.st.interrupt_status |= 1;
        let _ = self.irq.write(1);
    }

    /// Raises the configuration-change interrupt.
    fn config_changed(&mut self) {
        self.st.config_generation = self.st.config_generation.wrapping_add(1);
        self.st.interrupt_status |= 2;
        let _ = self.irq.write(1);
    }

    /// The rings themselves are unusable: the device needs a reset (virtio 2.1.2).
    fn broken(&mut self, e: QueueError) {
        tracing::warn!(nic = %self.id, "virtqueue unusable: {e}");
        self.stats.errors += 1;
        self.st.status |= STATUS_NEEDS_RESET;
        self.pending = None;
        self.config_changed();
    }

    /// Sends every frame the driver queued for transmission.
    pub fn transmit(&mut self, mem: &GuestMemoryMmap) {
        if !self.driver_ok() {
            return;
        }
        if let Err(e) = self.drain_tx(mem) {
            self.broken(e);
        }
    }

    fn drain_tx(&mut self, mem: &GuestMemoryMmap) -> Result<(), QueueError> {
        let mut used = false;
        loop {
            while let Some((head, chain)) = self.queues[TX].pop(mem)? {
                match chain {
                    Ok(chain) => self.send_one(mem, &chain),
                    Err(e) => {
                        tracing::warn!(nic = %self.id, "malformed transmit request: {e}");
                        self.stats.errors += 1;
                    }
                }
                self.queues[TX].push_used(mem, head, 0)?;
                used = true;
            }
            if !self.queues[TX].rearm(mem)? {
                break;
            }
        }
        if used && self.queues[TX].needs_interrupt(mem)? {
            self.interrupt();
        }
        Ok(())
    }

    fn send_one(&mut self, mem: &GuestMemoryMmap, chain: &[Desc]) {
        let total: usize = chain.iter().map(|d| d.len as usize).sum();
        if chain.iter().any(|d| d.write) || !(HDR_LEN..=MAX_FRAME).contains(&total) {
            self.stats.errors += 1;
            return;
        }
        let mut off = 0;
        for d in chain {
            let n = d.len as usize;
            if mem
                .read_slice(&mut self.buf[off..off + n], GuestAddress(d.addr))
                .is_err()
            {
                self.stats.errors += 1;
                return;
            }
            off += n;
        }
        if self.gone {
            self.stats.dropped += 1;
            return;
        }
        match self.backend.send(&self.buf[..total]) {
            Ok(_) => {
                self.stats.tx_frames += 1;
                self.stats.tx_bytes += (total - HDR_LEN) as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.stats.dropped += 1,
            Err(e) => {
                self.stats.dropped += 1;
                if e.raw_os_error() == Some(libc::EIO) || e.raw_os_error() == Some(libc::EBADFD) {
                    self.backend_gone(&e);
                } else {
                    tracing::warn!(nic = %self.id, tap = %self.backend.name(), "cannot send a frame: {e}");
                }
            }
        }
    }

    /// The backend failed for good: the NIC stays, its link goes down, the VM runs on.
    fn backend_gone(&mut self, e: &io::Error) {
        if self.gone {
            return;
        }
        self.gone = true;
        tracing::error!(
            nic = %self.id,
            "tap '{}' failed ({e}): the NIC's link is down, the VM keeps running",
            self.backend.name()
        );
        self.st.net_status &= !(vn::VIRTIO_NET_S_LINK_UP as u16);
        if self.driver_ok() {
            self.config_changed();
        }
    }

    /// True once the backend has failed for good.
    pub fn is_gone(&self) -> bool {
        self.gone
    }

    /// Moves frames from the backend into the guest's receive buffers until
    /// one side runs out.
    pub fn receive(&mut self, mem: &GuestMemoryMmap) -> RxState {
        let mut used = false;
        let state = loop {
            if self.gone {
                break RxState::BackendGone;
            }
            let len = match self.pending {
                Some(n) => n,
                None => match self.backend.recv(&mut self.buf) {
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break RxState::Drained,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        self.backend_gone(&e);
                        break RxState::BackendGone;
                    }
                },
            };
            self.pending = None;
            if len < HDR_LEN || !self.driver_ok() || !self.queues[RX].ready() {
                // Nobody to take it (the driver is not up yet): a network drops.
                self.stats.dropped += 1;
                continue;
            }
            match self.deliver(mem, len) {
                Ok(true) => used = true,
                Ok(false) => {
                    // Wait for buffers: rearm so the driver kicks when it adds
                    // some, and look again only if it added some meanwhile.
                    self.pending = Some(len);
                    let more = self.queues[RX].waiting(mem).and_then(|had| {
                        self.queues[RX].rearm(mem)?;
                        Ok(self.queues[RX].waiting(mem)? > had)
                    });
                    match more {
                        Ok(true) => continue,
                        Ok(false) => break RxState::NeedBuffers,
                        Err(e) => {
                            self.broken(e);
                            break RxState::NeedBuffers;
                        }
                    }
                }
                Err(e) => {
                    self.broken(e);
                    break RxState::NeedBuffers;
                }
            }
        };
        if used && self.driver_ok() {
            match self.queues[RX].needs_interrupt(mem) {
                Ok(true) => self.interrupt(),
                Ok(false) => {}
                Err(e) => self.broken(e),
            }
        }
        state
    }

    /// Puts the frame in `buf[..len]` into receive buffers: `Ok(false)` when
    /// there are not enough (nothing taken from the ring then).
    fn deliver(&mut self, mem: &GuestMemoryMmap, len: usize) -> Result<bool, QueueError> {
        let merge = self.negotiated(vn::VIRTIO_NET_F_MRG_RXBUF);
        let start = self.queues[RX].next_avail();
        let mut chains: Vec<(u16, Vec<Desc>)> = Vec::new();
        let mut room = 0usize;
        while room < len {
            let Some((head, chain)) = self.queues[RX].pop(mem)? else {
                self.queues[RX].set_next_avail(start);
                return Ok(false);
            };
            let chain = chain?;
            if chain.iter().any(|d| !d.write) {
                return Err(QueueError::BrokenChain(head));
            }
            room += chain.iter().map(|d| d.len as usize).sum::<usize>();
            chains.push((head, chain));
            if !merge {
                break;
            }
        }
        if room < len {
            // Without merged buffers one buffer must hold the frame.
            let (head, _) = chains[0];
            self.queues[RX].push_used(mem, head, 0)?;
            self.stats.dropped += 1;
            return Ok(true);
        }
        // num_buffers: how many buffers the frame spans.
        let n = chains.len() as u16;
        self.buf[10..12].copy_from_slice(&n.to_le_bytes());
        let mut off = 0usize;
        for (head, chain) in &chains {
            let mut wrote = 0usize;
            for d in chain {
                if off == len {
                    break;
                }
                let k = (d.len as usize).min(len - off);
                mem.write_slice(&self.buf[off..off + k], GuestAddress(d.addr))
                    .map_err(|_| QueueError::BadAddress(d.addr, k as u64))?;
                off += k;
                wrote += k;
            }
            self.queues[RX].push_used(mem, *head, wrote as u32)?;
        }
        self.stats.rx_frames += 1;
        self.stats.rx_bytes += (len - HDR_LEN) as u64;
        Ok(true)
    }

    /// Answers the driver's control commands (only the announcement
    /// acknowledgement is offered; anything else is refused).
    pub fn control(&mut self, mem: &GuestMemoryMmap) {
        if !self.driver_ok() {
            return;
        }
        if let Err(e) = self.drain_ctrl(mem) {
            self.broken(e);
        }
    }

    fn drain_ctrl(&mut self, mem: &GuestMemoryMmap) -> Result<(), QueueError> {
        let mut used = false;
        loop {
            while let Some((head, chain)) = self.queues[CTRL].pop(mem)? {
                let written = match chain {
                    Ok(chain) => self.command(mem, &chain),
                    Err(e) => {
                        tracing::warn!(nic = %self.id, "malformed control request: {e}");
                        self.stats.errors += 1;
                        0
                    }
                };
                self.queues[CTRL].push_used(mem, head, written)?;
                used = true;
            }
            if !self.queues[CTRL].rearm(mem)? {
                break;
            }
        }
        if used && self.queues[CTRL].needs_interrupt(mem)? {
            self.interrupt();
        }
        Ok(())
    }

    fn command(&mut self, mem: &GuestMemoryMmap, chain: &[Desc]) -> u32 {
        let (Some(first), Some(ack)) = (chain.first(), chain.last()) else {
            return 0;
        };
        if first.write || first.len < 2 || !ack.write || ack.len < 1 {
            self.stats.errors += 1;
            return 0;
        }
        let Ok(hdr) = mem.read_obj::<[u8; 2]>(GuestAddress(first.addr)) else {
            self.stats.errors += 1;
            return 0;
        };
        let ok = if u32::from(hdr[0]) == vn::VIRTIO_NET_CTRL_ANNOUNCE
            && u32::from(hdr[1]) == vn::VIRTIO_NET_CTRL_ANNOUNCE_ACK
        {
            self.st.net_status &= !(vn::VIRTIO_NET_S_ANNOUNCE as u16);
            vn::VIRTIO_NET_OK
        } else {
            vn::VIRTIO_NET_ERR
        };
        match mem.write_obj(ok as u8, GuestAddress(ack.addr)) {
            Ok(()) => 1,
            Err(_) => 0,
        }
    }

    /// After a restore or an incoming migration: asks the guest to announce
    /// itself (where its driver offered to), and sends a RARP for its MAC
    /// from the host side, so that a bridge learns the new port at once.
    pub fn announce(&mut self) {
        if self.driver_ok() && self.negotiated(vn::VIRTIO_NET_F_GUEST_ANNOUNCE) {
            self.st.net_status |= vn::VIRTIO_NET_S_ANNOUNCE as u16;
            self.config_changed();
        }
        let frame = rarp(&self.st.mac);
        if let Err(e) = self.backend.send(&frame) {
            tracing::warn!(nic = %self.id, "cannot send the RARP announcement: {e}");
        }
    }
}

/// A RARP "request reverse" for `mac` with a zero virtio-net header, as a
/// switch learns a moved machine from (QEMU's announce).
pub fn rarp(mac: &[u8; 6]) -> Vec<u8> {
    let mut f = vec![0u8; HDR_LEN];
    f.extend_from_slice(&[0xff; 6]); // broadcast
    f.extend_from_slice(mac);
    f.extend_from_slice(&[0x80, 0x35]); // ETH_P_RARP
    f.extend_from_slice(&[0x00, 0x01, 0x08, 0x00, 6, 4, 0x00, 0x03]); // Ethernet/IPv4, reverse request
    f.extend_from_slice(mac);
    f.extend_from_slice(&[0; 4]);
    f.extend_from_slice(mac);
    f.extend_from_slice(&[0; 4]);
    f.resize(HDR_LEN + 60, 0); // minimum Ethernet frame
    f
}

#[cfg(test)]
mod tests;
