//! The calendar (R2–R4): the free window, its months, and the month at an
//! instant, in a fixed-offset and an IANA billing zone.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use packmeter::calendar::{
    free_month_at, free_months, free_window, BillingZone, FreeTierPlan, Ts, SECOND,
};

/// 2019-11-10 17:13:14 +08:00, the seed's example.
const ACTIVATED: Ts = 1_573_377_194 * SECOND;

fn zones() -> [(&'static str, BillingZone); 3] {
    let z = |s: &str| s.parse::<BillingZone>().expect("valid zone");
    [
        ("+08:00", z("+08:00")),
        ("Asia/Shanghai", z("Asia/Shanghai")),
        ("America/New_York", z("America/New_York")),
    ]
}

fn calendar(c: &mut Criterion) {
    let plan = FreeTierPlan::default();
    // Seven months into the window.
    let at = ACTIVATED + 200 * 86_400 * SECOND;
    for (name, zone) in zones() {
        let mut g = c.benchmark_group("free_month_at");
        g.bench_with_input(BenchmarkId::from_parameter(name), &zone, |b, zone| {
            b.iter(|| free_month_at(black_box(ACTIVATED), black_box(at), &plan, zone))
        });
        g.finish();
        let mut g = c.benchmark_group("free_months");
        g.bench_with_input(BenchmarkId::from_parameter(name), &zone, |b, zone| {
            b.iter(|| free_months(black_box(ACTIVATED), &plan, zone))
        });
        g.finish();
        let mut g = c.benchmark_group("free_window");
        g.bench_with_input(BenchmarkId::from_parameter(name), &zone, |b, zone| {
            b.iter(|| free_window(black_box(ACTIVATED), &plan, zone))
        });
        g.finish();
    }
}

criterion_group!(benches, calendar);
criterion_main!(benches);
