//! The admin HTTP port of the real binary: health and readiness (including
//! readiness during a drain), the Prometheus metrics after real traffic, the
//! pack page (R11), and JSON logs.
//!
//! HTTP goes through the small HTTP/1.1 client in `common::http`.

mod common;

use common::{deduct, get, sample, Server};
use packmeter::grpc::proto::{self, Item};

/// Percent-encodes everything but RFC 3986's unreserved characters.
fn url_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

const CSP: &str = "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'";

// === health ===

#[tokio::test]
async fn livez_and_readyz_answer_200_while_serving() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &[]);
    let live = get(&server.admin, "/livez").await;
    assert_eq!(live.status, 200, "{}", live.body);
    let ready = get(&server.admin, "/readyz").await;
    assert_eq!(ready.status, 200, "{}", ready.body);
    // And the gRPC side agrees: the server is serving.
    server
        .meter()
        .await
        .deduct(deduct("live", 1, 0, None))
        .await
        .unwrap();
    let (status, stderr) = server.terminate();
    assert!(status.success(), "{status:?}\n{stderr}");
}

/// SIGTERM flips readiness to 503 while the process drains; an open
/// DeductStream has answered what it took and ends with UNAVAILABLE (so the
/// gateway moves to another node); and the process exits 0 once its final
/// flush succeeds, with every acknowledged deduction durable.
///
/// Another process holds the database's write lock, so the final flush
/// retries (and the process stays in its draining state) until the test
/// lets go: that is what makes the draining state observable.
#[tokio::test]
async fn readyz_is_503_while_draining_and_the_open_stream_ends_unavailable() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start(
        dir.path(),
        &["--shutdown-grace", "60s", "--flush-interval", "1h"],
    );
    let mut meter = server.meter().await;
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    let mut replies = meter
        .deduct_stream(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    for _ in 0..3 {
        tx.send(deduct("drainer", 1, 10, None)).await.unwrap();
        let r = replies.message().await.unwrap().expect("a reply");
        assert_eq!(r.decision, proto::Decision::Allow as i32);
    }
    assert_eq!(get(&server.admin, "/readyz").await.status, 200);

    let blocker = rusqlite::Connection::open(&server.db).unwrap();
    blocker.execute_batch("BEGIN EXCLUSIVE").unwrap();
    server.send_term();
    // The stream takes no more deductions: it ends with UNAVAILABLE, whether
    // or not the client sends more.
    let end = replies
        .message()
        .await
        .expect_err("the stream ends with a status");
    assert_eq!(end.code(), tonic::Code::Unavailable, "{end:?}");
    drop(tx);
    // The final flush is blocked: the process is draining, not ready, alive.
    assert_eq!(get(&server.admin, "/readyz").await.status, 503);
    assert_eq!(get(&server.admin, "/livez").await.status, 200);
    blocker.execute_batch("ROLLBACK").unwrap();
    drop(blocker);

    let (status, stderr) = server.wait();
    assert!(status.success(), "exit {status:?}\n{stderr}");
    assert!(
        !stderr.contains("longer than half the grace"),
        "the drain did not wait for the stream's client:\n{stderr}"
    );

    let server = Server::start_on(&server.db, &[]);
    let packs = server.packs("drainer").await;
    assert_eq!(common::used(&packs, Item::Calls), 3);
    assert_eq!(common::used(&packs, Item::EgressBytes), 30);
}

// === metrics ===

