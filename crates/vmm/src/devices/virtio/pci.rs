//! The PCI side of the virtio-pci transport (virtio 1.x §4.1, "modern" only):
//! a device's PCI configuration space (its header, one memory BAR, the
//! virtio capabilities that say where the registers are in it, an MSI-X
//! capability) and its MSI-X table, with an interrupt vector per queue.
//!
//! The register window the BAR maps is laid out as
//!
//! ```text
//! 0x0000  common configuration (features, status, queue setup)   [transport]
//! 0x1000  ISR status (read clears)                                 [transport]
//! 0x2000  device configuration                                    [device]
//! 0x3000  queue notifications, NOTIFY_MULTIPLIER bytes per queue   [transport]
//! 0x4000  MSI-X table (16 bytes per vector)                         [here]
//! 0x5000  MSI-X pending bits                                       [here]
//! ```
//!
//! A vector's interrupt is an eventfd that KVM turns into the MSI message
//! the guest wrote in the table (an irqfd on a GSI routed as MSI, through
//! [`MsiRoutes`]): a completion reaches the vCPU the guest chose for that
//! queue without leaving the kernel.

use std::io;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use vmm_sys_util::eventfd::EventFd;

/// Red Hat's PCI vendor ID, which virtio devices use.
pub const VENDOR: u16 = 0x1af4;
/// Size of the register window (BAR 0).
pub const BAR_SIZE: u64 = 0x8000;
/// No vector: the driver does not want this interrupt.
pub const NO_VECTOR: u16 = 0xffff;
/// Most MSI-X vectors a device has (its queues and one for configuration changes).
pub const MAX_VECTORS: usize = 64;

/// Offsets in the register window.
pub const COMMON: u64 = 0x0000;
pub const ISR: u64 = 0x1000;
pub const DEVICE: u64 = 0x2000;
pub const NOTIFY: u64 = 0x3000;
pub const MSIX_TABLE: u64 = 0x4000;
pub const MSIX_PBA: u64 = 0x5000;
/// Size of each register block in the window.
pub const REGION: u64 = 0x1000;
/// Bytes between two queues' notification addresses.
pub const NOTIFY_MULTIPLIER: u64 = 4;

/// Where the capability list starts, and the MSI-X capability in it.
const CAPS: usize = 0x40;
const MSIX_CAP: usize = 0x84;
const MSIX_ENABLE: u16 = 1 << 15;
const MSIX_FUNCTION_MASK: u16 = 1 << 14;
const ENTRY_MASKED: u32 = 1;
/// Command register bits a device keeps: I/O and memory decoding, bus
/// mastering, INTx disable.
const COMMAND_BITS: u16 = 0x0007 | 0x0400;
const COMMAND_MEMORY: u16 = 0x0002;

/// The message an MSI-X vector sends (what the guest wrote in its entry).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MsiMessage {
    pub addr: u64,
    pub data: u32,
}

/// Where a vector's GSI goes: the machine routes it to an MSI message (or
/// nowhere) in KVM.
pub trait MsiRoutes: Send + Sync {
    fn route(&self, gsi: u32, msg: Option<MsiMessage>) -> io::Result<()>;
}

/// One MSI-X table entry as the guest wrote it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct MsixEntry {
    pub addr_lo: u32,
    pub addr_hi: u32,
    pub data: u32,
    pub control: u32,
}

impl Default for MsixEntry {
    fn default() -> Self {
        // Every vector starts masked (PCI 3.0 §6.8.2.9).
        MsixEntry {
            addr_lo: 0,
            addr_hi: 0,
            data: 0,
            control: ENTRY_MASKED,
        }
    }
}

/// The PCI registers a snapshot keeps.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PciState {
    pub command: u16,
    /// BAR 0 as programmed (its address bits).
    pub bar0: u32,
    /// MSI-X message control: enable and function mask.
    pub msix_control: u16,
    pub table: Vec<MsixEntry>,
    /// Vectors raised while masked (bit per vector).
    pub pending: u64,
    /// The configuration-change vector, then one per queue.
    pub config_vector: u16,
    pub queue_vectors: Vec<u16>,
}

impl PciState {
    /// A device's registers at power-on: BAR 0 at `bar0` (as firmware would
    /// have placed it) with memory decoding on, every vector unassigned.
    pub fn new(bar0: u32, queues: usize) -> PciState {
        PciState {
            command: COMMAND_MEMORY,
            bar0,
            msix_control: 0,
            table: vec![MsixEntry::default(); queues + 1],
            pending: 0,
            config_vector: NO_VECTOR,
            queue_vectors: vec![NO_VECTOR; queues],
        }
    }
}

