//! Replaying a recording: crash points, crash images, the check, and the reports.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::fmt;
use std::ops::ControlFlow;

use xxhash_rust::xxh3::Xxh3;

use super::{Event, Recording, Sim};
use crate::persist::{FlushInstr, Site};

/// One store piece: at most 8 bytes inside one aligned word.
#[derive(Debug, Clone, Copy)]
struct Piece {
    offset: u64,
    len: u8,
    bytes: [u8; 8],
}

impl Piece {
    fn apply(&self, image: &mut [u8]) {
        let at = self.offset as usize;
        image[at..at + self.len as usize].copy_from_slice(&self.bytes[..self.len as usize]);
    }
}

/// A line's stores since it was last persistent, and, per thread that flushed it, how many
/// of them that flush covers (the thread's next fence persists them).
#[derive(Debug, Default)]
struct LineLog {
    stores: Vec<Piece>,
    flushed: Vec<(u32, usize)>,
}

/// The persistent state while walking a recording: the persisted bytes plus, per dirty line,
/// the stores that may or may not have reached persistent memory.
struct Replay {
    /// The recording's starting bytes.
    initial: Vec<u8>,
    /// `None` when only the dirty lines matter (no image will be built).
    base: Option<Vec<u8>>,
    lines: BTreeMap<u64, LineLog>,
    /// Every line stored to since the start: images differ from the initial bytes only there.
    touched: BTreeSet<u64>,
    marks: Vec<u64>,
    /// The write-back unit (see [`Recording`]).
    unit: u64,
}

impl Replay {
    fn new(initial: &[u8], marks: &[u64], unit: u64) -> Replay {
        Replay {
            unit,
            initial: initial.to_vec(),
            base: Some(initial.to_vec()),
            lines: BTreeMap::new(),
            touched: BTreeSet::new(),
            marks: marks.to_vec(),
        }
    }

    fn lines_only(unit: u64) -> Replay {
        Replay {
            unit,
            initial: Vec::new(),
            base: None,
            lines: BTreeMap::new(),
            touched: BTreeSet::new(),
            marks: Vec::new(),
        }
    }

    fn persist_prefix(&mut self, line: u64, n: usize) {
        if let Some(log) = self.lines.get_mut(&line) {
            for piece in log.stores.drain(..n) {
                if let Some(base) = &mut self.base {
                    piece.apply(base);
                }
            }
            for (_, upto) in &mut log.flushed {
                *upto = upto.saturating_sub(n);
            }
            log.flushed.retain(|&(_, upto)| upto > 0);
            if log.stores.is_empty() {
                self.lines.remove(&line);
            }
        }
    }

    /// Applies one event; `disabled` flushes and fences have no effect (mutation testing).
    fn step(&mut self, event: &Event, disabled: Option<Site>) {
        match *event {
            Event::Store { offset, len, bytes } => {
                let line = offset - offset % self.unit;
                self.lines.entry(line).or_default().stores.push(Piece { offset, len, bytes });
                self.touched.insert(line);
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
            Event::Fence { thread, .. } => {
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
            }
            Event::Mark(value) => self.marks.push(value),
            Event::Grow { len } => {
                if let Some(base) = &mut self.base {
                    base.resize(len, 0);
                }
            }
        }
    }

    /// Lines holding stores that may not be persistent, with how many.
    fn dirty(&self) -> Vec<(u64, usize)> {
        self.lines.iter().map(|(&line, log)| (line, log.stores.len())).collect()
    }

    /// Turns `image` (a copy of the base) into the image where each dirty line kept the first
    /// `choice[i]` of its pending stores.
    fn apply_choice(&self, image: &mut [u8], dirty: &[(u64, usize)], choice: &[u32]) {
        for (&(line, _), &k) in dirty.iter().zip(choice) {
            for piece in &self.lines[&line].stores[..k as usize] {
                piece.apply(image);
            }
        }
    }

    /// Puts the dirty lines of `image` back to the base.
    fn reset(&self, image: &mut [u8], dirty: &[(u64, usize)]) {
        if let Some(base) = &self.base {
            for &(line, _) in dirty {
                let range = line as usize..(line + self.unit) as usize;
                image[range.clone()].copy_from_slice(&base[range]);
            }
        }
    }

    /// A key equal for equal images with equal histories, built from the lines that differ
    /// from the initial bytes (only touched lines can), so it costs O(touched lines), not
    /// O(image).
    fn key(&self, image: &[u8]) -> u64 {
        let zero = vec![0u8; self.unit as usize];
        let mut hasher = Xxh3::new();
        hasher.update(&(image.len() as u64).to_le_bytes());
        hasher.update(&(self.marks.len() as u64).to_le_bytes());
        for &line in &self.touched {
            let range = line as usize..(line + self.unit) as usize;
            let initial = self.initial.get(range.clone()).unwrap_or(&zero);
            if image[range.clone()] != *initial {
                hasher.update(&line.to_le_bytes());
                hasher.update(&image[range]);
            }
        }
        hasher.digest()
    }
}

/// Line offsets that still hold non-persistent stores at the end of `recording`.
pub(crate) fn unpersisted_lines(recording: &Recording) -> Vec<u64> {
    let mut replay = Replay::lines_only(recording.unit);
    for event in &recording.events {
        replay.step(event, None);
    }
    replay.dirty().into_iter().map(|(line, _)| line).collect()
}

/// Names one crash image: the crash point (the n-th fence, or the end) and how many pending
/// stores each dirty line kept, in line order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageId {
    /// Index of the crash point: fence `point` of the recording, or the end when past the last.
    pub point: usize,
    /// For each dirty line in offset order, the length of the prefix of its stores kept.
    pub choice: Vec<u32>,
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
    /// The fence the crash happened just before (`None`: at the end of the recording).
    pub fence: Option<Site>,
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
    /// The fence of the last crash point (`None`: the end).
    pub fence: Option<Site>,
    /// Dirty lines of the last crash point: (line offset, stores kept, stores pending).
    pub lines: Vec<(u64, u32, u32)>,
    /// Marks made before the crash.
    pub marks: usize,
    /// The seed used for sampling.
    pub seed: u64,
}

