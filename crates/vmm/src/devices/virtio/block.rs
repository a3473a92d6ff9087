//! virtio-blk over the virtio transport (virtio-mmio, or virtio-pci with a
//! request queue and an MSI-X vector per vCPU).
//!
//! Requests run on the device I/O thread ([`crate::devices::io_thread`]):
//! the driver's queue notification signals an eventfd (KVM's ioeventfd, so
//! the vCPU does not even leave `KVM_RUN`), the thread takes every request
//! the driver made available, and completes them with an interrupt. The
//! machine's I/O gate closes when it pauses, after the batch in progress: so
//! while paused no request is in flight, a snapshot's device state is just
//! the registers and ring positions below, and the disk is consistent with
//! them. Requests the driver made available but the device had not taken
//! stay in the ring (guest RAM) and run after a resume or a restore.

use serde::{Deserialize, Serialize};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::pci::PciState;
use super::queue::{Desc, QueueError, QueueRegs, QUEUE_MAX};
use super::transport::{serve, Transport, TransportState};
use super::BlockBackend;

#[cfg(test)]
const MAGIC: u32 = 0x7472_6976; // "virt"
const DEVICE_ID_BLOCK: u32 = 2;

const F_SIZE_MAX: u64 = 1 << 1;
const F_SEG_MAX: u64 = 1 << 2;
const F_RO: u64 = 1 << 5;
const F_FLUSH: u64 = 1 << 9;
const F_MQ: u64 = 1 << 12;
const F_DISCARD: u64 = 1 << 13;
const F_WRITE_ZEROES: u64 = 1 << 14;
const F_RING_INDIRECT_DESC: u64 = 1 << 28;
const F_RING_EVENT_IDX: u64 = 1 << 29;
const F_VERSION_1: u64 = 1 << 32;

const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const T_GET_ID: u32 = 8;
const T_DISCARD: u32 = 11;
const T_WRITE_ZEROES: u32 = 13;
/// Discard and write-zeroes limits: one range per request, at most this many
/// sectors (32 MiB: the pause never waits long for one).
const MAX_RANGE_SECTORS: u32 = 32 << 11;
const S_OK: u8 = 0;
const S_IOERR: u8 = 1;
const S_UNSUPP: u8 = 2;

const SECTOR: u64 = 512;
/// Largest data transfer of one request (a guest cannot make us allocate more);
/// advertised as `size_max` × `seg_max`. `seg_max` is what bounds a direct
/// read into scattered user pages (one segment each): 4 cut such a read into
/// 16 KiB requests; 126 cut a 1 MiB one (256 pages) into three; 254 (the
/// queue's size less the header and status, as QEMU's: a request goes in one
/// indirect table) into two, as under QEMU.
const MAX_REQUEST: u64 = 8 << 20;
const SEG_MAX: u32 = QUEUE_MAX as u32 - 2;
const SIZE_MAX: u32 = (MAX_REQUEST / SEG_MAX as u64) as u32 & !0xfff;
/// Most request queues a disk has (`VIRTIO_BLK_F_MQ`: one per vCPU, on
/// virtio-pci, where each has its own interrupt vector).
pub const MAX_QUEUES: usize = 32;

/// The device's registers: everything a snapshot needs besides the disk.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VirtioBlkState {
    pub status: u32,
    pub device_features_sel: u32,
    pub driver_features_sel: u32,
    pub driver_features: u64,
    pub queue_sel: u32,
    /// The first queue as saved; while the device runs, [`VirtioBlk`] holds it live.
    pub queue: QueueRegs,
    pub interrupt_status: u32,
    pub config_generation: u32,
    /// The disk's size when saved (a restore with a different disk is refused).
    pub capacity_bytes: u64,
    /// The queues after the first (a disk with several; absent in older images).
    #[serde(default)]
    pub more_queues: Vec<QueueRegs>,
    /// PCI registers, on virtio-pci (absent on virtio-mmio and in older images).
    #[serde(default)]
    pub pci: Option<PciState>,
}

impl VirtioBlkState {
    fn transport(&self) -> TransportState {
        TransportState {
            status: self.status,
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            driver_features: self.driver_features,
            queue_sel: self.queue_sel,
            queues: std::iter::once(self.queue)
                .chain(self.more_queues.iter().copied())
                .collect(),
            interrupt_status: self.interrupt_status,
            config_generation: self.config_generation,
            pci: self.pci.clone(),
        }
    }

    fn of(t: TransportState, capacity_bytes: u64) -> VirtioBlkState {
        let mut queues = t.queues.into_iter();
        VirtioBlkState {
            status: t.status,
            device_features_sel: t.device_features_sel,
            driver_features_sel: t.driver_features_sel,
            driver_features: t.driver_features,
            queue_sel: t.queue_sel,
            queue: queues.next().unwrap_or_default(),
            interrupt_status: t.interrupt_status,
            config_generation: t.config_generation,
            capacity_bytes,
            more_queues: queues.collect(),
            pci: t.pci,
        }
    }
}

/// Counters for tests and figures.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BlockStats {
    pub reads: u64,
    pub writes: u64,
    pub flushes: u64,
    pub errors: u64,
}

pub struct VirtioBlk {
    id: String,
    backend: Box<dyn BlockBackend>,
    readonly: bool,
    capacity_bytes: u64,
    /// A request's data on its way (grown to the largest request seen, never
    /// zeroed again: every byte used is written first).
    bounce: Vec<u8>,
    /// Registers, queues (each notified through its eventfd: KVM signals it,
    /// or the MMIO handler does) and interrupts.
    t: Transport,
    pub stats: BlockStats,
}

impl std::fmt::Debug for VirtioBlk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VirtioBlk")
            .field("id", &self.id)
            .field("readonly", &self.readonly)
            .field("state", &self.t.st)
            .finish_non_exhaustive()
    }
}

impl VirtioBlk {
    /// A disk with one request queue.
    pub fn new(id: String, backend: Box<dyn BlockBackend>, readonly: bool, irq: EventFd) -> Self {
        VirtioBlk::with_queues(id, backend, readonly, irq, 1)
    }

