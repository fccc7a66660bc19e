//! The background flusher: moves unflushed usage from the meter to the store.
//!
//! Every `flush_interval`, or sooner once many accounts are dirty, it takes
//! the dirty accounts' [`Pending`] changes, a chunk of at most
//! `batch_accounts` accounts at a time, and writes each chunk as one
//! [`FlushBatch`] in one transaction.
//!
//! - A **transient** failure (the store is busy or unreachable) puts the
//!   chunk's changes back into its accounts, at the head of the queue, and
//!   the flusher retries with exponential backoff while the hot path keeps
//!   serving: nothing is lost.
//! - A **permanent** failure (the store refuses the data itself, such as an
//!   amount it cannot hold) is narrowed down by splitting the chunk in
//!   halves until the accounts that cause it are found. Those are set aside
//!   (logged, counted in `packmeter_flush_set_aside_accounts`, kept in
//!   memory and written to the spill file at shutdown); everything else
//!   keeps flowing.
//!
//! The flush's work runs at a lower priority than the calls, so that it
//! stays out of their tail, until the oldest unflushed change is
//! `--flush-max-lag` old (by default [`LATE_AFTER_INTERVALS`] flush
//! intervals); a late batch runs at the calls' priority, so a crash in
//! `flush` mode loses a bounded window even on a core that calls keep
//! saturated ([`Flusher::set_late_after`]). A late batch, and every
//! batch of the final flush at shutdown, may be larger, when the store
//! writes large batches more cheaply per account
//! ([`Store::catch_up_batch_accounts`]).
//!
//! Every batch carries a unique id that the store records, so a batch that
//! is written again (from the spill file, after a flush whose outcome was
//! unknown) is applied once. What is not yet durable is always in exactly
//! one of three places: an account's ledger, the batch being written, or
//! the store; [`Flusher::spill`] collects the first two.

use std::{
    hash::{BuildHasher, Hasher},
    sync::{
        atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicUsize, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use futures_util::StreamExt;
use tokio_util::sync::CancellationToken;

use crate::{
    background::{with_priority, Background, Priority, Slicer},
    calendar::Ts,
    clock::Clock,
    ledger::{FlushBatch, Pending},
    meter::{to_flush, AccountState, Meter},
    store::{Flushed, Store, StoreError},
};

/// What one flush did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlushReport {
    pub accounts: usize,
    pub deltas: usize,
    pub batches: usize,
    /// Accounts this flush set aside after a permanent store error.
    pub set_aside: usize,
    /// Batches written at the serving threads' priority because the
    /// flush had fallen behind (see [`Flusher::set_late_after`]).
    pub late_batches: usize,
    pub elapsed: Duration,
}

impl FlushReport {
    /// Adds another flush's counts to these.
    fn add(&mut self, other: &FlushReport) {
        self.accounts += other.accounts;
        self.deltas += other.deltas;
        self.batches += other.batches;
        self.set_aside += other.set_aside;
        self.late_batches += other.late_batches;
        self.elapsed += other.elapsed;
    }
}

/// Hooks for the flush metrics, so this module needs no metrics crate.
pub trait FlushObserver: Send + Sync + 'static {
    fn flushed(&self, report: &FlushReport);
    fn failed(&self, error: &StoreError);
    /// An account's changes were refused for good and set aside.
    fn set_aside(&self, _account: &str, _error: &StoreError) {}
}

impl FlushObserver for () {
    fn flushed(&self, _: &FlushReport) {}
    fn failed(&self, _: &StoreError) {}
}

/// An account and the changes taken from it for a batch.
type Work = Vec<(Arc<AccountState>, Pending)>;

/// Takes the accounts' unflushed changes out of them, calling `pause`
/// between accounts. Each ledger's lock is held only for its own take, so
/// a caller that holds nothing deductions wait for passes
/// [`Slicer::pause`]; one inside the journal's exclusive section, which
/// every deduction waits for, must not yield and passes a no-op.
fn take_work(accounts: Vec<Arc<AccountState>>, mut pause: impl FnMut()) -> Work {
    accounts
        .into_iter()
        .map(|a| {
            pause();
            let p = a.take_pending();
            (a, p)
        })
        .collect()
}

/// Accounts sorted at a time before [`sort_by_id`] merges them: a run
/// sorts in well under a [`Slicer`] slice.
const SORT_RUN: usize = 256;

/// Up to this many accounts (an on-time batch's 5,000 and more),
/// [`sort_by_id`] sorts in one call. Public for the tests that take the
/// other path end to end (`tests/shutdown.rs`).
#[doc(hidden)]
pub const SORT_AT_ONCE: usize = 8_192;

/// `work` in the order of `id_of` (an account's id bytes), calling
/// `pause` between pieces of the sort. One `sort_unstable_by` of a
/// 100,000-account batch held the core for milliseconds (it follows a
/// pointer to each account at every comparison); a worker waited behind it
/// for up to a scheduler tick, and so did the calls queued on it (issue
/// 14).
///
/// Each account gets a sort key first: its id's first 16 bytes as a
/// big-endian number, its length and its place, side by side in one
/// vector, so that comparisons read that vector; only ids that share
/// their first 16 bytes, one of them longer, are compared whole. The keys
/// are sorted in runs of [`SORT_RUN`], the runs merged pairwise with a
/// pause every [`SORT_RUN`] steps, and `work` put in that order in place.
fn sort_by_id<T>(
    mut work: Vec<T>,
    id_of: impl Fn(&T) -> &[u8],
    pause: &mut impl FnMut(),
) -> Vec<T> {
    let n = work.len();
    if n <= SORT_AT_ONCE {
        // An on-time batch (5,000 accounts) sorts in a fraction of a
        // millisecond, and faster without the keys.
        work.sort_by(|a, b| id_of(a).cmp(id_of(b)));
        return work;
    }
    let mut keys: Vec<(u128, usize, usize)> = Vec::with_capacity(n);
    for (i, item) in work.iter().enumerate() {
        pause();
        let id = id_of(item);
        let mut prefix = [0u8; 16];
        let head = id.len().min(16);
        prefix[..head].copy_from_slice(&id[..head]);
        keys.push((u128::from_be_bytes(prefix), id.len(), i));
    }
    // Zero-padded prefixes order as the ids do, up to a tie: then the ids
    // are equal up to 16 bytes, and the shorter comes first unless one is
    // longer than 16 bytes, when the rest decides.
    let cmp = |a: &(u128, usize, usize), b: &(u128, usize, usize)| {
        a.0.cmp(&b.0).then_with(|| match a.1.max(b.1) > 16 {
            true => id_of(&work[a.2]).cmp(id_of(&work[b.2])),
            false => a.1.cmp(&b.1),
        })
    };
    for run in keys.chunks_mut(SORT_RUN) {
        run.sort_by(cmp);
        pause();
    }
    let mut merged = keys.clone();
    let mut width = SORT_RUN;
    while width < n {
        for start in (0..n).step_by(2 * width) {
            let mid = (start + width).min(n);
            let end = (start + 2 * width).min(n);
            let (mut l, mut r) = (start, mid);
            for (k, out) in merged[start..end].iter_mut().enumerate() {
                if k % SORT_RUN == 0 {
                    pause();
                }
                // The left run on a tie: stable.
                let take_left = r >= end || (l < mid && cmp(&keys[l], &keys[r]).is_le());
                if take_left {
                    *out = keys[l];
                    l += 1;
                } else {
                    *out = keys[r];
                    r += 1;
                }
            }
        }
        std::mem::swap(&mut keys, &mut merged);
        width *= 2;
    }
    // In place: position k takes the element at keys[k]'s place, one cycle
    // of the permutation at a time (a visited position is marked with n).
    let mut order: Vec<usize> = keys.into_iter().map(|(_, _, i)| i).collect();
    for i in 0..n {
        let mut at = i;
        while order[at] != n {
            let from = order[at];
            order[at] = n;
            if from == i {
                break;
            }
            work.swap(at, from);
            at = from;
        }
    }
    work
}

