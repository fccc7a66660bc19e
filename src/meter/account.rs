//! One resident account: its activation and flags, the counters of the
//! packs that can still take deductions, its remembered request ids and its
//! unflushed changes.

use std::sync::{
    atomic::{AtomicBool, AtomicI64, AtomicU32, Ordering::Relaxed},
    Arc,
};

use arc_swap::ArcSwapAny;
use arcstr::ArcStr;
use once_cell::race::OnceBox;
use parking_lot::{Mutex, MutexGuard};

use super::dedup::DedupTable;
use crate::{
    calendar::{Ts, SECOND},
    ledger::{AccountFlush, AccountRecord, DeltaRow, Pending, PendingSlot},
    packs::{counter_order, PackCounter},
};

pub use crate::packs::{PackList, SharedPackList};

pub(super) const NOT_ACTIVATED: Ts = Ts::MIN;

/// The list of an account with no resident pack, shared by all of them:
/// a new account allocates no list until its first deduction.
fn no_packs() -> SharedPackList {
    static EMPTY: std::sync::LazyLock<SharedPackList> =
        std::sync::LazyLock::new(|| SharedPackList::new(PackList::new()));
    EMPTY.clone()
}

/// The longest id an [`AccountId`] holds inline.
pub const INLINE_ID_BYTES: usize = 15;

/// An account's id: inline when it is at most [`INLINE_ID_BYTES`] long
/// (`loadgen-0000001`, a short slug, a number of up to 15 digits), else an
/// [`ArcStr`].
///
/// 16 bytes. Inline, a resident account holds its id without an
/// allocation of its own (32 B under mimalloc, 48 B under glibc's
/// `malloc` for a 15-byte id), and the comparison that confirms a map
/// lookup reads the account's first line rather than one more line
/// elsewhere. A longer id costs what it did before (a thin `ArcStr` and
/// its allocation). Read it as a `str` (`Deref`).
#[derive(Clone)]
pub enum AccountId {
    Inline(InlineId),
    Shared(ArcStr),
}

/// The bytes of a short id. The length is an enum of the 16 lengths it
/// can have, so that [`AccountId`] keeps its tag in the length's unused
/// values and stays 16 bytes.
#[derive(Clone, Copy)]
pub struct InlineId {
    len: InlineLen,
    bytes: [u8; INLINE_ID_BYTES],
}

#[rustfmt::skip]
#[derive(Clone, Copy)]
#[repr(u8)]
enum InlineLen {
    L0, L1, L2, L3, L4, L5, L6, L7, L8, L9, L10, L11, L12, L13, L14, L15,
}

impl InlineLen {
    #[rustfmt::skip]
    const ALL: [InlineLen; INLINE_ID_BYTES + 1] = {
        use InlineLen::*;
        [L0, L1, L2, L3, L4, L5, L6, L7, L8, L9, L10, L11, L12, L13, L14, L15]
    };
}

impl AccountId {
    fn inline(id: &str) -> Option<AccountId> {
        let len = *InlineLen::ALL.get(id.len())?;
        let mut bytes = [0; INLINE_ID_BYTES];
        bytes[..id.len()].copy_from_slice(id.as_bytes());
        Some(AccountId::Inline(InlineId { len, bytes }))
    }
}

impl AccountId {
    /// The id's bytes, without the UTF-8 check that reading it as a `str`
    /// makes: the account map hashes and compares these, and the flush
    /// sorts by them (a `str` orders as its bytes). The check cost about
    /// 150 instructions per read of an inline id (callgrind).
    pub fn as_bytes(&self) -> &[u8] {
        match self {
            AccountId::Inline(i) => &i.bytes[..i.len as usize],
            AccountId::Shared(s) => s.as_bytes(),
        }
    }
}

impl From<&str> for AccountId {
    fn from(id: &str) -> AccountId {
        AccountId::inline(id).unwrap_or_else(|| AccountId::Shared(ArcStr::from(id)))
    }
}

/// Keeps a long id's `ArcStr` (the loading map's key) rather than copying it.
impl From<ArcStr> for AccountId {
    fn from(id: ArcStr) -> AccountId {
        AccountId::inline(&id).unwrap_or(AccountId::Shared(id))
    }
}

impl std::ops::Deref for AccountId {
    type Target = str;
    fn deref(&self) -> &str {
        match self {
            // The bytes are a whole `str`'s (`inline`), so this never
            // fails; checking a few bytes costs a few nanoseconds, and keeps
            // the crate free of `unsafe`.
            AccountId::Inline(i) => {
                std::str::from_utf8(&i.bytes[..i.len as usize]).unwrap_or_default()
            }
            AccountId::Shared(s) => s,
        }
    }
}

impl std::fmt::Display for AccountId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        str::fmt(self, f)
    }
}

impl std::fmt::Debug for AccountId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        <str as std::fmt::Debug>::fmt(self, f)
    }
}

