//! The keyspace commands: DEL, UNLINK, EXISTS, TYPE, RENAME, RENAMENX, DBSIZE, KEYS, SCAN,
//! RANDOMKEY, FLUSHDB, FLUSHALL. (The expiry commands are in [`super::expire`].)

use std::collections::BTreeMap;
use std::hash::BuildHasher;

use super::resp::Arg;
use super::{int_arg, Access, CmdError, CmdResult, Ctx, Flow, Spec};

/// The keyspace commands.
pub const COMMANDS: &[Spec] = &[
    Spec { name: "del", arity: -2, write: true, access: Access::ExclusiveIfSeveral, run: del },
    Spec { name: "unlink", arity: -2, write: true, access: Access::ExclusiveIfSeveral, run: del },
    Spec { name: "exists", arity: -2, write: false, access: Access::Shared, run: exists },
    Spec { name: "type", arity: 2, write: false, access: Access::Shared, run: key_type },
    Spec { name: "rename", arity: 3, write: true, access: Access::Exclusive, run: rename },
    Spec { name: "renamenx", arity: 3, write: true, access: Access::Exclusive, run: renamenx },
    Spec { name: "dbsize", arity: 1, write: false, access: Access::Shared, run: dbsize },
    Spec { name: "keys", arity: 2, write: false, access: Access::Shared, run: keys },
    Spec { name: "scan", arity: -2, write: false, access: Access::Shared, run: scan },
    Spec { name: "randomkey", arity: 1, write: false, access: Access::Shared, run: randomkey },
    Spec { name: "flushdb", arity: -1, write: true, access: Access::Exclusive, run: flush },
    Spec { name: "flushall", arity: -1, write: true, access: Access::Exclusive, run: flush },
];

fn del(ctx: &mut Ctx<'_>, args: &[Arg<'_>]) -> CmdResult {
    let mut removed = 0;
    for key in &args[1..] {
        removed += i64::from(ctx.shared.db.remove(key)?);
    }
    ctx.out.int(removed);
    Ok(Flow::Continue)
}

fn exists(ctx: &mut Ctx<'_>, args: &[Arg<'_>]) -> CmdResult {
    let mut found = 0;
    for key in &args[1..] {
        found += i64::from(ctx.shared.db.contains(key)?);
    }
    ctx.out.int(found);
    Ok(Flow::Continue)
}

fn key_type(ctx: &mut Ctx<'_>, args: &[Arg<'_>]) -> CmdResult {
    let present = ctx.shared.db.contains(&args[1])?;
    ctx.out.simple(if present { "string" } else { "none" });
    Ok(Flow::Continue)
}

/// Moves the value of `from`, with its time to live, to `to` (replacing it unless `keep`):
/// whether it moved. The keyspace is held alone, so no client sees both keys or neither; in a
/// FAMS pool no sync splits the move, in a mapped pool a crash between its two writes leaves
/// both keys.
fn rename_key(ctx: &mut Ctx<'_>, from: &[u8], to: &[u8], keep: bool) -> Result<bool, CmdError> {
    let db = &ctx.shared.db;
    let (value, deadline) = db
        .get_with(from, |entry| (entry.value.to_vec(), entry.deadline))?
        .ok_or_else(|| CmdError::from("ERR no such key"))?;
    if from == to {
        return Ok(!keep);
    }
    if keep && db.contains(to)? {
        return Ok(false);
    }
    db.set(to, &value, deadline)?;
    db.remove(from)?;
    Ok(true)
}

fn rename(ctx: &mut Ctx<'_>, args: &[Arg<'_>]) -> CmdResult {
    rename_key(ctx, &args[1], &args[2], false)?;
    ctx.out.ok();
    Ok(Flow::Continue)
}

fn renamenx(ctx: &mut Ctx<'_>, args: &[Arg<'_>]) -> CmdResult {
    let moved = rename_key(ctx, &args[1], &args[2], true)?;
    ctx.out.int(i64::from(moved));
    Ok(Flow::Continue)
}

fn dbsize(ctx: &mut Ctx<'_>, _args: &[Arg<'_>]) -> CmdResult {
    let len = ctx.shared.db.len()?;
    ctx.out.int(i64::try_from(len).unwrap_or(i64::MAX));
    Ok(Flow::Continue)
}

