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

mod layout;
#[cfg(test)]
mod tests;
mod typed;

pub use layout::{INLINE_KEY, INLINE_VALUE};
pub use typed::TypedMap;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, OnceLock};

use crate::heap::{Heap, HeapError};
use crate::persist::Domain;
use crate::pool::{PPtr, Pool, PoolError};
use layout::*;

/// A fresh secret hash seed from the OS's randomness (a clock-seeded generator if it has none),
/// never 0 (the unkeyed hash).
fn secret_seed() -> u64 {
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

/// DRAM lock, version and summary of one segment.
#[derive(Debug, Default)]
struct SegLocks {
    lock: Mutex<()>,
    version: AtomicU64,
    /// Built from media on first use under the lock, then kept by writers.
    summary: OnceLock<Summary>,
}

/// What DRAM knows of a segment's keys.
#[derive(Debug)]
struct Summary {
    /// Per home bucket, a 64-bit summary of the keys homed there (one bit per value of their
    /// low 6 hash bits), kept exact (a write that fails after setting a bit leaves it, which only
    /// costs a probe): set before a key is committed, recomputed when one is
    /// removed or moved by a split. A lookup whose bit is clear is a miss without touching
    /// persistent memory.
    homes: Box<[AtomicU64]>,
    /// Live keys (changed under the segment's lock).
    live: AtomicU64,
}

impl Summary {
    fn new(homes: Vec<u64>, live: u64) -> Summary {
        Summary { homes: homes.into_iter().map(AtomicU64::new).collect(), live: AtomicU64::new(live) }
    }
}

/// A segment whose lock this thread holds, with its DRAM state.
struct Held<'a> {
    segment: Segment,
    summary: &'a Summary,
    _lock: MutexGuard<'a, ()>,
}

/// Segment locks by segment id, created on first use; lock-free to look up.
struct SegTable {
    pages: Vec<OnceLock<Box<[SegLocks]>>>,
}

const LOCK_PAGE: u64 = 1024;

impl SegTable {
    fn new() -> SegTable {
        SegTable { pages: (0..4096).map(|_| OnceLock::new()).collect() }
    }

    fn get(&self, id: u64) -> Option<&SegLocks> {
        let page = self.pages.get((id / LOCK_PAGE) as usize)?;
        let page = page.get_or_init(|| (0..LOCK_PAGE).map(|_| SegLocks::default()).collect());
        page.get((id % LOCK_PAGE) as usize)
    }
}

/// Makes a segment's version even again when a writer is done, even on an error.
struct Writing<'a>(&'a AtomicU64);

impl<'a> Writing<'a> {
    fn start(version: &'a AtomicU64) -> Writing<'a> {
        version.fetch_add(1, Ordering::AcqRel);
        Writing(version)
    }
}

impl Drop for Writing<'_> {
    fn drop(&mut self) {
        self.0.fetch_add(1, Ordering::Release);
    }
}

/// A segment as read from media.
#[derive(Debug, Clone, Copy)]
struct Segment {
    at: u64,
    depth: u64,
    pattern: u64,
    id: u64,
}

impl Segment {
    fn owns(&self, hash: Hash) -> bool {
        hash.prefix(self.depth) == self.pattern
    }
}

/// Where a key was found.
#[derive(Debug, Clone, Copy)]
struct Found {
    bucket: u64,
    slot: u64,
    info: u64,
    /// For an out-of-place record: its offset.
    record: u64,
}

/// Longest value a lookup copies out on the stack rather than into an allocation.
const SHORT_VALUE: usize = 128;

/// Where a lookup copies the value it finds (before validating it): short values stay in this
/// buffer, which the caller owns and nothing moves, so a lookup allocates nothing for them.
struct ValueBuf {
    short: [u8; SHORT_VALUE],
    len: usize,
    long: Vec<u8>,
}

impl ValueBuf {
    fn new() -> ValueBuf {
        ValueBuf { short: [0; SHORT_VALUE], len: 0, long: Vec::new() }
    }

    fn set_inline(&mut self, word: u64, len: usize) {
        self.short[..8].copy_from_slice(&word.to_le_bytes());
        self.len = len.min(INLINE_VALUE);
    }

    /// Copies the `len` bytes at `offset`.
    fn read<D: Domain>(&mut self, pool: &Pool<D>, offset: u64, len: usize) -> Result<()> {
        if len > MAX_VALUE || !pool.contains(offset, len as u64) {
            return Err(MapError::Corrupt(format!("a record at {offset:#x} claims a {len}-byte value")));
        }
        self.len = len;
        if len <= SHORT_VALUE {
            pool.read_into(offset, &mut self.short[..len])?;
        } else {
            self.long.resize(len, 0);
            pool.read_into(offset, &mut self.long)?;
        }
        Ok(())
    }

    fn as_slice(&self) -> &[u8] {
        if self.len <= SHORT_VALUE {
            &self.short[..self.len]
        } else {
            &self.long
        }
    }
}

/// The heap changes committed with a slot: a record to allocate, one to free.
struct RecordChange {
    adopt: Option<crate::heap::Reservation>,
    free: Option<u64>,
}

/// A key's slot to write into the free slot `to`, releasing `from` in the same commit.
#[derive(Debug, Clone, Copy)]
struct Placement {
    hash: Hash,
    to: (u64, u64),
    words: [u64; 4],
    from: Option<(u64, u64)>,
}

/// At most `N` pairs of words, on the stack (the write paths allocate nothing on the Rust heap).
#[derive(Debug, Clone, Copy)]
struct Pairs<const N: usize> {
    items: [(u64, u64); N],
    len: usize,
}

impl<const N: usize> Pairs<N> {
    fn new() -> Pairs<N> {
        Pairs { items: [(0, 0); N], len: 0 }
    }

    /// Appends a pair; the callers never hold more than `N` (a bound of their protocol, not of
    /// the data they read).
    fn push(&mut self, pair: (u64, u64)) {
        assert!(self.len < N, "more than {N} pairs");
        self.items[self.len] = pair;
        self.len += 1;
    }