/// One resident account.
///
/// 176 bytes, so that with its `Arc`'s two counts it takes mimalloc's 192 B
/// size class (issue 10's memory bar; it was 208 B, in the 224 B class):
/// the id is inline when short ([`AccountId`], 16 B), and the pending
/// ledger is 120 B, so that its mutex's byte fits in the same 128 B (see
/// [`PendingSlot`]).
pub struct AccountState {
    /// Inline up to 15 bytes, else a thin pointer ([`AccountId`]).
    pub(super) id: AccountId,
    /// Activation instant, or `NOT_ACTIVATED`. Set by a compare-and-swap at
    /// the first deduction (R1) or by an operator; moved back by an earlier
    /// event, only while no deduction is in progress (`Gate::exclusive`).
    pub(super) activated_at: AtomicI64,
    pub(super) suspended: AtomicBool,
    pub(super) deny_on_exhausted: AtomicBool,
    /// Packs that can still take deductions, in R6 order, their counters
    /// by value ([`PackList`]). Replaced whole (copy-on-write) when a
    /// month's free-tier packs appear, an ended month's leave, the
    /// activation moves or a pack is granted. Each version holds its own
    /// counters, so a replacement runs only while no deduction is in
    /// progress (`Gate::exclusive`): a deduction reads the list under a
    /// pass and takes from the counters of the version it read, which
    /// must then still be the current one. The routes that replace it:
    /// - `ensure_free_month` (a month's packs appear, an ended month's
    ///   leave): a deduction that needs it runs under `Gate::exclusive`
    ///   (`Meter::packs_current`, checked under the pass), and a lease
    ///   request takes the exclusive section for it;
    /// - `rebuild_free_months` and `restore` (R1 moves, operator
    ///   activations, plan switches) and `Meter::add_pack` (grants):
    ///   under `Gate::exclusive`;
    /// - `Meter::load`: before the account is resident.
    pub(super) packs: ArcSwapAny<SharedPackList>,
    /// Unflushed usage. A short, synchronous critical section.
    pub(super) pending: Mutex<PendingSlot>,
    /// Request ids seen (R10). Boxed and created on the first request id
    /// (most accounts never send one, and an empty table would still cost
    /// 56 bytes in every resident account), then kept. One word: the box
    /// holds the table's lock, and is set once without a lock of its own
    /// (a `Mutex<Option<Box<_>>>` took two words).
    dedup: OnceBox<Mutex<DedupTable>>,
    /// Held by the calls deductions of a `deny` account between checking
    /// that its packs cover the calls and taking them, so concurrent
    /// deductions never see capacity that is only briefly taken (R7).
    pub(super) deny_lock: Mutex<()>,
    /// Server time of the last request, for idle eviction: whole seconds
    /// since the epoch, rounded up (so an account is never evicted before
    /// it has been idle as long as asked), in 4 bytes that share a word
    /// with the flags (see [`touch_secs`](Self::touch_secs)).
    last_touch: AtomicU32,
}

impl std::fmt::Debug for AccountState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AccountState")
            .field("id", &self.id)
            .field("activated_at", &self.activated_at())
            .field("suspended", &self.suspended)
            .field("deny_on_exhausted", &self.deny_on_exhausted)
            .field("packs", &self.packs)
            .field("last_touch", &self.last_touch)
            .finish_non_exhaustive()
    }
}

impl AccountState {
    pub(super) fn new(
        id: impl Into<AccountId>,
        record: Option<&AccountRecord>,
        now: Ts,
    ) -> AccountState {
        AccountState {
            id: id.into(),
            activated_at: AtomicI64::new(
                record.and_then(|r| r.activated_at).unwrap_or(NOT_ACTIVATED),
            ),
            suspended: AtomicBool::new(record.is_some_and(|r| r.suspended)),
            deny_on_exhausted: AtomicBool::new(record.is_some_and(|r| r.deny_on_exhausted)),
            packs: ArcSwapAny::new(no_packs()),
            pending: Mutex::new(PendingSlot::default()),
            dedup: OnceBox::new(),
            deny_lock: Mutex::new(()),
            last_touch: AtomicU32::new(touch_secs(now)),
        }
    }

