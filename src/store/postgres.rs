//! The shared PostgreSQL store: tokio-postgres behind a deadpool pool, TLS
//! over rustls (ring provider).
//!
//! - **URL.** `postgres://USER[:PASSWORD]@HOST[:PORT]/DATABASE[?PARAMS]`
//!   (also `postgresql://`). Besides what tokio-postgres accepts
//!   (`connect_timeout`, `application_name`, `options`, …), packmeter reads
//!   `sslmode`, `sslrootcert` and `pool_max_size` itself; see [`PgUrl`].
//! - **Errors.** Connection loss, failover, a server that is starting or
//!   shutting down, serialization failures and deadlocks are *transient*
//!   ([`StoreError::transient`]): the flusher keeps the usage and retries
//!   with backoff while the node keeps serving. A pool that cannot connect
//!   is transient too. Every call is bounded by [`OP_TIMEOUT`]; a connection
//!   that did not answer in time is dropped, not returned to the pool.
//! - **Schema.** Versioned in the `packmeter_schema` table and migrated at
//!   start, under `pg_advisory_lock` so that nodes starting together do not
//!   race; a schema newer than this binary knows is refused
//!   ([`OpenError::Incompatible`]).
//! - **Portability.** The SQL sticks to what CockroachDB and YugabyteDB also
//!   accept (`INSERT … ON CONFLICT`, `UNNEST`, row comparisons, no stored
//!   procedures). The one PostgreSQL-only call, the advisory lock, lives in
//!   `lock_migrations` and is skipped, with a warning, by a server that
//!   does not implement it. The `fillfactor` storage parameter of
//!   migration 5 is PostgreSQL's too. docs/stores.md lists both.
//!
//! Amounts are `BIGINT`: a `u64` above 2^63-1 is refused, and a sum that
//! would exceed it is refused by the upsert's `WHERE`; nothing wraps.

use std::{
    collections::{HashMap, HashSet},
    fmt,
    path::{Path, PathBuf},
    str::FromStr,
    sync::Arc,
    time::Duration,
};

use async_trait::async_trait;
use deadpool_postgres::{
    Manager, ManagerConfig, Object, Pool, PoolError, RecyclingMethod, Runtime,
};
use rustls::{
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    client::WebPkiServerVerifier,
    crypto::CryptoProvider,
    pki_types::{pem::PemObject, CertificateDer, ServerName, UnixTime},
    CertificateError, DigitallySignedStruct, RootCertStore, SignatureScheme,
};
use tokio_postgres::{config::Host, types::ToSql, IsolationLevel, Row};
use tokio_postgres_rustls::MakeRustlsConnect;

use super::{
    page_start, Change, ChangeKind, Flushed, Granted, InvalidStoreUrl, LeaseGrant, LeaseRequest,
    LoadedAccount, OpenError, Store, StoreError, StoredPack, CHANGE_RETENTION,
};
use crate::{
    calendar::Ts,
    ledger::{AccountRecord, DedupRecord, FlushBatch, UsageKey, UsageRow},
    packs::{Item, PackSource, PackSpec},
};

/// The schema, one migration per version: `MIGRATIONS[v - 1]` takes a
/// database from version `v - 1` to `v`. Append; never edit a released one.
///
/// Strings are `COLLATE "C"`, so that keys sort byte-wise, as
/// [`UsageKey`]'s order (and SQLite) does, whatever the database's default
/// collation: export cursors depend on it.
const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE accounts (
    account_id        TEXT COLLATE "C" PRIMARY KEY,
    activated_at      BIGINT,             -- µs since epoch, UTC; NULL until activated
    suspended         BOOLEAN NOT NULL DEFAULT FALSE,
    deny_on_exhausted BOOLEAN NOT NULL DEFAULT FALSE
);
CREATE TABLE packs (
    account_id  TEXT COLLATE "C" NOT NULL,
    pack_id     TEXT COLLATE "C" NOT NULL,
    source      BIGINT NOT NULL,          -- 1 free tier, 2 purchased
    item        BIGINT NOT NULL,          -- 1 calls, 2 egress bytes
    capacity    BIGINT NOT NULL CHECK (capacity >= 0),
    valid_from  BIGINT NOT NULL,
    valid_until BIGINT NOT NULL,          -- exclusive
    priority    BIGINT NOT NULL,
    created_at  BIGINT NOT NULL,
    used        BIGINT NOT NULL DEFAULT 0 CHECK (used >= 0),
    PRIMARY KEY (account_id, pack_id)
);
CREATE TABLE usage_hourly (
    account_id TEXT COLLATE "C" NOT NULL,
    hour       BIGINT NOT NULL,           -- start of the UTC hour, µs
    item       BIGINT NOT NULL,
    pack_id    TEXT COLLATE "C" NOT NULL, -- '' for overage
    source     BIGINT NOT NULL,           -- 0 for overage
    amount     BIGINT NOT NULL CHECK (amount >= 0),
    PRIMARY KEY (account_id, hour, item, pack_id)
);
CREATE INDEX usage_hourly_by_key ON usage_hourly (hour, account_id, item, pack_id);
CREATE TABLE dedup (
    account_id     TEXT COLLATE "C" NOT NULL,
    request_id     TEXT COLLATE "C" NOT NULL,
    expires_at     BIGINT NOT NULL,
    calls_covered  BIGINT NOT NULL,
    calls_overage  BIGINT NOT NULL,
    egress_covered BIGINT NOT NULL,
    egress_overage BIGINT NOT NULL,
    PRIMARY KEY (account_id, request_id)
);
CREATE INDEX dedup_by_expiry ON dedup (expires_at);
CREATE TABLE flush_batches (
    batch_id   TEXT COLLATE "C" PRIMARY KEY, -- FlushBatch::batch_id
    applied_at BIGINT NOT NULL               -- µs; rows older than BATCH_ID_RETENTION are pruned
);
CREATE INDEX flush_batches_by_age ON flush_batches (applied_at);
"#,
    r#"
-- The settled mark (R12), one row: hours that start before it are settled.
-- It only moves forward, so a later, longer --late-grace cannot reopen them.
CREATE TABLE settlement (
    id             BIGINT PRIMARY KEY CHECK (id = 1),
    settled_before BIGINT NOT NULL        -- µs since epoch, UTC
);
"#,
    r#"
-- Operator changes (put_account, grant_pack), one row each, written in the
-- transaction that makes them: every node reads the rows after its cursor
-- and refreshes the accounts it holds (src/changes.rs). Pruned by age.
CREATE TABLE changes (
    seq        BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    account_id TEXT COLLATE "C" NOT NULL,
    kind       BIGINT NOT NULL,           -- 1 account settings, 2 new pack
    at         BIGINT NOT NULL            -- µs; rows older than CHANGE_RETENTION are pruned
);
CREATE INDEX changes_by_age ON changes (at);
"#,
    r#"
-- Strict mode's leases (src/meter/lease.rs): calls of a deny account's
-- packs reserved for one node. granted - used is still reserved while
-- expires_at (µs, the database's clock) has not passed; a flush by the
-- node adds what it booked into the packs to used.
CREATE TABLE leases (
    account_id TEXT COLLATE "C" NOT NULL,
    node_id    TEXT COLLATE "C" NOT NULL,
    granted    BIGINT NOT NULL CHECK (granted >= 0),
    used       BIGINT NOT NULL CHECK (used >= 0),
    expires_at BIGINT NOT NULL,
    PRIMARY KEY (account_id, node_id)
);
"#,
    r#"
-- Room on every page for the flush's updates (BENCHMARKS.md, issue 8):
-- each flush adds to the current hour's usage rows and to the packs' used,
-- the same rows again and again. With free space on the page PostgreSQL
-- writes the new row version beside the old one (a HOT update: no new
-- index entries, and the old version is pruned on the next visit) instead
-- of on another page with a new entry in every index. 50 leaves room for
-- every row of a page to be updated once per transaction. Rows written
-- before this migration keep their pages until VACUUM FULL (docs/stores.md).
-- PostgreSQL storage parameters: see docs/stores.md for other servers.
ALTER TABLE usage_hourly SET (fillfactor = 50);
ALTER TABLE packs SET (fillfactor = 50);
ALTER TABLE leases SET (fillfactor = 50);
"#,
    r#"
-- The plans in force (R8, issue 11), one row per plan of the plans file,
-- by its 0-based place; never updated (src/plans.rs, reconcile).
CREATE TABLE plans_in_force (
    position     BIGINT PRIMARY KEY,
    name         TEXT COLLATE "C" NOT NULL,
    effective    BIGINT NOT NULL,         -- µs since epoch, UTC
    months       BIGINT NOT NULL,
    calls        BIGINT NOT NULL,
    egress_bytes BIGINT NOT NULL,
    zone         TEXT COLLATE "C" NOT NULL,
    recorded_at  BIGINT NOT NULL          -- µs since epoch, UTC
);
"#,
    r#"
-- A plan change's re-deduction (R8, src/recalc.rs): signed amounts added
-- in `hour`, never to a usage row. `span_from` is the first hour of the
-- usage it re-deducts, so a second run nets earlier moves out.
CREATE TABLE usage_adjustments (
    account_id    TEXT COLLATE "C" NOT NULL,
    plan_position BIGINT NOT NULL,
    span_from     BIGINT NOT NULL,
    item          BIGINT NOT NULL,
    pack_id       TEXT COLLATE "C" NOT NULL,   -- '' for overage
    hour          BIGINT NOT NULL,             -- the hour it is reported in
    source        BIGINT NOT NULL,             -- 0 for overage
    plan          TEXT COLLATE "C" NOT NULL,
    amount        BIGINT NOT NULL,             -- signed
    PRIMARY KEY (account_id, span_from, item, pack_id, plan_position, hour)
);
CREATE INDEX usage_adjustments_by_hour ON usage_adjustments (hour, account_id);
-- Plans whose recalculation a node finished (src/recalc.rs).
CREATE TABLE plan_recalculations (
    position    BIGINT PRIMARY KEY,
    finished_at BIGINT NOT NULL
);
"#,
];

/// The schema version this binary writes and reads.
pub const SCHEMA_VERSION: i64 = MIGRATIONS.len() as i64;

/// The advisory lock key migrations hold: "packmetr" in ASCII.
const MIGRATION_LOCK: i64 = 0x7061_636b_6d65_7472;

/// How long applied batch ids are kept (as in the SQLite store).
const BATCH_ID_RETENTION: Ts = 30 * 24 * crate::calendar::HOUR;

/// Connecting gives up after this unless the URL sets `connect_timeout`.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Waiting for a free pooled connection gives up after this.
const POOL_WAIT: Duration = Duration::from_secs(10);
/// One store call (a flush transaction included) gives up after this; its
/// connection is dropped and the error is transient.
pub const OP_TIMEOUT: Duration = Duration::from_secs(30);
/// Pooled connections unless the URL sets `pool_max_size`.
pub const DEFAULT_POOL_SIZE: usize = 4;
/// Attempts to connect and migrate at start, with backoff (about 3 s in
/// all), before `serve` gives up.
const OPEN_ATTEMPTS: u32 = 5;

