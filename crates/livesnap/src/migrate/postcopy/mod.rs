//! Live migration by post-copy, over one connected socket.
//!
//! The **source** has paused its guest for good and saved its device state.
//! [`PostcopySender`] sends a live stream header, the device state and a
//! switch record, then pushes RAM 2 MiB chunk by chunk in order, putting any
//! chunk the target asks for first and going on in order from there. It never writes RAM, and keeps all of it
//! until the target says it has everything.
//!
//! The **target** reads the header and state ([`receive_switch`]), builds
//! its VM with fresh anonymous RAM, lets [`crate::restore::fill`] fill it from
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
//! non-zero pages), PIECE (with header flag `pieces`: after the switch every
//! chunk goes as pieces of 128 KiB, so a PAGE waits behind one piece, not a
//! chunk), END, RESUME, GO (with header flag `handover`), PAGE
//! (after the switch, with header flag `pages`: the page a REQ_PAGE asked
//! for); target → source RUNNING, REQ_PAGE (image offset of a page), REQ (offset =
//! chunk number), NEED (payload = chunk bitmap), CONSUMED (with `pieces`: how
//! much of the pieces the target took in), DONE.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::error::{Result, SnapError};
use crate::format::image::{chunk_at, random_id, ImageRange, MAX_DEVICE_STATE, PAGE_SIZE};
use crate::format::record::*;
use crate::format::source::PageSource;
use crate::format::stream::{
    encode_stream_header, StreamLayout, StreamReader, FLAG_HANDOVER, FLAG_LIVE, FLAG_PAGES,
    FLAG_PIECES, FLAG_RESUME, FLAG_ROTATED, MAX_RECORD,
};
use crate::format::wire::*;
use crate::kernel::lock;
use crate::RamRange;
use crate::CHUNK;

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

mod pieces;
mod source;
mod target;

#[cfg(test)]
use source::MIN_AHEAD;
pub use source::{PostcopySender, SendCounters, SourceEvent};
pub use target::{
    receive_switch, receive_switch_from, PrecopyFigures, RecvFigures, RemotePages, Switch,
    TargetEvent, TargetEvents,
};

#[cfg(test)]
mod tests {
    use super::pieces::Partial;
    use super::*;
    use std::io::Write;
    use std::time::Duration;

    /// A record as it comes off the wire: (kind, offset, payload).
    fn wire(rec: Vec<u8>) -> (u32, u64, Vec<u8>) {
        read_record(&mut &rec[..], 4 << 20).unwrap().unwrap()
    }

    fn piece(k: usize, mem: &[u8], first: usize, count: usize) -> Vec<u8> {
        let mut prefix = (first as u32).to_le_bytes().to_vec();
        prefix.extend_from_slice(&(count as u32).to_le_bytes());
        let p = PAGE_SIZE as usize;
        let mut out = Vec::new();
        write_pages(
            &mut out,
            KIND_PIECE,
            k,
            &prefix,
            count.div_ceil(8),
            &mem[first * p..(first + count) * p],
        )
        .unwrap();
        let (kind, off, data) = wire(out);
        assert_eq!((kind, off), (KIND_PIECE, k as u64));
        data
    }

