//! `livesnap`: the snapshot engine of snapvmm.
//!
//! It sees guest RAM only as host `(ptr, len)` ranges with their
//! guest-physical address ([`RamRange`]), and device state only as opaque
//! bytes; it knows nothing of KVM.
//!
//! # What it does
//! * **Captures**, one entry point each, the destination a parameter:
//!   - the write-protect capture ([`wp`], the default; no fork): RAM
//!     write-protected through a userfaultfd, 2 MiB chunks copied by a fault
//!     handler into a bounded pool of [`buf::AlignedBuf`]s while writers
//!     save the rest; every fault's wait measured ([`waits`]); a destination
//!     that stops reading abandons the capture, never stops the guest;
//!     incremental against a parent image ([`wp::WpOptions`]);
//!   - the fork capture ([`prepare_fork_capture`] then
//!     [`PreparedCapture::start`]): `start` only `fork()`s and spawns the
//!     writer; the child streams its copy-on-write view of RAM into a pipe
//!     with `vmsplice(2)`, a thread `splice(2)`s it into the file;
//!   - stop-and-copy ([`capture_stopped`]), the VM paused throughout.
//!
//!   A live capture writes to a [`Destination`], a stop-and-copy to a
//!   [`StoppedTo`]: a file or a [`Sink`] (e.g. the vmstate area of a qcow2
//!   disk, or a [`stream`]), which gets the very same image bytes.
//! * **The format**: [`Image`], the validating reader (`FORMAT.md`), from a
//!   file ([`Image::open`], regular files only: [`open_regular`]) or any
//!   [`Source`]; [`chain`]s of incremental images, read and squashed; the
//!   [`stream`] form for pipes and sockets.
//! * **Restore**: [`fill`] fills fresh anonymous memory on demand
//!   (userfaultfd missing mode) and in the background, from any
//!   [`PageSource`] (an image, a chain, a live migration's source).
//! * **Live migration**: a [`precopy`] pass with the guest running, then
//!   [`postcopy`]: the source sends the state and serves the target's
//!   faults while it pushes the rest.
//!
//! # Layers
//! Each folder imports only from those below it, and no two files import
//! each other:
//!
//! 1. `kernel/`: userfaultfd ([`uffd`]), fork, pipes and splice, page
//!    scanning, aligned buffers ([`buf`]), the page size, the lock helper;
//! 2. `ram/`: [`RamRange`], the one [`CHUNK`] size, the one claim state
//!    machine of chunks, fault-wait figures ([`waits`]);
//! 3. `format/`: image, source, sink, temporary image files, chains, every
//!    record kind, the stream, the live-migration wire;
//! 4. `capture/`: the runtime every capture shares, stop-and-copy, fork,
//!    the write-protect engine and capture, the incremental plan;
//! 5. `restore/`: the fill;
//! 6. `migrate/`: pre-copy and post-copy.

mod capture;
mod error;
mod format;
mod kernel;
mod migrate;
mod ram;
mod restore;

pub use capture::fork::{prepare_fork_capture, start_fork_capture, ForkOptions, PreparedCapture};
pub use capture::runtime::{
    Capture, CaptureStats, CaptureStatus, DoneCallback, Progress, StateSender,
};
pub use capture::stopped::{capture_stopped, StoppedTo};
pub use capture::wp;
pub use error::{Result, SnapError};
pub use format::image::{
    open_regular, Image, ImageId, ImageRange, SourceImage, FORMAT_VERSION, HEADER_SIZE, HUGE_ALIGN,
    MAGIC, MAX_DEVICE_STATE, MAX_RANGES, PAGE_SIZE,
};
pub use format::sink::{Destination, ImageSummary, Interrupter, Sink};
pub use format::source::{ImageBacking, PageSource, Source};
pub use format::{chain, stream};
pub use kernel::{buf, uffd};
pub use migrate::{postcopy, precopy};
pub use ram::{waits, RamRange, CHUNK};
pub use restore::fill;
