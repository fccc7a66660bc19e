//! Issue 13 through the real binary: who may call the admin interfaces, and
//! the limits on what one caller can ask.

mod common;

use std::{path::Path, process::Command, time::Duration};

use common::{deduct, get, get_with, sample, ts, until, Server, BIN};
use envoy_types::pb::envoy::{
    extensions::common::ratelimit::v3::{rate_limit_descriptor::Entry, RateLimitDescriptor},
    service::ratelimit::v3::{rate_limit_service_client::RateLimitServiceClient, RateLimitRequest},
};
use packmeter::grpc::proto::{self, admin_client::AdminClient, meter_client::MeterClient};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::{
    metadata::AsciiMetadataValue, service::interceptor::InterceptedService, transport::Channel,
    Code, Status,
};

type Admin = AdminClient<InterceptedService<Channel, Auth>>;

/// Sends the given `authorization` value, if any.
#[derive(Clone)]
struct Auth(Option<AsciiMetadataValue>);

impl tonic::service::Interceptor for Auth {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

async fn admin_as(server: &Server, authorization: Option<&str>) -> Admin {
    let auth = Auth(authorization.map(|a| a.parse().unwrap()));
    AdminClient::with_interceptor(server.channel().await, auth)
}

fn write_tokens(path: &Path, text: &str) {
    // As a Secret volume or an editor does it: a new file moved into place.
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// Each Admin RPC once, with its status code (OK or the refusal).
async fn every_admin_rpc(a: &mut Admin) -> Vec<(&'static str, Code)> {
    let code = |r: Result<Code, Status>| r.unwrap_or_else(|s| s.code());
    let mut out = Vec::new();
    let put = a
        .put_account(proto::PutAccountRequest {
            account: Some(proto::Account {
                account_id: "acme".into(),
                ..Default::default()
            }),
            update_mask: None,
        })
        .await
        .map(|_| Code::Ok);
    out.push(("PutAccount", code(put)));
    let get = a
        .get_account(proto::GetAccountRequest {
            account_id: "acme".into(),
        })
        .await
        .map(|_| Code::Ok);
    out.push(("GetAccount", code(get)));
    let grant = a
        .grant_pack(proto::GrantPackRequest {
            account_id: "acme".into(),
            pack_id: "p1".into(),
            item: proto::Item::Calls as i32,
            capacity: 1_000_000_000,
            valid_from: Some(ts("2026-01-01T00:00:00Z")),
            valid_until: Some(ts("2027-01-01T00:00:00Z")),
            ..Default::default()
        })
        .await
        .map(|_| Code::Ok);
    out.push(("GrantPack", code(grant)));
    let list = a
        .list_packs(proto::ListPacksRequest {
            account_id: "acme".into(),
        })
        .await
        .map(|_| Code::Ok);
    out.push(("ListPacks", code(list)));
    let flush = a.flush(proto::FlushRequest {}).await.map(|_| Code::Ok);
    out.push(("Flush", code(flush)));
    let export = match a
        .export_usage(proto::ExportUsageRequest {
            from: Some(ts("2026-01-01T00:00:00Z")),
            to: Some(ts("2026-01-02T00:00:00Z")),
            account_id: String::new(),
        })
        .await
    {
        // The stream's own end says whether it was refused.
        Ok(r) => {
            let mut rows = r.into_inner();
            loop {
                match rows.message().await {
                    Ok(Some(_)) => continue,
                    Ok(None) => break Code::Ok,
                    Err(s) => break s.code(),
                }
            }
        }
        Err(s) => s.code(),
    };
    out.push(("ExportUsage", export));
    let daily = a
        .get_daily_usage(proto::GetDailyUsageRequest {
            account_id: "acme".into(),
            days: 7,
        })
        .await
        .map(|_| Code::Ok);
    out.push(("GetDailyUsage", code(daily)));
    out
}

const RPCS: [&str; 7] = [
    "PutAccount",
    "GetAccount",
    "GrantPack",
    "ListPacks",
    "Flush",
    "ExportUsage",
    "GetDailyUsage",
];

fn all(code: Code) -> Vec<(&'static str, Code)> {
    RPCS.iter().map(|r| (*r, code)).collect()
}

async fn rls_allows(server: &Server) {
    let mut rls = RateLimitServiceClient::new(server.channel().await);
    let r = rls
        .should_rate_limit(RateLimitRequest {
            domain: "edge".into(),
            descriptors: vec![RateLimitDescriptor {
                entries: vec![Entry {
                    key: "account".into(),
                    value: "gateway-user".into(),
                }],
                ..Default::default()
            }],
            hits_addend: 1,
        })
        .await
        .expect("ShouldRateLimit needs no token");
    assert_eq!(r.into_inner().overall_code, 1, "OK");
}

#[tokio::test]
async fn with_a_token_file_every_admin_rpc_needs_the_token_and_meter_and_rls_stay_open() {
    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("admin-tokens");
    write_tokens(&tokens, "# rotated monthly\n\nold-Token-1\nright-Token-2\n");
    let server = Server::start(
        dir.path(),
        &["--admin-token-file", tokens.to_str().unwrap()],
    );

    let mut none = admin_as(&server, None).await;
    assert_eq!(every_admin_rpc(&mut none).await, all(Code::Unauthenticated));
    let mut wrong = admin_as(&server, Some("Bearer wrong-Token-3")).await;
    assert_eq!(
        every_admin_rpc(&mut wrong).await,
        all(Code::Unauthenticated)
    );
    let mut malformed = admin_as(&server, Some("right-Token-2")).await;
    let refused = malformed.flush(proto::FlushRequest {}).await.unwrap_err();
    assert_eq!(refused.code(), Code::Unauthenticated);
    assert!(refused.message().contains("Bearer <token>"), "{refused:?}");
    // Nothing was changed by the refused calls.
    let mut right = admin_as(&server, Some("Bearer right-Token-2")).await;
    let missing = right
        .get_account(proto::GetAccountRequest {
            account_id: "acme".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Code::NotFound, "{missing:?}");
    assert_eq!(every_admin_rpc(&mut right).await, all(Code::Ok));
    // Either token of the file works.
    let mut old = admin_as(&server, Some("bearer old-Token-1")).await;
    old.flush(proto::FlushRequest {})
        .await
        .expect("the first token works too");

    // The gateway's calls need none.
    let mut meter = MeterClient::new(server.channel().await);
    meter
        .deduct(deduct("acme", 1, 0, None))
        .await
        .expect("Meter.Deduct needs no token");
    rls_allows(&server).await;
    let mut health = tonic_health::pb::health_client::HealthClient::new(server.channel().await);
    health
        .check(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await
        .expect("health needs no token");

    // Counted by reason, on the open /metrics.
    let metrics = get(&server.admin, "/metrics").await.body;
    let failures = |reason: &str| {
        sample(
            &metrics,
            &format!(
                "packmeter_admin_auth_failures_total{{interface=\"grpc\",reason=\"{reason}\"}}"
            ),
        )
    };
    assert_eq!(failures("missing"), RPCS.len() as f64);
    assert_eq!(failures("wrong"), RPCS.len() as f64);
    assert_eq!(failures("malformed"), 1.0);

    // No token, right or wrong, reaches the log.
    let (status, log) = server.terminate();
    assert!(status.success(), "{log}");
    for secret in ["right-Token-2", "old-Token-1", "wrong-Token-3"] {
        assert!(!log.contains(secret), "{secret} logged:\n{log}");
    }
}

#[tokio::test]
async fn a_rotated_token_file_is_picked_up_without_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("admin-tokens");
    write_tokens(&tokens, "first-token\n");
    let server = Server::start(
        dir.path(),
        &["--admin-token-file", tokens.to_str().unwrap()],
    );
    let mut first = admin_as(&server, Some("Bearer first-token")).await;
    let mut second = admin_as(&server, Some("Bearer second-token")).await;
    first
        .flush(proto::FlushRequest {})
        .await
        .expect("first token");
    assert_eq!(
        second
            .flush(proto::FlushRequest {})
            .await
            .unwrap_err()
            .code(),
        Code::Unauthenticated
    );

    write_tokens(&tokens, "second-token\n");
    until(Duration::from_secs(10), async || {
        second.flush(proto::FlushRequest {}).await.is_ok()
    })
    .await;
    assert_eq!(
        first
            .flush(proto::FlushRequest {})
            .await
            .unwrap_err()
            .code(),
        Code::Unauthenticated,
        "the rotated-out token is refused"
    );

    // A rotation that leaves the file empty keeps the tokens read before,
    // rather than locking everyone out (or letting everyone in).
    write_tokens(&tokens, "# emptied by mistake\n");
    let reload_errors = async || {
        let metrics = get(&server.admin, "/metrics").await.body;
        metrics
            .lines()
            .any(|l| l == "packmeter_admin_token_reloads_total{result=\"error\"} 1")
    };
    until(Duration::from_secs(10), async || {
        // Each admin call may look at the file again (at most once a second).
        second
            .flush(proto::FlushRequest {})
            .await
            .expect("the last good tokens still work");
        reload_errors().await
    })
    .await;
    second
        .flush(proto::FlushRequest {})
        .await
        .expect("the last good tokens still work");
    let mut wrong = admin_as(&server, Some("Bearer nobody")).await;
    assert_eq!(
        wrong
            .flush(proto::FlushRequest {})
            .await
            .unwrap_err()
            .code(),
        Code::Unauthenticated
    );
}

#[tokio::test]
async fn the_cli_sends_the_token_from_a_file_or_the_environment() {
    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("admin-tokens");
    write_tokens(&tokens, "cli-token\n");
    let server = Server::start(
        dir.path(),
        &["--admin-token-file", tokens.to_str().unwrap()],
    );
    let run = |extra: &[&str], env: Option<&str>| {
        let mut c = Command::new(BIN);
        c.args(["flush", "--server", &server.url()])
            .args(extra)
            .env_remove("PACKMETER_ADMIN_TOKEN")
            .env_remove("PACKMETER_TOKEN_FILE");
        if let Some(t) = env {
            c.env("PACKMETER_ADMIN_TOKEN", t);
        }
        c.output().unwrap()
    };
    let refused = run(&[], None);
    assert_eq!(refused.status.code(), Some(77), "{refused:?}");
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("--token-file"), "{stderr}");
    let wrong = run(&[], Some("not-it"));
    assert_eq!(wrong.status.code(), Some(77), "{wrong:?}");
    let by_file = run(&["--token-file", tokens.to_str().unwrap()], None);
    assert!(by_file.status.success(), "{by_file:?}");
    let by_env = run(&[], Some("cli-token"));
    assert!(by_env.status.success(), "{by_env:?}");
}

#[tokio::test]
async fn the_pack_page_needs_the_token_and_the_probes_do_not() {
    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("admin-tokens");
    write_tokens(&tokens, "page-token\n");
    let server = Server::start(
        dir.path(),
        &["--admin-token-file", tokens.to_str().unwrap()],
    );
    for path in ["/", "/packs?account=acme"] {
        let r = get(&server.admin, path).await;
        assert_eq!(r.status, 401, "{path}");
        assert!(r.header("www-authenticate").starts_with("Bearer"), "{path}");
        assert!(r.body.contains("Authorization: Bearer"), "{}", r.body);
        assert!(!r.body.contains("acme"), "{}", r.body);
        let r = get_with(&server.admin, path, &[("Authorization", "Bearer wrong")]).await;
        assert_eq!(r.status, 401, "{path}");
        assert!(r.body.contains("not one of them"), "{}", r.body);
    }
    let auth = [("Authorization", "Bearer page-token")];
    assert_eq!(get_with(&server.admin, "/", &auth).await.status, 200);
    // An account nobody created: the page's own answer, past the gate.
    let r = get_with(&server.admin, "/packs?account=acme", &auth).await;
    assert_eq!(r.status, 404, "{}", r.body);
    admin_as(&server, Some("Bearer page-token"))
        .await
        .put_account(proto::PutAccountRequest {
            account: Some(proto::Account {
                account_id: "acme".into(),
                ..Default::default()
            }),
            update_mask: None,
        })
        .await
        .expect("PutAccount with the token");
    let r = get_with(&server.admin, "/packs?account=acme", &auth).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(r.body.contains("acme"));
    for path in ["/metrics", "/livez", "/readyz"] {
        assert_eq!(get(&server.admin, path).await.status, 200, "{path}");
    }
    let metrics = get(&server.admin, "/metrics").await.body;
    assert_eq!(
        sample(
            &metrics,
            "packmeter_admin_auth_failures_total{interface=\"http\",reason=\"missing\"}"
        ),
        2.0
    );
}

/// A local address that is not loopback (the machine's own, e.g. eth0's),
/// so that a connection to it comes from a non-loopback peer.
fn non_loopback_address() -> Option<String> {
    let out = Command::new("hostname").arg("-I").output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    text.split_whitespace()
        .filter_map(|a| a.parse::<std::net::Ipv4Addr>().ok())
        .find(|a| !a.is_loopback())
        .filter(|a| std::net::TcpListener::bind((*a, 0)).is_ok())
        .map(|a| a.to_string())
}

#[tokio::test]
async fn without_a_token_file_a_non_loopback_peer_is_refused() {
    let Some(host) = non_loopback_address() else {
        assert!(
            !common::required(),
            "a non-loopback local IPv4 address is required under CI=true (hostname -I)"
        );
        eprintln!(
            "SKIPPED: this machine has no non-loopback IPv4 address to bind (hostname -I); \
             set CI=true to make this a failure"
        );
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start_host(dir.path(), &host, &[]);
    assert!(server.grpc.starts_with(&host), "{}", server.grpc);

    let mut admin = admin_as(&server, None).await;
    let codes = every_admin_rpc(&mut admin).await;
    assert_eq!(codes, all(Code::Unauthenticated));
    let refused = admin.flush(proto::FlushRequest {}).await.unwrap_err();
    assert!(
        refused.message().contains("--admin-token-file"),
        "{refused:?}"
    );
    // A token does not open the loopback-only mode.
    let mut with_token = admin_as(&server, Some("Bearer anything")).await;
    assert_eq!(
        with_token
            .flush(proto::FlushRequest {})
            .await
            .unwrap_err()
            .code(),
        Code::Unauthenticated
    );
    // The gateway's calls are served.
    MeterClient::new(server.channel().await)
        .deduct(deduct("acme", 1, 0, None))
        .await
        .expect("Meter is open");
    rls_allows(&server).await;
    // The pack page is refused, the probes served.
    let r = get(&server.admin, "/packs?account=acme").await;
    assert_eq!(r.status, 403);
    assert!(r.body.contains("--admin-token-file"), "{}", r.body);
    assert_eq!(get(&server.admin, "/").await.status, 403);
    for path in ["/metrics", "/livez", "/readyz"] {
        assert_eq!(get(&server.admin, path).await.status, 200, "{path}");
    }
    let metrics = get(&server.admin, "/metrics").await.body;
    assert_eq!(
        sample(
            &metrics,
            "packmeter_admin_auth_failures_total{interface=\"grpc\",reason=\"not_loopback\"}"
        ),
        // Every admin RPC, then the two Flush calls.
        (RPCS.len() + 2) as f64
    );
}

#[tokio::test]
async fn without_a_token_file_loopback_peers_are_served_as_before() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &[]);
    let mut admin = admin_as(&server, None).await;
    assert_eq!(every_admin_rpc(&mut admin).await, all(Code::Ok));
    assert_eq!(get(&server.admin, "/").await.status, 200);
}

#[tokio::test]
async fn an_empty_token_file_stops_the_server_with_exit_64_naming_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("admin-tokens");
    std::fs::write(&tokens, "# no token yet\n\n").unwrap();
    let out = Command::new(BIN)
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
        ])
        .arg("--store")
        .arg(format!("sqlite://{}", dir.path().join("pm.db").display()))
        .args(["--admin-token-file", tokens.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("admin_token_file"), "{stderr}");
}

