//! The accept loop, the FAMS sync timer, and the server commands: INFO, CONFIG, TIME, SAVE,
//! BGSAVE, LASTSAVE, SHUTDOWN.

use std::fmt::Write as _;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::signal::unix::{signal, SignalKind};

use super::keys::glob_match;
use super::resp::Arg;
use super::{config, connection, Access, CmdError, CmdResult, Ctx, Flow, Mode, Shared, Spec};

/// The Redis version the server reports to clients (the command set and replies it follows).
pub const REDIS_VERSION: &str = "7.2.0";

/// Listens until SHUTDOWN, SIGTERM or SIGINT; the caller then closes the pool.
pub async fn listen(shared: Arc<Shared>) -> std::io::Result<()> {
    let options = &shared.config;
    let listener = TcpListener::bind((options.bind.as_str(), options.port)).await?;
    let addr = listener.local_addr()?;
    let _ = shared.addr.set(addr);
    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    if shared.mode == Mode::Fams {
        tokio::spawn(sync_timer(Arc::clone(&shared)));
    }
    if shared.group.is_some() {
        tokio::spawn(committer(Arc::clone(&shared)));
    }
    tokio::spawn(background_saver(Arc::clone(&shared)));
    tokio::spawn(super::expire::sweeper(Arc::clone(&shared)));
    tracing::info!(
        mode = shared.mode.name(),
        map = %shared.db.map.kind(),
        pool = %options.pool.display(),
        domain = %shared.domain,
        keys_recovered = shared.keys_recovered,
        recovery_ms = format!("{:.3}", shared.recovery.as_secs_f64() * 1e3),
        "nvhtm serve listening on {addr}"
    );
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    shared.connections_received.fetch_add(1, Ordering::Relaxed);
                    // Counted here, before the next accept, so a burst cannot overshoot.
                    let connected = shared.clients.fetch_add(1, Ordering::SeqCst) + 1;
                    if connected > shared.live.maxclients.load(Ordering::Relaxed) {
                        shared.clients.fetch_sub(1, Ordering::SeqCst);
                        shared.rejected_connections.fetch_add(1, Ordering::Relaxed);
                        tracing::debug!(%peer, "maxclients reached: refusing a client");
                        tokio::spawn(refuse(stream, config::MAX_CLIENTS));
                    } else if shared.live.denies(peer.ip()) {
                        shared.clients.fetch_sub(1, Ordering::SeqCst);
                        tracing::warn!(%peer, "protected mode: refusing a client that is not on loopback (set a password or protected-mode no)");
                        tokio::spawn(refuse(stream, config::DENIED));
                    } else {
                        tokio::spawn(connection::serve_client(Arc::clone(&shared), stream, peer));
                    }
                }
                Err(e) => {
                    // Out of file descriptors and the like: the listener recovers once some
                    // close; back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            () = shared.stop.notified() => {
                tracing::info!("SHUTDOWN: closing the pool");
                break;
            }
            _ = terminate.recv() => {
                tracing::info!("SIGTERM: closing the pool");
                break;
            }
            _ = interrupt.recv() => {
                tracing::info!("SIGINT: closing the pool");
                break;
            }
        }
    }
    shared.stopping.store(true, Ordering::SeqCst);
    Ok(())
}

/// Sends a refused client its error and closes the connection.
async fn refuse(mut stream: tokio::net::TcpStream, reply: &'static str) {
    use tokio::io::AsyncWriteExt;
    let _ = stream.write_all(reply.as_bytes()).await;
    let _ = stream.shutdown().await;
}

/// FAMS mode: commits the pool every `--sync-ms` (off the async workers; the pool's writer
/// gate makes each commit a state between operations). Stops once a sync has failed.
async fn sync_timer(shared: Arc<Shared>) {
    let mut tick = tokio::time::interval(Duration::from_millis(shared.config.sync_ms));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await; // the first tick is immediate
    loop {
        tick.tick().await;
        let syncing = Arc::clone(&shared);
        match tokio::task::spawn_blocking(move || syncing.sync()).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => return, // logged and poisoned by `sync`
            Err(e) => {
                tracing::error!(error = %e, "the sync task failed");
                return;
            }
        }
    }
}

