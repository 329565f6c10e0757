//! Transactions: MULTI, EXEC, DISCARD, WATCH, UNWATCH, with Redis's semantics.
//!
//! After MULTI, every command but EXEC, DISCARD, MULTI, WATCH, QUIT and RESET is checked
//! (known, arity, authentication, allowed in a transaction, writes not refused) and queued,
//! answered `+QUEUED`; a command that fails those checks is answered its error and dooms the
//! transaction (EXEC then answers `-EXECABORT …`). EXEC runs the queue holding the keyspace
//! gate alone, so no other client's command runs in between (isolation), and the pool's
//! writer gate, so no FAMS sync commits part of it: on a FAMS pool, in `fams` mode and in
//! `strict` mode with group commit alike, a crash leaves all of a transaction or none of it.
//! On a mapped pool in `strict` and `hybrid` mode each command persists itself as it runs,
//! and a crash in the middle of an EXEC can leave the first commands' writes without the
//! rest; in `periodic` mode likewise (the map keeps a prefix of the history, which may end
//! inside an EXEC).
//!
//! A transaction runs at one instant ([`frozen`](super::db::frozen)), as in Redis: a key that
//! is live for its first command is live for its last.
//!
//! WATCH records a version of each key (see [`Db::watch`](super::db::Db::watch)); EXEC
//! answers a null array, running nothing, if any changed since: written by any client
//! (this one included), flushed, or expired. Versions are kept per stripe of keys, so a write
//! to another key of the same stripe also aborts the transaction (rare with 16 384 stripes; a
//! false alarm, never a missed change).

use std::sync::atomic::Ordering;

use super::resp::Arg;
use super::{lookup, Access, CmdError, CmdResult, Ctx, Flow, Spec};

/// The transaction commands.
pub const COMMANDS: &[Spec] = &[
    Spec { name: "multi", arity: 1, write: false, access: Access::None, run: multi },
    Spec { name: "exec", arity: 1, write: false, access: Access::None, run: exec },
    Spec { name: "discard", arity: 1, write: false, access: Access::None, run: discard },
    Spec { name: "watch", arity: -2, write: false, access: Access::Shared, run: watch },
    Spec { name: "unwatch", arity: 1, write: false, access: Access::None, run: unwatch },
];

/// A transaction being queued.
#[derive(Debug, Default)]
pub struct Multi {
    /// The commands queued, each its words.
    pub queued: Vec<Vec<Vec<u8>>>,
    /// Whether a command failed its checks while queued: EXEC then aborts.
    pub failed: bool,
}

/// Whether `spec` runs at once inside MULTI rather than being queued.
pub fn runs_inside_multi(spec: &Spec) -> bool {
    matches!(spec.name, "exec" | "discard" | "multi" | "watch" | "quit" | "reset")
}

/// Whether `spec` may not be queued (Redis's `no-multi` flag): SAVE would sync the pool from
/// inside the transaction's writer gate, SHUTDOWN would end the server inside it.
pub fn refused_inside_multi(spec: &Spec) -> bool {
    matches!(spec.name, "save" | "shutdown")
}

fn multi(ctx: &mut Ctx<'_>, _args: &[Arg<'_>]) -> CmdResult {
    if ctx.client.multi.is_some() {
        return Err("ERR MULTI calls can not be nested".into());
    }
    ctx.client.multi = Some(Multi::default());
    ctx.out.ok();
    Ok(Flow::Continue)
}

fn discard(ctx: &mut Ctx<'_>, _args: &[Arg<'_>]) -> CmdResult {
    if ctx.client.multi.take().is_none() {
        return Err("ERR DISCARD without MULTI".into());
    }
    ctx.client.watched.clear();
    ctx.out.ok();
    Ok(Flow::Continue)
}

fn watch(ctx: &mut Ctx<'_>, args: &[Arg<'_>]) -> CmdResult {
    if ctx.client.multi.is_some() {
        return Err("ERR WATCH inside MULTI is not allowed".into());
    }
    for key in &args[1..] {
        if !ctx.client.watched.iter().any(|w| w.key == **key) {
            let watched = ctx.shared.db.watch(key)?;
            ctx.client.watched.push(watched);
        }
    }
    ctx.out.ok();
    Ok(Flow::Continue)
}

fn unwatch(ctx: &mut Ctx<'_>, _args: &[Arg<'_>]) -> CmdResult {
    ctx.client.watched.clear();
    ctx.out.ok();
    Ok(Flow::Continue)
}

fn exec(ctx: &mut Ctx<'_>, _args: &[Arg<'_>]) -> CmdResult {
    let Some(multi) = ctx.client.multi.take() else {
        return Err("ERR EXEC without MULTI".into());
    };
    let watched = std::mem::take(&mut ctx.client.watched);
    if multi.failed {
        return Err("EXECABORT Transaction discarded because of previous errors.".into());
    }
    // The keyspace gate alone: no other client's command (nor the expiry sweep) until the
    // transaction is done. The pool's writer gate: no FAMS sync until it is done either, so
    // the commits before and after it are the only states a crash can leave.
    let _gates = ctx.shared.enter_both(true);
    // One instant for the whole transaction (as in Redis): no key expires in the middle.
    super::db::frozen(|| run_queue(ctx, &multi, &watched))
}

/// EXEC's body, inside both gates and at one instant.
fn run_queue(ctx: &mut Ctx<'_>, multi: &Multi, watched: &[super::db::Watched]) -> CmdResult {
    let shared = ctx.shared;
    if watched.iter().any(|w| shared.db.changed(w)) {
        ctx.out.null_array();
        return Ok(Flow::Continue);
    }
    let specs: Vec<&Spec> =
        multi.queued.iter().map(|words| lookup(&words[0]).expect("checked when queued")).collect();
    ctx.client.touched = true;
    if let Some(group) = &shared.group {
        if specs.iter().any(|spec| spec.write) {
            // Counted inside the writer gate: the commit that covers this count waits for the
            // whole transaction.
            group.writes.fetch_add(1, Ordering::SeqCst);
        }
    }
    ctx.out.array(specs.len());
    for (spec, words) in specs.into_iter().zip(&multi.queued) {
        let args: Vec<Arg<'_>> = words.iter().map(|w| Arg::Borrowed(w.as_slice())).collect();
        let ran = match (spec.write, shared.poisoned.get()) {
            (true, Some(why)) => Err(super::misconf(why)),
            _ => (spec.run)(ctx, &args),
        };
        if let Err(CmdError(text)) = ran {
            // A command's error is its reply; the others run, as in Redis.
            ctx.out.error(&text);
        }
    }
    Ok(Flow::Continue)
}
