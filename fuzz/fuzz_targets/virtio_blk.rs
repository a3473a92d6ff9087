#![no_main]
//! A virtio-blk device driven by a hostile driver: the input picks the
//! negotiated features, the queue geometry and the whole content of guest
//! memory (rings, descriptor tables, indirect tables, request headers), then
//! notifies the device several times, mutating memory in between. The device
//! must never panic, never touch memory outside the guest's, and stay
//! resettable; its state must survive save/restore.

use libfuzzer_sys::fuzz_target;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm::devices::virtio::{MemDisk, VirtioBlk};
use vmm_sys_util::eventfd::EventFd;

const MEM: usize = 64 << 10;
const DISK: usize = 32 << 10;

fn w32(d: &mut VirtioBlk, mem: &GuestMemoryMmap, off: u64, v: u32) {
    d.write(off, &v.to_le_bytes());
    // A notification: the requests run (on the I/O thread in the VMM).
    if off == 0x050 {
        d.process(mem);
    }
}

fn r32(d: &mut VirtioBlk, off: u64) -> u32 {
    let mut b = [0u8; 4];
    d.read(off, &mut b);
    u32::from_le_bytes(b)
}

fuzz_target!(|data: &[u8]| {
    // flags, log2 queue size, desc/avail/used (u16 each), rounds, then memory.
    if data.len() < 9 {
        return;
    }
    let flags = data[0];
    let qsize = 1u32 << (data[1] % 9);
    let addr = |i: usize| u32::from(u16::from_le_bytes([data[2 + 2 * i], data[3 + 2 * i]]));
    let rounds = 1 + usize::from(data[8] % 4);
    let body = &data[9..];

    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM)]).unwrap();
    let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let disk = MemDisk(vec![0x5a; DISK]);
    let mut dev = VirtioBlk::new(
        "fuzz".into(),
        Box::new(disk),
        flags & 4 != 0,
        irq.try_clone().unwrap(),
    );
    w32(&mut dev, &mem, 0x070, 1 | 2);
    w32(&mut dev, &mem, 0x024, 0);
    // Low feature word: INDIRECT_DESC (28) and EVENT_IDX (29) as chosen.
    w32(&mut dev, &mem, 0x020, (u32::from(flags & 3)) << 28);
    w32(&mut dev, &mem, 0x024, 1);
    w32(&mut dev, &mem, 0x020, 1);
    w32(&mut dev, &mem, 0x070, 1 | 2 | 8);
    w32(&mut dev, &mem, 0x030, 0);
    w32(&mut dev, &mem, 0x038, qsize);
    w32(&mut dev, &mem, 0x080, addr(0));
    w32(&mut dev, &mem, 0x090, addr(1));
    w32(&mut dev, &mem, 0x0a0, addr(2));
    w32(&mut dev, &mem, 0x044, 1);
    w32(&mut dev, &mem, 0x070, 1 | 2 | 8 | 4);

    // Memory is rewritten in `rounds` slices, one notify after each.
    let chunk = body.len().div_ceil(rounds).max(1);
    let mut at = 0usize;
    for piece in body.chunks(chunk) {
        let n = piece.len().min(MEM - at % MEM);
        mem.write_slice(&piece[..n], GuestAddress((at % MEM) as u64))
            .unwrap();
        at += n;
        w32(&mut dev, &mem, 0x050, 0);
        let _ = r32(&mut dev, 0x060);
        let _ = irq.read();
        // Saved and restored mid-stream, the device is the same device.
        let st = dev.save();
        let (id, backend, ro) = dev.into_parts();
        dev = VirtioBlk::restore(id, backend, ro, irq.try_clone().unwrap(), &st).unwrap();
        assert_eq!(dev.save(), st);
    }
    // A reset always brings the device back.
    w32(&mut dev, &mem, 0x070, 0);
    assert_eq!(r32(&mut dev, 0x070), 0);
    let _ = dev.stats;
});
