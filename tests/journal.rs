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

use common::{deduct, Server};
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
async fn load(channel: Channel, kind: Client, account: &'static str, tally: Arc<Mutex<Tally>>, seed: u64) {
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
            // One message in flight at a time, so what is in doubt is known.
            let (tx, rx) = tokio::sync::mpsc::channel(1);
            let first = 1 + rng.below(9);
            if tx.send(deduct(account, first, 0, None)).await.is_err() {
                return;
            }
            let mut sent = first;
            let mut inbound = match meter
                .deduct_stream(tokio_stream::wrappers::ReceiverStream::new(rx))
                .await
            {
                Ok(r) => r.into_inner(),
                Err(_) => {
                    tally.lock().unwrap().in_doubt += sent;
                    return;
                }
            };
            loop {
                match inbound.message().await {
                    Ok(Some(_)) => tally.lock().unwrap().acked.push((Instant::now(), sent)),
                    _ => {
                        tally.lock().unwrap().in_doubt += sent;
                        return;
                    }
                }
                sent = 1 + rng.below(9);
                if tx.send(deduct(account, sent, 0, None)).await.is_err() {
                    tally.lock().unwrap().in_doubt += sent;
                    return;
                }
            }
        }
    }
}

/// One life of the server: load from all three clients for a random
/// while, then SIGKILL. Returns when the kill happened.
async fn life(server: Server, rng: &mut Rng, tallies: &[Arc<Mutex<Tally>>], min_ms: u64) -> Instant {
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
    server.kill9();
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
        life(server, &mut rng, &tallies, 30).await;
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
    assert!(left < 64 * 1024, "journal left after a clean stop: {left} bytes");
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
        let tallies: Vec<_> = CLIENTS.iter().map(|_| Arc::<Mutex<Tally>>::default()).collect();
        let killed = life(server, &mut rng, &tallies, 3 * interval.as_millis() as u64).await;
        for (i, (_, account)) in CLIENTS.iter().enumerate() {
            let t = tallies[i].lock().unwrap().clone();
            let got = billed(&db, account) - before[i];
            // Slack for a flush that started just before the window and
            // for the time the flush itself takes.
            let window = interval * 2 + Duration::from_millis(300);
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
