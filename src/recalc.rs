//! Recalculation when a plan takes effect (R8, issue 11).
//!
//! A later plan of the plans file, effective at `E`, is *switched in* on
//! each node when its clock passes `E` (or at start, when `E` has passed).
//! From then on the meter issues the new plan's packs from the month that
//! holds `E` onwards (crate::plans), each complete, counted from the
//! account's original activation. Before the switch the earlier plan's
//! packs served, and usage in that month may already be recorded against
//! them, or as overage.
//!
//! The switch then re-deducts, once per account, the usage recorded since
//! the start of that month against the new packs:
//!
//! 1. every resident account's free-tier packs are rebuilt under the new
//!    plan, with no deduction in progress;
//! 2. everything acknowledged is flushed, so the store holds all usage
//!    recorded under the earlier plan;
//! 3. for each account with free-tier or overage usage since the month's
//!    start, activated before `E`, the store re-attributes it in one
//!    transaction ([`Store::recalculate`]): the earlier plan's packs of
//!    those months are credited, their usage and the overage move to the
//!    new plan's pack of the same month up to its capacity, and what does
//!    not fit stays overage. Purchased packs are not touched.
//!
//! **Closed hours stay closed (R12).** The re-deduction is written as
//! adjustment rows ([`crate::ledger::Adjustment`]) in the hour that holds
//! `E`, or, when a node catches up after that hour closed, in the first
//! hour not yet closed. No usage row changes. Exports list them after the
//! usage rows; a billing system sums both.
//!
//! **Once, whichever node.** The store computes each move from what its
//! rows hold *net of earlier adjustments*, with the account's row locked,
//! so a second run (another node, a restart, a retry after an error) finds
//! nothing left to move and writes nothing. Every node runs the job after
//! its own switch and flush, so usage another node flushed late is moved
//! by that node's run. A node records that it finished
//! ([`Store::record_recalculated`]); a restart re-runs only unfinished plans.
//!
//! **Known limit.** Deductions that land on a new pack between the switch
//! and the account's recalculation are not yet in the store when it caps
//! the move at the pack's capacity; if the two together exceed it, the
//! next flush attributes the excess as overage (as it does for two nodes'
//! racing deductions), so the totals stay exact, but a reply may have said
//! covered for usage that settles as overage.

use std::{sync::Arc, time::Duration};

use tokio::sync::Notify;

use crate::{
    app::App,
    calendar::{Ts, HOUR},
    meter::MeterError,
    metrics::Metrics,
    packs::{Item, PackSource, PackSpec},
    plans::{LivePlans, Plans},
};

/// How long a failed recalculation waits before it runs again.
const RETRY: Duration = Duration::from_secs(5);

/// Longest wait between two looks at the clock: a clock that jumps (NTP,
/// a suspended machine) still switches a plan within this.
const LOOK_EVERY: Duration = Duration::from_secs(60);

