//! Reads, writes and splits of buckets.

use std::sync::atomic::Ordering;

use super::dir::Seg;
use super::epoch::Guard;
use super::layout::*;
use super::*;

/// A bucket's entries: owned copies (a block is read once, then released).
pub(super) type Entries = Vec<(Vec<u8>, Vec<u8>)>;

/// What a write does to its key, decided under the bucket's lock from the current value.
pub(super) enum Change<'v> {
    Keep,
    Put(&'v [u8]),
    Delete,
}

impl<D: Domain> Inner<D> {
    pub(super) fn hash(&self, key: &[u8]) -> Hash {
        Hash::of(self.seed, key)
    }

    /// The status and heads of bucket `b` (the caller holds its lock, or validates after).
    pub(super) fn read_bucket_locked(&self, seg: &Seg, b: u64) -> Result<(Status, [u64; 3])> {
        let [status, h0, h1, h2] = self.heap.raw_pool().load_words::<4>(bucket_offset(seg.offset, b))?;
        Ok((Status::decode(status), [h0, h1, h2]))
    }

    /// The bytes of the block at `head` (empty for none).
    pub(super) fn read_block(&self, head: u64) -> Result<Vec<u8>> {
        if head == 0 {
            return Ok(Vec::new());
        }
        let pool = self.heap.raw_pool();
        let header = pool.load_u64(head, Ordering::Acquire)?;
        let total = header >> 32;
        if !(8..=1 << 23).contains(&total) {
            return Err(MapError::Corrupt(format!("block at {head:#x} claims {total} bytes")));
        }
        let mut bytes = vec![0u8; total as usize];
        pool.read_into(head, &mut bytes)?;
        Ok(bytes)
    }

