//! `nvhtm serve`: a Redis-protocol server whose data lives in an nvhtm pool.
//!
//! The keyspace is one map in a pool file, whichever the pool holds ([`AnyMap`]): a
//! [`StrictMap`](nvhtm::StrictMap) in `strict` and `fams` mode, a
//! [`PeriodicMap`](nvhtm::periodic::PeriodicMap) in `periodic` mode, a
//! [`HybridMap`](nvhtm::hybrid::HybridMap) in `hybrid` mode. Commands run on tokio's worker
//! threads directly against the map (its operations are short and never await); a write is
//! answered only once the map has returned, which in `strict` and `hybrid` mode means once it
//! is durable, in `fams` mode once it is in the private state that the next sync commits, and
//! in `periodic` mode once it is in the current epoch, durable within about two epochs.
//!
//! Modules, one per command group: [`connection`] (the per-client task and PING, HELLO,
//! CLIENT...), [`strings`] (GET, SET, INCR...), [`keys`] (DEL, KEYS, SCAN...), [`expire`]
//! (EXPIRE, TTL... and the expiry sweep), [`transactions`] (MULTI, EXEC, WATCH...),
//! [`server`] (INFO, CONFIG, SAVE, SHUTDOWN...); [`db`] (the keyspace over the map: stored
//! values with their time to live, WATCH's versions) and [`resp`] (the protocol).

pub mod config;
pub mod connection;
pub mod db;
pub mod expire;
pub mod keys;
pub mod resp;
pub mod server;
pub mod strings;
pub mod transactions;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use nvhtm::any_map::{AnyMap, MapKind};
use nvhtm::periodic::{EpochPeriod, PeriodicOptions};
use nvhtm::pool::{PoolInfo, PoolOptions};
use nvhtm::{AutoDomain, Heap, MapError};
use tokio::sync::Notify;

use crate::commands::CommandResult;
use config::{Config, Live};
use resp::{Arg, Limits, Out};

/// How writes become durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// Every write is durable before it is answered: on a mapped pool the map persists each
    /// operation; on a FAMS pool the server commits the writes of every connection together
    /// (group commit) and answers each batch after the commit that covers it.
    Strict,
    /// A FAMS pool: writes reach the file atomically at each sync, every `--sync-ms`, at SAVE
    /// and at SHUTDOWN; a crash loses what came after the last completed sync.
    Fams,
    /// The periodic (Dalí) map on a mapped pool: a write is answered at once and is durable
    /// within about two epochs (`--epoch-ms`; the map's stored length by default), at
    /// SAVE/BGSAVE and at a clean shutdown; a crash keeps a prefix of the history.
    Periodic,
    /// The hybrid map on a mapped pool (a DRAM index over a persistent log): every write is
    /// durable before it is answered, at one group-committed fence (an msync on a file pool)
    /// shared by every writer that arrived meanwhile.
    Hybrid,
}

impl Mode {
    /// The name used on the command line and in INFO.
    pub fn name(self) -> &'static str {
        match self {
            Mode::Strict => "strict",
            Mode::Fams => "fams",
            Mode::Periodic => "periodic",
            Mode::Hybrid => "hybrid",
        }
    }

    /// The map the mode serves.
    pub fn map_kind(self) -> MapKind {
        match self {
            Mode::Strict | Mode::Fams => MapKind::Strict,
            Mode::Periodic => MapKind::Periodic,
            Mode::Hybrid => MapKind::Hybrid,
        }
    }
}

