//! virtio-vsock over virtio-mmio, with the host side on unix sockets in
//! Firecracker's "hybrid vsock" convention, so agents and tools built for it
//! work unchanged:
//! - a host process connects to the device's socket PATH and writes
//!   `CONNECT <port>\n`; the guest's listener on that port is asked, and on
//!   its answer the host process reads `OK <hostport>\n` and then talks to it;
//! - a guest connection to host port P goes to the unix socket `PATH_P`.
//!
//! Streams only (the only kind Linux's virtio transport offers). Data moves
//! on the device I/O thread (`event_handler.rs`), never on a vCPU thread and not while
//! the machine is paused. A restored guest hears `TRANSPORT_RESET` on the
//! event queue: its established connections end, its listeners stay, and
//! it reads its CID again (which comes from the restoring process).

mod conn;
mod event_handler;
pub mod packet;

use std::collections::{HashMap, VecDeque};
use std::io::Write;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::queue::{Desc, QueueError};
use super::transport::{bit, serve, Effect, Transport, TransportState};
use conn::{Conn, ConnState};
use packet::*;

const DEVICE_ID_VSOCK: u32 = 19;
pub const RX: usize = 0;
pub const TX: usize = 1;
pub const EVENT: usize = 2;
pub const QUEUES: usize = 3;

const FEATURES: u64 =
    bit(VIRTIO_F_VERSION_1) | bit(VIRTIO_RING_F_EVENT_IDX) | bit(VIRTIO_RING_F_INDIRECT_DESC);
/// Largest payload the device takes from the guest in one packet.
const MAX_PAYLOAD: usize = 64 << 10;
/// `VIRTIO_VSOCK_EVENT_TRANSPORT_RESET`.
const EVENT_TRANSPORT_RESET: u32 = 0;
/// Longest `CONNECT <port>\n` line a host process may write.
const MAX_LINE: usize = 32;
/// Host ports given to host-initiated connections start here.
const FIRST_HOST_PORT: u32 = 1 << 30;

/// The device's registers: everything a snapshot keeps (connections are
/// not kept: a restored guest is told they were reset).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VsockState {
    pub transport: TransportState,
    pub cid: u64,
}

/// Counters for tests and figures.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VsockStats {
    pub connections: u64,
    pub to_guest_bytes: u64,
    pub from_guest_bytes: u64,
    pub resets: u64,
    /// Malformed packets or requests from the guest.
    pub errors: u64,
}

/// A host process connected to PATH that has not said which port yet.
struct Handshake {
    stream: UnixStream,
    line: Vec<u8>,
}

pub struct VirtioVsock {
    t: Transport,
    cid: u64,
    path: PathBuf,
    listener: UnixListener,
    handshakes: HashMap<RawFd, Handshake>,
    /// Connections by (host port, guest port).
    conns: HashMap<(u32, u32), Conn>,
    by_fd: HashMap<RawFd, (u32, u32)>,
    /// Packets without payload for the guest, waiting for a receive buffer.
    to_guest: VecDeque<Header>,
    next_port: u32,
    buf: Vec<u8>,
    pub stats: VsockStats,
}

impl std::fmt::Debug for VirtioVsock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VirtioVsock")
            .field("cid", &self.cid)
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

/// Binds PATH, replacing a stale socket left there (never another kind of file).
fn bind(path: &Path) -> std::io::Result<UnixListener> {
    use std::os::unix::fs::FileTypeExt;
    if let Ok(m) = std::fs::symlink_metadata(path) {
        if m.file_type().is_socket() {
            std::fs::remove_file(path)?;
        } else {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                format!("{} exists and is not a socket", path.display()),
            ));
        }
    }
    let l = UnixListener::bind(path).map_err(|e| {
        std::io::Error::new(
            e.kind(),
            format!("cannot listen on {}: {e}", path.display()),
        )
    })?;
    l.set_nonblocking(true)?;
    Ok(l)
}

