//! The [`deduct`](deduct.rs) benches under `serve`'s allocator (mimalloc,
//! which advises transparent huge pages for its arenas), so that the
//! in-process figures can be set beside the server's:
//! `cargo bench --bench deduct_mimalloc -- --warm-up-time 1 --measurement-time 3`.
//! Criterion files its results under the same names as `deduct`'s.

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[path = "deduct.rs"]
mod deduct;

fn main() {
    deduct::main()
}
