//! `livesnap`: the snapshot engine of snapvmm.
//!
//! It sees guest RAM only as host `(ptr, len)` ranges with their
//! guest-physical address, and device state only as opaque bytes; it knows
//! nothing of KVM.
//!
//! * [`prepare_fork_capture`] then [`PreparedCapture::start`]: live capture.
//!   The caller prepares (temp file, pipe) while the guest runs, pauses the
//!   vCPUs, serializes device state, calls `start`, and resumes the vCPUs as
//!   soon as it returns: `start` only `fork()`s and spawns the writer. The
//!   child streams its copy-on-write view of RAM into the pipe with
//!   `vmsplice(2)`; a background thread `splice(2)`s it into the file.
//! * [`capture_stopped`]: stop-and-copy baseline, VM paused throughout.
//! * A live capture's [`Destination`] is a file or a [`Sink`] (e.g. the
//!   vmstate area of a qcow2 disk), which gets the very same image bytes;
//!   [`capture_stopped_to`] is the stop-and-copy capture into a sink.
//! * [`lazy::start_lazy_fill`]: restore into fresh anonymous memory, filled
//!   on demand (userfaultfd missing mode) and in the background.
//! * [`stream`]: the stream form of an image (front to back, for pipes
//!   and sockets): a [`Sink`] that writes it and a reader.
//! * [`Image`]: validating reader of the image format (see `FORMAT.md`),
//!   from a file ([`Image::open`], regular files only: [`open_regular`]) or
//!   any [`Source`] ([`Image::from_source`]).
//! * [`wp_capture`]: the default, write-protect capture (no fork): RAM
//!   write-protected through a userfaultfd, 2 MiB chunks copied by a fault
//!   handler into a bounded pool of [`chunkbuf::AlignedBuf`]s while writers
//!   save the rest; every fault's wait measured ([`waits`]); a destination
//!   that stops reading abandons the capture, never stops the guest.

mod capture;
pub mod chain;
pub mod chunkbuf;
mod error;
mod fork;
mod image;
pub mod lazy;
mod pages;
pub mod postcopy;
pub mod precopy;
mod runtime;
mod sink;
mod source;
pub mod stream;
pub mod uffd;
pub mod waits;
mod wire;
pub mod wp_capture;
mod wp_engine;
mod wp_options;

pub use capture::{
    capture_stopped, prepare_fork_capture, start_fork_capture, ForkOptions, PreparedCapture,
};
pub use error::{Result, SnapError};
pub use image::{
    open_regular, Image, ImageId, ImageRange, SourceImage, FORMAT_VERSION, HEADER_SIZE, HUGE_ALIGN,
    MAGIC, MAX_DEVICE_STATE, MAX_RANGES, PAGE_SIZE,
};
pub use runtime::{Capture, CaptureStats, CaptureStatus, DoneCallback, Progress, StateSender};
pub use sink::{capture_stopped_to, Destination, ImageSummary, Interrupter, Sink};
pub use source::{ImageBacking, Source};

/// The chunk: RAM is captured, protected, filled, compared for an
/// incremental image and sent in a live migration 2 MiB at a time, each
/// range cut from its start (its last chunk may be shorter). Part of the
/// image format (an incremental image's granularity): never change it.
pub const CHUNK: u64 = 2 << 20;

/// A range of guest RAM as the engine sees it: host memory plus its
/// guest-physical address.
///
/// `host` must be page-aligned, `gpa` and `len` multiples of [`PAGE_SIZE`],
/// and the memory must stay mapped and readable for the life of the process
/// (guest RAM of a VMM is).
///
/// For [`start_fork_capture`] the mapping must be **private** (`MAP_PRIVATE`,
/// anonymous or file-backed) and must not carry `MADV_DONTFORK`: only private
/// memory is copy-on-write across `fork()`. With `MAP_SHARED` memory (e.g. a
/// memfd shared with vhost-user) the child would see the guest's writes made
/// after resume and the image would not be a consistent snapshot; with
/// `MADV_DONTFORK` the child faults and the capture fails.
///
/// Constructing one is `unsafe` ([`RamRange::new`]): the engine's safe
/// functions read the memory it names, so the caller promises it stays
/// mapped as long as any capture made from it runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RamRange {
    /// Guest-physical address of the first byte.
    pub(crate) gpa: u64,
    /// Host address of the first byte.
    pub(crate) host: *const u8,
    /// Length in bytes.
    pub(crate) len: u64,
}

impl RamRange {
    /// Names `len` bytes of guest RAM at host address `host`, guest-physical `gpa`.
    /// Alignment is checked when a capture starts (an error, not undefined
    /// behaviour).
    ///
    /// # Safety
    /// The `len` bytes at `host` must be mapped and readable from the moment
    /// a capture is prepared from this range until it has ended (its
    /// `wait()` returned, or for [`capture_stopped`] the call returned) —
    /// for a VMM: guest RAM must not be unmapped (reset, snapshot load)
    /// while a capture of it runs.
    pub unsafe fn new(gpa: u64, host: *const u8, len: u64) -> RamRange {
        RamRange { gpa, host, len }
    }

    /// Guest-physical address of the first byte.
    pub fn gpa(&self) -> u64 {
        self.gpa
    }

    /// Host address of the first byte.
    pub fn host(&self) -> *const u8 {
        self.host
    }

    /// Length in bytes.
    #[allow(clippy::len_without_is_empty)]
    pub fn len(&self) -> u64 {
        self.len
    }
}

// SAFETY: a RamRange is only an address and a length; the memory it names is
// required (the contract of `RamRange::new`) to stay mapped while a capture
// uses it, and the engine only reads it, so moving the descriptor between
// threads is sound.
unsafe impl Send for RamRange {}
// SAFETY: as for Send: shared references only expose the plain fields.
unsafe impl Sync for RamRange {}
