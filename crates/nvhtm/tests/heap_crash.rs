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

/// Runs `ops` random operations on slots `first..first + count`, returning the slot states
/// after each (index 0: before any).
fn workload<D: Domain>(
    heap: &Heap<D>,
    seed: u64,
    ops: usize,
    first: usize,
    count: usize,
    mut done: impl FnMut(usize),
) -> Vec<Root> {
    let root = heap.root::<Root>().unwrap();
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut history = vec![heap.get(root).unwrap()];
    for op in 0..ops {
        let mut model = *history.last().unwrap();
        let i = first + rng.usize(..count);
        let tag = (op as u64 % 250) + 1;
        let size = SIZES[rng.usize(..SIZES.len())];
        let slot_off = root.offset() + (i * 24) as u64;
        match rng.u8(..5) {
            // Allocate and link, freeing what the slot held.
            0 | 1 => {
                let old = model[i];
                let slot = heap
                    .transaction(|tx| {
                        if old[0] != 0 {
                            tx.free(old[0])?;
                        }
                        let at = tx.alloc_bytes(size)?;
                        tx.write_bytes(at, &fill(tag, size))?;
                        let slot = [at, size, tag];
                        tx.write_bytes(slot_off, bytemuck::bytes_of(&slot))?;
                        Ok::<_, HeapError>(slot)
                    })
                    .unwrap();
                model[i] = slot;
            }
            // Free through free_from: no snapshot, only redo words (the slot's offset word is
            // cleared), so the commit has no data fence of its own.
            2 if model[i][0] != 0 && rng.bool() => {
                heap.free_from(slot_off).unwrap();
                model[i][0] = 0;
            }
            // Free.
            2 if model[i][0] != 0 => {
                let old = model[i];
                heap.transaction(|tx| {
                    tx.free(old[0])?;
                    tx.write_bytes(slot_off, bytemuck::bytes_of(&[0u64; 3]))
                })
                .unwrap();
                model[i] = [0; 3];
            }
            // Update every occupied slot of ours in one transaction (several ranges).
            3 => {
                heap.transaction(|tx| {
                    for (j, slot) in model.iter_mut().enumerate().skip(first).take(count) {
                        let [at, size, _] = *slot;
                        if at != 0 {
                            tx.write_bytes(at, &head(tag, size))?;
                            let off = root.offset() + (j * 24 + 16) as u64;
                            tx.write_bytes(off, &tag.to_ne_bytes())?;
                            slot[2] = tag;
                        }
                    }
                    Ok::<_, HeapError>(())
                })
                .unwrap();
            }
            // Reserve, fill, publish into an empty slot; or an aborted transaction.
            _ => {
                if model[i][0] == 0 {
                    let r = heap.reserve(size).unwrap();
                    let at = r.offset();
                    heap.pool().write_bytes(at, &fill(tag, size)).unwrap();
                    heap.publish(vec![r], &[(slot_off, at), (slot_off + 8, size), (slot_off + 16, tag)])
                        .unwrap();
                    model[i] = [at, size, tag];
                } else {
                    let result: Result<(), HeapError> = heap.transaction(|tx| {
                        tx.write_bytes(slot_off + 16, &999u64.to_ne_bytes())?;
                        tx.alloc_bytes(size)?;
                        Err(HeapError::Corrupt("aborted on purpose".into()))
                    });
                    assert!(result.is_err());
                }
            }
        }
        history.push(model);
        done(op);
    }
    // Finally, always: a large block full of garbage, freed, and its chunks reused for a run of
    // a class not used before, so run creation meets garbage where its bitmap and heads go.
    let slot_off = root.offset() + (first * 24) as u64;
    for (step, size) in [(ops, 150_000u64), (ops + 1, 0), (ops + 2, 7000)] {
        let mut model = *history.last().unwrap();
        let old = model[first];
        let tag = (step as u64 % 250) + 1;
        heap.transaction(|tx| {
            if old[0] != 0 {
                tx.free(old[0])?;
            }
            let slot = if size == 0 {
                [0; 3]
            } else {
                let at = tx.alloc_bytes(size)?;
                tx.write_bytes(at, &fill(tag, size))?;
                [at, size, tag]
            };
            tx.write_bytes(slot_off, bytemuck::bytes_of(&slot))?;
            model[first] = slot;
            Ok::<_, HeapError>(())
        })
        .unwrap();
        history.push(model);
        done(step);
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

fn record(seed: u64, ops: usize) -> (Recording, Vec<Root>) {
    record_with(Sim::new(), seed, ops)
}

fn record_with(sim: Sim, seed: u64, ops: usize) -> (Recording, Vec<Root>) {
    let heap = Heap::create_in_memory(&opts(), sim.clone()).unwrap();
    heap.root::<Root>().unwrap();
    sim.restart_recording().unwrap();
    let history = workload(&heap, seed, ops, 0, SLOTS, |op| sim.mark(op as u64));
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
                let history =
                    workload(heap, 100 + t as u64, 20, t * 4, 4, |op| sim.mark((t as u64) << 32 | op as u64));
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
