//! Restarts and crashes: data across SHUTDOWN, SIGTERM and kill -9 in every mode; which map
//! a pool is served with.

use super::*;

#[test]
fn data_survives_shutdown_and_restart_on_an_ordinary_file() {
    // The default temporary directory: an ordinary file system (the Msync domain) on most
    // machines, where /dev/shm is the Cpu domain the other tests use.
    let dir = tempfile::tempdir().unwrap();
    let pool = dir.path().join("restart.pool");
    let server = Server::start(&pool, &[]);
    let mut c = server.conn();
    assert_eq!(c.cmd(&["SET", "a", "1"]), ok());
    assert_eq!(c.cmd(&["INCRBY", "n", "7"]), V::Int(7));
    assert_eq!(c.cmd(&["APPEND", "s", "xyz"]), V::Int(3));
    assert_eq!(c.cmd(&["DEL", "a"]), V::Int(1));
    assert_eq!(c.cmd(&["SET", "b", "2"]), ok());
    assert!(server.shutdown().success());
    assert!(pool.exists());

    let server = Server::start(&pool, &[]);
    assert!(server.logged("keys_recovered=3"), "{}", server.log());
    let mut c = server.conn();
    assert_eq!(
        c.cmd(&["MGET", "a", "b", "n", "s"]),
        V::Array(vec![V::Nil, bulk("2"), bulk("7"), bulk("xyz")])
    );
    let V::Bulk(info) = c.cmd(&["INFO", "persistence"]) else { panic!("INFO") };
    assert!(String::from_utf8(info).unwrap().contains("nvhtm_keys_recovered:3\r\n"));
    assert_eq!(c.cmd(&["SET", "c", "3"]), ok());
    drop(c);
    // SIGTERM closes the pool cleanly too.
    assert!(server.terminate().success());
    let info =
        Command::new(env!("CARGO_BIN_EXE_nvhtm")).args(["info", "--json"]).arg(&pool).output().unwrap();
    let info: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
    assert_eq!(info["clean_shutdown"], serde_json::Value::Bool(true), "{info}");
    let server = Server::start(&pool, &[]);
    assert_eq!(server.conn().cmd(&["DBSIZE"]), V::Int(4));
    // A mapped pool cannot be served in fams mode.
    let status = Command::new(env!("CARGO_BIN_EXE_nvhtm"))
        .args(["serve", "--mode", "fams", "--port", "0", "--pool"])
        .arg(&server.pool)
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    assert!(!status.status.success());
    assert!(String::from_utf8_lossy(&status.stderr).contains("not a FAMS pool"));
}

/// Writers pipelining SETs; returns each writer's acknowledged keys once the server dies.
fn write_until_killed(
    addr: &str,
    writers: usize,
    acked: &Arc<Mutex<Vec<u64>>>,
) -> Vec<std::thread::JoinHandle<()>> {
    (0..writers)
        .map(|w| {
            // Connected before any writer starts: the kill may come before a late one would.
            let (mut c, acked) = (Conn::new(addr), Arc::clone(acked));
            std::thread::spawn(move || {
                let mut next = (w as u64) << 32;
                loop {
                    let batch: Vec<u64> = (next..next + 50).collect();
                    next += 50;
                    let mut bytes = Vec::new();
                    for k in &batch {
                        bytes.extend(encode(&[
                            b"SET",
                            format!("k{k}").as_bytes(),
                            format!("v{k}").as_bytes(),
                        ]));
                    }
                    if c.writer.write_all(&bytes).is_err() {
                        return;
                    }
                    for k in batch {
                        match c.try_read() {
                            Ok(reply) => {
                                assert_eq!(reply, ok());
                                acked.lock().unwrap().push(k);
                            }
                            Err(_) => return,
                        }
                    }
                }
            })
        })
        .collect()
}

