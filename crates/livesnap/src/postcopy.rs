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
//! ([`RemotePages::running`]). Once filled it says done ([`RemotePages::done`]).
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
//! non-zero pages), END, RESUME; target → source RUNNING, REQ (offset =
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
use crate::image::{chunk_at, Header, ImageRange, INCR_CHUNK, MAX_DEVICE_STATE, PAGE_SIZE};
use crate::lazy::PageSource;
use crate::precopy::{PrecopyDone, WriteLog};
use crate::stream::{
    encode_stream_header, read_record, record_head, record_head_crc, StreamLayout, StreamReader,
    FLAG_LIVE, FLAG_RESUME, KIND_END, MAX_RECORD,
};
use crate::RamRange;

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
/// Most pages sent with the device state.
pub const MAX_EARLY_PAGES: usize = 256;

/// Pages per chunk, and the bitmap that says which are sent.
const CHUNK_PAGES: usize = (INCR_CHUNK / PAGE_SIZE) as usize;
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

fn layout_of(ranges: &[(u64, u64)]) -> Result<Vec<ImageRange>> {
    Ok(Header::layout(ranges, 0)?.ranges)
}

/// Chunks (host address, length) in image order, the image layout and length.
pub(crate) type Chunks = (Vec<(u64, u64)>, Vec<ImageRange>, u64);

/// The chunks of `ranges`, and the image layout and length they make.
pub(crate) fn chunks_of(ranges: &[RamRange]) -> Result<Chunks> {
    let pairs: Vec<(u64, u64)> = ranges.iter().map(|r| (r.gpa(), r.len())).collect();
    let layout = layout_of(&pairs)?;
    let mut chunks = Vec::new();
    for r in ranges {
        let mut o = 0;
        while o < r.len() {
            let len = (r.len() - o).min(INCR_CHUNK);
            chunks.push((r.host() as u64 + o, len));
            o += len;
        }
    }
    let image_len = layout.last().map_or(0, |r| r.file_offset + r.len);
    Ok((chunks, layout, image_len))
}

fn random_id() -> [u8; 16] {
    let mut id = [0u8; 16];
    // SAFETY: getrandom writes at most id.len() bytes into `id`.
    let n = unsafe { libc::getrandom(id.as_mut_ptr().cast(), id.len(), 0) };
    if n != id.len() as isize {
        let t = Instant::now().elapsed().as_nanos() ^ u128::from(std::process::id());
        id.copy_from_slice(&t.to_le_bytes());
    }
    id
}

// ---------------------------------------------------------------- source

/// What happens to a live migration, as the source sees it.
#[derive(Debug, Clone)]
pub enum SourceEvent {
    /// The target runs the guest: from now on it is the VM.
    Switched,
    /// The connection broke before the switch: the target never ran the
    /// guest; the source may run it again.
    Failed(String),
    /// The connection broke after the switch: the target waits for RAM;
    /// [`PostcopySender::resume`] carries on.
    Paused(String),
    /// The target has every page.
    Completed,
}

/// Figures of the source side.
#[derive(Debug, Default)]
pub struct SendCounters {
    /// Chunks sent in order.
    pub chunks_pushed: AtomicU64,
    /// Chunks sent first because the target asked for them.
    pub chunks_requested: AtomicU64,
    /// Requests received.
    pub requests: AtomicU64,
    /// Bytes written to the connection(s).
    pub bytes_sent: AtomicU64,
    /// Chunks that were all zero (sent as a bitmap alone).
    pub zero_chunks: AtomicU64,
    /// Connections used (1 + recoveries).
    pub connections: AtomicU64,
    /// After a pre-copy pass: chunks it sent that the guest wrote since
    /// (sent again).
    pub chunks_rewritten: AtomicU64,
}

struct SendState {
    sent: Vec<bool>,
    next: usize,
    urgent: VecDeque<usize>,
    /// The connection in use and its generation.
    conn: Option<(u64, OwnedFd)>,
    generation: u64,
    /// The head (state or resume record) of this generation still has to go.
    head_pending: bool,
    end_sent: bool,
    switched: bool,
    /// Completed, failed before the switch, or stopped.
    ended: bool,
}

struct SendShared {
    chunks: Vec<(u64, u64)>,
    layout: Vec<ImageRange>,
    image_len: u64,
    id: [u8; 16],
    state: Vec<u8>,
    /// Pages sent with the state: image offset and host address.
    early: Vec<(u64, u64)>,
    /// After a pre-copy pass (whose chunks went over this connection, after
    /// its stream header): the chunks the target must drop (a bitmap).
    stale: Option<Vec<u8>>,
    st: Mutex<SendState>,
    cv: Condvar,
    events: Box<dyn Fn(SourceEvent) + Send + Sync>,
    counters: Arc<SendCounters>,
}

/// The source side of a live migration (see the module documentation).
pub struct PostcopySender {
    sh: Arc<SendShared>,
    pusher: Option<std::thread::JoinHandle<()>>,
}

impl PostcopySender {
    /// Starts sending `ranges` (guest RAM, which nobody writes from now on:
    /// the guest is paused for good) and `device_state` over `sock`.
    /// `events` hears every [`SourceEvent`], from the migration's threads.
    ///
    /// # Safety
    /// The memory of `ranges` must stay mapped and unwritten until this
    /// sender is dropped.
    ///
    /// `early` names guest-physical pages the target touches while it loads
    /// the state, before its guest runs (KVM maps the kvmclock, steal-time
    /// and async-PF pages when their MSRs are set): they go with the state,
    /// 4 KiB each, so the switch does not wait for their 2 MiB chunks.
    pub unsafe fn start(
        sock: OwnedFd,
        ranges: &[RamRange],
        device_state: Vec<u8>,
        early: &[u64],
        events: Box<dyn Fn(SourceEvent) + Send + Sync>,
    ) -> Result<PostcopySender> {
        // SAFETY: the caller's promise, passed on.
        unsafe { Self::begin(sock, ranges, device_state, early, events, None) }
    }

