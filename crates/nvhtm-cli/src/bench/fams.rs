//! `nvhtm bench fams`: failure-atomic msync against the physical floor.

use std::path::Path;
use std::time::Instant;

use nvhtm::pool::PoolOptions;
use nvhtm::{Msync, Volatile};
use serde::Serialize;

use super::{bench_key, median, print_table, write_json, Machine, Scratch};
use crate::commands::CommandResult;

#[derive(Debug, Serialize)]
struct FamsReport {
    bench: &'static str,
    machine: Machine,
    tracker: String,
    sync: Vec<FamsSyncResult>,
    scan_ms_per_gib: f64,
    first_write_ns_per_page: f64,
    rewrite_ns_per_page: f64,
    map: Vec<FamsMapResult>,
    snapshot: Vec<SnapshotResult>,
}

#[derive(Debug, Serialize)]
struct SnapshotResult {
    extents: u64,
    sync_ms: f64,
}

/// Extents of a file, as `filefrag` counts them.
fn extents(path: &Path) -> Option<u64> {
    let out = std::process::Command::new("filefrag").arg(path).output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.split_whitespace().rev().nth(2)?.parse().ok()
}

/// The snapshot variant: sync time as rewrites after clones fragment the working file.
fn snapshot_growth(dir: &Path) -> Result<Vec<SnapshotResult>, Box<dyn std::error::Error>> {
    let path = Scratch::new(dir, "snapshot");
    let page = rustix::param::page_size() as u64;
    let pages = (64u64 << 20) / page;
    let mut file = nvhtm::fams::SnapshotFile::create(&path.0, pages * page)?;
    let mut rng = fastrand::Rng::with_seed(3);
    let mut out = Vec::new();
    for round in 0..8u32 {
        // Rewriting pages after a clone moves them to new blocks (copy on write): extents grow.
        for _ in 0..(1u64 << round).min(pages) * 8 {
            file.write(rng.u64(..pages) * page, &[round as u8; 64])?;
        }
        let start = Instant::now();
        file.sync()?;
        let ms = start.elapsed().as_secs_f64() * 1e3;
        out.push(SnapshotResult { extents: extents(&path.0).unwrap_or(0), sync_ms: ms });
    }
    drop(file);
    for p in nvhtm::fams::snapshot_paths(&path.0) {
        let _ = std::fs::remove_file(p);
    }
    Ok(out)
}

#[derive(Debug, Serialize)]
struct FamsSyncResult {
    dirty_pages: u64,
    sync_ms: f64,
    floor_ms: f64,
    ratio_to_floor: f64,
}

#[derive(Debug, Serialize)]
struct FamsMapResult {
    case: String,
    kops_per_second: f64,
    ratio_to_volatile: f64,
}

