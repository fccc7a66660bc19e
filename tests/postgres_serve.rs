//! `packmeter serve --store postgres://…` end to end, through the real
//! binary and a PostgreSQL database of the test's own (see `common::pg`;
//! skipped with `SKIPPED:` outside CI when no server answers): deduct,
//! flush, restart, export; a schema newer than the binary is refused with
//! exit 64; an unreachable server with exit 1; the password never shows.
#![cfg(feature = "postgres")]

mod common;

use std::process::{Command, Stdio};

use common::{deduct, pg::TestDb, split, ts, Server};
use packmeter::grpc::proto::{self, Item};

/// 2020 events are accepted while the late grace is this long (R9).
const REPLAY: &[&str] = &[
    "--late-grace",
    "3650d",
    "--dedup-window",
    "3650d",
    "--free-calls",
    "0",
    "--free-egress-bytes",
    "0",
];

/// `(pack_id, SUM(amount))` of the account's calls rows, read with SQL.
async fn ledger(db: &TestDb, account: &str) -> Vec<(String, i64)> {
    db.client()
        .await
        .query(
            "SELECT pack_id, SUM(amount)::BIGINT FROM usage_hourly \
             WHERE account_id = $1 AND item = 1 GROUP BY pack_id ORDER BY pack_id",
            &[&account],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

#[tokio::test]
async fn serve_on_postgres_deducts_flushes_restarts_and_exports() {
    let Some(db) = TestDb::create().await else {
        return;
    };
    let data = tempfile::tempdir().unwrap();
    let mut args = REPLAY.to_vec();
    args.extend(["--flush-interval", "1h"]);
    let server = Server::start_store(&db.url, data.path(), &args);
    let mut admin = server.admin().await;
    admin
        .grant_pack(proto::GrantPackRequest {
            account_id: "acme".into(),
            item: Item::Calls as i32,
            capacity: 10,
            valid_from: Some(ts("2020-01-01T00:00:00Z")),
            valid_until: Some(ts("2021-01-01T00:00:00Z")),
            pack_id: "p-2020".into(),
            priority: 0,
            valid_for: None,
        })
        .await
        .unwrap();
    let mut meter = server.meter().await;
    let (mut covered, mut overage) = (0, 0);
    for i in 0..4 {
        let mut d = deduct("acme", 3, 0, Some("2020-03-01T10:15:00Z"));
        d.request_id = format!("req-{i}");
        let (c, o, _) = split(&meter.deduct(d).await.unwrap().into_inner().calls);
        covered += c;
        overage += o;
    }
    assert_eq!((covered, overage), (10, 2));
    // A retry of a request id is answered, not billed again.
    let mut again = deduct("acme", 3, 0, Some("2020-03-01T10:15:00Z"));
    again.request_id = "req-3".into();
    meter.deduct(again).await.unwrap();

    admin.flush(proto::FlushRequest {}).await.unwrap();
    // The rows are in PostgreSQL, exactly.
    assert_eq!(
        ledger(&db, "acme").await,
        [(String::new(), 2), ("p-2020".to_string(), 10)]
    );
    let (status, stderr) = server.terminate();
    assert!(status.success(), "{stderr}");
    // Nothing was left to spill.
    assert_eq!(std::fs::read_dir(data.path()).unwrap().count(), 0);

    // A new process on the same database: default late grace, so 2020 is
    // closed and settled.
    let server = Server::start_store(&db.url, data.path(), &[]);
    let packs = server.packs("acme").await;
    assert_eq!(common::used(&packs, Item::Calls), 10);
    let mut rows = server
        .admin()
        .await
        .export_usage(proto::ExportUsageRequest {
            from: Some(ts("2020-01-01T00:00:00Z")),
            to: Some(ts("2021-01-01T00:00:00Z")),
            account_id: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let mut got = Vec::new();
    while let Some(r) = rows.message().await.unwrap() {
        got.push((r.account_id, r.hour, r.pack_id, r.amount));
    }
    let hour = Some(ts("2020-03-01T10:00:00Z"));
    assert_eq!(
        got,
        [
            ("acme".to_string(), hour, String::new(), 2),
            ("acme".to_string(), hour, "p-2020".to_string(), 10),
        ]
    );
    // The retried request is still known after the restart.
    let mut again = deduct("acme", 3, 0, None);
    again.request_id = "req-3".into();
    let mut meter = server.meter().await;
    let before = ledger(&db, "acme").await;
    meter.deduct(again).await.unwrap();
    server
        .admin()
        .await
        .flush(proto::FlushRequest {})
        .await
        .unwrap();
    assert_eq!(ledger(&db, "acme").await, before);
    let (status, stderr) = server.terminate();
    assert!(status.success(), "{stderr}");
}

/// Runs `serve` expecting it to stop by itself: its exit code and stderr.
fn serve_until_exit(store: &str, data: &std::path::Path) -> (Option<i32>, String) {
    let out = Command::new(common::BIN)
        .arg("serve")
        .args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
        .args(["--store", store])
        .env("XDG_DATA_HOME", data)
        .env_remove("PACKMETER_CONFIG")
        .stdin(Stdio::null())
        .output()
        .expect("run packmeter");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test]
async fn serve_refuses_a_schema_newer_than_it_knows_with_exit_64() {
    let Some(db) = TestDb::create().await else {
        return;
    };
    let data = tempfile::tempdir().unwrap();
    let (status, stderr) = Server::start_store(&db.url, data.path(), &[]).terminate();
    assert!(status.success(), "{stderr}");
    db.execute("UPDATE packmeter_schema SET version = version + 1")
        .await;
    let (code, stderr) = serve_until_exit(&db.url, data.path());
    assert_eq!(code, Some(64), "{stderr}");
    assert!(
        stderr.contains("newer packmeter") && stderr.contains("schema version"),
        "{stderr}"
    );
}

#[tokio::test]
async fn serve_says_why_it_cannot_reach_postgres_and_never_shows_the_password() {
    let data = tempfile::tempdir().unwrap();
    // Nothing listens on port 1.
    let (code, stderr) = serve_until_exit(
        "postgres://pm:hunter2@127.0.0.1:1/pm?connect_timeout=1",
        data.path(),
    );
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("cannot open the store"), "{stderr}");
    assert!(stderr.contains("127.0.0.1:1"), "{stderr}");
    assert!(!stderr.contains("hunter2"), "{stderr}");

    // A server that ignores the password (trust): it is not logged either.
    let Some(db) = TestDb::create().await else {
        return;
    };
    let with_password = db.url.replacen("://postgres@", "://postgres:hunter2@", 1);
    if with_password == db.url {
        eprintln!("SKIPPED: PACKMETER_TEST_POSTGRES_URL is not postgres://postgres@…");
        return;
    }
    let (status, stderr) = Server::start_store(&with_password, data.path(), &[]).terminate();
    assert!(status.success(), "{stderr}");
    assert!(stderr.contains("postgres:***@"), "{stderr}");
    assert!(!stderr.contains("hunter2"), "{stderr}");
}

#[tokio::test]
async fn serve_keeps_serving_through_lost_connections_and_flushes_exactly() {
    let Some(db) = TestDb::create().await else {
        return;
    };
    let data = tempfile::tempdir().unwrap();
    let mut args = REPLAY.to_vec();
    args.extend(["--flush-interval", "1h"]);
    let server = Server::start_store(&db.url, data.path(), &args);
    let mut meter = server.meter().await;
    let at = Some("2020-03-01T10:15:00Z");
    let mut acknowledged = 0;
    for round in 0..3 {
        for _ in 0..5 {
            let r = meter.deduct(deduct("acme", 2, 0, at)).await.unwrap();
            let (c, o, _) = split(&r.into_inner().calls);
            acknowledged += c + o;
        }
        // Every server process of packmeter's is terminated, as a failover
        // would; deductions go on from memory.
        let killed: i64 = db
            .client()
            .await
            .query_one(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
                 WHERE datname = $1 AND pid <> pg_backend_pid()",
                &[&db.name],
            )
            .await
            .unwrap()
            .get(0);
        assert!(round > 0 || killed >= 1, "packmeter held no connection");
        let r = meter.deduct(deduct("acme", 1, 0, at)).await.unwrap();
        let (c, o, _) = split(&r.into_inner().calls);
        acknowledged += c + o;
        // A flush on a dead connection fails as UNAVAILABLE (usage kept)
        // or goes through on a fresh one; a retry always gets there.
        let mut admin = server.admin().await;
        let mut flushed = false;
        for _ in 0..10 {
            match admin.flush(proto::FlushRequest {}).await {
                Ok(_) => {
                    flushed = true;
                    break;
                }
                Err(s) => assert_eq!(s.code(), tonic::Code::Unavailable, "{s:?}"),
            }
        }
        assert!(flushed, "no flush went through");
        let total: i64 = ledger(&db, "acme").await.iter().map(|(_, n)| n).sum();
        assert_eq!(total as u64, acknowledged, "round {round}");
    }
    let (status, stderr) = server.terminate();
    assert!(status.success(), "{stderr}");
}
