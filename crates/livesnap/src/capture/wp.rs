//! The write-protect capture: no fork. Inside the pause every RAM range is
//! write-protected through a userfaultfd (one call per range, independent of
//! how much RAM is touched); the guest resumes at once. Then:
//!
//! - a **fault handler** thread takes each write-protect fault, copies the
//!   whole 2 MiB chunk around it into a buffer from a bounded pool and lifts
//!   the protection of the chunk: one fault per 2 MiB, not per 4 KiB page.
//!   It never writes to the destination itself: with the pool empty it
//!   waits for the writer to free a buffer (one chunk's write) or for the
//!   pool's grower to make one (the pool grows ahead of the faults toward
//!   its cap while the host has memory to spare: see `wp_pool`),
//!   and, when the destination takes nothing for the stall limit, abandons
//!   the capture so that the guest runs on ([`SnapError::DestinationStalled`]);
//! - a **writer** thread (two for a file with direct I/O) writes the
//!   handler's buffers first, walks RAM in order copying every chunk nobody
//!   faulted on yet into its own buffer and writing that (a guest writing
//!   the chunk meanwhile waits for the copy, never for the destination),
//!   and finishes the image (same format as the fork capture; zero
//!   pages stay holes). A file is written with direct I/O where the file
//!   system allows it, so a write costs its device time and never sleeps in
//!   the kernel's dirty-page throttling while a guest waits on it.
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
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::capture::plan::IncrPlan;
use crate::capture::runtime::{
    call_on_done, stats, Capture, DevSource, Shared, StateSender, Times, STATE_WAIT,
};
use crate::capture::wp_engine::Engine;
pub use crate::capture::wp_engine::WpEngine;
pub use crate::capture::wp_options::{WpCounters, WpOptions};
use crate::capture::wp_pool::Pool;
use crate::capture::wp_state::{Out, Taken, Want, Wp, DIRECT_WRITERS};
use crate::error::{Result, SnapError};
use crate::format::image::ranges_of;
use crate::format::image::{Header, ImageId, PAGE_SIZE};
use crate::format::sink::{Destination, Sink, SinkGuard};
use crate::format::temp::TempImage;
use crate::kernel::buf::AlignedBuf;
use crate::kernel::lock;
use crate::ram::claims::Claims;
pub use crate::ram::waits::FaultWaits;
use crate::CHUNK;
use crate::{CaptureStats, CaptureStatus};

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
            self.engine.end_capture(&*self.wp, None);
        }
    }
}

/// Where the image goes: a temp file renamed into place, or a sink.
enum WpDest {
    File(TempImage),
    Sink(SinkGuard<Box<dyn Sink>>),
}

/// Prepares a write-protect capture of the engine's RAM into `dest` with
/// the guest running. Into a file: creates the temp file next to it (an
/// unusable destination fails here), checks the parent of an incremental
/// capture. Into a [`Sink`] (the same image bytes): its `begin` comes once
/// the device state is known, right after the pause; until then chunks wait
/// in the pool; always a full image.
pub fn prepare_wp_capture(
    engine: &WpEngine,
    dest: Destination,
    opts: WpOptions,
) -> Result<PreparedWpCapture> {
    match dest {
        Destination::File(path) => {
            let plan = engine.plan(opts.parent.as_deref(), &path)?;
            let tmp = TempImage::create(&path)?;
            launch(&engine.shared, WpDest::File(tmp), plan, opts)
        }
        Destination::Sink(sink) => {
            if opts.parent.is_some() {
                return Err(SnapError::InvalidInput(
                    "an incremental snapshot can only be written to a file".into(),
                ));
            }
            let sink = SinkGuard::new(sink);
            launch(&engine.shared, WpDest::Sink(sink), None, opts)
        }
    }
}

