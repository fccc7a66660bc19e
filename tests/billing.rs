//! Billing rules through the real gRPC interface: purchased packs (R6),
//! deny and suspend (R7), idempotency (R10), unknown accounts (R1), and bad
//! input that must get a precise error and change nothing.

mod common;

use common::{deduct, split, ts, Server};
use packmeter::grpc::proto::{self, Decision, Item, PackSource};
use tonic::Code;

fn hours_from_now(h: i64) -> prost_types::Timestamp {
    let t = chrono::Utc::now() + chrono::Duration::hours(h);
    prost_types::Timestamp {
        seconds: t.timestamp(),
        nanos: 0,
    }
}

fn grant(
    account: &str,
    id: &str,
    item: Item,
    capacity: u64,
    priority: u32,
    hours: i64,
) -> proto::GrantPackRequest {
    proto::GrantPackRequest {
        account_id: account.into(),
        item: item as i32,
        capacity,
        valid_from: None,
        valid_until: Some(hours_from_now(hours)),
        pack_id: id.into(),
        priority,
        valid_for: None,
    }
}

#[tokio::test]
async fn purchased_packs_follow_the_free_tier_by_priority_then_expiry() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &["--free-calls", "10"]);
    let (mut meter, mut admin) = (server.meter().await, server.admin().await);

    let low_late = admin
        .grant_pack(grant("acme", "low-late", Item::Calls, 5, 0, 48))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(low_late.source, PackSource::Purchased as i32);
    admin
        .grant_pack(grant("acme", "low-soon", Item::Calls, 5, 0, 24))
        .await
        .unwrap();
    let high = grant("acme", "high", Item::Calls, 5, 7, 72);
    let granted = admin.grant_pack(high.clone()).await.unwrap().into_inner();
    // A repeated pack_id with the same terms is idempotent ...
    let again = admin.grant_pack(high.clone()).await.unwrap().into_inner();
    assert_eq!(granted, again);
    // ... and with other terms it is refused.
    let conflict = admin
        .grant_pack(proto::GrantPackRequest {
            capacity: 6,
            ..high
        })
        .await
        .unwrap_err();
    assert_eq!(conflict.code(), Code::AlreadyExists);

    // 10 free + 5 high + 5 low-soon + 2 of low-late; then overage.
    let r = meter
        .deduct(deduct("acme", 22, 0, None))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(split(&r.calls), (22, 0, 3));
    let r = meter
        .deduct(deduct("acme", 5, 0, None))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(split(&r.calls), (3, 2, 0));
    assert_eq!(
        r.decision,
        Decision::Allow as i32,
        "overage is allowed by default"
    );

    let packs = server.packs("acme").await;
    let used = |id: &str| packs.iter().find(|p| p.pack_id == id).map(|p| p.used);
    assert_eq!(used("high"), Some(5));
    assert_eq!(used("low-soon"), Some(5));
    assert_eq!(used("low-late"), Some(5));
    assert!(packs.iter().all(|p| p.used <= p.capacity));
}

#[tokio::test]
async fn repeated_grant_with_same_terms_returns_the_existing_pack() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &[]);
    let mut admin = server.admin().await;
    let req = proto::GrantPackRequest {
        valid_from: Some(ts("2026-01-01T00:00:00Z")),
        valid_until: Some(ts("2036-01-01T00:00:00Z")),
        ..grant("acme", "p-1", Item::EgressBytes, 1 << 20, 0, 1)
    };
    let first = admin.grant_pack(req.clone()).await.unwrap().into_inner();
    let second = admin.grant_pack(req).await.unwrap().into_inner();
    assert_eq!(first, second);
    assert_eq!(
        server
            .packs("acme")
            .await
            .iter()
            .filter(|p| p.pack_id == "p-1")
            .count(),
        1
    );
}

