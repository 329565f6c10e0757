//! The arena the periodic map's blocks live in: chunks taken from the heap (one heap
//! transaction per chunk, listed in a persistent chunk table), carved into slots of one
//! power-of-two size class each. A slot has no persistent metadata at all: it is in use
//! exactly when some bucket's status names a head pointing to it, so allocating and freeing
//! one costs no flush and no fence, and a block written in an epoch that failed is reclaimed
//! by the repair that drops it from its bucket.
//!
//! Which slots are in use lives in DRAM. After opening, the chunks that existed are
//! *unscanned*: nothing is allocated from them until a scan of the buckets marks their live
//! slots (frees arriving meanwhile are remembered and win), so opening costs no scan; new
//! blocks come from new chunks in the meantime.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard};

use super::layout::*;
use super::{MapError, Result};
use crate::heap::Heap;
use crate::persist::Domain;
use crate::pool::PPtr;

/// The smallest slot: 64 bytes.
const MIN_CLASS: u32 = 6;
/// The largest slot: 8 MiB (a full bucket of the longest entries fits).
const MAX_CLASS: u32 = 23;
/// Classes up to this one share chunks; larger slots are a chunk each.
const SHARED_CLASS: u32 = 14;
/// Bytes of a shared chunk (a heap block of four 64 KiB heap chunks).
const CHUNK_BYTES: u64 = 256 * 1024 - 64;
/// Chunk table header: magic, count, capacity.
const TABLE_HEADER: u64 = 24;

/// The size class of a block of `len` bytes.
pub(super) fn class_of(len: u64) -> Result<u32> {
    let class = len.max(1).next_power_of_two().trailing_zeros().max(MIN_CLASS);
    if class > MAX_CLASS {
        return Err(MapError::ValueTooLarge { len: len as usize, max: 1 << MAX_CLASS });
    }
    Ok(class)
}

#[derive(Debug)]
struct Chunk {
    class: u32,
    slots: u64,
    /// Slots in use (bit per slot).
    used: Vec<u64>,
    /// While unscanned: what happened to its slots before the scan ended.
    unscanned: Option<Unscanned>,
}

/// An unscanned chunk's slots that the scan cannot judge by the buckets alone.
#[derive(Debug)]
struct Unscanned {
    /// Freed (they win over the scan's marks).
    freed: Vec<u64>,
    /// Retired but not yet freed: no bucket names them any more, so the scan may miss them,
    /// but they are not free until their epoch's successor is durable.
    held: Vec<u64>,
}

impl Unscanned {
    /// Empty bitmaps, grown on first use: opening allocates nothing per chunk.
    fn new() -> Unscanned {
        Unscanned { freed: Vec::new(), held: Vec::new() }
    }
}

/// Bit `index` of a bitmap that may be shorter than its chunk (missing words are zero).
fn bit(bits: &[u64], index: u64) -> bool {
    bits.get((index / 64) as usize).is_some_and(|w| w >> (index % 64) & 1 == 1)
}

impl Chunk {
    fn slot_size(&self) -> u64 {
        1 << self.class
    }
}

#[derive(Debug, Default)]
struct Chunks {
    /// Chunk start → chunk.
    list: BTreeMap<u64, Chunk>,
}

/// Counts for `stats` and the leak check.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ArenaStats {
    /// Chunks taken from the heap.
    pub chunks: u64,
    /// Bytes in those chunks.
    pub bytes: u64,
    /// Slots in use.
    pub used_slots: u64,
    /// Bytes of the slots in use.
    pub used_bytes: u64,
    /// Chunks not yet scanned since opening.
    pub unscanned: u64,
}

#[derive(Debug)]
pub(super) struct Arena {
    /// Free slots per class (index `class - MIN_CLASS`).
    free: Vec<Mutex<Vec<u64>>>,
    /// Whether some chunk is unscanned (retirements must then be [`hold`](Arena::hold)).
    scanning: AtomicBool,
    chunks: Mutex<Chunks>,
    /// Serialises chunk additions: each reads and rewrites the chunk table (and may replace
    /// it) in its heap transaction, which does not serialise with another's reads.
    adding: Mutex<()>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn corrupt(why: String) -> MapError {
    MapError::Corrupt(why)
}

impl Arena {
    /// The arena of the chunk table at `table`: every chunk unscanned. Reads the table
    /// (a word per chunk: chunks are large, so this is small).
    pub fn load<D: Domain>(heap: &Heap<D>, table: u64) -> Result<Arena> {
        let pool = heap.raw_pool();
        let [magic, count, cap] = pool.load_words::<3>(table)?;
        if magic != CHUNKS_MAGIC || count > cap || !pool.contains(table, TABLE_HEADER + cap * 8) {
            return Err(corrupt(format!("chunk table at {table:#x}: magic {magic:#x}, {count} of {cap}")));
        }
        let mut chunks = Chunks::default();
        for i in 0..count {
            let word = pool.load_u64(table + TABLE_HEADER + i * 8, Ordering::Acquire)?;
            let (start, class) = (word & !63, (word & 63) as u32);
            let slots = if class <= SHARED_CLASS { CHUNK_BYTES >> class } else { 1 };
            if !(MIN_CLASS..=MAX_CLASS).contains(&class) || !pool.contains(start, slots << class) {
                return Err(corrupt(format!("chunk table entry {i}: {word:#x}")));
            }
            chunks
                .list
                .insert(start, Chunk { class, slots, used: Vec::new(), unscanned: Some(Unscanned::new()) });
        }
        Ok(Arena {
            free: (MIN_CLASS..=MAX_CLASS).map(|_| Mutex::default()).collect(),
            scanning: AtomicBool::new(count > 0),
            chunks: Mutex::new(chunks),
            adding: Mutex::default(),
        })
    }

