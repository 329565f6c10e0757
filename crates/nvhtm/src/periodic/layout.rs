//! The periodic map's bytes on media: the root, the directory, segments of buckets, the
//! bucket's status word, and the immutable blocks that hold a bucket's entries.
//!
//! ```text
//! root (the heap's root object, 128 bytes)
//!   +0  magic "NVDALI01"     +8  directory        +16 arena chunk table   +24 hash seed
//!   +32 durable epoch        +40 clean mark       +48 failed-epoch list   +56 base epoch
//!   +64 epoch length (µs)    +72..+128 spare (zero)
//!
//! directory:  magic · global depth · 2^depth segment offsets
//! segment:    magic · local depth · hash pattern · 5 spare words (64 bytes), then
//!             BUCKETS buckets of 32 bytes (two per cache line, never straddling one):
//!   bucket +0 status word  +8 head 0  +16 head 1  +24 head 2
//!
//! status word (8 bytes, stored last, after the head it publishes, in the same line):
//!   bits 0-1  a: the head written in the bucket's last epoch
//!   bits 2-3  f + 1: the head as of the end of the epoch before (0: none, i.e. c)
//!   bits 4-5  c: the head as of the end of an earlier epoch (never from a failed one)
//!   bits 8-63 the epoch of the bucket's last update
//!
//! block (immutable once published; one arena slot):
//!   +0 entry count (u32) · total length in bytes (u32), then per entry:
//!      key length (u32) · value length (u32) · key · value, padded to 8 bytes
//! ```
//!
//! A status word of 0 is an empty bucket that was never written: every head is null.

/// The root's magic: a periodic (Dalí) map.
pub const PERIODIC_MAGIC: u64 = u64::from_le_bytes(*b"NVDALI01");
pub(super) const DIR_MAGIC: u64 = u64::from_le_bytes(*b"NVDALDIR");
pub(super) const SEG_MAGIC: u64 = u64::from_le_bytes(*b"NVDALSEG");
pub(super) const CHUNKS_MAGIC: u64 = u64::from_le_bytes(*b"NVDALCHK");
pub(super) const FAILED_MAGIC: u64 = u64::from_le_bytes(*b"NVDALFLD");

pub(super) const ROOT_MAGIC: u64 = 0;
pub(super) const ROOT_DIR: u64 = 8;
pub(super) const ROOT_CHUNKS: u64 = 16;
pub(super) const ROOT_SEED: u64 = 24;
pub(super) const ROOT_DURABLE: u64 = 32;
pub(super) const ROOT_CLEAN: u64 = 40;
pub(super) const ROOT_FAILED: u64 = 48;
pub(super) const ROOT_BASE: u64 = 56;
pub(super) const ROOT_EPOCH_US: u64 = 64;
/// The root object.
pub(super) type Root = [u64; 16];

/// The clean mark's flag: `CLEAN | durable` says the map was closed after its last write
/// became durable, so no epoch after `durable` holds a write.
pub(super) const CLEAN: u64 = 1 << 63;

/// Directory header: magic, depth.
pub(super) const DIR_HEADER: u64 = 16;
/// Segment header.
pub(super) const SEG_HEADER: u64 = 64;
/// Buckets per segment.
pub const BUCKETS: u64 = 64;
/// Bytes per bucket.
pub(super) const BUCKET_SIZE: u64 = 32;
pub(super) const SEGMENT_SIZE: u64 = SEG_HEADER + BUCKETS * BUCKET_SIZE;
/// The most entries one bucket holds; one more splits its segment.
pub const MAX_ENTRIES: usize = 6;
/// Deepest directory.
pub(super) const MAX_DEPTH: u32 = 40;

const _: () = assert!(SEG_HEADER % 64 == 0 && BUCKET_SIZE * 2 == 64, "buckets must not straddle lines");

/// Offset of bucket `b` of the segment at `seg`.
pub(super) fn bucket_offset(seg: u64, b: u64) -> u64 {
    seg + SEG_HEADER + b * BUCKET_SIZE
}

/// A key's keyed hash.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Hash(pub u64);

impl Hash {
    pub fn of(seed: u64, key: &[u8]) -> Hash {
        Hash(xxhash_rust::xxh3::xxh3_64_with_seed(key, seed))
    }

    /// The bucket within its segment (from the low 32 bits; segments are chosen by the top).
    pub fn bucket(self) -> u64 {
        (u64::from(self.0 as u32) * BUCKETS) >> 32
    }

    /// The top `depth` bits: the directory index at that depth, the pattern a segment of
    /// that local depth owns.
    pub fn prefix(self, depth: u32) -> u64 {
        if depth == 0 {
            0
        } else {
            self.0 >> (64 - depth)
        }
    }
}

