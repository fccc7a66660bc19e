//! Which accounts are in memory: lazy loading on first touch, the queue of
//! accounts with unflushed changes, accounts set aside after a permanent
//! store error, and idle eviction.

use std::{collections::HashMap, sync::Arc};

use arcstr::ArcStr;

use super::{AccountState, Meter, MeterError, UnknownAccounts};
use crate::{
    calendar::Ts,
    packs::{PackCounter, PackSource},
    store::StoredPack,
};

/// The dirty queue's capacity once it has drained after a burst (see
/// [`Meter::take_dirty`]): 8,192 accounts, 64 KiB.
const DIRTY_KEEP: usize = 8_192;

impl Meter {
    /// Number of resident accounts.
    pub fn resident(&self) -> usize {
        self.accounts.len()
    }

    /// The account if it is in memory; never loads it.
    pub fn resident_account(&self, id: &str) -> Option<Arc<AccountState>> {
        self.accounts.get(id.as_bytes()).map(|a| a.key().0.clone())
    }

    /// Number of accounts waiting for a flush.
    pub fn dirty_len(&self) -> usize {
        self.dirty.lock().len()
    }

    /// Takes up to `n` accounts from the head of the flush queue.
    ///
    /// Once the queue has drained, a buffer grown by a burst (a first pass
    /// over a million new accounts queues a million) is swapped for a small
    /// one and freed after the lock is released: kept, it held 8 B for every
    /// account ever queued at once (8 MB at 1 M), in an idle server too.
    pub fn take_dirty(&self, n: usize) -> Vec<Arc<AccountState>> {
        let mut dirty = self.dirty.lock();
        let n = n.min(dirty.len());
        let taken = dirty.drain(..n).collect();
        let spare =
            (dirty.len() <= DIRTY_KEEP / 2 && dirty.capacity() > 4 * DIRTY_KEEP).then(|| {
                let mut small = std::collections::VecDeque::with_capacity(DIRTY_KEEP);
                small.extend(dirty.drain(..));
                std::mem::replace(&mut *dirty, small)
            });
        drop(dirty);
        drop(spare);
        taken
    }

    /// Queues an account that just became dirty, and wakes the flusher once
    /// enough are waiting.
    pub(super) fn enqueue(&self, acct: &Arc<AccountState>) {
        let mut dirty = self.dirty.lock();
        dirty.push_back(acct.clone());
        if dirty.len() == self.flush_threshold {
            self.flush_wanted.notify_one();
        }
    }

    /// Queues accounts again (changes that arrived during their flush).
    pub fn requeue(&self, accounts: impl IntoIterator<Item = Arc<AccountState>>) {
        self.dirty.lock().extend(accounts);
    }

    /// Puts accounts whose flush failed back at the head of the queue: their
    /// changes are older than anything queued since, and the head is what
    /// [`oldest_dirty_since`](Self::oldest_dirty_since) reads.
    pub fn requeue_front(&self, accounts: Vec<Arc<AccountState>>) {
        let mut dirty = self.dirty.lock();
        for a in accounts.into_iter().rev() {
            dirty.push_front(a);
        }
    }

    /// Sets an account aside after the store refused its changes for good.
    /// It stays marked queued, so new changes pile up in its ledger without
    /// entering the flush queue; shutdown writes them to the spill file.
    pub fn set_aside(&self, acct: Arc<AccountState>) {
        self.set_aside.lock().push(acct);
    }

    /// Accounts set aside after a permanent store error.
    pub fn set_aside_accounts(&self) -> Vec<Arc<AccountState>> {
        self.set_aside.lock().clone()
    }

    /// Every account with unflushed changes: queued and set aside.
    pub fn unflushed_accounts(&self) -> Vec<Arc<AccountState>> {
        let mut all: Vec<_> = self.dirty.lock().iter().cloned().collect();
        all.extend(self.set_aside.lock().iter().cloned());
        all
    }

    /// Wall-clock time of the oldest change waiting in the queue. The queue
    /// is in the order accounts became dirty, so this reads only its head:
    /// cheap enough for every metrics scrape, however many accounts wait.
    pub fn oldest_dirty_since(&self) -> Option<Ts> {
        let head = self.dirty.lock().front().cloned();
        head.and_then(|a| a.pending_summary().1)
    }

    /// The earliest hour with unflushed usage, across all accounts. Visits
    /// every dirty account: for settlement, not for metrics.
    pub fn oldest_pending_hour(&self) -> Option<Ts> {
        self.unflushed_accounts()
            .iter()
            .filter_map(|a| a.pending_summary().0)
            .min()
    }

    // --- loading ---

