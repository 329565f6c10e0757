//! DRAM state of the strict map: per-segment locks, versions and summaries; reading segment
//! headers and finding (and locking) the segment that owns a hash.

use std::sync::atomic::AtomicPtr;

use super::*;

/// DRAM state of one segment: its lock, version and summary, and its header mirrored.
#[derive(Debug)]
pub(super) struct SegLocks {
    /// The segment's id (its index in the [`SegTable`]).
    pub(super) id: u64,
    pub(super) lock: Mutex<()>,
    /// Odd while a writer or a split changes the segment, until its commit is durable.
    pub(super) version: AtomicU64,
    /// Built from media on first use under the lock, then kept by writers.
    pub(super) summary: OnceLock<Summary>,
    /// The segment's offset (0 until a directory entry naming it is first read from media),
    /// depth and pattern, as on media. Set before the segment is reachable through the
    /// directory mirror; a split changes depth and pattern under the lock, its version odd.
    at: AtomicU64,
    depth: AtomicU64,
    pattern: AtomicU64,
}

impl SegLocks {
    fn new(id: u64) -> SegLocks {
        SegLocks {
            id,
            lock: Mutex::new(()),
            version: AtomicU64::new(0),
            summary: OnceLock::new(),
            at: AtomicU64::new(0),
            depth: AtomicU64::new(0),
            pattern: AtomicU64::new(0),
        }
    }

    /// The segment's header as DRAM knows it (stable under its lock, or between two equal
    /// even reads of its version).
    pub(super) fn header(&self) -> Segment {
        Segment {
            at: self.at.load(Ordering::Acquire),
            depth: self.depth.load(Ordering::Relaxed),
            pattern: self.pattern.load(Ordering::Relaxed),
            id: self.id,
        }
    }

    /// Records the segment's header: before it is published (a new segment, or one first
    /// named by a directory entry read from media), or by a split with its version odd.
    pub(super) fn set_header(&self, at: u64, depth: u64, pattern: u64) {
        self.depth.store(depth, Ordering::Relaxed);
        self.pattern.store(pattern, Ordering::Relaxed);
        self.at.store(at, Ordering::Release);
    }

    /// Debug builds check the rule readers rely on: a writer changes the segment only while
    /// its version is odd.
    pub(super) fn debug_assert_writing(&self) {
        debug_assert!(
            self.version.load(Ordering::Relaxed) & 1 == 1,
            "segment {} written with an even version",
            self.id
        );
    }
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

/// A segment whose lock this thread holds, with its DRAM state and a view of its words.
pub(super) struct Held<'a> {
    pub(super) segment: Segment,
    pub(super) locks: &'a SegLocks,
    pub(super) summary: &'a Summary,
    pub(super) view: SegView<'a>,
    pub(super) _lock: MutexGuard<'a, ()>,
}

/// Segment DRAM state by segment id, created on first use; lock-free to look up.
pub(super) struct SegTable {
    pub(super) pages: Vec<OnceLock<Box<[SegLocks]>>>,
}

pub(super) const LOCK_PAGE: u64 = 1024;

impl SegTable {
    pub(super) fn new() -> SegTable {
        SegTable { pages: (0..4096).map(|_| OnceLock::new()).collect() }
    }

    pub(super) fn get(&self, id: u64) -> Option<&SegLocks> {
        let page_no = id / LOCK_PAGE;
        let page = self.pages.get(page_no as usize)?;
        let page =
            page.get_or_init(|| (0..LOCK_PAGE).map(|i| SegLocks::new(page_no * LOCK_PAGE + i)).collect());
        page.get((id % LOCK_PAGE) as usize)
    }
}

/// The directory mirrored in DRAM at one depth: per entry, the DRAM state of the segment it
/// names (null until read from media, under the resize lock). Every pointer is to a
/// [`SegLocks`] of the map's own [`SegTable`], which never moves or frees one before the map is
/// dropped.
#[derive(Debug)]
pub(super) struct DirMirror {
    pub(super) depth: u64,
    segments: Box<[AtomicPtr<SegLocks>]>,
}

impl DirMirror {
    fn new(depth: u64, segments: impl Iterator<Item = *mut SegLocks>) -> DirMirror {
        DirMirror { depth, segments: segments.map(AtomicPtr::new).collect() }
    }
}

