//! Crash consistency of the strict map, proven with the simulator: random operations (inline and
//! out-of-place records, updates changing shape, removals, compare-and-swap) around a segment
//! split, crashed before every fence; each image opened and compared with the model: every
//! completed operation present, the one in flight present or absent, nothing else changed, the
//! heap consistent with no leaked block. The workloads and the oracle are
//! `nvhtm::mutation::map`'s, shared with the map's mutation suites (`nvhtm mutation`).

use nvhtm::mutation;
use nvhtm::mutation::map::{apply, check, key, multi_run_check, random_op, record, record_with, Model};
use nvhtm::sim::{CrashTest, Sim};
use nvhtm::StrictMap;

#[test]
fn operations_across_a_split_survive_a_crash_at_every_fence() {
    for seed in 1..=2 {
        // Filled to just below the first split, which comes within the recorded operations.
        let (recording, histories) = record(seed, u64::MAX, 80, 1);
        let test = CrashTest { exhaustive_limit: 256, samples: 24, ..CrashTest::default() };
        let report = test.run(&recording, check(1, &histories));
        println!("seed {seed}: {} fences, {report}", recording.fences());
        report.assert_passed();
        assert!(report.images_checked > 300);
    }
}

#[test]
fn small_maps_survive_crashes_during_recovery_too() {
    let (recording, histories) = record(3, 20, 25, 1);
    let test = CrashTest { recovery_depth: 1, exhaustive_limit: 128, samples: 16, ..CrashTest::default() };
    let report = test.run(&recording, check(1, &histories));
    println!("depth 1: {report}");
    report.assert_passed();
}

#[test]
fn concurrent_writers_survive_sampled_crashes() {
    let (recording, histories) = record(4, u64::MAX, 40, 2);
    let test = CrashTest { exhaustive_limit: 64, samples: 12, ..CrashTest::default() };
    let report = test.run(&recording, check(2, &histories));
    println!("two threads: {} fences, {report}", recording.fences());
    report.assert_passed();
}

/// Every map flush and fence is needed by some image of the map's suites: random operations
/// across a split, a split whose cleared slots another thread reuses before the splitting
/// thread fences again (the clearing's fence, which only that other thread needs), and a split
/// crashed before its clearing whose stale window the next run inserts into (the fence after
/// an insert clears stale slots itself, needed only after a crash).
#[test]
fn every_map_flush_and_fence_is_needed() {
    let suites: Vec<_> = ["map-single", "map-split-two-threads", "map-two-runs"]
        .into_iter()
        .map(|name| mutation::suite(name).unwrap())
        .collect();
    let table = mutation::run_suites(&suites);
    println!("{table}");
    assert!(table.suites.iter().all(|s| s.baseline_passed), "{table}");
    let map: Vec<_> = table.sites.iter().filter(|row| row.structure == "map").collect();
    assert!(map.len() >= 4, "{table}");
    let missed: Vec<String> =
        map.iter().filter(|row| !row.caught).map(|row| row.site().to_string()).collect();
    assert!(missed.is_empty(), "no crash image needs {missed:?}\n{table}");
    // The multi-run suite catches a site no other suite does (the fence after an insert's own
    // clearing); the two-thread one a site the single-threaded random suite misses (the split's
    // clearing fence, which the multi-run suite also needs).
    assert!(
        map.iter().any(|row| row.caught_by == ["map-two-runs"]),
        "map-two-runs catches nothing new\n{table}"
    );
    assert!(
        map.iter()
            .any(|row| row.caught_by.contains(&"map-split-two-threads")
                && !row.caught_by.contains(&"map-single")),
        "map-split-two-threads catches nothing map-single misses\n{table}"
    );
}

/// The same operations under the file model (the `Msync` domain's world): pages written back at
/// any time, torn at 512-byte sectors, flushes covering whole pages.
#[test]
fn operations_survive_the_file_model() {
    let (recording, histories) = record_with(Sim::file_model(), 6, u64::MAX, 40, 1);
    let test = CrashTest { exhaustive_limit: 64, samples: 12, ..CrashTest::default() };
    let report = test.run(&recording, check(1, &histories));
    println!("file model: {} fences, {report}", recording.fences());
    report.assert_passed();
}

/// Two and three crashes in a row: every crash image of a first run is recovered and checked;
/// one in `follow_one_in` goes on with a second run of random operations on the recovered map —
/// the same lanes, the same segment, records freed and reallocated — which is crashed at every
/// fence in turn, and so on. (A small map: each check scans and looks up every key, so its cost
/// grows with the map, and the image count is a product of the runs'.)
#[test]
fn runs_in_a_row_survive_a_crash_in_each() {
    let (recording, histories) = record(7, 20, 25, 1);
    let next_run = |sim: &Sim, map: &StrictMap<Sim>, start: Model, depth: u32| -> Vec<Model> {
        let mut rng = fastrand::Rng::with_seed(700 + u64::from(depth));
        let mut model = start;
        let mut history = vec![model.clone()];
        for step in 0..12 {
            let k = key(&mut rng, 60);
            let op = random_op(&mut rng, &model, k, 1000 * (u64::from(depth) + 1) + step);
            apply(map, &mut model, &op);
            history.push(model.clone());
            sim.mark(step);
        }
        history
    };
    let check = multi_run_check(histories[0].clone(), next_run);
    let two = CrashTest {
        recovery_depth: 1,
        follow_one_in: 16,
        exhaustive_limit: 64,
        samples: 8,
        ..CrashTest::default()
    };
    let report = two.run_with(&recording, &check);
    println!("two runs: {} fences, {report}", recording.fences());
    report.assert_passed();
    assert!(report.recovery_images_checked > 2000, "{report}");
    let three = CrashTest { recovery_depth: 2, follow_one_in: 24, ..two };
    let report = three.run_with(&recording, &check);
    println!("three runs: {report}");
    report.assert_passed();
}
