//! FAMS: every crash of a sync leaves the old or the new state; recovery is idempotent and
//! survives crashes of its own; injected ENOSPC/EIO/fsync failures leave a recoverable file and
//! a poisoned handle; dirty tracking finds exactly the written pages.

use nvhtm::fams::{FamsError, FamsFile, Fault, Role, SimStorage, Storage};

use nvhtm::mutation::fams::{fresh, workload, PAGE};

fn check(states: &[u64], data: &[u8], journal: &[u8], marks: &[u64]) -> Result<(), String> {
    nvhtm::mutation::fams::check(states, data, journal, marks, None).map(drop)
}

#[test]
fn a_crash_at_any_storage_call_leaves_the_old_or_the_new_state() {
    let mut total = 0;
    for seed in 1..=3 {
        let sim = fresh(8);
        let states = workload(&sim, seed, 8);
        let report = sim.crash_test(64, seed, |d, j, m| check(&states, d, j, m));
        println!(
            "seed {seed}: {} crash points, {} states, {:?}",
            report.crash_points, report.images_checked, report.failures
        );
        assert!(report.failures.is_empty(), "{:?}", report.failures);
        total += report.images_checked;
    }
    assert!(total > 500, "{total}");
}

#[test]
fn recovery_survives_crashes_of_its_own() {
    let sim = fresh(8);
    let states = workload(&sim, 9, 6);
    let mut nested = 0;
    let report = sim.crash_test(16, 9, |data, journal, marks| {
        // Recover under a recording simulator, then crash that recovery everywhere.
        let storage = SimStorage::from_image(data.to_vec(), journal.to_vec());
        FamsFile::open_storage(storage.clone(), 64 * PAGE).map_err(|e| e.to_string())?;
        let inner = storage.crash_test(8, 1, |d, j, _| check(&states, d, j, marks));
        nested += inner.images_checked;
        match inner.failures.first() {
            Some(f) => Err(format!("during recovery: {f}")),
            None => check(&states, data, journal, marks),
        }
    });
    println!("{} states, {nested} during recovery", report.images_checked);
    assert!(report.failures.is_empty(), "{:?}", report.failures);
    assert!(nested > 100);
}

/// Two crashes in a row: every crash state of a first run is recovered, one in four is worked
/// on by a second run of writes, a growth and syncs — its journal reused, its sync sequence
/// continued — which is crashed at every storage call in turn; a journal left by the first run
/// must never be taken for the second's. And every sync of the commit and of recovery is
/// needed: with any one switched off (the `fams-file-two-runs` mutation suite) some crash
/// state is rejected — the directory sync too, since the file model loses a journal whose
/// directory entry is not durable.
#[test]
fn two_runs_in_a_row_survive_a_crash_in_each_and_need_every_sync() {
    let table = nvhtm::mutation::run_suites(&[nvhtm::mutation::suite("fams-file-two-runs").unwrap()]);
    println!("{table}");
    let run = &table.suites[0];
    assert!(run.baseline_passed, "{table}");
    println!("baseline: {}", run.baseline);
    let fams: Vec<_> = table.sites.iter().filter(|row| row.structure == "fams").collect();
    assert!(fams.len() >= 4, "journal fsync, directory fsync, data fsync, recovery's clobber fsync\n{table}");
    assert!(table.missed().is_empty(), "{table}");
}

#[test]
fn the_storage_model_is_not_vacuous() {
    // A sync that skips the journal and writes pages in place is caught: torn states appear.
    let sim = fresh(4);
    sim.write_at(Role::Data, 0, &[1u8; 3 * PAGE as usize]).unwrap();
    sim.sync(Role::Data).unwrap();
    sim.mark(1);
    let report = sim.crash_test(64, 1, |data, _, marks| {
        let ok = marks.is_empty()
            && (data[..3 * PAGE as usize].iter().all(|&b| b == 0)
                || data[..3 * PAGE as usize].iter().all(|&b| b == 1));
        if ok || !marks.is_empty() {
            Ok(())
        } else {
            Err("torn in-place write".into())
        }
    });
    assert!(!report.failures.is_empty(), "sector-granular tearing must be modelled");
}

