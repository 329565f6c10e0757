//! The storage layer under FAMS: two files (the data file and its journal) behind a narrow
//! trait, with a real implementation and a simulated one that records every write and sync,
//! builds the post-crash file states the file model allows, and injects errors.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use xxhash_rust::xxh3::xxh3_64;

use crate::persist::Site;

/// Which of the two files.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Role {
    /// The data file the application's memory is synced to.
    Data,
    /// The redo journal beside it.
    Journal,
}

/// File operations FAMS needs.
pub trait Storage: Send {
    /// The file's length.
    fn len(&self, role: Role) -> io::Result<u64>;
    /// Reads `buf.len()` bytes at `offset` (zeros past the end).
    fn read_at(&self, role: Role, offset: u64, buf: &mut [u8]) -> io::Result<()>;
    /// Writes `data` at `offset` (not durable until `sync`).
    fn write_at(&self, role: Role, offset: u64, data: &[u8]) -> io::Result<()>;
    /// Sets the length (not durable until `sync`).
    fn set_len(&self, role: Role, len: u64) -> io::Result<()>;
    /// Makes the file's data and length durable (`fdatasync`). The caller's location is the
    /// sync's site, which [`SimStorage::disable_sync`] can switch off (mutation testing).
    #[track_caller]
    fn sync(&self, role: Role) -> io::Result<()>;
    /// Makes the directory entries of both files durable (a site like [`Storage::sync`]).
    #[track_caller]
    fn sync_dir(&self) -> io::Result<()>;
}

/// The journal's path for a data file.
pub fn journal_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".journal");
    path.with_file_name(name)
}

/// Real files.
#[derive(Debug)]
pub struct FileStorage {
    data: File,
    journal: File,
    dir: PathBuf,
}

impl FileStorage {
    /// Opens (or with `create`, creates) `path` and its journal, locking the data file.
    pub fn open(path: &Path, create: bool) -> io::Result<FileStorage> {
        let data = OpenOptions::new().read(true).write(true).create_new(create).open(path)?;
        rustix::fs::flock(&data, rustix::fs::FlockOperation::NonBlockingLockExclusive)?;
        FileStorage::with_data(data, path, create)
    }

    /// The storage of `data`, the data file at `path`, which the caller opened for reading and
    /// writing and locked: opens its journal, creating it if there is none; with `create` (a new
    /// data file), syncs the directory so that both entries are durable.
    pub(crate) fn with_data(data: File, path: &Path, create: bool) -> io::Result<FileStorage> {
        let journal = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(journal_path(path))?;
        let dir = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let storage = FileStorage { data, journal, dir };
        if create {
            storage.sync_dir()?;
        }
        Ok(storage)
    }

    fn file(&self, role: Role) -> &File {
        match role {
            Role::Data => &self.data,
            Role::Journal => &self.journal,
        }
    }
}

impl Storage for FileStorage {
    fn len(&self, role: Role) -> io::Result<u64> {
        Ok(self.file(role).metadata()?.len())
    }

    fn read_at(&self, role: Role, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let file = self.file(role);
        let mut done = 0;
        while done < buf.len() {
            match file.read_at(&mut buf[done..], offset + done as u64)? {
                0 => {
                    buf[done..].fill(0);
                    break;
                }
                n => done += n,
            }
        }
        Ok(())
    }

    fn write_at(&self, role: Role, offset: u64, data: &[u8]) -> io::Result<()> {
        self.file(role).write_all_at(data, offset)
    }

    fn set_len(&self, role: Role, len: u64) -> io::Result<()> {
        self.file(role).set_len(len)
    }

    fn sync(&self, role: Role) -> io::Result<()> {
        self.file(role).sync_data()
    }

    fn sync_dir(&self) -> io::Result<()> {
        File::open(&self.dir)?.sync_all()
    }
}

/// The outcome of [`SimStorage::crash_test`].
#[derive(Debug, Default, Clone)]
pub struct FileCrashReport {
    /// Points crashed at: before each storage call, and the end.
    pub crash_points: u64,
    /// Distinct file states checked.
    pub images_checked: u64,
    /// The first failure, if any.
    pub failures: Vec<String>,
}

