//! One client's connection, and the connection commands: PING, ECHO, HELLO, AUTH, SELECT,
//! QUIT, RESET, CLIENT, COMMAND.
//!
//! The task reads into a buffer, answers every complete request in it (pipelining: a batch of
//! requests costs one read and one write), writes the replies, and reads again. A client that
//! breaks the protocol gets `-ERR Protocol error: ...` and is disconnected; nothing else is
//! affected.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::resp::{self, Arg, Out, Parsed};
use super::server;
use super::{dispatch, int_arg, wrong_arity, Access, Client, CmdError, CmdResult, Ctx, Flow, Shared, Spec};

/// Replies past this size are sent before the rest of a batch is answered, so a long
/// pipeline of reads does not pile up its replies in memory.
const SEND_AT: usize = 64 * 1024;

/// Serves one client until it leaves, breaks the protocol, stays idle past `timeout`, or the
/// server stops. The accept loop has counted it in [`Shared::clients`]; this uncounts it.
pub async fn serve_client(shared: Arc<Shared>, mut stream: TcpStream, addr: std::net::SocketAddr) {
    let _ = stream.set_nodelay(true);
    let id = shared.next_client_id.fetch_add(1, Ordering::Relaxed) + 1;
    // As in Redis: a client that connects while no password is set needs none later.
    let authenticated = !shared.live.password_set();
    let mut client = Client::new(id, addr, authenticated);
    client.entry.details().fd = std::os::fd::AsRawFd::as_raw_fd(&stream);
    shared.registry.lock().unwrap_or_else(|e| e.into_inner()).insert(id, Arc::clone(&client.entry));
    if let Err(e) = run(&shared, &mut stream, &mut client).await {
        tracing::debug!(client = id, %addr, error = %e, "connection ended");
    }
    shared.registry.lock().unwrap_or_else(|e| e.into_inner()).remove(&id);
    shared.clients.fetch_sub(1, Ordering::SeqCst);
}

async fn run(shared: &Shared, stream: &mut TcpStream, client: &mut Client) -> std::io::Result<()> {
    let mut input: Vec<u8> = Vec::with_capacity(16 * 1024);
    let mut out = Out::new();
    let limit = usize::try_from(shared.config.client_query_buffer_limit).unwrap_or(usize::MAX);
    let mut idle = shared.live.timeout.subscribe();
    loop {
        let mut used = 0;
        let mut flow = Flow::Continue;
        let mut need = 0;
        while flow == Flow::Continue {
            match resp::parse(&input[used..], &shared.limits) {
                Ok(Parsed::Incomplete(n)) => {
                    need = n;
                    break;
                }
                Ok(Parsed::Request { args, len }) => {
                    used += len;
                    if args.is_empty() {
                        continue;
                    }
                    if is_http(&args[0]) {
                        tracing::warn!(client = client.id, addr = %client.addr, "HTTP request on the Redis port: closing the connection");
                        return Ok(());
                    }
                    let mut ctx = Ctx { shared, client: &mut *client, out: &mut out };
                    flow = dispatch(&mut ctx, &args);
                }
                Err(resp::ProtocolError(why)) => {
                    out.error(&format!("ERR Protocol error: {why}"));
                    flow = Flow::Close;
                    tracing::debug!(client = client.id, addr = %client.addr, %why, "protocol error");
                }
            }
            if out.len() >= SEND_AT {
                send(shared, client, stream, &mut out).await?;
            }
        }
        input.drain(..used);
        if !out.is_empty() {
            send(shared, client, stream, &mut out).await?;
        }
        if flow == Flow::Close {
            stream.flush().await?;
            return Ok(());
        }
        if input.len() >= limit {
            tracing::warn!(client = client.id, addr = %client.addr, buffered = input.len(), "client-query-buffer-limit reached: closing the connection");
            return Ok(());
        }
        // A bulk string whose length is known is read into room reserved once.
        let want = need.min(limit);
        if want > input.len() {
            input.reserve(want - input.len());
        } else if input.capacity() - input.len() < 4096 {
            input.reserve(16 * 1024);
        }
        match read_or_idle(stream, &mut input, &mut idle).await? {
            Some(0) => return Ok(()),
            Some(_) => {}
            None => {
                tracing::debug!(client = client.id, addr = %client.addr, "idle past the timeout: closing the connection");
                return Ok(());
            }
        }
    }
}

