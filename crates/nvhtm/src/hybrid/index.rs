//! The DRAM index: key hash → where the key's live record is.
//!
//! 64 shards of a `hashbrown::HashTable` under `RwLock`s — dashmap's design without its
//! dependencies. An entry holds no key: only the key's 64-bit hash, the record's LSN and its
//! pool offset (24 bytes, no allocation per key). A lookup compares the key with the one in
//! the record, which it reads anyway for the value. The hash is xxh3 with a secret seed drawn
//! at open, so a client cannot choose keys that collide.

use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

use hashbrown::HashTable;

/// Where a key's live record is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Entry {
    pub hash: u64,
    pub lsn: u64,
    pub offset: u64,
}

pub(super) type Table = HashTable<Entry>;

const SHARDS: usize = 64;

#[derive(Debug)]
pub(super) struct Index {
    seed: u64,
    shards: Box<[RwLock<Table>]>,
}

impl Index {
    pub fn new(seed: u64) -> Index {
        Index { seed, shards: (0..SHARDS).map(|_| RwLock::new(Table::new())).collect() }
    }

    pub fn hash(&self, key: &[u8]) -> u64 {
        xxhash_rust::xxh3::xxh3_64_with_seed(key, self.seed)
    }

    fn shard(&self, hash: u64) -> &RwLock<Table> {
        // The top bits pick the shard; hashbrown uses the low bits and the top 7 for its tags.
        &self.shards[(hash >> 52) as usize % SHARDS]
    }

    pub fn read(&self, hash: u64) -> RwLockReadGuard<'_, Table> {
        self.shard(hash).read().unwrap_or_else(|e| e.into_inner())
    }

    pub fn write(&self, hash: u64) -> RwLockWriteGuard<'_, Table> {
        self.shard(hash).write().unwrap_or_else(|e| e.into_inner())
    }

    /// Live entries.
    pub fn len(&self) -> u64 {
        self.shards.iter().map(|s| s.read().unwrap_or_else(|e| e.into_inner()).len() as u64).sum()
    }

    /// Every entry, shard by shard (for checks).
    pub fn entries(&self) -> Vec<Entry> {
        let mut all = Vec::new();
        for shard in self.shards.iter() {
            all.extend(shard.read().unwrap_or_else(|e| e.into_inner()).iter().copied());
        }
        all
    }
}