    /// The resident account, loading it on first touch. With `create`, an
    /// account the store does not know is created (not yet activated) if
    /// `unknown_accounts = activate`.
    pub async fn account(
        &self,
        id: &str,
        create: bool,
        now: Ts,
    ) -> Result<Option<Arc<AccountState>>, MeterError> {
        if let Some(a) = self.touch_resident(id, now) {
            return Ok(Some(a));
        }
        // Every caller has checked it already; checked here too, since
        // this is the one way into the map, so that a resident id is
        // always a valid one (see `touch_resident`).
        super::validate_account_id(id)?;
        // The id the account will hold, if it is loaded or made here.
        let key = ArcStr::from(id);
        let cell = self.loading.entry(key.clone()).or_default().clone();
        let loaded = cell
            .get_or_try_init(|| self.load(key.clone(), now))
            .await
            .cloned();
        self.loading.remove_if(&key, |_, c| Arc::ptr_eq(c, &cell));
        match loaded? {
            Some(a) => Ok(Some(a)),
            None if !create => Ok(None),
            None if self.cfg.unknown_accounts == UnknownAccounts::Reject => {
                Err(MeterError::UnknownAccount(id.to_string()))
            }
            None => Ok(Some(self.insert_new(key, now))),
        }
    }

    /// The resident account, stamped as used at `now`; `None` if it is not
    /// resident. Synchronous: the hot paths try it before the loading
    /// [`account_for_request`](Self::account_for_request), so that a
    /// resident account costs one map lookup and no future (about 170
    /// instructions a deduction less in a batch, callgrind).
    ///
    /// A resident account's id is a valid one
    /// ([`validate_account_id`](super::validate_account_id)): accounts
    /// become resident only through [`account`](Self::account) and
    /// [`account_for_admin`](Self::account_for_admin), which check it. So a
    /// request whose id is found here, or by
    /// [`touch_resident_all`](Self::touch_resident_all), needs no other
    /// check of its id (`App::admit`).
    pub fn touch_resident(&self, id: &str, now: Ts) -> Option<Arc<AccountState>> {
        let a = self.accounts.get(id.as_bytes())?;
        let a = &a.key().0;
        a.touch_secs(super::account::touch_secs(now));
        Some(a.clone())
    }

    /// [`touch_resident`](Self::touch_resident) for each of a group's ids,
    /// in their order: `None` where an id is not resident. The stamp of
    /// `now` is computed once (a division) for the whole group.
    ///
    /// The group takes one read lock per shard it needs, not one per id,
    /// and clones the accounts' `Arc`s only once every id has been found.
    /// Taking and releasing a lock and cloning an `Arc` are atomic
    /// read-modify-writes, which x86 orders after every load before them:
    /// one lookup after another, each waited for the account it compared
    /// before the next could start. Here the finds follow one another with
    /// no such instruction between them, so the processor fetches their
    /// accounts together. The stamps come last, for the same reason.
    ///
    /// The `Arc`s are cloned while the read locks are held, as in
    /// `touch_resident`: eviction checks an account's reference
    /// count under its shard's write lock, so it never drops an account a
    /// group has found. The locks are held for the finds and the clones
    /// only, and taken in shard order; a reader waits only for a writer
    /// that holds its shard, and no writer waits for a second lock while
    /// it holds one, so groups cannot deadlock with each other or with
    /// eviction and loading.
    pub fn touch_resident_all(&self, ids: &[&str], now: Ts) -> Vec<Option<Arc<AccountState>>> {
        let map = &self.accounts;
        let shards = map.shards();
        // Hashed as `DashMap::get` hashes a `[u8]` key.
        let keys: Vec<(u64, usize)> = ids
            .iter()
            .map(|id| {
                let h = map.hash_usize(&id.as_bytes());
                (h as u64, map.determine_shard(h))
            })
            .collect();
        let mut wanted = vec![false; shards.len()];
        for &(_, s) in &keys {
            wanted[s] = true;
        }
        let tables: Vec<_> = shards
            .iter()
            .zip(wanted)
            .map(|(shard, wanted)| wanted.then(|| shard.read()))
            .collect();
        let hits: Vec<Option<&Arc<AccountState>>> = ids
            .iter()
            .zip(&keys)
            .map(|(id, &(hash, s))| {
                let table = tables[s].as_ref()?;
                let id = id.as_bytes();
                let (k, _) = table.get(hash, |(k, _)| k.0.id.as_bytes() == id)?;
                Some(&k.0)
            })
            .collect();
        let found: Vec<Option<Arc<AccountState>>> = hits.into_iter().map(|a| a.cloned()).collect();
        drop(tables);
        let stamp = super::account::touch_secs(now);
        for a in found.iter().flatten() {
            a.touch_secs(stamp);
        }
        found
    }

    /// The account a deduction goes to: loaded, or created if unknown and
    /// `unknown_accounts = activate`.
    pub async fn account_for_deduction(
        &self,
        id: &str,
        now: Ts,
    ) -> Result<Arc<AccountState>, MeterError> {
        self.account(id, true, now)
            .await?
            .ok_or_else(|| MeterError::UnknownAccount(id.to_string()))
    }