#[test]
fn injected_failures_poison_the_handle_and_reopening_recovers() {
    // Some(false): the old state for certain; Some(true): the new one; None: either (the
    // journal reached the page cache but its fsync failed).
    for (fault, survives) in [
        (Fault { call: "write", after: 0, errno: libc::ENOSPC }, Some(false)), // the journal write
        (Fault { call: "sync", after: 0, errno: libc::EIO }, None),            // the journal fsync
        (Fault { call: "sync", after: 2, errno: libc::EIO }, Some(true)),      // the data fsync
    ] {
        let sim = fresh(4);
        let mut file = FamsFile::open_storage(sim.clone(), 16 * PAGE).unwrap();
        let before = file.to_vec();
        file.write(100, b"first change").unwrap();
        sim.inject(fault);
        let err = file.sync().unwrap_err();
        assert!(matches!(err, FamsError::Io { .. }), "{err}");
        file.write(200, b"second change").unwrap();
        let again = file.sync().unwrap_err();
        assert!(matches!(again, FamsError::Poisoned(_)), "{again}");
        assert!(again.to_string().starts_with("the file refuses syncs until it is reopened"));
        drop(file);
        // Reopen from what is durable: the old state, or the new one if its journal was durable.
        let reopened = FamsFile::open_storage(sim.clone(), 16 * PAGE).unwrap();
        let bytes = reopened.to_vec();
        let has_change = &bytes[100..112] == b"first change";
        println!("{fault:?}: change survived: {has_change}");
        assert_ne!(&bytes[200..213], b"second change", "a change after the failure never lands");
        let mut changed = before.clone();
        changed[100..112].copy_from_slice(b"first change");
        assert!(bytes == before || bytes == changed, "neither the old nor the new state");
        if let Some(expected) = survives {
            assert_eq!(has_change, expected);
        }
    }
}

#[test]
fn real_files_commit_and_recover() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let path = dir.path().join("data.fams");
    let mut file = FamsFile::create(&path, 16 * PAGE, 1 << 20).unwrap();
    println!("dirty tracking: {}", file.tracker());
    file.write(5000, b"durable after sync").unwrap();
    let stats = file.sync().unwrap();
    assert_eq!(stats.pages, 1);
    file.write(9000, b"never synced").unwrap();
    let err = file.write(16 * PAGE - 2, b"abc").unwrap_err();
    assert_eq!(err.to_string(), "range 0xfffe+3 is outside the file's 65536 bytes");
    drop(file);
    let file = FamsFile::open(&path, 1 << 20).unwrap();
    let bytes = file.to_vec();
    assert_eq!(&bytes[5000..5018], b"durable after sync");
    assert_eq!(&bytes[9000..9012], &[0u8; 12], "unsynced changes are not in the file");
    let err = FamsFile::open(&path, 1 << 20).unwrap_err();
    assert!(err.to_string().contains("open failed"), "a second opener is locked out: {err}");
}

/// A journal whose checksum holds (xxh3 is not keyed: anyone can write one) but whose fields
/// cannot describe a commit of this file: one page entry at `index` and a new length.
fn crafted_journal(index: u64, file_len: u64) -> Vec<u8> {
    let header = [u64::from_le_bytes(*b"NVFAMSJ1"), 7, 1, file_len, PAGE];
    let mut body = index.to_le_bytes().to_vec();
    body.extend_from_slice(&[0xab; PAGE as usize]);
    let mut signed: Vec<u8> = header.iter().flat_map(|w| w.to_ne_bytes()).collect();
    signed.extend_from_slice(&body);
    let checksum = xxhash_rust::xxh3::xxh3_64(&signed);
    let mut journal: Vec<u8> = header.iter().chain(&[checksum, 0, 0]).flat_map(|w| w.to_ne_bytes()).collect();
    journal.extend_from_slice(&body);
    journal
}