// === limits ===

#[tokio::test]
async fn a_message_over_the_limit_gets_out_of_range_and_the_connection_stays_usable() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &["--max-message-bytes", "2048"]);
    let mut meter = MeterClient::new(server.channel().await);
    let mut big = deduct("acme", 1, 0, None);
    big.request_id = "r".repeat(4096);
    let s = meter.deduct(big).await.unwrap_err();
    assert_eq!(s.code(), Code::OutOfRange, "{s:?}");
    assert!(s.message().contains("2048"), "{s:?}");
    // Same channel, next call: not a reset connection.
    meter
        .deduct(deduct("acme", 1, 0, None))
        .await
        .expect("the connection is still usable");
}

#[tokio::test]
async fn a_batch_over_max_batch_is_invalid_argument_naming_the_flag() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &["--max-batch", "3"]);
    let mut meter = MeterClient::new(server.channel().await);
    let s = meter
        .deduct_batch(proto::DeductBatchRequest {
            deductions: (0..4).map(|_| deduct("acme", 1, 0, None)).collect(),
        })
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::InvalidArgument, "{s:?}");
    assert!(s.message().contains("--max-batch"), "{s:?}");
    // Nothing was deducted: the account was never even created.
    let s = server
        .admin()
        .await
        .get_account(proto::GetAccountRequest {
            account_id: "acme".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::NotFound);
    meter
        .deduct_batch(proto::DeductBatchRequest {
            deductions: (0..3).map(|_| deduct("acme", 1, 0, None)).collect(),
        })
        .await
        .expect("at the limit");
}