    /// The account a deduction request goes to. A check (`calls = 0,
    /// egress_bytes = 0`) is a read: an unknown account is answered from a
    /// detached, unactivated account that is never kept, so a check creates
    /// nothing, in memory or in the store, before a restart or after (in
    /// reject mode it is refused like any deduction).
    pub async fn account_for_request(
        &self,
        id: &str,
        d: &super::Deduction<'_>,
        now: Ts,
    ) -> Result<Arc<AccountState>, MeterError> {
        if !d.is_check() {
            return self.account_for_deduction(id, now).await;
        }
        match self.account(id, false, now).await? {
            Some(a) => Ok(a),
            None if self.cfg.unknown_accounts == UnknownAccounts::Reject => {
                Err(MeterError::UnknownAccount(id.to_string()))
            }
            None => Ok(Arc::new(AccountState::new(id, None, now))),
        }
    }

    /// The account an operator addresses: loaded, or created whatever
    /// `unknown_accounts` says (operators create accounts in reject mode).
    pub async fn account_for_admin(
        &self,
        id: &str,
        now: Ts,
    ) -> Result<Arc<AccountState>, MeterError> {
        super::validate_account_id(id)?;
        if let Some(a) = self.account(id, false, now).await? {
            return Ok(a);
        }
        Ok(self.insert_new(id.into(), now))
    }

    /// The resident account, or `NotFound`.
    pub async fn known_account(&self, id: &str, now: Ts) -> Result<Arc<AccountState>, MeterError> {
        super::validate_account_id(id)?;
        self.account(id, false, now)
            .await?
            .ok_or_else(|| MeterError::NotFound(id.to_string()))
    }

    pub(super) fn insert_new(&self, key: ArcStr, now: Ts) -> Arc<AccountState> {
        self.intern(Arc::new(AccountState::new(key, None, now)))
    }

    /// Makes `state` resident, or returns the account already resident
    /// under its id (a concurrent load or creation won).
    fn intern(&self, state: Arc<AccountState>) -> Arc<AccountState> {
        self.accounts
            .entry(super::Resident(state))
            .or_insert(())
            .key()
            .0
            .clone()
    }

    async fn load(&self, id: ArcStr, now: Ts) -> Result<Option<Arc<AccountState>>, MeterError> {
        // Another load may have finished between our map miss and now.
        if let Some(a) = self.accounts.get(id.as_bytes()) {
            return Ok(Some(a.key().0.clone()));
        }
        let keep_after = self.keep_after(now);
        let loaded = self.store.load_account(&id, keep_after, now).await?;
        if loaded.is_unknown() {
            return Ok(None);
        }
        let state = AccountState::new(id.clone(), loaded.account.as_ref(), now);
        let mut used: HashMap<&str, u64> = HashMap::new();
        let mut counters = Vec::new();
        for StoredPack { spec, used: u } in &loaded.packs {
            used.insert(&spec.pack_id, *u);
            if spec.source == PackSource::Purchased {
                counters.push(PackCounter::new(spec.clone(), *u));
            }
        }
        if let Some(a) = state.activated_at() {
            // Free-tier months that can still take deductions, with what the
            // store already recorded for them.
            for m in self.cfg.free_months(a) {
                if !self.month_is_live(&m, now) {
                    continue;
                }
                for spec in self.free_specs(&m) {
                    let u = used.get(&*spec.pack_id).copied().unwrap_or(0);
                    counters.push(PackCounter::new(spec, u));
                }
            }
        }
        state.merge_packs(
            || counters.iter().map(PackCounter::copy).collect(),
            keep_after,
        );
        if !loaded.open_usage.is_empty() {
            let mut slot = state.pending.lock();
            let mut totals = slot.totals();
            for &(hour, item, amount) in &loaded.open_usage {
                totals.seed(hour, item, amount);
            }
        }
        if !loaded.dedup.is_empty() {
            let mut table = state.dedup();
            for r in loaded.dedup {
                table.remember(r);
            }
        }
        Ok(Some(self.intern(Arc::new(state))))
    }

    /// Drops accounts idle since `idle_before` that have nothing unflushed
    /// and that no request holds; returns how many went.
    pub fn evict_idle(&self, idle_before: Ts) -> usize {
        let before = self.accounts.len();
        // `retain` holds each shard's write lock, so no request can clone an
        // account while we look at its reference count.
        self.accounts.retain(|super::Resident(a), _| {
            a.last_touch() >= idle_before
                || Arc::strong_count(a) > 1
                || a.pending
                    .try_lock()
                    .is_none_or(|slot| !slot.is_empty() || slot.queued())
        });
        before - self.accounts.len()
    }

    /// Drops every resident account that holds nothing unflushed, as a
    /// restart would (for tests of eviction and reload).
    pub fn evict_all_flushed(&self) -> usize {
        self.evict_idle(Ts::MAX)
    }
}
