//! The live-migration wire shared by the pre-copy pass ([`crate::migrate::precopy`])
//! and post-copy ([`crate::migrate::postcopy`]): the record kinds after the stream's
//! own (`crate::format::stream`: DATA, END, ABORT), how guest RAM is cut into the
//! chunks they carry, how a chunk or a piece of one is encoded, and what a
//! finished pass hands post-copy. Both import it; neither imports the other.
//! `FORMAT.md`, "Live migration", describes every record.

use std::io::{self, BufWriter, Write};
use std::os::fd::OwnedFd;
use std::sync::Arc;

use crate::error::Result;
use crate::format::image::{ranges_of, ImageRange, PAGE_SIZE};
use crate::format::record::*;
use crate::kernel::scan::is_zero;
use crate::RamRange;
use crate::CHUNK;

/// Pages per piece (128 KiB: a millisecond of a 1 Gbit/s link).
pub(crate) const PIECE_PAGES: usize = 32;
/// Most pages sent with the device state.
pub const MAX_EARLY_PAGES: usize = 256;

/// Pages per chunk, and the bitmap that says which are sent.
pub(crate) const CHUNK_PAGES: usize = (CHUNK / PAGE_SIZE) as usize;
pub(crate) const BITMAP: usize = CHUNK_PAGES / 8;
/// Which chunks of guest RAM were written since a mark.
pub trait WriteLog: Send + Sync {
    /// Whether the 2 MiB chunk holding host address `host` was written
    /// since the mark (must err towards true: a false answer for a written
    /// chunk leaves stale memory at the target).
    fn written(&self, host: u64) -> bool;
}

/// A finished pass, for [`crate::migrate::postcopy::PostcopySender::after_precopy`].
pub struct PrecopyDone {
    pub(crate) sock: OwnedFd,
    pub(crate) sent: Vec<bool>,
    pub(crate) log: Arc<dyn WriteLog>,
}

/// Chunks (host address, length) in image order, the image layout and length.
pub(crate) type Chunks = (Vec<(u64, u64)>, Vec<ImageRange>, u64);

/// The chunks of `ranges`, and the image layout and length they make.
pub(crate) fn chunks_of(ranges: &[RamRange]) -> Result<Chunks> {
    let pairs: Vec<(u64, u64)> = ranges.iter().map(|r| (r.gpa(), r.len())).collect();
    let layout = ranges_of(&pairs)?;
    let chunks = crate::ram::chunks(ranges, layout.iter().map(|r| r.file_offset))
        .into_iter()
        .map(|c| (c.host, c.len))
        .collect();
    let image_len = layout.last().map_or(0, |r| r.file_offset + r.len);
    Ok((chunks, layout, image_len))
}

/// Writes chunk `k` (its memory: `mem`, which nobody changes meanwhile) as
/// a CHUNK record; returns the bytes written and whether it was all zero.
pub(crate) fn write_chunk(f: impl Write, k: usize, mem: &[u8]) -> io::Result<(usize, bool)> {
    write_pages(f, KIND_CHUNK, k, &[], BITMAP, mem)
}

/// Writes a record of `kind` at `k`: `prefix`, a bitmap (`bitmap_len`
/// bytes) of `mem`'s non-zero pages, those pages. Returns the bytes
/// written and whether every page was zero.
pub(crate) fn write_pages(
    f: impl Write,
    kind: u32,
    k: usize,
    prefix: &[u8],
    bitmap_len: usize,
    mem: &[u8],
) -> io::Result<(usize, bool)> {
    let mut bitmap = vec![0u8; bitmap_len];
    let mut n = 0usize;
    for (i, page) in mem.chunks(PAGE_SIZE as usize).enumerate() {
        if !is_zero(page) {
            bitmap[i / 8] |= 1 << (i % 8);
            n += 1;
        }
    }
    let nonzero = |i: usize| bitmap[i / 8] & (1 << (i % 8)) != 0;
    let mut h = crc32fast::Hasher::new();
    h.update(prefix);
    h.update(&bitmap);
    for (i, page) in mem.chunks(PAGE_SIZE as usize).enumerate() {
        if nonzero(i) {
            h.update(page);
        }
    }
    let plen = prefix.len() + bitmap_len + n * PAGE_SIZE as usize;
    let mut w = BufWriter::with_capacity(256 << 10, f);
    w.write_all(&record_head_crc(kind, k as u64, plen, h.finalize()))?;
    w.write_all(prefix)?;
    w.write_all(&bitmap)?;
    for (i, page) in mem.chunks(PAGE_SIZE as usize).enumerate() {
        if nonzero(i) {
            w.write_all(page)?;
        }
    }
    w.flush()?;
    Ok((plen + 24, n == 0))
}
