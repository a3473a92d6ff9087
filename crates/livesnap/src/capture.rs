//! Capture drivers: live capture by fork and the stop-and-copy baseline,
//! plus the temp-file / atomic-rename finishing they share. Captures into a
//! [`Sink`] share the fork machinery here; their sink-specific parts live in
//! `sink.rs`.

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::error::{Result, SnapError};
use crate::fork::{self, END_MARK, MAX_CHILD_RUN};
use crate::image::{Header, HEADER_SIZE, PAGE_SIZE};
use crate::pages::{for_each_run, ScanRange};
use crate::sink::{Sink, SinkGuard};
use crate::RamRange;

/// Callback run on the writer thread when a fork capture ends (any outcome),
/// after the status has been updated and the files cleaned up (for a
/// [`Sink`]: after [`Sink::finish`] succeeded or [`Sink::abort`] returned).
pub type DoneCallback = Box<dyn FnOnce(&Result<CaptureStats>) + Send + 'static>;

/// Options of [`start_fork_capture`].
pub struct ForkOptions {
    /// Called once when the capture ends, e.g. to emit a VMM event.
    pub on_done: Option<DoneCallback>,
    /// Pipe capacity requested with `F_SETPIPE_SZ` (default 1 MiB; kept as
    /// is when the system refuses).
    pub pipe_size: usize,
}

impl Default for ForkOptions {
    fn default() -> Self {
        ForkOptions {
            on_done: None,
            pipe_size: 1 << 20,
        }
    }
}

impl fmt::Debug for ForkOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ForkOptions")
            .field("on_done", &self.on_done.is_some())
            .field("pipe_size", &self.pipe_size)
            .finish()
    }
}

/// State of a fork capture.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CaptureStatus {
    /// Still streaming or finishing.
    Active,
    /// The complete image is under its final name (for a [`Sink`]: its
    /// [`Sink::finish`] succeeded).
    Completed,
    /// Failed; nothing was left under the final name or as a temp file (for
    /// a [`Sink`]: [`Sink::abort`] has been called).
    Failed(String),
    /// Cancelled; nothing was left under the final name or as a temp file
    /// (for a [`Sink`]: [`Sink::abort`] has been called).
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
    /// Final (apparent) file size; for a [`Sink`], the image length.
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

static TMP_SEQ: AtomicU32 = AtomicU32::new(0);

/// The temp file next to the destination; removed on drop unless renamed.
pub(crate) struct TempImage {
    pub(crate) file: File,
    tmp: PathBuf,
    dest: PathBuf,
    dir: PathBuf,
    renamed: bool,
}

impl TempImage {
    /// Creates `<dest>.tmp-<pid>[-n]` (empty; [`TempImage::size`] sizes it).
    ///
    /// The image holds guest RAM (keys, passwords): it is created 0600, and when it
    /// replaces an existing file it keeps that file's owner and never gets a wider mode.
    /// A symlink is followed (the image replaces its target); a destination that is not
    /// a regular file (a device, a FIFO, a socket) is refused: renaming over it would
    /// replace the node.
    pub(crate) fn create(dest: &Path) -> Result<TempImage> {
        let dest = &resolve_destination(dest)?;
        let name = dest.file_name().ok_or_else(|| {
            SnapError::InvalidInput(format!("destination {} has no file name", dest.display()))
        })?;
        let existing = match std::fs::metadata(dest) {
            Ok(m) if m.is_dir() => {
                return Err(SnapError::InvalidInput(format!(
                    "destination {} is a directory",
                    dest.display()
                )))
            }
            Ok(m) if !m.is_file() => {
                return Err(SnapError::InvalidInput(format!(
                    "destination {} is not a regular file ({}): snapshot images are written to regular files only",
                    dest.display(),
                    crate::image::file_kind(&m)
                )))
            }
            Ok(m) => Some(m),
            Err(_) => None,
        };
        let mode = existing.as_ref().map_or(0o600, |m| {
            std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o600
        });
        let dir = match dest.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        remove_stale_temp_files(&dir, name);
        let pid = std::process::id();
        let mut attempt = 0;
        let (file, tmp) = loop {
            let seq = TMP_SEQ.fetch_add(1, Ordering::Relaxed);
            let mut tmp_name = name.to_os_string();
            tmp_name.push(format!(".tmp-{pid}-{seq}"));
            let tmp = dir.join(tmp_name);
            match OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(mode)
                .custom_flags(libc::O_CLOEXEC)
                .open(&tmp)
            {
                Ok(f) => {
                    if let Some(m) = &existing {
                        use std::os::unix::fs::MetadataExt;
                        // Keep the replaced file's owner where we may (root); the umask
                        // may only have narrowed the mode, which is fine.
                        let _ = std::os::unix::fs::fchown(&f, Some(m.uid()), Some(m.gid()));
                    }
                    break (f, tmp);
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists && attempt < 100 => {
                    attempt += 1;
                }
                Err(source) => return Err(SnapError::DestDir { dir, source }),
            }
        };
        Ok(TempImage {
            file,
            tmp,
            dest: dest.to_path_buf(),
            dir,
            renamed: false,
        })
    }

    /// A second descriptor of the temp file for direct I/O (`O_DIRECT`):
    /// writes then cost their device time and nothing more — no page cache
    /// to fill, no dirty-page throttling to sleep in. `None` where the file
    /// system refuses it (tmpfs).
    pub(crate) fn open_direct(&self) -> Option<File> {
        OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_DIRECT | libc::O_CLOEXEC)
            .open(&self.tmp)
            .map_err(|e| tracing::debug!("no direct I/O to {}: {e}", self.tmp.display()))
            .ok()
    }