fn keys(ctx: &mut Ctx<'_>, args: &[Arg<'_>]) -> CmdResult {
    let pattern = &args[1];
    let mut found = Vec::new();
    ctx.shared.db.for_each(|key, _| {
        if glob_match(pattern, key, false) {
            found.push(key.to_vec());
        }
        true
    })?;
    ctx.out.array(found.len());
    for key in &found {
        ctx.out.bulk(key);
    }
    Ok(Flow::Continue)
}

/// SCAN cursor [MATCH pattern] [COUNT n] [TYPE type].
///
/// The cursor is a position in the order of a per-run keyed hash of the keys: a call returns
/// the keys whose hash is at least the cursor, the `COUNT` lowest hashes of them, and the next
/// cursor is one past the highest hash returned (0 when none is left). A key present for the
/// whole iteration is therefore returned (its hash does not change) and returned once. The
/// map offers no walk that resumes from a position, so each call walks the whole map: SCAN
/// costs O(keys) per call, not O(COUNT).
fn scan(ctx: &mut Ctx<'_>, args: &[Arg<'_>]) -> CmdResult {
    let cursor = std::str::from_utf8(&args[1])
        .ok()
        .and_then(|text| text.parse::<u64>().ok())
        .ok_or_else(|| CmdError::from("ERR invalid cursor"))?;
    let mut pattern: Option<&[u8]> = None;
    let mut count = 10usize;
    let mut strings = true;
    let mut options = args[2..].iter();
    while let Some(option) = options.next() {
        let value = options.next().ok_or_else(CmdError::syntax)?;
        match option.to_ascii_lowercase().as_slice() {
            b"match" => pattern = Some(value),
            b"count" => {
                count = usize::try_from(int_arg(value)?).map_err(|_| CmdError::syntax())?;
                if count == 0 {
                    return Err(CmdError::syntax());
                }
            }
            // Every key is a string.
            b"type" => strings = value.eq_ignore_ascii_case(b"string"),
            _ => return Err(CmdError::syntax()),
        }
    }
    let hasher = &ctx.shared.scan_hasher;
    // The `count` lowest hashes at or past the cursor, with every key of each.
    let mut batch: BTreeMap<u64, Vec<Vec<u8>>> = BTreeMap::new();
    let mut more = false;
    if strings {
        ctx.shared.db.for_each(|key, _| {
            let hash = hasher.hash_one(key);
            if hash < cursor || pattern.is_some_and(|p| !glob_match(p, key, false)) {
                return true;
            }
            if batch.len() == count && !batch.contains_key(&hash) {
                let highest = *batch.keys().next_back().expect("count > 0");
                more = true;
                if hash > highest {
                    return true;
                }
                batch.remove(&highest);
            }
            batch.entry(hash).or_default().push(key.to_vec());
            true
        })?;
    }
    let next = match batch.keys().next_back() {
        Some(&highest) if more => highest.checked_add(1).unwrap_or(0),
        _ => 0,
    };
    ctx.out.array(2);
    ctx.out.bulk(next.to_string().as_bytes());
    ctx.out.array(batch.values().map(Vec::len).sum());
    for key in batch.values().flatten() {
        ctx.out.bulk(key);
    }
    Ok(Flow::Continue)
}

/// RANDOMKEY: a live key chosen uniformly at random, or nil. The map offers no random access,
/// so this walks it: O(keys) per call (reservoir sampling, one pass).
fn randomkey(ctx: &mut Ctx<'_>, _args: &[Arg<'_>]) -> CmdResult {
    let mut chosen: Option<Vec<u8>> = None;
    let mut seen = 0u64;
    ctx.shared.db.for_each(|key, _| {
        seen += 1;
        if fastrand::u64(..seen) == 0 {
            chosen = Some(key.to_vec());
        }
        true
    })?;
    ctx.out.bulk_or_null(chosen.as_deref());
    Ok(Flow::Continue)
}

fn flush(ctx: &mut Ctx<'_>, args: &[Arg<'_>]) -> CmdResult {
    match &args[1..] {
        [] => {}
        [mode] if mode.eq_ignore_ascii_case(b"sync") || mode.eq_ignore_ascii_case(b"async") => {}
        _ => return Err(CmdError::syntax()),
    }
    ctx.shared.db.clear()?;
    ctx.out.ok();
    Ok(Flow::Continue)
}

