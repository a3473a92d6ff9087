//! A split virtqueue (virtio 1.x §2.7), on rust-vmm's `virtio-queue`.
//!
//! `virtio-queue` walks the rings (indirect descriptors, `EVENT_IDX`
//! notification suppression, the avail-index sanity check). This module adds
//! what a device must not trust the guest for: a chain that ends early (an
//! out-of-range `next`, a loop cut by the queue-size limit, an unreadable or
//! malformed indirect table) is reported as an error instead of silently
//! truncated, and every buffer is checked against guest memory before the
//! device sees it. Any inconsistency is an error the device turns into an
//! I/O-error status or a NEEDS_RESET — never a VMM crash.
//!
//! The saved form ([`QueueRegs`]) is this crate's own, so images written
//! before the switch to `virtio-queue` still restore.

use serde::{Deserialize, Serialize};
use virtio_queue::{Queue as RingQueue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemory, GuestMemoryMmap};

/// Largest queue the device offers.
pub const QUEUE_MAX: u16 = 256;
/// `avail.flags`: the driver does not want interrupts.
const AVAIL_F_NO_INTERRUPT: u16 = 1;

/// Why a request could not be taken from the queue.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum QueueError {
    #[error("queue is not ready, or its rings are not inside guest memory")]
    NotReady,
    #[error("guest address {0:#x} (+{1}) is outside guest memory")]
    BadAddress(u64, u64),
    #[error("descriptor chain from head {0} is broken (bad index, loop or indirect table)")]
    BrokenChain(u16),
    #[error("the rings cannot be used: {0}")]
    Ring(String),
}

/// One descriptor of a chain (indirect tables already resolved).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Desc {
    pub addr: u64,
    pub len: u32,
    /// Device-writable.
    pub write: bool,
}

/// A queue's registers and ring positions: its saved state.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueRegs {
    pub size: u16,
    pub ready: bool,
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
    /// Next avail ring slot the device will read.
    pub next_avail: u16,
    /// Next used ring slot the device will write.
    pub next_used: u16,
    /// VIRTIO_RING_F_EVENT_IDX negotiated (absent in older images: off).
    #[serde(default)]
    pub event_idx: bool,
}

/// One virtqueue of a device.
#[derive(Debug)]
pub struct VirtQueue {
    q: RingQueue,
}

impl Default for VirtQueue {
    fn default() -> Self {
        VirtQueue::new()
    }
}

impl VirtQueue {
    pub fn new() -> VirtQueue {
        VirtQueue {
            // QUEUE_MAX is a nonzero power of two: the only way `new` fails.
            q: RingQueue::new(QUEUE_MAX).unwrap_or_else(|_| unreachable!("QUEUE_MAX is valid")),
        }
    }

    /// Rebuilds a queue from saved registers. Values the guest could not
    /// have set (a size that is not a power of two, misaligned rings) are
    /// left at their reset value, as a register write of them would be.
    pub fn restore(r: &QueueRegs) -> VirtQueue {
        let mut v = VirtQueue::new();
        let q = &mut v.q;
        q.set_size(r.size);
        q.set_desc_table_address(Some(r.desc as u32), Some((r.desc >> 32) as u32));
        q.set_avail_ring_address(Some(r.avail as u32), Some((r.avail >> 32) as u32));
        q.set_used_ring_address(Some(r.used as u32), Some((r.used >> 32) as u32));
        q.set_next_avail(r.next_avail);
        q.set_next_used(r.next_used);
        q.set_event_idx(r.event_idx);
        q.set_ready(r.ready);
        v
    }

    pub fn save(&self) -> QueueRegs {
        QueueRegs {
            size: self.q.size(),
            ready: self.q.ready(),
            desc: self.q.desc_table(),
            avail: self.q.avail_ring(),
            used: self.q.used_ring(),
            next_avail: self.q.next_avail(),
            next_used: self.q.next_used(),
            event_idx: self.q.event_idx_enabled(),
        }
    }

    /// Next avail ring slot the device will read.
    pub fn next_avail(&self) -> u16 {
        self.q.next_avail()
    }

    /// How many chains the driver has made available that the device has not taken.
    pub fn waiting(&self, mem: &GuestMemoryMmap) -> Result<u16, QueueError> {
        let idx = self
            .q
            .avail_idx(mem, std::sync::atomic::Ordering::Acquire)
            .map_err(|e| QueueError::Ring(e.to_string()))?;
        Ok(idx.0.wrapping_sub(self.q.next_avail()))
    }

    /// Goes back to an earlier avail slot (requests popped but not taken).
    pub fn set_next_avail(&mut self, at: u16) {
        self.q.set_next_avail(at);
    }

    /// QueueNum as set (or the largest, [`QUEUE_MAX`], before the driver sets it).
    pub fn size(&self) -> u16 {
        self.q.size()
    }

    pub fn ready(&self) -> bool {
        self.q.ready()
    }

    pub fn set_ready(&mut self, ready: bool) {
        self.q.set_ready(ready);
    }

    /// QueueNum: a size the driver may pick (a power of two up to [`QUEUE_MAX`]).
    pub fn set_size(&mut self, size: u32) {
        self.q.set_size(size.min(u32::from(u16::MAX)) as u16);
    }