/// Reads more input; `None` when the client stayed idle past the `timeout` setting (watched:
/// CONFIG SET timeout applies to a wait already begun, counted from its start).
async fn read_or_idle(
    stream: &mut TcpStream,
    input: &mut Vec<u8>,
    idle: &mut tokio::sync::watch::Receiver<u64>,
) -> std::io::Result<Option<usize>> {
    let since = tokio::time::Instant::now();
    loop {
        let secs = *idle.borrow_and_update();
        let expiry = async {
            if secs == 0 {
                std::future::pending::<()>().await;
            }
            tokio::time::sleep_until(since + std::time::Duration::from_secs(secs)).await;
        };
        tokio::select! {
            // Cancel-safe: a read that loses the race has read nothing.
            read = stream.read_buf(input) => return read.map(Some),
            () = expiry => return Ok(None),
            changed = idle.changed() => {
                if changed.is_err() {
                    // The setting is gone with the server: wait for input alone.
                    return stream.read_buf(input).await.map(Some);
                }
            }
        }
    }
}

/// Sends the replies in `out`, once what they answer is durable (group commit: see
/// [`super::GroupCommit`]). A failed commit closes the connection without them: no write is
/// acknowledged that was not made durable.
async fn send(
    shared: &Shared,
    client: &mut Client,
    stream: &mut TcpStream,
    out: &mut Out,
) -> std::io::Result<()> {
    if let Some(group) = shared.group.as_ref().filter(|_| client.touched) {
        client.touched = false;
        if let Err(why) = group.covered(shared).await {
            tracing::error!(client = client.id, %why, "a commit failed: closing the connection unanswered");
            return Err(std::io::Error::other(why));
        }
    }
    stream.write_all(out.bytes()).await?;
    out.clear();
    Ok(())
}

/// Redis's guard against cross-protocol scripting: a browser made to post to the port sends
/// `POST` or `Host:` lines first.
fn is_http(name: &[u8]) -> bool {
    name.eq_ignore_ascii_case(b"post") || name.eq_ignore_ascii_case(b"host:")
}

/// The connection commands.
pub const COMMANDS: &[Spec] = &[
    Spec { name: "ping", arity: -1, write: false, access: Access::None, run: ping },
    Spec { name: "echo", arity: 2, write: false, access: Access::None, run: echo },
    Spec { name: "hello", arity: -1, write: false, access: Access::None, run: hello },
    Spec { name: "auth", arity: -2, write: false, access: Access::None, run: auth },
    Spec { name: "select", arity: 2, write: false, access: Access::None, run: select },
    Spec { name: "quit", arity: -1, write: false, access: Access::None, run: quit },
    Spec { name: "reset", arity: 1, write: false, access: Access::None, run: reset },
    Spec { name: "client", arity: -2, write: false, access: Access::None, run: client },
    Spec { name: "command", arity: -1, write: false, access: Access::None, run: command },
];

fn ping(ctx: &mut Ctx<'_>, args: &[Arg<'_>]) -> CmdResult {
    match args {
        [_] => ctx.out.simple("PONG"),
        [_, message] => ctx.out.bulk(message),
        _ => return Err(wrong_arity("ping")),
    }
    Ok(Flow::Continue)
}

fn echo(ctx: &mut Ctx<'_>, args: &[Arg<'_>]) -> CmdResult {
    ctx.out.bulk(&args[1]);
    Ok(Flow::Continue)
}

/// The check of AUTH and HELLO's AUTH: only the `default` user exists; with no password set
/// it logs in with any password (Redis's `nopass` user), else with the password alone.
fn check_password(shared: &Shared, user: &[u8], password: &[u8]) -> Result<(), CmdError> {
    let live = &shared.live;
    if user == b"default" && (!live.password_set() || live.password_matches(password)) {
        Ok(())
    } else {
        Err("WRONGPASS invalid username-password pair or user is disabled.".into())
    }
}

/// Client names are printable ASCII without spaces (Redis's rule).
fn valid_name(name: &[u8]) -> bool {
    name.iter().all(|&b| (b'!'..=b'~').contains(&b))
}

