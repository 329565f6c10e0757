//! The directory in DRAM: which segment owns which hash prefix, filled lazily from media (an
//! entry is read, checked and cached the first time a key routes through it), and the
//! segments' bucket locks.
//!
//! A bucket's lock word is a version: odd while a writer holds it. Writers take it; readers
//! read it before and after reading the bucket and its block, and retry if it changed. A
//! segment's depth and pattern change only while a split holds every one of its locks, so a
//! reader that validated its version saw a segment that owned its key.

use std::sync::atomic::{AtomicPtr, AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};

use super::layout::*;
use super::{lock, MapError, Result};
use crate::heap::Heap;
use crate::persist::Domain;

/// One segment: its offset, its local depth and pattern, its buckets' locks.
#[derive(Debug)]
pub(super) struct Seg {
    pub offset: u64,
    /// `depth << 56 | pattern`.
    shape: AtomicU64,
    /// Inline, not a separate allocation: a lookup misses one cache line less.
    locks: [AtomicU64; BUCKETS as usize],
}

impl Seg {
    fn new(offset: u64, depth: u32, pattern: u64) -> Seg {
        Seg {
            offset,
            shape: AtomicU64::new(u64::from(depth) << 56 | pattern),
            locks: std::array::from_fn(|_| AtomicU64::new(0)),
        }
    }

    pub fn depth(&self) -> u32 {
        (self.shape.load(Ordering::Acquire) >> 56) as u32
    }

    pub fn pattern(&self) -> u64 {
        self.shape.load(Ordering::Acquire) & ((1 << 56) - 1)
    }

    /// Whether this segment owns `hash` now.
    pub fn owns(&self, hash: Hash) -> bool {
        let shape = self.shape.load(Ordering::Acquire);
        hash.prefix((shape >> 56) as u32) == shape & ((1 << 56) - 1)
    }

    /// Called by a split holding every lock.
    pub fn set_shape(&self, depth: u32, pattern: u64) {
        self.shape.store(u64::from(depth) << 56 | pattern, Ordering::Release);
    }

    /// The bucket's version, waiting while a writer holds it.
    pub fn stable_version(&self, b: u64) -> u64 {
        let mut spins = 0u32;
        loop {
            let v = self.locks[b as usize].load(Ordering::Acquire);
            if v & 1 == 0 {
                return v;
            }
            spins += 1;
            if spins > 64 {
                std::thread::yield_now();
            } else {
                std::hint::spin_loop();
            }
        }
    }

    /// Whether the bucket's version is still `v` (after reading under it).
    pub fn validate(&self, b: u64, v: u64) -> bool {
        std::sync::atomic::fence(Ordering::Acquire);
        self.locks[b as usize].load(Ordering::Relaxed) == v
    }

    /// Takes the bucket's lock; returns the version it had.
    pub fn lock(&self, b: u64) -> u64 {
        loop {
            let v = self.stable_version(b);
            if self.locks[b as usize].compare_exchange(v, v + 1, Ordering::Acquire, Ordering::Relaxed).is_ok()
            {
                return v;
            }
        }
    }

    pub fn unlock(&self, b: u64) {
        let v = self.locks[b as usize].load(Ordering::Relaxed);
        debug_assert!(v & 1 == 1, "unlocking a bucket that is not locked");
        self.locks[b as usize].store(v + 1, Ordering::Release);
    }
}

/// One version of the directory array (a doubling makes a new one; old ones live until the
/// map is dropped, so a reader's pointer stays valid).
#[derive(Debug)]
struct DirArray {
    depth: u32,
    entries: Box<[AtomicPtr<Seg>]>,
}

/// What splits serialise on.
#[derive(Debug)]
pub(super) struct SplitState {
    /// The directory on media.
    pub media: u64,
    pub splits: u64,
}

#[derive(Debug)]
pub(super) struct Directory {
    current: AtomicPtr<DirArray>,
    // Boxed so that readers' pointers stay valid when the vectors grow.
    #[allow(clippy::vec_box)]
    arrays: Mutex<Vec<Box<DirArray>>>,
    #[allow(clippy::vec_box)]
    segs: Mutex<Vec<Box<Seg>>>,
    split: Mutex<SplitState>,
}

fn corrupt(why: String) -> MapError {
    MapError::Corrupt(why)
}

impl Directory {
    /// The directory of the media directory at `media`: its header checked, no entry read yet.
    pub fn load<D: Domain>(heap: &Heap<D>, media: u64) -> Result<Directory> {
        let pool = heap.raw_pool();
        let [magic, depth] = pool.load_words::<2>(media)?;
        if magic != DIR_MAGIC
            || depth > u64::from(MAX_DEPTH)
            || !pool.contains(media, DIR_HEADER + (8 << depth))
        {
            return Err(corrupt(format!("directory at {media:#x}: magic {magic:#x}, depth {depth}")));
        }
        let array = Box::new(DirArray { depth: depth as u32, entries: null_entries(1 << depth) });
        let current = AtomicPtr::new(&*array as *const DirArray as *mut DirArray);
        Ok(Directory {
            current,
            arrays: Mutex::new(vec![array]),
            segs: Mutex::default(),
            split: Mutex::new(SplitState { media, splits: 0 }),
        })
    }

