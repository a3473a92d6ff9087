//! RAM as the engine sees it, and the chunk it is cut into: the layer above
//! the kernel wrappers. Every capture, restore and migration works on these.

pub(crate) mod claims;
pub mod waits;

/// The chunk: RAM is captured, protected, filled, compared for an
/// incremental image and sent in a live migration 2 MiB at a time, each
/// range cut from its start (its last chunk may be shorter). Part of the
/// image format (an incremental image's granularity): never change it.
pub const CHUNK: u64 = 2 << 20;

/// One chunk of guest RAM: where it is in host memory and in the image, and
/// its number (an incremental image's chunk map counts the same way).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RamChunk {
    pub(crate) host: u64,
    pub(crate) len: u64,
    pub(crate) file_offset: u64,
    pub(crate) index: usize,
}

/// The one way RAM is cut into chunks: each range from its start, in range
/// order, numbered in that order; `file_offsets` says where each range
/// begins in the image.
pub(crate) fn chunks(
    ranges: &[RamRange],
    file_offsets: impl IntoIterator<Item = u64>,
) -> Vec<RamChunk> {
    let mut out = Vec::new();
    for (r, file_offset) in ranges.iter().zip(file_offsets) {
        let mut at = 0;
        while at < r.len {
            let len = (r.len - at).min(CHUNK);
            out.push(RamChunk {
                host: r.host as u64 + at,
                len,
                file_offset: file_offset + at,
                index: out.len(),
            });
            at += len;
        }
    }
    out
}

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_are_cut_from_their_start_and_numbered_in_order() {
        // SAFETY: the engine never reads these: only the addresses are cut.
        let ranges = unsafe {
            [
                RamRange::new(0, (4 * CHUNK) as *const u8, CHUNK + 4096),
                RamRange::new(1 << 32, (16 * CHUNK) as *const u8, 2 * CHUNK),
            ]
        };
        let c = chunks(&ranges, [4096, 4096 + 2 * CHUNK]);
        let got: Vec<_> = c
            .iter()
            .map(|c| (c.host, c.len, c.file_offset, c.index))
            .collect();
        assert_eq!(
            got,
            vec![
                (4 * CHUNK, CHUNK, 4096, 0),
                (5 * CHUNK, 4096, 4096 + CHUNK, 1),
                (16 * CHUNK, CHUNK, 4096 + 2 * CHUNK, 2),
                (17 * CHUNK, CHUNK, 4096 + 3 * CHUNK, 3),
            ]
        );
    }
}
