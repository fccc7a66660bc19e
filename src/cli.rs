//! The `packmeter` command line: `serve`, and client commands for a running
//! server (`deduct`, `usage`, `account`, `packs`, `grant`, `flush`, `export`).
//!
//! Client commands print aligned tables by default and JSON with `--json`.
//! Exit codes: 0 success, 1 the server refused or failed, 64 bad usage or
//! configuration, 69 the server cannot be reached.

use std::{io::Write, process::ExitCode};

use clap::{Args, Parser, Subcommand};
use serde_json::{json, Value};
use tonic::{transport::Channel, Code, Status};

use crate::{
    calendar::{self, Ts},
    config::{Config, LogFormat, ServeArgs},
    grpc::{
        convert,
        proto::{self, admin_client::AdminClient, meter_client::MeterClient},
    },
};

const EX_USAGE: u8 = 64;
const EX_UNAVAILABLE: u8 = 69;

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
    /// The server's gRPC address.
    #[arg(
        long,
        env = "PACKMETER_SERVER",
        default_value = "http://127.0.0.1:50051",
        global = true
    )]
    pub server: String,
    /// Print JSON instead of a table.
    #[arg(long, global = true)]
    pub json: bool,
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
    #[arg(long)]
    pub at: Option<String>,
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
    /// Create or change an account; settings not given keep their current value.
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
    /// calls or egress_bytes.
    #[arg(long)]
    pub item: String,
    #[arg(long)]
    pub capacity: u64,
    /// RFC 3339; default: now.
    #[arg(long)]
    pub valid_from: Option<String>,
    /// RFC 3339, exclusive. Give this or --valid-for.
    #[arg(long, conflicts_with = "valid_for")]
    pub valid_until: Option<String>,
    /// Validity from --valid-from, e.g. 30d.
    #[arg(long)]
    pub valid_for: Option<String>,
    /// Makes the grant idempotent; default: a fresh id.
    #[arg(long, default_value = "")]
    pub pack_id: String,
    /// Higher priorities are deducted first among purchased packs.
    #[arg(long, default_value_t = 0)]
    pub priority: u32,
    #[command(flatten)]
    pub client: ClientOpts,
}

#[derive(Debug, Args)]
pub struct ExportCmd {
    /// First hour, RFC 3339 (inclusive).
    #[arg(long)]
    pub from: String,
    /// End, RFC 3339 (exclusive).
    #[arg(long)]
    pub to: String,
    #[arg(long, value_parser = ["csv", "jsonl"], default_value = "csv")]
    pub format: String,
    /// One account only.
    #[arg(long)]
    pub account: Option<String>,
    #[command(flatten)]
    pub client: ClientOpts,
}

/// A client-side failure, with the exit code it maps to.
#[derive(Debug)]
struct Failure {
    code: u8,
    message: String,
}

impl From<Status> for Failure {
    fn from(s: Status) -> Failure {
        let code = if s.code() == Code::Unavailable {
            EX_UNAVAILABLE
        } else {
            1
        };
        Failure {
            code,
            message: format!("{:?}: {}", s.code(), s.message()),
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
    let cli = match Cli::try_parse() {
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
                Ok(()) => ExitCode::SUCCESS,
                Err(f) => {
                    eprintln!("packmeter: {}", f.message);
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
            eprintln!("packmeter: invalid configuration: {e}");
            return ExitCode::from(EX_USAGE);
        }
    };
    init_tracing(config.log_format);
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("packmeter: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let served = rt.block_on(async {
        // Before anything is bound, so an early SIGTERM still drains.
        let signal = crate::server::shutdown_signal().map_err(crate::server::ServeError::Signal)?;
        crate::server::serve(config, signal).await
    });
    // A store call still blocked (SQLite waiting for a lock it will not get)
    // must not hold the exit past the grace period. Its transaction rolls
    // back when the process exits, or it committed, in which case the spill
    // file's copy of the batch carries the same id and is skipped at replay.
    rt.shutdown_timeout(std::time::Duration::from_millis(200));
    match served {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "packmeter stopped");
            eprintln!("packmeter: {e}");
            ExitCode::from(e.exit_code())
        }
    }
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