    /// A new, empty chunk table (in the caller's transaction).
    pub fn format<D: Domain>(tx: &mut crate::heap::Tx<'_, D>) -> crate::heap::Result<u64> {
        let table = tx.alloc_bytes(TABLE_HEADER + 8 * 8)?;
        tx.write(PPtr::<[u64; 3]>::new(table), &[CHUNKS_MAGIC, 0, 8])?;
        Ok(table)
    }

    /// A slot for a block of `len` bytes (its class from [`class_of`]).
    pub fn alloc<D: Domain>(&self, heap: &Heap<D>, root: u64, len: u64) -> Result<u64> {
        let class = class_of(len)?;
        loop {
            // Never hold a free list while taking the chunks (`finish_scan` nests them the
            // other way).
            let popped = lock(&self.free[(class - MIN_CLASS) as usize]).pop();
            if let Some(slot) = popped {
                let mut chunks = lock(&self.chunks);
                let (chunk, index) = locate(&mut chunks, slot)?;
                let was = flip(&mut chunk.used, index, true);
                debug_assert!(!was, "free slot {slot:#x} was in use");
                return Ok(slot);
            }
            self.add_chunk(heap, root, class)?;
        }
    }

    /// Gives back a slot whose block left its bucket in an epoch that is now followed by a
    /// durable one (no crash and no reader can reach it any more).
    pub fn free(&self, slot: u64) -> Result<()> {
        let mut chunks = lock(&self.chunks);
        let (chunk, index) = locate(&mut chunks, slot)?;
        if let Some(unscanned) = chunk.unscanned.as_mut() {
            flip(&mut unscanned.freed, index, true);
            flip(&mut unscanned.held, index, false);
            flip(&mut chunk.used, index, false);
            return Ok(());
        }
        if !flip(&mut chunk.used, index, false) {
            return Err(corrupt(format!("block {slot:#x} freed twice")));
        }
        let class = chunk.class;
        drop(chunks);
        lock(&self.free[(class - MIN_CLASS) as usize]).push(slot);
        Ok(())
    }

    /// A block left its bucket (it is freed later): while its chunk is unscanned, the end of
    /// the scan must not take it for free.
    pub fn hold(&self, slot: u64) -> Result<()> {
        if !self.scanning.load(Ordering::Acquire) {
            return Ok(());
        }
        let mut chunks = lock(&self.chunks);
        let (chunk, index) = locate(&mut chunks, slot)?;
        if let Some(unscanned) = chunk.unscanned.as_mut() {
            flip(&mut unscanned.held, index, true);
        }
        Ok(())
    }

    /// The scan found `slot` named by a bucket. A slot named twice is an error (two buckets
    /// would share a block); slots in chunks made since opening are not the scan's business.
    pub fn mark_live(&self, slot: u64) -> Result<()> {
        let mut chunks = lock(&self.chunks);
        let (chunk, index) = locate(&mut chunks, slot)?;
        if chunk.unscanned.is_some() && flip(&mut chunk.used, index, true) {
            return Err(corrupt(format!("block {slot:#x} is named by two buckets")));
        }
        Ok(())
    }

    /// Ends the scan: every slot of an unscanned chunk that no bucket names, that is not held
    /// for a later free, or that was freed meanwhile, becomes free.
    pub fn finish_scan(&self) {
        let mut chunks = lock(&self.chunks);
        for (&start, chunk) in chunks.list.iter_mut() {
            let Some(Unscanned { freed, held }) = chunk.unscanned.take() else { continue };
            let mut free = lock(&self.free[(chunk.class - MIN_CLASS) as usize]);
            for i in 0..chunk.slots {
                debug_assert!(!(bit(&freed, i) && bit(&held, i)), "slot {i} both freed and held");
                if bit(&held, i) {
                    flip(&mut chunk.used, i, true);
                }
                if bit(&freed, i) {
                    flip(&mut chunk.used, i, false);
                }
                if !bit(&chunk.used, i) {
                    free.push(start + (i << chunk.class));
                }
            }
        }
        self.scanning.store(false, Ordering::Release);
    }

