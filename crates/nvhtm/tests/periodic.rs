//! The periodic map on real pool files with its threads running: concurrent writers, readers,
//! transactions and splits beside the persister and the arena's background scan; reopening after
//! a clean close and after a crash (the file copied while the map is open, as `kill -9` leaves
//! it on tmpfs).

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use nvhtm::periodic::{PeriodicMap, PeriodicOptions};
use nvhtm::{Cpu, Heap, PoolOptions};

fn shm() -> tempfile::TempDir {
    tempfile::Builder::new().prefix("nvhtm-periodic-").tempdir_in("/dev/shm").unwrap()
}

fn opts() -> PoolOptions {
    PoolOptions::layout("periodic").with_size(32 << 20)
}

fn threaded() -> PeriodicOptions {
    PeriodicOptions::default().every(Duration::from_millis(1))
}

fn key(i: u64) -> Vec<u8> {
    format!("key-{i}").into_bytes()
}

/// Compare-and-swap under contention is linearizable, epochs ending every millisecond
/// (`common::compare_and_swap_is_linearizable`).
#[test]
fn compare_and_swap_is_linearizable_under_contention() {
    let dir = shm();
    let map =
        PeriodicMap::open(Heap::<Cpu>::create(dir.path().join("p"), &opts()).unwrap(), threaded()).unwrap();
    let map = nvhtm::AnyMap::Periodic(map);
    common::compare_and_swap_is_linearizable(&map);
    map.close().unwrap();
}

/// Two writers on disjoint keys across many splits, a reader and transfers between accounts,
/// with the persister running; then the map is closed, reopened while writers go on (the scan
/// runs in the background beside them), closed and checked.
#[test]
fn writers_readers_and_the_background_scan_leave_a_consistent_map() {
    let dir = shm();
    let path = dir.path().join("p");
    let map = PeriodicMap::open(Heap::<Cpu>::create(&path, &opts()).unwrap(), threaded()).unwrap();
    let write = |map: &PeriodicMap<Cpu>, t: u64, from: u64, to: u64| {
        for i in from..to {
            let k = key(i * 2 + t);
            map.upsert(&k, &i.to_le_bytes()).unwrap();
            if i % 3 == 0 {
                map.remove(&key((i / 2) * 2 + t)).unwrap();
            }
        }
    };
    let model = |to: u64| -> BTreeMap<Vec<u8>, Vec<u8>> {
        let mut m = BTreeMap::new();
        for t in 0..2 {
            for i in 0..to {
                m.insert(key(i * 2 + t), i.to_le_bytes().to_vec());
                if i % 3 == 0 {
                    m.remove(&key((i / 2) * 2 + t));
                }
            }
        }
        m
    };
    std::thread::scope(|s| {
        for t in 0..2 {
            let map = &map;
            s.spawn(move || write(map, t, 0, 6000));
        }
        s.spawn(|| {
            for i in 0..5000 {
                // A key is either absent or holds its own index.
                if let Some(v) = map.get(&key(i)).unwrap() {
                    assert_eq!(v, (i / 2).to_le_bytes());
                }
            }
        });
    });
    map.close().unwrap();
    let map = PeriodicMap::open(Heap::<Cpu>::open(&path, &opts()).unwrap(), threaded()).unwrap();
    assert_eq!(map.recovery().failed, None, "a clean close records no failed epoch");
    std::thread::scope(|s| {
        for t in 0..2 {
            let map = &map;
            s.spawn(move || write(map, t, 6000, 9000));
        }
    });
    map.close().unwrap();
    let mut map =
        PeriodicMap::open(Heap::<Cpu>::open(&path, &opts()).unwrap(), PeriodicOptions::manual()).unwrap();
    map.wait_for_scan().unwrap();
    let found: BTreeMap<_, _> = map.entries().unwrap().into_iter().collect();
    assert_eq!(found, model(9000));
    let check = map.check().unwrap();
    assert!(check.problems.is_empty(), "{check:?}");
    assert!(map.stats().unwrap().segments > 50);
}

