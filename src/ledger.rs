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
    calendar::{Ts, HOUR},
    packs::{deduction_order, Item, PackCounter, PackSpec, SharedPackList},
    store::StoredPack,
};

/// Usage not yet in the store, for one (hour, item, pack) of an account.
///
/// 32 bytes: the earliest and latest event times are kept as offsets into
/// the hour (an hour is 3.6 × 10⁹ µs, which fits a `u32`), and the hour,
/// the item and the pack's place in its list share one word, so that two
/// deltas (calls and egress, each covered by one pack) fit inline in
/// [`Pending`] within a small footprint. A delta never holds a zero amount
/// (see [`Pending::add`]): a zero marks a free inline slot.
///
/// The pack is named by the version of the account's [`PackList`] the
/// deduction read and the pack's index in it. A list is never changed in
/// place (a new version replaces it, see [`PackList`]), so the pair names
/// the same pack however the account's list changes before the flush; the
/// delta keeps that version alive until then, and reads only the pack's
/// spec from it, never its usage.
#[derive(Clone, Debug)]
pub struct Delta {
    /// The hour (in hours since the epoch) in the high 32 bits, the
    /// pack's index in `list` in bits 1 to 31, the item in bit 0 (see
    /// [`hour`](Self::hour), [`item`](Self::item), [`key`]).
    key: i64,
    /// The list holding the pack that covered the amount, or `None` for
    /// overage.
    list: Option<SharedPackList>,
    pub amount: u64,
    /// The earliest and latest event time of the amount, as offsets from
    /// the hour (see [`first`](Self::first) and [`last`](Self::last)).
    first_offset: u32,
    last_offset: u32,
}

/// A pack as a deduction names it: the list it read, and an index in it.
pub type PackRef<'a> = (&'a SharedPackList, u32);

/// `t` as an offset into the hour starting at `hour`. Events of a delta
/// lie within its hour; anything else is clamped rather than wrapped.
fn offset(hour: Ts, t: Ts) -> u32 {
    debug_assert!(
        (hour..hour.saturating_add(HOUR)).contains(&t),
        "event {t} outside its hour {hour}"
    );
    u32::try_from(t.saturating_sub(hour).clamp(0, HOUR - 1)).unwrap_or(u32::MAX)
}

/// The pack index's bits in a [`key`].
const INDEX_BITS: i64 = 0x7fff_ffff << 1;

/// An hour, a pack index and an item in one word. An hour is the start of
/// a UTC hour ([`crate::calendar::hour_start`]) of an instant the server
/// clock accepted an event at (R9): a whole number of hours, within ±2³¹
/// hours (±245,000 years) of the epoch, so the packing loses nothing. A
/// list holds far fewer than 2³¹ packs.
fn key(hour: Ts, item: Item, index: u32) -> i64 {
    debug_assert!(
        hour.rem_euclid(HOUR) == 0 && i32::try_from(hour.div_euclid(HOUR)).is_ok(),
        "hour {hour} is not an hour a delta holds"
    );
    debug_assert!(index < 1 << 31, "pack index {index}");
    (hour.div_euclid(HOUR) << 32) | ((i64::from(index) << 1) & INDEX_BITS) | (slot(item) as i64)
}

impl Delta {
    /// A free inline slot of [`Pending`].
    const FREE: Delta = Delta {
        key: 0,
        list: None,
        amount: 0,
        first_offset: 0,
        last_offset: 0,
    };

    fn is_free(&self) -> bool {
        self.amount == 0
    }

    /// Start of the UTC hour.
    pub fn hour(&self) -> Ts {
        (self.key >> 32) * HOUR
    }

    pub fn item(&self) -> Item {
        Item::ALL[(self.key & 1) as usize]
    }

    fn index(&self) -> usize {
        ((self.key as u32) >> 1) as usize
    }

    /// The pack that covered the amount, as the deduction found it (read
    /// its spec; its usage may be stale), or `None` for overage.
    pub fn pack(&self) -> Option<&PackCounter> {
        self.list.as_ref().map(|l| &l[self.index()])
    }

    /// The earliest event time of the amount (within its hour).
    pub fn first(&self) -> Ts {
        self.hour() + Ts::from(self.first_offset)
    }

    /// The latest event time of the amount (within its hour).
    pub fn last(&self) -> Ts {
        self.hour() + Ts::from(self.last_offset)
    }

    fn pack_ref(&self) -> Option<PackRef<'_>> {
        self.list.as_ref().map(|l| (l, (self.key as u32) >> 1))
    }

    /// Whether the delta is for `k` ([`key`] of the hour, the item and the
    /// pack's index) and `pack`.
    fn same_key(&self, k: i64, pack: Option<PackRef<'_>>) -> bool {
        match (&self.list, pack) {
            (None, None) => self.key == k,
            // Usually the very same list and index: skip reading the ids then.
            (Some(l), Some((m, i))) => {
                (self.key & !INDEX_BITS) == (k & !INDEX_BITS)
                    && ((SharedPackList::ptr_eq(l, m) && self.key == k)
                        || l[self.index()].pack_id() == m[i as usize].pack_id())
            }
            _ => false,
        }
    }
}

/// A remembered request id (R10), with what its deduction did.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DedupRecord {
    pub request_id: Box<str>,
    pub expires_at: Ts,
    /// Start of the UTC hour of the event, so that a flush can reverse the
    /// amounts of a duplicate another node recorded first (see
    /// [`attribute`]). `None` in records read back from a store (which
    /// keeps no hour: only a batch's own records are ever reversed) and in
    /// spill files written before it existed (`serde(default)`), whose
    /// duplicates are then billed as the node acknowledged them.
    #[serde(default)]
    pub hour: Option<Ts>,
    pub calls_covered: u64,
    pub calls_overage: u64,
    pub egress_covered: u64,
    pub egress_overage: u64,
}

/// An account's unflushed changes.
#[derive(Debug)]
pub struct Pending {
    /// The first two deltas, inline for the common case (one hour, calls
    /// and egress each covered by one pack): an active account then needs
    /// no separate allocation. A free slot holds a zero amount; slots fill
    /// in order and are freed only together (a take), so the first free one
    /// ends the inline deltas. Further deltas go to the boxed
    /// [`Records`] (rare: a third key between two flushes). Read them with
    /// [`deltas`](Self::deltas). (A `SmallVec<[Delta; 2]>` took a word more
    /// for its length, and put every resident account 8 bytes higher.)
    inline: [Delta; 2],
    /// New request-id records: most accounts never send a request id, so
    /// one word while there are none. Its box also holds the deltas past
    /// the inline two.
    pub dedup: Records,
    /// The account row must be written (it was auto-activated).
    pub account_dirty: bool,
    /// In a [`PendingSlot`]'s changes: whether the account sits in the
    /// meter's dirty queue (see [`PendingSlot::queued`]). Kept here, in
    /// the padding after `account_dirty`, rather than in the slot, where
    /// it took a word of its own; a taken `Pending` has it `false`.
    queued: bool,
    /// Wall-clock time of the oldest change in here, for the
    /// oldest-unflushed-delta metric (see [`since`](Self::since)).
    since: Since,
}

