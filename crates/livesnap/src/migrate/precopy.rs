//! Pre-copy: the first phase of a live migration, with the guest running.
//!
//! [`Precopy`] sends a live stream header, then each 2 MiB chunk of guest
//! RAM once, in order, while the guest goes on writing. A [`WriteLog`] —
//! the write-protect engine's second record, started by
//! [`crate::capture::wp::WpEngine::mark`] before the pass — says which chunks
//! the guest wrote since. After the cut, the post-copy phase
//! ([`crate::migrate::postcopy::PostcopySender::after_precopy`]) tells the target to
//! drop those and sends only them and what the pass never reached, so the
//! target's guest waits on far fewer chunks, and on none when the pass
//! completed over a guest that did not write.
//!
//! A pass that the guest overtakes only costs link time: once the chunks it
//! sent and the guest wrote again pass a budget, it stops and the rest goes
//! by post-copy. So what is sent twice is about the budget, plus what the
//! guest rewrites while the link drains the pass.
//!
//! Before it reports, the pass waits (guest still running, at most
//! [`DRAIN_WAIT`]) until the connection has delivered what was written:
//! the device state, sent inside the pause, must not queue behind it.

use std::fs::File;
use std::io::{self, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::error::{Result, SnapError};
use crate::format::stream::{
    encode_stream_header, FLAG_HANDOVER, FLAG_LIVE, FLAG_PAGES, FLAG_PIECES, FLAG_PRECOPY,
    FLAG_ROTATED,
};
use crate::format::wire::{chunks_of, write_chunk};
pub use crate::format::wire::{PrecopyDone, WriteLog};
use crate::kernel::lock;
use crate::RamRange;

/// How long a finished pass waits for the connection to deliver what it
/// wrote before it reports anyway.
pub const DRAIN_WAIT: Duration = Duration::from_secs(30);

/// Why a pass ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PrecopyEnd {
    /// Every chunk was sent once.
    AllSent,
    /// [`Precopy::switch_now`] was called (QMP `migrate-start-postcopy`).
    Asked,
    /// The guest wrote the budget's worth of chunks already sent.
    Overtaken,
}

impl PrecopyEnd {
    pub fn name(self) -> &'static str {
        match self {
            PrecopyEnd::AllSent => "all-sent",
            PrecopyEnd::Asked => "start-postcopy",
            PrecopyEnd::Overtaken => "guest-writes-faster",
        }
    }
}

/// What a pass reports, once, from its thread.
#[derive(Debug, Clone)]
pub enum PrecopyEvent {
    /// The pass is over and delivered: cut, then [`Precopy::finish`].
    Ready(PrecopyEnd),
    /// The connection failed: the migration is over; the guest never stopped.
    Failed(String),
}

/// Figures of a pass.
#[derive(Debug, Default)]
pub struct PrecopyCounters {
    pub chunks_sent: AtomicU64,
    pub zero_chunks: AtomicU64,
    pub bytes_sent: AtomicU64,
    /// Chunks sent and then written by the guest, at the last look.
    pub chunks_rewritten: AtomicU64,
    /// Microseconds spent waiting for the connection to deliver.
    pub drain_us: AtomicU64,
}

struct Shared {
    sock: OwnedFd,
    chunks: Vec<(u64, u64)>,
    log: Arc<dyn WriteLog>,
    /// Rewritten chunks at which the pass gives up.
    budget: u64,
    switch_now: AtomicBool,
    /// Cancelled: the thread ends without a word.
    quiet: AtomicBool,
    sent: Mutex<Vec<bool>>,
    counters: Arc<PrecopyCounters>,
}

