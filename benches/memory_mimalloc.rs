//! The [`memory`](memory.rs) bench under `serve`'s allocator (mimalloc),
//! so that its bytes per account can be set beside `benches/rss.sh`'s:
//! the same accounts and deductions, in one process, with no gRPC and no
//! known-ids set. `cargo bench --bench memory_mimalloc [-- N]`.

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[path = "memory.rs"]
mod memory;

fn main() {
    memory::main()
}
