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

// === PostgreSQL: many nodes on one database ===

const CI_VALUES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/helm/packmeter/ci");

/// The objects the chart renders for `helm/packmeter/ci/FILE` (as `-f`),
/// through Helm's install action (`helm/lint.py --render`).
fn render(file: &str) -> Option<Vec<Value>> {
    let path = format!("{CI_VALUES}/{file}");
    let out = lint(&["--render", &path])?;
    let objects: Value =
        serde_json::from_str(&stdout_of(&out, &format!("--render {file}"))).expect("JSON");
    Some(objects.as_array().expect("a list of objects").clone())
}

fn of_kind<'a>(objects: &'a [Value], kind: &str) -> Vec<&'a Value> {
    objects.iter().filter(|o| o["kind"] == kind).collect()
}

fn the<'a>(objects: &'a [Value], kind: &str) -> &'a Value {
    let found = of_kind(objects, kind);
    assert_eq!(found.len(), 1, "expected one {kind}: {objects:#?}");
    found[0]
}

fn packmeter_container(workload: &Value) -> &Value {
    workload["spec"]["template"]["spec"]["containers"]
        .as_array()
        .expect("containers")
        .iter()
        .find(|c| c["name"] == "packmeter")
        .expect("a packmeter container")
}

fn env<'a>(container: &'a Value, name: &str) -> &'a Value {
    container["env"]
        .as_array()
        .expect("env")
        .iter()
        .find(|e| e["name"] == name)
        .unwrap_or_else(|| panic!("no env {name} in {container:#}"))
}

/// The URL comes from the Secret `name`/`key`, never as a plain value.
fn assert_store_from_secret(container: &Value, name: &str, key: &str) {
    let store = env(container, "PACKMETER_STORE");
    assert!(
        store.get("value").is_none(),
        "plain PACKMETER_STORE: {store}"
    );
    let r = &store["valueFrom"]["secretKeyRef"];
    assert_eq!(
        (r["name"].as_str(), r["key"].as_str()),
        (Some(name), Some(key)),
        "{store}"
    );
}

