//! Failure-atomic transactions.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

use bytemuck::Pod;

use super::error::{HeapError, Result};
use super::lane::LaneLog;
use super::layout::REDO_CAP;
use super::space::Run;
use super::{lock, Block, Heap, LaneSlot, PoisonOnPanic, Reservation};
use crate::persist::Domain;
use crate::pool::PPtr;

/// A transaction in progress (see [`Heap::transaction`]). Changes made through it are
/// all-or-nothing: ranges are snapshotted into the lane's undo log before they change,
/// allocations and frees take effect at commit through the redo log.
pub struct Tx<'h, D: Domain> {
    heap: &'h Heap<D>,
    lane: MutexGuard<'h, LaneSlot>,
    gen: u64,
    /// The lane's state word says this generation is active (persisted with the next fence).
    began: bool,
    undo_tail: u64,
    /// Snapshotted ranges, start → end, to skip snapshotting them twice.
    covered: BTreeMap<u64, u64>,
    /// Old contents, oldest first, for an abort.
    snapshots: Vec<(u64, Vec<u8>)>,
    /// Ranges written, to flush at commit.
    dirty: Vec<(u64, u64)>,
    allocs: Vec<Reservation>,
    frees: Vec<Block>,
    words: Vec<(u64, u64)>,
}

impl<D: Domain> std::fmt::Debug for Tx<'_, D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tx")
            .field("gen", &self.gen)
            .field("snapshots", &self.snapshots.len())
            .field("allocs", &self.allocs.len())
            .field("frees", &self.frees.len())
            .finish_non_exhaustive()
    }
}