    /// A disk with `queues` request queues (1 to [`MAX_QUEUES`]).
    pub fn with_queues(
        id: String,
        backend: Box<dyn BlockBackend>,
        readonly: bool,
        irq: EventFd,
        queues: usize,
    ) -> Self {
        let queues = queues.clamp(1, MAX_QUEUES);
        let capacity_bytes = backend.size();
        let features = F_VERSION_1
            | F_FLUSH
            | F_SIZE_MAX
            | F_SEG_MAX
            | F_RING_INDIRECT_DESC
            | F_RING_EVENT_IDX
            | if readonly {
                F_RO
            } else {
                F_DISCARD | F_WRITE_ZEROES
            }
            | if queues > 1 { F_MQ } else { 0 };
        VirtioBlk {
            id,
            backend,
            readonly,
            capacity_bytes,
            bounce: Vec::new(),
            // Eventfds are file descriptors; running out of them here is
            // a host out of resources, as for the irqfd the caller made.
            t: Transport::new(DEVICE_ID_BLOCK, features, queues, irq)
                .unwrap_or_else(|e| panic!("cannot create an eventfd: {e}")),
            stats: BlockStats::default(),
        }
    }

    /// Rebuilds the device from saved state over the same disk (with as
    /// many queues as it had).
    pub fn restore(
        id: String,
        backend: Box<dyn BlockBackend>,
        readonly: bool,
        irq: EventFd,
        st: &VirtioBlkState,
    ) -> Result<Self, String> {
        if backend.size() != st.capacity_bytes {
            return Err(format!(
                "disk '{id}' has {} bytes, the snapshot's had {}",
                backend.size(),
                st.capacity_bytes
            ));
        }
        let queues = 1 + st.more_queues.len();
        if queues > MAX_QUEUES {
            return Err(format!("disk '{id}': the snapshot has {queues} queues"));
        }
        let mut d = VirtioBlk::with_queues(id, backend, readonly, irq, queues);
        d.t.restore(&st.transport())?;
        Ok(d)
    }

    pub fn save(&self) -> VirtioBlkState {
        VirtioBlkState::of(self.t.save(), self.capacity_bytes)
    }

    /// Gives the disk back.
    pub fn into_parts(self) -> (String, Box<dyn BlockBackend>, bool) {
        (self.id, self.backend, self.readonly)
    }

