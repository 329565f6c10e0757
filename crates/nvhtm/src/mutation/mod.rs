//! One persistence mutation score for the whole project: every flush and fence site switched
//! off in turn, under the crash suites that exercise it.
//!
//! A [`Suite`] is a workload recorded with the [`Sim`] domain, an oracle, and the
//! [`CrashTest`] settings it is crashed with. Its
//! [`CrashTest::mutation_run`](crate::CrashTest::mutation_run) replays the recording once with
//! every site, then once per flush/fence site with that site's effect removed: the site is
//! *caught* when some crash image then fails the oracle. [`run_suites`] runs suites and merges
//! their outcomes into one [`MutationTable`], one row per distinct site (`file:line:column`):
//! a site is caught when any suite that reached it caught it. The crash tests run the same
//! suites (`tests/heap_crash.rs`, `tests/map_crash.rs`, `tests/log_crash.rs`,
//! `tests/queue_crash.rs`, `tests/pool.rs`, `tests/litmus.rs`), and so does `nvhtm mutation`.
//!
//! ```
//! use nvhtm::mutation::{run_suites, suite};
//! let table = run_suites(&[suite("pool-header").unwrap()]);
//! assert!(table.passed(), "{table}");
//! assert!(table.sites.iter().all(|row| row.caught && row.structure == "pool"));
//! println!("{table}");
//! ```

pub mod fams;
pub mod heap;
pub mod hybrid;
pub mod log;
pub mod map;
pub mod periodic;
pub mod pool;
pub mod queue;

use std::collections::BTreeMap;
use std::fmt;
use std::time::Instant;

use crate::persist::Site;
use crate::pool::{ImageSlot, PoolOptions};
use crate::sim::litmus::Protocol;
use crate::sim::{CrashContext, CrashTest, MutationReport, Sim};
use crate::{Heap, Pool};

/// Opens a crash image's heap in this thread's reusable [`ImageSlot`] (restoring only the lines
/// that differ from the previous image) and runs `f` on it: the first step of every heap and
/// map check. An image whose heap does not open is rejected with the error.
///
/// ```
/// use nvhtm::mutation::{heap::opts, with_heap};
/// use nvhtm::sim::{CrashTest, Sim};
/// let sim = Sim::new();
/// let heap = nvhtm::Heap::create_in_memory(&opts(), sim.clone()).unwrap();
/// sim.restart_recording().unwrap();
/// heap.transaction(|tx| tx.alloc_bytes(100).map(drop)).unwrap();
/// let report = CrashTest::default().run(&sim.recording(), |sim, image, ctx| {
///     with_heap(sim, image, ctx, &opts(), |heap| Ok(heap.stats().map_err(|e| e.to_string())?.chunks))
///         .map(drop)
/// });
/// report.assert_passed();
/// ```
pub fn with_heap<R>(
    sim: &Sim,
    image: &[u8],
    ctx: &CrashContext,
    opts: &PoolOptions,
    f: impl FnOnce(Heap<Sim>) -> Result<R, String>,
) -> Result<R, String> {
    ImageSlot::with_local(&ctx.delta, |slot| Heap::open_image_in(slot, image, opts, sim.clone(), f))
        .map_err(|e| e.to_string())?
}

/// [`with_heap`] for checks of the pool itself: opens the crash image as a pool in this thread's
/// reusable [`ImageSlot`] and runs `f` on it.
///
/// ```
/// use nvhtm::mutation::{pool::{opts, record_header_updates}, with_pool};
/// nvhtm::CrashTest::default()
///     .run(&record_header_updates(), |sim, image, ctx| with_pool(sim, image, ctx, &opts(), |_| Ok(())))
///     .assert_passed();
/// ```
pub fn with_pool<R>(
    sim: &Sim,
    image: &[u8],
    ctx: &CrashContext,
    opts: &PoolOptions,
    f: impl FnOnce(Pool<Sim>) -> Result<R, String>,
) -> Result<R, String> {
    ImageSlot::with_local(&ctx.delta, |slot| Pool::open_image_in(slot, image, opts, sim.clone(), f))
        .map_err(|e| e.to_string())?
}

