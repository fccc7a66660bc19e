//! `packmeter loadgen`: a closed-loop load generator for the hot-path RPCs.
//!
//! `--concurrency` tasks each keep one request in flight (`Deduct`,
//! `DeductBatch` or `ShouldRateLimit`), or one window of `--batch` messages
//! on their own `DeductStream`. The tasks are spread round-robin over
//! `--connections` HTTP/2 channels. Accounts are drawn uniformly from
//! `--accounts` ids with a seeded generator (fastrand), so two runs send the same
//! sequence.
//!
//! After `--warmup`, requests that complete within `--duration` count: their
//! latencies go into an HDR histogram. The run ends with one line,
//!
//! ```text
//! rpc=deduct ops/s=… p50=…us p99=…us p999=…us errors=N deductions/s=… [server_cpu_us/op=…]
//! ```
//!
//! followed, for the Meter RPCs, by `calls_covered=N calls_overage=N`: the
//! calls the server answered as covered by packs and as overage, summed
//! over the whole run (priming and warm-up included), to compare with what
//! the store holds once flushed (benches/fleet.sh). Or one JSON object with
//! `--json`. With `--server-pid`, the server's
//! user+system CPU time over the measured window (from `/proc/PID/stat`) is
//! divided by the operations and deductions completed in it: on a machine
//! shared with the load generator, that is the number to compare against a
//! `serve --noop` baseline.

use std::{
    io::IsTerminal,
    process::ExitCode,
    sync::{
        atomic::{AtomicU64, Ordering::Relaxed},
        Arc,
    },
    time::Duration,
};

use envoy_types::pb::envoy::{
    extensions::common::ratelimit::v3::{rate_limit_descriptor::Entry, RateLimitDescriptor},
    service::ratelimit::v3::{rate_limit_service_client::RateLimitServiceClient, RateLimitRequest},
};
use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use tokio::time::Instant;
use tonic::{
    transport::{Channel, Endpoint},
    Code, Status,
};

use packmeter::grpc::proto::{self, admin_client::AdminClient, meter_client::MeterClient};

const EX_USAGE: u8 = 64;
const EX_UNAVAILABLE: u8 = 69;

/// Which RPC to drive.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Rpc {
    /// Unary `Meter.Deduct`, one deduction per call.
    Deduct,
    /// `Meter.DeductBatch`, `--batch` deductions per call.
    Batch,
    /// `Meter.DeductStream`, windows of `--batch` messages per stream.
    Stream,
    /// Envoy's `RateLimitService.ShouldRateLimit`, one descriptor per call.
    Rls,
}

impl Rpc {
    fn as_str(self) -> &'static str {
        match self {
            Rpc::Deduct => "deduct",
            Rpc::Batch => "batch",
            Rpc::Stream => "stream",
            Rpc::Rls => "rls",
        }
    }
}

