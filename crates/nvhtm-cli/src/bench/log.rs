//! `nvhtm bench log`: durable writes that return only once durable, by group commit. The
//! persistent log's 64-byte appends on a `/dev/shm` pool (cache-line write-back) and on a disk
//! file (`msync`), and on the disk file one durable insert per operation into the strict map
//! and into the hybrid map (one log record each), and LMDB (through heed, one write
//! transaction per put, its default durability: a sync per commit) when built with the `lmdb`
//! feature — at 1, 2 and 16 threads, interleaved rounds, medians. Fences and syncs per
//! operation show how many operations shared each commit.

use std::path::Path;
use std::sync::Barrier;
use std::time::Instant;

use nvhtm::hybrid::HybridMap;
use nvhtm::log::Log;
use nvhtm::persist::{global_stats, thread_stats, PersistStats};
use nvhtm::pool::PoolOptions;
use nvhtm::{Cpu, Heap, Msync, StrictMap};
use serde::Serialize;

use super::{median, print_table, write_json, Machine, Scratch};
use crate::commands::CommandResult;

/// One case: a medium, an engine and how it makes a write durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Case {
    LogPmem,
    LogDisk,
    StrictDisk,
    HybridDisk,
    #[cfg(feature = "lmdb")]
    LmdbDisk,
}

impl Case {
    fn all() -> Vec<Case> {
        #[allow(unused_mut)]
        let mut all = vec![Case::LogPmem, Case::LogDisk, Case::StrictDisk, Case::HybridDisk];
        #[cfg(feature = "lmdb")]
        all.push(Case::LmdbDisk);
        all
    }

    fn name(self) -> &'static str {
        match self {
            Case::LogPmem => "log append 64 B (cpu, /dev/shm)",
            Case::LogDisk => "log append 64 B (msync, disk)",
            Case::StrictDisk => "strict map insert 8/8 (msync, disk)",
            Case::HybridDisk => "hybrid map insert 8/8 (msync, disk)",
            #[cfg(feature = "lmdb")]
            Case::LmdbDisk => "lmdb put 8/8 (heed, disk)",
        }
    }

    fn durability(self) -> &'static str {
        match self {
            Case::LogPmem => "returns after its group commit's clwb + sfence",
            Case::LogDisk | Case::HybridDisk => "returns after its group commit's msync",
            Case::StrictDisk => "returns after the msyncs of its own fences",
            #[cfg(feature = "lmdb")]
            Case::LmdbDisk => "one write transaction per put, default flags (a sync per commit)",
        }
    }

    fn on_disk(self) -> bool {
        self != Case::LogPmem
    }
}

/// One measured figure (the median of the rounds).
#[derive(Debug, Serialize)]
struct LogResult {
    case: &'static str,
    durability: &'static str,
    threads: usize,
    ops: u64,
    ops_per_second: f64,
    fences_per_op: f64,
    syncs_per_op: f64,
    /// Over LMDB at the same thread count (when built with the `lmdb` feature).
    ratio_to_lmdb: Option<f64>,
    /// Over the strict map's durable insert at the same thread count (disk cases).
    ratio_to_strict: Option<f64>,
    rounds: usize,
}

#[derive(Debug, Serialize)]
struct LogReport {
    bench: &'static str,
    machine: Machine,
    command: String,
    disk_dir: String,
    results: Vec<LogResult>,
}

/// Runs `work(thread, i)` for `i` in each thread's share of `0..ops`, all threads started
/// together; returns the seconds from the start to the last one's end and the persistence
/// counters of the run.
fn timed(threads: usize, ops: u64, work: &(dyn Fn(usize, u64) + Sync)) -> (f64, PersistStats) {
    let start_line = Barrier::new(threads + 1);
    let finish_line = Barrier::new(threads + 1);
    std::thread::scope(|s| {
        for t in 0..threads {
            let (start_line, finish_line) = (&start_line, &finish_line);
            s.spawn(move || {
                let _ = thread_stats();
                start_line.wait();
                let share = ops * t as u64 / threads as u64..ops * (t as u64 + 1) / threads as u64;
                share.for_each(|i| work(t, i));
                finish_line.wait();
            });
        }
        let stats = global_stats();
        start_line.wait();
        let started = Instant::now();
        finish_line.wait();
        (started.elapsed().as_secs_f64(), global_stats() - stats)
    })
}

/// One run: operations, seconds, persistence counters.
type Run = (u64, f64, PersistStats);

fn key(i: u64) -> [u8; 8] {
    i.wrapping_mul(0x9e37_79b9_7f4a_7c15).to_le_bytes()
}

