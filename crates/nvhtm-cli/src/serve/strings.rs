//! The string commands: GET, SET, SETNX, SETEX, PSETEX, GETEX, GETSET, GETDEL, MGET, MSET,
//! MSETNX, INCR, DECR, INCRBY, DECRBY, INCRBYFLOAT, APPEND, STRLEN, GETRANGE, SETRANGE.
//!
//! Read-modify-write commands (INCR, APPEND, GETSET, SET with XX or GET...) are
//! compare-and-swap loops on the map ([`Db::update`](super::db::Db::update)): atomic against
//! every other write to the key without a second lock. As in Redis, SET, SETEX, PSETEX,
//! GETSET and MSET give the key the time to live they name (none unless asked; SET KEEPTTL
//! keeps the old one); INCR, APPEND, SETRANGE and the like keep the key's.

use super::db::Change;
use super::expire::{positive_deadline, Unit};
use super::resp::Arg;
use super::{int_arg, wrong_arity, Access, CmdError, CmdResult, Ctx, Flow, Spec};

/// The string commands.
pub const COMMANDS: &[Spec] = &[
    Spec { name: "get", arity: 2, write: false, access: Access::Shared, run: get },
    Spec { name: "set", arity: -3, write: true, access: Access::Shared, run: set },
    Spec { name: "setnx", arity: 3, write: true, access: Access::Shared, run: setnx },
    Spec { name: "setex", arity: 4, write: true, access: Access::Shared, run: setex },
    Spec { name: "psetex", arity: 4, write: true, access: Access::Shared, run: psetex },
    Spec { name: "getex", arity: -2, write: true, access: Access::Shared, run: getex },
    Spec { name: "getset", arity: 3, write: true, access: Access::Shared, run: getset },
    Spec { name: "getdel", arity: 2, write: true, access: Access::Shared, run: getdel },
    Spec { name: "mget", arity: -2, write: false, access: Access::Shared, run: mget },
    Spec { name: "mset", arity: -3, write: true, access: Access::Exclusive, run: mset },
    Spec { name: "msetnx", arity: -3, write: true, access: Access::Exclusive, run: msetnx },
    Spec { name: "incr", arity: 2, write: true, access: Access::Shared, run: incr },
    Spec { name: "decr", arity: 2, write: true, access: Access::Shared, run: decr },
    Spec { name: "incrby", arity: 3, write: true, access: Access::Shared, run: incrby },
    Spec { name: "decrby", arity: 3, write: true, access: Access::Shared, run: decrby },
    Spec { name: "incrbyfloat", arity: 3, write: true, access: Access::Shared, run: incrbyfloat },
    Spec { name: "append", arity: 3, write: true, access: Access::Shared, run: append },
    Spec { name: "strlen", arity: 2, write: false, access: Access::Shared, run: strlen },
    Spec { name: "getrange", arity: 4, write: false, access: Access::Shared, run: getrange },
    Spec { name: "setrange", arity: 4, write: true, access: Access::Shared, run: setrange },
];

