//! virtio-net over the virtio-mmio transport (version 2, "modern"), with a
//! receive, a transmit and a control queue.
//!
//! The vCPU thread only touches registers: a queue notification wakes the
//! device I/O thread ([`crate::devices::io_thread`], hookup in `event_handler.rs`), which moves frames
//! between the rings and the backend (a TAP device, [`tap::Tap`]), each with
//! one vectored read or write straight from or into the guest's buffers. Frames
//! carry the 12-byte `virtio_net_hdr_v1` both ways, so checksum and
//! segmentation offloads pass between the guest and the host kernel as they
//! are. While the machine is paused the I/O thread holds off (the machine's
//! I/O gate), so a snapshot never sees a frame half-written into guest RAM;
//! a frame read from the backend but not yet delivered is dropped at a
//! snapshot, as a network may drop any frame.

mod event_handler;
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

use super::queue::{Desc, QueueError};
use super::transport::{bit, serve, Effect, Transport, TransportState};
use super::vectored::{GuestIov, IOV_MAX};

const DEVICE_ID_NET: u32 = 1;

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
    /// One frame straight into guest buffers (as `recv`); a frame longer
    /// than they are is cut.
    fn recv_into(&self, dst: &GuestIov) -> io::Result<usize>;
    /// Sends one frame.
    fn send(&self, frame: &[u8]) -> io::Result<usize>;
    /// Sends the frame held in guest buffers, in order.
    fn send_from(&self, src: &GuestIov) -> io::Result<usize>;
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
    pub transport: TransportState,
    pub mac: [u8; 6],
    /// The config space's `status` (link up, announce).
    pub net_status: u16,
}

/// Counters for tests and figures.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NetStats {
    pub rx_frames: u64,
    pub rx_bytes: u64,
    /// Frames received straight into guest buffers (no copy in between).
    pub rx_direct: u64,
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

