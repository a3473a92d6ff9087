//! Captures into a caller-provided [`Sink`] instead of a plain file (e.g.
//! the vmstate area of a qcow2 disk image): the trait, the guard that
//! guarantees exactly one `finish` or `abort`, the writer thread's record
//! copy, and the stop-and-copy driver.

use std::fs::File;
use std::io::{self, Read};
use std::ops::DerefMut;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::error::{Result, SnapError};
use crate::image::{Header, PAGE_SIZE};
use crate::pages::for_each_run;
pub use crate::runtime::Interrupter;
use crate::runtime::{prepare, stats, CaptureStats, Times};
use crate::RamRange;

/// Where a live capture's image goes: a file (written as a temporary file
/// next to it and renamed over it once complete) or a [`Sink`].
pub enum Destination {
    File(PathBuf),
    Sink(Box<dyn Sink>),
}

impl Destination {
    /// The file at `path`.
    pub fn file(path: impl AsRef<Path>) -> Destination {
        Destination::File(path.as_ref().to_path_buf())
    }
}

/// Where a capture writes its image when it is not a plain file.
///
/// The bytes are exactly those of the file format (`FORMAT.md`): what
/// [`Image::from_source`](crate::Image::from_source) reads back through a
/// [`Source`](crate::Source) over the same store. Calls never overlap in
/// time; they come from one thread (the writer thread of a fork capture, the
/// caller's for [`capture_stopped_to`]) except in a write-protect capture
/// ([`crate::wp_capture`]), whose fault handler also writes the chunks it had
/// to write itself (one at a time, under a lock):
///
/// 1. [`Sink::begin`] once, with the final image length;
/// 2. [`Sink::write_at`] for the RAM (a fork capture in increasing offset
///    order within a range; a write-protect capture in any order), then the
///    device state, then the 4 KiB header at offset 0 last;
/// 3. exactly one of [`Sink::finish`] (everything was written) or
///    [`Sink::abort`] (failure, cancellation, death of the capture child,
///    error of any sink call — `finish` included —, or a prepared capture
///    dropped without being started). Neither is called twice, and nothing
///    is called after them.
///
/// A panic in a sink method of a fork or write-protect capture fails the capture; in
/// [`capture_stopped_to`] it propagates. Either way `abort` is called unless
/// the panic came from `finish` or `abort` itself.
pub trait Sink: Send + 'static {
    /// Called once before any write with the final length of the image
    /// (e.g. to reserve space). Returns an error to fail the capture.
    fn begin(&mut self, image_len: u64) -> io::Result<()> {
        let _ = image_len;
        Ok(())
    }

    /// Writes `buf` (never empty) at image offset `offset`. Offsets follow
    /// the image layout; written extents never overlap; zero pages and
    /// padding are never written — they must read back as zeros. Returns an
    /// error to fail the capture (its text ends up in the capture status).
    fn write_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()>;

    /// Everything was written (header last): make it durable/visible.
    /// `summary` carries the facts of the capture (image length, page
    /// counts, timings). Returns an error to fail the capture; `abort`
    /// follows.
    fn finish(&mut self, summary: &ImageSummary) -> io::Result<()>;

    /// The capture failed or was cancelled: release what was written.
    fn abort(&mut self);

    /// A way to make a write blocked in this sink return (with an error)
    /// from another thread — shutting a socket down, killing a command —,
    /// used when the capture is cancelled or its destination stopped taking
    /// data. `None` (the default): writes end by themselves (a local file).
    fn interrupter(&self) -> Option<Interrupter> {
        None
    }
}

/// What a [`Sink`] learns when the image is complete: the facts behind
/// [`CaptureStats`] that are final at that point.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct ImageSummary {
    /// Length of the image (header + RAM + device state), as in its header.
    pub image_len: u64,
    /// Sum of the RAM range lengths.
    pub ram_bytes: u64,
    /// RAM bytes written (non-zero pages).
    pub bytes_written: u64,
    /// Zero pages (never written).
    pub zero_pages: u64,
    /// Non-zero pages written.
    pub normal_pages: u64,
    /// Device-state bytes written.
    pub device_state_bytes: u64,
    /// Guest pause caused by the engine (fork capture: the `start` call;
    /// stop-and-copy: the time elapsed up to this `finish` call).
    pub pause_time: Duration,
    /// The `fork()` call alone (zero for stop-and-copy).
    pub fork_time: Duration,
    /// From the start until the last RAM byte was written.
    pub ram_time: Duration,
    /// CPU time of the capture child (zero for stop-and-copy).
    pub child_cpu_time: Duration,
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

