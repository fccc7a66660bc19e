//! What `packmeter serve` does with its store at start-up, through the real
//! binary: one process per store, a store it cannot write, the default data
//! directory, and the settled mark kept across restarts (R12).

mod common;

use std::{
    io::{BufRead, BufReader},
    os::unix::fs::{MetadataExt, PermissionsExt},
    path::Path,
    process::{Command, Stdio},
};

use chrono::{DurationRound, TimeDelta, Utc};
use common::{deduct, get, Server, BIN};
use packmeter::grpc::proto;
use tokio_stream::StreamExt;

/// How a `packmeter serve` that was expected to refuse to start ended.
struct Refused {
    code: Option<i32>,
    stderr: String,
}

/// Runs `cmd` (a `packmeter serve`) and returns how it exited. If it starts
/// serving instead (it prints its listening line), it is killed and the
/// test fails: a server that should not have started must not hang it.
fn refused_start(cmd: &mut Command) -> Refused {
    let mut child = cmd
        .env_remove("PACKMETER_CONFIG")
        .env_remove("RUST_BACKTRACE")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn packmeter");
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("piped stdout"))
        .read_line(&mut line)
        .expect("read stdout");
    if !line.is_empty() {
        let _ = child.kill();
        let out = child.wait_with_output().expect("wait");
        panic!(
            "the server started ({line:?}); stderr:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let out = child.wait_with_output().expect("wait for packmeter");
    Refused {
        code: out.status.code(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn serve_on(db: &Path) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.arg("serve")
        .args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
        .arg("--store")
        .arg(format!("sqlite://{}", db.display()));
    cmd
}

/// Issue 15 item 3: two servers on one SQLite file would each count the
/// free tier from the same stored usage. The second refuses to start, with
/// exit code 69 and a message naming the store and the first's pid; the
/// first keeps serving.
#[tokio::test]
async fn a_second_server_on_the_same_store_refuses_to_start_and_the_first_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("pm.db");
    let first = Server::start_on(&db, &[]);
    let mut meter = first.meter().await;
    meter.deduct(deduct("acme", 3, 0, None)).await.unwrap();

    let second = refused_start(&mut serve_on(&db));
    assert_eq!(second.code, Some(69), "{}", second.stderr);
    assert!(
        second.stderr.contains(&format!(
            "sqlite://{} is in use by another packmeter process (pid {})",
            db.display(),
            first.pid()
        )),
        "{}",
        second.stderr
    );
    assert_eq!(second.stderr.lines().count(), 1, "{}", second.stderr);

    // The first is untouched: it answers, it is ready, it flushes.
    let o = meter
        .deduct(deduct("acme", 4, 0, None))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(common::split(&o.calls).0, 4);
    assert_eq!(get(&first.admin, "/readyz").await.status, 200);
    first
        .admin()
        .await
        .flush(proto::FlushRequest {})
        .await
        .unwrap();
    let (status, stderr) = first.terminate();
    assert!(status.success(), "{stderr}");

    // Once it has exited, the store is free again.
    let again = Server::start_on(&db, &[]);
    let packs = again.packs("acme").await;
    assert_eq!(common::used(&packs, proto::Item::Calls), 7);
}

/// Issue 15 item 11: a store this process cannot write is refused at
/// start (exit 64, naming store) instead of serving with every flush
/// failing behind a 200 `/readyz`.
///
/// Root writes a file whatever its mode, so `chmod` alone cannot make a
/// store read-only for root. When the test runs as root, the server runs
/// as `nobody` (uid/gid 65534) against a root-owned 0644 file, in a
/// directory `nobody` may write (so the lock file beside it is not what
/// stops it); otherwise the file is made 0444 for the current user.
#[test]
fn a_store_this_process_cannot_write_is_refused_naming_store() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("pm.db");
    let (status, stderr) = Server::start_on(&db, &[]).terminate();
    assert!(status.success(), "{stderr}");
    let as_root = std::fs::metadata(&db).unwrap().uid() == 0;
    let mut cmd = serve_on(&db);
    if as_root {
        use std::os::unix::process::CommandExt;
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
        std::fs::set_permissions(&db, std::fs::Permissions::from_mode(0o644)).unwrap();
        cmd.uid(65534).gid(65534);
    } else {
        std::fs::set_permissions(&db, std::fs::Permissions::from_mode(0o444)).unwrap();
    }
    let refused = refused_start(&mut cmd);
    assert_eq!(
        refused.code,
        Some(64),
        "as root: {as_root}; {}",
        refused.stderr
    );
    assert!(
        refused.stderr.contains(&format!(
            "invalid configuration: store: sqlite://{} cannot be written by this process",
            db.display()
        )),
        "{}",
        refused.stderr
    );
    assert!(refused.stderr.contains("read-only"), "{}", refused.stderr);
}

/// Issue 15 item 11, the other half: without --store, the default data
/// directory is still created.
#[test]
fn the_default_data_directory_is_still_created() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("fresh/data");
    let mut child = Command::new(BIN)
        .arg("serve")
        .args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
        .env_remove("PACKMETER_STORE")
        .env_remove("PACKMETER_CONFIG")
        .env("XDG_DATA_HOME", &data)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let _ = child.kill();
    let _ = child.wait();
    assert!(line.starts_with("packmeter listening"), "{line:?}");
    assert!(data.join("packmeter/packmeter.db").is_file());
}

