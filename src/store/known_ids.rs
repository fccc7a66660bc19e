//! Which accounts an SQLite store may hold, kept in memory, so that an
//! account's first call skips the store read when the store cannot hold it
//! (issue 10: the first pass over a million new accounts).
//!
//! **Why it is exact for SQLite, and not used for PostgreSQL.** An SQLite
//! store is open in one process at a time (`PATH.lock`, see
//! [`super::sqlite`]), and every row of `accounts` and `packs` is written
//! through that process's [`SqliteStore`](super::sqlite::SqliteStore):
//! `put_account`, `grant_pack` and `flush_batch`. Each of them notes its
//! account ids here *before* its transaction starts, and the ids already
//! in the file are read once at open. So an id absent from the set is
//! absent from the file, and [`KnownIds::may_hold`] answering `false` is
//! what the read would have answered (a loader that checks between the
//! note and the commit reads the store, as it did before). On PostgreSQL
//! another node creates accounts at any time, by its own flush as well as
//! by operator calls, and only the latter leave a change row; a node could
//! not know every account another one created, so its store always reads.
//!
//! **What it holds.** A 32-bit fingerprint of each id (foldhash, seeded per
//! process), not the id: about 10 B per stored account (a 1 M-account
//! store costs ~10 MB) instead of the id's 40–50. Two ids may share a
//! fingerprint; that only makes [`KnownIds::may_hold`] answer `true` for an
//! id the store does not hold, and the store is read as before (at 1 M
//! stored accounts, for about one new id in 4,000). The set never answers
//! `false` for an id the store holds.
//!
//! **Loading.** The ids already in the file are read once, when the first
//! account is loaded, as a job of the store's writer thread (nice +10) on
//! the writing connection: no write of the store runs during the read, and
//! writes queued meanwhile wait for it (the time a 1 M-account file takes
//! was not measured). A restart is ready at once: until the read is done
//! every load reads the store. Ids noted meanwhile go straight into the
//! shared set, and the loaded ones are added to it.

use std::{
    collections::HashSet,
    hash::BuildHasher,
    sync::atomic::{AtomicBool, Ordering},
};

use parking_lot::RwLock;

use crate::meter::FastHash;

/// Fingerprints of the account ids a store holds (see the module docs).
pub struct KnownIds {
    /// Seeded once per process: the fingerprints never leave it.
    hasher: FastHash,
    set: RwLock<HashSet<u32, FastHash>>,
    /// Set once the ids that were in the file at open are in `set`.
    loaded: AtomicBool,
    loaded_tx: tokio::sync::watch::Sender<bool>,
}

impl Default for KnownIds {
    fn default() -> Self {
        KnownIds {
            hasher: FastHash::default(),
            set: RwLock::new(HashSet::default()),
            loaded: AtomicBool::new(false),
            loaded_tx: tokio::sync::watch::Sender::new(false),
        }
    }
}

impl KnownIds {
    /// The id's fingerprint, as the set holds it.
    pub fn fingerprint(&self, id: &str) -> u32 {
        // The high half: foldhash mixes best there.
        (self.hasher.hash_one(id) >> 32) as u32
    }

    /// Whether the store may hold `id`: `false` only if it certainly does
    /// not (the set is loaded and holds no id with its fingerprint).
    pub fn may_hold(&self, id: &str) -> bool {
        if !self.loaded.load(Ordering::Acquire) {
            return true;
        }
        self.set.read().contains(&self.fingerprint(id))
    }

    /// Notes ids about to be written. Call before the transaction that
    /// writes them begins; a transaction that then fails leaves an id that
    /// only costs a read.
    pub fn note<'a>(&self, ids: impl IntoIterator<Item = &'a str>) {
        let fps: Vec<u32> = ids.into_iter().map(|id| self.fingerprint(id)).collect();
        self.set.write().extend(fps);
    }

    /// Adds the [fingerprints](Self::fingerprint) of the ids that were in
    /// the file at open, and from then on answers from the set.
    pub fn loaded(&self, fingerprints: Vec<u32>) {
        // Built outside the lock; the few ids noted meanwhile are moved in.
        let mut all: HashSet<u32, FastHash> = fingerprints.into_iter().collect();
        {
            let mut set = self.set.write();
            all.extend(set.drain());
            *set = all;
        }
        self.loaded.store(true, Ordering::Release);
        self.loaded_tx.send_replace(true);
    }

    /// Whether the ids in the file at open have been read.
    pub fn is_loaded(&self) -> bool {
        self.loaded.load(Ordering::Acquire)
    }

    /// Resolves once the ids in the file at open have been read (for
    /// tests and benchmarks; the store works the same before).
    pub async fn wait_loaded(&self) {
        let mut rx = self.loaded_tx.subscribe();
        let _ = rx.wait_for(|l| *l).await;
    }

    /// How many distinct fingerprints the set holds.
    pub fn len(&self) -> usize {
        self.set.read().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn before_loading_every_id_may_be_held() {
        let k = KnownIds::default();
        assert!(k.may_hold("anything"));
        k.note(["a"]);
        assert!(k.may_hold("b"), "not loaded yet: the store must be read");
    }

    #[test]
    fn once_loaded_only_noted_or_loaded_ids_may_be_held() {
        let k = KnownIds::default();
        k.note(["noted-before-load"]);
        k.loaded(vec![k.fingerprint("in-the-file")]);
        k.note(["noted-after-load"]);
        for id in ["noted-before-load", "in-the-file", "noted-after-load"] {
            assert!(k.may_hold(id), "{id}");
        }
        // 1,000 other ids: with 3 fingerprints of 2^32 a false positive
        // here has odds of about 1 in 1.4 M.
        let held = (0..1000)
            .filter(|i| k.may_hold(&format!("other-{i}")))
            .count();
        assert_eq!(held, 0);
    }
}