/// Whether the heap holds exactly a log-based structure's root and its `segments` allocated,
/// so that a crash leaked no block.
pub(crate) fn no_leak<D: crate::Domain>(heap: &Heap<D>, segments: u64) -> Result<(), String> {
    let stats = heap.stats().map_err(|e| e.to_string())?;
    if stats.small_blocks + stats.large_blocks != segments + 1 {
        return Err(format!("the heap holds {stats:?} for {segments} segments and the root: a leak"));
    }
    Ok(())
}

/// A named crash suite of one structure: a recorded workload, its oracle, and the crash
/// settings, run as a mutation test.
///
/// ```
/// let suite = nvhtm::mutation::suite("litmus").unwrap();
/// let report = suite.run();
/// report.baseline.assert_passed();
/// assert!(report.missed().is_empty(), "{report}");
/// ```
#[derive(Debug)]
pub struct Suite {
    /// The suite's name (`nvhtm mutation --suite NAME`).
    pub name: &'static str,
    /// What it exercises, in a few words.
    pub about: &'static str,
    run: fn() -> MutationReport,
}

impl Suite {
    /// Records the workload and runs the mutation test: the baseline (every site on, which
    /// must pass) and one run per site.
    pub fn run(&self) -> MutationReport {
        (self.run)()
    }
}

/// Every suite, cheapest first.
///
/// ```
/// let names: Vec<&str> = nvhtm::mutation::SUITES.iter().map(|s| s.name).collect();
/// assert!(names.contains(&"heap-two-threads"));
/// ```
pub const SUITES: &[Suite] = &[
    Suite {
        name: "litmus",
        about: "the simulator's correct persist-then-publish protocol",
        run: litmus_suite,
    },
    Suite {
        name: "pool-header",
        about: "root, size and clean-flag updates; crashes while opening",
        run: pool::header_suite,
    },
    Suite {
        name: "fams-create",
        about: "a FAMS pool created over simulated files, crashed at every storage call",
        run: fams::create_suite,
    },
    Suite {
        name: "fams-file-two-runs",
        about:
            "FAMS commits and recovery on the file model, crashed at every storage call, two runs in a row",
        run: fams::two_runs_suite,
    },
    Suite {
        name: "heap-format",
        about: "a new heap laid out in a pool: published by the pool's root only once durable",
        run: heap::format_suite,
    },
    Suite {
        name: "heap-single",
        about: "random single-threaded transactions, frees, publishes, aborts",
        run: heap::single_suite,
    },
    Suite {
        name: "heap-two-threads",
        about: "two threads on the same words: retirements another thread's fence does not order",
        run: heap::two_threads_suite,
    },
    Suite {
        name: "heap-two-runs",
        about: "crash, recover, a nested transaction on another lane, crash",
        run: heap::two_runs_suite,
    },
    Suite {
        name: "log-single",
        about: "appends, batches and truncations across many segments, a clean close",
        run: log::single_suite,
    },
    Suite {
        name: "log-two-runs",
        about: "crash, recover (a new tail segment), append and truncate on, crash again",
        run: log::two_runs_suite,
    },
    Suite {
        name: "hybrid-single",
        about: "random hybrid-map operations with segment switches and log cleaning",
        run: hybrid::single_suite,
    },
    Suite {
        name: "hybrid-two-runs",
        about: "crash, recover (the log replayed into the index), work on, crash again",
        run: hybrid::two_runs_suite,
    },
    Suite {
        name: "queue-single",
        about: "enqueues, batches, dequeues by three consumers, checkpoints and truncations, a clean close",
        run: queue::single_suite,
    },
    Suite {
        name: "queue-two-runs",
        about: "crash, recover (a new tail segment), enqueue and dequeue on, crash again",
        run: queue::two_runs_suite,
    },
    Suite {
        name: "map-single",
        about: "random strict-map operations across a segment split",
        run: map::single_suite,
    },
    Suite {
        name: "map-two-runs",
        about: "a split crashed before its clearing, recovered, then inserts into its stale window",
        run: map::two_runs_suite,
    },
    Suite {
        name: "map-split-two-threads",
        about: "another thread reuses a slot a split cleared before the splitter fences again",
        run: map::split_two_threads_suite,
    },
    Suite {
        name: "periodic-single",
        about: "random periodic-map operations and transactions across a split, with advances and syncs",
        run: periodic::single_suite,
    },
    Suite {
        name: "periodic-two-runs",
        about: "crash, recover (failed epochs recorded), work on, crash again",
        run: periodic::two_runs_suite,
    },
];

