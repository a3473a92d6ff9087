//! The background huge-page rebuild after a fork capture: the capture's
//! copy-on-write faults split guest RAM's 2 MiB pages, which would make the
//! next fork slower; a thread collapses them again (`MADV_COLLAPSE`) while
//! the guest runs. Stopped before a fork, a reset or exit.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vmm::memory::{CollapseStats, RamSpans};

/// A running rebuild.
pub struct Collapse {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<()>,
}

impl Collapse {
    /// Starts rebuilding `spans`; `done` gets the figures when the thread ends
    /// (also when stopped).
    pub fn start(
        spans: RamSpans,
        done: impl FnOnce(CollapseStats, Duration) + Send + 'static,
    ) -> std::io::Result<Collapse> {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name("thp-collapse".into())
            .spawn(move || {
                let t0 = Instant::now();
                let st = vmm::memory::collapse_huge_pages(&spans, &flag);
                done(st, t0.elapsed());
            })?;
        Ok(Collapse { stop, thread })
    }

    pub fn is_finished(&self) -> bool {
        self.thread.is_finished()
    }

    /// Stops the rebuild and waits for its thread.
    pub fn stop(self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.thread.join();
    }
}