/// Sector size of the simulated device: writes are atomic per sector only.
pub const SECTOR: u64 = 512;

/// A change not yet made durable.
#[derive(Debug, Clone)]
pub(crate) enum Pending {
    /// Bytes of one sector.
    Sector { sector: u64, offset_in: usize, data: Vec<u8> },
    /// A length change.
    Len(u64),
}

/// One simulated file: its durable bytes and the changes since its last sync.
#[derive(Debug, Clone, Default)]
struct SimFile {
    durable: Vec<u8>,
    current: Vec<u8>,
    pending: Vec<Pending>,
}

/// A recorded storage call.
#[derive(Debug, Clone)]
#[allow(dead_code)] // the roles are shown in failure reports
pub(crate) enum Call {
    Write(Role),
    SetLen(Role),
    Sync(Role),
    SyncDir,
    Mark(u64),
}

/// Errors to inject: the `n`-th call (counting from 0) of kind `call` fails with `errno`.
#[derive(Debug, Clone, Copy)]
pub struct Fault {
    /// `"write"`, `"set_len"` or `"sync"`.
    pub call: &'static str,
    /// How many calls of that kind succeed first.
    pub after: usize,
    /// The error number, e.g. `libc::ENOSPC` or `libc::EIO`.
    pub errno: i32,
}

#[derive(Debug, Default)]
struct SimState {
    files: BTreeMap<Role, SimFile>,
    /// Every call, and a snapshot of both files' states and of the journal's directory entry
    /// before it (for crash images).
    trace: Vec<(Call, BTreeMap<Role, SimFile>, bool)>,
    faults: Vec<Fault>,
    counts: BTreeMap<&'static str, usize>,
    /// Whether the journal's directory entry is durable: until then a crash loses the journal
    /// (the data file's entry is the creator's business, durable before FAMS opens it).
    directory_durable: bool,
    /// Every site a sync or directory sync was called from.
    sync_sites: BTreeSet<Site>,
    /// A sync site that does nothing (mutation testing).
    disabled_sync: Option<Site>,
}

impl SimState {
    /// Records a sync site; whether it is switched on.
    fn switch_on(&mut self, site: Site) -> bool {
        self.sync_sites.insert(site);
        self.disabled_sync != Some(site)
    }
}

/// Simulated storage: records calls, loses what was not synced in a crash, injects faults.
/// Clones share state.
#[derive(Debug, Clone, Default)]
pub struct SimStorage {
    state: Arc<Mutex<SimState>>,
}

fn sectors(offset: u64, data: &[u8]) -> Vec<Pending> {
    let mut out = Vec::new();
    let mut at = 0usize;
    while at < data.len() {
        let pos = offset + at as u64;
        let room = (SECTOR - pos % SECTOR) as usize;
        let n = room.min(data.len() - at);
        out.push(Pending::Sector {
            sector: pos / SECTOR,
            offset_in: (pos % SECTOR) as usize,
            data: data[at..at + n].to_vec(),
        });
        at += n;
    }
    out
}

impl SimStorage {
    /// Empty files.
    pub fn new() -> SimStorage {
        SimStorage::default()
    }

    /// Files with these durable contents (a crash image), with an empty directory entry
    /// already durable.
    pub fn from_image(data: Vec<u8>, journal: Vec<u8>) -> SimStorage {
        let mut state = SimState { directory_durable: true, ..SimState::default() };
        for (role, bytes) in [(Role::Data, data), (Role::Journal, journal)] {
            state.files.insert(role, SimFile { durable: bytes.clone(), current: bytes, pending: Vec::new() });
        }
        SimStorage { state: Arc::new(Mutex::new(state)) }
    }

    fn lock(&self) -> MutexGuard<'_, SimState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Makes a later call fail.
    pub fn inject(&self, fault: Fault) {
        self.lock().faults.push(fault);
    }

    /// Records a point in the history (an acknowledged sync, for the oracle).
    pub fn mark(&self, value: u64) {
        let mut state = self.lock();
        let snapshot = (state.files.clone(), state.directory_durable);
        state.trace.push((Call::Mark(value), snapshot.0, snapshot.1));
    }

    /// The current (not necessarily durable) bytes of a file.
    pub fn current(&self, role: Role) -> Vec<u8> {
        self.lock().files.get(&role).map(|f| f.current.clone()).unwrap_or_default()
    }

