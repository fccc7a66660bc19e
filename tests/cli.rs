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
    // No background flush: `flush` below must find the account unflushed.
    let server = Server::start(
        dir.path(),
        &[
            "--late-grace",
            "3650d",
            "--dedup-window",
            "3650d",
            "--flush-interval",
            "1h",
        ],
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
    // Times are shown in the server's billing zone (+08:00 by default) ...
    assert_eq!(put["activated_at"], "2019-11-10T17:13:14+08:00");
    // ... or in UTC with --utc.
    let utc = json(&server, &["account", "get", "acme", "--utc"]);
    assert_eq!(utc["activated_at"], "2019-11-10T09:13:14Z");
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
    assert_eq!(g["valid_until"], "2019-12-01T00:00:00+08:00");

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
    assert_eq!(
        lines[0],
        "account_id,hour,item,pack_id,source,amount,kind,plan"
    );
    assert_eq!(
        lines[1],
        "acme,2020-01-05T02:00:00Z,CALLS,free-2020-01-calls,FREE_TIER,3,usage,"
    );
    assert_eq!(
        lines[2],
        "acme,2020-01-05T03:00:00Z,CALLS,free-2020-01-calls,FREE_TIER,4,usage,"
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

// === retries, exit codes and pipes (issue 15) ===

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A grant with a --pack-id and no --valid-from can be sent again (a
/// timeout, a rerun script) and gets the same pack back, not
/// ALREADY_EXISTS, whether its length is in days or calendar months.
#[test]
fn a_grant_with_a_pack_id_can_be_retried() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &[]);
    ok(&server, &["account", "put", "acme"]);
    for valid_for in ["30d", "1month", "1month 15d"] {
        let id = format!("order-{}", valid_for.replace(' ', "-"));
        let grant = [
            "grant",
            "acme",
            "--item",
            "calls",
            "--capacity",
            "5000",
            "--valid-for",
            valid_for,
            "--pack-id",
            &id,
        ];
        let first = json(&server, &grant);
        let again = json(&server, &grant);
        assert_eq!(first, again, "{valid_for}");
        // `--valid-from now` is the same as leaving it out.
        let mut with_now = grant.to_vec();
        with_now.extend(["--valid-from", "now"]);
        assert_eq!(json(&server, &with_now), first, "{valid_for}");
        // Other terms are still a conflict.
        let mut other = grant.to_vec();
        other[5] = "6000";
        let out = run(&server, &other);
        assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
        assert!(stderr(&out).contains("AlreadyExists"), "{}", stderr(&out));
    }
}

/// `--valid-for 1month` is a calendar month in the server's billing zone
/// (+08:00 by default), keeping the local time: from 1 March 04:00 +08:00
/// (28 February 20:00Z) to 1 April 04:00 +08:00, not 30.44 days.
#[test]
fn valid_for_months_are_calendar_months_in_the_billing_zone() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &[]);
    ok(&server, &["account", "put", "acme"]);
    let grant = |from: &str, valid_for: &str, id: &str| {
        json(
            &server,
            &[
                "grant",
                "acme",
                "--item",
                "egress_bytes",
                "--capacity",
                "1024",
                "--valid-from",
                from,
                "--valid-for",
                valid_for,
                "--pack-id",
                id,
                "--utc",
            ],
        )
    };
    let g = grant("2026-02-28T20:00:00Z", "1month", "m1");
    assert_eq!(g["valid_from"], "2026-02-28T20:00:00Z");
    assert_eq!(g["valid_until"], "2026-03-31T20:00:00Z");
    // 31 January + 1 month is the last day of February; + 1 year is 12 months.
    let g = grant("2026-01-31T10:00:00+08:00", "1month", "m2");
    assert_eq!(g["valid_until"], "2026-02-28T02:00:00Z");
    let g = grant("2028-02-29T10:00:00+08:00", "1y", "m3");
    assert_eq!(g["valid_until"], "2029-02-28T02:00:00Z");
    let g = grant("2026-01-31T10:00:00+08:00", "1month 1d", "m4");
    assert_eq!(g["valid_until"], "2026-03-01T02:00:00Z");

    // In another billing zone the same instant is another local date.
    let dir = tempfile::tempdir().unwrap();
    let utc = Server::start(dir.path(), &["--timezone", "UTC"]);
    ok(&utc, &["account", "put", "acme"]);
    let g = json(
        &utc,
        &[
            "grant",
            "acme",
            "--item",
            "calls",
            "--capacity",
            "1",
            "--valid-from",
            "2026-02-28T20:00:00Z",
            "--valid-for",
            "1month",
        ],
    );
    // Shown in that server's zone, UTC.
    assert_eq!(g["valid_until"], "2026-03-28T20:00:00Z");

    let out = run(
        &server,
        &[
            "grant",
            "acme",
            "--item",
            "calls",
            "--capacity",
            "1",
            "--valid-for",
            "1mont",
        ],
    );
    assert_eq!(out.status.code(), Some(64), "{}", stderr(&out));
    assert!(stderr(&out).contains("--valid-for"), "{}", stderr(&out));
}