/// A pre-copy pass under way (see the module documentation).
pub struct Precopy {
    sh: Arc<Shared>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Precopy {
    /// Starts a pass over `ranges` on `sock` (a connected socket). `log`
    /// must have been marked before this call; `budget` is the most bytes of
    /// chunks sent and written again before the pass gives up. `events`
    /// hears one [`PrecopyEvent`], from the pass's thread.
    ///
    /// # Safety
    /// The memory of `ranges` must stay mapped until the pass is finished or
    /// dropped; the guest may write it meanwhile (a chunk read while it
    /// changes is in `log`, so it is dropped and sent again).
    pub unsafe fn start(
        sock: OwnedFd,
        ranges: &[RamRange],
        log: Arc<dyn WriteLog>,
        budget: u64,
        events: Box<dyn Fn(PrecopyEvent) + Send + Sync>,
    ) -> Result<Precopy> {
        let (chunks, layout, image_len) = chunks_of(ranges)?;
        let header = encode_stream_header(
            image_len,
            &layout,
            FLAG_LIVE | FLAG_PRECOPY | FLAG_HANDOVER | FLAG_PAGES | FLAG_PIECES | FLAG_ROTATED,
        );
        let n = chunks.len();
        let sh = Arc::new(Shared {
            sock,
            chunks,
            log,
            budget: budget.div_ceil(crate::CHUNK).max(1),
            switch_now: AtomicBool::new(false),
            quiet: AtomicBool::new(false),
            sent: Mutex::new(vec![false; n]),
            counters: Arc::default(),
        });
        let s2 = sh.clone();
        let thread = std::thread::Builder::new()
            .name("precopy".into())
            .spawn(move || {
                let r = run(&s2, &header);
                if s2.quiet.load(Ordering::Acquire) {
                    return;
                }
                events(match r {
                    Ok(end) => PrecopyEvent::Ready(end),
                    Err(e) => PrecopyEvent::Failed(format!("cannot send to the target: {e}")),
                });
            })
            .map_err(|e| SnapError::io("start the pre-copy", e))?;
        Ok(Precopy {
            sh,
            thread: Some(thread),
        })
    }

    /// Ends the pass after the chunk being sent (QMP `migrate-start-postcopy`).
    pub fn switch_now(&self) {
        self.sh.switch_now.store(true, Ordering::Release);
    }

    /// The figures so far.
    pub fn counters(&self) -> Arc<PrecopyCounters> {
        self.sh.counters.clone()
    }

    /// Chunks sent so far, and all chunks.
    pub fn progress(&self) -> (u64, u64) {
        let n = self.sh.chunks.len() as u64;
        (self.sh.counters.chunks_sent.load(Ordering::Relaxed), n)
    }

    /// After [`PrecopyEvent::Ready`], with the guest paused for good: the
    /// connection and what the pass sent, for the post-copy phase.
    pub fn finish(mut self) -> Result<PrecopyDone> {
        // Called early by mistake, the pass still ends promptly.
        self.sh.switch_now.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let sock = self
            .sh
            .sock
            .try_clone()
            .map_err(|e| SnapError::io("pre-copy connection", e))?;
        Ok(PrecopyDone {
            sock,
            sent: lock(&self.sh.sent).clone(),
            log: self.sh.log.clone(),
        })
    }
}

impl Drop for Precopy {
    /// Cancelled or abandoned: the connection closes, the thread ends quietly.
    fn drop(&mut self) {
        if let Some(t) = self.thread.take() {
            self.sh.quiet.store(true, Ordering::Release);
            self.sh.switch_now.store(true, Ordering::Release);
            // SAFETY: shutdown on the socket this pass owns; no memory involved.
            unsafe { libc::shutdown(self.sh.sock.as_raw_fd(), libc::SHUT_RDWR) };
            let _ = t.join();
        }
    }
}

fn run(sh: &Shared, header: &[u8]) -> io::Result<PrecopyEnd> {
    let mut f = File::from(sh.sock.try_clone()?);
    f.write_all(header)?;
    let c = &sh.counters;
    let mut buf = vec![0u8; crate::CHUNK as usize];
    let mut end = PrecopyEnd::AllSent;
    // How often the budget is checked (each check reads the whole log).
    let every = (sh.chunks.len() / 128).max(8);
    for (k, &(host, len)) in sh.chunks.iter().enumerate() {
        if sh.switch_now.load(Ordering::Acquire) {
            end = PrecopyEnd::Asked;
            break;
        }
        let b = &mut buf[..len as usize];
        copy_live(host, b);
        let (bytes, zero) = write_chunk(&mut f, k, b)?;
        lock(&sh.sent)[k] = true;
        c.chunks_sent.fetch_add(1, Ordering::Relaxed);
        c.bytes_sent.fetch_add(bytes as u64, Ordering::Relaxed);
        if zero {
            c.zero_chunks.fetch_add(1, Ordering::Relaxed);
        }
        if k % every == every - 1 && rewritten(sh, k + 1) >= sh.budget {
            end = PrecopyEnd::Overtaken;
            break;
        }
    }
    let t = Instant::now();
    drain(&f, &sh.quiet);
    c.drain_us
        .store(t.elapsed().as_micros() as u64, Ordering::Relaxed);
    rewritten(sh, sh.chunks.len());
    Ok(end)
}

/// Copies guest memory at `host` that the guest may be writing meanwhile
/// into `buf` (volatile reads, 8 bytes at a time: the copy may be torn,
/// which is harmless — such a write is in the log, so the target drops this
/// copy; the record is then built from `buf`, which nothing else changes).
fn copy_live(host: u64, buf: &mut [u8]) {
    let src = host as *const u64;
    for (i, out) in buf.chunks_exact_mut(8).enumerate() {
        // SAFETY: `host..host + buf.len()` is a chunk of a RamRange the
        // caller of `Precopy::start` keeps mapped; chunks start page-aligned
        // and are whole pages long, so every 8-byte read is aligned and in it.
        let v = unsafe { src.add(i).read_volatile() };
        out.copy_from_slice(&v.to_ne_bytes());
    }
}

/// Chunks among the first `upto` that were sent and written since.
fn rewritten(sh: &Shared, upto: usize) -> u64 {
    let sent = lock(&sh.sent);
    let n = sh.chunks[..upto]
        .iter()
        .zip(sent.iter())
        .filter(|(ch, s)| **s && sh.log.written(ch.0))
        .count() as u64;
    sh.counters.chunks_rewritten.store(n, Ordering::Relaxed);
    n
}

/// Waits until the socket has no unsent or unacknowledged bytes (SIOCOUTQ),
/// for at most [`DRAIN_WAIT`].
fn drain(f: &File, quiet: &AtomicBool) {
    let t = Instant::now();
    while t.elapsed() < DRAIN_WAIT && !quiet.load(Ordering::Acquire) {
        let mut queued: libc::c_int = 0;
        // SAFETY: TIOCOUTQ (SIOCOUTQ) writes one int through the pointer.
        let r = unsafe { libc::ioctl(f.as_raw_fd(), libc::TIOCOUTQ, &mut queued) };
        if r != 0 || queued <= 0 {
            return;
        }
        std::thread::sleep(Duration::from_micros(500));
    }
}