pub(super) fn fams(dir: &Path, reflink_dir: Option<&Path>, json: Option<&Path>) -> CommandResult {
    use nvhtm::fams::FamsFile;
    use std::os::unix::fs::FileExt;
    let page = rustix::param::page_size() as u64;
    let mut results = Vec::new();
    let data = Scratch::new(dir, "fams-sync");
    let journal = nvhtm::fams::journal_path(&data.0);
    let floor_file = Scratch::new(dir, "fams-floor");
    let pages = 16_384u64; // a 64 MiB file
    let mut file = FamsFile::create(&data.0, pages * page, pages * page)?;
    let tracker = file.tracker().to_string();
    let floor =
        std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&floor_file.0)?;
    floor.set_len(pages * page)?;
    floor.sync_all()?;
    let mut rng = fastrand::Rng::with_seed(1);
    for dirty in [1u64, 100, 10_000] {
        let mut sync_ms = Vec::new();
        let mut floor_ms = Vec::new();
        for round in 0..5u8 {
            let chosen: Vec<u64> = rng.choose_multiple(0..pages, dirty as usize);
            for &p in &chosen {
                file.write(p * page + 8, &[round; 8])?;
            }
            let start = Instant::now();
            let stats = file.sync()?;
            sync_ms.push(start.elapsed().as_secs_f64() * 1e3);
            assert_eq!(stats.pages, dirty);
            // The floor: the same pages written in place and fsynced once.
            let block = vec![round; page as usize];
            let start = Instant::now();
            for &p in &chosen {
                floor.write_all_at(&block, p * page)?;
            }
            floor.sync_data()?;
            floor_ms.push(start.elapsed().as_secs_f64() * 1e3);
        }
        let (s, f) = (median(sync_ms), median(floor_ms));
        results.push(FamsSyncResult { dirty_pages: dirty, sync_ms: s, floor_ms: f, ratio_to_floor: s / f });
    }
    drop(file);
    let _ = std::fs::remove_file(&journal);

    // Dirty scan with nothing dirty, and the first write to a page after a sync (a write-protect
    // fault) against writing it again.
    let scan_data = Scratch::new(dir, "fams-scan");
    let scan_pages = (256u64 << 20) / page;
    let mut file = FamsFile::create(&scan_data.0, scan_pages * page, scan_pages * page)?;
    file.sync()?;
    let scan_ms = median(
        (0..5)
            .map(|_| -> Result<f64, nvhtm::fams::FamsError> {
                let start = Instant::now();
                file.sync()?;
                Ok(start.elapsed().as_secs_f64() * 1e3)
            })
            .collect::<Result<_, _>>()?,
    );
    let base = file.as_ptr();
    let touch = |n: u64| {
        let start = Instant::now();
        for p in 0..n {
            // SAFETY: page p lies inside the file's mapped contents.
            unsafe { std::ptr::write_volatile(base.add((p * page) as usize), p as u8) };
        }
        start.elapsed().as_nanos() as f64 / n as f64
    };
    let first = touch(scan_pages);
    let again = touch(scan_pages);
    file.sync()?;
    drop(file);
    let _ = std::fs::remove_file(nvhtm::fams::journal_path(&scan_data.0));

    // The strict map: FAMS syncing every N inserts, Msync per insert, Volatile.
    let mut map_results: Vec<(String, f64)> = Vec::new();
    let opts = PoolOptions::layout("bench").with_size(16 << 20);
    let keys = 20_000u64;
    let volatile = Scratch::new(dir, "fams-map-volatile");
    {
        let map = nvhtm::StrictMap::open(nvhtm::Heap::<Volatile>::create(&volatile.0, &opts)?)?;
        let start = Instant::now();
        for i in 0..keys {
            map.upsert(&bench_key(i, 8), &i.to_le_bytes())?;
        }
        map_results
            .push(("volatile (no durability)".into(), keys as f64 / start.elapsed().as_secs_f64() / 1e3));
    }
    for every in [10_000u64, 1000, 100] {
        let path = Scratch::new(dir, &format!("fams-map-{every}"));
        let map = nvhtm::StrictMap::open(nvhtm::Heap::format(
            nvhtm::Pool::<Volatile>::create_fams(&path.0, &opts)?,
            &Default::default(),
        )?)?;
        let start = Instant::now();
        for i in 0..keys {
            map.upsert(&bench_key(i, 8), &i.to_le_bytes())?;
            if (i + 1) % every == 0 {
                map.heap().pool().sync()?;
            }
        }
        map_results
            .push((format!("FAMS, sync every {every}"), keys as f64 / start.elapsed().as_secs_f64() / 1e3));
        drop(map);
        let _ = std::fs::remove_file(nvhtm::fams::journal_path(&path.0));
    }
    {
        let path = Scratch::new(dir, "fams-map-msync");
        let map = nvhtm::StrictMap::open(nvhtm::Heap::<Msync>::create(&path.0, &opts)?)?;
        let n = 1000u64;
        let start = Instant::now();
        for i in 0..n {
            map.upsert(&bench_key(i, 8), &i.to_le_bytes())?;
        }
        map_results
            .push(("msync per insert (strict)".into(), n as f64 / start.elapsed().as_secs_f64() / 1e3));
    }
    let volatile_kops = map_results[0].1;
    let map: Vec<FamsMapResult> = map_results
        .into_iter()
        .map(|(case, k)| FamsMapResult { ratio_to_volatile: k / volatile_kops, case, kops_per_second: k })
        .collect();

    let snapshot = match reflink_dir {
        Some(d) => snapshot_growth(d)?,
        None => Vec::new(),
    };
    let machine = Machine::here();
    println!(
        "FAMS on {} ({} cores), files in {}, dirty tracking: {tracker}",
        machine.cpu,
        machine.cores,
        dir.display()
    );
    print_table(
        &["dirty pages", "sync ms", "floor ms", "x floor"],
        results.iter().map(|r| {
            vec![
                r.dirty_pages.to_string(),
                format!("{:.3}", r.sync_ms),
                format!("{:.3}", r.floor_ms),
                format!("{:.2}", r.ratio_to_floor),
            ]
        }),
    );
    let per_gib = scan_ms * ((1u64 << 30) as f64 / (scan_pages * page) as f64);
    println!("dirty scan: {per_gib:.2} ms per GiB mapped (nothing dirty)");
    println!("first write to a page after a sync: {first:.0} ns; writing it again: {again:.0} ns");
    print_table(
        &["strict map, 8 B keys", "kops/s", "x volatile"],
        map.iter().map(|r| {
            vec![
                r.case.to_string(),
                format!("{:.1}", r.kops_per_second),
                format!("{:.3}", r.ratio_to_volatile),
            ]
        }),
    );
    if !snapshot.is_empty() {
        println!("snapshot variant (64 MiB working file, FICLONE):");
        print_table(
            &["extents", "sync ms"],
            snapshot.iter().map(|r| vec![r.extents.to_string(), format!("{:.2}", r.sync_ms)]),
        );
    }
    write_json(
        json,
        &FamsReport {
            bench: "fams",
            machine,
            tracker,
            sync: results,
            scan_ms_per_gib: per_gib,
            first_write_ns_per_page: first,
            rewrite_ns_per_page: again,
            map,
            snapshot,
        },
    )
}