/// Owns (or borrows) a sink and guarantees the single final call: `commit`
/// calls `finish`; dropping the guard otherwise calls `abort`.
pub(crate) struct SinkGuard<P>
where
    P: DerefMut,
    P::Target: Sink,
{
    sink: P,
    settled: bool,
}

impl<P> SinkGuard<P>
where
    P: DerefMut,
    P::Target: Sink,
{
    pub(crate) fn new(sink: P) -> Self {
        SinkGuard {
            sink,
            settled: false,
        }
    }

    pub(crate) fn interrupter(&self) -> Option<Interrupter> {
        self.sink.interrupter()
    }

    pub(crate) fn begin(&mut self, image_len: u64) -> Result<()> {
        self.sink
            .begin(image_len)
            .map_err(|e| SnapError::io("begin snapshot sink", e))
    }

    pub(crate) fn write(&mut self, buf: &[u8], offset: u64, what: &str) -> Result<()> {
        if buf.is_empty() {
            return Ok(());
        }
        self.sink
            .write_at(buf, offset)
            .map_err(|e| SnapError::io(format!("write {what} to sink"), e))
    }

    /// Writes device state and header, then `finish`es the sink (unless
    /// cancelled). On error the guard is dropped, which aborts the sink.
    pub(crate) fn commit(
        mut self,
        header: &Header,
        dev: &[u8],
        summary: &ImageSummary,
        cancelled: impl Fn() -> bool,
    ) -> Result<()> {
        self.write(dev, header.dev_offset, "device state")?;
        self.write(&header.encode(), 0, "snapshot header")?;
        if cancelled() {
            return Err(SnapError::Cancelled);
        }
        // A panicking finish counts as settled: abort is not called after it.
        self.settled = true;
        match self.sink.finish(summary) {
            Ok(()) => Ok(()),
            Err(e) => {
                self.settled = false;
                Err(SnapError::io("finish snapshot sink", e))
            }
        }
    }
}

impl<P> Drop for SinkGuard<P>
where
    P: DerefMut,
    P::Target: Sink,
{
    fn drop(&mut self) {
        if !self.settled {
            self.settled = true;
            self.sink.abort();
        }
    }
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

/// Stop-and-copy capture into `sink`: the caller keeps the VM paused
/// throughout. Same image bytes as [`capture_stopped`](crate::capture_stopped);
/// the non-zero pages go to [`Sink::write_at`] straight from guest memory
/// (runs of up to 1 MiB), then the device state, the header, and
/// [`Sink::finish`]. On any error (invalid input included) [`Sink::abort`]
/// is called before returning.
///
/// The memory named by `ranges` must not be written during the call.
pub fn capture_stopped_to(
    ranges: &[RamRange],
    device_state: &[u8],
    sink: &mut dyn Sink,
) -> Result<CaptureStats> {
    let start = Instant::now();
    let mut sink = SinkGuard::new(sink);
    let (mut header, scan) = prepare(ranges, device_state.len())?;
    sink.begin(header.file_len)?;
    let (mut zero, mut written) = (0u64, 0u64);
    for r in &scan {
        let write_run = |fo: u64, p: *const u8, len: u64, _z: u64| -> Result<()> {
            // SAFETY: p..p+len lies inside a validated range (for_each_run's
            // guarantee), mapped for the process lifetime and not written
            // while the VM is paused (caller contract).
            let s = unsafe { std::slice::from_raw_parts(p, len as usize) };
            sink.write(s, fo, "snapshot RAM")?;
            written += len;
            Ok(())
        };
        // SAFETY: prepare() checked page alignment and lengths; the memory is
        // mapped for the process lifetime and, the VM being paused, unchanging.
        unsafe { for_each_run(r, 1 << 20, &mut zero, write_run) }?;
    }
    let ram_time = start.elapsed();
    header.dev_crc = crc32fast::hash(device_state);
    let times = Times {
        pause: start.elapsed(),
        ram: ram_time,
        ..Times::default()
    };
    let summary = summary(&header, written, zero, times);
    sink.commit(&header, device_state, &summary, || false)?;
    let mut s = stats(start, &header, written, zero, times);
    s.pause_time = s.total_time;
    tracing::info!(?s, "stop-and-copy capture into sink done");
    Ok(s)
}