/// `nvhtm serve`'s options. Each overrides the same setting in the `--config` file; the
/// defaults apply to what neither sets.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct Options {
    /// A config file in redis.conf syntax (`port 6379`, `requirepass "pw"`, `# comments`):
    /// port, bind, requirepass, maxclients, timeout, protected-mode, proto-max-bulk-len,
    /// client-query-buffer-limit, and nvhtm's pool, mode, sync-ms, epoch-ms, size, threads.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// The pool file, created on first start [default: nvhtm-serve.pool].
    #[arg(long)]
    pub pool: Option<PathBuf>,
    /// Durability mode (an existing pool's own by default: the map it holds decides, and fams
    /// for a FAMS pool's strict map; a new pool is a FAMS pool with --mode fams, a mapped one
    /// otherwise; strict when neither says).
    #[arg(long, value_enum)]
    pub mode: Option<Mode>,
    /// Address to listen on [default: 127.0.0.1].
    #[arg(long)]
    pub bind: Option<String>,
    /// Port to listen on (0: any free port; the log line names it) [default: 6379].
    #[arg(long)]
    pub port: Option<u16>,
    /// FAMS mode: milliseconds between syncs [default: 1000].
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    pub sync_ms: Option<u64>,
    /// Periodic mode: the epoch length in milliseconds (recorded in a new map) [default: the
    /// map's stored length].
    #[arg(long, value_parser = parse_epoch_ms)]
    pub epoch_ms: Option<f64>,
    /// Size of a new pool (it grows on demand), e.g. 64MiB [default: 64MiB].
    #[arg(long, value_parser = crate::format::parse_size)]
    pub size: Option<u64>,
    /// The longest bulk string a request may hold (Redis's proto-max-bulk-len)
    /// [default: 512MiB].
    #[arg(long, value_parser = crate::format::parse_size)]
    pub proto_max_bulk_len: Option<u64>,
    /// The most unparsed bytes one client may have buffered (Redis's
    /// client-query-buffer-limit); a client past it is disconnected [default: 1GiB].
    #[arg(long, value_parser = crate::format::parse_size)]
    pub client_query_buffer_limit: Option<u64>,
    /// Worker threads (default: one per CPU).
    #[arg(long)]
    pub threads: Option<usize>,
    /// The password clients must give (AUTH, HELLO ... AUTH); empty: none [default: none].
    #[arg(long)]
    pub requirepass: Option<String>,
    /// The most clients connected at once; one more is answered
    /// `-ERR max number of clients reached` and closed [default: 10000].
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    pub maxclients: Option<u64>,
    /// Seconds after which an idle client is disconnected (0: never) [default: 0].
    #[arg(long)]
    pub timeout: Option<u64>,
    /// yes: while no password is set, clients from addresses other than loopback are
    /// refused (Redis's protected mode) [default: yes].
    #[arg(long, value_parser = ["yes", "no"])]
    pub protected_mode: Option<String>,
}

/// What a command handler returns when it succeeds: what the connection does next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    /// Read the next request.
    Continue,
    /// Send the replies so far and close the connection (QUIT).
    Close,
}

/// An error reply: the full text after `-`, starting with its code (`ERR ...`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CmdError(pub String);

impl CmdError {
    /// `ERR syntax error`.
    pub fn syntax() -> CmdError {
        CmdError("ERR syntax error".into())
    }

    /// `ERR value is not an integer or out of range`.
    pub fn not_integer() -> CmdError {
        CmdError("ERR value is not an integer or out of range".into())
    }
}

impl From<&str> for CmdError {
    fn from(text: &str) -> CmdError {
        CmdError(text.to_string())
    }
}

impl From<MapError> for CmdError {
    fn from(e: MapError) -> CmdError {
        CmdError(format!("ERR {e}"))
    }
}

/// A handler's result.
pub type CmdResult = Result<Flow, CmdError>;

/// What a command needs of the keyspace gate (see [`Shared::keyspace`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Touches no key.
    None,
    /// Reads or writes keys one operation at a time: shares the keyspace.
    Shared,
    /// Writes several keys that other clients must see change together: the keyspace alone.
    Exclusive,
    /// Exclusive with more than one key argument (DEL, UNLINK), shared otherwise.
    ExclusiveIfSeveral,
}

/// One command: its name, Redis's arity (n: exactly n words with the name; -n: at least n),
/// whether it writes, and what it needs of the keyspace.
#[derive(Debug)]
pub struct Spec {
    /// Lower-case name.
    pub name: &'static str,
    /// Redis's arity convention.
    pub arity: i32,
    /// Whether it changes the data (refused once the pool is poisoned).
    pub write: bool,
    /// Its use of the keyspace gate.
    pub access: Access,
    /// The handler.
    pub run: fn(&mut Ctx<'_>, &[Arg<'_>]) -> CmdResult,
}

impl Spec {
    /// Whether a client that has not authenticated may run it (Redis's `no-auth` flag).
    pub fn no_auth(&self) -> bool {
        matches!(self.name, "auth" | "hello" | "quit" | "reset")
    }
}

/// What a handler works with.
#[derive(Debug)]
pub struct Ctx<'a> {
    /// The server.
    pub shared: &'a Shared,
    /// This client.
    pub client: &'a mut Client,
    /// Its reply buffer.
    pub out: &'a mut Out,
}

/// One connected client's state.
#[derive(Debug)]
pub struct Client {
    /// The id CLIENT ID reports (unique in this server's life).
    pub id: u64,
    /// Whether a command since the last commit touched the keyspace (group commit: its
    /// replies wait for a commit that began after it).
    pub touched: bool,
    /// The name CLIENT SETNAME gave it.
    pub name: Option<Vec<u8>>,
    /// The peer address.
    pub addr: SocketAddr,
    /// Whether it may run commands: it connected while no password was set, or has given it
    /// (AUTH, HELLO ... AUTH) since.
    pub authenticated: bool,
    /// The transaction it is queueing, after MULTI.
    pub multi: Option<transactions::Multi>,
    /// The keys it WATCHes, with their versions then.
    pub watched: Vec<db::Watched>,
    /// The command it ran last (CLIENT LIST's `cmd`).
    pub last_cmd: &'static str,
    /// What CLIENT LIST shows of it.
    pub entry: Arc<connection::ClientEntry>,
}

