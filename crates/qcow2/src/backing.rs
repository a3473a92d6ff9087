//! Backing files (qcow2 or raw), opened read-only.

use std::fs::OpenOptions;
use std::path::{Path, PathBuf};

use crate::backend::{Backend, FileBackend};
use crate::error::{Error, Result};
use crate::header::MAGIC;
use crate::image::Qcow2;

/// Maximum length of a backing chain.
pub(crate) const MAX_BACKING_DEPTH: u32 = 16;

/// Format of a backing file.
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackingFormat {
    /// A qcow2 image.
    Qcow2,
    /// A raw image.
    Raw,
}

impl BackingFormat {
    /// Name as stored in the backing format header extension.
    pub fn as_str(self) -> &'static str {
        match self {
            BackingFormat::Qcow2 => "qcow2",
            BackingFormat::Raw => "raw",
        }
    }
}

/// An open backing file.
pub(crate) enum Backing {
    Qcow2(Box<Qcow2>),
    Raw { io: Box<dyn Backend>, len: u64 },
}

impl std::fmt::Debug for Backing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Backing::Qcow2(q) => f.debug_tuple("Qcow2").field(&q.size()).finish(),
            Backing::Raw { len, .. } => f.debug_struct("Raw").field("len", len).finish(),
        }
    }
}

impl Backing {
    /// Read guest data at `off`; anything past the backing file's end is zero.
    pub(crate) fn read(&mut self, buf: &mut [u8], off: u64) -> Result<()> {
        let len = match self {
            Backing::Qcow2(q) => q.size(),
            Backing::Raw { len, .. } => *len,
        };
        let avail = len.saturating_sub(off).min(buf.len() as u64) as usize;
        buf[avail..].fill(0);
        if avail == 0 {
            return Ok(());
        }
        match self {
            Backing::Qcow2(q) => q.read_at(&mut buf[..avail], off),
            Backing::Raw { io, .. } => Ok(io.read_at(&mut buf[..avail], off)?),
        }
    }
}

/// Resolve a backing file name relative to the directory of the image.
pub(crate) fn resolve(name: &str, dir: Option<&Path>) -> PathBuf {
    let p = Path::new(name);
    match dir {
        Some(d) if p.is_relative() => d.join(p),
        _ => p.to_path_buf(),
    }
}

/// Open a backing file read-only.
pub(crate) fn open(
    name: &str,
    format: Option<&str>,
    dir: Option<&Path>,
    depth: u32,
) -> Result<Backing> {
    let err = |reason: String| Error::Backing {
        path: name.to_string(),
        reason,
    };
    if depth >= MAX_BACKING_DEPTH {
        return Err(err(format!(
            "backing chain deeper than {MAX_BACKING_DEPTH}"
        )));
    }
    if name.starts_with("json:") {
        return Err(Error::Unsupported(format!(
            "backing file specification {name:?}"
        )));
    }
    let path = resolve(name, dir);
    let file = OpenOptions::new()
        .read(true)
        .open(&path)
        .map_err(|e| err(format!("cannot open {}: {e}", path.display())))?;
    let mut io: Box<dyn Backend> = Box::new(FileBackend::new(file));
    let fmt = match format {
        Some("qcow2") => BackingFormat::Qcow2,
        Some("raw") => BackingFormat::Raw,
        Some(other) => return Err(Error::Unsupported(format!("backing file format {other:?}"))),
        None => {
            let mut m = [0u8; 4];
            io.read_at(&mut m, 0)?;
            if u32::from_be_bytes(m) == MAGIC {
                BackingFormat::Qcow2
            } else {
                BackingFormat::Raw
            }
        }
    };
    match fmt {
        BackingFormat::Qcow2 => {
            let q = Qcow2::open_inner(io, false, path.parent(), depth + 1)
                .map_err(|e| err(format!("{e}")))?;
            Ok(Backing::Qcow2(Box::new(q)))
        }
        BackingFormat::Raw => {
            let len = io.len()?;
            Ok(Backing::Raw { io, len })
        }
    }
}
