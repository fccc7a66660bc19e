//! The `packmeter` command line: `serve`, and client commands for a running
//! server (`deduct`, `usage`, `account`, `packs`, `grant`, `flush`, `export`).
//!
//! Client commands print aligned tables by default and JSON with `--json`.
//! Exit codes (README.md, "The CLI", has the table):
//! - 0 success; also when stdout is closed early (`packmeter packs X | head -1`);
//! - 1 the server refused the request (INVALID_ARGUMENT, NOT_FOUND,
//!   ALREADY_EXISTS, FAILED_PRECONDITION, ...): fix the request;
//! - 2 `deduct` was answered DENY (the answer is printed as usual);
//! - 64 bad usage: flags, times, `--server`;
//! - 69 the server cannot be reached: no connection, a failed TLS handshake,
//!   or something other than packmeter's gRPC port answered;
//! - 70 the server failed (INTERNAL, UNKNOWN, DATA_LOSS, UNIMPLEMENTED);
//! - 74 stdout cannot be written (other than a closed pipe);
//! - 75 a temporary failure on the server (UNAVAILABLE from the server, e.g.
//!   its store is down or it is shutting down; ABORTED; RESOURCE_EXHAUSTED;
//!   DEADLINE_EXCEEDED): retry later;
//! - 77 the server refused the admin credential (UNAUTHENTICATED): give
//!   `--token-file` or `PACKMETER_ADMIN_TOKEN`.

use std::{
    io::{self, Write},
    path::PathBuf,
    process::ExitCode,
};

use clap::{Args, CommandFactory, FromArgMatches, Parser, Subcommand};
use serde::Serialize;
use serde_json::json;
use tonic::{
    transport::{Certificate, Channel, ClientTlsConfig, Endpoint},
    Code, Status,
};

use packmeter::{
    calendar::{self, BillingZone, Ts},
    config::{Config, LogFormat, ServeArgs},
    grpc::{
        convert,
        proto::{self, admin_client::AdminClient, meter_client::MeterClient},
    },
};

/// `deduct` was answered DENY.
const EX_DENIED: u8 = 2;
const EX_USAGE: u8 = 64;
const EX_UNAVAILABLE: u8 = 69;
const EX_SOFTWARE: u8 = 70;
const EX_IOERR: u8 = 74;
const EX_TEMPFAIL: u8 = 75;
/// The server refused the admin credential.
const EX_NOPERM: u8 = 77;

#[derive(Debug, Parser)]
#[command(
    name = "packmeter",
    version,
    about = "Meters API-gateway calls and egress against per-account resource packs",
    long_about = None
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the sidecar: gRPC on --listen, admin HTTP on --admin-listen.
    Serve(Box<ServeArgs>),
    /// Deduct calls and egress bytes from an account (calls 0 and egress 0 only checks).
    Deduct(DeductCmd),
    /// Show the packs valid now (or --at) and their balances.
    Usage(UsageCmd),
    /// Read or change an account.
    #[command(subcommand)]
    Account(AccountCmd),
    /// List every pack of an account: free tier and purchased, past and future.
    Packs(PacksCmd),
    /// Grant a purchased pack.
    Grant(GrantCmd),
    /// Flush pending usage to the store; returns once it is durable.
    Flush(ClientOpts),
    /// Export settled hourly usage (closed, flushed hours) as CSV or JSON lines.
    Export(ExportCmd),
    /// Closed-loop load generator: throughput, latency percentiles and server CPU per operation.
    Loadgen(Box<crate::loadgen::LoadgenArgs>),
}

#[derive(Debug, Clone, Args)]
pub struct ClientOpts {
    /// The server's gRPC address: http://HOST:PORT, or https://HOST:PORT for
    /// TLS (checked against the system's and Mozilla's roots, and --tls-ca-file).
    #[arg(
        long,
        env = "PACKMETER_SERVER",
        default_value = "http://127.0.0.1:50051",
        global = true
    )]
    pub server: String,
    /// PEM file of a CA to trust for an https:// --server, besides the
    /// system's and Mozilla's roots (for a private CA). `--tls-ca` and
    /// PACKMETER_TLS_CA are accepted too.
    #[arg(
        long = "tls-ca-file",
        alias = "tls-ca",
        env = "PACKMETER_TLS_CA_FILE",
        global = true,
        value_name = "FILE"
    )]
    pub tls_ca: Option<PathBuf>,
    /// PEM client certificate for a server that asks for one (its
    /// --tls-client-ca-file), with --tls-key-file; https:// only.
    #[arg(
        long,
        env = "PACKMETER_TLS_CLIENT_CERT_FILE",
        global = true,
        value_name = "FILE"
    )]
    pub tls_cert_file: Option<PathBuf>,
    /// PEM private key of --tls-cert-file.
    #[arg(
        long,
        env = "PACKMETER_TLS_CLIENT_KEY_FILE",
        global = true,
        value_name = "FILE"
    )]
    pub tls_key_file: Option<PathBuf>,
    /// File whose first token (one a line, # comments ignored: the server's
    /// --admin-token-file format) is sent as `authorization: Bearer TOKEN`
    /// on admin commands. Without it, the PACKMETER_ADMIN_TOKEN variable
    /// is sent, if set. Never a flag value: a token on the command line is
    /// visible to every user of the machine.
    #[arg(long, env = "PACKMETER_TOKEN_FILE", global = true, value_name = "FILE")]
    pub token_file: Option<PathBuf>,
    /// Print JSON instead of a table.
    #[arg(long, global = true)]
    pub json: bool,
    /// Show times in UTC instead of the server's billing zone (the zone the
    /// pack page uses, which the server reports with each pack and account).
    #[arg(long, global = true)]
    pub utc: bool,
}

