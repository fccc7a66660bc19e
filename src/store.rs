//! Durable storage behind one trait, chosen by URL.
//!
//! - `sqlite://PATH`: the embedded default, for one node ([`sqlite`], Cargo
//!   feature `sqlite`).
//! - `postgres://…` or `postgresql://…`: shared by many nodes
//!   ([`postgres`], Cargo feature `postgres`).
//!
//! The URL is parsed once, into a [`StoreUrl`], when the configuration is
//! validated; [`open`] and [`spill_path`] take the parsed form.
//! docs/stores.md tells an operator how to choose and run each store.
//!
//! Stores are tested against real files and servers, never mocks: one
//! conformance suite (tests/store_conformance.rs) runs against every store.

#[cfg(feature = "sqlite")]
pub mod known_ids;
#[cfg(feature = "postgres")]
pub mod postgres;
#[cfg(feature = "sqlite")]
pub mod sqlite;

use std::{path::PathBuf, sync::Arc};

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

/// What kind of change a [`Change`] row records.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ChangeKind {
    /// [`Store::put_account`]: the account's settings.
    Account,
    /// [`Store::grant_pack`] created a pack.
    Pack,
}

impl ChangeKind {
    /// The stored code.
    pub fn code(self) -> i64 {
        match self {
            ChangeKind::Account => 1,
            ChangeKind::Pack => 2,
        }
    }

    pub fn from_code(code: i64) -> Option<ChangeKind> {
        match code {
            1 => Some(ChangeKind::Account),
            2 => Some(ChangeKind::Pack),
            _ => None,
        }
    }
}

/// One operator change, as the store recorded it in the transaction that
/// made it; other nodes read these to bring resident accounts up to date
/// (see [`crate::changes`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Change {
    /// Increases with every change, but not densely, and not necessarily in
    /// commit order (two transactions can commit their numbers out of
    /// order): readers re-read a trailing window.
    pub seq: i64,
    pub account_id: String,
    pub kind: ChangeKind,
    /// When it was recorded (µs, the writing node's clock); rows older
    /// than [`CHANGE_RETENTION`] are pruned.
    pub at: Ts,
}

/// How long change rows are kept. Every write of a change prunes the rows
/// older than this. A node that cannot read the store for longer than this
/// may miss changes to accounts it holds (docs/stores.md).
pub const CHANGE_RETENTION: Ts = 24 * crate::calendar::HOUR;

/// What a flush left in the store for one of its accounts (see
/// [`Store::flush_batch`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AccountTotals {
    pub account_id: std::sync::Arc<str>,
    /// Every pack row of the account, with its global `used`: what every
    /// node has flushed, attributed and capped by the store. Or, when the
    /// SQLite store wrote the flush without reading the account's packs
    /// (each pack the flush named had room; `ledger::Named`), only the
    /// packs it wrote. Readers take the packs they find here and leave
    /// the others as they are (`Meter::rebase`).
    pub packs: Vec<StoredPack>,
}

/// How a flush went.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Flushed {
    /// False, changing nothing, if a batch with the same id was applied before.
    pub applied: bool,
    /// Per account of the batch (once each, in account-id order): what the
    /// store holds now. Empty when the batch was not applied.
    pub accounts: Vec<AccountTotals>,
    /// Request ids (account, id) the store already held from another batch,
    /// whose amounts this batch's usage left out.
    pub reversed: Vec<(std::sync::Arc<str>, Box<str>)>,
}

impl Flushed {
    /// Adds one account's result: its request ids the store already held,
    /// and its packs as the store holds them now.
    pub fn add_account(
        &mut self,
        account_id: std::sync::Arc<str>,
        reversed: Vec<Box<str>>,
        packs: Vec<StoredPack>,
    ) {
        self.reversed
            .extend(reversed.into_iter().map(|r| (account_id.clone(), r)));
        self.accounts.push(AccountTotals { account_id, packs });
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

/// One plan as recorded in the store (table `plans_in_force`): its full
/// definition, field by field, so a changed one is refused naming the field.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecordedPlan {
    /// 0-based place in the plans file.
    pub position: i64,
    pub name: String,
    /// µs since epoch, UTC.
    pub effective: Ts,
    pub months: i64,
    pub calls: i64,
    pub egress_bytes: i64,
    /// As [`crate::calendar::BillingZone`] displays it.
    pub zone: String,
}

#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Loads an account, its packs valid after `since`, and its idempotency
    /// keys unexpired at `now`.
    async fn load_account(&self, id: &str, since: Ts, now: Ts)
        -> Result<LoadedAccount, StoreError>;

