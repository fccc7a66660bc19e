//! The hot path: per-account atomic counters in a `DashMap`.
//!
//! [`Meter::deduct`] is synchronous. It looks the account's packs up through
//! an `ArcSwap` (no lock), splits the amount across them with
//! compare-and-swap loops (R6), and appends the result to the account's
//! [`Pending`] ledger under a mutex held for a few nanoseconds and never
//! across an `.await`. Time is a parameter, so tests choose the clock.
//!
//! Accounts load lazily: the first request for an account awaits one store
//! read, which concurrent first requests share ([`Meter::account`]). After
//! that the account stays resident until it has been idle past its last
//! flush ([`Meter::evict_idle`]).

use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicBool, AtomicI64, Ordering::Relaxed},
        Arc,
    },
};

use arc_swap::ArcSwap;
use dashmap::DashMap;
use parking_lot::Mutex;
use tokio::sync::OnceCell;

use crate::{
    calendar::{self, hour_start, BillingZone, FreeTierPlan, Ts, HOUR, SECOND},
    ledger::{AccountFlush, AccountRecord, DedupRecord, DeltaRow, Pending, PendingSlot},
    packs::{self, deduction_order, Item, PackCounter, PackSource, PackSpec, Split},
    store::{Store, StoreError, StoredPack},
};

/// What to do with an account seen for the first time (R1).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum UnknownAccounts {
    /// Activate it at the event time of its first deduction.
    #[default]
    Activate,
    /// Refuse its deductions with FAILED_PRECONDITION until an operator creates it.
    Reject,
}

/// The meter's billing settings, all validated.
#[derive(Clone, Debug)]
pub struct MeterConfig {
    pub zone: BillingZone,
    pub plan: FreeTierPlan,
    /// How long after an hour ends it still accepts events (R9).
    pub late_grace: Ts,
    /// How long a request id is remembered (R10); at least `late_grace`.
    pub dedup_window: Ts,
    /// How far ahead of the server clock `at` may be (R9).
    pub max_future_skew: Ts,
    pub unknown_accounts: UnknownAccounts,
    pub max_calls: u64,
    pub max_egress_bytes: u64,
}

impl Default for MeterConfig {
    fn default() -> Self {
        MeterConfig {
            zone: BillingZone::default(),
            plan: FreeTierPlan::default(),
            late_grace: HOUR,
            dedup_window: HOUR,
            max_future_skew: 300 * SECOND,
            unknown_accounts: UnknownAccounts::Activate,
            max_calls: 1_000_000_000,
            max_egress_bytes: 1 << 40,
        }
    }
}

/// Longest account id accepted, in bytes.
pub const MAX_ACCOUNT_ID_BYTES: usize = 128;
/// Longest request id accepted, in bytes.
pub const MAX_REQUEST_ID_BYTES: usize = 256;

/// Why the meter refused a request. A denial is not an error: it is a
/// [`Decision`].
#[derive(Debug, thiserror::Error)]
pub enum MeterError {
    #[error("account_id {0}")]
    InvalidAccountId(&'static str),
    #[error("request_id {0}")]
    InvalidRequestId(&'static str),
    #[error("{field} = {value} is over the per-deduction maximum of {max}")]
    AmountTooLarge {
        field: &'static str,
        value: u64,
        max: u64,
    },
    #[error("at is {ahead_ms} ms ahead of the server clock; at most {max_ms} ms is allowed")]
    TooFarInFuture { ahead_ms: i64, max_ms: i64 },
    #[error(
        "at falls in the hour starting {hour}, which closed at {closed_at} \
         (late grace {grace_s} s); its usage is settled"
    )]
    HourClosed {
        hour: String,
        closed_at: String,
        grace_s: i64,
    },
    #[error(
        "account `{0}` is unknown and unknown_accounts = reject; create it with Admin.PutAccount"
    )]
    UnknownAccount(String),
    #[error("account `{0}` is unknown")]
    NotFound(String),
    #[error("{0}")]
    InvalidPack(String),
    #[error("pack `{0}` already exists with different terms")]
    PackConflict(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Checks an account id: 1–128 bytes, no control characters.
pub fn validate_account_id(id: &str) -> Result<(), MeterError> {
    if id.is_empty() {
        return Err(MeterError::InvalidAccountId("is empty"));
    }
    if id.len() > MAX_ACCOUNT_ID_BYTES {
        return Err(MeterError::InvalidAccountId("is longer than 128 bytes"));
    }
    if id.chars().any(char::is_control) {
        return Err(MeterError::InvalidAccountId("contains a control character"));
    }
    Ok(())
}

fn validate_request_id(id: &str) -> Result<(), MeterError> {
    if id.len() > MAX_REQUEST_ID_BYTES {
        return Err(MeterError::InvalidRequestId("is longer than 256 bytes"));
    }
    if id.chars().any(char::is_control) {
        return Err(MeterError::InvalidRequestId("contains a control character"));
    }
    Ok(())
}

/// One deduction as the domain sees it.
#[derive(Clone, Copy, Debug, Default)]
pub struct Deduction<'a> {
    pub calls: u64,
    pub egress_bytes: u64,
    /// Event time; the server clock when `None`.
    pub at: Option<Ts>,
    /// Idempotency key; empty for none.
    pub request_id: &'a str,
}