#[tokio::test]
async fn an_export_range_over_the_limit_is_invalid_argument_naming_the_flag() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &["--max-export-range", "2d"]);
    let mut admin = server.admin().await;
    let export = |from: &str, to: &str| proto::ExportUsageRequest {
        from: Some(ts(from)),
        to: Some(ts(to)),
        account_id: String::new(),
    };
    let s = admin
        .export_usage(export("2026-01-01T00:00:00Z", "2026-01-03T00:00:01Z"))
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::InvalidArgument, "{s:?}");
    assert!(s.message().contains("--max-export-range"), "{s:?}");
    assert!(s.message().contains("maximum of 2d "), "{s:?}");
    let mut rows = admin
        .export_usage(export("2026-01-01T00:00:00Z", "2026-01-03T00:00:00Z"))
        .await
        .expect("at the limit")
        .into_inner();
    while rows.message().await.expect("rows").is_some() {}
}

/// Reads the server's HTTP/2 SETTINGS frame and returns its
/// MAX_CONCURRENT_STREAMS, as any client sees it.
async fn advertised_max_concurrent_streams(addr: &str) -> Option<u32> {
    let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
    // The client preface and an empty SETTINGS frame.
    conn.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0")
        .await
        .unwrap();
    loop {
        let mut head = [0u8; 9];
        conn.read_exact(&mut head).await.unwrap();
        let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
        let mut payload = vec![0u8; len];
        conn.read_exact(&mut payload).await.unwrap();
        // A SETTINGS frame that is not an ACK: the server's settings.
        if head[3] == 0x4 && head[4] & 0x1 == 0 {
            return payload.chunks_exact(6).find_map(|s| {
                (u16::from_be_bytes([s[0], s[1]]) == 0x3)
                    .then(|| u32::from_be_bytes([s[2], s[3], s[4], s[5]]))
            });
        }
    }
}

