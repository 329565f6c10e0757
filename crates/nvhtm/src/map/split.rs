//! Splitting a segment whose window is full.

use super::*;

/// The loads at which segments split since the map was opened.
#[derive(Debug, Default)]
pub(super) struct Splits {
    pub(super) count: u64,
    pub(super) load_sum: f64,
    pub(super) load_min: f64,
}

impl<D: Domain> StrictMap<D> {
    /// Splits `segment` (as it was seen when its window filled).
    pub(super) fn split(&self, seen: Segment) -> Result<()> {
        let mut splits = lock(&self.resize);
        let locks =
            self.segments.get(seen.id).ok_or_else(|| MapError::Corrupt(format!("segment id {}", seen.id)))?;
        let _guard = lock(&locks.lock);
        let segment = locks.header();
        if segment.depth != seen.depth {
            return Ok(()); // someone split it meanwhile
        }
        let summary = self.summary_locked(&segment, locks)?;
        let _writing = Writing::start(&locks.version);
        let pool = self.heap.raw_pool();
        let view = SegView::new(pool, segment.at)?;
        let (depth, pattern) = (segment.depth, segment.pattern);
        // The live entries that move (their next hash bit is 1), where they were, and the
        // summaries of both halves.
        let capacity = (BUCKETS * SLOTS) as usize;
        let mut moving: Vec<(Hash, (u64, u64))> = Vec::with_capacity(capacity);
        let mut moving_words: Vec<[u64; 4]> = Vec::with_capacity(capacity);
        let mut moved = vec![0u8; BUCKETS as usize];
        let mut staying_homes = vec![0u64; BUCKETS as usize];
        let mut live = 0u64;
        let mut moving_homes = vec![0u64; BUCKETS as usize];
        for bucket in 0..BUCKETS {
            self.for_owned(&view, &segment, bucket, |slot, hash| {
                live += 1;
                if hash.prefix(depth + 1) & 1 == 1 {
                    moving.push((hash, (bucket, slot)));
                    moving_words.push(view.slot(bucket, slot));
                    moved[bucket as usize] |= 1 << slot;
                    moving_homes[hash.home() as usize] |= hash.summary_bit();
                } else {
                    staying_homes[hash.home() as usize] |= hash.summary_bit();
                }
            });
        }
        let (dir, global) = self.directory()?;
        // The writer that found the window full came through the mirror, so it exists.
        let mirrored = self.mirror.current().map(|mirror| mirror.depth);
        if mirrored != Some(global) {
            return Err(MapError::Corrupt(format!(
                "the directory on media has depth {global}, the map's {mirrored:?}"
            )));
        }
        let next_id = self.load(self.root + ROOT_NEXT_ID)?;
        if depth + 1 > MAX_DEPTH {
            return Err(MapError::Limit(format!(
                "a full window's keys share a {depth}-bit hash prefix, the deepest a directory goes"
            )));
        }
        let Some(new_locks) = self.segments.get(next_id) else {
            return Err(MapError::Limit(format!("{next_id} segments, the most one map can have")));
        };
        if new_locks.header().at != 0 {
            return Err(MapError::Corrupt(format!("the next segment id {next_id} is in use")));
        }
        let (root, new_pattern) = (self.root, pattern << 1 | 1);
        let (new, new_global, first, count) = self.heap.transaction(|tx| {
            // Only the header, the bucket headers and the moved slots need writing: a slot's
            // bytes mean nothing while its occupancy bit is clear. The new block is reachable
            // only once the transaction commits (and given back if it aborts), so these are
            // plain stores; the commit makes the lines they touch durable before its commit
            // point. They are named in address order, bucket by bucket, each bucket's lines from
            // its first to its last slot written (moved keys are packed from their homes).
            let new = tx.alloc_uninit(SEGMENT_SIZE)?;
            let pool = tx.heap().raw_pool();
            pool.write(new, &[SEG_MAGIC, depth + 1, new_pattern, next_id])?;
            tx.flush_on_commit(new, 32)?;
            let mut metas = vec![0u64; BUCKETS as usize];
            let mut fingerprints = vec![[0u8; 8]; BUCKETS as usize];
            let mut ends = vec![16u64; BUCKETS as usize];
            for ((&(hash, _), words), (bucket, slot)) in
                moving.iter().zip(&moving_words).zip(pack_moved(&moving))
            {
                let home = hash.home();
                pool.write(slot_offset(new, bucket, slot), words)?;
                metas[bucket as usize] |= 1 << slot;
                fingerprints[bucket as usize][slot as usize] = hash.fingerprint();
                metas[home as usize] = with_reach(metas[home as usize], distance(home, bucket));
                let end = &mut ends[bucket as usize];
                *end = (*end).max(slot_offset(0, 0, slot) - 64 + 32);
            }
            for bucket in 0..BUCKETS {
                let at = bucket_offset(new, bucket);
                pool.write(at, &[metas[bucket as usize], u64::from_le_bytes(fingerprints[bucket as usize])])?;
                tx.flush_on_commit(at, ends[bucket as usize])?;
            }
            // Directory entries whose prefix at depth + 1 is the new pattern point at the new
            // segment; the directory doubles first when it is no deeper than the segment. The
            // directory's words come first in the redo log, so while it is applied no reader
            // finds the segment deeper than the directory it read it through (unless it read
            // the old one).
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
            Ok::<_, HeapError>((new, new_global, first, count))
        })?;
        // Committed: DRAM follows first, so that it is right whatever happens below.
        for (word, bits) in summary.homes.iter().zip(staying_homes) {
            word.store(bits, Ordering::Release);
        }
        summary.live.store(live - moving.len() as u64, Ordering::Relaxed);
        // The new segment is complete in DRAM before the mirror names it.
        new_locks.set_header(new, depth + 1, new_pattern);
        let _ = new_locks.summary.set(Summary::new(moving_homes, moving.len() as u64));
        if let Err(e) = self.mirror_split(new_global, first, count, new_locks) {
            // DRAM no longer follows media: only reopening the pool may judge it.
            pool.poison(format!("the map's directory mirror failed a split: {e}"));
            return Err(e);
        }
        // Readers that found this segment for a moved hash retry (its version is odd), then
        // see it own only its half.
        locks.set_header(segment.at, depth + 1, pattern << 1);
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
            self.clear_slots(&view, locks, bucket, u64::from(mask))?;
        }
        pool.fence()?; // site: split-clearing (cross-thread: see above)
        Ok(())
    }
}
