//! Replaying a recording: crash points, crash images, the check, and the reports.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::fmt;
use std::ops::ControlFlow;

use xxhash_rust::xxh3::{xxh3_64, xxh3_64_with_seed};

use super::{Event, Recording, Sim};
use crate::choices::state_choices;
use crate::persist::{FlushInstr, Site};

/// The most pieces of one group enumerated as "any subset". The pieces of one write call
/// within one unit form a group; a cache line holds at most 8, but a 512-byte sector of the
/// file model holds 64, and 2^64 subsets do not fit a state index: such a group is cut into
/// chunks of this many, kept in ascending order (a restriction of the file model only).
const MAX_GROUP: usize = 32;

/// One store piece: at most 8 bytes inside one aligned word, and the write call it belongs to.
#[derive(Debug, Clone, Copy)]
struct Piece {
    offset: u64,
    len: u8,
    bytes: [u8; 8],
    call: u32,
}

impl Piece {
    fn apply(&self, image: &mut [u8]) {
        let at = self.offset as usize;
        image[at..at + self.len as usize].copy_from_slice(&self.bytes[..self.len as usize]);
    }
}

/// A line's stores since it was last persistent, cut into groups (the pieces of one write call,
/// which persist in any order among themselves), and, per thread that flushed the line, how
/// many of them that flush covers (the thread's next fence persists them). Also used for one
/// thread's non-temporal stores to one line: then every piece is in one group (any subset may
/// have persisted) and nothing is flushed.
///
/// The crash states of a log, numbered: state `s` walks the groups in order; a group of `m`
/// pieces offers `2^m - 1` states (every subset but the full one, after all earlier groups
/// whole); past the last group, everything is kept. A log of single-piece groups thus has
/// states `0..=n`, state `k` keeping the first `k` pieces: the plain prefix model.
#[derive(Debug, Default)]
struct LineLog {
    stores: Vec<Piece>,
    /// Start index in `stores` of each group, ascending (the first is 0).
    groups: Vec<usize>,
    flushed: Vec<(u32, usize)>,
}

impl LineLog {
    /// Appends `piece`; it joins the last group when it belongs to the same write call (or, for
    /// `unordered` logs, always), up to [`MAX_GROUP`] pieces.
    fn push(&mut self, piece: Piece, unordered: bool) {
        let joins = match (self.stores.last(), self.groups.last()) {
            (Some(last), Some(&start)) => {
                (unordered || last.call == piece.call) && self.stores.len() - start < MAX_GROUP
            }
            _ => false,
        };
        if !joins {
            self.groups.push(self.stores.len());
        }
        self.stores.push(piece);
    }

    fn group(&self, g: usize) -> std::ops::Range<usize> {
        self.groups[g]..self.groups.get(g + 1).copied().unwrap_or(self.stores.len())
    }

    /// The number of crash states (see the type's documentation).
    fn states(&self) -> u64 {
        (0..self.groups.len()).fold(1u64, |n, g| n.saturating_add((1u64 << self.group(g).len()) - 1))
    }

    /// Applies crash state `state` to `image`.
    fn apply_state(&self, mut state: u64, image: &mut [u8]) {
        for g in 0..self.groups.len() {
            let range = self.group(g);
            let partial = (1u64 << range.len()) - 1;
            if state < partial {
                for (bit, piece) in self.stores[range].iter().enumerate() {
                    if state >> bit & 1 == 1 {
                        piece.apply(image);
                    }
                }
                return;
            }
            state -= partial;
            for piece in &self.stores[range] {
                piece.apply(image);
            }
        }
    }

    /// Removes the first `n` pieces (a group boundary: flushes and fences fall between write
    /// calls), returning them.
    fn drain(&mut self, n: usize) -> Vec<Piece> {
        let pieces: Vec<Piece> = self.stores.drain(..n).collect();
        self.groups.retain(|&start| start >= n);
        for start in &mut self.groups {
            *start -= n;
        }
        debug_assert!(self.stores.is_empty() || self.groups.first() == Some(&0));
        for (_, upto) in &mut self.flushed {
            *upto = upto.saturating_sub(n);
        }
        self.flushed.retain(|&(_, upto)| upto > 0);
        pieces
    }
}

/// One independently chosen part of a crash image: a dirty line's cached stores, or one
/// thread's non-temporal stores to a line.
#[derive(Debug, Clone, Copy)]
struct Item {
    line: u64,
    /// `Some(thread)`: that thread's non-temporal stores to the line.
    nt: Option<u32>,
    /// The highest state index (0: nothing kept; this: everything kept).
    max: u64,
}

/// The hash of one unit's bytes for the image key: 0 when they equal the initial bytes, so
/// the key of an image is the XOR over the units that differ from the recording's start.
fn unit_hash(initial: &[u8], line: u64, bytes: &[u8]) -> u64 {
    let at = line as usize;
    let same = match initial.get(at..at + bytes.len()) {
        Some(initial) => initial == bytes,
        None => bytes.iter().all(|&b| b == 0),
    };
    if same {
        0
    } else {
        xxh3_64_with_seed(bytes, line)
    }
}

