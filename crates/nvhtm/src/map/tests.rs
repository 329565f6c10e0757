//! Crash tests of a path the random workloads cannot reach: stale copies that a crash left
//! between a split's commit and its clearing, found and cleared later by an insert whose window
//! is full.

use super::*;
use crate::pool::PoolOptions;
use crate::sim::{CrashContext, CrashTest, Sim};

fn opts() -> PoolOptions {
    PoolOptions::layout("map-stale").with_size(1 << 20).with_max_size(4 << 20)
}

fn prefill_key(i: u64) -> Vec<u8> {
    format!("k{i}").into_bytes()
}

/// A map whose first split is done but whose moved keys' old copies are still marked occupied,
/// as after a crash just before the split's clearing fence, reopened (no DRAM state); the
/// number of pre-fill keys; the old segment.
fn map_with_stale_copies(sim: &Sim) -> (StrictMap<Sim>, u64, Segment) {
    let map = StrictMap::open(Heap::create_in_memory(&opts(), sim.clone()).unwrap()).unwrap();
    let mut keys = 0;
    while map.shape().unwrap().0 == 1 {
        map.upsert(&prefill_key(keys), &keys.to_le_bytes()).unwrap();
        keys += 1;
    }
    let old = map.locate(Hash(0)).unwrap();
    let pool = map.heap().raw_pool();
    let view = SegView::new(pool, old.at).unwrap();
    let mut restored = 0;
    for bucket in 0..BUCKETS {
        let at = bucket_offset(old.at, bucket);
        let meta = map.load(at).unwrap();
        for slot in (0..SLOTS).filter(|s| meta & (1 << s) == 0) {
            let info = map.load(slot_offset(old.at, bucket, slot) + 24).unwrap();
            if info_kind(info) != 0 && !old.owns(map.slot_hash(&view, bucket, slot)) {
                pool.store_u64(at, map.load(at).unwrap() | 1 << slot, Ordering::Release).unwrap();
                restored += 1;
            }
        }
        pool.persist(at, 8).unwrap();
    }
    assert!(restored > 500, "the split moved {restored} keys");
    let StrictMap { heap, .. } = map;
    (StrictMap::open(heap).unwrap(), keys, old)
}

/// Keys the old segment owns, homed at `home`.
fn keys_homed_at<D: Domain>(map: &StrictMap<D>, old: &Segment, home: u64, count: usize) -> Vec<Vec<u8>> {
    (0u64..)
        .map(|j| format!("w{j}").into_bytes())
        .filter(|k| {
            let hash = map.hash(k);
            old.owns(hash) && hash.home() == home
        })
        .take(count)
        .collect()
}

#[test]
fn stale_copies_left_by_a_crash_are_cleared_durably_before_their_slots_are_reused() {
    let sim = Sim::new();
    let (map, prefill, old) = map_with_stale_copies(&sim);
    // A window whose first stale copy is not in its bucket's first line (a slot sharing the
    // meta word's line is ordered with it anyway): insert keys homed there until its free
    // slots are used up, and more, which only fit once its stale copies are cleared.
    let view = SegView::new(map.heap().raw_pool(), old.at).unwrap();
    let stale_in = |bucket: u64| -> u64 {
        let meta = map.load(bucket_offset(old.at, bucket)).unwrap();
        occupied(meta)
            .filter(|&s| !old.owns(map.slot_hash(&view, bucket, s)))
            .fold(0, |mask, s| mask | 1 << s)
    };
    let home = (0..BUCKETS)
        .find(|&h| {
            let first = (0..WINDOW).map(|i| stale_in((h + i) % BUCKETS)).find(|&m| m != 0);
            first.is_some_and(|m| m & 1 == 0)
        })
        .expect("a window whose first stale copy is past slot 0");
    let free: u64 = (0..WINDOW)
        .map(|i| {
            let meta = map.load(bucket_offset(old.at, (home + i) % BUCKETS)).unwrap();
            SLOTS - u64::from((meta & 0x7f).count_ones())
        })
        .sum();
    let inserts = keys_homed_at(&map, &old, home, free as usize + 4);
    sim.restart_recording().unwrap();
    for (n, key) in inserts.iter().enumerate() {
        assert!(map.insert(key, b"new").unwrap());
        sim.mark(n as u64);
    }
    assert_eq!(map.shape().unwrap().0, 2, "the stale copies made room: no split");
    let recording = sim.recording();
    let check = |sim: &Sim, image: &[u8], ctx: &CrashContext| -> Result<(), String> {
        let map = StrictMap::open(Heap::open_image(image, &opts(), sim.clone()).map_err(|e| e.to_string())?)
            .map_err(|e| e.to_string())?;
        let done = ctx.marks.len();
        let entries = map.entries().map_err(|e| e.to_string())?;
        if let Some((key, value)) = entries.iter().find(|(k, v)| k.starts_with(b"w") && v != b"new") {
            return Err(format!("{key:?} reads {value:?}: a torn entry"));
        }
        for (n, key) in inserts.iter().enumerate() {
            let present = map.get(key).map_err(|e| e.to_string())?;
            match present.as_deref() {
                Some(b"new") if n <= done => {}
                None if n >= done => {}
                other => return Err(format!("insert {n} of {done} done: {key:?} reads {other:?}")),
            }
        }
        for i in 0..prefill {
            if map.get(&prefill_key(i)).map_err(|e| e.to_string())? != Some(i.to_le_bytes().to_vec()) {
                return Err(format!("pre-fill key {i} lost"));
            }
        }
        let new = inserts.iter().filter(|k| map.get(k).ok().flatten().is_some()).count() as u64;
        if entries.len() as u64 != prefill + new {
            return Err(format!(
                "the scan shows {} entries, expected {}: a ghost",
                entries.len(),
                prefill + new
            ));
        }
        Ok(())
    };
    let test = CrashTest { exhaustive_limit: 256, samples: 24, ..CrashTest::default() };
    let report = test.run(&recording, check);
    report.assert_passed();
    assert!(report.images_checked > 50, "{report}");
    // Every flush and fence on this path is needed, the clearing's fence included.
    let mutations = test.mutation_run(&recording, check);
    println!("{report}\n{mutations}");
    let map_sites: Vec<_> = mutations.sites.iter().filter(|s| s.site.file.contains("/map/")).collect();
    assert!(map_sites.len() >= 5, "{mutations}");
    assert!(mutations.missed().is_empty(), "{mutations}");
}

