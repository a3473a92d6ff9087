//! What one migration job runs: its engine, and what only that engine
//! keeps. The job's common figures and its status stay in `migrate.rs`.

use std::path::PathBuf;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use livesnap::postcopy::PostcopySender;
use livesnap::precopy::{Precopy, PrecopyCounters, PrecopyEnd};
use livesnap::wp::WpCounters;
use livesnap::{Capture, CaptureStats};

/// How RAM is captured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    Fork,
    /// Write-protect guest RAM through a userfaultfd; no fork (QMP's
    /// `uffd`).
    Wp,
    Stop,
    /// Live migration: the guest moves to the target, which fetches RAM
    /// from here on demand (QMP's `postcopy`).
    Live,
}

impl Method {
    pub fn name(self) -> &'static str {
        match self {
            Method::Fork => "fork",
            Method::Wp => "uffd",
            Method::Stop => "stop",
            Method::Live => "postcopy",
        }
    }
}

/// The engine a job runs. Chosen when the job starts (a snapshot may still
/// fall back from write-protect to fork during its setup); each variant
/// holds only what that engine has.
pub enum Engine {
    /// A fork capture.
    Fork(Captured),
    /// A write-protect capture, incremental to `parent` when it is set.
    Wp {
        run: Captured,
        /// The capture's counters, once it started.
        counters: Option<Arc<WpCounters>>,
        parent: Option<PathBuf>,
    },
    /// Stop-and-copy: a thread copies RAM with the guest stopped.
    Stop {
        /// It reads guest RAM: joined before RAM goes away.
        thread: Option<JoinHandle<()>>,
        stats: Option<CaptureStats>,
    },
    /// A live migration's source.
    Live(LiveSource),
    /// An incoming stream or live migration (this VM is the target).
    Incoming {
        /// The address it listens on (QMP's `socket-address`).
        listening: Option<String>,
        /// Why a post-copy migration is paused.
        paused_why: Option<String>,
    },
}

/// A fork or write-protect capture while it runs, then its figures.
#[derive(Default)]
pub struct Captured {
    pub capture: Option<Capture>,
    pub stats: Option<CaptureStats>,
}

/// The source of a live migration.
#[derive(Default)]
pub struct LiveSource {
    /// The pre-copy pass while it runs, and its number (its events carry
    /// it: a late one of an earlier pass is ignored).
    pub precopy: Option<Precopy>,
    pub precopy_id: u64,
    /// The pass's figures and how it ended, kept after it.
    pub precopy_figures: Option<PrecopyFigures>,
    /// The sending side after the cut.
    pub sender: Option<PostcopySender>,
    /// When the guest paused for the cut.
    pub paused_at: Option<Instant>,
    /// Why a post-copy migration is paused.
    pub paused_why: Option<String>,
}

/// What a source's pre-copy pass did.
pub struct PrecopyFigures {
    pub counters: Arc<PrecopyCounters>,
    pub chunks: u64,
    pub end: Option<PrecopyEnd>,
    pub took: Option<Duration>,
}

impl Engine {
    /// A fresh engine of `method`, nothing started yet.
    pub fn new(method: Method) -> Engine {
        match method {
            Method::Fork => Engine::Fork(Captured::default()),
            Method::Wp => Engine::Wp {
                run: Captured::default(),
                counters: None,
                parent: None,
            },
            Method::Stop => Engine::Stop {
                thread: None,
                stats: None,
            },
            Method::Live => Engine::Live(LiveSource::default()),
        }
    }

    /// An incoming job's engine.
    pub fn incoming() -> Engine {
        Engine::Incoming {
            listening: None,
            paused_why: None,
        }
    }

    /// The method of an outgoing job; `None` for an incoming one.
    pub fn method(&self) -> Option<Method> {
        match self {
            Engine::Fork(_) => Some(Method::Fork),
            Engine::Wp { .. } => Some(Method::Wp),
            Engine::Stop { .. } => Some(Method::Stop),
            Engine::Live(_) => Some(Method::Live),
            Engine::Incoming { .. } => None,
        }
    }

    /// A fork or write-protect capture's parts.
    pub fn captured(&self) -> Option<&Captured> {
        match self {
            Engine::Fork(c) | Engine::Wp { run: c, .. } => Some(c),
            _ => None,
        }
    }

    pub fn captured_mut(&mut self) -> Option<&mut Captured> {
        match self {
            Engine::Fork(c) | Engine::Wp { run: c, .. } => Some(c),
            _ => None,
        }
    }

    /// The running capture (fork or write-protect), if any.
    pub fn capture(&self) -> Option<&Capture> {
        self.captured().and_then(|c| c.capture.as_ref())
    }

    /// A finished capture's figures (fork, write-protect or stop-and-copy).
    pub fn stats(&self) -> Option<&CaptureStats> {
        match self {
            Engine::Stop { stats, .. } => stats.as_ref(),
            _ => self.captured().and_then(|c| c.stats.as_ref()),
        }
    }

    pub fn live(&self) -> Option<&LiveSource> {
        match self {
            Engine::Live(l) => Some(l),
            _ => None,
        }
    }

    pub fn live_mut(&mut self) -> Option<&mut LiveSource> {
        match self {
            Engine::Live(l) => Some(l),
            _ => None,
        }
    }

    /// The address an incoming job listens on.
    pub fn listening(&self) -> Option<&str> {
        match self {
            Engine::Incoming { listening, .. } => listening.as_deref(),
            _ => None,
        }
    }

    /// Sets the address an incoming job listens on.
    pub fn set_listening(&mut self, addr: Option<String>) {
        if let Engine::Incoming { listening, .. } = self {
            *listening = addr;
        }
    }

    /// Why a post-copy migration is paused (either side).
    pub fn paused_why(&self) -> Option<&str> {
        match self {
            Engine::Live(l) => l.paused_why.as_deref(),
            Engine::Incoming { paused_why, .. } => paused_why.as_deref(),
            _ => None,
        }
    }

    /// Sets (or clears) why a post-copy migration is paused.
    pub fn set_paused_why(&mut self, why: Option<String>) {
        match self {
            Engine::Live(l) => l.paused_why = why,
            Engine::Incoming { paused_why, .. } => *paused_why = why,
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_method_gets_its_own_engine_and_only_its_parts() {
        for m in [Method::Fork, Method::Wp, Method::Stop, Method::Live] {
            let e = Engine::new(m);
            assert_eq!(e.method(), Some(m));
            assert_eq!(
                e.captured().is_some(),
                matches!(m, Method::Fork | Method::Wp),
                "{m:?}"
            );
            assert_eq!(e.live().is_some(), m == Method::Live, "{m:?}");
            assert!(e.stats().is_none() && e.capture().is_none());
        }
        let mut e = Engine::incoming();
        assert_eq!(e.method(), None);
        e.set_paused_why(Some("link down".into()));
        assert_eq!(e.paused_why(), Some("link down"));
        let mut f = Engine::new(Method::Fork);
        f.set_paused_why(Some("ignored".into()));
        assert_eq!(f.paused_why(), None, "a snapshot is never post-copy paused");
    }
}
