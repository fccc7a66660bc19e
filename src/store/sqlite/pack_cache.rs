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
//! **Why it is bounded.** At 10 k accounts every account is flushed about
//! once a second and all of them fit; at a million drawn uniformly few
//! flushes would find their account, and keeping them all would cost about
//! 200 bytes an account of RSS (issue 10's bar is 300 per active account).
//! Two generations of at most [`PackCache::HALF`] accounts each: an entry
//! is written into the current one, a hit is moved there, and once the
//! current generation is full it becomes the previous one and the former
//! previous one is dropped. That keeps the accounts flushed most recently
//! at a cost of one map insert per flush, without an LRU list.

use std::{collections::HashMap, sync::Arc};

use crate::meter::FastHash;
use crate::store::StoredPack;

type Generation = HashMap<Arc<str>, Vec<StoredPack>, FastHash>;

#[derive(Default)]
pub(super) struct PackCache {
    current: Generation,
    previous: Generation,
}

impl PackCache {
    /// Accounts per generation: at most twice as many are kept, about
    /// 13 MB with two packs each (the free tier's calls and egress).
    pub(super) const HALF: usize = 32_768;

    /// The account's pack rows, taken out of the cache (a flush puts them
    /// back once its transaction commits). `None` when not known.
    pub(super) fn take(&mut self, account_id: &str) -> Option<Vec<StoredPack>> {
        self.current
            .remove(account_id)
            .or_else(|| self.previous.remove(account_id))
    }

    /// Records the account's pack rows as the committed file holds them.
    pub(super) fn put(&mut self, account_id: Arc<str>, packs: Vec<StoredPack>) {
        if self.current.len() >= Self::HALF && !self.current.contains_key(&account_id) {
            self.previous = std::mem::take(&mut self.current);
            self.current.reserve(Self::HALF.min(self.previous.len()));
        }
        self.previous.remove(&account_id);
        self.current.insert(account_id, packs);
    }

    /// Drops what is known of one account (its packs are being changed
    /// other than by a flush).
    pub(super) fn forget(&mut self, account_id: &str) {
        self.current.remove(account_id);
        self.previous.remove(account_id);
    }

    /// Drops everything.
    #[cfg(test)]
    pub(super) fn clear(&mut self) {
        self.current = Generation::default();
        self.previous = Generation::default();
    }

    /// Accounts held.
    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.current.len() + self.previous.len()
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
    fn keeps_the_accounts_put_most_recently_within_two_generations() {
        let mut cache = PackCache::default();
        let n = PackCache::HALF * 2 + 10;
        for i in 0..n {
            cache.put(format!("a{i}").into(), vec![pack("p", i as u64)]);
            // A hit moves the account to the current generation.
            if i % 1000 == 999 {
                let hot = cache.take("a0").expect("kept while hit");
                cache.put("a0".into(), hot);
            }
        }
        assert!(cache.len() <= 2 * PackCache::HALF, "{}", cache.len());
        assert!(cache.take("a1").is_none(), "the oldest went");
        assert_eq!(cache.take("a0").map(|p| p.len()), Some(1));
        let last = format!("a{}", n - 1);
        assert_eq!(cache.take(&last).map(|p| p[0].used), Some(n as u64 - 1));
        // Taken means gone until put again.
        assert!(cache.take(&last).is_none());
        cache.put("b".into(), vec![pack("p", 1)]);
        cache.forget("b");
        assert!(cache.take("b").is_none());
        cache.put("c".into(), vec![pack("p", 1)]);
        cache.clear();
        assert_eq!(cache.len(), 0);
    }
}