/// One run of `case` on `threads` threads.
fn run(
    case: Case,
    threads: usize,
    ops: u64,
    pmem_dir: &Path,
    disk_dir: &Path,
) -> Result<Run, Box<dyn std::error::Error>> {
    let opts = PoolOptions::layout("bench-log").with_size(64 << 20);
    let dir = if case.on_disk() { disk_dir } else { pmem_dir };
    let scratch = Scratch::new(dir, "log");
    let keys: Vec<[u8; 8]> = (0..ops).map(key).collect();
    let record = [0x42u8; 64];
    let (secs, stats) = match case {
        Case::LogPmem => {
            let log = Log::open(Heap::<Cpu>::create(&scratch.0, &opts)?)?;
            let r = timed(threads, ops, &|_, _| {
                log.append(&record).expect("append");
            });
            log.close()?;
            r
        }
        Case::LogDisk => {
            let log = Log::open(Heap::<Msync>::create(&scratch.0, &opts)?)?;
            let r = timed(threads, ops, &|_, _| {
                log.append(&record).expect("append");
            });
            log.close()?;
            r
        }
        Case::StrictDisk => {
            let map = StrictMap::open(Heap::<Msync>::create(&scratch.0, &opts)?)?;
            let r = timed(threads, ops, &|_, i| {
                assert!(map.insert(&keys[i as usize], &record[..8]).expect("insert"))
            });
            map.close()?;
            r
        }
        Case::HybridDisk => {
            let map = HybridMap::open(Heap::<Msync>::create(&scratch.0, &opts)?)?;
            let r = timed(threads, ops, &|_, i| {
                assert!(map.insert(&keys[i as usize], &record[..8]).expect("insert"))
            });
            map.close()?;
            r
        }
        #[cfg(feature = "lmdb")]
        Case::LmdbDisk => {
            super::lmdb::puts(&scratch.0.with_extension("lmdb"), threads, &keys, &record[..8], |t, n, w| {
                timed(t, n, w)
            })?
        }
    };
    Ok((ops, secs, stats))
}

/// `nvhtm bench log`.
pub(super) fn log(
    pmem_dir: &Path,
    disk_dir: &Path,
    threads: &[usize],
    pmem_ops: u64,
    disk_ops: u64,
    rounds: usize,
    json: Option<&Path>,
) -> CommandResult {
    let machine = Machine::here();
    let command = std::env::args().collect::<Vec<_>>().join(" ");
    println!("$ {command}");
    println!("machine: {} ({} cores, kernel {})", machine.cpu, machine.cores, machine.kernel);
    let mut runs: std::collections::BTreeMap<(Case, usize), Vec<Run>> = Default::default();
    for round in 0..rounds {
        for case in Case::all() {
            for &t in threads {
                let ops = if case.on_disk() { disk_ops } else { pmem_ops };
                runs.entry((case, t)).or_default().push(run(case, t, ops, pmem_dir, disk_dir)?);
            }
        }
        eprintln!("  round {}/{rounds} done", round + 1);
    }
    let rate = |case: Case, t: usize| -> Option<f64> {
        runs.get(&(case, t)).map(|v| median(v.iter().map(|(ops, secs, _)| *ops as f64 / secs).collect()))
    };
    let mut results = Vec::new();
    for (&(case, t), all) in &runs {
        let ops_per_second = rate(case, t).unwrap_or(f64::NAN);
        let total_ops: u64 = all.iter().map(|r| r.0).sum();
        let fences: u64 = all.iter().map(|r| r.2.fences).sum();
        let syncs: u64 = all.iter().map(|r| r.2.syncs).sum();
        #[cfg(feature = "lmdb")]
        let ratio_to_lmdb = rate(Case::LmdbDisk, t).filter(|_| case.on_disk()).map(|l| ops_per_second / l);
        #[cfg(not(feature = "lmdb"))]
        let ratio_to_lmdb = None;
        results.push(LogResult {
            case: case.name(),
            durability: case.durability(),
            threads: t,
            ops: all[0].0,
            ops_per_second,
            fences_per_op: fences as f64 / total_ops as f64,
            syncs_per_op: syncs as f64 / total_ops as f64,
            ratio_to_lmdb,
            ratio_to_strict: rate(Case::StrictDisk, t).filter(|_| case.on_disk()).map(|s| ops_per_second / s),
            rounds: all.len(),
        });
    }
    println!();
    println!(
        "durable writes: each returns once durable; {rounds} rounds interleaved, medians; disk dir {}",
        disk_dir.display()
    );
    print_table(
        &["case", "thr", "ops/s", "fences/op", "syncs/op", "x strict", "x lmdb"],
        results.iter().map(|r| {
            vec![
                r.case.to_string(),
                r.threads.to_string(),
                format!("{:.0}", r.ops_per_second),
                format!("{:.3}", r.fences_per_op),
                format!("{:.3}", r.syncs_per_op),
                r.ratio_to_strict.map_or("-".into(), |x| format!("{x:.2}")),
                r.ratio_to_lmdb.map_or("-".into(), |x| format!("{x:.2}")),
            ]
        }),
    );
    for case in Case::all() {
        println!("{}: {}", case.name(), case.durability());
    }
    write_json(
        json,
        &LogReport { bench: "log", machine, command, disk_dir: disk_dir.display().to_string(), results },
    )
}
