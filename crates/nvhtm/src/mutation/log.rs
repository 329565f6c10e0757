//! The log's crash workloads and its oracle, shared by `tests/log_crash.rs` and the log
//! mutation suites: appends (single and batched, some larger than a segment) and truncations
//! on a log with small segments, so that segments are started and freed often, and a clean
//! close at the end. An image is recovered and its records, read from the head, must be
//! exactly the records of the operations that completed — every acknowledged append, in
//! order, nothing torn or invented, nothing truncated — plus, for the operation in flight, a
//! prefix of its batch or its whole truncation; the heap must hold the log's segments and
//! root and nothing else (a crash leaks no segment); and a log that will go on appending in
//! its tail segment must hold no record that checks past its tail.
//!
//! ```
//! use nvhtm::mutation::log::{check, record};
//! use nvhtm::sim::{CrashTest, Sim};
//! let (recording, run) = record(Sim::new(), 1, 12);
//! let test = CrashTest { exhaustive_limit: 16, samples: 4, ..CrashTest::default() };
//! test.run(&recording, check(&run)).assert_passed();
//! ```

use super::with_heap;
use crate::log::{Log, LogOptions};
use crate::sim::{CrashContext, CrashTest, MutationReport, Recording, Sim};
use crate::{Domain, Heap, PoolOptions};

/// A mark: operation `i` begins.
const BEGIN: u64 = 1 << 62;
/// A mark: operation `i` returned.
const END: u64 = 1 << 61;

/// The segment size of the workloads' logs (small: a segment holds a few records).
pub const SEGMENT_SIZE: u64 = 512;

/// The pool options of the log workloads (2 MiB, growing up to 16 MiB).
///
/// ```
/// assert_eq!(nvhtm::mutation::log::opts().size, 2 << 20);
/// ```
pub fn opts() -> PoolOptions {
    PoolOptions::layout("log-crash").with_size(2 << 20).with_max_size(16 << 20)
}

/// One operation of a run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Records appended with one commit.
    Append(Vec<Vec<u8>>),
    /// The first `n` live records truncated.
    Truncate(usize),
    /// The log marked closed (a clean close, the heap left open).
    Close,
}

/// A run: the records live when it started, and what it did.
#[derive(Debug, Clone, Default)]
pub struct Run {
    /// The live records at the start, head first.
    pub base: Vec<Vec<u8>>,
    /// The operations, in order.
    pub ops: Vec<Op>,
}

impl Run {
    /// The live records after the first `done` operations.
    fn after(&self, done: usize) -> Vec<Vec<u8>> {
        let mut live = self.base.clone();
        for op in &self.ops[..done] {
            apply(&mut live, op);
        }
        live
    }

    /// Every list of live records a crash may leave once `marks` were made.
    fn allowed(&self, marks: &[u64]) -> Vec<Vec<Vec<u8>>> {
        let count = |kind: u64| marks.iter().filter(|&&m| m & kind != 0).count();
        let (begun, done) = (count(BEGIN), count(END));
        let live = self.after(done);
        let mut allowed = vec![live.clone()];
        if begun > done {
            match &self.ops[done] {
                Op::Append(batch) => {
                    for j in 1..=batch.len() {
                        allowed.push(live.iter().chain(&batch[..j]).cloned().collect());
                    }
                }
                op => {
                    let mut after = live;
                    apply(&mut after, op);
                    allowed.push(after);
                }
            }
        }
        allowed
    }
}

fn apply(live: &mut Vec<Vec<u8>>, op: &Op) {
    match op {
        Op::Append(batch) => live.extend(batch.iter().cloned()),
        Op::Truncate(n) => drop(live.drain(..*n)),
        Op::Close => {}
    }
}

/// A record's payload: which run and operation wrote it, padded to a random length (some
/// longer than a segment).
fn payload(rng: &mut fastrand::Rng, run: u32, op: usize, j: usize) -> Vec<u8> {
    let mut p = format!("run {run} op {op} record {j}").into_bytes();
    let len = if rng.u8(..16) == 0 { 600 } else { rng.usize(..120) };
    p.extend((0..len).map(|i| (i as u8).wrapping_mul(31) ^ op as u8));
    p
}

/// Runs `n` random operations on `log`, whose live records are `base` (their LSNs read from
/// the log); marks each one's beginning and end. Ends with a clean close when `close`.
pub fn run_ops<D: Domain>(
    sim: Option<&Sim>,
    log: &Log<D>,
    base: Vec<Vec<u8>>,
    rng: &mut fastrand::Rng,
    n: usize,
    run: u32,
    close: bool,
) -> Run {
    let mark = |m: u64| {
        if let Some(sim) = sim {
            sim.mark(m);
        }
    };
    let mut lsns: Vec<u64> = log.iter(log.head()).map(|r| r.unwrap().lsn).collect();
    assert_eq!(lsns.len(), base.len());
    let mut history = Run { base, ops: Vec::new() };
    for i in 0..n + usize::from(close) {
        let op = if i == n {
            Op::Close
        } else if i == 0 {
            // A batch first: a crash in it may leave a later record of it whole and an earlier
            // one torn, past the tail of a log that was closed cleanly there.
            Op::Append((0..3).map(|j| payload(rng, run, i, j)).collect())
        } else if rng.u8(..6) == 0 && !lsns.is_empty() {
            Op::Truncate(rng.usize(1..=lsns.len()))
        } else {
            let records = if rng.u8(..4) == 0 { rng.usize(2..4) } else { 1 };
            Op::Append((0..records).map(|j| payload(rng, run, i, j)).collect())
        };
        mark(BEGIN | i as u64);
        match &op {
            Op::Append(batch) if batch.len() == 1 => lsns.push(log.append(&batch[0]).unwrap()),
            Op::Append(batch) => {
                let batch: Vec<&[u8]> = batch.iter().map(Vec::as_slice).collect();
                lsns.extend(log.append_batch(&batch).unwrap());
            }
            Op::Truncate(k) => {
                let before = lsns.get(*k).copied().unwrap_or_else(|| log.tail());
                log.truncate(before).unwrap();
                lsns.drain(..*k);
            }
            Op::Close => log.mark_closed().unwrap(),
        }
        mark(END | i as u64);
        history.ops.push(op);
    }
    history
}

