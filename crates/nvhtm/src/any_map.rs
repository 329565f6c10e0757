//! Either map, as the pool's root says: the CLI's map commands and the server work on both.

use std::time::Duration;

use crate::heap::Heap;
use crate::hybrid::{HybridMap, HYBRID_MAGIC};
use crate::map::{MapError, Result, MAP_MAGIC};
use crate::periodic::{PeriodicMap, PeriodicOptions, PERIODIC_MAGIC};
use crate::{Domain, StrictMap};

/// Which map a pool holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum MapKind {
    /// [`StrictMap`]: every operation durable when it returns.
    Strict,
    /// [`PeriodicMap`]: durable within two epochs, or at `sync`.
    Periodic,
    /// [`HybridMap`]: a DRAM index over a persistent log; every operation durable when it
    /// returns, the log replayed at open.
    Hybrid,
}

impl std::fmt::Display for MapKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            MapKind::Strict => "strict",
            MapKind::Periodic => "periodic",
            MapKind::Hybrid => "hybrid",
        })
    }
}

impl MapKind {
    /// The map the heap's root holds; `None` for a heap without a root yet.
    ///
    /// ```
    /// use nvhtm::any_map::MapKind;
    /// use nvhtm::{Heap, PoolOptions, StrictMap, Volatile};
    /// let heap = Heap::create_in_memory(&PoolOptions::layout("doc").with_size(4 << 20), Volatile)?;
    /// assert_eq!(MapKind::of(&heap)?, None);
    /// let map = StrictMap::open(heap)?;
    /// assert_eq!(MapKind::of(map.heap())?, Some(MapKind::Strict));
    /// # Ok::<(), nvhtm::MapError>(())
    /// ```
    pub fn of<D: Domain>(heap: &Heap<D>) -> Result<Option<MapKind>> {
        let Some((root, size)) = heap.existing_root()? else { return Ok(None) };
        let magic = if size >= 8 { heap.get(crate::PPtr::<u64>::new(root))? } else { 0 };
        match magic {
            MAP_MAGIC => Ok(Some(MapKind::Strict)),
            PERIODIC_MAGIC => Ok(Some(MapKind::Periodic)),
            HYBRID_MAGIC => Ok(Some(MapKind::Hybrid)),
            other => Err(MapError::NotAMap(format!("the root ({size} bytes) starts with {other:#018x}"))),
        }
    }
}

/// The map in a pool, whichever it is.
#[derive(Debug)]
pub enum AnyMap<D: Domain> {
    /// A strict map (boxed: its DRAM mirror makes it much larger than the periodic handle).
    Strict(Box<StrictMap<D>>),
    /// A periodic map.
    Periodic(PeriodicMap<D>),
    /// A hybrid map (boxed: its index and log handles are larger than the periodic handle).
    Hybrid(Box<HybridMap<D>>),
}

/// The shape of either map, for `stats`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct AnyStats {
    /// Which map.
    pub kind: MapKind,
    /// Live entries.
    pub entries: u64,
    /// Segments (of the hybrid map: its log's).
    pub segments: u64,
    /// Directory depth.
    pub global_depth: u64,
    /// Entries over capacity (of the hybrid map: the live share of its log).
    pub load_factor: f64,
    /// The most entries in one bucket (periodic).
    pub longest_bucket: Option<u64>,
    /// The epoch length recorded in the map (periodic).
    pub epoch_ms: Option<f64>,
    /// The current and the last durable epoch (periodic).
    pub epochs: Option<(u64, u64)>,
    /// The log's counts (hybrid).
    pub log: Option<crate::hybrid::HybridStats>,
}

impl<D: Domain> AnyMap<D> {
    /// Opens the map the heap holds; in a heap without one, creates a `new` one (a periodic
    /// one with `periodic`'s options, which also apply when opening one).
    ///
    /// ```
    /// use nvhtm::any_map::{AnyMap, MapKind};
    /// use nvhtm::periodic::PeriodicOptions;
    /// use nvhtm::{Heap, PoolOptions, Volatile};
    /// let heap = Heap::create_in_memory(&PoolOptions::layout("doc").with_size(8 << 20), Volatile)?;
    /// let map = AnyMap::open(heap, MapKind::Periodic, PeriodicOptions::manual())?;
    /// map.upsert(b"k", b"v")?;
    /// assert_eq!((map.kind(), map.get(b"k")?), (MapKind::Periodic, Some(b"v".to_vec())));
    /// map.close()?;
    /// # Ok::<(), nvhtm::MapError>(())
    /// ```
    pub fn open(heap: Heap<D>, new: MapKind, periodic: PeriodicOptions) -> Result<AnyMap<D>> {
        Ok(match MapKind::of(&heap)?.unwrap_or(new) {
            MapKind::Strict => AnyMap::Strict(Box::new(StrictMap::open(heap)?)),
            MapKind::Periodic => AnyMap::Periodic(PeriodicMap::open(heap, periodic)?),
            MapKind::Hybrid => AnyMap::Hybrid(Box::new(HybridMap::open(heap)?)),
        })
    }

