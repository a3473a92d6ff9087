//! The fill: a restore into fresh anonymous memory, filled on demand
//! (userfaultfd missing mode) and in the background.
//!
//! Guest RAM is fresh anonymous memory, never touched, registered with a
//! userfaultfd in missing mode; the guest runs at once. Then:
//!
//! - a **fault handler** thread takes each missing-page fault (a vCPU, KVM,
//!   or a VMM thread touching RAM not filled yet) and fills the whole 2 MiB
//!   chunk around it from the page source in one `UFFDIO_COPY`, which wakes
//!   the faulting thread; a chunk that is a hole of the image gets the zero
//!   page (`UFFDIO_ZEROPAGE`) without reading anything;
//! - a **prefetch** thread walks RAM in order and fills every chunk that has
//!   data and that nobody has faulted on yet; holes are left alone.
//!
//! Chunks are copied from one staging buffer that stays mapped
//! (`UFFDIO_COPY`), not moved into place (`UFFDIO_MOVE`, which would keep a
//! staging huge page huge): moving empties the staging chunk, and mapping it
//! again with fresh memory cost 5–11 ms per 2 MiB on these hosts whenever
//! huge pages were slow to come, which made a 1 GiB fill take 2.3–2.5 s in
//! most runs (the guest crawling meanwhile) against a steady 0.36 s copying.
//! The filled RAM is 4 KiB-mapped; the default (write-protect) capture
//! snapshots it with the same pause.
//!
//! One compare-and-swap per chunk decides which thread fills it. When every
//! chunk with data is filled the ranges are unregistered: what is left
//! (holes) is ordinary never-touched anonymous memory, zero when read —
//! exactly the image's content. From then on RAM is plain anonymous memory:
//! snapshots of it pause like a booted VM's, and huge pages can be rebuilt
//! (`MADV_COLLAPSE`) where the fork capture needs them.
//!
//! The page source is an interface ([`PageSource`]): a file now; any other
//! source (a socket to a migration peer) implements the same two calls.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::error::{Result, SnapError};
use crate::format::image::ImageRange;
use crate::format::source::PageSource;
use crate::kernel::lock;
use crate::kernel::uffd::{Filled, Uffd};
use crate::ram::claims::{ChunkState, Claims};
use crate::ram::RamChunk;
use crate::{RamRange, CHUNK};

/// Why a fill ended when its [`Fill`] was dropped.
const STOPPED: &str = "the restore's fill was stopped";

/// What a fill did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FillStats {
    /// Missing-page faults taken.
    pub faults: u64,
    /// Chunks filled for a faulting thread.
    pub chunks_by_fault: u64,
    /// Chunks filled by the prefetch thread.
    pub chunks_by_prefetch: u64,
    /// Chunks that were holes of the image when a thread touched them (zero page).
    pub zero_chunks: u64,
    /// Pages placed for a faulting thread ahead of their chunk (a migration
    /// source that sends the page asked for first).
    pub pages_first: u64,
    /// Bytes read from the page source.
    pub bytes_read: u64,
    /// Start to the last chunk filled.
    pub elapsed: Duration,
    /// How long the fault handler took over each chunk it filled for a
    /// faulting thread (what that thread waited, less the queueing before
    /// the handler read its fault).
    pub fault_fills: crate::ram::waits::WaitSummary,
    /// The part of those waits spent on the source (a chunk still on its
    /// way from a migration source, a read from the image).
    pub fault_source_waits: crate::ram::waits::WaitSummary,
}

/// Called once when the fill ends (not when it is dropped before): its
/// figures, or why it failed. On
/// failure the chunks not filled can never be: a thread touching them would
/// wait for ever, so the caller must end the VM.
pub type FillDone = Box<dyn FnOnce(std::result::Result<FillStats, String>) + Send>;

