//! The application layer over a real SQLite file, with a manual clock.

use super::*;
use crate::{calendar::from_datetime, clock::ManualClock, store::sqlite::SqliteStore};

fn at(s: &str) -> Ts {
    from_datetime(&chrono::DateTime::parse_from_rfc3339(s).unwrap())
}

fn open(path: &std::path::Path, clock: &Arc<ManualClock>) -> App {
    let store = SqliteStore::open(path.to_str().unwrap()).unwrap();
    App::new(
        MeterConfig::default(),
        Arc::new(store),
        Arc::new(Metrics::new()),
        clock.clone(),
        100,
    )
}

fn req<'a>(account_id: &'a str, calls: u64, at: Option<Ts>, id: &'a str) -> DeductRequest<'a> {
    DeductRequest {
        account_id,
        deduction: Deduction {
            calls,
            egress_bytes: 0,
            at,
            request_id: id,
        },
    }
}

/// R10 across eviction and restart (defect 2): an id processed at 10:00:01
/// for an event at 10:00 is kept until the hour closes at 12:00, though the
/// window is one hour, in the store as in memory.
#[tokio::test]
async fn a_request_id_outlives_eviction_and_restart_until_its_hour_closes() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("pm.db");
    let clock = Arc::new(ManualClock::new(at("2024-05-10T10:00:01Z")));
    let event = Some(at("2024-05-10T10:00:00Z"));
    let app = open(&db, &clock);
    let first = app
        .deduct(&[req("acme", 5, event, "r1")], Atomicity::Each)
        .await
        .unwrap();
    assert!(!first[0].duplicate);
    app.flush().await.unwrap();
    assert_eq!(app.meter().evict_all_flushed(), 1);

    clock.set(at("2024-05-10T11:30:00Z"));
    let again = app
        .deduct(&[req("acme", 5, event, "r1")], Atomicity::Each)
        .await
        .unwrap();
    assert!(again[0].duplicate, "reloaded after eviction: {again:?}");
    drop(app);

    // A restart on the same file remembers it too.
    let app = open(&db, &clock);
    let again = app
        .deduct(&[req("acme", 5, event, "r1")], Atomicity::Each)
        .await
        .unwrap();
    assert!(again[0].duplicate, "after a restart: {again:?}");
    assert_eq!(again[0].calls.remaining, 1_000_000 - 5);
}

/// Closing refuses every later deduction with `ShuttingDown`, including
/// one whose account is already loaded, and changes nothing.
#[tokio::test]
async fn after_close_every_deduction_is_refused_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new(at("2024-05-10T10:00:00Z")));
    let app = open(&dir.path().join("pm.db"), &clock);
    app.deduct(&[req("acme", 1, None, "")], Atomicity::Each)
        .await
        .unwrap();
    app.close();
    assert!(app.closing().is_cancelled());
    let e = app
        .deduct(&[req("acme", 1, None, "")], Atomicity::Each)
        .await
        .unwrap_err();
    assert!(matches!(e.error, MeterError::ShuttingDown), "{e:?}");
    let used: u64 = app
        .list_packs("acme")
        .await
        .unwrap()
        .iter()
        .filter(|p| p.spec.item == Item::Calls)
        .map(|p| p.used)
        .sum();
    assert_eq!(used, 1);
}

/// Settlement (R12): the export bound stops below any hour that still has
/// unflushed usage, and moves past it once that usage is flushed; the hours
/// below the bound then take no deduction, even if the clock steps back.
#[tokio::test]
async fn the_settled_bound_waits_for_unflushed_usage_then_closes_the_hour() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new(at("2024-05-10T10:30:00Z")));
    let app = open(&dir.path().join("pm.db"), &clock);
    let nine = Some(at("2024-05-10T09:10:00Z"));
    app.deduct(&[req("acme", 1, nine, "")], Atomicity::Each)
        .await
        .unwrap();
    // 11:05: 09:00–10:00 closed at 11:00, but its usage is not flushed.
    clock.set(at("2024-05-10T11:05:00Z"));
    assert_eq!(
        app.settled_before().await.unwrap(),
        at("2024-05-10T09:00:00Z")
    );
    app.flush().await.unwrap();
    assert_eq!(
        app.settled_before().await.unwrap(),
        at("2024-05-10T10:00:00Z")
    );
    clock.set(at("2024-05-10T10:50:00Z"));
    let e = app
        .deduct(&[req("acme", 1, nine, "")], Atomicity::Each)
        .await
        .unwrap_err();
    assert!(matches!(e.error, MeterError::HourClosed { .. }), "{e:?}");
    assert_eq!(app.meter().dirty_len(), 0);
}

