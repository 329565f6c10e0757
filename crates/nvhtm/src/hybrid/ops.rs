//! Lookups and writes.

use std::cell::Cell;
use std::sync::atomic::Ordering;

use super::index::{Entry, Table};
use super::*;
use crate::map::MAX_KEY;

/// The sizes a write is checked against.
fn check_sizes(key: &[u8], value: Option<&[u8]>) -> Result<()> {
    if key.len() > MAX_KEY {
        return Err(MapError::KeyTooLarge { len: key.len(), max: MAX_KEY });
    }
    match value {
        Some(v) if v.len() > MAX_VALUE => Err(MapError::ValueTooLarge { len: v.len(), max: MAX_VALUE }),
        _ => Ok(()),
    }
}

/// The outcome of a write under a shard's lock.
enum Write {
    Put(Entry),
    Delete,
}

impl<D: Domain> HybridMap<D> {
    /// The entry of `key` in `table` (the shard of `hash`).
    fn find(&self, table: &Table, hash: u64, key: &[u8]) -> Result<Option<Entry>> {
        let pool = self.heap.raw_pool();
        let failed = Cell::new(None);
        let found = table.find(hash, |e| {
            e.hash == hash
                && key_eq(pool, e.offset, key).unwrap_or_else(|err| {
                    failed.set(Some(err));
                    false
                })
        });
        match failed.into_inner() {
            Some(err) => Err(err),
            None => Ok(found.copied()),
        }
    }

    /// Calls `read` with the value of the record at `offset`.
    fn with_value<R>(&self, offset: u64, read: impl FnOnce(&[u8]) -> R) -> Result<R> {
        let pool = self.heap.raw_pool();
        let (len, key_len) = header_at(pool, offset)?;
        let at = offset + PAYLOAD + (PAYLOAD_HEADER + key_len) as u64;
        let value_len = len
            .checked_sub(PAYLOAD_HEADER + key_len)
            .ok_or_else(|| MapError::Corrupt(format!("the record at {offset:#x} is shorter than its key")))?;
        let mut small = [0u8; 128];
        if value_len <= small.len() {
            pool.read_into(at, &mut small[..value_len])?;
            return Ok(read(&small[..value_len]));
        }
        let mut buf = vec![0u8; value_len];
        pool.read_into(at, &mut buf)?;
        Ok(read(&buf))
    }

    /// Makes every record written so far durable if some are not: a reader that observed
    /// the state they made answers only once it cannot be lost.
    fn settle(&self) -> Result<()> {
        let written = self.log.written();
        if written > self.log.tail() {
            self.log.commit(&self.heap, written)?;
        }
        Ok(())
    }

    /// The value of `key`.
    pub fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>> {
        self.get_with(key, <[u8]>::to_vec)
    }

    /// Calls `read` with the value of `key`, if present (no allocation for values up to 128
    /// bytes).
    ///
    /// ```
    /// # use nvhtm::hybrid::HybridMap;
    /// # use nvhtm::{Heap, PoolOptions, Volatile};
    /// # let map = HybridMap::open(Heap::create_in_memory(&PoolOptions::layout("doc").with_size(8 << 20), Volatile)?)?;
    /// map.upsert(b"n", &7u64.to_le_bytes())?;
    /// assert_eq!(map.get_with(b"n", |v| v.len())?, Some(8));
    /// # Ok::<(), nvhtm::MapError>(())
    /// ```
    pub fn get_with<R>(&self, key: &[u8], read: impl FnOnce(&[u8]) -> R) -> Result<Option<R>> {
        check_sizes(key, None)?;
        let hash = self.index.hash(key);
        loop {
            let table = self.index.read(hash);
            let Some(entry) = self.find(&table, hash, key)? else {
                drop(table);
                self.settle()?;
                return Ok(None);
            };
            if entry.lsn >= self.log.tail() {
                drop(table);
                self.log.commit(&self.heap, entry.lsn + 1)?;
                continue;
            }
            // The shard's read lock keeps the record where it is: the cleaner moves a record
            // (and frees its segment) only after updating its entry under the write lock.
            return self.with_value(entry.offset, read).map(Some);
        }
    }