#[tokio::test]
async fn concurrent_streams_per_connection_are_limited_in_the_http2_settings() {
    let dir = tempfile::tempdir().unwrap();
    let default = Server::start(dir.path(), &[]);
    assert_eq!(
        advertised_max_concurrent_streams(&default.grpc).await,
        Some(1024)
    );
    drop(default);
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &["--max-concurrent-streams", "2"]);
    assert_eq!(
        advertised_max_concurrent_streams(&server.grpc).await,
        Some(2)
    );
    // A client that opens more streams than that waits for one to end
    // rather than failing: three streams on one connection all complete.
    // (Once the client has the server's SETTINGS: a call completed.)
    let channel = server.channel().await;
    MeterClient::new(channel.clone())
        .deduct(deduct("acct-0", 1, 0, None))
        .await
        .expect("first call");
    let mut calls = Vec::new();
    for i in 0..3 {
        let mut meter = MeterClient::new(channel.clone());
        calls.push(tokio::spawn(async move {
            let (tx, rx) = tokio::sync::mpsc::channel(4);
            let mut replies = meter
                .deduct_stream(tokio_stream::wrappers::ReceiverStream::new(rx))
                .await?
                .into_inner();
            for _ in 0..3 {
                tx.send(deduct(&format!("acct-{i}"), 1, 0, None))
                    .await
                    .unwrap();
                replies.message().await?.expect("a reply");
            }
            drop(tx);
            while replies.message().await?.is_some() {}
            Ok::<_, Status>(())
        }));
    }
    for c in calls {
        c.await.unwrap().expect("each stream completes");
    }
}