/// Batches whose changes are out of their accounts and not yet known to be
/// in the store.
#[derive(Default)]
struct InFlight {
    batches: Vec<Arc<FlushBatch>>,
    /// Batches whose write failed with a transient error, to be written
    /// again, **as they are and under the same id**, before anything else:
    /// the failure may have hidden a commit (the connection died during
    /// `COMMIT`), and the store then recognises the id and skips the batch
    /// instead of applying it twice. Their accounts stay marked queued and
    /// out of the queue until then; new changes wait in their ledgers.
    /// These batches are in `batches` too (the spill file gets them).
    retry: Vec<(Work, Arc<FlushBatch>)>,
    /// Set by [`Flusher::spill`]: nothing more is taken from the accounts.
    halted: bool,
    /// Journal mode: chunks of the current take not yet made batches (see
    /// `Flusher::flush_journaled`); their changes are in no account and in
    /// no batch.
    unbuilt: usize,
}

/// The wall-clock time of the oldest change of a batch's work.
fn oldest_since(work: &Work) -> Option<Ts> {
    work.iter().filter_map(|(_, p)| p.since()).min()
}

pub struct Flusher {
    meter: Arc<Meter>,
    store: Arc<dyn Store>,
    /// Accounts per transaction.
    batch_accounts: usize,
    /// Accounts per transaction of a late batch, of the final flush and of
    /// a journaled flush
    /// ([`Store::catch_up_batch_accounts`]; at least `batch_accounts`).
    catch_up_batch_accounts: AtomicUsize,
    /// Set by [`final_flush`](Self::final_flush): every batch is a catch-up
    /// batch from then on.
    final_flushing: AtomicBool,
    /// One flush at a time: the background loop and `Admin.Flush` share it.
    /// Held across the store's await, which is why it is tokio's mutex.
    running: tokio::sync::Mutex<()>,
    observer: Arc<dyn FlushObserver>,
    /// Oldest change in the batch being written (`Ts::MAX` when none), so
    /// the oldest-unflushed metric still sees it while it is out of the queue.
    in_flight_since: AtomicI64,
    /// A short, synchronous critical section around every move of changes
    /// between accounts and batches.
    in_flight: parking_lot::Mutex<InFlight>,
    /// This process's batch ids: a random node part and a sequence.
    node: u64,
    seq: AtomicU64,
    /// Stamps each batch (the store prunes expired request ids by it).
    clock: Arc<dyn Clock>,
    /// `--durability journal`: takes are epochs, batches have intents, and
    /// a complete flush checkpoints the journal (see [`crate::journal`]).
    journal: std::sync::OnceLock<Arc<crate::journal::Journal>>,
    /// Where the flush's own CPU work runs (taking changes out of the
    /// accounts, building batches, rebasing counters): a thread at a lower
    /// priority than the serving threads, so a flush of thousands of
    /// accounts does not hold up the calls in flight (see
    /// [`crate::background`]).
    background: Background,
    /// How old, in microseconds, the oldest unflushed change may get
    /// before the flush's work runs at the serving threads' priority
    /// ([`Flusher::set_late_after`]); `u64::MAX`: never.
    late_after: AtomicU64,
}

/// How many flush intervals old the oldest unflushed change may get before
/// the flush runs at the calls' priority, unless `--flush-max-lag` says
/// otherwise (see [`Flusher::set_late_after`]).
pub const LATE_AFTER_INTERVALS: u32 = 3;

/// Accounts per flush transaction in `serve`. Larger batches measured no
/// faster at 1 M accounts and stretched the p999 (BENCHMARKS.md).
pub const BATCH_ACCOUNTS: usize = 5_000;

/// First retry delay after a failed flush; it doubles up to `MAX_BACKOFF`.
const MIN_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// While backing off longer than this, the store is probed this often, so
/// that the flush resumes within about this long of an outage's end.
const PROBE_EVERY: Duration = Duration::from_secs(1);

/// A random 64-bit number from the standard library's per-process keys.
pub fn random_u64() -> u64 {
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.write_u32(std::process::id());
    h.finish()
}

impl Flusher {
    pub fn new(
        meter: Arc<Meter>,
        store: Arc<dyn Store>,
        batch_accounts: usize,
        observer: Arc<dyn FlushObserver>,
        clock: Arc<dyn Clock>,
    ) -> Self {
        let catch_up = store
            .catch_up_batch_accounts()
            .unwrap_or(batch_accounts)
            .max(batch_accounts)
            .max(1);
        Flusher {
            meter,
            store,
            batch_accounts: batch_accounts.max(1),
            catch_up_batch_accounts: AtomicUsize::new(catch_up),
            final_flushing: AtomicBool::new(false),
            running: tokio::sync::Mutex::new(()),
            observer,
            in_flight_since: AtomicI64::new(Ts::MAX),
            in_flight: parking_lot::Mutex::new(InFlight::default()),
            node: random_u64(),
            seq: AtomicU64::new(0),
            clock,
            journal: std::sync::OnceLock::new(),
            background: Background::start("packmeter-flush"),
            late_after: AtomicU64::new(u64::MAX),
        }
    }

    /// Once the oldest unflushed change is `after` old (`None`, the
    /// default: never), the flush's work (taking changes out of the
    /// accounts, the SQLite writer, rebasing the counters) runs at the
    /// serving threads' priority instead of a lower one, batch by batch,
    /// until the flush has caught up.
    ///
    /// At the lower priority a flush gets the core only when no call wants
    /// it. On a core saturated by calls that is a tenth of it or less, and
    /// when nearly every call dirties an account of its own (100 k
    /// accounts), the flush fell behind without bound: the oldest
    /// unflushed change reached 20 s in a 20 s window, all of which a
    /// SIGKILL would lose in `flush` mode. At the calls' priority the flush
    /// gets up to about half the core (it pauses as long as it works, see
    /// [`Slicer::pause`]), and the calls slow down instead: a bounded
    /// window is what a billing sidecar promises, and a saturated core
    /// already means the node needs more CPU. `serve` sets this to
    /// `--flush-max-lag`, by default [`LATE_AFTER_INTERVALS`] flush
    /// intervals; journal mode, whose journal holds every acknowledged
    /// deduction, keeps the low priority.
    pub fn set_late_after(&self, after: Option<Duration>) {
        let micros = after.map_or(u64::MAX, |a| {
            u64::try_from(a.as_micros()).unwrap_or(u64::MAX)
        });
        self.late_after.store(micros, Ordering::Relaxed);
    }