    /// The block at `head`, read in place (empty for none). Blocks are immutable while a
    /// guard of an epoch that could see them lives (reuse waits until the epoch after the one
    /// that retired them is durable), so the bytes stay put for the guard's lifetime.
    pub(super) fn block<'g>(&'g self, _guard: &'g Guard<'_>, head: u64) -> Result<&'g [u8]> {
        if head == 0 {
            return Ok(&[]);
        }
        let pool = self.heap.raw_pool();
        let total = pool.load_u64(head, Ordering::Acquire)? >> 32;
        if !(8..=1 << 23).contains(&total) || total % 8 != 0 {
            return Err(MapError::Corrupt(format!("block at {head:#x} claims {total} bytes")));
        }
        let words = pool.checked_words(head, total)?;
        // SAFETY: `checked_words` checked the `total` bytes at `head` lie in the mapping, which
        // stays put while the pool (borrowed through `self`) lives; the block's bytes are not
        // written while the guard lives (see above), so no store races with this shared view.
        Ok(unsafe { std::slice::from_raw_parts(words.cast::<u8>(), total as usize) })
    }

    /// The entries of the bucket's valid state that `seg` owns (the caller holds the lock or
    /// validates after).
    pub(super) fn bucket_entries(&self, seg: &Seg, status: Status, heads: [u64; 3]) -> Result<Entries> {
        let head = heads[status.valid(|e| self.is_failed(e))];
        let bytes = self.read_block(head)?;
        if bytes.is_empty() {
            return Ok(Vec::new());
        }
        let entries =
            decode_block(&bytes).map_err(|e| MapError::Corrupt(format!("block at {head:#x}: {e}")))?;
        Ok(entries
            .into_iter()
            .filter(|(k, _)| seg.owns(self.hash(k)))
            .map(|(k, v)| (k.to_vec(), v.to_vec()))
            .collect())
    }

    /// Reads `key` without a lock: the bucket's version is validated after the read, and the
    /// block is read in place.
    pub(super) fn get_with<R>(&self, key: &[u8], read: impl FnOnce(&[u8]) -> R) -> Result<Option<R>> {
        let hash = self.hash(key);
        let b = hash.bucket();
        let guard = self.epochs.enter();
        loop {
            let seg = self.dir.route(&self.heap, hash)?;
            let v = seg.stable_version(b);
            if !seg.owns(hash) {
                continue;
            }
            let (status, heads) = self.read_bucket_locked(seg, b)?;
            let head = heads[status.valid(|e| self.is_failed(e))];
            let block = match self.block(&guard, head) {
                Ok(block) => block,
                Err(e) if seg.validate(b, v) => return Err(e),
                Err(_) => continue,
            };
            let found = entries(block)
                .and_then(|mut it| it.find(|e| e.as_ref().map_or(true, |(k, _)| *k == key)).transpose());
            if !seg.validate(b, v) {
                continue;
            }
            return match found {
                Ok(found) => Ok(found.map(|(_, value)| read(value))),
                Err(e) => Err(MapError::Corrupt(format!("block at {head:#x}: {e}"))),
            };
        }
    }

    /// Locks the bucket that owns `hash` in the current directory; returns it with its state.
    pub(super) fn lock_owner(&self, hash: Hash) -> Result<(&Seg, Status, [u64; 3])> {
        let b = hash.bucket();
        loop {
            let seg = self.dir.route(&self.heap, hash)?;
            seg.lock(b);
            if !seg.owns(hash) {
                seg.unlock(b);
                continue;
            }
            match self.read_bucket_locked(seg, b) {
                Ok((status, heads)) => return Ok((seg, status, heads)),
                Err(e) => {
                    seg.unlock(b);
                    return Err(e);
                }
            }
        }
    }

    /// Writes one key: `decide` sees its current value under the bucket's lock and returns
    /// the change and the result. The new block is built from the old one in place, in a
    /// thread-local buffer. Splits the segment first when the bucket is full.
    pub(super) fn write<'v, R>(
        &self,
        key: &[u8],
        mut decide: impl FnMut(Option<&[u8]>) -> (Change<'v>, R),
    ) -> Result<R> {
        thread_local! {
            static BUILDER: std::cell::RefCell<BlockBuilder> = std::cell::RefCell::default();
        }
        let hash = self.hash(key);
        let b = hash.bucket();
        loop {
            let guard = self.epochs.enter();
            let (seg, status, heads) = self.lock_owner(hash)?;
            if status.epoch > guard.epoch() {
                // A writer of the next epoch (the persister moved on while this one waited)
                // got here first: writing in this epoch would order this write before it after
                // a crash. Leave the epoch and run in the current one.
                seg.unlock(b);
                continue;
            }
            let outcome: Result<Option<R>> = BUILDER.with(|builder| {
                let mut builder = builder.borrow_mut();
                let head = heads[status.valid(|e| self.is_failed(e))];
                let block = self.block(&guard, head)?;
                let corrupt = |e: String| MapError::Corrupt(format!("block at {head:#x}: {e}"));
                let mut old = None;
                for entry in entries(block).map_err(corrupt)? {
                    let (k, v) = entry.map_err(corrupt)?;
                    if k == key {
                        old = Some(v);
                    }
                }
                let (change, result) = decide(old);
                let put = match (change, old) {
                    (Change::Keep, _) | (Change::Delete, None) => return Ok(Some(result)),
                    (Change::Put(v), _) => Some(v),
                    (Change::Delete, Some(_)) => None,
                };
                builder.start();
                for entry in entries(block).map_err(corrupt)? {
                    let (k, v) = entry.map_err(corrupt)?;
                    // Entries a split moved away are dropped here.
                    if k != key && (seg.depth() == 0 || seg.owns(self.hash(k))) {
                        builder.push(k, v);
                    }
                }
                if let Some(v) = put {
                    if builder.count() == MAX_ENTRIES {
                        return Ok(None);
                    }
                    builder.push(key, v);
                }
                self.commit_bucket(&guard, seg, b, status, heads, builder.finish())?;
                Ok(Some(result))
            });
            seg.unlock(b);
            match outcome? {
                Some(result) => return Ok(result),
                None => self.split(&guard, seg)?,
            }
        }
    }

    /// Publishes `block` (a finished block, empty for none) as bucket `b`'s new state in the
    /// guard's epoch (the caller holds the lock): a new block, then the head, then the status,
    /// in the bucket's line; the block and the line are logged for the epoch's write-back, and
    /// the blocks that leave the bucket for reclamation.
    pub(super) fn commit_bucket(
        &self,
        guard: &Guard<'_>,
        seg: &Seg,
        b: u64,
        status: Status,
        heads: [u64; 3],
        bytes: &[u8],
    ) -> Result<()> {
        let pool = self.heap.raw_pool();
        let now = guard.epoch();
        let next = status.next(now, |e| self.is_failed(e));
        let mut log = guard.log();
        let block = if bytes.is_empty() {
            0
        } else {
            let block = self.arena.alloc(&self.heap, self.root, bytes.len() as u64)?;
            pool.write_bytes(block, bytes)?;
            log.dirty(block, bytes.len() as u64);
            block
        };
        // The blocks the old status used that the new one does not, or whose head is rewritten.
        for i in status.in_use() {
            if heads[i] != 0 && (i == next.a || !next.in_use().any(|j| j == i)) {
                self.arena.hold(heads[i])?;
                log.retire(heads[i]);
            }
        }
        let at = bucket_offset(seg.offset, b);
        pool.store_u64(at + 8 + next.a as u64 * 8, block, Ordering::Release)?;
        if next != status {
            pool.store_u64(at, next.encode(), Ordering::Release)?;
        }
        log.dirty(at, BUCKET_SIZE);
        Ok(())
    }

    /// Splits `seg` (unless another thread did meanwhile): the keys whose next hash bit is 1
    /// move to a new segment. Every bucket's status is copied with filtered copies of its
    /// blocks (the heads of failed epochs become empty), so the new bucket keeps every state
    /// a crash may need; the old segment keeps its blocks (entries it no longer owns are
    /// ignored and dropped by its next write). The new segment, its blocks, its directory
    /// entries (a doubled directory when needed) and both depths commit in one heap
    /// transaction, under every lock of the old segment.
    pub(super) fn split(&self, guard: &Guard<'_>, seg: &Seg) -> Result<()> {
        let mut split = self.dir.lock_split();
        let depth = seg.depth();
        let (pattern, global) = (seg.pattern(), self.dir.depth());
        if depth >= MAX_DEPTH {
            return Err(MapError::Limit(format!("a segment at the deepest directory ({MAX_DEPTH}) is full")));
        }
        for b in 0..BUCKETS {
            seg.lock(b);
        }
        let result = self.split_locked(guard, seg, &mut split, depth, pattern, global);
        for b in 0..BUCKETS {
            seg.unlock(b);
        }
        result
    }

    fn split_locked(
        &self,
        _guard: &Guard<'_>,
        seg: &Seg,
        split: &mut dir::SplitState,
        depth: u32,
        pattern: u64,
        global: u32,
    ) -> Result<()> {
        let pool = self.heap.raw_pool();
        let new_pattern = pattern << 1 | 1;
        let moves = |k: &[u8]| self.hash(k).prefix(depth + 1) == new_pattern;
        // The new segment's buckets: status words and filtered copies of every block in use.
        let mut buckets = Vec::with_capacity(BUCKETS as usize);
        let mut copies = Vec::new();
        for b in 0..BUCKETS {
            let (status, heads) = self.read_bucket_locked(seg, b)?;
            let mut new_heads = [0u64; 3];
            for i in status.in_use() {
                let failed = (i == status.a && self.is_failed(status.epoch))
                    || (Some(i) == status.f && self.is_failed(status.epoch - 1));
                if heads[i] == 0 || failed {
                    continue;
                }
                let bytes = self.read_block(heads[i])?;
                let entries = decode_block(&bytes)
                    .map_err(|e| MapError::Corrupt(format!("block at {:#x}: {e}", heads[i])))?;
                let kept: Vec<_> = entries.into_iter().filter(|(k, _)| moves(k)).collect();
                if kept.is_empty() {
                    continue;
                }
                let mut out = Vec::new();
                encode_block(kept.iter().copied(), &mut out);
                let block = self.arena.alloc(&self.heap, self.root, out.len() as u64)?;
                pool.write_bytes(block, &out)?;
                copies.push((block, out.len() as u64));
                new_heads[i] = block;
            }
            let word = if status.epoch == 0 { 0 } else { status.encode() };
            buckets.push([word, new_heads[0], new_heads[1], new_heads[2]]);
        }
        let root = self.root;
        let media = split.media;
        let doubled = self.heap.transaction(|tx| {
            let new = tx.alloc_uninit(SEGMENT_SIZE)?;
            if new % 64 != 0 {
                return Err(MapError::Corrupt(format!("segment at {new:#x} is not line-aligned")));
            }
            tx.write(
                PPtr::<[u64; 8]>::new(new),
                &[SEG_MAGIC, u64::from(depth) + 1, new_pattern, 0, 0, 0, 0, 0],
            )?;
            for (b, words) in buckets.iter().enumerate() {
                tx.write(PPtr::<[u64; 4]>::new(bucket_offset(new, b as u64)), words)?;
            }
            for &(block, len) in &copies {
                tx.flush_on_commit(block, len)?;
            }
            tx.write(PPtr::<[u64; 2]>::new(seg.offset + 8), &[u64::from(depth) + 1, pattern << 1])?;
            if depth == global {
                // Double: entry i of the new directory is old entry i / 2, except the new segment's.
                let n = 1u64 << global;
                let grown = tx.alloc_uninit(DIR_HEADER + 16 * n)?;
                let mut words = vec![0u64; (2 * n) as usize];
                for i in 0..n {
                    let entry = tx.read(PPtr::<u64>::new(media + DIR_HEADER + i * 8))?;
                    words[(2 * i) as usize] = entry;
                    words[(2 * i + 1) as usize] = if i == pattern { new } else { entry };
                }
                tx.write(PPtr::<[u64; 2]>::new(grown), &[DIR_MAGIC, u64::from(global) + 1])?;
                tx.write_bytes(grown + DIR_HEADER, bytemuck::cast_slice(&words))?;
                tx.free(media)?;
                tx.write(PPtr::<u64>::new(root + ROOT_DIR), &grown)?;
                Ok((new, Some(grown)))
            } else {
                let span = global - (depth + 1);
                let first = new_pattern << span;
                let words = vec![new; 1 << span];
                tx.write_bytes(media + DIR_HEADER + first * 8, bytemuck::cast_slice(&words))?;
                Ok((new, None))
            }
        });
        let (new, grown) = match doubled {
            Ok(done) => done,
            Err(e) => {
                // Nothing names the copies: give their slots back at once.
                for &(block, _) in &copies {
                    self.arena.free(block)?;
                }
                return Err(e);
            }
        };
        if let Some(grown) = grown {
            split.media = grown;
        }
        split.splits += 1;
        self.dir.install_split(seg, new);
        Ok(())
    }
}

