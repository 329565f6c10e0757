//! `nvhtm bench sim`: crash images the simulator checks per second.

use std::cell::RefCell;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::Instant;

use nvhtm::pool::{ImageSlot, PoolOptions, HEADER_SIZE};
use nvhtm::sim::litmus::{self, Protocol};
use nvhtm::sim::{CrashContext, CrashTest, Recording, Sim};
use nvhtm::{Pool, PoolError};
use serde::Serialize;

use super::{print_table, write_json, Machine};
use crate::commands::CommandResult;

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
        verify_log(&pool, ctx)
    }
}

/// The log's oracle on a recovered pool: the tail counts the completed appends (or one more),
/// and every record below it is intact.
fn verify_log(pool: &Pool<Sim>, ctx: &CrashContext) -> Result<(), String> {
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

impl Log {
    /// [`Log::check`] with the image opened in a reusable slot (`Pool::open_image_in`): only
    /// the lines that differ from the previous image, and those the previous check wrote, are
    /// copied.
    fn check_in_slot(
        &self,
        slot: &RefCell<ImageSlot>,
        size: u64,
        sim: &Sim,
        image: &[u8],
        ctx: &CrashContext,
    ) -> Result<(), String> {
        let mut slot = slot.borrow_mut();
        slot.hint(&ctx.delta);
        Pool::open_image_in(&mut slot, image, &self.opts(size), sim.clone(), |pool| verify_log(&pool, ctx))
            .map_err(|e| e.to_string())?
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

pub(super) fn sim(json: Option<&Path>) -> CommandResult {
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
        let slot = RefCell::new(ImageSlot::new());
        let test = CrashTest::default();
        results.push(timed(
            format!("log of {} records, opened in a reusable slot", log.records),
            size as usize,
            0,
            || test.run(&recording, |s, i, c| log.check_in_slot(&slot, size, s, i, c)),
        )?);
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
