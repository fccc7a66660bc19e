//! `--durability journal` through the real binary: kill -9 under load from
//! unary, batch and stream clients, again and again on the same files; the
//! same in `flush` mode, whose loss must stay within a flush interval; and
//! a journal that cannot be written (a full disk).
//!
//! `PACKMETER_KILL_LOOPS` sets the number of kills (default 20, a few
//! seconds in all); raise it for longer runs.

mod common;

use std::{
    path::Path,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use common::{deduct, fill, Server, SmallFs};
use packmeter::grpc::proto::{self, meter_client::MeterClient};
use tonic::transport::Channel;

/// Calls billed for `account` in the store, covered plus overage.
fn billed(db: &Path, account: &str) -> u64 {
    let conn = rusqlite::Connection::open(db).unwrap();
    conn.query_row(
        "SELECT COALESCE(SUM(amount), 0) FROM usage_hourly WHERE account_id = ?1 AND item = ?2",
        rusqlite::params![account, proto::Item::Calls as i64],
        |r| r.get::<_, i64>(0),
    )
    .unwrap() as u64
}

/// What a client knows of its deductions.
#[derive(Default, Debug, Clone)]
struct Tally {
    /// Acknowledged calls, with when each answer came.
    acked: Vec<(Instant, u64)>,
    /// Sent but never answered (the process died, or it was refused after
    /// deducting): may or may not be billed, once at most.
    in_doubt: u64,
}

impl Tally {
    fn acked(&self) -> u64 {
        self.acked.iter().map(|(_, n)| n).sum()
    }
}

/// A small deterministic generator (xorshift), seeded per test.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn seed() -> u64 {
    let s = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    eprintln!("seed {s}");
    s | 1
}

