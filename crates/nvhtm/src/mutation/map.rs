//! The strict map's crash workloads and oracle, shared by the map's crash tests
//! (`tests/map_crash.rs`) and the map's mutation suites: random operations (inline and
//! out-of-place records, updates changing shape, removals, compare-and-swap) around a segment
//! split, one or two threads; an image is opened and compared with the model: every completed
//! operation present, the one in flight present or absent, nothing else changed, the heap
//! consistent with no leaked block.
//!
//! ```
//! use nvhtm::mutation::map::{check, record};
//! use nvhtm::sim::CrashTest;
//! let (recording, histories) = record(1, 10, 6, 1);
//! let test = CrashTest { exhaustive_limit: 16, samples: 4, ..CrashTest::default() };
//! test.run(&recording, check(1, &histories)).assert_passed();
//! ```

/// The hash seed of the suites' maps: fixed, so that the same keys fill the same buckets and
/// split at the same insert in every run (a recorded workload is reproducible, and
/// [`keys_before_first_split`] counts for the recorded map too).
pub const HASH_SEED: u64 = 0x5eed_0f7e_574a_5e00;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use super::with_heap;
use crate::sim::{CrashContext, CrashTest, MutationReport, Recording, Sim};
use crate::{Domain, Heap, PoolOptions, StrictMap};

/// What the map holds: key to value.
pub type Model = BTreeMap<Vec<u8>, Vec<u8>>;

/// The pool options of the map workloads (1 MiB, growing up to 4 MiB).
///
/// ```
/// assert_eq!(nvhtm::mutation::map::opts().size, 1 << 20);
/// ```
pub fn opts() -> PoolOptions {
    PoolOptions::layout("map-crash").with_size(1 << 20).with_max_size(4 << 20)
}

/// One map operation.
#[derive(Debug, Clone)]
pub enum Op {
    /// `upsert(key, value)`.
    Upsert(Vec<u8>, Vec<u8>),
    /// `remove(key)`.
    Remove(Vec<u8>),
    /// `compare_and_swap(key, expected, new)`.
    Cas(Vec<u8>, Option<Vec<u8>>, Option<Vec<u8>>),
}

/// A random value: 3 or 8 bytes (inline), 40 or 9000 (a record).
pub fn value(rng: &mut fastrand::Rng, step: u64) -> Vec<u8> {
    match rng.u8(..4) {
        0 => vec![step as u8; 3],
        1 => step.to_le_bytes().to_vec(),
        2 => vec![step as u8; 40],
        _ => vec![step as u8; 9000],
    }
}

/// A random key of `space`: short (inline) or longer than 16 bytes (a record).
pub fn key(rng: &mut fastrand::Rng, space: u64) -> Vec<u8> {
    let k = rng.u64(..space);
    if k % 5 == 0 {
        format!("a key longer than sixteen bytes {k}").into_bytes()
    } else {
        format!("k{k}").into_bytes()
    }
}

/// Applies `op` to the map and the model (asserting a compare-and-swap decides as the model does).
pub fn apply<D: Domain>(map: &StrictMap<D>, model: &mut Model, op: &Op) {
    match op {
        Op::Upsert(k, v) => {
            map.upsert(k, v).unwrap();
            model.insert(k.clone(), v.clone());
        }
        Op::Remove(k) => {
            map.remove(k).unwrap();
            model.remove(k);
        }
        Op::Cas(k, expected, new) => {
            let ok = map.compare_and_swap(k, expected.as_deref(), new.as_deref()).unwrap().is_ok();
            assert_eq!(ok, model.get(k) == expected.as_ref());
            if ok {
                match new {
                    Some(v) => model.insert(k.clone(), v.clone()),
                    None => model.remove(k),
                };
            }
        }
    }
}

/// A random operation on `k`: upsert, remove, or a compare-and-swap expecting the model's value
/// or nothing.
pub fn random_op(rng: &mut fastrand::Rng, model: &Model, k: Vec<u8>, step: u64) -> Op {
    match rng.u8(..6) {
        0..=2 => Op::Upsert(k, value(rng, step)),
        3 => Op::Remove(k),
        _ => {
            let expected = if rng.bool() { model.get(&k).cloned() } else { None };
            let new = if rng.u8(..4) == 0 { None } else { Some(value(rng, step)) };
            Op::Cas(k, expected, new)
        }
    }
}

