//! The heap's crash workloads and oracle, shared by the heap's crash tests
//! (`tests/heap_crash.rs`) and the heap's mutation suites: transactions (allocation, free,
//! multi-range updates, nested transactions, aborts), reserve/publish and pool growth on the
//! slots of a root, and a check that compares a recovered heap with the slot states the
//! workload went through (transactions all-or-nothing, every completed one present, the heap
//! consistent, no block leaked or handed out twice).
//!
//! ```
//! use nvhtm::mutation::heap::{record, single_thread_check};
//! use nvhtm::sim::CrashTest;
//! let (recording, history) = record(1, 3);
//! let test = CrashTest { exhaustive_limit: 16, samples: 4, ..CrashTest::default() };
//! test.run(&recording, single_thread_check(&history)).assert_passed();
//! ```

use std::ops::Range;
use std::sync::{Barrier, Mutex};

use super::{with_heap, with_pool};

use crate::heap::{CheckReport, HeapError, HeapOptions, Tx};
use crate::sim::{CrashContext, CrashTest, MutationReport, Recording, Sim};
use crate::{Domain, Heap, Pool, PoolOptions};

/// A slot of the root: (block offset, size, tag). Tag t means the block's bytes are all `t`
/// (an update rewrites the first 512), so freed blocks leave non-zero garbage behind for later
/// runs and chunk heads to cope with.
pub type Slot = [u64; 3];
/// The number of slots in the root.
pub const SLOTS: usize = 8;
/// The root object of the heap workloads.
pub type Root = [Slot; SLOTS];

/// Block sizes the random workloads draw from: small classes, and large blocks of 1 to 3 chunks.
pub const SIZES: [u64; 7] = [24, 100, 700, 5000, 9000, 20_000, 150_000];

/// The pool options of the heap workloads (512 KiB, growing up to 4 MiB).
///
/// ```
/// assert_eq!(nvhtm::mutation::heap::opts().size, 512 << 10);
/// ```
pub fn opts() -> PoolOptions {
    PoolOptions::layout("heap-crash").with_size(512 << 10).with_max_size(4 << 20)
}

fn fill(tag: u64, size: u64) -> Vec<u8> {
    vec![tag as u8; size as usize]
}

/// What an update rewrites, and what the oracle checks.
fn head(tag: u64, size: u64) -> Vec<u8> {
    vec![tag as u8; size.min(512) as usize]
}

/// One operation of a workload on the root's slots.
#[derive(Debug, Clone, Copy)]
pub enum Op {
    /// Allocate a block of `size`, fill it and link it from `slot`, freeing what the slot held
    /// (one transaction: undo snapshot of the slot, allocation and free in the redo log).
    Alloc {
        /// The slot linked.
        slot: usize,
        /// The block's size.
        size: u64,
    },
    /// Free through `free_from`: no snapshot, only redo words (the slot's offset word is
    /// cleared), so the commit has no data fence of its own.
    FreeFrom {
        /// The slot freed.
        slot: usize,
    },
    /// Free in a transaction that also zeroes the slot.
    Free {
        /// The slot freed.
        slot: usize,
    },
    /// Re-tag the first `count` occupied slots of the workload's slots in one transaction,
    /// snapshotting all their ranges with one fence; with `nested`, first re-tag the last
    /// occupied slot through a transaction of another thread inside this one's body (it runs
    /// on another lane and commits before the outer one snapshots).
    Update {
        /// How many occupied slots are re-tagged.
        count: usize,
        /// Whether a nested transaction of another thread comes first.
        nested: bool,
    },
    /// Reserve, fill and publish into an empty slot.
    Publish {
        /// The slot linked.
        slot: usize,
        /// The block's size.
        size: u64,
    },
    /// A transaction that snapshots and allocates, then aborts.
    Abort {
        /// The slot whose tag the transaction overwrites before aborting.
        slot: usize,
        /// The size it allocates before aborting.
        size: u64,
    },
    /// Reserve a block and give it back: nothing changes on media, except that a large
    /// reservation may first merge chunks into one free element on the heap's own lane.
    ReserveCancel {
        /// The size reserved.
        size: u64,
    },
}

/// What a workload may do besides the basic operations.
#[derive(Debug, Clone, Copy)]
pub struct Shape {
    /// Updates may nest a transaction (single-threaded workloads only: two threads nesting
    /// could wait on each other's lanes).
    pub nested: bool,
}

