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
//! holds RAM as of the protection. On failure or cancel every range is
//! unprotected before the threads end, so the guest never stays blocked.

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::capture::{
    call_on_done, lock, stats, Capture, DevSource, Shared, StateSender, TempImage,
};
use crate::error::{Result, SnapError};
use crate::image::{Header, PAGE_SIZE};
use crate::sink::{Sink, SinkGuard};
use crate::uffd::Uffd;
use crate::{CaptureStats, CaptureStatus, DoneCallback, RamRange};

/// Chunk size: copies and protection changes happen 2 MiB at a time.
pub const CHUNK: u64 = 2 << 20;

const FREE: u8 = 0;
const TAKEN: u8 = 1;

/// Options of a write-protect capture.
pub struct WpOptions {
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
}

/// One chunk of guest RAM and where it goes in the image.
#[derive(Debug, Clone, Copy)]
struct Chunk {
    host: u64,
    len: u64,
    file_offset: u64,
}

/// Registered RAM ready to be captured: the userfaultfd the ranges are
/// registered with (for write-protect faults) must outlive the capture.
pub struct PreparedWpCapture {
    wp: Arc<Wp>,
    shared: Arc<Shared>,
    counters: Arc<WpCounters>,
    /// Tells the waiting writer to go (with the pause it took) or to give up.
    go: mpsc::SyncSender<Option<(Instant, Duration)>>,
    state_tx: mpsc::SyncSender<std::result::Result<Vec<u8>, String>>,
    thread: std::thread::JoinHandle<Result<CaptureStats>>,
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

/// Prepares a write-protect capture of `ranges` into `dest` with the guest
/// running: validates the ranges, creates the temp file next to `dest` (an
/// unusable destination fails here). The ranges must be registered with
/// `uffd` in write-protect mode ([`Uffd::register_wp`]).
pub fn prepare_wp_capture(
    uffd: Arc<Uffd>,
    ranges: &[RamRange],
    dest: &Path,
    opts: WpOptions,
) -> Result<PreparedWpCapture> {
    let chunks = chunks_of(ranges)?;
    let tmp = TempImage::create(dest)?;
    launch(uffd, ranges, chunks, WpDest::File(tmp), opts)
}

/// Like [`prepare_wp_capture`], into `sink` (the same image bytes; see
/// [`Sink`]). The sink's `begin` comes once the device state is known, right
/// after the pause; until then chunks wait in the pool.
pub fn prepare_wp_capture_to(
    uffd: Arc<Uffd>,
    ranges: &[RamRange],
    sink: Box<dyn Sink>,
    opts: WpOptions,
) -> Result<PreparedWpCapture> {
    let sink = SinkGuard::new(sink);
    let chunks = chunks_of(ranges)?;
    launch(uffd, ranges, chunks, WpDest::Sink(sink), opts)
}

/// Validates the ranges and cuts them into chunks with their image offsets.
fn chunks_of(ranges: &[RamRange]) -> Result<Vec<Chunk>> {
    let (header, _) = crate::capture::prepare(ranges, 0)?;
    let mut chunks = Vec::new();
    for (r, ir) in ranges.iter().zip(&header.ranges) {
        let (start, end) = (r.host as u64, r.host as u64 + r.len);
        let mut at = start;
        while at < end {
            let next = ((at / CHUNK) + 1) * CHUNK;
            let len = next.min(end) - at;
            chunks.push(Chunk {
                host: at,
                len,
                file_offset: ir.file_offset + (at - start),
            });
            at += len;
        }
    }
    chunks.sort_by_key(|c| c.host);
    Ok(chunks)
}

/// The threads' shared state.
struct Wp {
    uffd: Arc<Uffd>,
    ranges: Vec<RamRange>,
    chunks: Vec<Chunk>,
    state: Vec<AtomicU8>,
    out: Out,
    /// The image may be written (a sink has had its `begin`), or the
    /// capture ended: set once, under the mutex, with `ready_cv` notified.
    ready: Mutex<bool>,
    ready_cv: std::sync::Condvar,
    counters: Arc<WpCounters>,
    pool: Mutex<Vec<Vec<u8>>>,
    pool_total: usize,
    stop_handler: AtomicBool,
    first_error: Mutex<Option<SnapError>>,
}

impl Wp {
    fn chunk_of(&self, addr: u64) -> Option<usize> {
        let i = self.chunks.partition_point(|c| c.host + c.len <= addr);
        (i < self.chunks.len() && self.chunks[i].host <= addr).then_some(i)
    }