/// `packmeter packs acme | head -1`: a reader that goes away ends the
/// command quietly with success, as Unix filters do, never a panic (101).
/// The pipe's read end is closed before the command writes anything, so
/// every write it makes fails.
#[test]
fn a_closed_stdout_ends_the_command_quietly() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(
        dir.path(),
        &["--late-grace", "3650d", "--dedup-window", "3650d"],
    );
    ok(
        &server,
        &[
            "deduct",
            "acme",
            "--calls",
            "1",
            "--at",
            "2020-01-05T10:30:00+08:00",
        ],
    );
    for args in [
        vec!["packs", "acme"],
        vec!["packs", "acme", "--json"],
        vec!["usage", "acme"],
        vec!["account", "get", "acme"],
        vec!["deduct", "acme"],
        vec!["flush"],
        vec![
            "export",
            "--from",
            "2020-01-01T00:00:00Z",
            "--to",
            "2020-02-01T00:00:00Z",
        ],
    ] {
        let mut child = Command::new(BIN)
            .args(&args)
            .env("PACKMETER_SERVER", server.url())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        drop(child.stdout.take());
        let out = child.wait_with_output().unwrap();
        let err = stderr(&out);
        assert!(!err.contains("panicked"), "{args:?}: {err}");
        assert_eq!(out.status.code(), Some(0), "{args:?}: {err}");
        assert!(err.is_empty(), "{args:?}: {err}");
    }
}

/// Scripts branch on the exit code: a DENY is 2; a malformed --server is
/// bad usage (64), not an unreachable server; the admin port gets a hint;
/// https:// really is TLS; a store failure on the server is 75 (retry),
/// not 69, which is kept for a server that cannot be reached.
#[test]
fn exit_codes_tell_scripts_what_happened() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &[]);
    ok(&server, &["account", "put", "acme", "--suspended", "true"]);
    let out = run(&server, &["deduct", "acme", "--calls", "1"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.starts_with("decision: DENY"), "{table}");
    let out = run(&server, &["deduct", "acme", "--calls", "1", "--json"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let allowed = run(&server, &["deduct", "acme", "--egress-bytes", "1"]);
    assert_eq!(allowed.status.code(), Some(0), "egress alone is allowed");

    let client = |server_flag: &str| {
        Command::new(BIN)
            .args(["packs", "acme", "--server", server_flag])
            .output()
            .unwrap()
    };
    for (flag, text) in [
        ("notaurl".to_string(), "is not a URL"),
        (server.grpc.clone(), "did you mean http://"),
        (format!("ftp://{}", server.grpc), "scheme `ftp:`"),
        (format!("http://{}/x", server.grpc), "has a path"),
        ("http://".to_string(), "--server"),
    ] {
        let out = client(&flag);
        assert_eq!(out.status.code(), Some(64), "{flag}: {}", stderr(&out));
        assert!(stderr(&out).contains(text), "{flag}: {}", stderr(&out));
        assert!(
            !stderr(&out).contains("running?"),
            "{flag}: {}",
            stderr(&out)
        );
    }

    let out = client(&format!("http://{}", server.admin));
    assert_eq!(out.status.code(), Some(69), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("this looks like the admin HTTP port")
            && stderr(&out).contains("the gRPC port is --listen"),
        "{}",
        stderr(&out)
    );

    // The server speaks plaintext: https:// must not quietly talk plaintext.
    let out = client(&format!("https://{}", server.grpc));
    assert_eq!(out.status.code(), Some(69), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("is the server serving TLS"),
        "{}",
        stderr(&out)
    );
    let out = Command::new(BIN)
        .args([
            "flush",
            "--server",
            &server.url(),
            "--tls-ca",
            "/nonexistent",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64), "{}", stderr(&out));

    // A real store failure: the SQLite file is overwritten under a server
    // that has not loaded the account yet.
    let (status, _) = server.terminate();
    assert!(status.success());
    let server = Server::start(dir.path(), &[]);
    let size = std::fs::metadata(&server.db).unwrap().len() as usize;
    std::fs::write(&server.db, vec![0xff; size]).unwrap();
    let out = run(&server, &["packs", "acme"]);
    assert_eq!(out.status.code(), Some(75), "{}", stderr(&out));
    assert!(stderr(&out).contains("Unavailable"), "{}", stderr(&out));
    assert!(stderr(&out).contains("retry"), "{}", stderr(&out));
}

/// A cell that starts like a formula (`=`, `+`, `-`, `@`) is written with
/// a leading `'`, so a spreadsheet shows it as text instead of running it.
#[test]
fn csv_export_neutralises_cells_that_start_like_formulas() {
    let dir = tempfile::tempdir().unwrap();
    let replay = ["--late-grace", "3650d", "--dedup-window", "3650d"];
    let server = Server::start(dir.path(), &replay);
    let hostile = ["=HYPERLINK(\"http://x\",\"y\")", "+1", "-2+3", "@SUM(A1)"];
    for account in hostile {
        ok(
            &server,
            &[
                "deduct",
                "--calls",
                "1",
                "--at",
                "2020-01-05T10:30:00+08:00",
                "--",
                account,
            ],
        );
    }
    // Activated long before, so its free window is over and the pack covers.
    ok(
        &server,
        &[
            "account",
            "put",
            "acme",
            "--activated-at",
            "2015-01-01T00:00:00+08:00",
        ],
    );
    ok(
        &server,
        &[
            "grant",
            "acme",
            "--item",
            "calls",
            "--capacity",
            "10",
            "--valid-from",
            "2020-01-01T00:00:00Z",
            "--valid-for",
            "30d",
            "--pack-id",
            "=1+1",
        ],
    );
    ok(
        &server,
        &[
            "deduct",
            "acme",
            "--calls",
            "1",
            "--at",
            "2020-01-05T10:30:00+08:00",
        ],
    );
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
        ],
    );
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(lines.len(), 6, "{csv}");
    for line in &lines[1..] {
        let first = line.trim_start_matches('"');
        assert!(
            !first.starts_with(['=', '+', '-', '@']),
            "a cell starts like a formula: {line}"
        );
    }
    assert!(
        csv.contains("\"'=HYPERLINK(\"\"http://x\"\",\"\"y\"\")\",2020-01-05T02:00:00Z,CALLS,"),
        "{csv}"
    );
    assert!(csv.contains("'+1,2020-01-05T02:00:00Z"), "{csv}");
    assert!(csv.contains("'-2+3,"), "{csv}");
    assert!(csv.contains("'@SUM(A1),"), "{csv}");
    assert!(
        csv.contains("acme,2020-01-05T02:00:00Z,CALLS,'=1+1,PURCHASED,1"),
        "{csv}"
    );
    // JSON lines are data, not cells: unchanged.
    let jsonl = ok(
        &server,
        &[
            "export",
            "--from",
            "2020-01-01T00:00:00Z",
            "--to",
            "2020-02-01T00:00:00Z",
            "--format",
            "jsonl",
            "--account=+1",
        ],
    );
    assert!(jsonl.contains("\"account_id\":\"+1\""), "{jsonl}");
}

