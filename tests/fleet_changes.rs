//! Changes reach every node (issue 8, item 4): two `packmeter serve` on one
//! PostgreSQL database; an account is resident on node B, and a grant or an
//! account change made through node A is applied by B within a bounded
//! wait (a few flush intervals), not only after B reloads the account.
#![cfg(feature = "postgres")]

mod common;

use std::time::Duration;

use common::{deduct, pg::TestDb, split, until, Server};
use packmeter::grpc::proto::{self, Decision, Item};

/// Short intervals: changes are read once per flush interval.
const ARGS: &[&str] = &[
    "--flush-interval",
    "200ms",
    "--free-calls",
    "0",
    "--free-egress-bytes",
    "0",
];

/// How long a change may take to reach the other node: many flush
/// intervals, for a loaded CI machine.
const BOUND: Duration = Duration::from_secs(10);

/// Two nodes on one fresh database, and the account `acme` resident on B
/// (created there, then deducted from).
async fn two_nodes(db: &TestDb, data: &tempfile::TempDir) -> (Server, Server) {
    let a = Server::start_store(&db.url, &data.path().join("a"), ARGS);
    let b = Server::start_store(&db.url, &data.path().join("b"), ARGS);
    b.put_account("acme", false, false).await;
    let r = b
        .meter()
        .await
        .deduct(deduct("acme", 1, 0, None))
        .await
        .unwrap()
        .into_inner();
    // No free tier, no pack: overage.
    assert_eq!(split(&r.calls), (0, 1, 0));
    (a, b)
}

/// B's answer to a check (`calls = 0`): nothing deducted.
async fn check(b: &Server) -> proto::DeductResponse {
    b.meter()
        .await
        .deduct(deduct("acme", 0, 0, None))
        .await
        .unwrap()
        .into_inner()
}

#[tokio::test]
async fn a_pack_granted_through_one_node_covers_calls_on_another() {
    let Some(db) = TestDb::create().await else {
        return;
    };
    let data = tempfile::tempdir().unwrap();
    let (a, b) = two_nodes(&db, &data).await;
    a.admin()
        .await
        .grant_pack(proto::GrantPackRequest {
            account_id: "acme".into(),
            item: Item::Calls as i32,
            capacity: 100,
            valid_from: None,
            valid_until: Some(common::ts("2999-01-01T00:00:00Z")),
            pack_id: "p-a".into(),
            priority: 0,
            valid_for: None,
        })
        .await
        .unwrap();
    // B's deductions see the pack: a check reports its balance.
    until(BOUND, async || split(&check(&b).await.calls).2 == 100).await;
    let r = b
        .meter()
        .await
        .deduct(deduct("acme", 3, 0, None))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(split(&r.calls), (3, 0, 97));
    let packs = b.packs("acme").await;
    let p = packs.iter().find(|p| p.pack_id == "p-a").expect("p-a on B");
    assert_eq!(p.used, 3);
}

#[tokio::test]
async fn account_settings_put_through_one_node_apply_on_another() {
    let Some(db) = TestDb::create().await else {
        return;
    };
    let data = tempfile::tempdir().unwrap();
    let (a, b) = two_nodes(&db, &data).await;

    // deny_on_exhausted: B stops taking overage.
    a.put_account("acme", false, true).await;
    let mut meter = b.meter().await;
    until(BOUND, async || {
        let r = meter
            .deduct(deduct("acme", 1, 0, None))
            .await
            .unwrap()
            .into_inner();
        r.decision == Decision::Deny as i32
    })
    .await;
    let on_b = b.admin().await.get_account(get("acme")).await.unwrap();
    assert!(on_b.into_inner().deny_on_exhausted);

    // suspended: B denies every call as suspended.
    a.put_account("acme", true, false).await;
    until(BOUND, async || {
        check(&b).await.deny_reason == "account is suspended"
    })
    .await;
    let r = b
        .meter()
        .await
        .deduct(deduct("acme", 1, 0, None))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.decision, Decision::Deny as i32);
    assert_eq!(r.deny_reason, "account is suspended");

    // And back: B serves the account again, taking overage.
    a.put_account("acme", false, false).await;
    until(BOUND, async || {
        check(&b).await.decision == Decision::Allow as i32
    })
    .await;
    let r = b
        .meter()
        .await
        .deduct(deduct("acme", 2, 0, None))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (r.decision, split(&r.calls)),
        (Decision::Allow as i32, (0, 2, 0))
    );
}

