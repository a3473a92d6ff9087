//! The device I/O thread: moves network frames between the virtqueues and
//! their backends, woken by the backends' descriptors and by queue
//! notifications (eventfds KVM signals on the guest's MMIO write), never on
//! a vCPU thread.
//!
//! It works only while the machine's [`IoGate`] is open: the machine closes
//! the gate when it pauses (after the vCPUs stopped) and reopens it when they
//! run again. Closing waits for the batch in progress, so while paused no
//! device writes guest memory or its rings: what a snapshot saves is
//! consistent, device registers and RAM alike.

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::lock;
use super::virtio::net::{RxState, VirtioNet, CTRL, RX, TX};

#[derive(Default)]
struct GateState {
    closed: bool,
    busy: usize,
}

/// Lets device work run only while the machine runs.
#[derive(Default)]
pub struct IoGate {
    state: Mutex<GateState>,
    cv: Condvar,
}

/// Held while a batch of device work runs.
pub struct GatePass<'a>(&'a IoGate);

impl Drop for GatePass<'_> {
    fn drop(&mut self) {
        let mut s = lock(&self.0.state);
        s.busy -= 1;
        self.0.cv.notify_all();
    }
}

impl IoGate {
    /// Waits until the gate is open and enters.
    pub fn enter(&self) -> GatePass<'_> {
        let mut s = lock(&self.state);
        while s.closed {
            s = self.cv.wait(s).unwrap_or_else(|e| e.into_inner());
        }
        s.busy += 1;
        GatePass(self)
    }

    /// Closes the gate and waits until no work is in progress.
    pub fn close(&self) {
        let mut s = lock(&self.state);
        s.closed = true;
        while s.busy > 0 {
            s = self.cv.wait(s).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Lets work run again.
    pub fn open(&self) {
        lock(&self.state).closed = false;
        self.cv.notify_all();
    }
}

/// What an epoll token names: NIC `i`'s backend or one of its queues.
const PER_NIC: u64 = 4;
const TOKEN_STOP: u64 = u64::MAX;

/// The running I/O thread; dropping it stops the thread.
pub struct IoThread {
    stop: EventFd,
    stopping: Arc<AtomicBool>,
    gate: Arc<IoGate>,
    thread: Option<JoinHandle<()>>,
}

impl IoThread {
    /// Starts the thread for `nets`, working only while `gate` is open.
    pub fn spawn(
        nets: Vec<Arc<Mutex<VirtioNet>>>,
        mem: GuestMemoryMmap,
        gate: Arc<IoGate>,
    ) -> std::io::Result<IoThread> {
        let epoll = Epoll::new()?;
        let stop = EventFd::new(libc::EFD_NONBLOCK)?;
        epoll.ctl(
            ControlOperation::Add,
            stop.as_raw_fd(),
            EpollEvent::new(EventSet::IN, TOKEN_STOP),
        )?;
        for (i, n) in nets.iter().enumerate() {
            let d = lock(n);
            let base = i as u64 * PER_NIC;
            epoll.ctl(
                ControlOperation::Add,
                d.backend().fd(),
                EpollEvent::new(EventSet::IN, base),
            )?;
            for (q, tok) in [(RX, 1), (TX, 2), (CTRL, 3)] {
                epoll.ctl(
                    ControlOperation::Add,
                    d.kick(q).as_raw_fd(),
                    EpollEvent::new(EventSet::IN, base + tok),
                )?;
            }
        }
        let stopping = Arc::new(AtomicBool::new(false));
        let worker = Worker {
            epoll,
            nets,
            mem,
            gate: gate.clone(),
            stopping: stopping.clone(),
        };
        let thread = std::thread::Builder::new()
            .name("snapvmm-io".into())
            .spawn(move || worker.run())?;
        Ok(IoThread {
            stop,
            stopping,
            gate,
            thread: Some(thread),
        })
    }
}

impl Drop for IoThread {
    fn drop(&mut self) {
        self.stopping.store(true, Ordering::SeqCst);
        let _ = self.stop.write(1);
        // A thread waiting at a closed gate must see the stop.
        self.gate.open();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

struct Worker {
    epoll: Epoll,
    nets: Vec<Arc<Mutex<VirtioNet>>>,
    mem: GuestMemoryMmap,
    gate: Arc<IoGate>,
    stopping: Arc<AtomicBool>,
}

impl Worker {
    fn run(self) {
        let mut events = vec![EpollEvent::default(); 32];
        // Whether each NIC's backend is being polled (not while the guest
        // has no receive buffers, nor after the backend went away).
        let mut polled = vec![true; self.nets.len()];
        let mut gone = vec![false; self.nets.len()];
        loop {
            let n = match self.epoll.wait(-1, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::error!("the device I/O thread cannot wait for events: {e}");
                    return;
                }
            };
            for ev in &events[..n] {
                let tok = ev.data();
                if tok == TOKEN_STOP || self.stopping.load(Ordering::SeqCst) {
                    return;
                }
                let _pass = self.gate.enter();
                if self.stopping.load(Ordering::SeqCst) {
                    return;
                }
                let i = (tok / PER_NIC) as usize;
                let Some(nic) = self.nets.get(i) else {
                    continue;
                };
                let mut d = lock(nic);
                let rx = match tok % PER_NIC {
                    0 => Some(d.receive(&self.mem)),
                    1 => {
                        let _ = d.kick(RX).read();
                        Some(d.receive(&self.mem))
                    }
                    2 => {
                        let _ = d.kick(TX).read();
                        d.transmit(&self.mem);
                        None
                    }
                    _ => {
                        let _ = d.kick(CTRL).read();
                        d.control(&self.mem);
                        None
                    }
                };
                let fd = d.backend().fd();
                let tap_tok = i as u64 * PER_NIC;
                let change = match rx {
                    // Gone for good: never polled again (a dead tap may report
                    // hang-ups whatever it is asked for).
                    Some(RxState::BackendGone) if !gone[i] => {
                        gone[i] = true;
                        Some(ControlOperation::Delete)
                    }
                    Some(RxState::Drained) if !polled[i] && !gone[i] => {
                        polled[i] = true;
                        Some(ControlOperation::Modify)
                    }
                    Some(RxState::NeedBuffers) if polled[i] => {
                        polled[i] = false;
                        Some(ControlOperation::Modify)
                    }
                    _ => None,
                };
                if let Some(op) = change {
                    let events = if polled[i] {
                        EventSet::IN
                    } else {
                        EventSet::empty()
                    };
                    if let Err(e) = self.epoll.ctl(op, fd, EpollEvent::new(events, tap_tok)) {
                        tracing::warn!(nic = %d.id(), "cannot change how its tap is polled: {e}");
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn closing_the_gate_waits_for_work_in_progress_and_holds_new_work() {
        let gate = Arc::new(IoGate::default());
        let pass = gate.enter();
        let (tx, rx) = std::sync::mpsc::channel();
        let g = gate.clone();
        let closer = std::thread::spawn(move || {
            g.close();
            tx.send(()).unwrap();
        });
        assert!(
            rx.recv_timeout(Duration::from_millis(200)).is_err(),
            "close returned while work was in progress"
        );
        drop(pass);
        rx.recv_timeout(Duration::from_secs(5)).unwrap();
        closer.join().unwrap();
        // Closed: new work waits until it opens.
        let (tx, rx) = std::sync::mpsc::channel();
        let g = gate.clone();
        let worker = std::thread::spawn(move || {
            let _p = g.enter();
            tx.send(()).unwrap();
        });
        assert!(rx.recv_timeout(Duration::from_millis(200)).is_err());
        gate.open();
        rx.recv_timeout(Duration::from_secs(5)).unwrap();
        worker.join().unwrap();
    }
}
