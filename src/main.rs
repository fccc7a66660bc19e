//! The `packmeter` binary: the command line. `serve` hands the parsed
//! configuration to the library ([`packmeter::server`]); the client
//! commands and `packmeter loadgen` live here, in the binary, so that the
//! server library does not link client tooling (indicatif, hdrhistogram).

mod allocator;
mod cli;
mod loadgen;

/// mimalloc instead of glibc's allocator: a call allocates and frees a
/// few dozen small buffers (HTTP/2 frames, headers, the decoded message),
/// and glibc's `malloc`, `free` and `malloc_consolidate` were about a tenth
/// of the server's CPU under load (BENCHMARKS.md, issue 14). The library
/// leaves the choice to the binary that links it. Called through
/// [`allocator::MiMalloc`], so that each object takes its own size class.
#[global_allocator]
static ALLOCATOR: allocator::MiMalloc = allocator::MiMalloc;

fn main() -> std::process::ExitCode {
    cli::main()
}
