//! Durability and exactness through the real process: restarts after
//! SIGTERM, kill -9 after Flush, a store that refuses a flush, and exact
//! totals under concurrent deductions. The ledger is read back from the
//! real SQLite file.

mod common;

use std::path::Path;

use common::{deduct, split, Server};
use packmeter::grpc::proto::{self, Item};
use tokio_stream::StreamExt;

/// (covered, overage) of one item, summed over the store's hourly rows.
fn ledger(db: &Path, account: &str, item: Item) -> (u64, u64) {
    let conn = rusqlite::Connection::open(db).unwrap();
    let sum = |overage: bool| -> u64 {
        let sql = format!(
            "SELECT COALESCE(SUM(amount), 0) FROM usage_hourly \
             WHERE account_id = ?1 AND item = ?2 AND pack_id {} ''",
            if overage { "=" } else { "<>" }
        );
        conn.query_row(&sql, rusqlite::params![account, item as i64], |r| {
            r.get::<_, i64>(0)
        })
        .unwrap() as u64
    };
    (sum(false), sum(true))
}

async fn used(server: &Server, account: &str, item: Item) -> u64 {
    let packs = server.packs(account).await;
    assert!(
        packs.iter().all(|p| p.used <= p.capacity),
        "a pack is over capacity"
    );
    common::used(&packs, item)
}

/// Sends deductions through all three RPCs; returns (covered, overage) of calls.
async fn traffic(server: &Server, account: &str) -> (u64, u64) {
    let mut meter = server.meter().await;
    let (mut covered, mut overage) = (0, 0);
    let mut add = |o: &Option<proto::Outcome>| {
        let (c, ov, _) = split(o);
        covered += c;
        overage += ov;
    };
    for _ in 0..20 {
        add(&meter
            .deduct(deduct(account, 3, 10, None))
            .await
            .unwrap()
            .into_inner()
            .calls);
    }
    let batch = proto::DeductBatchRequest {
        deductions: vec![deduct(account, 5, 0, None); 10],
    };
    for r in meter
        .deduct_batch(batch)
        .await
        .unwrap()
        .into_inner()
        .results
    {
        add(&r.calls);
    }
    let outbound = tokio_stream::iter(vec![deduct(account, 2, 0, None); 15]);
    let mut inbound = meter.deduct_stream(outbound).await.unwrap().into_inner();
    while let Some(r) = inbound.next().await {
        add(&r.unwrap().calls);
    }
    (covered, overage)
}

#[tokio::test]
async fn a_restart_after_sigterm_keeps_all_usage() {
    let dir = tempfile::tempdir().unwrap();
    // No background flush within the test: only the shutdown flush can save it.
    let flags = ["--flush-interval", "1h", "--free-calls", "100"];
    let server = Server::start(dir.path(), &flags);
    let (covered, overage) = traffic(&server, "acme").await;
    assert_eq!(covered + overage, 20 * 3 + 10 * 5 + 15 * 2);
    assert_eq!((covered, overage), (100, 40));
    let db = server.db.clone();
    assert_eq!(
        ledger(&db, "acme", Item::Calls),
        (0, 0),
        "nothing flushed before SIGTERM"
    );

    let (status, stderr) = server.terminate();
    assert!(status.success(), "exit {status:?}\n{stderr}");
    assert_eq!(ledger(&db, "acme", Item::Calls), (covered, overage));
    assert_eq!(ledger(&db, "acme", Item::EgressBytes), (200, 0));

    let server = Server::start_on(&db, &flags);
    assert_eq!(used(&server, "acme", Item::Calls).await, 100);
    // The restarted server continues from the stored counters.
    let r = server
        .meter()
        .await
        .deduct(deduct("acme", 1, 0, None))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(split(&r.calls), (0, 1, 0));
}

#[tokio::test]
async fn kill_9_after_flush_keeps_the_flushed_usage() {
    let dir = tempfile::tempdir().unwrap();
    let flags = ["--flush-interval", "1h"];
    let server = Server::start(dir.path(), &flags);
    let (covered, _) = traffic(&server, "acme").await;
    let r = server
        .admin()
        .await
        .flush(proto::FlushRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.accounts_flushed, 1);
    // Acknowledged but not flushed: default durability may lose this on SIGKILL.
    server
        .meter()
        .await
        .deduct(deduct("acme", 1_000, 0, None))
        .await
        .unwrap();
    let db = server.db.clone();
    server.kill9();

    assert_eq!(ledger(&db, "acme", Item::Calls), (covered, 0));
    let server = Server::start_on(&db, &flags);
    assert_eq!(used(&server, "acme", Item::Calls).await, covered);
}