/// `--max-stream-in-flight`: a client that sends more DeductStream
/// messages than the limit before reading a reply gets the replies of
/// those in flight, then RESOURCE_EXHAUSTED naming the flag and the first
/// message not deducted; nothing after it is deducted. A client that keeps
/// within the limit is never refused.
#[tokio::test]
async fn a_stream_with_more_messages_in_flight_than_the_limit_gets_resource_exhausted() {
    const LIMIT: usize = 8;
    const SENT: usize = 40;
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &["--max-stream-in-flight", &LIMIT.to_string()]);
    let mut meter = MeterClient::new(server.channel().await);
    let message = |i: usize| proto::DeductRequest {
        request_id: format!("r{i}"),
        ..deduct("acme", 1, 0, None)
    };
    // All at once, before any reply is read: they reach the server together.
    let requests: Vec<_> = (0..SENT).map(message).collect();
    let mut replies = meter
        .deduct_stream(tokio_stream::iter(requests))
        .await
        .expect("the stream opens")
        .into_inner();
    let mut answered = 0;
    let status = loop {
        match replies.message().await {
            Ok(Some(_)) => answered += 1,
            Ok(None) => panic!("all {answered} messages were answered: no limit"),
            Err(s) => break s,
        }
    };
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(
        status.message().contains("--max-stream-in-flight")
            && status
                .message()
                .starts_with(&format!("deductions[{answered}]")),
        "{status:?}"
    );
    assert!((LIMIT..SENT).contains(&answered), "{answered} answered");
    // Exactly the answered messages were deducted.
    let usage = |meter: &mut MeterClient<Channel>| {
        let mut meter = meter.clone();
        async move {
            let packs = meter
                .get_usage(proto::GetUsageRequest {
                    account_id: "acme".into(),
                    at: None,
                })
                .await
                .expect("GetUsage")
                .into_inner()
                .packs;
            common::used(&packs, proto::Item::Calls)
        }
    };
    assert_eq!(usage(&mut meter).await, answered as u64);

    // Within the limit, on the same connection: LIMIT sent, LIMIT read,
    // five times over; all answered.
    let (tx, rx) = tokio::sync::mpsc::channel(SENT);
    let mut replies = meter
        .deduct_stream(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .expect("the stream opens")
        .into_inner();
    for round in 0..5 {
        for i in 0..LIMIT {
            tx.send(message(1000 + round * LIMIT + i)).await.unwrap();
        }
        for _ in 0..LIMIT {
            replies
                .message()
                .await
                .expect("within the limit")
                .expect("a reply");
        }
    }
    drop(tx);
    assert!(replies.message().await.unwrap().is_none());
    assert_eq!(usage(&mut meter).await, answered as u64 + 5 * LIMIT as u64);
}

