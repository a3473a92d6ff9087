//! The write-protect capture: no fork. Inside the pause every RAM range is
//! write-protected through a userfaultfd (one call per range, independent of
//! how much RAM is touched); the guest resumes at once. Then:
//!
//! - a **fault handler** thread takes each write-protect fault, copies the
//!   whole 2 MiB chunk around it into a buffer from a bounded pool and lifts
//!   the protection of the chunk: one fault per 2 MiB, not per 4 KiB page.
//!   With the pool empty it writes the chunk to the image itself before
//!   lifting the protection (slower for that writer, never a deadlock: it
//!   waits on nothing a vCPU holds — only, for a sink, on the device state,
//!   which the VMM sends right after the pause, so that the sink can begin);
//! - a **writer** thread walks RAM in order, copies and unprotects every
//!   chunk nobody faulted on yet, writes the handler's buffers, and finishes
//!   the image (same format as the fork capture; zero pages stay holes).
//!
//! Which thread takes a chunk is decided by one compare-and-swap per chunk,
//! so each is copied exactly once, while it is still protected: the image
//! holds RAM as of the protection.
//!
//! The fault handler belongs to the VM's [`WpEngine`], not to one capture:
//! it runs as long as the engine. A chunk copied by the writer stays
//! protected; the handler lifts the protection at the guest's first write
//! and records the chunk as written. So between captures the engine knows
//! which chunks changed since the last cut (one fault per 2 MiB chunk), and
//! a capture with a parent writes only those: an incremental image. If a
//! capture fails, its chunks count as changed again; the guest is never left
//! blocked (the handler serves every fault, capture or not).

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::capture::{
    call_on_done, lock, stats, Capture, DevSource, Shared, StateSender, TempImage, STATE_WAIT,
};
use crate::chain::IncrPlan;
use crate::error::{Result, SnapError};
use crate::image::{Header, ImageId, ImageRange, PAGE_SIZE};
use crate::sink::{Sink, SinkGuard};
use crate::wp_engine::Engine;
pub use crate::wp_engine::WpEngine;
use crate::{CaptureStats, CaptureStatus, DoneCallback};

/// The image ranges of `(gpa, len)` ranges (as any image of them lays them out).
fn ranges_of(ranges: &[(u64, u64)]) -> Result<Vec<ImageRange>> {
    Ok(Header::layout(ranges, 0)?.ranges)
}

/// Chunk size: copies and protection changes happen 2 MiB at a time.
pub const CHUNK: u64 = 2 << 20;

pub(crate) const FREE: u8 = 0;
/// Being copied.
pub(crate) const TAKEN: u8 = 1;
pub(crate) const COPIED: u8 = 2;

/// Options of a write-protect capture.
pub struct WpOptions {
    /// Write only the chunks changed since this image, which must be the
    /// latest image this engine captured ([`WpEngine::base`]); the image
    /// records it as its parent (by path and identity).
    pub parent: Option<PathBuf>,
    /// Bytes of buffers the fault handler may hold (rounded down to whole
    /// chunks, at least one).
    pub pool_bytes: u64,
    /// Called once when the capture ends, whatever the outcome.
    pub on_done: Option<DoneCallback>,
    /// Populate RAM before protecting it even with a userfaultfd that
    /// protects never-touched pages itself (for tests).
    pub always_populate: bool,
}

impl Default for WpOptions {
    fn default() -> Self {
        WpOptions {
            parent: None,
            pool_bytes: 64 << 20,
            on_done: None,
            always_populate: false,
        }
    }
}

/// What the write-protect capture did (for `query-migrate`).
#[derive(Debug, Default)]
pub struct WpCounters {
    /// Write-protect faults taken.
    pub faults: AtomicU64,
    /// Chunks copied by the fault handler into a pool buffer.
    pub chunks_by_fault: AtomicU64,
    /// Chunks the handler wrote out itself because the pool was empty.
    pub chunks_written_in_fault: AtomicU64,
    /// Chunks copied by the writer.
    pub chunks_by_writer: AtomicU64,
    /// Most pool buffers in use at once, in bytes.
    pub pool_high_water: AtomicU64,
    /// Chunks not written because they did not change since the parent.
    pub chunks_unchanged: AtomicU64,
}

