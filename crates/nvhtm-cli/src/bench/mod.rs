//! `nvhtm bench`: measurements of the persistence layer, always side by side in one run and
//! reported as ratios to a baseline measured in the same run.

use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Subcommand;
use serde::Serialize;

use crate::commands::CommandResult;

mod alloc;
mod fams;
mod heap;
#[cfg(feature = "lmdb")]
mod lmdb;
mod log;
mod map;
mod persist;
mod sim;
mod zipf;

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
    /// The strict map against hashbrown (`HashMap<u64, u64>` for 8-byte keys and values,
    /// `HashMap<[u8; 16], Box<[u8]>>` for 16-byte keys and 100-byte values) and against itself
    /// on the Volatile domain, and the periodic map beside it (its ratio to the strict map):
    /// insert, get hit and miss (uniform and zipfian), update, delete,
    /// on 1 and 2 threads, with every key and lookup sequence built before timing and the
    /// Rust-heap allocations inside the timed loops counted; and open time as the key count
    /// grows.
    Map {
        /// Directory on tmpfs (or DAX) for the pools.
        #[arg(long, default_value = "/dev/shm")]
        pmem_dir: PathBuf,
        /// Key counts, each a separate set of maps.
        #[arg(long, value_delimiter = ',', default_value = "10000000")]
        keys: Vec<u64>,
        /// Thread counts.
        #[arg(long, value_delimiter = ',', default_value = "1,2")]
        threads: Vec<usize>,
        /// Key/value sizes in bytes: 8/8 and 16/100.
        #[arg(long, value_delimiter = ',', default_value = "8/8,16/100", value_parser = map::Shape::parse)]
        shapes: Vec<map::Shape>,
        /// Interleaved repetitions of every case (the median is reported).
        #[arg(long, default_value_t = 3)]
        rounds: usize,
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
    /// Durable writes that return once durable: the persistent log's 64-byte appends (on
    /// /dev/shm and on a disk file), and one durable insert per operation into the strict map
    /// and the hybrid map on a disk file (and LMDB, with the `lmdb` feature), at several thread
    /// counts: operations per second, fences and syncs per operation (group commit).
    Log {
        /// Directory on tmpfs (or DAX) for the cpu pools.
        #[arg(long, default_value = "/dev/shm")]
        pmem_dir: PathBuf,
        /// Directory on an ordinary (page-cache) file system for the msync pools.
        #[arg(long, default_value = ".")]
        disk_dir: PathBuf,
        /// Thread counts.
        #[arg(long, value_delimiter = ',', default_value = "1,2,16")]
        threads: Vec<usize>,
        /// Operations per run on /dev/shm.
        #[arg(long, default_value_t = 200_000)]
        pmem_ops: u64,
        /// Operations per run on the disk file.
        #[arg(long, default_value_t = 3000)]
        disk_ops: u64,
        /// Interleaved repetitions of every case (the median is reported).
        #[arg(long, default_value_t = 3)]
        rounds: usize,
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
            persist::persist(&disk_dir, &pmem_dir, Duration::from_millis(millis), json.as_deref())
        }
        Which::Heap { pmem_dir, millis, json } => {
            heap::heap(&pmem_dir, Duration::from_millis(millis), json.as_deref())
        }
        Which::Map { pmem_dir, keys, threads, shapes, rounds, open_keys, json } => {
            if keys.contains(&0) || threads.contains(&0) || rounds == 0 || open_keys.is_empty() {
                return Err("bench map: key counts, thread counts and rounds must be positive".into());
            }
            map::map(&map::MapArgs {
                pmem_dir: &pmem_dir,
                keys: &keys,
                threads: &threads,
                shapes: &shapes,
                rounds,
                open_keys: &open_keys,
                json: json.as_deref(),
            })
        }
        Which::Log { pmem_dir, disk_dir, threads, pmem_ops, disk_ops, rounds, json } => {
            if threads.contains(&0) || rounds == 0 || pmem_ops == 0 || disk_ops == 0 {
                return Err("bench log: thread counts, operations and rounds must be positive".into());
            }
            log::log(&pmem_dir, &disk_dir, &threads, pmem_ops, disk_ops, rounds, json.as_deref())
        }
        Which::Fams { dir, reflink_dir, json } => fams::fams(&dir, reflink_dir.as_deref(), json.as_deref()),
        Which::Sim { json } => sim::sim(json.as_deref()),
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

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn bench_key(i: u64, len: usize) -> Vec<u8> {
    let mut k = (i.wrapping_mul(0x9e37_79b9_7f4a_7c15)).to_le_bytes().to_vec();
    k.resize(len, (i >> 56) as u8 ^ 0x5a);
    if len > 8 {
        k[8..16].copy_from_slice(&i.to_le_bytes());
    }
    k
}
