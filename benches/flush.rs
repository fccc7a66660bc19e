//! A flush of 100 k dirty accounts to a real SQLite file in a tempdir and,
//! in the same run, to a fresh PostgreSQL database.
//!
//! Groups `flush_sqlite` and `flush_postgres`; scenarios (`BenchmarkId`):
//! `calls/100000` (one delta and one pack row per account) and
//! `calls_and_egress/100000` (two of each). Every sample first makes all
//! accounts dirty again with one deduction each (untimed), then times
//! [`Flusher::flush`], which returns once the rows are durable.
//!
//! PostgreSQL: the server `PACKMETER_TEST_POSTGRES_URL` names (default
//! `postgres://postgres@127.0.0.1:5432/postgres`, as the tests use). Each
//! scenario creates a database of its own (`pm_bench_<random>`) and drops
//! it afterwards. With no server answering, the group is skipped with a
//! printed reason. After the first flush the tables are `ANALYZE`d, as
//! autovacuum would on a server with default settings
//! (`PACKMETER_BENCH_ANALYZE=0` skips it).
//!
//! `PACKMETER_BENCH_STORES=sqlite` (or `postgres`) runs one store only;
//! `PACKMETER_BENCH_SCENARIOS=calls_and_egress` (or `calls`) one scenario
//! only (criterion's own filter still loads and first-flushes the others).
//! `PACKMETER_BENCH_ACCOUNTS=N` flushes N accounts instead of 100 k.
//! `PACKMETER_BENCH_FLUSHES=N` runs exactly N flushes after the first two,
//! untimed, in place of criterion's measurement.
//!
//! Instructions per flushed account (callgrind; deterministic on a loaded
//! machine): run the bench binary twice under `valgrind --tool=callgrind
//! --separate-threads=yes` with `--bench flush_sqlite/calls/`,
//! `PACKMETER_BENCH_STORES=sqlite`, `PACKMETER_BENCH_SCENARIOS=calls`,
//! `PACKMETER_BENCH_ACCOUNTS=20000`, once with `PACKMETER_BENCH_FLUSHES=10`
//! and once with `PACKMETER_BENCH_FLUSHES=0` (the two untimed flushes, which
//! insert the rows, alone). Each thread's steady-state cost is the
//! difference between the two runs' files of that thread, divided by
//! 200 k flushed accounts (10 × 20 k): thread 3 is the SQLite writer (its
//! profile holds `flush_batch`; its calls of `packmeter::ledger::attribute`,
//! one per flushed account, confirm the count with `callgrind_annotate
//! --tree=calling`: 240 k and 40 k), thread 4 the flush thread
//! (`packmeter-flush`, whose profile holds `Flusher::written`), thread 1
//! the bench's own thread. (`--dump-before=*steady_state*` dumped the
//! calling thread alone with valgrind 3.19, and `--zero-before` zeroes the
//! calling thread only, so neither separates the writer's warm-up.)
//! A fixed count matters: a row whose counter grows past 1, 127,
//! 32767 changes size and is rewritten rather than overwritten in place,
//! once, so runs of different lengths amortize that differently. (With
//! `--profile-time`, criterion's count depends on how fast the machine
//! was.)

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use packmeter::{
    calendar::now_ts,
    flush::Flusher,
    meter::{AccountState, Deduction, Meter, MeterConfig},
    store,
};
use tokio::runtime::Runtime;

const ACCOUNTS: usize = 100_000;

