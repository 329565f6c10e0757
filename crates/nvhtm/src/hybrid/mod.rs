//! The hybrid map ("design B"; Viper, VLDB'21; FlatStore, ASPLOS'20): the data in a
//! persistent [log](crate::log) of key/value records, the index in DRAM, rebuilt by replaying
//! the log when the map is opened.
//!
//! - **Writes** append one record (`PUT key value` or `DELETE key`) and return once it is
//!   durable — strict semantics, like [`StrictMap`](crate::StrictMap) — at the cost of one
//!   group commit: a fence (an `msync` on a file pool) shared by every writer that arrived
//!   meanwhile. The index is updated under its shard's lock together with the append, so
//!   the order of a key's records in the log is the order of its index updates.
//! - **Reads** look the key up in the DRAM index (`index.rs`) and read the value from the
//!   record in the pool. A reader never answers from a record that is not durable yet: it
//!   waits for (or makes) the commit first.
//! - **Opening** replays the log from its head: the price of design B, a restart time that
//!   grows with the log, where the strict map opens in O(1).
//! - **Cleaning** (`clean.rs`): when less than half the log is live, the head segment's live
//!   records are appended again at the tail and the segment is truncated away. Readers are
//!   never blocked for more than one key's relocation.
//!
//! ```
//! use nvhtm::hybrid::HybridMap;
//! use nvhtm::{Heap, PoolOptions, Volatile};
//! let heap = Heap::create_in_memory(&PoolOptions::layout("doc").with_size(8 << 20), Volatile)?;
//! let map = HybridMap::open(heap)?;
//! assert!(map.upsert(b"key", b"value")?);
//! assert_eq!(map.get(b"key")?, Some(b"value".to_vec()));
//! assert!(map.remove(b"key")?);
//! map.close()?;
//! # Ok::<(), nvhtm::MapError>(())
//! ```

mod clean;
mod index;
mod ops;
mod replay;
#[cfg(test)]
mod tests;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use crate::heap::{Heap, HeapError};
use crate::log::{LogCore, LogOptions};
use crate::map::{MapError, Result};
use crate::persist::Domain;
use index::Index;

/// The root's magic: a hybrid map.
pub const HYBRID_MAGIC: u64 = u64::from_le_bytes(*b"NVHYBR01");

/// The root (128 bytes): magic, spare words, then the log's root at +64.
type Root = [u64; 16];
const ROOT_LOG: u64 = 64;

/// Record kinds.
const PUT: u32 = 1;
const DELETE: u32 = 2;
/// A record's payload: kind (u32), key length (u32), the key, then the value (a put's).
const PAYLOAD_HEADER: usize = 8;
/// Where a record's payload starts, from the record's pool offset (after the log's header).
const PAYLOAD: u64 = 16;

/// Longest value of the hybrid map.
pub const MAX_VALUE: usize = 32 << 20;

/// The hybrid map's counts.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct HybridStats {
    /// Live entries.
    pub entries: u64,
    /// Bytes of records in the log (head to tail).
    pub log_bytes: u64,
    /// Bytes of the live entries' records.
    pub live_bytes: u64,
    /// The log's segments.
    pub segments: u64,
    /// Records appended since the map was opened.
    pub appends: u64,
    /// Group commits since the map was opened.
    pub commits: u64,
    /// Segments cleaned since the map was opened.
    pub cleaned_segments: u64,
    /// How long the replay at open took, in milliseconds.
    pub replay_ms: f64,
}

/// A hash map of byte keys and values: records in a persistent log, the index in DRAM.
pub struct HybridMap<D: Domain> {
    log: LogCore,
    index: Index,
    /// Bytes of the records the index points to.
    live_bytes: AtomicU64,
    /// Held while cleaning (and by `for_each`, which must not see a record twice).
    cleaner: Mutex<()>,
    cleaned: AtomicU64,
    replay_ms: f64,
    heap: Heap<D>,
}

impl<D: Domain> std::fmt::Debug for HybridMap<D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HybridMap").field("heap", &self.heap).finish_non_exhaustive()
    }
}

impl<D: Domain> HybridMap<D> {
    /// Opens the hybrid map the heap holds (replaying its log into the index), or creates
    /// one with the default segment size in a heap without a root.
    pub fn open(heap: Heap<D>) -> Result<HybridMap<D>> {
        HybridMap::open_with(heap, LogOptions::default())
    }

