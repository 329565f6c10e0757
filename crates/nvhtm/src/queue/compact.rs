//! Space and accounting: compaction (a checkpoint of the consumers' last dequeues, then a
//! truncation of the log to the front item) and the queue's check.

use std::sync::atomic::Ordering;

use super::replay::replay;
use super::{layout, lock, Queue, QueueCheck, Result, State};
use crate::persist::Domain;

impl<D: Domain> Queue<D> {
    /// Checks the log (every record from its head to its tail) and the queue's accounting:
    /// the log's records, replayed, give exactly the queue's state in DRAM; ids grow from the
    /// front; the bound holds. Operations wait while it runs.
    ///
    /// ```
    /// # use nvhtm::queue::Queue;
    /// # use nvhtm::{Heap, PoolOptions, Volatile};
    /// # let queue = Queue::open(Heap::create_in_memory(&PoolOptions::layout("doc").with_size(4 << 20), Volatile)?)?;
    /// queue.enqueue(b"a")?;
    /// let report = queue.check()?;
    /// assert!(report.is_clean(), "{report:?}");
    /// assert_eq!(report.items, 1);
    /// # Ok::<(), nvhtm::queue::QueueError>(())
    /// ```
    pub fn check(&self) -> Result<QueueCheck> {
        let _no_compaction = lock(&self.compactor);
        let s = lock(&self.state);
        self.log.commit(&self.heap, s.end)?;
        let mut report = QueueCheck {
            log: self.log.check(&self.heap)?,
            items: s.items.len() as u64,
            consumers: s.last.len(),
            problems: Vec::new(),
        };
        match replay(&self.heap, &self.log) {
            Ok(found) => {
                if found.items != s.items {
                    report.problems.push(format!(
                        "the log holds {} items, the queue {} (fronts {:?} and {:?})",
                        found.items.len(),
                        s.items.len(),
                        found.items.front(),
                        s.items.front()
                    ));
                }
                if found.last != s.last {
                    report.problems.push("the log's last dequeues differ from the queue's".into());
                }
                if found.end != s.end {
                    report.problems.push(format!("the log ends at {}, the queue at {}", found.end, s.end));
                }
            }
            Err(e) => report.problems.push(format!("replaying the log: {e}")),
        }
        if !s.items.iter().zip(s.items.iter().skip(1)).all(|(a, b)| a < b) {
            report.problems.push("item ids do not grow from the front".into());
        }
        if s.items.front().is_some_and(|&front| front < self.log.head()) {
            report.problems.push(format!("the front item is before the log's head {}", self.log.head()));
        }
        if let Some(capacity) = self.capacity {
            if s.items.len() as u64 > capacity {
                report.problems.push(format!("{} items in a queue of {capacity}", s.items.len()));
            }
        }
        Ok(report)
    }

    /// Whether to compact: a truncation to the front item (or, with none, to the end) would
    /// free a segment, and the dead records before it take at least twice what a checkpoint
    /// takes (so that checkpoints, even ones larger than a segment, cost at most as much log as
    /// the records they let go).
    pub(super) fn compaction_due(&self, s: &State) -> bool {
        let limit = s.items.front().copied().unwrap_or(s.end);
        self.log.second_segment_start().is_some_and(|second| limit >= second)
            && limit.saturating_sub(self.log.head()) >= 2 * s.checkpoint_size
    }

    /// Writes a checkpoint of the consumers' last dequeues, commits it, and truncates the log
    /// to the front item (or to the checkpoint, if the queue is empty): after it, everything
    /// before the head is summarised (every item before it was dequeued; every consumer's last
    /// dequeue is in the checkpoint or after it), which is what replay needs.
    pub(super) fn compact(&self) -> Result<()> {
        let Ok(_alone) = self.compactor.try_lock() else { return Ok(()) };
        let (front, checkpoint, end) = {
            let mut guard = lock(&self.state);
            let s = &mut *guard;
            if !self.compaction_due(s) {
                return Ok(());
            }
            layout::checkpoint(
                &mut s.record,
                s.last.iter().map(|(&c, (id, item))| (c, *id, item.as_slice())),
            );
            debug_assert_eq!(s.record.len() as u64, s.checkpoint_size);
            let (lsn, end) = self.log.write(&self.heap, &s.record)?;
            debug_assert_eq!(lsn, s.end);
            s.end = end;
            (s.items.front().copied().unwrap_or(lsn), lsn, end)
        };
        // The checkpoint must be durable before the records it summarises are dropped (the
        // front item, before it, is then durable too: truncation needs a durable record).
        self.log.commit(&self.heap, end)?;
        debug_assert!(front <= checkpoint);
        self.log.truncate(&self.heap, front.min(checkpoint))?;
        // Truncation points only grow (the front only moves back, checkpoints are appended),
        // and only compactions truncate, one at a time: the head is exactly where this one put
        // it, at or before every live item.
        debug_assert_eq!(self.log.head(), front.min(checkpoint));
        self.compactions.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}
