//! On-media layout of the strict map.
//!
//! ```text
//! map root (the heap's root object, 64 B):  magic, directory, next segment id
//! directory (heap block):                   magic, global depth G, 2^G segment offsets
//! segment (heap block, one chunk):          +0  magic, local depth L, pattern P, id
//!                                           +64 255 buckets of 256 B
//! bucket (4 cache lines):
//!   +0   meta word: bits 0..7 occupied slots, bits 8..11 reach: the farthest bucket (0..15
//!        after this one) holding a key homed here
//!   +8   fingerprints: one byte per slot
//!   +32  slot 0 │ +64 slots 1,2 │ +128 slots 3,4 │ +192 slots 5,6
//! slot (32 B):
//!   inline record (key ≤ 16 B, value ≤ 8 B): +0 key (16 B, zero padded), +16 value (8 B),
//!                                            +24 info: kind 1, key length, value length,
//!                                                bit 24: a hint follows: bits 32..39 the key's
//!                                                home bucket, bits 40..45 its low 6 hash bits
//!   out-of-place record:                     +0 key hash, +8 record offset, +24 info: kind 2
//! record (heap block): key length u32, value length u32, key, value
//! ```
//!
//! A key hashes (xxh3-64, keyed by the map's secret seed) to a directory entry by its top G bits, to a home bucket in
//! 0..255 by its low 32 bits, and to a fingerprint by bits 32..40; it lives in its home
//! bucket or one of the 15 after it (wrapping around), no farther than the home bucket's
//! reach. A segment at depth L owns exactly the hashes whose top L
//! bits equal its pattern; slots holding other hashes are stale copies left by a split.

/// The root's magic: a strict map.
pub const MAP_MAGIC: u64 = u64::from_le_bytes(*b"NVMAP001");
pub const DIR_MAGIC: u64 = u64::from_le_bytes(*b"NVDIR001");
pub const SEG_MAGIC: u64 = u64::from_le_bytes(*b"NVSEG001");

pub const BUCKETS: u64 = 255;
pub const WINDOW: u64 = 16;
pub const BUCKET: u64 = 256;
pub const SLOTS: u64 = 7;
pub const SEGMENT_SIZE: u64 = 64 + BUCKETS * BUCKET;
pub const DIR_HEADER: u64 = 16;

/// Longest key stored inline in a slot.
pub const INLINE_KEY: usize = 16;
/// Longest value stored inline in a slot.
pub const INLINE_VALUE: usize = 8;
pub const KIND_INLINE: u8 = 1;
pub const KIND_RECORD: u8 = 2;

/// Offsets inside the map root.
pub const ROOT_MAGIC: u64 = 0;
pub const ROOT_DIR: u64 = 8;
pub const ROOT_NEXT_ID: u64 = 16;
/// The map's secret hash seed (0 in maps made before keyed hashing: the unkeyed hash).
pub const ROOT_SEED: u64 = 24;

/// Offsets inside a segment header.
pub const SEG_DEPTH: u64 = 8;
pub const SEG_PATTERN: u64 = 16;

/// The parts of a key's hash.
#[derive(Debug, Clone, Copy)]
pub struct Hash(pub u64);

impl Hash {
    /// The keyed hash of `key` under the map's secret `seed` (xxh3-64 with a seed; seed 0 is
    /// the unkeyed xxh3-64).
    #[inline]
    pub fn of(seed: u64, key: &[u8]) -> Hash {
        Hash(xxhash_rust::xxh3::xxh3_64_with_seed(key, seed))
    }

    pub fn home(self) -> u64 {
        (u64::from(self.0 as u32) * BUCKETS) >> 32
    }

    /// This key's bit in its home bucket's DRAM summary (the low 6 hash bits: independent of
    /// the home, the fingerprint and any directory prefix).
    pub fn summary_bit(self) -> u64 {
        1 << (self.0 & 63)
    }

