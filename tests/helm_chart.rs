//! The Helm chart agrees with the binary: ports, probes, the shutdown grace
//! and the packmeter.toml it renders (`helm/lint.py --print-defaults` and
//! `--print-default-toml`), and Helm's own linter and a real render accept
//! the chart (`helm/lint.py`).
//!
//! Outside CI a missing python3, PyYAML or helm-sdkpy skips a test loudly;
//! under CI=true it fails it.

mod common;

use std::{
    net::SocketAddr,
    process::{Command, Output},
    time::Duration,
};

use common::Server;
use packmeter::config::{
    Config, LogFormat, ServeArgs, DEFAULT_ADMIN_LISTEN, DEFAULT_LISTEN, DEFAULT_SHUTDOWN_GRACE,
};
use serde_json::Value;

const LINT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/helm/lint.py");
/// lint.py's exit status when PyYAML or helm-sdkpy is missing.
const UNAVAILABLE: i32 = 2;
const INSTALL: &str = "pip install --ignore-requires-python helm-sdkpy pyyaml";

/// Runs `python3 helm/lint.py ARGS`; `None` (skip) when python3 or the
/// Python packages are missing outside CI.
fn lint(args: &[&str]) -> Option<Output> {
    let python = common::tool("python3", "apt-get install -y python3")?;
    let out = Command::new(python)
        .arg(LINT)
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("run helm/lint.py");
    if out.status.code() == Some(UNAVAILABLE) {
        let why = String::from_utf8_lossy(&out.stderr);
        assert!(
            !common::required(),
            "helm/lint.py {args:?} needs packages under CI=true ({INSTALL}): {why}"
        );
        eprintln!(
            "SKIPPED: helm/lint.py {args:?}: {why} ({INSTALL}); set CI=true to make this a failure"
        );
        return None;
    }
    Some(out)
}

fn stdout_of(out: &Output, what: &str) -> String {
    assert!(
        out.status.success(),
        "{what} failed: {:?}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout.clone()).expect("UTF-8 output")
}

fn port(addr: &str) -> u64 {
    u64::from(addr.parse::<SocketAddr>().expect("a socket address").port())
}

fn int(v: &Value, key: &str) -> u64 {
    v[key]
        .as_u64()
        .unwrap_or_else(|| panic!("{key} is not a number in {v}"))
}

#[test]
fn chart_defaults_agree_with_the_binary() {
    let Some(out) = lint(&["--print-defaults"]) else {
        return;
    };
    let d: Value = serde_json::from_str(&stdout_of(&out, "--print-defaults")).expect("JSON");

    let grpc_port = port(DEFAULT_LISTEN);
    let admin_port = port(DEFAULT_ADMIN_LISTEN);
    assert_eq!(int(&d, "grpc_port"), grpc_port, "{d}");
    assert_eq!(int(&d, "admin_port"), admin_port, "{d}");
    assert_eq!(port(d["listen"].as_str().unwrap()), grpc_port);
    assert_eq!(port(d["admin_listen"].as_str().unwrap()), admin_port);

    // Probes reach what the binary serves: grpc.health.v1 on the gRPC port
    // (the whole server for liveness, the Meter service for readiness), or
    // /livez and /readyz on the admin port.
    for (kind, path, service) in [
        ("liveness", "/livez", ""),
        ("readiness", "/readyz", "packmeter.v1.Meter"),
    ] {
        let p = &d[kind];
        assert_eq!(p["enabled"], Value::Bool(true), "{kind}: {p}");
        assert_eq!(int(p, "grpc_port"), grpc_port, "{kind}: {p}");
        assert_eq!(int(p, "http_port"), admin_port, "{kind}: {p}");
        assert_eq!(p["http_path"], path, "{kind}: {p}");
        assert_eq!(p["grpc_service"], service, "{kind}: {p}");
        assert!(
            p["type"] == "grpc" || p["type"] == "http",
            "{kind}: probe type {}",
            p["type"]
        );
    }

    let grace = int(&d, "shutdown_grace_seconds");
    assert_eq!(Duration::from_secs(grace), DEFAULT_SHUTDOWN_GRACE);
    assert_eq!(
        humantime::parse_duration(d["shutdown_grace"].as_str().unwrap()).unwrap(),
        DEFAULT_SHUTDOWN_GRACE
    );
    // Kubernetes counts the grace period from the start of preStop, so it
    // must cover the preStop sleep plus packmeter's own drain and flush.
    let prestop = int(&d, "prestop_sleep_seconds");
    let period = int(&d, "termination_grace_period_seconds");
    assert!(
        period > prestop + grace,
        "terminationGracePeriodSeconds {period} <= preStop {prestop} + shutdown grace {grace}"
    );
    assert_eq!(
        d["args"],
        serde_json::json!(["serve", "--config", d["config_path"]])
    );
}

#[tokio::test]
async fn the_binary_accepts_the_packmeter_toml_the_chart_renders() {
    let Some(out) = lint(&["--print-default-toml"]) else {
        return;
    };
    let toml = stdout_of(&out, "--print-default-toml");
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("packmeter.toml");
    std::fs::write(&file, &toml).unwrap();

    // The config parser, in process ...
    let c = Config::resolve(&ServeArgs {
        config: Some(file.clone()),
        ..Default::default()
    })
    .unwrap_or_else(|e| panic!("the chart's packmeter.toml is refused: {e}\n{toml}"));
    assert_eq!(u64::from(c.listen.port()), port(DEFAULT_LISTEN));
    assert_eq!(u64::from(c.admin_listen.port()), port(DEFAULT_ADMIN_LISTEN));
    assert!(
        c.listen.ip().is_unspecified(),
        "pods are probed on their IP: {}",
        c.listen
    );
    assert_eq!(c.shutdown_grace, DEFAULT_SHUTDOWN_GRACE);
    assert_eq!(c.log_format, LogFormat::Json);
    assert!(
        c.store
            .to_string()
            .starts_with("sqlite:///var/lib/packmeter/"),
        "{}",
        c.store
    );

    // ... and the real binary, which starts on it (flags override the
    // addresses and the store, so it binds loopback and a temp file).
    let server = Server::start(dir.path(), &["--config", file.to_str().unwrap()]);
    // One round trip first: it shows the server works on this config, and
    // gives it time to install its SIGTERM handler, which `serve` does only
    // after printing the listening line (a SIGTERM before that kills it).
    server
        .admin()
        .await
        .flush(packmeter::grpc::proto::FlushRequest {})
        .await
        .expect("Admin.Flush on the chart's config");
    let (status, stderr) = server.terminate();
    assert!(status.success(), "{status:?}\n{stderr}");
    // The chart's log_format = "json" took effect.
    assert!(
        stderr.lines().any(|l| l.starts_with('{')),
        "expected JSON logs:\n{stderr}"
    );
}

/// Helm's own linter and a real install render, for the defaults and every
/// `helm/packmeter/ci/*-values.yaml`. Takes about 10 s.
#[test]
fn helm_lint_and_render_pass() {
    let Some(out) = lint(&[]) else {
        return;
    };
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "helm/lint.py failed: {:?}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.lines().any(|l| l.ends_with(" passed, 0 failed")),
        "{stdout}"
    );
    assert!(!stdout.contains("FAIL"), "{stdout}");
}
