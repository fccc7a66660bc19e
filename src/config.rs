//! `serve`'s configuration: flags, `PACKMETER_*` variables and an optional
//! TOML file, parsed and validated into a typed [`Config`] before any socket
//! is bound.
//!
//! Precedence: flag, then environment variable (clap reads both), then the
//! file, then the default. Every error names the field it is about; `main`
//! turns it into exit code 64 (`EX_USAGE`).

use std::{
    net::SocketAddr,
    num::{IntErrorKind, ParseIntError},
    path::{Path, PathBuf},
    time::Duration,
};

use crate::{
    calendar::{BillingZone, FreeTierPlan, Ts},
    journal::Durability,
    meter::lease::{LeaseConfig, LeaseOutage},
    meter::{MeterConfig, UnknownAccounts},
    store::StoreUrl,
};

/// `packmeter serve` flags. Each is optional here so that the TOML file can
/// fill what the command line and environment leave out.
#[derive(Debug, Default, Clone, clap::Args)]
pub struct ServeArgs {
    /// TOML file with any of the settings below (keys are the flag names with `_`).
    #[arg(long, env = "PACKMETER_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// gRPC listen address [default: 127.0.0.1:50051].
    #[arg(long, env = "PACKMETER_LISTEN", value_name = "ADDR")]
    pub listen: Option<String>,
    /// Admin HTTP listen address: /livez, /readyz, /metrics, /packs [default: 127.0.0.1:9090].
    #[arg(long, env = "PACKMETER_ADMIN_LISTEN", value_name = "ADDR")]
    pub admin_listen: Option<String>,
    /// Store URL: sqlite://PATH, or postgres://USER:PASSWORD@HOST:PORT/DATABASE?sslmode=MODE
    /// to share one store among nodes (docs/stores.md) [default: a SQLite file under
    /// $XDG_DATA_HOME/packmeter].
    #[arg(long, env = "PACKMETER_STORE", value_name = "URL")]
    pub store: Option<String>,
    /// How often usage is flushed to the store [default: 1s].
    #[arg(long, env = "PACKMETER_FLUSH_INTERVAL", value_name = "DURATION")]
    pub flush_interval: Option<String>,
    /// How long after an hour ends late events are still accepted (R9) [default: 1h].
    #[arg(long, env = "PACKMETER_LATE_GRACE", value_name = "DURATION")]
    pub late_grace: Option<String>,
    /// How long a request_id is remembered (R10); at least --late-grace and
    /// at least 1m [default: --late-grace].
    #[arg(long, env = "PACKMETER_DEDUP_WINDOW", value_name = "DURATION")]
    pub dedup_window: Option<String>,
    /// Billing time zone: a UTC offset like +08:00 or an IANA name [default: +08:00].
    // A negative offset (`--timezone -05:00`) is a value, not a flag.
    #[arg(
        long,
        env = "PACKMETER_TIMEZONE",
        value_name = "TZ",
        allow_hyphen_values = true
    )]
    pub timezone: Option<String>,
    /// How far ahead of the server clock `at` may be [default: 5m].
    #[arg(long, env = "PACKMETER_MAX_FUTURE_SKEW", value_name = "DURATION")]
    pub max_future_skew: Option<String>,
    /// What to do with unknown accounts: activate or reject [default: activate].
    #[arg(long, env = "PACKMETER_UNKNOWN_ACCOUNTS", value_name = "MODE")]
    pub unknown_accounts: Option<String>,
    /// Strict mode for deny accounts (leases in the shared store): auto, on
    /// or off [default: auto, on for postgres://, off for sqlite://].
    #[arg(long, env = "PACKMETER_STRICT_DENY", value_name = "MODE")]
    pub strict_deny: Option<String>,
    /// How long a strict-mode lease lasts without renewal [default: 10s].
    #[arg(long, env = "PACKMETER_LEASE_TTL", value_name = "DURATION")]
    pub lease_ttl: Option<String>,
    /// What a deny account gets while the store is unreachable and its
    /// lease is spent: deny or allow [default: deny].
    #[arg(long, env = "PACKMETER_LEASE_OUTAGE", value_name = "MODE")]
    pub lease_outage: Option<String>,
    /// What a SIGKILL may lose: flush (up to one flush interval of usage) or
    /// journal (nothing acknowledged: each deduction is synced to a local
    /// journal before it is answered) [default: flush].
    #[arg(long, env = "PACKMETER_DURABILITY", value_name = "MODE")]
    pub durability: Option<String>,
    /// Time allowed after SIGTERM to drain requests and flush [default: 20s].
    #[arg(long, env = "PACKMETER_SHUTDOWN_GRACE", value_name = "DURATION")]
    pub shutdown_grace: Option<String>,
    /// Log format: text or json [default: text]. The level comes from RUST_LOG.
    #[arg(long, env = "PACKMETER_LOG_FORMAT", value_name = "FORMAT")]
    pub log_format: Option<String>,
    /// Most calls one deduction may carry, at most 2^48 [default: 1000000000].
    #[arg(long, env = "PACKMETER_MAX_CALLS", value_name = "N")]
    pub max_calls: Option<String>,
    /// Most egress bytes one deduction may carry, at most 2^48 [default: 1099511627776, 1 TiB].
    #[arg(long, env = "PACKMETER_MAX_EGRESS_BYTES", value_name = "N")]
    pub max_egress_bytes: Option<String>,
    /// Most deductions in one DeductBatch [default: 10000].
    #[arg(long, env = "PACKMETER_MAX_BATCH", value_name = "N")]
    pub max_batch: Option<String>,
    /// Free-tier calls per month [default: 1000000].
    #[arg(long, env = "PACKMETER_FREE_CALLS", value_name = "N")]
    pub free_calls: Option<String>,
    /// Free-tier egress bytes per month [default: 1073741824, 1 GiB].
    #[arg(long, env = "PACKMETER_FREE_EGRESS_BYTES", value_name = "N")]
    pub free_egress_bytes: Option<String>,
    /// Length of the free window in calendar months [default: 12].
    #[arg(long, env = "PACKMETER_FREE_MONTHS", value_name = "N")]
    pub free_months: Option<String>,
    /// Plans file (R8): one TOML `[[plan]]` table per version of the free
    /// tier, with name, effective, months, calls, egress_bytes and
    /// optionally zone. Replaces --free-calls, --free-egress-bytes and
    /// --free-months [default: none, one plan from those settings].
    #[arg(long, env = "PACKMETER_PLANS", value_name = "FILE")]
    pub plans: Option<String>,
    /// Accounts idle this long, with nothing unflushed, leave memory [default: 15m].
    #[arg(long, env = "PACKMETER_IDLE_EVICT", value_name = "DURATION")]
    pub idle_evict: Option<String>,
    /// Envoy rate-limit requests must name this domain [default: any domain].
    #[arg(long, env = "PACKMETER_RLS_DOMAIN", value_name = "DOMAIN")]
    pub rls_domain: Option<String>,
    /// Envoy descriptor entry key that names the account [default: account].
    #[arg(long, env = "PACKMETER_RLS_ACCOUNT_KEY", value_name = "KEY")]
    pub rls_account_key: Option<String>,
    /// Envoy descriptor entry key that names the item, calls or egress_bytes;
    /// calls when the entry is absent [default: item].
    #[arg(long, env = "PACKMETER_RLS_ITEM_KEY", value_name = "KEY")]
    pub rls_item_key: Option<String>,
    /// File of admin bearer tokens, one a line (blank lines and # comments
    /// ignored), re-read when it changes. With it, every Admin RPC and the
    /// pack page need `authorization: Bearer TOKEN`; without it they are
    /// served to loopback peers only [default: none, loopback only].
    #[arg(long, env = "PACKMETER_ADMIN_TOKEN_FILE", value_name = "FILE")]
    pub admin_token_file: Option<String>,
    /// Largest gRPC message accepted, in bytes; a larger one gets
    /// OUT_OF_RANGE [default: 4194304, 4 MiB].
    #[arg(long, env = "PACKMETER_MAX_MESSAGE_BYTES", value_name = "N")]
    pub max_message_bytes: Option<String>,
    /// Most concurrent gRPC streams (calls) on one connection, advertised
    /// in HTTP/2 SETTINGS; clients queue calls beyond it [default: 1024].
    #[arg(long, env = "PACKMETER_MAX_CONCURRENT_STREAMS", value_name = "N")]
    pub max_concurrent_streams: Option<String>,
    /// Longest `to - from` range one ExportUsage may ask for [default: 731d].
    #[arg(long, env = "PACKMETER_MAX_EXPORT_RANGE", value_name = "DURATION")]
    pub max_export_range: Option<String>,
    /// Most messages in flight on one DeductStream: received by the server
    /// and not yet answered. A client that sends more before reading the
    /// replies gets the replies of those in flight, then RESOURCE_EXHAUSTED
    /// [default: 256].
    #[arg(long, env = "PACKMETER_MAX_STREAM_IN_FLIGHT", value_name = "N")]
    pub max_stream_in_flight: Option<String>,
    /// PEM certificate chain for TLS on the gRPC port (Meter, Admin, Envoy
    /// RLS, health), with --tls-key-file; re-read when it changes. The admin
    /// HTTP port stays plaintext [default: none, plaintext gRPC].
    #[arg(long, env = "PACKMETER_TLS_CERT_FILE", value_name = "FILE")]
    pub tls_cert_file: Option<String>,
    /// PEM private key of --tls-cert-file; re-read when it changes.
    #[arg(long, env = "PACKMETER_TLS_KEY_FILE", value_name = "FILE")]
    pub tls_key_file: Option<String>,
    /// PEM CA certificates for client authentication (mTLS): a client
    /// without a certificate chaining to one of them is refused. Needs
    /// --tls-cert-file; re-read when it changes [default: none, any client].
    #[arg(long, env = "PACKMETER_TLS_CLIENT_CA_FILE", value_name = "FILE")]
    pub tls_client_ca_file: Option<String>,
    /// Benchmark baseline: answer every Meter and Envoy rate-limit RPC with a
    /// fixed response, without touching the meter. Never for production.
    // Deliberately not a TOML key: a baseline switch left in a config file
    // would silently stop metering.
    #[arg(long, env = "PACKMETER_NOOP")]
    pub noop: bool,
}