/// Switches plans in as their instants pass and recalculates the accounts
/// they change, until `stop`. `changed` is notified after a reload of the
/// plans file. The plans in force at start were switched in before (by
/// [`LivePlans::open`] and `serve`); those whose recalculation no node
/// finished are caught up here.
pub async fn run(
    app: Arc<App>,
    plans: Arc<LivePlans>,
    metrics: Arc<Metrics>,
    changed: Arc<Notify>,
    stop: tokio_util::sync::CancellationToken,
) {
    // Plans switched in while this node runs are always recalculated here,
    // even if another node finished first: this node's own usage under the
    // earlier plan reaches the store only with its flush.
    let mut owed: Vec<usize> = Vec::new();
    let mut caught_up = false;
    loop {
        let now = app.now();
        let switched = plans.switch_through(now);
        if !switched.is_empty() {
            app.meter().rebuild_all_free_months(now);
            owed.extend(switched);
        }
        let wait = match run_owed(&app, &plans.load(), &metrics, &mut owed, &mut caught_up).await {
            Ok(()) => plans.next_instant().map_or(LOOK_EVERY, |e| {
                let us = u64::try_from(e.saturating_sub(app.now())).unwrap_or(0);
                Duration::from_micros(us).min(LOOK_EVERY)
            }),
            Err(e) => {
                tracing::error!(error = %e, retry_in = ?RETRY, "plan recalculation failed; it runs again");
                RETRY
            }
        };
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = changed.notified() => {}
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

/// Recalculates the plans owed, then (once) those in force that no node
/// finished. Each one done leaves `owed`.
async fn run_owed(
    app: &App,
    plans: &Plans,
    metrics: &Metrics,
    owed: &mut Vec<usize>,
    caught_up: &mut bool,
) -> Result<(), MeterError> {
    if !*caught_up {
        let done = app.store().plans_recalculated().await?;
        for position in 1..plans.plans().len() {
            let recorded = i64::try_from(position).is_ok_and(|p| done.contains(&p));
            if !recorded && !owed.contains(&position) {
                owed.push(position);
            }
        }
        owed.sort_unstable();
        *caught_up = true;
    }
    while let Some(&position) = owed.first() {
        let plan = &plans.plans()[position];
        let accounts = recalculate(app, plans, position).await?;
        let position_i64 = i64::try_from(position).unwrap_or(i64::MAX);
        app.store()
            .record_recalculated(position_i64, app.now())
            .await?;
        metrics.plan_switched(accounts);
        tracing::info!(plan = %plan.name, effective = %crate::calendar::to_datetime(plan.effective).to_rfc3339(), accounts, "plan switched in; usage recorded under the earlier plan re-deducted");
        owed.remove(0);
    }
    Ok(())
}

/// Re-deducts, under the plan at `position` of `plans` (in force), the
/// usage every account recorded since the start of the month holding its
/// instant. Returns how many accounts it looked at.
pub async fn recalculate(app: &App, plans: &Plans, position: usize) -> Result<u64, MeterError> {
    let plan = &plans.plans()[position];
    // Everything acknowledged under the earlier plan reaches the store.
    app.flush().await?;
    let now = app.now();
    let meter = app.meter();
    let cut = plan.zone.month_start(plan.effective);
    let horizon = hour_floor(now.saturating_add(app.config().max_future_skew)).saturating_add(HOUR);
    let until = plans.plans().get(position + 1).map_or(horizon, |next| {
        next.zone.month_start(next.effective).min(horizon)
    });
    let hour = hour_floor(plan.effective).max(meter.closed_before(now));
    let candidates = app
        .store()
        .recalculation_candidates(hour_floor(cut), Ts::MAX)
        .await?;
    let mut n = 0;
    for (account_id, activated_at) in candidates {
        let months: Vec<(Ts, Ts, [PackSpec; 2])> = plans
            .free_months(activated_at)
            .into_iter()
            .filter(|m| usize::from(m.plan) == position)
            .map(|m| (m.valid_from, m.valid_until, meter.free_specs(&m)))
            .collect();
        let r = Recalculation {
            account_id,
            plan_position: i64::try_from(position).unwrap_or(i64::MAX),
            plan: plan.name.to_string(),
            hour,
            spans: spans(cut, until, &months),
        };
        if r.spans.is_empty() {
            continue;
        }
        let packs = app.store().recalculate(&r).await?;
        if let Some(acct) = meter.resident_account(&r.account_id) {
            meter.rebase(&[(acct, &packs)], || {});
        }
        n += 1;
    }
    Ok(n)
}

/// The re-deduction of one account for one plan change, as the store
/// applies it ([`crate::store::Store::recalculate`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Recalculation {
    pub account_id: String,
    /// The new plan's 0-based place in the plans file.
    pub plan_position: i64,
    pub plan: String,
    /// The hour the adjustment rows go in: the hour holding the plan's
    /// instant, or a later one that is still open. The store moves it past
    /// its settled mark if an export settled it meanwhile.
    pub hour: Ts,
    /// The spans of usage rows to re-deduct, in order, not overlapping.
    pub spans: Vec<Span>,
}

/// Usage rows with `from <= hour < until` (hour starts), and the new plan's
/// free-tier packs that cover them, one per item (none where the new plan
/// has no pack: the earlier plan's usage there becomes overage).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Span {
    pub from: Ts,
    pub until: Ts,
    pub packs: Vec<PackSpec>,
}

impl Span {
    /// The new pack of `item`, if the span has one.
    pub fn pack(&self, item: Item) -> Option<&PackSpec> {
        self.packs.iter().find(|p| p.item == item)
    }
}

/// What a span's rows of one item hold, net of earlier adjustments: one
/// entry per free-tier pack, and one for the overage (`pack_id` empty,
/// `source` `None`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Held {
    pub pack_id: String,
    pub source: Option<PackSource>,
    pub net: i64,
}

/// One adjustment row to add (to an existing one with the same key).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Move {
    pub pack_id: String,
    pub source: Option<PackSource>,
    pub delta: i64,
}

/// The moves that re-deduct one span's usage of one item: every free-tier
/// pack other than `new`'s is credited its net usage, the overage its net
/// amount, and the sum goes to `new` (whose pack row says `new_used` is
/// used so far) up to its capacity; the rest is overage. Moves sum to zero;
/// a span already re-deducted gives none.
pub fn rededuct(new: Option<(&PackSpec, u64)>, held: &[Held]) -> Vec<Move> {
    let is_new = |h: &Held| new.is_some_and(|(n, _)| *n.pack_id == *h.pack_id);
    let old: Vec<&Held> = held
        .iter()
        .filter(|h| h.source == Some(PackSource::FreeTier) && !is_new(h) && h.net > 0)
        .collect();
    let overage: i64 = held
        .iter()
        .filter(|h| h.source.is_none())
        .map(|h| h.net)
        .sum::<i64>()
        .max(0);
    let total = old.iter().fold(overage, |sum, h| sum.saturating_add(h.net));
    let room = new.map_or(0, |(n, used)| {
        i64::try_from(n.capacity.saturating_sub(used)).unwrap_or(i64::MAX)
    });
    let taken = total.min(room);
    let mut moves: Vec<Move> = old
        .iter()
        .map(|h| Move {
            pack_id: h.pack_id.clone(),
            source: h.source,
            delta: -h.net,
        })
        .collect();
    if let Some((n, _)) = new.filter(|_| taken > 0) {
        moves.push(Move {
            pack_id: n.pack_id.to_string(),
            source: Some(PackSource::FreeTier),
            delta: taken,
        });
    }
    let overage_delta = total - taken - overage;
    if overage_delta != 0 {
        moves.push(Move {
            pack_id: String::new(),
            source: None,
            delta: overage_delta,
        });
    }
    moves
}

