//! The persistent log: an append-only sequence of byte records in a pool, each durable when
//! its append returns, with group commit, iteration from any record, truncation from the head
//! and growth segment by segment.
//!
//! - **Records** (`layout.rs`) carry their length and a check (xxh3 over the payload, seeded
//!   by the record's LSN and its segment's random tag). Recovery scans the tail segment and
//!   stops at the first record that does not check: a torn record, a stale one, or none.
//! - **Appends** (`append.rs`) copy the record under a mutex and then join a group commit:
//!   one write-back and fence (one `msync` on a file pool, one commit on a FAMS pool) serves
//!   every record that arrived meanwhile. No word is persisted per append: the check is the
//!   commit.
//! - **Segments** (`core.rs`) are heap blocks in a chain. Starting a new tail segment makes the
//!   old one's records durable and moves the root's tail pointer in one heap transaction, so
//!   recovery scans one segment only. A run after a crash appends to a new segment (with a new
//!   tag), so what the crashed run left beyond its tail can never check.
//! - **Truncation** frees whole segments before the new head in heap transactions.
//!
//! Compared with PMDK's libpmemlog: libpmemlog keeps one fixed-size circular buffer per pool and
//! persists a write offset after the data of every append (two fences, appends serialised by a
//! lock, no per-record framing: the log is a byte stream). This log frames records (length,
//! check), so one fence commits a batch and a torn tail is detected rather than prevented; it
//! grows and shrinks by segments from the heap instead of wrapping; it shares fences among
//! concurrent appenders; and it works on file and FAMS pools through the same domains.
//!
//! ```
//! use nvhtm::log::Log;
//! use nvhtm::{Heap, PoolOptions, Volatile};
//! let heap = Heap::create_in_memory(&PoolOptions::layout("doc").with_size(4 << 20), Volatile)?;
//! let log = Log::open(heap)?;
//! let first = log.append(b"hello")?;
//! let second = log.append(b"world")?;
//! let records: Vec<Vec<u8>> = log.iter(first).map(|r| r.map(|r| r.data)).collect::<Result<_, _>>()?;
//! assert_eq!(records, [b"hello".to_vec(), b"world".to_vec()]);
//! log.truncate(second)?;
//! assert_eq!(log.head(), second);
//! log.close()?;
//! # Ok::<(), nvhtm::log::LogError>(())
//! ```

mod append;
mod core;
mod layout;
#[cfg(test)]
mod tests;

pub(crate) use self::core::LogCore;
pub(crate) use layout::record_size;
pub use layout::{DEFAULT_SEGMENT_SIZE, LOG_MAGIC, MAX_RECORD, MIN_SEGMENT_SIZE};

use std::sync::atomic::Ordering;

use crate::heap::{Heap, HeapError};
use crate::persist::Domain;
use crate::pool::PoolError;
use layout::LogRoot;

/// Errors of the log.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LogError {
    /// The heap or the pool failed (I/O, out of space, poisoned pool, ...).
    #[error(transparent)]
    Heap(#[from] HeapError),
    /// The pool's root holds something else.
    #[error("the pool holds no log: {0}")]
    NotALog(String),
    /// The log's metadata is inconsistent.
    #[error("corrupt log: {0}")]
    Corrupt(String),
    /// A record larger than [`MAX_RECORD`].
    #[error("a record of {len} bytes is larger than the largest a log takes ({max} bytes)")]
    TooLarge {
        /// The payload's length.
        len: usize,
        /// [`MAX_RECORD`].
        max: usize,
    },
    /// An LSN before the head: its record was truncated.
    #[error("LSN {lsn} was truncated (the log now starts at {head})")]
    Truncated {
        /// The LSN asked for.
        lsn: u64,
        /// The head.
        head: u64,
    },
    /// An LSN where no durable record starts.
    #[error("no record starts at LSN {lsn} (the log's records run from {head} to {tail})")]
    NotARecord {
        /// The LSN asked for.
        lsn: u64,
        /// The head.
        head: u64,
        /// The durable tail.
        tail: u64,
    },
    /// An earlier commit failed: what it covered may or may not be durable, and the log
    /// refuses further writes until the pool is reopened.
    #[error("an earlier commit failed ({0}); reopen the pool")]
    Failed(String),
}