#[derive(Debug, Args)]
pub struct DeductCmd {
    pub account: String,
    #[arg(long, default_value_t = 0)]
    pub calls: u64,
    #[arg(long, default_value_t = 0)]
    pub egress_bytes: u64,
    /// Event time, RFC 3339 (e.g. 2019-11-10T17:13:14+08:00); default: now.
    #[arg(long)]
    pub at: Option<String>,
    /// Idempotency key.
    #[arg(long, default_value = "")]
    pub request_id: String,
    #[command(flatten)]
    pub client: ClientOpts,
}

#[derive(Debug, Args)]
pub struct UsageCmd {
    pub account: String,
    /// Instant to look at, RFC 3339; default: now.
    #[arg(long, conflicts_with = "daily")]
    pub at: Option<String>,
    /// Usage by day in the billing zone instead of the packs: covered and
    /// overage per item, for the days with usage (an admin call:
    /// Admin.GetDailyUsage).
    #[arg(long)]
    pub daily: bool,
    /// With --daily: how many days, ending today (1 to 731).
    #[arg(long, requires = "daily", default_value_t = packmeter::daily::DEFAULT_DAYS,
          value_parser = clap::value_parser!(u32).range(1..=i64::from(packmeter::daily::MAX_DAYS)))]
    pub days: u32,
    #[command(flatten)]
    pub client: ClientOpts,
}

#[derive(Debug, Subcommand)]
pub enum AccountCmd {
    /// Show an account.
    Get {
        account: String,
        #[command(flatten)]
        client: ClientOpts,
    },
    /// Create or change an account. Only the settings given change; the others
    /// keep their current value (a new account is activated now unless
    /// --activated-at is given). The activation cannot change once the
    /// account has usage.
    Put {
        account: String,
        /// Activation instant, RFC 3339; default: unchanged, or now for a new account.
        #[arg(long)]
        activated_at: Option<String>,
        #[arg(long)]
        suspended: Option<bool>,
        /// Deny calls no pack covers instead of billing overage.
        #[arg(long)]
        deny_on_exhausted: Option<bool>,
        #[command(flatten)]
        client: ClientOpts,
    },
}

#[derive(Debug, Args)]
pub struct PacksCmd {
    pub account: String,
    #[command(flatten)]
    pub client: ClientOpts,
}

#[derive(Debug, Args)]
pub struct GrantCmd {
    pub account: String,
    /// The item the pack holds (`egress` is accepted for egress-bytes).
    #[arg(long, value_enum)]
    pub item: ItemArg,
    #[arg(long)]
    pub capacity: u64,
    /// RFC 3339; default (or `now`): when the server takes the grant. A
    /// retry with the same --pack-id and without --valid-from is recognised
    /// as the same grant.
    #[arg(long)]
    pub valid_from: Option<String>,
    /// RFC 3339, exclusive. Give this or --valid-for.
    #[arg(long, conflicts_with = "valid_for")]
    pub valid_until: Option<String>,
    /// Validity from --valid-from, e.g. 30d, 1month, 1y or `1month 15d`.
    /// Months and years are calendar months in the server's billing zone
    /// (31 Jan + 1month = 28/29 Feb, same local time); other units are exact.
    #[arg(long)]
    pub valid_for: Option<String>,
    /// Makes the grant idempotent (safe to retry); default: a fresh id.
    #[arg(long, default_value = "")]
    pub pack_id: String,
    /// Higher priorities are deducted first among purchased packs.
    #[arg(long, default_value_t = 0)]
    pub priority: u32,
    #[command(flatten)]
    pub client: ClientOpts,
}

/// A metered item, as `--item` takes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ItemArg {
    Calls,
    #[value(name = "egress_bytes", alias = "egress", alias = "egress-bytes")]
    EgressBytes,
}

impl From<ItemArg> for proto::Item {
    fn from(i: ItemArg) -> proto::Item {
        match i {
            ItemArg::Calls => proto::Item::Calls,
            ItemArg::EgressBytes => proto::Item::EgressBytes,
        }
    }
}

/// `export --format`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ExportFormat {
    /// RFC 4180 CSV with a header line; cells that start like a formula get a leading `'`.
    Csv,
    /// One JSON object per line, never altered.
    Jsonl,
}

#[derive(Debug, Args)]
pub struct ExportCmd {
    /// First hour, RFC 3339 (inclusive).
    #[arg(long)]
    pub from: String,
    /// End, RFC 3339 (exclusive).
    #[arg(long)]
    pub to: String,
    #[arg(long, value_enum, default_value_t = ExportFormat::Csv)]
    pub format: ExportFormat,
    /// One account only.
    #[arg(long)]
    pub account: Option<String>,
    #[command(flatten)]
    pub client: ClientOpts,
}

/// A client-side failure, with the exit code it maps to. An empty message
/// prints nothing.
#[derive(Debug)]
struct Failure {
    code: u8,
    message: String,
}

impl From<Status> for Failure {
    fn from(s: Status) -> Failure {
        let message = format!("{:?}: {}", s.code(), s.message());
        if looks_like_http1(&s) {
            return Failure {
                code: EX_UNAVAILABLE,
                message: format!(
                    "{message}\nthe server answered with a web page, not gRPC: this looks like the \
                     admin HTTP port (--admin-listen, default 9090); the gRPC port is --listen \
                     (default 50051)"
                ),
            };
        }
        let (code, hint) = match s.code() {
            // A status the client made itself: no connection.
            Code::Unavailable if is_transport_error(&s) => (
                EX_UNAVAILABLE,
                "; is `packmeter serve` running? Set --server or PACKMETER_SERVER",
            ),
            // A plaintext client on a TLS port: the server's TLS stack
            // drops what is not a ClientHello, and h2 sees the connection
            // end mid-handshake.
            Code::Internal if is_transport_error(&s) && s.message().contains("h2 protocol") => (
                EX_UNAVAILABLE,
                "; the server closed the connection without speaking gRPC: if it serves TLS \
                 (packmeter serve --tls-cert-file), use --server https://HOST:PORT",
            ),
            Code::Unavailable
            | Code::Aborted
            | Code::ResourceExhausted
            | Code::DeadlineExceeded => (EX_TEMPFAIL, " (temporary: retry later)"),
            Code::Unauthenticated => (
                EX_NOPERM,
                "; give the admin token with --token-file or PACKMETER_ADMIN_TOKEN",
            ),
            Code::Internal | Code::Unknown | Code::DataLoss | Code::Unimplemented => {
                (EX_SOFTWARE, " (the server failed; see its log)")
            }
            _ => (1, ""),
        };
        Failure {
            code,
            message: format!("{message}{hint}"),
        }
    }
}

