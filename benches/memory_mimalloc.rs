//! The [`memory`](memory.rs) bench under `serve`'s allocator (mimalloc),
//! so that its bytes per account can be set beside `benches/rss.sh`'s:
//! the same accounts and deductions, in one process, with no gRPC and no
//! known-ids set. `cargo bench --bench memory_mimalloc [-- N]`.

// `serve`'s allocator as `serve` calls it (src/allocator.rs); its upkeep
// thread and its tests are `serve`'s, unused here.
#[allow(dead_code)]
#[path = "../src/allocator.rs"]
mod allocator;

#[global_allocator]
static ALLOCATOR: allocator::MiMalloc = allocator::MiMalloc;

#[path = "memory.rs"]
mod memory;

fn main() {
    memory::main()
}
