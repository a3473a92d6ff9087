//! Where a capture writes its image when it is not a plain file (e.g. the
//! vmstate area of a qcow2 disk image): the [`Sink`] trait, the
//! [`Destination`] of a live capture, what a sink learns at the end, and the
//! guard that guarantees exactly one `finish` or `abort`.

use std::io;
use std::ops::DerefMut;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::error::{Result, SnapError};
use crate::format::image::Header;

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

/// Makes a sink's blocked write return; see [`crate::Sink::interrupter`].
pub type Interrupter = Box<dyn Fn() + Send + Sync>;

/// Where a capture writes its image when it is not a plain file.
///
/// The bytes are exactly those of the file format (`FORMAT.md`): what
/// [`Image::from_source`](crate::Image::from_source) reads back through a
/// [`Source`](crate::Source) over the same store. Calls never overlap in
/// time; they come from one thread (the writer thread of a fork capture, the
/// caller's for [`capture_stopped`](crate::capture_stopped)) except in a write-protect capture
/// ([`crate::capture::wp`]), whose fault handler also writes the chunks it had
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
/// [`capture_stopped`](crate::capture_stopped) it propagates. Either way `abort` is called unless
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
/// [`CaptureStats`](crate::CaptureStats) that are final at that point.
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