fn loops() -> usize {
    std::env::var("PACKMETER_KILL_LOOPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20)
}

#[derive(Clone, Copy, Debug)]
enum Client {
    Unary,
    Batch,
    Stream,
}

const CLIENTS: [(Client, &str); 3] = [
    (Client::Unary, "unary"),
    (Client::Batch, "batch"),
    (Client::Stream, "stream"),
];

/// Sends deductions of `account` until the server goes away; every answer
/// is added to `tally` the moment it arrives.
async fn load(
    channel: Channel,
    kind: Client,
    account: &'static str,
    tally: Arc<Mutex<Tally>>,
    seed: u64,
) {
    let mut rng = Rng(seed);
    let mut meter = MeterClient::new(channel);
    match kind {
        Client::Unary => loop {
            let calls = 1 + rng.below(9);
            match meter.deduct(deduct(account, calls, 0, None)).await {
                Ok(_) => tally.lock().unwrap().acked.push((Instant::now(), calls)),
                Err(_) => {
                    tally.lock().unwrap().in_doubt += calls;
                    return;
                }
            }
        },
        Client::Batch => loop {
            let n = 1 + rng.below(20) as usize;
            let calls: Vec<u64> = (0..n).map(|_| 1 + rng.below(9)).collect();
            let req = proto::DeductBatchRequest {
                deductions: calls.iter().map(|c| deduct(account, *c, 0, None)).collect(),
            };
            let sum: u64 = calls.iter().sum();
            match meter.deduct_batch(req).await {
                Ok(_) => tally.lock().unwrap().acked.push((Instant::now(), sum)),
                Err(_) => {
                    tally.lock().unwrap().in_doubt += sum;
                    return;
                }
            }
        },
        Client::Stream => {
            // A window of up to 8 messages in flight, so the server deducts
            // several before it answers; what is unanswered is in doubt.
            let (tx, rx) = tokio::sync::mpsc::channel(16);
            let mut outstanding = std::collections::VecDeque::new();
            let mut inbound = match meter
                .deduct_stream(tokio_stream::wrappers::ReceiverStream::new(rx))
                .await
            {
                Ok(r) => r.into_inner(),
                Err(_) => return,
            };
            loop {
                while outstanding.len() < 8 {
                    let calls = 1 + rng.below(9);
                    if tx.send(deduct(account, calls, 0, None)).await.is_err() {
                        break;
                    }
                    outstanding.push_back(calls);
                }
                match inbound.message().await {
                    Ok(Some(_)) => {
                        let calls = outstanding
                            .pop_front()
                            .expect("an answer to a message sent");
                        tally.lock().unwrap().acked.push((Instant::now(), calls));
                    }
                    _ => {
                        tally.lock().unwrap().in_doubt += outstanding.iter().sum::<u64>();
                        return;
                    }
                }
            }
        }
    }
}

/// How a life ends.
#[derive(Clone, Copy, PartialEq, Eq)]
enum End {
    Kill9,
    Term,
}

/// One life of the server: load from all three clients for a random
/// while, then SIGKILL (or SIGTERM). Returns when the signal was sent.
async fn life(
    server: Server,
    rng: &mut Rng,
    tallies: &[Arc<Mutex<Tally>>],
    min_ms: u64,
    end: End,
) -> Instant {
    let mut tasks = Vec::new();
    for (i, (kind, account)) in CLIENTS.iter().enumerate() {
        let channel = server.channel().await;
        tasks.push(tokio::spawn(load(
            channel,
            *kind,
            account,
            tallies[i].clone(),
            rng.next(),
        )));
    }
    tokio::time::sleep(Duration::from_millis(min_ms + rng.below(200))).await;
    let killed = Instant::now();
    match end {
        End::Kill9 => server.kill9(),
        End::Term => {
            let (status, stderr) = server.terminate();
            assert!(status.success(), "{stderr}");
        }
    }
    for t in tasks {
        t.await.unwrap();
    }
    killed
}

/// Journal mode: every acknowledged deduction survives every kill, and
/// nothing is billed that was not sent, or twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_9_under_load_in_journal_mode_loses_nothing_acknowledged_and_doubles_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("packmeter.db");
    // Short flushes, so kills land before, during and after them; a free
    // tier small enough that both covered and overage are in play.
    let flags = [
        "--durability",
        "journal",
        "--flush-interval",
        "50ms",
        "--free-calls",
        "5000",
    ];
    let mut rng = Rng(seed());
    let tallies: Vec<Arc<Mutex<Tally>>> = CLIENTS.iter().map(|_| Arc::default()).collect();
    for round in 0..loops() {
        let server = Server::start_on(&db, &flags);
        // Replay is done before the server listens: the store has it all.
        for (i, (_, account)) in CLIENTS.iter().enumerate() {
            let t: Tally = tallies[i].lock().unwrap().clone();
            let b = billed(&db, account);
            assert!(
                b >= t.acked() && b <= t.acked() + t.in_doubt,
                "round {round}, {account}: billed {b}, acknowledged {}, in doubt {}",
                t.acked(),
                t.in_doubt
            );
        }
        life(server, &mut rng, &tallies, 30, End::Kill9).await;
    }
    let server = Server::start_on(&db, &flags);
    // Some traffic after the last restart, then a clean stop.
    let mut meter = server.meter().await;
    meter.deduct(deduct("unary", 3, 0, None)).await.unwrap();
    tallies[0].lock().unwrap().acked.push((Instant::now(), 3));
    let (status, stderr) = server.terminate();
    assert!(status.success(), "{stderr}");
    let mut total_acked = 0;
    for (i, (_, account)) in CLIENTS.iter().enumerate() {
        let t = tallies[i].lock().unwrap().clone();
        let b = billed(&db, account);
        total_acked += t.acked();
        assert!(
            b >= t.acked() && b <= t.acked() + t.in_doubt,
            "{account}: billed {b}, acknowledged {}, in doubt {}",
            t.acked(),
            t.in_doubt
        );
    }
    assert!(total_acked > 0, "the clients got answers");
    // The journal was checkpointed by the final flush: nothing left to replay.
    let left: u64 = std::fs::read_dir(dir.path().join("packmeter.db.journal"))
        .unwrap()
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().ends_with(".seg"))
        .map(|e| e.metadata().unwrap().len())
        .sum();
    assert!(
        left < 64 * 1024,
        "journal left after a clean stop: {left} bytes"
    );
}

