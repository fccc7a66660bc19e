//! Unflushed usage: per (account, hour, item, pack) deltas and new
//! idempotency keys, waiting for the next flush (R12).
//!
//! Each account keeps one [`Pending`]; the flusher takes it whole and, if the
//! store refuses the batch, [`merge`](Pending::merge)s it back, so a failed
//! flush loses nothing. Memory is bounded by the number of distinct
//! (hour, item, pack) keys an account touches between flushes, not by the
//! number of requests.

use std::sync::Arc;

use crate::{
    calendar::Ts,
    packs::{Item, PackCounter, PackSpec},
};

/// Usage not yet in the store, for one (hour, item, pack) of an account.
#[derive(Clone, Debug)]
pub struct Delta {
    /// Start of the UTC hour.
    pub hour: Ts,
    pub item: Item,
    /// The pack that covered the amount, or `None` for overage.
    pub pack: Option<Arc<PackCounter>>,
    pub amount: u64,
}

impl Delta {
    fn same_key(&self, hour: Ts, item: Item, pack: Option<&Arc<PackCounter>>) -> bool {
        self.hour == hour
            && self.item == item
            && match (&self.pack, pack) {
                (None, None) => true,
                // Usually the very same counter: skip reading the ids then.
                (Some(a), Some(b)) => Arc::ptr_eq(a, b) || a.spec.pack_id == b.spec.pack_id,
                _ => false,
            }
    }
}

/// A remembered request id (R10), with what its deduction did.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DedupRecord {
    pub request_id: Box<str>,
    pub expires_at: Ts,
    pub calls_covered: u64,
    pub calls_overage: u64,
    pub egress_covered: u64,
    pub egress_overage: u64,
}

/// An account's unflushed changes.
#[derive(Debug, Default)]
pub struct Pending {
    /// Inline for the common case (one hour, calls and egress each covered
    /// by one pack): an active account then needs no separate allocation,
    /// which would cost 144 bytes (the `Vec` grows to 4 deltas at once).
    pub deltas: smallvec::SmallVec<[Delta; 2]>,
    pub dedup: Vec<DedupRecord>,
    /// The account row must be written (it was auto-activated).
    pub account_dirty: bool,
    /// Wall-clock time of the oldest change in here, for the
    /// oldest-unflushed-delta metric.
    pub since: Option<Ts>,
}

/// The most one (account, hour, item) may hold in all, packs and overage
/// together: the stores keep amounts as signed 64-bit integers, and a sum
/// past this would not fit (SQLite would silently turn it into a float). A
/// deduction that would take an account-hour past it is refused whole
/// ([`HourTotals::reserve`]), so no stored row or sum of an account-hour's
/// rows can overflow.
pub const LEDGER_CAP: u64 = i64::MAX as u64;

/// What an account has recorded per item in each hour that can still take
/// deductions: what the store held when the account was loaded, plus every
/// deduction since (flushed or not). Hours are dropped once closed.
#[derive(Debug, Default)]
pub struct HourTotals {
    /// (hour start, [calls, egress bytes]); rarely more than two hours open.
    hours: smallvec::SmallVec<[(Ts, [u64; 2]); 2]>,
}

/// A deduction the ledger cap refuses: the item, the hour, and what the
/// hour already holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OverCap {
    pub item: Item,
    pub hour: Ts,
    pub recorded: u64,
}

fn slot(item: Item) -> usize {
    match item {
        Item::Calls => 0,
        Item::EgressBytes => 1,
    }
}

impl HourTotals {
    /// Adds what the store already holds for (hour, item), as loaded.
    pub fn seed(&mut self, hour: Ts, item: Item, amount: u64) {
        let t = self.entry(hour);
        t[slot(item)] = t[slot(item)].saturating_add(amount);
    }

    /// Counts `amounts` ([calls, egress bytes]) into `hour` if the hour
    /// stays within [`LEDGER_CAP`] for both items; otherwise changes nothing.
    /// Hours before `closed_before` are forgotten first: they can take no
    /// more deductions.
    pub fn reserve(
        &mut self,
        hour: Ts,
        amounts: [u64; 2],
        closed_before: Ts,
    ) -> Result<(), OverCap> {
        if self.hours.len() > 2 {
            self.hours.retain(|(h, _)| *h >= closed_before);
        }
        let t = self.entry(hour);
        for item in Item::ALL {
            let i = slot(item);
            if t[i]
                .checked_add(amounts[i])
                .is_none_or(|sum| sum > LEDGER_CAP)
            {
                return Err(OverCap {
                    item,
                    hour,
                    recorded: t[i],
                });
            }
        }
        t[0] += amounts[0];
        t[1] += amounts[1];
        Ok(())
    }

