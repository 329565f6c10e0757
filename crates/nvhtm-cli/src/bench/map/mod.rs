//! `nvhtm bench map`: the strict map against the hash map a user would pick, and against itself
//! on the `Volatile` domain, with every key, value and lookup sequence built before timing.
//!
//! Baselines (hashbrown with its default hasher, foldhash):
//! - 8-byte keys and values: `hashbrown::HashMap<u64, u64>`, the obvious choice.
//! - 16-byte keys and 100-byte values: `hashbrown::HashMap<[u8; 16], Box<[u8]>>`: a fixed-size
//!   key is stored inline, and a 100-byte blob is what a user would box (an inline `[u8; 100]`
//!   value would make every probe and every table growth move 116-byte entries, and the map
//!   under test stores such values out of line too). The boxes are built before timing and
//!   moved in; values replaced or removed are moved out into a vector reserved before timing,
//!   so hashbrown's timed loops neither allocate nor free (which flatters the baseline: a user
//!   pays for those boxes).
//!
//! Both baselines are created `with_capacity(keys)`, so their inserts never grow the table
//! (growth would be an allocation inside the timed loop). The nvhtm map grows by splitting
//! segments inside its pool, which is not a Rust-heap allocation; whatever it does allocate on
//! the heap on the timed threads is counted and reported, not hidden (a background thread's
//! allocations — the periodic map's persister — are not the loop's and are not counted).

use std::collections::BTreeMap;
use std::panic::AssertUnwindSafe;
use std::path::Path;
use std::sync::Barrier;
use std::time::Instant;

use nvhtm::persist::{global_stats, thread_stats, PersistStats};
use nvhtm::{Cpu, Heap, Volatile};
use serde::Serialize;

mod engines;
mod open;

use engines::*;

use super::zipf::Zipf;
use super::{alloc, print_table, write_json, Machine, Scratch};
use crate::commands::CommandResult;

/// The operations, in the order each engine runs them on one map.
const OPS: [&str; 7] = [
    "insert",
    "get hit (uniform)",
    "get hit (zipf)",
    "get miss (uniform)",
    "get miss (zipf)",
    "update",
    "delete",
];

/// YCSB's skew.
const THETA: f64 = 0.99;

const HASHBROWN: &str = "hashbrown";
const VOLATILE: &str = "nvhtm (volatile)";
const CPU: &str = "nvhtm (cpu)";
const PERIODIC: &str = "nvhtm periodic (cpu)";
const HYBRID: &str = "nvhtm hybrid (cpu)";

/// Key and value sizes measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Shape {
    /// 8-byte keys, 8-byte values.
    Small,
    /// 16-byte keys, 100-byte values.
    Blob,
}

impl Shape {
    pub fn parse(s: &str) -> Result<Shape, String> {
        match s {
            "8/8" => Ok(Shape::Small),
            "16/100" => Ok(Shape::Blob),
            _ => Err(format!("unknown shape {s:?} (expected 8/8 or 16/100)")),
        }
    }

    fn sizes(self) -> (usize, usize) {
        match self {
            Shape::Small => (8, 8),
            Shape::Blob => (16, 100),
        }
    }

    fn baseline(self) -> &'static str {
        match self {
            Shape::Small => "hashbrown::HashMap<u64, u64>",
            Shape::Blob => "hashbrown::HashMap<[u8; 16], Box<[u8]>>",
        }
    }

    /// A generous estimate of pool bytes per key, to check the pool directory's free space.
    fn pool_bytes_per_key(self) -> u64 {
        match self {
            Shape::Small => 128,
            Shape::Blob => 512,
        }
    }
}

/// One timed loop (or several threads' loops, timed together).
#[derive(Debug, Clone, Copy)]
struct Measured {
    ops: u64,
    secs: f64,
    stats: PersistStats,
    allocations: u64,
    frees: u64,
}

impl Measured {
    fn mops(&self) -> f64 {
        self.ops as f64 / self.secs / 1e6
    }
}

