//! What an [`Image`](crate::Image) reads from: a plain file, or any
//! positional byte store behind the [`Source`] trait (e.g. the vmstate area
//! of a qcow2 disk image).

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;

use crate::error::{Result, SnapError};

/// Where an image is read from when it is not a plain file.
///
/// The reader validates everything it reads ([`Image::from_source`](crate::Image::from_source)
/// applies exactly the checks of [`Image::open`](crate::Image::open)); a
/// source only has to return the bytes it holds.
pub trait Source: Send {
    /// Fills `buf` with the image bytes at `offset..offset + buf.len()`.
    /// The reader never asks for bytes past [`Source::len`]. Bytes that were
    /// never written (zero pages, padding) must read as zeros. A short read
    /// is an error.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;

    /// Length of the stored image in bytes (compared with the length the
    /// header declares: a shorter source is truncated, a longer one has
    /// trailing data).
    fn len(&self) -> u64;

    /// Whether the source holds no bytes at all.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// An image held in memory.
impl Source for Vec<u8> {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let src = usize::try_from(offset)
            .ok()
            .and_then(|o| self.get(o..)?.get(..buf.len()))
            .ok_or_else(|| io::Error::from(io::ErrorKind::UnexpectedEof))?;
        buf.copy_from_slice(src);
        Ok(())
    }

    fn len(&self) -> u64 {
        self.as_slice().len() as u64
    }
}

pub(crate) mod sealed {
    use super::*;

    /// The operations the image reader needs from its backing store.
    /// Sealed: implemented for [`File`] and `Box<dyn Source>` only.
    pub trait Backing {
        /// Real length of the store.
        fn byte_len(&self) -> Result<u64>;
        /// Reads up to `buf.len()` bytes at `off`, fewer only at the end.
        fn fetch_prefix(&self, buf: &mut [u8], off: u64) -> io::Result<usize>;
        /// Reads exactly `buf.len()` bytes at `off`.
        fn fetch_exact(&self, buf: &mut [u8], off: u64) -> io::Result<()>;
        /// The next extent `[data, hole)` of possibly non-zero bytes within
        /// `[pos, end)`, `pos <= data < hole <= end`; `None` if the rest of
        /// `[pos, end)` reads as zeros. Default: everything is data.
        fn data_extent(&self, pos: u64, end: u64) -> Option<(u64, u64)> {
            (pos < end).then_some((pos, end))
        }
    }
}

/// A store an [`Image`](crate::Image) can be read from: [`File`] (see
/// [`Image::open`](crate::Image::open)) or `Box<dyn Source>` (see
/// [`Image::from_source`](crate::Image::from_source)). Sealed.
pub trait ImageBacking: sealed::Backing {}

impl ImageBacking for File {}
impl ImageBacking for Box<dyn Source> {}

impl sealed::Backing for File {
    fn byte_len(&self) -> Result<u64> {
        Ok(self
            .metadata()
            .map_err(|e| SnapError::io("stat snapshot image", e))?
            .len())
    }

    fn fetch_prefix(&self, buf: &mut [u8], off: u64) -> io::Result<usize> {
        let mut n = 0;
        while n < buf.len() {
            match FileExt::read_at(self, &mut buf[n..], off + n as u64) {
                Ok(0) => break,
                Ok(k) => n += k,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(n)
    }

    fn fetch_exact(&self, buf: &mut [u8], off: u64) -> io::Result<()> {
        self.read_exact_at(buf, off)
    }

    fn data_extent(&self, pos: u64, end: u64) -> Option<(u64, u64)> {
        let data = seek(self, pos, libc::SEEK_DATA)
            .unwrap_or(end)
            .clamp(pos, end);
        if data >= end {
            return None;
        }
        let hole = seek(self, data, libc::SEEK_HOLE)
            .unwrap_or(end)
            .clamp(data + 1, end);
        Some((data, hole))
    }
}

impl sealed::Backing for Box<dyn Source> {
    fn byte_len(&self) -> Result<u64> {
        Ok(self.len())
    }

    fn fetch_prefix(&self, buf: &mut [u8], off: u64) -> io::Result<usize> {
        let avail = self.len().saturating_sub(off);
        let n = buf.len().min(usize::try_from(avail).unwrap_or(usize::MAX));
        match buf.get_mut(..n) {
            Some(b) if n > 0 => self.read_at(b, off).map(|()| n),
            _ => Ok(0),
        }
    }

    fn fetch_exact(&self, buf: &mut [u8], off: u64) -> io::Result<()> {
        let in_bounds = off
            .checked_add(buf.len() as u64)
            .is_some_and(|e| e <= self.len());
        if !in_bounds {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "read past the end of the snapshot source",
            ));
        }
        if buf.is_empty() {
            return Ok(());
        }
        self.read_at(buf, off)
    }
}

