//! The `packmeter` command line, run as a user would: the client commands
//! against a running server (tables and --json), export, and `serve`'s
//! configuration errors.

mod common;

use std::process::{Command, Output};

use common::{Server, BIN};

fn run(server: &Server, args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .env("PACKMETER_SERVER", server.url())
        .output()
        .expect("run packmeter")
}

fn ok(server: &Server, args: &[&str]) -> String {
    let out = run(server, args);
    assert!(
        out.status.success(),
        "packmeter {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn json(server: &Server, args: &[&str]) -> serde_json::Value {
    let mut args = args.to_vec();
    args.push("--json");
    serde_json::from_str(&ok(server, &args)).expect("valid JSON")
}

#[test]
fn client_commands_print_tables_and_json() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(
        dir.path(),
        &["--late-grace", "3650d", "--dedup-window", "3650d"],
    );

    let put = json(
        &server,
        &[
            "account",
            "put",
            "acme",
            "--activated-at",
            "2019-11-10T17:13:14+08:00",
            "--deny-on-exhausted",
            "false",
        ],
    );
    assert_eq!(put["activated_at"], "2019-11-10T09:13:14Z");
    assert_eq!(put["suspended"], false);

    let table = ok(
        &server,
        &[
            "deduct",
            "acme",
            "--calls",
            "5",
            "--egress-bytes",
            "1024",
            "--at",
            "2019-11-11T10:00:00+08:00",
        ],
    );
    assert!(table.starts_with("decision: ALLOW"), "{table}");
    assert!(
        table.contains("calls         5        0        999995"),
        "{table}"
    );

    let d = json(
        &server,
        &[
            "deduct",
            "acme",
            "--calls",
            "2",
            "--at",
            "2019-11-11T10:00:00+08:00",
            "--request-id",
            "r-1",
        ],
    );
    assert_eq!(d["calls"]["covered"], 2);
    assert_eq!(d["duplicate"], false);
    let d = json(
        &server,
        &[
            "deduct",
            "acme",
            "--calls",
            "2",
            "--at",
            "2019-11-11T10:00:00+08:00",
            "--request-id",
            "r-1",
        ],
    );
    assert_eq!(d["duplicate"], true);

    let packs = json(&server, &["packs", "acme"]);
    let packs = packs.as_array().unwrap();
    assert_eq!(packs.len(), 26);
    assert_eq!(packs[0]["pack_id"], "free-2019-11-calls");
    assert_eq!(packs[0]["used"], 7);
    assert_eq!(packs[0]["remaining"], 999_993);
    let table = ok(&server, &["packs", "acme"]);
    assert!(table.lines().next().unwrap().starts_with("PACK"), "{table}");
    assert_eq!(table.lines().count(), 27);

    let usage = json(
        &server,
        &["usage", "acme", "--at", "2019-11-20T00:00:00+08:00"],
    );
    assert_eq!(usage.as_array().unwrap().len(), 2);

    let g = json(
        &server,
        &[
            "grant",
            "acme",
            "--item",
            "calls",
            "--capacity",
            "500",
            "--valid-from",
            "2019-11-01T00:00:00+08:00",
            "--valid-for",
            "30d",
            "--pack-id",
            "promo",
        ],
    );
    assert_eq!(g["pack_id"], "promo");
    assert_eq!(g["source"], "PURCHASED");
    assert_eq!(g["valid_until"], "2019-11-30T16:00:00Z");

    let acct = ok(&server, &["account", "get", "acme"]);
    assert!(acct.contains("deny_on_exhausted  false"), "{acct}");
    let f = ok(&server, &["flush"]);
    assert!(f.starts_with("flushed 1 accounts"), "{f}");
}

