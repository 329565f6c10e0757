//! Iteration, counts, statistics and the structural check.

use std::collections::BTreeSet;

use super::dir::Seg;
use super::ops::Entries;
use super::*;

/// Counts of the map's shape.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct PeriodicStats {
    /// Live entries.
    pub entries: u64,
    /// Segments.
    pub segments: u64,
    /// Directory depth.
    pub global_depth: u64,
    /// Buckets.
    pub buckets: u64,
    /// Entries over bucket capacity (buckets × [`MAX_ENTRIES`]).
    pub load_factor: f64,
    /// The most entries in one bucket (the longest a lookup searches).
    pub longest_bucket: u64,
    /// Segments split since the map was opened.
    pub splits: u64,
    /// The current epoch.
    pub epoch: u64,
    /// The last durable epoch.
    pub durable: u64,
    /// Arena chunks taken from the heap.
    pub arena_chunks: u64,
    /// Bytes of arena slots in use.
    pub arena_used_bytes: u64,
}

/// What [`PeriodicMap::check`] found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PeriodicCheck {
    /// Blocks named by buckets.
    pub blocks: u64,
    /// Blocks waiting for an epoch to become durable before reuse.
    pub pending: u64,
    /// Blocks of failed epochs that buckets still name (dropped by their next write).
    pub failed_blocks: u64,
    /// Segments.
    pub segments: u64,
    /// What is wrong (empty when consistent).
    pub problems: Vec<String>,
}

impl<D: Domain> Inner<D> {
    /// The owned entries of every bucket of `seg`, read under each bucket's lock.
    fn segment_entries(&self, seg: &Seg) -> Result<Entries> {
        let mut all = Vec::new();
        for b in 0..BUCKETS {
            seg.lock(b);
            let entries = self
                .read_bucket_locked(seg, b)
                .and_then(|(status, heads)| self.bucket_entries(seg, status, heads));
            seg.unlock(b);
            all.extend(entries?);
        }
        Ok(all)
    }
}

impl<D: Domain> PeriodicMap<D> {
    /// Calls `visit(key, value)` for every entry until it returns `false`, one segment at a
    /// time (a snapshot of each bucket under its lock), in hash order: weakly consistent with
    /// concurrent writers; a key present throughout is visited once. `visit` may use the map,
    /// `sync` included: the walk holds no epoch (it copies each bucket's valid block under the
    /// bucket's lock, and a block named by its bucket is never reclaimed).
    pub fn for_each(&self, mut visit: impl FnMut(&[u8], &[u8]) -> bool) -> Result<()> {
        let inner = &*self.inner;
        inner.dir.for_each_segment(&inner.heap, |seg| {
            Ok(inner.segment_entries(seg)?.iter().all(|(k, v)| visit(k, v)))
        })
    }

