//! The store goes away under load (issue 8, "Outage"), through the real
//! binary and the real PostgreSQL, without stopping the shared server:
//!
//! - a proxy owned by the test sits between three `packmeter serve` nodes
//!   and PostgreSQL; for 30 s it cuts every open connection and turns new
//!   ones away (blackholed for the first half, reset for the second), then
//!   forwards again;
//! - `pg_terminate_backend` kills the nodes' backends, again and again,
//!   under load.
//!
//! Clients keep deducting from shared overage accounts throughout, with
//! retries of the same request id sent to another node. Every node must
//! keep answering ALLOW; `/metrics` must show `packmeter_store_up 0` and a
//! growing `packmeter_oldest_unflushed_seconds` while the store is away;
//! the nodes must catch up on their own once it is back; and after a
//! `Flush` of every node the stored ledger must be exactly what was
//! acknowledged, each duplicate once, no pack past its capacity.
//!
//! Skipped with `SKIPPED:` outside CI when no PostgreSQL answers (see
//! `common::pg`).
#![cfg(feature = "postgres")]

mod common;

use std::time::{Duration, Instant};

use common::{
    fleet::{check_ledger, longest_silence, Load, LoadPlan},
    pg::{self, TestDb},
    proxy::{Mode, Proxy},
    until, Server,
};
use packmeter::grpc::proto::{self, Item};

/// What issue 8 names.
const OUTAGE: Duration = Duration::from_secs(30);
const ACCOUNTS: [&str; 2] = ["acct-0", "acct-1"];
/// Calls in each account's free tier.
const FREE: u64 = 40;
/// Calls in each account's purchased pack: filled under the load within
/// seconds, so the nodes cover past it in real time, most of all while
/// they cannot flush.
const PACK: u64 = 5_000;

const ARGS: &[&str] = &[
    "--flush-interval",
    "200ms",
    "--free-calls",
    "40",
    "--free-egress-bytes",
    "0",
];

async fn set_up(node: &Server) {
    let mut admin = node.admin().await;
    for a in ACCOUNTS {
        node.put_account(a, false, false).await;
        admin
            .grant_pack(proto::GrantPackRequest {
                account_id: a.into(),
                item: Item::Calls as i32,
                capacity: PACK,
                pack_id: "bought".into(),
                valid_for: Some(proto::Validity {
                    months: 1,
                    seconds: 0,
                }),
                ..Default::default()
            })
            .await
            .expect("GrantPack");
    }
}

async fn metric_of_all(nodes: &[Server], series: &str) -> Vec<f64> {
    let mut out = Vec::new();
    for n in nodes {
        out.push(n.metric(series).await);
    }
    out
}

const STORE_UP: &str = "packmeter_store_up";
const AGE: &str = "packmeter_oldest_unflushed_seconds";
const FLUSHES: &str = "packmeter_flush_duration_seconds_count";

/// `Admin.Flush` on every node; a flush that does not finish within a
/// minute fails the test (a hung flush is one of the failures looked for).
async fn flush_all(nodes: &[Server]) {
    for (n, node) in nodes.iter().enumerate() {
        let mut admin = node.admin().await;
        let flushed =
            tokio::time::timeout(Duration::from_secs(60), admin.flush(proto::FlushRequest {}))
                .await
                .unwrap_or_else(|_| panic!("node {n}: Flush hung"));
        flushed.unwrap_or_else(|e| panic!("node {n}: Flush failed: {e:?}"));
    }
}

