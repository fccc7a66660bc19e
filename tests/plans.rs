//! Versioned plans (R8, issue 11) through the real interface: `packmeter
//! serve --plans FILE` spawned, driven over gRPC and the CLI, and bad plans
//! files refused with exit 64 naming the plan and the field.
//!
//! The server runs with a 10-year late grace so that 2019–2021 events are
//! still accepted (R9), as in tests/seed_example.rs.

mod common;

use std::{
    path::Path,
    process::{Command, Output},
};

use common::{deduct, split, ts, Server, BIN};
use packmeter::grpc::proto::{self, Item, PackSource};

const REPLAY: &[&str] = &["--late-grace", "3650d", "--dedup-window", "3650d"];

/// The plans file: the launch plan, then the seed's change.
const SEED_PLANS: &str = include_str!("../docs/plans.example.toml");

fn write_plans(dir: &Path, text: &str) -> String {
    let path = dir.join("plans.toml");
    std::fs::write(&path, text).unwrap();
    path.display().to_string()
}

fn start(dir: &Path, plans: &str) -> Server {
    let file = write_plans(dir, plans);
    let mut args = REPLAY.to_vec();
    args.extend(["--plans", &file]);
    Server::start(dir, &args)
}

fn of_item(packs: &[proto::Pack], item: Item) -> Vec<&proto::Pack> {
    packs.iter().filter(|p| p.item == item as i32).collect()
}

/// The free-tier pack of `item` valid at `at`, if any.
fn pack_at<'a>(packs: &'a [proto::Pack], item: Item, at: &str) -> Option<&'a proto::Pack> {
    let t = ts(at);
    let key = |x: &prost_types::Timestamp| (x.seconds, x.nanos);
    packs.iter().find(|p| {
        p.item == item as i32
            && p.source == PackSource::FreeTier as i32
            && key(p.valid_from.as_ref().unwrap()) <= key(&t)
            && key(&t) < key(p.valid_until.as_ref().unwrap())
    })
}

/// The seed's change: an account activated 2019-11-10 17:13:14 +08:00 under
/// the launch plan, with usage in September and early October 2020.
#[tokio::test]
async fn the_seed_change_end_to_end() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), SEED_PLANS);
    let mut meter = server.meter().await;

    // Activation under the launch plan: 500,000 calls a month.
    let r = meter
        .deduct(deduct("acme", 1, 1, Some("2019-11-10T17:13:14+08:00")))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(split(&r.calls), (1, 0, 499_999));

    // September 2020: the launch plan's 6 months ended on 10 May 2020, and
    // the change applies only from October, so it is overage.
    let r = meter
        .deduct(deduct(
            "acme",
            300_000,
            0,
            Some("2020-09-15T12:00:00+08:00"),
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(split(&r.calls), (0, 300_000, 0));

    // Early October, before the change's instant: the month holding the
    // instant gets the new plan's complete pack from its first second.
    let r = meter
        .deduct(deduct(
            "acme",
            200_000,
            0,
            Some("2020-10-01T00:00:00+08:00"),
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(split(&r.calls), (200_000, 0, 800_000));
    let r = meter
        .deduct(deduct("acme", 50_000, 0, Some("2020-10-12T23:59:58+08:00")))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(split(&r.calls), (50_000, 0, 750_000));

    let packs = server.packs("acme").await;
    let calls = of_item(&packs, Item::Calls);
    // Launch: Nov 2019 .. Apr 2020, and 1–10 May 2020; then October and
    // 1–10 November 2020 under 2020-10.
    assert_eq!(calls.len(), 9, "{calls:#?}");
    for p in &calls[..7] {
        assert_eq!(p.plan, "launch");
        assert_eq!(p.capacity, 500_000);
    }
    assert_eq!(calls[0].valid_from, Some(ts("2019-11-10T17:13:14+08:00")));
    assert_eq!(calls[0].used, 1);
    assert_eq!(calls[6].valid_until, Some(ts("2020-05-11T00:00:00+08:00")));
    let egress = of_item(&packs, Item::EgressBytes);
    assert_eq!(egress[0].capacity, 512 << 20);
    assert_eq!(egress[0].plan, "launch");

    // September: no pack, as before the change.
    assert!(pack_at(&packs, Item::Calls, "2020-09-15T12:00:00+08:00").is_none());

    // October: a complete 1,000,000 calls, not pro-rated, holding the usage
    // recorded since 1 October.
    let october = pack_at(&packs, Item::Calls, "2020-10-01T00:00:00+08:00").unwrap();
    assert_eq!(october.plan, "2020-10");
    assert_eq!(october.pack_id, "free-2020-10-calls@2020-10");
    assert_eq!(october.capacity, 1_000_000);
    assert_eq!(october.valid_from, Some(ts("2020-10-01T00:00:00+08:00")));
    assert_eq!(october.valid_until, Some(ts("2020-11-01T00:00:00+08:00")));
    assert_eq!(october.used, 250_000);
    let october_egress = pack_at(&packs, Item::EgressBytes, "2020-10-20T00:00:00+08:00").unwrap();
    assert_eq!(october_egress.capacity, 1 << 30);

    // November 2020 runs to the 10th (the 12 months count from the
    // original activation).
    let november = pack_at(&packs, Item::Calls, "2020-11-10T23:59:59+08:00").unwrap();
    assert_eq!(november.plan, "2020-10");
    assert_eq!(november.valid_until, Some(ts("2020-11-11T00:00:00+08:00")));
    assert!(pack_at(&packs, Item::Calls, "2020-11-11T00:00:00+08:00").is_none());
    let r = meter
        .deduct(deduct("acme", 1, 0, Some("2020-11-11T00:00:00+08:00")))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(split(&r.calls), (0, 1, 0));

    // The same after a restart: the plans and the stored usage agree.
    let db = server.db.clone();
    let (status, _) = server.terminate();
    assert!(status.success());
    let file = write_plans(dir.path(), SEED_PLANS);
    let mut args = REPLAY.to_vec();
    args.extend(["--plans", &file]);
    let server = Server::start_on(&db, &args);
    let packs = server.packs("acme").await;
    let october = pack_at(&packs, Item::Calls, "2020-10-01T00:00:00+08:00").unwrap();
    assert_eq!((october.plan.as_str(), october.used), ("2020-10", 250_000));
}

#[tokio::test]
async fn an_account_activated_after_the_change_gets_only_the_new_plan() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), SEED_PLANS);
    let mut meter = server.meter().await;
    let r = meter
        .deduct(deduct("late", 10, 0, Some("2021-03-05T08:00:00+08:00")))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(split(&r.calls), (10, 0, 999_990));
    let packs = server.packs("late").await;
    let calls = of_item(&packs, Item::Calls);
    assert_eq!(calls.len(), 13);
    assert!(packs.iter().all(|p| p.plan == "2020-10"), "{packs:#?}");
    assert!(calls.iter().all(|p| p.capacity == 1_000_000));
    assert_eq!(calls[12].valid_until, Some(ts("2022-03-06T00:00:00+08:00")));
}

