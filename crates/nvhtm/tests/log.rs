//! The persistent log on real pools: a file (`Msync`) reopened after a close and after a
//! drop without close, a FAMS pool whose file holds every acknowledged append when it returns,
//! and a `kill -9` loop: a child process appends from two threads and prints each
//! acknowledged record; the parent kills it at random points, reopens the pool, and checks
//! that every acknowledged record is there, in each thread's order, with nothing torn.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use nvhtm::log::{Log, LogOptions};
use nvhtm::{Cpu, Domain, Heap, Msync, Pool, PoolOptions, Volatile};

fn opts() -> PoolOptions {
    PoolOptions::layout("log").with_size(8 << 20).with_max_size(256 << 20)
}

fn records<D: Domain>(log: &Log<D>) -> Vec<Vec<u8>> {
    log.iter(log.head()).map(|r| r.unwrap().data).collect()
}

#[test]
fn a_log_on_a_file_reopens_after_a_close_and_after_a_drop() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("log.pool");
    let log =
        Log::open_with(Heap::<Msync>::create(&path, &opts()).unwrap(), LogOptions { segment_size: 4096 })
            .unwrap();
    let written: Vec<Vec<u8>> = (0..500u32).map(|i| format!("record {i}").into_bytes()).collect();
    for r in &written[..300] {
        log.append(r).unwrap();
    }
    log.close().unwrap();
    let log = Log::open(Heap::<Msync>::open(&path, &opts()).unwrap()).unwrap();
    assert_eq!(records(&log), written[..300]);
    for r in &written[300..] {
        log.append(r).unwrap();
    }
    let segments = log.stats().segments;
    drop(log); // no close: the next open recovers
    let log = Log::open(Heap::<Msync>::open(&path, &opts()).unwrap()).unwrap();
    assert_eq!(records(&log), written);
    assert_eq!(log.stats().segments, segments);
    assert!(log.check().unwrap().problems.is_empty());
}

#[test]
fn a_log_on_a_fams_pool_holds_each_acknowledged_append_in_its_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("log.pool");
    let log = Log::open(Heap::<Volatile>::create_fams(&path, &opts()).unwrap()).unwrap();
    for i in 0..20u32 {
        log.append(&i.to_le_bytes()).unwrap();
        // What a crash now would find: the file as the last commit left it.
        let copy = dir.path().join("copy.pool");
        std::fs::copy(&path, &copy).unwrap();
        let journal = nvhtm::fams::journal_path(&path);
        if journal.exists() {
            std::fs::copy(&journal, nvhtm::fams::journal_path(&copy)).unwrap();
        }
        let seen =
            Log::open(Heap::load(Pool::<Volatile>::open_fams(&copy, &opts()).unwrap()).unwrap()).unwrap();
        assert_eq!(records(&seen).len(), i as usize + 1);
        drop(seen);
        std::fs::remove_file(&copy).unwrap();
        let _ = std::fs::remove_file(nvhtm::fams::journal_path(&copy));
    }
}

const CHILD: &str = "NVHTM_LOG_KILL_CHILD";

/// The child: two threads append `t-seq` records until killed, printing each LSN and record
/// once its append returned.
fn child(path: &str) {
    let log = Log::open(Heap::<Cpu>::open(path, &opts()).unwrap()).unwrap();
    std::thread::scope(|s| {
        for t in 0..2u32 {
            let log = &log;
            s.spawn(move || {
                for seq in 0..1_000_000u32 {
                    let record = format!("{t}-{seq:07}-{}", "x".repeat(seq as usize % 90));
                    let lsn = log.append(record.as_bytes()).unwrap();
                    println!("@ {lsn} {record}");
                }
            });
        }
    });
}

/// kill -9 at random points, six times: every acknowledged record is found at its LSN, each
/// thread's records in its order, nothing torn; runs after a crash append to new segments.
#[test]
fn acknowledged_appends_survive_kill_9() {
    if let Ok(path) = std::env::var(CHILD) {
        child(&path);
        return;
    }
    let dir = tempfile::Builder::new().prefix("nvhtm-log-").tempdir_in("/dev/shm").unwrap();
    let path = dir.path().join("log.pool");
    Log::open_with(Heap::<Cpu>::create(&path, &opts()).unwrap(), LogOptions { segment_size: 64 << 10 })
        .unwrap()
        .close()
        .unwrap();
    let mut rng = fastrand::Rng::with_seed(0x10);
    let mut acked: HashMap<u64, String> = HashMap::new();
    for round in 0..6 {
        let kill_after = rng.usize(1..3000);
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "acknowledged_appends_survive_kill_9", "--nocapture", "--test-threads=1"])
            .env(CHILD, &path)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let (mut lines, mut killed) = (0usize, false);
        loop {
            if lines >= kill_after && !killed {
                child.kill().unwrap();
                killed = true;
            }
            let mut line = String::new();
            if out.read_line(&mut line).unwrap() == 0 {
                break;
            }
            // A line cut by the kill was never acknowledged.
            if let (Some(line), Some(at)) = (line.strip_suffix('\n'), line.find("@ ")) {
                let (lsn, record) = line[at + 2..].split_once(' ').unwrap();
                acked.insert(lsn.parse().unwrap(), record.to_string());
                lines += 1;
            }
        }
        assert!(!child.wait().unwrap().success(), "round {round}: the child ended by itself");
        let log = Log::open(Heap::<Cpu>::open(&path, &opts()).unwrap()).unwrap();
        assert!(log.check().unwrap().problems.is_empty());
        let found: HashMap<u64, String> = log
            .iter(log.head())
            .map(|r| r.unwrap())
            .map(|r| (r.lsn, String::from_utf8(r.data).unwrap()))
            .collect();
        for (lsn, record) in &acked {
            assert_eq!(found.get(lsn), Some(record), "round {round}: acknowledged record at LSN {lsn}");
        }
        // Each thread's records, in LSN order: every run's sequence from 0, with no gap.
        let mut by_lsn: Vec<(&u64, &String)> = found.iter().collect();
        by_lsn.sort();
        let mut last: [Option<u32>; 2] = [None, None];
        for (lsn, record) in by_lsn {
            let (t, rest) = record.split_once('-').unwrap();
            let (t, seq): (usize, u32) = (t.parse().unwrap(), rest[..7].parse().unwrap());
            assert!(
                seq == 0 || last[t] == Some(seq - 1),
                "round {round}: thread {t}'s record {seq} at LSN {lsn} follows {:?}",
                last[t]
            );
            last[t] = Some(seq);
        }
        println!(
            "round {round}: killed after {lines} acknowledgements; {} records, {} segments",
            found.len(),
            log.stats().segments
        );
        drop(log);
    }
    assert!(acked.len() > 1000, "{}", acked.len());
}