/// How TLS is used, as libpq's `sslmode`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SslMode {
    /// Plain TCP.
    Disable,
    /// TLS if the server offers it, else plain (the default).
    Prefer,
    /// TLS or fail; the certificate is not checked (unless `sslrootcert`
    /// is given, as with libpq: then as `verify-ca`).
    Require,
    /// TLS, and the certificate must chain to a trusted root.
    VerifyCa,
    /// As `verify-ca`, and the certificate must name the host.
    VerifyFull,
}

impl SslMode {
    fn parse(v: &str) -> Result<SslMode, String> {
        Ok(match v {
            "disable" => SslMode::Disable,
            "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            _ => {
                return Err(format!(
                    "sslmode `{v}` is not supported; use disable, prefer, require, verify-ca \
                     or verify-full"
                ))
            }
        })
    }
}

/// A parsed `postgres://` URL: the connection settings, the TLS setup
/// (root certificates already read), and the pool size.
///
/// Query parameters read by packmeter rather than tokio-postgres:
/// - `sslmode`: `disable`, `prefer` (default), `require`, `verify-ca`,
///   `verify-full`, as libpq.
/// - `sslrootcert=PATH`: PEM file of the CA certificates to trust; by default
///   the Mozilla roots (webpki-roots) are trusted for `verify-*`.
/// - `pool_max_size=N`: connections per node (default
///   [`DEFAULT_POOL_SIZE`], at most 256).
#[derive(Clone)]
pub struct PgUrl {
    config: tokio_postgres::Config,
    ssl: SslMode,
    tls: MakeRustlsConnect,
    pool_size: usize,
    /// The URL with its password replaced, for logs.
    shown: String,
}

impl fmt::Debug for PgUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PgUrl")
            .field("url", &self.shown)
            .field("sslmode", &self.ssl)
            .field("pool_size", &self.pool_size)
            .finish()
    }
}

impl fmt::Display for PgUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.shown)
    }
}

/// Decodes `%XX` escapes; `None` if one is malformed or the result is not
/// UTF-8.
fn percent_decode(v: &str) -> Option<String> {
    let bytes = v.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = v.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

impl PgUrl {
    /// Parses and checks a URL, and reads `sslrootcert` if given. Connects
    /// to nothing.
    pub fn parse(url: &str) -> Result<PgUrl, InvalidStoreUrl> {
        let shown = super::redact(url);
        let bad = |why: String| InvalidStoreUrl(format!("`{shown}`: {why}"));
        let (base, query) = url.split_once('?').unwrap_or((url, ""));
        let mut kept = Vec::new();
        let (mut ssl, mut root_cert, mut pool_size) = (SslMode::Prefer, None, DEFAULT_POOL_SIZE);
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (key, raw) = pair.split_once('=').unwrap_or((pair, ""));
            let value = || {
                percent_decode(raw)
                    .ok_or_else(|| bad(format!("the value of `{key}` is not valid %-encoding")))
            };
            match key {
                "sslmode" => ssl = SslMode::parse(&value()?).map_err(bad)?,
                "sslrootcert" => root_cert = Some(PathBuf::from(value()?)),
                "pool_max_size" => {
                    pool_size = value()?
                        .parse::<usize>()
                        .ok()
                        .filter(|n| (1..=256).contains(n))
                        .ok_or_else(|| bad("pool_max_size must be a number from 1 to 256".into()))?
                }
                _ => kept.push(pair),
            }
        }
        let rest = if kept.is_empty() {
            base.to_string()
        } else {
            format!("{base}?{}", kept.join("&"))
        };
        let mut config = tokio_postgres::Config::from_str(&rest).map_err(|e| {
            bad(match std::error::Error::source(&e) {
                Some(why) => format!("{e}: {why}"),
                None => e.to_string(),
            })
        })?;
        if config.get_hosts().is_empty() {
            return Err(bad(
                "needs a host, e.g. postgres://packmeter@db.example.com:5432/packmeter".into(),
            ));
        }
        if config.get_user().is_none_or(str::is_empty) {
            return Err(bad(
                "needs a user, e.g. postgres://packmeter@db.example.com:5432/packmeter".into(),
            ));
        }
        config.ssl_mode(match ssl {
            SslMode::Disable => tokio_postgres::config::SslMode::Disable,
            SslMode::Prefer => tokio_postgres::config::SslMode::Prefer,
            _ => tokio_postgres::config::SslMode::Require,
        });
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(CONNECT_TIMEOUT);
        }
        if config.get_application_name().is_none() {
            config.application_name("packmeter");
        }
        let tls = tls_connector(ssl, root_cert.as_deref()).map_err(bad)?;
        Ok(PgUrl {
            config,
            ssl,
            tls,
            pool_size,
            shown,
        })
    }

    pub fn ssl_mode(&self) -> SslMode {
        self.ssl
    }

    pub fn pool_size(&self) -> usize {
        self.pool_size
    }

    /// The database this URL names (the user's name when it names none, as
    /// the server does).
    pub fn database(&self) -> &str {
        self.config
            .get_dbname()
            .or(self.config.get_user())
            .unwrap_or("")
    }

    /// One connection outside the pool, with this URL's settings and TLS:
    /// for tools and tests. Its I/O runs on a spawned task.
    pub async fn connect(&self) -> Result<tokio_postgres::Client, StoreError> {
        let (client, connection) = self.config.connect(self.tls.clone()).await?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %describe(&e), "PostgreSQL connection ended");
            }
        });
        Ok(client)
    }

    /// `postgres-HOST-PORT-DATABASE`, with anything but ASCII letters,
    /// digits, `.` and `_` turned into `_`: the spill file's name.
    pub fn spill_name(&self) -> String {
        let host = match self.config.get_hosts().first() {
            Some(Host::Tcp(h)) => h.clone(),
            Some(Host::Unix(p)) => p.display().to_string(),
            None => String::new(),
        };
        let port = self.config.get_ports().first().copied().unwrap_or(5432);
        let clean = |s: &str| -> String {
            s.chars()
                .map(|c| {
                    if c.is_ascii_alphanumeric() || c == '.' || c == '_' {
                        c
                    } else {
                        '_'
                    }
                })
                .collect()
        };
        format!(
            "postgres-{}-{port}-{}",
            clean(&host),
            clean(self.database())
        )
    }
}

/// The rustls setup for a mode.
fn tls_connector(mode: SslMode, root_cert: Option<&Path>) -> Result<MakeRustlsConnect, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let roots = match root_cert {
        Some(path) => {
            let mut roots = RootCertStore::empty();
            let certs = CertificateDer::pem_file_iter(path)
                .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
                .map_err(|e| format!("sslrootcert {}: {e}", path.display()))?;
            let (added, _ignored) = roots.add_parsable_certificates(certs);
            if added == 0 {
                return Err(format!(
                    "sslrootcert {} holds no usable PEM certificate",
                    path.display()
                ));
            }
            roots
        }
        None => RootCertStore {
            roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
        },
    };
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS setup: {e}"))?;
    let verify_chain = || {
        WebPkiServerVerifier::builder_with_provider(Arc::new(roots.clone()), provider.clone())
            .build()
            .map_err(|e| format!("TLS setup: {e}"))
    };
    let config = match mode {
        SslMode::VerifyFull => builder
            .with_webpki_verifier(verify_chain()?)
            .with_no_client_auth(),
        SslMode::VerifyCa => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(ChainOnly(verify_chain()?)))
            .with_no_client_auth(),
        // As libpq: with a root certificate file, require checks the chain.
        SslMode::Prefer | SslMode::Require if root_cert.is_some() => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(ChainOnly(verify_chain()?)))
            .with_no_client_auth(),
        SslMode::Disable | SslMode::Prefer | SslMode::Require => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(EncryptOnly(provider)))
            .with_no_client_auth(),
    };
    Ok(MakeRustlsConnect::new(config))
}

/// `require`: encrypts, trusts any certificate (libpq's meaning); the
/// handshake signatures are still checked.
#[derive(Debug)]
struct EncryptOnly(Arc<CryptoProvider>);

impl ServerCertVerifier for EncryptOnly {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// `verify-ca`: the chain must lead to a trusted root; the host name is
/// not compared.
#[derive(Debug)]
struct ChainOnly(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
        {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// Whether an error is worth retrying: the connection or the server's
/// state, not the statement or the data.
fn is_transient(e: &tokio_postgres::Error) -> bool {
    if let Some(code) = e.code() {
        let code = code.code();
        // 08: connection exceptions; 53: insufficient resources (too many
        // connections, disk full); 40001 serialization failure (CockroachDB's
        // "retry"), 40P01 deadlock, 40003 outcome unknown; 57P01..03 admin
        // or crash shutdown, cannot connect now; 57014 cancelled; 55P03
        // lock not available.
        return code.starts_with("08")
            || code.starts_with("53")
            || matches!(
                code,
                "40001" | "40P01" | "40003" | "57P01" | "57P02" | "57P03" | "57014" | "55P03"
            );
    }
    if e.is_closed() {
        return true;
    }
    // I/O and connect failures carry an io::Error; a certificate the TLS
    // layer refused does too, and is not transient.
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        if let Some(io) = s.downcast_ref::<std::io::Error>() {
            return !io
                .get_ref()
                .is_some_and(|inner| inner.is::<rustls::Error>());
        }
        source = s.source();
    }
    // tokio-postgres's own connect timeout.
    e.to_string() == "timeout waiting for server"
}

fn describe(e: &tokio_postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        let mut m = format!("postgres: {} (SQLSTATE {})", db.message(), db.code().code());
        if let Some(detail) = db.detail() {
            m.push_str("; ");
            m.push_str(detail);
        }
        return m;
    }
    let mut m = format!("postgres: {e}");
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        m.push_str(": ");
        m.push_str(&s.to_string());
        source = s.source();
    }
    m
}

impl From<tokio_postgres::Error> for StoreError {
    fn from(e: tokio_postgres::Error) -> StoreError {
        StoreError {
            message: describe(&e),
            transient: is_transient(&e),
        }
    }
}

/// Not getting a connection says nothing about the data: once serving it
/// is always transient, so that the flusher keeps the usage rather than set
/// it aside. At start (`at_start`), a refusal that retrying cannot cure (a
/// wrong password, an untrusted certificate, no such database) is
/// permanent, so that `serve` fails at once and says why.
fn pool_error(e: PoolError, at_start: bool) -> StoreError {
    let mut transient = true;
    let message = match e {
        PoolError::Backend(e) => {
            transient = !at_start || is_transient(&e);
            describe(&e)
        }
        PoolError::Timeout(_) => format!(
            "postgres: no connection within {POOL_WAIT:?} (all pooled connections busy, or the \
             server unreachable)"
        ),
        other => format!("postgres: {other}"),
    };
    StoreError { message, transient }
}

