//! The queue's crash workloads and its oracle, shared by `tests/queue_crash.rs` and the queue
//! mutation suites: enqueues (single and batched, some larger than a segment, some refused by
//! the bound) and dequeues by several consumers (some on an empty queue) on a bounded queue
//! with small log segments, so that segments are started, checkpoints written and the log
//! truncated often, and a clean close at the end.
//!
//! An image is recovered and must hold exactly the state after the operations that completed,
//! with the one in flight either applied or not (for a batch: any prefix of it): its items,
//! front to back, with their ids, and every consumer's last dequeue. So every acknowledged
//! enqueue is there unless an acknowledged dequeue took it, no acknowledged dequeue's item
//! comes back, and a consumer whose dequeue was in flight finds either its previous last
//! dequeue with that item still at the front, or that item as its last dequeue with the item
//! gone — never one without the other. The queue's own check must pass (the log's records,
//! replayed, give the state), and the heap must hold the log's segments and the queue's root
//! and nothing else.
//!
//! ```
//! use nvhtm::mutation::queue::{check, record};
//! use nvhtm::sim::{CrashTest, Sim};
//! let (recording, run) = record(Sim::new(), 1, 12);
//! let test = CrashTest { exhaustive_limit: 16, samples: 4, ..CrashTest::default() };
//! test.run(&recording, check(&run)).assert_passed();
//! ```

use std::collections::{BTreeMap, VecDeque};

use super::with_heap;
use crate::queue::{Queue, QueueError, QueueOptions};
use crate::sim::{CrashContext, CrashTest, MutationReport, Recording, Sim};
use crate::{Domain, Heap, PoolOptions};

/// A mark: operation `i` begins.
const BEGIN: u64 = 1 << 62;
/// A mark: operation `i` returned.
const END: u64 = 1 << 61;

/// The segment size of the workloads' queues (small: a segment holds a few records).
pub const SEGMENT_SIZE: u64 = 512;

/// The bound of the workloads' queues.
pub const CAPACITY: u64 = 6;

/// The consumer ids the workloads use.
pub const CONSUMERS: u32 = 3;

/// The pool options of the queue workloads (2 MiB, growing up to 16 MiB).
///
/// ```
/// assert_eq!(nvhtm::mutation::queue::opts().size, 2 << 20);
/// ```
pub fn opts() -> PoolOptions {
    PoolOptions::layout("queue-crash").with_size(2 << 20).with_max_size(16 << 20)
}

/// The options of the workloads' queues.
fn queue_opts() -> QueueOptions {
    QueueOptions { segment_size: SEGMENT_SIZE, capacity: Some(CAPACITY) }
}

/// An item and its id.
pub type Item = (u64, Vec<u8>);

/// The queue's state: its items, front first, and each consumer's last dequeue.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Model {
    /// The items, front first.
    pub items: VecDeque<Item>,
    /// Each consumer's last dequeue.
    pub last: BTreeMap<u32, Item>,
}

/// One operation of a run, with what it returned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Items enqueued with one commit (a batch when more than one), with their ids.
    Enqueue(Vec<Item>),
    /// A batch the bound refused.
    Full(usize),
    /// A consumer's dequeue and what it took (`None`: the queue was empty).
    Dequeue(u32, Option<Item>),
    /// The queue marked closed (a clean close, the heap left open).
    Close,
}

/// A run: the state when it started, and what it did.
#[derive(Debug, Clone, Default)]
pub struct Run {
    /// The state at the start.
    pub base: Model,
    /// The operations, in order.
    pub steps: Vec<Step>,
    /// The compactions (checkpoint and truncation) the operations ran.
    pub compactions: u64,
}

impl Run {
    /// The state after the first `done` operations.
    fn after(&self, done: usize) -> Model {
        let mut model = self.base.clone();
        for step in &self.steps[..done] {
            apply(&mut model, step);
        }
        model
    }

