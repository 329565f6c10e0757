//! `nvhtm serve` end to end: the built binary is started on a free port in a temporary
//! directory and spoken to in raw RESP over TCP. This file holds the harness and the tests of
//! connections, strings, keys, the server commands, limits and crashes; the modules, the rest.

mod expiry;

use std::collections::HashSet;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// A reply, RESP2 or RESP3.
#[derive(Debug, Clone, PartialEq)]
enum V {
    Simple(String),
    Error(String),
    Int(i64),
    Bulk(Vec<u8>),
    /// RESP2 `$-1` / `*-1`.
    Nil,
    /// RESP3 `_`.
    Null,
    Array(Vec<V>),
    Map(Vec<(V, V)>),
    Verbatim(String),
}

fn bulk(text: &str) -> V {
    V::Bulk(text.as_bytes().to_vec())
}

fn ok() -> V {
    V::Simple("OK".into())
}

fn err(text: &str) -> V {
    V::Error(text.into())
}

/// A RESP request.
fn encode(args: &[&[u8]]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", args.len()).into_bytes();
    for arg in args {
        out.extend_from_slice(format!("${}\r\n", arg.len()).as_bytes());
        out.extend_from_slice(arg);
        out.extend_from_slice(b"\r\n");
    }
    out
}

struct Conn {
    writer: TcpStream,
    reader: BufReader<TcpStream>,
}

impl Conn {
    fn new(addr: &str) -> Conn {
        let stream = TcpStream::connect(addr).expect("connect");
        // A guard against a hung test, not an assertion about speed.
        stream.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
        Conn { writer: stream.try_clone().unwrap(), reader: BufReader::new(stream) }
    }

    fn send(&mut self, bytes: &[u8]) {
        self.writer.write_all(bytes).expect("send");
    }

