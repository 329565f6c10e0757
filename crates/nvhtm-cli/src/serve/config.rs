//! The server's settings: built-in defaults, then a config file in redis.conf syntax
//! (`--config FILE`), then command-line flags, each overriding the one before; and the
//! settings CONFIG SET may change while the server runs ([`Live`]), with the limits they
//! enforce (AUTH, protected mode, maxclients, idle timeout).

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::RwLock;

use super::{resp, Mode, Options};

/// The settings in effect once defaults, the config file and the flags are merged.
#[derive(Debug, Clone)]
pub struct Config {
    /// The pool file (`pool`).
    pub pool: PathBuf,
    /// The mode asked for (`mode`); `None`: the pool's own.
    pub mode: Option<Mode>,
    /// The address listened on (`bind`).
    pub bind: String,
    /// The port (`port`; 0: any free port).
    pub port: u16,
    /// FAMS mode: milliseconds between syncs (`sync-ms`).
    pub sync_ms: u64,
    /// Periodic mode: the epoch length in milliseconds (`epoch-ms`; `None`: the map's stored
    /// one).
    pub epoch_ms: Option<f64>,
    /// Size of a new pool (`size`).
    pub size: u64,
    /// The longest bulk string a request may hold (`proto-max-bulk-len`).
    pub proto_max_bulk_len: u64,
    /// The most unparsed bytes one client may have buffered (`client-query-buffer-limit`).
    pub client_query_buffer_limit: u64,
    /// Worker threads (`threads`; `None`: one per CPU).
    pub threads: Option<usize>,
    /// The password clients must give (`requirepass`) at start; CONFIG SET changes
    /// [`Live`]'s copy.
    pub requirepass: Option<Vec<u8>>,
    /// The most clients connected at once (`maxclients`) at start.
    pub maxclients: u64,
    /// Seconds a client may stay idle before it is disconnected (`timeout`; 0: never) at start.
    pub timeout: u64,
    /// Whether non-loopback clients are refused while no password is set (`protected-mode`)
    /// at start.
    pub protected_mode: bool,
    /// The config file read, if any.
    pub file: Option<PathBuf>,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            pool: PathBuf::from("nvhtm-serve.pool"),
            mode: None,
            bind: "127.0.0.1".into(),
            port: 6379,
            sync_ms: 1000,
            epoch_ms: None,
            size: 64 << 20,
            proto_max_bulk_len: 512 << 20,
            client_query_buffer_limit: 1 << 30,
            threads: None,
            requirepass: None,
            maxclients: 10_000,
            timeout: 0,
            protected_mode: true,
            file: None,
        }
    }
}

/// The directives a config file may hold (Redis's names, plus nvhtm's own `pool`, `mode`,
/// `sync-ms`, `epoch-ms`, `size` and `threads`).
pub const DIRECTIVES: &[&str] = &[
    "port",
    "bind",
    "requirepass",
    "maxclients",
    "timeout",
    "protected-mode",
    "proto-max-bulk-len",
    "client-query-buffer-limit",
    "pool",
    "mode",
    "sync-ms",
    "epoch-ms",
    "size",
    "threads",
];

/// Redis's `memtoll`: a byte count with an optional unit, case-insensitive: `b`, `k` (1000),
/// `kb` (1024), `m`, `mb`, `g`, `gb`. Falls back to the command line's sizes (`64MiB`).
pub fn parse_memory(text: &str) -> Result<u64, String> {
    let lower = text.to_ascii_lowercase();
    let digits = lower.find(|c: char| !c.is_ascii_digit()).unwrap_or(lower.len());
    let (number, unit) = lower.split_at(digits);
    let multiplier: Option<u64> = match unit {
        "" | "b" => Some(1),
        "k" => Some(1000),
        "kb" => Some(1024),
        "m" => Some(1000 * 1000),
        "mb" => Some(1024 * 1024),
        "g" => Some(1000 * 1000 * 1000),
        "gb" => Some(1024 * 1024 * 1024),
        _ => None,
    };
    match (number.parse::<u64>(), multiplier) {
        (Ok(n), Some(m)) => n.checked_mul(m).ok_or_else(|| format!("'{text}' is too large")),
        _ => crate::format::parse_size(text),
    }
}

/// `yes` or `no` (Redis's booleans).
pub fn parse_bool(text: &str) -> Result<bool, String> {
    match text.to_ascii_lowercase().as_str() {
        "yes" => Ok(true),
        "no" => Ok(false),
        _ => Err("argument must be 'yes' or 'no'".into()),
    }
}