    /// Accounts per late batch and per batch of the final flush, instead of
    /// the store's [`Store::catch_up_batch_accounts`] (at least the normal
    /// batch size).
    pub fn set_catch_up_batch_accounts(&self, accounts: usize) {
        self.catch_up_batch_accounts
            .store(accounts.max(self.batch_accounts), Ordering::Relaxed);
    }

    /// How many accounts the next batch, at `priority`, takes at most: the
    /// catch-up size once the flush is late or final. A batch's priority is
    /// chosen when it is taken, so on time the batches stay small: one
    /// taken at the low priority just before the flush falls behind then
    /// finishes soon, and the next one is late.
    fn batch_size(&self, priority: Priority) -> usize {
        if priority == Priority::Calls || self.final_flushing.load(Ordering::Relaxed) {
            self.catch_up_batch_accounts.load(Ordering::Relaxed)
        } else {
            self.batch_accounts
        }
    }

    /// The priority of the flush's next batch: the calls' once the oldest
    /// unflushed change is older than [`set_late_after`](Self::set_late_after)
    /// allows.
    fn priority(&self) -> Priority {
        if self.journal.get().is_some() {
            return Priority::Low;
        }
        let late_after = Duration::from_micros(self.late_after.load(Ordering::Relaxed));
        match self.oldest_unflushed_age(self.clock.now()) {
            Some(age) if age >= late_after => Priority::Calls,
            _ => Priority::Low,
        }
    }

    /// Journal mode; see [`crate::app::App::enable_journal`].
    pub fn enable_journal(&self, journal: Arc<crate::journal::Journal>) {
        let _ = self.journal.set(journal);
    }

    /// This process's node id: the part of its batch ids before the `-`.
    pub fn node_id(&self) -> String {
        format!("{:016x}", self.node)
    }

    /// A batch id no other batch has: this process's node part and a sequence.
    pub fn next_batch_id(&self) -> String {
        let n = self.seq.fetch_add(1, Ordering::Relaxed);
        format!("{:016x}-{n}", self.node)
    }

    fn batch(
        &self,
        work: &[(Arc<AccountState>, Pending)],
        mut pause: impl FnMut(),
    ) -> Arc<FlushBatch> {
        Arc::new(FlushBatch {
            batch_id: self.next_batch_id(),
            now: self.clock.now(),
            accounts: work
                .iter()
                .filter(|(_, p)| !p.is_empty())
                .map(|(a, p)| {
                    pause();
                    to_flush(a, p)
                })
                .collect(),
        })
    }

    /// Flushes everything acknowledged so far and returns once it is durable
    /// (or set aside, which the report counts).
    ///
    /// The work runs in its own task: if the caller goes away (a cancelled
    /// `Admin.Flush`), the flush still finishes and re-queues correctly.
    pub async fn flush(self: &Arc<Self>) -> Result<FlushReport, StoreError> {
        let this = self.clone();
        tokio::spawn(async move { this.flush_inner().await })
            .await
            .map_err(|e| StoreError::permanent(format!("flush task failed: {e}")))?
    }

    /// Runs `f` while no flush is in progress, so no changes are in flight
    /// between the meter and the store (used for settlement).
    pub async fn quiesced<T>(&self, f: impl std::future::Future<Output = T>) -> T {
        let _guard = self.running.lock().await;
        f.await
    }

    /// `account_id`'s usage in batches that failed and wait to be written
    /// again: taken from the account, not yet in the store.
    pub fn retrying(&self, account_id: &str) -> Vec<crate::daily::Entry> {
        let in_flight = self.in_flight.lock();
        in_flight
            .retry
            .iter()
            .flat_map(|(_, batch)| batch.accounts.iter())
            .filter(|a| &*a.account_id == account_id)
            .flat_map(|a| a.deltas.iter())
            .map(|d| crate::daily::Entry {
                hour: d.hour,
                item: d.item,
                covered: d.pack.is_some(),
                amount: d.amount,
            })
            .collect()
    }

    async fn flush_inner(self: &Arc<Self>) -> Result<FlushReport, StoreError> {
        let _guard = self.running.lock().await;
        let started = Instant::now();
        let mut report = FlushReport::default();
        // Batches that failed before go first, as they were.
        let retry = std::mem::take(&mut self.in_flight.lock().retry);
        let mut retry = retry.into_iter();
        while let Some((work, batch)) = retry.next() {
            let written = with_priority(self.priority(), self.write(work, batch, &mut report));
            if let Err(e) = written.await {
                // Those not tried yet keep their place, after the one that failed.
                self.in_flight.lock().retry.extend(retry);
                return Err(e);
            }
        }
        if let Some(journal) = self.journal.get() {
            return self.flush_journaled(journal, started, report).await;
        }
        // The accounts queued now; those queued during this flush wait for
        // the next one, so a flush under load still ends.
        //
        // Up to `Store::flush_concurrency` batches are written at once (a
        // shared store's server works on several transactions in
        // parallel). Their accounts are disjoint, so they neither wait for
        // nor deadlock with each other. After a failure no new batch is
        // taken, and those already being written are seen through (their
        // changes are out of their accounts) before the error is returned.
        let width = self.store.flush_concurrency().max(1);
        let mut left = self.meter.dirty_len();
        let mut writing = futures_util::stream::FuturesUnordered::new();
        let mut failed: Option<StoreError> = None;
        loop {
            while failed.is_none() && left > 0 && writing.len() < width {
                let priority = self.priority();
                let n = left.min(self.batch_size(priority));
                let this = self.clone();
                let take = self.background.run(move || this.take_chunk(n));
                let Some((work, batch)) = with_priority(priority, take).await else {
                    left = 0;
                    break;
                };
                left = left.saturating_sub(work.len().max(1));
                writing.push(with_priority(priority, async move {
                    let mut part = FlushReport::default();
                    let written = self.write(work, batch, &mut part).await;
                    if priority == Priority::Calls {
                        part.late_batches = part.batches;
                    }
                    (part, written)
                }));
            }
            let Some((part, written)) = writing.next().await else {
                break;
            };
            report.add(&part);
            if let Err(e) = written {
                failed.get_or_insert(e);
            }
        }
        if let Some(e) = failed {
            return Err(e);
        }
        self.in_flight_since.store(Ts::MAX, Ordering::Relaxed);
        report.elapsed = started.elapsed();
        self.observer.flushed(&report);
        Ok(report)
    }

