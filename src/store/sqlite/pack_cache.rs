//! The SQLite writer's copy of recently flushed accounts' pack rows, so a
//! flush of an account it flushed a moment ago attributes against them
//! without reading `packs` again (issues 10 and 14).
//!
//! **Why it is exact.** One process has the file (`PATH.lock`), and every
//! write to `packs` runs on the store's writer thread: a flush, a grant, a
//! plan's recalculation. A flush puts what the account's rows hold after its
//! commit ([`crate::ledger::Attributed::totals`], which
//! [`crate::ledger::attribute`] computes from the rows it was given and the
//! rows it writes); a grant or a recalculation forgets the account. A flush
//! takes each account's entry out before it writes the account, and puts
//! it back only once it has committed: a flush that fails, whether or not
//! its commit happened, leaves no entry of its accounts. An entry
//! therefore holds what `SELECT … FROM packs WHERE account_id = ?` would
//! return, in another order, which `attribute` does not see: it sorts the
//! packs in R6 order, and that order ends with the pack id, unique within
//! an account.
//!
//! **Why it is bounded, and how.** At 10 k accounts every account is
//! flushed about once a second and all of them fit; at a million drawn
//! uniformly few flushes would find their account, and keeping them all
//! would cost about 200 bytes an account of RSS (issue 10's bar is 300 per
//! active account). At most [`PackCache::CAPACITY`] accounts are kept.
//! Flushes go round the dirty accounts in turn, so a cache that evicted the
//! least recent account would miss every time once more accounts than it
//! holds are flushed (criterion's 100 k accounts measured slower than with
//! no cache with two generations of 32 k); instead a full cache admits no
//! one new and keeps the accounts it has: at 100 k accounts, 65 k of each
//! round's. Once it has missed [`PackCache::RESET_AFTER`] times while full
//! (every seventh or eighth round there), it starts over, so that a
//! working set that moved on is replaced.

use std::{collections::HashMap, sync::Arc};

use crate::{meter::FastHash, store::StoredPack};

#[derive(Default)]
pub(super) struct PackCache {
    accounts: HashMap<Arc<str>, Vec<StoredPack>, FastHash>,
    /// Lookups that missed while the cache was full, since it last started
    /// over.
    misses: usize,
}

impl PackCache {
    /// Accounts kept: about 13 MB with two packs each (the free tier's
    /// calls and egress).
    pub(super) const CAPACITY: usize = 65_536;
    /// Misses while full before the cache starts over.
    pub(super) const RESET_AFTER: usize = 4 * Self::CAPACITY;

    /// The account's pack rows, taken out of the cache (a flush puts them
    /// back once its transaction commits). `None` when not known.
    pub(super) fn take(&mut self, account_id: &str) -> Option<Vec<StoredPack>> {
        let hit = self.accounts.remove(account_id);
        if hit.is_none() && self.accounts.len() + 1 >= Self::CAPACITY {
            self.misses += 1;
            if self.misses >= Self::RESET_AFTER {
                self.accounts = HashMap::default();
                self.misses = 0;
            }
        }
        hit
    }

    /// Whether [`put`](Self::put) would keep an account (there is room):
    /// the caller then copies the packs, and not otherwise.
    pub(super) fn has_room(&self) -> bool {
        self.accounts.len() < Self::CAPACITY
    }

    /// Records the account's pack rows as the committed file holds them,
    /// if there is room.
    pub(super) fn put(&mut self, account_id: Arc<str>, packs: Vec<StoredPack>) {
        if self.has_room() {
            self.accounts.insert(account_id, packs);
        }
    }

    /// Drops what is known of one account (its packs are being changed
    /// other than by a flush).
    pub(super) fn forget(&mut self, account_id: &str) {
        self.accounts.remove(account_id);
    }

    /// Drops everything.
    #[cfg(test)]
    pub(super) fn clear(&mut self) {
        self.accounts = HashMap::default();
    }

    /// Accounts held.
    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.accounts.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pack(id: &str, used: u64) -> StoredPack {
        StoredPack {
            spec: crate::packs::tests::purchased(id, 10, 0, 1, 0),
            used,
        }
    }

    #[test]
    fn a_full_cache_keeps_its_accounts_and_starts_over_after_many_misses() {
        let mut cache = PackCache::default();
        let n = PackCache::CAPACITY + 10;
        for i in 0..n {
            assert!(cache.take(&format!("a{i}")).is_none());
            cache.put(format!("a{i}").into(), vec![pack("p", i as u64)]);
        }
        assert_eq!(cache.len(), PackCache::CAPACITY);
        // The first ones stay; the last ones found it full.
        assert_eq!(cache.take("a1").map(|p| p[0].used), Some(1));
        cache.put("a1".into(), vec![pack("p", 2)]);
        assert_eq!(cache.take("a1").map(|p| p[0].used), Some(2));
        assert!(cache.take(&format!("a{}", n - 1)).is_none());
        // Taken means gone until put again.
        assert!(cache.take("a1").is_none());
        cache.put("a1".into(), vec![pack("p", 3)]);
        cache.forget("a1");
        assert!(cache.take("a1").is_none());
        // Misses while full: after enough of them it starts over.
        for i in 0..PackCache::RESET_AFTER {
            let id = format!("b{i}");
            if cache.take(&id).is_none() {
                cache.put(id.into(), vec![pack("p", 0)]);
            }
            assert!(cache.len() <= PackCache::CAPACITY);
        }
        assert!(cache.take("a2").is_none(), "started over");
    }
}
