//! The pool commands.

pub mod demo;
pub mod map;
pub mod mutation;

use std::path::Path;

use nvhtm::heap::{CheckReport, LaneRecovery};
use nvhtm::periodic::PeriodicOptions;
use nvhtm::pool::{PoolInfo, PoolOptions};
use nvhtm::{AnyMap, AutoDomain, Heap, MapKind, Pool, PoolError};

/// What a command returns: any error is printed as `nvhtm: error: …` with exit status 1.
pub type CommandResult = Result<(), Box<dyn std::error::Error>>;

use crate::format::{human_size, utc};

/// Opens a pool in the mode it was created in (FAMS or mapped).
pub fn open_pool(path: &Path, opts: &PoolOptions) -> Result<Pool<AutoDomain>, PoolError> {
    if PoolInfo::read(path)?.fams {
        Pool::open_fams(path, opts)
    } else {
        Pool::open(path, opts)
    }
}

/// `nvhtm create`.
pub fn create(
    path: &Path,
    size: u64,
    layout: &str,
    fams: bool,
    map: Option<MapKind>,
    epoch_ms: f64,
    json: bool,
) -> CommandResult {
    let opts = PoolOptions::layout(layout).with_size(size);
    let heap = if fams {
        Heap::<AutoDomain>::create_fams(path, &opts)?
    } else {
        Heap::<AutoDomain>::create(path, &opts)?
    };
    let info = heap.pool().info();
    match map {
        Some(kind) => {
            let periodic = PeriodicOptions::manual().every(nvhtm::any_map::epoch_from_ms(epoch_ms));
            AnyMap::open(heap, kind, periodic)?.close()?
        }
        None => heap.close()?,
    }
    if json {
        print_json(&info);
    } else {
        println!(
            "created {}: {}, layout \"{}\", uuid {}, {} ({} domain)",
            path.display(),
            human_size(info.size),
            info.layout,
            info.uuid,
            info.filesystem,
            info.domain
        );
        if let Some(kind) = map {
            let epoch =
                if kind == MapKind::Periodic { format!(", epochs of {epoch_ms} ms") } else { String::new() };
            println!("with an empty {kind} map{epoch}");
        }
    }
    Ok(())
}

/// `nvhtm info`.
pub fn info(path: &Path, layout: Option<&str>, json: bool) -> CommandResult {
    let info = PoolInfo::read(path)?;
    if let Some(expected) = layout {
        if info.layout != expected {
            return Err(PoolError::WrongLayout {
                path: path.to_path_buf(),
                expected: expected.to_string(),
                found: info.layout,
            }
            .into());
        }
    }
    if json {
        print_json(&info);
        return Ok(());
    }
    let root = match info.root_offset {
        0 => "none".to_string(),
        offset => format!("{offset:#x} ({} bytes)", info.root_size),
    };
    let shutdown = if info.clean_shutdown { "clean" } else { "not clean (crashed, or open now)" };
    let durability = match (info.dax, info.filesystem.as_str()) {
        _ if info.fams => "FAMS: changes live in private memory and reach the file atomically at each sync",
        (true, _) => "DAX with MAP_SYNC: cache flushes are durable (cpu domain)",
        (false, "tmpfs") => {
            "tmpfs: emulated persistent memory, survives process crashes, not power loss (cpu domain)"
        }
        _ => "page cache: durable after msync (msync domain)",
    };
    let rows = [
        ("pool", info.path.display().to_string()),
        ("layout", info.layout.clone()),
        ("format", format!("version {}", info.format_version)),
        ("uuid", info.uuid.clone()),
        ("size", format!("{} ({} bytes)", human_size(info.size), info.size)),
        ("file size", format!("{} bytes", info.file_size)),
        ("root", root),
        ("shutdown", shutdown.to_string()),
        ("in use", if info.in_use { "yes, another process has it open" } else { "no" }.to_string()),
        ("created", utc(info.created_unix)),
        ("filesystem", info.filesystem.clone()),
        ("fams", if info.fams { "yes (journal: PATH.journal)" } else { "no" }.to_string()),
        ("durability", durability.to_string()),
        ("header seq", info.state_seq.to_string()),
    ];
    for (name, value) in rows {
        println!("{name:<11} {value}");
    }
    Ok(())
}

/// `nvhtm grow`.
pub fn grow(path: &Path, size: u64, layout: &str) -> CommandResult {
    let opts = PoolOptions::layout(layout);
    let pool = open_pool(path, &opts.clone().with_max_size(opts.max_size.max(size)))?;
    let before = pool.size();
    if size < before {
        return Err(format!(
            "{}: the pool is {} ({before} bytes); pools grow but do not shrink",
            path.display(),
            human_size(before)
        )
        .into());
    }
    pool.grow(size)?;
    let after = pool.size();
    pool.close()?;
    if after == before {
        println!("{}: already {} ({} bytes); nothing to do", path.display(), human_size(before), before);
    } else {
        println!("{}: grew from {} to {}", path.display(), human_size(before), human_size(after));
    }
    Ok(())
}

fn print_json(value: &impl serde::Serialize) {
    println!("{}", serde_json::to_string_pretty(value).unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}")));
}

