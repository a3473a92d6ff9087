//! Stop-and-copy, the baseline capture: the caller keeps the VM paused
//! throughout, and the image is written straight from guest memory.

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::Instant;

use crate::capture::runtime::{prepare, stats, summary, CaptureStats, Times};
use crate::error::{Result, SnapError};
use crate::format::image::Header;
use crate::format::sink::{Sink, SinkGuard};
use crate::format::temp::TempImage;
use crate::kernel::scan::{for_each_run, ScanRange};
use crate::RamRange;

/// Where a stop-and-copy capture writes: a file (through a temporary file
/// renamed over it once complete), or a [`Sink`] the caller keeps.
pub enum StoppedTo<'a> {
    File(&'a Path),
    Sink(&'a mut dyn Sink),
}

impl<'a, P: AsRef<Path> + ?Sized> From<&'a P> for StoppedTo<'a> {
    fn from(p: &'a P) -> StoppedTo<'a> {
        StoppedTo::File(p.as_ref())
    }
}

impl<'a, S: Sink> From<&'a mut S> for StoppedTo<'a> {
    fn from(s: &'a mut S) -> StoppedTo<'a> {
        StoppedTo::Sink(s)
    }
}

impl<'a> From<&'a mut dyn Sink> for StoppedTo<'a> {
    fn from(s: &'a mut dyn Sink) -> StoppedTo<'a> {
        StoppedTo::Sink(s)
    }
}

/// The image being written.
enum Out<'a> {
    File(TempImage),
    Sink(SinkGuard<&'a mut dyn Sink>),
}

impl Out<'_> {
    fn write(&mut self, buf: &[u8], offset: u64) -> Result<()> {
        match self {
            Out::File(tmp) => tmp
                .file
                .write_all_at(buf, offset)
                .map_err(|e| SnapError::io("write snapshot RAM", e)),
            Out::Sink(sink) => sink.write(buf, offset, "snapshot RAM"),
        }
    }
}

/// Stop-and-copy capture of `ranges` and `device_state` into `dest` (a
/// path, or `&mut` a [`Sink`]). The non-zero pages are written in runs of
/// up to 1 MiB, then the device state and the header; a file is
/// `fdatasync`ed and renamed over the path, a sink gets [`Sink::finish`].
/// On any error (invalid input included) a sink gets [`Sink::abort`] before
/// this returns, and a file's old contents are left as they were.
///
/// The memory named by `ranges` must not be written during the call.
pub fn capture_stopped<'a>(
    ranges: &[RamRange],
    device_state: &[u8],
    dest: impl Into<StoppedTo<'a>>,
) -> Result<CaptureStats> {
    let start = Instant::now();
    match dest.into() {
        StoppedTo::File(path) => {
            let (header, scan) = prepare(ranges, device_state.len())?;
            let tmp = TempImage::create(path)?;
            tmp.size(header.file_len)?;
            let s = write_image(start, header, &scan, device_state, Out::File(tmp))?;
            tracing::info!(dest = %path.display(), ?s, "stop-and-copy capture done");
            Ok(s)
        }
        StoppedTo::Sink(sink) => {
            // The guard first: invalid input aborts the sink too.
            let mut sink = SinkGuard::new(sink);
            let (header, scan) = prepare(ranges, device_state.len())?;
            sink.begin(header.file_len)?;
            let s = write_image(start, header, &scan, device_state, Out::Sink(sink))?;
            tracing::info!(?s, "stop-and-copy capture into sink done");
            Ok(s)
        }
    }
}

fn write_image(
    start: Instant,
    mut header: Header,
    scan: &[ScanRange],
    device_state: &[u8],
    mut out: Out<'_>,
) -> Result<CaptureStats> {
    let (mut zero, mut written) = (0u64, 0u64);
    for r in scan {
        let write_run = |fo: u64, p: *const u8, len: u64, _z: u64| -> Result<()> {
            // SAFETY: p..p+len lies inside a validated range (for_each_run's
            // guarantee), mapped for the process lifetime and not written
            // while the VM is paused (caller contract).
            let s = unsafe { std::slice::from_raw_parts(p, len as usize) };
            out.write(s, fo)?;
            written += len;
            Ok(())
        };
        // SAFETY: prepare() checked page alignment and lengths; the memory is
        // mapped for the process lifetime and, the VM being paused, unchanging.
        unsafe { for_each_run(r, 1 << 20, &mut zero, write_run) }?;
    }
    let times = Times {
        pause: start.elapsed(),
        ram: start.elapsed(),
        ..Times::default()
    };
    header.dev_crc = crc32fast::hash(device_state);
    match out {
        Out::File(tmp) => tmp.finish(&header, device_state, || false)?,
        Out::Sink(sink) => {
            let summary = summary(&header, written, zero, times);
            sink.commit(&header, device_state, &summary, || false)?;
        }
    }
    let mut s = stats(start, &header, written, zero, times);
    // The guest was paused throughout.
    s.pause_time = s.total_time;
    Ok(s)
}