/// Creates a log, appends `prefill` records (not recorded), then records `ops` random
/// operations and a clean close; returns the recording and the run.
pub fn record(sim: Sim, seed: u64, ops: usize) -> (Recording, Run) {
    // Appended and closed cleanly in a first run; the recorded run reopens it, so its first
    // append goes on in the tail segment and must clear the closed mark first.
    let heap = Heap::create_in_memory(&opts(), crate::Volatile).unwrap();
    let log = Log::open_with(heap, LogOptions { segment_size: SEGMENT_SIZE }).unwrap();
    let mut rng = fastrand::Rng::with_seed(seed);
    let base: Vec<Vec<u8>> = (0..6).map(|j| payload(&mut rng, 0, 0, j)).collect();
    for p in &base {
        log.append(p).unwrap();
    }
    log.mark_closed().unwrap();
    let image = log.heap().pool().image().unwrap();
    let log = Log::open(Heap::open_image(&image, &opts(), sim.clone()).unwrap()).unwrap();
    sim.restart_recording().unwrap();
    let run = run_ops(Some(&sim), &log, base, &mut rng, ops, 1, true);
    (sim.recording(), run)
}

/// Checks a recovered log against the run that crashed; returns its live records.
pub fn check_recovered<D: Domain>(log: &Log<D>, run: &Run, marks: &[u64]) -> Result<Vec<Vec<u8>>, String> {
    let found: Vec<Vec<u8>> = log
        .iter(log.head())
        .map(|r| r.map(|r| r.data))
        .collect::<Result<_, _>>()
        .map_err(|e| e.to_string())?;
    let allowed = run.allowed(marks);
    if !allowed.contains(&found) {
        let show = |l: &[Vec<u8>]| {
            l.iter().map(|r| String::from_utf8_lossy(&r[..r.len().min(24)]).into_owned()).collect::<Vec<_>>()
        };
        return Err(format!(
            "the log holds {:?}, allowed: {:?}",
            show(&found),
            allowed.iter().map(|a| show(a)).collect::<Vec<_>>()
        ));
    }
    let report = log.check().map_err(|e| e.to_string())?;
    if !report.problems.is_empty() {
        return Err(format!("check: {:?}", report.problems));
    }
    super::no_leak(log.heap(), log.stats().segments as u64)?;
    Ok(found)
}

/// The oracle of a single-run workload.
pub fn check(run: &Run) -> impl Fn(&Sim, &[u8], &CrashContext) -> Result<(), String> + '_ {
    move |sim, image, ctx| {
        with_heap(sim, image, ctx, &opts(), |heap| {
            let log = Log::open(heap).map_err(|e| e.to_string())?;
            check_recovered(&log, run, &ctx.marks).map(drop)
        })
    }
}

/// The check of a multi-run suite: the recovered log against the run that crashed (`parent`,
/// or `first`); when followed, `more` operations (and a clean close) run on it and their
/// run is returned.
pub fn multi_run_check(
    first: Run,
    more: usize,
) -> impl Fn(&Sim, &[u8], &CrashContext, Option<&Run>) -> Result<Run, String> {
    move |sim, image, ctx, parent| {
        with_heap(sim, image, ctx, &opts(), |heap| {
            let log = Log::open(heap).map_err(|e| e.to_string())?;
            let run = parent.unwrap_or(&first);
            let found = check_recovered(&log, run, &ctx.run_marks)
                .map_err(|e| format!("run {}: {e}", ctx.depth + 1))?;
            Ok(if ctx.followed {
                let mut rng = fastrand::Rng::with_seed(700 + u64::from(ctx.depth));
                run_ops(Some(sim), &log, found, &mut rng, more, ctx.depth + 2, true)
            } else {
                Run::default()
            })
        })
    }
}

/// The `log-single` suite: appends, batches and truncations across many segments, crashed at
/// every fence.
pub(super) fn single_suite() -> MutationReport {
    let (recording, run) = record(Sim::new(), 3, 30);
    let test = CrashTest { exhaustive_limit: 32, samples: 8, ..CrashTest::default() };
    test.mutation_run(&recording, check(&run))
}

/// The `log-two-runs` suite: crash, recover, append and truncate on, crash again.
pub(super) fn two_runs_suite() -> MutationReport {
    let (recording, run) = record(Sim::new(), 4, 12);
    let test = CrashTest {
        recovery_depth: 1,
        follow_one_in: 8,
        exhaustive_limit: 8,
        samples: 4,
        ..CrashTest::default()
    };
    test.mutation_run_with(&recording, multi_run_check(run, 8))
}
