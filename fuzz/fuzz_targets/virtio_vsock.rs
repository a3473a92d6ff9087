#![no_main]
//! A virtio-vsock device driven by a hostile driver: the input picks the
//! negotiated features, the geometry of the three queues and the content of
//! guest memory (rings, descriptor tables, packet headers with any CIDs,
//! ports, lengths and operations, payloads); a host process has connected
//! through the device's socket and asked for a port. The device takes
//! transmitted packets and fills receive buffers several times, memory
//! rewritten in between. It must never panic, never touch memory outside
//! the guest's, stay resettable, and its state must survive save/restore.

use std::io::Write;
use std::os::unix::net::UnixStream;

use libfuzzer_sys::fuzz_target;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm::devices::io_thread::IoDevice;
use vmm::devices::virtio::vsock::VirtioVsock;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

const MEM: usize = 64 << 10;
/// The device's sub-tokens (vsock/event_handler.rs): the listener, then the
/// receive, transmit and event queues' notifications.
const LISTENER: u32 = 0;
const RX_KICK: u32 = 1;
const TX_KICK: u32 = 2;

fn w32(d: &mut VirtioVsock, off: u64, v: u32) {
    d.write(off, &v.to_le_bytes());
}

fn r32(d: &mut VirtioVsock, off: u64) -> u32 {
    let mut b = [0u8; 4];
    d.read(off, &mut b);
    u32::from_le_bytes(b)
}

fuzz_target!(|data: &[u8]| {
    // flags, log2 queue size, 3 x (desc, avail, used) u16, rounds, memory.
    const HEAD: usize = 21;
    if data.len() < HEAD {
        return;
    }
    let flags = data[0];
    let qsize = 1u32 << (data[1] % 9);
    let addr = |i: usize| u32::from(u16::from_le_bytes([data[2 + 2 * i], data[3 + 2 * i]]));
    let rounds = 1 + usize::from(data[20] % 4);
    let body = &data[HEAD..];

    let dir = std::env::temp_dir().join(format!("snapvmm-fuzz-vsock-{}", std::process::id()));
    let _ = std::fs::create_dir_all(&dir);
    let path = dir.join("v.sock");
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM)]).unwrap();
    let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let mut dev = VirtioVsock::new(3, &path, irq.try_clone().unwrap()).unwrap();
    w32(&mut dev, 0x070, 1 | 2);
    w32(&mut dev, 0x024, 0);
    // INDIRECT_DESC (28) and EVENT_IDX (29) as the input chooses.
    w32(&mut dev, 0x020, u32::from(flags & 3) << 28);
    w32(&mut dev, 0x024, 1);
    w32(&mut dev, 0x020, 1);
    w32(&mut dev, 0x070, 1 | 2 | 8);
    for q in 0..3u32 {
        w32(&mut dev, 0x030, q);
        w32(&mut dev, 0x038, qsize);
        w32(&mut dev, 0x080, addr(3 * q as usize));
        w32(&mut dev, 0x090, addr(3 * q as usize + 1));
        w32(&mut dev, 0x0a0, addr(3 * q as usize + 2));
        w32(&mut dev, 0x044, 1);
    }
    w32(&mut dev, 0x070, 1 | 2 | 8 | 4);
    let mut changes = Vec::new();
    // A host process asks for port 5 (its request waits for receive buffers).
    let mut host = UnixStream::connect(&path).unwrap();
    host.write_all(b"CONNECT 5\n").unwrap();
    dev.event(LISTENER, EventSet::IN, &mem, &mut changes);

    let chunk = body.len().div_ceil(rounds).max(1);
    let mut at = 0usize;
    for piece in body.chunks(chunk) {
        let n = piece.len().min(MEM - at % MEM);
        mem.write_slice(&piece[..n], GuestAddress((at % MEM) as u64))
            .unwrap();
        at += n;
        let _ = host.write_all(&piece[..n.min(64)]);
        for sub in [TX_KICK, RX_KICK] {
            dev.event(sub, EventSet::IN, &mem, &mut changes);
        }
        // Every stream the device asked to poll may have bytes.
        for w in changes.drain(..) {
            if let vmm::devices::io_thread::Watch::Add { sub, .. } = w {
                dev.event(sub, EventSet::IN | EventSet::OUT, &mem, &mut Vec::new());
            }
        }
        let _ = r32(&mut dev, 0x060);
        let _ = irq.read();
        let st = dev.save();
        let other = dir.join("v2.sock");
        let restored = VirtioVsock::restore(3, &other, irq.try_clone().unwrap(), &st).unwrap();
        assert_eq!(restored.save(), st);
    }
    if flags & 4 != 0 {
        dev.transport_reset(&mem);
    }
    w32(&mut dev, 0x070, 0);
    assert_eq!(r32(&mut dev, 0x070), 0);
    drop(dev);
    let _ = std::fs::remove_dir_all(&dir);
});