/// The TOML file: the same keys as the flags, with `_` for `-`. Unknown keys
/// are refused, so a typo is an error rather than a silent default.
///
/// Read key by key (see [`FileConfig::read`]) rather than with a serde
/// derive, so that every error, a value of the wrong type included, names
/// its key as the field, with the file and line.
#[derive(Debug, Default)]
struct FileConfig {
    listen: Option<String>,
    admin_listen: Option<String>,
    store: Option<String>,
    flush_interval: Option<String>,
    late_grace: Option<String>,
    dedup_window: Option<String>,
    timezone: Option<String>,
    max_future_skew: Option<String>,
    unknown_accounts: Option<String>,
    strict_deny: Option<String>,
    lease_ttl: Option<String>,
    lease_outage: Option<String>,
    shutdown_grace: Option<String>,
    durability: Option<String>,
    log_format: Option<String>,
    max_calls: Option<u64>,
    max_egress_bytes: Option<u64>,
    max_batch: Option<u64>,
    free_calls: Option<u64>,
    free_egress_bytes: Option<u64>,
    free_months: Option<u64>,
    plans: Option<String>,
    idle_evict: Option<String>,
    rls_domain: Option<String>,
    rls_account_key: Option<String>,
    rls_item_key: Option<String>,
    admin_token_file: Option<String>,
    max_message_bytes: Option<u64>,
    max_concurrent_streams: Option<u64>,
    max_export_range: Option<String>,
    max_stream_in_flight: Option<u64>,
    tls_cert_file: Option<String>,
    tls_key_file: Option<String>,
    tls_client_ca_file: Option<String>,
}

/// Where a file key's value goes: text (addresses, durations, names) or a
/// whole number.
enum Slot<'a> {
    Text(&'a mut Option<String>),
    Number(&'a mut Option<u64>),
}

impl FileConfig {
    /// Every key the file accepts, for the unknown-key message.
    const KEYS: [&'static str; 34] = [
        "plans",
        "durability",
        "max_stream_in_flight",
        "tls_cert_file",
        "tls_key_file",
        "tls_client_ca_file",
        "admin_token_file",
        "max_message_bytes",
        "max_concurrent_streams",
        "max_export_range",
        "strict_deny",
        "lease_ttl",
        "lease_outage",
        "listen",
        "admin_listen",
        "store",
        "flush_interval",
        "late_grace",
        "dedup_window",
        "timezone",
        "max_future_skew",
        "unknown_accounts",
        "shutdown_grace",
        "log_format",
        "max_calls",
        "max_egress_bytes",
        "max_batch",
        "free_calls",
        "free_egress_bytes",
        "free_months",
        "idle_evict",
        "rls_domain",
        "rls_account_key",
        "rls_item_key",
    ];

    /// The key's name as a `&'static str` (the field of its errors) and
    /// where its value goes; `None` for an unknown key.
    fn slot(&mut self, key: &str) -> Option<(&'static str, Slot<'_>)> {
        let field = *Self::KEYS.iter().find(|k| **k == key)?;
        let slot = match field {
            "listen" => Slot::Text(&mut self.listen),
            "admin_listen" => Slot::Text(&mut self.admin_listen),
            "store" => Slot::Text(&mut self.store),
            "flush_interval" => Slot::Text(&mut self.flush_interval),
            "late_grace" => Slot::Text(&mut self.late_grace),
            "dedup_window" => Slot::Text(&mut self.dedup_window),
            "timezone" => Slot::Text(&mut self.timezone),
            "max_future_skew" => Slot::Text(&mut self.max_future_skew),
            "unknown_accounts" => Slot::Text(&mut self.unknown_accounts),
            "strict_deny" => Slot::Text(&mut self.strict_deny),
            "lease_ttl" => Slot::Text(&mut self.lease_ttl),
            "lease_outage" => Slot::Text(&mut self.lease_outage),
            "shutdown_grace" => Slot::Text(&mut self.shutdown_grace),
            "durability" => Slot::Text(&mut self.durability),
            "log_format" => Slot::Text(&mut self.log_format),
            "max_calls" => Slot::Number(&mut self.max_calls),
            "max_egress_bytes" => Slot::Number(&mut self.max_egress_bytes),
            "max_batch" => Slot::Number(&mut self.max_batch),
            "free_calls" => Slot::Number(&mut self.free_calls),
            "free_egress_bytes" => Slot::Number(&mut self.free_egress_bytes),
            "free_months" => Slot::Number(&mut self.free_months),
            "plans" => Slot::Text(&mut self.plans),
            "idle_evict" => Slot::Text(&mut self.idle_evict),
            "rls_domain" => Slot::Text(&mut self.rls_domain),
            "rls_account_key" => Slot::Text(&mut self.rls_account_key),
            "rls_item_key" => Slot::Text(&mut self.rls_item_key),
            "admin_token_file" => Slot::Text(&mut self.admin_token_file),
            "max_message_bytes" => Slot::Number(&mut self.max_message_bytes),
            "max_concurrent_streams" => Slot::Number(&mut self.max_concurrent_streams),
            "max_export_range" => Slot::Text(&mut self.max_export_range),
            "max_stream_in_flight" => Slot::Number(&mut self.max_stream_in_flight),
            "tls_cert_file" => Slot::Text(&mut self.tls_cert_file),
            "tls_key_file" => Slot::Text(&mut self.tls_key_file),
            "tls_client_ca_file" => Slot::Text(&mut self.tls_client_ca_file),
            _ => return None,
        };
        Some((field, slot))
    }

    /// Reads and checks the file. Every error names a key as its field
    /// when one is at fault (a value of the wrong type, a repeated key, a
    /// number TOML cannot hold), else `config`, and says `FILE line N`.
    fn read(path: &Path) -> Result<FileConfig, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| err("config", format!("cannot read {}: {e}", path.display())))?;
        let at = |span: Option<std::ops::Range<usize>>| -> String {
            format!("{}{}", path.display(), toml_line(&text, span))
        };
        let table: std::collections::BTreeMap<toml::Spanned<String>, toml::Spanned<toml::Value>> =
            toml::from_str(&text).map_err(|e| {
                // A syntax error or a repeated key: name the key of the
                // line it is on, if that is one of ours.
                let mut probe = FileConfig::default();
                let field = key_on_line(&text, e.span())
                    .and_then(|k| probe.slot(k).map(|(f, _)| f))
                    .unwrap_or("config");
                err(
                    field,
                    format!("{}: {}", at(e.span()), e.message().trim_end()),
                )
            })?;
        let mut file = FileConfig::default();
        for (key, value) in table {
            let place = at(Some(value.span()));
            let Some((field, slot)) = file.slot(key.get_ref()) else {
                return Err(err(
                    "config",
                    format!(
                        "{}: unknown key `{}`; the keys are {}",
                        at(Some(key.span())),
                        key.get_ref().escape_debug(),
                        Self::KEYS.join(", ")
                    ),
                ));
            };
            let value = value.into_inner();
            match (slot, value) {
                (Slot::Text(s), toml::Value::String(v)) => *s = Some(v),
                (Slot::Number(n), toml::Value::Integer(v)) => {
                    *n = Some(u64::try_from(v).map_err(|_| {
                        err(
                            field,
                            format!("{place}: {v} is negative; use a whole number from 0"),
                        )
                    })?)
                }
                (Slot::Text(_), other) => {
                    return Err(err(
                        field,
                        format!(
                            "{place}: expected a string in quotes, found {} `{other}`",
                            other.type_str()
                        ),
                    ))
                }
                (Slot::Number(_), other) => {
                    return Err(err(
                        field,
                        format!(
                            "{place}: expected a whole number, found {} `{other}`",
                            other.type_str()
                        ),
                    ))
                }
            }
        }
        Ok(file)
    }
}