    /// Which map this is.
    pub fn kind(&self) -> MapKind {
        match self {
            AnyMap::Strict(_) => MapKind::Strict,
            AnyMap::Periodic(_) => MapKind::Periodic,
            AnyMap::Hybrid(_) => MapKind::Hybrid,
        }
    }

    /// The heap the map lives in.
    pub fn heap(&self) -> &Heap<D> {
        match self {
            AnyMap::Strict(m) => m.heap(),
            AnyMap::Periodic(m) => m.heap(),
            AnyMap::Hybrid(m) => m.heap(),
        }
    }

    /// The value of `key`.
    pub fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>> {
        match self {
            AnyMap::Strict(m) => m.get(key),
            AnyMap::Periodic(m) => m.get(key),
            AnyMap::Hybrid(m) => m.get(key),
        }
    }

    /// Calls `read` with the value of `key`, if present, without copying it out of the map
    /// first.
    ///
    /// ```
    /// use nvhtm::any_map::{AnyMap, MapKind};
    /// use nvhtm::periodic::PeriodicOptions;
    /// use nvhtm::{Heap, PoolOptions, Volatile};
    /// for kind in [MapKind::Strict, MapKind::Periodic, MapKind::Hybrid] {
    ///     let heap = Heap::create_in_memory(&PoolOptions::layout("doc").with_size(8 << 20), Volatile)?;
    ///     let map = AnyMap::open(heap, kind, PeriodicOptions::manual())?;
    ///     map.upsert(b"k", b"value")?;
    ///     assert_eq!(map.get_with(b"k", |v| v.len())?, Some(5));
    ///     assert_eq!(map.get_with(b"absent", |v| v.len())?, None);
    ///     map.close()?;
    /// }
    /// # Ok::<(), nvhtm::MapError>(())
    /// ```
    pub fn get_with<R>(&self, key: &[u8], read: impl FnOnce(&[u8]) -> R) -> Result<Option<R>> {
        match self {
            AnyMap::Strict(m) => m.get_with(key, read),
            AnyMap::Periodic(m) => m.get_with(key, read),
            AnyMap::Hybrid(m) => m.get_with(key, read),
        }
    }

    /// Inserts or replaces; `true` if the key was new.
    pub fn upsert(&self, key: &[u8], value: &[u8]) -> Result<bool> {
        match self {
            AnyMap::Strict(m) => m.upsert(key, value),
            AnyMap::Periodic(m) => m.upsert(key, value),
            AnyMap::Hybrid(m) => m.upsert(key, value),
        }
    }

    /// Inserts `key` if absent; `false` (nothing changed) if it was present.
    pub fn insert(&self, key: &[u8], value: &[u8]) -> Result<bool> {
        match self {
            AnyMap::Strict(m) => m.insert(key, value),
            AnyMap::Periodic(m) => m.insert(key, value),
            AnyMap::Hybrid(m) => m.insert(key, value),
        }
    }

    /// Replaces the value of `key` with `new` (`None`: remove) if it is `expected` (`None`:
    /// absent); the current value when it was not.
    ///
    /// ```
    /// use nvhtm::any_map::{AnyMap, MapKind};
    /// use nvhtm::periodic::PeriodicOptions;
    /// use nvhtm::{Heap, PoolOptions, Volatile};
    /// let heap = Heap::create_in_memory(&PoolOptions::layout("doc").with_size(8 << 20), Volatile)?;
    /// let map = AnyMap::open(heap, MapKind::Strict, PeriodicOptions::manual())?;
    /// assert_eq!(map.compare_and_swap(b"k", None, Some(b"1"))?, Ok(()));
    /// assert_eq!(map.compare_and_swap(b"k", None, Some(b"2"))?, Err(Some(b"1".to_vec())));
    /// # Ok::<(), nvhtm::MapError>(())
    /// ```
    pub fn compare_and_swap(
        &self,
        key: &[u8],
        expected: Option<&[u8]>,
        new: Option<&[u8]>,
    ) -> Result<Result<(), Option<Vec<u8>>>> {
        match self {
            AnyMap::Strict(m) => m.compare_and_swap(key, expected, new),
            AnyMap::Periodic(m) => m.compare_and_swap(key, expected, new),
            AnyMap::Hybrid(m) => m.compare_and_swap(key, expected, new),
        }
    }

    /// The number of entries.
    pub fn len(&self) -> Result<u64> {
        match self {
            AnyMap::Strict(m) => m.len(),
            AnyMap::Periodic(m) => m.len(),
            AnyMap::Hybrid(m) => m.len(),
        }
    }

