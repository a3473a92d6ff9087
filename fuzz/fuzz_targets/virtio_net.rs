#![no_main]
//! A virtio-net device driven by a hostile driver: the input picks the
//! negotiated features, the geometry of the three queues, the content of
//! guest memory (rings, descriptor and indirect tables, frames, control
//! commands) and frames arriving from the network; the device transmits,
//! receives and answers control commands several times, with memory
//! rewritten in between. It must never panic, never touch memory outside
//! the guest's, never send more than a frame, stay resettable, and its state
//! must survive save/restore.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixDatagram;
use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm::devices::virtio::net::{NetBackend, VirtioNet, MAX_FRAME};
use vmm::devices::virtio::vectored::{self, GuestIov};
use vmm_sys_util::eventfd::EventFd;

const MEM: usize = 64 << 10;

struct Pair(UnixDatagram);

impl NetBackend for Pair {
    fn fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
    fn name(&self) -> &str {
        "fuzz"
    }
    fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.recv(buf)
    }
    fn recv_into(&self, dst: &GuestIov) -> io::Result<usize> {
        vectored::read_into(self.0.as_raw_fd(), dst)
    }
    fn send(&self, frame: &[u8]) -> io::Result<usize> {
        assert!(frame.len() <= MAX_FRAME, "a frame larger than any");
        self.0.send(frame)
    }
    fn send_from(&self, src: &GuestIov) -> io::Result<usize> {
        assert!(src.len() <= MAX_FRAME, "a frame larger than any");
        vectored::write_from(self.0.as_raw_fd(), src)
    }
    fn set_offloads(&self, _: u32) -> io::Result<()> {
        Ok(())
    }
}

fn w32(d: &mut VirtioNet, off: u64, v: u32) {
    d.write(off, &v.to_le_bytes());
}

fn r32(d: &mut VirtioNet, off: u64) -> u32 {
    let mut b = [0u8; 4];
    d.read(off, &mut b);
    u32::from_le_bytes(b)
}

fuzz_target!(|data: &[u8]| {
    // flags, log2 queue size, 3 × (desc, avail, used) u16, rounds, frame length u16, memory.
    const HEAD: usize = 23;
    if data.len() < HEAD {
        return;
    }
    let flags = data[0];
    let qsize = 1u32 << (data[1] % 9);
    let addr = |i: usize| u32::from(u16::from_le_bytes([data[2 + 2 * i], data[3 + 2 * i]]));
    let rounds = 1 + usize::from(data[20] % 4);
    let frame_len = usize::from(u16::from_le_bytes([data[21], data[22]]));
    let body = &data[HEAD..];

    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM)]).unwrap();
    let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let (ours, net) = UnixDatagram::pair().unwrap();
    ours.set_nonblocking(true).unwrap();
    net.set_nonblocking(true).unwrap();
    let backend: Arc<dyn NetBackend> = Arc::new(Pair(ours));
    let mut dev = VirtioNet::new(
        "fuzz".into(),
        [0x52, 0x54, 0, 1, 2, 3],
        backend.clone(),
        irq.try_clone().unwrap(),
    )
    .unwrap();
    w32(&mut dev, 0x070, 1 | 2);
    w32(&mut dev, 0x024, 0);
    // CSUM, GUEST_CSUM, MRG_RXBUF (15), CTRL_VQ (17), GUEST_ANNOUNCE (21),
    // INDIRECT_DESC (28) and EVENT_IDX (29) as the input chooses.
    let f = u32::from(flags);
    let lo = (f & 3) | ((f >> 2) & 1) << 15 | ((f >> 3) & 1) << 17 | ((f >> 3) & 1) << 21
        | ((f >> 4) & 3) << 28;
    w32(&mut dev, 0x020, lo);
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
    if flags & 0x40 != 0 {
        dev.announce();
    }

    let chunk = body.len().div_ceil(rounds).max(1);
    let mut at = 0usize;
    let mut buf = vec![0u8; MAX_FRAME + 1];
    for piece in body.chunks(chunk) {
        let n = piece.len().min(MEM - at % MEM);
        mem.write_slice(&piece[..n], GuestAddress((at % MEM) as u64))
            .unwrap();
        at += n;
        // A frame from the network: the piece itself, cut to the chosen length.
        let frame = &piece[..frame_len.min(piece.len())];
        let _ = net.send(frame);
        dev.transmit(&mem);
        let _ = dev.receive(&mem);
        dev.control(&mem);
        while let Ok(k) = net.recv(&mut buf) {
            assert!(k <= MAX_FRAME);
        }
        let _ = r32(&mut dev, 0x060);
        let _ = irq.read();
        let st = dev.save();
        dev = VirtioNet::restore(
            "fuzz".into(),
            None,
            backend.clone(),
            irq.try_clone().unwrap(),
            &st,
        )
        .unwrap();
        assert_eq!(dev.save(), st);
    }
    w32(&mut dev, 0x070, 0);
    assert_eq!(r32(&mut dev, 0x070), 0);
});
