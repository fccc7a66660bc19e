//! `serve`'s configuration: flags, `PACKMETER_*` variables and an optional
//! TOML file, parsed and validated into a typed [`Config`] before any socket
//! is bound.
//!
//! Each setting is declared once, as a field of [`Settings`]: its name is
//! the TOML key, with `-` for `_` the flag (`--late-grace`), and in upper
//! case after `PACKMETER_` the variable (`PACKMETER_LATE_GRACE`, see
//! [`with_env`]). [`Config::resolve`] then validates it into [`Config`].
//!
//! Precedence: flag, then environment variable (clap reads both), then the
//! file, then the default. Every error names the field it is about; `main`
//! turns it into exit code 64 (`EX_USAGE`).
//!
//! # Adding a setting
//!
//! 1. Add a field `pub my_setting: Option<Text>` (or `Option<Number>` for a
//!    whole number, a TOML integer in the file) to [`Settings`], with a doc
//!    comment (its `--help`) and `#[cfg_attr(feature = "cli", arg(long,
//!    value_name = "..."))]`. That gives `--my-setting`,
//!    `PACKMETER_MY_SETTING` and the TOML key `my_setting`.
//! 2. Read and validate it in [`Config::resolve`] (`s.my_setting.as_deref()`,
//!    errors named `"my_setting"`) into a field of [`Config`].
//! 3. Add its row to the README's configuration table.

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

/// `packmeter serve`'s arguments: the file, the settings, and `--noop`.
#[derive(Debug, Default, Clone)]
#[cfg_attr(feature = "cli", derive(clap::Args))]
pub struct ServeArgs {
    /// TOML file with any of the settings below (keys are the flag names with `_`).
    // Not a TOML key itself.
    #[cfg_attr(feature = "cli", arg(long, value_name = "FILE"))]
    pub config: Option<PathBuf>,
    #[cfg_attr(feature = "cli", command(flatten))]
    pub settings: Settings,
    /// Benchmark baseline: answer every Meter and Envoy rate-limit RPC with a
    /// fixed response, without touching the meter. Never for production.
    // Deliberately not a TOML key: a baseline switch left in a config file
    // would silently stop metering.
    #[cfg_attr(feature = "cli", arg(long))]
    pub noop: bool,
}

