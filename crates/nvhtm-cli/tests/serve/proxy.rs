//! Sharding with twemproxy: three servers behind `nutcracker` (Debian's, 0.5.0) with ketama
//! consistent hashing; keys written through the proxy land on exactly one shard each.

use super::*;
use std::time::Instant;

/// The nutcracker binary, or `None` (the test then says it was skipped; CI installs it).
fn nutcracker() -> Option<PathBuf> {
    ["/usr/sbin/nutcracker", "/usr/bin/nutcracker", "/usr/local/sbin/nutcracker", "/usr/local/bin/nutcracker"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
}

/// A port free a moment ago (nutcracker cannot be told to pick one and say which; a start
/// that loses the port to another process is retried).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A running nutcracker.
struct Proxy {
    child: Child,
    addr: String,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts nutcracker in front of `shards` with the configuration this test documents (the
/// README shows the same).
fn start_proxy(binary: &Path, dir: &Path, shards: &[&Server]) -> Proxy {
    for attempt in 0..20 {
        let (port, stats) = (free_port(), free_port());
        let mut conf = format!(
            "nvhtm:\n  listen: 127.0.0.1:{port}\n  hash: fnv1a_64\n  distribution: ketama\n  redis: true\n  auto_eject_hosts: false\n  timeout: 10000\n  servers:\n"
        );
        for (i, shard) in shards.iter().enumerate() {
            conf.push_str(&format!("    - {}:1 shard{i}\n", shard.addr));
        }
        let path = dir.join("nutcracker.yml");
        std::fs::write(&path, conf).unwrap();
        let log = dir.join(format!("nutcracker-{attempt}.log"));
        let mut child = Command::new(binary)
            .arg("-c")
            .arg(&path)
            .args(["-s", &stats.to_string(), "-o"])
            .arg(&log)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start nutcracker");
        let addr = format!("127.0.0.1:{port}");
        // Wait (bounded) until it accepts, or has exited (the port was taken: try others).
        let began = Instant::now();
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                eprintln!(
                    "nutcracker exited ({status}) on attempt {attempt}: {}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
                break;
            }
            if TcpStream::connect(&addr).is_ok() {
                return Proxy { child, addr };
            }
            assert!(began.elapsed() < Duration::from_secs(60), "nutcracker never listened on {addr}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    panic!("nutcracker did not start in 20 attempts");
}

#[test]
fn three_servers_behind_twemproxy_shard_the_keys() {
    let Some(binary) = nutcracker() else {
        eprintln!("SKIPPED three_servers_behind_twemproxy_shard_the_keys: no nutcracker binary (apt-get install nutcracker; CI installs it)");
        return;
    };
    let dir = scratch();
    let shards: Vec<Server> =
        (0..3).map(|i| Server::start(&dir.path().join(format!("shard{i}.pool")), &[])).collect();
    let proxy = start_proxy(&binary, dir.path(), &shards.iter().collect::<Vec<_>>());
    let mut p = Conn::new(&proxy.addr);
    let mut direct: Vec<Conn> = shards.iter().map(Server::conn).collect();
    let keys: Vec<String> = (0..300).map(|i| format!("user:{i}")).collect();

    for (i, key) in keys.iter().enumerate() {
        assert_eq!(p.cmd(&["SET", key, &format!("v{i}")]), ok(), "{key}");
    }
    // Each key is on exactly one shard, and the shards share the keys.
    let mut owner = Vec::new();
    for (i, key) in keys.iter().enumerate() {
        let holders: Vec<usize> =
            (0..3).filter(|&s| direct[s].cmd(&["GET", key]) == bulk(&format!("v{i}"))).collect();
        assert_eq!(holders.len(), 1, "{key} is on shards {holders:?}");
        owner.push(holders[0]);
    }
    let sizes: Vec<i64> = direct
        .iter_mut()
        .map(|c| match c.cmd(&["DBSIZE"]) {
            V::Int(n) => n,
            other => panic!("DBSIZE: {other:?}"),
        })
        .collect();
    assert_eq!(sizes.iter().sum::<i64>(), 300);
    // Ketama places each server by its name, so the split is fixed for these names and keys
    // (uneven with three servers: 190, 10 and 100); every shard holds some.
    assert!(sizes.iter().all(|&n| n > 0), "ketama spreads 300 keys over 3 shards: {sizes:?}");
    // Reads through the proxy find every key; MGET across shards is split and merged.
    for (i, key) in keys.iter().enumerate() {
        assert_eq!(p.cmd(&["GET", key]), bulk(&format!("v{i}")));
    }
    let mget: Vec<&str> = std::iter::once("MGET").chain(keys[..20].iter().map(String::as_str)).collect();
    let want: Vec<V> = (0..20).map(|i| bulk(&format!("v{i}"))).collect();
    assert_eq!(p.cmd(&mget), V::Array(want));
    // A write through the proxy goes to the key's shard again: hashing is consistent.
    assert_eq!(p.cmd(&["APPEND", &keys[7], "!"]), V::Int(3));
    assert_eq!(direct[owner[7]].cmd(&["GET", &keys[7]]), bulk("v7!"));
    // Expiry passes through.
    assert_eq!(p.cmd(&["SET", "session", "s", "EX", "1000"]), ok());
    let V::Int(ttl) = p.cmd(&["TTL", "session"]) else { panic!("TTL") };
    assert!((990..=1000).contains(&ttl), "{ttl}");
    // DEL through the proxy removes the key from its shard.
    for key in &keys[..150] {
        assert_eq!(p.cmd(&["DEL", key]), V::Int(1), "{key}");
    }
    for (i, key) in keys.iter().enumerate() {
        let want = if i < 150 { V::Nil } else { bulk(&format!("v{i}")) };
        assert_eq!(direct[owner[i]].cmd(&["GET", key]), want, "{key} on its shard");
    }
    assert_eq!(p.cmd(&["DEL", &keys[0]]), V::Int(0));
    let total: i64 = direct
        .iter_mut()
        .map(|c| match c.cmd(&["DBSIZE"]) {
            V::Int(n) => n,
            other => panic!("DBSIZE: {other:?}"),
        })
        .sum();
    assert_eq!(total, 150 + 1, "the keys not deleted, and the session");
    // twemproxy does not forward MULTI (a transaction may span shards): it closes the
    // connection rather than pass it on; other connections carry on.
    p.send(&encode(&[b"MULTI"]));
    assert!(p.closed(), "nutcracker refused MULTI by closing the connection");
    assert_eq!(Conn::new(&proxy.addr).cmd(&["GET", &keys[200]]), bulk("v200"));
}