#[test]
fn a_journal_whose_offsets_or_lengths_overflow_is_an_error_and_applies_nothing() {
    let data = vec![1u8; 4 * PAGE as usize];
    for (index, file_len, why) in [
        // The page's offset overflows; its end overflows; it lies past the new length.
        (u64::MAX / PAGE + 1, 4 * PAGE, "entry 0 names page 4503599627370496, past the new file length"),
        (u64::MAX / PAGE, u64::MAX - (PAGE - 1), "entry 0 names page 4503599627370495, past the new file"),
        (4, 4 * PAGE, "entry 0 names page 4, past the new file length 16384"),
        // The new length is no whole number of pages, or none.
        (0, u64::MAX, "the new file length 18446744073709551615 is not a positive multiple of its 4096"),
        (0, 0, "the new file length 0 is not a positive multiple"),
    ] {
        let sim = SimStorage::from_image(data.clone(), crafted_journal(index, file_len));
        let err = FamsFile::open_storage(sim.clone(), 64 * PAGE).unwrap_err();
        assert!(matches!(err, FamsError::CorruptJournal(_)), "page {index}, length {file_len}: {err:?}");
        assert!(err.to_string().contains(why), "{err}");
        assert_eq!(sim.current(Role::Data), data, "nothing was applied");
    }
}

/// A FAMS pool's creation crashed at every storage call: no pool or the one `init` laid out,
/// and every sync of the creation is needed (the `fams-create` mutation suite).
#[test]
fn creating_a_fams_pool_survives_a_crash_at_every_call_and_needs_each_sync() {
    let report = nvhtm::mutation::suite("fams-create").unwrap().run();
    println!("{report}");
    report.baseline.assert_passed();
    assert!(report.baseline.images_checked > 10, "{report}");
    assert!(report.sites.len() >= 3 && report.missed().is_empty(), "{report}");
}

mod pools {
    use nvhtm::fams::journal_path;
    use nvhtm::persist::thread_stats;
    use nvhtm::pool::PoolInfo;
    use nvhtm::{AutoDomain, Heap, Pool, PoolError, PoolOptions, StrictMap};

    fn opts() -> PoolOptions {
        PoolOptions::layout("fams").with_size(1 << 20).with_max_size(64 << 20)
    }

    /// Two threads write (out-of-place records replaced and removed, segments splitting) while a
    /// third syncs: every committed state — the data file right after each sync — is the state
    /// at one point between operations: each value whole and naming its key, the heap
    /// consistent, no block leaked. Without the writer gate a commit could take a bucket word
    /// that links a record whose page it copied before the record was written.
    #[test]
    fn syncs_while_other_threads_write_commit_whole_operations() {
        use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
        let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
        let path = dir.path().join("gate.pool");
        let map = StrictMap::open(Heap::<AutoDomain>::create_fams(&path, &opts()).unwrap()).unwrap();
        let stop = AtomicBool::new(false);
        let mut sizes = Vec::new();
        std::thread::scope(|s| {
            for t in 0..2u64 {
                let (map, stop) = (&map, &stop);
                s.spawn(move || {
                    for round in 0..1_000_000u64 {
                        if stop.load(Relaxed) {
                            break;
                        }
                        let key = format!("t{t}-{}", round % 3000);
                        if round % 7 == 6 {
                            map.remove(key.as_bytes()).unwrap();
                        } else {
                            map.upsert(key.as_bytes(), format!("{key}={round:040}").as_bytes()).unwrap();
                        }
                    }
                });
            }
            for _ in 0..40 {
                map.heap().pool().sync().unwrap();
                // Only this thread syncs: the file holds the last commit while it is read.
                let committed = std::fs::read(&path).unwrap();
                let heap = Heap::open_image(&committed, &opts(), nvhtm::Volatile).unwrap();
                let found = StrictMap::open(heap).unwrap();
                let mut entries = 0;
                found
                    .for_each(|k, v| {
                        let key = std::str::from_utf8(k).unwrap();
                        let value = std::str::from_utf8(v).unwrap_or("not utf-8");
                        assert!(
                            value.starts_with(&format!("{key}=")) && v.len() == k.len() + 41,
                            "{key}: {value}"
                        );
                        entries += 1;
                        true
                    })
                    .unwrap();
                let report = found.heap().check(&mut |_, _| {});
                assert!(report.is_consistent(), "{:?}", report.problems);
                let stats = found.stats().unwrap();
                assert_eq!(stats.entries, entries);
                let allocated = report.small_blocks + report.large_blocks;
                assert_eq!(allocated, 2 + stats.segments + entries, "map root, directory, segments, records");
                sizes.push(entries);
            }
            stop.store(true, Relaxed);
        });
        println!(
            "committed states checked: {} (entries {:?}..{:?})",
            sizes.len(),
            sizes.first(),
            sizes.last()
        );
        assert!(sizes.last() > sizes.first(), "the writers ran between the syncs");
        // A sync from inside a writer would wait for itself.
        let err = map.heap().transaction(|_| map.heap().pool().sync()).unwrap_err();
        assert!(matches!(err, nvhtm::HeapError::Pool(PoolError::SyncInsideWriter)), "{err}");
    }

