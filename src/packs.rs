//! Resource packs and the deduction order (R6).
//!
//! A [`PackCounter`] is one pack's capacity and an atomic `used` counter.
//! [`take`](PackCounter::take) is a compare-and-swap loop that never lets
//! `used` exceed the capacity, so any number of threads can deduct from the
//! same pack at once and the pack is never over-used.

use std::{
    cmp::Ordering,
    fmt,
    str::FromStr,
    sync::{
        atomic::{AtomicU64, Ordering::Relaxed},
        Arc,
    },
};

use crate::calendar::{FreeMonth, Ts};

/// A billable item.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum Item {
    Calls,
    EgressBytes,
}

impl Item {
    pub const ALL: [Item; 2] = [Item::Calls, Item::EgressBytes];

    pub fn as_str(self) -> &'static str {
        match self {
            Item::Calls => "calls",
            Item::EgressBytes => "egress_bytes",
        }
    }

    /// Stable small integer used by the stores.
    pub fn code(self) -> i64 {
        match self {
            Item::Calls => 1,
            Item::EgressBytes => 2,
        }
    }

    pub fn from_code(code: i64) -> Option<Item> {
        match code {
            1 => Some(Item::Calls),
            2 => Some(Item::EgressBytes),
            _ => None,
        }
    }
}

impl fmt::Display for Item {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Item {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "calls" => Ok(Item::Calls),
            "egress_bytes" | "egress" => Ok(Item::EgressBytes),
            other => Err(format!("unknown item `{other}`: use calls or egress_bytes")),
        }
    }
}

/// Where a pack came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PackSource {
    FreeTier,
    Purchased,
}

impl PackSource {
    pub fn as_str(self) -> &'static str {
        match self {
            PackSource::FreeTier => "free_tier",
            PackSource::Purchased => "purchased",
        }
    }

    pub fn code(self) -> i64 {
        match self {
            PackSource::FreeTier => 1,
            PackSource::Purchased => 2,
        }
    }

    pub fn from_code(code: i64) -> Option<PackSource> {
        match code {
            1 => Some(PackSource::FreeTier),
            2 => Some(PackSource::Purchased),
            _ => None,
        }
    }
}

/// What a pack is, without its usage.
#[derive(Clone, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct PackSpec {
    pub pack_id: Arc<str>,
    pub source: PackSource,
    pub item: Item,
    pub capacity: u64,
    pub valid_from: Ts,
    /// Exclusive.
    pub valid_until: Ts,
    /// Higher priorities are deducted first (among purchased packs).
    pub priority: u32,
    pub created_at: Ts,
}

impl PackSpec {
    /// The free-tier pack of `item` for one month of the window. Its id names
    /// the month, so it is the same on every node and across restarts.
    pub fn free_tier(month: &FreeMonth, item: Item, capacity: u64) -> PackSpec {
        PackSpec {
            pack_id: format!(
                "free-{:04}-{:02}-{}",
                month.year,
                month.month,
                item.as_str()
            )
            .into(),
            source: PackSource::FreeTier,
            item,
            capacity,
            valid_from: month.valid_from,
            valid_until: month.valid_until,
            priority: 0,
            created_at: month.valid_from,
        }
    }

    pub fn valid_at(&self, ts: Ts) -> bool {
        self.valid_from <= ts && ts < self.valid_until
    }
}

/// The R6 order: free tier first; then purchased packs by priority (higher
/// first), then earliest expiry, then earliest creation, then id. As a
/// key compared field by field, so that specs and counters (which keep
/// part of their spec shared) sort by the one rule.
type OrderKey<'a> = (bool, std::cmp::Reverse<u32>, Ts, Ts, &'a str);

impl PackSpec {
    fn order_key(&self) -> OrderKey<'_> {
        (
            self.source != PackSource::FreeTier,
            std::cmp::Reverse(self.priority),
            self.valid_until,
            self.created_at,
            &self.pack_id,
        )
    }
}

/// The R6 order of two specs (see [`OrderKey`]).
pub fn deduction_order(a: &PackSpec, b: &PackSpec) -> Ordering {
    a.order_key().cmp(&b.order_key())
}

/// [`deduction_order`] of two counters' specs, without building them.
pub fn counter_order(a: &PackCounter, b: &PackCounter) -> Ordering {
    a.order_key().cmp(&b.order_key())
}