    /// Creates or replaces an account row, and records a
    /// [`ChangeKind::Account`] change in the same transaction.
    async fn put_account(&self, account: &AccountRecord) -> Result<(), StoreError>;

    async fn get_account(&self, id: &str) -> Result<Option<AccountRecord>, StoreError>;

    /// Inserts a purchased pack unless one with the same id exists; a new
    /// pack records a [`ChangeKind::Pack`] change in the same transaction.
    async fn grant_pack(&self, account_id: &str, pack: &PackSpec) -> Result<Granted, StoreError>;

    /// Every pack row of the account: purchased ones, and free-tier ones
    /// that have recorded usage.
    async fn list_packs(&self, account_id: &str) -> Result<Vec<StoredPack>, StoreError>;

    /// How many [`flush_batch`](Self::flush_batch) transactions the
    /// flusher may run at once, on disjoint accounts. 1 (the default) for a
    /// store that writes one transaction at a time anyway.
    fn flush_concurrency(&self) -> usize {
        1
    }

    /// Accounts per [`flush_batch`](Self::flush_batch) when the flush
    /// catches up (a late batch, the final flush at shutdown, every batch
    /// of a journaled flush; see
    /// [`crate::flush::Flusher`]), for a store that writes a large batch
    /// much more cheaply per account than a small one. `None` (the
    /// default): the usual batch size.
    fn catch_up_batch_accounts(&self) -> Option<usize> {
        None
    }

    /// Applies a flush in one transaction: all of it or nothing. Returns
    /// false, changing nothing, if a batch with the same id was applied
    /// before. [`flush_batch`](Self::flush_batch) without the totals.
    async fn write_batch(&self, batch: &FlushBatch) -> Result<bool, StoreError>;

    /// Applies a flush in one transaction, as [`write_batch`](Self::write_batch),
    /// and returns what the store then holds for the batch's accounts.
    ///
    /// The transaction makes the ledger exact however many nodes flush
    /// into the store: each account's deltas are attributed and capped
    /// against the packs as stored ([`crate::ledger::attribute`]: R6 order,
    /// no pack past its capacity, the rest overage), and a request id the
    /// store already holds from another batch has its amounts taken out.
    /// Concurrent flushes of the same account are serialized on the
    /// account's row. The flusher rebases the meter's counters on the
    /// returned totals.
    ///
    /// The default (for stores that cannot do better) applies the batch
    /// and returns no totals.
    async fn flush_batch(&self, batch: &FlushBatch) -> Result<Flushed, StoreError> {
        Ok(Flushed {
            applied: self.write_batch(batch).await?,
            ..Flushed::default()
        })
    }

    /// [`flush_batch`](Self::flush_batch) of a batch the caller shares: a
    /// store that writes on a thread of its own (SQLite) keeps the `Arc`
    /// instead of copying the batch (issue 14: the copy, a few hundred
    /// instructions per account, ran on the serving threads).
    async fn flush_shared(&self, batch: Arc<FlushBatch>) -> Result<Flushed, StoreError> {
        self.flush_batch(&batch).await
    }

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

    /// The highest change sequence number recorded so far (0 for none): a
    /// node starts reading changes after it.
    async fn last_change(&self) -> Result<i64, StoreError>;

    /// At most `limit` changes with `seq > after`, in `seq` order. A short
    /// page (fewer than `limit`) is the last one.
    async fn changes_since(&self, after: i64, limit: usize) -> Result<Vec<Change>, StoreError>;

    /// Cheap reachability check for readiness and metrics.
    async fn ping(&self) -> Result<(), StoreError>;

    /// The plans in force (R8, issue 11), in order of `position`: what
    /// every node and restart checks its plans file against
    /// (crate::plans::reconcile). Empty until a plans file is first used.
    async fn recorded_plans(&self) -> Result<Vec<RecordedPlan>, StoreError> {
        Err(StoreError::permanent("this store does not record plans"))
    }