/// An account activated in the month of the change, before its instant,
/// is under the new plan from its activation: the change's cut (1 October)
/// is before it.
#[tokio::test]
async fn an_account_activated_in_the_month_of_the_change_is_under_the_new_plan() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), SEED_PLANS);
    let mut meter = server.meter().await;
    meter
        .deduct(deduct("oct", 1, 0, Some("2020-10-05T10:00:00+08:00")))
        .await
        .unwrap();
    let packs = server.packs("oct").await;
    assert!(packs.iter().all(|p| p.plan == "2020-10"), "{packs:#?}");
    assert_eq!(of_item(&packs, Item::Calls)[0].capacity, 1_000_000);
}

/// Without a plans file, one plan named `default` issues every free-tier
/// pack, with the ids packmeter has always used; purchased packs name none.
#[tokio::test]
async fn without_a_plans_file_every_free_pack_names_the_default_plan() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), REPLAY);
    let mut meter = server.meter().await;
    meter
        .deduct(deduct("acme", 1, 1, Some("2019-11-10T17:13:14+08:00")))
        .await
        .unwrap();
    server
        .admin()
        .await
        .grant_pack(proto::GrantPackRequest {
            account_id: "acme".into(),
            pack_id: "bought".into(),
            item: Item::Calls as i32,
            capacity: 5,
            valid_until: Some(ts("2040-01-01T00:00:00Z")),
            ..Default::default()
        })
        .await
        .unwrap();
    let packs = server.packs("acme").await;
    assert_eq!(packs.len(), 27);
    for p in &packs {
        if p.source == PackSource::FreeTier as i32 {
            assert_eq!(p.plan, "default");
            assert!(!p.pack_id.contains('@'), "{}", p.pack_id);
        } else {
            assert_eq!(p.plan, "", "{p:?}");
        }
    }
}

/// `packmeter packs` names the plan in its table and in --json.
#[tokio::test]
async fn the_cli_names_the_plan_of_each_free_pack() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), SEED_PLANS);
    let mut meter = server.meter().await;
    meter
        .deduct(deduct("acme", 1, 1, Some("2019-11-10T17:13:14+08:00")))
        .await
        .unwrap();
    let cli = |args: &[&str]| -> Output {
        Command::new(BIN)
            .args(args)
            .env("PACKMETER_SERVER", server.url())
            .output()
            .expect("run packmeter")
    };
    let out = cli(&["packs", "acme", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let plans: Vec<&str> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["plan"].as_str().unwrap())
        .collect();
    assert_eq!(plans.iter().filter(|p| **p == "launch").count(), 14);
    assert_eq!(plans.iter().filter(|p| **p == "2020-10").count(), 4);
    let out = cli(&["packs", "acme"]);
    assert!(out.status.success());
    let table = String::from_utf8(out.stdout).unwrap();
    assert!(table.contains("PLAN"), "{table}");
    assert!(
        table
            .lines()
            .any(|l| l.contains("free-2020-10-calls@2020-10") && l.contains("2020-10 ")),
        "{table}"
    );
}

// === SIGHUP ===

fn hangup(server: &Server) {
    let status = Command::new("kill")
        .args(["-HUP", &server.pid().to_string()])
        .status()
        .expect("run kill");
    assert!(status.success());
}

async fn reloads(server: &Server, result: &str, n: f64) {
    let series = format!("packmeter_plans_reloads_total{{result=\"{result}\"}}");
    common::until(std::time::Duration::from_secs(20), async || {
        server.metric(&series).await >= n
    })
    .await;
    assert_eq!(server.metric(&series).await, n, "{series}");
}