/// A pack with its live usage.
///
/// 32 bytes: what a pack is apart from its validity lives in `base`, which
/// every account's counter of the same free-tier pack shares (its id,
/// item, capacity and source name only the month and the plan), so that an
/// account's two free-tier counters of a month cost 48 bytes each with
/// their `Arc`, not 80. The validity stays here: an account's activation
/// month starts at its activation, and its last month ends with its free
/// window.
#[derive(Debug)]
pub struct PackCounter {
    base: Arc<PackSpec>,
    valid_from: Ts,
    /// Exclusive.
    valid_until: Ts,
    used: AtomicU64,
}

/// In a shared free-tier base, `created_at` is this: the pack was created
/// at its own `valid_from` (as [`PackSpec::free_tier`] makes it).
const CREATED_AT_VALID_FROM: Ts = Ts::MIN;

/// The shared base of a free-tier pack: its spec with the validity
/// cleared. A few per calendar month and plan; locked only when a counter
/// is made, never by a deduction.
fn free_tier_base(spec: &PackSpec) -> Arc<PackSpec> {
    static BASES: std::sync::LazyLock<
        parking_lot::Mutex<std::collections::HashSet<Arc<PackSpec>, crate::meter::FastHash>>,
    > = std::sync::LazyLock::new(Default::default);
    let base = PackSpec {
        valid_from: 0,
        valid_until: 0,
        created_at: CREATED_AT_VALID_FROM,
        ..spec.clone()
    };
    let mut bases = BASES.lock();
    if let Some(b) = bases.get(&base) {
        return b.clone();
    }
    let b = Arc::new(base);
    bases.insert(b.clone());
    b
}

impl PackCounter {
    pub fn new(spec: PackSpec, used: u64) -> PackCounter {
        // A store may hold more than the capacity after a plan shrank it;
        // clamp so `remaining` never underflows.
        let used = used.min(spec.capacity);
        let (valid_from, valid_until) = (spec.valid_from, spec.valid_until);
        let base = if spec.source == PackSource::FreeTier
            && spec.created_at == spec.valid_from
            && spec.valid_from != CREATED_AT_VALID_FROM
        {
            free_tier_base(&spec)
        } else {
            Arc::new(spec)
        };
        PackCounter {
            base,
            valid_from,
            valid_until,
            used: AtomicU64::new(used),
        }
    }

    /// The pack's spec.
    pub fn spec(&self) -> PackSpec {
        PackSpec {
            valid_from: self.valid_from,
            valid_until: self.valid_until,
            created_at: self.created_at(),
            ..(*self.base).clone()
        }
    }

    pub fn pack_id(&self) -> &Arc<str> {
        &self.base.pack_id
    }

    pub fn source(&self) -> PackSource {
        self.base.source
    }

    pub fn item(&self) -> Item {
        self.base.item
    }

    pub fn capacity(&self) -> u64 {
        self.base.capacity
    }

    pub fn valid_from(&self) -> Ts {
        self.valid_from
    }

    pub fn valid_until(&self) -> Ts {
        self.valid_until
    }

    pub fn created_at(&self) -> Ts {
        if self.base.source == PackSource::FreeTier && self.base.created_at == CREATED_AT_VALID_FROM
        {
            self.valid_from
        } else {
            self.base.created_at
        }
    }

    pub fn valid_at(&self, ts: Ts) -> bool {
        self.valid_from <= ts && ts < self.valid_until
    }

    /// The spec's [`OrderKey`], without building the spec.
    fn order_key(&self) -> OrderKey<'_> {
        (
            self.source() != PackSource::FreeTier,
            std::cmp::Reverse(self.base.priority),
            self.valid_until,
            self.created_at(),
            self.pack_id(),
        )
    }

    pub fn used(&self) -> u64 {
        self.used.load(Relaxed)
    }

    pub fn remaining(&self) -> u64 {
        self.capacity().saturating_sub(self.used())
    }

    /// A new counter of the same pack holding this one's usage now: for a
    /// new version of an account's [`PackList`], which holds its counters
    /// by value. Only with no deduction in progress (`Gate::exclusive`): a
    /// take on this counter after the copy would not reach the new list.
    pub fn copy(&self) -> PackCounter {
        PackCounter {
            base: self.base.clone(),
            valid_from: self.valid_from,
            valid_until: self.valid_until,
            used: AtomicU64::new(self.used()),
        }
    }

    /// Sets the usage to `used` (at most the capacity): a rebase on the
    /// store's global total after a flush. Only with no deduction in
    /// progress (see `Meter::rebase`), or a concurrent take could be lost.
    pub fn rebase(&self, used: u64) {
        self.used.store(used.min(self.capacity()), Relaxed);
    }

    /// Takes up to `want` from the pack and returns how much it took. The
    /// compare-and-swap loop keeps `used <= capacity` under any interleaving.
    pub fn take(&self, want: u64) -> u64 {
        self.take_left(want).0
    }

    /// [`take`](Self::take), which also returns what the pack held right
    /// after it: what its own compare-and-swap left, with no second read.
    fn take_left(&self, want: u64) -> (u64, u64) {
        let capacity = self.capacity();
        let mut used = self.used.load(Relaxed);
        loop {
            let take = capacity.saturating_sub(used).min(want);
            if take == 0 {
                return (0, capacity.saturating_sub(used));
            }
            // Relaxed suffices: the counter is the only state the CAS guards;
            // the ledger is published under its own lock.
            match self
                .used
                .compare_exchange_weak(used, used + take, Relaxed, Relaxed)
            {
                Ok(_) => return (take, capacity - used - take),
                Err(actual) => used = actual,
            }
        }
    }
}

