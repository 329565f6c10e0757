//! `nvhtm bench heap`: allocation and transactions against the system allocator and plain stores.

use std::path::Path;
use std::time::{Duration, Instant};

use nvhtm::persist::{global_stats, Domain, PersistStats};
use nvhtm::pool::PoolOptions;
use nvhtm::{Cpu, Volatile};
use serde::Serialize;

use super::{print_table, write_json, Machine, Scratch};
use crate::commands::CommandResult;

/// One measured case of `bench heap`.
#[derive(Debug, Serialize)]
struct HeapResult {
    domain: &'static str,
    case: String,
    ns_per_op: f64,
    baseline: &'static str,
    ratio_to_baseline: f64,
    lines_flushed_per_op: f64,
    fences_per_op: f64,
}

#[derive(Debug, Serialize)]
struct HeapReport {
    bench: &'static str,
    machine: Machine,
    results: Vec<HeapResult>,
}

/// One benchmarked heap operation, given the iteration number.
type HeapOp<'a> = dyn Fn(u64) -> Result<(), nvhtm::HeapError> + 'a;

/// Runs `op` for `budget` after a warm-up; returns ns per op and persistence work per op.
fn time_op(
    budget: Duration,
    mut op: impl FnMut(u64) -> Result<(), nvhtm::HeapError>,
) -> Result<(f64, PersistStats, u64), nvhtm::HeapError> {
    for i in 0..200 {
        op(i)?;
    }
    let before = global_stats();
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed() < budget {
        for _ in 0..32 {
            op(n)?;
            n += 1;
        }
    }
    Ok((start.elapsed().as_nanos() as f64 / n as f64, global_stats() - before, n))
}

