//! The deduction itself: R1 (activation), R6 (order), R7 (deny), R9 (event
//! time, against the fresh clock and the settled mark) and R10 (request ids).
//!
//! [`Meter::deduct_all`] takes a group of charges whose accounts are
//! already resident and deducts them under one [`Pass`](super::gate::Pass)
//! of the gate, synchronously: no I/O, no `.await`.

use std::{
    collections::HashMap,
    sync::{atomic::Ordering::Relaxed, Arc},
};

use parking_lot::MutexGuard;

use super::{
    account::NOT_ACTIVATED,
    dedup::{Amounts, Claim},
    AccountState, Decision, DeductOutcome, Deduction, DenyReason, ItemOutcome, Meter, MeterError,
    UnknownAccounts,
};
use crate::{
    calendar::{self, hour_start, Ts},
    ledger::{DedupRecord, LEDGER_CAP},
    packs::{self, Deducted, Item, PackCounter, PackSource, Split},
};
use arc_swap::Guard;

use super::account::SharedPackList;

/// One deduction of a group, with its resident account.
#[derive(Clone, Copy)]
pub struct Charge<'a> {
    pub account: &'a Arc<AccountState>,
    pub deduction: Deduction<'a>,
}

/// How a group's charges relate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Atomicity {
    /// Each charge stands alone: `DeductBatch`, `DeductStream`, `Deduct`.
    Each,
    /// If any charge is denied, none is deducted: Envoy refuses the whole
    /// request when one descriptor is over the limit.
    AllOrNothing,
}

/// A charge's request id, as the claims found it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Id {
    /// No request id, or a check.
    None,
    /// Claimed for this charge.
    Claimed,
    /// Already processed: answer with these amounts.
    Done(Amounts),
    /// The same (account, request id) as an earlier charge of this group.
    SameAs(usize),
}

impl Meter {
    /// Deducts one charge: [`deduct_all`](Self::deduct_all) for a group of
    /// one, without its allocations (the unary hot path).
    pub fn deduct(
        &self,
        account: &Arc<AccountState>,
        deduction: &Deduction<'_>,
        now: Ts,
    ) -> Result<DeductOutcome, MeterError> {
        let c = Charge {
            account,
            deduction: *deduction,
        };
        let at = deduction.at.unwrap_or(now);
        // Rare: the group path, which activates, moves the activation back
        // or replaces the pack list with no other deduction in progress.
        let group = || {
            let [o] = self
                .deduct_all(std::slice::from_ref(&c), now, Atomicity::Each)
                .map_err(|(_, e)| e)?[..]
            else {
                unreachable!("one outcome per charge")
            };
            Ok(o)
        };
        if exclusive(&c, now, Atomicity::Each) {
            return group();
        }
        let pass = self.gate.enter().map_err(|_| MeterError::ShuttingDown)?;
        // Under the pass, so that nothing replaces the list until it is
        // dropped (see `AccountState::packs`).
        let Some(packs) = self.current_packs(account, at, now) else {
            drop(pass);
            return group();
        };
        self.validate_time(at, now, pass.settled_before)?;
        let id = self
            .claim_id(&c, at, now)
            .ok_or_else(|| MeterError::DuplicateInFlight(deduction.request_id.into()))?;
        let hour = hour_start(at);
        let reserved = match id {
            Id::Done(_) => false,
            _ => self
                .reserve(&c, hour, self.closed_before(now))
                .inspect_err(|_| self.release(&c, id))?,
        };
        let o = self.one(&c, (at, hour), now, id, reserved, false, Some(packs));
        drop(pass);
        Ok(o)
    }

