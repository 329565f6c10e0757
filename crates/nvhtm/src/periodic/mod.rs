//! The periodically persistent transactional hash map (Dalí: Nawab, Izraelevitz, Kelly,
//! Morrey, Chakrabarti, Scott, DISC 2017), with buffered durable linearizability: after a
//! crash the map holds a consistent prefix of its history that includes everything before the
//! last completed [`sync`](PeriodicMap::sync); no operation flushes or fences.
//!
//! - **Buckets** (`layout.rs`): a status word and three heads in half a cache line. Each head
//!   points to an immutable *block* holding all of the bucket's entries; a write builds a new
//!   block and publishes it with two 8-byte stores in one line (the head, then the status),
//!   rotating which head holds the newest state, the previous epoch's, and the committed one.
//! - **Epochs** (`epoch.rs`, `persist.rs`): every operation runs inside one epoch. A persister
//!   (a thread with a period, or [`advance`](PeriodicMap::advance) / [`sync`](PeriodicMap::sync))
//!   moves to the next epoch, waits until the old one's operations end, writes back every line
//!   they dirtied, fences, and then persists the old epoch's number as durable.
//! - **Recovery** is O(1): the epochs after the last durable one that may hold writes are
//!   appended to a persistent failed-epoch list, and a reader simply ignores a head whose
//!   epoch failed; the first write to a bucket repairs it.
//! - **Blocks** live in an arena (`arena.rs`) with no per-block persistent metadata: a block
//!   is in use exactly when a bucket's status names it, and is reused once the epoch after the
//!   one that dropped it is durable.
//! - **Growth** (`dir.rs`): extendible hashing; a segment whose bucket would exceed
//!   [`MAX_ENTRIES`] splits in one heap transaction that copies the new half's blocks,
//!   status words included, so both halves keep every state a crash may need.
//! - **Transactions** (`txn.rs`): several keys read and written, validated and applied under
//!   the buckets' locks inside one epoch — heeded together after a crash or not at all.

mod arena;
mod dir;
mod epoch;
mod iter;
mod layout;
mod ops;
mod persist;
#[cfg(test)]
mod tests;
mod txn;

pub use arena::ArenaStats;
pub use iter::{PeriodicCheck, PeriodicStats};
pub use layout::{BUCKETS, MAX_ENTRIES, PERIODIC_MAGIC};
pub use txn::Transaction;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use crate::heap::{Heap, HeapError};
use crate::map::{MapError, Result};
use crate::persist::Domain;
use crate::pool::PPtr;
use arena::Arena;
use dir::Directory;
use epoch::Epochs;
use layout::*;

/// Longest value of the periodic map (a bucket's block holds up to [`MAX_ENTRIES`] of them).
pub const MAX_VALUE: usize = 1024 * 1024;

/// The epoch length a map created with the default options records.
pub const DEFAULT_EPOCH: Duration = Duration::from_millis(10);

/// Who ends epochs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EpochPeriod {
    /// No persister thread: the owner calls [`PeriodicMap::advance`] or
    /// [`PeriodicMap::sync`] (deterministic, for tests and the crash simulator).
    Manual,
    /// A persister thread with the epoch length recorded in the map when it was created
    /// ([`DEFAULT_EPOCH`] for a map created now).
    Stored,
    /// A persister thread with this epoch length (recorded if the map is created now).
    Every(Duration),
}

/// How a periodic map runs.
#[derive(Debug, Clone)]
pub struct PeriodicOptions {
    /// The epoch length: a persister thread advances the epoch this often (when operations ran
    /// in it), or none.
    pub epoch: EpochPeriod,
    /// The hash seed of a map created now (`None`: a secret one from the OS).
    pub seed: Option<u64>,
    /// Scan the buckets to find the arena's free blocks in a background thread after opening
    /// (`true`), or before `open` returns (`false`).
    pub background_scan: bool,
}

impl Default for PeriodicOptions {
    fn default() -> PeriodicOptions {
        PeriodicOptions { epoch: EpochPeriod::Stored, seed: None, background_scan: true }
    }
}