/// A pointer for a [`DirMirror`] entry.
fn entry(locks: &SegLocks) -> *mut SegLocks {
    (locks as *const SegLocks).cast_mut()
}

/// The DRAM mirror of the directory: the persistent directory stays the truth, and the mirror
/// follows it (filled lazily from media, so opening stays O(1); changed by splits, which
/// hold the resize lock and the split segment's version odd while they change it).
#[derive(Debug)]
pub(super) struct Mirror {
    /// Mirrors by depth. A doubling builds the next one and publishes its depth; the shallower
    /// ones stay allocated until the map is dropped (a reader may still index one it loaded,
    /// and they take less room together than the current one).
    by_depth: Box<[OnceLock<DirMirror>]>,
    /// The current one, one of `by_depth` (null before first use).
    current: AtomicPtr<DirMirror>,
}

impl Mirror {
    pub(super) fn new() -> Mirror {
        Mirror {
            by_depth: (0..=MAX_DEPTH).map(|_| OnceLock::new()).collect(),
            current: AtomicPtr::new(std::ptr::null_mut()),
        }
    }

    pub(super) fn current(&self) -> Option<&DirMirror> {
        let current = self.current.load(Ordering::Acquire);
        // SAFETY: non-null `current` points into a `by_depth` OnceLock set before it was published
        // (release/acquire); that boxed slice never moves and a set OnceLock is never taken, so the
        // DirMirror lives, unmoved, as long as `self`, which the returned reference borrows.
        unsafe { current.as_ref() }
    }