/// Flush mode: a kill loses at most what was acknowledged within about one
/// flush interval before it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_9_under_load_in_flush_mode_loses_at_most_one_flush_interval() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("packmeter.db");
    let interval = Duration::from_millis(200);
    let flags = ["--durability", "flush", "--flush-interval", "200ms"];
    let mut rng = Rng(seed());
    let kills = (loops() / 4).max(3);
    for round in 0..kills {
        let server = Server::start_on(&db, &flags);
        let before: Vec<u64> = CLIENTS.iter().map(|(_, a)| billed(&db, a)).collect();
        let tallies: Vec<_> = CLIENTS
            .iter()
            .map(|_| Arc::<Mutex<Tally>>::default())
            .collect();
        let killed = life(
            server,
            &mut rng,
            &tallies,
            // Longer than the window below, so the bound says something.
            1_500,
            End::Kill9,
        )
        .await;
        for (i, (_, account)) in CLIENTS.iter().enumerate() {
            let t = tallies[i].lock().unwrap().clone();
            let got = billed(&db, account) - before[i];
            // Slack for a flush that started just before the window and
            // for the time the flush itself takes on a loaded machine.
            let window = interval * 2 + Duration::from_millis(500);
            let recent: u64 = t
                .acked
                .iter()
                .filter(|(at, _)| killed.duration_since(*at) <= window)
                .map(|(_, n)| n)
                .sum();
            assert!(
                got <= t.acked() + t.in_doubt,
                "round {round}, {account}: billed {got} of {} acknowledged",
                t.acked()
            );
            assert!(
                got + recent >= t.acked(),
                "round {round}, {account}: lost {} of {} acknowledged, more than the {recent} of \
                 the last flush interval",
                t.acked() - got,
                t.acked()
            );
        }
    }
}

async fn health(server: &Server) -> i32 {
    let mut health = tonic_health::pb::health_client::HealthClient::new(server.channel().await);
    health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "packmeter.v1.Meter".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .status
}

const SERVING: i32 = tonic_health::pb::health_check_response::ServingStatus::Serving as i32;
const NOT_SERVING: i32 = tonic_health::pb::health_check_response::ServingStatus::NotServing as i32;

/// Sends batches of 50 one-call deductions until one is refused; returns
/// the refusal. Acknowledged and refused calls go to `tally`.
async fn until_refused(
    meter: &mut MeterClient<Channel>,
    account: &str,
    tally: &mut Tally,
) -> tonic::Status {
    for _ in 0..20_000 {
        let req = proto::DeductBatchRequest {
            deductions: vec![deduct(account, 1, 0, None); 50],
        };
        match meter.deduct_batch(req).await {
            Ok(_) => tally.acked.push((Instant::now(), 50)),
            Err(status) => {
                tally.in_doubt += 50;
                return status;
            }
        }
    }
    panic!("the journal never filled the disk");
}

/// Sends one deduction a while until one is acknowledged again.
async fn until_served(meter: &mut MeterClient<Channel>, account: &str, tally: &mut Tally) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match meter.deduct(deduct(account, 1, 0, None)).await {
            Ok(_) => {
                tally.acked.push((Instant::now(), 1));
                return;
            }
            Err(s) => {
                assert_eq!(s.code(), tonic::Code::Unavailable, "{s:?}");
                tally.in_doubt += 1;
            }
        }
        assert!(Instant::now() < deadline, "service did not resume");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Starts `command`'s process with no file of it allowed past `bytes`
/// (RLIMIT_FSIZE): a write past it fails with EFBIG, as on a full disk.
fn limit_file_size(command: &mut std::process::Command, bytes: u64) {
    use std::os::unix::process::CommandExt;
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        command.pre_exec(move || {
            let limit = libc::rlimit {
                rlim_cur: bytes,
                rlim_max: bytes,
            };
            if libc::setrlimit(libc::RLIMIT_FSIZE, &limit) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // EFBIG instead of a signal that kills the process.
            libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
            Ok(())
        });
    }
}

