//! The first deductions of a calendar month, among many resident accounts.
//!
//! A deduction that finds its account's pack list out of date (the new
//! month's free-tier packs are not there yet, or an ended month's are still
//! there) replaces the list with no other deduction in progress
//! (`Gate::exclusive`, see `AccountState::packs`). Every active account
//! does this twice a month: at its first deduction of the month, and at
//! its first deduction after the ended month's hours close (`late_grace`
//! later). This bench measures what those deductions cost beside ordinary
//! ones, in one process, on one thread and on two threads that deduct at
//! once (where each exclusive section also waits for, and holds up, the
//! other thread).
//!
//! A plain `main` (`harness = false`): `cargo bench --bench month_start`,
//! `-- N` for another account count (default 1,000,000). The clock is a
//! parameter of the meter, so the month boundary is crossed without
//! waiting: the accounts are activated on 2026-11-20, then deducted from
//! at four instants, each phase once per account:
//! - `mid_month`: 2026-11-20, one second later (the ordinary case);
//! - `month_start`: 2026-12-01T00:10Z (December's packs appear);
//! - `month_closed`: 2026-12-01T01:20Z, after the 1 h late grace
//!   (November's packs leave);
//! - `mid_month_again`: one second after that.
//!
//! Each phase prints the wall-clock time and the CPU time (of all its
//! threads) per deduction; on a busy machine the CPU time is the steadier
//! one. The two-thread phases run on a second set of accounts, each thread
//! taking every other account.

use std::{sync::Arc, time::Instant};

use packmeter::{
    calendar::{from_datetime, Ts, SECOND},
    meter::{AccountState, Deduction, Meter, MeterConfig},
    store,
};

const ONE_CALL: Deduction<'static> = Deduction {
    calls: 1,
    egress_bytes: 0,
    at: None,
    request_id: "",
};

fn at(s: &str) -> Ts {
    from_datetime(&chrono::DateTime::parse_from_rfc3339(s).expect("an RFC 3339 time"))
}

/// This thread's CPU time so far, in nanoseconds: on a shared machine the
/// wall clock also counts the time the thread waited for a core.
fn thread_cpu_ns() -> u128 {
    let mut t = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `t` is a valid timespec for the call to fill.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut t) };
    assert_eq!(rc, 0, "clock_gettime(CLOCK_THREAD_CPUTIME_ID)");
    t.tv_sec as u128 * 1_000_000_000 + t.tv_nsec as u128
}

/// Deducts one call from every account at `now`, on `threads` threads
/// (each takes every `threads`-th account); wall-clock and CPU (all
/// threads) nanoseconds per deduction.
fn phase(
    meter: &Arc<Meter>,
    accounts: &[Arc<AccountState>],
    now: Ts,
    threads: usize,
) -> (f64, f64) {
    let started = Instant::now();
    let cpu: u128 = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let meter = meter.clone();
                s.spawn(move || {
                    let cpu = thread_cpu_ns();
                    for a in accounts.iter().skip(t).step_by(threads) {
                        let o = meter.deduct(a, &ONE_CALL, now).expect("a deduction");
                        std::hint::black_box(o);
                    }
                    thread_cpu_ns() - cpu
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("a thread"))
            .sum()
    });
    let n = accounts.len() as f64;
    (started.elapsed().as_nanos() as f64 / n, cpu as f64 / n)
}

fn main() {
    let n: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(1_000_000);
    let dir = tempfile::tempdir().expect("tempdir");
    let url = format!("sqlite://{}", dir.path().join("bench.db").display());
    let url: store::StoreUrl = url.parse().expect("a store URL");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let store = rt.block_on(store::open(&url)).expect("open the store");
    let meter = Arc::new(Meter::new(MeterConfig::default(), store));
    let activated = at("2026-11-20T10:00:00Z");
    // Two sets of accounts: one for the one-thread phases, one for the
    // two-thread phases, each activated by a first deduction.
    let sets: Vec<Vec<Arc<AccountState>>> = (0..2)
        .map(|set| {
            rt.block_on(async {
                let mut accounts = Vec::with_capacity(n / 2);
                for i in 0..n / 2 {
                    let id = format!("month-{set}-{i:07}");
                    let a = meter
                        .account_for_deduction(&id, activated)
                        .await
                        .expect("an account");
                    meter.deduct(&a, &ONE_CALL, activated).expect("activate");
                    accounts.push(a);
                }
                accounts
            })
        })
        .collect();
    let closed = at("2026-12-01T01:20:00Z");
    let phases = [
        ("mid_month", activated + SECOND),
        ("month_start", at("2026-12-01T00:10:00Z")),
        ("month_closed", closed),
        ("mid_month_again", closed + SECOND),
    ];
    for (threads, accounts) in [1, 2].into_iter().zip(&sets) {
        for (name, now) in phases {
            let (wall, cpu) = phase(&meter, accounts, now, threads);
            println!(
                "month_start/accounts={} threads={threads} phase={name} \
                 wall_ns_per_deduction={wall:.0} cpu_ns_per_deduction={cpu:.0}",
                accounts.len()
            );
        }
    }
}