    fn as_slice(&self) -> &[(u64, u64)] {
        &self.items[..self.len]
    }

    fn as_mut_slice(&mut self) -> &mut [(u64, u64)] {
        &mut self.items[..self.len]
    }
}

/// A slot written and ready to commit.
struct Prepared {
    /// Ranges to make durable before the commit: the slot, a raised reach, and (for a heap
    /// commit) the fingerprint.
    before_commit: Pairs<3>,
    /// Meta words to store at the commit, by bucket: the new slot's and the released one's.
    metas: Pairs<2>,
}

/// How a write ended: done, or the window is full and the segment must split first.
enum Outcome<R> {
    Done(R),
    Split,
}

impl<R> Outcome<R> {
    /// `Done(result)` if `place` placed the key, else `Split`.
    fn placed(placed: bool, result: R) -> Outcome<R> {
        if placed {
            Outcome::Done(result)
        } else {
            Outcome::Split
        }
    }
}

/// Counts of the map's shape.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct MapStats {
    /// Live entries.
    pub entries: u64,
    /// Segments.
    pub segments: u64,
    /// Directory depth.
    pub global_depth: u64,
    /// Entries over slots.
    pub load_factor: f64,
    /// Segments split since the map was opened.
    pub splits: u64,
    /// Mean load factor of those segments when they split (0 when none did).
    pub mean_load_at_split: f64,
    /// Lowest load factor of one of those segments when it split (0 when none did).
    pub min_load_at_split: f64,
}

/// The loads at which segments split since the map was opened.
#[derive(Debug, Default)]
struct Splits {
    count: u64,
    load_sum: f64,
    load_min: f64,
}

/// The strict persistent hash map over a heap (its root object).
pub struct StrictMap<D: Domain> {
    heap: Heap<D>,
    root: u64,
    /// The secret seed of the keyed hash (read from the root at open).
    seed: u64,
    segments: SegTable,
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

fn is_inline(key: &[u8], value: &[u8]) -> bool {
    key.len() <= INLINE_KEY && value.len() <= INLINE_VALUE
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

    fn load(&self, offset: u64) -> Result<u64> {
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

    /// Reads a segment header.
    fn segment(&self, at: u64) -> Result<Segment> {
        let [magic, depth, pattern, id]: [u64; 4] = self.heap.raw_pool().read(at)?;
        if magic != SEG_MAGIC || depth > MAX_DEPTH {
            return Err(MapError::Corrupt(format!("no segment at {at:#x}")));
        }
        Ok(Segment { at, depth, pattern, id })
    }

    /// The segment the directory names for `hash` now (may be stale by the time it is used).
    /// `None` when a split swapped the directory while it was being read: read it again.
    fn locate(&self, hash: Hash) -> Result<Option<Segment>> {
        let dir = self.load(self.root + ROOT_DIR)?;
        let [magic, depth]: [u64; 2] = self.heap.raw_pool().read(dir)?;
        if magic != DIR_MAGIC || depth > MAX_DEPTH {
            return Err(MapError::Corrupt(format!("no directory at {dir:#x}")));
        }
        let at = self.load(dir + DIR_HEADER + 8 * hash.prefix(depth))?;
        let segment = self.segment(at)?;
        if segment.depth > depth {
            // A split that doubles the directory swaps the new one in before it deepens the
            // segment: seeing the deeper segment through the old directory means the swap
            // happened after the directory was read.
            if self.load(self.root + ROOT_DIR)? != dir {
                return Ok(None);
            }
            return Err(MapError::Corrupt(format!("segment {at:#x} is deeper than the directory")));
        }
        Ok(Some(segment))
    }

    /// The directory's depth, refused when it cannot be one.
    fn dir_depth(&self, dir: u64) -> Result<u64> {
        let depth = self.load(dir + 8)?;
        if depth > MAX_DEPTH {
            return Err(MapError::Corrupt(format!("directory depth {depth}")));
        }
        Ok(depth)
    }

    /// A segment named by directory entry `j` of a directory of depth `global`, checked.
    fn entry_segment(&self, dir: u64, global: u64, j: u64) -> Result<Segment> {
        let segment = self.segment(self.load(dir + DIR_HEADER + 8 * j)?)?;
        if segment.depth > global {
            return Err(MapError::Corrupt(format!("segment {:#x} is deeper than the directory", segment.at)));
        }
        Ok(segment)
    }

    fn locks(&self, segment: &Segment) -> Result<&SegLocks> {
        self.segments.get(segment.id).ok_or_else(|| MapError::Corrupt(format!("segment id {}", segment.id)))
    }

    /// The segment's summary, built from media if this is its first use. The caller holds the
    /// segment's lock.
    fn summary_locked<'a>(&self, segment: &Segment, locks: &'a SegLocks) -> Result<&'a Summary> {
        if let Some(summary) = locks.summary.get() {
            return Ok(summary);
        }
        let mut homes = vec![0u64; BUCKETS as usize];
        let mut live = 0;
        for bucket in 0..BUCKETS {
            self.for_owned(segment, bucket, |_, hash| {
                homes[hash.home() as usize] |= hash.summary_bit();
                live += 1;
                Ok(())
            })?;
        }
        Ok(locks.summary.get_or_init(|| Summary::new(homes, live)))
    }

    /// Recomputes the summary of the keys homed at `home` from media, after one of them left.
    fn resummarise(&self, held: &Held, home: u64) -> Result<()> {
        let reach = reach(self.load(bucket_offset(held.segment.at, home))?);
        let mut bits = 0;
        for bucket in (0..=reach).map(|i| (home + i) % BUCKETS) {
            self.for_owned(&held.segment, bucket, |_, hash| {
                if hash.home() == home {
                    bits |= hash.summary_bit();
                }
                Ok(())
            })?;
        }
        held.summary.homes[home as usize].store(bits, Ordering::Release);
        Ok(())
    }