/// Starts a TLS-terminating proxy in front of `backend` (plaintext gRPC),
/// with the test certificate for 127.0.0.1, offering h2 as gRPC needs.
/// Returns its address; it runs on `rt` until the runtime is dropped.
fn tls_proxy(rt: &tokio::runtime::Runtime, backend: String) -> String {
    use tokio_rustls::rustls::{
        self,
        pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer},
    };
    let fixtures = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tls");
    let certs: Vec<CertificateDer<'static>> =
        CertificateDer::pem_file_iter(fixtures.join("server.pem"))
            .unwrap()
            .map(Result::unwrap)
            .collect();
    let key = PrivateKeyDer::from_pem_file(fixtures.join("server.key")).unwrap();
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config));
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    rt.spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let (acceptor, backend) = (acceptor.clone(), backend.clone());
            tokio::spawn(async move {
                // A client that refuses the certificate ends the handshake.
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let mut plain = tokio::net::TcpStream::connect(&backend).await.unwrap();
                let _ = tokio::io::copy_bidirectional(&mut tls, &mut plain).await;
            });
        }
    });
    addr
}

/// `--server https://` is TLS: through a TLS proxy it works with the
/// proxy's CA given by --tls-ca (or PACKMETER_TLS_CA), and an untrusted
/// certificate is refused (69) with the reason, never sent in plaintext.
#[test]
fn https_servers_are_reached_over_tls() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &[]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let proxy = tls_proxy(&rt, server.grpc.clone());
    let ca = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/tls/ca.pem");
    let https = format!("https://{proxy}");
    let cli = |args: &[&str], env: &[(&str, &str)]| {
        Command::new(BIN)
            .args(args)
            .args(["--server", &https])
            .env_remove("PACKMETER_TLS_CA")
            .envs(env.iter().copied())
            .output()
            .unwrap()
    };

    let out = cli(&["account", "put", "acme"], &[]);
    assert_eq!(out.status.code(), Some(69), "{}", stderr(&out));
    assert!(stderr(&out).contains("certificate"), "{}", stderr(&out));
    assert!(stderr(&out).contains("--tls-ca"), "{}", stderr(&out));

    let out = cli(&["account", "put", "acme", "--json", "--tls-ca", ca], &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let put: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(put["account_id"], "acme");
    let out = cli(
        &["deduct", "acme", "--calls", "3"],
        &[("PACKMETER_TLS_CA", ca)],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    // The deduction went through the proxy to the real server.
    let packs = json(&server, &["usage", "acme"]);
    let used: u64 = packs
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["item"] == "CALLS")
        .map(|p| p["used"].as_u64().unwrap())
        .sum();
    assert_eq!(used, 3);
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
    let a = put(&["--activated-at", "2019-11-10T09:13:14Z"]);
    assert_eq!(a["activated_at"], "2019-11-10T17:13:14+08:00");
    assert_eq!(
        (a["suspended"].as_bool(), a["deny_on_exhausted"].as_bool()),
        (Some(true), Some(true))
    );
    let a = put(&["--suspended", "false"]);
    assert_eq!(a["activated_at"], "2019-11-10T17:13:14+08:00");
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
    assert_eq!(a["activated_at"], "2019-11-10T17:13:14+08:00");
}