/// A plan added to the file is picked up on SIGHUP and recorded; a reload
/// that would change a plan in force, or drop a recorded one, is refused
/// and changes nothing. Driven by the real clock: the added plan takes
/// effect in the month after next.
#[tokio::test]
async fn a_plan_added_on_sighup_applies_from_its_month_and_one_in_force_cannot_change() {
    use chrono::{Datelike, FixedOffset, Months, NaiveDate, TimeZone, Utc};
    let dir = tempfile::tempdir().unwrap();
    let launch = "[[plan]]\nname = \"launch\"\neffective = \"2019-01-01T00:00:00+08:00\"\nmonths = 24\ncalls = 1000\negress_bytes = 1000\n\n";
    let server = start(dir.path(), launch);
    let mut meter = server.meter().await;
    let r = meter
        .deduct(deduct("now", 1, 0, None))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(split(&r.calls), (1, 0, 999));

    let zone = FixedOffset::east_opt(8 * 3600).unwrap();
    let today = Utc::now().with_timezone(&zone).date_naive();
    let first = |d: NaiveDate, n: u32| {
        NaiveDate::from_ymd_opt(d.year(), d.month(), 1).unwrap() + Months::new(n)
    };
    let rfc = |d: NaiveDate, h: u32| {
        zone.from_local_datetime(&d.and_hms_opt(h, 0, 0).unwrap())
            .unwrap()
            .to_rfc3339()
    };
    let cut = rfc(first(today, 2), 0);
    let next = format!(
        "[[plan]]\nname = \"next\"\neffective = \"{}\"\nmonths = 24\ncalls = 2000\negress_bytes = 2000\n",
        rfc(first(today, 2) + chrono::Days::new(1), 12)
    );
    write_plans(dir.path(), &format!("{launch}{next}"));
    hangup(&server);
    reloads(&server, "ok", 1.0).await;
    let packs = server.packs("now").await;
    // Recorded, but not in force until its instant passes (then its months
    // are recalculated, crate::recalc): the months ahead are still launch's.
    let at_cut = pack_at(&packs, Item::Calls, &cut).expect("a pack from the cut");
    assert_eq!((at_cut.plan.as_str(), at_cut.capacity), ("launch", 1000));
    assert_eq!(at_cut.valid_from, Some(ts(&cut)));
    let now = Utc::now().to_rfc3339();
    let current = pack_at(&packs, Item::Calls, &now).unwrap();
    assert_eq!(
        (current.plan.as_str(), current.capacity, current.used),
        ("launch", 1000, 1)
    );

    // Changing the plan in force is refused: the plans stay.
    write_plans(
        dir.path(),
        &format!("{}{next}", launch.replace("calls = 1000", "calls = 5")),
    );
    hangup(&server);
    reloads(&server, "error", 1.0).await;
    // So is a file without the recorded plan "next".
    let late = format!(
        "[[plan]]\nname = \"late\"\neffective = \"{}\"\nmonths = 24\ncalls = 3\negress_bytes = 3\n",
        rfc(first(today, 0), 0)
    );
    write_plans(dir.path(), &format!("{launch}{late}"));
    hangup(&server);
    reloads(&server, "error", 2.0).await;
    // And a file that does not parse.
    write_plans(dir.path(), "[[plan]\n");
    hangup(&server);
    reloads(&server, "error", 3.0).await;

    assert_eq!(server.packs("now").await, packs);
    let r = meter
        .deduct(deduct("now", 1, 0, None))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(split(&r.calls), (1, 0, 998));
    assert_eq!(
        server
            .metric("packmeter_plans_reloads_total{result=\"ok\"}")
            .await,
        1.0
    );
}

// === bad plans files ===

/// Runs `packmeter serve` with `args`; `--rls-item-key account` is always
/// invalid and checked after the plans, so a plans file wrongly accepted
/// exits 64 naming rls_item_key instead of starting a server.
fn serve(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut c = Command::new(BIN);
    c.arg("serve")
        .args(["--store", &format!("sqlite://{}/pm.db", dir.display())])
        .args(args)
        .args(["--rls-item-key", "account"])
        .env_remove("RUST_BACKTRACE")
        .env_remove("PACKMETER_CONFIG")
        .env_remove("PACKMETER_PLANS");
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().expect("run packmeter")
}

fn assert_refused(dir: &Path, args: &[&str], env: &[(&str, &str)], want: &str) {
    let out = serve(dir, args, env);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{args:?}: {stderr}");
    assert!(stderr.contains(want), "{args:?}: want {want:?} in {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(
        !dir.join("pm.db").exists(),
        "a refused config creates no store"
    );
}

fn plan(name: &str, effective: &str) -> String {
    format!(
        "[[plan]]\nname = \"{name}\"\neffective = \"{effective}\"\nmonths = 12\ncalls = 1000000\negress_bytes = \"1GiB\"\n\n"
    )
}

#[test]
fn bad_plans_files_exit_64_naming_the_plan_and_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let a = plan("launch", "2019-01-01T00:00:00+08:00");
    let cases = [
        // Unordered effective instants.
        (
            format!("{a}{}", plan("2018", "2018-01-01T00:00:00+08:00")),
            "plan \"2018\" (#2): effective: ",
        ),
        // Overlapping: the same instant twice.
        (
            format!("{a}{}", plan("again", "2019-01-01T00:00:00+08:00")),
            "plan \"again\" (#2): effective: ",
        ),
        (
            a.replace("months = 12", "months = 0"),
            "plan \"launch\" (#1): months: ",
        ),
        (
            a.replace("months = 12", "months = 12\nmonth = 12"),
            "plan \"launch\" (#1): plan: unknown key `month`",
        ),
        (
            a.replace("\"1GiB\"", "\"1 gigglebyte\""),
            "plan \"launch\" (#1): egress_bytes: ",
        ),
        (
            a.replace("+08:00\"", "\"")
                .replace("2019-01-01T00:00:00\"", "yesterday\""),
            "plan \"launch\" (#1): effective: ",
        ),
        (
            format!("{a}zone = \"Mars/Base\"\n"),
            "plan \"launch\" (#1): zone: ",
        ),
        (String::new(), "no [[plan]] table"),
    ];
    for (text, want) in cases {
        let file = write_plans(dir.path(), &text);
        assert_refused(
            dir.path(),
            &["--plans", &file],
            &[],
            &format!("invalid configuration: plans: {file}: {want}"),
        );
    }
    // A missing file, through the environment.
    let missing = dir.path().join("nope.toml").display().to_string();
    assert_refused(
        dir.path(),
        &[],
        &[("PACKMETER_PLANS", &missing)],
        &format!("invalid configuration: plans: {missing}: cannot read"),
    );
    // Through the config file's `plans` key.
    let file = write_plans(dir.path(), &a.replace("months = 12", "months = 0"));
    let config = dir.path().join("packmeter.toml");
    std::fs::write(&config, format!("plans = {file:?}\n")).unwrap();
    assert_refused(
        dir.path(),
        &["--config", config.to_str().unwrap()],
        &[],
        "invalid configuration: plans: ",
    );
    // The plans file sets the free tier: --free-calls beside it is refused.
    let file = write_plans(dir.path(), &a);
    assert_refused(
        dir.path(),
        &["--plans", &file, "--free-calls", "5"],
        &[],
        "invalid configuration: free_calls: cannot be combined with plans",
    );
    // A good file gets past the plans (and stops at the deliberate error).
    assert_refused(
        dir.path(),
        &["--plans", &file],
        &[],
        "invalid configuration: rls_item_key: ",
    );
}