/// Whether tonic made this status from a failed connection rather than
/// decoding one the server sent: only its own carry a source error.
fn is_transport_error(s: &Status) -> bool {
    std::error::Error::source(s).is_some()
}

/// Whether the answer came from an HTTP server that is not gRPC (the admin
/// port): an HTML body read as a gRPC frame starts with `<` (60), or the
/// reply's content type is not gRPC.
fn looks_like_http1(s: &Status) -> bool {
    let content_type = s
        .metadata()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    s.message().contains("invalid compression flag: 60") || content_type.starts_with("text/")
}

/// Writing to stdout failed: a closed pipe (`| head -1`) ends quietly with
/// success, as Unix filters do; anything else is reported.
impl From<io::Error> for Failure {
    fn from(e: io::Error) -> Failure {
        if e.kind() == io::ErrorKind::BrokenPipe {
            Failure {
                code: 0,
                message: String::new(),
            }
        } else {
            Failure {
                code: EX_IOERR,
                message: format!("cannot write the output: {e}"),
            }
        }
    }
}

fn usage(message: String) -> Failure {
    Failure {
        code: EX_USAGE,
        message,
    }
}

/// The binary's entry point.
pub fn main() -> ExitCode {
    // `serve`'s variables are named after its settings (config::with_env).
    let command = Cli::command().mut_subcommand("serve", packmeter::config::with_env);
    let cli = match command
        .try_get_matches()
        .and_then(|m| Cli::from_arg_matches(&m))
    {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::from(EX_USAGE)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    match cli.command {
        Command::Serve(args) => serve(&args),
        Command::Loadgen(args) => crate::loadgen::main(&args),
        cmd => {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("packmeter: cannot start the runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            match rt.block_on(client(cmd)) {
                Ok(code) => ExitCode::from(code),
                Err(f) => {
                    if !f.message.is_empty() {
                        // Not eprintln!: a closed stderr must not panic either.
                        let _ = writeln!(io::stderr(), "packmeter: {}", f.message);
                    }
                    ExitCode::from(f.code)
                }
            }
        }
    }
}

fn serve(args: &ServeArgs) -> ExitCode {
    let config = match Config::resolve(args) {
        Ok(c) => c,
        Err(e) => {
            let format = packmeter::config::requested_log_format(args);
            return fatal(format, &format!("invalid configuration: {e}"), EX_USAGE);
        }
    };
    init_tracing(config.log_format);
    crate::allocator::start_upkeep();
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if config.durability == packmeter::journal::Durability::Journal {
        // The journal writer commits its group when a worker parks.
        packmeter::journal::park_hooks(&mut builder);
    }
    let rt = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            return fatal(
                config.log_format,
                &format!("cannot start the runtime: {e}"),
                1,
            )
        }
    };
    let log_format = config.log_format;
    let served = rt.block_on(async {
        // Before anything is bound, so an early SIGTERM still drains.
        let signal =
            packmeter::server::shutdown_signal().map_err(packmeter::server::ServeError::Signal)?;
        packmeter::server::serve(config, signal).await
    });
    // A store call still blocked (SQLite waiting for a lock it will not get)
    // must not hold the exit past the grace period. Its transaction rolls
    // back when the process exits, or it committed, in which case the spill
    // file's copy of the batch carries the same id and is skipped at replay.
    rt.shutdown_timeout(std::time::Duration::from_millis(200));
    match served {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fatal(log_format, &e.to_string(), e.exit_code()),
    }
}

/// Reports why `serve` stops, once: a JSON line in the log's own shape
/// under `--log-format json` (so a log pipeline parses every line), else
/// `packmeter: MESSAGE`. Written directly rather than through `tracing`, so
/// that neither `RUST_LOG` nor a logger not yet set up can hide it.
fn fatal(format: LogFormat, message: &str, code: u8) -> ExitCode {
    match format {
        LogFormat::Json => {
            let line = json!({
                "timestamp": chrono::Utc::now()
                    .to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
                "level": "ERROR",
                "fields": { "message": "packmeter stopped", "error": message },
                "target": "packmeter",
            });
            eprintln!("{line}");
        }
        LogFormat::Text => eprintln!("packmeter: {message}"),
    }
    ExitCode::from(code)
}

fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

// === client commands ===

/// Checks `--server` and the TLS files before any connection is tried: a
/// malformed address is bad usage (64), not an unreachable server.
fn endpoint(opts: &ClientOpts) -> Result<Endpoint, Failure> {
    let server = opts.server.trim();
    let bad = |why: &str| {
        usage(format!(
            "--server `{server}` {why}; give a URL like http://127.0.0.1:50051 \
             (or https:// for a server behind TLS)"
        ))
    };
    let uri: http::Uri = server.parse().map_err(|_| bad("is not a URL"))?;
    let tls = match uri.scheme_str() {
        Some("http") => false,
        Some("https") => true,
        Some(other) => return Err(bad(&format!("has the scheme `{other}:`"))),
        None if uri.port().is_some() => {
            return Err(usage(format!(
                "--server `{server}` has no scheme; did you mean http://{server} ?"
            )))
        }
        None => return Err(bad("is not a URL")),
    };
    if uri.host().is_none_or(str::is_empty) {
        return Err(bad("has no host"));
    }
    if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
        return Err(bad("has a path; gRPC needs only scheme://host:port"));
    }
    let files = ClientTlsFiles {
        ca: opts.tls_ca.clone(),
        cert: opts.tls_cert_file.clone(),
        key: opts.tls_key_file.clone(),
    };
    let endpoint = Endpoint::from(uri);
    match client_tls(tls, server, &files).map_err(usage)? {
        None => Ok(endpoint),
        Some(config) => endpoint
            .tls_config(config)
            .map_err(|e| usage(format!("--tls-ca-file or --server: cannot set up TLS: {e}"))),
    }
}

