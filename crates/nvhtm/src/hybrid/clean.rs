//! Log cleaning, iteration and the consistency check.
//!
//! Cleaning works head first: the head segment's live records (those the index points to)
//! are appended again at the tail, each under its key's shard lock, the copies are committed,
//! and the log is truncated past the segment. A reader holds its shard's read lock while it
//! reads a record, so once every entry of the segment points elsewhere no reader is left in
//! it. Deletions in the head segment are simply dropped: every older record of their key is
//! in the same segment or an earlier one, gone with it.

use std::sync::atomic::Ordering;

use super::*;
use crate::log::LogError;
use index::Entry;

/// Clean when less than this share of the log is live...
const LIVE_SHARE: f64 = 0.5;
/// ...and the log spans at least this many segments.
const MIN_SEGMENTS: u64 = 4;

impl<D: Domain> HybridMap<D> {
    /// Cleans the head segment if the log is mostly dead and no other thread is cleaning.
    pub(super) fn maybe_clean(&self) -> Result<()> {
        let bytes = self.log.bytes();
        let live = self.live_bytes.load(Ordering::Relaxed);
        if bytes < MIN_SEGMENTS * self.log.segment_size || live as f64 >= LIVE_SHARE * bytes as f64 {
            return Ok(());
        }
        let Ok(_alone) = self.cleaner.try_lock() else { return Ok(()) };
        self.clean_head_segment().map(drop)
    }

    /// Cleans the head segment: its live records moved to the tail, then truncated away.
    /// Returns how many records moved.
    ///
    /// ```
    /// use nvhtm::hybrid::HybridMap;
    /// use nvhtm::log::LogOptions;
    /// use nvhtm::{Heap, PoolOptions, Volatile};
    /// let heap = Heap::create_in_memory(&PoolOptions::layout("doc").with_size(8 << 20), Volatile)?;
    /// let map = HybridMap::open_with(heap, LogOptions { segment_size: 4096 })?;
    /// for round in 0..20u64 {
    ///     for k in 0..50u64 {
    ///         map.upsert(&k.to_le_bytes(), &round.to_le_bytes())?;
    ///     }
    /// }
    /// // 1,000 records of 40 bytes were appended; cleaning keeps the log near 4 segments.
    /// let stats = map.stats()?;
    /// assert!(stats.cleaned_segments > 0 && stats.log_bytes <= 5 * 4096, "{stats:?}");
    /// assert_eq!(map.get(&3u64.to_le_bytes())?, Some(19u64.to_le_bytes().to_vec()));
    /// # Ok::<(), nvhtm::MapError>(())
    /// ```
    pub fn clean(&self) -> Result<u64> {
        let _alone = self.cleaner.lock().unwrap_or_else(|e| e.into_inner());
        self.clean_head_segment()
    }

    fn clean_head_segment(&self) -> Result<u64> {
        let end = self.log.head_segment_end();
        if end >= self.log.tail() {
            return Ok(0); // the head segment is the tail segment
        }
        let mut moved = 0;
        let mut copy_end = 0;
        let mut buf = Vec::new();
        let mut lsn = self.log.head();
        while lsn < end {
            let (next, at) = self.log.read_at(&self.heap, lsn, &mut buf)?.ok_or_else(|| {
                MapError::Log(LogError::Corrupt(format!("the head segment ends at LSN {lsn}, before {end}")))
            })?;
            let (kind, key, _) = parse(&buf).ok_or_else(|| {
                MapError::Log(LogError::Corrupt(format!("the record at LSN {lsn} is no map record")))
            })?;
            if kind == PUT {
                let hash = self.index.hash(key);
                let mut table = self.index.write(hash);
                let live = Entry { hash, offset: at };
                if table.candidates(hash).any(|e| e == live) {
                    // The copy is not durable until the commit below; reading it meanwhile
                    // gives the same key and value as the durable original, which stays until
                    // the truncation after that commit.
                    let (_, new_end, offset) = self.log.write_parts(&self.heap, &[&buf])?;
                    table.replace(live, offset);
                    copy_end = new_end;
                    moved += 1;
                }
            }
            lsn = next;
        }
        if copy_end > 0 {
            self.log.commit(&self.heap, copy_end)?;
        }
        self.log.truncate(&self.heap, end)?;
        self.cleaned.fetch_add(1, Ordering::Relaxed);
        Ok(moved)
    }

