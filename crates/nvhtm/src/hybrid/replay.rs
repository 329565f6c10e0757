//! Opening: the log replayed into the index, on two threads. The calling thread scans the log
//! (each record's check verified) and applies the records of the even shards itself; the odd
//! shards' records go, in batches and in log order, to a second thread. Each shard is rebuilt
//! by one thread in log order, so the last record of every key wins, as it did when written.

use std::sync::atomic::Ordering;
use std::sync::mpsc;

use super::index::Entry;
use super::*;
use crate::log::LogError;

/// One record, for the thread that owns its shard.
#[derive(Debug, Clone, Copy)]
struct Item {
    hash: u64,
    offset: u64,
    put: bool,
    size: u64,
}

/// Records per batch handed to the second thread.
const BATCH: usize = 4096;
/// A log shorter than this is replayed on one thread (a thread costs more than it saves).
const PARALLEL_FROM: u64 = 1 << 20;

/// [`PARALLEL_FROM`], for the tests.
#[cfg(test)]
pub(super) fn parallel_from() -> u64 {
    PARALLEL_FROM
}

fn log_error(e: MapError) -> LogError {
    match e {
        MapError::Log(l) => l,
        MapError::Heap(h) => LogError::Heap(h),
        other => LogError::Corrupt(other.to_string()),
    }
}

impl<D: Domain> HybridMap<D> {
    /// Rebuilds the index from the log: every put and delete, in log order per key.
    pub(super) fn replay(&self) -> Result<()> {
        // Tables sized as if every record were a live 48-byte one: little growth while
        // replaying a log of small records.
        self.index.reserve((self.log.bytes() / 48) as usize);
        let parallel = self.log.bytes() >= PARALLEL_FROM;
        let live = std::thread::scope(|s| -> Result<i64> {
            let (tx, rx) = mpsc::sync_channel::<Vec<Item>>(16);
            let helper = parallel.then(|| {
                s.spawn(move || -> Result<i64> {
                    let mut live = 0i64;
                    let mut key = Vec::new();
                    for batch in rx {
                        for item in batch {
                            self.record_key(item.offset, &mut key)?;
                            live += self.apply(item, &key)?;
                        }
                    }
                    Ok(live)
                })
            });
            let mut live = 0i64;
            let mut batch = Vec::with_capacity(BATCH);
            let scanned = self.log.for_each_record(&self.heap, |lsn, offset, payload| {
                let (kind, key, _) = parse(payload)
                    .ok_or_else(|| LogError::Corrupt(format!("the record at LSN {lsn} is no map record")))?;
                let hash = self.index.hash(key);
                let item =
                    Item { hash, offset, put: kind == PUT, size: crate::log::record_size(payload.len()) };
                if parallel && self.index.shard_of(hash) % 2 == 1 {
                    batch.push(item);
                    if batch.len() == BATCH {
                        let full = std::mem::replace(&mut batch, Vec::with_capacity(BATCH));
                        tx.send(full)
                            .map_err(|_| LogError::Corrupt("the replay's second thread stopped".into()))?;
                    }
                } else {
                    live += self.apply(item, key).map_err(log_error)?;
                }
                Ok(())
            });
            if !batch.is_empty() {
                let _ = tx.send(batch);
            }
            drop(tx);
            let theirs = match helper {
                Some(h) => h.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic))?,
                None => 0,
            };
            scanned?;
            Ok(live + theirs)
        })?;
        let live =
            u64::try_from(live).map_err(|_| MapError::Corrupt(format!("live bytes {live} after replay")))?;
        self.live_bytes.store(live, Ordering::Relaxed);
        Ok(())
    }

    /// The key of the record at `offset`, into `key`.
    fn record_key(&self, offset: u64, key: &mut Vec<u8>) -> Result<()> {
        let pool = self.heap.raw_pool();
        let (_, key_len) = header_at(pool, offset)?;
        key.resize(key_len, 0);
        pool.read_into(offset + PAYLOAD + PAYLOAD_HEADER as u64, key)?;
        Ok(())
    }

    /// Applies one record to its shard; returns the change in live bytes.
    fn apply(&self, item: Item, key: &[u8]) -> Result<i64> {
        let pool = self.heap.raw_pool();
        let mut table = self.index.write(item.hash);
        let mut old = None;
        for e in table.candidates(item.hash) {
            if key_eq(pool, e.offset, key)? {
                old = Some(e);
                break;
            }
        }
        let mut delta = if item.put { item.size as i64 } else { 0 };
        if let Some(old) = old {
            delta -= record_size_at(pool, old.offset)? as i64;
        }
        match (old, item.put) {
            (Some(old), true) => drop(table.replace(old, item.offset)),
            (Some(old), false) => drop(table.remove(old)),
            (None, true) => table.insert(Entry { hash: item.hash, offset: item.offset }),
            (None, false) => {}
        }
        Ok(delta)
    }
}
