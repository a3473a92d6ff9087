//! The device driven as Linux's driver would, its host side through real
//! unix sockets.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::time::Duration;

use super::super::queue::QUEUE_MAX;
use super::*;

const QSIZE: u16 = 16;
const GUEST: u64 = 3;
fn rings(q: usize) -> (u64, u64, u64) {
    let b = 0x10000 * (q as u64 + 1);
    (b, b + 0x1000, b + 0x2000)
}
const RXBUF: u64 = 0x100000;
const TXBUF: u64 = 0x80000;
const RXLEN: u32 = 4096 + Header::LEN as u32;

struct Rig {
    mem: GuestMemoryMmap,
    dev: VirtioVsock,
    dir: PathBuf,
    avail: [u16; QUEUES],
    used_seen: [u16; QUEUES],
    tx_next: u16,
}

fn w32(d: &mut VirtioVsock, off: u64, v: u32) {
    d.write(off, &v.to_le_bytes());
}

fn rig(tag: &str) -> Rig {
    let dir = std::env::temp_dir().join(format!("snapvmm-vsock-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap();
    let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let mut dev = VirtioVsock::new(GUEST, &dir.join("v.sock"), irq).unwrap();
    let mut cfg = [0u8; 8];
    dev.read(0x100, &mut cfg);
    assert_eq!(
        u64::from_le_bytes(cfg),
        GUEST,
        "the CID in the config space"
    );
    w32(&mut dev, 0x070, 1 | 2);
    w32(&mut dev, 0x024, 1);
    w32(&mut dev, 0x020, 1);
    w32(&mut dev, 0x070, 1 | 2 | 8);
    for q in 0..QUEUES {
        let (d, a, u) = rings(q);
        w32(&mut dev, 0x030, q as u32);
        let mut b = [0u8; 4];
        dev.read(0x034, &mut b);
        assert_eq!(u32::from_le_bytes(b), u32::from(QUEUE_MAX));
        w32(&mut dev, 0x038, u32::from(QSIZE));
        w32(&mut dev, 0x080, d as u32);
        w32(&mut dev, 0x090, a as u32);
        w32(&mut dev, 0x0a0, u as u32);
        w32(&mut dev, 0x044, 1);
    }
    w32(&mut dev, 0x070, 1 | 2 | 8 | 4);
    let mut r = Rig {
        mem,
        dev,
        dir,
        avail: [0; QUEUES],
        used_seen: [0; QUEUES],
        tx_next: 0,
    };
    for i in 0..QSIZE {
        r.desc(RX, i, RXBUF + u64::from(i) * 0x2000, RXLEN, 2);
        r.publish(RX, i);
    }
    // Event buffers.
    r.desc(EVENT, 0, 0x70000, 8, 2);
    r.publish(EVENT, 0);
    r
}

impl Drop for Rig {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Rig {
    fn desc(&self, q: usize, i: u16, addr: u64, len: u32, flags: u16) {
        let at = GuestAddress(rings(q).0 + 16 * u64::from(i));
        let mut d = [0u8; 16];
        d[..8].copy_from_slice(&addr.to_le_bytes());
        d[8..12].copy_from_slice(&len.to_le_bytes());
        d[12..14].copy_from_slice(&flags.to_le_bytes());
        self.mem.write_obj(d, at).unwrap();
    }

    fn publish(&mut self, q: usize, head: u16) {
        let a = rings(q).1;
        let slot = u64::from(self.avail[q] % QSIZE);
        self.mem
            .write_obj(head, GuestAddress(a + 4 + 2 * slot))
            .unwrap();
        self.avail[q] = self.avail[q].wrapping_add(1);
        self.mem
            .write_obj(self.avail[q], GuestAddress(a + 2))
            .unwrap();
    }

    /// Packets the device put in receive buffers since the last call.
    fn received(&mut self) -> Vec<(Header, Vec<u8>)> {
        let u = rings(RX).2;
        let idx: u16 = self.mem.read_obj(GuestAddress(u + 2)).unwrap();
        let mut out = Vec::new();
        while self.used_seen[RX] != idx {
            let slot = u64::from(self.used_seen[RX] % QSIZE);
            let id: u32 = self.mem.read_obj(GuestAddress(u + 4 + 8 * slot)).unwrap();
            let len: u32 = self.mem.read_obj(GuestAddress(u + 8 + 8 * slot)).unwrap();
            let at = RXBUF + u64::from(id) * 0x2000;
            let mut b = vec![0u8; len as usize];
            self.mem.read_slice(&mut b, GuestAddress(at)).unwrap();
            let mut hb = [0u8; Header::LEN];
            hb.copy_from_slice(&b[..Header::LEN]);
            out.push((Header::parse(&hb), b[Header::LEN..].to_vec()));
            // The driver gives the buffer back.
            self.publish(RX, id as u16);
            self.used_seen[RX] = self.used_seen[RX].wrapping_add(1);
        }
        out
    }

    /// The guest sends a packet (header and payload in two descriptors, as Linux does).
    fn send(&mut self, h: Header, payload: &[u8]) {
        let i = self.tx_next % QSIZE;
        self.tx_next += 2;
        let at = TXBUF + u64::from(i) * 0x2000;
        self.mem.write_slice(&h.bytes(), GuestAddress(at)).unwrap();
        self.mem
            .write_slice(payload, GuestAddress(at + 0x100))
            .unwrap();
        // desc i -> i+1
        let d = GuestAddress(rings(TX).0 + 16 * u64::from(i));
        let mut b = [0u8; 16];
        b[..8].copy_from_slice(&at.to_le_bytes());
        b[8..12].copy_from_slice(&(Header::LEN as u32).to_le_bytes());
        let (flags, next) = if payload.is_empty() {
            (0u16, 0u16)
        } else {
            (1, (i + 1) % QSIZE)
        };
        b[12..14].copy_from_slice(&flags.to_le_bytes());
        b[14..].copy_from_slice(&next.to_le_bytes());
        self.mem.write_obj(b, d).unwrap();
        if !payload.is_empty() {
            self.desc(TX, (i + 1) % QSIZE, at + 0x100, payload.len() as u32, 0);
        }
        self.publish(TX, i);
        self.dev.transmit(&self.mem);
        self.dev.pump(&self.mem);
    }

    fn guest(&self, op: u16, guest_port: u32, host_port: u32, len: u32) -> Header {
        Header {
            src_cid: GUEST,
            dst_cid: HOST_CID,
            src_port: guest_port,
            dst_port: host_port,
            len,
            kind: TYPE_STREAM,
            op,
            flags: 0,
            buf_alloc: 64 << 10,
            fwd_cnt: 0,
        }
    }

    /// What the I/O thread does on a stream's edge: it may have bytes.
    fn streams_ready(&mut self) {
        self.dev.conns.values_mut().for_each(|c| c.readable = true);
        self.dev.pump(&self.mem);
    }

    /// A host process connects to PATH and asks for `port`; the device sees it.
    fn host_connect(&mut self, port: u32) -> UnixStream {
        let mut s = UnixStream::connect(self.dir.join("v.sock")).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        writeln!(s, "CONNECT {port}").unwrap();
        let fds = self.dev.accept();
        assert_eq!(fds.len(), 1);
        self.dev.handshake(fds[0]);
        self.dev.pump(&self.mem);
        s
    }
}

fn line(s: &mut UnixStream) -> String {
    let mut out = Vec::new();
    let mut b = [0u8; 1];
    while s.read(&mut b).unwrap() == 1 && b[0] != b'\n' {
        out.push(b[0]);
    }
    String::from_utf8(out).unwrap()
}

#[test]
fn a_host_process_connects_to_a_guest_port_and_both_talk() {
    let mut r = rig("host");
    let mut s = r.host_connect(52);
    let got = r.received();
    assert_eq!(got.len(), 1);
    let req = got[0].0;
    assert_eq!(
        (req.op, req.src_cid, req.dst_cid, req.dst_port),
        (OP_REQUEST, HOST_CID, GUEST, 52)
    );
    // The guest's listener accepts.
    let host_port = req.src_port;
    r.send(r.guest(OP_RESPONSE, 52, host_port, 0), &[]);
    assert_eq!(line(&mut s), format!("OK {host_port}"));
    // Host -> guest.
    s.write_all(b"hello").unwrap();
    r.streams_ready();
    let got = r.received();
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!((got[0].0.op, got[0].1.as_slice()), (OP_RW, &b"hello"[..]));
    // Guest -> host.
    r.send(r.guest(OP_RW, 52, host_port, 5), b"world");
    let mut b = [0u8; 5];
    s.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"world");
    assert_eq!(r.dev.stats.from_guest_bytes, 5);
    // The host process leaves: the guest hears SHUTDOWN, answers RST.
    drop(s);
    r.streams_ready();
    let got = r.received();
    assert_eq!(got.last().unwrap().0.op, OP_SHUTDOWN);
    r.send(r.guest(OP_RST, 52, host_port, 0), &[]);
    assert!(r.dev.conns.is_empty());
}

#[test]
fn a_guest_connection_to_host_port_p_goes_to_path_p_or_is_reset() {
    let mut r = rig("guest");
    let l = UnixListener::bind(r.dir.join("v.sock_6000")).unwrap();
    r.send(r.guest(OP_REQUEST, 1234, 6000, 0), &[]);
    let got = r.received();
    assert_eq!(got.len(), 1);
    assert_eq!(
        (got[0].0.op, got[0].0.dst_port, got[0].0.src_port),
        (OP_RESPONSE, 1234, 6000)
    );
    let (mut s, _) = l.accept().unwrap();
    r.send(r.guest(OP_RW, 1234, 6000, 4), b"ping");
    let mut b = [0u8; 4];
    s.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"ping");
    // Nobody listens on 7000.
    r.send(r.guest(OP_REQUEST, 1235, 7000, 0), &[]);
    let got = r.received();
    assert_eq!((got[0].0.op, got[0].0.dst_port), (OP_RST, 1235));
}

#[test]
fn the_host_never_sends_beyond_the_guests_credit() {
    let mut r = rig("credit");
    let mut s = r.host_connect(52);
    let port = r.received()[0].0.src_port;
    let mut resp = r.guest(OP_RESPONSE, 52, port, 0);
    resp.buf_alloc = 10;
    r.send(resp, &[]);
    line(&mut s);
    s.write_all(&[7u8; 100]).unwrap();
    r.streams_ready();
    let got = r.received();
    let sent: usize = got.iter().map(|(_, p)| p.len()).sum();
    assert_eq!(sent, 10, "{got:?}");
    // The guest consumed it and says so: the rest flows, 10 at a time.
    let mut upd = r.guest(OP_CREDIT_UPDATE, 52, port, 0);
    upd.buf_alloc = 10;
    upd.fwd_cnt = 10;
    r.send(upd, &[]);
    let sent: usize = r.received().iter().map(|(_, p)| p.len()).sum();
    assert_eq!(sent, 10);
}

#[test]
fn hostile_packets_are_refused_and_the_device_goes_on() {
    let mut r = rig("hostile");
    // Another source CID.
    let mut h = r.guest(OP_REQUEST, 1, 6000, 0);
    h.src_cid = 99;
    r.send(h, &[]);
    // A length beyond the payload.
    r.send(r.guest(OP_RW, 1, 6000, 1000), b"abc");
    // Data for no connection.
    r.send(r.guest(OP_RW, 1, 6000, 3), b"abc");
    // An unknown operation on no connection.
    r.send(r.guest(99, 1, 6000, 0), &[]);
    let got = r.received();
    assert!(got.iter().all(|(h, _)| h.op == OP_RST), "{got:?}");
    assert_eq!(got.len(), 4);
    assert!(r.dev.stats.errors >= 2);
    // A bad handshake line is answered and closed.
    let mut s = UnixStream::connect(r.dir.join("v.sock")).unwrap();
    s.write_all(b"HELLO\n").unwrap();
    let fd = r.dev.accept()[0];
    assert!(!r.dev.handshake(fd));
    assert!(line(&mut s).starts_with("ERROR"));
    // Still works.
    let _s = r.host_connect(52);
    assert_eq!(r.received()[0].0.op, OP_REQUEST);
}

#[test]
fn a_restored_device_tells_the_guest_its_connections_were_reset() {
    let mut r = rig("reset");
    let _s = r.host_connect(52);
    r.received();
    let st = r.dev.save();
    let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let path = r.dir.join("v2.sock");
    let mut d = VirtioVsock::restore(9, &path, irq, &st).unwrap();
    assert_eq!(d.save().transport, st.transport);
    d.transport_reset(&r.mem);
    let idx: u16 = r.mem.read_obj(GuestAddress(rings(EVENT).2 + 2)).unwrap();
    assert_eq!(idx, 1, "one event");
    let ev: u32 = r.mem.read_obj(GuestAddress(0x70000)).unwrap();
    assert_eq!(ev, EVENT_TRANSPORT_RESET);
    let mut cfg = [0u8; 8];
    d.read(0x100, &mut cfg);
    assert_eq!(u64::from_le_bytes(cfg), 9, "the restoring process's CID");
    assert!(path.exists(), "listening on the restoring process's path");
}

#[test]
fn a_path_that_is_not_a_socket_is_never_replaced() {
    let dir = std::env::temp_dir().join(format!("snapvmm-vsock-file-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join("data");
    std::fs::write(&p, b"keep").unwrap();
    let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let e = VirtioVsock::new(3, &p, irq).unwrap_err();
    assert!(e.to_string().contains("not a socket"), "{e}");
    assert_eq!(std::fs::read(&p).unwrap(), b"keep");
    let _ = std::fs::remove_dir_all(&dir);
}