impl Client {
    /// A newly connected client.
    pub fn new(id: u64, addr: SocketAddr, authenticated: bool) -> Client {
        Client {
            id,
            touched: false,
            name: None,
            addr,
            authenticated,
            multi: None,
            watched: Vec::new(),
            last_cmd: "NULL",
            entry: Arc::new(connection::ClientEntry::new(id, addr)),
        }
    }

    /// Names it (`None`: no name), for CLIENT GETNAME and CLIENT LIST.
    pub fn set_name(&mut self, name: Option<Vec<u8>>) {
        self.entry.details().name.clone_from(&name);
        self.name = name;
    }
}

/// A hold on the keyspace gate, shared or alone.
#[derive(Debug)]
enum KeyspaceGuard<'a> {
    Shared { _held: RwLockReadGuard<'a, ()> },
    Alone { _held: RwLockWriteGuard<'a, ()> },
}

/// Both gates, from [`Shared::enter_both`]; released together when dropped (the keyspace
/// gate first: fields drop in declaration order).
#[derive(Debug)]
pub struct Gates<'a> {
    _keyspace: KeyspaceGuard<'a>,
    _writer: nvhtm::pool::WriterGuard<'a>,
}

/// The server's state, shared by every connection.
#[derive(Debug)]
pub struct Shared {
    /// The keyspace: the map, WATCH's versions, the expiry index.
    pub db: db::Db,
    /// The keyspace gate: single-key commands share it, multi-key writes (MSET, MSETNX, DEL of
    /// several keys, FLUSHDB) and EXEC hold it alone, so no client sees such a command half
    /// done. In
    /// FAMS mode the exclusive holders also hold the pool's writer gate, so no sync commits
    /// half of one either.
    keyspace: RwLock<()>,
    /// Its settings, as started.
    pub config: Config,
    /// The settings CONFIG SET changes.
    pub live: Live,
    /// The mode in effect.
    pub mode: Mode,
    /// The pool's persistence domain, in words.
    pub domain: String,
    /// The address it listens on.
    pub addr: OnceLock<SocketAddr>,
    /// Protocol limits.
    pub limits: Limits,
    /// When it started.
    pub started: Instant,
    /// Keys found in the pool at start.
    pub keys_recovered: u64,
    /// Time to open the pool, heap and map at start.
    pub recovery: Duration,
    /// The last client id handed out.
    pub next_client_id: AtomicU64,
    /// The clients connected now, by id (CLIENT LIST).
    pub registry: std::sync::Mutex<std::collections::BTreeMap<u64, Arc<connection::ClientEntry>>>,
    /// Clients connected now.
    pub clients: AtomicU64,
    /// Connections accepted since start.
    pub connections_received: AtomicU64,
    /// Connections refused since start (maxclients).
    pub rejected_connections: AtomicU64,
    /// Commands processed since start.
    pub commands_processed: AtomicU64,
    /// Unix time of the last successful sync (SAVE, FAMS timer) or of the start.
    pub last_save: AtomicU64,
    /// Syncs that succeeded since start.
    pub syncs: AtomicU64,
    /// Why the pool is poisoned, once a sync failed: writes are refused from then on.
    pub poisoned: OnceLock<String>,
    /// Set when SHUTDOWN, SIGTERM or SIGINT asked the server to stop.
    pub stopping: AtomicBool,
    /// Wakes the accept loop to stop.
    pub stop: Notify,
    /// Wakes the background saver (BGSAVE).
    pub bgsave: Notify,
    /// Per-run hash keys for SCAN's cursors.
    pub scan_hasher: std::hash::RandomState,
    /// Strict mode on a FAMS pool: the group commit.
    pub group: Option<GroupCommit>,
    /// Hybrid mode on an ordinary file (the Msync domain): a write command blocks its thread
    /// on the map's group-committed msync, so it runs in `block_in_place` and the worker's
    /// other connections move to another thread meanwhile. Their writes then join the same
    /// group commit instead of waiting behind it (without this, at most one write per worker
    /// thread could be waiting for a commit at any time).
    pub blocking_writes: bool,
}

