//! `nvhtm bench`: measurements of the persistence layer, always side by side in one run and
//! reported as ratios to a baseline measured in the same run.

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use clap::Subcommand;
use nvhtm::persist::{global_stats, Domain, FlushInstr, PersistStats};
use nvhtm::pool::{PoolOptions, HEADER_SIZE};
use nvhtm::sim::litmus::{self, Protocol};
use nvhtm::sim::{CrashContext, CrashTest, Recording, Sim};
use nvhtm::{Cpu, Msync, Pool, PoolError, Volatile};
use serde::Serialize;

use crate::commands::CommandResult;

/// Which benchmark to run.
#[derive(Debug, Subcommand)]
pub enum Which {
    /// Cost of persisting one cache line and 4 KiB in each persistence domain, as a ratio to
    /// the Volatile domain (stores only).
    Persist {
        /// Directory on an ordinary (page-cache) file system for the msync pool.
        #[arg(long, default_value = ".")]
        disk_dir: PathBuf,
        /// Directory on tmpfs (or DAX) for the cpu pools.
        #[arg(long, default_value = "/dev/shm")]
        pmem_dir: PathBuf,
        /// Measuring time per case, in milliseconds.
        #[arg(long, default_value_t = 300)]
        millis: u64,
        /// Also write the results as JSON to this file.
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// Heap allocation throughput against the system allocator, and transactions of 1, 4 and 16
    /// updates against the same writes unlogged.
    Heap {
        /// Directory on tmpfs (or DAX) for the pools.
        #[arg(long, default_value = "/dev/shm")]
        pmem_dir: PathBuf,
        /// Measuring time per case, in milliseconds.
        #[arg(long, default_value_t = 300)]
        millis: u64,
        /// Also write the results as JSON to this file.
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// The strict map against hashbrown and against itself on the Volatile domain: insert,
    /// positive and negative get, update, remove, for 8/16-byte keys and 8/100-byte values, on
    /// 1 and 2 threads; and open time as the key count grows.
    Map {
        /// Directory on tmpfs (or DAX) for the pools.
        #[arg(long, default_value = "/dev/shm")]
        pmem_dir: PathBuf,
        /// Keys per case.
        #[arg(long, default_value_t = 200_000)]
        keys: u64,
        /// Key counts whose open time is measured (the first is the baseline).
        #[arg(long, value_delimiter = ',', default_value = "10000,1000000")]
        open_keys: Vec<u64>,
        /// Also write the results as JSON to this file.
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// Failure-atomic msync: sync() against the physical floor (the same pages written and
    /// fsynced once), dirty-page scan time per GiB, first-write cost, and the strict map on a
    /// FAMS pool syncing every N operations against Msync per operation and Volatile.
    Fams {
        /// Directory on the file system to measure (an ordinary disk file system).
        #[arg(long, default_value = ".")]
        dir: PathBuf,
        /// Directory on a file system with reflinks (XFS, Btrfs): also measure the snapshot
        /// variant's sync cost as the working file's extent count grows.
        #[arg(long)]
        reflink_dir: Option<PathBuf>,
        /// Also write the results as JSON to this file.
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// Crash images the simulator checks per second, on the litmus protocols, on a
    /// 200-record persistent log (with a recovery that opens the image as a pool, and with one
    /// that reads the image in place), and on 10,000 lines persisted one by one (the cost of
    /// building and deduplicating images alone).
    Sim {
        /// Also write the results as JSON to this file.
        #[arg(long)]
        json: Option<PathBuf>,
    },
}

/// The machine a result was measured on.
#[derive(Debug, Serialize)]
struct Machine {
    cpu: String,
    cores: usize,
    kernel: String,
}

impl Machine {
    fn here() -> Machine {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu = cpuinfo
            .lines()
            .find_map(|l| l.strip_prefix("model name").and_then(|r| r.split(':').nth(1)))
            .map_or_else(|| "unknown".into(), |s| s.trim().to_string());
        let kernel =
            std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim().to_string();
        Machine { cpu, cores: std::thread::available_parallelism().map_or(1, |n| n.get()), kernel }
    }
}

pub fn run(which: Which) -> CommandResult {
    match which {
        Which::Persist { disk_dir, pmem_dir, millis, json } => {
            persist(&disk_dir, &pmem_dir, Duration::from_millis(millis), json.as_deref())
        }
        Which::Heap { pmem_dir, millis, json } => {
            heap(&pmem_dir, Duration::from_millis(millis), json.as_deref())
        }
        Which::Map { pmem_dir, keys, open_keys, json } => map(&pmem_dir, keys, &open_keys, json.as_deref()),
        Which::Fams { dir, reflink_dir, json } => fams(&dir, reflink_dir.as_deref(), json.as_deref()),
        Which::Sim { json } => sim(json.as_deref()),
    }
}

/// Prints rows under a header, each column as wide as its widest cell; a column of numbers is
/// right-aligned, a column of words left-aligned.
fn print_table(header: &[&str], rows: impl IntoIterator<Item = Vec<String>>) {
    let rows: Vec<Vec<String>> = rows.into_iter().collect();
    let columns: Vec<(usize, bool)> = (0..header.len())
        .map(|c| {
            let cells = || rows.iter().map(|r| r[c].as_str());
            let width = cells().map(str::len).chain([header[c].len()]).max().unwrap_or(0);
            (width, cells().all(|v| v.parse::<f64>().is_ok()))
        })
        .collect();
    let line = |cells: Vec<&str>| {
        let padded: Vec<String> = cells
            .iter()
            .zip(&columns)
            .map(|(v, &(w, numeric))| if numeric { format!("{v:>w$}") } else { format!("{v:<w$}") })
            .collect();
        println!("{}", padded.join("  ").trim_end());
    };
    line(header.to_vec());
    for r in &rows {
        line(r.iter().map(String::as_str).collect());
    }
}

fn write_json(path: Option<&Path>, value: &impl Serialize) -> CommandResult {
    if let Some(path) = path {
        std::fs::write(path, serde_json::to_string_pretty(value)?)?;
        println!("results written to {}", path.display());
    }
    Ok(())
}

/// One measured case of `bench persist`.
#[derive(Debug, Serialize)]
struct PersistResult {
    domain: String,
    medium: String,
    op: &'static str,
    ns_per_op: f64,
    ratio_to_volatile: f64,
    lines_flushed_per_op: f64,
    fences_per_op: f64,
    syncs_per_op: f64,
}

#[derive(Debug, Serialize)]
struct PersistReport {
    bench: &'static str,
    machine: Machine,
    results: Vec<PersistResult>,
}

/// The operations measured: a store of `len` bytes at a rotating offset, made durable.
#[derive(Clone, Copy)]
enum Op {
    Line,
    Page,
    PageNonTemporal,
}

impl Op {
    fn name(self) -> &'static str {
        match self {
            Op::Line => "persist 64 B",
            Op::Page => "persist 4 KiB",
            Op::PageNonTemporal => "persist 4 KiB (non-temporal)",
        }
    }

    fn len(self) -> u64 {
        match self {
            Op::Line => 64,
            Op::Page | Op::PageNonTemporal => 4096,
        }
    }
}

/// Working set the offsets rotate over: larger than the L2 cache, so lines are not all hot.
const WORKING_SET: u64 = 8 << 20;

/// Runs `op` repeatedly for `budget` (after a warm-up) and returns ns per op and work per op.
fn measure<D: Domain>(
    pool: &Pool<D>,
    op: Op,
    budget: Duration,
    sim: Option<&Sim>,
) -> Result<(f64, PersistStats, u64), PoolError> {
    let data = vec![0xa5u8; op.len() as usize];
    let slots = (WORKING_SET - HEADER_SIZE) / op.len() - 1;
    let mut i = 0u64;
    let step = |i: u64| -> Result<(), PoolError> {
        let offset = HEADER_SIZE.next_multiple_of(op.len()) + (i * 7919 % slots) * op.len();
        match op {
            Op::PageNonTemporal => {
                pool.write_persistent(offset, &data)?;
                pool.fence()
            }
            _ => {
                pool.write_bytes(offset, &data)?;
                pool.persist(offset, op.len())
            }
        }
    };
    for _ in 0..1000 {
        step(i)?;
        i += 1;
    }
    let before = global_stats();
    let start = Instant::now();
    let mut ops = 0u64;
    while start.elapsed() < budget {
        for _ in 0..64 {
            step(i)?;
            i += 1;
        }
        ops += 64;
        if let Some(sim) = sim.filter(|sim| sim.events() > 1 << 20) {
            // Keep the recording bounded: every store so far is durable.
            sim.restart_recording().map_err(PoolError::Poisoned)?;
        }
    }
    let elapsed = start.elapsed();
    Ok((elapsed.as_nanos() as f64 / ops as f64, global_stats() - before, ops))
}

/// A scratch pool file, removed when dropped.
struct Scratch(PathBuf);

impl Scratch {
    fn new(dir: &Path, name: &str) -> Scratch {
        Scratch(dir.join(format!(".nvhtm-bench-{}-{name}.pool", std::process::id())))
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

type Row = (String, String, Op, f64, PersistStats, u64);

fn measure_all<D: Domain>(
    rows: &mut Vec<Row>,
    domain: &str,
    pool: &Pool<D>,
    ops: &[Op],
    budget: Duration,
    sim: Option<&Sim>,
) -> CommandResult {
    let medium = match pool.info().filesystem.as_str() {
        "memory" => "memory".to_string(),
        "tmpfs" => "tmpfs".to_string(),
        fs => format!("{fs} file"),
    };
    for &op in ops {
        let (ns, stats, n) = measure(pool, op, budget, sim)?;
        rows.push((domain.to_string(), medium.clone(), op, ns, stats, n));
    }
    Ok(())
}

fn persist(disk_dir: &Path, pmem_dir: &Path, budget: Duration, json: Option<&Path>) -> CommandResult {
    let opts = PoolOptions::layout("bench").with_size(WORKING_SET + (1 << 20));
    let all = [Op::Line, Op::Page, Op::PageNonTemporal];
    let mut rows: Vec<Row> = Vec::new();

    let shm = Scratch::new(pmem_dir, "pmem");
    Pool::<Volatile>::create(&shm.0, &opts)?.close()?;
    let pool = Pool::<Volatile>::open(&shm.0, &opts)?;
    measure_all(&mut rows, "volatile", &pool, &all, budget, None)?;
    drop(pool);
    for instr in FlushInstr::supported() {
        let cpu = Cpu::with_instr(instr).ok_or("flush instruction not supported")?;
        let pool = Pool::open_with_domain(&shm.0, &opts, cpu)?;
        measure_all(&mut rows, &format!("cpu ({instr:?})").to_lowercase(), &pool, &all, budget, None)?;
    }
    let pool = Pool::<Msync>::open(&shm.0, &opts)?;
    measure_all(&mut rows, "msync", &pool, &[Op::Line, Op::Page], budget, None)?;
    drop(pool);

    let disk = Scratch::new(disk_dir, "disk");
    let pool = Pool::<Msync>::create(&disk.0, &opts)?;
    measure_all(&mut rows, "msync", &pool, &[Op::Line, Op::Page], budget, None)?;
    drop(pool);

    let sim = Sim::new();
    let pool = Pool::create_in_memory(&opts, sim.clone())?;
    sim.restart_recording()?;
    measure_all(&mut rows, "sim", &pool, &all, budget, Some(&sim))?;

    let volatile_ns =
        |op: Op| rows.iter().find(|r| r.0 == "volatile" && r.2.name() == op.name()).map_or(f64::NAN, |r| r.3);
    let results: Vec<PersistResult> = rows
        .iter()
        .map(|(domain, medium, op, ns, stats, n)| PersistResult {
            domain: domain.clone(),
            medium: medium.clone(),
            op: op.name(),
            ns_per_op: *ns,
            ratio_to_volatile: ns / volatile_ns(*op),
            lines_flushed_per_op: stats.lines_flushed as f64 / *n as f64,
            fences_per_op: stats.fences as f64 / *n as f64,
            syncs_per_op: stats.syncs as f64 / *n as f64,
        })
        .collect();
    let machine = Machine::here();
    println!("persist cost on {} ({} cores, Linux {})", machine.cpu, machine.cores, machine.kernel);
    print_table(
        &["domain", "medium", "op", "ns/op", "x volatile", "lines", "fences", "syncs"],
        results.iter().map(|r| {
            vec![
                r.domain.to_string(),
                r.medium.to_string(),
                r.op.to_string(),
                format!("{:.1}", r.ns_per_op),
                format!("{:.2}", r.ratio_to_volatile),
                format!("{:.2}", r.lines_flushed_per_op),
                format!("{:.2}", r.fences_per_op),
                format!("{:.2}", r.syncs_per_op),
            ]
        }),
    );
    write_json(json, &PersistReport { bench: "persist", machine, results })
}

/// One measured case of `bench sim`.
#[derive(Debug, Serialize)]
struct SimResult {
    workload: String,
    pool_bytes: usize,
    recovery_depth: u32,
    crash_points: u64,
    images_checked: u64,
    seconds: f64,
    images_per_second: f64,
}

#[derive(Debug, Serialize)]
struct SimReport {
    bench: &'static str,
    machine: Machine,
    results: Vec<SimResult>,
}

/// A persistent log: 100-byte records appended after the tail, then the tail word (8 bytes,
/// its own line) moved past them. The oracle: the tail covers every completed append, and every
/// record below the tail is whole.
struct Log {
    records: u64,
}

const LOG_TAIL: u64 = HEADER_SIZE;
const LOG_START: u64 = HEADER_SIZE + 64;
const RECORD: u64 = 100;

fn log_record(i: u64) -> Vec<u8> {
    (0..RECORD).map(|b| (i * 31 + b) as u8).collect()
}

impl Log {
    fn opts(&self, size: u64) -> PoolOptions {
        PoolOptions::layout("log").with_size(size).with_max_size(size)
    }

    fn record(&self, size: u64) -> Result<Recording, PoolError> {
        let sim = Sim::new();
        let pool = Pool::create_in_memory(&self.opts(size), sim.clone())?;
        sim.restart_recording().map_err(PoolError::Poisoned)?;
        for i in 0..self.records {
            let at = LOG_START + i * RECORD;
            pool.write_bytes(at, &log_record(i))?;
            pool.persist(at, RECORD)?;
            pool.store_u64(LOG_TAIL, i + 1, Ordering::Release)?;
            pool.persist(LOG_TAIL, 8)?;
            sim.mark(i);
        }
        Ok(sim.recording())
    }

    fn check(&self, size: u64, sim: &Sim, image: &[u8], ctx: &CrashContext) -> Result<(), String> {
        let pool = Pool::open_image(image, &self.opts(size), sim.clone()).map_err(|e| e.to_string())?;
        let tail = pool.load_u64(LOG_TAIL, Ordering::Acquire).map_err(|e| e.to_string())?;
        let done = ctx.marks.len() as u64;
        if tail < done || tail > done + 1 {
            return Err(format!("tail {tail} with {done} appends completed"));
        }
        let mut buf = vec![0u8; RECORD as usize];
        for i in 0..tail {
            pool.read_into(LOG_START + i * RECORD, &mut buf).map_err(|e| e.to_string())?;
            if buf != log_record(i) {
                return Err(format!("record {i} below the tail is damaged"));
            }
        }
        Ok(())
    }
}

impl Log {
    /// The oracle on the image's bytes, without opening it as a pool: what the simulator's
    /// own cost is when the check costs nothing.
    fn check_in_place(&self, image: &[u8], ctx: &CrashContext) -> Result<(), String> {
        let word =
            |at: u64| u64::from_ne_bytes(image[at as usize..at as usize + 8].try_into().unwrap_or_default());
        let tail = word(LOG_TAIL);
        let done = ctx.marks.len() as u64;
        if tail < done || tail > done + 1 {
            return Err(format!("tail {tail} with {done} appends completed"));
        }
        for i in 0..tail {
            let at = (LOG_START + i * RECORD) as usize;
            if image[at..at + RECORD as usize] != log_record(i)[..] {
                return Err(format!("record {i} below the tail is damaged"));
            }
        }
        Ok(())
    }
}

/// 10,000 lines, each stored and persisted in turn (1 MiB pool): 10,001 crash points, each with
/// one dirty line. What building, keying and deduplicating images costs as the set of lines
/// touched since the start grows.
fn many_lines_recording() -> Result<Recording, PoolError> {
    let opts = PoolOptions::layout("lines").with_size(1 << 20).with_max_size(1 << 20);
    let sim = Sim::new();
    let pool = Pool::create_in_memory(&opts, sim.clone())?;
    sim.restart_recording().map_err(PoolError::Poisoned)?;
    for i in 0..10_000u64 {
        let at = HEADER_SIZE + i * 64;
        pool.store_u64(at, i + 1, Ordering::Release)?;
        pool.persist(at, 8)?;
    }
    Ok(sim.recording())
}

fn timed(
    name: String,
    pool_bytes: usize,
    depth: u32,
    run: impl FnOnce() -> nvhtm::sim::CrashReport,
) -> Result<SimResult, String> {
    let start = Instant::now();
    let report = run();
    let seconds = start.elapsed().as_secs_f64();
    if !report.passed() {
        return Err(format!("{name}: {}", report.failures[0]));
    }
    let images = report.images_checked + report.recovery_images_checked;
    Ok(SimResult {
        workload: name,
        pool_bytes,
        recovery_depth: depth,
        crash_points: report.crash_points,
        images_checked: images,
        seconds,
        images_per_second: images as f64 / seconds,
    })
}

fn sim(json: Option<&Path>) -> CommandResult {
    let mut results = Vec::new();
    for protocol in Protocol::ALL.into_iter().filter(|p| p.is_correct()) {
        let recording = protocol.record();
        let test = CrashTest::default();
        results.push(timed(format!("litmus {protocol:?}"), 65536, 0, || {
            test.run(&recording, |s, i, c| protocol.check_image(s, i, c))
        })?);
    }
    let undo = litmus::undo_log_recording();
    let deep = CrashTest { recovery_depth: 2, ..CrashTest::default() };
    results.push(timed("litmus undo log".into(), 65536, 2, || {
        deep.run(&undo, |s, i, c| litmus::undo_log_check(s, i, c, true))
    })?);
    let log = Log { records: 200 };
    for size in [64u64 << 10, 1 << 20] {
        let recording = log.record(size)?;
        // Depth 1 at 1 MiB opens (copies) a 1 MiB pool and records its recovery per image:
        // minutes, and nothing the 64 KiB row does not show.
        let depths: &[u32] = if size > 64 << 10 { &[0] } else { &[0, 1] };
        for &depth in depths {
            let test = CrashTest { recovery_depth: depth, ..CrashTest::default() };
            results.push(timed(format!("log of {} records", log.records), size as usize, depth, || {
                test.run(&recording, |s, i, c| log.check(size, s, i, c))
            })?);
        }
        let test = CrashTest::default();
        results.push(timed(
            format!("log of {} records, read in place", log.records),
            size as usize,
            0,
            || test.run(&recording, |_, i, c| log.check_in_place(i, c)),
        )?);
    }
    let lines = many_lines_recording()?;
    for deduplicate in [true, false] {
        let test = CrashTest { deduplicate, ..CrashTest::default() };
        let name = format!("10,000 lines, read in place{}", if deduplicate { "" } else { ", no dedup" });
        results.push(timed(name, 1 << 20, 0, || {
            test.run(&lines, |_, image, _| {
                std::hint::black_box(image[HEADER_SIZE as usize]);
                Ok(())
            })
        })?);
    }
    let machine = Machine::here();
    println!("crash simulator throughput on {} ({} cores)", machine.cpu, machine.cores);
    print_table(
        &["workload", "pool", "depth", "points", "images", "seconds", "images/s"],
        results.iter().map(|r| {
            vec![
                r.workload.clone(),
                r.pool_bytes.to_string(),
                r.recovery_depth.to_string(),
                r.crash_points.to_string(),
                r.images_checked.to_string(),
                format!("{:.3}", r.seconds),
                format!("{:.0}", r.images_per_second),
            ]
        }),
    );
    write_json(json, &SimReport { bench: "sim", machine, results })
}

/// One measured case of `bench heap`.
#[derive(Debug, Serialize)]
struct HeapResult {
    domain: &'static str,
    case: String,
    ns_per_op: f64,
    baseline: &'static str,
    ratio_to_baseline: f64,
    lines_flushed_per_op: f64,
    fences_per_op: f64,
}

#[derive(Debug, Serialize)]
struct HeapReport {
    bench: &'static str,
    machine: Machine,
    results: Vec<HeapResult>,
}

/// One benchmarked heap operation, given the iteration number.
type HeapOp<'a> = dyn Fn(u64) -> Result<(), nvhtm::HeapError> + 'a;

/// Runs `op` for `budget` after a warm-up; returns ns per op and persistence work per op.
fn time_op(
    budget: Duration,
    mut op: impl FnMut(u64) -> Result<(), nvhtm::HeapError>,
) -> Result<(f64, PersistStats, u64), nvhtm::HeapError> {
    for i in 0..200 {
        op(i)?;
    }
    let before = global_stats();
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed() < budget {
        for _ in 0..32 {
            op(n)?;
            n += 1;
        }
    }
    Ok((start.elapsed().as_nanos() as f64 / n as f64, global_stats() - before, n))
}

/// The heap cases for one domain, each paired with its baseline's name.
fn heap_cases<D: Domain>(
    heap: &nvhtm::Heap<D>,
    budget: Duration,
    rows: &mut Vec<(String, &'static str, f64, PersistStats, u64)>,
) -> CommandResult {
    // Allocation: a transaction allocating 64 B (durable), then one freeing it.
    let mut live = Vec::with_capacity(4096);
    let (ns, st, n) = time_op(budget, |_| {
        let at = heap.transaction(|tx| tx.alloc_bytes(64))?;
        live.push(at);
        if live.len() == 4096 {
            for at in live.drain(..) {
                heap.transaction(|tx| tx.free(at))?;
            }
        }
        Ok(())
    })?;
    rows.push(("alloc 64 B (+ free later, amortised)".into(), "malloc 64 B + free", ns, st, n));
    for at in live.drain(..) {
        heap.transaction(|tx| tx.free(at))?;
    }
    let (ns, st, n) = time_op(budget, |_| {
        let r = heap.reserve(64)?;
        heap.cancel(r);
        Ok(())
    })?;
    rows.push(("reserve + cancel 64 B (DRAM only)".into(), "malloc 64 B + free", ns, st, n));

    // Transactions of k updates of 8 bytes in distinct lines vs the same stores unlogged.
    let block = heap.transaction(|tx| tx.alloc_bytes(16 * 64))?;
    for k in [1u64, 4, 16] {
        let baseline = match k {
            1 => "1 store",
            4 => "4 stores",
            _ => "16 stores",
        };
        let words = || (0..k).map(|j| block + j * 64);
        let ranges: Vec<(u64, u64)> = words().map(|at| (at, 8)).collect();
        let cases: [(String, Box<HeapOp<'_>>); 4] = [
            (
                format!("tx of {k} updates"),
                Box::new(|i| {
                    heap.transaction(|tx| {
                        words().try_for_each(|at| tx.write(nvhtm::PPtr::<u64>::new(at), &i))
                    })
                }),
            ),
            (
                format!("tx of {k} updates, one add_ranges"),
                Box::new(|i| {
                    heap.transaction(|tx| {
                        tx.add_ranges(&ranges)?;
                        words().try_for_each(|at| tx.write(nvhtm::PPtr::<u64>::new(at), &i))
                    })
                }),
            ),
            (
                format!("{k} stores + flush + 1 fence (not atomic)"),
                Box::new(|i| {
                    for at in words() {
                        heap.pool().write(at, &i)?;
                        heap.pool().flush(at, 8)?;
                    }
                    heap.pool().fence()
                }),
            ),
            (format!("{k} plain stores"), Box::new(|i| words().try_for_each(|at| heap.pool().write(at, &i)))),
        ];
        for (name, op) in cases {
            let (ns, st, n) = time_op(budget, op)?;
            rows.push((name, baseline, ns, st, n));
        }
    }
    Ok(())
}

fn heap(pmem_dir: &Path, budget: Duration, json: Option<&Path>) -> CommandResult {
    let opts = PoolOptions::layout("bench").with_size(64 << 20);
    // The system allocator: 64 B allocations freed in batches of 4096, like the heap case.
    let mut boxes: Vec<Box<[u8; 64]>> = Vec::with_capacity(4096);
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed() < budget {
        boxes.push(std::hint::black_box(Box::new([n as u8; 64])));
        if boxes.len() == 4096 {
            boxes.clear();
        }
        n += 1;
    }
    let malloc_ns = start.elapsed().as_nanos() as f64 / n as f64;

    let mut results = Vec::new();
    for domain in ["cpu", "volatile"] {
        let scratch = Scratch::new(pmem_dir, domain);
        let mut rows = Vec::new();
        if domain == "cpu" {
            heap_cases(&nvhtm::Heap::<Cpu>::create(&scratch.0, &opts)?, budget, &mut rows)?;
        } else {
            heap_cases(&nvhtm::Heap::<Volatile>::create(&scratch.0, &opts)?, budget, &mut rows)?;
        }
        let plain = |name: &str| {
            rows.iter().find(|r| r.0 == format!("{name} plain stores")).map_or(f64::NAN, |r| r.2)
        };
        for (case, baseline, ns, st, n) in &rows {
            let base_ns = match *baseline {
                "malloc 64 B + free" => malloc_ns,
                "1 store" => plain("1"),
                "4 stores" => plain("4"),
                _ => plain("16"),
            };
            results.push(HeapResult {
                domain,
                case: case.clone(),
                ns_per_op: *ns,
                baseline,
                ratio_to_baseline: ns / base_ns,
                lines_flushed_per_op: st.lines_flushed as f64 / *n as f64,
                fences_per_op: st.fences as f64 / *n as f64,
            });
        }
    }
    // Recovery: opening a 64 MiB heap holding 0 or 200 000 small blocks (plus what the fill
    // left in flight: nothing) costs O(chunks), not O(blocks).
    let mut open_ns = Vec::new();
    for blocks in [0u64, 200_000] {
        let scratch = Scratch::new(pmem_dir, "recovery");
        let heap = nvhtm::Heap::<Volatile>::create(&scratch.0, &opts)?;
        for _ in 0..blocks {
            heap.transaction(|tx| tx.alloc_bytes(64))?;
        }
        heap.close()?;
        let mut times: Vec<f64> = (0..5)
            .map(|_| {
                let start = Instant::now();
                let heap = nvhtm::Heap::<Cpu>::open(&scratch.0, &opts)?;
                let ns = start.elapsed().as_nanos() as f64;
                heap.close()?;
                Ok(ns)
            })
            .collect::<Result<_, nvhtm::HeapError>>()?;
        times.sort_by(f64::total_cmp);
        open_ns.push((blocks, times[2]));
    }
    for &(blocks, ns) in &open_ns {
        results.push(HeapResult {
            domain: "cpu",
            case: format!("open 64 MiB heap holding {blocks} blocks"),
            ns_per_op: ns,
            baseline: "open, 0 blocks",
            ratio_to_baseline: ns / open_ns[0].1,
            lines_flushed_per_op: f64::NAN,
            fences_per_op: f64::NAN,
        });
    }

    let machine = Machine::here();
    println!(
        "heap on {} ({} cores); system malloc 64 B + free: {malloc_ns:.1} ns",
        machine.cpu, machine.cores
    );
    print_table(
        &["domain", "case", "ns/op", "baseline", "ratio", "lines", "fences"],
        results.iter().map(|r| {
            vec![
                r.domain.to_string(),
                r.case.to_string(),
                format!("{:.1}", r.ns_per_op),
                r.baseline.to_string(),
                format!("{:.2}", r.ratio_to_baseline),
                format!("{:.2}", r.lines_flushed_per_op),
                format!("{:.2}", r.fences_per_op),
            ]
        }),
    );
    write_json(json, &HeapReport { bench: "heap", machine, results })
}

/// One measured case of `bench map`.
#[derive(Debug, Serialize)]
struct MapResult {
    map: String,
    threads: usize,
    key_bytes: usize,
    value_bytes: usize,
    op: &'static str,
    mops_per_second: f64,
    ratio_to_hashbrown: f64,
    /// Throughput over the same map's on the `Volatile` domain (same threads, sizes and
    /// operation); absent for hashbrown.
    ratio_to_volatile: Option<f64>,
    lines_flushed_per_op: f64,
    fences_per_op: f64,
}

#[derive(Debug, Serialize)]
struct OpenResult {
    keys: u64,
    open_ms: f64,
    ratio_to_first: f64,
}

#[derive(Debug, Serialize)]
struct MapReport {
    bench: &'static str,
    machine: Machine,
    results: Vec<MapResult>,
    open: Vec<OpenResult>,
}

const MAP_OPS: [&str; 5] = ["insert", "get (hit)", "get (miss)", "update", "remove"];

/// One run of the five operations: Mops/s and persistence work for each.
type OpsRun = Vec<(f64, PersistStats)>;
/// A map case: its name and thread count.
type MapCase = (&'static str, usize);

fn bench_key(i: u64, len: usize) -> Vec<u8> {
    let mut k = (i.wrapping_mul(0x9e37_79b9_7f4a_7c15)).to_le_bytes().to_vec();
    k.resize(len, (i >> 56) as u8 ^ 0x5a);
    if len > 8 {
        k[8..16].copy_from_slice(&i.to_le_bytes());
    }
    k
}

/// Runs `op(i)` for i in the thread's share of 0..keys on `threads` threads; returns Mops/s.
fn run_threads(keys: u64, threads: usize, op: &(dyn Fn(u64) + Sync)) -> f64 {
    let start = Instant::now();
    std::thread::scope(|s| {
        for t in 0..threads as u64 {
            s.spawn(move || {
                let mut i = t;
                while i < keys {
                    op(i);
                    i += threads as u64;
                }
            });
        }
    });
    keys as f64 / start.elapsed().as_secs_f64() / 1e6
}

/// The five operations on a strict map.
fn map_ops<D: Domain>(
    map: &nvhtm::StrictMap<D>,
    keys: u64,
    threads: usize,
    klen: usize,
    value: &[u8],
) -> Vec<(f64, PersistStats)> {
    let updated: Vec<u8> = value.iter().map(|b| b ^ 0xff).collect();
    let mut out = Vec::new();
    let measure = |op: &(dyn Fn(u64) + Sync)| {
        let before = global_stats();
        let mops = run_threads(keys, threads, op);
        (mops, global_stats() - before)
    };
    out.push(measure(&|i| {
        map.upsert(&bench_key(i, klen), value).expect("insert");
    }));
    out.push(measure(&|i| {
        assert!(map.get_with(&bench_key(i, klen), |v| v.len()).expect("get").is_some());
    }));
    out.push(measure(&|i| {
        assert!(map.get_with(&bench_key(i + keys, klen), |v| v.len()).expect("get").is_none());
    }));
    out.push(measure(&|i| {
        map.upsert(&bench_key(i, klen), &updated).expect("update");
    }));
    out.push(measure(&|i| {
        assert!(map.remove(&bench_key(i, klen)).expect("remove"));
    }));
    out
}

/// The five operations on hashbrown (one thread).
fn hashbrown_ops(keys: u64, klen: usize, value: &[u8]) -> Vec<f64> {
    let mut map: hashbrown::HashMap<Vec<u8>, Vec<u8>> = hashbrown::HashMap::new();
    let updated: Vec<u8> = value.iter().map(|b| b ^ 0xff).collect();
    let mut out = Vec::new();
    let mut timed = |f: &mut dyn FnMut(u64)| {
        let start = Instant::now();
        for i in 0..keys {
            f(i);
        }
        out.push(keys as f64 / start.elapsed().as_secs_f64() / 1e6);
    };
    timed(&mut |i| {
        map.insert(bench_key(i, klen), value.to_vec());
    });
    timed(&mut |i| assert!(std::hint::black_box(map.get(&bench_key(i, klen))).is_some()));
    timed(&mut |i| assert!(std::hint::black_box(map.get(&bench_key(i + keys, klen))).is_none()));
    timed(&mut |i| {
        map.insert(bench_key(i, klen), updated.clone());
    });
    timed(&mut |i| assert!(map.remove(&bench_key(i, klen)).is_some()));
    out
}

fn map(pmem_dir: &Path, keys: u64, open_keys: &[u64], json: Option<&Path>) -> CommandResult {
    let opts = PoolOptions::layout("bench").with_size(64 << 20);
    let mut results = Vec::new();
    for (klen, vlen) in [(8usize, 8usize), (16, 8), (8, 100), (16, 100)] {
        let value = vec![0xabu8; vlen];
        // Every case runs three times, interleaved with the others, and each operation's
        // median is kept: this machine's speed drifts, and the ratio must compare like with
        // like.
        let median_of = |runs: Vec<OpsRun>| -> OpsRun {
            (0..MAP_OPS.len())
                .map(|i| {
                    let mut op: Vec<(f64, PersistStats)> = runs.iter().map(|r| r[i]).collect();
                    op.sort_by(|a, b| a.0.total_cmp(&b.0));
                    op[op.len() / 2]
                })
                .collect()
        };
        let mut runs: std::collections::BTreeMap<MapCase, Vec<OpsRun>> = Default::default();
        for _ in 0..3 {
            let hb =
                hashbrown_ops(keys, klen, &value).into_iter().map(|m| (m, PersistStats::default())).collect();
            runs.entry(("hashbrown", 1)).or_default().push(hb);
            for threads in [1, 2] {
                let scratch = Scratch::new(pmem_dir, "map");
                let map = nvhtm::StrictMap::open(nvhtm::Heap::<Cpu>::create(&scratch.0, &opts)?)?;
                runs.entry(("strict (cpu)", threads))
                    .or_default()
                    .push(map_ops(&map, keys, threads, klen, &value));
                drop(map);
                let scratch = Scratch::new(pmem_dir, "map-volatile");
                let map = nvhtm::StrictMap::open(nvhtm::Heap::<Volatile>::create(&scratch.0, &opts)?)?;
                runs.entry(("strict (volatile)", threads))
                    .or_default()
                    .push(map_ops(&map, keys, threads, klen, &value));
            }
        }
        let medians: Vec<(MapCase, OpsRun)> =
            runs.into_iter().map(|(case, r)| (case, median_of(r))).collect();
        let base: Vec<f64> = medians
            .iter()
            .find(|(c, _)| c.0 == "hashbrown")
            .map(|(_, m)| m.iter().map(|x| x.0).collect())
            .unwrap_or_default();
        let volatile: std::collections::BTreeMap<usize, Vec<f64>> = medians
            .iter()
            .filter(|(c, _)| c.0 == "strict (volatile)")
            .map(|(c, m)| (c.1, m.iter().map(|x| x.0).collect()))
            .collect();
        for ((name, threads), ops) in medians {
            for (i, (mops, st)) in ops.into_iter().enumerate() {
                let ratio_to_volatile =
                    (name != "hashbrown").then(|| volatile.get(&threads).map_or(f64::NAN, |v| mops / v[i]));
                results.push(MapResult {
                    map: name.to_string(),
                    threads,
                    key_bytes: klen,
                    value_bytes: vlen,
                    op: MAP_OPS[i],
                    mops_per_second: mops,
                    ratio_to_hashbrown: mops / base[i],
                    ratio_to_volatile,
                    lines_flushed_per_op: st.lines_flushed as f64 / keys as f64,
                    fences_per_op: st.fences as f64 / keys as f64,
                });
            }
        }
    }
    // Open time as the map grows: the heap's lanes only; no scan of keys.
    let mut open = Vec::new();
    for &n in open_keys {
        let scratch = Scratch::new(pmem_dir, "open");
        let map = nvhtm::StrictMap::open(nvhtm::Heap::<Volatile>::create(&scratch.0, &opts)?)?;
        for i in 0..n {
            map.upsert(&bench_key(i, 8), &i.to_le_bytes())?;
        }
        map.close()?;
        let mut times: Vec<f64> = (0..5)
            .map(|_| -> Result<f64, Box<dyn std::error::Error>> {
                let start = Instant::now();
                let map = nvhtm::StrictMap::open(nvhtm::Heap::<Cpu>::open(&scratch.0, &opts)?)?;
                let found = map.get(&bench_key(n / 2, 8))?.is_some();
                let ms = start.elapsed().as_secs_f64() * 1e3;
                if !found && n > 0 {
                    return Err("a key is missing after reopening".into());
                }
                map.close()?;
                Ok(ms)
            })
            .collect::<Result<_, _>>()?;
        times.sort_by(f64::total_cmp);
        open.push((n, times[2]));
    }
    let open: Vec<OpenResult> = open
        .iter()
        .map(|&(keys, ms)| OpenResult { keys, open_ms: ms, ratio_to_first: ms / open[0].1 })
        .collect();

    let machine = Machine::here();
    println!("strict map, {keys} keys per case, on {} ({} cores)", machine.cpu, machine.cores);
    print_table(
        &["map", "thr", "key", "value", "op", "Mops/s", "x hashbrown", "x volatile", "lines", "fences"],
        results.iter().map(|r| {
            vec![
                r.map.clone(),
                r.threads.to_string(),
                r.key_bytes.to_string(),
                r.value_bytes.to_string(),
                r.op.to_string(),
                format!("{:.2}", r.mops_per_second),
                format!("{:.2}", r.ratio_to_hashbrown),
                r.ratio_to_volatile.map_or("-".to_string(), |x| format!("{x:.2}")),
                format!("{:.2}", r.lines_flushed_per_op),
                format!("{:.2}", r.fences_per_op),
            ]
        }),
    );
    for o in &open {
        println!(
            "open + first get of a map of {:>9} keys: {:>8.3} ms ({:.2}x)",
            o.keys, o.open_ms, o.ratio_to_first
        );
    }
    write_json(json, &MapReport { bench: "map", machine, results, open })
}

#[derive(Debug, Serialize)]
struct FamsReport {
    bench: &'static str,
    machine: Machine,
    tracker: String,
    sync: Vec<FamsSyncResult>,
    scan_ms_per_gib: f64,
    first_write_ns_per_page: f64,
    rewrite_ns_per_page: f64,
    map: Vec<FamsMapResult>,
    snapshot: Vec<SnapshotResult>,
}

#[derive(Debug, Serialize)]
struct SnapshotResult {
    extents: u64,
    sync_ms: f64,
}

/// Extents of a file, as `filefrag` counts them.
fn extents(path: &Path) -> Option<u64> {
    let out = std::process::Command::new("filefrag").arg(path).output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.split_whitespace().rev().nth(2)?.parse().ok()
}

/// The snapshot variant: sync time as rewrites after clones fragment the working file.
fn snapshot_growth(dir: &Path) -> Result<Vec<SnapshotResult>, Box<dyn std::error::Error>> {
    let path = Scratch::new(dir, "snapshot");
    let page = rustix::param::page_size() as u64;
    let pages = (64u64 << 20) / page;
    let mut file = nvhtm::fams::SnapshotFile::create(&path.0, pages * page)?;
    let mut rng = fastrand::Rng::with_seed(3);
    let mut out = Vec::new();
    for round in 0..8u32 {
        // Rewriting pages after a clone moves them to new blocks (copy on write): extents grow.
        for _ in 0..(1u64 << round).min(pages) * 8 {
            file.write(rng.u64(..pages) * page, &[round as u8; 64])?;
        }
        let start = Instant::now();
        file.sync()?;
        let ms = start.elapsed().as_secs_f64() * 1e3;
        out.push(SnapshotResult { extents: extents(&path.0).unwrap_or(0), sync_ms: ms });
    }
    drop(file);
    for p in nvhtm::fams::snapshot_paths(&path.0) {
        let _ = std::fs::remove_file(p);
    }
    Ok(out)
}

#[derive(Debug, Serialize)]
struct FamsSyncResult {
    dirty_pages: u64,
    sync_ms: f64,
    floor_ms: f64,
    ratio_to_floor: f64,
}

#[derive(Debug, Serialize)]
struct FamsMapResult {
    case: String,
    kops_per_second: f64,
    ratio_to_volatile: f64,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn fams(dir: &Path, reflink_dir: Option<&Path>, json: Option<&Path>) -> CommandResult {
    use nvhtm::fams::FamsFile;
    use std::os::unix::fs::FileExt;
    let page = rustix::param::page_size() as u64;
    let mut results = Vec::new();
    let data = Scratch::new(dir, "fams-sync");
    let journal = nvhtm::fams::journal_path(&data.0);
    let floor_file = Scratch::new(dir, "fams-floor");
    let pages = 16_384u64; // a 64 MiB file
    let mut file = FamsFile::create(&data.0, pages * page, pages * page)?;
    let tracker = file.tracker().to_string();
    let floor =
        std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&floor_file.0)?;
    floor.set_len(pages * page)?;
    floor.sync_all()?;
    let mut rng = fastrand::Rng::with_seed(1);
    for dirty in [1u64, 100, 10_000] {
        let mut sync_ms = Vec::new();
        let mut floor_ms = Vec::new();
        for round in 0..5u8 {
            let chosen: Vec<u64> = rng.choose_multiple(0..pages, dirty as usize);
            for &p in &chosen {
                file.write(p * page + 8, &[round; 8])?;
            }
            let start = Instant::now();
            let stats = file.sync()?;
            sync_ms.push(start.elapsed().as_secs_f64() * 1e3);
            assert_eq!(stats.pages, dirty);
            // The floor: the same pages written in place and fsynced once.
            let block = vec![round; page as usize];
            let start = Instant::now();
            for &p in &chosen {
                floor.write_all_at(&block, p * page)?;
            }
            floor.sync_data()?;
            floor_ms.push(start.elapsed().as_secs_f64() * 1e3);
        }
        let (s, f) = (median(sync_ms), median(floor_ms));
        results.push(FamsSyncResult { dirty_pages: dirty, sync_ms: s, floor_ms: f, ratio_to_floor: s / f });
    }
    drop(file);
    let _ = std::fs::remove_file(&journal);

    // Dirty scan with nothing dirty, and the first write to a page after a sync (a write-protect
    // fault) against writing it again.
    let scan_data = Scratch::new(dir, "fams-scan");
    let scan_pages = (256u64 << 20) / page;
    let mut file = FamsFile::create(&scan_data.0, scan_pages * page, scan_pages * page)?;
    file.sync()?;
    let scan_ms = median(
        (0..5)
            .map(|_| -> Result<f64, nvhtm::fams::FamsError> {
                let start = Instant::now();
                file.sync()?;
                Ok(start.elapsed().as_secs_f64() * 1e3)
            })
            .collect::<Result<_, _>>()?,
    );
    let base = file.as_ptr();
    let touch = |n: u64| {
        let start = Instant::now();
        for p in 0..n {
            // SAFETY: page p lies inside the file's mapped contents.
            unsafe { std::ptr::write_volatile(base.add((p * page) as usize), p as u8) };
        }
        start.elapsed().as_nanos() as f64 / n as f64
    };
    let first = touch(scan_pages);
    let again = touch(scan_pages);
    file.sync()?;
    drop(file);
    let _ = std::fs::remove_file(nvhtm::fams::journal_path(&scan_data.0));

    // The strict map: FAMS syncing every N inserts, Msync per insert, Volatile.
    let mut map_results: Vec<(String, f64)> = Vec::new();
    let opts = PoolOptions::layout("bench").with_size(16 << 20);
    let keys = 20_000u64;
    let volatile = Scratch::new(dir, "fams-map-volatile");
    {
        let map = nvhtm::StrictMap::open(nvhtm::Heap::<Volatile>::create(&volatile.0, &opts)?)?;
        let start = Instant::now();
        for i in 0..keys {
            map.upsert(&bench_key(i, 8), &i.to_le_bytes())?;
        }
        map_results
            .push(("volatile (no durability)".into(), keys as f64 / start.elapsed().as_secs_f64() / 1e3));
    }
    for every in [10_000u64, 1000, 100] {
        let path = Scratch::new(dir, &format!("fams-map-{every}"));
        let map = nvhtm::StrictMap::open(nvhtm::Heap::format(
            nvhtm::Pool::<Volatile>::create_fams(&path.0, &opts)?,
            &Default::default(),
        )?)?;
        let start = Instant::now();
        for i in 0..keys {
            map.upsert(&bench_key(i, 8), &i.to_le_bytes())?;
            if (i + 1) % every == 0 {
                map.heap().pool().sync()?;
            }
        }
        map_results
            .push((format!("FAMS, sync every {every}"), keys as f64 / start.elapsed().as_secs_f64() / 1e3));
        drop(map);
        let _ = std::fs::remove_file(nvhtm::fams::journal_path(&path.0));
    }
    {
        let path = Scratch::new(dir, "fams-map-msync");
        let map = nvhtm::StrictMap::open(nvhtm::Heap::<Msync>::create(&path.0, &opts)?)?;
        let n = 1000u64;
        let start = Instant::now();
        for i in 0..n {
            map.upsert(&bench_key(i, 8), &i.to_le_bytes())?;
        }
        map_results
            .push(("msync per insert (strict)".into(), n as f64 / start.elapsed().as_secs_f64() / 1e3));
    }
    let volatile_kops = map_results[0].1;
    let map: Vec<FamsMapResult> = map_results
        .into_iter()
        .map(|(case, k)| FamsMapResult { ratio_to_volatile: k / volatile_kops, case, kops_per_second: k })
        .collect();

    let snapshot = match reflink_dir {
        Some(d) => snapshot_growth(d)?,
        None => Vec::new(),
    };
    let machine = Machine::here();
    println!(
        "FAMS on {} ({} cores), files in {}, dirty tracking: {tracker}",
        machine.cpu,
        machine.cores,
        dir.display()
    );
    print_table(
        &["dirty pages", "sync ms", "floor ms", "x floor"],
        results.iter().map(|r| {
            vec![
                r.dirty_pages.to_string(),
                format!("{:.3}", r.sync_ms),
                format!("{:.3}", r.floor_ms),
                format!("{:.2}", r.ratio_to_floor),
            ]
        }),
    );
    let per_gib = scan_ms * ((1u64 << 30) as f64 / (scan_pages * page) as f64);
    println!("dirty scan: {per_gib:.2} ms per GiB mapped (nothing dirty)");
    println!("first write to a page after a sync: {first:.0} ns; writing it again: {again:.0} ns");
    print_table(
        &["strict map, 8 B keys", "kops/s", "x volatile"],
        map.iter().map(|r| {
            vec![
                r.case.to_string(),
                format!("{:.1}", r.kops_per_second),
                format!("{:.3}", r.ratio_to_volatile),
            ]
        }),
    );
    if !snapshot.is_empty() {
        println!("snapshot variant (64 MiB working file, FICLONE):");
        print_table(
            &["extents", "sync ms"],
            snapshot.iter().map(|r| vec![r.extents.to_string(), format!("{:.2}", r.sync_ms)]),
        );
    }
    write_json(
        json,
        &FamsReport {
            bench: "fams",
            machine,
            tracker,
            sync: results,
            scan_ms_per_gib: per_gib,
            first_write_ns_per_page: first,
            rewrite_ns_per_page: again,
            map,
            snapshot,
        },
    )
}