#[derive(Debug, Clone, clap::Args)]
pub struct LoadgenArgs {
    /// The server's gRPC address: http://HOST:PORT, or https://HOST:PORT
    /// for a server with TLS.
    #[arg(
        long,
        env = "PACKMETER_SERVER",
        default_value = "http://127.0.0.1:50051"
    )]
    pub server: String,
    /// PEM file of a CA to trust for an https:// --server (as the CLI's).
    #[arg(
        long = "tls-ca-file",
        alias = "tls-ca",
        env = "PACKMETER_TLS_CA_FILE",
        value_name = "FILE"
    )]
    pub tls_ca_file: Option<std::path::PathBuf>,
    /// PEM client certificate for a server that asks for one, with --tls-key-file.
    #[arg(long, env = "PACKMETER_TLS_CLIENT_CERT_FILE", value_name = "FILE")]
    pub tls_cert_file: Option<std::path::PathBuf>,
    /// PEM private key of --tls-cert-file.
    #[arg(long, env = "PACKMETER_TLS_CLIENT_KEY_FILE", value_name = "FILE")]
    pub tls_key_file: Option<std::path::PathBuf>,
    /// The RPC to drive.
    #[arg(long, value_enum, default_value = "deduct")]
    pub rpc: Rpc,
    /// Requests (or stream windows) in flight at once.
    #[arg(long, default_value_t = 64)]
    pub concurrency: usize,
    /// HTTP/2 connections; the in-flight requests are spread round-robin.
    #[arg(long, default_value_t = 1)]
    pub connections: usize,
    /// How long to measure, after the warm-up (e.g. 10s).
    #[arg(long, default_value = "10s", value_parser = packmeter::config::parse_duration)]
    pub duration: Duration,
    /// How long to run before measuring.
    #[arg(long, default_value = "2s", value_parser = packmeter::config::parse_duration)]
    pub warmup: Duration,
    /// Distinct account ids, drawn uniformly.
    #[arg(long, default_value_t = 10_000)]
    pub accounts: u64,
    /// Deductions per DeductBatch call, or per stream window.
    #[arg(long, default_value_t = 100)]
    pub batch: usize,
    /// Calls per deduction (the RLS hits_addend).
    #[arg(long, default_value_t = 1)]
    pub calls: u64,
    /// Egress bytes per deduction (Meter RPCs only).
    #[arg(long, default_value_t = 0)]
    pub egress_bytes: u64,
    /// The domain sent with ShouldRateLimit.
    #[arg(long, default_value = "packmeter")]
    pub domain: String,
    /// Before the warm-up, deduct once for every account (with DeductBatch)
    /// and flush, so the measured window sees resident accounts only. With
    /// `--duration 0s`, only prime.
    #[arg(long)]
    pub prime: bool,
    /// The server's process id: report its CPU time per operation over the
    /// measured window, from /proc/PID/stat.
    #[arg(long, value_name = "PID")]
    pub server_pid: Option<u32>,
    /// Print the final line as JSON.
    #[arg(long)]
    pub json: bool,
    /// Seed of the account sequence.
    #[arg(long, default_value_t = 0x5EED_2024)]
    pub seed: u64,
    /// Runtime worker threads [default: the CPUs this process may use; 1
    /// uses a single-threaded runtime].
    #[arg(long)]
    pub threads: Option<usize>,
}

/// Entry point for `packmeter loadgen`.
pub fn main(args: &LoadgenArgs) -> ExitCode {
    if args.concurrency == 0 || args.connections == 0 || args.accounts == 0 || args.batch == 0 {
        eprintln!("packmeter loadgen: --concurrency, --connections, --accounts and --batch must be at least 1");
        return ExitCode::from(EX_USAGE);
    }
    if args.duration.is_zero() && !args.prime {
        eprintln!("packmeter loadgen: --duration must be more than 0 (0 only with --prime, to prime and stop)");
        return ExitCode::from(EX_USAGE);
    }
    let threads = args.threads.unwrap_or_else(|| {
        std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
    });
    let rt = if threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .enable_all()
            .build()
    };
    let rt = match rt {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("packmeter loadgen: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(args.clone())) {
        Ok(None) => ExitCode::SUCCESS,
        Ok(Some(report)) => {
            println!("{}", report.line(args.json));
            if report.ops == 0 {
                eprintln!("packmeter loadgen: no request succeeded in the measured window");
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            }
        }
        Err((code, message)) => {
            eprintln!("packmeter loadgen: {message}");
            ExitCode::from(code)
        }
    }
}

// === the account sequence ===

/// The account picker: fastrand's seeded generator, so two runs with the
/// same `--seed` send the same sequence of accounts.
struct Picker(fastrand::Rng);

impl Picker {
    fn new(seed: u64) -> Picker {
        Picker(fastrand::Rng::with_seed(seed))
    }

    /// Uniform in `0..n`.
    fn below(&mut self, n: u64) -> usize {
        self.0.u64(..n.max(1)) as usize
    }
}

/// The account id for index `i`; loadgen accounts are easy to spot in the store.
pub fn account_id(i: u64) -> String {
    format!("loadgen-{i:07}")
}

// === the run ===