    /// Calls `visit(slot, hash)` for every occupied slot of `bucket` holding a key the segment
    /// owns (not a stale copy).
    fn for_owned(
        &self,
        segment: &Segment,
        bucket: u64,
        mut visit: impl FnMut(u64, Hash) -> Result<()>,
    ) -> Result<()> {
        for slot in occupied(self.load(bucket_offset(segment.at, bucket))?) {
            let hash = self.slot_hash(segment.at, bucket, slot)?;
            if segment.owns(hash) {
                visit(slot, hash)?;
            }
        }
        Ok(())
    }

    /// Looks `key` up in the segment a writer holds: a key its summary rules out is not probed.
    /// Copies the value into `value` if given.
    fn find_held(
        &self,
        held: &Held,
        hash: Hash,
        key: &[u8],
        value: Option<&mut ValueBuf>,
    ) -> Result<Option<Found>> {
        if held.summary.homes[hash.home() as usize].load(Ordering::Relaxed) & hash.summary_bit() == 0 {
            return Ok(None);
        }
        self.find(held.segment.at, hash, key, &|| true, value)
    }

    /// Looks `key` up in `segment` (its owner), returning where it is and copying its value into
    /// `value` if given. `stable` says whether no writer has touched the segment since the caller
    /// began (always, under its lock).
    fn find(
        &self,
        segment: u64,
        hash: Hash,
        key: &[u8],
        stable: &dyn Fn() -> bool,
        value: Option<&mut ValueBuf>,
    ) -> Result<Option<Found>> {
        let pool = self.heap.raw_pool();
        let home_meta = self.load(bucket_offset(segment, hash.home()))?;
        for i in 0..=reach(home_meta) {
            let bucket = hash.bucket(i);
            let at = bucket_offset(segment, bucket);
            let meta = if i == 0 { home_meta } else { self.load(at)? };
            let fingerprints = pool.load_u64(at + 8, Ordering::Acquire)?.to_le_bytes();
            for slot in 0..SLOTS {
                if meta & (1 << slot) == 0 || fingerprints[slot as usize] != hash.fingerprint() {
                    continue;
                }
                let s = slot_offset(segment, bucket, slot);
                let words: [u64; 4] = pool.load_words(s)?;
                let info = words[3];
                match info_kind(info) {
                    KIND_INLINE => {
                        let stored: [u8; 16] = bytemuck::cast([words[0], words[1]]);
                        if info_key_len(info) == key.len()
                            && key.len() <= INLINE_KEY
                            && &stored[..key.len()] == key
                        {
                            if let Some(value) = value {
                                value.set_inline(words[2], info_value_len(info));
                            }
                            return Ok(Some(Found { bucket, slot, info, record: 0 }));
                        }
                    }
                    KIND_RECORD if words[0] == hash.0 => {
                        let record = words[1];
                        let [key_len, value_len]: [u32; 2] = pool.read(record)?;
                        // A lock-free reader may be looking at a record freed and reused since
                        // it read the slot: size nothing by its lengths unless the segment is
                        // unchanged (then the record is live); otherwise report nothing, which
                        // the caller's validation turns into a retry.
                        std::sync::atomic::fence(Ordering::Acquire);
                        if !stable() {
                            return Ok(None);
                        }
                        if key_len as usize == key.len() && pool.bytes_eq(record + 8, key)? {
                            if let Some(value) = value {
                                value.read(pool, record + 8 + u64::from(key_len), value_len as usize)?;
                            }
                            return Ok(Some(Found { bucket, slot, info, record }));
                        }
                    }
                    _ => {}
                }
            }
        }
        Ok(None)
    }

    /// The value of `key`, if present. Lock-free: retries while a writer or a split holds the
    /// segment, so it never returns a value whose commit is not yet durable.
    pub fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>> {
        self.get_with(key, |value| value.to_vec())
    }

    /// Calls `read` on the value of `key`, if present, without allocating for inline values.
    pub fn get_with<R>(&self, key: &[u8], read: impl FnOnce(&[u8]) -> R) -> Result<Option<R>> {
        let mut value = ValueBuf::new();
        Ok(self.lookup(key, &mut value)?.then(|| read(value.as_slice())))
    }

    /// Whether `key` is present, its value copied into `value`.
    fn lookup(&self, key: &[u8], value: &mut ValueBuf) -> Result<bool> {
        check_sizes(key, None)?;
        let hash = self.hash(key);
        let (mut failures, mut strays) = (0, 0);
        loop {
            let attempt = (|| -> Result<Option<bool>> {
                let Some(segment) = self.locate(hash)? else {
                    return Ok(None);
                };
                let locks = self.locks(&segment)?;
                let before = locks.version.load(Ordering::Acquire);
                if before & 1 == 1 {
                    return Ok(None);
                }
                let segment = self.segment(segment.at)?;
                if !segment.owns(hash) {
                    // Only a split (at most 40 for one hash) can make this happen legitimately.
                    strays += 1;
                    if strays > 128 {
                        return Err(MapError::Corrupt(format!(
                            "the directory names no segment owning hash {:#018x}",
                            hash.0
                        )));
                    }
                    return Ok(None);
                }
                let homes = match locks.summary.get() {
                    Some(summary) => &summary.homes,
                    None => {
                        let (owner, owner_locks, _guard) = self.lock_owner(hash)?;
                        self.summary_locked(&owner, owner_locks)?;
                        return Ok(None); // retry with the summary
                    }
                };
                let maybe = homes[hash.home() as usize].load(Ordering::Acquire) & hash.summary_bit() != 0;
                let found = if maybe {
                    // The home bucket's four lines at once: the slot's miss overlaps the meta's.
                    self.heap.raw_pool().prefetch(bucket_offset(segment.at, hash.home()), BUCKET);
                    let stable = || locks.version.load(Ordering::Relaxed) == before;
                    self.find(segment.at, hash, key, &stable, Some(&mut *value))?.is_some()
                } else {
                    false
                };
                std::sync::atomic::fence(Ordering::Acquire);
                if locks.version.load(Ordering::Relaxed) != before {
                    return Ok(None);
                }
                Ok(Some(found))
            })();
            match attempt {
                Ok(Some(found)) => return Ok(found),
                Ok(None) => {}
                // Reading a block freed under us can fail; a real corruption fails every time.
                Err(e) if failures > 64 || is_poisoned(&e) => return Err(e),
                Err(_) => failures += 1,
            }
            std::thread::yield_now();
        }
    }