    /// The `i`-th bucket of the key's window.
    pub fn bucket(self, i: u64) -> u64 {
        let bucket = self.home() + i;
        // One subtraction for the window's buckets (i < WINDOW), not a division.
        if bucket < BUCKETS {
            bucket
        } else if bucket < 2 * BUCKETS {
            bucket - BUCKETS
        } else {
            bucket % BUCKETS
        }
    }

    pub fn fingerprint(self) -> u8 {
        (self.0 >> 32) as u8
    }

    /// The top `depth` bits (0 for depth 0).
    pub fn prefix(self, depth: u64) -> u64 {
        if depth == 0 {
            0
        } else {
            self.0 >> (64 - depth)
        }
    }
}

/// The slots a bucket's meta word marks occupied.
pub fn occupied(meta: u64) -> impl Iterator<Item = u64> {
    (0..SLOTS).filter(move |s| meta & (1 << s) != 0)
}

/// The first slot a bucket's meta word (or occupancy mask) leaves free.
pub fn first_free(meta: u64) -> Option<u64> {
    (0..SLOTS).find(|s| meta & (1 << s) == 0)
}

/// How far `bucket` lies past `home`, wrapping around.
pub fn distance(home: u64, bucket: u64) -> u64 {
    (bucket + BUCKETS - home) % BUCKETS
}

pub fn bucket_offset(segment: u64, bucket: u64) -> u64 {
    segment + 64 + bucket * BUCKET
}

pub fn slot_offset(segment: u64, bucket: u64, slot: u64) -> u64 {
    bucket_offset(segment, bucket) + 32 + slot * 32
}

/// How far past this bucket keys homed here may lie.
pub fn reach(meta: u64) -> u64 {
    (meta >> 8) & 0xf
}

/// The meta word with its reach raised to at least `distance`.
pub fn with_reach(meta: u64, distance: u64) -> u64 {
    (meta & !0xf00) | (reach(meta).max(distance).min(WINDOW - 1) << 8)
}

/// Slot info word.
pub fn info(kind: u8, key_len: usize, value_len: usize) -> u64 {
    u64::from(kind) | (key_len as u64) << 8 | (value_len as u64) << 16
}

/// Bit 24 of an inline slot's info word: the word also holds the key's home bucket (bits
/// 32..39) and its low 6 hash bits (40..45), so that a removal can recompute its home's summary
/// without hashing the keys around it. Slots written before hints have it clear (their keys
/// are hashed); readers of the kind and lengths ignore these bits.
pub const INFO_HINT: u64 = 1 << 24;

/// `info` with the hint of the key whose hash is `hash`.
pub fn with_hint(info: u64, hash: Hash) -> u64 {
    info | INFO_HINT | hash.home() << 32 | (hash.0 & 63) << 40
}

/// The home bucket and summary bit (see [`Hash::summary_bit`]) a hinted info word holds.
pub fn hint(info: u64) -> Option<(u64, u64)> {
    (info & INFO_HINT != 0).then(|| ((info >> 32) & 0xff, 1 << ((info >> 40) & 63)))
}

pub fn info_kind(info: u64) -> u8 {
    info as u8
}

pub fn info_key_len(info: u64) -> usize {
    ((info >> 8) & 0xff) as usize
}

pub fn info_value_len(info: u64) -> usize {
    ((info >> 16) & 0xff) as usize
}

