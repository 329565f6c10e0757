//! Crash consistency of the heap, proven with the simulator: random workloads of transactions
//! (allocation, free, multi-range updates, aborts), reserve/publish and pool growth, crashed
//! before every fence (and inside recovery), each image recovered and compared with a model:
//! transactions all-or-nothing, every completed one present, the heap consistent, no block
//! leaked or handed out twice. The workloads and the oracle are `nvhtm::mutation::heap`'s,
//! shared with the heap's mutation suites (`nvhtm mutation`).

use std::sync::Mutex;

use nvhtm::mutation::heap::{
    check_heap, check_slots, multi_run_check, opts, random_ops, record, record_script, record_with,
    single_thread_check, workload, Op, Root, Shape, SINGLE, SLOTS,
};
use nvhtm::mutation::{self, heap::TWO_RUNS_FIRST, heap::TWO_RUNS_SECOND, with_heap};
use nvhtm::sim::{CrashContext, CrashTest, Sim};
use nvhtm::Heap;

#[test]
fn random_transactions_survive_a_crash_at_every_fence() {
    let mut total = 0;
    for seed in 1..=16 {
        let (recording, history) = record(seed, 30);
        let test = CrashTest { exhaustive_limit: 1024, samples: 96, ..CrashTest::default() };
        let report = test.run(&recording, single_thread_check(&history));
        println!("seed {seed}: {} fences, {report}", recording.fences());
        report.assert_passed();
        total += report.images_checked;
    }
    assert!(total > 50_000, "only {total} images");
}

#[test]
fn recovery_survives_crashes_during_recovery() {
    for seed in 7..=10 {
        let (recording, history) = record(seed, 12);
        let report =
            CrashTest { recovery_depth: 1, exhaustive_limit: 128, samples: 16, ..CrashTest::default() }
                .run(&recording, single_thread_check(&history));
        println!("seed {seed}, depth 1: {report}");
        report.assert_passed();
        assert!(report.recovery_images_checked > 100);
    }
}

/// Every heap flush and fence is needed by some image of the heap's suites: a heap laid out in
/// a new pool (its header persisted before the pool's root names it), single-threaded
/// random transactions, two threads taking turns on the same words (the retirements, which
/// only another thread's later change needs: one thread alone persists them with its own next
/// fence), and two runs in a row (recovery's retirement of every lane and the fence after it).
#[test]
fn every_heap_flush_and_fence_is_needed() {
    let suites: Vec<_> = ["heap-format", "heap-single", "heap-two-threads", "heap-two-runs"]
        .into_iter()
        .map(|name| mutation::suite(name).unwrap())
        .collect();
    let table = mutation::run_suites(&suites);
    println!("{table}");
    assert!(table.suites.iter().all(|s| s.baseline_passed), "{table}");
    let heap: Vec<_> = table.sites.iter().filter(|row| row.structure == "heap").collect();
    assert!(heap.len() >= 10, "{table}");
    let missed: Vec<String> =
        heap.iter().filter(|row| !row.caught).map(|row| row.site().to_string()).collect();
    assert!(missed.is_empty(), "no crash image needs {missed:?}\n{table}");
    // The format, two-thread and two-run suites are not redundant: each catches a heap site that no
    // other suite catches.
    for suite in ["heap-format", "heap-two-threads", "heap-two-runs"] {
        assert!(heap.iter().any(|row| row.caught_by == [suite]), "{suite} catches nothing new\n{table}");
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
        with_heap(sim, image, ctx, &opts(), |heap| {
            for (t, history) in histories.iter().enumerate() {
                let k = ctx.marks.iter().filter(|&&m| m >> 32 == t as u64).count();
                let allowed: Vec<&Root> = history[k..(k + 2).min(history.len())].iter().collect();
                check_slots(&heap, &allowed, t * 4..t * 4 + 4)?;
            }
            check_heap(&heap).map(drop)
        })
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
    // The scripts of the `heap-two-runs` mutation suite.
    two_scripts(&TWO_RUNS_FIRST, &TWO_RUNS_SECOND).assert_passed();
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

/// Two crashes in a row over random workloads (eight seeds): every crash image of a first run is
/// checked, one in 24 is recovered, a second random run works on the same lanes, and it is
/// crashed at every fence in turn.
#[test]
fn two_random_runs_in_a_row_survive_a_crash_in_each() {
    let mut total = (0, 0);
    for seed in 21..=28 {
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
    assert!(total.0 > 1_000 && total.1 > 20_000, "only {total:?} images");
}