/// Every setting of `packmeter serve`, declared once: the field's name is
/// the TOML key, its flag (`_` as `-`) and its variable (`PACKMETER_` and
/// the name in upper case, see [`with_env`]); the doc comment is its
/// `--help`. Each is optional, as given: the flags and variables (clap),
/// and the file (serde, unknown keys refused), are merged field by field
/// ([`merge::Merge`]: what the command line leaves unset, the file fills),
/// and [`Config::resolve`] validates the result and fills in the defaults.
#[derive(Debug, Default, Clone, PartialEq, Eq, serde::Deserialize, merge::Merge)]
#[cfg_attr(feature = "cli", derive(clap::Args))]
#[serde(deny_unknown_fields)]
#[merge(strategy = merge::option::overwrite_none)]
pub struct Settings {
    /// gRPC listen address [default: 127.0.0.1:50051].
    #[cfg_attr(feature = "cli", arg(long, value_name = "ADDR"))]
    pub listen: Option<Text>,
    /// Admin HTTP listen address: /livez, /readyz, /metrics, /packs [default: 127.0.0.1:9090].
    #[cfg_attr(feature = "cli", arg(long, value_name = "ADDR"))]
    pub admin_listen: Option<Text>,
    /// Store URL: sqlite://PATH, or postgres://USER:PASSWORD@HOST:PORT/DATABASE?sslmode=MODE
    /// to share one store among nodes (docs/stores.md) [default: a SQLite file under
    /// $XDG_DATA_HOME/packmeter].
    #[cfg_attr(feature = "cli", arg(long, value_name = "URL"))]
    pub store: Option<Text>,
    /// How often usage is flushed to the store [default: 1s].
    #[cfg_attr(feature = "cli", arg(long, value_name = "DURATION"))]
    pub flush_interval: Option<Text>,
    /// How old unflushed usage may get before the flush, which runs at a
    /// lower priority than the calls, runs at theirs until it has caught up
    /// (on a core that calls keep saturated); `off` keeps it low, and a
    /// crash may then lose more than this [default: 3 times --flush-interval].
    #[cfg_attr(feature = "cli", arg(long, value_name = "DURATION|off"))]
    pub flush_max_lag: Option<Text>,
    /// How long after an hour ends late events are still accepted (R9) [default: 1h].
    #[cfg_attr(feature = "cli", arg(long, value_name = "DURATION"))]
    pub late_grace: Option<Text>,
    /// How long a request_id is remembered (R10); at least --late-grace and
    /// at least 1m [default: --late-grace].
    #[cfg_attr(feature = "cli", arg(long, value_name = "DURATION"))]
    pub dedup_window: Option<Text>,
    /// Billing time zone: a UTC offset like +08:00 or an IANA name [default: +08:00].
    // A negative offset (`--timezone -05:00`) is a value, not a flag.
    #[cfg_attr(
        feature = "cli",
        arg(long, value_name = "TZ", allow_hyphen_values = true)
    )]
    pub timezone: Option<Text>,
    /// How far ahead of the server clock `at` may be [default: 5m].
    #[cfg_attr(feature = "cli", arg(long, value_name = "DURATION"))]
    pub max_future_skew: Option<Text>,
    /// What to do with unknown accounts: activate or reject [default: activate].
    #[cfg_attr(feature = "cli", arg(long, value_name = "MODE"))]
    pub unknown_accounts: Option<Text>,
    /// Strict mode for deny accounts (leases in the shared store): auto, on
    /// or off [default: auto, on for postgres://, off for sqlite://].
    #[cfg_attr(feature = "cli", arg(long, value_name = "MODE"))]
    pub strict_deny: Option<Text>,
    /// How long a strict-mode lease lasts without renewal [default: 10s].
    #[cfg_attr(feature = "cli", arg(long, value_name = "DURATION"))]
    pub lease_ttl: Option<Text>,
    /// What a deny account gets while the store is unreachable and its
    /// lease is spent: deny or allow [default: deny].
    #[cfg_attr(feature = "cli", arg(long, value_name = "MODE"))]
    pub lease_outage: Option<Text>,
    /// What a SIGKILL may lose: flush (up to about one flush interval of
    /// usage, more on a core saturated by calls: README) or journal (nothing
    /// acknowledged: each deduction is synced to a local journal before it
    /// is answered) [default: flush].
    #[cfg_attr(feature = "cli", arg(long, value_name = "MODE"))]
    pub durability: Option<Text>,
    /// Time allowed after SIGTERM to drain requests and flush [default: 20s].
    #[cfg_attr(feature = "cli", arg(long, value_name = "DURATION"))]
    pub shutdown_grace: Option<Text>,
    /// Log format: text or json [default: text]. The level comes from RUST_LOG.
    #[cfg_attr(feature = "cli", arg(long, value_name = "FORMAT"))]
    pub log_format: Option<Text>,
    /// Most calls one deduction may carry, at most 2^48 [default: 1000000000].
    #[cfg_attr(feature = "cli", arg(long, value_name = "N"))]
    pub max_calls: Option<Number>,
    /// Most egress bytes one deduction may carry, at most 2^48 [default: 1099511627776, 1 TiB].
    #[cfg_attr(feature = "cli", arg(long, value_name = "N"))]
    pub max_egress_bytes: Option<Number>,
    /// Most deductions in one DeductBatch [default: 10000].
    #[cfg_attr(feature = "cli", arg(long, value_name = "N"))]
    pub max_batch: Option<Number>,
    /// Free-tier calls per month [default: 1000000].
    #[cfg_attr(feature = "cli", arg(long, value_name = "N"))]
    pub free_calls: Option<Number>,
    /// Free-tier egress bytes per month [default: 1073741824, 1 GiB].
    #[cfg_attr(feature = "cli", arg(long, value_name = "N"))]
    pub free_egress_bytes: Option<Number>,
    /// Length of the free window in calendar months [default: 12].
    #[cfg_attr(feature = "cli", arg(long, value_name = "N"))]
    pub free_months: Option<Number>,
    /// Plans file (R8): one TOML `[[plan]]` table per version of the free
    /// tier, with name, effective, months, calls, egress_bytes and
    /// optionally zone. Replaces --free-calls, --free-egress-bytes and
    /// --free-months [default: none, one plan from those settings].
    #[cfg_attr(feature = "cli", arg(long, value_name = "FILE"))]
    pub plans: Option<Text>,
    /// Accounts idle this long, with nothing unflushed, leave memory [default: 15m].
    #[cfg_attr(feature = "cli", arg(long, value_name = "DURATION"))]
    pub idle_evict: Option<Text>,
    /// Envoy rate-limit requests must name this domain [default: any domain].
    #[cfg_attr(feature = "cli", arg(long, value_name = "DOMAIN"))]
    pub rls_domain: Option<Text>,
    /// Envoy descriptor entry key that names the account [default: account].
    #[cfg_attr(feature = "cli", arg(long, value_name = "KEY"))]
    pub rls_account_key: Option<Text>,
    /// Envoy descriptor entry key that names the item, calls or egress_bytes;
    /// calls when the entry is absent [default: item].
    #[cfg_attr(feature = "cli", arg(long, value_name = "KEY"))]
    pub rls_item_key: Option<Text>,
    /// File of admin bearer tokens, one a line (blank lines and # comments
    /// ignored), re-read when it changes. With it, every Admin RPC and the
    /// pack page need `authorization: Bearer TOKEN`; without it they are
    /// served to loopback peers only [default: none, loopback only].
    #[cfg_attr(feature = "cli", arg(long, value_name = "FILE"))]
    pub admin_token_file: Option<Text>,
    /// Largest gRPC message accepted, in bytes; a larger one gets
    /// OUT_OF_RANGE [default: 4194304, 4 MiB].
    #[cfg_attr(feature = "cli", arg(long, value_name = "N"))]
    pub max_message_bytes: Option<Number>,
    /// Most concurrent gRPC streams (calls) on one connection, advertised
    /// in HTTP/2 SETTINGS; clients queue calls beyond it [default: 1024].
    #[cfg_attr(feature = "cli", arg(long, value_name = "N"))]
    pub max_concurrent_streams: Option<Number>,
    /// Longest `to - from` range one ExportUsage may ask for [default: 731d].
    #[cfg_attr(feature = "cli", arg(long, value_name = "DURATION"))]
    pub max_export_range: Option<Text>,
    /// Most messages in flight on one DeductStream: received by the server
    /// and not yet answered. A client that sends more before reading the
    /// replies gets the replies of those in flight, then RESOURCE_EXHAUSTED
    /// [default: 256].
    #[cfg_attr(feature = "cli", arg(long, value_name = "N"))]
    pub max_stream_in_flight: Option<Number>,
    /// PEM certificate chain for TLS on the gRPC port (Meter, Admin, Envoy
    /// RLS, health), with --tls-key-file; re-read when it changes. The admin
    /// HTTP port stays plaintext [default: none, plaintext gRPC].
    #[cfg_attr(feature = "cli", arg(long, value_name = "FILE"))]
    pub tls_cert_file: Option<Text>,
    /// PEM private key of --tls-cert-file; re-read when it changes.
    #[cfg_attr(feature = "cli", arg(long, value_name = "FILE"))]
    pub tls_key_file: Option<Text>,
    /// PEM CA certificates for client authentication (mTLS): a client
    /// without a certificate chaining to one of them is refused. Needs
    /// --tls-cert-file; re-read when it changes [default: none, any client].
    #[cfg_attr(feature = "cli", arg(long, value_name = "FILE"))]
    pub tls_client_ca_file: Option<Text>,
}

