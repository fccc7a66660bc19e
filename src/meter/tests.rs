use super::*;
use crate::{
    calendar::{from_datetime, SECOND},
    store::sqlite::SqliteStore,
};
use crate::{ledger::AccountRecord, packs::Item, store::StoredPack};
use proptest::prelude::*;

fn at(s: &str) -> Ts {
    from_datetime(&chrono::DateTime::parse_from_rfc3339(s).unwrap())
}

/// A meter over a real SQLite file. The tempdir lives as long as the meter.
fn meter(cfg: MeterConfig) -> (Meter, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(dir.path().join("t.db").to_str().unwrap()).unwrap();
    (Meter::new(cfg, Arc::new(store)), dir)
}

/// A config that accepts events from years ago, so tests can replay the seed.
fn replay_cfg() -> MeterConfig {
    MeterConfig {
        late_grace: 3_650 * 24 * HOUR,
        dedup_window: 3_650 * 24 * HOUR,
        ..MeterConfig::default()
    }
}

fn new_account(m: &Meter, id: &str, now: Ts) -> Arc<AccountState> {
    let key: Arc<str> = id.into();
    m.accounts
        .entry(key.clone())
        .or_insert_with(|| Arc::new(AccountState::new(key, None, now)))
        .clone()
}

fn calls(n: u64, t: Ts) -> Deduction<'static> {
    Deduction {
        calls: n,
        at: Some(t),
        ..Deduction::default()
    }
}

/// Grants a purchased calls pack valid until `until`.
fn grant(m: &Meter, acct: &AccountState, id: &str, cap: u64, prio: u32, until: Ts, now: Ts) {
    let spec = crate::packs::tests::purchased(id, cap, prio, until, 0);
    m.add_pack(acct, &StoredPack { spec, used: 0 }, now);
}

#[test]
fn first_deduction_activates_at_its_event_time() {
    let (m, _d) = meter(replay_cfg());
    let now = at("2021-01-01T00:00:00Z");
    let a = new_account(&m, "acme", now);
    assert_eq!(a.activated_at(), None);
    let t = at("2019-11-10T17:13:14+08:00");
    let o = m.deduct(&a, &calls(1, t), now).unwrap();
    assert_eq!(o.decision, Decision::Allow);
    assert_eq!(a.activated_at(), Some(t));
    assert_eq!((o.calls.covered, o.calls.remaining), (1, 999_999));
    assert!(a.pending.lock().get().unwrap().account_dirty);
}

#[test]
fn seed_example_covers_resets_and_ends() {
    let (m, _d) = meter(replay_cfg());
    let now = at("2021-01-01T00:00:00Z");
    let a = new_account(&m, "acme", now);
    let t0 = at("2019-11-10T17:13:14+08:00");
    let o = m.deduct(&a, &calls(1_000_000, t0), now).unwrap();
    assert_eq!(
        (o.calls.covered, o.calls.overage, o.calls.remaining),
        (1_000_000, 0, 0)
    );
    let o = m
        .deduct(&a, &calls(1, at("2019-11-30T23:59:59+08:00")), now)
        .unwrap();
    assert_eq!((o.calls.covered, o.calls.overage), (0, 1));
    // Reset at 00:00 on 1 December, billing zone.
    let o = m
        .deduct(&a, &calls(1, at("2019-12-01T00:00:00+08:00")), now)
        .unwrap();
    assert_eq!(
        (o.calls.covered, o.calls.overage, o.calls.remaining),
        (1, 0, 999_999)
    );
    let o = m
        .deduct(&a, &calls(1, at("2020-11-10T23:59:59+08:00")), now)
        .unwrap();
    assert_eq!((o.calls.covered, o.calls.overage), (1, 0));
    let o = m
        .deduct(&a, &calls(1, at("2020-11-11T00:00:00+08:00")), now)
        .unwrap();
    assert_eq!(
        (o.calls.covered, o.calls.overage, o.calls.remaining),
        (0, 1, 0)
    );
}

#[test]
fn deducts_free_tier_then_purchased_by_priority_then_overage() {
    let (m, _d) = meter(MeterConfig {
        plan: FreeTierPlan {
            calls: 10,
            ..FreeTierPlan::default()
        },
        ..replay_cfg()
    });
    let now = at("2024-05-10T00:00:00Z");
    let a = new_account(&m, "acme", now);
    m.deduct(&a, &calls(1, now), now).unwrap(); // activates
    grant(&m, &a, "late-low", 5, 0, now + 100 * HOUR, now);
    grant(&m, &a, "soon-low", 5, 0, now + 10 * HOUR, now);
    grant(&m, &a, "high", 5, 9, now + 900 * HOUR, now);
    let o = m.deduct(&a, &calls(20, now), now).unwrap();
    assert_eq!(
        (o.calls.covered, o.calls.overage, o.calls.remaining),
        (20, 0, 4)
    );
    let used: Vec<(String, u64)> = a
        .packs()
        .iter()
        .filter(|p| p.spec.item == Item::Calls)
        .map(|p| (p.spec.pack_id.to_string(), p.used()))
        .collect();
    assert_eq!(
        used,
        [
            ("free-2024-05-calls".to_string(), 10),
            ("high".to_string(), 5),
            ("soon-low".to_string(), 5),
            ("late-low".to_string(), 1),
        ]
    );
    let o = m.deduct(&a, &calls(7, now), now).unwrap();
    assert_eq!(
        (o.calls.covered, o.calls.overage, o.calls.remaining),
        (4, 3, 0)
    );
    // The ledger holds each pack's part and the overage for this hour.
    let mut slot = a.pending.lock();
    let p = slot.changes();
    let overage: u64 = p
        .deltas
        .iter()
        .filter(|d| d.pack.is_none())
        .map(|d| d.amount)
        .sum();
    let covered: u64 = p
        .deltas
        .iter()
        .filter(|d| d.pack.is_some())
        .map(|d| d.amount)
        .sum();
    assert_eq!((covered, overage), (25, 3));
}