    /// Takes back a [`reserve`](Self::reserve) whose deduction did not happen.
    pub fn release(&mut self, hour: Ts, amounts: [u64; 2]) {
        if let Some((_, t)) = self.hours.iter_mut().find(|(h, _)| *h == hour) {
            t[0] = t[0].saturating_sub(amounts[0]);
            t[1] = t[1].saturating_sub(amounts[1]);
        }
    }

    fn entry(&mut self, hour: Ts) -> &mut [u64; 2] {
        let i = match self.hours.iter().position(|(h, _)| *h == hour) {
            Some(i) => i,
            None => {
                self.hours.push((hour, [0, 0]));
                self.hours.len() - 1
            }
        };
        &mut self.hours[i].1
    }
}

/// Where an account keeps its [`Pending`] changes: boxed while there are
/// any, so an account with nothing unflushed (most of them, most of the
/// time) holds two words instead of the whole ledger (about 110 bytes).
#[derive(Debug, Default)]
pub struct PendingSlot {
    changes: Option<Box<Pending>>,
    /// Whether the account sits in the meter's dirty queue.
    pub queued: bool,
    /// The open hours' totals, for the ledger cap. Boxed and created on the
    /// first deduction, like `changes`; unlike them, a flush leaves them.
    totals: Option<Box<HourTotals>>,
}

impl PendingSlot {
    /// The changes, created empty on first use.
    pub fn changes(&mut self) -> &mut Pending {
        self.changes.get_or_insert_with(Box::default)
    }

    pub fn get(&self) -> Option<&Pending> {
        self.changes.as_deref()
    }

    pub fn is_empty(&self) -> bool {
        self.changes.as_ref().is_none_or(|p| p.is_empty())
    }

    /// The open hours' totals, created empty on first use.
    pub fn totals(&mut self) -> &mut HourTotals {
        self.totals.get_or_insert_with(Box::default)
    }

    /// Takes everything out for a flush, leaving `queued` as it was.
    pub fn take(&mut self) -> Pending {
        self.changes.take().map(|b| *b).unwrap_or_default()
    }

    /// Puts back changes from a failed flush.
    pub fn merge(&mut self, failed: Pending) {
        self.changes().merge(failed);
    }

    /// Frees an emptied box.
    pub fn shrink(&mut self) {
        if self.changes.as_ref().is_some_and(|p| p.is_empty()) {
            self.changes = None;
        }
    }
}

impl Pending {
    pub fn is_empty(&self) -> bool {
        self.deltas.is_empty() && self.dedup.is_empty() && !self.account_dirty
    }

    pub fn add(
        &mut self,
        hour: Ts,
        item: Item,
        pack: Option<&Arc<PackCounter>>,
        amount: u64,
        now: Ts,
    ) {
        if amount == 0 {
            return;
        }
        self.since.get_or_insert(now);
        // Linear scan: an account rarely has more than a handful of keys
        // between two flushes, and this avoids a map per account.
        // A sum that would overflow starts a second delta for the key: the
        // usage is kept, and the store refuses the row it cannot hold
        // (the flusher then sets the account aside) rather than wrap.
        match self
            .deltas
            .iter_mut()
            .find(|d| d.same_key(hour, item, pack) && d.amount.checked_add(amount).is_some())
        {
            Some(d) => d.amount += amount,
            None => self.deltas.push(Delta {
                hour,
                item,
                pack: pack.cloned(),
                amount,
            }),
        }
    }

    /// Puts back changes from a failed flush.
    pub fn merge(&mut self, failed: Pending) {
        for d in failed.deltas {
            self.add(
                d.hour,
                d.item,
                d.pack.as_ref(),
                d.amount,
                failed.since.unwrap_or(0),
            );
        }
        self.dedup.extend(failed.dedup);
        self.account_dirty |= failed.account_dirty;
        self.since = match (self.since, failed.since) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
    }

