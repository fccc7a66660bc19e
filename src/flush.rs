//! The background flusher: moves unflushed usage from the meter to the store.
//!
//! Every `flush_interval`, or sooner once many accounts are dirty, it takes
//! the dirty accounts' [`Pending`](crate::ledger::Pending) changes and writes
//! them in transactions of at most `batch_accounts` accounts. A batch the
//! store refuses is merged back into its accounts, which are queued again,
//! and the flusher retries with exponential backoff while the hot path keeps
//! serving: a failed flush loses nothing.

use std::{
    sync::{
        atomic::{AtomicI64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use tokio_util::sync::CancellationToken;

use crate::{
    calendar::{now_ts, Ts},
    ledger::FlushBatch,
    meter::{to_flush, AccountState, Meter},
    store::StoreError,
};

/// What one flush did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlushReport {
    pub accounts: usize,
    pub deltas: usize,
    pub batches: usize,
    pub elapsed: Duration,
}

/// Hooks for the flush metrics, so this module needs no metrics crate.
pub trait FlushObserver: Send + Sync + 'static {
    fn flushed(&self, report: &FlushReport);
    fn failed(&self, error: &StoreError);
}

impl FlushObserver for () {
    fn flushed(&self, _: &FlushReport) {}
    fn failed(&self, _: &StoreError) {}
}

pub struct Flusher {
    meter: Arc<Meter>,
    /// Accounts per transaction.
    batch_accounts: usize,
    /// One flush at a time: the background loop and `Admin.Flush` share it.
    /// Held across the store's await, which is why it is tokio's mutex.
    running: tokio::sync::Mutex<()>,
    observer: Arc<dyn FlushObserver>,
    /// Oldest change in the batch being written (`Ts::MAX` when none), so
    /// the oldest-unflushed metric still sees it while it is out of the queue.
    in_flight_since: AtomicI64,
}

/// Accounts per flush transaction in `serve`. Larger batches measured no
/// faster at 1 M accounts and stretched the p999 (BENCHMARKS.md).
pub const BATCH_ACCOUNTS: usize = 5_000;

/// First retry delay after a failed flush; it doubles up to `MAX_BACKOFF`.
const MIN_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(30);

impl Flusher {
    pub fn new(meter: Arc<Meter>, batch_accounts: usize, observer: Arc<dyn FlushObserver>) -> Self {
        Flusher {
            meter,
            batch_accounts: batch_accounts.max(1),
            running: tokio::sync::Mutex::new(()),
            observer,
            in_flight_since: AtomicI64::new(Ts::MAX),
        }
    }

    /// Flushes everything acknowledged so far and returns once it is durable.
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
    /// between the meter and the store (used for settled exports).
    pub async fn quiesced<T>(&self, f: impl std::future::Future<Output = T>) -> T {
        let _guard = self.running.lock().await;
        f.await
    }

    async fn flush_inner(&self) -> Result<FlushReport, StoreError> {
        let _guard = self.running.lock().await;
        let started = Instant::now();
        let mut rest: Vec<(Arc<AccountState>, _)> = self
            .meter
            .take_dirty()
            .into_iter()
            .map(|a| {
                let p = a.take_pending();
                (a, p)
            })
            .collect();
        let oldest = rest.iter().filter_map(|(_, p)| p.since).min();
        self.in_flight_since
            .store(oldest.unwrap_or(Ts::MAX), Ordering::Relaxed);
        // In key order, each transaction's upserts walk the tables' B-trees
        // forwards instead of jumping around them.
        rest.sort_unstable_by(|(a, _), (b, _)| a.id().cmp(b.id()));
        let mut report = FlushReport::default();
        while !rest.is_empty() {
            let n = rest.len().min(self.batch_accounts);
            let chunk: Vec<_> = rest.drain(..n).collect();
            let batch = FlushBatch {
                now: now_ts(),
                accounts: chunk
                    .iter()
                    .filter(|(_, p)| !p.is_empty())
                    .map(|(a, p)| to_flush(a, p))
                    .collect(),
            };
            if let Err(e) = self.meter.store().write_batch(&batch).await {
                let failed = chunk.into_iter().chain(rest);
                let mut back = Vec::new();
                for (a, p) in failed {
                    a.restore_pending(p);
                    back.push(a);
                }
                self.meter.requeue_front(back);
                self.in_flight_since.store(Ts::MAX, Ordering::Relaxed);
                self.observer.failed(&e);
                return Err(e);
            }
            report.batches += 1;
            report.accounts += batch.accounts.len();
            report.deltas += batch.accounts.iter().map(|a| a.deltas.len()).sum::<usize>();
            let again: Vec<_> = chunk
                .into_iter()
                .filter(|(a, _)| a.finish_flush())
                .map(|(a, _)| a)
                .collect();
            self.meter.requeue(again);
        }
        self.in_flight_since.store(Ts::MAX, Ordering::Relaxed);
        report.elapsed = started.elapsed();
        self.observer.flushed(&report);
        Ok(report)
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

    /// The final flush at shutdown: retries until it succeeds or `deadline`.
    pub async fn final_flush(
        self: &Arc<Self>,
        deadline: Duration,
    ) -> Result<FlushReport, StoreError> {
        let attempt = async {
            let mut delay = MIN_BACKOFF;
            loop {
                match self.flush().await {
                    Ok(r) => return Ok(r),
                    Err(e) => {
                        tracing::warn!(error = %e, "final flush failed; retrying");
                        tokio::time::sleep(delay).await;
                        delay = (delay * 2).min(MAX_BACKOFF);
                    }
                }
            }
        };
        tokio::time::timeout(deadline, attempt)
            .await
            .unwrap_or_else(|_| {
                Err(StoreError::permanent(format!(
                    "final flush did not finish within {deadline:?}"
                )))
            })
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
}