/// How many of the pre-fill keys (`k0`, `k1`, …) fit before the first split (found on a
/// volatile map): inserting key `k{n}` for this `n` splits.
pub fn keys_before_first_split() -> u64 {
    let map = StrictMap::open_with_seed(Heap::create_in_memory(&opts(), crate::Volatile).unwrap(), HASH_SEED)
        .unwrap();
    let mut i = 0u64;
    loop {
        map.upsert(format!("k{i}").as_bytes(), &i.to_le_bytes()).unwrap();
        if map.shape().unwrap().0 > 1 {
            return i;
        }
        i += 1;
    }
}

/// Pre-fills `prefill` keys (not recorded; `u64::MAX`: as many as fit just before the first
/// split), then records `ops` random operations; returns the
/// recording and the model after each operation (index 0: after the pre-fill).
pub fn record(seed: u64, prefill: u64, ops: usize, threads: usize) -> (Recording, Vec<Vec<Model>>) {
    record_with(Sim::new(), seed, prefill, ops, threads)
}

/// [`record`] with a given simulator (e.g. [`Sim::file_model`]).
pub fn record_with(
    sim: Sim,
    seed: u64,
    prefill: u64,
    ops: usize,
    threads: usize,
) -> (Recording, Vec<Vec<Model>>) {
    let map =
        StrictMap::open_with_seed(Heap::create_in_memory(&opts(), sim.clone()).unwrap(), HASH_SEED).unwrap();
    let mut base = Model::new();
    let prefill = if prefill == u64::MAX { keys_before_first_split() - 5 } else { prefill };
    for i in 0..prefill {
        let k = format!("k{i}").into_bytes();
        map.upsert(&k, &i.to_le_bytes()).unwrap();
        base.insert(k, i.to_le_bytes().to_vec());
    }
    map.heap().pool().fence().unwrap();
    sim.restart_recording().unwrap();
    let segments_before = map.shape().unwrap().0;
    let segments_before = &segments_before;
    let histories: Vec<Vec<Model>> = std::thread::scope(|s| {
        let workers: Vec<_> = (0..threads)
            .map(|t| {
                let (map, sim, base) = (&map, &sim, &base);
                let segments_before = *segments_before;
                s.spawn(move || {
                    let mut rng = fastrand::Rng::with_seed(seed * 100 + t as u64);
                    // Threads touch disjoint keys: thread t uses keys with k % threads == t.
                    let mut model: Model = base.clone();
                    let mut history = vec![model.clone()];
                    for step in 0..ops as u64 {
                        let mut k = key(&mut rng, prefill + 400);
                        while threads > 1 && k.last().is_some_and(|b| (*b as usize) % threads != t) {
                            k = key(&mut rng, prefill + 400);
                        }
                        let op = random_op(&mut rng, &model, k, step);
                        apply(map, &mut model, &op);
                        history.push(model.clone());
                        sim.mark((t as u64) << 32 | step);
                    }
                    // Then fresh keys until a segment splits (when the map was filled near it), and
                    // a few more, which reuse slots the split cleared.
                    let mut step = ops as u64;
                    let mut after_split = 0;
                    while prefill >= 1000 && t == 0 && after_split < 20 {
                        apply(
                            map,
                            &mut model,
                            &Op::Upsert(format!("split-{step}-0").into_bytes(), vec![1; 8]),
                        );
                        history.push(model.clone());
                        sim.mark(step);
                        step += 1;
                        if map.shape().unwrap().0 > segments_before {
                            after_split += 1;
                        }
                    }
                    history
                })
            })
            .collect();
        workers.into_iter().map(|w| w.join().unwrap()).collect()
    });
    let segments_after = map.shape().unwrap().0;
    assert!(
        prefill < 1000 || segments_after > *segments_before,
        "the recorded operations must split a segment"
    );
    (sim.recording(), histories)
}

/// For each thread, its keys must equal its model after its completed operations or after
/// the one in flight; the heap must hold exactly the map's blocks.
pub fn check(
    threads: usize,
    histories: &[Vec<Model>],
) -> impl Fn(&Sim, &[u8], &CrashContext) -> Result<(), String> + '_ {
    move |sim, image, ctx| {
        with_heap(sim, image, ctx, &opts(), |heap| {
            let map = StrictMap::open(heap).map_err(|e| e.to_string())?;
            let done = |t: usize| ctx.marks.iter().filter(|&&m| (m >> 32) as usize == t).count();
            check_recovered(&map, threads, histories, done).map(drop)
        })
    }
}

