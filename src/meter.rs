//! The hot path: per-account atomic counters in a `DashMap`.
//!
//! A deduction is synchronous. It looks the account's packs up through an
//! `ArcSwap` (no lock), splits the amount across them with compare-and-swap
//! loops (R6), and appends the result to the account's
//! [`Pending`](crate::ledger::Pending) ledger under a mutex held for a few
//! nanoseconds and never across an `.await`. Time is a parameter, so tests
//! choose the clock. The rules named here (R1–R12) are in
//! `docs/billing-rules.md`.
//!
//! The module is split by responsibility:
//! - [`account`]: one resident account's state (packs, flags, unflushed changes);
//! - [`dedup`]: remembered request ids (R10);
//! - [`residency`]: loading accounts, the dirty queue, eviction;
//! - [`validate`]: checks that change nothing;
//! - [`deduct`]: the deduction itself (R1, R6, R7);
//! - [`free_tier`]: the free-tier packs a resident account holds (R2–R4);
//! - [`gate`]: the barrier that shutdown and settlement use to know that no
//!   deduction is between its checks and its ledger entry.
//!
//! Transports do not call the meter directly: they go through
//! [`crate::app::App`], which validates, loads, reads a fresh clock and
//! then calls [`Meter::deduct_all`].

pub mod account;
mod deduct;
pub mod dedup;
mod free_tier;
pub mod gate;
pub mod lease;
mod residency;
mod validate;

use std::sync::Arc;

use dashmap::DashMap;
use parking_lot::Mutex;

pub use account::{to_flush, AccountState, PackList, SharedPackList};
pub use deduct::{Atomicity, Charge};
pub use validate::{validate_account_id, MAX_ACCOUNT_ID_BYTES, MAX_REQUEST_ID_BYTES};

use crate::{
    calendar::{self, BillingZone, FreeMonth, FreeTierPlan, Ts, HOUR, SECOND},
    packs::PackSpec,
    plans::LivePlans,
    store::StoreError,
};

/// What to do with an account seen for the first time (R1).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, serde::Deserialize)]
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
    /// The free tier without a plans file: one plan from the beginning of
    /// time, in `zone`.
    pub plan: FreeTierPlan,
    /// The plans file's plans (R8); `None` without one, when `plan` and
    /// `zone` apply (see [`MeterConfig::free_months`]).
    pub plans: Option<Arc<LivePlans>>,
    /// How long after an hour ends it still accepts events (R9).
    pub late_grace: Ts,
    /// How long a request id is remembered after it was processed (R10); at
    /// least `late_grace`. An id is also kept until its event's hour closes.
    pub dedup_window: Ts,
    /// How far ahead of the server clock `at` may be (R9).
    pub max_future_skew: Ts,
    pub unknown_accounts: UnknownAccounts,
    pub max_calls: u64,
    pub max_egress_bytes: u64,
    /// Strict mode for `deny` accounts ([`lease`]); `None` when off.
    pub strict: Option<lease::LeaseConfig>,
}

impl Default for MeterConfig {
    fn default() -> Self {
        MeterConfig {
            zone: BillingZone::default(),
            plan: FreeTierPlan::default(),
            plans: None,
            late_grace: HOUR,
            dedup_window: HOUR,
            max_future_skew: 300 * SECOND,
            unknown_accounts: UnknownAccounts::Activate,
            max_calls: 1_000_000_000,
            max_egress_bytes: 1 << 40,
            strict: None,
        }
    }
}

impl MeterConfig {
    /// Every free-tier month of an account activated at `a` (R3, R8), each
    /// naming its plan. Without a plans file, exactly
    /// [`calendar::free_months`] under `plan` and `zone`.
    pub fn free_months(&self, a: Ts) -> Vec<FreeMonth> {
        match &self.plans {
            None => calendar::free_months(a, &self.plan, &self.zone),
            Some(p) => p.load().free_months(a),
        }
    }

    /// The free-tier month valid at `ts`, if any.
    pub fn free_month_at(&self, a: Ts, ts: Ts) -> Option<FreeMonth> {
        match &self.plans {
            None => calendar::free_month_at(a, ts, &self.plan, &self.zone),
            Some(p) => p.load().free_month_at(a, ts),
        }
    }