/// A wall-clock time in whole milliseconds since the epoch, in 48 bits, or
/// none: with `account_dirty` and `queued` it fills one word of
/// [`Pending`] (a `Ts` took a word of its own, and put `Pending` and every
/// resident account 8 bytes higher). The oldest-unflushed-delta metric it
/// feeds is in seconds; rounding down to the millisecond makes an age at
/// most 1 ms older, never younger. 2⁴⁸ ms is about 8,900 years.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Since([u16; 3]);

impl Since {
    const NONE: Since = Since([u16::MAX; 3]);
    const MAX_MS: u64 = (1 << 48) - 2;

    fn new(t: Ts) -> Since {
        let ms = u64::try_from(t.div_euclid(1_000).max(0))
            .unwrap_or(u64::MAX)
            .min(Self::MAX_MS);
        Since([ms as u16, (ms >> 16) as u16, (ms >> 32) as u16])
    }

    fn get(self) -> Option<Ts> {
        (self != Since::NONE).then(|| {
            let [a, b, c] = self.0.map(i64::from);
            (a | (b << 16) | (c << 32)) * 1_000
        })
    }
}

impl Default for Pending {
    fn default() -> Self {
        Pending {
            inline: [Delta::FREE, Delta::FREE],
            dedup: Records::default(),
            account_dirty: false,
            queued: false,
            since: Since::NONE,
        }
    }
}

/// A list of request-id records that costs one pointer while empty (a
/// `Vec` costs three words in every resident account).
///
/// The same box holds, rarely, the account's open hours past the two that
/// [`HourTotals`] keeps inline (see [`Totals`]), and the deltas past the
/// two that [`Pending`] keeps inline: all are rare, and sharing one word
/// between them keeps a [`PendingSlot`] at 120 bytes. The hours belong to
/// the slot, not to the changes: [`PendingSlot::take`] leaves them, so a
/// taken `Pending`'s `Records` holds records and deltas only.
#[derive(Clone, Debug, Default)]
pub struct Records(Option<Box<Rare>>);

/// What [`Records`] boxes.
#[derive(Clone, Debug, Default)]
struct Rare {
    records: Vec<DedupRecord>,
    /// Open hours past [`HourTotals`]' inline two, with their sums.
    hours: Vec<(Ts, [u64; 2])>,
    /// Deltas past [`Pending`]'s inline two, in the order they came.
    deltas: Vec<Delta>,
}

impl Rare {
    fn is_empty(&self) -> bool {
        self.records.is_empty() && self.hours.is_empty() && self.deltas.is_empty()
    }
}

impl Records {
    pub fn push(&mut self, r: DedupRecord) {
        self.0.get_or_insert_with(Box::default).records.push(r);
    }

    pub fn as_slice(&self) -> &[DedupRecord] {
        self.0.as_deref().map_or(&[], |r| &r.records[..])
    }

    pub fn to_vec(&self) -> Vec<DedupRecord> {
        self.as_slice().to_vec()
    }

    /// Frees the records' and the extra deltas' buffers (and the box,
    /// unless it holds open hours).
    pub fn clear(&mut self) {
        match &mut self.0 {
            Some(r) if !r.hours.is_empty() => {
                r.records = Vec::new();
                r.deltas = Vec::new();
            }
            _ => self.0 = None,
        }
    }

    /// The deltas past [`Pending`]'s inline two.
    fn spilled(&self) -> &[Delta] {
        self.0.as_deref().map_or(&[], |r| &r.deltas[..])
    }

    fn spilled_mut(&mut self) -> &mut [Delta] {
        match self.0.as_deref_mut() {
            Some(r) => &mut r.deltas[..],
            None => &mut [],
        }
    }

    fn spill(&mut self, d: Delta) {
        self.0.get_or_insert_with(Box::default).deltas.push(d);
    }

    /// Takes the deltas past the inline two out; frees the box if that
    /// leaves it empty.
    fn take_spilled(&mut self) -> Vec<Delta> {
        let deltas = self
            .0
            .as_mut()
            .map(|r| std::mem::take(&mut r.deltas))
            .unwrap_or_default();
        if self.0.as_ref().is_some_and(|r| r.is_empty()) {
            self.0 = None;
        }
        deltas
    }

    fn hours(&self) -> &[(Ts, [u64; 2])] {
        self.0.as_deref().map_or(&[], |r| &r.hours[..])
    }

    fn hours_mut(&mut self) -> &mut Vec<(Ts, [u64; 2])> {
        &mut self.0.get_or_insert_with(Box::default).hours
    }

    /// Keeps the open hours that `keep` accepts; frees the box if that
    /// leaves it empty.
    fn retain_hours(&mut self, keep: impl Fn(Ts) -> bool) {
        if let Some(r) = &mut self.0 {
            r.hours.retain(|(h, _)| keep(*h));
            if r.is_empty() {
                self.0 = None;
            }
        }
    }

    /// Takes the open hours out; frees the box if that leaves it empty.
    fn take_hours(&mut self) -> Vec<(Ts, [u64; 2])> {
        let hours = self
            .0
            .as_mut()
            .map(|r| std::mem::take(&mut r.hours))
            .unwrap_or_default();
        if self.0.as_ref().is_some_and(|r| r.is_empty()) {
            self.0 = None;
        }
        hours
    }
}

impl std::ops::Deref for Records {
    type Target = [DedupRecord];
    fn deref(&self) -> &[DedupRecord] {
        self.as_slice()
    }
}

impl Extend<DedupRecord> for Records {
    fn extend<I: IntoIterator<Item = DedupRecord>>(&mut self, iter: I) {
        let mut iter = iter.into_iter().peekable();
        if iter.peek().is_some() {
            self.0.get_or_insert_with(Box::default).records.extend(iter);
        }
    }
}

impl IntoIterator for Records {
    type Item = DedupRecord;
    type IntoIter = std::vec::IntoIter<DedupRecord>;
    /// The records (a taken `Pending`'s `Records` holds no open hours; its
    /// deltas are taken first, see [`Pending::merge`]).
    fn into_iter(self) -> Self::IntoIter {
        debug_assert!(self.hours().is_empty(), "open hours left a slot");
        debug_assert!(self.spilled().is_empty(), "deltas left with the records");
        self.0.map_or_else(Vec::new, |r| r.records).into_iter()
    }
}

/// The most one (account, hour, item) may hold in all, packs and overage
/// together: the stores keep amounts as signed 64-bit integers, and a sum
/// past this would not fit (SQLite would silently turn it into a float). A
/// deduction that would take an account-hour past it is refused whole
/// ([`Totals::reserve`]), so no stored row or sum of an account-hour's
/// rows can overflow.
pub const LEDGER_CAP: u64 = i64::MAX as u64;

/// What an account has recorded per item in each hour that can still take
/// deductions: what the store held when the account was loaded, plus every
/// deduction since (flushed or not). Hours are dropped once closed. Read
/// and changed through [`Totals`] ([`PendingSlot::totals`]).
///
/// 40 bytes, inline in every resident account: two open hours (the usual
/// most: the current one and the one before, in its late grace) keep their
/// hour as a 32-bit index next to their sums; any further open hour goes
/// to the slot's boxed [`Records`]. (A `SmallVec` of two `(Ts, [u64; 2])`
/// took 56 bytes, and spilled to the heap for good whenever a third hour
/// opened before a closed one was pruned.)
#[derive(Debug)]
pub struct HourTotals {
    /// The inline hours, in hours since the epoch; `FREE_HOUR` for none.
    hours: [i32; 2],
    /// Each inline hour's [calls, egress bytes].
    sums: [[u64; 2]; 2],
}