/// The suite called `name`.
///
/// ```
/// assert!(nvhtm::mutation::suite("pool-header").is_some());
/// assert!(nvhtm::mutation::suite("no-such-suite").is_none());
/// ```
pub fn suite(name: &str) -> Option<&'static Suite> {
    SUITES.iter().find(|s| s.name == name)
}

fn litmus_suite() -> MutationReport {
    let protocol = Protocol::PersistThenPublish;
    CrashTest::default().mutation_run(&protocol.record(), |s, i, c| protocol.check_image(s, i, c))
}

/// The structure a source file belongs to: the directory under `src/` (`pool`, `heap`, `log`,
/// `queue`, `map`, `periodic`, `fams`, `persist`, `sim`), `litmus` for the simulator's litmus
/// protocols.
///
/// ```
/// use nvhtm::mutation::structure_of;
/// assert_eq!(structure_of("crates/nvhtm/src/heap/tx.rs"), "heap");
/// assert_eq!(structure_of("crates/nvhtm/src/queue/compact.rs"), "queue");
/// assert_eq!(structure_of("crates/nvhtm/src/sim/litmus.rs"), "litmus");
/// ```
pub fn structure_of(file: &str) -> &'static str {
    const KNOWN: [&str; 10] =
        ["pool", "heap", "hybrid", "log", "queue", "map", "periodic", "fams", "persist", "sim"];
    if file.ends_with("sim/litmus.rs") {
        return "litmus";
    }
    let rest = file.rsplit_once("src/").map_or(file, |(_, rest)| rest);
    let first = rest.split('/').next().unwrap_or(rest);
    KNOWN.into_iter().find(|k| *k == first || first.strip_suffix(".rs") == Some(k)).unwrap_or("other")
}

/// One flush or fence site of the merged table.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SiteRow {
    /// Source file, relative to the workspace.
    pub file: &'static str,
    /// Line.
    pub line: u32,
    /// Column.
    pub column: u32,
    /// The structure (see [`structure_of`]).
    pub structure: &'static str,
    /// Whether some suite's crash image failed without the site.
    pub caught: bool,
    /// The suites that caught it.
    pub caught_by: Vec<&'static str>,
    /// The suites that reached it.
    pub seen_by: Vec<&'static str>,
    /// Images checked with the site switched off, over all suites.
    pub images: u64,
    /// The first failure's message (of the first suite that caught it).
    pub failure: Option<String>,
}

impl SiteRow {
    /// The site as `file:line:column`.
    pub fn site(&self) -> Site {
        Site { file: self.file, line: self.line, column: self.column }
    }
}

/// One suite's run in the table.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SuiteRun {
    /// The suite's name.
    pub name: &'static str,
    /// Whether the baseline (every site on) passed; when not, the suite proves nothing.
    pub baseline_passed: bool,
    /// The baseline's first failure.
    pub baseline_failure: Option<String>,
    /// The baseline's summary line.
    pub baseline: String,
    /// Sites the suite reached.
    pub sites: usize,
    /// Of which it caught.
    pub caught: usize,
    /// Wall-clock seconds the suite took (recording, baseline and one run per site).
    pub seconds: f64,
}

/// A persistence call the simulator cannot switch off, listed so the table says so.
#[derive(Debug, Clone, serde::Serialize)]
pub struct NotMutated {
    /// Source file.
    pub file: &'static str,
    /// Line.
    pub line: u32,
    /// The structure.
    pub structure: &'static str,
    /// The call, as written.
    pub call: String,
    /// Why it is not mutated (the simulator cannot switch it off by site).
    pub reason: &'static str,
}

/// The merged outcome of several suites: one row per distinct site, in file and line order.
///
/// ```
/// use nvhtm::mutation::{suite, MutationTable};
/// let litmus = suite("litmus").unwrap();
/// let mut table = MutationTable::default();
/// table.add(litmus.name, &litmus.run(), 0.0);
/// assert_eq!(table.sites.len(), 2);
/// assert_eq!(table.caught(), 2);
/// assert!(table.missed().is_empty());
/// ```
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct MutationTable {
    /// Every site some suite reached.
    pub sites: Vec<SiteRow>,
    /// The suites run.
    pub suites: Vec<SuiteRun>,
    /// Persistence calls outside the simulators' reach (syncs of real files).
    pub not_mutated: Vec<NotMutated>,
}

