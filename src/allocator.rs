//! The binary's allocator: mimalloc, called so that every object takes its
//! own size class.
//!
//! The `mimalloc` crate's `GlobalAlloc` passes every request to
//! `mi_malloc_aligned`, with the type's alignment. mimalloc 3 serves such a
//! request from its size's class only while that class has a page with a
//! free block; otherwise it treats the size as needing a larger block
//! unless the size is a power of two, and over-allocates `size + align - 1`.
//! A class that never had a page never gets one, so every request of a
//! size that is not a power of two takes the next class up, and the slow
//! path, for good. A resident account (`Arc<AccountState>`, 192 B) took
//! 224 B, its pack list (80 B) 96 B: 48 B an account, 48 MB at a million
//! (issue 10; mimalloc's per-class statistics showed one million blocks of
//! 224 B and none of 192). The same report is
//! <https://github.com/microsoft/mimalloc/issues/889>; the `mimalloc` crate's
//! latest release (0.1.52, on libmimalloc-sys 0.1.49) still calls it so.
//!
//! Here a request whose alignment mimalloc's plain `mi_malloc` already
//! gives (at most `MI_MAX_ALIGN_SIZE`, 16 bytes, and no larger than the
//! size: mimalloc's blocks are multiples of 8 bytes, of 16 above 16, and a
//! page's first block is 16-byte aligned) goes to `mi_malloc`, and only
//! the rest to the aligned API. This is the rule Rust's own `System`
//! allocator applies to `malloc`.
//!
//! Compiled into `packmeter` (`src/main.rs`) and into the benches that
//! measure under `serve`'s allocator (`#[path]`), not into the library,
//! which forbids `unsafe` and leaves the allocator to the binary.

use std::alloc::{GlobalAlloc, Layout};
use std::ffi::c_void;

use libmimalloc_sys as mi;

/// The largest alignment `mi_malloc` guarantees for a request of at least
/// that many bytes (mimalloc's `MI_MAX_ALIGN_SIZE` on 64-bit targets).
const MI_MAX_ALIGN_SIZE: usize = 16;

/// mimalloc, with plain calls where they give the alignment asked for.
pub struct MiMalloc;

/// Whether `mi_malloc(size)` returns memory aligned to `align`.
#[inline]
fn plain(size: usize, align: usize) -> bool {
    align <= MI_MAX_ALIGN_SIZE && align <= size
}

/// Allocates `layout` with `plain_fn` (`mi_malloc` or `mi_zalloc`) where
/// that gives the alignment, else with `aligned_fn`, their aligned forms.
///
/// # Safety
/// `layout` has a non-zero size (`GlobalAlloc::alloc`'s contract).
#[inline(always)]
unsafe fn allocate(
    layout: Layout,
    plain_fn: unsafe extern "C" fn(usize) -> *mut c_void,
    aligned_fn: unsafe extern "C" fn(usize, usize) -> *mut c_void,
) -> *mut u8 {
    let (size, align) = (layout.size(), layout.align());
    // SAFETY: C calls that take a size and a power-of-two alignment.
    unsafe {
        match plain(size, align) {
            true => plain_fn(size),
            false => aligned_fn(size, align),
        }
    }
    .cast()
}

