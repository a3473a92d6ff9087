//! Records: the framing every stream carries after its header (a 24-byte
//! head — kind, payload length, offset, the payload's CRC-32 and the head's
//! own — then the payload), and every record kind in one place: those of a
//! snapshot stream (1–3) and those of a live migration's wire (4 and up).
//! `FORMAT.md` describes each.

use std::io::{self, Read};

use crate::error::{Result, SnapError};

/// A snapshot stream: RAM or tail bytes at an image offset.
pub(crate) const KIND_DATA: u32 = 1;
/// The image is complete (a stream's last record).
pub(crate) const KIND_END: u32 = 2;
/// The writer gave up; the payload says why.
pub(crate) const KIND_ABORT: u32 = 3;
pub(crate) const RECORD_HEAD: usize = 24;

// A live migration's wire (`crate::format::wire`).
pub(crate) const KIND_STATE: u32 = 4;
pub(crate) const KIND_CHUNK: u32 = 5;
pub(crate) const KIND_REQ: u32 = 6;
pub(crate) const KIND_DONE: u32 = 7;
pub(crate) const KIND_RUNNING: u32 = 8;
pub(crate) const KIND_SWITCH: u32 = 9;
pub(crate) const KIND_NEED: u32 = 10;
pub(crate) const KIND_RESUME: u32 = 11;
pub(crate) const KIND_PAGE: u32 = 12;
pub(crate) const KIND_STALE: u32 = 13;
/// Source → target, the answer to RUNNING: the guest is the target's now.
pub(crate) const KIND_GO: u32 = 14;
/// Target → source (header flag `pages`): one 4 KiB page a thread waits on,
/// by image offset; the source sends it as PAGE at once, then its chunk.
pub(crate) const KIND_REQ_PAGE: u32 = 15;
/// Source → target (header flag `pieces`): part of a chunk, offset = chunk
/// number; payload = first page (u32), page count (u32), a bitmap of which
/// of those pages follow (the others are zero), the non-zero pages. A
/// chunk's pieces come in order and together cover it; pieces of at most
/// two chunks are under way at once (one the target asked for, whose pieces
/// overtake those of the one being pushed).
pub(crate) const KIND_PIECE: u32 = 16;
/// Target → source (header flag `pieces`): offset = bytes of PIECE records
/// (heads included) the target has taken in on this connection so far. The
/// source pushes only so far ahead of it: what waits in front of a page
/// asked for — in socket buffers, relays, anywhere on the way — stays small.
pub(crate) const KIND_CONSUMED: u32 = 17;

pub(crate) fn record_head(kind: u32, offset: u64, data: &[u8]) -> [u8; RECORD_HEAD] {
    record_head_crc(kind, offset, data.len(), crc32fast::hash(data))
}

/// A record header for a payload of `len` bytes whose CRC-32 is `crc`.
pub(crate) fn record_head_crc(kind: u32, offset: u64, len: usize, crc: u32) -> [u8; RECORD_HEAD] {
    let mut h = [0u8; RECORD_HEAD];
    h[0..4].copy_from_slice(&kind.to_le_bytes());
    h[4..8].copy_from_slice(&(len as u32).to_le_bytes());
    h[8..16].copy_from_slice(&offset.to_le_bytes());
    h[16..20].copy_from_slice(&crc.to_le_bytes());
    let c = crc32fast::hash(&h[..20]);
    h[20..24].copy_from_slice(&c.to_le_bytes());
    h
}

/// Reads one record: kind, offset and payload (at most `max` bytes),
/// checksums checked. `Ok(None)` at a clean end of input before a record.
pub(crate) fn read_record(r: &mut impl Read, max: usize) -> Result<Option<(u32, u64, Vec<u8>)>> {
    let mut head = [0u8; RECORD_HEAD];
    let mut got = 0;
    while got < RECORD_HEAD {
        match r.read(&mut head[got..]) {
            Ok(0) if got == 0 => return Ok(None),
            Ok(0) => return Err(corrupt("it ends early (in a record header): truncated")),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(SnapError::io("read stream", e)),
        }
    }
    if crc32fast::hash(&head[..20]) != get32(&head, 20) {
        return Err(corrupt("a record header is corrupt (checksum mismatch)"));
    }
    let (kind, len, off, crc) = (
        get32(&head, 0),
        get32(&head, 4) as usize,
        get64(&head, 8),
        get32(&head, 16),
    );
    if len > max {
        return Err(corrupt(format!(
            "a record of kind {kind} is {len} bytes long"
        )));
    }
    let mut data = vec![0u8; len];
    fill(r, &mut data, "a record")?;
    if crc32fast::hash(&data) != crc {
        return Err(corrupt(format!(
            "a record of kind {kind} is corrupt (checksum mismatch)"
        )));
    }
    Ok(Some((kind, off, data)))
}

pub(crate) fn corrupt(why: impl Into<String>) -> SnapError {
    SnapError::Stream(why.into())
}

/// `read_exact` that names what was cut short.
pub(crate) fn fill(r: &mut impl Read, buf: &mut [u8], what: &str) -> Result<()> {
    r.read_exact(buf).map_err(|e| {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            corrupt(format!("it ends early (in {what}): truncated"))
        } else {
            SnapError::io(format!("read snapshot stream ({what})"), e)
        }
    })
}

pub(crate) fn get32(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes(b[o..o + 4].try_into().expect("4 bytes"))
}

pub(crate) fn get64(b: &[u8], o: usize) -> u64 {
    u64::from_le_bytes(b[o..o + 8].try_into().expect("8 bytes"))
}
