//! The keyspace as the commands see it: the map's values decoded into a value and its time
//! to live, expired keys treated as absent, a version per key stripe for WATCH, and the index
//! of deadlines the active expiry sweep works from.
//!
//! # How a time to live is stored
//!
//! A key with a time to live is stored with a 16-byte header in front of its value, in the
//! same map entry, so that the value and its deadline are written by one map operation
//! (durable together in strict mode, never split by a FAMS sync):
//!
//! ```text
//! +0  MAGIC        8 bytes: F5 'n' 'v' 'x' F6 E7 00 01 (the last byte is the header's version)
//! +8  deadline     u64, little-endian: Unix time in milliseconds; 0: no deadline
//! +16 the value
//! ```
//!
//! A key without one is stored as its bare value, as every earlier version stored every key,
//! so pools written before expiry read unchanged. A bare value that itself begins with MAGIC
//! is stored with a header whose deadline is 0, so what this version writes always decodes
//! to what was written. The one ambiguity left: a value written by an earlier version (or by
//! `nvhtm load`) that begins with these 8 bytes, at least 16 long, is read as a header. The
//! bytes are chosen to make that unlikely for text (F5, F6 and E7 00 never occur in UTF-8)
//! and random binary data (2^-64), not impossible for data crafted to match.

use std::borrow::Cow;
use std::collections::{BTreeSet, HashMap};
use std::hash::{BuildHasher, BuildHasherDefault, DefaultHasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use nvhtm::any_map::AnyMap;
use nvhtm::{AutoDomain, MapError};

use super::CmdError;

/// The first bytes of a value stored with a header.
pub const MAGIC: [u8; 8] = [0xF5, b'n', b'v', b'x', 0xF6, 0xE7, 0x00, 0x01];

/// The header's length: MAGIC and the deadline.
pub const HEADER: usize = 16;

/// Stripes of WATCH versions (a power of two).
const STRIPES: usize = 1 << 14;

/// Shards of the deadline index, each behind its own lock (a power of two), so that
/// connections setting TTLs on different keys rarely wait for each other.
const TIMER_SHARDS: usize = 16;

thread_local! {
    /// The time this thread's EXEC runs at (see [`frozen`]).
    static FROZEN: std::cell::Cell<Option<u64>> = const { std::cell::Cell::new(None) };
}

/// Milliseconds since the Unix epoch: the clock's, or the instant an EXEC on this thread
/// runs at.
pub fn now_ms() -> u64 {
    FROZEN
        .with(std::cell::Cell::get)
        .unwrap_or_else(|| SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64))
}

/// Runs `f` with [`now_ms`] stopped at the current instant on this thread, as Redis stops the
/// clock for a transaction: every command of an EXEC sees the same keys expired, and relative
/// times (EXPIRE, SET EX) count from the same instant.
pub fn frozen<R>(f: impl FnOnce() -> R) -> R {
    struct Thaw;
    impl Drop for Thaw {
        fn drop(&mut self) {
            FROZEN.with(|frozen| frozen.set(None));
        }
    }
    let now = now_ms();
    FROZEN.with(|frozen| frozen.set(Some(now)));
    let _thaw = Thaw;
    f()
}

/// A stored value split into the value and its deadline (Unix ms), if any.
pub fn decode(raw: &[u8]) -> (&[u8], Option<u64>) {
    if raw.len() >= HEADER && raw[..8] == MAGIC {
        let deadline = u64::from_le_bytes(raw[8..16].try_into().expect("8 bytes"));
        (&raw[HEADER..], (deadline != 0).then_some(deadline))
    } else {
        (raw, None)
    }
}

/// The stored form of `value` with `deadline`: the bare value when it has none and does not
/// begin with MAGIC (no copy).
pub fn encode(value: &[u8], deadline: Option<u64>) -> Cow<'_, [u8]> {
    if deadline.is_none() && !value.starts_with(&MAGIC) {
        return Cow::Borrowed(value);
    }
    let mut stored = Vec::with_capacity(HEADER + value.len());
    stored.extend_from_slice(&MAGIC);
    stored.extend_from_slice(&deadline.unwrap_or(0).to_le_bytes());
    stored.extend_from_slice(value);
    Cow::Owned(stored)
}