struct FillState {
    uffd: Uffd,
    source: Arc<dyn PageSource>,
    chunks: Vec<RamChunk>,
    /// Chunk indexes in image-offset order.
    by_offset: Vec<usize>,
    /// Pages in place before the fill began (offsets in their chunk, sorted).
    placed: std::collections::HashMap<usize, Vec<u64>>,
    /// Pages placed ahead of their chunk since (offsets in their chunk).
    ahead: Mutex<std::collections::HashMap<usize, Vec<u64>>>,
    pages_first: AtomicU64,
    /// A chunk left Partial has some pages placed ahead of the rest
    /// ([`PageSource::page_first`]); whoever claims it next fills the rest.
    claims: Claims,
    ranges: Vec<(u64, u64)>,
    stop: AtomicBool,
    /// The [`Fill`] was dropped: nobody is told the outcome.
    dropped: AtomicBool,
    /// Why the handler gave up (it then sets `stop`).
    handler_error: Mutex<Option<String>>,
    faults: AtomicU64,
    by_fault: AtomicU64,
    by_prefetch: AtomicU64,
    zero: AtomicU64,
    read: AtomicU64,
    fault_fills: crate::ram::waits::WaitHistogram,
    fault_source_waits: crate::ram::waits::WaitHistogram,
    /// `None` while filling; then the outcome.
    outcome: Mutex<Option<std::result::Result<FillStats, String>>>,
    outcome_cv: Condvar,
}

/// A fill under way (or finished). Dropping it stops both threads
/// and closes the userfaultfd: RAM not filled by then reads as zeros, so
/// drop it only with the VM gone (or paused for good) or after
/// [`Fill::wait`].
pub struct Fill {
    fill: Arc<FillState>,
    threads: Vec<std::thread::JoinHandle<()>>,
    go: Option<std::sync::mpsc::SyncSender<()>>,
}

/// Starts filling `ranges` (guest RAM: never-touched anonymous memory) from
/// `source`, where `image[i]` says where range `i` lies in it. Returns once
/// the ranges are registered: the guest may run at once. Faults are served
/// from now on; the background prefetch waits for [`Fill::go`], so that
/// it does not compete with the rest of the restore (its fills take the
/// process's memory-map lock, which creating threads and vCPUs needs too).
pub fn start_fill(
    ranges: &[RamRange],
    image: &[ImageRange],
    source: Arc<dyn PageSource>,
    on_done: Option<FillDone>,
) -> Result<Fill> {
    start_fill_with(ranges, image, source, on_done, &[])
}

