//! The string commands: GET, SET, SETNX, GETSET, GETDEL, MGET, MSET, MSETNX, INCR, DECR,
//! INCRBY, DECRBY, APPEND, STRLEN, GETRANGE, SETRANGE.
//!
//! Read-modify-write commands (INCR, APPEND, GETSET, SET with XX or GET...) run as a
//! compare-and-swap loop on the map ([`update`]) rather than under a striped lock of the
//! server's: the map's `compare_and_swap` holds the key's segment lock, the very lock every
//! other write to that key takes (a plain SET or DEL included), so the update is atomic
//! against all of them without routing every write through a second lock; no lock is held
//! while the new value is computed (a large APPEND does not stall unrelated keys that would
//! share its stripe); and a failed swap means another write to the key succeeded, so the loop
//! is lock-free. Each swap is one map operation: durable when it returns in strict mode, and
//! never split by a FAMS sync.

use nvhtm::{AutoDomain, StrictMap};

use super::resp::Arg;
use super::{int_arg, wrong_arity, Access, CmdError, CmdResult, Ctx, Flow, Spec};

/// The string commands.
pub const COMMANDS: &[Spec] = &[
    Spec { name: "get", arity: 2, write: false, access: Access::Shared, run: get },
    Spec { name: "set", arity: -3, write: true, access: Access::Shared, run: set },
    Spec { name: "setnx", arity: 3, write: true, access: Access::Shared, run: setnx },
    Spec { name: "getset", arity: 3, write: true, access: Access::Shared, run: getset },
    Spec { name: "getdel", arity: 2, write: true, access: Access::Shared, run: getdel },
    Spec { name: "mget", arity: -2, write: false, access: Access::Shared, run: mget },
    Spec { name: "mset", arity: -3, write: true, access: Access::Exclusive, run: mset },
    Spec { name: "msetnx", arity: -3, write: true, access: Access::Exclusive, run: msetnx },
    Spec { name: "incr", arity: 2, write: true, access: Access::Shared, run: incr },
    Spec { name: "decr", arity: 2, write: true, access: Access::Shared, run: decr },
    Spec { name: "incrby", arity: 3, write: true, access: Access::Shared, run: incrby },
    Spec { name: "decrby", arity: 3, write: true, access: Access::Shared, run: decrby },
    Spec { name: "append", arity: 3, write: true, access: Access::Shared, run: append },
    Spec { name: "strlen", arity: 2, write: false, access: Access::Shared, run: strlen },
    Spec { name: "getrange", arity: 4, write: false, access: Access::Shared, run: getrange },
    Spec { name: "setrange", arity: 4, write: true, access: Access::Shared, run: setrange },
];

/// What a read-modify-write does to its key.
#[derive(Debug)]
pub enum Change {
    /// Nothing.
    Keep,
    /// Removes it.
    Delete,
    /// Sets this value.
    Set(Vec<u8>),
}

/// Atomically applies `f` to the value of `key` (`None`: absent): `f` says what to change and
/// what to answer; it is called again with the value another client wrote meanwhile when the
/// swap finds one. An error from `f` changes nothing.
pub fn update<R>(
    map: &StrictMap<AutoDomain>,
    key: &[u8],
    mut f: impl FnMut(Option<&[u8]>) -> Result<(Change, R), CmdError>,
) -> Result<R, CmdError> {
    let mut current = map.get(key)?;
    loop {
        let (change, answer) = f(current.as_deref())?;
        let new = match &change {
            Change::Keep => return Ok(answer),
            Change::Delete => None,
            Change::Set(value) => Some(value.as_slice()),
        };
        match map.compare_and_swap(key, current.as_deref(), new)? {
            Ok(()) => return Ok(answer),
            Err(actual) => current = actual,
        }
    }
}

fn get(ctx: &mut Ctx<'_>, args: &[Arg<'_>]) -> CmdResult {
    let out = &mut *ctx.out;
    if ctx.shared.map.get_with(&args[1], |value| out.bulk(value))?.is_none() {
        out.null();
    }
    Ok(Flow::Continue)
}

/// SET's condition on the key's presence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Condition {
    Always,
    /// NX: only when absent.
    Absent,
    /// XX: only when present.
    Present,
}