/// Redis's glob (`stringmatchlen`): `*`, `?`, `[abc]`, `[^a-z]`, and `\` escaping the next
/// byte. Backtracks only to the last `*`, so it runs in O(pattern × text).
pub fn glob_match(pattern: &[u8], text: &[u8], nocase: bool) -> bool {
    let eq = |a: u8, b: u8| if nocase { a.eq_ignore_ascii_case(&b) } else { a == b };
    let (mut p, mut t) = (0, 0);
    // Where to resume after the last `*`: the pattern after it, and the text it will absorb.
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        let step = match pattern.get(p) {
            Some(b'*') => {
                star = Some((p + 1, t));
                p += 1;
                continue;
            }
            Some(b'?') => Some(p + 1),
            Some(b'[') => match_class(pattern, p, text[t], nocase),
            Some(b'\\') if p + 1 < pattern.len() => eq(pattern[p + 1], text[t]).then_some(p + 2),
            Some(&c) => eq(c, text[t]).then_some(p + 1),
            None => None,
        };
        match (step, star) {
            (Some(next), _) => {
                p = next;
                t += 1;
            }
            (None, Some((after, absorbed))) => {
                p = after;
                t = absorbed + 1;
                star = Some((after, absorbed + 1));
            }
            (None, None) => return false,
        }
    }
    pattern[p..].iter().all(|&c| c == b'*')
}

/// Matches `c` against the class at `pattern[open] == b'['`: the pattern position after the
/// class when it matches. An unterminated class runs to the end of the pattern, as in Redis.
fn match_class(pattern: &[u8], open: usize, c: u8, nocase: bool) -> Option<usize> {
    let fold = |b: u8| if nocase { b.to_ascii_lowercase() } else { b };
    let mut i = open + 1;
    let negate = pattern.get(i) == Some(&b'^');
    if negate {
        i += 1;
    }
    let mut matched = false;
    loop {
        match pattern.get(i) {
            None => break,
            Some(b']') => {
                i += 1;
                break;
            }
            Some(b'\\') if i + 1 < pattern.len() => {
                matched |= fold(pattern[i + 1]) == fold(c);
                i += 2;
            }
            Some(&low) if pattern.get(i + 1) == Some(&b'-') && i + 2 < pattern.len() => {
                let high = pattern[i + 2];
                let (low, high) = if low > high { (high, low) } else { (low, high) };
                matched |= (fold(low)..=fold(high)).contains(&fold(c));
                i += 3;
            }
            Some(&b) => {
                matched |= fold(b) == fold(c);
                i += 1;
            }
        }
    }
    (matched != negate).then_some(i)
}

#[cfg(test)]
mod tests {
    use super::glob_match;

    #[test]
    fn globs_match_like_redis() {
        let cases: &[(&str, &str, bool)] = &[
            ("*", "", true),
            ("*", "anything", true),
            ("h?llo", "hello", true),
            ("h?llo", "hllo", false),
            ("h*llo", "heeeello", true),
            ("h*llo", "hellox", false),
            ("h[ae]llo", "hallo", true),
            ("h[ae]llo", "hillo", false),
            ("h[^e]llo", "hallo", true),
            ("h[^e]llo", "hello", false),
            ("h[a-b]llo", "hbllo", true),
            ("h[a-b]llo", "hcllo", false),
            ("h\\*llo", "h*llo", true),
            ("h\\*llo", "hello", false),
            ("user:*:name", "user:42:name", true),
            ("user:*:name", "user:42:age", false),
            ("*a*b*c", "xxaxxbxxc", true),
            ("*a*b*c", "xxaxxbxx", false),
            ("a*", "b", false),
        ];
        for &(pattern, text, want) in cases {
            assert_eq!(glob_match(pattern.as_bytes(), text.as_bytes(), false), want, "{pattern} ~ {text}");
        }
        assert!(glob_match(b"HELLO", b"hello", true));
        // No exponential blow-up on adversarial patterns.
        let text = vec![b'a'; 4000];
        assert!(!glob_match(&[b"*a".repeat(30), b"b".to_vec()].concat(), &text, false));
    }
}
