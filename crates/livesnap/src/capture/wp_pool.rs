//! The write-protect capture's pool of copy buffers ([`Pool`]): a fault
//! copies the chunk the guest is about to write into one of them, and the
//! writers free it once the chunk is saved. The pool starts at its base size
//! and, during a capture, a grower thread makes buffers ahead of the faults
//! toward its cap while the host has memory to spare: a guest that writes
//! faster than the destination takes data then runs at the speed of memory,
//! as under the fork capture, instead of the destination's.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::capture::wp_options::WpCounters;
use crate::error::{Result, SnapError};
use crate::kernel::buf::{AlignedBuf, Arena};
use crate::kernel::lock;
use crate::CHUNK;

/// Free buffers the grower keeps ready beyond those in use (32 MiB): making
/// one takes 0.3–7 ms here, a fault of a guest that rewrites its RAM comes
/// every 0.3–0.5 ms.
pub(crate) const AHEAD: usize = 16;

/// A fault that has waited this long for a buffer makes one itself where the
/// pool may grow (the grower, on spare CPU time, may not run for a while when
/// the vCPUs take every CPU): about one chunk's write on a slow disk.
pub(crate) const MAKE_AFTER: Duration = Duration::from_millis(2);

/// How many buffers the grower makes now: enough to have [`AHEAD`] free,
/// no more than the cap leaves, and none that would take the host's
/// available memory (`available`, bytes; `None`: unknown, no growth) below
/// `keep_free`.
pub(crate) fn to_make(
    free: usize,
    allocated: usize,
    max: usize,
    available: Option<u64>,
    keep_free: u64,
) -> usize {
    AHEAD
        .saturating_sub(free)
        .min(max.saturating_sub(allocated))
        .min(spare_buffers(available, keep_free))
}

/// How many buffers the host's available memory (`available`, bytes;
/// `None`: unknown) allows above `keep_free`.
fn spare_buffers(available: Option<u64>, keep_free: u64) -> usize {
    available.map_or(0, |a| (a.saturating_sub(keep_free) / CHUNK) as usize)
}

/// A capture's copy buffers.
pub(crate) struct Pool {
    free: Mutex<Vec<AlignedBuf>>,
    /// A buffer came back or was made: a waiting fault takes it.
    ready: Condvar,
    /// Few free buffers are left (or the capture ended): the grower looks.
    low: Condvar,
    /// Buffers made as faults need them, up to this many (the base size).
    base: usize,
    /// What the grower may make the pool, in buffers.
    max: usize,
    /// Host memory (`MemAvailable`) the grower leaves, bytes.
    keep_free: u64,
    /// Buffers made so far (kept ones included).
    allocated: AtomicUsize,
    /// No more growth: the capture's writing ended.
    stopped: AtomicBool,
    /// Where grown buffers are carved from, reserved with the pool: making
    /// one then takes the memory map lock only for reading (see [`Arena`]).
    arena: Option<Arena>,
    counters: Arc<WpCounters>,
}

impl Pool {
    /// A pool of `base` buffers (those `kept` from the last capture first)
    /// that may grow to `max` while the host keeps `keep_free` bytes
    /// available.
    pub(crate) fn new(
        kept: Vec<AlignedBuf>,
        base: usize,
        max: usize,
        keep_free: u64,
        counters: Arc<WpCounters>,
    ) -> Pool {
        let base = base.max(1);
        let max = max.max(base);
        Pool {
            arena: (max > base)
                .then(|| Arena::reserve(CHUNK as usize, max - base))
                .flatten(),
            allocated: AtomicUsize::new(kept.len()),
            free: Mutex::new(kept),
            ready: Condvar::new(),
            low: Condvar::new(),
            base,
            max,
            keep_free,
            stopped: AtomicBool::new(false),
            counters,
        }
    }

    /// The base size, in buffers.
    pub(crate) fn base(&self) -> usize {
        self.base
    }

    /// Whether the pool may grow beyond its base size.
    pub(crate) fn grows(&self) -> bool {
        self.arena.is_some()
    }

    /// Bytes of buffers in use (taken and not yet given back).
    pub(crate) fn in_use_bytes(&self) -> u64 {
        let free = lock(&self.free).len();
        self.allocated.load(Ordering::Relaxed).saturating_sub(free) as u64 * CHUNK
    }

