//! Crash consistency of the durable queue, proven with the simulator: enqueues (single,
//! batched, larger than a segment, refused by the bound) and dequeues by three consumers (some
//! on an empty queue) on a queue with 512-byte log segments, so checkpoints and truncations
//! happen every few operations, then a clean close; crashed at every fence (every combination
//! of the dirty lines written back early, within budget, sampled beyond); each image recovered
//! and compared with the oracle of `nvhtm::mutation::queue`: exactly the state after the
//! completed operations, with the one in flight applied or not — the items with their ids,
//! front to back, and every consumer's last dequeue — and no block leaked.

use std::time::Instant;

use nvhtm::mutation;
use nvhtm::mutation::queue::{check, multi_run_check, record};
use nvhtm::sim::{CrashTest, Sim};

#[test]
fn enqueues_and_dequeues_survive_a_crash_anywhere() {
    let start = Instant::now();
    let mut images = 0;
    for seed in 1..=8 {
        let (recording, run) = record(Sim::new(), seed, 40);
        let test = CrashTest { exhaustive_limit: 4096, samples: 128, ..CrashTest::default() };
        let report = test.run(&recording, check(&run));
        println!("seed {seed}: {} fences, {} compactions, {report}", recording.fences(), run.compactions);
        report.assert_passed();
        assert!(run.compactions > 0);
        assert!(report.images_checked > 2000, "{report}");
        images += report.images_checked;
    }
    println!("{images} images in {:.1} s", start.elapsed().as_secs_f64());
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
fn the_queue_survives_the_file_model() {
    let (recording, run) = record(Sim::file_model(), 7, 40);
    let test = CrashTest { exhaustive_limit: 1024, samples: 64, ..CrashTest::default() };
    let report = test.run(&recording, check(&run));
    println!("file model: {} fences, {report}", recording.fences());
    report.assert_passed();
}

/// Two and three runs in a row: crash, recover (the next record starts a new segment),
/// enqueue and dequeue on, close, crash again. Records a crashed run left past its tail — an
/// ENQ or a DEQ never acknowledged — must never come back in a later run.
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
    assert!(report.recovery_images_checked > 300, "{report}");
    let three = CrashTest { recovery_depth: 2, follow_one_in: 20, exhaustive_limit: 16, samples: 4, ..two };
    let report = three.run_with(&recording, &check);
    println!("three runs: {report}");
    report.assert_passed();
}

/// The queue adds no flush or fence of its own (every durable step is a log commit or a
/// truncation): every flush and fence site of the queue and of the log its suites reach is
/// needed by some image of the queue's own suites — the queue's oracle notices the loss of
/// any of them.
#[test]
fn every_queue_and_log_flush_and_fence_is_needed() {
    let table = mutation::assert_sites_caught(&["queue-single", "queue-two-runs"], &["queue", "log"], 3);
    println!("{table}");
}