/// The PCI side of one virtio device: its registers, and an eventfd per
/// vector whose GSI is `gsi_base + vector`.
pub struct Pci {
    pub st: PciState,
    virtio_id: u32,
    vectors: Vec<EventFd>,
    gsi_base: u32,
    routes: Arc<dyn MsiRoutes>,
}

impl std::fmt::Debug for Pci {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pci")
            .field("st", &self.st)
            .field("gsi_base", &self.gsi_base)
            .finish_non_exhaustive()
    }
}

/// The PCI class of a virtio device type (virtio 1.x §4.1.2.1 leaves it to
/// the device; these are QEMU's, which drivers and tools recognise).
fn class_of(virtio_id: u32) -> u32 {
    match virtio_id {
        1 => 0x02_0000, // network controller, ethernet
        2 => 0x01_0000, // mass storage, SCSI (what QEMU's virtio-blk says)
        _ => 0xff_0000,
    }
}

impl Pci {
    /// `vectors`: one eventfd per table entry, already connected (irqfd)
    /// to GSIs `gsi_base..`; `st` is the registers (fresh or restored), whose
    /// table entries are routed now.
    pub fn new(
        virtio_id: u32,
        st: PciState,
        vectors: Vec<EventFd>,
        gsi_base: u32,
        routes: Arc<dyn MsiRoutes>,
    ) -> Result<Pci, String> {
        if st.table.len() != vectors.len() || st.table.len() > MAX_VECTORS {
            return Err(format!(
                "the saved MSI-X table has {} vectors, the device has {}",
                st.table.len(),
                vectors.len()
            ));
        }
        let p = Pci {
            st,
            virtio_id,
            vectors,
            gsi_base,
            routes,
        };
        for v in 0..p.st.table.len() {
            p.route(v)?;
        }
        Ok(p)
    }

    fn route(&self, v: usize) -> Result<(), String> {
        let e = self.st.table[v];
        let msg = (e.addr_lo != 0 || e.addr_hi != 0).then_some(MsiMessage {
            addr: u64::from(e.addr_hi) << 32 | u64::from(e.addr_lo),
            data: e.data,
        });
        self.routes
            .route(self.gsi_base + v as u32, msg)
            .map_err(|e| format!("cannot route MSI-X vector {v}: {e}"))
    }

    /// BAR 0's address while memory decoding is on.
    pub fn bar(&self) -> Option<u64> {
        (self.st.command & COMMAND_MEMORY != 0 && self.st.bar0 != 0)
            .then_some(u64::from(self.st.bar0))
    }

    /// The configuration space as the guest reads it.
    fn config_space(&self) -> [u8; 256] {
        let mut c = [0u8; 256];
        let put16 =
            |c: &mut [u8; 256], at: usize, v: u16| c[at..at + 2].copy_from_slice(&v.to_le_bytes());
        let put32 =
            |c: &mut [u8; 256], at: usize, v: u32| c[at..at + 4].copy_from_slice(&v.to_le_bytes());
        put16(&mut c, 0x00, VENDOR);
        put16(&mut c, 0x02, 0x1040 + self.virtio_id as u16);
        put16(&mut c, 0x04, self.st.command);
        put16(&mut c, 0x06, 0x0010); // a capability list
                                     // Revision 1 (a modern-only device), then the class code.
        put32(&mut c, 0x08, class_of(self.virtio_id) << 8 | 1);
        put32(&mut c, 0x10, self.st.bar0); // 32-bit memory BAR
        put16(&mut c, 0x2c, VENDOR);
        put16(&mut c, 0x2e, 0x40 + self.virtio_id as u16);
        c[0x34] = CAPS as u8;
        c[0x3c] = 0xff; // no INTx line
                        // virtio_pci_cap: vendor-specific capabilities naming where each
                        // register block is in BAR 0.
        let caps: [(u8, u64, u8); 4] = [
            (1, COMMON, 16),
            (2, NOTIFY, 20),
            (3, ISR, 16),
            (4, DEVICE, 16),
        ];
        let mut at = CAPS;
        for (i, (kind, offset, len)) in caps.iter().enumerate() {
            let next = if i + 1 < caps.len() {
                at + usize::from(*len)
            } else {
                MSIX_CAP
            };
            c[at] = 0x09;
            c[at + 1] = next as u8;
            c[at + 2] = *len;
            c[at + 3] = *kind;
            c[at + 4] = 0; // BAR 0
            put32(&mut c, at + 8, *offset as u32);
            put32(&mut c, at + 12, REGION as u32);
            if *kind == 2 {
                put32(&mut c, at + 16, NOTIFY_MULTIPLIER as u32);
            }
            at += usize::from(*len);
        }
        c[MSIX_CAP] = 0x11;
        c[MSIX_CAP + 1] = 0;
        put16(
            &mut c,
            MSIX_CAP + 2,
            self.st.msix_control | (self.st.table.len() as u16 - 1),
        );
        put32(&mut c, MSIX_CAP + 4, MSIX_TABLE as u32);
        put32(&mut c, MSIX_CAP + 8, MSIX_PBA as u32);
        c
    }