    #[test]
    fn the_map_runs_unchanged_on_a_fams_pool_without_flushes() {
        let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
        let path = dir.path().join("map.pool");
        let pool = Pool::<AutoDomain>::create_fams(&path, &opts()).unwrap();
        assert!(pool.is_fams());
        let map = StrictMap::open(Heap::format(pool, &Default::default()).unwrap()).unwrap();
        let before = thread_stats();
        for i in 0..20_000u64 {
            map.upsert(format!("key{i}").as_bytes(), &i.to_le_bytes()).unwrap();
        }
        let work = thread_stats() - before;
        assert_eq!(work.fences, 0, "no fence on the hot path of a FAMS pool");
        assert_eq!(work.lines_flushed, 0);
        map.heap().pool().sync().unwrap();
        map.close().unwrap();

        let info = PoolInfo::read(&path).unwrap();
        assert!(info.fams && info.clean_shutdown, "{info:?}");
        let err = Pool::<AutoDomain>::open(&path, &opts()).unwrap_err();
        assert!(matches!(err, PoolError::FamsMode { .. }), "{err}");
        assert!(err.to_string().contains("open it in FAMS mode"));

        let map =
            StrictMap::open(Heap::load(Pool::<AutoDomain>::open_fams(&path, &opts()).unwrap()).unwrap())
                .unwrap();
        assert_eq!(map.len().unwrap(), 20_000);
        assert_eq!(map.get(b"key12345").unwrap().unwrap(), 12345u64.to_le_bytes());
        let report = map.heap().check(&mut |_, _| {});
        assert!(report.is_consistent(), "{report:?}");
        assert!(map.heap().pool().size() > 1 << 20, "the pool grew through FAMS");
    }

    /// `open_fams` checks the header (as the journal would leave it) before it creates or
    /// replays anything: a plain pool, even with a complete journal beside it, and a file that
    /// is no pool get a specific error, no journal file, and their bytes unchanged.
    #[test]
    fn open_fams_checks_the_header_before_creating_or_replaying_a_journal() {
        let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
        let plain = dir.path().join("plain.pool");
        Pool::<AutoDomain>::create(&plain, &opts()).unwrap().close().unwrap();
        let text = dir.path().join("text");
        std::fs::write(&text, b"hello, this is not a pool at all".repeat(4096)).unwrap();
        for (path, expected) in [(&plain, "FamsMode"), (&text, "NotAPool")] {
            let before = std::fs::read(path).unwrap();
            let err = Pool::<AutoDomain>::open_fams(path, &opts()).unwrap_err();
            assert!(format!("{err:?}").starts_with(expected), "{}: {err:?}", path.display());
            assert!(!journal_path(path).exists(), "a journal was created beside {}", path.display());
            assert_eq!(std::fs::read(path).unwrap(), before, "{} changed", path.display());
        }
        let journal = super::crafted_journal(1, 1 << 20);
        std::fs::write(journal_path(&plain), &journal).unwrap();
        let before = std::fs::read(&plain).unwrap();
        let err = Pool::<AutoDomain>::open_fams(&plain, &opts()).unwrap_err();
        assert!(matches!(err, PoolError::FamsMode { .. }), "{err:?}");
        assert_eq!(std::fs::read(&plain).unwrap(), before, "the journal was not replayed");
        assert_eq!(std::fs::read(journal_path(&plain)).unwrap(), journal, "nor retired");
    }