/// The persistent state while walking a recording: the persisted bytes plus, per dirty line,
/// the stores that may or may not have reached persistent memory.
struct Replay<'a> {
    /// The recording's starting bytes.
    initial: &'a [u8],
    /// `None` when only the dirty lines matter (no image will be built).
    base: Option<Vec<u8>>,
    /// The buffer images are built in: equal to `base` between crash points (persisted pieces
    /// go to both), so a crash point costs its dirty lines, not a copy of the region.
    image: Vec<u8>,
    lines: BTreeMap<u64, LineLog>,
    /// Non-temporal stores not yet fenced, per (thread, line).
    nt: BTreeMap<(u32, u64), LineLog>,
    /// XOR of [`unit_hash`] over the units of `base`: kept up to date as pieces persist, so an
    /// image's key costs only its dirty lines.
    base_key: u64,
    marks: Vec<u64>,
    /// The write-back unit (see [`Recording`]).
    unit: u64,
    /// What `image` changed in since the last image handed to a check (see [`ImageDelta`]).
    delta: ImageDelta,
    /// Whether the current crash point's lines are already in `delta` since that check.
    point_noted: bool,
}

/// Where the image a check gets differs from the previous image the same replay handed to a
/// check: an [`ImageSlot`](crate::pool::ImageSlot) given it ([`ImageSlot::hint`]) restores
/// only these units instead of copying the whole image. `seq` numbers the images one replay
/// hands to checks (0 for its first) and `source` names the replay (unique in the process), so
/// a slot that last held some other image — of a nested depth, another test — sees that the
/// delta is not relative to what it holds and copies the image whole.
///
/// [`ImageSlot::hint`]: crate::pool::ImageSlot::hint
#[derive(Debug, Clone, Default)]
pub struct ImageDelta {
    pub(crate) source: u64,
    pub(crate) seq: u64,
    /// Offsets of the units (of `unit` bytes) that may differ, in any order, repeats allowed.
    pub(crate) units: Vec<u64>,
    pub(crate) unit: u64,
    /// Too many changes to list (or a change of length): treat every byte as changed.
    pub(crate) whole: bool,
}

impl ImageDelta {
    fn fresh(unit: u64) -> ImageDelta {
        static SOURCES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        let source = SOURCES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        ImageDelta { source, seq: 0, units: Vec::new(), unit, whole: true }
    }

    /// The number of units listed as changed (with repeats); `None` when the whole image counts
    /// as changed.
    pub fn changed_units(&self) -> Option<usize> {
        (!self.whole).then_some(self.units.len())
    }
}

impl<'a> Replay<'a> {
    fn new(initial: &'a [u8], marks: &[u64], unit: u64) -> Replay<'a> {
        Replay {
            unit,
            initial,
            base: Some(initial.to_vec()),
            image: initial.to_vec(),
            lines: BTreeMap::new(),
            nt: BTreeMap::new(),
            base_key: 0,
            marks: marks.to_vec(),
            delta: ImageDelta::fresh(unit),
            point_noted: false,
        }
    }

    fn lines_only(unit: u64) -> Replay<'static> {
        Replay {
            unit,
            initial: &[],
            base: None,
            image: Vec::new(),
            lines: BTreeMap::new(),
            nt: BTreeMap::new(),
            base_key: 0,
            marks: Vec::new(),
            delta: ImageDelta::fresh(unit),
            point_noted: false,
        }
    }

    /// Notes that the image changed in the unit at `line` (see [`ImageDelta`]).
    fn note(&mut self, line: u64) {
        if self.delta.whole {
            return;
        }
        // Past this many the slot would copy about as much as the whole image.
        let units = self.base.as_ref().map_or(0, Vec::len) as u64 / self.unit;
        if self.delta.units.len() as u64 >= (units / 4).max(64) {
            self.delta.whole = true;
            self.delta.units.clear();
        } else {
            self.delta.units.push(line);
        }
    }

    /// Notes the current crash point's lines (once per check: they are the only ones its
    /// images differ in).
    fn note_point(&mut self, lines: &[u64]) {
        if !self.point_noted {
            for &line in lines {
                self.note(line);
            }
            self.point_noted = true;
        }
    }

    /// The delta of the image about to be checked; the next starts empty.
    fn take_delta(&mut self) -> ImageDelta {
        let next = ImageDelta {
            source: self.delta.source,
            seq: self.delta.seq + 1,
            units: Vec::new(),
            unit: self.unit,
            whole: false,
        };
        self.point_noted = false;
        std::mem::replace(&mut self.delta, next)
    }