    pub fn set_event_idx(&mut self, on: bool) {
        self.q.set_event_idx(on);
    }

    /// One half of a ring address register: `which` is 0 (desc), 1 (avail) or 2 (used).
    pub fn set_addr(&mut self, which: u8, low: Option<u32>, high: Option<u32>) {
        match which {
            0 => self.q.set_desc_table_address(low, high),
            1 => self.q.set_avail_ring_address(low, high),
            _ => self.q.set_used_ring_address(low, high),
        }
    }

    /// The next request: its head index and its chain (or why the chain is
    /// unusable: the request is then completed with nothing written).
    /// `Err` means the rings themselves are unusable.
    #[allow(clippy::type_complexity)]
    pub fn pop(
        &mut self,
        mem: &GuestMemoryMmap,
    ) -> Result<Option<(u16, Result<Vec<Desc>, QueueError>)>, QueueError> {
        if !self.q.is_valid(mem) {
            return Err(QueueError::NotReady);
        }
        let mut avail = self
            .q
            .iter(mem)
            .map_err(|e| QueueError::Ring(e.to_string()))?;
        let Some(chain) = avail.next() else {
            return Ok(None);
        };
        let head = chain.head_index();
        let mut out = Vec::new();
        let mut more = true;
        for d in chain {
            more = d.has_next();
            out.push(Desc {
                addr: d.addr().0,
                len: d.len(),
                write: d.is_write_only(),
            });
        }
        // A chain that ends on a descriptor that says "next" was cut short
        // by virtio-queue: a bad index, a loop, or a bad indirect table.
        if out.is_empty() || more {
            return Ok(Some((head, Err(QueueError::BrokenChain(head)))));
        }
        for d in &out {
            if d.len > 0
                && !mem.check_range(
                    GuestAddress(d.addr),
                    d.len as usize,
                    vm_memory::Permissions::ReadWrite,
                )
            {
                return Ok(Some((
                    head,
                    Err(QueueError::BadAddress(d.addr, u64::from(d.len))),
                )));
            }
        }
        Ok(Some((head, Ok(out))))
    }

    /// Returns a finished chain to the driver.
    pub fn push_used(
        &mut self,
        mem: &GuestMemoryMmap,
        head: u16,
        written: u32,
    ) -> Result<(), QueueError> {
        self.q
            .add_used(mem, head, written)
            .map_err(|e| QueueError::Ring(e.to_string()))
    }

    /// After a batch: re-arms driver notifications (with EVENT_IDX, tells the
    /// driver where to kick next). Returns true if more requests arrived
    /// meanwhile and the device should look again.
    pub fn rearm(&mut self, mem: &GuestMemoryMmap) -> Result<bool, QueueError> {
        self.q
            .enable_notification(mem)
            .map_err(|e| QueueError::Ring(e.to_string()))
    }

    /// Re-arms driver notifications for a device that found the buffers
    /// waiting too few for what it holds (a frame larger than they are): with
    /// EVENT_IDX, asks to be told when the driver makes one *more* available.
    /// [`VirtQueue::rearm`] asks from `next_avail`, which the driver has
    /// already passed when buffers are waiting, so it would never notify.
    pub fn rearm_for_more(&mut self, mem: &GuestMemoryMmap) -> Result<(), QueueError> {
        self.rearm(mem)?;
        if !self.q.event_idx_enabled() {
            return Ok(());
        }
        let ring = |e: virtio_queue::Error| QueueError::Ring(e.to_string());
        let published = self
            .q
            .avail_idx(mem, std::sync::atomic::Ordering::Acquire)
            .map_err(ring)?;
        // avail_event sits after the used ring's entries (virtio 2.7.8).
        let at = self.q.used_ring() + 4 + 8 * u64::from(self.q.size());
        mem.write_obj(u16::to_le(published.0), GuestAddress(at))
            .map_err(|_| QueueError::BadAddress(at, 2))?;
        // The driver reads avail_event after publishing: order our store
        // before our next look at its index.
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        Ok(())
    }

    /// Whether the driver wants an interrupt for what was just used
    /// (`used_event` with EVENT_IDX, else the avail ring's NO_INTERRUPT flag).
    pub fn needs_interrupt(&mut self, mem: &GuestMemoryMmap) -> Result<bool, QueueError> {
        if self.q.event_idx_enabled() {
            return self
                .q
                .needs_notification(mem)
                .map_err(|e| QueueError::Ring(e.to_string()));
        }
        // virtio-queue leaves VRING_AVAIL_F_NO_INTERRUPT to the device.
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        let at = self.q.avail_ring();
        let flags = mem
            .read_obj::<u16>(GuestAddress(at))
            .map_err(|_| QueueError::BadAddress(at, 2))?;
        Ok(u16::from_le(flags) & AVAIL_F_NO_INTERRUPT == 0)
    }

    /// Whether the queue's guest memory is usable at all (for tests and checks).
    pub fn is_valid<M: GuestMemory>(&self, mem: &M) -> bool {
        self.q.is_valid(mem)
    }
}