/// Rounds of: start the server on `pool` with `args`, writers pipelining SETs, kill -9 once
/// `per_round` × round writes were acknowledged (more are in flight), restart, and check that
/// every acknowledged write is there. Returns the writes checked.
fn acknowledged_writes_survive_kill_9(pool: &Path, args: &[&str], rounds: usize, per_round: usize) -> usize {
    let mut checked = 0;
    for round in 1..=rounds {
        let server = Server::start(pool, args);
        let acked = Arc::new(Mutex::new(Vec::new()));
        let writers = write_until_killed(&server.addr, 3, &acked);
        // Kill once enough writes were acknowledged: they are still streaming in.
        while acked.lock().unwrap().len() < per_round * round {
            std::thread::yield_now();
        }
        server.kill9();
        for w in writers {
            w.join().unwrap();
        }
        let acked = acked.lock().unwrap().clone();
        let server = Server::start(pool, args);
        let mut c = server.conn();
        for chunk in acked.chunks(500) {
            let mut bytes = Vec::new();
            for k in chunk {
                bytes.extend(encode(&[b"GET", format!("k{k}").as_bytes()]));
            }
            c.send(&bytes);
            for k in chunk {
                assert_eq!(c.read(), bulk(&format!("v{k}")), "acknowledged key k{k} lost after kill -9");
            }
        }
        checked += acked.len();
        assert_eq!(c.cmd(&["FLUSHDB"]), ok());
        assert!(server.shutdown().success());
    }
    eprintln!("kill -9 with {args:?}: {rounds} kills, {checked} acknowledged writes checked, none lost");
    checked
}

#[test]
fn strict_mode_keeps_every_acknowledged_write_across_kill_9() {
    let dir = scratch();
    let checked =
        acknowledged_writes_survive_kill_9(&dir.path().join("kill.pool"), &["--mode", "strict"], 3, 2000);
    assert!(checked >= 2000 + 4000 + 6000);
}

#[test]
fn strict_mode_on_an_ordinary_file_keeps_every_acknowledged_write_across_kill_9() {
    // A mapped pool in the default temporary directory: the Msync domain on most machines (an
    // msync per operation, so fewer writes).
    let dir = tempfile::tempdir().unwrap();
    let checked =
        acknowledged_writes_survive_kill_9(&dir.path().join("msync.pool"), &["--mode", "strict"], 1, 300);
    assert!(checked >= 300);
}

#[test]
fn strict_mode_on_a_fams_pool_group_commits_every_acknowledged_write() {
    // An ordinary file system, where a mapped pool would pay an msync per operation.
    let dir = tempfile::tempdir().unwrap();
    let pool = dir.path().join("group.pool");
    let created =
        Command::new(env!("CARGO_BIN_EXE_nvhtm")).args(["create", "--fams"]).arg(&pool).output().unwrap();
    assert!(created.status.success(), "{created:?}");
    let server = Server::start(&pool, &["--mode", "strict", "--sync-ms", "3600000"]);
    let V::Bulk(info) = server.conn().cmd(&["INFO", "persistence"]) else { panic!("INFO") };
    let info = String::from_utf8(info).unwrap();
    assert!(info.contains("nvhtm_mode:strict\r\n") && info.contains("nvhtm_group_commit:yes\r\n"), "{info}");
    // Without the group commit nothing would reach the file before the hourly sync.
    let mut c = server.conn();
    assert_eq!(c.cmd(&["SET", "one", "1"]), ok());
    // Reads of committed data wait for no commit; a write does.
    let syncs = |c: &mut Conn| {
        let V::Bulk(info) = c.cmd(&["INFO", "persistence"]) else { panic!("INFO") };
        let info = String::from_utf8(info).unwrap();
        info.lines().find_map(|l| l.strip_prefix("nvhtm_syncs:")).unwrap().trim().parse::<u64>().unwrap()
    };
    let before = syncs(&mut c);
    for _ in 0..100 {
        assert_eq!(c.cmd(&["GET", "one"]), bulk("1"));
    }
    assert_eq!(syncs(&mut c), before, "reads of committed data committed nothing");
    assert_eq!(c.cmd(&["INCR", "one"]), V::Int(2));
    assert_eq!(syncs(&mut c), before + 1, "one commit for one write");
    server.kill9();
    let server = Server::start(&pool, &["--mode", "strict"]);
    assert_eq!(server.conn().cmd(&["GET", "one"]), bulk("2"));
    assert!(server.shutdown().success());
    let checked =
        acknowledged_writes_survive_kill_9(&pool, &["--mode", "strict", "--sync-ms", "3600000"], 2, 1000);
    assert!(checked >= 1000 + 2000);
}