    /// Hands back a delta's buffer for reuse.
    fn recycle(&mut self, mut used: ImageDelta) {
        if self.delta.units.is_empty() {
            used.units.clear();
            self.delta.units = used.units;
        }
    }

    /// Applies `pieces` (all in the unit at `line`) to the base, keeping `base_key` current.
    fn persist_pieces(&mut self, line: u64, pieces: &[Piece]) {
        if self.base.is_none() {
            return;
        }
        self.note(line);
        let Some(base) = &mut self.base else { return };
        let range = line as usize..(line + self.unit) as usize;
        let before = unit_hash(self.initial, line, &base[range.clone()]);
        for piece in pieces {
            piece.apply(base);
            piece.apply(&mut self.image);
        }
        self.base_key ^= before ^ unit_hash(self.initial, line, &base[range]);
    }

    fn persist_prefix(&mut self, line: u64, n: usize) {
        if let Some(log) = self.lines.get_mut(&line) {
            let pieces = log.drain(n);
            if log.stores.is_empty() {
                self.lines.remove(&line);
            }
            self.persist_pieces(line, &pieces);
        }
    }

    /// What a fence (or locked instruction) of `thread` persists: the prefixes it flushed, and
    /// its non-temporal stores.
    fn fence(&mut self, thread: u32) {
        let flushed: Vec<(u64, usize)> = self
            .lines
            .iter()
            .filter_map(|(&line, log)| {
                log.flushed.iter().find(|&&(t, _)| t == thread).map(|&(_, upto)| (line, upto))
            })
            .collect();
        for (line, n) in flushed {
            self.persist_prefix(line, n);
        }
        let nt: Vec<(u32, u64)> = self.nt.range((thread, 0)..=(thread, u64::MAX)).map(|(&k, _)| k).collect();
        for key in nt {
            if let Some(log) = self.nt.remove(&key) {
                self.persist_pieces(key.1, &log.stores);
            }
        }
    }

    /// Whether a fence of `thread` now would persist anything (else a crash just before it
    /// sees nothing a crash after it would not).
    fn fence_persists(&self, thread: u32) -> bool {
        self.lines.values().any(|log| log.flushed.iter().any(|&(t, _)| t == thread))
            || self.nt.range((thread, 0)..=(thread, u64::MAX)).next().is_some()
    }

    /// Whether a `clflush` of `line` now would persist anything.
    fn clflush_persists(&self, line: u64) -> bool {
        self.lines.contains_key(&line)
    }

    /// Applies one event; `disabled` flushes and fences have no effect (mutation testing).
    fn step(&mut self, event: &Event, disabled: Option<Site>) {
        match *event {
            Event::Store { offset, len, bytes, call } => {
                let line = offset - offset % self.unit;
                self.lines.entry(line).or_default().push(Piece { offset, len, bytes, call }, false);
            }
            Event::NtStore { offset, bytes, thread } => {
                let line = offset - offset % self.unit;
                let piece = Piece { offset, len: 8, bytes, call: 0 };
                self.nt.entry((thread, line)).or_default().push(piece, true);
            }
            Event::Flush { site, .. } | Event::Fence { site, .. } if Some(site) == disabled => {}
            Event::Flush { line, instr, thread, .. } => {
                let pending = self.lines.get(&line).map_or(0, |log| log.stores.len());
                match instr {
                    FlushInstr::Clflush => self.persist_prefix(line, pending),
                    FlushInstr::Clwb | FlushInstr::Clflushopt => {
                        if let Some(log) = self.lines.get_mut(&line) {
                            log.flushed.retain(|&(t, _)| t != thread);
                            log.flushed.push((thread, pending));
                        }
                    }
                }
            }
            Event::Fence { thread, .. } | Event::Locked { thread } => self.fence(thread),
            Event::Mark(value) => self.marks.push(value),
            Event::Grow { len } => {
                if let Some(base) = &mut self.base {
                    // New bytes are zero, so they add nothing to the key.
                    base.resize(len, 0);
                    self.image.resize(len, 0);
                    self.delta.whole = true;
                    self.delta.units.clear();
                }
            }
        }
    }

    /// The parts of an image chosen independently: each dirty line's cached stores (in line
    /// order), then each thread's non-temporal stores per line.
    fn dirty(&self) -> Vec<Item> {
        let cached = self.lines.iter().map(|(&line, log)| Item { line, nt: None, max: log.states() - 1 });
        let nt = self.nt.iter().map(|(&(t, line), log)| Item { line, nt: Some(t), max: log.states() - 1 });
        cached.chain(nt).collect()
    }

    fn log(&self, item: &Item) -> &LineLog {
        match item.nt {
            None => &self.lines[&item.line],
            Some(t) => &self.nt[&(t, item.line)],
        }
    }