/// An account's resident packs, in R6 order, **by value**: the counters
/// live in the list's own allocation (two inline: the free tier's calls
/// and egress packs of the month), so an account's packs cost one
/// allocation and a deduction follows one pointer to reach them, not one
/// per counter.
///
/// Because the counters are not shared between versions of a list, a
/// version replaces the one before only while no deduction is in progress
/// (`Gate::exclusive`): a take on a counter of the old version after its
/// [`copy`](PackCounter::copy) would be lost. The ledger names a pack by
/// (list, index) (see [`crate::ledger::Delta`]), which stays valid
/// whatever replaces the list later, since a list is never changed in
/// place apart from its counters' `used`.
pub type PackList = smallvec::SmallVec<[PackCounter; 2]>;

/// An account's [`PackList`] as the account and its ledger deltas share it:
/// a `triomphe::Arc`, whose header is one count (no weak count, which
/// nothing here uses), so that a list of two counters (72 B) takes 80 B
/// with its header, mimalloc's 80 B size class, where `std::sync::Arc`'s
/// 88 B took the 96 B class. `arc_swap` swaps it like a `std` `Arc`
/// (triomphe's `arc-swap` feature).
pub type SharedPackList = triomphe::Arc<PackList>;

/// How one item of a deduction was split: per pack, then overage.
#[derive(Debug, Default)]
pub struct Split {
    /// (index of the pack in the list the deduction read, amount) in
    /// deduction order; inline for the common case of one or two packs. A
    /// split touches no reference count (the ledger clones the list only
    /// for a delta it has not seen yet).
    pub takes: smallvec::SmallVec<[(u32, u64); 2]>,
    pub covered: u64,
    pub overage: u64,
}

impl Split {
    /// Deducts `want` of `item` at `ts` from `packs` (already in R6 order);
    /// what no pack covers is overage.
    pub fn deduct(packs: &[PackCounter], item: Item, ts: Ts, want: u64) -> Split {
        let mut split = Split::default();
        let mut left = want;
        for (i, pack) in packs.iter().enumerate() {
            if left == 0 {
                break;
            }
            if pack.item() != item || !pack.valid_at(ts) {
                continue;
            }
            let took = pack.take(left);
            if took > 0 {
                // A list holds far fewer than 2³² packs.
                split.takes.push((i as u32, took));
                left -= took;
            }
        }
        split.covered = want - left;
        split.overage = left;
        split
    }
}

/// One deduction of both items, as [`deduct`] splits it.
#[derive(Debug)]
pub struct Deducted {
    /// How each item was split, [calls, egress bytes].
    pub splits: [Split; 2],
    /// Per item, [calls, egress bytes]: what the packs valid at the
    /// deduction's instant hold in all, and what they held right after it
    /// (as [`totals`] would read then).
    pub totals: [(u64, u64); 2],
}

/// Written out: the derived `Default` of the array of splits built them in
/// a loop (about 20 instructions a deduction, callgrind).
impl Default for Deducted {
    fn default() -> Self {
        Deducted {
            splits: [Split::default(), Split::default()],
            totals: [(0, 0); 2],
        }
    }
}