    /// The request-id table, made on first use.
    pub(super) fn dedup(&self) -> MutexGuard<'_, DedupTable> {
        self.dedup.get_or_init(Box::default).lock()
    }

    /// Claims `request_id` as a deduction does and leaves it unfinished:
    /// the state of an original still in flight, for tests of what meets
    /// it.
    #[cfg(test)]
    pub(crate) fn claim_in_flight(&self, request_id: &str, now: Ts) {
        let claim = self
            .dedup()
            .claim(request_id, now, now + crate::calendar::HOUR, SECOND);
        assert_eq!(
            claim,
            super::dedup::Claim::Fresh,
            "{request_id} was claimed before"
        );
    }

    /// The request-id table, if a request id ever came.
    pub(super) fn dedup_if_any(&self) -> Option<MutexGuard<'_, DedupTable>> {
        self.dedup.get().map(|t| t.lock())
    }

    /// Stamps the account as used at the stamp `secs` ([`touch_secs`] of
    /// the request's `now`; a group's accounts share one). Loads first:
    /// most requests come within the same second, and a store of the same
    /// value would still take the line exclusively.
    pub(super) fn touch_secs(&self, secs: u32) {
        if self.last_touch.load(Relaxed) != secs {
            self.last_touch.store(secs, Relaxed);
        }
    }

    /// When the account was last used (see `last_touch`).
    pub(super) fn last_touch(&self) -> Ts {
        Ts::from(self.last_touch.load(Relaxed)) * SECOND
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    /// The id's bytes (see [`AccountId::as_bytes`]).
    pub fn id_bytes(&self) -> &[u8] {
        self.id.as_bytes()
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
    pub fn packs(&self) -> arc_swap::Guard<SharedPackList> {
        self.packs.load()
    }

    /// Adds packs (by id, keeping existing counters' usage), drops those
    /// that can no longer take deductions, and keeps R6 order. Only with no
    /// deduction in progress, or before the account is resident: the
    /// counters are copied into the new list.
    pub(super) fn merge_packs(&self, add: impl Fn() -> Vec<PackCounter>, keep_after: Ts) {
        self.packs.rcu(|cur| {
            let mut next: PackList = cur
                .iter()
                .filter(|p| p.valid_until() > keep_after)
                .map(PackCounter::copy)
                .collect();
            for p in add() {
                if !next.iter().any(|q| q.pack_id() == p.pack_id()) {
                    next.push(p);
                }
            }
            next.sort_by(counter_order);
            // Replaced rarely, read on every deduction: no spare capacity.
            next.shrink_to_fit();
            next
        });
    }

    /// The counters a rebase on `stored` (the store's packs after a flush)
    /// would change, by their index in the current list, with their new
    /// usage: for each resident pack the
    /// store holds, its global `used` plus what this node has deducted from
    /// it and not yet flushed (the ledger's deltas for it), at most its
    /// capacity. Exact only while no deduction is in progress: a deduction
    /// takes from the counter before it records its delta. The indexes
    /// name counters of the list as it is now: apply them within the same
    /// exclusive section, before anything replaces the list.
    pub(super) fn rebase_targets(&self, stored: &[crate::store::StoredPack]) -> Vec<(usize, u64)> {
        let slot = self.pending.lock();
        let unflushed = |id: &str| -> u64 {
            slot.get().map_or(0, |p| {
                p.deltas()
                    .filter(|d| d.pack().is_some_and(|c| &**c.pack_id() == id))
                    .fold(0u64, |sum, d| sum.saturating_add(d.amount))
            })
        };
        self.packs
            .load()
            .iter()
            .enumerate()
            .filter_map(|(i, c)| {
                let s = stored.iter().find(|s| s.spec.pack_id == *c.pack_id())?;
                let target = s
                    .used
                    .saturating_add(unflushed(c.pack_id()))
                    .min(c.capacity());
                (target != c.used()).then_some((i, target))
            })
            .collect()
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
            slot.set_queued(false);
            false
        } else {
            true
        }
    }

    /// Earliest hour and wall-clock age of unflushed changes.
    pub fn pending_summary(&self) -> (Option<Ts>, Option<Ts>) {
        let slot = self.pending.lock();
        slot.get()
            .map_or((None, None), |p| (p.oldest_hour(), p.since()))
    }
    /// This account's changes not yet taken by a flush, as usage entries
    /// (covered when a pack took them, as this node deducted them).
    pub fn unflushed(&self) -> Vec<crate::daily::Entry> {
        let slot = self.pending.lock();
        slot.get().map_or_else(Vec::new, |p| {
            p.deltas()
                .map(|d| crate::daily::Entry {
                    hour: d.hour(),
                    item: d.item(),
                    covered: d.pack().is_some(),
                    amount: d.amount,
                })
                .collect()
        })
    }
}

/// `now` as `last_touch` keeps it: seconds since the epoch, rounded up,
/// within what a `u32` holds (until 2106).
pub(super) fn touch_secs(now: Ts) -> u32 {
    u32::try_from(now.saturating_add(SECOND - 1).div_euclid(SECOND).max(0)).unwrap_or(u32::MAX)
}

/// Turns an account's taken changes into the rows a store writes.
pub fn to_flush(account: &AccountState, pending: &Pending) -> AccountFlush {
    AccountFlush {
        account_id: Arc::from(&*account.id),
        account: pending.account_dirty.then(|| account.record()),
        deltas: pending
            .deltas()
            .map(|d| DeltaRow {
                hour: d.hour(),
                item: d.item(),
                pack: d.pack().map(|p| p.spec()),
                amount: d.amount,
                span: Some((d.first(), d.last())),
            })
            .collect(),
        dedup: pending.dedup.to_vec(),
    }
}