/// [`start_fill`] with some pages known already (image offset, 4 KiB
/// each; e.g. those a live migration sends with the device state): they are
/// in place when this returns, and their chunks are later filled around them.
pub fn start_fill_with(
    ranges: &[RamRange],
    image: &[ImageRange],
    source: Arc<dyn PageSource>,
    on_done: Option<FillDone>,
    early: &[(u64, Vec<u8>)],
) -> Result<Fill> {
    if ranges.len() != image.len()
        || ranges
            .iter()
            .zip(image)
            .any(|(r, i)| r.len != i.len || r.gpa != i.gpa)
    {
        return Err(SnapError::InvalidInput(
            "the image's RAM ranges are not the machine's".into(),
        ));
    }
    if ranges
        .iter()
        .any(|r| r.host as u64 % crate::PAGE_SIZE != 0 || r.len % crate::PAGE_SIZE != 0)
    {
        return Err(SnapError::InvalidInput(
            "guest RAM ranges must be page-aligned".into(),
        ));
    }
    let mut chunks = crate::ram::chunks(ranges, image.iter().map(|r| r.file_offset));
    chunks.sort_by_key(|c| c.host);
    let uffd = Uffd::new_missing().map_err(|e| SnapError::io("open userfaultfd", e))?;
    let pairs: Vec<(u64, u64)> = ranges.iter().map(|r| (r.host as u64, r.len)).collect();
    for &(a, l) in &pairs {
        uffd.register_missing(a, l)
            .map_err(|e| SnapError::io("register guest RAM for missing-page faults", e))?;
    }
    let mut by_offset: Vec<usize> = (0..chunks.len()).collect();
    by_offset.sort_by_key(|&i| chunks[i].file_offset);
    let mut placed: std::collections::HashMap<usize, Vec<u64>> = Default::default();
    for (off, page) in early {
        let j = by_offset.partition_point(|&i| chunks[i].file_offset + chunks[i].len <= *off);
        let Some(&i) = by_offset.get(j).filter(|&&i| chunks[i].file_offset <= *off) else {
            return Err(SnapError::InvalidInput(format!(
                "an early page at {off:#x} is not in guest RAM"
            )));
        };
        let c = chunks[i];
        if page.len() as u64 != crate::PAGE_SIZE || (off - c.file_offset) % crate::PAGE_SIZE != 0 {
            return Err(SnapError::InvalidInput(
                "an early page is not one aligned page".into(),
            ));
        }
        let at = off - c.file_offset;
        if placed.get(&i).is_some_and(|v| v.contains(&at)) {
            continue;
        }
        match uffd.copy(c.host + at, page) {
            Ok(Filled::All) => placed.entry(i).or_default().push(at),
            Ok(Filled::Exists) => {
                return Err(SnapError::InvalidInput(
                    "guest RAM was touched before it was restored".into(),
                ))
            }
            Err(e) => return Err(SnapError::io("place an early page", e)),
        }
    }
    for v in placed.values_mut() {
        v.sort_unstable();
    }
    let fill = Arc::new(FillState {
        placed,
        ahead: Mutex::new(Default::default()),
        pages_first: AtomicU64::new(0),
        uffd,
        source,
        claims: Claims::new(chunks.len()),
        by_offset,
        chunks,
        ranges: pairs,
        stop: AtomicBool::new(false),
        dropped: AtomicBool::new(false),
        handler_error: Mutex::new(None),
        faults: AtomicU64::new(0),
        by_fault: AtomicU64::new(0),
        by_prefetch: AtomicU64::new(0),
        zero: AtomicU64::new(0),
        read: AtomicU64::new(0),
        fault_fills: Default::default(),
        fault_source_waits: Default::default(),
        outcome: Mutex::new(None),
        outcome_cv: Condvar::new(),
    });
    let t0 = Instant::now();
    let f = fill.clone();
    let handler = std::thread::Builder::new()
        .name("livesnap-fill-fault".into())
        .spawn(move || fault_handler(&f))
        .map_err(|e| SnapError::io("spawn fault handler", e))?;
    let f = fill.clone();
    let (go, go_rx) = std::sync::mpsc::sync_channel::<()>(1);
    let prefetch = std::thread::Builder::new()
        .name("livesnap-fill-prefetch".into())
        .spawn(move || {
            // Dropped without `go`: the receive fails and the walk stops at once.
            let _ = go_rx.recv();
            let res = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                prefetch(&f, handler, t0)
            }))
            .unwrap_or_else(|_| Err("the prefetch thread panicked".to_string()));
            match &res {
                Ok(s) => tracing::info!(?s, "fill complete"),
                Err(e) if f.dropped.load(Ordering::Acquire) => {
                    tracing::debug!("fill stopped: {e}")
                }
                Err(e) => tracing::error!("fill failed: {e}"),
            }
            *lock(&f.outcome) = Some(res.clone());
            f.outcome_cv.notify_all();
            if let Some(cb) = on_done.filter(|_| !f.dropped.load(Ordering::Acquire)) {
                cb(res);
            }
        });
    let prefetch = match prefetch {
        Ok(t) => t,
        Err(e) => {
            fill.stop.store(true, Ordering::Release);
            return Err(SnapError::io("spawn prefetch thread", e));
        }
    };
    Ok(Fill {
        fill,
        threads: vec![prefetch],
        go: Some(go),
    })
}