const BAD_NAME: &str = "ERR Client names cannot contain spaces, newlines or special characters.";

fn hello(ctx: &mut Ctx<'_>, args: &[Arg<'_>]) -> CmdResult {
    let mut resp3 = ctx.out.resp3();
    let mut name = None;
    if let Some(version) = args.get(1) {
        match resp::parse_i64(version) {
            Some(2) => resp3 = false,
            Some(3) => resp3 = true,
            Some(_) => return Err("NOPROTO unsupported protocol version".into()),
            None => return Err("ERR Protocol version is not an integer or out of range".into()),
        }
        let mut i = 2;
        while i < args.len() {
            let more = args.len() - i - 1;
            if args[i].eq_ignore_ascii_case(b"auth") && more >= 2 {
                check_password(ctx.shared, &args[i + 1], &args[i + 2])?;
                ctx.client.authenticated = true;
                i += 3;
            } else if args[i].eq_ignore_ascii_case(b"setname") && more >= 1 {
                if !valid_name(&args[i + 1]) {
                    return Err(BAD_NAME.into());
                }
                name = Some(args[i + 1].to_vec());
                i += 2;
            } else {
                return Err(CmdError(format!(
                    "ERR Syntax error in HELLO option '{}'",
                    String::from_utf8_lossy(&args[i])
                )));
            }
        }
    }
    if !ctx.client.authenticated && ctx.shared.live.password_set() {
        return Err("NOAUTH HELLO must be called with the client already authenticated, otherwise the \
                    HELLO <proto> AUTH <user> <pass> option can be used to authenticate the client and \
                    select the RESP protocol version at the same time"
            .into());
    }
    if let Some(name) = name {
        ctx.client.set_name(Some(name));
    }
    ctx.out.set_resp3(resp3);
    let out = &mut *ctx.out;
    out.map(7);
    out.bulk(b"server");
    out.bulk(b"redis");
    out.bulk(b"version");
    out.bulk(server::REDIS_VERSION.as_bytes());
    out.bulk(b"proto");
    out.int(if resp3 { 3 } else { 2 });
    out.bulk(b"id");
    out.int(ctx.client.id as i64);
    out.bulk(b"mode");
    out.bulk(b"standalone");
    out.bulk(b"role");
    out.bulk(b"master");
    out.bulk(b"modules");
    out.array(0);
    Ok(Flow::Continue)
}

fn auth(ctx: &mut Ctx<'_>, args: &[Arg<'_>]) -> CmdResult {
    let (user, password): (&[u8], &[u8]) = match args {
        [_, _] if !ctx.shared.live.password_set() => {
            return Err(CmdError(
                "ERR AUTH <password> called without any password configured for the default user. \
                 Are you sure your configuration is correct?"
                    .into(),
            ));
        }
        [_, password] => (b"default", password),
        [_, user, password] => (user, password),
        _ => return Err(CmdError::syntax()),
    };
    check_password(ctx.shared, user, password)?;
    ctx.client.authenticated = true;
    ctx.out.ok();
    Ok(Flow::Continue)
}

fn select(ctx: &mut Ctx<'_>, args: &[Arg<'_>]) -> CmdResult {
    match int_arg(&args[1]) {
        Ok(0) => {
            ctx.out.ok();
            Ok(Flow::Continue)
        }
        Ok(_) => Err("ERR DB index is out of range".into()),
        Err(_) => Err(CmdError::not_integer()),
    }
}

fn quit(ctx: &mut Ctx<'_>, _args: &[Arg<'_>]) -> CmdResult {
    ctx.out.ok();
    Ok(Flow::Close)
}

/// RESET: the connection as a new one would be (RESP2, no name, database 0, and
/// authenticated only if no password is set).
fn reset(ctx: &mut Ctx<'_>, _args: &[Arg<'_>]) -> CmdResult {
    ctx.out.set_resp3(false);
    ctx.client.set_name(None);
    ctx.client.authenticated = !ctx.shared.live.password_set();
    ctx.client.multi = None;
    ctx.client.watched.clear();
    ctx.out.simple("RESET");
    Ok(Flow::Continue)
}