    /// Sizes the file to `len` (sparse).
    pub(crate) fn size(&self, len: u64) -> Result<()> {
        self.file
            .set_len(len)
            .map_err(|e| SnapError::io(format!("ftruncate {}", self.tmp.display()), e))
    }

    /// Writes device state and header, syncs, and renames over `dest`.
    pub(crate) fn finish(
        mut self,
        header: &Header,
        dev: &[u8],
        cancelled: impl Fn() -> bool,
    ) -> Result<()> {
        self.file
            .write_all_at(dev, header.dev_offset)
            .map_err(|e| SnapError::io("write device state", e))?;
        self.file
            .write_all_at(&header.encode(), 0)
            .map_err(|e| SnapError::io("write snapshot header", e))?;
        self.file
            .sync_data()
            .map_err(|e| SnapError::io("fdatasync snapshot", e))?;
        if cancelled() {
            return Err(SnapError::Cancelled);
        }
        std::fs::rename(&self.tmp, &self.dest).map_err(|e| {
            SnapError::io(
                format!("rename {} to {}", self.tmp.display(), self.dest.display()),
                e,
            )
        })?;
        self.renamed = true;
        if let Err(e) = File::open(&self.dir).and_then(|d| d.sync_all()) {
            tracing::warn!("fsync of directory {} failed: {e}", self.dir.display());
        }
        Ok(())
    }
}

/// Removes `<name>.tmp-<pid>-<n>` files left in `dir` by processes that no longer
/// exist (a capture killed with SIGKILL cannot clean up after itself). Files of
/// live processes, this one included, are left alone.
fn remove_stale_temp_files(dir: &Path, name: &std::ffi::OsStr) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let prefix = format!("{}.tmp-", name.to_string_lossy());
    for e in entries.flatten() {
        let file = e.file_name();
        let file = file.to_string_lossy();
        let Some(pid) = file
            .strip_prefix(&prefix)
            .and_then(|rest| rest.split_once('-'))
            .filter(|(_, seq)| seq.bytes().all(|b| b.is_ascii_digit()) && !seq.is_empty())
            .and_then(|(pid, _)| pid.parse::<i32>().ok())
        else {
            continue;
        };
        // SAFETY: signal 0 sends nothing; it only asks whether `pid` exists.
        let gone = pid > 0
            && unsafe { libc::kill(pid, 0) } != 0
            && io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH);
        if gone {
            match std::fs::remove_file(e.path()) {
                Ok(()) => tracing::warn!(
                    "removed {}, left by a capture that was killed",
                    e.path().display()
                ),
                Err(err) => tracing::warn!("cannot remove stale {}: {err}", e.path().display()),
            }
        }
    }
}