/// The key of the `key = value` line a TOML error points into, unquoted.
fn key_on_line(text: &str, span: Option<std::ops::Range<usize>>) -> Option<&str> {
    let start = span?.start.min(text.len());
    let line_start = text.get(..start)?.rfind('\n').map_or(0, |i| i + 1);
    let line = text.get(line_start..)?.lines().next()?;
    let (key, _) = line.split_once('=')?;
    Some(key.trim().trim_matches(|c| c == '"' || c == '\''))
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

/// A validated configuration.
#[derive(Clone, Debug)]
pub struct Config {
    pub listen: SocketAddr,
    pub admin_listen: SocketAddr,
    /// Parsed once here; its `Display` hides any password.
    pub store: StoreUrl,
    /// Whether `serve` may create the store's directory: only the default
    /// data directory is created. An explicit path in a directory that
    /// does not exist is most likely a typo, and would start an empty
    /// ledger (a fresh free tier for every account), so `serve` refuses it.
    pub create_store_dir: bool,
    pub flush_interval: Duration,
    /// `--durability`: see [`crate::journal`].
    pub durability: Durability,
    pub shutdown_grace: Duration,
    pub idle_evict: Duration,
    pub log_format: LogFormat,
    pub max_batch: usize,
    pub meter: MeterConfig,
    pub rls: RlsConfig,
    /// `--admin-token-file`, checked readable and non-empty; `None`:
    /// admin calls are served to loopback peers only (see [`crate::auth`]).
    pub admin_token_file: Option<PathBuf>,
    pub limits: Limits,
    /// TLS on the gRPC port, checked loadable; `None`: plaintext.
    pub tls: Option<crate::tls::TlsFiles>,
    /// `--noop`: serve fixed responses, for benchmark baselines.
    pub noop: bool,
}

/// What one caller may ask of the gRPC port (README, "Security").
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Largest decoded message, in bytes.
    pub max_message_bytes: usize,
    /// HTTP/2 SETTINGS_MAX_CONCURRENT_STREAMS.
    pub max_concurrent_streams: u32,
    /// Longest ExportUsage range, in microseconds.
    pub max_export_range: Ts,
    /// Most DeductStream messages received and not yet answered, per
    /// stream (see [`crate::grpc::meter`]).
    pub max_stream_in_flight: usize,
}

pub const DEFAULT_MAX_MESSAGE_BYTES: u64 = 4 << 20;
pub const DEFAULT_MAX_CONCURRENT_STREAMS: u64 = 1024;
/// A client's window of 256 unanswered messages is the most one group
/// commit covers in journal mode; more buys no throughput.
pub const DEFAULT_MAX_STREAM_IN_FLIGHT: u64 = 256;
/// Above it, one stream could hold a large share of the server's memory.
pub const MAX_STREAM_IN_FLIGHT: u64 = 65_536;
/// Two years: a whole free window (12 months) and more in one call; the
/// export is streamed a page at a time, so the bound is on one call's work.
pub const DEFAULT_MAX_EXPORT_RANGE: Duration = Duration::from_secs(731 * 86_400);

/// How Envoy rate-limit descriptors map to accounts and items.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RlsConfig {
    /// The only domain accepted; `None` accepts any.
    pub domain: Option<String>,
    /// The entry key whose value is the account id.
    pub account_key: String,
    /// The entry key whose value is the item (calls when absent).
    pub item_key: String,
}

impl Default for RlsConfig {
    fn default() -> Self {
        RlsConfig {
            domain: None,
            account_key: "account".into(),
            item_key: "item".into(),
        }
    }
}

/// The plans file, if one is set, read and validated (crate::plans); its
/// errors name the plan and its field. It replaces the `free_*` settings,
/// so setting both is refused, naming the `free_*` one.
fn resolve_plans(
    args: &ServeArgs,
    file: &FileConfig,
    zone: BillingZone,
) -> Result<Option<std::sync::Arc<crate::plans::LivePlans>>, ConfigError> {
    let Some(path) = args.plans.clone().or_else(|| file.plans.clone()) else {
        return Ok(None);
    };
    for (field, given) in [
        (
            "free_calls",
            args.free_calls.is_some() || file.free_calls.is_some(),
        ),
        (
            "free_egress_bytes",
            args.free_egress_bytes.is_some() || file.free_egress_bytes.is_some(),
        ),
        (
            "free_months",
            args.free_months.is_some() || file.free_months.is_some(),
        ),
    ] {
        if given {
            return Err(err(
                field,
                "cannot be combined with plans: the plans file sets the free tier; put it in a [[plan]] table there",
            ));
        }
    }
    crate::plans::LivePlans::open(Path::new(&path), zone)
        .map(|p| Some(std::sync::Arc::new(p)))
        .map_err(|e| err("plans", format!("{path}: {e}")))
}

/// An invalid setting, named.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{field}: {message}")]
pub struct ConfigError {
    pub field: &'static str,
    pub message: String,
}

fn err(field: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError {
        field,
        message: message.into(),
    }
}

pub const DEFAULT_LISTEN: &str = "127.0.0.1:50051";
pub const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:9090";
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(20);

/// Where the SQLite file goes when no `--store` is given:
/// `$XDG_DATA_HOME/packmeter/packmeter.db`, else
/// `$HOME/.local/share/packmeter/packmeter.db`, else `./packmeter.db`.
pub fn default_store_url() -> String {
    let dir = crate::store::default_data_dir();
    format!("sqlite://{}", dir.join("packmeter.db").display())
}

/// The shortest dedup window (R10) accepted: a gateway's retries after a
/// timeout, with backoff, come within seconds to a minute, and a window
/// shorter than that would charge them twice.
pub const MIN_DEDUP_WINDOW: Duration = Duration::from_secs(60);

/// Whether binding both addresses would clash: the same port on the same
/// address, or on the wildcard address of the same family.
fn same_socket(a: SocketAddr, b: SocketAddr) -> bool {
    a.port() == b.port()
        && a.is_ipv4() == b.is_ipv4()
        && (a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified())
}

/// The longest duration any setting accepts: what a [`Ts`] (signed 64-bit
/// microseconds) can hold, about 292,000 years.
pub const MAX_DURATION: Duration = Duration::from_micros(i64::MAX as u64);

fn duration(field: &'static str, v: &str) -> Result<Duration, ConfigError> {
    parse_duration(v).map_err(|message| err(field, message))
}

/// `humantime::parse_duration` without its panic, and capped at
/// [`MAX_DURATION`]: for any duration a user types. The error says what was
/// wrong and quotes the value.
///
/// humantime panics ("overflow in Duration::new") when its running total
/// reaches u64::MAX seconds and the nanoseconds carry exactly one second,
/// e.g. `18446744073709551615s 1000000000ns`; below that total it cannot, so
/// a value whose `duration_bound_secs` reaches it is refused unread.
pub fn parse_duration(v: &str) -> Result<Duration, String> {
    let too_long = || {
        format!(
            "`{v}` is longer than the {} years packmeter can count in signed 64-bit microseconds; use a shorter duration",
            MAX_DURATION.as_secs() / 31_557_600
        )
    };
    if duration_bound_secs(v.trim()) >= u128::from(u64::MAX) {
        return Err(too_long());
    }
    let d = humantime::parse_duration(v.trim())
        .map_err(|e| format!("`{v}` is not a duration like 200ms, 1h or 30d ({e})"))?;
    if d > MAX_DURATION {
        return Err(too_long());
    }
    Ok(d)
}

/// An upper bound, in seconds, of what `humantime::parse_duration(s)` can
/// add up before it returns or fails. It reads `s` the way humantime does: a
/// number (digits, with whitespace skipped and an optional `.` fraction)
/// followed by a unit made of ASCII letters or `µ`. Each number counts as
/// its integer part plus one (for the fraction and the nanosecond carry),
/// times the unit's length in whole seconds, rounded up; an unknown unit
/// counts as a year, the longest humantime knows.
fn duration_bound_secs(s: &str) -> u128 {
    let unit_secs = |unit: &str| -> u128 {
        // One unit is far from any overflow, so humantime is safe here.
        match humantime::parse_duration(&format!("1{unit}")) {
            Ok(d) => u128::from(d.as_secs()) + u128::from(d.subsec_nanos() > 0),
            Err(_) => 31_557_600,
        }
    };
    let is_unit_char = |c: char| c.is_ascii_alphabetic() || c == 'µ';
    let mut total: u128 = 0;
    let mut chars = s.char_indices().peekable();
    while let Some(&(_, c)) = chars.peek() {
        if !(c.is_ascii_digit() || c == '.') {
            // Whitespace, a stray unit or a character humantime refuses:
            // none of them adds to the total.
            chars.next();
            continue;
        }
        let mut integer: u128 = 0;
        let mut in_fraction = false;
        while let Some(&(_, c)) = chars.peek() {
            match c {
                '0'..='9' if !in_fraction => {
                    integer = integer
                        .saturating_mul(10)
                        .saturating_add(u128::from(c as u8 - b'0'));
                }
                '0'..='9' => {}
                '.' => in_fraction = true,
                c if c.is_whitespace() => {}
                _ => break,
            }
            chars.next();
        }
        let start = chars.peek().map_or(s.len(), |&(i, _)| i);
        let mut end = start;
        while let Some(&(i, c)) = chars.peek().filter(|&&(_, c)| is_unit_char(c)) {
            end = i + c.len_utf8();
            chars.next();
        }
        let secs = if start == end {
            31_557_600
        } else {
            unit_secs(&s[start..end]).max(1)
        };
        total = total.saturating_add(integer.saturating_add(1).saturating_mul(secs));
    }
    total
}

fn micros(d: Duration) -> Ts {
    // `duration` caps every setting at MAX_DURATION, so this never clamps.
    Ts::try_from(d.as_micros()).unwrap_or(Ts::MAX)
}