    /// A guest read of the configuration space (`off` within its 256 bytes).
    pub fn config_read(&self, off: usize, data: &mut [u8]) {
        let c = self.config_space();
        for (i, b) in data.iter_mut().enumerate() {
            *b = c.get(off + i).copied().unwrap_or(0);
        }
    }

    /// A guest write to the configuration space: the command register, BAR
    /// 0 and the MSI-X control are writable; the rest is read-only.
    pub fn config_write(&mut self, off: usize, data: &[u8]) {
        let dword = off & !3;
        let c = self.config_space();
        let mut v = [0u8; 4];
        v.copy_from_slice(&c[dword.min(252)..dword.min(252) + 4]);
        for (i, b) in data.iter().enumerate() {
            if let Some(slot) = v.get_mut(off - dword + i) {
                *slot = *b;
            }
        }
        let v = u32::from_le_bytes(v);
        match dword {
            0x04 => self.st.command = v as u16 & COMMAND_BITS,
            // Sizing writes all ones and reads back the size's mask.
            0x10 => self.st.bar0 = v & !(BAR_SIZE as u32 - 1),
            MSIX_CAP => {
                let was = self.st.msix_control;
                self.st.msix_control = (v >> 16) as u16 & (MSIX_ENABLE | MSIX_FUNCTION_MASK);
                if was != self.st.msix_control {
                    self.deliver_pending();
                }
            }
            _ => {}
        }
    }

    /// A guest read of the MSI-X table or pending bits (`off` in BAR 0).
    pub fn msix_read(&self, off: u64, data: &mut [u8]) {
        let v: u64 = if off >= MSIX_PBA {
            // One 64-bit word of pending bits (at most 64 vectors); past it, zeroes.
            let at = off - MSIX_PBA;
            if at < 8 {
                self.st.pending >> (at * 8)
            } else {
                0
            }
        } else {
            let i = ((off - MSIX_TABLE) / 16) as usize;
            let Some(e) = self.st.table.get(i) else {
                data.fill(0);
                return;
            };
            let w = match (off - MSIX_TABLE) % 16 / 4 {
                0 => e.addr_lo,
                1 => e.addr_hi,
                2 => e.data,
                _ => e.control,
            };
            u64::from(w)
        };
        let bytes = v.to_le_bytes();
        let n = data.len().min(8);
        data[..n].copy_from_slice(&bytes[..n]);
    }

    /// A guest write to the MSI-X table (the pending bits are read-only).
    pub fn msix_write(&mut self, off: u64, data: &[u8]) {
        if off >= MSIX_PBA || (data.len() != 4 && data.len() != 8) {
            return;
        }
        let i = ((off - MSIX_TABLE) / 16) as usize;
        if i >= self.st.table.len() {
            return;
        }
        let mut words = vec![u32::from_le_bytes([data[0], data[1], data[2], data[3]])];
        if data.len() == 8 {
            words.push(u32::from_le_bytes([data[4], data[5], data[6], data[7]]));
        }
        let first = ((off - MSIX_TABLE) % 16 / 4) as usize;
        let mut reroute = false;
        for (k, w) in words.into_iter().enumerate() {
            let e = &mut self.st.table[i];
            match first + k {
                0 => e.addr_lo = w,
                1 => e.addr_hi = w,
                2 => e.data = w,
                3 => e.control = w & ENTRY_MASKED,
                _ => continue,
            }
            reroute |= first + k < 3;
        }
        if reroute {
            if let Err(e) = self.route(i) {
                tracing::warn!("virtio-pci: {e}");
            }
        }
        self.deliver_pending();
    }

    fn masked(&self, v: usize) -> bool {
        self.st.msix_control & MSIX_FUNCTION_MASK != 0
            || self.st.table[v].control & ENTRY_MASKED != 0
    }

