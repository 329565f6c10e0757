//! Unit tests of the periodic map on the volatile domain (crash tests: `tests/periodic_crash.rs`).

use super::*;
use crate::{PoolOptions, Volatile};
use arena::Arena;

fn map() -> PeriodicMap<Volatile> {
    let heap =
        Heap::create_in_memory(&PoolOptions::layout("periodic").with_size(16 << 20), Volatile).unwrap();
    PeriodicMap::open(heap, PeriodicOptions::manual().with_seed(7)).unwrap()
}

#[test]
fn operations_behave_like_a_map_across_splits() {
    let map = map();
    let mut model = std::collections::BTreeMap::new();
    let mut rng = fastrand::Rng::with_seed(1);
    for step in 0..5000u64 {
        let k = format!("key{}", rng.u64(..1500)).into_bytes();
        match rng.u8(..4) {
            0 | 1 => {
                let v = vec![step as u8; rng.usize(..40)];
                assert_eq!(map.upsert(&k, &v).unwrap(), model.insert(k, v).is_none());
            }
            2 => assert_eq!(map.remove(&k).unwrap(), model.remove(&k).is_some()),
            _ => {
                let expected = model.get(&k).cloned();
                let ok = map.compare_and_swap(&k, expected.as_deref(), Some(b"cas")).unwrap();
                assert!(ok.is_ok());
                model.insert(k, b"cas".to_vec());
            }
        }
        if step % 700 == 0 {
            map.advance().unwrap();
        }
    }
    for (k, v) in &model {
        assert_eq!(map.get(k).unwrap().as_ref(), Some(v));
    }
    assert_eq!(map.get(b"absent").unwrap(), None);
    let entries: std::collections::BTreeMap<_, _> = map.entries().unwrap().into_iter().collect();
    assert_eq!(entries, model);
    let stats = map.stats().unwrap();
    assert!(stats.segments > 4, "{stats:?}");
    assert_eq!(stats.entries, model.len() as u64);
    assert!(stats.longest_bucket <= MAX_ENTRIES as u64);
    map.sync().unwrap();
    let check = map.check().unwrap();
    assert!(check.problems.is_empty(), "{check:?}");
}

#[test]
fn compare_and_swap_reports_the_current_value() {
    let map = map();
    assert_eq!(map.compare_and_swap(b"k", Some(b"x"), Some(b"y")).unwrap(), Err(None));
    assert!(map.insert(b"k", b"a").unwrap());
    assert!(!map.insert(b"k", b"b").unwrap());
    assert_eq!(map.compare_and_swap(b"k", None, Some(b"y")).unwrap(), Err(Some(b"a".to_vec())));
    assert_eq!(map.compare_and_swap(b"k", Some(b"a"), None).unwrap(), Ok(()));
    assert!(!map.contains(b"k").unwrap());
}

#[test]
fn sizes_are_checked() {
    let map = map();
    assert!(matches!(map.upsert(&vec![0; crate::map::MAX_KEY + 1], b""), Err(MapError::KeyTooLarge { .. })));
    assert!(matches!(map.upsert(b"k", &vec![0; MAX_VALUE + 1]), Err(MapError::ValueTooLarge { .. })));
    map.upsert(b"big", &vec![3; MAX_VALUE]).unwrap();
    assert_eq!(map.get(b"big").unwrap().unwrap().len(), MAX_VALUE);
}

#[test]
fn blocks_are_reused_once_the_next_epoch_is_durable() {
    let map = map();
    map.upsert(b"k", b"1").unwrap();
    map.sync().unwrap();
    let used = map.arena_stats().used_slots;
    for i in 0..100u32 {
        map.upsert(b"k", &i.to_le_bytes()).unwrap();
        map.advance().unwrap();
    }
    map.sync().unwrap();
    map.advance().unwrap();
    // One block for the key, at most two waiting for reuse.
    let stats = map.arena_stats();
    assert!(stats.used_slots <= used + 2, "{stats:?}");
    assert!(map.check().unwrap().problems.is_empty());
}

