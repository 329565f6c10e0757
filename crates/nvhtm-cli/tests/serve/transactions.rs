//! MULTI, EXEC, DISCARD, WATCH, UNWATCH: replies, isolation from other clients, and
//! atomicity across kill -9 on FAMS pools; and CLIENT LIST.

use super::*;
use std::time::Instant;

fn array(items: Vec<V>) -> V {
    V::Array(items)
}

#[test]
fn multi_exec_and_discard_answer_like_redis() {
    for mode in MAP_MODES {
        multi_exec_and_discard_answer_like_redis_in(mode);
    }
}

fn multi_exec_and_discard_answer_like_redis_in(mode: &str) {
    let (_dir, server) = fresh_in(mode);
    let mut c = server.conn();
    assert_eq!(c.cmd(&["EXEC"]), err("ERR EXEC without MULTI"));
    assert_eq!(c.cmd(&["DISCARD"]), err("ERR DISCARD without MULTI"));
    assert_eq!(c.cmd(&["MULTI"]), ok());
    assert_eq!(c.cmd(&["SET", "a", "1"]), V::Simple("QUEUED".into()));
    assert_eq!(c.cmd(&["INCR", "a"]), V::Simple("QUEUED".into()));
    assert_eq!(c.cmd(&["GET", "a"]), V::Simple("QUEUED".into()));
    assert_eq!(c.cmd(&["MULTI"]), err("ERR MULTI calls can not be nested"), "answered, not queued");
    assert_eq!(c.cmd(&["WATCH", "a"]), err("ERR WATCH inside MULTI is not allowed"));
    assert_eq!(c.cmd(&["EXEC"]), array(vec![ok(), V::Int(2), bulk("2")]), "those errors doom nothing");

    // An error while running is that command's reply; the others run.
    assert_eq!(c.cmd(&["MULTI"]), ok());
    assert_eq!(c.cmd(&["SET", "s", "text"]), V::Simple("QUEUED".into()));
    assert_eq!(c.cmd(&["INCR", "s"]), V::Simple("QUEUED".into()));
    assert_eq!(c.cmd(&["SET", "t", "1"]), V::Simple("QUEUED".into()));
    assert_eq!(c.cmd(&["EXEC"]), array(vec![ok(), err("ERR value is not an integer or out of range"), ok()]));
    assert_eq!(c.cmd(&["GET", "t"]), bulk("1"));

    // An error while queueing dooms the transaction.
    for (bad, reply) in [
        (&["SET", "b"][..], "ERR wrong number of arguments for 'set' command"),
        (&["NOPE", "x"], "ERR unknown command 'NOPE', with args beginning with: 'x' "),
        (&["SAVE"], "ERR Command not allowed inside a transaction"),
        (&["SHUTDOWN"], "ERR Command not allowed inside a transaction"),
    ] {
        assert_eq!(c.cmd(&["MULTI"]), ok());
        assert_eq!(c.cmd(&["SET", "b", "1"]), V::Simple("QUEUED".into()));
        assert_eq!(c.cmd(bad), err(reply));
        assert_eq!(c.cmd(&["SET", "c", "1"]), V::Simple("QUEUED".into()));
        assert_eq!(c.cmd(&["EXEC"]), err("EXECABORT Transaction discarded because of previous errors."));
        assert_eq!(c.cmd(&["MGET", "b", "c"]), array(vec![V::Nil, V::Nil]), "{bad:?}");
    }
    assert_eq!(c.cmd(&["EXEC"]), err("ERR EXEC without MULTI"), "EXECABORT ended the transaction");

    assert_eq!(c.cmd(&["MULTI"]), ok());
    assert_eq!(c.cmd(&["SET", "d", "1"]), V::Simple("QUEUED".into()));
    assert_eq!(c.cmd(&["DISCARD"]), ok());
    assert_eq!(c.cmd(&["GET", "d"]), V::Nil);
    assert_eq!(c.cmd(&["MULTI"]), ok());
    assert_eq!(c.cmd(&["EXEC"]), array(vec![]));
    // RESET ends a transaction too.
    assert_eq!(c.cmd(&["MULTI"]), ok());
    assert_eq!(c.cmd(&["SET", "d", "1"]), V::Simple("QUEUED".into()));
    assert_eq!(c.cmd(&["RESET"]), V::Simple("RESET".into()));
    assert_eq!(c.cmd(&["EXEC"]), err("ERR EXEC without MULTI"));
    assert_eq!(c.cmd(&["GET", "d"]), V::Nil);
    // Pipelined: the whole transaction in one write.
    let mut batch = Vec::new();
    for words in [&[&b"MULTI"[..]][..], &[b"INCRBY", b"p", b"5"], &[b"DECR", b"p"], &[b"EXEC"]] {
        batch.extend(encode(words));
    }
    c.send(&batch);
    assert_eq!(c.read(), ok());
    assert_eq!(c.read(), V::Simple("QUEUED".into()));
    assert_eq!(c.read(), V::Simple("QUEUED".into()));
    assert_eq!(c.read(), array(vec![V::Int(5), V::Int(4)]));
}