/// Runs each closure on its own thread, all started together, and times them from the start to
/// the last one's end. Threads are spawned and their persistence counters registered before the
/// clock and the allocation counts are read, so only the closures' own work is counted.
fn timed<F: FnOnce() + Send>(ops: u64, work: Vec<F>) -> Measured {
    let barriers: [Barrier; 4] = std::array::from_fn(|_| Barrier::new(work.len() + 1));
    std::thread::scope(|s| {
        for f in work {
            let b = &barriers;
            s.spawn(move || {
                let _ = thread_stats(); // registers this thread's counter block (an allocation)
                alloc::count_this_thread(true);
                b[0].wait();
                b[1].wait();
                let outcome = std::panic::catch_unwind(AssertUnwindSafe(f));
                b[2].wait();
                b[3].wait();
                if let Err(panic) = outcome {
                    std::panic::resume_unwind(panic);
                }
            });
        }
        barriers[0].wait();
        let stats = global_stats();
        let (a0, f0) = alloc::counts();
        barriers[1].wait();
        let start = Instant::now();
        barriers[2].wait();
        let secs = start.elapsed().as_secs_f64();
        let (a1, f1) = alloc::counts();
        let stats = global_stats() - stats;
        barriers[3].wait();
        Measured { ops, secs, stats, allocations: a1 - a0, frees: f1 - f0 }
    })
}

/// Thread `t`'s share of `v` among `threads`.
fn share<T>(v: &[T], t: usize, threads: usize) -> &[T] {
    &v[v.len() * t / threads..v.len() * (t + 1) / threads]
}

/// A bijection on u64 (splitmix64's finaliser): distinct inputs give distinct, uniformly
/// spread keys.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Everything a run reads, built before any timing: the keys present, keys never inserted
/// (disjoint from them), and the lookup sequences as indices into either.
struct Workload<K> {
    hits: Vec<K>,
    misses: Vec<K>,
    uniform: std::sync::Arc<Vec<u32>>,
    zipf: std::sync::Arc<Vec<u32>>,
}

/// Lookup index sequences of `n` draws over `n` keys: uniform, and zipfian over key ranks (rank
/// r is key r; keys are random, so popular keys are spread over the hash space).
fn sequences(n: usize, seed: u64) -> (Vec<u32>, Vec<u32>) {
    let mut rng = fastrand::Rng::with_seed(seed);
    let uniform = (0..n).map(|_| rng.u32(0..n as u32)).collect();
    let zipf = Zipf::new(n as u64, THETA);
    let skewed = (0..n).map(|_| zipf.sample(&mut rng) as u32).collect();
    (uniform, skewed)
}

/// A key type with a constructor from a distinct index.
trait Key: Copy + Eq + std::hash::Hash + Send + Sync {
    fn nth(i: u64) -> Self;
}

impl Key for u64 {
    fn nth(i: u64) -> u64 {
        mix(i)
    }
}

impl Key for [u8; 16] {
    fn nth(i: u64) -> [u8; 16] {
        let mut k = [0; 16];
        k[..8].copy_from_slice(&mix(i).to_le_bytes());
        k[8..].copy_from_slice(&mix(i ^ 0x5a5a_5a5a_5a5a_5a5a).to_le_bytes());
        k
    }
}

impl<K: Key> Workload<K> {
    fn new(n: usize, seqs: &(std::sync::Arc<Vec<u32>>, std::sync::Arc<Vec<u32>>)) -> Workload<K> {
        Workload {
            hits: (0..n as u64).map(K::nth).collect(),
            misses: (n as u64..2 * n as u64).map(K::nth).collect(),
            uniform: seqs.0.clone(),
            zipf: seqs.1.clone(),
        }
    }
}

/// One engine's results on one map: a measurement per operation (`None`: not measured at this
/// thread count).
type EngineRun = Vec<Option<Measured>>;

/// The four lookups, each thread drawing its share of the sequence over the whole key set.
/// `get` returns a word of the value found (summed and checked so nothing is optimised away).
fn lookups<K: Key>(
    w: &Workload<K>,
    threads: usize,
    get: &(impl Fn(&K) -> Option<u64> + Sync),
) -> [Measured; 4] {
    let run = |keys: &[K], seq: &[u32], hit: bool| {
        let n = seq.len() as u64;
        timed(
            n,
            (0..threads)
                .map(|t| {
                    let seq = share(seq, t, threads);
                    move || {
                        let (mut found, mut sum) = (0usize, 0u64);
                        for &i in seq {
                            if let Some(v) = get(&keys[i as usize]) {
                                found += 1;
                                sum = sum.wrapping_add(v);
                            }
                        }
                        std::hint::black_box(sum);
                        assert_eq!(found, if hit { seq.len() } else { 0 }, "lookups found");
                    }
                })
                .collect(),
        )
    };
    [
        run(&w.hits, &w.uniform, true),
        run(&w.hits, &w.zipf, true),
        run(&w.misses, &w.uniform, false),
        run(&w.misses, &w.zipf, false),
    ]
}

