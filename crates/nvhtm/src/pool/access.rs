//! Reading and writing a pool's bytes: bounds-checked, refused once the pool is poisoned, and
//! every store through the pool's persistence domain.

use std::sync::atomic::{AtomicU64, Ordering};

use bytemuck::Pod;

use super::{PPtr, Pool, PoolError, Result, HEADER_SIZE};
use crate::persist::Domain;

impl<D: Domain> Pool<D> {
    fn range(&self, offset: u64, len: u64, start: u64) -> Result<*mut u8> {
        let size = self.region.len();
        match offset.checked_add(len) {
            Some(end) if offset >= start && end <= size => {
                // SAFETY: offset <= size, so the result stays inside the mapping.
                Ok(unsafe { self.region.base().add(offset as usize) })
            }
            _ => Err(PoolError::OutOfBounds { offset, len, start, size }),
        }
    }

    /// A pointer to `offset..offset + len` if it lies in user space (not the header).
    pub(super) fn user_range(&self, offset: u64, len: u64) -> Result<*mut u8> {
        self.range(offset, len, HEADER_SIZE)
    }

    fn word(&self, offset: u64, start: u64) -> Result<*const AtomicU64> {
        if offset % 8 != 0 {
            return Err(PoolError::Misaligned { offset });
        }
        Ok(self.range(offset, 8, start)?.cast())
    }

    /// Reads a plain-data value (anywhere in the pool, the header included).
    pub fn read<T: Pod>(&self, offset: u64) -> Result<T> {
        self.check_poison()?;
        let ptr = self.range(offset, std::mem::size_of::<T>() as u64, 0)?;
        // SAFETY: the range is inside the mapping; T is Pod, so any bytes are a valid T.
        Ok(unsafe { std::ptr::read_unaligned(ptr.cast::<T>()) })
    }

    /// Whether `offset..offset + len` lies inside the pool.
    pub fn contains(&self, offset: u64, len: u64) -> bool {
        self.range(offset, len, 0).is_ok()
    }