struct Plan {
    args: LoadgenArgs,
    ids: Vec<String>,
    channels: Vec<Channel>,
    warm_end: Instant,
    end: Instant,
    /// Completed operations since the start, warm-up included, for the progress display.
    done: AtomicU64,
    /// Calls the server answered as covered by packs, and as overage, over
    /// the whole run (priming and warm-up included).
    answered: Answered,
}

/// What the server answered, summed over every acknowledged deduction.
#[derive(Default)]
struct Answered {
    calls_covered: AtomicU64,
    calls_overage: AtomicU64,
}

impl Answered {
    fn count(&self, r: &proto::DeductResponse) {
        let calls = r.calls.unwrap_or_default();
        self.calls_covered.fetch_add(calls.covered, Relaxed);
        self.calls_overage.fetch_add(calls.overage, Relaxed);
    }
}

/// What one task saw in the measured window.
struct Tally {
    hist: Histogram<u64>,
    ops: u64,
    errors: u64,
    first_error: Option<Status>,
}

impl Tally {
    fn new() -> Tally {
        Tally {
            // 1 ns to 100 s at 3 significant digits.
            hist: Histogram::new_with_bounds(1, 100_000_000_000, 3)
                .expect("static histogram bounds are valid"),
            ops: 0,
            errors: 0,
            first_error: None,
        }
    }

    fn merge(&mut self, other: Tally) {
        // Both were made with the same bounds, so adding cannot fail.
        let _ = self.hist.add(&other.hist);
        self.ops += other.ops;
        self.errors += other.errors;
        if self.first_error.is_none() {
            self.first_error = other.first_error;
        }
    }
}

impl Plan {
    fn deduct_request(&self, rng: &mut Picker) -> proto::DeductRequest {
        let id = &self.ids[rng.below(self.args.accounts)];
        proto::DeductRequest {
            account_id: id.clone(),
            calls: self.args.calls,
            egress_bytes: self.args.egress_bytes,
            at: None,
            request_id: String::new(),
        }
    }

    fn rls_request(&self, rng: &mut Picker) -> RateLimitRequest {
        let id = &self.ids[rng.below(self.args.accounts)];
        RateLimitRequest {
            domain: self.args.domain.clone(),
            descriptors: vec![RateLimitDescriptor {
                entries: vec![
                    Entry {
                        key: "account".into(),
                        value: id.clone(),
                    },
                    Entry {
                        key: "item".into(),
                        value: "calls".into(),
                    },
                ],
                ..RateLimitDescriptor::default()
            }],
            hits_addend: u32::try_from(self.args.calls).unwrap_or(u32::MAX),
        }
    }

    /// Counts one finished operation that started at `started`.
    fn finish(&self, tally: &mut Tally, started: Instant, r: Result<(), Status>) {
        let now = Instant::now();
        self.done.fetch_add(1, Relaxed);
        if now < self.warm_end || now >= self.end {
            return;
        }
        match r {
            Ok(()) => {
                let ns = u64::try_from((now - started).as_nanos()).unwrap_or(u64::MAX);
                tally.hist.saturating_record(ns.max(1));
                tally.ops += 1;
            }
            Err(s) => {
                tally.errors += 1;
                tally.first_error.get_or_insert(s);
            }
        }
    }
}

async fn unary_worker(plan: Arc<Plan>, task: usize) -> Tally {
    let mut rng = Picker::new(plan.args.seed.wrapping_add(task as u64));
    let channel = plan.channels[task % plan.channels.len()].clone();
    let mut meter = MeterClient::new(channel.clone());
    let mut rls = RateLimitServiceClient::new(channel);
    let mut tally = Tally::new();
    while Instant::now() < plan.end {
        let started = Instant::now();
        let r = match plan.args.rpc {
            Rpc::Deduct => meter
                .deduct(plan.deduct_request(&mut rng))
                .await
                .map(|r| plan.answered.count(r.get_ref())),
            Rpc::Batch => {
                let deductions = (0..plan.args.batch)
                    .map(|_| plan.deduct_request(&mut rng))
                    .collect();
                meter
                    .deduct_batch(proto::DeductBatchRequest { deductions })
                    .await
                    .map(|r| {
                        r.get_ref()
                            .results
                            .iter()
                            .for_each(|r| plan.answered.count(r))
                    })
            }
            Rpc::Rls => rls
                .should_rate_limit(plan.rls_request(&mut rng))
                .await
                .map(drop),
            Rpc::Stream => unreachable!("streams run in stream_worker"),
        };
        plan.finish(&mut tally, started, r);
    }
    tally
}

