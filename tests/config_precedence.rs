//! Where each `serve` setting comes from: its flag, else its `PACKMETER_*`
//! variable, else the TOML file's key, else the default, for text,
//! durations, sizes and counts alike, as the binary parses them (clap with
//! [`packmeter::config::with_env`]) and [`Config::resolve`] merges them.
//!
//! The file holds one test on purpose: it sets `PACKMETER_*` variables in
//! its own process, where no other test thread reads the environment.
//! (`tests/config_input.rs` checks the same order through the real binary.)

use std::time::Duration;

use clap::{Args, FromArgMatches};
use packmeter::config::{with_env, Config, ServeArgs, Settings};

const MINUTE: i64 = 60_000_000;
const HOUR: i64 = 60 * MINUTE;

/// `packmeter serve ARGV` with exactly the variables `env` set (every
/// other `PACKMETER_*` variable of a setting removed), resolved.
fn resolve(argv: &[&str], env: &[(&str, &str)]) -> Config {
    let names = Settings::keys()
        .iter()
        .chain(&["config", "noop"])
        .map(|k| format!("PACKMETER_{}", k.to_uppercase()));
    for name in names {
        std::env::remove_var(name);
    }
    for (name, value) in env {
        std::env::set_var(name, value);
    }
    let serve = with_env(ServeArgs::augment_args(
        clap::Command::new("serve").no_binary_name(true),
    ));
    let matches = serve
        .try_get_matches_from(argv)
        .unwrap_or_else(|e| panic!("{argv:?}: {e}"));
    let args = ServeArgs::from_arg_matches(&matches).unwrap();
    for (name, _) in env {
        std::env::remove_var(name);
    }
    Config::resolve(&args).unwrap_or_else(|e| panic!("{argv:?} {env:?}: {e}"))
}

#[test]
fn each_setting_comes_from_its_flag_else_its_variable_else_the_file_else_the_default() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("packmeter.toml");
    std::fs::write(
        &file,
        r#"
late_grace = "4h"
dedup_window = "6h"
max_export_range = "10d"
max_egress_bytes = 4096
free_egress_bytes = 4096
free_calls = 7
rls_domain = "from-file"
rls_account_key = "tenant"
timezone = "+01:00"
log_format = "json"
"#,
    )
    .unwrap();
    let store = format!("sqlite://{}/pm.db", dir.path().display());
    let path = file.to_str().unwrap();

    // The file named by its variable, PACKMETER_CONFIG.
    let c = resolve(
        &[
            "--store",
            &store,
            "--late-grace",
            "2h",
            "--max-egress-bytes",
            "1_024",
            "--timezone",
            "UTC",
        ],
        &[
            ("PACKMETER_CONFIG", path),
            ("PACKMETER_LATE_GRACE", "3h"),
            ("PACKMETER_DEDUP_WINDOW", "5h"),
            ("PACKMETER_MAX_EGRESS_BYTES", "2048"),
            ("PACKMETER_FREE_EGRESS_BYTES", "2048"),
            ("PACKMETER_RLS_DOMAIN", "from-env"),
            ("PACKMETER_LOG_FORMAT", "text"),
        ],
    );
    // Flag over variable and file: a duration, a size, a zone.
    assert_eq!(c.meter.late_grace, 2 * HOUR);
    assert_eq!(c.meter.max_egress_bytes, 1024);
    assert_eq!(c.meter.zone.to_string(), "UTC");
    // Variable over file: a duration, a size, text.
    assert_eq!(c.meter.dedup_window, 5 * HOUR);
    assert_eq!(c.meter.plan.egress_bytes, 2048);
    assert_eq!(c.rls.domain.as_deref(), Some("from-env"));
    assert_eq!(c.log_format, packmeter::config::LogFormat::Text);
    // File over default: a duration, a count, text.
    assert_eq!(c.limits.max_export_range, 10 * 24 * HOUR);
    assert_eq!(c.meter.plan.calls, 7);
    assert_eq!(c.rls.account_key, "tenant");
    // Default where nothing is given.
    assert_eq!(c.meter.max_future_skew, 5 * MINUTE);
    assert_eq!(c.max_batch, 10_000);
    assert_eq!(c.meter.plan.months, 12);
    assert_eq!(c.rls.item_key, "item");
    assert_eq!(c.flush_interval, Duration::from_secs(1));

    // The same file named by --config, and no variables: the file's values.
    let c = resolve(&["--store", &store, "--config", path], &[]);
    assert_eq!(c.meter.late_grace, 4 * HOUR);
    assert_eq!(c.meter.dedup_window, 6 * HOUR);
    assert_eq!(c.meter.max_egress_bytes, 4096);
    assert_eq!(c.meter.plan.egress_bytes, 4096);
    assert_eq!(c.meter.zone.to_string(), "+01:00");
    assert_eq!(c.rls.domain.as_deref(), Some("from-file"));
    assert_eq!(c.log_format, packmeter::config::LogFormat::Json);

    // --config over PACKMETER_CONFIG: the flag's file is read, not the
    // variable's (which does not exist).
    let c = resolve(
        &["--store", &store, "--config", path],
        &[("PACKMETER_CONFIG", "/nonexistent/packmeter.toml")],
    );
    assert_eq!(c.meter.plan.calls, 7);

    // Variables alone, without a file.
    let c = resolve(
        &["--store", &store],
        &[
            ("PACKMETER_MAX_BATCH", "50"),
            ("PACKMETER_IDLE_EVICT", "90s"),
            ("PACKMETER_NOOP", "true"),
        ],
    );
    assert_eq!(c.max_batch, 50);
    assert_eq!(c.idle_evict, Duration::from_secs(90));
    assert!(c.noop);
    assert!(!resolve(&["--store", &store], &[]).noop);
}