/// Strict mode on a FAMS pool: a committer task runs one pool sync at a time; a connection
/// whose batch touched the keyspace waits, before it sends the batch's replies, for a commit
/// that *began* after the batch ran. Every write and every read of a not-yet-committed write
/// arriving while a commit runs is covered by the next one, so one sync serves every
/// connection that was waiting: the writes of all connections are committed together.
///
/// Reads wait too, when a write is not yet committed: a value another client wrote is in
/// memory before it is committed, and a reader answered before the commit could see a write
/// that a crash then loses. A batch that finds every write committed waits for nothing.
#[derive(Debug)]
pub struct GroupCommit {
    /// Commits begun (the number of the latest).
    pub begun: AtomicU64,
    /// Write commands begun, each counted inside the pool's writer gate before it writes.
    pub writes: AtomicU64,
    /// Of [`writes`](Self::writes), how many the last completed commit covers: the count read
    /// before that commit began. A write counted by then was either done or inside the
    /// writer gate, which the commit waits for; a write not yet counted had not written.
    pub committed: AtomicU64,
    /// The number of the latest completed commit.
    pub done: tokio::sync::watch::Sender<u64>,
    /// Wakes the committer.
    pub wake: Notify,
}

impl GroupCommit {
    /// Waits until every keyspace access this task made so far is committed. `Err` when a
    /// commit failed: the pool is poisoned and the replies must not be sent.
    pub async fn covered(&self, shared: &Shared) -> Result<(), String> {
        if self.writes.load(Ordering::SeqCst) == self.committed.load(Ordering::SeqCst) {
            // Every write so far, whatever this task wrote or read, is committed.
            return match shared.poisoned.get() {
                Some(why) => Err(why.clone()),
                None => Ok(()),
            };
        }
        // A commit numbered past what has begun by now begins after this task's accesses.
        let need = self.begun.load(Ordering::SeqCst) + 1;
        let mut done = self.done.subscribe();
        self.wake.notify_one();
        let waited = done.wait_for(|&n| n >= need).await.map(|_| ());
        match (shared.poisoned.get(), waited) {
            (Some(why), _) => Err(why.clone()),
            (None, Ok(())) => Ok(()),
            (None, Err(_)) => Err("the committer stopped".into()),
        }
    }
}

/// Seconds since the epoch.
pub fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

impl Shared {
    /// A server over `map` (recovered in `recovery`, holding `keys_recovered` keys).
    pub fn new(
        map: AnyMap<AutoDomain>,
        config: Config,
        mode: Mode,
        recovery: Duration,
    ) -> Result<Shared, MapError> {
        let keys_recovered = map.len()?;
        let info = map.heap().pool().info();
        let fams = info.fams;
        // A FAMS pool's stores go to private memory (a volatile domain); its commits are syncs.
        let domain = if fams { "fams".to_string() } else { info.domain.to_string() };
        let limits = Limits { max_bulk: config.proto_max_bulk_len, ..Limits::default() };
        Ok(Shared {
            db: db::Db::new(map),
            keyspace: RwLock::new(()),
            live: Live::new(&config),
            config,
            mode,
            domain,
            addr: OnceLock::new(),
            limits,
            started: Instant::now(),
            keys_recovered,
            recovery,
            next_client_id: AtomicU64::new(0),
            registry: std::sync::Mutex::new(std::collections::BTreeMap::new()),
            clients: AtomicU64::new(0),
            connections_received: AtomicU64::new(0),
            rejected_connections: AtomicU64::new(0),
            commands_processed: AtomicU64::new(0),
            last_save: AtomicU64::new(unix_now()),
            syncs: AtomicU64::new(0),
            poisoned: OnceLock::new(),
            stopping: AtomicBool::new(false),
            stop: Notify::new(),
            bgsave: Notify::new(),
            scan_hasher: std::hash::RandomState::new(),
            blocking_writes: mode == Mode::Hybrid && info.domain == nvhtm::persist::DomainKind::Msync,
            group: (mode == Mode::Strict && fams).then(|| GroupCommit {
                begun: AtomicU64::new(0),
                writes: AtomicU64::new(0),
                committed: AtomicU64::new(0),
                done: tokio::sync::watch::channel(0).0,
                wake: Notify::new(),
            }),
        })
    }