/// A network namespace with a veth pair to this one, made for one test and
/// deleted when dropped (deleting the namespace deletes the pair too).
struct Netns {
    name: String,
    host_if: String,
    /// This side's address; the namespace's is the next one.
    host_ip: std::net::Ipv4Addr,
    ns_ip: std::net::Ipv4Addr,
}

impl Netns {
    /// `Err(why)` where the machine does not allow it (not root, no `ip`,
    /// no namespaces in this container).
    fn create() -> Result<Netns, String> {
        let pid = std::process::id();
        // Unique per process: names of at most 15 bytes, a /30 of its own.
        let (a, b) = (((pid >> 8) & 0xff) as u8, (pid & 0xfc) as u8);
        let ns = Netns {
            name: format!("pmtest{pid}"),
            host_if: format!("pmh{pid}"),
            host_ip: std::net::Ipv4Addr::new(10, 213, a, b + 1),
            ns_ip: std::net::Ipv4Addr::new(10, 213, a, b + 2),
        };
        let peer_if = format!("pmn{pid}");
        let ip = |args: &[&str]| -> Result<(), String> {
            let out = Command::new("ip")
                .args(args)
                .output()
                .map_err(|e| format!("cannot run `ip`: {e}"))?;
            if out.status.success() {
                Ok(())
            } else {
                Err(format!(
                    "`ip {}` failed: {}",
                    args.join(" "),
                    String::from_utf8_lossy(&out.stderr).trim()
                ))
            }
        };
        ip(&["netns", "add", &ns.name])?;
        // From here on, Drop cleans up whatever was made.
        let (host, peer) = (format!("{}/30", ns.host_ip), format!("{}/30", ns.ns_ip));
        let n = ns.name.as_str();
        ip(&[
            "link",
            "add",
            &ns.host_if,
            "type",
            "veth",
            "peer",
            "name",
            &peer_if,
        ])?;
        ip(&["link", "set", &peer_if, "netns", n])?;
        ip(&["addr", "add", &host, "dev", &ns.host_if])?;
        ip(&["link", "set", &ns.host_if, "up"])?;
        ip(&["-n", n, "addr", "add", &peer, "dev", &peer_if])?;
        ip(&["-n", n, "link", "set", &peer_if, "up"])?;
        ip(&["-n", n, "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// A command run inside the namespace.
    fn command(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name, program]);
        c
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
        let _ = Command::new("ip")
            .args(["link", "del", &self.host_if])
            .stderr(std::process::Stdio::null())
            .status();
    }
}

/// Without a token file, a peer in another network namespace (a real
/// non-loopback peer, as a pod on the cluster network is) is refused every
/// admin call with a message saying how to configure a token (through the
/// real CLI, run inside the namespace), and still gets Meter.
#[tokio::test]
async fn without_a_token_file_a_peer_in_another_network_namespace_is_refused() {
    let ns = match Netns::create() {
        Ok(ns) => ns,
        Err(why) => {
            assert!(
                !common::required(),
                "a network namespace is required under CI=true (run as root with `ip`): {why}"
            );
            eprintln!("SKIPPED: cannot make a network namespace: {why}; set CI=true to make this a failure");
            return;
        }
    };
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start_host(dir.path(), &ns.host_ip.to_string(), &[]);
    let url = format!("http://{}", server.grpc);
    let cli = |args: &[&str]| {
        ns.command(BIN)
            .args(args)
            .args(["--server", &url])
            .env_remove("PACKMETER_ADMIN_TOKEN")
            .env_remove("PACKMETER_TOKEN_FILE")
            .output()
            .unwrap()
    };
    let stderr = |o: &std::process::Output| String::from_utf8_lossy(&o.stderr).into_owned();
    for args in [
        &["flush"][..],
        &["account", "put", "acme"],
        &["packs", "acme"],
    ] {
        let out = cli(args);
        assert_eq!(out.status.code(), Some(77), "{args:?}: {}", stderr(&out));
        assert!(
            stderr(&out).contains("Unauthenticated") && stderr(&out).contains("--admin-token-file"),
            "{args:?}: {}",
            stderr(&out)
        );
    }
    let out = cli(&["deduct", "acme", "--calls", "1"]);
    assert!(out.status.success(), "Meter is open: {}", stderr(&out));
    // The refusals were for the namespace's address, not loopback.
    let metrics = get(&server.admin, "/metrics").await.body;
    assert_eq!(
        sample(
            &metrics,
            "packmeter_admin_auth_failures_total{interface=\"grpc\",reason=\"not_loopback\"}"
        ),
        3.0
    );
}