/// Every exported row of `account` in `[from, to)`: (hour, amount) pairs.
async fn export(server: &Server, account: &str, from: &str, to: &str) -> Vec<(i64, u64)> {
    let mut rows = server
        .admin()
        .await
        .export_usage(proto::ExportUsageRequest {
            from: Some(common::ts(from)),
            to: Some(common::ts(to)),
            account_id: account.into(),
        })
        .await
        .expect("ExportUsage")
        .into_inner();
    let mut got = Vec::new();
    while let Some(r) = rows.next().await {
        let r = r.expect("export row");
        got.push((r.hour.unwrap_or_default().seconds, r.amount));
    }
    got
}

/// Issue 15 item 4 (R12): an hour exported under a short `--late-grace`
/// stays settled after a restart with a longer one. The deduction into it
/// is refused as too late, and a second export gives the same rows.
#[tokio::test]
async fn an_exported_hour_stays_settled_after_a_restart_with_a_longer_late_grace() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("pm.db");
    // The hour two hours before the current one: open under a 3h grace,
    // closed under a 1m grace.
    let hour = Utc::now().duration_trunc(TimeDelta::hours(1)).unwrap() - TimeDelta::hours(2);
    let at = (hour + TimeDelta::minutes(10)).to_rfc3339();
    let (from, to) = (hour.to_rfc3339(), (hour + TimeDelta::hours(1)).to_rfc3339());
    let long = ["--late-grace", "3h", "--dedup-window", "3h"];

    let a = Server::start_on(&db, &long);
    a.meter()
        .await
        .deduct(deduct("acme", 7, 0, Some(&at)))
        .await
        .expect("the hour is open under a 3h grace");
    let (status, stderr) = a.terminate();
    assert!(status.success(), "{stderr}");

    let b = Server::start_on(&db, &["--late-grace", "1m"]);
    let first = export(&b, "acme", &from, &to).await;
    assert_eq!(first.iter().map(|r| r.1).sum::<u64>(), 7, "{first:?}");
    let (status, stderr) = b.terminate();
    assert!(status.success(), "{stderr}");

    let c = Server::start_on(&db, &long);
    let e = c
        .meter()
        .await
        .deduct(deduct("acme", 5, 0, Some(&at)))
        .await
        .expect_err("the exported hour must stay closed");
    assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("settled"), "{e:?}");
    c.admin().await.flush(proto::FlushRequest {}).await.unwrap();
    assert_eq!(export(&c, "acme", &from, &to).await, first);
}
