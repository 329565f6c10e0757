//! A counting wrapper around the system allocator, so that `bench map` can show that no engine
//! allocates on the Rust heap inside a timed loop.
//!
//! Counting is off until a benchmark turns it on ([`counting`]), and then counts only on the
//! threads that run timed loops ([`count_this_thread`]): a map's background thread (the
//! periodic map's persister) allocating while a loop runs is not the loop's allocation. While
//! off, each allocation costs one relaxed load more than the system allocator's own work.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// The system allocator, counting allocations (`alloc`, `alloc_zeroed`, `realloc`) and frees
/// while [`counting`] is on.
#[derive(Debug)]
pub struct Counting;

static ON: AtomicBool = AtomicBool::new(false);
static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);
static FREES: AtomicU64 = AtomicU64::new(0);

#[global_allocator]
static GLOBAL: Counting = Counting;

thread_local! {
    /// Whether this thread's allocations are counted (const-initialised, no destructor: safe
    /// to read from inside the allocator).
    static THIS_THREAD: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

fn note(counter: &AtomicU64) {
    if ON.load(Ordering::Relaxed) && THIS_THREAD.try_with(|c| c.get()).unwrap_or(false) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// Counts (or stops counting) the calling thread's allocations while [`counting`] is on.
pub fn count_this_thread(on: bool) {
    THIS_THREAD.with(|c| c.set(on));
}

// SAFETY: every method forwards to `System` with the caller's arguments unchanged, so `System`'s
// guarantees (alignment, size, ownership of the blocks) are ours; counting touches only atomics
// and never allocates.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(&ALLOCATIONS);
        // SAFETY: the caller upholds `GlobalAlloc::alloc`'s contract (non-zero size), which is
        // `System.alloc`'s.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note(&ALLOCATIONS);
        // SAFETY: as for `alloc`: the caller's contract is `System.alloc_zeroed`'s.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note(&ALLOCATIONS);
        // SAFETY: `ptr` was allocated by this allocator, i.e. by `System`, with `layout`; the
        // caller guarantees `new_size` is valid, as `System.realloc` requires.
        unsafe { System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        note(&FREES);
        // SAFETY: `ptr` was allocated by this allocator, i.e. by `System`, with `layout`.
        unsafe { System.dealloc(ptr, layout) }
    }
}

/// Turns counting on or off (for every thread).
pub fn counting(on: bool) {
    ON.store(on, Ordering::SeqCst);
}

/// Allocations and frees counted so far, over every counted thread.
pub fn counts() -> (u64, u64) {
    (ALLOCATIONS.load(Ordering::SeqCst), FREES.load(Ordering::SeqCst))
}

/// Held by every test that switches counting on: the switch is global, and a test switching it
/// off while another counts made that one see no allocation.
#[cfg(test)]
pub static TEST_SWITCH: std::sync::Mutex<()> = std::sync::Mutex::new(());

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_an_allocation_only_while_on_and_only_on_counted_threads() {
        let _alone = TEST_SWITCH.lock().unwrap_or_else(|e| e.into_inner());
        counting(true);
        count_this_thread(true);
        let (a0, f0) = counts();
        drop(std::hint::black_box(vec![1u8; 100]));
        let (a1, f1) = counts();
        count_this_thread(false);
        assert!(a1 > a0 && f1 > f0);
        // Only threads under TEST_SWITCH are ever counted: an uncounted thread adds nothing.
        std::thread::spawn(|| drop(std::hint::black_box(vec![1u8; 100]))).join().unwrap();
        drop(std::hint::black_box(vec![1u8; 100]));
        assert_eq!(counts(), (a1, f1));
        counting(false);
    }
}