    /// Journal mode: every dirty account's changes are taken in one
    /// exclusive section of the journal that also ends an epoch, so every
    /// deduction of that epoch is in this take or an earlier one (see
    /// [`crate::journal`]); then the batches are written, each after its
    /// intent is durable, and once all are in the store with nothing left
    /// to retry, the journal is checkpointed at that epoch.
    async fn flush_journaled(
        self: &Arc<Self>,
        journal: &Arc<crate::journal::Journal>,
        started: Instant,
        mut report: FlushReport,
    ) -> Result<FlushReport, StoreError> {
        let (this, j) = (self.clone(), journal.clone());
        let (epoch, taken) = self
            .background
            .run(move || {
                // Every deduction waits while the journal's section is
                // exclusive, so only the changes leave the accounts inside
                // it; the batches are sorted and built after it. (In the
                // gap the changes are in no account and in no batch in
                // flight, where `spill` would miss them; journal mode never
                // spills: the journal holds them.)
                //
                // Every dirty account is taken here, so the batches take
                // the store's catch-up size: in key order a large
                // transaction writes each page of the store's B-trees once
                // for many accounts. They all run at the low priority
                // (`priority`), so none holds the calls up.
                let size = this.catch_up_batch_accounts.load(Ordering::Relaxed);
                let (epoch, taken) = j.take(|| {
                    let mut taken = Vec::new();
                    if !this.in_flight.lock().halted {
                        loop {
                            let work = take_work(this.meter.take_dirty(size), || {});
                            if work.is_empty() {
                                break;
                            }
                            taken.push(work);
                        }
                    }
                    taken
                });
                // Each chunk becomes a batch only when its turn to be
                // written comes (`publish_journaled`), so a flush holds one
                // batch's rows at a time, not all of them: the first flush
                // after a million accounts were primed peaked at about 1 GB
                // when it built them all at once. Until then their changes
                // are counted here, by the oldest-unflushed figure.
                if let Some(oldest) = taken.iter().filter_map(oldest_since).min() {
                    this.in_flight_since.fetch_min(oldest, Ordering::Relaxed);
                }
                this.in_flight.lock().unbuilt = taken.len();
                (epoch, taken)
            })
            .await;
        let mut taken = taken.into_iter();
        while let Some(work) = taken.next() {
            let (work, batch) = self.publish_journaled(journal, work, epoch).await;
            if let Err(e) = self.write(work, batch, &mut report).await {
                // Taken already: they wait, built, with the retries.
                for work in taken {
                    let built = self.publish_journaled(journal, work, epoch).await;
                    self.in_flight.lock().retry.push(built);
                }
                return Err(e);
            }
        }
        self.in_flight_since.store(Ts::MAX, Ordering::Relaxed);
        report.elapsed = started.elapsed();
        self.observer.flushed(&report);
        if self.in_flight.lock().retry.is_empty() {
            let set_aside = self.meter.set_aside_accounts().len();
            journal.checkpoint(epoch, set_aside).await;
        }
        Ok(report)
    }

    /// Takes up to `n` accounts' changes out of the meter as one batch,
    /// published as in flight in the same critical section.
    fn take_chunk(&self, n: usize) -> Option<(Work, Arc<FlushBatch>)> {
        let mut state = self.in_flight.lock();
        if state.halted {
            return None;
        }
        let mut slicer = Slicer::new();
        let work = take_work(self.meter.take_dirty(n), || slicer.pause());
        if work.is_empty() {
            return None;
        }
        Some(self.publish(&mut state, work, &mut slicer))
    }

    /// Makes `work` a batch, published as in flight. Sorting and building
    /// it touch every account (100,000 in a catch-up batch): both pause
    /// through `slicer`, so that neither holds the core for milliseconds
    /// at a time (issue 14).
    fn publish(
        &self,
        state: &mut InFlight,
        work: Work,
        slicer: &mut Slicer,
    ) -> (Work, Arc<FlushBatch>) {
        // In key order, each transaction's upserts walk the tables' B-trees
        // forwards instead of jumping around them.
        let work = sort_by_id(work, |(a, _)| a.id_bytes(), &mut || slicer.pause());
        if let Some(oldest) = work.iter().filter_map(|(_, p)| p.since()).min() {
            // The oldest of the batches being written (several may be):
            // reset when the flush ends.
            self.in_flight_since.fetch_min(oldest, Ordering::Relaxed);
        }
        let batch = self.batch(&work, || slicer.pause());
        state.batches.push(batch.clone());
        (work, batch)
    }

    /// Batches out of their accounts and not yet known to be in the store.
    #[cfg(test)]
    fn batches_in_flight(&self) -> usize {
        self.in_flight.lock().batches.len()
    }

    /// Journal mode: makes a chunk of the take of `epoch` a batch, published
    /// as in flight and registered with the journal (on the background
    /// thread: sorting and building it touches every account).
    async fn publish_journaled(
        self: &Arc<Self>,
        journal: &Arc<crate::journal::Journal>,
        work: Work,
        epoch: u64,
    ) -> (Work, Arc<FlushBatch>) {
        let (this, journal) = (self.clone(), journal.clone());
        self.background
            .run(move || {
                let mut state = this.in_flight.lock();
                state.unbuilt = state.unbuilt.saturating_sub(1);
                let (work, batch) = this.publish(&mut state, work, &mut Slicer::new());
                journal.register(&batch.batch_id, epoch);
                (work, batch)
            })
            .await
    }