/// The shape of single-threaded workloads.
pub const SINGLE: Shape = Shape { nested: true };

/// Draws `ops` random operations on `slots` (the slots' occupancy is tracked as the ops would
/// change it, starting from `start`), then always: a large block full of garbage, freed, and
/// its chunks reused for a run of a class not used before, so run creation meets garbage where
/// its bitmap and heads go.
///
/// ```
/// use nvhtm::mutation::heap::{random_ops, SINGLE, SLOTS};
/// let ops = random_ops(1, 10, 0..SLOTS, &[[0; 3]; SLOTS], SINGLE);
/// assert_eq!(ops.len(), 13);
/// ```
pub fn random_ops(seed: u64, ops: usize, slots: Range<usize>, start: &Root, shape: Shape) -> Vec<Op> {
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut occupied: Vec<bool> = start.iter().map(|s| s[0] != 0).collect();
    let mut script = Vec::with_capacity(ops + 3);
    for _ in 0..ops {
        let slot = slots.start + rng.usize(..slots.len());
        let size = SIZES[rng.usize(..SIZES.len())];
        let op = match rng.u8(..5) {
            0 | 1 => Op::Alloc { slot, size },
            2 if occupied[slot] && rng.bool() => Op::FreeFrom { slot },
            2 if occupied[slot] => Op::Free { slot },
            3 => {
                let n = slots.clone().filter(|&j| occupied[j]).count();
                Op::Update { count: rng.usize(..=n), nested: shape.nested && rng.bool() }
            }
            _ if !occupied[slot] => Op::Publish { slot, size },
            _ => Op::Abort { slot, size },
        };
        match op {
            Op::Alloc { .. } | Op::Publish { .. } => occupied[slot] = true,
            Op::Free { .. } | Op::FreeFrom { .. } => occupied[slot] = false,
            _ => {}
        }
        script.push(op);
    }
    let slot = slots.start;
    script.extend([Op::Alloc { slot, size: 150_000 }, Op::Free { slot }, Op::Alloc { slot, size: 7000 }]);
    script
}

/// Runs `ops` random operations on slots `first..first + count` (see [`random_ops`]), returning
/// the slot states committed one after another (see [`run_script`]).
///
/// ```
/// use nvhtm::mutation::heap::{opts, workload, Root, SINGLE, SLOTS};
/// let heap = nvhtm::Heap::create_in_memory(&opts(), nvhtm::Volatile).unwrap();
/// heap.root::<Root>().unwrap();
/// let history = workload(&heap, 1, 5, 0, SLOTS, SINGLE, |_| {});
/// assert!(history.len() > 5);
/// ```
pub fn workload<D: Domain>(
    heap: &Heap<D>,
    seed: u64,
    ops: usize,
    first: usize,
    count: usize,
    shape: Shape,
    done: impl FnMut(usize),
) -> Vec<Root> {
    let start = heap.get(heap.root::<Root>().unwrap()).unwrap();
    let script = random_ops(seed, ops, first..first + count, &start, shape);
    run_script(heap, &script, first..first + count, done)
}

fn slot_off<D: Domain>(heap: &Heap<D>, i: usize) -> u64 {
    heap.root::<Root>().unwrap().offset() + (i * 24) as u64
}

fn tag_off<D: Domain>(heap: &Heap<D>, i: usize) -> u64 {
    slot_off(heap, i) + 16
}