impl Fill {
    /// Lets the background prefetch begin (once the VM runs). Until then only
    /// the chunks threads touch are filled.
    pub fn go(&mut self) {
        if let Some(g) = self.go.take() {
            let _ = g.send(());
        }
    }

    /// Whether every chunk is in place (or the fill failed).
    pub fn is_finished(&self) -> bool {
        lock(&self.fill.outcome).is_some()
    }

    /// Waits until RAM is complete; its figures, or why it can never be.
    /// Lets the prefetch begin if it had not.
    pub fn wait(&mut self) -> std::result::Result<FillStats, String> {
        self.go();
        let mut o = lock(&self.fill.outcome);
        loop {
            if let Some(r) = o.as_ref() {
                return r.clone();
            }
            o = self
                .fill
                .outcome_cv
                .wait(o)
                .unwrap_or_else(|e| e.into_inner());
        }
    }

    /// The figures so far.
    pub fn progress(&self) -> FillStats {
        self.fill.stats(Duration::ZERO)
    }
}

impl Drop for Fill {
    fn drop(&mut self) {
        self.fill.dropped.store(true, Ordering::Release);
        self.fill.stop.store(true, Ordering::Release);
        // A thread may wait inside the source (a page from afar): release it.
        self.fill.source.cancel();
        self.go.take();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl FillState {
    fn handler_failed(&self, why: String) {
        lock(&self.handler_error).get_or_insert(why);
        self.stop.store(true, Ordering::Release);
        // The prefetch may wait inside the source: let it see the stop.
        self.source.cancel();
    }

    /// Why the fill stopped early: the handler's error, or a drop.
    fn stopped(&self) -> String {
        lock(&self.handler_error)
            .clone()
            .unwrap_or_else(|| STOPPED.to_string())
    }

    /// Fills chunk `i` around the pages placed before the fill began (one
    /// copy or zero-page call per run between them) and marks it done.
    fn fill_around(
        &self,
        i: usize,
        placed: &[u64],
        staging: &mut Staging,
        timed: Option<&crate::ram::waits::WaitHistogram>,
    ) -> std::result::Result<(), String> {
        let c = self.chunks[i];
        let t = Instant::now();
        let hole = self.source.is_hole(c.file_offset, c.len);
        let buf = staging.bytes(c.len as usize);
        if hole {
            self.zero.fetch_add(1, Ordering::Relaxed);
        } else {
            self.source
                .read_at(buf, c.file_offset)
                .map_err(|e| format!("cannot read guest RAM from the snapshot: {e}"))?;
            self.read.fetch_add(c.len, Ordering::Relaxed);
        }
        if let Some(h) = timed {
            h.record(t.elapsed());
        }
        let mut at = 0u64;
        let ends = placed.iter().copied().chain(std::iter::once(c.len));
        for p in ends {
            if p > at {
                let r = if hole {
                    self.uffd.zeropage(c.host + at, p - at)
                } else {
                    self.uffd.copy(c.host + at, &buf[at as usize..p as usize])
                };
                outcome_at(r, c.host + at)?;
            }
            at = p + crate::PAGE_SIZE;
        }
        self.claims.done(i);
        Ok(())
    }

    /// The prefetch's turn at chunk `i`: filled unless someone has it, or it
    /// is a hole (left alone: never-touched memory reads as zeros).
    fn prefetch_one(&self, i: usize, buf: &mut Staging) -> std::result::Result<(), String> {
        let c = self.chunks[i];
        let claimed = if self.claims.state(i) == ChunkState::Partial {
            self.claims.claim_partial(i)
        } else {
            self.claims.state(i) == ChunkState::Free
                && !self.source.is_hole(c.file_offset, c.len)
                && self.claims.claim(i)
        };
        if claimed {
            self.fill(i, buf, None)?;
            self.by_prefetch.fetch_add(1, Ordering::Relaxed);
            // A vCPU this thread kept off its CPU (one a fault woke) goes
            // first: after one chunk, not after a time slice.
            crate::kernel::let_others_run();
        }
        Ok(())
    }

    /// The chunk at image offset `off`.
    fn chunk_at_offset(&self, off: u64) -> Option<usize> {
        let j = self
            .by_offset
            .partition_point(|&i| self.chunks[i].file_offset < off);
        let i = *self.by_offset.get(j)?;
        (self.chunks[i].file_offset == off).then_some(i)
    }

    fn chunk_of(&self, addr: u64) -> Option<usize> {
        let i = self.chunks.partition_point(|c| c.host + c.len <= addr);
        (i < self.chunks.len() && self.chunks[i].host <= addr).then_some(i)
    }

    /// The faulting page of chunk `i` (claimed by the caller) alone, ahead
    /// of the rest, when the source sends it that way; leaves the chunk
    /// PARTIAL. False: the whole chunk is to be filled now.
    fn place_ahead(&self, i: usize, addr: u64) -> std::result::Result<bool, String> {
        let c = self.chunks[i];
        let at = (addr - c.host) & !(crate::PAGE_SIZE - 1);
        let Some(page) = self.source.page_first(c.file_offset + at) else {
            return Ok(false);
        };
        let page = page.map_err(|e| format!("cannot read guest RAM from the snapshot: {e}"))?;
        outcome_at(self.uffd.copy(c.host + at, &page), c.host + at)?;
        lock(&self.ahead).entry(i).or_default().push(at);
        self.pages_first.fetch_add(1, Ordering::Relaxed);
        self.claims.leave_partial(i);
        Ok(true)
    }

    fn stats(&self, elapsed: Duration) -> FillStats {
        FillStats {
            faults: self.faults.load(Ordering::Relaxed),
            chunks_by_fault: self.by_fault.load(Ordering::Relaxed),
            chunks_by_prefetch: self.by_prefetch.load(Ordering::Relaxed),
            zero_chunks: self.zero.load(Ordering::Relaxed),
            pages_first: self.pages_first.load(Ordering::Relaxed),
            bytes_read: self.read.load(Ordering::Relaxed),
            elapsed,
            fault_fills: self.fault_fills.summary(),
            fault_source_waits: self.fault_source_waits.summary(),
        }
    }

    /// Fills chunk `i` (claimed by the caller) and marks it done; `timed`
    /// records how long the source took.
    fn fill(
        &self,
        i: usize,
        staging: &mut Staging,
        timed: Option<&crate::ram::waits::WaitHistogram>,
    ) -> std::result::Result<(), String> {
        let c = self.chunks[i];
        let ahead = lock(&self.ahead).remove(&i);
        if ahead.is_some() || self.placed.contains_key(&i) {
            let mut placed = self.placed.get(&i).cloned().unwrap_or_default();
            placed.extend(ahead.unwrap_or_default());
            placed.sort_unstable();
            placed.dedup();
            return self.fill_around(i, &placed, staging, timed);
        }
        let t = Instant::now();
        let r = if self.source.is_hole(c.file_offset, c.len) {
            if let Some(h) = timed {
                h.record(t.elapsed());
            }
            self.zero.fetch_add(1, Ordering::Relaxed);
            self.uffd.zeropage(c.host, c.len)
        } else {
            let buf = staging.bytes(c.len as usize);
            self.source
                .read_at(buf, c.file_offset)
                .map_err(|e| format!("cannot read guest RAM from the snapshot: {e}"))?;
            if let Some(h) = timed {
                h.record(t.elapsed());
            }
            self.read.fetch_add(c.len, Ordering::Relaxed);
            self.uffd.copy(c.host, buf)
        };
        outcome_at(r, c.host)?;
        self.claims.done(i);
        Ok(())
    }
}

/// The outcome of placing memory at `addr`. Exists: a page there was
/// present already (the kernel filled nothing past it); that cannot happen
/// to memory never touched, so say so rather than leave a hole.
fn outcome_at(r: io::Result<Filled>, addr: u64) -> std::result::Result<(), String> {
    match r {
        Ok(Filled::All) => Ok(()),
        Ok(Filled::Exists) => Err(format!(
            "guest RAM at {addr:#x} was touched before it was restored"
        )),
        Err(e) => Err(format!("cannot fill guest RAM: {e}")),
    }
}

/// A fault on the debug timeline ([`crate::kernel::timeline`]), logged when
/// the handler is done with it.
struct Timeline(u64, u64);

impl Timeline {
    fn start(addr: u64) -> Option<Timeline> {
        crate::kernel::timeline::on().then(|| Timeline(crate::kernel::monotonic_us(), addr))
    }
}

impl Drop for Timeline {
    fn drop(&mut self) {
        crate::kernel::timeline::fault(self.0, self.1);
    }
}

/// Takes missing-page faults until told to stop.
fn fault_handler(f: &FillState) {
    // A faulting vCPU waits for this thread. Not real-time: it may place a
    // whole chunk, or wait for one, with the vCPUs' CPUs in use.
    crate::kernel::serve_faults_first("the fill's fault handler", false);
    let mut buf = match Staging::new() {
        Ok(b) => b,
        Err(e) => return f.handler_failed(format!("cannot map a staging buffer: {e}")),
    };
    while !f.stop.load(Ordering::Acquire) {
        let fault = match f.uffd.next_fault(Duration::from_millis(20)) {
            Ok(Some(x)) => x,
            Ok(None) => continue,
            Err(e) => return f.handler_failed(format!("cannot read userfaultfd: {e}")),
        };
        f.faults.fetch_add(1, Ordering::Relaxed);
        let _timeline = Timeline::start(fault.addr);
        let Some(i) = f.chunk_of(fault.addr) else {
            continue;
        };
        if f.claims.claim(i) || f.claims.claim_partial(i) {
            let c = f.chunks[i];
            let t = Instant::now();
            // A page placed ahead already (a fault that came in between):
            // the copy woke it; wake again in case (a spare wake is harmless).
            let at = (fault.addr - c.host) & !(crate::PAGE_SIZE - 1);
            if lock(&f.ahead).get(&i).is_some_and(|v| v.contains(&at)) {
                f.claims.leave_partial(i);
                let _ = f.uffd.wake(c.host + at, crate::PAGE_SIZE);
                continue;
            }
            // The page alone first where the source sends it so; the rest
            // of the chunk follows (the prefetch places it on arrival).
            match f.place_ahead(i, fault.addr) {
                Ok(true) => {
                    f.fault_fills.record(t.elapsed());
                    f.fault_source_waits.record(t.elapsed());
                    // The rest now if it is here (the faulting thread runs on
                    // meanwhile: it goes first if it waits for this CPU),
                    // else when it arrives.
                    crate::kernel::let_others_run();
                    if f.source.arrived(c.file_offset, c.len) && f.claims.claim_partial(i) {
                        if let Err(e) = f.fill(i, &mut buf, None) {
                            return f.handler_failed(e);
                        }
                        f.by_fault.fetch_add(1, Ordering::Relaxed);
                    }
                    continue;
                }
                Ok(false) => {}
                Err(e) => return f.handler_failed(e),
            }
            f.source.want(c.file_offset, c.len);
            match f.fill(i, &mut buf, Some(&f.fault_source_waits)) {
                Ok(()) => {
                    f.fault_fills.record(t.elapsed());
                    f.by_fault.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) => return f.handler_failed(e),
            }
        } else if f.claims.state(i) == ChunkState::Done {
            // Filled meanwhile: the fill woke the range already; wake again in
            // case the fault came in between (a spare wake is harmless).
            let c = f.chunks[i];
            let _ = f.uffd.wake(c.host, c.len);
        }
        // Taken: the prefetch thread's fill wakes the faulting thread.
    }
}

/// Fills every chunk with data in order, waits for the handler's, then
/// unregisters RAM and stops the handler.
fn prefetch(
    f: &FillState,
    handler: std::thread::JoinHandle<()>,
    t0: Instant,
) -> std::result::Result<FillStats, String> {
    // Background work: a vCPU woken from a fault must not queue behind a
    // chunk's placing on its CPU (traced at a live migration's switch: a
    // woken vCPU waited 2.8 ms for this thread while the other CPU idled).
    crate::kernel::background();
    let res = (|| {
        let mut buf = Staging::new().map_err(|e| format!("cannot map a staging buffer: {e}"))?;
        if f.source.pushes() {
            // In the order the chunks arrive: waiting for one in RAM order
            // would hold every later one in the source's memory.
            while let Some(off) = f.source.next_arrived() {
                if f.stop.load(Ordering::Acquire) {
                    return Err(f.stopped());
                }
                // Chunks are in host-address order, which need not be the
                // image's (RAM regions are mapped separately).
                let Some(i) = f.chunk_at_offset(off) else {
                    return Err(format!(
                        "the source sent a chunk at {off:#x}, which is none of RAM's"
                    ));
                };
                f.prefetch_one(i, &mut buf)?;
            }
            if f.stop.load(Ordering::Acquire) {
                return Err(f.stopped());
            }
        }
        for i in 0..f.chunks.len() {
            if f.stop.load(Ordering::Acquire) {
                return Err(f.stopped());
            }
            f.prefetch_one(i, &mut buf)?;
        }
        // Chunks the handler took: wait until it filled them (or left them
        // partly placed: then fill the rest here).
        for i in 0..f.chunks.len() {
            loop {
                match f.claims.state(i) {
                    ChunkState::Taken => {}
                    ChunkState::Partial => f.prefetch_one(i, &mut buf)?,
                    _ => break,
                }
                if f.stop.load(Ordering::Acquire) {
                    return Err(f.stopped());
                }
                std::thread::sleep(Duration::from_micros(200));
            }
        }
        Ok(())
    })();
    let elapsed = t0.elapsed();
    // What is left are holes: stop the handler, then unregister (which wakes
    // anyone waiting in a hole; they find ordinary zero memory).
    f.stop.store(true, Ordering::Release);
    let _ = handler.join();
    res?;
    if let Some(e) = lock(&f.handler_error).clone() {
        return Err(e);
    }
    for &(a, l) in &f.ranges {
        f.uffd
            .unregister(a, l)
            .map_err(|e| format!("cannot unregister guest RAM: {e}"))?;
    }
    Ok(f.stats(elapsed))
}

/// One chunk of 2 MiB-aligned private anonymous memory (huge-page advised)
/// that a filler reads into before handing the pages to guest RAM.
struct Staging {
    map: *mut libc::c_void,
    map_len: usize,
    chunk: *mut u8,
}

impl Staging {
    fn new() -> io::Result<Staging> {
        let map_len = 2 * CHUNK as usize;
        // SAFETY: a fresh anonymous private mapping; touches nothing else.
        let map = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                map_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if map == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let chunk = (map as usize).next_multiple_of(CHUNK as usize) as *mut u8;
        // SAFETY: advice on the mapping made above; failure only means no THP.
        unsafe { libc::madvise(chunk.cast(), CHUNK as usize, libc::MADV_HUGEPAGE) };
        Ok(Staging {
            map,
            map_len,
            chunk,
        })
    }

    /// The first `len` (at most [`CHUNK`]) bytes.
    fn bytes(&mut self, len: usize) -> &mut [u8] {
        assert!(len <= CHUNK as usize);
        // SAFETY: `chunk..chunk + CHUNK` lies inside the mapping (aligned up
        // by less than CHUNK in a 2 * CHUNK mapping), which lives as long as
        // `self`, borrowed mutably here.
        unsafe { std::slice::from_raw_parts_mut(self.chunk, len) }
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in `new`; no slice of it
        // outlives `self`.
        unsafe { libc::munmap(self.map, self.map_len) };
    }
}