async fn connect(opts: &ClientOpts) -> Result<Channel, Failure> {
    let endpoint = Channel::from_shared(opts.server.clone()).map_err(|e| {
        usage(format!(
            "--server `{}` is not a URL like http://127.0.0.1:50051: {e}",
            opts.server
        ))
    })?;
    endpoint.connect().await.map_err(|e| Failure {
        code: EX_UNAVAILABLE,
        message: format!(
            "cannot connect to {}: {e}; is `packmeter serve` running? Set --server or PACKMETER_SERVER",
            opts.server
        ),
    })
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

fn show_ts(t: &Option<prost_types::Timestamp>) -> String {
    t.as_ref()
        .and_then(|t| convert::ts("", Some(t)).ok().flatten())
        .map(|ts| calendar::to_datetime(ts).to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
        .unwrap_or_default()
}

fn enum_name<E: TryFrom<i32>>(v: i32, name: impl Fn(E) -> &'static str) -> String {
    E::try_from(v).map(name).unwrap_or("UNKNOWN").to_string()
}

fn print_json(v: &Value) {
    println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
}

/// Prints rows as a table with left-aligned columns.
fn print_table(headers: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let s: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        println!("{}", s.join("  ").trim_end());
    };
    line(headers.to_vec());
    for row in rows {
        line(row.iter().map(String::as_str).collect());
    }
}

fn pack_json(p: &proto::Pack) -> Value {
    json!({
        "pack_id": p.pack_id,
        "account_id": p.account_id,
        "source": enum_name(p.source, |s: proto::PackSource| s.as_str_name()),
        "item": enum_name(p.item, |s: proto::Item| s.as_str_name()),
        "capacity": p.capacity,
        "used": p.used,
        "remaining": p.capacity.saturating_sub(p.used),
        "valid_from": show_ts(&p.valid_from),
        "valid_until": show_ts(&p.valid_until),
        "priority": p.priority,
    })
}

fn print_packs(packs: &[proto::Pack], json_out: bool) {
    if json_out {
        print_json(&Value::Array(packs.iter().map(pack_json).collect()));
        return;
    }
    let rows: Vec<Vec<String>> = packs
        .iter()
        .map(|p| {
            vec![
                p.pack_id.clone(),
                enum_name(p.source, |s: proto::PackSource| s.as_str_name()),
                enum_name(p.item, |s: proto::Item| s.as_str_name()),
                p.capacity.to_string(),
                p.used.to_string(),
                p.capacity.saturating_sub(p.used).to_string(),
                show_ts(&p.valid_from),
                show_ts(&p.valid_until),
            ]
        })
        .collect();
    print_table(
        &[
            "PACK",
            "SOURCE",
            "ITEM",
            "CAPACITY",
            "USED",
            "REMAINING",
            "VALID FROM",
            "VALID UNTIL",
        ],
        &rows,
    );
}

fn account_json(a: &proto::Account) -> Value {
    json!({
        "account_id": a.account_id,
        "activated_at": show_ts(&a.activated_at),
        "suspended": a.suspended,
        "deny_on_exhausted": a.deny_on_exhausted,
    })
}

fn print_account(a: &proto::Account, json_out: bool) {
    if json_out {
        return print_json(&account_json(a));
    }
    let rows = [
        ("account_id", a.account_id.clone()),
        ("activated_at", show_ts(&a.activated_at)),
        ("suspended", a.suspended.to_string()),
        ("deny_on_exhausted", a.deny_on_exhausted.to_string()),
    ]
    .into_iter()
    .map(|(k, v)| vec![k.to_string(), v])
    .collect::<Vec<_>>();
    print_table(&["FIELD", "VALUE"], &rows);
}

async fn client(cmd: Command) -> Result<(), Failure> {
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
                let o = |o: &proto::Outcome| json!({"covered": o.covered, "overage": o.overage, "remaining": o.remaining});
                print_json(&json!({
                    "decision": decision,
                    "duplicate": r.duplicate,
                    "deny_reason": r.deny_reason,
                    "calls": o(&calls),
                    "egress_bytes": o(&egress),
                }));
            } else {
                let mut head = format!("decision: {decision}");
                if r.duplicate {
                    head.push_str(" (duplicate: nothing deducted again)");
                }
                if !r.deny_reason.is_empty() {
                    head.push_str(&format!(" ({})", r.deny_reason));
                }
                println!("{head}");
                let row = |name: &str, o: &proto::Outcome| {
                    vec![
                        name.to_string(),
                        o.covered.to_string(),
                        o.overage.to_string(),
                        o.remaining.to_string(),
                    ]
                };
                print_table(
                    &["ITEM", "COVERED", "OVERAGE", "REMAINING"],
                    &[row("calls", &calls), row("egress_bytes", &egress)],
                );
            }
        }
        Command::Usage(c) => {
            let r = MeterClient::new(connect(&c.client).await?)
                .get_usage(proto::GetUsageRequest {
                    account_id: c.account,
                    at: opt_time("--at", &c.at)?,
                })
                .await?
                .into_inner();
            print_packs(&r.packs, c.client.json);
        }
        Command::Account(AccountCmd::Get { account, client }) => {
            let a = AdminClient::new(connect(&client).await?)
                .get_account(proto::GetAccountRequest {
                    account_id: account,
                })
                .await?
                .into_inner();
            print_account(&a, client.json);
        }
        Command::Account(AccountCmd::Put {
            account,
            activated_at,
            suspended,
            deny_on_exhausted,
            client,
        }) => {
            let activated_at = opt_time("--activated-at", &activated_at)?;
            let mut admin = AdminClient::new(connect(&client).await?);
            let current = match admin
                .get_account(proto::GetAccountRequest {
                    account_id: account.clone(),
                })
                .await
            {
                Ok(a) => Some(a.into_inner()),
                Err(s) if s.code() == Code::NotFound => None,
                Err(s) => return Err(s.into()),
            };
            let current = current.unwrap_or_default();
            let a = admin
                .put_account(proto::PutAccountRequest {
                    account: Some(proto::Account {
                        account_id: account,
                        activated_at: activated_at.or(current.activated_at),
                        suspended: suspended.unwrap_or(current.suspended),
                        deny_on_exhausted: deny_on_exhausted.unwrap_or(current.deny_on_exhausted),
                    }),
                })
                .await?
                .into_inner();
            print_account(&a, client.json);
        }
        Command::Packs(c) => {
            let r = AdminClient::new(connect(&c.client).await?)
                .list_packs(proto::ListPacksRequest {
                    account_id: c.account,
                })
                .await?
                .into_inner();
            print_packs(&r.packs, c.client.json);
        }
        Command::Grant(c) => {
            let item = match c.item.as_str() {
                "calls" => proto::Item::Calls,
                "egress_bytes" | "egress" => proto::Item::EgressBytes,
                other => {
                    return Err(usage(format!(
                        "--item: `{other}` is not calls or egress_bytes"
                    )))
                }
            };
            let from = c
                .valid_from
                .as_deref()
                .map(|v| parse_time("--valid-from", v))
                .transpose()?;
            let until = match (&c.valid_until, &c.valid_for) {
                (Some(u), _) => parse_time("--valid-until", u)?,
                (None, Some(d)) => {
                    let d = crate::config::parse_duration(d).map_err(|e| {
                        usage(format!(
                            "--valid-for: `{d}` is not a duration like 30d ({e})"
                        ))
                    })?;
                    from.unwrap_or_else(calendar::now_ts)
                        .saturating_add(i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
                }
                (None, None) => {
                    return Err(usage("grant needs --valid-until or --valid-for".into()))
                }
            };
            let p = AdminClient::new(connect(&c.client).await?)
                .grant_pack(proto::GrantPackRequest {
                    account_id: c.account,
                    item: item as i32,
                    capacity: c.capacity,
                    valid_from: from.map(convert::timestamp),
                    valid_until: Some(convert::timestamp(until)),
                    pack_id: c.pack_id,
                    priority: c.priority,
                })
                .await?
                .into_inner();
            if c.client.json {
                print_json(&pack_json(&p));
            } else {
                print_packs(&[p], false);
            }
        }
        Command::Flush(client) => {
            let r = AdminClient::new(connect(&client).await?)
                .flush(proto::FlushRequest {})
                .await?
                .into_inner();
            if client.json {
                print_json(&json!({"accounts_flushed": r.accounts_flushed}));
            } else {
                println!("flushed {} accounts; usage is durable", r.accounts_flushed);
            }
        }
        Command::Export(c) => {
            let from = parse_time("--from", &c.from)?;
            let to = parse_time("--to", &c.to)?;
            let mut rows = AdminClient::new(connect(&c.client).await?)
                .export_usage(proto::ExportUsageRequest {
                    from: Some(convert::timestamp(from)),
                    to: Some(convert::timestamp(to)),
                    account_id: c.account.unwrap_or_default(),
                })
                .await?
                .into_inner();
            let stdout = std::io::stdout();
            let mut out = std::io::BufWriter::new(stdout.lock());
            let io = |e: std::io::Error| Failure {
                code: 1,
                message: format!("cannot write: {e}"),
            };
            if c.format == "csv" {
                writeln!(out, "account_id,hour,item,pack_id,source,amount").map_err(io)?;
            }
            while let Some(r) = rows.message().await? {
                let hour = show_ts(&r.hour);
                let item = enum_name(r.item, |i: proto::Item| i.as_str_name());
                let source = enum_name(r.source, |s: proto::PackSource| s.as_str_name());
                if c.format == "csv" {
                    writeln!(
                        out,
                        "{},{},{},{},{},{}",
                        csv_field(&r.account_id),
                        hour,
                        item,
                        csv_field(&r.pack_id),
                        source,
                        r.amount
                    )
                    .map_err(io)?;
                } else {
                    let v = json!({
                        "account_id": r.account_id, "hour": hour, "item": item,
                        "pack_id": r.pack_id, "source": source, "amount": r.amount,
                    });
                    writeln!(out, "{v}").map_err(io)?;
                }
            }
            out.flush().map_err(io)?;
        }
    }
    Ok(())
}

/// Quotes a CSV field when it holds a comma, quote or line break.
fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}
