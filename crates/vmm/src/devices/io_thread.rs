//! The device I/O threads: each moves data between the virtqueues of the
//! devices that implement [`IoDevice`] (disks on one thread, network and vsock
//! on another, [`Wakeups`]) and their backends, woken by the backends'
//! descriptors and by queue notifications (eventfds KVM signals on the
//! guest's MMIO write), never on a vCPU thread.
//!
//! It works only while the machine's [`IoGate`] is open: the machine closes
//! the gate when it pauses (after the vCPUs stopped) and reopens it when they
//! run again. Closing waits for the batch in progress, so while paused no
//! device writes guest memory or its rings: what a snapshot saves is
//! consistent, device registers and RAM alike.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::lock;

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

/// A change to what the I/O thread polls for a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Watch {
    /// Poll `fd` for `events`, reporting them as the device's `sub`.
    Add {
        fd: RawFd,
        sub: u32,
        events: EventSet,
    },
    /// Poll `fd` (added before) for other `events`.
    Modify {
        fd: RawFd,
        sub: u32,
        events: EventSet,
    },
    /// Stop polling `fd`.
    Remove { fd: RawFd },
}

/// A device whose data moves on the I/O thread. Every call is made with the
/// machine's gate entered and the device's lock held.
pub trait IoDevice: Send {
    /// What to poll from the start.
    fn watches(&self) -> Vec<Watch>;
    /// `events` happened on the device's `sub`; `changes` collects what to
    /// poll differently from now on.
    fn event(
        &mut self,
        sub: u32,
        events: EventSet,
        mem: &GuestMemoryMmap,
        changes: &mut Vec<Watch>,
    );
}

/// How an I/O thread's wakeups compete with a vCPU thread for a shared CPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wakeups {
    /// A notification runs the thread at once (the scheduler's default):
    /// for requests the guest waits on, like a disk read.
    Preempt,
    /// A notification does not stop a running vCPU; the thread runs when
    /// the vCPU halts or its time slice ends ([`crate::sched::yield_on_wakeup`]):
    /// for streams, whose frames batch up meanwhile.
    Yield,
}

/// An epoll token: the device's index in the high half, its `sub` in the low.
const TOKEN_STOP: u64 = u64::MAX;

/// The running I/O thread; dropping it stops the thread.
pub struct IoThread {
    stop: EventFd,
    stopping: Arc<AtomicBool>,
    gate: Arc<IoGate>,
    thread: Option<JoinHandle<()>>,
}

fn apply(epoll: &Epoll, dev: u64, w: Watch) -> std::io::Result<()> {
    match w {
        Watch::Add { fd, sub, events } => epoll.ctl(
            ControlOperation::Add,
            fd,
            EpollEvent::new(events, (dev << 32) | u64::from(sub)),
        ),
        Watch::Modify { fd, sub, events } => epoll.ctl(
            ControlOperation::Modify,
            fd,
            EpollEvent::new(events, (dev << 32) | u64::from(sub)),
        ),
        Watch::Remove { fd } => epoll.ctl(ControlOperation::Delete, fd, EpollEvent::default()),
    }
}

impl IoThread {
    /// Starts the thread `name` for `devices`, working only while `gate` is open.
    pub fn spawn(
        name: &str,
        devices: Vec<Arc<Mutex<dyn IoDevice>>>,
        mem: GuestMemoryMmap,
        gate: Arc<IoGate>,
        wakeups: Wakeups,
    ) -> std::io::Result<IoThread> {
        let epoll = Epoll::new()?;
        let stop = EventFd::new(libc::EFD_NONBLOCK)?;
        epoll.ctl(
            ControlOperation::Add,
            stop.as_raw_fd(),
            EpollEvent::new(EventSet::IN, TOKEN_STOP),
        )?;
        for (i, d) in devices.iter().enumerate() {
            for w in lock(d).watches() {
                apply(&epoll, i as u64, w)?;
            }
        }
        let stopping = Arc::new(AtomicBool::new(false));
        let worker = Worker {
            epoll,
            devices,
            mem,
            gate: gate.clone(),
            stopping: stopping.clone(),
        };
        let thread = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                if wakeups == Wakeups::Yield {
                    crate::sched::yield_on_wakeup();
                }
                worker.run()
            })?;
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
    devices: Vec<Arc<Mutex<dyn IoDevice>>>,
    mem: GuestMemoryMmap,
    gate: Arc<IoGate>,
    stopping: Arc<AtomicBool>,
}

impl Worker {
    fn run(self) {
        let mut events = vec![EpollEvent::default(); 64];
        let mut changes = Vec::new();
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
                let i = tok >> 32;
                let Some(dev) = self.devices.get(i as usize) else {
                    continue;
                };
                changes.clear();
                lock(dev).event(tok as u32, ev.event_set(), &self.mem, &mut changes);
                for w in changes.drain(..) {
                    if let Err(e) = apply(&self.epoll, i, w) {
                        tracing::warn!("the I/O thread cannot change what it polls ({w:?}): {e}");
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
