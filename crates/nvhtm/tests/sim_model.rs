//! The simulator implements the Px86 model of the architecture brief: per-line prefixes,
//! independent lines, flush-then-fence, ordered clflush, 8-byte failure atomicity, sampling
//! beyond the budget, and site switching for mutation testing.

use std::collections::BTreeSet;
use std::sync::Mutex;

use nvhtm::persist::FlushInstr;
use nvhtm::pool::{HEADER_SIZE, MIN_POOL_SIZE};
use nvhtm::sim::{CrashTest, Recording, Sim};
use nvhtm::{Pool, PoolOptions};

const X: u64 = HEADER_SIZE; // a line
const Y: u64 = HEADER_SIZE + 64; // another line

fn opts() -> PoolOptions {
    PoolOptions::layout("model").with_size(MIN_POOL_SIZE).with_max_size(MIN_POOL_SIZE)
}

/// Records `workload` on a fresh durable pool.
fn record(instr: FlushInstr, workload: impl FnOnce(&Pool<Sim>)) -> Recording {
    let sim = Sim::with_instr(instr);
    let pool = Pool::create_in_memory(&opts(), sim.clone()).unwrap();
    sim.restart_recording().unwrap();
    workload(&pool);
    sim.recording()
}

/// Every distinct image at every crash point, as the words at X..X+16 and Y.
fn images(test: &CrashTest, recording: &Recording) -> Vec<(usize, [u64; 3])> {
    let test = CrashTest { deduplicate: false, ..test.clone() };
    let seen = Mutex::new(BTreeSet::new());
    let report = test.run(recording, |_, image, ctx| {
        let word = |at: u64| u64::from_ne_bytes(image[at as usize..at as usize + 8].try_into().unwrap());
        seen.lock().unwrap().insert((ctx.point, [word(X), word(X + 8), word(Y)]));
        Ok(())
    });
    assert!(report.passed());
    seen.into_inner().unwrap().into_iter().collect()
}

fn at_end(images: &[(usize, [u64; 3])]) -> BTreeSet<[u64; 3]> {
    let last = images.iter().map(|(p, _)| *p).max().unwrap();
    images.iter().filter(|(p, _)| *p == last).map(|(_, w)| *w).collect()
}

#[test]
fn each_line_keeps_a_prefix_of_its_stores_independently() {
    let rec = record(FlushInstr::Clwb, |pool| {
        pool.write(X, &1u64).unwrap();
        pool.write(X + 8, &2u64).unwrap();
        pool.write(Y, &3u64).unwrap();
    });
    let end = at_end(&images(&CrashTest::default(), &rec));
    let expected: BTreeSet<[u64; 3]> =
        [[0, 0, 0], [1, 0, 0], [1, 2, 0], [0, 0, 3], [1, 0, 3], [1, 2, 3]].into_iter().collect();
    assert_eq!(end, expected, "3 prefixes of X times 2 of Y; never X's second store without its first");
}

#[test]
fn a_flush_needs_a_fence_and_covers_only_earlier_stores() {
    let flushed_only = record(FlushInstr::Clwb, |pool| {
        pool.write(X, &1u64).unwrap();
        pool.flush(X, 8).unwrap();
    });
    assert!(at_end(&images(&CrashTest::default(), &flushed_only)).contains(&[0, 0, 0]));

    let fenced = record(FlushInstr::Clwb, |pool| {
        pool.write(X, &1u64).unwrap();
        pool.flush(X, 8).unwrap();
        pool.write(X + 8, &2u64).unwrap(); // after the flush: not covered by it
        pool.fence().unwrap();
    });
    let end = at_end(&images(&CrashTest::default(), &fenced));
    assert_eq!(end, [[1, 0, 0], [1, 2, 0]].into_iter().collect());
}

#[test]
fn clflush_persists_at_once_and_clflushopt_waits_for_the_fence() {
    let ordered = record(FlushInstr::Clflush, |pool| {
        pool.write(X, &1u64).unwrap();
        pool.flush(X, 8).unwrap();
        pool.write(Y, &3u64).unwrap();
    });
    assert_eq!(
        at_end(&images(&CrashTest::default(), &ordered)),
        [[1, 0, 0], [1, 0, 3]].into_iter().collect()
    );
    let weak = record(FlushInstr::Clflushopt, |pool| {
        pool.write(X, &1u64).unwrap();
        pool.flush(X, 8).unwrap();
        pool.write(Y, &3u64).unwrap();
    });
    assert_eq!(at_end(&images(&CrashTest::default(), &weak)).len(), 4);
}