#[tokio::test]
async fn metrics_count_real_traffic_without_account_labels() {
    const OPEN: &str = "acct-open-7f3a9c";
    const STRICT: &str = "acct-strict-2d81e4";
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(
        dir.path(),
        &["--free-calls", "5", "--free-egress-bytes", "1000"],
    );
    let mut meter = server.meter().await;
    let mut admin = server.admin().await;

    // OPEN: three covered deductions, then one that runs into overage on both items.
    for _ in 0..3 {
        meter.deduct(deduct(OPEN, 1, 100, None)).await.unwrap();
    }
    let r = meter
        .deduct(deduct(OPEN, 4, 1000, None))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(common::split(&r.calls), (2, 2, 0));
    assert_eq!(common::split(&r.egress_bytes), (700, 300, 0));

    // STRICT: deny once its calls are used up.
    admin
        .put_account(proto::PutAccountRequest {
            account: Some(proto::Account {
                account_id: STRICT.into(),
                deny_on_exhausted: true,
                ..Default::default()
            }),
            update_mask: None,
        })
        .await
        .unwrap();
    let r = meter
        .deduct(deduct(STRICT, 5, 0, None))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.decision, proto::Decision::Allow as i32);
    let r = meter
        .deduct(deduct(STRICT, 1, 0, None))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.decision, proto::Decision::Deny as i32);

    admin.flush(proto::FlushRequest {}).await.unwrap();

    let scrape = get(&server.admin, "/metrics").await;
    assert_eq!(scrape.status, 200);
    assert!(
        scrape.header("content-type").contains("openmetrics-text"),
        "{}",
        scrape.header("content-type")
    );
    let m = &scrape.body;
    assert_eq!(
        sample(m, r#"packmeter_deductions_total{decision="allow"}"#),
        5.0
    );
    assert_eq!(
        sample(m, r#"packmeter_deductions_total{decision="deny"}"#),
        1.0
    );
    assert_eq!(
        sample(m, r#"packmeter_deductions_total{decision="duplicate"}"#),
        0.0
    );
    // A denial covers nothing: 3 + 2 + 5 calls covered, 2 over.
    assert_eq!(sample(m, r#"packmeter_covered_total{item="calls"}"#), 10.0);
    assert_eq!(sample(m, r#"packmeter_overage_total{item="calls"}"#), 2.0);
    assert_eq!(
        sample(m, r#"packmeter_covered_total{item="egress_bytes"}"#),
        1000.0
    );
    assert_eq!(
        sample(m, r#"packmeter_overage_total{item="egress_bytes"}"#),
        300.0
    );
    assert!(
        sample(
            m,
            r#"packmeter_rpc_duration_seconds_count{method="Deduct"}"#
        ) >= 6.0
    );
    assert!(sample(m, r#"packmeter_rpc_duration_seconds_count{method="Flush"}"#) >= 1.0);
    assert!(sample(m, "packmeter_flush_duration_seconds_count") >= 1.0);
    assert!(sample(m, "packmeter_flush_batch_accounts_count") >= 1.0);
    assert_eq!(sample(m, "packmeter_flush_failures_total"), 0.0);
    assert_eq!(sample(m, "packmeter_store_up"), 1.0);
    assert_eq!(sample(m, "packmeter_resident_accounts"), 2.0);
    // Admin.Flush returned once durable, and nothing came after it.
    assert_eq!(sample(m, "packmeter_dirty_accounts"), 0.0);
    assert_eq!(sample(m, "packmeter_oldest_unflushed_seconds"), 0.0);
    assert!(m.trim_end().ends_with("# EOF"));
    for line in m.lines() {
        assert!(
            !line.contains(OPEN) && !line.contains(STRICT) && !line.contains("account="),
            "a metric is labelled by account: {line}"
        );
    }
}

// === the pack page ===

#[tokio::test]
async fn the_pack_page_lists_the_accounts_packs_and_escapes_everything() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &[]);
    let mut meter = server.meter().await;
    meter
        .deduct(deduct("acme", 1_234, 512 << 20, None))
        .await
        .unwrap();

    let page = get(&server.admin, "/packs?account=acme").await;
    assert_eq!(page.status, 200, "{}", page.body);
    assert_eq!(page.header("content-type"), "text/html; charset=utf-8");
    assert_eq!(page.header("content-security-policy"), CSP);
    assert_eq!(page.header("x-content-type-options"), "nosniff");

    // The rows agree with ListPacks: the free-tier packs valid now hold the usage.
    let packs = server.packs("acme").await;
    assert_eq!(packs.len(), 26, "13 monthly free-tier packs per item");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let current = |item: Item| {
        packs
            .iter()
            .find(|p| {
                p.item == item as i32
                    && p.valid_from.unwrap().seconds <= now
                    && now < p.valid_until.unwrap().seconds
            })
            .expect("a pack valid now")
    };
    let row = |pack_id: &str| {
        let at = page
            .body
            .find(&format!("<code>{pack_id}</code>"))
            .unwrap_or_else(|| panic!("no row for {pack_id}:\n{}", page.body));
        let start = page.body[..at].rfind("<tr").unwrap();
        let end = at + page.body[at..].find("</tr>").unwrap();
        page.body[start..end].to_string()
    };
    let calls = current(Item::Calls);
    assert_eq!(calls.used, 1_234);
    let r = row(&calls.pack_id);
    for want in [
        r#"<tr class="current">"#,
        "Valid now",
        "Free tier",
        "<td>Calls</td>",
        ">1,000,000<",
        ">1,234<",
        ">998,766<",
        r#"style="width:0.1%""#,
        ">0.1%<",
    ] {
        assert!(r.contains(want), "calls row lacks {want:?}:\n{r}");
    }
    let egress = current(Item::EgressBytes);
    let r = row(&egress.pack_id);
    for want in [
        "<td>Egress</td>",
        r#"<span title="1,073,741,824 bytes">1.00 GiB</span>"#,
        r#"<span title="536,870,912 bytes">512.00 MiB</span>"#,
        r#"style="width:50.0%""#,
        ">50.0%<",
    ] {
        assert!(r.contains(want), "egress row lacks {want:?}:\n{r}");
    }
    // The other months are upcoming (or expired, just after a month turns).
    assert_eq!(page.body.matches(r#"<tr class="current">"#).count(), 2);
    let rows = ["current", "upcoming", "expired"]
        .map(|c| page.body.matches(&format!(r#"<tr class="{c}">"#)).count());
    assert_eq!(rows.iter().sum::<usize>(), 26, "{rows:?}");

    // A hostile account id is escaped wherever the page echoes it.
    let hostile = r#"<script>alert(1)</script>"'&"#;
    meter.deduct(deduct(hostile, 1, 0, None)).await.unwrap();
    let page = get(
        &server.admin,
        &format!("/packs?account={}", url_encode(hostile)),
    )
    .await;
    assert_eq!(page.status, 200, "{}", page.body);
    assert!(!page.body.contains("<script"), "{}", page.body);
    // maud writes every attribute in double quotes, so `'` needs no escape.
    assert!(page
        .body
        .contains("&lt;script&gt;alert(1)&lt;/script&gt;&quot;'&amp;"));
    assert!(page.body.contains("<title>Resource packs · &lt;script&gt;"));

    // Errors are HTML pages too, with the right status.
    for (path, status, text) in [
        ("/packs?account=nobody", 404, "Unknown account"),
        ("/packs?account=", 400, "is empty"),
        ("/packs?account=a%01b", 400, "control character"),
        (
            format!("/packs?account={}", "x".repeat(129)).as_str(),
            400,
            "longer than 128 bytes",
        ),
        (
            format!(
                "/packs?account={}",
                url_encode("<img src=x onerror=alert(1)>")
            )
            .as_str(),
            404,
            "&lt;img src=x onerror=alert(1)&gt;",
        ),
        ("/no-such-page", 404, "Not found"),
    ] {
        let r = get(&server.admin, path).await;
        assert_eq!(r.status, status, "{path}: {}", r.body);
        assert_eq!(
            r.header("content-type"),
            "text/html; charset=utf-8",
            "{path}"
        );
        assert_eq!(r.header("content-security-policy"), CSP, "{path}");
        assert!(r.body.contains(text), "{path} lacks {text:?}:\n{}", r.body);
        assert!(!r.body.contains("<img"), "{path}");
    }

    // Without an account, /packs sends the browser to the lookup form.
    let r = get(&server.admin, "/packs").await;
    assert_eq!(r.status, 303);
    assert_eq!(r.header("location"), "/");
    let index = get(&server.admin, "/").await;
    assert_eq!(index.status, 200);
    assert_eq!(index.header("content-security-policy"), CSP);
    for want in [
        r#"action="/packs""#,
        r#"name="account""#,
        r#"href="/metrics""#,
        r#"href="/livez""#,
        r#"href="/readyz""#,
    ] {
        assert!(
            index.body.contains(want),
            "index lacks {want}:\n{}",
            index.body
        );
    }
}

/// A query string the page cannot read is a 400 naming the problem, never
/// a lookup of some other account: `%ff%fe` is not UTF-8 (read with
/// replacement characters it was a 404 for the account "\u{fffd}\u{fffd}").
#[tokio::test]
async fn a_query_that_is_not_utf8_is_a_400() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &[]);
    for (path, text) in [
        ("/packs?account=%ff%fe", "not UTF-8"),
        ("/packs?account=a%C3", "not UTF-8"),
        ("/packs?account=a&account=b", "more than once"),
    ] {
        let r = get(&server.admin, path).await;
        assert_eq!(r.status, 400, "{path}: {}", r.body);
        assert_eq!(r.header("content-type"), "text/html; charset=utf-8");
        assert!(r.body.contains(text), "{path} lacks {text:?}:\n{}", r.body);
    }
    // Valid escapes, `+` and other parameters still work.
    server
        .meter()
        .await
        .deduct(deduct("é acme", 1, 0, None))
        .await
        .unwrap();
    for path in [
        "/packs?account=%C3%A9+acme",
        "/packs?x=1&account=%C3%A9%20acme&y",
    ] {
        let r = get(&server.admin, path).await;
        assert_eq!(r.status, 200, "{path}: {}", r.body);
        assert!(r.body.contains("é acme"), "{path}");
    }
    let r = get(&server.admin, "/packs?account=50%zz").await;
    assert_eq!(r.status, 404, "a stray % is kept as it is: {}", r.body);
    assert!(r.body.contains("50%zz"), "{}", r.body);
}

/// A store that fails is a 503 page, not a crash or a 500. The failure is a
/// real one: the SQLite file is overwritten under a server that has not yet
/// loaded the account.
#[tokio::test]
async fn the_pack_page_is_503_when_the_store_fails() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &[]);
    server
        .meter()
        .await
        .deduct(deduct("acme", 1, 0, None))
        .await
        .unwrap();
    let (status, stderr) = server.terminate();
    assert!(status.success(), "{status:?}\n{stderr}");

    let server = Server::start(dir.path(), &[]);
    let size = std::fs::metadata(&server.db).unwrap().len() as usize;
    std::fs::write(&server.db, vec![0xff; size]).unwrap();
    let page = get(&server.admin, "/packs?account=acme").await;
    assert_eq!(page.status, 503, "{}", page.body);
    assert_eq!(page.header("content-type"), "text/html; charset=utf-8");
    assert_eq!(page.header("content-security-policy"), CSP);
    assert!(page.body.contains("Store unavailable"), "{}", page.body);
    // The process is still up and answering.
    assert_eq!(get(&server.admin, "/livez").await.status, 200);
}

// === logs ===

#[tokio::test]
async fn log_format_json_writes_one_json_object_per_line() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &["--log-format", "json"]);
    server
        .meter()
        .await
        .deduct(deduct("logged", 1, 0, None))
        .await
        .unwrap();
    let (status, stderr) = server.terminate();
    assert!(status.success(), "{status:?}\n{stderr}");
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(
        lines.len() >= 2,
        "expected start-up and shutdown logs:\n{stderr}"
    );
    for line in &lines {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        let o = v
            .as_object()
            .unwrap_or_else(|| panic!("not an object: {line}"));
        assert!(
            o.contains_key("level") && o.contains_key("timestamp"),
            "{line}"
        );
    }
    assert!(
        lines.iter().any(|l| l.contains(r#""message":"serving""#)),
        "{stderr}"
    );
}

/// Issue 15 #14: the "valid now" card adds capacities past 2^64 exactly:
/// three packs of 2^63 - 1 calls, five of them used.
#[tokio::test]
async fn the_pack_page_remaining_figure_is_exact_for_capacities_past_2_pow_64() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &["--free-calls", "1000"]);
    let mut admin = server.admin().await;
    let until = prost_types::Timestamp {
        seconds: chrono::Utc::now().timestamp() + 86_400,
        nanos: 0,
    };
    for id in ["a", "b", "c"] {
        admin
            .grant_pack(proto::GrantPackRequest {
                account_id: "acme".into(),
                item: Item::Calls as i32,
                capacity: i64::MAX as u64,
                valid_from: None,
                valid_until: Some(until),
                pack_id: id.into(),
                priority: 0,
                valid_for: None,
            })
            .await
            .unwrap();
    }
    server
        .meter()
        .await
        .deduct(deduct("acme", 1_005, 0, None))
        .await
        .unwrap();
    let page = get(&server.admin, "/packs?account=acme").await;
    assert_eq!(page.status, 200, "{}", page.body);
    // 3 × (2^63 - 1) + 1 000 - 1 005 = 27 670 116 110 564 327 416
    assert!(
        page.body
            .contains("27,670,116,110,564,327,416</div><div class=\"card-sub\">remaining of 27,670,116,110,564,328,421 in 4 packs"),
        "{}",
        page.body
    );
}

/// `Admin.GetDailyUsage` refuses what it cannot answer, precisely, and
/// answers every day of the range.
#[tokio::test]
async fn daily_usage_over_grpc_names_what_is_wrong() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &[]);
    server
        .meter()
        .await
        .deduct(deduct("acme", 5, 7, None))
        .await
        .unwrap();
    let mut admin = server.admin().await;
    let ask = |account: &str, days: u32| proto::GetDailyUsageRequest {
        account_id: account.into(),
        days,
    };
    let e = admin.get_daily_usage(ask("acme", 732)).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(e.message().contains("days = 732"), "{}", e.message());
    let e = admin.get_daily_usage(ask("nobody", 3)).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound, "{}", e.message());
    let e = admin.get_daily_usage(ask("", 3)).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{}", e.message());
    // 0 means the default 90 days; today is last, with the usage.
    let r = admin
        .get_daily_usage(ask("acme", 0))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.days.len(), 90);
    let today = r.days.last().unwrap();
    assert_eq!((today.calls_covered, today.egress_bytes_covered), (5, 7));
    let r = admin
        .get_daily_usage(ask("acme", 731))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.days.len(), 731);
}
