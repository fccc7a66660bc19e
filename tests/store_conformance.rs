//! One conformance suite for every store: each behaviour below runs once on
//! a real SQLite file in a tempdir and once on a real PostgreSQL database
//! of its own (see `common::pg`; skipped with `SKIPPED:` outside CI when no
//! server answers). Every store must give the same answers through the
//! [`Store`] trait: what the meter, the flusher and exports rely on.
//!
//! PostgreSQL-only behaviours (the schema version, migrations racing at
//! start, sslmode, connection loss) follow in `mod postgres_only`.

mod common;

use std::sync::Arc;

use packmeter::{
    calendar::Ts,
    ledger::{AccountFlush, AccountRecord, DedupRecord, DeltaRow, FlushBatch, UsageKey, UsageRow},
    packs::{Item, PackSource, PackSpec},
    store::{self, ChangeKind, Granted, Store, StoreUrl},
};

const HOUR: Ts = 3_600 * 1_000_000;

/// A store under test: how to open (and reopen) it, and what keeps it alive.
struct Target {
    url: StoreUrl,
    _dir: Option<tempfile::TempDir>,
    #[cfg(feature = "postgres")]
    _db: Option<common::pg::TestDb>,
    /// PostgreSQL with flushes updating rows by key, as on servers without
    /// `ctid` (CockroachDB, YugabyteDB).
    #[cfg(feature = "postgres")]
    keyed: bool,
}

impl Target {
    fn sqlite() -> Target {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("nested/pm.db").display());
        Target {
            url: url.parse().unwrap(),
            _dir: Some(dir),
            #[cfg(feature = "postgres")]
            _db: None,
            #[cfg(feature = "postgres")]
            keyed: false,
        }
    }

    #[cfg(feature = "postgres")]
    async fn postgres() -> Option<Target> {
        let db = common::pg::TestDb::create().await?;
        Some(Target {
            url: db.url.parse().unwrap(),
            _dir: None,
            _db: Some(db),
            keyed: false,
        })
    }

    #[cfg(feature = "postgres")]
    async fn postgres_keyed() -> Option<Target> {
        Some(Target {
            keyed: true,
            ..Target::postgres().await?
        })
    }

    /// Opens the store; again for a reopen.
    async fn open(&self) -> Arc<dyn Store> {
        #[cfg(feature = "postgres")]
        if let (true, StoreUrl::Postgres(url)) = (self.keyed, &self.url) {
            return Arc::new(
                store::postgres::PostgresStore::open(url)
                    .await
                    .expect("open the store")
                    .with_keyed_updates(),
            );
        }
        store::open(&self.url).await.expect("open the store")
    }
}

/// Each behaviour, once per store.
macro_rules! conformance {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test]
                async fn $name() {
                    super::$name(&super::Target::sqlite()).await;
                }
            )*
        }
        #[cfg(feature = "postgres")]
        mod postgres {
            $(
                #[tokio::test]
                async fn $name() {
                    let Some(target) = super::Target::postgres().await else {
                        return;
                    };
                    super::$name(&target).await;
                }
            )*
        }
    };
}

conformance!(
    an_unknown_account_is_empty,
    accounts_are_created_and_replaced,
    a_grant_is_idempotent_by_pack_id,
    packs_list_in_validity_then_id_order_and_load_only_unexpired,
    a_flushed_batch_is_read_back_after_reopening,
    a_batch_is_applied_once_by_its_id,
    a_batch_is_all_or_nothing,
    sums_beyond_2_63_are_refused_never_wrapped,
    a_batch_may_name_a_key_twice,
    request_ids_are_kept_until_they_expire,
    concurrent_batches_on_the_same_rows_sum_exactly,
    racing_grants_of_one_pack_create_it_once,
    usage_pages_list_every_row_once_in_key_order,
    usage_pages_resume_right_after_any_cursor,
    usage_pages_keep_to_the_hours_and_the_account,
    ping_answers,
    the_settled_mark_only_moves_forward_and_outlives_a_reopen,
    a_flushed_activation_only_moves_back,
    an_activation_moves_back_and_new_accounts_get_their_row_when_packs_are_stored,
    loading_sums_what_the_open_hours_hold,
    changes_are_recorded_with_account_puts_and_new_grants,
    concurrent_changes_get_distinct_numbers_and_all_show,
    a_flush_caps_every_pack_and_books_the_rest_as_overage,
    excess_moves_to_the_next_pack_valid_for_the_whole_hour_in_r6_order,
    excess_moves_to_a_pack_granted_during_the_hour_before_its_events,
    a_request_id_another_batch_recorded_is_billed_once,
    a_flush_returns_the_global_totals,
    plans_are_recorded_once_per_place_and_survive_a_reopen,
    a_recalculation_moves_usage_once_even_when_runs_race,
);

/// The flush's behaviours again on PostgreSQL, with rows updated by key
/// rather than by `ctid` (what servers without `ctid` get).
#[cfg(feature = "postgres")]
mod postgres_keyed {
    macro_rules! keyed {
        ($($name:ident),* $(,)?) => {
            $(
                #[tokio::test]
                async fn $name() {
                    let Some(target) = super::Target::postgres_keyed().await else {
                        return;
                    };
                    super::$name(&target).await;
                }
            )*
        };
    }
    keyed!(
        a_flushed_batch_is_read_back_after_reopening,
        a_batch_is_applied_once_by_its_id,
        a_batch_is_all_or_nothing,
        sums_beyond_2_63_are_refused_never_wrapped,
        a_batch_may_name_a_key_twice,
        concurrent_batches_on_the_same_rows_sum_exactly,
        loading_sums_what_the_open_hours_hold,
        a_flush_caps_every_pack_and_books_the_rest_as_overage,
        a_request_id_another_batch_recorded_is_billed_once,
        a_flush_returns_the_global_totals,
    );
}

fn spec(id: &str) -> PackSpec {
    PackSpec {
        pack_id: id.into(),
        source: PackSource::Purchased,
        item: Item::Calls,
        capacity: 100,
        valid_from: 0,
        valid_until: 1_000,
        priority: 1,
        created_at: 5,
    }
}

fn record(id: &str, activated_at: Option<Ts>) -> AccountRecord {
    AccountRecord {
        account_id: id.into(),
        activated_at,
        suspended: false,
        deny_on_exhausted: false,
    }
}

fn delta(hour: Ts, pack: Option<PackSpec>, amount: u64) -> DeltaRow {
    DeltaRow {
        hour,
        item: pack.as_ref().map_or(Item::Calls, |p| p.item),
        pack,
        amount,
        span: None,
    }
}

fn dedup(id: &str, expires_at: Ts, covered: u64) -> DedupRecord {
    DedupRecord {
        request_id: id.into(),
        expires_at,
        hour: None,
        calls_covered: covered,
        calls_overage: 1,
        egress_covered: 2,
        egress_overage: 3,
    }
}

fn account(id: &str, deltas: Vec<DeltaRow>, dedup: Vec<DedupRecord>) -> AccountFlush {
    AccountFlush {
        account_id: id.into(),
        account: None,
        deltas,
        dedup,
    }
}

fn batch(id: &str, now: Ts, accounts: Vec<AccountFlush>) -> FlushBatch {
    FlushBatch {
        batch_id: id.into(),
        accounts,
        now,
    }
}

/// Every usage row of an account, through the paging API.
async fn usage_of(store: &dyn Store, account: &str) -> Vec<UsageRow> {
    store
        .usage_rows_page(Ts::MIN, Ts::MAX, Some(account), None, 10_000)
        .await
        .unwrap()
}

fn total(rows: &[UsageRow]) -> u64 {
    rows.iter().map(|r| r.amount).sum()
}

async fn used(store: &dyn Store, account: &str, pack: &str) -> u64 {
    store
        .list_packs(account)
        .await
        .unwrap()
        .into_iter()
        .find(|p| &*p.spec.pack_id == pack)
        .map_or(0, |p| p.used)
}

async fn an_unknown_account_is_empty(t: &Target) {
    let store = t.open().await;
    let loaded = store.load_account("nobody", 0, 0).await.unwrap();
    assert!(loaded.is_unknown() && loaded.dedup.is_empty());
    assert_eq!(store.get_account("nobody").await.unwrap(), None);
    assert!(store.list_packs("nobody").await.unwrap().is_empty());
    assert!(usage_of(&*store, "nobody").await.is_empty());
}

async fn accounts_are_created_and_replaced(t: &Target) {
    let store = t.open().await;
    let mut a = record("acct", None);
    store.put_account(&a).await.unwrap();
    assert_eq!(store.get_account("acct").await.unwrap(), Some(a.clone()));
    a.activated_at = Some(-7);
    a.suspended = true;
    a.deny_on_exhausted = true;
    store.put_account(&a).await.unwrap();
    assert_eq!(store.get_account("acct").await.unwrap(), Some(a.clone()));
    // Replaced whole: activation can be cleared again.
    a.activated_at = None;
    a.suspended = false;
    store.put_account(&a).await.unwrap();
    let loaded = store.load_account("acct", 0, 0).await.unwrap();
    assert_eq!(loaded.account, Some(a));
    assert!(!loaded.is_unknown());
    // Ids are opaque text: any Unicode, compared exactly.
    let odd = record("Ünïcode ✓ 'quoted' \"x\" %_", Some(1));
    store.put_account(&odd).await.unwrap();
    assert_eq!(store.get_account(&odd.account_id).await.unwrap(), Some(odd));
    assert_eq!(store.get_account("ACCT").await.unwrap(), None);
}

