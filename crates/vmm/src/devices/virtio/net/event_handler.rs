//! The NIC on the I/O thread: its tap and its three queue notifications.

use std::os::fd::AsRawFd;

use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::EventSet;

use super::{RxState, VirtioNet, CTRL, RX, TX};
use crate::devices::io_thread::{IoDevice, Watch};

/// Sub-tokens: the tap, then the queues' notifications.
const TAP: u32 = 0;
const KICK: u32 = 1;

impl IoDevice for VirtioNet {
    fn watches(&self) -> Vec<Watch> {
        let mut w = vec![Watch::Add {
            fd: self.backend.fd(),
            sub: TAP,
            events: EventSet::IN,
        }];
        for q in [RX, TX, CTRL] {
            w.push(Watch::Add {
                fd: self.kick(q).as_raw_fd(),
                sub: KICK + q as u32,
                events: EventSet::IN,
            });
        }
        w
    }

    fn event(&mut self, sub: u32, _: EventSet, mem: &GuestMemoryMmap, changes: &mut Vec<Watch>) {
        let rx = match sub {
            TAP => self.receive(mem),
            s if s == KICK + RX as u32 => {
                let _ = self.kick(RX).read();
                self.receive(mem)
            }
            s if s == KICK + TX as u32 => {
                let _ = self.kick(TX).read();
                self.transmit(mem);
                return;
            }
            _ => {
                let _ = self.kick(CTRL).read();
                self.control(mem);
                return;
            }
        };
        let fd = self.backend.fd();
        // The tap is polled only while the guest has room for what it
        // brings, and never again once it failed (a dead tap may report
        // hang-ups whatever it is asked for).
        match rx {
            RxState::BackendGone if !self.unpolled_for_good => {
                self.unpolled_for_good = true;
                changes.push(Watch::Remove { fd });
            }
            RxState::Drained if !self.tap_polled && !self.unpolled_for_good => {
                self.tap_polled = true;
                changes.push(Watch::Modify {
                    fd,
                    sub: TAP,
                    events: EventSet::IN,
                });
            }
            RxState::NeedBuffers if self.tap_polled => {
                self.tap_polled = false;
                changes.push(Watch::Modify {
                    fd,
                    sub: TAP,
                    events: EventSet::empty(),
                });
            }
            _ => {}
        }
    }
}