/// The TLS files of a client command (the CLI's, loadgen's).
#[derive(Clone, Debug, Default)]
pub struct ClientTlsFiles {
    /// `--tls-ca-file`, else the older PACKMETER_TLS_CA.
    pub ca: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

/// The client's TLS settings for `server` (`https` says whether it is
/// https://): `None` for plaintext. Every file is read and checked here,
/// so a bad one is a usage error (64) naming its flag, not a failed
/// connection. The client's certificate variables are not the server's
/// PACKMETER_TLS_CERT_FILE/KEY_FILE: a CLI run beside `serve` (in its
/// container) must not present the server's certificate as its own.
pub fn client_tls(
    https: bool,
    server: &str,
    files: &ClientTlsFiles,
) -> Result<Option<ClientTlsConfig>, String> {
    let ca = files
        .ca
        .clone()
        .or_else(|| std::env::var_os("PACKMETER_TLS_CA").map(PathBuf::from));
    if !https {
        let given = [
            (ca.is_some(), "--tls-ca-file"),
            (files.cert.is_some(), "--tls-cert-file"),
            (files.key.is_some(), "--tls-key-file"),
        ];
        if let Some((_, flag)) = given.iter().find(|(set, _)| *set) {
            return Err(format!(
                "{flag} is only for an https:// --server, and --server is `{server}`; \
                 use https://HOST:PORT for a server with TLS"
            ));
        }
        return Ok(None);
    }
    let read = |flag: &str, path: &PathBuf| {
        std::fs::read(path).map_err(|e| format!("{flag}: cannot read {}: {e}", path.display()))
    };
    let mut config = ClientTlsConfig::new().with_enabled_roots();
    if let Some(path) = &ca {
        let pem = read("--tls-ca-file", path)?;
        if packmeter::tls::pem_certificates(&pem).is_empty() {
            return Err(format!(
                "--tls-ca-file: {} holds no PEM certificate (`-----BEGIN CERTIFICATE-----`)",
                path.display()
            ));
        }
        config = config.ca_certificate(Certificate::from_pem(pem));
    }
    match (&files.cert, &files.key) {
        (None, None) => {}
        (Some(_), None) => {
            return Err("--tls-cert-file needs --tls-key-file, its private key".into());
        }
        (None, Some(_)) => {
            return Err(
                "--tls-key-file needs --tls-cert-file, the certificate it belongs to".into(),
            );
        }
        (Some(cert_path), Some(key_path)) => {
            let cert = read("--tls-cert-file", cert_path)?;
            let key = read("--tls-key-file", key_path)?;
            packmeter::tls::check_identity(&cert, &key).map_err(|e| {
                format!(
                    "--tls-cert-file {} and --tls-key-file {}: {e}",
                    cert_path.display(),
                    key_path.display()
                )
            })?;
            config = config.identity(tonic::transport::Identity::from_pem(cert, key));
        }
    }
    Ok(Some(config))
}

/// Sends `authorization: Bearer TOKEN` on every call of an admin client.
#[derive(Clone)]
pub struct Bearer(Option<tonic::metadata::AsciiMetadataValue>);

impl Bearer {
    /// The token of `--token-file`, else `PACKMETER_ADMIN_TOKEN`, else none.
    fn from_opts(opts: &ClientOpts) -> Result<Bearer, Failure> {
        let token = match &opts.token_file {
            Some(path) => Some(
                packmeter::auth::read_tokens(path)
                    .map_err(|e| usage(format!("--token-file: {e}")))?
                    .swap_remove(0),
            ),
            None => std::env::var("PACKMETER_ADMIN_TOKEN")
                .ok()
                .map(|t| t.trim().as_bytes().to_vec())
                .filter(|t| !t.is_empty()),
        };
        Bearer::from_token(token.as_deref())
            .map_err(|e| usage(format!("--token-file or PACKMETER_ADMIN_TOKEN: {e}")))
    }

    /// A header value from a token; printable ASCII only.
    pub fn from_token(token: Option<&[u8]>) -> Result<Bearer, String> {
        let bad = || "the token must be printable ASCII without spaces".to_string();
        let Some(t) = token else {
            return Ok(Bearer(None));
        };
        if !t.iter().all(u8::is_ascii_graphic) {
            return Err(bad());
        }
        let mut value = b"Bearer ".to_vec();
        value.extend_from_slice(t);
        let value = std::str::from_utf8(&value).map_err(|_| bad())?;
        value.parse().map(|v| Bearer(Some(v))).map_err(|_| bad())
    }
}

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

type Admin = AdminClient<tonic::service::interceptor::InterceptedService<Channel, Bearer>>;

/// An admin client carrying the token, if one is given.
async fn admin(opts: &ClientOpts) -> Result<Admin, Failure> {
    let bearer = Bearer::from_opts(opts)?;
    Ok(AdminClient::with_interceptor(connect(opts).await?, bearer))
}

async fn connect(opts: &ClientOpts) -> Result<Channel, Failure> {
    let endpoint = endpoint(opts)?;
    let tls = endpoint.uri().scheme_str() == Some("https");
    endpoint.connect().await.map_err(|e| {
        let cause = error_chain(&e);
        let hint = if tls {
            "is the server serving TLS on that port (packmeter serve --tls-cert-file)? Without \
             it, it speaks plaintext gRPC (http://); for a private CA give --tls-ca-file, and \
             if the server asks for a client certificate, --tls-cert-file and --tls-key-file"
        } else {
            "is `packmeter serve` running? Set --server or PACKMETER_SERVER"
        };
        Failure {
            code: EX_UNAVAILABLE,
            message: format!("cannot connect to {}: {cause}; {hint}", opts.server),
        }
    })
}

/// An error and its causes, `: `-separated (tonic's top-level transport
/// error says only "transport error").
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let text = c.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        cause = c.source();
    }
    out
}