/// A write over each thread's half of the keys.
fn writes<K: Key>(w: &Workload<K>, threads: usize, op: &(impl Fn(&K) + Sync)) -> Measured {
    timed(
        w.hits.len() as u64,
        (0..threads)
            .map(|t| {
                let keys = share(&w.hits, t, threads);
                move || keys.iter().for_each(op)
            })
            .collect(),
    )
}

/// One measured figure of `bench map` (the median of the rounds).
#[derive(Debug, Serialize)]
struct MapResult {
    keys: u64,
    key_bytes: usize,
    value_bytes: usize,
    engine: &'static str,
    /// The Rust type of the baseline of this row.
    baseline: &'static str,
    threads: usize,
    op: &'static str,
    mops_per_second: f64,
    /// Over hashbrown's median at the same thread count, or at one thread for writes (which
    /// hashbrown cannot share between threads); `baseline_threads` says which.
    ratio_to_hashbrown: f64,
    baseline_threads: usize,
    /// Over the same map on the `Volatile` domain (same keys, threads and operation); absent
    /// for hashbrown and the periodic and hybrid maps.
    ratio_to_volatile: Option<f64>,
    /// The periodic or hybrid map over the strict map on the same domain (`cpu`).
    ratio_to_strict: Option<f64>,
    lines_flushed_per_op: f64,
    fences_per_op: f64,
    /// Rust-heap allocations inside the timed loops, summed over the rounds (every loop runs
    /// `keys` operations).
    allocations_in_timed_loop: u64,
    /// Rust-heap frees inside the timed loops, summed over the rounds.
    frees_in_timed_loop: u64,
    rounds: usize,
}

#[derive(Debug, Serialize)]
struct OpenResult {
    map: &'static str,
    keys: u64,
    open_ms: f64,
    ratio_to_first: f64,
}

#[derive(Debug, Serialize)]
struct MapReport {
    bench: &'static str,
    machine: Machine,
    ram_gib: u64,
    command: String,
    rounds: usize,
    zipf_theta: f64,
    seconds: f64,
    results: Vec<MapResult>,
    open: Vec<OpenResult>,
}

/// The options of one `bench map` run.
#[derive(Debug)]
pub(super) struct MapArgs<'a> {
    pub pmem_dir: &'a Path,
    pub keys: &'a [u64],
    pub threads: &'a [usize],
    pub shapes: &'a [Shape],
    pub rounds: usize,
    pub open_keys: &'a [u64],
    pub json: Option<&'a Path>,
}

