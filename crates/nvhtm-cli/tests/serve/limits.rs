//! Limits and safety: requirepass, protected mode, maxclients, timeout, --config.

use super::*;

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
