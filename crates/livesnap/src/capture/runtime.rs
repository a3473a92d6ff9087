//! What every capture shares, whatever its kind (fork, write-protect,
//! stop-and-copy; to a file or a [`crate::Sink`]): the handle a caller keeps
//! ([`Capture`]) and the state its writer updates (`Shared`), the figures
//! ([`CaptureStats`], [`Progress`], [`CaptureStatus`]), the image header a
//! capture of some RAM makes (`prepare`), the temporary file renamed over its
//! destination once complete (`TempImage`), and the device state that comes
//! after the cut (`DevSource`, [`StateSender`]). The captures import it; it
//! imports none of them.

use std::fmt;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::error::{Result, SnapError};
use crate::format::image::{Header, PAGE_SIZE};
use crate::format::sink::{ImageSummary, Interrupter};
use crate::kernel::scan::ScanRange;
use crate::kernel::{fork, lock};
use crate::RamRange;
/// Callback run on the writer thread when a fork capture ends (any outcome),
/// after the status has been updated and the files cleaned up (for a
/// [`Sink`](crate::Sink): after [`Sink::finish`](crate::Sink::finish) succeeded or [`Sink::abort`](crate::Sink::abort) returned).
pub type DoneCallback = Box<dyn FnOnce(&Result<CaptureStats>) + Send + 'static>;

/// State of a fork capture.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CaptureStatus {
    /// Still streaming or finishing.
    Active,
    /// The complete image is under its final name (for a [`Sink`](crate::Sink): its
    /// [`Sink::finish`](crate::Sink::finish) succeeded).
    Completed,
    /// Failed; nothing was left under the final name or as a temp file (for
    /// a [`Sink`](crate::Sink): [`Sink::abort`](crate::Sink::abort) has been called).
    Failed(String),
    /// Cancelled; nothing was left under the final name or as a temp file
    /// (for a [`Sink`](crate::Sink): [`Sink::abort`](crate::Sink::abort) has been called).
    Cancelled,
}

/// Live progress of a capture (readable while it runs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Progress {
    /// RAM bytes to capture (sum of all ranges).
    pub total_bytes: u64,
    /// RAM bytes processed so far: written plus skipped zero pages; equals
    /// `total_bytes` once the RAM is done.
    pub transferred_bytes: u64,
    /// RAM bytes written to the file (or sink) so far.
    pub bytes_written: u64,
    /// Zero pages skipped so far (updated per record).
    pub zero_pages: u64,
    /// Non-zero pages written so far.
    pub normal_pages: u64,
    /// Page size.
    pub page_size: u64,
    /// Time since the capture started.
    pub elapsed: Duration,
}

/// Statistics of a finished capture.
#[derive(Clone, Debug, PartialEq)]
pub struct CaptureStats {
    /// From the call to the image being durable under its final name.
    pub total_time: Duration,
    /// Time spent inside the capturing call, i.e. the guest pause this engine
    /// causes (fork path: file + pipe setup, fork, thread spawn, measured when
    /// the writer thread starts; [`Capture::pause_time`] is the exact value.
    /// Stop-and-copy: everything).
    pub pause_time: Duration,
    /// The `fork()` call alone (zero for stop-and-copy).
    pub fork_time: Duration,
    /// From the start until the last RAM byte reached the file.
    pub ram_time: Duration,
    /// CPU time (user + system) of the capture child (zero for stop-and-copy).
    pub child_cpu_time: Duration,
    /// Sum of the RAM range lengths.
    pub ram_bytes: u64,
    /// RAM bytes written (non-zero pages).
    pub bytes_written: u64,
    /// Zero pages, left as holes.
    pub zero_pages: u64,
    /// Non-zero pages written.
    pub normal_pages: u64,
    /// Device-state bytes written.
    pub device_state_bytes: u64,
    /// Final (apparent) file size; for a [`Sink`](crate::Sink), the image length.
    pub file_len: u64,
    /// Guest RAM captured per second over `total_time`, in MB/s (10^6 bytes).
    pub throughput_mb_s: f64,
}

