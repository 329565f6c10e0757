//! A strict map on a FAMS pool over simulated storage (the pool's backing seam): a crash at
//! every storage call leaves the map as of the last acknowledged sync or the one in flight,
//! and so does a second crash in the run that recovered from the first.

use std::collections::BTreeMap;

use nvhtm::fams::{digest, SimStorage};
use nvhtm::{Heap, Pool, PoolError, PoolOptions, StrictMap, Volatile};

type Model = BTreeMap<Vec<u8>, Vec<u8>>;

fn opts() -> PoolOptions {
    PoolOptions::layout("fams-pool").with_size(256 << 10).with_max_size(16 << 20)
}

fn open(storage: &SimStorage) -> Result<StrictMap<Volatile>, String> {
    let pool = Pool::open_fams_on(storage.clone(), &opts(), Volatile).map_err(|e| e.to_string())?;
    StrictMap::open(Heap::load(pool).map_err(|e| e.to_string())?).map_err(|e| e.to_string())
}

fn contents(map: &StrictMap<Volatile>) -> Result<Model, String> {
    let report = map.heap().check(&mut |_, _| {});
    if !report.is_consistent() {
        return Err(format!("heap inconsistent: {:?}", report.problems));
    }
    Ok(map.entries().map_err(|e| e.to_string())?.into_iter().collect())
}

/// `syncs` rounds of upserts (inline and out-of-place values) and removes, each ended by a sync
/// that is marked once acknowledged. Returns the model after each sync (index 0: before any).
fn workload(storage: &SimStorage, seed: u64, syncs: u64) -> Vec<Model> {
    let map = open(storage).unwrap();
    let mut model = contents(&map).unwrap();
    let mut states = vec![model.clone()];
    let mut rng = fastrand::Rng::with_seed(seed);
    for round in 1..=syncs {
        for _ in 0..rng.usize(2..6) {
            let key = format!("key{}", rng.u32(..24)).into_bytes();
            if rng.u8(..4) == 0 {
                map.remove(&key).unwrap();
                model.remove(&key);
            } else {
                let value = vec![rng.u8(..); if rng.bool() { 8 } else { 300 }];
                map.upsert(&key, &value).unwrap();
                model.insert(key, value);
            }
        }
        map.heap().pool().sync().unwrap();
        states.push(model.clone());
        storage.mark(round);
    }
    states
}

/// The map recovered from a crash state must be the state of the last acknowledged sync or the
/// next; returns it.
fn check(
    states: &[Model],
    data: &[u8],
    journal: &[u8],
    marks: &[u64],
) -> Result<(SimStorage, Model), String> {
    let done = marks.len();
    let storage = SimStorage::from_image(data.to_vec(), journal.to_vec());
    let found = contents(&open(&storage)?)?;
    if !states[done..(done + 2).min(states.len())].contains(&found) {
        return Err(format!(
            "after {done} acknowledged syncs the map holds {} entries, in no allowed state",
            found.len()
        ));
    }
    Ok((storage, found))
}

fn fresh() -> SimStorage {
    let storage = SimStorage::new();
    let pool = Pool::create_fams_on(storage.clone(), &opts(), Volatile, |_| Ok::<(), PoolError>(())).unwrap();
    let map = StrictMap::open(Heap::format(pool, &Default::default()).unwrap()).unwrap();
    map.heap().pool().sync().unwrap();
    drop(map);
    storage.restart_trace();
    storage
}

#[test]
fn a_crash_at_any_storage_call_of_a_fams_pool_leaves_a_synced_map() {
    let storage = fresh();
    let states = workload(&storage, 7, 5);
    let grown = open(&storage).unwrap().heap().pool().size();
    assert!(grown > 256 << 10, "the workload grows the pool through FAMS: {grown} bytes");
    let report = storage.crash_test(24, 7, |d, j, m| check(&states, d, j, m).map(drop));
    println!("{} crash points, {} states", report.crash_points, report.images_checked);
    assert!(report.failures.is_empty(), "{:?}", report.failures);
    assert!(report.images_checked > 50, "{}", report.images_checked);
}

/// Two crashes in a row: each recovered state of the first run is worked on by a second run
/// (recovery's own storage calls included), which is crashed at every storage call in turn.
#[test]
fn two_runs_in_a_row_on_a_fams_pool_survive_a_crash_in_each() {
    let storage = fresh();
    let states = workload(&storage, 11, 4);
    let (mut followed, mut nested) = (0, 0);
    let report = storage.crash_test(12, 11, |data, journal, marks| {
        let (recovered, _) = check(&states, data, journal, marks)?;
        // Follow one state in twelve (chosen by its bytes) with a second run.
        if (digest(data) ^ digest(journal) ^ marks.len() as u64) % 12 != 0 {
            return Ok(());
        }
        followed += 1;
        recovered.restart_trace();
        let second = workload(&recovered, 100 + marks.len() as u64, 2);
        let inner = recovered.crash_test(6, 1, |d, j, m| check(&second, d, j, m).map(drop));
        nested += inner.images_checked;
        match inner.failures.first() {
            Some(f) => Err(format!("second run: {f}")),
            None => Ok(()),
        }
    });
    println!(
        "{} first-run states, {followed} followed by a second run, {nested} second-run states",
        report.images_checked
    );
    assert!(report.failures.is_empty(), "{:?}", report.failures);
    assert!(followed >= 5 && nested > 500, "{followed} followed, {nested} states");
}
