//! Open time as the map grows (`bench map`'s last table).

use std::path::Path;
use std::time::Instant;

use nvhtm::hybrid::HybridMap;
use nvhtm::periodic::{PeriodicMap, PeriodicOptions};
use nvhtm::{Cpu, Heap, StrictMap, Volatile};

use super::engines::heap_options;
use super::OpenResult;
use crate::bench::{bench_key, Scratch};

/// Open time as the map grows, for each map: the strict map opens with the heap's lanes only;
/// the periodic map records its failed epochs and starts its arena's scan in the background
/// (the map is reopened after a close that did not mark it clean: a crash's recovery); the
/// hybrid map replays its log into a new index (design B's price).
pub(super) fn open_times(
    pmem_dir: &Path,
    open_keys: &[u64],
) -> Result<Vec<OpenResult>, Box<dyn std::error::Error>> {
    let opts = heap_options();
    let mut open = Vec::new();
    for map_kind in ["strict", "periodic", "hybrid"] {
        let first = open.len();
        for &n in open_keys {
            let scratch = Scratch::new(pmem_dir, "open");
            if map_kind == "strict" {
                let map = StrictMap::open(Heap::<Volatile>::create(&scratch.0, &opts)?)?;
                for i in 0..n {
                    map.upsert(&bench_key(i, 8), &i.to_le_bytes())?;
                }
                map.close()?;
            } else if map_kind == "hybrid" {
                let map = HybridMap::open(Heap::<Volatile>::create(&scratch.0, &opts)?)?;
                for i in 0..n {
                    map.upsert(&bench_key(i, 8), &i.to_le_bytes())?;
                }
                drop(map); // not closed: the next open recovers as after a crash
            } else {
                let map = PeriodicMap::open(
                    Heap::<Volatile>::create(&scratch.0, &opts)?,
                    PeriodicOptions::manual(),
                )?;
                for i in 0..n {
                    map.upsert(&bench_key(i, 8), &i.to_le_bytes())?;
                }
                map.sync()?;
                drop(map); // not closed: the next open recovers as after a crash
            }
            let mut times: Vec<f64> = (0..5)
                .map(|_| -> Result<f64, Box<dyn std::error::Error>> {
                    let start = Instant::now();
                    let heap = Heap::<Cpu>::open(&scratch.0, &opts)?;
                    let (found, ms) = if map_kind == "strict" {
                        let map = StrictMap::open(heap)?;
                        let found = map.get(&bench_key(n / 2, 8))?.is_some();
                        let ms = start.elapsed().as_secs_f64() * 1e3;
                        map.close()?;
                        (found, ms)
                    } else if map_kind == "hybrid" {
                        let map = HybridMap::open(heap)?;
                        let found = map.get(&bench_key(n / 2, 8))?.is_some();
                        let ms = start.elapsed().as_secs_f64() * 1e3;
                        drop(map);
                        (found, ms)
                    } else {
                        let opts = PeriodicOptions { background_scan: true, ..PeriodicOptions::manual() };
                        let map = PeriodicMap::open(heap, opts)?;
                        let found = map.get(&bench_key(n / 2, 8))?.is_some();
                        let ms = start.elapsed().as_secs_f64() * 1e3;
                        drop(map);
                        (found, ms)
                    };
                    if !found && n > 0 {
                        return Err("a key is missing after reopening".into());
                    }
                    Ok(ms)
                })
                .collect::<Result<_, _>>()?;
            times.sort_by(f64::total_cmp);
            let ms = times[2];
            let base = open.get(first).map_or(ms, |o: &OpenResult| o.open_ms);
            open.push(OpenResult { map: map_kind, keys: n, open_ms: ms, ratio_to_first: ms / base });
        }
    }
    Ok(open)
}