async fn a_grant_is_idempotent_by_pack_id(t: &Target) {
    let store = t.open().await;
    let p = spec("p1");
    assert_eq!(
        store.grant_pack("acct", &p).await.unwrap(),
        Granted::New(store::StoredPack {
            spec: p.clone(),
            used: 0
        })
    );
    // The account exists from its first grant, not activated.
    assert_eq!(
        store.get_account("acct").await.unwrap(),
        Some(record("acct", None))
    );
    // The same id again, even with other terms, returns the stored pack.
    let other = PackSpec {
        capacity: 5,
        ..spec("p1")
    };
    match store.grant_pack("acct", &other).await.unwrap() {
        Granted::Existing(s) => assert_eq!(s.spec, p),
        g => panic!("expected Existing, got {g:?}"),
    }
    // The same pack id on another account is another pack.
    assert!(matches!(
        store.grant_pack("other", &p).await.unwrap(),
        Granted::New(_)
    ));
    assert_eq!(store.list_packs("acct").await.unwrap().len(), 1);
    // A grant never touches an existing account row.
    store
        .put_account(&AccountRecord {
            suspended: true,
            ..record("acct", Some(3))
        })
        .await
        .unwrap();
    store.grant_pack("acct", &spec("p2")).await.unwrap();
    let a = store.get_account("acct").await.unwrap().unwrap();
    assert_eq!((a.activated_at, a.suspended), (Some(3), true));
    // The largest capacity a store holds; one more is refused.
    let big = PackSpec {
        capacity: i64::MAX as u64,
        ..spec("big")
    };
    assert!(matches!(
        store.grant_pack("acct", &big).await.unwrap(),
        Granted::New(_)
    ));
    let too_big = PackSpec {
        capacity: i64::MAX as u64 + 1,
        ..spec("too-big")
    };
    let e = store.grant_pack("acct", &too_big).await.unwrap_err();
    assert!(!e.transient, "{e}");
    assert!(store
        .list_packs("acct")
        .await
        .unwrap()
        .iter()
        .all(|p| &*p.spec.pack_id != "too-big"));
}

async fn packs_list_in_validity_then_id_order_and_load_only_unexpired(t: &Target) {
    let store = t.open().await;
    let at = |id: &str, from: Ts, until: Ts| PackSpec {
        valid_from: from,
        valid_until: until,
        ..spec(id)
    };
    for p in [
        at("b", 10, 20),
        at("a", 10, 30),
        at("Z", 10, 30),
        at("early", 0, 10),
        at("late", 30, 40),
    ] {
        store.grant_pack("acct", &p).await.unwrap();
    }
    let ids: Vec<String> = store
        .list_packs("acct")
        .await
        .unwrap()
        .iter()
        .map(|p| p.spec.pack_id.to_string())
        .collect();
    // Within a start, ids byte-wise ("Z" < "a"), whatever the database's
    // collation.
    assert_eq!(ids, ["early", "Z", "a", "b", "late"]);
    // Loading keeps the packs valid after `since`.
    let mut loaded: Vec<String> = store
        .load_account("acct", 20, 0)
        .await
        .unwrap()
        .packs
        .iter()
        .map(|p| p.spec.pack_id.to_string())
        .collect();
    loaded.sort();
    assert_eq!(loaded, ["Z", "a", "late"]);
    // Every field survives the round trip.
    let full = PackSpec {
        pack_id: "full".into(),
        source: PackSource::FreeTier,
        item: Item::EgressBytes,
        capacity: 1 << 40,
        valid_from: -5,
        valid_until: i64::MAX,
        priority: u32::MAX,
        created_at: 1_700_000_000_000_000,
    };
    store.grant_pack("acct", &full).await.unwrap();
    let got = store
        .list_packs("acct")
        .await
        .unwrap()
        .into_iter()
        .find(|p| &*p.spec.pack_id == "full")
        .unwrap();
    assert_eq!(got.spec, full);
}

async fn a_flushed_batch_is_read_back_after_reopening(t: &Target) {
    {
        let store = t.open().await;
        assert!(matches!(
            store.grant_pack("acct", &spec("p1")).await.unwrap(),
            Granted::New(_)
        ));
        let mut a = account(
            "acct",
            vec![delta(0, Some(spec("p1")), 30), delta(0, None, 4)],
            vec![dedup("r1", 500, 30)],
        );
        a.account = Some(record("acct", Some(7)));
        assert!(store.write_batch(&batch("b1", 10, vec![a])).await.unwrap());
    }
    let store = t.open().await;
    let loaded = store.load_account("acct", 0, 100).await.unwrap();
    assert_eq!(loaded.account.unwrap().activated_at, Some(7));
    assert_eq!(loaded.packs.len(), 1);
    assert_eq!(loaded.packs[0].used, 30);
    assert_eq!(loaded.dedup, [dedup("r1", 500, 30)]);
    let rows = usage_of(&*store, "acct").await;
    assert_eq!(
        rows.iter()
            .map(|r| (r.pack_id.as_str(), r.source, r.amount))
            .collect::<Vec<_>>(),
        [("", None, 4), ("p1", Some(PackSource::Purchased), 30)]
    );
    // Granting the same id again returns the stored pack untouched.
    match store.grant_pack("acct", &spec("p1")).await.unwrap() {
        Granted::Existing(p) => assert_eq!(p.used, 30),
        other => panic!("expected Existing, got {other:?}"),
    }
}

async fn a_batch_is_applied_once_by_its_id(t: &Target) {
    let mut store = t.open().await;
    let b = batch(
        "b1",
        10,
        vec![account(
            "acct",
            vec![delta(0, Some(spec("p1")), 30)],
            vec![],
        )],
    );
    assert!(store.write_batch(&b).await.unwrap());
    // The same batch again is recognised and skipped, also by a reopened
    // store (a spill replayed at the next start).
    assert!(!store.write_batch(&b).await.unwrap());
    // One server per store (a SQLite file is locked while open): close first.
    drop(store);
    store = t.open().await;
    assert!(!store.write_batch(&b).await.unwrap());
    assert_eq!(used(&*store, "acct", "p1").await, 30);
    // The same content under a new id is new usage.
    let again = FlushBatch {
        batch_id: "b2".into(),
        ..b.clone()
    };
    assert!(store.write_batch(&again).await.unwrap());
    assert_eq!(used(&*store, "acct", "p1").await, 60);
    assert_eq!(total(&usage_of(&*store, "acct").await), 60);
    // An empty batch is applied (and recorded) too.
    assert!(store.write_batch(&batch("b3", 10, vec![])).await.unwrap());
    assert!(!store.write_batch(&batch("b3", 10, vec![])).await.unwrap());
}

async fn a_batch_is_all_or_nothing(t: &Target) {
    let store = t.open().await;
    store.grant_pack("good", &spec("p1")).await.unwrap();
    let mut good = account(
        "good",
        vec![delta(0, Some(spec("p1")), 5), delta(0, None, 1)],
        vec![dedup("r1", 500, 5)],
    );
    good.account = Some(record("good", Some(1)));
    // An amount no store can hold, in the batch's last account.
    let bad = account("bad", vec![delta(0, None, u64::MAX)], vec![]);
    let e = store
        .write_batch(&batch("b1", 10, vec![good.clone(), bad]))
        .await
        .unwrap_err();
    assert!(!e.transient, "{e}");
    // Nothing of it is there: not the good account's usage, its request
    // ids, its activation, nor the batch id.
    let loaded = store.load_account("good", 0, 0).await.unwrap();
    assert_eq!(loaded.account.unwrap().activated_at, None);
    assert!(loaded.dedup.is_empty());
    assert_eq!(loaded.packs[0].used, 0);
    assert!(usage_of(&*store, "good").await.is_empty());
    assert!(usage_of(&*store, "bad").await.is_empty());
    assert_eq!(store.get_account("bad").await.unwrap(), None);
    // The id was not recorded: the batch without the bad account applies.
    assert!(store
        .write_batch(&batch("b1", 10, vec![good]))
        .await
        .unwrap());
    assert_eq!(used(&*store, "good", "p1").await, 5);
}

async fn sums_beyond_2_63_are_refused_never_wrapped(t: &Target) {
    let store = t.open().await;
    let max = i64::MAX as u64;
    let p = PackSpec {
        capacity: max,
        ..spec("p1")
    };
    assert!(store
        .write_batch(&batch(
            "b1",
            10,
            vec![account(
                "acct",
                vec![delta(0, Some(p.clone()), max), delta(0, None, max)],
                vec![]
            )]
        ))
        .await
        .unwrap());
    // One more on either row would pass 2^63-1: refused, nothing changed,
    // including the other account in the same batch.
    for d in [delta(0, None, 1), delta(0, Some(p.clone()), 1)] {
        let e = store
            .write_batch(&batch(
                "b2",
                20,
                vec![
                    account("other", vec![delta(0, None, 9)], vec![]),
                    account("acct", vec![d], vec![]),
                ],
            ))
            .await
            .unwrap_err();
        assert!(!e.transient, "{e}");
        assert!(e.message.contains("2^63"), "{e}");
    }
    let rows = usage_of(&*store, "acct").await;
    assert_eq!(
        rows.iter().map(|r| r.amount).collect::<Vec<_>>(),
        [max, max]
    );
    assert_eq!(used(&*store, "acct", "p1").await, max);
    assert!(usage_of(&*store, "other").await.is_empty());
    // The next hour is a new row.
    assert!(store
        .write_batch(&batch(
            "b3",
            30,
            vec![account("acct", vec![delta(HOUR, None, 1)], vec![])]
        ))
        .await
        .unwrap());
    // A request record's amounts are refused above 2^63-1 too.
    let e = store
        .write_batch(&batch(
            "b4",
            40,
            vec![account("acct", vec![], vec![dedup("r", 99, u64::MAX)])],
        ))
        .await
        .unwrap_err();
    assert!(!e.transient, "{e}");
}