    /// Makes `mirror` (one of `by_depth`) the current one.
    fn publish(&self, mirror: &DirMirror) {
        self.current.store((mirror as *const DirMirror).cast_mut(), Ordering::Release);
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
    /// Reads a segment header from media, checked: its magic, its depth, and that the whole
    /// segment lies in the pool.
    pub(super) fn segment(&self, at: u64) -> Result<Segment> {
        let pool = self.heap.raw_pool();
        let [magic, depth, pattern, id]: [u64; 4] = pool.read(at)?;
        if magic != SEG_MAGIC || depth > MAX_DEPTH || pool.checked_words(at, SEGMENT_SIZE).is_err() {
            return Err(MapError::Corrupt(format!("no segment at {at:#x}")));
        }
        Ok(Segment { at, depth, pattern, id })
    }

    /// The persistent directory: its offset and depth, checked (its magic, its depth, and that
    /// its entries lie in the pool).
    pub(super) fn directory(&self) -> Result<(u64, u64)> {
        let dir = self.load(self.root + ROOT_DIR)?;
        let [magic, depth]: [u64; 2] = self.heap.raw_pool().read(dir)?;
        if magic != DIR_MAGIC
            || depth > MAX_DEPTH
            || !self.heap.raw_pool().contains(dir, DIR_HEADER + (8 << depth))
        {
            return Err(MapError::Corrupt(format!("no directory at {dir:#x}")));
        }
        Ok((dir, depth))
    }

    /// A segment named by directory entry `j` of a directory of depth `global`, checked.
    pub(super) fn entry_segment(&self, dir: u64, global: u64, j: u64) -> Result<Segment> {
        let segment = self.segment(self.load(dir + DIR_HEADER + 8 * j)?)?;
        if segment.depth > global {
            return Err(MapError::Corrupt(format!("segment {:#x} is deeper than the directory", segment.at)));
        }
        if j >> (global - segment.depth) != segment.pattern {
            return Err(MapError::Corrupt(format!(
                "directory entry {j} names segment {:#x} of pattern {:#x} at depth {}: the directory names \
                 no segment owning its hashes",
                segment.at, segment.pattern, segment.depth
            )));
        }
        Ok(segment)
    }

    /// The current directory mirror, made (with every entry unknown) on first use.
    fn mirror(&self) -> Result<&DirMirror> {
        if let Some(mirror) = self.mirror.current() {
            return Ok(mirror);
        }
        let _no_splits = lock(&self.resize);
        if let Some(mirror) = self.mirror.current() {
            return Ok(mirror);
        }
        let (_, depth) = self.directory()?;
        let mirror = self.mirror.by_depth[depth as usize]
            .get_or_init(|| DirMirror::new(depth, (0..1u64 << depth).map(|_| std::ptr::null_mut())));
        self.mirror.publish(mirror);
        Ok(mirror)
    }

    /// The DRAM state of the segment the directory names for `hash` now (it may have split by
    /// the time it is used: callers check that it owns the hash under its lock or version).
    #[inline]
    pub(super) fn owner(&self, hash: Hash) -> Result<&SegLocks> {
        if let Some(mirror) = self.mirror.current() {
            let named = mirror.segments[hash.prefix(mirror.depth) as usize].load(Ordering::Acquire);
            // SAFETY: a non-null entry points to a SegLocks of `self.segments` published after its
            // header was set (release/acquire); the table's pages (boxed slices in OnceLocks) never
            // move or go before `self`, which the returned reference borrows.
            if let Some(locks) = unsafe { named.as_ref() } {
                return Ok(locks);
            }
        }
        self.owner_from_media(hash)
    }

    /// [`owner`](Self::owner) when the mirror or its entry is not made yet.
    #[cold]
    #[inline(never)]
    fn owner_from_media(&self, hash: Hash) -> Result<&SegLocks> {
        loop {
            let mirror = self.mirror()?;
            let j = hash.prefix(mirror.depth);
            // SAFETY: as in `owner`.
            if let Some(locks) = unsafe { mirror.segments[j as usize].load(Ordering::Acquire).as_ref() } {
                return Ok(locks);
            }
            match self.fill(mirror, j)? {
                Some(locks) => return Ok(locks),
                None => continue, // a doubling replaced the mirror meanwhile
            }
        }
    }

    /// Reads directory entry `j` of `mirror` from media, checks the segment it names, and
    /// records both in DRAM. `None` if `mirror` is no longer the current one.
    fn fill(&self, mirror: &DirMirror, j: u64) -> Result<Option<&SegLocks>> {
        let _no_splits = lock(&self.resize);
        if !self.mirror.current().is_some_and(|current| std::ptr::eq(current, mirror)) {
            return Ok(None);
        }
        // SAFETY: as in `owner`.
        if let Some(locks) = unsafe { mirror.segments[j as usize].load(Ordering::Acquire).as_ref() } {
            return Ok(Some(locks));
        }
        // Splits (which change the directory) hold the resize lock: the directory on media is
        // the one the mirror follows.
        let (dir, global) = self.directory()?;
        if global != mirror.depth {
            return Err(MapError::Corrupt(format!(
                "the directory on media has depth {global}, the map's {}",
                mirror.depth
            )));
        }
        let segment = self.entry_segment(dir, global, j)?;
        let locks = self.segments.get(segment.id).ok_or_else(|| {
            MapError::Corrupt(format!("segment {:#x} has id {}, past the table", segment.at, segment.id))
        })?;
        let known = locks.header();
        if known.at == 0 {
            locks.set_header(segment.at, segment.depth, segment.pattern);
        } else if known.at != segment.at {
            return Err(MapError::Corrupt(format!(
                "segments {:#x} and {:#x} have the same id {}",
                known.at, segment.at, segment.id
            )));
        }
        mirror.segments[j as usize].store(entry(locks), Ordering::Release);
        Ok(Some(locks))
    }

    /// After a split's commit, under the resize lock: the directory mirror names the segment
    /// `new` (its header set) for the `count` entries from `first` at depth `global`, doubling
    /// the mirror first when `global` is deeper than it.
    pub(super) fn mirror_split(&self, global: u64, first: u64, count: u64, new: &SegLocks) -> Result<()> {
        let current =
            self.mirror.current().ok_or_else(|| MapError::Corrupt("a split before the mirror".into()))?;
        let named = first..first + count;
        if global == current.depth {
            for j in named {
                current.segments[j as usize].store(entry(new), Ordering::Release);
            }
            return Ok(());
        }
        if global != current.depth + 1 {
            return Err(MapError::Corrupt(format!("a split to depth {global} from {}", current.depth)));
        }
        let segments = (0..1u64 << global).map(|j| {
            if named.contains(&j) {
                entry(new)
            } else {
                current.segments[(j >> 1) as usize].load(Ordering::Relaxed)
            }
        });
        let doubled = self.mirror.by_depth[global as usize].get_or_init(|| DirMirror::new(global, segments));
        if doubled.depth != global
            || !std::ptr::eq(doubled.segments[first as usize].load(Ordering::Relaxed), new)
        {
            return Err(MapError::Corrupt(format!("the directory reached depth {global} twice")));
        }
        self.mirror.publish(doubled);
        Ok(())
    }

    /// The segment the directory names for `hash` now, as DRAM knows it (tests).
    #[cfg(test)]
    pub(super) fn locate(&self, hash: Hash) -> Result<Segment> {
        Ok(self.owner(hash)?.header())
    }

    /// The segment's summary, built from media if this is its first use. The caller holds the
    /// segment's lock.
    pub(super) fn summary_locked<'a>(&self, segment: &Segment, locks: &'a SegLocks) -> Result<&'a Summary> {
        if let Some(summary) = locks.summary.get() {
            return Ok(summary);
        }
        let view = SegView::new(self.heap.raw_pool(), segment.at)?;
        let mut homes = vec![0u64; BUCKETS as usize];
        let mut live = 0;
        for bucket in 0..BUCKETS {
            self.for_owned(&view, segment, bucket, |_, hash| {
                homes[hash.home() as usize] |= hash.summary_bit();
                live += 1;
            });
        }
        Ok(locks.summary.get_or_init(|| Summary::new(homes, live)))
    }

    /// Recomputes the summary of the keys homed at `home` from media, after one of them left:
    /// from the slots' hints (or their records' stored hashes), hashing only keys written
    /// without a hint.
    pub(super) fn resummarise(&self, held: &Held, home: u64) {
        let reach = reach(held.view.meta(home));
        let mut bits = 0;
        for bucket in (0..=reach).map(|i| (home + i) % BUCKETS) {
            for slot in occupied(held.view.meta(bucket)) {
                match self.summary_of(&held.view, &held.segment, bucket, slot) {
                    Some((key_home, bit)) if key_home == home => bits |= bit,
                    _ => {}
                }
            }
        }
        held.summary.homes[home as usize].store(bits, Ordering::Release);
    }

    /// The home bucket and summary bit of the key in an occupied slot: from its hint, or its
    /// record's stored hash, or else by hashing it; `None` for a copy the segment no longer
    /// owns, when that is known (a hinted stale copy counts, which only costs a probe).
    fn summary_of(&self, view: &SegView, segment: &Segment, bucket: u64, slot: u64) -> Option<(u64, u64)> {
        let words = view.slot(bucket, slot);
        if let Some(hinted) = hint(words[3]) {
            return Some(hinted);
        }
        let hash = match info_kind(words[3]) {
            KIND_RECORD => Hash(words[0]),
            _ => self.slot_hash(view, bucket, slot),
        };
        segment.owns(hash).then(|| (hash.home(), hash.summary_bit()))
    }

    /// The segment that owns `hash`, locked (found again if a split moved the hash meanwhile).
    pub(super) fn lock_owner(&self, hash: Hash) -> Result<(Segment, &SegLocks, MutexGuard<'_, ()>)> {
        // Each retry follows a split (at most 40 for one hash): the mirror's entries were
        // checked against the segments they name when read from media.
        for attempt in 0..128 {
            if attempt > 0 {
                std::thread::yield_now(); // let the split that moved things finish
            }
            let locks = self.owner(hash)?;
            let guard = lock(&locks.lock);
            let segment = locks.header();
            if segment.owns(hash) {
                return Ok((segment, locks, guard));
            }
        }
        Err(MapError::Corrupt(format!("the directory names no segment owning hash {:#018x}", hash.0)))
    }

    /// Locks the segment owning `hash` for a writer, with its summary and a view of its words.
    pub(super) fn hold(&self, hash: Hash) -> Result<Held<'_>> {
        let (segment, locks, guard) = self.lock_owner(hash)?;
        let summary = self.summary_locked(&segment, locks)?;
        let view = SegView::new(self.heap.raw_pool(), segment.at)?;
        Ok(Held { segment, locks, summary, view, _lock: guard })
    }
}
