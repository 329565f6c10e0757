//! The hybrid map's crash workloads and its oracle (the strict map's: durable linearizability),
//! shared by `tests/hybrid_crash.rs` and the hybrid mutation suites: random upserts, inserts,
//! removals and compare-and-swaps on a map whose log has 512-byte segments, so that segments
//! are started and cleaned often. An image is recovered (the log replayed into the index) and
//! must hold exactly the model after the operations that completed, or after the one in flight
//! too; lookups agree with the scan; the index is what a replay gives; and the heap holds the
//! log's segments and the root and nothing else.
//!
//! ```
//! use nvhtm::mutation::hybrid::{check, record};
//! use nvhtm::sim::{CrashTest, Sim};
//! let (recording, history) = record(Sim::new(), 1, 10, 12);
//! let test = CrashTest { exhaustive_limit: 16, samples: 4, ..CrashTest::default() };
//! test.run(&recording, check(&history)).assert_passed();
//! ```

use super::map::Model;
use super::with_heap;
use crate::hybrid::HybridMap;
use crate::log::LogOptions;
use crate::sim::{CrashContext, CrashTest, MutationReport, Recording, Sim};
use crate::{Domain, Heap, PoolOptions};

/// A mark: an operation completed; the low bits count the operations done.
const OP: u64 = 1 << 62;

/// The segment size of the workloads' logs.
pub const SEGMENT_SIZE: u64 = 512;

/// The pool options of the hybrid workloads (2 MiB, growing up to 16 MiB).
///
/// ```
/// assert_eq!(nvhtm::mutation::hybrid::opts().size, 2 << 20);
/// ```
pub fn opts() -> PoolOptions {
    PoolOptions::layout("hybrid-crash").with_size(2 << 20).with_max_size(16 << 20)
}

fn value(rng: &mut fastrand::Rng, step: u64) -> Vec<u8> {
    vec![step as u8; [0, 8, 30, 100][rng.usize(..4)]]
}

/// Runs `n` random operations on `map` and `model`, marking each completion; returns the model
/// after each operation (index 0: the start).
pub fn run_ops<D: Domain>(
    sim: Option<&Sim>,
    map: &HybridMap<D>,
    start: Model,
    rng: &mut fastrand::Rng,
    n: u64,
    space: u64,
) -> Vec<Model> {
    let mut model = start;
    let mut history = vec![model.clone()];
    for step in 0..n {
        let k = format!("k{}", rng.u64(..space)).into_bytes();
        match rng.u8(..8) {
            0..=3 => {
                let v = value(rng, step);
                assert_eq!(map.upsert(&k, &v).unwrap(), model.insert(k, v).is_none());
            }
            4 => {
                let v = value(rng, step);
                assert_eq!(map.insert(&k, &v).unwrap(), !model.contains_key(&k));
                model.entry(k).or_insert(v);
            }
            5 | 6 => assert_eq!(map.remove(&k).unwrap(), model.remove(&k).is_some()),
            _ => {
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
        }
        history.push(model.clone());
        if let Some(sim) = sim {
            sim.mark(OP | (step + 1));
        }
    }
    history
}

/// Creates a map, pre-fills `prefill` keys (not recorded), then records `ops` random operations
/// on keys `k0..k(prefill + 4)` (overwrites enough to clean); returns the recording and the model after each operation.
pub fn record(sim: Sim, seed: u64, prefill: u64, ops: u64) -> (Recording, Vec<Model>) {
    let heap = Heap::create_in_memory(&opts(), sim.clone()).unwrap();
    let map = HybridMap::open_with(heap, LogOptions { segment_size: SEGMENT_SIZE }).unwrap();
    let mut base = Model::new();
    for i in 0..prefill {
        let k = format!("k{i}").into_bytes();
        map.upsert(&k, &i.to_le_bytes()).unwrap();
        base.insert(k, i.to_le_bytes().to_vec());
    }
    sim.restart_recording().unwrap();
    let mut rng = fastrand::Rng::with_seed(seed);
    let history = run_ops(Some(&sim), &map, base, &mut rng, ops, prefill + 4);
    (sim.recording(), history)
}

/// Checks a recovered map against the history of the run that crashed; returns what it holds.
pub fn check_recovered<D: Domain>(
    map: &HybridMap<D>,
    history: &[Model],
    marks: &[u64],
) -> Result<Model, String> {
    let found: Model = map.entries().map_err(|e| e.to_string())?.into_iter().collect();
    let done = marks.iter().rev().find(|&&m| m & OP != 0).map_or(0, |m| (m & !OP) as usize);
    let allowed = &history[done..(done + 2).min(history.len())];
    if !allowed.contains(&found) {
        let near = &history[done];
        let diff: Vec<_> = found.iter().filter(|(k, v)| near.get(*k) != Some(v)).take(3).collect();
        return Err(format!(
            "the map ({} keys) is neither the model after {done} operations nor after {} ({} keys); e.g. {diff:?}",
            found.len(),
            done + 1,
            near.len()
        ));
    }
    for (k, v) in &found {
        if map.get(k).map_err(|e| e.to_string())?.as_ref() != Some(v) {
            return Err(format!("{k:?} is scanned but not found by get"));
        }
    }
    let problems = map.check().map_err(|e| e.to_string())?;
    if !problems.is_empty() {
        return Err(format!("check: {problems:?}"));
    }
    super::no_leak(map.heap(), map.stats().map_err(|e| e.to_string())?.segments)?;
    Ok(found)
}

/// The oracle of a single-run workload.
pub fn check(history: &[Model]) -> impl Fn(&Sim, &[u8], &CrashContext) -> Result<(), String> + '_ {
    move |sim, image, ctx| {
        with_heap(sim, image, ctx, &opts(), |heap| {
            let map = HybridMap::open(heap).map_err(|e| e.to_string())?;
            check_recovered(&map, history, &ctx.marks).map(drop)
        })
    }
}

/// The check of a multi-run suite: the recovered map against the run that crashed (`parent`,
/// or `first`); when followed, `more` operations run on it and their history is returned.
pub fn multi_run_check(first: Vec<Model>, more: u64) -> super::map::MultiRunCheck<'static> {
    Box::new(move |sim, image, ctx, parent| {
        with_heap(sim, image, ctx, &opts(), |heap| {
            let map = HybridMap::open(heap).map_err(|e| e.to_string())?;
            let run = parent.unwrap_or(&first);
            let found = check_recovered(&map, run, &ctx.run_marks)
                .map_err(|e| format!("run {}: {e}", ctx.depth + 1))?;
            Ok(if ctx.followed {
                let mut rng = fastrand::Rng::with_seed(800 + u64::from(ctx.depth));
                let space = found.len() as u64 + 4;
                run_ops(Some(sim), &map, found, &mut rng, more, space)
            } else {
                Vec::new()
            })
        })
    })
}

/// The `hybrid-single` suite: random operations with segment switches and cleaning.
pub(super) fn single_suite() -> MutationReport {
    let (recording, history) = record(Sim::new(), 5, 8, 40);
    let test = CrashTest { exhaustive_limit: 32, samples: 8, ..CrashTest::default() };
    test.mutation_run(&recording, check(&history))
}

/// The `hybrid-two-runs` suite: crash, recover (replay), work on, crash again.
pub(super) fn two_runs_suite() -> MutationReport {
    let (recording, history) = record(Sim::new(), 6, 8, 24);
    let test = CrashTest {
        recovery_depth: 1,
        follow_one_in: 8,
        exhaustive_limit: 8,
        samples: 4,
        ..CrashTest::default()
    };
    test.mutation_run_with(&recording, multi_run_check(history, 8))
}