/// A crash: the pool file as it is while the map runs. Everything before the last `sync` is
/// there, and the map is a prefix of the history; the epochs after the durable one are recorded
/// as failed, and the map works on after recovery.
#[test]
fn a_crash_keeps_a_prefix_through_the_last_sync_and_the_map_works_on() {
    let dir = shm();
    let path = dir.path().join("p");
    let map = PeriodicMap::open(Heap::<Cpu>::create(&path, &opts()).unwrap(), threaded()).unwrap();
    for i in 0..3000u64 {
        map.upsert(&key(i), &i.to_le_bytes()).unwrap();
    }
    map.sync().unwrap();
    for i in 3000..4000u64 {
        map.upsert(&key(i), &i.to_le_bytes()).unwrap();
    }
    let crashed = dir.path().join("crashed");
    std::fs::copy(&path, &crashed).unwrap();
    drop(map);
    let map =
        PeriodicMap::open(Heap::<Cpu>::open(&crashed, &opts()).unwrap(), PeriodicOptions::manual()).unwrap();
    let recovery = map.recovery();
    let (first, last) = recovery.failed.expect("an unclean open records failed epochs");
    assert!(first == recovery.durable + 1 && last < recovery.base, "{recovery:?}");
    let kept = (0u64..).take_while(|&i| map.get(&key(i)).unwrap().is_some()).count() as u64;
    assert!((3000..=4000).contains(&kept), "{kept} upserts kept");
    for i in kept..4000 {
        assert_eq!(map.get(&key(i)).unwrap(), None, "key {i} after the gap at {kept}");
    }
    for i in 0..1000u64 {
        map.upsert(&key(i), b"again").unwrap();
    }
    map.sync().unwrap();
    assert_eq!(map.get(&key(7)).unwrap(), Some(b"again".to_vec()));
    assert_eq!(map.len().unwrap(), kept);
    let check = map.check().unwrap();
    assert!(check.problems.is_empty(), "{check:?}");
}

/// The pool's root says which map it holds: each map refuses the other's pool.
#[test]
fn each_map_refuses_the_other_ones_pool() {
    let dir = shm();
    let strict = dir.path().join("strict");
    nvhtm::StrictMap::open(Heap::<Cpu>::create(&strict, &opts()).unwrap()).unwrap().close().unwrap();
    let e = PeriodicMap::open(Heap::<Cpu>::open(&strict, &opts()).unwrap(), PeriodicOptions::manual())
        .unwrap_err();
    assert!(e.to_string().contains("holds no nvhtm map"), "{e}");
    let periodic = dir.path().join("periodic");
    PeriodicMap::open(Heap::<Cpu>::create(&periodic, &opts()).unwrap(), PeriodicOptions::manual())
        .unwrap()
        .close()
        .unwrap();
    let e = nvhtm::StrictMap::open(Heap::<Cpu>::open(&periodic, &opts()).unwrap()).unwrap_err();
    assert!(e.to_string().contains("holds no nvhtm map"), "{e}");
    let heap = Heap::<Cpu>::open(&periodic, &opts()).unwrap();
    assert_eq!(nvhtm::MapKind::of(&heap).unwrap(), Some(nvhtm::MapKind::Periodic));
}

/// Two threads inserting blocks of several sizes at once take many arena chunks, growing the
/// chunk table under contention (each growth replaces the table in a heap transaction: two at
/// once freed the old table twice before chunk additions were serialised).
#[test]
fn concurrent_inserts_grow_the_arena_without_a_double_free() {
    let dir = shm();
    let heap = Heap::<Cpu>::create(dir.path().join("p"), &opts().with_max_size(1 << 30)).unwrap();
    let map = PeriodicMap::open(heap, threaded()).unwrap();
    std::thread::scope(|s| {
        for t in 0..2u64 {
            let map = &map;
            s.spawn(move || {
                for i in 0..20_000u64 {
                    let value = vec![t as u8; [8, 100, 700, 3000][(i % 4) as usize]];
                    map.insert(&key(i * 2 + t), &value).unwrap();
                }
            });
        }
    });
    map.sync().unwrap();
    assert!(map.arena_stats().chunks > 8, "{:?}", map.arena_stats());
    assert_eq!(map.len().unwrap(), 40_000);
    let check = map.check().unwrap();
    assert!(check.problems.is_empty(), "{check:?}");
}