    /// Whether `key` is present.
    pub fn contains(&self, key: &[u8]) -> Result<bool> {
        Ok(self.get(key)?.is_some())
    }

    /// The segment that owns `hash`, locked (the directory is read again if a split moved the
    /// hash meanwhile).
    fn lock_owner(&self, hash: Hash) -> Result<(Segment, &SegLocks, MutexGuard<'_, ()>)> {
        // Each retry follows a split (at most 40 for one hash) or a read of a directory that a
        // doubling swapped or freed meanwhile; a real corruption fails every time.
        let mut failure = None;
        for attempt in 0..128 {
            if attempt > 0 {
                std::thread::yield_now(); // let the split that moved things finish
            }
            let owner = (|| {
                let Some(located) = self.locate(hash)? else {
                    return Ok(None);
                };
                let locks = self.locks(&located)?;
                let guard = lock(&locks.lock);
                let segment = self.segment(located.at)?;
                // Still the directory's choice: the first read may have followed a directory
                // freed (and its block reused) by a concurrent doubling.
                let current =
                    segment.owns(hash) && self.locate(hash)?.is_some_and(|again| again.at == segment.at);
                Ok::<_, MapError>(current.then_some((segment, locks, guard)))
            })();
            match owner {
                Ok(Some(owner)) => return Ok(owner),
                Ok(None) => {}
                Err(e) if is_poisoned(&e) => return Err(e),
                Err(e) => failure = Some(e),
            }
        }
        Err(failure.unwrap_or_else(|| {
            MapError::Corrupt(format!("the directory names no segment owning hash {:#018x}", hash.0))
        }))
    }

    /// Runs `op` on the segment owning `key`, locked and marked as being written; splits and
    /// retries when `op` finds the window full.
    fn write<R>(&self, key: &[u8], mut op: impl FnMut(&mut Held, Hash) -> Result<Outcome<R>>) -> Result<R> {
        // A FAMS sync waits for the whole operation, its splits included.
        let _writer = self.heap.raw_pool().enter_writer();
        let hash = self.hash(key);
        loop {
            let (segment, locks, guard) = self.lock_owner(hash)?;
            let summary = self.summary_locked(&segment, locks)?;
            let mut held = Held { segment, summary, _lock: guard };
            let outcome = {
                let _writing = Writing::start(&locks.version);
                op(&mut held, hash)?
            };
            drop(held);
            match outcome {
                Outcome::Done(r) => return Ok(r),
                Outcome::Split => self.split(segment)?,
            }
        }
    }

    /// Inserts `key` if absent. Returns `false` (and changes nothing) if it was present.
    pub fn insert(&self, key: &[u8], value: &[u8]) -> Result<bool> {
        check_sizes(key, Some(value))?;
        self.write(key, |held, hash| match self.find_held(held, hash, key, None)? {
            Some(_) => Ok(Outcome::Done(false)),
            None => Ok(Outcome::placed(self.place(held, hash, key, value, None)?, true)),
        })
    }

    /// Inserts or replaces. Returns `true` if the key was new.
    pub fn upsert(&self, key: &[u8], value: &[u8]) -> Result<bool> {
        check_sizes(key, Some(value))?;
        self.write(key, |held, hash| {
            let found = self.find_held(held, hash, key, None)?;
            let is_new = found.is_none();
            Ok(Outcome::placed(self.place(held, hash, key, value, found)?, is_new))
        })
    }

    /// Removes `key`. Returns whether it was present.
    pub fn remove(&self, key: &[u8]) -> Result<bool> {
        check_sizes(key, None)?;
        self.write(key, |held, hash| match self.find_held(held, hash, key, None)? {
            Some(found) => {
                self.unlink(held, hash, found)?;
                Ok(Outcome::Done(true))
            }
            None => Ok(Outcome::Done(false)),
        })
    }

    /// Atomically replaces the value of `key` with `new` (`None`: remove) if it is `expected`
    /// (`None`: absent). Returns the current value when it was not.
    pub fn compare_and_swap(
        &self,
        key: &[u8],
        expected: Option<&[u8]>,
        new: Option<&[u8]>,
    ) -> Result<Result<(), Option<Vec<u8>>>> {
        check_sizes(key, new)?;
        self.write(key, |held, hash| {
            let mut value = ValueBuf::new();
            let found = self.find_held(held, hash, key, Some(&mut value))?;
            let current = found.map(|_| value.as_slice());
            if current != expected {
                return Ok(Outcome::Done(Err(current.map(<[u8]>::to_vec))));
            }
            match (new, found) {
                (Some(value), found) => {
                    Ok(Outcome::placed(self.place(held, hash, key, value, found)?, Ok(())))
                }
                (None, Some(found)) => {
                    self.unlink(held, hash, found)?;
                    Ok(Outcome::Done(Ok(())))
                }
                (None, None) => Ok(Outcome::Done(Ok(()))),
            }
        })
    }

    /// A free slot of the window, clearing stale copies a split left behind if there is none.
    fn free_slot(&self, segment: &Segment, hash: Hash) -> Result<Option<(u64, u64)>> {
        let first_free_in_window = || -> Result<Option<(u64, u64)>> {
            for bucket in (0..WINDOW).map(|i| hash.bucket(i)) {
                if let Some(slot) = first_free(self.load(bucket_offset(segment.at, bucket))?) {
                    return Ok(Some((bucket, slot)));
                }
            }
            Ok(None)
        };
        if let Some(free) = first_free_in_window()? {
            return Ok(Some(free));
        }
        if !self.clear_stale(segment, (0..WINDOW).map(|i| hash.bucket(i)))? {
            return Ok(None);
        }
        // A cleared slot's bit must be clear on media before new bytes go into the slot:
        // otherwise a crash could show them under the stale bit.
        self.heap.raw_pool().fence()?;
        first_free_in_window()
    }