    fn try_read(&mut self) -> std::io::Result<V> {
        let mut line = Vec::new();
        self.reader.read_until(b'\n', &mut line)?;
        if line.is_empty() {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        assert!(line.ends_with(b"\r\n"), "a reply line without CRLF: {line:?}");
        let text = String::from_utf8_lossy(&line[1..line.len() - 2]).into_owned();
        let n = || text.parse::<i64>().unwrap();
        Ok(match line[0] {
            b'+' => V::Simple(text),
            b'-' => V::Error(text),
            b':' => V::Int(n()),
            b'_' => V::Null,
            b'$' | b'=' if n() < 0 => V::Nil,
            b'$' | b'=' => {
                let mut data = vec![0; n() as usize + 2];
                self.reader.read_exact(&mut data)?;
                assert_eq!(&data[data.len() - 2..], b"\r\n");
                data.truncate(data.len() - 2);
                if line[0] == b'=' {
                    assert_eq!(&data[..4], b"txt:");
                    V::Verbatim(String::from_utf8(data[4..].to_vec()).unwrap())
                } else {
                    V::Bulk(data)
                }
            }
            b'*' if n() < 0 => V::Nil,
            b'*' => V::Array((0..n()).map(|_| self.try_read()).collect::<Result<_, _>>()?),
            b'%' => V::Map(
                (0..n()).map(|_| Ok((self.try_read()?, self.try_read()?))).collect::<std::io::Result<_>>()?,
            ),
            other => panic!("unknown reply type {:?} in {line:?}", other as char),
        })
    }

    fn read(&mut self) -> V {
        self.try_read().expect("a reply")
    }

    fn cmd(&mut self, args: &[&str]) -> V {
        let args: Vec<&[u8]> = args.iter().map(|a| a.as_bytes()).collect();
        self.send(&encode(&args));
        self.read()
    }

    /// Whether the server closed the connection (EOF or reset, with nothing more to read).
    fn closed(&mut self) -> bool {
        let mut byte = [0u8; 1];
        matches!(self.reader.read(&mut byte), Ok(0) | Err(_))
    }
}

/// A server process.
struct Server {
    child: Child,
    addr: String,
    pool: PathBuf,
    log: Arc<Log>,
}

/// The server's stderr, line by line, as it arrives.
#[derive(Default)]
struct Log {
    /// The lines so far, and whether stderr has ended.
    lines: Mutex<(Vec<String>, bool)>,
    more: std::sync::Condvar,
}

/// A scratch directory: on tmpfs where there is one (the Cpu domain, fast), else the default.
fn scratch() -> tempfile::TempDir {
    if Path::new("/dev/shm").is_dir() {
        if let Ok(dir) = tempfile::tempdir_in("/dev/shm") {
            return dir;
        }
    }
    tempfile::tempdir().unwrap()
}

impl Server {
    fn start(pool: &Path, extra: &[&str]) -> Server {
        let mut child = Command::new(env!("CARGO_BIN_EXE_nvhtm"))
            .args(["serve", "--pool"])
            .arg(pool)
            .args(["--port", "0", "--threads", "2"])
            .args(extra)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start nvhtm serve");
        let stderr = child.stderr.take().unwrap();
        let log = Arc::new(Log::default());
        let (tx, rx) = std::sync::mpsc::channel();
        let lines = Arc::clone(&log);
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                let addr = line
                    .find("listening on ")
                    .map(|at| line[at + 13..].split_whitespace().next().unwrap_or("").to_string());
                lines.lines.lock().unwrap().0.push(line);
                lines.more.notify_all();
                if let Some(addr) = addr {
                    let _ = tx.send(addr);
                }
            }
            lines.lines.lock().unwrap().1 = true;
            lines.more.notify_all();
        });
        // The server names its port in its startup line (--port 0: no race for a free port);
        // if it exits first, the channel closes.
        let Ok(addr) = rx.recv() else {
            let status = child.wait().unwrap();
            panic!("the server exited ({status}) before listening: {:?}", log.lines.lock().unwrap().0);
        };
        Server { child, addr, pool: pool.to_path_buf(), log }
    }

    fn conn(&self) -> Conn {
        Conn::new(&self.addr)
    }

    fn kill9(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    /// SHUTDOWN, then the exit status (the pool is closed once the process has exited).
    fn shutdown(mut self) -> std::process::ExitStatus {
        let mut conn = self.conn();
        conn.send(&encode(&[b"SHUTDOWN"]));
        assert!(conn.closed(), "SHUTDOWN answers nothing and closes the connection");
        self.child.wait().unwrap()
    }

    /// SIGTERM, then the exit status.
    fn terminate(mut self) -> std::process::ExitStatus {
        let pid = rustix::process::Pid::from_child(&self.child);
        rustix::process::kill_process(pid, rustix::process::Signal::TERM).unwrap();
        self.child.wait().unwrap()
    }

    fn log(&self) -> String {
        self.log.lines.lock().unwrap().0.join("\n")
    }

    /// Whether the server logs a line containing `needle`: waits for it (the event it logs
    /// has happened when this is called), or for the end of the server's stderr.
    fn logged(&self, needle: &str) -> bool {
        let mut lines = self.log.lines.lock().unwrap();
        loop {
            if lines.0.iter().any(|line| line.contains(needle)) {
                return true;
            }
            if lines.1 {
                return false;
            }
            lines = self.log.more.wait(lines).unwrap();
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn fresh() -> (tempfile::TempDir, Server) {
    let dir = scratch();
    let server = Server::start(&dir.path().join("serve.pool"), &[]);
    (dir, server)
}

#[test]
fn connection_commands_answer_like_redis() {
    let (_dir, server) = fresh();
    let mut c = server.conn();
    assert_eq!(c.cmd(&["PING"]), V::Simple("PONG".into()));
    assert_eq!(c.cmd(&["ping", "hi"]), bulk("hi"));
    assert_eq!(c.cmd(&["PING", "a", "b"]), err("ERR wrong number of arguments for 'ping' command"));
    assert_eq!(c.cmd(&["ECHO", "x y"]), bulk("x y"));
    assert_eq!(c.cmd(&["SELECT", "0"]), ok());
    assert_eq!(c.cmd(&["SELECT", "1"]), err("ERR DB index is out of range"));
    assert_eq!(c.cmd(&["SELECT", "x"]), err("ERR value is not an integer or out of range"));
    assert_eq!(c.cmd(&["GET"]), err("ERR wrong number of arguments for 'get' command"));
    assert_eq!(
        c.cmd(&["foo", "a", "b"]),
        err("ERR unknown command 'foo', with args beginning with: 'a' 'b' ")
    );
    assert_eq!(c.cmd(&["NOPE"]), err("ERR unknown command 'NOPE', with args beginning with: "));
    let V::Int(id) = c.cmd(&["CLIENT", "ID"]) else { panic!("CLIENT ID") };
    assert!(id > 0);
    let V::Int(other) = server.conn().cmd(&["CLIENT", "ID"]) else { panic!("CLIENT ID") };
    assert_ne!(id, other);
    assert_eq!(c.cmd(&["CLIENT", "GETNAME"]), V::Nil);
    assert_eq!(c.cmd(&["CLIENT", "SETNAME", "worker-1"]), ok());
    assert_eq!(c.cmd(&["CLIENT", "GETNAME"]), bulk("worker-1"));
    assert_eq!(
        c.cmd(&["CLIENT", "SETNAME", "a b"]),
        err("ERR Client names cannot contain spaces, newlines or special characters.")
    );
    assert_eq!(
        c.cmd(&["CLIENT", "SETNAME"]),
        err("ERR wrong number of arguments for 'client|setname' command")
    );
    assert_eq!(c.cmd(&["CLIENT", "BOGUS"]), err("ERR unknown subcommand 'BOGUS'. Try CLIENT HELP."));
    assert_eq!(c.cmd(&["COMMAND", "DOCS"]), V::Array(vec![]));
    assert_eq!(c.cmd(&["COMMAND"]), V::Array(vec![]));
    let V::Int(count) = c.cmd(&["COMMAND", "COUNT"]) else { panic!("COMMAND COUNT") };
    assert!(count >= 38, "{count}");
    assert_eq!(c.cmd(&["AUTH", "default", "anything"]), ok());
    assert_eq!(
        c.cmd(&["AUTH", "bob", "pw"]),
        err("WRONGPASS invalid username-password pair or user is disabled.")
    );
    assert!(
        matches!(c.cmd(&["AUTH", "pw"]), V::Error(e) if e.starts_with("ERR AUTH <password> called without any password"))
    );
    assert_eq!(c.cmd(&["CLIENT", "SETINFO", "LIB-NAME", "redis-py"]), ok());
    assert_eq!(c.cmd(&["CLIENT", "SETINFO", "lib-ver", "5.0.1"]), ok());
    assert_eq!(c.cmd(&["CLIENT", "SETINFO", "bogus", "x"]), err("ERR Unrecognized option 'bogus'"));
    assert_eq!(
        c.cmd(&["CLIENT", "SETINFO", "lib-name", "a b"]),
        err("ERR lib-name cannot contain spaces, newlines or special characters.")
    );
    // RESET: back to RESP2, no name.
    assert!(matches!(c.cmd(&["HELLO", "3"]), V::Map(_)));
    assert_eq!(c.cmd(&["RESET"]), V::Simple("RESET".into()));
    assert_eq!(c.cmd(&["CLIENT", "GETNAME"]), V::Nil);
    assert_eq!(c.cmd(&["QUIT"]), ok());
    assert!(c.closed());
}

#[test]
fn hello_switches_the_protocol_and_the_reply_shapes() {
    let (_dir, server) = fresh();
    let mut c = server.conn();
    let V::Array(flat) = c.cmd(&["HELLO"]) else { panic!("HELLO in RESP2 is a flat array") };
    assert_eq!(flat.len(), 14);
    assert_eq!((&flat[4], &flat[5]), (&bulk("proto"), &V::Int(2)));
    let V::Map(pairs) = c.cmd(&["HELLO", "3", "AUTH", "default", "pw", "SETNAME", "three"]) else {
        panic!("HELLO 3 answers a map")
    };
    let field = |name: &str| pairs.iter().find(|(k, _)| *k == bulk(name)).map(|(_, v)| v.clone());
    assert_eq!(field("server"), Some(bulk("redis")));
    assert_eq!(field("proto"), Some(V::Int(3)));
    assert_eq!(field("mode"), Some(bulk("standalone")));
    assert_eq!(field("role"), Some(bulk("master")));
    assert_eq!(field("modules"), Some(V::Array(vec![])));
    assert!(matches!(field("id"), Some(V::Int(id)) if id > 0));
    assert!(matches!(field("version"), Some(V::Bulk(_))));
    assert_eq!(c.cmd(&["CLIENT", "GETNAME"]), bulk("three"));
    // RESP3 shapes: the null, maps, verbatim text.
    assert_eq!(c.cmd(&["GET", "missing"]), V::Null);
    assert_eq!(c.cmd(&["CLIENT", "SETNAME", ""]), ok());
    assert_eq!(c.cmd(&["CLIENT", "GETNAME"]), V::Null);
    assert_eq!(c.cmd(&["COMMAND", "DOCS"]), V::Map(vec![]));
    assert_eq!(c.cmd(&["CONFIG", "GET", "appendonly"]), V::Map(vec![(bulk("appendonly"), bulk("no"))]));
    assert!(matches!(c.cmd(&["INFO", "keyspace"]), V::Verbatim(text) if text.starts_with("# Keyspace")));
    assert_eq!(c.cmd(&["HELLO", "4"]), err("NOPROTO unsupported protocol version"));
    assert_eq!(c.cmd(&["HELLO", "x"]), err("ERR Protocol version is not an integer or out of range"));
    assert_eq!(
        c.cmd(&["HELLO", "3", "AUTH", "bob", "pw"]),
        err("WRONGPASS invalid username-password pair or user is disabled.")
    );
    assert_eq!(c.cmd(&["HELLO", "3", "BOGUS"]), err("ERR Syntax error in HELLO option 'BOGUS'"));
    // Still RESP3 after the failed HELLOs; HELLO 2 goes back.
    assert_eq!(c.cmd(&["GET", "missing"]), V::Null);
    assert!(matches!(c.cmd(&["HELLO", "2"]), V::Array(_)));
    assert_eq!(c.cmd(&["GET", "missing"]), V::Nil);
    assert_eq!(
        c.cmd(&["CONFIG", "GET", "save", "appendonly"]),
        V::Array(vec![bulk("save"), bulk(""), bulk("appendonly"), bulk("no")])
    );
}

#[test]
fn string_commands_answer_like_redis() {
    let (_dir, server) = fresh();
    let mut c = server.conn();
    let not_int = err("ERR value is not an integer or out of range");
    assert_eq!(c.cmd(&["GET", "k"]), V::Nil);
    assert_eq!(c.cmd(&["SET", "k", "v1"]), ok());
    assert_eq!(c.cmd(&["GET", "k"]), bulk("v1"));
    assert_eq!(c.cmd(&["SET", "k", "v2", "NX"]), V::Nil);
    assert_eq!(c.cmd(&["SET", "new", "n", "XX"]), V::Nil);
    assert_eq!(c.cmd(&["EXISTS", "new"]), V::Int(0));
    assert_eq!(c.cmd(&["SET", "k", "v2", "XX"]), ok());
    assert_eq!(c.cmd(&["SET", "k", "v3", "GET"]), bulk("v2"));
    assert_eq!(c.cmd(&["SET", "fresh", "f", "NX", "GET"]), V::Nil);
    assert_eq!(c.cmd(&["SET", "fresh", "g", "NX", "GET"]), bulk("f"));
    assert_eq!(c.cmd(&["GET", "fresh"]), bulk("f"));
    assert_eq!(c.cmd(&["SET", "k", "v", "NX", "XX"]), err("ERR syntax error"));
    assert_eq!(c.cmd(&["SET", "k", "v", "BOGUS"]), err("ERR syntax error"));
    assert!(matches!(c.cmd(&["SET", "k", "v", "EX", "10"]), V::Error(e) if e.contains("not supported yet")));
    assert!(matches!(c.cmd(&["SET", "k", "v", "px", "10"]), V::Error(e) if e.contains("not supported yet")));
    assert_eq!(c.cmd(&["GET", "k"]), bulk("v3"), "a refused SET changes nothing");
    assert_eq!(c.cmd(&["SET", "k", "v4", "KEEPTTL"]), ok());
    assert_eq!(c.cmd(&["SETNX", "k", "x"]), V::Int(0));
    assert_eq!(c.cmd(&["SETNX", "nx", "x"]), V::Int(1));
    assert_eq!(c.cmd(&["GETSET", "nx", "y"]), bulk("x"));
    assert_eq!(c.cmd(&["GETSET", "gs", "y"]), V::Nil);
    assert_eq!(c.cmd(&["GETDEL", "gs"]), bulk("y"));
    assert_eq!(c.cmd(&["GETDEL", "gs"]), V::Nil);
    assert_eq!(c.cmd(&["MSET", "a", "1", "b", "2"]), ok());
    assert_eq!(c.cmd(&["MSET", "a", "1", "b"]), err("ERR wrong number of arguments for 'mset' command"));
    assert_eq!(c.cmd(&["MGET", "a", "nope", "b"]), V::Array(vec![bulk("1"), V::Nil, bulk("2")]));
    assert_eq!(c.cmd(&["MSETNX", "a", "9", "c", "3"]), V::Int(0));
    assert_eq!(c.cmd(&["EXISTS", "c"]), V::Int(0), "MSETNX sets nothing when one key exists");
    assert_eq!(c.cmd(&["MSETNX", "c", "3", "d", "4"]), V::Int(1));
    assert_eq!(c.cmd(&["MGET", "c", "d"]), V::Array(vec![bulk("3"), bulk("4")]));
    assert_eq!(c.cmd(&["INCR", "n"]), V::Int(1));
    assert_eq!(c.cmd(&["INCRBY", "n", "41"]), V::Int(42));
    assert_eq!(c.cmd(&["DECR", "n"]), V::Int(41));
    assert_eq!(c.cmd(&["DECRBY", "n", "-9"]), V::Int(50));
    assert_eq!(c.cmd(&["GET", "n"]), bulk("50"));
    assert_eq!(c.cmd(&["INCR", "k"]), not_int);
    assert_eq!(c.cmd(&["INCRBY", "n", "1.5"]), not_int);
    assert_eq!(c.cmd(&["INCRBY", "n", " 1"]), not_int);
    assert_eq!(c.cmd(&["SET", "big", "9223372036854775807"]), ok());
    assert_eq!(c.cmd(&["INCR", "big"]), err("ERR increment or decrement would overflow"));
    assert_eq!(c.cmd(&["DECRBY", "n", "-9223372036854775808"]), err("ERR decrement would overflow"));
    assert_eq!(c.cmd(&["GET", "big"]), bulk("9223372036854775807"));
    assert_eq!(c.cmd(&["APPEND", "s", "Hello"]), V::Int(5));
    assert_eq!(c.cmd(&["APPEND", "s", " World"]), V::Int(11));
    assert_eq!(c.cmd(&["STRLEN", "s"]), V::Int(11));
    assert_eq!(c.cmd(&["STRLEN", "none"]), V::Int(0));
    assert_eq!(c.cmd(&["GETRANGE", "s", "0", "4"]), bulk("Hello"));
    assert_eq!(c.cmd(&["GETRANGE", "s", "-5", "-1"]), bulk("World"));
    assert_eq!(c.cmd(&["GETRANGE", "s", "0", "-1"]), bulk("Hello World"));
    assert_eq!(c.cmd(&["GETRANGE", "none", "0", "-1"]), bulk(""));
    assert_eq!(c.cmd(&["GETRANGE", "s", "a", "1"]), not_int);
    assert_eq!(c.cmd(&["SET", "sr", "Hello World"]), ok());
    assert_eq!(c.cmd(&["SETRANGE", "sr", "6", "Redis"]), V::Int(11));
    assert_eq!(c.cmd(&["GET", "sr"]), bulk("Hello Redis"));
    assert_eq!(c.cmd(&["SETRANGE", "padded", "3", "ab"]), V::Int(5));
    assert_eq!(c.cmd(&["GET", "padded"]), V::Bulk(b"\0\0\0ab".to_vec()));
    assert_eq!(c.cmd(&["SETRANGE", "absent", "5", ""]), V::Int(0));
    assert_eq!(c.cmd(&["EXISTS", "absent"]), V::Int(0));
    assert_eq!(c.cmd(&["SETRANGE", "sr", "-1", "x"]), err("ERR offset is out of range"));
    assert_eq!(
        c.cmd(&["SETRANGE", "sr", "536870911", "xy"]),
        err("ERR string exceeds maximum allowed size (proto-max-bulk-len)")
    );
    // Binary-safe keys and values, and values past the inline size.
    let key: &[u8] = b"bin\x00\r\nkey";
    let value: Vec<u8> = (0..=255u8).cycle().take(100_000).collect();
    c.send(&encode(&[b"SET", key, &value]));
    assert_eq!(c.read(), ok());
    c.send(&encode(&[b"GET", key]));
    assert_eq!(c.read(), V::Bulk(value));
}

#[test]
fn key_commands_answer_like_redis() {
    let (_dir, server) = fresh();
    let mut c = server.conn();
    assert_eq!(c.cmd(&["DBSIZE"]), V::Int(0));
    assert_eq!(
        c.cmd(&["MSET", "user:1:name", "a", "user:2:name", "b", "user:2:age", "3", "other", "x"]),
        ok()
    );
    assert_eq!(c.cmd(&["DBSIZE"]), V::Int(4));
    assert_eq!(c.cmd(&["EXISTS", "other", "other", "none"]), V::Int(2));
    assert_eq!(c.cmd(&["TYPE", "other"]), V::Simple("string".into()));
    assert_eq!(c.cmd(&["TYPE", "none"]), V::Simple("none".into()));
    let V::Array(mut names) = c.cmd(&["KEYS", "user:*:name"]) else { panic!("KEYS") };
    names.sort_by_key(|v| format!("{v:?}"));
    assert_eq!(names, vec![bulk("user:1:name"), bulk("user:2:name")]);
    assert_eq!(c.cmd(&["KEYS", "nothing*"]), V::Array(vec![]));
    assert_eq!(c.cmd(&["RENAME", "other", "moved"]), ok());
    assert_eq!(c.cmd(&["MGET", "other", "moved"]), V::Array(vec![V::Nil, bulk("x")]));
    assert_eq!(c.cmd(&["RENAME", "nokey", "x"]), err("ERR no such key"));
    assert_eq!(c.cmd(&["RENAMENX", "moved", "user:1:name"]), V::Int(0));
    assert_eq!(c.cmd(&["RENAMENX", "moved", "other"]), V::Int(1));
    assert_eq!(c.cmd(&["RENAME", "other", "other"]), ok());
    assert_eq!(c.cmd(&["RENAMENX", "other", "other"]), V::Int(0));
    assert_eq!(c.cmd(&["GET", "other"]), bulk("x"));
    assert_eq!(c.cmd(&["DEL", "other", "none", "user:2:age"]), V::Int(2));
    assert_eq!(c.cmd(&["UNLINK", "user:1:name"]), V::Int(1));
    assert_eq!(c.cmd(&["DBSIZE"]), V::Int(1));
    assert_eq!(c.cmd(&["FLUSHDB"]), ok());
    assert_eq!(c.cmd(&["DBSIZE"]), V::Int(0));
    assert_eq!(c.cmd(&["FLUSHALL", "BOGUS"]), err("ERR syntax error"));

    // SCAN: a full iteration returns every key exactly once.
    let mut all = HashSet::new();
    let mut pipeline = Vec::new();
    for i in 0..1000 {
        let key = format!("key:{i}");
        pipeline.extend(encode(&[b"SET", key.as_bytes(), b"v"]));
        all.insert(key);
    }
    c.send(&pipeline);
    for _ in 0..1000 {
        assert_eq!(c.read(), ok());
    }
    let scan = |c: &mut Conn, extra: &[&str]| {
        let (mut cursor, mut seen, mut calls) = ("0".to_string(), Vec::new(), 0);
        loop {
            let mut args = vec!["SCAN", cursor.as_str()];
            args.extend_from_slice(extra);
            let V::Array(reply) = c.cmd(&args) else { panic!("SCAN") };
            let [V::Bulk(next), V::Array(keys)] = &reply[..] else { panic!("SCAN reply {reply:?}") };
            calls += 1;
            seen.extend(keys.iter().map(|k| match k {
                V::Bulk(k) => String::from_utf8(k.clone()).unwrap(),
                other => panic!("{other:?}"),
            }));
            cursor = String::from_utf8(next.clone()).unwrap();
            if cursor == "0" {
                return (seen, calls);
            }
        }
    };
    let (seen, calls) = scan(&mut c, &["COUNT", "37"]);
    assert_eq!(seen.len(), 1000, "no key twice");
    assert_eq!(seen.iter().cloned().collect::<HashSet<_>>(), all);
    assert!(calls >= 1000 / 37, "COUNT bounds each batch: {calls} calls");
    let (seen, _) = scan(&mut c, &["MATCH", "key:99*"]);
    let mut seen: Vec<String> = seen;
    seen.sort();
    assert_eq!(
        seen,
        vec![
            "key:99", "key:990", "key:991", "key:992", "key:993", "key:994", "key:995", "key:996", "key:997",
            "key:998", "key:999"
        ]
    );
    assert_eq!(scan(&mut c, &["TYPE", "hash"]).0.len(), 0);
    assert_eq!(c.cmd(&["SCAN", "x"]), err("ERR invalid cursor"));
    assert_eq!(c.cmd(&["SCAN", "0", "COUNT", "0"]), err("ERR syntax error"));
    assert_eq!(c.cmd(&["SCAN", "0", "COUNT"]), err("ERR syntax error"));
    assert_eq!(c.cmd(&["FLUSHALL", "SYNC"]), ok());
    assert_eq!(c.cmd(&["SCAN", "0"]), V::Array(vec![bulk("0"), V::Array(vec![])]));
}

#[test]
fn server_commands_answer_like_redis() {
    let (_dir, server) = fresh();
    let mut c = server.conn();
    assert_eq!(c.cmd(&["SET", "k", "v"]), ok());
    let V::Bulk(info) = c.cmd(&["INFO"]) else { panic!("INFO is a bulk string in RESP2") };
    let info = String::from_utf8(info).unwrap();
    for needle in [
        "# Server\r\n",
        "redis_version:",
        "# Clients\r\nconnected_clients:1\r\n",
        "# Persistence\r\n",
        "nvhtm_mode:strict\r\n",
        "nvhtm_poisoned:no\r\n",
        "# Keyspace\r\ndb0:keys=1,expires=0,avg_ttl=0\r\n",
    ] {
        assert!(info.contains(needle), "{needle:?} in {info}");
    }
    let V::Bulk(only) = c.cmd(&["INFO", "persistence"]) else { panic!("INFO persistence") };
    let only = String::from_utf8(only).unwrap();
    assert!(only.starts_with("# Persistence\r\n") && !only.contains("# Server"), "{only}");
    assert_eq!(c.cmd(&["INFO", "nosuchsection"]), bulk(""));
    assert_eq!(
        c.cmd(&["CONFIG", "GET", "save", "appendonly"]),
        V::Array(vec![bulk("save"), bulk(""), bulk("appendonly"), bulk("no")])
    );
    let V::Array(every) = c.cmd(&["CONFIG", "GET", "*"]) else { panic!("CONFIG GET *") };
    assert!(every.len() >= 8 && every.len() % 2 == 0);
    assert_eq!(c.cmd(&["CONFIG", "GET", "nothing"]), V::Array(vec![]));
    assert_eq!(
        c.cmd(&["CONFIG", "SET", "save", ""]),
        err("ERR CONFIG SET failed (possibly related to argument 'save') - can't set immutable config")
    );
    assert_eq!(c.cmd(&["CONFIG", "BOGUS"]), err("ERR unknown subcommand 'BOGUS'. Try CONFIG HELP."));
    let V::Array(time) = c.cmd(&["TIME"]) else { panic!("TIME") };
    let [V::Bulk(secs), V::Bulk(micros)] = &time[..] else { panic!("{time:?}") };
    let secs: u64 = String::from_utf8(secs.clone()).unwrap().parse().unwrap();
    let micros: u64 = String::from_utf8(micros.clone()).unwrap().parse().unwrap();
    assert!(secs > 1_600_000_000 && micros < 1_000_000);
    assert_eq!(c.cmd(&["SAVE"]), ok());
    assert!(matches!(c.cmd(&["LASTSAVE"]), V::Int(t) if t as u64 >= secs));
    let syncs = |c: &mut Conn| {
        let V::Bulk(info) = c.cmd(&["INFO", "persistence"]) else { panic!("INFO") };
        let info = String::from_utf8(info).unwrap();
        info.lines().find_map(|l| l.strip_prefix("nvhtm_syncs:")).unwrap().trim().parse::<u64>().unwrap()
    };
    let before = syncs(&mut c);
    assert_eq!(c.cmd(&["BGSAVE"]), V::Simple("Background saving started".into()));
    // Bounded poll for the background sync (no sleep, no clock).
    let mut polls = 0;
    while syncs(&mut c) == before {
        polls += 1;
        assert!(polls < 1_000_000, "BGSAVE never synced");
        std::thread::yield_now();
    }
    assert_eq!(c.cmd(&["BGSAVE", "BOGUS"]), err("ERR syntax error"));
    assert_eq!(c.cmd(&["SHUTDOWN", "ABORT"]), err("ERR No shutdown in progress."));
    assert_eq!(c.cmd(&["SHUTDOWN", "BOGUS"]), err("ERR syntax error"));
    assert_eq!(c.cmd(&["PING"]), V::Simple("PONG".into()), "still serving");
}

#[test]
fn a_thousand_pipelined_commands_in_one_write() {
    let (_dir, server) = fresh();
    let mut c = server.conn();
    let mut batch = Vec::new();
    for i in 0..1000 {
        match i % 4 {
            0 => batch.extend(encode(&[b"SET", format!("p{i}").as_bytes(), format!("v{i}").as_bytes()])),
            1 => batch.extend(encode(&[b"GET", format!("p{}", i - 1).as_bytes()])),
            2 => batch.extend(encode(&[b"INCR", b"counter"])),
            _ => batch.extend(encode(&[b"ECHO", format!("e{i}").as_bytes()])),
        }
    }
    c.send(&batch);
    for i in 0..1000 {
        let want = match i % 4 {
            0 => ok(),
            1 => bulk(&format!("v{}", i - 1)),
            2 => V::Int(i / 4 + 1),
            _ => bulk(&format!("e{i}")),
        };
        assert_eq!(c.read(), want, "reply {i}");
    }
    assert_eq!(c.cmd(&["DBSIZE"]), V::Int(251));
}

#[test]
fn inline_commands_work_alone_and_mixed_with_resp() {
    let (_dir, server) = fresh();
    let mut c = server.conn();
    c.send(b"PING\r\n");
    assert_eq!(c.read(), V::Simple("PONG".into()));
    c.send(b"SET greeting \"hello world\\n\"\r\nGET greeting\n\r\n");
    assert_eq!(c.read(), ok());
    assert_eq!(c.read(), bulk("hello world\n"));
    let mut mixed = b"INCR n\r\n".to_vec();
    mixed.extend(encode(&[b"INCR", b"n"]));
    mixed.extend(b"  incrby   n  10 \r\n");
    c.send(&mixed);
    assert_eq!(c.read(), V::Int(1));
    assert_eq!(c.read(), V::Int(2));
    assert_eq!(c.read(), V::Int(12));
}

/// Sends `garbage` on a new connection: the reply must be `reply` (when given) and the
/// connection closed, while `bystander` keeps working.
fn rejected(server: &Server, bystander: &mut Conn, garbage: &[u8], reply: Option<&str>) {
    let mut c = server.conn();
    c.send(garbage);
    if let Some(reply) = reply {
        assert_eq!(c.read(), err(reply), "for {:?}", String::from_utf8_lossy(garbage));
    }
    assert!(c.closed(), "the connection is closed after {:?}", String::from_utf8_lossy(garbage));
    assert_eq!(bystander.cmd(&["GET", "safe"]), bulk("kept"));
}

#[test]
fn malformed_frames_close_only_their_connection() {
    let dir = scratch();
    let server = Server::start(
        &dir.path().join("p.pool"),
        &["--proto-max-bulk-len", "1MiB", "--client-query-buffer-limit", "2MiB"],
    );
    let mut bystander = server.conn();
    assert_eq!(bystander.cmd(&["SET", "safe", "kept"]), ok());
    rejected(&server, &mut bystander, b"*1\r\n!oops\r\n", Some("ERR Protocol error: expected '$', got '!'"));
    rejected(&server, &mut bystander, b"*x\r\n", Some("ERR Protocol error: invalid multibulk length"));
    rejected(&server, &mut bystander, b"*1\r\n$-2\r\n", Some("ERR Protocol error: invalid bulk length"));
    rejected(
        &server,
        &mut bystander,
        b"*1\r\n$999999999999\r\n",
        Some("ERR Protocol error: invalid bulk length"),
    );
    rejected(&server, &mut bystander, b"*1\r\n$2000000\r\n", Some("ERR Protocol error: invalid bulk length"));
    rejected(
        &server,
        &mut bystander,
        b"*2\r\n$3\r\nGET\r\n$1\r\nkXY",
        Some("ERR Protocol error: expected CRLF after a bulk string"),
    );
    rejected(
        &server,
        &mut bystander,
        b"\xff\xfe\"\x00\x01 garbage\r\n",
        Some("ERR Protocol error: unbalanced quotes in request"),
    );
    rejected(
        &server,
        &mut bystander,
        &vec![b'x'; 70 * 1024],
        Some("ERR Protocol error: too big inline request"),
    );
    // Replies to the requests before the bad one are sent first.
    let mut c = server.conn();
    c.send(b"*1\r\n$4\r\nPING\r\n*1\r\n@\r\n");
    assert_eq!(c.read(), V::Simple("PONG".into()));
    assert_eq!(c.read(), err("ERR Protocol error: expected '$', got '@'"));
    assert!(c.closed());
    // Many bulk strings, each within the limit, that together pass the query buffer limit.
    let mut c = server.conn();
    let chunk = vec![b'z'; 900 * 1024];
    let mut big = b"*5\r\n$3\r\nSET\r\n$1\r\nq\r\n".to_vec();
    for _ in 0..2 {
        big.extend(format!("${}\r\n", chunk.len()).as_bytes());
        big.extend(&chunk);
        big.extend(b"\r\n");
    }
    big.extend(b"$921600\r\n");
    big.extend(&chunk[..600 * 1024]);
    // The server may close while this is still being sent.
    let _ = c.writer.write_all(&big);
    assert!(c.closed());
    assert_eq!(bystander.cmd(&["EXISTS", "q"]), V::Int(0));
    // An HTTP request is dropped silently.
    let mut c = server.conn();
    c.send(b"POST / HTTP/1.1\r\nHost: x\r\n\r\n");
    assert!(c.closed());
    assert_eq!(bystander.cmd(&["GET", "safe"]), bulk("kept"));
    assert!(server.logged("HTTP request"), "{}", server.log());
}

#[test]
fn concurrent_clients_see_atomic_updates() {
    let (_dir, server) = fresh();
    let addr = server.addr.clone();
    let threads: Vec<_> = (0..8)
        .map(|t| {
            let addr = addr.clone();
            std::thread::spawn(move || {
                let mut c = Conn::new(&addr);
                for i in 0..200 {
                    assert!(matches!(c.cmd(&["INCR", "counter"]), V::Int(_)));
                    assert!(matches!(c.cmd(&["APPEND", "log", "x"]), V::Int(_)));
                    let v = format!("{t}-{i}");
                    assert_eq!(c.cmd(&["MSET", "left", &v, "right", &v]), ok());
                    let V::Array(pair) = c.cmd(&["MGET", "left", "right"]) else { panic!("MGET") };
                    assert_eq!(pair[0], pair[1], "MGET saw half an MSET");
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    // Many connections open at once, each answered.
    let mut many: Vec<Conn> = (0..300).map(|_| server.conn()).collect();
    for (i, c) in many.iter_mut().enumerate() {
        c.send(&encode(&[b"ECHO", i.to_string().as_bytes()]));
    }
    for (i, c) in many.iter_mut().enumerate().rev() {
        assert_eq!(c.read(), bulk(&i.to_string()));
    }
    let V::Bulk(info) = server.conn().cmd(&["INFO", "clients"]) else { panic!("INFO") };
    let info = String::from_utf8(info).unwrap();
    let connected: u64 =
        info.lines().find_map(|l| l.strip_prefix("connected_clients:")).unwrap().trim().parse().unwrap();
    // The 8 writers' connections may not all be seen closed yet.
    assert!(connected >= 301, "{info}");
    drop(many);
    let mut c = server.conn();
    assert_eq!(c.cmd(&["GET", "counter"]), bulk("1600"));
    assert_eq!(c.cmd(&["STRLEN", "log"]), V::Int(1600));
}

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

// ---- Limits and safety: requirepass, protected mode, maxclients, timeout, --config ----

/// Whether the server closes `conn` within `bound` (a bound on a wait, not a claim about
/// speed): EOF or a reset is closed; a read that times out is not.
fn closed_within(conn: &mut Conn, bound: Duration) -> bool {
    conn.reader.get_ref().set_read_timeout(Some(bound)).unwrap();
    let mut byte = [0u8; 1];
    let read = conn.reader.read(&mut byte);
    conn.reader.get_ref().set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    match read {
        Ok(0) => true,
        Ok(_) => panic!("unexpected data {byte:?} on an idle connection"),
        Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => false,
        Err(_) => true,
    }
}

const NOAUTH: &str = "NOAUTH Authentication required.";
const WRONGPASS: &str = "WRONGPASS invalid username-password pair or user is disabled.";
const NOAUTH_HELLO: &str = "NOAUTH HELLO must be called with the client already authenticated, otherwise the HELLO <proto> AUTH <user> <pass> option can be used to authenticate the client and select the RESP protocol version at the same time";
const NO_PASSWORD: &str = "ERR AUTH <password> called without any password configured for the default user. Are you sure your configuration is correct?";

#[test]
fn requirepass_guards_every_command_but_auth_hello_quit_and_reset() {
    let dir = scratch();
    let server = Server::start(&dir.path().join("serve.pool"), &["--requirepass", "s3cret"]);
    let mut c = server.conn();
    for cmd in [
        &["PING"][..],
        &["GET", "k"],
        &["SET", "k", "v"],
        &["INFO"],
        &["CONFIG", "GET", "*"],
        &["DBSIZE"],
        &["CLIENT", "ID"],
        &["SELECT", "0"],
        &["SHUTDOWN"],
    ] {
        assert_eq!(c.cmd(cmd), err(NOAUTH), "{cmd:?}");
    }
    // As in Redis: an unknown command and a wrong arity are answered before authentication.
    assert!(matches!(c.cmd(&["NOSUCH"]), V::Error(e) if e.starts_with("ERR unknown command 'NOSUCH'")));
    assert_eq!(c.cmd(&["GET"]), err("ERR wrong number of arguments for 'get' command"));
    assert_eq!(c.cmd(&["HELLO", "3"]), err(NOAUTH_HELLO));
    assert_eq!(c.cmd(&["HELLO"]), err(NOAUTH_HELLO));
    assert_eq!(c.cmd(&["AUTH", "wrong"]), err(WRONGPASS));
    assert_eq!(c.cmd(&["AUTH", "default", "wrong"]), err(WRONGPASS));
    assert_eq!(c.cmd(&["AUTH", "admin", "s3cret"]), err(WRONGPASS), "only the default user exists");
    assert_eq!(c.cmd(&["AUTH", "s3cret", "x", "y"]), err("ERR syntax error"));
    assert_eq!(c.cmd(&["HELLO", "3", "AUTH", "default", "wrong"]), err(WRONGPASS));
    assert_eq!(c.cmd(&["GET", "k"]), err(NOAUTH), "still not authenticated");
    assert_eq!(c.cmd(&["AUTH", "s3cret"]), ok());
    assert_eq!(c.cmd(&["SET", "k", "v"]), ok());
    assert_eq!(c.cmd(&["RESET"]), V::Simple("RESET".into()));
    assert_eq!(c.cmd(&["GET", "k"]), err(NOAUTH), "RESET forgets the authentication");
    assert_eq!(c.cmd(&["AUTH", "default", "s3cret"]), ok());
    assert_eq!(c.cmd(&["GET", "k"]), bulk("v"));

    let mut h = server.conn();
    let V::Map(hello) = h.cmd(&["HELLO", "3", "AUTH", "default", "s3cret", "SETNAME", "h"]) else {
        panic!("HELLO 3 answers a map")
    };
    assert!(hello.contains(&(bulk("proto"), V::Int(3))), "{hello:?}");
    assert_eq!(h.cmd(&["CLIENT", "GETNAME"]), bulk("h"));

    let mut q = server.conn();
    assert_eq!(q.cmd(&["QUIT"]), ok());
    assert!(q.closed(), "QUIT works before authentication");

    // CONFIG SET requirepass: new clients need the new password; those logged in stay so.
    assert_eq!(c.cmd(&["CONFIG", "GET", "requirepass"]), V::Array(vec![bulk("requirepass"), bulk("s3cret")]));
    assert_eq!(c.cmd(&["CONFIG", "SET", "requirepass", "n3w"]), ok());
    assert_eq!(h.cmd(&["GET", "k"]), bulk("v"));
    let mut d = server.conn();
    assert_eq!(d.cmd(&["GET", "k"]), err(NOAUTH));
    assert_eq!(d.cmd(&["AUTH", "s3cret"]), err(WRONGPASS));
    assert_eq!(d.cmd(&["AUTH", "n3w"]), ok());
    assert_eq!(d.cmd(&["GET", "k"]), bulk("v"));
    // No password: every client may run commands, and AUTH says there is none.
    let mut waiting = server.conn();
    assert_eq!(c.cmd(&["CONFIG", "SET", "requirepass", ""]), ok());
    assert_eq!(waiting.cmd(&["GET", "k"]), bulk("v"), "no password: no authentication needed");
    let mut e = server.conn();
    assert_eq!(e.cmd(&["GET", "k"]), bulk("v"));
    assert_eq!(e.cmd(&["AUTH", "anything"]), err(NO_PASSWORD));
    assert_eq!(e.cmd(&["AUTH", "default", "anything"]), ok());
    assert_eq!(e.cmd(&["AUTH", "other", "anything"]), err(WRONGPASS));
}

#[test]
fn maxclients_refuses_the_client_past_it_and_config_set_moves_it() {
    let dir = scratch();
    let server = Server::start(&dir.path().join("serve.pool"), &["--maxclients", "2"]);
    let mut a = server.conn();
    let mut b = server.conn();
    // Answered: both are counted.
    assert_eq!(a.cmd(&["PING"]), V::Simple("PONG".into()));
    assert_eq!(b.cmd(&["PING"]), V::Simple("PONG".into()));
    let mut refused = server.conn();
    assert_eq!(refused.read(), err("ERR max number of clients reached"));
    assert!(refused.closed());
    assert_eq!(a.cmd(&["CONFIG", "GET", "maxclients"]), V::Array(vec![bulk("maxclients"), bulk("2")]));
    assert_eq!(a.cmd(&["CONFIG", "SET", "maxclients", "3"]), ok());
    let mut third = server.conn();
    assert_eq!(third.cmd(&["PING"]), V::Simple("PONG".into()));
    let mut fourth = server.conn();
    assert_eq!(fourth.read(), err("ERR max number of clients reached"));
    assert!(fourth.closed());
    let V::Bulk(info) = a.cmd(&["INFO"]) else { panic!("INFO") };
    let info = String::from_utf8(info).unwrap();
    assert!(info.contains("connected_clients:3\r\nmaxclients:3\r\n"), "{info}");
    assert!(info.contains("rejected_connections:2\r\n"), "{info}");
    // Lowering it keeps the clients connected and refuses new ones.
    assert_eq!(a.cmd(&["CONFIG", "SET", "maxclients", "1"]), ok());
    assert_eq!(b.cmd(&["PING"]), V::Simple("PONG".into()));
    assert_eq!(third.cmd(&["PING"]), V::Simple("PONG".into()));
    assert_eq!(server.conn().read(), err("ERR max number of clients reached"));
}

#[test]
fn config_set_changes_only_what_redis_lets_it_all_or_nothing() {
    let (_dir, server) = fresh();
    let mut c = server.conn();
    let failed = |name: &str, why: &str| {
        err(&format!("ERR CONFIG SET failed (possibly related to argument '{name}') - {why}"))
    };
    assert_eq!(
        c.cmd(&["CONFIG", "SET", "nosuch", "1"]),
        err("ERR Unknown option or number of arguments for CONFIG SET - 'nosuch'")
    );
    for immutable in ["port", "bind", "pool", "mode", "sync-ms", "proto-max-bulk-len", "appendonly"] {
        assert_eq!(
            c.cmd(&["CONFIG", "SET", immutable, "1"]),
            failed(immutable, "can't set immutable config")
        );
    }
    assert_eq!(
        c.cmd(&["CONFIG", "SET", "timeout"]),
        err("ERR wrong number of arguments for 'config|set' command")
    );
    assert_eq!(
        c.cmd(&["CONFIG", "SET", "timeout", "1", "maxclients"]),
        err("ERR wrong number of arguments for 'config|set' command")
    );
    assert_eq!(
        c.cmd(&["CONFIG", "SET", "timeout", "x"]),
        failed("timeout", "argument couldn't be parsed into an integer")
    );
    assert_eq!(
        c.cmd(&["CONFIG", "SET", "timeout", "-1"]),
        failed("timeout", "argument must be between 0 and 2147483647 inclusive")
    );
    assert_eq!(
        c.cmd(&["CONFIG", "SET", "maxclients", "0"]),
        failed("maxclients", "argument must be between 1 and 4294967295 inclusive")
    );
    assert_eq!(
        c.cmd(&["CONFIG", "SET", "protected-mode", "maybe"]),
        failed("protected-mode", "argument must be 'yes' or 'no'")
    );
    assert_eq!(
        c.cmd(&["CONFIG", "SET", "timeout", "5", "TIMEOUT", "6"]),
        failed("timeout", "duplicate parameter")
    );
    // All or nothing: the valid pair before a bad one is not applied.
    assert_eq!(
        c.cmd(&["CONFIG", "SET", "timeout", "5", "port", "1"]),
        failed("port", "can't set immutable config")
    );
    assert_eq!(c.cmd(&["CONFIG", "GET", "timeout"]), V::Array(vec![bulk("timeout"), bulk("0")]));
    assert_eq!(c.cmd(&["CONFIG", "SET", "timeout", "5", "maxclients", "50", "protected-mode", "no"]), ok());
    assert_eq!(
        c.cmd(&["CONFIG", "GET", "timeout", "maxclients", "protected-mode"]),
        V::Array(vec![
            bulk("maxclients"),
            bulk("50"),
            bulk("timeout"),
            bulk("5"),
            bulk("protected-mode"),
            bulk("no")
        ])
    );
}

#[test]
fn an_idle_client_is_closed_after_timeout_and_an_active_one_is_not() {
    let dir = scratch();
    let server = Server::start(&dir.path().join("serve.pool"), &["--timeout", "3"]);
    let mut active = server.conn();
    assert_eq!(active.cmd(&["CONFIG", "GET", "timeout"]), V::Array(vec![bulk("timeout"), bulk("3")]));
    // The idle client waits for its close (bounded); the active one keeps talking meanwhile.
    let closes_while_active = |active: &mut Conn, mut idle: Conn| {
        let waiter = std::thread::spawn(move || closed_within(&mut idle, Duration::from_secs(60)));
        let mut pings = 0u64;
        while !waiter.is_finished() {
            assert_eq!(active.cmd(&["PING"]), V::Simple("PONG".into()), "the active client is served");
            pings += 1;
        }
        assert!(waiter.join().unwrap(), "the idle client was not closed within 60 s");
        assert_eq!(active.cmd(&["PING"]), V::Simple("PONG".into()), "the active client is still connected");
        pings
    };
    let mut idle = server.conn();
    assert_eq!(idle.cmd(&["PING"]), V::Simple("PONG".into()));
    assert!(closes_while_active(&mut active, idle) > 0);
    // CONFIG SET timeout reaches a client already waiting: none, then 3 seconds (long enough that the
    // active client's pings, back to back, never leave a gap that long on a loaded machine).
    assert_eq!(active.cmd(&["CONFIG", "SET", "timeout", "0"]), ok());
    let mut waiting = server.conn();
    assert_eq!(waiting.cmd(&["PING"]), V::Simple("PONG".into()));
    assert_eq!(active.cmd(&["CONFIG", "SET", "timeout", "3"]), ok());
    closes_while_active(&mut active, waiting);
}

/// An address of this machine other than loopback (the one its default route would use;
/// connecting a UDP socket sends nothing).
fn non_loopback_address() -> Option<std::net::IpAddr> {
    ["192.0.2.1:9", "10.255.255.1:9", "8.8.8.8:53"].into_iter().find_map(|target| {
        let socket = std::net::UdpSocket::bind("0.0.0.0:0").ok()?;
        socket.connect(target).ok()?;
        let ip = socket.local_addr().ok()?.ip();
        (!ip.is_loopback() && !ip.is_unspecified()).then_some(ip)
    })
}

#[test]
fn protected_mode_refuses_non_loopback_clients_until_a_password_is_set() {
    let Some(lan) = non_loopback_address() else {
        eprintln!("skipped: this machine has no address but loopback (the decision is unit-tested)");
        return;
    };
    let dir = scratch();
    let server = Server::start(&dir.path().join("serve.pool"), &["--bind", "0.0.0.0"]);
    let port: u16 = server.addr.rsplit(':').next().unwrap().parse().unwrap();
    let remote = || Conn::new(&std::net::SocketAddr::new(lan, port).to_string());
    let mut local = Conn::new(&format!("127.0.0.1:{port}"));
    assert_eq!(local.cmd(&["PING"]), V::Simple("PONG".into()), "loopback clients are served");
    assert_eq!(
        local.cmd(&["CONFIG", "GET", "protected-mode"]),
        V::Array(vec![bulk("protected-mode"), bulk("yes")])
    );
    let mut denied = remote();
    let V::Error(text) = denied.read() else { panic!("DENIED") };
    assert!(text.starts_with("DENIED Redis is running in protected mode because protected mode is enabled and no password is set for the default user."), "{text}");
    assert!(
        text.ends_with("in order for the server to start accepting connections from the outside."),
        "{text}"
    );
    assert!(denied.closed());
    // A password lifts it (and is asked for).
    assert_eq!(local.cmd(&["CONFIG", "SET", "requirepass", "pw"]), ok());
    let mut guarded = remote();
    assert_eq!(guarded.cmd(&["PING"]), err(NOAUTH));
    assert_eq!(guarded.cmd(&["AUTH", "pw"]), ok());
    assert_eq!(guarded.cmd(&["PING"]), V::Simple("PONG".into()));
    // So does protected-mode no.
    assert_eq!(local.cmd(&["CONFIG", "SET", "requirepass", "", "protected-mode", "no"]), ok());
    let mut open = remote();
    assert_eq!(open.cmd(&["PING"]), V::Simple("PONG".into()));
    // And it comes back.
    assert_eq!(local.cmd(&["CONFIG", "SET", "protected-mode", "yes"]), ok());
    let mut again = remote();
    assert!(matches!(again.read(), V::Error(text) if text.starts_with("DENIED ")));
    assert!(again.closed());
    assert_eq!(open.cmd(&["PING"]), V::Simple("PONG".into()), "connected clients stay");
}

/// `nvhtm serve` with `args` that must fail to start: its stderr.
fn fails_to_start(args: &[&std::ffi::OsStr]) -> String {
    let output = Command::new(env!("CARGO_BIN_EXE_nvhtm")).arg("serve").args(args).output().unwrap();
    assert!(!output.status.success(), "started: {output:?}");
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[test]
fn a_config_file_sets_the_options_and_flags_override_it() {
    let dir = scratch();
    let conf = dir.path().join("nvhtm.conf");
    std::fs::write(
        &conf,
        "# nvhtm serve, redis.conf syntax\n\
         port 6390\n\
         requirepass \"pass word\"\n\
         maxclients 5\n\
         timeout 300\n\
         proto-max-bulk-len 1mb\n\
         client-query-buffer-limit 64mb\n\
         mode fams\n\
         sync-ms 50\n\
         protected-mode yes\n",
    )
    .unwrap();
    let pool = dir.path().join("serve.pool");
    // The test's own --port 0 overrides the file's port, and --maxclients its maxclients.
    let server = Server::start(&pool, &["--config", conf.to_str().unwrap(), "--maxclients", "7"]);
    let port = server.addr.rsplit(':').next().unwrap().to_string();
    let mut c = server.conn();
    assert_eq!(c.cmd(&["PING"]), err(NOAUTH));
    assert_eq!(c.cmd(&["AUTH", "pass word"]), ok());
    let get = |c: &mut Conn, name: &str| {
        let V::Array(pair) = c.cmd(&["CONFIG", "GET", name]) else { panic!("CONFIG GET {name}") };
        let [_, V::Bulk(value)] = &pair[..] else { panic!("{pair:?}") };
        String::from_utf8(value.clone()).unwrap()
    };
    for (name, value) in [
        ("port", port.as_str()),
        ("maxclients", "7"),
        ("timeout", "300"),
        ("proto-max-bulk-len", "1048576"),
        ("client-query-buffer-limit", "67108864"),
        ("mode", "fams"),
        ("sync-ms", "50"),
        ("protected-mode", "yes"),
        ("bind", "127.0.0.1"),
    ] {
        assert_eq!(get(&mut c, name), value, "{name}");
    }
    assert_ne!(port, "6390");
    // The file's proto-max-bulk-len is enforced.
    c.send(b"*2\r\n$4\r\nECHO\r\n$1048577\r\n");
    assert_eq!(c.read(), err("ERR Protocol error: invalid bulk length"));
    assert!(c.closed());
    drop(server);

    // A bad line stops the start, naming the file and the line.
    let bad = dir.path().join("bad.conf");
    std::fs::write(&bad, "port 0\n# fine\nsave 900 1\n").unwrap();
    let pool = pool.as_os_str();
    let stderr = fails_to_start(&["--config".as_ref(), bad.as_os_str(), "--pool".as_ref(), pool]);
    assert!(stderr.contains(&format!("{}:3: unknown directive 'save'", bad.display())), "{stderr}");
    std::fs::write(&bad, "maxclients lots\n").unwrap();
    let stderr = fails_to_start(&["--config".as_ref(), bad.as_os_str(), "--pool".as_ref(), pool]);
    assert!(stderr.contains(&format!("{}:1: 'lots' is not a valid number", bad.display())), "{stderr}");
    let missing = dir.path().join("missing.conf");
    let stderr = fails_to_start(&["--config".as_ref(), missing.as_os_str(), "--pool".as_ref(), pool]);
    assert!(stderr.contains(&format!("reading {}", missing.display())), "{stderr}");
}

// ---- The real Redis tools (Debian's redis-tools; installed in CI by .ci/run) ----

/// `name` on PATH, or `None` with the reason printed (the test then skips).
fn redis_tool(name: &str) -> Option<PathBuf> {
    let found = std::env::var_os("PATH")
        .and_then(|path| std::env::split_paths(&path).map(|dir| dir.join(name)).find(|p| p.is_file()));
    if found.is_none() {
        eprintln!("skipped: {name} is not on PATH (apt-get install redis-tools; CI installs it)");
    }
    found
}

impl Server {
    fn port(&self) -> String {
        self.addr.rsplit(':').next().unwrap().to_string()
    }

    /// Runs `tool` against this server with `args` (and `stdin`); its stdout and stderr
    /// together, once it has exited successfully.
    fn run_tool(&self, tool: &Path, args: &[&str], stdin: Option<Vec<u8>>) -> String {
        let mut child = Command::new(tool)
            .args(["-h", "127.0.0.1", "-p", &self.port()])
            .args(args)
            .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        if let Some(bytes) = stdin {
            let mut pipe = child.stdin.take().unwrap();
            std::thread::spawn(move || pipe.write_all(&bytes).unwrap());
        }
        let output = child.wait_with_output().unwrap();
        let text =
            format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
        assert!(output.status.success(), "{} {args:?} failed ({}): {text}", tool.display(), output.status);
        text
    }
}

#[test]
fn redis_cli_works_against_the_server() {
    let Some(cli) = redis_tool("redis-cli") else { return };
    let dir = scratch();
    let server = Server::start(&dir.path().join("serve.pool"), &["--requirepass", "pw"]);
    let cli_cmd = |args: &[&str]| {
        let mut all = vec!["-a", "pw", "--no-auth-warning"];
        all.extend_from_slice(args);
        server.run_tool(&cli, &all, None)
    };
    assert_eq!(server.run_tool(&cli, &["GET", "greeting"], None).trim(), NOAUTH);
    assert_eq!(cli_cmd(&["SET", "greeting", "hello"]), "OK\n");
    assert_eq!(cli_cmd(&["GET", "greeting"]), "hello\n");
    assert_eq!(cli_cmd(&["INCR", "visits"]), "1\n");
    assert_eq!(cli_cmd(&["INCR", "visits"]), "2\n");
    assert_eq!(cli_cmd(&["MSET", "a", "1", "b", "2"]), "OK\n");
    assert_eq!(cli_cmd(&["MGET", "a", "b", "nope"]), "1\n2\n\n");
    assert_eq!(cli_cmd(&["DBSIZE"]), "4\n");
    let info = cli_cmd(&["INFO"]);
    assert!(info.contains("redis_version:7.2.0") && info.contains("db0:keys=4,"), "{info}");
    assert_eq!(cli_cmd(&["NOSUCH"]).trim(), "ERR unknown command 'NOSUCH', with args beginning with:");

    // Mass insertion (`redis-cli --pipe`): raw RESP on stdin, a count of replies and errors.
    let mut resp = Vec::new();
    resp.extend_from_slice(&encode(&[b"AUTH", b"pw"]));
    for i in 0..1000 {
        resp.extend_from_slice(&encode(&[b"SET", format!("mass:{i}").as_bytes(), format!("{i}").as_bytes()]));
    }
    resp.extend_from_slice(&encode(&[b"INCRBY", b"mass:count", b"1000"]));
    // (redis-cli --pipe exits 1 if any reply is an error.)
    let out = server.run_tool(&cli, &["--pipe"], Some(resp));
    assert!(out.contains("errors: 0, replies: 1002"), "{out}");
    assert_eq!(cli_cmd(&["DBSIZE"]), "1005\n");
    assert_eq!(cli_cmd(&["GET", "mass:count"]), "1000\n");
    assert_eq!(cli_cmd(&["GET", "mass:999"]), "999\n");
}

/// redis-benchmark's standard run against a server started with `extra` (on a FAMS pool
/// created first if `fams_pool`), with and without pipelining: no errors, and the keys and
/// counts its commands imply.
fn redis_benchmark_runs_clean(fams_pool: bool, extra: &[&str]) {
    let Some(benchmark) = redis_tool("redis-benchmark") else { return };
    let dir = scratch();
    let pool = dir.path().join("serve.pool");
    if fams_pool {
        let created =
            Command::new(env!("CARGO_BIN_EXE_nvhtm")).args(["create", "--fams"]).arg(&pool).output().unwrap();
        assert!(created.status.success(), "{created:?}");
    }
    let server = Server::start(&pool, extra);
    let mut c = server.conn();
    let V::Bulk(info) = c.cmd(&["INFO", "persistence"]) else { panic!("INFO") };
    let info = String::from_utf8(info).unwrap();
    let mode = if extra.contains(&"fams") { "fams" } else { "strict" };
    assert!(info.contains(&format!("nvhtm_mode:{mode}\r\n")), "{info}");
    assert!(
        info.contains(if fams_pool { "nvhtm_group_commit:yes" } else { "nvhtm_group_commit:no" }),
        "{info}"
    );
    let n = 2000;
    for (round, pipeline) in [("1", 1), ("16", 2)] {
        let out = server.run_tool(
            &benchmark,
            &["-q", "-n", &n.to_string(), "-c", "10", "-P", round, "-t", "ping,set,get,incr,mset"],
            None,
        );
        // Progress lines end in \r; the results in \n.
        let results: Vec<&str> =
            out.split(['\r', '\n']).map(str::trim).filter(|l| l.contains("requests per second")).collect();
        for test in ["PING_INLINE:", "PING_MBULK:", "SET:", "GET:", "INCR:", "MSET (10 keys):"] {
            assert!(results.iter().any(|l| l.starts_with(test)), "no {test} result in {out}");
        }
        assert!(!out.contains("rror") && !out.contains("WARNING"), "{out}");
        // Without -r every SET, GET and MSET uses the one key `key:__rand_int__`, every INCR
        // `counter:__rand_int__`: two keys, and the counter counts every INCR of every run.
        assert_eq!(c.cmd(&["DBSIZE"]), V::Int(2), "after -P {round}");
        assert_eq!(
            c.cmd(&["GET", "counter:__rand_int__"]),
            bulk(&(n * pipeline).to_string()),
            "after -P {round}"
        );
        assert_eq!(c.cmd(&["EXISTS", "key:__rand_int__"]), V::Int(1));
    }
}

#[test]
fn redis_benchmark_runs_clean_in_strict_mode() {
    redis_benchmark_runs_clean(false, &[]);
}

#[test]
fn redis_benchmark_runs_clean_in_strict_mode_with_group_commit() {
    redis_benchmark_runs_clean(true, &["--mode", "strict"]);
}

#[test]
fn redis_benchmark_runs_clean_in_fams_mode() {
    redis_benchmark_runs_clean(false, &["--mode", "fams"]);
}
