//! The DRAM index: key hash → the pool offset of the key's live record.
//!
//! 64 shards, each an open-addressing table of 16-byte slots (the key's 64-bit hash and the
//! record's offset; offset 0 marks an empty slot) with linear probing and backward-shift
//! deletion, under an `RwLock`. A lookup touches one slot line and then the record, which it
//! reads anyway for the value: no key is copied into DRAM and nothing is allocated per key.
//! (hashbrown's tables were the first choice; their separate control bytes cost a third
//! dependent cache miss per lookup.) The hash is xxh3 with a secret seed drawn at open, so a
//! client cannot choose keys that collide.

use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

/// Where a key's live record is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Entry {
    pub hash: u64,
    pub offset: u64,
}

/// One shard's table.
#[derive(Debug, Default)]
pub(super) struct Table {
    slots: Vec<Entry>,
    len: usize,
}

impl Table {
    fn mask(&self) -> usize {
        self.slots.len() - 1
    }

    /// The entries whose hash is `hash`, in probe order.
    pub fn candidates(&self, hash: u64) -> impl Iterator<Item = Entry> + '_ {
        let start = if self.slots.is_empty() { 0 } else { hash as usize & self.mask() };
        (0..self.slots.len())
            .map(move |i| self.slots[(start + i) & self.mask()])
            .take_while(|e| e.offset != 0)
            .filter(move |e| e.hash == hash)
    }

    /// Adds an entry (its key must not be in the table).
    pub fn insert(&mut self, entry: Entry) {
        debug_assert_ne!(entry.offset, 0);
        if (self.len + 1) * 4 > self.slots.len() * 3 {
            self.grow((self.slots.len() * 2).max(16));
        }
        let mask = self.mask();
        let mut i = entry.hash as usize & mask;
        while self.slots[i].offset != 0 {
            i = (i + 1) & mask;
        }
        self.slots[i] = entry;
        self.len += 1;
    }

    /// Makes room for `more` entries without growing later.
    pub fn reserve(&mut self, more: usize) {
        let need = ((self.len + more) * 4).div_ceil(3).next_power_of_two();
        if need > self.slots.len() {
            self.grow(need);
        }
    }

    fn position(&self, entry: Entry) -> Option<usize> {
        if self.slots.is_empty() {
            return None;
        }
        let mask = self.mask();
        let mut i = entry.hash as usize & mask;
        loop {
            match self.slots[i] {
                e if e == entry => return Some(i),
                e if e.offset == 0 => return None,
                _ => i = (i + 1) & mask,
            }
        }
    }

    /// Points `old`'s slot at `offset`; whether `old` was there.
    pub fn replace(&mut self, old: Entry, offset: u64) -> bool {
        match self.position(old) {
            Some(i) => {
                self.slots[i].offset = offset;
                true
            }
            None => false,
        }
    }

    /// Removes `entry`; whether it was there. Later entries of its probe run shift back.
    pub fn remove(&mut self, entry: Entry) -> bool {
        let Some(mut hole) = self.position(entry) else { return false };
        let mask = self.mask();
        let mut i = hole;
        loop {
            i = (i + 1) & mask;
            let e = self.slots[i];
            if e.offset == 0 {
                break;
            }
            // `e` may fill the hole if its home slot is not cyclically in (hole, i].
            let home = e.hash as usize & mask;
            if (i.wrapping_sub(home) & mask) >= (i.wrapping_sub(hole) & mask) {
                self.slots[hole] = e;
                hole = i;
            }
        }
        self.slots[hole] = Entry { hash: 0, offset: 0 };
        self.len -= 1;
        true
    }

    fn grow(&mut self, capacity: usize) {
        let old = std::mem::replace(&mut self.slots, vec![Entry { hash: 0, offset: 0 }; capacity]);
        self.len = 0;
        for e in old.into_iter().filter(|e| e.offset != 0) {
            self.insert(e);
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn iter(&self) -> impl Iterator<Item = Entry> + '_ {
        self.slots.iter().copied().filter(|e| e.offset != 0)
    }
}

const SHARDS: usize = 64;

#[derive(Debug)]
pub(super) struct Index {
    seed: u64,
    shards: Box<[RwLock<Table>]>,
}

impl Index {
    pub fn new(seed: u64) -> Index {
        Index { seed, shards: (0..SHARDS).map(|_| RwLock::new(Table::default())).collect() }
    }

    pub fn hash(&self, key: &[u8]) -> u64 {
        xxhash_rust::xxh3::xxh3_64_with_seed(key, self.seed)
    }

    /// The shard of `hash`: its top bits (the low bits pick the slot in it).
    pub fn shard_of(&self, hash: u64) -> usize {
        (hash >> 58) as usize % SHARDS
    }

    fn shard(&self, hash: u64) -> &RwLock<Table> {
        &self.shards[self.shard_of(hash)]
    }

    pub fn read(&self, hash: u64) -> RwLockReadGuard<'_, Table> {
        self.shard(hash).read().unwrap_or_else(|e| e.into_inner())
    }

    pub fn write(&self, hash: u64) -> RwLockWriteGuard<'_, Table> {
        self.shard(hash).write().unwrap_or_else(|e| e.into_inner())
    }

    /// Makes room for about `entries` in all, spread over the shards (before a replay).
    pub fn reserve(&self, entries: usize) {
        for shard in self.shards.iter() {
            shard.write().unwrap_or_else(|e| e.into_inner()).reserve(entries / SHARDS + 1);
        }
    }

    /// Live entries.
    pub fn len(&self) -> u64 {
        self.shards.iter().map(|s| s.read().unwrap_or_else(|e| e.into_inner()).len() as u64).sum()
    }

    /// Every entry, shard by shard (for checks).
    pub fn entries(&self) -> Vec<Entry> {
        let mut all = Vec::new();
        for shard in self.shards.iter() {
            all.extend(shard.read().unwrap_or_else(|e| e.into_inner()).iter());
        }
        all
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_table_matches_a_model_through_inserts_replaces_and_removes_with_collisions() {
        let mut table = Table::default();
        let mut model = std::collections::HashMap::new();
        let mut rng = fastrand::Rng::with_seed(3);
        for step in 1..20_000u64 {
            // Few distinct hashes, many sharing home slots and whole hashes.
            let hash = rng.u64(..64) * 0x1_0000_0001;
            let key = (hash, rng.u64(..3));
            let offset = step * 8;
            match (model.get(&key).copied(), rng.u8(..3)) {
                (None, _) => {
                    table.insert(Entry { hash, offset });
                    model.insert(key, offset);
                }
                (Some(old), 0) => {
                    assert!(table.replace(Entry { hash, offset: old }, offset));
                    model.insert(key, offset);
                }
                (Some(old), _) => {
                    assert!(table.remove(Entry { hash, offset: old }));
                    model.remove(&key);
                }
            }
            if step % 997 == 0 {
                assert_eq!(table.len(), model.len());
                for (&(h, _), &off) in &model {
                    assert!(table.candidates(h).any(|e| e.offset == off), "{h:#x} {off}");
                }
                let mut all: Vec<u64> = table.iter().map(|e| e.offset).collect();
                let mut want: Vec<u64> = model.values().copied().collect();
                all.sort_unstable();
                want.sort_unstable();
                assert_eq!(all, want);
            }
        }
    }
}