    /// Clears the occupancy bits of slots in `buckets` whose keys the segment no longer owns
    /// (flushed, not fenced). Returns whether it cleared any.
    fn clear_stale(&self, segment: &Segment, buckets: impl Iterator<Item = u64>) -> Result<bool> {
        let mut cleared = false;
        for bucket in buckets {
            let mut stale = 0;
            for slot in occupied(self.load(bucket_offset(segment.at, bucket))?) {
                if !segment.owns(self.slot_hash(segment.at, bucket, slot)?) {
                    stale |= 1 << slot;
                }
            }
            self.clear_slots(segment.at, bucket, stale)?;
            cleared |= stale != 0;
        }
        Ok(cleared)
    }

    /// Clears the occupancy bits `mask` of `bucket` (flushed, not fenced).
    fn clear_slots(&self, segment: u64, bucket: u64, mask: u64) -> Result<()> {
        if mask != 0 {
            let at = bucket_offset(segment, bucket);
            let pool = self.heap.raw_pool();
            pool.store_u64(at, self.load(at)? & !mask, Ordering::Release)?;
            pool.flush(at, 8)?;
        }
        Ok(())
    }

    /// The hash of the key in a slot.
    fn slot_hash(&self, segment: u64, bucket: u64, slot: u64) -> Result<Hash> {
        let s = slot_offset(segment, bucket, slot);
        let info = self.load(s + 24)?;
        Ok(match info_kind(info) {
            KIND_RECORD => Hash(self.load(s)?),
            _ => {
                let key: [u8; 16] = self.heap.raw_pool().read(s)?;
                self.hash(&key[..info_key_len(info).min(INLINE_KEY)])
            }
        })
    }

    /// Writes `key`/`value` into a new slot of the window and commits it, replacing `old` if
    /// given, failure-atomically. Returns `false` if the window is full.
    fn place(
        &self,
        held: &mut Held,
        hash: Hash,
        key: &[u8],
        value: &[u8],
        old: Option<Found>,
    ) -> Result<bool> {
        let pool = self.heap.raw_pool();
        let segment = held.segment;
        // An inline value of unchanged length: one 8-byte store.
        if let Some(found) = old {
            if info_kind(found.info) == KIND_INLINE
                && is_inline(key, value)
                && info_value_len(found.info) == value.len()
            {
                let at = slot_offset(segment.at, found.bucket, found.slot) + 16;
                let mut word = [0u8; 8];
                word[..value.len()].copy_from_slice(value);
                pool.store_u64(at, u64::from_le_bytes(word), Ordering::Release)?;
                pool.persist(at, 8)?;
                return Ok(true);
            }
        }
        let old_slot = old.map(|f| (f.bucket, f.slot));
        let free = match self.free_slot(&segment, hash)? {
            Some(free) => Some(free),
            None => self.displace(&segment, hash, old_slot)?,
        };
        let Some((bucket, slot)) = free else {
            return Ok(false);
        };
        let record = if is_inline(key, value) {
            None
        } else {
            let size = 8 + key.len() as u64 + value.len() as u64;
            let reservation = self.heap.reserve(size)?;
            let at = reservation.offset();
            let header: [u32; 2] = [key.len() as u32, value.len() as u32];
            let written = pool
                .write(at, &header)
                .and_then(|_| pool.write_bytes(at + 8, key))
                .and_then(|_| pool.write_bytes(at + 8 + key.len() as u64, value));
            if let Err(e) = written {
                self.heap.cancel(reservation);
                return Err(e.into());
            }
            Some(reservation)
        };
        let words: [u64; 4] = match &record {
            None => {
                let mut key16 = [0u8; 16];
                key16[..key.len()].copy_from_slice(key);
                let mut value8 = [0u8; 8];
                value8[..value.len()].copy_from_slice(value);
                let [k0, k1]: [u64; 2] = bytemuck::cast(key16);
                [k0, k1, u64::from_le_bytes(value8), info(KIND_INLINE, key.len(), value.len())]
            }
            Some(r) => [hash.0, r.offset(), 0, info(KIND_RECORD, 0, 0)],
        };
        let records = RecordChange { adopt: record, free: old.map(|f| f.record).filter(|&r| r != 0) };
        let placement = Placement { hash, to: (bucket, slot), words, from: old_slot };
        // Readers retry while this segment is being written, so the summary may cover the key
        // before its commit (a failed commit leaves a bit that only costs a probe).
        held.summary.homes[hash.home() as usize].fetch_or(hash.summary_bit(), Ordering::Release);
        self.commit_slot(&segment, placement, records)?;
        if old.is_none() {
            held.summary.live.fetch_add(1, Ordering::Relaxed);
        }
        Ok(true)
    }