/// Follows symlinks to the path the image should replace or create.
fn resolve_destination(dest: &Path) -> Result<PathBuf> {
    let mut p = dest.to_path_buf();
    for _ in 0..40 {
        match std::fs::symlink_metadata(&p) {
            Ok(m) if m.file_type().is_symlink() => {
                let target = std::fs::read_link(&p)
                    .map_err(|e| SnapError::io(format!("readlink {}", p.display()), e))?;
                p = match p.parent() {
                    Some(dir) if target.is_relative() => dir.join(target),
                    _ => target,
                };
            }
            _ => return Ok(p),
        }
    }
    Err(SnapError::InvalidInput(format!(
        "destination {}: too many levels of symbolic links",
        dest.display()
    )))
}

impl Drop for TempImage {
    fn drop(&mut self) {
        if !self.renamed {
            if let Err(e) = std::fs::remove_file(&self.tmp) {
                tracing::warn!("cannot remove {}: {e}", self.tmp.display());
            }
        }
    }
}

/// Where a fork capture writes: a temp file renamed into place, or a sink.
/// Dropping it before completion removes the temp file / aborts the sink.
enum Dest {
    File(TempImage),
    Sink {
        sink: SinkGuard<Box<dyn Sink>>,
        /// Receives one record at a time (at most `MAX_CHILD_RUN` bytes).
        buf: Vec<u8>,
    },
}

impl fmt::Debug for Dest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Dest::File(t) => write!(f, "{}", t.dest.display()),
            Dest::Sink { .. } => f.write_str("<sink>"),
        }
    }
}

pub(crate) fn stats(
    start: Instant,
    header: &Header,
    written: u64,
    zero_pages: u64,
    times: (Duration, Duration, Duration, Duration),
) -> CaptureStats {
    let total_time = start.elapsed();
    let (pause_time, fork_time, ram_time, child_cpu_time) = times;
    let secs = total_time.as_secs_f64().max(1e-9);
    CaptureStats {
        total_time,
        pause_time,
        fork_time,
        ram_time,
        child_cpu_time,
        ram_bytes: header.ram_bytes(),
        bytes_written: written,
        zero_pages,
        normal_pages: written / PAGE_SIZE,
        device_state_bytes: header.dev_len,
        file_len: header.file_len,
        throughput_mb_s: header.ram_bytes() as f64 / 1e6 / secs,
    }
}