    /// Like [`PostcopySender::start`], after a pre-copy pass over the same
    /// `ranges` ([`crate::precopy::Precopy::finish`]): only the chunks the
    /// pass did not send, and those the guest wrote after it sent them
    /// (which the target is told to drop), are sent again.
    ///
    /// # Safety
    /// As [`PostcopySender::start`]; the guest is paused for good, so the
    /// pass's record of written chunks is final.
    pub unsafe fn after_precopy(
        pre: PrecopyDone,
        ranges: &[RamRange],
        device_state: Vec<u8>,
        early: &[u64],
        events: Box<dyn Fn(SourceEvent) + Send + Sync>,
    ) -> Result<PostcopySender> {
        let PrecopyDone { sock, sent, log } = pre;
        // SAFETY: the caller's promise, passed on.
        unsafe { Self::begin(sock, ranges, device_state, early, events, Some((sent, log))) }
    }

    /// # Safety
    /// As [`PostcopySender::start`].
    unsafe fn begin(
        sock: OwnedFd,
        ranges: &[RamRange],
        device_state: Vec<u8>,
        early: &[u64],
        events: Box<dyn Fn(SourceEvent) + Send + Sync>,
        pre: Option<(Vec<bool>, Arc<dyn WriteLog>)>,
    ) -> Result<PostcopySender> {
        if device_state.len() as u64 > MAX_DEVICE_STATE {
            return Err(SnapError::DeviceStateTooLarge {
                len: device_state.len() as u64,
                max: MAX_DEVICE_STATE,
            });
        }
        let (chunks, layout, image_len) = chunks_of(ranges)?;
        let n = chunks.len();
        // After a pre-copy: what it sent and the guest did not write since
        // is at the target; what the guest wrote, the target drops.
        let (sent, stale) = match &pre {
            None => (vec![false; n], None),
            Some((pre_sent, _)) if pre_sent.len() != n => {
                return Err(SnapError::InvalidInput(
                    "the pre-copy pass was over other RAM".into(),
                ))
            }
            Some((pre_sent, log)) => {
                let mut stale = vec![0u8; n.div_ceil(8)];
                let mut sent = pre_sent.clone();
                for (k, s) in sent.iter_mut().enumerate() {
                    if *s && log.written(chunks[k].0) {
                        *s = false;
                        stale[k / 8] |= 1 << (k % 8);
                    }
                }
                (sent, Some(stale))
            }
        };
        let mut pages = Vec::new();
        for &gpa in early.iter().take(MAX_EARLY_PAGES) {
            let page = gpa & !(PAGE_SIZE - 1);
            let found = ranges
                .iter()
                .zip(&layout)
                .find(|(r, _)| page >= r.gpa() && page < r.gpa() + r.len());
            if let Some((r, l)) = found {
                let at = (
                    l.file_offset + page - r.gpa(),
                    r.host() as u64 + page - r.gpa(),
                );
                if !pages.contains(&at) {
                    pages.push(at);
                }
            }
        }
        let counters = SendCounters::default();
        if let Some(st) = &stale {
            let n: u32 = st.iter().map(|b| b.count_ones()).sum();
            counters
                .chunks_rewritten
                .store(u64::from(n), Ordering::Relaxed);
        }
        let sh = Arc::new(SendShared {
            chunks,
            layout,
            image_len,
            id: random_id(),
            state: device_state,
            early: pages,
            stale,
            st: Mutex::new(SendState {
                sent,
                next: 0,
                urgent: VecDeque::new(),
                conn: None,
                generation: 0,
                head_pending: true,
                end_sent: false,
                switched: false,
                ended: false,
            }),
            cv: Condvar::new(),
            events,
            counters: Arc::new(counters),
        });
        attach(&sh, sock, true)?;
        let s2 = sh.clone();
        let pusher = std::thread::Builder::new()
            .name("postcopy-push".into())
            .spawn(move || push(&s2));
        let pusher = match pusher {
            Ok(t) => t,
            Err(e) => {
                let mut st = lock(&sh.st);
                st.ended = true;
                if let Some((_, c)) = st.conn.take() {
                    shutdown(&c);
                }
                return Err(SnapError::io("start the post-copy sender", e));
            }
        };
        // The target must run the guest within SWITCH_TIMEOUT, or the source takes it back.
        let s3 = sh.clone();
        let _ = std::thread::Builder::new()
            .name("postcopy-switch".into())
            .spawn(move || {
                let st = lock(&s3.st);
                let (mut st, _) = s3
                    .cv
                    .wait_timeout_while(st, SWITCH_TIMEOUT, |st| !st.switched && !st.ended)
                    .unwrap_or_else(|e| e.into_inner());
                if !st.switched && !st.ended {
                    st.ended = true;
                    if let Some((_, c)) = st.conn.take() {
                        shutdown(&c);
                    }
                    s3.cv.notify_all();
                    drop(st);
                    (s3.events)(SourceEvent::Failed(format!(
                        "the target did not run the guest within {SWITCH_TIMEOUT:?}"
                    )));
                }
            });
        Ok(PostcopySender {
            sh,
            pusher: Some(pusher),
        })
    }

    /// The figures so far.
    pub fn counters(&self) -> Arc<SendCounters> {
        self.sh.counters.clone()
    }

