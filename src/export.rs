//! Settled exports, streamed from the store a page at a time.
//!
//! An export may cover millions of hourly rows. [`settled_rows`] reads them
//! lazily with the store's keyset paging
//! ([`Store::usage_rows_page`]): a page is read only once the consumer has
//! taken every row of the previous one, so memory stays at one page however
//! large the export and however slow the consumer. Each page is one short
//! read; nothing (no flusher lock, no connection) is held between pages, so
//! a stalled consumer stalls neither flushes nor account loads.
//!
//! Pages are separate reads, not one snapshot. That is sound because the
//! caller passes a settled bound as `to`: rows before it never change (R12).

use std::sync::Arc;

use futures_util::Stream;

use crate::{
    calendar::Ts,
    ledger::{UsageKey, UsageRow},
    packs::Item,
    store::{Store, StoreError},
};

/// Rows per page read by exports. One page is about 100 KiB of rows in
/// memory and a few milliseconds on the store's reader connection: large
/// enough that the per-read cost vanishes, small enough that an account
/// load waiting behind a page read hardly notices.
pub const PAGE_ROWS: usize = 1_000;

/// The usage rows with `from <= hour < to`, optionally of one account, in
/// [`UsageKey`] order, read from `store` a page of `page` rows at a time
/// (at least 1) as the stream is polled.
///
/// `to` must be a settled bound, computed by the caller: rows before it
/// must no longer change while the stream runs. No row with `hour >= to` is
/// returned. A store error ends the stream after it is yielded.
pub fn settled_rows(
    store: Arc<dyn Store>,
    from: Ts,
    to: Ts,
    account: Option<String>,
    page: usize,
) -> impl Stream<Item = Result<UsageRow, StoreError>> + Send + 'static {
    let pager = Pager {
        store,
        from,
        to,
        account,
        page: page.max(1),
        after: None,
        rows: Vec::new().into_iter(),
        done: from >= to,
    };
    futures_util::stream::try_unfold(pager, |mut p| async move {
        loop {
            if let Some(row) = p.rows.next() {
                return Ok(Some((row, p)));
            }
            if p.done {
                return Ok(None);
            }
            p.next_page().await?;
        }
    })
}

/// Where an export has got to.
struct Pager {
    store: Arc<dyn Store>,
    from: Ts,
    to: Ts,
    account: Option<String>,
    page: usize,
    /// The key of the last row read.
    after: Option<UsageKey>,
    /// The rest of the current page.
    rows: std::vec::IntoIter<UsageRow>,
    /// The last page has been read.
    done: bool,
}

impl Pager {
    async fn next_page(&mut self) -> Result<(), StoreError> {
        let rows = self
            .store
            .usage_rows_page(
                self.from,
                self.to,
                self.account.as_deref(),
                self.after.as_ref(),
                self.page,
            )
            .await;
        let rows = match rows {
            Ok(rows) => rows,
            Err(e) => {
                self.done = true;
                return Err(e);
            }
        };
        self.done = rows.len() < self.page;
        if let Err(e) = self.check(&rows) {
            self.done = true;
            return Err(e);
        }
        if let Some(last) = rows.last() {
            self.after = Some(last.key());
        }
        self.rows = rows.into_iter();
        Ok(())
    }

    /// Refuses a page that does not move strictly forwards within the
    /// bounds: paging on from it could repeat rows forever, or skip some.
    fn check(&self, rows: &[UsageRow]) -> Result<(), StoreError> {
        if rows.len() > self.page {
            return Err(StoreError::permanent(format!(
                "store returned {} usage rows for a page of {}",
                rows.len(),
                self.page
            )));
        }
        let mut prev = self
            .after
            .as_ref()
            .map(|k| (k.hour, k.account_id.as_str(), k.item, k.pack_id.as_str()));
        for r in rows {
            let key = order(r);
            let in_bounds = self.from <= r.hour
                && r.hour < self.to
                && self.account.as_ref().is_none_or(|a| *a == r.account_id);
            if !in_bounds || prev.is_some_and(|p| p >= key) {
                return Err(StoreError::permanent(format!(
                    "store returned usage rows out of order or out of bounds at {key:?}"
                )));
            }
            prev = Some(key);
        }
        Ok(())
    }
}

/// A row's [`UsageKey`], borrowed.
fn order(r: &UsageRow) -> (Ts, &str, Item, &str) {
    (r.hour, r.account_id.as_str(), r.item, r.pack_id.as_str())
}