/// A text setting as given: a flag's or variable's value, or a TOML string
/// (anything else in the file is refused, naming the key).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Text(pub String);

/// A whole-number setting as given: a flag's or variable's text, read when
/// the configuration is resolved (so its error names the field), or a TOML
/// integer from 0 (a string, a fraction or a negative number in the file is
/// refused, naming the key).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Number(pub String);

impl std::ops::Deref for Text {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl std::ops::Deref for Number {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

// clap reads a flag's or variable's value through `From<String>`.
impl From<String> for Text {
    fn from(v: String) -> Self {
        Text(v)
    }
}

impl From<String> for Number {
    fn from(v: String) -> Self {
        Number(v)
    }
}

impl<'de> serde::Deserialize<'de> for Text {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match toml::Value::deserialize(d)? {
            toml::Value::String(v) => Ok(Text(v)),
            other => Err(serde::de::Error::custom(format!(
                "expected a string in quotes, found {} `{other}`",
                other.type_str()
            ))),
        }
    }
}

impl<'de> serde::Deserialize<'de> for Number {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match toml::Value::deserialize(d)? {
            toml::Value::Integer(v) if v < 0 => Err(serde::de::Error::custom(format!(
                "{v} is negative; use a whole number from 0"
            ))),
            toml::Value::Integer(v) => Ok(Number(v.to_string())),
            other => Err(serde::de::Error::custom(format!(
                "expected a whole number, found {} `{other}`",
                other.type_str()
            ))),
        }
    }
}

