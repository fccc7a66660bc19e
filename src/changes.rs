//! Changes reach every node: a grant or an account change made through any
//! node is applied to every other node that holds the account, within about
//! one flush interval.
//!
//! The store records each [`Store::put_account`] and new
//! [`Store::grant_pack`] as a [`Change`] row in the transaction that makes
//! it. Every node polls the rows after its cursor once per flush interval
//! and, for each changed account it holds in memory, re-reads the account
//! from the store and applies it ([`App::apply_stored_account`]). Accounts
//! that are not resident need nothing: they are read fresh when loaded.
//!
//! Why a cursor and not `LISTEN/NOTIFY`: CockroachDB and YugabyteDB have no
//! `NOTIFY`, a notification sent while a node is disconnected is lost
//! (it would need a full resync after every reconnect anyway), and a poll
//! of an indexed table once per flush interval costs next to nothing.
//!
//! **Sequence gaps.** Sequence numbers are taken when a transaction inserts
//! its row but become visible when it commits, so two transactions can
//! commit their numbers out of order: a node that saw 8 may see 7 only
//! later. (Numbers are not dense either: a rolled-back transaction leaves a
//! hole for ever, so a hole cannot be waited for.) So the
//! poller does not read after the highest number it saw, but after the
//! highest number it saw [`GAP_WINDOW`] ago: every poll re-reads the trailing
//! window, skips the rows it already applied, and picks up a late commit
//! as long as it lands within the window. The change row is the last
//! statement before the commit, so its number is taken one round trip
//! before the commit is sent.
//!
//! A change to an account that is not resident is not marked applied:
//! while it stays in the window it is looked at again on every poll, so an
//! account whose load read the store just before the change committed is
//! still brought up to date.

use std::{
    collections::{BTreeSet, HashSet, VecDeque},
    sync::Arc,
    time::{Duration, Instant},
};

use tokio_util::sync::CancellationToken;

use crate::{app::App, store::Change};

/// How long after a higher sequence number becomes visible a lower one is
/// still looked for: twice the longest a store call may take (a transaction
/// still open after that has been abandoned).
pub const GAP_WINDOW: Duration = Duration::from_secs(60);

/// Rows read per query.
const PAGE: usize = 1_000;

/// A node's position in the change log.
pub struct ChangeCursor {
    /// Every change at or below this is applied or out of the window.
    floor: i64,
    /// The highest number seen.
    high: i64,
    /// `(when, high)` after each poll, for the trailing window.
    history: VecDeque<(Instant, i64)>,
    /// Numbers above `floor` already applied.
    applied: BTreeSet<i64>,
}

impl ChangeCursor {
    /// Starts after `last`, the store's newest change: accounts are loaded
    /// fresh, so nothing before it matters.
    pub fn starting_after(last: i64) -> ChangeCursor {
        ChangeCursor {
            floor: last,
            high: last,
            history: VecDeque::new(),
            applied: BTreeSet::new(),
        }
    }

    /// Reads the changes after the window's start and applies the new ones
    /// to resident accounts. Returns how many accounts were refreshed. On an
    /// error nothing moves: the next poll reads the same rows again.
    pub async fn poll(&mut self, app: &App) -> Result<usize, crate::meter::MeterError> {
        let mut rows: Vec<Change> = Vec::new();
        let mut after = self.floor;
        loop {
            let page = app.store().changes_since(after, PAGE).await?;
            let short = page.len() < PAGE;
            if let Some(last) = page.last() {
                after = last.seq;
            }
            rows.extend(page);
            if short {
                break;
            }
        }
        // One refresh per account, whatever number of changes it had.
        let mut refreshed = HashSet::new();
        let mut count = 0;
        for c in &rows {
            self.high = self.high.max(c.seq);
            if self.applied.contains(&c.seq) {
                continue;
            }
            if refreshed.contains(c.account_id.as_str()) {
                self.applied.insert(c.seq);
                continue;
            }
            if app.apply_stored_account(&c.account_id).await? {
                refreshed.insert(c.account_id.as_str());
                self.applied.insert(c.seq);
                count += 1;
            }
        }
        self.advance(Instant::now());
        Ok(count)
    }

    /// Moves the window's start to the highest number seen `GAP_WINDOW` ago.
    fn advance(&mut self, now: Instant) {
        self.history.push_back((now, self.high));
        while let Some(&(at, high)) = self.history.front() {
            if now.duration_since(at) < GAP_WINDOW {
                break;
            }
            self.floor = self.floor.max(high);
            self.history.pop_front();
        }
        let floor = self.floor;
        self.applied.retain(|&s| s > floor);
    }
}

/// Polls for changes every `every` until `stop`; started by `serve` beside
/// the flusher for a store that many nodes share. Errors are logged and
/// retried at the next interval.
pub async fn run(
    app: Arc<App>,
    mut cursor: ChangeCursor,
    every: Duration,
    stop: CancellationToken,
) {
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
        match cursor.poll(&app).await {
            Ok(0) => {}
            Ok(n) => tracing::debug!(accounts = n, "applied changes made through other nodes"),
            Err(e) => {
                tracing::warn!(error = %e, "cannot read changes made through other nodes; retrying")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_window_start_trails_the_highest_number_by_the_gap_window() {
        let mut c = ChangeCursor::starting_after(5);
        let t0 = Instant::now();
        c.high = 9;
        c.applied.extend([6, 9]);
        c.advance(t0);
        // 7 and 8 may still commit: nothing moves yet.
        assert_eq!(c.floor, 5);
        c.high = 12;
        c.advance(t0 + GAP_WINDOW / 2);
        assert_eq!(c.floor, 5);
        c.advance(t0 + GAP_WINDOW);
        assert_eq!(c.floor, 9);
        assert_eq!(
            c.applied.iter().copied().collect::<Vec<_>>(),
            [] as [i64; 0]
        );
        c.advance(t0 + GAP_WINDOW * 2);
        assert_eq!(c.floor, 12);
    }
}