    /// Records plans at their positions, keeping any already recorded at a
    /// position (`INSERT ... ON CONFLICT DO NOTHING`): the caller reads them
    /// back and compares, so two nodes racing agree or one is refused.
    async fn record_plans(&self, _plans: &[RecordedPlan], _at: Ts) -> Result<(), StoreError> {
        Err(StoreError::permanent("this store does not record plans"))
    }

    /// Whether the store holds any usage row or activated account: a store
    /// that holds neither has nothing a plan could need recalculating.
    async fn holds_usage(&self) -> Result<bool, StoreError> {
        Err(StoreError::permanent("this store does not record plans"))
    }

    /// Accounts activated before `activated_before` with free-tier or
    /// overage usage in an hour at or after `from`, with their activation:
    /// the accounts a plan change may need to recalculate (R8,
    /// [`crate::recalc`]), in account order.
    async fn recalculation_candidates(
        &self,
        from: Ts,
        activated_before: Ts,
    ) -> Result<Vec<(String, Ts)>, StoreError> {
        let _ = (from, activated_before);
        Err(StoreError::permanent("this store does not record plans"))
    }

    /// Re-deducts one account's usage under a new plan in one transaction,
    /// with the account locked (R8, [`crate::recalc`]): for each span and
    /// item, what the usage rows and earlier adjustments hold net goes
    /// through [`crate::recalc::rededuct`], and its moves are added to the
    /// adjustment rows of `r.hour` (moved past the settled mark if needed)
    /// and to the packs' `used`. Running it again moves nothing. Returns the
    /// account's packs afterwards, to rebase resident counters on.
    async fn recalculate(
        &self,
        r: &crate::recalc::Recalculation,
    ) -> Result<Vec<StoredPack>, StoreError> {
        let _ = r;
        Err(StoreError::permanent("this store does not record plans"))
    }

    /// The adjustment rows with `from <= hour < to`, optionally of one
    /// account, in [`UsageKey`] order, summed per row key and plan (rows
    /// that sum to zero are left out).
    async fn adjustment_rows(
        &self,
        from: Ts,
        to: Ts,
        account_id: Option<&str>,
    ) -> Result<Vec<UsageRow>, StoreError> {
        let _ = (from, to, account_id);
        Ok(Vec::new())
    }

    /// The positions of the plans whose recalculation some node finished.
    async fn plans_recalculated(&self) -> Result<Vec<i64>, StoreError> {
        Err(StoreError::permanent("this store does not record plans"))
    }

    /// Records that the recalculation of the plan at `position` finished.
    async fn record_recalculated(&self, position: i64, at: Ts) -> Result<(), StoreError> {
        let _ = (position, at);
        Err(StoreError::permanent("this store does not record plans"))
    }

    /// The settled mark (R12): hours that start before it are settled, and
    /// no deduction may add to them, whatever `--late-grace` says later.
    /// `Ts::MIN` until something has been settled.
    ///
    /// `serve` reads it once at start and closes those hours to deductions
    /// before it serves any call; an export records the mark it settles
    /// with [`record_settled`](Self::record_settled) before it reads a row.
    async fn settled_before(&self) -> Result<Ts, StoreError>;

    /// Moves the settled mark forward to `before`, never back: a `before`
    /// at or below the stored mark changes nothing. Returns the stored mark
    /// afterwards. Durable when it returns, like [`write_batch`](Self::write_batch).
    async fn record_settled(&self, before: Ts) -> Result<Ts, StoreError>;

    /// Reserves up to `req.want` more calls of a `deny` account's packs for
    /// this node (strict mode, see [`crate::meter::lease`]), and moves the
    /// node's lease expiry to `ttl` from the store's clock. Grants nothing
    /// unless at least `req.need` is free. Stores that one node owns need no
    /// leases: the default refuses, and strict mode is off for them.
    async fn acquire_lease(&self, req: &LeaseRequest<'_>) -> Result<LeaseGrant, StoreError> {
        let _ = req;
        Err(StoreError::permanent(LEASES_UNSUPPORTED))
    }