impl MutationTable {
    /// Merges one suite's report into the table.
    pub fn add(&mut self, name: &'static str, report: &MutationReport, seconds: f64) {
        let mut rows: BTreeMap<Site, SiteRow> = self.sites.drain(..).map(|row| (row.site(), row)).collect();
        for outcome in &report.sites {
            let site = outcome.site;
            let row = rows.entry(site).or_insert_with(|| SiteRow {
                file: site.file,
                line: site.line,
                column: site.column,
                structure: structure_of(site.file),
                caught: false,
                caught_by: Vec::new(),
                seen_by: Vec::new(),
                images: 0,
                failure: None,
            });
            row.seen_by.push(name);
            row.images += outcome.images_checked;
            if outcome.caught {
                row.caught = true;
                row.caught_by.push(name);
                if row.failure.is_none() {
                    row.failure.clone_from(&outcome.failure);
                }
            }
        }
        self.sites = rows.into_values().collect();
        self.suites.push(SuiteRun {
            name,
            baseline_passed: report.baseline.passed(),
            baseline_failure: report.baseline.failures.first().map(ToString::to_string),
            baseline: report.baseline.to_string(),
            sites: report.sites.len(),
            caught: report.sites.iter().filter(|s| s.caught).count(),
            seconds,
        });
    }

    /// Sites no suite caught.
    pub fn missed(&self) -> Vec<&SiteRow> {
        self.sites.iter().filter(|row| !row.caught).collect()
    }

    /// How many sites some suite caught.
    pub fn caught(&self) -> usize {
        self.sites.iter().filter(|row| row.caught).count()
    }

    /// Every baseline passed and every site was caught.
    pub fn passed(&self) -> bool {
        self.suites.iter().all(|s| s.baseline_passed) && self.missed().is_empty()
    }
}

impl fmt::Display for MutationTable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let width = self
            .sites
            .iter()
            .map(|r| r.site().to_string().len())
            .chain(self.not_mutated.iter().map(|n| format!("{}:{}", n.file, n.line).len()))
            .max()
            .unwrap_or(4);
        writeln!(f, "{:<width$}  {:<9} {:<7} {:>7}  caught by", "site", "structure", "verdict", "images")?;
        for row in &self.sites {
            let verdict = if row.caught { "caught" } else { "MISSED" };
            let by = if row.caught {
                row.caught_by.join(", ")
            } else {
                format!("(seen by {})", row.seen_by.join(", "))
            };
            let site = row.site().to_string();
            writeln!(f, "{site:<width$}  {:<9} {verdict:<7} {:>7}  {by}", row.structure, row.images)?;
        }
        for n in &self.not_mutated {
            let site = format!("{}:{}", n.file, n.line);
            let (structure, call, reason) = (n.structure, &n.call, n.reason);
            writeln!(
                f,
                "{site:<width$}  {structure:<9} {:<7} {:>7}  not mutated: {call} ({reason})",
                "n/a", "-"
            )?;
        }
        for s in &self.suites {
            let verdict = if s.baseline_passed { "baseline passes" } else { "BASELINE FAILS" };
            writeln!(
                f,
                "suite {:<22} {:>3} of {:>3} sites caught, {verdict}, {:.1} s",
                s.name, s.caught, s.sites, s.seconds
            )?;
            if let Some(failure) = &s.baseline_failure {
                writeln!(f, "  {failure}")?;
            }
        }
        write!(f, "{} of {} sites caught", self.caught(), self.sites.len())?;
        if !self.not_mutated.is_empty() {
            write!(f, " ({} syncs of real files not mutated)", self.not_mutated.len())?;
        }
        Ok(())
    }
}

