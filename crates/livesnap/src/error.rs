//! Typed errors of the snapshot engine.

use std::io;
use std::path::PathBuf;

/// Every failure the snapshot engine reports.
#[derive(Debug, thiserror::Error)]
pub enum SnapError {
    /// An I/O operation failed; `context` says which one.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The underlying OS error.
        #[source]
        source: io::Error,
    },
    /// The destination directory does not exist or a file cannot be created in it.
    #[error("cannot create snapshot file in {dir}: {source}")]
    DestDir {
        /// The directory that was tried.
        dir: PathBuf,
        /// The underlying OS error.
        #[source]
        source: io::Error,
    },
    /// A write-protect capture's destination took no data for so long that
    /// the guest, waiting for a copy buffer, would have stalled longer than
    /// allowed: the capture is abandoned and the guest runs on.
    #[error("the destination took no data for {} ms while the guest waited to write (copy buffers full): snapshot abandoned, the guest runs on", .0.as_millis())]
    DestinationStalled(std::time::Duration),
    /// The caller passed unusable RAM ranges or paths.
    #[error("invalid capture input: {0}")]
    InvalidInput(String),
    /// The file is shorter than its header says (or shorter than a header).
    #[error("snapshot image is truncated: expected {expected} bytes, file has {actual}")]
    Truncated {
        /// Size the header (or the format) requires.
        expected: u64,
        /// Real size of the file.
        actual: u64,
    },
    /// The file is longer than its header says.
    #[error("snapshot image has trailing data: expected {expected} bytes, file has {actual}")]
    TrailingData {
        /// Size the header requires.
        expected: u64,
        /// Real size of the file.
        actual: u64,
    },
    /// The parent of an incremental image cannot be found.
    #[error("the parent image {path} of this incremental snapshot is missing: {source}")]
    ParentMissing {
        /// Where it was looked for.
        path: PathBuf,
        /// Why it could not be opened.
        #[source]
        source: Box<SnapError>,
    },
    /// The parent of an incremental image is not the one it was taken against.
    #[error("the parent image {path} changed since this incremental snapshot was taken (it is {found}, the snapshot was taken against {expected})")]
    ParentChanged {
        /// The parent file.
        path: PathBuf,
        /// Identity recorded in the child.
        expected: String,
        /// Identity of the file found.
        found: String,
    },
    /// A chain of incremental images that comes back to an image already in
    /// it (crafted, or files swapped): it would never reach a full image.
    #[error("incremental snapshot chain loops: {} is an image already in the chain", .0.display())]
    ChainLoop(PathBuf),
    /// A chain of incremental images longer than the format allows.
    #[error("incremental snapshot chain longer than {0} images")]
    ChainTooLong(usize),
    /// The file does not start with the snapvmm magic: not a snapshot image.
    #[error("not a snapvmm snapshot image (bad magic)")]
    BadMagic,
    /// The image was written by an incompatible format version.
    #[error("unsupported snapshot format version {found} (supported: {supported})")]
    UnsupportedVersion {
        /// Version stored in the file.
        found: u32,
        /// Version this build reads.
        supported: u32,
    },
    /// The image uses a page size this build does not handle.
    #[error("unsupported page size {0}")]
    UnsupportedPageSize(u32),
    /// The header checksum does not match: the header is corrupted.
    #[error(
        "snapshot header checksum mismatch (stored {stored:#010x}, computed {computed:#010x})"
    )]
    HeaderChecksum {
        /// Checksum stored in the file.
        stored: u32,
        /// Checksum of the bytes read.
        computed: u32,
    },
    /// The device-state checksum does not match: the device state is corrupted.
    #[error(
        "snapshot device-state checksum mismatch (stored {stored:#010x}, computed {computed:#010x})"
    )]
    DeviceStateChecksum {
        /// Checksum stored in the header.
        stored: u32,
        /// Checksum of the bytes read.
        computed: u32,
    },
    /// The device-state section is larger than the engine accepts.
    #[error("device state of {len} bytes exceeds the limit of {max} bytes")]
    DeviceStateTooLarge {
        /// Length stored in the header (or passed by the caller).
        len: u64,
        /// The cap ([`crate::MAX_DEVICE_STATE`]).
        max: u64,
    },
    /// The header is well-formed but describes an impossible layout.
    #[error("invalid snapshot layout: {0}")]
    InvalidLayout(String),
    /// The capture child process failed (exited non-zero, was killed, or broke the protocol).
    #[error("capture child failed: {0}")]
    ChildFailed(String),
    /// The capture was cancelled by the caller.
    #[error("capture cancelled")]
    Cancelled,
    /// What was read is not a snapvmm snapshot stream (its first bytes).
    #[error("not a snapvmm snapshot stream (bad magic)")]
    NotAStream,
    /// A snapshot stream is corrupt, ends early or was
    /// abandoned by its sender ([`crate::format::stream`]).
    #[error("snapshot stream: {0}")]
    Stream(String),
}

impl SnapError {
    /// Wrap an [`io::Error`] with a context message.
    pub(crate) fn io(context: impl Into<String>, source: io::Error) -> Self {
        SnapError::Io {
            context: context.into(),
            source,
        }
    }

    /// The raw OS error number, if this error carries one.
    pub fn raw_os_error(&self) -> Option<i32> {
        match self {
            SnapError::Io { source, .. } | SnapError::DestDir { source, .. } => {
                source.raw_os_error()
            }
            _ => None,
        }
    }
}

/// Result alias of the crate.
pub type Result<T, E = SnapError> = std::result::Result<T, E>;