    /// Turns `image` (a copy of the base) into the image where each item is in state
    /// `choice[i]`. Cached stores first, then non-temporal ones (which evict the line: the
    /// stores cached before them are written back first).
    fn apply_choice(&self, image: &mut [u8], dirty: &[Item], choice: &[u64]) {
        for (item, &state) in dirty.iter().zip(choice) {
            self.log(item).apply_state(state, image);
        }
    }

    /// Puts the dirty lines of `image` back to the base.
    fn reset(&self, image: &mut [u8], lines: &[u64]) {
        if let Some(base) = &self.base {
            for &line in lines {
                let range = line as usize..(line + self.unit) as usize;
                image[range.clone()].copy_from_slice(&base[range]);
            }
        }
    }

    /// The distinct lines of `dirty`, and the key of the base without them: the key of an
    /// image is this XOR each of these lines' hash in the image.
    fn key_parts(&self, dirty: &[Item]) -> (Vec<u64>, u64) {
        let lines: Vec<u64> = dirty.iter().map(|i| i.line).collect::<BTreeSet<_>>().into_iter().collect();
        let mut rest = self.base_key;
        if let Some(base) = &self.base {
            for &line in &lines {
                rest ^= unit_hash(self.initial, line, &base[line as usize..(line + self.unit) as usize]);
            }
        }
        (lines, rest)
    }

    /// A key equal for equal images with equal histories: the XOR of the hashes of the units
    /// that differ from the initial bytes, the base's kept up to date as the replay goes, so an
    /// image costs O(dirty lines), not O(touched lines) or O(image).
    fn key(&self, image: &[u8], lines: &[u64], rest: u64) -> u64 {
        let mut key = rest;
        for &line in lines {
            key ^= unit_hash(self.initial, line, &image[line as usize..(line + self.unit) as usize]);
        }
        let mut words = [0u8; 24];
        words[..8].copy_from_slice(&key.to_le_bytes());
        words[8..16].copy_from_slice(&(image.len() as u64).to_le_bytes());
        words[16..].copy_from_slice(&(self.marks.len() as u64).to_le_bytes());
        xxh3_64(&words)
    }
}

/// Line offsets that still hold non-persistent stores at the end of `recording`.
pub(crate) fn unpersisted_lines(recording: &Recording) -> Vec<u64> {
    let mut replay = Replay::lines_only(recording.unit);
    for event in &recording.events {
        replay.step(event, None);
    }
    replay.dirty().into_iter().map(|item| item.line).collect::<BTreeSet<_>>().into_iter().collect()
}

/// Where a crash happens: just before an event that may persist something, or at the end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CrashPointKind {
    /// Just before a fence (every fence is a crash point, whether or not it persists anything).
    Fence(Site),
    /// Just before a `clflush` of a line with pending stores (it persists them at once).
    Clflush(Site),
    /// Just before a locked instruction (compare-and-exchange, `SeqCst` store) that persists
    /// this thread's flushed lines or non-temporal stores.
    Locked,
    /// At the end of the recording.
    End,
}

impl fmt::Display for CrashPointKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CrashPointKind::Fence(site) => write!(f, "just before the fence at {site}"),
            CrashPointKind::Clflush(site) => write!(f, "just before the clflush at {site}"),
            CrashPointKind::Locked => f.write_str("just before a locked instruction"),
            CrashPointKind::End => f.write_str("at the end of the recording"),
        }
    }
}

/// Names one crash image: the crash point and the state each dirty line kept, in line order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageId {
    /// Index of the crash point, in the recording's order (see [`CrashPointKind`]).
    pub point: usize,
    /// For each dirty line in offset order, then each thread's non-temporal stores per line,
    /// the state kept: 0 is nothing; when every store was a single piece, `k` is the prefix of
    /// `k` stores; a write of several words in the line also offers each subset of them.
    pub choice: Vec<u64>,
}

/// What the check knows about the crash it is judging.
#[derive(Debug, Clone)]
pub struct CrashContext {
    /// Every mark made before the crash point: the workload's, then, for a crash at depth ≥ 1,
    /// those of each check's recording that led here.
    pub marks: Vec<u64>,
    /// The marks made by the recording crashed at this depth only (the workload's at depth 0,
    /// the parent check's at depth 1, …): "how far the run that crashed got".
    pub run_marks: Vec<u64>,
    /// Index of the crash point.
    pub point: usize,
    /// The fence the crash happened just before (`None`: at a `clflush`, a locked instruction
    /// or the end of the recording; see `kind`).
    pub fence: Option<Site>,
    /// What the crash happened just before.
    pub kind: CrashPointKind,
    /// Where this image differs from the previous one this replay handed to a check: give it
    /// to an [`ImageSlot`](crate::pool::ImageSlot) ([`ImageSlot::hint`](crate::pool::ImageSlot::hint))
    /// to restore only those lines.
    pub delta: ImageDelta,
    /// 0 for a crash of the workload, 1 for a crash during the check of such an image (its
    /// recovery, or the work it did after recovering), and so on.
    pub depth: u32,
    /// Whether this check's own recording will be crashed in turn (depth < `recovery_depth`
    /// and the image selected by `follow_one_in`): only then is work done after recovery, for
    /// a next run, worth doing.
    pub followed: bool,
}