/// `BIGINT` holds amounts up to 2^63-1; refuse rather than wrap.
fn to_sql(v: u64) -> Result<i64, StoreError> {
    i64::try_from(v).map_err(|_| StoreError::permanent(format!("amount {v} exceeds 2^63-1")))
}

fn from_sql(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

const PACK_COLUMNS: &str =
    "pack_id, source, item, capacity, valid_from, valid_until, priority, created_at, used";

fn read_pack(row: &Row) -> Result<StoredPack, StoreError> {
    let id: String = row.try_get("pack_id")?;
    Ok(StoredPack {
        spec: PackSpec {
            pack_id: id.into(),
            source: PackSource::from_code(row.try_get("source")?).unwrap_or(PackSource::Purchased),
            item: Item::from_code(row.try_get("item")?).unwrap_or(Item::Calls),
            capacity: from_sql(row.try_get("capacity")?),
            valid_from: row.try_get("valid_from")?,
            valid_until: row.try_get("valid_until")?,
            priority: u32::try_from(row.try_get::<_, i64>("priority")?).unwrap_or(0),
            created_at: row.try_get("created_at")?,
        },
        used: from_sql(row.try_get("used")?),
    })
}

fn read_account(row: &Row) -> Result<AccountRecord, StoreError> {
    Ok(AccountRecord {
        account_id: row.try_get("account_id")?,
        activated_at: row.try_get("activated_at")?,
        suspended: row.try_get("suspended")?,
        deny_on_exhausted: row.try_get("deny_on_exhausted")?,
    })
}

fn read_dedup(row: &Row) -> Result<DedupRecord, StoreError> {
    Ok(DedupRecord {
        request_id: row.try_get::<_, String>(0)?.into(),
        expires_at: row.try_get(1)?,
        hour: None,
        calls_covered: from_sql(row.try_get(2)?),
        calls_overage: from_sql(row.try_get(3)?),
        egress_covered: from_sql(row.try_get(4)?),
        egress_overage: from_sql(row.try_get(5)?),
    })
}

fn read_usage(row: &Row) -> Result<UsageRow, StoreError> {
    let code: i64 = row.try_get(2)?;
    Ok(UsageRow {
        account_id: row.try_get(0)?,
        hour: row.try_get(1)?,
        // An unknown item is refused, not read as another: the row's key
        // is the paging cursor, and a wrong one would skip or repeat rows.
        item: Item::from_code(code).ok_or_else(|| {
            StoreError::permanent(format!("a usage row has the unknown item code {code}"))
        })?,
        pack_id: row.try_get(3)?,
        source: PackSource::from_code(row.try_get(4)?),
        amount: from_sql(row.try_get(5)?),
        adjustment: None,
    })
}

const ACCOUNT_SQL: &str = "SELECT account_id, activated_at, suspended, deny_on_exhausted \
                           FROM accounts WHERE account_id = $1";

/// The page query of [`Store::usage_rows_page`] and its parameters' order;
/// as in the SQLite store, a cursor replaces `hour >= from`, and with an
/// account the primary key serves filter and order.
fn page_sql(account: bool, after: bool) -> String {
    let filter = match (account, after) {
        // $1 from, $2 to
        (false, false) => "hour >= $1 AND hour < $2",
        // $1 to, $2..$5 cursor
        (false, true) => "hour < $1 AND (hour, account_id, item, pack_id) > ($2, $3, $4, $5)",
        // $1 account, $2 from, $3 to
        (true, false) => "account_id = $1 AND hour >= $2 AND hour < $3",
        // $1 account, $2 to, $3..$5 cursor (hour, item, pack)
        (true, true) => "account_id = $1 AND hour < $2 AND (hour, item, pack_id) > ($3, $4, $5)",
    };
    let limit = match (account, after) {
        (false, false) => 3,
        (true, false) => 4,
        (_, true) => 6,
    };
    format!(
        "SELECT account_id, hour, item, pack_id, source, amount FROM usage_hourly \
         WHERE {filter} ORDER BY hour, account_id, item, pack_id LIMIT ${limit}"
    )
}

/// Runs `$body` (an expression of type `Result<T, StoreError>` that may use
/// `$c: &mut Object`) on a pooled connection, within [`OP_TIMEOUT`].
macro_rules! on_client {
    ($store:expr, |$c:ident| $body:expr) => {{
        let mut object = $store.client().await?;
        let outcome = {
            let $c: &mut Object = &mut object;
            tokio::time::timeout(OP_TIMEOUT, async move { $body }).await
        };
        finish(object, outcome)
    }};
}

/// As [`on_client!`], for a read that can simply run again: if it failed
/// fast with a transient error (its connection died under it, or a new one
/// was closed as it opened: a killed backend, a failover, `57P01`), it runs
/// again on another pooled connection, up to [`READ_ATTEMPTS`] times in
/// all, so that a gateway's request loading an account does not fail on
/// the pool's dead connections. A closed connection is not handed out
/// again (the pool checks at checkout). A try that took [`READ_RETRY_WITHIN`]
/// or longer (a timeout, an unreachable server) is not repeated, so an
/// outage costs a caller no more waiting than one try. `$body` may run more
/// than once: it must move nothing.
macro_rules! on_client_read {
    ($store:expr, |$c:ident| $body:expr) => {{
        let mut attempt = 0;
        loop {
            attempt += 1;
            let started = std::time::Instant::now();
            // One try, as `on_client!` makes it; its `?` ends the block.
            let tried: Result<_, StoreError> = async { on_client!($store, |$c| $body) }.await;
            match tried {
                Err(e)
                    if e.transient
                        && attempt < READ_ATTEMPTS
                        && started.elapsed() < READ_RETRY_WITHIN =>
                {
                    tracing::debug!(error = %e, attempt, "postgres: a read failed on its connection; reading again on another");
                }
                result => break result,
            }
        }
    }};
}

/// Tries of a read that failed on its connection ([`on_client_read!`]):
/// one more than the default pool size, so that a read may meet every
/// pooled connection a failover killed, then a new one.
const READ_ATTEMPTS: u32 = DEFAULT_POOL_SIZE as u32 + 1;
/// A read that failed within this is tried again ([`on_client_read!`]).
const READ_RETRY_WITHIN: Duration = Duration::from_secs(1);

fn finish<T>(
    object: Object,
    outcome: Result<Result<T, StoreError>, tokio::time::error::Elapsed>,
) -> Result<T, StoreError> {
    match outcome {
        Ok(result) => result,
        Err(_) => {
            // The connection may be hung: never hand it out again.
            drop(Object::take(object));
            Err(StoreError {
                message: format!(
                    "postgres: no answer within {OP_TIMEOUT:?}; the connection was dropped"
                ),
                transient: true,
            })
        }
    }
}

/// A row version's physical address, PostgreSQL's `ctid` (`tid`: block
/// number and line pointer, 6 bytes, sent and read as they are).
///
/// A flush reads the `ctid` of the usage and pack rows it is about to add
/// to, with the accounts locked, and updates them by it: a TID scan goes
/// straight to the row, where an update by key descends the primary key's
/// B-tree once more for every row (BENCHMARKS.md, issue 8). No other
/// transaction updates those rows while the lock is held, so the
/// addresses stay valid until the update; a row changed all the same would
/// not match its old address, and the flush fails and is retried.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Tid([u8; 6]);

impl<'a> tokio_postgres::types::FromSql<'a> for Tid {
    fn from_sql(
        _: &tokio_postgres::types::Type,
        raw: &'a [u8],
    ) -> Result<Tid, Box<dyn std::error::Error + Sync + Send>> {
        Ok(Tid(raw.try_into().map_err(|_| {
            format!("a tid of {} bytes, not 6", raw.len())
        })?))
    }

    fn accepts(ty: &tokio_postgres::types::Type) -> bool {
        *ty == tokio_postgres::types::Type::TID
    }
}

impl ToSql for Tid {
    fn to_sql(
        &self,
        _: &tokio_postgres::types::Type,
        out: &mut bytes::BytesMut,
    ) -> Result<tokio_postgres::types::IsNull, Box<dyn std::error::Error + Sync + Send>> {
        out.extend_from_slice(&self.0);
        Ok(tokio_postgres::types::IsNull::No)
    }

    fn accepts(ty: &tokio_postgres::types::Type) -> bool {
        *ty == tokio_postgres::types::Type::TID
    }

    tokio_postgres::types::to_sql_checked!();
}

/// The shared store. Cheap to share: the pool is internally reference
/// counted.
pub struct PostgresStore {
    pool: Pool,
    /// Whether flushes update rows by their `ctid` ([`Tid`]), which only
    /// PostgreSQL has; by primary key otherwise (CockroachDB, YugabyteDB).
    /// Found out at open.
    by_tid: bool,
}

impl PostgresStore {
    /// Builds the pool, connects, and brings the schema to
    /// [`SCHEMA_VERSION`]. Transient failures (the server is starting or
    /// unreachable) are retried a few times with backoff.
    pub async fn open(url: &PgUrl) -> Result<PostgresStore, OpenError> {
        let manager = Manager::from_config(
            url.config.clone(),
            url.tls.clone(),
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let connect = url.config.get_connect_timeout().copied();
        let pool = Pool::builder(manager)
            .max_size(url.pool_size)
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(POOL_WAIT))
            .create_timeout(connect.map(|t| t + Duration::from_secs(1)))
            .recycle_timeout(Some(Duration::from_secs(5)))
            .build()
            .map_err(|e| StoreError::permanent(format!("postgres: pool: {e}")))?;
        let mut store = PostgresStore {
            pool,
            by_tid: false,
        };
        let mut delay = Duration::from_millis(100);
        for attempt in 1.. {
            match store.migrate().await {
                Ok(()) => break,
                Err(OpenError::Store(e)) if e.transient && attempt < OPEN_ATTEMPTS => {
                    tracing::warn!(error = %e, url = %url, attempt, "cannot reach PostgreSQL yet; retrying");
                    tokio::time::sleep(delay).await;
                    delay *= 2;
                }
                Err(e) => return Err(e),
            }
        }
        store.by_tid = store.has_tid().await?;
        Ok(store)
    }

    /// Whether flushes update rows by `ctid` ([`Tid`]): found out at open.
    pub fn updates_by_tid(&self) -> bool {
        self.by_tid
    }

    /// Flushes update rows by primary key rather than by `ctid`, as on a
    /// server without `ctid`: for tests of that path on PostgreSQL.
    pub fn with_keyed_updates(mut self) -> PostgresStore {
        self.by_tid = false;
        self
    }

    /// Whether the server has PostgreSQL's `ctid` system column. One that
    /// refuses it (CockroachDB, YugabyteDB) gets updates by key.
    async fn has_tid(&self) -> Result<bool, StoreError> {
        on_client!(self, |c| {
            match c
                .query_opt("SELECT ctid FROM packmeter_schema LIMIT 1", &[])
                .await
            {
                Ok(row) => {
                    if let Some(row) = row {
                        row.try_get::<_, Tid>(0)?;
                    }
                    Ok(true)
                }
                Err(e) if e.as_db_error().is_some() => {
                    tracing::info!(error = %describe(&e), "no ctid on this server; flushes update rows by key");
                    Ok(false)
                }
                Err(e) => Err(e.into()),
            }
        })
    }

    async fn client(&self) -> Result<Object, StoreError> {
        self.pool.get().await.map_err(|e| pool_error(e, false))
    }

    /// The schema version the database holds (0 for none).
    pub async fn schema_version(&self) -> Result<i64, StoreError> {
        on_client!(self, |c| schema_version(c).await)
    }

    async fn migrate(&self) -> Result<(), OpenError> {
        let mut object = self.pool.get().await.map_err(|e| pool_error(e, true))?;
        let locked = lock_migrations(&object).await?;
        let outcome = tokio::time::timeout(OP_TIMEOUT, migrate_on(&mut object)).await;
        if locked {
            let unlocked = object
                .execute("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK])
                .await;
            if unlocked.is_err() {
                // Ending the session releases the lock.
                drop(Object::take(object));
            }
        }
        match outcome {
            Ok(result) => result,
            Err(_) => Err(StoreError {
                message: format!("postgres: migrating the schema took over {OP_TIMEOUT:?}"),
                transient: true,
            }
            .into()),
        }
    }
}

/// Takes the session-level advisory lock migrations run under, waiting
/// for another node that holds it. **PostgreSQL-only**: a server that does
/// not implement advisory locks (CockroachDB, older YugabyteDB) is told
/// apart by the error, and the migration then relies on its version-row
/// claim alone (see [`migrate_on`]). Returns whether the lock is held.
async fn lock_migrations(client: &Object) -> Result<bool, StoreError> {
    match client
        .execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK])
        .await
    {
        Ok(_) => Ok(true),
        // feature_not_supported, undefined_function
        Err(e)
            if e.code()
                .is_some_and(|c| matches!(c.code(), "0A000" | "42883")) =>
        {
            tracing::warn!(error = %describe(&e), "no advisory locks on this server; migrating without one");
            Ok(false)
        }
        Err(e) => Err(e.into()),
    }
}