/// Makes the buffers a capture with `pool_bytes` of pool starts from (the
/// pool and the writers' own) and keeps them in the engine, so that even
/// the first capture's faults never wait for memory to be mapped (a fresh
/// buffer costs 1–8 ms here). For a caller about to capture for the first
/// time, with the guest running; buffers already kept count. Returns the
/// bytes kept now (fewer where memory is short).
pub fn prepare_pool(engine: &WpEngine, pool_bytes: u64) -> u64 {
    let want = (pool_bytes / CHUNK).max(1) as usize + DIRECT_WRITERS;
    let have = lock(&engine.shared.spare).len();
    // Made without holding the lock a capture takes its buffers under.
    let fresh: Vec<AlignedBuf> = (have..want)
        .map_while(|_| AlignedBuf::new(CHUNK as usize))
        .collect();
    let mut spare = lock(&engine.shared.spare);
    let room = want.saturating_sub(spare.len());
    spare.extend(fresh.into_iter().take(room));
    spare.len() as u64 * CHUNK
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
            unsafe { crate::kernel::uffd::populate(r.host as u64, r.len) }
                .map_err(|e| SnapError::io("populate guest RAM", e))?;
        }
    }
    let pool_total = (opts.pool_bytes / CHUNK).max(1) as usize;
    // Protect ahead, with the guest running: the cut then only protects
    // again the chunks written from now on (a few), so the pause does not
    // grow with RAM. Writes meanwhile are recorded by the handler as usual.
    {
        let _g = lock(&engine.cut_lock);
        engine
            .protect_open()
            .map_err(|e| SnapError::io("write-protect guest RAM", e))?;
    }
    let shared = Arc::new(Shared::new(header.ram_bytes()));
    let (out, tmp) = match dest {
        WpDest::File(tmp) => {
            let file = tmp
                .file
                .try_clone()
                .map_err(|e| SnapError::io("dup snapshot file", e))?;
            let direct = tmp.open_direct();
            (Out::File { file, direct }, Some(tmp))
        }
        WpDest::Sink(g) => {
            *lock(&shared.interrupt) = g.interrupter();
            (Out::Sink(Mutex::new(Some(g))), None)
        }
    };
    let counters = Arc::new(WpCounters::default());
    let direct = matches!(
        &out,
        Out::File {
            direct: Some(_),
            ..
        }
    );
    counters.direct_io.store(direct, Ordering::Relaxed);
    let kept: Vec<AlignedBuf> = {
        let mut spare = lock(&engine.spare);
        if !opts.keep_pool {
            spare.clear();
        }
        let n = spare.len().min(pool_total);
        spare.drain(..n).collect()
    };
    let n_kept = kept.len();
    counters.pool_kept.store(n_kept as u64, Ordering::Relaxed);
    let (tx, rx) = mpsc::channel::<Taken>();
    let wp = Arc::new(Wp {
        engine: engine.clone(),
        claims: Claims::new(engine.chunks.len()),
        want: std::sync::OnceLock::new(),
        incr,
        id: Mutex::new(None),
        out,
        counters: counters.clone(),
        // Kept from the last capture, else made as faults need them
        // (buffers come mapped and populated: see AlignedBuf): making the
        // pool here, just before the cut, made the pause longer.
        pool: Pool::new(
            kept,
            pool_total,
            // Never more than the RAM captured.
            ((opts.pool_max_bytes / CHUNK) as usize).min(engine.chunks.len()),
            crate::kernel::mem_total().unwrap_or(0) / 100 * u64::from(opts.pool_keep_free_percent),
            counters.clone(),
        ),
        stall_limit: opts.stall_limit,
        keep_pool: opts.keep_pool,
        first_error: Mutex::new(None),
        gave_up: std::sync::atomic::AtomicBool::new(false),
        direct_ok: std::sync::atomic::AtomicBool::new(direct),
        shared: shared.clone(),
        handover: Mutex::new(Some(tx)),
    });
    {
        let mut cur = lock(&engine.current);
        if cur.is_some() {
            return Err(SnapError::InvalidInput(
                "a write-protect capture of this RAM is already under way".into(),
            ));
        }
        *cur = Some(wp.clone());
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
                w.engine.end_capture(&*w, None);
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
            w.engine.end_capture(&*w, id);
            finish_status(&sh, &res);
            call_on_done(on_done, &res);
            res
        });
    let thread = match spawned {
        Ok(t) => t,
        Err(e) => {
            engine.end_capture(&*wp, None);
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
                e.end_capture(&*self.wp, None);
                return Err(SnapError::InvalidInput(
                    "another snapshot completed since this incremental one was prepared: its parent is no longer the latest".into(),
                ));
            }
            if let Err(err) = e.protect_open() {
                // What was protected stays so: the handler lets writes
                // through as usual, and the record of changes is intact.
                drop(_g);
                e.end_capture(&*self.wp, None);
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
        write_all(sh, wp, rx, tmp, dev, cut)
    }))
    .unwrap_or_else(|_| {
        Err(SnapError::io(
            "capture writer",
            std::io::Error::other("writer thread panicked"),
        ))
    });
    if let Err(e) = &res {
        tracing::debug!("write-protect capture writer ends: {e}");
        wp.give_up();
    }
    // The sink is settled: nothing to interrupt any more.
    lock(&sh.interrupt).take();
    match res {
        Err(_) if sh.cancelled() => Err(SnapError::Cancelled),
        // The handler's reason (a stalled destination) comes before what it
        // caused here (an interrupted write).
        Err(e) => Err(lock(&wp.first_error).take().unwrap_or(e)),
        r => r,
    }
}