    /// Whether every chunk has been sent at least once on some connection.
    pub fn progress(&self) -> (usize, usize) {
        let st = lock(&self.sh.st);
        (st.sent.iter().filter(|s| **s).count(), st.sent.len())
    }

    /// Carries on over a new connection after [`SourceEvent::Paused`].
    pub fn resume(&self, sock: OwnedFd) -> Result<()> {
        {
            let st = lock(&self.sh.st);
            if st.ended || !st.switched {
                return Err(broken("there is no paused post-copy migration to resume"));
            }
            if st.conn.is_some() {
                return Err(broken("the post-copy migration is not paused"));
            }
        }
        attach(&self.sh, sock, false)
    }

    /// Breaks the connection (QMP `migrate-pause`): after the switch the
    /// migration pauses ([`SourceEvent::Paused`]) until [`PostcopySender::resume`].
    pub fn break_connection(&self) -> bool {
        let st = lock(&self.sh.st);
        match &st.conn {
            Some((_, c)) if st.switched && !st.ended => {
                shutdown(c);
                true
            }
            _ => false,
        }
    }

    /// Cancels the migration if the target has not run the guest yet
    /// (true: the caller may run it again); after the switch, changes
    /// nothing and returns false.
    pub fn cancel(&self) -> bool {
        let mut st = lock(&self.sh.st);
        if st.switched || st.ended {
            return false;
        }
        st.ended = true;
        if let Some((_, c)) = st.conn.take() {
            shutdown(&c);
        }
        self.sh.cv.notify_all();
        true
    }

    /// Gives up (the caller's VM is going away): both ends close.
    pub fn stop(&self) {
        let mut st = lock(&self.sh.st);
        st.ended = true;
        if let Some((_, c)) = st.conn.take() {
            shutdown(&c);
        }
        self.sh.cv.notify_all();
    }
}

impl Drop for PostcopySender {
    fn drop(&mut self) {
        self.stop();
        if let Some(t) = self.pusher.take() {
            let _ = t.join();
        }
    }
}

/// Makes `sock` the connection in use and starts its reader.
fn attach(sh: &Arc<SendShared>, sock: OwnedFd, first: bool) -> Result<()> {
    let (r, _) = halves(&sock).map_err(|e| SnapError::io("post-copy connection", e))?;
    let g = {
        let mut st = lock(&sh.st);
        st.generation += 1;
        st.conn = Some((st.generation, sock));
        st.head_pending = true;
        st.end_sent = false;
        sh.cv.notify_all();
        st.generation
    };
    sh.counters.connections.fetch_add(1, Ordering::Relaxed);
    let sh2 = sh.clone();
    std::thread::Builder::new()
        .name("postcopy-read".into())
        .spawn(move || source_reader(&sh2, r, g, first))
        .map_err(|e| SnapError::io("start the post-copy reader", e))?;
    Ok(())
}

/// The connection of generation `g` broke: pause (or fail before the switch).
fn lost(sh: &SendShared, g: u64, why: String) {
    let mut st = lock(&sh.st);
    if st.ended || !st.conn.as_ref().is_some_and(|(cg, _)| *cg == g) {
        return;
    }
    if let Some((_, c)) = st.conn.take() {
        shutdown(&c);
    }
    let ev = if st.switched {
        SourceEvent::Paused(why)
    } else {
        st.ended = true;
        SourceEvent::Failed(why)
    };
    sh.cv.notify_all();
    drop(st);
    (sh.events)(ev);
}

fn source_reader(sh: &SendShared, r: File, g: u64, first: bool) {
    let mut r = BufReader::new(r);
    let mut need_first = !first;
    let why = loop {
        let rec = match read_record(&mut r, 1 << 20) {
            Ok(Some(rec)) => rec,
            Ok(None) => break "the target closed the connection".to_string(),
            Err(e) => break format!("{e}"),
        };
        let (kind, off, data) = rec;
        let mut st = lock(&sh.st);
        if need_first && kind != KIND_NEED {
            drop(st);
            break "the target did not say which pages it lacks".into();
        }
        match kind {
            KIND_RUNNING => {
                if !st.switched && !st.ended {
                    st.switched = true;
                    sh.cv.notify_all();
                    drop(st);
                    (sh.events)(SourceEvent::Switched);
                }
            }
            KIND_REQ => {
                let k = off as usize;
                if k < st.sent.len() && !st.sent[k] {
                    st.urgent.push_back(k);
                    sh.cv.notify_all();
                }
                sh.counters.requests.fetch_add(1, Ordering::Relaxed);
            }
            KIND_NEED => {
                need_first = false;
                let n = st.sent.len();
                if data.len() != n.div_ceil(8) {
                    drop(st);
                    break "malformed list of missing pages".into();
                }
                for k in 0..n {
                    if data[k / 8] & (1 << (k % 8)) != 0 {
                        st.sent[k] = false;
                    }
                }
                st.next = 0;
                st.end_sent = false;
                sh.cv.notify_all();
            }
            KIND_DONE => {
                st.ended = true;
                if let Some((_, c)) = st.conn.take() {
                    shutdown(&c);
                }
                sh.cv.notify_all();
                drop(st);
                (sh.events)(SourceEvent::Completed);
                return;
            }
            k => {
                drop(st);
                break format!("unexpected record of kind {k} from the target");
            }
        }
    };
    lost(sh, g, why);
}

/// What the pusher does next.
enum Job {
    Head(u64, File),
    Chunk(u64, File, usize, bool),
    End(u64, File),
}