/// Compares a recovered map with the models allowed for each thread (`done(t)`: how many of
/// thread `t`'s operations completed), and the heap with the map. Returns what the map holds.
pub fn check_recovered<D: Domain>(
    map: &StrictMap<D>,
    threads: usize,
    histories: &[Vec<Model>],
    done: impl Fn(usize) -> usize,
) -> Result<Model, String> {
    let mut found = Model::new();
    map.for_each(|k, v| {
        found.insert(k.to_vec(), v.to_vec());
        true
    })
    .map_err(|e| e.to_string())?;
    // Thread t's part of a model, compared in place (no copies: this runs for every image).
    fn part(m: &Model, t: usize, threads: usize) -> impl Iterator<Item = (&Vec<u8>, &Vec<u8>)> {
        m.iter().filter(move |(k, _)| threads == 1 || (*k.last().unwrap() as usize) % threads == t)
    }
    let mine = |t: usize, m| part(m, t, threads);
    for (t, history) in histories.iter().enumerate() {
        let done = done(t);
        let allowed = [&history[done], &history[(done + 1).min(history.len() - 1)]];
        if !allowed.iter().any(|m| mine(t, m).eq(mine(t, &found))) {
            let diff: Vec<_> =
                mine(t, &found).filter(|(k, _)| !allowed[0].contains_key(*k)).take(3).collect();
            return Err(format!(
                "thread {t}: after {done} operations the map has {} keys (expected {} or {}); e.g. {diff:?}",
                mine(t, &found).count(),
                mine(t, allowed[0]).count(),
                mine(t, allowed[1]).count()
            ));
        }
    }
    // Every key is found by a lookup too (not only by the scan): fingerprints and reaches
    // must be durable with their keys, including keys a displacement moved.
    for (k, v) in &found {
        if map.get(k).map_err(|e| e.to_string())?.as_ref() != Some(v) {
            return Err(format!("{k:?} is scanned but not found by get"));
        }
    }
    let report = map.heap().check(&mut |_, _| {});
    if !report.is_consistent() {
        return Err(format!("heap: {:?}", report.problems));
    }
    let stats = map.stats().map_err(|e| e.to_string())?;
    if stats.entries != found.len() as u64 {
        return Err(format!("len {} but the scan finds {}", stats.entries, found.len()));
    }
    let records = found.iter().filter(|(k, v)| k.len() > 16 || v.len() > 8).count() as u64;
    let expected = 2 + stats.segments + records; // map root, directory, segments, records
    let allocated = report.small_blocks + report.large_blocks;
    if allocated != expected {
        return Err(format!("{allocated} blocks allocated, the map holds {expected}: a leak"));
    }
    Ok(found)
}

/// The `map-single` suite: 40 random single-threaded operations (seed 5) across the first
/// split (each check scans a map of some 1,700 keys: the budget is small).
pub(super) fn single_suite() -> MutationReport {
    let (recording, histories) = record(5, u64::MAX, 40, 1);
    let test = CrashTest { exhaustive_limit: 32, samples: 8, ..CrashTest::default() };
    test.mutation_run(&recording, check(1, &histories))
}

/// The annotation naming the split's clearing fence in `map/split.rs`.
const SPLIT_CLEARING: &str = "// site: split-clearing";

/// The line of `map/split.rs` annotated `tag` (the source is embedded at build time).
fn annotated_line(tag: &str) -> u32 {
    let source = include_str!("../map/split.rs");
    let line =
        source.lines().position(|l| l.contains(tag)).unwrap_or_else(|| panic!("no `{tag}` in map/split.rs"));
    line as u32 + 1
}

/// The map's hash of a key under the suites' fixed seed (the map's `Hash::of`).
fn hash(key: &[u8]) -> u64 {
    xxhash_rust::xxh3::xxh3_64_with_seed(key, HASH_SEED)
}

/// The home bucket of a hash (the map's `Hash::home`, over its 255 buckets).
fn home(hash: u64) -> u64 {
    (u64::from(hash as u32) * 255) >> 32
}