/// One DeductStream per task; each operation is a window of `--batch`
/// messages sent, then their `--batch` replies read.
async fn stream_worker(plan: Arc<Plan>, task: usize) -> Tally {
    let mut rng = Picker::new(plan.args.seed.wrapping_add(task as u64));
    let mut meter = MeterClient::new(plan.channels[task % plan.channels.len()].clone());
    let mut tally = Tally::new();
    let batch = plan.args.batch;
    'reopen: while Instant::now() < plan.end {
        let (tx, rx) = tokio::sync::mpsc::channel(batch);
        let mut replies = match meter
            .deduct_stream(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
        {
            Ok(r) => r.into_inner(),
            Err(s) => {
                plan.finish(&mut tally, Instant::now(), Err(s));
                continue;
            }
        };
        while Instant::now() < plan.end {
            let started = Instant::now();
            for _ in 0..batch {
                if tx.send(plan.deduct_request(&mut rng)).await.is_err() {
                    let s = Status::new(Code::Aborted, "the server closed the stream");
                    plan.finish(&mut tally, started, Err(s));
                    continue 'reopen;
                }
            }
            let mut r = Ok(());
            for _ in 0..batch {
                match replies.message().await {
                    Ok(Some(m)) => plan.answered.count(&m),
                    Ok(None) => {
                        r = Err(Status::new(Code::Aborted, "the server ended the stream"));
                        break;
                    }
                    Err(s) => {
                        r = Err(s);
                        break;
                    }
                }
            }
            let broken = r.is_err();
            plan.finish(&mut tally, started, r);
            if broken {
                continue 'reopen;
            }
        }
    }
    tally
}

/// Deducts once for every account, with DeductBatch, then flushes: the
/// accounts are resident and durable before the warm-up starts.
async fn prime(plan: &Arc<Plan>) -> Result<(), Status> {
    const CHUNK: usize = 1_000;
    let next = Arc::new(AtomicU64::new(0));
    let workers = plan.channels.len().max(4);
    let mut handles = Vec::new();
    for w in 0..workers {
        let (plan, next) = (plan.clone(), next.clone());
        handles.push(tokio::spawn(async move {
            let mut meter = MeterClient::new(plan.channels[w % plan.channels.len()].clone());
            loop {
                let from = next.fetch_add(CHUNK as u64, Relaxed);
                if from >= plan.args.accounts {
                    return Ok::<(), Status>(());
                }
                let to = (from + CHUNK as u64).min(plan.args.accounts);
                let deductions = (from..to)
                    .map(|i| proto::DeductRequest {
                        account_id: plan.ids[i as usize].clone(),
                        calls: plan.args.calls,
                        egress_bytes: plan.args.egress_bytes,
                        at: None,
                        request_id: String::new(),
                    })
                    .collect();
                let r = meter
                    .deduct_batch(proto::DeductBatchRequest { deductions })
                    .await?;
                r.get_ref()
                    .results
                    .iter()
                    .for_each(|r| plan.answered.count(r));
            }
        }));
    }
    for h in handles {
        h.await
            .map_err(|e| Status::internal(format!("prime task failed: {e}")))??;
    }
    // `serve --noop` has no Admin service: nothing to flush there. The
    // flush is an admin call: it carries PACKMETER_ADMIN_TOKEN, if set.
    let token = std::env::var("PACKMETER_ADMIN_TOKEN").ok();
    let bearer = crate::cli::Bearer::from_token(token.as_deref().map(|t| t.trim().as_bytes()))
        .map_err(|e| Status::invalid_argument(format!("PACKMETER_ADMIN_TOKEN: {e}")))?;
    match AdminClient::with_interceptor(plan.channels[0].clone(), bearer)
        .flush(proto::FlushRequest {})
        .await
    {
        Ok(_) => Ok(()),
        Err(s) if s.code() == Code::Unimplemented => Ok(()),
        Err(s) => Err(s),
    }
}