    /// Every entry (see [`for_each`](PeriodicMap::for_each)).
    pub fn entries(&self) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        let mut all = Vec::new();
        self.for_each(|k, v| {
            all.push((k.to_vec(), v.to_vec()));
            true
        })?;
        Ok(all)
    }

    /// The number of entries (a walk of every bucket).
    pub fn len(&self) -> Result<u64> {
        let mut n = 0;
        self.for_each(|_, _| {
            n += 1;
            true
        })?;
        Ok(n)
    }

    /// Whether the map holds no entry.
    pub fn is_empty(&self) -> Result<bool> {
        let mut empty = true;
        self.for_each(|_, _| {
            empty = false;
            false
        })?;
        Ok(empty)
    }

    /// Removes every entry; returns how many there were. Each removal is an operation of its
    /// own (a crash may keep a prefix of them, like any other history).
    pub fn clear(&self) -> Result<u64> {
        let keys: Vec<Vec<u8>> = self.entries()?.into_iter().map(|(k, _)| k).collect();
        for k in &keys {
            self.remove(k)?;
        }
        Ok(keys.len() as u64)
    }

    /// Counts of the map's shape.
    pub fn stats(&self) -> Result<PeriodicStats> {
        let inner = &*self.inner;
        let mut stats = PeriodicStats::default();
        inner.dir.for_each_segment(&inner.heap, |seg| {
            stats.segments += 1;
            for b in 0..BUCKETS {
                seg.lock(b);
                let n = inner
                    .read_bucket_locked(seg, b)
                    .and_then(|(status, heads)| inner.bucket_entries(seg, status, heads))
                    .map(|e| e.len() as u64);
                seg.unlock(b);
                let n = n?;
                stats.entries += n;
                stats.longest_bucket = stats.longest_bucket.max(n);
            }
            Ok(true)
        })?;
        stats.buckets = stats.segments * BUCKETS;
        stats.load_factor = stats.entries as f64 / (stats.buckets * MAX_ENTRIES as u64) as f64;
        stats.global_depth = u64::from(inner.dir.depth());
        stats.splits = inner.dir.splits();
        (stats.epoch, stats.durable) = self.epochs();
        let arena = inner.arena.stats();
        (stats.arena_chunks, stats.arena_used_bytes) = (arena.chunks, arena.used_bytes);
        Ok(stats)
    }

    /// The arena's counts.
    pub fn arena_stats(&self) -> ArenaStats {
        self.inner.arena.stats()
    }

    /// Checks the structure against the arena and the heap (run it on a quiescent, synced map,
    /// after [`wait_for_scan`](PeriodicMap::wait_for_scan)): every block a bucket names is a slot in
    /// use of an arena chunk, named once, and decodes (the valid ones); every entry is owned by
    /// its segment and in its bucket; the arena's slots in use are exactly the named blocks and
    /// those pending reuse; the heap's blocks are exactly the map's.
    pub fn check(&self) -> Result<PeriodicCheck> {
        let inner = &*self.inner;
        let mut report = PeriodicCheck::default();
        let mut named = BTreeSet::new();
        inner.dir.for_each_segment(&inner.heap, |seg| {
            report.segments += 1;
            for b in 0..BUCKETS {
                let (status, heads) = inner.read_bucket_locked(seg, b)?;
                let valid = status.valid(|e| inner.is_failed(e));
                for i in status.in_use() {
                    if heads[i] == 0 {
                        continue;
                    }
                    if !named.insert(heads[i]) {
                        report.problems.push(format!("block {:#x} is named twice", heads[i]));
                    }
                    match inner.arena.is_used(heads[i]) {
                        Ok(true) => {}
                        Ok(false) => report.problems.push(format!("block {:#x} is named but free", heads[i])),
                        Err(e) => report.problems.push(e.to_string()),
                    }
                    let failed = (i == status.a && inner.is_failed(status.epoch))
                        || (Some(i) == status.f && inner.is_failed(status.epoch - 1));
                    report.failed_blocks += u64::from(failed);
                    if i == valid {
                        let bytes = inner.read_block(heads[i])?;
                        match decode_block(&bytes) {
                            Ok(entries) => {
                                for (k, _) in entries {
                                    if inner.hash(k).bucket() != b {
                                        report.problems.push(format!("{k:?} is in bucket {b}, not its own"));
                                    }
                                }
                            }
                            Err(e) => report.problems.push(format!("block {:#x}: {e}", heads[i])),
                        }
                    }
                }
            }
            Ok(true)
        })?;
        report.blocks = named.len() as u64;
        report.pending = lock(&inner.pending).iter().map(|(_, b)| b.len() as u64).sum();
        let arena = inner.arena.stats();
        if arena.used_slots != report.blocks + report.pending {
            report.problems.push(format!(
                "{} arena slots in use, but buckets name {} and {} wait for reuse: a leak",
                arena.used_slots, report.blocks, report.pending
            ));
        }
        let heap = inner.heap.check(&mut |_, _| {});
        if !heap.is_consistent() {
            report.problems.push(format!("heap: {:?}", heap.problems));
        }
        let failed_list = u64::from(inner.load(inner.root + ROOT_FAILED)? != 0);
        // Root, directory, chunk table, failed list, segments, arena chunks.
        let expected = 3 + failed_list + report.segments + arena.chunks;
        if heap.small_blocks + heap.large_blocks != expected {
            report.problems.push(format!(
                "the heap holds {} blocks, the map {expected}: a leak",
                heap.small_blocks + heap.large_blocks
            ));
        }
        Ok(report)
    }
}