    /// Whether the `expected.len()` bytes at `offset` equal `expected` (compared in 64-byte
    /// pieces: nothing is allocated).
    pub fn bytes_eq(&self, offset: u64, expected: &[u8]) -> Result<bool> {
        self.check_poison()?;
        let ptr = self.range(offset, expected.len() as u64, 0)?;
        let mut piece = [0u8; 64];
        for (i, want) in expected.chunks(64).enumerate() {
            // SAFETY: the range is inside the mapping and covers every piece; `piece` is a
            // distinct local buffer at least as long as `want`.
            unsafe { std::ptr::copy_nonoverlapping(ptr.add(i * 64), piece.as_mut_ptr(), want.len()) };
            if piece[..want.len()] != *want {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Hints that `offset..offset + len` will be read soon: one prefetch per cache line, so
    /// that several lines' misses overlap. Changes nothing; an out-of-range hint is ignored.
    pub fn prefetch(&self, offset: u64, len: u64) {
        #[cfg(target_arch = "x86_64")]
        if let Ok(ptr) = self.range(offset, len, 0) {
            use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
            for line in crate::persist::lines(ptr, len as usize) {
                // SAFETY: a prefetch is a hint: it never faults and changes no memory (SSE is
                // part of every x86-64 CPU).
                unsafe { _mm_prefetch::<_MM_HINT_T0>(line as *const i8) };
            }
        }
    }

    /// Loads `N` consecutive aligned words at `offset` (relaxed, one bounds check).
    pub fn load_words<const N: usize>(&self, offset: u64) -> Result<[u64; N]> {
        self.check_poison()?;
        let first = self.word(offset, 0)?;
        self.range(offset, 8 * N as u64, 0)?;
        // SAFETY: the N words are aligned (the first is) and inside the mapping (checked).
        Ok(std::array::from_fn(|i| unsafe { (*first.add(i)).load(Ordering::Relaxed) }))
    }

    /// A pointer to the aligned words of `offset..offset + len`, checked once: inside the pool,
    /// 8-byte aligned, the pool not poisoned. For a structure that reads many words of one block
    /// (the map's segments) without a check per word. The mapping neither moves nor shrinks
    /// while the pool lives, so the words may be read through the pointer (atomically) for as
    /// long as the pool is borrowed; stores must still go through the pool's domain.
    pub(crate) fn checked_words(&self, offset: u64, len: u64) -> Result<*const AtomicU64> {
        self.check_poison()?;
        let first = self.word(offset, 0)?;
        self.range(offset, len, 0)?;
        Ok(first)
    }

    /// Reads `buf.len()` bytes at `offset`.
    pub fn read_into(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.check_poison()?;
        let ptr = self.range(offset, buf.len() as u64, 0)?;
        // SAFETY: the range is inside the mapping and `buf` is a distinct live slice.
        unsafe { std::ptr::copy_nonoverlapping(ptr, buf.as_mut_ptr(), buf.len()) };
        Ok(())
    }

    /// Reads the object `ptr` points to.
    pub fn get<T: Pod>(&self, ptr: PPtr<T>) -> Result<T> {
        self.read(ptr.offset())
    }

    /// Stores `bytes` at `offset` with ordinary stores (not yet durable).
    pub fn write_bytes(&self, offset: u64, bytes: &[u8]) -> Result<()> {
        self.check_poison()?;
        let ptr = self.user_range(offset, bytes.len() as u64)?;
        self.note_written(offset, bytes.len() as u64);
        // SAFETY: the range is in user space of the mapping.
        unsafe { self.domain.write(ptr, bytes) };
        Ok(())
    }

    /// Stores a plain-data value at `offset` (not yet durable).
    pub fn write<T: Pod>(&self, offset: u64, value: &T) -> Result<()> {
        self.write_bytes(offset, bytemuck::bytes_of(value))
    }

    /// Stores the object `ptr` points to (not yet durable).
    pub fn set<T: Pod>(&self, ptr: PPtr<T>, value: &T) -> Result<()> {
        self.write(ptr.offset(), value)
    }

    /// Stores `bytes` so they are durable at the next [`fence`](Pool::fence) without a flush.
    #[track_caller]
    pub fn write_persistent(&self, offset: u64, bytes: &[u8]) -> Result<()> {
        self.check_poison()?;
        let ptr = self.user_range(offset, bytes.len() as u64)?;
        self.note_written(offset, bytes.len() as u64);
        // SAFETY: the range is in user space of the mapping.
        unsafe { self.domain.write_persistent(ptr, bytes) };
        Ok(())
    }

    /// Atomically loads the aligned 8-byte word at `offset`.
    pub fn load_u64(&self, offset: u64, order: Ordering) -> Result<u64> {
        self.check_poison()?;
        let word = self.word(offset, 0)?;
        // SAFETY: the word is aligned and inside the mapping.
        Ok(unsafe { (*word).load(order) })
    }

    /// Atomically stores the aligned 8-byte word at `offset`: the failure-atomic unit.
    pub fn store_u64(&self, offset: u64, value: u64, order: Ordering) -> Result<()> {
        self.check_poison()?;
        let word = self.word(offset, HEADER_SIZE)?;
        self.note_written(offset, 8);
        // SAFETY: the word is aligned and in user space.
        unsafe { self.domain.store_u64(word, value, order) };
        Ok(())
    }

    /// Atomic compare-and-exchange of the word at `offset`; the inner result is the previous
    /// value, `Ok` when it was `current` and is now `new`.
    pub fn compare_exchange_u64(
        &self,
        offset: u64,
        current: u64,
        new: u64,
        order: Ordering,
    ) -> Result<Result<u64, u64>> {
        self.check_poison()?;
        let word = self.word(offset, HEADER_SIZE)?;
        self.note_written(offset, 8);
        // SAFETY: the word is aligned and in user space.
        Ok(unsafe { self.domain.compare_exchange_u64(word, current, new, order) })
    }

    /// Starts writing back `offset..offset + len`.
    #[track_caller]
    pub fn flush(&self, offset: u64, len: u64) -> Result<()> {
        self.check_poison()?;
        let ptr = self.range(offset, len, 0)?;
        // SAFETY: the range is inside the mapping.
        unsafe { self.domain.flush(ptr, len as usize) };
        Ok(())
    }

    /// Waits for this thread's write-backs; a failure poisons the pool.
    #[track_caller]
    pub fn fence(&self) -> Result<()> {
        self.check_poison()?;
        let fenced = self.domain.fence();
        self.note_persist(fenced)
    }

    /// Makes `offset..offset + len` durable (flush, then fence).
    #[track_caller]
    pub fn persist(&self, offset: u64, len: u64) -> Result<()> {
        self.check_poison()?;
        let ptr = self.range(offset, len, 0)?;
        // SAFETY: the range is inside the mapping.
        let persisted = unsafe { self.domain.persist(ptr, len as usize) };
        self.note_persist(persisted)
    }

    /// Makes the object `ptr` points to durable.
    #[track_caller]
    pub fn persist_ptr<T>(&self, ptr: PPtr<T>) -> Result<()> {
        self.persist(ptr.offset(), std::mem::size_of::<T>() as u64)
    }
}