    /// The end of the free window of an account activated at `a` (R2).
    pub fn free_window_end(&self, a: Ts) -> Ts {
        match &self.plans {
            None => calendar::free_window(a, &self.plan, &self.zone).1,
            Some(p) => p.load().window_end(a),
        }
    }

    /// The capacities of the plan in effect at `ts` (for an account that
    /// would be activated then).
    pub fn tier_at(&self, ts: Ts) -> FreeTierPlan {
        match &self.plans {
            None => self.plan,
            Some(p) => {
                let p = p.load();
                p.plans()[p.in_effect_at(ts)].tier
            }
        }
    }

    /// The capacities and name of the plan that issued month `m`, and the
    /// suffix its pack ids carry (empty for the first plan).
    pub fn month_plan(&self, m: &FreeMonth) -> (FreeTierPlan, Arc<str>, bool) {
        match &self.plans {
            None => (self.plan, crate::plans::DEFAULT_PLAN_NAME.into(), false),
            Some(p) => {
                let plan = p.load().plan(m.plan).clone();
                (plan.tier, plan.name, m.plan > 0)
            }
        }
    }
}

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
    #[error(
        "account `{account}`'s activated_at can no longer change: its usage since its first \
         usage (hour starting {first_usage}) was split against the free-tier packs that \
         activation defines (an earlier event moves it back by itself, R1)"
    )]
    ActivationLocked {
        account: String,
        first_usage: String,
    },
    #[error("{0}")]
    InvalidPack(String),
    #[error("pack `{0}` already exists with different terms")]
    PackConflict(String),
    #[error(
        "request_id `{0}` is being deducted by a concurrent request; retry to get its outcome"
    )]
    DuplicateInFlight(String),
    #[error(
        "account `{account}`: hour {hour} already holds {recorded} {item}; {amount} more would \
         take it past {cap}, the most one account, hour and item can hold (the store keeps \
         signed 64-bit amounts); nothing was deducted"
    )]
    LedgerFull {
        account: String,
        hour: String,
        item: crate::packs::Item,
        recorded: u64,
        amount: u64,
        cap: u64,
    },
    #[error("packmeter is shutting down and takes no more deductions; send them to another node")]
    ShuttingDown,
    /// Start-up is not done: the journal and the spill file are being
    /// replayed into the store, and nothing is served from the state
    /// before them.
    #[error(
        "packmeter is starting: replaying the journal and the spill file into the store; retry \
         shortly or send the call to another node"
    )]
    Starting,
    /// `--durability journal`: the journal cannot be written, so nothing
    /// can be acknowledged durably.
    #[error("{0}; send the deduction to another node")]
    JournalUnavailable(String),
    #[error(
        "{count} account(s) set aside because the store refuses their usage (first: `{first}`); \
         their usage is kept in memory and written to the spill file at shutdown; see the log \
         and packmeter_flush_set_aside_accounts"
    )]
    SetAside { count: usize, first: String },
    #[error(transparent)]
    Store(#[from] StoreError),
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
    /// `calls = 0, egress_bytes = 0`: asks for the decision and balances
    /// and deducts nothing.
    pub fn is_check(&self) -> bool {
        self.calls == 0 && self.egress_bytes == 0
    }
}

/// Why a deduction was denied (R7).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DenyReason {
    Suspended,
    CallsExhausted,
    EgressExhausted,
}

