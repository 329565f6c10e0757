//! Crash consistency of the heap, proven with the simulator: random workloads of transactions
//! (allocation, free, multi-range updates, aborts), reserve/publish and pool growth, crashed
//! before every fence (and inside recovery), each image recovered and compared with a model:
//! transactions all-or-nothing, every completed one present, the heap consistent, no block
//! leaked or handed out twice.

use std::sync::Mutex;

use nvhtm::heap::{CheckReport, HeapError};
use nvhtm::sim::{CrashContext, CrashTest, Recording, Sim};
use nvhtm::{Domain, Heap, PoolOptions};

/// A slot of the root: (block offset, size, tag). Tag t means the block's bytes are all `t`
/// (an update rewrites the first 512), so freed blocks leave non-zero garbage behind for later
/// runs and chunk heads to cope with.
type Slot = [u64; 3];
const SLOTS: usize = 8;
type Root = [Slot; SLOTS];

const SIZES: [u64; 7] = [24, 100, 700, 5000, 9000, 20_000, 150_000];

fn opts() -> PoolOptions {
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
enum Op {
    /// Allocate a block of `size`, fill it and link it from `slot`, freeing what the slot held
    /// (one transaction: undo snapshot of the slot, allocation and free in the redo log).
    Alloc { slot: usize, size: u64 },
    /// Free through `free_from`: no snapshot, only redo words (the slot's offset word is
    /// cleared), so the commit has no data fence of its own.
    FreeFrom { slot: usize },
    /// Free in a transaction that also zeroes the slot.
    Free { slot: usize },
    /// Re-tag the first `count` occupied slots of `slots` in one transaction, snapshotting all
    /// their ranges with one fence; with `nested`, first re-tag the last occupied slot through
    /// a transaction of another thread inside this one's body (it runs on another lane and
    /// commits before the outer one snapshots).
    Update { count: usize, nested: bool },
    /// Reserve, fill and publish into an empty slot.
    Publish { slot: usize, size: u64 },
    /// A transaction that snapshots and allocates, then aborts.
    Abort { slot: usize, size: u64 },
}

/// What a workload may do besides the basic operations.
#[derive(Clone, Copy)]
struct Shape {
    /// Updates may nest a transaction (single-threaded workloads only: two threads nesting
    /// could wait on each other's lanes).
    nested: bool,
}

/// Draws `ops` random operations on slots `first..first + count` (the slots' occupancy is
/// tracked as the ops would change it), then always: a large block full of garbage, freed,
/// and its chunks reused for a run of a class not used before, so run creation meets garbage
/// where its bitmap and heads go.
fn random_ops(seed: u64, ops: usize, slots: std::ops::Range<usize>, start: &Root, shape: Shape) -> Vec<Op> {
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

/// Runs `ops` random operations on slots `first..first + count` (see [`random_ops`]).
fn workload<D: Domain>(
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

/// Runs `script` on `slots`, returning the slot states committed one after another (index 0:
/// before any); `done(n)` is called as state `n + 1` commits. Frees of empty slots and
/// publishes into occupied ones are skipped.
fn run_script<D: Domain>(
    heap: &Heap<D>,
    script: &[Op],
    slots: std::ops::Range<usize>,
    mut done: impl FnMut(usize),
) -> Vec<Root> {
    let root = heap.root::<Root>().unwrap();
    let mut history = vec![heap.get(root).unwrap()];
    let slot_off = |i: usize| root.offset() + (i * 24) as u64;
    let tag_off = |i: usize| slot_off(i) + 16;
    for (op_index, &op) in script.iter().enumerate() {
        let mut model = *history.last().unwrap();
        let tag = (op_index as u64 % 120) + 1;
        // A script written for one start state may meet another (the run before it crashed):
        // what cannot apply is skipped.
        let applies = match op {
            Op::FreeFrom { slot } | Op::Free { slot } => model[slot][0] != 0,
            Op::Publish { slot, .. } => model[slot][0] == 0,
            _ => true,
        };
        if !applies {
            continue;
        }
        match op {
            Op::Alloc { slot, size } => {
                let old = model[slot];
                model[slot] = heap
                    .transaction(|tx| {
                        if old[0] != 0 {
                            tx.free(old[0])?;
                        }
                        let at = tx.alloc_bytes(size)?;
                        tx.write_bytes(at, &fill(tag, size))?;
                        tx.write_bytes(slot_off(slot), bytemuck::bytes_of(&[at, size, tag]))?;
                        Ok::<_, HeapError>([at, size, tag])
                    })
                    .unwrap();
            }
            Op::FreeFrom { slot } => {
                heap.free_from(slot_off(slot)).unwrap();
                model[slot][0] = 0;
            }
            Op::Free { slot } => {
                let old = model[slot];
                heap.transaction(|tx| {
                    tx.free(old[0])?;
                    tx.write_bytes(slot_off(slot), bytemuck::bytes_of(&[0u64; 3]))
                })
                .unwrap();
                model[slot] = [0; 3];
            }
            Op::Update { count, nested } => {
                let occupied: Vec<usize> = slots.clone().filter(|&j| model[j][0] != 0).collect();
                let count = count.min(occupied.len());
                heap.transaction(|tx| {
                    if let (true, Some(&last)) = (nested, occupied.last()) {
                        let inner = tag + 120;
                        let [at, size, _] = model[last];
                        // On another thread, which takes the other lane without changing which
                        // lane this thread prefers.
                        std::thread::scope(|s| {
                            s.spawn(|| {
                                heap.transaction(|t2| {
                                    t2.write_bytes(at, &head(inner, size))?;
                                    t2.write_bytes(tag_off(last), &inner.to_ne_bytes())
                                })
                            })
                            .join()
                            .expect("the nested transaction panicked")
                        })?;
                        model[last][2] = inner;
                        history.push(model);
                        done(history.len() - 2);
                    }
                    let ranges: Vec<(u64, u64)> = occupied[..count]
                        .iter()
                        .flat_map(|&j| [(model[j][0], model[j][1].min(512)), (tag_off(j), 8)])
                        .collect();
                    tx.add_ranges(&ranges)?;
                    for &j in &occupied[..count] {
                        tx.write_bytes(model[j][0], &head(tag, model[j][1]))?;
                        tx.write_bytes(tag_off(j), &tag.to_ne_bytes())?;
                        model[j][2] = tag;
                    }
                    Ok::<_, HeapError>(())
                })
                .unwrap();
            }
            Op::Publish { slot, size } => {
                let r = heap.reserve(size).unwrap();
                let at = r.offset();
                heap.pool().write_bytes(at, &fill(tag, size)).unwrap();
                let off = slot_off(slot);
                heap.publish(vec![r], &[(off, at), (off + 8, size), (off + 16, tag)]).unwrap();
                model[slot] = [at, size, tag];
            }
            Op::Abort { slot, size } => {
                let result: Result<(), HeapError> = heap.transaction(|tx| {
                    tx.write_bytes(tag_off(slot), &999u64.to_ne_bytes())?;
                    tx.alloc_bytes(size)?;
                    Err(HeapError::Corrupt("aborted on purpose".into()))
                });
                assert!(result.is_err());
            }
        }
        history.push(model);
        done(history.len() - 2);
    }
    history
}

/// Checks a recovered heap against the slot states allowed by `history` for thread `t`'s slots.
fn check_slots<D: Domain>(
    heap: &Heap<D>,
    allowed: &[&Root],
    slots: std::ops::Range<usize>,
) -> Result<(), String> {
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
fn check_heap<D: Domain>(heap: &Heap<D>) -> Result<CheckReport, String> {
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

/// The shape of single-threaded workloads.
const SINGLE: Shape = Shape { nested: true };

fn record(seed: u64, ops: usize) -> (Recording, Vec<Root>) {
    record_with(Sim::new(), seed, ops)
}

fn record_with(sim: Sim, seed: u64, ops: usize) -> (Recording, Vec<Root>) {
    let heap = Heap::create_in_memory(&opts(), sim.clone()).unwrap();
    heap.root::<Root>().unwrap();
    sim.restart_recording().unwrap();
    let history = workload(&heap, seed, ops, 0, SLOTS, SINGLE, |op| sim.mark(op as u64));
    (sim.recording(), history)
}

fn single_thread_check(history: &[Root]) -> impl Fn(&Sim, &[u8], &CrashContext) -> Result<(), String> + '_ {
    move |sim, image, ctx| {
        let heap = Heap::open_image(image, &opts(), sim.clone()).map_err(|e| e.to_string())?;
        let k = ctx.marks.len();
        let allowed: Vec<&Root> = history[k..(k + 2).min(history.len())].iter().collect();
        check_slots(&heap, &allowed, 0..SLOTS)?;
        check_heap(&heap).map(drop)
    }
}

#[test]
fn random_transactions_survive_a_crash_at_every_fence() {
    let mut total = 0;
    for seed in 1..=4 {
        let (recording, history) = record(seed, 30);
        let test = CrashTest { exhaustive_limit: 512, samples: 48, ..CrashTest::default() };
        let report = test.run(&recording, single_thread_check(&history));
        println!("seed {seed}: {} fences, {report}", recording.fences());
        report.assert_passed();
        total += report.images_checked;
    }
    assert!(total > 1000, "only {total} images");
}

#[test]
fn recovery_survives_crashes_during_recovery() {
    let (recording, history) = record(7, 12);
    let report = CrashTest { recovery_depth: 1, exhaustive_limit: 128, samples: 16, ..CrashTest::default() }
        .run(&recording, single_thread_check(&history));
    println!("depth 1: {report}");
    report.assert_passed();
    assert!(report.recovery_images_checked > 100);
}

/// The source line of a site, to tell what it does.
fn source_line(site: &nvhtm::persist::Site) -> String {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").join(site.file);
    let text = std::fs::read_to_string(&path).unwrap_or_default();
    text.lines().nth(site.line as usize - 1).unwrap_or_default().trim().to_string()
}

#[test]
fn every_heap_flush_and_fence_is_needed() {
    let (recording, history) = record(3, 30);
    let test = CrashTest { exhaustive_limit: 256, samples: 32, ..CrashTest::default() };
    let mutations = test.mutation_run(&recording, single_thread_check(&history));
    println!("{mutations}");
    mutations.baseline.assert_passed();
    let heap_sites = mutations.sites.iter().filter(|s| s.site.file.contains("heap")).count();
    assert!(heap_sites >= 10, "{mutations}");
    // A retirement made durable before the lane's locks are released protects against another
    // thread changing the same words while this lane's redo log is still replayable; one thread
    // alone always persists it with its own next fence, so no single-threaded crash image needs
    // it. Every other site must be needed by some image.
    for site in mutations.missed() {
        let line = source_line(&site);
        let next = {
            let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").join(site.file);
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            text.lines().nth(site.line as usize - 2).unwrap_or_default().trim().to_string()
        };
        assert!(
            line.contains("retire") || next.contains("retire"),
            "no crash image needs {site} (`{line}`)\n{mutations}"
        );
    }
}

#[test]
fn concurrent_transactions_survive_sampled_crashes() {
    let sim = Sim::new();
    let heap = Heap::create_in_memory(&opts(), sim.clone()).unwrap();
    heap.root::<Root>().unwrap();
    sim.restart_recording().unwrap();
    let histories: Mutex<Vec<Vec<Root>>> = Mutex::new(vec![Vec::new(), Vec::new()]);
    std::thread::scope(|s| {
        for t in 0..2usize {
            let (heap, sim, histories) = (&heap, &sim, &histories);
            s.spawn(move || {
                let shape = Shape { nested: false };
                let history = workload(heap, 100 + t as u64, 20, t * 4, 4, shape, |op| {
                    sim.mark((t as u64) << 32 | op as u64)
                });
                histories.lock().unwrap()[t] = history;
            });
        }
    });
    let recording = sim.recording();
    let histories = histories.into_inner().unwrap();
    let check = |sim: &Sim, image: &[u8], ctx: &CrashContext| -> Result<(), String> {
        let heap = Heap::open_image(image, &opts(), sim.clone()).map_err(|e| e.to_string())?;
        for (t, history) in histories.iter().enumerate() {
            let k = ctx.marks.iter().filter(|&&m| m >> 32 == t as u64).count();
            let allowed: Vec<&Root> = history[k..(k + 2).min(history.len())].iter().collect();
            check_slots(&heap, &allowed, t * 4..t * 4 + 4)?;
        }
        check_heap(&heap).map(drop)
    };
    let report =
        CrashTest { exhaustive_limit: 256, samples: 32, ..CrashTest::default() }.run(&recording, check);
    println!("two threads: {} fences, {report}", recording.fences());
    report.assert_passed();
}

/// The same protocols under the file model (the `Msync` domain's world): pages written back at
/// any time, torn at 512-byte sectors, flushes covering whole pages.
#[test]
fn random_transactions_survive_the_file_model() {
    let (recording, history) = record_with(Sim::file_model(), 11, 25);
    let test = CrashTest { exhaustive_limit: 256, samples: 32, ..CrashTest::default() };
    let report = test.run(&recording, single_thread_check(&history));
    println!("file model: {} fences, {report}", recording.fences());
    report.assert_passed();
    assert!(report.images_checked > 300);
}

/// A check of a multi-run suite: the model it gets is the history of the run that crashed, the
/// one it returns the history of the run it starts.
type MultiRunCheck<'a> =
    Box<dyn Fn(&Sim, &[u8], &CrashContext, Option<&Vec<Root>>) -> Result<Vec<Root>, String> + 'a>;

/// The check of a multi-run suite: the image is judged against the model of the run that
/// crashed (`parent`, or the first run's `history`); when followed, the next run —
/// `next(depth, start)`'s script — works on the recovered heap, on the same lanes, and its
/// model is handed to the checks of its crashes.
fn multi_run_check<'a>(history: &'a [Root], next: impl Fn(u32, &Root) -> Vec<Op> + 'a) -> MultiRunCheck<'a> {
    Box::new(move |sim, image, ctx, parent| {
        let heap = Heap::open_image(image, &opts(), sim.clone()).map_err(|e| e.to_string())?;
        let run = parent.map_or(history, Vec::as_slice);
        let k = ctx.run_marks.len();
        let allowed: Vec<&Root> = run[k..(k + 2).min(run.len())].iter().collect();
        check_slots(&heap, &allowed, 0..SLOTS).map_err(|e| format!("run {}: {e}", ctx.depth + 1))?;
        check_heap(&heap).map_err(|e| format!("run {}: {e}", ctx.depth + 1))?;
        if !ctx.followed {
            return Ok(Vec::new());
        }
        let start = heap.get(heap.root::<Root>().map_err(|e| e.to_string())?).map_err(|e| e.to_string())?;
        Ok(run_script(&heap, &next(ctx.depth, &start), 0..SLOTS, |op| sim.mark(op as u64)))
    })
}

/// Records `script` on a new heap (its root allocated first).
fn record_script(script: &[Op]) -> (Recording, Vec<Root>) {
    let sim = Sim::new();
    let heap = Heap::create_in_memory(&opts(), sim.clone()).unwrap();
    heap.root::<Root>().unwrap();
    sim.restart_recording().unwrap();
    let history = run_script(&heap, script, 0..SLOTS, |op| sim.mark(op as u64));
    (sim.recording(), history)
}

/// Crashes `first` everywhere, runs `second` on every recovered image and crashes it
/// everywhere too (exhaustively within a generous budget: these scripts are short).
fn two_scripts(first: &[Op], second: &[Op]) -> nvhtm::sim::CrashReport {
    let (recording, history) = record_script(first);
    let test = CrashTest { recovery_depth: 1, exhaustive_limit: 128, samples: 16, ..CrashTest::default() };
    let report = test.run_with(&recording, multi_run_check(&history, |_, _| second.to_vec()));
    println!("{} fences, {report}", recording.fences());
    report
}

/// A commit with nothing of its own to flush (`free_from`) can leave its redo header on media
/// without its activation; the second run's first transaction on that lane, with undo
/// snapshots, must not be taken for it when it crashes before its commit.
#[test]
fn a_redo_header_left_by_a_crash_is_not_the_next_runs() {
    let first = [Op::Alloc { slot: 0, size: 24 }, Op::Alloc { slot: 1, size: 24 }, Op::FreeFrom { slot: 0 }];
    let second = [Op::Alloc { slot: 1, size: 100 }, Op::Alloc { slot: 2, size: 24 }];
    two_scripts(&first, &second).assert_passed();
}

/// Run creation on the heap's own lane can leave a `Run` chunk head in its redo log; after the
/// chunk is reused (here by a one-chunk block, which needs no work on that lane) the next run's
/// first run creation must not replay it.
#[test]
fn a_run_creation_left_by_a_crash_is_not_replayed_later() {
    let first = [Op::Alloc { slot: 0, size: 7000 }];
    let second = [Op::Alloc { slot: 1, size: 20_000 }, Op::Alloc { slot: 2, size: 5000 }];
    two_scripts(&first, &second).assert_passed();
}

/// Undo entries snapshotted with one fence can persist without the activation; in the next run
/// another lane commits a change to one of their ranges, then this lane's next transaction
/// (same entry sizes) crashes before its commit: its rollback must stop at its own entries.
#[test]
fn undo_entries_left_by_a_crash_are_not_rolled_back_later() {
    let first = [
        Op::Alloc { slot: 0, size: 100 },
        Op::Alloc { slot: 1, size: 100 },
        Op::Update { count: 2, nested: false },
    ];
    let second = [Op::Update { count: 1, nested: true }];
    two_scripts(&first, &second).assert_passed();
}

/// Three runs in a row, each crashed: the second run's leftovers must not be taken for the third's.
#[test]
fn three_runs_in_a_row_survive_a_crash_in_each() {
    let first =
        [Op::Alloc { slot: 0, size: 100 }, Op::Alloc { slot: 1, size: 100 }, Op::FreeFrom { slot: 0 }];
    let (recording, history) = record_script(&first);
    let test = CrashTest {
        recovery_depth: 2,
        follow_one_in: 6,
        exhaustive_limit: 64,
        samples: 8,
        ..CrashTest::default()
    };
    let next = |depth: u32, _: &Root| match depth {
        0 => vec![Op::Update { count: 2, nested: false }, Op::Alloc { slot: 2, size: 24 }],
        _ => vec![Op::Update { count: 1, nested: true }, Op::FreeFrom { slot: 2 }],
    };
    let report = test.run_with(&recording, multi_run_check(&history, next));
    println!("three runs: {report}");
    report.assert_passed();
    assert!(report.recovery_images_checked > 1000, "{report}");
}

/// Two crashes in a row over random workloads: every crash image of a first run is checked, one
/// in 24 is recovered, a second random run works on the same lanes, and it is
/// crashed at every fence in turn.
#[test]
fn two_random_runs_in_a_row_survive_a_crash_in_each() {
    let mut total = (0, 0);
    for seed in [21, 22] {
        let (recording, history) = record(seed, 10);
        let test = CrashTest {
            recovery_depth: 1,
            follow_one_in: 24,
            exhaustive_limit: 64,
            samples: 12,
            seed,
            ..CrashTest::default()
        };
        let next =
            |depth: u32, start: &Root| random_ops(seed * 100 + u64::from(depth), 8, 0..SLOTS, start, SINGLE);
        let report = test.run_with(&recording, multi_run_check(&history, next));
        println!("seed {seed}: {} fences, {report}", recording.fences());
        report.assert_passed();
        total.0 += report.images_checked;
        total.1 += report.recovery_images_checked;
    }
    assert!(total.0 > 300 && total.1 > 5_000, "only {total:?} images");
}
