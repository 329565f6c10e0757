//! DRAM state of the strict map: per-segment locks, versions and summaries; reading segment
//! headers and finding (and locking) the segment that owns a hash.

use super::*;

/// DRAM lock, version and summary of one segment.
#[derive(Debug, Default)]
pub(super) struct SegLocks {
    pub(super) lock: Mutex<()>,
    pub(super) version: AtomicU64,
    /// Built from media on first use under the lock, then kept by writers.
    pub(super) summary: OnceLock<Summary>,
}

/// What DRAM knows of a segment's keys.
#[derive(Debug)]
pub(super) struct Summary {
    /// Per home bucket, a 64-bit summary of the keys homed there (one bit per value of their
    /// low 6 hash bits), kept exact (a write that fails after setting a bit leaves it, which only
    /// costs a probe): set before a key is committed, recomputed when one is
    /// removed or moved by a split. A lookup whose bit is clear is a miss without touching
    /// persistent memory.
    pub(super) homes: Box<[AtomicU64]>,
    /// Live keys (changed under the segment's lock).
    pub(super) live: AtomicU64,
}

impl Summary {
    pub(super) fn new(homes: Vec<u64>, live: u64) -> Summary {
        Summary { homes: homes.into_iter().map(AtomicU64::new).collect(), live: AtomicU64::new(live) }
    }
}

/// A segment whose lock this thread holds, with its DRAM state.
pub(super) struct Held<'a> {
    pub(super) segment: Segment,
    pub(super) summary: &'a Summary,
    pub(super) _lock: MutexGuard<'a, ()>,
}

/// Segment locks by segment id, created on first use; lock-free to look up.
pub(super) struct SegTable {
    pub(super) pages: Vec<OnceLock<Box<[SegLocks]>>>,
}

pub(super) const LOCK_PAGE: u64 = 1024;

impl SegTable {
    pub(super) fn new() -> SegTable {
        SegTable { pages: (0..4096).map(|_| OnceLock::new()).collect() }
    }

    pub(super) fn get(&self, id: u64) -> Option<&SegLocks> {
        let page = self.pages.get((id / LOCK_PAGE) as usize)?;
        let page = page.get_or_init(|| (0..LOCK_PAGE).map(|_| SegLocks::default()).collect());
        page.get((id % LOCK_PAGE) as usize)
    }
}

/// Makes a segment's version even again when a writer is done, even on an error.
pub(super) struct Writing<'a>(&'a AtomicU64);

impl<'a> Writing<'a> {
    pub(super) fn start(version: &'a AtomicU64) -> Writing<'a> {
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
pub(super) struct Segment {
    pub(super) at: u64,
    pub(super) depth: u64,
    pub(super) pattern: u64,
    pub(super) id: u64,
}

impl Segment {
    pub(super) fn owns(&self, hash: Hash) -> bool {
        hash.prefix(self.depth) == self.pattern
    }
}

impl<D: Domain> StrictMap<D> {
    /// Reads a segment header.
    pub(super) fn segment(&self, at: u64) -> Result<Segment> {
        let [magic, depth, pattern, id]: [u64; 4] = self.heap.raw_pool().read(at)?;
        if magic != SEG_MAGIC || depth > MAX_DEPTH {
            return Err(MapError::Corrupt(format!("no segment at {at:#x}")));
        }
        Ok(Segment { at, depth, pattern, id })
    }

    /// The segment the directory names for `hash` now (may be stale by the time it is used).
    /// `None` when a split swapped the directory while it was being read: read it again.
    pub(super) fn locate(&self, hash: Hash) -> Result<Option<Segment>> {
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
    pub(super) fn dir_depth(&self, dir: u64) -> Result<u64> {
        let depth = self.load(dir + 8)?;
        if depth > MAX_DEPTH {
            return Err(MapError::Corrupt(format!("directory depth {depth}")));
        }
        Ok(depth)
    }

    /// A segment named by directory entry `j` of a directory of depth `global`, checked.
    pub(super) fn entry_segment(&self, dir: u64, global: u64, j: u64) -> Result<Segment> {
        let segment = self.segment(self.load(dir + DIR_HEADER + 8 * j)?)?;
        if segment.depth > global {
            return Err(MapError::Corrupt(format!("segment {:#x} is deeper than the directory", segment.at)));
        }
        Ok(segment)
    }

    pub(super) fn locks(&self, segment: &Segment) -> Result<&SegLocks> {
        self.segments.get(segment.id).ok_or_else(|| MapError::Corrupt(format!("segment id {}", segment.id)))
    }

    /// The segment's summary, built from media if this is its first use. The caller holds the
    /// segment's lock.
    pub(super) fn summary_locked<'a>(&self, segment: &Segment, locks: &'a SegLocks) -> Result<&'a Summary> {
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
    pub(super) fn resummarise(&self, held: &Held, home: u64) -> Result<()> {
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

    /// The segment that owns `hash`, locked (the directory is read again if a split moved the
    /// hash meanwhile).
    pub(super) fn lock_owner(&self, hash: Hash) -> Result<(Segment, &SegLocks, MutexGuard<'_, ()>)> {
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
}
