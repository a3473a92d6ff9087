//! The vsock device on the I/O thread: its listening socket, its three queue
//! notifications, and every unix stream (edge-triggered: a stream's bytes
//! are read while the guest gives credit and buffers, and the stream is
//! marked readable again on its next event).

use std::os::fd::{AsRawFd, RawFd};

use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::EventSet;

use super::{VirtioVsock, EVENT, RX, TX};
use crate::devices::io_thread::{IoDevice, Watch};

const LISTENER: u32 = 0;
const KICK: u32 = 1;
/// A stream's sub-token is this plus its descriptor (unique while it is open;
/// a closed descriptor leaves the poll set by itself).
const STREAM: u32 = 16;

fn stream_watch(fd: RawFd) -> Watch {
    Watch::Add {
        fd,
        sub: STREAM + fd as u32,
        events: EventSet::IN | EventSet::OUT | EventSet::READ_HANG_UP | EventSet::EDGE_TRIGGERED,
    }
}

impl IoDevice for VirtioVsock {
    fn watches(&self) -> Vec<Watch> {
        let mut w = vec![Watch::Add {
            fd: self.listener.as_raw_fd(),
            sub: LISTENER,
            events: EventSet::IN,
        }];
        for q in [RX, TX, EVENT] {
            w.push(Watch::Add {
                fd: self.kick(q).as_raw_fd(),
                sub: KICK + q as u32,
                events: EventSet::IN,
            });
        }
        w
    }

    fn event(
        &mut self,
        sub: u32,
        events: EventSet,
        mem: &GuestMemoryMmap,
        changes: &mut Vec<Watch>,
    ) {
        match sub {
            LISTENER => {
                for fd in self.accept() {
                    changes.push(stream_watch(fd));
                }
            }
            s if s == KICK + RX as u32 => {
                let _ = self.kick(RX).read();
            }
            s if s == KICK + TX as u32 => {
                let _ = self.kick(TX).read();
                for fd in self.transmit(mem) {
                    changes.push(stream_watch(fd));
                }
            }
            s if s == KICK + EVENT as u32 => {
                let _ = self.kick(EVENT).read();
            }
            s => {
                let fd = (s - STREAM) as RawFd;
                if self.handshakes.contains_key(&fd) {
                    self.handshake(fd);
                } else if let Some(key) = self.by_fd.get(&fd).copied() {
                    let Some(c) = self.conns.get_mut(&key) else {
                        return;
                    };
                    if events.intersects(
                        EventSet::IN | EventSet::READ_HANG_UP | EventSet::HANG_UP | EventSet::ERROR,
                    ) {
                        c.readable = true;
                    }
                    if events.contains(EventSet::OUT) && c.flush().is_err() {
                        self.close(key, true);
                    }
                }
            }
        }
        self.pump(mem);
    }
}
