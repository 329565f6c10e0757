//! The engines `bench map` measures, each running every operation on one map: hashbrown (the
//! baseline), the strict map (on the `Volatile` and `Cpu` domains), the periodic map and the
//! hybrid map.

use nvhtm::hybrid::HybridMap;
use nvhtm::periodic::{PeriodicMap, PeriodicOptions};
use nvhtm::persist::Domain;
use nvhtm::pool::PoolOptions;
use nvhtm::{Cpu, Heap, StrictMap, TypedMap};

use super::{lookups, timed, writes, EngineRun, Workload};

const V1: u64 = 0x5555_5555_5555_5555;
const V2: u64 = 0xaaaa_aaaa_aaaa_aaaa;

/// hashbrown, 8-byte keys and values: every operation on one thread, lookups also on more
/// (a shared `&HashMap` is safe to read from several threads; writes are not).
pub(super) fn hashbrown_small(w: &Workload<u64>, threads: usize) -> EngineRun {
    let mut m: hashbrown::HashMap<u64, u64> = hashbrown::HashMap::with_capacity(w.hits.len());
    let one = threads == 1;
    let insert = if one {
        Some(timed(
            w.hits.len() as u64,
            vec![|| w.hits.iter().for_each(|&k| assert!(m.insert(k, k ^ V1).is_none()))],
        ))
    } else {
        w.hits.iter().for_each(|&k| {
            m.insert(k, k ^ V1);
        });
        None
    };
    let gets = lookups(w, threads, &|k: &u64| m.get(k).copied());
    let (update, delete) = if one {
        let u = timed(
            w.hits.len() as u64,
            vec![|| w.hits.iter().for_each(|&k| assert!(m.insert(k, k ^ V2).is_some()))],
        );
        let d =
            timed(w.hits.len() as u64, vec![|| w.hits.iter().for_each(|k| assert!(m.remove(k).is_some()))]);
        (Some(u), Some(d))
    } else {
        (None, None)
    };
    [insert].into_iter().chain(gets.map(Some)).chain([update, delete]).collect()
}

/// hashbrown, 16-byte keys and 100-byte boxed values (see the module comment).
pub(super) fn hashbrown_blob(
    w: &Workload<[u8; 16]>,
    threads: usize,
    value: &[u8],
    updated: &[u8],
) -> EngineRun {
    let n = w.hits.len();
    let mut m: hashbrown::HashMap<[u8; 16], Box<[u8]>> = hashbrown::HashMap::with_capacity(n);
    let mut fresh: Vec<Box<[u8]>> = (0..n).map(|_| Box::from(value)).collect();
    let one = threads == 1;
    let insert = if one {
        Some(timed(
            n as u64,
            vec![|| w.hits.iter().zip(fresh.drain(..)).for_each(|(&k, v)| assert!(m.insert(k, v).is_none()))],
        ))
    } else {
        w.hits.iter().zip(fresh.drain(..)).for_each(|(&k, v)| {
            m.insert(k, v);
        });
        None
    };
    drop(fresh);
    let gets = lookups(w, threads, &|k: &[u8; 16]| m.get(k).map(|v| u64::from(v[0])));
    let (update, delete) = if one {
        let mut replacements: Vec<Box<[u8]>> = (0..n).map(|_| Box::from(updated)).collect();
        let mut old: Vec<Box<[u8]>> = Vec::with_capacity(n);
        let u = timed(
            n as u64,
            vec![|| {
                for (&k, v) in w.hits.iter().zip(replacements.drain(..)) {
                    old.push(m.insert(k, v).expect("present"));
                }
            }],
        );
        old.clear(); // frees the replaced boxes, untimed
        let d = timed(n as u64, vec![|| w.hits.iter().for_each(|k| old.push(m.remove(k).expect("present")))]);
        drop(old);
        (Some(u), Some(d))
    } else {
        (None, None)
    };
    [insert].into_iter().chain(gets.map(Some)).chain([update, delete]).collect()
}

pub(super) fn heap_options() -> PoolOptions {
    // 64 MiB to start; the heap grows the pool (up to the default 64 GiB reservation) as the
    // map splits, and tmpfs pages cost nothing until written.
    PoolOptions::layout("bench").with_size(64 << 20)
}

/// The nvhtm map through its typed API, 8-byte keys and values, on `threads` threads.
pub(super) fn nvhtm_small<D: Domain>(
    heap: Heap<D>,
    w: &Workload<u64>,
    threads: usize,
) -> Result<EngineRun, String> {
    let map: TypedMap<u64, u64, D> = TypedMap::new(StrictMap::open(heap).map_err(|e| e.to_string())?);
    let insert = writes(w, threads, &|&k: &u64| assert!(map.insert(&k, &(k ^ V1)).expect("insert")));
    let gets = lookups(w, threads, &|k: &u64| map.get(k).expect("get"));
    let update = writes(w, threads, &|&k: &u64| assert!(!map.upsert(&k, &(k ^ V2)).expect("update")));
    let delete = writes(w, threads, &|k: &u64| assert!(map.remove(k).expect("delete")));
    Ok([insert].into_iter().chain(gets).chain([update, delete]).map(Some).collect())
}

