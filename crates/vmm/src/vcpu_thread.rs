//! One thread per vCPU, an explicit state machine driven by messages.
//!
//! ```text
//!            Pause (signal + immediate_exit)
//!   Running ───────────────────────────────▶ Paused ──Save/Restore──┐
//!      ▲                                       │  ◀─────────────────┘
//!      └────────────── Resume ─────────────────┘
//!   any state ── Stop ──▶ Stopped (thread ends)
//! ```
//! To pause, the controller queues `Pause` and sends `SIGRTMIN` to the thread.
//! The handler sets `kvm_run.immediate_exit`, so the request is seen whether the
//! signal lands inside `KVM_RUN` (it returns `EINTR`) or just before it (it
//! returns at once). Before acknowledging, the thread re-enters `KVM_RUN` with
//! `immediate_exit` set, which completes any pending port or MMIO read, so the
//! state it can then save is consistent.

use std::cell::Cell;
use std::os::unix::thread::JoinHandleExt;
use std::sync::mpsc::{self, Receiver, Sender, SyncSender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_bindings::kvm_run;
use kvm_ioctls::VcpuExit;

use crate::devices::PioBus;
use crate::kvm::vcpu::{Vcpu, VcpuState};
use crate::kvm::KvmError;
use crate::machine::{EventSink, MachineEvent};

/// A request to a vCPU thread.
pub enum Request {
    /// Pause; the acknowledgement carries this number back.
    Pause(u64),
    Resume,
    Save(SyncSender<Result<VcpuState, KvmError>>),
    Restore(Box<VcpuState>, SyncSender<Result<(), KvmError>>),
    Stop,
}

thread_local! {
    static KVM_RUN: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let run = KVM_RUN.with(|c| c.get());
    if !run.is_null() {
        // SAFETY: KVM_RUN holds this thread's kvm_run mapping, set by the vCPU thread
        // before it unblocks the signal and cleared before the VcpuFd is dropped. A
        // volatile byte store is async-signal-safe.
        unsafe { std::ptr::addr_of_mut!((*run).immediate_exit).write_volatile(1) };
    }
}

/// The signal used to kick vCPU threads out of `KVM_RUN`.
pub fn kick_signal() -> libc::c_int {
    libc::SIGRTMIN()
}

/// Installs the kick handler (once per process).
pub fn install_kick_handler() -> std::io::Result<()> {
    vmm_sys_util::signal::register_signal_handler(kick_signal(), kick_handler)
        .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))
}

/// The controller's handle on one vCPU thread.
pub struct VcpuHandle {
    pub id: u8,
    /// Host thread id of the vCPU thread (what `query-cpus-fast` reports).
    pub tid: i32,
    tx: Sender<Request>,
    thread: Option<JoinHandle<()>>,
}

impl VcpuHandle {
    /// Starts the thread for `vcpu`, paused or running.
    pub fn spawn(
        vcpu: Vcpu,
        bus: Arc<PioBus>,
        acks: Sender<(u8, u64)>,
        events: EventSink,
        msrs: Arc<[u32]>,
        start_paused: bool,
    ) -> std::io::Result<Self> {
        let (tx, rx) = mpsc::channel();
        let (tid_tx, tid_rx) = mpsc::sync_channel(1);
        let id = vcpu.id;
        let thread = std::thread::Builder::new()
            .name(format!("vcpu{id}"))
            .spawn(move || {
                // SAFETY: gettid has no preconditions.
                let _ = tid_tx.send(unsafe { libc::gettid() });
                let l = VcpuLoop {
                    vcpu,
                    bus,
                    rx,
                    acks,
                    events,
                    msrs,
                };
                l.run(start_paused)
            })?;
        let tid = tid_rx.recv().unwrap_or(0);
        Ok(VcpuHandle {
            id,
            tid,
            tx,
            thread: Some(thread),
        })
    }

    /// Queues a request and kicks the thread out of `KVM_RUN`.
    pub fn send(&self, req: Request) {
        if self.tx.send(req).is_ok() {
            if let Some(t) = &self.thread {
                // SAFETY: the pthread_t belongs to a thread we spawned and have not joined.
                unsafe { libc::pthread_kill(t.as_pthread_t(), kick_signal()) };
            }
        }
    }

    /// Saves this (paused) vCPU's state.
    pub fn save(&self) -> Result<VcpuState, KvmError> {
        self.begin_save().wait()
    }

    /// Asks this (paused) vCPU's thread to save its state; [`PendingSave::wait`]
    /// collects it. Asking every vCPU first lets them save in parallel.
    pub fn begin_save(&self) -> PendingSave {
        let (tx, rx) = mpsc::sync_channel(1);
        self.send(Request::Save(tx));
        PendingSave(rx)
    }

    /// Restores this (paused) vCPU's state.
    pub fn restore(&self, state: VcpuState) -> Result<(), KvmError> {
        let (tx, rx) = mpsc::sync_channel(1);
        self.send(Request::Restore(Box::new(state), tx));
        rx.recv().unwrap_or_else(|_| Err(thread_gone()))
    }
}

/// A vCPU state save in progress on its thread.
pub struct PendingSave(mpsc::Receiver<Result<VcpuState, KvmError>>);

impl PendingSave {
    pub fn wait(self) -> Result<VcpuState, KvmError> {
        self.0.recv().unwrap_or_else(|_| Err(thread_gone()))
    }
}