    /// A valid journal naming a huge file length (its checksum holds: anyone can write one) would
    /// have the file extended and loaded whole into memory: refused before anything is applied.
    #[test]
    fn a_journal_naming_a_huge_length_is_refused_and_applies_nothing() {
        let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
        let path = dir.path().join("huge.pool");
        Pool::<AutoDomain>::create_fams(&path, &opts()).unwrap().close().unwrap();
        let journal = super::crafted_journal(1, 1 << 40);
        std::fs::write(journal_path(&path), &journal).unwrap();
        let before = std::fs::read(&path).unwrap();
        let err = Pool::<AutoDomain>::open_fams(&path, &opts()).unwrap_err();
        assert!(matches!(err, PoolError::Corrupt { .. }), "{err:?}");
        assert!(err.to_string().contains("1099511627776 bytes once its journal is applied"), "{err}");
        assert_eq!(std::fs::read(&path).unwrap(), before, "nothing was applied");
        assert_eq!(std::fs::read(journal_path(&path)).unwrap(), journal, "nor retired");
    }

    /// `create_fams` builds the pool under a temporary name: while `init` runs nothing is at the
    /// pool's path (a crash then leaves no half-made pool for `create` to refuse), a failed
    /// `init` leaves no file at all, and a success leaves exactly the pool and its journal.
    #[test]
    fn create_fams_publishes_the_pool_only_once_it_is_committed() {
        let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
        let path = dir.path().join("new.pool");
        let listing = || {
            let mut names: Vec<String> = std::fs::read_dir(dir.path())
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect();
            names.sort();
            names
        };
        let failed = Pool::<AutoDomain>::create_fams_with(&path, &opts(), |_| {
            Err(PoolError::Corrupt { path: path.clone(), what: "init failed".into() })
        });
        assert!(failed.is_err());
        assert!(listing().is_empty(), "{:?}", listing());
        let mut seen_during_init = None;
        let pool = Pool::<AutoDomain>::create_fams_with(&path, &opts(), |pool| {
            seen_during_init = Some((path.exists(), journal_path(&path).exists()));
            pool.write_bytes(8192, b"laid out by init")
        })
        .unwrap();
        assert_eq!(seen_during_init, Some((false, false)), "the pool's names appear only after its commit");
        assert_eq!(listing(), ["new.pool", "new.pool.journal"]);
        pool.close().unwrap();
        let pool = Pool::<AutoDomain>::open_fams(&path, &opts()).unwrap();
        let mut bytes = [0u8; 16];
        pool.read_into(8192, &mut bytes).unwrap();
        assert_eq!(&bytes, b"laid out by init");
    }

    /// A journal left beside a deleted pool is never replayed into a new pool of that name.
    #[test]
    fn create_fams_discards_a_journal_without_its_pool() {
        let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
        let path = dir.path().join("again.pool");
        std::fs::write(journal_path(&path), super::crafted_journal(1, 1 << 20)).unwrap();
        Pool::<AutoDomain>::create_fams(&path, &opts()).unwrap().close().unwrap();
        let data = std::fs::read(&path).unwrap();
        assert!(data[4096..8192].iter().all(|&b| b == 0), "the old journal's page was applied");
        let pool = Pool::<AutoDomain>::open_fams(&path, &opts()).unwrap();
        assert_eq!(pool.image().unwrap()[4096..8192], [0u8; 4096]);
    }

    #[test]
    fn a_plain_pool_is_not_opened_as_fams() {
        let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
        let path = dir.path().join("plain.pool");
        Pool::<AutoDomain>::create(&path, &opts()).unwrap().close().unwrap();
        let err = Pool::<AutoDomain>::open_fams(&path, &opts()).unwrap_err();
        assert!(err.to_string().contains("not a FAMS pool"), "{err}");
    }
}
