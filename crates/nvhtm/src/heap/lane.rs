//! Lanes: per-thread persistent logs. Each lane has a state word, a redo log and an undo log.
//!
//! The state word is `gen << 1 | active`. An operation with generation `gen`:
//! 1. sets the state to `gen | active` (persisted with the first undo entry, or with step 2);
//! 2. optionally appends undo entries (each persisted before the range it covers changes);
//! 3. commits by writing its redo entries and the redo header `{gen, count, checksum}`: once that
//!    header is persistent the operation is committed;
//! 4. applies the redo entries (8-byte stores) and persists them;
//! 5. retires by setting the state to `gen` (inactive).
//!
//! Recovery of a lane whose state is active: a valid redo header of the same generation means
//! committed, so the redo entries are applied again (they are absolute values, and no other lane
//! touched their words before retirement); otherwise the undo entries of that generation are
//! restored, newest first. Both are idempotent, so a crash during recovery is recovered the same
//! way.
//!
//! **No generation is used twice**, across crashes too. An operation with generation `h` writes
//! to its lane only after the state word's *durable* generation is at least `h - 1` (the
//! previous operation's activation or retirement was fenced before it returned), so after a
//! crash nothing on media carries a generation above `state + 1`: the in-flight operation may
//! have left a redo header or undo entries of `state + 1` without its activation reaching
//! media. Recovery therefore retires every lane — idle ones too — at `state + 1`, and the
//! caller fences that before the heap is used: the next operation takes `state + 2`, which no
//! leftover can match (docs/design.md, "Generations across crashes").

use std::sync::atomic::Ordering;

use xxhash_rust::xxh3::Xxh3;

use super::error::{HeapError, Result};
use super::layout::{REDO_CAP, REDO_ENTRIES, REDO_HEADER, UNDO_ENTRY_HEADER, UNDO_START};
use crate::persist::Domain;
use crate::pool::{Pool, HEADER_SIZE};

/// Where a lane lives in the pool.
#[derive(Debug, Clone, Copy)]
pub(crate) struct LaneLog {
    pub base: u64,
    pub size: u64,
}

/// What recovery did to a lane.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LaneRecovery {
    /// The lane was idle.
    Idle,
    /// A committed operation was completed: this many redo entries applied.
    RolledForward(usize),
    /// An uncommitted transaction was undone: this many snapshots restored.
    RolledBack(usize),
}

fn redo_checksum(gen: u64, entries: &[(u64, u64)]) -> u64 {
    let mut h = Xxh3::new();
    h.update(&gen.to_le_bytes());
    h.update(&(entries.len() as u64).to_le_bytes());
    for (off, value) in entries {
        h.update(&off.to_le_bytes());
        h.update(&value.to_le_bytes());
    }
    h.digest()
}

fn undo_checksum(gen: u64, offset: u64, data: &[u8]) -> u64 {
    let mut h = Xxh3::new();
    h.update(&gen.to_le_bytes());
    h.update(&offset.to_le_bytes());
    h.update(&(data.len() as u64).to_le_bytes());
    h.update(data);
    h.digest()
}

impl LaneLog {
    pub fn undo_capacity(&self) -> u64 {
        self.size - UNDO_START
    }

    /// `(generation, active)` from the state word.
    pub fn state<D: Domain>(&self, pool: &Pool<D>) -> Result<(u64, bool)> {
        let word = pool.load_u64(self.base, Ordering::Acquire)?;
        Ok((word >> 1, word & 1 == 1))
    }

    /// Marks generation `gen` active (flushed, not fenced: the caller's next fence persists it).
    #[track_caller]
    pub fn activate<D: Domain>(&self, pool: &Pool<D>, gen: u64) -> Result<()> {
        pool.store_u64(self.base, gen << 1 | 1, Ordering::Release)?;
        Ok(pool.flush(self.base, 8)?)
    }

    /// Marks generation `gen` retired (flushed, not fenced).
    #[track_caller]
    pub fn retire<D: Domain>(&self, pool: &Pool<D>, gen: u64) -> Result<()> {
        pool.store_u64(self.base, gen << 1, Ordering::Release)?;
        Ok(pool.flush(self.base, 8)?)
    }