/// A crash image the check rejected, with everything needed to reproduce it.
#[derive(Debug, Clone)]
pub struct CrashFailure {
    /// What the check said.
    pub message: String,
    /// The image at each depth: the workload's crash image, then recovery's, and so on.
    pub path: Vec<ImageId>,
    /// The fence of the last crash point (`None`: not a fence).
    pub fence: Option<Site>,
    /// What the last crash point was just before.
    pub kind: CrashPointKind,
    /// Dirty lines of the last crash point, as in [`ImageId::choice`]: (line offset, state
    /// kept, highest state). For a line of single-piece stores: stores kept, stores pending.
    pub lines: Vec<(u64, u64, u64)>,
    /// Marks made before the crash.
    pub marks: usize,
    /// The seed used for sampling.
    pub seed: u64,
}

impl fmt::Display for CrashFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let last = self.path.last().map_or(0, |id| id.point);
        writeln!(f, "crash image rejected: {}", self.message)?;
        write!(f, "  crash point {last}, {}", self.kind)?;
        writeln!(f, ", depth {}, after {} marks", self.path.len() - 1, self.marks)?;
        let lines: Vec<String> =
            self.lines.iter().map(|(line, kept, of)| format!("{line:#x}: {kept} of {of}")).collect();
        writeln!(
            f,
            "  stores kept per dirty line: {}",
            if lines.is_empty() { "none dirty".into() } else { lines.join(", ") }
        )?;
        write!(
            f,
            "  reproduce with CrashTest {{ seed: {:#x}, only: Some(vec!{:?}), .. }}",
            self.seed, self.path
        )
    }
}

/// The outcome of replaying a recording.
#[derive(Debug, Default, Clone)]
pub struct CrashReport {
    /// Crash points of the workload (fences, `clflush`es and locked instructions that persist
    /// something, plus the end).
    pub crash_points: u64,
    /// Crash points whose images were sampled rather than enumerated.
    pub sampled_points: u64,
    /// Images built, duplicates included.
    pub images_built: u64,
    /// Distinct workload images checked.
    pub images_checked: u64,
    /// Distinct images checked for crashes during recovery (depth ≥ 1).
    pub recovery_images_checked: u64,
    /// Images skipped because an identical one (with the same history) was checked.
    pub duplicates: u64,
    /// Every flush and fence site seen, recovery included.
    pub sites: BTreeSet<Site>,
    /// The images the check rejected.
    pub failures: Vec<CrashFailure>,
}

impl CrashReport {
    /// Whether every image passed.
    pub fn passed(&self) -> bool {
        self.failures.is_empty()
    }

    /// Panics with the first failure, fully described (for tests).
    #[track_caller]
    pub fn assert_passed(&self) {
        if let Some(failure) = self.failures.first() {
            panic!("{failure}\n({self})");
        }
    }
}

impl fmt::Display for CrashReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} crash points ({} sampled), {} images built, {} distinct checked, {} during recovery, {} duplicates, {} failures",
            self.crash_points,
            self.sampled_points,
            self.images_built,
            self.images_checked,
            self.recovery_images_checked,
            self.duplicates,
            self.failures.len()
        )
    }
}

/// What happened when one flush/fence site was switched off.
#[derive(Debug, Clone)]
pub struct SiteOutcome {
    /// The site switched off.
    pub site: Site,
    /// Whether some image failed the check without it.
    pub caught: bool,
    /// Images checked in that run.
    pub images_checked: u64,
    /// The first failure's message, when caught.
    pub failure: Option<String>,
}

/// The result of [`CrashTest::mutation_run`].
#[derive(Debug, Clone)]
pub struct MutationReport {
    /// The run with every site on (must pass).
    pub baseline: CrashReport,
    /// One run per site.
    pub sites: Vec<SiteOutcome>,
}

impl MutationReport {
    /// Sites whose removal no image noticed.
    pub fn missed(&self) -> Vec<Site> {
        self.sites.iter().filter(|s| !s.caught).map(|s| s.site).collect()
    }
}

impl fmt::Display for MutationReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "baseline: {}", self.baseline)?;
        for s in &self.sites {
            let verdict = if s.caught { "caught" } else { "MISSED" };
            writeln!(f, "  {verdict:6} {} ({} images)", s.site, s.images_checked)?;
        }
        write!(f, "{} of {} sites caught", self.sites.iter().filter(|s| s.caught).count(), self.sites.len())
    }
}