#[test]
fn watch_aborts_exec_when_a_watched_key_changed() {
    for mode in MAP_MODES {
        watch_aborts_exec_when_a_watched_key_changed_in(mode);
    }
}

fn watch_aborts_exec_when_a_watched_key_changed_in(mode: &str) {
    let (_dir, server) = fresh_in(mode);
    let mut c = server.conn();
    let mut other = server.conn();
    let queued_set = |c: &mut Conn, key: &str, value: &str| {
        assert_eq!(c.cmd(&["MULTI"]), ok());
        assert_eq!(c.cmd(&["SET", key, value]), V::Simple("QUEUED".into()));
        c.cmd(&["EXEC"])
    };
    assert_eq!(c.cmd(&["SET", "w", "1"]), ok());
    // Changed by another client: EXEC answers nil and runs nothing.
    assert_eq!(c.cmd(&["WATCH", "w"]), ok());
    assert_eq!(other.cmd(&["SET", "w", "2"]), ok());
    assert_eq!(queued_set(&mut c, "w", "3"), V::Nil);
    assert_eq!(c.cmd(&["GET", "w"]), bulk("2"));
    // EXEC unwatched everything: the next transaction runs.
    assert_eq!(queued_set(&mut c, "w", "3"), array(vec![ok()]));
    // Unchanged, or only another key changed: it runs.
    assert_eq!(c.cmd(&["WATCH", "w", "x"]), ok());
    assert_eq!(other.cmd(&["SET", "elsewhere", "1"]), ok());
    assert_eq!(other.cmd(&["GET", "w"]), bulk("3"), "reads change nothing");
    assert_eq!(queued_set(&mut c, "w", "4"), array(vec![ok()]));
    // Changed by this client itself, as in Redis.
    assert_eq!(c.cmd(&["WATCH", "w"]), ok());
    assert_eq!(c.cmd(&["SET", "w", "5"]), ok());
    assert_eq!(queued_set(&mut c, "w", "6"), V::Nil);
    // Set to the value it had: still a change.
    assert_eq!(c.cmd(&["WATCH", "w"]), ok());
    assert_eq!(other.cmd(&["SET", "w", "5"]), ok());
    assert_eq!(queued_set(&mut c, "w", "6"), V::Nil);
    // Created, deleted, flushed, given a TTL: changes.
    for change in [
        &["SET", "new", "1"][..],
        &["DEL", "w"],
        &["FLUSHALL"],
        &["EXPIRE", "w", "100"],
        &["INCRBYFLOAT", "w", "1"],
    ] {
        assert_eq!(other.cmd(&["SET", "w", "1"]), ok());
        assert_eq!(c.cmd(&["WATCH", "w", "new"]), ok());
        assert!(!matches!(other.cmd(change), V::Error(_)), "{change:?}");
        assert_eq!(queued_set(&mut c, "w", "9"), V::Nil, "{change:?}");
        assert_eq!(other.cmd(&["DEL", "new"]), V::Int(i64::from(change[0] == "SET")));
    }
    // UNWATCH and DISCARD forget the keys.
    assert_eq!(c.cmd(&["WATCH", "w"]), ok());
    assert_eq!(other.cmd(&["SET", "w", "2"]), ok());
    assert_eq!(c.cmd(&["UNWATCH"]), ok());
    assert_eq!(queued_set(&mut c, "w", "3"), array(vec![ok()]));
    assert_eq!(c.cmd(&["WATCH", "w"]), ok());
    assert_eq!(other.cmd(&["SET", "w", "2"]), ok());
    assert_eq!(c.cmd(&["MULTI"]), ok());
    assert_eq!(c.cmd(&["DISCARD"]), ok());
    assert_eq!(queued_set(&mut c, "w", "3"), array(vec![ok()]));
    // A watched key that expires has changed.
    assert_eq!(c.cmd(&["SET", "e", "v", "PX", "50"]), ok());
    assert_eq!(c.cmd(&["WATCH", "e"]), ok());
    let began = Instant::now();
    while other.cmd(&["EXISTS", "e"]) != V::Int(0) {
        assert!(began.elapsed() < Duration::from_secs(60), "e never expired");
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(queued_set(&mut c, "e", "again"), V::Nil);
    // A key already expired when watched is absent, not about to change.
    assert_eq!(c.cmd(&["SET", "gone", "v", "PXAT", "1"]), ok());
    assert_eq!(c.cmd(&["WATCH", "gone"]), ok());
    assert_eq!(queued_set(&mut c, "gone", "back"), array(vec![ok()]));
    // RESP3: the aborted EXEC is a null.
    assert!(matches!(c.cmd(&["HELLO", "3"]), V::Map(_)));
    assert_eq!(c.cmd(&["WATCH", "w"]), ok());
    assert_eq!(other.cmd(&["SET", "w", "8"]), ok());
    assert_eq!(queued_set(&mut c, "w", "3"), V::Null);
}

#[test]
fn transactions_are_isolated_and_watch_loses_no_update() {
    let (_dir, server) = fresh();
    let addr = server.addr.clone();
    // Writers increment two keys in one transaction; a reader never sees them differ.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reader = {
        let (addr, stop) = (addr.clone(), Arc::clone(&stop));
        std::thread::spawn(move || {
            let mut c = Conn::new(&addr);
            let mut reads = 0u64;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                let V::Array(pair) = c.cmd(&["MGET", "x", "y"]) else { panic!("MGET") };
                assert_eq!(pair[0], pair[1], "a reader saw half a transaction");
                reads += 1;
            }
            reads
        })
    };
    let writers: Vec<_> = (0..4)
        .map(|_| {
            let addr = addr.clone();
            std::thread::spawn(move || {
                let mut c = Conn::new(&addr);
                for _ in 0..200 {
                    let mut batch = Vec::new();
                    for words in [&[&b"MULTI"[..]][..], &[b"INCR", b"x"], &[b"INCR", b"y"], &[b"EXEC"]] {
                        batch.extend(encode(words));
                    }
                    c.send(&batch);
                    for _ in 0..3 {
                        c.read();
                    }
                    let V::Array(replies) = c.read() else { panic!("EXEC") };
                    assert_eq!(replies[0], replies[1]);
                }
            })
        })
        .collect();
    // Optimistic increments with WATCH: retried on nil, none lost.
    let casers: Vec<_> = (0..4)
        .map(|_| {
            let addr = addr.clone();
            std::thread::spawn(move || {
                let mut c = Conn::new(&addr);
                let mut retries = 0;
                for _ in 0..50 {
                    loop {
                        assert_eq!(c.cmd(&["WATCH", "counter"]), ok());
                        let n = match c.cmd(&["GET", "counter"]) {
                            V::Bulk(b) => String::from_utf8(b).unwrap().parse::<i64>().unwrap(),
                            _ => 0,
                        };
                        assert_eq!(c.cmd(&["MULTI"]), ok());
                        assert_eq!(
                            c.cmd(&["SET", "counter", &(n + 1).to_string()]),
                            V::Simple("QUEUED".into())
                        );
                        match c.cmd(&["EXEC"]) {
                            V::Array(_) => break,
                            V::Nil => retries += 1,
                            other => panic!("EXEC: {other:?}"),
                        }
                    }
                }
                retries
            })
        })
        .collect();
    for w in writers {
        w.join().unwrap();
    }
    let retries: i32 = casers.into_iter().map(|t| t.join().unwrap()).sum();
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let reads = reader.join().unwrap();
    let mut c = server.conn();
    assert_eq!(c.cmd(&["MGET", "x", "y", "counter"]), array(vec![bulk("800"), bulk("800"), bulk("200")]));
    eprintln!("isolation: {reads} reads saw whole transactions; WATCH: 200 increments, {retries} retries");
}

