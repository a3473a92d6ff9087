//! How long threads waited, as an atomic histogram that any thread may add
//! to and any other read at the same time (the write-protect engine times
//! every fault with it, by cause).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Sub-buckets per power of two: a value is placed within 1/8 of itself.
const SUB: u32 = 8;
/// Enough buckets for waits up to 2^40 µs.
const BUCKETS: usize = (SUB as usize) * 40;

/// A histogram of durations in microseconds, log-linear (each bucket spans
/// at most 1/8 of its lower bound), plus an exact count, sum and maximum.
#[derive(Debug)]
pub struct WaitHistogram {
    buckets: Vec<AtomicU64>,
    count: AtomicU64,
    sum_us: AtomicU64,
    max_us: AtomicU64,
}

impl Default for WaitHistogram {
    fn default() -> Self {
        WaitHistogram {
            buckets: (0..BUCKETS).map(|_| AtomicU64::new(0)).collect(),
            count: AtomicU64::new(0),
            sum_us: AtomicU64::new(0),
            max_us: AtomicU64::new(0),
        }
    }
}

/// What a [`WaitHistogram`] holds, summed up.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WaitSummary {
    /// Waits recorded.
    pub count: u64,
    /// Their sum, µs.
    pub total_us: u64,
    /// Median, µs (the upper bound of its bucket: never under the true value).
    pub p50_us: u64,
    /// 99th percentile, µs (likewise an upper bound, at most the maximum).
    pub p99_us: u64,
    /// The longest, µs (exact).
    pub max_us: u64,
}

fn bucket_of(us: u64) -> usize {
    if us < SUB as u64 {
        return us as usize;
    }
    let e = 63 - us.leading_zeros(); // floor(log2), >= 3
    let shift = e - SUB.trailing_zeros();
    let sub = (us >> shift) - SUB as u64; // 0..SUB
    let i = SUB as usize + (shift as usize) * SUB as usize + sub as usize;
    i.min(BUCKETS - 1)
}

/// The largest value that falls in bucket `i`.
fn upper_bound(i: usize) -> u64 {
    if i < SUB as usize {
        return i as u64;
    }
    let shift = (i - SUB as usize) / SUB as usize;
    let sub = ((i - SUB as usize) % SUB as usize) as u64;
    ((SUB as u64 + sub + 1) << shift) - 1
}

impl WaitHistogram {
    /// Adds one wait.
    pub fn record(&self, d: Duration) {
        let us = d.as_micros().min(u64::MAX as u128) as u64;
        self.buckets[bucket_of(us)].fetch_add(1, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_us.fetch_add(us, Ordering::Relaxed);
        self.max_us.fetch_max(us, Ordering::Relaxed);
    }

    /// Count, sum, median, 99th percentile and maximum so far.
    pub fn summary(&self) -> WaitSummary {
        let counts: Vec<u64> = self
            .buckets
            .iter()
            .map(|b| b.load(Ordering::Relaxed))
            .collect();
        let n: u64 = counts.iter().sum();
        let max_us = self.max_us.load(Ordering::Relaxed);
        let pct = |p: u64| -> u64 {
            if n == 0 {
                return 0;
            }
            // The smallest value with at least p % of the waits at or under it.
            let want = (n * p).div_ceil(100).max(1);
            let mut seen = 0;
            for (i, c) in counts.iter().enumerate() {
                seen += c;
                if seen >= want {
                    return upper_bound(i).min(max_us);
                }
            }
            max_us
        };
        WaitSummary {
            count: self.count.load(Ordering::Relaxed),
            total_us: self.sum_us.load(Ordering::Relaxed),
            p50_us: pct(50),
            p99_us: pct(99),
            max_us,
        }
    }
}

/// Why a write-protect fault waited (`crate::capture::wp::FaultWaits`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum WaitCause {
    /// Its chunk was copied into a free buffer at once.
    Copy,
    /// It waited for a free buffer.
    Buffer,
    /// It waited for the writer, which was saving that very chunk.
    Writer,
    /// Let through without a copy.
    Through,
}

/// How long the guest's writes waited in the fault handler during a
/// capture (from the handler reading the fault to lifting the protection),
/// in all and by cause.
#[derive(Debug, Default)]
pub struct FaultWaits {
    /// Every fault of the capture.
    pub all: WaitHistogram,
    /// Copied the chunk into a free buffer at once.
    pub copy: WaitHistogram,
    /// Waited for the writer to free a pool buffer (or for the pool to grow).
    pub buffer: WaitHistogram,
    /// Waited for the writer, which was saving that very chunk.
    pub writer: WaitHistogram,
    /// Let through without a copy (not in this image, or already copied).
    pub through: WaitHistogram,
}

impl FaultWaits {
    pub(crate) fn record(&self, cause: WaitCause, d: Duration) {
        self.all.record(d);
        match cause {
            WaitCause::Copy => &self.copy,
            WaitCause::Buffer => &self.buffer,
            WaitCause::Writer => &self.writer,
            WaitCause::Through => &self.through,
        }
        .record(d);
    }

    /// (all, copy, buffer, writer, through), summed up.
    pub fn summaries(&self) -> [(&'static str, WaitSummary); 5] {
        [
            ("all", self.all.summary()),
            ("copy", self.copy.summary()),
            ("buffer", self.buffer.summary()),
            ("writer", self.writer.summary()),
            ("through", self.through.summary()),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_value_falls_in_a_bucket_that_bounds_it_within_an_eighth() {
        for us in (0..5000u64).chain([65_535, 65_536, 1 << 30, (1 << 40) - 1]) {
            let i = bucket_of(us);
            let hi = upper_bound(i);
            assert!(hi >= us, "{us} in bucket {i} up to {hi}");
            let lo = if i == 0 { 0 } else { upper_bound(i - 1) + 1 };
            assert!(lo <= us, "{us} in bucket {i} from {lo}");
            assert!(hi - lo <= us / 8, "{us}: bucket {lo}..={hi} too wide");
        }
    }

    #[test]
    fn percentiles_and_maximum() {
        let h = WaitHistogram::default();
        assert_eq!(h.summary(), WaitSummary::default());
        for _ in 0..98 {
            h.record(Duration::from_micros(100));
        }
        h.record(Duration::from_micros(2_000));
        h.record(Duration::from_micros(40_000));
        let s = h.summary();
        assert_eq!(s.count, 100);
        assert_eq!(s.total_us, 98 * 100 + 2_000 + 40_000);
        assert!((100..=112).contains(&s.p50_us), "{s:?}");
        assert!((2_000..=2_250).contains(&s.p99_us), "{s:?}");
        assert_eq!(s.max_us, 40_000);
    }
}
