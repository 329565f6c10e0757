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

/// Where a lookup copies the value it finds (before validating it): inline and short values stay
/// in this buffer, which the caller owns and nothing moves, so a lookup allocates nothing for
/// them (and an inline value's lookup writes only its one word).
pub(super) enum ValueBuf {
    /// Nothing copied yet.
    Empty,
    /// An inline value: its word and length (at most 8).
    Inline([u8; INLINE_VALUE], usize),
    /// A record's value of at most [`SHORT_VALUE`] bytes.
    Short([u8; SHORT_VALUE], usize),
    /// A longer record's value.
    Long(Vec<u8>),
}

impl ValueBuf {
    pub(super) fn new() -> ValueBuf {
        ValueBuf::Empty
    }

    pub(super) fn set_inline(&mut self, word: u64, len: usize) {
        *self = ValueBuf::Inline(word.to_le_bytes(), len.min(INLINE_VALUE));
    }

    /// Copies the `len` bytes at `offset`.
    pub(super) fn read<D: Domain>(&mut self, pool: &Pool<D>, offset: u64, len: usize) -> Result<()> {
        if len > MAX_VALUE || !pool.contains(offset, len as u64) {
            return Err(MapError::Corrupt(format!("a record at {offset:#x} claims a {len}-byte value")));
        }
        if len <= SHORT_VALUE {
            let mut short = [0; SHORT_VALUE];
            pool.read_into(offset, &mut short[..len])?;
            *self = ValueBuf::Short(short, len);
        } else {
            let mut long = match std::mem::replace(self, ValueBuf::Empty) {
                ValueBuf::Long(long) => long,
                _ => Vec::new(),
            };
            long.resize(len, 0);
            pool.read_into(offset, &mut long)?;
            *self = ValueBuf::Long(long);
        }
        Ok(())
    }

    pub(super) fn as_slice(&self) -> &[u8] {
        match self {
            ValueBuf::Empty => &[],
            ValueBuf::Inline(word, len) => &word[..*len],
            ValueBuf::Short(short, len) => &short[..*len],
            ValueBuf::Long(long) => long,
        }
    }
}

/// The slots of a bucket whose fingerprint may be `fingerprint`, as bits 8·slot + 7 (a zero
/// byte test on the fingerprints xor the wanted one: exact except that a byte just after a
/// match may be reported too, which only costs a key comparison).
fn fingerprint_matches(fingerprints: [u8; 8], fingerprint: u8) -> u64 {
    const ONES: u64 = 0x0101_0101_0101_0101;
    let x = u64::from_le_bytes(fingerprints) ^ (ONES * u64::from(fingerprint));
    x.wrapping_sub(ONES) & !x & (ONES << 7)
}

/// The bits of `fingerprint_matches` for the slots `meta` marks occupied: occupancy bit `s`
/// moved to bit 8·s + 7 (one multiplication: the seven shifted copies of the seven bits do not
/// overlap, so no carry mixes them).
fn occupied_matches(meta: u64, matches: u64) -> u64 {
    const SPREAD: u64 = 0x0408_1020_4081; // bits 0, 7, 14, ..., 42
    const LOW_BITS: u64 = 0x0101_0101_0101_0101;
    let occupied = ((meta & 0x7f).wrapping_mul(SPREAD) & LOW_BITS) << 7;
    matches & occupied
}

impl<D: Domain> StrictMap<D> {
    /// Calls `visit(slot, hash)` for every occupied slot of `bucket` holding a key the segment
    /// owns (not a stale copy).
    pub(super) fn for_owned(
        &self,
        view: &SegView,
        segment: &Segment,
        bucket: u64,
        mut visit: impl FnMut(u64, Hash),
    ) {
        for slot in occupied(view.meta(bucket)) {
            let hash = self.slot_hash(view, bucket, slot);
            if segment.owns(hash) {
                visit(slot, hash);
            }
        }
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
        self.find(&held.view, hash, key, &|| true, value)
    }

