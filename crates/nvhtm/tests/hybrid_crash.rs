//! Crash consistency of the hybrid map (a DRAM index over a persistent log), proven with the
//! simulator: random upserts, inserts, removals and compare-and-swaps on a map whose log has
//! 512-byte segments (segment switches and log cleaning often), crashed at every fence; each
//! image recovered — the log replayed into a new index — and compared with the durable
//! linearizability oracle of `nvhtm::mutation::hybrid`.

use nvhtm::mutation;
use nvhtm::mutation::hybrid::{check, multi_run_check, record};
use nvhtm::sim::{CrashTest, Sim};

#[test]
fn operations_survive_a_crash_anywhere() {
    for seed in 1..=6 {
        let (recording, history) = record(Sim::new(), seed, 8, 60);
        let test = CrashTest { exhaustive_limit: 256, samples: 48, ..CrashTest::default() };
        let report = test.run(&recording, check(&history));
        println!("seed {seed}: {} fences, {report}", recording.fences());
        report.assert_passed();
        assert!(report.images_checked > 200, "{report}");
    }
}

#[test]
fn recovery_survives_a_crash_during_recovery() {
    let (recording, history) = record(Sim::new(), 9, 8, 40);
    let test = CrashTest { recovery_depth: 1, exhaustive_limit: 64, samples: 12, ..CrashTest::default() };
    let report = test.run_with(&recording, multi_run_check(history, 0));
    println!("depth 1: {report}");
    report.assert_passed();
    assert!(report.recovery_images_checked > 0, "{report}");
}

/// The file model: pages written back at any time, torn at 512-byte sectors.
#[test]
fn operations_survive_the_file_model() {
    let (recording, history) = record(Sim::file_model(), 7, 8, 60);
    let test = CrashTest { exhaustive_limit: 256, samples: 48, ..CrashTest::default() };
    let report = test.run(&recording, check(&history));
    println!("file model: {} fences, {report}", recording.fences());
    report.assert_passed();
}

/// Two and three runs in a row: crash, recover, work on (cleaning included), crash again.
#[test]
fn runs_in_a_row_survive_a_crash_in_each() {
    let (recording, history) = record(Sim::new(), 8, 8, 40);
    let check = multi_run_check(history, 20);
    let two = CrashTest {
        recovery_depth: 1,
        follow_one_in: 3,
        exhaustive_limit: 32,
        samples: 8,
        ..CrashTest::default()
    };
    let report = two.run_with(&recording, &check);
    println!("two runs: {} fences, {report}", recording.fences());
    report.assert_passed();
    assert!(report.recovery_images_checked > 500, "{report}");
    let three = CrashTest { recovery_depth: 2, follow_one_in: 20, exhaustive_limit: 16, samples: 4, ..two };
    let report = three.run_with(&recording, &check);
    println!("three runs: {report}");
    report.assert_passed();
}

/// The hybrid map has no flush or fence of its own (its durability is the log's): its suites
/// must catch every site of the log they reach.
#[test]
fn every_log_flush_and_fence_the_map_reaches_is_needed() {
    let table = mutation::assert_sites_caught(&["hybrid-single", "hybrid-two-runs"], &["hybrid", "log"], 2);
    assert!(
        !table.sites.iter().any(|row| row.structure == "hybrid"),
        "the map has no site of its own\n{table}"
    );
    println!("{table}");
}

/// The workloads reach what the proofs claim to cover: segment switches and cleaning.
#[test]
fn the_workloads_switch_and_clean_segments() {
    use nvhtm::hybrid::HybridMap;
    use nvhtm::log::LogOptions;
    use nvhtm::mutation::hybrid::{opts, run_ops, SEGMENT_SIZE};
    let heap = nvhtm::Heap::create_in_memory(&opts(), nvhtm::Volatile).unwrap();
    let map = HybridMap::open_with(heap, LogOptions { segment_size: SEGMENT_SIZE }).unwrap();
    let mut rng = fastrand::Rng::with_seed(1);
    run_ops(None, &map, Default::default(), &mut rng, 60, 12);
    let stats = map.stats().unwrap();
    assert!(stats.cleaned_segments > 0 && stats.segments > 1, "{stats:?}");
}