    /// Calls `visit` for every entry, in log order, until it returns `false`. Entries written
    /// during the walk may or may not be visited; none is visited twice (cleaning waits).
    pub fn for_each(&self, mut visit: impl FnMut(&[u8], &[u8]) -> bool) -> Result<()> {
        let _no_cleaning = self.cleaner.lock().unwrap_or_else(|e| e.into_inner());
        let end = self.log.tail();
        let mut buf = Vec::new();
        let mut lsn = self.log.head();
        while lsn < end {
            let Some((next, at)) = self.log.read_at(&self.heap, lsn, &mut buf)? else { break };
            let (kind, key, value) = parse(&buf).ok_or_else(|| {
                MapError::Log(LogError::Corrupt(format!("the record at LSN {lsn} is no map record")))
            })?;
            if kind == PUT {
                let hash = self.index.hash(key);
                let live = self.index.read(hash).candidates(hash).any(|e| e.offset == at);
                if live && !visit(key, value) {
                    break;
                }
            }
            lsn = next;
        }
        Ok(())
    }

    /// Every entry, in log order.
    pub fn entries(&self) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        let mut all = Vec::new();
        self.for_each(|k, v| {
            all.push((k.to_vec(), v.to_vec()));
            true
        })?;
        Ok(all)
    }

    /// Removes every entry; how many it removed. Not atomic: each removal is a `DELETE`
    /// record of its own, durable when its group commit is, so a crash during `clear` may
    /// keep any subset of the entries. Removals run on a few threads at once, so that they
    /// share group commits rather than waiting for one each. Entries written meanwhile by
    /// other threads may or may not be removed.
    ///
    /// ```
    /// # use nvhtm::hybrid::HybridMap;
    /// # use nvhtm::{Heap, PoolOptions, Volatile};
    /// # let map = HybridMap::open(Heap::create_in_memory(&PoolOptions::layout("doc").with_size(8 << 20), Volatile)?)?;
    /// map.upsert(b"a", b"1")?;
    /// map.upsert(b"b", b"2")?;
    /// assert_eq!(map.clear()?, 2);
    /// assert!(map.is_empty()? && map.get(b"a")?.is_none());
    /// # Ok::<(), nvhtm::MapError>(())
    /// ```
    pub fn clear(&self) -> Result<u64> {
        const WORKERS: usize = 8;
        let keys: Vec<Vec<u8>> = self.entries()?.into_iter().map(|(k, _)| k).collect();
        let chunk = keys.len().div_ceil(WORKERS).max(1);
        std::thread::scope(|scope| {
            let workers: Vec<_> = keys
                .chunks(chunk)
                .map(|part| {
                    scope.spawn(move || {
                        let mut removed = 0u64;
                        for key in part {
                            removed += u64::from(self.remove(key)?);
                        }
                        Ok::<u64, MapError>(removed)
                    })
                })
                .collect();
            let mut removed = 0;
            for worker in workers {
                removed += worker.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic))?;
            }
            Ok(removed)
        })
    }

    /// Checks the log and that the index is what a replay of it gives: every entry points
    /// to the last record of its key, the live bytes add up. Problems are listed.
    pub fn check(&self) -> Result<Vec<String>> {
        let _no_cleaning = self.cleaner.lock().unwrap_or_else(|e| e.into_inner());
        let mut problems = self.log.check(&self.heap)?.problems;
        let pool = self.heap.raw_pool();
        let mut last: std::collections::HashMap<Vec<u8>, (u32, u64)> = Default::default();
        self.log.for_each_record(&self.heap, |_, offset, payload| {
            if let Some((kind, key, _)) = parse(payload) {
                last.insert(key.to_vec(), (kind, offset));
            }
            Ok(())
        })?;
        let mut live_bytes = 0;
        let entries = self.index.entries();
        for e in &entries {
            live_bytes += record_size_at(pool, e.offset)?;
        }
        let expected: std::collections::HashSet<u64> =
            last.values().filter(|(kind, _)| *kind == PUT).map(|&(_, offset)| offset).collect();
        let found: std::collections::HashSet<u64> = entries.iter().map(|e| e.offset).collect();
        if expected != found || found.len() != entries.len() {
            problems.push(format!(
                "the index holds {} entries, a replay of the log {}; {} differ",
                entries.len(),
                expected.len(),
                expected.symmetric_difference(&found).count()
            ));
        }
        if live_bytes != self.live_bytes.load(Ordering::Relaxed) {
            problems.push(format!(
                "live bytes {} counted, {live_bytes} found",
                self.live_bytes.load(Ordering::Relaxed)
            ));
        }
        Ok(problems)
    }
}