impl<D: Domain> PeriodicMap<D> {
    /// The value of `key`.
    pub fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>> {
        self.inner.get_with(key, <[u8]>::to_vec)
    }

    /// Calls `read` on the value of `key` without copying it out.
    pub fn get_with<R>(&self, key: &[u8], read: impl FnOnce(&[u8]) -> R) -> Result<Option<R>> {
        self.inner.get_with(key, read)
    }

    /// Whether `key` is present.
    pub fn contains(&self, key: &[u8]) -> Result<bool> {
        Ok(self.inner.get_with(key, |_| ())?.is_some())
    }

    /// Inserts `key` if absent. Returns `false` (and changes nothing) if it was present.
    pub fn insert(&self, key: &[u8], value: &[u8]) -> Result<bool> {
        check_sizes(key, Some(value))?;
        self.inner.write(key, |old| match old {
            Some(_) => (Change::Keep, false),
            None => (Change::Put(value), true),
        })
    }

    /// Inserts or replaces. Returns `true` if the key was new.
    pub fn upsert(&self, key: &[u8], value: &[u8]) -> Result<bool> {
        check_sizes(key, Some(value))?;
        self.inner.write(key, |old| (Change::Put(value), old.is_none()))
    }

    /// Removes `key`. Returns whether it was present.
    pub fn remove(&self, key: &[u8]) -> Result<bool> {
        check_sizes(key, None)?;
        self.inner.write(key, |old| (Change::Delete, old.is_some()))
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
        self.inner.write(key, |old| {
            if old != expected {
                return (Change::Keep, Err(old.map(<[u8]>::to_vec)));
            }
            match new {
                Some(v) => (Change::Put(v), Ok(())),
                None => (Change::Delete, Ok(())),
            }
        })
    }
}