#[tokio::test]
async fn a_refused_flush_loses_nothing_and_is_retried() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &["--flush-interval", "1h"]);
    let (covered, _) = traffic(&server, "acme").await;
    let mut admin = server.admin().await;

    // Another process holds the database's write lock.
    let blocker = rusqlite::Connection::open(&server.db).unwrap();
    blocker.execute_batch("BEGIN EXCLUSIVE").unwrap();
    let e = admin.flush(proto::FlushRequest {}).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unavailable, "{e:?}");
    // Serving goes on meanwhile, from memory.
    let r = server
        .meter()
        .await
        .deduct(deduct("acme", 1, 0, None))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(split(&r.calls).0, 1);
    // The metrics show the refused flush and the usage waiting.
    assert_eq!(server.metric("packmeter_store_up").await, 0.0);
    assert!(server.metric("packmeter_oldest_unflushed_seconds").await > 0.0);
    assert!(server.metric("packmeter_flush_failures_total").await >= 1.0);
    blocker.execute_batch("ROLLBACK").unwrap();

    admin.flush(proto::FlushRequest {}).await.unwrap();
    assert_eq!(server.metric("packmeter_store_up").await, 1.0);
    assert_eq!(
        server.metric("packmeter_oldest_unflushed_seconds").await,
        0.0
    );
    assert_eq!(ledger(&server.db, "acme", Item::Calls), (covered + 1, 0));
    assert_eq!(used(&server, "acme", Item::Calls).await, covered + 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_deductions_have_exact_totals() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(
        dir.path(),
        &["--free-calls", "1000", "--flush-interval", "50ms"],
    );
    let accounts = ["a", "b", "c"];
    let mut tasks = Vec::new();
    for t in 0..8u64 {
        let mut meter = server.meter().await;
        tasks.push(tokio::spawn(async move {
            let mut sums = std::collections::HashMap::<&str, (u64, u64)>::new();
            for i in 0..150u64 {
                let account = accounts[((t + i) % 3) as usize];
                let r = meter
                    .deduct(deduct(account, 1 + (i % 7), 0, None))
                    .await
                    .unwrap()
                    .into_inner();
                let (c, o, _) = split(&r.calls);
                let e = sums.entry(account).or_default();
                e.0 += c;
                e.1 += o;
            }
            sums
        }));
    }
    let mut totals = std::collections::HashMap::<&str, (u64, u64)>::new();
    for t in tasks {
        for (a, (c, o)) in t.await.unwrap() {
            let e = totals.entry(a).or_default();
            e.0 += c;
            e.1 += o;
        }
    }
    server
        .admin()
        .await
        .flush(proto::FlushRequest {})
        .await
        .unwrap();
    let mut asked = 0;
    for a in accounts {
        let (c, o) = totals[a];
        asked += c + o;
        assert_eq!(
            c,
            1000.min(c + o),
            "account {a}: packs fill before any overage"
        );
        assert_eq!(ledger(&server.db, a, Item::Calls), (c, o), "account {a}");
        assert_eq!(used(&server, a, Item::Calls).await, c);
    }
    let expected: u64 = (0..8u64)
        .map(|_| (0..150u64).map(|i| 1 + i % 7).sum::<u64>())
        .sum();
    assert_eq!(asked, expected);
}

async fn resident(server: &Server) -> u64 {
    server.metric("packmeter_resident_accounts").await as u64
}

#[tokio::test]
async fn accounts_load_lazily_on_first_touch() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &[]);
    let mut meter = server.meter().await;
    for i in 0..50 {
        meter
            .deduct(deduct(&format!("acct-{i}"), 1, 0, None))
            .await
            .unwrap();
    }
    let db = server.db.clone();
    let (status, _) = server.terminate();
    assert!(status.success());
    let mode: String = rusqlite::Connection::open(&db)
        .unwrap()
        .query_row("PRAGMA journal_mode", [], |r| r.get(0))
        .unwrap();
    assert_eq!(mode, "wal");

    let server = Server::start_on(&db, &[]);
    assert_eq!(resident(&server).await, 0, "nothing is loaded at start-up");
    let r = server
        .meter()
        .await
        .deduct(deduct("acct-7", 1, 0, None))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        split(&r.calls),
        (1, 0, 999_998),
        "loaded with its stored usage"
    );
    assert_eq!(resident(&server).await, 1);
}

#[tokio::test]
async fn idle_accounts_leave_memory_once_flushed_and_come_back_intact() {
    let dir = tempfile::tempdir().unwrap();
    let idle = std::time::Duration::from_secs(1);
    let server = Server::start(
        dir.path(),
        &["--idle-evict", "1s", "--flush-interval", "50ms"],
    );
    let mut meter = server.meter().await;
    let started = std::time::Instant::now();
    for i in 0..20 {
        meter
            .deduct(deduct(&format!("acct-{i}"), 5, 0, None))
            .await
            .unwrap();
    }
    let resident_now = resident(&server).await;
    // None can have been evicted unless the first has been idle for the
    // whole idle period already (a busy machine); then some may be.
    if started.elapsed() < idle {
        assert_eq!(resident_now, 20);
    } else {
        assert!(resident_now <= 20, "{resident_now}");
    }
    common::until(std::time::Duration::from_secs(10), async || {
        resident(&server).await == 0
    })
    .await;
    let r = meter
        .deduct(deduct("acct-3", 1, 0, None))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        split(&r.calls),
        (1, 0, 999_994),
        "reloaded with its flushed usage"
    );
    assert_eq!(resident(&server).await, 1);
}

#[test]
fn sigterm_right_after_start_still_exits_cleanly() {
    // The handler is registered before the listening line is printed, so
    // even an immediate SIGTERM drains and flushes instead of killing.
    let dir = tempfile::tempdir().unwrap();
    for _ in 0..10 {
        let server = Server::start(dir.path(), &[]);
        let (status, stderr) = server.terminate();
        assert!(status.success(), "{status:?}\n{stderr}");
        assert!(stderr.contains("final flush done"), "{stderr}");
    }
}