    /// Sends vector `v`'s message (or marks it pending while masked). Without
    /// MSI-X enabled nothing is sent: this device has no INTx line, and
    /// the driver sees the cause in the ISR.
    pub fn signal(&mut self, v: u16) {
        let i = usize::from(v);
        if v == NO_VECTOR || i >= self.st.table.len() || self.st.msix_control & MSIX_ENABLE == 0 {
            return;
        }
        if self.masked(i) {
            self.st.pending |= 1 << i;
        } else {
            let _ = self.vectors[i].write(1);
        }
    }

    fn deliver_pending(&mut self) {
        if self.st.msix_control & MSIX_ENABLE == 0 {
            return;
        }
        for i in 0..self.st.table.len() {
            if self.st.pending & (1 << i) != 0 && !self.masked(i) {
                self.st.pending &= !(1 << i);
                let _ = self.vectors[i].write(1);
            }
        }
    }

    /// A vector the driver may assign: one of the table's, or none.
    pub fn valid_vector(&self, v: u16) -> u16 {
        if usize::from(v) < self.st.table.len() {
            v
        } else {
            NO_VECTOR
        }
    }

    /// The device was re-plugged ([`crate::devices::hotplug`]): its
    /// registers are at power-on again (BAR 0 where it was, every vector
    /// unassigned and unrouted).
    pub fn power_on(&mut self) {
        self.st = PciState::new(self.st.bar0, self.st.queue_vectors.len());
        for v in 0..self.st.table.len() {
            if let Err(e) = self.route(v) {
                tracing::warn!("{e}");
            }
        }
    }