/// `PACKMETER_BENCH_ACCOUNTS`, or [`ACCOUNTS`].
fn accounts() -> usize {
    std::env::var("PACKMETER_BENCH_ACCOUNTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(ACCOUNTS)
}

/// `PACKMETER_BENCH_FLUSHES=N`: after the two untimed flushes, exactly N
/// more, untimed, instead of criterion's measurement.
fn fixed_flushes() -> Option<usize> {
    std::env::var("PACKMETER_BENCH_FLUSHES")
        .ok()
        .and_then(|v| v.parse().ok())
}

/// Called once the first two flushes are done: callgrind's `--zero-before` hook.
#[inline(never)]
fn steady_state(flushed: &std::sync::atomic::AtomicUsize) {
    flushed.store(0, std::sync::atomic::Ordering::Relaxed);
    std::hint::black_box(flushed);
}
const SCENARIOS: [(&str, u64); 2] = [("calls", 0), ("calls_and_egress", 1_500)];

/// Whether the comma-separated list in `var` names `what` (yes if unset).
fn wanted(var: &str, what: &str) -> bool {
    std::env::var(var)
        .map(|v| v.split(',').any(|s| s.trim() == what))
        .unwrap_or(true)
}

/// Times `Flusher::flush` of `ACCOUNTS` dirty accounts on the store at `url`.
fn bench_store(c: &mut Criterion, rt: &Runtime, group: &str, url: &dyn Fn() -> Option<Url>) {
    let mut g = c.benchmark_group(group);
    g.sample_size(10);
    for (name, egress) in SCENARIOS {
        if !wanted("PACKMETER_BENCH_SCENARIOS", name) {
            continue;
        }
        let Some(target) = url() else {
            break;
        };
        let store = rt
            .block_on(store::open(&target.url))
            .expect("open the store");
        let meter = Arc::new(Meter::new(MeterConfig::default(), store.clone()));
        let flusher = Arc::new(Flusher::new(
            meter.clone(),
            store,
            packmeter::flush::BATCH_ACCOUNTS,
            Arc::new(()),
            Arc::new(packmeter::clock::SystemClock),
        ));
        let d = Deduction {
            calls: 1,
            egress_bytes: egress,
            ..Deduction::default()
        };
        let n = accounts();
        let accounts: Vec<Arc<AccountState>> = rt.block_on(async {
            let now = now_ts();
            let mut v = Vec::with_capacity(n);
            for i in 0..n {
                let a = meter
                    .account_for_deduction(&format!("flush-{i:07}"), now)
                    .await
                    .expect("load");
                v.push(a);
            }
            v
        });
        let dirty_all = || {
            let now = now_ts();
            for a in &accounts {
                meter.deduct(a, &d, now).expect("deduct");
            }
        };
        // The first flush inserts the account rows, the second each pack's
        // usage row of the hour (the first deduction of an account is
        // booked before its free-tier packs are resident, callgrind counted
        // an insert per account there); measure the steady state.
        for flush in ["first", "second"] {
            dirty_all();
            let t = Instant::now();
            rt.block_on(flusher.flush()).expect("first flushes");
            eprintln!(
                "{group}/{name}: {flush} flush ({n} accounts) {:?}",
                t.elapsed()
            );
        }
        let flushed = std::sync::atomic::AtomicUsize::new(0);
        steady_state(&flushed);
        #[cfg(feature = "postgres")]
        if let Some(db) = &target._db {
            // What autovacuum does on a server with its default settings;
            // the test server runs with autovacuum off (BENCHMARKS.md).
            if std::env::var("PACKMETER_BENCH_ANALYZE").as_deref() != Ok("0") {
                rt.block_on(db.analyze());
                eprintln!("{group}/{name}: tables analyzed");
            }
        }
        if let Some(count) = fixed_flushes() {
            // A fixed amount of work, for callgrind (see the module doc).
            for _ in 0..count {
                dirty_all();
                let r = rt.block_on(flusher.flush()).expect("flush");
                assert_eq!(r.accounts, n);
                flushed.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
            }
            eprintln!("{group}/{name}: {count} flushes of {n} accounts, untimed");
            drop((flusher, meter, accounts));
            drop(target);
            continue;
        }
        g.bench_with_input(BenchmarkId::new(name, n), &n, |b, _| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    dirty_all();
                    let t = Instant::now();
                    let r = rt.block_on(flusher.flush()).expect("flush");
                    total += t.elapsed();
                    assert_eq!(r.accounts, n);
                    flushed.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
                }
                total
            })
        });
        eprintln!(
            "{group}/{name}: {} accounts flushed in the timed flushes",
            flushed.load(std::sync::atomic::Ordering::Relaxed)
        );
        // Close the pool before the database is dropped.
        drop((flusher, meter, accounts));
        drop(target);
    }
    g.finish();
}

/// A store URL, and what to clean up once the scenario is done.
struct Url {
    url: store::StoreUrl,
    _dir: Option<tempfile::TempDir>,
    #[cfg(feature = "postgres")]
    _db: Option<pg::BenchDb>,
}