/// Sequence numbers are taken at insert and seen at commit: a change can
/// become visible after one with a higher number. Here a grant written
/// straight to the database (as another node's transaction would) holds a
/// lower number open while a PutAccount through A commits a higher one and
/// reaches B; once it commits, B must still apply it.
#[tokio::test]
async fn a_change_committed_after_a_later_one_still_reaches_the_other_node() {
    let Some(db) = TestDb::create().await else {
        return;
    };
    let data = tempfile::tempdir().unwrap();
    let (a, b) = two_nodes(&db, &data).await;
    let mut slow = db.client().await;
    let tx = slow.transaction().await.unwrap();
    let now = packmeter::calendar::now_ts();
    tx.execute(
        "INSERT INTO packs (account_id, pack_id, source, item, capacity, valid_from, \
         valid_until, priority, created_at, used) VALUES ('acme', 'p-slow', 2, 1, 40, $1, $2, 0, $1, 0)",
        &[&(now - 1_000_000), &(now + 3_600_000_000 * 24)],
    )
    .await
    .unwrap();
    let low: i64 = tx
        .query_one(
            "INSERT INTO changes (account_id, kind, at) VALUES ('acme', 2, $1) RETURNING seq",
            &[&now],
        )
        .await
        .unwrap()
        .get(0);
    // A later change, committed first, reaches B.
    a.put_account("acme", false, true).await;
    let higher: i64 = db
        .client()
        .await
        .query_one("SELECT MAX(seq) FROM changes", &[])
        .await
        .unwrap()
        .get(0);
    assert!(higher > low);
    let mut meter = b.meter().await;
    until(BOUND, async || {
        let r = meter
            .deduct(deduct("acme", 1, 0, None))
            .await
            .unwrap()
            .into_inner();
        r.decision == Decision::Deny as i32
    })
    .await;
    // B has read past `low`; now it commits.
    tx.commit().await.unwrap();
    until(BOUND, async || split(&check(&b).await.calls).2 == 40).await;
}

/// A PutAccount through B that names one flag keeps the other as the
/// store holds it, even before B has read the change A made to it: B's poll
/// is an hour away here.
#[tokio::test]
async fn a_put_through_a_node_that_has_not_yet_seen_a_change_keeps_it() {
    let Some(db) = TestDb::create().await else {
        return;
    };
    let data = tempfile::tempdir().unwrap();
    let a = Server::start_store(&db.url, &data.path().join("a"), ARGS);
    let mut slow = ARGS.to_vec();
    slow[1] = "1h";
    let b = Server::start_store(&db.url, &data.path().join("b"), &slow);
    b.put_account("acme", false, false).await;
    b.meter()
        .await
        .deduct(deduct("acme", 1, 0, None))
        .await
        .unwrap();
    a.put_account("acme", false, true).await;
    let put = b
        .admin()
        .await
        .put_account(proto::PutAccountRequest {
            account: Some(proto::Account {
                account_id: "acme".into(),
                activated_at: None,
                suspended: true,
                deny_on_exhausted: false,
                billing_zone: String::new(),
            }),
            update_mask: Some(prost_types::FieldMask {
                paths: vec!["suspended".into()],
            }),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(put.suspended && put.deny_on_exhausted, "{put:?}");
    let row = db
        .client()
        .await
        .query_one(
            "SELECT suspended, deny_on_exhausted FROM accounts WHERE account_id = 'acme'",
            &[],
        )
        .await
        .unwrap();
    assert_eq!((row.get::<_, bool>(0), row.get::<_, bool>(1)), (true, true));
}

/// An activation set through A gives B the free tier of an account B holds
/// unactivated (granted a pack there, no deduction yet).
#[tokio::test]
async fn an_activation_put_through_one_node_starts_the_free_tier_on_another() {
    let Some(db) = TestDb::create().await else {
        return;
    };
    let data = tempfile::tempdir().unwrap();
    let args = ["--flush-interval", "200ms", "--free-calls", "50"];
    let a = Server::start_store(&db.url, &data.path().join("a"), &args);
    let b = Server::start_store(&db.url, &data.path().join("b"), &args);
    b.admin()
        .await
        .grant_pack(proto::GrantPackRequest {
            account_id: "acme".into(),
            item: Item::Calls as i32,
            capacity: 10,
            valid_from: None,
            valid_until: Some(common::ts("2999-01-01T00:00:00Z")),
            pack_id: "p-b".into(),
            priority: 0,
            valid_for: None,
        })
        .await
        .unwrap();
    let activation_on_b = async || {
        let on_b = b.admin().await.get_account(get("acme")).await.unwrap();
        on_b.into_inner().activated_at
    };
    assert_eq!(activation_on_b().await, None);
    let hour_ago = chrono::Utc::now() - chrono::Duration::hours(1);
    let activated_at = prost_types::Timestamp {
        seconds: hour_ago.timestamp(),
        nanos: 0,
    };
    let put = a
        .admin()
        .await
        .put_account(proto::PutAccountRequest {
            account: Some(proto::Account {
                account_id: "acme".into(),
                activated_at: Some(activated_at),
                suspended: false,
                deny_on_exhausted: false,
                billing_zone: String::new(),
            }),
            update_mask: None,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(put.activated_at, Some(activated_at));
    until(BOUND, async || {
        activation_on_b().await == Some(activated_at)
    })
    .await;
    // B deducts from the free tier of that activation: 50 calls, then the pack.
    let r = b
        .meter()
        .await
        .deduct(deduct("acme", 55, 0, None))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(split(&r.calls), (55, 0, 5));
}

fn get(account: &str) -> proto::GetAccountRequest {
    proto::GetAccountRequest {
        account_id: account.into(),
    }
}