/// A capture ready to start (everything done that can be with the guest running).
pub struct PreparedWpCapture {
    engine: Arc<Engine>,
    wp: Arc<Wp>,
    shared: Arc<Shared>,
    counters: Arc<WpCounters>,
    /// Tells the waiting writer to go (with the pause it took) or to give up.
    go: mpsc::SyncSender<Option<(Instant, Duration)>>,
    state_tx: mpsc::SyncSender<std::result::Result<Vec<u8>, String>>,
    /// `None` once started.
    thread: Option<std::thread::JoinHandle<Result<CaptureStats>>>,
}

impl Drop for PreparedWpCapture {
    /// Never started: the engine is free for another capture at once (the
    /// writer thread cleans up the rest).
    fn drop(&mut self) {
        if self.thread.is_some() {
            self.engine.end_capture(&self.wp, None);
        }
    }
}

/// Where the image goes: a temp file renamed into place, or a sink.
enum WpDest {
    File(TempImage),
    Sink(SinkGuard<Box<dyn Sink>>),
}

/// The image being written, shared by the handler and the writer.
enum Out {
    File(std::fs::File),
    /// `None` once committed; writes wait for `begin` (`ready`).
    Sink(Mutex<Option<SinkGuard<Box<dyn Sink>>>>),
}

/// Prepares a write-protect capture of the engine's RAM into `dest` with
/// the guest running: creates the temp file next to `dest` (an unusable
/// destination fails here), checks the parent of an incremental capture.
pub fn prepare_wp_capture(
    engine: &WpEngine,
    dest: &Path,
    opts: WpOptions,
) -> Result<PreparedWpCapture> {
    let plan = engine.plan(opts.parent.as_deref(), dest)?;
    let tmp = TempImage::create(dest)?;
    launch(&engine.shared, WpDest::File(tmp), plan, opts)
}

/// Like [`prepare_wp_capture`], into `sink` (the same image bytes; see
/// [`Sink`]). The sink's `begin` comes once the device state is known, right
/// after the pause; until then chunks wait in the pool. Always a full image.
pub fn prepare_wp_capture_to(
    engine: &WpEngine,
    sink: Box<dyn Sink>,
    opts: WpOptions,
) -> Result<PreparedWpCapture> {
    if opts.parent.is_some() {
        return Err(SnapError::InvalidInput(
            "an incremental snapshot can only be written to a file".into(),
        ));
    }
    let sink = SinkGuard::new(sink);
    launch(&engine.shared, WpDest::Sink(sink), None, opts)
}

/// What a cut decided: the chunks the capture writes and the ones it took
/// out of the record of changes.
pub(crate) struct Want {
    pub(crate) write: Vec<bool>,
    pub(crate) taken: Vec<bool>,
}

/// The threads' shared state of one capture.
pub(crate) struct Wp {
    pub(crate) engine: Arc<Engine>,
    pub(crate) state: Vec<AtomicU8>,
    /// Set at the cut.
    pub(crate) want: std::sync::OnceLock<Want>,
    pub(crate) incr: Option<IncrPlan>,
    /// The image's identity once its header is made.
    pub(crate) id: Mutex<Option<ImageId>>,
    out: Out,
    /// The image may be written (a sink has had its `begin`), or the
    /// capture ended: set once, under the mutex, with `ready_cv` notified.
    pub(crate) ready: Mutex<bool>,
    pub(crate) ready_cv: std::sync::Condvar,
    pub(crate) counters: Arc<WpCounters>,
    pub(crate) pool: Mutex<Vec<Vec<u8>>>,
    pub(crate) pool_total: usize,
    /// Pool buffers allocated so far.
    pub(crate) allocated: std::sync::atomic::AtomicUsize,
    pub(crate) first_error: Mutex<Option<SnapError>>,
}