/// Strict mode on a FAMS pool: one commit at a time, each covering every access made before it
/// began (see [`super::GroupCommit`]). Stops once a commit has failed, waking the waiters,
/// who then find the pool poisoned.
async fn committer(shared: Arc<Shared>) {
    let Some(group) = &shared.group else { return };
    loop {
        group.wake.notified().await;
        let number = group.begun.fetch_add(1, Ordering::SeqCst) + 1;
        let covers = group.writes.load(Ordering::SeqCst);
        let syncing = Arc::clone(&shared);
        let synced = tokio::task::spawn_blocking(move || syncing.sync()).await;
        if matches!(synced, Ok(Ok(()))) {
            group.committed.fetch_max(covers, Ordering::SeqCst);
        }
        if let Err(e) = &synced {
            let _ = shared.poisoned.set(format!("the commit task failed: {e}"));
        }
        group.done.send_replace(number);
        if !matches!(synced, Ok(Ok(()))) {
            // Poisoned: later waiters are answered at once.
            group.done.send_replace(u64::MAX);
            return;
        }
    }
}

/// BGSAVE's worker: a sync off the async workers each time one is asked for.
async fn background_saver(shared: Arc<Shared>) {
    loop {
        shared.bgsave.notified().await;
        let syncing = Arc::clone(&shared);
        match tokio::task::spawn_blocking(move || syncing.sync()).await {
            Ok(Ok(())) => tracing::info!("background save done"),
            Ok(Err(_)) => return, // logged and poisoned by `sync`
            Err(e) => {
                tracing::error!(error = %e, "the background save task failed");
                return;
            }
        }
    }
}

/// The server commands.
pub const COMMANDS: &[Spec] = &[
    Spec { name: "info", arity: -1, write: false, access: Access::Shared, run: info },
    Spec { name: "config", arity: -2, write: false, access: Access::None, run: config },
    Spec { name: "time", arity: 1, write: false, access: Access::None, run: time },
    Spec { name: "save", arity: 1, write: false, access: Access::None, run: save },
    Spec { name: "bgsave", arity: -1, write: false, access: Access::None, run: bgsave },
    Spec { name: "lastsave", arity: 1, write: false, access: Access::None, run: lastsave },
    Spec { name: "shutdown", arity: -1, write: false, access: Access::None, run: shutdown },
];

const SECTIONS: [&str; 5] = ["server", "clients", "persistence", "stats", "keyspace"];

fn info(ctx: &mut Ctx<'_>, args: &[Arg<'_>]) -> CmdResult {
    let wanted: Vec<String> =
        args[1..].iter().map(|a| String::from_utf8_lossy(a).to_ascii_lowercase()).collect();
    let all =
        wanted.is_empty() || wanted.iter().any(|w| matches!(w.as_str(), "all" | "default" | "everything"));
    let mut text = String::new();
    for section in SECTIONS {
        if all || wanted.iter().any(|w| w == section) {
            if !text.is_empty() {
                text.push_str("\r\n");
            }
            info_section(ctx.shared, section, &mut text)?;
        }
    }
    ctx.out.verbatim(&text);
    Ok(Flow::Continue)
}