/// `lseek(SEEK_DATA/SEEK_HOLE)`; `None` means "no more data" (ENXIO) or unsupported.
fn seek(file: &File, off: u64, whence: libc::c_int) -> Option<u64> {
    // SAFETY: lseek on a valid open fd owned by `file`; only moves the file
    // position, which this crate never relies on (all I/O is positional).
    let r = unsafe { libc::lseek(file.as_raw_fd(), off as libc::off_t, whence) };
    if r < 0 {
        if whence == libc::SEEK_DATA
            && io::Error::last_os_error().raw_os_error() != Some(libc::ENXIO)
        {
            // SEEK_DATA unsupported: treat everything as data.
            return Some(off);
        }
        return None;
    }
    Some(r as u64)
}

/// Where the pages of a restore filled on demand come from
/// ([`crate::fill`]): an image file, a chain of images, or a live migration's
/// source.
pub trait PageSource: Send + Sync + 'static {
    /// Reads `buf.len()` bytes of the image at `offset` (holes read as zeros).
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// Whether the `len` bytes at `offset` are known to be zero without
    /// reading them (a hole of a sparse file). `false` when unknown.
    fn is_hole(&self, _offset: u64, _len: u64) -> bool {
        false
    }
    /// A thread touched the `len` bytes at `offset` and waits for them: a
    /// source that fetches from afar asks for them first. Called by the
    /// fault handler before it fills that chunk.
    fn want(&self, _offset: u64, _len: u64) {}
    /// The one 4 KiB page at `offset` a thread waits on, from a source that
    /// fetches from afar and can send a page ahead of its chunk (the rest of
    /// the chunk follows and is placed around it). `None`: fill the whole
    /// chunk now (the default; a remote source whose chunk is already here).
    fn page_first(&self, _offset: u64) -> Option<io::Result<Vec<u8>>> {
        None
    }
    /// Whether the chunk at `offset` is here (reading it waits for nothing).
    /// After a page came ahead, the fault handler fills the rest of a chunk
    /// that is here at once; one still on its way is left to the prefetch.
    fn arrived(&self, _offset: u64, _len: u64) -> bool {
        true
    }
    /// The fill is being dropped: calls waiting in this source must return
    /// (with an error) now; none come after.
    fn cancel(&self) {}
    /// Whether this source sends its chunks in an order of its own (a
    /// migration source pushing them): the prefetch then places them as
    /// they arrive ([`PageSource::next_arrived`]) instead of in RAM order.
    fn pushes(&self) -> bool {
        false
    }
    /// For a source that [`pushes`](PageSource::pushes): blocks until a chunk
    /// not handed out before is here and returns its offset; `None` once every
    /// chunk has been (or the source gave up).
    fn next_arrived(&self) -> Option<u64> {
        None
    }
}

impl PageSource for File {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.read_exact_at(buf, offset)
    }

    fn is_hole(&self, offset: u64, len: u64) -> bool {
        // SAFETY: lseek on a descriptor this File owns; no memory involved.
        let data = unsafe { libc::lseek(self.as_raw_fd(), offset as i64, libc::SEEK_DATA) };
        // ENXIO: no data at or after `offset`.
        if data < 0 {
            return io::Error::last_os_error().raw_os_error() == Some(libc::ENXIO);
        }
        data as u64 >= offset + len
    }
}