    /// The keyspace gate, shared.
    pub fn keyspace_shared(&self) -> RwLockReadGuard<'_, ()> {
        self.keyspace.read().unwrap_or_else(|e| e.into_inner())
    }

    /// The keyspace gate, alone.
    pub fn keyspace_alone(&self) -> RwLockWriteGuard<'_, ()> {
        self.keyspace.write().unwrap_or_else(|e| e.into_inner())
    }

    /// The keyspace gate (alone, or shared) and the pool's writer gate, taken in the order
    /// every path takes them, which differs by mode: with group commit a write enters the
    /// writer gate before the keyspace gate (it is counted inside it); without, map writes
    /// enter the writer gate inside the keyspace gate. A path that took them the other way
    /// could wait for a holder of one gate that waits, behind a pending FAMS sync, for the
    /// other (std's `RwLock` queues new readers behind a waiting writer).
    pub fn enter_both(&self, alone: bool) -> Gates<'_> {
        let pool = self.db.map.heap().pool();
        let keyspace = || {
            if alone {
                KeyspaceGuard::Alone { _held: self.keyspace_alone() }
            } else {
                KeyspaceGuard::Shared { _held: self.keyspace_shared() }
            }
        };
        if self.group.is_some() {
            let writer = pool.enter_writer();
            Gates { _keyspace: keyspace(), _writer: writer }
        } else {
            let keyspace = keyspace();
            Gates { _keyspace: keyspace, _writer: pool.enter_writer() }
        }
    }

    /// Makes every write so far durable (a FAMS commit; an msync of the mapping in strict
    /// mode; the periodic map's `sync`, which persists the current epoch; nothing in hybrid
    /// mode, whose writes are durable when answered). A failure poisons the server: writes
    /// are refused from then on. Blocking: call it off the async workers.
    pub fn sync(&self) -> Result<(), String> {
        if let Some(why) = self.poisoned.get() {
            return Err(why.clone());
        }
        let synced = match self.mode {
            Mode::Strict | Mode::Fams => self.db.map.heap().pool().sync().map_err(|e| e.to_string()),
            Mode::Periodic | Mode::Hybrid => self.db.map.sync().map_err(|e| e.to_string()),
        };
        match synced {
            Ok(()) => {
                self.syncs.fetch_add(1, Ordering::Relaxed);
                self.last_save.store(unix_now(), Ordering::Relaxed);
                Ok(())
            }
            Err(why) => {
                let _ = self.poisoned.set(why.clone());
                tracing::error!(error = %why, "sync failed: the pool is poisoned, writes are refused until a restart");
                Err(why)
            }
        }
    }

    /// Asks the server to stop (SHUTDOWN, signals).
    pub fn request_stop(&self) {
        self.stopping.store(true, Ordering::SeqCst);
        self.stop.notify_one();
    }
}

/// Every command, by group.
pub fn lookup(name: &[u8]) -> Option<&'static Spec> {
    [
        connection::COMMANDS,
        strings::COMMANDS,
        keys::COMMANDS,
        expire::COMMANDS,
        transactions::COMMANDS,
        server::COMMANDS,
    ]
    .into_iter()
    .flatten()
    .find(|spec| spec.name.as_bytes().eq_ignore_ascii_case(name))
}

/// How many commands the server knows (COMMAND COUNT).
pub fn command_count() -> usize {
    connection::COMMANDS.len()
        + strings::COMMANDS.len()
        + keys::COMMANDS.len()
        + expire::COMMANDS.len()
        + transactions::COMMANDS.len()
        + server::COMMANDS.len()
}

/// Redis's text for an unknown command: the name and the start of its arguments, quoted.
fn unknown_command(args: &[Arg<'_>]) -> CmdError {
    let mut list = String::new();
    for arg in &args[1..] {
        if list.len() >= 128 {
            break;
        }
        let text = String::from_utf8_lossy(arg);
        let room = 128 - list.len();
        list.push('\'');
        list.extend(text.chars().take(room));
        list.push_str("' ");
    }
    let name: String = String::from_utf8_lossy(&args[0]).chars().take(128).collect();
    CmdError(format!("ERR unknown command '{name}', with args beginning with: {list}"))
}

/// `ERR wrong number of arguments for 'NAME' command`.
pub fn wrong_arity(name: &str) -> CmdError {
    CmdError(format!("ERR wrong number of arguments for '{name}' command"))
}

/// Runs one request (non-empty `args`), writing its reply.
pub fn dispatch(ctx: &mut Ctx<'_>, args: &[Arg<'_>]) -> Flow {
    ctx.shared.commands_processed.fetch_add(1, Ordering::Relaxed);
    let flow = match run(ctx, args) {
        Ok(flow) => flow,
        Err(CmdError(text)) => {
            ctx.out.error(&text);
            Flow::Continue
        }
    };
    let client = &*ctx.client;
    let mut details = client.entry.details();
    details.last_cmd = client.last_cmd;
    details.last_active = Instant::now();
    details.multi = client.multi.as_ref().map_or(-1, |m| m.queued.len() as i64);
    details.watching = client.watched.len();
    details.resp3 = ctx.out.resp3();
    flow
}

