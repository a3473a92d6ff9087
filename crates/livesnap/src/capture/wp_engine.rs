//! The write-protect engine of one VM's RAM (see [`crate::capture::wp`]):
//! the userfaultfd registration, the record of which 2 MiB chunks the guest
//! wrote since the last cut, and the fault handler thread that serves every
//! write-protect fault for as long as the engine lives — recording the
//! chunk, copying it first for a capture under way, lifting its protection.

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::capture::plan::IncrPlan;
use crate::error::{Result, SnapError};
use crate::format::image::ImageId;
use crate::kernel::lock;
use crate::kernel::uffd::Uffd;
use crate::ram::waits::WaitCause;
use crate::ram::RamChunk;
use crate::RamRange;
use crate::CHUNK;

/// Validates the ranges and cuts them into chunks with their image offsets
/// and incremental chunk numbers (ranges must start 2 MiB-aligned in host
/// memory for the two to agree, as guest RAM does).
pub(crate) fn chunks_of(ranges: &[RamRange]) -> Result<Vec<RamChunk>> {
    let (header, _) = crate::capture::runtime::prepare(ranges, 0)?;
    for r in ranges {
        if r.host as u64 % CHUNK != 0 {
            return Err(SnapError::InvalidInput(format!(
                "RAM range at {:#x}: its host memory must start 2 MiB-aligned",
                r.gpa
            )));
        }
    }
    let mut chunks = crate::ram::chunks(ranges, header.ranges.iter().map(|r| r.file_offset));
    chunks.sort_by_key(|c| c.host);
    Ok(chunks)
}

/// The write-protect engine of one VM's RAM: its userfaultfd registration
/// and the thread that takes its faults, for as long as the engine lives
/// (see the module documentation). Dropping it lifts every protection.
pub struct WpEngine {
    pub(crate) shared: Arc<Engine>,
    thread: Option<std::thread::JoinHandle<()>>,
}

pub(crate) struct Engine {
    pub(crate) uffd: Arc<Uffd>,
    pub(crate) ranges: Vec<RamRange>,
    pub(crate) chunks: Vec<RamChunk>,
    /// Chunks written since the last cut (by index into `chunks`).
    pub(crate) dirty: Vec<AtomicBool>,
    /// Chunks written since the last [`WpEngine::mark`] (a live migration's
    /// pre-copy); kept apart from `dirty`, which incremental captures own.
    pub(crate) marked: Vec<AtomicBool>,
    /// Chunks not write-protected now (changed under `cut_lock` only).
    pub(crate) open: Vec<AtomicBool>,
    /// Held while a fault is decided and its chunk unprotected, and by the
    /// cut while it protects RAM and takes the dirty set: no write slips
    /// between the two unrecorded.
    pub(crate) cut_lock: Mutex<()>,
    /// The capture under way.
    pub(crate) current: Mutex<Option<Arc<dyn FaultHook>>>,
    /// The image whose cut the dirty set counts from (`None` before the
    /// first complete capture, or after tracking broke).
    pub(crate) base: Mutex<Option<ImageId>>,
    pub(crate) stop: AtomicBool,
    /// The fault handler ended on an error: nothing may be protected again.
    pub(crate) dead: AtomicBool,
    /// Faults taken between captures (chunks let through and recorded).
    pub(crate) tracked: AtomicU64,
    /// Pool buffers kept from the last capture for the next one (see
    /// [`crate::capture::wp::WpOptions::keep_pool`]): a fresh buffer costs
    /// milliseconds to map while the guest runs, a kept one nothing.
    pub(crate) spare: Mutex<Vec<crate::kernel::buf::AlignedBuf>>,
}

impl WpEngine {
    /// Registers `ranges` with a new userfaultfd in write-protect mode and
    /// starts the fault handler.
    pub fn new(ranges: &[RamRange]) -> Result<WpEngine> {
        let uffd = Uffd::new_wp().map_err(|e| SnapError::io("open userfaultfd", e))?;
        WpEngine::with_uffd(Arc::new(uffd), ranges)
    }