fn info_section(shared: &Shared, section: &str, text: &mut String) -> Result<(), CmdError> {
    let options = &shared.config;
    let mut title = section.to_string();
    title[..1].make_ascii_uppercase();
    let _ = write!(text, "# {title}\r\n");
    let mut line = |name: &str, value: &dyn std::fmt::Display| {
        let _ = write!(text, "{name}:{value}\r\n");
    };
    match section {
        "server" => {
            line("redis_version", &REDIS_VERSION);
            line("nvhtm_version", &env!("CARGO_PKG_VERSION"));
            line("redis_mode", &"standalone");
            line("os", &std::env::consts::OS);
            line("arch_bits", &(usize::BITS));
            line("process_id", &std::process::id());
            line("tcp_port", &shared.addr.get().map_or(options.port, |a| a.port()));
            line("uptime_in_seconds", &shared.started.elapsed().as_secs());
            line("uptime_in_days", &(shared.started.elapsed().as_secs() / 86_400));
        }
        "clients" => {
            line("connected_clients", &shared.clients.load(Ordering::Relaxed));
            line("maxclients", &shared.live.maxclients.load(Ordering::Relaxed));
        }
        "persistence" => {
            line("loading", &0);
            line("nvhtm_mode", &shared.mode.name());
            line("nvhtm_map", &shared.db.map.kind());
            line("nvhtm_pool", &options.pool.display());
            line("nvhtm_domain", &shared.domain);
            line("nvhtm_keys_recovered", &shared.keys_recovered);
            line("nvhtm_recovery_ms", &format!("{:.3}", shared.recovery.as_secs_f64() * 1e3));
            if shared.mode == Mode::Fams {
                line("nvhtm_sync_ms", &options.sync_ms);
            }
            if let nvhtm::any_map::AnyMap::Periodic(map) = &shared.db.map {
                // The epoch in effect: --epoch-ms, else the one the map recorded.
                let epoch_ms = match options.epoch_ms {
                    Some(ms) => ms,
                    None => map.stored_epoch()?.as_secs_f64() * 1e3,
                };
                line("nvhtm_epoch_ms", &epoch_ms);
            }
            line("nvhtm_group_commit", &if shared.group.is_some() { "yes" } else { "no" });
            line("nvhtm_syncs", &shared.syncs.load(Ordering::Relaxed));
            line("nvhtm_poisoned", &shared.poisoned.get().map_or("no", |why| why.as_str()));
            line("rdb_last_save_time", &shared.last_save.load(Ordering::Relaxed));
            line("rdb_last_bgsave_status", &if shared.poisoned.get().is_some() { "err" } else { "ok" });
            line("aof_enabled", &0);
        }
        "stats" => {
            line("total_connections_received", &shared.connections_received.load(Ordering::Relaxed));
            line("total_commands_processed", &shared.commands_processed.load(Ordering::Relaxed));
            line("rejected_connections", &shared.rejected_connections.load(Ordering::Relaxed));
            // Deleted by the sweep (a key read as absent once expired is counted when swept).
            line("expired_keys", &shared.db.expired_keys());
        }
        "keyspace" => {
            let keys = shared.db.len()?;
            if keys > 0 {
                // `expires`: the keys in the expiry index, an upper bound (see `Db::timers`).
                line("db0", &format!("keys={keys},expires={},avg_ttl=0", shared.db.timers()));
            }
        }
        _ => {}
    }
    Ok(())
}

/// The parameters CONFIG GET reports, with their values now.
fn parameters(shared: &Shared) -> Vec<(&'static str, Vec<u8>)> {
    let config = &shared.config;
    let live = &shared.live;
    let text = |s: String| s.into_bytes();
    let yes_no = |b: bool| if b { b"yes".to_vec() } else { b"no".to_vec() };
    vec![
        // No snapshots and no append-only file: the pool is the data.
        ("save", Vec::new()),
        ("appendonly", b"no".to_vec()),
        // The Redis setting with the same promise.
        (
            "appendfsync",
            match shared.mode {
                Mode::Strict | Mode::Hybrid => b"always".to_vec(),
                Mode::Periodic => b"everysec".to_vec(),
                Mode::Fams => b"no".to_vec(),
            },
        ),
        ("databases", b"1".to_vec()),
        ("bind", text(config.bind.clone())),
        ("port", text(shared.addr.get().map_or(config.port, |a| a.port()).to_string())),
        ("proto-max-bulk-len", text(config.proto_max_bulk_len.to_string())),
        ("client-query-buffer-limit", text(config.client_query_buffer_limit.to_string())),
        ("requirepass", live.requirepass().unwrap_or_default()),
        ("maxclients", text(live.maxclients.load(Ordering::Relaxed).to_string())),
        ("timeout", text(live.timeout.borrow().to_string())),
        ("protected-mode", yes_no(live.protected_mode.load(Ordering::Relaxed))),
        ("pool", text(config.pool.display().to_string())),
        ("mode", text(shared.mode.name().to_string())),
        ("sync-ms", text(config.sync_ms.to_string())),
    ]
}