    /// One charge that stands alone, at `at` in `hour` (its hour), its id
    /// already claimed and, if `reserved`, its amounts counted into the
    /// hour's totals. With
    /// `exclusive` (no other deduction in progress), an event before the
    /// activation moves it back first (R1), and back again if the event
    /// takes nothing: a check or a denial changes nothing. `packs`, under
    /// a pass only: the account's list, found current (see `take`).
    // One argument past clippy's limit: the unary path's list rides along
    // instead of being read twice (an `ArcSwap` load, issue 10's hot bar).
    #[allow(clippy::too_many_arguments)]
    // Inline in its two callers, as `take` is in it: the calls' prologues,
    // epilogues and the outcome's copies out cost a batched deduction about
    // 50 instructions (callgrind).
    #[inline(always)]
    fn one(
        &self,
        c: &Charge<'_>,
        (at, hour): (Ts, Ts),
        now: Ts,
        id: Id,
        reserved: bool,
        exclusive: bool,
        packs: Option<Guard<SharedPackList>>,
    ) -> DeductOutcome {
        debug_assert!(!(exclusive && packs.is_some()), "a list read before a move");
        if let Id::Done(r) = id {
            self.unreserve(c, at, reserved);
            return self.duplicate(c.account, at, now, r);
        }
        let moved = exclusive
            .then(|| self.move_back(c.account, at, now))
            .flatten();
        let _deny_lock = (c.deduction.calls > 0 && c.account.deny_on_exhausted.load(Relaxed))
            .then(|| c.account.deny_lock.lock());
        // R7 can deny only calls, of a suspended or `deny` account: the
        // common charge skips the group's walk (see `denial`).
        let a = c.account;
        let plain = c.deduction.calls == 0
            || !(a.suspended.load(Relaxed) || a.deny_on_exhausted.load(Relaxed));
        let denied = match plain {
            true => None,
            false => self.denial(std::slice::from_ref(c), std::slice::from_ref(&at), now),
        };
        let o = match denied {
            Some((_, reason)) => {
                self.unreserve(c, at, reserved);
                self.deny(c, at, now, id, reason)
            }
            None => self.take(c, (at, hour), now, id == Id::Claimed, packs, !exclusive),
        };
        if let Some(saved) = moved {
            if o.decision == Decision::Allow && !c.deduction.is_check() {
                // The account row must be written with the new activation.
                self.record(c.account, |p| p.account_dirty = true);
            } else {
                self.restore(c.account, saved);
            }
        }
        o
    }