impl VirtioVsock {
    /// A device for guest `cid` whose host side listens on `path`.
    pub fn new(cid: u64, path: &Path, irq: EventFd) -> std::io::Result<Self> {
        Ok(VirtioVsock {
            t: Transport::new(DEVICE_ID_VSOCK, FEATURES, QUEUES, irq)?,
            cid,
            path: path.to_path_buf(),
            listener: bind(path)?,
            handshakes: HashMap::new(),
            conns: HashMap::new(),
            by_fd: HashMap::new(),
            to_guest: VecDeque::new(),
            next_port: FIRST_HOST_PORT,
            buf: vec![0; MAX_PAYLOAD],
            stats: VsockStats::default(),
        })
    }

    /// Rebuilds the device from saved registers, with the CID and socket of
    /// the restoring process. Call [`VirtioVsock::transport_reset`] once
    /// the interrupt controllers are restored.
    pub fn restore(cid: u64, path: &Path, irq: EventFd, st: &VsockState) -> Result<Self, String> {
        let mut d = VirtioVsock::new(cid, path, irq).map_err(|e| e.to_string())?;
        d.t.restore(&st.transport)
            .map_err(|e| format!("vsock: {e}"))?;
        Ok(d)
    }

    pub fn save(&self) -> VsockState {
        VsockState {
            transport: self.t.save(),
            cid: self.cid,
        }
    }

    pub fn cid(&self) -> u64 {
        self.cid
    }

    pub fn kick(&self, q: usize) -> &EventFd {
        self.t.kick(q)
    }

    /// The transport (e.g. to move the device onto virtio-pci).
    pub fn transport_mut(&mut self) -> &mut Transport {
        &mut self.t
    }

    pub fn read(&mut self, offset: u64, data: &mut [u8]) {
        self.t.read(offset, data, &self.cid.to_le_bytes());
    }

    pub fn write(&mut self, offset: u64, data: &[u8]) {
        if self.t.write(offset, data) == Effect::Reset {
            self.drop_connections();
        }
    }

    /// Every connection ends (the unix sides see them close).
    fn drop_connections(&mut self) {
        self.stats.resets += self.conns.len() as u64;
        self.conns.clear();
        self.by_fd.clear();
        self.to_guest.clear();
    }

    /// Tells the guest that every connection it had is gone (after a
    /// restore): `TRANSPORT_RESET` on the event queue.
    pub fn transport_reset(&mut self, mem: &GuestMemoryMmap) {
        self.drop_connections();
        if !self.t.driver_ok() {
            return;
        }
        let r = (|| -> Result<bool, QueueError> {
            let Some((head, chain)) = self.t.queues[EVENT].pop(mem)? else {
                return Ok(false);
            };
            let d = chain?
                .into_iter()
                .find(|d| d.write && d.len >= 4)
                .ok_or(QueueError::BrokenChain(head))?;
            mem.write_obj(EVENT_TRANSPORT_RESET.to_le(), GuestAddress(d.addr))
                .map_err(|_| QueueError::BadAddress(d.addr, 4))?;
            self.t.queues[EVENT].push_used(mem, head, 4)?;
            Ok(true)
        })();
        match r {
            Ok(true) => self.t.interrupt(EVENT),
            Ok(false) => {
                tracing::warn!("vsock: the guest has no event buffer for the transport reset")
            }
            Err(e) => self.broken(e),
        }
    }

    fn broken(&mut self, e: QueueError) {
        tracing::warn!("vsock: virtqueue unusable: {e}");
        self.stats.errors += 1;
        self.drop_connections();
        self.t.needs_reset();
    }

    fn rst_for(&mut self, h: &Header) {
        if h.op != OP_RST {
            self.to_guest.push_back(h.reply(OP_RST));
        }
    }