fn get(ctx: &mut Ctx<'_>, args: &[Arg<'_>]) -> CmdResult {
    let out = &mut *ctx.out;
    if ctx.shared.db.get_with(&args[1], |entry| out.bulk(entry.value))?.is_none() {
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

/// The time to live a SET or GETEX gives the key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ttl {
    /// None (SET without an option), or removed (GETEX PERSIST).
    Clear,
    /// The key's own (SET KEEPTTL; GETEX without an option).
    Keep,
    /// This deadline, Unix ms.
    At(u64),
}

/// SET's and GETEX's options, parsed as Redis parses them
/// (`parseExtendedStringArgumentsOrReply`): NX and XX exclude each other, KEEPTTL (SET) and
/// PERSIST (GETEX) exclude the expire options, and these exclude each other but not
/// themselves (`EX 1 EX 2`: the last wins); anything else is a syntax error.
struct Options {
    condition: Condition,
    get: bool,
    ttl: Ttl,
}

fn options(args: &[Arg<'_>], command: &str) -> Result<Options, CmdError> {
    let is_set = command == "set";
    let mut o = Options {
        condition: Condition::Always,
        get: false,
        ttl: if is_set { Ttl::Clear } else { Ttl::Keep },
    };
    let (mut keepttl, mut persist) = (false, false);
    // The expire option seen (its name, lower case) and its time.
    let mut expire: Option<(Vec<u8>, &[u8])> = None;
    let mut i = 0;
    while i < args.len() {
        let option = args[i].to_ascii_lowercase();
        let next = args.get(i + 1);
        let other_expire = |name: &[u8]| expire.as_ref().is_some_and(|(seen, _)| seen != name);
        match option.as_slice() {
            b"nx" if is_set && o.condition != Condition::Present => o.condition = Condition::Absent,
            b"xx" if is_set && o.condition != Condition::Absent => o.condition = Condition::Present,
            b"get" if is_set => o.get = true,
            b"keepttl" if is_set && expire.is_none() => keepttl = true,
            b"persist" if !is_set && expire.is_none() => persist = true,
            b"ex" | b"px" | b"exat" | b"pxat"
                if !keepttl && !persist && !other_expire(&option) && next.is_some() =>
            {
                expire = Some((option, next.expect("checked")));
                i += 1;
            }
            _ => return Err(CmdError::syntax()),
        }
        i += 1;
    }
    if keepttl {
        o.ttl = Ttl::Keep;
    }
    if persist {
        o.ttl = Ttl::Clear;
    }
    if let Some((name, time)) = expire {
        let (unit, absolute) = match name.as_slice() {
            b"ex" => (Unit::Seconds, false),
            b"px" => (Unit::Millis, false),
            b"exat" => (Unit::Seconds, true),
            _ => (Unit::Millis, true),
        };
        o.ttl = Ttl::At(positive_deadline(time, unit, absolute, command)?);
    }
    Ok(o)
}

fn set(ctx: &mut Ctx<'_>, args: &[Arg<'_>]) -> CmdResult {
    let (key, value) = (&args[1], &args[2]);
    let o = options(&args[3..], "set")?;
    let db = &ctx.shared.db;
    if !o.get && o.condition == Condition::Always && o.ttl != Ttl::Keep {
        // The common case: one upsert, no read.
        db.set(
            key,
            value,
            match o.ttl {
                Ttl::At(at) => Some(at),
                _ => None,
            },
        )?;
        ctx.out.ok();
        return Ok(Flow::Continue);
    }
    let (done, old) = db.update(key, |entry| {
        let allowed = match o.condition {
            Condition::Always => true,
            Condition::Absent => entry.is_none(),
            Condition::Present => entry.is_some(),
        };
        let old = if o.get { entry.map(|e| e.value.to_vec()) } else { None };
        if !allowed {
            return Ok((Change::Keep, (false, old)));
        }
        let deadline = match o.ttl {
            Ttl::Clear => None,
            Ttl::Keep => entry.and_then(|e| e.deadline),
            Ttl::At(at) => Some(at),
        };
        Ok((Change::Set(value.to_vec(), deadline), (true, old)))
    })?;
    if o.get {
        ctx.out.bulk_or_null(old.as_deref());
    } else if done {
        ctx.out.ok();
    } else {
        ctx.out.null();
    }
    Ok(Flow::Continue)
}

/// Sets `key` to `value` unless it is live: whether it was set.
fn set_if_absent(ctx: &Ctx<'_>, key: &[u8], value: &[u8]) -> Result<bool, CmdError> {
    ctx.shared.db.update(key, |entry| {
        Ok(match entry {
            Some(_) => (Change::Keep, false),
            None => (Change::Set(value.to_vec(), None), true),
        })
    })
}

fn setnx(ctx: &mut Ctx<'_>, args: &[Arg<'_>]) -> CmdResult {
    let inserted = set_if_absent(ctx, &args[1], &args[2])?;
    ctx.out.int(i64::from(inserted));
    Ok(Flow::Continue)
}

fn setex_generic(ctx: &mut Ctx<'_>, args: &[Arg<'_>], unit: Unit, name: &str) -> CmdResult {
    let deadline = positive_deadline(&args[2], unit, false, name)?;
    ctx.shared.db.set(&args[1], &args[3], Some(deadline))?;
    ctx.out.ok();
    Ok(Flow::Continue)
}

fn setex(ctx: &mut Ctx<'_>, args: &[Arg<'_>]) -> CmdResult {
    setex_generic(ctx, args, Unit::Seconds, "setex")
}