/// The transaction body of `op` (an [`Op::Alloc`], [`Op::Free`], non-nested [`Op::Update`] or
/// [`Op::Abort`]) on `model`'s `slots`: returns the slot states after it.
fn tx_body<D: Domain>(
    tx: &mut Tx<'_, D>,
    op: Op,
    tag: u64,
    model: &Root,
    slots: Range<usize>,
) -> Result<Root, HeapError> {
    let heap = tx.heap();
    let mut model = *model;
    match op {
        Op::Alloc { slot, size } => {
            let old = model[slot];
            if old[0] != 0 {
                tx.free(old[0])?;
            }
            let at = tx.alloc_bytes(size)?;
            tx.write_bytes(at, &fill(tag, size))?;
            tx.write_bytes(slot_off(heap, slot), bytemuck::bytes_of(&[at, size, tag]))?;
            model[slot] = [at, size, tag];
        }
        Op::Free { slot } => {
            tx.free(model[slot][0])?;
            tx.write_bytes(slot_off(heap, slot), bytemuck::bytes_of(&[0u64; 3]))?;
            model[slot] = [0; 3];
        }
        Op::Update { count, .. } => {
            let occupied: Vec<usize> = slots.filter(|&j| model[j][0] != 0).collect();
            let count = count.min(occupied.len());
            let ranges: Vec<(u64, u64)> = occupied[..count]
                .iter()
                .flat_map(|&j| [(model[j][0], model[j][1].min(512)), (tag_off(heap, j), 8)])
                .collect();
            tx.add_ranges(&ranges)?;
            for &j in &occupied[..count] {
                tx.write_bytes(model[j][0], &head(tag, model[j][1]))?;
                tx.write_bytes(tag_off(heap, j), &tag.to_ne_bytes())?;
                model[j][2] = tag;
            }
        }
        Op::Abort { slot, size } => {
            tx.write_bytes(tag_off(heap, slot), &999u64.to_ne_bytes())?;
            tx.alloc_bytes(size)?;
            return Err(HeapError::Corrupt("aborted on purpose".into()));
        }
        Op::FreeFrom { .. } | Op::Publish { .. } | Op::ReserveCancel { .. } => {
            unreachable!("{op:?} is not a transaction body")
        }
    }
    Ok(model)
}

/// Runs `op` (tagging with `tag`) on the heap whose slot states so far are `history`, pushing
/// the states it commits (two for a nested update) and calling `done(n)` as state `n + 1`
/// commits. What cannot apply (a free of an empty slot, a publish into an occupied one) is
/// skipped.
fn run_op<D: Domain>(
    heap: &Heap<D>,
    op: Op,
    tag: u64,
    slots: Range<usize>,
    history: &mut Vec<Root>,
    done: &mut impl FnMut(usize),
) {
    let mut model = *history.last().unwrap();
    let applies = match op {
        Op::FreeFrom { slot } | Op::Free { slot } => model[slot][0] != 0,
        Op::Publish { slot, .. } => model[slot][0] == 0,
        _ => true,
    };
    if !applies {
        return;
    }
    match op {
        Op::Alloc { .. } | Op::Free { .. } | Op::Update { nested: false, .. } => {
            model = heap.transaction(|tx| tx_body(tx, op, tag, &model, slots)).unwrap();
        }
        Op::FreeFrom { slot } => {
            heap.free_from(slot_off(heap, slot)).unwrap();
            model[slot][0] = 0;
        }
        Op::Update { count, nested: true } => {
            let occupied: Vec<usize> = slots.clone().filter(|&j| model[j][0] != 0).collect();
            model = heap
                .transaction(|tx| {
                    if let Some(&last) = occupied.last() {
                        let inner = tag + 120;
                        let [at, size, _] = model[last];
                        // On another thread, which takes the other lane without changing which
                        // lane this thread prefers.
                        std::thread::scope(|s| {
                            s.spawn(|| {
                                heap.transaction(|t2| {
                                    t2.write_bytes(at, &head(inner, size))?;
                                    t2.write_bytes(tag_off(heap, last), &inner.to_ne_bytes())
                                })
                            })
                            .join()
                            .expect("the nested transaction panicked")
                        })?;
                        model[last][2] = inner;
                        history.push(model);
                        done(history.len() - 2);
                    }
                    tx_body(tx, Op::Update { count, nested: false }, tag, &model, slots)
                })
                .unwrap();
        }
        Op::Publish { slot, size } => {
            let r = heap.reserve(size).unwrap();
            let at = r.offset();
            heap.pool().write_bytes(at, &fill(tag, size)).unwrap();
            let off = slot_off(heap, slot);
            heap.publish(vec![r], &[(off, at), (off + 8, size), (off + 16, tag)]).unwrap();
            model[slot] = [at, size, tag];
        }
        Op::Abort { .. } => {
            let result = heap.transaction(|tx| tx_body(tx, op, tag, &model, slots));
            assert!(result.is_err());
        }
        Op::ReserveCancel { size } => {
            let r = heap.reserve(size).unwrap();
            heap.cancel(r);
        }
    }
    history.push(model);
    done(history.len() - 2);
}