fn number(field: &'static str, v: &str) -> Result<u64, ConfigError> {
    v.trim()
        .replace('_', "")
        .parse()
        .map_err(|e: ParseIntError| {
            let message = match e.kind() {
                IntErrorKind::PosOverflow => {
                    format!(
                        "`{v}` is larger than {}, the largest number accepted",
                        u64::MAX
                    )
                }
                _ => format!("`{v}` is not a whole number"),
            };
            err(field, message)
        })
}

/// The largest amount a store can keep: SQLite integers are signed 64-bit.
pub const MAX_AMOUNT: u64 = i64::MAX as u64;

/// The largest `max_calls` and `max_egress_bytes`: 2^48 (256 TiB of egress
/// in one deduction). Far above any real request, and small enough that a
/// whole `DeductBatch` of them stays far from overflowing a 64-bit sum; an
/// account-hour still holds at least 32 768 such deductions before the
/// ledger cap (`ledger::LEDGER_CAP`) refuses more.
pub const MAX_PER_DEDUCTION: u64 = 1 << 48;

/// A per-deduction maximum: at most [`MAX_PER_DEDUCTION`].
fn per_deduction(field: &'static str, n: u64) -> Result<u64, ConfigError> {
    if n > MAX_PER_DEDUCTION {
        return Err(err(
            field,
            format!(
                "{n} is above {MAX_PER_DEDUCTION} (2^48), the largest amount one deduction may carry; use at most {MAX_PER_DEDUCTION}"
            ),
        ));
    }
    Ok(n)
}

/// An amount of calls or bytes that the stores must be able to write.
fn amount(field: &'static str, n: u64) -> Result<u64, ConfigError> {
    if n > MAX_AMOUNT {
        return Err(err(
            field,
            format!(
                "{n} is above {MAX_AMOUNT} (i64::MAX): the stores keep amounts as signed 64-bit integers; use at most {MAX_AMOUNT}"
            ),
        ));
    }
    Ok(n)
}

fn addr(field: &'static str, v: &str) -> Result<SocketAddr, ConfigError> {
    v.parse().map_err(|_| {
        err(
            field,
            format!("`{v}` is not a socket address like 127.0.0.1:50051"),
        )
    })
}

/// Where in the file a TOML error or value is, as ` line N (`the line`)`.
fn toml_line(text: &str, span: Option<std::ops::Range<usize>>) -> String {
    let Some(before) = span.and_then(|span| text.get(..span.start)) else {
        return String::new();
    };
    let n = before.matches('\n').count();
    let line = text.lines().nth(n).unwrap_or_default().trim();
    format!(" line {} (`{}`)", n + 1, line.escape_debug())
}

/// The log format asked for, for reporting a configuration that does not
/// resolve: the flag or variable, else the file's key if the file reads,
/// else text.
pub fn requested_log_format(args: &ServeArgs) -> LogFormat {
    let file = || {
        args.config
            .as_deref()
            .and_then(|p| FileConfig::read(p).ok())
            .and_then(|f| f.log_format)
    };
    match args
        .log_format
        .clone()
        .or_else(file)
        .as_deref()
        .map(str::trim)
    {
        Some("json") => LogFormat::Json,
        _ => LogFormat::Text,
    }
}

impl Config {
    /// Merges flags, environment and the TOML file, then validates.
    pub fn resolve(args: &ServeArgs) -> Result<Config, ConfigError> {
        let file = match &args.config {
            Some(path) => FileConfig::read(path)?,
            None => FileConfig::default(),
        };
        // A flag or variable wins over the file; file numbers arrive typed.
        let pick = |flag: &Option<String>, file: &Option<String>| flag.clone().or(file.clone());
        let pick_n =
            |flag: &Option<String>, file: Option<u64>| flag.clone().or(file.map(|n| n.to_string()));
        // A duration or whole-number setting: flag or variable, else file, else default.
        let duration_of = |field: &'static str,
                           flag: &Option<String>,
                           file: &Option<String>,
                           default: Duration|
         -> Result<Duration, ConfigError> {
            pick(flag, file).map_or(Ok(default), |v| duration(field, &v))
        };
        let number_of = |field: &'static str,
                         flag: &Option<String>,
                         file: Option<u64>,
                         default: u64|
         -> Result<u64, ConfigError> {
            pick_n(flag, file).map_or(Ok(default), |v| number(field, &v))
        };

        let listen = addr(
            "listen",
            &pick(&args.listen, &file.listen).unwrap_or(DEFAULT_LISTEN.into()),
        )?;
        let admin_listen = addr(
            "admin_listen",
            &pick(&args.admin_listen, &file.admin_listen).unwrap_or(DEFAULT_ADMIN_LISTEN.into()),
        )?;
        if listen.port() != 0 && same_socket(listen, admin_listen) {
            // Name the one that was set: with only --listen given, the
            // clash is with admin_listen's default.
            let admin_given = pick(&args.admin_listen, &file.admin_listen).is_some();
            let (field, other) = if admin_given {
                ("admin_listen", "listen")
            } else {
                ("listen", "admin_listen")
            };
            return Err(err(
                field,
                format!(
                    "`{}` is also {other}'s address ({admin_listen}); listen and admin_listen \
                     must be different ports",
                    if admin_given { admin_listen } else { listen }
                ),
            ));
        }
        let store_given = pick(&args.store, &file.store);
        let create_store_dir = store_given.is_none();
        let store = store_given.unwrap_or_else(default_store_url);
        let store = StoreUrl::parse(&store).map_err(|e| err("store", e.0))?;

        let shared_store = match store {
            #[cfg(feature = "postgres")]
            StoreUrl::Postgres(_) => true,
            #[allow(unreachable_patterns)]
            _ => false,
        };
        let flush_interval = duration_of(
            "flush_interval",
            &args.flush_interval,
            &file.flush_interval,
            Duration::from_secs(1),
        )?;
        if flush_interval.is_zero() || flush_interval > Duration::from_secs(3600) {
            return Err(err("flush_interval", "must be more than 0 and at most 1h"));
        }
        let durability = match pick(&args.durability, &file.durability) {
            None => Durability::default(),
            Some(v) => v.parse().map_err(|e: String| err("durability", e))?,
        };
        let strict = match pick(&args.strict_deny, &file.strict_deny)
            .as_deref()
            .map(str::trim)
        {
            None | Some("auto") => shared_store,
            Some("on") if !shared_store => {
                return Err(err(
                    "strict_deny",
                    "`on` needs a shared store (postgres://): one node on SQLite is exact \
                     already; use auto or off",
                ))
            }
            Some("on") => true,
            Some("off") => false,
            Some(other) => {
                return Err(err(
                    "strict_deny",
                    format!("`{other}` is not auto, on or off"),
                ))
            }
        };
        let lease_ttl = duration_of(
            "lease_ttl",
            &args.lease_ttl,
            &file.lease_ttl,
            Duration::from_secs(10),
        )?;
        if lease_ttl < Duration::from_millis(100) || lease_ttl > Duration::from_secs(3600) {
            return Err(err("lease_ttl", "must be at least 100ms and at most 1h"));
        }
        let outage = match pick(&args.lease_outage, &file.lease_outage)
            .as_deref()
            .map(str::trim)
        {
            None | Some("deny") => LeaseOutage::Deny,
            Some("allow") => LeaseOutage::Allow,
            Some(other) => {
                return Err(err(
                    "lease_outage",
                    format!("`{other}` is not deny or allow"),
                ))
            }
        };
        let strict = strict.then_some(LeaseConfig {
            ttl: lease_ttl,
            flush_interval,
            outage,
        });

        let late_grace = duration_of(
            "late_grace",
            &args.late_grace,
            &file.late_grace,
            Duration::from_secs(3600),
        )?;
        let dedup_window = duration_of(
            "dedup_window",
            &args.dedup_window,
            &file.dedup_window,
            late_grace,
        )?;
        if dedup_window < MIN_DEDUP_WINDOW {
            // With no dedup window an immediate retry of a request_id is
            // charged again: idempotency (R10) would be silently off.
            let given = pick(&args.dedup_window, &file.dedup_window).is_some();
            return Err(err(
                if given { "dedup_window" } else { "late_grace" },
                format!(
                    "dedup_window would be {}{}, too short to recognise a retried request_id, \
                     which would then be charged twice; set dedup_window to at least {}",
                    humantime::format_duration(dedup_window),
                    if given {
                        String::new()
                    } else {
                        format!(
                            " (unset, it follows late_grace `{}`)",
                            humantime::format_duration(late_grace)
                        )
                    },
                    humantime::format_duration(MIN_DEDUP_WINDOW)
                ),
            ));
        }
        if dedup_window < late_grace {
            return Err(err(
                "dedup_window",
                format!(
                    "{} is shorter than late_grace ({}); a late retry could be counted twice",
                    humantime::format_duration(dedup_window),
                    humantime::format_duration(late_grace)
                ),
            ));
        }
        let max_future_skew = duration_of(
            "max_future_skew",
            &args.max_future_skew,
            &file.max_future_skew,
            Duration::from_secs(300),
        )?;
        let zone: BillingZone = match pick(&args.timezone, &file.timezone) {
            Some(v) => v
                .parse()
                .map_err(|e: crate::calendar::InvalidZone| err("timezone", e.to_string()))?,
            None => BillingZone::default(),
        };
        let unknown_accounts = match pick(&args.unknown_accounts, &file.unknown_accounts)
            .as_deref()
            .map(str::trim)
        {
            None | Some("activate") => UnknownAccounts::Activate,
            Some("reject") => UnknownAccounts::Reject,
            Some(other) => {
                return Err(err(
                    "unknown_accounts",
                    format!("`{other}` is not activate or reject"),
                ))
            }
        };
        let shutdown_grace = duration_of(
            "shutdown_grace",
            &args.shutdown_grace,
            &file.shutdown_grace,
            DEFAULT_SHUTDOWN_GRACE,
        )?;
        if shutdown_grace < Duration::from_secs(1) {
            return Err(err(
                "shutdown_grace",
                "must be at least 1s to drain and flush",
            ));
        }
        let idle_evict = duration_of(
            "idle_evict",
            &args.idle_evict,
            &file.idle_evict,
            Duration::from_secs(900),
        )?;
        // Eviction never drops unflushed usage, so any positive value is safe.
        if idle_evict.is_zero() {
            return Err(err("idle_evict", "must be more than 0"));
        }
        let log_format = match pick(&args.log_format, &file.log_format).as_deref() {
            None | Some("text") => LogFormat::Text,
            Some("json") => LogFormat::Json,
            Some(other) => return Err(err("log_format", format!("`{other}` is not text or json"))),
        };
        let positive =
            |field, flag: &Option<String>, file, default: u64| -> Result<u64, ConfigError> {
                let n = number_of(field, flag, file, default)?;
                if n == 0 {
                    return Err(err(field, "must be at least 1"));
                }
                Ok(n)
            };
        let max_calls = per_deduction(
            "max_calls",
            positive("max_calls", &args.max_calls, file.max_calls, 1_000_000_000)?,
        )?;
        let max_egress_bytes = per_deduction(
            "max_egress_bytes",
            positive(
                "max_egress_bytes",
                &args.max_egress_bytes,
                file.max_egress_bytes,
                1 << 40,
            )?,
        )?;
        let max_batch = positive("max_batch", &args.max_batch, file.max_batch, 10_000)?;
        let plan = FreeTierPlan {
            calls: amount(
                "free_calls",
                number_of("free_calls", &args.free_calls, file.free_calls, 1_000_000)?,
            )?,
            egress_bytes: amount(
                "free_egress_bytes",
                number_of(
                    "free_egress_bytes",
                    &args.free_egress_bytes,
                    file.free_egress_bytes,
                    1 << 30,
                )?,
            )?,
            months: {
                let m = number_of("free_months", &args.free_months, file.free_months, 12)?;
                u32::try_from(m)
                    .ok()
                    .filter(|m| *m <= 1200)
                    .ok_or_else(|| err("free_months", "must be at most 1200"))?
            },
        };
        let plans = resolve_plans(args, &file, zone)?;

        // Envoy sends descriptor keys and the domain verbatim; an empty or
        // control-character key could never match, so refuse it up front.
        let rls_text = |field: &'static str, v: String| -> Result<String, ConfigError> {
            if v.is_empty() {
                return Err(err(field, "must not be empty"));
            }
            if v.chars().any(char::is_control) {
                return Err(err(field, "must not contain control characters"));
            }
            Ok(v)
        };
        let rls_defaults = RlsConfig::default();
        let rls = RlsConfig {
            domain: pick(&args.rls_domain, &file.rls_domain)
                .map(|v| rls_text("rls_domain", v))
                .transpose()?,
            account_key: rls_text(
                "rls_account_key",
                pick(&args.rls_account_key, &file.rls_account_key)
                    .unwrap_or(rls_defaults.account_key),
            )?,
            item_key: rls_text(
                "rls_item_key",
                pick(&args.rls_item_key, &file.rls_item_key).unwrap_or(rls_defaults.item_key),
            )?,
        };
        if rls.account_key == rls.item_key {
            // Name the key that was set: with only rls_account_key given,
            // the clash is with rls_item_key's default.
            let item_key_given = pick(&args.rls_item_key, &file.rls_item_key).is_some();
            if !item_key_given {
                return Err(err(
                    "rls_account_key",
                    format!(
                        "`{}` is also rls_item_key (its default); the two keys must differ",
                        rls.account_key
                    ),
                ));
            }
            return Err(err(
                "rls_item_key",
                format!(
                    "`{}` is also rls_account_key; the two keys must differ",
                    rls.item_key
                ),
            ));
        }