    fn array(&self) -> &DirArray {
        // SAFETY: `current` always points into a box owned by `arrays`, which is only ever
        // appended to while the directory lives; the array is never mutated except through its
        // atomic entries.
        unsafe { &*self.current.load(Ordering::Acquire) }
    }

    /// The global depth.
    pub fn depth(&self) -> u32 {
        self.array().depth
    }

    /// The segment `hash` routes to now (it may be splitting: check [`Seg::owns`] under a
    /// validated version).
    pub fn route<D: Domain>(&self, heap: &Heap<D>, hash: Hash) -> Result<&Seg> {
        let array = self.array();
        let p = array.entries[hash.prefix(array.depth) as usize].load(Ordering::Acquire);
        if !p.is_null() {
            // SAFETY: entries point into boxes owned by `segs`, which only grows while the
            // directory lives.
            return Ok(unsafe { &*p });
        }
        let split = self.lock_split();
        self.fill(heap, &split, hash)
    }

    pub fn lock_split(&self) -> MutexGuard<'_, SplitState> {
        lock(&self.split)
    }

    /// Reads the media entry `hash` routes through, checks the segment and caches it for its
    /// whole range (the caller holds the split lock).
    pub fn fill<D: Domain>(&self, heap: &Heap<D>, split: &SplitState, hash: Hash) -> Result<&Seg> {
        let array = self.array();
        let i = hash.prefix(array.depth);
        let p = array.entries[i as usize].load(Ordering::Acquire);
        if !p.is_null() {
            // SAFETY: as in `route`.
            return Ok(unsafe { &*p });
        }
        let pool = heap.raw_pool();
        let offset = pool.load_u64(split.media + DIR_HEADER + i * 8, Ordering::Acquire)?;
        if offset % 64 != 0 || !pool.contains(offset, SEGMENT_SIZE) {
            return Err(corrupt(format!("directory entry {i} points to {offset:#x}")));
        }
        let [magic, depth, pattern] = pool.load_words::<3>(offset)?;
        let span = array.depth.checked_sub(depth as u32).filter(|_| magic == SEG_MAGIC);
        let Some(span) = span.filter(|&s| pattern == i >> s) else {
            return Err(corrupt(format!(
                "segment at {offset:#x} (entry {i}): magic {magic:#x}, depth {depth}, pattern {pattern:#x}"
            )));
        };
        let seg = Box::new(Seg::new(offset, depth as u32, pattern));
        let p = &*seg as *const Seg as *mut Seg;
        lock(&self.segs).push(seg);
        let first = pattern << span;
        for e in first..first + (1 << span) {
            array.entries[e as usize].store(p, Ordering::Release);
        }
        // SAFETY: just pushed into `segs`.
        Ok(unsafe { &*p })
    }

    /// After a split's commit (the caller holds the split lock and every lock of `old`): the
    /// new segment takes the upper half of `old`'s range, doubling the array first if `old`
    /// was as deep as the directory.
    pub fn install_split(&self, old: &Seg, new_offset: u64) -> &Seg {
        let (depth, pattern) = (old.depth(), old.pattern());
        let mut array = self.array();
        if depth == array.depth {
            let doubled = Box::new(DirArray {
                depth: array.depth + 1,
                entries: (0..array.entries.len() * 2)
                    .map(|i| AtomicPtr::new(array.entries[i / 2].load(Ordering::Acquire)))
                    .collect(),
            });
            self.current.store(&*doubled as *const DirArray as *mut DirArray, Ordering::Release);
            lock(&self.arrays).push(doubled);
            array = self.array();
        }
        let seg = Box::new(Seg::new(new_offset, depth + 1, pattern << 1 | 1));
        let p = &*seg as *const Seg as *mut Seg;
        lock(&self.segs).push(seg);
        let span = array.depth - (depth + 1);
        let first = (pattern << 1 | 1) << span;
        for e in first..first + (1 << span) {
            array.entries[e as usize].store(p, Ordering::Release);
        }
        old.set_shape(depth + 1, pattern << 1);
        // SAFETY: just pushed into `segs`.
        unsafe { &*p }
    }

    /// Calls `f` on every segment, in hash order, until it returns `false`.
    pub fn for_each_segment<D: Domain>(
        &self,
        heap: &Heap<D>,
        mut f: impl FnMut(&Seg) -> Result<bool>,
    ) -> Result<()> {
        let mut cursor = Some(0u64);
        while let Some(at) = cursor {
            let seg = self.route(heap, Hash(at))?;
            let (depth, pattern) = (seg.depth(), seg.pattern());
            if !f(seg)? {
                break;
            }
            cursor = u64::try_from((u128::from(pattern) + 1) << (64 - depth)).ok();
        }
        Ok(())
    }

    /// Splits made in this run.
    pub fn splits(&self) -> u64 {
        lock(&self.split).splits
    }
}

fn null_entries(n: usize) -> Box<[AtomicPtr<Seg>]> {
    (0..n).map(|_| AtomicPtr::new(std::ptr::null_mut())).collect()
}