async fn schema_version(client: &Object) -> Result<i64, StoreError> {
    Ok(client
        .query_opt("SELECT version FROM packmeter_schema WHERE id = 1", &[])
        .await?
        .map(|r| r.try_get::<_, i64>(0))
        .transpose()?
        .unwrap_or(0))
}

/// Applies the missing migrations, one transaction each. Each first claims
/// its version in `packmeter_schema` (insert or compare-and-set), so that
/// even without the advisory lock two nodes never apply the same one.
async fn migrate_on(client: &mut Object) -> Result<(), OpenError> {
    let created = client
        .batch_execute(
            "CREATE TABLE IF NOT EXISTS packmeter_schema (\
             id BIGINT PRIMARY KEY, version BIGINT NOT NULL)",
        )
        .await;
    match created {
        Ok(()) => {}
        // Without the advisory lock, another node may create it at the same
        // moment (unique_violation on the catalog, duplicate_table): it is
        // there either way.
        Err(e)
            if e.code()
                .is_some_and(|c| matches!(c.code(), "23505" | "42P07")) => {}
        Err(e) => return Err(StoreError::from(e).into()),
    }
    loop {
        let found = schema_version(client).await?;
        if found > SCHEMA_VERSION {
            return Err(OpenError::Incompatible(format!(
                "the database holds packmeter schema version {found}, but this packmeter knows \
                 versions up to {SCHEMA_VERSION}: a newer packmeter has migrated it. Run that \
                 release or a newer one; a schema is never migrated backwards"
            )));
        }
        if found == SCHEMA_VERSION {
            return Ok(());
        }
        let next = found + 1;
        let tx = client.transaction().await.map_err(StoreError::from)?;
        let claimed = if found == 0 {
            tx.execute(
                "INSERT INTO packmeter_schema (id, version) VALUES (1, $1) \
                 ON CONFLICT (id) DO NOTHING",
                &[&next],
            )
            .await
        } else {
            tx.execute(
                "UPDATE packmeter_schema SET version = $1 WHERE id = 1 AND version = $2",
                &[&next, &found],
            )
            .await
        }
        .map_err(StoreError::from)?;
        if claimed == 0 {
            // Another node migrated meanwhile: look again.
            continue;
        }
        let index = usize::try_from(found).unwrap_or(0);
        tx.batch_execute(MIGRATIONS[index])
            .await
            .map_err(StoreError::from)?;
        tx.commit().await.map_err(StoreError::from)?;
        tracing::info!(version = next, "PostgreSQL schema migrated");
    }
}

/// The settled mark (R12), `Ts::MIN` until something has been settled.
async fn settled_mark(c: &impl deadpool_postgres::GenericClient) -> Result<Ts, StoreError> {
    let stmt = c
        .prepare_cached("SELECT settled_before FROM settlement WHERE id = 1")
        .await?;
    Ok(match c.query_opt(&stmt, &[]).await? {
        Some(row) => row.try_get(0)?,
        None => Ts::MIN,
    })
}

/// Records a change in the caller's transaction, as its last statement so
/// the sequence number is taken as close to the commit as possible (see
/// [`Change::seq`]), after pruning rows older than [`CHANGE_RETENTION`].
async fn record_change(
    tx: &deadpool_postgres::Transaction<'_>,
    account_id: &str,
    kind: ChangeKind,
) -> Result<(), StoreError> {
    let at = crate::calendar::now_ts();
    let prune = tx
        .prepare_cached("DELETE FROM changes WHERE at < $1")
        .await?;
    tx.execute(&prune, &[&at.saturating_sub(CHANGE_RETENTION)])
        .await?;
    let insert = tx
        .prepare_cached("INSERT INTO changes (account_id, kind, at) VALUES ($1, $2, $3)")
        .await?;
    tx.execute(&insert, &[&account_id, &kind.code(), &at])
        .await?;
    Ok(())
}

#[async_trait]
impl Store for PostgresStore {
    /// Half the pool, 1 to 4: the server runs each flush transaction on a
    /// backend (a core) of its own, and the other half of the pool stays
    /// free for loads, leases and the change cursor.
    fn flush_concurrency(&self) -> usize {
        (self.pool.status().max_size / 2).clamp(1, 4)
    }

    async fn load_account(
        &self,
        id: &str,
        since: Ts,
        now: Ts,
    ) -> Result<LoadedAccount, StoreError> {
        on_client_read!(self, |c| {
            // One snapshot for the three reads, sent together.
            let tx = c
                .build_transaction()
                .isolation_level(IsolationLevel::RepeatableRead)
                .read_only(true)
                .start()
                .await?;
            let packs_sql = format!(
                "SELECT {PACK_COLUMNS} FROM packs WHERE account_id = $1 AND valid_until > $2"
            );
            let (a, p, d, u) = tokio::try_join!(
                tx.prepare_cached(ACCOUNT_SQL),
                tx.prepare_cached(&packs_sql),
                tx.prepare_cached(
                    "SELECT request_id, expires_at, calls_covered, calls_overage, \
                     egress_covered, egress_overage FROM dedup \
                     WHERE account_id = $1 AND expires_at > $2",
                ),
                // Summed here rather than with SUM, which would fail on an
                // overflow, as SQLite does (the ledger cap's starting point).
                tx.prepare_cached(
                    "SELECT hour, item, amount FROM usage_hourly \
                     WHERE account_id = $1 AND hour > $2",
                ),
            )?;
            let open_from = since.saturating_sub(crate::calendar::HOUR);
            let (by_id, by_since, by_now, by_open): (
                [&(dyn ToSql + Sync); 1],
                [&(dyn ToSql + Sync); 2],
                [&(dyn ToSql + Sync); 2],
                [&(dyn ToSql + Sync); 2],
            ) = ([&id], [&id, &since], [&id, &now], [&id, &open_from]);
            let (account, packs, dedup, usage) = tokio::try_join!(
                tx.query_opt(&a, &by_id),
                tx.query(&p, &by_since),
                tx.query(&d, &by_now),
                tx.query(&u, &by_open),
            )?;
            tx.commit().await?;
            let mut open_usage: Vec<(Ts, Item, u64)> = Vec::new();
            for r in &usage {
                let (hour, code, amount): (Ts, i64, i64) =
                    (r.try_get(0)?, r.try_get(1)?, r.try_get(2)?);
                let Some(item) = Item::from_code(code) else {
                    continue;
                };
                let amount = from_sql(amount);
                match open_usage.iter_mut().find(|u| u.0 == hour && u.1 == item) {
                    Some(u) => u.2 = u.2.saturating_add(amount),
                    None => open_usage.push((hour, item, amount)),
                }
            }
            Ok(LoadedAccount {
                account: account.as_ref().map(read_account).transpose()?,
                packs: packs.iter().map(read_pack).collect::<Result<_, _>>()?,
                dedup: dedup.iter().map(read_dedup).collect::<Result<_, _>>()?,
                open_usage,
            })
        })
    }

    async fn put_account(&self, account: &AccountRecord) -> Result<(), StoreError> {
        on_client!(self, |c| {
            let tx = c.transaction().await?;
            let stmt = tx
                .prepare_cached(
                    "INSERT INTO accounts (account_id, activated_at, suspended, deny_on_exhausted) \
                     VALUES ($1, $2, $3, $4) ON CONFLICT (account_id) DO UPDATE SET \
                     activated_at = excluded.activated_at, suspended = excluded.suspended, \
                     deny_on_exhausted = excluded.deny_on_exhausted",
                )
                .await?;
            tx.execute(
                &stmt,
                &[
                    &account.account_id,
                    &account.activated_at,
                    &account.suspended,
                    &account.deny_on_exhausted,
                ],
            )
            .await?;
            record_change(&tx, &account.account_id, ChangeKind::Account).await?;
            tx.commit().await?;
            Ok(())
        })
    }

    async fn get_account(&self, id: &str) -> Result<Option<AccountRecord>, StoreError> {
        on_client!(self, |c| {
            let stmt = c.prepare_cached(ACCOUNT_SQL).await?;
            c.query_opt(&stmt, &[&id])
                .await?
                .as_ref()
                .map(read_account)
                .transpose()
        })
    }