fn set(ctx: &mut Ctx<'_>, args: &[Arg<'_>]) -> CmdResult {
    let (key, value) = (&args[1], &args[2]);
    let mut condition = Condition::Always;
    let mut get_old = false;
    for option in &args[3..] {
        match option.to_ascii_lowercase().as_slice() {
            b"nx" if condition != Condition::Present => condition = Condition::Absent,
            b"xx" if condition != Condition::Absent => condition = Condition::Present,
            b"get" => get_old = true,
            // No key has a time to live, so keeping it is keeping none.
            b"keepttl" => {}
            b"ex" | b"px" | b"exat" | b"pxat" => {
                return Err(
                    "ERR SET's EX, PX, EXAT and PXAT are not supported yet: nvhtm keys do not expire".into()
                )
            }
            _ => return Err(CmdError::syntax()),
        }
    }
    let map = &ctx.shared.map;
    if !get_old {
        let done = match condition {
            Condition::Always => {
                map.upsert(key, value)?;
                true
            }
            Condition::Absent => map.insert(key, value)?,
            Condition::Present => update(map, key, |current| {
                Ok(match current {
                    Some(_) => (Change::Set(value.to_vec()), true),
                    None => (Change::Keep, false),
                })
            })?,
        };
        if done {
            ctx.out.ok();
        } else {
            ctx.out.null();
        }
        return Ok(Flow::Continue);
    }
    let old = update(map, key, |current| {
        let allowed = match condition {
            Condition::Always => true,
            Condition::Absent => current.is_none(),
            Condition::Present => current.is_some(),
        };
        let change = if allowed { Change::Set(value.to_vec()) } else { Change::Keep };
        Ok((change, current.map(<[u8]>::to_vec)))
    })?;
    ctx.out.bulk_or_null(old.as_deref());
    Ok(Flow::Continue)
}

fn setnx(ctx: &mut Ctx<'_>, args: &[Arg<'_>]) -> CmdResult {
    let inserted = ctx.shared.map.insert(&args[1], &args[2])?;
    ctx.out.int(i64::from(inserted));
    Ok(Flow::Continue)
}

fn getset(ctx: &mut Ctx<'_>, args: &[Arg<'_>]) -> CmdResult {
    let old = update(&ctx.shared.map, &args[1], |current| {
        Ok((Change::Set(args[2].to_vec()), current.map(<[u8]>::to_vec)))
    })?;
    ctx.out.bulk_or_null(old.as_deref());
    Ok(Flow::Continue)
}

fn getdel(ctx: &mut Ctx<'_>, args: &[Arg<'_>]) -> CmdResult {
    let old = update(&ctx.shared.map, &args[1], |current| {
        Ok(match current {
            Some(value) => (Change::Delete, Some(value.to_vec())),
            None => (Change::Keep, None),
        })
    })?;
    ctx.out.bulk_or_null(old.as_deref());
    Ok(Flow::Continue)
}

fn mget(ctx: &mut Ctx<'_>, args: &[Arg<'_>]) -> CmdResult {
    // Read them all before answering: an error must not leave half an array behind.
    let values = args[1..].iter().map(|key| ctx.shared.map.get(key)).collect::<Result<Vec<_>, _>>()?;
    ctx.out.array(values.len());
    for value in &values {
        ctx.out.bulk_or_null(value.as_deref());
    }
    Ok(Flow::Continue)
}

/// The key/value pairs of MSET and MSETNX (an odd count is a wrong number of arguments).
fn pairs<'a, 'b>(args: &'a [Arg<'b>], name: &str) -> Result<std::slice::ChunksExact<'a, Arg<'b>>, CmdError> {
    if args.len() % 2 == 0 {
        return Err(wrong_arity(name));
    }
    Ok(args[1..].chunks_exact(2))
}

fn mset(ctx: &mut Ctx<'_>, args: &[Arg<'_>]) -> CmdResult {
    for pair in pairs(args, "mset")? {
        ctx.shared.map.upsert(&pair[0], &pair[1])?;
    }
    ctx.out.ok();
    Ok(Flow::Continue)
}

fn msetnx(ctx: &mut Ctx<'_>, args: &[Arg<'_>]) -> CmdResult {
    // The keyspace is held alone: no key can appear between the check and the inserts.
    for pair in pairs(args, "msetnx")? {
        if ctx.shared.map.contains(&pair[0])? {
            ctx.out.int(0);
            return Ok(Flow::Continue);
        }
    }
    for pair in pairs(args, "msetnx")? {
        // A key repeated in the command: the last value wins, as in Redis.
        ctx.shared.map.upsert(&pair[0], &pair[1])?;
    }
    ctx.out.int(1);
    Ok(Flow::Continue)
}

/// Adds `by` to the integer stored at the key (0 when absent).
fn add(ctx: &mut Ctx<'_>, key: &[u8], by: i64) -> CmdResult {
    let new = update(&ctx.shared.map, key, |current| {
        let old = match current {
            None => 0,
            Some(text) => super::resp::parse_i64(text).ok_or_else(CmdError::not_integer)?,
        };
        let new =
            old.checked_add(by).ok_or_else(|| CmdError::from("ERR increment or decrement would overflow"))?;
        Ok((Change::Set(new.to_string().into_bytes()), new))
    })?;
    ctx.out.int(new);
    Ok(Flow::Continue)
}