impl From<PoolError> for LogError {
    fn from(e: PoolError) -> LogError {
        LogError::Heap(HeapError::Pool(e))
    }
}

/// Result of log operations.
pub type Result<T, E = LogError> = std::result::Result<T, E>;

/// How a log is created.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogOptions {
    /// Bytes of records per segment (at least [`MIN_SEGMENT_SIZE`]; a larger record gets a
    /// segment of its own). Recovery scans at most one segment.
    pub segment_size: u64,
}

impl Default for LogOptions {
    fn default() -> LogOptions {
        LogOptions { segment_size: DEFAULT_SEGMENT_SIZE }
    }
}

/// One record read back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// Its LSN.
    pub lsn: u64,
    /// Its payload.
    pub data: Vec<u8>,
}

/// Counts of a log.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct LogStats {
    /// The first live LSN.
    pub head: u64,
    /// The end of the durable records.
    pub tail: u64,
    /// Live segments.
    pub segments: usize,
    /// Records appended since the log was opened.
    pub appends: u64,
    /// Commits (write-backs with one fence, or syncs) since the log was opened.
    pub commits: u64,
}

/// What [`Log::check`] found.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct LogCheck {
    /// Records from the head to the tail.
    pub records: u64,
    /// Their payload bytes.
    pub bytes: u64,
    /// What is wrong (empty: nothing).
    pub problems: Vec<String>,
}

/// A persistent log of byte records: the heap's root object.
#[derive(Debug)]
pub struct Log<D: Domain> {
    core: LogCore,
    heap: Heap<D>,
}

impl<D: Domain> Log<D> {
    /// Opens the log the heap holds, or creates one with the default options in a heap
    /// without a root.
    pub fn open(heap: Heap<D>) -> Result<Log<D>> {
        Log::open_with(heap, LogOptions::default())
    }

    /// Opens the log the heap holds, or creates one with `opts` in a heap without a root.
    ///
    /// ```
    /// use nvhtm::log::{Log, LogOptions};
    /// use nvhtm::{Heap, PoolOptions, Volatile};
    /// let heap = Heap::create_in_memory(&PoolOptions::layout("doc").with_size(4 << 20), Volatile)?;
    /// let log = Log::open_with(heap, LogOptions { segment_size: 4096 })?;
    /// for i in 0..300u32 {
    ///     log.append(&i.to_le_bytes())?;
    /// }
    /// assert!(log.stats().segments > 1);
    /// # Ok::<(), nvhtm::log::LogError>(())
    /// ```
    pub fn open_with(heap: Heap<D>, opts: LogOptions) -> Result<Log<D>> {
        let root = heap
            .root::<LogRoot>()
            .map_err(|e| match e {
                HeapError::RootSize { .. } => LogError::NotALog(e.to_string()),
                e => LogError::Heap(e),
            })?
            .offset();
        let magic = heap.raw_pool().load_u64(root, Ordering::Acquire)?;
        if magic == 0 {
            heap.transaction(|tx| LogCore::format(tx, root, opts.segment_size))?;
        }
        let core = LogCore::open(&heap, root)?;
        Ok(Log { core, heap })
    }

    /// Appends a record; returns its LSN once it is durable.
    pub fn append(&self, payload: &[u8]) -> Result<u64> {
        self.core.append(&self.heap, payload)
    }