    async fn grant_pack(&self, account_id: &str, pack: &PackSpec) -> Result<Granted, StoreError> {
        let capacity = to_sql(pack.capacity)?;
        on_client!(self, |c| {
            let tx = c.transaction().await?;
            let insert = tx
                .prepare_cached(&format!(
                    "INSERT INTO packs (account_id, {PACK_COLUMNS}) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, 0) \
                     ON CONFLICT (account_id, pack_id) DO NOTHING RETURNING pack_id"
                ))
                .await?;
            let inserted = tx
                .query_opt(
                    &insert,
                    &[
                        &account_id,
                        &&*pack.pack_id,
                        &pack.source.code(),
                        &pack.item.code(),
                        &capacity,
                        &pack.valid_from,
                        &pack.valid_until,
                        &i64::from(pack.priority),
                        &pack.created_at,
                    ],
                )
                .await?;
            if inserted.is_none() {
                let existing = tx
                    .query_one(
                        &format!(
                            "SELECT {PACK_COLUMNS} FROM packs \
                             WHERE account_id = $1 AND pack_id = $2"
                        ),
                        &[&account_id, &&*pack.pack_id],
                    )
                    .await?;
                tx.commit().await?;
                return Ok(Granted::Existing(read_pack(&existing)?));
            }
            // The account exists from its first grant, activated or not, so
            // it stays listable (R11) after its packs have ended.
            tx.execute(
                "INSERT INTO accounts (account_id) VALUES ($1) ON CONFLICT (account_id) DO NOTHING",
                &[&account_id],
            )
            .await?;
            record_change(&tx, account_id, ChangeKind::Pack).await?;
            tx.commit().await?;
            Ok(Granted::New(StoredPack {
                spec: pack.clone(),
                used: 0,
            }))
        })
    }

    async fn list_packs(&self, account_id: &str) -> Result<Vec<StoredPack>, StoreError> {
        on_client!(self, |c| {
            let stmt = c
                .prepare_cached(&format!(
                    "SELECT {PACK_COLUMNS} FROM packs WHERE account_id = $1 \
                     ORDER BY valid_from, pack_id"
                ))
                .await?;
            c.query(&stmt, &[&account_id])
                .await?
                .iter()
                .map(read_pack)
                .collect()
        })
    }

    async fn write_batch(&self, batch: &FlushBatch) -> Result<bool, StoreError> {
        Ok(self.flush_batch(batch).await?.applied)
    }

