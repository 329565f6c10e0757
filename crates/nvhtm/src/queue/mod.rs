//! A durable multi-producer multi-consumer FIFO queue of byte items, on one persistent log.
//!
//! Every operation is durably linearizable: an [`enqueue`](Queue::enqueue) or a
//! [`dequeue`](Queue::dequeue) that returned survives any crash, and after a crash the queue
//! holds the state after some prefix of the operations in the order they took effect — all
//! that returned, and perhaps some that were in flight. A consumer whose dequeue was cut off
//! by the crash learns what it returned (or that it returned nothing) from
//! [`last_dequeued`](Queue::last_dequeued): comparing that item's id with the last one it
//! processed gives exactly-once accounting.
//!
//! # Design
//!
//! The queue is a log of three kinds of records (`layout.rs`), embedded in the queue's root
//! object (the log and its crash proofs are [`crate::log`]'s):
//!
//! - **ENQ(item)**: an enqueue appends it; the item's id is the record's LSN.
//! - **DEQ(consumer, id, copy of the item)**: a dequeue takes the front item and appends this.
//!   The copy is what lets [`last_dequeued`](Queue::last_dequeued) answer after a crash even
//!   once the item's ENQ record is truncated.
//! - **CHECKPOINT(each consumer's last dequeue)**: written before the log's head is moved
//!   past dequeued items, so the consumers' last dequeues survive the truncation.
//!
//! Every record is written (copied to the log's tail, no flush) under the queue's mutex, in
//! the same critical section that changes the DRAM state (a `VecDeque` of ids and each
//! consumer's last dequeue): so the log's order *is* the order in which operations take
//! effect — FIFO order is LSN order, DEQ records are in pop order. The operation then
//! releases the mutex and joins the log's group commit: one fence (one `msync`, one FAMS
//! commit) serves every operation of every thread that wrote meanwhile. A commit makes every
//! record before its end durable, and the log's recovery scan stops at the first record that
//! does not check, so what survives a crash is always a *prefix* of the operations —
//! including each one that returned, since it committed its own record. A dequeue's commit
//! also covers the ENQ of the item it took; a dequeue that found the queue empty (and
//! [`peek`](Queue::peek), [`contents`](Queue::contents), [`last_dequeued`](Queue::last_dequeued))
//! commits up to the last record written before answering, so no answer rests on an
//! operation a crash could still undo. Recovery (`replay.rs`) replays the prefix from the
//! log's head.
//!
//! **Against Friedman et al.'s durable queue (PPoPP'18).** Theirs is a lock-free
//! Michael–Scott linked list in persistent memory: an enqueue allocates a node, persists it,
//! links it with a CAS and persists the link (and the tail); a dequeue CASes the head and, in
//! the detectable variant, persists the value it took into a per-thread `returnedValues`
//! slot — the counterpart of our DEQ record's copy. Each operation pays its own flushes and
//! fences (two or three) and a persistent allocation per node, with safe memory reclamation
//! for nodes other threads may still read. Here operations serialise on one short mutex (a
//! copy of the item, no flush) — the queue is blocking, not lock-free — but the expensive
//! part, the fence or the sync, is shared by every concurrent operation; there is no
//! allocation per item (segments are allocated a whole segment at a time), no reclamation
//! problem (DRAM holds only ids; a truncation frees whole segments), and the same code is
//! correct on files and FAMS pools, where a per-operation persist would be a per-operation
//! `msync`. Both recover in time linear in what is live (their list, our log from its head).
//!
//! **Against a persistent ring buffer** (the seed's §5.3: write the slot, flush, then
//! publish the index): a ring is bounded by construction and reuses its slots in place, with
//! no compaction, but holds fixed-size slots (or a second allocation per item), needs two
//! ordered persists per operation (the data, then the index), and cannot tell a consumer
//! what its interrupted dequeue returned without a per-consumer slot persisted as well.
//! Here the bound is optional ([`QueueOptions::capacity`]) and space is reclaimed by
//! truncation instead of in place.
//!
//! **Space.** The log holds everything from its head to its tail: the live items and the
//! dead records (ENQs of dequeued items, DEQs, checkpoints) between them. When a dequeue
//! moves the front item (or, in an empty queue, the end of the log) past the start of the
//! log's second segment, and the dead records before it take at least twice what a
//! checkpoint takes, that dequeue compacts: it appends a CHECKPOINT and truncates the log to
//! the front item (or, if the queue is empty, to the checkpoint), freeing every segment
//! wholly before it. So the dead records before the front stay under two segments (or two
//! checkpoints and a segment, if checkpoints are larger than segments), checkpoints take at
//! most as much log as the records they let go, and a compaction happens at most once per
//! segment of records. Dead records *after* the front stay until the front moves past them.
//! The checkpoint names every consumer that ever dequeued: use few consumer ids (a
//! checkpoint must fit one log record).
//!
//! # Proofs
//!
//! `nvhtm::mutation::queue` holds a recorded workload and its oracle (the recovered contents
//! and every consumer's last dequeue equal the model after the completed operations, with
//! the one in flight applied or not, and no block leaked); `tests/queue_crash.rs` crashes it
//! at every fence, during recovery, under the file model and in several runs in a row, and
//! checks that every flush and fence the queue relies on is needed; the suites `queue-single`
//! and `queue-two-runs` run in the project's mutation score; `tests/queue.rs` runs it on real
//! pools, with threads, and under `kill -9`. The queue has no flush or fence of its own:
//! every durable step is a log commit or a log truncation.
//!
//! ```
//! use nvhtm::queue::Queue;
//! use nvhtm::{Heap, PoolOptions, Volatile};
//! let heap = Heap::create_in_memory(&PoolOptions::layout("doc").with_size(4 << 20), Volatile)?;
//! let queue = Queue::open(heap)?;
//! let first = queue.enqueue(b"first")?;
//! queue.enqueue(b"second")?;
//! assert_eq!(queue.dequeue(7)?, Some((first, b"first".to_vec())));
//! assert_eq!(queue.last_dequeued(7)?, Some((first, b"first".to_vec())));
//! assert_eq!(queue.len(), 1);
//! queue.close()?;
//! # Ok::<(), nvhtm::queue::QueueError>(())
//! ```