    /// Makes the sync (or directory sync) called from `site` do nothing: it is still a call,
    /// but nothing becomes durable (persistence mutation testing of FAMS).
    pub fn disable_sync(&self, site: Site) {
        self.lock().disabled_sync = Some(site);
    }

    /// Every site a sync or directory sync was called from on this storage so far.
    pub fn sync_sites(&self) -> BTreeSet<Site> {
        self.lock().sync_sites.clone()
    }

    /// Forgets the trace (and the call counts faults refer to, and the sync sites seen): states
    /// from now on start from the files as they are.
    pub fn restart_trace(&self) {
        let mut state = self.lock();
        state.trace.clear();
        state.counts.clear();
        state.sync_sites.clear();
    }

    /// Replays the recorded calls and, before each (and at the end), builds the states the two
    /// files may be in after a crash — unsynced writes lost or kept per 512-byte sector (each
    /// sector keeps a prefix of its writes), length changes kept in order — exhaustively up to
    /// 256 states per point, else `samples` drawn with `seed` plus the two extremes. Calls
    /// `check(data, journal, marks)` on each distinct state; `marks` are those made before the
    /// crash.
    pub fn crash_test(
        &self,
        samples: usize,
        seed: u64,
        mut check: impl FnMut(&[u8], &[u8], &[u64]) -> Result<(), String>,
    ) -> FileCrashReport {
        let (trace, end) = {
            let state = self.lock();
            (state.trace.clone(), (state.files.clone(), state.directory_durable))
        };
        let mut report = FileCrashReport::default();
        let mut seen = std::collections::HashSet::new();
        let mut marks = Vec::new();
        let mut rng = fastrand::Rng::with_seed(seed);
        let points = trace
            .iter()
            .map(|(call, files, dir)| (Some(call), files, *dir))
            .chain(std::iter::once((None, &end.0, end.1)));
        for (call, files, directory_durable) in points {
            if let Some(Call::Mark(value)) = call {
                marks.push(*value);
                continue;
            }
            report.crash_points += 1;
            let file = |role: Role| files.get(&role).cloned().unwrap_or_default();
            let (data, journal) = (file(Role::Data), file(Role::Journal));
            let (data_shape, journal_shape) = (pending_shape(&data.pending), pending_shape(&journal.pending));
            // Dimensions: each sector's kept prefix, then each file's kept length changes.
            let mut maxima: Vec<u32> =
                data_shape.0.values().chain(journal_shape.0.values()).map(|&n| n as u32).collect();
            maxima.extend([data_shape.1 as u32, journal_shape.1 as u32]);
            let (choices, _) = crate::choices::prefix_choices(&maxima, 256, samples, &mut rng);
            let nd = data_shape.0.len();
            for choice in choices {
                let pick = |shape: &BTreeMap<u64, usize>, from: usize| -> BTreeMap<u64, usize> {
                    shape.keys().zip(&choice[from..]).map(|(&s, &k)| (s, k as usize)).collect()
                };
                let data_image = crash_image(
                    &data.durable,
                    &data.pending,
                    &pick(&data_shape.0, 0),
                    choice[maxima.len() - 2] as usize,
                );
                // A journal whose directory entry is not durable is lost with it.
                let journal_image = if directory_durable {
                    crash_image(
                        &journal.durable,
                        &journal.pending,
                        &pick(&journal_shape.0, nd),
                        choice[maxima.len() - 1] as usize,
                    )
                } else {
                    Vec::new()
                };
                let key = (xxh3_64(&data_image), xxh3_64(&journal_image), marks.len());
                if !seen.insert(key) {
                    continue;
                }
                report.images_checked += 1;
                if let Err(message) = check(&data_image, &journal_image, &marks) {
                    report.failures.push(format!(
                        "crash point {} (before {call:?}): {message}",
                        report.crash_points - 1
                    ));
                    crate::sim::log_images(report.images_checked, self.lock().disabled_sync.is_some());
                    return report;
                }
            }
        }
        crate::sim::log_images(report.images_checked, self.lock().disabled_sync.is_some());
        report
    }