/// How to replay a recording. Crash points are every fence, every `clflush` of a line with
/// pending stores and every locked instruction that persists something (the crash happens just
/// before it), and the end. At each, the images are enumerated while there are at most `exhaustive_limit`
/// of them, and otherwise `samples` are drawn (plus the two extremes: nothing pending kept,
/// everything kept) with a generator seeded from `seed` and the point. Images equal byte for
/// byte and with the same marks are checked once.
#[derive(Debug, Clone)]
pub struct CrashTest {
    /// Enumerate all images of a crash point when there are at most this many.
    pub exhaustive_limit: u64,
    /// Images drawn at a crash point with more than `exhaustive_limit`.
    pub samples: usize,
    /// Seed of the sampling.
    pub seed: u64,
    /// How many crashes in a row: 1 also crashes the check's own recording — its recovery, and
    /// whatever work the check goes on to do on the recovered pool (a second run) — at each of
    /// its fences and checks those images again at depth 1; 2 crashes those checks too, and so
    /// on. See [`CrashTest::run_with`] for passing the model of a run to the checks of its
    /// crashes.
    pub recovery_depth: u32,
    /// Follow (crash again) only one in this many distinct images of each depth, chosen by the
    /// image's hash (1: every image). Bounds the product of the depths' image counts.
    pub follow_one_in: u64,
    /// Stop at the first rejected image.
    pub stop_at_first_failure: bool,
    /// A flush/fence site whose effect is removed (persistence mutation testing).
    pub disabled_site: Option<Site>,
    /// Check only these images (one per depth), to reproduce a failure.
    pub only: Option<Vec<ImageId>>,
    /// Skip an image identical to one already checked with the same marks. Switch off only to
    /// see every crash point's full set of images.
    pub deduplicate: bool,
}

impl Default for CrashTest {
    fn default() -> CrashTest {
        CrashTest {
            exhaustive_limit: 4096,
            samples: 512,
            seed: 0x5eed_c0ff_ee00_0001,
            recovery_depth: 0,
            follow_one_in: 1,
            stop_at_first_failure: true,
            disabled_site: None,
            only: None,
            deduplicate: true,
        }
    }
}

impl CrashTest {
    /// Replays `recording`, calling `check(sim, image, context)` on every distinct crash image.
    /// The check opens the image with `sim` (so its recovery is recorded, for crashes during
    /// recovery), recovers, and compares with its oracle; `Err` rejects the image.
    pub fn run<C>(&self, recording: &Recording, check: C) -> CrashReport
    where
        C: Fn(&Sim, &[u8], &CrashContext) -> Result<(), String>,
    {
        self.run_with(recording, |sim, image, ctx, _: Option<&()>| check(sim, image, ctx))
    }

    /// Crashes in a row, each run with its own model. Like [`run`](CrashTest::run), but the check
    /// also gets what the check of the image it descends from returned (`None` at depth 0), and
    /// returns what the checks of its own crashes will get. The usual shape of a multi-run
    /// suite (`recovery_depth: 1` for two runs, 2 for three): the check opens the image with
    /// `sim`, recovers, compares with the model of the run that crashed (`parent` and
    /// `ctx.run_marks`), and, when `ctx.followed`, runs the next workload on the recovered
    /// pool — its stores land in `sim`'s recording, which is crashed at every fence next — and
    /// returns that run's model.
    ///
    /// ```
    /// use nvhtm::sim::{CrashTest, Sim};
    /// use nvhtm::{PoolOptions, Pool};
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// // A counter word at 4096 incremented and persisted once per run.
    /// let opts = PoolOptions::layout("counter").with_size(64 << 10);
    /// let bump = |pool: &Pool<Sim>| -> Result<u64, nvhtm::PoolError> {
    ///     let n = pool.load_u64(4096, std::sync::atomic::Ordering::Acquire)? + 1;
    ///     pool.store_u64(4096, n, std::sync::atomic::Ordering::Release)?;
    ///     pool.persist(4096, 8)?;
    ///     Ok(n)
    /// };
    /// let sim = Sim::new();
    /// let pool = Pool::create_in_memory(&opts, sim.clone())?;
    /// sim.restart_recording()?;
    /// bump(&pool)?;
    /// let test = CrashTest { recovery_depth: 1, ..CrashTest::default() };
    /// let report = test.run_with(&sim.recording(), |sim, image, ctx, before: Option<&u64>| {
    ///     let pool = Pool::open_image(image, &opts, sim.clone()).map_err(|e| e.to_string())?;
    ///     let n = pool.load_u64(4096, std::sync::atomic::Ordering::Acquire).map_err(|e| e.to_string())?;
    ///     // Run 1 started from 0, run 2 from what run 1's crash left; each adds at most one.
    ///     let start = before.copied().unwrap_or(0);
    ///     if n != start && n != start + 1 {
    ///         return Err(format!("counter {n} after a run that started at {start}"));
    ///     }
    ///     if ctx.followed {
    ///         bump(&pool).map_err(|e| e.to_string())?; // the second run
    ///     }
    ///     Ok(n)
    /// });
    /// report.assert_passed();
    /// assert!(report.recovery_images_checked > 0);
    /// # Ok(()) }
    /// ```
    pub fn run_with<T, C>(&self, recording: &Recording, check: C) -> CrashReport
    where
        C: Fn(&Sim, &[u8], &CrashContext, Option<&T>) -> Result<T, String>,
    {
        let mut report = CrashReport::default();
        let _ = self.explore(recording, &check, 0, &[], None, &mut Vec::new(), &mut report);
        log_images(report.images_checked + report.recovery_images_checked, self.disabled_site.is_some());
        report
    }