/// Three clients, each running transactions that set its ten keys to one value (ten SETs and
/// an MSET of them), until kill -9; after each restart each client's ten keys hold one value
/// (no crash state holds part of a transaction), and, when `every_ack_durable`, at least the
/// value of its last acknowledged transaction. Returns the transactions acknowledged.
fn exec_survives_kill_9_whole(pool: &Path, args: &[&str], every_ack_durable: bool) -> i64 {
    use std::sync::atomic::{AtomicBool, AtomicI64, Ordering::SeqCst};
    const WRITERS: usize = 3;
    let keys = |w: usize| -> Vec<String> { (0..10).map(|i| format!("w{w}:t{i}")).collect() };
    let mut acked_total = 0;
    for round in 0..3 {
        let server = Server::start(pool, args);
        let stop = Arc::new(AtomicBool::new(false));
        let acked: Arc<Vec<AtomicI64>> = Arc::new((0..WRITERS).map(|_| AtomicI64::new(0)).collect());
        let writers: Vec<_> = (0..WRITERS)
            .map(|w| {
                let (addr, keys, stop, acked) =
                    (server.addr.clone(), keys(w), Arc::clone(&stop), Arc::clone(&acked));
                std::thread::spawn(move || {
                    let mut c = Conn::new(&addr);
                    for i in 1.. {
                        if stop.load(SeqCst) {
                            return;
                        }
                        let value = (round * 1_000_000 + i).to_string();
                        let mut mset: Vec<&[u8]> = vec![b"MSET"];
                        let mut batch = encode(&[b"MULTI"]);
                        for key in &keys {
                            batch.extend(encode(&[b"SET", key.as_bytes(), value.as_bytes()]));
                            mset.extend([key.as_bytes(), value.as_bytes()]);
                        }
                        batch.extend(encode(&mset));
                        batch.extend(encode(&[b"EXEC"]));
                        if c.writer.write_all(&batch).is_err() {
                            return;
                        }
                        for _ in 0..keys.len() + 2 {
                            if c.try_read().is_err() {
                                return;
                            }
                        }
                        match c.try_read() {
                            Ok(V::Array(_)) => acked[w].store(round * 1_000_000 + i, SeqCst),
                            _ => return,
                        }
                    }
                })
            })
            .collect();
        // Kill once every writer has had 50 transactions acknowledged: more are in flight.
        while acked.iter().any(|a| a.load(SeqCst) < round * 1_000_000 + 50) {
            std::thread::yield_now();
        }
        server.kill9();
        stop.store(true, SeqCst);
        for w in writers {
            w.join().unwrap();
        }
        let server = Server::start(pool, args);
        let mut c = server.conn();
        for (w, acked) in acked.iter().enumerate() {
            let keys = keys(w);
            let words: Vec<&str> = std::iter::once("MGET").chain(keys.iter().map(String::as_str)).collect();
            let V::Array(values) = c.cmd(&words) else { panic!("MGET") };
            assert!(
                values.iter().all(|v| *v == values[0]),
                "round {round}: part of a transaction: {values:?}"
            );
            let last = acked.load(SeqCst);
            acked_total += last - round * 1_000_000;
            if every_ack_durable {
                let V::Bulk(v) = &values[0] else {
                    panic!("round {round}: acknowledged {last}, found {values:?}")
                };
                let v: i64 = String::from_utf8(v.clone()).unwrap().parse().unwrap();
                assert!(v >= last, "round {round}: acknowledged {last}, found {v}");
            }
        }
        assert!(server.shutdown().success());
    }
    eprintln!("kill -9 with {args:?}: 3 kills, {acked_total} acknowledged transactions, none found in part");
    acked_total
}