    /// Marks generation `gen` retired without writing it back: for an operation whose redo log
    /// is empty, where replaying it after a crash is harmless (the next activation or any
    /// write-back makes it durable).
    pub fn retire_lazily<D: Domain>(&self, pool: &Pool<D>, gen: u64) -> Result<()> {
        Ok(pool.store_u64(self.base, gen << 1, Ordering::Release)?)
    }

    /// Appends an undo entry at `*tail` (an offset in the undo area) and flushes it; the caller
    /// fences before changing the range.
    #[track_caller]
    pub fn append_undo<D: Domain>(
        &self,
        pool: &Pool<D>,
        gen: u64,
        tail: &mut u64,
        offset: u64,
        data: &[u8],
    ) -> Result<()> {
        let len = data.len() as u64;
        let needed = UNDO_ENTRY_HEADER + len.next_multiple_of(8);
        if *tail + needed > self.undo_capacity() {
            return Err(HeapError::UndoLogFull { needed: *tail + needed, capacity: self.undo_capacity() });
        }
        let at = self.base + UNDO_START + *tail;
        let header = [gen, offset, len, undo_checksum(gen, offset, data)];
        pool.write(at, &header)?;
        pool.write_bytes(at + UNDO_ENTRY_HEADER, data)?;
        pool.flush(at, needed)?;
        *tail += needed;
        Ok(())
    }

    /// Writes the redo entries and the header that commits them (flushed, not fenced).
    #[track_caller]
    pub fn write_redo<D: Domain>(&self, pool: &Pool<D>, gen: u64, entries: &[(u64, u64)]) -> Result<()> {
        if entries.len() > REDO_CAP {
            return Err(HeapError::RedoLogFull { needed: entries.len(), capacity: REDO_CAP });
        }
        let words: Vec<u64> = entries.iter().flat_map(|&(o, v)| [o, v]).collect();
        if !words.is_empty() {
            pool.write_bytes(self.base + REDO_ENTRIES, bytemuck::cast_slice(&words))?;
            pool.flush(self.base + REDO_ENTRIES, words.len() as u64 * 8)?;
        }
        // The generation first, in a store of its own, then count and checksum: one copy's
        // words may persist in any order, and recovery reads a header of a later generation as
        // "the previous operation finished" (it may have retired lazily, its state word still
        // active). A header whose new count or checksum persisted without its new generation
        // would look like a torn commit record of that finished operation, and roll it back.
        pool.store_u64(self.base + REDO_HEADER, gen, Ordering::Release)?;
        pool.write(self.base + REDO_HEADER + 8, &[entries.len() as u64, redo_checksum(gen, entries)])?;
        Ok(pool.flush(self.base + REDO_HEADER, 24)?)
    }

    /// The committed redo entries of generation `gen`, if its header is valid.
    fn committed_redo<D: Domain>(&self, pool: &Pool<D>, gen: u64) -> Result<Option<Vec<(u64, u64)>>> {
        let [hgen, count, checksum]: [u64; 3] = pool.read(self.base + REDO_HEADER)?;
        if hgen != gen || count as usize > REDO_CAP {
            return Ok(None);
        }
        let mut words = vec![0u64; count as usize * 2];
        pool.read_into(self.base + REDO_ENTRIES, bytemuck::cast_slice_mut(&mut words))?;
        let entries: Vec<(u64, u64)> = words.chunks_exact(2).map(|w| (w[0], w[1])).collect();
        Ok((redo_checksum(gen, &entries) == checksum).then_some(entries))
    }

    /// The valid undo entries of generation `gen`, oldest first.
    fn undo_entries<D: Domain>(&self, pool: &Pool<D>, gen: u64) -> Result<Vec<(u64, Vec<u8>)>> {
        let mut entries = Vec::new();
        let mut tail = 0;
        while tail + UNDO_ENTRY_HEADER <= self.undo_capacity() {
            let at = self.base + UNDO_START + tail;
            let [egen, offset, len, checksum]: [u64; 4] = pool.read(at)?;
            // Stale bytes of older generations can hold anything: check before computing.
            if egen != gen || len > self.undo_capacity() {
                break;
            }
            let needed = UNDO_ENTRY_HEADER + len.next_multiple_of(8);
            if tail + needed > self.undo_capacity() {
                break;
            }
            let mut data = vec![0u8; len as usize];
            pool.read_into(at + UNDO_ENTRY_HEADER, &mut data)?;
            if undo_checksum(gen, offset, &data) != checksum {
                break; // torn: written when the crash came, so its range was never changed
            }
            entries.push((offset, data));
            tail += needed;
        }
        Ok(entries)
    }

