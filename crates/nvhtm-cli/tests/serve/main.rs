//! `nvhtm serve` end to end: the built binary is started on a free port in a temporary
//! directory and spoken to in raw RESP over TCP. This file holds the harness and the tests of
//! connections, strings, keys, the server commands, limits and crashes; the modules, the rest.

mod crashes;
mod expiry;
mod limits;
mod proxy;
mod tools;
mod transactions;

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

/// The reply to a command sent before AUTH when a password is set.
const NOAUTH: &str = "NOAUTH Authentication required.";

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

/// The modes with a map of their own, which the command tests run in, one after another.
const MAP_MODES: [&str; 3] = ["strict", "periodic", "hybrid"];

/// A new pool served in `mode`.
fn fresh_in(mode: &str) -> (tempfile::TempDir, Server) {
    let dir = scratch();
    let server = Server::start(&dir.path().join("serve.pool"), &["--mode", mode]);
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
    for mode in MAP_MODES {
        string_commands_answer_like_redis_in(mode);
    }
}

fn string_commands_answer_like_redis_in(mode: &str) {
    let (_dir, server) = fresh_in(mode);
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
    assert_eq!(c.cmd(&["SET", "k", "v", "EX", "0"]), err("ERR invalid expire time in 'set' command"));
    assert_eq!(c.cmd(&["SET", "k", "v", "px", "10", "EX", "10"]), err("ERR syntax error"));
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
    // INCRBYFLOAT: Redis's examples, its errors, and nothing changed by a failure.
    assert_eq!(c.cmd(&["SET", "f", "10.50"]), ok());
    assert_eq!(c.cmd(&["INCRBYFLOAT", "f", "0.1"]), bulk("10.6"));
    assert_eq!(c.cmd(&["INCRBYFLOAT", "f", "-5"]), bulk("5.6"));
    assert_eq!(c.cmd(&["SET", "f", "5.0e3"]), ok());
    assert_eq!(c.cmd(&["INCRBYFLOAT", "f", "2.0e2"]), bulk("5200"));
    assert_eq!(c.cmd(&["INCRBYFLOAT", "fnew", "3"]), bulk("3"));
    assert_eq!(c.cmd(&["INCRBYFLOAT", "f", "x"]), err("ERR value is not a valid float"));
    assert_eq!(c.cmd(&["INCRBYFLOAT", "fabsent", "1"]), bulk("1"), "an absent key is 0");
    assert_eq!(c.cmd(&["SET", "notnum", "abc"]), ok());
    assert_eq!(c.cmd(&["INCRBYFLOAT", "notnum", "1"]), err("ERR value is not a valid float"));
    assert_eq!(c.cmd(&["INCRBYFLOAT", "f", "inf"]), err("ERR increment would produce NaN or Infinity"));
    assert_eq!(c.cmd(&["GET", "f"]), bulk("5200"));
}

#[test]
fn key_commands_answer_like_redis() {
    for mode in MAP_MODES {
        key_commands_answer_like_redis_in(mode);
    }
}

fn key_commands_answer_like_redis_in(mode: &str) {
    let (_dir, server) = fresh_in(mode);
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
    // RANDOMKEY: some key of the keyspace, never an expired one.
    for _ in 0..20 {
        let V::Bulk(key) = c.cmd(&["RANDOMKEY"]) else { panic!("RANDOMKEY") };
        assert!(all.contains(&String::from_utf8(key).unwrap()));
    }
    assert_eq!(c.cmd(&["FLUSHALL", "SYNC"]), ok());
    assert_eq!(c.cmd(&["SCAN", "0"]), V::Array(vec![bulk("0"), V::Array(vec![])]));
    assert_eq!(c.cmd(&["RANDOMKEY"]), V::Nil);
    assert_eq!(c.cmd(&["SET", "only", "v"]), ok());
    assert_eq!(c.cmd(&["SET", "expired", "v", "PXAT", "1"]), ok());
    for _ in 0..20 {
        assert_eq!(c.cmd(&["RANDOMKEY"]), bulk("only"));
    }
    assert_eq!(c.cmd(&["RANDOMKEY", "x"]), err("ERR wrong number of arguments for 'randomkey' command"));
}

#[test]
fn server_commands_answer_like_redis() {
    for mode in MAP_MODES {
        server_commands_answer_like_redis_in(mode);
    }
}

fn server_commands_answer_like_redis_in(mode: &str) {
    let (_dir, server) = fresh_in(mode);
    let mut c = server.conn();
    assert_eq!(c.cmd(&["SET", "k", "v"]), ok());
    let V::Bulk(info) = c.cmd(&["INFO"]) else { panic!("INFO is a bulk string in RESP2") };
    let info = String::from_utf8(info).unwrap();
    for needle in [
        "# Server\r\n",
        "redis_version:",
        "# Clients\r\nconnected_clients:1\r\n",
        "# Persistence\r\n",
        "nvhtm_poisoned:no\r\n",
        "# Keyspace\r\ndb0:keys=1,expires=0,avg_ttl=0\r\n",
    ] {
        assert!(info.contains(needle), "{needle:?} in {info}");
    }
    assert!(info.contains(&format!("nvhtm_mode:{mode}\r\nnvhtm_map:{mode}\r\n")), "{mode}: {info}");
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
    for mode in MAP_MODES {
        concurrent_clients_see_atomic_updates_in(mode);
    }
}

fn concurrent_clients_see_atomic_updates_in(mode: &str) {
    let (_dir, server) = fresh_in(mode);
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