    /// Whether `slot` is in use (for checks).
    pub fn is_used(&self, slot: u64) -> Result<bool> {
        let mut chunks = lock(&self.chunks);
        let (chunk, index) = locate(&mut chunks, slot)?;
        Ok(bit(&chunk.used, index))
    }

    pub fn stats(&self) -> ArenaStats {
        let chunks = lock(&self.chunks);
        let mut stats = ArenaStats::default();
        for chunk in chunks.list.values() {
            let used: u64 = chunk.used.iter().map(|w| u64::from(w.count_ones())).sum();
            stats.chunks += 1;
            stats.bytes += chunk.slots * chunk.slot_size();
            stats.used_slots += used;
            stats.used_bytes += used * chunk.slot_size();
            stats.unscanned += u64::from(chunk.unscanned.is_some());
        }
        stats
    }

    /// Takes a chunk of `class` from the heap and lists it, in one heap transaction (growing
    /// the table when full); its slots become free.
    fn add_chunk<D: Domain>(&self, heap: &Heap<D>, root: u64, class: u32) -> Result<()> {
        let _one = lock(&self.adding);
        if !lock(&self.free[(class - MIN_CLASS) as usize]).is_empty() {
            return Ok(()); // another thread added one meanwhile
        }
        let slots = if class <= SHARED_CLASS { CHUNK_BYTES >> class } else { 1 };
        let bytes = if class <= SHARED_CLASS { CHUNK_BYTES } else { 1 << class };
        let start = heap.transaction(|tx| {
            let start = tx.alloc_uninit(bytes)?;
            let table = tx.read(PPtr::<u64>::new(root + ROOT_CHUNKS))?;
            let [_, count, cap] = tx.read(PPtr::<[u64; 3]>::new(table))?;
            let table = if count == cap {
                let grown = tx.alloc_bytes(TABLE_HEADER + cap * 16)?;
                let mut old = vec![0u8; (cap * 8) as usize];
                tx.heap().pool().read_into(table + TABLE_HEADER, &mut old)?;
                tx.write_bytes(grown + TABLE_HEADER, &old)?;
                tx.write(PPtr::<[u64; 3]>::new(grown), &[CHUNKS_MAGIC, count, cap * 2])?;
                tx.free(table)?;
                tx.write(PPtr::<u64>::new(root + ROOT_CHUNKS), &grown)?;
                grown
            } else {
                table
            };
            tx.write(PPtr::<u64>::new(table + TABLE_HEADER + count * 8), &(start | u64::from(class)))?;
            tx.write(PPtr::<u64>::new(table + 8), &(count + 1))?;
            Ok::<_, MapError>(start)
        })?;
        if start % 64 != 0 {
            return Err(corrupt(format!("chunk at {start:#x} is not line-aligned")));
        }
        let words = slots.div_ceil(64) as usize;
        lock(&self.chunks).list.insert(start, Chunk { class, slots, used: vec![0; words], unscanned: None });
        let mut free = lock(&self.free[(class - MIN_CLASS) as usize]);
        free.extend((0..slots).rev().map(|i| start + (i << class)));
        Ok(())
    }
}

/// The chunk holding `slot` and the slot's index in it.
fn locate(chunks: &mut Chunks, slot: u64) -> Result<(&mut Chunk, u64)> {
    let (start, chunk) = chunks
        .list
        .range_mut(..=slot)
        .next_back()
        .ok_or_else(|| corrupt(format!("block {slot:#x} lies in no arena chunk")))?;
    let rel = slot - start;
    if rel % chunk.slot_size() != 0 || rel / chunk.slot_size() >= chunk.slots {
        return Err(corrupt(format!("block {slot:#x} is not a slot of the chunk at {start:#x}")));
    }
    let index = rel / chunk.slot_size();
    Ok((chunk, index))
}

/// Sets bit `index` to `on`; returns its old value.
fn flip(bits: &mut Vec<u64>, index: u64, on: bool) -> bool {
    let (w, b) = ((index / 64) as usize, index % 64);
    if bits.len() <= w {
        if !on {
            return false;
        }
        bits.resize(w + 1, 0);
    }
    let was = bits[w] >> b & 1 == 1;
    if on {
        bits[w] |= 1 << b;
    } else {
        bits[w] &= !(1 << b);
    }
    was
}