fn thread_gone() -> KvmError {
    KvmError::Ioctl {
        op: "vCPU thread",
        source: kvm_ioctls::Error::new(libc::ESRCH),
    }
}

impl Drop for VcpuHandle {
    fn drop(&mut self) {
        self.send(Request::Stop);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Pauses every vCPU; returns how long it took until the last one acknowledged,
/// or `None` if some vCPU thread did not answer within 10 s.
pub fn pause_all(vcpus: &[VcpuHandle], acks: &Receiver<(u8, u64)>) -> Option<Duration> {
    let t0 = Instant::now();
    // Each pause has its own number, so a late acknowledgement of an earlier
    // pause that timed out cannot count for this one.
    static EPOCH: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    let epoch = EPOCH.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    while acks.try_recv().is_ok() {}
    for v in vcpus {
        v.send(Request::Pause(epoch));
    }
    let deadline = t0 + Duration::from_secs(10);
    let mut acked = 0;
    while acked < vcpus.len() {
        let left = deadline.checked_duration_since(Instant::now())?;
        let (_, e) = acks.recv_timeout(left).ok()?;
        acked += usize::from(e == epoch);
    }
    let took = t0.elapsed();
    tracing::debug!(
        pause_us = took.as_micros() as u64,
        vcpus = vcpus.len(),
        "vcpus paused"
    );
    Some(took)
}

/// Resumes every vCPU. A paused thread waits on its channel, so no kick is
/// sent: a stray kick would only make its first `KVM_RUN` return at once.
pub fn resume_all(vcpus: &[VcpuHandle]) {
    for v in vcpus {
        let _ = v.tx.send(Request::Resume);
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum State {
    Running,
    Paused,
    Stopped,
}

struct VcpuLoop {
    vcpu: Vcpu,
    bus: Arc<PioBus>,
    rx: Receiver<Request>,
    acks: Sender<(u8, u64)>,
    events: EventSink,
    msrs: Arc<[u32]>,
}

impl VcpuLoop {
    fn run(mut self, start_paused: bool) {
        let run_ptr: *mut kvm_run = self.vcpu.fd.get_kvm_run();
        KVM_RUN.with(|c| c.set(run_ptr));
        let mut state = if start_paused {
            State::Paused
        } else {
            State::Running
        };
        if start_paused {
            let _ = self.acks.send((self.vcpu.id, 0));
        }
        while state != State::Stopped {
            state = match state {
                State::Running => {
                    let mut s = State::Running;
                    while let Ok(req) = self.rx.try_recv() {
                        s = self.handle(req, s);
                    }
                    if s == State::Running {
                        self.run_once()
                    } else {
                        s
                    }
                }
                State::Paused => match self.rx.recv() {
                    Ok(req) => self.handle(req, State::Paused),
                    Err(_) => State::Stopped,
                },
                State::Stopped => State::Stopped,
            };
        }
        KVM_RUN.with(|c| c.set(std::ptr::null_mut()));
    }

    fn handle(&mut self, req: Request, state: State) -> State {
        match req {
            Request::Pause(epoch) => {
                if state == State::Running {
                    // Complete any pending I/O so the saved state is consistent.
                    self.vcpu.fd.set_kvm_immediate_exit(1);
                    let _ = self.vcpu.fd.run();
                }
                self.vcpu.fd.set_kvm_immediate_exit(0);
                let _ = self.acks.send((self.vcpu.id, epoch));
                State::Paused
            }
            Request::Resume => {
                self.vcpu.fd.set_kvm_immediate_exit(0);
                State::Running
            }
            Request::Save(reply) => {
                let _ = reply.send(if state == State::Paused {
                    self.vcpu.save(&self.msrs)
                } else {
                    Err(thread_gone())
                });
                state
            }
            Request::Restore(s, reply) => {
                let _ = reply.send(if state == State::Paused {
                    self.vcpu.restore(&s)
                } else {
                    Err(thread_gone())
                });
                state
            }
            Request::Stop => State::Stopped,
        }
    }

    fn run_once(&mut self) -> State {
        let id = self.vcpu.id;
        match self.vcpu.fd.run() {
            Ok(exit) => match exit {
                VcpuExit::IoOut(port, data) => {
                    self.bus.write(port, data);
                    State::Running
                }
                VcpuExit::IoIn(port, data) => {
                    self.bus.read(port, data);
                    State::Running
                }
                VcpuExit::MmioRead(addr, data) => {
                    self.bus.mmio_read(addr, data);
                    State::Running
                }
                VcpuExit::MmioWrite(addr, data) => {
                    self.bus.mmio_write(addr, data);
                    State::Running
                }
                VcpuExit::Intr | VcpuExit::Hlt => State::Running,
                VcpuExit::Shutdown | VcpuExit::SystemEvent(..) => {
                    (self.events)(MachineEvent::GuestShutdown(id));
                    State::Paused
                }
                other => {
                    (self.events)(MachineEvent::VcpuFailed(
                        id,
                        format!("unexpected exit: {other:?}"),
                    ));
                    State::Paused
                }
            },
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                self.vcpu.fd.set_kvm_immediate_exit(0);
                State::Running
            }
            Err(e) => {
                (self.events)(MachineEvent::VcpuFailed(id, format!("KVM_RUN: {e}")));
                State::Paused
            }
        }
    }
}