#[test]
fn deny_on_exhausted_denies_uncovered_calls_and_changes_nothing() {
    let (m, _d) = meter(MeterConfig {
        plan: FreeTierPlan {
            calls: 10,
            egress_bytes: 100,
            ..FreeTierPlan::default()
        },
        ..replay_cfg()
    });
    let now = at("2024-05-10T00:00:00Z");
    let a = new_account(&m, "acme", now);
    m.apply_account(
        &a,
        &AccountRecord {
            account_id: "acme".into(),
            activated_at: Some(now - HOUR),
            suspended: false,
            deny_on_exhausted: true,
        },
        now,
    );
    let o = m.deduct(&a, &calls(8, now), now).unwrap();
    assert_eq!(o.decision, Decision::Allow);
    let recorded = |a: &AccountState| -> u64 {
        let slot = a.pending.lock();
        slot.get()
            .map_or(0, |p| p.deltas.iter().map(|d| d.amount).sum())
    };
    let before = recorded(&a);
    // 3 calls, only 2 left: denied whole; nothing deducted, nothing recorded.
    let d = Deduction {
        calls: 3,
        egress_bytes: 50,
        at: Some(now),
        request_id: "r1",
    };
    let o = m.deduct(&a, &d, now).unwrap();
    assert_eq!(o.decision, Decision::Deny(DenyReason::CallsExhausted));
    assert_eq!(
        (o.calls.covered, o.calls.remaining, o.egress_bytes.remaining),
        (0, 2, 100)
    );
    assert_eq!(recorded(&a), before);
    // A denied request id is not remembered: the retry is evaluated afresh.
    let d = Deduction {
        calls: 2,
        egress_bytes: 0,
        at: Some(now),
        request_id: "r1",
    };
    let o = m.deduct(&a, &d, now).unwrap();
    assert_eq!(
        (o.decision, o.duplicate, o.calls.covered),
        (Decision::Allow, false, 2)
    );
    // Egress alone is never denied, even past its pack.
    let o = m
        .deduct(
            &a,
            &Deduction {
                egress_bytes: 150,
                at: Some(now),
                ..Deduction::default()
            },
            now,
        )
        .unwrap();
    assert_eq!(o.decision, Decision::Allow);
    assert_eq!((o.egress_bytes.covered, o.egress_bytes.overage), (100, 50));
    // The egress packs are exhausted now: a check reports the denial the
    // next call would get (R7).
    let o = m
        .deduct(
            &a,
            &Deduction {
                at: Some(now),
                ..Deduction::default()
            },
            now,
        )
        .unwrap();
    assert_eq!(o.decision, Decision::Deny(DenyReason::EgressExhausted));
}

#[test]
fn suspended_accounts_are_denied_calls_but_egress_is_recorded() {
    let (m, _d) = meter(replay_cfg());
    let now = at("2024-05-10T00:00:00Z");
    let a = new_account(&m, "acme", now);
    m.apply_account(
        &a,
        &AccountRecord {
            account_id: "acme".into(),
            activated_at: Some(now),
            suspended: true,
            deny_on_exhausted: false,
        },
        now,
    );
    let o = m
        .deduct(
            &a,
            &Deduction {
                calls: 1,
                egress_bytes: 10,
                at: Some(now),
                request_id: "",
            },
            now,
        )
        .unwrap();
    assert_eq!(o.decision, Decision::Deny(DenyReason::Suspended));
    assert!(a.pending.lock().is_empty());
    let o = m
        .deduct(
            &a,
            &Deduction {
                egress_bytes: 10,
                at: Some(now),
                ..Deduction::default()
            },
            now,
        )
        .unwrap();
    assert_eq!((o.decision, o.egress_bytes.covered), (Decision::Allow, 10));
}