async fn a_batch_may_name_a_key_twice(t: &Target) {
    // The meter starts a second delta for a key whose sum would pass 2^64,
    // and a request id may be recorded twice; the batch still applies as
    // the sum of its rows and the last record.
    let store = t.open().await;
    let mut first = account(
        "acct",
        vec![
            delta(0, Some(spec("p1")), 3),
            delta(0, Some(spec("p1")), 4),
            delta(0, None, 1),
        ],
        vec![dedup("r1", 500, 1)],
    );
    first.account = Some(record("acct", None));
    let mut second = account("acct", vec![delta(0, None, 2)], vec![dedup("r1", 600, 2)]);
    second.account = Some(record("acct", Some(9)));
    assert!(store
        .write_batch(&batch("b1", 10, vec![first, second]))
        .await
        .unwrap());
    assert_eq!(used(&*store, "acct", "p1").await, 7);
    let rows = usage_of(&*store, "acct").await;
    assert_eq!(
        rows.iter()
            .map(|r| (r.pack_id.as_str(), r.amount))
            .collect::<Vec<_>>(),
        [("", 3), ("p1", 7)]
    );
    let loaded = store.load_account("acct", 0, 0).await.unwrap();
    assert_eq!(loaded.dedup, [dedup("r1", 600, 2)]);
    assert_eq!(loaded.account.unwrap().activated_at, Some(9));
}

async fn request_ids_are_kept_until_they_expire(t: &Target) {
    let store = t.open().await;
    let mut a = account(
        "acct",
        vec![],
        vec![dedup("r1", 500, 1), dedup("r2", 900, 2)],
    );
    a.account = Some(record("acct", Some(1)));
    assert!(store.write_batch(&batch("b1", 10, vec![a])).await.unwrap());
    let keys = |loaded: packmeter::store::LoadedAccount| {
        let mut ids: Vec<String> = loaded
            .dedup
            .iter()
            .map(|d| d.request_id.to_string())
            .collect();
        ids.sort();
        ids
    };
    assert_eq!(
        keys(store.load_account("acct", 0, 499).await.unwrap()),
        ["r1", "r2"]
    );
    // Expired at `now`: not loaded, though still stored.
    assert_eq!(
        keys(store.load_account("acct", 0, 500).await.unwrap()),
        ["r2"]
    );
    // A later record of the same id, once the stored one has expired,
    // replaces it. (While it has not, the later one is a duplicate: see
    // a_request_id_another_batch_recorded_is_billed_once.)
    let again = account("acct", vec![], vec![dedup("r1", 2_000, 7)]);
    assert!(store
        .write_batch(&batch("b2", 600, vec![again]))
        .await
        .unwrap());
    let loaded = store.load_account("acct", 0, 1_000).await.unwrap();
    assert_eq!(loaded.dedup, [dedup("r1", 2_000, 7)]);
    // A batch stamped past an expiry deletes the key for good.
    assert!(store
        .write_batch(&batch("b3", 1_000, vec![]))
        .await
        .unwrap());
    assert_eq!(
        keys(store.load_account("acct", 0, 0).await.unwrap()),
        ["r1"]
    );
}

async fn concurrent_batches_on_the_same_rows_sum_exactly(t: &Target) {
    let store = t.open().await;
    let tasks: Vec<_> = (0..16u64)
        .map(|i| {
            let store = store.clone();
            tokio::spawn(async move {
                let b = batch(
                    &format!("b{i}"),
                    10,
                    vec![
                        account(
                            "x",
                            vec![delta(0, Some(spec("p1")), i + 1), delta(0, None, 1)],
                            vec![dedup(&format!("r{i}"), 500, 1)],
                        ),
                        account("y", vec![delta(HOUR, None, 2)], vec![]),
                    ],
                );
                // A transient conflict (deadlock, serialization) is retried,
                // as the flusher does.
                loop {
                    match store.write_batch(&b).await {
                        Ok(applied) => return applied,
                        Err(e) if e.transient => continue,
                        Err(e) => panic!("{e}"),
                    }
                }
            })
        })
        .collect();
    for t in tasks {
        assert!(t.await.unwrap());
    }
    // 136 calls named p1, whose capacity is 100: the store caps it and
    // books the rest as overage, whatever order the batches came in.
    assert_eq!(used(&*store, "x", "p1").await, 100);
    let rows = usage_of(&*store, "x").await;
    assert_eq!(total(&rows), 136 + 16);
    assert_eq!(
        rows.iter().find(|r| r.pack_id.is_empty()).unwrap().amount,
        36 + 16
    );
    assert_eq!(total(&usage_of(&*store, "y").await), 32);
    assert_eq!(store.load_account("x", 0, 0).await.unwrap().dedup.len(), 16);
}

async fn racing_grants_of_one_pack_create_it_once(t: &Target) {
    let store = t.open().await;
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let store = store.clone();
            tokio::spawn(async move { store.grant_pack("acct", &spec("p1")).await.unwrap() })
        })
        .collect();
    let mut new = 0;
    for t in tasks {
        if matches!(t.await.unwrap(), Granted::New(_)) {
            new += 1;
        }
    }
    assert_eq!(new, 1);
    assert_eq!(store.list_packs("acct").await.unwrap().len(), 1);
}

/// What other nodes read to refresh the accounts they hold (issue 8, item
/// 4): every put_account and every new pack is one change, in the
/// transaction that makes it; a repeated grant is none.
async fn changes_are_recorded_with_account_puts_and_new_grants(t: &Target) {
    let start = packmeter::calendar::now_ts();
    {
        let store = t.open().await;
        assert_eq!(store.last_change().await.unwrap(), 0);
        assert!(store.changes_since(0, 10).await.unwrap().is_empty());
        store.put_account(&record("a", Some(HOUR))).await.unwrap();
        store.grant_pack("b", &spec("p1")).await.unwrap();
        // The same pack again: nothing changed, nothing recorded.
        assert!(matches!(
            store.grant_pack("b", &spec("p1")).await.unwrap(),
            Granted::Existing(_)
        ));
        store.put_account(&record("b", None)).await.unwrap();
    }
    // Durable, and read back after a reopen.
    let store = t.open().await;
    let all = store.changes_since(0, 10).await.unwrap();
    let seen: Vec<(&str, ChangeKind)> = all
        .iter()
        .map(|c| (c.account_id.as_str(), c.kind))
        .collect();
    assert_eq!(
        seen,
        [
            ("a", ChangeKind::Account),
            ("b", ChangeKind::Pack),
            ("b", ChangeKind::Account)
        ]
    );
    assert!(all.windows(2).all(|w| w[0].seq < w[1].seq), "{all:?}");
    assert!(all[0].seq > 0);
    let end = packmeter::calendar::now_ts();
    assert!(all.iter().all(|c| (start..=end).contains(&c.at)), "{all:?}");
    assert_eq!(store.last_change().await.unwrap(), all[2].seq);
    // A page starts after the cursor and holds at most `limit`.
    assert_eq!(store.changes_since(all[0].seq, 10).await.unwrap(), all[1..]);
    assert_eq!(store.changes_since(0, 2).await.unwrap(), all[..2]);
    assert!(store
        .changes_since(all[2].seq, 10)
        .await
        .unwrap()
        .is_empty());
    // A new change numbers after every earlier one.
    store.put_account(&record("a", Some(HOUR))).await.unwrap();
    let next = store.changes_since(all[2].seq, 10).await.unwrap();
    assert_eq!(next.len(), 1);
    assert_eq!(store.last_change().await.unwrap(), next[0].seq);
}