        let admin_token_file = pick(&args.admin_token_file, &file.admin_token_file)
            .map(|p| {
                let p = PathBuf::from(p.trim());
                crate::auth::read_tokens(&p).map_err(|e| err("admin_token_file", e))?;
                Ok::<_, ConfigError>(p)
            })
            .transpose()?;
        let max_message_bytes = positive(
            "max_message_bytes",
            &args.max_message_bytes,
            file.max_message_bytes,
            DEFAULT_MAX_MESSAGE_BYTES,
        )?;
        if max_message_bytes > 1 << 30 {
            return Err(err(
                "max_message_bytes",
                format!("{max_message_bytes} is above 1073741824 (1 GiB); use at most 1073741824"),
            ));
        }
        let max_concurrent_streams = positive(
            "max_concurrent_streams",
            &args.max_concurrent_streams,
            file.max_concurrent_streams,
            DEFAULT_MAX_CONCURRENT_STREAMS,
        )?;
        let max_concurrent_streams = u32::try_from(max_concurrent_streams).map_err(|_| {
            err(
                "max_concurrent_streams",
                format!("{max_concurrent_streams} is above {}", u32::MAX),
            )
        })?;
        let max_export_range = duration_of(
            "max_export_range",
            &args.max_export_range,
            &file.max_export_range,
            DEFAULT_MAX_EXPORT_RANGE,
        )?;
        if max_export_range < Duration::from_secs(3600) {
            return Err(err(
                "max_export_range",
                "must be at least 1h, one settled hour",
            ));
        }
        let max_stream_in_flight = positive(
            "max_stream_in_flight",
            &args.max_stream_in_flight,
            file.max_stream_in_flight,
            DEFAULT_MAX_STREAM_IN_FLIGHT,
        )?;
        if max_stream_in_flight > MAX_STREAM_IN_FLIGHT {
            return Err(err(
                "max_stream_in_flight",
                format!("{max_stream_in_flight} is above {MAX_STREAM_IN_FLIGHT}; use at most {MAX_STREAM_IN_FLIGHT}"),
            ));
        }
        let tls = tls_files(
            pick(&args.tls_cert_file, &file.tls_cert_file),
            pick(&args.tls_key_file, &file.tls_key_file),
            pick(&args.tls_client_ca_file, &file.tls_client_ca_file),
        )?;

        Ok(Config {
            listen,
            admin_listen,
            store,
            create_store_dir,
            flush_interval,
            durability,
            shutdown_grace,
            idle_evict,
            log_format,
            max_batch: usize::try_from(max_batch).unwrap_or(usize::MAX),
            meter: MeterConfig {
                zone,
                plan,
                plans,
                late_grace: micros(late_grace),
                dedup_window: micros(dedup_window),
                max_future_skew: micros(max_future_skew),
                unknown_accounts,
                max_calls,
                max_egress_bytes,
                strict,
            },
            rls,
            admin_token_file,
            limits: Limits {
                max_message_bytes: usize::try_from(max_message_bytes).unwrap_or(usize::MAX),
                max_concurrent_streams,
                max_export_range: micros(max_export_range),
                max_stream_in_flight: usize::try_from(max_stream_in_flight).unwrap_or(usize::MAX),
            },
            tls,
            noop: args.noop,
        })
    }
}

