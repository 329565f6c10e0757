//! The NVM-friendly hash map with failure-atomic operations, in strict mode: every operation
//! that returned is durable (durable linearizability).
//!
//! - **Layout** (`layout.rs`): extendible hashing — a directory of segments, each one chunk of
//!   255 buckets of 256 bytes (4 cache lines, 7 slots of 32 bytes, one-byte fingerprints, a meta
//!   word holding the occupancy bits and a reach). A key lives in its home bucket or one of the
//!   15 after it, no farther than the home bucket's reach, so most lookups read one bucket.
//!   Keys up to 16 bytes with values up to 8 bytes are stored inline; others out of place in a
//!   heap record.
//! - **Commit**: an insert writes its slot and fingerprint, persists them (fence 1), then sets
//!   its occupancy bit with one aligned 8-byte store and persists it (fence 2). The fingerprint
//!   shares the meta word's cache line and is stored before it, so it is durable whenever the
//!   bit is. An update of an inline value of the same length is one 8-byte store; other
//!   updates write a new slot and flip both bits in one store when they share a bucket, or go
//!   through the heap's redo log. Out-of-place records are allocated and linked in one heap
//!   commit, and freed in one with their unlinking.
//! - **DRAM summary**: per segment, per home bucket, 64 bits summarising the keys homed there,
//!   built lazily from media and kept exact by writers: most misses never touch persistent
//!   memory, and inserts of new keys skip their probe.
//! - **Directory mirror** (`dram.rs`, `view.rs`): the directory and the segment headers are
//!   mirrored in DRAM, filled lazily from media (each entry checked when read) and kept by
//!   splits; a lookup goes hash → mirror entry → segment version → home bucket → slot →
//!   version, reading the segment's words through a view whose bounds were checked once. The
//!   persistent directory stays the truth; opening builds nothing.
//! - **Concurrency**: a writer locks its segment (a DRAM mutex) and bumps the segment's version
//!   to odd for the duration, *until its commit is persistent*; readers take no lock, read
//!   optimistically and retry if the version changed — so a reader never returns data that is
//!   not yet durable. A commit that fails poisons the pool before its writer releases the
//!   version, and a poisoned pool refuses reads: a failed commit is never read either. Locks
//!   and versions live in DRAM: recovery has none to reset.
//! - **Resizing**: a full window splits its segment: the keys whose next hash bit is 1 are
//!   copied into a new segment, and the directory entries (doubling the directory when needed),
//!   both segments' depths and the new segment's allocation are committed in one heap
//!   transaction. The old segment's copies become stale (it no longer owns their hashes) and
//!   are cleared afterwards; a crash before that only leaves stale slots, which readers ignore
//!   and an insert whose window is full clears (durably) before reusing.
//! - **Recovery**: nothing to do beyond the heap's lanes: opening costs the same for 10 keys and
//!   10 million.

mod dram;
mod iter;
mod layout;
mod read;
mod split;
#[cfg(test)]
mod tests;
mod typed;
mod view;
mod write;

pub use iter::MapStats;
pub use layout::{INLINE_KEY, INLINE_VALUE, MAP_MAGIC};
pub use typed::TypedMap;

use dram::*;
use read::*;
use split::*;
use view::*;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, OnceLock};

use crate::heap::{Heap, HeapError};
use crate::persist::Domain;
use crate::pool::{PPtr, Pool, PoolError};
use layout::*;

/// A fresh secret hash seed from the OS's randomness (a clock-seeded generator if it has none),
/// never 0 (the unkeyed hash).
pub(crate) fn secret_seed() -> u64 {
    let mut bytes = [0u8; 8];
    if rustix::rand::getrandom(&mut bytes, rustix::rand::GetRandomFlags::empty()).is_err() {
        bytes = fastrand::u64(..).to_le_bytes();
    }
    u64::from_le_bytes(bytes).max(1)
}

/// Deepest directory (2^40 segments).
const MAX_DEPTH: u64 = 40;

/// Longest key.
pub const MAX_KEY: usize = 64 * 1024;
/// Longest value.
pub const MAX_VALUE: usize = 512 * 1024 * 1024;

