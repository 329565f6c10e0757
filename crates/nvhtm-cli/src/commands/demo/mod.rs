//! `nvhtm demo`: the crash story as one command. A writer process inserts keys and reports each
//! acknowledged insert; the parent kills it with SIGKILL at a random moment, reopens the pool,
//! times recovery, verifies every acknowledged key and the heap, and repeats.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use nvhtm::periodic::PeriodicOptions;
use nvhtm::pool::PoolOptions;
use nvhtm::{AnyMap, AutoDomain, Heap, MapKind};

pub mod periodic;

use super::map::open;
use super::CommandResult;
use crate::format::human_size;

pub(super) fn key(i: u64) -> Vec<u8> {
    format!("key:{i:010}").into_bytes()
}

pub(super) fn value(i: u64) -> [u8; 8] {
    (i * 2_654_435_761).to_le_bytes()
}

/// The writer (hidden subcommand): upserts keys `start..start + count`, printing each index
/// once it is durable: after its upsert returns (strict), or after the sync that follows every
/// `sync_every` inserts (FAMS).
pub fn writer(pool: &Path, start: u64, count: u64, sync_every: u64) -> CommandResult {
    use std::io::Write;
    let map = open(pool, nvhtm::pool::DEFAULT_LAYOUT)?;
    // Acknowledgements go out in small batches, so the writer spends most of its time inside
    // inserts and the kill lands at a random point of one (not at a write system call).
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    for i in start..start + count {
        map.upsert(&key(i), &value(i))?;
        if sync_every == 0 {
            writeln!(out, "{i}")?;
            if i % 16 == 15 {
                out.flush()?;
            }
        } else if (i - start + 1) % sync_every == 0 {
            map.heap().pool().sync()?;
            writeln!(out, "{i}")?;
            out.flush()?;
        }
    }
    out.flush()?;
    drop(out);
    map.close()?;
    Ok(())
}

/// One round's outcome.
struct Round {
    acknowledged: u64,
    verified: u64,
    in_flight_present: bool,
    recovery_ms: f64,
}

