//! The pool as a heap's user sees it ([`Heap::pool`]): everything the pool offers for reading,
//! persisting and syncing, but stores only into blocks the heap handed out — never into the
//! pool header, the heap header, the lanes' logs, chunk heads or run bitmaps, whose protocol
//! a stray store would break. The crate's own structures keep the raw pool.

use std::path::Path;
use std::sync::atomic::Ordering;

use bytemuck::Pod;

use super::layout::chunk::Head;
use super::layout::CHUNK;
use super::{lock, Heap, HeapError, Result};
use crate::persist::Domain;
use crate::pool::{MappingKind, PPtr, Pool, PoolInfo, WriterGuard};

/// A heap's pool, writable only inside allocated (or reserved) blocks. Reads, flushes,
/// fences and syncs are the pool's own; see [`Pool`] for each.
///
/// ```
/// use nvhtm::{Heap, HeapError, PoolOptions, Volatile};
/// # fn main() -> Result<(), HeapError> {
/// let heap = Heap::create_in_memory(&PoolOptions::layout("doc").with_size(4 << 20), Volatile)?;
/// let block = heap.reserve(100)?;
/// heap.pool().write_bytes(block.offset(), b"into a block")?;
/// // The lanes' logs and the heap's metadata are out of reach.
/// let lanes = heap.pool().data_start() + 4096;
/// assert!(matches!(heap.pool().write_bytes(lanes, b"stray"), Err(HeapError::NotWritable { .. })));
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct HeapPool<'h, D: Domain> {
    heap: &'h Heap<D>,
}

impl<D: Domain> Clone for HeapPool<'_, D> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<D: Domain> Copy for HeapPool<'_, D> {}

impl<'h, D: Domain> HeapPool<'h, D> {
    pub(super) fn new(heap: &'h Heap<D>) -> HeapPool<'h, D> {
        HeapPool { heap }
    }

    fn pool(&self) -> &'h Pool<D> {
        &self.heap.pool
    }

    /// Stores `bytes` at `offset` (not yet durable), inside one block.
    pub fn write_bytes(&self, offset: u64, bytes: &[u8]) -> Result<()> {
        self.heap.check_writable(offset, bytes.len() as u64)?;
        Ok(self.pool().write_bytes(offset, bytes)?)
    }

    /// Stores a plain-data value at `offset` (not yet durable), inside one block.
    pub fn write<T: Pod>(&self, offset: u64, value: &T) -> Result<()> {
        self.write_bytes(offset, bytemuck::bytes_of(value))
    }

    /// Stores the object `ptr` points to (not yet durable), inside one block.
    pub fn set<T: Pod>(&self, ptr: PPtr<T>, value: &T) -> Result<()> {
        self.write(ptr.offset(), value)
    }

    /// Stores `bytes` so they are durable at the next fence without a flush, inside one block.
    #[track_caller]
    pub fn write_persistent(&self, offset: u64, bytes: &[u8]) -> Result<()> {
        self.heap.check_writable(offset, bytes.len() as u64)?;
        Ok(self.pool().write_persistent(offset, bytes)?)
    }

    /// Atomically stores the aligned word at `offset`, inside one block.
    pub fn store_u64(&self, offset: u64, value: u64, order: Ordering) -> Result<()> {
        self.heap.check_writable(offset, 8)?;
        Ok(self.pool().store_u64(offset, value, order)?)
    }

    /// Compare-and-exchange of the aligned word at `offset`, inside one block (see
    /// [`Pool::compare_exchange_u64`]).
    pub fn compare_exchange_u64(
        &self,
        offset: u64,
        current: u64,
        new: u64,
        order: Ordering,
    ) -> Result<std::result::Result<u64, u64>> {
        self.heap.check_writable(offset, 8)?;
        Ok(self.pool().compare_exchange_u64(offset, current, new, order)?)
    }

    /// Reads a plain-data value.
    pub fn read<T: Pod>(&self, offset: u64) -> Result<T> {
        Ok(self.pool().read(offset)?)
    }

    /// Reads the object `ptr` points to.
    pub fn get<T: Pod>(&self, ptr: PPtr<T>) -> Result<T> {
        Ok(self.pool().get(ptr)?)
    }

    /// Reads `buf.len()` bytes at `offset`.
    pub fn read_into(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        Ok(self.pool().read_into(offset, buf)?)
    }

    /// Whether the bytes at `offset` equal `expected`.
    pub fn bytes_eq(&self, offset: u64, expected: &[u8]) -> Result<bool> {
        Ok(self.pool().bytes_eq(offset, expected)?)
    }

