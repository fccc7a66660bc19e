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

/// Rows per page read by exports. One page is about 150 KiB of rows in
/// memory and one short indexed read on the store's reader connection:
/// large enough that the cost of a read is spread over many rows, small
/// enough that an account load queued behind a page read waits little.
pub const PAGE_ROWS: usize = 1_000;

/// The usage rows with `from <= hour < to`, optionally of one account, in
/// [`UsageKey`] order, read from `store` a page of `page` rows at a time
/// (at least 1) as the stream is polled; then the adjustment rows of plan
/// changes (R8, [`crate::recalc`]) in the same bounds, in the same order.
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
        adjustments_read: from >= to,
    };
    futures_util::stream::try_unfold(pager, |mut p| async move {
        loop {
            if let Some(row) = p.rows.next() {
                return Ok(Some((row, p)));
            }
            if p.done {
                if p.adjustments_read {
                    return Ok(None);
                }
                // After the usage rows, the plan changes' adjustment rows
                // of the same hours (R8): few, read at once.
                let rows = p
                    .store
                    .adjustment_rows(p.from, p.to, p.account.as_deref())
                    .await?;
                p.adjustments_read = true;
                p.rows = rows.into_iter();
                continue;
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
    /// The adjustment rows have been read (they follow the usage rows).
    adjustments_read: bool,
}

impl Pager {
    /// Reads the page after the last row read. An error ends the stream
    /// (`try_unfold` stops after yielding it).
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
            .await?;
        self.check(&rows)?;
        self.done = rows.len() < self.page;
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

#[cfg(test)]
mod tests {
    use std::{
        sync::atomic::{AtomicUsize, Ordering},
        time::Duration,
    };

    use async_trait::async_trait;
    use futures_util::{StreamExt, TryStreamExt};

    use super::*;
    use crate::{
        calendar::HOUR,
        ledger::{AccountFlush, AccountRecord, DeltaRow, FlushBatch},
        packs::{Item, PackSpec},
        store::{sqlite::SqliteStore, Granted, LoadedAccount, StoredPack},
    };

    /// The real SQLite store, counting the pages read through it; with
    /// `rewind`, it also forgets every cursor, as a broken store would.
    struct Counted {
        store: SqliteStore,
        pages: AtomicUsize,
        rewind: bool,
    }

    #[async_trait]
    impl Store for Counted {
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
            self.store.write_batch(batch).await
        }
        async fn usage_rows_page(
            &self,
            from: Ts,
            to: Ts,
            account_id: Option<&str>,
            after: Option<&UsageKey>,
            limit: usize,
        ) -> Result<Vec<UsageRow>, StoreError> {
            self.pages.fetch_add(1, Ordering::SeqCst);
            let after = if self.rewind { None } else { after };
            self.store
                .usage_rows_page(from, to, account_id, after, limit)
                .await
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
    }

    /// A flush of `accounts` accounts, each with calls on a pack and as
    /// overage, and egress as overage, in each of `hours` hours: three rows
    /// per account and hour.
    fn usage(n_accounts: usize, hours: i64) -> FlushBatch {
        let accounts = (0..n_accounts)
            .map(|a| {
                let id = format!("acct-{a}");
                let pack =
                    crate::packs::tests::purchased(&format!("p-{a}"), 1 << 40, 1, 1 << 60, 0);
                let deltas = (0..hours)
                    .flat_map(|h| {
                        let n = a as u64 * 100 + h as u64 + 1;
                        [
                            (Item::Calls, Some(pack.clone()), n),
                            (Item::Calls, None, 2 * n),
                            (Item::EgressBytes, None, 3 * n),
                        ]
                        .map(|(item, pack, amount)| DeltaRow {
                            hour: h * HOUR,
                            item,
                            pack,
                            amount,
                            span: None,
                        })
                    })
                    .collect();
                AccountFlush {
                    account_id: id.into(),
                    account: None,
                    deltas,
                    dedup: Vec::new(),
                }
            })
            .collect();
        FlushBatch {
            batch_id: format!("usage-{n_accounts}-{hours}"),
            accounts,
            now: 0,
        }
    }

    async fn store_with(batch: &FlushBatch, rewind: bool) -> (tempfile::TempDir, Arc<Counted>) {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(dir.path().join("pm.db").to_str().unwrap()).unwrap();
        store.write_batch(batch).await.unwrap();
        let counted = Counted {
            store,
            pages: AtomicUsize::new(0),
            rewind,
        };
        (dir, Arc::new(counted))
    }

    /// Every row in range, read in one page straight from the store.
    async fn in_one_read(
        store: &Counted,
        from: Ts,
        to: Ts,
        account: Option<&str>,
    ) -> Vec<UsageRow> {
        store
            .store
            .usage_rows_page(from, to, account, None, usize::MAX)
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn streams_every_row_in_range_once_in_key_order() {
        let (_dir, store) = store_with(&usage(7, 5), false).await;
        let all = in_one_read(&store, 0, 5 * HOUR, None).await;
        assert_eq!(all.len(), 7 * 5 * 3);
        assert!(all.windows(2).all(|w| w[0].key() < w[1].key()));
        for (from, to, account) in [
            (0, 5 * HOUR, None),
            (HOUR, 4 * HOUR, None),
            (HOUR + 1, 4 * HOUR - 1, None),
            (0, 5 * HOUR, Some("acct-3")),
            (2 * HOUR, 3 * HOUR, Some("acct-3")),
            (0, 5 * HOUR, Some("nobody")),
        ] {
            let want = in_one_read(&store, from, to, account).await;
            assert!(want.iter().all(|r| from <= r.hour && r.hour < to));
            for page in [1, 2, 3, 14, 15, 16, PAGE_ROWS] {
                let store: Arc<dyn Store> = store.clone();
                let got: Vec<UsageRow> =
                    settled_rows(store, from, to, account.map(str::to_string), page)
                        .try_collect()
                        .await
                        .unwrap();
                assert_eq!(got, want, "{from}..{to} {account:?} page {page}");
            }
        }
        // Nothing at all past `to`, however the rows fall.
        let got: Vec<UsageRow> = settled_rows(store.clone(), 0, 2 * HOUR, None, 4)
            .try_collect()
            .await
            .unwrap();
        assert_eq!(got.len(), 7 * 2 * 3);
        assert!(got.iter().all(|r| r.hour < 2 * HOUR));
    }

    #[tokio::test]
    async fn reads_a_page_only_once_the_consumer_has_taken_the_last_one() {
        // acct-1 has 60 rows: six full pages of 10, then an empty one.
        let (_dir, store) = store_with(&usage(2, 20), false).await;
        let pages = || store.pages.load(Ordering::SeqCst);
        let rows = settled_rows(store.clone(), 0, 20 * HOUR, Some("acct-1".into()), 10);
        let mut rows = std::pin::pin!(rows);
        assert_eq!(pages(), 0, "nothing is read before the first poll");
        let first = rows.next().await.unwrap().unwrap();
        assert_eq!(pages(), 1);
        for _ in 1..10 {
            rows.next().await.unwrap().unwrap();
        }
        assert_eq!(pages(), 1, "ten rows from one page");
        let eleventh = rows.next().await.unwrap().unwrap();
        assert_eq!(pages(), 2);
        assert!(first.key() < eleventh.key());

        // The consumer now stalls with the stream open. The store is free:
        // a flush commits and an account loads.
        let guard = Duration::from_secs(60);
        tokio::time::timeout(guard, store.write_batch(&usage(3, 1)))
            .await
            .expect("a flush waited for the open export")
            .unwrap();
        let loaded = tokio::time::timeout(guard, store.load_account("acct-2", 0, 0))
            .await
            .expect("an account load waited for the open export")
            .unwrap();
        // ... and sees what the flush just wrote.
        assert_eq!(loaded.packs.len(), 1);
        assert_eq!(loaded.packs[0].used, 201);

        let rest: Vec<UsageRow> = rows.try_collect().await.unwrap();
        assert_eq!(rest.len(), 60 - 11);
        assert_eq!(pages(), 7, "six full pages and the empty one that ends it");
    }

    #[tokio::test]
    async fn an_empty_range_reads_nothing() {
        let (_dir, store) = store_with(&usage(2, 2), false).await;
        for (from, to) in [(HOUR, HOUR), (2 * HOUR, HOUR)] {
            let got: Vec<UsageRow> = settled_rows(store.clone(), from, to, None, 10)
                .try_collect()
                .await
                .unwrap();
            assert!(got.is_empty());
        }
        assert_eq!(store.pages.load(Ordering::SeqCst), 0);
    }

    #[tokio::test]
    async fn a_store_that_does_not_move_forwards_ends_the_export_with_an_error() {
        let (_dir, store) = store_with(&usage(2, 10), true).await;
        let mut rows = std::pin::pin!(settled_rows(store.clone(), 0, 10 * HOUR, None, 4));
        let mut taken = 0;
        let err = loop {
            match rows.next().await {
                Some(Ok(_)) => taken += 1,
                Some(Err(e)) => break e,
                None => panic!("the export ended without an error after {taken} rows"),
            }
        };
        assert_eq!(taken, 4, "the first page, then the repeated one is refused");
        assert!(err.message.contains("out of order"), "{err}");
        assert!(rows.next().await.is_none(), "nothing after the error");
        assert_eq!(store.pages.load(Ordering::SeqCst), 2);
    }
}
