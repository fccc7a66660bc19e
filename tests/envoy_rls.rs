//! Envoy's `envoy.service.ratelimit.v3.RateLimitService` against the real
//! server, with a client built from the upstream types, as Envoy sends it.

mod common;

use chrono::{Datelike, FixedOffset, TimeZone, Utc};
use common::{used, RawCodec, Server};
use envoy_types::pb::{
    envoy::{
        extensions::common::ratelimit::v3::{rate_limit_descriptor::Entry, RateLimitDescriptor},
        service::ratelimit::v3::{
            rate_limit_response::{rate_limit::Unit, Code},
            rate_limit_service_client::RateLimitServiceClient,
            RateLimitRequest, RateLimitResponse,
        },
    },
    google::protobuf::UInt64Value,
};
use packmeter::grpc::proto::{self, Item};
use prost::Message;
use tonic::transport::Channel;

async fn rls(server: &Server) -> RateLimitServiceClient<Channel> {
    RateLimitServiceClient::new(server.channel().await)
}

fn descriptor(entries: &[(&str, &str)], hits: Option<u64>) -> RateLimitDescriptor {
    RateLimitDescriptor {
        entries: entries
            .iter()
            .map(|(k, v)| Entry {
                key: (*k).into(),
                value: (*v).into(),
            })
            .collect(),
        hits_addend: hits.map(|value| UInt64Value { value }),
        ..RateLimitDescriptor::default()
    }
}

fn request(domain: &str, descriptors: Vec<RateLimitDescriptor>, hits: u32) -> RateLimitRequest {
    RateLimitRequest {
        domain: domain.into(),
        descriptors,
        hits_addend: hits,
    }
}

async fn ask(
    client: &mut RateLimitServiceClient<Channel>,
    req: RateLimitRequest,
) -> RateLimitResponse {
    client.should_rate_limit(req).await.unwrap().into_inner()
}

/// (code, current limit, remaining) of each descriptor.
fn summary(r: &RateLimitResponse) -> Vec<(i32, u32, u32)> {
    r.statuses
        .iter()
        .map(|s| {
            let limit = s.current_limit.as_ref().map_or(0, |l| l.requests_per_unit);
            (s.code, limit, s.limit_remaining)
        })
        .collect()
}

/// Nothing was ever deducted for the account: the server does not know it.
async fn assert_unknown(server: &Server, account: &str) {
    let e = server
        .admin()
        .await
        .list_packs(proto::ListPacksRequest {
            account_id: account.into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound, "{}", e.message());
}

const OK: i32 = Code::Ok as i32;
const OVER: i32 = Code::OverLimit as i32;

#[tokio::test]
async fn answers_ok_with_the_monthly_limit_remaining_and_time_to_reset() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &["--free-calls", "100"]);
    let mut client = rls(&server).await;

    let r = ask(
        &mut client,
        request("gateway", vec![descriptor(&[("account", "acme")], None)], 0),
    )
    .await;
    assert_eq!(r.overall_code, OK);
    assert_eq!(summary(&r), [(OK, 100, 99)]);
    let s = &r.statuses[0];
    let limit = s.current_limit.as_ref().unwrap();
    assert_eq!(
        (limit.unit, limit.name.as_str()),
        (Unit::Month as i32, "calls")
    );
    // The counters reset at the next month start in the billing zone (+08:00).
    let zone = FixedOffset::east_opt(8 * 3600).unwrap();
    let local = Utc::now().with_timezone(&zone);
    let (y, m) = if local.month() == 12 {
        (local.year() + 1, 1)
    } else {
        (local.year(), local.month() + 1)
    };
    let next = zone.with_ymd_and_hms(y, m, 1, 0, 0, 0).unwrap();
    let expected = (next.with_timezone(&Utc) - Utc::now()).num_seconds();
    let reset = s.duration_until_reset.unwrap();
    assert!(
        (reset.seconds - expected).abs() <= 5,
        "reset in {}s, expected about {expected}s",
        reset.seconds
    );
    assert!(r.response_headers_to_add.is_empty());
}