    /// Makes room in the full window of `hash` by moving one key that lies in it, and whose own
    /// window reaches past it, to a free slot past it (one heap commit flips both meta words).
    /// `keep` is a slot that must not move. Returns the slot it freed.
    fn displace(
        &self,
        segment: &Segment,
        hash: Hash,
        keep: Option<(u64, u64)>,
    ) -> Result<Option<(u64, u64)>> {
        let home = hash.home();
        // From the window's far end: keys homed late in it reach farthest past it.
        for offset in (1..WINDOW).rev() {
            let from = hash.bucket(offset);
            let meta = self.load(bucket_offset(segment.at, from))?;
            for slot in occupied(meta).filter(|&s| Some((from, s)) != keep) {
                let moving = self.slot_hash(segment.at, from, slot)?;
                let behind = distance(home, moving.home());
                if behind == 0 || behind > offset || !segment.owns(moving) {
                    continue;
                }
                // Buckets past this window that are still in the moving key's window.
                for to in (WINDOW - behind..WINDOW).map(|i| moving.bucket(i)) {
                    let Some(to_slot) = first_free(self.load(bucket_offset(segment.at, to))?) else {
                        continue;
                    };
                    let words: [u64; 4] =
                        self.heap.raw_pool().load_words(slot_offset(segment.at, from, slot))?;
                    let records = RecordChange { adopt: None, free: None };
                    let placement =
                        Placement { hash: moving, to: (to, to_slot), words, from: Some((from, slot)) };
                    self.commit_slot(segment, placement, records)?;
                    return Ok(Some((from, slot)));
                }
            }
        }
        Ok(None)
    }

    /// Writes a placement's slot with its fingerprint and commits it, releasing its old slot and
    /// making `records`' heap changes in the same commit, failure-atomically.
    fn commit_slot(&self, segment: &Segment, placement: Placement, records: RecordChange) -> Result<()> {
        let pool = self.heap.raw_pool();
        let bucket = placement.to.0;
        let Prepared { mut before_commit, metas } = match self.prepare_slot(segment, placement) {
            Ok(prepared) => prepared,
            Err(e) => {
                if let Some(reservation) = records.adopt {
                    self.heap.cancel(reservation);
                }
                return Err(e);
            }
        };
        match (metas.as_slice(), &records.adopt, records.free) {
            // One word, no allocation change: the plain protocol, two fences.
            ([(bucket, meta)], None, None) => {
                for &(at, len) in before_commit.as_slice() {
                    pool.flush(at, len)?;
                }
                pool.fence()?;
                let at = bucket_offset(segment.at, *bucket);
                pool.store_u64(at, *meta, Ordering::Release)?;
                pool.persist(at, 8)?;
            }
            // Several words or an allocation: one heap commit (the redo log). Recovery may apply
            // the meta word from the log, so the fingerprint cannot rely on being stored before
            // it in the same line: it is made durable before the commit like the slot.
            _ => {
                before_commit.push((bucket_offset(segment.at, bucket) + 8, 8));
                self.heap.transaction(|tx| {
                    // First: from here on the transaction gives the block back if it aborts.
                    if let Some(r) = records.adopt {
                        tx.adopt(r);
                    }
                    for &(at, len) in before_commit.as_slice() {
                        tx.flush_on_commit(at, len)?;
                    }
                    if let Some(old) = records.free {
                        tx.free(old)?;
                    }
                    for &(bucket, meta) in metas.as_slice() {
                        tx.redo_store(bucket_offset(segment.at, bucket), meta)?;
                    }
                    Ok::<_, HeapError>(())
                })?;
            }
        }
        Ok(())
    }

    /// The first half of [`commit_slot`](Self::commit_slot): writes the slot and its
    /// fingerprint (and raises the home's reach, durable before the commit); returns the ranges
    /// to make durable before the commit and the meta words to store at it.
    fn prepare_slot(&self, segment: &Segment, placement: Placement) -> Result<Prepared> {
        let Placement { hash, to: (bucket, slot), words, from } = placement;
        let pool = self.heap.raw_pool();
        let home = hash.home();
        let s = slot_offset(segment.at, bucket, slot);
        pool.write(s, &words)?;
        let b = bucket_offset(segment.at, bucket);
        pool.write(b + 8 + slot, &hash.fingerprint())?;
        // Lines that must be durable before the commit (the slot; a raised reach).
        let mut before_commit = Pairs::new();
        before_commit.push((s, 32));
        // Meta words to change at the commit: this bucket gains the slot, the old slot (if any)
        // is released. A key placed past its home bucket's reach raises the reach first: it
        // must be durable before the key can be found through it (a reach never shrinks until
        // the segment splits; one that is too long only costs probes).
        let mut metas = Pairs::new();
        metas.push((bucket, self.load(b)? | 1 << slot));
        if let Some((old_bucket, old_slot)) = from {
            match metas.as_mut_slice().iter_mut().find(|(bk, _)| *bk == old_bucket) {
                Some(entry) => entry.1 &= !(1 << old_slot),
                None => metas
                    .push((old_bucket, self.load(bucket_offset(segment.at, old_bucket))? & !(1 << old_slot))),
            }
        }
        let distance = distance(home, bucket);
        if distance > 0 {
            match metas.as_mut_slice().iter_mut().find(|(bk, _)| *bk == home) {
                Some(entry) => entry.1 = with_reach(entry.1, distance),
                None => {
                    let homed = bucket_offset(segment.at, home);
                    let meta = self.load(homed)?;
                    if reach(meta) < distance {
                        pool.store_u64(homed, with_reach(meta, distance), Ordering::Release)?;
                        before_commit.push((homed, 8));
                    }
                }
            }
        }
        Ok(Prepared { before_commit, metas })
    }

    /// Removes the key at `found`: clears its bit (with its record's free, in one heap commit),
    /// then recomputes its home's summary.
    fn unlink(&self, held: &mut Held, hash: Hash, found: Found) -> Result<()> {
        let pool = self.heap.raw_pool();
        let at = bucket_offset(held.segment.at, found.bucket);
        let meta = self.load(at)? & !(1 << found.slot);
        if found.record == 0 {
            pool.store_u64(at, meta, Ordering::Release)?;
            pool.persist(at, 8)?;
        } else {
            self.heap.transaction(|tx| {
                tx.free(found.record)?;
                tx.redo_store(at, meta)
            })?;
        }
        held.summary.live.fetch_sub(1, Ordering::Relaxed);
        self.resummarise(held, hash.home())
    }