    /// Writes one chunk; on a permanent error, narrows it down by halves.
    async fn write(
        self: &Arc<Self>,
        work: Work,
        batch: Arc<FlushBatch>,
        report: &mut FlushReport,
    ) -> Result<(), StoreError> {
        let mut parts = vec![(work, batch)];
        while let Some((work, batch)) = parts.pop() {
            let written = match self.journal.get() {
                // The intent is durable before the store may commit.
                Some(j) => match j.before_write(&batch).await {
                    Ok(()) => self.store.flush_shared(batch.clone()).await,
                    Err(e) => Err(StoreError {
                        message: format!("journal: {e}"),
                        transient: true,
                    }),
                },
                None => self.store.flush_shared(batch.clone()).await,
            };
            if let (Some(j), Ok(_)) = (self.journal.get(), &written) {
                // (A batch refused for good stays known: its halves, if it
                // is narrowed down, are of its take.)
                j.resolved(&batch.batch_id);
            }
            let e = match written {
                Ok(flushed) => {
                    let this = self.clone();
                    // The batch goes to the background thread, which holds
                    // its last reference once `written` took it out of
                    // flight: its rows (100,000 accounts' at a catch-up)
                    // are counted and dropped there, a piece at a time,
                    // not on the worker that polls this flush (issue 14).
                    let (reversed, accounts, deltas) = self
                        .background
                        .run(move || {
                            let reversed = this.written(work, &batch, flushed);
                            let accounts = batch.accounts.len();
                            let deltas = match Arc::try_unwrap(batch) {
                                Ok(batch) => {
                                    let mut slicer = Slicer::new();
                                    let mut deltas = 0;
                                    for a in batch.accounts {
                                        slicer.pause();
                                        deltas += a.deltas.len();
                                    }
                                    deltas
                                }
                                Err(shared) => shared.accounts.iter().map(|a| a.deltas.len()).sum(),
                            };
                            (reversed, accounts, deltas)
                        })
                        .await;
                    for (account, id) in &reversed {
                        tracing::info!(
                            %account,
                            request_id = %id,
                            "a retry another node billed first: this node's usage for it was reversed"
                        );
                    }
                    report.batches += 1;
                    report.accounts += accounts;
                    report.deltas += deltas;
                    continue;
                }
                Err(e) => e,
            };
            // This batch is no longer in flight: its changes are back in
            // their accounts, or in the halves below, all within this one
            // critical section.
            let mut state = self.in_flight.lock();
            state.batches.retain(|b| !Arc::ptr_eq(b, &batch));
            match e {
                e if e.transient => {
                    if state.halted {
                        // Once spilled, the changes are in the spill file.
                        let mut back: Vec<_> = parts
                            .into_iter()
                            .map(|p| p.0)
                            .chain([work])
                            .flatten()
                            .map(|(a, _)| a)
                            .collect();
                        state.batches.clear();
                        drop(state);
                        back.sort_unstable_by(|a, b| a.id_bytes().cmp(b.id_bytes()));
                        self.meter.requeue_front(back);
                        self.in_flight_since.store(Ts::MAX, Ordering::Relaxed);
                        self.observer.failed(&e);
                        return Err(e);
                    }
                    // Kept, with their ids, for the next flush (see
                    // `InFlight::retry`): this one first, then the halves
                    // not yet tried.
                    state.batches.push(batch.clone());
                    state.retry.push((work, batch));
                    state.retry.extend(parts.into_iter().rev());
                    let oldest = state
                        .retry
                        .iter()
                        .filter_map(|(w, _)| oldest_since(w))
                        .min();
                    drop(state);
                    self.in_flight_since
                        .store(oldest.unwrap_or(Ts::MAX), Ordering::Relaxed);
                    self.observer.failed(&e);
                    return Err(e);
                }
                e if work.len() > 1 => {
                    // Permanent: one of these accounts holds what the store
                    // refuses. Try each half on its own.
                    let mut first = work;
                    let second = first.split_off(first.len() / 2);
                    for half in [second, first] {
                        let b = self.batch(&half, || {});
                        if let Some(j) = self.journal.get() {
                            j.derive(&batch.batch_id, &b.batch_id);
                        }
                        state.batches.push(b.clone());
                        parts.push((half, b));
                    }
                    tracing::debug!(error = %e, "permanent flush error; narrowing the batch down");
                }
                e => {
                    for (a, p) in work {
                        tracing::error!(
                            account = %a.id(),
                            error = %e,
                            "the store refuses this account's usage; it is set aside, kept in \
                             memory and written to the spill file at shutdown"
                        );
                        self.observer.set_aside(a.id(), &e);
                        if !state.halted {
                            a.restore_pending(p);
                        }
                        self.meter.set_aside(a);
                        report.set_aside += 1;
                    }
                }
            }
        }
        Ok(())
    }

    /// After `batch` is in the store: rebases its accounts' counters on the
    /// store's totals, takes the batch out of flight, and queues again the
    /// accounts that changed meanwhile. Returns the request ids whose usage
    /// the store reversed. Runs on the background thread: it touches every
    /// account of the batch.
    fn written(
        &self,
        work: Work,
        batch: &Arc<FlushBatch>,
        flushed: Flushed,
    ) -> Vec<(Arc<str>, Box<str>)> {
        // Counters now count every node's usage (see Meter::rebase). Both
        // the work (`publish`) and the store's answer are in id byte order,
        // so one forward walk pairs them: a binary search per account took
        // about 800 instructions of the flush thread's 2.9 k per flushed
        // account (callgrind, `benches/flush.rs`). An account the walk does
        // not find at its place is still looked up.
        let by_id = |a: &AccountState| {
            flushed
                .accounts
                .binary_search_by(|t| t.account_id.as_bytes().cmp(a.id_bytes()))
                .ok()
        };
        let mut slicer = Slicer::new();
        let mut next = 0;
        let totals: Vec<_> = work
            .iter()
            .filter_map(|(a, _)| {
                slicer.pause();
                let i = match flushed.accounts.get(next) {
                    Some(t) if t.account_id.as_bytes() == a.id_bytes() => Some(next),
                    _ => by_id(a),
                }?;
                next = i + 1;
                Some((a.clone(), &flushed.accounts[i].packs[..]))
            })
            .collect();
        self.meter.rebase(&totals, || slicer.pause());
        drop(totals);
        // This batch is no longer in flight: its changes are in the store.
        let mut state = self.in_flight.lock();
        state.batches.retain(|b| !Arc::ptr_eq(b, batch));
        let again: Vec<_> = work
            .into_iter()
            .filter(|(a, _)| {
                slicer.pause();
                a.finish_flush()
            })
            .map(|(a, _)| a)
            .collect();
        // The oldest-unflushed figure stops counting this batch: once no
        // batch is in flight, it is the queue's head again. Held until the
        // flush ended, the first batch's age overstated the rest of a long
        // flush, and made every later batch of it late (`priority`). The
        // accounts requeued below had changes during the write, which the
        // figure may place up to one batch's write later than they were.
        if state.batches.is_empty() && state.retry.is_empty() && state.unbuilt == 0 {
            self.in_flight_since.store(Ts::MAX, Ordering::Relaxed);
        }
        drop(state);
        self.meter.requeue(again);
        // The store's totals go a piece at a time too.
        for t in flushed.accounts {
            slicer.pause();
            drop(t);
        }
        flushed.reversed
    }