/// Validates the caller's ranges and computes the image layout.
pub(crate) fn prepare(ranges: &[RamRange], dev_len: usize) -> Result<(Header, Vec<ScanRange>)> {
    for (i, r) in ranges.iter().enumerate() {
        if r.host.is_null() || (r.host as usize) % PAGE_SIZE as usize != 0 {
            return Err(SnapError::InvalidInput(format!(
                "RAM range {i}: host address {:p} is not page-aligned",
                r.host
            )));
        }
        if r.len > isize::MAX as u64 {
            return Err(SnapError::InvalidInput(format!("RAM range {i}: too long")));
        }
    }
    let pairs: Vec<(u64, u64)> = ranges.iter().map(|r| (r.gpa, r.len)).collect();
    let header = Header::layout(&pairs, dev_len as u64)?;
    let scan = ranges
        .iter()
        .zip(&header.ranges)
        .map(|(r, ir)| ScanRange {
            host: r.host,
            len: r.len,
            file_offset: ir.file_offset,
        })
        .collect();
    Ok((header, scan))
}

/// Where a capture's time went (parts of [`CaptureStats`]).
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Times {
    /// The guest's pause.
    pub(crate) pause: Duration,
    /// Forking the child (the fork capture only).
    pub(crate) fork: Duration,
    /// Saving RAM.
    pub(crate) ram: Duration,
    /// The child's CPU time (the fork capture only).
    pub(crate) child_cpu: Duration,
}

pub(crate) fn stats(
    start: Instant,
    header: &Header,
    written: u64,
    zero_pages: u64,
    times: Times,
) -> CaptureStats {
    let total_time = start.elapsed();
    let secs = total_time.as_secs_f64().max(1e-9);
    CaptureStats {
        total_time,
        pause_time: times.pause,
        fork_time: times.fork,
        ram_time: times.ram,
        child_cpu_time: times.child_cpu,
        ram_bytes: header.ram_bytes(),
        bytes_written: written,
        zero_pages,
        normal_pages: written / PAGE_SIZE,
        device_state_bytes: header.dev_len,
        file_len: header.file_len,
        throughput_mb_s: header.ram_bytes() as f64 / 1e6 / secs,
    }
}

pub(crate) fn summary(
    header: &Header,
    written: u64,
    zero_pages: u64,
    times: Times,
) -> ImageSummary {
    ImageSummary {
        image_len: header.file_len,
        ram_bytes: header.ram_bytes(),
        bytes_written: written,
        zero_pages,
        normal_pages: written / PAGE_SIZE,
        device_state_bytes: header.dev_len,
        pause_time: times.pause,
        fork_time: times.fork,
        ram_time: times.ram,
        child_cpu_time: times.child_cpu,
    }
}

/// State shared between a [`Capture`] handle and its writer thread.
pub(crate) struct Shared {
    pub(crate) start: Instant,
    pub(crate) total_bytes: u64,
    pub(crate) written: AtomicU64,
    pub(crate) zero_pages: AtomicU64,
    pub(crate) cancelled: AtomicBool,
    /// The child's pid until it is reaped (kill only while `Some`; a
    /// write-protect capture has none).
    pub(crate) child: Mutex<Option<libc::pid_t>>,
    pub(crate) status: Mutex<CaptureStatus>,
    /// Makes a write blocked on the destination return (a sink's
    /// [`crate::Sink::interrupter`]); called by [`Capture::cancel`].
    pub(crate) interrupt: Mutex<Option<Interrupter>>,
}

impl Shared {
    /// A new active capture of `total_bytes` of RAM, started now.
    pub(crate) fn new(total_bytes: u64) -> Shared {
        Shared {
            start: Instant::now(),
            total_bytes,
            written: AtomicU64::new(0),
            zero_pages: AtomicU64::new(0),
            cancelled: AtomicBool::new(false),
            child: Mutex::new(None),
            status: Mutex::new(CaptureStatus::Active),
            interrupt: Mutex::new(None),
        }
    }

    pub(crate) fn cancelled(&self) -> bool {
        self.cancelled.load(Ordering::SeqCst)
    }

    /// Makes a write blocked on the destination return with an error (no
    /// effect for a local file).
    pub(crate) fn interrupt(&self) {
        if let Some(f) = lock(&self.interrupt).as_ref() {
            f();
        }
    }

    /// Reaps the child if not yet reaped (optionally SIGKILLing it first).
    pub(crate) fn reap_child(&self, kill_first: bool) -> Option<io::Result<fork::ChildExit>> {
        let pid = lock(&self.child).take()?;
        if kill_first {
            fork::kill(pid);
        }
        Some(fork::reap(pid))
    }

    /// Error for a pipe that ended early: reap and describe the child.
    pub(crate) fn child_died(&self) -> SnapError {
        match self.reap_child(false) {
            Some(Ok(exit)) => SnapError::ChildFailed(exit.describe()),
            Some(Err(e)) => SnapError::io("waitpid capture child", e),
            None => SnapError::ChildFailed("pipe closed early".into()),
        }
    }
}