/// A map of two segments (one split) on the Volatile domain, with its keys.
fn split_map() -> (StrictMap<crate::Volatile>, Vec<Vec<u8>>) {
    let map = StrictMap::open(Heap::create_in_memory(&opts(), crate::Volatile).unwrap()).unwrap();
    let mut keys = Vec::new();
    while map.shape().unwrap().0 == 1 {
        keys.push(prefill_key(keys.len() as u64));
        map.upsert(keys.last().unwrap(), b"v").unwrap();
    }
    (map, keys)
}

/// The map opened again over its heap: DRAM state (the directory mirror, the segment headers)
/// is rebuilt from media.
fn reopened(map: StrictMap<crate::Volatile>) -> StrictMap<crate::Volatile> {
    let StrictMap { heap, .. } = map;
    StrictMap::open(heap).unwrap()
}

fn corrupt<T>(result: Result<T>) -> String {
    match result {
        Err(MapError::Corrupt(why)) => why,
        Err(e) => panic!("expected a corruption error, got {e}"),
        Ok(_) => panic!("expected a corruption error, got a result"),
    }
}

#[test]
fn a_directory_naming_the_wrong_segment_is_an_error_not_a_hang() {
    let (map, keys) = split_map();
    let dir = map.load(map.root + ROOT_DIR).unwrap();
    let low = map.load(dir + DIR_HEADER).unwrap();
    // Both entries name the segment of the hashes starting with bit 0.
    map.heap().raw_pool().store_u64(dir + DIR_HEADER + 8, low, Ordering::Release).unwrap();
    let map = reopened(map);
    let stray = keys.iter().find(|k| map.hash(k).prefix(1) == 1).unwrap();
    assert!(corrupt(map.get(stray)).contains("no segment owning"));
    assert!(corrupt(map.upsert(stray, b"w")).contains("no segment owning"));
    assert!(corrupt(map.for_each(|_, _| true)).contains("no segment owning"));
}

#[test]
fn a_segment_deeper_than_its_directory_is_an_error() {
    let (map, keys) = split_map();
    let dir = map.load(map.root + ROOT_DIR).unwrap();
    let low = map.load(dir + DIR_HEADER).unwrap();
    map.heap().raw_pool().store_u64(low + SEG_DEPTH, 5, Ordering::Release).unwrap();
    let map = reopened(map);
    let key = keys.iter().find(|k| map.hash(k).prefix(1) == 0).unwrap();
    assert!(corrupt(map.get(key)).contains("deeper than the directory"));
    assert!(corrupt(map.remove(key)).contains("deeper than the directory"));
}

