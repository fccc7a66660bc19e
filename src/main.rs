//! The `packmeter` binary: the command line. `serve` hands the parsed
//! configuration to the library ([`packmeter::server`]); the client
//! commands and `packmeter loadgen` live here, in the binary, so that the
//! server library does not link client tooling (indicatif, hdrhistogram).

mod cli;
mod loadgen;

/// mimalloc instead of glibc's allocator: a call allocates and frees a
/// few dozen small buffers (HTTP/2 frames, headers, the decoded message),
/// and glibc's `malloc`, `free` and `malloc_consolidate` were about a tenth
/// of the server's CPU under load (BENCHMARKS.md, issue 14). The library
/// leaves the choice to the binary that links it.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// How often `serve` asks mimalloc to give back the memory it has freed.
const PURGE_EVERY: std::time::Duration = std::time::Duration::from_secs(2);

/// Starts a thread that asks mimalloc, every [`PURGE_EVERY`], to return to
/// the system the pages it freed more than its purge delay (1 s) ago.
///
/// mimalloc purges them only from inside an allocation or a free, so a
/// server that goes quiet after a burst (a first pass over a million
/// accounts, a large flush) kept up to 30 MB of freed pages in its RSS
/// until its next burst: `benches/rss.sh` at 1 M accounts read 429 MB,
/// 398 MB with `MIMALLOC_PURGE_DELAY=0` (issue 10). Purging at once on
/// every free (that option) would put the purge's `madvise` calls on the
/// calls' threads; this thread does it instead, off their path: the
/// arenas' purge is process-wide, whichever thread runs it.
pub(crate) fn start_allocator_upkeep() {
    let upkeep = move || loop {
        std::thread::sleep(PURGE_EVERY);
        // SAFETY: mi_collect takes no pointer and may be called from any
        // thread at any time; `false` purges only what is due.
        unsafe { libmimalloc_sys::mi_collect(false) };
    };
    if let Err(e) = std::thread::Builder::new()
        .name("mimalloc-upkeep".into())
        .spawn(upkeep)
    {
        tracing::warn!(error = %e, "cannot start the allocator's upkeep thread; freed memory is returned only under load");
    }
}

fn main() -> std::process::ExitCode {
    cli::main()
}
