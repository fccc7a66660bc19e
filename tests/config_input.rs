//! `packmeter serve` given hostile configuration values, run as a user
//! would: every one must be refused with exit code 64 (`EX_USAGE`) and a
//! message naming the setting, never a panic (exit 101).

use std::process::{Command, Output};

const BIN: &str = env!("CARGO_BIN_EXE_packmeter");

/// Runs `packmeter serve` with `args` and a store in `dir`.
///
/// `--rls-item-key account` is always invalid (it equals the default
/// `--rls-account-key`) and is checked after every other setting, so a bad
/// value that is wrongly accepted makes the process exit 64 naming
/// `rls_item_key` instead of starting a server: the assertions below then
/// fail on the field name rather than the test hanging on a listening server.
fn serve(dir: &std::path::Path, args: &[&str]) -> Output {
    Command::new(BIN)
        .arg("serve")
        .args(["--store", &format!("sqlite://{}/pm.db", dir.display())])
        .args(args)
        .args(["--rls-item-key", "account"])
        .env_remove("RUST_BACKTRACE")
        .output()
        .expect("run packmeter")
}

/// Asserts exit 64, a message naming `field`, no panic, and no store file.
fn assert_refused(dir: &std::path::Path, args: &[&str], field: &str) {
    let out = serve(dir, args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{args:?}: {stderr}");
    assert!(
        stderr.contains(&format!("invalid configuration: {field}: ")),
        "{args:?} should name {field}: {stderr}"
    );
    assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
    assert!(out.stdout.is_empty(), "{args:?}: nothing was bound");
    assert!(
        !dir.join("pm.db").exists(),
        "{args:?}: a refused config creates no store"
    );
}

#[test]
fn a_multibyte_timezone_exits_64_naming_timezone_without_panicking() {
    let dir = tempfile::tempdir().unwrap();
    assert_refused(dir.path(), &["--timezone", "+0é0"], "timezone");
}

#[test]
fn hostile_values_exit_64_naming_their_field_without_panicking() {
    let dir = tempfile::tempdir().unwrap();
    let cases: &[(&[&str], &str)] = &[
        (&["--timezone=-é"], "timezone"),
        (&["--timezone", "+08:é"], "timezone"),
        (&["--timezone", "+\u{1F600}"], "timezone"),
        // Seconds that reach u64::MAX once the nanoseconds carry: humantime
        // itself panics ("overflow in Duration::new") on these.
        (
            &["--late-grace", "18446744073709551615s 1000000000ns"],
            "late_grace",
        ),
        (
            &["--shutdown-grace", "18446744073709551615s 500ms 500ms"],
            "shutdown_grace",
        ),
        // Longer than the microsecond clock can hold.
        (&["--dedup-window", "300000y"], "dedup_window"),
        // The stores keep amounts as signed 64-bit integers.
        (&["--max-calls", "9223372036854775808"], "max_calls"),
        (
            &["--max-egress-bytes", "18446744073709551615"],
            "max_egress_bytes",
        ),
        (&["--free-calls", "9223372036854775808"], "free_calls"),
        (
            &["--free-egress-bytes", "9_223_372_036_854_775_808"],
            "free_egress_bytes",
        ),
        (&["--max-batch", "18446744073709551616"], "max_batch"),
        (&["--listen", "[::1]:é"], "listen"),
    ];
    for (args, field) in cases {
        assert_refused(dir.path(), args, field);
    }
}

#[test]
fn the_largest_signed_amounts_are_still_accepted() {
    // i64::MAX itself fits the stores, and 2^48 is the per-deduction cap:
    // the process gets past max_calls and the free tier and stops only at
    // the always-invalid rls_item_key.
    let dir = tempfile::tempdir().unwrap();
    let out = serve(
        dir.path(),
        &[
            "--max-calls",
            "281474976710656",
            "--max-egress-bytes",
            "281474976710656",
            "--free-calls",
            "9223372036854775807",
            "--free-egress-bytes",
            "9223372036854775807",
        ],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{stderr}");
    assert!(
        stderr.contains("invalid configuration: rls_item_key: "),
        "{stderr}"
    );
}

/// Issue 15 #1: a per-deduction maximum above 2^48 is refused, so no sum of
/// a batch's amounts can come near what the store holds.
#[test]
fn per_deduction_maximums_above_2_pow_48_exit_64_naming_their_field() {
    let dir = tempfile::tempdir().unwrap();
    for (flag, field) in [
        ("--max-calls", "max_calls"),
        ("--max-egress-bytes", "max_egress_bytes"),
    ] {
        for value in [
            "281474976710657",
            "9223372036854775807",
            "18446744073709551615",
        ] {
            assert_refused(dir.path(), &[flag, value], field);
            let out = serve(dir.path(), &[flag, value]);
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(stderr.contains("2^48"), "{stderr}");
        }
    }
}

/// Runs `packmeter serve` with exactly `args` (no store or trick added),
/// expecting it to exit. If it starts serving instead (it prints its
/// listening line), it is killed and the test fails rather than hangs.
fn serve_raw(args: &[&str]) -> Output {
    use std::io::{BufRead, BufReader, Read};
    let mut child = Command::new(BIN)
        .arg("serve")
        .args(args)
        .env_remove("RUST_BACKTRACE")
        .env_remove("PACKMETER_CONFIG")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run packmeter");
    let mut stdout = BufReader::new(child.stdout.take().expect("piped stdout"));
    let mut line = String::new();
    stdout.read_line(&mut line).expect("read stdout");
    if !line.is_empty() {
        let _ = child.kill();
        let _ = child.wait();
        panic!("{args:?}: the server started: {line:?}");
    }
    let mut out = child.wait_with_output().expect("wait for packmeter");
    stdout.read_to_end(&mut out.stdout).expect("read stdout");
    out
}

/// Issue 15 item 10: a TOML value of the wrong type, a negative number and
/// a repeated key each name the key, the file and the line.
#[test]
fn toml_errors_name_the_key_the_file_and_the_line() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("packmeter.toml");
    let cases = [
        ("listen = 5\n", "listen", "line 1 (`listen = 5`)"),
        (
            "log_format = \"text\"\ntimezone = 8\n",
            "timezone",
            "line 2 (`timezone = 8`)",
        ),
        (
            "free_calls = -1\n",
            "free_calls",
            "line 1 (`free_calls = -1`)",
        ),
        (
            "timezone = \"UTC\"\n\ntimezone = \"+08:00\"\n",
            "timezone",
            "line 3 (`timezone = \\\"+08:00\\\"`)",
        ),
    ];
    for (text, field, line) in cases {
        std::fs::write(&file, text).unwrap();
        let out = serve(dir.path(), &["--config", file.to_str().unwrap()]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{text:?}: {stderr}");
        let expected = format!("invalid configuration: {field}: {} {line}", file.display());
        assert!(
            stderr.contains(&expected),
            "{text:?}: want {expected:?} in {stderr}"
        );
        assert!(out.stdout.is_empty(), "{text:?}: nothing was bound");
    }
}

/// Issue 15 item 14: `--timezone -05:00` is a value, not a flag.
#[test]
fn a_negative_timezone_offset_is_taken_as_a_value() {
    let dir = tempfile::tempdir().unwrap();
    // Accepted: the process gets past the timezone and stops only at the
    // always-invalid rls_item_key.
    let out = serve(dir.path(), &["--timezone", "-05:00"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{stderr}");
    assert!(
        stderr.contains("invalid configuration: rls_item_key: "),
        "{stderr}"
    );
    // A bad negative offset is still refused, naming timezone.
    assert_refused(dir.path(), &["--timezone", "-25:00"], "timezone");
}

/// Issue 15 item 14: one address for both ports is a configuration error
/// naming both fields, not a failed bind (exit 1) after start-up.
#[test]
fn the_same_address_for_both_ports_exits_64_naming_both() {
    let dir = tempfile::tempdir().unwrap();
    for args in [
        &[
            "--listen",
            "127.0.0.1:47361",
            "--admin-listen",
            "127.0.0.1:47361",
        ][..],
        &[
            "--listen",
            "0.0.0.0:47362",
            "--admin-listen",
            "127.0.0.1:47362",
        ][..],
        // Only --listen given: the clash is with admin_listen's default.
        &["--listen", "127.0.0.1:9090"][..],
    ] {
        let out = serve(dir.path(), args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{args:?}: {stderr}");
        assert!(
            stderr.contains("listen") && stderr.contains("admin_listen"),
            "{args:?}: {stderr}"
        );
        assert!(out.stdout.is_empty(), "{args:?}");
    }
}

/// Issue 15 item 5: with `--late-grace 0s` the dedup window (which follows
/// it) would be 0 and a retry charged twice; the start is refused, naming
/// late_grace and dedup_window. So is an explicit window that short.
#[test]
fn a_configuration_without_a_dedup_window_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    for (args, field) in [
        (&["--late-grace", "0s"][..], "late_grace"),
        (&["--late-grace", "10s"][..], "late_grace"),
        (
            &["--late-grace", "0s", "--dedup-window", "0s"][..],
            "dedup_window",
        ),
        (
            &["--late-grace", "0s", "--dedup-window", "59s"][..],
            "dedup_window",
        ),
    ] {
        assert_refused(dir.path(), args, field);
        let stderr = String::from_utf8_lossy(&serve(dir.path(), args).stderr).into_owned();
        assert!(stderr.contains("dedup_window"), "{args:?}: {stderr}");
        assert!(stderr.contains("at least 1m"), "{args:?}: {stderr}");
    }
    // A zero late grace with a real dedup window is fine.
    let out = serve(dir.path(), &["--late-grace", "0s", "--dedup-window", "1m"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("invalid configuration: rls_item_key: "),
        "{stderr}"
    );
}

/// Issue 15 item 11: an explicit store in a directory that does not exist
/// (a typo) would start an empty ledger; it is refused, naming store, and
/// nothing is created.
#[test]
fn an_explicit_store_in_a_missing_directory_exits_64_naming_store() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("typo/pm.db");
    let url = format!("sqlite://{}", missing.display());
    let out = serve_raw(&[
        "--store",
        &url,
        "--listen",
        "127.0.0.1:0",
        "--admin-listen",
        "127.0.0.1:0",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{stderr}");
    assert!(
        stderr.contains("invalid configuration: store: ") && stderr.contains("does not exist"),
        "{stderr}"
    );
    assert!(out.stdout.is_empty());
    assert!(!dir.path().join("typo").exists(), "nothing was created");
}

/// Issue 15 item 14: under `--log-format json` a fatal error is one JSON
/// line, not a JSON line and a plain one.
#[test]
fn a_fatal_error_prints_once_as_json_under_log_format_json() {
    let dir = tempfile::tempdir().unwrap();
    let out = serve(dir.path(), &["--log-format", "json"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{stderr}");
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "one line: {stderr}");
    let v: serde_json::Value = serde_json::from_str(lines[0]).expect("a JSON line");
    assert_eq!(v["level"], "ERROR", "{v}");
    let error = v["fields"]["error"].as_str().unwrap_or_default();
    assert!(
        error.starts_with("invalid configuration: rls_item_key: "),
        "{v}"
    );
    // A fatal error after start-up (a port in use) too: every line JSON,
    // the error in exactly one of them.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().to_string();
    let store = format!("sqlite://{}/bind.db", dir.path().display());
    let out = serve_raw(&[
        "--log-format",
        "json",
        "--store",
        &store,
        "--listen",
        &port,
        "--admin-listen",
        "127.0.0.1:0",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    for line in stderr.lines() {
        serde_json::from_str::<serde_json::Value>(line)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {line:?}"));
    }
    assert_eq!(
        stderr.matches("cannot listen on").count(),
        1,
        "the error once: {stderr}"
    );
    // Without it, the same error is one plain line.
    let out = serve(dir.path(), &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.starts_with("packmeter: invalid configuration: rls_item_key: "));
}

/// Strict mode (leases for deny accounts) needs a shared store: `on` with
/// SQLite, unknown modes and a lease TTL out of range are refused, naming
/// the field.
#[test]
fn strict_mode_settings_exit_64_naming_their_field() {
    for (args, field) in [
        (&["--strict-deny", "on"][..], "strict_deny"),
        (&["--strict-deny", "maybe"][..], "strict_deny"),
        (&["--lease-outage", "sometimes"][..], "lease_outage"),
        (&["--lease-ttl", "0s"][..], "lease_ttl"),
        (&["--lease-ttl", "2h"][..], "lease_ttl"),
    ] {
        let dir = tempfile::tempdir().unwrap();
        assert_refused(dir.path(), args, field);
    }
}

/// `--durability`, `PACKMETER_DURABILITY` and the TOML key: anything but
/// flush or journal exits 64 naming the field.
#[test]
fn a_bad_durability_exits_64_naming_its_field() {
    let dir = tempfile::tempdir().unwrap();
    assert_refused(dir.path(), &["--durability", "fsync"], "durability");
}

/// Issue 12 item 5: through the real binary, a flag wins over its
/// `PACKMETER_*` variable, which wins over the file's key. Each source
/// gives a value the start refuses, and the error quotes the one used.
#[test]
fn the_binary_takes_a_flag_over_its_variable_over_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("packmeter.toml");
    std::fs::write(
        &file,
        "late_grace = \"9h\"\ndedup_window = \"20h\"\nmax_message_bytes = 3000000000\n\
         rls_item_key = \"kind\"\n",
    )
    .unwrap();
    let config = ["--config", file.to_str().unwrap()];
    // A client CA without a server certificate is refused after every
    // other setting is checked: a value wrongly accepted ends the run
    // naming tls_client_ca_file rather than starting a server.
    let last = ["--tls-client-ca-file", "ca.pem"];
    let run = |args: &[&str], env: &[(&str, &str)]| {
        let out = Command::new(BIN)
            .arg("serve")
            .args([
                "--store",
                &format!("sqlite://{}/pm.db", dir.path().display()),
            ])
            .args(config)
            .args(args)
            .args(last)
            .envs(env.iter().copied())
            .env_remove("RUST_BACKTRACE")
            .output()
            .expect("run packmeter");
        assert_eq!(out.status.code(), Some(64), "{args:?} {env:?}");
        assert!(out.stdout.is_empty(), "{args:?} {env:?}: nothing was bound");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };

    // Durations: late_grace from the flag (not the variable's 7h nor the
    // file's 9h), dedup_window from the variable (not the file's 20h).
    let stderr = run(
        &["--late-grace", "1h"],
        &[
            ("PACKMETER_LATE_GRACE", "7h"),
            ("PACKMETER_DEDUP_WINDOW", "30m"),
        ],
    );
    assert!(
        stderr.contains("invalid configuration: dedup_window: 30m is shorter than late_grace (1h)"),
        "{stderr}"
    );
    // Without the flag, the variable's late_grace; without the variables,
    // the file's.
    let stderr = run(
        &[],
        &[
            ("PACKMETER_LATE_GRACE", "7h"),
            ("PACKMETER_DEDUP_WINDOW", "2h"),
        ],
    );
    assert!(
        stderr.contains("dedup_window: 2h is shorter than late_grace (7h)"),
        "{stderr}"
    );
    let stderr = run(&["--dedup-window", "8h"], &[]);
    assert!(
        stderr.contains("dedup_window: 8h is shorter than late_grace (9h)"),
        "{stderr}"
    );

    // Sizes: each source's value in turn is the one refused.
    let size = |stderr: &str| -> String {
        let start = stderr.find("max_message_bytes: ").expect(stderr);
        stderr[start..]
            .split_whitespace()
            .nth(1)
            .unwrap()
            .to_string()
    };
    let late = ["--late-grace", "1h"];
    assert_eq!(size(&run(&late, &[])), "3000000000", "the file's");
    let env = [("PACKMETER_MAX_MESSAGE_BYTES", "2000000000")];
    assert_eq!(size(&run(&late, &env)), "2000000000", "the variable's");
    let flag = ["--late-grace", "1h", "--max-message-bytes", "5000000000"];
    assert_eq!(size(&run(&flag, &env)), "5000000000", "the flag's");

    // Text: the file's rls_item_key `kind` is valid, but `serve` here also
    // gets --rls-item-key account, which wins and is refused.
    let file_ok = dir.path().join("ok.toml");
    std::fs::write(&file_ok, "rls_item_key = \"kind\"\n").unwrap();
    assert_refused(
        dir.path(),
        &["--config", file_ok.to_str().unwrap()],
        "rls_item_key",
    );
}

/// An unknown key in the file, or a bad value in a variable, exits 64
/// naming the field, through the real binary.
#[test]
fn an_unknown_key_or_a_bad_variable_exits_64_naming_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("packmeter.toml");
    std::fs::write(&file, "listen = \"127.0.0.1:0\"\nmax_batchh = 5\n").unwrap();
    let out = serve(dir.path(), &["--config", file.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "invalid configuration: config: {} line 2 (`max_batchh = 5`): unknown key `max_batchh`; the keys are listen, ",
            file.display()
        )),
        "{stderr}"
    );
    assert!(out.stdout.is_empty());

    for (name, value, field) in [
        ("PACKMETER_MAX_BATCH", "lots", "max_batch"),
        ("PACKMETER_FREE_EGRESS_BYTES", "-1", "free_egress_bytes"),
        ("PACKMETER_IDLE_EVICT", "0s", "idle_evict"),
        ("PACKMETER_LISTEN", "localhost", "listen"),
    ] {
        let out = Command::new(BIN)
            .arg("serve")
            .args([
                "--store",
                &format!("sqlite://{}/pm.db", dir.path().display()),
            ])
            .args(["--tls-client-ca-file", "ca.pem"])
            .env(name, value)
            .env_remove("RUST_BACKTRACE")
            .output()
            .expect("run packmeter");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{name}={value}: {stderr}");
        assert!(
            stderr.contains(&format!("invalid configuration: {field}: ")),
            "{name}={value}: {stderr}"
        );
        assert!(!dir.path().join("pm.db").exists(), "{name}: no store");
    }
}
