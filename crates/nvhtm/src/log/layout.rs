//! The log's bytes on media: its root, its segments, and the records in them.
//!
//! ```text
//! log root (64 bytes: the heap's root object of a Log, or embedded in a queue's or a map's)
//!   +0  magic "NVLOG001"        +8  segment size (bytes of records per segment)
//!   +16 head segment            +24 head LSN (the first live record)
//!   +32 tail segment            +40 closed mark (tail LSN + 1 when closed cleanly, else 0)
//!   +48 segments still to free (a truncation's, linked towards the head; 0: none)
//!   +56 spare (zero)
//!
//! segment (a heap block; linked from the head segment to the tail segment)
//!   +0  magic "NVLOGSEG"        +8  start LSN (of its first record)
//!   +16 capacity (record bytes) +24 next segment (0: the tail segment)
//!   +32 tag (u32, never 0) · spare (u32)          +40..+64 spare (zero)
//!   +64 records, back to back, each 8-byte aligned:
//!
//! record
//!   +0  payload length (u32)    +4  tag (u32: its segment's)
//!   +8  check (u64): xxh3 of the payload, seeded by the LSN, length and tag
//!   +16 payload, padded with zeros to 8 bytes
//! ```
//!
//! An LSN is a record's logical byte position: LSNs grow by each record's size and never
//! repeat, segment after segment. A segment ends where the next one's start LSN says; the
//! tail segment ends at the first record that does not check — the torn or unwritten tail.
//!
//! Why a record cannot be taken for another: its check covers its LSN (a stale record of
//! an earlier use of the same bytes sat at another LSN) and its segment's tag (random, drawn
//! when the segment was allocated: a run after a crash appends to a new segment, so the bytes
//! a crashed run left beyond its tail — even whole records that were never acknowledged —
//! never carry the tag the scan looks for). A run goes on appending in the tail segment only
//! when the closed mark says the log was closed cleanly at exactly the tail the scan found;
//! the first append of a run clears the mark, durably, before it writes a record.

use bytemuck::{Pod, Zeroable};

/// The root's magic: a log.
pub const LOG_MAGIC: u64 = u64::from_le_bytes(*b"NVLOG001");
pub(super) const SEGMENT_MAGIC: u64 = u64::from_le_bytes(*b"NVLOGSEG");

/// The log's root.
#[repr(C)]
#[derive(Debug, Clone, Copy, Pod, Zeroable)]
pub(crate) struct LogRoot {
    pub magic: u64,
    pub segment_size: u64,
    pub head_segment: u64,
    pub head_lsn: u64,
    pub tail_segment: u64,
    pub closed: u64,
    pub to_free: u64,
    pub spare: u64,
}
const _: () = assert!(std::mem::size_of::<LogRoot>() == 64);

/// Byte offsets of the root's words.
pub(super) const ROOT_HEAD_SEGMENT: u64 = 16;
pub(super) const ROOT_HEAD_LSN: u64 = 24;
pub(super) const ROOT_TAIL_SEGMENT: u64 = 32;
pub(super) const ROOT_CLOSED: u64 = 40;
pub(super) const ROOT_TO_FREE: u64 = 48;

/// A segment's header.
#[repr(C)]
#[derive(Debug, Clone, Copy, Pod, Zeroable)]
pub(super) struct SegmentHeader {
    pub magic: u64,
    pub start_lsn: u64,
    pub capacity: u64,
    pub next: u64,
    pub tag: u32,
    pub spare_tag: u32,
    pub spare: [u64; 3],
}
const _: () = assert!(std::mem::size_of::<SegmentHeader>() == SEGMENT_HEADER as usize);

pub(super) const SEGMENT_HEADER: u64 = 64;
/// Byte offset of a segment's `next` word.
pub(super) const SEGMENT_NEXT: u64 = 24;

/// A record's header.
pub(super) const RECORD_HEADER: u64 = 16;

/// The largest payload of one record (a record larger than the log's segment size gets a
/// segment of its own).
pub const MAX_RECORD: usize = 64 << 20;

/// The segment size a log created with the default options has.
pub const DEFAULT_SEGMENT_SIZE: u64 = 1 << 20;

/// The smallest segment size.
pub const MIN_SEGMENT_SIZE: u64 = 256;

/// The bytes a record of `len` payload bytes takes.
pub(crate) fn record_size(len: usize) -> u64 {
    RECORD_HEADER + (len as u64).next_multiple_of(8)
}

/// The check of a record: its payload's xxh3, seeded by where it is and what it claims.
pub(super) fn check(lsn: u64, tag: u32, payload: &[u8]) -> u64 {
    check_parts(lsn, tag, &[payload])
}

/// [`check`] of the payload made of `parts`, back to back.
pub(super) fn check_parts(lsn: u64, tag: u32, parts: &[&[u8]]) -> u64 {
    let len: usize = parts.iter().map(|p| p.len()).sum();
    let seed = lsn.rotate_left(32) ^ (u64::from(tag) << 32 | len as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    if let [one] = parts {
        return xxhash_rust::xxh3::xxh3_64_with_seed(one, seed);
    }
    let mut hasher = xxhash_rust::xxh3::Xxh3::with_seed(seed);
    for part in parts {
        hasher.update(part);
    }
    hasher.digest()
}

/// A record header's words, for the payload made of `parts`.
pub(super) fn record_header(lsn: u64, tag: u32, parts: &[&[u8]]) -> [u8; 16] {
    let len: usize = parts.iter().map(|p| p.len()).sum();
    let mut header = [0u8; 16];
    header[..4].copy_from_slice(&(len as u32).to_le_bytes());
    header[4..8].copy_from_slice(&tag.to_le_bytes());
    header[8..].copy_from_slice(&check_parts(lsn, tag, parts).to_le_bytes());
    header
}

/// A record header read back: `(length, tag, check)`.
pub(super) fn parse_header(header: [u8; 16]) -> (usize, u32, u64) {
    let word = |r: std::ops::Range<usize>| {
        let mut b = [0u8; 8];
        b[..r.len()].copy_from_slice(&header[r]);
        u64::from_le_bytes(b)
    };
    (word(0..4) as usize, word(4..8) as u32, word(8..16))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_checks_only_at_its_own_lsn_with_its_own_tag_and_length() {
        let payload = b"payload";
        let c = check(4096, 7, payload);
        assert_ne!(c, check(4104, 7, payload));
        assert_ne!(c, check(4096, 8, payload));
        assert_ne!(c, check(4096, 7, b"payloa"));
        let (len, tag, stored) = parse_header(record_header(4096, 7, &[payload]));
        assert_eq!((len, tag, stored), (7, 7, c));
        assert_eq!(check_parts(4096, 7, &[b"pay", b"", b"load"]), c, "parts hash as their concatenation");
        assert_eq!(record_size(7), 24);
        assert_eq!(record_size(0), 16);
    }
}
