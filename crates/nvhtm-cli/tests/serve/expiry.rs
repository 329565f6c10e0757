//! Expiry: the commands' replies and errors, lazy expiry, the active sweep, and deadlines
//! across restarts. No test sleeps to let time pass: deadlines are set in the past or far in
//! the future and TTLs checked within ranges, and where a deadline must pass, a bounded poll
//! asserts the final state.

use super::*;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() as i64
}

fn int(v: V) -> i64 {
    match v {
        V::Int(n) => n,
        other => panic!("not an integer: {other:?}"),
    }
}

/// Asserts `lo <= n <= hi`.
fn within(n: i64, lo: i64, hi: i64, what: &str) {
    assert!((lo..=hi).contains(&n), "{what}: {n} not in {lo}..={hi}");
}

/// Polls `probe` until it returns true; fails after `bound` (a bound on a wait, not a claim
/// about speed).
fn eventually(bound: Duration, what: &str, mut probe: impl FnMut() -> bool) {
    let began = Instant::now();
    while !probe() {
        assert!(began.elapsed() < bound, "{what}: not within {bound:?}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn set_and_its_expire_options_answer_like_redis() {
    let (_dir, server) = fresh();
    let mut c = server.conn();
    assert_eq!(c.cmd(&["SET", "k", "v", "EX", "100"]), ok());
    within(int(c.cmd(&["TTL", "k"])), 90, 100, "TTL after EX 100");
    within(int(c.cmd(&["PTTL", "k"])), 90_000, 100_000, "PTTL after EX 100");
    // A plain SET removes the time to live; KEEPTTL keeps it.
    assert_eq!(c.cmd(&["SET", "k", "v"]), ok());
    assert_eq!(c.cmd(&["TTL", "k"]), V::Int(-1));
    assert_eq!(c.cmd(&["SET", "k", "v", "PX", "100000"]), ok());
    assert_eq!(c.cmd(&["SET", "k", "w", "KEEPTTL"]), ok());
    within(int(c.cmd(&["PTTL", "k"])), 90_000, 100_000, "PTTL after KEEPTTL");
    assert_eq!(c.cmd(&["GET", "k"]), bulk("w"));
    // The same expire option twice: the last wins, as in Redis.
    assert_eq!(c.cmd(&["SET", "k", "v", "EX", "1", "EX", "1000"]), ok());
    within(int(c.cmd(&["TTL", "k"])), 990, 1000, "TTL after EX 1 EX 1000");
    let at = now_ms() + 500_000;
    assert_eq!(c.cmd(&["SET", "k", "v", "PXAT", &at.to_string()]), ok());
    assert_eq!(c.cmd(&["PEXPIRETIME", "k"]), V::Int(at));
    assert_eq!(c.cmd(&["EXPIRETIME", "k"]), V::Int(at / 1000));
    assert_eq!(c.cmd(&["SET", "k", "v", "EXAT", &(at / 1000).to_string()]), ok());
    assert_eq!(c.cmd(&["PEXPIRETIME", "k"]), V::Int(at / 1000 * 1000));
    // A deadline in the past: answered OK, and the key is gone.
    assert_eq!(c.cmd(&["SET", "k", "v", "EXAT", "1"]), ok());
    assert_eq!(c.cmd(&["GET", "k"]), V::Nil);
    assert_eq!(c.cmd(&["EXISTS", "k"]), V::Int(0));
    assert_eq!(c.cmd(&["TTL", "k"]), V::Int(-2));
    // NX sees an expired key as absent; GET answers nil for it.
    assert_eq!(c.cmd(&["SET", "k", "fresh", "NX", "GET", "EX", "100"]), V::Nil);
    assert_eq!(c.cmd(&["SET", "k", "again", "NX"]), V::Nil);
    assert_eq!(c.cmd(&["SET", "k", "x", "XX", "GET", "KEEPTTL"]), bulk("fresh"));
    within(int(c.cmd(&["TTL", "k"])), 90, 100, "TTL after XX GET KEEPTTL");

    let invalid = err("ERR invalid expire time in 'set' command");
    for bad in [
        &["SET", "k", "v", "EX", "0"][..],
        &["SET", "k", "v", "EX", "-5"],
        &["SET", "k", "v", "PX", "0"],
        &["SET", "k", "v", "EXAT", "0"],
        &["SET", "k", "v", "EX", "9223372036854775807"],
        &["SET", "k", "v", "PX", "9223372036854775807"],
    ] {
        assert_eq!(c.cmd(bad), invalid, "{bad:?}");
    }
    assert_eq!(c.cmd(&["SET", "k", "v", "EX", "ten"]), err("ERR value is not an integer or out of range"));
    for bad in [
        &["SET", "k", "v", "EX"][..],
        &["SET", "k", "v", "EX", "10", "PX", "10"],
        &["SET", "k", "v", "EX", "10", "KEEPTTL"],
        &["SET", "k", "v", "KEEPTTL", "PXAT", "10"],
        &["SET", "k", "v", "NX", "XX"],
        &["SET", "k", "v", "PERSIST"],
    ] {
        assert_eq!(c.cmd(bad), err("ERR syntax error"), "{bad:?}");
    }
    assert_eq!(c.cmd(&["GET", "k"]), bulk("x"), "no failed SET changed the key");
    within(int(c.cmd(&["TTL", "k"])), 90, 100, "no failed SET changed the TTL");

    assert_eq!(c.cmd(&["SETEX", "s", "100", "v"]), ok());
    within(int(c.cmd(&["TTL", "s"])), 90, 100, "SETEX");
    assert_eq!(c.cmd(&["PSETEX", "s", "100000", "w"]), ok());
    within(int(c.cmd(&["PTTL", "s"])), 90_000, 100_000, "PSETEX");
    assert_eq!(c.cmd(&["GET", "s"]), bulk("w"));
    assert_eq!(c.cmd(&["SETEX", "s", "0", "v"]), err("ERR invalid expire time in 'setex' command"));
    assert_eq!(c.cmd(&["PSETEX", "s", "-1", "v"]), err("ERR invalid expire time in 'psetex' command"));
    assert_eq!(c.cmd(&["SETEX", "s", "x", "v"]), err("ERR value is not an integer or out of range"));
    assert_eq!(c.cmd(&["SETEX", "s", "1"]), err("ERR wrong number of arguments for 'setex' command"));
}

#[test]
fn expire_ttl_persist_and_getex_answer_like_redis() {
    for mode in MAP_MODES {
        expire_ttl_persist_and_getex_answer_like_redis_in(mode);
    }
}

fn expire_ttl_persist_and_getex_answer_like_redis_in(mode: &str) {
    let (_dir, server) = fresh_in(mode);
    let mut c = server.conn();
    assert_eq!(c.cmd(&["EXPIRE", "none", "100"]), V::Int(0));
    assert_eq!(c.cmd(&["TTL", "none"]), V::Int(-2));
    assert_eq!(c.cmd(&["PTTL", "none"]), V::Int(-2));
    assert_eq!(c.cmd(&["EXPIRETIME", "none"]), V::Int(-2));
    assert_eq!(c.cmd(&["PERSIST", "none"]), V::Int(0));
    assert_eq!(c.cmd(&["SET", "k", "v"]), ok());
    assert_eq!(c.cmd(&["TTL", "k"]), V::Int(-1));
    assert_eq!(c.cmd(&["EXPIRETIME", "k"]), V::Int(-1));
    assert_eq!(c.cmd(&["PERSIST", "k"]), V::Int(0));
    assert_eq!(c.cmd(&["EXPIRE", "k", "100", "XX"]), V::Int(0), "XX: no deadline yet");
    assert_eq!(c.cmd(&["EXPIRE", "k", "100", "GT"]), V::Int(0), "GT: no deadline is infinite");
    assert_eq!(c.cmd(&["TTL", "k"]), V::Int(-1));
    assert_eq!(c.cmd(&["EXPIRE", "k", "100", "NX"]), V::Int(1));
    assert_eq!(c.cmd(&["EXPIRE", "k", "50", "NX"]), V::Int(0));
    assert_eq!(c.cmd(&["EXPIRE", "k", "200", "GT"]), V::Int(1));
    within(int(c.cmd(&["TTL", "k"])), 190, 200, "after GT");
    assert_eq!(c.cmd(&["EXPIRE", "k", "100", "GT"]), V::Int(0));
    assert_eq!(c.cmd(&["PEXPIRE", "k", "150000", "LT"]), V::Int(1));
    within(int(c.cmd(&["PTTL", "k"])), 140_000, 150_000, "after LT");
    assert_eq!(c.cmd(&["EXPIRE", "k", "300", "LT"]), V::Int(0));
    assert_eq!(c.cmd(&["EXPIRE", "k", "300", "XX"]), V::Int(1));
    let at = now_ms() / 1000 + 1000;
    assert_eq!(c.cmd(&["EXPIREAT", "k", &at.to_string()]), V::Int(1));
    assert_eq!(c.cmd(&["EXPIRETIME", "k"]), V::Int(at));
    assert_eq!(c.cmd(&["PEXPIREAT", "k", &(at * 1000 + 7).to_string()]), V::Int(1));
    assert_eq!(c.cmd(&["PEXPIRETIME", "k"]), V::Int(at * 1000 + 7));
    assert_eq!(c.cmd(&["PERSIST", "k"]), V::Int(1));
    assert_eq!(c.cmd(&["TTL", "k"]), V::Int(-1));
    assert_eq!(c.cmd(&["GET", "k"]), bulk("v"));

    assert_eq!(
        c.cmd(&["EXPIRE", "k", "10", "NX", "XX"]),
        err("ERR NX and XX, GT or LT options at the same time are not compatible")
    );
    assert_eq!(
        c.cmd(&["EXPIRE", "k", "10", "GT", "LT"]),
        err("ERR GT and LT options at the same time are not compatible")
    );
    assert_eq!(c.cmd(&["EXPIRE", "k", "10", "soon"]), err("ERR Unsupported option soon"));
    assert_eq!(c.cmd(&["EXPIRE", "k", "ten"]), err("ERR value is not an integer or out of range"));
    assert_eq!(
        c.cmd(&["EXPIRE", "k", "9223372036854775807"]),
        err("ERR invalid expire time in 'expire' command")
    );
    assert_eq!(
        c.cmd(&["PEXPIRE", "k", "9223372036854775807"]),
        err("ERR invalid expire time in 'pexpire' command")
    );
    assert_eq!(c.cmd(&["TTL", "k"]), V::Int(-1), "no failed EXPIRE set a deadline");

    // A deadline already passed deletes the key.
    assert_eq!(c.cmd(&["EXPIRE", "k", "-1"]), V::Int(1));
    assert_eq!(c.cmd(&["EXISTS", "k"]), V::Int(0));
    assert_eq!(c.cmd(&["SET", "k", "v"]), ok());
    assert_eq!(c.cmd(&["PEXPIREAT", "k", "1"]), V::Int(1));
    assert_eq!(c.cmd(&["GET", "k"]), V::Nil);

    // GETEX.
    assert_eq!(c.cmd(&["GETEX", "none", "EX", "10"]), V::Nil);
    assert_eq!(c.cmd(&["SET", "g", "v"]), ok());
    assert_eq!(c.cmd(&["GETEX", "g"]), bulk("v"));
    assert_eq!(c.cmd(&["TTL", "g"]), V::Int(-1));
    assert_eq!(c.cmd(&["GETEX", "g", "EX", "100"]), bulk("v"));
    within(int(c.cmd(&["TTL", "g"])), 90, 100, "GETEX EX");
    assert_eq!(c.cmd(&["GETEX", "g"]), bulk("v"));
    within(int(c.cmd(&["TTL", "g"])), 90, 100, "GETEX keeps the TTL");
    assert_eq!(c.cmd(&["GETEX", "g", "PERSIST"]), bulk("v"));
    assert_eq!(c.cmd(&["TTL", "g"]), V::Int(-1));
    assert_eq!(c.cmd(&["GETEX", "g", "EX", "0"]), err("ERR invalid expire time in 'getex' command"));
    assert_eq!(c.cmd(&["GETEX", "g", "PERSIST", "EX", "10"]), err("ERR syntax error"));
    assert_eq!(c.cmd(&["GETEX", "g", "KEEPTTL"]), err("ERR syntax error"));
    assert_eq!(c.cmd(&["GETEX", "g", "NX"]), err("ERR syntax error"));
    assert_eq!(c.cmd(&["GETEX", "g", "PXAT", "1"]), bulk("v"), "answered, then deleted");
    assert_eq!(c.cmd(&["EXISTS", "g"]), V::Int(0));

    // What keeps a deadline (INCR, APPEND, SETRANGE, INCRBYFLOAT, RENAME) and what drops it
    // (GETSET, MSET).
    for (setup, keeps) in [
        (&["INCR", "t"][..], true),
        (&["APPEND", "t", "0"], true),
        (&["SETRANGE", "t", "0", "1"], true),
        (&["INCRBYFLOAT", "t", "1.5"], true),
        (&["GETSET", "t", "1"], false),
        (&["MSET", "t", "1"], false),
    ] {
        assert_eq!(c.cmd(&["SET", "t", "1", "EX", "100"]), ok());
        assert!(!matches!(c.cmd(setup), V::Error(_)), "{setup:?}");
        let ttl = int(c.cmd(&["TTL", "t"]));
        if keeps {
            within(ttl, 90, 100, &format!("{setup:?} keeps the TTL"));
        } else {
            assert_eq!(ttl, -1, "{setup:?} drops the TTL");
        }
    }
    assert_eq!(c.cmd(&["SET", "from", "v", "EX", "100"]), ok());
    assert_eq!(c.cmd(&["RENAME", "from", "to"]), ok());
    within(int(c.cmd(&["TTL", "to"])), 90, 100, "RENAME carries the TTL");
    // An expired key is absent to every command.
    assert_eq!(c.cmd(&["SET", "gone", "1", "PXAT", "1"]), ok());
    assert_eq!(c.cmd(&["INCR", "gone"]), V::Int(1));
    assert_eq!(c.cmd(&["TTL", "gone"]), V::Int(-1), "a new key, with no deadline");
    assert_eq!(c.cmd(&["SET", "gone", "1", "PXAT", "1"]), ok());
    assert_eq!(c.cmd(&["SETNX", "gone", "2"]), V::Int(1));
    assert_eq!(c.cmd(&["SET", "gone", "1", "PXAT", "1"]), ok());
    assert_eq!(c.cmd(&["DEL", "gone"]), V::Int(0));
    assert_eq!(c.cmd(&["SET", "gone", "1", "PXAT", "1"]), ok());
    assert_eq!(c.cmd(&["RENAME", "gone", "x"]), err("ERR no such key"));
    assert_eq!(c.cmd(&["TYPE", "gone"]), V::Simple("none".into()));
    assert_eq!(c.cmd(&["KEYS", "gone"]), V::Array(vec![]));
}

fn dbsize(c: &mut Conn) -> i64 {
    int(c.cmd(&["DBSIZE"]))
}

#[test]
fn expired_keys_read_as_absent_at_once_and_the_sweep_deletes_them_unread() {
    let (_dir, server) = fresh();
    let mut c = server.conn();
    assert_eq!(c.cmd(&["SET", "stays", "v"]), ok());
    for i in 0..200 {
        let key = format!("short{i}");
        assert_eq!(c.cmd(&["SET", &key, "v", "PX", "30"]), ok());
    }
    within(dbsize(&mut c), 1, 201, "DBSIZE");
    // Nothing reads the short keys from here on: only the sweep can remove them from the map,
    // which DBSIZE counts (expired keys not yet swept included, as in Redis).
    eventually(Duration::from_secs(60), "the sweep deleted the expired keys", || dbsize(&mut c) == 1);
    let V::Bulk(info) = c.cmd(&["INFO", "keyspace"]) else { panic!("INFO") };
    assert!(String::from_utf8(info).unwrap().contains("db0:keys=1,expires=0,"));
    let V::Bulk(info) = c.cmd(&["INFO", "stats"]) else { panic!("INFO") };
    assert!(String::from_utf8(info).unwrap().contains("expired_keys:200\r\n"));
    assert_eq!(c.cmd(&["GET", "stays"]), bulk("v"));
    // A watched short deadline: GET turns nil the moment it passes, before any sweep.
    assert_eq!(c.cmd(&["SET", "k", "v", "PX", "50"]), ok());
    eventually(Duration::from_secs(60), "k expired", || c.cmd(&["GET", "k"]) == V::Nil);
    assert_eq!(c.cmd(&["TTL", "k"]), V::Int(-2));
}

#[test]
fn deadlines_survive_shutdown_kill_9_and_a_fams_restart() {
    let dir = scratch();
    for (name, args) in [("strict.pool", &[][..]), ("fams.pool", &["--mode", "fams", "--sync-ms", "3600000"])]
    {
        let pool = dir.path().join(name);
        let server = Server::start(&pool, args);
        let mut c = server.conn();
        let far = now_ms() + 10_000_000;
        assert_eq!(c.cmd(&["SET", "exact", "v", "PXAT", &far.to_string()]), ok());
        assert_eq!(c.cmd(&["SET", "ex", "v", "EX", "1000"]), ok());
        assert_eq!(c.cmd(&["SET", "plain", "v"]), ok());
        assert_eq!(c.cmd(&["SET", "past", "v", "PXAT", "1"]), ok());
        // Expires while the server is down (or soon after it is back).
        let soon = now_ms() + 300;
        assert_eq!(c.cmd(&["SET", "soon", "v", "PXAT", &soon.to_string()]), ok());
        assert_eq!(c.cmd(&["SAVE"]), ok());
        server.kill9();

        let server = Server::start(&pool, args);
        let mut c = server.conn();
        assert_eq!(c.cmd(&["PEXPIRETIME", "exact"]), V::Int(far), "{name}");
        within(int(c.cmd(&["TTL", "ex"])), 990, 1000, name);
        assert_eq!(c.cmd(&["TTL", "plain"]), V::Int(-1), "{name}");
        assert_eq!(c.cmd(&["GET", "past"]), V::Nil, "{name}");
        // The index of deadlines is rebuilt from the pool: the sweep deletes `soon` unread.
        eventually(Duration::from_secs(60), "the restarted sweep", || dbsize(&mut c) == 3);
        assert_eq!(c.cmd(&["PERSIST", "ex"]), V::Int(1));
        assert!(server.shutdown().success());

        let server = Server::start(&pool, args);
        let mut c = server.conn();
        assert_eq!(c.cmd(&["TTL", "ex"]), V::Int(-1), "{name}: PERSIST survived a clean shutdown");
        assert_eq!(c.cmd(&["PEXPIRETIME", "exact"]), V::Int(far), "{name}");
        assert_eq!(c.cmd(&["MGET", "exact", "ex", "plain"]), V::Array(vec![bulk("v"), bulk("v"), bulk("v")]));
    }
}

#[test]
fn values_that_look_like_a_header_round_trip() {
    let (_dir, server) = fresh();
    let mut c = server.conn();
    // The header's magic bytes followed by a deadline-shaped tail, stored without a TTL.
    let mut tricky = vec![0xF5, b'n', b'v', b'x', 0xF6, 0xE7, 0x00, 0x01];
    tricky.extend_from_slice(&1u64.to_le_bytes());
    tricky.extend_from_slice(b"tail");
    c.send(&encode(&[b"SET", b"t", &tricky]));
    assert_eq!(c.read(), ok());
    assert_eq!(c.cmd(&["GET", "t"]), V::Bulk(tricky.clone()));
    assert_eq!(c.cmd(&["TTL", "t"]), V::Int(-1));
    assert_eq!(c.cmd(&["STRLEN", "t"]), V::Int(tricky.len() as i64));
}

#[test]
fn values_stored_bare_by_other_writers_read_unchanged() {
    // `nvhtm load` stores bare values, as every version before expiry stored every key: the
    // server reads them as keys without a time to live, and can give them one.
    let dir = scratch();
    let pool = dir.path().join("loaded.pool");
    let created = Command::new(env!("CARGO_BIN_EXE_nvhtm")).arg("create").arg(&pool).output().unwrap();
    assert!(created.status.success(), "{created:?}");
    let input = dir.path().join("pairs.tsv");
    std::fs::write(&input, "short\tv\nlonger\ta value well past sixteen bytes long\nempty\t\n").unwrap();
    let loaded =
        Command::new(env!("CARGO_BIN_EXE_nvhtm")).arg("load").arg(&pool).arg(&input).output().unwrap();
    assert!(loaded.status.success(), "{loaded:?}");
    let server = Server::start(&pool, &[]);
    let mut c = server.conn();
    assert_eq!(
        c.cmd(&["MGET", "short", "longer", "empty"]),
        V::Array(vec![bulk("v"), bulk("a value well past sixteen bytes long"), bulk("")])
    );
    for key in ["short", "longer", "empty"] {
        assert_eq!(c.cmd(&["TTL", key]), V::Int(-1), "{key}");
    }
    assert_eq!(c.cmd(&["EXPIRE", "longer", "1000"]), V::Int(1));
    assert_eq!(c.cmd(&["GET", "longer"]), bulk("a value well past sixteen bytes long"));
    assert_eq!(c.cmd(&["PERSIST", "longer"]), V::Int(1));
    assert_eq!(c.cmd(&["STRLEN", "longer"]), V::Int(36));
}
