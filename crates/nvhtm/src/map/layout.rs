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
//!                                            +24 info: kind 1, key length, value length
//!   out-of-place record:                     +0 key hash, +8 record offset, +24 info: kind 2
//! record (heap block): key length u32, value length u32, key, value
//! ```
//!
//! A key hashes (xxh3-64) to a directory entry by its top G bits, to a home bucket in
//! 0..255 by its low 32 bits, and to a fingerprint by bits 32..40; it lives in its home
//! bucket or one of the 15 after it (wrapping around), no farther than the home bucket's
//! reach. A segment at depth L owns exactly the hashes whose top L
//! bits equal its pattern; slots holding other hashes are stale copies left by a split.

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

/// Offsets inside a segment header.
pub const SEG_DEPTH: u64 = 8;
pub const SEG_PATTERN: u64 = 16;

/// The parts of a key's hash.
#[derive(Debug, Clone, Copy)]
pub struct Hash(pub u64);

impl Hash {
    pub fn of(key: &[u8]) -> Hash {
        Hash(xxhash_rust::xxh3::xxh3_64(key))
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
        (self.home() + i) % BUCKETS
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

pub fn info_kind(info: u64) -> u8 {
    info as u8
}

pub fn info_key_len(info: u64) -> usize {
    ((info >> 8) & 0xff) as usize
}

pub fn info_value_len(info: u64) -> usize {
    ((info >> 16) & 0xff) as usize
}