    /// Atomically loads the aligned word at `offset`.
    pub fn load_u64(&self, offset: u64, order: Ordering) -> Result<u64> {
        Ok(self.pool().load_u64(offset, order)?)
    }

    /// Starts writing back `offset..offset + len`.
    #[track_caller]
    pub fn flush(&self, offset: u64, len: u64) -> Result<()> {
        Ok(self.pool().flush(offset, len)?)
    }

    /// Waits for this thread's write-backs.
    #[track_caller]
    pub fn fence(&self) -> Result<()> {
        Ok(self.pool().fence()?)
    }

    /// Makes `offset..offset + len` durable.
    #[track_caller]
    pub fn persist(&self, offset: u64, len: u64) -> Result<()> {
        Ok(self.pool().persist(offset, len)?)
    }

    /// Makes everything written so far durable (see [`Pool::sync`]).
    pub fn sync(&self) -> Result<()> {
        Ok(self.pool().sync()?)
    }

    /// Enters the pool as a writer (see [`Pool::enter_writer`]).
    pub fn enter_writer(&self) -> WriterGuard<'h> {
        self.pool().enter_writer()
    }

    /// Whether `offset..offset + len` lies inside the pool.
    pub fn contains(&self, offset: u64, len: u64) -> bool {
        self.pool().contains(offset, len)
    }

    /// The header and mapping facts.
    pub fn info(&self) -> PoolInfo {
        self.pool().info()
    }

    /// A copy of the pool's bytes.
    pub fn image(&self) -> Result<Vec<u8>> {
        Ok(self.pool().image()?)
    }

    /// The pool's size in bytes.
    pub fn size(&self) -> u64 {
        self.pool().size()
    }

    /// The first offset after the pool header.
    pub fn data_start(&self) -> u64 {
        self.pool().data_start()
    }

    /// The file the pool maps.
    pub fn path(&self) -> &'h Path {
        self.pool().path()
    }

    /// The persistence domain.
    pub fn domain(&self) -> &'h D {
        self.pool().domain()
    }

    /// What the mapping turned out to be.
    pub fn mapping(&self) -> MappingKind {
        self.pool().mapping()
    }

    /// Whether the pool is committed by failure-atomic msync.
    pub fn is_fams(&self) -> bool {
        self.pool().is_fams()
    }

    /// Whether the previous user shut the pool down cleanly.
    pub fn was_clean(&self) -> bool {
        self.pool().was_clean()
    }
}

impl<D: Domain> Heap<D> {
    /// Checks that `offset..offset + len` lies inside one allocated or reserved block.
    fn check_writable(&self, offset: u64, len: u64) -> Result<()> {
        let refuse = |why| Err(HeapError::NotWritable { offset, len, why });
        let end = match offset.checked_add(len) {
            Some(end) if offset >= self.header.chunks_offset && end <= self.pool.size() => end,
            _ => return refuse("outside the heap's chunks (pool header, heap header and lanes)"),
        };
        self.ensure_scanned()?;
        let chunk = ((offset - self.header.chunks_offset) / CHUNK) as u32;
        let start = self.chunk_offset(chunk);
        if let Some(run) = self.run(chunk) {
            let run = lock(&run);
            let (geo, within) = (run.geo, offset - start);
            if within < geo.data {
                return refuse("a run's head and bitmap");
            }
            let index = (within - geo.data) / geo.block;
            if index >= geo.blocks || end > start + geo.data + (index + 1) * geo.block {
                return refuse("not inside one block");
            }
            if run.taken[(index / 64) as usize] & (1 << (index % 64)) == 0 {
                return refuse("a free block");
            }
            return Ok(());
        }
        let chunks = lock(&self.chunks);
        let covering =
            chunks.mirror.range(..=chunk).next_back().filter(|(&first, head)| first + head.len() > chunk);
        let (first, n) = match covering {
            Some((&first, &Head::Large(n))) => (first, n),
            // A reserved large block is one free element on media whose chunks are missing from
            // the free extents until it is published.
            Some((&first, &Head::Free(n)))
                if chunks.free.range(..=first).next_back().is_none_or(|(&s, &l)| s + l <= first) =>
            {
                (first, n)
            }
            _ => return refuse("not an allocated block"),
        };
        if offset >= self.chunk_offset(first) + 64 && end <= self.chunk_offset(first + n) {
            Ok(())
        } else {
            refuse("a large block's head, or past its end")
        }
    }
}