/// Disk full: the journal's write fails, deductions get UNAVAILABLE and
/// health goes NOT_SERVING, nothing acknowledged is lost, and service comes
/// back by itself once space is freed. On a tmpfs of its own where the
/// machine allows it; otherwise under RLIMIT_FSIZE (the journal's next
/// file then has room at once).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_refuses_deductions_and_service_resumes_once_space_is_freed() {
    let dir = tempfile::tempdir().unwrap();
    let flags = ["--durability", "journal", "--flush-interval", "1h"];
    let account = "disk";
    let mut tally = Tally::default();
    // PACKMETER_TEST_NO_TMPFS=1 takes the RLIMIT_FSIZE path where a tmpfs would work.
    let small = std::env::var_os("PACKMETER_TEST_NO_TMPFS")
        .is_none()
        .then(|| SmallFs::mount(&dir.path().join("fs")))
        .flatten();
    let db;
    let server = match &small {
        Some(fs) => {
            db = fs.path.join("packmeter.db");
            Server::start_on(&db, &flags)
        }
        None => {
            eprintln!("no tmpfs (it cannot be mounted here, or PACKMETER_TEST_NO_TMPFS is set): using RLIMIT_FSIZE");
            db = dir.path().join("packmeter.db");
            Server::start_prepared(&db, &flags, |command| limit_file_size(command, 1 << 20))
        }
    };
    let mut meter = server.meter().await;
    meter.deduct(deduct(account, 1, 0, None)).await.unwrap();
    tally.acked.push((Instant::now(), 1));
    assert_eq!(health(&server).await, SERVING);

    let ballast = small.as_ref().map(|fs| fill(&fs.path));
    let refused = until_refused(&mut meter, account, &mut tally).await;
    assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");
    assert!(refused.message().contains("journal"), "{refused:?}");
    if let Some(ballast) = ballast {
        // Still full: refused, before anything is deducted, and not serving.
        let again = meter.deduct(deduct(account, 1, 0, None)).await.unwrap_err();
        tally.in_doubt += 1;
        assert_eq!(again.code(), tonic::Code::Unavailable);
        assert_eq!(health(&server).await, NOT_SERVING);
        assert_eq!(common::get(&server.admin, "/readyz").await.status, 503);
        assert_eq!(server.metric("packmeter_journal_writable").await, 0.0);
        std::fs::remove_file(ballast).unwrap();
    }
    until_served(&mut meter, account, &mut tally).await;
    common::until(Duration::from_secs(5), async || {
        health(&server).await == SERVING
    })
    .await;
    assert_eq!(common::get(&server.admin, "/readyz").await.status, 200);
    assert_eq!(server.metric("packmeter_journal_writable").await, 1.0);

    // A crash now: what was acknowledged must be in the journal, durable.
    server.kill9();
    let server = Server::start_on(&db, &flags);
    let (status, stderr) = server.terminate();
    assert!(status.success(), "{stderr}");
    let b = billed(&db, account);
    assert!(
        b >= tally.acked() && b <= tally.acked() + tally.in_doubt,
        "billed {b}, acknowledged {}, refused {}",
        tally.acked(),
        tally.in_doubt
    );
    drop(small);
}

/// Restart storm: SIGTERM and restart under load, again and again, in
/// journal mode; the sums stay exact (nothing acknowledged lost, nothing
/// billed twice).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_restart_storm_under_load_keeps_the_sums_exact() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("packmeter.db");
    let flags = ["--durability", "journal", "--flush-interval", "100ms"];
    let mut rng = Rng(seed());
    let tallies: Vec<Arc<Mutex<Tally>>> = CLIENTS.iter().map(|_| Arc::default()).collect();
    for _ in 0..(loops() / 2).max(3) {
        let server = Server::start_on(&db, &flags);
        life(server, &mut rng, &tallies, 30, End::Term).await;
    }
    for (i, (_, account)) in CLIENTS.iter().enumerate() {
        let t = tallies[i].lock().unwrap().clone();
        let b = billed(&db, account);
        assert!(
            b >= t.acked() && b <= t.acked() + t.in_doubt,
            "{account}: billed {b}, acknowledged {}, in doubt {}",
            t.acked(),
            t.in_doubt
        );
    }
}

/// A flush the store refuses (another process holds the write lock): its
/// batch waits for a retry under its id. A kill -9 then, and a restart,
/// bill every acknowledged deduction exactly once: those the refused batch
/// held (replayed under its id), those flushed before (not replayed), and
/// those no flush took.
#[tokio::test]
async fn a_refused_flush_then_a_kill_loses_nothing_and_doubles_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let flags = ["--durability", "journal", "--flush-interval", "1h"];
    let server = Server::start(dir.path(), &flags);
    let db = server.db.clone();
    let mut meter = server.meter().await;
    let mut admin = server.admin().await;
    let mut sent = 0;
    let send = async |meter: &mut MeterClient<Channel>, calls: u64| {
        meter.deduct(deduct("acme", calls, 0, None)).await.unwrap();
        calls
    };
    sent += send(&mut meter, 3).await;
    admin.flush(proto::FlushRequest {}).await.unwrap();
    assert_eq!(billed(&db, "acme"), 3);
    sent += send(&mut meter, 5).await;
    let blocker = rusqlite::Connection::open(&db).unwrap();
    blocker.execute_batch("BEGIN EXCLUSIVE").unwrap();
    let e = admin.flush(proto::FlushRequest {}).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unavailable, "{e:?}");
    sent += send(&mut meter, 7).await;
    server.kill9();
    blocker.execute_batch("ROLLBACK").unwrap();
    drop(blocker);
    assert_eq!(billed(&db, "acme"), 3, "only the first flush committed");

    let server = Server::start_on(&db, &flags);
    assert_eq!(billed(&db, "acme"), sent, "replayed at start, exactly once");
    let (status, stderr) = server.terminate();
    assert!(status.success(), "{stderr}");
    assert_eq!(billed(&db, "acme"), sent);
}

