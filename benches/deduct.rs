//! The hot path in process: [`Meter::deduct`] on one hot account across
//! threads, and over many resident accounts drawn at random.
//!
//! Scenarios (`BenchmarkId`):
//! - `hot_account/{1,2}`: every thread deducts 1 call from the same account;
//!   the time is per deduction per thread (`iter_custom`), so throughput is
//!   threads / time.
//! - `accounts/{10000,1000000}`: 1 call from an account drawn uniformly
//!   (fixed-seed xorshift) among resident, activated accounts; the
//!   `Arc<AccountState>` is in hand, as after the handler's lookup.
//! - `lookup_and_deduct/{10000,1000000}`: the same with the `DashMap` lookup
//!   the gRPC handler does first (`account_for_deduction`, resolved without
//!   I/O because the account is resident).

use std::{
    hint::black_box,
    sync::{Arc, Barrier},
    time::{Duration, Instant},
};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use futures_util::FutureExt;
use packmeter::{
    calendar::now_ts,
    meter::{AccountState, Deduction, Meter, MeterConfig},
    store,
};

const ONE_CALL: Deduction<'static> = Deduction {
    calls: 1,
    egress_bytes: 0,
    at: None,
    request_id: "",
};

struct XorShift(u64);

impl XorShift {
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        ((u128::from(self.0) * n as u128) >> 64) as usize
    }
}

/// Resident accounts with their ids.
type Accounts = Vec<(String, Arc<AccountState>)>;

/// A meter on a fresh SQLite file with `n` resident, activated accounts.
fn meter_with(n: usize) -> (tempfile::TempDir, Arc<Meter>, Accounts) {
    let dir = tempfile::tempdir().expect("tempdir");
    let url = format!("sqlite://{}", dir.path().join("bench.db").display());
    let url: store::StoreUrl = url.parse().expect("a store URL");
    let store = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime")
        .block_on(store::open(&url))
        .expect("open the store");
    let meter = Arc::new(Meter::new(MeterConfig::default(), store));
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    let now = now_ts();
    let accounts = rt.block_on(async {
        let mut v = Vec::with_capacity(n);
        for i in 0..n {
            let id = format!("bench-{i:07}");
            let a = meter
                .account_for_deduction(&id, now)
                .await
                .expect("load the account");
            // Activate it and make its month's packs resident.
            meter.deduct(&a, &ONE_CALL, now).expect("deduct");
            v.push((id, a));
        }
        v
    });
    (dir, meter, accounts)
}

fn hot_account(c: &mut Criterion) {
    let (_dir, meter, accounts) = meter_with(1);
    let acct = accounts[0].1.clone();
    let now = now_ts();
    let mut g = c.benchmark_group("hot_account");
    for threads in [1usize, 2] {
        g.bench_with_input(
            BenchmarkId::from_parameter(threads),
            &threads,
            |b, &threads| {
                b.iter_custom(|iters| {
                    let start = Arc::new(Barrier::new(threads));
                    let handles: Vec<_> = (0..threads)
                        .map(|_| {
                            let (meter, acct, start) = (meter.clone(), acct.clone(), start.clone());
                            std::thread::spawn(move || {
                                start.wait();
                                let t = Instant::now();
                                for _ in 0..iters {
                                    let _ =
                                        black_box(meter.deduct(&acct, black_box(&ONE_CALL), now));
                                }
                                t.elapsed()
                            })
                        })
                        .collect();
                    // The slowest thread bounds the wall time of `iters` rounds.
                    handles
                        .into_iter()
                        .map(|h| h.join().expect("bench thread"))
                        .max()
                        .unwrap_or(Duration::ZERO)
                })
            },
        );
    }
    g.finish();
}

fn many_accounts(c: &mut Criterion) {
    for n in [10_000usize, 1_000_000] {
        let (_dir, meter, accounts) = meter_with(n);
        let now = now_ts();
        let mut g = c.benchmark_group("accounts");
        let mut rng = XorShift(0x5EED_2024);
        g.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, &n| {
            b.iter(|| {
                let (_, a) = &accounts[rng.below(n)];
                black_box(meter.deduct(a, black_box(&ONE_CALL), now))
            })
        });
        g.finish();
        let mut g = c.benchmark_group("lookup_and_deduct");
        let mut rng = XorShift(0x5EED_2024);
        g.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, &n| {
            b.iter(|| {
                let (id, _) = &accounts[rng.below(n)];
                let a = meter
                    .account_for_deduction(id, now)
                    .now_or_never()
                    .expect("a resident account resolves without waiting")
                    .expect("resident");
                black_box(meter.deduct(&a, black_box(&ONE_CALL), now))
            })
        });
        g.finish();
    }
}

criterion_group!(benches, hot_account, many_accounts);
criterion_main!(benches);