    /// Takes every packet the guest queued for transmission.
    fn transmit(&mut self, mem: &GuestMemoryMmap) -> Vec<RawFd> {
        let mut new_fds = Vec::new();
        let r = serve(
            self,
            |d| &mut d.t,
            TX,
            mem,
            |d, chain| {
                match chain {
                    Ok(chain) => new_fds.extend(d.packet(mem, &chain)),
                    Err(e) => {
                        tracing::warn!("vsock: malformed packet: {e}");
                        d.stats.errors += 1;
                    }
                }
                0
            },
        );
        if let Err(e) = r {
            self.broken(e);
        }
        new_fds
    }

    /// One packet from the guest; returns a new unix stream to poll.
    fn packet(&mut self, mem: &GuestMemoryMmap, chain: &[Desc]) -> Option<RawFd> {
        let total: usize = chain.iter().map(|d| d.len as usize).sum();
        if chain.iter().any(|d| d.write)
            || !(Header::LEN..=Header::LEN + MAX_PAYLOAD).contains(&total)
        {
            self.stats.errors += 1;
            return None;
        }
        let mut bytes = vec![0u8; total];
        let mut off = 0;
        for d in chain {
            let n = d.len as usize;
            if mem
                .read_slice(&mut bytes[off..off + n], GuestAddress(d.addr))
                .is_err()
            {
                self.stats.errors += 1;
                return None;
            }
            off += n;
        }
        let mut hb = [0u8; Header::LEN];
        hb.copy_from_slice(&bytes[..Header::LEN]);
        let h = Header::parse(&hb);
        let payload = &bytes[Header::LEN..];
        if h.src_cid != self.cid || h.dst_cid != HOST_CID || h.kind != TYPE_STREAM {
            self.stats.errors += 1;
            self.rst_for(&h);
            return None;
        }
        if (h.len as usize) > payload.len() {
            self.stats.errors += 1;
            self.rst_for(&h);
            return None;
        }
        let payload = &payload[..h.len as usize];
        let key = (h.dst_port, h.src_port);
        if h.op == OP_REQUEST {
            if self.conns.contains_key(&key) {
                self.rst_for(&h);
                return None;
            }
            // The guest connects to host port P: the unix socket PATH_P.
            let target = format!("{}_{}", self.path.display(), h.dst_port);
            return match UnixStream::connect(&target).and_then(|s| {
                s.set_nonblocking(true)?;
                Ok(s)
            }) {
                Ok(stream) => {
                    let fd = stream.as_raw_fd();
                    let mut c = Conn::new(stream, h.dst_port, h.src_port, ConnState::Established);
                    c.credit_from(&h);
                    let resp = c.header(self.cid, OP_RESPONSE, 0);
                    self.to_guest.push_back(resp);
                    self.conns.insert(key, c);
                    self.by_fd.insert(fd, key);
                    self.stats.connections += 1;
                    Some(fd)
                }
                Err(e) => {
                    tracing::debug!("vsock: guest port {} -> {target}: {e}", h.src_port);
                    self.rst_for(&h);
                    None
                }
            };
        }
        let Some(c) = self.conns.get_mut(&key) else {
            self.rst_for(&h);
            return None;
        };
        c.credit_from(&h);
        match h.op {
            OP_RESPONSE if c.state == ConnState::Connecting => {
                c.state = ConnState::Established;
                let line = format!("OK {}\n", c.host_port);
                if c.stream.write_all(line.as_bytes()).is_err() {
                    self.close(key, true);
                }
            }
            OP_RW if c.state == ConnState::Established => {
                self.stats.from_guest_bytes += payload.len() as u64;
                if let Err(e) = c.take_from_guest(payload) {
                    tracing::debug!("vsock: connection {key:?}: {e}");
                    self.close(key, true);
                }
            }
            OP_CREDIT_UPDATE => {}
            OP_CREDIT_REQUEST => {
                let u = c.header(self.cid, OP_CREDIT_UPDATE, 0);
                self.to_guest.push_back(u);
            }
            OP_SHUTDOWN => {
                if h.flags & SHUTDOWN_SEND != 0 {
                    c.guest_done_sending = true;
                    let _ = c.flush();
                }
                if h.flags & (SHUTDOWN_SEND | SHUTDOWN_RCV) == SHUTDOWN_SEND | SHUTDOWN_RCV {
                    self.close(key, true);
                }
            }
            OP_RST => self.close(key, false),
            _ => {
                self.stats.errors += 1;
                self.close(key, true);
            }
        }
        None
    }