    /// Flushes every `interval`, or when the meter asks for it, until
    /// `cancel` fires. Failures back off exponentially.
    pub async fn run(self: Arc<Self>, interval: Duration, cancel: CancellationToken) {
        let mut backoff: Option<Duration> = None;
        loop {
            let wait = backoff.unwrap_or(interval);
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(wait) => {}
                _ = self.meter.flush_wanted(), if backoff.is_none() => {}
                _ = self.store_back(), if backoff.is_some_and(|b| b > PROBE_EVERY) => {
                    tracing::info!("the store answers again; flushing");
                }
            }
            match self.flush().await {
                Ok(_) => backoff = None,
                Err(e) => {
                    let next = backoff.map_or(MIN_BACKOFF, |b| (b * 2).min(MAX_BACKOFF));
                    tracing::warn!(error = %e, transient = e.transient, retry_in = ?next, "flush failed; usage kept in memory");
                    backoff = Some(next);
                }
            }
        }
    }

    /// Returns once the store, having failed to answer a probe, answers
    /// one: probed at once and then every [`PROBE_EVERY`], each probe
    /// bounded by as much. While backing off after failed flushes, this
    /// ends the wait within about a second of an outage's end, instead of
    /// up to [`MAX_BACKOFF`] later. A store that answers probes all along
    /// (and refuses writes) never ends it: the flusher then keeps to its
    /// backoff rather than retry every second.
    async fn store_back(&self) {
        let mut was_down = false;
        for probe in 0u64.. {
            if probe > 0 {
                tokio::time::sleep(PROBE_EVERY).await;
            }
            let up = matches!(
                tokio::time::timeout(PROBE_EVERY, self.store.ping()).await,
                Ok(Ok(()))
            );
            if up && was_down {
                return;
            }
            was_down |= !up;
        }
    }

    /// The final flush at shutdown: flushes until nothing is queued,
    /// retrying transient failures with backoff, until `deadline`. Call it
    /// once no deduction can be acknowledged any more (the gate is closed).
    pub async fn final_flush(
        self: &Arc<Self>,
        deadline: tokio::time::Instant,
    ) -> Result<FlushReport, StoreError> {
        // No call is served any more, so the flush has the core to itself
        // at the low priority too, where a late batch's pauses would only
        // slow it down.
        self.set_late_after(None);
        // And in the store's catch-up batches: the whole queue is to be
        // written before the grace period ends.
        self.final_flushing.store(true, Ordering::Relaxed);
        let attempt = async {
            let mut total = FlushReport::default();
            let mut delay = MIN_BACKOFF;
            loop {
                match self.flush().await {
                    Ok(r) => {
                        total.add(&r);
                        if self.meter.dirty_len() == 0 && self.in_flight.lock().retry.is_empty() {
                            return Ok(total);
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "final flush failed; retrying");
                        tokio::time::sleep(delay).await;
                        delay = (delay * 2).min(MAX_BACKOFF);
                    }
                }
            }
        };
        tokio::time::timeout_at(deadline, attempt)
            .await
            .unwrap_or_else(|_| {
                Err(StoreError::permanent(
                    "the final flush did not finish within the shutdown grace period",
                ))
            })
    }

    /// Stops all flushing and returns everything not yet known to be in the
    /// store: the batch being written, if any, and every account's unflushed
    /// changes (queued or set aside), as batches with fresh ids. The
    /// accounts' ledgers are emptied. For the spill file at shutdown.
    pub fn spill(&self) -> Vec<Arc<FlushBatch>> {
        let mut state = self.in_flight.lock();
        state.halted = true;
        let mut out = std::mem::take(&mut state.batches);
        let mut accounts = self.meter.unflushed_accounts();
        // Accounts of batches awaiting a retry: changes since then.
        accounts.extend(
            std::mem::take(&mut state.retry)
                .into_iter()
                .flat_map(|(w, _)| w.into_iter().map(|(a, _)| a)),
        );
        let mut work = take_work(accounts, || {});
        work.retain(|(_, p)| !p.is_empty());
        for chunk in work.chunks(self.batch_accounts) {
            out.push(self.batch(chunk, || {}));
        }
        out
    }

    /// Wall-clock age of the oldest unflushed change, at `now`: in the
    /// batch being written, or at the head of the queue.
    pub fn oldest_unflushed_age(&self, now: Ts) -> Option<Duration> {
        let in_flight =
            Some(self.in_flight_since.load(Ordering::Relaxed)).filter(|s| *s != Ts::MAX);
        let since = in_flight
            .into_iter()
            .chain(self.meter.oldest_dirty_since())
            .min();
        since.map(|s| Duration::from_micros(u64::try_from(now.saturating_sub(s)).unwrap_or(0)))
    }

    /// The earliest hour in batches awaiting a retry (for settlement:
    /// their usage is not in the store yet, nor in the accounts' ledgers).
    pub fn retry_oldest_hour(&self) -> Option<Ts> {
        self.in_flight
            .lock()
            .retry
            .iter()
            .flat_map(|(_, b)| {
                b.accounts
                    .iter()
                    .flat_map(|a| a.deltas.iter().map(|d| d.hour))
            })
            .min()
    }

    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }
}

#[cfg(test)]
mod tests {
    use async_trait::async_trait;