    /// Deducts a group of charges at `now`, the server clock read after the
    /// accounts were loaded. This is the only place a deduction is
    /// acknowledged.
    ///
    /// An error names the charge it is about and means nothing was
    /// deducted: an event time that is no longer acceptable (R9), a request
    /// id whose original is still in flight, or shutdown.
    pub fn deduct_all(
        &self,
        charges: &[Charge<'_>],
        now: Ts,
        atomicity: Atomicity,
    ) -> Result<Vec<DeductOutcome>, (usize, MeterError)> {
        // An event before its account's activation moves it back (R1),
        // which replaces counters, and a first deduction activates the
        // account: both run with no other deduction in progress (see
        // `exclusive`). Envoy's all-or-nothing groups carry no event time.
        // So does a charge whose account's pack list must change first (a
        // month's free-tier packs appear, an ended month's leave): its
        // counters are replaced (see `AccountState::packs`). That is
        // checked under the pass, since nothing replaces a list while one
        // is held; once per account and month.
        {
            let pass = self
                .gate
                .enter()
                .map_err(|_| (0, MeterError::ShuttingDown))?;
            // One walk of the group for both questions (a charge needing
            // the exclusive section is rare, and its pass is simply dropped).
            if charges.iter().all(|c| {
                !exclusive(c, now, atomicity)
                    && self.packs_current(c.account, c.deduction.at.unwrap_or(now), now)
            }) {
                let outcomes =
                    self.deduct_group(charges, now, atomicity, pass.settled_before, false);
                drop(pass);
                return outcomes;
            }
        }
        self.gate.exclusive(|settled_before, closed| {
            if closed {
                return Err((0, MeterError::ShuttingDown));
            }
            self.deduct_group(charges, now, atomicity, settled_before, true)
        })
    }

    /// [`deduct_all`](Self::deduct_all) under a pass, or, with `exclusive`,
    /// with no other deduction in progress.
    fn deduct_group(
        &self,
        charges: &[Charge<'_>],
        now: Ts,
        atomicity: Atomicity,
        settled_before: Ts,
        exclusive: bool,
    ) -> Result<Vec<DeductOutcome>, (usize, MeterError)> {
        let mut ats = Vec::with_capacity(charges.len());
        // Each charge's hour, computed once (a division) and shared by its
        // reservation and its ledger entry.
        let mut hours = Vec::with_capacity(charges.len());
        // Most charges carry no event time: their hour is the clock's,
        // checked once for the group.
        let clock_hour = hour_start(now);
        let mut clock_checked = false;
        for (i, c) in charges.iter().enumerate() {
            let at = match c.deduction.at {
                Some(at) => self.validate_time(at, now, settled_before),
                None if clock_checked => Ok(now),
                None => {
                    clock_checked = true;
                    self.validate_time(now, now, settled_before)
                }
            }
            .map_err(|e| (i, e))?;
            ats.push(at);
            hours.push(match c.deduction.at {
                None => clock_hour,
                Some(at) => hour_start(at),
            });
        }
        if exclusive {
            // The pack list changes here, not under a pass (see
            // `AccountState::packs`): a month's packs appear, and an ended
            // month's leave (which a deduction's own read of the list
            // would not notice).
            for (c, &at) in charges.iter().zip(&ats) {
                self.ensure_free_month(c.account, at, now);
            }
        }
        let mut ids = self.claim_ids(charges, &ats, now)?;
        // Every charge that may be taken is counted into its hour's totals
        // before any is taken, so a group the ledger cap refuses changes
        // nothing; those that end up not taken are released below.
        // (Zipped rather than indexed here and below: a bounds check per
        // vector and charge was about 14 instructions a batched deduction.)
        let mut reserved = Vec::with_capacity(charges.len());
        let closed_before = self.closed_before(now);
        for (i, ((c, &hour), id)) in charges.iter().zip(&hours).zip(&ids).enumerate() {
            let r = match id {
                Id::Done(_) => Ok(false),
                _ => self.reserve(c, hour, closed_before),
            };
            match r {
                Ok(r) => reserved.push(r),
                Err(e) => {
                    // `reserved` holds the charges before this one.
                    for (k, c) in charges.iter().enumerate() {
                        self.unreserve(c, ats[k], reserved.get(k) == Some(&true));
                        self.release(c, ids[k]);
                    }
                    return Err((i, e));
                }
            }
        }

        let outcomes = match atomicity {
            Atomicity::Each => {
                let mut out: Vec<DeductOutcome> = Vec::with_capacity(charges.len());
                let each = charges.iter().zip(&ats).zip(&hours).zip(&reserved);
                for ((((c, &at), &hour), &reserved), id) in each.zip(&mut ids) {
                    if let Id::SameAs(j) = *id {
                        // A repeat inside the group: the earlier charge's
                        // result, or, if it was denied, a fresh evaluation.
                        *id = match out[j].decision {
                            Decision::Allow => Id::Done(amounts(&out[j])),
                            // Only this group could hold it, and it released it.
                            Decision::Deny(_) => self.claim_id(c, at, now).unwrap_or(Id::None),
                        };
                    }
                    out.push(self.one(c, (at, hour), now, *id, reserved, exclusive, None));
                }
                out
            }
            Atomicity::AllOrNothing => {
                let locks = self.deny_locks(charges);
                let denied = self.denial(charges, &ats, now);
                let mut out: Vec<DeductOutcome> = Vec::with_capacity(charges.len());
                for (i, c) in charges.iter().enumerate() {
                    let taken = match (ids[i], denied) {
                        (Id::Done(_), _) | (Id::SameAs(_), None) | (_, Some(_)) => false,
                        (_, None) => true,
                    };
                    if !taken {
                        self.unreserve(c, ats[i], reserved[i]);
                    }
                    let o = match (ids[i], denied) {
                        (Id::Done(r), _) => self.duplicate(c.account, ats[i], now, r),
                        // A repeat inside the group: the earlier charge's
                        // amounts, nothing deducted again.
                        (Id::SameAs(j), None) => {
                            self.duplicate(c.account, ats[i], now, amounts(&out[j]))
                        }
                        (_, Some((j, reason))) if j == i => {
                            self.deny(c, ats[i], now, ids[i], reason)
                        }
                        (id, Some(_)) => {
                            // Another charge was denied: this one checks only.
                            self.release(c, id);
                            self.check(c.account, ats[i], now)
                        }
                        (id, None) => {
                            let when = (ats[i], hours[i]);
                            self.take(c, when, now, id == Id::Claimed, None, !exclusive)
                        }
                    };
                    out.push(o);
                }
                drop(locks);
                out
            }
        };
        Ok(outcomes)
    }

    /// Claims every charge's request id before anything is deducted, so an
    /// in-flight original refuses the group while it has changed nothing.
    fn claim_ids(
        &self,
        charges: &[Charge<'_>],
        ats: &[Ts],
        now: Ts,
    ) -> Result<Vec<Id>, (usize, MeterError)> {
        let mut ids = vec![Id::None; charges.len()];
        // The first charge of the group for each (account, request id).
        let mut first: HashMap<(usize, &str), usize> = HashMap::new();
        for (i, c) in charges.iter().enumerate() {
            let d = &c.deduction;
            if d.request_id.is_empty() || d.is_check() {
                continue;
            }
            let key = (Arc::as_ptr(c.account) as usize, d.request_id);
            ids[i] = match first.get(&key) {
                Some(&j) => match ids[j] {
                    Id::Done(r) => Id::Done(r),
                    _ => Id::SameAs(j),
                },
                None => {
                    first.insert(key, i);
                    let Some(id) = self.claim_id(c, ats[i], now) else {
                        for (k, claimed) in ids.iter().enumerate().take(i) {
                            self.release(&charges[k], *claimed);
                        }
                        return Err((i, MeterError::DuplicateInFlight(d.request_id.into())));
                    };
                    id
                }
            };
        }
        Ok(ids)
    }

    /// How long a request id processed at `now` for an event at `at` is
    /// remembered (R10): the window, and at least until the event's hour
    /// closes, since until then a retry of the event would be accepted.
    fn dedup_expiry(&self, at: Ts, now: Ts) -> Ts {
        now.saturating_add(self.cfg.dedup_window)
            .max(self.hour_closes(at))
    }

    /// Claims the charge's request id, if it has one: `None` while the
    /// original is still in flight.
    fn claim_id(&self, c: &Charge<'_>, at: Ts, now: Ts) -> Option<Id> {
        let d = &c.deduction;
        if d.request_id.is_empty() || d.is_check() {
            return Some(Id::None);
        }
        let claim = c.account.dedup().claim(
            d.request_id,
            now,
            self.dedup_expiry(at, now),
            self.cfg.dedup_window / 8,
        );
        match claim {
            Claim::Fresh => Some(Id::Claimed),
            Claim::Duplicate(r) => Some(Id::Done(r)),
            Claim::InFlight => None,
        }
    }

    /// Counts the charge's amounts into its account's totals for `hour`
    /// (the hour of its event), or refuses it if they would take the hour
    /// past the ledger cap. `Ok(false)` for a check, which counts nothing.
    /// `closed_before` is [`closed_before`](Self::closed_before) at the
    /// deduction's `now`, read once for a group.
    fn reserve(&self, c: &Charge<'_>, hour: Ts, closed_before: Ts) -> Result<bool, MeterError> {
        let d = &c.deduction;
        if d.is_check() {
            return Ok(false);
        }
        let amounts = [d.calls, d.egress_bytes];
        let reserved = c
            .account
            .pending
            .lock()
            .totals()
            .reserve(hour, amounts, closed_before);
        reserved.map(|()| true).map_err(|e| MeterError::LedgerFull {
            account: c.account.id.to_string(),
            hour: calendar::to_datetime(hour).to_rfc3339(),
            item: e.item,
            recorded: e.recorded,
            amount: match e.item {
                Item::Calls => d.calls,
                Item::EgressBytes => d.egress_bytes,
            },
            cap: LEDGER_CAP,
        })
    }

    /// Takes back a [`reserve`](Self::reserve) whose charge was not taken.
    fn unreserve(&self, c: &Charge<'_>, at: Ts, reserved: bool) {
        if reserved {
            let d = &c.deduction;
            c.account
                .pending
                .lock()
                .totals()
                .release(hour_start(at), [d.calls, d.egress_bytes]);
        }
    }

    fn release(&self, c: &Charge<'_>, id: Id) {
        if id == Id::Claimed {
            if let Some(mut t) = c.account.dedup_if_any() {
                t.release(c.deduction.request_id);
            }
        }
    }

    /// Locks the deny lock of every `deny` account that the group charges
    /// calls to, in address order so that groups cannot deadlock.
    fn deny_locks<'a>(&self, charges: &[Charge<'a>]) -> Vec<MutexGuard<'a, ()>> {
        let mut accounts: Vec<&'a Arc<AccountState>> = charges
            .iter()
            .filter(|c| c.deduction.calls > 0 && c.account.deny_on_exhausted.load(Relaxed))
            .map(|c| c.account)
            .collect();
        accounts.sort_by_key(|a| Arc::as_ptr(a) as usize);
        accounts.dedup_by(|a, b| Arc::ptr_eq(a, b));
        accounts.into_iter().map(|a| a.deny_lock.lock()).collect()
    }