/// An unused inline slot of [`HourTotals`].
const FREE_HOUR: i32 = i32::MIN;

impl Default for HourTotals {
    fn default() -> Self {
        HourTotals {
            hours: [FREE_HOUR; 2],
            sums: [[0; 2]; 2],
        }
    }
}

/// The inline index of the hour starting at `hour`: a whole number of
/// hours within the 32-bit range (every hour an event can fall in, R9).
/// Anything else (never seen) is kept in the overflow list, at no loss.
fn hour_index(hour: Ts) -> Option<i32> {
    // One division: the remainder is what the quotient leaves.
    let q = hour.div_euclid(HOUR);
    if q.wrapping_mul(HOUR) != hour {
        return None;
    }
    i32::try_from(q).ok().filter(|h| *h != FREE_HOUR)
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

/// An account's open hours' totals: the inline two ([`HourTotals`]) and
/// the rest, in the slot's [`Records`] box.
pub struct Totals<'a> {
    inline: &'a mut HourTotals,
    more: &'a mut Records,
}

impl Totals<'_> {
    /// Adds what the store already holds for (hour, item), as loaded.
    pub fn seed(&mut self, hour: Ts, item: Item, amount: u64) {
        let t = self.entry(hour, None);
        t[slot(item)] = t[slot(item)].saturating_add(amount);
    }

    /// Counts `amounts` ([calls, egress bytes]) into `hour` if the hour
    /// stays within [`LEDGER_CAP`] for both items; otherwise changes nothing.
    /// Hours before `closed_before` can take no more deductions: they are
    /// forgotten when a new hour needs their place.
    pub fn reserve(
        &mut self,
        hour: Ts,
        amounts: [u64; 2],
        closed_before: Ts,
    ) -> Result<(), OverCap> {
        let t = self.entry(hour, Some(closed_before));
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
        if let Some(t) = self.find(hour) {
            t[0] = t[0].saturating_sub(amounts[0]);
            t[1] = t[1].saturating_sub(amounts[1]);
        }
    }

    /// The open hours and their sums, in no particular order.
    #[cfg(test)]
    pub fn hours(&self) -> Vec<(Ts, [u64; 2])> {
        let inline = (0..2)
            .filter(|&i| self.inline.hours[i] != FREE_HOUR)
            .map(|i| (Ts::from(self.inline.hours[i]) * HOUR, self.inline.sums[i]));
        inline.chain(self.more.hours().iter().copied()).collect()
    }

    fn find(&mut self, hour: Ts) -> Option<&mut [u64; 2]> {
        if let Some(h) = hour_index(hour) {
            if let Some(i) = self.inline.hours.iter().position(|x| *x == h) {
                return Some(&mut self.inline.sums[i]);
            }
        }
        let j = self.more.hours().iter().position(|(h, _)| *h == hour)?;
        Some(&mut self.more.hours_mut()[j].1)
    }

    /// The sums of `hour`, made if new. A new hour takes a free inline
    /// slot, else (with `closed_before`) the slot of a closed hour, else
    /// a place in the overflow list.
    fn entry(&mut self, hour: Ts, closed_before: Option<Ts>) -> &mut [u64; 2] {
        let index = hour_index(hour);
        if let Some(h) = index {
            if let Some(i) = self.inline.hours.iter().position(|x| *x == h) {
                return &mut self.inline.sums[i];
            }
        }
        if let Some(j) = self.more.hours().iter().position(|(h, _)| *h == hour) {
            return &mut self.more.hours_mut()[j].1;
        }
        if let Some(closed) = closed_before {
            self.forget_before(closed);
        }
        if let Some(h) = index {
            if let Some(i) = self.inline.hours.iter().position(|x| *x == FREE_HOUR) {
                self.inline.hours[i] = h;
                self.inline.sums[i] = [0, 0];
                return &mut self.inline.sums[i];
            }
        }
        let more = self.more.hours_mut();
        more.push((hour, [0, 0]));
        &mut more.last_mut().expect("just pushed").1
    }

    /// Forgets the hours that start before `closed_before`.
    fn forget_before(&mut self, closed_before: Ts) {
        for h in &mut self.inline.hours {
            if *h != FREE_HOUR && Ts::from(*h) * HOUR < closed_before {
                *h = FREE_HOUR;
            }
        }
        self.more.retain_hours(|h| h >= closed_before);
    }
}

/// Where an account keeps its [`Pending`] changes and its open hours'
/// totals, inline in the account. (They were boxed, so that an account with
/// nothing unflushed held two words instead of the whole ledger; but every
/// deduction then followed two more pointers to memory no other account
/// shares, each a cache miss among a million accounts, and a dirty account
/// paid two allocations' headers. Inline, an account costs the same dirty
/// or flushed, and a deduction reads its ledger from the lines of the
/// account it already holds: see BENCHMARKS.md, issue 10.)
#[derive(Debug, Default)]
pub struct PendingSlot {
    changes: Pending,
    /// The open hours' totals, for the ledger cap. Unlike `changes`, a
    /// flush leaves them.
    totals: HourTotals,
}

impl PendingSlot {
    /// The changes.
    pub fn changes(&mut self) -> &mut Pending {
        &mut self.changes
    }

    /// The changes, if there are any.
    pub fn get(&self) -> Option<&Pending> {
        (!self.changes.is_empty()).then_some(&self.changes)
    }

    pub fn is_empty(&self) -> bool {
        self.changes.is_empty()
    }

    /// The open hours' totals.
    pub fn totals(&mut self) -> Totals<'_> {
        Totals {
            inline: &mut self.totals,
            more: &mut self.changes.dedup,
        }
    }

    /// Whether the account sits in the meter's dirty queue.
    pub fn queued(&self) -> bool {
        self.changes.queued
    }

    /// Marks whether the account sits in the dirty queue; returns the mark
    /// it had.
    pub fn set_queued(&mut self, queued: bool) -> bool {
        std::mem::replace(&mut self.changes.queued, queued)
    }

    /// Takes the changes out for a flush, leaving `queued` as it was and
    /// the open hours' totals (some of which share the changes' box, see
    /// [`Records`]).
    pub fn take(&mut self) -> Pending {
        let queued = self.changes.queued;
        let mut taken = std::mem::take(&mut self.changes);
        (self.changes.queued, taken.queued) = (queued, false);
        let hours = taken.dedup.take_hours();
        if !hours.is_empty() {
            *self.changes.dedup.hours_mut() = hours;
        }
        taken
    }

    /// Puts back changes from a failed flush.
    pub fn merge(&mut self, failed: Pending) {
        self.changes.merge(failed);
    }

    /// Frees what an emptied ledger still holds on the heap (deltas past
    /// the inline ones, request-id records).
    pub fn shrink(&mut self) {
        if self.changes.is_empty() {
            self.changes.dedup.clear();
        }
    }
}

