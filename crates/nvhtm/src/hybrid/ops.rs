//! Lookups and writes.

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

impl<D: Domain> HybridMap<D> {
    /// Finds `key` in `table` (the shard of `hash`) and calls `read(entry, record bytes,
    /// value)` on its record: one read of the record serves the key check and the caller.
    fn lookup<R>(
        &self,
        table: &Table,
        hash: u64,
        key: &[u8],
        read: impl FnOnce(Entry, u64, &[u8]) -> R,
    ) -> Result<Option<R>> {
        let mut read = Some(read);
        for e in table.candidates(hash) {
            let answer = self.with_record(e.offset, |k, v| {
                let size = crate::log::record_size(PAYLOAD_HEADER + k.len() + v.len());
                (k == key).then(|| read.take().map(|f| f(e, size, v)))
            })?;
            if let Some(answer) = answer {
                return Ok(answer);
            }
        }
        Ok(None)
    }

    /// Calls `read(key, value)` on the record at `offset`: its header in one read, key and
    /// value in a second (into a stack buffer up to 256 bytes).
    fn with_record<R>(&self, offset: u64, read: impl FnOnce(&[u8], &[u8]) -> R) -> Result<R> {
        let pool = self.heap.raw_pool();
        let (len, key_len) = header_at(pool, offset)?;
        let rest = len
            .checked_sub(PAYLOAD_HEADER)
            .filter(|&r| r >= key_len)
            .ok_or_else(|| MapError::Corrupt(format!("the record at {offset:#x} is shorter than its key")))?;
        let at = offset + PAYLOAD + PAYLOAD_HEADER as u64;
        let mut small = [0u8; 256];
        if rest <= small.len() {
            pool.read_into(at, &mut small[..rest])?;
            return Ok(read(&small[..key_len], &small[key_len..rest]));
        }
        let mut buf = vec![0u8; rest];
        pool.read_into(at, &mut buf)?;
        Ok(read(&buf[..key_len], &buf[key_len..]))
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
        // The shard's read lock: every entry it shows is durable (a writer holds the write
        // lock until its record is), and the record stays where it is (the cleaner frees a
        // segment only after moving every entry out of it under the write lock).
        let table = self.index.read(hash);
        self.lookup(&table, hash, key, |_, _, value| read(value))
    }

    /// Under `key`'s shard lock: `decide` sees the current value and says what to write, if
    /// anything; the record is appended, the index updated, and the lock held until the record
    /// is durable (group commit with the other shards' writers), so no reader or writer ever
    /// sees an index entry that a crash could take back.
    fn write<R>(
        &self,
        key: &[u8],
        new_value: Option<&[u8]>,
        decide: impl FnOnce(Option<&[u8]>) -> (bool, R),
    ) -> Result<R> {
        check_sizes(key, new_value)?;
        let hash = self.index.hash(key);
        let mut table = self.index.write(hash);
        let mut decide = Some(decide);
        let found = self.lookup(&table, hash, key, |entry, size, value| {
            (entry, size, decide.take().map(|d| d(Some(value))))
        })?;
        let (old, old_size, (go, answer)) = match found {
            Some((entry, size, Some(decided))) => (Some(entry), size, decided),
            _ => (None, 0, decide.take().expect("decided once")(None)),
        };
        if !go || (old.is_none() && new_value.is_none()) {
            return Ok(answer);
        }
        let kind = if new_value.is_some() { PUT } else { DELETE };
        let value = new_value.unwrap_or_default();
        let mut header = [0u8; PAYLOAD_HEADER];
        header[..4].copy_from_slice(&kind.to_le_bytes());
        header[4..].copy_from_slice(&(key.len() as u32).to_le_bytes());
        let (_, end, offset) = self.log.write_parts(&self.heap, &[&header, key, value])?;
        let size = crate::log::record_size(PAYLOAD_HEADER + key.len() + value.len());
        let updated = match (old, new_value.is_some()) {
            (Some(old), true) => table.replace(old, offset),
            (None, true) => {
                table.insert(Entry { hash, offset });
                true
            }
            (Some(old), false) => table.remove(old),
            (None, false) => unreachable!("a delete is written only for a present key"),
        };
        debug_assert!(updated, "the entry found under the lock is still there");
        if new_value.is_some() {
            self.live_bytes.fetch_add(size, Ordering::Relaxed);
        }
        if old_size > 0 {
            self.live_bytes.fetch_sub(old_size, Ordering::Relaxed);
        }
        self.log.commit(&self.heap, end)?;
        drop(table);
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
