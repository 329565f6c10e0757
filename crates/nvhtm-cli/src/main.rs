//! The `nvhtm` command: create, inspect, grow and benchmark persistent-memory pools.

mod bench;
mod commands;
mod format;
mod serve;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Persistent-memory pools: durable in-memory data structures in a mapped file.
#[derive(Debug, Parser)]
#[command(name = "nvhtm", version, about, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create a pool file holding an empty heap.
    Create {
        /// Path of the new pool (must not exist).
        pool: PathBuf,
        /// Pool size, e.g. 64MiB, 1G, 65536 (binary units).
        #[arg(long, default_value = "64MiB", value_parser = format::parse_size)]
        size: u64,
        /// Application layout name stored in the header and checked on open.
        #[arg(long, default_value = nvhtm::pool::DEFAULT_LAYOUT)]
        layout: String,
        /// A FAMS pool: changes stay in private memory and reach the file atomically at each
        /// sync (every command syncs before it exits), on any file system.
        #[arg(long)]
        fams: bool,
        /// Also create a map in it: `strict` (every write durable when it returns) or
        /// `periodic` (Dalí: durable within two epochs or at a sync). Without it, the first map
        /// command creates a strict one.
        #[arg(long, value_enum)]
        map: Option<MapArg>,
        /// The periodic map's epoch length in milliseconds (fractions allowed).
        #[arg(long, default_value_t = 10.0, requires = "map")]
        epoch_ms: f64,
        /// Print the new pool's facts as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show a pool's header, size, layout, UUID, file system, DAX and shutdown state.
    Info {
        /// The pool file.
        pool: PathBuf,
        /// Fail unless the pool has this layout.
        #[arg(long)]
        layout: Option<String>,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Check a pool's heap: every chunk and block accounted for, logs recoverable. Without
    /// --repair nothing is written (recovery runs on a private copy-on-write mapping).
    Check {
        /// The pool file.
        pool: PathBuf,
        /// Apply recovery to the file (roll forward or back what a crash left in flight).
        #[arg(long)]
        repair: bool,
        /// The pool's layout name.
        #[arg(long, default_value = nvhtm::pool::DEFAULT_LAYOUT)]
        layout: String,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Set KEY to VALUE in the pool's map (created on first use).
    Set {
        /// The pool file.
        pool: PathBuf,
        /// The key.
        key: String,
        /// The value.
        value: String,
        /// The pool's layout name.
        #[arg(long, default_value = nvhtm::pool::DEFAULT_LAYOUT)]
        layout: String,
    },
    /// Print the value of KEY (exit status 1 if absent).
    Get {
        /// The pool file.
        pool: PathBuf,
        /// The key.
        key: String,
        /// The pool's layout name.
        #[arg(long, default_value = nvhtm::pool::DEFAULT_LAYOUT)]
        layout: String,
    },
    /// Remove KEY; prints 1 if it was there, 0 if not.
    Del {
        /// The pool file.
        pool: PathBuf,
        /// The key.
        key: String,
        /// The pool's layout name.
        #[arg(long, default_value = nvhtm::pool::DEFAULT_LAYOUT)]
        layout: String,
    },
    /// Load tab-separated key/value lines (\t \n \r \\ escaped) from FILE (- for stdin).
    Load {
        /// The pool file.
        pool: PathBuf,
        /// The input file.
        file: PathBuf,
        /// The pool's layout name.
        #[arg(long, default_value = nvhtm::pool::DEFAULT_LAYOUT)]
        layout: String,
    },
    /// Print every entry as a tab-separated line (the format load reads).
    Dump {
        /// The pool file.
        pool: PathBuf,
        /// The pool's layout name.
        #[arg(long, default_value = nvhtm::pool::DEFAULT_LAYOUT)]
        layout: String,
    },
    /// Show the map's shape: entries, segments, directory depth, load factor.
    Stats {
        /// The pool file.
        pool: PathBuf,
        /// The pool's layout name.
        #[arg(long, default_value = nvhtm::pool::DEFAULT_LAYOUT)]
        layout: String,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// The crash demo: a writer process inserts keys and is killed with SIGKILL at a random
    /// moment in every round; each acknowledged key is verified after recovery.
    Demo {
        /// Keys in total (over all rounds).
        #[arg(long, default_value_t = 1_000_000)]
        keys: u64,
        /// Rounds (kills).
        #[arg(long, default_value_t = 20)]
        rounds: u64,
        /// The pool file (default /dev/shm/nvhtm-demo-crash.pool, /dev/shm/nvhtm-demo-hybrid.pool
        /// with --map hybrid, or /tmp/nvhtm-demo-fams.pool with --fams; recreated).
        #[arg(long)]
        pool: Option<PathBuf>,
        /// A FAMS pool: the writer syncs every --sync-every inserts and acknowledges each
        /// completed sync.
        #[arg(long)]
        fams: bool,
        /// Inserts between syncs with --fams or --map periodic.
        #[arg(long, default_value_t = 1000)]
        sync_every: u64,
        /// The map the writer uses: `strict` and `hybrid` acknowledge each upsert when it
        /// returns, and every acknowledged key must survive; with `periodic`, it reports every
        /// completed upsert and every completed sync, and each crash must keep a prefix of its
        /// upserts that includes everything before the last sync.
        #[arg(long, value_enum, default_value = "strict", conflicts_with = "fams")]
        map: MapArg,
        /// The periodic map's epoch length in milliseconds.
        #[arg(long, default_value_t = 10.0)]
        epoch_ms: f64,
    },
    /// The demo's writer process.
    #[command(hide = true)]
    DemoWriter {
        /// The pool file.
        pool: PathBuf,
        /// First key index.
        start: u64,
        /// Keys to write.
        count: u64,
        /// Sync (and acknowledge) every this many inserts; 0: acknowledge each insert.
        sync_every: u64,
        /// A periodic map with this epoch length in ms (reports `op i` and `sync i` lines).
        #[arg(long)]
        periodic_epoch_ms: Option<f64>,
    },
    /// Grow a pool in place to a new size.
    Grow {
        /// The pool file.
        pool: PathBuf,
        /// New size, e.g. 128MiB.
        #[arg(value_parser = format::parse_size)]
        size: u64,
        /// The pool's layout name.
        #[arg(long, default_value = nvhtm::pool::DEFAULT_LAYOUT)]
        layout: String,
    },
    /// Run the crash simulator on its litmus protocols: correct ones pass, broken ones are caught.
    Litmus,
    /// Persistence mutation testing: switch off every flush and fence site in turn under the
    /// crash suites that reach it, and print which are caught, by which suites. Fails if any
    /// site is missed.
    Mutation {
        /// Run only this suite (repeatable); the suites are listed in the table's footer.
        #[arg(long = "suite", value_name = "NAME")]
        suites: Vec<String>,
        /// Print JSON instead of the table.
        #[arg(long)]
        json: bool,
    },
    /// A Redis-protocol server whose data lives in a pool (redis-cli, redis-benchmark and
    /// client libraries work unchanged).
    Serve(serve::Options),
    /// Measure the persistence layer and the crash simulator (ratios, side by side).
    Bench {
        #[command(subcommand)]
        which: bench::Which,
    },
}

/// A map kind on the command line.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum MapArg {
    /// The strict map.
    Strict,
    /// The periodic (Dalí) map.
    Periodic,
    /// The hybrid map: a DRAM index over a persistent log.
    Hybrid,
}

impl MapArg {
    fn kind(self) -> nvhtm::MapKind {
        match self {
            MapArg::Strict => nvhtm::MapKind::Strict,
            MapArg::Periodic => nvhtm::MapKind::Periodic,
            MapArg::Hybrid => nvhtm::MapKind::Hybrid,
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result: commands::CommandResult = match cli.command {
        Command::Create { pool, size, layout, fams, map, epoch_ms, json } => {
            commands::create(&pool, size, &layout, fams, map.map(MapArg::kind), epoch_ms, json)
        }
        Command::Info { pool, layout, json } => commands::info(&pool, layout.as_deref(), json),
        Command::Check { pool, repair, layout, json } => commands::check(&pool, repair, &layout, json),
        Command::Grow { pool, size, layout } => commands::grow(&pool, size, &layout),
        Command::Set { pool, key, value, layout } => commands::map::set(&pool, &key, &value, &layout),
        Command::Get { pool, key, layout } => commands::map::get(&pool, &key, &layout),
        Command::Del { pool, key, layout } => commands::map::del(&pool, &key, &layout),
        Command::Load { pool, file, layout } => commands::map::load(&pool, &file, &layout),
        Command::Dump { pool, layout } => commands::map::dump(&pool, &layout),
        Command::Stats { pool, layout, json } => commands::map::stats(&pool, &layout, json),
        Command::Demo { keys, rounds, pool, fams, sync_every, map: MapArg::Periodic, epoch_ms } => {
            let _ = fams;
            commands::demo::periodic::demo(keys, rounds, pool, sync_every.max(1), epoch_ms)
        }
        Command::Demo { keys, rounds, pool, fams, sync_every, map, .. } => {
            commands::demo::demo(keys, rounds, pool, fams.then_some(sync_every.max(1)), map.kind())
        }
        Command::DemoWriter { pool, start, count, sync_every, periodic_epoch_ms: Some(epoch_ms) } => {
            commands::demo::periodic::writer(&pool, start, count, sync_every, epoch_ms)
        }
        Command::DemoWriter { pool, start, count, sync_every, periodic_epoch_ms: None } => {
            commands::demo::writer(&pool, start, count, sync_every)
        }
        Command::Litmus => commands::litmus(),
        Command::Mutation { suites, json } => commands::mutation::run(&suites, json),
        Command::Bench { which } => bench::run(which),
        Command::Serve(options) => serve::serve(options),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("nvhtm: error: {err}");
            ExitCode::FAILURE
        }
    }
}
