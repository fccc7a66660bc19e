//! Strict mode (issue 8, item 5): three `packmeter serve` on one PostgreSQL
//! database never admit a `deny` account more calls than its packs hold,
//! and a node killed while it holds a lease leaves the rest to the others
//! once the lease expires. Skipped with `SKIPPED:` outside CI when no
//! PostgreSQL answers (see `common::pg`).
#![cfg(feature = "postgres")]

mod common;

use std::time::Duration;

use common::{deduct, pg::TestDb, until, Server};
use packmeter::grpc::proto::{self, Decision, Item};

// No free calls: the purchased pack is all a deny account has. (Egress keeps
// its free tier: a deny account with no egress left is denied every call.)
const ARGS: &[&str] = &["--free-calls", "0"];

/// A `deny` account with one purchased pack of `calls`, valid now.
async fn deny_account(node: &Server, account: &str, calls: u64) {
    node.put_account(account, false, true).await;
    node.admin()
        .await
        .grant_pack(proto::GrantPackRequest {
            account_id: account.into(),
            item: Item::Calls as i32,
            capacity: calls,
            pack_id: format!("{account}-pack"),
            valid_for: Some(proto::Validity {
                months: 1,
                seconds: 0,
            }),
            ..Default::default()
        })
        .await
        .expect("GrantPack");
}

/// Sends `n` one-call deductions to `node`, `lanes` at a time, and counts
/// the ALLOWs.
async fn drive(node: &Server, account: &str, n: usize, lanes: usize) -> u64 {
    let mut set = tokio::task::JoinSet::new();
    for lane in 0..lanes {
        let mut meter = node.meter().await;
        let account = account.to_string();
        let count = n / lanes + usize::from(lane < n % lanes);
        set.spawn(async move {
            let mut allowed = 0;
            for _ in 0..count {
                let r = meter
                    .deduct(deduct(&account, 1, 0, None))
                    .await
                    .expect("Deduct")
                    .into_inner();
                if r.decision == Decision::Allow as i32 {
                    allowed += 1;
                }
            }
            allowed
        });
    }
    let mut allowed = 0;
    while let Some(a) = set.join_next().await {
        allowed += a.unwrap();
    }
    allowed
}