/// Records a split and another thread reusing the slots it cleared, deterministically: the
/// map is filled until the next insert splits its segment; thread A inserts a key homed in the
/// full window and owned, after the split, by the new segment (top hash bit 1); at A's first
/// fence after the split's clearing fence (A then holds the new segment's lock only), a hook
/// runs thread B to its end: three inserts homed in the same window of the old segment, where
/// the only free slots are the ones the split cleared. B's fences do not order A's flushes:
/// without A's clearing fence, B's new slot contents can persist under the stale occupancy
/// bit, before B's commit. Keys ending in `0` are A's, in `1` B's (for [`check`] with two
/// threads); returns the recording and each thread's models.
///
/// ```
/// use nvhtm::mutation::map::{check, record_split_two_threads};
/// use nvhtm::sim::CrashTest;
/// let (recording, histories) = record_split_two_threads();
/// assert_eq!(histories[1].len(), 4);
/// let test = CrashTest { exhaustive_limit: 16, samples: 4, ..CrashTest::default() };
/// test.run(&recording, check(2, &histories)).assert_passed();
/// ```
pub fn record_split_two_threads() -> (Recording, Vec<Vec<Model>>) {
    let Split { sim, map, base, a_key, b_keys } = split_setup();
    let map = Arc::new(map);
    let b_value = vec![0xb0u8; 40];
    let clearing = annotated_line(SPLIT_CLEARING);
    let a_thread = std::thread::current().id();
    // 0: before the split's clearing fence, 1: after it, 2: B has run.
    let stage = Arc::new(Mutex::new(0u8));
    {
        let (map, sim, stage, keys, value) =
            (map.clone(), sim.clone(), stage.clone(), b_keys.clone(), b_value.clone());
        sim.clone().before_fence(move |site| {
            if std::thread::current().id() != a_thread {
                return;
            }
            let mut at = stage.lock().unwrap_or_else(|e| e.into_inner());
            match *at {
                0 if site.file.ends_with("map/split.rs") && site.line == clearing => *at = 1,
                1 => {
                    *at = 2;
                    drop(at);
                    let (map, sim, keys, value) = (map.clone(), sim.clone(), keys.clone(), value.clone());
                    std::thread::spawn(move || {
                        for (i, k) in keys.iter().enumerate() {
                            assert!(map.insert(k, &value).unwrap());
                            sim.mark(1 << 32 | i as u64);
                        }
                    })
                    .join()
                    .expect("thread B panicked");
                }
                _ => {}
            }
        });
    }
    assert!(map.insert(&a_key, b"a-value").unwrap());
    sim.mark(0);
    sim.clear_fence_hook();
    assert_eq!(*stage.lock().unwrap(), 2, "thread B did not run after the split's clearing");
    assert_eq!(map.shape().unwrap().0, 2, "A's insert split the segment once");
    let mut a_model = base.clone();
    a_model.insert(a_key, b"a-value".to_vec());
    let mut b_history = vec![base.clone()];
    for k in b_keys {
        let mut next = b_history.last().unwrap().clone();
        next.insert(k, b_value.clone());
        b_history.push(next);
    }
    (sim.recording(), vec![vec![base, a_model], b_history])
}

/// A map filled until its next insert splits, with the recording restarted: the key whose
/// insert splits (`a_key`, homed in the full window, owned after the split by the new segment)
/// and three keys homed in the same window and staying in the old segment (`b_keys`), where
/// after the split the only free slots are the ones it cleared.
struct Split {
    sim: Sim,
    map: StrictMap<Sim>,
    base: Model,
    a_key: Vec<u8>,
    b_keys: Vec<Vec<u8>>,
}

fn split_setup() -> Split {
    let n = keys_before_first_split();
    let sim = Sim::new();
    let map =
        StrictMap::open_with_seed(Heap::create_in_memory(&opts(), sim.clone()).unwrap(), HASH_SEED).unwrap();
    let mut base = Model::new();
    for i in 0..n {
        let k = format!("k{i}").into_bytes();
        map.upsert(&k, &i.to_le_bytes()).unwrap();
        base.insert(k, i.to_le_bytes().to_vec());
    }
    map.heap().pool().fence().unwrap();
    sim.restart_recording().unwrap();
    let full = home(hash(format!("k{n}").as_bytes()));
    let a_key = (0u64..)
        .map(|j| format!("a{j}-0").into_bytes())
        .find(|k| home(hash(k)) == full && hash(k) >> 63 == 1)
        .unwrap();
    let b_keys: Vec<Vec<u8>> = (0u64..)
        .map(|j| format!("b{j}-1").into_bytes())
        .filter(|k| home(hash(k)) == full && hash(k) >> 63 == 0)
        .take(3)
        .collect();
    Split { sim, map, base, a_key, b_keys }
}

