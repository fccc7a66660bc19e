//! The packs a resident account holds: its free-tier months (R2–R4), built
//! from its activation, and the purchased packs an operator grants.

use std::{
    collections::HashMap,
    sync::{atomic::Ordering::Relaxed, Arc},
};

use super::{AccountState, Meter, MeterError, PackList, PackView, SharedPackList};
use crate::{
    calendar::{self, FreeMonth, Ts},
    packs::{counter_order, deduction_order, Item, PackCounter, PackSource, PackSpec},
    store::StoredPack,
};
use arc_swap::Guard;

/// Whether a pack of `packs` has ended before `keep_after`: it can take no
/// more deductions, and only waits for the list's next replacement.
fn has_ended(packs: &PackList, keep_after: Ts) -> bool {
    packs.iter().any(|p| p.valid_until() <= keep_after)
}

/// An account's activation and packs before an R1 move, to put back if
/// the event that moved it takes nothing.
pub(super) struct Saved {
    activated_at: Ts,
    packs: SharedPackList,
}

impl Meter {
    /// The month's two packs, with the capacities of the plan that issued
    /// it; a plan after the first names itself in the ids (crate::plans).
    pub fn free_specs(&self, m: &FreeMonth) -> [PackSpec; 2] {
        let (tier, name, suffixed) = self.cfg.month_plan(m);
        [
            PackSpec::free_tier(m, Item::Calls, tier.calls),
            PackSpec::free_tier(m, Item::EgressBytes, tier.egress_bytes),
        ]
        .map(|mut spec| {
            if suffixed {
                spec.pack_id = format!("{}@{name}", spec.pack_id).into();
            }
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

    /// Whether a free-tier month can take deductions at `now`: its end is
    /// not yet closed, and it has started or starts within the future skew
    /// (an event that far ahead is accepted, R9).
    pub(super) fn month_is_live(&self, m: &FreeMonth, now: Ts) -> bool {
        m.valid_until > self.keep_after(now)
            && m.valid_from <= now.saturating_add(self.cfg.max_future_skew)
    }

    /// Whether [`ensure_free_month`](Self::ensure_free_month) would leave
    /// the account's list as it is for a deduction at `at`: no pack has
    /// ended for good, and the free-tier month holding `at` is resident or
    /// there is none. A deduction that finds `false` under a pass runs
    /// under `Gate::exclusive` instead (`Meter::deduct_all`): the list holds
    /// its counters by value, and replacing it during a deduction would
    /// lose that deduction's take. Nothing replaces the list while a pass
    /// is held, so what this finds under a pass stays true until the pass
    /// is dropped.
    pub(super) fn packs_current(&self, acct: &AccountState, at: Ts, now: Ts) -> bool {
        self.current_packs(acct, at, now).is_some()
    }

    /// The account's list if it is [current](Self::packs_current), read
    /// once: the unary deduction takes from the list it checked.
    pub(super) fn current_packs(
        &self,
        acct: &AccountState,
        at: Ts,
        now: Ts,
    ) -> Option<Guard<SharedPackList>> {
        let packs = acct.packs.load();
        (!has_ended(&packs, self.keep_after(now))
            && self.missing_free_month(acct, &packs, at).is_none())
        .then_some(packs)
    }

    /// The free-tier month holding `at`, if the account has one and its
    /// packs are not in `packs`.
    fn missing_free_month(
        &self,
        acct: &AccountState,
        packs: &PackList,
        at: Ts,
    ) -> Option<FreeMonth> {
        let a = acct.activated_at()?;
        // Fast path, and the common case: a resident free-tier pack is valid
        // at `at`. Free-tier months do not overlap, so it belongs to the
        // month `free_month_at` would compute, and that month's packs are
        // resident. This skips the calendar arithmetic (about 160 ns).
        if packs
            .iter()
            .any(|p| p.source() == PackSource::FreeTier && p.valid_at(at))
        {
            return None;
        }
        let m = self.cfg.free_month_at(a, at)?;
        let present = packs
            .iter()
            .any(|p| p.source() == PackSource::FreeTier && p.valid_from() == m.valid_from);
        (!present).then_some(m)
    }

    /// Makes sure the free-tier packs of the month holding `at` are
    /// resident, and drops packs that can take no more deductions (an
    /// account resident across a month boundary would otherwise carry the
    /// month before's counters until its list is next replaced, a month
    /// later). Replaces the list, so only with no deduction in progress
    /// (`Gate::exclusive`): under a pass, callers have found
    /// [`packs_current`](Self::packs_current), and this changes nothing.
    pub(super) fn ensure_free_month(&self, acct: &AccountState, at: Ts, now: Ts) {
        let keep_after = self.keep_after(now);
        let (ended, month) = {
            let packs = acct.packs.load();
            (
                has_ended(&packs, keep_after),
                self.missing_free_month(acct, &packs, at),
            )
        };
        if !ended && month.is_none() {
            return;
        }
        // A month that appears while the account is resident has recorded
        // nothing yet (its earlier usage would have loaded it), so it starts at 0.
        let specs = month.map(|m| self.free_specs(&m));
        acct.merge_packs(
            || {
                specs
                    .iter()
                    .flatten()
                    .map(|s| PackCounter::new(s.clone(), 0))
                    .collect()
            },
            keep_after,
        );
    }

    /// [`ensure_free_month`](Self::ensure_free_month) at `now`, from outside
    /// any deduction (a lease request): takes the exclusive section if the
    /// list must change. Never call it while holding a pass.
    pub(super) fn ensure_free_month_now(&self, acct: &AccountState, now: Ts) {
        if !self.packs_current(acct, now, now) {
            self.gate
                .exclusive(|_, _| self.ensure_free_month(acct, now, now));
        }
    }

    /// Applies an operator's account settings to a resident account; the
    /// caller has written them to the store. `activation` is `None` to keep
    /// the current one.
    ///
    /// An activation that differs from the current one is refused, changing
    /// nothing, once the account has unflushed usage: that usage was split
    /// against the packs the current activation defines (R1). (The caller
    /// checks the store's usage, with flushes held off.) It runs while no
    /// deduction is in progress, so the rebuilt counters lose no concurrent
    /// take.
    pub fn apply_account(
        &self,
        acct: &AccountState,
        activation: Option<Ts>,
        suspended: bool,
        deny_on_exhausted: bool,
        now: Ts,
    ) -> Result<(), MeterError> {
        self.gate.exclusive(|_, _| {
            let moves = activation.filter(|a| Some(*a) != acct.activated_at());
            if moves.is_some() {
                let first = acct.pending.lock().get().and_then(|p| p.oldest_hour());
                if let Some(hour) = first {
                    return Err(MeterError::ActivationLocked {
                        account: acct.id.to_string(),
                        first_usage: calendar::to_datetime(hour).to_rfc3339(),
                    });
                }
            }
            acct.suspended.store(suspended, Relaxed);
            acct.deny_on_exhausted.store(deny_on_exhausted, Relaxed);
            if let Some(a) = moves {
                acct.activated_at.store(a, Relaxed);
                self.rebuild_free_months(acct, Some(a), now);
            }
            Ok(())
        })
    }

    /// R1: an accepted event at `t`, before the activation A, moves A back
    /// to `t`. Called with no deduction in progress (under
    /// [`Gate::exclusive`](super::gate::Gate::exclusive)); returns what to
    /// [`restore`](Self::restore) if the event is not taken after all.
    ///
    /// Every event the account has had is at or after A, so moving A back
    /// changes no usage already attributed: the activation month's pack
    /// only starts earlier (same id, same counter value), and the months
    /// between are new and empty. The window's end moves back too, by at
    /// most a month; A stays where it is if the new end would not lie past
    /// every instant the account can have usage at (now plus the future
    /// skew), which needs a late grace of about the window's length.
    pub(super) fn move_back(&self, acct: &AccountState, t: Ts, now: Ts) -> Option<Saved> {
        let a = acct.activated_at().filter(|a| t < *a)?;
        let end = self.cfg.free_window_end(t);
        if end <= now.saturating_add(self.cfg.max_future_skew) {
            return None;
        }
        let saved = Saved {
            activated_at: a,
            packs: acct.packs.load_full(),
        };
        acct.activated_at.store(t, Relaxed);
        self.rebuild_free_months(acct, Some(t), now);
        Some(saved)
    }

    /// A plan was switched in ([`crate::recalc`]): rebuilds the free-tier
    /// packs of every resident account under the plans now in force, with
    /// no deduction in progress. Usage is carried by pack id, so a pack the
    /// new plan replaces leaves (its unflushed usage stays in the ledger)
    /// and the new plan's packs start from what this node knows: nothing,
    /// until the recalculation rebases them on the store.
    pub fn rebuild_all_free_months(&self, now: Ts) {
        self.gate.exclusive(|_, _| {
            for entry in self.accounts.iter() {
                let acct = &entry.key().0;
                self.rebuild_free_months(acct, acct.activated_at(), now);
            }
        });
    }

    /// Undoes a [`move_back`](Self::move_back) whose event took nothing (a
    /// check, a denial). Still under the same exclusive section.
    pub(super) fn restore(&self, acct: &AccountState, saved: Saved) {
        acct.activated_at.store(saved.activated_at, Relaxed);
        acct.packs.store(saved.packs);
    }

    /// The free months moved: rebuilds every live one, carrying usage by
    /// pack id. "Live" includes a month that starts within the future skew:
    /// an early event may already have used it, and dropping it would
    /// re-create it later at zero. Only with no deduction in progress: the
    /// counters are replaced.
    fn rebuild_free_months(&self, acct: &AccountState, activated_at: Option<Ts>, now: Ts) {
        let months = activated_at
            .map(|a| self.cfg.free_months(a))
            .unwrap_or_default();
        let keep_after = self.keep_after(now);
        acct.packs.rcu(|cur| {
            let old_used: HashMap<&str, u64> = cur
                .iter()
                .filter(|p| p.source() == PackSource::FreeTier)
                .map(|p| (&**p.pack_id(), p.used()))
                .collect();
            let mut next: PackList = cur
                .iter()
                .filter(|p| p.source() != PackSource::FreeTier)
                .map(PackCounter::copy)
                .collect();
            for m in months.iter().filter(|m| m.valid_until > keep_after) {
                let specs = self.free_specs(m);
                // A month with usage stays resident whenever it starts: if
                // it left, it would come back later at zero.
                let used = specs.each_ref().map(|s| old_used.get(&*s.pack_id).copied());
                if !self.month_is_live(m, now) && used.iter().all(|u| u.unwrap_or(0) == 0) {
                    continue;
                }
                for (spec, u) in specs.into_iter().zip(used) {
                    next.push(PackCounter::new(spec, u.unwrap_or(0)));
                }
            }
            next.sort_by(counter_order);
            next
        });
    }

    /// Rebases the counters of flushed accounts on the store's global
    /// totals ([`crate::store::Store::flush_batch`]), so that every node
    /// counts what all nodes used, not only its own deductions.
    ///
    /// **Invariant.** Between rebases, a counter holds `G + L`: `G`, the
    /// pack's global `used` the store returned at the last flush (or held
    /// at load), and `L`, what this node has taken from it since, flushed
    /// or not. A flush writes part of `L` (the batch taken from the
    /// ledger); the store's new total `G'` includes it, attributed and
    /// capped. The rest of `L` is still in the account's ledger, so the
    /// counter becomes `G' + ledger deltas for the pack`, at most the
    /// capacity.
    ///
    /// **Concurrency.** Deductions keep running during the flush, and one
    /// takes from the counter (a compare-and-swap) a moment before it
    /// records its delta in the ledger. An assignment made in between would
    /// forget the take (until the next rebase: the counter would show less
    /// than was used, and cover too much meanwhile), so the counters are
    /// set with no deduction in
    /// progress (`Gate::exclusive`, the section R1 moves use). That pause
    /// is paid only for accounts whose counters would change: the targets
    /// are computed first without it, and with one store (SQLite, or one
    /// node on PostgreSQL) `G'` is what this node flushed, so nothing
    /// changes, and the gate is never taken.
    ///
    /// Only resident packs are rebased; packs this node does not know (a
    /// grant made through another node) are not made resident here.
    pub fn rebase(&self, flushed: &[(Arc<AccountState>, &[StoredPack])], mut pause: impl FnMut()) {
        // Every account of a batch is looked at, outside the exclusive
        // section: `pause` may hand the core back between them.
        let stale: Vec<_> = flushed
            .iter()
            .filter(|(a, stored)| {
                pause();
                !a.rebase_targets(stored).is_empty()
            })
            .collect();
        if stale.is_empty() {
            return;
        }
        self.gate.exclusive(|_, _| {
            for (a, stored) in stale {
                // The targets name counters of the list as it is now, and
                // nothing replaces it within this section.
                let packs = a.packs.load();
                for (i, used) in a.rebase_targets(stored) {
                    packs[i].rebase(used);
                }
            }
        });
    }

    /// Makes a granted pack resident so deductions use it at once. Not
    /// during a deduction: one that moves the activation back may restore
    /// the pack list it saved (R1).
    pub fn add_pack(&self, acct: &AccountState, pack: &StoredPack, now: Ts) {
        self.gate.exclusive(|_, _| {
            acct.merge_packs(
                || vec![PackCounter::new(pack.spec.clone(), pack.used)],
                self.keep_after(now),
            );
        });
    }

    /// Every pack of the account, free tier and purchased, past, present and
    /// future, with live usage (R11), in R6 deduction order. `stored` is
    /// what the store holds.
    pub fn pack_views(&self, acct: &AccountState, stored: Vec<StoredPack>) -> Vec<PackView> {
        let resident = acct.packs.load();
        // A pack that has left the resident set (it ended) may still have
        // usage waiting for a flush: the ledger has it.
        let mut unflushed: HashMap<Arc<str>, u64> = HashMap::new();
        if let Some(p) = acct.pending.lock().get() {
            for d in p.deltas() {
                if let Some(pack) = d.pack() {
                    let e = unflushed.entry(pack.pack_id().clone()).or_default();
                    *e = e.saturating_add(d.amount);
                }
            }
        }
        // A stored total can exceed a capacity a newer plan shrank; show
        // it clamped, as the counters hold it.
        let live = |spec: &PackSpec, stored_used: u64| {
            resident
                .iter()
                .find(|p| *p.pack_id() == spec.pack_id)
                .map_or_else(
                    || {
                        let pending = unflushed.get(&spec.pack_id).copied().unwrap_or(0);
                        stored_used.saturating_add(pending).min(spec.capacity)
                    },
                    |p| p.used(),
                )
        };
        let mut views: Vec<PackView> = Vec::new();
        if let Some(a) = acct.activated_at() {
            for m in self.cfg.free_months(a) {
                let plan = self.cfg.month_plan(&m).1;
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
                        plan: Some(plan.clone()),
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
                plan: None,
            });
        }
        // R6 order, the order deductions use them: the free tier first
        // (month by month), then purchased packs by priority, expiry,
        // creation and id; calls before egress where nothing else differs.
        views.sort_by(|a, b| deduction_order(&a.spec, &b.spec).then(a.spec.item.cmp(&b.spec.item)));
        views
    }
}