// SAFETY: every pointer returned comes from mimalloc (null on failure), for
// at least `layout.size()` bytes aligned to `layout.align()` (`plain`
// above, and the aligned API otherwise); `dealloc` and `realloc` receive
// only pointers this allocator returned, which `mi_free` and `mi_realloc*`
// accept whichever mimalloc call made them.
unsafe impl GlobalAlloc for MiMalloc {
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the trait's contract.
        unsafe { allocate(layout, mi::mi_malloc, mi::mi_malloc_aligned) }
    }

    #[inline]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the trait's contract.
        unsafe { allocate(layout, mi::mi_zalloc, mi::mi_zalloc_aligned) }
    }

    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, _layout: Layout) {
        // SAFETY: `ptr` came from this allocator (the trait's contract).
        unsafe { mi::mi_free(ptr.cast::<c_void>()) }
    }

    #[inline]
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let align = layout.align();
        let ptr = ptr.cast::<c_void>();
        // SAFETY: `ptr` came from this allocator (the trait's contract); the
        // new block keeps the layout's alignment, decided on the new size.
        unsafe {
            match plain(new_size, align) {
                true => mi::mi_realloc(ptr, new_size),
                false => mi::mi_realloc_aligned(ptr, new_size, align),
            }
        }
        .cast()
    }
}

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
pub(crate) fn start_upkeep() {
    let upkeep = move || loop {
        std::thread::sleep(PURGE_EVERY);
        // SAFETY: mi_collect takes no pointer and may be called from any
        // thread at any time; `false` purges only what is due.
        unsafe { mi::mi_collect(false) };
    };
    if let Err(e) = std::thread::Builder::new()
        .name("mimalloc-upkeep".into())
        .spawn(upkeep)
    {
        tracing::warn!(error = %e, "cannot start the allocator's upkeep thread; freed memory is returned only under load");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The block mimalloc gave `p`, in bytes.
    fn block(p: *mut u8) -> usize {
        // SAFETY: `p` is a live mimalloc allocation.
        unsafe { mi::mi_usable_size(p.cast::<c_void>()) }
    }

    /// A resident account's `Arc` (192 B) and its pack list (80 B) take
    /// their own size classes: the crate's allocator gave them 224 and 96
    /// (it fails this test, see the module's doc).
    #[test]
    fn an_account_and_its_pack_list_take_their_own_size_class() {
        // On a thread of its own: a new thread's heap has no page of any
        // class yet, the case the old path got wrong.
        std::thread::spawn(one_block_per_class).join().unwrap();
    }

    fn one_block_per_class() {
        for (size, want) in [(192, 192), (80, 80), (176, 192), (72, 80), (24, 32)] {
            let layout = Layout::from_size_align(size, 8).unwrap();
            // Many times over: the class has a page with free blocks after
            // the first, which the old path needed to get it right.
            let ptrs: Vec<*mut u8> = (0..1000)
                // SAFETY: a non-zero size.
                .map(|_| unsafe { MiMalloc.alloc(layout) })
                .collect();
            for &p in &ptrs {
                assert!(!p.is_null());
                assert_eq!(block(p), want, "{size} B in a {} B block", block(p));
                // SAFETY: allocated above with this layout.
                unsafe { MiMalloc.dealloc(p, layout) };
            }
        }
    }

    /// Every size and alignment gets memory aligned as asked, through
    /// `alloc`, `alloc_zeroed` (zeroed) and `realloc` (contents kept).
    #[test]
    fn every_request_is_aligned_as_asked() {
        let sizes = (1..=600).chain([1000, 4095, 4096, 10_000, 70_000, 1 << 20, 5 << 20]);
        for size in sizes {
            for align in [1, 2, 4, 8, 16, 32, 64, 128, 4096] {
                let layout = Layout::from_size_align(size, align).unwrap();
                // SAFETY: a non-zero size; each pointer is freed once with
                // the layout it was allocated with.
                unsafe {
                    let p = MiMalloc.alloc(layout);
                    assert!(
                        !p.is_null() && (p as usize).is_multiple_of(align),
                        "{size}/{align}"
                    );
                    assert!(block(p) >= size);
                    p.write_bytes(0xA5, size);
                    let grown = MiMalloc.realloc(p, layout, size * 2 + 8);
                    assert!(
                        (grown as usize).is_multiple_of(align),
                        "realloc {size}/{align}"
                    );
                    assert!(block(grown) >= size * 2 + 8);
                    assert!(std::slice::from_raw_parts(grown, size)
                        .iter()
                        .all(|&b| b == 0xA5));
                    let grown_layout = Layout::from_size_align(size * 2 + 8, align).unwrap();
                    MiMalloc.dealloc(grown, grown_layout);
                    let z = MiMalloc.alloc_zeroed(layout);
                    assert!((z as usize).is_multiple_of(align), "zeroed {size}/{align}");
                    assert!(std::slice::from_raw_parts(z, size).iter().all(|&b| b == 0));
                    MiMalloc.dealloc(z, layout);
                }
            }
        }
    }
}