#[test]
fn export_writes_settled_rows_as_csv_and_jsonl() {
    let dir = tempfile::tempdir().unwrap();
    let replay = ["--late-grace", "3650d", "--dedup-window", "3650d"];
    let server = Server::start(dir.path(), &replay);
    ok(
        &server,
        &[
            "deduct",
            "acme",
            "--calls",
            "3",
            "--at",
            "2020-01-05T10:30:00+08:00",
        ],
    );
    ok(
        &server,
        &[
            "deduct",
            "acme",
            "--calls",
            "4",
            "--at",
            "2020-01-05T11:30:00+08:00",
        ],
    );
    // With a 10-year grace nothing of 2020 has closed: nothing is settled yet.
    let csv = ok(
        &server,
        &[
            "export",
            "--from",
            "2020-01-01T00:00:00Z",
            "--to",
            "2020-02-01T00:00:00Z",
        ],
    );
    assert_eq!(csv.lines().count(), 1, "header only: {csv}");
    let (status, _) = server.terminate();
    assert!(status.success());

    let server = Server::start_on(&dir.path().join("packmeter.db"), &[]);
    let csv = ok(
        &server,
        &[
            "export",
            "--from",
            "2020-01-01T00:00:00Z",
            "--to",
            "2020-02-01T00:00:00Z",
            "--format",
            "csv",
        ],
    );
    let lines: Vec<_> = csv.lines().collect();
    assert_eq!(lines[0], "account_id,hour,item,pack_id,source,amount");
    assert_eq!(
        lines[1],
        "acme,2020-01-05T02:00:00Z,CALLS,free-2020-01-calls,FREE_TIER,3"
    );
    assert_eq!(
        lines[2],
        "acme,2020-01-05T03:00:00Z,CALLS,free-2020-01-calls,FREE_TIER,4"
    );
    assert_eq!(lines.len(), 3);
    let jsonl = ok(
        &server,
        &[
            "export",
            "--from",
            "2020-01-05T03:00:00Z",
            "--to",
            "2020-02-01T00:00:00Z",
            "--format",
            "jsonl",
            "--account",
            "acme",
        ],
    );
    let rows: Vec<serde_json::Value> = jsonl
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0]["amount"], 4);
}

#[test]
fn client_errors_say_how_to_fix_them() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &[]);
    let out = run(&server, &["deduct", "", "--calls", "1"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("InvalidArgument: account_id is empty"));
    let out = run(&server, &["deduct", "acme", "--at", "yesterday"]);
    assert_eq!(out.status.code(), Some(64));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--at: `yesterday` is not an RFC 3339 time")
    );
    let out = run(
        &server,
        &["grant", "acme", "--item", "calls", "--capacity", "5"],
    );
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--valid-until or --valid-for"));
    let out = run(&server, &["packs", "nobody"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("NotFound"));
    // No server at that address.
    let out = Command::new(BIN)
        .args(["flush", "--server", "http://127.0.0.1:1"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(69));
    assert!(String::from_utf8_lossy(&out.stderr).contains("is `packmeter serve` running?"));
}

/// Flags, environment, and the field the error must name.
type Case<'a> = (Vec<String>, Vec<(&'a str, &'a str)>, &'a str);

