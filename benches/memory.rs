//! Resident memory per active account-month, at 1 M accounts.
//!
//! A plain `main` (`harness = false`): reads `VmRSS` from /proc/self/status,
//! activates 1 M accounts with one deduction each of calls and egress (both
//! items' packs of the month become resident, and each account holds one
//! unflushed delta per item), and reads it again. It prints the bytes per
//! account while the usage is unflushed (the worst case, between two
//! flushes) and after a flush to SQLite has written it out.
//!
//! `cargo bench --bench memory` runs it; `-- N` picks another account count.

use std::sync::Arc;

use packmeter::{
    calendar::now_ts,
    flush::Flusher,
    meter::{Deduction, Meter, MeterConfig},
    store,
};

fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("read /proc/self/status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .expect("VmRSS in kB")
        * 1024
}

pub fn main() {
    // `cargo bench` passes `--bench`; the first number, if any, is the count.
    let n: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(1_000_000);
    let dir = tempfile::tempdir().expect("tempdir");
    let url = format!("sqlite://{}", dir.path().join("bench.db").display());
    let url: store::StoreUrl = url.parse().expect("a store URL");
    let store = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime")
        .block_on(store::open(&url))
        .expect("open the store");
    let meter = Arc::new(Meter::new(MeterConfig::default(), store.clone()));
    let flusher = Arc::new(Flusher::new(
        meter.clone(),
        store,
        packmeter::flush::BATCH_ACCOUNTS,
        Arc::new(()),
        Arc::new(packmeter::clock::SystemClock),
    ));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let ids: Vec<String> = (0..n).map(|i| format!("memory-{i:07}")).collect();
    let d = Deduction {
        calls: 1,
        egress_bytes: 1_500,
        ..Deduction::default()
    };

    let before = rss_bytes();
    rt.block_on(async {
        let now = now_ts();
        for id in &ids {
            let a = meter.account_for_deduction(id, now).await.expect("load");
            meter.deduct(&a, &d, now).expect("deduct");
        }
    });
    let dirty = rss_bytes();
    rt.block_on(flusher.flush()).expect("flush");
    let flushed = rss_bytes();
    assert_eq!(meter.resident(), n);

    let per = |rss: u64| rss.saturating_sub(before) as f64 / n as f64;
    println!(
        "memory/accounts={n} rss_before={:.1}MB rss_dirty={:.1}MB rss_flushed={:.1}MB \
         bytes_per_account_dirty={:.0} bytes_per_account_flushed={:.0}",
        before as f64 / 1e6,
        dirty as f64 / 1e6,
        flushed as f64 / 1e6,
        per(dirty),
        per(flushed),
    );
}