    /// Returns `unused` calls of this node's lease on the account: what it
    /// was granted and has not admitted. What it admitted stays reserved
    /// until a flush books it into the packs.
    async fn release_lease(
        &self,
        account_id: &str,
        node_id: &str,
        unused: u64,
    ) -> Result<(), StoreError> {
        let _ = (account_id, node_id, unused);
        Err(StoreError::permanent(LEASES_UNSUPPORTED))
    }
}

/// What a store without leases answers.
pub const LEASES_UNSUPPORTED: &str =
    "this store does not keep leases: strict mode needs a shared store (postgres://)";

/// A lease request: see [`Store::acquire_lease`].
#[derive(Clone, Debug)]
pub struct LeaseRequest<'a> {
    pub account_id: &'a str,
    /// The node's id: the node part of its flush batch ids
    /// ([`FlushBatch::node_id`]), so that its flushes book its lease.
    pub node_id: &'a str,
    /// The account's calls packs valid now: (pack id, capacity). Free-tier
    /// packs have no row until they have usage, so the node names them.
    pub packs: &'a [(String, u64)],
    /// Grant nothing unless this much is free.
    pub need: u64,
    /// Grant at most this much.
    pub want: u64,
    /// How long the lease lasts from the store's clock, in µs.
    pub ttl: Ts,
}

/// What [`Store::acquire_lease`] granted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LeaseGrant {
    /// Calls added to the node's lease.
    pub granted: u64,
    /// Calls still free for any node after this grant.
    pub free: u64,
}

/// Why a store URL was refused; the message says how to write it instead.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{0}")]
pub struct InvalidStoreUrl(pub String);

/// What the refusal of an unknown URL suggests instead.
const SUPPORTED: &str = "use sqlite://PATH or postgres://USER@HOST/DATABASE";

/// The file path a `sqlite://PATH` URL names. Parsing only: nothing is
/// opened or created, so `serve` checks the URL with this before binding.
pub fn sqlite_path(url: &str) -> Result<&str, InvalidStoreUrl> {
    let Some(path) = url.strip_prefix("sqlite://") else {
        return Err(InvalidStoreUrl(format!(
            "`{}` is not a supported store URL; {SUPPORTED}",
            redact(url)
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

/// A store URL, parsed and checked once (by config validation); nothing is
/// opened or connected. Its `Display` is the URL with any password
/// replaced by `***`, fit for logs.
#[derive(Clone, Debug)]
pub enum StoreUrl {
    /// `sqlite://PATH`.
    #[cfg(feature = "sqlite")]
    Sqlite(PathBuf),
    /// `postgres://…` or `postgresql://…`.
    #[cfg(feature = "postgres")]
    Postgres(Box<postgres::PgUrl>),
}

impl StoreUrl {
    pub fn parse(url: &str) -> Result<StoreUrl, InvalidStoreUrl> {
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            #[cfg(feature = "postgres")]
            return postgres::PgUrl::parse(url).map(|u| StoreUrl::Postgres(Box::new(u)));
            #[cfg(not(feature = "postgres"))]
            return Err(InvalidStoreUrl(
                "this packmeter was built without PostgreSQL support (Cargo feature \
                 `postgres`); rebuild with it, or use sqlite://PATH"
                    .into(),
            ));
        }
        let path = sqlite_path(url)?;
        #[cfg(feature = "sqlite")]
        return Ok(StoreUrl::Sqlite(PathBuf::from(path)));
        #[cfg(not(feature = "sqlite"))]
        {
            let _ = path;
            Err(InvalidStoreUrl(
                "this packmeter was built without SQLite support (Cargo feature `sqlite`); \
                 rebuild with it, or use postgres://USER@HOST/DATABASE"
                    .into(),
            ))
        }
    }
}

impl std::str::FromStr for StoreUrl {
    type Err = InvalidStoreUrl;
    fn from_str(s: &str) -> Result<StoreUrl, InvalidStoreUrl> {
        StoreUrl::parse(s)
    }
}

impl std::fmt::Display for StoreUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match *self {
            #[cfg(feature = "sqlite")]
            StoreUrl::Sqlite(ref path) => write!(f, "sqlite://{}", path.display()),
            #[cfg(feature = "postgres")]
            StoreUrl::Postgres(ref url) => url.fmt(f),
        }
    }
}

/// `url` with the password of its user part (`scheme://user:PASSWORD@…`)
/// and any `password=` parameter replaced by `***`, for messages and logs.
pub fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let (before_query, query) = match rest.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (rest, None),
    };
    // The user part ends at the last `@` before the query, so that a
    // password holding `/` or `@` is hidden whole.
    let mut out = format!("{scheme}://");
    match before_query.rsplit_once('@') {
        Some((user, hosts)) => {
            match user.split_once(':') {
                Some((name, _password)) => out.push_str(&format!("{name}:***")),
                None => out.push_str(user),
            }
            out.push('@');
            out.push_str(hosts);
        }
        None => out.push_str(before_query),
    }
    if let Some(query) = query {
        let query: Vec<String> = query
            .split('&')
            .map(|kv| match kv.split_once('=') {
                Some(("password", _)) => "password=***".to_string(),
                _ => kv.to_string(),
            })
            .collect();
        out.push('?');
        out.push_str(&query.join("&"));
    }
    out
}