// === plans in force, recorded in the store (issue 11 follow-up) ===

/// `packmeter serve` on `store` with the plans file `file`, expected to be
/// refused before it serves: returns its exit code and stderr. A server
/// that starts instead is killed after 30 s and the test fails.
fn refused_at_start(store: &str, data: &Path, file: &str) -> (Option<i32>, String) {
    refused_at_start_with(store, data, file, REPLAY)
}

/// As [`refused_at_start`], with `args` instead of the long grace.
fn refused_at_start_with(
    store: &str,
    data: &Path,
    file: &str,
    args: &[&str],
) -> (Option<i32>, String) {
    use std::{io::Read, process::Stdio, time::Duration};
    let mut child = Command::new(BIN)
        .arg("serve")
        .args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
        .args(["--store", store])
        .args(args)
        .args(["--plans", file])
        .env("XDG_DATA_HOME", data)
        .env_remove("PACKMETER_CONFIG")
        .env_remove("PACKMETER_PLANS")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn packmeter");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("packmeter serve --plans {file} was not refused: it is still running");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    assert!(!stderr.contains("panicked"), "{stderr}");
    (status.code(), stderr)
}

fn start_store(store: &str, data: &Path, file: &str) -> Server {
    let mut args = REPLAY.to_vec();
    args.extend(["--plans", file]);
    Server::start_store(store, data, &args)
}

/// The first instant of the UTC month `n` months from now, in RFC 3339.
fn month_from_now(n: u32) -> chrono::DateTime<chrono::Utc> {
    use chrono::{Datelike, Months, NaiveDate, Utc};
    let today = Utc::now().date_naive();
    let first = NaiveDate::from_ymd_opt(today.year(), today.month(), 1).unwrap() + Months::new(n);
    first.and_hms_opt(0, 0, 0).unwrap().and_utc()
}

fn utc_plan(name: &str, effective: chrono::DateTime<chrono::Utc>, calls: u64) -> String {
    format!(
        "[[plan]]\nname = \"{name}\"\neffective = \"{}\"\nmonths = 24\ncalls = {calls}\negress_bytes = {calls}\nzone = \"+00:00\"\n\n",
        effective.to_rfc3339()
    )
}

const UTC_LAUNCH: &str = "[[plan]]\nname = \"launch\"\neffective = \"2019-01-01T00:00:00+00:00\"\nmonths = 1200\ncalls = 1000\negress_bytes = 1000\nzone = \"+00:00\"\n\n";

/// A fresh store takes the seed's file with its past plans as it is; a
/// restart with the same file serves the same packs; a restart with a
/// recorded plan changed, or removed, is refused with exit 64 naming the
/// plan and the field, and changes nothing.
#[tokio::test]
async fn a_restart_keeps_the_recorded_plans_and_refuses_a_changed_one() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("packmeter.db");
    let store = format!("sqlite://{}", db.display());
    let file = write_plans(dir.path(), SEED_PLANS);
    let server = start_store(&store, dir.path(), &file);
    let mut meter = server.meter().await;
    meter
        .deduct(deduct("acme", 1, 1, Some("2019-11-10T17:13:14+08:00")))
        .await
        .unwrap();
    meter
        .deduct(deduct("acme", 7, 1, Some("2020-10-02T00:00:00+08:00")))
        .await
        .unwrap();
    let packs = server.packs("acme").await;
    let (status, _) = server.terminate();
    assert!(status.success());

    // The same file again: it starts, and the packs are the same.
    let server = start_store(&store, dir.path(), &file);
    assert_eq!(server.packs("acme").await, packs);
    let (status, _) = server.terminate();
    assert!(status.success());

    // A plan in force changed.
    write_plans(
        dir.path(),
        &SEED_PLANS.replace("calls = 1000000", "calls = 5"),
    );
    let (code, stderr) = refused_at_start(&store, dir.path(), &file);
    assert_eq!(code, Some(64), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "invalid configuration: plans: {file}: plan \"2020-10\" (#2): calls changed from 1000000 to 5; a plan in force cannot change"
        )),
        "{stderr}"
    );
    // One moved to another instant.
    write_plans(
        dir.path(),
        &SEED_PLANS.replace("2020-10-12T23:59:59+08:00", "2020-11-12T23:59:59+08:00"),
    );
    let (code, stderr) = refused_at_start(&store, dir.path(), &file);
    assert_eq!(code, Some(64), "{stderr}");
    assert!(
        stderr.contains("plan \"2020-10\" (#2): effective changed from 2020-10-12T15:59:59+00:00 to 2020-11-12T15:59:59+00:00"),
        "{stderr}"
    );
    // One removed.
    let launch_only = SEED_PLANS
        .split("\n[[plan]]\nname = \"2020-10\"")
        .next()
        .unwrap();
    write_plans(dir.path(), launch_only);
    let (code, stderr) = refused_at_start(&store, dir.path(), &file);
    assert_eq!(code, Some(64), "{stderr}");
    assert!(
        stderr.contains("plan \"2020-10\" (#2) is recorded in the store as in force but is not in the plans file"),
        "{stderr}"
    );

    // Nothing changed: the original file still serves the same packs.
    write_plans(dir.path(), SEED_PLANS);
    let server = start_store(&store, dir.path(), &file);
    assert_eq!(server.packs("acme").await, packs);
}