/// Reads a process's user + system CPU time from `/proc/PID/stat`.
fn cpu_time(pid: u32, ticks_per_s: u64) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces; fields after it are plain.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line; `rest`
    // starts at field 3.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(Duration::from_micros(
        (utime + stime).saturating_mul(1_000_000) / ticks_per_s.max(1),
    ))
}

/// The kernel's clock ticks per second (`getconf CLK_TCK`), 100 if unknown.
fn clock_ticks() -> u64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100)
}

/// The result of a run.
pub struct Report {
    pub rpc: Rpc,
    pub ops: u64,
    pub errors: u64,
    pub seconds: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub deductions_per_op: u64,
    /// Server CPU time in the measured window.
    pub server_cpu: Option<Duration>,
    pub concurrency: usize,
    pub connections: usize,
    pub accounts: u64,
    /// Calls answered as covered by packs and as overage, over the whole
    /// run (priming and warm-up included); `None` for `ShouldRateLimit`,
    /// whose answer does not say.
    pub calls_answered: Option<(u64, u64)>,
}

impl Report {
    fn ops_per_s(&self) -> f64 {
        self.ops as f64 / self.seconds
    }

    fn cpu_us_per(&self, n: u64) -> Option<f64> {
        let cpu = self.server_cpu?;
        (n > 0).then(|| cpu.as_secs_f64() * 1e6 / n as f64)
    }

    /// The final line: `key=value` pairs, or JSON.
    pub fn line(&self, json: bool) -> String {
        let deductions = self.ops * self.deductions_per_op;
        let cpu_op = self.cpu_us_per(self.ops);
        let cpu_deduction = self.cpu_us_per(deductions);
        if json {
            return serde_json::json!({
                "rpc": self.rpc.as_str(),
                "ops_per_s": self.ops_per_s(),
                "p50_us": self.p50_us,
                "p99_us": self.p99_us,
                "p999_us": self.p999_us,
                "errors": self.errors,
                "deductions_per_s": deductions as f64 / self.seconds,
                "server_cpu_us_per_op": cpu_op,
                "server_cpu_us_per_deduction": cpu_deduction,
                "ops": self.ops,
                "seconds": self.seconds,
                "concurrency": self.concurrency,
                "connections": self.connections,
                "accounts": self.accounts,
                "calls_covered": self.calls_answered.map(|a| a.0),
                "calls_overage": self.calls_answered.map(|a| a.1),
            })
            .to_string();
        }
        let mut line = format!(
            "rpc={} ops/s={:.0} p50={:.1}us p99={:.1}us p999={:.1}us errors={} deductions/s={:.0}",
            self.rpc.as_str(),
            self.ops_per_s(),
            self.p50_us,
            self.p99_us,
            self.p999_us,
            self.errors,
            deductions as f64 / self.seconds,
        );
        if let Some(c) = cpu_op {
            line.push_str(&format!(" server_cpu_us/op={c:.2}"));
        }
        if let (Some(c), true) = (cpu_deduction, self.deductions_per_op > 1) {
            line.push_str(&format!(" server_cpu_us/deduction={c:.3}"));
        }
        line.push_str(&format!(
            " concurrency={} connections={} accounts={}",
            self.concurrency, self.connections, self.accounts
        ));
        if let Some((covered, overage)) = self.calls_answered {
            line.push_str(&format!(" calls_covered={covered} calls_overage={overage}"));
        }
        line
    }
}