#[test]
fn an_invalid_config_exits_64_naming_the_field_before_binding() {
    let dir = tempfile::tempdir().unwrap();
    let toml = dir.path().join("pm.toml");
    std::fs::write(&toml, "flush_interval = \"fast\"\n").unwrap();
    let cases: Vec<Case> = vec![
        (
            vec!["--flush-interval".into(), "soon".into()],
            vec![],
            "flush_interval",
        ),
        (
            vec!["--timezone".into(), "Mars/Olympus".into()],
            vec![],
            "timezone",
        ),
        (
            vec![],
            vec![
                ("PACKMETER_LATE_GRACE", "2h"),
                ("PACKMETER_DEDUP_WINDOW", "1h"),
            ],
            "dedup_window",
        ),
        (
            vec!["--config".into(), toml.display().to_string()],
            vec![],
            "flush_interval",
        ),
        (
            vec!["--listen".into(), "localhost".into()],
            vec![],
            "listen",
        ),
        (vec!["--no-such-flag".into()], vec![], "--no-such-flag"),
    ];
    for (args, env, field) in cases {
        let out = Command::new(BIN)
            .arg("serve")
            .args([
                "--store",
                &format!("sqlite://{}/x.db", dir.path().display()),
            ])
            .args(&args)
            .envs(env)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{args:?}: {stderr}");
        assert!(stderr.contains(field), "{args:?}: {stderr}");
        assert!(
            out.stdout.is_empty(),
            "nothing was bound: {}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
    assert!(
        !dir.path().join("x.db").exists(),
        "a refused config creates no store"
    );
}

#[test]
fn settings_come_from_flags_env_and_the_toml_file() {
    let dir = tempfile::tempdir().unwrap();
    let toml = dir.path().join("pm.toml");
    std::fs::write(&toml, "free_calls = 7\ntimezone = \"UTC\"\n").unwrap();
    let server = Server::start(dir.path(), &["--config", toml.to_str().unwrap()]);
    let d = json(&server, &["deduct", "acme", "--calls", "1"]);
    assert_eq!(d["calls"]["remaining"], 6, "free_calls from the file");
    let packs = json(&server, &["packs", "acme"]);
    // In UTC, months start at 00:00Z.
    assert!(
        packs[2]["valid_from"]
            .as_str()
            .unwrap()
            .ends_with("-01T00:00:00Z"),
        "{packs}"
    );
}

#[test]
fn a_bare_serve_keeps_its_sqlite_file_in_the_data_directory() {
    let data = tempfile::tempdir().unwrap();
    let mut child = Command::new(BIN)
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
        ])
        .env("XDG_DATA_HOME", data.path())
        .env_remove("PACKMETER_STORE")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    assert!(line.starts_with("packmeter listening grpc="), "{line}");
    assert!(data.path().join("packmeter/packmeter.db").is_file());
    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(child.wait().unwrap().success());
}

/// `account put` changes only the flags given: an activation fix keeps a
/// suspension. Once the account has usage, a new activation is refused
/// (exit 1, naming the account) and nothing changes (issue 15, items 7, 8).
#[test]
fn account_put_changes_only_the_flags_given() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(
        dir.path(),
        &["--late-grace", "3650d", "--dedup-window", "3650d"],
    );
    let put = |extra: &[&str]| {
        let mut args = vec!["account", "put", "acme"];
        args.extend_from_slice(extra);
        json(&server, &args)
    };
    let a = put(&["--suspended", "true", "--deny-on-exhausted", "true"]);
    assert_eq!(
        (a["suspended"].as_bool(), a["deny_on_exhausted"].as_bool()),
        (Some(true), Some(true))
    );
    let a = put(&["--activated-at", "2019-11-10T17:13:14+08:00"]);
    assert_eq!(a["activated_at"], "2019-11-10T09:13:14Z");
    assert_eq!(
        (a["suspended"].as_bool(), a["deny_on_exhausted"].as_bool()),
        (Some(true), Some(true))
    );
    let a = put(&["--suspended", "false"]);
    assert_eq!(a["activated_at"], "2019-11-10T09:13:14Z");
    assert_eq!(
        (a["suspended"].as_bool(), a["deny_on_exhausted"].as_bool()),
        (Some(false), Some(true))
    );

    ok(
        &server,
        &[
            "deduct",
            "acme",
            "--calls",
            "1",
            "--at",
            "2019-11-20T12:00:00+08:00",
        ],
    );
    let out = run(
        &server,
        &[
            "account",
            "put",
            "acme",
            "--activated-at",
            "2019-12-01T00:00:00+08:00",
        ],
    );
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("`acme`") && err.contains("first usage"),
        "{err}"
    );
    let a = json(&server, &["account", "get", "acme"]);
    assert_eq!(a["activated_at"], "2019-11-10T09:13:14Z");
}