#[tokio::test]
async fn deny_on_exhausted_and_suspended_accounts() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(
        dir.path(),
        &["--free-calls", "3", "--free-egress-bytes", "100"],
    );
    let (mut meter, mut admin) = (server.meter().await, server.admin().await);
    let put = |id: &str, suspended: bool, deny: bool| proto::PutAccountRequest {
        account: Some(proto::Account {
            account_id: id.into(),
            activated_at: None,
            suspended,
            deny_on_exhausted: deny,
            billing_zone: String::new(),
        }),
        update_mask: Some(prost_types::FieldMask {
            paths: vec!["suspended".into(), "deny_on_exhausted".into()],
        }),
    };
    let acct = admin
        .put_account(put("strict", false, true))
        .await
        .unwrap()
        .into_inner();
    assert!(acct.activated_at.is_some() && acct.deny_on_exhausted);

    let r = meter
        .deduct(deduct("strict", 2, 0, None))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (r.decision, split(&r.calls)),
        (Decision::Allow as i32, (2, 0, 1))
    );
    // 2 calls with 1 left: denied, nothing deducted, nothing recorded.
    let r = meter
        .deduct(deduct("strict", 2, 40, None))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.decision, Decision::Deny as i32);
    assert!(r.deny_reason.contains("on_exhausted"), "{}", r.deny_reason);
    assert_eq!(split(&r.calls), (0, 0, 1));
    assert_eq!(split(&r.egress_bytes), (0, 0, 100));
    let r = meter
        .deduct(deduct("strict", 1, 0, None))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (r.decision, split(&r.calls)),
        (Decision::Allow as i32, (1, 0, 0))
    );
    // Egress alone is never denied, even past the pack.
    let r = meter
        .deduct(deduct("strict", 0, 150, None))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (r.decision, split(&r.egress_bytes)),
        (Decision::Allow as i32, (100, 50, 0))
    );
    // A check (0, 0) tells the gateway the next call would be denied.
    let r = meter
        .deduct(deduct("strict", 0, 0, None))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.decision, Decision::Deny as i32);
    let packs = server.packs("strict").await;
    assert_eq!(common::used(&packs, Item::Calls), 3);
    assert_eq!(common::used(&packs, Item::EgressBytes), 100);

    admin.put_account(put("late", true, false)).await.unwrap();

    let r = meter
        .deduct(deduct("late", 1, 10, None))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.decision, Decision::Deny as i32);
    assert!(r.deny_reason.contains("suspended"));
    let r = meter
        .deduct(deduct("late", 0, 10, None))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        r.decision,
        Decision::Allow as i32,
        "egress alone is recorded even when suspended"
    );
    let packs = server.packs("late").await;
    assert_eq!(common::used(&packs, Item::Calls), 0);
    assert_eq!(common::used(&packs, Item::EgressBytes), 10);
    // Lifting the suspension lets calls through again, keeping the activation.
    let back = admin
        .put_account(put("late", false, false))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(back.activated_at, acct_activation(&mut admin, "late").await);
    let r = meter
        .deduct(deduct("late", 1, 0, None))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.decision, Decision::Allow as i32);
}

/// R7: an account with `on_exhausted = deny` whose egress packs are
/// exhausted has its next calls denied, even while its calls packs still
/// cover them; egress alone is still recorded. (Issue 7, defect 3.)
#[tokio::test]
async fn a_deny_account_whose_egress_is_exhausted_is_denied_calls() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(
        dir.path(),
        &["--free-calls", "100", "--free-egress-bytes", "1000"],
    );
    server.put_account("strict", false, true).await;
    let mut meter = server.meter().await;
    let mut deduct_now = async |calls, egress| {
        meter
            .deduct(deduct("strict", calls, egress, None))
            .await
            .unwrap()
            .into_inner()
    };
    // A call and more egress than the pack holds: the call is covered, the
    // egress is reported after the fact and billed as overage.
    let r = deduct_now(1, 1_500).await;
    assert_eq!(r.decision, Decision::Allow as i32);
    assert_eq!(split(&r.egress_bytes), (1_000, 500, 0));
    // The next call is denied: egress is exhausted. Nothing is deducted.
    let r = deduct_now(1, 10).await;
    assert_eq!(r.decision, Decision::Deny as i32, "{r:?}");
    assert!(r.deny_reason.contains("egress"), "{}", r.deny_reason);
    assert_eq!(split(&r.calls), (0, 0, 99));
    // A check says the same; egress alone is still recorded.
    assert_eq!(deduct_now(0, 0).await.decision, Decision::Deny as i32);
    let r = deduct_now(0, 10).await;
    assert_eq!(
        (r.decision, split(&r.egress_bytes)),
        (Decision::Allow as i32, (0, 10, 0))
    );
    let packs = server.packs("strict").await;
    assert_eq!(common::used(&packs, Item::Calls), 1);
    assert_eq!(common::used(&packs, Item::EgressBytes), 1_000);
}

async fn acct_activation(
    admin: &mut proto::admin_client::AdminClient<tonic::transport::Channel>,
    id: &str,
) -> Option<prost_types::Timestamp> {
    admin
        .get_account(proto::GetAccountRequest {
            account_id: id.into(),
        })
        .await
        .unwrap()
        .into_inner()
        .activated_at
}

#[tokio::test]
async fn a_request_id_is_deducted_once_even_across_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &[]);
    let mut meter = server.meter().await;
    let req = proto::DeductRequest {
        request_id: "req-42".into(),
        ..deduct("acme", 7, 100, None)
    };
    let first = meter.deduct(req.clone()).await.unwrap().into_inner();
    let second = meter.deduct(req.clone()).await.unwrap().into_inner();
    assert!(!first.duplicate && second.duplicate);
    assert_eq!(
        split(&second.calls).0,
        7,
        "the duplicate reports the original deduction"
    );
    // The same id on another account is another request.
    let other = meter
        .deduct(proto::DeductRequest {
            account_id: "other".into(),
            ..req.clone()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!other.duplicate);
    let (status, _) = server.terminate();
    assert!(status.success());

    let server = Server::start_on(&dir.path().join("packmeter.db"), &[]);
    let mut meter = server.meter().await;
    let third = meter.deduct(req).await.unwrap().into_inner();
    assert!(third.duplicate, "the dedup window survives a restart");
    let packs = server.packs("acme").await;
    assert_eq!(common::used(&packs, Item::Calls), 7);
    assert_eq!(common::used(&packs, Item::EgressBytes), 100);
}

