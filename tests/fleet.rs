//! Three `packmeter serve` nodes on one PostgreSQL database (issue 8,
//! "Three nodes"), through the real binary and gRPC: driven concurrently on
//! the same accounts, with retries (the same request id) sent to different
//! nodes, then flushed. The stored ledger must be exact: every acknowledged
//! call once, no pack past its capacity, every duplicate billed once. And
//! after a node's flush, its `ListPacks` shows the global usage.
//!
//! Skipped with `SKIPPED:` outside CI when no PostgreSQL answers (see
//! `common::pg`).
#![cfg(feature = "postgres")]

mod common;

use std::collections::BTreeMap;

use common::{deduct, pg::TestDb, Server};
use packmeter::grpc::proto::{self, Item};

/// Calls in each account's free tier, per month.
const FREE: u64 = 40;
/// Calls in each account's purchased pack.
const PACK: u64 = 100;
/// Requests per node and account.
const REQUESTS: u64 = 20;

fn args() -> Vec<&'static str> {
    vec![
        // Flushes only when the test asks (Admin.Flush).
        "--flush-interval",
        "1h",
        "--free-calls",
        "40",
        "--free-egress-bytes",
        "0",
    ]
}

fn rfc3339(t: chrono::DateTime<chrono::Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

/// What the database holds: per account, (usage total, per pack (used,
/// capacity), per pack the usage rows' sum).
type Ledger = BTreeMap<String, (i64, BTreeMap<String, (i64, i64)>, BTreeMap<String, i64>)>;

async fn ledger(db: &TestDb) -> Ledger {
    let c = db.client().await;
    let mut out = Ledger::new();
    for r in c
        .query(
            "SELECT account_id, pack_id, SUM(amount)::BIGINT FROM usage_hourly \
             WHERE item = 1 GROUP BY account_id, pack_id",
            &[],
        )
        .await
        .unwrap()
    {
        let e = out.entry(r.get(0)).or_default();
        e.0 += r.get::<_, i64>(2);
        e.2.insert(r.get(1), r.get(2));
    }
    for r in c
        .query(
            "SELECT account_id, pack_id, used, capacity FROM packs WHERE item = 1",
            &[],
        )
        .await
        .unwrap()
    {
        out.entry(r.get(0))
            .or_default()
            .1
            .insert(r.get(1), (r.get(2), r.get(3)));
    }
    out
}

/// One request: (node, account, request id, calls).
type Sent = (usize, String, String, u64);

/// Starts `n` nodes on `db`, each with a data directory of its own (kept
/// with them).
fn start_nodes(db: &TestDb, n: usize) -> (Vec<tempfile::TempDir>, Vec<Server>) {
    let data: Vec<_> = (0..n).map(|_| tempfile::tempdir().unwrap()).collect();
    let nodes = data
        .iter()
        .map(|d| Server::start_store(&db.url, d.path(), &args()))
        .collect();
    (data, nodes)
}

/// Accounts that take overage.
const HEAVY: [&str; 3] = ["acct-0", "acct-1", "acct-2"];

/// Activates `accounts` and grants each a purchased pack of `PACK` calls,
/// through `node`, before any node loads them.
async fn set_up(node: &Server, accounts: &[&str]) {
    let now = chrono::Utc::now();
    let mut admin = node.admin().await;
    for a in accounts {
        node.put_account(a, false, false).await;
        admin
            .grant_pack(proto::GrantPackRequest {
                account_id: a.to_string(),
                item: Item::Calls as i32,
                capacity: PACK,
                valid_from: Some(common::ts(&rfc3339(now - chrono::Duration::hours(2)))),
                valid_until: Some(common::ts(&rfc3339(now + chrono::Duration::days(30)))),
                pack_id: "bought".into(),
                priority: 0,
                valid_for: None,
            })
            .await
            .unwrap();
    }
}

/// Checks that the store holds exactly `expected` calls per heavy account,
/// each pack full and no further, its rows agreeing with it, and the rest
/// as overage.
fn check_heavy(stored: &Ledger, expected: &BTreeMap<String, i64>) {
    for a in HEAVY {
        let (total, packs, rows) = &stored[a];
        // Exactly what was acknowledged, duplicates once.
        assert_eq!(*total, expected[a], "{a}: {stored:?}");
        for (pack, (used, capacity)) in packs {
            assert!(used <= capacity, "{a}/{pack}: {used} > {capacity}");
            // Demand exceeds every pack: all full, the rest overage.
            assert_eq!(used, capacity, "{a}/{pack}");
            assert_eq!(
                rows.get(pack),
                Some(used),
                "{a}/{pack}: rows and packs agree"
            );
        }
        assert_eq!(packs.len(), 2, "{a}: the free tier and the bought pack");
        assert_eq!(rows[""], expected[a] - (FREE + PACK) as i64, "{a}: overage");
    }
}

#[tokio::test]
async fn three_nodes_bill_every_call_once_and_no_pack_past_its_capacity() {
    let Some(db) = TestDb::create().await else {
        return;
    };
    let (_data, nodes) = start_nodes(&db, 3);

    let heavy = HEAVY;
    set_up(&nodes[0], &["acct-0", "acct-1", "acct-2", "light"]).await;

    // Every node sends REQUESTS requests to every heavy account at once:
    // 3 x 20 x 3 = 180 calls an account, more than its 140 in packs,
    // though each node alone sees only 60.
    let mut tasks = Vec::new();
    for (n, node) in nodes.iter().enumerate() {
        for a in heavy {
            let mut meter = node.meter().await;
            tasks.push(tokio::spawn(async move {
                let mut acked: Vec<(Sent, u64, u64)> = Vec::new();
                for i in 0..REQUESTS {
                    let calls = 1 + (i + n as u64) % 5;
                    let mut d = deduct(a, calls, 0, None);
                    d.request_id = format!("{a}-n{n}-{i}");
                    let o = meter.deduct(d.clone()).await.unwrap().into_inner();
                    let (c, ov, _) = common::split(&o.calls);
                    acked.push(((n, a.to_string(), d.request_id, calls), c, ov));
                }
                acked
            }));
        }
    }
    let mut acked = Vec::new();
    for t in tasks {
        acked.extend(t.await.unwrap());
    }
    // Retries that reached another node: the same request id and amount,
    // acknowledged by both (neither knows of the other's).
    let mut retried = 0;
    for (k, a) in heavy.iter().enumerate() {
        for i in 0..3u64 {
            let (first, second) = (k % 3, (k + 1) % 3);
            let mut d = deduct(a, 2 + i, 0, None);
            d.request_id = format!("{a}-retry-{i}");
            for n in [first, second] {
                let o = nodes[n]
                    .meter()
                    .await
                    .deduct(d.clone())
                    .await
                    .unwrap()
                    .into_inner();
                assert!(!o.duplicate, "node {n} cannot know the other's request");
                let (c, ov, _) = common::split(&o.calls);
                acked.push(((n, a.to_string(), d.request_id.clone(), 2 + i), c, ov));
            }
            retried += 1;
        }
    }
    assert_eq!(retried, 9);
    for n in &nodes {
        n.admin().await.flush(proto::FlushRequest {}).await.unwrap();
    }

    // What was acknowledged, each request id once.
    let mut expected: BTreeMap<String, i64> = BTreeMap::new();
    let mut seen = std::collections::HashSet::new();
    let mut over_covered = 0;
    for ((_, a, id, calls), covered, overage) in &acked {
        assert_eq!(
            covered + overage,
            *calls,
            "an overage account is never denied"
        );
        over_covered += covered;
        if seen.insert(id.clone()) {
            *expected.entry(a.clone()).or_default() += *calls as i64;
        }
    }
    // In real time the nodes covered more than the packs hold.
    assert!(over_covered > 3 * (FREE + PACK), "{over_covered}");

    check_heavy(&ledger(&db).await, &expected);
    // Each retry's request id is stored once, with the amounts of the
    // node whose flush came first.
    let c = db.client().await;
    let n: i64 = c
        .query_one(
            "SELECT COUNT(*) FROM dedup WHERE request_id LIKE '%-retry-%'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 9);

    // Rebase: "light" gets 5 calls from each node, then each node in turn
    // deducts one more and flushes. With every other node flushed, its
    // ListPacks then shows the global usage, not only its own.
    for node in &nodes {
        node.meter()
            .await
            .deduct(deduct("light", 5, 0, None))
            .await
            .unwrap();
    }
    for node in &nodes {
        node.admin()
            .await
            .flush(proto::FlushRequest {})
            .await
            .unwrap();
    }
    for (n, node) in nodes.iter().enumerate() {
        let mut meter = node.meter().await;
        for a in heavy.iter().chain(&["light"]) {
            meter.deduct(deduct(a, 1, 0, None)).await.unwrap();
        }
        node.admin()
            .await
            .flush(proto::FlushRequest {})
            .await
            .unwrap();
        let stored = ledger(&db).await;
        for a in heavy.iter().chain(&["light"]) {
            let global: i64 = stored[*a].1.values().map(|(used, _)| used).sum();
            let shown = common::used(&node.packs(a).await, Item::Calls) as i64;
            assert_eq!(
                shown, global,
                "node {n}, {a}: ListPacks shows the global usage"
            );
            // GetUsage (the packs valid now) too.
            let usage = node
                .meter()
                .await
                .get_usage(proto::GetUsageRequest {
                    account_id: a.to_string(),
                    at: None,
                })
                .await
                .unwrap()
                .into_inner();
            assert_eq!(
                common::used(&usage.packs, Item::Calls) as i64,
                global,
                "node {n}, {a}: GetUsage shows the global usage"
            );
        }
        // 15 from the three nodes and one more from each node so far.
        assert_eq!(
            common::used(&node.packs("light").await, Item::Calls),
            15 + n as u64 + 1
        );
    }
    for node in nodes {
        let (status, stderr) = node.terminate();
        assert!(status.success(), "{stderr}");
    }
}

/// The same billing through `DeductStream`: every node streams to every
/// heavy account at once, in windows of `WINDOW` messages sent together
/// (so the server receives them together and deducts them as one group),
/// the last message of each window a retry of the one before it, which
/// must answer as a duplicate. The stored ledger is exactly what the
/// streams acknowledged, each request id once, and no pack goes past its
/// capacity though each node alone sees less demand than the packs hold.
#[tokio::test]
async fn three_nodes_bill_every_streamed_call_once() {
    const MESSAGES: usize = 40;
    const WINDOW: usize = 8;
    let Some(db) = TestDb::create().await else {
        return;
    };
    let (_data, nodes) = start_nodes(&db, 3);
    set_up(&nodes[0], &HEAVY).await;
    let mut tasks = Vec::new();
    for (n, node) in nodes.iter().enumerate() {
        for a in HEAVY {
            let mut meter = node.meter().await;
            tasks.push(tokio::spawn(async move {
                let (tx, mut replies) = common::open_stream(&mut meter, WINDOW).await;
                // (request id, calls, covered, overage, duplicate)
                let mut acked = Vec::new();
                for w in (0..MESSAGES).step_by(WINDOW) {
                    let window: Vec<_> = (w..w + WINDOW)
                        .map(|i| {
                            let j = if i == w + WINDOW - 1 { i - 1 } else { i };
                            let mut d = deduct(a, 1 + ((j + n) % 5) as u64, 0, None);
                            d.request_id = format!("{a}-n{n}-{j}");
                            d
                        })
                        .collect();
                    for d in &window {
                        tx.send(d.clone()).await.unwrap();
                    }
                    for (k, d) in window.into_iter().enumerate() {
                        let o = replies
                            .message()
                            .await
                            .unwrap()
                            .expect("an answer to every message");
                        assert_eq!(o.duplicate, k == WINDOW - 1, "{}", d.request_id);
                        let (c, ov, _) = common::split(&o.calls);
                        acked.push((d.request_id, d.calls, c, ov));
                    }
                }
                (a, acked)
            }));
        }
    }
    let mut expected: BTreeMap<String, i64> = BTreeMap::new();
    let mut seen = std::collections::HashSet::new();
    for t in tasks {
        let (a, acked) = t.await.unwrap();
        for (id, calls, covered, overage) in acked {
            assert_eq!(covered + overage, calls, "{id}: never denied");
            if seen.insert(id) {
                *expected.entry(a.to_string()).or_default() += calls as i64;
            }
        }
    }
    for n in &nodes {
        n.admin().await.flush(proto::FlushRequest {}).await.unwrap();
    }
    for a in HEAVY {
        // More than each account's packs, though no node alone saw more.
        assert!(expected[a] > 2 * (FREE + PACK) as i64, "{a}: {expected:?}");
    }
    check_heavy(&ledger(&db).await, &expected);
    for node in nodes {
        let (status, stderr) = node.terminate();
        assert!(status.success(), "{stderr}");
    }
}

/// Rebases run while deductions keep coming: two nodes flush every 20 ms
/// under concurrent traffic on one account. The store holds every
/// acknowledged call, and each node, once it has flushed, shows exactly
/// what the store holds. (A take lost by a rebase would be made good by the
/// next one, so this end state cannot show that race; `Meter::rebase`
/// avoids it by construction.)
#[tokio::test]
async fn rebases_under_concurrent_deductions_keep_ledger_and_counters_exact() {
    let Some(db) = TestDb::create().await else {
        return;
    };
    let data: Vec<_> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let flags = [
        "--flush-interval",
        "20ms",
        "--free-calls",
        "100000",
        "--free-egress-bytes",
        "0",
    ];
    let nodes: Vec<Server> = data
        .iter()
        .map(|d| Server::start_store(&db.url, d.path(), &flags))
        .collect();
    nodes[0].put_account("busy", false, false).await;
    let mut tasks = Vec::new();
    for node in &nodes {
        for t in 0..4u64 {
            let mut meter = node.meter().await;
            tasks.push(tokio::spawn(async move {
                let mut covered = 0;
                for i in 0..150u64 {
                    let calls = 1 + (i + t) % 3;
                    let o = meter
                        .deduct(deduct("busy", calls, 0, None))
                        .await
                        .unwrap()
                        .into_inner();
                    let (c, ov, _) = common::split(&o.calls);
                    assert_eq!((c, ov), (calls, 0), "the free tier has room");
                    covered += c;
                }
                covered
            }));
        }
    }
    let mut acked = 0;
    for t in tasks {
        acked += t.await.unwrap();
    }
    for node in nodes.iter().chain(&nodes) {
        node.admin()
            .await
            .flush(proto::FlushRequest {})
            .await
            .unwrap();
    }
    let stored = ledger(&db).await;
    let global: i64 = stored["busy"].1.values().map(|(used, _)| used).sum();
    assert_eq!(global, acked as i64);
    assert_eq!(stored["busy"].0, acked as i64);
    // A node learns the global usage of an account when it flushes the
    // account: each in turn deducts one more call and flushes, and then
    // shows exactly what the store holds, all nodes' calls included.
    for (n, node) in nodes.iter().enumerate() {
        node.meter()
            .await
            .deduct(deduct("busy", 1, 0, None))
            .await
            .unwrap();
        node.admin()
            .await
            .flush(proto::FlushRequest {})
            .await
            .unwrap();
        let stored = ledger(&db).await;
        let global: i64 = stored["busy"].1.values().map(|(used, _)| used).sum();
        assert_eq!(global, (acked + n as u64 + 1) as i64);
        assert_eq!(
            common::used(&node.packs("busy").await, Item::Calls) as i64,
            global,
            "node {n}"
        );
    }
}

/// Usage by day (`Admin.GetDailyUsage`, the pack page's chart) on a fleet:
/// two nodes deduct from one account at once, with retries of the same
/// request ids sent to the other node. Once both have flushed, every node
/// shows the same days: each call once, split against the one global free
/// tier exactly, whichever node deducted it.
#[tokio::test]
async fn daily_usage_is_the_same_on_every_node_once_each_has_flushed() {
    let Some(db) = TestDb::create().await else {
        return;
    };
    let (_data, nodes) = start_nodes(&db, 2);
    nodes[0].put_account("acme", false, false).await;

    // Node 0 takes ids 0..30 and node 1 ids 15..45, at once: 15 retries
    // reach the other node, 45 distinct calls in all.
    let mut tasks = Vec::new();
    for (node, ids) in nodes.iter().zip([0..30u64, 15..45]) {
        let mut meter = node.meter().await;
        tasks.push(tokio::spawn(async move {
            for i in ids {
                let mut r = deduct("acme", 1, 0, None);
                r.request_id = format!("r-{i}");
                meter.deduct(r).await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    for node in &nodes {
        node.admin()
            .await
            .flush(proto::FlushRequest {})
            .await
            .unwrap();
    }

    let mut seen = Vec::new();
    for node in &nodes {
        // Two days, in case the test runs across midnight in the billing zone.
        let r = node
            .admin()
            .await
            .get_daily_usage(proto::GetDailyUsageRequest {
                account_id: "acme".into(),
                days: 2,
            })
            .await
            .unwrap()
            .into_inner();
        let covered: u64 = r.days.iter().map(|d| d.calls_covered).sum();
        let overage: u64 = r.days.iter().map(|d| d.calls_overage).sum();
        seen.push((covered, overage));
    }
    // The free tier holds 40 calls (`args`); the other 5 are overage.
    assert_eq!(seen, vec![(40, 5), (40, 5)]);
}