mod compact;
mod layout;
mod replay;
#[cfg(test)]
mod tests;

pub use layout::{MAX_ITEM, QUEUE_MAGIC};

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};

use crate::heap::{Heap, HeapError};
use crate::log::{LogCheck, LogCore, LogError, LogStats, DEFAULT_SEGMENT_SIZE};
use crate::persist::Domain;
use crate::pool::PoolError;
use layout::{QueueRoot, LOG_ROOT, QUEUE_VERSION, UNBOUNDED};
use replay::{replay, Last, Replayed};

/// Errors of the queue.
///
/// ```
/// use nvhtm::queue::{Queue, QueueError, MAX_ITEM};
/// use nvhtm::{Heap, PoolOptions, Volatile};
/// let opts = PoolOptions::layout("doc").with_size(4 << 20);
/// // A pool holding a log is not a queue.
/// let log = nvhtm::log::Log::open(Heap::create_in_memory(&opts, Volatile)?)?;
/// let image = log.heap().pool().image()?;
/// let err = Queue::open(Heap::open_image(&image, &opts, Volatile)?).unwrap_err();
/// assert!(matches!(err, QueueError::NotAQueue(_)), "{err}");
/// let queue = Queue::open(Heap::create_in_memory(&opts, Volatile)?)?;
/// let err = queue.enqueue(&vec![0; MAX_ITEM + 1]).unwrap_err();
/// assert!(matches!(err, QueueError::TooLarge { .. }));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum QueueError {
    /// The log under the queue failed (I/O, out of space, a failed commit, ...).
    #[error(transparent)]
    Log(#[from] LogError),
    /// The pool's root holds something else.
    #[error("the pool holds no queue: {0}")]
    NotAQueue(String),
    /// The queue's records or root are inconsistent.
    #[error("corrupt queue: {0}")]
    Corrupt(String),
    /// A bounded queue holds as many items as it may.
    #[error("the queue is full ({capacity} items)")]
    Full {
        /// The queue's capacity.
        capacity: u64,
    },
    /// An item larger than [`MAX_ITEM`].
    #[error("an item of {len} bytes is larger than the largest a queue takes ({max} bytes)")]
    TooLarge {
        /// The item's length.
        len: usize,
        /// [`MAX_ITEM`].
        max: usize,
    },
}