    /// The first charge R7 denies, counting what earlier charges of the
    /// group take from the same account. Takes nothing. For `deny` accounts
    /// the caller holds their deny locks, so what this sees stays there.
    fn denial(&self, charges: &[Charge<'_>], ats: &[Ts], now: Ts) -> Option<(usize, DenyReason)> {
        // Calls wanted so far per deny account, by address.
        let mut wanted: Vec<(usize, u64)> = Vec::new();
        for (i, c) in charges.iter().enumerate() {
            let (a, d) = (c.account, &c.deduction);
            if d.calls == 0 {
                continue;
            }
            if a.suspended.load(Relaxed) {
                return Some((i, DenyReason::Suspended));
            }
            if !a.deny_on_exhausted.load(Relaxed) {
                continue;
            }
            // Operators create `deny` accounts with PutAccount, which
            // activates them, so their packs can be made resident here.
            let at = ats[i];
            self.ensure_free_month(a, at, now);
            let packs = a.packs.load();
            if packs::remaining(&packs, Item::EgressBytes, at) == 0 {
                return Some((i, DenyReason::EgressExhausted));
            }
            let key = Arc::as_ptr(a) as usize;
            let before = wanted.iter().find(|w| w.0 == key).map_or(0, |w| w.1);
            let want = before.saturating_add(d.calls);
            if packs::remaining(&packs, Item::Calls, at) < want || !self.lease_covers(a, want, now)
            {
                return Some((i, DenyReason::CallsExhausted));
            }
            match wanted.iter_mut().find(|w| w.0 == key) {
                Some(w) => w.1 = want,
                None => wanted.push((key, want)),
            }
        }
        None
    }

    /// Activates an account at its first deduction (R1): at the event
    /// time, but never later than the server clock. An activated account's
    /// activation moves back in [`one`](Self::one).
    // Inline: called for every charge taken, and nearly always a load and
    // a comparison.
    #[inline]
    fn activate(&self, acct: &Arc<AccountState>, at: Ts, now: Ts) {
        // Load first: after the first deduction the CAS would always fail,
        // and a failed CAS still takes the cache line exclusively.
        if acct.activated_at.load(Relaxed) == NOT_ACTIVATED
            && acct
                .activated_at
                .compare_exchange(NOT_ACTIVATED, at.min(now), Relaxed, Relaxed)
                .is_ok()
        {
            self.record(acct, |p| {
                p.account_dirty = true;
                p.note_since(now);
            });
        }
    }

    /// Changes the account's unflushed ledger and queues the account for a
    /// flush if it was not queued yet.
    fn record(&self, acct: &Arc<AccountState>, change: impl FnOnce(&mut crate::ledger::Pending)) {
        let newly_queued = {
            let mut slot = acct.pending.lock();
            if crate::journal::capturing() {
                // Journal mode: the change goes through a scratch ledger so
                // the journal gets exactly what the account's ledger gets.
                let mut change_alone = crate::ledger::Pending::default();
                change(&mut change_alone);
                crate::journal::captured(super::account::to_flush(acct, &change_alone));
                slot.changes().merge(change_alone);
            } else {
                change(slot.changes());
            }
            !slot.set_queued(true)
        };
        if newly_queued {
            self.enqueue(acct);
        }
    }

    fn deny(&self, c: &Charge<'_>, at: Ts, now: Ts, id: Id, reason: DenyReason) -> DeductOutcome {
        self.release(c, id);
        let mut o = self.check(c.account, at, now);
        o.decision = Decision::Deny(reason);
        o
    }

    /// Takes the charge from the packs at `at` and records it in the
    /// ledger under `hour`, the hour of `at`.
    ///
    /// `packs` is the list the caller found current under its pass (the
    /// unary path, which reads it once), or `None` to read it here: as it
    /// is if `current` (under a pass, where `deduct_all` found every
    /// charge's list current), else with its free-tier month made resident.
    #[inline(always)]
    fn take(
        &self,
        c: &Charge<'_>,
        (at, hour): (Ts, Ts),
        now: Ts,
        claimed: bool,
        packs: Option<Guard<SharedPackList>>,
        current: bool,
    ) -> DeductOutcome {
        let (acct, d) = (c.account, &c.deduction);
        if d.is_check() {
            return self.check(acct, at, now);
        }
        self.activate(acct, at, now);
        let packs = match packs {
            Some(packs) => packs,
            // Found current under the pass, which nothing replaces it
            // during: `packs_at` would read the same list, after a walk.
            None if current => acct.packs.load(),
            None => self.packs_at(acct, at, now),
        };
        let mut deducted = Deducted::default();
        packs::deduct(&packs, at, [d.calls, d.egress_bytes], &mut deducted);
        let Deducted {
            splits: [calls, egress],
            totals,
        } = &deducted;
        let result = [calls.covered, calls.overage, egress.covered, egress.overage];
        debug_assert_eq!(hour, hour_start(at));
        self.lease_take(acct, d.calls);
        self.record(acct, |p| {
            for (item, split) in [(Item::Calls, calls), (Item::EgressBytes, egress)] {
                for &(i, amount) in &split.takes {
                    p.add(hour, item, Some((&packs, i)), amount, now, at);
                }
                if split.overage > 0 {
                    p.add(hour, item, None, split.overage, now, at);
                }
            }
            if claimed {
                p.dedup.push(DedupRecord {
                    request_id: d.request_id.into(),
                    expires_at: self.dedup_expiry(at, now),
                    hour: Some(hour),
                    calls_covered: result[0],
                    calls_overage: result[1],
                    egress_covered: result[2],
                    egress_overage: result[3],
                });
            }
        });
        if claimed {
            if let Some(mut t) = acct.dedup_if_any() {
                t.complete(d.request_id, result);
            }
        }
        let item = |split: &Split, (limit, remaining): (u64, u64)| ItemOutcome {
            covered: split.covered,
            overage: split.overage,
            remaining,
            limit,
        };
        DeductOutcome {
            decision: Decision::Allow,
            calls: item(calls, totals[0]),
            egress_bytes: item(egress, totals[1]),
            duplicate: false,
        }
    }

    /// The account's packs, with the free-tier month of `at` made resident
    /// ([`ensure_free_month`](Self::ensure_free_month)). In the common case,
    /// a resident free-tier pack valid at `at`, the list is read once.
    /// Under a pass the caller has found [`packs_current`](Self::packs_current),
    /// so the list is not replaced here.
    fn packs_at(&self, acct: &AccountState, at: Ts, now: Ts) -> Guard<SharedPackList> {
        let packs = acct.packs.load();
        if packs
            .iter()
            .any(|p| p.source() == PackSource::FreeTier && p.valid_at(at))
        {
            return packs;
        }
        drop(packs);
        self.ensure_free_month(acct, at, now);
        acct.packs.load()
    }

    /// A repeat of a processed request id: nothing is deducted again.
    fn duplicate(&self, acct: &AccountState, at: Ts, now: Ts, r: Amounts) -> DeductOutcome {
        let mut o = self.check(acct, at, now);
        o.decision = Decision::Allow;
        o.duplicate = true;
        (o.calls.covered, o.calls.overage) = (r[0], r[1]);
        (o.egress_bytes.covered, o.egress_bytes.overage) = (r[2], r[3]);
        o
    }

    /// `calls = 0, egress_bytes = 0`: the decision the next call would get,
    /// and the balances. Deducts, activates and records nothing.
    fn check(&self, acct: &AccountState, at: Ts, now: Ts) -> DeductOutcome {
        let packs = self.packs_at(acct, at, now);
        let mut o = balances(&packs, at);
        if acct.activated_at().is_none()
            && self.cfg.unknown_accounts == UnknownAccounts::Activate
            && self.cfg.free_month_at(at, at).is_some()
        {
            // The first deduction would activate the account at `at`.
            let tier = self.cfg.tier_at(at);
            for (o, plan) in [
                (&mut o.calls, tier.calls),
                (&mut o.egress_bytes, tier.egress_bytes),
            ] {
                o.remaining = o.remaining.saturating_add(plan);
                o.limit = o.limit.saturating_add(plan);
            }
        }
        if acct.suspended.load(Relaxed) {
            o.decision = Decision::Deny(DenyReason::Suspended);
        } else if acct.deny_on_exhausted.load(Relaxed) {
            if o.egress_bytes.remaining == 0 {
                o.decision = Decision::Deny(DenyReason::EgressExhausted);
            } else if o.calls.remaining == 0 {
                o.decision = Decision::Deny(DenyReason::CallsExhausted);
            }
        }
        o
    }
}

/// Whether the charge's event is before its account's activation, which
/// it would move back (R1). A relaxed read: the move itself checks again.
/// Whether a charge must run with no other deduction in progress (under
/// [`Gate::exclusive`](super::gate::Gate::exclusive)):
/// - its event is before its account's activation, which moves back (R1)
///   and replaces counters (groups of `Each` only);
/// - or its account is not activated yet, and this deduction activates it.
///   Two first deductions under passes could otherwise interleave: the one
///   whose clock was read first finds the account not activated, the other
///   activates it at its later instant, and the first is then taken at an
///   instant before the activation, where no free-tier pack is valid, and
///   billed as overage instead of moving the activation back. Once per
///   account: the activation never moves forward afterwards, so a pass
///   that finds `at >= activated_at` stays right.
fn exclusive(c: &Charge<'_>, now: Ts, atomicity: Atomicity) -> bool {
    let activated = c.account.activated_at.load(Relaxed);
    (activated == NOT_ACTIVATED && !c.deduction.is_check())
        || (atomicity == Atomicity::Each && c.deduction.at.unwrap_or(now) < activated)
}

fn amounts(o: &DeductOutcome) -> Amounts {
    [
        o.calls.covered,
        o.calls.overage,
        o.egress_bytes.covered,
        o.egress_bytes.overage,
    ]
}

/// What `packs` hold at `at`, as an allowed outcome that covers nothing:
/// a check's answer before its flags are applied.
fn balances(packs: &[PackCounter], at: Ts) -> DeductOutcome {
    let item = |item| {
        let (limit, remaining) = packs::totals(packs, item, at);
        ItemOutcome {
            covered: 0,
            overage: 0,
            remaining,
            limit,
        }
    };
    DeductOutcome {
        decision: Decision::Allow,
        calls: item(Item::Calls),
        egress_bytes: item(Item::EgressBytes),
        duplicate: false,
    }
}