    /// One transaction, a fixed number of statements whatever the batch's
    /// size (column arrays through `UNNEST`), in two round trips besides
    /// `BEGIN` and `COMMIT` (statements are pipelined):
    /// 1. record the batch id (a batch seen before changes nothing), lock
    ///    the batch's account rows in account-id order (inserting new
    ///    ones), and read their settings, packs, usage rows of the batch's
    ///    hours and the batch's request ids the store holds;
    /// 2. attribute in Rust ([`crate::ledger::attribute`]);
    /// 3. add the usage and pack uses, insert new rows and request ids, move
    ///    what was booked into packs out of this node's leases, and prune
    ///    expired rows.
    ///
    /// Rows read in 1 are updated in place, by their `ctid` where the
    /// server has one ([`Tid`]), else by key: an `UPDATE`, not an upsert,
    /// which would lock each row before updating it. Only rows the store
    /// did not hold are inserted. The tables it updates leave room on their
    /// pages (migration 5), so the updates are HOT: no new index entries.
    /// BENCHMARKS.md, issue 8, has the measurements.
    async fn flush_batch(&self, batch: &FlushBatch) -> Result<Flushed, StoreError> {
        let grouped = crate::ledger::by_account(batch);
        let ids: Vec<&str> = grouped.keys().copied().collect();
        let activations: Vec<Option<Ts>> = grouped
            .values()
            .map(|p| crate::ledger::earliest_activation(p))
            .collect();
        let (req_accounts, req_ids): (Vec<&str>, Vec<&str>) = grouped
            .iter()
            .flat_map(|(id, parts)| {
                parts
                    .iter()
                    .flat_map(|a| a.dedup.iter().map(|r| (*id, &*r.request_id)))
            })
            .unzip();
        // Attribution writes to the hours of the batch's deltas only.
        let first_hour: Option<Ts> = batch
            .accounts
            .iter()
            .flat_map(|a| a.deltas.iter().map(|d| d.hour))
            .min();
        let who = match &ids[..] {
            [one] => format!("account `{one}`"),
            many => format!("one of {} accounts", many.len()),
        };
        let by_tid = self.by_tid;
        // With `ctid` last, where the server has it.
        let address = if by_tid { ", ctid" } else { "" };
        let (ids, activations, req_accounts, req_ids, grouped) =
            (&ids, &activations, &req_accounts, &req_ids, &grouped);
        on_client!(self, |c| {
            let tx = c.transaction().await?;
            let record_batch = tx
                .prepare_cached(
                    "INSERT INTO flush_batches (batch_id, applied_at) VALUES ($1, $2) \
                     ON CONFLICT (batch_id) DO NOTHING",
                )
                .await?;
            // Inserts the new accounts and moves an activation earlier. Rows
            // it would leave as they are are not rewritten (a flush of known
            // accounts writes no row versions here) but are locked all the
            // same ("all rows will be locked when the ON CONFLICT DO UPDATE
            // action is taken"), in account-id order, until commit: flushes
            // of the same account by other nodes run one after the other
            // and never deadlock (every flush locks in the same order).
            let lock_accounts = tx
                .prepare_cached(
                    "INSERT INTO accounts (account_id, activated_at) \
                     SELECT * FROM UNNEST($1::text[], $2::bigint[]) \
                     ON CONFLICT (account_id) DO UPDATE SET \
                     activated_at = excluded.activated_at \
                     WHERE excluded.activated_at < accounts.activated_at \
                     OR (accounts.activated_at IS NULL AND excluded.activated_at IS NOT NULL)",
                )
                .await?;
            let read_packs = tx
                .prepare_cached(&format!(
                    "SELECT account_id, {PACK_COLUMNS}{address} FROM packs \
                     WHERE account_id = ANY($1)"
                ))
                .await?;
            let read_usage = tx
                .prepare_cached(&format!(
                    "SELECT account_id, hour, item, pack_id, amount{address} FROM usage_hourly \
                     WHERE account_id = ANY($1) AND hour >= $2"
                ))
                .await?;
            let read_held = tx
                .prepare_cached(
                    "SELECT d.account_id, d.request_id FROM dedup d \
                     JOIN UNNEST($1::text[], $2::text[]) AS k(a, r) \
                     ON d.account_id = k.a AND d.request_id = k.r \
                     WHERE d.expires_at > $3",
                )
                .await?;
            // One round trip: the server runs the statements in the order
            // they are sent, so the reads see the store after the accounts
            // are locked. If the batch was applied before, what the rest
            // did is rolled back with the transaction.
            let (fresh, (), pack_rows, usage_rows, held_rows) = futures_util::future::try_join5(
                tx.execute(&record_batch, &[&batch.batch_id, &batch.now]),
                async {
                    if !ids.is_empty() {
                        tx.execute(&lock_accounts, &[ids, activations]).await?;
                    }
                    Ok::<_, tokio_postgres::Error>(())
                },
                async {
                    if ids.is_empty() {
                        return Ok::<_, tokio_postgres::Error>(Vec::new());
                    }
                    tx.query(&read_packs, &[ids]).await
                },
                async {
                    match first_hour {
                        Some(hour) if !ids.is_empty() => tx.query(&read_usage, &[ids, &hour]).await,
                        _ => Ok::<_, tokio_postgres::Error>(Vec::new()),
                    }
                },
                async {
                    if req_ids.is_empty() {
                        return Ok::<_, tokio_postgres::Error>(Vec::new());
                    }
                    tx.query(&read_held, &[req_accounts, req_ids, &batch.now])
                        .await
                },
            )
            .await?;
            if fresh == 0 {
                // Applied before (a replayed spill of a flush that committed);
                // dropping the transaction rolls it back.
                return Ok(Flushed::default());
            }
            let mut flushed = Flushed {
                applied: true,
                ..Flushed::default()
            };
            // Per account: its packs, each with its address (or none).
            let mut stored: HashMap<&str, (Vec<StoredPack>, Vec<Option<Tid>>)> =
                HashMap::with_capacity(ids.len());
            for row in &pack_rows {
                let (packs, tids) = stored.entry(row.try_get(0)?).or_default();
                packs.push(StoredPack {
                    spec: PackSpec {
                        pack_id: row.try_get::<_, &str>(1)?.into(),
                        source: PackSource::from_code(row.try_get(2)?)
                            .unwrap_or(PackSource::Purchased),
                        item: Item::from_code(row.try_get(3)?).unwrap_or(Item::Calls),
                        capacity: from_sql(row.try_get(4)?),
                        valid_from: row.try_get(5)?,
                        valid_until: row.try_get(6)?,
                        priority: u32::try_from(row.try_get::<_, i64>(7)?).unwrap_or(0),
                        created_at: row.try_get(8)?,
                    },
                    used: from_sql(row.try_get(9)?),
                });
                tids.push(if by_tid { Some(row.try_get(10)?) } else { None });
            }
            // (account, hour, item, pack) -> (amount, address).
            type UsageKeyRef<'r> = (&'r str, Ts, i64, &'r str);
            let mut usage_held: HashMap<UsageKeyRef<'_>, (i64, Option<Tid>)> =
                HashMap::with_capacity(usage_rows.len());
            for row in &usage_rows {
                usage_held.insert(
                    (
                        row.try_get(0)?,
                        row.try_get(1)?,
                        row.try_get(2)?,
                        row.try_get(3)?,
                    ),
                    (
                        row.try_get(4)?,
                        if by_tid { Some(row.try_get(5)?) } else { None },
                    ),
                );
            }
            let mut held: HashSet<(&str, &str)> = HashSet::with_capacity(held_rows.len());
            for row in &held_rows {
                held.insert((row.try_get(0)?, row.try_get(1)?));
            }
            // Calls the store booked into packs, per account, for the
            // node's strict-mode leases.
            let mut lease_calls: (Vec<&str>, Vec<i64>) = Default::default();
            // Usage rows the store holds: by address, or by key.
            let mut usage_tid: (Vec<Tid>, Vec<i64>) = Default::default();
            let mut usage_key: (Vec<&str>, Vec<Ts>, Vec<i64>, Vec<String>, Vec<i64>) =
                Default::default();
            // Usage rows it does not hold yet: inserted.
            let mut usage_new: (
                Vec<&str>,
                Vec<Ts>,
                Vec<i64>,
                Vec<String>,
                Vec<i64>,
                Vec<i64>,
            ) = Default::default();
            // Packs the store holds: their `used` is updated in place, by
            // address or by key. Packs it does not hold yet (a free-tier
            // month's first flush) are inserted with their spec.
            let mut packs_tid: (Vec<Tid>, Vec<i64>) = Default::default();
            let mut packs_key: (Vec<&str>, Vec<String>, Vec<i64>) = Default::default();
            let mut packs: (Vec<&str>, Vec<String>, Vec<i64>, Vec<i64>, Vec<i64>) =
                Default::default();
            let mut packs2: (Vec<Ts>, Vec<Ts>, Vec<i64>, Vec<Ts>, Vec<i64>) = Default::default();
            let mut dedup: (
                Vec<&str>,
                Vec<String>,
                Vec<Ts>,
                Vec<i64>,
                Vec<i64>,
                Vec<i64>,
                Vec<i64>,
            ) = Default::default();
            for (&id, parts) in grouped {
                let (account_packs, pack_tids) = stored.remove(id).unwrap_or_default();
                let pack_tids: HashMap<Arc<str>, Option<Tid>> = account_packs
                    .iter()
                    .map(|p| p.spec.pack_id.clone())
                    .zip(pack_tids)
                    .collect();
                let a = crate::ledger::attribute(
                    account_packs,
                    parts.iter().flat_map(|a| &a.deltas),
                    parts.iter().flat_map(|a| &a.dedup),
                    |r| held.contains(&(id, r)),
                )
                .map_err(|e| StoreError::permanent(format!("account `{id}`: {e}")))?;
                for d in &a.usage {
                    let pack_id = d.pack.as_ref().map_or("", |p| &*p.pack_id);
                    let amount = to_sql(d.amount)?;
                    match usage_held.get(&(id, d.hour, d.item.code(), pack_id)) {
                        Some(&(stored, tid)) => {
                            if stored.checked_add(amount).is_none() {
                                return Err(StoreError::permanent(format!(
                                    "account `{id}`: the usage of hour {} would exceed 2^63-1",
                                    d.hour
                                )));
                            }
                            match tid {
                                Some(tid) => {
                                    usage_tid.0.push(tid);
                                    usage_tid.1.push(amount);
                                }
                                None => {
                                    usage_key.0.push(id);
                                    usage_key.1.push(d.hour);
                                    usage_key.2.push(d.item.code());
                                    usage_key.3.push(pack_id.to_string());
                                    usage_key.4.push(amount);
                                }
                            }
                        }
                        None => {
                            usage_new.0.push(id);
                            usage_new.1.push(d.hour);
                            usage_new.2.push(d.item.code());
                            usage_new.3.push(pack_id.to_string());
                            usage_new
                                .4
                                .push(d.pack.as_ref().map_or(0, |p| p.source.code()));
                            usage_new.5.push(amount);
                        }
                    }
                }
                let calls: u64 = a
                    .packs
                    .iter()
                    .filter(|(spec, _)| spec.item == Item::Calls)
                    .fold(0u64, |sum, (_, amount)| sum.saturating_add(*amount));
                if calls > 0 {
                    lease_calls.0.push(id);
                    lease_calls.1.push(to_sql(calls)?);
                }
                for (spec, amount) in &a.packs {
                    match pack_tids.get(&spec.pack_id) {
                        Some(Some(tid)) => {
                            packs_tid.0.push(*tid);
                            packs_tid.1.push(to_sql(*amount)?);
                        }
                        Some(None) => {
                            packs_key.0.push(id);
                            packs_key.1.push(spec.pack_id.to_string());
                            packs_key.2.push(to_sql(*amount)?);
                        }
                        None => {
                            packs.0.push(id);
                            packs.1.push(spec.pack_id.to_string());
                            packs.2.push(spec.source.code());
                            packs.3.push(spec.item.code());
                            packs.4.push(to_sql(spec.capacity)?);
                            packs2.0.push(spec.valid_from);
                            packs2.1.push(spec.valid_until);
                            packs2.2.push(i64::from(spec.priority));
                            packs2.3.push(spec.created_at);
                            packs2.4.push(to_sql(*amount)?);
                        }
                    }
                }
                for r in &a.dedup {
                    dedup.0.push(id);
                    dedup.1.push(r.request_id.to_string());
                    dedup.2.push(r.expires_at);
                    dedup.3.push(to_sql(r.calls_covered)?);
                    dedup.4.push(to_sql(r.calls_overage)?);
                    dedup.5.push(to_sql(r.egress_covered)?);
                    dedup.6.push(to_sql(r.egress_overage)?);
                }
                flushed.add_account(parts[0].account_id.clone(), a.reversed, a.totals);
            }
            // The guard against 2^63-1 is checked above too; here it keeps
            // a row that changed meanwhile from wrapping.
            // Only where the server has `ctid`: preparing it elsewhere would
            // fail the transaction.
            let add_usage_tid = match by_tid {
                false => None,
                true => Some(
                    tx.prepare_cached(
                        "UPDATE usage_hourly SET amount = usage_hourly.amount + b.amount \
                         FROM UNNEST($1::tid[], $2::bigint[]) AS b (tid, amount) \
                         WHERE usage_hourly.ctid = b.tid \
                         AND usage_hourly.amount <= 9223372036854775807 - b.amount",
                    )
                    .await?,
                ),
            };
            let add_usage_key = tx
                .prepare_cached(
                    "UPDATE usage_hourly SET amount = usage_hourly.amount + b.amount \
                     FROM UNNEST($1::text[], $2::bigint[], $3::bigint[], $4::text[], \
                     $5::bigint[]) AS b (account_id, hour, item, pack_id, amount) \
                     WHERE usage_hourly.account_id = b.account_id \
                     AND usage_hourly.hour = b.hour AND usage_hourly.item = b.item \
                     AND usage_hourly.pack_id = b.pack_id \
                     AND usage_hourly.amount <= 9223372036854775807 - b.amount",
                )
                .await?;
            let insert_usage = tx
                .prepare_cached(
                    "INSERT INTO usage_hourly (account_id, hour, item, pack_id, source, amount) \
                     SELECT * FROM UNNEST($1::text[], $2::bigint[], $3::bigint[], \
                     $4::text[], $5::bigint[], $6::bigint[]) \
                     ON CONFLICT (account_id, hour, item, pack_id) DO NOTHING",
                )
                .await?;
            // Never past 2^63-1: a pack takes at most its capacity.
            // Only where the server has `ctid`: preparing it elsewhere would
            // fail the transaction.
            let use_packs_tid = match by_tid {
                false => None,
                true => Some(
                    tx.prepare_cached(
                        "UPDATE packs SET used = packs.used + b.used \
                         FROM UNNEST($1::tid[], $2::bigint[]) AS b (tid, used) \
                         WHERE packs.ctid = b.tid",
                    )
                    .await?,
                ),
            };
            let use_packs_key = tx
                .prepare_cached(
                    "UPDATE packs SET used = packs.used + b.used \
                     FROM UNNEST($1::text[], $2::text[], $3::bigint[]) \
                     AS b (account_id, pack_id, used) \
                     WHERE packs.account_id = b.account_id AND packs.pack_id = b.pack_id",
                )
                .await?;
            let add_packs = tx
                .prepare_cached(&format!(
                    "INSERT INTO packs (account_id, {PACK_COLUMNS}) \
                     SELECT * FROM UNNEST($1::text[], $2::text[], $3::bigint[], \
                     $4::bigint[], $5::bigint[], $6::bigint[], $7::bigint[], $8::bigint[], \
                     $9::bigint[], $10::bigint[]) \
                     ON CONFLICT (account_id, pack_id) DO UPDATE SET \
                     used = packs.used + excluded.used"
                ))
                .await?;
            let add_dedup = tx
                .prepare_cached(
                    "INSERT INTO dedup (account_id, request_id, expires_at, calls_covered, \
                     calls_overage, egress_covered, egress_overage) \
                     SELECT * FROM UNNEST($1::text[], $2::text[], $3::bigint[], \
                     $4::bigint[], $5::bigint[], $6::bigint[], $7::bigint[]) \
                     ON CONFLICT (account_id, request_id) DO UPDATE SET \
                     expires_at = excluded.expires_at, \
                     calls_covered = excluded.calls_covered, \
                     calls_overage = excluded.calls_overage, \
                     egress_covered = excluded.egress_covered, \
                     egress_overage = excluded.egress_overage",
                )
                .await?;
            // What the store booked into the packs from this node's batch
            // (after capping) leaves its lease's reservation in the same
            // transaction: never counted twice, never dropped (strict mode,
            // src/meter/lease.rs).
            let use_leases = tx
                .prepare_cached(
                    "UPDATE leases SET used = leases.used + b.amount, \
                     granted = GREATEST(leases.granted, leases.used + b.amount) \
                     FROM UNNEST($1::text[], $2::bigint[]) AS b (account_id, amount) \
                     WHERE leases.account_id = b.account_id AND leases.node_id = $3",
                )
                .await?;
            let prune_dedup = tx
                .prepare_cached("DELETE FROM dedup WHERE expires_at <= $1")
                .await?;
            let prune_batches = tx
                .prepare_cached("DELETE FROM flush_batches WHERE applied_at < $1")
                .await?;
            let node_id = batch.node_id();
            let batches_before = batch.now.saturating_sub(BATCH_ID_RETENTION);
            // Each statement that updates rows read above must find every
            // one of them: `(rows, expected)`.
            let expect = [
                (usage_tid.0.len() + usage_key.0.len(), "usage"),
                (usage_new.0.len(), "new usage"),
                (packs_tid.0.len() + packs_key.0.len(), "pack"),
            ];
            // The writes, pipelined: one round trip, run in this order.
            let (counts, (), (), (), _) = futures_util::future::try_join5(
                futures_util::future::try_join3(
                    async {
                        let mut n = 0;
                        if let (false, Some(stmt)) = (usage_tid.0.is_empty(), &add_usage_tid) {
                            n += tx.execute(stmt, &[&usage_tid.0, &usage_tid.1]).await?;
                        }
                        if !usage_key.0.is_empty() {
                            n += tx
                                .execute(
                                    &add_usage_key,
                                    &[
                                        &usage_key.0,
                                        &usage_key.1,
                                        &usage_key.2,
                                        &usage_key.3,
                                        &usage_key.4,
                                    ],
                                )
                                .await?;
                        }
                        Ok::<_, tokio_postgres::Error>(n)
                    },
                    async {
                        if usage_new.0.is_empty() {
                            return Ok::<_, tokio_postgres::Error>(0);
                        }
                        tx.execute(
                            &insert_usage,
                            &[
                                &usage_new.0,
                                &usage_new.1,
                                &usage_new.2,
                                &usage_new.3,
                                &usage_new.4,
                                &usage_new.5,
                            ],
                        )
                        .await
                    },
                    async {
                        let mut n = 0;
                        if let (false, Some(stmt)) = (packs_tid.0.is_empty(), &use_packs_tid) {
                            n += tx.execute(stmt, &[&packs_tid.0, &packs_tid.1]).await?;
                        }
                        if !packs_key.0.is_empty() {
                            n += tx
                                .execute(
                                    &use_packs_key,
                                    &[&packs_key.0, &packs_key.1, &packs_key.2],
                                )
                                .await?;
                        }
                        Ok::<_, tokio_postgres::Error>(n)
                    },
                ),
                async {
                    if !packs.0.is_empty() {
                        tx.execute(
                            &add_packs,
                            &[
                                &packs.0, &packs.1, &packs.2, &packs.3, &packs.4, &packs2.0,
                                &packs2.1, &packs2.2, &packs2.3, &packs2.4,
                            ],
                        )
                        .await?;
                    }
                    Ok::<_, tokio_postgres::Error>(())
                },
                async {
                    if !dedup.0.is_empty() {
                        tx.execute(
                            &add_dedup,
                            &[
                                &dedup.0, &dedup.1, &dedup.2, &dedup.3, &dedup.4, &dedup.5,
                                &dedup.6,
                            ],
                        )
                        .await?;
                    }
                    Ok::<_, tokio_postgres::Error>(())
                },
                async {
                    if !lease_calls.0.is_empty() {
                        tx.execute(&use_leases, &[&lease_calls.0, &lease_calls.1, &node_id])
                            .await?;
                    }
                    Ok::<_, tokio_postgres::Error>(())
                },
                futures_util::future::try_join(
                    tx.execute(&prune_dedup, &[&batch.now]),
                    tx.execute(&prune_batches, &[&batches_before]),
                ),
            )
            .await
            .map_err(StoreError::from)?;
            let counts = [counts.0, counts.1, counts.2];
            for (done, (expected, what)) in counts.into_iter().zip(expect) {
                if done != expected as u64 {
                    // The accounts are locked and nothing else writes these
                    // rows, so the store was changed behind packmeter: try
                    // again from a fresh read.
                    return Err(StoreError {
                        message: format!(
                            "{who}: {done} of {expected} {what} rows were written; rows read \
                             under the accounts' lock changed before the update; retrying"
                        ),
                        transient: true,
                    });
                }
            }
            tx.commit().await?;
            Ok(flushed)
        })
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
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        on_client!(self, |c| {
            let stmt = c
                .prepare_cached(&page_sql(account_id.is_some(), after.is_some()))
                .await?;
            let rows = match (account_id, after) {
                (None, None) => c.query(&stmt, &[&from, &to, &limit]).await?,
                (None, Some(k)) => {
                    c.query(
                        &stmt,
                        &[
                            &to,
                            &k.hour,
                            &k.account_id,
                            &k.item.code(),
                            &k.pack_id,
                            &limit,
                        ],
                    )
                    .await?
                }
                (Some(a), None) => c.query(&stmt, &[&a, &from, &to, &limit]).await?,
                (Some(a), Some(k)) => {
                    c.query(
                        &stmt,
                        &[&a, &to, &k.hour, &k.item.code(), &k.pack_id, &limit],
                    )
                    .await?
                }
            };
            rows.iter().map(read_usage).collect()
        })
    }

