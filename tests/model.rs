//! A state-machine property test of the application layer against a small
//! reference model of the billing rules (DESIGN.md §1, R1–R12), written
//! plainly in this file (issue 7, section 3).
//!
//! The system under test is a real [`App`] on a real SQLite file in a
//! temporary directory, driven by a [`ManualClock`]. Random sequences of
//! operations run against both: deductions (calls and/or egress, checks,
//! with and without a request id, at event times inside and outside R9's
//! bounds), pack grants, account changes (activation, suspend, deny),
//! flushes, evictions, crashes (the `App` is dropped without a flush and
//! reopened on the same file), clean restarts and clock advances across
//! hours, month ends and the end of the free window.
//!
//! Checked:
//! - every deduction's reply (decision and reason, covered, overage,
//!   remaining and limit of both items, the duplicate flag) or error kind;
//! - every grant's and account change's reply;
//! - after every flush: the stored hourly rows summed by (account, hour,
//!   item, pack), the stored packs' `used`, and the stored account rows
//!   equal the model's durable state;
//! - on `ListPacks` and after every flush: every account's pack list (ids,
//!   sources, capacities, validity, live `used`) equals the model's, and
//!   no pack's `used` exceeds its capacity;
//! - covered + overage equals what was asked for every allowed deduction.
//!
//! The model follows DESIGN.md. Where the implementation departs from it,
//! the generator is restricted, explicitly, so that the rest is still
//! checked; each restriction names its gap:
//! - R1: an earlier event moves A back unless the new window would end
//!   before now plus the skew; with this model's 1 h grace and 2-month
//!   window that never happens, so the model moves A back always.
//! - R1: an operator's change of activation (either way) is refused once
//!   the account has usage, and changes nothing (issue 15, item 8); flags
//!   the operator leaves out keep their value (item 7).
//! - Checks (`calls = 0, egress_bytes = 0`) carry no request id: DESIGN.md
//!   does not say whether a check consumes or answers a request id, and the
//!   implementation ignores it.
//! - Gaps this test found and that are fixed (so no longer restricted): a
//!   request id reused after it expired was stored with the first
//!   original's amounts; an account known only by purchased packs became
//!   unknown once they ended; a pack that left the resident set was listed
//!   without its unflushed usage; a month with usage that an activation
//!   change made non-live came back at zero; and the flusher stamped
//!   batches with the wall clock (one start date is before it).
//!
//! `PROPTEST_CASES` sets the number of cases (default [`DEFAULT_CASES`]).

use std::{collections::BTreeMap, sync::Arc};

use chrono::{DateTime, Datelike, FixedOffset, Months, NaiveDate, TimeZone};
use packmeter::{
    app::{AccountChange, App, DeductRequest, Grant, Validity},
    calendar::{BillingZone, FreeTierPlan, Ts, HOUR, SECOND},
    clock::ManualClock,
    ledger::AccountRecord,
    meter::{
        Atomicity, Decision, DeductOutcome, Deduction, DenyReason, ItemOutcome, MeterConfig,
        MeterError, UnknownAccounts,
    },
    metrics::Metrics,
    packs::{Item, PackSource},
    store::{sqlite::SqliteStore, Store},
};
use proptest::prelude::*;
use proptest_state_machine::{prop_state_machine, ReferenceStateMachine, StateMachineTest};

/// Cases when `PROPTEST_CASES` is not set: well under 30 s in a debug build.
const DEFAULT_CASES: u32 = 256;

const ACCOUNTS: [&str; 3] = ["a", "b", "c"];
/// Request ids are `r0`, `r1`, ...; each deduction picks among the first
/// few, so that ids repeat, within and after their expiry.
const REQUEST_ID_POOL: usize = 3;

fn request_id(n: u32) -> String {
    format!("r{n}")
}

const PLAN: FreeTierPlan = FreeTierPlan {
    months: 2,
    calls: 10,
    egress_bytes: 100,
};
const GRACE: Ts = HOUR;
const DEDUP_WINDOW: Ts = HOUR;
const SKEW: Ts = 300 * SECOND;
const MINUTE: Ts = 60 * SECOND;
const DAY: Ts = 24 * HOUR;

fn config() -> MeterConfig {
    MeterConfig {
        zone: BillingZone::default(),
        plan: PLAN,
        late_grace: GRACE,
        dedup_window: DEDUP_WINDOW,
        max_future_skew: SKEW,
        unknown_accounts: UnknownAccounts::Activate,
        ..MeterConfig::default()
    }
}

// --- the billing calendar, plainly (R2, R3, R4), in +08:00 ---

fn zone() -> FixedOffset {
    FixedOffset::east_opt(8 * 3600).unwrap()
}

fn local_date(ts: Ts) -> NaiveDate {
    DateTime::from_timestamp_micros(ts)
        .unwrap()
        .with_timezone(&zone())
        .date_naive()
}

