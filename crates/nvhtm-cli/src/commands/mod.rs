//! The pool commands.

use std::path::Path;

use nvhtm::pool::{PoolInfo, PoolOptions};
use nvhtm::{AutoDomain, Pool, PoolError};

/// What a command returns: any error is printed as `nvhtm: error: …` with exit status 1.
pub type CommandResult = Result<(), Box<dyn std::error::Error>>;

use crate::format::{human_size, utc};

/// `nvhtm create`.
pub fn create(path: &Path, size: u64, layout: &str, json: bool) -> CommandResult {
    let opts = PoolOptions::layout(layout).with_size(size);
    let pool = Pool::<AutoDomain>::create(path, &opts)?;
    let info = pool.info();
    pool.close()?;
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
    let pool = Pool::<AutoDomain>::open(path, &opts.clone().with_max_size(opts.max_size.max(size)))?;
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

fn print_json(info: &PoolInfo) {
    println!("{}", serde_json::to_string_pretty(info).unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}")));
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