    async fn settled_before(&self) -> Result<Ts, StoreError> {
        on_client!(self, |c| settled_mark(&*c).await)
    }

    async fn recorded_plans(&self) -> Result<Vec<super::RecordedPlan>, StoreError> {
        on_client!(self, |c| {
            let stmt = c
                .prepare_cached(
                    "SELECT position, name, effective, months, calls, egress_bytes, zone \
                     FROM plans_in_force ORDER BY position",
                )
                .await?;
            let mut out = Vec::new();
            for r in c.query(&stmt, &[]).await? {
                out.push(super::RecordedPlan {
                    position: r.try_get(0)?,
                    name: r.try_get(1)?,
                    effective: r.try_get(2)?,
                    months: r.try_get(3)?,
                    calls: r.try_get(4)?,
                    egress_bytes: r.try_get(5)?,
                    zone: r.try_get(6)?,
                });
            }
            Ok(out)
        })
    }

    async fn record_plans(&self, plans: &[super::RecordedPlan], at: Ts) -> Result<(), StoreError> {
        on_client!(self, |c| {
            let stmt = c
                .prepare_cached(
                    "INSERT INTO plans_in_force \
                     (position, name, effective, months, calls, egress_bytes, zone, recorded_at) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT (position) DO NOTHING",
                )
                .await?;
            for p in plans {
                c.execute(
                    &stmt,
                    &[
                        &p.position,
                        &p.name,
                        &p.effective,
                        &p.months,
                        &p.calls,
                        &p.egress_bytes,
                        &p.zone,
                        &at,
                    ],
                )
                .await?;
            }
            Ok(())
        })
    }

    async fn holds_usage(&self) -> Result<bool, StoreError> {
        on_client!(self, |c| {
            let stmt = c
                .prepare_cached(
                    "SELECT EXISTS (SELECT 1 FROM usage_hourly) \
                     OR EXISTS (SELECT 1 FROM accounts WHERE activated_at IS NOT NULL)",
                )
                .await?;
            Ok(c.query_one(&stmt, &[]).await?.try_get(0)?)
        })
    }

    async fn recalculation_candidates(
        &self,
        from: Ts,
        activated_before: Ts,
    ) -> Result<Vec<(String, Ts)>, StoreError> {
        on_client_read!(self, |c| {
            let stmt = c
                .prepare_cached(
                    "SELECT a.account_id, a.activated_at FROM accounts a \
                     WHERE a.activated_at < $2 AND EXISTS (SELECT 1 FROM usage_hourly u \
                     WHERE u.account_id = a.account_id AND u.hour >= $1 AND u.source IN (0, 1)) \
                     ORDER BY a.account_id",
                )
                .await?;
            let mut out = Vec::new();
            for r in c.query(&stmt, &[&from, &activated_before]).await? {
                out.push((r.try_get(0)?, r.try_get(1)?));
            }
            Ok(out)
        })
    }

    async fn recalculate(
        &self,
        r: &crate::recalc::Recalculation,
    ) -> Result<Vec<StoredPack>, StoreError> {
        on_client!(self, |c| {
            let tx = c.transaction().await?;
            // The account's row is the lock flushes of the account take:
            // two nodes recalculating it, or a flush, wait for each other.
            tx.execute(
                "SELECT 1 FROM accounts WHERE account_id = $1 FOR UPDATE",
                &[&r.account_id],
            )
            .await?;
            let hour = r.hour.max(settled_mark(&tx).await?);
            let held = tx
                .prepare_cached(
                    "SELECT pack_id, source, sum(amount)::BIGINT FROM ( \
                     SELECT pack_id, source, amount FROM usage_hourly \
                     WHERE account_id = $1 AND item = $2 AND hour >= $3 AND hour < $4 \
                     AND source IN (0, 1) \
                     UNION ALL SELECT pack_id, source, amount FROM usage_adjustments \
                     WHERE account_id = $1 AND item = $2 AND span_from = $3) AS t \
                     GROUP BY pack_id, source",
                )
                .await?;
            let used = tx
                .prepare_cached("SELECT used FROM packs WHERE account_id = $1 AND pack_id = $2")
                .await?;
            let adjust = tx
                .prepare_cached(
                    "INSERT INTO usage_adjustments (account_id, plan_position, span_from, item, \
                     pack_id, hour, source, plan, amount) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) \
                     ON CONFLICT (account_id, span_from, item, pack_id, plan_position, hour) \
                     DO UPDATE SET amount = usage_adjustments.amount + excluded.amount",
                )
                .await?;
            let credit = tx
                .prepare_cached(
                    "UPDATE packs SET used = GREATEST(0, used + $3) \
                     WHERE account_id = $1 AND pack_id = $2",
                )
                .await?;
            let debit = tx
                .prepare_cached(&format!(
                    "INSERT INTO packs (account_id, {PACK_COLUMNS}) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) \
                     ON CONFLICT (account_id, pack_id) DO UPDATE SET used = packs.used + excluded.used"
                ))
                .await?;
            for span in &r.spans {
                for item in [Item::Calls, Item::EgressBytes] {
                    let mut rows = Vec::new();
                    for row in tx
                        .query(
                            &held,
                            &[&r.account_id, &item.code(), &span.from, &span.until],
                        )
                        .await?
                    {
                        rows.push(crate::recalc::Held {
                            pack_id: row.try_get(0)?,
                            source: PackSource::from_code(row.try_get(1)?),
                            net: row.try_get(2)?,
                        });
                    }
                    let new = match span.pack(item) {
                        Some(p) => {
                            let u: Option<i64> = tx
                                .query_opt(&used, &[&r.account_id, &&*p.pack_id])
                                .await?
                                .map(|row| row.try_get(0))
                                .transpose()?;
                            Some((p, from_sql(u.unwrap_or(0))))
                        }
                        None => None,
                    };
                    for m in crate::recalc::rededuct(new, &rows) {
                        let source: i64 = m.source.map_or(0, PackSource::code);
                        tx.execute(
                            &adjust,
                            &[
                                &r.account_id,
                                &r.plan_position,
                                &span.from,
                                &item.code(),
                                &m.pack_id,
                                &hour,
                                &source,
                                &r.plan,
                                &m.delta,
                            ],
                        )
                        .await?;
                        match new.filter(|(p, _)| *p.pack_id == *m.pack_id) {
                            Some((p, _)) => {
                                tx.execute(
                                    &debit,
                                    &[
                                        &r.account_id,
                                        &&*p.pack_id,
                                        &p.source.code(),
                                        &p.item.code(),
                                        &to_sql(p.capacity)?,
                                        &p.valid_from,
                                        &p.valid_until,
                                        &i64::from(p.priority),
                                        &p.created_at,
                                        &m.delta,
                                    ],
                                )
                                .await?;
                            }
                            None if m.source.is_some() => {
                                tx.execute(&credit, &[&r.account_id, &m.pack_id, &m.delta])
                                    .await?;
                            }
                            None => {}
                        }
                    }
                }
            }
            record_change(&tx, &r.account_id, ChangeKind::Pack).await?;
            let mut packs = Vec::new();
            for row in tx
                .query(
                    &format!("SELECT {PACK_COLUMNS} FROM packs WHERE account_id = $1"),
                    &[&r.account_id],
                )
                .await?
            {
                packs.push(read_pack(&row)?);
            }
            tx.commit().await?;
            Ok(packs)
        })
    }

    async fn adjustment_rows(
        &self,
        from: Ts,
        to: Ts,
        account_id: Option<&str>,
    ) -> Result<Vec<UsageRow>, StoreError> {
        on_client_read!(self, |c| {
            let stmt = c
                .prepare_cached(
                    "SELECT account_id, hour, item, pack_id, source, plan, sum(amount)::BIGINT \
                     FROM usage_adjustments WHERE hour >= $1 AND hour < $2 \
                     AND ($3::TEXT IS NULL OR account_id = $3) \
                     GROUP BY hour, account_id, item, pack_id, source, plan \
                     HAVING sum(amount) <> 0 ORDER BY hour, account_id, item, pack_id, plan",
                )
                .await?;
            let mut out = Vec::new();
            for r in c.query(&stmt, &[&from, &to, &account_id]).await? {
                let code: i64 = r.try_get(2)?;
                out.push(UsageRow {
                    account_id: r.try_get(0)?,
                    hour: r.try_get(1)?,
                    item: Item::from_code(code).ok_or_else(|| {
                        StoreError::permanent(format!(
                            "an adjustment row has the unknown item code {code}"
                        ))
                    })?,
                    pack_id: r.try_get(3)?,
                    source: PackSource::from_code(r.try_get(4)?),
                    amount: 0,
                    adjustment: Some(crate::ledger::Adjustment {
                        plan: r.try_get(5)?,
                        amount: r.try_get(6)?,
                    }),
                });
            }
            Ok(out)
        })
    }

