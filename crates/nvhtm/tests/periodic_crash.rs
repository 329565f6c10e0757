//! Crash consistency of the periodic (Dalí) map, proven with the simulator: random operations
//! and multi-key transactions with epoch advances and syncs, crashed at every fence (with
//! every combination of the dirty lines written back early, within budget, sampled beyond);
//! each image recovered and compared with the buffered-durable-linearizability oracle of
//! `nvhtm::mutation::periodic`: the model after some prefix of the history that includes
//! every operation before the last completed advance, no block leaked or named twice.

use nvhtm::mutation;
use nvhtm::mutation::periodic::{check, keys_before_first_split, multi_run_check, record};
use nvhtm::sim::{CrashTest, Sim};

#[test]
fn operations_and_transactions_across_a_split_survive_a_crash_anywhere() {
    for seed in 1..=8 {
        let (recording, history) = record(Sim::new(), seed, keys_before_first_split() - 10, 80);
        let test = CrashTest { exhaustive_limit: 256, samples: 48, ..CrashTest::default() };
        let report = test.run(&recording, check(&history));
        println!("seed {seed}: {} fences, {report}", recording.fences());
        report.assert_passed();
        assert!(report.images_checked > 200, "{report}");
    }
}

#[test]
fn recovery_survives_a_crash_during_recovery() {
    let (recording, history) = record(Sim::new(), 4, 20, 30);
    let test = CrashTest { recovery_depth: 1, exhaustive_limit: 64, samples: 12, ..CrashTest::default() };
    let report = test.run(&recording, check(&history));
    println!("depth 1: {report}");
    report.assert_passed();
    assert!(report.recovery_images_checked > 0, "{report}");
}

/// The file model: pages written back at any time, torn at 512-byte sectors.
#[test]
fn operations_survive_the_file_model() {
    let (recording, history) = record(Sim::file_model(), 7, keys_before_first_split() - 10, 80);
    let test = CrashTest { exhaustive_limit: 256, samples: 48, ..CrashTest::default() };
    let report = test.run(&recording, check(&history));
    println!("file model: {} fences, {report}", recording.fences());
    report.assert_passed();
}

/// Two and three runs in a row: crash, recover (the epochs after the durable one recorded
/// failed), work on with the same buckets — their failed heads repaired by the next writes —
/// crash again. Writes a failed epoch left on media must never be taken for a later run's.
#[test]
fn runs_in_a_row_survive_a_crash_in_each() {
    let (recording, history) = record(Sim::new(), 8, 25, 25);
    let check = multi_run_check(history, 15);
    let two = CrashTest {
        recovery_depth: 1,
        follow_one_in: 6,
        exhaustive_limit: 32,
        samples: 8,
        ..CrashTest::default()
    };
    let report = two.run_with(&recording, &check);
    println!("two runs: {} fences, {report}", recording.fences());
    report.assert_passed();
    assert!(report.recovery_images_checked > 500, "{report}");
    let three = CrashTest { recovery_depth: 2, follow_one_in: 40, exhaustive_limit: 16, samples: 4, ..two };
    let report = three.run_with(&recording, &check);
    println!("three runs: {report}");
    report.assert_passed();
}

/// Every flush and fence of the periodic map is needed by some image of its suites.
#[test]
fn every_periodic_flush_and_fence_is_needed() {
    let table = mutation::assert_sites_caught(&["periodic-single", "periodic-two-runs"], &["periodic"], 3);
    println!("{table}");
}