/// Whether a deadline has passed at `now`.
pub fn expired(deadline: Option<u64>, now: u64) -> bool {
    deadline.is_some_and(|at| at <= now)
}

/// A live key's value and deadline.
#[derive(Debug, Clone, Copy)]
pub struct Entry<'a> {
    /// The value.
    pub value: &'a [u8],
    /// When it expires (Unix ms), if it does.
    pub deadline: Option<u64>,
}

/// What a read-modify-write does to its key.
#[derive(Debug)]
pub enum Change {
    /// Nothing.
    Keep,
    /// Removes it.
    Delete,
    /// Sets this value with this deadline (pass the entry's own to keep its time to live).
    Set(Vec<u8>, Option<u64>),
}

/// Keys with a deadline, by deadline: what the active sweep deletes when it comes. A hint,
/// never the truth: every deadline is checked against the stored value before a key is
/// deleted, and an entry may outlive its key's deadline being removed or moved (it is then
/// dropped or moved when it comes due). Rebuilt from the pool after a start.
#[derive(Debug, Default)]
struct Timers {
    by_key: HashMap<Vec<u8>, u64>,
    by_time: BTreeSet<(u64, Vec<u8>)>,
}

/// The keyspace: the map and what the server keeps beside it in memory.
#[derive(Debug)]
pub struct Db {
    /// The map, with stored (encoded) values.
    pub map: AnyMap<AutoDomain>,
    /// A version per stripe of keys, bumped after every write to a key of the stripe.
    versions: Box<[AtomicU64]>,
    /// Bumped by FLUSHDB and FLUSHALL, which change every key.
    flushes: AtomicU64,
    /// Keys the sweep deleted since start (INFO's `expired_keys`).
    expired: AtomicU64,
    /// The deadline index, sharded by the key's hash.
    timers: Box<[Mutex<Timers>]>,
}

/// What WATCH remembers of a key: the versions it must still have at EXEC.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Watched {
    /// The key.
    pub key: Vec<u8>,
    stripe: u64,
    flushes: u64,
    /// The deadline the key had when watched: once it passes, the key has changed (expired).
    deadline: Option<u64>,
}

impl Db {
    /// The keyspace over `map`.
    pub fn new(map: AnyMap<AutoDomain>) -> Db {
        Db {
            map,
            versions: (0..STRIPES).map(|_| AtomicU64::new(0)).collect(),
            flushes: AtomicU64::new(0),
            expired: AtomicU64::new(0),
            timers: (0..TIMER_SHARDS).map(|_| Mutex::new(Timers::default())).collect(),
        }
    }

    /// The hash that picks a key's WATCH stripe and deadline-index shard (fixed keys: the
    /// same in every run, so tests of stripes are reproducible).
    fn hash(key: &[u8]) -> u64 {
        BuildHasherDefault::<DefaultHasher>::default().hash_one(key)
    }

    fn stripe(&self, key: &[u8]) -> &AtomicU64 {
        &self.versions[Self::hash(key) as usize & (STRIPES - 1)]
    }

    fn timer_shard(&self, key: &[u8]) -> std::sync::MutexGuard<'_, Timers> {
        // The shard from the hash's high bits, independent of the stripe.
        let shard = (Self::hash(key) >> 32) as usize & (TIMER_SHARDS - 1);
        self.timers[shard].lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Marks `key` as changed (WATCH). Called after the write.
    pub fn touch(&self, key: &[u8]) {
        self.stripe(key).fetch_add(1, Ordering::SeqCst);
    }

    /// What WATCH records of `key` now.
    pub fn watch(&self, key: &[u8]) -> Result<Watched, CmdError> {
        // Read the versions first: a write that lands after them changes them.
        let stripe = self.stripe(key).load(Ordering::SeqCst);
        let flushes = self.flushes.load(Ordering::SeqCst);
        let deadline = self.get_with(key, |entry| entry.deadline)?.flatten();
        Ok(Watched { key: key.to_vec(), stripe, flushes, deadline })
    }

    /// Whether `watched` changed since it was recorded: written (or a key sharing its stripe
    /// was: a rare false alarm, which aborts a transaction Redis would run), flushed, or
    /// expired (its deadline, when it was live at WATCH, has passed; a key already expired
    /// then reads as absent throughout, and its deletion by the sweep is no change).
    pub fn changed(&self, watched: &Watched) -> bool {
        self.stripe(&watched.key).load(Ordering::SeqCst) != watched.stripe
            || self.flushes.load(Ordering::SeqCst) != watched.flushes
            || expired(watched.deadline, now_ms())
    }