#[test]
fn non_temporal_stores_persist_at_the_next_fence() {
    let rec = record(FlushInstr::Clwb, |pool| {
        pool.write_persistent(X, &[9u8; 300]).unwrap();
        pool.fence().unwrap();
    });
    let end = at_end(&images(&CrashTest::default(), &rec));
    let nine = u64::from_ne_bytes([9; 8]);
    assert_eq!(end, [[nine, nine, nine]].into_iter().collect());
}

#[test]
fn only_aligned_eight_byte_words_are_failure_atomic() {
    let rec = record(FlushInstr::Clwb, |pool| {
        pool.write(X, &[5u64, 6u64]).unwrap(); // one 16-byte store
        pool.store_u64(Y, u64::MAX, std::sync::atomic::Ordering::Release).unwrap();
    });
    let end = at_end(&images(&CrashTest::default(), &rec));
    assert!(end.contains(&[5, 0, 0]), "the 16-byte store tears between its words");
    assert!(end.iter().all(|w| w[2] == 0 || w[2] == u64::MAX), "an 8-byte store never tears");
}

#[test]
fn beyond_the_budget_images_are_sampled_reproducibly() {
    let rec = record(FlushInstr::Clwb, |pool| {
        for line in 0..20 {
            pool.write(X + line * 64, &1u64).unwrap();
        }
    });
    let sampled = |seed| {
        let test = CrashTest { exhaustive_limit: 1000, samples: 50, seed, ..CrashTest::default() };
        let seen = Mutex::new(Vec::new());
        let report = test.run(&rec, |_, image, _| {
            seen.lock().unwrap().push(image.to_vec());
            Ok(())
        });
        assert_eq!(report.sampled_points, 1, "2^20 images exceed the budget of 1000");
        // 2 extremes + 20 lines alone kept + 20 alone lost + 50 drawn (some drawn twice).
        assert!(report.images_checked <= 92 && report.images_checked > 80, "{report}");
        seen.into_inner().unwrap()
    };
    assert_eq!(sampled(1), sampled(1));
    assert_ne!(sampled(1), sampled(2));
    // The extremes are always among the samples: nothing pending kept, and everything kept; and
    // so is each line alone persisted, and each line alone lost.
    let images = sampled(3);
    let ones = |img: &Vec<u8>| (0..20).filter(|l| img[(X + l * 64) as usize] == 1).count();
    assert!(images.iter().any(|i| ones(i) == 0) && images.iter().any(|i| ones(i) == 20));
    for line in 0..20 {
        let at = (X + line * 64) as usize;
        assert!(images.iter().any(|i| ones(i) == 1 && i[at] == 1), "line {line} alone kept");
        assert!(images.iter().any(|i| ones(i) == 19 && i[at] == 0), "line {line} alone lost");
    }
}

#[test]
fn a_switched_off_site_loses_its_effect() {
    let rec = record(FlushInstr::Clwb, |pool| {
        pool.write(X, &1u64).unwrap();
        pool.persist(X, 8).unwrap();
    });
    let on = CrashTest::default().run(&rec, |_, _, _| Ok(()));
    let site = *on.sites.iter().next().unwrap();
    assert!(site.file.ends_with("sim_model.rs"));
    assert_eq!(at_end(&images(&CrashTest::default(), &rec)), [[1, 0, 0]].into_iter().collect());
    let off = CrashTest { disabled_site: Some(site), ..CrashTest::default() };
    assert_eq!(at_end(&images(&off, &rec)), [[0, 0, 0], [1, 0, 0]].into_iter().collect());
}

#[test]
fn recording_restarts_only_from_a_durable_state() {
    let sim = Sim::new();
    let pool = Pool::create_in_memory(&opts(), sim.clone()).unwrap();
    pool.write(X, &1u64).unwrap();
    let err = sim.restart_recording().unwrap_err();
    assert!(err.contains("0x1000"), "{err}");
    pool.persist(X, 8).unwrap();
    sim.restart_recording().unwrap();
    assert_eq!(sim.recording().stores(), 0);
}