async fn connect(args: &LoadgenArgs) -> Result<Vec<Channel>, (u8, String)> {
    let (server, n) = (args.server.as_str(), args.connections);
    let endpoint = Endpoint::from_shared(server.to_string())
        .map_err(|e| (EX_USAGE, format!("--server `{server}` is not a URL: {e}")))?;
    let files = crate::cli::ClientTlsFiles {
        ca: args.tls_ca_file.clone(),
        cert: args.tls_cert_file.clone(),
        key: args.tls_key_file.clone(),
    };
    let https = endpoint.uri().scheme_str() == Some("https");
    let endpoint = match crate::cli::client_tls(https, server, &files).map_err(|e| (EX_USAGE, e))? {
        None => endpoint,
        Some(tls) => endpoint.tls_config(tls).map_err(|e| {
            (
                EX_USAGE,
                format!("--server `{server}`: cannot set up TLS: {e}"),
            )
        })?,
    };
    let mut channels = Vec::with_capacity(n);
    for _ in 0..n {
        // One connect per channel: each is its own HTTP/2 connection.
        let c = endpoint
            .clone()
            .tcp_nodelay(true)
            .connect()
            .await
            .map_err(|e| (EX_UNAVAILABLE, format!("cannot connect to {server}: {e}")))?;
        channels.push(c);
    }
    Ok(channels)
}

fn progress(total: Duration) -> ProgressBar {
    let target = if std::io::stdout().is_terminal() {
        ProgressDrawTarget::stdout()
    } else {
        ProgressDrawTarget::hidden()
    };
    let bar = ProgressBar::with_draw_target(Some(total.as_millis() as u64), target);
    if let Ok(style) =
        ProgressStyle::with_template("{spinner} [{elapsed_precise}] {wide_bar} {msg}")
    {
        bar.set_style(style);
    }
    bar
}

