use super::*;
use crate::{PoolOptions, Volatile};

fn heap(size: u64) -> Heap<Volatile> {
    Heap::create_in_memory(&PoolOptions::layout("log-test").with_size(size).with_max_size(64 << 20), Volatile)
        .unwrap()
}

fn small_log() -> Log<Volatile> {
    Log::open_with(heap(4 << 20), LogOptions { segment_size: 512 }).unwrap()
}

fn all<D: Domain>(log: &Log<D>) -> Vec<Vec<u8>> {
    log.iter(log.head()).map(|r| r.unwrap().data).collect()
}

/// Reopens a log from a copy of its pool, as after a crash (nothing closed).
fn crash_copy(log: &Log<Volatile>) -> Log<Volatile> {
    let image = log.heap().pool().image().unwrap();
    let heap = Heap::open_image(&image, &PoolOptions::layout("log-test"), Volatile).unwrap();
    Log::open(heap).unwrap()
}

#[test]
fn records_come_back_in_order_across_segments() {
    let log = small_log();
    let payloads: Vec<Vec<u8>> = (0..200u32).map(|i| vec![i as u8; (i % 70) as usize]).collect();
    let lsns: Vec<u64> = payloads.iter().map(|p| log.append(p).unwrap()).collect();
    assert!(lsns.windows(2).all(|w| w[0] < w[1]));
    assert!(log.stats().segments > 10, "{:?}", log.stats());
    assert_eq!(all(&log), payloads);
    let from_middle: Vec<Vec<u8>> = log.iter(lsns[150]).map(|r| r.unwrap().data).collect();
    assert_eq!(from_middle, payloads[150..]);
    assert_eq!(log.read(log.tail()).unwrap(), None);
}

#[test]
fn a_record_larger_than_a_segment_gets_its_own() {
    let log = small_log();
    let big = vec![7u8; 5000];
    log.append(b"small").unwrap();
    let at = log.append(&big).unwrap();
    log.append(b"after").unwrap();
    assert_eq!(log.read(at).unwrap().unwrap().0, big);
    assert_eq!(all(&crash_copy(&log)), [b"small".to_vec(), big, b"after".to_vec()]);
    let too_big = vec![0u8; MAX_RECORD + 1];
    assert!(matches!(log.append(&too_big), Err(LogError::TooLarge { .. })));
}

#[test]
fn bad_lsns_are_refused_with_the_range() {
    let log = small_log();
    let a = log.append(b"first record").unwrap();
    let b = log.append(b"second").unwrap();
    assert!(matches!(log.read(a + 8), Err(LogError::NotARecord { .. })), "inside a record");
    assert!(matches!(log.read(a + 3), Err(LogError::NotARecord { .. })), "misaligned");
    assert!(matches!(log.read(log.tail() + 8), Err(LogError::NotARecord { .. })), "past the tail");
    assert!(matches!(log.truncate(a + 8), Err(LogError::NotARecord { .. })));
    log.truncate(b).unwrap();
    assert!(matches!(log.read(a), Err(LogError::Truncated { lsn, head }) if lsn == a && head == b));
    assert_eq!(all(&log), [b"second".to_vec()]);
}

#[test]
fn truncation_frees_segments_and_their_space_is_reused() {
    let log = small_log();
    let record = [3u8; 100];
    let mut lsns = Vec::new();
    for _ in 0..100 {
        lsns.push(log.append(&record).unwrap());
    }
    let before = log.heap().stats().unwrap();
    log.truncate(lsns[90]).unwrap();
    let after = log.heap().stats().unwrap();
    assert!(after.small_blocks < before.small_blocks, "{before:?} -> {after:?}");
    assert_eq!(all(&log).len(), 10);
    // Appending as much again takes no more chunks: the freed segments are reused.
    for _ in 0..90 {
        log.append(&record).unwrap();
    }
    assert_eq!(log.heap().stats().unwrap().chunks, before.chunks);
    let reopened = crash_copy(&log);
    assert_eq!(reopened.head(), lsns[90]);
    assert_eq!(all(&reopened).len(), 100);
    // Truncating everything leaves an empty log that still appends.
    log.truncate(log.tail()).unwrap();
    assert!(all(&log).is_empty());
    log.append(b"x").unwrap();
    assert_eq!(all(&log), [b"x".to_vec()]);
}

