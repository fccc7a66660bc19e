//! The hot path in process: [`Meter::deduct`] on one hot account across
//! threads, and over many resident accounts drawn at random.
//!
//! Scenarios (`BenchmarkId`), the in-process bars of issue 10 first:
//! - `deduct/hot`: 1 call from the same account, 1 thread (bar: median
//!   ≤ 100 ns).
//! - `deduct/among_1m`: 1 call from an account drawn uniformly (fixed-seed
//!   xorshift, seed `0x5EED_2024`) among 1,000,000 resident, activated
//!   accounts; the `Arc<AccountState>` is in hand, as after the handler's
//!   lookup (bar: median ≤ 300 ns).
//! - `deduct/among_10k`: the same among 10,000 accounts.
//! - `deduct/hot_2_threads`: every one of 2 threads deducts 1 call from the
//!   same account; the time is per deduction per thread (`iter_custom`), so
//!   throughput is 2 / time.
//! - `lookup_and_deduct/{among_10k,among_1m}`: `deduct/among_*` with the
//!   account map lookup the gRPC handler does first
//!   (`account_for_deduction`, resolved without I/O because the account is
//!   resident).
//!
//! `cargo bench --bench deduct -- --warm-up-time 1 --measurement-time 3`;
//! the medians are in `target/criterion/*/*/new/estimates.json`. This
//! bench runs under glibc's allocator, with 4 KiB pages; `serve` runs
//! under mimalloc, which asks for transparent huge pages, and
//! `cargo bench --bench deduct_mimalloc` runs the same benches under it
//! (a million accounts then take far fewer TLB misses).

use std::{
    hint::black_box,
    sync::{Arc, Barrier},
    time::{Duration, Instant},
};

use criterion::{criterion_group, BenchmarkId, Criterion};
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

/// The seed of the account draws: every run draws the same sequence.
const SEED: u64 = 0x5EED_2024;

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
    let mut g = c.benchmark_group("deduct");
    for threads in [1usize, 2] {
        let id = if threads == 1 { "hot" } else { "hot_2_threads" };
        g.bench_with_input(BenchmarkId::from_parameter(id), &threads, |b, &threads| {
            b.iter_custom(|iters| {
                let start = Arc::new(Barrier::new(threads));
                let handles: Vec<_> = (0..threads)
                    .map(|_| {
                        let (meter, acct, start) = (meter.clone(), acct.clone(), start.clone());
                        std::thread::spawn(move || {
                            start.wait();
                            let t = Instant::now();
                            for _ in 0..iters {
                                let _ = black_box(meter.deduct(&acct, black_box(&ONE_CALL), now));
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
        });
    }
    g.finish();
}

fn many_accounts(c: &mut Criterion) {
    for (n, name) in [(10_000usize, "among_10k"), (1_000_000, "among_1m")] {
        let (_dir, meter, accounts) = meter_with(n);
        let now = now_ts();
        let mut g = c.benchmark_group("deduct");
        let mut rng = XorShift(SEED);
        g.bench_with_input(BenchmarkId::from_parameter(name), &n, |b, &n| {
            b.iter(|| {
                let (_, a) = &accounts[rng.below(n)];
                black_box(meter.deduct(a, black_box(&ONE_CALL), now))
            })
        });
        g.finish();
        let mut g = c.benchmark_group("lookup_and_deduct");
        let mut rng = XorShift(SEED);
        g.bench_with_input(BenchmarkId::from_parameter(name), &n, |b, &n| {
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

// `criterion_main!`, spelled out so that `deduct_mimalloc.rs` can run the
// same benches under `serve`'s allocator.
pub fn main() {
    benches();
    Criterion::default().configure_from_args().final_summary();
}