#[tokio::test]
async fn descriptor_hits_addend_wins_over_the_request_and_zero_means_one() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &["--free-calls", "100"]);
    let mut client = rls(&server).await;
    let acme = || descriptor(&[("account", "acme"), ("item", "calls")], None);

    // The request's hits_addend ...
    let r = ask(&mut client, request("gw", vec![acme()], 5)).await;
    assert_eq!(summary(&r), [(OK, 100, 95)]);
    // ... is overridden by the descriptor's ...
    let mut d = acme();
    d.hits_addend = Some(UInt64Value { value: 10 });
    let r = ask(&mut client, request("gw", vec![d], 5)).await;
    assert_eq!(summary(&r), [(OK, 100, 85)]);
    // ... and 0 at the request level means 1, as in Envoy.
    let r = ask(&mut client, request("gw", vec![acme()], 0)).await;
    assert_eq!(summary(&r), [(OK, 100, 84)]);
    assert_eq!(used(&server.packs("acme").await, Item::Calls), 16);
}

#[tokio::test]
async fn the_item_entry_deducts_egress_and_unknown_items_are_invalid() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &["--free-egress-bytes", "1000"]);
    let mut client = rls(&server).await;

    let egress = descriptor(&[("account", "acme"), ("item", "egress_bytes")], Some(300));
    let r = ask(&mut client, request("gw", vec![egress], 0)).await;
    assert_eq!(r.overall_code, OK);
    assert_eq!(summary(&r), [(OK, 1000, 700)]);
    assert_eq!(
        r.statuses[0].current_limit.as_ref().unwrap().name,
        "egress_bytes"
    );
    let packs = server.packs("acme").await;
    assert_eq!(used(&packs, Item::EgressBytes), 300);
    assert_eq!(used(&packs, Item::Calls), 0);

    let e = client
        .should_rate_limit(request(
            "gw",
            vec![descriptor(&[("account", "acme"), ("item", "gpus")], None)],
            0,
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(
        e.message().contains("descriptors[0]") && e.message().contains("gpus"),
        "{}",
        e.message()
    );
}

#[tokio::test]
async fn over_limit_only_where_a_deny_account_runs_out_and_the_denial_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &["--free-calls", "5"]);
    let mut admin = server.admin().await;
    admin
        .put_account(proto::PutAccountRequest {
            account: Some(proto::Account {
                account_id: "strict".into(),
                activated_at: None,
                suspended: false,
                deny_on_exhausted: true,
                billing_zone: String::new(),
            }),
            update_mask: None,
        })
        .await
        .unwrap();
    let mut client = rls(&server).await;
    let strict = |hits| descriptor(&[("account", "strict")], Some(hits));

    let r = ask(&mut client, request("gw", vec![strict(4)], 0)).await;
    assert_eq!((r.overall_code, summary(&r)), (OK, vec![(OK, 5, 1)]));
    // 3 calls with 1 left: denied, and nothing is deducted.
    let r = ask(&mut client, request("gw", vec![strict(3)], 0)).await;
    assert_eq!((r.overall_code, summary(&r)), (OVER, vec![(OVER, 5, 1)]));
    let reason = &r.response_headers_to_add[0];
    assert_eq!(reason.key, "x-packmeter-deny-reason");
    assert!(reason.value.contains("on_exhausted"), "{}", reason.value);
    assert_eq!(used(&server.packs("strict").await, Item::Calls), 4);

    // Running out without `deny` is overage, billed, and OK.
    let r = ask(
        &mut client,
        request(
            "gw",
            vec![descriptor(&[("account", "lenient")], Some(8))],
            0,
        ),
    )
    .await;
    assert_eq!((r.overall_code, summary(&r)), (OK, vec![(OK, 5, 0)]));

    // With several descriptors, one denial makes the whole answer
    // OVER_LIMIT, and the descriptors after it deduct nothing.
    let r = ask(
        &mut client,
        request(
            "gw",
            vec![strict(2), descriptor(&[("account", "bystander")], Some(1))],
            0,
        ),
    )
    .await;
    assert_eq!(r.overall_code, OVER);
    assert_eq!(summary(&r), [(OVER, 5, 1), (OK, 5, 5)]);
    assert_eq!(used(&server.packs("strict").await, Item::Calls), 4);
    assert_eq!(used(&server.packs("bystander").await, Item::Calls), 0);
}