/// (engine, threads) → one run per round.
type Runs = BTreeMap<(&'static str, usize), Vec<EngineRun>>;

/// Every engine at every thread count on one shape and size, `rounds` times interleaved.
fn measure_shape(args: &MapArgs, shape: Shape, n: usize) -> Result<Runs, Box<dyn std::error::Error>> {
    let need = n as u64 * shape.pool_bytes_per_key();
    let fs = rustix::fs::statvfs(args.pmem_dir)?;
    let free = fs.f_bavail * fs.f_frsize;
    if free < need {
        return Err(format!(
            "{} has {} MiB free; {n} keys of shape {:?} need about {} MiB",
            args.pmem_dir.display(),
            free >> 20,
            shape.sizes(),
            need >> 20
        )
        .into());
    }
    let seqs = {
        let (u, z) = sequences(n, 0x6e76_6874_6d00 ^ n as u64);
        (std::sync::Arc::new(u), std::sync::Arc::new(z))
    };
    let (small, blob) = match shape {
        Shape::Small => (Some(Workload::<u64>::new(n, &seqs)), None),
        Shape::Blob => (None, Some(Workload::<[u8; 16]>::new(n, &seqs))),
    };
    let value = [0xabu8; 100];
    let updated = [0x54u8; 100];
    let mut runs = Runs::new();
    for round in 0..args.rounds {
        for &threads in args.threads {
            let started = Instant::now();
            let hb = match (&small, &blob) {
                (Some(w), _) => hashbrown_small(w, threads),
                (_, Some(w)) => hashbrown_blob(w, threads, &value, &updated),
                _ => unreachable!(),
            };
            runs.entry((HASHBROWN, threads)).or_default().push(hb);
            for engine in [VOLATILE, CPU] {
                let scratch = Scratch::new(args.pmem_dir, "map");
                let opts = heap_options();
                let run = match (engine == CPU, &small, &blob) {
                    (true, Some(w), _) => nvhtm_small(Heap::<Cpu>::create(&scratch.0, &opts)?, w, threads),
                    (false, Some(w), _) => {
                        nvhtm_small(Heap::<Volatile>::create(&scratch.0, &opts)?, w, threads)
                    }
                    (true, _, Some(w)) => {
                        nvhtm_blob(Heap::<Cpu>::create(&scratch.0, &opts)?, w, threads, &value, &updated)
                    }
                    (false, _, Some(w)) => {
                        nvhtm_blob(Heap::<Volatile>::create(&scratch.0, &opts)?, w, threads, &value, &updated)
                    }
                    _ => unreachable!(),
                }?;
                runs.entry((engine, threads)).or_default().push(run);
            }
            let scratch = Scratch::new(args.pmem_dir, "map");
            let heap = Heap::<Cpu>::create(&scratch.0, &heap_options())?;
            let run = match (&small, &blob) {
                (Some(w), _) => periodic_small(heap, w, threads),
                (_, Some(w)) => periodic_blob(heap, w, threads, &value, &updated),
                _ => unreachable!(),
            }?;
            runs.entry((PERIODIC, threads)).or_default().push(run);
            drop(scratch);
            let scratch = Scratch::new(args.pmem_dir, "map");
            let heap = Heap::<Cpu>::create(&scratch.0, &heap_options())?;
            let run = match (&small, &blob) {
                (Some(w), _) => hybrid_small(heap, w, threads),
                (_, Some(w)) => hybrid_blob(heap, w, threads, &value, &updated),
                _ => unreachable!(),
            }?;
            runs.entry((HYBRID, threads)).or_default().push(run);
            eprintln!(
                "  {n} keys, {:?}, round {}/{}, {threads} thread(s): {:.1} s",
                shape.sizes(),
                round + 1,
                args.rounds,
                started.elapsed().as_secs_f64()
            );
        }
    }
    Ok(runs)
}

/// The median of each (engine, threads, op) over the rounds, as rows.
fn rows(shape: Shape, n: usize, runs: &Runs) -> Vec<MapResult> {
    let median = |engine: &'static str, threads: usize, op: usize| -> Option<(Measured, u64, u64, usize)> {
        let rounds = runs.get(&(engine, threads))?;
        let mut all: Vec<Measured> = rounds.iter().filter_map(|r| r[op]).collect();
        if all.is_empty() {
            return None;
        }
        let allocations = all.iter().map(|m| m.allocations).sum();
        let frees = all.iter().map(|m| m.frees).sum();
        let count = all.len();
        all.sort_by(|a, b| a.mops().total_cmp(&b.mops()));
        Some((all[count / 2], allocations, frees, count))
    };
    let (key_bytes, value_bytes) = shape.sizes();
    let mut out = Vec::new();
    for engine in [HASHBROWN, VOLATILE, CPU, PERIODIC, HYBRID] {
        let thread_counts: Vec<usize> = runs.keys().filter(|k| k.0 == engine).map(|k| k.1).collect();
        for threads in thread_counts {
            for (op, name) in OPS.iter().enumerate() {
                let Some((m, allocations, frees, count)) = median(engine, threads, op) else {
                    continue;
                };
                let (base, baseline_threads) = match median(HASHBROWN, threads, op) {
                    Some(b) => (b.0.mops(), threads),
                    None => (median(HASHBROWN, 1, op).map_or(f64::NAN, |b| b.0.mops()), 1),
                };
                let ratio_to_volatile = (engine == VOLATILE || engine == CPU)
                    .then(|| median(VOLATILE, threads, op).map_or(f64::NAN, |v| m.mops() / v.0.mops()));
                let ratio_to_strict = (engine == PERIODIC || engine == HYBRID)
                    .then(|| median(CPU, threads, op).map_or(f64::NAN, |v| m.mops() / v.0.mops()));
                out.push(MapResult {
                    keys: n as u64,
                    key_bytes,
                    value_bytes,
                    engine,
                    baseline: shape.baseline(),
                    threads,
                    op: name,
                    mops_per_second: m.mops(),
                    ratio_to_hashbrown: m.mops() / base,
                    baseline_threads,
                    ratio_to_volatile,
                    ratio_to_strict,
                    lines_flushed_per_op: m.stats.lines_flushed as f64 / m.ops as f64,
                    fences_per_op: m.stats.fences as f64 / m.ops as f64,
                    allocations_in_timed_loop: allocations,
                    frees_in_timed_loop: frees,
                    rounds: count,
                });
            }
        }
    }
    out
}