    /// Runs the test once with every site, then once with each flush/fence site switched off,
    /// reporting which removals some crash image catches.
    pub fn mutation_run<C>(&self, recording: &Recording, check: C) -> MutationReport
    where
        C: Fn(&Sim, &[u8], &CrashContext) -> Result<(), String>,
    {
        self.mutation_run_with(recording, |sim, image, ctx, _: Option<&()>| check(sim, image, ctx))
    }

    /// [`mutation_run`](CrashTest::mutation_run) for a check of [`run_with`](CrashTest::run_with)'s
    /// shape (crashes in a row).
    pub fn mutation_run_with<T, C>(&self, recording: &Recording, check: C) -> MutationReport
    where
        C: Fn(&Sim, &[u8], &CrashContext, Option<&T>) -> Result<T, String>,
    {
        let base = CrashTest { disabled_site: None, ..self.clone() };
        let baseline = base.run_with(recording, &check);
        let sites = baseline
            .sites
            .iter()
            .map(|&site| {
                let mutant =
                    CrashTest { disabled_site: Some(site), stop_at_first_failure: true, ..base.clone() };
                let report = mutant.run_with(recording, &check);
                SiteOutcome {
                    site,
                    caught: !report.passed(),
                    images_checked: report.images_checked + report.recovery_images_checked,
                    failure: report.failures.first().map(|f| f.message.clone()),
                }
            })
            .collect();
        MutationReport { baseline, sites }
    }

    #[allow(clippy::too_many_arguments)]
    fn explore<T, C>(
        &self,
        recording: &Recording,
        check: &C,
        depth: u32,
        marks: &[u64],
        parent: Option<&T>,
        path: &mut Vec<ImageId>,
        report: &mut CrashReport,
    ) -> ControlFlow<()>
    where
        C: Fn(&Sim, &[u8], &CrashContext, Option<&T>) -> Result<T, String>,
    {
        let mut replay = Replay::new(&recording.initial, marks, recording.unit);
        let run = Run { depth, first_mark: marks.len(), parent };
        let mut seen = HashSet::new();
        let mut point = 0;
        for event in &recording.events {
            // The set of possible crash states only grows between events that persist
            // something (a store adds states, a clwb changes none): crashing just before each
            // of those, and at the end, sees every state.
            let kind = match *event {
                Event::Fence { site, .. } => {
                    report.sites.insert(site);
                    Some(CrashPointKind::Fence(site))
                }
                Event::Flush { site, line, instr, .. } => {
                    report.sites.insert(site);
                    let persists = instr == FlushInstr::Clflush
                        && self.disabled_site != Some(site)
                        && replay.clflush_persists(line);
                    persists.then_some(CrashPointKind::Clflush(site))
                }
                Event::Locked { thread } => replay.fence_persists(thread).then_some(CrashPointKind::Locked),
                _ => None,
            };
            if let Some(kind) = kind {
                self.crash_point(point, kind, &mut replay, &mut seen, check, &run, path, report)?;
                point += 1;
            }
            replay.step(event, self.disabled_site);
        }
        self.crash_point(point, CrashPointKind::End, &mut replay, &mut seen, check, &run, path, report)
    }