/// `nvhtm demo` with a strict or hybrid map (`kind`).
/// With `fams = Some(n)`, the pool is a FAMS pool and the writer syncs every `n` inserts.
pub fn demo(
    keys: u64,
    rounds: u64,
    pool: Option<PathBuf>,
    fams: Option<u64>,
    kind: MapKind,
) -> CommandResult {
    let default = match (fams, kind) {
        (Some(_), _) => "/tmp/nvhtm-demo-fams.pool",
        (None, MapKind::Hybrid) => "/dev/shm/nvhtm-demo-hybrid.pool",
        (None, _) => "/dev/shm/nvhtm-demo-crash.pool",
    };
    let pool = pool.unwrap_or_else(|| PathBuf::from(default));
    let _ = std::fs::remove_file(&pool);
    let _ = std::fs::remove_file(nvhtm::fams::journal_path(&pool));
    let opts = PoolOptions::default().with_size(64 << 20);
    let heap = match fams {
        Some(_) => Heap::<AutoDomain>::create_fams(&pool, &opts)?,
        None => Heap::<AutoDomain>::create(&pool, &opts)?,
    };
    // The writer opens whatever map the pool's root holds.
    AnyMap::open(heap, kind, PeriodicOptions::manual())?.close()?;
    let sync_every = fams.unwrap_or(0);
    let exe = std::env::current_exe()?;
    let per_round = (keys / rounds.max(1)).max(1);
    let mut rng = fastrand::Rng::new();
    println!(
        "nvhtm demo: {kind} map, {rounds} rounds, about {per_round} keys each, pool {} (a writer process is killed with SIGKILL in every round){}",
        pool.display(),
        if sync_every > 0 { format!("; FAMS, a sync every {sync_every} inserts acknowledges them") } else { String::new() }
    );
    println!(
        "{:>5} {:>10} {:>11} {:>10} {:>9} {:>12}",
        "round", "acked", "total acked", "verified", "in-flight", "recovery ms"
    );
    let mut next = 0u64;
    let mut results = Vec::new();
    for round in 1..=rounds {
        // Kill after a random number of acknowledgements: the writer is then in the middle of
        // its next insert, at a random point of it.
        let acks_per_round = per_round.checked_div(sync_every).map_or(per_round, |n| n.max(1));
        let kill_after = rng.u64(acks_per_round / 2..=acks_per_round * 3 / 2).max(1);
        let mut child = Command::new(&exe)
            .args([
                "demo-writer",
                &pool.to_string_lossy(),
                &next.to_string(),
                &(per_round * 2).to_string(),
                &sync_every.to_string(),
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()?;
        let stdout = child.stdout.take().ok_or("no pipe from the writer")?;
        let mut acked: Option<u64> = None;
        let mut count = 0u64;
        for line in BufReader::new(stdout).lines() {
            let index: u64 = line?.trim().parse()?;
            acked = Some(index);
            count += 1;
            if count == kill_after {
                let _ = child.kill(); // SIGKILL; the acknowledgements already written stay valid
            }
        }
        let status = child.wait()?;
        // Reopen, timing recovery, and verify.
        let start = Instant::now();
        let map =
            AnyMap::open(Heap::load(super::open_pool(&pool, &opts)?)?, kind, PeriodicOptions::manual())?;
        let recovery_ms = start.elapsed().as_secs_f64() * 1e3;
        let last = acked.map_or(next, |a| a + 1);
        let mut verified = 0;
        for i in next..last {
            match map.get(&key(i))? {
                Some(v) if v == value(i) => verified += 1,
                Some(_) => {
                    return Err(format!("round {round}: key {i} has a wrong value after the crash").into())
                }
                None => {
                    return Err(
                        format!("round {round}: acknowledged key {i} is missing after the crash").into()
                    )
                }
            }
        }
        for _ in 0..1000.min(next) {
            let i = rng.u64(..next);
            if map.get(&key(i))?.as_deref() != Some(&value(i)[..]) {
                return Err(format!("round {round}: key {i} of an earlier round is missing or wrong").into());
            }
        }
        let in_flight_present = match map.get(&key(last))? {
            Some(v) if v == value(last) => true,
            Some(_) => return Err(format!("round {round}: the in-flight key {last} is torn").into()),
            None => false,
        };
        let report = map.heap().check(&mut |_, _| {});
        if !report.is_consistent() {
            return Err(format!("round {round}: the heap is inconsistent: {:?}", report.problems).into());
        }
        if let AnyMap::Hybrid(hybrid) = &map {
            let problems = hybrid.check()?;
            if !problems.is_empty() {
                return Err(format!("round {round}: the hybrid map is inconsistent: {problems:?}").into());
            }
        }
        map.close()?;
        println!(
            "{round:>5} {:>10} {:>11} {verified:>10} {:>9} {recovery_ms:>12.2}{}",
            last - next,
            last,
            if in_flight_present { "present" } else { "absent" },
            if status.success() { "  (writer finished before the kill)" } else { "" }
        );
        results.push(Round { acknowledged: last - next, verified, in_flight_present, recovery_ms });
        next = last;
    }
    let acknowledged: u64 = results.iter().map(|r| r.acknowledged).sum();
    let verified: u64 = results.iter().map(|r| r.verified).sum();
    let mean = results.iter().map(|r| r.recovery_ms).sum::<f64>() / results.len().max(1) as f64;
    let max = results.iter().map(|r| r.recovery_ms).fold(0.0, f64::max);
    let in_flight = results.iter().filter(|r| r.in_flight_present).count();
    let size = std::fs::metadata(&pool)?.len();
    println!(
        "summary: {rounds} kills, {acknowledged} keys acknowledged, {verified} verified, 0 lost; \
         in-flight insert present after {in_flight} of {rounds} crashes; recovery mean {mean:.2} ms, max {max:.2} ms; pool {}",
        human_size(size)
    );
    Ok(())
}