async fn run(args: LoadgenArgs) -> Result<Option<Report>, (u8, String)> {
    let channels = connect(&args).await?;
    let ids: Vec<String> = (0..args.accounts).map(account_id).collect();
    let mut plan = Plan {
        args: args.clone(),
        ids,
        channels,
        warm_end: Instant::now(),
        end: Instant::now(),
        done: AtomicU64::new(0),
        answered: Answered::default(),
    };
    if args.prime {
        let started = Instant::now();
        let primer = Arc::new(plan);
        prime(&primer).await.map_err(|s| {
            (
                1,
                format!("priming failed: {:?}: {}", s.code(), s.message()),
            )
        })?;
        eprintln!(
            "primed {} accounts in {:.1}s",
            args.accounts,
            started.elapsed().as_secs_f64()
        );
        plan = Arc::into_inner(primer).expect("the prime tasks have ended");
        if args.duration.is_zero() {
            return Ok(None);
        }
    }
    let start = Instant::now();
    plan.warm_end = start + args.warmup;
    plan.end = plan.warm_end + args.duration;
    let plan = Arc::new(plan);

    let ticks = clock_ticks();
    let cpu = args.server_pid.map(|pid| {
        let plan = plan.clone();
        tokio::spawn(async move {
            tokio::time::sleep_until(plan.warm_end).await;
            let before = cpu_time(pid, ticks);
            tokio::time::sleep_until(plan.end).await;
            let after = cpu_time(pid, ticks);
            before.zip(after).map(|(b, a)| a.saturating_sub(b))
        })
    });

    let mut tasks = Vec::with_capacity(args.concurrency);
    for t in 0..args.concurrency {
        let plan = plan.clone();
        tasks.push(match args.rpc {
            Rpc::Stream => tokio::spawn(stream_worker(plan, t)),
            _ => tokio::spawn(unary_worker(plan, t)),
        });
    }

    let bar = progress(args.warmup + args.duration);
    let ticker = {
        let (plan, bar) = (plan.clone(), bar.clone());
        tokio::spawn(async move {
            let mut last = (Instant::now(), 0u64);
            loop {
                tokio::time::sleep(Duration::from_millis(250)).await;
                let now = Instant::now();
                let done = plan.done.load(Relaxed);
                let rate = (done - last.1) as f64 / (now - last.0).as_secs_f64();
                last = (now, done);
                let phase = if now < plan.warm_end {
                    "warm-up"
                } else {
                    "measuring"
                };
                bar.set_position((now - start).as_millis() as u64);
                bar.set_message(format!(
                    "{} {phase} {rate:.0} ops/s",
                    plan.args.rpc.as_str()
                ));
            }
        })
    };

    let mut total = Tally::new();
    for t in tasks {
        let tally = t.await.map_err(|e| (1, format!("load task failed: {e}")))?;
        total.merge(tally);
    }
    ticker.abort();
    bar.finish_and_clear();

    let server_cpu = match cpu {
        Some(h) => {
            let c = h.await.ok().flatten();
            if c.is_none() {
                eprintln!(
                    "packmeter loadgen: cannot read /proc/{}/stat; no CPU figures",
                    args.server_pid.unwrap_or(0)
                );
            }
            c
        }
        None => None,
    };
    if let Some(s) = &total.first_error {
        eprintln!(
            "packmeter loadgen: {} errors; the first: {:?}: {}",
            total.errors,
            s.code(),
            s.message()
        );
    }
    let us = |q| total.hist.value_at_quantile(q) as f64 / 1000.0;
    Ok(Some(Report {
        rpc: args.rpc,
        ops: total.ops,
        errors: total.errors,
        seconds: args.duration.as_secs_f64(),
        p50_us: us(0.5),
        p99_us: us(0.99),
        p999_us: us(0.999),
        deductions_per_op: match args.rpc {
            Rpc::Deduct | Rpc::Rls => 1,
            Rpc::Batch | Rpc::Stream => args.batch as u64,
        },
        server_cpu,
        concurrency: args.concurrency,
        connections: args.connections,
        accounts: args.accounts,
        calls_answered: (args.rpc != Rpc::Rls).then(|| {
            (
                plan.answered.calls_covered.load(Relaxed),
                plan.answered.calls_overage.load(Relaxed),
            )
        }),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_account_sequence_is_fixed_by_the_seed_and_stays_in_range() {
        let draw = |seed| {
            let mut r = Picker::new(seed);
            (0..1000).map(|_| r.below(10)).collect::<Vec<_>>()
        };
        assert_eq!(draw(7), draw(7));
        assert_ne!(draw(7), draw(8));
        let d = draw(7);
        assert!(d.iter().all(|i| *i < 10));
        // Every id is drawn, roughly evenly.
        for i in 0..10 {
            let n = d.iter().filter(|x| **x == i).count();
            assert!((50..150).contains(&n), "{i} drawn {n} times");
        }
    }

    #[test]
    fn reads_cpu_time_of_this_process() {
        let me = std::process::id();
        assert!(cpu_time(me, clock_ticks()).is_some());
        assert!(cpu_time(u32::MAX, 100).is_none());
    }

    #[test]
    fn the_final_line_names_every_figure() {
        let r = Report {
            rpc: Rpc::Batch,
            ops: 1000,
            errors: 2,
            seconds: 2.0,
            p50_us: 10.0,
            p99_us: 20.0,
            p999_us: 30.0,
            deductions_per_op: 100,
            server_cpu: Some(Duration::from_millis(500)),
            concurrency: 8,
            connections: 2,
            accounts: 10,
            calls_answered: Some((70, 30)),
        };
        let line = r.line(false);
        assert!(
            line.starts_with(
                "rpc=batch ops/s=500 p50=10.0us p99=20.0us p999=30.0us errors=2 deductions/s=50000"
            ),
            "{line}"
        );
        assert!(line.contains("server_cpu_us/op=500.00"), "{line}");
        assert!(line.contains("server_cpu_us/deduction=5.000"), "{line}");
        assert!(
            line.ends_with(" calls_covered=70 calls_overage=30"),
            "{line}"
        );
        let v: serde_json::Value = serde_json::from_str(&r.line(true)).unwrap();
        assert_eq!(v["deductions_per_s"], 50_000.0);
        assert_eq!(v["calls_covered"], 70);
        assert_eq!(v["calls_overage"], 30);
    }
}
