//! The `nvhtm` command line: create, info, grow, and a specific error with a non-zero exit for
//! every bad input.

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use nvhtm::{AutoDomain, Heap, Pool, PoolOptions};
use tempfile::TempDir;

fn nvhtm(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_nvhtm")).args(args).output().expect("run nvhtm")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Runs `nvhtm args`, expecting failure with exit status 1 and `message` on stderr.
fn fails(args: &[&str], message: &str) {
    let out = nvhtm(args);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
    assert!(stderr.starts_with("nvhtm: error: "), "{stderr}");
    assert!(stderr.contains(message), "{args:?}: expected {message:?} in {stderr:?}");
}

fn shm() -> TempDir {
    tempfile::Builder::new().prefix("nvhtm-cli-").tempdir_in("/dev/shm").unwrap()
}

fn disk() -> TempDir {
    tempfile::Builder::new().prefix("nvhtm-cli-").tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap()
}

fn create(dir: &Path) -> PathBuf {
    let path = dir.join("p.pool");
    let out = nvhtm(&["create", path.to_str().unwrap(), "--size", "1MiB"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    path
}

#[test]
fn create_then_info_in_text_and_json() {
    let dir = shm();
    let path = dir.path().join("demo.pool");
    let p = path.to_str().unwrap();
    let out = nvhtm(&["create", p, "--size", "2M", "--layout", "kv"]);
    assert!(out.status.success());
    let stdout = text(&out.stdout);
    assert!(stdout.starts_with(&format!("created {p}: 2.0 MiB, layout \"kv\", uuid ")), "{stdout}");
    assert!(stdout.trim_end().ends_with("tmpfs (cpu domain)"), "{stdout}");

    let out = nvhtm(&["info", p]);
    assert!(out.status.success());
    let stdout = text(&out.stdout);
    for line in [
        "layout      kv",
        "size        2.0 MiB (2097152 bytes)",
        "shutdown    clean",
        "in use      no",
        "filesystem  tmpfs",
        "root        0x1000 (64 bytes)",
    ] {
        assert!(stdout.contains(line), "missing {line:?} in\n{stdout}");
    }

    let out = nvhtm(&["info", p, "--json"]);
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["layout"], "kv");
    assert_eq!(json["size"], 2097152);
    assert_eq!(json["format_version"], 1);
    assert_eq!(json["clean_shutdown"], true);
    assert_eq!(json["dax"], false);
    assert_eq!(json["domain"], "cpu");
    assert_eq!(json["uuid"].as_str().unwrap().len(), 36);
}

#[test]
fn info_reports_a_pool_in_use_and_not_clean() {
    let dir = shm();
    let path = create(dir.path());
    let pool = Pool::<AutoDomain>::open(&path, &PoolOptions::default()).unwrap();
    let out = nvhtm(&["info", path.to_str().unwrap()]);
    let stdout = text(&out.stdout);
    assert!(stdout.contains("in use      yes"), "{stdout}");
    assert!(stdout.contains("shutdown    not clean"), "{stdout}");
    // A second writer is refused while the first holds the pool.
    fails(&["grow", path.to_str().unwrap(), "2MiB"], "locked: another process has this pool open");
    drop(pool);
}

#[test]
fn grow_extends_in_place_and_refuses_to_shrink() {
    let dir = disk();
    let path = create(dir.path());
    let p = path.to_str().unwrap();
    let out = nvhtm(&["grow", p, "3MiB"]);
    assert_eq!(text(&out.stdout).trim(), format!("{p}: grew from 1.0 MiB to 3.0 MiB"));
    let json: serde_json::Value = serde_json::from_slice(&nvhtm(&["info", p, "--json"]).stdout).unwrap();
    assert_eq!(json["size"], 3 << 20);
    assert_eq!(json["domain"], "msync");
    fails(&["grow", p, "1MiB"], "pools grow but do not shrink");
}

#[test]
fn every_bad_input_gets_a_specific_error() {
    let dir = disk();
    let pool = create(dir.path());
    let p = pool.to_str().unwrap();
    let path = |name: &str| dir.path().join(name).to_str().unwrap().to_string();

    // Size too small, unparsable size, bad layout, existing file.
    fails(
        &["create", &path("small"), "--size", "4k"],
        "pool size 4096 bytes is too small: the minimum is 65536 bytes",
    );
    let out = nvhtm(&["create", &path("x"), "--size", "lots"]);
    assert_eq!(out.status.code(), Some(2), "usage errors exit 2");
    assert!(text(&out.stderr).contains("invalid value 'lots'"));
    fails(&["create", &path("y"), "--layout", "two words"], "invalid layout name \"two words\"");
    fails(&["create", p], "already exists");

    // Not a pool; missing.
    std::fs::write(path("notes.txt"), "just some text, not a pool").unwrap();
    fails(&["info", &path("notes.txt")], "not an nvhtm pool (magic is \"just som\"");
    fails(&["info", &path("missing")], "missing: no such file");

    // Wrong layout.
    fails(&["info", p, "--layout", "other"], "pool layout is \"nvhtm\", expected \"other\"");

    // Newer format version (with a valid checksum).
    let mut bytes = std::fs::read(&pool).unwrap();
    bytes[8..12].copy_from_slice(&7u32.to_ne_bytes());
    let sum = xxhash_rust::xxh3::xxh3_64(&bytes[..248]);
    bytes[248..256].copy_from_slice(&sum.to_ne_bytes());
    std::fs::write(path("newer.pool"), &bytes).unwrap();
    fails(&["info", &path("newer.pool")], "pool format version 7 is newer than this build supports (1)");

    // Bad header checksum.
    let mut bytes = std::fs::read(&pool).unwrap();
    bytes[20] ^= 0xff;
    std::fs::write(path("corrupt.pool"), &bytes).unwrap();
    fails(&["info", &path("corrupt.pool")], "header checksum mismatch");

    // Truncated; a failed open writes nothing.
    let bytes = std::fs::read(&pool).unwrap();
    std::fs::write(path("short.pool"), &bytes[..200_000]).unwrap();
    fails(&["info", &path("short.pool")], "truncated: the pool needs 1048576 bytes but the file has 200000");
    fails(&["grow", &path("short.pool"), "2MiB"], "truncated");
    assert!(std::fs::read(path("short.pool")).unwrap() == bytes[..200_000], "a failed open wrote");
}

#[test]
fn no_permission_is_reported_as_such() {
    let dir = shm();
    let pool = create(dir.path());
    let root = rustix::process::geteuid().is_root();
    // Only the owner may enter the directory; the test runs the command as someone else.
    let mode = if root { 0o700 } else { 0o000 };
    std::fs::set_permissions(dir.path(), PermissionsExt::from_mode(mode)).unwrap();
    let run = |args: &[&str]| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_nvhtm"));
        cmd.args(args);
        if root {
            // Root may open anything: drop to an unprivileged user for this one command.
            cmd.uid(65534).gid(65534);
        }
        cmd.output().unwrap()
    };
    let info = run(&["info", pool.to_str().unwrap()]);
    let create = run(&["create", dir.path().join("new.pool").to_str().unwrap()]);
    std::fs::set_permissions(dir.path(), PermissionsExt::from_mode(0o700)).unwrap();
    assert_eq!(info.status.code(), Some(1));
    assert!(text(&info.stderr).contains("permission denied (open)"), "{}", text(&info.stderr));
    assert_eq!(create.status.code(), Some(1));
    assert!(text(&create.stderr).contains("permission denied (create)"), "{}", text(&create.stderr));
}

#[test]
fn check_reports_clean_crashed_and_corrupt_pools_and_writes_only_with_repair() {
    use nvhtm::heap::HeapError;
    let dir = shm();
    let pool = create(dir.path());
    let p = pool.to_str().unwrap();
    let out = nvhtm(&["check", p]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(stdout.contains("recovery    nothing in flight"), "{stdout}");
    assert!(stdout.contains("result      consistent"), "{stdout}");

    // A crash in the middle of a transaction: copy the file while the transaction is in flight
    // (what a process crash leaves: the page cache survives, the transaction did not finish).
    let crashed = dir.path().join("crashed.pool");
    {
        let heap = Heap::<AutoDomain>::open(&pool, &PoolOptions::default()).unwrap();
        let root = heap.root::<[u64; 4]>().unwrap();
        heap.transaction(|tx| tx.write(root, &[1, 2, 3, 4])).unwrap();
        let _: Result<(), HeapError> = heap.transaction(|tx| {
            tx.write(root, &[9, 9, 9, 9])?;
            tx.alloc_bytes(1000)?;
            std::fs::copy(&pool, &crashed).unwrap();
            Err(HeapError::Corrupt("stop here".into()))
        });
    }
    let c = crashed.to_str().unwrap();
    let before = std::fs::read(&crashed).unwrap();
    let out = nvhtm(&["check", c]);
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", text(&out.stderr));
    assert!(stdout.contains("(last shutdown NOT clean)"), "{stdout}");
    assert!(
        stdout.contains(
            "roll back an unfinished transaction (1 snapshots) [not written: run with --repair to apply]"
        ),
        "{stdout}"
    );
    assert!(std::fs::read(&crashed).unwrap() == before, "check without --repair wrote to the pool");

    let out = nvhtm(&["check", c, "--repair", "--json"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["repaired"], true);
    assert!(json["recovery"].as_array().unwrap().iter().any(|r| r["rolled_back"] == 1), "{json}");
    assert_eq!(json["report"]["small_blocks"], 1, "only the root is allocated: {json}");
    let heap = Heap::<AutoDomain>::open(&crashed, &PoolOptions::default()).unwrap();
    assert_eq!(heap.get(heap.root::<[u64; 4]>().unwrap()).unwrap(), [1, 2, 3, 4]);
    drop(heap);
    let out = nvhtm(&["check", c]);
    assert!(text(&out.stdout).contains("recovery    nothing in flight"));

    // Deliberate corruption: a chunk head overwritten with garbage.
    let mut bytes = std::fs::read(&pool).unwrap();
    let info: serde_json::Value = serde_json::from_slice(&nvhtm(&["check", p, "--json"]).stdout).unwrap();
    let chunks = info["report"]["chunks"].as_u64().unwrap();
    let last_chunk =
        (info["report"]["chunks_offset"].as_u64().unwrap() + (chunks - 1) * nvhtm::heap::CHUNK) as usize;
    bytes[last_chunk..last_chunk + 8].copy_from_slice(&0xdead_beef_u64.to_ne_bytes());
    std::fs::write(&pool, &bytes).unwrap();
    fails(&["check", p], "corrupt heap: chunk");
    fails(&["check", p, "--repair"], "invalid head 0x00000000deadbeef");
    assert!(std::fs::read(&pool).unwrap() == bytes, "nothing was written to the corrupt pool");

    // A pool without a heap, and a pool held by another process.
    let bare = dir.path().join("bare.pool");
    Pool::<AutoDomain>::create(&bare, &PoolOptions::default().with_size(1 << 20)).unwrap().close().unwrap();
    fails(&["check", bare.to_str().unwrap()], "the pool holds no nvhtm heap");
    let held = Heap::<AutoDomain>::open(&crashed, &PoolOptions::default()).unwrap();
    fails(&["check", c], "locked: another process has this pool open");
    drop(held);
}

#[test]
fn set_get_del_load_dump_round_trip() {
    let dir = shm();
    let pool = create(dir.path());
    let p = pool.to_str().unwrap();
    let out = nvhtm(&["set", p, "greeting", "hello world"]);
    assert_eq!(text(&out.stdout), "OK\n", "{}", text(&out.stderr));
    assert_eq!(text(&nvhtm(&["get", p, "greeting"]).stdout), "hello world\n");
    fails(&["get", p, "missing"], "\"missing\": no such key");
    assert_eq!(text(&nvhtm(&["del", p, "greeting"]).stdout), "1\n");
    assert_eq!(text(&nvhtm(&["del", p, "greeting"]).stdout), "0\n");

    // Load escaped tab-separated lines, including a long value and awkward bytes.
    let input = dir.path().join("in.tsv");
    let long = "x".repeat(5000);
    std::fs::write(&input, format!("a\t1\nwith\\ttab\tline\\nbreak\nlong\t{long}\n\nback\\\\slash\t\n"))
        .unwrap();
    let out = nvhtm(&["load", p, input.to_str().unwrap()]);
    assert_eq!(text(&out.stdout), "loaded 4 keys\n", "{}", text(&out.stderr));
    assert_eq!(text(&nvhtm(&["get", p, "with\ttab"]).stdout), "line\nbreak\n");
    let mut dumped: Vec<String> = text(&nvhtm(&["dump", p]).stdout).lines().map(String::from).collect();
    dumped.sort();
    assert_eq!(
        dumped,
        vec![
            "a\t1".to_string(),
            "back\\\\slash\t".into(),
            format!("long\t{long}"),
            "with\\ttab\tline\\nbreak".into()
        ]
    );

    // A dump loads back into another pool unchanged.
    let copy = dir.path().join("copy.pool");
    assert!(nvhtm(&["create", copy.to_str().unwrap(), "--size", "1MiB"]).status.success());
    let dump_file = dir.path().join("dump.tsv");
    std::fs::write(&dump_file, nvhtm(&["dump", p]).stdout).unwrap();
    assert_eq!(
        text(&nvhtm(&["load", copy.to_str().unwrap(), dump_file.to_str().unwrap()]).stdout),
        "loaded 4 keys\n"
    );
    let mut again: Vec<String> =
        text(&nvhtm(&["dump", copy.to_str().unwrap()]).stdout).lines().map(String::from).collect();
    again.sort();
    assert_eq!(again, dumped);

    // Stats count what is there (after a reopen: from media).
    let stats = text(&nvhtm(&["stats", p]).stdout);
    assert!(
        stats.starts_with(
            "map         strict\nentries     4\nsegments    1\ndirectory   depth 0 (1 entries)\n"
        ),
        "{stats}"
    );
    let json: serde_json::Value = serde_json::from_slice(&nvhtm(&["stats", p, "--json"]).stdout).unwrap();
    assert_eq!(json["entries"], 4);
    assert_eq!(json["segments"], 1);

    std::fs::write(&input, "no tab here\n").unwrap();
    fails(&["load", p, input.to_str().unwrap()], "in.tsv:1: no tab between key and value");
    std::fs::write(&input, "k\tbad \\q escape\n").unwrap();
    fails(&["load", p, input.to_str().unwrap()], "in.tsv:1: unknown escape \\q");
    assert!(nvhtm(&["check", p]).status.success());
}

/// A pool created with a periodic map: every map command works on it, the root says which map
/// it holds, and the epoch length recorded at creation is reported.
#[test]
fn periodic_maps_work_through_the_cli() {
    let dir = shm();
    let pool = dir.path().join("periodic.pool");
    let p = pool.to_str().unwrap();
    let out = nvhtm(&["create", p, "--size", "8MiB", "--map", "periodic", "--epoch-ms", "2.5"]);
    assert!(
        text(&out.stdout).contains("with an empty periodic map, epochs of 2.5 ms"),
        "{}",
        text(&out.stderr)
    );
    assert_eq!(text(&nvhtm(&["set", p, "k", "v"]).stdout), "OK\n");
    let input = dir.path().join("in.tsv");
    let lines: String = (0..500).map(|i| format!("key{i}\tvalue{i}\n")).collect();
    std::fs::write(&input, lines).unwrap();
    assert_eq!(text(&nvhtm(&["load", p, input.to_str().unwrap()]).stdout), "loaded 500 keys\n");
    assert_eq!(text(&nvhtm(&["get", p, "key321"]).stdout), "value321\n");
    assert_eq!(text(&nvhtm(&["del", p, "k"]).stdout), "1\n");
    fails(&["get", p, "k"], "\"k\": no such key");
    assert_eq!(text(&nvhtm(&["dump", p]).stdout).lines().count(), 500);
    let json: serde_json::Value = serde_json::from_slice(&nvhtm(&["stats", p, "--json"]).stdout).unwrap();
    assert_eq!(json["kind"], "periodic");
    assert_eq!(json["entries"], 500);
    assert_eq!(json["epoch_ms"], 2.5);
    assert!(json["segments"].as_u64().unwrap() > 1, "{json}");
    assert!(json["longest_bucket"].as_u64().unwrap() <= 6, "{json}");
    assert!(nvhtm(&["check", p]).status.success());
}

/// A pool created with a hybrid map: every map command works on it (each one replays the log
/// at open), and stats report the log.
#[test]
fn hybrid_maps_work_through_the_cli() {
    let dir = shm();
    let pool = dir.path().join("hybrid.pool");
    let p = pool.to_str().unwrap();
    let out = nvhtm(&["create", p, "--size", "8MiB", "--map", "hybrid"]);
    assert!(text(&out.stdout).contains("with an empty hybrid map"), "{}", text(&out.stderr));
    assert_eq!(text(&nvhtm(&["set", p, "k", "v"]).stdout), "OK\n");
    let input = dir.path().join("in.tsv");
    let lines: String = (0..500).map(|i| format!("key{i}\tvalue{i}\n")).collect();
    std::fs::write(&input, lines).unwrap();
    assert_eq!(text(&nvhtm(&["load", p, input.to_str().unwrap()]).stdout), "loaded 500 keys\n");
    assert_eq!(text(&nvhtm(&["set", p, "key7", "again"]).stdout), "OK\n");
    assert_eq!(text(&nvhtm(&["get", p, "key7"]).stdout), "again\n");
    assert_eq!(text(&nvhtm(&["del", p, "k"]).stdout), "1\n");
    fails(&["get", p, "k"], "\"k\": no such key");
    assert_eq!(text(&nvhtm(&["dump", p]).stdout).lines().count(), 500);
    let json: serde_json::Value = serde_json::from_slice(&nvhtm(&["stats", p, "--json"]).stdout).unwrap();
    assert_eq!(json["kind"], "hybrid");
    assert_eq!(json["entries"], 500);
    // 502 puts and a delete were appended; 500 records are live.
    let log = &json["log"];
    assert!(log["live_bytes"].as_u64().unwrap() < log["log_bytes"].as_u64().unwrap(), "{json}");
    assert!(text(&nvhtm(&["stats", p]).stdout).contains("replayed in"));
    assert!(nvhtm(&["check", p]).status.success());
}

#[test]
fn the_hybrid_crash_demo_loses_no_acknowledged_key() {
    let dir = shm();
    let pool = dir.path().join("demo.pool");
    let out = nvhtm(&[
        "demo",
        "--map",
        "hybrid",
        "--keys",
        "40000",
        "--rounds",
        "4",
        "--pool",
        pool.to_str().unwrap(),
    ]);
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", text(&out.stderr));
    let summary = stdout.lines().last().unwrap();
    assert!(summary.starts_with("summary: 4 kills, "), "{summary}");
    assert!(summary.contains(" verified, 0 lost"), "{summary}");
    assert!(stdout.starts_with("nvhtm demo: hybrid map"), "{stdout}");
}

/// The periodic crash demo: every kill keeps a prefix of the upserts that includes everything
/// before the last acknowledged sync (the demo fails otherwise).
#[test]
fn the_periodic_crash_demo_keeps_a_prefix_through_every_sync() {
    let dir = shm();
    let pool = dir.path().join("demo.pool");
    let args = ["demo", "--map", "periodic", "--keys", "30000", "--rounds", "4", "--sync-every", "500"];
    let out = nvhtm(&[&args[..], &["--epoch-ms", "1", "--pool", pool.to_str().unwrap()]].concat());
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", text(&out.stderr));
    let summary = stdout.lines().last().unwrap();
    assert!(summary.starts_with("summary: 4 kills, epochs of 1 ms: "), "{summary}");
    assert!(summary.contains("every crash kept a prefix"), "{summary}");
}

#[test]
fn the_crash_demo_loses_no_acknowledged_key() {
    let dir = shm();
    let pool = dir.path().join("demo.pool");
    let out = nvhtm(&["demo", "--keys", "40000", "--rounds", "4", "--pool", pool.to_str().unwrap()]);
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", text(&out.stderr));
    let summary = stdout.lines().last().unwrap();
    assert!(summary.starts_with("summary: 4 kills, "), "{summary}");
    // "N keys acknowledged, N verified, 0 lost"
    let numbers: Vec<u64> =
        summary.split(|c: char| !c.is_ascii_digit()).filter_map(|w| w.parse().ok()).collect();
    assert!(numbers[1] > 0 && numbers[1] == numbers[2], "{summary}");
    assert!(summary.contains(" 0 lost"), "{summary}");
}

#[test]
fn fams_pools_work_through_the_cli_and_survive_kill_9() {
    let dir = disk();
    let pool = dir.path().join("f.pool");
    let p = pool.to_str().unwrap();
    let out = nvhtm(&["create", p, "--fams", "--size", "1MiB"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("(volatile domain)"), "{}", text(&out.stdout));
    assert_eq!(text(&nvhtm(&["set", p, "k", "synced at exit"]).stdout), "OK\n");
    assert_eq!(text(&nvhtm(&["get", p, "k"]).stdout), "synced at exit\n");
    let info = text(&nvhtm(&["info", p]).stdout);
    assert!(info.contains("fams        yes"), "{info}");
    assert!(info.contains("FAMS: changes live in private memory"), "{info}");
    let out = nvhtm(&["check", p]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("result      consistent"));
    assert!(nvhtm(&["check", p, "--repair"]).status.success());

    let demo_pool = dir.path().join("demo.pool");
    let out = nvhtm(&[
        "demo",
        "--fams",
        "--sync-every",
        "500",
        "--keys",
        "20000",
        "--rounds",
        "3",
        "--pool",
        demo_pool.to_str().unwrap(),
    ]);
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", text(&out.stderr));
    let summary = stdout.lines().last().unwrap();
    assert!(summary.starts_with("summary: 3 kills, ") && summary.contains(" 0 lost"), "{summary}");
}

#[test]
fn mutation_scores_a_suite_in_json_and_rejects_an_unknown_one() {
    let out = nvhtm(&["mutation", "--suite", "pool-header", "--json"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let table: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    let sites = table["sites"].as_array().expect("a list of sites");
    assert!(!sites.is_empty(), "{table}");
    for row in sites {
        assert!(row["file"].as_str().is_some_and(|f| f.ends_with(".rs")), "{row}");
        assert!(row["line"].as_u64().is_some_and(|l| l > 0), "{row}");
        assert_eq!(row["structure"], "pool", "{row}");
        assert_eq!(row["caught"], true, "{row}");
        assert_eq!(row["caught_by"], serde_json::json!(["pool-header"]), "{row}");
    }
    assert_eq!(table["suites"][0]["name"], "pool-header");
    assert_eq!(table["suites"][0]["baseline_passed"], true);
    let real = table["not_mutated"].as_array().expect("the syncs of real files");
    for structure in ["fams", "pool"] {
        assert!(real.iter().any(|n| n["structure"] == structure), "{structure}: {table}");
    }
    fails(&["mutation", "--suite", "no-such"], "no suite \"no-such\"; the suites are litmus, pool-header");
}

#[test]
fn bench_map_smoke_run_reports_every_engine_op_and_allocation_count() {
    let dir = shm();
    let json = dir.path().join("map.json");
    let out = nvhtm(&[
        "bench",
        "map",
        "--pmem-dir",
        dir.path().to_str().unwrap(),
        "--keys",
        "2000",
        "--rounds",
        "1",
        "--open-keys",
        "100,200",
        "--json",
        json.to_str().unwrap(),
    ]);
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", text(&out.stderr));
    for engine in
        ["hashbrown", "nvhtm (volatile)", "nvhtm (cpu)", "nvhtm periodic (cpu)", "nvhtm hybrid (cpu)"]
    {
        assert!(stdout.contains(&format!("allocations in timed loops, {engine}: ")), "{stdout}");
    }
    let report: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).expect("JSON");
    let rows = report["results"].as_array().expect("results");
    // hashbrown: 7 ops at 1 thread, 4 lookups at 2; each of the four nvhtm engines: 7 ops at 1
    // and 2 threads; for both shapes.
    assert_eq!(rows.len(), 2 * (7 + 4 + 4 * 14), "{report}");
    for row in rows {
        let mops = row["mops_per_second"].as_f64().expect("Mops/s");
        assert!(mops.is_finite() && mops > 0.0, "{row}");
        assert!(row["ratio_to_hashbrown"].as_f64().is_some_and(|r| r.is_finite() && r > 0.0), "{row}");
        let allocations = row["allocations_in_timed_loop"].as_u64().expect("allocation count");
        let engine = row["engine"].as_str().unwrap();
        let op = row["op"].as_str().unwrap();
        let lines = row["lines_flushed_per_op"].as_f64().unwrap();
        match engine {
            // Pre-sized, with every value built before timing: no allocation at all.
            "hashbrown" => {
                assert_eq!(allocations, 0, "{row}");
                assert!(row["ratio_to_volatile"].is_null(), "{row}");
            }
            "nvhtm (volatile)" => assert_eq!(lines, 0.0, "{row}"),
            "nvhtm (cpu)" => {
                assert!(row["ratio_to_volatile"].as_f64().is_some_and(|r| r > 0.0), "{row}");
                // Writes flush and fence; lookups never do.
                assert_eq!(op.starts_with("get"), lines == 0.0, "{row}");
            }
            // Its persister writes back the previous loop's epochs whenever it runs: no claim
            // about lines per lookup.
            "nvhtm periodic (cpu)" => {
                assert!(row["ratio_to_volatile"].is_null(), "{row}");
                assert!(row["ratio_to_strict"].as_f64().is_some_and(|r| r > 0.0), "{row}");
            }
            // One group commit per write, each its own fence with one thread; lookups of
            // durable records never fence.
            "nvhtm hybrid (cpu)" => {
                assert!(row["ratio_to_strict"].as_f64().is_some_and(|r| r > 0.0), "{row}");
                let fences = row["fences_per_op"].as_f64().unwrap();
                assert_eq!(op.starts_with("get"), fences == 0.0, "{row}");
            }
            other => panic!("unknown engine {other}"),
        }
        // Only the timed threads' allocations are counted (not the periodic map's persister).
        if op.starts_with("get") {
            assert_eq!(allocations, 0, "lookups allocate nothing: {row}");
        }
    }
    assert_eq!(report["open"].as_array().map(Vec::len), Some(6), "{report}");
}