/// Stop-and-copy capture: the caller keeps the VM paused throughout. Writes
/// the non-zero pages with `pwrite` (runs of up to 1 MiB), then the device
/// state and header, `fdatasync`s and renames the temp file over `dest`.
///
/// The memory named by `ranges` must not be written during the call.
pub fn capture_stopped(
    ranges: &[RamRange],
    device_state: &[u8],
    dest: &Path,
) -> Result<CaptureStats> {
    let start = Instant::now();
    let (mut header, scan) = prepare(ranges, device_state.len())?;
    let tmp = TempImage::create(dest)?;
    tmp.size(header.file_len)?;
    let (mut zero, mut written) = (0u64, 0u64);
    for r in &scan {
        let write_run = |fo: u64, p: *const u8, len: u64, _z: u64| -> Result<()> {
            // SAFETY: p..p+len lies inside a validated range (for_each_run's
            // guarantee), mapped for the process lifetime and not written
            // while the VM is paused (caller contract).
            let s = unsafe { std::slice::from_raw_parts(p, len as usize) };
            tmp.file
                .write_all_at(s, fo)
                .map_err(|e| SnapError::io("write snapshot RAM", e))?;
            written += len;
            Ok(())
        };
        // SAFETY: prepare() checked page alignment and lengths; the memory is
        // mapped for the process lifetime and, the VM being paused, unchanging.
        unsafe { for_each_run(r, 1 << 20, &mut zero, write_run) }?;
    }
    let ram_time = start.elapsed();
    header.dev_crc = crc32fast::hash(device_state);
    tmp.finish(&header, device_state, || false)?;
    let mut s = stats(
        start,
        &header,
        written,
        zero,
        (Duration::ZERO, Duration::ZERO, ram_time, Duration::ZERO),
    );
    s.pause_time = s.total_time;
    tracing::info!(dest = %dest.display(), ?s, "stop-and-copy capture done");
    Ok(s)
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
    pub(crate) interrupt: Mutex<Option<crate::Interrupter>>,
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
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
    fn reap_child(&self, kill_first: bool) -> Option<io::Result<fork::ChildExit>> {
        let pid = lock(&self.child).take()?;
        if kill_first {
            fork::kill(pid);
        }
        Some(fork::reap(pid))
    }

    /// Error for a pipe that ended early: reap and describe the child.
    fn child_died(&self) -> SnapError {
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

/// A live capture made ready before the pause: ranges validated, the temp
/// file created next to `dest` (so an unusable destination fails here, with
/// the guest still running), the pipe open. [`PreparedCapture::start`] is the
/// only part that belongs inside the pause.
pub struct PreparedCapture {
    ranges: Vec<(u64, u64)>,
    scan: Vec<ScanRange>,
    dest: Dest,
    pipe_r: File,
    pipe_w: std::os::fd::OwnedFd,
    opts: ForkOptions,
}

impl fmt::Debug for PreparedCapture {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PreparedCapture")
            .field("ranges", &self.ranges)
            .field("dest", &self.dest)
            .finish_non_exhaustive()
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
/// [`PreparedCapture::start_deferred`].
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

/// Prepares a live capture of `ranges` into `dest`; see [`PreparedCapture`].
pub fn prepare_fork_capture(
    ranges: &[RamRange],
    dest: &Path,
    opts: ForkOptions,
) -> Result<PreparedCapture> {
    let (_, scan) = prepare(ranges, 0)?;
    let tmp = TempImage::create(dest)?;
    prepare_with(ranges, scan, Dest::File(tmp), opts)
}

/// Prepares a live capture of `ranges` into `sink` (the same image bytes
/// [`prepare_fork_capture`] would put in a file); see [`PreparedCapture`],
/// and [`Sink`] for the calls the sink receives.
///
/// The child is the same; the writer thread `read(2)`s each record (at most
/// 256 KiB) into a buffer allocated here and passes it to
/// [`Sink::write_at`]. The sink ends with exactly one call: [`Sink::finish`]
/// when the capture completes, [`Sink::abort`] otherwise — failure (also of
/// this function), [`Capture::cancel`], death of the child, or the
/// [`PreparedCapture`] being dropped without being started.
pub fn prepare_fork_capture_to(
    ranges: &[RamRange],
    sink: Box<dyn Sink>,
    opts: ForkOptions,
) -> Result<PreparedCapture> {
    let sink = SinkGuard::new(sink);
    let (_, scan) = prepare(ranges, 0)?;
    let buf = vec![0u8; MAX_CHILD_RUN as usize];
    prepare_with(ranges, scan, Dest::Sink { sink, buf }, opts)
}

fn prepare_with(
    ranges: &[RamRange],
    scan: Vec<ScanRange>,
    dest: Dest,
    opts: ForkOptions,
) -> Result<PreparedCapture> {
    let (pipe_r, pipe_w) =
        fork::make_pipe(opts.pipe_size).map_err(|e| SnapError::io("create pipe", e))?;
    Ok(PreparedCapture {
        ranges: ranges.iter().map(|r| (r.gpa, r.len)).collect(),
        scan,
        dest,
        pipe_r,
        pipe_w,
        opts,
    })
}

impl PreparedCapture {
    /// Forks the capture child and returns at once: the caller may resume the
    /// vCPUs right away. The child holds a copy-on-write image of RAM as of
    /// this call; `device_state` must have been saved at the same instant.
    pub fn start(self, device_state: Vec<u8>) -> Result<Capture> {
        // Checked now, so an oversized state fails before anything is forked.
        Header::layout(&self.ranges, device_state.len() as u64)?;
        self.launch(DevSource::Ready(device_state))
    }

    /// Like [`PreparedCapture::start`], but the device state comes later,
    /// through the returned [`StateSender`] — so a VMM can fork while its
    /// vCPU threads are still saving their registers, and serialize the
    /// state after it resumes the guest. The state must describe the same
    /// paused instant as the fork. If the sender is dropped or fails, the
    /// capture fails.
    pub fn start_deferred(self) -> Result<(Capture, StateSender)> {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let c = self.launch(DevSource::Later(rx))?;
        Ok((c, StateSender(tx)))
    }

    fn launch(self, device_state: DevSource) -> Result<Capture> {
        let header = Header::layout(&self.ranges, 0)?;
        let ranges = self.ranges.clone();
        let shared = Arc::new(Shared::new(header.ram_bytes()));
        let start = shared.start;
        let (scan, dest, pipe_r, pipe_w) = (self.scan, self.dest, self.pipe_r, self.pipe_w);
        if let Dest::Sink { sink, .. } = &dest {
            *lock(&shared.interrupt) = sink.interrupter();
        }
        let t_fork = Instant::now();
        // SAFETY: prepare() validated every range (page-aligned host address,
        // page-multiple length) and the layout is the same with any device
        // state length (it only follows RAM); RamRange's contract keeps the
        // memory mapped for the process lifetime; the fds are the two ends of
        // the fresh pipe.
        let pid = unsafe { fork::fork_child(&scan, pipe_r.as_raw_fd(), pipe_w.as_raw_fd()) }
            .map_err(|e| SnapError::io("fork capture child", e))?;
        let fork_time = t_fork.elapsed();
        drop(pipe_w);
        *lock(&shared.child) = Some(pid);
        let sh = Arc::clone(&shared);
        let on_done = self.opts.on_done;
        let spawned = std::thread::Builder::new()
            .name("livesnap-writer".into())
            .spawn(move || {
                let pause = start.elapsed();
                writer_thread(
                    sh,
                    pipe_r,
                    dest,
                    (header, ranges),
                    device_state,
                    on_done,
                    fork_time,
                    pause,
                )
            });
        let thread = match spawned {
            Ok(t) => t,
            Err(e) => {
                // The closure (and with it the temp file or sink) was
                // dropped, which removed / aborted it: reap the child.
                let _ = shared.reap_child(true);
                return Err(SnapError::io("spawn writer thread", e));
            }
        };
        Ok(Capture {
            shared,
            thread: Some(thread),
            pid,
            pause_time: start.elapsed(),
        })
    }
}

/// Prepares and starts a live capture in one call (see
/// [`prepare_fork_capture`] and [`PreparedCapture::start`]); a VMM should
/// prepare before it pauses the guest.
pub fn start_fork_capture(
    ranges: &[RamRange],
    device_state: Vec<u8>,
    dest: &Path,
    opts: ForkOptions,
) -> Result<Capture> {
    prepare_fork_capture(ranges, dest, opts)?.start(device_state)
}

#[allow(clippy::too_many_arguments)]
fn writer_thread(
    sh: Arc<Shared>,
    mut pipe: File,
    dest: Dest,
    (mut header, ranges): (Header, Vec<(u64, u64)>),
    dev: DevSource,
    on_done: Option<DoneCallback>,
    fork_time: Duration,
    pause_time: Duration,
) -> Result<CaptureStats> {
    let label = format!("{dest:?}");
    // A panicking sink must still end the capture (status, child, abort).
    let res = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let dev = dev.wait()?;
        // The layout of RAM does not depend on the state's length; the
        // header (state offset, file length) does.
        header = Header::layout(&ranges, dev.len() as u64)?;
        stream(
            &sh,
            &mut pipe,
            dest,
            &mut header,
            &dev,
            fork_time,
            pause_time,
        )
    }))
    .unwrap_or_else(|_| {
        Err(SnapError::io(
            "capture writer",
            io::Error::other("writer thread panicked"),
        ))
    });
    drop(pipe);
    // The sink is settled: nothing to interrupt any more.
    lock(&sh.interrupt).take();
    let dest = label;
    let res = match res {
        Ok(s) => Ok(s),
        Err(e) => {
            if let Some(Err(we)) = sh.reap_child(true) {
                tracing::warn!("reaping capture child failed: {we}");
            }
            if sh.cancelled() {
                Err(SnapError::Cancelled)
            } else {
                Err(e)
            }
        }
    };
    *lock(&sh.status) = match &res {
        Ok(s) => {
            tracing::info!(%dest, ?s, "fork capture done");
            CaptureStatus::Completed
        }
        Err(SnapError::Cancelled) => {
            tracing::info!(%dest, "fork capture cancelled");
            CaptureStatus::Cancelled
        }
        Err(e) => {
            tracing::warn!(%dest, "fork capture failed: {e}");
            CaptureStatus::Failed(e.to_string())
        }
    };
    call_on_done(on_done, &res);
    res
}