impl Settings {
    /// Every setting's name: the TOML keys, from the struct's serde fields.
    pub fn keys() -> &'static [&'static str] {
        serde_aux::serde_introspection::serde_introspect::<Settings>()
    }

    /// Reads and checks a TOML file. Every error names a key as its field
    /// when one is at fault (a value of the wrong type, a repeated key, a
    /// number TOML cannot hold), else `config`, and says `FILE line N`.
    fn read(path: &Path) -> Result<Settings, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| err("config", format!("cannot read {}: {e}", path.display())))?;
        let at = |span: Option<std::ops::Range<usize>>| -> String {
            format!("{}{}", path.display(), toml_line(&text, span))
        };
        let key = |k: &str| Self::keys().iter().copied().find(|key| *key == k);
        let table: std::collections::BTreeMap<toml::Spanned<String>, toml::Spanned<toml::Value>> =
            toml::from_str(&text).map_err(|e| {
                // A syntax error or a repeated key: name the key of the
                // line it is on, if that is one of ours.
                let field = key_on_line(&text, e.span())
                    .and_then(key)
                    .unwrap_or("config");
                err(
                    field,
                    format!("{}: {}", at(e.span()), e.message().trim_end()),
                )
            })?;
        let mut file = toml::Table::new();
        for (k, value) in table {
            let Some(field) = key(k.get_ref()) else {
                return Err(err(
                    "config",
                    format!(
                        "{}: unknown key `{}`; the keys are {}",
                        at(Some(k.span())),
                        k.get_ref().escape_debug(),
                        Self::keys().join(", ")
                    ),
                ));
            };
            // Each key on its own, so that its error names it and its line.
            let place = at(Some(value.span()));
            let one = toml::Table::from_iter([(field.to_string(), value.into_inner())]);
            <Settings as serde::Deserialize>::deserialize(toml::Value::Table(one.clone()))
                .map_err(|e| err(field, format!("{place}: {}", e.message())))?;
            file.extend(one);
        }
        <Settings as serde::Deserialize>::deserialize(toml::Value::Table(file))
            .map_err(|e| err("config", format!("{}: {}", path.display(), e.message())))
    }
}

