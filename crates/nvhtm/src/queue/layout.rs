//! The queue's bytes: its root object and the payloads of its three kinds of log records.
//!
//! ```text
//! queue root (128 bytes: the heap's root object)
//!   +0  magic "NVQUEUE1"        +8  capacity (items; u64::MAX: unbounded)
//!   +16 version (1)             +24..+64 spare (zero)
//!   +64 the log's root (64 bytes, see log/layout.rs)
//!
//! log records (each a log record's payload; the log frames and checks it)
//!   ENQ         +0 kind 1       +1 the item's bytes
//!   DEQ         +0 kind 2       +1 consumer (u32)   +5 item id (u64)   +13 the item's bytes
//!   CHECKPOINT  +0 kind 3       +1 entries (u32), then per entry:
//!                               consumer (u32) · length (u32) · item id (u64) · the item's bytes
//! ```
//!
//! An item's id is the LSN of its ENQ record. Integers are little-endian.

use bytemuck::{Pod, Zeroable};

use crate::log::MAX_RECORD;

/// The root's magic: a queue.
///
/// ```
/// assert_eq!(&nvhtm::queue::QUEUE_MAGIC.to_le_bytes(), b"NVQUEUE1");
/// ```
pub const QUEUE_MAGIC: u64 = u64::from_le_bytes(*b"NVQUEUE1");

/// The layout version this code writes and reads.
pub(super) const QUEUE_VERSION: u64 = 1;

/// `capacity` of an unbounded queue.
pub(super) const UNBOUNDED: u64 = u64::MAX;

/// Where the log's root sits in the queue's root.
pub(super) const LOG_ROOT: u64 = 64;

/// The queue's root object.
#[repr(C)]
#[derive(Debug, Clone, Copy, Pod, Zeroable)]
pub(super) struct QueueRoot {
    pub magic: u64,
    pub capacity: u64,
    pub version: u64,
    pub spare: [u64; 5],
    pub log: [u64; 8],
}
const _: () = assert!(std::mem::size_of::<QueueRoot>() == 128);
const _: () = assert!(std::mem::offset_of!(QueueRoot, log) as u64 == LOG_ROOT);

const ENQ: u8 = 1;
const DEQ: u8 = 2;
const CHECKPOINT: u8 = 3;

/// The bytes a DEQ record adds before the item's.
const DEQ_HEADER: usize = 13;

/// The largest item a queue takes: its DEQ record (the item and 13 bytes) must fit a log
/// record.
///
/// ```
/// assert_eq!(nvhtm::queue::MAX_ITEM, nvhtm::log::MAX_RECORD - 13);
/// ```
pub const MAX_ITEM: usize = MAX_RECORD - DEQ_HEADER;