    /// Under `key`'s shard lock: `decide` sees the current value (durable) and says what to
    /// write, if anything; the record is appended and the index updated before the lock is
    /// released, and the call returns once the record is durable.
    fn write<R>(
        &self,
        key: &[u8],
        new_value: Option<&[u8]>,
        decide: impl FnOnce(Option<&[u8]>) -> (bool, R),
    ) -> Result<R> {
        check_sizes(key, new_value)?;
        let hash = self.index.hash(key);
        let pool = self.heap.raw_pool();
        let mut table = self.index.write(hash);
        let old = self.find(&table, hash, key)?;
        if let Some(e) = old {
            if e.lsn >= self.log.tail() {
                // Decide on durable state only (committing under the lock cannot deadlock:
                // the committer needs the log's locks, never a shard's).
                self.log.commit(&self.heap, e.lsn + 1)?;
            }
        } else {
            self.settle()?;
        }
        let (go, answer) = match old {
            Some(e) => self.with_value(e.offset, |v| decide(Some(v)))?,
            None => decide(None),
        };
        if !go || (old.is_none() && new_value.is_none()) {
            return Ok(answer);
        }
        let kind = if new_value.is_some() { PUT } else { DELETE };
        let value = new_value.unwrap_or_default();
        let mut header = [0u8; PAYLOAD_HEADER];
        header[..4].copy_from_slice(&kind.to_le_bytes());
        header[4..].copy_from_slice(&(key.len() as u32).to_le_bytes());
        let (lsn, end, offset) = self.log.write_parts(&self.heap, &[&header, key, value])?;
        let size = crate::log::record_size(PAYLOAD_HEADER + key.len() + value.len());
        let outcome =
            if new_value.is_some() { Write::Put(Entry { hash, lsn, offset }) } else { Write::Delete };
        let old_size = match old {
            Some(e) => record_size_at(pool, e.offset)?,
            None => 0,
        };
        match (outcome, table.find_entry(hash, |e| Some(*e) == old)) {
            (Write::Put(entry), Ok(mut slot)) => *slot.get_mut() = entry,
            (Write::Put(entry), Err(_)) => {
                table.insert_unique(hash, entry, |e| e.hash);
            }
            (Write::Delete, Ok(slot)) => drop(slot.remove()),
            (Write::Delete, Err(_)) => unreachable!("a delete is written only for a present key"),
        }
        debug_assert!(old.is_none_or(|e| e.lsn < lsn), "a key's records are appended in index order");
        if new_value.is_some() {
            self.live_bytes.fetch_add(size, Ordering::Relaxed);
        }
        self.live_bytes.fetch_sub(old_size, Ordering::Relaxed);
        drop(table);
        self.log.commit(&self.heap, end)?;
        self.maybe_clean()?;
        Ok(answer)
    }

    /// Inserts or replaces; `true` if the key was new. Durable when it returns.
    pub fn upsert(&self, key: &[u8], value: &[u8]) -> Result<bool> {
        self.write(key, Some(value), |old| (true, old.is_none()))
    }

    /// Inserts `key` if absent; `false` (nothing changed) if it was present.
    pub fn insert(&self, key: &[u8], value: &[u8]) -> Result<bool> {
        self.write(key, Some(value), |old| (old.is_none(), old.is_none()))
    }

    /// Removes `key`; whether it was present. Durable when it returns.
    pub fn remove(&self, key: &[u8]) -> Result<bool> {
        self.write(key, None, |old| (old.is_some(), old.is_some()))
    }

    /// Replaces the value of `key` with `new` (`None`: remove) if it is `expected` (`None`:
    /// absent); the current value when it was not.
    ///
    /// ```
    /// # use nvhtm::hybrid::HybridMap;
    /// # use nvhtm::{Heap, PoolOptions, Volatile};
    /// # let map = HybridMap::open(Heap::create_in_memory(&PoolOptions::layout("doc").with_size(8 << 20), Volatile)?)?;
    /// assert_eq!(map.compare_and_swap(b"k", None, Some(b"1"))?, Ok(()));
    /// assert_eq!(map.compare_and_swap(b"k", None, Some(b"2"))?, Err(Some(b"1".to_vec())));
    /// # Ok::<(), nvhtm::MapError>(())
    /// ```
    pub fn compare_and_swap(
        &self,
        key: &[u8],
        expected: Option<&[u8]>,
        new: Option<&[u8]>,
    ) -> Result<Result<(), Option<Vec<u8>>>> {
        self.write(key, new, |current| {
            if current == expected {
                (true, Ok(()))
            } else {
                (false, Err(current.map(<[u8]>::to_vec)))
            }
        })
    }
}
