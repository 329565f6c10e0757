//! Failure-atomic msync (FAMS): the persistent-memory style on conventional files.
//!
//! A [`FamsFile`] keeps the file's contents in private memory. The program changes them with
//! ordinary stores; [`FamsFile::sync`] commits every change since the previous sync atomically:
//!
//! 1. find the pages written since the last sync (userfaultfd write-protect and
//!    `PAGEMAP_SCAN`, or page checksums);
//! 2. write them to the journal with a header (sequence, page count, new file length, page size)
//!    and a checksum over header and pages, then `fdatasync` the journal (and, the first time,
//!    the directory, so the journal's entry is durable);
//! 3. write the pages (and length) into the data file and `fdatasync` it;
//! 4. retire the journal by clobbering its magic (no sync needed: replaying a complete journal
//!    again is harmless, and the next sync overwrites it).
//!
//! Opening replays a complete journal (checksum valid) into the data file and durably clobbers
//! an incomplete one (its magic zeroed and fsynced, so that no later torn journal can complete
//! it), so the file is always the last synced state, or the one being synced when that sync's
//! journal was already durable. Replay is idempotent, so a crash during recovery is
//! recovered the same way. A failed write or sync poisons the file until it is reopened.

mod dirty;
mod snapshot;
mod storage;

pub use dirty::TrackerKind;
#[cfg(test)]
pub(crate) use dirty::FAIL_NEXT_GROW;
pub use snapshot::{snapshot_paths, SnapshotFile};
pub use storage::{journal_path, Fault, FileCrashReport, FileStorage, Role, SimStorage, Storage, SECTOR};

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use xxhash_rust::xxh3::{xxh3_64, Xxh3};

use crate::region::Region;
use dirty::Tracker;

const JOURNAL_MAGIC: u64 = u64::from_le_bytes(*b"NVFAMSJ1");
const JOURNAL_HEADER: u64 = 64;

/// FAMS errors.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FamsError {
    /// A storage call failed; the file refuses further syncs until reopened.
    #[error("{op} failed: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// An earlier failure left the file in an unknown (but recoverable) state.
    #[error("the file refuses syncs until it is reopened: {0}")]
    Poisoned(String),
    /// A size of zero, or not a multiple of the page size.
    #[error("invalid FAMS file size {0}: it must be a positive multiple of the page size")]
    BadSize(u64),
    /// A write past the end of the contents.
    #[error("range {offset:#x}+{len} is outside the file's {size} bytes")]
    OutOfBounds {
        /// Offset given.
        offset: u64,
        /// Length given.
        len: u64,
        /// The contents' length.
        size: u64,
    },
    /// A complete journal (its checksum holds) whose fields cannot describe a commit of this
    /// file: an entry past the new length (or whose offset overflows), a length that is not a
    /// positive multiple of the page size. Nothing of it was applied.
    #[error("corrupt FAMS journal: {0}")]
    CorruptJournal(String),
    /// Growth past the reserved address space.
    #[error("cannot grow to {requested} bytes: {limit} bytes are reserved")]
    GrowthLimit {
        /// Size asked for.
        requested: u64,
        /// Reserved bytes.
        limit: u64,
    },
}

/// The FAMS result.
pub type Result<T, E = FamsError> = std::result::Result<T, E>;

fn io(op: &'static str) -> impl FnOnce(std::io::Error) -> FamsError {
    move |source| FamsError::Io { op, source }
}

/// What a sync did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct SyncStats {
    /// Pages committed.
    pub pages: u64,
    /// Bytes written to the journal.
    pub journal_bytes: u64,
}

/// A complete journal read back from storage.
struct Journal {
    seq: u64,
    file_len: u64,
    /// The page size the journal was written with (its entries are pages of this size).
    page: u64,
    /// (page index, page bytes)
    entries: Vec<(u64, Vec<u8>)>,
}

