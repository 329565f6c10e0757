//! Recovery: the queue's DRAM state rebuilt from its log.
//!
//! The log's durable records, from its head on, are a prefix of the order in which the
//! queue's operations took effect (every record is written under the queue's mutex), and the
//! log's head is only ever moved to a point where everything before it is summarised: every
//! item before the head was dequeued, and each consumer's last dequeue before the head is in
//! a checkpoint at or after it. Replaying from the head therefore gives the state after that
//! prefix:
//!
//! - ENQ pushes its LSN (the item's id) at the back;
//! - DEQ of an id at or after the head pops the front, which must be that id (DEQ records are
//!   in pop order); DEQ of an id before the head is history: its item is long gone, only the
//!   consumer's last dequeue changes. Such DEQs all come before the first DEQ of an id at or
//!   after the head (FIFO);
//! - CHECKPOINT sets the last dequeue of each consumer it names.

use std::collections::{BTreeMap, VecDeque};

use super::layout::{decode, Record};
use super::{QueueError, Result};
use crate::heap::Heap;
use crate::log::LogCore;
use crate::persist::Domain;

/// A consumer's last dequeue: the item's id and bytes.
pub(super) type Last = (u64, Vec<u8>);

/// The queue's state as its durable log says.
#[derive(Debug, Default, PartialEq, Eq)]
pub(super) struct Replayed {
    /// The items' ids, front first.
    pub items: VecDeque<u64>,
    /// Each consumer's last dequeue.
    pub last: BTreeMap<u32, Last>,
    /// The id of the last item dequeued at or after the head.
    pub popped: Option<u64>,
    /// The log's durable tail: where the next record goes.
    pub end: u64,
    /// Records read.
    pub records: u64,
}

fn corrupt(lsn: u64, what: String) -> QueueError {
    QueueError::Corrupt(format!("log record at LSN {lsn}: {what}"))
}

/// Replays the durable records of `log` from its head.
pub(super) fn replay<D: Domain>(heap: &Heap<D>, log: &LogCore) -> Result<Replayed> {
    let head = log.head();
    let mut state = Replayed::default();
    let mut buf = Vec::new();
    let mut lsn = head;
    while let Some(next) = log.read_into(heap, lsn, &mut buf)? {
        match decode(&buf).map_err(|e| corrupt(lsn, e))? {
            Record::Enq(_) => state.items.push_back(lsn),
            Record::Deq { consumer, id, item } => {
                if id >= lsn {
                    return Err(corrupt(lsn, format!("a dequeue of item {id}, not enqueued before it")));
                }
                if id < head {
                    if let Some(popped) = state.popped {
                        return Err(corrupt(
                            lsn,
                            format!("a dequeue of item {id} (before the head {head}) after item {popped}'s"),
                        ));
                    }
                } else {
                    // The protocol's invariant: DEQ records are in pop order, so each one's item
                    // is the front. Checked in every build: a corrupt pool gets an error.
                    match state.items.pop_front() {
                        Some(front) if front == id => state.popped = Some(id),
                        front => {
                            return Err(corrupt(
                                lsn,
                                format!("a dequeue of item {id} while the front is {front:?}"),
                            ))
                        }
                    }
                }
                state.last.insert(consumer, (id, item.to_vec()));
            }
            Record::Checkpoint(entries) => {
                for (consumer, id, item) in entries {
                    if id >= lsn {
                        return Err(corrupt(lsn, format!("a checkpoint naming item {id}, after it")));
                    }
                    state.last.insert(consumer, (id, item.to_vec()));
                }
            }
        }
        state.records += 1;
        lsn = next;
    }
    // The replay read every durable record: the next record goes where it stopped.
    debug_assert_eq!(lsn, log.tail());
    state.end = lsn;
    Ok(state)
}