fn next_job(sh: &SendShared) -> Option<Job> {
    let mut st = lock(&sh.st);
    loop {
        if st.ended {
            return None;
        }
        if let Some((g, c)) = &st.conn {
            let (g, file) = (*g, c.try_clone().map(File::from));
            let Ok(file) = file else {
                drop(st);
                lost(sh, g, "cannot use the connection".into());
                st = lock(&sh.st);
                continue;
            };
            if st.head_pending {
                st.head_pending = false;
                return Some(Job::Head(g, file));
            }
            // A chunk the target waits for goes at once — even before the
            // switch: restoring the machine may touch guest RAM.
            while let Some(k) = st.urgent.pop_front() {
                if !st.sent[k] {
                    st.sent[k] = true;
                    // The order follows the guest: what comes after the chunk
                    // it touched is what it will touch next.
                    st.next = k + 1;
                    return Some(Job::Chunk(g, file, k, true));
                }
            }
            // The rest goes once the target runs the guest: before, it would
            // only compete with the switch for the link and the CPUs.
            if !st.switched {
                st = sh.cv.wait(st).unwrap_or_else(|e| e.into_inner());
                continue;
            }
            // In order from `next`, then from the start for what was skipped.
            let n = st.sent.len();
            let from = st.next.min(n);
            let found = (from..n).chain(0..from).find(|&k| !st.sent[k]);
            if let Some(k) = found {
                st.sent[k] = true;
                st.next = k + 1;
                return Some(Job::Chunk(g, file, k, false));
            }
            if !st.end_sent {
                st.end_sent = true;
                return Some(Job::End(g, file));
            }
        }
        st = sh.cv.wait(st).unwrap_or_else(|e| e.into_inner());
    }
}

fn push(sh: &SendShared) {
    while let Some(job) = next_job(sh) {
        let (g, r) = match job {
            Job::Head(g, f) => (g, send_head(sh, f, g)),
            Job::Chunk(g, f, k, urgent) => {
                let r = send_chunk(sh, f, k);
                let c = if urgent {
                    &sh.counters.chunks_requested
                } else {
                    &sh.counters.chunks_pushed
                };
                c.fetch_add(1, Ordering::Relaxed);
                (g, r)
            }
            Job::End(g, mut f) => {
                let end = [0u8; 16];
                (g, send(&mut f, KIND_END, 0, &end))
            }
        };
        if let Err(e) = r {
            lost(sh, g, format!("cannot send to the target: {e}"));
        }
    }
}

fn send_head(sh: &SendShared, f: File, g: u64) -> io::Result<()> {
    let mut w = BufWriter::with_capacity(1 << 20, f);
    let first = g == 1;
    let flags = if first {
        FLAG_LIVE
    } else {
        FLAG_LIVE | FLAG_RESUME
    };
    if !first || sh.stale.is_none() {
        w.write_all(&encode_stream_header(sh.image_len, &sh.layout, flags))?;
    }
    if first {
        for (i, part) in sh.state.chunks(MAX_RECORD).enumerate() {
            w.write_all(&record_head(KIND_STATE, (i * MAX_RECORD) as u64, part))?;
            w.write_all(part)?;
        }
        for &(off, host) in &sh.early {
            // SAFETY: the page lies in a RamRange the caller of `start` keeps
            // mapped and unwritten while this sender lives.
            let page = unsafe { std::slice::from_raw_parts(host as *const u8, PAGE_SIZE as usize) };
            w.write_all(&record_head(KIND_PAGE, off, page))?;
            w.write_all(page)?;
        }
        if let Some(stale) = &sh.stale {
            w.write_all(&record_head(KIND_STALE, 0, stale))?;
            w.write_all(stale)?;
        }
        let mut sw = sh.id.to_vec();
        sw.extend_from_slice(&(sh.state.len() as u64).to_le_bytes());
        sw.extend_from_slice(&crc32fast::hash(&sh.state).to_le_bytes());
        w.write_all(&record_head(KIND_SWITCH, 0, &sw))?;
        w.write_all(&sw)?;
    } else {
        w.write_all(&record_head(KIND_RESUME, 0, &sh.id))?;
        w.write_all(&sh.id)?;
    }
    w.flush()?;
    sh.counters
        .bytes_sent
        .fetch_add(sh.state.len() as u64 + 4096, Ordering::Relaxed);
    Ok(())
}

fn is_zero(p: &[u8]) -> bool {
    let (a, words, b) = {
        // SAFETY: any byte pattern is a valid u64.
        unsafe { p.align_to::<u64>() }
    };
    a.iter().all(|x| *x == 0) && words.iter().all(|x| *x == 0) && b.iter().all(|x| *x == 0)
}

fn send_chunk(sh: &SendShared, f: File, k: usize) -> io::Result<()> {
    let (host, len) = sh.chunks[k];
    // SAFETY: the chunk lies in a RamRange the caller of `start` keeps
    // mapped and unwritten while this sender lives.
    let mem = unsafe { std::slice::from_raw_parts(host as *const u8, len as usize) };
    let (plen, zero) = write_chunk(f, k, mem)?;
    if zero {
        sh.counters.zero_chunks.fetch_add(1, Ordering::Relaxed);
    }
    sh.counters
        .bytes_sent
        .fetch_add(plen as u64, Ordering::Relaxed);
    Ok(())
}