/// Deducts `want` ([calls, egress bytes]) at `ts` from `packs` (already in
/// R6 order), as [`Split::deduct`] would for each item, in one walk of the
/// list that also sums each item's [`totals`]. A deduction's answer needs
/// both; four walks (two splits, two sums) cost a batched deduction about
/// a tenth of its instructions.
/// Fills `d`, which is [`Default`], in place: returned, the 144-byte
/// answer was copied out by a call to `memcpy`.
pub fn deduct(packs: &[PackCounter], ts: Ts, want: [u64; 2], d: &mut Deducted) {
    let mut left = want;
    for (i, pack) in packs.iter().enumerate() {
        if !pack.valid_at(ts) {
            continue;
        }
        let k = match pack.item() {
            Item::Calls => 0,
            Item::EgressBytes => 1,
        };
        let remaining = if left[k] == 0 {
            pack.remaining()
        } else {
            let (took, remaining) = pack.take_left(left[k]);
            if took > 0 {
                // A list holds far fewer than 2³² packs.
                d.splits[k].takes.push((i as u32, took));
                left[k] -= took;
            }
            remaining
        };
        let t = &mut d.totals[k];
        *t = (
            t.0.saturating_add(pack.capacity()),
            t.1.saturating_add(remaining),
        );
    }
    for k in 0..2 {
        d.splits[k].covered = want[k] - left[k];
        d.splits[k].overage = left[k];
    }
}

/// What `packs` valid at `ts` hold for `item` in all, and what they still hold.
pub fn totals(packs: &[PackCounter], item: Item, ts: Ts) -> (u64, u64) {
    packs
        .iter()
        .filter(|p| p.item() == item && p.valid_at(ts))
        .fold((0u64, 0u64), |(cap, left), p| {
            (
                cap.saturating_add(p.capacity()),
                left.saturating_add(p.remaining()),
            )
        })
}