/// The `-MISCONF` error of a write refused because the pool is poisoned.
pub fn misconf(why: &str) -> CmdError {
    CmdError(format!(
        "MISCONF the pool could not be made durable ({why}); writes are refused until the server restarts"
    ))
}

/// The checks before a command runs or is queued, in Redis's order: known, arity,
/// authenticated, allowed in a transaction, not a write to a poisoned pool.
fn check(ctx: &mut Ctx<'_>, args: &[Arg<'_>]) -> Result<&'static Spec, CmdError> {
    let Some(spec) = lookup(&args[0]) else {
        return Err(unknown_command(args));
    };
    ctx.client.last_cmd = spec.name;
    let n = args.len() as i64;
    let arity = i64::from(spec.arity);
    if (arity >= 0 && n != arity) || (arity < 0 && n < -arity) {
        return Err(wrong_arity(spec.name));
    }
    // As in Redis: unknown commands and wrong arity are answered first, then authentication.
    if !ctx.client.authenticated && !spec.no_auth() && ctx.shared.live.password_set() {
        return Err("NOAUTH Authentication required.".into());
    }
    if ctx.client.multi.is_some() && transactions::refused_inside_multi(spec) {
        return Err("ERR Command not allowed inside a transaction".into());
    }
    if spec.write {
        if let Some(why) = ctx.shared.poisoned.get() {
            return Err(misconf(why));
        }
    }
    Ok(spec)
}

fn run(ctx: &mut Ctx<'_>, args: &[Arg<'_>]) -> CmdResult {
    let spec = match check(ctx, args) {
        Ok(spec) => spec,
        Err(e) => {
            // A command refused while a transaction is queued dooms it.
            if let Some(multi) = &mut ctx.client.multi {
                multi.failed = true;
            }
            return Err(e);
        }
    };
    if let Some(multi) = &mut ctx.client.multi {
        if !transactions::runs_inside_multi(spec) {
            multi.queued.push(args.iter().map(|a| a.to_vec()).collect());
            ctx.out.simple("QUEUED");
            return Ok(Flow::Continue);
        }
    }
    if spec.access != Access::None {
        ctx.client.touched = true;
    }
    // Group commit: counted inside the writer gate, so a commit covers every write it counts.
    let pool = ctx.shared.db.map.heap().pool();
    let _counted = match &ctx.shared.group {
        Some(group) if spec.write => {
            let writer = pool.enter_writer();
            group.writes.fetch_add(1, Ordering::SeqCst);
            Some(writer)
        }
        _ => None,
    };
    if spec.write && ctx.shared.blocking_writes {
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            if handle.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread {
                return tokio::task::block_in_place(|| run_spec(ctx, spec, args));
            }
        }
    }
    run_spec(ctx, spec, args)
}

/// Runs a checked command under the keyspace gate it needs.
fn run_spec(ctx: &mut Ctx<'_>, spec: &'static Spec, args: &[Arg<'_>]) -> CmdResult {
    let alone = match spec.access {
        Access::None => return (spec.run)(ctx, args),
        Access::Shared => false,
        Access::Exclusive => true,
        Access::ExclusiveIfSeveral => args.len() > 2,
    };
    if alone {
        let shared = ctx.shared;
        let _keyspace = shared.keyspace_alone();
        // FAMS: no sync between the keys of one command (re-entered by each map write).
        let _writer = shared.db.map.heap().pool().enter_writer();
        (spec.run)(ctx, args)
    } else {
        let _keyspace = ctx.shared.keyspace_shared();
        (spec.run)(ctx, args)
    }
}

/// Parses an integer argument (`ERR value is not an integer or out of range`).
pub fn int_arg(arg: &[u8]) -> Result<i64, CmdError> {
    resp::parse_i64(arg).ok_or_else(CmdError::not_integer)
}

/// Parses `--epoch-ms`: a positive number of milliseconds.
fn parse_epoch_ms(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(ms) if ms.is_finite() && ms > 0.0 => Ok(ms),
        _ => Err(format!("'{text}' is not a positive number of milliseconds")),
    }
}

