//! Capture drivers: live capture by fork and the stop-and-copy baseline.
//! Captures into a [`Sink`] share the fork machinery here; their
//! sink-specific parts live in `sink.rs`; what every capture shares (the
//! handle, the figures, the temporary image) lives in `runtime.rs`.

use std::fmt;
use std::fs::File;
use std::io::{self, Read};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::capture::runtime::{
    call_on_done, prepare, stats, Capture, CaptureStats, CaptureStatus, DevSource, DoneCallback,
    Shared, StateSender, Times,
};
use crate::error::{Result, SnapError};
use crate::format::image::{Header, HEADER_SIZE, PAGE_SIZE};
use crate::format::sink::{Destination, Sink, SinkGuard};
use crate::format::temp::TempImage;
use crate::kernel::fork::{self, END_MARK, MAX_CHILD_RUN};
use crate::kernel::lock;
use crate::kernel::scan::ScanRange;
use crate::RamRange;

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

/// Prepares a live capture of `ranges` into `dest`; see [`PreparedCapture`].
///
/// Into a [`Sink`] (the same image bytes a file gets; see [`Sink`] for the
/// calls it receives): the child is the same; the writer thread `read(2)`s
/// each record (at most 256 KiB) into a buffer allocated here and passes it
/// to [`Sink::write_at`]. The sink ends with exactly one call:
/// [`Sink::finish`] when the capture completes, [`Sink::abort`] otherwise —
/// failure (also of this function), [`Capture::cancel`], death of the child,
/// or the [`PreparedCapture`] being dropped without being started.
pub fn prepare_fork_capture(
    ranges: &[RamRange],
    dest: Destination,
    opts: ForkOptions,
) -> Result<PreparedCapture> {
    match dest {
        Destination::File(path) => {
            let (_, scan) = prepare(ranges, 0)?;
            let tmp = TempImage::create(&path)?;
            prepare_with(ranges, scan, Dest::File(tmp), opts)
        }
        Destination::Sink(sink) => {
            let sink = SinkGuard::new(sink);
            let (_, scan) = prepare(ranges, 0)?;
            let buf = vec![0u8; MAX_CHILD_RUN as usize];
            prepare_with(ranges, scan, Dest::Sink { sink, buf }, opts)
        }
    }
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
    dest: Destination,
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
                copy_record(pipe, buf, sink, rec.file_offset, rec.len, &sh.written).map_err(
                    |e| match e {
                        CopyError::PipeEof => sh.child_died(),
                        CopyError::Snap(e) => e,
                    },
                )?
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
    let times = Times {
        pause: pause_time,
        fork: fork_time,
        ram: ram_time,
        child_cpu: exit.cpu_time,
    };
    match dest {
        Dest::File(tmp) => tmp.finish(header, dev, || sh.cancelled())?,
        Dest::Sink { sink, .. } => {
            let summary = crate::capture::runtime::summary(header, written, zero_total, times);
            sink.commit(header, dev, &summary, || sh.cancelled())?
        }
    }
    Ok(stats(sh.start, header, written, zero_total, times))
}

/// Why [`copy_record`] failed.
pub(crate) enum CopyError {
    /// The pipe ended inside the record: the child is gone.
    PipeEof,
    /// Any other error (pipe read, sink write).
    Snap(SnapError),
}

/// Writer-thread side of a sink capture: reads the `len` bytes of one record
/// from `pipe` into `buf` (at least `MAX_CHILD_RUN` bytes; `len` was
/// checked against it) and writes them to the sink at `offset`.
pub(crate) fn copy_record(
    pipe: &mut File,
    buf: &mut [u8],
    sink: &mut SinkGuard<Box<dyn Sink>>,
    offset: u64,
    len: u64,
    counter: &AtomicU64,
) -> Result<(), CopyError> {
    let chunk = usize::try_from(len)
        .ok()
        .and_then(|n| buf.get_mut(..n))
        .ok_or_else(|| {
            CopyError::Snap(SnapError::ChildFailed(format!(
                "record of {len} bytes exceeds the receive buffer"
            )))
        })?;
    match pipe.read_exact(chunk) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Err(CopyError::PipeEof),
        Err(e) => return Err(CopyError::Snap(SnapError::io("read capture pipe", e))),
    }
    sink.write(chunk, offset, "snapshot RAM")
        .map_err(CopyError::Snap)?;
    counter.fetch_add(len, Ordering::Relaxed);
    Ok(())
}
