//! Strict mode for `deny` accounts on a shared store (issue 8, item 5).
//!
//! With many nodes on one PostgreSQL database, each node's counters see
//! only its own deductions until a flush, so each would admit a `deny`
//! account's calls up to the whole pack. In strict mode a node admits a
//! `deny` account's calls only from a **lease**: calls of the account's
//! packs reserved for this node in the store's `leases` table, so that
//! across any number of nodes the account is never admitted more calls
//! than its packs hold.
//!
//! - **Size**: the node's recent rate for the account times two flush
//!   intervals, between [`MIN_LEASE`] and [`MAX_LEASE`], and never more than
//!   half of what is still free (the store caps it), so other nodes find
//!   some left.
//! - **Renewal**: in the background every flush interval (or `ttl / 3`, if
//!   shorter), a lease still in use is topped up and its expiry moved; and
//!   synchronously, one store round trip on the deduction path, when a call
//!   finds its lease spent (at most one per second per account while the
//!   store has nothing left to grant).
//! - **Return**: an idle lease is returned by the background task, every
//!   lease at shutdown after the final flush; a flush books what the node
//!   admitted from the lease into the packs in the same transaction.
//! - **Expiry**: a node that dies stops renewing; after `ttl` its unused
//!   reservation is free for the others. What it admitted and never flushed
//!   is lost with it, as any SIGKILL loses unflushed usage, and is not
//!   reserved any more: the fleet may then admit that much again.
//! - **Store unreachable and lease spent** (or no answer within
//!   [`SYNC_LIMIT`]; the store is then asked again at most once a second
//!   per account): `--lease-outage deny` (the default, billing-safe) denies
//!   the calls (`CALLS_EXHAUSTED`);
//!   `allow` admits them without a lease, retrying the store at most once a
//!   second per account, and the flush books them later (the account may
//!   then exceed its packs, by overage).
//!
//! Only calls are leased: egress of a `deny` account is still checked
//! against this node's counters.

use std::{
    sync::{
        atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering::Relaxed},
        Arc,
    },
    time::Duration,
};

use dashmap::DashMap;

use super::{AccountState, Meter};
use crate::{
    calendar::{Ts, SECOND},
    packs::Item,
    store::{LeaseRequest, Store},
};

/// The smallest lease a node asks for.
pub const MIN_LEASE: u64 = 10;
/// The largest lease a node asks for.
pub const MAX_LEASE: u64 = 100_000;
/// How long a call waits for a lease from the store before it is treated
/// as an outage (`--lease-outage`).
pub const SYNC_LIMIT: Duration = Duration::from_secs(1);

/// What a `deny` account gets while the store is unreachable and its lease
/// is spent.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LeaseOutage {
    /// Its calls are denied: never admitted beyond its packs.
    #[default]
    Deny,
    /// Its calls are admitted: the gateway keeps serving, and the account
    /// may take more than its packs (booked as overage).
    Allow,
}

/// Strict mode's settings; `MeterConfig::strict` is `None` when it is off.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LeaseConfig {
    /// How long a lease lasts without renewal.
    pub ttl: Duration,
    /// The flush interval: leases are sized to cover two.
    pub flush_interval: Duration,
    pub outage: LeaseOutage,
}

/// One account's lease on this node.
#[derive(Default)]
struct Slot {
    /// Calls this node may still admit. Taken from under the account's deny
    /// lock, so a check and its take see the same value.
    left: AtomicU64,
    /// Local clock: the lease is void from then on.
    valid_until: AtomicI64,
    /// Local clock: until then calls pass without a lease (the store was
    /// unreachable and `--lease-outage allow`).
    bypass_until: AtomicI64,
    /// Calls admitted since `since`, for the rate.
    taken: AtomicU64,
    since: AtomicI64,
    /// Calls per second, as last measured.
    rate: AtomicU64,
    /// Local clock: until then the store is not asked again on the
    /// deduction path, since it had less free than a call needed.
    spent_until: AtomicI64,
    /// Whether calls were taken since the last background pass.
    busy: AtomicBool,
    /// One store round trip at a time per account.
    acquiring: tokio::sync::Mutex<()>,
}

/// This node's leases.
pub struct Leases {
    cfg: LeaseConfig,
    node_id: String,
    slots: DashMap<Arc<str>, Arc<Slot>>,
}

fn us(d: Duration) -> Ts {
    Ts::try_from(d.as_micros()).unwrap_or(Ts::MAX)
}

impl Leases {
    pub fn new(cfg: LeaseConfig, node_id: String) -> Leases {
        Leases {
            cfg,
            node_id,
            slots: DashMap::new(),
        }
    }

    fn slot(&self, id: &str) -> Arc<Slot> {
        if let Some(s) = self.slots.get(id) {
            return s.clone();
        }
        self.slots.entry(Arc::from(id)).or_default().clone()
    }

