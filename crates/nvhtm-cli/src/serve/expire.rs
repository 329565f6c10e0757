//! Expiry: EXPIRE, PEXPIRE, EXPIREAT, PEXPIREAT, EXPIRETIME, PEXPIRETIME, TTL, PTTL, PERSIST,
//! the parsing of expire times the SET family shares, and the active sweep.
//!
//! A key's deadline is stored with its value (see [`super::db`]), so it survives restarts
//! and crashes with the value, by the same map operation. An expired key reads as absent at
//! once (lazy expiry, on every access); the sweep deletes it from the pool soon after its
//! deadline, working from an in-memory index of deadlines that a start rebuilds in the
//! background (Redis samples its table of keys with a TTL instead; an ordered index finds
//! every due key without sampling).

use std::sync::Arc;
use std::time::Duration;

use super::db::{now_ms, Change};
use super::resp::Arg;
use super::{int_arg, Access, CmdError, CmdResult, Ctx, Flow, Shared, Spec};

/// The expiry commands.
pub const COMMANDS: &[Spec] = &[
    Spec { name: "expire", arity: -3, write: true, access: Access::Shared, run: expire },
    Spec { name: "pexpire", arity: -3, write: true, access: Access::Shared, run: pexpire },
    Spec { name: "expireat", arity: -3, write: true, access: Access::Shared, run: expireat },
    Spec { name: "pexpireat", arity: -3, write: true, access: Access::Shared, run: pexpireat },
    Spec { name: "expiretime", arity: 2, write: false, access: Access::Shared, run: expiretime },
    Spec { name: "pexpiretime", arity: 2, write: false, access: Access::Shared, run: pexpiretime },
    Spec { name: "ttl", arity: 2, write: false, access: Access::Shared, run: ttl },
    Spec { name: "pttl", arity: 2, write: false, access: Access::Shared, run: pttl },
    Spec { name: "persist", arity: 2, write: true, access: Access::Shared, run: persist },
];

/// The unit of an expire time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unit {
    /// Seconds (EX, EXAT, EXPIRE, EXPIREAT).
    Seconds,
    /// Milliseconds (PX, PXAT, PEXPIRE, PEXPIREAT).
    Millis,
}

/// `ERR invalid expire time in 'NAME' command`.
pub fn invalid_expire(command: &str) -> CmdError {
    CmdError(format!("ERR invalid expire time in '{command}' command"))
}

/// An expire option's time as a deadline in Unix ms, with Redis's checks for SET, SETEX,
/// PSETEX and GETEX: the time must be positive, and neither the unit conversion nor the
/// addition of now may overflow.
pub fn positive_deadline(arg: &[u8], unit: Unit, absolute: bool, command: &str) -> Result<u64, CmdError> {
    let n = int_arg(arg)?;
    if n <= 0 || (unit == Unit::Seconds && n > i64::MAX / 1000) {
        return Err(invalid_expire(command));
    }
    let ms = if unit == Unit::Seconds { n * 1000 } else { n };
    let at = if absolute { Some(ms) } else { ms.checked_add(now_ms() as i64) };
    at.and_then(|at| u64::try_from(at).ok()).ok_or_else(|| invalid_expire(command))
}

/// EXPIRE's conditions (Redis 7).
#[derive(Debug, Clone, Copy, Default)]
struct Condition {
    nx: bool,
    xx: bool,
    gt: bool,
    lt: bool,
}

fn condition(args: &[Arg<'_>]) -> Result<Condition, CmdError> {
    let mut c = Condition::default();
    for option in args {
        match option.to_ascii_lowercase().as_slice() {
            b"nx" => c.nx = true,
            b"xx" => c.xx = true,
            b"gt" => c.gt = true,
            b"lt" => c.lt = true,
            _ => {
                return Err(CmdError(format!("ERR Unsupported option {}", String::from_utf8_lossy(option))));
            }
        }
    }
    if c.nx && (c.xx || c.gt || c.lt) {
        return Err("ERR NX and XX, GT or LT options at the same time are not compatible".into());
    }
    if c.gt && c.lt {
        return Err("ERR GT and LT options at the same time are not compatible".into());
    }
    Ok(c)
}

/// EXPIRE, PEXPIRE, EXPIREAT, PEXPIREAT: `key time [NX|XX|GT|LT]`. A deadline already
/// passed deletes the key; 1 when the key's deadline was set (or the key deleted), 0 when the
/// key is absent or the condition does not hold.
fn expire_generic(ctx: &mut Ctx<'_>, args: &[Arg<'_>], unit: Unit, absolute: bool, name: &str) -> CmdResult {
    let cond = condition(&args[3..])?;
    let mut when = int_arg(&args[2])?;
    if unit == Unit::Seconds {
        when = when.checked_mul(1000).ok_or_else(|| invalid_expire(name))?;
    }
    let now = now_ms() as i64;
    if !absolute {
        when = when.checked_add(now).ok_or_else(|| invalid_expire(name))?;
    }
    let done = ctx.shared.db.update(&args[1], |entry| {
        let Some(entry) = entry else { return Ok((Change::Keep, false)) };
        let current = entry.deadline.map(|at| at as i64);
        let refused = (cond.nx && current.is_some())
            || (cond.xx && current.is_none())
            || (cond.gt && current.is_none_or(|at| when <= at))
            || (cond.lt && current.is_some_and(|at| when >= at));
        if refused {
            return Ok((Change::Keep, false));
        }
        if when <= now {
            return Ok((Change::Delete, true));
        }
        Ok((Change::Set(entry.value.to_vec(), Some(when as u64)), true))
    })?;
    ctx.out.int(i64::from(done));
    Ok(Flow::Continue)
}

