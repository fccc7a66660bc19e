//! The seed document's example, end to end over gRPC: activation at
//! 2019-11-10 17:13:14 +08:00, 13 monthly packs, the reset on 1 December,
//! the last covered second and the first second of overage, then settled
//! hourly rows after a restart.
//!
//! The server runs with a 10-year late grace so that 2019 events are still
//! accepted (R9), then restarts with the default grace, which closes those
//! hours and lets them be exported as settled (R12).

mod common;

use common::{deduct, split, ts, Server};
use packmeter::grpc::proto::{self, Item, PackSource};

const REPLAY: &[&str] = &["--late-grace", "3650d", "--dedup-window", "3650d"];
const ACTIVATION: &str = "2019-11-10T17:13:14+08:00";

#[tokio::test]
async fn seed_example_end_to_end() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), REPLAY);
    let mut meter = server.meter().await;
    let mut admin = server.admin().await;

    // R1: the first deduction activates the account at its event time.
    let r = meter
        .deduct(deduct("acme", 1_000_000, 1 << 30, Some(ACTIVATION)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.decision, proto::Decision::Allow as i32);
    assert_eq!(split(&r.calls), (1_000_000, 0, 0));
    assert_eq!(split(&r.egress_bytes), (1 << 30, 0, 0));
    let account = admin
        .get_account(proto::GetAccountRequest {
            account_id: "acme".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(account.activated_at, Some(ts(ACTIVATION)));

    // R3: 13 monthly packs per item.
    let packs = admin
        .list_packs(proto::ListPacksRequest {
            account_id: "acme".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .packs;
    let calls: Vec<_> = packs
        .iter()
        .filter(|p| p.item == Item::Calls as i32)
        .collect();
    assert_eq!(calls.len(), 13);
    assert_eq!(packs.len(), 26);
    assert!(packs
        .iter()
        .all(|p| p.source == PackSource::FreeTier as i32));
    assert_eq!(calls[0].valid_from, Some(ts(ACTIVATION)));
    assert_eq!(calls[0].valid_until, Some(ts("2019-12-01T00:00:00+08:00")));
    assert_eq!(calls[0].used, 1_000_000);
    assert_eq!(calls[12].valid_from, Some(ts("2020-11-01T00:00:00+08:00")));
    assert_eq!(calls[12].valid_until, Some(ts("2020-11-11T00:00:00+08:00")));

    // R4: November is used up; the last second of November is overage ...
    let r = meter
        .deduct(deduct("acme", 1, 1, Some("2019-11-30T23:59:59+08:00")))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(split(&r.calls), (0, 1, 0));
    assert_eq!(split(&r.egress_bytes), (0, 1, 0));
    // ... and the counter resets at 00:00:00 on 1 December in +08:00.
    let r = meter
        .deduct(deduct("acme", 1, 0, Some("2019-12-01T00:00:00+08:00")))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(split(&r.calls), (1, 0, 999_999));

    // R2: 2020-11-10 23:59:59 is still covered; the next second is overage.
    let r = meter
        .deduct(deduct("acme", 1, 0, Some("2020-11-10T23:59:59+08:00")))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(split(&r.calls), (1, 0, 999_999));
    let r = meter
        .deduct(deduct("acme", 1, 0, Some("2020-11-11T00:00:00+08:00")))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(split(&r.calls), (0, 1, 0));

    // GetUsage shows the packs valid at an instant.
    let usage = meter
        .get_usage(proto::GetUsageRequest {
            account_id: "acme".into(),
            at: Some(ts("2019-12-15T12:00:00+08:00")),
        })
        .await
        .unwrap()
        .into_inner()
        .packs;
    assert_eq!(usage.len(), 2);
    assert_eq!(common::used(&usage, Item::Calls), 1);

    admin.flush(proto::FlushRequest {}).await.unwrap();
    let (status, _) = server.terminate();
    assert!(status.success());

    // Restart with the default 1 h grace: the 2019–2020 hours are closed now.
    let server = Server::start_on(&dir.path().join("packmeter.db"), &[]);
    let mut admin = server.admin().await;
    let packs = admin
        .list_packs(proto::ListPacksRequest {
            account_id: "acme".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .packs;
    assert_eq!(common::used(&packs, Item::Calls), 1_000_002);
    let mut rows = admin
        .export_usage(proto::ExportUsageRequest {
            from: Some(ts("2019-11-01T00:00:00+08:00")),
            to: Some(ts("2020-12-01T00:00:00+08:00")),
            account_id: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let mut got = Vec::new();
    while let Some(r) = rows.message().await.unwrap() {
        got.push(r);
    }
    let sum = |item: Item, pack: Option<&str>| -> u64 {
        got.iter()
            .filter(|r| r.item == item as i32 && pack.is_none_or(|p| r.pack_id == p))
            .map(|r| r.amount)
            .sum()
    };
    assert_eq!(sum(Item::Calls, Some("free-2019-11-calls")), 1_000_000);
    assert_eq!(sum(Item::Calls, Some("free-2019-12-calls")), 1);
    assert_eq!(sum(Item::Calls, Some("free-2020-11-calls")), 1);
    assert_eq!(sum(Item::Calls, Some("")), 2, "two calls of overage");
    assert_eq!(sum(Item::EgressBytes, None), (1 << 30) + 1);
    // The activation hour's row: 09:00 UTC on 2019-11-10.
    let first = &got[0];
    assert_eq!(first.hour, Some(ts("2019-11-10T09:00:00Z")));
    // The overage of 2019-11-30 23:59:59 +08:00 sits in the 15:00 UTC hour.
    let overage_row = got
        .iter()
        .find(|r| r.pack_id.is_empty() && r.item == Item::Calls as i32)
        .expect("an overage row");
    assert_eq!(overage_row.hour, Some(ts("2019-11-30T15:00:00Z")));
    assert_eq!(overage_row.source, PackSource::Unspecified as i32);
    assert_eq!(overage_row.amount, 1);
}