    use super::*;
    use crate::{
        app::{App, DeductRequest},
        clock::ManualClock,
        ledger::{AccountRecord, UsageKey, UsageRow},
        meter::{Atomicity, Deduction, MeterConfig},
        metrics::Metrics,
        packs::PackSpec,
        store::{sqlite::SqliteStore, Flushed, Granted, LoadedAccount, StoredPack},
    };

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(16))]

        /// The pausing sort orders as a stable sort by id bytes does,
        /// keeping every element (ids may repeat, be empty, share their
        /// first 16 bytes, or hold zero bytes).
        #[test]
        fn the_pausing_sort_orders_as_a_stable_sort_does(
            ids in proptest::collection::vec(
                "[a-c]{0,3}|[a-z0-9]{0,20}|acct-0000000000-[a-c]{0,3}|[a\\x00]{14,18}",
                0..20_000,
            ),
        ) {
            let items: Vec<(String, usize)> = ids.into_iter().enumerate().map(|(i, id)| (id, i)).collect();
            let mut want = items.clone();
            want.sort_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
            let got = sort_by_id(items, |(id, _)| id.as_bytes(), &mut || {});
            proptest::prop_assert_eq!(got, want);
        }
    }

    /// The sort itself pauses: after the ids are copied, once per run and
    /// every run's length of merge steps, where one `sort_unstable_by` of
    /// the accounts never paused.
    #[test]
    fn the_sort_of_a_large_batch_pauses_as_it_goes() {
        let n: usize = 10_000;
        let items: Vec<String> = (0..n)
            .map(|i| format!("acct-{:06}", (i * 7919) % n))
            .collect();
        let copied = std::cell::Cell::new(0);
        let mut pauses_sorting = 0;
        let sorted = sort_by_id(
            items,
            |id| {
                copied.set(copied.get() + 1);
                id.as_bytes()
            },
            &mut || {
                if copied.get() == n {
                    pauses_sorting += 1;
                }
            },
        );
        assert!(sorted.windows(2).all(|w| w[0] < w[1]));
        let runs = n.div_ceil(SORT_RUN);
        let passes = (runs as f64).log2().ceil() as usize;
        assert!(
            pauses_sorting >= runs * (1 + passes),
            "{pauses_sorting} pauses while sorting {n} ids"
        );
    }

    /// The real SQLite store, which can be told to report a transient error
    /// after its next flush *committed*: what a connection that dies during
    /// `COMMIT` looks like to the flusher.
    ///
    /// It also notes how many batches the flusher had in flight at each
    /// flush it was asked for, once told of the flusher.
    struct LostCommit {
        store: SqliteStore,
        /// After this many more flushes, the next one's commit is lost
        /// (`usize::MAX`: never).
        lose_after: AtomicUsize,
        flusher: std::sync::OnceLock<std::sync::Weak<Flusher>>,
        in_flight_seen: parking_lot::Mutex<Vec<usize>>,
    }

    impl LostCommit {
        fn open(dir: &tempfile::TempDir) -> LostCommit {
            LostCommit {
                store: SqliteStore::open(dir.path().join("pm.db").to_str().unwrap()).unwrap(),
                lose_after: AtomicUsize::new(usize::MAX),
                flusher: Default::default(),
                in_flight_seen: Default::default(),
            }
        }

        /// Whether this flush's commit is to be lost.
        fn lose_this_one(&self) -> bool {
            let after = self.lose_after.load(Ordering::SeqCst);
            if after != usize::MAX {
                let next = after.checked_sub(1).unwrap_or(usize::MAX);
                self.lose_after.store(next, Ordering::SeqCst);
            }
            after == 0
        }
    }

    #[async_trait]
    impl Store for LostCommit {
        async fn load_account(
            &self,
            id: &str,
            since: Ts,
            now: Ts,
        ) -> Result<LoadedAccount, StoreError> {
            self.store.load_account(id, since, now).await
        }
        async fn put_account(&self, account: &AccountRecord) -> Result<(), StoreError> {
            self.store.put_account(account).await
        }
        async fn get_account(&self, id: &str) -> Result<Option<AccountRecord>, StoreError> {
            self.store.get_account(id).await
        }
        async fn grant_pack(&self, id: &str, pack: &PackSpec) -> Result<Granted, StoreError> {
            self.store.grant_pack(id, pack).await
        }
        async fn list_packs(&self, id: &str) -> Result<Vec<StoredPack>, StoreError> {
            self.store.list_packs(id).await
        }
        async fn write_batch(&self, batch: &FlushBatch) -> Result<bool, StoreError> {
            Ok(self.flush_batch(batch).await?.applied)
        }
        async fn flush_batch(&self, batch: &FlushBatch) -> Result<Flushed, StoreError> {
            if let Some(flusher) = self.flusher.get().and_then(|f| f.upgrade()) {
                self.in_flight_seen.lock().push(flusher.batches_in_flight());
            }
            let flushed = self.store.flush_batch(batch).await?;
            if self.lose_this_one() {
                return Err(StoreError {
                    message: "connection closed during COMMIT".into(),
                    transient: true,
                });
            }
            Ok(flushed)
        }
        async fn usage_rows_page(
            &self,
            from: Ts,
            to: Ts,
            account_id: Option<&str>,
            after: Option<&UsageKey>,
            limit: usize,
        ) -> Result<Vec<UsageRow>, StoreError> {
            self.store
                .usage_rows_page(from, to, account_id, after, limit)
                .await
        }
        async fn last_change(&self) -> Result<i64, StoreError> {
            self.store.last_change().await
        }
        async fn changes_since(
            &self,
            after: i64,
            limit: usize,
        ) -> Result<Vec<crate::store::Change>, StoreError> {
            self.store.changes_since(after, limit).await
        }
        async fn ping(&self) -> Result<(), StoreError> {
            self.store.ping().await
        }
        async fn settled_before(&self) -> Result<Ts, StoreError> {
            self.store.settled_before().await
        }
        async fn record_settled(&self, before: Ts) -> Result<Ts, StoreError> {
            self.store.record_settled(before).await
        }
    }

    /// Issue 8: "a per-node sequence number that the store records, so a
    /// retried flush is never applied twice". The retry is the same batch,
    /// under the same id, so a commit the error hid is recognised.
    #[tokio::test]
    async fn a_flush_retried_after_a_lost_commit_is_applied_once() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(LostCommit::open(&dir));
        let (_clock, app) = app_on(store.clone(), Arc::new(Metrics::new()), 100);
        deduct(&app, "acme", 3).await;
        store.lose_after.store(0, Ordering::SeqCst);
        assert!(app.flush().await.is_err());
        // Deductions go on meanwhile, and are flushed after the retry.
        deduct(&app, "acme", 4).await;
        assert!(app.flusher().oldest_unflushed_age(Ts::MAX).is_some());
        app.flush().await.unwrap();
        app.flush().await.unwrap();
        let rows = store
            .usage_rows_page(Ts::MIN, Ts::MAX, Some("acme"), None, 100)
            .await
            .unwrap();
        assert_eq!(rows.iter().map(|r| r.amount).sum::<u64>(), 7, "{rows:?}");
        assert_eq!(app.meter().dirty_len(), 0);
    }

    /// A flush whose oldest change is older than `set_late_after` allows
    /// writes at the calls' priority, batch by batch (counted in its
    /// report and in `packmeter_flush_late_batches_total`); one that is
    /// on time stays low. Either way the usage lands once.
    #[tokio::test]
    async fn a_flush_that_has_fallen_behind_runs_at_the_calls_priority() {
        let dir = tempfile::tempdir().unwrap();
        let metrics = Arc::new(Metrics::new());
        let (store, clock, app) = one_account_batches(&dir, metrics.clone());
        app.flusher().set_late_after(Some(Duration::from_secs(3)));
        // Late batches as small as the others, to see the priority chosen
        // batch by batch (the next test has SQLite's catch-up batches).
        app.flusher().set_catch_up_batch_accounts(1);
        // On time: 2.9 s old.
        deduct(&app, "a", 1).await;
        clock.advance(2_900_000);
        let report = app.flush().await.unwrap();
        assert_eq!((report.batches, report.late_batches), (1, 0));
        // Behind: the oldest of two accounts is 3 s old, the other 2 s.
        // One account per batch (`App::new`'s last argument): the first
        // batch is late; once it is in the store the oldest unflushed
        // change is the second's, on time, so that batch stays low.
        deduct(&app, "b", 2).await;
        clock.advance(1_000_000);
        deduct(&app, "c", 4).await;
        clock.advance(2_000_000);
        let report = app.flush().await.unwrap();
        assert_eq!((report.batches, report.late_batches), (2, 1));
        // The SQLite writer's job went to its thread at the calls'
        // priority too (the scope reaches through the store's call).
        #[cfg(target_os = "linux")]
        {
            let names: Vec<String> = std::fs::read_dir("/proc/self/task")
                .unwrap()
                .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
                .collect();
            for late in ["pm-flush-late", "pm-sqlite-write"] {
                assert!(
                    names.iter().any(|n| n.trim_end() == late),
                    "{late} in {names:?}"
                );
            }
        }
        assert!(
            metrics
                .render(0.0, 0, 0, 0)
                .contains("packmeter_flush_late_batches_total 1\n"),
            "{}",
            metrics.render(0.0, 0, 0, 0)
        );
        all_flushed(&store, &app, 7).await;
        // The final flush at shutdown, when no call is served any more,
        // stays low however late it is: there, a late batch's pauses
        // would only slow it down.
        deduct(&app, "d", 8).await;
        clock.advance(10_000_000);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        let report = app.flusher().final_flush(deadline).await.unwrap();
        assert_eq!((report.batches, report.late_batches), (1, 0));
        assert_eq!(app.meter().dirty_len(), 0);
    }

    /// Deducts `calls` from `account_id`, which must succeed.
    async fn deduct(app: &App, account_id: &str, calls: u64) {
        let request = DeductRequest {
            account_id,
            deduction: Deduction {
                calls,
                egress_bytes: 0,
                at: None,
                request_id: "",
            },
        };
        app.deduct(&[request], Atomicity::Each).await.unwrap();
    }

    /// The store holds `calls` in all, and nothing waits to be flushed.
    async fn all_flushed(store: &SqliteStore, app: &App, calls: u64) {
        let rows = store
            .usage_rows_page(Ts::MIN, Ts::MAX, None, None, 100)
            .await
            .unwrap();
        assert_eq!(
            rows.iter().map(|r| r.amount).sum::<u64>(),
            calls,
            "{rows:?}"
        );
        assert_eq!(app.meter().dirty_len(), 0);
    }

    /// An app on a real SQLite file in `dir`, on a manual clock, whose
    /// flushes take one account per batch (`App::new`'s last argument).
    fn one_account_batches(
        dir: &tempfile::TempDir,
        metrics: Arc<Metrics>,
    ) -> (Arc<SqliteStore>, Arc<ManualClock>, App) {
        let store =
            Arc::new(SqliteStore::open(dir.path().join("pm.db").to_str().unwrap()).unwrap());
        let (clock, app) = app_on(store.clone(), metrics, 1);
        (store, clock, app)
    }

    /// An app on `store`, on a manual clock, whose flushes on time take
    /// `batch_accounts` accounts per batch (`App::new`'s last argument).
    fn app_on(
        store: Arc<dyn Store>,
        metrics: Arc<Metrics>,
        batch_accounts: usize,
    ) -> (Arc<ManualClock>, App) {
        let clock = Arc::new(ManualClock::new(1_700_000_000_000_000));
        let app = App::new(
            MeterConfig::default(),
            store,
            metrics,
            clock.clone(),
            batch_accounts,
        );
        (clock, app)
    }

    /// Puts `app` in journal mode, with a journal beside the store in `dir`.
    fn enable_journal(dir: &tempfile::TempDir, app: &App) -> Arc<crate::journal::Journal> {
        let jdir = dir.path().join("pm.db.journal");
        let replayed = crate::journal::replay(&jdir, &dir.path().join("spill"), 1).unwrap();
        let journal = crate::journal::Journal::open(&jdir, &replayed, Arc::new(())).unwrap();
        app.enable_journal(journal.clone());
        journal
    }

    /// SQLite writes a large batch more cheaply per account
    /// (`Store::catch_up_batch_accounts`): a late flush, and the final
    /// flush at shutdown, take that many accounts per batch; a flush on
    /// time keeps the usual size.
    #[tokio::test]
    async fn late_and_final_flushes_take_the_stores_catch_up_batches() {
        let dir = tempfile::tempdir().unwrap();
        let (store, clock, app) = one_account_batches(&dir, Arc::new(Metrics::new()));
        app.flusher().set_late_after(Some(Duration::from_secs(3)));
        for account_id in ["a", "b"] {
            deduct(&app, account_id, 1).await;
        }
        let report = app.flush().await.unwrap();
        assert_eq!((report.batches, report.late_batches), (2, 0));
        for account_id in ["c", "d", "e"] {
            deduct(&app, account_id, 1).await;
        }
        clock.advance(3_000_000);
        let report = app.flush().await.unwrap();
        assert_eq!((report.batches, report.late_batches), (1, 1));
        for account_id in ["f", "g"] {
            deduct(&app, account_id, 1).await;
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        let report = app.flusher().final_flush(deadline).await.unwrap();
        assert_eq!((report.batches, report.late_batches), (1, 0));
        all_flushed(&store, &app, 7).await;
    }

    /// Journal mode takes every dirty account at once, at the low priority:
    /// its batches take the store's catch-up size.
    #[tokio::test]
    async fn a_journaled_flush_takes_the_stores_catch_up_batches() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _clock, app) = one_account_batches(&dir, Arc::new(Metrics::new()));
        let journal = enable_journal(&dir, &app);
        for account_id in ["a", "b", "c"] {
            deduct(&app, account_id, 2).await;
        }
        let report = app.flush().await.unwrap();
        assert_eq!((report.batches, report.accounts), (1, 3));
        all_flushed(&store, &app, 6).await;
        journal.close();
    }

    /// An app in journal mode on `store`, whose flushes take one account
    /// per batch, and the journal.
    fn journaled(
        dir: &tempfile::TempDir,
        store: Arc<LostCommit>,
    ) -> (App, Arc<crate::journal::Journal>) {
        let (_clock, app) = app_on(store.clone(), Arc::new(Metrics::new()), 1);
        app.flusher().set_catch_up_batch_accounts(1);
        let _ = store.flusher.set(Arc::downgrade(app.flusher()));
        let journal = enable_journal(dir, &app);
        (app, journal)
    }

    /// A journaled flush takes every dirty account at once, but builds
    /// each batch only when it is to be written: one batch's rows in
    /// memory at a time, not the whole take's.
    #[tokio::test]
    async fn a_journaled_flush_builds_one_batch_at_a_time() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(LostCommit::open(&dir));
        let (app, journal) = journaled(&dir, store.clone());
        for account_id in ["a", "b", "c"] {
            deduct(&app, account_id, 2).await;
        }
        let report = app.flush().await.unwrap();
        assert_eq!((report.batches, report.accounts), (3, 3));
        assert_eq!(*store.in_flight_seen.lock(), [1, 1, 1]);
        all_flushed(&store.store, &app, 6).await;
        journal.close();
    }

    /// A journaled flush whose second batch's commit is lost keeps that
    /// batch and the one not yet built for the next flush, which writes
    /// each once.
    #[tokio::test]
    async fn a_journaled_flush_that_loses_a_commit_writes_the_rest_once_later() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(LostCommit::open(&dir));
        let (app, journal) = journaled(&dir, store.clone());
        for (account_id, calls) in [("a", 2), ("b", 3), ("c", 4)] {
            deduct(&app, account_id, calls).await;
        }
        store.lose_after.store(1, Ordering::SeqCst);
        assert!(app.flush().await.is_err());
        assert_eq!(app.flusher().batches_in_flight(), 2);
        assert!(app.flusher().oldest_unflushed_age(Ts::MAX).is_some());
        deduct(&app, "a", 5).await;
        app.flush().await.unwrap();
        app.flush().await.unwrap();
        all_flushed(&store.store, &app, 14).await;
        assert_eq!(app.flusher().batches_in_flight(), 0);
        journal.close();
    }
}