fn unknown_subcommand(args: &[Arg<'_>], group: &str) -> CmdError {
    CmdError(format!(
        "ERR unknown subcommand '{}'. Try {group} HELP.",
        String::from_utf8_lossy(&args[1]).chars().take(128).collect::<String>()
    ))
}

fn client(ctx: &mut Ctx<'_>, args: &[Arg<'_>]) -> CmdResult {
    let sub = args[1].to_ascii_lowercase();
    let arity = |n: usize, name: &str| {
        if args.len() == n {
            Ok(())
        } else {
            Err(wrong_arity(&format!("client|{name}")))
        }
    };
    match sub.as_slice() {
        b"id" => {
            arity(2, "id")?;
            ctx.out.int(ctx.client.id as i64);
        }
        b"getname" => {
            arity(2, "getname")?;
            ctx.out.bulk_or_null(ctx.client.name.as_deref());
        }
        b"setname" => {
            arity(3, "setname")?;
            if !valid_name(&args[2]) {
                return Err(BAD_NAME.into());
            }
            // An empty name removes it, as in Redis.
            ctx.client.set_name((!args[2].is_empty()).then(|| args[2].to_vec()));
            ctx.out.ok();
        }
        b"setinfo" => {
            // Client libraries announce themselves (redis-py, Jedis...): CLIENT LIST shows it.
            arity(4, "setinfo")?;
            let attribute = args[2].to_ascii_lowercase();
            if attribute != b"lib-name" && attribute != b"lib-ver" {
                return Err(CmdError(format!(
                    "ERR Unrecognized option '{}'",
                    String::from_utf8_lossy(&args[2])
                )));
            }
            if !valid_name(&args[3]) {
                return Err(CmdError(format!(
                    "ERR {} cannot contain spaces, newlines or special characters.",
                    String::from_utf8_lossy(&attribute)
                )));
            }
            let mut details = ctx.client.entry.details();
            let value = Some(args[3].to_vec());
            if attribute == b"lib-name" {
                details.lib_name = value;
            } else {
                details.lib_ver = value;
            }
            drop(details);
            ctx.out.ok();
        }
        b"list" => {
            ctx.client.last_cmd = "client|list";
            ctx.client.entry.details().last_cmd = "client|list";
            client_list(ctx, args)?;
        }
        b"info" => {
            arity(2, "info")?;
            ctx.client.last_cmd = "client|info";
            ctx.client.entry.details().last_cmd = "client|info";
            let mut text = ctx.client.entry.line(ctx.shared);
            text.push('\n');
            ctx.out.verbatim(&text);
        }
        _ => return Err(unknown_subcommand(args, "CLIENT")),
    }
    Ok(Flow::Continue)
}

/// `CLIENT LIST [TYPE normal|master|replica|pubsub] [ID id...]`: a line per client.
fn client_list(ctx: &mut Ctx<'_>, args: &[Arg<'_>]) -> Result<(), CmdError> {
    let mut ids: Option<Vec<u64>> = None;
    let mut normal = true;
    match args.get(2).map(|a| a.to_ascii_lowercase()).as_deref() {
        None => {}
        Some(b"type") if args.len() == 4 => match args[3].to_ascii_lowercase().as_slice() {
            b"normal" => {}
            b"master" | b"replica" | b"slave" | b"pubsub" => normal = false,
            _ => {
                return Err(CmdError(format!(
                    "ERR Unknown client type '{}'",
                    String::from_utf8_lossy(&args[3])
                )))
            }
        },
        Some(b"id") if args.len() > 3 => {
            let parsed = args[3..]
                .iter()
                .map(|a| int_arg(a).ok().and_then(|n| u64::try_from(n).ok()).filter(|&n| n > 0))
                .collect::<Option<Vec<u64>>>()
                .ok_or_else(|| CmdError::from("ERR Invalid client ID"))?;
            ids = Some(parsed);
        }
        Some(_) => return Err(CmdError::syntax()),
    }
    let entries: Vec<Arc<ClientEntry>> = if normal {
        ctx.shared.registry.lock().unwrap_or_else(|e| e.into_inner()).values().cloned().collect()
    } else {
        Vec::new()
    };
    let mut text = String::new();
    for entry in entries.iter().filter(|e| ids.as_ref().is_none_or(|ids| ids.contains(&e.id))) {
        text.push_str(&entry.line(ctx.shared));
        text.push('\n');
    }
    ctx.out.verbatim(&text);
    Ok(())
}