/// One record of the queue's log, decoded (borrowing the bytes read).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Record<'a> {
    /// An item enqueued; its id is the record's LSN.
    Enq(&'a [u8]),
    /// A consumer's dequeue of the item `id`, with a copy of the item.
    Deq { consumer: u32, id: u64, item: &'a [u8] },
    /// Each consumer's last dequeue, as of the record.
    Checkpoint(Vec<(u32, u64, &'a [u8])>),
}

/// Writes an ENQ record of `item` into `out`.
pub(super) fn enq(out: &mut Vec<u8>, item: &[u8]) {
    out.clear();
    out.push(ENQ);
    out.extend_from_slice(item);
}

/// Writes a DEQ record into `out`.
pub(super) fn deq(out: &mut Vec<u8>, consumer: u32, id: u64, item: &[u8]) {
    out.clear();
    out.push(DEQ);
    out.extend_from_slice(&consumer.to_le_bytes());
    out.extend_from_slice(&id.to_le_bytes());
    out.extend_from_slice(item);
}

/// Writes a CHECKPOINT record of `entries` (consumer, item id, item) into `out`.
pub(super) fn checkpoint<'a>(
    out: &mut Vec<u8>,
    entries: impl ExactSizeIterator<Item = (u32, u64, &'a [u8])>,
) {
    out.clear();
    out.push(CHECKPOINT);
    out.extend_from_slice(&(entries.len() as u32).to_le_bytes());
    for (consumer, id, item) in entries {
        out.extend_from_slice(&consumer.to_le_bytes());
        out.extend_from_slice(&(item.len() as u32).to_le_bytes());
        out.extend_from_slice(&id.to_le_bytes());
        out.extend_from_slice(item);
    }
}

/// The bytes of a CHECKPOINT record's entry for an item of `len` bytes.
pub(super) fn checkpoint_entry(len: usize) -> u64 {
    16 + len as u64
}

/// The bytes of a CHECKPOINT record of entries for items of these lengths.
pub(super) fn checkpoint_size(lens: impl Iterator<Item = usize>) -> u64 {
    5 + lens.map(checkpoint_entry).sum::<u64>()
}

/// The item of an ENQ record (`None`: not an ENQ record).
pub(super) fn enq_item(bytes: &[u8]) -> Option<&[u8]> {
    match bytes.split_first() {
        Some((&ENQ, item)) => Some(item),
        _ => None,
    }
}

/// Decodes a record; `Err` says what is wrong with it.
pub(super) fn decode(bytes: &[u8]) -> Result<Record<'_>, String> {
    let mut r = Reader { bytes, at: 0 };
    match r.take(1)?[0] {
        ENQ => Ok(Record::Enq(&bytes[1..])),
        DEQ => {
            let consumer = r.u32()?;
            let id = r.u64()?;
            Ok(Record::Deq { consumer, id, item: &bytes[r.at..] })
        }
        CHECKPOINT => {
            let n = r.u32()? as usize;
            // Each entry takes at least 16 bytes: a count beyond that is not believed.
            let mut entries = Vec::with_capacity(n.min(bytes.len() / 16));
            for _ in 0..n {
                let consumer = r.u32()?;
                let len = r.u32()? as usize;
                let id = r.u64()?;
                entries.push((consumer, id, r.take(len)?));
            }
            if r.at != bytes.len() {
                return Err(format!("a checkpoint with {} bytes after its {n} entries", bytes.len() - r.at));
            }
            Ok(Record::Checkpoint(entries))
        }
        kind => Err(format!("a record of kind {kind}")),
    }
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        let end = self.at.checked_add(n).filter(|&end| end <= self.bytes.len());
        let end = end.ok_or_else(|| format!("a record of {} bytes cut short", self.bytes.len()))?;
        let out = &self.bytes[self.at..end];
        self.at = end;
        Ok(out)
    }

    fn u32(&mut self) -> Result<u32, String> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().expect("4 bytes")))
    }

    fn u64(&mut self) -> Result<u64, String> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().expect("8 bytes")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_decode_to_what_was_encoded_and_short_ones_are_refused() {
        let mut out = Vec::new();
        enq(&mut out, b"item");
        assert_eq!(decode(&out), Ok(Record::Enq(b"item")));
        assert_eq!(enq_item(&out), Some(&b"item"[..]));
        deq(&mut out, 7, 4096, b"item");
        assert_eq!(out.len(), DEQ_HEADER + 4);
        assert_eq!(decode(&out), Ok(Record::Deq { consumer: 7, id: 4096, item: b"item" }));
        assert_eq!(enq_item(&out), None);
        let entries = [(1u32, 8u64, &b"a"[..]), (2, 64, b"")];
        checkpoint(&mut out, entries.iter().copied());
        assert_eq!(decode(&out), Ok(Record::Checkpoint(entries.to_vec())));
        assert_eq!(out.len() as u64, checkpoint_size([1, 0].into_iter()));
        assert!(decode(&out[..out.len() - 1]).is_err());
        assert!(decode(&[DEQ, 1, 2]).is_err());
        assert!(decode(&[9]).is_err());
        assert!(decode(&[]).is_err());
        let mut huge = vec![CHECKPOINT];
        huge.extend_from_slice(&u32::MAX.to_le_bytes());
        assert!(decode(&huge).is_err());
    }
}