fn parse_int<T: std::str::FromStr>(text: &str) -> Result<T, String> {
    text.parse().map_err(|_| format!("'{text}' is not a valid number"))
}

/// The password given for `requirepass` (an empty one means none, as in Redis).
fn password(value: &[u8]) -> Option<Vec<u8>> {
    (!value.is_empty()).then(|| value.to_vec())
}

impl Config {
    /// Sets one directive from its arguments (a config-file line without the name).
    pub fn set(&mut self, name: &str, args: &[Vec<u8>]) -> Result<(), String> {
        let name = name.to_ascii_lowercase();
        if !DIRECTIVES.contains(&name.as_str()) {
            return Err(format!("unknown directive '{name}'"));
        }
        let [value] = args else {
            return Err(if name == "bind" && args.len() > 1 {
                "'bind' takes one address (nvhtm serve listens on one)".into()
            } else {
                format!("'{name}' takes exactly one argument")
            });
        };
        if name == "requirepass" {
            self.requirepass = password(value);
            return Ok(());
        }
        let value = std::str::from_utf8(value).map_err(|_| format!("'{name}': the value is not UTF-8"))?;
        match name.as_str() {
            "port" => self.port = parse_int(value)?,
            "bind" => self.bind = value.to_string(),
            "maxclients" => {
                self.maxclients = parse_int(value)?;
                if self.maxclients == 0 {
                    return Err("'maxclients' must be at least 1".into());
                }
            }
            "timeout" => self.timeout = parse_int(value)?,
            "protected-mode" => self.protected_mode = parse_bool(value)?,
            "proto-max-bulk-len" => self.proto_max_bulk_len = parse_memory(value)?,
            "client-query-buffer-limit" => self.client_query_buffer_limit = parse_memory(value)?,
            "pool" => self.pool = PathBuf::from(value),
            "mode" => {
                self.mode = Some(match value.to_ascii_lowercase().as_str() {
                    "strict" => Mode::Strict,
                    "fams" => Mode::Fams,
                    "periodic" => Mode::Periodic,
                    "hybrid" => Mode::Hybrid,
                    _ => return Err(format!("'mode' is strict, fams, periodic or hybrid, not '{value}'")),
                });
            }
            "sync-ms" => {
                self.sync_ms = parse_int(value)?;
                if self.sync_ms == 0 {
                    return Err("'sync-ms' must be at least 1".into());
                }
            }
            "epoch-ms" => {
                self.epoch_ms = Some(
                    value
                        .parse::<f64>()
                        .ok()
                        .filter(|ms| ms.is_finite() && *ms > 0.0)
                        .ok_or_else(|| format!("'epoch-ms' must be a positive number, not '{value}'"))?,
                );
            }
            "size" => self.size = parse_memory(value)?,
            "threads" => self.threads = Some(parse_int(value)?),
            _ => unreachable!("every directive is handled"),
        }
        Ok(())
    }

    /// Applies a config file's text (`file` names it in errors): one directive per line,
    /// `#` comments, arguments split as redis.conf's are (quotes and escapes).
    pub fn apply_file(&mut self, file: &Path, text: &str) -> Result<(), String> {
        for (number, line) in text.lines().enumerate() {
            let at = || format!("{}:{}", file.display(), number + 1);
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let words =
                resp::split_inline(line.as_bytes()).ok_or_else(|| format!("{}: unbalanced quotes", at()))?;
            let Some((name, args)) = words.split_first() else { continue };
            let name = String::from_utf8_lossy(name);
            self.set(&name, args).map_err(|why| format!("{}: {why}", at()))?;
        }
        Ok(())
    }

    /// Defaults, then the file `--config` names, then the flags given.
    pub fn resolve(options: &Options) -> Result<Config, String> {
        let mut config = Config::default();
        if let Some(file) = &options.config {
            let text =
                std::fs::read_to_string(file).map_err(|e| format!("reading {}: {e}", file.display()))?;
            config.apply_file(file, &text)?;
            config.file = Some(file.clone());
        }
        macro_rules! flag {
            ($field:ident) => {
                if let Some(value) = &options.$field {
                    config.$field = value.clone();
                }
            };
        }
        flag!(pool);
        flag!(bind);
        flag!(port);
        flag!(sync_ms);
        flag!(size);
        flag!(proto_max_bulk_len);
        flag!(client_query_buffer_limit);
        flag!(maxclients);
        flag!(timeout);
        if options.mode.is_some() {
            config.mode = options.mode;
        }
        if options.epoch_ms.is_some() {
            config.epoch_ms = options.epoch_ms;
        }
        if options.threads.is_some() {
            config.threads = options.threads;
        }
        if let Some(pass) = &options.requirepass {
            config.requirepass = password(pass.as_bytes());
        }
        if let Some(on) = &options.protected_mode {
            config.protected_mode = parse_bool(on)?;
        }
        Ok(config)
    }
}