impl Pending {
    pub fn is_empty(&self) -> bool {
        self.inline[0].is_free() && self.dedup.is_empty() && !self.account_dirty
    }

    /// The deltas, in the order their keys first came.
    pub fn deltas(&self) -> impl Iterator<Item = &Delta> {
        self.inline
            .iter()
            .take_while(|d| !d.is_free())
            .chain(self.dedup.spilled())
    }

    /// Takes the deltas out, in order.
    fn take_deltas(&mut self) -> impl Iterator<Item = Delta> {
        let inline = std::mem::replace(&mut self.inline, [Delta::FREE, Delta::FREE]);
        inline
            .into_iter()
            .take_while(|d| !d.is_free())
            .chain(self.dedup.take_spilled())
    }

    /// Adds `amount` for events at `at` (within `hour`).
    pub fn add(
        &mut self,
        hour: Ts,
        item: Item,
        pack: Option<PackRef<'_>>,
        amount: u64,
        now: Ts,
        at: Ts,
    ) {
        self.add_span(hour, item, pack, amount, now, (at, at));
    }

    /// Adds `amount` for events between `first` and `last` (within `hour`).
    fn add_span(
        &mut self,
        hour: Ts,
        item: Item,
        pack: Option<PackRef<'_>>,
        amount: u64,
        now: Ts,
        (first, last): (Ts, Ts),
    ) {
        if amount == 0 {
            return;
        }
        self.note_since(now);
        // Linear scan: an account rarely has more than a handful of keys
        // between two flushes, and this avoids a map per account.
        // A sum that would overflow starts a second delta for the key: the
        // usage is kept, and the store refuses the row it cannot hold
        // (the flusher then sets the account aside) rather than wrap.
        // The key and the offsets once, not per delta looked at: each is a
        // 64-bit division or two (about 15 instructions a deduction).
        let k = key(hour, item, pack.map_or(0, |p| p.1));
        let (first, last) = (offset(hour, first), offset(hour, last));
        let fits = |d: &Delta| d.same_key(k, pack) && d.amount.checked_add(amount).is_some();
        let grow = |d: &mut Delta| {
            d.amount += amount;
            d.first_offset = d.first_offset.min(first);
            d.last_offset = d.last_offset.max(last);
        };
        // The inline slots up to the first free one; past them, the box's
        // deltas only if both are taken (see `inline`).
        let mut free = None;
        for (i, d) in self.inline.iter_mut().enumerate() {
            if d.is_free() {
                free = Some(i);
                break;
            }
            if fits(d) {
                grow(d);
                return;
            }
        }
        if free.is_none() {
            if let Some(d) = self.dedup.spilled_mut().iter_mut().find(|d| fits(d)) {
                grow(d);
                return;
            }
        }
        let d = Delta {
            key: k,
            list: pack.map(|p| p.0.clone()),
            amount,
            first_offset: first,
            last_offset: last,
        };
        match free {
            Some(i) => self.inline[i] = d,
            None => self.dedup.spill(d),
        }
    }

    /// Puts back changes from a failed flush.
    pub fn merge(&mut self, mut failed: Pending) {
        let failed_since = failed.since();
        for d in failed.take_deltas() {
            self.add_span(
                d.hour(),
                d.item(),
                d.pack_ref(),
                d.amount,
                failed_since.unwrap_or(0),
                (d.first(), d.last()),
            );
        }
        self.dedup.extend(failed.dedup);
        self.account_dirty |= failed.account_dirty;
        self.since = match (self.since(), failed_since) {
            (Some(a), Some(b)) => Since::new(a.min(b)),
            (a, b) => a.or(b).map_or(Since::NONE, Since::new),
        };
    }

    /// Wall-clock time of the oldest change in here, rounded down to the
    /// millisecond (see [`Since`]).
    pub fn since(&self) -> Option<Ts> {
        self.since.get()
    }

    /// Notes a change at `now`, if it is the first.
    pub fn note_since(&mut self, now: Ts) {
        if self.since == Since::NONE {
            self.since = Since::new(now);
        }
    }

    /// The earliest hour with unflushed usage.
    pub fn oldest_hour(&self) -> Option<Ts> {
        self.deltas().map(|d| d.hour()).min()
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
    /// The earliest and latest event time of the amount, so that the
    /// flush may move what a pack cannot take to packs valid over that
    /// span (see [`attribute`]). `None` in batches written before it
    /// existed (`serde(default)`): only packs valid for the whole hour.
    #[serde(default)]
    pub span: Option<(Ts, Ts)>,
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

/// A batch's accounts by id, in id order, each with all its parts (an
/// account may appear more than once in a batch).
pub fn by_account(batch: &FlushBatch) -> std::collections::BTreeMap<&str, Vec<&AccountFlush>> {
    let mut out: std::collections::BTreeMap<&str, Vec<&AccountFlush>> = Default::default();
    for a in &batch.accounts {
        out.entry(&*a.account_id).or_default().push(a);
    }
    out
}

/// The earliest activation the parts carry (an activation only moves back, R1).
pub fn earliest_activation(parts: &[&AccountFlush]) -> Option<Ts> {
    parts
        .iter()
        .filter_map(|a| a.account.as_ref()?.activated_at)
        .min()
}

/// What a flush does to one account in the store: the rows it adds, once
/// attributed and capped by [`attribute`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Attributed {
    /// Usage to add, per (hour, item, pack): `pack` is `None` for overage.
    /// Only non-zero amounts, in (hour, item, R6) order.
    pub usage: Vec<DeltaRow>,
    /// What each pack takes, added to its stored `used`. A pack the store
    /// does not hold yet (a free-tier month's first flush) is inserted with
    /// this spec.
    pub packs: Vec<(PackSpec, u64)>,
    /// The request ids to store: the batch's own, less the duplicates.
    pub dedup: Vec<DedupRecord>,
    /// Request ids the store already held from another batch: their
    /// amounts were taken out of this batch's usage.
    pub reversed: Vec<Box<str>>,
    /// Every pack of the account as the store holds it afterwards.
    pub totals: Vec<StoredPack>,
}

/// One (hour, item)'s rows summed: the overage, and each named pack's amount.
type Group = (u64, Vec<(PackSpec, u64)>);

/// An account's rows of a batch summed per (hour, item), with the span of
/// each group's events.
struct Grouped {
    /// (hour, item) -> its [`Group`], in (hour, item) order.
    groups: std::collections::BTreeMap<(Ts, Item), Group>,
    /// (hour, item) -> the span of its events, `None` once a row has none.
    spans: std::collections::BTreeMap<(Ts, Item), Option<(Ts, Ts)>>,
}

/// Sums the rows (see [`Grouped`]); an error names a sum past 2^64.
fn group<'b>(deltas: impl IntoIterator<Item = &'b DeltaRow>) -> Result<Grouped, String> {
    let mut out = Grouped {
        groups: Default::default(),
        spans: Default::default(),
    };
    for d in deltas {
        let span = out.spans.entry((d.hour, d.item)).or_insert(d.span);
        *span = match (*span, d.span) {
            (Some(a), Some(b)) => Some((a.0.min(b.0), a.1.max(b.1))),
            _ => None,
        };
        let g = out.groups.entry((d.hour, d.item)).or_default();
        match &d.pack {
            None => {
                g.0 =
                    g.0.checked_add(d.amount)
                        .ok_or_else(|| too_big("overage"))?
            }
            Some(p) => match g.1.iter_mut().find(|(q, _)| q.pack_id == p.pack_id) {
                Some((_, a)) => *a = a.checked_add(d.amount).ok_or_else(|| too_big("usage"))?,
                None => g.1.push((p.clone(), d.amount)),
            },
        }
    }
    Ok(out)
}