/// The journal, if it is complete; its fields checked (the checksum proves only that the journal
/// is whole, not that this program wrote it).
/// `len` is the journal file's length, `read(offset, buf)` reads it.
fn read_journal(len: u64, read: impl Fn(u64, &mut [u8]) -> std::io::Result<()>) -> Result<Option<Journal>> {
    if len < JOURNAL_HEADER {
        return Ok(None);
    }
    let mut header = [0u64; 8];
    read(0, bytemuck::cast_slice_mut(&mut header)).map_err(io("read journal"))?;
    let [magic, seq, pages, file_len, page, checksum, ..] = header;
    if magic != JOURNAL_MAGIC || page == 0 || page > 1 << 21 || pages > (len - JOURNAL_HEADER) / (8 + page) {
        return Ok(None);
    }
    let mut body = vec![0u8; (pages * (8 + page)) as usize];
    read(JOURNAL_HEADER, &mut body).map_err(io("read journal"))?;
    let mut h = Xxh3::new();
    h.update(bytemuck::cast_slice(&header[..5]));
    h.update(&body);
    if h.digest() != checksum {
        return Ok(None); // torn or never completed: the data file was not touched
    }
    if file_len == 0 || file_len % page != 0 {
        return Err(FamsError::CorruptJournal(format!(
            "the new file length {file_len} is not a positive multiple of its {page}-byte pages"
        )));
    }
    let entries = body
        .chunks_exact((8 + page) as usize)
        .enumerate()
        .map(|(i, e)| {
            let index = u64::from_le_bytes(e[..8].try_into().unwrap_or_default());
            match index.checked_mul(page).and_then(|at| at.checked_add(page)) {
                Some(end) if end <= file_len => Ok((index, e[8..].to_vec())),
                _ => Err(FamsError::CorruptJournal(format!(
                    "entry {i} names page {index}, past the new file length {file_len}"
                ))),
            }
        })
        .collect::<Result<_>>()?;
    Ok(Some(Journal { seq, file_len, page, entries }))
}

/// The first `head.len()` bytes the data file `data` will hold once opened — a complete journal
/// at `journal` applied, in memory — and its length then. Reads only: neither file is written,
/// and no journal is created, so a caller can check what it is about to open before
/// [`Committer::open`] replays anything into it.
pub(crate) fn peek_recovered(data: &File, journal: &Path, head: &mut [u8]) -> Result<u64> {
    let data_len = data.metadata().map_err(io("stat"))?.len();
    let journal = match File::open(journal) {
        Ok(journal) => Some(journal),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(FamsError::Io { op: "open journal", source: e }),
    };
    let journal_len = match &journal {
        Some(j) => j.metadata().map_err(io("stat journal"))?.len(),
        None => 0,
    };
    peek(
        data_len,
        |at, buf| data.read_exact_at(buf, at),
        journal_len,
        |at, buf| match &journal {
            Some(j) => j.read_exact_at(buf, at),
            None => Ok(()),
        },
        head,
    )
}

/// [`peek_recovered`] for the files of any [`Storage`].
pub(crate) fn peek_storage<S: Storage>(storage: &S, head: &mut [u8]) -> Result<u64> {
    let data_len = storage.len(Role::Data).map_err(io("stat"))?;
    let journal_len = storage.len(Role::Journal).map_err(io("stat journal"))?;
    peek(
        data_len,
        |at, buf| storage.read_at(Role::Data, at, buf),
        journal_len,
        |at, buf| storage.read_at(Role::Journal, at, buf),
        head,
    )
}

fn peek(
    data_len: u64,
    read_data: impl Fn(u64, &mut [u8]) -> std::io::Result<()>,
    journal_len: u64,
    read_journal_at: impl Fn(u64, &mut [u8]) -> std::io::Result<()>,
    head: &mut [u8],
) -> Result<u64> {
    head.fill(0);
    let present = head.len().min(data_len as usize);
    read_data(0, &mut head[..present]).map_err(io("read"))?;
    let Some(complete) = read_journal(journal_len, read_journal_at)? else {
        return Ok(data_len);
    };
    for (index, bytes) in &complete.entries {
        // In range: read_journal checked that every page ends within the new length.
        let at = index * complete.page;
        if let Some(into) = head.get_mut(at as usize..) {
            let n = into.len().min(bytes.len());
            into[..n].copy_from_slice(&bytes[..n]);
        }
    }
    Ok(complete.file_len)
}