/// The settings CONFIG SET may change while the server runs.
#[derive(Debug)]
pub struct Live {
    requirepass: RwLock<Option<Vec<u8>>>,
    /// `maxclients`.
    pub maxclients: AtomicU64,
    /// `timeout` in seconds (0: never); connections waiting for input watch it.
    pub timeout: tokio::sync::watch::Sender<u64>,
    /// `protected-mode`.
    pub protected_mode: AtomicBool,
}

impl Live {
    /// The runtime copy of `config`'s changeable settings.
    pub fn new(config: &Config) -> Live {
        Live {
            requirepass: RwLock::new(config.requirepass.clone()),
            maxclients: AtomicU64::new(config.maxclients),
            timeout: tokio::sync::watch::channel(config.timeout).0,
            protected_mode: AtomicBool::new(config.protected_mode),
        }
    }

    /// The password, if one is set.
    pub fn requirepass(&self) -> Option<Vec<u8>> {
        self.requirepass.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Whether clients must authenticate.
    pub fn password_set(&self) -> bool {
        self.requirepass.read().unwrap_or_else(|e| e.into_inner()).is_some()
    }

    /// Sets (`Some`) or removes (`None`) the password.
    pub fn set_requirepass(&self, password: Option<Vec<u8>>) {
        *self.requirepass.write().unwrap_or_else(|e| e.into_inner()) = password;
    }

    /// Whether `given` is the password (false when none is set). Compares every byte
    /// whatever the first difference, as Redis does.
    pub fn password_matches(&self, given: &[u8]) -> bool {
        let guard = self.requirepass.read().unwrap_or_else(|e| e.into_inner());
        let Some(password) = guard.as_deref() else { return false };
        let mut diff = u8::from(password.len() != given.len());
        for (i, &b) in password.iter().enumerate() {
            diff |= b ^ given.get(i).copied().unwrap_or(!b);
        }
        diff == 0
    }

    /// Whether a new client from `peer` must be refused by protected mode.
    pub fn denies(&self, peer: IpAddr) -> bool {
        protected_denies(self.protected_mode.load(Ordering::Relaxed), self.password_set(), peer)
    }
}

/// Protected mode's decision: with protected mode on and no password set, only loopback
/// clients are served (an IPv4 address mapped into IPv6 counts as what it maps).
pub fn protected_denies(protected_mode: bool, password_set: bool, peer: IpAddr) -> bool {
    let loopback = match peer {
        IpAddr::V4(v4) => v4.is_loopback(),
        IpAddr::V6(v6) => v6.is_loopback() || v6.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback()),
    };
    protected_mode && !password_set && !loopback
}

/// Redis's reply to a client refused by protected mode (the connection is then closed).
pub const DENIED: &str = "-DENIED Redis is running in protected mode because protected mode is enabled and no password is set for the default user. In this mode connections are only accepted from the loopback interface. If you want to connect from external computers to Redis you may adopt one of the following solutions: 1) Just disable protected mode sending the command 'CONFIG SET protected-mode no' from the loopback interface by connecting to Redis from the same host the server is running, however MAKE SURE Redis is not publicly accessible from internet if you do so. Use CONFIG REWRITE to make this change permanent. 2) Alternatively you can just disable the protected mode by editing the Redis configuration file, and setting the protected mode option to 'no', and then restarting the server. 3) If you started the server manually just for testing, restart it with the '--protected-mode no' option. 4) Set up an authentication password for the default user. NOTE: You only need to do one of the above things in order for the server to start accepting connections from the outside.\r\n";