#[test]
fn a_repeated_request_id_deducts_once_within_the_window() {
    let (m, _d) = meter(MeterConfig {
        dedup_window: HOUR,
        ..MeterConfig::default()
    });
    let now = at("2024-05-10T00:00:00Z");
    let a = new_account(&m, "acme", now);
    let d = Deduction {
        calls: 5,
        egress_bytes: 0,
        at: None,
        request_id: "req-1",
    };
    let first = m.deduct(&a, &d, now).unwrap();
    let again = m.deduct(&a, &d, now + 59 * 60 * SECOND).unwrap();
    assert!(!first.duplicate && again.duplicate);
    assert_eq!(again.calls.covered, 5);
    assert_eq!(again.calls.remaining, 1_000_000 - 5);
    // Past the window and past the close of its event's hour (01:00 plus
    // the 1 h grace), the id is forgotten.
    let later = m
        .deduct(
            &a,
            &Deduction {
                at: Some(now + 2 * HOUR),
                ..d
            },
            now + 2 * HOUR,
        )
        .unwrap();
    assert!(!later.duplicate);
    assert_eq!(later.calls.remaining, 1_000_000 - 10);
}

#[test]
fn validation_names_the_field_and_bounds_event_time() {
    let (m, _d) = meter(MeterConfig::default());
    let now = at("2024-05-10T12:30:00Z");
    let ok = |d: Deduction<'_>| m.validate("acme", &d, now);
    assert_eq!(ok(calls(1, now)).unwrap(), now);
    assert!(matches!(
        m.validate("", &calls(1, now), now),
        Err(MeterError::InvalidAccountId("is empty"))
    ));
    assert!(m.validate(&"x".repeat(129), &calls(1, now), now).is_err());
    assert!(m.validate(&"x".repeat(128), &calls(1, now), now).is_ok());
    assert!(m.validate("a\u{7}b", &calls(1, now), now).is_err());
    assert!(matches!(
        ok(calls(1_000_000_001, now)),
        Err(MeterError::AmountTooLarge { field: "calls", .. })
    ));
    assert!(matches!(
        ok(calls(1, now + 301 * SECOND)),
        Err(MeterError::TooFarInFuture { .. })
    ));
    assert!(ok(calls(1, now + 300 * SECOND)).is_ok());
    // 11:00–12:00 closes at 13:00 with a 1 h grace: still open at 12:30.
    assert!(ok(calls(1, at("2024-05-10T11:00:00Z"))).is_ok());
    // 10:00–11:00 closed at 12:00.
    assert!(matches!(
        ok(calls(1, at("2024-05-10T10:59:59Z"))),
        Err(MeterError::HourClosed { .. })
    ));
}

#[test]
fn evicts_only_idle_accounts_with_nothing_unflushed() {
    let (m, _d) = meter(MeterConfig::default());
    let now = at("2024-05-10T12:30:00Z");
    let busy = new_account(&m, "busy", now);
    m.deduct(&busy, &calls(1, now), now).unwrap();
    drop(busy);
    let _idle = new_account(&m, "idle", now - HOUR);
    drop(_idle);
    assert_eq!(m.evict_idle(now - 60 * SECOND), 1);
    assert_eq!(m.resident(), 1);
    assert!(m.accounts.contains_key("busy"));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(32))]
    /// Conservation through the meter: with several threads deducting at
    /// once, covered + overage equals what was asked, covered never exceeds
    /// capacity, and the ledger holds exactly the covered and overage totals.
    #[test]
    fn concurrent_deductions_are_conserved_in_the_ledger(
        free in 0u64..2_000,
        packs in prop::collection::vec(1u64..1_000, 0..3),
        asks in prop::collection::vec(prop::collection::vec(0u64..300, 1..40), 2..4),
    ) {
        let (m, _d) = meter(MeterConfig {
            plan: FreeTierPlan { calls: free, ..FreeTierPlan::default() },
            ..MeterConfig::default()
        });
        let now = at("2024-05-10T12:30:00Z");
        let a = new_account(&m, "acme", now);
        for (i, cap) in packs.iter().enumerate() {
            grant(&m, &a, &format!("p{i}"), *cap, 0, now + HOUR, now);
        }
        let (covered, overage): (u64, u64) = std::thread::scope(|s| {
            let hs: Vec<_> = asks.iter().map(|mine| {
                let (m, a) = (&m, &a);
                s.spawn(move || {
                    let (mut c, mut o) = (0, 0);
                    for want in mine {
                        let r = m.deduct(a, &calls(*want, now), now).unwrap();
                        assert_eq!(r.calls.covered + r.calls.overage, *want);
                        c += r.calls.covered;
                        o += r.calls.overage;
                    }
                    (c, o)
                })
            }).collect();
            hs.into_iter().map(|h| h.join().unwrap()).fold((0, 0), |x, y| (x.0 + y.0, x.1 + y.1))
        });
        let capacity = free + packs.iter().sum::<u64>();
        let asked: u64 = asks.iter().flatten().sum();
        prop_assert_eq!(covered + overage, asked);
        prop_assert_eq!(covered, asked.min(capacity));
        for p in a.packs().iter() {
            prop_assert!(p.used() <= p.spec.capacity);
        }
        let mut slot = a.pending.lock();
        let pending = slot.changes();
        let ledger_covered: u64 = pending.deltas.iter().filter(|d| d.pack.is_some()).map(|d| d.amount).sum();
        let ledger_overage: u64 = pending.deltas.iter().filter(|d| d.pack.is_none()).map(|d| d.amount).sum();
        prop_assert_eq!((ledger_covered, ledger_overage), (covered, overage));
    }
}