fn expire(ctx: &mut Ctx<'_>, args: &[Arg<'_>]) -> CmdResult {
    expire_generic(ctx, args, Unit::Seconds, false, "expire")
}

fn pexpire(ctx: &mut Ctx<'_>, args: &[Arg<'_>]) -> CmdResult {
    expire_generic(ctx, args, Unit::Millis, false, "pexpire")
}

fn expireat(ctx: &mut Ctx<'_>, args: &[Arg<'_>]) -> CmdResult {
    expire_generic(ctx, args, Unit::Seconds, true, "expireat")
}

fn pexpireat(ctx: &mut Ctx<'_>, args: &[Arg<'_>]) -> CmdResult {
    expire_generic(ctx, args, Unit::Millis, true, "pexpireat")
}

/// The key's deadline for TTL and its kind: -2 when absent, -1 without a deadline, else
/// `reply(deadline, now)`.
fn deadline_reply(ctx: &mut Ctx<'_>, key: &[u8], reply: impl FnOnce(u64, u64) -> i64) -> CmdResult {
    let n = match ctx.shared.db.get_with(key, |entry| entry.deadline)? {
        None => -2,
        Some(None) => -1,
        Some(Some(at)) => reply(at, now_ms()),
    };
    ctx.out.int(n);
    Ok(Flow::Continue)
}

fn ttl(ctx: &mut Ctx<'_>, args: &[Arg<'_>]) -> CmdResult {
    // Rounded to the nearest second, as Redis does.
    deadline_reply(ctx, &args[1], |at, now| (at.saturating_sub(now).saturating_add(500) / 1000) as i64)
}

fn pttl(ctx: &mut Ctx<'_>, args: &[Arg<'_>]) -> CmdResult {
    deadline_reply(ctx, &args[1], |at, now| at.saturating_sub(now) as i64)
}

fn expiretime(ctx: &mut Ctx<'_>, args: &[Arg<'_>]) -> CmdResult {
    deadline_reply(ctx, &args[1], |at, _| (at / 1000) as i64)
}

fn pexpiretime(ctx: &mut Ctx<'_>, args: &[Arg<'_>]) -> CmdResult {
    deadline_reply(ctx, &args[1], |at, _| at as i64)
}

fn persist(ctx: &mut Ctx<'_>, args: &[Arg<'_>]) -> CmdResult {
    let removed = ctx.shared.db.update(&args[1], |entry| {
        Ok(match entry {
            Some(entry) if entry.deadline.is_some() => (Change::Set(entry.value.to_vec(), None), true),
            _ => (Change::Keep, false),
        })
    })?;
    ctx.out.int(i64::from(removed));
    Ok(Flow::Continue)
}

/// How often the sweep looks for due keys, and the most it deletes per look before yielding.
const SWEEP_EVERY: Duration = Duration::from_millis(100);
const SWEEP_BATCH: usize = 1000;

/// The active expiry sweep: first rebuilds the index of deadlines from the pool (in the
/// background: the server answers meanwhile, and lazy expiry already hides expired keys),
/// then every 100 ms deletes the keys that have come due. Stops once the pool is poisoned.
pub async fn sweeper(shared: Arc<Shared>) {
    let indexing = Arc::clone(&shared);
    let began = std::time::Instant::now();
    match tokio::task::spawn_blocking(move || indexing.db.index_deadlines()).await {
        Ok(Ok(n)) => tracing::info!(
            keys_with_ttl = n,
            ms = format!("{:.3}", began.elapsed().as_secs_f64() * 1e3),
            "expiry index rebuilt"
        ),
        Ok(Err(CmdError(why))) => {
            tracing::error!(%why, "could not rebuild the expiry index: keys expire on access only")
        }
        Err(e) => tracing::error!(error = %e, "the expiry index task failed"),
    }
    let mut tick = tokio::time::interval(SWEEP_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if shared.poisoned.get().is_some() {
            return;
        }
        let sweeping = Arc::clone(&shared);
        // Deletions may sync (strict mode on an ordinary file): off the async workers.
        // Each deletion holds the keyspace gate shared (never inside a multi-key command or
        // an EXEC) and the writer gate, in the server's order, key by key: a round of slow
        // deletions (an msync each on an ordinary file) never holds off an EXEC for long.
        let swept = tokio::task::spawn_blocking(move || {
            sweeping.db.sweep(SWEEP_BATCH, || sweeping.enter_both(false))
        })
        .await;
        match swept {
            Ok(Ok(0)) => {}
            Ok(Ok(n)) => {
                tracing::debug!(deleted = n, "expired keys swept");
                if n == SWEEP_BATCH {
                    // More may be due: look again at once.
                    tick.reset_immediately();
                }
            }
            Ok(Err(CmdError(why))) => tracing::warn!(%why, "the expiry sweep failed; retrying"),
            Err(e) => {
                tracing::error!(error = %e, "the expiry sweep task failed");
                return;
            }
        }
    }
}