/// Writes journal entries into the data file and syncs it. Each entry's page lies within
/// `file_len` (checked by [`read_journal`]; a commit's pages come from the tracker).
fn apply<S: Storage>(storage: &S, file_len: u64, page: u64, entries: &[(u64, Vec<u8>)]) -> Result<()> {
    if storage.len(Role::Data).map_err(io("stat"))? != file_len {
        storage.set_len(Role::Data, file_len).map_err(io("set length"))?;
    }
    for (index, data) in entries {
        storage.write_at(Role::Data, index * page, data).map_err(io("write data"))?;
    }
    storage.sync(Role::Data).map_err(io("fsync data"))
}

/// The commit machinery of a FAMS file: its storage, dirty tracking and journal state. The
/// memory it tracks (a [`Region`]) is owned by whoever uses it: a [`FamsFile`] or a pool.
pub(crate) struct Committer<S: Storage> {
    storage: S,
    tracker: Tracker,
    page: u64,
    seq: u64,
    /// The length the data file has on media (as of the last sync).
    synced_len: u64,
    dir_synced: bool,
    poison: Option<String>,
}

impl<S: Storage> Committer<S> {
    /// Replays a complete journal, loads the data file into fresh private memory reserved up to
    /// `max_len`, and starts tracking writes to it.
    pub fn open(storage: S, max_len: u64) -> Result<(Region, Committer<S>)> {
        let page = rustix::param::page_size() as u64;
        let mut seq = 0;
        let journal_len = storage.len(Role::Journal).map_err(io("stat journal"))?;
        match read_journal(journal_len, |at, buf| storage.read_at(Role::Journal, at, buf))? {
            Some(journal) => {
                apply(&storage, journal.file_len, journal.page, &journal.entries)?;
                storage.write_at(Role::Journal, 0, &[0u8; 8]).map_err(io("retire journal"))?;
                seq = journal.seq;
            }
            None if journal_len >= 8 => {
                // An incomplete journal of a sync that crashed: durably clobber its header before
                // the next sync writes a journal over it. Otherwise a crash of that sync can
                // leave the old header with body sectors that the new journal happened to fill
                // with the same bytes — a complete journal of a sync this recovery declared
                // never happened, replayed over the next run's state.
                let mut magic = [0u8; 8];
                storage.read_at(Role::Journal, 0, &mut magic).map_err(io("read journal"))?;
                if u64::from_le_bytes(magic) == JOURNAL_MAGIC {
                    storage.write_at(Role::Journal, 0, &[0u8; 8]).map_err(io("clobber journal"))?;
                    storage.sync(Role::Journal).map_err(io("fsync journal"))?;
                }
            }
            None => {}
        }
        let len = storage.len(Role::Data).map_err(io("stat"))?;
        if len == 0 || len % page != 0 {
            return Err(FamsError::BadSize(len));
        }
        let region = Region::anonymous(len, max_len.max(len).next_multiple_of(page)).map_err(io("mmap"))?;
        // SAFETY: the region was just mapped with `len` writable bytes and nothing else uses it.
        let memory = unsafe { std::slice::from_raw_parts_mut(region.base(), len as usize) };
        storage.read_at(Role::Data, 0, memory).map_err(io("read data"))?;
        // SAFETY: the caller keeps the region mapped as long as the committer (both are owned
        // together by a FamsFile or a Pool, the region dropped after the committer).
        let tracker = unsafe { Tracker::new(region.base(), len as usize) };
        Ok((
            region,
            Committer { storage, tracker, page, seq, synced_len: len, dir_synced: false, poison: None },
        ))
    }

    pub fn tracker(&self) -> TrackerKind {
        self.tracker.kind()
    }