impl<'h, D: Domain> Tx<'h, D> {
    pub(super) fn begin(heap: &'h Heap<D>, lane: MutexGuard<'h, LaneSlot>) -> Tx<'h, D> {
        let gen = lane.gen + 1;
        Tx {
            heap,
            lane,
            gen,
            began: false,
            undo_tail: 0,
            covered: BTreeMap::new(),
            snapshots: Vec::new(),
            dirty: Vec::new(),
            allocs: Vec::new(),
            frees: Vec::new(),
            words: Vec::new(),
        }
    }

    /// The heap this transaction runs on.
    pub fn heap(&self) -> &'h Heap<D> {
        self.heap
    }

    /// Reads the object `ptr` points to (including changes made in this transaction).
    pub fn read<T: Pod>(&self, ptr: PPtr<T>) -> Result<T> {
        self.heap.get(ptr)
    }

    fn check_range(&self, offset: u64, len: u64) -> Result<()> {
        let start = self.heap.header.chunks_offset;
        match offset.checked_add(len) {
            Some(end) if offset >= start && end <= self.heap.pool.size() => Ok(()),
            _ => Err(HeapError::InvalidRange { offset, len, why: "not inside the heap's chunks" }),
        }
    }

    fn in_new_block(&self, offset: u64, len: u64) -> bool {
        self.allocs.iter().any(|r| offset >= r.offset && offset + len <= r.offset + r.size)
    }

    fn is_covered(&self, offset: u64, len: u64) -> bool {
        self.covered.range(..=offset).next_back().is_some_and(|(_, &end)| end >= offset + len)
    }

    fn activate(&mut self) -> Result<()> {
        if !self.began {
            self.lane.log.debug_assert_unused(&self.heap.pool, self.gen);
            self.lane.log.activate(&self.heap.pool, self.gen)?;
            self.began = true;
        }
        Ok(())
    }

    /// Snapshots `offset..offset + len` into the undo log (durably: one fence) so it can be
    /// changed. Ranges already snapshotted, and blocks allocated in this transaction, are
    /// skipped.
    pub fn add_range(&mut self, offset: u64, len: u64) -> Result<()> {
        self.add_ranges(&[(offset, len)])
    }

    /// Snapshots several ranges with a single fence: cheaper than one
    /// [`add_range`](Tx::add_range) each when a transaction knows what it will change.
    pub fn add_ranges(&mut self, ranges: &[(u64, u64)]) -> Result<()> {
        let mut appended = false;
        for &(offset, len) in ranges {
            self.check_range(offset, len)?;
            if len == 0 || self.is_covered(offset, len) || self.in_new_block(offset, len) {
                continue;
            }
            self.activate()?;
            let mut old = vec![0u8; len as usize];
            self.heap.pool.read_into(offset, &mut old)?;
            self.lane.log.append_undo(&self.heap.pool, self.gen, &mut self.undo_tail, offset, &old)?;
            let end = self.covered.get(&offset).copied().unwrap_or(0).max(offset + len);
            self.covered.insert(offset, end);
            self.snapshots.push((offset, old));
            self.dirty.push((offset, len));
            appended = true;
        }
        if appended {
            // The snapshots must be durable before any covered byte changes.
            self.heap.pool.fence()?;
        }
        Ok(())
    }

    /// Writes `bytes` at `offset`, snapshotting the range first.
    pub fn write_bytes(&mut self, offset: u64, bytes: &[u8]) -> Result<()> {
        let len = bytes.len() as u64;
        self.check_range(offset, len)?;
        if self.in_new_block(offset, len) {
            self.dirty.push((offset, len));
        } else {
            self.add_range(offset, len)?;
        }
        Ok(self.heap.pool.write_bytes(offset, bytes)?)
    }

    /// Writes the object `ptr` points to, snapshotting it first.
    pub fn write<T: Pod>(&mut self, ptr: PPtr<T>, value: &T) -> Result<()> {
        self.write_bytes(ptr.offset(), bytemuck::bytes_of(value))
    }

    /// Allocates a zeroed block of at least `size` bytes; it is allocated on media only if the
    /// transaction commits.
    pub fn alloc_bytes(&mut self, size: u64) -> Result<u64> {
        let reservation = self.heap.reserve_in(&mut self.lane, size)?;
        let offset = reservation.offset;
        let zeroed = self.heap.pool.write_bytes(offset, &vec![0u8; size as usize]);
        self.dirty.push((offset, size));
        self.allocs.push(reservation);
        zeroed?;
        Ok(offset)
    }

    /// Allocates a block of at least `size` bytes without initialising it: its bytes are
    /// whatever a previous owner left. Only what the transaction writes into it (through
    /// [`write_bytes`](Tx::write_bytes), which needs no snapshot there) is made durable.
    pub fn alloc_uninit(&mut self, size: u64) -> Result<u64> {
        let reservation = self.heap.reserve_in(&mut self.lane, size)?;
        let offset = reservation.offset;
        self.allocs.push(reservation);
        Ok(offset)
    }

    /// Allocates a block holding `value`.
    pub fn alloc<T: Pod>(&mut self, value: &T) -> Result<PPtr<T>> {
        let offset = self.alloc_bytes(std::mem::size_of::<T>() as u64)?;
        self.heap.pool.write(offset, value)?;
        Ok(PPtr::new(offset))
    }

    /// Frees the block at `offset` when the transaction commits.
    pub fn free(&mut self, offset: u64) -> Result<()> {
        if let Some(i) = self.allocs.iter().position(|r| r.offset == offset) {
            let reservation = self.allocs.swap_remove(i);
            self.heap.cancel(reservation);
            return Ok(());
        }
        let block = self.heap.mark_free(offset)?;
        self.frees.push(block);
        Ok(())
    }

    /// Frees the object `ptr` points to when the transaction commits.
    pub fn free_ptr<T>(&mut self, ptr: PPtr<T>) -> Result<()> {
        self.free(ptr.offset())
    }

    /// Stores `value` in the aligned word at `offset` at commit, through the redo log: no
    /// snapshot, atomic with everything else the transaction does.
    pub fn redo_store(&mut self, offset: u64, value: u64) -> Result<()> {
        self.check_range(offset, 8)?;
        if offset % 8 != 0 {
            return Err(HeapError::InvalidRange {
                offset,
                len: 8,
                why: "a redo word must be 8-byte aligned",
            });
        }
        self.words.push((offset, value));
        Ok(())
    }

    /// Makes `offset..offset + len` (written outside the transaction, e.g. a slot that a redo
    /// word will publish) durable before the commit point.
    pub fn flush_on_commit(&mut self, offset: u64, len: u64) -> Result<()> {
        self.check_range(offset, len)?;
        self.dirty.push((offset, len));
        Ok(())
    }

    /// A redo word of the heap's own metadata (the root).
    pub(super) fn push_word(&mut self, offset: u64, value: u64) {
        self.words.push((offset, value));
    }

    /// Takes over a reservation made outside the transaction: the block becomes allocated if
    /// the transaction commits (its whole usable size is made durable first), and is given back
    /// if it aborts.
    pub fn adopt(&mut self, reservation: Reservation) {
        self.dirty.push((reservation.offset, reservation.size));
        self.allocs.push(reservation);
    }

    fn is_empty(&self) -> bool {
        self.snapshots.is_empty() && self.allocs.is_empty() && self.frees.is_empty() && self.words.is_empty()
    }

    /// Commit: flush what was written and fence (the data must be durable before anything says
    /// it is committed); write the redo log (allocations, frees, redo words) and fence — the
    /// commit point; apply it and fence; retire and fence. With an empty redo log the retirement
    /// needs no fence of its own (replaying an empty log is harmless).
    pub(super) fn commit(mut self) -> Result<()> {
        if self.is_empty() {
            return Ok(());
        }
        let heap = self.heap;
        let pool = &heap.pool;
        let _armed = PoisonOnPanic(pool);
        self.activate()?;
        for (offset, len) in dirty_lines(&mut self.dirty) {
            pool.flush(offset, len)?;
        }
        if !self.dirty.is_empty() {
            pool.fence()?;
        }
        let allocs: Vec<Block> = self.allocs.iter().map(|r| r.kind).collect();
        let touches_chunks = allocs.iter().chain(&self.frees).any(|b| matches!(b, Block::Large { .. }));
        let mut chunks = touches_chunks.then(|| lock(&heap.chunks));
        let arcs: BTreeMap<u32, Arc<Mutex<Run>>> = allocs
            .iter()
            .chain(&self.frees)
            .filter_map(|b| match *b {
                Block::Small { chunk, .. } => heap.run(chunk).map(|run| (chunk, run)),
                Block::Large { .. } => None,
            })
            .collect();
        // Runs are locked in chunk order, after the chunk lock: no deadlock between commits.
        let mut runs: BTreeMap<u32, MutexGuard<'_, Run>> =
            arcs.iter().map(|(&c, run)| (c, lock(run))).collect();
        // Everything that can fail for another reason than the device is checked before the
        // commit point; such a failure aborts the transaction like an error of its body.
        let prepared =
            heap.allocation_entries(chunks.as_deref(), &runs, &allocs, &self.frees).and_then(|(mut e, h)| {
                e.extend_from_slice(&self.words);
                if e.len() > REDO_CAP {
                    return Err(HeapError::RedoLogFull { needed: e.len(), capacity: REDO_CAP });
                }
                Ok((e, h))
            });
        let (entries, heads) = match prepared {
            Ok(prepared) => prepared,
            Err(e) => {
                drop(runs);
                drop(chunks);
                self.abort()?;
                return Err(e);
            }
        };
        self.lane.log.write_redo(pool, self.gen, &entries)?;
        pool.fence()?;
        // Committed: the chunk mirror follows the media.
        if let Some(chunks) = chunks.as_deref_mut() {
            for &(chunk, head) in &heads {
                chunks.mirror.insert(chunk, head);
            }
        }
        if entries.is_empty() {
            self.lane.log.retire_lazily(pool, self.gen)?;
        } else {
            LaneLog::apply(pool, &entries)?;
            pool.fence()?;
            self.lane.log.retire(pool, self.gen)?;
            pool.fence()?;
        }
        self.lane.gen = self.gen;
        for block in std::mem::take(&mut self.frees) {
            match block {
                Block::Small { chunk, index } => {
                    if let Some(run) = runs.get_mut(&chunk) {
                        run.freeing[(index / 64) as usize] &= !(1 << (index % 64));
                        run.release(index);
                        if !run.listed && !run.owned {
                            run.listed = true;
                            lock(&heap.classes[run.class]).push(chunk);
                        }
                    }
                }
                Block::Large { chunk, chunks: k } => {
                    if let Some(chunks) = chunks.as_deref_mut() {
                        chunks.freeing.remove(&chunk);
                        chunks.give_back(chunk, k);
                    }
                }
            }
        }
        self.allocs.clear();
        Ok(())
    }

    /// Abort: restore the snapshots (newest first) and fence, retire, give back reservations
    /// and forget pending frees.
    pub(super) fn abort(mut self) -> Result<()> {
        let heap = self.heap;
        let _armed = PoisonOnPanic(&heap.pool);
        let restored = (|| -> Result<()> {
            if !self.snapshots.is_empty() {
                for (offset, old) in self.snapshots.iter().rev() {
                    heap.pool.write_bytes(*offset, old)?;
                    heap.pool.flush(*offset, old.len() as u64)?;
                }
                heap.pool.fence()?;
            }
            if self.began {
                // Durable before another lane may change the restored ranges: otherwise a crash
                // could replay this undo log over that lane's committed data.
                self.lane.log.retire(&heap.pool, self.gen)?;
                heap.pool.fence()?;
            }
            Ok(())
        })();
        if self.began {
            self.lane.gen = self.gen;
        }
        for reservation in std::mem::take(&mut self.allocs) {
            heap.cancel(reservation);
        }
        for block in std::mem::take(&mut self.frees) {
            heap.unmark_free(block);
        }
        restored
    }
}