/// Streams sending the same request ids at the same time, in windows that
/// reach the server together: a window is deducted as one group, and a
/// group that meets one of its ids in flight on another stream is taken
/// again message by message. Every stream sends its window of the same ids
/// at once (a barrier between windows), so groups on different server
/// threads may claim the same ids at the same time; whether two of them
/// overlap is the scheduler's choice (on a 2-core machine, seldom). Each id is deducted once: one answer is fresh,
/// every other is a duplicate reporting the same amounts, and the account's
/// usage is the number of fresh answers. A message may be refused only as
/// ABORTED (its original stayed in flight past the retry bound), which ends
/// its stream and deducts nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn streams_racing_on_the_same_request_ids_deduct_each_once() {
    const STREAMS: usize = 8;
    const IDS: usize = 960;
    const WINDOW: usize = 64;
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &[]);
    // Activated first: the windows then take the shared path, not the
    // exclusive section of a first deduction.
    let mut meter = server.meter().await;
    meter.deduct(deduct("acme", 1, 0, None)).await.unwrap();
    let message = |i: usize| proto::DeductRequest {
        request_id: format!("race-{i}"),
        ..deduct("acme", 1, 10, None)
    };
    let start = std::sync::Arc::new(tokio::sync::Barrier::new(STREAMS));
    let mut streams = Vec::new();
    for _ in 0..STREAMS {
        let (mut meter, start) = (server.meter().await, start.clone());
        streams.push(tokio::spawn(async move {
            let (tx, mut replies) = common::open_stream(&mut meter, WINDOW).await;
            // (id, duplicate, calls covered, egress covered)
            let mut answers = Vec::new();
            for w in (0..IDS).step_by(WINDOW) {
                start.wait().await;
                for i in w..w + WINDOW {
                    tx.send(message(i)).await.unwrap();
                }
                for i in w..w + WINDOW {
                    match replies.message().await {
                        Ok(Some(r)) => answers.push((
                            i,
                            r.duplicate,
                            split(&r.calls).0,
                            split(&r.egress_bytes).0,
                        )),
                        Ok(None) => panic!("the stream ended at message {i}"),
                        Err(s) => {
                            // The others still meet this stream at the
                            // barrier before each window left.
                            for _ in (w + WINDOW..IDS).step_by(WINDOW) {
                                start.wait().await;
                            }
                            return (answers, Some(s));
                        }
                    }
                }
            }
            (answers, None)
        }));
    }
    let mut fresh = vec![0; IDS];
    let mut ended = 0;
    for s in streams {
        let (answers, refused) = s.await.unwrap();
        if let Some(status) = refused {
            ended += 1;
            assert_eq!(status.code(), Code::Aborted, "{status:?}");
            eprintln!("a stream ended after {} answers: {status:?}", answers.len());
        }
        for (i, duplicate, calls, egress) in answers {
            assert_eq!((calls, egress), (1, 10), "id {i}: the original's amounts");
            fresh[i] += usize::from(!duplicate);
        }
    }
    assert!(fresh.iter().all(|&n| n <= 1), "deducted twice: {fresh:?}");
    if ended == 0 {
        assert!(fresh.iter().all(|&n| n == 1), "never deducted: {fresh:?}");
    }
    let packs = server.packs("acme").await;
    let deducted = fresh.iter().sum::<usize>() as u64;
    assert_eq!(common::used(&packs, Item::Calls), 1 + deducted);
    assert_eq!(common::used(&packs, Item::EgressBytes), 10 * deducted);
}

