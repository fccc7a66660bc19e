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
