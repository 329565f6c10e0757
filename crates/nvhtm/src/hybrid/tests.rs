use super::*;
use crate::{PoolOptions, Volatile};

fn heap() -> Heap<Volatile> {
    Heap::create_in_memory(
        &PoolOptions::layout("hybrid-test").with_size(8 << 20).with_max_size(64 << 20),
        Volatile,
    )
    .unwrap()
}

fn small() -> HybridMap<Volatile> {
    HybridMap::open_with(heap(), LogOptions { segment_size: 1024 }).unwrap()
}

fn crash_copy(map: &HybridMap<Volatile>) -> HybridMap<Volatile> {
    let image = map.heap().pool().image().unwrap();
    HybridMap::open(Heap::open_image(&image, &PoolOptions::layout("hybrid-test"), Volatile).unwrap()).unwrap()
}

#[test]
fn operations_match_a_model_and_survive_a_reopen_with_cleaning() {
    let map = small();
    let mut model = std::collections::BTreeMap::new();
    let mut rng = fastrand::Rng::with_seed(5);
    for step in 0..5000u32 {
        let key = format!("key{}", rng.u32(..200)).into_bytes();
        match rng.u8(..10) {
            0..=5 => {
                let value = vec![step as u8; rng.usize(..40)];
                assert_eq!(map.upsert(&key, &value).unwrap(), model.insert(key, value).is_none());
            }
            6 => {
                let value = step.to_le_bytes().to_vec();
                let new = map.insert(&key, &value).unwrap();
                assert_eq!(new, !model.contains_key(&key));
                model.entry(key).or_insert(value);
            }
            7 => assert_eq!(map.remove(&key).unwrap(), model.remove(&key).is_some()),
            8 => {
                let expected = model.get(&key).cloned();
                assert_eq!(map.compare_and_swap(&key, expected.as_deref(), None).unwrap(), Ok(()));
                model.remove(&key);
            }
            _ => assert_eq!(map.get(&key).unwrap(), model.get(&key).cloned()),
        }
    }
    let stats = map.stats().unwrap();
    assert!(stats.cleaned_segments > 10, "{stats:?}");
    assert!(
        stats.live_bytes * 4 >= stats.log_bytes,
        "cleaning keeps the log at least a quarter live: {stats:?}"
    );
    assert_eq!(map.check().unwrap(), Vec::<String>::new());
    let entries: std::collections::BTreeMap<_, _> = map.entries().unwrap().into_iter().collect();
    assert_eq!(entries, model);
    let reopened = crash_copy(&map);
    assert_eq!(reopened.check().unwrap(), Vec::<String>::new());
    assert_eq!(reopened.entries().unwrap().into_iter().collect::<std::collections::BTreeMap<_, _>>(), model);
    assert_eq!(reopened.len().unwrap(), model.len() as u64);
    for (k, v) in &model {
        assert_eq!(reopened.get(k).unwrap().as_ref(), Some(v));
    }
}

#[test]
fn a_compare_and_swap_that_fails_returns_the_current_value_and_writes_nothing() {
    let map = small();
    map.upsert(b"k", b"1").unwrap();
    let appends = map.stats().unwrap().appends;
    assert_eq!(map.compare_and_swap(b"k", Some(b"2"), Some(b"3")).unwrap(), Err(Some(b"1".to_vec())));
    assert_eq!(map.compare_and_swap(b"absent", Some(b"2"), None).unwrap(), Err(None));
    assert!(!map.remove(b"absent").unwrap());
    assert!(!map.insert(b"k", b"x").unwrap());
    assert_eq!(map.stats().unwrap().appends, appends);
}

#[test]
fn oversized_keys_and_values_are_refused() {
    let map = small();
    let key = vec![0u8; crate::map::MAX_KEY + 1];
    assert!(matches!(map.upsert(&key, b"v"), Err(MapError::KeyTooLarge { .. })));
    let value = vec![0u8; MAX_VALUE + 1];
    assert!(matches!(map.upsert(b"k", &value), Err(MapError::ValueTooLarge { .. })));
    assert_eq!(map.len().unwrap(), 0);
}

#[test]
fn two_threads_writing_the_same_keys_leave_the_last_write_of_each() {
    let map = HybridMap::open_with(heap(), LogOptions { segment_size: 4096 }).unwrap();
    std::thread::scope(|s| {
        for t in 0..2u64 {
            let map = &map;
            s.spawn(move || {
                for i in 0..3000u64 {
                    map.upsert(&(i % 100).to_le_bytes(), &(t << 32 | i).to_le_bytes()).unwrap();
                    assert!(map.get(&(i % 100).to_le_bytes()).unwrap().is_some());
                }
            });
        }
    });
    assert_eq!(map.len().unwrap(), 100);
    assert_eq!(map.check().unwrap(), Vec::<String>::new());
    let reopened = crash_copy(&map);
    assert_eq!(reopened.entries().unwrap(), map.entries().unwrap());
}

#[test]
fn each_map_refuses_the_others_pool() {
    let map = small();
    map.upsert(b"k", b"v").unwrap();
    let image = map.heap().pool().image().unwrap();
    let open = || Heap::open_image(&image, &PoolOptions::layout("hybrid-test"), Volatile).unwrap();
    assert!(crate::StrictMap::open(open()).is_err());
    assert!(crate::PeriodicMap::open(open(), crate::PeriodicOptions::manual()).is_err());
    let strict = crate::StrictMap::open(heap()).unwrap();
    let image = strict.heap().pool().image().unwrap();
    let heap = Heap::open_image(&image, &PoolOptions::layout("hybrid-test"), Volatile).unwrap();
    assert!(matches!(HybridMap::open(heap), Err(MapError::NotAMap(_))));
}

#[test]
fn a_log_past_a_mebibyte_is_replayed_on_two_threads_to_the_same_map() {
    let map = HybridMap::open_with(heap(), LogOptions { segment_size: 64 << 10 }).unwrap();
    let mut model = std::collections::BTreeMap::new();
    for i in 0..40_000u64 {
        let key = (i * 7919 % 10_000).to_le_bytes().to_vec();
        if i % 5 == 4 {
            map.remove(&key).unwrap();
            model.remove(&key);
        } else {
            let value = vec![i as u8; 40];
            map.upsert(&key, &value).unwrap();
            model.insert(key, value);
        }
    }
    assert!(map.stats().unwrap().log_bytes >= super::replay::parallel_from(), "{:?}", map.stats());
    let reopened = crash_copy(&map);
    assert_eq!(reopened.check().unwrap(), Vec::<String>::new());
    assert_eq!(reopened.stats().unwrap().live_bytes, map.stats().unwrap().live_bytes);
    let entries: std::collections::BTreeMap<_, _> = reopened.entries().unwrap().into_iter().collect();
    assert_eq!(entries, model);
}
