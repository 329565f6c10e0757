//! The periodic map's crash workloads and its buffered-durable-linearizability oracle, shared
//! by `tests/periodic_crash.rs` and the periodic mutation suites: random upserts, removals,
//! compare-and-swaps and multi-key transactions across a segment split, with epoch advances
//! and syncs between them. An image is recovered and must equal the model after *some prefix*
//! of the history that includes every operation before the last completed advance (an
//! advance makes everything before it durable in a single-threaded workload) — transactions
//! all or nothing — with lookups agreeing with the scan, every block named once and in use,
//! and no arena slot or heap block leaked.
//!
//! ```
//! use nvhtm::mutation::periodic::{check, record};
//! use nvhtm::sim::{CrashTest, Sim};
//! let (recording, history) = record(Sim::new(), 1, 10, 8);
//! let test = CrashTest { exhaustive_limit: 16, samples: 4, ..CrashTest::default() };
//! test.run(&recording, check(&history)).assert_passed();
//! ```

use super::with_heap;
use crate::periodic::{PeriodicMap, PeriodicOptions, Transaction};
use crate::sim::{CrashContext, CrashTest, MutationReport, Recording, Sim};
use crate::{Domain, Heap, PoolOptions};

pub use super::map::Model;

/// The hash seed of the suites' maps (fixed: the same keys split at the same operation).
pub const HASH_SEED: u64 = 0xda11_5eed;

/// A mark: an operation completed; the low bits count the operations done.
const OP: u64 = 1 << 62;
/// A mark: an advance or sync returned; the low bits count the operations done before it.
const DURABLE: u64 = 1 << 61;

/// The pool options of the periodic workloads (2 MiB, growing up to 16 MiB).
///
/// ```
/// assert_eq!(nvhtm::mutation::periodic::opts().size, 2 << 20);
/// ```
pub fn opts() -> PoolOptions {
    PoolOptions::layout("periodic-crash").with_size(2 << 20).with_max_size(16 << 20)
}

/// The options the workloads and checks open their maps with: no persister thread, the scan
/// before `open` returns, the fixed seed.
pub fn map_opts() -> PeriodicOptions {
    PeriodicOptions::manual().with_seed(HASH_SEED)
}

/// A random key of `space` (some longer than a cache line).
fn key(rng: &mut fastrand::Rng, space: u64) -> Vec<u8> {
    let k = rng.u64(..space);
    if k % 7 == 0 {
        format!("a key longer than a cache line, which is sixty-four bytes: number {k}").into_bytes()
    } else {
        format!("k{k}").into_bytes()
    }
}

fn value(rng: &mut fastrand::Rng, step: u64) -> Vec<u8> {
    vec![step as u8; [1, 8, 30, 200][rng.usize(..4)]]
}

/// Runs `n` random operations on `map` and `model` (epoch advances and syncs among them,
/// marked); returns the model after each operation (index 0: the start). Keys come from
/// `space`; `fresh` of every 8 operations upsert a new key (to reach a split).
pub fn run_ops<D: Domain>(
    sim: Option<&Sim>,
    map: &PeriodicMap<D>,
    start: Model,
    rng: &mut fastrand::Rng,
    n: u64,
    space: u64,
) -> Vec<Model> {
    let mut model = start;
    let mut history = vec![model.clone()];
    let mark = |m: u64| {
        if let Some(sim) = sim {
            sim.mark(m);
        }
    };
    for step in 0..n {
        let k = key(rng, space);
        match rng.u8(..10) {
            0..=3 => {
                let v = value(rng, step);
                map.upsert(&k, &v).unwrap();
                model.insert(k, v);
            }
            4 => {
                let k = format!("fresh{step}-{}", rng.u32(..)).into_bytes();
                map.upsert(&k, b"new").unwrap();
                model.insert(k, b"new".to_vec());
            }
            5 => {
                map.remove(&k).unwrap();
                model.remove(&k);
            }
            6 => {
                let expected = if rng.bool() { model.get(&k).cloned() } else { None };
                let new = rng.bool().then(|| value(rng, step));
                let ok = map.compare_and_swap(&k, expected.as_deref(), new.as_deref()).unwrap().is_ok();
                assert_eq!(ok, model.get(&k) == expected.as_ref());
                if ok {
                    match new {
                        Some(v) => model.insert(k, v),
                        None => model.remove(&k),
                    };
                }
            }
            _ => {
                // A transaction: k2 takes k1's value (or "none"), k3 goes, k1 gets a new one.
                let (k2, k3) = (key(rng, space), key(rng, space));
                let v = value(rng, step);
                map.transaction(|t: &mut Transaction<'_, D>| {
                    let old = t.get(&k)?.unwrap_or_else(|| b"none".to_vec());
                    t.upsert(&k2, &old);
                    t.remove(&k3);
                    t.upsert(&k, &v);
                    Ok(())
                })
                .unwrap();
                let old = model.get(&k).cloned().unwrap_or_else(|| b"none".to_vec());
                model.insert(k2, old);
                model.remove(&k3);
                model.insert(k, v);
            }
        }
        history.push(model.clone());
        mark(OP | (step + 1));
        match rng.u8(..8) {
            0 => {
                map.advance().unwrap();
                mark(DURABLE | (step + 1));
            }
            1 => {
                map.sync().unwrap();
                mark(DURABLE | (step + 1));
            }
            _ => {}
        }
    }
    history
}