/// The directory mirror checks what it reads from media when it is filled: a directory entry
/// past the pool or misaligned, and a segment whose id is past the table or is another
/// segment's, are errors on the first operation after opening, never a panic or a read outside
/// the pool.
#[test]
fn the_mirror_refuses_bad_directory_entries_and_segment_ids() {
    type VMap = StrictMap<crate::Volatile>;
    // `change(map, directory, low segment, high segment)` corrupts the media.
    let corrupted = |change: &dyn Fn(&VMap, u64, u64, u64)| {
        let (map, keys) = split_map();
        let dir = map.load(map.root + ROOT_DIR).unwrap();
        let (low, high) = (map.load(dir + DIR_HEADER).unwrap(), map.load(dir + DIR_HEADER + 8).unwrap());
        change(&map, dir, low, high);
        let map = reopened(map);
        let key = keys.iter().find(|k| map.hash(k).prefix(1) == 1).unwrap().clone();
        (map, key)
    };
    let pool_size = |map: &VMap| map.heap().raw_pool().size();
    let store = |map: &VMap, at: u64, value: u64| {
        map.heap().raw_pool().store_u64(at, value, Ordering::Release).unwrap();
    };
    // An entry past the pool.
    let (map, key) = corrupted(&|map, dir, _, _| store(map, dir + DIR_HEADER + 8, pool_size(map) + 4096));
    assert!(map.get(&key).is_err());
    assert!(map.upsert(&key, b"w").is_err());
    // An entry that is not aligned (one byte into the segment).
    let (map, key) = corrupted(&|map, dir, _, high| store(map, dir + DIR_HEADER + 8, high + 1));
    assert!(map.get(&key).is_err());
    // A segment id past the table.
    let (map, key) = corrupted(&|map, _, _, high| store(map, high + 24, 4096 * LOCK_PAGE));
    assert!(corrupt(map.get(&key)).contains("past the table"));
    // Two segments with the same id.
    let (map, key) = corrupted(&|map, _, low, high| store(map, high + 24, map.load(low + 24).unwrap()));
    let other = (0u64..).map(prefill_key).find(|k| map.hash(k).prefix(1) == 0).unwrap();
    map.get(&other).unwrap(); // the low half first: its segment takes the id
    assert!(corrupt(map.get(&key)).contains("have the same id"));
}

#[test]
fn a_record_claiming_a_huge_key_is_an_error_not_an_allocation() {
    let map = StrictMap::open(Heap::create_in_memory(&opts(), crate::Volatile).unwrap()).unwrap();
    let key = b"a key long enough to be stored out of place";
    map.upsert(key, b"value").unwrap();
    let hash = map.hash(key);
    let segment = map.locate(hash).unwrap();
    let view = SegView::new(map.heap().raw_pool(), segment.at).unwrap();
    let found = map.find(&view, hash, key, &|| true, None).unwrap().unwrap();
    let pool = map.heap().raw_pool();
    pool.write(found.record, &[u32::MAX, 5]).unwrap();
    assert!(corrupt(map.entries()).contains("claims a 4294967295-byte key"));
    pool.write(found.record, &[key.len() as u32, u32::MAX]).unwrap();
    assert!(corrupt(map.get(key)).contains("claims a 4294967295-byte value"));
}

#[test]
fn a_split_past_the_segment_limit_is_refused_and_changes_nothing() {
    let map = StrictMap::open(Heap::create_in_memory(&opts(), crate::Volatile).unwrap()).unwrap();
    let limit = 4096 * LOCK_PAGE;
    map.heap().raw_pool().store_u64(map.root + ROOT_NEXT_ID, limit, Ordering::Release).unwrap();
    let mut inserted = 0u64;
    let refused = loop {
        match map.insert(&prefill_key(inserted), b"v") {
            Ok(_) => inserted += 1,
            Err(e) => break e,
        }
    };
    assert!(matches!(refused, MapError::Limit(_)), "{refused}");
    assert_eq!(
        refused.to_string(),
        format!("the map cannot grow further: {limit} segments, the most one map can have")
    );
    assert_eq!(map.len().unwrap(), inserted);
    assert!((0..inserted).all(|i| map.get(&prefill_key(i)).unwrap().is_some()));
    assert_eq!(map.get(&prefill_key(inserted)).unwrap(), None);
}

/// Keys crafted so that their unkeyed hashes share a 10-bit prefix all fall into one directory
/// entry of an unkeyed map (seed 0, as maps made before keyed hashing) and force a split per
/// shared bit; under a map's secret seed the same keys spread like any others.
#[test]
fn keys_sharing_an_unkeyed_hash_prefix_do_not_cluster_in_a_keyed_map() {
    let crafted: Vec<Vec<u8>> = (0u64..)
        .map(|j| format!("x{j}").into_bytes())
        .filter(|k| xxhash_rust::xxh3::xxh3_64(k) >> 54 == 0)
        .take(5000)
        .collect();
    let depth_after = |map: StrictMap<crate::Volatile>| {
        for k in &crafted {
            map.insert(k, b"v").unwrap();
        }
        map.stats().unwrap().global_depth
    };
    let heap = || {
        Heap::create_in_memory(&opts().with_size(64 << 20).with_max_size(256 << 20), crate::Volatile).unwrap()
    };
    let unkeyed = depth_after(StrictMap::open_with_seed(heap(), 0).unwrap());
    let keyed = StrictMap::open(heap()).unwrap();
    assert_ne!(keyed.seed, 0, "a new map's seed is secret, never the unkeyed 0");
    let keyed = depth_after(keyed);
    println!("directory depth after 5000 crafted keys: unkeyed {unkeyed}, keyed {keyed}");
    assert!(unkeyed >= 10, "the crafted keys cluster without a key: depth {unkeyed}");
    assert!(keyed <= 3, "the crafted keys spread under a secret seed: depth {keyed}");
}