    /// [`open`](HybridMap::open), creating the map's log with `opts`.
    pub fn open_with(heap: Heap<D>, opts: LogOptions) -> Result<HybridMap<D>> {
        let root = heap
            .root::<Root>()
            .map_err(|e| match e {
                HeapError::RootSize { .. } => MapError::NotAMap(e.to_string()),
                e => MapError::Heap(e),
            })?
            .offset();
        match heap.raw_pool().load_u64(root, Ordering::Acquire)? {
            HYBRID_MAGIC => {}
            0 => heap.transaction(|tx| {
                LogCore::format(tx, root + ROOT_LOG, opts.segment_size)?;
                tx.write(crate::PPtr::<u64>::new(root), &HYBRID_MAGIC)?;
                Ok::<_, MapError>(())
            })?,
            crate::map::MAP_MAGIC => return Err(MapError::NotAMap("the pool holds a strict map".into())),
            crate::periodic::PERIODIC_MAGIC => {
                return Err(MapError::NotAMap("the pool holds a periodic map".into()))
            }
            other => return Err(MapError::NotAMap(format!("root magic {other:#018x}"))),
        }
        let started = std::time::Instant::now();
        let log = LogCore::open(&heap, root + ROOT_LOG)?;
        let map = HybridMap {
            log,
            index: Index::new(crate::map::secret_seed()),
            live_bytes: AtomicU64::new(0),
            cleaner: Mutex::new(()),
            cleaned: AtomicU64::new(0),
            replay_ms: 0.0,
            heap,
        };
        map.replay()?;
        Ok(HybridMap { replay_ms: started.elapsed().as_secs_f64() * 1000.0, ..map })
    }

    /// The number of entries.
    pub fn len(&self) -> Result<u64> {
        Ok(self.index.len())
    }

    /// Whether the map holds no entry.
    pub fn is_empty(&self) -> Result<bool> {
        Ok(self.index.len() == 0)
    }

    /// Counts.
    pub fn stats(&self) -> Result<HybridStats> {
        Ok(HybridStats {
            entries: self.index.len(),
            log_bytes: self.log.bytes(),
            live_bytes: self.live_bytes.load(Ordering::Relaxed),
            segments: self.log.segments() as u64,
            appends: self.log.appends.load(Ordering::Relaxed),
            commits: self.log.commits.load(Ordering::Relaxed),
            cleaned_segments: self.cleaned.load(Ordering::Relaxed),
            replay_ms: self.replay_ms,
        })
    }

    /// The heap the map lives in.
    pub fn heap(&self) -> &Heap<D> {
        &self.heap
    }

    /// Closes the map (its log marked closed at its tail), its heap and pool.
    pub fn close(self) -> Result<()> {
        self.log.close(&self.heap)?;
        Ok(self.heap.close()?)
    }
}

/// A record's payload split: kind, key, value.
fn parse(payload: &[u8]) -> Option<(u32, &[u8], &[u8])> {
    let kind = u32::from_le_bytes(payload.get(..4)?.try_into().ok()?);
    let key_len = u32::from_le_bytes(payload.get(4..8)?.try_into().ok()?) as usize;
    let key = payload.get(PAYLOAD_HEADER..PAYLOAD_HEADER.checked_add(key_len)?)?;
    let value = &payload[PAYLOAD_HEADER + key_len..];
    match kind {
        PUT => Some((kind, key, value)),
        DELETE if value.is_empty() => Some((kind, key, value)),
        _ => None,
    }
}

/// The header of the record at `offset`: (payload length, key length).
fn header_at<D: Domain>(pool: &crate::Pool<D>, offset: u64) -> Result<(usize, usize)> {
    let words: [u32; 6] = pool.read(offset)?;
    Ok((words[0] as usize, words[5] as usize))
}

/// The bytes the record at `offset` takes in the log.
fn record_size_at<D: Domain>(pool: &crate::Pool<D>, offset: u64) -> crate::log::Result<u64> {
    let (len, _) = header_at(pool, offset).map_err(|e| match e {
        MapError::Heap(h) => crate::log::LogError::Heap(h),
        other => crate::log::LogError::Corrupt(other.to_string()),
    })?;
    Ok(crate::log::record_size(len))
}

/// Whether the record at `offset` holds `key`.
fn key_eq<D: Domain>(pool: &crate::Pool<D>, offset: u64, key: &[u8]) -> Result<bool> {
    let (_, key_len) = header_at(pool, offset)?;
    Ok(key_len == key.len() && pool.bytes_eq(offset + PAYLOAD + PAYLOAD_HEADER as u64, key)?)
}
