//! A self-contained qcow2 (version 2/3) disk image library with internal
//! snapshots and VM state, interoperable with `qemu-img`.
//!
//! See `README.md` in the crate directory for the design and the crash-safety
//! rules. In short:
//!
//! * guest writes allocate clusters with increment-then-flush-then-reference
//!   ordering, and release copied-on-write clusters only after the new
//!   reference is durable — a crash leaks clusters at worst;
//! * snapshot create/apply/delete and refcount-table growth write all new
//!   metadata (L1, L2 copies, snapshot table, refcount blocks and table) to
//!   unreferenced clusters and switch to it with a single header write — a
//!   crash leaves either the old or the new image, never a mix;
//! * live snapshots ([`Qcow2::freeze`], [`Qcow2::write_frozen_vmstate`],
//!   [`Qcow2::commit_frozen`] / [`Qcow2::abort_frozen`]) keep everything the
//!   pending snapshot holds counted but unreferenced (leaks at worst) until
//!   one header write publishes it;
//! * every on-disk field is validated before use; hostile images produce an
//!   [`Error`], never a panic or an unbounded allocation.
//!
//! ```no_run
//! use qcow2::{CreateOptions, Qcow2};
//! # fn main() -> qcow2::Result<()> {
//! let mut img = Qcow2::create("disk.qcow2".as_ref(), 1 << 30, CreateOptions::default())?;
//! img.write_at(b"hello", 4096)?;
//! img.write_vmstate(0, &[1u8; 1 << 20])?;
//! img.create_snapshot("snap1", 0, 1 << 20)?;
//! img.flush()?;
//! # Ok(()) }
//! ```

mod backend;
mod backing;
mod check;
mod error;
mod extent;
mod frozen;
mod header;
mod image;
mod refcount;
mod snapops;
mod snapshot;
mod table;

pub use backend::{Backend, FileBackend, MemBackend};
pub use backing::BackingFormat;
pub use check::CheckReport;
pub use error::{Error, Result};
pub use extent::Extent;
pub use frozen::Frozen;
pub use image::{CreateOptions, Qcow2};
pub use snapops::VmStateWriter;
pub use snapshot::SnapshotInfo;