    /// Like [`WpEngine::new`] with a given (not yet registered) userfaultfd.
    pub fn with_uffd(uffd: Arc<Uffd>, ranges: &[RamRange]) -> Result<WpEngine> {
        let chunks = chunks_of(ranges)?;
        for r in ranges {
            uffd.register_wp(r.host as u64, r.len)
                .map_err(|e| SnapError::io("register guest RAM for write-protect faults", e))?;
        }
        let shared = Arc::new(Engine {
            uffd,
            ranges: ranges.to_vec(),
            dirty: chunks.iter().map(|_| AtomicBool::new(true)).collect(),
            marked: chunks.iter().map(|_| AtomicBool::new(true)).collect(),
            open: chunks.iter().map(|_| AtomicBool::new(true)).collect(),
            chunks,
            cut_lock: Mutex::new(()),
            current: Mutex::new(None),
            base: Mutex::new(None),
            stop: AtomicBool::new(false),
            dead: AtomicBool::new(false),
            tracked: AtomicU64::new(0),
            spare: Mutex::new(Vec::new()),
        });
        let e = shared.clone();
        let thread = std::thread::Builder::new()
            .name("livesnap-wp-fault".into())
            .spawn(move || fault_handler(&e))
            .map_err(|e| SnapError::io("spawn fault handler", e))?;
        Ok(WpEngine {
            shared,
            thread: Some(thread),
        })
    }

    /// Whether the engine still serves faults (after an error reading its
    /// userfaultfd it cannot: drop it, and build a new one for new captures).
    pub fn is_alive(&self) -> bool {
        !self.shared.dead.load(Ordering::Acquire)
    }

    /// The latest image captured by this engine whose cut the record of
    /// changed chunks counts from: the only possible parent of an
    /// incremental capture.
    pub fn base(&self) -> Option<ImageId> {
        *lock(&self.shared.base)
    }

    /// Bytes of pool buffers kept between captures (see
    /// [`crate::capture::wp::WpOptions::keep_pool`]).
    pub fn kept_pool_bytes(&self) -> u64 {
        lock(&self.shared.spare).len() as u64 * CHUNK
    }

    /// Frees the pool buffers kept between captures.
    pub fn release_pool(&self) {
        lock(&self.shared.spare).clear();
    }

    /// Bytes of RAM changed since the last cut (whole chunks).
    pub fn dirty_bytes(&self) -> u64 {
        let e = &self.shared;
        e.chunks
            .iter()
            .zip(&e.dirty)
            .filter(|(_, d)| d.load(Ordering::Relaxed))
            .map(|(c, _)| c.len)
            .sum()
    }

    /// Starts a second record of written chunks, apart from the one
    /// incremental captures use: clears it and write-protects every chunk,
    /// so that from now on the first write to each is recorded
    /// ([`crate::format::wire::WriteLog`]).
    pub fn mark(&self) -> Result<()> {
        let e = &self.shared;
        if !e.uffd.protects_unpopulated() {
            // The protection skips never-touched pages, whose first write
            // would then go unrecorded: map them (for reading: the zero
            // page) first. Pages do not become untouched again.
            for r in &e.ranges {
                // SAFETY: the range is mapped (RamRange's contract).
                unsafe { crate::kernel::uffd::populate(r.host as u64, r.len) }
                    .map_err(|err| SnapError::io("populate guest RAM", err))?;
            }
        }
        let _g = lock(&e.cut_lock);
        for m in &e.marked {
            m.store(false, Ordering::Relaxed);
        }
        e.protect_open()
            .map(|_| ())
            .map_err(|err| SnapError::io("write-protect guest RAM", err))
    }

    /// Faults taken outside captures (first writes to chunks since a cut).
    pub fn tracked_faults(&self) -> u64 {
        self.shared.tracked.load(Ordering::Relaxed)
    }