    /// Splits `segment` (as it was seen when its window filled).
    fn split(&self, seen: Segment) -> Result<()> {
        let mut splits = lock(&self.resize);
        let locks = self.locks(&seen)?;
        let _guard = lock(&locks.lock);
        let segment = self.segment(seen.at)?;
        if segment.depth != seen.depth {
            return Ok(()); // someone split it meanwhile
        }
        let summary = self.summary_locked(&segment, locks)?;
        let _writing = Writing::start(&locks.version);
        let pool = self.heap.raw_pool();
        let (depth, pattern) = (segment.depth, segment.pattern);
        // The live entries that move (their next hash bit is 1), where they were, and the
        // summaries of both halves.
        let mut moving: Vec<(Hash, (u64, u64))> = Vec::new();
        let mut moving_words: Vec<[u64; 4]> = Vec::new();
        let mut moved = vec![0u8; BUCKETS as usize];
        let mut staying_homes = vec![0u64; BUCKETS as usize];
        let mut live = 0u64;
        let mut moving_homes = vec![0u64; BUCKETS as usize];
        for bucket in 0..BUCKETS {
            self.for_owned(&segment, bucket, |slot, hash| {
                live += 1;
                if hash.prefix(depth + 1) & 1 == 1 {
                    moving.push((hash, (bucket, slot)));
                    moving_words.push(pool.load_words(slot_offset(segment.at, bucket, slot))?);
                    moved[bucket as usize] |= 1 << slot;
                    moving_homes[hash.home() as usize] |= hash.summary_bit();
                } else {
                    staying_homes[hash.home() as usize] |= hash.summary_bit();
                }
                Ok(())
            })?;
        }
        let dir = self.load(self.root + ROOT_DIR)?;
        let global = self.dir_depth(dir)?;
        let next_id = self.load(self.root + ROOT_NEXT_ID)?;
        if depth + 1 > MAX_DEPTH {
            return Err(MapError::Limit(format!(
                "a full window's keys share a {depth}-bit hash prefix, the deepest a directory goes"
            )));
        }
        if self.segments.get(next_id).is_none() {
            return Err(MapError::Limit(format!("{next_id} segments, the most one map can have")));
        }
        let (root, new_pattern) = (self.root, pattern << 1 | 1);
        self.heap.transaction(|tx| {
            // Only the header, the bucket headers and the moved slots need writing: a slot's
            // bytes mean nothing while its occupancy bit is clear.
            let new = tx.alloc_uninit(SEGMENT_SIZE)?;
            tx.write(PPtr::<[u64; 4]>::new(new), &[SEG_MAGIC, depth + 1, new_pattern, next_id])?;
            let mut metas = vec![0u64; BUCKETS as usize];
            let mut fingerprints = vec![[0u8; 8]; BUCKETS as usize];
            for ((&(hash, _), words), (bucket, slot)) in
                moving.iter().zip(&moving_words).zip(pack_moved(&moving))
            {
                let home = hash.home();
                tx.write(PPtr::<[u64; 4]>::new(slot_offset(new, bucket, slot)), words)?;
                metas[bucket as usize] |= 1 << slot;
                fingerprints[bucket as usize][slot as usize] = hash.fingerprint();
                metas[home as usize] = with_reach(metas[home as usize], distance(home, bucket));
            }
            for bucket in 0..BUCKETS {
                let at = bucket_offset(new, bucket);
                tx.write(
                    PPtr::<[u64; 2]>::new(at),
                    &[metas[bucket as usize], u64::from_le_bytes(fingerprints[bucket as usize])],
                )?;
            }
            // Directory entries whose prefix at depth + 1 is the new pattern point at the new
            // segment; the directory doubles first when it is no deeper than the segment. The
            // directory's words come first in the redo log, so while it is applied no reader
            // finds the segment deeper than the directory it read it through (unless it read
            // the old one, which `locate` notices).
            let new_global = global.max(depth + 1);
            let first = new_pattern << (new_global - depth - 1);
            let count = 1u64 << (new_global - depth - 1);
            if new_global == global && count <= 64 {
                for j in first..first + count {
                    tx.redo_store(dir + DIR_HEADER + 8 * j, new)?;
                }
            } else {
                let entries = 1u64 << new_global;
                let copy = tx.alloc_bytes(DIR_HEADER + 8 * entries)?;
                tx.write(PPtr::<[u64; 2]>::new(copy), &[DIR_MAGIC, new_global])?;
                let shift = new_global - global;
                let mut table = vec![0u64; entries as usize];
                for (j, entry) in table.iter_mut().enumerate() {
                    let j = j as u64;
                    *entry = if j >= first && j < first + count {
                        new
                    } else {
                        tx.heap()
                            .raw_pool()
                            .load_u64(dir + DIR_HEADER + 8 * (j >> shift), Ordering::Acquire)?
                    };
                }
                tx.write_bytes(copy + DIR_HEADER, bytemuck::cast_slice(&table))?;
                tx.redo_store(root + ROOT_DIR, copy)?;
                tx.free(dir)?;
            }
            tx.redo_store(segment.at + SEG_DEPTH, depth + 1)?;
            tx.redo_store(segment.at + SEG_PATTERN, pattern << 1)?;
            tx.redo_store(root + ROOT_NEXT_ID, next_id + 1)?;
            Ok::<_, HeapError>(())
        })?;
        // Committed: DRAM follows first, so that it is right whatever happens below.
        for (word, bits) in summary.homes.iter().zip(staying_homes) {
            word.store(bits, Ordering::Release);
        }
        summary.live.store(live - moving.len() as u64, Ordering::Relaxed);
        if let Some(new) = self.segments.get(next_id) {
            // Unless a writer of the new segment built it from media first.
            let _ = new.summary.set(Summary::new(moving_homes, moving.len() as u64));
        }
        let load = live as f64 / (BUCKETS * SLOTS) as f64;
        splits.load_min = if splits.count == 0 { load } else { splits.load_min.min(load) };
        splits.count += 1;
        splits.load_sum += load;
        // The moved keys' old copies are stale now; clear their bits (the ones moved: stale
        // copies left by a crash are cleared when a window needs them). Another thread may
        // reuse a cleared slot as soon as the segment is unlocked, and its fence does not order
        // this thread's flushes: make the clearing durable first. (Usually this thread's
        // retried write fences right after anyway, but not when the retry writes nothing. If a
        // store or the fence fails, the pool is poisoned and refuses every later write, so no
        // slot is reused.)
        for (bucket, &mask) in (0..BUCKETS).zip(&moved) {
            self.clear_slots(segment.at, bucket, u64::from(mask))?;
        }
        pool.fence()?; // site: split-clearing (cross-thread: see above)
        Ok(())
    }

