//! The deduction hot path allocates nothing (issue 10): a deduction from
//! a resident, activated account, without a request id, whether the
//! account already has unflushed usage or was just flushed.
//!
//! A counting global allocator counts the allocations made on the calling
//! thread between two points; the store is a real SQLite file.

use std::{
    alloc::{GlobalAlloc, Layout, System},
    cell::Cell,
    sync::Arc,
};

use packmeter::{
    calendar::now_ts,
    flush::Flusher,
    meter::{AccountState, Deduction, Meter, MeterConfig},
    store,
};

struct Counting;

thread_local! {
    static ALLOCATIONS: Cell<u64> = const { Cell::new(0) };
}

// SAFETY: forwards every call to the system allocator unchanged; the
// counter is a const-initialised thread-local `Cell`, which neither
// allocates nor re-enters the allocator.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.with(|n| n.set(n.get() + 1));
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.with(|n| n.set(n.get() + 1));
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.with(|n| n.set(n.get() + 1));
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Allocations made on this thread while `f` runs.
fn allocations_in(f: impl FnOnce()) -> u64 {
    let before = ALLOCATIONS.with(Cell::get);
    f();
    ALLOCATIONS.with(Cell::get) - before
}

const BOTH: Deduction<'static> = Deduction {
    calls: 1,
    egress_bytes: 1_500,
    at: None,
    request_id: "",
};

struct Setup {
    _dir: tempfile::TempDir,
    rt: tokio::runtime::Runtime,
    meter: Arc<Meter>,
    flusher: Arc<Flusher>,
    accounts: Vec<Arc<AccountState>>,
    /// The server clock of every deduction: one instant, so no hour
    /// boundary passes between the setup and the measured deductions.
    now: i64,
}

/// A meter on a fresh SQLite file with `n` resident accounts, each
/// activated by one deduction of calls and egress.
fn setup(n: usize) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let url: store::StoreUrl = format!("sqlite://{}", dir.path().join("alloc.db").display())
        .parse()
        .unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let store = rt.block_on(store::open(&url)).unwrap();
    let meter = Arc::new(Meter::new(MeterConfig::default(), store.clone()));
    let flusher = Arc::new(Flusher::new(
        meter.clone(),
        store,
        packmeter::flush::BATCH_ACCOUNTS,
        Arc::new(()),
        Arc::new(packmeter::clock::SystemClock),
    ));
    let now = now_ts();
    let accounts = rt.block_on(async {
        let mut v = Vec::new();
        for i in 0..n {
            let a = meter
                .account_for_deduction(&format!("alloc-{i}"), now)
                .await
                .unwrap();
            meter.deduct(&a, &BOTH, now).unwrap();
            v.push(a);
        }
        v
    });
    Setup {
        _dir: dir,
        rt,
        meter,
        flusher,
        accounts,
        now,
    }
}

#[test]
fn a_deduction_from_a_resident_account_allocates_nothing() {
    let s = setup(1_000);
    let now = s.now;
    // The deduction's outcome is checked, so the loop cannot be optimised
    // away and a failed deduction would not pass as free.
    let mut covered = 0;
    let n = allocations_in(|| {
        for _ in 0..10 {
            for a in &s.accounts {
                covered += s.meter.deduct(a, &BOTH, now).unwrap().calls.covered;
            }
        }
    });
    assert_eq!(covered, 10_000, "the free tier covers every call");
    assert_eq!(n, 0, "allocations in 10,000 deductions from dirty accounts");
}

#[test]
fn the_first_deduction_after_a_flush_allocates_nothing() {
    let s = setup(1_000);
    s.rt.block_on(s.flusher.flush()).unwrap();
    assert_eq!(s.meter.dirty_len(), 0);
    let now = s.now;
    // Each account's ledger is empty after the flush; its first deduction
    // refills it and queues the account again (into the queue's capacity).
    let n = allocations_in(|| {
        for a in &s.accounts {
            s.meter.deduct(a, &BOTH, now).unwrap();
        }
    });
    assert_eq!(s.meter.dirty_len(), 1_000, "every account queued again");
    assert_eq!(n, 0, "allocations in 1,000 first deductions after a flush");
}

#[test]
fn a_hot_account_lookup_and_deduction_allocates_nothing() {
    use futures_util::FutureExt;
    let s = setup(1);
    let now = s.now;
    let n = allocations_in(|| {
        for _ in 0..1_000 {
            let a = s
                .meter
                .account_for_deduction("alloc-0", now)
                .now_or_never()
                .expect("a resident account resolves without waiting")
                .unwrap();
            s.meter.deduct(&a, &BOTH, now).unwrap();
        }
    });
    assert_eq!(n, 0, "allocations in 1,000 lookups and deductions");
}