fn incr(ctx: &mut Ctx<'_>, args: &[Arg<'_>]) -> CmdResult {
    add(ctx, &args[1], 1)
}

fn decr(ctx: &mut Ctx<'_>, args: &[Arg<'_>]) -> CmdResult {
    add(ctx, &args[1], -1)
}

fn incrby(ctx: &mut Ctx<'_>, args: &[Arg<'_>]) -> CmdResult {
    let by = int_arg(&args[2])?;
    add(ctx, &args[1], by)
}

fn decrby(ctx: &mut Ctx<'_>, args: &[Arg<'_>]) -> CmdResult {
    let by = int_arg(&args[2])?;
    let by = by.checked_neg().ok_or_else(|| CmdError::from("ERR decrement would overflow"))?;
    add(ctx, &args[1], by)
}

fn append(ctx: &mut Ctx<'_>, args: &[Arg<'_>]) -> CmdResult {
    let max = ctx.shared.limits.max_bulk;
    let len = update(&ctx.shared.map, &args[1], |current| {
        let mut value = current.unwrap_or_default().to_vec();
        if (value.len() + args[2].len()) as u64 > max {
            return Err("ERR string exceeds maximum allowed size (proto-max-bulk-len)".into());
        }
        value.extend_from_slice(&args[2]);
        let len = value.len() as i64;
        Ok((Change::Set(value), len))
    })?;
    ctx.out.int(len);
    Ok(Flow::Continue)
}

fn strlen(ctx: &mut Ctx<'_>, args: &[Arg<'_>]) -> CmdResult {
    let len = ctx.shared.map.get_with(&args[1], <[u8]>::len)?.unwrap_or(0);
    ctx.out.int(len as i64);
    Ok(Flow::Continue)
}

/// The bytes GETRANGE returns: Redis's rules for negative and out-of-range offsets.
pub fn range(value: &[u8], start: i64, end: i64) -> &[u8] {
    let len = value.len() as i64;
    if (start < 0 && end < 0 && start > end) || len == 0 {
        return &[];
    }
    let start = if start < 0 { (len + start).max(0) } else { start };
    let end = if end < 0 { (len + end).max(0) } else { end.min(len - 1) };
    if start > end {
        return &[];
    }
    &value[start as usize..=end as usize]
}

fn getrange(ctx: &mut Ctx<'_>, args: &[Arg<'_>]) -> CmdResult {
    let (start, end) = (int_arg(&args[2])?, int_arg(&args[3])?);
    let out = &mut *ctx.out;
    if ctx.shared.map.get_with(&args[1], |value| out.bulk(range(value, start, end)))?.is_none() {
        out.bulk(b"");
    }
    Ok(Flow::Continue)
}

fn setrange(ctx: &mut Ctx<'_>, args: &[Arg<'_>]) -> CmdResult {
    let offset = int_arg(&args[2])?;
    let offset = usize::try_from(offset).map_err(|_| CmdError::from("ERR offset is out of range"))?;
    let patch = &args[3];
    let max = ctx.shared.limits.max_bulk;
    let len = update(&ctx.shared.map, &args[1], |current| {
        if patch.is_empty() {
            // Nothing to write: the length as it is, and no key created.
            return Ok((Change::Keep, current.map_or(0, <[u8]>::len)));
        }
        if (offset as u64).saturating_add(patch.len() as u64) > max {
            return Err("ERR string exceeds maximum allowed size (proto-max-bulk-len)".into());
        }
        let mut value = current.unwrap_or_default().to_vec();
        if value.len() < offset + patch.len() {
            value.resize(offset + patch.len(), 0);
        }
        value[offset..offset + patch.len()].copy_from_slice(patch);
        let len = value.len();
        Ok((Change::Set(value), len))
    })?;
    ctx.out.int(len as i64);
    Ok(Flow::Continue)
}

#[cfg(test)]
mod tests {
    use super::range;

    #[test]
    fn getrange_follows_redis() {
        let v = b"This is a string";
        assert_eq!(range(v, 0, 3), b"This");
        assert_eq!(range(v, -3, -1), b"ing");
        assert_eq!(range(v, 0, -1), v);
        assert_eq!(range(v, 10, 100), b"string");
        assert_eq!(range(v, 5, 3), b"");
        assert_eq!(range(v, -1, -5), b"");
        assert_eq!(range(v, -100, 2), b"Thi");
        assert_eq!(range(b"", 0, -1), b"");
        assert_eq!(range(v, 100, 200), b"");
    }
}