/// The heap cases for one domain, each paired with its baseline's name.
fn heap_cases<D: Domain>(
    heap: &nvhtm::Heap<D>,
    budget: Duration,
    rows: &mut Vec<(String, &'static str, f64, PersistStats, u64)>,
) -> CommandResult {
    // Allocation: a transaction allocating 64 B (durable), then one freeing it.
    let mut live = Vec::with_capacity(4096);
    let (ns, st, n) = time_op(budget, |_| {
        let at = heap.transaction(|tx| tx.alloc_bytes(64))?;
        live.push(at);
        if live.len() == 4096 {
            for at in live.drain(..) {
                heap.transaction(|tx| tx.free(at))?;
            }
        }
        Ok(())
    })?;
    rows.push(("alloc 64 B (+ free later, amortised)".into(), "malloc 64 B + free", ns, st, n));
    for at in live.drain(..) {
        heap.transaction(|tx| tx.free(at))?;
    }
    let (ns, st, n) = time_op(budget, |_| {
        let r = heap.reserve(64)?;
        heap.cancel(r);
        Ok(())
    })?;
    rows.push(("reserve + cancel 64 B (DRAM only)".into(), "malloc 64 B + free", ns, st, n));

    // Transactions of k updates of 8 bytes in distinct lines vs the same stores unlogged.
    let block = heap.transaction(|tx| tx.alloc_bytes(16 * 64))?;
    for k in [1u64, 4, 16] {
        let baseline = match k {
            1 => "1 store",
            4 => "4 stores",
            _ => "16 stores",
        };
        let words = || (0..k).map(|j| block + j * 64);
        let ranges: Vec<(u64, u64)> = words().map(|at| (at, 8)).collect();
        let cases: [(String, Box<HeapOp<'_>>); 4] = [
            (
                format!("tx of {k} updates"),
                Box::new(|i| {
                    heap.transaction(|tx| {
                        words().try_for_each(|at| tx.write(nvhtm::PPtr::<u64>::new(at), &i))
                    })
                }),
            ),
            (
                format!("tx of {k} updates, one add_ranges"),
                Box::new(|i| {
                    heap.transaction(|tx| {
                        tx.add_ranges(&ranges)?;
                        words().try_for_each(|at| tx.write(nvhtm::PPtr::<u64>::new(at), &i))
                    })
                }),
            ),
            (
                format!("{k} stores + flush + 1 fence (not atomic)"),
                Box::new(|i| {
                    for at in words() {
                        heap.pool().write(at, &i)?;
                        heap.pool().flush(at, 8)?;
                    }
                    heap.pool().fence()
                }),
            ),
            (format!("{k} plain stores"), Box::new(|i| words().try_for_each(|at| heap.pool().write(at, &i)))),
        ];
        for (name, op) in cases {
            let (ns, st, n) = time_op(budget, op)?;
            rows.push((name, baseline, ns, st, n));
        }
    }
    Ok(())
}

pub(super) fn heap(pmem_dir: &Path, budget: Duration, json: Option<&Path>) -> CommandResult {
    let opts = PoolOptions::layout("bench").with_size(64 << 20);
    // The system allocator: 64 B allocations freed in batches of 4096, like the heap case.
    let mut boxes: Vec<Box<[u8; 64]>> = Vec::with_capacity(4096);
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed() < budget {
        boxes.push(std::hint::black_box(Box::new([n as u8; 64])));
        if boxes.len() == 4096 {
            boxes.clear();
        }
        n += 1;
    }
    let malloc_ns = start.elapsed().as_nanos() as f64 / n as f64;

    let mut results = Vec::new();
    for domain in ["cpu", "volatile"] {
        let scratch = Scratch::new(pmem_dir, domain);
        let mut rows = Vec::new();
        if domain == "cpu" {
            heap_cases(&nvhtm::Heap::<Cpu>::create(&scratch.0, &opts)?, budget, &mut rows)?;
        } else {
            heap_cases(&nvhtm::Heap::<Volatile>::create(&scratch.0, &opts)?, budget, &mut rows)?;
        }
        let plain = |name: &str| {
            rows.iter().find(|r| r.0 == format!("{name} plain stores")).map_or(f64::NAN, |r| r.2)
        };
        for (case, baseline, ns, st, n) in &rows {
            let base_ns = match *baseline {
                "malloc 64 B + free" => malloc_ns,
                "1 store" => plain("1"),
                "4 stores" => plain("4"),
                _ => plain("16"),
            };
            results.push(HeapResult {
                domain,
                case: case.clone(),
                ns_per_op: *ns,
                baseline,
                ratio_to_baseline: ns / base_ns,
                lines_flushed_per_op: st.lines_flushed as f64 / *n as f64,
                fences_per_op: st.fences as f64 / *n as f64,
            });
        }
    }
    // Recovery: opening a 64 MiB heap holding 0 or 200 000 small blocks (plus what the fill
    // left in flight: nothing) costs O(chunks), not O(blocks).
    let mut open_ns = Vec::new();
    for blocks in [0u64, 200_000] {
        let scratch = Scratch::new(pmem_dir, "recovery");
        let heap = nvhtm::Heap::<Volatile>::create(&scratch.0, &opts)?;
        for _ in 0..blocks {
            heap.transaction(|tx| tx.alloc_bytes(64))?;
        }
        heap.close()?;
        let mut times: Vec<f64> = (0..5)
            .map(|_| {
                let start = Instant::now();
                let heap = nvhtm::Heap::<Cpu>::open(&scratch.0, &opts)?;
                let ns = start.elapsed().as_nanos() as f64;
                heap.close()?;
                Ok(ns)
            })
            .collect::<Result<_, nvhtm::HeapError>>()?;
        times.sort_by(f64::total_cmp);
        open_ns.push((blocks, times[2]));
    }
    for &(blocks, ns) in &open_ns {
        results.push(HeapResult {
            domain: "cpu",
            case: format!("open 64 MiB heap holding {blocks} blocks"),
            ns_per_op: ns,
            baseline: "open, 0 blocks",
            ratio_to_baseline: ns / open_ns[0].1,
            lines_flushed_per_op: f64::NAN,
            fences_per_op: f64::NAN,
        });
    }

    let machine = Machine::here();
    println!(
        "heap on {} ({} cores); system malloc 64 B + free: {malloc_ns:.1} ns",
        machine.cpu, machine.cores
    );
    print_table(
        &["domain", "case", "ns/op", "baseline", "ratio", "lines", "fences"],
        results.iter().map(|r| {
            vec![
                r.domain.to_string(),
                r.case.to_string(),
                format!("{:.1}", r.ns_per_op),
                r.baseline.to_string(),
                format!("{:.2}", r.ratio_to_baseline),
                format!("{:.2}", r.lines_flushed_per_op),
                format!("{:.2}", r.fences_per_op),
            ]
        }),
    );
    write_json(json, &HeapReport { bench: "heap", machine, results })
}