impl Wp {
    pub(crate) fn claim(&self, i: usize) -> bool {
        self.state[i]
            .compare_exchange(FREE, TAKEN, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }

    pub(crate) fn wants(&self, i: usize) -> bool {
        self.want.get().is_some_and(|w| w.write[i])
    }

    /// Copies chunk `i` (still protected: nobody writes it) into `buf` and
    /// marks it copied.
    pub(crate) fn copy(&self, i: usize, buf: &mut [u8]) {
        let c = self.engine.chunks[i];
        // SAFETY: the chunk lies inside a RamRange (built from the ranges
        // validated by `prepare`), mapped for the capture's life by
        // RamRange's contract, and write-protected until `unprotect(i)`, so
        // no one writes it during the copy; `buf` holds at least `c.len` bytes.
        unsafe {
            std::ptr::copy_nonoverlapping(c.host as *const u8, buf.as_mut_ptr(), c.len as usize)
        };
        self.state[i].store(COPIED, Ordering::Release);
    }

    /// Writes the non-zero pages of chunk `i` (copied into `buf`); returns
    /// (bytes written, zero pages).
    pub(crate) fn write_out(&self, i: usize, buf: &[u8]) -> Result<(u64, u64)> {
        let c = self.engine.chunks[i];
        let (mut written, mut zero) = (0u64, 0u64);
        let page = PAGE_SIZE as usize;
        let mut p = 0usize;
        while p < c.len as usize {
            if is_zero(&buf[p..p + page]) {
                zero += 1;
                p += page;
                continue;
            }
            let mut q = p + page;
            while q < c.len as usize && !is_zero(&buf[q..q + page]) {
                q += page;
            }
            self.write_at(&buf[p..q], c.file_offset + p as u64)?;
            written += (q - p) as u64;
            p = q;
        }
        Ok((written, zero))
    }

    pub(crate) fn fail(&self, e: SnapError) {
        lock(&self.first_error).get_or_insert(e);
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        match &self.out {
            Out::File(f) => f
                .write_all_at(buf, offset)
                .map_err(|e| SnapError::io("write snapshot RAM", e)),
            Out::Sink(m) => match lock(m).as_mut() {
                Some(g) => g.write(buf, offset, "snapshot RAM"),
                None => Err(SnapError::Cancelled),
            },
        }
    }

    pub(crate) fn set_ready(&self) {
        *lock(&self.ready) = true;
        self.ready_cv.notify_all();
    }

    pub(crate) fn wait_ready(&self) {
        let mut r = lock(&self.ready);
        while !*r {
            r = self.ready_cv.wait(r).unwrap_or_else(|e| e.into_inner());
        }
    }
}

fn is_zero(b: &[u8]) -> bool {
    let (pre, words, post) = {
        // SAFETY: u64 has no invalid bit patterns; align_to only reinterprets
        // the aligned middle of the byte slice.
        unsafe { b.align_to::<u64>() }
    };
    pre.iter().all(|&x| x == 0) && words.iter().all(|&w| w == 0) && post.iter().all(|&x| x == 0)
}

/// What the handler hands the writer for one chunk.
pub(crate) enum Taken {
    /// Copied into a pool buffer: the writer writes it and returns the buffer.
    Copied(usize, Vec<u8>),
    /// Written by the handler itself (pool empty): bytes written, zero pages.
    Written(Result<(u64, u64)>),
}

/// Builds the capture's shared state and starts its writer with the guest
/// still running; the writer waits for [`PreparedWpCapture::start_deferred`].
fn launch(
    engine: &Arc<Engine>,
    dest: WpDest,
    incr: Option<IncrPlan>,
    opts: WpOptions,
) -> Result<PreparedWpCapture> {
    let ranges = &engine.ranges;
    let pairs: Vec<(u64, u64)> = ranges.iter().map(|r| (r.gpa, r.len)).collect();
    let header = Header::layout(&pairs, 0)?;
    if opts.always_populate || !engine.uffd.protects_unpopulated() {
        // The protection skips never-touched pages: map them (for reading:
        // the zero page) first, with the guest running. Pages do not become
        // untouched again (guest RAM is never discarded).
        for r in ranges {
            // SAFETY: the range is mapped (RamRange's contract).
            unsafe { crate::uffd::populate(r.host as u64, r.len) }
                .map_err(|e| SnapError::io("populate guest RAM", e))?;
        }
    }
    // Protect ahead, with the guest running: the cut then only protects
    // again the chunks written from now on (a few), so the pause does not
    // grow with RAM. Writes meanwhile are recorded by the handler as usual.
    {
        let _g = lock(&engine.cut_lock);
        engine
            .protect_open()
            .map_err(|e| SnapError::io("write-protect guest RAM", e))?;
    }
    let (out, tmp) = match dest {
        WpDest::File(tmp) => {
            let f = tmp
                .file
                .try_clone()
                .map_err(|e| SnapError::io("dup snapshot file", e))?;
            (Out::File(f), Some(tmp))
        }
        WpDest::Sink(g) => (Out::Sink(Mutex::new(Some(g))), None),
    };
    let counters = Arc::new(WpCounters::default());
    let wp = Arc::new(Wp {
        engine: engine.clone(),
        state: engine.chunks.iter().map(|_| AtomicU8::new(FREE)).collect(),
        want: std::sync::OnceLock::new(),
        incr,
        id: Mutex::new(None),
        out,
        ready: Mutex::new(tmp.is_some()),
        ready_cv: std::sync::Condvar::new(),
        counters: counters.clone(),
        pool: Mutex::new(Vec::new()),
        pool_total: (opts.pool_bytes / CHUNK).max(1) as usize,
        allocated: std::sync::atomic::AtomicUsize::new(0),
        first_error: Mutex::new(None),
    });
    let shared = Arc::new(Shared::new(header.ram_bytes()));
    let (tx, rx) = mpsc::channel::<Taken>();
    {
        let mut cur = lock(&engine.current);
        if cur.is_some() {
            return Err(SnapError::InvalidInput(
                "a write-protect capture of this RAM is already under way".into(),
            ));
        }
        *cur = Some((wp.clone(), tx));
    }
    let (go, go_rx) = mpsc::sync_channel::<Option<(Instant, Duration)>>(1);
    let (state_tx, state_rx) = mpsc::sync_channel(1);
    let (sh, w, on_done) = (shared.clone(), wp.clone(), opts.on_done);
    let spawned = std::thread::Builder::new()
        .name("livesnap-wp-writer".into())
        .spawn(move || {
            // The writer starts once the device state comes (right after the
            // guest resumed): woken earlier, it would compete with the pause
            // for a CPU. The cut has queued `go` by then.
            let first = state_rx.recv_timeout(STATE_WAIT);
            let (again, state_rx) = mpsc::sync_channel(1);
            if let Ok(m) = first {
                let _ = again.send(m);
            }
            drop(again);
            let Ok(Some((cut_at, pause_time))) = go_rx.recv() else {
                // Never started (the prepared capture was dropped): nothing
                // was cut; the temp file goes (or the sink aborts) with `tmp`
                // / `w`, and `on_done` is not called, as for a fork capture.
                w.engine.end_capture(&w, None);
                *lock(&sh.status) = CaptureStatus::Cancelled;
                return Err(SnapError::Cancelled);
            };
            let res = writer(
                &sh,
                &w,
                rx,
                tmp,
                DevSource::Later(state_rx),
                (cut_at, pause_time),
            );
            let id = res.as_ref().ok().and_then(|_| *lock(&w.id));
            w.engine.end_capture(&w, id);
            finish_status(&sh, &res);
            call_on_done(on_done, &res);
            res
        });
    let thread = match spawned {
        Ok(t) => t,
        Err(e) => {
            engine.end_capture(&wp, None);
            return Err(SnapError::io("spawn writer thread", e));
        }
    };
    Ok(PreparedWpCapture {
        engine: engine.clone(),
        wp,
        shared,
        counters,
        go,
        state_tx,
        thread: Some(thread),
    })
}

impl PreparedWpCapture {
    /// Inside the pause: write-protects every range (one call each), takes
    /// the record of changed chunks (what an incremental capture writes) and
    /// lets the waiting writer go; the guest may resume at once. The device
    /// state, saved at the same paused instant, comes through the returned
    /// [`StateSender`]. Dropping a prepared capture without starting it
    /// removes its temp file (or aborts its sink).
    pub fn start_deferred(mut self) -> Result<(Capture, StateSender, Arc<WpCounters>)> {
        let start = Instant::now();
        let e = &self.engine;
        {
            let _g = lock(&e.cut_lock);
            let base_moved = self
                .wp
                .incr
                .as_ref()
                .is_some_and(|p| *lock(&e.base) != Some(p.parent));
            if base_moved {
                drop(_g);
                e.end_capture(&self.wp, None);
                return Err(SnapError::InvalidInput(
                    "another snapshot completed since this incremental one was prepared: its parent is no longer the latest".into(),
                ));
            }
            if let Err(err) = e.protect_open() {
                // What was protected stays so: the handler lets writes
                // through as usual, and the record of changes is intact.
                drop(_g);
                e.end_capture(&self.wp, None);
                return Err(SnapError::io("write-protect guest RAM", err));
            }
            let taken: Vec<bool> = e
                .dirty
                .iter()
                .map(|d| d.swap(false, Ordering::AcqRel))
                .collect();
            let write = match &self.wp.incr {
                Some(_) => taken.clone(),
                None => vec![true; taken.len()],
            };
            let _ = self.wp.want.set(Want { write, taken });
        }
        let pause_time = start.elapsed();
        let _ = self.go.send(Some((start, pause_time)));
        Ok((
            Capture {
                shared: self.shared.clone(),
                thread: self.thread.take(),
                pid: 0,
                pause_time,
            },
            StateSender(self.state_tx.clone()),
            self.counters.clone(),
        ))
    }
}

fn finish_status(sh: &Shared, res: &Result<CaptureStats>) {
    *lock(&sh.status) = match res {
        Ok(s) => {
            tracing::info!(?s, "write-protect capture done");
            CaptureStatus::Completed
        }
        Err(SnapError::Cancelled) => CaptureStatus::Cancelled,
        Err(e) => {
            tracing::warn!("write-protect capture failed: {e}");
            CaptureStatus::Failed(e.to_string())
        }
    };
}

/// Marks a claimed chunk copied when dropped (a writer of it may go on).
struct MarkCopied<'a>(&'a AtomicU8);