    /// Every state a crash may leave once `marks` were made.
    fn allowed(&self, marks: &[u64]) -> Vec<Model> {
        let count = |kind: u64| marks.iter().filter(|&&m| m & kind != 0).count();
        let (begun, done) = (count(BEGIN), count(END));
        let model = self.after(done);
        let mut allowed = vec![model.clone()];
        if begun > done {
            match &self.steps[done] {
                Step::Enqueue(batch) => {
                    for j in 1..=batch.len() {
                        let mut m = model.clone();
                        m.items.extend(batch[..j].iter().cloned());
                        allowed.push(m);
                    }
                }
                step => {
                    let mut m = model;
                    apply(&mut m, step);
                    if !allowed.contains(&m) {
                        allowed.push(m);
                    }
                }
            }
        }
        allowed
    }
}

fn apply(model: &mut Model, step: &Step) {
    match step {
        Step::Enqueue(batch) => model.items.extend(batch.iter().cloned()),
        Step::Dequeue(consumer, Some(item)) => {
            assert_eq!(model.items.pop_front().as_ref(), Some(item), "the queue is FIFO");
            model.last.insert(*consumer, item.clone());
        }
        Step::Dequeue(_, None) | Step::Full(_) | Step::Close => {}
    }
}

/// An item's bytes: which run and operation enqueued it, padded to a random length (some
/// longer than a segment).
fn item(rng: &mut fastrand::Rng, run: u32, op: usize, j: usize) -> Vec<u8> {
    let mut p = format!("run {run} op {op} item {j}").into_bytes();
    let len = if rng.u8(..20) == 0 { 560 } else { rng.usize(..48) };
    p.extend((0..len).map(|i| (i as u8).wrapping_mul(29) ^ op as u8));
    p
}

/// Runs `n` random operations on `queue`, whose state is `base`; marks each one's beginning
/// and end, and checks each one's answer against the model as it goes. Ends with a clean
/// close when `close`.
///
/// ```
/// use nvhtm::mutation::queue::{opts, run_ops, Model};
/// use nvhtm::queue::{Queue, QueueOptions};
/// use nvhtm::{Heap, Volatile};
/// let heap = Heap::create_in_memory(&opts(), Volatile).unwrap();
/// let queue = Queue::open_with(heap, QueueOptions { segment_size: 512, capacity: Some(6) }).unwrap();
/// let run = run_ops(None, &queue, Model::default(), &mut fastrand::Rng::with_seed(1), 50, 1, true);
/// assert_eq!(run.steps.len(), 51);
/// assert!(queue.stats().compactions > 0);
/// ```
pub fn run_ops<D: Domain>(
    sim: Option<&Sim>,
    queue: &Queue<D>,
    base: Model,
    rng: &mut fastrand::Rng,
    n: usize,
    run: u32,
    close: bool,
) -> Run {
    let mark = |m: u64| {
        if let Some(sim) = sim {
            sim.mark(m);
        }
    };
    let mut model = base.clone();
    let compactions = queue.stats().compactions;
    let mut history = Run { base, steps: Vec::new(), compactions: 0 };
    for i in 0..n + usize::from(close) {
        let len = model.items.len();
        // Phases of eight operations: filling (up to the bound), mixed, draining (to empty).
        let dequeue_percent = [25, 50, 75][(i / 8) % 3];
        mark(BEGIN | i as u64);
        let step = if i == n {
            queue.mark_closed().unwrap();
            Step::Close
        } else if i > 0 && rng.u8(..100) < dequeue_percent {
            let consumer = rng.u32(..CONSUMERS);
            Step::Dequeue(consumer, queue.dequeue(consumer).unwrap())
        } else {
            // A batch of tiny items first: a crash in it may leave a later record of it whole
            // and an earlier one torn, past the tail of a log that was closed cleanly there
            // (tiny, so that the crash images of its few lines are enumerated, not sampled).
            let batch: Vec<Vec<u8>> = if i == 0 {
                (0..3).map(|j| format!("{run}.{j}").into_bytes()).collect()
            } else {
                let records = if rng.u8(..5) == 0 { rng.usize(2..4) } else { 1 };
                (0..records).map(|j| item(rng, run, i, j)).collect()
            };
            let slices: Vec<&[u8]> = batch.iter().map(Vec::as_slice).collect();
            match queue.enqueue_batch(&slices) {
                Ok(ids) => Step::Enqueue(ids.into_iter().zip(batch).collect()),
                Err(QueueError::Full { .. }) => Step::Full(batch.len()),
                Err(e) => panic!("enqueue: {e}"),
            }
        };
        mark(END | i as u64);
        match &step {
            Step::Full(k) => assert!(len + k > CAPACITY as usize, "refused {k} items with {len} queued"),
            Step::Dequeue(_, got) => assert_eq!(got.as_ref(), model.items.front(), "dequeue {i}"),
            _ => {}
        }
        apply(&mut model, &step);
        history.steps.push(step);
    }
    history.compactions = queue.stats().compactions - compactions;
    history
}