fn write_all(
    sh: &Shared,
    wp: &Wp,
    rx: mpsc::Receiver<Taken>,
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
    }
    let unchanged = write_ram(sh, wp, rx)?;
    let ram_time = cut_at.elapsed();
    let dev = match early_dev {
        Some(d) => d,
        None => dev_wait(sh, &mut dev)?,
    };
    let (header, section) = match &wp.incr {
        Some(plan) => {
            let mut map =
                vec![0u8; crate::format::image::chunk_count(&ranges_of(&ranges)?).div_ceil(8)];
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
    if sh.cancelled() {
        return Err(SnapError::Cancelled);
    }
    if let Some(e) = lock(&wp.first_error).take() {
        return Err(e);
    }
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
    let times = Times {
        pause: pause_time,
        ram: ram_time,
        ..Times::default()
    };
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
            let summary = crate::capture::runtime::summary(&header, written, zero, times);
            g.commit(&header, &dev, &summary, || sh.cancelled())?
        }
        (None, Out::File { .. }) => unreachable!("a file capture has its temp file"),
    }
    Ok(stats(cut_at, &header, written, zero, times))
}

/// Writes every chunk of the capture — the handler's buffers first, then the
/// rest in order, each copied into the writer's own buffer —, with [`DIRECT_WRITERS`] threads
/// for a file with direct I/O, this one alone otherwise. Returns the bytes
/// left out as unchanged since the parent.
fn write_ram(sh: &Shared, wp: &Wp, rx: mpsc::Receiver<Taken>) -> Result<u64> {
    let ram = RamWriter {
        sh,
        wp,
        rx: Mutex::new(rx),
        next: std::sync::atomic::AtomicUsize::new(0),
        done: std::sync::atomic::AtomicUsize::new(0),
        unchanged: AtomicU64::new(0),
        stop: std::sync::atomic::AtomicBool::new(false),
    };
    let writers = match &wp.out {
        Out::File {
            direct: Some(_), ..
        } => DIRECT_WRITERS,
        _ => 1,
    };
    let res = std::thread::scope(|s| {
        // Buffers made ahead of the faults while the writers write, on CPU
        // time nothing else wants: run beside the vCPUs (even at nice 10)
        // it delayed them by 2–5 ms at times (docs/BENCHMARKS.md).
        let grower = wp.pool.grows().then(|| {
            std::thread::Builder::new()
                .name("livesnap-wp-grow".into())
                .spawn_scoped(s, || {
                    crate::kernel::idle_only();
                    wp.pool.grow()
                })
        });
        let helpers: Vec<_> = (1..writers)
            .map(|_| {
                std::thread::Builder::new()
                    .name("livesnap-wp-io".into())
                    .spawn_scoped(s, || ram.run())
            })
            .collect();
        let mut res = ram.run();
        for h in helpers {
            let r = match h {
                Ok(h) => h.join().unwrap_or_else(|_| {
                    Err(SnapError::io(
                        "capture writer",
                        std::io::Error::other("writer thread panicked"),
                    ))
                }),
                // One writer fewer: this one did all the work.
                Err(_) => Ok(()),
            };
            // The first real error wins over the others' "stopped".
            if matches!(res, Ok(()) | Err(SnapError::Cancelled)) && r.is_err() {
                res = r;
            }
        }
        wp.pool.stop_growing();
        if let Some(Ok(g)) = grower {
            let _ = g.join();
        }
        res
    });
    res?;
    Ok(ram.unchanged.load(Ordering::Relaxed))
}

/// What the writer threads of one capture share.
struct RamWriter<'a> {
    sh: &'a Shared,
    wp: &'a Wp,
    rx: Mutex<mpsc::Receiver<Taken>>,
    /// The next chunk to look at, in order.
    next: std::sync::atomic::AtomicUsize,
    /// Chunks written (by anyone) or left out.
    done: std::sync::atomic::AtomicUsize,
    unchanged: AtomicU64,
    /// A writer failed: the others stop.
    stop: std::sync::atomic::AtomicBool,
}