/// Runs `script` on `slots`, returning the slot states committed one after another (index 0:
/// before any); `done(n)` is called as state `n + 1` commits. Frees of empty slots and
/// publishes into occupied ones are skipped.
///
/// ```
/// use nvhtm::mutation::heap::{opts, run_script, Op, Root, SLOTS};
/// let heap = nvhtm::Heap::create_in_memory(&opts(), nvhtm::Volatile).unwrap();
/// heap.root::<Root>().unwrap();
/// let history = run_script(&heap, &[Op::Alloc { slot: 0, size: 24 }, Op::Free { slot: 0 }], 0..SLOTS, |_| {});
/// assert_eq!(history.len(), 3);
/// assert_ne!(history[1][0][0], 0);
/// assert_eq!(history[2][0], [0; 3]);
/// ```
pub fn run_script<D: Domain>(
    heap: &Heap<D>,
    script: &[Op],
    slots: Range<usize>,
    mut done: impl FnMut(usize),
) -> Vec<Root> {
    let root = heap.root::<Root>().unwrap();
    let mut history = vec![heap.get(root).unwrap()];
    for (op_index, &op) in script.iter().enumerate() {
        let tag = (op_index as u64 % 120) + 1;
        run_op(heap, op, tag, slots.clone(), &mut history, &mut done);
    }
    history
}

/// Checks a recovered heap's `slots` against the slot states `allowed`, and the blocks they
/// link against their tags.
///
/// ```
/// use nvhtm::mutation::heap::{check_slots, opts, run_script, Op, Root, SLOTS};
/// let heap = nvhtm::Heap::create_in_memory(&opts(), nvhtm::Volatile).unwrap();
/// heap.root::<Root>().unwrap();
/// let history = run_script(&heap, &[Op::Alloc { slot: 0, size: 24 }], 0..SLOTS, |_| {});
/// assert!(check_slots(&heap, &[&history[1]], 0..SLOTS).is_ok());
/// assert!(check_slots(&heap, &[&history[0]], 0..SLOTS).is_err());
/// ```
pub fn check_slots<D: Domain>(heap: &Heap<D>, allowed: &[&Root], slots: Range<usize>) -> Result<(), String> {
    let root = heap.root::<Root>().map_err(|e| e.to_string())?;
    let found = heap.get(root).map_err(|e| e.to_string())?;
    if !allowed.iter().any(|model| model[slots.clone()] == found[slots.clone()]) {
        return Err(format!(
            "slots {slots:?} are {:?}, expected one of {:?}",
            &found[slots.clone()],
            allowed.iter().map(|m| &m[slots.clone()]).collect::<Vec<_>>()
        ));
    }
    for [at, size, tag] in &found[slots] {
        if *at != 0 && *size != 0 {
            let mut buf = vec![0u8; (*size).min(512) as usize];
            heap.pool().read_into(*at, &mut buf).map_err(|e| e.to_string())?;
            if buf != head(*tag, *size) {
                return Err(format!("block {at:#x} does not hold tag {tag}"));
            }
        }
    }
    Ok(())
}

/// Heap consistency and no leak: exactly the root and the linked blocks are allocated, and no
/// two slots share a block.
///
/// ```
/// use nvhtm::mutation::heap::{check_heap, opts, Root};
/// let heap = nvhtm::Heap::create_in_memory(&opts(), nvhtm::Volatile).unwrap();
/// heap.root::<Root>().unwrap();
/// assert!(check_heap(&heap).is_ok());
/// heap.transaction(|tx| tx.alloc_bytes(24).map(drop)).unwrap(); // linked from nowhere
/// assert!(check_heap(&heap).unwrap_err().contains("a leak"));
/// ```
pub fn check_heap<D: Domain>(heap: &Heap<D>) -> Result<CheckReport, String> {
    let report = heap.check(&mut |_, _| {});
    if !report.is_consistent() {
        return Err(format!("inconsistent heap: {:?}", report.problems));
    }
    let found = heap.get(heap.root::<Root>().map_err(|e| e.to_string())?).map_err(|e| e.to_string())?;
    let mut linked: Vec<u64> = found.iter().map(|s| s[0]).filter(|&a| a != 0).collect();
    let n = linked.len();
    linked.sort();
    linked.dedup();
    if linked.len() != n {
        return Err("two slots link the same block".into());
    }
    let allocated = report.small_blocks + report.large_blocks;
    if allocated != 1 + n as u64 {
        return Err(format!("{allocated} blocks allocated but 1 root + {n} linked: a leak"));
    }
    Ok(report)
}