/// The pack's stored `used`, read with SQL.
async fn stored_used(db: &TestDb, account: &str) -> i64 {
    db.client()
        .await
        .query_one(
            "SELECT COALESCE(SUM(used), 0)::BIGINT FROM packs WHERE account_id = $1 AND item = 1",
            &[&account],
        )
        .await
        .unwrap()
        .get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_nodes_never_admit_a_deny_account_more_calls_than_its_pack_holds() {
    let Some(db) = TestDb::create().await else {
        return;
    };
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let nodes: Vec<Server> = dirs
        .iter()
        .map(|d| Server::start_store(&db.url, d.path(), ARGS))
        .collect();
    deny_account(&nodes[0], "strict", 100).await;

    // 3 x 80 calls at once, on the same account, against 100.
    let (a, b, c) = tokio::join!(
        drive(&nodes[0], "strict", 80, 4),
        drive(&nodes[1], "strict", 80, 4),
        drive(&nodes[2], "strict", 80, 4),
    );
    let admitted = a + b + c;
    eprintln!("admitted {admitted} calls ({a} + {b} + {c}) of a 100-call pack");
    assert!(
        admitted <= 100,
        "admitted {admitted} calls ({a} + {b} + {c}) of a 100-call pack"
    );
    // Leases left on other nodes hold back a little, never most of it.
    assert!(
        admitted >= 80,
        "admitted only {admitted} calls ({a} + {b} + {c}) of a 100-call pack"
    );
    // Each call is counted once, as answered: a denial for a lease spent
    // meanwhile, retried, is not counted.
    let (mut allow, mut deny) = (0.0, 0.0);
    for n in &nodes {
        allow += n
            .metric(r#"packmeter_deductions_total{decision="allow"}"#)
            .await;
        deny += n
            .metric(r#"packmeter_deductions_total{decision="deny"}"#)
            .await;
    }
    assert_eq!((allow, deny), (admitted as f64, (240 - admitted) as f64));
    for n in &nodes {
        n.admin()
            .await
            .flush(proto::FlushRequest {})
            .await
            .expect("Flush");
    }
    assert_eq!(stored_used(&db, "strict").await, admitted as i64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_killed_nodes_lease_expires_and_the_others_use_the_rest() {
    let Some(db) = TestDb::create().await else {
        return;
    };
    let dirs: Vec<_> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let mut args = ARGS.to_vec();
    args.extend(["--lease-ttl", "1s"]);
    let doomed = Server::start_store(&db.url, dirs[0].path(), &args);
    let survivor = Server::start_store(&db.url, dirs[1].path(), &args);
    deny_account(&doomed, "strict", 100).await;

    // The doomed node takes a lease (at least 10 calls), uses 5 of them,
    // books them, and dies holding the rest.
    assert_eq!(drive(&doomed, "strict", 5, 1).await, 5);
    doomed
        .admin()
        .await
        .flush(proto::FlushRequest {})
        .await
        .expect("Flush");
    let held: i64 = db
        .client()
        .await
        .query_one(
            "SELECT granted - used FROM leases WHERE account_id = 'strict'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(held > 0, "the doomed node holds no unused lease");
    doomed.kill9();

    // The survivor gets the other 95 once the dead node's lease expires,
    // and not one more.
    let mut admitted = 0;
    until(Duration::from_secs(20), async || {
        admitted += drive(&survivor, "strict", 20, 2).await;
        assert!(admitted <= 95, "admitted {admitted} of the 95 left");
        admitted == 95
    })
    .await;
    assert_eq!(drive(&survivor, "strict", 10, 1).await, 0);
    survivor
        .admin()
        .await
        .flush(proto::FlushRequest {})
        .await
        .expect("Flush");
    assert_eq!(stored_used(&db, "strict").await, 100);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stopped_node_returns_its_lease_and_the_others_get_it_at_once() {
    let Some(db) = TestDb::create().await else {
        return;
    };
    let dirs: Vec<_> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    // Leases outlive the test: only a returned one can be used by the other.
    let mut args = ARGS.to_vec();
    args.extend(["--lease-ttl", "1h"]);
    let stopping = Server::start_store(&db.url, dirs[0].path(), &args);
    let other = Server::start_store(&db.url, dirs[1].path(), &args);
    deny_account(&stopping, "strict", 100).await;
    assert_eq!(drive(&stopping, "strict", 5, 1).await, 5);
    let (status, stderr) = stopping.terminate();
    assert!(status.success(), "{stderr}");
    let reserved: i64 = db
        .client()
        .await
        .query_one(
            "SELECT COALESCE(SUM(granted - used), 0)::BIGINT FROM leases",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(reserved, 0, "the stopped node kept a reservation");
    assert_eq!(stored_used(&db, "strict").await, 5);
    // One lane: each call renews at most once, and all 95 are free.
    assert_eq!(drive(&other, "strict", 120, 1).await, 95);
}

/// Cuts the node off the test database (new connections refused, open ones
/// ended), drives 20 calls of the `deny` account, and restores access.
/// Returns how many were admitted.
async fn admitted_while_the_store_is_unreachable(outage: &str) -> Option<u64> {
    let db = TestDb::create().await?;
    let dir = tempfile::tempdir().unwrap();
    let mut args = ARGS.to_vec();
    // Nothing renews or flushes in the background during the test.
    args.extend([
        "--lease-ttl",
        "1h",
        "--flush-interval",
        "1h",
        "--lease-outage",
        outage,
    ]);
    let node = Server::start_store(&db.url, dir.path(), &args);
    deny_account(&node, "strict", 100).await;
    // The first lease is the smallest, 10 calls: 5 stay unused.
    assert_eq!(drive(&node, "strict", 5, 1).await, 5);
    // From the server's maintenance database: a session cannot lock out
    // its own database.
    let sql = common::pg::connect(&common::pg::admin_url()).await.unwrap();
    let name = &db.name;
    sql.batch_execute(&format!(
        "ALTER DATABASE \"{name}\" ALLOW_CONNECTIONS false; \
         SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
         WHERE datname = '{name}' AND pid <> pg_backend_pid();"
    ))
    .await
    .unwrap();
    let admitted = drive(&node, "strict", 20, 1).await;
    sql.batch_execute(&format!("ALTER DATABASE \"{name}\" ALLOW_CONNECTIONS true"))
        .await
        .unwrap();
    Some(admitted)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn while_the_store_is_unreachable_a_spent_lease_denies_by_default() {
    let Some(admitted) = admitted_while_the_store_is_unreachable("deny").await else {
        return;
    };
    // What the lease still held, and nothing more.
    assert_eq!(admitted, 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn while_the_store_is_unreachable_lease_outage_allow_admits() {
    let Some(admitted) = admitted_while_the_store_is_unreachable("allow").await else {
        return;
    };
    assert_eq!(admitted, 20);
}