    pub fn is_readonly(&self) -> bool {
        self.readonly
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    /// The disk behind the device (e.g. to take a disk snapshot while paused).
    pub fn backend_mut(&mut self) -> &mut dyn BlockBackend {
        self.backend.as_mut()
    }

    /// The transport (e.g. to move the device onto virtio-pci).
    pub fn transport_mut(&mut self) -> &mut Transport {
        &mut self.t
    }

    /// How many request queues the disk has.
    pub fn queues(&self) -> usize {
        self.t.queues.len()
    }

    /// virtio_blk_config: capacity (sectors), size_max, seg_max, then (after
    /// geometry, blk_size and topology) num_queues at 34, the discard and
    /// write-zeroes limits at 36..57.
    fn config(&self) -> [u8; 60] {
        let mut bytes = [0u8; 60];
        bytes[..8].copy_from_slice(&(self.capacity_bytes / SECTOR).to_le_bytes());
        bytes[8..12].copy_from_slice(&SIZE_MAX.to_le_bytes());
        bytes[12..16].copy_from_slice(&SEG_MAX.to_le_bytes());
        bytes[34..36].copy_from_slice(&(self.t.queues.len() as u16).to_le_bytes());
        bytes[36..40].copy_from_slice(&MAX_RANGE_SECTORS.to_le_bytes());
        bytes[40..44].copy_from_slice(&1u32.to_le_bytes());
        bytes[44..48].copy_from_slice(&8u32.to_le_bytes()); // 4 KiB alignment
        bytes[48..52].copy_from_slice(&MAX_RANGE_SECTORS.to_le_bytes());
        bytes[52..56].copy_from_slice(&1u32.to_le_bytes());
        bytes[56] = 1; // write_zeroes_may_unmap
        bytes
    }

    /// A guest read of the register window.
    pub fn read(&mut self, offset: u64, data: &mut [u8]) {
        let config = self.config();
        self.t.read(offset, data, &config);
    }

    /// A guest write to the register window.
    pub fn write(&mut self, offset: u64, data: &[u8]) {
        self.t.write(offset, data);
    }

    /// Queue `q`'s notification eventfd.
    pub fn kick(&self, q: usize) -> &EventFd {
        self.t.kick(q)
    }

    /// Executes every request the driver made available on every queue.
    pub fn process(&mut self, mem: &GuestMemoryMmap) {
        for q in 0..self.t.queues.len() {
            self.process_queue(q, mem);
        }
    }

    /// Executes every request the driver made available on queue `q`.
    fn process_queue(&mut self, q: usize, mem: &GuestMemoryMmap) {
        let r = serve(
            self,
            |d| &mut d.t,
            q,
            mem,
            |d, chain| match chain {
                Ok(chain) => d.request(mem, &chain),
                Err(e) => {
                    tracing::warn!(disk = %d.id, "malformed request: {e}");
                    d.stats.errors += 1;
                    0
                }
            },
        );
        if let Err(e) = r {
            self.broken(e);
        }
    }

    /// The rings themselves are unusable: the device needs a reset (virtio 2.1.2).
    fn broken(&mut self, e: QueueError) {
        tracing::warn!(disk = %self.id, "virtqueue unusable: {e}");
        self.stats.errors += 1;
        self.t.needs_reset();
    }

    /// Executes one request; returns the bytes written into guest memory.
    fn request(&mut self, mem: &GuestMemoryMmap, chain: &[Desc]) -> u32 {
        // The status byte is the last byte of the last (device-writable) descriptor.
        let Some(last) = chain.last().filter(|d| d.write && d.len > 0) else {
            self.stats.errors += 1;
            return 0;
        };
        let status_at = GuestAddress(last.addr + u64::from(last.len) - 1);
        let (status, data_len) = match self.execute(mem, chain) {
            Ok(n) => (S_OK, n),
            Err(s) => {
                self.stats.errors += 1;
                (s, 0)
            }
        };
        if mem.write_obj(status, status_at).is_err() {
            return 0;
        }
        data_len + 1
    }

    fn execute(&mut self, mem: &GuestMemoryMmap, chain: &[Desc]) -> Result<u32, u8> {
        let head = chain
            .first()
            .filter(|d| !d.write && d.len >= 16)
            .ok_or(S_IOERR)?;
        let hdr: [u8; 16] = mem.read_obj(GuestAddress(head.addr)).map_err(|_| S_IOERR)?;
        let kind = u32::from_le_bytes([hdr[0], hdr[1], hdr[2], hdr[3]]);
        let sector = u64::from_le_bytes(hdr[8..16].try_into().map_err(|_| S_IOERR)?);
        // Data: whatever lies between the header and the status byte.
        let mut data: Vec<Desc> = chain[1..].to_vec();
        if let Some(l) = data.last_mut() {
            l.len -= 1; // the status byte
        }
        if head.len > 16 {
            data.insert(
                0,
                Desc {
                    addr: head.addr + 16,
                    len: head.len - 16,
                    write: false,
                },
            );
        }
        data.retain(|d| d.len > 0);
        let total: u64 = data.iter().map(|d| u64::from(d.len)).sum();
        match kind {
            T_IN | T_OUT => {
                let write = kind == T_OUT;
                if !total.is_multiple_of(SECTOR) || total > MAX_REQUEST {
                    return Err(S_IOERR);
                }
                if data.iter().any(|d| d.write == write) {
                    return Err(S_IOERR); // wrong direction for this request
                }
                if write && self.readonly {
                    return Err(S_IOERR);
                }
                let start = sector.checked_mul(SECTOR).ok_or(S_IOERR)?;
                let end = start.checked_add(total).ok_or(S_IOERR)?;
                if end > self.capacity_bytes {
                    return Err(S_IOERR);
                }
                let failed = |e: super::vectored::Error| {
                    if let super::vectored::Error::Io(e) = e {
                        let what = if write { "write" } else { "read" };
                        tracing::warn!(disk = %self.id, "{what} at {start}: {e}");
                    }
                    S_IOERR
                };
                // Straight between the image and guest memory where the
                // backend allows it: a raw file, or a read of a qcow2 image.
                let direct = match self.backend.plain_file() {
                    Some(file) => Some(super::vectored::transfer(file, mem, &data, start, write)),
                    None if !write => self.backend.read_into(mem, &data, start),
                    None => None,
                };
                if let Some(r) = direct {
                    r.map_err(failed)?;
                    return Ok(if write {
                        self.stats.writes += 1;
                        0
                    } else {
                        self.stats.reads += 1;
                        total as u32
                    });
                }
                let total_len = total as usize;
                if self.bounce.len() < total_len {
                    self.bounce.resize(total_len, 0);
                }
                let buf = &mut self.bounce[..total_len];
                let mut off = 0usize;
                if write {
                    for d in &data {
                        let n = d.len as usize;
                        mem.read_slice(&mut buf[off..off + n], GuestAddress(d.addr))
                            .map_err(|_| S_IOERR)?;
                        off += n;
                    }
                    self.backend.write_at(buf, start).map_err(|e| {
                        tracing::warn!(disk = %self.id, "write at {start}: {e}");
                        S_IOERR
                    })?;
                    self.stats.writes += 1;
                    Ok(0)
                } else {
                    self.backend.read_at(buf, start).map_err(|e| {
                        tracing::warn!(disk = %self.id, "read at {start}: {e}");
                        S_IOERR
                    })?;
                    super::vectored::copy_in(mem, &data, buf).map_err(|_| S_IOERR)?;
                    self.stats.reads += 1;
                    Ok(total as u32)
                }
            }
            T_DISCARD | T_WRITE_ZEROES => {
                // One virtio_blk_discard_write_zeroes: sector, num_sectors, flags.
                if self.readonly || data.len() != 1 || data[0].write || data[0].len != 16 {
                    return Err(S_IOERR);
                }
                let seg: [u8; 16] = mem
                    .read_obj(GuestAddress(data[0].addr))
                    .map_err(|_| S_IOERR)?;
                let sector = u64::from_le_bytes(seg[..8].try_into().map_err(|_| S_IOERR)?);
                let count = u32::from_le_bytes(seg[8..12].try_into().map_err(|_| S_IOERR)?);
                if count > MAX_RANGE_SECTORS {
                    return Err(S_IOERR);
                }
                let start = sector.checked_mul(SECTOR).ok_or(S_IOERR)?;
                let len = u64::from(count) * SECTOR;
                if start.checked_add(len).ok_or(S_IOERR)? > self.capacity_bytes {
                    return Err(S_IOERR);
                }
                let r = if kind == T_DISCARD {
                    self.backend.discard(start, len)
                } else {
                    self.backend.write_zeroes(start, len)
                };
                r.map_err(|e| {
                    tracing::warn!(disk = %self.id, "discard/write-zeroes at {start}: {e}");
                    S_IOERR
                })?;
                self.stats.writes += 1;
                Ok(0)
            }
            T_FLUSH => {
                self.backend.flush().map_err(|_| S_IOERR)?;
                self.stats.flushes += 1;
                Ok(0)
            }
            T_GET_ID => {
                let d = data.first().filter(|d| d.write).ok_or(S_IOERR)?;
                let mut id = [0u8; 20];
                let n = self.id.len().min(20);
                id[..n].copy_from_slice(&self.id.as_bytes()[..n]);
                let n = (d.len as usize).min(20);
                mem.write_slice(&id[..n], GuestAddress(d.addr))
                    .map_err(|_| S_IOERR)?;
                Ok(n as u32)
            }
            _ => Err(S_UNSUPP),
        }
    }
}

impl crate::devices::io_thread::IoDevice for VirtioBlk {
    fn watches(&self) -> Vec<crate::devices::io_thread::Watch> {
        use std::os::fd::AsRawFd;
        (0..self.t.queues.len())
            .map(|q| crate::devices::io_thread::Watch::Add {
                fd: self.t.kick(q).as_raw_fd(),
                sub: q as u32,
                events: vmm_sys_util::epoll::EventSet::IN,
            })
            .collect()
    }