impl PeriodicOptions {
    /// No persister thread and a synchronous scan: every epoch boundary is the caller's.
    ///
    /// ```
    /// use nvhtm::periodic::{EpochPeriod, PeriodicOptions};
    /// let opts = PeriodicOptions::manual();
    /// assert!(opts.epoch == EpochPeriod::Manual && !opts.background_scan);
    /// ```
    pub fn manual() -> PeriodicOptions {
        PeriodicOptions { epoch: EpochPeriod::Manual, seed: None, background_scan: false }
    }

    /// With a persister thread ending an epoch every `period`.
    pub fn every(mut self, period: Duration) -> PeriodicOptions {
        self.epoch = EpochPeriod::Every(period);
        self
    }

    /// With this hash seed for a map created now (0: unkeyed; for reproducible tests only).
    pub fn with_seed(mut self, seed: u64) -> PeriodicOptions {
        self.seed = Some(seed);
        self
    }
}

/// The epochs that failed: ranges `(first, last)`, sorted, all before `base`.
#[derive(Debug, Default)]
pub(crate) struct Failed {
    ranges: Vec<(u64, u64)>,
    base: u64,
}

impl Failed {
    fn contains(&self, epoch: u64) -> bool {
        if epoch >= self.base {
            return false;
        }
        let at = self.ranges.partition_point(|&(first, _)| first <= epoch);
        at > 0 && self.ranges[at - 1].1 >= epoch
    }
}

/// What opening found and did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Recovery {
    /// The last epoch that was durable.
    pub durable: u64,
    /// The epochs recorded as failed now (`None`: the map was closed cleanly).
    pub failed: Option<(u64, u64)>,
    /// The first epoch of this run.
    pub base: u64,
}

pub(crate) struct Inner<D: Domain> {
    heap: Heap<D>,
    root: u64,
    seed: u64,
    epochs: Epochs,
    failed: Failed,
    /// The last durable epoch (as persisted).
    durable: AtomicU64,
    arena: Arena,
    dir: Directory,
    /// Blocks that left their buckets, by epoch, waiting for the epoch after to be durable.
    pending: Mutex<Vec<(u64, Vec<u64>)>>,
    /// Serialises epoch advances.
    advancing: Mutex<()>,
    /// Asks the background scan to stop (the map is closing).
    stop_scan: std::sync::atomic::AtomicBool,
    recovery: Recovery,
}

/// The periodic (Dalí) map over a heap (its root object).
///
/// ```
/// use nvhtm::periodic::{PeriodicMap, PeriodicOptions};
/// use nvhtm::{Heap, PoolOptions, Volatile};
/// let heap = Heap::create_in_memory(&PoolOptions::layout("doc").with_size(8 << 20), Volatile)?;
/// let map = PeriodicMap::open(heap, PeriodicOptions::manual())?;
/// map.upsert(b"apple", b"red")?;
/// map.transaction(|t| {
///     let v = t.get(b"apple")?.unwrap_or_default();
///     t.upsert(b"pear", &v);
///     Ok(())
/// })?;
/// map.sync()?; // everything before is durable now
/// assert_eq!(map.get(b"pear")?, Some(b"red".to_vec()));
/// # Ok::<(), nvhtm::MapError>(())
/// ```
pub struct PeriodicMap<D: Domain> {
    inner: Arc<Inner<D>>,
    persister: Option<persist::Persister>,
    scanner: Option<std::thread::JoinHandle<Result<()>>>,
}

impl<D: Domain> std::fmt::Debug for PeriodicMap<D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeriodicMap").field("recovery", &self.inner.recovery).finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn check_sizes(key: &[u8], value: Option<&[u8]>) -> Result<()> {
    if key.len() > crate::map::MAX_KEY {
        return Err(MapError::KeyTooLarge { len: key.len(), max: crate::map::MAX_KEY });
    }
    match value {
        Some(v) if v.len() > MAX_VALUE => Err(MapError::ValueTooLarge { len: v.len(), max: MAX_VALUE }),
        _ => Ok(()),
    }
}

