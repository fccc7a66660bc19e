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

    /// The settled mark (R12): hours that start before it are settled, and
    /// no deduction may add to them, whatever `--late-grace` says later.
    /// `Ts::MIN` until something has been settled.
    ///
    /// `serve` reads it once at start and closes those hours to deductions
    /// before binding any port; an export records the mark it settles
    /// with [`record_settled`](Self::record_settled) before it reads a row.
    async fn settled_before(&self) -> Result<Ts, StoreError>;

    /// Moves the settled mark forward to `before`, never back: a `before`
    /// at or below the stored mark changes nothing. Returns the stored mark
    /// afterwards. Durable when it returns, like [`write_batch`](Self::write_batch).
    async fn record_settled(&self, before: Ts) -> Result<Ts, StoreError>;
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

/// Why a store could not be opened for serving.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// Another process holds the store: two servers on one store would each
    /// count the free tier (and every pack) from the same stored usage.
    #[error(
        "{store} is in use by another packmeter process{holder} (it holds the lock {}); \
         run one server per store, or give this one its own --store",
        lock.display()
    )]
    InUse {
        store: String,
        /// ` (pid N)` when the holder wrote its pid, else empty.
        holder: String,
        lock: std::path::PathBuf,
    },
    /// An explicit store path whose directory does not exist (see
    /// [`check_dir`]).
    #[error(
        "the directory {} of {store} does not exist; create it, or fix the path \
         (only the default data directory is created)",
        dir.display()
    )]
    NoDirectory {
        store: String,
        dir: std::path::PathBuf,
    },
    /// The store cannot be written by this process: every flush would fail.
    #[error("{store} cannot be written by this process: {reason}")]
    NotWritable { store: String, reason: String },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Opens the store a URL names, for this process alone: it is locked until
/// the store is dropped (see [`OpenError::InUse`]).
pub fn open(url: &str) -> Result<Arc<dyn Store>, OpenError> {
    let path = sqlite_path(url).map_err(|e| StoreError::permanent(e.0))?;
    Ok(Arc::new(sqlite::SqliteStore::open(path)?))
}

/// Refuses a store whose directory does not exist, before anything is
/// opened or created. `serve` calls it for an explicit `--store`.
pub fn check_dir(url: &str) -> Result<(), OpenError> {
    let path = sqlite_path(url).map_err(|e| StoreError::permanent(e.0))?;
    match std::path::Path::new(path)
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
    {
        Some(dir) if !dir.is_dir() => Err(OpenError::NoDirectory {
            store: url.to_string(),
            dir: dir.to_path_buf(),
        }),
        _ => Ok(()),
    }
}

/// Where shutdown writes usage it could not flush (see [`crate::spill`]):
/// beside the SQLite file, as `PATH.unflushed`.
pub fn spill_path(url: &str) -> std::path::PathBuf {
    // `serve` has opened the store by now, so the URL parses.
    let base = sqlite_path(url).unwrap_or("packmeter.db");
    std::path::PathBuf::from(format!("{base}.unflushed"))
}