#[test]
fn transactions_are_serializable_under_concurrent_transfers() {
    let map = map();
    let accounts = 20u64;
    for a in 0..accounts {
        map.upsert(&a.to_le_bytes(), &1000u64.to_le_bytes()).unwrap();
    }
    let read = |t: &mut Transaction<'_, Volatile>, a: u64| -> Result<u64> {
        Ok(u64::from_le_bytes(t.get(&a.to_le_bytes())?.unwrap().try_into().unwrap()))
    };
    std::thread::scope(|s| {
        for thread in 0..2u64 {
            let (map, read) = (&map, &read);
            s.spawn(move || {
                let mut rng = fastrand::Rng::with_seed(thread);
                for _ in 0..2000 {
                    let (from, to) = (rng.u64(..accounts), rng.u64(..accounts));
                    if from == to {
                        continue;
                    }
                    map.transaction(|t| {
                        let (a, b) = (read(t, from)?, read(t, to)?);
                        let amount = a.min(7);
                        t.upsert(&from.to_le_bytes(), &(a - amount).to_le_bytes());
                        t.upsert(&to.to_le_bytes(), &(b + amount).to_le_bytes());
                        Ok(())
                    })
                    .unwrap();
                }
            });
        }
        s.spawn(|| {
            for _ in 0..200 {
                // A read-only transaction sees a consistent total.
                let total =
                    map.transaction(|t| (0..accounts).map(|a| read(t, a)).sum::<Result<u64>>()).unwrap();
                assert_eq!(total, 1000 * accounts);
                map.advance().unwrap();
            }
        });
    });
    let total: u64 =
        map.entries().unwrap().iter().map(|(_, v)| u64::from_le_bytes(v[..].try_into().unwrap())).sum();
    assert_eq!(total, 1000 * accounts);
}

#[test]
fn a_persister_thread_makes_epochs_durable() {
    let heap =
        Heap::create_in_memory(&PoolOptions::layout("periodic").with_size(16 << 20), Volatile).unwrap();
    let opts = PeriodicOptions::manual().every(std::time::Duration::from_millis(1));
    let map = PeriodicMap::open(heap, opts).unwrap();
    map.upsert(b"k", b"v").unwrap();
    let (current, _) = map.epochs();
    map.sync().unwrap();
    assert!(map.epochs().1 >= current);
    map.close().unwrap();
}

/// A block retired while its chunk is unscanned, whose bucket the scan then visits (so the
/// scan does not mark it), is not free at the end of the scan: only its own free (once the
/// epoch after its retirement is durable) gives it back, once.
#[test]
fn the_end_of_a_scan_keeps_blocks_held_for_a_later_free() {
    let opts = PoolOptions::layout("periodic").with_size(16 << 20);
    let map = map();
    for i in 0..50u64 {
        map.upsert(&i.to_le_bytes(), b"v").unwrap();
    }
    map.sync().unwrap();
    let image = map.heap().pool().image().unwrap();
    let heap = Heap::open_image(&image, &opts, Volatile).unwrap();
    let root = heap.existing_root().unwrap().unwrap().0;
    let table = heap.get(PPtr::<u64>::new(root + ROOT_CHUNKS)).unwrap();
    let arena = Arena::load(&heap, table).unwrap();
    // A block some bucket names: the first slot of the first chunk.
    let named = map.inner.dir.route(&map.inner.heap, Hash::of(7, &0u64.to_le_bytes())).unwrap();
    let (status, heads) =
        map.inner.read_bucket_locked(named, Hash::of(7, &0u64.to_le_bytes()).bucket()).unwrap();
    let held = heads[status.valid(|_| false)];
    arena.hold(held).unwrap();
    arena.finish_scan();
    assert!(arena.is_used(held).unwrap(), "a held block is free at the end of the scan");
    let mut taken = std::collections::BTreeSet::new();
    // Every free slot of the chunk, and then some of a new one.
    for _ in 0..5000 {
        let slot = arena.alloc(&heap, root, 8).unwrap();
        assert!(slot != held && taken.insert(slot), "slot {slot:#x} handed out twice or while held");
    }
    arena.free(held).unwrap();
    assert!(!arena.is_used(held).unwrap());
    assert!(matches!(arena.free(held), Err(MapError::Corrupt(_))), "a double free is refused");
}

/// A walk holds no epoch: its visitor may sync (which waits for every operation in the epoch).
#[test]
fn a_walk_may_sync_from_its_visitor() {
    let map = map();
    for i in 0..300u64 {
        map.upsert(&i.to_le_bytes(), b"v").unwrap();
    }
    let mut visited = 0;
    map.for_each(|_, _| {
        visited += 1;
        if visited % 100 == 0 {
            map.sync().unwrap();
        }
        true
    })
    .unwrap();
    assert_eq!(visited, 300);
}
