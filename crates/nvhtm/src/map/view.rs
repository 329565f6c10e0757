//! Reads inside one segment whose bounds were checked once: the hot paths read meta words,
//! fingerprints and slots through a [`SegView`] without a bounds check (or a `Result`) per word.

use std::marker::PhantomData;

use super::*;

/// Words in a segment.
const SEGMENT_WORDS: usize = (SEGMENT_SIZE / 8) as usize;

/// The words of one segment, checked once (inside the pool, aligned, the pool not poisoned when
/// the view was made), readable for as long as the pool is borrowed.
#[derive(Debug, Clone, Copy)]
pub(super) struct SegView<'a> {
    words: *const AtomicU64,
    /// The segment's offset.
    pub(super) at: u64,
    _pool: PhantomData<&'a ()>,
}

impl<'a> SegView<'a> {
    /// The segment at `at`. Fails if the segment does not lie in the pool, is misaligned, or the
    /// pool is poisoned: a lock-free reader makes its view after reading the segment's version,
    /// so it sees the poison of a writer that failed before releasing it.
    #[inline]
    pub(super) fn new<D: Domain>(pool: &'a Pool<D>, at: u64) -> Result<SegView<'a>> {
        let words = pool.checked_words(at, SEGMENT_SIZE)?;
        Ok(SegView { words, at, _pool: PhantomData })
    }

    /// Word `index` of the segment.
    #[inline]
    fn word(&self, index: usize, order: Ordering) -> u64 {
        assert!(index < SEGMENT_WORDS, "word {index} outside a segment");
        // SAFETY: `new` checked the SEGMENT_SIZE bytes at `at` are in the mapping and 8-aligned,
        // index < SEGMENT_WORDS stays inside them, and the mapping stays put while the pool lives
        // (the borrow 'a). Every access to pool words is atomic.
        unsafe { (*self.words.add(index)).load(order) }
    }

    /// The meta word of `bucket` (occupancy and reach), with acquire ordering.
    #[inline]
    pub(super) fn meta(&self, bucket: u64) -> u64 {
        self.word(((bucket_offset(0, bucket)) / 8) as usize, Ordering::Acquire)
    }

    /// The fingerprints of `bucket`, one byte per slot.
    #[inline]
    pub(super) fn fingerprints(&self, bucket: u64) -> [u8; 8] {
        self.word((bucket_offset(0, bucket) / 8 + 1) as usize, Ordering::Acquire).to_le_bytes()
    }

    /// The four words of a slot.
    #[inline]
    pub(super) fn slot(&self, bucket: u64, slot: u64) -> [u64; 4] {
        let first = (slot_offset(0, bucket, slot) / 8) as usize;
        // A slot past a bucket's seven would read the next bucket: refuse it like a word past
        // the segment.
        assert!(slot < SLOTS, "slot {slot}");
        std::array::from_fn(|i| self.word(first + i, Ordering::Relaxed))
    }

    /// Hints that `bucket`'s four lines will be read soon, so that their misses overlap.
    #[inline]
    pub(super) fn prefetch_bucket(&self, bucket: u64) {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
            let first = (bucket_offset(0, bucket) / 8) as usize;
            for line in 0..(BUCKET / 64) as usize {
                // A prefetch is a hint: it never faults and changes no memory, whatever the
                // address (wrapping_add: no pointer arithmetic is assumed in bounds).
                let at = self.words.wrapping_add(first + 8 * line);
                // SAFETY: `_mm_prefetch` only requires SSE, which every x86-64 CPU has.
                unsafe { _mm_prefetch::<_MM_HINT_T0>(at.cast::<i8>()) };
            }
        }
    }
}
