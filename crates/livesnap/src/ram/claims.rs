//! The one claim state machine of chunks, shared by the write-protect
//! capture (who copies a chunk: the fault handler or a writer) and the fill
//! of a restore (who fills it: a fault or the prefetch).
//!
//! ```text
//! Free ──claim──▶ Taken ──done──▶ Done
//!                  │  ▲
//!   leave_partial  ▼  │ claim_partial
//!                Partial
//! ```
//!
//! Only the thread that took a chunk moves it out of `Taken`; everyone else
//! reads the state without blocking.

use std::sync::atomic::{AtomicU8, Ordering};

/// Where one chunk is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ChunkState {
    /// Nobody has it yet.
    Free,
    /// One thread works on it.
    Taken,
    /// Some of its pages are in place ahead of the rest (a restore's fill
    /// only); the next taker does the rest.
    Partial,
    /// Copied (capture) or filled (restore): nothing more to do.
    Done,
}

impl ChunkState {
    fn from_u8(v: u8) -> ChunkState {
        match v {
            0 => ChunkState::Free,
            1 => ChunkState::Taken,
            2 => ChunkState::Partial,
            _ => ChunkState::Done,
        }
    }
}

/// The state of every chunk, each changed with one atomic step.
pub(crate) struct Claims(Box<[AtomicU8]>);

impl Claims {
    /// `n` chunks, all free.
    pub(crate) fn new(n: usize) -> Claims {
        Claims(
            (0..n)
                .map(|_| AtomicU8::new(ChunkState::Free as u8))
                .collect(),
        )
    }

    /// Where chunk `i` is now.
    pub(crate) fn state(&self, i: usize) -> ChunkState {
        ChunkState::from_u8(self.0[i].load(Ordering::Acquire))
    }

    /// Takes chunk `i` if nobody has: true when the caller now owns it.
    pub(crate) fn claim(&self, i: usize) -> bool {
        self.take(i, ChunkState::Free)
    }

    /// Takes chunk `i` if it was left partly done.
    pub(crate) fn claim_partial(&self, i: usize) -> bool {
        self.take(i, ChunkState::Partial)
    }

    /// The owner of chunk `i` leaves it partly done for the next taker.
    pub(crate) fn leave_partial(&self, i: usize) {
        self.set_from_taken(i, ChunkState::Partial);
    }

    /// The owner of chunk `i` finished it.
    pub(crate) fn done(&self, i: usize) {
        self.set_from_taken(i, ChunkState::Done);
    }

    fn take(&self, i: usize, from: ChunkState) -> bool {
        self.0[i]
            .compare_exchange(
                from as u8,
                ChunkState::Taken as u8,
                Ordering::AcqRel,
                Ordering::Acquire,
            )
            .is_ok()
    }

    fn set_from_taken(&self, i: usize, to: ChunkState) {
        let was = self.0[i].swap(to as u8, Ordering::AcqRel);
        debug_assert_eq!(
            ChunkState::from_u8(was),
            ChunkState::Taken,
            "chunk {i} left by a thread that did not own it"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_chunk_is_taken_once_and_only_its_owner_moves_it_on() {
        let c = Claims::new(2);
        assert_eq!(c.state(0), ChunkState::Free);
        assert!(c.claim(0));
        assert!(!c.claim(0), "a taken chunk cannot be taken again");
        assert!(!c.claim_partial(0));
        c.leave_partial(0);
        assert_eq!(c.state(0), ChunkState::Partial);
        assert!(!c.claim(0), "a partial chunk is not free");
        assert!(c.claim_partial(0));
        c.done(0);
        assert_eq!(c.state(0), ChunkState::Done);
        assert!(!c.claim(0) && !c.claim_partial(0));
        assert_eq!(c.state(1), ChunkState::Free, "chunks are independent");
    }

    #[test]
    fn one_of_many_racing_threads_wins_each_chunk() {
        let c = std::sync::Arc::new(Claims::new(64));
        let wins: usize = (0..4)
            .map(|_| {
                let c = c.clone();
                std::thread::spawn(move || (0..64).filter(|&i| c.claim(i)).count())
            })
            .collect::<Vec<_>>()
            .into_iter()
            .map(|t| t.join().unwrap())
            .sum();
        assert_eq!(wins, 64);
    }

    #[test]
    #[should_panic(expected = "did not own it")]
    #[cfg(debug_assertions)]
    fn finishing_a_chunk_nobody_took_is_a_bug() {
        Claims::new(1).done(0);
    }
}