    async fn plans_recalculated(&self) -> Result<Vec<i64>, StoreError> {
        on_client_read!(self, |c| {
            let stmt = c
                .prepare_cached("SELECT position FROM plan_recalculations ORDER BY position")
                .await?;
            let mut out = Vec::new();
            for r in c.query(&stmt, &[]).await? {
                out.push(r.try_get(0)?);
            }
            Ok(out)
        })
    }

    async fn record_recalculated(&self, position: i64, at: Ts) -> Result<(), StoreError> {
        on_client!(self, |c| {
            c.execute(
                "INSERT INTO plan_recalculations (position, finished_at) VALUES ($1, $2) \
                 ON CONFLICT (position) DO NOTHING",
                &[&position, &at],
            )
            .await?;
            Ok(())
        })
    }

    async fn record_settled(&self, before: Ts) -> Result<Ts, StoreError> {
        on_client!(self, |c| {
            let stmt = c
                .prepare_cached(
                    "INSERT INTO settlement (id, settled_before) VALUES (1, $1) \
                     ON CONFLICT (id) DO UPDATE SET \
                     settled_before = GREATEST(settlement.settled_before, excluded.settled_before) \
                     RETURNING settled_before",
                )
                .await?;
            Ok(c.query_one(&stmt, &[&before]).await?.try_get(0)?)
        })
    }

    async fn last_change(&self) -> Result<i64, StoreError> {
        on_client!(self, |c| {
            let stmt = c
                .prepare_cached("SELECT COALESCE(MAX(seq), 0) FROM changes")
                .await?;
            Ok(c.query_one(&stmt, &[]).await?.try_get(0)?)
        })
    }

    async fn changes_since(&self, after: i64, limit: usize) -> Result<Vec<Change>, StoreError> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        on_client!(self, |c| {
            let stmt = c
                .prepare_cached(
                    "SELECT seq, account_id, kind, at FROM changes WHERE seq > $1 \
                     ORDER BY seq LIMIT $2",
                )
                .await?;
            let mut out = Vec::new();
            for r in c.query(&stmt, &[&after, &limit]).await? {
                let code: i64 = r.try_get(2)?;
                // A kind a newer binary writes: refresh the account whole.
                let kind = ChangeKind::from_code(code).unwrap_or(ChangeKind::Account);
                out.push(Change {
                    seq: r.try_get(0)?,
                    account_id: r.try_get(1)?,
                    kind,
                    at: r.try_get(3)?,
                });
            }
            Ok(out)
        })
    }

    async fn acquire_lease(&self, req: &LeaseRequest<'_>) -> Result<LeaseGrant, StoreError> {
        let ids: Vec<&str> = req.packs.iter().map(|(id, _)| id.as_str()).collect();
        let caps = req
            .packs
            .iter()
            .map(|(_, cap)| to_sql(*cap))
            .collect::<Result<Vec<i64>, _>>()?;
        let capacity = req
            .packs
            .iter()
            .fold(0u64, |sum, (_, cap)| sum.saturating_add(*cap));
        on_client!(self, |c| {
            let tx = c.transaction().await?;
            // Acquirers of one account take turns on its row; flushes only
            // move calls from a lease's reservation to its packs.
            let locked = tx
                .query_opt(
                    "SELECT (EXTRACT(EPOCH FROM clock_timestamp()) * 1000000)::BIGINT \
                     FROM accounts WHERE account_id = $1 FOR UPDATE",
                    &[&req.account_id],
                )
                .await?;
            let Some(row) = locked else {
                // No account row: not a deny account of this store.
                return Ok(LeaseGrant {
                    granted: 0,
                    free: 0,
                });
            };
            let now: Ts = row.try_get(0)?;
            tx.execute(
                "DELETE FROM leases WHERE account_id = $1 AND node_id <> $2 AND expires_at <= $3",
                &[&req.account_id, &req.node_id, &now],
            )
            .await?;
            // One statement, one snapshot: a flush committing in between
            // moves calls from a lease to the packs atomically.
            let row = tx
                .query_one(
                    "SELECT \
                     (SELECT COALESCE(SUM(LEAST(p.used, c.cap)), 0)::BIGINT \
                      FROM packs p JOIN UNNEST($2::text[], $5::bigint[]) AS c (pack_id, cap) \
                      ON p.pack_id = c.pack_id WHERE p.account_id = $1), \
                     (SELECT COALESCE(SUM(granted - used), 0)::BIGINT FROM leases \
                      WHERE account_id = $1 AND expires_at > $3), \
                     (SELECT expires_at FROM leases WHERE account_id = $1 AND node_id = $4)",
                    &[&req.account_id, &ids, &now, &req.node_id, &caps],
                )
                .await?;
            let booked = row.try_get::<_, i64>(0)?.max(0) as u64;
            let reserved = row.try_get::<_, i64>(1)?.max(0) as u64;
            let mine_expired = row.try_get::<_, Option<Ts>>(2)?.is_some_and(|at| at <= now);
            let free = capacity.saturating_sub(booked).saturating_sub(reserved);
            let granted = if free < req.need {
                0
            } else {
                // Never more than half of what is free (unless needed), so
                // that other nodes find some left.
                req.want.min(free).min(req.need.max(free.div_ceil(2)))
            };
            let expires_at = now.saturating_add(req.ttl);
            // An expired lease of this node reserved nothing any more: it
            // starts again from what its flushes booked.
            tx.execute(
                "INSERT INTO leases (account_id, node_id, granted, used, expires_at) \
                 VALUES ($1, $2, $3, 0, $4) \
                 ON CONFLICT (account_id, node_id) DO UPDATE SET \
                 granted = CASE WHEN $5 THEN leases.used ELSE leases.granted END + excluded.granted, \
                 expires_at = excluded.expires_at",
                &[
                    &req.account_id,
                    &req.node_id,
                    &to_sql(granted)?,
                    &expires_at,
                    &mine_expired,
                ],
            )
            .await?;
            tx.commit().await?;
            Ok(LeaseGrant {
                granted,
                free: free - granted,
            })
        })
    }

    async fn release_lease(
        &self,
        account_id: &str,
        node_id: &str,
        unused: u64,
    ) -> Result<(), StoreError> {
        let unused = to_sql(unused)?;
        on_client!(self, |c| {
            let tx = c.transaction().await?;
            tx.execute(
                "UPDATE leases SET granted = GREATEST(used, granted - $3) \
                 WHERE account_id = $1 AND node_id = $2",
                &[&account_id, &node_id, &unused],
            )
            .await?;
            tx.execute(
                "DELETE FROM leases WHERE account_id = $1 AND node_id = $2 AND granted <= used",
                &[&account_id, &node_id],
            )
            .await?;
            tx.commit().await?;
            Ok(())
        })
    }

    async fn ping(&self) -> Result<(), StoreError> {
        on_client!(self, |c| {
            c.simple_query("SELECT 1").await?;
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_parsed_with_packmeters_own_parameters() {
        let u = PgUrl::parse(
            "postgres://pm:s3cret@db.example.com:6543/bill?sslmode=verify-full&pool_max_size=9\
             &connect_timeout=3&application_name=x",
        )
        .unwrap();
        assert_eq!(u.ssl_mode(), SslMode::VerifyFull);
        assert_eq!(u.pool_size(), 9);
        assert_eq!(u.database(), "bill");
        assert_eq!(
            u.config.get_connect_timeout(),
            Some(&Duration::from_secs(3))
        );
        assert_eq!(u.spill_name(), "postgres-db.example.com-6543-bill");
        let shown = u.to_string();
        assert!(
            !shown.contains("s3cret") && shown.contains("pm:***@"),
            "{shown}"
        );
        assert!(!format!("{u:?}").contains("s3cret"));

        let d = PgUrl::parse("postgresql://pm@localhost").unwrap();
        assert_eq!(
            (d.ssl_mode(), d.pool_size(), d.database()),
            (SslMode::Prefer, DEFAULT_POOL_SIZE, "pm")
        );
        assert_eq!(d.config.get_connect_timeout(), Some(&CONNECT_TIMEOUT));
    }

    #[test]
    fn bad_urls_say_what_is_wrong_without_the_password() {
        for (url, says) in [
            (
                "postgres://pm:pw@h/db?sslmode=allow",
                "sslmode `allow` is not supported",
            ),
            (
                "postgres://pm:pw@h/db?sslmode=",
                "sslmode `` is not supported",
            ),
            (
                "postgres://pm:pw@h/db?pool_max_size=0",
                "pool_max_size must be",
            ),
            (
                "postgres://pm:pw@h/db?pool_max_size=x",
                "pool_max_size must be",
            ),
            ("postgres://pm:pw@h/db?bogus=1", "unknown option `bogus`"),
            ("postgres://pm:pw@/db", "needs a host"),
            ("postgres://h/db", "needs a user"),
            ("postgres://pm:pw@h:99999/db", "invalid"),
            (
                "postgres://pm:pw@h/db?sslrootcert=%zz",
                "not valid %-encoding",
            ),
            (
                "postgres://pm:pw@h/db?sslmode=verify-full&sslrootcert=/nonexistent/ca.pem",
                "sslrootcert /nonexistent/ca.pem",
            ),
        ] {
            let e = PgUrl::parse(url).unwrap_err().0;
            assert!(e.contains(says), "{url}: {e}");
            assert!(!e.contains(":pw@"), "{url}: {e}");
        }
    }

    #[test]
    fn a_pem_file_without_certificates_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ca.pem");
        std::fs::write(&path, "not a certificate\n").unwrap();
        let e = PgUrl::parse(&format!(
            "postgres://pm@h/db?sslmode=verify-ca&sslrootcert={}",
            path.display()
        ))
        .unwrap_err();
        assert!(e.0.contains("no usable PEM certificate"), "{}", e.0);
    }

    #[test]
    fn page_queries_number_their_parameters_as_bound() {
        for (account, after, params) in [
            (false, false, 3),
            (false, true, 6),
            (true, false, 4),
            (true, true, 6),
        ] {
            let sql = page_sql(account, after);
            assert!(sql.contains(&format!("${params}")), "{sql}");
            assert!(!sql.contains(&format!("${}", params + 1)), "{sql}");
        }
    }
}