/// The mode an existing pool is served in, from the map its root holds (`None`: no map yet)
/// and whether it is a FAMS pool, checked against the mode asked for (`None`: the pool's
/// own). An error names the pool's map and the mode asked for.
pub fn pool_mode(
    path: &Path,
    kind: Option<MapKind>,
    fams: bool,
    asked: Option<Mode>,
) -> Result<Mode, String> {
    let pool = path.display();
    if fams && matches!(asked, Some(Mode::Periodic | Mode::Hybrid)) {
        let asked = asked.map_or("", Mode::name);
        return Err(format!(
            "{pool} is a FAMS pool; it cannot be served in {asked} mode, which needs a mapped pool (start without --mode, or use another --pool)"
        ));
    }
    if asked == Some(Mode::Fams) && !fams {
        return Err(format!(
            "{pool} is a mapped pool, not a FAMS pool; it cannot be served in fams mode (start without --mode, or use another --pool)"
        ));
    }
    let own = match kind {
        Some(MapKind::Periodic) => Some(Mode::Periodic),
        Some(MapKind::Hybrid) => Some(Mode::Hybrid),
        Some(MapKind::Strict) | None if fams => Some(Mode::Fams),
        Some(MapKind::Strict) => Some(Mode::Strict),
        None => None,
    };
    match (kind, asked) {
        (Some(kind), Some(asked)) if asked.map_kind() != kind => Err(format!(
            "{pool} holds a {kind} map; it cannot be served in {} mode, which serves a {} map (start without --mode to serve it in {} mode, or use another --pool)",
            asked.name(),
            asked.map_kind(),
            own.map_or("its own", Mode::name),
        )),
        _ => Ok(asked.or(own).unwrap_or(Mode::Strict)),
    }
}

/// Opens the pool at `path` (creating it when absent) and its map, in `mode` (the pool's own
/// when `None`; an existing pool's map decides, see [`pool_mode`]). `epoch_ms`: the periodic
/// map's epoch length, if not its stored one.
pub fn open_map(
    path: &Path,
    mode: Option<Mode>,
    size: u64,
    epoch_ms: Option<f64>,
) -> Result<(AnyMap<AutoDomain>, Mode), Box<dyn std::error::Error>> {
    let opts = PoolOptions::default().with_size(size);
    let (heap, mode) = if path.exists() {
        let fams = PoolInfo::read(path)?.fams;
        if mode == Some(Mode::Fams) && !fams {
            // Checked before opening (the same error `pool_mode` gives).
            return Err(pool_mode(path, None, fams, mode).expect_err("a mapped pool in fams mode").into());
        }
        let heap = Heap::load(crate::commands::open_pool(path, &opts)?)?;
        let mode = pool_mode(path, MapKind::of(&heap)?, fams, mode)?;
        (heap, mode)
    } else {
        match mode.unwrap_or(Mode::Strict) {
            Mode::Fams => (Heap::<AutoDomain>::create_fams(path, &opts)?, Mode::Fams),
            mode => (Heap::<AutoDomain>::create(path, &opts)?, mode),
        }
    };
    let periodic = PeriodicOptions {
        epoch: epoch_ms
            .map_or(EpochPeriod::Stored, |ms| EpochPeriod::Every(nvhtm::any_map::epoch_from_ms(ms))),
        ..PeriodicOptions::default()
    };
    Ok((AnyMap::open(heap, mode.map_kind(), periodic)?, mode))
}