impl Drop for MarkCopied<'_> {
    fn drop(&mut self) {
        self.0.store(COPIED, Ordering::Release);
    }
}

/// Copies every chunk not yet taken, writes everything, finishes the image;
/// whatever happens (a panicking sink included), the handler goes on
/// serving faults, so nobody stays blocked.
fn writer(
    sh: &Shared,
    wp: &Wp,
    rx: mpsc::Receiver<Taken>,
    tmp: Option<TempImage>,
    dev: DevSource,
    cut: (Instant, Duration),
) -> Result<CaptureStats> {
    let res = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        write_all(sh, wp, &rx, tmp, dev, cut)
    }))
    .unwrap_or_else(|_| {
        Err(SnapError::io(
            "capture writer",
            std::io::Error::other("writer thread panicked"),
        ))
    });
    if res.is_err() {
        // A sink that never began: the handler must not wait for it.
        if let Out::Sink(m) = &wp.out {
            lock(m).take();
        }
        wp.set_ready();
    }
    drop(rx);
    match res {
        Err(_) if sh.cancelled() => Err(SnapError::Cancelled),
        r => r,
    }
}

fn write_all(
    sh: &Shared,
    wp: &Wp,
    rx: &mpsc::Receiver<Taken>,
    tmp: Option<TempImage>,
    dev: DevSource,
    (cut_at, pause_time): (Instant, Duration),
) -> Result<CaptureStats> {
    let e = &wp.engine;
    let ranges: Vec<(u64, u64)> = e.ranges.iter().map(|r| (r.gpa, r.len)).collect();
    // A sink learns the image's length before the first write: wait for the
    // device state (it comes right after the pause; chunks wait in the pool).
    let mut dev = Some(dev);
    let mut early_dev = None;
    if let Out::Sink(m) = &wp.out {
        let dev = dev_wait(sh, &mut dev)?;
        let header = Header::layout(&ranges, dev.len() as u64)?;
        match lock(m).as_mut() {
            Some(g) => g.begin(header.file_len)?,
            None => return Err(SnapError::Cancelled),
        }
        early_dev = Some(dev);
        wp.set_ready();
    }
    let n = e.chunks.len();
    let mut done = 0usize;
    let mut unchanged = 0u64;
    let account = |w: u64, z: u64| {
        sh.written.fetch_add(w, Ordering::Relaxed);
        sh.zero_pages.fetch_add(z, Ordering::Relaxed);
    };
    let check = || -> Result<()> {
        if sh.cancelled() {
            return Err(SnapError::Cancelled);
        }
        if let Some(e) = lock(&wp.first_error).take() {
            return Err(e);
        }
        Ok(())
    };
    let take = |t: Taken, done: &mut usize| -> Result<()> {
        match t {
            Taken::Copied(i, b) => {
                let (w, z) = wp.write_out(i, &b[..e.chunks[i].len as usize])?;
                account(w, z);
                lock(&wp.pool).push(b);
            }
            Taken::Written(r) => {
                let (w, z) = r?;
                account(w, z);
            }
        }
        *done += 1;
        Ok(())
    };
    for i in 0..n {
        check()?;
        while let Ok(c) = rx.try_recv() {
            take(c, &mut done)?;
        }
        if !wp.wants(i) {
            // Unchanged since the parent: not in this image. It stays
            // protected; the handler records the guest's first write.
            unchanged += e.chunks[i].len;
            wp.counters.chunks_unchanged.fetch_add(1, Ordering::Relaxed);
            done += 1;
            continue;
        }
        if wp.claim(i) {
            let c = e.chunks[i];
            // Written straight from guest RAM (one copy, into the page
            // cache): the chunk is protected and claimed, so a writer waits
            // in the handler until it is marked copied, below — whatever the
            // outcome. It stays protected (the handler lifts the protection
            // at the guest's first write, and records it).
            // SAFETY: the chunk lies in a RamRange (mapped for the capture's
            // life by its contract) and nobody writes it while it is
            // borrowed: it is write-protected, and the handler lets no write
            // in before the state below says COPIED.
            let src = unsafe { std::slice::from_raw_parts(c.host as *const u8, c.len as usize) };
            // Marked copied whatever happens, a panicking sink included.
            let copied = MarkCopied(&wp.state[i]);
            let r = wp.write_out(i, src);
            drop(copied);
            wp.counters.chunks_by_writer.fetch_add(1, Ordering::Relaxed);
            let (w, z) = r?;
            account(w, z);
            done += 1;
        }
    }
    while done < n {
        check()?;
        match rx.recv_timeout(Duration::from_millis(50)) {
            Ok(c) => take(c, &mut done)?,
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                check()?;
                return Err(SnapError::io(
                    "fault handler",
                    std::io::Error::other("ended early"),
                ));
            }
        }
    }
    let ram_time = cut_at.elapsed();
    let dev = match early_dev {
        Some(d) => d,
        None => dev_wait(sh, &mut dev)?,
    };
    let (header, section) = match &wp.incr {
        Some(plan) => {
            let mut map = vec![0u8; crate::image::chunk_count(&ranges_of(&ranges)?).div_ceil(8)];
            for (c, w) in e.chunks.iter().zip(&wp.want.get().expect("cut").write) {
                if *w {
                    map[c.index / 8] |= 1 << (c.index % 8);
                }
            }
            let plan = IncrPlan {
                map,
                parent: plan.parent,
                parent_path: plan.parent_path.clone(),
            };
            let (h, sec) = plan.header(&ranges, &dev)?;
            (h, Some(sec))
        }
        None => {
            let mut h = Header::layout(&ranges, dev.len() as u64)?;
            h.dev_crc = crc32fast::hash(&dev);
            (h, None)
        }
    };
    *lock(&wp.id) = Some(ImageId {
        id: header.id,
        dev_crc: header.dev_crc,
    });
    check()?;
    let written = sh.written.load(Ordering::Relaxed);
    let zero = sh.zero_pages.load(Ordering::Relaxed);
    if written + zero * PAGE_SIZE + unchanged != header.ram_bytes() {
        return Err(SnapError::io(
            "write-protect capture",
            std::io::Error::other(format!(
                "accounted for {written} bytes written + {zero} zero pages + {unchanged} unchanged, RAM is {} bytes",
                header.ram_bytes()
            )),
        ));
    }
    let times = (pause_time, Duration::ZERO, ram_time, Duration::ZERO);
    match (tmp, &wp.out) {
        (Some(tmp), _) => {
            tmp.size(header.file_len)?;
            if let (Some(sec), Some(i)) = (&section, &header.incr) {
                tmp.file
                    .write_all_at(sec, i.offset)
                    .map_err(|e| SnapError::io("write incremental section", e))?;
            }
            tmp.finish(&header, &dev, || sh.cancelled())?
        }
        (None, Out::Sink(m)) => {
            let g = lock(m).take().ok_or(SnapError::Cancelled)?;
            let summary = crate::sink::summary(&header, written, zero, times);
            g.commit(&header, &dev, &summary, || sh.cancelled())?
        }
        (None, Out::File(_)) => unreachable!("a file capture has its temp file"),
    }
    Ok(stats(cut_at, &header, written, zero, times))
}

/// The device state, unless the capture is cancelled meanwhile.
fn dev_wait(sh: &Shared, dev: &mut Option<DevSource>) -> Result<Vec<u8>> {
    if sh.cancelled() {
        return Err(SnapError::Cancelled);
    }
    dev.take().ok_or(SnapError::Cancelled)?.wait()
}