/// Errors of the map layer.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MapError {
    /// The heap (and below it the pool) failed.
    #[error(transparent)]
    Heap(#[from] HeapError),
    /// The hybrid map's log failed.
    #[error(transparent)]
    Log(#[from] crate::log::LogError),
    /// A key longer than [`MAX_KEY`].
    #[error("key of {len} bytes is longer than the {max}-byte limit")]
    KeyTooLarge {
        /// Its length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// A value longer than [`MAX_VALUE`].
    #[error("value of {len} bytes is longer than the {max}-byte limit")]
    ValueTooLarge {
        /// Its length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The heap's root is not a map.
    #[error("the pool holds no nvhtm map: {0}")]
    NotAMap(String),
    /// The map's structure is inconsistent.
    #[error("corrupt map: {0}")]
    Corrupt(String),
    /// A segment must split and cannot: the directory is at its deepest, or the segment
    /// table is full.
    #[error("the map cannot grow further: {0}")]
    Limit(String),
    /// A transaction read a bucket that another writer changed since its first read of it:
    /// [`PeriodicMap::transaction`](crate::periodic::PeriodicMap::transaction) runs the body
    /// again when the body returns it.
    #[error("a transaction's read conflicted with another writer")]
    Conflict,
    /// A [`TypedMap`] found a stored key or value whose length is not its type's size (the
    /// map was written with other types, or through the byte map).
    #[error("a stored {what} is {found} bytes, but the typed map reads {expected}-byte {what}s")]
    WrongLength {
        /// `"key"` or `"value"`.
        what: &'static str,
        /// The size of the type the typed map reads it as.
        expected: usize,
        /// The stored length.
        found: usize,
    },
}

impl From<PoolError> for MapError {
    fn from(e: PoolError) -> MapError {
        MapError::Heap(HeapError::Pool(e))
    }
}

/// The map layer's result.
pub type Result<T, E = MapError> = std::result::Result<T, E>;

/// The strict persistent hash map over a heap (its root object).
pub struct StrictMap<D: Domain> {
    heap: Heap<D>,
    root: u64,
    /// The secret seed of the keyed hash (read from the root at open).
    seed: u64,
    segments: SegTable,
    /// The directory in DRAM.
    mirror: Mirror,
    /// Serialises splits (and `shape`, which must not see one), and counts them.
    resize: Mutex<Splits>,
}

impl<D: Domain> std::fmt::Debug for StrictMap<D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StrictMap").field("heap", &self.heap).finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn check_sizes(key: &[u8], value: Option<&[u8]>) -> Result<()> {
    if key.len() > MAX_KEY {
        return Err(MapError::KeyTooLarge { len: key.len(), max: MAX_KEY });
    }
    if let Some(value) = value {
        if value.len() > MAX_VALUE {
            return Err(MapError::ValueTooLarge { len: value.len(), max: MAX_VALUE });
        }
    }
    Ok(())
}

/// Whether `e` is the pool refusing access after a failed persist: final, no retry can help.
fn is_poisoned(e: &MapError) -> bool {
    matches!(e, MapError::Heap(HeapError::Pool(PoolError::Poisoned(_))))
}

impl<D: Domain> StrictMap<D> {
    /// Opens the map that is the heap's root object, creating an empty one in a new heap. A new
    /// map's hash is keyed by a secret seed from the OS's randomness, stored in its root.
    pub fn open(heap: Heap<D>) -> Result<StrictMap<D>> {
        StrictMap::open_keyed(heap, None)
    }

    /// [`open`](StrictMap::open), but a map created now gets `seed` as its hash seed instead of
    /// a secret one (0: the unkeyed hash): the same keys then land in the same buckets in every
    /// run — for reproducible crash suites and benchmarks, never for maps that hold keys an
    /// adversary may choose. An existing map keeps its own seed.
    ///
    /// ```
    /// use nvhtm::{Heap, PoolOptions, StrictMap, Volatile};
    /// let heap = Heap::create_in_memory(&PoolOptions::layout("doc").with_size(4 << 20), Volatile)?;
    /// let map = StrictMap::open_with_seed(heap, 42)?;
    /// map.insert(b"key", b"value")?;
    /// assert_eq!(map.get(b"key")?, Some(b"value".to_vec()));
    /// # Ok::<(), nvhtm::MapError>(())
    /// ```
    pub fn open_with_seed(heap: Heap<D>, seed: u64) -> Result<StrictMap<D>> {
        StrictMap::open_keyed(heap, Some(seed))
    }

    fn open_keyed(heap: Heap<D>, seed: Option<u64>) -> Result<StrictMap<D>> {
        let root = heap.root::<[u64; 8]>().map_err(|e| match e {
            HeapError::RootSize { .. } => MapError::NotAMap(e.to_string()),
            e => MapError::Heap(e),
        })?;
        let mut map = StrictMap {
            heap,
            root: root.offset(),
            seed: 0,
            segments: SegTable::new(),
            mirror: Mirror::new(),
            resize: Mutex::default(),
        };
        match map.load(map.root + ROOT_MAGIC)? {
            MAP_MAGIC => {}
            0 => map.format(seed.unwrap_or_else(secret_seed))?,
            other => return Err(MapError::NotAMap(format!("root magic {other:#018x}"))),
        }
        map.seed = map.load(map.root + ROOT_SEED)?;
        Ok(map)
    }

    /// The keyed hash of `key` in this map.
    pub(crate) fn hash(&self, key: &[u8]) -> Hash {
        Hash::of(self.seed, key)
    }

    /// The heap the map lives in.
    pub fn heap(&self) -> &Heap<D> {
        &self.heap
    }

    /// Closes the map, its heap and pool (a clean shutdown).
    pub fn close(self) -> Result<()> {
        Ok(self.heap.close()?)
    }

    pub(super) fn load(&self, offset: u64) -> Result<u64> {
        Ok(self.heap.raw_pool().load_u64(offset, Ordering::Acquire)?)
    }

    /// An empty map: a directory of depth 0 and one segment, committed with the root.
    fn format(&self, seed: u64) -> Result<()> {
        let root = self.root;
        self.heap.transaction(|tx| {
            let segment = tx.alloc_uninit(SEGMENT_SIZE)?;
            tx.write(PPtr::<[u64; 4]>::new(segment), &[SEG_MAGIC, 0, 0, 0])?;
            for bucket in 0..BUCKETS {
                tx.write(PPtr::<[u64; 2]>::new(bucket_offset(segment, bucket)), &[0, 0])?;
            }
            let dir = tx.alloc_bytes(DIR_HEADER + 8)?;
            tx.write(PPtr::<[u64; 3]>::new(dir), &[DIR_MAGIC, 0, segment])?;
            // A secret per map, as Redis keys its dictionaries: keys crafted to share hash
            // prefixes (forcing splits toward the directory's depth limit) cannot be computed
            // without it.
            tx.write(PPtr::<[u64; 4]>::new(root), &[MAP_MAGIC, dir, 1, seed])?;
            Ok::<_, HeapError>(())
        })?;
        Ok(())
    }
}