#[test]
fn fams_mode_keeps_the_last_sync_across_kill_9_and_everything_at_shutdown() {
    let dir = tempfile::tempdir().unwrap();
    let pool = dir.path().join("fams.pool");
    // Syncs only at SAVE and SHUTDOWN in this test (the timer's hour never comes).
    let server = Server::start(&pool, &["--mode", "fams", "--sync-ms", "3600000"]);
    let mut c = server.conn();
    assert_eq!(c.cmd(&["MSET", "a", "1", "b", "1"]), ok());
    assert_eq!(c.cmd(&["SAVE"]), ok());
    assert_eq!(c.cmd(&["SET", "after", "x"]), ok());
    assert_eq!(c.cmd(&["INCR", "a"]), V::Int(2));
    let V::Bulk(info) = c.cmd(&["INFO", "persistence"]) else { panic!("INFO") };
    let info = String::from_utf8(info).unwrap();
    assert!(info.contains("nvhtm_mode:fams\r\n") && info.contains("nvhtm_syncs:1\r\n"), "{info}");
    server.kill9();

    // The state of the last SAVE: nothing after it.
    let server = Server::start(&pool, &[]);
    let mut c = server.conn();
    assert_eq!(c.cmd(&["MGET", "a", "b", "after"]), V::Array(vec![bulk("1"), bulk("1"), V::Nil]));
    assert_eq!(c.cmd(&["SET", "at-shutdown", "y"]), ok());
    assert!(server.shutdown().success());

    // The timer syncs by itself: poll (bounded) until INFO counts a sync, then kill.
    let server = Server::start(&pool, &["--sync-ms", "20"]);
    let mut c = server.conn();
    assert_eq!(c.cmd(&["GET", "at-shutdown"]), bulk("y"));
    assert_eq!(c.cmd(&["SET", "timed", "z"]), ok());
    let synced_after = |c: &mut Conn| {
        let V::Bulk(info) = c.cmd(&["INFO", "persistence"]) else { panic!("INFO") };
        let info = String::from_utf8(info).unwrap();
        let syncs =
            info.lines().find_map(|l| l.strip_prefix("nvhtm_syncs:")).unwrap().trim().parse::<u64>().unwrap();
        syncs
    };
    let first = synced_after(&mut c);
    let mut polls = 0;
    while synced_after(&mut c) < first + 2 {
        polls += 1;
        assert!(polls < 100_000, "the sync timer never ran");
        std::thread::yield_now();
    }
    server.kill9();
    let server = Server::start(&pool, &[]);
    assert_eq!(server.conn().cmd(&["GET", "timed"]), bulk("z"));
}

/// Starts `nvhtm serve` on `pool` with `args`, expecting it to fail at startup; its stderr.
fn refused(pool: &Path, args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_nvhtm"))
        .args(["serve", "--port", "0", "--pool"])
        .arg(pool)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "{args:?} on {} started: {stderr}", pool.display());
    stderr
}

fn persistence_info(c: &mut Conn) -> String {
    let V::Bulk(info) = c.cmd(&["INFO", "persistence"]) else { panic!("INFO") };
    String::from_utf8(info).unwrap()
}