fn day_start(d: NaiveDate) -> Ts {
    zone()
        .from_local_datetime(&d.and_hms_opt(0, 0, 0).unwrap())
        .unwrap()
        .timestamp_micros()
}

fn first_of_month(d: NaiveDate) -> NaiveDate {
    d.with_day(1).unwrap()
}

fn month_start(ts: Ts) -> Ts {
    day_start(first_of_month(local_date(ts)))
}

fn next_month_start(ts: Ts) -> Ts {
    day_start(first_of_month(local_date(ts)) + Months::new(1))
}

fn hour_start(ts: Ts) -> Ts {
    ts.div_euclid(HOUR) * HOUR
}

/// R9: when the hour holding `at` closes.
fn hour_closes(at: Ts) -> Ts {
    hour_start(at) + HOUR + GRACE
}

fn local(rfc3339: &str) -> Ts {
    DateTime::parse_from_rfc3339(rfc3339)
        .unwrap()
        .timestamp_micros()
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct PackLine {
    id: String,
    source: PackSource,
    item: Item,
    capacity: u64,
    from: Ts,
    until: Ts,
    used: u64,
}

/// The free-tier packs of an account activated at `a` (R2, R3): the window
/// ends at 00:00 of the day after date(A) + months (a missing day clamps
/// to the month's last); each calendar month that overlaps it gets one
/// full pack per item, valid over [max(month start, A), min(next month
/// start, window end)).
fn free_packs(a: Ts) -> Vec<PackLine> {
    let end_day = local_date(a)
        .checked_add_months(Months::new(PLAN.months))
        .unwrap()
        .succ_opt()
        .unwrap();
    let end = day_start(end_day);
    let anchor = first_of_month(local_date(a));
    let mut out = Vec::new();
    for i in 0.. {
        let month = anchor + Months::new(i);
        let start = day_start(month);
        if start >= end {
            break;
        }
        let until = day_start(anchor + Months::new(i + 1)).min(end);
        for (item, capacity) in [
            (Item::Calls, PLAN.calls),
            (Item::EgressBytes, PLAN.egress_bytes),
        ] {
            out.push(PackLine {
                id: format!(
                    "free-{:04}-{:02}-{}",
                    month.year(),
                    month.month(),
                    item.as_str()
                ),
                source: PackSource::FreeTier,
                item,
                capacity,
                from: start.max(a),
                until,
                used: 0,
            });
        }
    }
    out
}

// --- operations ---

/// An event time, relative to the server clock when the operation runs.
#[derive(Clone, Copy, Debug)]
enum At {
    /// No `at`: the server clock.
    Server,
    /// `now + s` seconds.
    Secs(i64),
    /// Exactly the allowed skew ahead (accepted).
    MaxSkew,
    /// One microsecond past the skew (refused).
    PastSkew,
    /// The first instant of the earliest hour still open.
    EarliestOpen,
    /// The last instant of the latest closed hour.
    LatestClosed,
    /// The start of the current month (+08:00).
    MonthStart,
    /// The last instant of the previous month.
    BeforeMonthStart,
    /// The start of the next month.
    NextMonthStart,
}

impl At {
    fn resolve(self, now: Ts) -> Ts {
        let earliest_open = hour_start(now - HOUR - GRACE) + HOUR;
        match self {
            At::Server => now,
            At::Secs(s) => now + s * SECOND,
            At::MaxSkew => now + SKEW,
            At::PastSkew => now + SKEW + 1,
            At::EarliestOpen => earliest_open,
            At::LatestClosed => earliest_open - 1,
            At::MonthStart => month_start(now),
            At::BeforeMonthStart => month_start(now) - 1,
            At::NextMonthStart => next_month_start(now),
        }
    }
}

#[derive(Clone, Copy, Debug)]
enum Advance {
    Secs(i64),
    Hours(i64),
    Days(i64),
    ToNextHour,
    ToNextMonth,
    /// Two minutes before the next month starts, so events within the skew
    /// fall in the next month.
    ToBeforeNextMonth,
}

impl Advance {
    fn target(self, now: Ts) -> Ts {
        match self {
            Advance::Secs(s) => now + s * SECOND,
            Advance::Hours(h) => now + h * HOUR,
            Advance::Days(d) => now + d * DAY,
            Advance::ToNextHour => hour_start(now) + HOUR,
            Advance::ToNextMonth => next_month_start(now),
            Advance::ToBeforeNextMonth => (next_month_start(now) - 2 * MINUTE).max(now + 1),
        }
    }
}

#[derive(Clone, Debug)]
enum Op {
    Deduct {
        acct: usize,
        calls: u64,
        egress: u64,
        at: At,
        rid: Option<u32>,
    },
    Grant {
        acct: usize,
        pack: u32,
        item: Item,
        capacity: u64,
        /// Seconds from now; `None` for "from now".
        from: Option<i64>,
        /// Seconds from `from` to `valid_until`; 0 is invalid.
        len: i64,
        priority: u32,
    },
    Put {
        acct: usize,
        /// Seconds from now; `None` keeps the activation, or activates now.
        activation: Option<i64>,
        /// `None` keeps the current value.
        suspended: Option<bool>,
        deny: Option<bool>,
    },
    ListPacks {
        acct: usize,
    },
    Flush,
    Evict,
    Crash,
    Restart,
    Advance(Advance),
}

fn pack_id(n: u32) -> String {
    format!("p{n:04}")
}

// --- the reference model ---

#[derive(Clone, Debug)]
struct Purchased {
    id: String,
    item: Item,
    capacity: u64,
    from: Ts,
    until: Ts,
    priority: u32,
    created: Ts,
}

/// The stored account row.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Record {
    activated: Option<Ts>,
    suspended: bool,
    deny: bool,
}