/// What `packs` still hold for `item` at `ts`.
pub fn remaining(packs: &[PackCounter], item: Item, ts: Ts) -> u64 {
    totals(packs, item, ts).1
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A purchased calls pack valid from 0 until `until`, for tests.
    pub(crate) fn purchased(id: &str, cap: u64, priority: u32, until: Ts, created: Ts) -> PackSpec {
        PackSpec {
            pack_id: id.into(),
            source: PackSource::Purchased,
            item: Item::Calls,
            capacity: cap,
            valid_from: 0,
            valid_until: until,
            priority,
            created_at: created,
        }
    }

    #[test]
    fn orders_free_tier_then_priority_expiry_creation_id() {
        let free = PackSpec {
            source: PackSource::FreeTier,
            ..purchased("free", 1, 0, 10, 0)
        };
        let mut v = [
            purchased("e", 1, 0, 50, 1),
            purchased("d", 1, 0, 50, 0),
            purchased("c", 1, 0, 40, 9),
            purchased("b", 1, 5, 90, 9),
            free.clone(),
            purchased("a", 1, 0, 50, 0),
        ];
        v.sort_by(deduction_order);
        let ids: Vec<_> = v.iter().map(|p| &*p.pack_id).collect();
        assert_eq!(ids, ["free", "b", "c", "a", "d", "e"]);
    }

    /// A counter gives back the very spec it was made from, whether its
    /// base is shared (a free-tier pack) or its own (a purchased one, or a
    /// free-tier one created at another instant than its start), and two
    /// accounts' counters of the same free-tier pack share one base
    /// whatever their validity.
    #[test]
    fn a_counter_keeps_its_spec_and_shares_a_free_tier_base() {
        let month = |from: Ts, until: Ts| PackSpec {
            pack_id: "free-2026-12-calls".into(),
            source: PackSource::FreeTier,
            item: Item::Calls,
            capacity: 1_000,
            valid_from: from,
            valid_until: until,
            priority: 0,
            created_at: from,
        };
        let specs = [
            month(100, 200),
            // Another account activated later in the month.
            month(150, 200),
            PackSpec {
                created_at: 7,
                ..month(100, 200)
            },
            purchased("p", 5, 3, 90, 11),
            PackSpec {
                created_at: Ts::MIN,
                ..purchased("q", 5, 3, 90, 11)
            },
        ];
        let counters: Vec<_> = specs
            .iter()
            .map(|s| PackCounter::new(s.clone(), 3))
            .collect();
        for (c, s) in counters.iter().zip(&specs) {
            assert_eq!(c.spec(), *s);
            assert_eq!((c.used(), c.remaining()), (3, s.capacity - 3));
        }
        assert!(Arc::ptr_eq(&counters[0].base, &counters[1].base));
        assert!(!Arc::ptr_eq(&counters[0].base, &counters[2].base));
        // Counters sort as their specs do.
        for a in &counters {
            for b in &counters {
                assert_eq!(counter_order(a, b), deduction_order(&a.spec(), &b.spec()));
            }
        }
    }

    #[test]
    fn splits_across_packs_then_overage() {
        let packs: Vec<_> = [("a", 3), ("b", 4)]
            .iter()
            .map(|(id, cap)| PackCounter::new(purchased(id, *cap, 0, 100, 0), 0))
            .collect();
        let s = Split::deduct(&packs, Item::Calls, 5, 10);
        assert_eq!((s.covered, s.overage), (7, 3));
        assert_eq!(s.takes.len(), 2);
        assert_eq!(remaining(&packs, Item::Calls, 5), 0);
    }

    #[test]
    fn skips_packs_of_other_items_and_outside_validity() {
        let mut egress = purchased("e", 10, 0, 100, 0);
        egress.item = Item::EgressBytes;
        let packs = vec![
            PackCounter::new(egress, 0),
            PackCounter::new(purchased("late", 10, 0, 100, 0), 0),
        ];
        // At ts = 100 the calls pack has expired (valid_until is exclusive).
        let s = Split::deduct(&packs, Item::Calls, 100, 4);
        assert_eq!((s.covered, s.overage), (0, 4));
        let s = Split::deduct(&packs, Item::Calls, 99, 4);
        assert_eq!((s.covered, s.overage), (4, 0));
        assert_eq!(packs[0].used(), 0);
    }

    proptest! {
        /// One walk for both items answers what two splits and two sums
        /// answer, over lists of both items with packs outside their
        /// validity and packs already partly or wholly used.
        #[test]
        fn deducting_both_items_at_once_matches_two_splits_and_two_sums(
            packs in prop::collection::vec((any::<bool>(), 0u64..50, 0u64..60, 0i64..3), 0..6),
            want in (0u64..120, 0u64..120),
        ) {
            let make = || -> Vec<PackCounter> {
                packs
                    .iter()
                    .enumerate()
                    .map(|(i, &(egress, cap, used, from))| {
                        let mut spec = purchased(&i.to_string(), cap, 0, 10, 0);
                        spec.valid_from = from;
                        if egress {
                            spec.item = Item::EgressBytes;
                        }
                        PackCounter::new(spec, used)
                    })
                    .collect()
            };
            let (one, two) = (make(), make());
            let mut d = Deducted::default();
            deduct(&one, 1, [want.0, want.1], &mut d);
            let calls = Split::deduct(&two, Item::Calls, 1, want.0);
            let egress = Split::deduct(&two, Item::EgressBytes, 1, want.1);
            for (got, split) in d.splits.iter().zip([&calls, &egress]) {
                prop_assert_eq!(&got.takes, &split.takes);
                prop_assert_eq!((got.covered, got.overage), (split.covered, split.overage));
            }
            prop_assert_eq!(
                d.totals,
                [totals(&two, Item::Calls, 1), totals(&two, Item::EgressBytes, 1)]
            );
            let used = |l: &[PackCounter]| l.iter().map(|p| p.used()).collect::<Vec<_>>();
            prop_assert_eq!(used(&one), used(&two));
        }

        /// Conservation: under any interleaving of threads, each deduction's
        /// covered + overage equals what it asked, the sum of covered equals
        /// the packs' used, and no pack goes over its capacity.
        #[test]
        fn concurrent_deductions_conserve_and_never_overfill(
            caps in prop::collection::vec(0u64..5_000, 1..5),
            asks in prop::collection::vec(prop::collection::vec(0u64..700, 1..60), 2..5),
        ) {
            let packs: Vec<_> = caps
                .iter()
                .enumerate()
                .map(|(i, c)| PackCounter::new(purchased(&i.to_string(), *c, 0, 10, 0), 0))
                .collect();
            let covered: u64 = std::thread::scope(|s| {
                let handles: Vec<_> = asks
                    .iter()
                    .map(|thread_asks| {
                        let packs = &packs;
                        s.spawn(move || {
                            let mut covered = 0;
                            for want in thread_asks {
                                let split = Split::deduct(packs, Item::Calls, 1, *want);
                                assert_eq!(split.covered + split.overage, *want);
                                assert_eq!(split.takes.iter().map(|t| t.1).sum::<u64>(), split.covered);
                                covered += split.covered;
                            }
                            covered
                        })
                    })
                    .collect();
                handles.into_iter().map(|h| h.join().unwrap()).sum()
            });
            let used: u64 = packs.iter().map(|p| p.used()).sum();
            prop_assert_eq!(covered, used);
            for p in &packs {
                prop_assert!(p.used() <= p.capacity());
            }
            let asked: u64 = asks.iter().flatten().sum();
            let cap: u64 = caps.iter().sum();
            prop_assert_eq!(used, asked.min(cap));
        }
    }
}