/// Creates a map, pre-fills `prefill` keys (not recorded), syncs, then records `ops` random
/// operations; returns the recording and the model after each operation.
pub fn record(sim: Sim, seed: u64, prefill: u64, ops: u64) -> (Recording, Vec<Model>) {
    let heap = Heap::create_in_memory(&opts(), sim.clone()).unwrap();
    let map = PeriodicMap::open(heap, map_opts()).unwrap();
    let mut base = Model::new();
    for i in 0..prefill {
        let k = format!("k{i}").into_bytes();
        map.upsert(&k, &i.to_le_bytes()).unwrap();
        base.insert(k, i.to_le_bytes().to_vec());
    }
    map.sync().unwrap();
    sim.restart_recording().unwrap();
    let mut rng = fastrand::Rng::with_seed(seed);
    let history = run_ops(Some(&sim), &map, base, &mut rng, ops, prefill + 60);
    (sim.recording(), history)
}

/// The prefixes of `history` a crash after `marks` may leave: from the operations before the
/// last completed advance to one past the last completed operation.
fn allowed(marks: &[u64], len: usize) -> (usize, usize) {
    let last = |kind: u64| {
        marks.iter().rev().find(|&&m| m & kind != 0).map_or(0, |m| (m & !(OP | DURABLE)) as usize)
    };
    (last(DURABLE), (last(OP) + 1).min(len - 1))
}

/// Checks a recovered map against the history of the run that crashed; returns what it holds.
pub fn check_recovered<D: Domain>(
    map: &PeriodicMap<D>,
    history: &[Model],
    marks: &[u64],
) -> Result<Model, String> {
    let found: Model = map.entries().map_err(|e| e.to_string())?.into_iter().collect();
    let (floor, ceiling) = allowed(marks, history.len());
    if !(floor..=ceiling).any(|p| history[p] == found) {
        let near = &history[floor];
        let diff: Vec<_> = found.iter().filter(|(k, v)| near.get(*k) != Some(v)).take(3).collect();
        return Err(format!(
            "the map ({} keys) is no prefix of {floor}..={ceiling} operations (the first has {} keys); e.g. {diff:?}",
            found.len(),
            near.len()
        ));
    }
    for (k, v) in &found {
        if map.get(k).map_err(|e| e.to_string())?.as_ref() != Some(v) {
            return Err(format!("{k:?} is scanned but not found by get"));
        }
    }
    let report = map.check().map_err(|e| e.to_string())?;
    if !report.problems.is_empty() {
        return Err(format!("check: {:?}", report.problems));
    }
    Ok(found)
}

/// The oracle of a single-run workload.
pub fn check(history: &[Model]) -> impl Fn(&Sim, &[u8], &CrashContext) -> Result<(), String> + '_ {
    move |sim, image, ctx| {
        with_heap(sim, image, ctx, &opts(), |heap| {
            let map = PeriodicMap::open(heap, map_opts()).map_err(|e| e.to_string())?;
            check_recovered(&map, history, &ctx.marks).map(drop)
        })
    }
}

/// The check of a multi-run suite: the recovered map against the run that crashed (`parent`,
/// or the first run's `first`); when followed, `more` operations run on it (seeded by the
/// depth) and their history is returned.
pub fn multi_run_check(first: Vec<Model>, more: u64) -> super::map::MultiRunCheck<'static> {
    Box::new(move |sim, image, ctx, parent| {
        with_heap(sim, image, ctx, &opts(), |heap| {
            let map = PeriodicMap::open(heap, map_opts()).map_err(|e| e.to_string())?;
            let run = parent.unwrap_or(&first);
            let found = check_recovered(&map, run, &ctx.run_marks)
                .map_err(|e| format!("run {}: {e}", ctx.depth + 1))?;
            Ok(if ctx.followed {
                let mut rng = fastrand::Rng::with_seed(900 + u64::from(ctx.depth));
                let space = found.len() as u64 + 40;
                run_ops(Some(sim), &map, found, &mut rng, more, space)
            } else {
                Vec::new()
            })
        })
    })
}

/// The keys a fresh map takes before its first split, to pre-fill near it.
pub fn keys_before_first_split() -> u64 {
    let heap = Heap::create_in_memory(&opts(), crate::Volatile).unwrap();
    let map = PeriodicMap::open(heap, map_opts()).unwrap();
    (0u64..)
        .find(|i| {
            map.upsert(format!("k{i}").as_bytes(), &i.to_le_bytes()).unwrap();
            map.stats().unwrap().segments > 1
        })
        .unwrap()
}

/// The `periodic-single` suite: random operations and transactions across the first split,
/// crashed at every fence of their advances and syncs and of the split's commit.
pub(super) fn single_suite() -> MutationReport {
    let (recording, history) = record(Sim::new(), 5, keys_before_first_split() - 10, 40);
    let test = CrashTest { exhaustive_limit: 32, samples: 8, ..CrashTest::default() };
    test.mutation_run(&recording, check(&history))
}

/// The `periodic-two-runs` suite: crash, recover (recording failed epochs), work on, crash.
pub(super) fn two_runs_suite() -> MutationReport {
    let (recording, history) = record(Sim::new(), 6, 30, 20);
    let test = CrashTest {
        recovery_depth: 1,
        follow_one_in: 8,
        exhaustive_limit: 16,
        samples: 6,
        ..CrashTest::default()
    };
    test.mutation_run_with(&recording, multi_run_check(history, 12))
}