/// A processed request id (R10): covered and overage of calls, then of
/// egress, and when it is forgotten.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Remembered {
    amounts: [u64; 4],
    expires: Ts,
}

/// One account: what is durable, and what is acknowledged but not yet
/// flushed. The live state is the durable state plus the unflushed part.
#[derive(Clone, Debug, Default)]
struct Account {
    /// Written through by `put_account`, and at flush for an activation.
    record: Option<Record>,
    /// Written through by `grant_pack`.
    purchased: Vec<Purchased>,
    /// Flushed usage per pack id (free-tier ids name the month and item).
    used: BTreeMap<String, u64>,
    /// Flushed request ids.
    ids: BTreeMap<String, Remembered>,
    /// Activation by a first deduction, not yet flushed (R1).
    new_activation: Option<Ts>,
    new_used: BTreeMap<String, u64>,
    new_ids: BTreeMap<String, Remembered>,
}

impl Account {
    /// The live activation: the stored one, or an unflushed earlier one.
    fn activation(&self) -> Option<Ts> {
        match (self.record.and_then(|r| r.activated), self.new_activation) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// R1: the activation an accepted event at `at` leaves: the first one
    /// activates at its event time but no later than the server clock, and
    /// an earlier event moves A back.
    fn activation_after(&self, at: Ts, now: Ts) -> Ts {
        self.activation().map_or(at.min(now), |a| a.min(at))
    }

    fn suspended(&self) -> bool {
        self.record.is_some_and(|r| r.suspended)
    }

    fn deny(&self) -> bool {
        self.record.is_some_and(|r| r.deny)
    }

    fn used(&self, id: &str) -> u64 {
        self.used.get(id).copied().unwrap_or(0) + self.new_used.get(id).copied().unwrap_or(0)
    }

    fn remembered(&self, id: &str) -> Option<Remembered> {
        self.new_ids.get(id).or(self.ids.get(id)).copied()
    }

    /// Every pack with live usage (R11), by id.
    fn pack_list(&self) -> Vec<PackLine> {
        let mut out: Vec<PackLine> = self.activation().map(free_packs).unwrap_or_default();
        out.extend(self.purchased.iter().map(|p| PackLine {
            id: p.id.clone(),
            source: PackSource::Purchased,
            item: p.item,
            capacity: p.capacity,
            from: p.from,
            until: p.until,
            used: 0,
        }));
        for p in &mut out {
            p.used = self.used(&p.id);
        }
        out.sort_by(|a, b| a.id.cmp(&b.id));
        out
    }

    /// The packs of `item` valid at `at` in R6 order (free tier first, then
    /// purchased by priority, earliest expiry, creation, id), as (id,
    /// capacity), for an account activated at `activation`.
    fn packs_at(&self, item: Item, at: Ts, activation: Option<Ts>) -> Vec<(String, u64)> {
        let mut out: Vec<(String, u64)> = activation
            .map(free_packs)
            .unwrap_or_default()
            .into_iter()
            .filter(|p| p.item == item && p.from <= at && at < p.until)
            .map(|p| (p.id, p.capacity))
            .collect();
        let mut bought: Vec<&Purchased> = self
            .purchased
            .iter()
            .filter(|p| p.item == item && p.from <= at && at < p.until)
            .collect();
        bought.sort_by(|a, b| {
            b.priority
                .cmp(&a.priority)
                .then(a.until.cmp(&b.until))
                .then(a.created.cmp(&b.created))
                .then(a.id.cmp(&b.id))
        });
        out.extend(bought.into_iter().map(|p| (p.id.clone(), p.capacity)));
        out
    }

    /// (limit, remaining) of `item` at `at`.
    fn balance(&self, item: Item, at: Ts, activation: Option<Ts>) -> (u64, u64) {
        self.packs_at(item, at, activation)
            .iter()
            .fold((0, 0), |(limit, left), (id, cap)| {
                (limit + cap, left + cap.saturating_sub(self.used(id)))
            })
    }

    fn outcome(
        &self,
        at: Ts,
        activation: Option<Ts>,
        decision: Decision,
        amounts: [u64; 4],
    ) -> DeductOutcome {
        let item = |item, covered, overage| {
            let (limit, remaining) = self.balance(item, at, activation);
            ItemOutcome {
                covered,
                overage,
                remaining,
                limit,
            }
        };
        DeductOutcome {
            decision,
            calls: item(Item::Calls, amounts[0], amounts[1]),
            egress_bytes: item(Item::EgressBytes, amounts[2], amounts[3]),
            duplicate: false,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Refusal {
    TooFarInFuture,
    HourClosed,
    InvalidPack,
    ActivationLocked,
}

/// What the last operation must answer.
#[derive(Clone, Debug, PartialEq)]
enum Expect {
    Nothing,
    Deduct(Result<DeductOutcome, Refusal>),
    Grant(Result<PackLine, Refusal>),
    Account(Result<Record, Refusal>),
}

type RowKey = (usize, Ts, Item, String);

#[derive(Clone)]
struct Model {
    now: Ts,
    next_pack: u32,
    accounts: [Account; 3],
    /// Flushed hourly rows: (account, hour, item, pack id or "" for
    /// overage) → amount.
    rows: BTreeMap<RowKey, u64>,
    new_rows: BTreeMap<RowKey, u64>,
    expect: Expect,
}

/// Only the clock: the initial state is all a failing case needs to show.
impl std::fmt::Debug for Model {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let now = DateTime::from_timestamp_micros(self.now)
            .unwrap()
            .with_timezone(&zone());
        write!(f, "Model {{ now: {} }}", now.to_rfc3339())
    }
}

impl Model {
    fn new(now: Ts) -> Model {
        Model {
            now,
            next_pack: 0,
            accounts: Default::default(),
            rows: BTreeMap::new(),
            new_rows: BTreeMap::new(),
            expect: Expect::Nothing,
        }
    }

    /// Whether the account has usage, flushed or not.
    fn has_usage(&self, acct: usize) -> bool {
        self.rows
            .keys()
            .chain(self.new_rows.keys())
            .any(|k| k.0 == acct)
    }

    fn deduct(
        &mut self,
        i: usize,
        calls: u64,
        egress: u64,
        at: At,
        rid: Option<u32>,
    ) -> Result<DeductOutcome, Refusal> {
        let now = self.now;
        let at = at.resolve(now);
        // R9, before anything else: both change nothing.
        if at - now > SKEW {
            return Err(Refusal::TooFarInFuture);
        }
        if hour_closes(at) <= now {
            return Err(Refusal::HourClosed);
        }
        let acct = &self.accounts[i];
        if calls == 0 && egress == 0 {
            // A check: deducts, activates and records nothing, and reports
            // what the next call would see; an account not yet activated
            // would be activated by it at min(at, now) (R1).
            let activation = Some(acct.activation_after(at, now));
            let mut o = acct.outcome(at, activation, Decision::Allow, [0; 4]);
            if acct.suspended() {
                o.decision = Decision::Deny(DenyReason::Suspended);
            } else if acct.deny() {
                if o.egress_bytes.remaining == 0 {
                    o.decision = Decision::Deny(DenyReason::EgressExhausted);
                } else if o.calls.remaining == 0 {
                    o.decision = Decision::Deny(DenyReason::CallsExhausted);
                }
            }
            return Ok(o);
        }
        // R10: a request id processed within its window is a duplicate:
        // the original's amounts, nothing deducted again.
        if let Some(r) = rid
            .and_then(|r| acct.remembered(&request_id(r)))
            .filter(|r| r.expires > now)
        {
            let mut o = acct.outcome(at, acct.activation(), Decision::Allow, r.amounts);
            o.duplicate = true;
            return Ok(o);
        }
        // R7: suspended accounts are denied calls; `deny` accounts are
        // denied a call the calls packs cannot cover, or while their egress
        // packs are empty. Egress alone is never denied. A denial changes
        // nothing (and does not consume the request id).
        if calls > 0 {
            let a = Some(acct.activation_after(at, now));
            let reason = if acct.suspended() {
                Some(DenyReason::Suspended)
            } else if acct.deny() {
                if acct.balance(Item::EgressBytes, at, a).1 == 0 {
                    Some(DenyReason::EgressExhausted)
                } else if acct.balance(Item::Calls, at, a).1 < calls {
                    Some(DenyReason::CallsExhausted)
                } else {
                    None
                }
            } else {
                None
            };
            if let Some(reason) = reason {
                return Ok(acct.outcome(at, a, Decision::Deny(reason), [0; 4]));
            }
        }
        // Allowed. R1: the first accepted deduction activates the account
        // at its event time, but no later than the server clock; an earlier
        // one moves the activation back.
        let acct = &mut self.accounts[i];
        let a = acct.activation_after(at, now);
        if acct.activation() != Some(a) {
            acct.new_activation = Some(a);
        }
        let a = Some(a);
        let hour = hour_start(at);
        let mut amounts = [0; 4];
        for (k, item, want) in [(0, Item::Calls, calls), (2, Item::EgressBytes, egress)] {
            // R6: in order, then overage; no pack over its capacity.
            let mut left = want;
            for (id, cap) in acct.packs_at(item, at, a) {
                let take = cap.saturating_sub(acct.used(&id)).min(left);
                if take > 0 {
                    *acct.new_used.entry(id.clone()).or_default() += take;
                    *self.new_rows.entry((i, hour, item, id)).or_default() += take;
                    left -= take;
                }
            }
            if left > 0 {
                *self
                    .new_rows
                    .entry((i, hour, item, String::new()))
                    .or_default() += left;
            }
            amounts[k] = want - left;
            amounts[k + 1] = left;
        }
        if let Some(r) = rid {
            // Kept for the window, and at least until its hour closes.
            acct.new_ids.insert(
                request_id(r),
                Remembered {
                    amounts,
                    expires: (now + DEDUP_WINDOW).max(hour_closes(at)),
                },
            );
        }
        Ok(acct.outcome(at, a, Decision::Allow, amounts))
    }

    fn flush(&mut self) {
        for acct in &mut self.accounts {
            if let Some(a) = acct.new_activation.take() {
                let rec = acct.record.get_or_insert(Record {
                    activated: None,
                    suspended: false,
                    deny: false,
                });
                rec.activated = Some(rec.activated.map_or(a, |r| r.min(a)));
            }
            for (id, n) in std::mem::take(&mut acct.new_used) {
                *acct.used.entry(id).or_default() += n;
            }
            let new_ids = std::mem::take(&mut acct.new_ids);
            acct.ids.extend(new_ids);
        }
        for (k, n) in std::mem::take(&mut self.new_rows) {
            *self.rows.entry(k).or_default() += n;
        }
    }

    /// Everything not flushed is lost.
    fn crash(&mut self) {
        for acct in &mut self.accounts {
            acct.new_activation = None;
            acct.new_used.clear();
            acct.new_ids.clear();
        }
        self.new_rows.clear();
    }
}

struct ModelMachine;

fn at_strategy() -> impl Strategy<Value = At> {
    prop_oneof![
        3 => Just(At::Server),
        8 => (-3600..=300i64).prop_map(At::Secs),
        2 => (-2 * 3600 - 600..=420i64).prop_map(At::Secs),
        1 => Just(At::MaxSkew),
        1 => Just(At::PastSkew),
        1 => Just(At::EarliestOpen),
        1 => Just(At::LatestClosed),
        1 => Just(At::MonthStart),
        1 => Just(At::BeforeMonthStart),
        1 => Just(At::NextMonthStart),
    ]
}

fn deduct_strategy() -> impl Strategy<Value = Op> {
    (0..ACCOUNTS.len())
        .prop_flat_map(move |acct| {
            (
                Just(acct),
                prop_oneof![0..=3u64, 0..=12u64],
                prop_oneof![Just(0u64), 0..=40u64, 0..=150u64],
                at_strategy(),
                prop_oneof![
                    2 => Just(None),
                    3 => (0..REQUEST_ID_POOL as u32).prop_map(Some),
                ],
            )
        })
        .prop_map(|(acct, calls, egress, at, rid)| Op::Deduct {
            acct,
            calls,
            egress,
            at,
            // Restriction: checks carry no request id (see the module doc).
            rid: rid.filter(|_| calls > 0 || egress > 0),
        })
}

fn advance_strategy() -> impl Strategy<Value = Advance> {
    prop_oneof![
        3 => (1..=900i64).prop_map(Advance::Secs),
        3 => (1..=30i64).prop_map(Advance::Hours),
        1 => (1..=40i64).prop_map(Advance::Days),
        2 => Just(Advance::ToNextHour),
        1 => Just(Advance::ToNextMonth),
        1 => Just(Advance::ToBeforeNextMonth),
    ]
}

impl ReferenceStateMachine for ModelMachine {
    type State = Model;
    type Transition = Op;

    fn init_state() -> BoxedStrategy<Model> {
        // Near month ends in +08:00. The first activates on 31 Dec, whose
        // anniversary (+2 months) is clamped to 28 Feb; the last is in a
        // leap year. All lie after the wall clock (see the module doc on
        // `FlushBatch::now`).
        prop_oneof![
            Just(local("2030-12-31T23:10:00+08:00")),
            Just(local("2031-01-31T23:50:00+08:00")),
            Just(local("2032-02-29T22:30:00+08:00")),
            // Before the wall clock: the flusher stamps batches with the
            // app's clock, not the system's.
            Just(local("2024-11-30T23:40:00+08:00")),
        ]
        .prop_map(Model::new)
        .boxed()
    }

    fn transitions(state: &Model) -> BoxedStrategy<Op> {
        let n = ACCOUNTS.len();
        let mut ops: Vec<(u32, BoxedStrategy<Op>)> = vec![
            (12, deduct_strategy().boxed()),
            (5, advance_strategy().prop_map(Op::Advance).boxed()),
            (3, Just(Op::Flush).boxed()),
            (
                2,
                (
                    0..n,
                    prop_oneof![
                        3 => Just(None),
                        1 => Just(Some(-62 * 86400i64)),
                        1 => Just(Some(-31 * 86400)),
                        1 => Just(Some(-86400)),
                        1 => Just(Some(-90 * 60)),
                        1 => Just(Some(0)),
                        1 => Just(Some(20 * 60)),
                    ],
                    prop::option::of(prop::bool::weighted(0.25)),
                    prop::option::of(prop::bool::weighted(0.5)),
                )
                    .prop_map(|(acct, activation, suspended, deny)| Op::Put {
                        acct,
                        activation,
                        suspended,
                        deny,
                    })
                    .boxed(),
            ),
            (1, (0..n).prop_map(|acct| Op::ListPacks { acct }).boxed()),
            (1, Just(Op::Evict).boxed()),
            (1, Just(Op::Crash).boxed()),
            (1, Just(Op::Restart).boxed()),
        ];
        let grantees: Vec<usize> = (0..n).collect();
        if !grantees.is_empty() {
            let grant = (
                prop::sample::select(grantees),
                Just(state.next_pack),
                prop_oneof![Just(Item::Calls), Just(Item::EgressBytes)],
                1..=15u64,
                prop_oneof![
                    Just(None),
                    Just(Some(-2 * 3600i64)),
                    Just(Some(-20 * 60)),
                    Just(Some(3600)),
                    Just(Some(3 * 86400)),
                ],
                prop_oneof![
                    Just(2 * 3600i64),
                    Just(0),
                    Just(1800),
                    Just(86400),
                    Just(10 * 86400),
                    Just(45 * 86400),
                ],
                0..3u32,
            )
                .prop_map(|(acct, pack, item, cap, from, len, priority)| Op::Grant {
                    acct,
                    pack,
                    item,
                    capacity: if item == Item::Calls { cap } else { cap * 10 },
                    from,
                    len,
                    priority,
                });
            ops.push((3, grant.boxed()));
        }
        proptest::strategy::Union::new_weighted(ops).boxed()
    }

    /// Every operation is generated in every state: the known gaps this
    /// used to restrict (R1's move-back, an operator's activation past
    /// usage) are implemented now.
    fn preconditions(_state: &Model, _op: &Op) -> bool {
        true
    }

    fn apply(mut state: Model, op: &Op) -> Model {
        state.expect = Expect::Nothing;
        match *op {
            Op::Deduct {
                acct,
                calls,
                egress,
                at,
                rid,
            } => {
                let r = state.deduct(acct, calls, egress, at, rid);
                state.expect = Expect::Deduct(r);
            }
            Op::Grant {
                acct,
                pack,
                item,
                capacity,
                from,
                len,
                priority,
            } => {
                state.next_pack = state.next_pack.max(pack + 1);
                let now = state.now;
                let from = from.map_or(now, |s| now + s * SECOND);
                let until = from + len * SECOND;
                state.expect = Expect::Grant(if until <= from {
                    Err(Refusal::InvalidPack)
                } else {
                    let p = Purchased {
                        id: pack_id(pack),
                        item,
                        capacity,
                        from,
                        until,
                        priority,
                        created: now,
                    };
                    let a = &mut state.accounts[acct];
                    a.purchased.push(p);
                    // A grant stores the account row, not activated, if it
                    // has none, so the account stays listable (R11).
                    a.record.get_or_insert(Record {
                        activated: None,
                        suspended: false,
                        deny: false,
                    });
                    Ok(PackLine {
                        id: pack_id(pack),
                        source: PackSource::Purchased,
                        item,
                        capacity,
                        from,
                        until,
                        used: 0,
                    })
                });
            }
            Op::Put {
                acct,
                activation,
                suspended,
                deny,
            } => {
                let now = state.now;
                let has_usage = state.has_usage(acct);
                let a = &mut state.accounts[acct];
                // An explicit activation replaces it; none keeps the
                // current one, or activates the account now.
                let activated = activation
                    .map(|s| now + s * SECOND)
                    .or(a.activation())
                    .or(Some(now));
                state.expect = if activated != a.activation() && has_usage {
                    // R1: usage fixes the activation; nothing changes.
                    Expect::Account(Err(Refusal::ActivationLocked))
                } else {
                    let rec = Record {
                        activated,
                        suspended: suspended.unwrap_or(a.suspended()),
                        deny: deny.unwrap_or(a.deny()),
                    };
                    // Written through: durable at once.
                    a.record = Some(rec);
                    a.new_activation = None;
                    Expect::Account(Ok(rec))
                };
            }
            Op::ListPacks { .. } | Op::Evict => {}
            Op::Flush | Op::Restart => state.flush(),
            Op::Crash => state.crash(),
            Op::Advance(by) => state.now = by.target(state.now),
        }
        state
    }
}

// --- the system under test ---

struct Sut {
    rt: tokio::runtime::Runtime,
    clock: Arc<ManualClock>,
    path: String,
    app: Option<App>,
    // Last: the file goes when everything else has.
    _dir: tempfile::TempDir,
}

impl Sut {
    fn open(&mut self) {
        let store: Arc<dyn Store> = Arc::new(SqliteStore::open(&self.path).unwrap());
        self.app = Some(App::new(
            config(),
            store,
            Arc::new(Metrics::new()),
            self.clock.clone(),
            2,
        ));
    }

    fn app(&self) -> &App {
        self.app.as_ref().unwrap()
    }

    fn flush(&self) {
        self.rt.block_on(self.app().flush()).unwrap();
    }

    /// Every account's pack list equals the model's live one.
    fn check_pack_lists(&self, model: &Model, acct: usize) {
        let got = self.rt.block_on(self.app().list_packs(ACCOUNTS[acct]));
        let want = model.accounts[acct].pack_list();
        let got = match got {
            Ok(views) => {
                let mut lines: Vec<PackLine> = views
                    .into_iter()
                    .map(|v| PackLine {
                        id: v.spec.pack_id.to_string(),
                        source: v.spec.source,
                        item: v.spec.item,
                        capacity: v.spec.capacity,
                        from: v.spec.valid_from,
                        until: v.spec.valid_until,
                        used: v.used,
                    })
                    .collect();
                lines.sort_by(|a, b| a.id.cmp(&b.id));
                lines
            }
            // An account that has no packs may be unknown: whether an
            // account that only ever had checks is known is not a rule.
            Err(MeterError::NotFound(_)) if want.is_empty() => Vec::new(),
            Err(e) => panic!("list_packs({}) failed: {e}", ACCOUNTS[acct]),
        };
        for p in &got {
            assert!(
                p.used <= p.capacity,
                "pack {} of {} is over its capacity: {p:?}",
                p.id,
                ACCOUNTS[acct]
            );
        }
        assert_eq!(
            got, want,
            "live pack list of account {} (left: packmeter, right: model)",
            ACCOUNTS[acct]
        );
    }

    /// After a flush: the store's rows, packs and accounts equal the
    /// model's durable state.
    fn check_durable(&self, model: &Model) {
        let store = self.app().store().clone();
        let rows = self
            .rt
            .block_on(async {
                use futures_util::TryStreamExt;
                packmeter::export::settled_rows(store.clone(), i64::MIN, i64::MAX, None, 1_000)
                    .try_collect::<Vec<_>>()
                    .await
            })
            .unwrap();
        let mut got: BTreeMap<RowKey, u64> = BTreeMap::new();
        for r in rows {
            let i = ACCOUNTS.iter().position(|a| *a == r.account_id).unwrap();
            let source = match r.pack_id.as_str() {
                "" => None,
                id if id.starts_with("free-") => Some(PackSource::FreeTier),
                _ => Some(PackSource::Purchased),
            };
            assert_eq!(r.source, source, "source of stored row {r:?}");
            *got.entry((i, r.hour, r.item, r.pack_id)).or_default() += r.amount;
        }
        got.retain(|_, n| *n > 0);
        assert_eq!(
            got, model.rows,
            "stored hourly rows (left: store, right: model)"
        );
        for (i, id) in ACCOUNTS.iter().enumerate() {
            let acct = &model.accounts[i];
            let stored: BTreeMap<String, u64> = self
                .rt
                .block_on(store.list_packs(id))
                .unwrap()
                .into_iter()
                .map(|p| (p.spec.pack_id.to_string(), p.used))
                .collect();
            let mut want = acct.used.clone();
            for p in &acct.purchased {
                want.entry(p.id.clone()).or_default();
            }
            assert_eq!(
                stored, want,
                "stored packs' used of account {id} (left: store, right: model)"
            );
            let record = self
                .rt
                .block_on(store.get_account(id))
                .unwrap()
                .map(|r| Record {
                    activated: r.activated_at,
                    suspended: r.suspended,
                    deny: r.deny_on_exhausted,
                });
            assert_eq!(
                record, acct.record,
                "stored account row {id} (left: store, right: model)"
            );
        }
    }
}

struct PackmeterTest;

impl StateMachineTest for PackmeterTest {
    type SystemUnderTest = Sut;
    type Reference = ModelMachine;

    fn init_test(model: &Model) -> Sut {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        // A real SQLite file; on tmpfs where there is one, since every
        // commit is fsynced (`synchronous = FULL`).
        let shm = std::path::Path::new("/dev/shm");
        let dir = if shm.is_dir() {
            tempfile::tempdir_in(shm)
        } else {
            tempfile::tempdir()
        }
        .unwrap();
        let path = dir
            .path()
            .join("packmeter.db")
            .to_str()
            .unwrap()
            .to_string();
        let mut sut = Sut {
            rt,
            clock: Arc::new(ManualClock::new(model.now)),
            path,
            app: None,
            _dir: dir,
        };
        sut.open();
        sut
    }

    fn apply(mut sut: Sut, model: &Model, op: Op) -> Sut {
        match op {
            Op::Advance(_) => sut.clock.set(model.now),
            _ => assert_eq!(sut.app().now(), model.now),
        }
        match op {
            Op::Deduct {
                acct,
                calls,
                egress,
                at,
                rid,
            } => {
                let now = sut.app().now();
                let d = Deduction {
                    calls,
                    egress_bytes: egress,
                    at: match at {
                        At::Server => None,
                        at => Some(at.resolve(now)),
                    },
                    request_id: &rid.map_or(String::new(), request_id),
                };
                let req = DeductRequest {
                    account_id: ACCOUNTS[acct],
                    deduction: d,
                };
                let got = sut
                    .rt
                    .block_on(sut.app().deduct(&[req], Atomicity::Each))
                    .map(|mut v| {
                        assert_eq!(v.len(), 1);
                        v.remove(0)
                    })
                    .map_err(|e| match e.error {
                        MeterError::TooFarInFuture { .. } => Refusal::TooFarInFuture,
                        MeterError::HourClosed { .. } => Refusal::HourClosed,
                        other => panic!("unexpected refusal: {other}"),
                    });
                if let Ok(o) = &got {
                    if o.decision == Decision::Allow && !o.duplicate {
                        assert_eq!(o.calls.covered + o.calls.overage, calls);
                        assert_eq!(o.egress_bytes.covered + o.egress_bytes.overage, egress);
                    }
                }
                assert_eq!(
                    Expect::Deduct(got),
                    model.expect,
                    "deduction at {} (left: packmeter, right: model)",
                    d.at.unwrap_or(now)
                );
            }
            Op::Grant {
                acct,
                pack,
                item,
                capacity,
                from,
                len,
                priority,
            } => {
                let now = sut.app().now();
                let valid_from = from.map(|s| now + s * SECOND);
                let g = Grant {
                    account_id: ACCOUNTS[acct].to_string(),
                    pack_id: pack_id(pack),
                    item,
                    capacity,
                    valid_from,
                    validity: Validity::Until(valid_from.unwrap_or(now) + len * SECOND),
                    priority,
                };
                let got = sut
                    .rt
                    .block_on(sut.app().grant_pack(g))
                    .map(|v| PackLine {
                        id: v.spec.pack_id.to_string(),
                        source: v.spec.source,
                        item: v.spec.item,
                        capacity: v.spec.capacity,
                        from: v.spec.valid_from,
                        until: v.spec.valid_until,
                        used: v.used,
                    })
                    .map_err(|e| match e {
                        MeterError::InvalidPack(_) => Refusal::InvalidPack,
                        other => panic!("unexpected grant error: {other}"),
                    });
                assert_eq!(Expect::Grant(got), model.expect, "grant");
            }
            Op::Put {
                acct,
                activation,
                suspended,
                deny,
            } => {
                let now = sut.app().now();
                let change = AccountChange {
                    account_id: ACCOUNTS[acct].to_string(),
                    activated_at: activation.map(|s| now + s * SECOND),
                    suspended,
                    deny_on_exhausted: deny,
                };
                let got = sut
                    .rt
                    .block_on(sut.app().put_account(change))
                    .map(|got: AccountRecord| Record {
                        activated: got.activated_at,
                        suspended: got.suspended,
                        deny: got.deny_on_exhausted,
                    })
                    .map_err(|e| match e {
                        MeterError::ActivationLocked { .. } => Refusal::ActivationLocked,
                        other => panic!("unexpected put_account error: {other}"),
                    });
                assert_eq!(Expect::Account(got), model.expect, "put_account");
            }
            Op::ListPacks { acct } => sut.check_pack_lists(model, acct),
            Op::Flush => {
                sut.flush();
                sut.check_durable(model);
                for i in 0..ACCOUNTS.len() {
                    sut.check_pack_lists(model, i);
                }
            }
            Op::Evict => {
                sut.app().meter().evict_all_flushed();
            }
            Op::Crash => {
                // Dropped without a flush: what was not flushed is lost.
                sut.app = None;
                sut.open();
            }
            Op::Restart => {
                sut.flush();
                sut.app = None;
                sut.open();
                sut.check_durable(model);
            }
            Op::Advance(_) => {}
        }
        sut
    }
}

fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(DEFAULT_CASES)
}

prop_state_machine! {
    #![proptest_config(ProptestConfig {
        cases: cases(),
        // Preconditions reject about three transitions per case (most of
        // them late events before a fresh activation): allow that many.
        max_local_rejects: cases().saturating_mul(32),
        // The shrunk sequence is printed on failure; no regression file is
        // written into the repository.
        failure_persistence: None,
        .. ProptestConfig::default()
    })]

    /// Random sequences of operations against the reference model.
    #[test]
    fn packmeter_follows_the_billing_model(sequential 10..80 => PackmeterTest);
}