    /// What an incremental capture against `parent` records, checked.
    pub(crate) fn plan(&self, parent: Option<&Path>, dest: &Path) -> Result<Option<IncrPlan>> {
        let Some(parent) = parent else {
            return Ok(None);
        };
        let img = crate::Image::open(parent).map_err(|e| SnapError::ParentMissing {
            path: parent.to_path_buf(),
            source: Box::new(e),
        })?;
        let found = img.id();
        match self.base() {
            Some(b) if b == found => {}
            Some(b) => {
                return Err(SnapError::InvalidInput(format!(
                    "{} is not this VM's latest snapshot (it is {found}, the latest is {b}): take a full snapshot, or use the latest as parent",
                    parent.display()
                )))
            }
            None => {
                return Err(SnapError::InvalidInput(format!(
                    "this VM has no complete snapshot to be incremental to ({} is not one of its own): take a full snapshot first",
                    parent.display()
                )))
            }
        }
        let abs = std::fs::canonicalize(parent)
            .map_err(|e| SnapError::io(format!("resolve {}", parent.display()), e))?;
        if let Ok(dest) = std::fs::canonicalize(dest) {
            let chain = crate::format::chain::Chain::open(&abs)?;
            if chain
                .paths()
                .any(|p| std::fs::canonicalize(p).ok().as_ref() == Some(&dest))
            {
                return Err(SnapError::InvalidInput(
                    "an incremental snapshot cannot replace its own parent or an older image of its chain".into(),
                ));
            }
        }
        let path = abs.to_string_lossy().into_owned();
        if path.len() > 4096 {
            return Err(SnapError::InvalidInput("parent path too long".into()));
        }
        Ok(Some(IncrPlan {
            parent: found,
            parent_path: path,
            map: Vec::new(),
        }))
    }
}

impl crate::format::wire::WriteLog for WpEngine {
    /// Whether the chunk at `host` was written since [`WpEngine::mark`]
    /// (an address outside guest RAM counts as written).
    fn written(&self, host: u64) -> bool {
        let e = &self.shared;
        e.chunk_of(host)
            .map_or(true, |i| e.marked[i].load(Ordering::Acquire))
    }
}

impl Drop for WpEngine {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        // Nobody serves faults any more: let every writer through. (Guest
        // RAM may be unmapped already: errors are expected then.)
        for r in &self.shared.ranges {
            if let Err(e) = self.shared.uffd.write_protect(r.host as u64, r.len, false) {
                tracing::debug!("unprotect guest RAM at engine end: {e}");
            }
        }
    }
}

impl Engine {
    pub(crate) fn chunk_of(&self, addr: u64) -> Option<usize> {
        let i = self.chunks.partition_point(|c| c.host + c.len <= addr);
        (i < self.chunks.len() && self.chunks[i].host <= addr).then_some(i)
    }

    /// Lifts the protection of chunk `i` (the caller holds `cut_lock`).
    pub(crate) fn unprotect(&self, i: usize) -> Result<()> {
        let c = self.chunks[i];
        self.open[i].store(true, Ordering::Relaxed);
        self.uffd
            .write_protect(c.host, c.len, false)
            .map_err(|e| SnapError::io("unprotect guest RAM", e))
    }

    /// Write-protects every chunk not protected now, one call per run of
    /// neighbouring chunks (the caller holds `cut_lock`). Returns the calls
    /// made. On failure the chunks of the failing run stay open.
    pub(crate) fn protect_open(&self) -> std::io::Result<usize> {
        if self.dead.load(Ordering::Acquire) {
            return Err(std::io::Error::other(
                "the write-protect fault handler has stopped",
            ));
        }
        let mut calls = 0;
        let mut i = 0;
        while i < self.chunks.len() {
            if !self.open[i].load(Ordering::Relaxed) {
                i += 1;
                continue;
            }
            let start = i;
            while i + 1 < self.chunks.len()
                && self.open[i + 1].load(Ordering::Relaxed)
                && self.chunks[i + 1].host == self.chunks[i].host + self.chunks[i].len
            {
                i += 1;
            }
            let (a, b) = (self.chunks[start], self.chunks[i]);
            self.uffd
                .write_protect(a.host, b.host + b.len - a.host, true)?;
            for o in &self.open[start..=i] {
                o.store(false, Ordering::Relaxed);
            }
            calls += 1;
            i += 1;
        }
        Ok(calls)
    }

    /// Lifts every protection (the handler can serve no more faults);
    /// changes are no longer recorded, so no incremental capture follows.
    pub(crate) fn unprotect_all(&self) {
        *lock(&self.base) = None;
        for (o, m) in self.open.iter().zip(&self.marked) {
            o.store(true, Ordering::Relaxed);
            m.store(true, Ordering::Release);
        }
        for r in &self.ranges {
            if let Err(e) = self.uffd.write_protect(r.host as u64, r.len, false) {
                tracing::error!("cannot unprotect guest RAM: {e}");
            }
        }
    }