async fn concurrent_changes_get_distinct_numbers_and_all_show(t: &Target) {
    let store = t.open().await;
    let tasks: Vec<_> = (0..16)
        .map(|i| {
            let store = store.clone();
            tokio::spawn(async move {
                if i % 2 == 0 {
                    store.put_account(&record(&format!("a{i}"), None)).await
                } else {
                    store
                        .grant_pack(&format!("a{i}"), &spec("p"))
                        .await
                        .map(|_| ())
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    let all = store.changes_since(0, 100).await.unwrap();
    let mut accounts: Vec<&str> = all.iter().map(|c| c.account_id.as_str()).collect();
    accounts.sort_unstable();
    let mut want: Vec<String> = (0..16).map(|i| format!("a{i}")).collect();
    want.sort_unstable();
    assert_eq!(accounts, want);
    assert!(all.windows(2).all(|w| w[0].seq < w[1].seq), "{all:?}");
}

/// Rows as a flush would leave them, written in a deliberately scrambled
/// order: three hours, and within each several accounts, both items,
/// overage and two packs (some keys share everything but one column).
fn usage_fixture() -> Vec<UsageRow> {
    let mut rows = Vec::new();
    let mut n = 0;
    for hour in [2 * HOUR, 0, HOUR] {
        for account in ["b", "a", "ab", "c"] {
            for item in [Item::EgressBytes, Item::Calls] {
                for pack in ["p2", "", "p1"] {
                    n += 1;
                    // Leave a few keys out so the groups are uneven.
                    if n % 5 == 0 {
                        continue;
                    }
                    rows.push(UsageRow {
                        account_id: account.into(),
                        hour,
                        item,
                        pack_id: pack.into(),
                        source: (!pack.is_empty()).then_some(PackSource::Purchased),
                        amount: n,
                        adjustment: None,
                    });
                }
            }
        }
    }
    rows
}

/// Writes the fixture through `write_batch`, one batch per row.
async fn store_with_fixture(t: &Target) -> (Arc<dyn Store>, Vec<UsageRow>) {
    let store = t.open().await;
    let rows = usage_fixture();
    for (i, r) in rows.iter().enumerate() {
        let pack = (!r.pack_id.is_empty()).then(|| PackSpec {
            item: r.item,
            // One pack id per item, as packs are per item.
            pack_id: format!("{}-{:?}", r.pack_id, r.item).into(),
            // Room for every row: none is capped or moved (see
            // a_flush_caps_every_pack_and_books_the_rest_as_overage).
            capacity: 1_000_000,
            ..spec(&r.pack_id)
        });
        let d = DeltaRow {
            hour: r.hour,
            item: r.item,
            pack,
            amount: r.amount,
            span: None,
        };
        let b = batch(
            &format!("fixture-{i}"),
            0,
            vec![account(&r.account_id, vec![d], vec![])],
        );
        assert!(store.write_batch(&b).await.unwrap());
    }
    let rows = rows
        .into_iter()
        .map(|r| UsageRow {
            pack_id: if r.pack_id.is_empty() {
                r.pack_id
            } else {
                format!("{}-{:?}", r.pack_id, r.item)
            },
            ..r
        })
        .collect();
    (store, rows)
}

fn sorted(mut rows: Vec<UsageRow>) -> Vec<UsageRow> {
    rows.sort_by_key(UsageRow::key);
    rows
}

/// Pages through everything, checking each page against `limit`; also
/// returns the page sizes.
async fn page_through(
    store: &dyn Store,
    from: Ts,
    to: Ts,
    account: Option<&str>,
    after: Option<UsageKey>,
    limit: usize,
) -> (Vec<UsageRow>, Vec<usize>) {
    let (mut all, mut sizes) = (Vec::new(), Vec::new());
    let mut after = after;
    loop {
        let page = store
            .usage_rows_page(from, to, account, after.as_ref(), limit)
            .await
            .unwrap();
        assert!(page.len() <= limit, "a page of {} for {limit}", page.len());
        sizes.push(page.len());
        let last = page.len() < limit;
        after = page.last().map(UsageRow::key).or(after);
        all.extend(page);
        if last {
            return (all, sizes);
        }
    }
}

async fn usage_pages_list_every_row_once_in_key_order(t: &Target) {
    let (store, rows) = store_with_fixture(t).await;
    let want = sorted(rows);
    assert_eq!(want.len(), 58);
    // Equal hours across accounts, items and packs are ordered by the rest
    // of the key, byte-wise for strings ("a" < "ab" < "b").
    assert_eq!(
        want[..3]
            .iter()
            .map(|r| (r.account_id.as_str(), r.item, r.pack_id.as_str()))
            .collect::<Vec<_>>(),
        [
            ("a", Item::Calls, "p1-Calls"),
            ("a", Item::Calls, "p2-Calls"),
            ("a", Item::EgressBytes, "")
        ]
    );
    for limit in [1, 2, 7, 29, 58, 1000] {
        let (got, sizes) = page_through(&*store, 0, 3 * HOUR, None, None, limit).await;
        assert_eq!(got, want, "limit {limit}");
        // Full pages, then one short (possibly empty) one.
        let (last, full) = sizes.split_last().unwrap();
        assert!(full.iter().all(|&n| n == limit), "{sizes:?}");
        assert_eq!(*last, 58 % limit, "limit {limit}: {sizes:?}");
    }
    // An empty page after the last row, and for an empty range.
    let end = want.last().unwrap().key();
    let page = store
        .usage_rows_page(0, 3 * HOUR, None, Some(&end), 10)
        .await
        .unwrap();
    assert!(page.is_empty());
    assert!(store
        .usage_rows_page(HOUR, HOUR, None, None, 10)
        .await
        .unwrap()
        .is_empty());
}

async fn usage_pages_resume_right_after_any_cursor(t: &Target) {
    let (store, rows) = store_with_fixture(t).await;
    let want = sorted(rows);
    // After each existing key: exactly the rows behind it.
    for (i, r) in want.iter().enumerate() {
        let (got, _) = page_through(&*store, 0, 3 * HOUR, None, Some(r.key()), 4).await;
        assert_eq!(got, want[i + 1..], "after {:?}", r.key());
    }
    // After a key that is not stored: from the next one that is.
    let between = UsageKey {
        hour: HOUR,
        account_id: "aa".into(),
        item: Item::Calls,
        pack_id: String::new(),
    };
    let (got, _) = page_through(&*store, 0, 3 * HOUR, None, Some(between.clone()), 5).await;
    let first = want.iter().position(|r| r.key() > between).unwrap();
    assert_eq!(got, want[first..]);
    assert_eq!((got[0].hour, got[0].account_id.as_str()), (HOUR, "ab"));
}

async fn usage_pages_keep_to_the_hours_and_the_account(t: &Target) {
    let (store, rows) = store_with_fixture(t).await;
    let want = sorted(rows);
    let only = |from: Ts, to: Ts, account: Option<&str>| {
        want.iter()
            .filter(|r| from <= r.hour && r.hour < to)
            .filter(|r| account.is_none_or(|a| r.account_id == a))
            .cloned()
            .collect::<Vec<_>>()
    };
    // `from` is inclusive, `to` exclusive.
    for (from, to) in [
        (HOUR, 2 * HOUR),
        (HOUR, 3 * HOUR),
        (1, 2 * HOUR + 1),
        (0, 1),
    ] {
        for account in [None, Some("a"), Some("ab"), Some("zz")] {
            for limit in [1, 3, 100] {
                let (got, _) = page_through(&*store, from, to, account, None, limit).await;
                assert_eq!(
                    got,
                    only(from, to, account),
                    "{from}..{to} {account:?} {limit}"
                );
            }
        }
    }
    assert_eq!(only(HOUR, 2 * HOUR, Some("ab")).len(), 5);
    // A cursor before `from` starts at `from`.
    let early = want[0].key();
    let (got, _) = page_through(&*store, HOUR, 3 * HOUR, None, Some(early.clone()), 4).await;
    assert_eq!(got, only(HOUR, 3 * HOUR, None));
    let (got, _) = page_through(&*store, HOUR, 3 * HOUR, Some("b"), Some(early), 4).await;
    assert_eq!(got, only(HOUR, 3 * HOUR, Some("b")));
    // Even when rows after it lie between it and `from`.
    let just_before = want.iter().find(|r| r.hour == HOUR).unwrap().key();
    for account in [None, Some("b")] {
        let (got, _) = page_through(
            &*store,
            HOUR + 1,
            3 * HOUR,
            account,
            Some(just_before.clone()),
            4,
        )
        .await;
        assert_eq!(got, only(HOUR + 1, 3 * HOUR, account), "{account:?}");
    }
    // With an account, a cursor on another account still means "after this
    // key": the account's rows in the cursor's hour come after a smaller
    // account, not after a larger one.
    let at = |account: &str| UsageKey {
        hour: HOUR,
        account_id: account.into(),
        item: Item::EgressBytes,
        pack_id: "p9".into(),
    };
    let (got, _) = page_through(&*store, 0, 3 * HOUR, Some("ab"), Some(at("a")), 2).await;
    assert_eq!(got, only(HOUR, 3 * HOUR, Some("ab")));
    let (got, _) = page_through(&*store, 0, 3 * HOUR, Some("ab"), Some(at("b")), 2).await;
    assert_eq!(got, only(2 * HOUR, 3 * HOUR, Some("ab")));
}

async fn ping_answers(t: &Target) {
    let store = t.open().await;
    store.ping().await.unwrap();
}

/// What only the PostgreSQL store has: a versioned schema migrated under a
/// lock, TLS, and a server that can go away.
#[cfg(feature = "postgres")]
mod postgres_only {
    use std::time::Duration;

    use packmeter::store::{self, postgres::SCHEMA_VERSION, OpenError, StoreUrl};

    use super::common::pg::{self, TestDb};

    async fn schema_version(db: &TestDb) -> i64 {
        db.client()
            .await
            .query_one("SELECT version FROM packmeter_schema WHERE id = 1", &[])
            .await
            .unwrap()
            .get(0)
    }

    /// PostgreSQL has `ctid`: its flushes update rows by address, and
    /// [`Target::postgres_keyed`] tests the other path.
    #[tokio::test]
    async fn postgresql_flushes_update_rows_by_ctid() {
        let Some(db) = TestDb::create().await else {
            return;
        };
        let StoreUrl::Postgres(url) = db.url.parse::<StoreUrl>().unwrap() else {
            panic!("a PostgreSQL URL");
        };
        let store = store::postgres::PostgresStore::open(&url).await.unwrap();
        assert!(store.updates_by_tid());
        assert!(!store.with_keyed_updates().updates_by_tid());
    }

    #[tokio::test]
    async fn a_schema_newer_than_the_binary_is_refused() {
        let Some(db) = TestDb::create().await else {
            return;
        };
        let url: StoreUrl = db.url.parse().unwrap();
        drop(store::open(&url).await.unwrap());
        assert_eq!(schema_version(&db).await, SCHEMA_VERSION);
        db.execute(&format!(
            "UPDATE packmeter_schema SET version = {}",
            SCHEMA_VERSION + 1
        ))
        .await;
        match store::open(&url).await {
            Err(OpenError::Incompatible(m)) => {
                assert!(
                    m.contains(&format!("schema version {}", SCHEMA_VERSION + 1))
                        && m.contains("newer"),
                    "{m}"
                );
            }
            Err(e) => panic!("expected Incompatible, got {e}"),
            Ok(_) => panic!("a newer schema was accepted"),
        }
        // Untouched.
        assert_eq!(schema_version(&db).await, SCHEMA_VERSION + 1);
    }

    #[tokio::test]
    async fn nodes_opening_a_fresh_database_together_all_succeed() {
        let Some(db) = TestDb::create().await else {
            return;
        };
        let url: StoreUrl = db.url.parse().unwrap();
        let opens: Vec<_> = (0..8)
            .map(|_| {
                let url = url.clone();
                tokio::spawn(async move { store::open(&url).await.map(drop) })
            })
            .collect();
        for o in opens {
            o.await.unwrap().expect("every node opens the store");
        }
        assert_eq!(schema_version(&db).await, SCHEMA_VERSION);
        let n: i64 = db
            .client()
            .await
            .query_one("SELECT count(*) FROM packmeter_schema", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(n, 1);
    }

    /// Whether the server offers TLS at all (Debian's does, with a
    /// self-signed "snakeoil" certificate).
    async fn server_has_ssl(db: &TestDb) -> bool {
        let row = db.client().await.query_one("SHOW ssl", &[]).await.unwrap();
        row.get::<_, String>(0) == "on"
    }

    async fn encrypted(url: &str) -> Result<bool, String> {
        let client = pg::connect(url).await?;
        let row = client
            .query_one(
                "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
                &[],
            )
            .await
            .map_err(|e| e.to_string())?;
        Ok(row.get(0))
    }

    #[tokio::test]
    async fn sslmode_chooses_plain_or_tls_and_verify_full_checks_the_certificate() {
        let Some(db) = TestDb::create().await else {
            return;
        };
        assert_eq!(
            encrypted(&pg::with_param(&db.url, "sslmode", "disable")).await,
            Ok(false)
        );
        if !server_has_ssl(&db).await {
            eprintln!("SKIPPED: the PostgreSQL server has ssl = off; only sslmode=disable checked");
            let e = pg::connect(&pg::with_param(&db.url, "sslmode", "require"))
                .await
                .unwrap_err();
            assert!(e.contains("TLS") || e.contains("SSL"), "{e}");
            return;
        }
        for mode in ["prefer", "require"] {
            assert_eq!(
                encrypted(&pg::with_param(&db.url, "sslmode", mode)).await,
                Ok(true),
                "{mode}"
            );
        }
        // The store itself opens and works over TLS.
        let url: StoreUrl = pg::with_param(&db.url, "sslmode", "require")
            .parse()
            .unwrap();
        store::open(&url).await.unwrap().ping().await.unwrap();
        // With the server's own (self-signed) certificate as the root, when
        // this machine can read it: verify-ca accepts the chain, and
        // verify-full still refuses it for naming another host than
        // 127.0.0.1.
        let cert: String = db
            .client()
            .await
            .query_one("SHOW ssl_cert_file", &[])
            .await
            .unwrap()
            .get(0);
        if std::fs::read(&cert).is_ok() && db.url.contains("@127.0.0.1") {
            let with_root = |mode: &str| {
                pg::with_param(
                    &pg::with_param(&db.url, "sslmode", mode),
                    "sslrootcert",
                    &cert,
                )
            };
            assert_eq!(encrypted(&with_root("verify-ca")).await, Ok(true));
            let e = pg::connect(&with_root("verify-full")).await.unwrap_err();
            assert!(e.contains("not valid for name"), "{e}");
        } else {
            eprintln!("SKIPPED: the server's certificate {cert} is not readable here");
        }
        // A certificate no trusted root signed is refused, for good.
        for mode in ["verify-ca", "verify-full"] {
            let url: StoreUrl = pg::with_param(&db.url, "sslmode", mode).parse().unwrap();
            match store::open(&url).await {
                Err(OpenError::Store(e)) => {
                    assert!(!e.transient, "{e}");
                    assert!(e.message.contains("certificate"), "{mode}: {e}");
                }
                Err(e) => panic!("{mode}: {e}"),
                Ok(_) => panic!("{mode}: an untrusted certificate was accepted"),
            }
        }
    }

    #[tokio::test]
    async fn a_usage_row_with_an_unknown_item_is_refused() {
        let Some(db) = TestDb::create().await else {
            return;
        };
        let store = store::open(&db.url.parse().unwrap()).await.unwrap();
        db.execute("INSERT INTO usage_hourly VALUES ('a', 0, 9, '', 0, 1)")
            .await;
        let err = store
            .usage_rows_page(0, super::HOUR, None, None, 10)
            .await
            .unwrap_err();
        assert!(err.message.contains('9') && !err.transient, "{err}");
    }

    #[tokio::test]
    async fn an_unreachable_server_is_a_transient_error() {
        // Nothing listens on port 1.
        let url: StoreUrl = "postgres://postgres@127.0.0.1:1/x?connect_timeout=2"
            .parse()
            .unwrap();
        match store::open(&url).await {
            Err(OpenError::Store(e)) => assert!(e.transient, "{e}"),
            Err(e) => panic!("{e}"),
            Ok(_) => panic!("opened a store on a closed port"),
        }
    }

    #[tokio::test]
    async fn a_lost_connection_is_transient_and_the_store_recovers() {
        let Some(db) = TestDb::create().await else {
            return;
        };
        let store = store::open(&db.url.parse().unwrap()).await.unwrap();
        store.ping().await.unwrap();
        let b = super::batch(
            "b1",
            10,
            vec![super::account(
                "acct",
                vec![super::delta(0, None, 5)],
                vec![],
            )],
        );
        // Every server process of the store is terminated (as a failover
        // or an administrator would), then the batch is written.
        let killed: i64 = db
            .client()
            .await
            .query_one(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
                 WHERE datname = $1 AND pid <> pg_backend_pid()",
                &[&db.name],
            )
            .await
            .unwrap()
            .get(0);
        assert!(killed >= 1);
        // It fails transiently (the flusher keeps the usage and retries) or,
        // if the pool had already noticed, succeeds; either way it applies
        // exactly once within a few retries.
        let mut applied = None;
        for _ in 0..10 {
            match store.write_batch(&b).await {
                Ok(a) => {
                    applied = Some(a);
                    break;
                }
                Err(e) => assert!(e.transient, "{e}"),
            }
        }
        assert_eq!(applied, Some(true));
        assert_eq!(super::total(&super::usage_of(&*store, "acct").await), 5);
        // The pool replaced the connections: everything works again.
        tokio::time::timeout(Duration::from_secs(10), store.ping())
            .await
            .unwrap()
            .unwrap();
    }
}

async fn the_settled_mark_only_moves_forward_and_outlives_a_reopen(t: &Target) {
    {
        let store = t.open().await;
        assert_eq!(store.settled_before().await.unwrap(), Ts::MIN);
        assert_eq!(store.record_settled(20 * HOUR).await.unwrap(), 20 * HOUR);
        // A mark at or below the stored one changes nothing.
        assert_eq!(store.record_settled(10 * HOUR).await.unwrap(), 20 * HOUR);
        assert_eq!(store.record_settled(20 * HOUR).await.unwrap(), 20 * HOUR);
    }
    let store = t.open().await;
    assert_eq!(store.settled_before().await.unwrap(), 20 * HOUR);
    assert_eq!(store.record_settled(21 * HOUR).await.unwrap(), 21 * HOUR);
}

/// R1: a flush carries the activation the meter holds, which only ever
/// moves back (to an earlier accepted event); the store keeps the earliest,
/// also when one batch names the account twice.
async fn a_flushed_activation_only_moves_back(t: &Target) {
    let store = t.open().await;
    let flush = |id: &str, at: Ts| {
        let mut a = account("acct", vec![], vec![]);
        a.account = Some(record("acct", Some(at)));
        batch(id, 10, vec![a])
    };
    assert!(store.write_batch(&flush("b1", 50 * HOUR)).await.unwrap());
    assert!(store.write_batch(&flush("b2", 40 * HOUR)).await.unwrap());
    assert!(store.write_batch(&flush("b3", 60 * HOUR)).await.unwrap());
    let activated = |store: Arc<dyn Store>| async move {
        store
            .get_account("acct")
            .await
            .unwrap()
            .unwrap()
            .activated_at
    };
    assert_eq!(activated(store.clone()).await, Some(40 * HOUR));
    let mut twice = flush("b4", 35 * HOUR);
    let mut again = account("acct", vec![], vec![]);
    again.account = Some(record("acct", Some(30 * HOUR)));
    twice.accounts.push(again);
    assert!(store.write_batch(&twice).await.unwrap());
    assert_eq!(activated(store).await, Some(30 * HOUR));
}

/// The same rule for accounts whose packs the store holds, whose account
/// row SQLite's flush leaves alone unless the flush carries an activation
/// (issue 10): a granted but unactivated account gets its activation, a
/// flush without an activation leaves it, and an earlier one moves it
/// back, in a batch beside a new account, whose first flush writes its row
/// and its packs.
async fn an_activation_moves_back_and_new_accounts_get_their_row_when_packs_are_stored(t: &Target) {
    let store = t.open().await;
    store.grant_pack("granted", &spec("p1")).await.unwrap();
    let part = |id: &str, at: Option<Ts>| {
        let mut a = account(id, vec![delta(3 * HOUR, Some(spec("p1")), 1)], vec![]);
        a.account = at.map(|at| record(id, Some(at)));
        a
    };
    let activated = |id: &'static str| {
        let store = store.clone();
        async move { store.get_account(id).await.unwrap().map(|a| a.activated_at) }
    };
    assert_eq!(activated("granted").await, Some(None));
    let b = batch(
        "b1",
        10,
        vec![part("granted", Some(50 * HOUR)), part("new", None)],
    );
    assert!(store.write_batch(&b).await.unwrap());
    assert_eq!(activated("granted").await, Some(Some(50 * HOUR)));
    // Its first flush wrote the new account's row and its pack.
    assert_eq!(activated("new").await, Some(None));
    assert_eq!(used(&*store, "new", "p1").await, 1);
    let b = batch(
        "b2",
        10,
        vec![part("granted", None), part("new", Some(45 * HOUR))],
    );
    assert!(store.write_batch(&b).await.unwrap());
    assert_eq!(activated("granted").await, Some(Some(50 * HOUR)));
    assert_eq!(activated("new").await, Some(Some(45 * HOUR)));
    for (id, at, kept) in [
        ("b3", 40 * HOUR, 40 * HOUR),
        ("b4", 60 * HOUR, 40 * HOUR),
        ("b5", 40 * HOUR, 40 * HOUR),
    ] {
        let b = batch(
            id,
            10,
            vec![part("granted", Some(at)), part("new", Some(at))],
        );
        assert!(store.write_batch(&b).await.unwrap());
        assert_eq!(activated("granted").await, Some(Some(kept)), "{id}");
        assert_eq!(
            activated("new").await,
            Some(Some(kept.min(45 * HOUR))),
            "{id}"
        );
    }
    assert_eq!(used(&*store, "granted", "p1").await, 5);
    assert_eq!(used(&*store, "new", "p1").await, 5);
}

/// The ledger cap starts from what the store holds for the hours still
/// open: every hour that ends after `since`, per item, packs and overage
/// together.
async fn loading_sums_what_the_open_hours_hold(t: &Target) {
    let store = t.open().await;
    let egress = PackSpec {
        item: Item::EgressBytes,
        ..spec("e1")
    };
    let deltas = vec![
        delta(8 * HOUR, None, 1),
        delta(9 * HOUR, Some(spec("p1")), 30),
        delta(9 * HOUR, None, 4),
        delta(9 * HOUR, Some(egress), 7),
        delta(10 * HOUR, None, 5),
    ];
    let a = account("acct", deltas, vec![]);
    assert!(store.write_batch(&batch("b1", 10, vec![a])).await.unwrap());
    let mut open = store
        .load_account("acct", 9 * HOUR + 1, 10 * HOUR)
        .await
        .unwrap()
        .open_usage;
    open.sort_by_key(|&(hour, item, _)| (hour, item.code()));
    assert_eq!(
        open,
        [
            (9 * HOUR, Item::Calls, 34),
            (9 * HOUR, Item::EgressBytes, 7),
            (10 * HOUR, Item::Calls, 5),
        ]
    );
}

/// A pack of `capacity` calls, valid `from..until`, with a priority.
fn pack(id: &str, capacity: u64, priority: u32, valid: (Ts, Ts)) -> PackSpec {
    PackSpec {
        capacity,
        priority,
        valid_from: valid.0,
        valid_until: valid.1,
        ..spec(id)
    }
}

/// (pack id, amount) of every usage row of an account, in key order.
async fn rows_of(store: &dyn Store, account: &str) -> Vec<(String, u64)> {
    usage_of(store, account)
        .await
        .into_iter()
        .map(|r| (r.pack_id, r.amount))
        .collect()
}

async fn a_flush_caps_every_pack_and_books_the_rest_as_overage(t: &Target) {
    // Two nodes each believed the pack had room for what they took.
    let store = t.open().await;
    let p1 = pack("p1", 100, 1, (0, 10 * HOUR));
    store.grant_pack("acct", &p1).await.unwrap();
    let node_a = account("acct", vec![delta(0, Some(p1.clone()), 80)], vec![]);
    assert!(store
        .write_batch(&batch("a-0", 10, vec![node_a]))
        .await
        .unwrap());
    let node_b = account(
        "acct",
        vec![delta(0, Some(p1.clone()), 50), delta(0, None, 5)],
        vec![],
    );
    assert!(store
        .write_batch(&batch("b-0", 10, vec![node_b]))
        .await
        .unwrap());
    assert_eq!(used(&*store, "acct", "p1").await, 100);
    // Every acknowledged call is in the ledger, split exactly.
    assert_eq!(
        rows_of(&*store, "acct").await,
        [("".to_string(), 35), ("p1".to_string(), 100)]
    );
    // A full pack takes nothing more; an hour later too.
    let more = account("acct", vec![delta(HOUR, Some(p1.clone()), 7)], vec![]);
    assert!(store
        .write_batch(&batch("a-1", 10, vec![more]))
        .await
        .unwrap());
    assert_eq!(used(&*store, "acct", "p1").await, 100);
    assert_eq!(total(&usage_of(&*store, "acct").await), 142);
}

async fn excess_moves_to_the_next_pack_valid_for_the_whole_hour_in_r6_order(t: &Target) {
    let store = t.open().await;
    let first = pack("first", 10, 3, (0, 10 * HOUR));
    // Before `second` in R6 order (higher priority), but it ends within
    // hour 0: not valid for the whole hour, so it takes no excess.
    let partial = pack("partial", 50, 2, (0, HOUR / 2));
    let second = pack("second", 10, 1, (0, 10 * HOUR));
    let third = pack("third", 10, 0, (0, 10 * HOUR));
    for p in [&first, &partial, &second, &third] {
        store.grant_pack("acct", p).await.unwrap();
    }
    // 25 named `first`: 10 fit, 10 move to `second`, 5 to `third`.
    let b = account("acct", vec![delta(0, Some(first.clone()), 25)], vec![]);
    assert!(store.write_batch(&batch("b1", 10, vec![b])).await.unwrap());
    assert_eq!(used(&*store, "acct", "first").await, 10);
    assert_eq!(used(&*store, "acct", "partial").await, 0);
    assert_eq!(used(&*store, "acct", "second").await, 10);
    assert_eq!(used(&*store, "acct", "third").await, 5);
    // A node that still believed `second` had room: 8 named `second`, 3
    // named `partial` (valid at its event's instant, so kept). `third`
    // takes 5 of the excess, the last 3 are overage.
    let b = account(
        "acct",
        vec![
            delta(0, Some(second.clone()), 8),
            delta(0, Some(partial.clone()), 3),
        ],
        vec![],
    );
    assert!(store.write_batch(&batch("b2", 10, vec![b])).await.unwrap());
    assert_eq!(used(&*store, "acct", "partial").await, 3);
    assert_eq!(used(&*store, "acct", "third").await, 10);
    assert_eq!(
        rows_of(&*store, "acct").await,
        [
            ("".to_string(), 3),
            ("first".to_string(), 10),
            ("partial".to_string(), 3),
            ("second".to_string(), 10),
            ("third".to_string(), 10)
        ]
    );
}

/// Issue 8, found by `tests/fleet_rolling.rs`: nodes each cover calls
/// from their own view of a shared free tier; the flush caps it, and the
/// excess must move to a pack granted earlier in the same hour, because
/// every event the node recorded came after the grant. Events before the
/// grant keep the whole-hour rule: overage.
async fn excess_moves_to_a_pack_granted_during_the_hour_before_its_events(t: &Target) {
    let store = t.open().await;
    let free = pack("free", 40, 9, (0, 10 * HOUR));
    // Granted at 10:20 of hour 0.
    let bought = pack("bought", 1_000, 1, (HOUR / 3, 10 * HOUR));
    for p in [&free, &bought] {
        store.grant_pack("acct", p).await.unwrap();
    }
    let spanned = |amount, span| DeltaRow {
        span: Some(span),
        ..delta(0, Some(free.clone()), amount)
    };
    // Two nodes each took 30 from the free tier, after the grant.
    for (id, n) in [("a-0", 30), ("b-0", 30)] {
        let b = account("acct", vec![spanned(n, (HOUR / 2, HOUR / 2 + 9))], vec![]);
        assert!(store.write_batch(&batch(id, 10, vec![b])).await.unwrap());
    }
    assert_eq!(used(&*store, "acct", "free").await, 40);
    assert_eq!(used(&*store, "acct", "bought").await, 20);
    // A third node's events started before the grant: overage.
    let b = account("acct", vec![spanned(5, (HOUR / 4, HOUR / 2))], vec![]);
    assert!(store.write_batch(&batch("c-0", 10, vec![b])).await.unwrap());
    assert_eq!(used(&*store, "acct", "bought").await, 20);
    assert_eq!(
        rows_of(&*store, "acct").await,
        [
            ("".to_string(), 5),
            ("bought".to_string(), 20),
            ("free".to_string(), 40)
        ]
    );
}

/// A request record with its hour and amounts.
fn request(id: &str, hour: Ts, covered: u64, overage: u64) -> DedupRecord {
    DedupRecord {
        request_id: id.into(),
        expires_at: 1_000 * HOUR,
        hour: Some(hour),
        calls_covered: covered,
        calls_overage: overage,
        egress_covered: 0,
        egress_overage: 0,
    }
}

async fn a_request_id_another_batch_recorded_is_billed_once(t: &Target) {
    let store = t.open().await;
    let p1 = pack("p1", 100, 1, (0, 10 * HOUR));
    store.grant_pack("acct", &p1).await.unwrap();
    // Node A billed r1: 3 covered, 2 overage (it believed the pack full).
    let a = account(
        "acct",
        vec![delta(0, Some(p1.clone()), 3), delta(0, None, 2)],
        vec![request("r1", 0, 3, 2)],
    );
    let done = store.flush_batch(&batch("a-0", 10, vec![a])).await.unwrap();
    assert!(done.reversed.is_empty());
    // The retry reached node B, which billed it 5 covered, with r2 (4).
    let b = account(
        "acct",
        vec![delta(0, Some(p1.clone()), 9)],
        vec![request("r1", 0, 5, 0), request("r2", 0, 4, 0)],
    );
    let done = store.flush_batch(&batch("b-0", 10, vec![b])).await.unwrap();
    assert_eq!(done.reversed, [("acct".into(), "r1".into())]);
    // r1 once (A's 5), r2 once: 9 calls in all.
    assert_eq!(
        rows_of(&*store, "acct").await,
        [("".to_string(), 2), ("p1".to_string(), 7)]
    );
    assert_eq!(used(&*store, "acct", "p1").await, 7);
    // The first record stays.
    let loaded = store.load_account("acct", 0, 10).await.unwrap();
    let r1 = loaded
        .dedup
        .iter()
        .find(|r| &*r.request_id == "r1")
        .unwrap();
    assert_eq!((r1.calls_covered, r1.calls_overage), (3, 2));
    // A duplicate billed as overage on the second node comes out of its
    // overage row; a shortfall there comes out of its packs.
    let c = account(
        "acct",
        vec![delta(HOUR, Some(p1.clone()), 1), delta(HOUR, None, 4)],
        vec![request("r2", HOUR, 0, 4), request("r1", HOUR, 0, 1)],
    );
    let done = store.flush_batch(&batch("c-0", 10, vec![c])).await.unwrap();
    assert_eq!(done.reversed.len(), 2);
    assert_eq!(total(&usage_of(&*store, "acct").await), 9);
    assert_eq!(used(&*store, "acct", "p1").await, 7);
}

async fn a_flush_returns_the_global_totals(t: &Target) {
    let store = t.open().await;
    let p1 = pack("p1", 100, 1, (0, 10 * HOUR));
    store.grant_pack("acct", &p1).await.unwrap();
    let mut a = account("acct", vec![delta(0, Some(p1.clone()), 30)], vec![]);
    a.account = Some(record("acct", Some(7)));
    let done = store.flush_batch(&batch("a-0", 10, vec![a])).await.unwrap();
    assert!(done.applied);
    assert_eq!(done.accounts.len(), 1);
    assert_eq!(&*done.accounts[0].account_id, "acct");
    // The flush writes the account row (the totals no longer carry it:
    // nothing read it).
    assert_eq!(
        store.get_account("acct").await.unwrap(),
        Some(record("acct", Some(7)))
    );
    let totals = |f: &store::Flushed| -> Vec<(String, u64)> {
        let mut v: Vec<_> = f.accounts[0]
            .packs
            .iter()
            .map(|p| (p.spec.pack_id.to_string(), p.used))
            .collect();
        v.sort();
        v
    };
    assert_eq!(totals(&done), [("p1".to_string(), 30)]);
    // Another node's flush returns what both flushed: the global total,
    // with a free-tier-like pack the store did not hold yet.
    let free = pack("free", 5, 9, (0, 10 * HOUR));
    let b = account(
        "acct",
        vec![delta(0, Some(p1.clone()), 20), delta(0, Some(free), 8)],
        vec![],
    );
    let b = batch(
        "b-0",
        10,
        vec![b, account("other", vec![delta(0, None, 1)], vec![])],
    );
    let done = store.flush_batch(&b).await.unwrap();
    assert_eq!(
        done.accounts
            .iter()
            .map(|a| &*a.account_id)
            .collect::<Vec<_>>(),
        ["acct", "other"]
    );
    // `free` holds 5: the other 3 went to p1.
    assert_eq!(
        totals(&done),
        [("free".to_string(), 5), ("p1".to_string(), 53)]
    );
    assert_eq!(store.list_packs("acct").await.unwrap().len(), 2);
    // A batch applied before returns nothing and changes nothing.
    let again = store.flush_batch(&b).await.unwrap();
    assert!(!again.applied && again.accounts.is_empty());
    assert_eq!(used(&*store, "acct", "p1").await, 53);
}

/// Strict mode's leases (src/meter/lease.rs) need a shared store: SQLite,
/// which one node owns, refuses them cleanly and changes nothing.
#[cfg(feature = "sqlite")]
#[tokio::test]
async fn sqlite_refuses_leases_cleanly() {
    let t = Target::sqlite();
    let store = t.open().await;
    let packs = [("p".to_string(), 100)];
    let e = store
        .acquire_lease(&lease("a", "n1", &packs, 1, 10, 10 * SECOND))
        .await
        .unwrap_err();
    assert!(!e.transient);
    assert!(e.message.contains("postgres://"), "{}", e.message);
    assert!(store.release_lease("a", "n1", 5).await.is_err());
}

const SECOND: Ts = 1_000_000;

fn lease<'a>(
    account: &'a str,
    node: &'a str,
    packs: &'a [(String, u64)],
    need: u64,
    want: u64,
    ttl: Ts,
) -> store::LeaseRequest<'a> {
    store::LeaseRequest {
        account_id: account,
        node_id: node,
        packs,
        need,
        want,
        ttl,
    }
}

/// Lease behaviours, on PostgreSQL (the shared store).
#[cfg(feature = "postgres")]
mod leases {
    use super::*;

    /// A deny account `a` with pack `p` of 100 calls.
    async fn deny_account() -> Option<(Target, Arc<dyn Store>)> {
        let t = Target::postgres().await?;
        let store = t.open().await;
        let mut r = record("a", Some(0));
        r.deny_on_exhausted = true;
        store.put_account(&r).await.unwrap();
        store.grant_pack("a", &spec("p")).await.unwrap();
        Some((t, store))
    }

    fn packs() -> Vec<(String, u64)> {
        vec![("p".to_string(), 100)]
    }

    async fn granted(store: &dyn Store, node: &str, need: u64, want: u64) -> u64 {
        store
            .acquire_lease(&lease("a", node, &packs(), need, want, 60 * SECOND))
            .await
            .unwrap()
            .granted
    }

    #[tokio::test]
    async fn leases_of_many_nodes_never_reserve_more_than_the_packs_hold() {
        let Some((_t, store)) = deny_account().await else {
            return;
        };
        // Concurrent acquirers, each asking for more than there is.
        let mut total = 0;
        loop {
            let rounds = futures_util::future::join_all(
                ["n1", "n2", "n3"].map(|n| granted(&*store, n, 0, 1_000)),
            )
            .await;
            let round: u64 = rounds.iter().sum();
            if round == 0 {
                break;
            }
            // No single grant takes more than half of what is free.
            assert!(rounds.iter().all(|g| *g <= 50), "{rounds:?}");
            total += round;
        }
        assert_eq!(total, 100);
        // `need` more than is free grants nothing.
        assert_eq!(granted(&*store, "n4", 1, 1).await, 0);
    }

    #[tokio::test]
    async fn a_flush_moves_a_nodes_lease_into_its_packs() {
        let Some((_t, store)) = deny_account().await else {
            return;
        };
        assert_eq!(granted(&*store, "n1", 40, 40).await, 40);
        // n1 books 30 of its 40: 30 used, 10 still reserved, 60 free.
        let b = batch(
            "n1-1",
            HOUR,
            vec![account("a", vec![delta(0, Some(spec("p")), 30)], vec![])],
        );
        assert!(store.write_batch(&b).await.unwrap());
        assert_eq!(used(&*store, "a", "p").await, 30);
        assert_eq!(granted(&*store, "n2", 61, 61).await, 0);
        assert_eq!(granted(&*store, "n2", 60, 60).await, 60);
        // Another node's flush does not book n1's lease.
        let b = batch(
            "n2-1",
            HOUR,
            vec![account("a", vec![delta(0, Some(spec("p")), 60)], vec![])],
        );
        assert!(store.write_batch(&b).await.unwrap());
        assert_eq!(granted(&*store, "n3", 1, 1).await, 0);
        // n1 returns its unused 10.
        store.release_lease("a", "n1", 10).await.unwrap();
        assert_eq!(granted(&*store, "n3", 10, 10).await, 10);
    }

    #[tokio::test]
    async fn a_returned_lease_keeps_what_was_admitted_and_unbooked() {
        let Some((_t, store)) = deny_account().await else {
            return;
        };
        assert_eq!(granted(&*store, "n1", 40, 40).await, 40);
        // n1 admitted 15 of its 40 and has not flushed them: returning the
        // other 25 leaves those 15 reserved.
        store.release_lease("a", "n1", 25).await.unwrap();
        assert_eq!(granted(&*store, "n2", 86, 86).await, 0);
        assert_eq!(granted(&*store, "n2", 85, 85).await, 85);
    }

    #[tokio::test]
    async fn an_expired_lease_reserves_nothing() {
        let Some((_t, store)) = deny_account().await else {
            return;
        };
        let g = store
            .acquire_lease(&lease("a", "dead", &packs(), 50, 50, 1))
            .await
            .unwrap();
        assert_eq!(g.granted, 50);
        // Its expiry (1 µs) has passed by the next statement's clock.
        assert_eq!(granted(&*store, "n1", 100, 100).await, 100);
    }

    #[tokio::test]
    async fn free_tier_packs_without_a_row_count_from_the_request() {
        let Some((_t, store)) = deny_account().await else {
            return;
        };
        // A free-tier pack with no usage has no row; the node names it.
        let with_free = vec![("p".to_string(), 100), ("free-calls-x".to_string(), 20)];
        let g = store
            .acquire_lease(&lease("a", "n1", &with_free, 120, 120, 60 * SECOND))
            .await
            .unwrap();
        assert_eq!((g.granted, g.free), (120, 0));
    }
}

/// PostgreSQL only (issue 8, the flush benchmark): a flush of known
/// accounts locks their rows without writing new versions of them (before,
/// every flush rewrote every account row: `xmin`, the transaction that
/// wrote a row's version, changed), and the tables whose rows a flush
/// updates over and over leave room on their pages for HOT updates
/// (migration 5). Whether the updates then are HOT under load is measured
/// by benches/flush.rs, not asserted here.
#[cfg(feature = "postgres")]
#[tokio::test]
async fn postgres_flushes_rewrite_no_account_rows_and_leave_room_for_hot_updates() {
    let Some(target) = Target::postgres().await else {
        return;
    };
    let store = target.open().await;
    store.grant_pack("acct", &spec("p1")).await.unwrap();
    let flush = |id: &'static str| {
        let mut a = account("acct", vec![delta(0, Some(spec("p1")), 1)], vec![]);
        a.account = Some(record("acct", Some(7)));
        batch(id, 10, vec![a])
    };
    assert!(store.write_batch(&flush("b1")).await.unwrap());
    let db = target._db.as_ref().unwrap();
    let client = db.client().await;
    let version = |sql: &'static str| {
        let client = &client;
        async move {
            let row = client.query_one(sql, &[]).await.unwrap();
            (row.get::<_, String>(0), row.get::<_, String>(1))
        }
    };
    let account_sql = "SELECT xmin::text, ctid::text FROM accounts WHERE account_id = 'acct'";
    let usage_sql = "SELECT xmin::text, ctid::text FROM usage_hourly WHERE account_id = 'acct'";
    let account_before = version(account_sql).await;
    let usage_before = version(usage_sql).await;
    assert!(store.write_batch(&flush("b2")).await.unwrap());
    assert_eq!(used(&*store, "acct", "p1").await, 2);
    assert_eq!(
        version(account_sql).await,
        account_before,
        "the account row was rewritten by a flush that changed nothing in it"
    );
    assert_ne!(
        version(usage_sql).await.0,
        usage_before.0,
        "the usage row was updated"
    );
    for table in ["usage_hourly", "packs", "leases"] {
        let row = client
            .query_one(
                "SELECT array_to_string(reloptions, ',') FROM pg_class WHERE relname = $1",
                &[&table],
            )
            .await
            .unwrap();
        assert_eq!(
            row.get::<_, Option<String>>(0).as_deref(),
            Some("fillfactor=50"),
            "{table}"
        );
    }
}

fn recorded_plan(position: i64, name: &str, calls: i64) -> store::RecordedPlan {
    store::RecordedPlan {
        position,
        name: name.into(),
        effective: 1_600_000_000_000_000 + position,
        months: 12,
        calls,
        egress_bytes: 1 << 30,
        zone: "+08:00".into(),
    }
}

/// The plans in force (R8): a place, once recorded, keeps its plan (a
/// second node's different plan at that place is ignored, for it to read
/// back and refuse); new places are added; all of it survives a reopen.
/// `holds_usage` sees an activated account, not an unactivated one.
async fn plans_are_recorded_once_per_place_and_survive_a_reopen(t: &Target) {
    let store = t.open().await;
    assert!(store.recorded_plans().await.unwrap().is_empty());
    assert!(!store.holds_usage().await.unwrap());
    let first = [
        recorded_plan(0, "launch", 500_000),
        recorded_plan(1, "2020-10", 1_000_000),
    ];
    store.record_plans(&first, 7).await.unwrap();
    assert_eq!(store.recorded_plans().await.unwrap(), first);
    // Again, and a different plan at place 1 with a new one at place 2.
    store.record_plans(&first, 8).await.unwrap();
    let third = recorded_plan(2, "2021", 2_000_000);
    store
        .record_plans(&[recorded_plan(1, "other", 5), third.clone()], 9)
        .await
        .unwrap();
    let want = [first[0].clone(), first[1].clone(), third];
    assert_eq!(store.recorded_plans().await.unwrap(), want);
    store.put_account(&record("idle", None)).await.unwrap();
    assert!(!store.holds_usage().await.unwrap());
    store.put_account(&record("active", Some(1))).await.unwrap();
    assert!(store.holds_usage().await.unwrap());
    drop(store);
    assert_eq!(t.open().await.recorded_plans().await.unwrap(), want);
}

/// A plan change's re-deduction (R8, packmeter::recalc) in the store: the
/// old free pack and the overage of the span move to the new pack up to
/// its capacity, as adjustment rows in the hour given (or past the settled
/// mark); runs racing on one account (two nodes) move it once, and a later
/// run moves nothing.
async fn a_recalculation_moves_usage_once_even_when_runs_race(t: &Target) {
    use packmeter::recalc::{Recalculation, Span};
    let store = t.open().await;
    store.put_account(&record("acct", Some(0))).await.unwrap();
    let free = |id: &str, capacity: u64| PackSpec {
        source: PackSource::FreeTier,
        priority: 0,
        ..pack(id, capacity, 0, (0, 10 * HOUR))
    };
    let (old, new) = (free("old", 100), free("new", 100));
    let usage = account(
        "acct",
        vec![
            delta(0, None, 7),
            delta(HOUR, Some(old.clone()), 80),
            delta(2 * HOUR, None, 50),
        ],
        vec![],
    );
    assert!(store
        .write_batch(&batch("a-0", 10, vec![usage]))
        .await
        .unwrap());
    assert_eq!(
        store.recalculation_candidates(HOUR, Ts::MAX).await.unwrap(),
        [("acct".to_string(), 0)]
    );
    assert!(store
        .recalculation_candidates(3 * HOUR, Ts::MAX)
        .await
        .unwrap()
        .is_empty());
    // An export settled up to hour 5: the rows go there, not in hour 3.
    store.record_settled(5 * HOUR).await.unwrap();
    let r = Recalculation {
        account_id: "acct".into(),
        plan_position: 1,
        plan: "next".into(),
        hour: 3 * HOUR,
        spans: vec![Span {
            from: HOUR,
            until: 10 * HOUR,
            packs: vec![new.clone()],
        }],
    };
    let runs: Vec<_> = (0..4)
        .map(|_| {
            let (store, r) = (store.clone(), r.clone());
            tokio::spawn(async move {
                loop {
                    match store.recalculate(&r).await {
                        Ok(packs) => return packs,
                        Err(e) if e.transient => continue,
                        Err(e) => panic!("{e}"),
                    }
                }
            })
        })
        .collect();
    for run in runs {
        let packs = run.await.unwrap();
        let new_used = packs
            .iter()
            .find(|p| *p.spec.pack_id == *"new")
            .unwrap()
            .used;
        assert_eq!(new_used, 100);
    }
    let adjustments = |store: Arc<dyn Store>| async move {
        store
            .adjustment_rows(Ts::MIN, Ts::MAX, Some("acct"))
            .await
            .unwrap()
            .into_iter()
            .map(|r| (r.hour / HOUR, r.pack_id, r.adjustment.unwrap()))
            .collect::<Vec<_>>()
    };
    let adj = |plan: &str, amount: i64| packmeter::ledger::Adjustment {
        plan: plan.into(),
        amount,
    };
    let want = vec![
        (5, String::new(), adj("next", -20)),
        (5, "new".to_string(), adj("next", 100)),
        (5, "old".to_string(), adj("next", -80)),
    ];
    assert_eq!(adjustments(store.clone()).await, want);
    assert_eq!(used(&*store, "acct", "old").await, 0);
    assert_eq!(used(&*store, "acct", "new").await, 100);
    // The usage rows are as they were recorded.
    assert_eq!(total(&usage_of(&*store, "acct").await), 137);
    // Another run, later: nothing left to move.
    store
        .recalculate(&Recalculation {
            hour: 7 * HOUR,
            ..r
        })
        .await
        .unwrap();
    assert_eq!(adjustments(store.clone()).await, want);
    assert!(store
        .adjustment_rows(0, 5 * HOUR, None)
        .await
        .unwrap()
        .is_empty());
    // A flush after the recalculation attributes against the packs as it
    // left them: `old` has room again (SQLite's flush keeps the packs it
    // wrote in memory; the recalculation must make it read them again).
    assert!(store
        .write_batch(&batch(
            "a-1",
            10,
            vec![account(
                "acct",
                vec![delta(HOUR, Some(old.clone()), 30)],
                vec![]
            )]
        ))
        .await
        .unwrap());
    assert_eq!(used(&*store, "acct", "old").await, 30);
    assert_eq!(used(&*store, "acct", "new").await, 100);
    // Finished plans are recorded once.
    store.record_recalculated(1, 10).await.unwrap();
    store.record_recalculated(1, 20).await.unwrap();
    assert_eq!(store.plans_recalculated().await.unwrap(), [1]);
}