/// A new value for a parameter CONFIG SET may change.
enum NewValue {
    Requirepass(Option<Vec<u8>>),
    Maxclients(u64),
    Timeout(u64),
    ProtectedMode(bool),
}

/// Redis's numeric CONFIG SET checks: an integer within `min..=max`.
fn bounded(value: &[u8], min: u64, max: u64) -> Result<u64, String> {
    let n = super::resp::parse_i64(value).ok_or("argument couldn't be parsed into an integer")?;
    u64::try_from(n)
        .ok()
        .filter(|n| (min..=max).contains(n))
        .ok_or_else(|| format!("argument must be between {min} and {max} inclusive"))
}

fn config(ctx: &mut Ctx<'_>, args: &[Arg<'_>]) -> CmdResult {
    let sub = args[1].to_ascii_lowercase();
    match sub.as_slice() {
        b"get" => {
            if args.len() < 3 {
                return Err(super::wrong_arity("config|get"));
            }
            let found: Vec<(&str, Vec<u8>)> = parameters(ctx.shared)
                .into_iter()
                .filter(|(name, _)| args[2..].iter().any(|p| glob_match(p, name.as_bytes(), true)))
                .collect();
            ctx.out.map(found.len());
            for (name, value) in found {
                ctx.out.bulk(name.as_bytes());
                ctx.out.bulk(&value);
            }
            Ok(Flow::Continue)
        }
        b"set" => {
            if args.len() < 4 || args.len() % 2 != 0 {
                return Err(super::wrong_arity("config|set"));
            }
            let known = parameters(ctx.shared);
            // Every pair is checked before any is applied: all or nothing, as in Redis.
            let mut changes = Vec::new();
            for pair in args[2..].chunks(2) {
                let name = String::from_utf8_lossy(&pair[0]).to_ascii_lowercase();
                let failed = |why: &str| {
                    CmdError(format!("ERR CONFIG SET failed (possibly related to argument '{name}') - {why}"))
                };
                if !known.iter().any(|(known, _)| *known == name) {
                    return Err(CmdError(format!(
                        "ERR Unknown option or number of arguments for CONFIG SET - '{}'",
                        String::from_utf8_lossy(&pair[0])
                    )));
                }
                if changes.iter().any(|(seen, _)| *seen == name) {
                    return Err(failed("duplicate parameter"));
                }
                let value = &pair[1];
                let change = match name.as_str() {
                    "requirepass" => NewValue::Requirepass((!value.is_empty()).then(|| value.to_vec())),
                    "maxclients" => {
                        NewValue::Maxclients(bounded(value, 1, u64::from(u32::MAX)).map_err(|e| failed(&e))?)
                    }
                    "timeout" => {
                        NewValue::Timeout(bounded(value, 0, i32::MAX as u64).map_err(|e| failed(&e))?)
                    }
                    "protected-mode" => NewValue::ProtectedMode(
                        config::parse_bool(&String::from_utf8_lossy(value)).map_err(|e| failed(&e))?,
                    ),
                    _ => return Err(failed("can't set immutable config")),
                };
                changes.push((name, change));
            }
            let live = &ctx.shared.live;
            for (name, change) in changes {
                match change {
                    NewValue::Requirepass(password) => live.set_requirepass(password),
                    NewValue::Maxclients(n) => live.maxclients.store(n, Ordering::Relaxed),
                    NewValue::Timeout(secs) => {
                        live.timeout.send_replace(secs);
                    }
                    NewValue::ProtectedMode(on) => live.protected_mode.store(on, Ordering::Relaxed),
                }
                tracing::info!(client = ctx.client.id, parameter = %name, "CONFIG SET");
            }
            ctx.out.ok();
            Ok(Flow::Continue)
        }
        b"resetstat" | b"rewrite" => Err(CmdError(format!(
            "ERR CONFIG {} is not supported yet by nvhtm serve",
            String::from_utf8_lossy(&sub).to_ascii_uppercase()
        ))),
        _ => Err(CmdError(format!(
            "ERR unknown subcommand '{}'. Try CONFIG HELP.",
            String::from_utf8_lossy(&args[1])
        ))),
    }
}

