//! The write path: inserts, updates and removals under the segment lock, committed with at
//! most two fences when one meta word changes, through the heap's redo log otherwise.

use super::*;

/// The heap changes committed with a slot: a record to allocate, one to free.
pub(super) struct RecordChange {
    pub(super) adopt: Option<crate::heap::Reservation>,
    pub(super) free: Option<u64>,
}

/// A key's slot to write into the free slot `to`, releasing `from` in the same commit.
#[derive(Debug, Clone, Copy)]
pub(super) struct Placement {
    pub(super) hash: Hash,
    pub(super) to: (u64, u64),
    pub(super) words: [u64; 4],
    pub(super) from: Option<(u64, u64)>,
}

/// At most `N` pairs of words, on the stack (the write paths allocate nothing on the Rust heap).
#[derive(Debug, Clone, Copy)]
pub(super) struct Pairs<const N: usize> {
    pub(super) items: [(u64, u64); N],
    pub(super) len: usize,
}

impl<const N: usize> Pairs<N> {
    pub(super) fn new() -> Pairs<N> {
        Pairs { items: [(0, 0); N], len: 0 }
    }

    /// Appends a pair; the callers never hold more than `N` (a bound of their protocol, not of
    /// the data they read).
    pub(super) fn push(&mut self, pair: (u64, u64)) {
        assert!(self.len < N, "more than {N} pairs");
        self.items[self.len] = pair;
        self.len += 1;
    }

    pub(super) fn as_slice(&self) -> &[(u64, u64)] {
        &self.items[..self.len]
    }

    pub(super) fn as_mut_slice(&mut self) -> &mut [(u64, u64)] {
        &mut self.items[..self.len]
    }
}

/// A slot written and ready to commit.
pub(super) struct Prepared {
    /// Ranges to make durable before the commit: the slot, a raised reach, and (for a heap
    /// commit) the fingerprint.
    pub(super) before_commit: Pairs<3>,
    /// Meta words to store at the commit, by bucket: the new slot's and the released one's.
    pub(super) metas: Pairs<2>,
}

/// How a write ended: done, or the window is full and the segment must split first.
pub(super) enum Outcome<R> {
    Done(R),
    Split,
}

impl<R> Outcome<R> {
    /// `Done(result)` if `place` placed the key, else `Split`.
    pub(super) fn placed(placed: bool, result: R) -> Outcome<R> {
        if placed {
            Outcome::Done(result)
        } else {
            Outcome::Split
        }
    }
}

pub(super) fn is_inline(key: &[u8], value: &[u8]) -> bool {
    key.len() <= INLINE_KEY && value.len() <= INLINE_VALUE
}

impl<D: Domain> StrictMap<D> {
    /// Runs `op` on the segment owning `key`, locked and marked as being written; splits and
    /// retries when `op` finds the window full.
    pub(super) fn write<R>(
        &self,
        key: &[u8],
        mut op: impl FnMut(&mut Held, Hash) -> Result<Outcome<R>>,
    ) -> Result<R> {
        // A FAMS sync waits for the whole operation, its splits included.
        let _writer = self.heap.raw_pool().enter_writer();
        let hash = self.hash(key);
        loop {
            let mut held = self.hold(hash)?;
            let segment = held.segment;
            let outcome = {
                let _writing = Writing::start(&held.locks.version);
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
    pub(super) fn free_slot(&self, held: &Held, hash: Hash) -> Result<Option<(u64, u64)>> {
        let first_free_in_window = || {
            (0..WINDOW)
                .map(|i| hash.bucket(i))
                .find_map(|bucket| first_free(held.view.meta(bucket)).map(|slot| (bucket, slot)))
        };
        if let Some(free) = first_free_in_window() {
            return Ok(Some(free));
        }
        if !self.clear_stale(held, (0..WINDOW).map(|i| hash.bucket(i)))? {
            return Ok(None);
        }
        // A cleared slot's bit must be clear on media before new bytes go into the slot:
        // otherwise a crash could show them under the stale bit.
        self.heap.raw_pool().fence()?;
        Ok(first_free_in_window())
    }

    /// Clears the occupancy bits of slots in `buckets` whose keys the segment no longer owns
    /// (flushed, not fenced). Returns whether it cleared any.
    pub(super) fn clear_stale(&self, held: &Held, buckets: impl Iterator<Item = u64>) -> Result<bool> {
        let mut cleared = false;
        for bucket in buckets {
            let mut stale = 0;
            for slot in occupied(held.view.meta(bucket)) {
                if !held.segment.owns(self.slot_hash(&held.view, bucket, slot)) {
                    stale |= 1 << slot;
                }
            }
            self.clear_slots(&held.view, held.locks, bucket, stale)?;
            cleared |= stale != 0;
        }
        Ok(cleared)
    }

    /// Clears the occupancy bits `mask` of `bucket` (flushed, not fenced).
    pub(super) fn clear_slots(&self, view: &SegView, locks: &SegLocks, bucket: u64, mask: u64) -> Result<()> {
        if mask != 0 {
            locks.debug_assert_writing();
            let at = bucket_offset(view.at, bucket);
            let pool = self.heap.raw_pool();
            pool.store_u64(at, view.meta(bucket) & !mask, Ordering::Release)?;
            pool.flush(at, 8)?;
        }
        Ok(())
    }

    /// Writes `key`/`value` into a new slot of the window and commits it, replacing `old` if
    /// given, failure-atomically. Returns `false` if the window is full.
    pub(super) fn place(
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
                held.locks.debug_assert_writing();
                let at = slot_offset(segment.at, found.bucket, found.slot) + 16;
                let mut word = [0u8; 8];
                word[..value.len()].copy_from_slice(value);
                pool.store_u64(at, u64::from_le_bytes(word), Ordering::Release)?;
                pool.persist(at, 8)?;
                return Ok(true);
            }
        }
        let old_slot = old.map(|f| (f.bucket, f.slot));
        let free = match self.free_slot(held, hash)? {
            Some(free) => Some(free),
            None => self.displace(held, hash, old_slot)?,
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
                [
                    k0,
                    k1,
                    u64::from_le_bytes(value8),
                    with_hint(info(KIND_INLINE, key.len(), value.len()), hash),
                ]
            }
            Some(r) => [hash.0, r.offset(), 0, info(KIND_RECORD, 0, 0)],
        };
        let records = RecordChange { adopt: record, free: old.map(|f| f.record).filter(|&r| r != 0) };
        let placement = Placement { hash, to: (bucket, slot), words, from: old_slot };
        // Readers retry while this segment is being written, so the summary may cover the key
        // before its commit (a failed commit leaves a bit that only costs a probe).
        held.summary.homes[hash.home() as usize].fetch_or(hash.summary_bit(), Ordering::Release);
        self.commit_slot(held, placement, records)?;
        if old.is_none() {
            held.summary.live.fetch_add(1, Ordering::Relaxed);
        }
        Ok(true)
    }

