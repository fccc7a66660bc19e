//! The embedded SQLite store: one file in WAL mode.
//!
//! Two connections, each behind a mutex: one writes (SQLite allows one
//! writer at a time anyway, and a flush is one transaction per batch), the
//! other reads. In WAL mode readers never wait for a writer, so an
//! account's first load and the health check do not queue behind a large
//! flush.
//!
//! Reads run in tokio's blocking pool, at the serving threads' priority:
//! a call may be waiting for its account. Writes run on the store's own
//! writer thread, at a lower priority (see [`crate::background`]): a flush
//! transaction of thousands of accounts then takes the core only when the
//! serving threads leave it, instead of stalling the calls in flight.
//! `synchronous = FULL` makes a committed flush survive power loss, which is
//! what `Admin.Flush` promises.

use std::{
    io::Write,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use async_trait::async_trait;
use rusqlite::{params, types::ValueRef, Connection, ErrorCode, OptionalExtension};

use super::{
    known_ids::KnownIds, page_start, Change, ChangeKind, Flushed, Granted, LoadedAccount,
    OpenError, Store, StoreError, StoredPack, CHANGE_RETENTION,
};
use crate::{
    background::Background,
    calendar::Ts,
    ledger::{AccountRecord, DedupRecord, FlushBatch, UsageKey, UsageRow},
    packs::{Item, PackSource, PackSpec},
};

mod pack_cache;

use pack_cache::PackCache;

/// Tables are `WITHOUT ROWID`: keyed by their primary key alone, an upsert
/// writes one B-tree instead of a table and its key index, which halves
/// the cost of a flush once the tables outgrow the page cache.
const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS accounts (
    account_id        TEXT PRIMARY KEY,
    activated_at      INTEGER,            -- µs since epoch, UTC; NULL until activated
    suspended         INTEGER NOT NULL DEFAULT 0,
    deny_on_exhausted INTEGER NOT NULL DEFAULT 0
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS packs (
    account_id  TEXT    NOT NULL,
    pack_id     TEXT    NOT NULL,
    source      INTEGER NOT NULL,         -- 1 free tier, 2 purchased
    item        INTEGER NOT NULL,         -- 1 calls, 2 egress bytes
    capacity    INTEGER NOT NULL,
    valid_from  INTEGER NOT NULL,
    valid_until INTEGER NOT NULL,         -- exclusive
    priority    INTEGER NOT NULL,
    created_at  INTEGER NOT NULL,
    used        INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (account_id, pack_id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS usage_hourly (
    account_id TEXT    NOT NULL,
    hour       INTEGER NOT NULL,          -- start of the UTC hour, µs
    item       INTEGER NOT NULL,
    pack_id    TEXT    NOT NULL,          -- '' for overage
    source     INTEGER NOT NULL,          -- 0 for overage
    amount     INTEGER NOT NULL,
    PRIMARY KEY (account_id, hour, item, pack_id)
) WITHOUT ROWID;
-- Exports page through usage in (hour, account, item, pack) order. The
-- former index on (hour) alone held the same entries (an index of a WITHOUT
-- ROWID table ends with the primary key) but left the order implicit.
DROP INDEX IF EXISTS usage_hourly_by_hour;
CREATE INDEX IF NOT EXISTS usage_hourly_by_key ON usage_hourly (hour, account_id, item, pack_id);
CREATE TABLE IF NOT EXISTS dedup (
    account_id     TEXT    NOT NULL,
    request_id     TEXT    NOT NULL,
    expires_at     INTEGER NOT NULL,
    calls_covered  INTEGER NOT NULL,
    calls_overage  INTEGER NOT NULL,
    egress_covered INTEGER NOT NULL,
    egress_overage INTEGER NOT NULL,
    PRIMARY KEY (account_id, request_id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS dedup_by_expiry ON dedup (expires_at);
CREATE TABLE IF NOT EXISTS flush_batches (
    batch_id   TEXT    PRIMARY KEY,       -- FlushBatch::batch_id
    applied_at INTEGER NOT NULL           -- µs; rows older than BATCH_ID_RETENTION are pruned
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS flush_batches_by_age ON flush_batches (applied_at);
-- The settled mark (R12), one row: hours that start before it are settled.
-- It only moves forward, so a later, longer --late-grace cannot reopen them.
CREATE TABLE IF NOT EXISTS settlement (
    id             INTEGER PRIMARY KEY CHECK (id = 1),
    settled_before INTEGER NOT NULL       -- µs since epoch, UTC
);
-- Operator changes (put_account, grant_pack), as PostgreSQL records them for
-- other nodes; one node per file reads none, but the Store contract is the
-- same. AUTOINCREMENT: a number is never reused, even once pruned.
CREATE TABLE IF NOT EXISTS changes (
    seq        INTEGER PRIMARY KEY AUTOINCREMENT,
    account_id TEXT    NOT NULL,
    kind       INTEGER NOT NULL,          -- 1 account settings, 2 new pack
    at         INTEGER NOT NULL           -- µs; rows older than CHANGE_RETENTION are pruned
);
CREATE INDEX IF NOT EXISTS changes_by_age ON changes (at);
-- The plans in force (R8, issue 11), one row per plan of the plans file,
-- by its 0-based place; never updated (src/plans.rs, reconcile).
CREATE TABLE IF NOT EXISTS plans_in_force (
    position     INTEGER PRIMARY KEY,
    name         TEXT    NOT NULL,
    effective    INTEGER NOT NULL,        -- µs since epoch, UTC
    months       INTEGER NOT NULL,
    calls        INTEGER NOT NULL,
    egress_bytes INTEGER NOT NULL,
    zone         TEXT    NOT NULL,
    recorded_at  INTEGER NOT NULL         -- µs since epoch, UTC
);
-- A plan change's re-deduction (R8, src/recalc.rs): signed amounts added
-- in `hour`, never to a usage row. `span_from` is the first hour of the
-- usage it re-deducts, so a second run nets earlier moves out.
CREATE TABLE IF NOT EXISTS usage_adjustments (
    account_id    TEXT    NOT NULL,
    plan_position INTEGER NOT NULL,
    span_from     INTEGER NOT NULL,
    item          INTEGER NOT NULL,
    pack_id       TEXT    NOT NULL,       -- '' for overage
    hour          INTEGER NOT NULL,       -- the hour it is reported in
    source        INTEGER NOT NULL,       -- 0 for overage
    plan          TEXT    NOT NULL,
    amount        INTEGER NOT NULL,       -- signed
    PRIMARY KEY (account_id, span_from, item, pack_id, plan_position, hour)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS usage_adjustments_by_hour ON usage_adjustments (hour, account_id);
-- Plans whose recalculation a node finished (src/recalc.rs).
CREATE TABLE IF NOT EXISTS plan_recalculations (
    position    INTEGER PRIMARY KEY,
    finished_at INTEGER NOT NULL
);
"#;

/// The file's `user_version` once [`migrate`] has run. 0, SQLite's
/// default, is a file from before it, or a new one.
///
/// 1: every account with a pack row has its account row. Versions before
/// the account row was written with the first grant could leave a pack
/// without it; a flush relies on it (`flush_batch` skips the account row of
/// an account whose packs it read).
const FILE_VERSION: i64 = 1;

/// Brings a file written by an older version up to [`FILE_VERSION`], in one
/// transaction. An older binary opening a migrated file ignores the
/// version, and writes a pack's account row with the pack.
fn migrate(conn: &mut Connection) -> rusqlite::Result<()> {
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    let version: i64 = tx.pragma_query_value(None, "user_version", |r| r.get(0))?;
    if version < 1 {
        tx.execute_batch(
            "INSERT INTO accounts (account_id) SELECT DISTINCT account_id FROM packs WHERE true \
             ON CONFLICT (account_id) DO NOTHING",
        )?;
    }
    if version < FILE_VERSION {
        tx.pragma_update(None, "user_version", FILE_VERSION)?;
    }
    tx.commit()
}

/// How long applied batch ids are kept: far longer than any spill file
/// waits for its replay.
const BATCH_ID_RETENTION: Ts = 30 * 24 * crate::calendar::HOUR;

pub struct SqliteStore {
    writer: Arc<Mutex<Connection>>,
    /// Runs every use of `writer`.
    writer_thread: Background,
    reader: Arc<Mutex<Connection>>,
    /// The accounts the file may hold: an account's first load skips the
    /// read when it cannot (see [`super::known_ids`]).
    known: Arc<KnownIds>,
    /// The read of the known ids has been queued (on the first load).
    known_asked: std::sync::Once,
    /// Recently flushed accounts' pack rows, so their next flush skips
    /// the read (see [`pack_cache`]). Used on the writer thread only; the
    /// mutex is never contended.
    pack_cache: Arc<parking_lot::Mutex<PackCache>>,
    /// `PATH.lock`, exclusively locked for as long as the store is open:
    /// a second server on the same file would count every pack, the free
    /// tier included, from the same stored usage. The OS drops the lock
    /// when the process exits, however it exits.
    _lock: std::fs::File,
}

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> StoreError {
        let transient = matches!(
            e.sqlite_error_code(),
            Some(
                ErrorCode::DatabaseBusy
                    | ErrorCode::DatabaseLocked
                    | ErrorCode::SystemIoFailure
                    | ErrorCode::DiskFull
                    | ErrorCode::CannotOpen
                    | ErrorCode::OutOfMemory
            )
        );
        StoreError {
            message: format!("sqlite: {e}"),
            transient,
        }
    }
}

/// SQLite integers are i64; amounts are u64 but stay far below 2^63 in
/// practice. Refuse rather than wrap if one ever does not.
fn to_sql(v: u64) -> Result<i64, StoreError> {
    i64::try_from(v).map_err(|_| StoreError::permanent(format!("amount {v} exceeds 2^63")))
}

fn from_sql(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

impl SqliteStore {
    /// Opens (creating if need be) the file at `path` for this process
    /// alone, and checks that it can be written.
    pub fn open(path: &str) -> Result<SqliteStore, OpenError> {
        if path.is_empty() {
            return Err(StoreError::permanent(
                "sqlite:// needs a file path, e.g. sqlite:///var/lib/packmeter/packmeter.db",
            )
            .into());
        }
        let store = || format!("sqlite://{path}");
        let not_writable = |reason: String| OpenError::NotWritable {
            store: store(),
            reason,
        };
        if let Some(dir) = Path::new(path)
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
        {
            std::fs::create_dir_all(dir).map_err(|e| {
                StoreError::permanent(format!("cannot create {}: {e}", dir.display()))
            })?;
        }
        let lock = lock(path).map_err(|e| match e {
            Locked::Held { holder, lock } => OpenError::InUse {
                store: store(),
                holder,
                lock,
            },
            Locked::Io { lock, error } => {
                not_writable(format!("cannot create or lock {}: {error}", lock.display()))
            }
        })?;
        // SQLite quietly opens a file it may not write read-only; every
        // flush would then fail while the server looked healthy.
        let refused = |e: rusqlite::Error| match e.sqlite_error_code() {
            Some(ErrorCode::ReadOnly) => not_writable(format!("{e}")),
            _ => OpenError::Store(e.into()),
        };
        let mut writer = Connection::open(path).map_err(refused)?;
        if writer.is_readonly(rusqlite::MAIN_DB).map_err(refused)? {
            return Err(not_writable(format!(
                "{path} is read-only (file permissions or a read-only file system); \
                 packmeter needs to write usage there"
            )));
        }
        writer
            .busy_timeout(std::time::Duration::from_secs(5))
            .map_err(refused)?;
        writer
            .pragma_update(None, "journal_mode", "WAL")
            .map_err(refused)?;
        writer
            .pragma_update(None, "synchronous", "FULL")
            .map_err(refused)?;
        // See `take_room`.
        writer
            .create_scalar_function(
                "packmeter_noted",
                1,
                rusqlite::functions::FunctionFlags::SQLITE_UTF8,
                |ctx| {
                    let v: i64 = ctx.get(0)?;
                    NOTED.set(v);
                    Ok(v)
                },
            )
            .map_err(refused)?;
        // SQLite's default page cache (2 MB) is kept on purpose: a 64 MiB
        // cache and a 1 GiB mmap made no measurable difference to flushes at
        // 1 M accounts (BENCHMARKS.md) and cost ~100 MB of RSS.
        writer.execute_batch(SCHEMA).map_err(refused)?;
        migrate(&mut writer).map_err(refused)?;
        let reader = Connection::open(path).map_err(refused)?;
        reader
            .busy_timeout(std::time::Duration::from_secs(5))
            .map_err(refused)?;
        reader
            .pragma_update(None, "query_only", true)
            .map_err(refused)?;
        let writer = Arc::new(Mutex::new(writer));
        let writer_thread = Background::start("packmeter-sqlite-writer");
        let known = Arc::new(KnownIds::default());
        Ok(SqliteStore {
            writer,
            writer_thread,
            reader: Arc::new(Mutex::new(reader)),
            known,
            known_asked: std::sync::Once::new(),
            pack_cache: Default::default(),
            _lock: lock,
        })
    }

    /// The account ids the file may hold (see [`super::known_ids`]).
    pub fn known_ids(&self) -> &KnownIds {
        &self.known
    }

    /// Queues the read of the ids in the file, once, as a job of the
    /// writer thread (on the writing connection, so no write of this store
    /// runs during it; writes queued meanwhile wait for it). Asked for by
    /// the first account load, so a process that loads no account (an
    /// export, a migration) never reads them.
    fn ask_known_ids(&self) {
        self.known_asked.call_once(|| {
            let (conn, known) = (self.writer.clone(), self.known.clone());
            self.writer_thread.submit(move || {
                if let Err(error) = read_known_ids(&lock_conn(&conn), &known) {
                    tracing::warn!(
                        %error,
                        "could not read the account ids in the SQLite file; every account's \
                         first call reads the store"
                    );
                }
            });
        });
    }

    /// Runs `f` on the writing connection, on the writer thread.
    async fn with<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> Result<T, StoreError> + Send + 'static,
    {
        let conn = self.writer.clone();
        self.writer_thread
            .run(move || f(&mut lock_conn(&conn)))
            .await
    }

    /// Runs `f` on the reading connection in the blocking pool.
    async fn read<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> Result<T, StoreError> + Send + 'static,
    {
        Self::run(self.reader.clone(), f).await
    }

    async fn run<T, F>(conn: Arc<Mutex<Connection>>, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> Result<T, StoreError> + Send + 'static,
    {
        tokio::task::spawn_blocking(move || f(&mut lock_conn(&conn)))
            .await
            .map_err(|e| StoreError::permanent(format!("store task failed: {e}")))?
    }
}

/// Locks a connection. A panic while holding the lock cannot leave SQLite
/// itself inconsistent (the transaction rolls back), so a poisoned lock is
/// still usable.
fn lock_conn(conn: &Mutex<Connection>) -> std::sync::MutexGuard<'_, Connection> {
    conn.lock().unwrap_or_else(|p| p.into_inner())
}

/// Reads the account ids in the file into `known`. Runs as the writer
/// thread's first job, on the writing connection, so no write of this
/// store runs during the read (one statement, one snapshot).
fn read_known_ids(conn: &Connection, known: &KnownIds) -> rusqlite::Result<()> {
    let mut fps: Vec<u32> = Vec::new();
    // Every account written gets its row; packs are read too, so an older
    // file with a pack and no account row is still covered.
    let mut stmt = conn.prepare(
        "SELECT account_id FROM accounts UNION ALL SELECT DISTINCT account_id FROM packs",
    )?;
    let mut rows = stmt.query([])?;
    // A million ids take a while; calls do not wait for this connection.
    let mut slicer = crate::background::Slicer::new();
    while let Some(r) = rows.next()? {
        slicer.pause();
        if let ValueRef::Text(t) = r.get_ref(0)? {
            fps.push(known.fingerprint(&String::from_utf8_lossy(t)));
        }
    }
    known.loaded(fps);
    Ok(())
}

/// Why `PATH.lock` could not be taken.
enum Locked {
    /// Another process holds it; `holder` is ` (pid N)` if it said so.
    Held { holder: String, lock: PathBuf },
    Io {
        lock: PathBuf,
        error: std::io::Error,
    },
}

/// Takes the exclusive lock on `PATH.lock` and writes this process's pid
/// into it, for the message another process gets.
fn lock(path: &str) -> Result<std::fs::File, Locked> {
    let lock = PathBuf::from(format!("{path}.lock"));
    let io = |error| Locked::Io {
        lock: lock.clone(),
        error,
    };
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&lock)
        // A lock file another user left (it is never removed) can still be
        // locked through a read-only handle; only the pid goes unwritten.
        .or_else(|e| match e.kind() {
            std::io::ErrorKind::PermissionDenied => std::fs::File::open(&lock),
            _ => Err(e),
        })
        .map_err(io)?;
    match file.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            let pid = std::fs::read_to_string(&lock).unwrap_or_default();
            let pid = pid.trim();
            let holder = if !pid.is_empty() && pid.bytes().all(|b| b.is_ascii_digit()) {
                format!(" (pid {pid})")
            } else {
                String::new()
            };
            return Err(Locked::Held { holder, lock });
        }
        Err(std::fs::TryLockError::Error(e)) => return Err(io(e)),
    }
    // Only informative: a failure here leaves the lock held all the same.
    let _ = file
        .set_len(0)
        .and_then(|()| writeln!(file, "{}", std::process::id()));
    Ok(file)
}

/// Records a change in the caller's transaction, after pruning rows older
/// than [`CHANGE_RETENTION`].
fn record_change(
    tx: &rusqlite::Transaction<'_>,
    account_id: &str,
    kind: ChangeKind,
) -> Result<(), StoreError> {
    let at = crate::calendar::now_ts();
    tx.prepare_cached("DELETE FROM changes WHERE at < ?1")?
        .execute([at.saturating_sub(CHANGE_RETENTION)])?;
    tx.prepare_cached("INSERT INTO changes (account_id, kind, at) VALUES (?1, ?2, ?3)")?
        .execute(params![account_id, kind.code(), at])?;
    Ok(())
}

/// A pack from a row of `SELECT {PACK_COLUMNS}`. Columns are read by
/// position: by name, rusqlite compares the name with every column's, and
/// a flush reads each account's packs (it was about a tenth of the SQLite
/// writer's samples).
fn read_pack(row: &rusqlite::Row<'_>) -> rusqlite::Result<StoredPack> {
    // Straight into the `Arc<str>`, without a `String` in between.
    let id: std::sync::Arc<str> = row.get_ref(0)?.as_str()?.into();
    Ok(StoredPack {
        spec: PackSpec {
            pack_id: id,
            source: PackSource::from_code(row.get(1)?).unwrap_or(PackSource::Purchased),
            item: Item::from_code(row.get(2)?).unwrap_or(Item::Calls),
            capacity: from_sql(row.get(3)?),
            valid_from: row.get(4)?,
            valid_until: row.get(5)?,
            priority: u32::try_from(row.get::<_, i64>(6)?).unwrap_or(0),
            created_at: row.get(7)?,
        },
        used: from_sql(row.get(8)?),
    })
}

/// A batch's parts grouped by account (adjacent, in id order), each
/// account's parts in batch order, as [`crate::ledger::by_account`] groups
/// them. The flusher sorts its batches by account already, so the stable
/// sort finds one run and the grouping allocates nothing per account.
fn parts_by_account(accounts: &[crate::ledger::AccountFlush]) -> Vec<&crate::ledger::AccountFlush> {
    let mut parts: Vec<&crate::ledger::AccountFlush> = accounts.iter().collect();
    parts.sort_by(|a, b| a.account_id.cmp(&b.account_id));
    parts
}

/// An account from a row of `SELECT {ACCOUNT_COLUMNS}`, read by position
/// as [`read_pack`] does.
fn read_account(row: &rusqlite::Row<'_>) -> rusqlite::Result<AccountRecord> {
    Ok(AccountRecord {
        account_id: row.get(0)?,
        activated_at: row.get(1)?,
        suspended: row.get(2)?,
        deny_on_exhausted: row.get(3)?,
    })
}

/// The columns [`read_account`] reads, in its order.
const ACCOUNT_COLUMNS: &str = "account_id, activated_at, suspended, deny_on_exhausted";

/// The columns [`read_pack`] reads, in its order.
const PACK_COLUMNS: &str =
    "pack_id, source, item, capacity, valid_from, valid_until, priority, created_at, used";

fn get_account(conn: &Connection, id: &str) -> Result<Option<AccountRecord>, StoreError> {
    Ok(conn
        .prepare_cached(&format!(
            "SELECT {ACCOUNT_COLUMNS} FROM accounts WHERE account_id = ?1"
        ))?
        .query_row([id], read_account)
        .optional()?)
}

/// The settled mark (R12), `Ts::MIN` until something has been settled.
fn settled_mark(conn: &Connection) -> Result<Ts, StoreError> {
    Ok(conn
        .prepare_cached("SELECT settled_before FROM settlement WHERE id = 1")?
        .query_row([], |r| r.get(0))
        .optional()?
        .unwrap_or(Ts::MIN))
}

fn get_pack(
    conn: &Connection,
    account: &str,
    pack: &str,
) -> Result<Option<StoredPack>, StoreError> {
    Ok(conn
        .prepare_cached(&format!(
            "SELECT {PACK_COLUMNS} FROM packs WHERE account_id = ?1 AND pack_id = ?2"
        ))?
        .query_row([account, pack], read_pack)
        .optional()?)
}

/// A usage row, or a precise error for a row whose amount is not a whole
/// number in 0..=2^63-1: older versions let SQLite turn an overflowing sum
/// into a float. Such a row is reported, account, hour, item and pack,
/// rather than exported wrong or skipped; an export filtered to any other
/// account never reads it.
fn read_usage(r: &rusqlite::Row<'_>) -> rusqlite::Result<Result<UsageRow, StoreError>> {
    let code: i64 = r.get(2)?;
    let mut row = UsageRow {
        account_id: r.get(0)?,
        hour: r.get(1)?,
        // An unknown item is refused, not read as another: the row's key
        // is the paging cursor, and a wrong one would skip or repeat rows.
        item: Item::from_code(code).ok_or(rusqlite::Error::IntegralValueOutOfRange(2, code))?,
        pack_id: r.get(3)?,
        source: PackSource::from_code(r.get(4)?),
        amount: 0,
        adjustment: None,
    };
    let stored = match r.get_ref(5)? {
        ValueRef::Integer(n) if n >= 0 => {
            row.amount = from_sql(n);
            return Ok(Ok(row));
        }
        ValueRef::Integer(n) => n.to_string(),
        ValueRef::Real(f) => format!("{f:e} (a float)"),
        ValueRef::Null => "NULL".into(),
        ValueRef::Text(_) | ValueRef::Blob(_) => "a non-number".into(),
    };
    Ok(Err(StoreError::permanent(format!(
        "usage row (account `{}`, hour {}, {}, pack `{}`) holds {stored}, not a whole number \
         of at most 2^63-1: an older packmeter let the hour's sum overflow, so the amount is \
         not exact; correct the row in the store. Other accounts export with an account filter.",
        row.account_id,
        crate::calendar::to_datetime(row.hour).to_rfc3339(),
        row.item,
        row.pack_id,
    ))))
}

/// The page query. Parameters: ?1 from, ?2 to, ?3 account, ?4..?7 the
/// cursor (hour, account, item, pack), ?8 the limit; all are bound, and
/// those a variant does not mention are ignored.
///
/// With a cursor, `hour >= from` is left out (the cursor is past it, see
/// [`page_start`]): SQLite then seeks the index with the row value itself
/// instead of scanning from `from` to the cursor. With an account, the
/// primary key (account, hour, item, pack) serves both the filter and the
/// order, and the account drops out of the row value.
fn page_sql(account: bool, after: bool) -> String {
    let filter = match (account, after) {
        (false, false) => "hour >= ?1 AND hour < ?2",
        (false, true) => "hour < ?2 AND (hour, account_id, item, pack_id) > (?4, ?5, ?6, ?7)",
        (true, false) => "account_id = ?3 AND hour >= ?1 AND hour < ?2",
        (true, true) => "account_id = ?3 AND hour < ?2 AND (hour, item, pack_id) > (?4, ?6, ?7)",
    };
    format!(
        "SELECT account_id, hour, item, pack_id, source, amount FROM usage_hourly \
         WHERE {filter} ORDER BY hour, account_id, item, pack_id LIMIT ?8"
    )
}

/// Applies one flush batch in one transaction (see [`Store::flush_batch`]).
/// Per account: from the packs `cache` has; or, when it lacks them and
/// each pack the account's rows name has room for them, without its packs
/// ([`take_room`]); otherwise from its packs, read. Returns, per account
/// of the result, whether its totals are partial (the second way); the
/// caller puts the others back into `cache` once this has committed.
fn write_flush(
    conn: &mut Connection,
    batch: &FlushBatch,
    cache: &mut PackCache,
) -> Result<(Flushed, Vec<bool>), StoreError> {
    let tx = conn.transaction()?;
    let fresh = tx
        .prepare_cached(
            "INSERT INTO flush_batches (batch_id, applied_at) VALUES (?1, ?2) \
             ON CONFLICT (batch_id) DO NOTHING",
        )?
        .execute(params![batch.batch_id, batch.now])?;
    if fresh == 0 {
        // Applied before (a replayed spill of a flush that committed).
        return Ok((Flushed::default(), Vec::new()));
    }
    let mut flushed = Flushed {
        applied: true,
        ..Flushed::default()
    };
    // Per account of `flushed`: whether its totals are only the packs the
    // flush wrote (see `take_room`), which the pack cache must not hold.
    let mut partial = Vec::new();
    {
        // Per account: one read of its packs (none when the cache has
        // them), then one single-row write per row that changes, an
        // UPDATE where the row is known or likely to exist. An upsert
        // costs more than the UPDATE (its conflict check, the update
        // program, up to ten bound values): callgrind counted 42.5 k
        // instructions per flushed account with upserts, 33.2 k without
        // (issue 10).
        let mut packs = tx.prepare_cached(&format!(
            "SELECT {PACK_COLUMNS} FROM packs WHERE account_id = ?1"
        ))?;
        // An activation only ever moves back at a flush (R1: an
        // earlier event); an operator's change is written by
        // put_account, never while a flush runs. Every account of
        // the batch gets its row, as on PostgreSQL, where the row
        // is the lock that serializes flushes of the account. A row
        // the flush would leave as it is is not rewritten (most
        // flushes change no activation).
        //
        // An account with a pack has its row (every writer of a
        // pack writes it, and `migrate` added it to older files):
        // a flush of such an account that carries no activation
        // (nearly every flush) leaves the row alone, without the
        // upsert.
        let mut account = tx.prepare_cached(
            "INSERT INTO accounts (account_id, activated_at) VALUES (?1, ?2) \
             ON CONFLICT (account_id) DO UPDATE SET activated_at = excluded.activated_at \
             WHERE excluded.activated_at < accounts.activated_at \
             OR (accounts.activated_at IS NULL AND excluded.activated_at IS NOT NULL)",
        )?;
        let mut held = tx.prepare_cached(
            "SELECT 1 FROM dedup WHERE account_id = ?1 AND request_id = ?2 \
             AND expires_at > ?3",
        )?;
        // Most flushes add to an hour's row that exists; the insert
        // runs when the update finds no row. SQLite would turn an
        // overflowing sum into a float: the update's last condition
        // refuses it, and then the insert finds the row (below).
        let mut add_usage = tx.prepare_cached(
            "UPDATE usage_hourly SET amount = amount + ?5 WHERE account_id = ?1 \
             AND hour = ?2 AND item = ?3 AND pack_id = ?4 \
             AND amount <= 9223372036854775807 - ?5",
        )?;
        let mut new_usage = tx.prepare_cached(
            "INSERT INTO usage_hourly (account_id, hour, item, pack_id, source, amount) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6) \
             ON CONFLICT (account_id, hour, item, pack_id) DO NOTHING",
        )?;
        // A pack is updated, and inserted when the update finds no row
        // (a free-tier month's first flush): a wasted seek once a month
        // per account, rather than a list of the stored pack ids built
        // and searched at every flush of every account.
        let mut add_used = tx.prepare_cached(
            "UPDATE packs SET used = used + ?3 WHERE account_id = ?1 AND pack_id = ?2",
        )?;
        // Adds a pack's sum only where it fits (see `take_room`).
        let mut add_if_room = tx.prepare_cached(
            "UPDATE packs SET used = packmeter_noted(used + ?3) WHERE account_id = ?1 \
             AND pack_id = ?2 AND used <= capacity - ?3",
        )?;
        let mut take_back = tx.prepare_cached(
            "UPDATE packs SET used = used - ?3 WHERE account_id = ?1 AND pack_id = ?2",
        )?;
        let mut new_pack = tx.prepare_cached(&format!(
            "INSERT INTO packs (account_id, {PACK_COLUMNS}) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10) \
             ON CONFLICT (account_id, pack_id) DO UPDATE SET used = used + excluded.used"
        ))?;
        let mut dedup = tx.prepare_cached(
            "INSERT INTO dedup (account_id, request_id, expires_at, calls_covered, \
             calls_overage, egress_covered, egress_overage) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7) \
             ON CONFLICT (account_id, request_id) DO UPDATE SET \
             expires_at = excluded.expires_at, calls_covered = excluded.calls_covered, \
             calls_overage = excluded.calls_overage, \
             egress_covered = excluded.egress_covered, \
             egress_overage = excluded.egress_overage",
        )?;
        // No call waits for this connection, so the writer may
        // yield between accounts (see `Slicer`).
        let mut slicer = crate::background::Slicer::new();
        for parts in parts_by_account(&batch.accounts).chunk_by(|a, b| a.account_id == b.account_id)
        {
            slicer.pause();
            let id = &*parts[0].account_id;
            let cached = cache.take(id);
            let earliest = crate::ledger::earliest_activation(parts);
            let mut held_ids = std::collections::HashSet::new();
            for r in parts.iter().flat_map(|a| &a.dedup) {
                if held.exists(params![id, &*r.request_id, batch.now])? {
                    held_ids.insert(&*r.request_id);
                }
            }
            // Without its packs when the cache lacks them (at 1 M accounts,
            // nearly every account), if each pack the rows name has room:
            // then the attribution is the rows as they are.
            let named = match (&cached, held_ids.is_empty() && cache.may_skip_reads()) {
                (None, true) => crate::ledger::named(
                    parts.iter().flat_map(|a| &a.deltas),
                    parts.iter().flat_map(|a| &a.dedup),
                ),
                _ => None,
            };
            let taken = match named {
                Some(n) => take_room(&mut add_if_room, &mut take_back, id, &n.packs)?
                    .map(|totals| (n, totals)),
                None => None,
            };
            partial.push(taken.is_some());
            let a = match taken {
                Some((n, totals)) => {
                    // The packs' rows are there, so the account's is too.
                    if earliest.is_some() {
                        account.execute(params![id, earliest])?;
                    }
                    crate::ledger::Attributed {
                        usage: n.usage,
                        // Added already.
                        packs: Vec::new(),
                        dedup: n.dedup,
                        reversed: Vec::new(),
                        totals,
                    }
                }
                None => {
                    let stored = match cached {
                        Some(stored) => stored,
                        None => packs
                            .query_map([id], read_pack)?
                            .collect::<Result<Vec<_>, _>>()?,
                    };
                    if stored.is_empty() || earliest.is_some() {
                        account.execute(params![id, earliest])?;
                    }
                    crate::ledger::attribute(
                        stored,
                        parts.iter().flat_map(|a| &a.deltas),
                        parts.iter().flat_map(|a| &a.dedup),
                        |r| held_ids.contains(r),
                    )
                    .map_err(|e| StoreError::permanent(format!("account `{id}`: {e}")))?
                }
            };
            for d in &a.usage {
                let (pack_id, source) = match &d.pack {
                    Some(p) => (&*p.pack_id, p.source.code()),
                    None => ("", 0),
                };
                let amount = to_sql(d.amount)?;
                let key = params![id, d.hour, d.item.code(), pack_id, amount];
                if add_usage.execute(key)? == 0
                    && new_usage.execute(params![
                        id,
                        d.hour,
                        d.item.code(),
                        pack_id,
                        source,
                        amount
                    ])? == 0
                {
                    // The row exists, and the update refused the sum.
                    return Err(StoreError::permanent(format!(
                        "account `{id}`: the usage of hour {} would exceed 2^63-1",
                        d.hour
                    )));
                }
            }
            for (p, amount) in &a.packs {
                if add_used.execute(params![id, &*p.pack_id, to_sql(*amount)?])? == 1 {
                    continue;
                }
                new_pack.execute(params![
                    id,
                    &*p.pack_id,
                    p.source.code(),
                    p.item.code(),
                    to_sql(p.capacity)?,
                    p.valid_from,
                    p.valid_until,
                    p.priority,
                    p.created_at,
                    to_sql(*amount)?
                ])?;
            }
            for r in &a.dedup {
                dedup.execute(params![
                    id,
                    &*r.request_id,
                    r.expires_at,
                    to_sql(r.calls_covered)?,
                    to_sql(r.calls_overage)?,
                    to_sql(r.egress_covered)?,
                    to_sql(r.egress_overage)?
                ])?;
            }
            flushed.add_account(parts[0].account_id.clone(), a.reversed, a.totals);
        }
        tx.prepare_cached("DELETE FROM dedup WHERE expires_at <= ?1")?
            .execute([batch.now])?;
        tx.prepare_cached("DELETE FROM flush_batches WHERE applied_at < ?1")?
            .execute([batch.now.saturating_sub(BATCH_ID_RETENTION)])?;
    }
    tx.commit()?;
    Ok((flushed, partial))
}

thread_local! {
    /// The last value `packmeter_noted` saw on this thread (see [`take_room`]).
    static NOTED: std::cell::Cell<i64> = const { std::cell::Cell::new(0) };
}

/// Adds each pack's sum to its stored `used` where the pack is stored
/// with room for it (the update's condition), and returns those packs as
/// they are now: what [`crate::ledger::attribute`] would have done,
/// without reading the account's packs (see [`crate::ledger::Named`]).
/// If one is missing (a free-tier month's first flush) or lacks room, the
/// sums added before it are taken back, and `None`: the flush then reads
/// the packs and attributes.
///
/// The new `used` comes back through `packmeter_noted`, a function of the
/// writer's connection that returns its argument and notes it in
/// [`NOTED`]: the statement runs on this thread, and it matches one row at
/// most (the primary key). `UPDATE … RETURNING` cost about 2 µs more per
/// statement than the plain update (SQLite collects the returned rows in a
/// temporary table), as much as the read it replaces.
///
/// The packs returned are only those the flush wrote. The meter rebases
/// only the packs it finds in a flush's totals, so that is enough for it;
/// the pack cache, which must hold every pack of an account, is not given
/// them.
fn take_room(
    add_if_room: &mut rusqlite::CachedStatement<'_>,
    take_back: &mut rusqlite::CachedStatement<'_>,
    id: &str,
    sums: &[(PackSpec, u64)],
) -> Result<Option<Vec<StoredPack>>, StoreError> {
    let mut totals = Vec::with_capacity(sums.len());
    for (spec, amount) in sums {
        let amount = to_sql(*amount)?;
        let used = match add_if_room.execute(params![id, &*spec.pack_id, amount])? {
            0 => None,
            _ => Some(NOTED.get()),
        };
        match used {
            Some(used) => totals.push(StoredPack {
                spec: spec.clone(),
                used: from_sql(used),
            }),
            None => {
                for (spec, amount) in &sums[..totals.len()] {
                    take_back.execute(params![id, &*spec.pack_id, to_sql(*amount)?])?;
                }
                return Ok(None);
            }
        }
    }
    Ok(Some(totals))
}

/// Accounts per flush transaction when the flush catches up (a late batch,
/// the final flush, every batch of journal mode's flush;
/// [`Store::catch_up_batch_accounts`]).
///
/// A flush touches each account's rows in two B-trees (`packs`,
/// `usage_hourly`), and an account's rows sit on a page of their own
/// among the account's neighbours. With many accounts in the file (100 k:
/// about 5,600 pages, beyond the 2 MB page cache), a batch of 5,000
/// accounts in key order visits nearly one page per account and table:
/// one `pread` to fetch it, and one page written to the WAL and later to
/// the file. A batch of 100,000 visits each page once for several
/// accounts. Measured on a saturated core at 100 k accounts (BENCHMARKS.md,
/// stop 31): 6.7 KB written per flushed account at 5,000, 0.4 KB at
/// 100,000, and the writer's CPU per account 2.6 times lower at 25,000.
/// Batches taken on time stay small, so one taken just before the flush
/// falls behind ends soon.
const CATCH_UP_BATCH_ACCOUNTS: usize = 100_000;

// Journal mode's batches take this size too, and a batch's intent record
// names its account ids (postcard: each id's bytes after a 2-byte length),
// so the largest batch of the longest ids must fit the journal's record
// limit (13 MB against 64 MB).
const _: () = assert!(
    CATCH_UP_BATCH_ACCOUNTS * (crate::meter::MAX_ACCOUNT_ID_BYTES + 2) + 4096
        <= crate::journal::MAX_BODY
);

#[async_trait]
impl Store for SqliteStore {
    fn catch_up_batch_accounts(&self) -> Option<usize> {
        Some(CATCH_UP_BATCH_ACCOUNTS)
    }

    async fn load_account(
        &self,
        id: &str,
        since: Ts,
        now: Ts,
    ) -> Result<LoadedAccount, StoreError> {
        self.ask_known_ids();
        if !self.known.may_hold(id) {
            // The file holds no row of this account: what the read would
            // find (see `known_ids`), without the trip to the blocking pool.
            return Ok(LoadedAccount::default());
        }
        let id = id.to_string();
        self.read(move |conn| {
            // One snapshot for the three reads.
            let conn = conn.transaction()?;
            let account = get_account(&conn, &id)?;
            let packs = conn
                .prepare_cached(&format!(
                    "SELECT {PACK_COLUMNS} FROM packs WHERE account_id = ?1 AND valid_until > ?2"
                ))?
                .query_map(params![id, since], read_pack)?
                .collect::<Result<Vec<_>, _>>()?;
            let dedup = conn
                .prepare_cached(
                    "SELECT request_id, expires_at, calls_covered, calls_overage, \
                     egress_covered, egress_overage FROM dedup \
                     WHERE account_id = ?1 AND expires_at > ?2",
                )?
                .query_map(params![id, now], |r| {
                    Ok(DedupRecord {
                        request_id: r.get::<_, String>(0)?.into(),
                        expires_at: r.get(1)?,
                        hour: None,
                        calls_covered: from_sql(r.get(2)?),
                        calls_overage: from_sql(r.get(3)?),
                        egress_covered: from_sql(r.get(4)?),
                        egress_overage: from_sql(r.get(5)?),
                    })
                })?
                .collect::<Result<Vec<_>, _>>()?;
            // Summed here rather than with SQL's SUM, which fails on an
            // integer overflow; a row an older version let become a float
            // counts as far as it goes.
            let mut open_usage: Vec<(Ts, Item, u64)> = Vec::new();
            let mut stmt = conn.prepare_cached(
                "SELECT hour, item, amount FROM usage_hourly \
                 WHERE account_id = ?1 AND hour > ?2",
            )?;
            let mut rows = stmt.query(params![id, since.saturating_sub(crate::calendar::HOUR)])?;
            while let Some(r) = rows.next()? {
                let (hour, code): (Ts, i64) = (r.get(0)?, r.get(1)?);
                let Some(item) = Item::from_code(code) else {
                    continue;
                };
                let amount = match r.get_ref(2)? {
                    ValueRef::Integer(n) => from_sql(n),
                    // Saturating float-to-integer conversion.
                    ValueRef::Real(f) => f as u64,
                    _ => 0,
                };
                match open_usage.iter_mut().find(|u| u.0 == hour && u.1 == item) {
                    Some(u) => u.2 = u.2.saturating_add(amount),
                    None => open_usage.push((hour, item, amount)),
                }
            }
            drop(rows);
            drop(stmt);
            conn.finish()?;
            Ok(LoadedAccount {
                account,
                packs,
                dedup,
                open_usage,
            })
        })
        .await
    }

    async fn put_account(&self, account: &AccountRecord) -> Result<(), StoreError> {
        let a = account.clone();
        self.known.note([&*a.account_id]);
        self.with(move |conn| {
            let tx = conn.transaction()?;
            tx.prepare_cached(
                "INSERT INTO accounts (account_id, activated_at, suspended, deny_on_exhausted) \
                 VALUES (?1, ?2, ?3, ?4) ON CONFLICT (account_id) DO UPDATE SET \
                 activated_at = excluded.activated_at, suspended = excluded.suspended, \
                 deny_on_exhausted = excluded.deny_on_exhausted",
            )?
            .execute(params![
                a.account_id,
                a.activated_at,
                a.suspended,
                a.deny_on_exhausted
            ])?;
            record_change(&tx, &a.account_id, ChangeKind::Account)?;
            tx.commit()?;
            Ok(())
        })
        .await
    }

    async fn get_account(&self, id: &str) -> Result<Option<AccountRecord>, StoreError> {
        let id = id.to_string();
        self.read(move |conn| get_account(conn, &id)).await
    }

    async fn grant_pack(&self, account_id: &str, pack: &PackSpec) -> Result<Granted, StoreError> {
        let (account, p) = (account_id.to_string(), pack.clone());
        self.known.note([account_id]);
        let cache = self.pack_cache.clone();
        self.with(move |conn| {
            // Whether or not the insert commits, the next flush reads.
            cache.lock().forget(&account);
            let tx = conn.transaction()?;
            if let Some(existing) = get_pack(&tx, &account, &p.pack_id)? {
                return Ok(Granted::Existing(existing));
            }
            tx.prepare_cached(&format!(
                "INSERT INTO packs (account_id, {PACK_COLUMNS}) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, 0)"
            ))?
            .execute(params![
                account,
                &*p.pack_id,
                p.source.code(),
                p.item.code(),
                to_sql(p.capacity)?,
                p.valid_from,
                p.valid_until,
                p.priority,
                p.created_at
            ])?;
            // The account exists from its first grant, activated or not, so
            // it stays listable (R11) after its packs have ended.
            tx.prepare_cached(
                "INSERT INTO accounts (account_id) VALUES (?1) ON CONFLICT (account_id) DO NOTHING",
            )?
            .execute([&account])?;
            record_change(&tx, &account, ChangeKind::Pack)?;
            tx.commit()?;
            Ok(Granted::New(StoredPack { spec: p, used: 0 }))
        })
        .await
    }

    async fn list_packs(&self, account_id: &str) -> Result<Vec<StoredPack>, StoreError> {
        let id = account_id.to_string();
        self.read(move |conn| {
            Ok(conn
                .prepare_cached(&format!(
                    "SELECT {PACK_COLUMNS} FROM packs WHERE account_id = ?1 ORDER BY valid_from, pack_id"
                ))?
                .query_map([id], read_pack)?
                .collect::<Result<Vec<_>, _>>()?)
        })
        .await
    }

    async fn write_batch(&self, batch: &FlushBatch) -> Result<bool, StoreError> {
        Ok(self.flush_batch(batch).await?.applied)
    }

    async fn flush_batch(&self, batch: &FlushBatch) -> Result<Flushed, StoreError> {
        self.flush_shared(Arc::new(batch.clone())).await
    }

    async fn flush_shared(&self, batch: Arc<FlushBatch>) -> Result<Flushed, StoreError> {
        let known = self.known.clone();
        let cache = self.pack_cache.clone();
        self.with(move |conn| {
            // Before the transaction: see `known_ids`.
            known.note(batch.accounts.iter().map(|a| &*a.account_id));
            let mut cache = cache.lock();
            // A flush that fails (before or during its commit, which may
            // then have happened or not) has taken its accounts' entries
            // out: what the cache still holds is of other accounts.
            let (flushed, partial) = write_flush(conn, &batch, &mut cache)?;
            // What the committed rows hold, for the accounts' next flush
            // (not the packs of an account flushed without reading them:
            // the cache holds every pack of an account, or none).
            for (t, partial) in flushed.accounts.iter().zip(&partial) {
                if !cache.has_room() {
                    break;
                }
                if !partial {
                    cache.put(t.account_id.clone(), t.packs.clone());
                }
            }
            Ok(flushed)
        })
        .await
    }

    async fn usage_rows_page(
        &self,
        from: Ts,
        to: Ts,
        account_id: Option<&str>,
        after: Option<&UsageKey>,
        limit: usize,
    ) -> Result<Vec<UsageRow>, StoreError> {
        let (from, after) = page_start(from, account_id, after);
        let account = account_id.map(str::to_string);
        let after = after.cloned();
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.read(move |conn| {
            let sql = page_sql(account.is_some(), after.is_some());
            let mut stmt = conn.prepare_cached(&sql)?;
            let k = after.as_ref();
            let rows = stmt
                .query_map(
                    params![
                        from,
                        to,
                        account,
                        k.map(|k| k.hour),
                        k.map(|k| k.account_id.as_str()),
                        k.map(|k| k.item.code()),
                        k.map(|k| k.pack_id.as_str()),
                        limit
                    ],
                    read_usage,
                )?
                .collect::<Result<Vec<_>, _>>()?;
            rows.into_iter().collect()
        })
        .await
    }

    async fn last_change(&self) -> Result<i64, StoreError> {
        self.read(|conn| {
            Ok(conn
                .prepare_cached("SELECT coalesce(max(seq), 0) FROM changes")?
                .query_row([], |r| r.get(0))?)
        })
        .await
    }

    async fn changes_since(&self, after: i64, limit: usize) -> Result<Vec<Change>, StoreError> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.read(move |conn| {
            Ok(conn
                .prepare_cached(
                    "SELECT seq, account_id, kind, at FROM changes WHERE seq > ?1 \
                     ORDER BY seq LIMIT ?2",
                )?
                .query_map(params![after, limit], |r| {
                    Ok(Change {
                        seq: r.get(0)?,
                        account_id: r.get(1)?,
                        // A kind a newer binary writes: refresh the account whole.
                        kind: ChangeKind::from_code(r.get(2)?).unwrap_or(ChangeKind::Account),
                        at: r.get(3)?,
                    })
                })?
                .collect::<Result<Vec<_>, _>>()?)
        })
        .await
    }

    async fn ping(&self) -> Result<(), StoreError> {
        // Reads the schema page, so a damaged or vanished file shows up.
        self.read(|conn| {
            conn.query_row("SELECT count(*) FROM sqlite_master", [], |r| {
                r.get::<_, i64>(0)
            })?;
            Ok(())
        })
        .await
    }

    async fn settled_before(&self) -> Result<Ts, StoreError> {
        self.read(|conn| settled_mark(conn)).await
    }

    async fn recorded_plans(&self) -> Result<Vec<super::RecordedPlan>, StoreError> {
        self.read(|conn| {
            let mut stmt = conn.prepare_cached(
                "SELECT position, name, effective, months, calls, egress_bytes, zone \
                 FROM plans_in_force ORDER BY position",
            )?;
            let rows = stmt.query_map([], |r| {
                Ok(super::RecordedPlan {
                    position: r.get(0)?,
                    name: r.get(1)?,
                    effective: r.get(2)?,
                    months: r.get(3)?,
                    calls: r.get(4)?,
                    egress_bytes: r.get(5)?,
                    zone: r.get(6)?,
                })
            })?;
            Ok(rows.collect::<Result<Vec<_>, _>>()?)
        })
        .await
    }

    async fn record_plans(&self, plans: &[super::RecordedPlan], at: Ts) -> Result<(), StoreError> {
        let plans = plans.to_vec();
        self.with(move |conn| {
            let tx = conn.transaction()?;
            {
                let mut stmt = tx.prepare_cached(
                    "INSERT INTO plans_in_force \
                     (position, name, effective, months, calls, egress_bytes, zone, recorded_at) \
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8) ON CONFLICT (position) DO NOTHING",
                )?;
                for p in &plans {
                    stmt.execute(rusqlite::params![
                        p.position,
                        p.name,
                        p.effective,
                        p.months,
                        p.calls,
                        p.egress_bytes,
                        p.zone,
                        at
                    ])?;
                }
            }
            tx.commit()?;
            Ok(())
        })
        .await
    }

    async fn holds_usage(&self) -> Result<bool, StoreError> {
        self.read(|conn| {
            Ok(conn
                .prepare_cached(
                    "SELECT EXISTS (SELECT 1 FROM usage_hourly) \
                     OR EXISTS (SELECT 1 FROM accounts WHERE activated_at IS NOT NULL)",
                )?
                .query_row([], |r| r.get(0))?)
        })
        .await
    }

    async fn recalculation_candidates(
        &self,
        from: Ts,
        activated_before: Ts,
    ) -> Result<Vec<(String, Ts)>, StoreError> {
        self.read(move |conn| {
            let mut stmt = conn.prepare_cached(
                "SELECT a.account_id, a.activated_at FROM accounts a \
                 WHERE a.activated_at < ?2 AND EXISTS (SELECT 1 FROM usage_hourly u \
                 WHERE u.account_id = a.account_id AND u.hour >= ?1 AND u.source IN (0, 1)) \
                 ORDER BY a.account_id",
            )?;
            let rows = stmt.query_map(params![from, activated_before], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })?;
            Ok(rows.collect::<Result<Vec<_>, _>>()?)
        })
        .await
    }

    async fn recalculate(
        &self,
        r: &crate::recalc::Recalculation,
    ) -> Result<Vec<StoredPack>, StoreError> {
        let r = r.clone();
        let cache = self.pack_cache.clone();
        self.with(move |conn| {
            // It changes the account's `used`: its next flush reads.
            cache.lock().forget(&r.account_id);
            let tx = conn.transaction()?;
            let hour = r.hour.max(settled_mark(&tx)?);
            {
                let mut held = tx.prepare_cached(
                    "SELECT pack_id, source, sum(amount) FROM ( \
                     SELECT pack_id, source, amount FROM usage_hourly \
                     WHERE account_id = ?1 AND item = ?2 AND hour >= ?3 AND hour < ?4 \
                     AND source IN (0, 1) \
                     UNION ALL SELECT pack_id, source, amount FROM usage_adjustments \
                     WHERE account_id = ?1 AND item = ?2 AND span_from = ?3) \
                     GROUP BY pack_id, source",
                )?;
                let mut used = tx.prepare_cached(
                    "SELECT used FROM packs WHERE account_id = ?1 AND pack_id = ?2",
                )?;
                let mut adjust = tx.prepare_cached(
                    "INSERT INTO usage_adjustments (account_id, plan_position, span_from, item, \
                     pack_id, hour, source, plan, amount) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9) \
                     ON CONFLICT (account_id, span_from, item, pack_id, plan_position, hour) \
                     DO UPDATE SET amount = amount + excluded.amount",
                )?;
                let mut credit = tx.prepare_cached(
                    "UPDATE packs SET used = max(0, used + ?3) WHERE account_id = ?1 AND pack_id = ?2",
                )?;
                let mut debit = tx.prepare_cached(&format!(
                    "INSERT INTO packs (account_id, {PACK_COLUMNS}) \
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10) \
                     ON CONFLICT (account_id, pack_id) DO UPDATE SET used = used + excluded.used"
                ))?;
                for span in &r.spans {
                    for item in [Item::Calls, Item::EgressBytes] {
                        let rows = held
                            .query_map(params![r.account_id, item.code(), span.from, span.until], |row| {
                                Ok(crate::recalc::Held {
                                    pack_id: row.get(0)?,
                                    source: PackSource::from_code(row.get(1)?),
                                    net: row.get(2)?,
                                })
                            })?
                            .collect::<Result<Vec<_>, _>>()?;
                        let new = match span.pack(item) {
                            Some(p) => {
                                let u: Option<i64> = used
                                    .query_row(params![r.account_id, &*p.pack_id], |row| row.get(0))
                                    .optional()?;
                                Some((p, from_sql(u.unwrap_or(0))))
                            }
                            None => None,
                        };
                        for m in crate::recalc::rededuct(new, &rows) {
                            adjust.execute(params![
                                r.account_id,
                                r.plan_position,
                                span.from,
                                item.code(),
                                m.pack_id,
                                hour,
                                m.source.map_or(0, PackSource::code),
                                r.plan,
                                m.delta
                            ])?;
                            match new.filter(|(p, _)| *p.pack_id == *m.pack_id) {
                                Some((p, _)) => {
                                    debit.execute(params![
                                        r.account_id,
                                        &*p.pack_id,
                                        p.source.code(),
                                        p.item.code(),
                                        to_sql(p.capacity)?,
                                        p.valid_from,
                                        p.valid_until,
                                        i64::from(p.priority),
                                        p.created_at,
                                        m.delta
                                    ])?;
                                }
                                None if m.source.is_some() => {
                                    credit.execute(params![r.account_id, m.pack_id, m.delta])?;
                                }
                                None => {}
                            }
                        }
                    }
                }
            }
            let packs = tx
                .prepare_cached(&format!("SELECT {PACK_COLUMNS} FROM packs WHERE account_id = ?1"))?
                .query_map([&r.account_id], read_pack)?
                .collect::<Result<Vec<_>, _>>()?;
            tx.commit()?;
            Ok(packs)
        })
        .await
    }

    async fn adjustment_rows(
        &self,
        from: Ts,
        to: Ts,
        account_id: Option<&str>,
    ) -> Result<Vec<UsageRow>, StoreError> {
        let account = account_id.map(str::to_string);
        self.read(move |conn| {
            let mut stmt = conn.prepare_cached(
                "SELECT account_id, hour, item, pack_id, source, plan, sum(amount) \
                 FROM usage_adjustments WHERE hour >= ?1 AND hour < ?2 \
                 AND (?3 IS NULL OR account_id = ?3) \
                 GROUP BY hour, account_id, item, pack_id, source, plan \
                 HAVING sum(amount) <> 0 ORDER BY hour, account_id, item, pack_id, plan",
            )?;
            let rows = stmt.query_map(params![from, to, account], |r| {
                let code: i64 = r.get(2)?;
                Ok(UsageRow {
                    account_id: r.get(0)?,
                    hour: r.get(1)?,
                    item: Item::from_code(code)
                        .ok_or(rusqlite::Error::IntegralValueOutOfRange(2, code))?,
                    pack_id: r.get(3)?,
                    source: PackSource::from_code(r.get(4)?),
                    amount: 0,
                    adjustment: Some(crate::ledger::Adjustment {
                        plan: r.get(5)?,
                        amount: r.get(6)?,
                    }),
                })
            })?;
            Ok(rows.collect::<Result<Vec<_>, _>>()?)
        })
        .await
    }

    async fn plans_recalculated(&self) -> Result<Vec<i64>, StoreError> {
        self.read(|conn| {
            let mut stmt =
                conn.prepare_cached("SELECT position FROM plan_recalculations ORDER BY position")?;
            let rows = stmt.query_map([], |r| r.get(0))?;
            Ok(rows.collect::<Result<Vec<_>, _>>()?)
        })
        .await
    }

    async fn record_recalculated(&self, position: i64, at: Ts) -> Result<(), StoreError> {
        self.with(move |conn| {
            conn.prepare_cached(
                "INSERT INTO plan_recalculations (position, finished_at) VALUES (?1, ?2) \
                 ON CONFLICT (position) DO NOTHING",
            )?
            .execute(params![position, at])?;
            Ok(())
        })
        .await
    }

    async fn record_settled(&self, before: Ts) -> Result<Ts, StoreError> {
        self.with(move |conn| {
            let tx = conn.transaction()?;
            tx.prepare_cached(
                "INSERT INTO settlement (id, settled_before) VALUES (1, ?1) \
                 ON CONFLICT (id) DO UPDATE SET \
                 settled_before = max(settled_before, excluded.settled_before)",
            )?
            .execute([before])?;
            let mark = tx
                .prepare_cached("SELECT settled_before FROM settlement WHERE id = 1")?
                .query_row([], |r| r.get(0))?;
            tx.commit()?;
            Ok(mark)
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    //! What every store must do is checked by the conformance suite
    //! (tests/store_conformance.rs), on SQLite and PostgreSQL alike; these
    //! tests are about SQLite itself.
    use super::*;

    #[tokio::test]
    async fn the_settled_mark_only_moves_forward_and_outlives_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pm.db").to_str().unwrap().to_string();
        {
            let store = SqliteStore::open(&path).unwrap();
            assert_eq!(store.settled_before().await.unwrap(), Ts::MIN);
            assert_eq!(store.record_settled(20).await.unwrap(), 20);
            assert_eq!(store.record_settled(10).await.unwrap(), 20);
            // A second open while this one lives is refused.
            assert!(matches!(
                SqliteStore::open(&path),
                Err(OpenError::InUse { .. })
            ));
        }
        let store = SqliteStore::open(&path).unwrap();
        assert_eq!(store.settled_before().await.unwrap(), 20);
    }

    const HOUR: Ts = crate::calendar::HOUR;

    fn open_temp() -> (tempfile::TempDir, SqliteStore) {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(dir.path().join("pm.db").to_str().unwrap()).unwrap();
        (dir, store)
    }

    #[test]
    fn usage_page_queries_seek_an_index_in_key_order() {
        let (_dir, store) = open_temp();
        let conn = store.reader.lock().unwrap();
        for (account, after, uses) in [
            (
                false,
                false,
                "INDEX usage_hourly_by_key (hour>? AND hour<?)",
            ),
            (
                false,
                true,
                "INDEX usage_hourly_by_key ((hour,account_id,item,pack_id)>(?,?,?,?) AND hour<?)",
            ),
            (
                true,
                false,
                "PRIMARY KEY (account_id=? AND hour>? AND hour<?)",
            ),
            (
                true,
                true,
                "PRIMARY KEY (account_id=? AND (hour,item,pack_id)>(?,?,?) AND hour<?)",
            ),
        ] {
            let sql = format!("EXPLAIN QUERY PLAN {}", page_sql(account, after));
            let plan: Vec<String> = conn
                .prepare(&sql)
                .unwrap()
                .query_map(
                    rusqlite::params_from_iter([rusqlite::types::Null; 8]),
                    |r| r.get::<_, String>("detail"),
                )
                .unwrap()
                .collect::<Result<_, _>>()
                .unwrap();
            // One seek, rows already in order: no sort, no scan.
            assert_eq!(plan, [format!("SEARCH usage_hourly USING {uses}")], "{sql}");
        }
    }

    /// Loads `id` while the reading connection is held elsewhere: a load
    /// that reads the store waits for it, one answered from the known ids
    /// does not. `None` if it had to read (it did not finish in time).
    // Holding the std mutex across the await is the point: the read, if
    // any, blocks on it in the blocking pool, never on this task.
    #[allow(clippy::await_holding_lock)]
    async fn load_without_reading(store: &SqliteStore, id: &str) -> Option<LoadedAccount> {
        let held = store.reader.lock().unwrap();
        let load = tokio::time::timeout(
            std::time::Duration::from_secs(2),
            store.load_account(id, 0, 0),
        )
        .await;
        drop(held);
        load.ok().map(Result::unwrap)
    }

    fn flush_of(id: &str) -> FlushBatch {
        FlushBatch {
            batch_id: format!("batch-{id}"),
            accounts: vec![crate::ledger::AccountFlush {
                account_id: id.into(),
                account: None,
                deltas: vec![],
                dedup: vec![],
            }],
            now: 0,
        }
    }

    /// Issue 10: an account the file cannot hold is answered without a
    /// read; every account written through the store (put_account,
    /// grant_pack, a flush) is read, before and after a reopen, and while
    /// the ids are still being read at open.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_first_load_skips_the_read_only_for_an_account_the_file_cannot_hold() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pm.db").to_str().unwrap().to_string();
        let written = ["by-put", "by-grant", "by-flush"];
        {
            let store = SqliteStore::open(&path).unwrap();
            // The first load asks for the ids in the file.
            assert!(store
                .load_account("first", 0, 0)
                .await
                .unwrap()
                .is_unknown());
            store.known_ids().wait_loaded().await;
            let unknown = load_without_reading(&store, "nobody").await;
            assert!(unknown.expect("answered without a read").is_unknown());
            store
                .put_account(&AccountRecord {
                    account_id: written[0].into(),
                    activated_at: Some(5),
                    suspended: false,
                    deny_on_exhausted: false,
                })
                .await
                .unwrap();
            let pack = crate::packs::tests::purchased("p1", 10, 0, HOUR, 0);
            store.grant_pack(written[1], &pack).await.unwrap();
            store.flush_batch(&flush_of(written[2])).await.unwrap();
            for id in written {
                assert!(
                    !store.load_account(id, 0, 0).await.unwrap().is_unknown(),
                    "{id}"
                );
            }
        }
        // Reopened: the ids in the file are read, and until then every
        // load reads the store.
        let store = SqliteStore::open(&path).unwrap();
        if !store.known_ids().is_loaded() {
            for id in written {
                assert!(
                    !store.load_account(id, 0, 0).await.unwrap().is_unknown(),
                    "{id}"
                );
            }
        }
        store.known_ids().wait_loaded().await;
        assert!(store.known_ids().len() >= written.len());
        for id in written {
            assert!(
                !store.load_account(id, 0, 0).await.unwrap().is_unknown(),
                "{id}"
            );
        }
        let unknown = load_without_reading(&store, "still-nobody").await;
        assert!(unknown.expect("answered without a read").is_unknown());
    }

    /// A flush skips the account row of an account whose packs it reads:
    /// a file from before every pack had its account row gets the rows at
    /// open, once, so such an account's flush still leaves it listed.
    #[tokio::test]
    async fn opening_an_older_file_gives_every_account_with_a_pack_its_row() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pm.db").to_str().unwrap().to_string();
        let pack = crate::packs::tests::purchased("p1", 10, 0, HOUR, 0);
        {
            let store = SqliteStore::open(&path).unwrap();
            store.grant_pack("old", &pack).await.unwrap();
            // What an older version left: a pack without its account row.
            let conn = store.writer.lock().unwrap();
            conn.execute("DELETE FROM accounts", []).unwrap();
            conn.pragma_update(None, "user_version", 0).unwrap();
        }
        let store = SqliteStore::open(&path).unwrap();
        let mut flush = flush_of("old");
        flush.accounts[0].deltas.push(crate::ledger::DeltaRow {
            hour: 0,
            item: Item::Calls,
            pack: Some(pack),
            amount: 1,
            span: None,
        });
        store.flush_batch(&flush).await.unwrap();
        assert_eq!(
            store
                .get_account("old")
                .await
                .unwrap()
                .map(|a| a.activated_at),
            Some(None)
        );
        let version: i64 = store
            .writer
            .lock()
            .unwrap()
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .unwrap();
        assert_eq!(version, FILE_VERSION);
    }

    fn delta(pack: Option<&PackSpec>, hour: Ts, amount: u64) -> crate::ledger::DeltaRow {
        crate::ledger::DeltaRow {
            hour,
            item: Item::Calls,
            pack: pack.cloned(),
            amount,
            span: Some((hour, hour)),
        }
    }

    fn batch_of(id: &str, parts: Vec<(&str, Vec<crate::ledger::DeltaRow>)>) -> FlushBatch {
        FlushBatch {
            batch_id: id.into(),
            accounts: parts
                .into_iter()
                .map(|(account, deltas)| crate::ledger::AccountFlush {
                    account_id: account.into(),
                    account: None,
                    deltas,
                    dedup: vec![],
                })
                .collect(),
            now: 0,
        }
    }

    /// Issues 10 and 14: a flush attributes against the packs its cache
    /// holds for an account, so a grant between two flushes must be seen:
    /// what the first pack cannot take goes to the granted one, not to
    /// overage.
    #[tokio::test]
    async fn a_flush_after_a_grant_attributes_against_the_granted_pack() {
        // Once with the packs in the cache (every flush reads what the
        // cache lacks), and once with the first flush written without
        // reading them, which leaves nothing in the cache.
        for always_read in [true, false] {
            a_flush_after_a_grant(always_read).await;
        }
    }

    async fn a_flush_after_a_grant(always_read: bool) {
        let (_dir, store) = open_temp();
        store.pack_cache.lock().always_read = always_read;
        let small = crate::packs::tests::purchased("small", 3, 1, 4 * HOUR, 0);
        let big = crate::packs::tests::purchased("big", 100, 0, 4 * HOUR, 0);
        store.grant_pack("acme", &small).await.unwrap();
        let first = store
            .flush_batch(&batch_of(
                "b1",
                vec![("acme", vec![delta(Some(&small), 0, 2)])],
            ))
            .await
            .unwrap();
        assert_eq!(first.accounts[0].packs.len(), 1);
        assert_eq!(first.accounts[0].packs[0].used, 2);
        // A flush that read the packs left them in the cache; one that
        // found room without reading them left nothing there.
        assert_eq!(store.pack_cache.lock().len(), usize::from(always_read));
        store.grant_pack("acme", &big).await.unwrap();
        // `small` has room for 1 of these 5; the other 4 go to `big`.
        let second = store
            .flush_batch(&batch_of(
                "b2",
                vec![("acme", vec![delta(Some(&small), 0, 5)])],
            ))
            .await
            .unwrap();
        let used = |f: &Flushed, id: &str| {
            f.accounts[0]
                .packs
                .iter()
                .find(|p| &*p.spec.pack_id == id)
                .map(|p| p.used)
        };
        assert_eq!(used(&second, "small"), Some(3));
        assert_eq!(used(&second, "big"), Some(4));
        let rows = store
            .usage_rows_page(Ts::MIN, Ts::MAX, Some("acme"), None, 100)
            .await
            .unwrap();
        let amounts: Vec<(String, u64)> = rows.into_iter().map(|r| (r.pack_id, r.amount)).collect();
        assert_eq!(amounts, [("big".to_string(), 4), ("small".to_string(), 3)]);
    }

    /// Issues 10 and 14: flushes that take the account's packs from the
    /// cache write and report exactly what flushes that read them write and
    /// report. Two files get the same grants and batches (replays, an
    /// overflow the store refuses, packs inserted by a flush, capping and
    /// re-attribution); one store's cache is emptied before every flush.
    ///
    /// A third file gets them too, with its cache emptied before every
    /// flush and flushes allowed to skip the read where each pack they
    /// name has room (`take_room`): it writes what the others write, and
    /// reports the packs it wrote as the others report them.
    #[tokio::test]
    async fn flushes_from_the_pack_cache_match_flushes_that_read_the_packs() {
        let (_d1, cached) = open_temp();
        let (_d2, reading) = open_temp();
        let (_d3, named) = open_temp();
        cached.pack_cache.lock().always_read = true;
        reading.pack_cache.lock().always_read = true;
        let accounts = ["a", "b", "c"];
        // Deltas name the first three; only grants bring the last two,
        // which then take what the named packs cannot.
        let specs: Vec<PackSpec> = [
            ("p5", 5, 2),
            ("p7", 7, 1),
            ("p40", 40, 0),
            ("g9", 9, 3),
            ("g30", 30, 0),
        ]
        .iter()
        .map(|&(id, cap, prio)| crate::packs::tests::purchased(id, cap, prio, 3 * HOUR, 0))
        .collect();
        // A fixed-seed LCG: the same sequence every run.
        let mut seed: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut next = |n: u64| {
            seed = seed
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            (seed >> 33) % n
        };
        let mut last: Option<FlushBatch> = None;
        let (mut refused, mut replayed, mut granted) = (0, 0, 0);
        // Accounts flushed without reading their packs, and with.
        let (mut unread, mut read) = (0, 0);
        for step in 0..300 {
            let roll = next(20);
            if roll == 0 {
                let account = accounts[next(3) as usize];
                let spec = &specs[next(5) as usize];
                let a = cached.grant_pack(account, spec).await.unwrap();
                let b = reading.grant_pack(account, spec).await.unwrap();
                let c = named.grant_pack(account, spec).await.unwrap();
                assert_eq!(a, b, "step {step}");
                assert_eq!(a, c, "step {step}");
                granted += 1;
                continue;
            }
            let batch = match (roll, &last) {
                (1, Some(previous)) => {
                    replayed += 1;
                    previous.clone()
                }
                _ => {
                    let mut parts = Vec::new();
                    for _ in 0..=next(3) {
                        let account = accounts[next(3) as usize];
                        let mut deltas = Vec::new();
                        for _ in 0..=next(3) {
                            let hour = HOUR * next(2) as Ts;
                            let amount = match next(50) {
                                0 => i64::MAX as u64,
                                _ => 1 + next(6),
                            };
                            let pack = match next(4) {
                                3 => None,
                                i => Some(&specs[i as usize]),
                            };
                            deltas.push(delta(pack, hour, amount));
                        }
                        parts.push((account, deltas));
                    }
                    batch_of(&format!("batch-{step}"), parts)
                }
            };
            reading.pack_cache.lock().clear();
            named.pack_cache.lock().clear();
            let a = cached.flush_batch(&batch).await;
            let b = reading.flush_batch(&batch).await;
            let c = named.flush_batch(&batch).await;
            match (a, b, c) {
                (Ok(a), Ok(b), Ok(c)) => {
                    assert_eq!(a, b, "step {step}");
                    assert_eq!(
                        (c.applied, &c.reversed),
                        (b.applied, &b.reversed),
                        "step {step}"
                    );
                    assert_eq!(c.accounts.len(), b.accounts.len(), "step {step}");
                    for (c, b) in c.accounts.iter().zip(&b.accounts) {
                        assert_eq!(c.account_id, b.account_id, "step {step}");
                        // Each pack it reports is as the store reports it.
                        for p in &c.packs {
                            let same = b.packs.iter().find(|q| q.spec.pack_id == p.spec.pack_id);
                            assert_eq!(same.map(|q| q.used), Some(p.used), "step {step}");
                        }
                        match c.packs.len() < b.packs.len() {
                            true => unread += 1,
                            false => read += 1,
                        }
                    }
                }
                (Err(a), Err(b), Err(c)) => {
                    assert_eq!(a.message, b.message, "step {step}");
                    assert_eq!(a.message, c.message, "step {step}");
                    refused += 1;
                }
                (a, b, c) => panic!("step {step}: {a:?} against {b:?} and {c:?}"),
            }
            last = Some(batch);
        }
        // The sequence did what it is for.
        assert!(
            refused > 0 && replayed > 0 && granted > 0 && unread > 0 && read > 0,
            "{refused} {replayed} {granted} {unread} {read}"
        );
        for account in accounts {
            let mut rows = Vec::new();
            for s in [&cached, &reading, &named] {
                rows.push(
                    s.usage_rows_page(Ts::MIN, Ts::MAX, Some(account), None, 1000)
                        .await
                        .unwrap(),
                );
            }
            assert!(!rows[0].is_empty(), "{account}");
            assert_eq!(rows[0], rows[1], "{account}");
            assert_eq!(rows[0], rows[2], "{account}");
            let packs = cached.list_packs(account).await.unwrap();
            assert_eq!(
                packs,
                reading.list_packs(account).await.unwrap(),
                "{account}"
            );
            assert_eq!(packs, named.list_packs(account).await.unwrap(), "{account}");
        }
    }

    #[tokio::test]
    async fn a_usage_row_with_an_unknown_item_is_refused() {
        let (_dir, store) = open_temp();
        store
            .writer
            .lock()
            .unwrap()
            .execute("INSERT INTO usage_hourly VALUES ('a', 0, 9, '', 0, 1)", [])
            .unwrap();
        let err = store
            .usage_rows_page(0, HOUR, None, None, 10)
            .await
            .unwrap_err();
        assert!(err.message.contains('9'), "{err}");
    }
}