    fn claim(&self, i: usize) -> bool {
        self.state[i]
            .compare_exchange(FREE, TAKEN, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }

    /// Copies chunk `i` (still protected: nobody writes it) into `buf`.
    fn copy(&self, i: usize, buf: &mut [u8]) {
        let c = self.chunks[i];
        // SAFETY: the chunk lies inside a RamRange (built from the ranges
        // validated by `prepare`), mapped for the capture's life by
        // RamRange's contract, and write-protected until `unprotect(i)`, so
        // no one writes it during the copy; `buf` holds at least `c.len` bytes.
        unsafe {
            std::ptr::copy_nonoverlapping(c.host as *const u8, buf.as_mut_ptr(), c.len as usize)
        };
    }

    fn unprotect(&self, i: usize) -> Result<()> {
        let c = self.chunks[i];
        self.uffd
            .write_protect(c.host, c.len, false)
            .map_err(|e| SnapError::io("unprotect guest RAM", e))
    }

    /// Lifts every protection (after a failure or cancel: no vCPU may stay blocked).
    fn unprotect_all(&self) {
        for r in &self.ranges {
            if let Err(e) = self.uffd.write_protect(r.host as u64, r.len, false) {
                tracing::error!("cannot unprotect guest RAM: {e}");
            }
        }
    }

    /// Writes the non-zero pages of chunk `i` (copied into `buf`); returns
    /// (bytes written, zero pages).
    fn write_out(&self, i: usize, buf: &[u8]) -> Result<(u64, u64)> {
        let c = self.chunks[i];
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

    fn fail(&self, e: SnapError) {
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

    fn set_ready(&self) {
        *lock(&self.ready) = true;
        self.ready_cv.notify_all();
    }

    fn wait_ready(&self) {
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
enum Taken {
    /// Copied into a pool buffer: the writer writes it and returns the buffer.
    Copied(usize, Vec<u8>),
    /// Written by the handler itself (pool empty): bytes written, zero pages.
    Written(Result<(u64, u64)>),
}

/// Builds the shared state and starts both threads with the guest still
/// running; the writer waits for [`PreparedWpCapture::start_deferred`].
fn launch(
    uffd: Arc<Uffd>,
    ranges: &[RamRange],
    chunks: Vec<Chunk>,
    dest: WpDest,
    opts: WpOptions,
) -> Result<PreparedWpCapture> {
    let pairs: Vec<(u64, u64)> = ranges.iter().map(|r| (r.gpa, r.len)).collect();
    let header = Header::layout(&pairs, 0)?;
    if opts.always_populate || !uffd.protects_unpopulated() {
        // The protection skips never-touched pages: map them (for reading:
        // the zero page) first, with the guest still running. Pages do not
        // become untouched again (guest RAM is never discarded).
        for r in ranges {
            // SAFETY: the range is mapped (RamRange's contract).
            unsafe { crate::uffd::populate(r.host as u64, r.len) }
                .map_err(|e| SnapError::io("populate guest RAM", e))?;
        }
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
        uffd,
        state: chunks.iter().map(|_| AtomicU8::new(FREE)).collect(),
        chunks,
        ranges: ranges.to_vec(),
        out,
        ready: Mutex::new(tmp.is_some()),
        ready_cv: std::sync::Condvar::new(),
        counters: counters.clone(),
        pool: Mutex::new(Vec::new()),
        pool_total: (opts.pool_bytes / CHUNK).max(1) as usize,
        stop_handler: AtomicBool::new(false),
        first_error: Mutex::new(None),
    });
    let shared = Arc::new(Shared::new(header.ram_bytes()));
    let (tx, rx) = mpsc::channel::<Taken>();
    let handler = {
        let wp = wp.clone();
        std::thread::Builder::new()
            .name("livesnap-wp-fault".into())
            .spawn(move || fault_handler(&wp, tx))
            .map_err(|e| SnapError::io("spawn fault handler", e))?
    };
    let (go, go_rx) = mpsc::sync_channel::<Option<(Instant, Duration)>>(1);
    let (state_tx, state_rx) = mpsc::sync_channel(1);
    let (sh, w, on_done) = (shared.clone(), wp.clone(), opts.on_done);
    let spawned = std::thread::Builder::new()
        .name("livesnap-wp-writer".into())
        .spawn(move || {
            let Ok(Some((cut_at, pause_time))) = go_rx.recv() else {
                // Never started (the prepared capture was dropped): nothing is
                // protected; the temp file goes (or the sink aborts) with `tmp`
                // / `w`, and `on_done` is not called, as for a fork capture.
                w.stop_handler.store(true, Ordering::Release);
                let _ = handler.join();
                *lock(&sh.status) = CaptureStatus::Cancelled;
                return Err(SnapError::Cancelled);
            };
            let res = writer(
                &sh,
                &w,
                rx,
                handler,
                tmp,
                DevSource::Later(state_rx),
                (cut_at, pause_time),
            );
            finish_status(&sh, &res);
            call_on_done(on_done, &res);
            res
        });
    let thread = match spawned {
        Ok(t) => t,
        Err(e) => {
            wp.stop_handler.store(true, Ordering::Release);
            return Err(SnapError::io("spawn writer thread", e));
        }
    };
    Ok(PreparedWpCapture {
        wp,
        shared,
        counters,
        go,
        state_tx,
        thread,
    })
}

impl PreparedWpCapture {
    /// Inside the pause: write-protects every range (one call each) and lets
    /// the waiting writer go; the guest may resume at once. The device state,
    /// saved at the same paused instant, comes through the returned
    /// [`StateSender`]. Dropping a prepared capture without starting it
    /// removes its temp file (or aborts its sink).
    pub fn start_deferred(self) -> Result<(Capture, StateSender, Arc<WpCounters>)> {
        let start = Instant::now();
        let ranges = &self.wp.ranges;
        for (k, r) in ranges.iter().enumerate() {
            if let Err(e) = self.wp.uffd.write_protect(r.host as u64, r.len, true) {
                for r in &ranges[..=k] {
                    let _ = self.wp.uffd.write_protect(r.host as u64, r.len, false);
                }
                return Err(SnapError::io("write-protect guest RAM", e));
            }
        }
        let pause_time = start.elapsed();
        let _ = self.go.send(Some((start, pause_time)));
        Ok((
            Capture {
                shared: self.shared,
                thread: Some(self.thread),
                pid: 0,
                pause_time,
            },
            StateSender(self.state_tx),
            self.counters,
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

/// Takes write-protect faults until told to stop.
fn fault_handler(wp: &Wp, tx: mpsc::Sender<Taken>) {
    // A faulting vCPU waits for this thread: let it run before the writer
    // and the other threads when CPUs are scarce (needs CAP_SYS_NICE; without
    // it the thread keeps its priority).
    // SAFETY: setpriority on this thread's own id; no memory is involved.
    if unsafe { libc::setpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t, -10) } != 0 {
        tracing::debug!(
            "fault handler keeps its priority: {}",
            std::io::Error::last_os_error()
        );
    }
    // Buffers allocated so far (at most the pool's size), and free ones.
    let mut allocated = 0usize;
    let mut free: Vec<Vec<u8>> = Vec::new();
    while !wp.stop_handler.load(Ordering::Acquire) {
        let fault = match wp.uffd.next_fault(Duration::from_millis(20)) {
            Ok(Some(f)) => f,
            Ok(None) => continue,
            Err(e) => {
                wp.fail(SnapError::io("read userfaultfd", e));
                wp.unprotect_all();
                return;
            }
        };
        if !fault.wp {
            continue;
        }
        wp.counters.faults.fetch_add(1, Ordering::Relaxed);
        let Some(i) = wp.chunk_of(fault.addr) else {
            continue;
        };
        if !wp.claim(i) {
            // The writer has it: its unprotect wakes the faulting thread.
            continue;
        }
        free.append(&mut lock(&wp.pool));
        let buf = match free.pop() {
            Some(b) => Some(b),
            None if allocated < wp.pool_total => {
                allocated += 1;
                Some(vec![0u8; CHUNK as usize])
            }
            None => None,
        };
        let taken = match buf {
            Some(mut b) => {
                wp.copy(i, &mut b);
                let in_flight = (allocated - free.len()) as u64 * CHUNK;
                wp.counters
                    .pool_high_water
                    .fetch_max(in_flight, Ordering::Relaxed);
                wp.counters.chunks_by_fault.fetch_add(1, Ordering::Relaxed);
                Taken::Copied(i, b)
            }
            None => {
                // Pool empty: write this chunk out before letting the guest in
                // (waits on the disk only, never on a vCPU).
                let mut b = vec![0u8; CHUNK as usize];
                wp.copy(i, &mut b);
                wp.wait_ready();
                let r = wp.write_out(i, &b[..wp.chunks[i].len as usize]);
                wp.counters
                    .chunks_written_in_fault
                    .fetch_add(1, Ordering::Relaxed);
                Taken::Written(r)
            }
        };
        if let Err(e) = wp.unprotect(i) {
            wp.fail(e);
        }
        if tx.send(taken).is_err() {
            // The writer is gone (failed or cancelled): let every writer in.
            wp.unprotect_all();
            return;
        }
    }
}

/// Copies every chunk not yet taken, writes everything, finishes the image;
/// whatever happens (a panicking sink included), nothing stays protected.
#[allow(clippy::too_many_arguments)]
fn writer(
    sh: &Shared,
    wp: &Wp,
    rx: mpsc::Receiver<Taken>,
    handler: std::thread::JoinHandle<()>,
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
        wp.unprotect_all();
        // A sink that never began: the handler must not wait for it.
        if let Out::Sink(m) = &wp.out {
            lock(m).take();
        }
        wp.set_ready();
    }
    wp.stop_handler.store(true, Ordering::Release);
    drop(rx);
    let _ = handler.join();
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
    let ranges: Vec<(u64, u64)> = wp.ranges.iter().map(|r| (r.gpa, r.len)).collect();
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
    let n = wp.chunks.len();
    let mut done = 0usize;
    let mut own = vec![0u8; CHUNK as usize];
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
                let (w, z) = wp.write_out(i, &b[..wp.chunks[i].len as usize])?;
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
        if wp.claim(i) {
            let len = wp.chunks[i].len as usize;
            wp.copy(i, &mut own[..len]);
            wp.unprotect(i)?;
            wp.counters.chunks_by_writer.fetch_add(1, Ordering::Relaxed);
            let (w, z) = wp.write_out(i, &own[..len])?;
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
    let mut header = Header::layout(&ranges, dev.len() as u64)?;
    header.dev_crc = crc32fast::hash(&dev);
    check()?;
    let written = sh.written.load(Ordering::Relaxed);
    let zero = sh.zero_pages.load(Ordering::Relaxed);
    if written + zero * PAGE_SIZE != header.ram_bytes() {
        return Err(SnapError::io(
            "write-protect capture",
            std::io::Error::other(format!(
                "accounted for {written} bytes written + {zero} zero pages, RAM is {} bytes",
                header.ram_bytes()
            )),
        ));
    }
    let times = (pause_time, Duration::ZERO, ram_time, Duration::ZERO);
    match (tmp, &wp.out) {
        (Some(tmp), _) => {
            tmp.size(header.file_len)?;
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