    /// Whether the lease covers `want` more calls at `now`. Under the
    /// account's deny lock.
    fn covers(&self, id: &str, want: u64, now: Ts) -> bool {
        let Some(s) = self.slots.get(id) else {
            return false;
        };
        if now < s.bypass_until.load(Relaxed) {
            return true;
        }
        now < s.valid_until.load(Relaxed) && s.left.load(Relaxed) >= want
    }

    /// Takes `calls` from the lease. Under the account's deny lock, after
    /// [`covers`](Self::covers) said yes.
    fn take(&self, id: &str, calls: u64) {
        if let Some(s) = self.slots.get(id) {
            let _ = s
                .left
                .fetch_update(Relaxed, Relaxed, |l| Some(l.saturating_sub(calls)));
            s.taken.fetch_add(calls, Relaxed);
            s.busy.store(true, Relaxed);
        }
    }

    /// What to ask for: two flush intervals at the recent rate.
    fn size(&self, s: &Slot, now: Ts) -> u64 {
        let since = s.since.load(Relaxed);
        let elapsed = now.saturating_sub(since);
        if since == 0 {
            s.since.store(now, Relaxed);
        } else if elapsed >= us(self.cfg.flush_interval).max(SECOND / 10) {
            let taken = s.taken.swap(0, Relaxed);
            let rate = (u128::from(taken) * SECOND as u128 / elapsed as u128) as u64;
            s.rate.store(rate, Relaxed);
            s.since.store(now, Relaxed);
        }
        let per_interval = (u128::from(s.rate.load(Relaxed)) * self.cfg.flush_interval.as_micros()
            / SECOND as u128) as u64;
        per_interval.saturating_mul(2).clamp(MIN_LEASE, MAX_LEASE)
    }

    /// Makes sure the account's lease covers `calls`, asking the store if it
    /// does not (a round trip only when the lease is spent or void, and at
    /// most once per second while the store has too little). Returns whether
    /// it covers them.
    pub async fn ensure(
        &self,
        meter: &Meter,
        store: &dyn Store,
        acct: &Arc<AccountState>,
        calls: u64,
        clock: &dyn crate::clock::Clock,
    ) -> bool {
        let now = clock.now();
        {
            let _l = acct.deny_lock.lock();
            if self.covers(&acct.id, calls, now) {
                return true;
            }
        }
        let slot = self.slot(&acct.id);
        if now < slot.spent_until.load(Relaxed) {
            return false;
        }
        let _one = slot.acquiring.lock().await;
        let now = clock.now();
        let left = {
            let _l = acct.deny_lock.lock();
            if self.covers(&acct.id, calls, now) {
                return true;
            }
            if now < slot.spent_until.load(Relaxed) {
                return false;
            }
            if now >= slot.valid_until.load(Relaxed) {
                slot.left.store(0, Relaxed);
            }
            slot.left.load(Relaxed)
        };
        let need = calls.saturating_sub(left);
        let want = self.size(&slot, now).saturating_sub(left).max(need);
        self.acquire(meter, store, acct, &slot, need, want, now, Some(SYNC_LIMIT))
            .await;
        let _l = acct.deny_lock.lock();
        self.covers(&acct.id, calls, clock.now())
    }

    #[allow(clippy::too_many_arguments)]
    async fn acquire(
        &self,
        meter: &Meter,
        store: &dyn Store,
        acct: &Arc<AccountState>,
        slot: &Slot,
        need: u64,
        want: u64,
        now: Ts,
        limit: Option<Duration>,
    ) {
        let packs = meter.lease_packs(acct, now);
        let req = LeaseRequest {
            account_id: &acct.id,
            node_id: &self.node_id,
            packs: &packs,
            need,
            want,
            ttl: us(self.cfg.ttl),
        };
        let acquired = match limit {
            Some(limit) => tokio::time::timeout(limit, store.acquire_lease(&req))
                .await
                .unwrap_or_else(|_| {
                    // It may still commit: then the grant stays unused
                    // until the lease expires, never over-admitted.
                    Err(crate::store::StoreError {
                        message: format!("no lease from the store within {limit:?}"),
                        transient: true,
                    })
                }),
            None => store.acquire_lease(&req).await,
        };
        match acquired {
            Ok(grant) => {
                let _l = acct.deny_lock.lock();
                if now >= slot.valid_until.load(Relaxed) {
                    // The store started this lease afresh too.
                    slot.left.store(0, Relaxed);
                }
                slot.left.fetch_add(grant.granted, Relaxed);
                // `now` was read before the request: the store's expiry is
                // later than this one.
                slot.valid_until
                    .store(now.saturating_add(us(self.cfg.ttl)), Relaxed);
                slot.bypass_until.store(0, Relaxed);
                if grant.granted < need {
                    slot.spent_until.store(now.saturating_add(SECOND), Relaxed);
                }
            }
            Err(e) => {
                tracing::warn!(account = %acct.id, error = %e, outage = ?self.cfg.outage,
                    "cannot reach the store for a deny account's lease");
                // Calls do not wait on the store again for a second.
                slot.spent_until.store(now.saturating_add(SECOND), Relaxed);
                if self.cfg.outage == LeaseOutage::Allow {
                    slot.bypass_until.store(now.saturating_add(SECOND), Relaxed);
                }
            }
        }
    }