    /// Makes room in the full window of `hash` by moving one key that lies in it, and whose own
    /// window reaches past it, to a free slot past it (one heap commit flips both meta words).
    /// `keep` is a slot that must not move. Returns the slot it freed.
    pub(super) fn displace(
        &self,
        held: &Held,
        hash: Hash,
        keep: Option<(u64, u64)>,
    ) -> Result<Option<(u64, u64)>> {
        let home = hash.home();
        // From the window's far end: keys homed late in it reach farthest past it.
        for offset in (1..WINDOW).rev() {
            let from = hash.bucket(offset);
            let (segment, view) = (&held.segment, &held.view);
            let meta = view.meta(from);
            for slot in occupied(meta).filter(|&s| Some((from, s)) != keep) {
                let moving = self.slot_hash(view, from, slot);
                let behind = distance(home, moving.home());
                if behind == 0 || behind > offset || !segment.owns(moving) {
                    continue;
                }
                // Buckets past this window that are still in the moving key's window.
                for to in (WINDOW - behind..WINDOW).map(|i| moving.bucket(i)) {
                    let Some(to_slot) = first_free(view.meta(to)) else {
                        continue;
                    };
                    let words = view.slot(from, slot);
                    let records = RecordChange { adopt: None, free: None };
                    let placement =
                        Placement { hash: moving, to: (to, to_slot), words, from: Some((from, slot)) };
                    self.commit_slot(held, placement, records)?;
                    return Ok(Some((from, slot)));
                }
            }
        }
        Ok(None)
    }

    /// Writes a placement's slot with its fingerprint and commits it, releasing its old slot and
    /// making `records`' heap changes in the same commit, failure-atomically.
    pub(super) fn commit_slot(&self, held: &Held, placement: Placement, records: RecordChange) -> Result<()> {
        held.locks.debug_assert_writing();
        let pool = self.heap.raw_pool();
        let segment = &held.segment;
        let bucket = placement.to.0;
        let Prepared { mut before_commit, metas } = match self.prepare_slot(held, placement) {
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
    pub(super) fn prepare_slot(&self, held: &Held, placement: Placement) -> Result<Prepared> {
        let (segment, view) = (&held.segment, &held.view);
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
        metas.push((bucket, view.meta(bucket) | 1 << slot));
        if let Some((old_bucket, old_slot)) = from {
            match metas.as_mut_slice().iter_mut().find(|(bk, _)| *bk == old_bucket) {
                Some(entry) => entry.1 &= !(1 << old_slot),
                None => metas.push((old_bucket, view.meta(old_bucket) & !(1 << old_slot))),
            }
        }
        let distance = distance(home, bucket);
        if distance > 0 {
            match metas.as_mut_slice().iter_mut().find(|(bk, _)| *bk == home) {
                Some(entry) => entry.1 = with_reach(entry.1, distance),
                None => {
                    let homed = bucket_offset(segment.at, home);
                    let meta = view.meta(home);
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
    pub(super) fn unlink(&self, held: &mut Held, hash: Hash, found: Found) -> Result<()> {
        let pool = self.heap.raw_pool();
        let at = bucket_offset(held.segment.at, found.bucket);
        held.locks.debug_assert_writing();
        let meta = held.view.meta(found.bucket) & !(1 << found.slot);
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
        self.resummarise(held, hash.home());
        Ok(())
    }
}