/// `XDG_DATA_HOME` (where the spill file goes) is a writable volume mount
/// in a container whose root filesystem is read-only; returns the volume.
fn spill_volume(workload: &Value) -> &Value {
    let c = packmeter_container(workload);
    assert_eq!(c["securityContext"]["readOnlyRootFilesystem"], true);
    let dir = env(c, "XDG_DATA_HOME")["value"]
        .as_str()
        .expect("XDG_DATA_HOME has a value");
    let mount = c["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["mountPath"] == dir)
        .unwrap_or_else(|| panic!("XDG_DATA_HOME {dir} is no volume mount: {c:#}"));
    assert_ne!(mount["readOnly"], true, "{mount}");
    workload["spec"]["template"]["spec"]["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == mount["name"])
        .unwrap_or_else(|| panic!("no volume {}", mount["name"]))
}

fn toml_of(objects: &[Value]) -> toml::Table {
    let cm = the(objects, "ConfigMap");
    cm["data"]["packmeter.toml"]
        .as_str()
        .expect("packmeter.toml")
        .parse()
        .expect("valid TOML")
}

#[test]
fn postgres_deployment_runs_three_replicas_on_the_url_from_an_existing_secret() {
    let Some(objects) = render("postgres-values.yaml") else {
        return;
    };
    assert!(of_kind(&objects, "DaemonSet").is_empty());
    let d = the(&objects, "Deployment");
    assert_eq!(d["spec"]["replicas"], 3);
    // Rolling updates never take a replica away before its successor is up.
    assert_eq!(d["spec"]["strategy"]["type"], "RollingUpdate");
    assert_eq!(d["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"], 0);
    assert_store_from_secret(packmeter_container(d), "packmeter-postgres", "database-url");
    // The store needs no claim; each pod gets scratch space for its spill file.
    assert!(of_kind(&objects, "PersistentVolumeClaim").is_empty());
    assert!(
        of_kind(&objects, "Secret").is_empty(),
        "the Secret exists already"
    );
    assert!(
        spill_volume(d).get("emptyDir").is_some(),
        "{}",
        spill_volume(d)
    );
    assert!(
        !toml_of(&objects).contains_key("store"),
        "the URL is in env only"
    );
}

#[test]
fn postgres_daemonset_shares_one_database_and_keeps_spill_files_on_the_node() {
    let Some(objects) = render("postgres-daemonset-values.yaml") else {
        return;
    };
    assert!(of_kind(&objects, "Deployment").is_empty());
    assert!(of_kind(&objects, "PersistentVolumeClaim").is_empty());
    assert!(of_kind(&objects, "Secret").is_empty());
    let ds = the(&objects, "DaemonSet");
    assert_store_from_secret(packmeter_container(ds), "packmeter-postgres", "url");
    // hostPath: a spill file outlives the pod, and the node's next pod
    // (never two at once: no surge) replays it.
    let vol = spill_volume(ds);
    assert!(vol.get("hostPath").is_some(), "{vol}");
    let surge = &ds["spec"]["updateStrategy"]["rollingUpdate"]["maxSurge"];
    assert!(surge.is_null() || *surge == 0, "maxSurge {surge}");
    let init = &ds["spec"]["template"]["spec"]["initContainers"];
    assert!(
        init.as_array()
            .is_some_and(|i| i.iter().any(|c| c["name"] == "data-permissions")),
        "hostPath needs the chown init container: {init}"
    );
    let svc = the(&objects, "Service");
    assert_eq!(svc["spec"]["internalTrafficPolicy"], "Local");
}

#[test]
fn a_chart_created_secret_holds_the_url_and_nothing_else_shows_it() {
    let Some(objects) = render("postgres-created-secret-values.yaml") else {
        return;
    };
    // store.postgres.url in that file, and its password.
    const URL: &str =
        "postgres://packmeter:s3cret@postgres.billing.svc:5432/packmeter?sslmode=require";
    const PASSWORD: &str = "s3cret";
    let file = std::fs::read_to_string(format!("{CI_VALUES}/postgres-created-secret-values.yaml"))
        .unwrap();
    assert!(file.contains(&format!("url: {URL}")), "{file}");
    let secret = the(&objects, "Secret");
    let name = secret["metadata"]["name"].as_str().unwrap();
    assert_eq!(secret["data"]["url"], base64(URL.as_bytes()));
    let ds = the(&objects, "DaemonSet");
    assert_store_from_secret(packmeter_container(ds), name, "url");
    assert!(spill_volume(ds).get("emptyDir").is_some());
    // The password is in the Secret only (base64 there), nowhere else.
    for o in objects.iter().filter(|o| o["kind"] != "Secret") {
        let text = o.to_string();
        assert!(
            !text.contains(PASSWORD),
            "password in {}: {text}",
            o["kind"]
        );
    }
}

/// Standard base64 with padding, as Kubernetes stores Secret data.
fn base64(bytes: &[u8]) -> String {
    const ABC: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, b)| n | u32::from(*b) << (16 - 8 * i));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ABC[(n >> (18 - 6 * i)) as usize & 63]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// A `packmeter serve` started the way the chart's pod starts it: the
/// rendered packmeter.toml, the rendered env (the Secret's URL for
/// `PACKMETER_STORE`; `XDG_DATA_HOME` inside `root`, standing for the pod's
/// filesystem), and no other environment (no HOME to fall back on).
#[cfg(feature = "postgres")]
struct Pod {
    child: std::process::Child,
    grpc: String,
    stderr: Option<std::thread::JoinHandle<String>>,
}

#[cfg(feature = "postgres")]
impl Pod {
    fn start(objects: &[Value], root: &std::path::Path, store_url: &str) -> Pod {
        use std::io::{BufRead, BufReader, Read};
        use std::process::Stdio;
        let toml = the(objects, "ConfigMap")["data"]["packmeter.toml"]
            .as_str()
            .unwrap()
            .to_string();
        let config = root.join("etc/packmeter/packmeter.toml");
        std::fs::create_dir_all(config.parent().unwrap()).unwrap();
        std::fs::write(&config, toml).unwrap();
        let mut cmd = Command::new(common::BIN);
        // The image's working directory is the read-only root.
        cmd.env_clear().current_dir(root);
        let workload = the(objects, "Deployment");
        for e in packmeter_container(workload)["env"].as_array().unwrap() {
            let name = e["name"].as_str().unwrap();
            let value = if e["valueFrom"]["secretKeyRef"].is_object() {
                store_url.to_string()
            } else if name == "XDG_DATA_HOME" {
                let v = e["value"].as_str().unwrap();
                root.join(v.trim_start_matches('/')).display().to_string()
            } else {
                e["value"].as_str().unwrap().to_string()
            };
            cmd.env(name, value);
        }
        let mut child = cmd
            .arg("serve")
            .arg("--config")
            .arg(&config)
            // Loopback instead of the pod IP, and a short grace for the test.
            .args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
            .args(["--shutdown-grace", "3s"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn packmeter");
        let mut stderr = child.stderr.take().unwrap();
        let stderr = std::thread::spawn(move || {
            let mut all = String::new();
            let _ = stderr.read_to_string(&mut all);
            all
        });
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let Some(grpc) = line
            .split_whitespace()
            .find_map(|p| p.strip_prefix("grpc="))
        else {
            let _ = child.kill();
            panic!("serve did not start: {line:?}\n{}", stderr.join().unwrap());
        };
        Pod {
            grpc: grpc.to_string(),
            child,
            stderr: Some(stderr),
        }
    }

    async fn deduct(&self, account: &str, calls: u64) {
        let mut meter = packmeter::grpc::proto::meter_client::MeterClient::connect(format!(
            "http://{}",
            self.grpc
        ))
        .await
        .unwrap();
        let r = meter
            .deduct(common::deduct(account, calls, 0, None))
            .await
            .expect("Deduct")
            .into_inner();
        assert_eq!(
            r.decision,
            packmeter::grpc::proto::Decision::Allow as i32,
            "{r:?}"
        );
    }

    /// SIGTERM, as the kubelet sends after preStop.
    fn terminate(mut self) -> (std::process::ExitStatus, String) {
        let ok = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok);
        let status = self.child.wait().unwrap();
        (status, self.stderr.take().unwrap().join().unwrap())
    }
}

#[cfg(feature = "postgres")]
impl Drop for Pod {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The chart's postgres pod, run for real on PostgreSQL: the store URL from
/// the Secret's env var, the TOML without a store. When the database refuses
/// the final flush, the usage is spilled into the data volume the chart
/// mounts (not the read-only root), and the next start replays it.
#[cfg(feature = "postgres")]
#[tokio::test]
async fn the_chart_pod_serves_on_postgres_and_spills_into_its_data_volume() {
    let Some(objects) = render("postgres-values.yaml") else {
        return;
    };
    let Some(db) = common::pg::TestDb::create().await else {
        return;
    };
    let root = tempfile::tempdir().unwrap();
    let calls_of = |account: &'static str| {
        let db = &db;
        async move {
            let row = db
                .client()
                .await
                .query_one(
                    "SELECT COALESCE(SUM(amount), 0)::BIGINT FROM usage_hourly \
                     WHERE account_id = $1 AND item = 1",
                    &[&account],
                )
                .await
                .unwrap();
            row.get::<_, i64>(0)
        }
    };

    let pod = Pod::start(&objects, root.path(), &db.url);
    pod.deduct("acme", 5).await;
    // The database now refuses every flush (the table is gone) ...
    db.execute("ALTER TABLE usage_hourly RENAME TO usage_hourly_away")
        .await;
    pod.deduct("acme", 7).await;
    let (status, stderr) = pod.terminate();
    assert_eq!(status.code(), Some(1), "{stderr}");

    // ... so shutdown wrote the spill file under the chart's data volume.
    let workload = the(&objects, "Deployment");
    let data = env(packmeter_container(workload), "XDG_DATA_HOME")["value"]
        .as_str()
        .unwrap()
        .trim_start_matches('/')
        .to_string();
    let dir = root.path().join(&data).join("packmeter");
    let spilled: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("no spill dir {}: {e}\n{stderr}", dir.display()))
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert!(
        spilled.len() == 1 && spilled[0].ends_with(".unflushed"),
        "{spilled:?}\n{stderr}"
    );

    // The pod comes back (same volume): the replay books what was spilled.
    db.execute("ALTER TABLE usage_hourly_away RENAME TO usage_hourly")
        .await;
    let pod = Pod::start(&objects, root.path(), &db.url);
    let (status, stderr) = pod.terminate();
    assert!(status.success(), "{stderr}");
    assert_eq!(calls_of("acme").await, 12, "{stderr}");
}

/// `tls.existingSecret` with `tls.clientAuth`: the Secret's directory is
/// mounted whole (a renewal reaches the pod), the TOML points at its
/// `tls.crt`, `tls.key` and `ca.crt`, the probes are HTTP; and the real
/// binary, given that TOML over files laid out as the kubelet mounts the
/// Secret, serves TLS to a client with a certificate and refuses one without.
#[tokio::test]
async fn the_chart_serves_tls_from_a_cert_manager_secret() {
    use common::pki::Ca;
    use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};
    let Some(objects) = render("tls-values.yaml") else {
        return;
    };
    let d = the(&objects, "Deployment");
    let c = packmeter_container(d);
    let mount = c["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == "packmeter-tls")
        .expect("the TLS Secret is mounted");
    assert_eq!(mount["readOnly"], true);
    assert!(mount.get("subPath").is_none(), "{mount}");
    let dir_in_pod = mount["mountPath"].as_str().unwrap();
    for probe in ["livenessProbe", "readinessProbe", "startupProbe"] {
        assert!(c[probe].get("httpGet").is_some(), "{probe}: {}", c[probe]);
    }
    let volume = d["spec"]["template"]["spec"]["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "packmeter-tls")
        .expect("the TLS volume");
    assert_eq!(volume["secret"]["secretName"], "packmeter-grpc-tls");
    let toml = toml_of(&objects);
    let key = |k: &str| toml[k].as_str().unwrap().to_string();
    assert_eq!(key("tls_cert_file"), format!("{dir_in_pod}/tls.crt"));
    assert_eq!(key("tls_key_file"), format!("{dir_in_pod}/tls.key"));
    assert_eq!(key("tls_client_ca_file"), format!("{dir_in_pod}/ca.crt"));

    // The Secret as the kubelet lays it out, at a path of our own.
    let ca = Ca::new("cluster issuer");
    let leaf = ca.leaf("packmeter");
    let gateway = ca.leaf("gateway");
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("tls");
    std::fs::create_dir(&secret).unwrap();
    std::fs::write(secret.join("tls.crt"), &leaf.cert).unwrap();
    std::fs::write(secret.join("tls.key"), &leaf.key).unwrap();
    std::fs::write(secret.join("ca.crt"), &ca.pem).unwrap();
    let mut toml = toml.clone();
    for k in ["tls_cert_file", "tls_key_file", "tls_client_ca_file"] {
        let moved = key(k).replace(dir_in_pod, secret.to_str().unwrap());
        toml.insert(k.into(), moved.into());
    }
    // The admin token Secret is another test's matter.
    toml.remove("admin_token_file");
    let file = dir.path().join("packmeter.toml");
    std::fs::write(&file, toml.to_string()).unwrap();
    let server = Server::start(dir.path(), &["--config", file.to_str().unwrap()]);
    let channel = |id: Option<Identity>| {
        let mut tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&ca.pem))
            .domain_name("localhost");
        if let Some(id) = id {
            tls = tls.identity(id);
        }
        let url = format!("https://{}", server.grpc);
        async move {
            let channel = Endpoint::from_shared(url)
                .unwrap()
                .tls_config(tls)
                .unwrap()
                .connect()
                .await
                .map_err(|e| e.to_string())?;
            packmeter::grpc::proto::meter_client::MeterClient::new(channel)
                .deduct(common::deduct("acme", 1, 0, None))
                .await
                .map(|_| ())
                .map_err(|s| s.to_string())
        }
    };
    channel(Some(Identity::from_pem(&gateway.cert, &gateway.key)))
        .await
        .expect("a gateway with a certificate from the issuer is served");
    assert!(
        channel(None).await.is_err(),
        "a client without a certificate was served"
    );
    let (status, stderr) = server.terminate();
    assert!(status.success(), "{status:?}\n{stderr}");
}
