//! Multi-key transactions: reads validated and writes applied under the buckets' locks, all
//! in one epoch, so a crash keeps all of a transaction's writes or none.

use std::collections::BTreeMap;

use super::dir::Seg;
use super::layout::*;
use super::ops::Entries;
use super::*;

/// A transaction in progress (see [`PeriodicMap::transaction`]): reads see the map as of
/// their first read of each bucket plus the transaction's own writes; writes are buffered
/// until commit.
pub struct Transaction<'m, D: Domain> {
    inner: &'m Inner<D>,
    /// Buckets read: (segment, bucket) → the version the read saw.
    reads: Vec<(&'m Seg, u64, u64)>,
    writes: BTreeMap<Vec<u8>, Option<Vec<u8>>>,
}

impl<D: Domain> std::fmt::Debug for Transaction<'_, D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Transaction")
            .field("reads", &self.reads.len())
            .field("writes", &self.writes.len())
            .finish()
    }
}

impl<'m, D: Domain> Transaction<'m, D> {
    /// The value of `key`, as this transaction sees it.
    pub fn get(&mut self, key: &[u8]) -> Result<Option<Vec<u8>>> {
        if let Some(w) = self.writes.get(key) {
            return Ok(w.clone());
        }
        let inner = self.inner;
        let hash = inner.hash(key);
        let b = hash.bucket();
        loop {
            let seg = inner.dir.route(&inner.heap, hash)?;
            let v = seg.stable_version(b);
            if !seg.owns(hash) {
                continue;
            }
            let read = inner.read_bucket_locked(seg, b).and_then(|(s, h)| inner.bucket_entries(seg, s, h));
            if !seg.validate(b, v) {
                continue;
            }
            let entries = read?;
            match self.reads.iter().find(|(s, rb, _)| std::ptr::eq(*s, seg) && *rb == b) {
                // Read before at another version: the transaction cannot be serialised.
                Some(&(_, _, seen)) if seen != v => return Err(MapError::Conflict),
                Some(_) => {}
                None => self.reads.push((seg, b, v)),
            }
            return Ok(entries.into_iter().find(|(k, _)| k == key).map(|(_, v)| v));
        }
    }

    /// Sets `key` to `value` at commit.
    pub fn upsert(&mut self, key: &[u8], value: &[u8]) {
        self.writes.insert(key.to_vec(), Some(value.to_vec()));
    }

    /// Removes `key` at commit.
    pub fn remove(&mut self, key: &[u8]) {
        self.writes.insert(key.to_vec(), None);
    }