/// Records `ops` random single-threaded operations (seed `seed`) on a new heap with the
/// `Sim` domain, one mark per committed state; returns the recording and the states.
///
/// ```
/// let (recording, history) = nvhtm::mutation::heap::record(1, 4);
/// assert!(recording.fences() > 10 && history.len() > 4);
/// ```
pub fn record(seed: u64, ops: usize) -> (Recording, Vec<Root>) {
    record_with(Sim::new(), seed, ops)
}

/// [`record`] with a given simulator (e.g. [`Sim::file_model`]).
///
/// ```
/// let (recording, _) = nvhtm::mutation::heap::record_with(nvhtm::Sim::file_model(), 1, 2);
/// assert!(recording.fences() > 0);
/// ```
pub fn record_with(sim: Sim, seed: u64, ops: usize) -> (Recording, Vec<Root>) {
    let heap = Heap::create_in_memory(&opts(), sim.clone()).unwrap();
    heap.root::<Root>().unwrap();
    sim.restart_recording().unwrap();
    let history = workload(&heap, seed, ops, 0, SLOTS, SINGLE, |op| sim.mark(op as u64));
    (sim.recording(), history)
}

/// Records `script` on a new heap (its root allocated first), one mark per committed state.
///
/// ```
/// use nvhtm::mutation::heap::{record_script, Op};
/// let (recording, history) = record_script(&[Op::Alloc { slot: 0, size: 24 }]);
/// assert_eq!(history.len(), 2);
/// assert!(recording.fences() >= 3);
/// ```
pub fn record_script(script: &[Op]) -> (Recording, Vec<Root>) {
    let sim = Sim::new();
    let heap = Heap::create_in_memory(&opts(), sim.clone()).unwrap();
    heap.root::<Root>().unwrap();
    sim.restart_recording().unwrap();
    let history = run_script(&heap, script, 0..SLOTS, |op| sim.mark(op as u64));
    (sim.recording(), history)
}

/// The check of a single-run workload whose marks count committed states: the recovered
/// slots are the state after the completed operations or after the one in flight, and the
/// heap is consistent without a leak.
///
/// ```
/// use nvhtm::mutation::heap::{record_script, single_thread_check, Op};
/// use nvhtm::sim::CrashTest;
/// let (recording, history) = record_script(&[Op::Alloc { slot: 0, size: 100 }]);
/// CrashTest::default().run(&recording, single_thread_check(&history)).assert_passed();
/// ```
pub fn single_thread_check(
    history: &[Root],
) -> impl Fn(&Sim, &[u8], &CrashContext) -> Result<(), String> + '_ {
    move |sim, image, ctx| {
        with_heap(sim, image, ctx, &opts(), |heap| {
            let k = ctx.marks.len();
            let allowed: Vec<&Root> = history[k..(k + 2).min(history.len())].iter().collect();
            check_slots(&heap, &allowed, 0..SLOTS)?;
            check_heap(&heap).map(drop)
        })
    }
}

/// A check of a multi-run suite: the model it gets is the history of the run that crashed, the
/// one it returns the history of the run it starts.
pub type MultiRunCheck<'a> =
    Box<dyn Fn(&Sim, &[u8], &CrashContext, Option<&Vec<Root>>) -> Result<Vec<Root>, String> + 'a>;

/// The check of a multi-run suite: the image is judged against the model of the run that
/// crashed (`parent`, or the first run's `history`); when followed, the next run —
/// `next(depth, start)`'s script — works on the recovered heap, on the same lanes, and its
/// model is handed to the checks of its crashes.
///
/// ```
/// use nvhtm::mutation::heap::{multi_run_check, record_script, Op};
/// use nvhtm::sim::CrashTest;
/// let (recording, history) = record_script(&[Op::Alloc { slot: 0, size: 24 }]);
/// let test = CrashTest { recovery_depth: 1, exhaustive_limit: 8, samples: 2, follow_one_in: 4, ..CrashTest::default() };
/// let report = test.run_with(&recording, multi_run_check(&history, |_, _| vec![Op::Free { slot: 0 }]));
/// report.assert_passed();
/// assert!(report.recovery_images_checked > 0);
/// ```
pub fn multi_run_check<'a>(
    history: &'a [Root],
    next: impl Fn(u32, &Root) -> Vec<Op> + 'a,
) -> MultiRunCheck<'a> {
    Box::new(move |sim, image, ctx, parent| {
        with_heap(sim, image, ctx, &opts(), |heap| {
            let run = parent.map_or(history, Vec::as_slice);
            let k = ctx.run_marks.len();
            let allowed: Vec<&Root> = run[k..(k + 2).min(run.len())].iter().collect();
            check_slots(&heap, &allowed, 0..SLOTS).map_err(|e| format!("run {}: {e}", ctx.depth + 1))?;
            check_heap(&heap).map_err(|e| format!("run {}: {e}", ctx.depth + 1))?;
            if !ctx.followed {
                return Ok(Vec::new());
            }
            let start =
                heap.get(heap.root::<Root>().map_err(|e| e.to_string())?).map_err(|e| e.to_string())?;
            Ok(run_script(&heap, &next(ctx.depth, &start), 0..SLOTS, |op| sim.mark(op as u64)))
        })
    })
}