/// A plan's re-deduction is written in the hour holding its instant (R8),
/// and a closed hour never changes (R12): a plan first seen after that hour
/// closed is refused at start (exit 64, saying why and how to fix it) and
/// on SIGHUP. One whose instant is ahead is recorded, and a restart keeps
/// it.
#[tokio::test]
async fn a_plan_whose_hour_has_closed_is_refused_at_start_and_on_sighup() {
    let grace = ["--late-grace", "1h"];
    let dir = tempfile::tempdir().unwrap();
    let store = format!("sqlite://{}", dir.path().join("packmeter.db").display());
    let file = write_plans(dir.path(), UTC_LAUNCH);
    let start = |file: &str| {
        let mut args = grace.to_vec();
        args.extend(["--plans", file]);
        Server::start_store(&store, dir.path(), &args)
    };
    let server = start(&file);
    let mut meter = server.meter().await;
    let r = meter
        .deduct(deduct("now", 1, 0, None))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(split(&r.calls), (1, 0, 999));
    let packs = server.packs("now").await;
    let (status, _) = server.terminate();
    assert!(status.success());

    // Three hours ago: with a 1 h grace, its hour has closed.
    let secs = chrono::Utc::now().timestamp();
    let at = |s: i64| chrono::DateTime::from_timestamp(s, 0).unwrap();
    let past = at(secs - 3 * 3600);
    let late = utc_plan("late", past, 5000);
    write_plans(dir.path(), &format!("{UTC_LAUNCH}{late}"));
    let (code, stderr) = refused_at_start_with(&store, dir.path(), &file, &grace);
    assert_eq!(code, Some(64), "{stderr}");
    for want in [
        format!(
            "invalid configuration: plans: {file}: plan \"late\" (#2) is not recorded in the store as in force, and the hour holding its instant ({}) has closed",
            past.to_rfc3339()
        ),
        "a closed hour never changes (R12); give it an effective instant in an hour that has not closed".to_string(),
    ] {
        assert!(stderr.contains(&want), "want {want:?} in {stderr}");
    }

    // On SIGHUP: refused, the plans in force kept.
    write_plans(dir.path(), UTC_LAUNCH);
    let server = start(&file);
    write_plans(dir.path(), &format!("{UTC_LAUNCH}{late}"));
    hangup(&server);
    reloads(&server, "error", 1.0).await;
    assert_eq!(server.packs("now").await, packs);

    // The same plan two days ahead is recorded, and a restart keeps it...
    let ahead = utc_plan("late", at(secs + 2 * 86_400), 5000);
    write_plans(dir.path(), &format!("{UTC_LAUNCH}{ahead}"));
    hangup(&server);
    reloads(&server, "ok", 1.0).await;
    let (status, _) = server.terminate();
    assert!(status.success());
    let server = start(&file);
    let (status, _) = server.terminate();
    assert!(status.success());
    // ...and, recorded now, it cannot be dropped or changed.
    write_plans(dir.path(), UTC_LAUNCH);
    let (code, stderr) = refused_at_start_with(&store, dir.path(), &file, &grace);
    assert_eq!(code, Some(64), "{stderr}");
    assert!(
        stderr.contains(
            "plan \"late\" (#2) is recorded in the store as in force but is not in the plans file"
        ),
        "{stderr}"
    );
}

/// A store run without a plans file was under the default plan: a plans
/// file added later must begin with it (months, calls, egress_bytes and
/// zone), or it is refused.
#[tokio::test]
async fn a_plans_file_added_to_a_store_with_usage_must_begin_with_the_default_plan() {
    let dir = tempfile::tempdir().unwrap();
    let store = format!("sqlite://{}", dir.path().join("packmeter.db").display());
    let server = Server::start_store(&store, dir.path(), REPLAY);
    let mut meter = server.meter().await;
    meter.deduct(deduct("now", 1, 0, None)).await.unwrap();
    let packs = server.packs("now").await;
    let (status, _) = server.terminate();
    assert!(status.success());

    let file = write_plans(
        dir.path(),
        &plan("smaller", "2019-01-01T00:00:00+08:00").replace("calls = 1000000", "calls = 500000"),
    );
    let (code, stderr) = refused_at_start(&store, dir.path(), &file);
    assert_eq!(code, Some(64), "{stderr}");
    assert!(
        stderr.contains("plan \"smaller\" (#1): calls is 500000, but the store holds usage recorded without a plans file, under the default plan (calls 1000000)"),
        "{stderr}"
    );

    // The default plan, named: accepted, the packs keep their ids.
    write_plans(dir.path(), &plan("original", "2019-01-01T00:00:00+08:00"));
    let server = start_store(&store, dir.path(), &file);
    let now: Vec<_> = server
        .packs("now")
        .await
        .into_iter()
        .map(|p| (p.pack_id, p.capacity, p.used))
        .collect();
    let before: Vec<_> = packs
        .into_iter()
        .map(|p| (p.pack_id, p.capacity, p.used))
        .collect();
    assert_eq!(now, before);
}