/// `usage ACCOUNT --daily`: the days with usage in the billing zone, covered
/// and overage per item, as a table and as JSON (every day), from what the
/// server has flushed and what it has not.
#[test]
fn usage_daily_prints_the_days_with_usage() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(
        dir.path(),
        &["--late-grace", "3650d", "--dedup-window", "3650d"],
    );
    let now = chrono::Utc::now();
    let day = |days_ago: i64| (now - chrono::Duration::days(days_ago)).to_rfc3339();
    for (days_ago, calls, egress) in [(4, "700000", "100"), (4, "500000", "0"), (1, "7", "0")] {
        ok(
            &server,
            &[
                "deduct",
                "acme",
                "--calls",
                calls,
                "--egress-bytes",
                egress,
                "--at",
                &day(days_ago),
            ],
        );
    }
    // Flushed or not, each deduction counts once.
    ok(&server, &["flush"]);
    ok(&server, &["deduct", "acme", "--calls", "3"]);

    let local = |days_ago: i64| {
        (now - chrono::Duration::days(days_ago))
            .with_timezone(&chrono::FixedOffset::east_opt(8 * 3600).unwrap())
            .date_naive()
            .to_string()
    };
    let v = json(&server, &["usage", "acme", "--daily", "--days", "7"]);
    assert_eq!(v["zone"], "+08:00");
    let days = v["days"].as_array().unwrap();
    assert_eq!(days.len(), 7, "{v}");
    assert_eq!(days[6]["date"], local(0));
    let on = |date: String| days.iter().find(|d| d["date"] == date.as_str()).unwrap();
    let four = on(local(4));
    // A new account's first month: 1,000,000 free calls, then overage —
    // unless the four days span a month change, which starts a new pack.
    let calls = four["calls_covered"].as_u64().unwrap() + four["calls_overage"].as_u64().unwrap();
    assert_eq!(calls, 1_200_000, "{four}");
    assert_eq!(four["egress_bytes_covered"], 100);
    let recent: u64 = days[5..]
        .iter()
        .map(|d| d["calls_covered"].as_u64().unwrap() + d["calls_overage"].as_u64().unwrap())
        .sum();
    assert_eq!(recent, 10, "7 a day ago and 3 now: {v}");

    let table = ok(&server, &["usage", "acme", "--daily", "--days", "7"]);
    let lines: Vec<&str> = table.lines().collect();
    assert!(lines[0].contains("of 7 days had usage"), "{table}");
    assert!(lines[1].starts_with("DAY"), "{table}");
    assert!(lines.iter().any(|l| l.starts_with(&local(4))), "{table}");
    let total = lines.last().unwrap();
    assert!(total.starts_with("total"), "{table}");
    assert_eq!(
        total.split_whitespace().skip(1).collect::<Vec<_>>().len(),
        4,
        "{table}"
    );

    // Bad usage, before anything is sent.
    for args in [
        &["usage", "acme", "--daily", "--days", "0"][..],
        &["usage", "acme", "--daily", "--days", "732"],
        &["usage", "acme", "--days", "3"],
        &["usage", "acme", "--daily", "--at", "2026-01-01T00:00:00Z"],
    ] {
        let out = run(&server, args);
        assert_eq!(out.status.code(), Some(64), "{args:?}: {}", stderr(&out));
    }
    // An unknown account is named.
    let out = run(&server, &["usage", "nobody", "--daily"]);
    assert_ne!(out.status.code(), Some(0));
    assert!(stderr(&out).contains("nobody"), "{}", stderr(&out));
}