/// Runs a capture's completion callback; a panic in it is logged, not spread.
pub(crate) fn call_on_done(on_done: Option<DoneCallback>, res: &Result<CaptureStats>) {
    if let Some(cb) = on_done {
        if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| cb(res))).is_err() {
            tracing::error!("capture on_done callback panicked");
        }
    }
}

/// Receives the records, splices them into the temp file (or copies them
/// into the sink), then finishes it. Dropping `dest` on any error removes
/// the temp file (or aborts the sink).
fn stream(
    sh: &Shared,
    pipe: &mut File,
    mut dest: Dest,
    header: &mut Header,
    dev: &[u8],
    fork_time: Duration,
    pause_time: Duration,
) -> Result<CaptureStats> {
    match &mut dest {
        Dest::File(tmp) => tmp.size(header.file_len)?,
        Dest::Sink { sink, .. } => sink.begin(header.file_len)?,
    }
    let ram_end = header.dev_offset;
    let zero_total = loop {
        let rec = match fork::read_record(pipe) {
            Ok(r) => r,
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Err(sh.child_died()),
            Err(e) => return Err(SnapError::io("read capture pipe", e)),
        };
        if sh.cancelled() {
            return Err(SnapError::Cancelled);
        }
        if rec.file_offset == END_MARK {
            break rec.zero_pages;
        }
        let end = rec.file_offset.checked_add(rec.len);
        if rec.len == 0
            || rec.len % PAGE_SIZE != 0
            || rec.len > MAX_CHILD_RUN
            || rec.file_offset < HEADER_SIZE
            || end.map_or(true, |e| e > ram_end)
        {
            return Err(SnapError::ChildFailed(format!(
                "protocol violation: {rec:?}"
            )));
        }
        match &mut dest {
            Dest::File(tmp) => {
                fork::splice_into(pipe, &tmp.file, rec.file_offset, rec.len, &sh.written).map_err(
                    |e| match e.kind() {
                        io::ErrorKind::UnexpectedEof => sh.child_died(),
                        _ => SnapError::io("write snapshot RAM", e),
                    },
                )?
            }
            Dest::Sink { sink, buf } => {
                crate::sink::copy_record(pipe, buf, sink, rec.file_offset, rec.len, &sh.written)
                    .map_err(|e| match e {
                        crate::sink::CopyError::PipeEof => sh.child_died(),
                        crate::sink::CopyError::Snap(e) => e,
                    })?
            }
        }
        sh.zero_pages.store(rec.zero_pages, Ordering::Relaxed);
    };
    sh.zero_pages.store(zero_total, Ordering::Relaxed);
    let written = sh.written.load(Ordering::Relaxed);
    if written + zero_total * PAGE_SIZE != header.ram_bytes() {
        return Err(SnapError::ChildFailed(format!(
            "child accounted for {written} written + {zero_total} zero pages, RAM is {} bytes",
            header.ram_bytes()
        )));
    }
    let ram_time = sh.start.elapsed();
    let exit = match sh.reap_child(false) {
        Some(Ok(x)) => x,
        Some(Err(e)) => return Err(SnapError::io("waitpid capture child", e)),
        None => return Err(SnapError::Cancelled),
    };
    if !exit.success() {
        return Err(SnapError::ChildFailed(exit.describe()));
    }
    header.dev_crc = crc32fast::hash(dev);
    let times = (pause_time, fork_time, ram_time, exit.cpu_time);
    match dest {
        Dest::File(tmp) => tmp.finish(header, dev, || sh.cancelled())?,
        Dest::Sink { sink, .. } => {
            let summary = crate::sink::summary(header, written, zero_total, times);
            sink.commit(header, dev, &summary, || sh.cancelled())?
        }
    }
    Ok(stats(sh.start, header, written, zero_total, times))
}
