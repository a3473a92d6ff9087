//! A split virtqueue (virtio 1.x §2.7) read from guest memory.
//!
//! Everything here is guest-controlled: every address and length is checked
//! against guest memory by vm-memory, chains are bounded by the queue size
//! (so a loop in the `next` links cannot spin), and any inconsistency is an
//! error the device turns into an I/O-error status — never a VMM crash.

use serde::{Deserialize, Serialize};
use vm_memory::{Bytes, GuestAddress, GuestMemory, GuestMemoryMmap};

/// Largest queue the device offers.
pub const QUEUE_MAX: u16 = 256;

const DESC_F_NEXT: u16 = 1;
const DESC_F_WRITE: u16 = 2;
const DESC_F_INDIRECT: u16 = 4;
/// `avail.flags`: the driver does not want interrupts.
const AVAIL_F_NO_INTERRUPT: u16 = 1;

/// Why a request could not be taken from the queue.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum QueueError {
    #[error("queue is not ready")]
    NotReady,
    #[error("guest address {0:#x} (+{1}) is outside guest memory")]
    BadAddress(u64, u64),
    #[error("descriptor index {0} out of range")]
    BadIndex(u16),
    #[error("descriptor chain longer than the queue")]
    ChainTooLong,
    #[error("indirect descriptors were not negotiated")]
    Indirect,
    #[error("avail index {0} is more than a ring ahead of {1}")]
    AvailOverrun(u16, u16),
}

/// One descriptor of a chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Desc {
    pub addr: u64,
    pub len: u32,
    /// Device-writable.
    pub write: bool,
}

/// A queue's registers and ring positions (its saved state, too).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Queue {
    pub size: u16,
    pub ready: bool,
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
    /// Next avail ring slot the device will read.
    pub next_avail: u16,
    /// Next used ring slot the device will write.
    pub next_used: u16,
}

impl Queue {
    pub fn new() -> Queue {
        Queue {
            size: QUEUE_MAX,
            ..Queue::default()
        }
    }

    fn read_u16(mem: &GuestMemoryMmap, at: u64) -> Result<u16, QueueError> {
        mem.read_obj::<u16>(GuestAddress(at))
            .map(u16::from_le)
            .map_err(|_| QueueError::BadAddress(at, 2))
    }

    /// A usable queue: ready, a power-of-two size, rings inside guest memory.
    fn check(&self, mem: &GuestMemoryMmap) -> Result<(), QueueError> {
        if !self.ready || self.size == 0 || !self.size.is_power_of_two() || self.size > QUEUE_MAX {
            return Err(QueueError::NotReady);
        }
        let n = u64::from(self.size);
        for (addr, len) in [
            (self.desc, 16 * n),
            (self.avail, 6 + 2 * n),
            (self.used, 6 + 8 * n),
        ] {
            let end = addr
                .checked_add(len)
                .ok_or(QueueError::BadAddress(addr, len))?;
            if !mem.check_range(
                GuestAddress(addr),
                len as usize,
                vm_memory::Permissions::ReadWrite,
            ) || end < addr
            {
                return Err(QueueError::BadAddress(addr, len));
            }
        }
        Ok(())
    }

    /// The next request's head index, if the driver made one available.
    pub fn pop(&mut self, mem: &GuestMemoryMmap) -> Result<Option<u16>, QueueError> {
        self.check(mem)?;
        let idx = Self::read_u16(mem, self.avail + 2)?;
        if idx == self.next_avail {
            return Ok(None);
        }
        // More entries than the ring holds: the driver broke the ring.
        if idx.wrapping_sub(self.next_avail) > self.size {
            return Err(QueueError::AvailOverrun(idx, self.next_avail));
        }
        // Read the ring entry only after seeing the index (pairs with the driver's write barrier).
        std::sync::atomic::fence(std::sync::atomic::Ordering::Acquire);
        let slot = u64::from(self.next_avail % self.size);
        let head = Self::read_u16(mem, self.avail + 4 + 2 * slot)?;
        self.next_avail = self.next_avail.wrapping_add(1);
        Ok(Some(head))
    }

    /// Walks the chain that starts at `head`.
    pub fn chain(&self, mem: &GuestMemoryMmap, head: u16) -> Result<Vec<Desc>, QueueError> {
        let mut out = Vec::new();
        let mut i = head;
        loop {
            if i >= self.size {
                return Err(QueueError::BadIndex(i));
            }
            if out.len() >= usize::from(self.size) {
                return Err(QueueError::ChainTooLong);
            }
            let at = self.desc + 16 * u64::from(i);
            let raw: [u8; 16] = mem
                .read_obj(GuestAddress(at))
                .map_err(|_| QueueError::BadAddress(at, 16))?;
            let addr = u64::from_le_bytes(raw[0..8].try_into().unwrap_or_default());
            let len = u32::from_le_bytes(raw[8..12].try_into().unwrap_or_default());
            let flags = u16::from_le_bytes([raw[12], raw[13]]);
            let next = u16::from_le_bytes([raw[14], raw[15]]);
            if flags & DESC_F_INDIRECT != 0 {
                return Err(QueueError::Indirect);
            }
            if len > 0
                && !mem.check_range(
                    GuestAddress(addr),
                    len as usize,
                    vm_memory::Permissions::ReadWrite,
                )
            {
                return Err(QueueError::BadAddress(addr, u64::from(len)));
            }
            out.push(Desc {
                addr,
                len,
                write: flags & DESC_F_WRITE != 0,
            });
            if flags & DESC_F_NEXT == 0 {
                return Ok(out);
            }
            i = next;
        }
    }

    /// Returns a finished chain to the driver; true if it wants an interrupt.
    pub fn push_used(
        &mut self,
        mem: &GuestMemoryMmap,
        head: u16,
        written: u32,
    ) -> Result<bool, QueueError> {
        self.check(mem)?;
        let slot = u64::from(self.next_used % self.size);
        let at = self.used + 4 + 8 * slot;
        let mut elem = [0u8; 8];
        elem[..4].copy_from_slice(&u32::from(head).to_le_bytes());
        elem[4..].copy_from_slice(&written.to_le_bytes());
        mem.write_obj(elem, GuestAddress(at))
            .map_err(|_| QueueError::BadAddress(at, 8))?;
        self.next_used = self.next_used.wrapping_add(1);
        // The element must be visible before the index that publishes it.
        std::sync::atomic::fence(std::sync::atomic::Ordering::Release);
        mem.write_obj(self.next_used.to_le(), GuestAddress(self.used + 2))
            .map_err(|_| QueueError::BadAddress(self.used + 2, 2))?;
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        let flags = Self::read_u16(mem, self.avail)?;
        Ok(flags & AVAIL_F_NO_INTERRUPT == 0)
    }
}