    fn event(
        &mut self,
        sub: u32,
        _: vmm_sys_util::epoll::EventSet,
        mem: &GuestMemoryMmap,
        _: &mut Vec<crate::devices::io_thread::Watch>,
    ) {
        let q = sub as usize;
        if q < self.t.queues.len() {
            let _ = self.t.kick(q).read();
            self.process_queue(q, mem);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::queue::VirtQueue;
    use crate::devices::virtio::transport::STATUS_NEEDS_RESET;
    use crate::devices::virtio::MemDisk;
    use std::sync::Arc;
    use vm_memory::GuestMemoryMmap;

    const DESC: u64 = 0x1000;
    const AVAIL: u64 = 0x2000;
    const USED: u64 = 0x3000;
    const QSIZE: u16 = 8;

    struct Rig {
        mem: GuestMemoryMmap,
        dev: VirtioBlk,
        irq: EventFd,
        next_avail: u16,
    }

    fn w32(dev: &mut VirtioBlk, _: &GuestMemoryMmap, off: u64, v: u32) {
        dev.write(off, &v.to_le_bytes());
    }

    fn r32(dev: &mut VirtioBlk, off: u64) -> u32 {
        let mut b = [0u8; 4];
        dev.read(off, &mut b);
        u32::from_le_bytes(b)
    }

    fn rig(disk_len: usize, readonly: bool) -> Rig {
        rig_with(disk_len, readonly, 0)
    }

    /// A device driven through its registers, with `features_lo` (bits 0-31) accepted.
    fn rig_with(disk_len: usize, readonly: bool, features_lo: u32) -> Rig {
        let disk = MemDisk((0..disk_len).map(|i| (i / 512) as u8).collect());
        rig_on(Box::new(disk), readonly, features_lo)
    }

    fn rig_on(disk: Box<dyn BlockBackend>, readonly: bool, features_lo: u32) -> Rig {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut dev = VirtioBlk::new("disk0".into(), disk, readonly, irq.try_clone().unwrap());
        assert_eq!(r32(&mut dev, 0x000), MAGIC);
        assert_eq!(r32(&mut dev, 0x004), 2);
        assert_eq!(r32(&mut dev, 0x008), 2);
        w32(&mut dev, &mem, 0x070, 1 | 2);
        w32(&mut dev, &mem, 0x014, 1);
        assert_eq!(r32(&mut dev, 0x010) & 1, 1, "VERSION_1 offered");
        w32(&mut dev, &mem, 0x024, 1);
        w32(&mut dev, &mem, 0x020, 1);
        w32(&mut dev, &mem, 0x024, 0);
        w32(&mut dev, &mem, 0x020, features_lo);
        w32(&mut dev, &mem, 0x070, 1 | 2 | 8);
        assert_eq!(r32(&mut dev, 0x070) & 8, 8, "FEATURES_OK accepted");
        w32(&mut dev, &mem, 0x030, 0);
        assert_eq!(r32(&mut dev, 0x034), u32::from(QUEUE_MAX));
        w32(&mut dev, &mem, 0x038, u32::from(QSIZE));
        w32(&mut dev, &mem, 0x080, DESC as u32);
        w32(&mut dev, &mem, 0x090, AVAIL as u32);
        w32(&mut dev, &mem, 0x0a0, USED as u32);
        w32(&mut dev, &mem, 0x044, 1);
        w32(&mut dev, &mem, 0x070, 1 | 2 | 8 | 4);
        Rig {
            mem,
            dev,
            irq,
            next_avail: 0,
        }
    }

    impl Rig {
        fn desc(&self, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
            self.desc_at(DESC, i, addr, len, flags, next);
        }

        /// Descriptor `i` of the table at `table` (the queue's, or an indirect one).
        fn desc_at(&self, table: u64, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
            let at = GuestAddress(table + 16 * u64::from(i));
            let mut d = [0u8; 16];
            d[..8].copy_from_slice(&addr.to_le_bytes());
            d[8..12].copy_from_slice(&len.to_le_bytes());
            d[12..14].copy_from_slice(&flags.to_le_bytes());
            d[14..].copy_from_slice(&next.to_le_bytes());
            self.mem.write_obj(d, at).unwrap();
        }

        /// Publishes head 0 and notifies; returns (used len, status byte at 0x9000).
        fn submit(&mut self) -> (u32, u8) {
            let slot = u64::from(self.next_avail % QSIZE);
            self.mem
                .write_obj(0u16, GuestAddress(AVAIL + 4 + 2 * slot))
                .unwrap();
            self.next_avail = self.next_avail.wrapping_add(1);
            self.mem
                .write_obj(self.next_avail, GuestAddress(AVAIL + 2))
                .unwrap();
            self.mem.write_obj(0xffu8, GuestAddress(0x9000)).unwrap();
            w32(&mut self.dev, &self.mem, 0x050, 0);
            self.dev.process(&self.mem);
            let used_idx: u16 = self.mem.read_obj(GuestAddress(USED + 2)).unwrap();
            assert_eq!(used_idx, self.next_avail, "request completed");
            let slot = u64::from((used_idx - 1) % QSIZE);
            let len: u32 = self
                .mem
                .read_obj(GuestAddress(USED + 4 + 8 * slot + 4))
                .unwrap();
            (len, self.mem.read_obj(GuestAddress(0x9000)).unwrap())
        }

        fn header(&self, kind: u32, sector: u64) {
            let mut h = [0u8; 16];
            h[..4].copy_from_slice(&kind.to_le_bytes());
            h[8..].copy_from_slice(&sector.to_le_bytes());
            self.mem.write_obj(h, GuestAddress(0x8000)).unwrap();
        }

        /// header → data (len, writable) → status.
        fn three(&self, kind: u32, sector: u64, data_len: u32, data_write: bool) {
            self.header(kind, sector);
            self.desc(0, 0x8000, 16, 1, 1);
            self.desc(1, 0xa000, data_len, 1 | if data_write { 2 } else { 0 }, 2);
            self.desc(2, 0x9000, 1, 2, 0);
        }
    }

    #[derive(Default)]
    struct Routes(std::sync::Mutex<Vec<(u32, Option<crate::devices::virtio::pci::MsiMessage>)>>);
    impl crate::devices::virtio::pci::MsiRoutes for Routes {
        fn route(
            &self,
            gsi: u32,
            msg: Option<crate::devices::virtio::pci::MsiMessage>,
        ) -> std::io::Result<()> {
            self.0.lock().unwrap().push((gsi, msg));
            Ok(())
        }
    }

    /// Driven as Linux's virtio_pci_modern does, through BAR 0: two queues,
    /// each with its own MSI-X vector; a request on queue 1 completes with
    /// queue 1's vector only, and the state (PCI registers included)
    /// survives a save and restore.
    #[test]
    fn on_virtio_pci_each_queue_completes_with_its_own_vector() {
        use crate::devices::virtio::pci::{self, MsiMessage, PciState};
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let disk = MemDisk((0..64 << 10).map(|i| (i / 512) as u8).collect());
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut dev = VirtioBlk::with_queues("disk0".into(), Box::new(disk), false, irq, 2);
        let vectors: Vec<EventFd> = (0..3)
            .map(|_| EventFd::new(libc::EFD_NONBLOCK).unwrap())
            .collect();
        let routes = Arc::new(Routes::default());
        dev.transport_mut()
            .attach_pci(
                0xc000_0000,
                vectors.iter().map(|v| v.try_clone().unwrap()).collect(),
                30,
                routes.clone(),
            )
            .unwrap();
        let w = |dev: &mut VirtioBlk, off: u64, v: u64, len: usize| {
            dev.write(off, &v.to_le_bytes()[..len]);
        };
        let r = |dev: &mut VirtioBlk, off: u64, len: usize| {
            let mut b = [0u8; 8];
            dev.read(off, &mut b[..len]);
            u64::from_le_bytes(b)
        };
        // MSI-X on, every vector programmed and unmasked.
        dev.transport_mut()
            .pci_config_write(0x86, &0x8000u16.to_le_bytes());
        for v in 0..3u64 {
            let e = pci::MSIX_TABLE + 16 * v;
            w(&mut dev, e, 0xfee0_0000, 4);
            w(&mut dev, e + 8, 0x40 + v, 4);
            w(&mut dev, e + 12, 0, 4);
        }
        assert_eq!(
            routes.0.lock().unwrap().last().copied(),
            Some((
                32,
                Some(MsiMessage {
                    addr: 0xfee0_0000,
                    data: 0x42
                })
            ))
        );
        w(&mut dev, 0x14, 1 | 2, 1);
        w(&mut dev, 0x00, 1, 4);
        assert_eq!(r(&mut dev, 0x04, 4) & 1, 1, "VERSION_1 offered");
        w(&mut dev, 0x08, 1, 4);
        w(&mut dev, 0x0c, 1, 4);
        w(&mut dev, 0x08, 0, 4);
        w(&mut dev, 0x00, 0, 4);
        assert_ne!(r(&mut dev, 0x04, 4) as u32 & F_MQ as u32, 0, "MQ offered");
        w(&mut dev, 0x0c, F_MQ, 4);
        w(&mut dev, 0x14, 1 | 2 | 8, 1);
        assert_eq!(r(&mut dev, 0x14, 1) & 8, 8, "FEATURES_OK accepted");
        assert_eq!(r(&mut dev, 0x12, 2), 2, "num_queues");
        w(&mut dev, 0x10, 0, 2);
        assert_eq!(r(&mut dev, 0x10, 2), 0, "config vector taken");
        for q in 0..2u64 {
            w(&mut dev, 0x16, q, 2);
            assert_eq!(r(&mut dev, 0x18, 2), u64::from(QUEUE_MAX));
            assert_eq!(r(&mut dev, 0x1e, 2), q, "notify offset");
            w(&mut dev, 0x18, u64::from(QSIZE), 2);
            w(&mut dev, 0x1a, 7, 2);
            assert_eq!(
                r(&mut dev, 0x1a, 2),
                u64::from(pci::NO_VECTOR),
                "no such vector"
            );
            w(&mut dev, 0x1a, q + 1, 2);
            let base = 0x10000 * (q + 1);
            w(&mut dev, 0x20, DESC + base, 4);
            w(&mut dev, 0x24, 0, 4);
            w(&mut dev, 0x28, AVAIL + base, 8);
            w(&mut dev, 0x30, USED + base, 4);
            w(&mut dev, 0x34, 0, 4);
            w(&mut dev, 0x1c, 1, 2);
            assert_eq!(r(&mut dev, 0x1c, 2), 1);
        }
        w(&mut dev, 0x14, 1 | 2 | 8 | 4, 1);
        // A read of sector 3 on queue 1 (its rings at +0x20000).
        let b = 0x20000;
        let mut h = [0u8; 16];
        h[8..].copy_from_slice(&3u64.to_le_bytes());
        mem.write_obj(h, GuestAddress(0x8000)).unwrap();
        for (i, (addr, len, flags, next)) in [
            (0x8000u64, 16u32, 1u16, 1u16),
            (0xa000, 512, 3, 2),
            (0x9000, 1, 2, 0),
        ]
        .into_iter()
        .enumerate()
        {
            let mut d = [0u8; 16];
            d[..8].copy_from_slice(&addr.to_le_bytes());
            d[8..12].copy_from_slice(&len.to_le_bytes());
            d[12..14].copy_from_slice(&flags.to_le_bytes());
            d[14..].copy_from_slice(&next.to_le_bytes());
            mem.write_obj(d, GuestAddress(DESC + b + 16 * i as u64))
                .unwrap();
        }
        mem.write_obj(0u16, GuestAddress(AVAIL + b + 4)).unwrap();
        mem.write_obj(1u16, GuestAddress(AVAIL + b + 2)).unwrap();
        // The notification for queue 1 lands on queue 1's eventfd.
        w(&mut dev, pci::NOTIFY + pci::NOTIFY_MULTIPLIER, 1, 2);
        assert!(dev.kick(0).read().is_err());
        assert_eq!(dev.kick(1).read().unwrap(), 1);
        dev.process(&mem);
        let used: u16 = mem.read_obj(GuestAddress(USED + b + 2)).unwrap();
        assert_eq!(used, 1, "completed on queue 1");
        assert_eq!(mem.read_obj::<u8>(GuestAddress(0x9000)).unwrap(), S_OK);
        assert_eq!(mem.read_obj::<u8>(GuestAddress(0xa000)).unwrap(), 3);
        assert_eq!(vectors[2].read().unwrap(), 1, "queue 1's vector");
        assert!(vectors[1].read().is_err(), "not queue 0's");
        assert_eq!(r(&mut dev, pci::ISR, 1), 1, "the ISR says a queue");
        assert_eq!(r(&mut dev, pci::ISR, 1), 0, "and reading cleared it");
        // The device configuration in its own block: num_queues at 34.
        assert_eq!(r(&mut dev, pci::DEVICE + 34, 2), 2);
        // Saved and restored: the PCI registers and both queues come back.
        let st = dev.save();
        assert_eq!(st.more_queues.len(), 1);
        let pst: &PciState = st.pci.as_ref().unwrap();
        assert_eq!(pst.queue_vectors, vec![1, 2]);
        let (id, backend, ro) = dev.into_parts();
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut back = VirtioBlk::restore(id, backend, ro, irq, &st).unwrap();
        let routes = Arc::new(Routes::default());
        back.transport_mut()
            .attach_pci(
                0,
                (0..3).map(|_| EventFd::new(0).unwrap()).collect(),
                60,
                routes.clone(),
            )
            .unwrap();
        assert_eq!(back.save(), st);
        assert_eq!(back.transport_mut().pci_bar(), Some(0xc000_0000));
        assert_eq!(
            routes.0.lock().unwrap().len(),
            3,
            "every vector routed again"
        );
    }

    #[test]
    fn reads_writes_and_flushes() {
        let mut r = rig(1 << 20, false);
        r.three(T_IN, 3, 1024, true);
        assert_eq!(r.submit(), (1025, S_OK));
        let mut got = [0u8; 1024];
        r.mem.read_slice(&mut got, GuestAddress(0xa000)).unwrap();
        assert!(got[..512].iter().all(|b| *b == 3) && got[512..].iter().all(|b| *b == 4));
        assert_eq!(r.irq.read().unwrap(), 1, "interrupt raised");
        assert_eq!(r32(&mut r.dev, 0x060), 1);
        w32(&mut r.dev, &r.mem, 0x064, 1);
        assert_eq!(r32(&mut r.dev, 0x060), 0, "acknowledged");

        r.mem
            .write_slice(&[0xabu8; 512], GuestAddress(0xa000))
            .unwrap();
        r.three(T_OUT, 7, 512, false);
        assert_eq!(r.submit(), (1, S_OK));
        r.three(T_IN, 7, 512, true);
        r.mem
            .write_slice(&[0u8; 512], GuestAddress(0xa000))
            .unwrap();
        assert_eq!(r.submit().1, S_OK);
        let mut got = [0u8; 512];
        r.mem.read_slice(&mut got, GuestAddress(0xa000)).unwrap();
        assert_eq!(got, [0xab; 512]);

        r.header(T_FLUSH, 0);
        r.desc(0, 0x8000, 16, 1, 1);
        r.desc(1, 0x9000, 1, 2, 0);
        assert_eq!(r.submit(), (1, S_OK));
        assert_eq!(r.dev.stats.flushes, 1);
        // Capacity in sectors at config offset 0, then size_max × seg_max
        // within the largest request, with room for a scattered 1 MiB read.
        let mut cap = [0u8; 8];
        r.dev.read(0x100, &mut cap);
        assert_eq!(u64::from_le_bytes(cap), (1 << 20) / 512);
        let (size_max, seg_max) = (r32(&mut r.dev, 0x108), r32(&mut r.dev, 0x10c));
        assert!(u64::from(size_max) * u64::from(seg_max) <= MAX_REQUEST);
        assert!(seg_max >= 254 && size_max.is_multiple_of(4096));
    }

    #[test]
    fn bad_requests_get_an_error_status_not_a_crash() {
        let mut r = rig(64 << 10, false);
        // Past the end of the disk.
        r.three(T_IN, 128, 512, true);
        assert_eq!(r.submit().1, S_IOERR);
        // Wrong direction: a read into a device-readable buffer.
        r.three(T_IN, 0, 512, false);
        assert_eq!(r.submit().1, S_IOERR);
        // Not a multiple of the sector size.
        r.three(T_OUT, 0, 100, false);
        assert_eq!(r.submit().1, S_IOERR);
        // Data buffer outside guest memory.
        r.header(T_IN, 0);
        r.desc(0, 0x8000, 16, 1, 1);
        r.desc(1, (1 << 20) - 256, 512, 1 | 2, 2);
        r.desc(2, 0x9000, 1, 2, 0);
        assert_eq!(
            r.submit().0,
            0,
            "malformed chain completed with nothing written"
        );
        // A loop in the chain.
        r.desc(0, 0x8000, 16, 1, 1);
        r.desc(1, 0xa000, 512, 1 | 2, 0);
        assert_eq!(r.submit().0, 0);
        // Next index out of range.
        r.desc(0, 0x8000, 16, 1, 200);
        assert_eq!(r.submit().0, 0);
        // Unknown request type.
        r.three(99, 0, 512, true);
        assert_eq!(r.submit().1, S_UNSUPP);
        // Huge length: refused before any allocation.
        r.three(T_IN, 0, u32::MAX - 511, true);
        assert_eq!(r.submit().0, 0);
        // The device still works afterwards.
        r.three(T_IN, 0, 512, true);
        assert_eq!(r.submit().1, S_OK);
        assert!(r.dev.stats.errors >= 7);
    }

    #[test]
    fn read_only_disks_refuse_writes() {
        let mut r = rig(64 << 10, true);
        r.three(T_OUT, 0, 512, false);
        assert_eq!(r.submit().1, S_IOERR);
        r.dev.write(0x014, &0u32.to_le_bytes());
        assert_ne!(r32(&mut r.dev, 0x010) & (F_RO as u32), 0);
    }

    #[test]
    fn an_avail_index_more_than_a_ring_ahead_breaks_the_device() {
        let mut r = rig(64 << 10, false);
        r.mem.write_obj(QSIZE + 1, GuestAddress(AVAIL + 2)).unwrap();
        w32(&mut r.dev, &r.mem, 0x050, 0);
        r.dev.process(&r.mem);
        assert_ne!(r32(&mut r.dev, 0x070) & STATUS_NEEDS_RESET, 0);
        assert_eq!(
            r.dev.stats.reads + r.dev.stats.writes,
            0,
            "nothing executed"
        );
    }

    #[test]
    fn rings_outside_memory_mark_the_device_broken() {
        let mut r = rig(64 << 10, false);
        let mut st = r.dev.save();
        st.queue.used = 1 << 40;
        r.dev.t.queues[0] = VirtQueue::restore(&st.queue);
        r.mem.write_obj(1u16, GuestAddress(AVAIL + 2)).unwrap();
        w32(&mut r.dev, &r.mem, 0x050, 0);
        r.dev.process(&r.mem);
        assert_ne!(r32(&mut r.dev, 0x070) & STATUS_NEEDS_RESET, 0);
        // Reset brings it back to a clean state.
        w32(&mut r.dev, &r.mem, 0x070, 0);
        assert_eq!(r32(&mut r.dev, 0x070), 0);
    }

    #[test]
    fn state_round_trips_and_a_different_disk_is_refused() {
        let mut r = rig(64 << 10, false);
        r.three(T_IN, 0, 512, true);
        r.submit();
        let st = r.dev.save();
        let json = serde_json::to_string(&st).unwrap();
        let back: VirtioBlkState = serde_json::from_str(&json).unwrap();
        assert_eq!(back, st);
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let d = VirtioBlk::restore(
            "disk0".into(),
            Box::new(MemDisk(vec![0; 64 << 10])),
            false,
            irq.try_clone().unwrap(),
            &back,
        )
        .unwrap();
        assert_eq!(d.save(), st);
        assert!(VirtioBlk::restore(
            "disk0".into(),
            Box::new(MemDisk(vec![0; 32 << 10])),
            false,
            irq,
            &back
        )
        .is_err());
    }
    /// A request with as many data segments as the device offers
    /// (`seg_max`), in one indirect table, on a queue of 8: Linux's direct
    /// 1 MiB read into 256 scattered pages goes as two such requests.
    #[test]
    fn a_request_of_seg_max_segments_in_one_indirect_table() {
        let mut r = rig_with(1 << 20, false, F_RING_INDIRECT_DESC as u32);
        let n = SEG_MAX as u16;
        // The table at 0x40000: header, n segments of 512 bytes from
        // 0x50000 on (every other 512 bytes: scattered), status.
        let table = 0x40000;
        r.header(T_IN, 0);
        r.desc_at(table, 0, 0x8000, 16, 1, 1);
        for i in 0..n {
            let at = 0x50000 + u64::from(i) * 1024;
            r.desc_at(table, i + 1, at, 512, 1 | 2, i + 2);
        }
        r.desc_at(table, n + 1, 0x9000, 1, 2, 0);
        r.desc(0, table, 16 * u32::from(n + 2), 4, 0);
        assert_eq!(r.submit(), (512 * u32::from(n) + 1, S_OK));
        // Sector i landed in segment i (the disk's bytes are their sector number).
        for i in 0..u64::from(n) {
            let b: u8 = r
                .mem
                .read_obj(GuestAddress(0x50000 + i * 1024 + 100))
                .unwrap();
            assert_eq!(b, i as u8, "segment {i}");
        }
    }

    #[test]
    fn indirect_descriptors_work_and_a_bad_table_is_an_error() {
        let mut r = rig_with(64 << 10, false, F_RING_INDIRECT_DESC as u32);
        // The head points at a table of three descriptors at 0x5000.
        r.header(T_IN, 2);
        r.desc_at(0x5000, 0, 0x8000, 16, 1, 1);
        r.desc_at(0x5000, 1, 0xa000, 512, 1 | 2, 2);
        r.desc_at(0x5000, 2, 0x9000, 1, 2, 0);
        r.desc(0, 0x5000, 48, 4, 0);
        assert_eq!(r.submit(), (513, S_OK));
        let mut got = [0u8; 512];
        r.mem.read_slice(&mut got, GuestAddress(0xa000)).unwrap();
        assert_eq!(got, [2; 512]);
        // A table entry whose `next` leaves the table: nothing executed.
        r.desc_at(0x5000, 1, 0xa000, 512, 1 | 2, 7);
        let reads = r.dev.stats.reads;
        assert_eq!(r.submit().0, 0);
        assert_eq!(r.dev.stats.reads, reads);
        // A table outside guest memory, and one with a length that is not whole descriptors.
        r.desc(0, (1 << 20) - 16, 48, 4, 0);
        assert_eq!(r.submit().0, 0);
        r.desc_at(0x5000, 1, 0xa000, 512, 1 | 2, 2);
        r.desc(0, 0x5000, 40, 4, 0);
        assert_eq!(r.submit().0, 0);
        // Still working.
        r.desc(0, 0x5000, 48, 4, 0);
        assert_eq!(r.submit(), (513, S_OK));
    }

    #[test]
    fn event_idx_suppresses_interrupts_and_tells_the_driver_where_to_kick() {
        let mut r = rig_with(64 << 10, false, F_RING_EVENT_IDX as u32);
        assert!(r.dev.save().queue.event_idx, "negotiated");
        let used_event = GuestAddress(AVAIL + 4 + 2 * u64::from(QSIZE));
        let avail_event = GuestAddress(USED + 4 + 8 * u64::from(QSIZE));
        // The driver asks for an interrupt only after the used index passes 2.
        r.mem.write_obj(2u16, used_event).unwrap();
        r.three(T_IN, 0, 512, true);
        let _ = r.irq.read();
        for _ in 0..2 {
            assert_eq!(r.submit().1, S_OK);
            assert!(r.irq.read().is_err(), "no interrupt before used_event");
            // The device re-armed: the next kick is wanted at the next avail entry.
            let ae: u16 = r.mem.read_obj(avail_event).unwrap();
            assert_eq!(ae, r.next_avail);
        }
        assert_eq!(r.submit().1, S_OK);
        assert_eq!(
            r.irq.read().unwrap(),
            1,
            "interrupt once used passes used_event"
        );
        // Saved and restored, the queue keeps EVENT_IDX.
        let st = r.dev.save();
        let back = VirtQueue::restore(&st.queue);
        assert_eq!(back.save(), st.queue);
    }

    #[test]
    fn state_saved_before_event_idx_existed_restores() {
        // The queue's saved form before virtio-queue: no `event_idx` field.
        let old = r#"{"size":8,"ready":true,"desc":4096,"avail":8192,"used":12288,"next_avail":3,"next_used":3}"#;
        let regs: QueueRegs = serde_json::from_str(old).unwrap();
        assert!(!regs.event_idx);
        let q = VirtQueue::restore(&regs);
        assert_eq!(q.save(), regs);
    }

    #[test]
    fn no_interrupt_flag_is_honoured_without_event_idx() {
        let mut r = rig(64 << 10, false);
        r.mem.write_obj(1u16, GuestAddress(AVAIL)).unwrap(); // VRING_AVAIL_F_NO_INTERRUPT
        r.three(T_IN, 0, 512, true);
        assert_eq!(r.submit().1, S_OK);
        assert!(r.irq.read().is_err());
        r.mem.write_obj(0u16, GuestAddress(AVAIL)).unwrap();
        assert_eq!(r.submit().1, S_OK);
        assert_eq!(r.irq.read().unwrap(), 1);
    }

    #[test]
    fn write_zeroes_and_discard_take_one_range_within_the_disk() {
        let mut r = rig(1 << 20, false);
        w32(&mut r.dev, &r.mem, 0x014, 0);
        assert_eq!(
            r32(&mut r.dev, 0x010) & (F_DISCARD | F_WRITE_ZEROES) as u32,
            (F_DISCARD | F_WRITE_ZEROES) as u32
        );
        let range = |r: &Rig, sector: u64, count: u32| {
            let mut seg = [0u8; 16];
            seg[..8].copy_from_slice(&sector.to_le_bytes());
            seg[8..12].copy_from_slice(&count.to_le_bytes());
            r.mem.write_obj(seg, GuestAddress(0xa000)).unwrap();
        };
        // Sectors 2..4 hold 2 and 3; zeroed, they read back as zeroes.
        r.header(T_WRITE_ZEROES, 0);
        range(&r, 2, 2);
        r.desc(0, 0x8000, 16, 1, 1);
        r.desc(1, 0xa000, 16, 1, 2);
        r.desc(2, 0x9000, 1, 2, 0);
        assert_eq!(r.submit(), (1, S_OK));
        r.three(T_IN, 1, 2048, true);
        assert_eq!(r.submit().1, S_OK);
        let mut got = [0u8; 2048];
        r.mem.read_slice(&mut got, GuestAddress(0xa000)).unwrap();
        assert!(got[..512].iter().all(|b| *b == 1), "sector 1 untouched");
        assert!(got[512..1536].iter().all(|b| *b == 0), "sectors 2-3 zeroed");
        assert!(got[1536..].iter().all(|b| *b == 4), "sector 4 untouched");
        // A discard within the disk succeeds; past its end, or too long, fails.
        for (kind, sector, count, status) in [
            (T_DISCARD, 0, 8, S_OK),
            (T_DISCARD, 2047, 2, S_IOERR),
            (T_WRITE_ZEROES, u64::MAX / 256, 1, S_IOERR),
            (T_WRITE_ZEROES, 0, MAX_RANGE_SECTORS + 1, S_IOERR),
        ] {
            r.header(kind, 0);
            range(&r, sector, count);
            r.desc(0, 0x8000, 16, 1, 1);
            r.desc(1, 0xa000, 16, 1, 2);
            r.desc(2, 0x9000, 1, 2, 0);
            assert_eq!(r.submit().1, status, "{kind} {sector}+{count}");
        }
        // A read-only disk neither offers nor does them.
        let mut ro = rig(1 << 20, true);
        w32(&mut ro.dev, &ro.mem, 0x014, 0);
        assert_eq!(
            r32(&mut ro.dev, 0x010) & (F_DISCARD | F_WRITE_ZEROES) as u32,
            0
        );
        ro.header(T_DISCARD, 0);
        range(&ro, 0, 8);
        ro.desc(0, 0x8000, 16, 1, 1);
        ro.desc(1, 0xa000, 16, 1, 2);
        ro.desc(2, 0x9000, 1, 2, 0);
        assert_eq!(ro.submit().1, S_IOERR);
    }

    /// A raw image's requests go straight between the file and guest
    /// memory (no buffer): scattered segments land in order, a segment
    /// outside guest memory is an error status, nothing else is touched.
    #[test]
    fn a_raw_file_moves_data_straight_between_file_and_guest_memory() {
        let p = std::env::temp_dir().join(format!("snapvmm-vectored-{}", std::process::id()));
        let content: Vec<u8> = (0..1usize << 20).map(|i| (i / 512) as u8).collect();
        std::fs::write(&p, &content).unwrap();
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&p)
            .unwrap();
        std::fs::remove_file(&p).unwrap();
        let raw = super::super::RawFile::new(f.try_clone().unwrap()).unwrap();
        let mut r = rig_on(Box::new(raw), false, 0);
        // Sectors 8..16 into two scattered segments (the second one first in memory).
        r.header(T_IN, 8);
        r.desc(0, 0x8000, 16, 1, 1);
        r.desc(1, 0xc000, 2048, 1 | 2, 2);
        r.desc(2, 0xa000, 2048, 1 | 2, 3);
        r.desc(3, 0x9000, 1, 2, 0);
        assert_eq!(r.submit(), (4097, S_OK));
        let mut got = [0u8; 2048];
        r.mem.read_slice(&mut got, GuestAddress(0xc000)).unwrap();
        assert_eq!(got[..], content[8 * 512..12 * 512]);
        r.mem.read_slice(&mut got, GuestAddress(0xa000)).unwrap();
        assert_eq!(got[..], content[12 * 512..16 * 512]);
        // Written back elsewhere from the same two segments.
        r.header(T_OUT, 100);
        r.desc(1, 0xc000, 2048, 1, 2);
        r.desc(2, 0xa000, 2048, 1, 3);
        assert_eq!(r.submit(), (1, S_OK));
        let mut back = vec![0u8; 4096];
        std::os::unix::fs::FileExt::read_exact_at(&f, &mut back, 100 * 512).unwrap();
        assert_eq!(back[..], content[8 * 512..16 * 512]);
        // A segment running past the end of guest memory: refused (the
        // queue already rejects the chain, so no status is written), no write.
        r.header(T_OUT, 200);
        r.desc(1, (1 << 20) - 1024, 2048, 1, 3);
        assert_ne!(r.submit().1, S_OK);
        std::os::unix::fs::FileExt::read_exact_at(&f, &mut back, 200 * 512).unwrap();
        assert_eq!(back[..], content[200 * 512..208 * 512]);
        assert_eq!((r.dev.stats.reads, r.dev.stats.writes), (1, 1));
    }

    #[test]
    fn a_raw_file_gives_discarded_space_back_and_zeroes_read_as_zeroes() {
        let p = std::env::temp_dir().join(format!("snapvmm-discard-{}", std::process::id()));
        std::fs::write(&p, vec![0x5au8; 4 << 20]).unwrap();
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&p)
            .unwrap();
        let mut raw = super::super::RawFile::new(f).unwrap();
        let blocks = |p: &std::path::Path| {
            use std::os::unix::fs::MetadataExt;
            std::fs::metadata(p).unwrap().blocks()
        };
        let before = blocks(&p);
        raw.discard(1 << 20, 1 << 20).unwrap();
        raw.write_zeroes(2 << 20, 4096).unwrap();
        let mut b = vec![0u8; 4096];
        raw.read_at(&mut b, 2 << 20).unwrap();
        assert!(b.iter().all(|x| *x == 0));
        raw.read_at(&mut b, (2 << 20) + 4096).unwrap();
        assert!(b.iter().all(|x| *x == 0x5a), "beyond the range untouched");
        assert_eq!(raw.size(), 4 << 20, "the size stays");
        let after = blocks(&p);
        let _ = std::fs::remove_file(&p);
        assert!(
            after < before,
            "space given back: {before} -> {after} blocks"
        );
    }
}