#[test]
fn exec_is_all_or_nothing_across_kill_9_in_fams_mode() {
    let dir = tempfile::tempdir().unwrap();
    // A sync every millisecond: many syncs fall while transactions run, none inside one.
    let acked = exec_survives_kill_9_whole(
        &dir.path().join("fams.pool"),
        &["--mode", "fams", "--sync-ms", "1"],
        false,
    );
    assert!(acked >= 3 * 3 * 50);
}

#[test]
fn exec_is_all_or_nothing_across_kill_9_in_strict_mode_with_group_commit() {
    let dir = tempfile::tempdir().unwrap();
    let pool = dir.path().join("group.pool");
    let created =
        Command::new(env!("CARGO_BIN_EXE_nvhtm")).args(["create", "--fams"]).arg(&pool).output().unwrap();
    assert!(created.status.success(), "{created:?}");
    let acked = exec_survives_kill_9_whole(&pool, &["--mode", "strict"], true);
    assert!(acked >= 3 * 3 * 50);
}

#[test]
fn client_list_shows_every_client() {
    let (_dir, server) = fresh();
    let mut a = server.conn();
    let mut b = server.conn();
    assert_eq!(a.cmd(&["CLIENT", "SETNAME", "alpha"]), ok());
    assert_eq!(a.cmd(&["CLIENT", "SETINFO", "LIB-NAME", "mylib"]), ok());
    let V::Int(a_id) = a.cmd(&["CLIENT", "ID"]) else { panic!("ID") };
    let V::Int(b_id) = b.cmd(&["CLIENT", "ID"]) else { panic!("ID") };
    assert_eq!(b.cmd(&["MULTI"]), ok());
    assert_eq!(b.cmd(&["SET", "k", "v"]), V::Simple("QUEUED".into()));
    let list = |c: &mut Conn, args: &[&str]| match c.cmd(args) {
        V::Bulk(text) => String::from_utf8(text).unwrap(),
        other => panic!("{args:?}: {other:?}"),
    };
    let text = list(&mut a, &["CLIENT", "LIST"]);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 2, "{text}");
    let line_a = lines.iter().find(|l| l.starts_with(&format!("id={a_id} "))).expect("a listed");
    let line_b = lines.iter().find(|l| l.starts_with(&format!("id={b_id} "))).expect("b listed");
    assert!(
        line_a.contains(" name=alpha ") && line_a.contains(" flags=N ") && line_a.contains(" multi=-1 "),
        "{line_a}"
    );
    assert!(line_a.contains(" cmd=client|list ") && line_a.contains(" lib-name=mylib "), "{line_a}");
    assert!(line_a.contains(&format!(" laddr={} ", server.addr)), "{line_a}");
    assert!(
        line_b.contains(" name= ") && line_b.contains(" flags=x ") && line_b.contains(" multi=1 "),
        "{line_b}"
    );
    assert!(text.ends_with('\n'));
    let only_b = list(&mut a, &["CLIENT", "LIST", "ID", &b_id.to_string()]);
    assert_eq!(only_b.lines().count(), 1);
    assert!(only_b.starts_with(&format!("id={b_id} ")));
    assert_eq!(list(&mut a, &["CLIENT", "LIST", "TYPE", "normal"]).lines().count(), 2);
    assert_eq!(list(&mut a, &["CLIENT", "LIST", "TYPE", "pubsub"]), "");
    assert_eq!(a.cmd(&["CLIENT", "LIST", "TYPE", "odd"]), err("ERR Unknown client type 'odd'"));
    assert_eq!(a.cmd(&["CLIENT", "LIST", "ID", "x"]), err("ERR Invalid client ID"));
    assert_eq!(a.cmd(&["CLIENT", "LIST", "FOO"]), err("ERR syntax error"));
    let info = list(&mut a, &["CLIENT", "INFO"]);
    assert!(info.starts_with(&format!("id={a_id} ")) && info.contains(" cmd=client|info "), "{info}");
    // A client that leaves is no longer listed (its task ends after the socket closes).
    drop(b);
    let began = Instant::now();
    while list(&mut a, &["CLIENT", "LIST"]).lines().count() != 1 {
        assert!(began.elapsed() < Duration::from_secs(60), "the closed client stayed listed");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn a_transaction_runs_at_one_instant() {
    // As in Redis, the clock stops for an EXEC: a key given a 1 ms time to live by a
    // transaction's first command is live for all of its (many) later ones.
    let (_dir, server) = fresh();
    let mut c = server.conn();
    const CHECKS: usize = 50_000;
    let mut batch = encode(&[b"MULTI"]);
    batch.extend(encode(&[b"SET", b"k", b"v", b"PX", b"1"]));
    for _ in 0..CHECKS {
        batch.extend(encode(&[b"EXISTS", b"k"]));
    }
    batch.extend(encode(&[b"EXEC"]));
    c.send(&batch);
    assert_eq!(c.read(), ok());
    for _ in 0..=CHECKS {
        assert_eq!(c.read(), V::Simple("QUEUED".into()));
    }
    let V::Array(replies) = c.read() else { panic!("EXEC") };
    assert_eq!(replies.len(), CHECKS + 1);
    let live = replies[1..].iter().filter(|r| **r == V::Int(1)).count();
    assert_eq!(live, CHECKS, "the key expired inside the transaction");
}
