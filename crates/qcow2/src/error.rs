//! Error type of the crate.

use std::io;

/// Result alias used throughout the crate.
pub type Result<T> = std::result::Result<T, Error>;

/// Everything that can go wrong while opening or using a qcow2 image.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An I/O operation on the image (or its backing file) failed.
    #[error("I/O error: {0}")]
    Io(#[from] io::Error),
    /// The file does not start with the qcow2 magic.
    #[error("not a qcow2 image: bad magic {0:#010x}")]
    BadMagic(u32),
    /// The header announces a version other than 2 or 3.
    #[error("unsupported qcow2 version {0}")]
    UnsupportedVersion(u32),
    /// A valid qcow2 feature that this library does not implement.
    #[error("unsupported: {0}")]
    Unsupported(String),
    /// The image is marked dirty (refcounts may be too high) and cannot be repaired here.
    #[error("image has the dirty bit set; repair it with `qemu-img check -r all` first")]
    Dirty,
    /// A structural inconsistency or an out-of-bounds field in the image.
    #[error("invalid or corrupt image: {0}")]
    Corrupt(String),
    /// A write was attempted on an image opened read-only.
    #[error("image is opened read-only")]
    ReadOnly,
    /// A guest access outside the virtual disk.
    #[error("access out of range: offset {offset} + length {len} exceeds disk size {size}")]
    OutOfRange {
        /// Start of the access.
        offset: u64,
        /// Length of the access.
        len: u64,
        /// Virtual disk size.
        size: u64,
    },
    /// A snapshot with this name already exists.
    #[error("snapshot tag {0:?} already exists")]
    TagExists(String),
    /// No snapshot with this name or id exists.
    #[error("snapshot {0:?} not found")]
    SnapshotNotFound(String),
    /// A caller-supplied argument is invalid.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// A refcount would exceed the maximum representable by the refcount width.
    #[error("refcount overflow for host cluster at offset {0:#x}")]
    RefcountOverflow(u64),
    /// An earlier failure in the middle of a metadata update left the in-memory
    /// state unreliable; reopen the image.
    #[error("image handle is poisoned by an earlier failed metadata update; reopen the image")]
    Poisoned,
    /// The backing file could not be opened.
    #[error("backing file {path:?}: {reason}")]
    Backing {
        /// Backing file name as recorded in the image.
        path: String,
        /// What went wrong.
        reason: String,
    },
}

/// Shorthand for building an [`Error::Corrupt`].
pub(crate) fn corrupt(msg: impl Into<String>) -> Error {
    Error::Corrupt(msg.into())
}