    fn call(
        &self,
        kind: &'static str,
        call: Call,
        apply: impl FnOnce(&mut SimState) -> io::Result<()>,
    ) -> io::Result<()> {
        let mut state = self.lock();
        let snapshot = state.files.clone();
        let directory_durable = state.directory_durable;
        state.trace.push((call, snapshot, directory_durable));
        let n = *state.counts.entry(kind).and_modify(|c| *c += 1).or_insert(1) - 1;
        if let Some(fault) = state.faults.iter().find(|f| f.call == kind && f.after == n).copied() {
            return Err(io::Error::from_raw_os_error(fault.errno));
        }
        apply(&mut state)
    }
}

/// The bytes of a file after a crash that kept, per sector, the first `choice` of its pending
/// writes, and of its length changes the first `len_choice`.
pub(crate) fn crash_image(
    durable: &[u8],
    pending: &[Pending],
    choice: &BTreeMap<u64, usize>,
    len_choice: usize,
) -> Vec<u8> {
    let mut image = durable.to_vec();
    let mut kept: BTreeMap<u64, usize> = BTreeMap::new();
    let mut lens = 0;
    for p in pending {
        match p {
            Pending::Sector { sector, offset_in, data } => {
                let k = kept.entry(*sector).or_insert(0);
                if *k < choice.get(sector).copied().unwrap_or(0) {
                    let at = (*sector * SECTOR) as usize + offset_in;
                    if image.len() < at + data.len() {
                        image.resize(at + data.len(), 0);
                    }
                    image[at..at + data.len()].copy_from_slice(data);
                }
                *k += 1;
            }
            Pending::Len(len) => {
                if lens < len_choice {
                    image.resize(*len as usize, 0);
                }
                lens += 1;
            }
        }
    }
    image
}

/// Per sector, how many pending writes touch it; and how many length changes there are.
pub(crate) fn pending_shape(pending: &[Pending]) -> (BTreeMap<u64, usize>, usize) {
    let mut sectors = BTreeMap::new();
    let mut lens = 0;
    for p in pending {
        match p {
            Pending::Sector { sector, .. } => *sectors.entry(*sector).or_insert(0) += 1,
            Pending::Len(_) => lens += 1,
        }
    }
    (sectors, lens)
}

impl Storage for SimStorage {
    fn len(&self, role: Role) -> io::Result<u64> {
        Ok(self.lock().files.get(&role).map_or(0, |f| f.current.len() as u64))
    }

    fn read_at(&self, role: Role, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let state = self.lock();
        buf.fill(0);
        if let Some(file) = state.files.get(&role) {
            let start = (offset as usize).min(file.current.len());
            let end = (offset as usize + buf.len()).min(file.current.len());
            buf[..end - start].copy_from_slice(&file.current[start..end]);
        }
        Ok(())
    }

    fn write_at(&self, role: Role, offset: u64, data: &[u8]) -> io::Result<()> {
        self.call("write", Call::Write(role), |state| {
            let file = state.files.entry(role).or_default();
            let end = offset as usize + data.len();
            if file.current.len() < end {
                file.current.resize(end, 0);
                file.pending.push(Pending::Len(end as u64));
            }
            file.current[offset as usize..end].copy_from_slice(data);
            file.pending.extend(sectors(offset, data));
            Ok(())
        })
    }

    fn set_len(&self, role: Role, len: u64) -> io::Result<()> {
        self.call("set_len", Call::SetLen(role), |state| {
            let file = state.files.entry(role).or_default();
            file.current.resize(len as usize, 0);
            file.pending.push(Pending::Len(len));
            Ok(())
        })
    }

    fn sync(&self, role: Role) -> io::Result<()> {
        let site = Site::caller();
        self.call("sync", Call::Sync(role), |state| {
            if !state.switch_on(site) {
                return Ok(());
            }
            let file = state.files.entry(role).or_default();
            file.durable = file.current.clone();
            file.pending.clear();
            Ok(())
        })
    }

    fn sync_dir(&self) -> io::Result<()> {
        let site = Site::caller();
        self.call("sync", Call::SyncDir, |state| {
            if !state.switch_on(site) {
                return Ok(());
            }
            state.directory_durable = true;
            Ok(())
        })
    }
}