/// Which head holds which state, and the epoch of the last update.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Status {
    pub epoch: u64,
    /// The newest head: the state as of the end of `epoch`.
    pub a: usize,
    /// The state as of the end of `epoch - 1`, when the bucket was updated in that epoch.
    pub f: Option<usize>,
    /// The state as of the end of an epoch before `epoch - 1` (or before the bucket's first
    /// write): never from a failed epoch.
    pub c: usize,
}

impl Status {
    pub fn decode(word: u64) -> Status {
        if word == 0 {
            return Status { epoch: 0, a: 0, f: None, c: 1 };
        }
        let f = ((word >> 2) & 3) as usize;
        Status {
            epoch: word >> 8,
            a: (word & 3) as usize,
            f: (f != 0).then(|| f - 1),
            c: ((word >> 4) & 3) as usize,
        }
    }

    pub fn encode(self) -> u64 {
        debug_assert!(self.a < 3 && self.c < 3 && self.a != self.c, "{self:?}");
        debug_assert!(self.f.is_none_or(|f| f < 3 && f != self.a && f != self.c), "{self:?}");
        debug_assert!(self.epoch > 0 && self.epoch < 1 << 56, "{self:?}");
        self.epoch << 8 | (self.c as u64) << 4 | (self.f.map_or(0, |f| f + 1) as u64) << 2 | self.a as u64
    }

    /// The head that holds the bucket's state once the epochs `failed` says failed are
    /// ignored: the newest head unless its epoch failed, else the previous epoch's unless that
    /// failed too, else the committed one.
    pub fn valid(self, failed: impl Fn(u64) -> bool) -> usize {
        if !failed(self.epoch) {
            self.a
        } else {
            match self.f {
                Some(f) if !failed(self.epoch - 1) => f,
                _ => self.c,
            }
        }
    }

    /// The heads this status uses (whose blocks the bucket owns).
    pub fn in_use(self) -> impl Iterator<Item = usize> {
        [Some(self.a), self.f, Some(self.c)].into_iter().flatten()
    }

    /// The status after an update in epoch `now` (not before the status's epoch), and the
    /// head the update writes. The head to write is never one that a crash in `now` could
    /// need: it is neither the newest state nor the state as of the end of `now - 2`, and
    /// the epochs before `now - 1` are settled (durable or failed) by the time `now` runs.
    pub fn next(self, now: u64, failed: impl Fn(u64) -> bool) -> Status {
        debug_assert!(now >= self.epoch && now > 0, "{self:?} updated in epoch {now}");
        let next = self.rotate(now, &failed);
        // The invariants the recovery argument rests on: a crash that fails `now` falls back
        // to the same state as before the update, and one that fails `now - 1` too falls back
        // to a state the update does not overwrite.
        let fails_now = |e: u64| failed(e) || e == now;
        debug_assert_eq!(next.valid(fails_now), self.valid(fails_now), "{self:?} -> {next:?}");
        debug_assert_ne!(next.a, next.valid(fails_now), "{self:?} -> {next:?}");
        debug_assert_ne!(next.a, self.valid(|e| failed(e) || e + 1 >= now), "{self:?} -> {next:?}");
        next
    }

    fn rotate(self, now: u64, failed: impl Fn(u64) -> bool) -> Status {
        if self.epoch == now {
            return self;
        }
        if self.epoch + 1 == now && !failed(self.epoch) {
            let c = match self.f {
                Some(f) if !failed(self.epoch - 1) => f,
                _ => self.c,
            };
            let f = self.a;
            return Status { epoch: now, a: 3 - f - c, f: Some(f), c };
        }
        let c = self.valid(failed);
        Status { epoch: now, a: (c + 1) % 3, f: None, c }
    }
}

pub(super) fn entry_len(key: usize, value: usize) -> u64 {
    (8 + key as u64 + value as u64).next_multiple_of(8)
}

/// A key and its value, borrowed from a block.
pub(super) type Entry<'a> = (&'a [u8], &'a [u8]);

/// The entries of a block's bytes, checked one by one: an `Err` names what is wrong.
#[derive(Debug, Clone)]
pub(super) struct BlockIter<'a> {
    bytes: &'a [u8],
    at: usize,
    left: usize,
}

/// The entries of a block (an empty slice: no entries).
pub(super) fn entries(bytes: &[u8]) -> Result<BlockIter<'_>, String> {
    if bytes.is_empty() {
        return Ok(BlockIter { bytes, at: 0, left: 0 });
    }
    let count = u32_at(bytes, 0)? as usize;
    if count > MAX_ENTRIES {
        return Err(format!("block of {count} entries (at most {MAX_ENTRIES})"));
    }
    Ok(BlockIter { bytes, at: 8, left: count })
}

fn u32_at(bytes: &[u8], at: usize) -> Result<u32, String> {
    bytes
        .get(at..at + 4)
        .map(|b| u32::from_le_bytes(b.try_into().unwrap()))
        .ok_or_else(|| format!("block truncated at byte {at}"))
}