    /// The prefix choices to try at one crash point.
    fn choices(&self, point: usize, depth: u32, dirty: &[Item], report: &mut CrashReport) -> Vec<Vec<u64>> {
        let maxima: Vec<u64> = dirty.iter().map(|item| item.max).collect();
        let mut rng = fastrand::Rng::with_seed(
            self.seed ^ (point as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ u64::from(depth) << 56,
        );
        let (choices, sampled) = state_choices(&maxima, self.exhaustive_limit, self.samples, &mut rng);
        if sampled && depth == 0 {
            report.sampled_points += 1;
        }
        choices
    }

    #[allow(clippy::too_many_arguments)]
    fn crash_point<T, C>(
        &self,
        point: usize,
        kind: CrashPointKind,
        replay: &mut Replay<'_>,
        seen: &mut HashSet<u64>,
        check: &C,
        run: &Run<'_, T>,
        path: &mut Vec<ImageId>,
        report: &mut CrashReport,
    ) -> ControlFlow<()>
    where
        C: Fn(&Sim, &[u8], &CrashContext, Option<&T>) -> Result<T, String>,
    {
        let depth = run.depth;
        let wanted = self.only.as_ref().map(|only| only.get(depth as usize));
        if let Some(wanted) = wanted {
            match wanted {
                Some(id) if id.point == point => {}
                _ => return ControlFlow::Continue(()),
            }
        }
        if depth == 0 {
            report.crash_points += 1;
        }
        let dirty = replay.dirty();
        let choices = match wanted {
            Some(Some(id)) if id.choice.len() == dirty.len() => vec![id.choice.clone()],
            Some(_) => return ControlFlow::Continue(()),
            None => self.choices(point, depth, &dirty, report),
        };
        let fence = match kind {
            CrashPointKind::Fence(site) => Some(site),
            _ => None,
        };
        let mut context = CrashContext {
            marks: replay.marks.clone(),
            run_marks: replay.marks[run.first_mark..].to_vec(),
            point,
            fence,
            kind,
            depth,
            followed: false,
            delta: ImageDelta::default(),
        };
        let (lines, rest) = replay.key_parts(&dirty);
        replay.point_noted = false;
        let mut image = std::mem::take(&mut replay.image);
        let mut flow = ControlFlow::Continue(());
        for choice in choices {
            replay.reset(&mut image, &lines);
            replay.apply_choice(&mut image, &dirty, &choice);
            replay.note_point(&lines);
            report.images_built += 1;
            let key = replay.key(&image, &lines, rest);
            if self.deduplicate && !seen.insert(key) {
                report.duplicates += 1;
                continue;
            }
            context.followed =
                depth < self.recovery_depth && (self.follow_one_in <= 1 || key % self.follow_one_in == 0);
            if depth == 0 {
                report.images_checked += 1;
            } else {
                report.recovery_images_checked += 1;
            }
            // Only a check whose recording will itself be crashed needs recording.
            let sim = if context.followed { Sim::new() } else { Sim::passive() };
            path.push(ImageId { point, choice });
            context.delta = replay.take_delta();
            // A mutant's image may trip a debug assertion of the code under test (an invariant
            // the proof rests on): that is the mutant caught, not the test crashed.
            let verdict = if self.disabled_site.is_some() {
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    check(&sim, &image, &context, run.parent)
                }))
                .unwrap_or_else(|panic| {
                    let why = panic
                        .downcast_ref::<String>()
                        .cloned()
                        .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                        .unwrap_or_default();
                    Err(format!("the check panicked: {why}"))
                })
            } else {
                check(&sim, &image, &context, run.parent)
            };
            replay.recycle(std::mem::take(&mut context.delta));
            flow = match verdict {
                Err(message) => {
                    let choice = &path[path.len() - 1].choice;
                    report.failures.push(CrashFailure {
                        message,
                        path: path.clone(),
                        fence,
                        kind,
                        lines: dirty.iter().zip(choice).map(|(item, &k)| (item.line, k, item.max)).collect(),
                        marks: replay.marks.len(),
                        seed: self.seed,
                    });
                    if self.stop_at_first_failure {
                        ControlFlow::Break(())
                    } else {
                        ControlFlow::Continue(())
                    }
                }
                Ok(model) if context.followed => {
                    let nested = sim.recording();
                    if nested.initial.is_empty() {
                        ControlFlow::Continue(())
                    } else {
                        self.explore(&nested, check, depth + 1, &replay.marks, Some(&model), path, report)
                    }
                }
                Ok(_) => ControlFlow::Continue(()),
            };
            path.pop();
            if flow.is_break() {
                break;
            }
        }
        // Back to the base for the next crash point.
        replay.reset(&mut image, &lines);
        replay.note_point(&lines);
        replay.image = image;
        flow
    }
}

/// The recording being crashed: its depth, where its own marks begin, and the model its
/// parent check returned.
struct Run<'a, T> {
    depth: u32,
    first_mark: usize,
    parent: Option<&'a T>,
}

/// Where crash tests account for the images they check: when the environment variable
/// `NVHTM_IMAGE_LOG` names a file, every [`CrashTest`] run (and every run of the FAMS file
/// model) appends its count of distinct images checked, one line each, marked `mutant` for a
/// run with a site switched off (its images largely repeat the baseline's) — so that `.ci/run`
/// can report the images of a whole CI run across test processes. Best effort: a failure to
/// write is ignored (it is accounting, not a result).
pub(crate) fn log_images(images: u64, mutant: bool) {
    use std::io::Write;
    if let Some(path) = std::env::var_os("NVHTM_IMAGE_LOG") {
        let file = std::fs::OpenOptions::new().create(true).append(true).open(path);
        if let Ok(mut file) = file {
            let _ = writeln!(file, "{images} {}", if mutant { "mutant" } else { "run" });
        }
    }
}