    /// A free buffer for the fault handler, and whether it had to wait for
    /// one. Below the base size it is made here; beyond it, the grower and
    /// the writers supply them, and after [`MAKE_AFTER`] of waiting it is
    /// made here too where the pool may grow. `Err` when `ended()` says the
    /// capture ended meanwhile, or the wait reached `stall_limit` (the
    /// destination takes nothing and the pool may grow no more).
    pub(crate) fn take(
        &self,
        ended: &dyn Fn() -> bool,
        stall_limit: Duration,
    ) -> Result<(AlignedBuf, bool)> {
        let start = Instant::now();
        let mut waited = false;
        let mut free = lock(&self.free);
        loop {
            if let Some(b) = free.pop() {
                if free.len() < AHEAD && self.grows() {
                    self.low.notify_one();
                }
                return Ok((b, waited));
            }
            let n = self.allocated.load(Ordering::Relaxed);
            if n < self.base {
                // Made without the lock (mapping it takes milliseconds here):
                // the writers give buffers back meanwhile. Only the fault
                // handler makes buffers below the base size.
                drop(free);
                if let Some(b) = AlignedBuf::new(CHUNK as usize) {
                    self.allocated.fetch_add(1, Ordering::Relaxed);
                    return Ok((b, waited));
                }
                free = lock(&self.free);
                if let Some(b) = free.pop() {
                    return Ok((b, waited));
                }
            }
            if ended() {
                return Err(SnapError::Cancelled);
            }
            if waited && self.grows() && start.elapsed() >= MAKE_AFTER {
                // The grower is behind: make one here (populating it takes
                // the memory map lock only for reading, see `Arena`).
                drop(free);
                if let Some(b) = self.make_grown(true) {
                    return Ok((b, waited));
                }
                free = lock(&self.free);
                if let Some(b) = free.pop() {
                    return Ok((b, waited));
                }
            }
            let waiting = start.elapsed();
            if waiting >= stall_limit {
                return Err(SnapError::DestinationStalled(waiting));
            }
            waited = true;
            if self.grows() {
                self.low.notify_one();
            }
            let slice = (stall_limit - waiting).min(Duration::from_millis(1));
            free = self
                .ready
                .wait_timeout(free, slice)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// One grown buffer, counted against the cap (reserved before it is
    /// made, so that the grower and the fault handler never pass it
    /// together), or `None` at the cap or when memory is short.
    /// With `check_memory`, it first reads whether the host has memory to
    /// spare (the grower has, for the buffers it makes); after the cap, so
    /// that a pool at its cap reads nothing.
    fn make_grown(&self, check_memory: bool) -> Option<AlignedBuf> {
        let arena = self.arena.as_ref()?;
        self.allocated
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.max).then_some(n + 1)
            })
            .ok()?;
        let spare =
            !check_memory || spare_buffers(crate::kernel::mem_available(), self.keep_free) > 0;
        match spare.then(|| arena.carve()).flatten() {
            Some(b) => {
                self.counters.pool_grown.fetch_add(1, Ordering::Relaxed);
                Some(b)
            }
            None => {
                self.allocated.fetch_sub(1, Ordering::AcqRel);
                None
            }
        }
    }

    /// Gives a buffer back and wakes a fault waiting for one.
    pub(crate) fn give_back(&self, b: AlignedBuf) {
        lock(&self.free).push(b);
        self.ready.notify_one();
    }

    /// Wakes every waiter (the capture ended or gave up).
    pub(crate) fn wake_all(&self) {
        let _g = lock(&self.free);
        self.ready.notify_all();
        self.low.notify_all();
    }

    /// Ends the growth: [`Pool::grow`] returns.
    pub(crate) fn stop_growing(&self) {
        self.stopped.store(true, Ordering::Release);
        self.wake_all();
    }

    /// The grower thread's work, until [`Pool::stop_growing`]: keeps
    /// [`AHEAD`] buffers free toward the cap while the host has memory to
    /// spare, each made without the pool's lock. Runs below the vCPUs
    /// (the caller lowers the thread).
    pub(crate) fn grow(&self) {
        let mut free = lock(&self.free);
        while !self.stopped.load(Ordering::Acquire) {
            let n = self.allocated.load(Ordering::Relaxed);
            let make = if n < self.base {
                0 // the fault handler makes the base itself
            } else {
                // Read without the lock: the fault handler, which runs
                // above this thread, must never wait for it to run again.
                let have = free.len();
                drop(free);
                let available = crate::kernel::mem_available();
                free = lock(&self.free);
                to_make(have, n, self.max, available, self.keep_free)
            };
            if make == 0 {
                free = self
                    .low
                    .wait_timeout(free, Duration::from_millis(50))
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
                continue;
            }
            drop(free);
            let mut made = 0;
            for _ in 0..make {
                if self.stopped.load(Ordering::Acquire) {
                    break;
                }
                let Some(b) = self.make_grown(false) else {
                    break;
                };
                self.give_back(b);
                made += 1;
            }
            free = lock(&self.free);
            if made < make {
                // Memory is short: look again later, not at once.
                free = self
                    .low
                    .wait_timeout(free, Duration::from_millis(50))
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
            }
        }
    }

    /// Every free buffer, for the engine to keep or free (the capture is
    /// over: the others were given back).
    pub(crate) fn take_all(&mut self) -> Vec<AlignedBuf> {
        std::mem::take(self.free.get_mut().unwrap_or_else(|e| e.into_inner()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;

    #[test]
    fn grows_to_keep_some_ahead_of_the_faults() {
        assert_eq!(to_make(0, 32, 1000, Some(8 * GIB), GIB), AHEAD);
        assert_eq!(to_make(AHEAD - 3, 32, 1000, Some(8 * GIB), GIB), 3);
        assert_eq!(to_make(AHEAD, 32, 1000, Some(8 * GIB), GIB), 0);
        assert_eq!(to_make(AHEAD + 5, 32, 1000, Some(8 * GIB), GIB), 0);
    }

    #[test]
    fn never_beyond_its_cap() {
        assert_eq!(to_make(0, 995, 1000, Some(8 * GIB), GIB), 5);
        assert_eq!(to_make(0, 1000, 1000, Some(8 * GIB), GIB), 0);
        assert_eq!(to_make(0, 1200, 1000, Some(8 * GIB), GIB), 0);
    }

    #[test]
    fn leaves_the_host_its_memory() {
        // 3 chunks' worth above what must stay available.
        assert_eq!(to_make(0, 32, 1000, Some(GIB + 3 * CHUNK + 5), GIB), 3);
        assert_eq!(to_make(0, 32, 1000, Some(GIB), GIB), 0);
        assert_eq!(to_make(0, 32, 1000, Some(GIB / 2), GIB), 0);
        // Unknown: no growth.
        assert_eq!(to_make(0, 32, 1000, None, GIB), 0);
    }

    fn pool(base: usize, max: usize) -> Pool {
        Pool::new(Vec::new(), base, max, 0, Arc::new(WpCounters::default()))
    }

    #[test]
    fn the_base_is_made_by_the_taker_and_a_full_pool_waits_until_given_back() {
        let p = Arc::new(pool(2, 2));
        let never = || false;
        let (a, waited_a) = p.take(&never, Duration::from_secs(5)).unwrap();
        let (_b, _) = p.take(&never, Duration::from_secs(5)).unwrap();
        assert!(!waited_a);
        assert_eq!(p.in_use_bytes(), 2 * CHUNK);
        let r = p.take(&never, Duration::from_millis(20));
        assert!(
            matches!(r, Err(SnapError::DestinationStalled(_))),
            "{:?}",
            r.err()
        );
        let q = p.clone();
        let t = std::thread::spawn(move || q.take(&|| false, Duration::from_secs(5)).map(|x| x.1));
        std::thread::sleep(Duration::from_millis(20));
        p.give_back(a);
        assert!(
            t.join().unwrap().unwrap(),
            "it waited, then took the buffer given back"
        );
        let ended = || true;
        assert!(matches!(
            p.take(&ended, Duration::from_secs(5)),
            Err(SnapError::Cancelled)
        ));
    }

    #[test]
    fn the_grower_supplies_buffers_beyond_the_base_and_stops_at_the_cap() {
        if crate::kernel::mem_available().is_none() {
            return;
        }
        let p = Arc::new(pool(1, 4));
        let g = p.clone();
        let grower = std::thread::spawn(move || g.grow());
        let never = || false;
        let taken: Vec<_> = (0..4)
            .map(|_| p.take(&never, Duration::from_secs(10)).unwrap().0)
            .collect();
        let r = p.take(&never, Duration::from_millis(100));
        assert!(r.is_err(), "the cap holds");
        assert_eq!(p.counters.pool_grown.load(Ordering::Relaxed), 3);
        p.stop_growing();
        grower.join().unwrap();
        drop(taken);
    }
}
