//! The shared state of one write-protect capture ([`Wp`]): its chunk claims,
//! its pool of buffers, where its image goes, and how it answers the
//! engine's faults ([`FaultHook`]).

use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use crate::capture::plan::IncrPlan;
use crate::capture::runtime::Shared;
use crate::capture::wp_engine::{Engine, FaultHook};
use crate::capture::wp_options::WpCounters;
use crate::capture::wp_pool::Pool;
use crate::error::{Result, SnapError};
use crate::format::image::{ImageId, PAGE_SIZE};
use crate::format::sink::{Sink, SinkGuard};
use crate::kernel::buf::{AlignedBuf, BUF_ALIGN};
use crate::kernel::lock;
use crate::kernel::scan::is_zero;
use crate::ram::claims::{ChunkState, Claims};
use crate::ram::waits::WaitCause;

/// The image being written by the writer.
pub(crate) enum Out {
    /// The temp file, and a direct-I/O descriptor of it where allowed (RAM
    /// goes through it while `direct_ok`).
    File {
        file: std::fs::File,
        direct: Option<std::fs::File>,
    },
    /// `None` once committed; the writer writes only after `begin`.
    Sink(Mutex<Option<SinkGuard<Box<dyn Sink>>>>),
}

/// Writers of a file with direct I/O: 8–24 % faster than one here, though
/// on ext4 their direct writes into the fresh file's holes take turns on
/// its inode lock; three or four were no faster (docs/BENCHMARKS.md).
pub(crate) const DIRECT_WRITERS: usize = 2;

/// What a cut decided: the chunks the capture writes and the ones it took
/// out of the record of changes.
pub(crate) struct Want {
    pub(crate) write: Vec<bool>,
    pub(crate) taken: Vec<bool>,
}

/// The threads' shared state of one capture.
pub(crate) struct Wp {
    pub(crate) engine: Arc<Engine>,
    pub(crate) claims: Claims,
    /// Set at the cut.
    pub(crate) want: OnceLock<Want>,
    pub(crate) incr: Option<IncrPlan>,
    /// The image's identity once its header is made.
    pub(crate) id: Mutex<Option<ImageId>>,
    pub(crate) out: Out,
    pub(crate) counters: Arc<WpCounters>,
    /// The copy buffers of the fault handler.
    pub(crate) pool: Pool,
    pub(crate) stall_limit: Duration,
    /// Give the pool back to the engine at the end ([`WpOptions::keep_pool`]).
    pub(crate) keep_pool: bool,
    pub(crate) first_error: Mutex<Option<SnapError>>,
    /// The capture failed (or was abandoned): faults copy nothing more.
    pub(crate) gave_up: AtomicBool,
    /// Direct I/O still works for this file (cleared at its first refusal).
    pub(crate) direct_ok: AtomicBool,
    pub(crate) shared: Arc<Shared>,
    /// Where the fault handler hands the chunks it copied: the writer's
    /// channel, dropped when the capture stops being the engine's.
    pub(crate) handover: Mutex<Option<mpsc::Sender<Taken>>>,
}

impl Drop for Wp {
    /// Keeps up to the pool's initial size of buffers for the next capture
    /// (grown ones are freed), or frees them all.
    fn drop(&mut self) {
        let mut spare = lock(&self.engine.spare);
        if !self.keep_pool {
            spare.clear();
            return;
        }
        let pool = self.pool.take_all();
        // The writers' own buffers come back with the pool.
        let room = (self.pool.base() + DIRECT_WRITERS).saturating_sub(spare.len());
        spare.extend(pool.into_iter().take(room));
    }
}

impl Wp {
    /// Takes chunk `i` to copy it (Taken: being copied; Done: copied).
    pub(crate) fn claim(&self, i: usize) -> bool {
        self.claims.claim(i)
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
        self.claims.done(i);
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
        self.give_up();
    }

    /// From now on faults copy nothing (the image will not be kept), and
    /// none waits for a buffer.
    pub(crate) fn give_up(&self) {
        self.gave_up.store(true, Ordering::Release);
        self.pool.wake_all();
    }

    /// Whether faults should copy nothing more: the capture failed or was
    /// cancelled (its image will not be kept).
    pub(crate) fn given_up(&self) -> bool {
        self.gave_up.load(Ordering::Acquire) || self.shared.cancelled()
    }

    /// A free pool buffer for the fault handler, and whether it had to wait
    /// for one ([`Pool::take`]).
    pub(crate) fn buffer(&self) -> Result<(AlignedBuf, bool)> {
        self.pool.take(&|| self.given_up(), self.stall_limit)
    }

