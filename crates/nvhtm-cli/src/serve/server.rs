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
use super::{connection, Access, CmdError, CmdResult, Ctx, Flow, Mode, Shared, Spec};

/// The Redis version the server reports to clients (the command set and replies it follows).
pub const REDIS_VERSION: &str = "7.2.0";

/// Listens until SHUTDOWN, SIGTERM or SIGINT; the caller then closes the pool.
pub async fn listen(shared: Arc<Shared>) -> std::io::Result<()> {
    let options = &shared.options;
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
    tracing::info!(
        mode = shared.mode.name(),
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
                    tokio::spawn(connection::serve_client(Arc::clone(&shared), stream, peer));
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

/// FAMS mode: commits the pool every `--sync-ms` (off the async workers; the pool's writer
/// gate makes each commit a state between operations). Stops once a sync has failed.
async fn sync_timer(shared: Arc<Shared>) {
    let mut tick = tokio::time::interval(Duration::from_millis(shared.options.sync_ms));
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
    let options = &shared.options;
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
        }
        "persistence" => {
            line("loading", &0);
            line("nvhtm_mode", &shared.mode.name());
            line("nvhtm_pool", &options.pool.display());
            line("nvhtm_domain", &shared.domain);
            line("nvhtm_keys_recovered", &shared.keys_recovered);
            line("nvhtm_recovery_ms", &format!("{:.3}", shared.recovery.as_secs_f64() * 1e3));
            if shared.mode == Mode::Fams {
                line("nvhtm_sync_ms", &options.sync_ms);
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
        }
        "keyspace" => {
            let keys = shared.map.len()?;
            if keys > 0 {
                line("db0", &format!("keys={keys},expires=0,avg_ttl=0"));
            }
        }
        _ => {}
    }
    Ok(())
}

fn config(ctx: &mut Ctx<'_>, args: &[Arg<'_>]) -> CmdResult {
    let sub = args[1].to_ascii_lowercase();
    match sub.as_slice() {
        b"get" => {
            if args.len() < 3 {
                return Err(super::wrong_arity("config|get"));
            }
            let shared = ctx.shared;
            let options = &shared.options;
            let params: [(&str, String); 8] = [
                // No snapshots and no append-only file: the pool is the data.
                ("save", String::new()),
                ("appendonly", "no".into()),
                ("appendfsync", if shared.mode == Mode::Strict { "always" } else { "no" }.into()),
                ("databases", "1".into()),
                ("bind", options.bind.clone()),
                ("port", shared.addr.get().map_or(options.port, |a| a.port()).to_string()),
                ("proto-max-bulk-len", options.proto_max_bulk_len.to_string()),
                ("client-query-buffer-limit", options.client_query_buffer_limit.to_string()),
            ];
            let found: Vec<&(&str, String)> = params
                .iter()
                .filter(|(name, _)| args[2..].iter().any(|p| glob_match(p, name.as_bytes(), true)))
                .collect();
            ctx.out.map(found.len());
            for (name, value) in found {
                ctx.out.bulk(name.as_bytes());
                ctx.out.bulk(value.as_bytes());
            }
            Ok(Flow::Continue)
        }
        b"set" | b"resetstat" | b"rewrite" => Err(CmdError(format!(
            "ERR CONFIG {} is not supported yet by nvhtm serve: use its command-line options",
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

/// BGSAVE [SCHEDULE]: a sync in the background; LASTSAVE tells when it is done.
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

/// SHUTDOWN [NOSAVE|SAVE] [NOW] [FORCE]: the pool is closed cleanly in every case (closing
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