/// `nvhtm litmus`.
pub fn litmus() -> CommandResult {
    use nvhtm::sim::litmus::{self, Protocol};
    use nvhtm::sim::CrashTest;

    let mut wrong = Vec::new();
    let mut verdict = |name: String, correct: bool, report: nvhtm::sim::CrashReport| {
        let outcome = match (correct, report.passed()) {
            (true, true) => "passes every crash image".to_string(),
            (false, false) => format!("CAUGHT: {}", report.failures[0].message),
            (true, false) => {
                wrong.push(name.clone());
                format!("FAILED: {}", report.failures[0])
            }
            (false, true) => {
                wrong.push(name.clone());
                "NOT CAUGHT".to_string()
            }
        };
        let images = report.images_checked + report.recovery_images_checked;
        println!("{name:<36} {:>3} points {images:>5} images  {outcome}", report.crash_points);
    };
    for protocol in Protocol::ALL {
        let recording = protocol.record();
        let report = CrashTest::default().run(&recording, |s, i, c| protocol.check_image(s, i, c));
        let kind = if protocol.is_correct() { "correct" } else { "broken" };
        verdict(format!("{protocol:?} ({kind})"), protocol.is_correct(), report);
    }
    let undo = litmus::undo_log_recording();
    for (correct, name) in
        [(true, "undo log, idempotent recovery"), (false, "undo log, recovery clears log first")]
    {
        let deep = CrashTest { recovery_depth: 2, ..CrashTest::default() };
        verdict(
            name.to_string(),
            correct,
            deep.run(&undo, |s, i, c| litmus::undo_log_check(s, i, c, correct)),
        );
    }
    if wrong.is_empty() {
        Ok(())
    } else {
        Err(format!("the simulator misjudged: {}", wrong.join(", ")).into())
    }
}

/// What `nvhtm check --json` prints.
#[derive(serde::Serialize)]
struct CheckOutput {
    pool: std::path::PathBuf,
    clean_shutdown: bool,
    repaired: bool,
    recovery: Vec<LaneRecovery>,
    report: CheckReport,
}

/// `nvhtm check`.
pub fn check(path: &Path, repair: bool, layout: &str, json: bool) -> CommandResult {
    let clean_shutdown = PoolInfo::read(path)?.clean_shutdown;
    let opts = PoolOptions::layout(layout);
    let bar = indicatif::ProgressBar::new(0).with_style(
        indicatif::ProgressStyle::with_template("checking {bar:40} {pos}/{len} chunks")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let mut progress = |done: u64, total: u64| {
        bar.set_length(total);
        bar.set_position(done);
    };
    // Always inspect first in private memory: a corrupt pool is reported, never written. A
    // FAMS pool is inspected as it will be once opened (its journal applied in memory).
    let fams = PoolInfo::read(path)?.fams;
    let (recovery, mut report) = {
        let heap =
            if fams { Heap::open_fams_private(path, &opts)? } else { Heap::open_private(path, &opts)? };
        (heap.recovery().to_vec(), heap.check(&mut progress))
    };
    let pending = recovery.iter().any(|r| *r != LaneRecovery::Idle);
    if repair && pending && report.is_consistent() {
        let heap = Heap::load(open_pool(path, &opts)?)?;
        report = heap.check(&mut progress);
        heap.close()?;
    }
    bar.finish_and_clear();
    let problems = report.problems.join("; ");
    if json {
        let out =
            CheckOutput { pool: path.to_path_buf(), clean_shutdown, repaired: repair, recovery, report };
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        print_check(path, clean_shutdown, repair, &recovery, &report);
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(format!("{}: the heap is inconsistent: {problems}", path.display()).into())
    }
}

fn print_check(path: &Path, clean: bool, repair: bool, recovery: &[LaneRecovery], report: &CheckReport) {
    println!("pool        {} (last shutdown {})", path.display(), if clean { "clean" } else { "NOT clean" });
    let pending: Vec<String> = recovery
        .iter()
        .enumerate()
        .filter_map(|(lane, r)| match r {
            LaneRecovery::Idle => None,
            LaneRecovery::RolledForward(n) => {
                Some(format!("lane {lane}: roll forward a committed operation ({n} words)"))
            }
            LaneRecovery::RolledBack(n) => {
                Some(format!("lane {lane}: roll back an unfinished transaction ({n} snapshots)"))
            }
        })
        .collect();
    if pending.is_empty() {
        println!("recovery    nothing in flight");
    } else {
        let how = if repair { "applied to the file" } else { "not written: run with --repair to apply" };
        println!("recovery    {} [{how}]", pending.join("; "));
    }
    println!(
        "heap        {} chunks of {} ({} free), {} large blocks ({} chunks), {} small blocks ({})",
        report.chunks,
        human_size(nvhtm::heap::CHUNK),
        report.free_chunks,
        report.large_blocks,
        report.large_chunks,
        report.small_blocks,
        human_size(report.small_bytes)
    );
    for class in &report.classes {
        println!(
            "  class {:>5} B: {} runs, {}/{} blocks used",
            class.block_size, class.runs, class.allocated, class.blocks
        );
    }
    println!("lanes       {} ({} busy)", report.lanes, report.busy_lanes);
    if report.problems.is_empty() {
        println!("result      consistent");
    } else {
        for problem in &report.problems {
            println!("PROBLEM     {problem}");
        }
    }
}