impl From<HeapError> for QueueError {
    fn from(e: HeapError) -> QueueError {
        QueueError::Log(LogError::Heap(e))
    }
}

impl From<PoolError> for QueueError {
    fn from(e: PoolError) -> QueueError {
        QueueError::Log(e.into())
    }
}

/// Result of queue operations.
pub type Result<T, E = QueueError> = std::result::Result<T, E>;

/// How a queue is created. Both are kept in the pool: opening an existing queue uses its own.
///
/// ```
/// use nvhtm::queue::QueueOptions;
/// let opts = QueueOptions { capacity: Some(1000), ..QueueOptions::default() };
/// assert_eq!(opts.segment_size, nvhtm::log::DEFAULT_SEGMENT_SIZE);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueOptions {
    /// Bytes of records per log segment: the unit in which space is reclaimed, and the most
    /// that recovery scans past the last segment switch.
    pub segment_size: u64,
    /// The most items the queue holds (`None`: unbounded); an enqueue beyond it gets
    /// [`QueueError::Full`].
    pub capacity: Option<u64>,
}

impl Default for QueueOptions {
    fn default() -> QueueOptions {
        QueueOptions { segment_size: DEFAULT_SEGMENT_SIZE, capacity: None }
    }
}

/// Counts of a queue (see [`Queue::stats`]).
///
/// ```
/// # use nvhtm::queue::Queue;
/// # use nvhtm::{Heap, PoolOptions, Volatile};
/// # let queue = Queue::open(Heap::create_in_memory(&PoolOptions::layout("doc").with_size(4 << 20), Volatile)?)?;
/// queue.enqueue(b"a")?;
/// let stats = queue.stats();
/// assert_eq!((stats.len, stats.log.segments), (1, 1));
/// # Ok::<(), nvhtm::queue::QueueError>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct QueueStats {
    /// Items in the queue (operations in flight included).
    pub len: u64,
    /// The bound, if any.
    pub capacity: Option<u64>,
    /// Consumers with a last dequeue on record.
    pub consumers: usize,
    /// Items enqueued since the queue was opened.
    pub enqueues: u64,
    /// Items dequeued since the queue was opened.
    pub dequeues: u64,
    /// Dequeues that found the queue empty.
    pub empty_dequeues: u64,
    /// Checkpoints written and truncations done.
    pub compactions: u64,
    /// Compactions that failed (the dequeue that ran one still returned its item; the next
    /// one tries again).
    pub compaction_failures: u64,
    /// The log's counts.
    pub log: LogStats,
}

/// What [`Queue::check`] found.
///
/// ```
/// # use nvhtm::queue::Queue;
/// # use nvhtm::{Heap, PoolOptions, Volatile};
/// # let queue = Queue::open(Heap::create_in_memory(&PoolOptions::layout("doc").with_size(4 << 20), Volatile)?)?;
/// queue.enqueue(b"a")?;
/// queue.dequeue(1)?;
/// let report = queue.check()?;
/// assert_eq!((report.items, report.consumers, report.log.records), (0, 1, 2));
/// # Ok::<(), nvhtm::queue::QueueError>(())
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct QueueCheck {
    /// The log's check.
    pub log: LogCheck,
    /// Items in the queue.
    pub items: u64,
    /// Consumers with a last dequeue on record.
    pub consumers: usize,
    /// What is wrong with the queue's accounting (empty: nothing; the log's problems are in
    /// `log`).
    pub problems: Vec<String>,
}