    /// Ends a connection (its unix side closes); `tell` sends the guest a RST.
    fn close(&mut self, key: (u32, u32), tell: bool) {
        if let Some(mut c) = self.conns.remove(&key) {
            self.by_fd.remove(&c.stream.as_raw_fd());
            if tell {
                let h = c.header(self.cid, OP_RST, 0);
                self.to_guest.push_back(h);
            }
        }
    }

    /// Accepts host processes connecting to PATH; returns their streams.
    fn accept(&mut self) -> Vec<RawFd> {
        let mut out = Vec::new();
        loop {
            match self.listener.accept() {
                Ok((s, _)) => {
                    if s.set_nonblocking(true).is_err() {
                        continue;
                    }
                    let fd = s.as_raw_fd();
                    self.handshakes.insert(
                        fd,
                        Handshake {
                            stream: s,
                            line: Vec::new(),
                        },
                    );
                    out.push(fd);
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return out,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    tracing::warn!("vsock: cannot accept on {}: {e}", self.path.display());
                    return out;
                }
            }
        }
    }

    /// Reads a host process's `CONNECT <port>` line; false when it is done
    /// with (connected to the guest, or refused and closed).
    fn handshake(&mut self, fd: RawFd) -> bool {
        let Some(hs) = self.handshakes.get_mut(&fd) else {
            return false;
        };
        let mut b = [0u8; MAX_LINE];
        let n = match std::io::Read::read(&mut hs.stream, &mut b) {
            Ok(0) => {
                self.handshakes.remove(&fd);
                return false;
            }
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return true,
            Err(_) => {
                self.handshakes.remove(&fd);
                return false;
            }
        };
        hs.line.extend_from_slice(&b[..n]);
        let Some(end) = hs.line.iter().position(|&c| c == b'\n') else {
            if hs.line.len() > MAX_LINE {
                self.handshakes.remove(&fd);
                return false;
            }
            return true;
        };
        let Some(mut hs) = self.handshakes.remove(&fd) else {
            return false;
        };
        let line = String::from_utf8_lossy(&hs.line[..end]).trim().to_string();
        let port = line
            .strip_prefix("CONNECT ")
            .and_then(|p| p.trim().parse::<u32>().ok());
        let (Some(port), true) = (port, hs.line.len() == end + 1) else {
            let _ = hs.stream.write_all(b"ERROR expected CONNECT <port>\n");
            return false;
        };
        let host_port = self.free_port(port);
        let mut c = Conn::new(hs.stream, host_port, port, ConnState::Connecting);
        let req = c.header(self.cid, OP_REQUEST, 0);
        self.to_guest.push_back(req);
        self.by_fd.insert(fd, (host_port, port));
        self.conns.insert((host_port, port), c);
        self.stats.connections += 1;
        true
    }

    fn free_port(&mut self, guest_port: u32) -> u32 {
        loop {
            let p = self.next_port;
            self.next_port = self.next_port.checked_add(1).unwrap_or(FIRST_HOST_PORT);
            if !self.conns.contains_key(&(p, guest_port)) {
                return p;
            }
        }
    }