    /// Calls `read` with the live value of `key`; `None` when absent or expired.
    pub fn get_with<R>(&self, key: &[u8], read: impl FnOnce(Entry<'_>) -> R) -> Result<Option<R>, CmdError> {
        let now = now_ms();
        let found = self.map.get_with(key, |raw| {
            let (value, deadline) = decode(raw);
            (!expired(deadline, now)).then(|| read(Entry { value, deadline }))
        })?;
        Ok(found.flatten())
    }

    /// The live value of `key`.
    pub fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, CmdError> {
        self.get_with(key, |entry| entry.value.to_vec())
    }

    /// Whether `key` is live.
    pub fn contains(&self, key: &[u8]) -> Result<bool, CmdError> {
        Ok(self.get_with(key, |_| ())?.is_some())
    }

    /// Sets `key` to `value` with `deadline` (none: no time to live).
    pub fn set(&self, key: &[u8], value: &[u8], deadline: Option<u64>) -> Result<(), CmdError> {
        self.map.upsert(key, &encode(value, deadline))?;
        self.touch(key);
        self.schedule(key, deadline);
        Ok(())
    }

    /// Atomically applies `f` to the live entry of `key` (`None`: absent or expired): `f` says
    /// what to change and what to answer, and is called again with what another client wrote
    /// meanwhile when the swap finds it. An error from `f` changes nothing.
    ///
    /// A compare-and-swap loop on the map rather than a lock of the server's: the swap holds
    /// the key's segment lock, the very lock every other write to the key takes, so the update
    /// is atomic against all of them; no lock is held while the new value is computed; and a
    /// failed swap means another write succeeded, so the loop is lock-free. Each swap is one
    /// map operation: durable when it returns in strict mode, never split by a FAMS sync.
    pub fn update<R>(
        &self,
        key: &[u8],
        mut f: impl FnMut(Option<Entry<'_>>) -> Result<(Change, R), CmdError>,
    ) -> Result<R, CmdError> {
        let mut raw = self.map.get(key)?;
        loop {
            let now = now_ms();
            let entry = raw
                .as_deref()
                .map(decode)
                .and_then(|(value, deadline)| (!expired(deadline, now)).then_some(Entry { value, deadline }));
            let (change, answer) = f(entry)?;
            let (stored, deadline) = match &change {
                // An expired key is left to the sweep: it reads as absent already.
                Change::Keep => return Ok(answer),
                Change::Delete if entry.is_none() => return Ok(answer),
                Change::Delete => (None, None),
                Change::Set(value, deadline) => (Some(encode(value, *deadline)), *deadline),
            };
            match self.map.compare_and_swap(key, raw.as_deref(), stored.as_deref())? {
                Ok(()) => {
                    self.touch(key);
                    self.schedule(key, deadline);
                    return Ok(answer);
                }
                Err(actual) => raw = actual,
            }
        }
    }

    /// Removes `key`: whether it was live.
    pub fn remove(&self, key: &[u8]) -> Result<bool, CmdError> {
        self.update(key, |entry| Ok((Change::Delete, entry.is_some())))
    }

    /// Calls `visit(key, entry)` for every live key until it returns `false` (the map's
    /// `for_each`: weakly consistent with concurrent writers).
    pub fn for_each(&self, mut visit: impl FnMut(&[u8], Entry<'_>) -> bool) -> Result<(), CmdError> {
        let now = now_ms();
        self.map.for_each(|key, raw| {
            let (value, deadline) = decode(raw);
            expired(deadline, now) || visit(key, Entry { value, deadline })
        })?;
        Ok(())
    }

    /// Removes every key.
    pub fn clear(&self) -> Result<(), CmdError> {
        self.map.clear()?;
        self.flushes.fetch_add(1, Ordering::SeqCst);
        for shard in &self.timers {
            *shard.lock().unwrap_or_else(|e| e.into_inner()) = Timers::default();
        }
        Ok(())
    }

    /// Keys in the map, expired ones not yet swept included (as Redis's DBSIZE counts them).
    pub fn len(&self) -> Result<u64, MapError> {
        self.map.len()
    }

    /// Enters `key`'s deadline in the sweep's index (none: nothing to do; a stale entry is
    /// checked when it comes due).
    pub fn schedule(&self, key: &[u8], deadline: Option<u64>) {
        let Some(at) = deadline else { return };
        let mut timers = self.timer_shard(key);
        let timers = &mut *timers;
        if let Some(old) = timers.by_key.insert(key.to_vec(), at) {
            timers.by_time.remove(&(old, key.to_vec()));
        }
        timers.by_time.insert((at, key.to_vec()));
    }

    /// Keys the sweep deleted since start.
    pub fn expired_keys(&self) -> u64 {
        self.expired.load(Ordering::Relaxed)
    }

    /// Keys with a deadline in the index (an upper bound of the keys with a time to live: an
    /// entry whose deadline was removed stays until it comes due).
    pub fn timers(&self) -> usize {
        self.timers.iter().map(|shard| shard.lock().unwrap_or_else(|e| e.into_inner()).by_key.len()).sum()
    }

    /// Takes up to `limit` index entries due at `now` (earliest first within each shard).
    fn due(&self, now: u64, limit: usize) -> Vec<(u64, Vec<u8>)> {
        let mut taken = Vec::new();
        for shard in &self.timers {
            let mut timers = shard.lock().unwrap_or_else(|e| e.into_inner());
            while taken.len() < limit {
                match timers.by_time.first() {
                    Some((at, _)) if *at <= now => {}
                    _ => break,
                }
                let (at, key) = timers.by_time.pop_first().expect("checked");
                timers.by_key.remove(&key);
                taken.push((at, key));
            }
        }
        taken
    }

    /// One round of the active expiry sweep: deletes up to `limit` keys whose deadline has
    /// passed; how many it deleted. Each deletion is a compare-and-swap of the expired value
    /// it read, so a key written meanwhile is left alone (and a later deadline re-entered),
    /// made while holding what `enter` returns (the server's gates: no deletion inside a
    /// multi-key command or a transaction, which runs at one instant and may still see the
    /// key live).
    pub fn sweep<G>(&self, limit: usize, enter: impl Fn() -> G) -> Result<usize, CmdError> {
        let now = now_ms();
        let mut deleted = 0;
        for (_, key) in self.due(now, limit) {
            let _held = enter();
            let Some(raw) = self.map.get(&key)? else { continue };
            match decode(&raw).1 {
                Some(at) if at <= now => {
                    // Not a change for WATCH: the key read as absent from its deadline on, and a
                    // watcher that saw it live notices the deadline pass (`changed`). A key
                    // written meanwhile fails the swap; its write entered any new deadline.
                    if self.map.compare_and_swap(&key, Some(&raw), None)?.is_ok() {
                        deleted += 1;
                        self.expired.fetch_add(1, Ordering::Relaxed);
                    }
                }
                later => self.schedule(&key, later),
            }
        }
        Ok(deleted)
    }

    /// Enters the deadline of every key in the pool in the sweep's index (after a start:
    /// the index lives in memory); how many keys have one.
    pub fn index_deadlines(&self) -> Result<usize, CmdError> {
        let mut found = Vec::new();
        self.map.for_each(|key, raw| {
            if let (_, Some(at)) = decode(raw) {
                found.push((key.to_vec(), at));
            }
            true
        })?;
        for (key, at) in &found {
            self.schedule(key, Some(*at));
        }
        Ok(found.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nvhtm::any_map::MapKind;
    use nvhtm::periodic::PeriodicOptions;
    use nvhtm::pool::PoolOptions;
    use nvhtm::{Heap, Volatile};

    fn db() -> Db {
        let opts = PoolOptions::layout("db-test").with_size(8 << 20);
        let heap = Heap::create_in_memory(&opts, AutoDomain::Volatile(Volatile)).unwrap();
        Db::new(AnyMap::open(heap, MapKind::Strict, PeriodicOptions::manual()).unwrap())
    }

    #[test]
    fn the_sweep_deletes_due_keys_only_and_leaves_rewritten_ones() {
        let db = db();
        let past = now_ms() - 1;
        db.set(b"due", b"v", Some(past)).unwrap();
        db.set(b"later", b"v", Some(now_ms() + 3_600_000)).unwrap();
        db.set(b"plain", b"v", None).unwrap();
        // Given a deadline, then rewritten without one: its index entry is stale.
        db.set(b"rewritten", b"v", Some(past)).unwrap();
        db.map.upsert(b"rewritten", b"w").unwrap();
        assert_eq!(db.len().unwrap(), 4, "an expired key stays in the map until swept");
        assert_eq!(db.get(b"due").unwrap(), None, "but reads as absent at once");
        assert_eq!(db.sweep(100, || ()).unwrap(), 1);
        assert_eq!(db.len().unwrap(), 3);
        assert_eq!(db.get(b"rewritten").unwrap(), Some(b"w".to_vec()));
        assert_eq!(db.timers(), 1, "only `later` is still indexed");
        assert_eq!(db.sweep(100, || ()).unwrap(), 0);
    }

    #[test]
    fn the_index_is_rebuilt_from_the_stored_deadlines() {
        let db = db();
        db.set(b"a", b"v", Some(now_ms() - 1)).unwrap();
        db.set(b"b", b"v", Some(now_ms() + 3_600_000)).unwrap();
        db.set(b"c", b"v", None).unwrap();
        // A restart: the same map, an empty index.
        let db = Db::new(db.map);
        assert_eq!(db.sweep(100, || ()).unwrap(), 0, "nothing indexed yet");
        assert_eq!(db.index_deadlines().unwrap(), 2);
        assert_eq!(db.sweep(100, || ()).unwrap(), 1);
        assert_eq!(db.get(b"b").unwrap(), Some(b"v".to_vec()));
        assert_eq!(db.len().unwrap(), 2);
    }

    #[test]
    fn watch_sees_writes_flushes_and_deadlines_but_not_reads() {
        let db = db();
        db.set(b"k", b"v", None).unwrap();
        let w = db.watch(b"k").unwrap();
        assert!(!db.changed(&w));
        db.get(b"k").unwrap();
        assert!(!db.changed(&w), "a read is no change");
        db.set(b"k", b"v", None).unwrap();
        assert!(db.changed(&w), "the same value written is a change");
        let w = db.watch(b"k").unwrap();
        db.update(b"k", |_| Ok((Change::Keep, ()))).unwrap();
        assert!(!db.changed(&w), "an update that changed nothing");
        db.clear().unwrap();
        assert!(db.changed(&w), "a flush");
        db.set(b"k", b"v", Some(now_ms() - 1)).unwrap();
        let w = db.watch(b"k").unwrap();
        assert_eq!(db.sweep(10, || ()).unwrap(), 1);
        assert!(!db.changed(&w), "a key already expired when watched, swept since");
        db.set(b"k", b"v", Some(now_ms() + 3_600_000)).unwrap();
        let mut w = db.watch(b"k").unwrap();
        assert!(!db.changed(&w));
        w.deadline = Some(now_ms() - 1);
        assert!(db.changed(&w), "a live key whose deadline has passed");
    }

    #[test]
    fn values_round_trip_and_bare_values_read_as_before() {
        for value in [&b""[..], b"plain", &MAGIC, &[&MAGIC[..], b"01234567rest"].concat()] {
            for deadline in [None, Some(1), Some(u64::MAX)] {
                let stored = encode(value, deadline);
                assert_eq!(decode(&stored), (value, deadline), "{value:?} {deadline:?}");
            }
        }
        // What an earlier version stored: the bare value, no copy.
        assert!(matches!(encode(b"plain", None), Cow::Borrowed(_)));
        assert_eq!(
            decode(b"an old value, long enough to hold a header"),
            (&b"an old value, long enough to hold a header"[..], None)
        );
        let mut stored = MAGIC.to_vec();
        stored.extend_from_slice(&1_700_000_000_000u64.to_le_bytes());
        stored.extend_from_slice(b"v");
        assert_eq!(decode(&stored), (&b"v"[..], Some(1_700_000_000_000)), "the documented layout");
    }

    #[test]
    fn a_deadline_at_now_has_passed() {
        assert!(expired(Some(10), 10));
        assert!(!expired(Some(11), 10));
        assert!(!expired(None, u64::MAX));
    }
}
