//! RAM as the engine sees it, and the chunk it is cut into: the layer above
//! the kernel wrappers. Every capture, restore and migration works on these.

pub(crate) mod claims;
pub mod waits;

/// The chunk: RAM is captured, protected, filled, compared for an
/// incremental image and sent in a live migration 2 MiB at a time, each
/// range cut from its start (its last chunk may be shorter). Part of the
/// image format (an incremental image's granularity): never change it.
pub const CHUNK: u64 = 2 << 20;

/// A range of guest RAM as the engine sees it: host memory plus its
/// guest-physical address.
///
/// `host` must be page-aligned, `gpa` and `len` multiples of [`PAGE_SIZE`](crate::PAGE_SIZE),
/// and the memory must stay mapped and readable for the life of the process
/// (guest RAM of a VMM is).
///
/// For [`start_fork_capture`](crate::start_fork_capture) the mapping must be **private** (`MAP_PRIVATE`,
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
    /// `wait()` returned, or for [`capture_stopped`](crate::capture_stopped) the call returned) —
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