#[test]
fn the_pool_s_map_decides_the_mode_and_a_contradicting_mode_fails_naming_both() {
    let dir = scratch();
    for (made, wrong) in
        [("hybrid", "strict"), ("hybrid", "periodic"), ("periodic", "hybrid"), ("strict", "periodic")]
    {
        let pool = dir.path().join(format!("{made}-{wrong}.pool"));
        let server = Server::start(&pool, &["--mode", made]);
        assert!(server.logged(&format!("map={made}")), "the startup line names the map: {}", server.log());
        assert_eq!(server.conn().cmd(&["SET", "k", made]), ok());
        assert!(server.shutdown().success());

        let stderr = refused(&pool, &["--mode", wrong]);
        assert!(
            stderr.contains(&format!("holds a {made} map; it cannot be served in {wrong} mode")),
            "{made} pool, --mode {wrong}: {stderr}"
        );
        // Refused before touching the data; without --mode the pool's own map is served.
        let server = Server::start(&pool, &[]);
        let mut c = server.conn();
        assert_eq!(c.cmd(&["GET", "k"]), bulk(made));
        let info = persistence_info(&mut c);
        assert!(info.contains(&format!("nvhtm_mode:{made}\r\nnvhtm_map:{made}\r\n")), "{info}");
        assert!(server.shutdown().success());
    }
    // A FAMS pool serves only the strict map, in fams or strict mode.
    let pool = dir.path().join("fams.pool");
    let created =
        Command::new(env!("CARGO_BIN_EXE_nvhtm")).args(["create", "--fams"]).arg(&pool).output().unwrap();
    assert!(created.status.success(), "{created:?}");
    for wrong in ["periodic", "hybrid"] {
        let stderr = refused(&pool, &["--mode", wrong]);
        assert!(stderr.contains(&format!("is a FAMS pool; it cannot be served in {wrong} mode")), "{stderr}");
    }
}

#[test]
fn hybrid_mode_keeps_every_acknowledged_write_across_kill_9() {
    let dir = scratch();
    let checked =
        acknowledged_writes_survive_kill_9(&dir.path().join("hybrid.pool"), &["--mode", "hybrid"], 3, 2000);
    assert!(checked >= 2000 + 4000 + 6000);
}

#[test]
fn hybrid_mode_on_an_ordinary_file_keeps_every_acknowledged_write_across_kill_9() {
    // The Msync domain on most machines: every batch of writes shares one msync.
    let dir = tempfile::tempdir().unwrap();
    let checked =
        acknowledged_writes_survive_kill_9(&dir.path().join("hybrid.pool"), &["--mode", "hybrid"], 2, 1000);
    assert!(checked >= 1000 + 2000);
}

#[test]
fn periodic_mode_keeps_what_save_synced_across_kill_9_and_everything_at_shutdown() {
    let dir = tempfile::tempdir().unwrap();
    let pool = dir.path().join("periodic.pool");
    // Epochs of an hour: in this test only SAVE and a clean shutdown make writes durable.
    let server = Server::start(&pool, &["--mode", "periodic", "--epoch-ms", "3600000"]);
    let mut c = server.conn();
    assert_eq!(c.cmd(&["MSET", "a", "1", "b", "2"]), ok());
    for _ in 0..100 {
        assert!(matches!(c.cmd(&["INCR", "n"]), V::Int(_)));
    }
    assert_eq!(c.cmd(&["SAVE"]), ok());
    let info = persistence_info(&mut c);
    assert!(info.contains("nvhtm_map:periodic\r\n") && info.contains("nvhtm_epoch_ms:3600000\r\n"), "{info}");
    server.kill9();

    let server = Server::start(&pool, &[]);
    let mut c = server.conn();
    assert_eq!(c.cmd(&["MGET", "a", "b", "n"]), V::Array(vec![bulk("1"), bulk("2"), bulk("100")]));
    let info = persistence_info(&mut c);
    assert!(
        info.contains("nvhtm_mode:periodic\r\n") && info.contains("nvhtm_epoch_ms:3600000\r\n"),
        "{info}"
    );
    assert_eq!(c.cmd(&["SET", "at-shutdown", "y"]), ok());
    assert_eq!(c.cmd(&["DEL", "a"]), V::Int(1));
    assert!(server.shutdown().success());

    let server = Server::start(&pool, &["--mode", "periodic"]);
    let mut c = server.conn();
    assert_eq!(c.cmd(&["MGET", "a", "at-shutdown"]), V::Array(vec![V::Nil, bulk("y")]));
    assert_eq!(c.cmd(&["FLUSHALL"]), ok());
    assert_eq!(c.cmd(&["DBSIZE"]), V::Int(0));
}
