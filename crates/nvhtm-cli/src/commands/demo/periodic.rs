//! `nvhtm demo --map periodic`: the periodic map's crash story. A writer process upserts keys
//! in order into a periodic map whose persister ends an epoch every few milliseconds,
//! reporting each completed upsert (`op i`) and each completed `sync()` (`sync i`); the
//! parent kills it with SIGKILL at a random moment, reopens the pool and checks buffered
//! durable linearizability: the map holds exactly the keys of a prefix of the upserts, and
//! that prefix includes every upsert before the last acknowledged sync. It prints how many
//! completed upserts each crash lost.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use nvhtm::any_map::epoch_from_ms;
use nvhtm::periodic::{PeriodicMap, PeriodicOptions};
use nvhtm::pool::PoolOptions;
use nvhtm::{AutoDomain, Heap};

use super::{key, value};
use crate::commands::CommandResult;

fn opts() -> PoolOptions {
    PoolOptions::default().with_size(64 << 20).with_max_size(1 << 30)
}

/// The writer (hidden subcommand): upserts keys `start..start + count`, printing `op i` after
/// each upsert returns and `sync i` after the sync that follows every `sync_every` upserts.
pub fn writer(pool: &Path, start: u64, count: u64, sync_every: u64, epoch_ms: f64) -> CommandResult {
    let heap = Heap::load(crate::commands::open_pool(pool, &opts())?)?;
    let map = PeriodicMap::open(heap, PeriodicOptions::default().every(epoch_from_ms(epoch_ms)))?;
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    for i in start..start + count {
        map.upsert(&key(i), &value(i))?;
        writeln!(out, "op {i}")?;
        if (i - start + 1) % sync_every == 0 {
            map.sync()?;
            writeln!(out, "sync {i}")?;
            out.flush()?;
        } else if i % 16 == 15 {
            out.flush()?;
        }
    }
    out.flush()?;
    drop(out);
    map.close()?;
    Ok(())
}

/// `nvhtm demo --map periodic`.
pub fn demo(keys: u64, rounds: u64, pool: Option<PathBuf>, sync_every: u64, epoch_ms: f64) -> CommandResult {
    let pool = pool.unwrap_or_else(|| PathBuf::from("/dev/shm/nvhtm-demo-periodic.pool"));
    let _ = std::fs::remove_file(&pool);
    let heap = Heap::<AutoDomain>::create(&pool, &opts())?;
    PeriodicMap::open(heap, PeriodicOptions::manual().every(epoch_from_ms(epoch_ms)))?.close()?;
    let exe = std::env::current_exe()?;
    let per_round = (keys / rounds.max(1)).max(1);
    let mut rng = fastrand::Rng::new();
    println!(
        "nvhtm demo --map periodic: {rounds} rounds, about {per_round} upserts each, epochs of {epoch_ms} ms, \
         a sync every {sync_every} upserts, pool {} (a writer process is killed with SIGKILL in every round)",
        pool.display()
    );
    println!(
        "{:>5} {:>10} {:>10} {:>10} {:>10} {:>12}",
        "round", "completed", "synced", "kept", "lost", "recovery ms"
    );
    let mut next = 0u64;
    let mut lost_total = 0u64;
    let mut completed_total = 0u64;
    let mut recovery = Vec::new();
    for round in 1..=rounds {
        let kill_after = rng.u64(per_round / 2..=per_round * 3 / 2).max(1);
        let mut child = Command::new(&exe)
            .args(["demo-writer", &pool.to_string_lossy(), &next.to_string(), &(per_round * 2).to_string()])
            .args([sync_every.to_string(), "--periodic-epoch-ms".into(), epoch_ms.to_string()])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()?;
        let stdout = child.stdout.take().ok_or("no pipe from the writer")?;
        // Upserts completed and synced, as counts from `next`.
        let (mut completed, mut synced) = (0u64, 0u64);
        for line in BufReader::new(stdout).lines() {
            let line = line?;
            let (what, index) = line.split_once(' ').ok_or("a malformed line from the writer")?;
            let count = index.parse::<u64>()? + 1 - next;
            match what {
                "op" => completed = count,
                "sync" => synced = count,
                _ => return Err(format!("the writer said {line:?}").into()),
            }
            if completed == kill_after {
                let _ = child.kill();
            }
        }
        let status = child.wait()?;
        let start = Instant::now();
        let heap = Heap::load(crate::commands::open_pool(&pool, &opts())?)?;
        // The arena's scan runs after `open` returns (what a server does): not part of recovery.
        let mut map =
            PeriodicMap::open(heap, PeriodicOptions { background_scan: true, ..PeriodicOptions::manual() })?;
        let recovery_ms = start.elapsed().as_secs_f64() * 1e3;
        map.wait_for_scan()?;
        // The prefix the map kept: keys next.. present in order, then none. (The writer may
        // have completed more upserts than it reported before the kill: its reports are
        // buffered, so the prefix may be longer than `completed`.)
        let mut kept = 0u64;
        while let Some(v) = map.get(&key(next + kept))? {
            if v != value(next + kept) {
                return Err(format!("round {round}: key {} has a wrong value", next + kept).into());
            }
            kept += 1;
        }
        for i in next + kept..next + kept.max(completed) + 64 {
            if map.get(&key(i))?.is_some() {
                return Err(format!(
                    "round {round}: key {i} is present after the gap at {}: no prefix",
                    next + kept
                )
                .into());
            }
        }
        if kept < synced {
            return Err(format!(
                "round {round}: only {kept} upserts kept, but {synced} were acknowledged by a sync"
            )
            .into());
        }
        for _ in 0..1000.min(next) {
            let i = rng.u64(..next);
            if map.get(&key(i))?.as_deref() != Some(&value(i)[..]) {
                return Err(format!("round {round}: key {i} of an earlier round is missing or wrong").into());
            }
        }
        map.sync()?;
        let check = map.check()?;
        if !check.problems.is_empty() {
            return Err(format!("round {round}: the map is inconsistent: {:?}", check.problems).into());
        }
        map.close()?;
        let lost = completed.saturating_sub(kept);
        println!(
            "{round:>5} {completed:>10} {synced:>10} {kept:>10} {lost:>10} {recovery_ms:>12.2}{}",
            if status.success() { "  (writer finished before the kill)" } else { "" }
        );
        lost_total += lost;
        completed_total += completed;
        recovery.push(recovery_ms);
        next += kept;
    }
    let mean = recovery.iter().sum::<f64>() / recovery.len().max(1) as f64;
    println!(
        "summary: {rounds} kills, epochs of {epoch_ms} ms: {completed_total} upserts completed, {} kept, \
         {lost_total} lost to crashes (mean {:.1} per crash, none acknowledged by a sync); every crash kept a prefix; \
         recovery mean {mean:.2} ms",
        completed_total - lost_total,
        lost_total as f64 / rounds.max(1) as f64
    );
    Ok(())
}