fn flush(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    if wanted("PACKMETER_BENCH_STORES", "sqlite") {
        bench_store(c, &rt, "flush_sqlite", &|| {
            let dir = tempfile::tempdir().expect("tempdir");
            let url = format!("sqlite://{}", dir.path().join("bench.db").display());
            Some(Url {
                url: url.parse().expect("a store URL"),
                _dir: Some(dir),
                #[cfg(feature = "postgres")]
                _db: None,
            })
        });
    }
    #[cfg(feature = "postgres")]
    if wanted("PACKMETER_BENCH_STORES", "postgres") {
        bench_store(c, &rt, "flush_postgres", &|| {
            let db = rt.block_on(pg::BenchDb::create())?;
            Some(Url {
                url: db.url.parse().expect("a store URL"),
                _dir: None,
                _db: Some(db),
            })
        });
    }
}

#[cfg(feature = "postgres")]
mod pg {
    use packmeter::store::{postgres::PgUrl, redact};

    const DEFAULT_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";

    /// A fresh database, dropped with this value.
    pub struct BenchDb {
        pub url: String,
        name: String,
        admin: PgUrl,
    }

    fn with_database(url: &str, name: &str) -> String {
        let (base, query) = url
            .split_once('?')
            .map_or((url, None), |(b, q)| (b, Some(q)));
        let (scheme, rest) = base.split_once("://").expect("a URL with ://");
        let authority = rest.split('/').next().unwrap_or(rest);
        match query {
            Some(q) => format!("{scheme}://{authority}/{name}?{q}"),
            None => format!("{scheme}://{authority}/{name}"),
        }
    }

    impl BenchDb {
        /// `ANALYZE` on the bench's database: statistics for the planner.
        pub async fn analyze(&self) {
            let url = PgUrl::parse(&self.url).expect("the bench database's URL");
            url.connect()
                .await
                .expect("connect to the bench database")
                .batch_execute("ANALYZE")
                .await
                .expect("ANALYZE");
        }

        /// `None`, after printing why, when no server answers.
        pub async fn create() -> Option<BenchDb> {
            let admin = std::env::var("PACKMETER_TEST_POSTGRES_URL")
                .ok()
                .filter(|v| !v.is_empty())
                .unwrap_or_else(|| DEFAULT_URL.to_string());
            let shown = redact(&admin);
            let parsed = match PgUrl::parse(&admin) {
                Ok(p) => p,
                Err(e) => {
                    eprintln!(
                        "SKIPPED flush_postgres: {shown} is not a PostgreSQL URL: {}",
                        e.0
                    );
                    return None;
                }
            };
            let client =
                match tokio::time::timeout(std::time::Duration::from_secs(10), parsed.connect())
                    .await
                {
                    Ok(Ok(c)) => c,
                    Ok(Err(e)) => {
                        eprintln!(
                            "SKIPPED flush_postgres: no PostgreSQL at {shown}: {}",
                            e.message
                        );
                        return None;
                    }
                    Err(_) => {
                        eprintln!("SKIPPED flush_postgres: {shown} did not answer within 10 s");
                        return None;
                    }
                };
            let name = format!("pm_bench_{:016x}", packmeter::flush::random_u64());
            client
                .batch_execute(&format!("CREATE DATABASE {name}"))
                .await
                .unwrap_or_else(|e| panic!("CREATE DATABASE {name}: {e:?}"));
            Some(BenchDb {
                url: with_database(&admin, &name),
                name,
                admin: parsed,
            })
        }
    }

    impl Drop for BenchDb {
        fn drop(&mut self) {
            let (admin, name) = (self.admin.clone(), self.name.clone());
            // Drop runs beside the bench's runtime: use a thread with its own.
            let dropped = std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("runtime");
                rt.block_on(async {
                    let client = admin.connect().await.map_err(|e| e.message)?;
                    client
                        .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                        .await
                        .map_err(|e| format!("{e:?}"))
                })
            })
            .join();
            match dropped {
                Ok(Ok(())) => {}
                Ok(Err(e)) => eprintln!("could not drop database {}: {e}", self.name),
                Err(_) => eprintln!("could not drop database {}: the thread panicked", self.name),
            }
        }
    }
}

criterion_group!(benches, flush);
criterion_main!(benches);