impl fmt::Display for CrashFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let last = self.path.last().map_or(0, |id| id.point);
        writeln!(f, "crash image rejected: {}", self.message)?;
        match self.fence {
            Some(site) => write!(f, "  crash point {last}, just before the fence at {site}")?,
            None => write!(f, "  crash point {last}, at the end of the recording")?,
        }
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
    /// Crash points of the workload (fences plus the end).
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

/// How to replay a recording. Crash points are every fence (the crash happens just before it)
/// and the end. At each, the images are enumerated while there are at most `exhaustive_limit`
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
            match *event {
                Event::Fence { site, .. } => {
                    report.sites.insert(site);
                    self.crash_point(point, Some(site), &replay, &mut seen, check, &run, path, report)?;
                    point += 1;
                }
                Event::Flush { site, .. } => {
                    report.sites.insert(site);
                }
                _ => {}
            }
            replay.step(event, self.disabled_site);
        }
        self.crash_point(point, None, &replay, &mut seen, check, &run, path, report)
    }

    /// The prefix choices to try at one crash point.
    fn choices(
        &self,
        point: usize,
        depth: u32,
        dirty: &[(u64, usize)],
        report: &mut CrashReport,
    ) -> Vec<Vec<u32>> {
        let maxima: Vec<u32> = dirty.iter().map(|&(_, n)| n as u32).collect();
        let mut rng = fastrand::Rng::with_seed(
            self.seed ^ (point as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ u64::from(depth) << 56,
        );
        let (choices, sampled) = prefix_choices(&maxima, self.exhaustive_limit, self.samples, &mut rng);
        if sampled && depth == 0 {
            report.sampled_points += 1;
        }
        choices
    }

    #[allow(clippy::too_many_arguments)]
    fn crash_point<T, C>(
        &self,
        point: usize,
        fence: Option<Site>,
        replay: &Replay,
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
        let mut context = CrashContext {
            marks: replay.marks.clone(),
            run_marks: replay.marks[run.first_mark..].to_vec(),
            point,
            fence,
            depth,
            followed: false,
        };
        let mut image = replay.base.clone().unwrap_or_default();
        for choice in choices {
            replay.reset(&mut image, &dirty);
            replay.apply_choice(&mut image, &dirty, &choice);
            report.images_built += 1;
            let key = replay.key(&image);
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
            let verdict = check(&sim, &image, &context, run.parent);
            let flow = match verdict {
                Err(message) => {
                    let choice = &path[path.len() - 1].choice;
                    report.failures.push(CrashFailure {
                        message,
                        path: path.clone(),
                        fence,
                        lines: dirty.iter().zip(choice).map(|(&(l, n), &k)| (l, k, n as u32)).collect(),
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
            flow?;
        }
        ControlFlow::Continue(())
    }
}

/// The recording being crashed: its depth, where its own marks begin, and the model its
/// parent check returned.
struct Run<'a, T> {
    depth: u32,
    first_mark: usize,
    parent: Option<&'a T>,
}

/// The choices to try when each of several pending sequences may independently keep any prefix
/// of `0..=maxima[i]` of its entries: every combination when there are at most `limit`, else
/// (then the flag is true) keep-none, keep-all, each sequence alone kept whole, each sequence
/// alone lost with all the others kept — the images that catch one line persisting without
/// another, which uniform draws almost never produce when lines hold many stores; for more than
/// `max(samples, 64)` sequences, `samples` of them drawn — and `samples` drawn from `rng`.
pub(crate) fn prefix_choices(
    maxima: &[u32],
    limit: u64,
    samples: usize,
    rng: &mut fastrand::Rng,
) -> (Vec<Vec<u32>>, bool) {
    let total = maxima.iter().try_fold(1u64, |acc, &m| acc.checked_mul(u64::from(m) + 1));
    match total {
        Some(total) if total <= limit => {
            let all = (0..total)
                .map(|mut index| {
                    maxima
                        .iter()
                        .map(|&m| {
                            let radix = u64::from(m) + 1;
                            let k = index % radix;
                            index /= radix;
                            k as u32
                        })
                        .collect()
                })
                .collect();
            (all, false)
        }
        _ => {
            let mut some = vec![vec![0; maxima.len()], maxima.to_vec()];
            // Each line alone kept / alone lost: all of them for up to `samples` lines, else
            // `samples` of them (a crash point with thousands of dirty lines is a bulk copy,
            // whose lines matter together, not one by one).
            let n = maxima.len();
            let lines: Vec<usize> = if n <= samples.max(64) {
                (0..n).collect()
            } else {
                (0..samples).map(|_| rng.usize(..n)).collect()
            };
            for i in lines {
                let mut alone = vec![0; n];
                alone[i] = maxima[i];
                some.push(alone);
                let mut without = maxima.to_vec();
                without[i] = 0;
                some.push(without);
            }
            some.extend((0..samples).map(|_| maxima.iter().map(|&m| rng.u32(..=m)).collect()));
            (some, true)
        }
    }
}