/// Redis's reply to a client past `maxclients` (the connection is then closed).
pub const MAX_CLIENTS: &str = "-ERR max number of clients reached\r\n";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn protected_mode_refuses_only_non_loopback_clients_without_a_password() {
        let lan: IpAddr = "192.0.2.7".parse().unwrap();
        let lan6: IpAddr = "2001:db8::1".parse().unwrap();
        for local in ["127.0.0.1", "127.1.2.3", "::1", "::ffff:127.0.0.1"] {
            assert!(!protected_denies(true, false, local.parse().unwrap()), "{local}");
        }
        assert!(protected_denies(true, false, lan));
        assert!(protected_denies(true, false, lan6));
        assert!(protected_denies(true, false, "::ffff:192.0.2.7".parse().unwrap()));
        assert!(!protected_denies(true, true, lan), "a password lifts it");
        assert!(!protected_denies(false, false, lan), "protected-mode no lifts it");
    }

    #[test]
    fn sizes_follow_redis_units_and_the_command_line_s() {
        assert_eq!(parse_memory("1024").unwrap(), 1024);
        assert_eq!(parse_memory("1k").unwrap(), 1000);
        assert_eq!(parse_memory("1kb").unwrap(), 1024);
        assert_eq!(parse_memory("512MB").unwrap(), 512 << 20);
        assert_eq!(parse_memory("2g").unwrap(), 2_000_000_000);
        assert_eq!(parse_memory("1gb").unwrap(), 1 << 30);
        assert_eq!(parse_memory("64MiB").unwrap(), 64 << 20);
        assert!(parse_memory("lots").is_err());
    }

    #[test]
    fn a_config_file_sets_every_directive_and_names_its_bad_lines() {
        let mut config = Config::default();
        let text = "# a comment\n\nport 7000\nbind 0.0.0.0\nrequirepass \"two words\"\nMAXCLIENTS 5\n\
                    timeout 30\nprotected-mode no\nproto-max-bulk-len 1mb\nclient-query-buffer-limit 2mb\n\
                    pool 'my pool.pool'\nmode fams\nsync-ms 50\nsize 8mb\nthreads 3\n   # indented comment\n";
        config.apply_file(Path::new("x.conf"), text).unwrap();
        assert_eq!(config.port, 7000);
        assert_eq!(config.bind, "0.0.0.0");
        assert_eq!(config.requirepass.as_deref(), Some(&b"two words"[..]));
        assert_eq!(config.maxclients, 5);
        assert_eq!(config.timeout, 30);
        assert!(!config.protected_mode);
        assert_eq!(config.proto_max_bulk_len, 1 << 20);
        assert_eq!(config.client_query_buffer_limit, 2 << 20);
        assert_eq!(config.pool, PathBuf::from("my pool.pool"));
        assert_eq!(config.mode, Some(Mode::Fams));
        assert_eq!(config.sync_ms, 50);
        assert_eq!(config.size, 8 << 20);
        assert_eq!(config.threads, Some(3));
        config.apply_file(Path::new("x.conf"), "mode hybrid\nmode periodic\nepoch-ms 2.5\n").unwrap();
        assert_eq!((config.mode, config.epoch_ms), (Some(Mode::Periodic), Some(2.5)));
        config.apply_file(Path::new("x.conf"), "requirepass \"\"\n").unwrap();
        assert_eq!(config.requirepass, None, "an empty password is none");

        let bad = |text: &str| Config::default().apply_file(Path::new("/etc/n.conf"), text).unwrap_err();
        assert_eq!(bad("port 1\n# c\nsave 900 1\n"), "/etc/n.conf:3: unknown directive 'save'");
        assert_eq!(bad("port\n"), "/etc/n.conf:1: 'port' takes exactly one argument");
        assert_eq!(bad("port 1 2\n"), "/etc/n.conf:1: 'port' takes exactly one argument");
        assert_eq!(bad("\nport x\n"), "/etc/n.conf:2: 'x' is not a valid number");
        assert_eq!(bad("port 70000\n"), "/etc/n.conf:1: '70000' is not a valid number");
        assert_eq!(bad("protected-mode maybe\n"), "/etc/n.conf:1: argument must be 'yes' or 'no'");
        assert_eq!(
            bad("mode dali\n"),
            "/etc/n.conf:1: 'mode' is strict, fams, periodic or hybrid, not 'dali'"
        );
        assert_eq!(bad("epoch-ms 0\n"), "/etc/n.conf:1: 'epoch-ms' must be a positive number, not '0'");
        assert_eq!(bad("requirepass \"open\n"), "/etc/n.conf:1: unbalanced quotes");
        assert_eq!(bad("maxclients 0\n"), "/etc/n.conf:1: 'maxclients' must be at least 1");
        assert!(bad("bind 127.0.0.1 ::1\n").contains("takes one address"));
    }

    #[test]
    fn passwords_match_exactly() {
        let live = Live::new(&Config { requirepass: Some(b"secret".to_vec()), ..Config::default() });
        assert!(live.password_matches(b"secret"));
        for wrong in [&b""[..], b"secre", b"secret!", b"Secret", b"secreu"] {
            assert!(!live.password_matches(wrong), "{wrong:?}");
        }
        live.set_requirepass(None);
        assert!(!live.password_set() && !live.password_matches(b"secret") && !live.password_matches(b""));
    }
}