    /// Looks `key` up in the segment `view` shows (its owner), returning where it is and copying
    /// its value into `value` if given. `stable` says whether no writer has touched the segment
    /// since the caller began (always, under its lock).
    pub(super) fn find(
        &self,
        view: &SegView,
        hash: Hash,
        key: &[u8],
        stable: &dyn Fn() -> bool,
        value: Option<&mut ValueBuf>,
    ) -> Result<Option<Found>> {
        // An inline key as a slot stores it: zero padded to two words (longer keys never match
        // an inline slot).
        let inline_key = (key.len() <= INLINE_KEY).then(|| {
            let mut padded = [0u8; INLINE_KEY];
            padded[..key.len()].copy_from_slice(key);
            bytemuck::cast::<[u8; INLINE_KEY], [u64; 2]>(padded)
        });
        let home_meta = view.meta(hash.home());
        for i in 0..=reach(home_meta) {
            let bucket = hash.bucket(i);
            let meta = if i == 0 { home_meta } else { view.meta(bucket) };
            let mut candidates =
                occupied_matches(meta, fingerprint_matches(view.fingerprints(bucket), hash.fingerprint()));
            while candidates != 0 {
                let slot = u64::from(candidates.trailing_zeros() / 8);
                candidates &= candidates - 1;
                let words = view.slot(bucket, slot);
                let info = words[3];
                match info_kind(info) {
                    KIND_INLINE
                        if info_key_len(info) == key.len() && inline_key == Some([words[0], words[1]]) =>
                    {
                        if let Some(value) = value {
                            value.set_inline(words[2], info_value_len(info));
                        }
                        return Ok(Some(Found { bucket, slot, info, record: 0 }));
                    }
                    KIND_RECORD if words[0] == hash.0 => {
                        let pool = self.heap.raw_pool();
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
            match self.try_lookup(hash, key, value, &mut strays) {
                Ok(Some(found)) => return Ok(found),
                Ok(None) => {}
                // Reading a record freed under us can fail; a real corruption fails every time.
                Err(e) if failures > 64 || is_poisoned(&e) => return Err(e),
                Err(_) => failures += 1,
            }
            std::thread::yield_now();
        }
    }

    /// One optimistic attempt of [`lookup`](Self::lookup): hash → directory mirror → segment
    /// version → home bucket → slot → version again. `None` when a writer or a split got in
    /// the way: try again.
    fn try_lookup(
        &self,
        hash: Hash,
        key: &[u8],
        value: &mut ValueBuf,
        strays: &mut u32,
    ) -> Result<Option<bool>> {
        let locks = self.owner(hash)?;
        let before = locks.version.load(Ordering::Acquire);
        if before & 1 == 1 {
            return Ok(None);
        }
        let segment = locks.header();
        if !segment.owns(hash) {
            // The segment split since the mirror was read (at most 40 times for one hash).
            *strays += 1;
            if *strays > 128 {
                return Err(MapError::Corrupt(format!(
                    "the directory names no segment owning hash {:#018x}",
                    hash.0
                )));
            }
            return Ok(None);
        }
        // Made after the version was read: a writer whose commit failed poisoned the pool
        // before it released the version, and the view refuses a poisoned pool.
        let view = SegView::new(self.heap.raw_pool(), segment.at)?;
        let Some(summary) = locks.summary.get() else {
            drop(self.hold(hash)?); // builds the summary; then retry with it
            return Ok(None);
        };
        let home = hash.home();
        let found = if summary.homes[home as usize].load(Ordering::Acquire) & hash.summary_bit() != 0 {
            // The home bucket's four lines at once: the slot's miss overlaps the meta's.
            view.prefetch_bucket(home);
            let stable = || locks.version.load(Ordering::Relaxed) == before;
            self.find(&view, hash, key, &stable, Some(&mut *value))?.is_some()
        } else {
            false
        };
        std::sync::atomic::fence(Ordering::Acquire);
        if locks.version.load(Ordering::Relaxed) != before {
            return Ok(None);
        }
        Ok(Some(found))
    }

    /// Whether `key` is present.
    pub fn contains(&self, key: &[u8]) -> Result<bool> {
        Ok(self.get(key)?.is_some())
    }

    /// The hash of the key in a slot.
    pub(super) fn slot_hash(&self, view: &SegView, bucket: u64, slot: u64) -> Hash {
        let words = view.slot(bucket, slot);
        match info_kind(words[3]) {
            KIND_RECORD => Hash(words[0]),
            _ => {
                let key: [u8; 16] = bytemuck::cast([words[0], words[1]]);
                self.hash(&key[..info_key_len(words[3]).min(INLINE_KEY)])
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn occupied_fingerprint_matches_are_the_occupied_slots_holding_the_fingerprint() {
        let mut rng = fastrand::Rng::with_seed(3);
        for _ in 0..10_000 {
            let fingerprints: [u8; 8] = std::array::from_fn(|_| rng.u8(0..4));
            let (meta, wanted) = (rng.u64(..), rng.u8(0..4));
            let found = occupied_matches(meta, fingerprint_matches(fingerprints, wanted));
            for slot in 0..8 {
                let bit = found >> (8 * slot + 7) & 1 == 1;
                let occupied = slot < SLOTS && meta >> slot & 1 == 1;
                if occupied && fingerprints[slot as usize] == wanted {
                    assert!(bit, "slot {slot} of {fingerprints:?} / {meta:#x} missed");
                }
                if !occupied {
                    assert!(!bit, "free slot {slot} reported");
                }
                // A false match is only ever above a true one (the borrow of the subtraction).
                if bit && fingerprints[slot as usize] != wanted {
                    assert!(fingerprints[..slot as usize].contains(&wanted));
                }
            }
            assert_eq!(found & !(0x80u64 * 0x0101_0101_0101_0101), 0);
        }
    }
}
