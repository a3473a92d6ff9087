//! One vsock stream connection between a guest port and a host unix socket:
//! its state, the credit each side gives the other (virtio 1.2 §5.10.6.3),
//! and the bytes on their way to the unix side.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;

use super::packet::{Header, HOST_CID, TYPE_STREAM};

/// What the host side of a connection accepts from the guest before it has
/// written it out (the credit it announces).
pub const BUF_ALLOC: u32 = 256 << 10;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnState {
    /// A host process asked (`CONNECT`); the guest has not answered.
    Connecting,
    Established,
    /// The host side ended; waiting for the guest's RST.
    Closing,
}

pub struct Conn {
    pub stream: UnixStream,
    pub host_port: u32,
    pub guest_port: u32,
    pub state: ConnState,
    /// The guest's receive buffer and how much of what we sent it consumed.
    peer_buf_alloc: u32,
    peer_fwd_cnt: u32,
    /// Bytes sent to the guest.
    rx_cnt: u32,
    /// Bytes from the guest written to the unix side, and as last told to the guest.
    fwd_cnt: u32,
    fwd_told: u32,
    /// Bytes from the guest the unix side has not taken yet.
    out: Vec<u8>,
    /// The unix side may have bytes (edge-triggered polling: set on an event,
    /// cleared when a read would block).
    pub readable: bool,
    /// The guest will send nothing more: the unix side's write half closes
    /// once `out` is written.
    pub guest_done_sending: bool,
}

impl Conn {
    pub fn new(stream: UnixStream, host_port: u32, guest_port: u32, state: ConnState) -> Conn {
        Conn {
            stream,
            host_port,
            guest_port,
            state,
            peer_buf_alloc: 0,
            peer_fwd_cnt: 0,
            rx_cnt: 0,
            fwd_cnt: 0,
            fwd_told: 0,
            out: Vec::new(),
            readable: true,
            guest_done_sending: false,
        }
    }

    /// Takes the credit figures of a packet from the guest.
    pub fn credit_from(&mut self, h: &Header) {
        self.peer_buf_alloc = h.buf_alloc;
        self.peer_fwd_cnt = h.fwd_cnt;
    }

    /// How many more bytes the guest can take now.
    pub fn peer_credit(&self) -> u32 {
        let in_flight = self.rx_cnt.wrapping_sub(self.peer_fwd_cnt);
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    /// A header from the host side of this connection to the guest `cid`.
    pub fn header(&mut self, cid: u64, op: u16, len: u32) -> Header {
        self.fwd_told = self.fwd_cnt;
        Header {
            src_cid: HOST_CID,
            dst_cid: cid,
            src_port: self.host_port,
            dst_port: self.guest_port,
            len,
            kind: TYPE_STREAM,
            op,
            flags: 0,
            buf_alloc: BUF_ALLOC,
            fwd_cnt: self.fwd_cnt,
        }
    }

    /// Counts `n` bytes sent to the guest.
    pub fn sent(&mut self, n: usize) {
        self.rx_cnt = self.rx_cnt.wrapping_add(n as u32);
    }

    /// True when the guest should hear how much was written out (a quarter
    /// of the credit consumed since it last heard), so it keeps sending.
    pub fn wants_credit_update(&self) -> bool {
        self.fwd_cnt.wrapping_sub(self.fwd_told) >= BUF_ALLOC / 4
    }

    /// Bytes from the guest: written to the unix side as far as it takes
    /// them, the rest kept. A guest that sends beyond the credit it was
    /// given is an error (the connection is reset).
    pub fn take_from_guest(&mut self, data: &[u8]) -> io::Result<()> {
        if self.out.len() + data.len() > BUF_ALLOC as usize {
            return Err(io::Error::other("the guest sent beyond its credit"));
        }
        self.out.extend_from_slice(data);
        self.flush()
    }

    /// Writes what waits for the unix side; closes its write half once the
    /// guest is done and everything is out.
    pub fn flush(&mut self) -> io::Result<()> {
        while !self.out.is_empty() {
            match self.stream.write(&self.out) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    self.out.drain(..n);
                    self.fwd_cnt = self.fwd_cnt.wrapping_add(n as u32);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        if self.guest_done_sending {
            let _ = self.stream.shutdown(std::net::Shutdown::Write);
        }
        Ok(())
    }

    /// Reads up to `buf.len()` bytes from the unix side: `Ok(0)` at its end,
    /// `WouldBlock` when it has nothing now.
    pub fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            match self.stream.read(buf) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                r => return r,
            }
        }
    }
}