    /// Test RAM whose every page is non-zero.
    fn dense(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i / 4096 % 251) as u8 + 1).collect()
    }

    /// A sender of `mem` (at guest-physical 0) over one end of a socket
    /// pair; the test is the target on the returned end. Its events go to
    /// the returned channel.
    ///
    /// # Safety
    /// `mem` must outlive the sender and not be written while it lives.
    unsafe fn sender_over(
        mem: &[u8],
    ) -> (
        PostcopySender,
        std::os::unix::net::UnixStream,
        std::sync::mpsc::Receiver<SourceEvent>,
    ) {
        let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let tx = Mutex::new(tx);
        // SAFETY: the caller keeps `mem` mapped and unwritten while the
        // sender lives (this function's contract).
        let sender = unsafe {
            PostcopySender::start(
                a.into(),
                &[RamRange::new(0, mem.as_ptr(), mem.len() as u64)],
                b"state".to_vec(),
                &[],
                Box::new(move |e| {
                    let _ = lock(&tx).send(e);
                }),
            )
        }
        .unwrap();
        (sender, b, rx)
    }

    /// Two chunks of RAM, the second with every third page non-zero.
    fn ram() -> (Vec<ImageRange>, Vec<u8>) {
        let layout = vec![ImageRange {
            gpa: 0,
            len: 2 * CHUNK,
            file_offset: 4096,
        }];
        let mut mem = vec![0u8; CHUNK as usize];
        for (i, page) in mem.chunks_mut(PAGE_SIZE as usize).enumerate() {
            if i % 3 == 0 {
                page.fill((i % 250) as u8 + 1);
            }
        }
        (layout, mem)
    }

    #[test]
    fn pieces_in_order_make_the_chunk_record_of_the_same_memory() {
        let (layout, mem) = ram();
        let mut whole = Vec::new();
        write_chunk(&mut whole, 1, &mem).unwrap();
        let (_, _, want) = wire(whole);
        let mut p = Partial::default();
        let mut got = None;
        for first in (0..CHUNK_PAGES).step_by(PIECE_PAGES) {
            assert!(got.is_none(), "complete before its last piece");
            got = p
                .add(&layout, 1, &piece(1, &mem, first, PIECE_PAGES))
                .unwrap();
        }
        assert_eq!(got, Some((1, want)));
        // The next chunk starts afresh.
        let zero = vec![0u8; CHUNK as usize];
        assert_eq!(p.add(&layout, 0, &piece(0, &zero, 0, 8)).unwrap(), None);
    }

    /// The source as a test target sees it: after the switch every chunk
    /// comes as pieces, pushed no further ahead of what the target says it
    /// took in than MIN_AHEAD (the limit before the path is measured); a page asked for while chunks are being
    /// pushed comes after at most that and the piece being written — never
    /// behind a whole chunk.
    #[test]
    fn a_page_asked_for_waits_behind_one_piece_not_a_chunk() {
        let mem = dense(32 << 20);
        // SAFETY: `mem` outlives the sender (dropped first, below) and is
        // not written meanwhile.
        let (sender, b, _events) = unsafe { sender_over(&mem) };
        let mut w = b.try_clone().unwrap();
        let (reader, layout) = crate::format::stream::StreamReader::start(b).unwrap();
        assert!(layout.live);
        let mut r = reader.into_buffered();
        let mut next = || read_record(&mut r, 4 << 20).ok().flatten();
        while next().unwrap().0 != KIND_SWITCH {}
        send(&mut w, KIND_RUNNING, 0, &[]).unwrap();
        assert_eq!(next().unwrap().0, KIND_GO);
        // A piece on the wire: 32 pages (128 KiB) and their heads.
        let piece = 8 + 4 + 32 * 4096 + 24;
        // Until the target says it took some in, the source pushes no
        // further than MIN_AHEAD (and the piece under way).
        w.set_read_timeout(Some(Duration::from_millis(500)))
            .unwrap();
        let mut pushed = 0usize;
        while let Some((kind, _, data)) = next() {
            assert_eq!(kind, KIND_PIECE);
            pushed += data.len() + 24;
        }
        assert!(
            pushed > 0 && pushed <= MIN_AHEAD as usize + piece,
            "{pushed} bytes pushed without a word from the target"
        );
        w.set_read_timeout(None).unwrap();
        // Taken in: the push goes on. Ask for a page of the last chunk.
        send(&mut w, KIND_CONSUMED, pushed as u64, &[]).unwrap();
        let (kind, _, _) = next().unwrap();
        assert_eq!(kind, KIND_PIECE);
        let page = layout.ranges[0].file_offset + 15 * CHUNK + 7 * PAGE_SIZE;
        send(&mut w, KIND_REQ_PAGE, page, &[]).unwrap();
        let mut behind = 0usize;
        loop {
            let (kind, off, data) = next().unwrap();
            assert_ne!(kind, KIND_CHUNK, "chunks go as pieces after the switch");
            if kind == KIND_PAGE && off == page {
                assert_eq!(data, mem[(15 * CHUNK + 7 * PAGE_SIZE) as usize..][..4096]);
                break;
            }
            behind += data.len() + 24;
        }
        assert!(
            behind <= MIN_AHEAD as usize + 2 * piece,
            "the page came after {behind} bytes of pushed pieces"
        );
        drop(sender);
    }

    /// On a resumed connection the push may have begun a chunk before the
    /// target's NEED (which lists it: it is not whole there) and REQ for it
    /// came: the chunk goes on where it is, it does not start again in the
    /// middle of itself (the target would refuse that piece and close).
    #[test]
    fn a_chunk_under_way_when_need_comes_goes_on_where_it_is() {
        let len = 8 << 20;
        let mem = dense(len);
        // SAFETY: `mem` outlives the sender (dropped first, below) and is
        // not written meanwhile.
        let (sender, b, rx) = unsafe { sender_over(&mem) };
        // First connection: the switch, then cut.
        let mut w = b.try_clone().unwrap();
        let (reader, _) = crate::format::stream::StreamReader::start(b).unwrap();
        let mut r = reader.into_buffered();
        while read_record(&mut r, 4 << 20).unwrap().unwrap().0 != KIND_SWITCH {}
        send(&mut w, KIND_RUNNING, 0, &[]).unwrap();
        assert!(matches!(rx.recv().unwrap(), SourceEvent::Switched));
        assert!(sender.break_connection());
        assert!(matches!(rx.recv().unwrap(), SourceEvent::Paused(_)));
        drop((r, w));
        // Second connection: take the first piece of the push, then say
        // every chunk is lacking and ask for that very one.
        let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        sender.resume(a.into()).unwrap();
        let mut w = b.try_clone().unwrap();
        let (reader, _) = crate::format::stream::StreamReader::start(b).unwrap();
        let mut r = reader.into_buffered();
        let mut next = || read_record(&mut r, 4 << 20).unwrap().unwrap();
        assert_eq!(next().0, KIND_RESUME);
        // (GO comes again first if the broken connection never carried it.)
        let (k, d) = loop {
            let (kind, k, d) = next();
            if kind == KIND_PIECE {
                break (k, d);
            }
            assert_eq!(kind, KIND_GO);
        };
        assert_eq!(u32::from_le_bytes(d[..4].try_into().unwrap()), 0);
        let chunks = (len as u64 / CHUNK) as usize;
        send(&mut w, KIND_NEED, 0, &vec![0xff; chunks.div_ceil(8)]).unwrap();
        send(&mut w, KIND_REQ, k, &[]).unwrap();
        // Whatever else comes, chunk k's pieces go on in order to its end,
        // and the target can put it together.
        let mut partial = Partial::default();
        let layout = vec![ImageRange {
            gpa: 0,
            len: len as u64,
            file_offset: 4096,
        }];
        partial.add(&layout, k as usize, &d).unwrap();
        let mut consumed = (d.len() + 24) as u64;
        loop {
            let (kind, off, d) = next();
            if kind != KIND_PIECE {
                continue;
            }
            consumed += (d.len() + 24) as u64;
            send(&mut w, KIND_CONSUMED, consumed, &[]).unwrap();
            let done = partial
                .add(&layout, off as usize, &d)
                .unwrap_or_else(|e| panic!("chunk {off}: {e}"));
            if done.is_some_and(|(c, _)| c == k as usize) {
                break;
            }
        }
        drop(sender);
    }

    /// With stream flag `rotated` a chunk's pieces may begin at the piece of
    /// the page a thread waits on and wrap around: put together, they are
    /// the CHUNK record of the same memory. A piece that runs back past
    /// where the chunk began is refused.
    #[test]
    fn rotated_pieces_make_the_chunk_record_of_the_same_memory() {
        let (layout, mem) = ram();
        let mut whole = Vec::new();
        write_chunk(&mut whole, 1, &mem).unwrap();
        let (_, _, want) = wire(whole);
        let mut p = Partial::new(true);
        let order = (288..CHUNK_PAGES).chain(0..288).step_by(PIECE_PAGES);
        let mut got = None;
        for first in order {
            assert!(got.is_none(), "complete before its last piece");
            got = p
                .add(&layout, 1, &piece(1, &mem, first, PIECE_PAGES))
                .unwrap();
        }
        assert_eq!(got, Some((1, want)));
        // Wrapped, pages 256..288 may come, 256..320 not (288 is in).
        let mut p = Partial::new(true);
        for first in (288..CHUNK_PAGES).step_by(PIECE_PAGES) {
            assert_eq!(
                p.add(&layout, 1, &piece(1, &mem, first, PIECE_PAGES))
                    .unwrap(),
                None
            );
        }
        for first in (0..256).step_by(PIECE_PAGES) {
            assert_eq!(
                p.add(&layout, 1, &piece(1, &mem, first, PIECE_PAGES))
                    .unwrap(),
                None
            );
        }
        let e = p.add(&layout, 1, &piece(1, &mem, 256, 64)).unwrap_err();
        assert!(e.contains("out of order"), "{e}");
    }

    /// A page asked for mid-chunk: the source begins that chunk's pieces
    /// with the piece of the page, then wraps around to the pieces before.
    #[test]
    fn a_chunks_pieces_begin_with_the_page_asked_for() {
        let mem = dense(8 << 20);
        // SAFETY: `mem` outlives the sender (dropped first, below) and is
        // not written meanwhile.
        let (sender, b, _events) = unsafe { sender_over(&mem) };
        let mut w = b.try_clone().unwrap();
        let (reader, layout) = crate::format::stream::StreamReader::start(b).unwrap();
        assert!(layout.rotated);
        let mut r = reader.into_buffered();
        let mut next = || read_record(&mut r, 4 << 20).unwrap().unwrap();
        while next().0 != KIND_SWITCH {}
        // Chunk 3, page 300: before the guest runs, nothing is pushed.
        let page = layout.ranges[0].file_offset + 3 * CHUNK + 300 * PAGE_SIZE;
        send(&mut w, KIND_REQ_PAGE, page, &[]).unwrap();
        let (kind, off, _) = next();
        assert_eq!((kind, off), (KIND_PAGE, page));
        let mut firsts = Vec::new();
        let mut consumed = 0;
        while firsts.len() < CHUNK_PAGES / PIECE_PAGES {
            let (kind, k, d) = next();
            assert_eq!((kind, k), (KIND_PIECE, 3));
            consumed += d.len() as u64 + 24;
            send(&mut w, KIND_CONSUMED, consumed, &[]).unwrap();
            firsts.push(u32::from_le_bytes(d[..4].try_into().unwrap()) as usize);
        }
        let want: Vec<usize> = (288..CHUNK_PAGES)
            .chain(0..288)
            .step_by(PIECE_PAGES)
            .collect();
        assert_eq!(firsts, want);
        drop(sender);
    }

    /// The target side, from a source played by the test: the pieces of a
    /// chunk a thread asked a page of serve that thread's next pages
    /// before the rest of the chunk is here, without asking again; once the
    /// chunk is whole it reads as the source's memory.
    #[test]
    fn pieces_of_a_chunk_asked_for_serve_pages_before_it_is_whole() {
        let len = 4 * CHUNK as usize;
        let mem = dense(len);
        let layout = crate::format::image::ranges_of(&[(0, len as u64)]).unwrap();
        let image_len = layout[0].file_offset + layout[0].len;
        let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        let mut src = a.try_clone().unwrap();
        let flags = FLAG_LIVE | FLAG_HANDOVER | FLAG_PAGES | FLAG_PIECES | FLAG_ROTATED;
        src.write_all(&encode_stream_header(image_len, &layout, flags))
            .unwrap();
        let state = b"state".to_vec();
        send(&mut src, KIND_STATE, 0, &state).unwrap();
        let mut sw = [7u8; 16].to_vec();
        sw.extend_from_slice(&(state.len() as u64).to_le_bytes());
        sw.extend_from_slice(&crc32fast::hash(&state).to_le_bytes());
        send(&mut src, KIND_SWITCH, 0, &sw).unwrap();
        let switch = receive_switch(b.into()).unwrap();
        let pages = switch.pages.clone();
        let base = layout[0].file_offset + 2 * CHUNK;
        let at = |i: usize| base + (i as u64) * PAGE_SIZE;
        let mem_of = |i: usize| &mem[2 * CHUNK as usize + i * 4096..][..4096];
        // A thread waits on page 300 of chunk 2, then on the pages after it.
        let (tx, rx) = std::sync::mpsc::channel();
        let p2 = pages.clone();
        std::thread::spawn(move || {
            for i in 300..320u64 {
                let _ = tx.send(p2.page_first(base + i * PAGE_SIZE));
            }
        });
        // The target asks for page 300; the source answers with the piece
        // of that page, no PAGE.
        let mut r = std::io::BufReader::new(a);
        let (kind, off, _) = read_record(&mut r, 1 << 20).unwrap().unwrap();
        assert_eq!((kind, off), (KIND_REQ_PAGE, at(300)));
        let two = &mem[2 * CHUNK as usize..][..CHUNK as usize];
        send(&mut src, KIND_PIECE, 2, &piece(2, two, 288, PIECE_PAGES)).unwrap();
        // Page 300 and the next ones come from the piece: no other request
        // goes out (the source played here would never answer one).
        for i in 300..320 {
            let got = rx.recv_timeout(Duration::from_secs(5));
            let got = got.unwrap_or_else(|_| panic!("page {i} was not served from its piece"));
            assert_eq!(got.unwrap().unwrap(), mem_of(i), "page {i}");
        }
        assert_eq!(pages.figures().requests, 1);
        // The rest of the chunk, wrapping around: then it reads whole.
        for first in (320..CHUNK_PAGES).chain(0..288).step_by(PIECE_PAGES) {
            send(&mut src, KIND_PIECE, 2, &piece(2, two, first, PIECE_PAGES)).unwrap();
        }
        let mut whole = vec![0u8; CHUNK as usize];
        pages.read_at(&mut whole, base).unwrap();
        assert_eq!(whole, two);
        assert_eq!(pages.figures().requests, 1);
        drop(switch);
    }

    #[test]
    fn pieces_out_of_order_or_malformed_are_refused() {
        let (layout, mem) = ram();
        let refused = |p: &mut Partial, k: usize, d: &[u8]| {
            let e = p.add(&layout, k, d).unwrap_err();
            assert!(
                e.contains("malformed or out of order") || e.contains("not in guest RAM"),
                "{e}"
            );
        };
        // Not from the first page; past the chunk; a chunk that is not RAM.
        refused(&mut Partial::default(), 1, &piece(1, &mem, 32, 32));
        let mut past = piece(1, &mem, 0, 32);
        past[..4].copy_from_slice(&500u32.to_le_bytes());
        refused(&mut Partial::default(), 1, &past);
        refused(&mut Partial::default(), 2, &piece(1, &mem, 0, 32));
        // A second chunk may come between (one asked for), a third not; nor
        // the same page again before its chunk is whole.
        let layout3 = vec![ImageRange {
            gpa: 0,
            len: 3 * CHUNK,
            file_offset: 4096,
        }];
        let mut p = Partial::default();
        assert_eq!(p.add(&layout3, 1, &piece(1, &mem, 0, 32)).unwrap(), None);
        assert_eq!(p.add(&layout3, 0, &piece(0, &mem, 0, 32)).unwrap(), None);
        let e = p.add(&layout3, 2, &piece(2, &mem, 0, 32)).unwrap_err();
        assert!(e.contains("out of order"), "{e}");
        assert_eq!(p.add(&layout3, 1, &piece(1, &mem, 32, 32)).unwrap(), None);
        let mut p = Partial::default();
        p.add(&layout, 1, &piece(1, &mem, 0, 32)).unwrap();
        refused(&mut p, 1, &piece(1, &mem, 0, 32));
        // A bitmap that names more (or fewer) pages than follow, a bit past
        // the count, a piece shorter than its own header.
        let good = piece(1, &mem, 0, 32);
        let mut more = good.clone();
        more[9] |= 0x04; // page 10, a zero page
        refused(&mut Partial::default(), 1, &more);
        refused(&mut Partial::default(), 1, &good[..good.len() - 1]);
        let odd = piece(1, &mem, 0, 5);
        let mut beyond = odd.clone();
        beyond[8] |= 0x80;
        refused(&mut Partial::default(), 1, &beyond);
        refused(&mut Partial::default(), 1, &good[..6]);
    }
}