fn psetex(ctx: &mut Ctx<'_>, args: &[Arg<'_>]) -> CmdResult {
    setex_generic(ctx, args, Unit::Millis, "psetex")
}

/// `GETEX key [EX s|PX ms|EXAT t|PXAT t|PERSIST]`: the value, and the key's time to live
/// changed; a deadline already passed deletes the key (the value is still answered).
fn getex(ctx: &mut Ctx<'_>, args: &[Arg<'_>]) -> CmdResult {
    let o = options(&args[2..], "getex")?;
    let now = super::db::now_ms();
    let value = ctx.shared.db.update(&args[1], |entry| {
        let Some(entry) = entry else { return Ok((Change::Keep, None)) };
        let change = match o.ttl {
            Ttl::Keep => Change::Keep,
            Ttl::Clear if entry.deadline.is_none() => Change::Keep,
            Ttl::Clear => Change::Set(entry.value.to_vec(), None),
            Ttl::At(at) if at <= now => Change::Delete,
            Ttl::At(at) => Change::Set(entry.value.to_vec(), Some(at)),
        };
        Ok((change, Some(entry.value.to_vec())))
    })?;
    ctx.out.bulk_or_null(value.as_deref());
    Ok(Flow::Continue)
}

fn getset(ctx: &mut Ctx<'_>, args: &[Arg<'_>]) -> CmdResult {
    let old = ctx.shared.db.update(&args[1], |entry| {
        Ok((Change::Set(args[2].to_vec(), None), entry.map(|e| e.value.to_vec())))
    })?;
    ctx.out.bulk_or_null(old.as_deref());
    Ok(Flow::Continue)
}

fn getdel(ctx: &mut Ctx<'_>, args: &[Arg<'_>]) -> CmdResult {
    let old = ctx.shared.db.update(&args[1], |entry| {
        Ok(match entry {
            Some(entry) => (Change::Delete, Some(entry.value.to_vec())),
            None => (Change::Keep, None),
        })
    })?;
    ctx.out.bulk_or_null(old.as_deref());
    Ok(Flow::Continue)
}

fn mget(ctx: &mut Ctx<'_>, args: &[Arg<'_>]) -> CmdResult {
    // Read them all before answering: an error must not leave half an array behind.
    let values = args[1..].iter().map(|key| ctx.shared.db.get(key)).collect::<Result<Vec<_>, _>>()?;
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
        ctx.shared.db.set(&pair[0], &pair[1], None)?;
    }
    ctx.out.ok();
    Ok(Flow::Continue)
}

fn msetnx(ctx: &mut Ctx<'_>, args: &[Arg<'_>]) -> CmdResult {
    // The keyspace is held alone: no key can appear between the check and the inserts.
    for pair in pairs(args, "msetnx")? {
        if ctx.shared.db.contains(&pair[0])? {
            ctx.out.int(0);
            return Ok(Flow::Continue);
        }
    }
    for pair in pairs(args, "msetnx")? {
        // A key repeated in the command: the last value wins, as in Redis.
        ctx.shared.db.set(&pair[0], &pair[1], None)?;
    }
    ctx.out.int(1);
    Ok(Flow::Continue)
}

