//! The barrier between deductions and the two things that must know no
//! deduction is half-done: shutdown and settlement.
//!
//! Every deduction runs its checks and writes its ledger entry while it
//! holds a [`Pass`]: a read lock on one of a few cache-line-padded shards,
//! picked by thread, so passes on different cores do not contend. Closing
//! the gate or moving the settled mark stores the new state and then takes
//! every shard's write lock once. When that returns, every deduction that
//! read the old state has finished, and every later one reads the new
//! state. That is what lets:
//! - shutdown run its final flush after the last acknowledged deduction;
//! - an export return only rows that no deduction can still change (R12).

use std::sync::atomic::{
    AtomicBool, AtomicI64, AtomicUsize,
    Ordering::{Relaxed, SeqCst},
};

use parking_lot::{RwLock, RwLockReadGuard};

use crate::calendar::Ts;

const SHARDS: usize = 16;

/// One shard on its own cache lines.
#[derive(Default)]
#[repr(align(128))]
struct Shard(RwLock<()>);

pub struct Gate {
    shards: [Shard; SHARDS],
    closing: AtomicBool,
    /// Hours that start before this are settled: no deduction may add to them.
    settled_before: AtomicI64,
}

impl Default for Gate {
    fn default() -> Self {
        Gate {
            shards: Default::default(),
            closing: AtomicBool::new(false),
            settled_before: AtomicI64::new(Ts::MIN),
        }
    }
}

/// Held by a deduction from its checks to its ledger entry. Never held
/// across an `.await`.
pub struct Pass<'a> {
    _shard: RwLockReadGuard<'a, ()>,
    pub settled_before: Ts,
}

/// The gate is closed: the process is shutting down.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Closed;

fn shard_index() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static INDEX: usize = NEXT.fetch_add(1, Relaxed) % SHARDS;
    }
    INDEX.with(|i| *i)
}

impl Gate {
    /// Lets one deduction (or one all-or-nothing group) through, unless
    /// the gate is closed.
    pub fn enter(&self) -> Result<Pass<'_>, Closed> {
        let shard = self.shards[shard_index()].0.read();
        if self.closing.load(SeqCst) {
            return Err(Closed);
        }
        Ok(Pass {
            _shard: shard,
            settled_before: self.settled_before.load(SeqCst),
        })
    }

    pub fn is_closed(&self) -> bool {
        self.closing.load(SeqCst)
    }

    /// Closes the gate. When this returns, no deduction is in progress and
    /// none will start.
    pub fn close(&self) {
        self.closing.store(true, SeqCst);
        self.barrier();
    }

    /// Moves the settled mark forward to `before` (never back). When this
    /// returns, no deduction in progress read an earlier mark.
    pub fn settle(&self, before: Ts) -> Ts {
        self.settled_before.fetch_max(before, SeqCst);
        self.barrier();
        self.settled_before()
    }

    pub fn settled_before(&self) -> Ts {
        self.settled_before.load(SeqCst)
    }

    /// Runs `f` while no deduction is in progress and none can start: it
    /// holds every shard's write lock. For the rare changes that replace an
    /// account's counters (an activation that moves, R1), which must not
    /// race a deduction on the old ones. `f` gets the settled mark and
    /// whether the gate is closed. Shards are locked in index order, so two
    /// exclusive sections (or one and a barrier) cannot deadlock. Never
    /// call it while holding a [`Pass`].
    pub fn exclusive<R>(&self, f: impl FnOnce(Ts, bool) -> R) -> R {
        let _all: Vec<_> = self.shards.iter().map(|s| s.0.write()).collect();
        f(self.settled_before(), self.is_closed())
    }

    /// Waits until every pass taken before this call is dropped.
    fn barrier(&self) {
        for s in &self.shards {
            drop(s.0.write());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{mpsc, Arc};

    #[test]
    fn close_waits_for_the_passes_in_progress_and_refuses_later_ones() {
        let gate = Arc::new(Gate::default());
        let (entered_tx, entered) = mpsc::channel();
        let (release_tx, release) = mpsc::channel::<()>();
        let holder = std::thread::spawn({
            let gate = gate.clone();
            move || {
                let pass = gate.enter().unwrap();
                entered_tx.send(()).unwrap();
                release.recv().unwrap();
                drop(pass);
            }
        });
        entered.recv().unwrap();
        let (closed_tx, closed) = mpsc::channel();
        let closer = std::thread::spawn({
            let gate = gate.clone();
            move || {
                gate.close();
                closed_tx.send(()).unwrap();
            }
        });
        // The closer cannot finish while the pass is held.
        assert!(closed.try_recv().is_err());
        release_tx.send(()).unwrap();
        closed.recv().unwrap();
        holder.join().unwrap();
        closer.join().unwrap();
        assert_eq!(gate.enter().err(), Some(Closed));
    }

    #[test]
    fn the_settled_mark_only_moves_forward() {
        let gate = Gate::default();
        assert_eq!(gate.settle(10), 10);
        assert_eq!(gate.settle(5), 10);
        assert_eq!(gate.enter().unwrap().settled_before, 10);
    }
}