impl<'a> Iterator for BlockIter<'a> {
    type Item = Result<Entry<'a>, String>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.left == 0 {
            return None;
        }
        self.left -= 1;
        let entry = (|| {
            let (klen, vlen) =
                (u32_at(self.bytes, self.at)? as usize, u32_at(self.bytes, self.at + 4)? as usize);
            let start = self.at + 8;
            let key = self.bytes.get(start..start + klen).ok_or("entry key past the block")?;
            let value =
                self.bytes.get(start + klen..start + klen + vlen).ok_or("entry value past the block")?;
            self.at += entry_len(klen, vlen) as usize;
            Ok((key, value))
        })();
        if entry.is_err() {
            self.left = 0;
        }
        Some(entry)
    }
}

/// The entries of a block's bytes, collected.
pub(super) fn decode_block(bytes: &[u8]) -> Result<Vec<Entry<'_>>, String> {
    entries(bytes)?.collect()
}

/// Builds a block in a reusable buffer: entries appended, the header written at the end.
#[derive(Debug, Default)]
pub(super) struct BlockBuilder {
    pub bytes: Vec<u8>,
    count: u32,
}

impl BlockBuilder {
    pub fn start(&mut self) {
        self.bytes.clear();
        self.bytes.extend_from_slice(&[0; 8]);
        self.count = 0;
    }

    pub fn push(&mut self, key: &[u8], value: &[u8]) {
        self.bytes.extend_from_slice(&(key.len() as u32).to_le_bytes());
        self.bytes.extend_from_slice(&(value.len() as u32).to_le_bytes());
        self.bytes.extend_from_slice(key);
        self.bytes.extend_from_slice(value);
        self.bytes.resize(self.bytes.len().next_multiple_of(8), 0);
        self.count += 1;
    }

    pub fn count(&self) -> usize {
        self.count as usize
    }

    /// The finished block (empty when it holds no entry: the bucket's head becomes null).
    pub fn finish(&mut self) -> &[u8] {
        if self.count == 0 {
            self.bytes.clear();
            return &self.bytes;
        }
        let total = self.bytes.len() as u32;
        self.bytes[..4].copy_from_slice(&self.count.to_le_bytes());
        self.bytes[4..8].copy_from_slice(&total.to_le_bytes());
        &self.bytes
    }
}

/// Encodes entries as a block.
pub(super) fn encode_block<'a>(entries: impl Iterator<Item = Entry<'a>>, out: &mut Vec<u8>) {
    let mut builder = BlockBuilder { bytes: std::mem::take(out), count: 0 };
    builder.start();
    for (k, v) in entries {
        builder.push(k, v);
    }
    builder.finish();
    *out = builder.bytes;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn never(_: u64) -> bool {
        false
    }

    #[test]
    fn status_words_round_trip() {
        for s in [Status { epoch: 5, a: 2, f: Some(0), c: 1 }, Status { epoch: 1 << 40, a: 0, f: None, c: 2 }]
        {
            assert_eq!(Status::decode(s.encode()), s);
        }
        assert_eq!(Status::decode(0).valid(never), 0);
    }

    #[test]
    fn rotation_keeps_the_states_a_crash_may_need() {
        // Updated in epoch 7, then 8: f is 7's state, c the state before 7 (empty).
        let s7 = Status::decode(0).next(7, never);
        assert_eq!(s7, Status { epoch: 7, a: 1, f: None, c: 0 });
        let s8 = s7.next(8, never);
        assert_eq!(s8, Status { epoch: 8, a: 2, f: Some(1), c: 0 });
        // 8 and 7 failed: the state before 7.
        assert_eq!(s8.valid(|e| e >= 7), 0);
        // Only 8 failed: 7's state.
        assert_eq!(s8.valid(|e| e == 8), 1);
        // Epoch 9 writes the head of the state before 7 (no crash in 9 needs it).
        let s9 = s8.next(9, never);
        assert_eq!(s9, Status { epoch: 9, a: 0, f: Some(2), c: 1 });
        // A repair: 9 and 10 failed, the next write in 12 keeps 8's state as committed.
        let s12 = s9.next(12, |e| e == 9 || e == 10);
        assert_eq!(s12, Status { epoch: 12, a: 0, f: None, c: 2 });
    }

    #[test]
    fn blocks_round_trip_and_reject_garbage() {
        let entries: Vec<(&[u8], &[u8])> = vec![(b"k", b"value"), (b"", b""), (b"key two", &[7; 20])];
        let mut bytes = Vec::new();
        encode_block(entries.iter().copied(), &mut bytes);
        assert_eq!(bytes.len(), 8 + 16 + 8 + 40);
        assert_eq!(decode_block(&bytes).unwrap(), entries);
        assert!(decode_block(&bytes[..bytes.len() - 8]).is_err());
        assert!(decode_block(&[9, 0, 0, 0, 0, 0, 0, 0]).is_err());
    }
}