fn parse_time(flag: &str, v: &str) -> Result<Ts, Failure> {
    if v == "now" {
        return Ok(calendar::now_ts());
    }
    chrono::DateTime::parse_from_rfc3339(v)
        .map(|d| calendar::from_datetime(&d))
        .map_err(|_| {
            usage(format!(
                "{flag}: `{v}` is not an RFC 3339 time like 2019-11-10T17:13:14+08:00 (or `now`)"
            ))
        })
}

fn opt_time(flag: &str, v: &Option<String>) -> Result<Option<prost_types::Timestamp>, Failure> {
    v.as_deref()
        .map(|v| parse_time(flag, v).map(convert::timestamp))
        .transpose()
}

/// Where the CLI shows times: the server's billing zone (`zone`, as the
/// server reports it), or UTC with `--utc` or when the server names none.
fn shown_zone(zone: &str, utc: bool) -> Option<BillingZone> {
    if utc {
        return None;
    }
    zone.parse().ok()
}

/// An instant as RFC 3339 in `zone` (with its offset), or in UTC (`Z`).
fn show_ts(t: &Option<prost_types::Timestamp>, zone: Option<&BillingZone>) -> String {
    let Some(ts) = t
        .as_ref()
        .and_then(|t| convert::ts("", Some(t)).ok().flatten())
    else {
        return String::new();
    };
    let utc = calendar::to_datetime(ts);
    let secs = chrono::SecondsFormat::Secs;
    match zone {
        None => utc.to_rfc3339_opts(secs, true),
        Some(BillingZone::Fixed(o)) => utc.with_timezone(o).to_rfc3339_opts(secs, true),
        Some(BillingZone::Named(tz)) => utc.with_timezone(tz).to_rfc3339_opts(secs, true),
    }
}

fn enum_name<E: TryFrom<i32>>(v: i32, name: impl Fn(E) -> &'static str) -> String {
    E::try_from(v).map(name).unwrap_or("UNKNOWN").to_string()
}

type Out<'a> = &'a mut dyn Write;

fn print_json(out: Out, v: &impl Serialize) -> io::Result<()> {
    let text = serde_json::to_string_pretty(v).map_err(io::Error::other)?;
    writeln!(out, "{text}")
}

/// Prints rows as a plain table: no borders, left-aligned columns two
/// spaces apart, never wrapped (scripts cut columns with awk).
fn print_table(out: Out, headers: &[&str], rows: &[Vec<String>]) -> io::Result<()> {
    let mut table = comfy_table::Table::new();
    table
        .load_preset(comfy_table::presets::NOTHING)
        .set_content_arrangement(comfy_table::ContentArrangement::Disabled)
        .set_header(headers.iter().copied())
        .add_rows(rows.iter().cloned());
    let last = headers.len().saturating_sub(1);
    for (i, column) in table.column_iter_mut().enumerate() {
        column.set_padding((0, if i == last { 0 } else { 2 }));
    }
    for line in table.lines() {
        writeln!(out, "{}", line.trim_end())?;
    }
    Ok(())
}

/// A pack as `--json` prints it.
#[derive(Serialize)]
struct PackOut {
    pack_id: String,
    account_id: String,
    source: String,
    item: String,
    capacity: u64,
    used: u64,
    remaining: u64,
    valid_from: String,
    valid_until: String,
    priority: u32,
    /// The plan that issued a free-tier pack (R8); null for a purchased one.
    plan: Option<String>,
}

impl PackOut {
    fn new(p: &proto::Pack, utc: bool) -> PackOut {
        let zone = shown_zone(&p.billing_zone, utc);
        PackOut {
            pack_id: p.pack_id.clone(),
            account_id: p.account_id.clone(),
            source: enum_name(p.source, |s: proto::PackSource| s.as_str_name()),
            item: enum_name(p.item, |s: proto::Item| s.as_str_name()),
            capacity: p.capacity,
            used: p.used,
            remaining: p.capacity.saturating_sub(p.used),
            valid_from: show_ts(&p.valid_from, zone.as_ref()),
            valid_until: show_ts(&p.valid_until, zone.as_ref()),
            priority: p.priority,
            plan: (!p.plan.is_empty()).then(|| p.plan.clone()),
        }
    }
}

fn print_packs(out: Out, packs: &[proto::Pack], opts: &ClientOpts) -> io::Result<()> {
    let packs: Vec<PackOut> = packs.iter().map(|p| PackOut::new(p, opts.utc)).collect();
    if opts.json {
        return print_json(out, &packs);
    }
    let rows: Vec<Vec<String>> = packs
        .into_iter()
        .map(|p| {
            vec![
                p.pack_id,
                p.source,
                p.item,
                p.capacity.to_string(),
                p.used.to_string(),
                p.remaining.to_string(),
                p.valid_from,
                p.valid_until,
                p.plan.unwrap_or_else(|| "-".into()),
            ]
        })
        .collect();
    print_table(
        out,
        &[
            "PACK",
            "SOURCE",
            "ITEM",
            "CAPACITY",
            "USED",
            "REMAINING",
            "VALID FROM",
            "VALID UNTIL",
            "PLAN",
        ],
        &rows,
    )
}

/// An account as `--json` prints it.
#[derive(Serialize)]
struct AccountOut {
    account_id: String,
    activated_at: String,
    suspended: bool,
    deny_on_exhausted: bool,
}