/// Many nodes on one PostgreSQL agree on the plans in force: a plan added
/// ahead of its month on one node (SIGHUP) is recorded; a second node
/// accepts the same file, and a node with a different version of that plan
/// is refused, at start (exit 64) and on SIGHUP.
#[tokio::test]
async fn nodes_on_one_postgresql_agree_on_the_plans_in_force() {
    let Some(db) = common::pg::TestDb::create().await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let (a_dir, b_dir, c_dir) = (
        dir.path().join("a"),
        dir.path().join("b"),
        dir.path().join("c"),
    );
    for d in [&a_dir, &b_dir, &c_dir] {
        std::fs::create_dir(d).unwrap();
    }
    let a_file = write_plans(&a_dir, UTC_LAUNCH);
    let b_file = write_plans(&b_dir, UTC_LAUNCH);
    let a = start_store(&db.url, &a_dir, &a_file);
    let b = start_store(&db.url, &b_dir, &b_file);
    let mut meter = a.meter().await;
    meter.deduct(deduct("now", 1, 0, None)).await.unwrap();

    let when = month_from_now(2) + chrono::Duration::hours(12);
    let next = utc_plan("next", when, 2000);
    let other = utc_plan("next", when, 3000);
    write_plans(&a_dir, &format!("{UTC_LAUNCH}{next}"));
    hangup(&a);
    reloads(&a, "ok", 1.0).await;

    // Node B's file disagrees: its reload is refused.
    write_plans(&b_dir, &format!("{UTC_LAUNCH}{other}"));
    hangup(&b);
    reloads(&b, "error", 1.0).await;
    // With A's file it is accepted.
    write_plans(&b_dir, &format!("{UTC_LAUNCH}{next}"));
    hangup(&b);
    reloads(&b, "ok", 1.0).await;

    // A third node: the other version is refused at start, A's accepted.
    let c_file = write_plans(&c_dir, &format!("{UTC_LAUNCH}{other}"));
    let (code, stderr) = refused_at_start(&db.url, &c_dir, &c_file);
    assert_eq!(code, Some(64), "{stderr}");
    assert!(
        stderr.contains(
            "plan \"next\" (#2): calls changed from 2000 to 3000; a plan in force cannot change"
        ),
        "{stderr}"
    );
    write_plans(&c_dir, &format!("{UTC_LAUNCH}{next}"));
    // A's final flush stores the account, for C to read.
    let (status, _) = a.terminate();
    assert!(status.success());
    let c = start_store(&db.url, &c_dir, &c_file);
    let packs = c.packs("now").await;
    // Recorded, not in force before its instant: the months ahead are
    // still launch's until then (crate::recalc).
    let at = pack_at(&packs, Item::Calls, &month_from_now(2).to_rfc3339()).unwrap();
    assert_eq!((at.plan.as_str(), at.capacity), ("launch", 1000));
    let rows = db
        .client()
        .await
        .query(
            "SELECT name, calls FROM plans_in_force ORDER BY position",
            &[],
        )
        .await
        .unwrap();
    let rows: Vec<(String, i64)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    assert_eq!(
        rows,
        [("launch".to_string(), 1000), ("next".to_string(), 2000)]
    );
}

/// libfaketime, from Debian's `faketime` package: preloaded, it starts the
/// server's clock at a chosen instant and lets it run on.
const FAKETIME: &str = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1";

/// Whether libfaketime is here; outside CI a missing one skips loudly.
fn faketime() -> bool {
    let found = Path::new(FAKETIME).is_file();
    if !found {
        assert!(
            !common::required(),
            "{FAKETIME} is required under CI=true: apt-get install -y faketime"
        );
        eprintln!("SKIPPED: {FAKETIME} not found (apt-get install -y faketime); set CI=true to make this a failure");
    }
    found
}

/// Starts the command's clock at `at` (UTC); it runs on from there.
fn fake_clock(at: &str) -> impl FnOnce(&mut Command) {
    let at = format!("@{at}");
    move |c| {
        c.env("LD_PRELOAD", FAKETIME)
            .env("FAKETIME", &at)
            .env("FAKETIME_DONT_FAKE_MONOTONIC", "1")
            .env("TZ", "UTC");
    }
}

/// A server on `db` whose clock starts at `at` (UTC) and runs on.
fn start_at(db: &Path, at: &str, extra: &[&str]) -> Server {
    Server::start_prepared(db, extra, fake_clock(at))
}

