//! Crash consistency of the persistent log, proven with the simulator: appends (single,
//! batched, larger than a segment) and truncations on a log with 512-byte segments, then a
//! clean close, crashed at every fence (every combination of the dirty lines written back
//! early, within budget, sampled beyond); each image recovered and compared with the oracle of
//! `nvhtm::mutation::log`: exactly the completed operations' records, plus a prefix of the
//! batch in flight or the whole truncation in flight, and no segment leaked.

use nvhtm::mutation;
use nvhtm::mutation::log::{check, multi_run_check, record};
use nvhtm::sim::{CrashTest, Sim};

#[test]
fn appends_and_truncations_survive_a_crash_anywhere() {
    for seed in 1..=6 {
        let (recording, run) = record(Sim::new(), seed, 40);
        let test = CrashTest { exhaustive_limit: 256, samples: 48, ..CrashTest::default() };
        let report = test.run(&recording, check(&run));
        println!("seed {seed}: {} fences, {report}", recording.fences());
        report.assert_passed();
        assert!(report.images_checked > 200, "{report}");
    }
}

#[test]
fn recovery_survives_a_crash_during_recovery() {
    let (recording, run) = record(Sim::new(), 9, 30);
    let test = CrashTest { recovery_depth: 1, exhaustive_limit: 64, samples: 12, ..CrashTest::default() };
    let report = test.run_with(&recording, multi_run_check(run, 0));
    println!("depth 1: {report}");
    report.assert_passed();
    assert!(report.recovery_images_checked > 0, "{report}");
}

/// The file model: pages written back at any time, torn at 512-byte sectors.
#[test]
fn appends_survive_the_file_model() {
    let (recording, run) = record(Sim::file_model(), 7, 40);
    let test = CrashTest { exhaustive_limit: 256, samples: 48, ..CrashTest::default() };
    let report = test.run(&recording, check(&run));
    println!("file model: {} fences, {report}", recording.fences());
    report.assert_passed();
}

/// Two and three runs in a row: crash, recover (the next append starts a new segment), append
/// and truncate on, close, crash again. Records a crashed run left past its tail — torn or
/// whole but never acknowledged — must never come back in a later run.
#[test]
fn runs_in_a_row_survive_a_crash_in_each() {
    let (recording, run) = record(Sim::new(), 8, 24);
    let check = multi_run_check(run, 14);
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

/// Every flush and fence of the log is needed by some image of its suites.
#[test]
fn every_log_flush_and_fence_is_needed() {
    let table = mutation::assert_sites_caught(&["log-single", "log-two-runs"], &["log"], 3);
    println!("{table}");
}