/// Why a store could not be opened.
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
    /// The store failed (unreachable, refused the credentials, I/O error).
    #[error("{0}")]
    Store(#[from] StoreError),
    /// The store holds something this binary must not touch, such as a
    /// schema newer than it knows: a configuration error (`serve` exits 64).
    #[error("{0}")]
    Incompatible(String),
}

/// Refuses a store whose directory does not exist, before anything is
/// opened or created. `serve` calls it for an explicit `--store`; a
/// PostgreSQL URL has no directory.
pub fn check_dir(url: &StoreUrl) -> Result<(), OpenError> {
    match *url {
        #[cfg(feature = "sqlite")]
        StoreUrl::Sqlite(ref path) => match path.parent().filter(|d| !d.as_os_str().is_empty()) {
            Some(dir) if !dir.is_dir() => Err(OpenError::NoDirectory {
                store: url.to_string(),
                dir: dir.to_path_buf(),
            }),
            _ => Ok(()),
        },
        #[cfg(feature = "postgres")]
        StoreUrl::Postgres(_) => Ok(()),
    }
}

/// Opens the store a URL names, for this process alone (a SQLite file is
/// locked until the store is dropped, see [`OpenError::InUse`]): creates the SQLite file, or connects to
/// PostgreSQL and brings its schema up to date (see [`postgres`]).
pub async fn open(url: &StoreUrl) -> Result<Arc<dyn Store>, OpenError> {
    match *url {
        #[cfg(feature = "sqlite")]
        StoreUrl::Sqlite(ref path) => {
            let path = path.clone();
            let store = tokio::task::spawn_blocking(move || {
                sqlite::SqliteStore::open(&path.to_string_lossy())
            })
            .await
            .map_err(|e| StoreError::permanent(format!("opening the store failed: {e}")))??;
            Ok(Arc::new(store))
        }
        #[cfg(feature = "postgres")]
        StoreUrl::Postgres(ref url) => Ok(Arc::new(postgres::PostgresStore::open(url).await?)),
    }
}

/// Where packmeter keeps local files by default:
/// `$XDG_DATA_HOME/packmeter`, else `$HOME/.local/share/packmeter`, else
/// the working directory.
pub fn default_data_dir() -> PathBuf {
    std::env::var_os("XDG_DATA_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME")
                .filter(|v| !v.is_empty())
                .map(|h| PathBuf::from(h).join(".local/share"))
        })
        .map(|d| d.join("packmeter"))
        .unwrap_or_else(|| PathBuf::from("."))
}

/// Where shutdown writes usage it could not flush (see [`crate::spill`]).
///
/// - SQLite: beside the file, as `PATH.unflushed`.
/// - PostgreSQL: in the data directory ([`default_data_dir`]), one file per
///   database: `postgres-HOST-PORT-DATABASE.unflushed`. Nodes that share a
///   data directory and a database would share the file, so give each node
///   its own (each pod has its own by default).
pub fn spill_path(url: &StoreUrl) -> PathBuf {
    match *url {
        #[cfg(feature = "sqlite")]
        StoreUrl::Sqlite(ref path) => {
            let mut p = path.clone().into_os_string();
            p.push(".unflushed");
            PathBuf::from(p)
        }
        #[cfg(feature = "postgres")]
        StoreUrl::Postgres(ref url) => {
            default_data_dir().join(format!("{}.unflushed", url.spill_name()))
        }
    }
}