    /// The earliest hour with unflushed usage.
    pub fn oldest_hour(&self) -> Option<Ts> {
        self.deltas.iter().map(|d| d.hour).min()
    }
}

/// One delta as the store sees it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DeltaRow {
    pub hour: Ts,
    pub item: Item,
    /// `None` for overage.
    pub pack: Option<PackSpec>,
    pub amount: u64,
}

/// An account row.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct AccountRecord {
    pub account_id: String,
    pub activated_at: Option<Ts>,
    pub suspended: bool,
    pub deny_on_exhausted: bool,
}

/// One account's part of a flush.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct AccountFlush {
    pub account_id: Arc<str>,
    /// Written (activation filled in if the stored row lacks it) when set.
    pub account: Option<AccountRecord>,
    pub deltas: Vec<DeltaRow>,
    pub dedup: Vec<DedupRecord>,
}

/// What the store commits in one transaction.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FlushBatch {
    /// Unique per batch: the store records the ids it applied and skips a
    /// batch it has seen, so a batch replayed from the spill file after a
    /// flush that did commit is never applied twice.
    pub batch_id: String,
    pub accounts: Vec<AccountFlush>,
    /// Idempotency keys that expired before this instant may be deleted.
    pub now: Ts,
}

impl FlushBatch {
    /// The node part of the batch id (`NODE-SEQ`): the id under which the
    /// node holds its strict-mode leases (see [`crate::meter::lease`]).
    pub fn node_id(&self) -> &str {
        self.batch_id
            .rsplit_once('-')
            .map_or(self.batch_id.as_str(), |(node, _)| node)
    }
}

/// A settled hourly row (R12).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UsageRow {
    pub account_id: String,
    pub hour: Ts,
    pub item: Item,
    /// Empty for overage.
    pub pack_id: String,
    pub source: Option<crate::packs::PackSource>,
    pub amount: u64,
}

impl UsageRow {
    /// Where this row sits in export order.
    pub fn key(&self) -> UsageKey {
        UsageKey {
            hour: self.hour,
            account_id: self.account_id.clone(),
            item: self.item,
            pack_id: self.pack_id.clone(),
        }
    }
}

/// A usage row's identity, in the order exports list rows: hour, then
/// account, item and pack (`Item` orders as its store code, strings
/// byte-wise, as SQLite's default collation does). The keyset cursor for
/// paging through usage: a page starts after the last key of the previous
/// one.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct UsageKey {
    pub hour: Ts,
    pub account_id: String,
    pub item: Item,
    /// Empty for overage.
    pub pack_id: String,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::packs::PackSource;

    fn pack(id: &str) -> Arc<PackCounter> {
        Arc::new(PackCounter::new(
            PackSpec {
                pack_id: id.into(),
                source: PackSource::Purchased,
                item: Item::Calls,
                capacity: 10,
                valid_from: 0,
                valid_until: 10,
                priority: 0,
                created_at: 0,
            },
            0,
        ))
    }

    #[test]
    fn merges_deltas_by_hour_item_and_pack() {
        let (a, b) = (pack("a"), pack("b"));
        let mut p = Pending::default();
        p.add(0, Item::Calls, Some(&a), 1, 5);
        p.add(0, Item::Calls, Some(&a), 2, 6);
        p.add(0, Item::Calls, Some(&b), 3, 7);
        p.add(0, Item::Calls, None, 4, 8);
        p.add(3600, Item::Calls, None, 5, 9);
        p.add(3600, Item::EgressBytes, None, 0, 9);
        assert_eq!(p.deltas.len(), 4);
        assert_eq!(p.deltas[0].amount, 3);
        assert_eq!(p.since, Some(5));
    }

    #[test]
    fn a_failed_flush_merged_back_loses_nothing() {
        let a = pack("a");
        let mut slot = PendingSlot {
            queued: true,
            ..PendingSlot::default()
        };
        slot.changes().add(0, Item::Calls, Some(&a), 7, 1);
        let taken = slot.take();
        assert!(slot.is_empty() && slot.get().is_none() && slot.queued);
        slot.changes().add(0, Item::Calls, Some(&a), 1, 2);
        slot.merge(taken);
        let p = slot.get().unwrap();
        assert_eq!(p.deltas.len(), 1);
        assert_eq!(p.deltas[0].amount, 8);
        assert_eq!(p.since, Some(1));
    }
}
