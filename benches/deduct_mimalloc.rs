//! The [`deduct`](deduct.rs) benches under `serve`'s allocator (mimalloc,
//! which advises transparent huge pages for its arenas), so that the
//! in-process figures can be set beside the server's:
//! `cargo bench --bench deduct_mimalloc -- --warm-up-time 1 --measurement-time 3`.
//! Criterion files its results under the same names as `deduct`'s.

// `serve`'s allocator as `serve` calls it (src/allocator.rs); its upkeep
// thread and its tests are `serve`'s, unused here.
#[allow(dead_code)]
#[path = "../src/allocator.rs"]
mod allocator;

#[global_allocator]
static ALLOCATOR: allocator::MiMalloc = allocator::MiMalloc;

#[path = "deduct.rs"]
mod deduct;

fn main() {
    deduct::main()
}