/// Creates a queue, enqueues and dequeues a few items (not recorded) and closes it cleanly,
/// then reopens it with `sim` and records `ops` random operations and a clean close; returns
/// the recording and the run.
pub fn record(sim: Sim, seed: u64, ops: usize) -> (Recording, Run) {
    let heap = Heap::create_in_memory(&opts(), crate::Volatile).unwrap();
    let queue = Queue::open_with(heap, queue_opts()).unwrap();
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut base = Model::default();
    // Short ones: the recorded run's first records go on in the tail segment (clearing the
    // closed mark first), its first record's header (at 304 bytes, 48 past a line) and the rest
    // of its batch in different lines; two left, so that batch (three items) fits the bound.
    for j in 0..5 {
        let bytes = format!("run 0 item {j}").into_bytes();
        base.items.push_back((queue.enqueue(&bytes).unwrap(), bytes));
    }
    for consumer in 0..3 {
        let got = queue.dequeue(consumer).unwrap().unwrap();
        assert_eq!(Some(&got), base.items.front());
        base.items.pop_front();
        base.last.insert(consumer, got);
    }
    queue.mark_closed().unwrap();
    let image = queue.heap().pool().image().unwrap();
    let queue = Queue::open(Heap::open_image(&image, &opts(), sim.clone()).unwrap()).unwrap();
    sim.restart_recording().unwrap();
    let run = run_ops(Some(&sim), &queue, base, &mut rng, ops, 1, true);
    (sim.recording(), run)
}

/// The recovered queue's state.
fn found<D: Domain>(queue: &Queue<D>) -> Result<Model, QueueError> {
    let mut last = BTreeMap::new();
    for consumer in 0..CONSUMERS {
        if let Some(item) = queue.last_dequeued(consumer)? {
            last.insert(consumer, item);
        }
    }
    Ok(Model { items: queue.contents()?.into(), last })
}

fn show(model: &Model) -> String {
    let name =
        |(id, bytes): &Item| format!("{id}:{}", String::from_utf8_lossy(&bytes[..bytes.len().min(18)]));
    let items: Vec<String> = model.items.iter().map(name).collect();
    let last: Vec<String> = model.last.iter().map(|(c, item)| format!("{c}={}", name(item))).collect();
    format!("items {items:?}, last {last:?}")
}

/// Checks a recovered queue against the run that crashed; returns its state.
///
/// ```
/// use nvhtm::mutation::queue::{check_recovered, opts, record};
/// use nvhtm::mutation::with_heap;
/// use nvhtm::queue::Queue;
/// use nvhtm::sim::{CrashTest, Sim};
/// let (recording, run) = record(Sim::new(), 2, 6);
/// let test = CrashTest { exhaustive_limit: 4, samples: 2, ..CrashTest::default() };
/// let report = test.run(&recording, |sim, image, ctx| {
///     with_heap(sim, image, ctx, &opts(), |heap| {
///         let queue = Queue::open(heap).map_err(|e| e.to_string())?;
///         check_recovered(&queue, &run, &ctx.marks).map(drop)
///     })
/// });
/// report.assert_passed();
/// ```
pub fn check_recovered<D: Domain>(queue: &Queue<D>, run: &Run, marks: &[u64]) -> Result<Model, String> {
    let found = found(queue).map_err(|e| e.to_string())?;
    let allowed = run.allowed(marks);
    if !allowed.contains(&found) {
        return Err(format!(
            "the queue holds {}; allowed: {}",
            show(&found),
            allowed.iter().map(show).collect::<Vec<_>>().join(" | ")
        ));
    }
    let report = queue.check().map_err(|e| e.to_string())?;
    if !report.is_clean() {
        return Err(format!("check: {:?} {:?}", report.problems, report.log.problems));
    }
    super::no_leak(queue.heap(), queue.stats().log.segments as u64)?;
    Ok(found)
}