    /// Applies redo entries (flushed, not fenced).
    #[track_caller]
    pub fn apply<D: Domain>(pool: &Pool<D>, entries: &[(u64, u64)]) -> Result<()> {
        for &(offset, value) in entries {
            pool.store_u64(offset, value, Ordering::Release)?;
            pool.flush(offset, 8)?;
        }
        Ok(())
    }

    /// Completes or undoes whatever the lane was doing when the pool was last closed or crashed,
    /// and retires it past every generation that can be on media (flushed, not fenced: the
    /// caller fences once for all lanes before any is used). Returns the generation to continue
    /// from.
    pub fn recover<D: Domain>(&self, pool: &Pool<D>) -> Result<(u64, LaneRecovery)> {
        let corrupt = |what: String| HeapError::Corrupt(format!("lane at {:#x}: {what}", self.base));
        let (gen, active) = self.state(pool)?;
        // Nothing on media is newer than `gen + 1` (module docs); retiring there makes any
        // leftover of the crashed operation older than the next one.
        let resume = gen
            .checked_add(1)
            .filter(|&g| g < 1 << 62)
            .ok_or_else(|| corrupt(format!("generation {gen}")))?;
        let [header_gen, ..]: [u64; 3] = pool.read(self.base + REDO_HEADER)?;
        if header_gen > resume {
            return Err(corrupt(format!("redo header of generation {header_gen} after state {gen}")));
        }
        // A redo header of a later generation proves this one finished: a lane starts an
        // operation only after the previous one returned. (An operation with an empty redo log
        // retires lazily, so its state word may still read active after the next one began.)
        let outcome = if !active || header_gen > gen {
            LaneRecovery::Idle
        } else {
            let outcome = match self.committed_redo(pool, gen)? {
                Some(entries) => {
                    for &(offset, _) in &entries {
                        if offset % 8 != 0
                            || offset < HEADER_SIZE
                            || offset.checked_add(8).is_none_or(|end| end > pool.size())
                        {
                            return Err(corrupt(format!("redo entry for offset {offset:#x}")));
                        }
                    }
                    LaneLog::apply(pool, &entries)?;
                    LaneRecovery::RolledForward(entries.len())
                }
                None => {
                    let entries = self.undo_entries(pool, gen)?;
                    for (offset, data) in entries.iter().rev() {
                        if *offset < HEADER_SIZE
                            || offset.checked_add(data.len() as u64).is_none_or(|end| end > pool.size())
                        {
                            return Err(corrupt(format!("undo entry for {offset:#x}+{}", data.len())));
                        }
                        pool.write_bytes(*offset, data)?;
                        pool.flush(*offset, data.len() as u64)?;
                    }
                    LaneRecovery::RolledBack(entries.len())
                }
            };
            // Completed or undone before the state says so.
            pool.fence()?;
            outcome
        };
        self.retire(pool, resume)?;
        Ok((resume, outcome))
    }

    /// Debug check of the invariant the generations rest on: nothing in the lane carries
    /// generation `gen` or later when an operation is about to take `gen`.
    pub fn debug_assert_unused<D: Domain>(&self, pool: &Pool<D>, gen: u64) {
        if cfg!(debug_assertions) {
            let state = pool.load_u64(self.base, Ordering::Acquire).map_or(0, |w| w >> 1);
            let [header, ..]: [u64; 3] = pool.read(self.base + REDO_HEADER).unwrap_or([0; 3]);
            let [first_undo, ..]: [u64; 4] = pool.read(self.base + UNDO_START).unwrap_or([0; 4]);
            debug_assert!(
                state < gen && header < gen && first_undo < gen,
                "lane at {:#x}: generation {gen} is not newer than what is on media (state {state}, \
                 redo header {header}, first undo entry {first_undo})",
                self.base
            );
        }
    }
}