impl DenyReason {
    pub fn as_str(self) -> &'static str {
        match self {
            DenyReason::Suspended => "account is suspended",
            DenyReason::CallsExhausted => "no pack covers the calls and on_exhausted = deny",
            DenyReason::EgressExhausted => "the egress packs are exhausted and on_exhausted = deny",
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
    /// What the account's packs valid at `at` hold in all.
    pub limit: u64,
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
    /// The plan that issued a free-tier pack (R8); `None` for a purchased one.
    pub plan: Option<Arc<str>>,
}

/// A first load in progress; `None` once done means the store does not know the account.
type LoadCell = tokio::sync::OnceCell<Option<Arc<AccountState>>>;

/// The hasher of the meter's in-memory maps: foldhash, seeded per process.
/// SipHash (the standard library's default) cost a noticeable share of a
/// deduction's lookup; foldhash hashes a short account id in a few
/// nanoseconds. It is not a cryptographic hash; the per-process seed keeps
/// a set of colliding ids computed offline from carrying over.
pub(crate) type FastHash = foldhash::fast::RandomState;

/// A resident account as the key of the account map: hashed and compared
/// by its id, so the map stores one pointer per account (the id lives in
/// the account) instead of a separate key and value, and the comparison
/// that confirms a lookup reads the account the deduction reads next.
#[derive(Clone, Debug)]
pub(crate) struct Resident(pub(crate) Arc<AccountState>);

impl std::hash::Hash for Resident {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        // As `[u8]` hashes, so that lookups by the id's bytes find it
        // (`Borrow`).
        self.0.id.as_bytes().hash(state)
    }
}

impl PartialEq for Resident {
    fn eq(&self, other: &Self) -> bool {
        self.0.id.as_bytes() == other.0.id.as_bytes()
    }
}

impl Eq for Resident {}

/// Looked up by the id's bytes, not its `str`: an inline id reads as a
/// `str` only through a UTF-8 check ([`account::AccountId::as_bytes`]).
impl std::borrow::Borrow<[u8]> for Resident {
    fn borrow(&self) -> &[u8] {
        self.0.id.as_bytes()
    }
}

/// All resident accounts, how to load the others, and the queue of those
/// with unflushed changes.
pub struct Meter {
    cfg: MeterConfig,
    store: Arc<dyn crate::store::Store>,
    accounts: DashMap<Resident, (), FastHash>,
    /// First loads in progress, shared by concurrent first requests.
    /// Keyed by the id the account will hold (one allocation per new
    /// account for both).
    loading: DashMap<arcstr::ArcStr, Arc<LoadCell>, FastHash>,
    /// Accounts with unflushed changes, in the order they became dirty.
    dirty: Mutex<std::collections::VecDeque<Arc<AccountState>>>,
    /// Accounts whose changes the store refused permanently: kept here,
    /// out of the flush queue, until a restart replays them.
    set_aside: Mutex<Vec<Arc<AccountState>>>,
    /// Wakes the flusher early once `flush_threshold` accounts are dirty.
    flush_wanted: tokio::sync::Notify,
    flush_threshold: usize,
    /// Interned free-tier pack ids (two per calendar month ever seen).
    /// Locked only when a month's packs are built, never per deduction.
    free_pack_ids: Mutex<std::collections::HashSet<Arc<str>, FastHash>>,
    /// Shutdown and settlement barrier.
    gate: gate::Gate,
    /// Strict mode's leases, once [`enable_leases`](Self::enable_leases) ran.
    leases: std::sync::OnceLock<Arc<lease::Leases>>,
}

impl Meter {
    /// A meter that loads accounts from `store`. Only loading reads it:
    /// writes go through the flusher and [`crate::app::App`].
    pub fn new(cfg: MeterConfig, store: Arc<dyn crate::store::Store>) -> Meter {
        Meter {
            cfg,
            store,
            accounts: DashMap::with_hasher(FastHash::default()),
            loading: DashMap::with_hasher(FastHash::default()),
            dirty: Mutex::new(std::collections::VecDeque::new()),
            set_aside: Mutex::new(Vec::new()),
            flush_wanted: tokio::sync::Notify::new(),
            flush_threshold: 50_000,
            free_pack_ids: Mutex::new(std::collections::HashSet::default()),
            gate: gate::Gate::default(),
            leases: std::sync::OnceLock::new(),
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

    pub fn gate(&self) -> &gate::Gate {
        &self.gate
    }

    /// Packs that end before this can take no more deductions: every hour
    /// they cover has closed.
    fn keep_after(&self, now: Ts) -> Ts {
        now.saturating_sub(self.cfg.late_grace).saturating_sub(HOUR)
    }
}

#[cfg(test)]
mod tests;
