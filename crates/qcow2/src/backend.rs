//! Byte-addressed storage underneath an image.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

/// Positional storage an image lives in.
///
/// Reads beyond the end of the storage must return zeros (like a sparse
/// file). Writes must be applied in the order issued; [`Backend::flush`]
/// makes everything written so far durable.
pub trait Backend: Send {
    /// Fill `buf` from `offset`; bytes past the end read as zero.
    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// Write all of `buf` at `offset`, extending the storage if needed.
    fn write_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// Make all previous writes durable.
    fn flush(&mut self) -> io::Result<()>;
    /// Current length in bytes.
    fn len(&mut self) -> io::Result<u64>;
    /// Whether the storage is empty.
    fn is_empty(&mut self) -> io::Result<bool> {
        Ok(self.len()? == 0)
    }
    /// Truncate or extend to `len` bytes.
    fn set_len(&mut self, len: u64) -> io::Result<()>;
    /// The file that holds the image, for a caller that reads the runs
    /// [`crate::Qcow2::extents`] names straight from it; `None` where there
    /// is no file (the caller then reads through [`crate::Qcow2::read_at`]).
    fn file(&self) -> Option<&File> {
        None
    }
    /// The bytes `offset..offset + len` are no longer needed: storage may
    /// release them (they then read as zeros). Default: keep them.
    fn discard(&mut self, offset: u64, len: u64) -> io::Result<()> {
        let _ = (offset, len);
        Ok(())
    }
}

/// [`Backend`] over a regular file (`pread`/`pwrite`/`fdatasync`).
#[derive(Debug)]
pub struct FileBackend {
    file: File,
}

impl FileBackend {
    /// Wrap an open file.
    pub fn new(file: File) -> Self {
        Self { file }
    }
}

impl Backend for FileBackend {
    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset
                .checked_add(done as u64)
                .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "offset overflow"))?;
            match self.file.read_at(&mut buf[done..], pos) {
                Ok(0) => {
                    buf[done..].fill(0);
                    return Ok(());
                }
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    fn write_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.file.write_all_at(buf, offset)
    }

    fn discard(&mut self, offset: u64, len: u64) -> io::Result<()> {
        use nix::fcntl::{fallocate, FallocateFlags};
        let (off, n) = match (i64::try_from(offset), i64::try_from(len)) {
            (Ok(o), Ok(n)) => (o, n),
            _ => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "range too large",
                ))
            }
        };
        let flags = FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE;
        match fallocate(std::os::fd::AsRawFd::as_raw_fd(&self.file), flags, off, n) {
            Ok(()) => Ok(()),
            // File systems without hole punching keep the bytes: still correct.
            Err(nix::errno::Errno::EOPNOTSUPP) => Ok(()),
            Err(e) => Err(io::Error::from(e)),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file.sync_data()
    }

    fn len(&mut self) -> io::Result<u64> {
        Ok(self.file.metadata()?.len())
    }

    fn set_len(&mut self, len: u64) -> io::Result<()> {
        self.file.set_len(len)
    }

    fn file(&self) -> Option<&File> {
        Some(&self.file)
    }
}

/// In-memory [`Backend`], handy for tests and tools (limited to 4 GiB).
#[derive(Debug, Default, Clone)]
pub struct MemBackend {
    /// The stored bytes.
    pub data: Vec<u8>,
}

impl MemBackend {
    /// Backend holding `data`.
    pub fn new(data: Vec<u8>) -> Self {
        Self { data }
    }
}

fn range(offset: u64, len: usize) -> io::Result<(usize, usize)> {
    let start = usize::try_from(offset)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "offset too large"))?;
    let end = start
        .checked_add(len)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "offset overflow"))?;
    Ok((start, end))
}

impl Backend for MemBackend {
    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let (start, end) = range(offset, buf.len())?;
        buf.fill(0);
        if start < self.data.len() {
            let avail = end.min(self.data.len());
            buf[..avail - start].copy_from_slice(&self.data[start..avail]);
        }
        Ok(())
    }

    fn write_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()> {
        let (start, end) = range(offset, buf.len())?;
        if end > (1usize << 32) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "in-memory image too large",
            ));
        }
        if self.data.len() < end {
            self.data.resize(end, 0);
        }
        self.data[start..end].copy_from_slice(buf);
        Ok(())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }

    fn len(&mut self) -> io::Result<u64> {
        Ok(self.data.len() as u64)
    }

    fn set_len(&mut self, len: u64) -> io::Result<()> {
        let (l, _) = range(len, 0)?;
        self.data.resize(l, 0);
        Ok(())
    }
}