    /// Whether the map holds no entry.
    pub fn is_empty(&self) -> Result<bool> {
        match self {
            AnyMap::Strict(m) => m.is_empty(),
            AnyMap::Periodic(m) => m.is_empty(),
            AnyMap::Hybrid(m) => m.is_empty(),
        }
    }

    /// Removes `key`; whether it was present.
    pub fn remove(&self, key: &[u8]) -> Result<bool> {
        match self {
            AnyMap::Strict(m) => m.remove(key),
            AnyMap::Periodic(m) => m.remove(key),
            AnyMap::Hybrid(m) => m.remove(key),
        }
    }

    /// Calls `visit` for every entry until it returns `false`.
    pub fn for_each(&self, visit: impl FnMut(&[u8], &[u8]) -> bool) -> Result<()> {
        match self {
            AnyMap::Strict(m) => m.for_each(visit),
            AnyMap::Periodic(m) => m.for_each(visit),
            AnyMap::Hybrid(m) => m.for_each(visit),
        }
    }

    /// Removes every entry; how many there were. Not atomic in any of the maps: each removal
    /// is an operation of its own, so a crash during `clear` may keep any part of the entries
    /// (in the periodic map, a prefix of the removals; writes made meanwhile by other threads
    /// may or may not be removed).
    ///
    /// ```
    /// use nvhtm::any_map::{AnyMap, MapKind};
    /// use nvhtm::periodic::PeriodicOptions;
    /// use nvhtm::{Heap, PoolOptions, Volatile};
    /// for kind in [MapKind::Strict, MapKind::Periodic, MapKind::Hybrid] {
    ///     let heap = Heap::create_in_memory(&PoolOptions::layout("doc").with_size(8 << 20), Volatile)?;
    ///     let map = AnyMap::open(heap, kind, PeriodicOptions::manual())?;
    ///     map.upsert(b"a", b"1")?;
    ///     map.upsert(b"b", b"2")?;
    ///     assert_eq!(map.clear()?, 2);
    ///     assert!(map.is_empty()?);
    ///     map.close()?;
    /// }
    /// # Ok::<(), nvhtm::MapError>(())
    /// ```
    pub fn clear(&self) -> Result<u64> {
        match self {
            AnyMap::Strict(m) => m.clear(),
            AnyMap::Periodic(m) => m.clear(),
            AnyMap::Hybrid(m) => m.clear(),
        }
    }

    /// Makes every completed operation durable (a no-op for the strict and hybrid maps: they
    /// are).
    pub fn sync(&self) -> Result<()> {
        match self {
            AnyMap::Strict(_) | AnyMap::Hybrid(_) => Ok(()),
            AnyMap::Periodic(m) => m.sync(),
        }
    }

    /// The map's shape.
    pub fn stats(&self) -> Result<AnyStats> {
        Ok(match self {
            AnyMap::Strict(m) => {
                let s = m.stats()?;
                AnyStats {
                    kind: MapKind::Strict,
                    entries: s.entries,
                    segments: s.segments,
                    global_depth: s.global_depth,
                    load_factor: s.load_factor,
                    longest_bucket: None,
                    epoch_ms: None,
                    epochs: None,
                    log: None,
                }
            }
            AnyMap::Periodic(m) => {
                let s = m.stats()?;
                AnyStats {
                    kind: MapKind::Periodic,
                    entries: s.entries,
                    segments: s.segments,
                    global_depth: s.global_depth,
                    load_factor: s.load_factor,
                    longest_bucket: Some(s.longest_bucket),
                    epoch_ms: Some(m.stored_epoch()?.as_secs_f64() * 1000.0),
                    epochs: Some((s.epoch, s.durable)),
                    log: None,
                }
            }
            AnyMap::Hybrid(m) => {
                let s = m.stats()?;
                AnyStats {
                    kind: MapKind::Hybrid,
                    entries: s.entries,
                    segments: s.segments,
                    global_depth: 0,
                    load_factor: if s.log_bytes == 0 {
                        1.0
                    } else {
                        s.live_bytes as f64 / s.log_bytes as f64
                    },
                    longest_bucket: None,
                    epoch_ms: None,
                    epochs: None,
                    log: Some(s),
                }
            }
        })
    }

    /// Closes the map (the periodic one syncs first), its heap and pool.
    pub fn close(self) -> Result<()> {
        match self {
            AnyMap::Strict(m) => m.close(),
            AnyMap::Periodic(m) => m.close(),
            AnyMap::Hybrid(m) => m.close(),
        }
    }
}

/// How long a periodic map's epochs last, from milliseconds (at least 1 µs).
///
/// ```
/// assert_eq!(nvhtm::any_map::epoch_from_ms(2.5).as_micros(), 2500);
/// ```
pub fn epoch_from_ms(ms: f64) -> Duration {
    Duration::from_secs_f64((ms / 1000.0).max(1e-6))
}