/// Every settled row from September to mid-October 2020.
async fn export_autumn(server: &Server) -> Vec<proto::UsageRow> {
    let mut stream = server
        .admin()
        .await
        .export_usage(proto::ExportUsageRequest {
            from: Some(ts("2020-09-01T00:00:00Z")),
            to: Some(ts("2020-10-13T00:00:00Z")),
            account_id: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let mut rows = Vec::new();
    while let Some(r) = stream.message().await.unwrap() {
        rows.push(r);
    }
    rows
}

/// The seed's change as it happened: usage recorded under the launch plan
/// in September and early October, then the plan's instant (2020-10-12
/// 23:59:59 +08:00) passes while the server runs. October's usage moves to
/// a complete 1,000,000-call pack, written as adjustment rows in the hour
/// holding the instant; September stays overage; closed hours do not change.
/// `beta`, activated in October under the launch plan, is resident when the
/// plan switches in: its launch pack and its overage move to the new pack.
#[tokio::test]
async fn the_seed_change_recalculates_usage_recorded_before_its_instant() {
    if !faketime() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let plans = write_plans(dir.path(), SEED_PLANS);
    let db = dir.path().join("packmeter.db");
    let calls = async |server: &Server, account: &str, n: u64, at: Option<&str>| {
        let r = server
            .meter()
            .await
            .deduct(deduct(account, n, 0, at))
            .await
            .unwrap()
            .into_inner();
        split(&r.calls)
    };

    // A minute before the instant, with a long grace for the past events.
    let mut args = REPLAY.to_vec();
    args.extend(["--plans", &plans]);
    let server = start_at(&db, "2020-10-12 15:59:00", &args);
    let acme = async |n: u64, at: &str| calls(&server, "acme", n, Some(at)).await;
    assert_eq!(acme(1, "2019-11-10T17:13:14+08:00").await, (1, 0, 499_999));
    assert_eq!(
        acme(300_000, "2020-09-15T12:00:00+08:00").await,
        (0, 300_000, 0)
    );
    // Under the launch plan October has no pack for acme: overage.
    assert_eq!(
        acme(200_000, "2020-10-01T00:00:00+08:00").await,
        (0, 200_000, 0)
    );
    assert_eq!(
        acme(50_000, "2020-10-12T23:58:30+08:00").await,
        (0, 50_000, 0)
    );
    let beta = async |n: u64, at: &str| calls(&server, "beta", n, Some(at)).await;
    assert_eq!(beta(1, "2020-10-05T10:00:00+08:00").await, (1, 0, 499_999));
    assert_eq!(
        beta(600_000, "2020-10-06T10:00:00+08:00").await,
        (499_999, 100_001, 0)
    );
    let packs = server.packs("acme").await;
    assert!(pack_at(&packs, Item::Calls, "2020-10-05T00:00:00+08:00").is_none());
    assert_eq!(server.metric("packmeter_plan_switches_total").await, 0.0);
    let (status, _) = server.terminate();
    assert!(status.success());

    // Twenty seconds before the instant, with a 1 s grace: the hour holding
    // the instant closes (and exports) at 16:00:01 UTC.
    let late = [
        "--plans",
        &plans,
        "--late-grace",
        "1s",
        "--dedup-window",
        "1m",
    ];
    let server = start_at(&db, "2020-10-12 15:59:40", &late);
    // beta made resident before the switch, with one more call of overage.
    assert_eq!(calls(&server, "beta", 1, None).await, (0, 1, 0));
    assert_eq!(server.metric("packmeter_plan_switches_total").await, 0.0);
    common::until(std::time::Duration::from_secs(60), async || {
        server.metric("packmeter_plan_switches_total").await == 1.0
    })
    .await;
    assert_eq!(
        server
            .metric("packmeter_plan_accounts_recalculated_total")
            .await,
        2.0
    );
    let packs = server.packs("acme").await;
    let october = pack_at(&packs, Item::Calls, "2020-10-05T00:00:00+08:00").unwrap();
    assert_eq!(october.plan, "2020-10");
    assert_eq!(october.pack_id, "free-2020-10-calls@2020-10");
    assert_eq!(october.capacity, 1_000_000);
    assert_eq!(october.valid_from, Some(ts("2020-10-01T00:00:00+08:00")));
    assert_eq!(october.used, 250_000, "{packs:#?}");
    assert!(pack_at(&packs, Item::Calls, "2020-09-15T12:00:00+08:00").is_none());
    let november = pack_at(&packs, Item::Calls, "2020-11-10T23:59:59+08:00").unwrap();
    assert_eq!(november.valid_until, Some(ts("2020-11-11T00:00:00+08:00")));
    let beta_packs = server.packs("beta").await;
    let beta_october = pack_at(&beta_packs, Item::Calls, "2020-10-06T00:00:00+08:00").unwrap();
    assert_eq!(
        (
            beta_october.pack_id.as_str(),
            beta_october.capacity,
            beta_october.used
        ),
        ("free-2020-10-calls@2020-10", 1_000_000, 600_002),
        "{beta_packs:#?}"
    );

    // Once the hour has closed, the export holds the usage rows as they
    // were recorded and, after them, the adjustment rows.
    let mut rows = Vec::new();
    common::until(std::time::Duration::from_secs(60), async || {
        rows = export_autumn(&server).await;
        rows.iter().any(|r| r.adjustment)
    })
    .await;
    let hour = ts("2020-10-12T15:00:00Z");
    let of = |account: &str, adjustment: bool| -> Vec<&proto::UsageRow> {
        rows.iter()
            .filter(|r| r.account_id == account && r.adjustment == adjustment)
            .collect()
    };
    let amounts = |rs: &[&proto::UsageRow]| -> Vec<(String, String, i64)> {
        rs.iter()
            .map(|r| {
                let h = r.hour.as_ref().unwrap();
                (
                    chrono::DateTime::from_timestamp(h.seconds, 0)
                        .unwrap()
                        .to_rfc3339(),
                    r.pack_id.clone(),
                    r.signed_amount,
                )
            })
            .collect()
    };
    let at_instant = "2020-10-12T15:00:00+00:00".to_string();
    assert_eq!(
        amounts(&of("acme", false)),
        vec![
            ("2020-09-15T04:00:00+00:00".into(), String::new(), 300_000),
            ("2020-09-30T16:00:00+00:00".into(), String::new(), 200_000),
            (at_instant.clone(), String::new(), 50_000),
        ]
    );
    let adjustments = of("acme", true);
    assert_eq!(
        amounts(&adjustments),
        vec![
            (at_instant.clone(), String::new(), -250_000),
            (
                at_instant.clone(),
                "free-2020-10-calls@2020-10".into(),
                250_000
            ),
        ]
    );
    for a in rows.iter().filter(|r| r.adjustment) {
        assert_eq!(
            (a.hour.as_ref(), a.plan.as_str(), a.amount),
            (Some(&hour), "2020-10", 0)
        );
    }
    assert_eq!(
        amounts(&of("beta", true)),
        vec![
            (at_instant.clone(), String::new(), -100_002),
            (at_instant.clone(), "free-2020-10-calls".into(), -500_000),
            (
                at_instant.clone(),
                "free-2020-10-calls@2020-10".into(),
                600_002
            ),
        ]
    );
    // Exact sums: everything used, and what each pack and the overage hold.
    let sum = |account: &str, f: &dyn Fn(&proto::UsageRow) -> bool| -> i64 {
        rows.iter()
            .filter(|r| r.account_id == account && f(r))
            .map(|r| r.signed_amount)
            .sum()
    };
    assert_eq!(sum("acme", &|_| true), 550_000);
    assert_eq!(sum("acme", &|r| r.pack_id.is_empty()), 300_000);
    assert_eq!(sum("acme", &|r| r.pack_id == october.pack_id), 250_000);
    assert_eq!(sum("beta", &|_| true), 600_002);
    assert_eq!(sum("beta", &|r| r.pack_id.is_empty()), 0);
    assert_eq!(sum("beta", &|r| r.pack_id == "free-2020-10-calls"), 0);

    // The CLI's export marks them too, with the signed amount and the plan.
    let out = Command::new(BIN)
        .args([
            "export",
            "--from",
            "2020-10-12T00:00:00Z",
            "--to",
            "2020-10-13T00:00:00Z",
        ])
        .args(["--account", "acme", "--format", "csv"])
        .env("PACKMETER_SERVER", server.url())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8(out.stdout).unwrap(),
        "account_id,hour,item,pack_id,source,amount,kind,plan\n\
         acme,2020-10-12T15:00:00Z,CALLS,,PACK_SOURCE_UNSPECIFIED,50000,usage,\n\
         acme,2020-10-12T15:00:00Z,CALLS,,PACK_SOURCE_UNSPECIFIED,-250000,adjustment,2020-10\n\
         acme,2020-10-12T15:00:00Z,CALLS,free-2020-10-calls@2020-10,FREE_TIER,250000,adjustment,2020-10\n"
    );

    // Deductions now use the new pack.
    assert_eq!(calls(&server, "acme", 1, None).await, (1, 0, 749_999));
    assert_eq!(calls(&server, "beta", 1, None).await, (1, 0, 399_997));

    // A restart runs nothing again: the adjustment rows are as they were.
    let (status, _) = server.terminate();
    assert!(status.success());
    let server = start_at(&db, "2020-10-12 16:01:00", &late);
    let again = export_autumn(&server).await;
    let again: Vec<_> = again.iter().filter(|r| r.adjustment).collect();
    assert_eq!(
        again,
        rows.iter().filter(|r| r.adjustment).collect::<Vec<_>>()
    );
}

/// A node on PostgreSQL whose clock starts at `at` (UTC), with `dir` as its
/// data directory.
fn start_node_at(db: &str, dir: &Path, at: &str, extra: &[&str]) -> Server {
    Server::start_store_prepared(db, dir, extra, fake_clock(at))
}

/// Two nodes on one PostgreSQL both record an account's usage under the
/// launch plan, and both switch the 2020-10 plan in when its instant
/// passes: each runs the recalculation after its own flush, and the store
/// moves the account's usage to the new pack exactly once.
#[tokio::test]
async fn two_nodes_on_postgresql_recalculate_an_account_once() {
    if !faketime() {
        return;
    }
    let Some(db) = common::pg::TestDb::create().await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let (a_dir, b_dir) = (dir.path().join("a"), dir.path().join("b"));
    for d in [&a_dir, &b_dir] {
        std::fs::create_dir(d).unwrap();
    }
    let a_file = write_plans(&a_dir, SEED_PLANS);
    let b_file = write_plans(&b_dir, SEED_PLANS);
    let a = start_node_at(
        &db.url,
        &a_dir,
        "2020-10-12 15:59:40",
        &["--plans", &a_file],
    );
    let b = start_node_at(
        &db.url,
        &b_dir,
        "2020-10-12 15:59:40",
        &["--plans", &b_file],
    );
    // Activated now, under the launch plan: its October pack (500,000).
    for (node, n) in [(&a, 100), (&b, 200), (&a, 1000)] {
        let r = node
            .meter()
            .await
            .deduct(deduct("acme", n, 0, None))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(split(&r.calls).1, 0);
    }
    for node in [&a, &b] {
        common::until(std::time::Duration::from_secs(60), async || {
            node.metric("packmeter_plan_switches_total").await == 1.0
        })
        .await;
    }
    let client = db.client().await;
    let rows = client
        .query(
            "SELECT pack_id, sum(amount)::BIGINT, count(DISTINCT hour) FROM usage_adjustments \
             WHERE account_id = 'acme' AND item = 1 GROUP BY pack_id ORDER BY pack_id",
            &[],
        )
        .await
        .unwrap();
    let rows: Vec<(String, i64, i64)> = rows
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    assert_eq!(
        rows,
        [
            ("free-2020-10-calls".to_string(), -1300, 1),
            ("free-2020-10-calls@2020-10".to_string(), 1300, 1),
        ]
    );
    let used: Vec<(String, i64)> = client
        .query(
            "SELECT pack_id, used FROM packs WHERE account_id = 'acme' AND item = 1 ORDER BY pack_id",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(
        used,
        [
            ("free-2020-10-calls".to_string(), 0),
            ("free-2020-10-calls@2020-10".to_string(), 1300),
        ]
    );
    // Both nodes serve the new pack with the whole usage.
    for node in [&a, &b] {
        let packs = node.packs("acme").await;
        let p = pack_at(&packs, Item::Calls, "2020-10-20T00:00:00+08:00").unwrap();
        assert_eq!((p.plan.as_str(), p.used), ("2020-10", 1300), "{packs:#?}");
    }
}

/// A node that was down when a plan's instant passed catches up at start:
/// the plan is in force at once, and the usage recorded under the earlier
/// plan is re-deducted in the hour holding the instant, still open.
#[tokio::test]
async fn a_plan_whose_instant_passed_while_the_node_was_down_is_recalculated_at_start() {
    if !faketime() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let plans = write_plans(dir.path(), SEED_PLANS);
    let db = dir.path().join("packmeter.db");
    let mut args = REPLAY.to_vec();
    args.extend(["--plans", &plans]);
    let server = start_at(&db, "2020-10-12 15:59:00", &args);
    let mut meter = server.meter().await;
    for (n, at, want) in [
        (1, "2019-11-10T17:13:14+08:00", (1, 0, 499_999)),
        (70_000, "2020-10-03T00:00:00+08:00", (0, 70_000, 0)),
    ] {
        let r = meter
            .deduct(deduct("acme", n, 0, Some(at)))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(split(&r.calls), want);
    }
    let (status, _) = server.terminate();
    assert!(status.success());

    // Back half an hour after the instant (the default 1 h grace keeps its
    // hour open).
    let server = start_at(&db, "2020-10-12 16:30:00", &["--plans", &plans]);
    common::until(std::time::Duration::from_secs(60), async || {
        server.metric("packmeter_plan_switches_total").await == 1.0
    })
    .await;
    let packs = server.packs("acme").await;
    let october = pack_at(&packs, Item::Calls, "2020-10-05T00:00:00+08:00").unwrap();
    assert_eq!(
        (october.plan.as_str(), october.capacity, october.used),
        ("2020-10", 1_000_000, 70_000)
    );
    // The rows are in the store (the hour is open, so not exported yet).
    let conn = rusqlite::Connection::open(&db).unwrap();
    let rows: Vec<(i64, String, i64)> = conn
        .prepare("SELECT hour, pack_id, amount FROM usage_adjustments ORDER BY pack_id")
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    let hour = ts("2020-10-12T15:00:00Z").seconds * 1_000_000;
    assert_eq!(
        rows,
        [
            (hour, String::new(), -70_000),
            (hour, "free-2020-10-calls@2020-10".to_string(), 70_000),
        ]
    );
}
