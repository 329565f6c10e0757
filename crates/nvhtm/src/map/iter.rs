//! Iteration, counts and statistics.

use super::*;

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

impl<D: Domain> StrictMap<D> {
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
    pub(super) fn walk<T>(
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
    pub(super) fn segment_entries(&self, segment: &Segment) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        let pool = self.heap.raw_pool();
        let view = SegView::new(pool, segment.at)?;
        let mut slots = Vec::new();
        for bucket in 0..BUCKETS {
            self.for_owned(&view, segment, bucket, |slot, _| slots.push((bucket, slot)));
        }
        let mut entries = Vec::with_capacity(slots.len());
        for (bucket, slot) in slots {
            {
                let words = view.slot(bucket, slot);
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
            }
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
        let (dir, global) = self.directory()?;
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