/// The cache lines `ranges` touch, as sorted, merged line-aligned ranges: each line is flushed
/// once however many writes touched it.
pub(crate) fn dirty_lines(ranges: &mut [(u64, u64)]) -> Vec<(u64, u64)> {
    const LINE: u64 = crate::persist::CACHE_LINE as u64;
    ranges.sort_unstable();
    let mut merged: Vec<(u64, u64)> = Vec::new();
    for &(offset, len) in ranges.iter().filter(|r| r.1 > 0) {
        let (start, end) = (offset / LINE * LINE, (offset + len).div_ceil(LINE) * LINE);
        match merged.last_mut() {
            Some((last, last_len)) if start <= *last + *last_len => {
                *last_len = (*last_len).max(end - *last);
            }
            _ => merged.push((start, end - start)),
        }
    }
    merged
}

#[cfg(test)]
mod tests {
    use super::dirty_lines;

    #[test]
    fn dirty_ranges_become_each_line_once() {
        let mut ranges = vec![(200, 8), (64, 32), (96, 32), (0, 0), (130, 1), (1000, 64), (1024, 8)];
        // 64..128 twice, 130 in 128..192, 200 in 192..256 (adjacent: merged), 1000..1064 and
        // 1024 share lines 960..1088.
        assert_eq!(dirty_lines(&mut ranges), vec![(64, 192), (960, 128)]);
    }
}