    /// The capture `hook` ended (`id`: the image it completed): it is no
    /// longer current; a failed one's chunks count as changed again.
    pub(crate) fn end_capture(&self, hook: &dyn FaultHook, id: Option<ImageId>) {
        let _g = lock(&self.cut_lock);
        let mut cur = lock(&self.current);
        if cur
            .as_ref()
            .is_some_and(|c| std::ptr::addr_eq(Arc::as_ptr(c), hook as *const dyn FaultHook))
        {
            *cur = None;
            hook.ended();
        }
        drop(cur);
        let Some(taken) = hook.taken() else {
            return; // never cut
        };
        match id {
            Some(id) => *lock(&self.base) = Some(id),
            None => {
                for (d, w) in self.dirty.iter().zip(taken) {
                    if *w {
                        d.store(true, Ordering::Relaxed);
                    }
                }
            }
        }
    }
}

/// What the engine's fault handler asks of the capture under way (the
/// write-protect capture, `crate::capture::wp`, is the one): the engine knows
/// chunks, their protection and what changed; the capture knows what it
/// still has to save and where copies go.
pub(crate) trait FaultHook: Send + Sync {
    /// Whether the capture is cut: before, its faults are only recorded.
    fn is_cut(&self) -> bool;
    /// The guest writes chunk `i`, still protected (the engine holds its
    /// cut lock): save it first if the capture still needs it, or wait for
    /// the capture's own copy. Says why the fault waited.
    fn fault(&self, i: usize) -> WaitCause;
    /// The fault on a chunk waited `d`, for `cause` (after it was let through).
    fn waited(&self, cause: WaitCause, d: Duration);
    /// The capture cannot go on (its faults copy nothing more).
    fn fail(&self, err: SnapError);
    /// The chunks the cut took (they count as changed again if the capture
    /// fails); `None` before the cut.
    fn taken(&self) -> Option<&[bool]>;
    /// It is no longer the engine's current capture.
    fn ended(&self);
}