/// What CLIENT LIST shows of a connected client: the connection task updates it after each
/// command, CLIENT LIST reads it from another.
#[derive(Debug)]
pub struct ClientEntry {
    /// Its id.
    pub id: u64,
    /// Its address.
    pub addr: std::net::SocketAddr,
    /// When it connected.
    pub connected: std::time::Instant,
    details: std::sync::Mutex<ClientDetails>,
}

/// The parts of a [`ClientEntry`] that change.
#[derive(Debug)]
pub struct ClientDetails {
    /// Its socket's file descriptor.
    pub fd: i32,
    /// Its name (CLIENT SETNAME, HELLO SETNAME).
    pub name: Option<Vec<u8>>,
    /// CLIENT SETINFO LIB-NAME.
    pub lib_name: Option<Vec<u8>>,
    /// CLIENT SETINFO LIB-VER.
    pub lib_ver: Option<Vec<u8>>,
    /// The command it ran last.
    pub last_cmd: &'static str,
    /// When it last ran a command.
    pub last_active: std::time::Instant,
    /// Commands queued in its transaction; -1 outside MULTI.
    pub multi: i64,
    /// Keys it watches.
    pub watching: usize,
    /// Whether it speaks RESP3.
    pub resp3: bool,
}

impl ClientEntry {
    /// A client connected now from `addr`.
    pub fn new(id: u64, addr: std::net::SocketAddr) -> ClientEntry {
        let now = std::time::Instant::now();
        ClientEntry {
            id,
            addr,
            connected: now,
            details: std::sync::Mutex::new(ClientDetails {
                fd: -1,
                name: None,
                lib_name: None,
                lib_ver: None,
                last_cmd: "NULL",
                last_active: now,
                multi: -1,
                watching: 0,
                resp3: false,
            }),
        }
    }

    /// Its changing parts, locked.
    pub fn details(&self) -> std::sync::MutexGuard<'_, ClientDetails> {
        self.details.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Its CLIENT LIST line, without the newline: Redis's fields that nvhtm tracks, in
    /// Redis's order (no buffer or memory sizes).
    pub fn line(&self, shared: &Shared) -> String {
        let d = self.details();
        let text =
            |b: &Option<Vec<u8>>| String::from_utf8_lossy(b.as_deref().unwrap_or_default()).into_owned();
        let laddr = shared.addr.get().map_or_else(String::new, ToString::to_string);
        format!(
            "id={} addr={} laddr={laddr} fd={} name={} age={} idle={} flags={} db=0 sub=0 psub=0 ssub=0 multi={} watch={} cmd={} user=default redir=-1 resp={} lib-name={} lib-ver={}",
            self.id,
            self.addr,
            d.fd,
            text(&d.name),
            self.connected.elapsed().as_secs(),
            d.last_active.elapsed().as_secs(),
            if d.multi >= 0 { "x" } else { "N" },
            d.multi,
            d.watching,
            d.last_cmd,
            if d.resp3 { 3 } else { 2 },
            text(&d.lib_name),
            text(&d.lib_ver),
        )
    }
}

/// COMMAND: enough for clients that ask (redis-cli asks COMMAND DOCS for its hints) to
/// degrade quietly: no command descriptions yet.
fn command(ctx: &mut Ctx<'_>, args: &[Arg<'_>]) -> CmdResult {
    let Some(sub) = args.get(1) else {
        ctx.out.array(0);
        return Ok(Flow::Continue);
    };
    match sub.to_ascii_lowercase().as_slice() {
        b"count" if args.len() == 2 => ctx.out.int(super::command_count() as i64),
        b"count" => return Err(wrong_arity("command|count")),
        b"docs" => ctx.out.map(0),
        b"info" => {
            // One null per name asked: "no description", which clients accept.
            ctx.out.array(args.len() - 2);
            for _ in 2..args.len() {
                ctx.out.null_array();
            }
        }
        _ => return Err(unknown_subcommand(args, "COMMAND")),
    }
    Ok(Flow::Continue)
}