/// Writes chunk `k` (its memory: `mem`, which nobody changes meanwhile) as
/// a CHUNK record; returns the bytes written and whether it was all zero.
pub(crate) fn write_chunk(f: impl Write, k: usize, mem: &[u8]) -> io::Result<(usize, bool)> {
    let mut bitmap = [0u8; BITMAP];
    let mut n = 0usize;
    for (i, page) in mem.chunks(PAGE_SIZE as usize).enumerate() {
        if !is_zero(page) {
            bitmap[i / 8] |= 1 << (i % 8);
            n += 1;
        }
    }
    let mut h = crc32fast::Hasher::new();
    h.update(&bitmap);
    for (i, page) in mem.chunks(PAGE_SIZE as usize).enumerate() {
        if bitmap[i / 8] & (1 << (i % 8)) != 0 {
            h.update(page);
        }
    }
    let plen = BITMAP + n * PAGE_SIZE as usize;
    let mut w = BufWriter::with_capacity(256 << 10, f);
    w.write_all(&record_head_crc(KIND_CHUNK, k as u64, plen, h.finalize()))?;
    w.write_all(&bitmap)?;
    for (i, page) in mem.chunks(PAGE_SIZE as usize).enumerate() {
        if bitmap[i / 8] & (1 << (i % 8)) != 0 {
            w.write_all(page)?;
        }
    }
    w.flush()?;
    Ok((plen + 24, n == 0))
}

// ---------------------------------------------------------------- target

/// Who hears a target's [`TargetEvent`]s.
pub type TargetEvents = Box<dyn Fn(TargetEvent) + Send + Sync>;

/// What happens to a live migration, as the target sees it.
#[derive(Debug, Clone)]
pub enum TargetEvent {
    /// The connection broke: threads touching RAM not yet here wait.
    Paused(String),
    /// A new connection carries on ([`RemotePages::recover`]).
    Recovered,
}

enum Slot {
    Absent,
    Requested,
    Arrived(Vec<u8>),
    Zero,
    Taken,
}

struct RecvState {
    slots: Vec<Slot>,
    writer: Option<File>,
    generation: u64,
    /// The source gave up, or the migration was stopped: waiting is over.
    failed: Option<String>,
    staged: u64,
    received: u64,
    /// Every page is here (DONE is owed to the source until `done_sent`).
    done: bool,
    done_sent: bool,
    /// Chunks in the order they arrived, for the prefetch.
    arrivals: VecDeque<usize>,
}

struct RecvShared {
    layout: Vec<ImageRange>,
    id: [u8; 16],
    precopy: PrecopyFigures,
    st: Mutex<RecvState>,
    cv: Condvar,
    events: Mutex<Option<TargetEvents>>,
    requests: AtomicU64,
    /// Connections used (the first and each recovery).
    connections: AtomicU64,
    /// Chunks asked for before the guest ran (they were in the downtime).
    requests_before_switch: AtomicU64,
    bytes: AtomicU64,
}

/// The target side of a live migration: RAM that comes from the source on
/// demand (see the module documentation).
pub struct RemotePages {
    sh: Arc<RecvShared>,
}

/// What [`receive_switch`] read: the layout, the device state, and the
/// pages still to come.
pub struct Switch {
    pub layout: StreamLayout,
    pub device_state: Vec<u8>,
    pub pages: Arc<RemotePages>,
    /// Pages sent with the state (image offset, 4 KiB): place them before
    /// loading the state ([`crate::lazy::start_lazy_fill_with`]).
    pub early: Vec<(u64, Vec<u8>)>,
}

/// Reads a live stream up to the switch (header, device state) from `sock`.
/// The caller builds the VM with fresh RAM, starts a fill from the returned
/// pages, runs the guest and calls [`RemotePages::running`].
pub fn receive_switch(sock: OwnedFd) -> Result<Switch> {
    let (r, w) = halves(&sock).map_err(|e| SnapError::io("post-copy connection", e))?;
    let (reader, layout) = StreamReader::start(r)?;
    receive_switch_from(reader, layout, w)
}

/// [`receive_switch`] for a stream whose header was read already.
pub fn receive_switch_from<R: Read + Send + 'static>(
    reader: StreamReader<R>,
    layout: StreamLayout,
    w: File,
) -> Result<Switch> {
    if !layout.live || layout.resume {
        return Err(broken("it is not the start of a live migration"));
    }
    let mut r = reader.into_buffered();
    let mut state = Vec::new();
    let mut early: Vec<(u64, Vec<u8>)> = Vec::new();
    let n = crate::image::chunk_count(&layout.ranges);
    // Chunks of a pre-copy pass (sent with the guest running, before the state).
    let mut slots: Vec<Slot> = (0..n).map(|_| Slot::Absent).collect();
    let (mut pre_bytes, mut dropped) = (0u64, 0u64);
    let id = loop {
        let (kind, off, data) = read_record(&mut r, MAX_RECORD)?
            .ok_or_else(|| broken("it ends before the switch: truncated"))?;
        match kind {
            KIND_STATE if off == state.len() as u64 => {
                if state.len() + data.len() > MAX_DEVICE_STATE as usize {
                    return Err(broken("its device state is too large"));
                }
                state.extend_from_slice(&data);
            }
            KIND_PAGE
                if data.len() == PAGE_SIZE as usize
                    && early.len() < MAX_EARLY_PAGES
                    && off % PAGE_SIZE == 0
                    && chunk_at(&layout.ranges, off).is_some() =>
            {
                early.push((off, data));
            }
            KIND_CHUNK if state.is_empty() => {
                let k = off as usize;
                if k >= n {
                    return Err(broken(format!("chunk {k} is not in guest RAM")));
                }
                check_chunk(&layout.ranges, k, &data).map_err(broken)?;
                pre_bytes += data.len() as u64 + 24;
                slots[k] = if data[..BITMAP].iter().all(|b| *b == 0) {
                    Slot::Zero
                } else {
                    Slot::Arrived(data)
                };
            }
            KIND_STALE if data.len() == n.div_ceil(8) => {
                for (k, s) in slots.iter_mut().enumerate() {
                    if data[k / 8] & (1 << (k % 8)) != 0 && !matches!(s, Slot::Absent) {
                        *s = Slot::Absent;
                        dropped += 1;
                    }
                }
            }
            KIND_SWITCH if data.len() == 28 => {
                let len = u64::from_le_bytes(data[16..24].try_into().expect("8 bytes"));
                let crc = u32::from_le_bytes(data[24..28].try_into().expect("4 bytes"));
                if len != state.len() as u64 || crc32fast::hash(&state) != crc {
                    return Err(broken("its device state is incomplete or corrupt"));
                }
                let mut id = [0u8; 16];
                id.copy_from_slice(&data[..16]);
                break id;
            }
            k => {
                return Err(broken(format!(
                    "unexpected record of kind {k} before the switch"
                )))
            }
        }
    };
    let arrivals: VecDeque<usize> = (0..n)
        .filter(|&k| !matches!(slots[k], Slot::Absent))
        .collect();
    let staged = slots
        .iter()
        .map(|s| match s {
            Slot::Arrived(d) => d.len() as u64,
            _ => 0,
        })
        .sum();
    let sh = Arc::new(RecvShared {
        layout: layout.ranges.clone(),
        id,
        precopy: PrecopyFigures {
            chunks_kept: arrivals.len() as u64,
            chunks_dropped: dropped,
            bytes: pre_bytes,
        },
        st: Mutex::new(RecvState {
            slots,
            writer: Some(w),
            generation: 1,
            failed: None,
            staged,
            received: arrivals.len() as u64,
            done: false,
            done_sent: false,
            arrivals,
        }),
        cv: Condvar::new(),
        events: Mutex::new(None),
        requests: AtomicU64::new(0),
        connections: AtomicU64::new(1),
        requests_before_switch: AtomicU64::new(0),
        bytes: AtomicU64::new(0),
    });
    spawn_receiver(&sh, r, 1)?;
    Ok(Switch {
        layout,
        device_state: state,
        pages: Arc::new(RemotePages { sh }),
        early,
    })
}