/// Takes write-protect faults for as long as the engine lives: records the
/// chunk as changed, copies it first if the capture under way still needs
/// it, and lifts its protection.
fn fault_handler(e: &Engine) {
    // A faulting vCPU waits for this thread, which only ever runs a 2 MiB
    // copy or short waits (it sleeps on the userfaultfd and the pool).
    crate::kernel::serve_faults_first("the write-protect fault handler", true);
    while !e.stop.load(Ordering::Acquire) {
        let fault = match e.uffd.next_fault(Duration::from_millis(20)) {
            Ok(Some(f)) => f,
            Ok(None) => continue,
            Err(err) => {
                tracing::error!("cannot read the write-protect userfaultfd: {err}");
                let _g = lock(&e.cut_lock);
                e.dead.store(true, Ordering::Release);
                if let Some(hook) = lock(&e.current).as_ref() {
                    hook.fail(SnapError::io("read userfaultfd", err));
                }
                e.unprotect_all();
                return;
            }
        };
        if !fault.wp {
            continue;
        }
        let Some(i) = e.chunk_of(fault.addr) else {
            continue;
        };
        let t0 = Instant::now();
        let g = lock(&e.cut_lock);
        e.dirty[i].store(true, Ordering::Relaxed);
        e.marked[i].store(true, Ordering::Release);
        let cur = lock(&e.current).clone();
        let cut = cur.as_ref().filter(|h| h.is_cut());
        let cause = match cut {
            Some(hook) => {
                // A panic (a sink's) fails the capture; faults are still served.
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| hook.fault(i)))
                    .unwrap_or_else(|_| {
                        hook.fail(SnapError::io(
                            "write-protect fault handler",
                            std::io::Error::other("the capture's chunk copy panicked"),
                        ));
                        WaitCause::Through
                    })
            }
            None => {
                e.tracked.fetch_add(1, Ordering::Relaxed);
                WaitCause::Through
            }
        };
        if let Err(err) = e.unprotect(i).or_else(|_| e.unprotect(i)) {
            // The faulting thread must not wait for ever: wake it (it faults
            // again, and is served again).
            let c = e.chunks[i];
            let _ = e.uffd.wake(c.host, c.len);
            match &cur {
                Some(hook) => hook.fail(err),
                None => tracing::error!("{err}"),
            }
        }
        drop(g);
        if let Some(hook) = cut {
            hook.waited(cause, t0.elapsed());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    /// A capture that only records what the engine asks of it.
    #[derive(Default)]
    struct FakeCapture {
        cut: AtomicBool,
        faults: Mutex<Vec<usize>>,
        waits: AtomicUsize,
        ended: AtomicBool,
        taken: Vec<bool>,
    }

    impl FaultHook for FakeCapture {
        fn is_cut(&self) -> bool {
            self.cut.load(Ordering::Acquire)
        }
        fn fault(&self, i: usize) -> WaitCause {
            lock(&self.faults).push(i);
            WaitCause::Copy
        }
        fn waited(&self, cause: WaitCause, _: Duration) {
            assert_eq!(cause, WaitCause::Copy);
            self.waits.fetch_add(1, Ordering::Relaxed);
        }
        fn fail(&self, err: SnapError) {
            panic!("the fake capture failed: {err}");
        }
        fn taken(&self) -> Option<&[bool]> {
            self.is_cut().then_some(&self.taken[..])
        }
        fn ended(&self) {
            self.ended.store(true, Ordering::Release);
        }
    }

    /// Four chunks of anonymous memory, 2 MiB-aligned.
    fn ram() -> (Vec<u8>, RamRange) {
        let mut buf = vec![0u8; 5 * CHUNK as usize];
        let off = buf.as_ptr().align_offset(CHUNK as usize);
        let host = buf[off..].as_mut_ptr();
        // SAFETY: four chunks inside `buf`, which the test keeps alive
        // (and does not move) while the engine lives.
        let r = unsafe { RamRange::new(0, host, 4 * CHUNK) };
        (buf, r)
    }

    fn write(r: &RamRange, chunk: u64) {
        // SAFETY: inside the range's memory, which lives (see `ram`).
        unsafe {
            std::ptr::write_volatile((r.host() as *mut u8).add((chunk * CHUNK) as usize + 8), 1)
        };
    }

    /// The engine asks the capture under way about a write only once it is
    /// cut, once per chunk, and records every chunk as changed; a capture
    /// that ends leaves, a failed one's taken chunks count as changed again.
    #[test]
    fn the_engine_asks_its_capture_only_after_the_cut() {
        let Ok(uffd) = Uffd::new_wp() else {
            eprintln!("skipped: no userfaultfd write-protect here");
            return;
        };
        let (_buf, r) = ram();
        let engine = WpEngine::with_uffd(Arc::new(uffd), &[r]).unwrap();
        let e = engine.shared.clone();
        let fake = Arc::new(FakeCapture {
            taken: vec![true, false, false, true],
            ..Default::default()
        });
        *lock(&e.current) = Some(fake.clone());
        engine.mark().unwrap();
        // Not cut: the write is recorded, the capture is not asked.
        write(&r, 1);
        assert!(lock(&fake.faults).is_empty());
        assert_eq!(engine.tracked_faults(), 1);
        // Cut: protect again (as the cut does); writes reach the capture,
        // each chunk's first write only.
        fake.cut.store(true, Ordering::Release);
        e.protect_open().unwrap();
        write(&r, 2);
        write(&r, 2);
        write(&r, 3);
        assert_eq!(*lock(&fake.faults), vec![2, 3]);
        assert_eq!(fake.waits.load(Ordering::Relaxed), 2);
        for d in &e.dirty {
            d.store(false, Ordering::Relaxed);
        }
        e.end_capture(&*fake, None);
        assert!(fake.ended.load(Ordering::Acquire));
        assert!(lock(&e.current).is_none());
        let dirty: Vec<bool> = e.dirty.iter().map(|d| d.load(Ordering::Relaxed)).collect();
        assert_eq!(
            dirty, fake.taken,
            "a failed capture's chunks are changed again"
        );
    }
}
