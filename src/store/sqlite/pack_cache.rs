//! The SQLite writer's copy of recently flushed accounts' pack rows, so a
//! flush of an account it flushed a moment ago attributes against them
//! without reading `packs` again (issues 10 and 14).
//!
//! Since stop 34 a flush whose account the cache lacks first tries to write
//! it without its packs: an update that adds each named pack's sum only
//! where it fits (`take_room` in the store). That spares the read whenever
//! the account's packs have room, which is most flushes at any scale; such
//! an account is not put in the cache, since the flush saw only the packs
//! it wrote. The cache keeps the accounts a flush had to read: those whose
//! rows a pack cannot take whole (re-attributed, or capped), or that hold
//! request ids the store holds already.
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
//! round's. Once it has missed [`RESET_FACTOR`] times its bound while full,
//! it starts over, so that a working set that moved on is replaced.
//!
//! **Why the bound adapts.** A full cache that admits no one finds a share
//! of the flushed accounts equal to its bound over their number: 6.5% at a
//! million uniform accounts, for 13 MB. Each time it starts over it looks
//! at its hits since the last start, among the lookups made while it was
//! full: below an eighth, the next bound is half (at least
//! [`PackCache::MIN_BOUND`]); otherwise twice (at most `CAPACITY`). So it
//! stays whole while it spares an eighth of the reads or more (up to
//! about six times `CAPACITY` accounts flushed in turn, counting the round
//! that fills it), and shrinks to under 1 MB at a million; when the
//! accounts flushed shrink back, its hits rise and it grows again. (A
//! cache that is never full never starts over, and keeps its bound.)

use std::{collections::HashMap, sync::Arc};

use crate::{meter::FastHash, store::StoredPack};

pub(super) struct PackCache {
    accounts: HashMap<Arc<str>, Vec<StoredPack>, FastHash>,
    /// The most accounts kept now, between `least` and `most`
    /// ([`MIN_BOUND`](Self::MIN_BOUND) and [`CAPACITY`](Self::CAPACITY)
    /// outside tests).
    bound: usize,
    least: usize,
    most: usize,
    /// Lookups that missed while the cache was full, since it last started
    /// over.
    misses: usize,
    /// Lookups made while it was full, and those that found their account,
    /// since it last started over.
    lookups: usize,
    hits: usize,
    /// Tests that compare the flush's two paths set it: every flush then
    /// reads the packs it lacks (see [`may_skip_reads`](Self::may_skip_reads)).
    #[cfg(test)]
    pub(super) always_read: bool,
}

/// A full cache starts over after this many misses per account it holds.
const RESET_FACTOR: usize = 4;

impl Default for PackCache {
    fn default() -> Self {
        Self::with_bounds(Self::MIN_BOUND, Self::CAPACITY)
    }
}

impl PackCache {
    /// Accounts kept: about 13 MB with two packs each (the free tier's
    /// calls and egress).
    pub(super) const CAPACITY: usize = 65_536;
    /// The least the bound shrinks to: about 0.8 MB.
    pub(super) const MIN_BOUND: usize = 4_096;

    /// The account's pack rows, taken out of the cache (a flush puts them
    /// back once its transaction commits). `None` when not known.
    pub(super) fn take(&mut self, account_id: &str) -> Option<Vec<StoredPack>> {
        let full = self.accounts.len() + 1 >= self.bound;
        let hit = self.accounts.remove(account_id);
        if full {
            self.lookups += 1;
            if hit.is_some() {
                self.hits += 1;
            } else {
                self.misses += 1;
                if self.misses >= RESET_FACTOR * self.bound {
                    self.start_over();
                }
            }
        }
        hit
    }

    fn with_bounds(least: usize, most: usize) -> PackCache {
        PackCache {
            accounts: HashMap::default(),
            bound: most,
            least,
            most,
            misses: 0,
            lookups: 0,
            hits: 0,
            #[cfg(test)]
            always_read: false,
        }
    }

    /// Whether a flush may write an account whose packs the cache lacks
    /// without reading them, where each pack it names has room (the
    /// SQLite store's `take_room`): always, but in tests that compare that
    /// path with the reading one.
    pub(super) fn may_skip_reads(&self) -> bool {
        #[cfg(test)]
        return !self.always_read;
        #[cfg(not(test))]
        true
    }

    /// Empties the cache, with a new bound from its hits since it last
    /// started over (see the module's doc).
    fn start_over(&mut self) {
        self.bound = if self.hits * 8 < self.lookups {
            (self.bound / 2).max(self.least)
        } else {
            (self.bound * 2).min(self.most)
        };
        self.accounts = HashMap::default();
        (self.misses, self.lookups, self.hits) = (0, 0, 0);
    }

    /// Whether [`put`](Self::put) would keep an account (there is room):
    /// the caller then copies the packs, and not otherwise.
    pub(super) fn has_room(&self) -> bool {
        self.accounts.len() < self.bound
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

    /// The most accounts it keeps now.
    #[cfg(test)]
    pub(super) fn bound(&self) -> usize {
        self.bound
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
        for i in 0..RESET_FACTOR * PackCache::CAPACITY {
            let id = format!("b{i}");
            if cache.take(&id).is_none() {
                cache.put(id.into(), vec![pack("p", 0)]);
            }
            assert!(cache.len() <= PackCache::CAPACITY);
        }
        assert!(cache.take("a2").is_none(), "started over");
    }

    /// One flush round over `n` accounts, each account taken and put back
    /// as a flush does.
    fn round(cache: &mut PackCache, n: usize) {
        for i in 0..n {
            let id = format!("a{i}");
            let packs = cache.take(&id).unwrap_or_else(|| vec![pack("p", 0)]);
            if cache.has_room() {
                cache.put(id.into(), packs);
            }
        }
    }

    #[test]
    fn a_cache_that_rarely_hits_shrinks_and_grows_back_once_it_hits() {
        // The same rules at a smaller scale: 64 to 1,024 accounts.
        let mut cache = PackCache::with_bounds(64, 1_024);
        // Rounds over 16 times what it holds: it finds a sixteenth of them,
        // and halves each time it starts over, down to its least.
        for _ in 0..20 {
            round(&mut cache, 16 * 1_024);
        }
        assert_eq!(cache.bound(), 64);
        assert!(cache.len() <= 64);
        // Rounds over twice its least: it finds half of them, so it grows
        // until all of them fit, and then keeps them all.
        for _ in 0..20 {
            round(&mut cache, 128);
        }
        assert!(cache.bound() >= 128, "{}", cache.bound());
        assert_eq!(cache.len(), 128);
        // Over three times its most, counting the round that fills it, it
        // still finds more than an eighth, and stays whole.
        let mut cache = PackCache::with_bounds(64, 1_024);
        for _ in 0..20 {
            round(&mut cache, 3 * 1_024);
        }
        assert_eq!(cache.bound(), 1_024);
    }
}