fn spawn_receiver<R: Read + Send + 'static>(
    sh: &Arc<RecvShared>,
    r: BufReader<R>,
    g: u64,
) -> Result<()> {
    let sh2 = sh.clone();
    std::thread::Builder::new()
        .name("postcopy-recv".into())
        .spawn(move || target_reader(&sh2, r, g))
        .map(|_| ())
        .map_err(|e| SnapError::io("start the post-copy receiver", e))
}

fn target_reader<R: Read>(sh: &RecvShared, mut r: BufReader<R>, g: u64) {
    let why = loop {
        let (kind, off, data) = match read_record(&mut r, BITMAP + CHUNK_PAGES * PAGE_SIZE as usize)
        {
            Ok(Some(rec)) => rec,
            Ok(None) => break "the source closed the connection".to_string(),
            Err(e) => break format!("{e}"),
        };
        sh.bytes
            .fetch_add(data.len() as u64 + 24, Ordering::Relaxed);
        match kind {
            KIND_CHUNK => {
                let k = off as usize;
                let mut st = lock(&sh.st);
                if st.generation != g {
                    return;
                }
                if k >= st.slots.len() {
                    break format!("chunk {k} is not in guest RAM");
                }
                if let Err(e) = check_chunk(&sh.layout, k, &data) {
                    break e;
                }
                // Hold back while too much waits to be placed (never a chunk
                // a thread waits for).
                while st.staged > MAX_STAGED
                    && !matches!(st.slots[k], Slot::Requested)
                    && st.failed.is_none()
                    && st.generation == g
                {
                    st = sh.cv.wait(st).unwrap_or_else(|e| e.into_inner());
                }
                if st.generation != g || st.failed.is_some() {
                    return;
                }
                if matches!(st.slots[k], Slot::Absent | Slot::Requested) {
                    st.received += 1;
                    st.arrivals.push_back(k);
                    if data[..BITMAP].iter().all(|b| *b == 0) {
                        st.slots[k] = Slot::Zero;
                    } else {
                        st.staged += data.len() as u64;
                        st.slots[k] = Slot::Arrived(data);
                    }
                    sh.cv.notify_all();
                }
            }
            KIND_END => {}
            k => break format!("unexpected record of kind {k} from the source"),
        }
    };
    let mut st = lock(&sh.st);
    if st.generation != g || st.failed.is_some() {
        return;
    }
    if let Some(w) = st.writer.take() {
        shutdown(&w);
    }
    sh.cv.notify_all();
    let complete = st
        .slots
        .iter()
        .all(|s| !matches!(s, Slot::Absent | Slot::Requested));
    drop(st);
    if !complete {
        if let Some(ev) = lock(&sh.events).as_ref() {
            ev(TargetEvent::Paused(why));
        }
    }
}

/// Checks a CHUNK payload: its bitmap names pages of chunk `k`, and the
/// payload holds exactly those pages.
fn check_chunk(layout: &[ImageRange], k: usize, data: &[u8]) -> std::result::Result<(), String> {
    let len = chunk_len(layout, k).ok_or_else(|| format!("chunk {k} is not in guest RAM"))?;
    if data.len() < BITMAP {
        return Err(format!("chunk {k} is malformed"));
    }
    let pages = (len / PAGE_SIZE) as usize;
    let bits: usize = data[..BITMAP].iter().map(|b| b.count_ones() as usize).sum();
    let beyond = (pages..CHUNK_PAGES).any(|i| data[i / 8] & (1 << (i % 8)) != 0);
    if beyond || data.len() != BITMAP + bits * PAGE_SIZE as usize {
        return Err(format!("chunk {k} is malformed"));
    }
    Ok(())
}