impl<D: Domain> PeriodicMap<D> {
    /// Opens the periodic map that is the heap's root object, creating an empty one in a new
    /// heap, and recovers it in O(1): the epochs after the last durable one are recorded as
    /// failed (unless the map was closed cleanly). Starts the persister thread when
    /// `opts.epoch` is set.
    pub fn open(heap: Heap<D>, opts: PeriodicOptions) -> Result<PeriodicMap<D>> {
        let root = heap.root::<Root>().map_err(|e| match e {
            HeapError::RootSize { .. } => MapError::NotAMap(e.to_string()),
            e => MapError::Heap(e),
        })?;
        let root = root.offset();
        let pool = heap.raw_pool();
        match pool.load_u64(root + ROOT_MAGIC, Ordering::Acquire)? {
            PERIODIC_MAGIC => {}
            0 => {
                let epoch = match opts.epoch {
                    EpochPeriod::Every(period) => period,
                    _ => DEFAULT_EPOCH,
                };
                format(&heap, root, opts.seed.unwrap_or_else(crate::map::secret_seed), epoch)?
            }
            crate::map::MAP_MAGIC => {
                return Err(MapError::NotAMap("the pool holds a strict map, not a periodic one".into()))
            }
            other => return Err(MapError::NotAMap(format!("root magic {other:#018x}"))),
        }
        let words = pool.load_words::<16>(root)?;
        let (failed, recovery) = recover(&heap, root, words)?;
        let arena = Arena::load(&heap, words[(ROOT_CHUNKS / 8) as usize])?;
        let dir = Directory::load(&heap, words[(ROOT_DIR / 8) as usize])?;
        let inner = Arc::new(Inner {
            seed: words[(ROOT_SEED / 8) as usize],
            epochs: Epochs::new(recovery.base),
            failed,
            durable: AtomicU64::new(recovery.durable),
            arena,
            dir,
            pending: Mutex::default(),
            advancing: Mutex::default(),
            stop_scan: Default::default(),
            recovery,
            heap,
            root,
        });
        let scanner = if opts.background_scan {
            let inner = inner.clone();
            Some(std::thread::spawn(move || inner.scan()))
        } else {
            inner.scan()?;
            None
        };
        let period = match opts.epoch {
            EpochPeriod::Manual => None,
            EpochPeriod::Stored => Some(inner.stored_epoch()?),
            EpochPeriod::Every(period) => Some(period),
        };
        let persister = period.map(|period| persist::Persister::start(inner.clone(), period));
        Ok(PeriodicMap { inner, persister, scanner })
    }

    /// The epoch length recorded when the map was created.
    pub fn stored_epoch(&self) -> Result<Duration> {
        self.inner.stored_epoch()
    }

    /// What opening found: the durable epoch, the epochs recorded as failed, this run's first.
    pub fn recovery(&self) -> Recovery {
        self.inner.recovery
    }

    /// The heap the map lives in.
    pub fn heap(&self) -> &Heap<D> {
        &self.inner.heap
    }

    /// Waits until the arena's scan after opening has ended (it reports a corrupt bucket).
    pub fn wait_for_scan(&mut self) -> Result<()> {
        match self.scanner.take() {
            Some(scanner) => {
                scanner.join().unwrap_or_else(|_| Err(MapError::Corrupt("the scan panicked".into())))
            }
            None => Ok(()),
        }
    }

    /// Closes the map: stops the persister, makes everything durable, marks the map clean
    /// (the next open records no failed epoch) and closes the heap.
    pub fn close(mut self) -> Result<()> {
        self.stop()?;
        let inner = self.inner.clone();
        drop(self);
        inner.sync()?;
        let pool = inner.heap.raw_pool();
        let durable = inner.durable.load(Ordering::SeqCst);
        pool.store_u64(inner.root + ROOT_CLEAN, CLEAN | durable, Ordering::Release)?;
        pool.persist(inner.root + ROOT_CLEAN, 8)?;
        match Arc::try_unwrap(inner) {
            Ok(inner) => Ok(inner.heap.close()?),
            Err(_) => Err(MapError::Corrupt("the map is still shared by a thread".into())),
        }
    }