/// Calls billed for `account` in a PostgreSQL store.
#[cfg(feature = "postgres")]
async fn billed_pg(db: &common::pg::TestDb, account: &str) -> u64 {
    let row = db
        .client()
        .await
        .query_one(
            "SELECT COALESCE(SUM(amount), 0)::BIGINT FROM usage_hourly \
             WHERE account_id = $1 AND item = $2",
            &[&account, &(proto::Item::Calls as i64)],
        )
        .await
        .unwrap();
    row.get::<_, i64>(0) as u64
}

/// The kill -9 loop on PostgreSQL: a kill can land inside a flush's
/// transaction (the server dies with its connection, and PostgreSQL rolls
/// the transaction back), or after its COMMIT and before the journal's
/// checkpoint; either way every acknowledged deduction is billed once.
#[cfg(feature = "postgres")]
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_9_under_load_on_postgresql_in_journal_mode_loses_nothing_and_doubles_nothing() {
    let Some(db) = common::pg::TestDb::create().await else {
        return;
    };
    let data = tempfile::tempdir().unwrap();
    let flags = ["--durability", "journal", "--flush-interval", "50ms"];
    let mut rng = Rng(seed());
    let tallies: Vec<Arc<Mutex<Tally>>> = CLIENTS.iter().map(|_| Arc::default()).collect();
    let check = async |round: &str, tallies: &[Arc<Mutex<Tally>>]| {
        for (i, (_, account)) in CLIENTS.iter().enumerate() {
            let t: Tally = tallies[i].lock().unwrap().clone();
            let b = billed_pg(&db, account).await;
            assert!(
                b >= t.acked() && b <= t.acked() + t.in_doubt,
                "{round}, {account}: billed {b}, acknowledged {}, in doubt {}",
                t.acked(),
                t.in_doubt
            );
        }
    };
    for round in 0..(loops() / 4).max(5) {
        let server = Server::start_store(&db.url, data.path(), &flags);
        check(&format!("round {round}"), &tallies).await;
        life(server, &mut rng, &tallies, 50, End::Kill9).await;
    }
    let server = Server::start_store(&db.url, data.path(), &flags);
    let (status, stderr) = server.terminate();
    assert!(status.success(), "{stderr}");
    check("after a clean stop", &tallies).await;
    assert!(tallies.iter().any(|t| t.lock().unwrap().acked() > 0));
}

// === start-up: the replay, with the ports bound ===