fn print_account(out: Out, a: &proto::Account, opts: &ClientOpts) -> io::Result<()> {
    let zone = shown_zone(&a.billing_zone, opts.utc);
    let a = AccountOut {
        account_id: a.account_id.clone(),
        activated_at: show_ts(&a.activated_at, zone.as_ref()),
        suspended: a.suspended,
        deny_on_exhausted: a.deny_on_exhausted,
    };
    if opts.json {
        return print_json(out, &a);
    }
    let rows = [
        ("account_id", a.account_id),
        ("activated_at", a.activated_at),
        ("suspended", a.suspended.to_string()),
        ("deny_on_exhausted", a.deny_on_exhausted.to_string()),
    ]
    .into_iter()
    .map(|(k, v)| vec![k.to_string(), v])
    .collect::<Vec<_>>();
    print_table(out, &["FIELD", "VALUE"], &rows)
}

/// One item's outcome of a deduction, as `--json` prints it.
#[derive(Serialize)]
struct OutcomeOut {
    covered: u64,
    overage: u64,
    remaining: u64,
}

impl From<&proto::Outcome> for OutcomeOut {
    fn from(o: &proto::Outcome) -> OutcomeOut {
        OutcomeOut {
            covered: o.covered,
            overage: o.overage,
            remaining: o.remaining,
        }
    }
}

/// A deduction's answer, as `--json` prints it.
#[derive(Serialize)]
struct DeductOut {
    decision: String,
    duplicate: bool,
    deny_reason: String,
    calls: OutcomeOut,
    egress_bytes: OutcomeOut,
}

/// `flush --json`.
#[derive(Serialize)]
struct FlushOut {
    accounts_flushed: u64,
}

/// One exported row, as CSV and JSON lines write it.
#[derive(Serialize)]
struct UsageRowOut {
    account_id: String,
    hour: String,
    item: String,
    pack_id: String,
    source: String,
    /// Signed: an adjustment row (R8) credits with a negative amount.
    amount: i64,
    /// `usage`, or `adjustment` for a plan change's re-deduction.
    kind: &'static str,
    /// The plan of an adjustment row; empty on a usage row.
    plan: String,
}

/// One day of `usage --daily --json`.
#[derive(Serialize)]
struct DayOut<'a> {
    date: &'a str,
    calls_covered: u64,
    calls_overage: u64,
    egress_bytes_covered: u64,
    egress_bytes_overage: u64,
}

/// `usage --daily --json`.
#[derive(Serialize)]
struct DailyOut<'a> {
    zone: &'a str,
    days: Vec<DayOut<'a>>,
}

/// `usage --daily`: one line per day with usage, oldest first, then the
/// totals; `--json` gives every day, zeros included.
fn print_daily(out: Out, r: &proto::GetDailyUsageResponse, json_out: bool) -> io::Result<()> {
    if json_out {
        let days = r
            .days
            .iter()
            .map(|d| DayOut {
                date: &d.date,
                calls_covered: d.calls_covered,
                calls_overage: d.calls_overage,
                egress_bytes_covered: d.egress_bytes_covered,
                egress_bytes_overage: d.egress_bytes_overage,
            })
            .collect();
        return print_json(
            out,
            &DailyOut {
                zone: &r.zone,
                days,
            },
        );
    }
    let amounts = |d: &proto::DailyUsage| {
        [
            d.calls_covered,
            d.calls_overage,
            d.egress_bytes_covered,
            d.egress_bytes_overage,
        ]
    };
    let used: Vec<&proto::DailyUsage> = r
        .days
        .iter()
        .filter(|d| amounts(d).iter().any(|&a| a > 0))
        .collect();
    let mut total = [0u128; 4];
    let mut rows: Vec<Vec<String>> = Vec::with_capacity(used.len() + 1);
    for d in &used {
        let a = amounts(d);
        for (t, v) in total.iter_mut().zip(a) {
            *t += u128::from(v);
        }
        rows.push(
            std::iter::once(d.date.clone())
                .chain(a.iter().map(|v| v.to_string()))
                .collect(),
        );
    }
    rows.push(
        std::iter::once("total".to_string())
            .chain(total.iter().map(|v| v.to_string()))
            .collect(),
    );
    writeln!(
        out,
        "usage by day in the billing zone {}: {} of {} days had usage",
        r.zone,
        used.len(),
        r.days.len()
    )?;
    print_table(
        out,
        &[
            "DAY",
            "CALLS COVERED",
            "CALLS OVERAGE",
            "EGRESS COVERED",
            "EGRESS OVERAGE",
        ],
        &rows,
    )
}

/// Runs a client command; the exit code on success (2 for a DENY).
async fn client(cmd: Command) -> Result<u8, Failure> {
    let stdout = io::stdout();
    let mut out = io::BufWriter::new(stdout.lock());
    let code = run_client(cmd, &mut out).await?;
    out.flush()?;
    Ok(code)
}