/// `nvhtm serve`.
pub fn serve(options: Options) -> CommandResult {
    let options = Config::resolve(&options)?;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Fails only if a subscriber is already installed, which then logs for us.
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).try_init();

    let begun = Instant::now();
    let (map, mode) = open_map(&options.pool, options.mode, options.size, options.epoch_ms)?;
    let recovery = begun.elapsed();
    let shared = Arc::new(Shared::new(map, options.clone(), mode, recovery)?);

    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    if let Some(threads) = options.threads {
        runtime.worker_threads(threads.max(1));
    }
    let runtime = runtime.enable_all().build()?;
    let served = runtime.block_on(server::listen(Arc::clone(&shared)));
    // Dropping the runtime drops every connection task at its next await (a command runs
    // between awaits, so none is cut in the middle) and waits for blocking syncs.
    drop(runtime);
    let shared = Arc::into_inner(shared).ok_or("a connection outlived the server")?;
    let closed = shared.db.map.close();
    served?;
    match closed {
        Ok(()) => {
            tracing::info!(pool = %options.pool.display(), "pool closed cleanly; bye");
            Ok(())
        }
        Err(e) => Err(format!("closing {}: {e}", options.pool.display()).into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;
    use nvhtm::Volatile;

    #[derive(Parser)]
    struct Args {
        #[command(flatten)]
        options: Options,
    }

    fn server() -> Shared {
        let opts = PoolOptions::layout("serve-test").with_size(8 << 20);
        let heap = Heap::create_in_memory(&opts, AutoDomain::Volatile(Volatile)).unwrap();
        let config = Config::resolve(&Args::parse_from(["test"]).options).unwrap();
        let map = AnyMap::open(heap, MapKind::Strict, PeriodicOptions::manual()).unwrap();
        Shared::new(map, config, Mode::Strict, Duration::ZERO).unwrap()
    }

    /// Runs one command; its reply's bytes.
    fn exec(shared: &Shared, args: &[&str]) -> String {
        let mut client = Client::new(1, "127.0.0.1:1".parse().unwrap(), true);
        let mut out = Out::new();
        let args: Vec<Arg<'_>> = args.iter().map(|a| Arg::Borrowed(a.as_bytes())).collect();
        let flow = dispatch(&mut Ctx { shared, client: &mut client, out: &mut out }, &args);
        assert_eq!(flow, Flow::Continue);
        String::from_utf8(out.bytes().to_vec()).unwrap()
    }

    #[test]
    fn a_poisoned_server_refuses_writes_and_still_answers_reads() {
        let shared = server();
        assert_eq!(exec(&shared, &["SET", "k", "v"]), "+OK\r\n");
        shared.poisoned.set("fsync failed: EIO".into()).unwrap();
        for write in
            [&["SET", "k", "w"][..], &["INCR", "n"], &["DEL", "k"], &["MSET", "a", "1"], &["FLUSHDB"]]
        {
            let reply = exec(&shared, write);
            assert!(
                reply.starts_with("-MISCONF the pool could not be made durable (fsync failed: EIO)"),
                "{write:?}: {reply}"
            );
        }
        assert_eq!(exec(&shared, &["GET", "k"]), "$1\r\nv\r\n", "nothing was written");
        assert_eq!(exec(&shared, &["DBSIZE"]), ":1\r\n");
        assert!(exec(&shared, &["SAVE"]).starts_with("-ERR the pool could not be synced: fsync failed: EIO"));
        assert!(exec(&shared, &["INFO", "persistence"]).contains("nvhtm_poisoned:fsync failed: EIO\r\n"));
    }

    #[test]
    fn the_pool_s_map_decides_the_mode() {
        let p = Path::new("p.pool");
        let (s, pe, h) = (Some(MapKind::Strict), Some(MapKind::Periodic), Some(MapKind::Hybrid));
        // The pool's own, when no mode is asked for.
        assert_eq!(pool_mode(p, None, false, None), Ok(Mode::Strict));
        assert_eq!(pool_mode(p, None, true, None), Ok(Mode::Fams));
        assert_eq!(pool_mode(p, s, false, None), Ok(Mode::Strict));
        assert_eq!(pool_mode(p, s, true, None), Ok(Mode::Fams));
        assert_eq!(pool_mode(p, pe, false, None), Ok(Mode::Periodic));
        assert_eq!(pool_mode(p, h, false, None), Ok(Mode::Hybrid));
        // A mode that agrees; any, for a mapped pool without a map yet.
        assert_eq!(pool_mode(p, s, true, Some(Mode::Strict)), Ok(Mode::Strict));
        assert_eq!(pool_mode(p, h, false, Some(Mode::Hybrid)), Ok(Mode::Hybrid));
        assert_eq!(pool_mode(p, None, false, Some(Mode::Periodic)), Ok(Mode::Periodic));
        // One that contradicts the pool names both.
        let refused = pool_mode(p, h, false, Some(Mode::Strict)).unwrap_err();
        assert!(
            refused.starts_with("p.pool holds a hybrid map; it cannot be served in strict mode"),
            "{refused}"
        );
        assert!(refused.contains("to serve it in hybrid mode"), "{refused}");
        assert!(pool_mode(p, pe, false, Some(Mode::Hybrid)).is_err());
        assert!(pool_mode(p, s, false, Some(Mode::Periodic)).is_err());
        assert!(pool_mode(p, None, true, Some(Mode::Hybrid)).unwrap_err().contains("is a FAMS pool"));
        assert!(pool_mode(p, s, false, Some(Mode::Fams)).unwrap_err().contains("not a FAMS pool"));
    }

    #[test]
    fn arity_is_checked_before_a_handler_runs() {
        let shared = server();
        assert_eq!(exec(&shared, &["SET", "k"]), "-ERR wrong number of arguments for 'set' command\r\n");
        assert_eq!(
            exec(&shared, &["DBSIZE", "x"]),
            "-ERR wrong number of arguments for 'dbsize' command\r\n"
        );
        assert_eq!(
            exec(&shared, &["MSETNX", "a", "1", "b"]),
            "-ERR wrong number of arguments for 'msetnx' command\r\n"
        );
        assert_eq!(exec(&shared, &["DBSIZE"]), ":0\r\n");
        let long = "x".repeat(300);
        let reply = exec(&shared, &["nope", &long, "more"]);
        assert!(reply.starts_with("-ERR unknown command 'nope', with args beginning with: 'xxx"), "{reply}");
        assert!(reply.len() < 200, "the arguments quoted are cut at 128 bytes: {reply}");
    }
}