#[tokio::test]
async fn unknown_accounts_can_be_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &["--unknown-accounts", "reject"]);
    let (mut meter, mut admin) = (server.meter().await, server.admin().await);
    let e = meter.deduct(deduct("newco", 1, 0, None)).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert!(
        e.message().contains("newco") && e.message().contains("PutAccount"),
        "{}",
        e.message()
    );
    let e = admin
        .get_account(proto::GetAccountRequest {
            account_id: "newco".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    // An operator creates it; then it is served.
    admin
        .put_account(proto::PutAccountRequest {
            account: Some(proto::Account {
                account_id: "newco".into(),
                ..Default::default()
            }),
            update_mask: None,
        })
        .await
        .unwrap();
    let r = meter
        .deduct(deduct("newco", 1, 0, None))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(split(&r.calls), (1, 0, 999_999));
}

/// Each bad request gets the right code and a message naming the field,
/// and the account's usage is unchanged afterwards.
#[tokio::test]
async fn bad_input_gets_a_precise_error_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &[]);
    let (mut meter, mut admin) = (server.meter().await, server.admin().await);
    meter.deduct(deduct("acme", 1, 1, None)).await.unwrap();

    let now = chrono::Utc::now();
    let stamp = |t: chrono::DateTime<chrono::Utc>| {
        Some(prost_types::Timestamp {
            seconds: t.timestamp(),
            nanos: 0,
        })
    };
    let cases: Vec<(proto::DeductRequest, Code, &str)> = vec![
        (
            deduct("", 1, 0, None),
            Code::InvalidArgument,
            "account_id is empty",
        ),
        (
            deduct(&"a".repeat(129), 1, 0, None),
            Code::InvalidArgument,
            "longer than 128 bytes",
        ),
        (
            deduct("ac\nme", 1, 0, None),
            Code::InvalidArgument,
            "control character",
        ),
        (
            deduct("acme", 1_000_000_001, 0, None),
            Code::InvalidArgument,
            "calls = 1000000001 is over the per-deduction maximum",
        ),
        (
            deduct("acme", 0, (1 << 40) + 1, None),
            Code::InvalidArgument,
            "egress_bytes",
        ),
        (
            proto::DeductRequest {
                at: stamp(now + chrono::Duration::minutes(6)),
                ..deduct("acme", 1, 0, None)
            },
            Code::InvalidArgument,
            "ahead of the server clock",
        ),
        (
            proto::DeductRequest {
                at: stamp(now - chrono::Duration::hours(3)),
                ..deduct("acme", 1, 0, None)
            },
            Code::FailedPrecondition,
            "closed",
        ),
        (
            proto::DeductRequest {
                at: Some(prost_types::Timestamp {
                    seconds: 0,
                    nanos: -1,
                }),
                ..deduct("acme", 1, 0, None)
            },
            Code::InvalidArgument,
            "at: nanos",
        ),
        (
            proto::DeductRequest {
                request_id: "x".repeat(300),
                ..deduct("acme", 1, 0, None)
            },
            Code::InvalidArgument,
            "request_id",
        ),
    ];
    for (req, code, needle) in cases {
        let e = meter.deduct(req.clone()).await.unwrap_err();
        assert_eq!(e.code(), code, "{req:?}: {}", e.message());
        assert!(
            e.message().contains(needle),
            "{:?} should mention {needle:?}",
            e.message()
        );
    }
    // One bad element rejects the whole batch, naming its position.
    let batch = proto::DeductBatchRequest {
        deductions: vec![deduct("acme", 5, 0, None), deduct("", 5, 0, None)],
    };
    let e = meter.deduct_batch(batch).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(
        e.message().starts_with("deductions[1]: account_id"),
        "{}",
        e.message()
    );

    // Unknown enum values and missing fields on the admin side.
    let e = admin
        .grant_pack(proto::GrantPackRequest {
            item: 9,
            ..grant("acme", "p", Item::Calls, 1, 0, 1)
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(
        e.message().contains("item: unknown value 9"),
        "{}",
        e.message()
    );
    let e = admin
        .grant_pack(proto::GrantPackRequest {
            item: 0,
            ..grant("acme", "p", Item::Calls, 1, 0, 1)
        })
        .await
        .unwrap_err();
    assert!(e.message().contains("ITEM_UNSPECIFIED"), "{}", e.message());
    let e = admin
        .grant_pack(proto::GrantPackRequest {
            valid_until: None,
            ..grant("acme", "p", Item::Calls, 1, 0, 1)
        })
        .await
        .unwrap_err();
    assert!(e.message().starts_with("valid_until"), "{}", e.message());
    let e = admin
        .grant_pack(grant("acme", "free-2026-11-calls", Item::Calls, 1, 0, 1))
        .await
        .unwrap_err();
    assert!(e.message().contains("reserved"), "{}", e.message());
    let e = admin
        .put_account(proto::PutAccountRequest {
            account: None,
            update_mask: None,
        })
        .await
        .unwrap_err();
    assert_eq!(
        (e.code(), e.message()),
        (Code::InvalidArgument, "account: is required")
    );

    // Nothing above changed the account.
    let packs = server.packs("acme").await;
    assert_eq!(common::used(&packs, Item::Calls), 1);
    assert_eq!(common::used(&packs, Item::EgressBytes), 1);
    assert!(packs
        .iter()
        .all(|p| p.source == PackSource::FreeTier as i32));
}

#[tokio::test]
async fn malformed_protobuf_is_refused_without_harm() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &[]);
    // Send raw bytes that are not a valid DeductRequest through a gRPC call.
    let mut client = tonic::client::Grpc::new(server.channel().await);
    client.ready().await.unwrap();
    let path = http::uri::PathAndQuery::from_static("/packmeter.v1.Meter/Deduct");
    let garbage = vec![0x0a, 0xff, 0xff, 0xff, 0xff, 0x0f, 0x01];
    let e = client
        .unary::<Vec<u8>, Vec<u8>, _>(tonic::Request::new(garbage), path, common::RawCodec)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(
        e.message().starts_with("malformed DeductRequest"),
        "{}",
        e.message()
    );
    // The server still serves.
    let mut meter = server.meter().await;
    let r = meter
        .deduct(deduct("acme", 1, 0, None))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(split(&r.calls).0, 1);
}