/// The nvhtm byte map, 16-byte keys and 100-byte values (stored out of line), on `threads`
/// threads; lookups read one byte of the value in place (`get_with`: no allocation).
pub(super) fn nvhtm_blob<D: Domain>(
    heap: Heap<D>,
    w: &Workload<[u8; 16]>,
    threads: usize,
    value: &[u8],
    updated: &[u8],
) -> Result<EngineRun, String> {
    let map = StrictMap::open(heap).map_err(|e| e.to_string())?;
    let insert = writes(w, threads, &|k: &[u8; 16]| assert!(map.insert(k, value).expect("insert")));
    let gets = lookups(w, threads, &|k: &[u8; 16]| map.get_with(k, |v| u64::from(v[0])).expect("get"));
    let update = writes(w, threads, &|k: &[u8; 16]| assert!(!map.upsert(k, updated).expect("update")));
    let delete = writes(w, threads, &|k: &[u8; 16]| assert!(map.remove(k).expect("delete")));
    Ok([insert].into_iter().chain(gets).chain([update, delete]).map(Some).collect())
}

/// The periodic map with its default 10 ms epochs (a persister thread writes back what each
/// epoch dirtied: its flushes are counted), 8-byte keys and values as bytes. A `sync` after
/// the insert and update loops, untimed (the write-back of their last epoch or two), keeps
/// that write-back, and the persister's frees and allocations (the counter is global), out of
/// the loops timed next (see `settle`).
pub(super) fn periodic_small(
    heap: Heap<Cpu>,
    w: &Workload<u64>,
    threads: usize,
) -> Result<EngineRun, String> {
    let map = PeriodicMap::open(heap, PeriodicOptions::default()).map_err(|e| e.to_string())?;
    let insert = writes(w, threads, &|&k: &u64| {
        assert!(map.insert(&k.to_le_bytes(), &(k ^ V1).to_le_bytes()).expect("insert"))
    });
    settle(&map)?;
    let gets =
        lookups(w, threads, &|k: &u64| map.get_with(&k.to_le_bytes(), |v| u64::from(v[0])).expect("get"));
    let update = writes(w, threads, &|&k: &u64| {
        assert!(!map.upsert(&k.to_le_bytes(), &(k ^ V2).to_le_bytes()).expect("update"))
    });
    settle(&map)?;
    let delete = writes(w, threads, &|k: &u64| assert!(map.remove(&k.to_le_bytes()).expect("delete")));
    Ok([insert].into_iter().chain(gets).chain([update, delete]).map(Some).collect())
}

/// Makes everything durable and reclaims what the writes retired (a sync, then one more
/// advance: blocks retired in an epoch are freed once the next one is durable).
fn settle(map: &PeriodicMap<Cpu>) -> Result<(), String> {
    map.sync().map_err(|e| e.to_string())?;
    map.advance().map(drop).map_err(|e| e.to_string())
}

/// The periodic map, 16-byte keys and 100-byte values.
pub(super) fn periodic_blob(
    heap: Heap<Cpu>,
    w: &Workload<[u8; 16]>,
    threads: usize,
    value: &[u8],
    updated: &[u8],
) -> Result<EngineRun, String> {
    let map = PeriodicMap::open(heap, PeriodicOptions::default()).map_err(|e| e.to_string())?;
    let insert = writes(w, threads, &|k: &[u8; 16]| assert!(map.insert(k, value).expect("insert")));
    settle(&map)?;
    let gets = lookups(w, threads, &|k: &[u8; 16]| map.get_with(k, |v| u64::from(v[0])).expect("get"));
    let update = writes(w, threads, &|k: &[u8; 16]| assert!(!map.upsert(k, updated).expect("update")));
    settle(&map)?;
    let delete = writes(w, threads, &|k: &[u8; 16]| assert!(map.remove(k).expect("delete")));
    Ok([insert].into_iter().chain(gets).chain([update, delete]).map(Some).collect())
}

/// The hybrid map (a DRAM index over a persistent log, one group commit per write), 8-byte
/// keys and values as bytes. Its index grows inside the insert loop (hashbrown tables: counted
/// allocations), and its log cleaning runs inside the update and delete loops.
pub(super) fn hybrid_small(heap: Heap<Cpu>, w: &Workload<u64>, threads: usize) -> Result<EngineRun, String> {
    let map = HybridMap::open(heap).map_err(|e| e.to_string())?;
    let insert = writes(w, threads, &|&k: &u64| {
        assert!(map.insert(&k.to_le_bytes(), &(k ^ V1).to_le_bytes()).expect("insert"))
    });
    let gets =
        lookups(w, threads, &|k: &u64| map.get_with(&k.to_le_bytes(), |v| u64::from(v[0])).expect("get"));
    let update = writes(w, threads, &|&k: &u64| {
        assert!(!map.upsert(&k.to_le_bytes(), &(k ^ V2).to_le_bytes()).expect("update"))
    });
    let delete = writes(w, threads, &|k: &u64| assert!(map.remove(&k.to_le_bytes()).expect("delete")));
    Ok([insert].into_iter().chain(gets).chain([update, delete]).map(Some).collect())
}

/// The hybrid map, 16-byte keys and 100-byte values.
pub(super) fn hybrid_blob(
    heap: Heap<Cpu>,
    w: &Workload<[u8; 16]>,
    threads: usize,
    value: &[u8],
    updated: &[u8],
) -> Result<EngineRun, String> {
    let map = HybridMap::open(heap).map_err(|e| e.to_string())?;
    let insert = writes(w, threads, &|k: &[u8; 16]| assert!(map.insert(k, value).expect("insert")));
    let gets = lookups(w, threads, &|k: &[u8; 16]| map.get_with(k, |v| u64::from(v[0])).expect("get"));
    let update = writes(w, threads, &|k: &[u8; 16]| assert!(!map.upsert(k, updated).expect("update")));
    let delete = writes(w, threads, &|k: &[u8; 16]| assert!(map.remove(k).expect("delete")));
    Ok([insert].into_iter().chain(gets).chain([update, delete]).map(Some).collect())
}