/// The check of a multi-run map suite: the recovered map is compared with the model of the run
/// that crashed (`parent`, or the first run's `first`; one thread), and, when followed, `next`
/// runs the next workload on it (marking each completed operation) and returns its models.
pub fn multi_run_check<'a>(
    first: Vec<Model>,
    next: impl Fn(&Sim, &StrictMap<Sim>, Model, u32) -> Vec<Model> + 'a,
) -> MultiRunCheck<'a> {
    Box::new(move |sim, image, ctx, parent| {
        with_heap(sim, image, ctx, &opts(), |heap| {
            let map = StrictMap::open(heap).map_err(|e| e.to_string())?;
            let run = parent.unwrap_or(&first);
            let found = check_recovered(&map, 1, std::slice::from_ref(run), |_| ctx.run_marks.len())
                .map_err(|e| format!("run {}: {e}", ctx.depth + 1))?;
            Ok(if ctx.followed { next(sim, &map, found, ctx.depth) } else { Vec::new() })
        })
    })
}

/// A check of a multi-run map suite: the model it gets is the history of the run that crashed,
/// the one it returns the history of the run it starts.
pub type MultiRunCheck<'a> =
    Box<dyn Fn(&Sim, &[u8], &CrashContext, Option<&Vec<Model>>) -> Result<Vec<Model>, String> + 'a>;

/// Records the insert that splits a full segment (one mark), for the `map-two-runs` suite; returns the
/// recording, the models before and after, and the keys of the second run.
///
/// ```
/// let (recording, models, second) = nvhtm::mutation::map::record_split();
/// assert_eq!((models.len(), second.len()), (2, 3));
/// assert!(recording.fences() > 2);
/// ```
pub fn record_split() -> (Recording, Vec<Model>, Vec<Vec<u8>>) {
    let Split { sim, map, base, a_key, b_keys } = split_setup();
    assert!(map.insert(&a_key, b"a-value").unwrap());
    sim.mark(0);
    assert_eq!(map.shape().unwrap().0, 2, "the insert split the segment");
    let mut after = base.clone();
    after.insert(a_key, b"a-value".to_vec());
    (sim.recording(), vec![base, after], b_keys)
}

/// The `map-two-runs` suite: the insert that splits a segment, crashed everywhere — between the
/// split's commit and its clearing too — and each image recovered; then a second run inserts
/// three keys homed in the split's full window of the old segment, whose only free slots after
/// the split are stale copies: an insert there clears them and fences before reusing a slot,
/// else a crash can show its new bytes under the stale occupancy bit. Each second run is
/// crashed everywhere too.
pub(super) fn two_runs_suite() -> MutationReport {
    let (recording, models, second) = record_split();
    let value = vec![0xb0u8; 40];
    let next = move |sim: &Sim, map: &StrictMap<Sim>, start: Model, _: u32| {
        let mut history = vec![start];
        for (i, k) in second.iter().enumerate() {
            let mut model = history.last().unwrap().clone();
            apply(map, &mut model, &Op::Upsert(k.clone(), value.clone()));
            history.push(model);
            sim.mark(i as u64);
        }
        history
    };
    let test = CrashTest {
        recovery_depth: 1,
        follow_one_in: 8,
        exhaustive_limit: 32,
        samples: 8,
        ..CrashTest::default()
    };
    test.mutation_run_with(&recording, multi_run_check(models, next))
}

/// The `map-split-two-threads` suite: [`record_split_two_threads`].
pub(super) fn split_two_threads_suite() -> MutationReport {
    let (recording, histories) = record_split_two_threads();
    let test = CrashTest { exhaustive_limit: 64, samples: 12, ..CrashTest::default() };
    test.mutation_run(&recording, check(2, &histories))
}