/// Handle of a running fork capture. Dropping it detaches: the capture
/// goes on in the background (the `on_done` callback still runs).
pub struct Capture {
    pub(crate) shared: Arc<Shared>,
    pub(crate) thread: Option<JoinHandle<Result<CaptureStats>>>,
    /// The fork capture's child; 0 for a write-protect capture.
    pub(crate) pid: libc::pid_t,
    pub(crate) pause_time: Duration,
}

impl fmt::Debug for Capture {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Capture")
            .field("pid", &self.pid)
            .field("status", &self.status())
            .finish()
    }
}

impl Capture {
    /// Pid of the capture child.
    pub fn child_pid(&self) -> i32 {
        self.pid
    }

    /// Time `start_fork_capture` took (the pause it imposed on the guest).
    pub fn pause_time(&self) -> Duration {
        self.pause_time
    }

    /// Current status.
    pub fn status(&self) -> CaptureStatus {
        lock(&self.shared.status).clone()
    }

    /// Whether the capture has ended (any outcome).
    pub fn is_finished(&self) -> bool {
        self.status() != CaptureStatus::Active
    }

    /// Live progress.
    pub fn progress(&self) -> Progress {
        let sh = &self.shared;
        let written = sh.written.load(Ordering::Relaxed);
        let zero = sh.zero_pages.load(Ordering::Relaxed);
        Progress {
            total_bytes: sh.total_bytes,
            transferred_bytes: written + zero * PAGE_SIZE,
            bytes_written: written,
            zero_pages: zero,
            normal_pages: written / PAGE_SIZE,
            page_size: PAGE_SIZE,
            elapsed: sh.start.elapsed(),
        }
    }

    /// Requests cancellation: kills the child; the writer thread then
    /// removes the temp file (or aborts the sink) and ends with
    /// [`CaptureStatus::Cancelled`]. No effect once the image has been
    /// renamed into place (or the sink's `finish` has been called).
    pub fn cancel(&self) {
        self.shared.cancelled.store(true, Ordering::SeqCst);
        if let Some(pid) = *lock(&self.shared.child) {
            fork::kill(pid);
        }
        // A destination that stopped reading must not hold the cancel up.
        if !self.is_finished() {
            self.shared.interrupt();
        }
    }

    /// Blocks until the capture ends and returns its outcome.
    pub fn wait(mut self) -> Result<CaptureStats> {
        match self.thread.take().map(|t| t.join()) {
            Some(Ok(r)) => r,
            Some(Err(_)) => Err(SnapError::ChildFailed("writer thread panicked".into())),
            None => Err(SnapError::ChildFailed("capture already waited for".into())),
        }
    }
}

/// The device state of a capture: given at `start`, or sent later.
pub(crate) enum DevSource {
    Ready(Vec<u8>),
    Later(std::sync::mpsc::Receiver<std::result::Result<Vec<u8>, String>>),
}

/// How long the writer waits for a deferred device state.
pub(crate) const STATE_WAIT: Duration = Duration::from_secs(60);

impl DevSource {
    pub(crate) fn wait(self) -> Result<Vec<u8>> {
        match self {
            DevSource::Ready(v) => Ok(v),
            DevSource::Later(rx) => match rx.recv_timeout(STATE_WAIT) {
                Ok(Ok(v)) => Ok(v),
                Ok(Err(why)) => Err(SnapError::InvalidInput(format!(
                    "device state not saved: {why}"
                ))),
                Err(_) => Err(SnapError::InvalidInput(
                    "device state was never provided".into(),
                )),
            },
        }
    }
}

/// Delivers the device state of a capture started with
/// [`PreparedCapture::start_deferred`](crate::PreparedCapture::start_deferred).
#[derive(Debug)]
pub struct StateSender(
    pub(crate) std::sync::mpsc::SyncSender<std::result::Result<Vec<u8>, String>>,
);

impl StateSender {
    /// The state, saved at the instant of the fork.
    pub fn send(self, state: Vec<u8>) {
        let _ = self.0.send(Ok(state));
    }

    /// The state could not be saved: the capture fails with `why`.
    pub fn fail(self, why: String) {
        let _ = self.0.send(Err(why));
    }
}

/// Runs a capture's completion callback; a panic in it is logged, not spread.
pub(crate) fn call_on_done(on_done: Option<DoneCallback>, res: &Result<CaptureStats>) {
    if let Some(cb) = on_done {
        if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| cb(res))).is_err() {
            tracing::error!("capture on_done callback panicked");
        }
    }
}