impl RamWriter<'_> {
    fn run(&self) -> Result<()> {
        // Not lowered below the vCPUs (nice 10): that halved what a 2-vCPU
        // guest on 2 CPUs felt, but where the guest takes every CPU the
        // writers starved (ten snapshots of a Linux guest in a 1-CPU VM
        // took 2.4× as long). docs/BENCHMARKS.md has the figures. Instead a
        // writer lets a vCPU it preempted run after each chunk it saves
        // (`let_others_run`): same share of the CPU, shorter turns.
        let r = self.work();
        if r.is_err() {
            self.stop.store(true, Ordering::Release);
        }
        r
    }

    fn check(&self) -> Result<()> {
        if self.sh.cancelled() || self.stop.load(Ordering::Acquire) {
            return Err(SnapError::Cancelled);
        }
        if let Some(e) = lock(&self.wp.first_error).take() {
            return Err(e);
        }
        Ok(())
    }

    fn account(&self, (w, z): (u64, u64)) {
        self.sh.written.fetch_add(w, Ordering::Relaxed);
        self.sh.zero_pages.fetch_add(z, Ordering::Relaxed);
        self.done.fetch_add(1, Ordering::AcqRel);
    }

    /// Writes a chunk the handler copied, and gives its buffer back.
    fn take(&self, Taken(i, b): Taken) -> Result<()> {
        let r = self
            .wp
            .write_out(i, &b[..self.wp.engine.chunks[i].len as usize]);
        self.wp.give_back(b);
        self.account(r?);
        Ok(())
    }

    fn work(&self) -> Result<()> {
        let (wp, e) = (self.wp, &self.wp.engine);
        let n = e.chunks.len();
        // This writer's own buffer (see below), kept from the last capture
        // where there is one.
        let kept = lock(&e.spare).pop();
        let mut own = match kept {
            Some(b) => b,
            None => AlignedBuf::new(CHUNK as usize).ok_or_else(|| {
                SnapError::io(
                    "allocate a copy buffer",
                    std::io::Error::from(std::io::ErrorKind::OutOfMemory),
                )
            })?,
        };
        loop {
            self.check()?;
            // The handler's buffers first: a fault may be waiting for one.
            let t = lock(&self.rx).try_recv();
            if let Ok(t) = t {
                self.take(t)?;
                continue;
            }
            let i = self.next.fetch_add(1, Ordering::AcqRel);
            if i >= n {
                break;
            }
            if !wp.wants(i) {
                // Unchanged since the parent: not in this image. It stays
                // protected; the handler records the guest's first write.
                self.unchanged.fetch_add(e.chunks[i].len, Ordering::Relaxed);
                wp.counters.chunks_unchanged.fetch_add(1, Ordering::Relaxed);
                self.done.fetch_add(1, Ordering::AcqRel);
                continue;
            }
            if !wp.claim(i) {
                continue; // the handler copied it: it comes through `rx`
            }
            // Copied first (a memcpy: what a guest writing this chunk waits
            // for), then written: a destination that is slow for a moment —
            // a disk's hiccup, a stream that stalls — never holds a guest.
            let c = e.chunks[i];
            wp.copy(i, &mut own);
            wp.counters.chunks_by_writer.fetch_add(1, Ordering::Relaxed);
            self.account(wp.write_out(i, &own[..c.len as usize])?);
            crate::kernel::let_others_run();
        }
        // Every chunk is taken: write what the handler still hands over.
        while self.done.load(Ordering::Acquire) < n {
            self.check()?;
            let t = lock(&self.rx).recv_timeout(Duration::from_millis(2));
            match t {
                Ok(t) => self.take(t)?,
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    self.check()?;
                    return Err(SnapError::io(
                        "fault handler",
                        std::io::Error::other("ended early"),
                    ));
                }
            }
        }
        // Kept with the pool for the next capture.
        wp.give_back(own);
        Ok(())
    }
}

/// The device state, unless the capture is cancelled meanwhile.
fn dev_wait(sh: &Shared, dev: &mut Option<DevSource>) -> Result<Vec<u8>> {
    if sh.cancelled() {
        return Err(SnapError::Cancelled);
    }
    dev.take().ok_or(SnapError::Cancelled)?.wait()
}