/// One round of [`record_two_threads`]: what thread A does, then what thread B does in the
/// transaction it opened before A began (so that A works on another lane).
const ROUNDS: [(Op, Op, Range<usize>); 3] = [
    // A commits an allocation (redo log: the run's bitmap word); B frees the block.
    (Op::Alloc { slot: 0, size: 100 }, Op::Free { slot: 0 }, 0..1),
    // A aborts after snapshotting slot 1's tag; B re-tags slot 1.
    (Op::Abort { slot: 1, size: 24 }, Op::Update { count: 1, nested: false }, 1..2),
    // A's large reservation merges chunks on the heap's own lane, and is given back; B
    // allocates a block of those chunks (its redo log rewrites their heads).
    (Op::ReserveCancel { size: 150_000 }, Op::Alloc { slot: 2, size: 150_000 }, 2..3),
];

/// The operation thread B runs after each round, on its own lane: its first fence makes B's
/// own retirement durable while A's is not yet.
const SETTLE: Op = Op::Alloc { slot: 7, size: 24 };

/// Records two threads taking turns on the same words, deterministically: in each round,
/// thread B opens a transaction and waits; thread A (on another lane, since B holds its own)
/// runs an operation to its end — a commit with a redo log, an abort, a merge of chunks on
/// the heap's own lane — and then fences no more; B then changes the words A's operation
/// wrote and commits, and runs one more operation. A crash after B's commit, before A's next
/// fence, finds A's retirement durable only if A's own fence made it so: another thread's
/// fence does not order A's write-backs. Without it, recovery would replay A's redo log (or
/// undo log) over B's committed change. Returns the recording (one mark per committed state,
/// in the global order) and the states.
///
/// ```
/// use nvhtm::mutation::heap::{record_two_threads, single_thread_check};
/// use nvhtm::sim::CrashTest;
/// let (recording, history) = record_two_threads();
/// assert_eq!(history.len(), 1 + 3 * 3);
/// let test = CrashTest { exhaustive_limit: 64, samples: 8, ..CrashTest::default() };
/// test.run(&recording, single_thread_check(&history)).assert_passed();
/// ```
pub fn record_two_threads() -> (Recording, Vec<Root>) {
    let sim = Sim::new();
    let heap = Heap::create_in_memory(&opts(), sim.clone()).unwrap();
    heap.root::<Root>().unwrap();
    // Slot 1 is occupied for the abort round.
    run_script(&heap, &[Op::Alloc { slot: 1, size: 100 }], 0..SLOTS, |_| {});
    sim.restart_recording().unwrap();
    let start = heap.get(heap.root::<Root>().unwrap()).unwrap();
    let history = Mutex::new(vec![start]);
    let barrier = Barrier::new(2);
    // Tags differ from state to state: the state's index.
    let tag = |history: &[Root]| history.len() as u64;
    let mark = |n: usize| sim.mark(n as u64);
    std::thread::scope(|s| {
        let (heap, history, barrier) = (&heap, &history, &barrier);
        s.spawn(move || {
            for (a, _, _) in ROUNDS {
                barrier.wait(); // B holds its lane
                let mut history = history.lock().unwrap();
                let t = tag(&history);
                run_op(heap, a, t, 0..SLOTS, &mut history, &mut |n| mark(n));
                drop(history);
                barrier.wait(); // B may go on
                barrier.wait(); // the round is over
            }
        });
        s.spawn(move || {
            for (_, b, slots) in ROUNDS {
                let model = heap
                    .transaction(|tx| {
                        barrier.wait();
                        barrier.wait(); // A's operation is over
                        let history = history.lock().unwrap();
                        tx_body(tx, b, tag(&history), history.last().unwrap(), slots.clone())
                    })
                    .unwrap();
                let mut history = history.lock().unwrap();
                history.push(model);
                mark(history.len() - 2);
                let t = tag(&history);
                run_op(heap, SETTLE, t, 0..SLOTS, &mut history, &mut |n| mark(n));
                drop(history);
                barrier.wait();
            }
        });
    });
    (sim.recording(), history.into_inner().unwrap())
}