impl QueueCheck {
    /// Whether neither the log nor the queue has a problem.
    ///
    /// ```
    /// assert!(nvhtm::queue::QueueCheck::default().is_clean());
    /// ```
    pub fn is_clean(&self) -> bool {
        self.problems.is_empty() && self.log.problems.is_empty()
    }
}

/// The queue's DRAM state, under its mutex.
#[derive(Debug)]
struct State {
    /// The items' ids (their ENQ records' LSNs), front first.
    items: VecDeque<u64>,
    /// Each consumer's last dequeue.
    last: BTreeMap<u32, Last>,
    /// The bytes of a checkpoint of `last`.
    checkpoint_size: u64,
    /// The id of the last item dequeued, if any since the log's head.
    popped: Option<u64>,
    /// The end of the last record written: an answer that depends on the state waits for a
    /// commit up to here.
    end: u64,
    /// Scratch: a record read.
    read: Vec<u8>,
    /// Scratch: a record to write.
    record: Vec<u8>,
}

/// A durable multi-producer multi-consumer FIFO queue of byte items: the heap's root object.
/// See the [module](self) for the design and its guarantees.
#[derive(Debug)]
pub struct Queue<D: Domain> {
    log: LogCore,
    capacity: Option<u64>,
    state: Mutex<State>,
    /// Held by a compaction (and a check): one at a time.
    compactor: Mutex<()>,
    enqueues: AtomicU64,
    dequeues: AtomicU64,
    empty_dequeues: AtomicU64,
    compactions: AtomicU64,
    compaction_failures: AtomicU64,
    heap: Heap<D>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl<D: Domain> Queue<D> {
    /// Opens the queue the heap holds, or creates an unbounded one with the default segment
    /// size in a heap without a root.
    ///
    /// ```
    /// use nvhtm::queue::Queue;
    /// use nvhtm::{Heap, PoolOptions, Volatile};
    /// let opts = PoolOptions::layout("doc").with_size(4 << 20);
    /// let queue = Queue::open(Heap::create_in_memory(&opts, Volatile)?)?;
    /// let id = queue.enqueue(b"survives")?;
    /// // Reopened from a copy of the pool, as after a crash.
    /// let image = queue.heap().pool().image()?;
    /// let queue = Queue::open(Heap::open_image(&image, &opts, Volatile)?)?;
    /// assert_eq!(queue.peek()?, Some((id, b"survives".to_vec())));
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn open(heap: Heap<D>) -> Result<Queue<D>> {
        Queue::open_with(heap, QueueOptions::default())
    }

    /// Opens the queue the heap holds (recovering it from its log), or creates one with
    /// `opts` in a heap without a root. A pool holding anything else is refused with
    /// [`QueueError::NotAQueue`].
    ///
    /// ```
    /// use nvhtm::queue::{Queue, QueueError, QueueOptions};
    /// use nvhtm::{Heap, PoolOptions, Volatile};
    /// let heap = Heap::create_in_memory(&PoolOptions::layout("doc").with_size(4 << 20), Volatile)?;
    /// let queue = Queue::open_with(heap, QueueOptions { segment_size: 4096, capacity: Some(2) })?;
    /// queue.enqueue(b"a")?;
    /// queue.enqueue(b"b")?;
    /// assert!(matches!(queue.enqueue(b"c"), Err(QueueError::Full { capacity: 2 })));
    /// # Ok::<(), QueueError>(())
    /// ```
    pub fn open_with(heap: Heap<D>, opts: QueueOptions) -> Result<Queue<D>> {
        let root = heap
            .root::<QueueRoot>()
            .map_err(|e| match e {
                HeapError::RootSize { .. } => QueueError::NotAQueue(e.to_string()),
                e => e.into(),
            })?
            .offset();
        let mut r: QueueRoot = heap.raw_pool().read(root)?;
        if r.magic == 0 {
            r = QueueRoot {
                magic: QUEUE_MAGIC,
                capacity: opts.capacity.unwrap_or(UNBOUNDED),
                version: QUEUE_VERSION,
                ..bytemuck::Zeroable::zeroed()
            };
            heap.transaction(|tx| {
                tx.write_bytes(root, &bytemuck::bytes_of(&r)[..LOG_ROOT as usize])?;
                LogCore::format(tx, root + LOG_ROOT, opts.segment_size)
            })?;
        } else if r.magic != QUEUE_MAGIC {
            return Err(QueueError::NotAQueue(format!("the root starts with {:#018x}", r.magic)));
        }
        if r.version != QUEUE_VERSION {
            return Err(QueueError::NotAQueue(format!(
                "a queue of layout version {} (this is version {QUEUE_VERSION})",
                r.version
            )));
        }
        let log = LogCore::open(&heap, root + LOG_ROOT).map_err(|e| match e {
            LogError::NotALog(why) => QueueError::Corrupt(format!("the queue's log: {why}")),
            e => e.into(),
        })?;
        let Replayed { items, last, popped, end, .. } = replay(&heap, &log)?;
        let capacity = (r.capacity != UNBOUNDED).then_some(r.capacity);
        Ok(Queue {
            log,
            capacity,
            state: Mutex::new(State {
                checkpoint_size: layout::checkpoint_size(last.values().map(|(_, item)| item.len())),
                items,
                last,
                popped,
                end,
                read: Vec::new(),
                record: Vec::new(),
            }),
            compactor: Mutex::new(()),
            enqueues: AtomicU64::new(0),
            dequeues: AtomicU64::new(0),
            empty_dequeues: AtomicU64::new(0),
            compactions: AtomicU64::new(0),
            compaction_failures: AtomicU64::new(0),
            heap,
        })
    }

    /// Appends an item at the back; returns its id once it is durable. Ids grow in FIFO
    /// order and are never reused.
    ///
    /// ```
    /// # use nvhtm::queue::Queue;
    /// # use nvhtm::{Heap, PoolOptions, Volatile};
    /// # let queue = Queue::open(Heap::create_in_memory(&PoolOptions::layout("doc").with_size(4 << 20), Volatile)?)?;
    /// let a = queue.enqueue(b"a")?;
    /// let b = queue.enqueue(b"b")?;
    /// assert!(a < b);
    /// # Ok::<(), nvhtm::queue::QueueError>(())
    /// ```
    pub fn enqueue(&self, item: &[u8]) -> Result<u64> {
        Ok(self.enqueue_batch(&[item])?[0])
    }

    /// Appends several items, in order, with one commit; returns their ids once all are
    /// durable. Refused whole with [`QueueError::Full`] if they do not all fit. Not atomic:
    /// after a crash during the call, a prefix of the items may be in the queue; an error
    /// while writing one (out of space) leaves the items before it enqueued (and durable).
    ///
    /// ```
    /// # use nvhtm::queue::Queue;
    /// # use nvhtm::{Heap, PoolOptions, Volatile};
    /// # let queue = Queue::open(Heap::create_in_memory(&PoolOptions::layout("doc").with_size(4 << 20), Volatile)?)?;
    /// let ids = queue.enqueue_batch(&[b"x".as_slice(), b"y"])?;
    /// assert_eq!(queue.dequeue(0)?, Some((ids[0], b"x".to_vec())));
    /// # Ok::<(), nvhtm::queue::QueueError>(())
    /// ```
    pub fn enqueue_batch(&self, items: &[&[u8]]) -> Result<Vec<u64>> {
        if let Some(item) = items.iter().find(|i| i.len() > MAX_ITEM) {
            return Err(QueueError::TooLarge { len: item.len(), max: MAX_ITEM });
        }
        let mut ids = Vec::with_capacity(items.len());
        let mut failed = None;
        let end = {
            let mut guard = lock(&self.state);
            let s = &mut *guard;
            if let Some(capacity) = self.capacity {
                if s.items.len() as u64 + items.len() as u64 > capacity {
                    // The answer rests on the items counted: wait until they are durable.
                    let end = s.end;
                    drop(guard);
                    self.log.commit(&self.heap, end)?;
                    return Err(QueueError::Full { capacity });
                }
            }
            for item in items {
                layout::enq(&mut s.record, item);
                let (id, end) = match self.log.write(&self.heap, &s.record) {
                    Ok(written) => written,
                    Err(e) => {
                        failed = Some(e);
                        break;
                    }
                };
                // FIFO order is LSN order: records are written in the order items are pushed,
                // back to back (the queue is its log's only writer).
                debug_assert!(id == s.end && s.items.back().is_none_or(|&back| back < id));
                s.items.push_back(id);
                s.end = end;
                ids.push(id);
            }
            s.end
        };
        self.log.commit(&self.heap, end)?;
        self.enqueues.fetch_add(ids.len() as u64, Ordering::Relaxed);
        match failed {
            Some(e) => Err(e.into()),
            None => Ok(ids),
        }
    }

    /// Takes the front item for `consumer`; returns its id and bytes once the dequeue is
    /// durable, or `None` if the queue is empty. A consumer id names one consumer: after a
    /// crash, [`last_dequeued`](Queue::last_dequeued) tells what its last dequeue returned, so
    /// it should be used by one thread at a time.
    ///
    /// ```
    /// # use nvhtm::queue::Queue;
    /// # use nvhtm::{Heap, PoolOptions, Volatile};
    /// # let queue = Queue::open(Heap::create_in_memory(&PoolOptions::layout("doc").with_size(4 << 20), Volatile)?)?;
    /// assert_eq!(queue.dequeue(1)?, None);
    /// let id = queue.enqueue(b"job")?;
    /// assert_eq!(queue.dequeue(1)?, Some((id, b"job".to_vec())));
    /// # Ok::<(), nvhtm::queue::QueueError>(())
    /// ```
    pub fn dequeue(&self, consumer: u32) -> Result<Option<(u64, Vec<u8>)>> {
        let (id, item, end, compact) = {
            let mut guard = lock(&self.state);
            let s = &mut *guard;
            let Some(&id) = s.items.front() else {
                // "Empty" rests on every dequeue written so far: wait until they are durable.
                let end = s.end;
                drop(guard);
                self.log.commit(&self.heap, end)?;
                self.empty_dequeues.fetch_add(1, Ordering::Relaxed);
                return Ok(None);
            };
            // The item's ENQ record may still be committing; the DEQ's commit covers it.
            let item = self.item(id, &mut s.read)?;
            layout::deq(&mut s.record, consumer, id, &item);
            let (lsn, end) = self.log.write(&self.heap, &s.record)?;
            // DEQ records are in pop order, and each pops the front: replay relies on both.
            debug_assert!(lsn == s.end && lsn > id && s.popped.is_none_or(|p| p < id));
            s.items.pop_front();
            s.popped = Some(id);
            let replaced = s.last.insert(consumer, (id, item.clone()));
            s.checkpoint_size += layout::checkpoint_entry(item.len());
            s.checkpoint_size -= replaced.map_or(0, |(_, old)| layout::checkpoint_entry(old.len()));
            s.end = end;
            (id, item, end, self.compaction_due(s))
        };
        self.log.commit(&self.heap, end)?;
        self.dequeues.fetch_add(1, Ordering::Relaxed);
        if compact && self.compact().is_err() {
            // The item is durably dequeued: it is returned; the next dequeue tries again.
            self.compaction_failures.fetch_add(1, Ordering::Relaxed);
        }
        Ok(Some((id, item)))
    }

    /// The front item, without taking it; `None` if the queue is empty.
    ///
    /// ```
    /// # use nvhtm::queue::Queue;
    /// # use nvhtm::{Heap, PoolOptions, Volatile};
    /// # let queue = Queue::open(Heap::create_in_memory(&PoolOptions::layout("doc").with_size(4 << 20), Volatile)?)?;
    /// let id = queue.enqueue(b"front")?;
    /// assert_eq!(queue.peek()?, Some((id, b"front".to_vec())));
    /// assert_eq!(queue.len(), 1);
    /// # Ok::<(), nvhtm::queue::QueueError>(())
    /// ```
    pub fn peek(&self) -> Result<Option<(u64, Vec<u8>)>> {
        let (front, end) = {
            let mut guard = lock(&self.state);
            let s = &mut *guard;
            let front = match s.items.front() {
                Some(&id) => Some((id, self.item(id, &mut s.read)?)),
                None => None,
            };
            (front, s.end)
        };
        self.log.commit(&self.heap, end)?;
        Ok(front)
    }

    /// Every item, front first, with its id (reads each one: for tools and checks).
    ///
    /// ```
    /// # use nvhtm::queue::Queue;
    /// # use nvhtm::{Heap, PoolOptions, Volatile};
    /// # let queue = Queue::open(Heap::create_in_memory(&PoolOptions::layout("doc").with_size(4 << 20), Volatile)?)?;
    /// let a = queue.enqueue(b"a")?;
    /// let b = queue.enqueue(b"b")?;
    /// assert_eq!(queue.contents()?, [(a, b"a".to_vec()), (b, b"b".to_vec())]);
    /// # Ok::<(), nvhtm::queue::QueueError>(())
    /// ```
    pub fn contents(&self) -> Result<Vec<(u64, Vec<u8>)>> {
        let (items, end) = {
            let mut guard = lock(&self.state);
            let s = &mut *guard;
            let mut items = Vec::with_capacity(s.items.len());
            for &id in &s.items {
                items.push((id, self.item(id, &mut s.read)?));
            }
            (items, s.end)
        };
        self.log.commit(&self.heap, end)?;
        Ok(items)
    }

    /// What `consumer`'s last dequeue returned (its id and bytes), `None` if it never took an
    /// item. After a crash, this tells a consumer whether its interrupted dequeue took effect:
    /// if the id is the last one it processed, it did not (or returned nothing); otherwise
    /// this is the item it took and has not processed.
    ///
    /// ```
    /// # use nvhtm::queue::Queue;
    /// # use nvhtm::{Heap, PoolOptions, Volatile};
    /// # let queue = Queue::open(Heap::create_in_memory(&PoolOptions::layout("doc").with_size(4 << 20), Volatile)?)?;
    /// assert_eq!(queue.last_dequeued(3)?, None);
    /// let id = queue.enqueue(b"once")?;
    /// queue.dequeue(3)?;
    /// assert_eq!(queue.last_dequeued(3)?, Some((id, b"once".to_vec())));
    /// # Ok::<(), nvhtm::queue::QueueError>(())
    /// ```
    pub fn last_dequeued(&self, consumer: u32) -> Result<Option<(u64, Vec<u8>)>> {
        let (last, end) = {
            let s = lock(&self.state);
            (s.last.get(&consumer).cloned(), s.end)
        };
        self.log.commit(&self.heap, end)?;
        Ok(last)
    }

    /// Items in the queue, counting operations still in flight (not yet durable).
    ///
    /// ```
    /// # use nvhtm::queue::Queue;
    /// # use nvhtm::{Heap, PoolOptions, Volatile};
    /// # let queue = Queue::open(Heap::create_in_memory(&PoolOptions::layout("doc").with_size(4 << 20), Volatile)?)?;
    /// queue.enqueue(b"a")?;
    /// assert_eq!(queue.len(), 1);
    /// # Ok::<(), nvhtm::queue::QueueError>(())
    /// ```
    pub fn len(&self) -> u64 {
        lock(&self.state).items.len() as u64
    }

    /// Whether the queue is empty (as [`len`](Queue::len) counts).
    ///
    /// ```
    /// # use nvhtm::queue::Queue;
    /// # use nvhtm::{Heap, PoolOptions, Volatile};
    /// # let queue = Queue::open(Heap::create_in_memory(&PoolOptions::layout("doc").with_size(4 << 20), Volatile)?)?;
    /// assert!(queue.is_empty());
    /// # Ok::<(), nvhtm::queue::QueueError>(())
    /// ```
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The bound given when the queue was created.
    ///
    /// ```
    /// # use nvhtm::queue::Queue;
    /// # use nvhtm::{Heap, PoolOptions, Volatile};
    /// # let queue = Queue::open(Heap::create_in_memory(&PoolOptions::layout("doc").with_size(4 << 20), Volatile)?)?;
    /// assert_eq!(queue.capacity(), None);
    /// # Ok::<(), nvhtm::queue::QueueError>(())
    /// ```
    pub fn capacity(&self) -> Option<u64> {
        self.capacity
    }

    /// Counts.
    ///
    /// ```
    /// # use nvhtm::queue::Queue;
    /// # use nvhtm::{Heap, PoolOptions, Volatile};
    /// # let queue = Queue::open(Heap::create_in_memory(&PoolOptions::layout("doc").with_size(4 << 20), Volatile)?)?;
    /// queue.enqueue(b"a")?;
    /// queue.dequeue(0)?;
    /// queue.dequeue(0)?;
    /// let stats = queue.stats();
    /// assert_eq!((stats.enqueues, stats.dequeues, stats.empty_dequeues), (1, 1, 1));
    /// # Ok::<(), nvhtm::queue::QueueError>(())
    /// ```
    pub fn stats(&self) -> QueueStats {
        let (len, consumers) = {
            let s = lock(&self.state);
            (s.items.len() as u64, s.last.len())
        };
        QueueStats {
            len,
            capacity: self.capacity,
            consumers,
            enqueues: self.enqueues.load(Ordering::Relaxed),
            dequeues: self.dequeues.load(Ordering::Relaxed),
            empty_dequeues: self.empty_dequeues.load(Ordering::Relaxed),
            compactions: self.compactions.load(Ordering::Relaxed),
            compaction_failures: self.compaction_failures.load(Ordering::Relaxed),
            log: self.log.stats(),
        }
    }

    /// The heap the queue lives in.
    ///
    /// ```
    /// # use nvhtm::queue::Queue;
    /// # use nvhtm::{Heap, PoolOptions, Volatile};
    /// # let queue = Queue::open(Heap::create_in_memory(&PoolOptions::layout("doc").with_size(4 << 20), Volatile)?)?;
    /// // The root object and the log's first segment.
    /// let heap = queue.heap().stats()?;
    /// assert_eq!(heap.small_blocks + heap.large_blocks, 2);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn heap(&self) -> &Heap<D> {
        &self.heap
    }