/// Names each `serve` argument's variable after it: `PACKMETER_` and the
/// argument's name in upper case (`--late-grace`: `PACKMETER_LATE_GRACE`).
/// clap then reads a flag first, else its variable.
#[cfg(feature = "cli")]
pub fn with_env(serve: clap::Command) -> clap::Command {
    serve.mut_args(|arg| {
        let env = format!("PACKMETER_{}", arg.get_id().as_str().to_uppercase());
        arg.env(env)
    })
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
    /// `--flush-max-lag`; `None`: off. See
    /// [`crate::flush::Flusher::set_late_after`].
    pub flush_max_lag: Option<Duration>,
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
    s: &Settings,
    zone: BillingZone,
) -> Result<Option<std::sync::Arc<crate::plans::LivePlans>>, ConfigError> {
    let Some(path) = given(&s.plans) else {
        return Ok(None);
    };
    for (field, given) in [
        ("free_calls", s.free_calls.is_some()),
        ("free_egress_bytes", s.free_egress_bytes.is_some()),
        ("free_months", s.free_months.is_some()),
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
            .and_then(|p| Settings::read(p).ok())
            .and_then(|f| f.log_format)
    };
    match args
        .settings
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

/// A setting's value as given, if it was.
fn given<T: std::ops::Deref<Target = str>>(v: &Option<T>) -> Option<String> {
    v.as_deref().map(str::to_string)
}

impl Config {
    /// Merges flags, environment and the TOML file, then validates.
    pub fn resolve(args: &ServeArgs) -> Result<Config, ConfigError> {
        use merge::Merge;
        // A flag or variable (already in `args`) wins over the file.
        let mut s = args.settings.clone();
        if let Some(path) = &args.config {
            s.merge(Settings::read(path)?);
        }
        // A duration or whole-number setting: as given, else the default.
        let duration_of = |field: &'static str,
                           v: &Option<Text>,
                           default: Duration|
         -> Result<Duration, ConfigError> {
            v.as_deref().map_or(Ok(default), |v| duration(field, v))
        };
        let number_of =
            |field: &'static str, v: &Option<Number>, default: u64| -> Result<u64, ConfigError> {
                v.as_deref().map_or(Ok(default), |v| number(field, v))
            };

        let listen = addr("listen", &given(&s.listen).unwrap_or(DEFAULT_LISTEN.into()))?;
        let admin_listen = addr(
            "admin_listen",
            &given(&s.admin_listen).unwrap_or(DEFAULT_ADMIN_LISTEN.into()),
        )?;
        if listen.port() != 0 && same_socket(listen, admin_listen) {
            // Name the one that was set: with only --listen given, the
            // clash is with admin_listen's default.
            let admin_given = given(&s.admin_listen).is_some();
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
        let store_given = given(&s.store);
        let create_store_dir = store_given.is_none();
        let store = store_given.unwrap_or_else(default_store_url);
        let store = StoreUrl::parse(&store).map_err(|e| err("store", e.0))?;

        let shared_store = match store {
            #[cfg(feature = "postgres")]
            StoreUrl::Postgres(_) => true,
            #[allow(unreachable_patterns)]
            _ => false,
        };
        let flush_interval =
            duration_of("flush_interval", &s.flush_interval, Duration::from_secs(1))?;
        if flush_interval.is_zero() || flush_interval > Duration::from_secs(3600) {
            return Err(err("flush_interval", "must be more than 0 and at most 1h"));
        }
        let flush_max_lag = match given(&s.flush_max_lag).as_deref().map(str::trim) {
            None => Some(flush_interval.saturating_mul(crate::flush::LATE_AFTER_INTERVALS)),
            Some("off") => None,
            Some(v) => {
                let lag = duration("flush_max_lag", v)?;
                if lag < flush_interval {
                    return Err(err(
                        "flush_max_lag",
                        format!(
                            "`{v}` is shorter than flush_interval ({}): the flush would always \
                             run at the calls' priority; give at least the interval, or off",
                            humantime::format_duration(flush_interval)
                        ),
                    ));
                }
                Some(lag)
            }
        };
        let durability = match given(&s.durability) {
            None => Durability::default(),
            Some(v) => v.parse().map_err(|e: String| err("durability", e))?,
        };
        let strict = match given(&s.strict_deny).as_deref().map(str::trim) {
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
        let lease_ttl = duration_of("lease_ttl", &s.lease_ttl, Duration::from_secs(10))?;
        if lease_ttl < Duration::from_millis(100) || lease_ttl > Duration::from_secs(3600) {
            return Err(err("lease_ttl", "must be at least 100ms and at most 1h"));
        }
        let outage = match given(&s.lease_outage).as_deref().map(str::trim) {
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

        let late_grace = duration_of("late_grace", &s.late_grace, Duration::from_secs(3600))?;
        let dedup_window = duration_of("dedup_window", &s.dedup_window, late_grace)?;
        if dedup_window < MIN_DEDUP_WINDOW {
            // With no dedup window an immediate retry of a request_id is
            // charged again: idempotency (R10) would be silently off.
            let given = given(&s.dedup_window).is_some();
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
            &s.max_future_skew,
            Duration::from_secs(300),
        )?;
        let zone: BillingZone = match given(&s.timezone) {
            Some(v) => v
                .parse()
                .map_err(|e: crate::calendar::InvalidZone| err("timezone", e.to_string()))?,
            None => BillingZone::default(),
        };
        let unknown_accounts = match given(&s.unknown_accounts).as_deref().map(str::trim) {
            None | Some("activate") => UnknownAccounts::Activate,
            Some("reject") => UnknownAccounts::Reject,
            Some(other) => {
                return Err(err(
                    "unknown_accounts",
                    format!("`{other}` is not activate or reject"),
                ))
            }
        };
        let shutdown_grace =
            duration_of("shutdown_grace", &s.shutdown_grace, DEFAULT_SHUTDOWN_GRACE)?;
        if shutdown_grace < Duration::from_secs(1) {
            return Err(err(
                "shutdown_grace",
                "must be at least 1s to drain and flush",
            ));
        }
        let idle_evict = duration_of("idle_evict", &s.idle_evict, Duration::from_secs(900))?;
        // Eviction never drops unflushed usage, so any positive value is safe.
        if idle_evict.is_zero() {
            return Err(err("idle_evict", "must be more than 0"));
        }
        let log_format = match given(&s.log_format).as_deref() {
            None | Some("text") => LogFormat::Text,
            Some("json") => LogFormat::Json,
            Some(other) => return Err(err("log_format", format!("`{other}` is not text or json"))),
        };
        let positive = |field, v: &Option<Number>, default: u64| -> Result<u64, ConfigError> {
            let n = number_of(field, v, default)?;
            if n == 0 {
                return Err(err(field, "must be at least 1"));
            }
            Ok(n)
        };
        let max_calls = per_deduction(
            "max_calls",
            positive("max_calls", &s.max_calls, 1_000_000_000)?,
        )?;
        let max_egress_bytes = per_deduction(
            "max_egress_bytes",
            positive("max_egress_bytes", &s.max_egress_bytes, 1 << 40)?,
        )?;
        let max_batch = positive("max_batch", &s.max_batch, 10_000)?;
        let plan = FreeTierPlan {
            calls: amount(
                "free_calls",
                number_of("free_calls", &s.free_calls, 1_000_000)?,
            )?,
            egress_bytes: amount(
                "free_egress_bytes",
                number_of("free_egress_bytes", &s.free_egress_bytes, 1 << 30)?,
            )?,
            months: {
                let m = number_of("free_months", &s.free_months, 12)?;
                u32::try_from(m)
                    .ok()
                    .filter(|m| *m <= 1200)
                    .ok_or_else(|| err("free_months", "must be at most 1200"))?
            },
        };
        let plans = resolve_plans(&s, zone)?;

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
            domain: given(&s.rls_domain)
                .map(|v| rls_text("rls_domain", v))
                .transpose()?,
            account_key: rls_text(
                "rls_account_key",
                given(&s.rls_account_key).unwrap_or(rls_defaults.account_key),
            )?,
            item_key: rls_text(
                "rls_item_key",
                given(&s.rls_item_key).unwrap_or(rls_defaults.item_key),
            )?,
        };
        if rls.account_key == rls.item_key {
            // Name the key that was set: with only rls_account_key given,
            // the clash is with rls_item_key's default.
            let item_key_given = given(&s.rls_item_key).is_some();
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

        let admin_token_file = given(&s.admin_token_file)
            .map(|p| {
                let p = PathBuf::from(p.trim());
                crate::auth::read_tokens(&p).map_err(|e| err("admin_token_file", e))?;
                Ok::<_, ConfigError>(p)
            })
            .transpose()?;
        let max_message_bytes = positive(
            "max_message_bytes",
            &s.max_message_bytes,
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
            &s.max_concurrent_streams,
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
            &s.max_export_range,
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
            &s.max_stream_in_flight,
            DEFAULT_MAX_STREAM_IN_FLIGHT,
        )?;
        if max_stream_in_flight > MAX_STREAM_IN_FLIGHT {
            return Err(err(
                "max_stream_in_flight",
                format!("{max_stream_in_flight} is above {MAX_STREAM_IN_FLIGHT}; use at most {MAX_STREAM_IN_FLIGHT}"),
            ));
        }
        let tls = tls_files(
            given(&s.tls_cert_file),
            given(&s.tls_key_file),
            given(&s.tls_client_ca_file),
        )?;

        Ok(Config {
            listen,
            admin_listen,
            store,
            create_store_dir,
            flush_interval,
            flush_max_lag,
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

// The tests give settings as flags, through clap.
#[cfg(all(test, feature = "cli"))]
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
            ..only("rls_domain", "gateway")
        })
        .unwrap();
        assert_eq!(flagged.rls.domain.as_deref(), Some("gateway"));
        assert_eq!(flagged.rls.account_key, "tenant");

        let cases = [
            (only("rls_domain", ""), "rls_domain"),
            (only("rls_account_key", "acc\tount"), "rls_account_key"),
            (only("rls_item_key", "account"), "rls_item_key"),
        ];
        for (args, field) in cases {
            assert_eq!(Config::resolve(&args).unwrap_err().field, field);
        }
    }

    #[test]
    fn errors_name_the_field() {
        let cases = [
            (only("flush_interval", "soon"), "flush_interval"),
            (only("listen", "nope"), "listen"),
            (only("timezone", "Mars/Base"), "timezone"),
            (
                flags(&[("late_grace", "2h"), ("dedup_window", "1h")]),
                "dedup_window",
            ),
            (only("store", "redis://x"), "store"),
            (only("unknown_accounts", "maybe"), "unknown_accounts"),
            (only("max_calls", "0"), "max_calls"),
            (only("flush_max_lag", "soon"), "flush_max_lag"),
        ];
        for (args, field) in cases {
            assert_eq!(Config::resolve(&args).unwrap_err().field, field);
        }
    }

    #[test]
    fn the_flush_max_lag_follows_the_interval_and_can_be_off() {
        let lag = |args: &ServeArgs| Config::resolve(args).map(|c| c.flush_max_lag);
        assert_eq!(lag(&ServeArgs::default()), Ok(Some(Duration::from_secs(3))));
        assert_eq!(
            lag(&only("flush_interval", "250ms")),
            Ok(Some(Duration::from_millis(750)))
        );
        assert_eq!(
            lag(&only("flush_max_lag", "10s")),
            Ok(Some(Duration::from_secs(10)))
        );
        assert_eq!(lag(&only("flush_max_lag", "off")), Ok(None));
        // Shorter than the interval: the flush would never run low.
        let e = Config::resolve(&flags(&[("flush_interval", "2s"), ("flush_max_lag", "1s")]))
            .unwrap_err();
        assert_eq!(e.field, "flush_max_lag");
        assert!(
            e.message.contains("shorter than flush_interval (2s)"),
            "{}",
            e.message
        );
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
            ..only("late_grace", "30m")
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
    const STRING_FIELDS: [&str; 31] = [
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
        "flush_max_lag",
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

    /// `serve`'s arguments as clap parses `--FIELD=VALUE` for each pair.
    fn flags(pairs: &[(&str, &str)]) -> ServeArgs {
        use clap::{Args, FromArgMatches};
        let cmd = ServeArgs::augment_args(clap::Command::new("serve").no_binary_name(true));
        let argv = pairs
            .iter()
            .map(|(field, v)| format!("--{}={v}", field.replace('_', "-")));
        let matches = cmd
            .try_get_matches_from(argv)
            .unwrap_or_else(|e| panic!("{pairs:?}: {e}"));
        ServeArgs::from_arg_matches(&matches).unwrap()
    }

    /// `ServeArgs` with only `field` set, as its flag sets it.
    fn only(field: &str, value: &str) -> ServeArgs {
        flags(&[(field, value)])
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
        let c = Config::resolve(&only("late_grace", &longest)).unwrap();
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

    /// Each field of `Settings` is a flag, a variable and a TOML key named
    /// after it, and a row of the README's table; `--config` and `--noop`
    /// are flags and variables but not keys.
    #[test]
    fn every_setting_is_a_flag_a_variable_a_toml_key_and_a_readme_row() {
        use clap::Args;
        let serve = with_env(ServeArgs::augment_args(clap::Command::new("serve")));
        let readme = include_str!("../README.md");
        let keys = Settings::keys();
        // The TOML keys (serde's fields) are the flags but --config and --noop.
        let flags: Vec<&str> = serve
            .get_arguments()
            .map(|a| a.get_id().as_str())
            .filter(|id| !["config", "noop"].contains(id))
            .collect();
        assert_eq!(flags, keys);
        for key in keys.iter().chain(&["config", "noop"]) {
            let flag = key.replace('_', "-");
            let env = format!("PACKMETER_{}", key.to_uppercase());
            let arg = serve
                .get_arguments()
                .find(|a| a.get_id() == key)
                .unwrap_or_else(|| panic!("no argument {key}"));
            assert_eq!(arg.get_long(), Some(flag.as_str()));
            assert_eq!(arg.get_env(), Some(std::ffi::OsStr::new(&env)));
            let row = format!("| `--{flag}` | `{env}` | ");
            let is_key = keys.contains(key);
            assert!(
                readme.lines().any(|l| l.starts_with(&row)
                    && (!is_key || l[row.len()..].starts_with(&format!("`{key}` |")))),
                "README has no row {row}`{key}` |"
            );
            // The file takes it as a key (a boolean is no setting's type,
            // so the error names it), or refuses it as unknown.
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("pm.toml");
            std::fs::write(&path, format!("{key} = true\n")).unwrap();
            let e = Settings::read(&path).unwrap_err();
            let want = if is_key { *key } else { "config" };
            assert_eq!(e.field, want, "{e}");
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