async fn run_client(cmd: Command, out: Out<'_>) -> Result<u8, Failure> {
    match cmd {
        Command::Serve(_) => unreachable!("serve is handled by main"),
        Command::Loadgen(_) => unreachable!("loadgen is handled by main"),
        Command::Deduct(c) => {
            let req = proto::DeductRequest {
                account_id: c.account,
                calls: c.calls,
                egress_bytes: c.egress_bytes,
                at: opt_time("--at", &c.at)?,
                request_id: c.request_id,
            };
            let r = MeterClient::new(connect(&c.client).await?)
                .deduct(req)
                .await?
                .into_inner();
            let decision = enum_name(r.decision, |d: proto::Decision| d.as_str_name());
            let outcome = |o: &Option<proto::Outcome>| o.unwrap_or_default();
            let (calls, egress) = (outcome(&r.calls), outcome(&r.egress_bytes));
            if c.client.json {
                print_json(
                    out,
                    &DeductOut {
                        decision,
                        duplicate: r.duplicate,
                        deny_reason: r.deny_reason.clone(),
                        calls: (&calls).into(),
                        egress_bytes: (&egress).into(),
                    },
                )?;
            } else {
                let mut head = format!("decision: {decision}");
                if r.duplicate {
                    head.push_str(" (duplicate: nothing deducted again)");
                }
                if !r.deny_reason.is_empty() {
                    head.push_str(&format!(" ({})", r.deny_reason));
                }
                writeln!(out, "{head}")?;
                let row = |name: &str, o: &proto::Outcome| {
                    vec![
                        name.to_string(),
                        o.covered.to_string(),
                        o.overage.to_string(),
                        o.remaining.to_string(),
                    ]
                };
                print_table(
                    out,
                    &["ITEM", "COVERED", "OVERAGE", "REMAINING"],
                    &[row("calls", &calls), row("egress_bytes", &egress)],
                )?;
            }
            // Scripts branch on the decision without parsing the output.
            if r.decision == proto::Decision::Deny as i32 {
                return Ok(EX_DENIED);
            }
        }
        Command::Usage(c) if c.daily => {
            let r = admin(&c.client)
                .await?
                .get_daily_usage(proto::GetDailyUsageRequest {
                    account_id: c.account,
                    days: c.days,
                })
                .await?
                .into_inner();
            print_daily(out, &r, c.client.json)?;
        }
        Command::Usage(c) => {
            let r = MeterClient::new(connect(&c.client).await?)
                .get_usage(proto::GetUsageRequest {
                    account_id: c.account,
                    at: opt_time("--at", &c.at)?,
                })
                .await?
                .into_inner();
            print_packs(out, &r.packs, &c.client)?;
        }
        Command::Account(AccountCmd::Get { account, client }) => {
            let a = admin(&client)
                .await?
                .get_account(proto::GetAccountRequest {
                    account_id: account,
                })
                .await?
                .into_inner();
            print_account(out, &a, &client)?;
        }
        Command::Account(AccountCmd::Put {
            account,
            activated_at,
            suspended,
            deny_on_exhausted,
            client,
        }) => {
            let activated_at = opt_time("--activated-at", &activated_at)?;
            // Only the flags given are changes (the update mask), so an
            // activation fix never lifts a suspension, and nothing is read
            // first that a concurrent change could make stale.
            let mut paths = Vec::new();
            for (given, path) in [
                (activated_at.is_some(), "activated_at"),
                (suspended.is_some(), "suspended"),
                (deny_on_exhausted.is_some(), "deny_on_exhausted"),
            ] {
                if given {
                    paths.push(path.to_string());
                }
            }
            let a = admin(&client)
                .await?
                .put_account(proto::PutAccountRequest {
                    account: Some(proto::Account {
                        account_id: account,
                        activated_at,
                        suspended: suspended.unwrap_or_default(),
                        deny_on_exhausted: deny_on_exhausted.unwrap_or_default(),
                        billing_zone: String::new(),
                    }),
                    update_mask: Some(prost_types::FieldMask { paths }),
                })
                .await?
                .into_inner();
            print_account(out, &a, &client)?;
        }
        Command::Packs(c) => {
            let r = admin(&c.client)
                .await?
                .list_packs(proto::ListPacksRequest {
                    account_id: c.account,
                })
                .await?
                .into_inner();
            print_packs(out, &r.packs, &c.client)?;
        }
        Command::Grant(c) => {
            let item = proto::Item::from(c.item);
            // `now` is left to the server, like an omitted --valid-from, so
            // that a retry is the same grant.
            let from = c
                .valid_from
                .as_deref()
                .filter(|v| *v != "now")
                .map(|v| parse_time("--valid-from", v))
                .transpose()?;
            let (valid_until, valid_for) = match (&c.valid_until, &c.valid_for) {
                (Some(u), _) => (Some(parse_time("--valid-until", u)?), None),
                (None, Some(d)) => (None, Some(parse_validity(d)?)),
                (None, None) => {
                    return Err(usage("grant needs --valid-until or --valid-for".into()))
                }
            };
            let p = admin(&c.client)
                .await?
                .grant_pack(proto::GrantPackRequest {
                    account_id: c.account,
                    item: item as i32,
                    capacity: c.capacity,
                    valid_from: from.map(convert::timestamp),
                    valid_until: valid_until.map(convert::timestamp),
                    valid_for,
                    pack_id: c.pack_id,
                    priority: c.priority,
                })
                .await?
                .into_inner();
            if c.client.json {
                print_json(out, &PackOut::new(&p, c.client.utc))?;
            } else {
                print_packs(out, &[p], &c.client)?;
            }
        }
        Command::Flush(client) => {
            let r = admin(&client)
                .await?
                .flush(proto::FlushRequest {})
                .await?
                .into_inner();
            if client.json {
                print_json(
                    out,
                    &FlushOut {
                        accounts_flushed: r.accounts_flushed,
                    },
                )?;
            } else {
                writeln!(
                    out,
                    "flushed {} accounts; usage is durable",
                    r.accounts_flushed
                )?;
            }
        }
        Command::Export(c) => {
            let from = parse_time("--from", &c.from)?;
            let to = parse_time("--to", &c.to)?;
            let mut rows = admin(&c.client)
                .await?
                .export_usage(proto::ExportUsageRequest {
                    from: Some(convert::timestamp(from)),
                    to: Some(convert::timestamp(to)),
                    account_id: c.account.unwrap_or_default(),
                })
                .await?
                .into_inner();
            // Exports are keyed by UTC hour, whatever --utc says: billing
            // systems join them on it.
            let row = |r: proto::UsageRow| UsageRowOut {
                hour: show_ts(&r.hour, None),
                item: enum_name(r.item, |i: proto::Item| i.as_str_name()),
                source: enum_name(r.source, |s: proto::PackSource| s.as_str_name()),
                account_id: r.account_id,
                pack_id: r.pack_id,
                amount: if r.adjustment {
                    r.signed_amount
                } else {
                    i64::try_from(r.amount).unwrap_or(i64::MAX)
                },
                kind: if r.adjustment { "adjustment" } else { "usage" },
                plan: r.plan,
            };
            match c.format {
                ExportFormat::Csv => {
                    // Flushed per row: a consumer sees rows as they arrive.
                    // The header is written by hand, so an empty export has one too.
                    let mut csv = csv::WriterBuilder::new()
                        .has_headers(false)
                        .from_writer(out);
                    csv.write_record([
                        "account_id",
                        "hour",
                        "item",
                        "pack_id",
                        "source",
                        "amount",
                        "kind",
                        "plan",
                    ])
                    .map_err(csv_error)?;
                    csv.flush()?;
                    while let Some(r) = rows.message().await? {
                        let mut r = row(r);
                        r.account_id = neutralise_formula(r.account_id);
                        r.pack_id = neutralise_formula(r.pack_id);
                        r.plan = neutralise_formula(r.plan);
                        csv.serialize(r).map_err(csv_error)?;
                        csv.flush()?;
                    }
                }
                ExportFormat::Jsonl => {
                    while let Some(r) = rows.message().await? {
                        let line = serde_json::to_string(&row(r)).map_err(io::Error::other)?;
                        writeln!(out, "{line}")?;
                    }
                }
            }
        }
    }
    Ok(0)
}