    /// Commits and marks the log closed, leaving the heap open (the crash workloads' clean
    /// close).
    pub(crate) fn mark_closed(&self) -> Result<()> {
        let _s = lock(&self.state);
        Ok(self.log.close(&self.heap)?)
    }

    /// Commits, marks the log closed, and closes the heap.
    ///
    /// ```
    /// # use nvhtm::queue::Queue;
    /// # use nvhtm::{Heap, PoolOptions, Volatile};
    /// # let queue = Queue::open(Heap::create_in_memory(&PoolOptions::layout("doc").with_size(4 << 20), Volatile)?)?;
    /// queue.enqueue(b"kept")?;
    /// queue.close()?;
    /// # Ok::<(), nvhtm::queue::QueueError>(())
    /// ```
    pub fn close(self) -> Result<()> {
        self.mark_closed()?;
        Ok(self.heap.close()?)
    }

    /// The bytes of item `id`, whose ENQ record was written (and may not be durable yet: the
    /// caller answers only after a commit up to `State::end`).
    fn item(&self, id: u64, buf: &mut Vec<u8>) -> Result<Vec<u8>> {
        self.log.read_written(&self.heap, id, buf)?;
        layout::enq_item(buf)
            .map(<[u8]>::to_vec)
            .ok_or_else(|| QueueError::Corrupt(format!("item {id} is not an enqueue record")))
    }
}
