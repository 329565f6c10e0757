//! The real Redis tools (Debian's redis-tools; installed in CI by .ci/run).

use super::*;

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