/// The syncs of real files, found in the embedded source: the FAMS snapshot variant's
/// (`SnapshotFile`, reflinks on XFS) and a plain pool file's (the `fsync` before a new pool is
/// renamed into place and of its directory, the `fsync` of a growth, the `msync` of
/// `Pool::sync`). They are `File::sync_all`/`msync` calls outside the simulated storage and
/// domain, so nothing can switch one off by site. (The journal variant's syncs go through
/// `Storage` and are mutated by the `fams-file-two-runs` suite; a pool's flushes under the file
/// model are the `Sim` domain's.)
fn real_file_syncs() -> Vec<NotMutated> {
    type Source = (&'static str, &'static str, &'static [&'static str], &'static str, &'static str);
    let files: [Source; 3] = [
        (
            "crates/nvhtm/src/fams/snapshot.rs",
            include_str!("../fams/snapshot.rs"),
            &[".sync(Role::", ".sync_dir()", ".sync_all()"],
            "fams",
            "File::sync_all on a real file, outside the simulated storage",
        ),
        (
            "crates/nvhtm/src/pool/open.rs",
            include_str!("../pool/open.rs"),
            &[".sync_all()"],
            "pool",
            "a new pool file's fsync before its rename, and its directory's: real files",
        ),
        (
            "crates/nvhtm/src/pool/backing.rs",
            include_str!("../pool/backing.rs"),
            &[".sync_all()", ".msync()"],
            "pool",
            "a shared file mapping's msync and a growth's fsync: real files",
        ),
    ];
    let mut out = Vec::new();
    for (file, text, calls, structure, reason) in files {
        for (i, line) in text.lines().enumerate() {
            let code = line.split("//").next().unwrap_or("");
            if calls.iter().any(|c| code.contains(c)) {
                out.push(NotMutated {
                    file,
                    line: i as u32 + 1,
                    structure,
                    call: code.trim().trim_end_matches(['?', ';']).to_string(),
                    reason,
                });
            }
        }
    }
    out
}

/// Runs the suites named `names` and checks what a structure's crash test claims: every
/// baseline passes, the suites reach at least `min_sites` sites of `structures`, and every
/// one of them is caught. Returns the table (for printing); panics with it otherwise.
///
/// ```
/// let table = nvhtm::mutation::assert_sites_caught(&["pool-header"], &["pool"], 1);
/// assert!(table.passed());
/// ```
pub fn assert_sites_caught(names: &[&str], structures: &[&str], min_sites: usize) -> MutationTable {
    let suites: Vec<_> =
        names.iter().map(|name| suite(name).unwrap_or_else(|| panic!("no suite {name:?}"))).collect();
    let table = run_suites(&suites);
    assert!(table.suites.iter().all(|s| s.baseline_passed), "{table}");
    let sites: Vec<_> = table.sites.iter().filter(|row| structures.contains(&row.structure)).collect();
    assert!(
        sites.len() >= min_sites,
        "{} sites of {structures:?}, expected at least {min_sites}\n{table}",
        sites.len()
    );
    let missed: Vec<String> =
        sites.iter().filter(|row| !row.caught).map(|row| row.site().to_string()).collect();
    assert!(missed.is_empty(), "no crash image needs {missed:?}\n{table}");
    table
}

/// Runs `suites` (on up to as many threads as there are cores) and merges their reports,
/// listing the syncs of real files (the FAMS snapshot variant's, a plain pool file's) as not
/// mutated.
///
/// ```
/// let table = nvhtm::mutation::run_suites(&[nvhtm::mutation::suite("litmus").unwrap()]);
/// assert_eq!(table.suites.len(), 1);
/// assert!(table.not_mutated.iter().any(|n| n.structure == "pool" && n.call.contains("msync")));
/// ```
pub fn run_suites(suites: &[&'static Suite]) -> MutationTable {
    let workers = std::thread::available_parallelism().map_or(1, |n| n.get()).min(suites.len()).max(1);
    let next = std::sync::atomic::AtomicUsize::new(0);
    let done = std::sync::Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for _ in 0..workers {
            s.spawn(|| loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let Some(suite) = suites.get(i) else { break };
                let start = Instant::now();
                let report = suite.run();
                done.lock().unwrap_or_else(|e| e.into_inner()).push((
                    i,
                    report,
                    start.elapsed().as_secs_f64(),
                ));
            });
        }
    });
    let mut done = done.into_inner().unwrap_or_else(|e| e.into_inner());
    done.sort_by_key(|(i, _, _)| *i);
    let mut table = MutationTable { not_mutated: real_file_syncs(), ..MutationTable::default() };
    for (i, report, seconds) in &done {
        table.add(suites[*i].name, report, *seconds);
    }
    table
}