/// The error of a sum past 2^64.
fn too_big(what: &str) -> String {
    format!("the {what} would exceed 2^64")
}

/// Request ids to store, the last record of an id in the batch winning,
/// in the order each id first came.
#[derive(Default)]
struct LastOfEach<'b> {
    records: Vec<DedupRecord>,
    /// Where each id's record is in `records`: a batch written after an
    /// outage holds every request id of the outage, and a search of the
    /// list per record made such a flush take minutes (quadratic).
    at: std::collections::HashMap<&'b str, usize>,
}

impl<'b> LastOfEach<'b> {
    fn keep(&mut self, r: &'b DedupRecord) {
        match self.at.entry(&r.request_id) {
            std::collections::hash_map::Entry::Occupied(e) => self.records[*e.get()] = r.clone(),
            std::collections::hash_map::Entry::Vacant(e) => {
                e.insert(self.records.len());
                self.records.push(r.clone());
            }
        }
    }
}

/// Attributes one account's part of a flush against what the store holds,
/// so that the stored ledger is exact whatever each node believed in real
/// time (DESIGN.md "Many nodes"; docs/billing-rules.md R5, R6). Pure: the
/// store calls it inside its transaction, with the account's row locked
/// (so no other flush changes these packs meanwhile) and writes the result.
///
/// - `stored`: every pack row of the account, with its global `used`.
/// - `deltas`, `dedup`: the account's rows of the batch (the same account
///   may appear more than once in a batch: all its parts, in order).
/// - `held(request_id)`: whether the store holds that id for the account,
///   unexpired at the batch's `now`, from an earlier batch.
///
/// The rule, applied per (hour, item), hours in order:
/// 1. **Duplicates.** A request id the store already holds came from a
///    retry that reached another node (or this one, before a reload) and
///    was billed there first. Its amounts, as this batch's record gives
///    them, are taken back out of this batch: the overage from the overage
///    row, the covered amount from the pack rows, last pack in R6 order
///    first (a shortfall of either comes out of the other). The stored
///    record is kept. A record without an hour (an old spill file) is
///    stored as is when the store does not hold it, and not reversed.
/// 2. **Capping.** Each pack row of the batch takes what it names, up to
///    the pack's room in the store (`capacity - used`, the capacity the
///    store holds), in R6 order.
/// 3. **Re-attribution.** What a pack could not take goes to the account's
///    other packs of the item that were valid at **every** event of the
///    (hour, item): over the span from its earliest to its latest event
///    time, as the node recorded them (over the whole hour for rows
///    without a span, from older spill files), in R6 order, each up to its
///    room; the rest is overage. (Without the span, a pack granted during
///    the hour could take nothing of that hour, and calls past a shared
///    free tier would be booked as overage, even for a `deny` account,
///    while the pack had room.)
/// 4. **Overage** the node booked stays overage.
///
/// So the amounts stored per (hour, item) equal the batch's, less reversed
/// duplicates, and no pack's `used` passes its capacity. (A pack already
/// over its capacity, after a plan shrank it, takes nothing more.)
pub fn attribute<'b>(
    mut stored: Vec<StoredPack>,
    deltas: impl IntoIterator<Item = &'b DeltaRow>,
    dedup: impl IntoIterator<Item = &'b DedupRecord>,
    held: impl Fn(&str) -> bool,
) -> Result<Attributed, String> {
    let Grouped { groups, spans } = group(deltas)?;
    // Packs the store does not hold yet start at 0, with the node's spec.
    for g in groups.values() {
        for (p, _) in &g.1 {
            if !stored.iter().any(|s| s.spec.pack_id == p.pack_id) {
                stored.push(StoredPack {
                    spec: p.clone(),
                    used: 0,
                });
            }
        }
    }
    stored.sort_by(|a, b| deduction_order(&a.spec, &b.spec).then(a.spec.item.cmp(&b.spec.item)));
    // The batch's own pack rows as positions in `stored`, in R6 order.
    let position = |id: &str| stored.iter().position(|s| &*s.spec.pack_id == id);
    // (hour, item) -> (overage, [(position in `stored`, amount)]).
    type Positioned = ((Ts, Item), (u64, Vec<(usize, u64)>));
    let mut groups: Vec<Positioned> = groups
        .into_iter()
        .map(|(k, (overage, rows))| {
            let mut rows: Vec<(usize, u64)> = rows
                .into_iter()
                .filter_map(|(p, a)| position(&p.pack_id).map(|i| (i, a)))
                .collect();
            rows.sort_unstable();
            (k, (overage, rows))
        })
        .collect();

    let mut out = Attributed::default();
    let mut kept = LastOfEach::default();
    for r in dedup {
        if !held(&r.request_id) {
            kept.keep(r);
            continue;
        }
        out.reversed.push(r.request_id.clone());
        let Some(hour) = r.hour else { continue };
        for (item, covered, overage) in [
            (Item::Calls, r.calls_covered, r.calls_overage),
            (Item::EgressBytes, r.egress_covered, r.egress_overage),
        ] {
            let Some((_, g)) = groups.iter_mut().find(|(k, _)| *k == (hour, item)) else {
                continue;
            };
            // Overage from the overage row, covered from the packs (last
            // first); what one side lacks comes out of the other.
            let from_overage = overage.min(g.0);
            g.0 -= from_overage;
            let mut left = covered.saturating_add(overage - from_overage);
            for (_, a) in g.1.iter_mut().rev() {
                let t = left.min(*a);
                *a -= t;
                left -= t;
            }
            let t = left.min(g.0);
            g.0 -= t;
        }
    }
    out.dedup = kept.records;

    let mut taken: Vec<u64> = vec![0; stored.len()];
    for ((hour, item), (overage, rows)) in groups {
        // Packs valid at every event of the group (for the whole hour when
        // the events' span is not known), in R6 order.
        let (from, until) = match spans.get(&(hour, item)).copied().flatten() {
            Some((first, last)) => (first, last.saturating_add(1)),
            None => (hour, hour.saturating_add(HOUR)),
        };
        let valid_throughout: Vec<usize> = (0..stored.len())
            .filter(|&i| {
                let s = &stored[i].spec;
                s.item == item && s.valid_from <= from && until <= s.valid_until
            })
            .collect();
        // What pack `i` takes of `want`, up to its room in the store.
        let mut take = |i: usize, want: u64| -> u64 {
            let s = &mut stored[i];
            let t = s.spec.capacity.saturating_sub(s.used).min(want);
            s.used += t;
            taken[i] += t;
            if t > 0 {
                match out.usage.iter_mut().find(|d| {
                    d.hour == hour && d.pack.as_ref().is_some_and(|p| p.pack_id == s.spec.pack_id)
                }) {
                    Some(d) => d.amount += t,
                    None => out.usage.push(DeltaRow {
                        hour,
                        item,
                        pack: Some(s.spec.clone()),
                        amount: t,
                        span: None,
                    }),
                }
            }
            t
        };
        let mut spill = 0u64;
        for (i, amount) in rows {
            spill = spill
                .checked_add(amount - take(i, amount))
                .ok_or_else(|| too_big("overage"))?;
        }
        for i in valid_throughout {
            if spill == 0 {
                break;
            }
            spill -= take(i, spill);
        }
        let overage = overage
            .checked_add(spill)
            .ok_or_else(|| too_big("overage"))?;
        if overage > 0 {
            out.usage.push(DeltaRow {
                hour,
                item,
                pack: None,
                amount: overage,
                span: None,
            });
        }
    }
    out.packs = stored
        .iter()
        .zip(&taken)
        .filter(|(_, t)| **t > 0)
        .map(|(s, t)| (s.spec.clone(), *t))
        .collect();
    out.totals = stored;
    Ok(out)
}