/// Deductions and accounts of the journal the start-up test replays:
/// about a second of replay in a debug build, long enough to watch (a
/// client sees NOT_SERVING dozens of times).
/// `PACKMETER_REPLAY_RECORDS` sets another size.
fn replay_records() -> usize {
    std::env::var("PACKMETER_REPLAY_RECORDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000)
}
const REPLAY_ACCOUNTS: usize = 10_000;

/// Writes the journal a journal-mode server killed before any flush would
/// leave beside `db`, with the library's own record encoder: `records`
/// deductions over `accounts` accounts (`acct-N`), none flushed. Returns
/// the calls each account must be billed.
fn write_journal(db: &Path, records: usize, accounts: usize) -> Vec<u64> {
    use packmeter::{
        calendar::{now_ts, HOUR},
        journal::{encode, Record},
        ledger::{AccountFlush, AccountRecord, DeltaRow},
        packs::Item,
    };
    let dir = db.with_extension("db.journal");
    std::fs::create_dir_all(&dir).unwrap();
    let now = now_ts();
    let hour = now - now.rem_euclid(HOUR);
    let mut calls = vec![0; accounts];
    let mut buf = Vec::with_capacity(records * 100);
    let mut rng = Rng(0x5eed);
    for i in 0..records {
        let a = i % accounts;
        let amount = 1 + rng.below(9);
        calls[a] += amount;
        let id = format!("acct-{a}");
        let part = AccountFlush {
            account_id: id.as_str().into(),
            // As the first deduction of an account carries its row.
            account: (i < accounts).then(|| AccountRecord {
                account_id: id.clone(),
                activated_at: Some(hour),
                suspended: false,
                deny_on_exhausted: false,
            }),
            deltas: vec![DeltaRow {
                hour,
                item: Item::Calls,
                pack: None,
                amount,
                span: Some((now, now)),
            }],
            dedup: vec![],
        };
        encode(
            &Record::Deduct {
                epoch: 1,
                parts: vec![part],
            },
            &mut buf,
        );
    }
    std::fs::write(dir.join(format!("{:020}-{:04}.seg", 1, 0)), buf).unwrap();
    calls
}

/// What a client saw of a server while it started.
#[derive(Debug, Default)]
struct StartUpSeen {
    /// Health checks that answered NOT_SERVING.
    not_serving: usize,
    /// `/readyz` answers 503.
    not_ready: usize,
    /// Deductions, `Admin.Flush` calls and pack pages refused as starting.
    refused: usize,
    /// Deductions of `probe` answered (only once start-up is done).
    probe_acked: u64,
    /// Envoy `ShouldRateLimit` calls refused as starting.
    rls_refused: usize,
}

/// Watches a starting server from the moment its gRPC port accepts: health,
/// `/livez`, `/metrics`, `/readyz`, a deduction, `Admin.Flush`, Envoy's
/// `ShouldRateLimit` and the pack page, again
/// and again, until health reports SERVING (or, with `first_only`, until it
/// was seen NOT_SERVING once). Every refusal must be UNAVAILABLE (or 503)
/// and say that the journal is being replayed.
async fn watch_start_up(server: &Server, first_only: bool) -> StartUpSeen {
    let deadline = Instant::now() + Duration::from_secs(60);
    let channel = loop {
        match Channel::from_shared(server.url()).unwrap().connect().await {
            Ok(c) => break c,
            Err(_) => {
                assert!(Instant::now() < deadline, "the gRPC port never accepted");
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    };
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel.clone());
    let mut meter = MeterClient::new(channel.clone());
    let mut admin = proto::admin_client::AdminClient::new(channel.clone());
    let mut rls = envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_client::RateLimitServiceClient::new(channel);
    let mut seen = StartUpSeen::default();
    let starting = |s: &tonic::Status| {
        assert_eq!(s.code(), tonic::Code::Unavailable, "{s:?}");
        assert!(s.message().contains("replaying the journal"), "{s:?}");
    };
    loop {
        assert!(
            Instant::now() < deadline,
            "not serving within a minute: {seen:?}"
        );
        let status = health
            .check(tonic_health::pb::HealthCheckRequest {
                service: "packmeter.v1.Meter".into(),
            })
            .await
            .expect("health answers during start-up")
            .into_inner()
            .status;
        if status == SERVING {
            return seen;
        }
        assert_eq!(status, NOT_SERVING);
        seen.not_serving += 1;
        if first_only {
            return seen;
        }
        // Start-up may end between any two of these: then a call is
        // served, and health says SERVING at the next turn.
        assert_eq!(common::get(&server.admin, "/livez").await.status, 200);
        assert_eq!(common::get(&server.admin, "/metrics").await.status, 200);
        if common::get(&server.admin, "/readyz").await.status == 503 {
            seen.not_ready += 1;
        }
        match meter.deduct(deduct("probe", 1, 0, None)).await {
            Ok(_) => seen.probe_acked += 1,
            Err(s) => {
                starting(&s);
                seen.refused += 1;
            }
        }
        if let Err(s) = admin.flush(proto::FlushRequest {}).await {
            starting(&s);
            seen.refused += 1;
        }
        // (Once start-up is done, this empty request is refused as invalid.)
        let rls_request = envoy_types::pb::envoy::service::ratelimit::v3::RateLimitRequest {
            domain: "packmeter".into(),
            hits_addend: 1,
            ..Default::default()
        };
        if let Err(s) = rls.should_rate_limit(rls_request).await {
            if s.code() == tonic::Code::Unavailable {
                starting(&s);
                seen.rls_refused += 1;
            }
        }
        let page = common::get(&server.admin, "/packs?account=acct-0").await;
        if page.status == 503 {
            assert!(page.body.contains("replaying the journal"), "{}", page.body);
            seen.refused += 1;
        }
    }
}

/// Issue 9: the journal is replayed with both ports bound, before the
/// server reports ready. While it runs, health says NOT_SERVING, `/readyz`
/// 503 (`/livez` 200), and Meter and Admin calls and the pack page are
/// refused as UNAVAILABLE: nothing is answered from a store that lacks the
/// journal. A SIGTERM during the replay exits 0 before ready and loses
/// nothing; the next start finishes the replay, and every deduction is
/// billed exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_journal_is_replayed_with_the_ports_bound_and_nothing_served_until_it_is_done() {
    use std::io::BufRead;
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("packmeter.db");
    let expected = write_journal(&db, replay_records(), REPLAY_ACCOUNTS);
    let flags = ["--durability", "journal", "--flush-interval", "1h"];

    // A SIGTERM while the replay runs.
    let (grpc, admin) = (common::free_addr(), common::free_addr());
    let (mut server, mut stdout) = Server::spawn_on_at(&db, (&grpc, &admin), &flags);
    let seen = watch_start_up(&server, true).await;
    assert_eq!(seen.not_serving, 1, "{seen:?}");
    server.send_term();
    let (status, stderr) = server.wait();
    assert!(status.success(), "{status:?}\n{stderr}");
    assert!(
        stderr.contains("stopped before start-up was done"),
        "{stderr}"
    );
    let mut line = String::new();
    stdout.read_line(&mut line).unwrap();
    assert_eq!(line, "", "it never reported ready");

    // The next start replays it all, and is watched while it does.
    let (grpc, admin) = (common::free_addr(), common::free_addr());
    let (server, mut stdout) = Server::spawn_on_at(&db, (&grpc, &admin), &flags);
    let seen = watch_start_up(&server, false).await;
    eprintln!("during the replay: {seen:?}");
    assert!(seen.not_serving > 0, "{seen:?}");
    assert!(seen.not_ready > 0, "{seen:?}");
    assert!(seen.refused > 0, "{seen:?}");
    assert!(seen.rls_refused > 0, "{seen:?}");
    stdout.read_line(&mut line).unwrap();
    assert!(line.starts_with("packmeter listening"), "{line:?}");
    assert_eq!(common::get(&server.admin, "/readyz").await.status, 200);

    let check = |when: &str| check_billed(&db, &expected, when);
    check("once ready");
    let (status, stderr) = server.terminate();
    assert!(status.success(), "{stderr}");
    // The refused probes are not billed; one answered once start-up was
    // done is.
    assert_eq!(check("after a clean stop"), seen.probe_acked);
}

/// Asserts that every `acct-N` of [`write_journal`] is billed exactly its
/// calls in `db`; returns what the account `probe` is billed.
fn check_billed(db: &Path, expected: &[u64], when: &str) -> u64 {
    let conn = rusqlite::Connection::open(db).unwrap();
    let mut stmt = conn
        .prepare(
            "SELECT account_id, SUM(amount) FROM usage_hourly WHERE item = ?1 \
             GROUP BY account_id",
        )
        .unwrap();
    let billed: std::collections::HashMap<String, u64> = stmt
        .query_map([proto::Item::Calls as i64], |r| {
            Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)? as u64))
        })
        .unwrap()
        .map(Result::unwrap)
        .collect();
    for (a, calls) in expected.iter().enumerate() {
        let got = billed.get(&format!("acct-{a}")).copied().unwrap_or(0);
        assert_eq!(got, *calls, "{when}: acct-{a}");
    }
    billed.get("probe").copied().unwrap_or(0)
}