    /// Gives a buffer back to the pool and wakes a fault waiting for one.
    pub(crate) fn give_back(&self, b: AlignedBuf) {
        self.pool.give_back(b);
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        match &self.out {
            Out::File { file, direct } => {
                let aligned = |x: usize| x % BUF_ALIGN == 0;
                if let Some(d) = direct.as_ref().filter(|_| {
                    self.direct_ok.load(Ordering::Relaxed)
                        && aligned(buf.as_ptr() as usize)
                        && aligned(buf.len())
                        && aligned(offset as usize)
                }) {
                    match d.write_all_at(buf, offset) {
                        Ok(()) => return Ok(()),
                        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                            // Refused after all (an odd block size): the
                            // page cache it is, for the rest of the image.
                            tracing::warn!("direct I/O refused for the snapshot image ({e}): writing through the page cache");
                            self.direct_ok.store(false, Ordering::Relaxed);
                            self.counters.direct_io.store(false, Ordering::Relaxed);
                        }
                        Err(e) => return Err(SnapError::io("write snapshot RAM", e)),
                    }
                }
                file.write_all_at(buf, offset)
                    .map_err(|e| SnapError::io("write snapshot RAM", e))
            }
            Out::Sink(m) => match lock(m).as_mut() {
                Some(g) => g.write(buf, offset, "snapshot RAM"),
                None => Err(SnapError::Cancelled),
            },
        }
    }
}

/// What the handler hands the writer: chunk `.0`, copied into pool buffer
/// `.1` (the writer writes it and gives the buffer back).
pub(crate) struct Taken(pub(crate) usize, pub(crate) AlignedBuf);

impl FaultHook for Wp {
    fn is_cut(&self) -> bool {
        self.want.get().is_some()
    }

    fn fault(&self, i: usize) -> WaitCause {
        self.counters.faults.fetch_add(1, Ordering::Relaxed);
        let (taken, cause) = take_for_fault(self, i);
        if let (Some(t), Some(tx)) = (taken, lock(&self.handover).as_ref()) {
            // The writer is gone (failed or cancelled): nothing to hand over.
            let _ = tx.send(t);
        }
        cause
    }

    fn waited(&self, cause: WaitCause, d: Duration) {
        self.counters.waits.record(cause, d);
    }

    fn fail(&self, err: SnapError) {
        Wp::fail(self, err);
    }

    fn taken(&self) -> Option<&[bool]> {
        self.want.get().map(|w| &w.taken[..])
    }

    fn ended(&self) {
        // The writer hears it (its receiver disconnects once the copies
        // handed over are taken).
        lock(&self.handover).take();
    }
}

/// The capture `wp` is cut and a writer waits on chunk `i`: copy it first
/// if the capture needs it and nobody has, or wait for the writer's copy.
/// Never writes to the destination: a full pool means waiting for the
/// writer to free a buffer, bounded by the capture's stall limit.
fn take_for_fault(wp: &Wp, i: usize) -> (Option<Taken>, WaitCause) {
    if !wp.wants(i) || wp.given_up() {
        return (None, WaitCause::Through);
    }
    if !wp.claim(i) {
        if wp.claims.state(i) != ChunkState::Taken {
            return (None, WaitCause::Through);
        }
        // The writer is saving it (it is still protected): wait for that
        // (one 2 MiB write or copy) before letting the write in — unless
        // the destination stalls that long: then the capture is abandoned
        // (its image is not kept, so the write may go in).
        let start = Instant::now();
        let mut spins = 0u32;
        while wp.claims.state(i) == ChunkState::Taken && !wp.given_up() {
            if spins < 100 {
                spins += 1;
                std::hint::spin_loop();
            } else if start.elapsed() >= wp.stall_limit {
                abandon(wp, SnapError::DestinationStalled(start.elapsed()));
            } else {
                std::thread::sleep(Duration::from_micros(20));
            }
        }
        return (None, WaitCause::Writer);
    }
    let (mut b, waited) = match wp.buffer() {
        Ok(b) => b,
        Err(err) => {
            // Stalled or ended: nothing is copied, the guest goes on.
            if matches!(err, SnapError::DestinationStalled(_)) {
                abandon(wp, err);
            }
            return (None, WaitCause::Buffer);
        }
    };
    wp.copy(i, &mut b);
    let in_flight = wp.pool.in_use_bytes();
    wp.counters
        .pool_high_water
        .fetch_max(in_flight, Ordering::Relaxed);
    wp.counters.chunks_by_fault.fetch_add(1, Ordering::Relaxed);
    let cause = if waited {
        WaitCause::Buffer
    } else {
        WaitCause::Copy
    };
    (Some(Taken(i, b)), cause)
}

/// The destination stopped taking data while the guest waits: fail the
/// capture (the guest runs on, its writes no longer copied) and make a
/// write blocked on the destination return.
fn abandon(wp: &Wp, err: SnapError) {
    tracing::warn!("{err}");
    wp.fail(err);
    wp.shared.interrupt();
}