/// The TLS settings: the certificate and key together, the client CA only
/// with them, and every file loadable now (so a bad file stops the start,
/// not the first handshake). An error names the setting that was given.
fn tls_files(
    cert: Option<String>,
    key: Option<String>,
    client_ca: Option<String>,
) -> Result<Option<crate::tls::TlsFiles>, ConfigError> {
    let path = |p: String| PathBuf::from(p.trim());
    let (cert, key) = match (cert, key) {
        (None, None) => {
            return match client_ca {
                None => Ok(None),
                Some(_) => Err(err(
                    "tls_client_ca_file",
                    "needs tls_cert_file and tls_key_file: client certificates are checked \
                     only on a TLS port",
                )),
            }
        }
        (Some(_), None) => {
            return Err(err(
                "tls_cert_file",
                "needs tls_key_file too (the certificate's private key)",
            ))
        }
        (None, Some(_)) => {
            return Err(err(
                "tls_key_file",
                "needs tls_cert_file too (the certificate the key belongs to)",
            ))
        }
        (Some(c), Some(k)) => (path(c), path(k)),
    };
    let files = crate::tls::TlsFiles {
        cert,
        key,
        client_ca: client_ca.map(path),
    };
    crate::tls::server_config(&files).map_err(|e| err(e.field, e.message))?;
    Ok(Some(files))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn defaults_match_the_design() {
        let c = Config::resolve(&ServeArgs::default()).unwrap();
        assert_eq!(c.listen.to_string(), DEFAULT_LISTEN);
        assert_eq!(c.admin_listen.to_string(), DEFAULT_ADMIN_LISTEN);
        assert_eq!(c.flush_interval, Duration::from_secs(1));
        assert_eq!(c.meter.late_grace, 3_600_000_000);
        assert_eq!(c.meter.dedup_window, c.meter.late_grace);
        assert_eq!(c.meter.zone, BillingZone::default());
        let store = c.store.to_string();
        assert!(store.starts_with("sqlite://") && store.ends_with("packmeter.db"));
        assert_eq!(c.rls, RlsConfig::default());
        assert_eq!(c.rls.account_key, "account");
        assert_eq!(c.rls.item_key, "item");
        assert!(c.rls.domain.is_none() && !c.noop);
    }

    #[test]
    fn rls_mapping_comes_from_flags_or_file_and_bad_keys_name_their_field() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pm.toml");
        std::fs::write(
            &path,
            "rls_domain = \"edge\"\nrls_account_key = \"tenant\"\nrls_item_key = \"kind\"\n",
        )
        .unwrap();
        let from_file = Config::resolve(&ServeArgs {
            config: Some(path.clone()),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(
            from_file.rls,
            RlsConfig {
                domain: Some("edge".into()),
                account_key: "tenant".into(),
                item_key: "kind".into(),
            }
        );
        // A flag wins over the file.
        let flagged = Config::resolve(&ServeArgs {
            config: Some(path),
            rls_domain: Some("gateway".into()),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(flagged.rls.domain.as_deref(), Some("gateway"));
        assert_eq!(flagged.rls.account_key, "tenant");

        let cases = [
            (
                ServeArgs {
                    rls_domain: Some(String::new()),
                    ..Default::default()
                },
                "rls_domain",
            ),
            (
                ServeArgs {
                    rls_account_key: Some("acc\tount".into()),
                    ..Default::default()
                },
                "rls_account_key",
            ),
            (
                ServeArgs {
                    rls_item_key: Some("account".into()),
                    ..Default::default()
                },
                "rls_item_key",
            ),
        ];
        for (args, field) in cases {
            assert_eq!(Config::resolve(&args).unwrap_err().field, field);
        }
    }

    #[test]
    fn errors_name_the_field() {
        let cases = [
            (
                ServeArgs {
                    flush_interval: Some("soon".into()),
                    ..Default::default()
                },
                "flush_interval",
            ),
            (
                ServeArgs {
                    listen: Some("nope".into()),
                    ..Default::default()
                },
                "listen",
            ),
            (
                ServeArgs {
                    timezone: Some("Mars/Base".into()),
                    ..Default::default()
                },
                "timezone",
            ),
            (
                ServeArgs {
                    late_grace: Some("2h".into()),
                    dedup_window: Some("1h".into()),
                    ..Default::default()
                },
                "dedup_window",
            ),
            (
                ServeArgs {
                    store: Some("redis://x".into()),
                    ..Default::default()
                },
                "store",
            ),
            (
                ServeArgs {
                    unknown_accounts: Some("maybe".into()),
                    ..Default::default()
                },
                "unknown_accounts",
            ),
            (
                ServeArgs {
                    max_calls: Some("0".into()),
                    ..Default::default()
                },
                "max_calls",
            ),
        ];
        for (args, field) in cases {
            assert_eq!(Config::resolve(&args).unwrap_err().field, field);
        }
    }

    #[test]
    fn the_file_fills_what_flags_leave_out_and_refuses_unknown_keys() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pm.toml");
        std::fs::write(
            &path,
            "flush_interval = \"250ms\"\nlate_grace = \"2h\"\ntimezone = \"UTC\"\n",
        )
        .unwrap();
        let args = ServeArgs {
            config: Some(path.clone()),
            late_grace: Some("30m".into()),
            ..Default::default()
        };
        let c = Config::resolve(&args).unwrap();
        assert_eq!(c.flush_interval, Duration::from_millis(250));
        assert_eq!(c.meter.late_grace, 30 * 60 * 1_000_000);
        assert_eq!(c.meter.zone.to_string(), "UTC");

        std::fs::write(&path, "flush_intervall = \"1s\"\n").unwrap();
        let e = Config::resolve(&ServeArgs {
            config: Some(path),
            ..Default::default()
        })
        .unwrap_err();
        assert_eq!(e.field, "config");
        assert!(e.message.contains("flush_intervall"), "{}", e.message);
    }

    /// Every string field of [`ServeArgs`], by the name errors give it.
    const STRING_FIELDS: [&str; 30] = [
        "durability",
        "max_stream_in_flight",
        "tls_cert_file",
        "tls_key_file",
        "tls_client_ca_file",
        "admin_token_file",
        "max_message_bytes",
        "max_concurrent_streams",
        "max_export_range",
        "listen",
        "admin_listen",
        "store",
        "flush_interval",
        "late_grace",
        "dedup_window",
        "timezone",
        "max_future_skew",
        "unknown_accounts",
        "shutdown_grace",
        "log_format",
        "max_calls",
        "max_egress_bytes",
        "max_batch",
        "free_calls",
        "free_egress_bytes",
        "free_months",
        "idle_evict",
        "rls_domain",
        "rls_account_key",
        "rls_item_key",
    ];

    fn slot<'a>(a: &'a mut ServeArgs, field: &str) -> &'a mut Option<String> {
        match field {
            "durability" => &mut a.durability,
            "listen" => &mut a.listen,
            "admin_listen" => &mut a.admin_listen,
            "store" => &mut a.store,
            "flush_interval" => &mut a.flush_interval,
            "late_grace" => &mut a.late_grace,
            "dedup_window" => &mut a.dedup_window,
            "timezone" => &mut a.timezone,
            "max_future_skew" => &mut a.max_future_skew,
            "unknown_accounts" => &mut a.unknown_accounts,
            "shutdown_grace" => &mut a.shutdown_grace,
            "log_format" => &mut a.log_format,
            "max_calls" => &mut a.max_calls,
            "max_egress_bytes" => &mut a.max_egress_bytes,
            "max_batch" => &mut a.max_batch,
            "free_calls" => &mut a.free_calls,
            "free_egress_bytes" => &mut a.free_egress_bytes,
            "free_months" => &mut a.free_months,
            "idle_evict" => &mut a.idle_evict,
            "rls_domain" => &mut a.rls_domain,
            "rls_account_key" => &mut a.rls_account_key,
            "rls_item_key" => &mut a.rls_item_key,
            "admin_token_file" => &mut a.admin_token_file,
            "max_message_bytes" => &mut a.max_message_bytes,
            "max_concurrent_streams" => &mut a.max_concurrent_streams,
            "max_export_range" => &mut a.max_export_range,
            "max_stream_in_flight" => &mut a.max_stream_in_flight,
            "tls_cert_file" => &mut a.tls_cert_file,
            "tls_key_file" => &mut a.tls_key_file,
            "tls_client_ca_file" => &mut a.tls_client_ca_file,
            other => panic!("no ServeArgs field {other}"),
        }
    }

    /// `ServeArgs` with only `field` set.
    fn only(field: &str, value: &str) -> ServeArgs {
        let mut args = ServeArgs::default();
        *slot(&mut args, field) = Some(value.to_string());
        args
    }

    #[test]
    fn durability_is_flush_by_default_and_a_bad_mode_names_the_field() {
        assert_eq!(
            Config::resolve(&ServeArgs::default()).unwrap().durability,
            Durability::Flush
        );
        let c = Config::resolve(&only("durability", " journal ")).unwrap();
        assert_eq!(c.durability, Durability::Journal);
        let e = Config::resolve(&only("durability", "fsync")).unwrap_err();
        assert_eq!(e.field, "durability");
        assert!(
            e.message.contains("`fsync` is not flush or journal"),
            "{}",
            e.message
        );
        // The TOML key, too.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pm.toml");
        std::fs::write(&path, "durability = \"journal\"\n").unwrap();
        let args = ServeArgs {
            config: Some(path),
            ..Default::default()
        };
        assert_eq!(
            Config::resolve(&args).unwrap().durability,
            Durability::Journal
        );
    }

    #[test]
    fn durations_that_overflow_humantime_are_refused_not_a_panic() {
        // humantime panics ("overflow in Duration::new") on each of these.
        for v in [
            "18446744073709551615s 1000000000ns",
            "18446744073709551615s 500ms 500ms",
            "18446744073709551614s 1s 999999999ns 1ns",
            "18446744073709551615 s 1000000 us",
        ] {
            let e = duration("late_grace", v).unwrap_err();
            assert_eq!(e.field, "late_grace");
            assert!(e.message.contains(v), "{}", e.message);
            assert!(e.message.contains("292271 years"), "{}", e.message);
        }
        assert_eq!(
            Config::resolve(&only(
                "shutdown_grace",
                "18446744073709551615s 1000000000ns"
            ))
            .unwrap_err()
            .field,
            "shutdown_grace"
        );
    }

    #[test]
    fn durations_are_accepted_up_to_what_the_microsecond_clock_holds() {
        let longest = humantime::format_duration(MAX_DURATION).to_string();
        assert_eq!(duration("late_grace", &longest), Ok(MAX_DURATION));
        let c = Config::resolve(&ServeArgs {
            late_grace: Some(longest),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(c.meter.late_grace, Ts::MAX);
        assert_eq!(c.meter.dedup_window, Ts::MAX);

        let too_long =
            humantime::format_duration(MAX_DURATION + Duration::from_micros(1)).to_string();
        let e = duration("late_grace", &too_long).unwrap_err();
        assert!(e.message.contains("longer than"), "{}", e.message);
        assert!(duration("late_grace", "300000y").is_err());
        // A large count of a small unit is still a short duration.
        assert_eq!(
            duration("late_grace", "1000000000000ns"),
            Ok(Duration::from_secs(1000))
        );
        assert_eq!(
            duration("late_grace", "1 000 000 000 000 ns"),
            Ok(Duration::from_secs(1000))
        );
    }

    #[test]
    fn per_deduction_maximums_are_capped_at_2_pow_48() {
        for field in ["max_calls", "max_egress_bytes"] {
            let c = Config::resolve(&only(field, &(1u64 << 48).to_string())).unwrap();
            assert_eq!(c.meter.max_calls.max(c.meter.max_egress_bytes), 1 << 48);
            for over in [
                "281474976710657",
                "9223372036854775807",
                "18446744073709551615",
            ] {
                let e = Config::resolve(&only(field, over)).unwrap_err();
                assert_eq!(e.field, field);
                assert!(
                    e.message.contains("281474976710656 (2^48)"),
                    "{}",
                    e.message
                );
            }
        }
    }

    #[test]
    fn amounts_above_i64_max_are_refused_because_the_stores_keep_signed_64_bit() {
        let max = i64::MAX.to_string();
        for field in ["free_calls", "free_egress_bytes"] {
            let c = Config::resolve(&only(field, &max)).unwrap();
            let got = match field {
                "free_calls" => c.meter.plan.calls,
                _ => c.meter.plan.egress_bytes,
            };
            assert_eq!(got, i64::MAX as u64, "{field}");
            for over in [
                "9223372036854775808",
                "9_223_372_036_854_775_808",
                "18446744073709551615",
            ] {
                let e = Config::resolve(&only(field, over)).unwrap_err();
                assert_eq!(e.field, field);
                assert!(
                    e.message.contains("signed 64-bit") && e.message.contains(&max),
                    "{}",
                    e.message
                );
            }
        }
        let e = Config::resolve(&only("max_batch", "18446744073709551616")).unwrap_err();
        assert_eq!(e.field, "max_batch");
        assert!(
            e.message.contains("larger than 18446744073709551615"),
            "{}",
            e.message
        );
    }

    #[test]
    fn store_urls_are_checked_before_anything_is_opened() {
        assert_eq!(crate::store::sqlite_path("sqlite://./pm.db"), Ok("./pm.db"));
        for (url, says) in [
            ("redis://x", "use sqlite://PATH or postgres://"),
            ("SQLITE://x", "use sqlite://PATH"),
            ("", "use sqlite://PATH"),
            ("sqlite://", "needs a file path"),
            ("sqlite://pm\0.db", "NUL"),
            (
                "postgres://pm@db/x?sslmode=sometimes",
                "sslmode `sometimes`",
            ),
            ("postgresql://db/x", "needs a user"),
        ] {
            let e = Config::resolve(&only("store", url)).unwrap_err();
            assert_eq!(e.field, "store");
            assert!(e.message.contains(says), "{url:?}: {}", e.message);
        }
        // Parsed once; shown without the password.
        let c = Config::resolve(&only("store", "postgres://pm:hunter2@db:5433/bill")).unwrap();
        assert_eq!(c.store.to_string(), "postgres://pm:***@db:5433/bill");
        let e = Config::resolve(&only("store", "mysql://pm:hunter2@db/x")).unwrap_err();
        assert!(!e.message.contains("hunter2"), "{}", e.message);
    }

    #[test]
    fn the_admin_token_file_and_the_limits_are_checked_and_named() {
        let c = Config::resolve(&ServeArgs::default()).unwrap();
        assert_eq!(c.admin_token_file, None);
        assert_eq!(c.limits.max_message_bytes, 4 << 20);
        assert_eq!(c.limits.max_concurrent_streams, 1024);
        assert_eq!(c.limits.max_export_range, 731 * 86_400 * 1_000_000);

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens");
        let p = path.to_str().unwrap();
        for (text, says) in [
            ("# only a comment\n\n", "no token"),
            ("two words\n", "whitespace"),
        ] {
            std::fs::write(&path, text).unwrap();
            let e = Config::resolve(&only("admin_token_file", p)).unwrap_err();
            assert_eq!(e.field, "admin_token_file");
            assert!(e.message.contains(says), "{}", e.message);
        }
        let e = Config::resolve(&only("admin_token_file", "/nonexistent/tokens")).unwrap_err();
        assert_eq!(e.field, "admin_token_file");
        std::fs::write(&path, "t0ken\n").unwrap();
        let c = Config::resolve(&only("admin_token_file", p)).unwrap();
        assert_eq!(c.admin_token_file.as_deref(), Some(path.as_path()));

        for (field, v) in [
            ("max_message_bytes", "0"),
            ("max_message_bytes", "2000000000"),
            ("max_concurrent_streams", "0"),
            ("max_concurrent_streams", "5000000000"),
            ("max_export_range", "10m"),
        ] {
            assert_eq!(Config::resolve(&only(field, v)).unwrap_err().field, field);
        }
    }

    #[test]
    fn an_account_key_equal_to_the_default_item_key_names_rls_account_key() {
        let e = Config::resolve(&only("rls_account_key", "item")).unwrap_err();
        assert_eq!(e.field, "rls_account_key");
        assert!(e.message.contains("must differ"), "{}", e.message);
    }

    #[test]
    fn a_toml_value_of_the_wrong_type_names_its_key_and_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pm.toml");
        std::fs::write(&path, "timezone = \"UTC\"\nmax_calls = -5\n").unwrap();
        let e = Config::resolve(&ServeArgs {
            config: Some(path),
            ..Default::default()
        })
        .unwrap_err();
        assert_eq!(e.field, "max_calls");
        assert!(
            e.message.contains("pm.toml line 2 (`max_calls = -5`)"),
            "{}",
            e.message
        );
    }

    /// Issue 15 item 10: each of these named no field before.
    #[test]
    fn every_toml_error_names_its_key_the_file_and_the_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pm.toml");
        for (text, field, line, says) in [
            (
                "listen = 5\n",
                "listen",
                "line 1 (`listen = 5`)",
                "expected a string",
            ),
            (
                "store = \"sqlite://x.db\"\ntimezone = 8\n",
                "timezone",
                "line 2 (`timezone = 8`)",
                "found integer `8`",
            ),
            ("free_calls = -1\n", "free_calls", "line 1", "negative"),
            (
                "max_batch = \"10\"\n",
                "max_batch",
                "line 1",
                "expected a whole number",
            ),
            (
                "late_grace = \"1h\"\nlate_grace = \"2h\"\n",
                "late_grace",
                "line 2 (`late_grace = \\\"2h\\\"`)",
                "duplicate key",
            ),
            (
                "max_calls = 99999999999999999999\n",
                "max_calls",
                "line 1",
                "",
            ),
            (
                "[listen]\nport = 1\n",
                "listen",
                "line 1 (`[listen]`)",
                "found table",
            ),
            ("lisen = \"x\"\n", "config", "line 1", "unknown key `lisen`"),
            ("listen = \n", "listen", "line 1", ""),
        ] {
            std::fs::write(&path, text).unwrap();
            let e = Config::resolve(&ServeArgs {
                config: Some(path.clone()),
                ..Default::default()
            })
            .unwrap_err();
            assert_eq!(e.field, field, "{text:?}: {e}");
            for part in [path.display().to_string().as_str(), line, says] {
                assert!(e.message.contains(part), "{text:?}: {part:?} not in {e}");
            }
        }
    }

    /// Any string: arbitrary chars (controls, NUL, every plane) as well as
    /// proptest's printable strings.
    fn any_text() -> BoxedStrategy<String> {
        prop_oneof![
            any::<String>(),
            prop::collection::vec(any::<char>(), 0..12).prop_map(String::from_iter),
        ]
        .boxed()
    }

    /// Strings near humantime's grammar: numbers (small, huge, fractional),
    /// units (real, unknown, arbitrary chars) and separators.
    fn near_duration() -> BoxedStrategy<String> {
        let number = prop_oneof![
            "[0-9]{1,3}",
            "[0-9]{12,21}",
            Just(u64::MAX.to_string()),
            "[0-9]{1,4}\\.[0-9]{1,12}",
            Just(String::new()),
        ];
        let unit = prop_oneof![
            prop::sample::select(vec![
                "ns", "us", "µs", "ms", "s", "m", "min", "h", "d", "w", "M", "y", "years",
                "nights", "",
            ])
            .prop_map(String::from),
            any::<char>().prop_map(String::from),
        ];
        let sep = prop::sample::select(vec!["", " ", "  ", "\t", "é", "\u{a0}"]);
        prop::collection::vec((number, sep.clone(), unit, sep), 1..5)
            .prop_map(|parts| {
                parts
                    .into_iter()
                    .map(|(n, a, u, b)| format!("{n}{a}{u}{b}"))
                    .collect()
            })
            .boxed()
    }

    /// Totals of u64::MAX seconds whose nanoseconds sum to about one second:
    /// exactly the inputs on which humantime panics.
    fn overflowing_duration() -> BoxedStrategy<String> {
        (0..3u64, 0..=1_000_000_000u64, 0..3u64)
            .prop_map(|(k, a, jitter)| {
                let b = 1_000_000_000 - a + jitter;
                format!("{}s {k}s {a}ns {}ns", u64::MAX - k, b.saturating_sub(1))
            })
            .boxed()
    }

    fn near_number() -> BoxedStrategy<String> {
        prop_oneof![
            "[+-]?[0-9_]{0,25}",
            " ?[0-9]{1,20} ?",
            prop::sample::select(vec![
                "0".to_string(),
                "-1".into(),
                "1201".into(),
                i64::MAX.to_string(),
                (i64::MAX as u64 + 1).to_string(),
                u64::MAX.to_string(),
                "18446744073709551616".into(),
            ]),
        ]
        .boxed()
    }

    fn near_addr() -> BoxedStrategy<String> {
        prop_oneof![
            "[0-9]{1,3}(\\.[0-9]{1,3}){0,4}(:[0-9]{0,6})?",
            "\\[[0-9a-fA-F:%.é]{0,12}\\](:[0-9]{0,6})?",
            "(localhost|é|[a-z]{1,5}|127\\.0\\.0\\.1):.{0,6}",
        ]
        .boxed()
    }

    fn near_zone() -> BoxedStrategy<String> {
        prop_oneof![
            "[ ]?[+-][0-9:]{0,6}",
            "[+-][0-9]{0,2}:?.{0,3}",
            "[A-Za-z_/+-]{0,20}",
            prop::sample::select(vec!["Asia/Shanghai", "UTC", "Z", "z", "+08:00", "-23:59"])
                .prop_map(String::from),
        ]
        .boxed()
    }

    fn near_store() -> BoxedStrategy<String> {
        prop_oneof![
            "(sqlite://)?.{0,12}",
            (".{0,5}", ".{0,5}").prop_map(|(a, b)| format!("sqlite://{a}\0{b}")),
            "[a-zA-Z]{0,8}:/{0,3}.{0,8}",
            "postgres(ql)?://([a-z:%@]{0,6}@)?[a-z0-9.:/\\[\\]]{0,12}(\\?[a-z_]{0,12}=[a-z0-9%/-]{0,8}){0,2}",
        ]
        .boxed()
    }

    fn near_word() -> BoxedStrategy<String> {
        let word = prop::sample::select(vec![
            "activate", "reject", "text", "json", "account", "item", "flush", "journal", "",
        ]);
        prop_oneof![
            word.clone().prop_map(String::from),
            (word.clone(), any::<char>()).prop_map(|(w, c)| format!("{w}{c}")),
            word.prop_map(|w| format!(" {} ", w.to_uppercase())),
        ]
        .boxed()
    }

    /// Values for `field`: any string, or one near what the field accepts.
    fn value_for(field: &str) -> BoxedStrategy<String> {
        let near = match field {
            "listen" | "admin_listen" => near_addr(),
            "store" => near_store(),
            "timezone" => near_zone(),
            "max_calls"
            | "max_egress_bytes"
            | "max_batch"
            | "free_calls"
            | "free_egress_bytes"
            | "free_months"
            | "max_message_bytes"
            | "max_stream_in_flight"
            | "max_concurrent_streams" => near_number(),
            "unknown_accounts" | "log_format" | "rls_domain" | "rls_account_key"
            | "rls_item_key" | "durability" => near_word(),
            _ => prop_oneof![near_duration(), overflowing_duration()].boxed(),
        };
        prop_oneof![any_text(), near].boxed()
    }

    fn field_and_value() -> impl Strategy<Value = (&'static str, String)> {
        prop::sample::select(STRING_FIELDS.to_vec())
            .prop_flat_map(|field| (Just(field), value_for(field)))
    }

    /// A parser's error must name the field it was given and quote the value.
    fn check_error(e: &ConfigError, field: &str, v: &str) -> Result<(), TestCaseError> {
        prop_assert_eq!(e.field, field);
        prop_assert!(e.message.contains(v), "{:?} not quoted in {}", v, e.message);
        Ok(())
    }

    /// TOML basic-string escaping, for writing arbitrary values into a file.
    fn toml_string(v: &str) -> String {
        let mut out = String::from("\"");
        for c in v.chars() {
            match c {
                '"' => out.push_str("\\\""),
                '\\' => out.push_str("\\\\"),
                c if c.is_control() => out.push_str(&format!("\\u{:04X}", c as u32)),
                c => out.push(c),
            }
        }
        out.push('"');
        out
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(4096))]

        #[test]
        fn duration_parsing_never_panics(
            v in prop_oneof![any_text(), near_duration(), overflowing_duration()],
        ) {
            match duration("idle_evict", &v) {
                Ok(d) => {
                    prop_assert!(d <= MAX_DURATION);
                    // The guard refuses nothing humantime would have read.
                    prop_assert_eq!(humantime::parse_duration(v.trim()), Ok(d));
                }
                Err(e) => check_error(&e, "idle_evict", &v)?,
            }
            // The guard's bound really bounds what humantime adds up; below
            // u64::MAX, humantime is safe to call.
            let bound = duration_bound_secs(v.trim());
            if bound < u128::from(u64::MAX) {
                if let Ok(d) = humantime::parse_duration(v.trim()) {
                    prop_assert!(u128::from(d.as_secs()) <= bound, "{} > {}", d.as_secs(), bound);
                }
            }
        }

        #[test]
        fn number_parsing_never_panics(v in prop_oneof![any_text(), near_number()]) {
            match number("max_batch", &v) {
                Ok(n) => prop_assert_eq!(Ok(n), v.trim().replace('_', "").parse::<u64>()),
                Err(e) => check_error(&e, "max_batch", &v)?,
            }
        }

        #[test]
        fn amounts_are_refused_exactly_above_i64_max(
            n in prop_oneof![
                any::<u64>(),
                (i64::MAX as u64 - 2)..=(i64::MAX as u64 + 2),
            ],
        ) {
            match amount("free_calls", n) {
                Ok(m) => prop_assert!(m == n && n <= i64::MAX as u64),
                Err(e) => {
                    prop_assert!(n > i64::MAX as u64);
                    check_error(&e, "free_calls", &n.to_string())?;
                }
            }
        }

        #[test]
        fn address_parsing_never_panics(v in prop_oneof![any_text(), near_addr()]) {
            match addr("admin_listen", &v) {
                Ok(a) => prop_assert_eq!(a.to_string().parse::<SocketAddr>(), Ok(a)),
                Err(e) => check_error(&e, "admin_listen", &v)?,
            }
        }

        #[test]
        fn store_url_parsing_never_panics(v in prop_oneof![any_text(), near_store()]) {
            match crate::store::StoreUrl::parse(&v) {
                Ok(url) => {
                    if let Ok(path) = crate::store::sqlite_path(&v) {
                        prop_assert!(!path.is_empty() && !path.contains('\0'));
                        prop_assert_eq!(format!("sqlite://{path}"), v.clone());
                        prop_assert_eq!(url.to_string(), v.clone());
                    }
                    prop_assert_eq!(
                        Config::resolve(&only("store", &v)).unwrap().store.to_string(),
                        url.to_string()
                    );
                }
                Err(refused) => {
                    let e = Config::resolve(&only("store", &v)).unwrap_err();
                    prop_assert_eq!(e.field, "store");
                    prop_assert_eq!(e.message, refused.0);
                }
            }
        }

        #[test]
        fn zone_setting_never_panics(v in prop_oneof![any_text(), near_zone()]) {
            match Config::resolve(&only("timezone", &v)) {
                Ok(c) => prop_assert_eq!(Ok(c.meter.zone), v.parse::<BillingZone>()),
                Err(e) => check_error(&e, "timezone", &v)?,
            }
        }

        #[test]
        fn resolve_names_the_field_that_was_given_a_bad_value(
            (field, v) in field_and_value(),
        ) {
            if let Err(e) = Config::resolve(&only(field, &v)) {
                prop_assert_eq!(e.field, field, "{:?}: {}", v, e.message);
            }
        }
    }

    proptest! {
        // Each case writes a file.
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn the_toml_file_names_the_field_of_a_bad_value(
            (field, v) in field_and_value(),
            n in prop_oneof![any::<i64>(), -2..1_300i64],
            raw in any_text(),
        ) {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("pm.toml");
            let resolve = |text: &str| {
                std::fs::write(&path, text).unwrap();
                Config::resolve(&ServeArgs { config: Some(path.clone()), ..Default::default() })
            };
            // Number keys are TOML integers in the file; the rest are strings.
            let numeric = matches!(
                field,
                "max_calls" | "max_egress_bytes" | "max_batch" | "free_calls"
                    | "free_egress_bytes" | "free_months" | "max_message_bytes"
                    | "max_concurrent_streams" | "max_stream_in_flight"
            );
            let line = if numeric {
                format!("{field} = {n}\n")
            } else {
                format!("{field} = {}\n", toml_string(&v))
            };
            if let Err(e) = resolve(&line) {
                // A negative number included: the TOML reader names the key.
                prop_assert_eq!(e.field, field, "{}: {}", line, e.message);
            }
            // Arbitrary file contents: a config, or an error about the file
            // or about a setting, never a panic.
            if let Err(e) = resolve(&raw) {
                prop_assert!(
                    e.field == "config" || STRING_FIELDS.contains(&e.field),
                    "{:?}: {}",
                    raw,
                    e
                );
            }
        }
    }
}