    /// Moves what it can to the guest: queued control packets first, then
    /// data from readable unix sides within the guest's credit, while the
    /// guest has receive buffers.
    fn pump(&mut self, mem: &GuestMemoryMmap) {
        if !self.t.driver_ok() {
            return;
        }
        let mut used = false;
        let r = (|| -> Result<(), QueueError> {
            'outer: loop {
                for c in self.conns.values_mut() {
                    if c.wants_credit_update() && c.state == ConnState::Established {
                        let h = c.header(self.cid, OP_CREDIT_UPDATE, 0);
                        self.to_guest.push_back(h);
                    }
                }
                while let Some(h) = self.to_guest.front().copied() {
                    if !self.deliver(mem, &h, None)? {
                        break 'outer;
                    }
                    self.to_guest.pop_front();
                    used = true;
                }
                let mut moved = false;
                let keys: Vec<_> = self.conns.keys().copied().collect();
                for key in keys {
                    let Some(c) = self.conns.get_mut(&key) else {
                        continue;
                    };
                    if c.state != ConnState::Established || !c.readable {
                        continue;
                    }
                    let credit = c.peer_credit() as usize;
                    if credit == 0 {
                        continue;
                    }
                    // Room: the next receive buffer (taken back if nothing is read).
                    let start = self.t.queues[RX].next_avail();
                    let Some((head, chain)) = self.t.queues[RX].pop(mem)? else {
                        break 'outer;
                    };
                    let chain = chain?;
                    let room: usize = chain
                        .iter()
                        .filter(|d| d.write)
                        .map(|d| d.len as usize)
                        .sum();
                    let max = room
                        .saturating_sub(Header::LEN)
                        .min(credit)
                        .min(MAX_PAYLOAD);
                    if max == 0 {
                        return Err(QueueError::BrokenChain(head));
                    }
                    let n = match c.read(&mut self.buf[..max]) {
                        Ok(n) => n,
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                            c.readable = false;
                            self.t.queues[RX].set_next_avail(start);
                            continue;
                        }
                        Err(_) => 0,
                    };
                    self.t.queues[RX].set_next_avail(start);
                    if n == 0 {
                        // The host side ended: the guest hears it, then answers RST.
                        c.state = ConnState::Closing;
                        c.readable = false;
                        let mut h = c.header(self.cid, OP_SHUTDOWN, 0);
                        h.flags = SHUTDOWN_RCV | SHUTDOWN_SEND;
                        self.to_guest.push_back(h);
                        moved = true;
                        continue;
                    }
                    let h = c.header(self.cid, OP_RW, n as u32);
                    c.sent(n);
                    let data = std::mem::take(&mut self.buf);
                    let ok = self.deliver(mem, &h, Some(&data[..n]));
                    self.buf = data;
                    if !ok? {
                        break 'outer;
                    }
                    self.stats.to_guest_bytes += n as u64;
                    used = true;
                    moved = true;
                }
                if !moved {
                    break;
                }
            }
            Ok(())
        })();
        if let Err(e) = r {
            self.broken(e);
            return;
        }
        if used {
            match self.t.queues[RX].needs_interrupt(mem) {
                Ok(true) => self.t.interrupt(RX),
                Ok(false) => {}
                Err(e) => self.broken(e),
            }
        }
        let _ = self.t.queues[RX].rearm(mem);
    }

    /// Writes one packet into the next receive buffer; false when there is none.
    fn deliver(
        &mut self,
        mem: &GuestMemoryMmap,
        h: &Header,
        payload: Option<&[u8]>,
    ) -> Result<bool, QueueError> {
        let Some((head, chain)) = self.t.queues[RX].pop(mem)? else {
            return Ok(false);
        };
        let chain = chain?;
        let mut bytes = h.bytes().to_vec();
        bytes.extend_from_slice(payload.unwrap_or_default());
        let room: usize = chain
            .iter()
            .filter(|d| d.write)
            .map(|d| d.len as usize)
            .sum();
        if chain.iter().any(|d| !d.write) || room < bytes.len() {
            return Err(QueueError::BrokenChain(head));
        }
        let mut off = 0;
        for d in &chain {
            if off == bytes.len() {
                break;
            }
            let k = (d.len as usize).min(bytes.len() - off);
            mem.write_slice(&bytes[off..off + k], GuestAddress(d.addr))
                .map_err(|_| QueueError::BadAddress(d.addr, k as u64))?;
            off += k;
        }
        self.t.queues[RX].push_used(mem, head, bytes.len() as u32)?;
        Ok(true)
    }
}

#[cfg(test)]
mod tests;