    /// Every flush interval (at most `ttl / 3`) until `stop`: tops up and extends the leases in use,
    /// returns idle ones.
    pub async fn run(
        self: Arc<Self>,
        meter: Arc<Meter>,
        store: Arc<dyn Store>,
        clock: Arc<dyn crate::clock::Clock>,
        stop: tokio_util::sync::CancellationToken,
    ) {
        // Often enough to top a busy lease up before it is spent (it covers
        // two flush intervals) and to renew it well before it expires.
        let every = (self.cfg.ttl / 3)
            .min(self.cfg.flush_interval)
            .max(Duration::from_millis(50));
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(every) => {}
            }
            let ids: Vec<Arc<str>> = self.slots.iter().map(|e| e.key().clone()).collect();
            for id in ids {
                let Some(slot) = self.slots.get(&id).map(|s| s.clone()) else {
                    continue;
                };
                let _one = slot.acquiring.lock().await;
                let now = clock.now();
                let acct = meter.resident_account(&id);
                if !slot.busy.swap(false, Relaxed) {
                    // Idle for a whole pass: give the rest back.
                    let unused = match &acct {
                        Some(a) => {
                            let _l = a.deny_lock.lock();
                            slot.valid_until.store(0, Relaxed);
                            slot.left.swap(0, Relaxed)
                        }
                        None => slot.left.swap(0, Relaxed),
                    };
                    if let Err(e) = store.release_lease(&id, &self.node_id, unused).await {
                        tracing::warn!(account = %id, error = %e, "returning an idle lease failed; it expires");
                    }
                    self.slots.remove(&id);
                    continue;
                }
                let Some(acct) = acct else { continue };
                let left = slot.left.load(Relaxed);
                let want = self.size(&slot, now).saturating_sub(left);
                self.acquire(&meter, &*store, &acct, &slot, 0, want, now, None)
                    .await;
            }
        }
    }

    /// Returns every lease's unused calls: at shutdown, after the final
    /// flush booked what was admitted.
    pub async fn release_all(&self, store: &dyn Store) {
        for e in self.slots.iter() {
            let unused = e.value().left.swap(0, Relaxed);
            e.value().valid_until.store(0, Relaxed);
            if let Err(err) = store.release_lease(e.key(), &self.node_id, unused).await {
                tracing::warn!(account = %e.key(), error = %err, "returning a lease failed; it expires");
            }
        }
    }
}

impl Meter {
    /// This node's leases, in strict mode.
    pub fn leases(&self) -> Option<&Arc<Leases>> {
        self.leases.get()
    }

    /// Turns strict mode on, with leases held under `node_id`.
    pub fn enable_leases(&self, cfg: LeaseConfig, node_id: String) -> Arc<Leases> {
        self.leases
            .get_or_init(|| Arc::new(Leases::new(cfg, node_id)))
            .clone()
    }

    /// Whether the charge needs a lease: calls of a `deny` account in
    /// strict mode.
    pub fn needs_lease(&self, acct: &AccountState, calls: u64) -> bool {
        calls > 0 && self.leases.get().is_some() && acct.deny_on_exhausted.load(Relaxed)
    }

    /// Strict mode's check in R7, under the deny lock: whether this node's
    /// lease covers `want` calls. Always true outside strict mode.
    pub(super) fn lease_covers(&self, acct: &AccountState, want: u64, now: Ts) -> bool {
        self.leases
            .get()
            .is_none_or(|l| l.covers(&acct.id, want, now))
    }

    /// Strict mode's take, under the deny lock.
    pub(super) fn lease_take(&self, acct: &AccountState, calls: u64) {
        if let Some(l) = self.leases.get() {
            if calls > 0 && acct.deny_on_exhausted.load(Relaxed) {
                l.take(&acct.id, calls);
            }
        }
    }

    /// The account's calls packs valid at `now`: (id, capacity).
    fn lease_packs(&self, acct: &AccountState, now: Ts) -> Vec<(String, u64)> {
        self.ensure_free_month_now(acct, now);
        acct.packs
            .load()
            .iter()
            .filter(|p| p.item() == Item::Calls && p.valid_at(now))
            .map(|p| (p.pack_id().to_string(), p.capacity()))
            .collect()
    }
}