impl Deduction<'_> {
    fn is_check(&self) -> bool {
        self.calls == 0 && self.egress_bytes == 0
    }
}

/// Why a deduction was denied (R7).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DenyReason {
    Suspended,
    CallsExhausted,
}

impl DenyReason {
    pub fn as_str(self) -> &'static str {
        match self {
            DenyReason::Suspended => "account is suspended",
            DenyReason::CallsExhausted => "no pack covers the calls and on_exhausted = deny",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    Allow,
    Deny(DenyReason),
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ItemOutcome {
    pub covered: u64,
    pub overage: u64,
    /// What the account's packs still hold for the item at `at`.
    pub remaining: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeductOutcome {
    pub decision: Decision,
    pub calls: ItemOutcome,
    pub egress_bytes: ItemOutcome,
    pub duplicate: bool,
}

/// A pack as listed to users (R11).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PackView {
    pub account_id: String,
    pub spec: PackSpec,
    pub used: u64,
}

// === impl AccountState ===

const NOT_ACTIVATED: Ts = Ts::MIN;

/// A remembered request id. `result` is `None` while its deduction is in
/// flight, so a concurrent duplicate cannot deduct twice.
#[derive(Debug)]
struct DedupEntry {
    expires_at: Ts,
    result: Option<[u64; 4]>,
}

#[derive(Debug, Default)]
struct DedupTable {
    entries: HashMap<Box<str>, DedupEntry>,
    next_prune: Ts,
}

/// One resident account.
#[derive(Debug)]
pub struct AccountState {
    id: Arc<str>,
    /// Activation instant, or `NOT_ACTIVATED`. Set once by a compare-and-swap
    /// at the first deduction (R1), or by an operator.
    activated_at: AtomicI64,
    suspended: AtomicBool,
    deny_on_exhausted: AtomicBool,
    /// Packs that can still take deductions, in R6 order. Replaced whole
    /// (copy-on-write) when a month's free-tier pack appears or a pack is
    /// granted; the counters inside are shared between versions.
    packs: ArcSwap<Vec<Arc<PackCounter>>>,
    /// Unflushed usage. A short, synchronous critical section.
    pending: Mutex<PendingSlot>,
    /// Request ids seen (R10). Boxed and created on the first request id:
    /// most accounts never send one, and an empty table would still cost
    /// 56 bytes in every resident account.
    dedup: Mutex<Option<Box<DedupTable>>>,
    /// Server time of the last request, for idle eviction.
    last_touch: AtomicI64,
}

impl AccountState {
    fn new(id: Arc<str>, record: Option<&AccountRecord>, now: Ts) -> AccountState {
        AccountState {
            id,
            activated_at: AtomicI64::new(
                record.and_then(|r| r.activated_at).unwrap_or(NOT_ACTIVATED),
            ),
            suspended: AtomicBool::new(record.is_some_and(|r| r.suspended)),
            deny_on_exhausted: AtomicBool::new(record.is_some_and(|r| r.deny_on_exhausted)),
            packs: ArcSwap::from_pointee(Vec::new()),
            pending: Mutex::new(PendingSlot::default()),
            dedup: Mutex::new(None),
            last_touch: AtomicI64::new(now),
        }
    }

    pub fn id(&self) -> &Arc<str> {
        &self.id
    }

    pub fn activated_at(&self) -> Option<Ts> {
        Some(self.activated_at.load(Relaxed)).filter(|a| *a != NOT_ACTIVATED)
    }

    pub fn record(&self) -> AccountRecord {
        AccountRecord {
            account_id: self.id.to_string(),
            activated_at: self.activated_at(),
            suspended: self.suspended.load(Relaxed),
            deny_on_exhausted: self.deny_on_exhausted.load(Relaxed),
        }
    }

    /// The resident packs, in R6 order.
    pub fn packs(&self) -> arc_swap::Guard<Arc<Vec<Arc<PackCounter>>>> {
        self.packs.load()
    }

    /// Adds packs (by id, keeping existing counters), drops those that can
    /// no longer take deductions, and keeps R6 order.
    fn merge_packs(&self, add: impl Fn() -> Vec<Arc<PackCounter>>, keep_after: Ts) {
        self.packs.rcu(|cur| {
            let mut next: Vec<Arc<PackCounter>> = cur
                .iter()
                .filter(|p| p.spec.valid_until > keep_after)
                .cloned()
                .collect();
            for p in add() {
                if !next.iter().any(|q| q.spec.pack_id == p.spec.pack_id) {
                    next.push(p);
                }
            }
            next.sort_by(|a, b| deduction_order(&a.spec, &b.spec));
            // Replaced rarely, read on every deduction: no spare capacity.
            next.shrink_to_fit();
            next
        });
    }

    fn free_pack_present(&self, valid_from: Ts) -> bool {
        self.packs
            .load()
            .iter()
            .any(|p| p.spec.source == PackSource::FreeTier && p.spec.valid_from == valid_from)
    }

    /// Takes this account's unflushed changes for a flush.
    pub fn take_pending(&self) -> Pending {
        self.pending.lock().take()
    }

    /// Gives a failed flush's changes back. The account stays marked queued:
    /// the flusher puts it back in the queue.
    pub fn restore_pending(&self, failed: Pending) {
        self.pending.lock().merge(failed);
    }

    /// After a successful flush: clears the queued mark, or, if changes
    /// arrived meanwhile, returns true so the flusher queues it again. (The
    /// mark stays set during a flush, so those changes did not queue it.)
    pub fn finish_flush(&self) -> bool {
        let mut slot = self.pending.lock();
        if slot.is_empty() {
            slot.shrink();
            slot.queued = false;
            false
        } else {
            true
        }
    }

    /// Earliest hour and wall-clock age of unflushed changes.
    pub fn pending_summary(&self) -> (Option<Ts>, Option<Ts>) {
        let slot = self.pending.lock();
        slot.get()
            .map_or((None, None), |p| (p.oldest_hour(), p.since))
    }
}

/// Turns an account's taken changes into the rows a store writes.
pub fn to_flush(account: &AccountState, pending: &Pending) -> AccountFlush {
    AccountFlush {
        account_id: account.id.clone(),
        account: pending.account_dirty.then(|| account.record()),
        deltas: pending
            .deltas
            .iter()
            .map(|d| DeltaRow {
                hour: d.hour,
                item: d.item,
                pack: d.pack.as_ref().map(|p| p.spec.clone()),
                amount: d.amount,
            })
            .collect(),
        dedup: pending.dedup.clone(),
    }
}

// === impl Meter ===

/// A first load in progress; `None` once done means the store does not know the account.
type LoadCell = OnceCell<Option<Arc<AccountState>>>;

/// All resident accounts, and how to load the others.
pub struct Meter {
    cfg: MeterConfig,
    store: Arc<dyn Store>,
    accounts: DashMap<Arc<str>, Arc<AccountState>>,
    /// First loads in progress, shared by concurrent first requests. The
    /// cell holds `None` when the store does not know the account.
    loading: DashMap<Arc<str>, Arc<LoadCell>>,
    /// Accounts with unflushed changes, in the order they became dirty.
    dirty: Mutex<Vec<Arc<AccountState>>>,
    /// Wakes the flusher early once `flush_threshold` accounts are dirty.
    flush_wanted: tokio::sync::Notify,
    flush_threshold: usize,
    /// Interned free-tier pack ids (two per calendar month ever seen).
    /// Locked only when a month's packs are built, never per deduction.
    free_pack_ids: Mutex<std::collections::HashSet<Arc<str>>>,
}

impl Meter {
    pub fn new(cfg: MeterConfig, store: Arc<dyn Store>) -> Meter {
        Meter {
            cfg,
            store,
            accounts: DashMap::new(),
            loading: DashMap::new(),
            dirty: Mutex::new(Vec::new()),
            flush_wanted: tokio::sync::Notify::new(),
            flush_threshold: 50_000,
            free_pack_ids: Mutex::new(std::collections::HashSet::new()),
        }
    }

    /// Resolves when enough accounts are dirty that the flusher should not
    /// wait for its interval.
    pub async fn flush_wanted(&self) {
        self.flush_wanted.notified().await
    }

    pub fn config(&self) -> &MeterConfig {
        &self.cfg
    }

    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// Number of resident accounts.
    pub fn resident(&self) -> usize {
        self.accounts.len()
    }

    /// Number of accounts waiting for a flush.
    pub fn dirty_len(&self) -> usize {
        self.dirty.lock().len()
    }

    /// Takes the queue of dirty accounts for a flush.
    pub fn take_dirty(&self) -> Vec<Arc<AccountState>> {
        std::mem::take(&mut *self.dirty.lock())
    }

    /// Queues accounts again (after a failed flush, or changes that arrived
    /// during one).
    pub fn requeue(&self, accounts: impl IntoIterator<Item = Arc<AccountState>>) {
        self.dirty.lock().extend(accounts);
    }

    /// Puts accounts whose flush failed back at the head of the queue: their
    /// changes are older than anything queued since, and the head is what
    /// [`oldest_dirty_since`](Self::oldest_dirty_since) reads.
    pub fn requeue_front(&self, accounts: Vec<Arc<AccountState>>) {
        let mut dirty = self.dirty.lock();
        let newer = std::mem::replace(&mut *dirty, accounts);
        dirty.extend(newer);
    }

    /// Wall-clock time of the oldest change waiting in the queue. The queue
    /// is in the order accounts became dirty, so this reads only its head:
    /// cheap enough for every metrics scrape, however many accounts wait.
    pub fn oldest_dirty_since(&self) -> Option<Ts> {
        let head = self.dirty.lock().first().cloned();
        head.and_then(|a| a.pending_summary().1)
    }

    /// The earliest hour with unflushed usage, across all accounts. Visits
    /// every dirty account: for settled exports, not for metrics.
    pub fn oldest_pending_hour(&self) -> Option<Ts> {
        let dirty = self.dirty.lock().clone();
        dirty.iter().filter_map(|a| a.pending_summary().0).min()
    }

    /// Validates a deduction against the configured limits and R9, and
    /// returns its event time. Changes nothing.
    pub fn validate(&self, account_id: &str, d: &Deduction<'_>, now: Ts) -> Result<Ts, MeterError> {
        validate_account_id(account_id)?;
        validate_request_id(d.request_id)?;
        if d.calls > self.cfg.max_calls {
            return Err(MeterError::AmountTooLarge {
                field: "calls",
                value: d.calls,
                max: self.cfg.max_calls,
            });
        }
        if d.egress_bytes > self.cfg.max_egress_bytes {
            return Err(MeterError::AmountTooLarge {
                field: "egress_bytes",
                value: d.egress_bytes,
                max: self.cfg.max_egress_bytes,
            });
        }
        let at = d.at.unwrap_or(now);
        if at.saturating_sub(now) > self.cfg.max_future_skew {
            return Err(MeterError::TooFarInFuture {
                ahead_ms: at.saturating_sub(now) / 1000,
                max_ms: self.cfg.max_future_skew / 1000,
            });
        }
        let closes = hour_start(at)
            .saturating_add(HOUR)
            .saturating_add(self.cfg.late_grace);
        if closes <= now {
            return Err(MeterError::HourClosed {
                hour: calendar::to_datetime(hour_start(at)).to_rfc3339(),
                closed_at: calendar::to_datetime(closes).to_rfc3339(),
                grace_s: self.cfg.late_grace / SECOND,
            });
        }
        Ok(at)
    }

    /// Packs that end before this can take no more deductions: every hour
    /// they cover has closed.
    fn keep_after(&self, now: Ts) -> Ts {
        now.saturating_sub(self.cfg.late_grace).saturating_sub(HOUR)
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
        if let Some(a) = self.accounts.get(id) {
            a.last_touch.store(now, Relaxed);
            return Ok(Some(a.clone()));
        }
        let key: Arc<str> = id.into();
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
            None => Ok(Some(
                self.accounts
                    .entry(key.clone())
                    .or_insert_with(|| Arc::new(AccountState::new(key, None, now)))
                    .clone(),
            )),
        }
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

    /// The account an operator addresses: loaded, or created whatever
    /// `unknown_accounts` says (operators create accounts in reject mode).
    pub async fn account_for_admin(
        &self,
        id: &str,
        now: Ts,
    ) -> Result<Arc<AccountState>, MeterError> {
        validate_account_id(id)?;
        if let Some(a) = self.account(id, false, now).await? {
            return Ok(a);
        }
        let key: Arc<str> = id.into();
        Ok(self
            .accounts
            .entry(key.clone())
            .or_insert_with(|| Arc::new(AccountState::new(key, None, now)))
            .clone())
    }

    /// The resident account, or `NotFound`.
    pub async fn known_account(&self, id: &str, now: Ts) -> Result<Arc<AccountState>, MeterError> {
        validate_account_id(id)?;
        self.account(id, false, now)
            .await?
            .ok_or_else(|| MeterError::NotFound(id.to_string()))
    }

    async fn load(&self, id: Arc<str>, now: Ts) -> Result<Option<Arc<AccountState>>, MeterError> {
        // Another load may have finished between our map miss and now.
        if let Some(a) = self.accounts.get(&id) {
            return Ok(Some(a.clone()));
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
                counters.push(Arc::new(PackCounter::new(spec.clone(), *u)));
            }
        }
        if let Some(a) = state.activated_at() {
            // Free-tier months that can still take deductions, with what the
            // store already recorded for them.
            for m in calendar::free_months(a, &self.cfg.plan, &self.cfg.zone) {
                if m.valid_until <= keep_after
                    || m.valid_from > now.saturating_add(self.cfg.max_future_skew)
                {
                    continue;
                }
                for spec in self.free_specs(&m) {
                    let u = used.get(&*spec.pack_id).copied().unwrap_or(0);
                    counters.push(Arc::new(PackCounter::new(spec, u)));
                }
            }
        }
        state.merge_packs(|| counters.clone(), keep_after);
        {
            let mut dedup = state.dedup.lock();
            for r in loaded.dedup {
                let dedup = dedup.get_or_insert_with(Box::default);
                let result = [
                    r.calls_covered,
                    r.calls_overage,
                    r.egress_covered,
                    r.egress_overage,
                ];
                dedup.entries.insert(
                    r.request_id,
                    DedupEntry {
                        expires_at: r.expires_at,
                        result: Some(result),
                    },
                );
            }
        }
        let state = Arc::new(state);
        Ok(Some(self.accounts.entry(id).or_insert(state).clone()))
    }

    fn free_specs(&self, m: &calendar::FreeMonth) -> [PackSpec; 2] {
        [
            PackSpec::free_tier(m, Item::Calls, self.cfg.plan.calls),
            PackSpec::free_tier(m, Item::EgressBytes, self.cfg.plan.egress_bytes),
        ]
        .map(|mut spec| {
            spec.pack_id = self.shared_pack_id(&spec.pack_id);
            spec
        })
    }

    /// One shared copy of a free-tier pack id. The id names only the month
    /// and the item, so every account active in a month would otherwise
    /// hold its own two copies (96 bytes with the allocator's overhead).
    fn shared_pack_id(&self, id: &Arc<str>) -> Arc<str> {
        let mut ids = self.free_pack_ids.lock();
        if let Some(shared) = ids.get(id) {
            return shared.clone();
        }
        ids.insert(id.clone());
        id.clone()
    }

    /// Makes sure the free-tier packs of the month holding `at` are resident.
    fn ensure_free_month(&self, acct: &AccountState, at: Ts, now: Ts) {
        let Some(a) = acct.activated_at() else { return };
        // Fast path, and the common case: a resident free-tier pack is valid
        // at `at`. Free-tier months do not overlap, so it belongs to the
        // month `free_month_at` would compute, and that month's packs are
        // resident. This skips the calendar arithmetic (about 160 ns).
        if acct
            .packs
            .load()
            .iter()
            .any(|p| p.spec.source == PackSource::FreeTier && p.spec.valid_at(at))
        {
            return;
        }
        let Some(m) = calendar::free_month_at(a, at, &self.cfg.plan, &self.cfg.zone) else {
            return;
        };
        if acct.free_pack_present(m.valid_from) {
            return;
        }
        // A month that appears while the account is resident has recorded
        // nothing yet (its earlier usage would have loaded it), so it starts at 0.
        let specs = self.free_specs(&m);
        acct.merge_packs(
            || {
                specs
                    .iter()
                    .map(|s| Arc::new(PackCounter::new(s.clone(), 0)))
                    .collect()
            },
            self.keep_after(now),
        );
    }

    // --- the hot path ---

    /// Deducts `d` from the account's packs at its event time (R6, R7, R10).
    /// `d` must have passed [`validate`](Self::validate); `now` is the
    /// server clock. Synchronous: no I/O, no await.
    pub fn deduct(&self, acct: &Arc<AccountState>, d: &Deduction<'_>, now: Ts) -> DeductOutcome {
        let at = d.at.unwrap_or(now);
        if d.is_check() {
            return self.check(acct, at, now);
        }
        if !d.request_id.is_empty() {
            if let Some(dup) = self.claim_request_id(acct, d.request_id, at, now) {
                return dup;
            }
        }
        // Load first: after the first deduction the CAS would always fail,
        // and a failed CAS still takes the cache line exclusively.
        if acct.activated_at.load(Relaxed) == NOT_ACTIVATED
            && acct
                .activated_at
                .compare_exchange(NOT_ACTIVATED, at, Relaxed, Relaxed)
                .is_ok()
        {
            let mut slot = acct.pending.lock();
            let p = slot.changes();
            p.account_dirty = true;
            p.since.get_or_insert(now);
        }
        self.ensure_free_month(acct, at, now);

        let packs = acct.packs.load();
        let denied = |reason| {
            if !d.request_id.is_empty() {
                if let Some(table) = acct.dedup.lock().as_mut() {
                    table.entries.remove(d.request_id);
                }
            }
            self.outcome(&packs, at, Decision::Deny(reason), None, None)
        };
        if d.calls > 0 && acct.suspended.load(Relaxed) {
            return denied(DenyReason::Suspended);
        }
        let calls = Split::deduct(&packs, Item::Calls, at, d.calls);
        if calls.overage > 0 && acct.deny_on_exhausted.load(Relaxed) {
            // Give back what was taken: a denial changes nothing. A
            // concurrent deduction may briefly have seen less capacity.
            calls.undo();
            return denied(DenyReason::CallsExhausted);
        }
        let egress = Split::deduct(&packs, Item::EgressBytes, at, d.egress_bytes);

        let hour = hour_start(at);
        let result = [calls.covered, calls.overage, egress.covered, egress.overage];
        let queue = {
            let mut slot = acct.pending.lock();
            let p = slot.changes();
            for (item, split) in [(Item::Calls, &calls), (Item::EgressBytes, &egress)] {
                for (pack, amount) in &split.takes {
                    p.add(hour, item, Some(pack), *amount, now);
                }
                p.add(hour, item, None, split.overage, now);
            }
            if !d.request_id.is_empty() {
                p.dedup.push(DedupRecord {
                    request_id: d.request_id.into(),
                    expires_at: now.saturating_add(self.cfg.dedup_window),
                    calls_covered: result[0],
                    calls_overage: result[1],
                    egress_covered: result[2],
                    egress_overage: result[3],
                });
            }
            !std::mem::replace(&mut slot.queued, true)
        };
        if queue {
            let mut dirty = self.dirty.lock();
            dirty.push(acct.clone());
            if dirty.len() == self.flush_threshold {
                self.flush_wanted.notify_one();
            }
        }
        if !d.request_id.is_empty() {
            let mut dedup = acct.dedup.lock();
            if let Some(e) = dedup.as_mut().and_then(|t| t.entries.get_mut(d.request_id)) {
                e.result = Some(result);
            }
        }
        self.outcome(&packs, at, Decision::Allow, Some(&calls), Some(&egress))
    }

    /// Returns the duplicate's outcome if `request_id` was seen within the
    /// window; otherwise claims it for this deduction.
    fn claim_request_id(
        &self,
        acct: &AccountState,
        request_id: &str,
        at: Ts,
        now: Ts,
    ) -> Option<DeductOutcome> {
        let mut guard = acct.dedup.lock();
        let table = guard.get_or_insert_with(Box::default);
        if now >= table.next_prune {
            table.entries.retain(|_, e| e.expires_at > now);
            table.next_prune = now.saturating_add((self.cfg.dedup_window / 8).max(SECOND));
        }
        match table.entries.get(request_id) {
            Some(e) if e.expires_at > now => {
                let r = e.result.unwrap_or_default();
                drop(guard);
                let packs = acct.packs.load();
                let mut o = self.outcome(&packs, at, Decision::Allow, None, None);
                o.duplicate = true;
                (o.calls.covered, o.calls.overage) = (r[0], r[1]);
                (o.egress_bytes.covered, o.egress_bytes.overage) = (r[2], r[3]);
                Some(o)
            }
            _ => {
                table.entries.insert(
                    request_id.into(),
                    DedupEntry {
                        expires_at: now.saturating_add(self.cfg.dedup_window),
                        result: None,
                    },
                );
                None
            }
        }
    }

    /// `calls = 0, egress_bytes = 0`: the decision the next call would get,
    /// and the balances. Deducts, activates and records nothing.
    fn check(&self, acct: &AccountState, at: Ts, now: Ts) -> DeductOutcome {
        self.ensure_free_month(acct, at, now);
        let packs = acct.packs.load();
        let mut o = self.outcome(&packs, at, Decision::Allow, None, None);
        if acct.activated_at().is_none() && self.cfg.unknown_accounts == UnknownAccounts::Activate {
            // The first deduction would activate the account at `at`.
            o.calls.remaining = o.calls.remaining.saturating_add(self.cfg.plan.calls);
            o.egress_bytes.remaining = o
                .egress_bytes
                .remaining
                .saturating_add(self.cfg.plan.egress_bytes);
        }
        if acct.suspended.load(Relaxed) {
            o.decision = Decision::Deny(DenyReason::Suspended);
        } else if acct.deny_on_exhausted.load(Relaxed) && o.calls.remaining == 0 {
            o.decision = Decision::Deny(DenyReason::CallsExhausted);
        }
        o
    }

    fn outcome(
        &self,
        packs: &[Arc<PackCounter>],
        at: Ts,
        decision: Decision,
        calls: Option<&Split>,
        egress: Option<&Split>,
    ) -> DeductOutcome {
        let item = |item, split: Option<&Split>| ItemOutcome {
            covered: split.map_or(0, |s| s.covered),
            overage: split.map_or(0, |s| s.overage),
            remaining: packs::remaining(packs, item, at),
        };
        DeductOutcome {
            decision,
            calls: item(Item::Calls, calls),
            egress_bytes: item(Item::EgressBytes, egress),
            duplicate: false,
        }
    }

    // --- admin ---

    /// Applies an operator's account settings to a resident account. The
    /// caller has written them to the store first.
    pub fn apply_account(&self, acct: &AccountState, record: &AccountRecord, now: Ts) {
        acct.suspended.store(record.suspended, Relaxed);
        acct.deny_on_exhausted
            .store(record.deny_on_exhausted, Relaxed);
        let new = record.activated_at.unwrap_or(NOT_ACTIVATED);
        if acct.activated_at.swap(new, Relaxed) == new {
            return;
        }
        // The free months moved: rebuild them, carrying usage by pack id.
        let keep_after = self.keep_after(now);
        let months = record
            .activated_at
            .map(|a| calendar::free_months(a, &self.cfg.plan, &self.cfg.zone))
            .unwrap_or_default();
        acct.packs.rcu(|cur| {
            let old_used: HashMap<&str, u64> = cur
                .iter()
                .filter(|p| p.spec.source == PackSource::FreeTier)
                .map(|p| (&*p.spec.pack_id, p.used()))
                .collect();
            let mut next: Vec<_> = cur
                .iter()
                .filter(|p| p.spec.source != PackSource::FreeTier)
                .cloned()
                .collect();
            for m in months
                .iter()
                .filter(|m| m.valid_until > keep_after && m.valid_from <= now)
            {
                for spec in self.free_specs(m) {
                    let u = old_used.get(&*spec.pack_id).copied().unwrap_or(0);
                    next.push(Arc::new(PackCounter::new(spec, u)));
                }
            }
            next.sort_by(|a, b| deduction_order(&a.spec, &b.spec));
            next
        });
    }

    /// Makes a granted pack resident so deductions use it at once.
    pub fn add_pack(&self, acct: &AccountState, pack: &StoredPack, now: Ts) {
        let counter = Arc::new(PackCounter::new(pack.spec.clone(), pack.used));
        acct.merge_packs(|| vec![counter.clone()], self.keep_after(now));
    }

    /// Every pack of the account, free tier and purchased, past, present and
    /// future, with live usage (R11). `stored` is what the store holds.
    pub fn pack_views(&self, acct: &AccountState, stored: Vec<StoredPack>) -> Vec<PackView> {
        let resident = acct.packs.load();
        // A stored total can exceed a capacity a newer plan shrank; show
        // it clamped, as the counters hold it.
        let live = |spec: &PackSpec, stored_used: u64| {
            resident
                .iter()
                .find(|p| p.spec.pack_id == spec.pack_id)
                .map_or(stored_used.min(spec.capacity), |p| p.used())
        };
        let mut views: Vec<PackView> = Vec::new();
        if let Some(a) = acct.activated_at() {
            for m in calendar::free_months(a, &self.cfg.plan, &self.cfg.zone) {
                for spec in self.free_specs(&m) {
                    let stored_used = stored
                        .iter()
                        .find(|s| s.spec.pack_id == spec.pack_id)
                        .map_or(0, |s| s.used);
                    let used = live(&spec, stored_used);
                    views.push(PackView {
                        account_id: acct.id.to_string(),
                        spec,
                        used,
                    });
                }
            }
        }
        for s in stored
            .into_iter()
            .filter(|s| s.spec.source == PackSource::Purchased)
        {
            let used = live(&s.spec, s.used);
            views.push(PackView {
                account_id: acct.id.to_string(),
                spec: s.spec,
                used,
            });
        }
        views.sort_by(|a, b| {
            a.spec
                .valid_from
                .cmp(&b.spec.valid_from)
                .then_with(|| deduction_order(&a.spec, &b.spec))
                .then(a.spec.item.cmp(&b.spec.item))
        });
        views
    }

    /// Drops accounts idle since `idle_before` that have nothing unflushed
    /// and that no request holds; returns how many went.
    pub fn evict_idle(&self, idle_before: Ts) -> usize {
        let before = self.accounts.len();
        // `retain` holds each shard's write lock, so no request can clone an
        // account while we look at its reference count.
        self.accounts.retain(|_, a| {
            a.last_touch.load(Relaxed) >= idle_before
                || Arc::strong_count(a) > 1
                || a.pending
                    .try_lock()
                    .is_none_or(|slot| !slot.is_empty() || slot.queued)
        });
        before - self.accounts.len()
    }
}

#[cfg(test)]
mod tests;