    /// Grows `region` (the one this committer tracks) and tracks its new pages. A failure to
    /// track them, after the region grew, poisons the committer: writes to those pages would
    /// go unseen by every later sync.
    pub fn grow(&mut self, region: &Region, new_len: u64) -> Result<()> {
        if let Some(why) = &self.poison {
            return Err(FamsError::Poisoned(why.clone()));
        }
        if new_len % self.page != 0 {
            return Err(FamsError::BadSize(new_len));
        }
        if new_len > region.reserved() {
            return Err(FamsError::GrowthLimit { requested: new_len, limit: region.reserved() });
        }
        if new_len > region.len() {
            region.grow(None, new_len).map_err(io("grow"))?;
        }
        // SAFETY: the grown region stays mapped as long as the tracker.
        let tracked = unsafe { self.tracker.grow(new_len as usize) }.map_err(io("track"));
        if let Err(e) = &tracked {
            self.poison = Some(e.to_string());
        }
        tracked
    }

    /// Why the committer refuses to sync, if an earlier failure poisoned it.
    pub fn poisoned(&self) -> Option<&str> {
        self.poison.as_deref()
    }

    /// Commits every change to `region` since the previous sync (see the module docs).
    pub fn sync(&mut self, region: &Region) -> Result<SyncStats> {
        if let Some(why) = &self.poison {
            return Err(FamsError::Poisoned(why.clone()));
        }
        let result = self.commit(region);
        if let Err(e) = &result {
            self.poison = Some(e.to_string());
        }
        result
    }

    fn commit(&mut self, region: &Region) -> Result<SyncStats> {
        let dirty = self.tracker.take_dirty().map_err(io("scan dirty pages"))?;
        let len = region.len();
        if dirty.is_empty() && len == self.synced_len {
            return Ok(SyncStats::default());
        }
        let page = self.page;
        let seq = self.seq + 1;
        let mut journal = vec![0u8; (JOURNAL_HEADER + dirty.len() as u64 * (8 + page)) as usize];
        for (i, &index) in dirty.iter().enumerate() {
            let at = (JOURNAL_HEADER + i as u64 * (8 + page)) as usize;
            journal[at..at + 8].copy_from_slice(&index.to_le_bytes());
            // SAFETY: page `index` lies inside the mapped region (the tracker reports only pages
            // of the region).
            let bytes = unsafe {
                std::slice::from_raw_parts(region.base().add((index * page) as usize), page as usize)
            };
            journal[at + 8..at + 8 + page as usize].copy_from_slice(bytes);
        }
        let mut header = [JOURNAL_MAGIC, seq, dirty.len() as u64, len, page, 0, 0, 0];
        let mut h = Xxh3::new();
        h.update(bytemuck::cast_slice(&header[..5]));
        h.update(&journal[JOURNAL_HEADER as usize..]);
        header[5] = h.digest();
        journal[..JOURNAL_HEADER as usize].copy_from_slice(bytemuck::cast_slice(&header));
        let storage = &self.storage;
        storage.write_at(Role::Journal, 0, &journal).map_err(io("write journal"))?;
        storage.sync(Role::Journal).map_err(io("fsync journal"))?;
        if !self.dir_synced {
            storage.sync_dir().map_err(io("fsync directory"))?;
            self.dir_synced = true;
        }
        let entries: Vec<(u64, Vec<u8>)> = dirty
            .iter()
            .enumerate()
            .map(|(i, &index)| {
                let at = (JOURNAL_HEADER + i as u64 * (8 + page) + 8) as usize;
                (index, journal[at..at + page as usize].to_vec())
            })
            .collect();
        apply(storage, len, page, &entries)?;
        storage.write_at(Role::Journal, 0, &[0u8; 8]).map_err(io("retire journal"))?;
        self.seq = seq;
        self.synced_len = len;
        Ok(SyncStats { pages: dirty.len() as u64, journal_bytes: journal.len() as u64 })
    }
}

/// A file whose contents live in private memory and change on disk only at [`FamsFile::sync`],
/// atomically.
pub struct FamsFile<S: Storage> {
    committer: Committer<S>,
    region: Region,
}

impl<S: Storage> std::fmt::Debug for FamsFile<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FamsFile")
            .field("len", &self.len())
            .field("tracker", &self.tracker())
            .finish_non_exhaustive()
    }
}