/// The oracle of a single-run workload.
pub fn check(run: &Run) -> impl Fn(&Sim, &[u8], &CrashContext) -> Result<(), String> + '_ {
    move |sim, image, ctx| {
        with_heap(sim, image, ctx, &opts(), |heap| {
            let queue = Queue::open(heap).map_err(|e| e.to_string())?;
            check_recovered(&queue, run, &ctx.marks).map(drop)
        })
    }
}

/// The check of a multi-run suite: the recovered queue against the run that crashed
/// (`parent`, or `first`); when followed, `more` operations (and a clean close) run on it and
/// their run is returned.
///
/// ```
/// use nvhtm::mutation::queue::{multi_run_check, record};
/// use nvhtm::sim::{CrashTest, Sim};
/// let (recording, run) = record(Sim::new(), 2, 4);
/// let test = CrashTest {
///     recovery_depth: 1,
///     follow_one_in: 4,
///     exhaustive_limit: 4,
///     samples: 2,
///     ..CrashTest::default()
/// };
/// let report = test.run_with(&recording, multi_run_check(run, 3));
/// report.assert_passed();
/// assert!(report.recovery_images_checked > 0);
/// ```
pub fn multi_run_check(
    first: Run,
    more: usize,
) -> impl Fn(&Sim, &[u8], &CrashContext, Option<&Run>) -> Result<Run, String> {
    move |sim, image, ctx, parent| {
        with_heap(sim, image, ctx, &opts(), |heap| {
            let queue = Queue::open(heap).map_err(|e| e.to_string())?;
            let run = parent.unwrap_or(&first);
            let found = check_recovered(&queue, run, &ctx.run_marks)
                .map_err(|e| format!("run {}: {e}", ctx.depth + 1))?;
            Ok(if ctx.followed {
                let mut rng = fastrand::Rng::with_seed(900 + u64::from(ctx.depth));
                run_ops(Some(sim), &queue, found, &mut rng, more, ctx.depth + 2, true)
            } else {
                Run::default()
            })
        })
    }
}

/// The `queue-single` suite: enqueues, batches, dequeues by three consumers, compactions
/// across many segments, crashed at every fence.
pub(super) fn single_suite() -> MutationReport {
    let (recording, run) = record(Sim::new(), 3, 30);
    let test = CrashTest { exhaustive_limit: 128, samples: 16, ..CrashTest::default() };
    test.mutation_run(&recording, check(&run))
}

/// The `queue-two-runs` suite: crash, recover, enqueue and dequeue on, crash again.
pub(super) fn two_runs_suite() -> MutationReport {
    let (recording, run) = record(Sim::new(), 4, 12);
    let test = CrashTest {
        recovery_depth: 1,
        follow_one_in: 8,
        exhaustive_limit: 8,
        samples: 4,
        ..CrashTest::default()
    };
    test.mutation_run_with(&recording, multi_run_check(run, 8))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The workload does what the oracle is meant to judge: segments switch, checkpoints and
    /// truncations happen, dequeues find the queue empty, the bound refuses batches.
    #[test]
    fn the_workload_covers_compaction_empty_dequeues_and_the_bound() {
        let heap = Heap::create_in_memory(&opts(), crate::Volatile).unwrap();
        let queue = Queue::open_with(heap, queue_opts()).unwrap();
        let mut rng = fastrand::Rng::with_seed(3);
        let run = run_ops(None, &queue, Model::default(), &mut rng, 120, 1, true);
        let stats = queue.stats();
        let full = run.steps.iter().filter(|s| matches!(s, Step::Full(_))).count();
        println!("{stats:?}, {full} refused");
        assert!(stats.compactions >= 3 && stats.empty_dequeues >= 3 && full >= 1, "{stats:?}");
        assert!(stats.log.head > 0);
        assert_eq!(found(&queue).unwrap(), run.after(run.steps.len()));
    }
}