fn time(ctx: &mut Ctx<'_>, _args: &[Arg<'_>]) -> CmdResult {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    ctx.out.array(2);
    ctx.out.bulk(now.as_secs().to_string().as_bytes());
    ctx.out.bulk(now.subsec_micros().to_string().as_bytes());
    Ok(Flow::Continue)
}

/// Runs a blocking call from a handler, letting the runtime move this worker's other tasks
/// elsewhere meanwhile.
fn blocking<R>(f: impl FnOnce() -> R) -> R {
    match tokio::runtime::Handle::try_current() {
        Ok(_) => tokio::task::block_in_place(f),
        Err(_) => f(),
    }
}

fn save(ctx: &mut Ctx<'_>, _args: &[Arg<'_>]) -> CmdResult {
    let shared = ctx.shared;
    match blocking(|| shared.sync()) {
        Ok(()) => {
            ctx.out.ok();
            Ok(Flow::Continue)
        }
        Err(why) => Err(CmdError(format!("ERR the pool could not be synced: {why}"))),
    }
}

/// `BGSAVE [SCHEDULE]`: a sync in the background; LASTSAVE tells when it is done.
fn bgsave(ctx: &mut Ctx<'_>, args: &[Arg<'_>]) -> CmdResult {
    match &args[1..] {
        [] => {}
        [schedule] if schedule.eq_ignore_ascii_case(b"schedule") => {}
        _ => return Err(CmdError::syntax()),
    }
    if let Some(why) = ctx.shared.poisoned.get() {
        return Err(CmdError(format!("ERR the pool could not be synced: {why}")));
    }
    ctx.shared.bgsave.notify_one();
    ctx.out.simple("Background saving started");
    Ok(Flow::Continue)
}

fn lastsave(ctx: &mut Ctx<'_>, _args: &[Arg<'_>]) -> CmdResult {
    ctx.out.int(ctx.shared.last_save.load(Ordering::Relaxed) as i64);
    Ok(Flow::Continue)
}

/// `SHUTDOWN [NOSAVE|SAVE] [NOW] [FORCE]`: the pool is closed cleanly in every case (closing
/// syncs it), then the server exits. As in Redis, a successful SHUTDOWN sends no reply: the
/// connection closes.
fn shutdown(ctx: &mut Ctx<'_>, args: &[Arg<'_>]) -> CmdResult {
    for option in &args[1..] {
        match option.to_ascii_lowercase().as_slice() {
            b"nosave" | b"save" | b"now" | b"force" => {}
            b"abort" => return Err("ERR No shutdown in progress.".into()),
            _ => return Err(CmdError::syntax()),
        }
    }
    tracing::info!(client = ctx.client.id, addr = %ctx.client.addr, "SHUTDOWN requested");
    ctx.shared.request_stop();
    Ok(Flow::Close)
}