#[test]
fn a_run_after_a_crash_appends_to_a_new_segment_and_a_clean_one_does_not() {
    let log = small_log();
    log.append(b"one").unwrap();
    let crashed = crash_copy(&log);
    assert_eq!(crashed.stats().segments, 1);
    crashed.append(b"two").unwrap();
    assert_eq!(crashed.stats().segments, 2, "a crashed run's tail segment is not appended to");
    assert_eq!(all(&crashed), [b"one".to_vec(), b"two".to_vec()]);

    let image = {
        let log = small_log();
        log.append(b"one").unwrap();
        let heap_image = {
            log.core.close(&log.heap).unwrap();
            log.heap().pool().image().unwrap()
        };
        heap_image
    };
    let heap = Heap::open_image(&image, &PoolOptions::layout("log-test"), Volatile).unwrap();
    let clean = Log::open(heap).unwrap();
    clean.append(b"two").unwrap();
    assert_eq!(clean.stats().segments, 1, "a cleanly closed log goes on in its segment");
    // The first append cleared the mark: a crash now is a crash.
    let again = crash_copy(&clean);
    again.append(b"three").unwrap();
    assert_eq!(again.stats().segments, 2);
    assert_eq!(all(&again), [b"one".to_vec(), b"two".to_vec(), b"three".to_vec()]);
}

#[test]
fn a_torn_tail_ends_the_log_and_a_stale_record_past_it_never_returns() {
    let log = small_log();
    log.append(b"kept").unwrap();
    let lost = log.append(b"torn by the crash").unwrap();
    log.append(b"complete but after the torn one").unwrap();
    // Tear the middle record: flip a payload byte.
    let seg = log.core.chain.read().unwrap().segs[0];
    let at = seg.at(lost) + 16;
    let mut byte = [0u8];
    log.heap.raw_pool().read_into(at, &mut byte).unwrap();
    log.heap.raw_pool().write_bytes(at, &[byte[0] ^ 1]).unwrap();
    let run2 = crash_copy(&log);
    assert_eq!(all(&run2), [b"kept".to_vec()]);
    // The second run writes a record exactly as long as the torn one, so the stale complete
    // record past it sits at the LSN a next record would take; a crash must not revive it.
    run2.append(b"same length as...").unwrap();
    let run3 = crash_copy(&run2);
    assert_eq!(all(&run3), [b"kept".to_vec(), b"same length as...".to_vec()]);
}

#[test]
fn each_map_refuses_a_log_pool_and_the_log_refuses_a_map_pool() {
    let log = small_log();
    log.append(b"r").unwrap();
    let image = log.heap().pool().image().unwrap();
    let heap = Heap::open_image(&image, &PoolOptions::layout("log-test"), Volatile).unwrap();
    assert!(crate::StrictMap::open(heap).is_err());
    let heap = Heap::open_image(&image, &PoolOptions::layout("log-test"), Volatile).unwrap();
    assert!(crate::any_map::MapKind::of(&heap).is_err());
    let map = crate::StrictMap::open(self::heap(4 << 20)).unwrap();
    let image = map.heap().pool().image().unwrap();
    let heap = Heap::open_image(&image, &PoolOptions::layout("log-test"), Volatile).unwrap();
    assert!(matches!(Log::open(heap), Err(LogError::NotALog(_))));
}

#[test]
fn concurrent_appenders_share_commits_and_lose_nothing() {
    let log = Log::open_with(heap(16 << 20), LogOptions { segment_size: 64 << 10 }).unwrap();
    let per_thread = 2000u32;
    std::thread::scope(|s| {
        for t in 0..2u32 {
            let log = &log;
            s.spawn(move || {
                for i in 0..per_thread {
                    log.append(&[t.to_le_bytes(), i.to_le_bytes()].concat()).unwrap();
                }
            });
        }
    });
    let stats = log.stats();
    assert_eq!(stats.appends, 2 * u64::from(per_thread));
    assert!(stats.commits <= stats.appends);
    // Each thread's records appear in its order, all of them.
    let mut next = [0u32; 2];
    for record in all(&crash_copy(&log)) {
        let t = u32::from_le_bytes(record[..4].try_into().unwrap()) as usize;
        let i = u32::from_le_bytes(record[4..].try_into().unwrap());
        assert_eq!(i, next[t]);
        next[t] += 1;
    }
    assert_eq!(next, [per_thread; 2]);
}
