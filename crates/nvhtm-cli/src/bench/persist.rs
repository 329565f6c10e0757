//! `nvhtm bench persist`: the cost of persisting a line and a page in each domain.

use std::path::Path;
use std::time::{Duration, Instant};

use nvhtm::persist::{global_stats, Domain, FlushInstr, PersistStats};
use nvhtm::pool::{PoolOptions, HEADER_SIZE};
use nvhtm::sim::Sim;
use nvhtm::{Cpu, Msync, Pool, PoolError, Volatile};
use serde::Serialize;

use super::{print_table, write_json, Machine, Scratch};
use crate::commands::CommandResult;

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

pub(super) fn persist(
    disk_dir: &Path,
    pmem_dir: &Path,
    budget: Duration,
    json: Option<&Path>,
) -> CommandResult {
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