/// Envoy refuses the whole request when one descriptor is over the limit,
/// so a request is all or nothing: the descriptors before the denied one
/// are not charged either. (Issue 7, defect 6: they used to stay deducted.)
#[tokio::test]
async fn a_request_with_a_denied_descriptor_charges_none_of_its_descriptors() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &["--free-calls", "5"]);
    server.put_account("strict", false, true).await;
    let mut client = rls(&server).await;
    let payer = |hits| descriptor(&[("account", "payer")], Some(hits));
    let strict = |hits| descriptor(&[("account", "strict")], Some(hits));
    let egress = descriptor(&[("account", "payer"), ("item", "egress_bytes")], Some(700));

    // `payer` comes first and is fine on its own; `strict` asks for more
    // than its 5 calls.
    let r = ask(
        &mut client,
        request("gw", vec![payer(2), egress.clone(), strict(6)], 0),
    )
    .await;
    assert_eq!(r.overall_code, OVER);
    assert_eq!(r.statuses[2].code, OVER);
    let packs = server.packs("payer").await;
    assert_eq!(
        (used(&packs, Item::Calls), used(&packs, Item::EgressBytes)),
        (0, 0)
    );
    assert_eq!(used(&server.packs("strict").await, Item::Calls), 0);

    // Two descriptors of one deny account count together: 3 + 3 > 5.
    let r = ask(&mut client, request("gw", vec![strict(3), strict(3)], 0)).await;
    assert_eq!(r.overall_code, OVER);
    assert_eq!(used(&server.packs("strict").await, Item::Calls), 0);

    // The same request within the limit is charged whole.
    let r = ask(
        &mut client,
        request("gw", vec![payer(2), egress, strict(5)], 0),
    )
    .await;
    assert_eq!(r.overall_code, OK);
    let packs = server.packs("payer").await;
    assert_eq!(used(&packs, Item::Calls), 2);
    assert_eq!(used(&packs, Item::EgressBytes), 700);
    assert_eq!(used(&server.packs("strict").await, Item::Calls), 5);
}

#[tokio::test]
async fn a_configured_domain_is_enforced() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &["--rls-domain", "edge"]);
    let mut client = rls(&server).await;
    let acme = || vec![descriptor(&[("account", "acme")], None)];

    let e = client
        .should_rate_limit(request("other", acme(), 0))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(e.message().contains("domain"), "{}", e.message());
    assert_unknown(&server, "acme").await;

    let r = ask(&mut client, request("edge", acme(), 0)).await;
    assert_eq!(r.overall_code, OK);
}