/// Where a split puts the keys that move to the new segment, given in the order of their old
/// positions (bucket, slot) with those positions: each at the first free slot from its home,
/// which packs them into few cache lines. That always fits when no window wraps around the
/// segment's end (a key then finds a slot no later than its old one: every key placed between
/// its home and its old bucket came from there too), but a wrapped key placed early can take
/// the last room of a later key's window; then every key keeps its old position, which fits.
pub fn pack_moved(moving: &[(Hash, (u64, u64))]) -> Vec<(u64, u64)> {
    let mut used = [0u8; BUCKETS as usize];
    let mut packed = Vec::with_capacity(moving.len());
    for (hash, _) in moving {
        let free = (0..WINDOW)
            .map(|i| hash.bucket(i))
            .find_map(|b| first_free(u64::from(used[b as usize])).map(|s| (b, s)));
        match free {
            Some((bucket, slot)) => {
                used[bucket as usize] |= 1 << slot;
                packed.push((bucket, slot));
            }
            None => return moving.iter().map(|&(_, old)| old).collect(),
        }
    }
    packed
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A hash whose home bucket is `home`.
    fn homed(home: u64, salt: u64) -> Hash {
        let hash = Hash((home << 32).div_ceil(BUCKETS) | salt << 40);
        assert_eq!(hash.home(), home);
        hash
    }

    fn assert_valid(moving: &[(Hash, (u64, u64))], placed: &[(u64, u64)]) {
        assert_eq!(placed.len(), moving.len());
        let mut seen = std::collections::HashSet::new();
        for ((hash, _), &(bucket, slot)) in moving.iter().zip(placed) {
            assert!(
                distance(hash.home(), bucket) < WINDOW && slot < SLOTS,
                "{bucket}/{slot} outside the window"
            );
            assert!(seen.insert((bucket, slot)), "{bucket}/{slot} used twice");
        }
    }

    #[test]
    fn a_hint_holds_the_home_and_summary_bit_and_leaves_kind_and_lengths() {
        for seed in 0..1000u64 {
            let hash = Hash(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15));
            let plain = info(KIND_INLINE, 16, 8);
            assert_eq!(hint(plain), None);
            let hinted = with_hint(plain, hash);
            assert_eq!(hint(hinted), Some((hash.home(), hash.summary_bit())));
            assert_eq!(
                (info_kind(hinted), info_key_len(hinted), info_value_len(hinted)),
                (KIND_INLINE, 16, 8)
            );
        }
    }

    #[test]
    fn moved_keys_are_packed_from_their_homes() {
        // Three keys homed at bucket 10, spread over buckets 10..13 in the old segment.
        let moving: Vec<_> = [(10, 3), (11, 6), (13, 0)].iter().map(|&old| (homed(10, old.0), old)).collect();
        let placed = pack_moved(&moving);
        assert_eq!(placed, vec![(10, 0), (10, 1), (10, 2)]);
        assert_valid(&moving, &placed);
    }

    #[test]
    fn a_wrapped_window_that_defeats_packing_keeps_the_old_positions() {
        // Old segment: bucket 0 holds keys homed at 254 (wrapped), buckets 239..253 keys homed
        // at 239, bucket 254 keys homed at 239 (its window's last bucket). Packing in position
        // order puts the wrapped keys at 254 first, and the last seven then find no room.
        let mut moving = Vec::new();
        for bucket in [0].into_iter().chain(239..BUCKETS) {
            for slot in 0..SLOTS {
                let home = if bucket == 0 { 254 } else { 239 };
                moving.push((homed(home, bucket * SLOTS + slot), (bucket, slot)));
            }
        }
        let placed = pack_moved(&moving);
        let old: Vec<_> = moving.iter().map(|&(_, old)| old).collect();
        assert_eq!(placed, old);
        assert_valid(&moving, &placed);
    }

    #[test]
    fn packing_always_yields_a_valid_placement() {
        let mut rng = fastrand::Rng::with_seed(7);
        for _ in 0..300 {
            // A valid old segment (first-fit inserts at a random load), then a random subset.
            let mut old = [[None::<Hash>; SLOTS as usize]; BUCKETS as usize];
            for _ in 0..rng.u64(100..2000) {
                let hash = Hash(rng.u64(..));
                let free = (0..WINDOW).map(|i| hash.bucket(i)).find_map(|b| {
                    (0..SLOTS).find(|&s| old[b as usize][s as usize].is_none()).map(|s| (b, s))
                });
                if let Some((b, s)) = free {
                    old[b as usize][s as usize] = Some(hash);
                }
            }
            let moving: Vec<_> = (0..BUCKETS)
                .flat_map(|b| (0..SLOTS).map(move |s| (b, s)))
                .filter_map(|(b, s)| old[b as usize][s as usize].map(|h| (h, (b, s))))
                .filter(|_| rng.bool())
                .collect();
            assert_valid(&moving, &pack_moved(&moving));
        }
    }
}