    /// Calls `visit(key, value)` for every entry until it returns `false`, in hash order, one
    /// segment at a time (a snapshot of each, taken under its lock). Weakly consistent with
    /// concurrent writers, but a key present throughout is visited exactly once, splits
    /// notwithstanding: the walk follows the hash space, and a segment only ever splits into
    /// parts of its own range. `visit` may use the map.
    pub fn for_each(&self, mut visit: impl FnMut(&[u8], &[u8]) -> bool) -> Result<()> {
        self.walk(
            |segment, _| self.segment_entries(segment),
            |entries| Ok(entries.iter().all(|(key, value)| visit(key, value))),
        )
    }

    /// Walks the segments in hash order: `snapshot` runs with each locked, then `each` on its
    /// result without the lock, until it returns `false`.
    fn walk<T>(
        &self,
        mut snapshot: impl FnMut(&Segment, &SegLocks) -> Result<T>,
        mut each: impl FnMut(T) -> Result<bool>,
    ) -> Result<()> {
        let mut cursor = Some(0u64);
        while let Some(at) = cursor {
            let (segment, locks, guard) = self.lock_owner(Hash(at))?;
            let taken = snapshot(&segment, locks)?;
            drop(guard);
            // The end of the range the segment covered at its snapshot: a later split of it
            // only divides that range, so continuing after it skips nothing.
            let end = (u128::from(segment.pattern) + 1) << (64 - segment.depth);
            cursor = u64::try_from(end).ok();
            if !each(taken)? {
                break;
            }
        }
        Ok(())
    }

    /// The live entries of `segment`, which the caller holds locked.
    fn segment_entries(&self, segment: &Segment) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        let pool = self.heap.raw_pool();
        let mut entries = Vec::new();
        for bucket in 0..BUCKETS {
            self.for_owned(segment, bucket, |slot, _| {
                let words: [u64; 4] = pool.load_words(slot_offset(segment.at, bucket, slot))?;
                let info = words[3];
                if info_kind(info) == KIND_INLINE {
                    let key: [u8; 16] = bytemuck::cast([words[0], words[1]]);
                    let value = words[2].to_le_bytes();
                    let (key_len, value_len) =
                        (info_key_len(info).min(INLINE_KEY), info_value_len(info).min(8));
                    entries.push((key[..key_len].to_vec(), value[..value_len].to_vec()));
                } else {
                    let [key_len, value_len]: [u32; 2] = pool.read(words[1])?;
                    if key_len as usize > MAX_KEY || !pool.contains(words[1] + 8, u64::from(key_len)) {
                        return Err(MapError::Corrupt(format!(
                            "a record at {:#x} claims a {key_len}-byte key",
                            words[1]
                        )));
                    }
                    let mut key = vec![0u8; key_len as usize];
                    pool.read_into(words[1] + 8, &mut key)?;
                    let mut value = ValueBuf::new();
                    value.read(pool, words[1] + 8 + u64::from(key_len), value_len as usize)?;
                    entries.push((key, value.as_slice().to_vec()));
                }
                Ok(())
            })?;
        }
        Ok(entries)
    }

    /// Every entry, in no particular order.
    pub fn entries(&self) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        let mut all = Vec::new();
        self.for_each(|k, v| {
            all.push((k.to_vec(), v.to_vec()));
            true
        })?;
        Ok(all)
    }

    /// Counts the entries: the sum of per-segment counts kept in DRAM, O(segments) (a segment
    /// not used since the map was opened is counted from media once).
    pub fn len(&self) -> Result<u64> {
        let mut n = 0;
        self.walk(
            |segment, locks| Ok(self.summary_locked(segment, locks)?.live.load(Ordering::Relaxed)),
            |live| {
                n += live;
                Ok(true)
            },
        )?;
        Ok(n)
    }

    /// Whether the map has no entries.
    pub fn is_empty(&self) -> Result<bool> {
        Ok(self.len()? == 0)
    }

    /// Removes every entry (each removal failure-atomic). Returns how many.
    pub fn clear(&self) -> Result<u64> {
        let keys: Vec<Vec<u8>> = self.entries()?.into_iter().map(|(k, _)| k).collect();
        let mut removed = 0;
        for key in keys {
            removed += u64::from(self.remove(&key)?);
        }
        Ok(removed)
    }

    /// The number of segments and the directory's depth (a walk of the directory).
    pub fn shape(&self) -> Result<(u64, u64)> {
        let _no_splits = lock(&self.resize);
        let dir = self.load(self.root + ROOT_DIR)?;
        let global = self.dir_depth(dir)?;
        let mut segments = 0;
        for j in 0..1u64 << global {
            let segment = self.entry_segment(dir, global, j)?;
            segments += u64::from(j == segment.pattern << (global - segment.depth));
        }
        Ok((segments, global))
    }

    /// Counts of the map's shape.
    pub fn stats(&self) -> Result<MapStats> {
        let entries = self.len()?;
        let (segments, global) = self.shape()?;
        let splits = lock(&self.resize);
        Ok(MapStats {
            entries,
            segments,
            global_depth: global,
            load_factor: entries as f64 / (segments * BUCKETS * SLOTS) as f64,
            splits: splits.count,
            mean_load_at_split: if splits.count == 0 { 0.0 } else { splits.load_sum / splits.count as f64 },
            min_load_at_split: splits.load_min,
        })
    }
}