    /// Appends several records with one commit; returns their LSNs once all are durable.
    ///
    /// ```
    /// # use nvhtm::log::Log;
    /// # use nvhtm::{Heap, PoolOptions, Volatile};
    /// # let log = Log::open(Heap::create_in_memory(&PoolOptions::layout("doc").with_size(4 << 20), Volatile)?)?;
    /// let lsns = log.append_batch(&[b"a".as_slice(), b"b"])?;
    /// assert_eq!(log.read(lsns[1])?.map(|(data, _)| data), Some(b"b".to_vec()));
    /// # Ok::<(), nvhtm::log::LogError>(())
    /// ```
    pub fn append_batch(&self, payloads: &[&[u8]]) -> Result<Vec<u64>> {
        let mut lsns = Vec::with_capacity(payloads.len());
        let mut end = self.core.tail();
        for payload in payloads {
            let (lsn, after) = self.core.write(&self.heap, payload)?;
            lsns.push(lsn);
            end = after;
        }
        self.core.commit(&self.heap, end)?;
        Ok(lsns)
    }

    /// The record at `lsn` and the LSN of the next one; `None` at the tail.
    pub fn read(&self, lsn: u64) -> Result<Option<(Vec<u8>, u64)>> {
        let mut buf = Vec::new();
        Ok(self.core.read_into(&self.heap, lsn, &mut buf)?.map(|next| (buf, next)))
    }

    /// The durable records from `from` (a record's LSN, the head, or the tail) on. Each step
    /// reads one record; truncation may run between steps (a truncated LSN is an error).
    pub fn iter(&self, from: u64) -> LogIter<'_, D> {
        LogIter { log: self, next: Some(from) }
    }

    /// The first live LSN.
    pub fn head(&self) -> u64 {
        self.core.head()
    }

    /// The end of the durable records: the LSN the next record gets.
    pub fn tail(&self) -> u64 {
        self.core.tail()
    }

    /// Drops every record before `before` (a record's LSN or the tail) and frees the
    /// segments wholly before it; durable when it returns.
    pub fn truncate(&self, before: u64) -> Result<()> {
        self.core.truncate(&self.heap, before)
    }

    /// Counts.
    pub fn stats(&self) -> LogStats {
        LogStats {
            head: self.head(),
            tail: self.tail(),
            segments: self.core.segments(),
            appends: self.core.appends.load(Ordering::Relaxed),
            commits: self.core.commits.load(Ordering::Relaxed),
        }
    }

    /// Reads and checks every record from the head to the tail, and that no record checks past
    /// the tail where the next append would write.
    ///
    /// ```
    /// # use nvhtm::log::Log;
    /// # use nvhtm::{Heap, PoolOptions, Volatile};
    /// # let log = Log::open(Heap::create_in_memory(&PoolOptions::layout("doc").with_size(4 << 20), Volatile)?)?;
    /// log.append(b"checked")?;
    /// let report = log.check()?;
    /// assert_eq!((report.records, report.bytes, report.problems.len()), (1, 7, 0));
    /// # Ok::<(), nvhtm::log::LogError>(())
    /// ```
    pub fn check(&self) -> Result<LogCheck> {
        self.core.check(&self.heap)
    }

    /// The heap the log lives in.
    pub fn heap(&self) -> &Heap<D> {
        &self.heap
    }

    /// Commits and marks the log closed at its tail, leaving the heap open (the crash
    /// workloads' clean close).
    pub(crate) fn mark_closed(&self) -> Result<()> {
        self.core.close(&self.heap)
    }

    /// Commits, marks the log closed at its tail, and closes the heap.
    pub fn close(self) -> Result<()> {
        self.core.close(&self.heap)?;
        Ok(self.heap.close()?)
    }
}

/// The records of a log from some LSN on (see [`Log::iter`]).
#[derive(Debug)]
pub struct LogIter<'a, D: Domain> {
    log: &'a Log<D>,
    next: Option<u64>,
}

impl<D: Domain> Iterator for LogIter<'_, D> {
    type Item = Result<Record>;

    fn next(&mut self) -> Option<Result<Record>> {
        let lsn = self.next?;
        match self.log.read(lsn) {
            Ok(Some((data, next))) => {
                self.next = Some(next);
                Some(Ok(Record { lsn, data }))
            }
            Ok(None) => {
                self.next = None;
                None
            }
            Err(e) => {
                self.next = None;
                Some(Err(e))
            }
        }
    }
}