    /// Locks every bucket read or written (in address order: commits never deadlock),
    /// validates the reads, and applies the writes in the guard's epoch. `Ok(false)`: a read
    /// is stale or a segment split (retry); `Err(Split)` names a bucket that would overflow.
    fn commit(&self, guard: &epoch::Guard<'_>) -> Result<Commit<'m>> {
        let inner = self.inner;
        let mut buckets: BTreeMap<(u64, u64), Touched<'m, '_>> = BTreeMap::new();
        for &(seg, b, v) in &self.reads {
            buckets.insert((seg.offset, b), (seg, Some(v), Vec::new()));
        }
        for (key, value) in &self.writes {
            let hash = inner.hash(key);
            let seg = inner.dir.route(&inner.heap, hash)?;
            let entry = buckets.entry((seg.offset, hash.bucket())).or_insert((seg, None, Vec::new()));
            if !std::ptr::eq(entry.0, seg) {
                return Ok(Commit::Retry);
            }
            entry.2.push((key, value.as_deref()));
        }
        let mut locked = Vec::new();
        let outcome = (|| {
            for (&(_, b), (seg, seen, _)) in &buckets {
                let v = seg.lock(b);
                locked.push((*seg, b));
                if seen.is_some_and(|seen| seen != v) {
                    return Ok(Commit::Retry);
                }
            }
            // Every written key still belongs where it was routed (no split since).
            for (seg, _, writes) in buckets.values() {
                if writes.iter().any(|(k, _)| !seg.owns(inner.hash(k))) {
                    return Ok(Commit::Retry);
                }
            }
            let mut states = Vec::new();
            for (&(_, b), (seg, _, writes)) in &buckets {
                if writes.is_empty() {
                    continue;
                }
                let (status, heads) = inner.read_bucket_locked(seg, b)?;
                if status.epoch > guard.epoch() {
                    // A writer of the next epoch got here first: commit in the current one.
                    return Ok(Commit::Retry);
                }
                let mut entries: Entries = inner.bucket_entries(seg, status, heads)?;
                for &(k, v) in writes {
                    let at = entries.iter().position(|(ek, _)| ek == k);
                    match (v, at) {
                        (Some(v), Some(i)) => entries[i].1 = v.to_vec(),
                        (Some(v), None) => entries.push((k.to_vec(), v.to_vec())),
                        (None, Some(i)) => {
                            entries.swap_remove(i);
                        }
                        (None, None) => {}
                    }
                }
                if entries.len() > MAX_ENTRIES {
                    return Ok(Commit::Split(seg));
                }
                states.push((*seg, b, status, heads, entries));
            }
            // Nothing can fail for a reason of the transaction's own past this point.
            let mut bytes = Vec::new();
            for (seg, b, status, heads, entries) in &states {
                encode_block(entries.iter().map(|(k, v)| (k.as_slice(), v.as_slice())), &mut bytes);
                inner.commit_bucket(guard, seg, *b, *status, *heads, &bytes)?;
            }
            Ok(Commit::Done)
        })();
        for (seg, b) in locked {
            seg.unlock(b);
        }
        outcome
    }
}

/// A bucket a commit locks: its segment, the version a read saw, the writes to it.
type Touched<'m, 'w> = (&'m Seg, Option<u64>, Vec<(&'w [u8], Option<&'w [u8]>)>);

enum Commit<'m> {
    Done,
    Retry,
    Split(&'m Seg),
}

impl<D: Domain> PeriodicMap<D> {
    /// Runs `body` as a serializable transaction over several keys: its reads see one
    /// consistent state, its writes apply together at commit, inside one epoch — after a
    /// crash all of them are there or none. `body` runs again (from scratch) when another
    /// writer changed a bucket it read; an `Err` from it aborts with nothing written. The body
    /// runs inside one epoch, which cannot end until it returns: keep it short, and do not call
    /// [`sync`](PeriodicMap::sync) or [`advance`](PeriodicMap::advance) from it (they would
    /// wait for the body itself).
    ///
    /// ```
    /// use nvhtm::periodic::{PeriodicMap, PeriodicOptions};
    /// use nvhtm::{Heap, PoolOptions, Volatile};
    /// let heap = Heap::create_in_memory(&PoolOptions::layout("doc").with_size(8 << 20), Volatile)?;
    /// let map = PeriodicMap::open(heap, PeriodicOptions::manual())?;
    /// map.upsert(b"alice", &100u64.to_le_bytes())?;
    /// map.transaction(|t| {
    ///     let alice = u64::from_le_bytes(t.get(b"alice")?.unwrap().try_into().unwrap());
    ///     t.upsert(b"alice", &(alice - 30).to_le_bytes());
    ///     t.upsert(b"bob", &30u64.to_le_bytes());
    ///     Ok(())
    /// })?;
    /// assert_eq!(map.get(b"bob")?, Some(30u64.to_le_bytes().to_vec()));
    /// # Ok::<(), nvhtm::MapError>(())
    /// ```
    pub fn transaction<R>(&self, mut body: impl FnMut(&mut Transaction<'_, D>) -> Result<R>) -> Result<R> {
        let inner = &*self.inner;
        loop {
            let guard = inner.epochs.enter();
            let mut t = Transaction { inner, reads: Vec::new(), writes: BTreeMap::new() };
            let result = match body(&mut t) {
                Ok(result) => result,
                Err(MapError::Conflict) => continue,
                Err(e) => return Err(e),
            };
            for (k, v) in &t.writes {
                check_sizes(k, v.as_deref())?;
            }
            match t.commit(&guard)? {
                Commit::Done => return Ok(result),
                Commit::Retry => continue,
                Commit::Split(seg) => inner.split(&guard, seg)?,
            }
        }
    }
}