/// The `heap-single` suite: 30 random single-threaded operations (seed 3).
pub(super) fn single_suite() -> MutationReport {
    let (recording, history) = record(3, 30);
    let test = CrashTest { exhaustive_limit: 256, samples: 32, ..CrashTest::default() };
    test.mutation_run(&recording, single_thread_check(&history))
}

/// The `heap-two-threads` suite: [`record_two_threads`].
pub(super) fn two_threads_suite() -> MutationReport {
    let (recording, history) = record_two_threads();
    let test = CrashTest { exhaustive_limit: 256, samples: 32, ..CrashTest::default() };
    test.mutation_run(&recording, single_thread_check(&history))
}

/// Records [`Heap::format`] of a new in-memory pool: the heap header and root words, persisted
/// before the pool's root names them.
///
/// ```
/// let recording = nvhtm::mutation::heap::record_format();
/// assert!(recording.fences() >= 2);
/// ```
pub fn record_format() -> Recording {
    let sim = Sim::new();
    let pool = Pool::create_in_memory(&opts(), sim.clone()).unwrap();
    sim.restart_recording().unwrap();
    Heap::format(pool, &HeapOptions::default()).unwrap();
    sim.recording()
}

/// The check of [`record_format`]'s images: the pool has no root yet (the format had not
/// published the heap), or it holds an empty, consistent heap.
///
/// ```
/// use nvhtm::mutation::heap::{check_format, record_format};
/// nvhtm::CrashTest::default().run(&record_format(), check_format).assert_passed();
/// ```
pub fn check_format(sim: &Sim, image: &[u8], ctx: &CrashContext) -> Result<(), String> {
    with_pool(sim, image, ctx, &opts(), |pool| {
        if pool.info().root_offset == 0 {
            return Ok(());
        }
        let heap = Heap::load(pool).map_err(|e| format!("the root names a heap that does not load: {e}"))?;
        let report = heap.check(&mut |_, _| {});
        if !report.is_consistent() || report.small_blocks + report.large_blocks != 0 {
            return Err(format!("a new heap is not empty and consistent: {report:?}"));
        }
        Ok(())
    })
}

/// The `heap-format` suite: [`record_format`] crashed everywhere.
pub(super) fn format_suite() -> MutationReport {
    CrashTest::default().mutation_run(&record_format(), check_format)
}

/// The first run of the `heap-two-runs` suite: its last update crashes with undo entries on
/// media.
pub const TWO_RUNS_FIRST: [Op; 3] = [
    Op::Alloc { slot: 0, size: 100 },
    Op::Alloc { slot: 1, size: 100 },
    Op::Update { count: 2, nested: false },
];

/// The second run of the `heap-two-runs` suite: a nested transaction (another thread, another
/// lane) changes a range the first run's rollback restored, before this thread fences again.
pub const TWO_RUNS_SECOND: [Op; 1] = [Op::Update { count: 1, nested: true }];

/// The `heap-two-runs` suite: [`TWO_RUNS_FIRST`] crashed everywhere, each image recovered and
/// [`TWO_RUNS_SECOND`] run on it and crashed everywhere. Recovery's retirement of every lane,
/// and the fence after it, are needed here: the recovering thread's fence is the only one that
/// orders its write-backs, and the nested transaction's thread changes a restored range first.
pub(super) fn two_runs_suite() -> MutationReport {
    let (recording, history) = record_script(&TWO_RUNS_FIRST);
    let test = CrashTest { recovery_depth: 1, exhaustive_limit: 128, samples: 16, ..CrashTest::default() };
    test.mutation_run_with(&recording, multi_run_check(&history, |_, _| TWO_RUNS_SECOND.to_vec()))
}