/// Where shutdown writes the spill file when it cannot be written beside
/// the store ([`spill_path`]): SQLite only, for a store whose filesystem
/// failed or turned read-only. In the data directory ([`default_data_dir`]),
/// named after the store's whole path (`/`, `%` and anything but ASCII
/// letters, digits, `.`, `-` and `_` %-escaped), so that two stores never
/// share it: `sqlite-%2Fvar%2Flib%2Fpackmeter.db.unflushed`. Start-up
/// replays it after the one beside the store. `None` for PostgreSQL, whose
/// spill file is in the data directory already.
pub fn fallback_spill_path(url: &StoreUrl) -> Option<PathBuf> {
    match *url {
        #[cfg(feature = "sqlite")]
        StoreUrl::Sqlite(ref path) => {
            use percent_encoding::{percent_encode, NON_ALPHANUMERIC};
            // Every byte but ASCII letters, digits, `.`, `-` and `_`.
            const ESCAPED: &percent_encoding::AsciiSet =
                &NON_ALPHANUMERIC.remove(b'.').remove(b'-').remove(b'_');
            let path = std::path::absolute(path).unwrap_or_else(|_| path.clone());
            let name = percent_encode(path.as_os_str().as_encoded_bytes(), ESCAPED);
            Some(default_data_dir().join(format!("sqlite-{name}.unflushed")))
        }
        #[cfg(feature = "postgres")]
        StoreUrl::Postgres(_) => None,
    }
}

/// Where a page starts: `from`, and the cursor if it narrows that further.
/// A cursor before `from`, or (with an account filter) on another account,
/// is turned into a plain hour bound, so that every query a store runs
/// seeks straight to its first row with a key comparison an index serves.
#[cfg_attr(not(any(feature = "sqlite", feature = "postgres")), allow(dead_code))]
pub(crate) fn page_start<'k>(
    from: Ts,
    account: Option<&str>,
    after: Option<&'k UsageKey>,
) -> (Ts, Option<&'k UsageKey>) {
    let Some(k) = after else {
        return (from, None);
    };
    if k.hour < from {
        return (from, None);
    }
    match account {
        // Every row of `a` in hour `k.hour` comes after the cursor ...
        Some(a) if a > k.account_id.as_str() => (k.hour, None),
        // ... or none does.
        Some(a) if a < k.account_id.as_str() => (k.hour.saturating_add(1), None),
        _ => (from, Some(k)),
    }
}

#[cfg(test)]
mod tests {
    use super::redact;

    #[test]
    fn redact_hides_every_password_and_keeps_the_rest() {
        for (url, shown) in [
            (
                "postgres://pm:s3cret@db:5432/x",
                "postgres://pm:***@db:5432/x",
            ),
            (
                "postgres://pm:a/b@c@db/x?sslmode=require",
                "postgres://pm:***@db/x?sslmode=require",
            ),
            (
                "postgres://pm@db/x?password=s3cret&a=b",
                "postgres://pm@db/x?password=***&a=b",
            ),
            ("postgres://db/x", "postgres://db/x"),
            ("sqlite://./pm.db", "sqlite://./pm.db"),
            ("not a url", "not a url"),
        ] {
            assert_eq!(redact(url), shown, "{url}");
        }
    }

    #[cfg(feature = "sqlite")]
    #[test]
    fn the_fallback_spill_file_is_named_after_the_whole_store_path() {
        use super::{fallback_spill_path, StoreUrl};
        let name = |url: &str| {
            fallback_spill_path(&StoreUrl::parse(url).unwrap())
                .unwrap()
                .file_name()
                .unwrap()
                .to_string_lossy()
                .into_owned()
        };
        assert_eq!(
            name("sqlite:///var/lib/pm_1.db"),
            "sqlite-%2Fvar%2Flib%2Fpm_1.db.unflushed"
        );
        // Escaped, so that no two paths share a name.
        assert_ne!(name("sqlite:///a/b.db"), name("sqlite:///a%2Fb.db"));
        assert_ne!(name("sqlite:///a/b.db"), name("sqlite:///a_b.db"));
    }
}
