//! The read path: lock-free lookups, validated by the segment versions.

use super::*;

/// Where a key was found.
#[derive(Debug, Clone, Copy)]
pub(super) struct Found {
    pub(super) bucket: u64,
    pub(super) slot: u64,
    pub(super) info: u64,
    /// For an out-of-place record: its offset.
    pub(super) record: u64,
}

/// Longest value a lookup copies out on the stack rather than into an allocation.
pub(super) const SHORT_VALUE: usize = 128;

/// Where a lookup copies the value it finds (before validating it): short values stay in this
/// buffer, which the caller owns and nothing moves, so a lookup allocates nothing for them.
pub(super) struct ValueBuf {
    pub(super) short: [u8; SHORT_VALUE],
    pub(super) len: usize,
    pub(super) long: Vec<u8>,
}

impl ValueBuf {
    pub(super) fn new() -> ValueBuf {
        ValueBuf { short: [0; SHORT_VALUE], len: 0, long: Vec::new() }
    }

    pub(super) fn set_inline(&mut self, word: u64, len: usize) {
        self.short[..8].copy_from_slice(&word.to_le_bytes());
        self.len = len.min(INLINE_VALUE);
    }

    /// Copies the `len` bytes at `offset`.
    pub(super) fn read<D: Domain>(&mut self, pool: &Pool<D>, offset: u64, len: usize) -> Result<()> {
        if len > MAX_VALUE || !pool.contains(offset, len as u64) {
            return Err(MapError::Corrupt(format!("a record at {offset:#x} claims a {len}-byte value")));
        }
        self.len = len;
        if len <= SHORT_VALUE {
            pool.read_into(offset, &mut self.short[..len])?;
        } else {
            self.long.resize(len, 0);
            pool.read_into(offset, &mut self.long)?;
        }
        Ok(())
    }

    pub(super) fn as_slice(&self) -> &[u8] {
        if self.len <= SHORT_VALUE {
            &self.short[..self.len]
        } else {
            &self.long
        }
    }
}

impl<D: Domain> StrictMap<D> {
    /// Calls `visit(slot, hash)` for every occupied slot of `bucket` holding a key the segment
    /// owns (not a stale copy).
    pub(super) fn for_owned(
        &self,
        segment: &Segment,
        bucket: u64,
        mut visit: impl FnMut(u64, Hash) -> Result<()>,
    ) -> Result<()> {
        for slot in occupied(self.load(bucket_offset(segment.at, bucket))?) {
            let hash = self.slot_hash(segment.at, bucket, slot)?;
            if segment.owns(hash) {
                visit(slot, hash)?;
            }
        }
        Ok(())
    }

    /// Looks `key` up in the segment a writer holds: a key its summary rules out is not probed.
    /// Copies the value into `value` if given.
    pub(super) fn find_held(
        &self,
        held: &Held,
        hash: Hash,
        key: &[u8],
        value: Option<&mut ValueBuf>,
    ) -> Result<Option<Found>> {
        if held.summary.homes[hash.home() as usize].load(Ordering::Relaxed) & hash.summary_bit() == 0 {
            return Ok(None);
        }
        self.find(held.segment.at, hash, key, &|| true, value)
    }

    /// Looks `key` up in `segment` (its owner), returning where it is and copying its value into
    /// `value` if given. `stable` says whether no writer has touched the segment since the caller
    /// began (always, under its lock).
    pub(super) fn find(
        &self,
        segment: u64,
        hash: Hash,
        key: &[u8],
        stable: &dyn Fn() -> bool,
        value: Option<&mut ValueBuf>,
    ) -> Result<Option<Found>> {
        let pool = self.heap.raw_pool();
        let home_meta = self.load(bucket_offset(segment, hash.home()))?;
        for i in 0..=reach(home_meta) {
            let bucket = hash.bucket(i);
            let at = bucket_offset(segment, bucket);
            let meta = if i == 0 { home_meta } else { self.load(at)? };
            let fingerprints = pool.load_u64(at + 8, Ordering::Acquire)?.to_le_bytes();
            for slot in 0..SLOTS {
                if meta & (1 << slot) == 0 || fingerprints[slot as usize] != hash.fingerprint() {
                    continue;
                }
                let s = slot_offset(segment, bucket, slot);
                let words: [u64; 4] = pool.load_words(s)?;
                let info = words[3];
                match info_kind(info) {
                    KIND_INLINE => {
                        let stored: [u8; 16] = bytemuck::cast([words[0], words[1]]);
                        if info_key_len(info) == key.len()
                            && key.len() <= INLINE_KEY
                            && &stored[..key.len()] == key
                        {
                            if let Some(value) = value {
                                value.set_inline(words[2], info_value_len(info));
                            }
                            return Ok(Some(Found { bucket, slot, info, record: 0 }));
                        }
                    }
                    KIND_RECORD if words[0] == hash.0 => {
                        let record = words[1];
                        let [key_len, value_len]: [u32; 2] = pool.read(record)?;
                        // A lock-free reader may be looking at a record freed and reused since
                        // it read the slot: size nothing by its lengths unless the segment is
                        // unchanged (then the record is live); otherwise report nothing, which
                        // the caller's validation turns into a retry.
                        std::sync::atomic::fence(Ordering::Acquire);
                        if !stable() {
                            return Ok(None);
                        }
                        if key_len as usize == key.len() && pool.bytes_eq(record + 8, key)? {
                            if let Some(value) = value {
                                value.read(pool, record + 8 + u64::from(key_len), value_len as usize)?;
                            }
                            return Ok(Some(Found { bucket, slot, info, record }));
                        }
                    }
                    _ => {}
                }
            }
        }
        Ok(None)
    }