impl FamsFile<FileStorage> {
    /// Creates a file of `len` bytes (zeros) at `path`, with `max_len` of address space for growth.
    pub fn create(path: impl AsRef<Path>, len: u64, max_len: u64) -> Result<FamsFile<FileStorage>> {
        let storage = FileStorage::open(path.as_ref(), true).map_err(io("create"))?;
        storage.set_len(Role::Data, len).map_err(io("extend"))?;
        storage.sync(Role::Data).map_err(io("fsync"))?;
        FamsFile::open_storage(storage, max_len)
    }

    /// Opens `path`, recovering an interrupted sync.
    pub fn open(path: impl AsRef<Path>, max_len: u64) -> Result<FamsFile<FileStorage>> {
        FamsFile::open_storage(FileStorage::open(path.as_ref(), false).map_err(io("open"))?, max_len)
    }
}

impl<S: Storage> FamsFile<S> {
    /// Opens the files behind `storage`: replays a complete journal, loads the data into
    /// private memory and starts tracking writes.
    pub fn open_storage(storage: S, max_len: u64) -> Result<FamsFile<S>> {
        let (region, committer) = Committer::open(storage, max_len)?;
        Ok(FamsFile { committer, region })
    }

    contents_accessors!();

    /// How dirty pages are found.
    pub fn tracker(&self) -> TrackerKind {
        self.committer.tracker()
    }

    /// Grows the contents (zeros); durable at the next sync.
    pub fn grow(&mut self, new_len: u64) -> Result<()> {
        self.committer.grow(&self.region, new_len)
    }

    /// Commits every change since the previous sync, atomically: after a crash at any point the
    /// file holds either the previous synced state or this one (this one for certain once `sync`
    /// returns `Ok`).
    pub fn sync(&mut self) -> Result<SyncStats> {
        self.committer.sync(&self.region)
    }
}

/// The accessors a file kept in a [`Region`] offers (length, pointer, copy, checked write).
macro_rules! contents_accessors {
    () => {
        /// The contents' length.
        pub fn len(&self) -> u64 {
            self.region.len()
        }

        /// Whether the file is empty (never: sizes are positive).
        pub fn is_empty(&self) -> bool {
            self.len() == 0
        }

        /// Start of the contents in memory. Change them with ordinary stores; `sync` commits.
        pub fn as_ptr(&self) -> *mut u8 {
            self.region.base()
        }

        /// The contents (a copy).
        pub fn to_vec(&self) -> Vec<u8> {
            self.region.to_vec()
        }

        /// Copies `data` into the contents at `offset`.
        pub fn write(&mut self, offset: u64, data: &[u8]) -> Result<()> {
            $crate::fams::write_checked(&self.region, offset, data)
        }
    };
}
pub(crate) use contents_accessors;

/// Copies `data` into `region` at `offset`, refusing a range outside it.
pub(crate) fn write_checked(region: &Region, offset: u64, data: &[u8]) -> Result<()> {
    let len = data.len() as u64;
    match offset.checked_add(len) {
        Some(end) if end <= region.len() => {
            // SAFETY: the range was checked against the mapped length; the owner's `&mut self`
            // excludes other users.
            unsafe {
                std::ptr::copy_nonoverlapping(data.as_ptr(), region.base().add(offset as usize), data.len())
            };
            Ok(())
        }
        _ => Err(FamsError::OutOfBounds { offset, len, size: region.len() }),
    }
}

/// The contents `path` will have once opened — its data file with a complete journal applied —
/// computed in memory without writing either file (for inspection tools).
pub fn recovered_contents(path: &Path) -> Result<Vec<u8>> {
    let data = std::fs::read(path).map_err(io("read"))?;
    let journal = match std::fs::read(journal_path(path)) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(FamsError::Io { op: "read journal", source: e }),
    };
    let len = data.len() as u64;
    let file = FamsFile::open_storage(SimStorage::from_image(data, journal), len.max(1))?;
    Ok(file.to_vec())
}

/// A checksum of contents, for tests and tools comparing states.
pub fn digest(bytes: &[u8]) -> u64 {
    xxh3_64(bytes)
}