/// What [`attribute`] gives an account's rows when the store holds every
/// pack they name, each with room for what the rows give it, and none of
/// their request ids: no pack is capped, nothing moves to another pack and
/// nothing is reversed. So the rows, summed per (hour, item, pack), are the
/// usage to add (non-zero amounts, in (hour, item) order); each pack
/// takes the sum of its rows; and the request ids to store are the batch's
/// own, the last record of an id winning.
///
/// The SQLite flush writes this without reading the account's packs when
/// an update that adds each sum only where it fits finds room in every
/// pack (issue 10: at 1 M accounts nearly every flushed account missed the
/// pack cache, and read its packs). `None` when the rows name no pack (the
/// account's row may have to be written, which the pack's row otherwise
/// proves is there) or a sum passes 2^63 - 1 (the full attribution then
/// says why).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Named {
    pub usage: Vec<DeltaRow>,
    pub packs: Vec<(PackSpec, u64)>,
    pub dedup: Vec<DedupRecord>,
}

/// See [`Named`].
pub fn named<'b>(
    deltas: impl IntoIterator<Item = &'b DeltaRow>,
    dedup: impl IntoIterator<Item = &'b DedupRecord>,
) -> Option<Named> {
    const MAX: u64 = i64::MAX as u64;
    let fits = |a: u64| (a <= MAX).then_some(a);
    let mut out = Named::default();
    for ((hour, item), (overage, rows)) in group(deltas).ok()?.groups {
        let overage = (overage > 0).then_some((None, fits(overage)?));
        for (pack, amount) in overage
            .into_iter()
            .chain(rows.into_iter().map(|(p, a)| (Some(p), a)))
        {
            if amount == 0 {
                continue;
            }
            if let Some(p) = &pack {
                match out.packs.iter_mut().find(|(q, _)| q.pack_id == p.pack_id) {
                    Some((_, a)) => *a = fits(a.checked_add(amount)?)?,
                    None => out.packs.push((p.clone(), fits(amount)?)),
                }
            }
            out.usage.push(DeltaRow {
                hour,
                item,
                pack,
                amount,
                span: None,
            });
        }
    }
    if out.packs.is_empty() {
        return None;
    }
    let mut kept = LastOfEach::default();
    dedup.into_iter().for_each(|r| kept.keep(r));
    out.dedup = kept.records;
    Some(out)
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
    /// What was used. 0 on an adjustment row, whose signed amount is in
    /// [`adjustment`](Self::adjustment).
    pub amount: u64,
    /// Set on an adjustment row: a plan change's re-deduction (R8,
    /// [`crate::recalc`]), reported in the hour holding the plan's instant.
    pub adjustment: Option<Adjustment>,
}

