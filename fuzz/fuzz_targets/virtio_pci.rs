#![no_main]
//! A virtio-blk device with two queues on virtio-pci, driven by a hostile
//! driver: the input is a sequence of accesses (configuration space or BAR
//! 0, any offset, any size from 1 to 8 bytes, any value) with notifications
//! and guest memory written in between. The device must never panic, never
//! touch memory outside the guest's, never send a vector it does not have,
//! stay resettable, and its state (PCI registers included) must survive a
//! save and restore.

use std::sync::{Arc, Mutex};

use libfuzzer_sys::fuzz_target;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm::devices::virtio::pci::{MsiMessage, MsiRoutes, BAR_SIZE, MAX_VECTORS};
use vmm::devices::virtio::{MemDisk, VirtioBlk};
use vmm_sys_util::eventfd::EventFd;

const MEM: usize = 64 << 10;
const QUEUES: usize = 2;
const GSI: u32 = 100;

#[derive(Default)]
struct Routes(Mutex<Vec<u32>>);

impl MsiRoutes for Routes {
    fn route(&self, gsi: u32, _: Option<MsiMessage>) -> std::io::Result<()> {
        assert!((GSI..GSI + QUEUES as u32 + 1).contains(&gsi), "GSI {gsi} not the device's");
        self.0.lock().unwrap().push(gsi);
        Ok(())
    }
}

fn attach(dev: &mut VirtioBlk, routes: &Arc<Routes>) -> Vec<EventFd> {
    let vectors: Vec<EventFd> = (0..=QUEUES)
        .map(|_| EventFd::new(libc::EFD_NONBLOCK).unwrap())
        .collect();
    dev.transport_mut()
        .attach_pci(
            0xc000_0000,
            vectors.iter().map(|v| v.try_clone().unwrap()).collect(),
            GSI,
            routes.clone(),
        )
        .unwrap();
    vectors
}

fuzz_target!(|data: &[u8]| {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM)]).unwrap();
    let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let mut dev = VirtioBlk::with_queues(
        "fuzz".into(),
        Box::new(MemDisk(vec![0x5a; 32 << 10])),
        false,
        irq.try_clone().unwrap(),
        QUEUES,
    );
    let routes = Arc::new(Routes::default());
    let mut vectors = attach(&mut dev, &routes);
    // Each access: kind, offset (u16), size, value (u64): 12 bytes.
    for op in data.chunks_exact(12) {
        let off = u64::from(u16::from_le_bytes([op[1], op[2]]));
        let len = 1 + usize::from(op[3] % 8);
        let value = &op[4..4 + len];
        match op[0] % 6 {
            0 => dev.transport_mut().pci_config_write(off as usize % 256, value),
            1 => {
                let mut b = [0u8; 8];
                dev.transport_mut().pci_config_read(off as usize % 256, &mut b[..len]);
            }
            2 => dev.write(off % BAR_SIZE, value),
            3 => {
                let mut b = [0u8; 8];
                dev.read(off % BAR_SIZE, &mut b[..len]);
            }
            4 => {
                // Guest memory changes under the device, then it runs.
                let at = (off as usize * 8) % (MEM - 8);
                mem.write_slice(&op[4..12], GuestAddress(at as u64)).unwrap();
                dev.process(&mem);
            }
            _ => {
                // Saved and restored mid-stream, the device is the same device.
                let st = dev.save();
                let (id, backend, ro) = dev.into_parts();
                dev = VirtioBlk::restore(id, backend, ro, irq.try_clone().unwrap(), &st).unwrap();
                vectors = attach(&mut dev, &routes);
                assert_eq!(dev.save(), st);
            }
        }
        assert!(vectors.len() <= MAX_VECTORS);
        for v in &vectors {
            let _ = v.read();
        }
    }
    // A reset always brings the device back.
    dev.write(0x14, &[0]);
    let mut s = [0xffu8];
    dev.read(0x14, &mut s);
    assert_eq!(s[0], 0);
});