/// Reads `--valid-for`: terms like `30d`, `1month`, `2y` or `1month 15d`.
/// Months and years become calendar months, counted by the server in its
/// billing zone; everything else is an exact length (humantime's units).
fn parse_validity(v: &str) -> Result<proto::Validity, Failure> {
    let bad = |why: String| {
        usage(format!(
            "--valid-for: `{v}` {why}; give a length like 30d, 1month, 1y or `1month 15d`"
        ))
    };
    let mut months: u32 = 0;
    let mut exact = String::new();
    let mut rest = v.trim();
    if rest.is_empty() {
        return Err(bad("is empty".into()));
    }
    while !rest.is_empty() {
        let digits = rest.len() - rest.trim_start_matches(|c: char| c.is_ascii_digit()).len();
        let (number, after) = rest.split_at(digits);
        let after = after.trim_start();
        let unit_len = after.len() - after.trim_start_matches(char::is_alphabetic).len();
        let (unit, after) = after.split_at(unit_len);
        if number.is_empty() || unit.is_empty() {
            return Err(bad(format!("is not a length at `{rest}`")));
        }
        let n: u32 = number
            .parse()
            .map_err(|_| bad(format!("has too large a number {number}")))?;
        let per = match unit {
            "month" | "months" | "mon" | "mons" | "M" => Some(1),
            "y" | "year" | "years" => Some(12),
            _ => None,
        };
        match per {
            Some(per) => {
                months = n
                    .checked_mul(per)
                    .and_then(|m| months.checked_add(m))
                    .ok_or_else(|| bad("has too many months".into()))?;
            }
            None => {
                exact.push_str(number);
                exact.push_str(unit);
                exact.push(' ');
            }
        }
        rest = after.trim_start();
    }
    let seconds = if exact.is_empty() {
        0
    } else {
        let d = packmeter::config::parse_duration(&exact).map_err(bad)?;
        if d.subsec_nanos() != 0 {
            return Err(bad("is not a whole number of seconds".into()));
        }
        d.as_secs()
    };
    if months == 0 && seconds == 0 {
        return Err(bad("is zero".into()));
    }
    Ok(proto::Validity { months, seconds })
}

/// Characters that make a spreadsheet read a cell as a formula (or, for tab
/// and carriage return, that some strip before doing so).
const FORMULA_START: [char; 6] = ['=', '+', '-', '@', '\t', '\r'];

/// A CSV cell neutralised against formula injection when it starts like a
/// formula: a `'` is put before it, which spreadsheets show as text. The
/// `csv` writer then quotes it if it holds a comma, quote or line break.
fn neutralise_formula(s: String) -> String {
    if s.starts_with(FORMULA_START) {
        format!("'{s}")
    } else {
        s
    }
}

/// A CSV write failure: only the output can fail (the rows are plain
/// strings and numbers).
fn csv_error(e: csv::Error) -> io::Error {
    match e.into_kind() {
        csv::ErrorKind::Io(e) => e,
        other => io::Error::other(format!("{other:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_cells_that_start_like_formulas_are_neutralised() {
        let cell = |v: &str| {
            let mut w = csv::Writer::from_writer(Vec::new());
            w.write_record([neutralise_formula(v.to_string())]).unwrap();
            String::from_utf8(w.into_inner().unwrap()).unwrap()
        };
        assert_eq!(cell("acme"), "acme\n");
        assert_eq!(cell("=1+1"), "'=1+1\n");
        assert_eq!(cell("+1"), "'+1\n");
        assert_eq!(cell("-1"), "'-1\n");
        assert_eq!(cell("@SUM(A1)"), "'@SUM(A1)\n");
        assert_eq!(
            cell("=HYPERLINK(\"x\",\"y\")"),
            "\"'=HYPERLINK(\"\"x\"\",\"\"y\"\")\"\n"
        );
        assert_eq!(cell("a,b"), "\"a,b\"\n");
    }

    #[test]
    fn validity_counts_months_and_exact_lengths_apart() {
        let v = |s: &str| parse_validity(s).map(|v| (v.months, v.seconds));
        assert_eq!(v("30d").unwrap(), (0, 30 * 86_400));
        assert_eq!(v("1month").unwrap(), (1, 0));
        assert_eq!(v("2 months").unwrap(), (2, 0));
        assert_eq!(v("1y").unwrap(), (12, 0));
        assert_eq!(v("1month 15d").unwrap(), (1, 15 * 86_400));
        assert_eq!(v("1h30m").unwrap(), (0, 5_400));
        for bad in [
            "",
            "0d",
            "month",
            "5",
            "1.5d",
            "30x",
            "1ms",
            "99999999999months",
        ] {
            let e = parse_validity(bad).unwrap_err();
            assert_eq!(e.code, EX_USAGE, "{bad}");
            assert!(e.message.starts_with("--valid-for"), "{bad}: {}", e.message);
        }
    }
}