fn print_rows(rows: &[MapResult]) {
    print_table(
        &[
            "engine",
            "thr",
            "op",
            "Mops/s",
            "x hashbrown",
            "(hb thr)",
            "x volatile",
            "x strict",
            "lines/op",
            "fences/op",
            "allocs/op",
        ],
        rows.iter().map(|r| {
            vec![
                r.engine.to_string(),
                r.threads.to_string(),
                r.op.to_string(),
                format!("{:.2}", r.mops_per_second),
                format!("{:.3}", r.ratio_to_hashbrown),
                r.baseline_threads.to_string(),
                r.ratio_to_volatile.map_or("-".to_string(), |x| format!("{x:.2}")),
                r.ratio_to_strict.map_or("-".to_string(), |x| format!("{x:.2}")),
                format!("{:.2}", r.lines_flushed_per_op),
                format!("{:.2}", r.fences_per_op),
                format!("{:.2}", r.allocations_in_timed_loop as f64 / (r.keys * r.rounds as u64) as f64),
            ]
        }),
    );
    for engine in [HASHBROWN, VOLATILE, CPU, PERIODIC, HYBRID] {
        let allocations: u64 =
            rows.iter().filter(|r| r.engine == engine).map(|r| r.allocations_in_timed_loop).sum();
        println!("allocations in timed loops, {engine}: {allocations}");
    }
}

/// Total memory, from /proc/meminfo (0 if unknown).
fn ram_gib() -> u64 {
    let info = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let kib = info
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|r| r.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .unwrap_or(0);
    (kib + (1 << 19)) >> 20
}

pub(super) fn map(args: &MapArgs) -> CommandResult {
    let started = Instant::now();
    let machine = Machine::here();
    let ram_gib = ram_gib();
    let command = std::env::args().collect::<Vec<_>>().join(" ");
    println!("$ {command}");
    println!(
        "machine: {} ({} cores, {ram_gib} GiB RAM, kernel {})",
        machine.cpu, machine.cores, machine.kernel
    );
    let mut results = Vec::new();
    alloc::counting(true);
    for &n in args.keys {
        for &shape in args.shapes {
            let (k, v) = shape.sizes();
            eprintln!("measuring {n} keys, {k}-byte keys / {v}-byte values ...");
            let runs = measure_shape(args, shape, n as usize);
            let runs = match runs {
                Ok(runs) => runs,
                Err(e) => {
                    alloc::counting(false);
                    return Err(e);
                }
            };
            let rows = rows(shape, n as usize, &runs);
            println!();
            println!(
                "{n} keys, {k}-byte keys, {v}-byte values; baseline {}; {} rounds interleaved, medians; \
                 zipf θ = {THETA}",
                shape.baseline(),
                args.rounds
            );
            print_rows(&rows);
            results.extend(rows);
        }
    }
    alloc::counting(false);
    let open = open::open_times(args.pmem_dir, args.open_keys)?;
    println!();
    for o in &open {
        println!(
            "open + first get of a {:>8} map of {:>9} keys: {:>8.3} ms ({:.2}x)",
            o.map, o.keys, o.open_ms, o.ratio_to_first
        );
    }
    let seconds = started.elapsed().as_secs_f64();
    println!("wall time: {seconds:.0} s");
    write_json(
        args.json,
        &MapReport {
            bench: "map",
            machine,
            ram_gib,
            command,
            rounds: args.rounds,
            zipf_theta: THETA,
            seconds,
            results,
            open,
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_distinct_and_misses_disjoint() {
        let seqs = (std::sync::Arc::new(vec![0u32; 4]), std::sync::Arc::new(vec![0u32; 4]));
        let w = Workload::<[u8; 16]>::new(1000, &seqs);
        let all: std::collections::HashSet<[u8; 16]> = w.hits.iter().chain(&w.misses).copied().collect();
        assert_eq!(all.len(), 2000);
    }

    #[test]
    fn a_timed_loop_that_allocates_is_counted() {
        let _alone = alloc::TEST_SWITCH.lock().unwrap_or_else(|e| e.into_inner());
        alloc::counting(true);
        let m = timed(1, vec![|| drop(std::hint::black_box(vec![0u8; 64]))]);
        alloc::counting(false);
        assert!(m.allocations >= 1, "{m:?}");
    }

    #[test]
    fn shares_cover_the_slice() {
        let v: Vec<u32> = (0..11).collect();
        let parts: Vec<u32> = (0..3).flat_map(|t| share(&v, t, 3).to_vec()).collect();
        assert_eq!(parts, v);
    }
}