/// R10 through the application layer, racing on a multi-threaded runtime:
/// retries of one request id sent at once deduct once; the others wait out
/// the original and answer as duplicates (or, if it stays in flight past
/// the bound, are refused as retryable).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn racing_retries_through_the_app_deduct_once() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new(at("2024-05-10T10:00:00Z")));
    let app = Arc::new(open(&dir.path().join("pm.db"), &clock));
    for round in 0..20 {
        let id = format!("race-{round}");
        let tasks: Vec<_> = (0..8)
            .map(|_| {
                let (app, id) = (app.clone(), id.clone());
                tokio::spawn(async move {
                    app.deduct(&[req("acme", 1, None, &id)], Atomicity::Each)
                        .await
                        .map(|o| o[0])
                })
            })
            .collect();
        let mut fresh = 0;
        for t in tasks {
            match t.await.unwrap() {
                Ok(o) if !o.duplicate => fresh += 1,
                Ok(o) => assert_eq!(o.calls.covered, 1),
                Err(e) => assert!(matches!(e.error, MeterError::DuplicateInFlight(_)), "{e:?}"),
            }
        }
        assert_eq!(fresh, 1, "round {round}");
    }
    let used: u64 = app
        .list_packs("acme")
        .await
        .unwrap()
        .iter()
        .filter(|p| p.spec.item == Item::Calls)
        .map(|p| p.used)
        .sum();
    assert_eq!(used, 20);
}

/// The daily usage counts each deduction once, whether it is still in
/// memory, being flushed, or in the store: it is read while no flush runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn daily_usage_counts_each_deduction_once_while_flushes_run() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new(at("2024-05-10T10:00:00Z")));
    let app = Arc::new(open(&dir.path().join("pm.db"), &clock));
    let total = |days: &[crate::daily::Day]| -> u128 { days.iter().map(|d| d.calls.total()).sum() };
    let mut deducted = 0u128;
    for round in 0..200u64 {
        // Spread over two days, and past the free tier into overage.
        clock.set(at("2024-05-09T10:00:00Z") + (round % 2) as i64 * 86_400_000_000);
        app.deduct(&[req("acme", 10_000, None, "")], Atomicity::Each)
            .await
            .unwrap();
        deducted += 10_000;
        clock.set(at("2024-05-10T12:00:00Z"));
        let flusher = {
            let app = app.clone();
            tokio::spawn(async move { app.flush().await.unwrap() })
        };
        let days = app.daily_usage("acme", 3).await.unwrap();
        assert_eq!(total(&days), deducted, "round {round}: {days:?}");
        flusher.await.unwrap();
    }
    let days = app.daily_usage("acme", 3).await.unwrap();
    assert_eq!(days.len(), 3);
    assert_eq!(days[0].date.to_string(), "2024-05-08");
    assert_eq!(days[1].calls.total() + days[2].calls.total(), deducted);
    // 2,000,000 calls over one month: half of it past the free tier.
    let overage: u128 = days.iter().map(|d| d.calls.overage).sum();
    assert_eq!(overage, 1_000_000);
    // An unknown account is an error, not an empty chart.
    assert!(matches!(
        app.daily_usage("nobody", 3).await,
        Err(MeterError::NotFound(_))
    ));
}