/// Accounts of the journals the replay's failure tests write: the replay
/// writes what no flush took in batches of 5,000 accounts, so this gives
/// the spill file three.
const SPILLED_ACCOUNTS: usize = 15_000;

/// The flush batches `db` has applied (none until the first commit).
fn applied_batches(db: &Path) -> i64 {
    let Ok(conn) =
        rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
    else {
        return 0;
    };
    conn.query_row("SELECT count(*) FROM flush_batches", [], |r| r.get(0))
        .unwrap_or(0)
}

/// Polls `what` every millisecond (a kill is to land as close after it
/// as it can) until it holds; `false` if the server exited first, or a
/// minute passed.
async fn when(server: &mut Server, mut what: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        if what() {
            return true;
        }
        if server.exited().is_some() {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    false
}

/// Issue 10 (the streamed replay): a kill -9 can land anywhere in the
/// replay: while the journal is read, once the spill file is committed
/// (before the journal's checkpoint or after it), and between two of the
/// spill file's batches. Each start goes on from what the last one left,
/// the batches a start wrote again are skipped by their ids, and once a
/// start is ready every deduction is billed exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kill_9_anywhere_in_the_replay_loses_nothing_and_doubles_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("packmeter.db");
    let spill = dir.path().join("packmeter.db.unflushed");
    let expected = write_journal(&db, replay_records(), SPILLED_ACCOUNTS);
    let flags = ["--durability", "journal", "--flush-interval", "1h"];
    let mut seen = Vec::new();
    for (moment, life) in [
        ("while the journal is read", 0),
        ("once the spill file exists", 1),
        ("once the store holds one batch", 2),
        ("once it holds two", 3),
    ] {
        let (grpc, admin) = (common::free_addr(), common::free_addr());
        let (mut server, _stdout) = Server::spawn_on_at(&db, (&grpc, &admin), &flags);
        let before = applied_batches(&db);
        // The moments of the last two: one more batch applied, or the
        // spill file replayed and removed (nothing left to land between).
        let reached = match life {
            0 => watch_start_up(&server, true).await.not_serving == 1,
            1 => when(&mut server, || spill.exists()).await,
            _ => {
                when(&mut server, || {
                    applied_batches(&db) > before || !spill.exists()
                })
                .await
            }
        };
        assert!(server.exited().is_none(), "the server exited {moment}");
        server.kill9();
        seen.push(format!(
            "{moment}: reached {reached}, spill file {}, batches applied {}",
            spill.exists(),
            applied_batches(&db)
        ));
    }
    eprintln!("{seen:#?}");

    let (grpc, admin) = (common::free_addr(), common::free_addr());
    let (server, mut stdout) = Server::spawn_on_at(&db, (&grpc, &admin), &flags);
    let mut line = String::new();
    std::io::BufRead::read_line(&mut stdout, &mut line).unwrap();
    assert!(line.starts_with("packmeter listening"), "{line:?}");
    check_billed(&db, &expected, "once ready after the kills");
    assert!(!spill.exists(), "the spill file is replayed and removed");
    let (status, stderr) = server.terminate();
    assert!(status.success(), "{stderr}");
    check_billed(&db, &expected, "after a clean stop");
}