#[tokio::test]
async fn health_reports_serving() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &[]);
    let mut health = tonic_health::pb::health_client::HealthClient::new(server.channel().await);
    for service in ["", "packmeter.v1.Meter", "packmeter.v1.Admin"] {
        let r = health
            .check(tonic_health::pb::HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            r.status,
            tonic_health::pb::health_check_response::ServingStatus::Serving as i32
        );
    }
}

/// 2^48: the largest `--max-egress-bytes` accepted.
const MAX_PER_DEDUCTION: u64 = 1 << 48;

fn huge_batch(account: &str, n: usize, at: &prost_types::Timestamp) -> proto::DeductBatchRequest {
    proto::DeductBatchRequest {
        deductions: (0..n)
            .map(|_| proto::DeductRequest {
                at: Some(*at),
                ..deduct(account, 0, MAX_PER_DEDUCTION, None)
            })
            .collect(),
    }
}

/// Issue 15 #1: an account-hour's egress can never outgrow what the store
/// holds (2^63 - 1). The deduction that would take it past is refused whole
/// with RESOURCE_EXHAUSTED and changes nothing; the rest of the traffic, and
/// every other account, flushes and survives a SIGTERM and a restart, after
/// which the hour is still full.
#[tokio::test]
async fn an_account_hour_past_what_the_store_holds_is_refused_and_others_stay_durable() {
    let dir = tempfile::tempdir().unwrap();
    let args = [
        "--max-egress-bytes",
        "281474976710656",
        "--flush-interval",
        "1h",
    ];
    let server = Server::start(dir.path(), &args);
    let mut meter = server.meter().await;
    // One instant for all: the hour stays open for the late grace even if
    // the clock crosses into the next one meanwhile.
    let at = prost_types::Timestamp {
        seconds: chrono::Utc::now().timestamp(),
        nanos: 0,
    };
    meter
        .deduct(proto::DeductRequest {
            at: Some(at),
            ..deduct("minnow", 5, 7, None)
        })
        .await
        .unwrap();
    // 32 767 deductions of 2^48 fit in 2^63 - 1; the 32 768th does not.
    for _ in 0..3 {
        meter
            .deduct_batch(huge_batch("whale", 10_000, &at))
            .await
            .unwrap();
    }
    let e = meter
        .deduct_batch(huge_batch("whale", 10_000, &at))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{}", e.message());
    assert!(
        e.message().starts_with("deductions[2767]: account `whale`")
            && e.message().contains("egress_bytes")
            && e.message().contains("9223372036854775807"),
        "{}",
        e.message()
    );
    // The refused batch changed nothing: exactly 2 767 more still fit.
    let r = meter
        .deduct_batch(huge_batch("whale", 2_767, &at))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.results.len(), 2_767);
    let e = meter
        .deduct(proto::DeductRequest {
            at: Some(at),
            ..deduct("whale", 0, MAX_PER_DEDUCTION, None)
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{}", e.message());
    // Calls are an item of their own and still fit.
    meter
        .deduct(proto::DeductRequest {
            at: Some(at),
            ..deduct("whale", 1, 0, None)
        })
        .await
        .unwrap();

    let flushed = server
        .admin()
        .await
        .flush(proto::FlushRequest {})
        .await
        .expect("every account flushes");
    assert_eq!(flushed.into_inner().accounts_flushed, 2);
    let (status, stderr) = server.terminate();
    assert!(status.success(), "{stderr}");

    // Durable, exact, and still full after the restart.
    let db = dir.path().join("packmeter.db");
    let conn = rusqlite::Connection::open(&db).unwrap();
    let whale: i64 = conn
        .query_row(
            "SELECT SUM(amount) FROM usage_hourly WHERE account_id = 'whale' AND item = 2",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(whale as u64, 32_767 * MAX_PER_DEDUCTION);
    let minnow: i64 = conn
        .query_row(
            "SELECT SUM(amount) FROM usage_hourly WHERE account_id = 'minnow' AND item = 1",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(minnow, 5);
    drop(conn);
    let server = Server::start_on(&db, &args);
    let mut meter = server.meter().await;
    let e = meter
        .deduct(proto::DeductRequest {
            at: Some(at),
            ..deduct("whale", 0, MAX_PER_DEDUCTION, None)
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{}", e.message());
    meter
        .deduct(proto::DeductRequest {
            at: Some(at),
            ..deduct("minnow", 0, MAX_PER_DEDUCTION, None)
        })
        .await
        .unwrap();
}

/// Issue 15 #6: in reject mode, a grant cannot create an account behind
/// PutAccount's back.
#[tokio::test]
async fn a_grant_to_an_unknown_account_is_refused_in_reject_mode() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &["--unknown-accounts", "reject"]);
    let (mut meter, mut admin) = (server.meter().await, server.admin().await);
    let e = admin
        .grant_pack(grant("ghost", "p1", Item::Calls, 100, 0, 24))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{}", e.message());
    assert!(
        e.message().contains("ghost") && e.message().contains("PutAccount"),
        "{}",
        e.message()
    );
    // Nothing was created: the account is still unknown everywhere.
    let e = meter.deduct(deduct("ghost", 1, 0, None)).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{}", e.message());
    let e = admin
        .list_packs(proto::ListPacksRequest {
            account_id: "ghost".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{}", e.message());
    // Once an operator creates it, the same grant goes through.
    server.put_account("ghost", false, false).await;
    admin
        .grant_pack(grant("ghost", "p1", Item::Calls, 100, 0, 24))
        .await
        .unwrap();
}

/// Issue 15 #14: ListPacks and GetUsage list packs in R6 deduction order:
/// the free tier first, then purchased packs by priority, expiry, creation.
#[tokio::test]
async fn packs_are_listed_in_deduction_order() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &[]);
    let (mut meter, mut admin) = (server.meter().await, server.admin().await);
    // Valid from before the activation, so by start time they would come first.
    for (id, priority, hours) in [("low", 0, 24), ("high", 5, 48), ("soon", 0, 12)] {
        admin
            .grant_pack(proto::GrantPackRequest {
                valid_from: Some(hours_from_now(-2)),
                ..grant("acme", id, Item::Calls, 10, priority, hours)
            })
            .await
            .unwrap();
    }
    meter.deduct(deduct("acme", 1, 0, None)).await.unwrap();
    let ids = |packs: &[proto::Pack]| {
        packs
            .iter()
            .map(|p| {
                if p.source == PackSource::FreeTier as i32 {
                    format!("free-{}", p.item)
                } else {
                    p.pack_id.clone()
                }
            })
            .collect::<Vec<_>>()
    };
    // The 13 monthly free-tier packs, month by month (calls, then egress),
    // then the purchased ones.
    let mut want: Vec<String> = (0..13)
        .flat_map(|_| ["free-1".to_string(), "free-2".to_string()])
        .collect();
    want.extend(["high", "soon", "low"].map(String::from));
    assert_eq!(ids(&server.packs("acme").await), want);
    let usage = meter
        .get_usage(proto::GetUsageRequest {
            account_id: "acme".into(),
            at: None,
        })
        .await
        .unwrap()
        .into_inner();
    // GetUsage: the packs valid now, in the same order.
    assert_eq!(
        ids(&usage.packs),
        ["free-1", "free-2", "high", "soon", "low"]
    );
}

/// Issue 15 #14: `--free-months 0` means no free tier at all.
#[tokio::test]
async fn zero_free_months_grant_no_free_tier() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &["--free-months", "0"]);
    let mut meter = server.meter().await;
    let r = meter
        .deduct(deduct("acme", 3, 5, None))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(split(&r.calls), (0, 3, 0));
    assert_eq!(split(&r.egress_bytes), (0, 5, 0));
    assert!(server.packs("acme").await.is_empty());
}

/// Issue 15 #14: a check (calls = 0, egress_bytes = 0) reads; it creates no
/// account, before a restart or after.
#[tokio::test]
async fn a_check_of_an_unknown_account_creates_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &["--free-calls", "10"]);
    let (mut meter, mut admin) = (server.meter().await, server.admin().await);
    let r = meter
        .deduct(deduct("peek", 0, 0, None))
        .await
        .unwrap()
        .into_inner();
    // What the first deduction would find.
    assert_eq!(split(&r.calls), (0, 0, 10));
    let r = meter
        .deduct_batch(proto::DeductBatchRequest {
            deductions: vec![deduct("peek", 0, 0, None), deduct("other", 1, 0, None)],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(split(&r.results[0].calls), (0, 0, 10));
    let unknown = |e: tonic::Status| {
        assert_eq!(e.code(), Code::NotFound, "{}", e.message());
    };
    unknown(
        admin
            .get_account(proto::GetAccountRequest {
                account_id: "peek".into(),
            })
            .await
            .unwrap_err(),
    );
    unknown(
        admin
            .list_packs(proto::ListPacksRequest {
                account_id: "peek".into(),
            })
            .await
            .unwrap_err(),
    );
    // The real deduction in the same batch did create its account.
    admin
        .get_account(proto::GetAccountRequest {
            account_id: "other".into(),
        })
        .await
        .unwrap();
}

/// `GrantPackRequest.valid_for`: the server measures the length from the
/// pack's start in its billing zone, so a retried "from now" grant with the
/// same pack_id is the same grant; malformed lengths are refused.
#[tokio::test]
async fn valid_for_is_measured_by_the_server_and_makes_retries_match() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &["--timezone", "America/New_York"]);
    let mut admin = server.admin().await;
    server.put_account("acme", false, false).await;
    let req = proto::GrantPackRequest {
        valid_until: None,
        valid_for: Some(proto::Validity {
            months: 1,
            seconds: 3600,
        }),
        ..grant("acme", "order-1", Item::Calls, 10, 0, 0)
    };
    let first = admin.grant_pack(req.clone()).await.unwrap().into_inner();
    let again = admin.grant_pack(req.clone()).await.unwrap().into_inner();
    assert_eq!(first, again);
    let other = proto::GrantPackRequest {
        valid_for: Some(proto::Validity {
            months: 2,
            seconds: 3600,
        }),
        ..req.clone()
    };
    let e = admin.grant_pack(other).await.unwrap_err();
    assert_eq!(e.code(), Code::AlreadyExists);

    // A month in New York across the start of DST: 8 February 02:30 EST is
    // followed by 8 March 02:30, which does not exist and becomes 03:00 EDT.
    let dst = proto::GrantPackRequest {
        valid_from: Some(ts("2026-02-08T02:30:00-05:00")),
        valid_until: None,
        valid_for: Some(proto::Validity {
            months: 1,
            seconds: 0,
        }),
        ..grant("acme", "order-2", Item::Calls, 10, 0, 0)
    };
    let p = admin.grant_pack(dst).await.unwrap().into_inner();
    assert_eq!(p.valid_until, Some(ts("2026-03-08T03:00:00-04:00")));

    for (valid_until, valid_for, text) in [
        (
            Some(ts("2036-01-01T00:00:00Z")),
            Some(proto::Validity {
                months: 1,
                seconds: 0,
            }),
            "not both",
        ),
        (
            None,
            Some(proto::Validity {
                months: 0,
                seconds: 0,
            }),
            "valid_for",
        ),
        (
            None,
            Some(proto::Validity {
                months: 0,
                seconds: u64::MAX,
            }),
            "valid_for.seconds",
        ),
        (
            None,
            Some(proto::Validity {
                months: u32::MAX,
                seconds: 0,
            }),
            "after year 9999",
        ),
    ] {
        let e = admin
            .grant_pack(proto::GrantPackRequest {
                valid_until,
                valid_for,
                ..grant("acme", "bad", Item::Calls, 1, 0, 1)
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{valid_for:?}");
        assert!(e.message().contains(text), "{}", e.message());
    }
    let ids: Vec<String> = server
        .packs("acme")
        .await
        .into_iter()
        .map(|p| p.pack_id)
        .collect();
    assert!(!ids.contains(&"bad".to_string()), "{ids:?}");
}

/// `PutAccount` changes only what its update mask names; without a mask,
/// only the populated fields (AIP-134). An activation fix never lifts an
/// arrears suspension or a `deny` setting (issue 15, item 7).
#[tokio::test]
async fn put_account_changes_only_the_fields_it_names() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &[]);
    let mut admin = server.admin().await;
    let created = server.put_account("arrears", true, true).await;
    assert!(created.suspended && created.deny_on_exhausted);

    // No mask, only the activation set (a client written before the mask).
    let fix = proto::Account {
        account_id: "arrears".into(),
        activated_at: Some(ts("2026-03-01T00:00:00Z")),
        ..Default::default()
    };
    let got = admin
        .put_account(proto::PutAccountRequest {
            account: Some(fix.clone()),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.activated_at, Some(ts("2026-03-01T00:00:00Z")));
    assert!(
        got.suspended && got.deny_on_exhausted,
        "an activation fix lifted the suspension: {got:?}"
    );

    // A mask naming only the activation: the flags in the message are not changes.
    let got = admin
        .put_account(proto::PutAccountRequest {
            account: Some(proto::Account {
                activated_at: Some(ts("2026-04-01T00:00:00Z")),
                ..fix.clone()
            }),
            update_mask: Some(prost_types::FieldMask {
                paths: vec!["activated_at".into()],
            }),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.activated_at, Some(ts("2026-04-01T00:00:00Z")));
    assert!(got.suspended && got.deny_on_exhausted, "{got:?}");

    // Clearing a flag needs the mask; the activation is kept.
    let got = admin
        .put_account(proto::PutAccountRequest {
            account: Some(proto::Account {
                account_id: "arrears".into(),
                ..Default::default()
            }),
            update_mask: Some(prost_types::FieldMask {
                paths: vec!["suspended".into()],
            }),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (got.activated_at, got.suspended, got.deny_on_exhausted),
        (Some(ts("2026-04-01T00:00:00Z")), false, true)
    );

    // A bad mask is INVALID_ARGUMENT naming the path, and changes nothing.
    for (paths, needle) in [
        (vec!["suspended", "plan"], "`plan`"),
        (vec!["activated_at"], "activated_at"),
    ] {
        let e = admin
            .put_account(proto::PutAccountRequest {
                account: Some(proto::Account {
                    account_id: "arrears".into(),
                    suspended: true,
                    ..Default::default()
                }),
                update_mask: Some(prost_types::FieldMask {
                    paths: paths.iter().map(|p| p.to_string()).collect(),
                }),
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{paths:?}");
        assert!(e.message().contains(needle), "{}", e.message());
    }
    let after = admin
        .get_account(proto::GetAccountRequest {
            account_id: "arrears".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(after, got);
}

fn minutes_from_now(m: i64) -> prost_types::Timestamp {
    let t = chrono::Utc::now() + chrono::Duration::minutes(m);
    prost_types::Timestamp {
        seconds: t.timestamp(),
        nanos: 0,
    }
}

fn deduct_at(
    account: &str,
    calls: u64,
    at: Option<prost_types::Timestamp>,
) -> proto::DeductRequest {
    proto::DeductRequest {
        at,
        ..deduct(account, calls, 0, None)
    }
}

/// R1: activation never makes an accepted event fall outside the free tier.
/// A first event ahead of the clock activates at the clock, and an earlier
/// event that arrives later (another gateway's) moves A back to it, with
/// the free pack it needs (issue 15, item 2).
#[tokio::test]
async fn activation_is_never_later_than_an_accepted_event() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &["--free-calls", "10"]);
    let (mut meter, mut admin) = (server.meter().await, server.admin().await);

    // A first event 4 minutes ahead (within the skew), then one without `at`.
    let r = meter
        .deduct(deduct_at("ahead", 1, Some(minutes_from_now(4))))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(split(&r.calls), (1, 0, 9));
    let r = meter
        .deduct(deduct_at("ahead", 1, None))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        split(&r.calls),
        (1, 0, 8),
        "the free tier billed as overage"
    );

    // Gateway B's event at -10 min activates `late`; gateway A's earlier
    // event at -40 min arrives after it.
    let first = minutes_from_now(-10);
    let earlier = minutes_from_now(-40);
    let r = meter
        .deduct(deduct_at("late", 3, Some(first)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(split(&r.calls), (3, 0, 7));
    assert_eq!(acct_activation(&mut admin, "late").await, Some(first));
    let r = meter
        .deduct(deduct_at("late", 2, Some(earlier)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        split(&r.calls).1,
        0,
        "an earlier event was billed as overage"
    );
    assert_eq!(split(&r.calls).0, 2);
    assert_eq!(acct_activation(&mut admin, "late").await, Some(earlier));
    // One free month holds both events (or two, across a month's end); no
    // free pack starts after the earliest event, and none is over capacity.
    let packs = server.packs("late").await;
    assert_eq!(common::used(&packs, Item::Calls), 5);
    let first_free = packs
        .iter()
        .filter(|p| p.source == PackSource::FreeTier as i32)
        .map(|p| p.valid_from.unwrap().seconds)
        .min();
    assert_eq!(first_free, Some(earlier.seconds));
    assert!(packs.iter().all(|p| p.used <= p.capacity));

    // Durable: after a flush and a restart the activation is the earlier one.
    admin.flush(proto::FlushRequest {}).await.unwrap();
    let (status, _) = server.terminate();
    assert!(status.success());
    let server = Server::start(dir.path(), &["--free-calls", "10"]);
    let mut admin = server.admin().await;
    assert_eq!(acct_activation(&mut admin, "late").await, Some(earlier));
    assert_eq!(common::used(&server.packs("late").await, Item::Calls), 5);
}

fn set_activation(account: &str, at: prost_types::Timestamp) -> proto::PutAccountRequest {
    proto::PutAccountRequest {
        account: Some(proto::Account {
            account_id: account.into(),
            activated_at: Some(at),
            ..Default::default()
        }),
        update_mask: Some(prost_types::FieldMask {
            paths: vec!["activated_at".into()],
        }),
    }
}

/// R1: an operator may move an account's activation either way until it
/// has usage. After that a change, earlier or later, is FAILED_PRECONDITION
/// naming the account and its first usage hour, and changes nothing: the
/// usage was split against the packs that activation defined (issue 15,
/// item 8). The same activation again, and the flags, still go through.
#[tokio::test]
async fn an_activation_cannot_move_once_the_account_has_usage() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &["--free-calls", "10"]);
    let (mut meter, mut admin) = (server.meter().await, server.admin().await);

    // Before usage: both directions are allowed, and the packs follow.
    let a = minutes_from_now(-30);
    for at in [minutes_from_now(-90), minutes_from_now(20), a] {
        let got = admin
            .put_account(set_activation("acme", at))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(got.activated_at, Some(at));
        let packs = server.packs("acme").await;
        let from = packs.iter().map(|p| p.valid_from.unwrap().seconds).min();
        assert_eq!(from, Some(at.seconds));
    }

    let r = meter
        .deduct(deduct_at("acme", 4, Some(minutes_from_now(-5))))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(split(&r.calls), (4, 0, 6));
    let before = server.packs("acme").await;

    for flushed in [false, true] {
        if flushed {
            admin.flush(proto::FlushRequest {}).await.unwrap();
        }
        for (dir, at) in [
            ("earlier", minutes_from_now(-50)),
            ("later", minutes_from_now(-1)),
        ] {
            let e = admin
                .put_account(set_activation("acme", at))
                .await
                .unwrap_err();
            assert_eq!(
                e.code(),
                Code::FailedPrecondition,
                "{dir}, flushed {flushed}"
            );
            assert!(
                e.message().contains("`acme`") && e.message().contains("first usage"),
                "{}",
                e.message()
            );
            assert_eq!(acct_activation(&mut admin, "acme").await, Some(a));
            assert_eq!(server.packs("acme").await, before, "{dir}");
        }
    }
    // Not a change: the same activation, or flags only.
    let got = admin
        .put_account(set_activation("acme", a))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.activated_at, Some(a));
    let got = server.put_account("acme", true, false).await;
    assert_eq!((got.activated_at, got.suspended), (Some(a), true));
}