#[test]
fn a_fence_orders_only_its_own_threads_flushes() {
    let sim = Sim::new();
    let pool = Pool::create_in_memory(&opts(), sim.clone()).unwrap();
    sim.restart_recording().unwrap();
    std::thread::scope(|s| {
        s.spawn(|| {
            pool.write(X, &1u64).unwrap();
            pool.flush(X, 8).unwrap();
        });
    });
    pool.write(Y, &3u64).unwrap();
    pool.persist(Y, 8).unwrap(); // this thread's fence: X was flushed by another thread
    let end = at_end(&images(&CrashTest::default(), &sim.recording()));
    assert_eq!(end, [[0, 0, 3], [1, 0, 3]].into_iter().collect(), "X may still be lost, Y may not");
}

#[test]
fn the_file_model_flushes_pages_and_tears_sectors() {
    let sim = Sim::file_model();
    let pool = Pool::create_in_memory(&opts(), sim.clone()).unwrap();
    sim.restart_recording().unwrap();
    pool.write(X, &1u64).unwrap();
    pool.write(X + 1024, &2u64).unwrap(); // same page, another sector
    pool.flush(X, 8).unwrap(); // flushes the whole page
    pool.fence().unwrap();
    pool.write_bytes(X + 2048 - 8, &[7u8; 16]).unwrap(); // crosses a sector boundary, unsynced
    let images = Mutex::new(Vec::new());
    let test = CrashTest { deduplicate: false, ..CrashTest::default() };
    test.run(&sim.recording(), |_, image, ctx| {
        if ctx.fence.is_none() {
            images.lock().unwrap().push(image.to_vec());
        }
        Ok(())
    });
    let images = images.into_inner().unwrap();
    let at = |img: &Vec<u8>, off: u64| img[off as usize];
    assert!(
        images.iter().all(|i| at(i, X) == 1 && at(i, X + 1024) == 2),
        "the page flush covered both sectors"
    );
    assert!(
        images.iter().any(|i| at(i, X + 2040) == 7 && at(i, X + 2048) == 0),
        "a write tears at the sector boundary"
    );
}

/// Every distinct image at every crash point, as the words at `at`.
fn words_at<const N: usize>(recording: &Recording, at: [u64; N]) -> BTreeSet<[u64; N]> {
    let test = CrashTest { deduplicate: false, ..CrashTest::default() };
    let seen = Mutex::new(BTreeSet::new());
    let report = test.run(recording, |_, image, _| {
        let word = |a: u64| u64::from_ne_bytes(image[a as usize..a as usize + 8].try_into().unwrap());
        seen.lock().unwrap().insert(at.map(word));
        Ok(())
    });
    assert!(report.passed());
    seen.into_inner().unwrap()
}

#[test]
fn a_crash_between_two_clflushes_is_explored() {
    // The commit word's line is clflushed before the payload's: between the two, the commit is
    // persistent and the payload is not. A model that crashes only at fences never sees it.
    let rec = record(FlushInstr::Clflush, |pool| {
        pool.write(X, &1u64).unwrap();
        pool.write(Y, &3u64).unwrap();
        pool.flush(Y, 8).unwrap();
        pool.flush(X, 8).unwrap();
        pool.fence().unwrap();
    });
    let all = words_at(&rec, [X, Y]);
    assert!(all.contains(&[0, 3]), "commit persisted by clflush before its data: {all:?}");
    let report = CrashTest::default().run(&rec, |_, _, _| Ok(()));
    assert_eq!(report.crash_points, 4, "before each clflush that persists, before the fence, the end");
}

#[test]
fn clwb_recordings_crash_only_at_fences_and_the_end() {
    let rec = record(FlushInstr::Clwb, |pool| {
        for i in 0..5 {
            pool.write(X + i * 8, &i).unwrap();
            pool.flush(X, 64).unwrap();
            pool.write(Y, &i).unwrap();
        }
        pool.persist(Y, 8).unwrap();
        pool.write(Y + 64, &[1u64, 2, 3]).unwrap();
    });
    let report = CrashTest::default().run(&rec, |_, _, _| Ok(()));
    assert_eq!(report.crash_points, rec.fences() as u64 + 1);
}

#[test]
fn the_words_of_one_write_persist_in_any_order() {
    let rec = record(FlushInstr::Clwb, |pool| {
        pool.write(X, &[5u64, 6u64]).unwrap(); // one copy: memcpy promises no order
        pool.write(X + 16, &7u64).unwrap(); // a later store to the same line
    });
    let all = words_at(&rec, [X, X + 8, X + 16]);
    let expected: BTreeSet<[u64; 3]> =
        [[0, 0, 0], [5, 0, 0], [0, 6, 0], [5, 6, 0], [5, 6, 7]].into_iter().collect();
    assert_eq!(all, expected, "any subset of the copy, and the later store only after all of it");
}

