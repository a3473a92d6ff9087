//! What a write-protect capture is given and what it counts
//! ([`crate::capture::wp`]).

use std::path::PathBuf;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use crate::ram::waits::FaultWaits;
use crate::DoneCallback;

/// Options of a write-protect capture.
pub struct WpOptions {
    /// Write only the chunks changed since this image, which must be the
    /// latest image this engine captured ([`crate::capture::wp_engine::WpEngine::base`]); the image
    /// records it as its parent (by path and identity).
    pub parent: Option<PathBuf>,
    /// Bytes of buffers the fault handler may hold (rounded down to whole
    /// chunks, at least one).
    pub pool_bytes: u64,
    /// The pool may grow up to this many bytes (never less than
    /// `pool_bytes`; the default, 0: no growth): during the capture a
    /// grower makes buffers ahead of the faults, so that a guest writing
    /// faster than the destination takes data runs at memory speed. Extra
    /// buffers are freed with the capture.
    pub pool_max_bytes: u64,
    /// The growth stops where it would leave the host less than this share
    /// of its memory available (`MemAvailable`), percent.
    pub pool_keep_free_percent: u8,
    /// A fault that waits this long for a buffer (the destination took no
    /// data meanwhile) abandons the capture and lets the guest run on.
    pub stall_limit: Duration,
    /// Called once when the capture ends, whatever the outcome.
    pub on_done: Option<DoneCallback>,
    /// Populate RAM before protecting it even with a userfaultfd that
    /// protects never-touched pages itself (for tests).
    pub always_populate: bool,
    /// Keep up to `pool_bytes` of buffers in the engine when the capture
    /// ends, for the next capture's faults (a fresh buffer costs 1–8 ms to
    /// map on a busy host: a wait the guest feels). `false` frees them,
    /// and any kept before.
    pub keep_pool: bool,
}

impl Default for WpOptions {
    fn default() -> Self {
        WpOptions {
            parent: None,
            pool_bytes: 64 << 20,
            pool_max_bytes: 0,
            pool_keep_free_percent: 15,
            stall_limit: Duration::from_millis(500),
            on_done: None,
            always_populate: false,
            keep_pool: true,
        }
    }
}

/// What the write-protect capture did (for `query-migrate`).
#[derive(Debug, Default)]
pub struct WpCounters {
    /// Write-protect faults taken.
    pub faults: AtomicU64,
    /// Chunks copied by the fault handler into a pool buffer.
    pub chunks_by_fault: AtomicU64,
    /// Chunks copied by the writer.
    pub chunks_by_writer: AtomicU64,
    /// Most pool buffers in use at once, in bytes.
    pub pool_high_water: AtomicU64,
    /// Chunks not written because they did not change since the parent.
    pub chunks_unchanged: AtomicU64,
    /// Buffers added to the pool beyond `pool_bytes` (see `pool_max_bytes`).
    pub pool_grown: AtomicU64,
    /// Buffers the capture began with, kept from the previous capture (see
    /// [`WpOptions::keep_pool`]).
    pub pool_kept: AtomicU64,
    /// RAM was written to the file with direct I/O.
    pub direct_io: std::sync::atomic::AtomicBool,
    /// How long each fault of the capture held its writer, by cause.
    pub waits: FaultWaits,
}