/// The start of the hour holding `ts`.
pub fn hour_floor(ts: Ts) -> Ts {
    ts.div_euclid(HOUR) * HOUR
}

/// The spans of one account's recalculation: from `from` (the start of the
/// month holding the plan's instant) to `until` (the next plan's cut, or
/// the end of the last hour that can hold usage), cut by the new plan's
/// `months` (each with its two packs); the gaps between have no pack.
/// Bounds are rounded down to hours, since usage rows are hourly.
pub fn spans(from: Ts, until: Ts, months: &[(Ts, Ts, [PackSpec; 2])]) -> Vec<Span> {
    let mut out: Vec<Span> = Vec::new();
    let mut push = |a: Ts, b: Ts, packs: Vec<PackSpec>| {
        let (a, b) = (hour_floor(a), hour_floor(b));
        if a < b {
            out.push(Span {
                from: a,
                until: b,
                packs,
            });
        }
    };
    let mut at = from;
    for (m_from, m_until, packs) in months {
        let (m_from, m_until) = ((*m_from).max(from), (*m_until).min(until));
        if m_from >= m_until || m_until <= at {
            continue;
        }
        if at < m_from {
            push(at, m_from, Vec::new());
        }
        push(m_from.max(at), m_until, packs.to_vec());
        at = m_until;
    }
    if at < until {
        push(at, until, Vec::new());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pack(id: &str, capacity: u64) -> PackSpec {
        PackSpec {
            pack_id: id.into(),
            source: PackSource::FreeTier,
            item: Item::Calls,
            capacity,
            valid_from: 0,
            valid_until: HOUR,
            priority: 0,
            created_at: 0,
        }
    }

    fn held(id: &str, net: i64) -> Held {
        Held {
            pack_id: id.into(),
            source: (!id.is_empty()).then_some(PackSource::FreeTier),
            net,
        }
    }

    fn sum(moves: &[Move]) -> i64 {
        moves.iter().map(|m| m.delta).sum()
    }

    #[test]
    fn overage_and_the_old_pack_move_to_the_new_pack_up_to_its_capacity() {
        let new = pack("new", 1_000);
        let moves = rededuct(Some((&new, 100)), &[held("old", 300), held("", 800)]);
        // 1,100 to move, 900 of room: 200 stays overage.
        assert_eq!(
            moves,
            vec![
                Move {
                    pack_id: "old".into(),
                    source: Some(PackSource::FreeTier),
                    delta: -300
                },
                Move {
                    pack_id: "new".into(),
                    source: Some(PackSource::FreeTier),
                    delta: 900
                },
                Move {
                    pack_id: String::new(),
                    source: None,
                    delta: -600
                },
            ]
        );
        assert_eq!(sum(&moves), 0);
    }

    #[test]
    fn a_second_run_moves_nothing() {
        let new = pack("new", 1_000);
        let first = rededuct(Some((&new, 100)), &[held("old", 300), held("", 800)]);
        // What the rows hold afterwards, net of the first run's moves.
        let after = [held("old", 0), held("new", 1_000), held("", 200)];
        assert_eq!(rededuct(Some((&new, 1_000)), &after), vec![]);
        assert_eq!(sum(&first), 0);
        // A span that fitted entirely: also nothing the second time.
        let small = rededuct(Some((&new, 0)), &[held("", 10)]);
        assert_eq!(small.len(), 2);
        assert_eq!(
            rededuct(Some((&new, 10)), &[held("new", 10), held("", 0)]),
            vec![]
        );
    }

    #[test]
    fn without_a_new_pack_the_old_packs_usage_becomes_overage() {
        let moves = rededuct(None, &[held("old", 40), held("", 5)]);
        assert_eq!(sum(&moves), 0);
        assert_eq!(moves.len(), 2);
        assert_eq!(moves[1].delta, 40);
    }

    #[test]
    fn spans_cover_the_range_and_follow_the_months() {
        let p = || [pack("c", 1), pack("e", 1)];
        let s = spans(
            0,
            10 * HOUR,
            &[(2 * HOUR, 4 * HOUR, p()), (4 * HOUR + 30, 6 * HOUR, p())],
        );
        let bounds: Vec<_> = s
            .iter()
            .map(|s| (s.from / HOUR, s.until / HOUR, s.packs.len()))
            .collect();
        assert_eq!(bounds, vec![(0, 2, 0), (2, 4, 2), (4, 6, 2), (6, 10, 0)]);
    }
}
