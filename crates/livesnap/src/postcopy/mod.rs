//! Live migration by post-copy, over one connected socket.
//!
//! The **source** has paused its guest for good and saved its device state.
//! [`PostcopySender`] sends a live stream header, the device state and a
//! switch record, then pushes RAM 2 MiB chunk by chunk in order, putting any
//! chunk the target asks for first and going on in order from there. It never writes RAM, and keeps all of it
//! until the target says it has everything.
//!
//! The **target** reads the header and state ([`receive_switch`]), builds
//! its VM with fresh anonymous RAM, lets [`crate::lazy`] fill it from
//! [`RemotePages`] (a [`PageSource`]: a faulting chunk is asked for at once,
//! the rest arrives in order), runs the guest and tells the source
//! ([`RemotePages::running`]), and runs it only once the source answers GO:
//! a RUNNING lost on the way (the source then gives its guest back) never
//! leaves a guest running on both sides. Once filled it says done
//! ([`RemotePages::done`]).
//!
//! A broken connection pauses both sides: the target's faulting threads
//! wait, the source keeps its RAM. A new connection ([`PostcopySender::resume`],
//! [`RemotePages::recover`]) carries on: the target sends which chunks it
//! still lacks, then asks again for those its threads wait on.
//!
//! Wire format (`FORMAT.md`, "Live migration"): the stream header with flag
//! `live` (plus `resume` on a new connection), then records as in the
//! stream form: source → target STATE (device state, in pieces), SWITCH,
//! CHUNK (offset = chunk number; payload = 64-byte page bitmap and the
//! non-zero pages), END, RESUME, GO (with header flag `handover`), PAGE
//! (after the switch, with header flag `pages`: the page a REQ_PAGE asked
//! for); target → source RUNNING, REQ_PAGE (image offset of a page), REQ (offset =
//! chunk number), NEED (payload = chunk bitmap), DONE.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::capture::lock;
use crate::error::{Result, SnapError};
use crate::image::{chunk_at, random_id, ranges_of, ImageRange, MAX_DEVICE_STATE, PAGE_SIZE};
use crate::lazy::PageSource;
use crate::precopy::{PrecopyDone, WriteLog};
use crate::stream::{
    encode_stream_header, read_record, record_head, record_head_crc, StreamLayout, StreamReader,
    FLAG_HANDOVER, FLAG_LIVE, FLAG_PAGES, FLAG_RESUME, KIND_END, MAX_RECORD,
};
use crate::RamRange;
use crate::CHUNK;

const KIND_STATE: u32 = 4;
const KIND_CHUNK: u32 = 5;
const KIND_REQ: u32 = 6;
const KIND_DONE: u32 = 7;
const KIND_RUNNING: u32 = 8;
const KIND_SWITCH: u32 = 9;
const KIND_NEED: u32 = 10;
const KIND_RESUME: u32 = 11;
const KIND_PAGE: u32 = 12;
const KIND_STALE: u32 = 13;
/// Source → target, the answer to RUNNING: the guest is the target's now.
const KIND_GO: u32 = 14;
/// Target → source (header flag `pages`): one 4 KiB page a thread waits on,
/// by image offset; the source sends it as PAGE at once, then its chunk.
const KIND_REQ_PAGE: u32 = 15;
/// Most pages sent with the device state.
pub const MAX_EARLY_PAGES: usize = 256;

/// Pages per chunk, and the bitmap that says which are sent.
const CHUNK_PAGES: usize = (CHUNK / PAGE_SIZE) as usize;
const BITMAP: usize = CHUNK_PAGES / 8;
/// Chunks the target holds received but not yet placed, at most.
const MAX_STAGED: u64 = 256 << 20;
/// How long the source waits for the target to run the guest.
pub const SWITCH_TIMEOUT: Duration = Duration::from_secs(60);

fn broken(why: impl Into<String>) -> SnapError {
    SnapError::Stream(why.into())
}

/// Two handles on one connected socket: reads and writes go on in
/// different threads; `shutdown` wakes both.
fn halves(sock: &OwnedFd) -> io::Result<(File, File)> {
    Ok((File::from(sock.try_clone()?), File::from(sock.try_clone()?)))
}

fn shutdown(f: &impl AsRawFd) {
    // SAFETY: shutdown on a descriptor the caller owns; no memory involved.
    unsafe { libc::shutdown(f.as_raw_fd(), libc::SHUT_RDWR) };
}

fn send(w: &mut impl Write, kind: u32, offset: u64, data: &[u8]) -> io::Result<()> {
    w.write_all(&record_head(kind, offset, data))?;
    w.write_all(data)?;
    w.flush()
}

/// Chunks (host address, length) in image order, the image layout and length.
pub(crate) type Chunks = (Vec<(u64, u64)>, Vec<ImageRange>, u64);

/// The chunks of `ranges`, and the image layout and length they make.
pub(crate) fn chunks_of(ranges: &[RamRange]) -> Result<Chunks> {
    let pairs: Vec<(u64, u64)> = ranges.iter().map(|r| (r.gpa(), r.len())).collect();
    let layout = ranges_of(&pairs)?;
    let mut chunks = Vec::new();
    for r in ranges {
        let mut o = 0;
        while o < r.len() {
            let len = (r.len() - o).min(CHUNK);
            chunks.push((r.host() as u64 + o, len));
            o += len;
        }
    }
    let image_len = layout.last().map_or(0, |r| r.file_offset + r.len);
    Ok((chunks, layout, image_len))
}

mod source;
mod target;

pub(crate) use source::write_chunk;
pub use source::{PostcopySender, SendCounters, SourceEvent};
pub use target::{
    receive_switch, receive_switch_from, PrecopyFigures, RecvFigures, RemotePages, Switch,
    TargetEvent, TargetEvents,
};