    /// The driver reset the device: no vector is assigned any more.
    pub fn reset(&mut self) {
        self.st.config_vector = NO_VECTOR;
        for v in &mut self.st.queue_vectors {
            *v = NO_VECTOR;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[derive(Default)]
    struct Routes(Mutex<Vec<(u32, Option<MsiMessage>)>>);
    impl MsiRoutes for Routes {
        fn route(&self, gsi: u32, msg: Option<MsiMessage>) -> io::Result<()> {
            self.0.lock().unwrap().push((gsi, msg));
            Ok(())
        }
    }

    fn pci(queues: usize) -> (Pci, Vec<EventFd>, Arc<Routes>) {
        let fds: Vec<EventFd> = (0..=queues)
            .map(|_| EventFd::new(libc::EFD_NONBLOCK).unwrap())
            .collect();
        let theirs = fds.iter().map(|f| f.try_clone().unwrap()).collect();
        let routes = Arc::new(Routes::default());
        let p = Pci::new(
            2,
            PciState::new(0xc000_0000, queues),
            theirs,
            40,
            routes.clone(),
        )
        .unwrap();
        (p, fds, routes)
    }

    fn r32(p: &Pci, off: usize) -> u32 {
        let mut b = [0u8; 4];
        p.config_read(off, &mut b);
        u32::from_le_bytes(b)
    }

    #[test]
    fn the_header_names_a_modern_virtio_device_with_its_capabilities() {
        let (p, _, _) = pci(2);
        assert_eq!(r32(&p, 0), 0x1042_1af4, "vendor, device 0x1040 + 2");
        assert_eq!(r32(&p, 8) & 0xff, 1, "revision 1");
        // Walk the capability list: four virtio ones, then MSI-X.
        let mut at = r32(&p, 0x34) as usize & 0xff;
        let mut kinds = Vec::new();
        while at != 0 {
            let head = r32(&p, at);
            if head & 0xff == 0x09 {
                let kind = (head >> 24) as u8;
                let offset = r32(&p, at + 8) as u64;
                assert!(offset + r32(&p, at + 12) as u64 <= BAR_SIZE);
                kinds.push(kind);
            } else {
                assert_eq!(head & 0xff, 0x11, "MSI-X");
                assert_eq!((head >> 16) & 0x7ff, 2, "table size less one: 3 vectors");
                kinds.push(0x11);
            }
            at = (head >> 8) as usize & 0xff;
        }
        assert_eq!(kinds, vec![1, 2, 3, 4, 0x11]);
    }

    #[test]
    fn the_bar_sizes_and_moves_and_decoding_turns_it_off() {
        let (mut p, _, _) = pci(1);
        assert_eq!(p.bar(), Some(0xc000_0000));
        p.config_write(0x10, &0xffff_ffffu32.to_le_bytes());
        assert_eq!(r32(&p, 0x10), !(BAR_SIZE as u32 - 1), "size mask read back");
        p.config_write(0x10, &0xc001_0000u32.to_le_bytes());
        assert_eq!(p.bar(), Some(0xc001_0000));
        p.config_write(0x04, &[0]);
        assert_eq!(p.bar(), None, "memory decoding off");
        // Read-only fields stay.
        p.config_write(0x00, &0u32.to_le_bytes());
        assert_eq!(r32(&p, 0) & 0xffff, u32::from(VENDOR));
    }

    #[test]
    fn a_vector_fires_only_when_enabled_and_unmasked_and_pending_ones_follow() {
        let (mut p, fds, routes) = pci(1);
        // Program vector 1 and assign it to queue 0.
        p.msix_write(MSIX_TABLE + 16, &0xfee0_0000u32.to_le_bytes());
        p.msix_write(MSIX_TABLE + 16 + 4, &0u32.to_le_bytes());
        p.msix_write(MSIX_TABLE + 16 + 8, &0x41u32.to_le_bytes());
        let last = *routes.0.lock().unwrap().last().unwrap();
        assert_eq!(
            last,
            (
                41,
                Some(MsiMessage {
                    addr: 0xfee0_0000,
                    data: 0x41
                })
            )
        );
        p.st.queue_vectors[0] = p.valid_vector(1);
        assert_eq!(p.valid_vector(2), NO_VECTOR, "only the table's vectors");
        p.signal(1);
        assert!(fds[1].read().is_err(), "MSI-X not enabled: nothing sent");
        let ctl = (u32::from(MSIX_ENABLE) << 16).to_le_bytes();
        p.config_write(MSIX_CAP, &ctl);
        p.signal(1);
        assert!(fds[1].read().is_err(), "the entry is masked");
        assert_eq!(p.st.pending, 2, "pending while masked");
        p.msix_write(MSIX_TABLE + 16 + 12, &0u32.to_le_bytes());
        assert_eq!(fds[1].read().unwrap(), 1, "sent on unmask");
        assert_eq!(p.st.pending, 0);
        p.signal(1);
        assert_eq!(fds[1].read().unwrap(), 1);
        // The function mask holds every vector.
        let ctl = (u32::from(MSIX_ENABLE | MSIX_FUNCTION_MASK) << 16).to_le_bytes();
        p.config_write(MSIX_CAP, &ctl);
        p.signal(1);
        assert!(fds[1].read().is_err());
        let mut pba = [0u8; 8];
        p.msix_read(MSIX_PBA, &mut pba);
        assert_eq!(u64::from_le_bytes(pba), 2, "the guest sees it pending");
        p.msix_read(MSIX_PBA + 8, &mut pba);
        assert_eq!(u64::from_le_bytes(pba), 0, "nothing past the pending word");
    }

    #[test]
    fn a_restored_table_is_routed_again_and_a_wrong_size_is_refused() {
        let (mut p, _, _) = pci(1);
        p.msix_write(MSIX_TABLE, &0xfee0_1000u32.to_le_bytes());
        p.msix_write(MSIX_TABLE + 8, &0x30u32.to_le_bytes());
        let st = p.st.clone();
        let routes = Arc::new(Routes::default());
        let fds = (0..2).map(|_| EventFd::new(0).unwrap()).collect();
        Pci::new(2, st.clone(), fds, 50, routes.clone()).unwrap();
        let r = routes.0.lock().unwrap().clone();
        assert_eq!(
            r,
            vec![
                (
                    50,
                    Some(MsiMessage {
                        addr: 0xfee0_1000,
                        data: 0x30
                    })
                ),
                (51, None)
            ]
        );
        let fds = (0..3).map(|_| EventFd::new(0).unwrap()).collect();
        assert!(Pci::new(2, st, fds, 50, routes).is_err());
    }

    /// A re-plugged device: power-on registers (vectors unassigned, MSI-X
    /// off, the table empty), BAR 0 where it was, and every vector's route
    /// taken away, so a stale message is never delivered.
    #[test]
    fn power_on_clears_the_table_and_unroutes_every_vector() {
        let (mut p, _, routes) = pci(1);
        p.config_write(0x10, &0xc000_8000u32.to_le_bytes());
        p.config_write(MSIX_CAP, &(u32::from(MSIX_ENABLE) << 16).to_le_bytes());
        p.msix_write(MSIX_TABLE, &0xfee0_1000u32.to_le_bytes());
        p.st.queue_vectors[0] = 0;
        routes.0.lock().unwrap().clear();
        p.power_on();
        assert_eq!(p.st, PciState::new(0xc000_8000, 1));
        assert_eq!(p.bar(), Some(0xc000_8000));
        assert_eq!(*routes.0.lock().unwrap(), vec![(40, None), (41, None)]);
    }
}