/// Adds `by` to the integer stored at the key (0 when absent).
fn add(ctx: &mut Ctx<'_>, key: &[u8], by: i64) -> CmdResult {
    let new = ctx.shared.db.update(key, |entry| {
        let old = match entry {
            None => 0,
            Some(entry) => super::resp::parse_i64(entry.value).ok_or_else(CmdError::not_integer)?,
        };
        let new =
            old.checked_add(by).ok_or_else(|| CmdError::from("ERR increment or decrement would overflow"))?;
        Ok((Change::Set(new.to_string().into_bytes(), entry.and_then(|e| e.deadline)), new))
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

/// Redis's `string2ld` for INCRBYFLOAT: a decimal float without surrounding spaces; not NaN.
fn parse_float(text: &[u8]) -> Option<f64> {
    let text = std::str::from_utf8(text).ok()?;
    if text.is_empty()
        || text.starts_with(|c: char| c.is_ascii_whitespace())
        || text.ends_with(|c: char| c.is_ascii_whitespace())
    {
        return None;
    }
    text.parse::<f64>().ok().filter(|x| !x.is_nan())
}

/// INCRBYFLOAT's result as Redis writes it (`%.17Lg` in its "human" form): no exponent, no
/// trailing zeros. Rust's shortest round-trip form of an `f64`; Redis computes in `long
/// double`, so a long sum of fractions may differ in its last digits.
fn format_float(x: f64) -> String {
    let text = format!("{x}");
    if text == "-0" {
        "0".to_string()
    } else {
        text
    }
}

fn incrbyfloat(ctx: &mut Ctx<'_>, args: &[Arg<'_>]) -> CmdResult {
    let by = parse_float(&args[2]).ok_or_else(|| CmdError::from("ERR value is not a valid float"))?;
    let text = ctx.shared.db.update(&args[1], |entry| {
        let old = match entry {
            None => 0.0,
            Some(entry) => {
                parse_float(entry.value).ok_or_else(|| CmdError::from("ERR value is not a valid float"))?
            }
        };
        let new = old + by;
        if !new.is_finite() {
            return Err("ERR increment would produce NaN or Infinity".into());
        }
        let text = format_float(new);
        Ok((Change::Set(text.clone().into_bytes(), entry.and_then(|e| e.deadline)), text))
    })?;
    ctx.out.bulk(text.as_bytes());
    Ok(Flow::Continue)
}

fn append(ctx: &mut Ctx<'_>, args: &[Arg<'_>]) -> CmdResult {
    let max = ctx.shared.limits.max_bulk;
    let len = ctx.shared.db.update(&args[1], |entry| {
        let mut value = entry.map_or(&[][..], |e| e.value).to_vec();
        if (value.len() + args[2].len()) as u64 > max {
            return Err("ERR string exceeds maximum allowed size (proto-max-bulk-len)".into());
        }
        value.extend_from_slice(&args[2]);
        let len = value.len() as i64;
        Ok((Change::Set(value, entry.and_then(|e| e.deadline)), len))
    })?;
    ctx.out.int(len);
    Ok(Flow::Continue)
}

fn strlen(ctx: &mut Ctx<'_>, args: &[Arg<'_>]) -> CmdResult {
    let len = ctx.shared.db.get_with(&args[1], |entry| entry.value.len())?.unwrap_or(0);
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
    if ctx.shared.db.get_with(&args[1], |entry| out.bulk(range(entry.value, start, end)))?.is_none() {
        out.bulk(b"");
    }
    Ok(Flow::Continue)
}

fn setrange(ctx: &mut Ctx<'_>, args: &[Arg<'_>]) -> CmdResult {
    let offset = int_arg(&args[2])?;
    let offset = usize::try_from(offset).map_err(|_| CmdError::from("ERR offset is out of range"))?;
    let patch = &args[3];
    let max = ctx.shared.limits.max_bulk;
    let len = ctx.shared.db.update(&args[1], |entry| {
        if patch.is_empty() {
            // Nothing to write: the length as it is, and no key created.
            return Ok((Change::Keep, entry.map_or(0, |e| e.value.len())));
        }
        if (offset as u64).saturating_add(patch.len() as u64) > max {
            return Err("ERR string exceeds maximum allowed size (proto-max-bulk-len)".into());
        }
        let mut value = entry.map_or(&[][..], |e| e.value).to_vec();
        if value.len() < offset + patch.len() {
            value.resize(offset + patch.len(), 0);
        }
        value[offset..offset + patch.len()].copy_from_slice(patch);
        let len = value.len();
        Ok((Change::Set(value, entry.and_then(|e| e.deadline)), len))
    })?;
    ctx.out.int(len as i64);
    Ok(Flow::Continue)
}

#[cfg(test)]
mod tests {
    use super::{format_float, parse_float, range};

    #[test]
    fn floats_parse_and_print_like_redis() {
        assert_eq!(parse_float(b"10.5"), Some(10.5));
        assert_eq!(parse_float(b"5.0e3"), Some(5000.0));
        assert_eq!(parse_float(b" 1"), None);
        assert_eq!(parse_float(b"1 "), None);
        assert_eq!(parse_float(b"nan"), None);
        assert_eq!(parse_float(b"abc"), None);
        assert_eq!(parse_float(b""), None);
        assert_eq!(format_float(10.5 + 0.1), "10.6");
        assert_eq!(format_float(5000.0 + 200.0), "5200");
        assert_eq!(format_float(-0.0), "0");
        assert_eq!(format_float(1e21), "1000000000000000000000");
    }

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
