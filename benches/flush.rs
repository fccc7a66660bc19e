//! A flush of 100 k dirty accounts to a real SQLite file in a tempdir.
//!
//! Scenarios (`BenchmarkId`): `calls/100000` (one delta and one pack row
//! per account) and `calls_and_egress/100000` (two of each). Every sample
//! first makes all accounts dirty again with one deduction each (untimed),
//! then times [`Flusher::flush`], which returns once the rows are durable.

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

const ACCOUNTS: usize = 100_000;

fn flush(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let mut g = c.benchmark_group("flush_sqlite");
    g.sample_size(10);
    for (name, egress) in [("calls", 0u64), ("calls_and_egress", 1_500)] {
        let dir = tempfile::tempdir().expect("tempdir");
        let url = format!("sqlite://{}", dir.path().join("bench.db").display());
        let url: store::StoreUrl = url.parse().expect("a store URL");
        let store = rt.block_on(store::open(&url)).expect("open the store");
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
        let accounts: Vec<Arc<AccountState>> = rt.block_on(async {
            let now = now_ts();
            let mut v = Vec::with_capacity(ACCOUNTS);
            for i in 0..ACCOUNTS {
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
        // The first flush inserts the account rows; measure the steady state.
        dirty_all();
        rt.block_on(flusher.flush()).expect("first flush");
        g.bench_with_input(BenchmarkId::new(name, ACCOUNTS), &ACCOUNTS, |b, _| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    dirty_all();
                    let t = Instant::now();
                    let r = rt.block_on(flusher.flush()).expect("flush");
                    total += t.elapsed();
                    assert_eq!(r.accounts, ACCOUNTS);
                }
                total
            })
        });
    }
    g.finish();
}

criterion_group!(benches, flush);
criterion_main!(benches);
