//! Durable storage behind one trait, chosen by URL.
//!
//! - `sqlite://PATH`: the embedded default, for one node ([`sqlite`]).
//!
//! Stores are tested against real files, never mocks.

pub mod sqlite;

use std::sync::Arc;

use async_trait::async_trait;

use crate::{
    calendar::Ts,
    ledger::{AccountRecord, DedupRecord, FlushBatch, UsageKey, UsageRow},
    packs::PackSpec,
};

/// A store failure. `transient` errors (the database is busy, locked or
/// briefly unreachable) are retried by the flusher; the rest are reported.
#[derive(Debug, thiserror::Error)]
#[error("store error: {message}")]
pub struct StoreError {
    pub message: String,
    pub transient: bool,
}

impl StoreError {
    pub fn permanent(message: impl Into<String>) -> StoreError {
        StoreError {
            message: message.into(),
            transient: false,
        }
    }
}

/// A pack as stored, with the usage flushed so far.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredPack {
    pub spec: PackSpec,
    pub used: u64,
}

/// Everything needed to serve an account, read in one go on first touch.
#[derive(Clone, Debug, Default)]
pub struct LoadedAccount {
    pub account: Option<AccountRecord>,
    /// Packs still valid after the `since` given to [`Store::load_account`].
    pub packs: Vec<StoredPack>,
    /// Idempotency keys not yet expired.
    pub dedup: Vec<DedupRecord>,
    /// What each hour that ends after `since` holds per item, packs and
    /// overage together, saturating: the ledger cap's starting point.
    pub open_usage: Vec<(Ts, crate::packs::Item, u64)>,
}

impl LoadedAccount {
    /// Whether the store knows nothing of the account.
    pub fn is_unknown(&self) -> bool {
        self.account.is_none() && self.packs.is_empty()
    }
}

/// How a grant went.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Granted {
    /// The pack was created.
    New(StoredPack),
    /// A pack with this id already existed; here it is, unchanged.
    Existing(StoredPack),
}

#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Loads an account, its packs valid after `since`, and its idempotency
    /// keys unexpired at `now`.
    async fn load_account(&self, id: &str, since: Ts, now: Ts)
        -> Result<LoadedAccount, StoreError>;

    /// Creates or replaces an account row.
    async fn put_account(&self, account: &AccountRecord) -> Result<(), StoreError>;

    async fn get_account(&self, id: &str) -> Result<Option<AccountRecord>, StoreError>;

    /// Inserts a purchased pack unless one with the same id exists.
    async fn grant_pack(&self, account_id: &str, pack: &PackSpec) -> Result<Granted, StoreError>;

    /// Every pack row of the account: purchased ones, and free-tier ones
    /// that have recorded usage.
    async fn list_packs(&self, account_id: &str) -> Result<Vec<StoredPack>, StoreError>;

    /// Applies a flush in one transaction: all of it or nothing. Returns
    /// false, changing nothing, if a batch with the same id was applied
    /// before.
    async fn write_batch(&self, batch: &FlushBatch) -> Result<bool, StoreError>;

    /// One page of hourly rows with `from <= hour < to`, optionally for one
    /// account, in [`UsageKey`] order: at most `limit` rows, starting after
    /// `after` (from the first row when `None`). A short page (fewer than
    /// `limit` rows) is the last one.
    ///
    /// Each call is one short read: nothing is held between pages, so a
    /// caller may page through millions of rows, as slowly as it likes,
    /// without stalling flushes or account loads.
    async fn usage_rows_page(
        &self,
        from: Ts,
        to: Ts,
        account_id: Option<&str>,
        after: Option<&UsageKey>,
        limit: usize,
    ) -> Result<Vec<UsageRow>, StoreError>;

    /// Cheap reachability check for readiness and metrics.
    async fn ping(&self) -> Result<(), StoreError>;
}

/// Why a store URL was refused; the message says how to write it instead.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{0}")]
pub struct InvalidStoreUrl(pub String);

/// The file path a `sqlite://PATH` URL names. Parsing only: nothing is
/// opened or created, so `serve` checks the URL with this before binding.
pub fn sqlite_path(url: &str) -> Result<&str, InvalidStoreUrl> {
    let Some(path) = url.strip_prefix("sqlite://") else {
        return Err(InvalidStoreUrl(format!(
            "`{url}` is not a supported store URL; use sqlite://PATH"
        )));
    };
    if path.is_empty() {
        return Err(InvalidStoreUrl(
            "sqlite:// needs a file path, e.g. sqlite://./packmeter.db".into(),
        ));
    }
    if path.contains('\0') {
        return Err(InvalidStoreUrl(format!(
            "the path in `{}` contains a NUL character, which no file name can hold; remove it",
            url.escape_debug()
        )));
    }
    Ok(path)
}

/// Opens the store a URL names.
pub fn open(url: &str) -> Result<Arc<dyn Store>, StoreError> {
    let path = sqlite_path(url).map_err(|e| StoreError::permanent(e.0))?;
    Ok(Arc::new(sqlite::SqliteStore::open(path)?))
}

/// Where shutdown writes usage it could not flush (see [`crate::spill`]):
/// beside the SQLite file, as `PATH.unflushed`.
pub fn spill_path(url: &str) -> std::path::PathBuf {
    // `serve` has opened the store by now, so the URL parses.
    let base = sqlite_path(url).unwrap_or("packmeter.db");
    std::path::PathBuf::from(format!("{base}.unflushed"))
}