    /// The value of `key`, if present. Lock-free: retries while a writer or a split holds the
    /// segment, so it never returns a value whose commit is not yet durable.
    pub fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>> {
        self.get_with(key, |value| value.to_vec())
    }

    /// Calls `read` on the value of `key`, if present, without allocating for inline values.
    pub fn get_with<R>(&self, key: &[u8], read: impl FnOnce(&[u8]) -> R) -> Result<Option<R>> {
        let mut value = ValueBuf::new();
        Ok(self.lookup(key, &mut value)?.then(|| read(value.as_slice())))
    }

    /// Whether `key` is present, its value copied into `value`.
    pub(super) fn lookup(&self, key: &[u8], value: &mut ValueBuf) -> Result<bool> {
        check_sizes(key, None)?;
        let hash = self.hash(key);
        let (mut failures, mut strays) = (0, 0);
        loop {
            let attempt = (|| -> Result<Option<bool>> {
                let Some(segment) = self.locate(hash)? else {
                    return Ok(None);
                };
                let locks = self.locks(&segment)?;
                let before = locks.version.load(Ordering::Acquire);
                if before & 1 == 1 {
                    return Ok(None);
                }
                let segment = self.segment(segment.at)?;
                if !segment.owns(hash) {
                    // Only a split (at most 40 for one hash) can make this happen legitimately.
                    strays += 1;
                    if strays > 128 {
                        return Err(MapError::Corrupt(format!(
                            "the directory names no segment owning hash {:#018x}",
                            hash.0
                        )));
                    }
                    return Ok(None);
                }
                let homes = match locks.summary.get() {
                    Some(summary) => &summary.homes,
                    None => {
                        let (owner, owner_locks, _guard) = self.lock_owner(hash)?;
                        self.summary_locked(&owner, owner_locks)?;
                        return Ok(None); // retry with the summary
                    }
                };
                let maybe = homes[hash.home() as usize].load(Ordering::Acquire) & hash.summary_bit() != 0;
                let found = if maybe {
                    // The home bucket's four lines at once: the slot's miss overlaps the meta's.
                    self.heap.raw_pool().prefetch(bucket_offset(segment.at, hash.home()), BUCKET);
                    let stable = || locks.version.load(Ordering::Relaxed) == before;
                    self.find(segment.at, hash, key, &stable, Some(&mut *value))?.is_some()
                } else {
                    false
                };
                std::sync::atomic::fence(Ordering::Acquire);
                if locks.version.load(Ordering::Relaxed) != before {
                    return Ok(None);
                }
                Ok(Some(found))
            })();
            match attempt {
                Ok(Some(found)) => return Ok(found),
                Ok(None) => {}
                // Reading a block freed under us can fail; a real corruption fails every time.
                Err(e) if failures > 64 || is_poisoned(&e) => return Err(e),
                Err(_) => failures += 1,
            }
            std::thread::yield_now();
        }
    }

    /// Whether `key` is present.
    pub fn contains(&self, key: &[u8]) -> Result<bool> {
        Ok(self.get(key)?.is_some())
    }

    /// The hash of the key in a slot.
    pub(super) fn slot_hash(&self, segment: u64, bucket: u64, slot: u64) -> Result<Hash> {
        let s = slot_offset(segment, bucket, slot);
        let info = self.load(s + 24)?;
        Ok(match info_kind(info) {
            KIND_RECORD => Hash(self.load(s)?),
            _ => {
                let key: [u8; 16] = self.heap.raw_pool().read(s)?;
                self.hash(&key[..info_key_len(info).min(INLINE_KEY)])
            }
        })
    }
}