    /// Stops the persister (after a last sync) and the scanner (chunks it did not reach
    /// stay unscanned: nothing is allocated from them any more).
    fn stop(&mut self) -> Result<()> {
        self.inner.stop_scan.store(true, Ordering::Relaxed);
        let scanned = self.wait_for_scan();
        if let Some(p) = self.persister.take() {
            p.stop()?;
        }
        scanned
    }
}

impl<D: Domain> Drop for PeriodicMap<D> {
    /// Stops the threads; the persister's last advance makes everything durable it can.
    fn drop(&mut self) {
        let _ = self.stop();
    }
}

/// An empty map: a directory of depth 0, one segment of empty buckets, an empty chunk table,
/// durable epoch 0, committed with the root in one heap transaction.
fn format<D: Domain>(heap: &Heap<D>, root: u64, seed: u64, epoch: Duration) -> Result<()> {
    heap.transaction(|tx| {
        let segment = tx.alloc_bytes(SEGMENT_SIZE)?;
        if segment % 64 != 0 {
            return Err(MapError::Corrupt(format!("segment at {segment:#x} is not line-aligned")));
        }
        tx.write(PPtr::<[u64; 3]>::new(segment), &[SEG_MAGIC, 0, 0])?;
        let dir = tx.alloc_bytes(DIR_HEADER + 8)?;
        tx.write(PPtr::<[u64; 3]>::new(dir), &[DIR_MAGIC, 0, segment])?;
        let chunks = Arena::format(tx)?;
        let micros = u64::try_from(epoch.as_micros()).unwrap_or(u64::MAX).max(1);
        let mut words: Root = [0; 16];
        words[..9].copy_from_slice(&[PERIODIC_MAGIC, dir, chunks, seed, 0, 0, 0, 1, micros]);
        tx.write(PPtr::<Root>::new(root), &words)?;
        Ok(())
    })
}

/// Failed-epoch list header: magic, count, capacity; then (first, last) pairs.
const FAILED_HEADER: u64 = 24;

/// Recovery: reads the durable epoch and the previous run's base; unless the map was closed
/// cleanly, every epoch the previous run may have written in after the durable one — up to
/// `max(base + 1, durable + 2)`: a run starts at `base`, and an epoch `e + 2` begins only once
/// `e` is durable — is appended to the failed list. The next run's base comes after all of
/// them. Both are persisted before any operation runs; a crash in between repeats the same
/// steps (appending a range already there is harmless).
fn recover<D: Domain>(heap: &Heap<D>, root: u64, words: Root) -> Result<(Failed, Recovery)> {
    let pool = heap.raw_pool();
    let durable = words[(ROOT_DURABLE / 8) as usize];
    let old_base = words[(ROOT_BASE / 8) as usize];
    let clean = words[(ROOT_CLEAN / 8) as usize] == CLEAN | durable;
    let list = words[(ROOT_FAILED / 8) as usize];
    let mut ranges = read_failed(heap, list)?;
    let newly = (!clean).then(|| (durable + 1, (old_base + 1).max(durable + 2)));
    let base = newly.map_or(durable + 1, |(_, last)| last + 1);
    if let Some(range) = newly {
        if ranges.last() != Some(&range) {
            append_failed(heap, root, list, ranges.len() as u64, range)?;
            ranges.push(range);
        }
    }
    debug_assert!(ranges.windows(2).all(|w| w[0].0 <= w[1].0), "failed ranges sorted: {ranges:?}");
    pool.store_u64(root + ROOT_BASE, base, Ordering::Release)?;
    pool.store_u64(root + ROOT_CLEAN, 0, Ordering::Release)?;
    pool.persist(root + ROOT_CLEAN, 24)?;
    Ok((Failed { ranges, base }, Recovery { durable, failed: newly, base }))
}