/// Issue 10 (the streamed replay): a disk that fills while the replay
/// writes the spill file. The start fails and says why; the journal is
/// kept whole (no checkpoint past it), the spill file's temporary file is
/// removed, and nothing is billed. Once there is room, the next start
/// replays it all, exactly once. Under RLIMIT_FSIZE: a file may not grow
/// past 256 KiB, and the spill file of 15,000 accounts is larger.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disk_that_fills_during_the_replay_fails_the_start_and_the_next_start_bills_it_all_once()
{
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("packmeter.db");
    let spill = dir.path().join("packmeter.db.unflushed");
    let expected = write_journal(&db, replay_records(), SPILLED_ACCOUNTS);
    let flags = ["--durability", "journal", "--flush-interval", "1h"];
    let journal_dir = db.with_extension("db.journal");
    let journal_files = || {
        let mut names: Vec<_> = std::fs::read_dir(&journal_dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        names.sort();
        names
    };
    let before = journal_files();

    let mut command = std::process::Command::new(common::BIN);
    limit_file_size(&mut command, 256 << 10);
    let out = command
        .arg("serve")
        .args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
        .arg("--store")
        .arg(format!("sqlite://{}", db.display()))
        .args(flags)
        .env_remove("PACKMETER_CONFIG")
        .env_remove("PACKMETER_ADMIN_TOKEN_FILE")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("the journal's replay failed")
            && stderr.contains("File too large")
            && stderr.contains("nothing is lost")
            && stderr.contains("the next start replays it again")
            && stderr.contains("free space first"),
        "{stderr}"
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).is_empty(),
        "never ready"
    );
    // Its records are kept as they were; the replay has recorded the
    // journal's id in a checkpoint covering none of them, so that the next
    // start's batch ids are the same.
    let mut after = journal_files();
    after.retain(|f| f != "checkpoint");
    assert_eq!(after, before, "the journal is kept as it was");
    assert!(journal_dir.join("checkpoint").exists());
    assert!(!spill.exists(), "no spill file");
    assert!(
        !spill.with_extension("tmp").exists(),
        "the temporary file is removed"
    );
    assert_eq!(applied_batches(&db), 0, "nothing is billed");

    let server = Server::start_on(&db, &flags);
    check_billed(&db, &expected, "once ready");
    let (status, stderr) = server.terminate();
    assert!(status.success(), "{stderr}");
    check_billed(&db, &expected, "after a clean stop");
}