fn start_nodes(url: &str, count: usize) -> (Vec<tempfile::TempDir>, Vec<Server>) {
    let dirs: Vec<_> = (0..count).map(|_| tempfile::tempdir().unwrap()).collect();
    let nodes = dirs
        .iter()
        .map(|d| Server::start_store(url, d.path(), ARGS))
        .collect();
    (dirs, nodes)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn thirty_seconds_without_the_store_lose_and_double_nothing() {
    let Some(db) = TestDb::create().await else {
        return;
    };
    let upstream = pg::tcp_addr(&db.url)
        .await
        .expect("the test server is reached over TCP");
    let proxy = Proxy::start(upstream).await;
    let url = pg::via(&db.url, proxy.addr);
    let (_dirs, nodes) = start_nodes(&url, 3);
    set_up(&nodes[0]).await;
    let grpc: Vec<String> = nodes.iter().map(|n| n.grpc.clone()).collect();
    let load = Load::start(
        &grpc,
        &ACCOUNTS,
        LoadPlan {
            lanes: 1,
            dup_every: 10,
            failover: false,
        },
    );

    // Before: every node flushes through the proxy.
    until(Duration::from_secs(20), async || {
        let flushes = metric_of_all(&nodes, FLUSHES).await;
        let up = metric_of_all(&nodes, STORE_UP).await;
        flushes.iter().all(|f| *f >= 3.0) && up.iter().all(|u| *u == 1.0)
    })
    .await;

    // The outage: open connections cut, new ones blackholed.
    let cut_before = proxy.cut();
    let down_at = Instant::now();
    proxy.set(Mode::Blackhole);
    until(Duration::from_secs(10), async || {
        metric_of_all(&nodes, STORE_UP)
            .await
            .iter()
            .all(|u| *u == 0.0)
    })
    .await;
    // The oldest unflushed usage ages on every node.
    let first = metric_of_all(&nodes, AGE).await;
    until(Duration::from_secs(15), async || {
        let now = metric_of_all(&nodes, AGE).await;
        now.iter().zip(&first).all(|(n, f)| *n >= f + 3.0)
    })
    .await;
    // Halfway, the server refuses instead: connections reset at once.
    tokio::time::sleep_until((down_at + OUTAGE / 2).into()).await;
    proxy.set(Mode::Refuse);
    tokio::time::sleep_until((down_at + OUTAGE).into()).await;
    let up = metric_of_all(&nodes, STORE_UP).await;
    let ages = metric_of_all(&nodes, AGE).await;
    let up_at = Instant::now();
    proxy.set(Mode::Forward);
    eprintln!(
        "after {:?} without the store: store_up {up:?}, oldest unflushed {ages:?} s; \
         {} connections cut, {} turned away",
        up_at - down_at,
        proxy.cut() - cut_before,
        proxy.turned_away()
    );
    assert!(up.iter().all(|u| *u == 0.0), "store_up {up:?}");
    // Usage from the first seconds of the outage is still waiting.
    assert!(
        ages.iter().all(|a| *a >= (OUTAGE / 2).as_secs_f64()),
        "oldest unflushed {ages:?}"
    );
    assert!(proxy.cut() > cut_before, "the pooled connections were cut");
    assert!(proxy.turned_away() > 0, "the nodes tried to reconnect");

    // The store is back: the nodes catch up on their own, under load.
    let mut seen = String::new();
    let caught_up = tokio::time::timeout(
        Duration::from_secs(15),
        until(Duration::from_secs(3600), async || {
            let up = metric_of_all(&nodes, STORE_UP).await;
            let ages = metric_of_all(&nodes, AGE).await;
            let now = format!("store_up {up:?}, oldest unflushed {ages:?}");
            if std::env::var_os("OUTAGE_TRACE").is_some() {
                eprintln!("{:?} {now}", up_at.elapsed());
            }
            seen = now;
            up.iter().all(|u| *u == 1.0) && ages.iter().all(|a| *a < 5.0)
        }),
    )
    .await;
    assert!(
        caught_up.is_ok(),
        "not caught up 15 s after the store came back: {seen}"
    );
    eprintln!("caught up {:?} after the store came back", up_at.elapsed());
    let log = load.stop().await;
    assert!(log.errors.is_empty());

    // Every node kept answering while the store was away.
    let silence = longest_silence(&log.acks, nodes.len(), down_at, up_at);
    let during = log
        .acks
        .iter()
        .filter(|a| a.at >= down_at && a.at <= up_at)
        .count();
    eprintln!("{during} answers during the outage; longest silence per node {silence:?}");
    for (n, s) in silence.iter().enumerate() {
        assert!(
            *s < Duration::from_secs(5),
            "node {n} answered nothing for {s:?} during the outage"
        );
    }
    // Overage accounts are never denied.
    assert!(log.acks.iter().all(|a| a.allowed));

    flush_all(&nodes).await;
    assert_eq!(metric_of_all(&nodes, STORE_UP).await, vec![1.0; 3]);
    assert_eq!(metric_of_all(&nodes, AGE).await, vec![0.0; 3]);
    let summary = check_ledger(&db, &log.acks, &[]).await;
    for (account, (admitted, covered, holds)) in &summary {
        eprintln!(
            "{account}: {admitted} calls admitted, {covered} covered in real time, packs hold {holds}"
        );
        assert_eq!(*holds, (FREE + PACK) as i64);
        assert!(*admitted > *holds, "{account}: the load outran the packs");
    }
    let dups = log.acks.iter().filter(|a| a.id.ends_with("-dup")).count();
    assert!(dups > 0);
    for node in nodes {
        let (status, stderr) = node.terminate();
        if std::env::var_os("OUTAGE_TRACE").is_some() {
            eprintln!("{stderr}");
        }
        assert!(status.success(), "{stderr}");
    }
}

/// The nodes' PostgreSQL backends killed with `pg_terminate_backend`, five
/// times under load: after each, every node flushes again (its pool
/// replaces the dead connections), and the ledger is exact in the end.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn killed_backends_under_load_lose_and_double_nothing() {
    let Some(db) = TestDb::create().await else {
        return;
    };
    let (_dirs, nodes) = start_nodes(&db.url, 3);
    set_up(&nodes[0]).await;
    let grpc: Vec<String> = nodes.iter().map(|n| n.grpc.clone()).collect();
    let load = Load::start(
        &grpc,
        &ACCOUNTS,
        LoadPlan {
            lanes: 1,
            dup_every: 10,
            failover: false,
        },
    );
    let killer = db.client().await;
    let mut terminated = 0;
    for _ in 0..5 {
        let before = metric_of_all(&nodes, FLUSHES).await;
        // (In the select list, so that it runs after the filter.)
        let n = killer
            .query(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
                 WHERE datname = current_database() AND pid <> pg_backend_pid()",
                &[],
            )
            .await
            .unwrap()
            .iter()
            .filter(|r| r.get::<_, bool>(0))
            .count();
        assert!(n > 0, "the nodes had backends to kill");
        terminated += n;
        // Each node flushes twice more: on new connections.
        until(Duration::from_secs(20), async || {
            let now = metric_of_all(&nodes, FLUSHES).await;
            now.iter().zip(&before).all(|(n, b)| *n >= b + 2.0)
        })
        .await;
    }
    let failures = metric_of_all(&nodes, "packmeter_flush_failures_total").await;
    eprintln!("{terminated} backends terminated; flush failures per node {failures:?}");
    let log = load.stop().await;
    assert!(log.errors.is_empty());
    assert!(log.acks.iter().all(|a| a.allowed));
    flush_all(&nodes).await;
    assert_eq!(metric_of_all(&nodes, STORE_UP).await, vec![1.0; 3]);
    let summary = check_ledger(&db, &log.acks, &[]).await;
    for (account, (admitted, covered, holds)) in &summary {
        eprintln!(
            "{account}: {admitted} calls admitted, {covered} covered in real time, packs hold {holds}"
        );
    }
    for node in nodes {
        let (status, stderr) = node.terminate();
        assert!(status.success(), "{stderr}");
    }
}