/// What an adjustment row re-deducts (R8): a signed amount, negative where
/// a pack or the overage is credited, positive where the new plan's pack is
/// debited. The amounts of one account, item and plan change sum to zero.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Adjustment {
    /// The plan whose change it records.
    pub plan: String,
    pub amount: i64,
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

    proptest::proptest! {
        /// Issue 10: what the SQLite flush writes without reading an
        /// account's packs ([`named`]) is what [`attribute`] gives when the
        /// store holds every pack the rows name, with room, and none of
        /// their request ids: the same usage, the same amount per pack, the
        /// same request ids, and each pack's total its stored `used` plus
        /// its sum.
        #[test]
        fn named_rows_are_the_attribution_when_every_pack_has_room(
            rows in proptest::collection::vec((0i64..3, 0usize..4, 1u64..1_000, 0u64..3), 1..40),
            ids in proptest::collection::vec((0u8..6, 0u64..9), 0..12),
            used in proptest::collection::vec(0u64..10_000, 3),
            slack in 0u64..3,
        ) {
            let spec = |i: usize| {
                let mut p = crate::packs::tests::purchased(&format!("p{i}"), 0, i as u32, 10 * HOUR, 0);
                p.item = if i == 2 { Item::EgressBytes } else { Item::Calls };
                p
            };
            // Rows: (hour, pack index (3: overage, of calls or egress by
            // its last field), amount).
            let deltas: Vec<DeltaRow> = rows
                .iter()
                .map(|&(h, p, amount, x)| DeltaRow {
                    hour: h * HOUR,
                    item: if p == 2 || (p == 3 && x % 2 == 1) { Item::EgressBytes } else { Item::Calls },
                    pack: (p < 3).then(|| spec(p)),
                    amount,
                    span: Some((h * HOUR + x as Ts, h * HOUR + 2 * x as Ts)),
                })
                .collect();
            let dedup: Vec<DedupRecord> = ids
                .iter()
                .map(|&(id, n)| DedupRecord {
                    request_id: format!("r{id}").into(),
                    expires_at: 5 * HOUR,
                    hour: Some(0),
                    calls_covered: n,
                    calls_overage: 0,
                    egress_covered: 0,
                    egress_overage: n,
                })
                .collect();
            let sum = |i: usize| -> u64 {
                deltas.iter().filter(|d| d.pack.as_ref().is_some_and(|p| p.pack_id == spec(i).pack_id)).map(|d| d.amount).sum()
            };
            // Every pack stored, with room for its rows (and `slack` more).
            let stored: Vec<StoredPack> = (0..3)
                .map(|i| StoredPack {
                    spec: PackSpec { capacity: used[i] + sum(i) + slack, ..spec(i) },
                    used: used[i],
                })
                .collect();
            let a = attribute(stored, &deltas, &dedup, |_| false).unwrap();
            let named = named(&deltas, &dedup);
            if (0..3).all(|i| sum(i) == 0) {
                proptest::prop_assert!(named.is_none());
                return Ok(());
            }
            let n = named.unwrap();
            let key = |d: &DeltaRow| (d.hour, d.item, d.pack.as_ref().map(|p| p.pack_id.clone()), d.amount);
            let mut got: Vec<_> = n.usage.iter().map(key).collect();
            let mut want: Vec<_> = a.usage.iter().map(key).collect();
            got.sort();
            want.sort();
            proptest::prop_assert_eq!(got, want);
            let amounts = |v: &[(PackSpec, u64)]| {
                let mut v: Vec<_> = v.iter().map(|(p, a)| (p.pack_id.clone(), *a)).collect();
                v.sort();
                v
            };
            proptest::prop_assert_eq!(amounts(&n.packs), amounts(&a.packs));
            proptest::prop_assert_eq!(&n.dedup, &a.dedup);
            proptest::prop_assert!(a.reversed.is_empty());
            for (p, amount) in &n.packs {
                let total = a.totals.iter().find(|t| t.spec.pack_id == p.pack_id).unwrap();
                let i = used.len() - 3 + p.pack_id[1..].parse::<usize>().unwrap();
                proptest::prop_assert_eq!(total.used, used[i] + amount);
            }
        }
    }

    /// A list holding one purchased calls pack.
    fn pack(id: &str) -> SharedPackList {
        SharedPackList::new(smallvec::smallvec![PackCounter::new(
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
        )])
    }

    /// A delta names its pack by (list, index): a later version of the
    /// account's list, where the same pack sits elsewhere, adds to the same
    /// delta, and the hour, item and index share one word without loss.
    #[test]
    fn a_delta_names_its_pack_across_versions_of_the_list() {
        let old = pack("a");
        let new: SharedPackList =
            SharedPackList::new([pack("b"), pack("a")].iter().map(|l| l[0].copy()).collect());
        let hour = 490_000 * HOUR;
        let mut p = Pending::default();
        p.add(hour, Item::Calls, Some((&old, 0)), 1, 5, hour + 1);
        p.add(hour, Item::Calls, Some((&new, 1)), 2, 6, hour + 2);
        p.add(hour, Item::Calls, Some((&new, 0)), 4, 7, hour + 3);
        p.add(-HOUR, Item::EgressBytes, Some((&new, 1)), 8, 8, -1);
        let named: Vec<_> = p
            .deltas()
            .map(|d| (d.hour(), d.item(), &**d.pack().unwrap().pack_id(), d.amount))
            .collect();
        assert_eq!(
            named,
            [
                (hour, Item::Calls, "a", 3),
                (hour, Item::Calls, "b", 4),
                (-HOUR, Item::EgressBytes, "a", 8)
            ]
        );
        let first = p.deltas().next().unwrap();
        assert_eq!((first.first(), first.last()), (hour + 1, hour + 2));
    }

    #[test]
    fn merges_deltas_by_hour_item_and_pack() {
        let (a, b) = (pack("a"), pack("b"));
        let mut p = Pending::default();
        p.add(0, Item::Calls, Some((&a, 0)), 1, 5_000, 10);
        p.add(0, Item::Calls, Some((&a, 0)), 2, 6_000, 11);
        p.add(0, Item::Calls, Some((&b, 0)), 3, 7_000, 12);
        p.add(0, Item::Calls, None, 4, 8_000, 13);
        p.add(HOUR, Item::Calls, None, 5, 9_000, HOUR);
        p.add(HOUR, Item::EgressBytes, None, 0, 9_000, HOUR);
        let deltas: Vec<&Delta> = p.deltas().collect();
        assert_eq!(deltas.len(), 4);
        assert_eq!(deltas[0].amount, 3);
        // The event times the delta holds, for the flush's re-attribution.
        assert_eq!((deltas[0].first(), deltas[0].last()), (10, 11));
        assert_eq!(p.since(), Some(5_000));
    }

    /// A batch after an outage holds every request id of the outage: the
    /// last record of each id wins, the held ones are reversed, and the
    /// work grows with the number of records, not its square.
    #[test]
    fn a_batch_with_many_request_ids_keeps_the_last_record_of_each() {
        let n = 60_000u64;
        let records: Vec<DedupRecord> = (0..n)
            .map(|i| DedupRecord {
                // Every tenth id twice, the second record with 2 calls.
                request_id: format!("r{}", i - u64::from(i % 10 == 9)).into(),
                expires_at: 10,
                hour: Some(0),
                calls_covered: 0,
                calls_overage: 1 + u64::from(i % 10 == 9),
                egress_covered: 0,
                egress_overage: 0,
            })
            .collect();
        let deltas = [DeltaRow {
            hour: 0,
            item: Item::Calls,
            pack: None,
            amount: records.iter().map(|r| r.calls_overage).sum(),
            span: None,
        }];
        let started = std::time::Instant::now();
        // Ids ending in 7 are held: another batch billed them.
        let a = attribute(vec![], &deltas, &records, |id| id.ends_with('7')).unwrap();
        eprintln!("attribute of {n} request records: {:?}", started.elapsed());
        let kept: u64 = a.dedup.iter().map(|r| r.calls_overage).sum();
        assert_eq!(a.dedup.len() + a.reversed.len(), 54_000, "distinct ids");
        assert!(a.dedup.iter().all(|r| !r.request_id.ends_with('7')));
        let doubled = a.dedup.iter().filter(|r| r.calls_overage == 2).count();
        assert_eq!(doubled, 6_000, "the second record of each repeated id");
        assert_eq!(kept, 48_000 + 6_000);
        // What is stored: all records' calls less the held ids' ones.
        let reversed: u64 = records
            .iter()
            .filter(|r| r.request_id.ends_with('7'))
            .map(|r| r.calls_overage)
            .sum();
        assert_eq!(a.usage[0].amount, deltas[0].amount - reversed);
    }

    #[test]
    fn a_delta_row_from_an_older_spill_file_reads_without_its_span() {
        let old = r#"{"hour":0,"item":"calls","pack":null,"amount":3}"#;
        let d: DeltaRow = serde_json::from_str(old).unwrap();
        assert_eq!((d.amount, d.span), (3, None));
    }

    #[test]
    fn a_request_record_from_an_older_spill_file_reads_without_its_hour() {
        let old = r#"{"request_id":"r","expires_at":5,"calls_covered":1,"calls_overage":2,"egress_covered":3,"egress_overage":4}"#;
        let r: DedupRecord = serde_json::from_str(old).unwrap();
        assert_eq!((r.hour, r.calls_overage), (None, 2));
        let new = serde_json::to_string(&DedupRecord {
            hour: Some(7),
            ..r.clone()
        })
        .unwrap();
        assert!(new.contains(r#""hour":7"#), "{new}");
    }

    #[test]
    fn a_failed_flush_merged_back_loses_nothing() {
        let a = pack("a");
        let mut slot = PendingSlot::default();
        slot.set_queued(true);
        slot.changes()
            .add(0, Item::Calls, Some((&a, 0)), 7, 1_000, 0);
        let taken = slot.take();
        assert!(slot.is_empty() && slot.get().is_none() && slot.queued());
        slot.changes()
            .add(0, Item::Calls, Some((&a, 0)), 1, 2_000, 0);
        slot.merge(taken);
        let p = slot.get().unwrap();
        let amounts: Vec<u64> = p.deltas().map(|d| d.amount).collect();
        assert_eq!(amounts, [8]);
        assert_eq!(p.since(), Some(1_000));
    }

    /// The oldest change's time is kept to the millisecond, rounded down,
    /// over the whole range of a wall clock, and "none" stays apart.
    #[test]
    fn since_keeps_milliseconds_and_rounds_down() {
        let now = 1_796_000_000_123_456; // 2026-12-01, in µs
        for (t, kept) in [
            (now, now - 456),
            (999, 0),
            (0, 0),
            (-5, 0),
            (Ts::MAX, ((1 << 48) - 2) * 1_000),
        ] {
            let mut p = Pending::default();
            assert_eq!(p.since(), None);
            p.note_since(t);
            p.note_since(t.saturating_add(5_000_000));
            assert_eq!(p.since(), Some(kept), "{t}");
        }
    }

    /// Two open hours sit inline; a third goes to the overflow list (in
    /// the slot's `Records` box), and a closed hour gives its slot to the
    /// next new one. Sums are kept exactly, the cap refuses per hour, and
    /// the overflow stays with the slot when a flush takes the changes.
    #[test]
    fn hour_totals_keep_every_open_hour() {
        let h = 490_000 * HOUR;
        let sorted = |slot: &mut PendingSlot| {
            let mut open = slot.totals().hours();
            open.sort();
            open
        };
        let mut slot = PendingSlot::default();
        slot.totals().seed(h, Item::Calls, 5);
        slot.totals().reserve(h + HOUR, [1, 2], h).unwrap();
        assert!(slot.changes.dedup.0.is_none(), "two hours fit inline");
        slot.totals().reserve(h + 2 * HOUR, [3, 4], h).unwrap();
        assert_eq!(slot.changes.dedup.hours().len(), 1, "the third overflows");
        assert!(slot.is_empty(), "open hours are not changes to flush");
        assert_eq!(
            sorted(&mut slot),
            [(h, [5, 0]), (h + HOUR, [1, 2]), (h + 2 * HOUR, [3, 4])]
        );
        // A flush takes the records and leaves the hours; so does a shrink.
        slot.changes()
            .add(h + HOUR, Item::Calls, None, 1, 9_000, h + HOUR);
        slot.changes().dedup.push(DedupRecord {
            request_id: "r".into(),
            expires_at: 0,
            hour: Some(h + HOUR),
            calls_covered: 0,
            calls_overage: 1,
            egress_covered: 0,
            egress_overage: 0,
        });
        let taken = slot.take();
        assert_eq!((taken.dedup.len(), taken.dedup.hours().len()), (1, 0));
        slot.shrink();
        assert_eq!(sorted(&mut slot).len(), 3);
        slot.merge(taken);
        assert_eq!(slot.get().map(|p| p.dedup.len()), Some(1));
        assert_eq!(sorted(&mut slot).len(), 3);
        // Hour h closes: the next new hour takes its slot.
        slot.totals()
            .reserve(h + 3 * HOUR, [7, 0], h + HOUR)
            .unwrap();
        assert_eq!(
            sorted(&mut slot),
            [
                (h + HOUR, [1, 2]),
                (h + 2 * HOUR, [3, 4]),
                (h + 3 * HOUR, [7, 0])
            ]
        );
        slot.take();
        slot.totals()
            .reserve(h + 4 * HOUR, [1, 1], h + 3 * HOUR)
            .unwrap();
        assert!(
            slot.changes.dedup.0.is_none(),
            "the box went with its closed hours and records"
        );
        let err = slot
            .totals()
            .reserve(h + 3 * HOUR, [LEDGER_CAP - 6, 0], h + 3 * HOUR)
            .unwrap_err();
        assert_eq!((err.item, err.recorded), (Item::Calls, 7));
        slot.totals().release(h + 4 * HOUR, [1, 1]);
        assert_eq!(
            sorted(&mut slot),
            [(h + 3 * HOUR, [7, 0]), (h + 4 * HOUR, [0, 0])]
        );
        // An hour that is not a whole hour (never seen) still adds up.
        slot.totals().seed(h + 1, Item::EgressBytes, 9);
        slot.totals().seed(h + 1, Item::EgressBytes, 1);
        assert!(slot.totals().hours().contains(&(h + 1, [0, 10])));
    }

    /// Two deltas sit inline; further ones go to the `Records` box beside
    /// the slot's overflow hours, keep their order, leave with the changes
    /// a flush takes (the hours stay), and come back whole when a failed
    /// flush merges them.
    #[test]
    fn deltas_past_two_share_the_box_and_leave_with_the_changes() {
        let h = 490_000 * HOUR;
        let listed = |p: &Pending| -> Vec<(Ts, Item, u64)> {
            p.deltas().map(|d| (d.hour(), d.item(), d.amount)).collect()
        };
        let mut slot = PendingSlot::default();
        for hour in [h, h + HOUR, h + 2 * HOUR] {
            slot.totals().reserve(hour, [1, 1], h).unwrap();
        }
        assert_eq!(
            slot.changes.dedup.hours().len(),
            1,
            "the third hour overflows"
        );
        let p = slot.changes();
        p.add(h, Item::Calls, None, 1, 5_000, h);
        p.add(h, Item::EgressBytes, None, 2, 5_000, h);
        assert!(p.dedup.spilled().is_empty(), "two deltas fit inline");
        p.add(h + HOUR, Item::Calls, None, 3, 5_000, h + HOUR);
        p.add(h + HOUR, Item::EgressBytes, None, 4, 5_000, h + HOUR);
        p.add(h, Item::EgressBytes, None, 20, 5_000, h + 1);
        p.add(h + HOUR, Item::EgressBytes, None, 40, 5_000, h + HOUR);
        assert_eq!(p.dedup.spilled().len(), 2);
        let all = [
            (h, Item::Calls, 1),
            (h, Item::EgressBytes, 22),
            (h + HOUR, Item::Calls, 3),
            (h + HOUR, Item::EgressBytes, 44),
        ];
        assert_eq!(listed(p), all);
        assert_eq!(p.oldest_hour(), Some(h));

        let taken = slot.take();
        assert_eq!(listed(&taken), all);
        assert!(slot.is_empty() && slot.get().is_none());
        assert!(slot.changes.dedup.spilled().is_empty());
        assert_eq!(slot.changes.dedup.hours().len(), 1, "the hours stay");
        assert!(taken.dedup.hours().is_empty());

        // A change after the take, then the failed flush merged back.
        slot.changes()
            .add(h + HOUR, Item::EgressBytes, None, 100, 6_000, h + HOUR);
        slot.merge(taken);
        let p = slot.get().unwrap();
        assert_eq!(
            listed(p),
            [
                (h + HOUR, Item::EgressBytes, 144),
                (h, Item::Calls, 1),
                (h, Item::EgressBytes, 22),
                (h + HOUR, Item::Calls, 3),
            ]
        );
        assert_eq!(p.since(), Some(5_000));

        // Flushed for good: the box keeps only the hours.
        let taken = slot.take();
        assert_eq!(taken.deltas().count(), 4);
        slot.shrink();
        assert!(slot.changes.dedup.spilled().is_empty());
        assert_eq!(slot.changes.dedup.hours().len(), 1);
        let mut sums = slot.totals().hours();
        sums.sort();
        assert_eq!(sums.len(), 3);
    }
}