fn read_failed<D: Domain>(heap: &Heap<D>, list: u64) -> Result<Vec<(u64, u64)>> {
    if list == 0 {
        return Ok(Vec::new());
    }
    let pool = heap.raw_pool();
    let [magic, count, cap] = pool.load_words::<3>(list)?;
    if magic != FAILED_MAGIC || count > cap || !pool.contains(list, FAILED_HEADER + cap * 16) {
        return Err(MapError::Corrupt(format!(
            "failed-epoch list at {list:#x}: magic {magic:#x}, {count} of {cap}"
        )));
    }
    (0..count)
        .map(|i| {
            let [first, last] = pool.load_words::<2>(list + FAILED_HEADER + i * 16)?;
            if first > last {
                return Err(MapError::Corrupt(format!("failed epochs {first}..={last}")));
            }
            Ok((first, last))
        })
        .collect()
}

/// Appends a range to the failed list in one heap transaction (growing it when full).
fn append_failed<D: Domain>(
    heap: &Heap<D>,
    root: u64,
    list: u64,
    count: u64,
    range: (u64, u64),
) -> Result<()> {
    heap.transaction(|tx| {
        let cap = if list == 0 { 0 } else { tx.read(PPtr::<u64>::new(list + 16))? };
        let list = if count == cap {
            let grown = tx.alloc_bytes(FAILED_HEADER + (cap * 2).max(8) * 16)?;
            if list != 0 {
                let mut old = vec![0u8; (cap * 16) as usize];
                tx.heap().pool().read_into(list + FAILED_HEADER, &mut old)?;
                tx.write_bytes(grown + FAILED_HEADER, &old)?;
                tx.free(list)?;
            }
            tx.write(PPtr::<[u64; 3]>::new(grown), &[FAILED_MAGIC, count, (cap * 2).max(8)])?;
            tx.write(PPtr::<u64>::new(root + ROOT_FAILED), &grown)?;
            grown
        } else {
            list
        };
        tx.write(PPtr::<[u64; 2]>::new(list + FAILED_HEADER + count * 16), &[range.0, range.1])?;
        tx.write(PPtr::<u64>::new(list + 8), &(count + 1))?;
        Ok(())
    })
}

impl<D: Domain> Inner<D> {
    /// The epoch length recorded at creation.
    fn stored_epoch(&self) -> Result<Duration> {
        Ok(Duration::from_micros(self.load(self.root + ROOT_EPOCH_US)?.max(1)))
    }

    fn is_failed(&self, epoch: u64) -> bool {
        self.failed.contains(epoch)
    }

    pub(crate) fn load(&self, offset: u64) -> Result<u64> {
        Ok(self.heap.raw_pool().load_u64(offset, Ordering::Acquire)?)
    }

    /// Marks every block a bucket names as in use, then frees the rest of the chunks that
    /// existed at opening (unless asked to stop first).
    fn scan(&self) -> Result<()> {
        let mut stopped = false;
        self.dir.for_each_segment(&self.heap, |seg| {
            if self.stop_scan.load(Ordering::Relaxed) {
                stopped = true;
                return Ok(false);
            }
            for b in 0..BUCKETS {
                seg.lock(b);
                let marked = self.read_bucket_locked(seg, b).and_then(|(status, heads)| {
                    status.in_use().filter(|&i| heads[i] != 0).try_for_each(|i| {
                        self.arena.mark_live(heads[i]).map_err(|e| {
                            MapError::Corrupt(format!(
                                "{e} (bucket {b} of the segment at {:#x}, head {i}, {status:?}, heads {heads:x?})",
                                seg.offset
                            ))
                        })
                    })
                });
                seg.unlock(b);
                marked?;
            }
            Ok(true)
        })?;
        if !stopped {
            self.arena.finish_scan();
        }
        Ok(())
    }
}