/// Image offset of chunk `k`.
fn chunk_offset(layout: &[ImageRange], k: usize) -> Option<u64> {
    let mut base = 0usize;
    for r in layout {
        let n = r.len.div_ceil(INCR_CHUNK) as usize;
        if k < base + n {
            return Some(r.file_offset + (k - base) as u64 * INCR_CHUNK);
        }
        base += n;
    }
    None
}

fn chunk_len(layout: &[ImageRange], k: usize) -> Option<u64> {
    let mut base = 0usize;
    for r in layout {
        let n = r.len.div_ceil(INCR_CHUNK) as usize;
        if k < base + n {
            let start = (k - base) as u64 * INCR_CHUNK;
            return Some((r.len - start).min(INCR_CHUNK));
        }
        base += n;
    }
    None
}

/// What a target received before the switch, from a pre-copy pass.
#[derive(Debug, Clone, Copy, Default)]
pub struct PrecopyFigures {
    /// Chunks kept (the guest did not write them after they were sent).
    pub chunks_kept: u64,
    /// Chunks dropped at the switch (written after they were sent).
    pub chunks_dropped: u64,
    /// Bytes of the pass.
    pub bytes: u64,
}

/// Figures of the target side.
#[derive(Debug, Clone, Copy, Default)]
pub struct RecvFigures {
    /// What came before the switch, by pre-copy.
    pub precopy: PrecopyFigures,
    /// Chunks asked for because a thread touched them.
    pub requests: u64,
    /// Of those, asked for before the guest ran (their transfer was part of
    /// the downtime).
    pub requests_before_switch: u64,
    /// Chunks received.
    pub chunks_received: u64,
    /// Bytes read from the connection(s) after the switch.
    pub bytes: u64,
    /// Connections used.
    pub connections: u64,
}

impl RemotePages {
    /// Who hears a broken connection and a recovery.
    pub fn on_event(&self, f: TargetEvents) {
        *lock(&self.sh.events) = Some(f);
    }

    /// The guest runs here now: the source must not run it again.
    pub fn running(&self) -> io::Result<()> {
        let before = self.sh.requests.load(Ordering::Relaxed);
        self.sh
            .requests_before_switch
            .store(before, Ordering::Relaxed);
        self.say(KIND_RUNNING, 0, &[])
    }

    /// Every page is here: the source may let go. Returns whether the
    /// source was told; if not, the connection is down ([`TargetEvent::Paused`]
    /// follows) and a recovery tells it.
    pub fn done(&self) -> bool {
        lock(&self.sh.st).done = true;
        if self.say(KIND_DONE, 0, &[]).is_err() {
            return false;
        }
        let mut st = lock(&self.sh.st);
        st.done_sent = true;
        st.generation += 1;
        if let Some(w) = st.writer.take() {
            shutdown(&w);
        }
        true
    }

    /// Whether the source has been told every page is here.
    pub fn source_told(&self) -> bool {
        lock(&self.sh.st).done_sent
    }

    /// Gives up: threads waiting for a page get an error (the VM must end).
    pub fn fail(&self, why: &str) {
        let mut st = lock(&self.sh.st);
        st.failed = Some(why.to_string());
        if let Some(w) = st.writer.take() {
            shutdown(&w);
        }
        self.sh.cv.notify_all();
    }

    /// Breaks the connection (QMP `migrate-pause`): threads touching RAM
    /// not here wait ([`TargetEvent::Paused`]) until [`RemotePages::recover`].
    pub fn break_connection(&self) -> bool {
        let st = lock(&self.sh.st);
        match &st.writer {
            Some(w) if st.failed.is_none() => {
                shutdown(w);
                true
            }
            _ => false,
        }
    }

    /// Whether the connection is up.
    pub fn connected(&self) -> bool {
        lock(&self.sh.st).writer.is_some()
    }

    /// The figures so far.
    pub fn figures(&self) -> RecvFigures {
        let st = lock(&self.sh.st);
        RecvFigures {
            precopy: self.sh.precopy,
            requests: self.sh.requests.load(Ordering::Relaxed),
            requests_before_switch: self.sh.requests_before_switch.load(Ordering::Relaxed),
            chunks_received: st.received,
            bytes: self.sh.bytes.load(Ordering::Relaxed),
            connections: self.sh.connections.load(Ordering::Relaxed),
        }
    }

    fn say(&self, kind: u32, off: u64, data: &[u8]) -> io::Result<()> {
        let mut st = lock(&self.sh.st);
        let w = st.writer.as_mut().ok_or_else(|| {
            io::Error::new(io::ErrorKind::NotConnected, "no connection to the source")
        })?;
        let r = send(w, kind, off, data);
        if r.is_err() {
            if let Some(w) = st.writer.take() {
                shutdown(&w);
            }
        }
        r
    }