/// The ids [`admitting_a_group_refuses_what_checking_each_request_refuses`]
/// draws from: two resident, one valid but not resident, and invalid ones
/// (a C0 and a C1 control character, empty, over 128 bytes).
fn admit_ids() -> [String; 7] {
    [
        "acme".into(),
        "loadgen-0000001".into(),
        "zeta".into(),
        "bad\u{1}id".into(),
        "\u{e9}\u{85}".into(),
        String::new(),
        "x".repeat(129),
    ]
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(96))]

    /// `admit` looks a group's accounts up as it checks its requests, and
    /// does not check the id of one found resident again. It refuses the
    /// same request with the same error as checking every request in order
    /// with `Meter::validate`, whatever is invalid where, and hands the
    /// accounts over only when every one is resident (and the group is
    /// more than one).
    #[test]
    fn admitting_a_group_refuses_what_checking_each_request_refuses(
        picks in proptest::collection::vec((0usize..7, 0usize..3, 0usize..3, 0usize..4), 1..6),
    ) {
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let now = at("2024-05-10T10:30:00Z");
        let clock = Arc::new(ManualClock::new(now));
        let app = open(&dir.path().join("pm.db"), &clock);
        let ids = admit_ids();
        let resident: Vec<_> = rt.block_on(async {
            let mut r = Vec::new();
            for id in &ids[..2] {
                r.push(app.meter().account_for_admin(id, now).await.unwrap());
            }
            r
        });
        let max = app.config().max_calls;
        let reqs: Vec<DeductRequest<'_>> = picks
            .iter()
            .map(|&(id, calls, rid, when)| DeductRequest {
                account_id: &ids[id],
                deduction: Deduction {
                    calls: [1, 0, max + 1][calls],
                    egress_bytes: 0,
                    at: [
                        None,
                        Some(now),
                        Some(now + crate::calendar::HOUR),
                        Some(now - 3 * crate::calendar::HOUR),
                    ][when],
                    request_id: ["", "r1", "r\u{0}"][rid],
                },
            })
            .collect();
        let expected = reqs.iter().enumerate().find_map(|(i, r)| {
            app.meter()
                .validate(r.account_id, &r.deduction, now)
                .err()
                .map(|e| (i, e.to_string()))
        });
        match (app.admit(&reqs), expected) {
            (Ok((t, accounts)), None) => {
                proptest::prop_assert_eq!(t, now);
                let all_resident = picks.iter().all(|p| p.0 < 2);
                match accounts {
                    Some(accounts) => {
                        proptest::prop_assert!(all_resident && reqs.len() > 1);
                        for (a, p) in accounts.iter().zip(&picks) {
                            proptest::prop_assert!(Arc::ptr_eq(a, &resident[p.0]));
                        }
                        proptest::prop_assert_eq!(accounts.len(), reqs.len());
                    }
                    None => proptest::prop_assert!(!all_resident || reqs.len() == 1),
                }
            }
            (Err(Refused { index, error }), Some((i, e))) => {
                proptest::prop_assert_eq!((index, error.to_string()), (i, e));
            }
            (got, want) => proptest::prop_assert!(
                false,
                "admit gave {:?}, checking each gave {:?}",
                got.map(|(t, a)| (t, a.map(|a| a.len()))).map_err(|r| (r.index, r.error.to_string())),
                want
            ),
        }
    }
}

/// Nothing becomes resident with an invalid id, whoever asks: a request
/// found resident is not checked again (`App::admit`).
#[tokio::test]
async fn an_invalid_id_never_becomes_resident() {
    let dir = tempfile::tempdir().unwrap();
    let now = at("2024-05-10T10:30:00Z");
    let clock = Arc::new(ManualClock::new(now));
    let app = open(&dir.path().join("pm.db"), &clock);
    for id in admit_ids().iter().skip(3) {
        let made = app.meter().account_for_deduction(id, now).await;
        assert!(
            matches!(made, Err(MeterError::InvalidAccountId(_))),
            "{id:?}: {made:?}"
        );
        assert!(app.meter().resident_account(id).is_none(), "{id:?}");
    }
    assert_eq!(app.meter().resident(), 0);
}