#[tokio::test]
async fn a_descriptor_without_an_account_is_invalid_and_nothing_is_deducted() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &[]);
    let mut client = rls(&server).await;

    // The first descriptor is fine; the second has no account: the whole
    // request is refused and the first deducts nothing either.
    let e = client
        .should_rate_limit(request(
            "gw",
            vec![
                descriptor(&[("account", "acme")], None),
                descriptor(&[("generic_key", "calls")], None),
            ],
            0,
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(
        e.message().contains("descriptors[1]") && e.message().contains("`account`"),
        "{}",
        e.message()
    );
    assert_unknown(&server, "acme").await;

    // An invalid account id is refused with the descriptor's position.
    let e = client
        .should_rate_limit(request("gw", vec![descriptor(&[("account", "")], None)], 0))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(
        e.message().contains("descriptors[0]: account_id"),
        "{}",
        e.message()
    );
}

#[tokio::test]
async fn custom_keys_map_accounts_and_items_and_usage_shows_in_list_packs() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(
        dir.path(),
        &["--rls-account-key", "tenant", "--rls-item-key", "meter"],
    );
    let mut client = rls(&server).await;
    let r = ask(
        &mut client,
        request(
            "gw",
            vec![
                descriptor(&[("generic_key", "x"), ("tenant", "t1")], Some(3)),
                descriptor(&[("tenant", "t1"), ("meter", "egress_bytes")], Some(2048)),
            ],
            0,
        ),
    )
    .await;
    assert_eq!(r.overall_code, OK);
    assert_eq!(r.statuses.len(), 2);
    let packs = server.packs("t1").await;
    assert_eq!(used(&packs, Item::Calls), 3);
    assert_eq!(used(&packs, Item::EgressBytes), 2048);
    // The same usage through Meter.GetUsage, i.e. the same counters.
    let usage = server
        .meter()
        .await
        .get_usage(proto::GetUsageRequest {
            account_id: "t1".into(),
            at: None,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(used(&usage.packs, Item::Calls), 3);
}

/// Bodies that are not a `RateLimitRequest`. Each starts with a valid
/// request for `acme`, so a server that acted on what it could read would
/// deduct from it.
fn malformed_bodies() -> Vec<Vec<u8>> {
    let valid = request("gw", vec![descriptor(&[("account", "acme")], None)], 0).encode_to_vec();
    let with = |tail: &[u8]| [valid.as_slice(), tail].concat();
    vec![
        // Field 1 (domain), length 5, one byte: truncated.
        with(&[0x0a, 0x05, b'x']),
        // Field 1 with wire type 7, which does not exist.
        with(&[0x0f, 0x00]),
        // A length varint that never ends.
        with(&[
            0x0a, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
        ]),
    ]
}

/// Sends each malformed body to ShouldRateLimit and checks the status.
async fn assert_malformed_is_invalid_argument(server: &Server) {
    let mut raw = tonic::client::Grpc::new(server.channel().await);
    for body in malformed_bodies() {
        raw.ready().await.unwrap();
        let path = http::uri::PathAndQuery::from_static(
            "/envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit",
        );
        let e = raw
            .unary::<Vec<u8>, Vec<u8>, _>(tonic::Request::new(body.clone()), path, RawCodec)
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{body:x?}: {e:?}");
        assert!(
            e.message().starts_with("malformed RateLimitRequest"),
            "{body:x?}: {}",
            e.message()
        );
    }
}

#[tokio::test]
async fn a_malformed_request_is_invalid_argument_and_deducts_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &["--free-calls", "100"]);
    assert_malformed_is_invalid_argument(&server).await;
    assert_unknown(&server, "acme").await;

    // The server still answers, and the bodies' account was never touched.
    let mut client = rls(&server).await;
    let r = ask(
        &mut client,
        request("gw", vec![descriptor(&[("account", "steady")], None)], 0),
    )
    .await;
    assert_eq!((r.overall_code, summary(&r)), (OK, vec![(OK, 100, 99)]));
    assert_eq!(used(&server.packs("steady").await, Item::Calls), 1);
    assert_unknown(&server, "acme").await;
}

#[tokio::test]
async fn a_malformed_request_is_invalid_argument_under_noop_too() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &["--noop"]);
    assert_malformed_is_invalid_argument(&server).await;
    let r = ask(
        &mut rls(&server).await,
        request("gw", vec![descriptor(&[("account", "steady")], None)], 0),
    )
    .await;
    assert_eq!(r.overall_code, OK);
    assert_eq!(r.statuses.len(), 1);
}