    /// Carries on over a new connection from the source (after
    /// [`TargetEvent::Paused`]): checks it is the same migration, says which
    /// chunks are still missing, asks again for those threads wait on.
    pub fn recover(&self, sock: OwnedFd) -> Result<()> {
        let (r, w) = halves(&sock).map_err(|e| SnapError::io("post-copy connection", e))?;
        let (reader, layout) = StreamReader::start(r)?;
        if !layout.live || !layout.resume || layout.ranges != self.sh.layout {
            return Err(broken("it is not this live migration resuming"));
        }
        let mut r = reader.into_buffered();
        match read_record(&mut r, 64)? {
            Some((KIND_RESUME, _, id)) if id == self.sh.id => {}
            Some((KIND_RESUME, _, _)) => return Err(broken("it resumes another migration")),
            _ => return Err(broken("it is not this live migration resuming")),
        }
        let mut st = lock(&self.sh.st);
        if st.failed.is_some() {
            return Err(broken("the migration was given up"));
        }
        if let Some(old) = st.writer.take() {
            shutdown(&old);
        }
        st.generation += 1;
        let g = st.generation;
        let n = st.slots.len();
        let mut need = vec![0u8; n.div_ceil(8)];
        let mut waiting = Vec::new();
        for (k, s) in st.slots.iter().enumerate() {
            match s {
                Slot::Absent => need[k / 8] |= 1 << (k % 8),
                Slot::Requested => {
                    need[k / 8] |= 1 << (k % 8);
                    waiting.push(k);
                }
                _ => {}
            }
        }
        let mut w = w;
        send(&mut w, KIND_NEED, 0, &need).map_err(|e| SnapError::io("post-copy recovery", e))?;
        for k in waiting {
            send(&mut w, KIND_REQ, k as u64, &[])
                .map_err(|e| SnapError::io("post-copy recovery", e))?;
        }
        st.writer = Some(w);
        self.sh.connections.fetch_add(1, Ordering::Relaxed);
        self.sh.cv.notify_all();
        drop(st);
        spawn_receiver(&self.sh, r, g)?;
        if let Some(ev) = lock(&self.sh.events).as_ref() {
            ev(TargetEvent::Recovered);
        }
        Ok(())
    }

    /// Waits until chunk `k` is here (asking for it once); what it holds.
    fn wait_for(&self, k: usize) -> io::Result<Option<Vec<u8>>> {
        let mut st = lock(&self.sh.st);
        loop {
            if let Some(why) = &st.failed {
                return Err(io::Error::other(why.clone()));
            }
            match std::mem::replace(&mut st.slots[k], Slot::Taken) {
                Slot::Arrived(d) => {
                    st.staged -= d.len() as u64;
                    self.sh.cv.notify_all();
                    return Ok(Some(d));
                }
                Slot::Zero => {
                    st.slots[k] = Slot::Zero;
                    return Ok(None);
                }
                Slot::Taken => return Err(io::Error::other(format!("chunk {k} was placed twice"))),
                // On its way in order, or asked for by `want`.
                other @ (Slot::Absent | Slot::Requested) => st.slots[k] = other,
            }
            st = self.sh.cv.wait(st).unwrap_or_else(|e| e.into_inner());
        }
    }

    fn chunk_index(&self, offset: u64, len: u64) -> io::Result<usize> {
        match chunk_at(&self.sh.layout, offset) {
            Some((k, start, l)) if start == offset && l == len => Ok(k),
            _ => Err(io::Error::other(format!(
                "{len} bytes at {offset:#x} are not one chunk of guest RAM"
            ))),
        }
    }
}

impl Drop for RemotePages {
    /// The migration goes away with its pages: the connection closes.
    fn drop(&mut self) {
        self.fail("the live migration was stopped");
    }
}

impl PageSource for RemotePages {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let k = self.chunk_index(offset, buf.len() as u64)?;
        match self.wait_for(k)? {
            None => buf.fill(0),
            Some(d) => {
                let mut p = BITMAP;
                for (i, page) in buf.chunks_mut(PAGE_SIZE as usize).enumerate() {
                    if d[i / 8] & (1 << (i % 8)) != 0 {
                        page.copy_from_slice(&d[p..p + PAGE_SIZE as usize]);
                        p += PAGE_SIZE as usize;
                    } else {
                        page.fill(0);
                    }
                }
            }
        }
        Ok(())
    }

    /// Waits for the chunk: an all-zero one is a hole (the zero page).
    fn is_hole(&self, offset: u64, len: u64) -> bool {
        let Ok(k) = self.chunk_index(offset, len) else {
            return false;
        };
        let mut st = lock(&self.sh.st);
        loop {
            match &st.slots[k] {
                Slot::Zero => return true,
                Slot::Arrived(_) | Slot::Taken => return false,
                _ if st.failed.is_some() => return false,
                Slot::Absent | Slot::Requested => {}
            }
            st = self.sh.cv.wait(st).unwrap_or_else(|e| e.into_inner());
        }
    }

    fn cancel(&self) {
        self.fail("the live migration was stopped");
    }

    fn pushes(&self) -> bool {
        true
    }

    fn next_arrived(&self) -> Option<u64> {
        let mut st = lock(&self.sh.st);
        loop {
            if st.failed.is_some() {
                return None;
            }
            while let Some(k) = st.arrivals.pop_front() {
                if matches!(st.slots[k], Slot::Arrived(_) | Slot::Zero) {
                    return chunk_offset(&self.sh.layout, k);
                }
            }
            if st.received == st.slots.len() as u64 {
                return None;
            }
            st = self.sh.cv.wait(st).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Asks the source for a chunk a thread waits on, ahead of the order.
    fn want(&self, offset: u64, len: u64) {
        let Ok(k) = self.chunk_index(offset, len) else {
            return;
        };
        let mut st = lock(&self.sh.st);
        if matches!(st.slots[k], Slot::Absent) {
            tracing::debug!(
                chunk = k,
                offset,
                "post-copy: asking for a chunk a thread waits on"
            );
            // Without a connection, `recover` asks again for what is Requested.
            st.slots[k] = Slot::Requested;
            self.sh.requests.fetch_add(1, Ordering::Relaxed);
            if let Some(w) = st.writer.as_mut() {
                if send(w, KIND_REQ, k as u64, &[]).is_err() {
                    if let Some(w) = st.writer.take() {
                        shutdown(&w);
                    }
                }
            }
        }
    }
}