/// Takes receive buffers from the ring until they hold `want` bytes or the
/// ring has no more (one buffer only without merged buffers): the buffers
/// and their room. A buffer the device may not write breaks the queue.
#[allow(clippy::type_complexity)]
fn take_buffers(
    q: &mut super::queue::VirtQueue,
    mem: &GuestMemoryMmap,
    want: usize,
    merge: bool,
) -> Result<(Vec<(u16, Vec<Desc>)>, usize), QueueError> {
    let mut chains = Vec::new();
    let mut room = 0usize;
    while room < want {
        let Some((head, chain)) = q.pop(mem)? else {
            break;
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
    Ok((chains, room))
}

/// What receiving straight into guest buffers came to.
enum Direct {
    /// A frame is in the guest's buffers.
    Delivered,
    /// A frame too short to hold its header was dropped.
    Dropped,
    /// The backend had nothing (`WouldBlock`) or failed.
    Failed(io::Error),
    /// A frame larger than the buffers taken is in `buf`, pending.
    Spilled,
    /// No usable buffer: go through `buf`.
    Unfit,
}

pub struct VirtioNet {
    id: String,
    backend: Arc<dyn NetBackend>,
    t: Transport,
    mac: [u8; 6],
    net_status: u16,
    /// A received frame waiting for guest buffers, and its length.
    pending: Option<usize>,
    /// The last frame's length: how much room the next receive takes from
    /// the ring before it reads (see `receive_direct`).
    rx_hint: usize,
    buf: Vec<u8>,
    gone: bool,
    /// Whether the I/O thread polls the tap (not while the guest has no
    /// receive buffers), and whether it stopped for good.
    tap_polled: bool,
    unpolled_for_good: bool,
    pub stats: NetStats,
}

impl std::fmt::Debug for VirtioNet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VirtioNet")
            .field("id", &self.id)
            .field("backend", &self.backend.name())
            .field("mac", &format_mac(&self.mac))
            .finish_non_exhaustive()
    }
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
            t: Transport::new(DEVICE_ID_NET, FEATURES, QUEUES, irq)?,
            mac,
            net_status: vn::VIRTIO_NET_S_LINK_UP as u16,
            pending: None,
            rx_hint: 0,
            buf: vec![0; MAX_FRAME],
            gone: false,
            tap_polled: true,
            unpolled_for_good: false,
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
        let mac = mac.unwrap_or(st.mac);
        let mut d = VirtioNet::new(id, mac, backend, irq).map_err(|e| e.to_string())?;
        d.t.restore(&st.transport)
            .map_err(|e| format!("NIC '{}': {e}", d.id))?;
        d.net_status = st.net_status | vn::VIRTIO_NET_S_LINK_UP as u16;
        if d.t.driver_ok() {
            d.apply_offloads();
        }
        Ok(d)
    }

    pub fn save(&self) -> VirtioNetState {
        VirtioNetState {
            transport: self.t.save(),
            mac: self.mac,
            net_status: self.net_status,
        }
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn mac(&self) -> [u8; 6] {
        self.mac
    }

    pub fn backend(&self) -> &Arc<dyn NetBackend> {
        &self.backend
    }

    /// The transport (e.g. to move the device onto virtio-pci).
    pub fn transport_mut(&mut self) -> &mut Transport {
        &mut self.t
    }

    /// The notification eventfd of queue `q`.
    pub fn kick(&self, q: usize) -> &EventFd {
        self.t.kick(q)
    }

    fn negotiated(&self, b: u32) -> bool {
        self.t.negotiated(b)
    }

    fn driver_ok(&self) -> bool {
        self.t.driver_ok()
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

    /// A guest read of the register window.
    pub fn read(&mut self, offset: u64, data: &mut [u8]) {
        // virtio_net_config: mac[6], status.
        let mut cfg = [0u8; 8];
        cfg[..6].copy_from_slice(&self.mac);
        cfg[6..].copy_from_slice(&self.net_status.to_le_bytes());
        self.t.read(offset, data, &cfg);
    }

    /// A guest write to the register window.
    pub fn write(&mut self, offset: u64, data: &[u8]) {
        match self.t.write(offset, data) {
            Effect::None => {}
            Effect::Reset => self.reset(),
            Effect::DriverOk => {
                self.apply_offloads();
                // Frames may have waited for the driver: look at once.
                let _ = self.t.kick(RX).write(1);
            }
        }
    }

    /// What a reset by the driver clears.
    fn reset(&mut self) {
        self.net_status &= vn::VIRTIO_NET_S_LINK_UP as u16;
        self.pending = None;
        let _ = self.backend.set_offloads(0);
    }

    /// The device was re-plugged ([`crate::devices::hotplug`]): as at
    /// power-on, with its MAC, so that the driver that probes it next reads
    /// that MAC.
    pub fn power_on(&mut self) {
        self.t.power_on();
        self.reset();
    }

    /// The rings themselves are unusable: the device needs a reset (virtio 2.1.2).
    fn broken(&mut self, e: QueueError) {
        tracing::warn!(nic = %self.id, "virtqueue unusable: {e}");
        self.stats.errors += 1;
        self.pending = None;
        self.t.needs_reset();
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
        serve(
            self,
            |d| &mut d.t,
            TX,
            mem,
            |d, chain| {
                match chain {
                    Ok(chain) => d.send_one(mem, &chain),
                    Err(e) => {
                        tracing::warn!(nic = %d.id, "malformed transmit request: {e}");
                        d.stats.errors += 1;
                    }
                }
                0
            },
        )
    }

    fn send_one(&mut self, mem: &GuestMemoryMmap, chain: &[Desc]) {
        let total: usize = chain.iter().map(|d| d.len as usize).sum();
        if chain.iter().any(|d| d.write) || !(HDR_LEN..=MAX_FRAME).contains(&total) {
            self.stats.errors += 1;
            return;
        }
        if self.gone {
            self.stats.dropped += 1;
            return;
        }
        // Straight from the guest's buffers where one call takes them all,
        // else through `buf`.
        let sent = if chain.len() <= IOV_MAX {
            match GuestIov::new(mem, chain) {
                Ok(src) => self.backend.send_from(&src),
                Err(_) => {
                    self.stats.errors += 1;
                    return;
                }
            }
        } else {
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
            self.backend.send(&self.buf[..total])
        };
        match sent {
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
        self.net_status &= !(vn::VIRTIO_NET_S_LINK_UP as u16);
        if self.driver_ok() {
            self.t.config_changed();
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
            if self.pending.is_none() && self.driver_ok() && self.t.queues[RX].ready() {
                match self.receive_direct(mem) {
                    Ok(Direct::Delivered) => {
                        used = true;
                        continue;
                    }
                    Ok(Direct::Dropped | Direct::Spilled) => continue,
                    Ok(Direct::Failed(e)) if e.kind() == io::ErrorKind::WouldBlock => {
                        break RxState::Drained
                    }
                    Ok(Direct::Failed(e)) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Ok(Direct::Failed(e)) => {
                        self.backend_gone(&e);
                        break RxState::BackendGone;
                    }
                    // Through `buf` below.
                    Ok(Direct::Unfit) => {}
                    Err(e) => {
                        self.broken(e);
                        break RxState::NeedBuffers;
                    }
                }
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
            if len < HDR_LEN || !self.driver_ok() || !self.t.queues[RX].ready() {
                // Nobody to take it (the driver is not up yet): a network drops.
                self.stats.dropped += 1;
                continue;
            }
            match self.deliver(mem, len) {
                Ok(true) => used = true,
                Ok(false) => {
                    // Wait for buffers: rearm so the driver kicks when it adds
                    // one more, and look again only if it added some meanwhile.
                    self.pending = Some(len);
                    let more = self.t.queues[RX].waiting(mem).and_then(|had| {
                        self.t.queues[RX].rearm_for_more(mem)?;
                        Ok(self.t.queues[RX].waiting(mem)? > had)
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
            match self.t.queues[RX].needs_interrupt(mem) {
                Ok(true) => self.t.interrupt(RX),
                Ok(false) => {}
                Err(e) => self.broken(e),
            }
        }
        state
    }

    /// Receives one frame straight into the guest's receive buffers: as
    /// many as the last frame needed (at least one), followed by `buf` for
    /// whatever does not fit. A frame that fits is delivered where it is and
    /// the buffers it did not need go back to the ring; one that does not
    /// is completed in `buf` (its head copied over) and left `pending`, for
    /// [`Self::deliver`] to spread over as many buffers as it takes. `Unfit`
    /// when the driver has no buffer or an odd one: nothing is taken from
    /// the ring and nothing read.
    fn receive_direct(&mut self, mem: &GuestMemoryMmap) -> Result<Direct, QueueError> {
        let merge = self.negotiated(vn::VIRTIO_NET_F_MRG_RXBUF);
        let q = &mut self.t.queues[RX];
        let start = q.next_avail();
        let (chains, room) = take_buffers(q, mem, self.rx_hint.clamp(1, MAX_FRAME), merge)?;
        let segs: Vec<Desc> = chains.iter().flat_map(|(_, c)| c.iter().copied()).collect();
        // The header (where `num_buffers` goes) must lie in the first
        // buffer's first descriptor; one entry is left for `buf`.
        let usable = segs.first().is_some_and(|d| d.len as usize >= HDR_LEN);
        let dst = match usable.then(|| GuestIov::new(mem, &segs)) {
            Some(Ok(dst)) if dst.iovecs().len() < IOV_MAX => dst,
            _ => {
                q.set_next_avail(start);
                return Ok(Direct::Unfit);
            }
        };
        let tail = room.min(MAX_FRAME);
        let got = self
            .backend
            .recv_into(&dst.then(&mut self.buf[tail..MAX_FRAME]));
        let n = match got {
            Ok(n) => n,
            Err(e) => {
                q.set_next_avail(start);
                return Ok(Direct::Failed(e));
            }
        };
        if n < HDR_LEN {
            q.set_next_avail(start);
            self.stats.dropped += 1;
            return Ok(Direct::Dropped);
        }
        self.rx_hint = n;
        if n > room {
            // Larger than the buffers taken: bring its head over to `buf`,
            // where the rest already is, and deliver it from there.
            q.set_next_avail(start);
            let mut off = 0;
            for d in &segs {
                let k = d.len as usize;
                mem.read_slice(&mut self.buf[off..off + k], GuestAddress(d.addr))
                    .map_err(|_| QueueError::BadAddress(d.addr, k as u64))?;
                off += k;
            }
            self.pending = Some(n);
            return Ok(Direct::Spilled);
        }
        // The buffers the frame filled, in order; the rest go back.
        let mut left = n;
        let mut filled: Vec<(u16, u32)> = Vec::new();
        for (head, chain) in &chains {
            if left == 0 {
                break;
            }
            let k = chain
                .iter()
                .map(|d| d.len as usize)
                .sum::<usize>()
                .min(left);
            filled.push((*head, k as u32));
            left -= k;
        }
        q.set_next_avail(start.wrapping_add(filled.len() as u16));
        let count = filled.len() as u16;
        mem.write_slice(&count.to_le_bytes(), GuestAddress(segs[0].addr + 10))
            .map_err(|_| QueueError::BadAddress(segs[0].addr, HDR_LEN as u64))?;
        for (head, k) in filled {
            q.push_used(mem, head, k)?;
        }
        self.stats.rx_frames += 1;
        self.stats.rx_bytes += (n - HDR_LEN) as u64;
        self.stats.rx_direct += 1;
        Ok(Direct::Delivered)
    }

    /// Puts the frame in `buf[..len]` into receive buffers: `Ok(false)` when
    /// there are not enough (nothing taken from the ring then).
    fn deliver(&mut self, mem: &GuestMemoryMmap, len: usize) -> Result<bool, QueueError> {
        let merge = self.negotiated(vn::VIRTIO_NET_F_MRG_RXBUF);
        let start = self.t.queues[RX].next_avail();
        let (chains, room) = take_buffers(&mut self.t.queues[RX], mem, len, merge)?;
        if chains.is_empty() || (merge && room < len) {
            self.t.queues[RX].set_next_avail(start);
            return Ok(false);
        }
        if room < len {
            // Without merged buffers one buffer must hold the frame.
            let (head, _) = chains[0];
            self.t.queues[RX].push_used(mem, head, 0)?;
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
            self.t.queues[RX].push_used(mem, *head, wrote as u32)?;
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
        serve(
            self,
            |d| &mut d.t,
            CTRL,
            mem,
            |d, chain| match chain {
                Ok(chain) => d.command(mem, &chain),
                Err(e) => {
                    tracing::warn!(nic = %d.id, "malformed control request: {e}");
                    d.stats.errors += 1;
                    0
                }
            },
        )
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
            self.net_status &= !(vn::VIRTIO_NET_S_ANNOUNCE as u16);
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
            self.net_status |= vn::VIRTIO_NET_S_ANNOUNCE as u16;
            self.t.config_changed();
        }
        let frame = rarp(&self.mac);
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