#[test]
fn a_flush_of_a_multi_word_write_persists_all_of_it_at_the_fence() {
    let rec = record(FlushInstr::Clwb, |pool| {
        pool.write(X, &[5u64, 6u64]).unwrap();
        pool.persist(X, 16).unwrap();
        pool.write(X, &[8u64, 9u64]).unwrap();
    });
    let end = at_end(&images(&CrashTest::default(), &rec));
    assert_eq!(end, [[5, 6, 0], [8, 6, 0], [5, 9, 0], [8, 9, 0]].into_iter().collect());
}

#[test]
fn non_temporal_stores_are_unordered_until_the_fence_under_every_instruction() {
    let nine = u64::from_ne_bytes([9; 8]);
    let far = X + 1024;
    for instr in [FlushInstr::Clwb, FlushInstr::Clflushopt, FlushInstr::Clflush] {
        let rec = record(instr, |pool| {
            pool.write_persistent(X, &[9u8; 320]).unwrap(); // streamed: 256 bytes or more
            pool.store_u64(far, 1, std::sync::atomic::Ordering::Release).unwrap();
            pool.persist(far, 8).unwrap(); // this fence makes the copy persistent too
            pool.write_persistent(X, &[0u8; 320]).unwrap();
        });
        let all = words_at(&rec, [X, X + 8, far]);
        assert!(all.contains(&[0, nine, 0]), "{instr:?}: the second word without the first: {all:?}");
        assert!(all.contains(&[0, 0, 0]), "{instr:?}: not persistent before the fence");
        // After the fence the first copy is persistent; the second (zeros) overwrites it in
        // any order.
        let after: BTreeSet<[u64; 3]> = all.iter().filter(|w| w[2] == 1).copied().collect();
        let expected = [[nine, nine, 1], [0, nine, 1], [nine, 0, 1], [0, 0, 1]].into_iter().collect();
        assert_eq!(after, expected, "{instr:?}");
    }
}

#[test]
fn a_short_persistent_write_is_a_write_and_a_flush() {
    // Under 256 bytes the Cpu domain writes through the cache and flushes: under clflush that
    // is persistent at once.
    let rec = record(FlushInstr::Clflush, |pool| {
        pool.write_persistent(X, &[9u8; 16]).unwrap();
    });
    let nine = u64::from_ne_bytes([9; 8]);
    assert_eq!(at_end(&images(&CrashTest::default(), &rec)), [[nine, nine, 0]].into_iter().collect());
}

#[test]
fn a_zero_length_flush_flushes_nothing() {
    let rec = record(FlushInstr::Clwb, |pool| {
        pool.write(X + 8, &1u64).unwrap();
        pool.flush(X + 8, 0).unwrap(); // as on the CPU: no line
        pool.fence().unwrap();
    });
    assert_eq!(at_end(&images(&CrashTest::default(), &rec)), [[0, 0, 0], [0, 1, 0]].into_iter().collect());
}

#[test]
fn a_locked_instruction_orders_earlier_flushes_like_a_fence() {
    use std::sync::atomic::Ordering;
    let cas = record(FlushInstr::Clwb, |pool| {
        pool.write(X, &1u64).unwrap();
        pool.flush(X, 8).unwrap();
        assert_eq!(pool.compare_exchange_u64(Y, 0, 3, Ordering::AcqRel).unwrap(), Ok(0));
    });
    let end = at_end(&images(&CrashTest::default(), &cas));
    assert_eq!(end, [[1, 0, 0], [1, 0, 3]].into_iter().collect(), "the CAS made X persistent");
    let seq_cst = record(FlushInstr::Clflushopt, |pool| {
        pool.write(X, &1u64).unwrap();
        pool.flush(X, 8).unwrap();
        pool.store_u64(Y, 3, Ordering::SeqCst).unwrap(); // xchg: locked
    });
    assert_eq!(at_end(&images(&CrashTest::default(), &seq_cst)), end);
    let release = record(FlushInstr::Clwb, |pool| {
        pool.write(X, &1u64).unwrap();
        pool.flush(X, 8).unwrap();
        pool.store_u64(Y, 3, Ordering::Release).unwrap(); // a plain mov orders nothing
    });
    assert!(at_end(&images(&CrashTest::default(), &release)).contains(&[0, 0, 3]));
    // A crash just before the CAS still sees the flushed line lost.
    assert!(images(&CrashTest::default(), &cas).iter().any(|(_, w)| *w == [0, 0, 0]));
}
