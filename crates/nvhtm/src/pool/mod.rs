//! Pool files: a file mapped into memory with a checksummed header, a root object, typed offset
//! pointers, growth in place, and an exclusive lock against a second writer.
//!
//! Every store into the pool goes through the pool's persistence [`Domain`]; the pool's accessors
//! bounds-check offsets, keep the header out of reach of user writes, and refuse every read and
//! write after a failed flush ([`PoolError::Poisoned`]).

mod error;
mod header;
mod info;
mod pptr;
pub(crate) mod region;

pub use error::{PoolError, Result};
pub use header::{FORMAT_VERSION, HEADER_SIZE, INCOMPAT_FAMS, MAX_LAYOUT_LEN, MIN_POOL_SIZE};
pub use info::PoolInfo;
pub use pptr::PPtr;
pub use region::MappingKind;

use std::cell::RefCell;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, OnceLock, RwLock, RwLockReadGuard};

use bytemuck::{Pod, Zeroable};

use crate::persist::{AutoDomain, Cpu, Domain, Msync, Volatile};
use header::{FixedHeader, Header, StateSlot, HEADER_BYTES, SLOT_OFFSETS};
use region::Region;

/// Layout name used when none is given.
pub const DEFAULT_LAYOUT: &str = "nvhtm";
/// Pool size used when none is given: 64 MiB.
pub const DEFAULT_SIZE: u64 = 64 << 20;
/// Address space reserved for growth when none is given: 64 GiB (virtual only).
pub const DEFAULT_MAX_SIZE: u64 = 64 << 30;

/// Which persistence domain an [`AutoDomain`] pool uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Mode {
    /// `Cpu` on DAX and tmpfs, `Msync` on ordinary files.
    #[default]
    Auto,
    /// Cache-line write-back (refused on ordinary files unless forced).
    Cpu,
    /// `msync` of the covering pages.
    Msync,
    /// No durability.
    Volatile,
}

/// How to create or open a pool.
#[derive(Debug, Clone)]
pub struct PoolOptions {
    /// Size of a new pool in bytes (rounded up to the page size).
    pub size: u64,
    /// Address space reserved for growth.
    pub max_size: u64,
    /// Application layout name: stored at creation, checked at open.
    pub layout: String,
    /// Domain choice for [`AutoDomain`] pools.
    pub mode: Mode,
    /// Use the chosen domain even where it is not durable.
    pub force: bool,
}

impl Default for PoolOptions {
    fn default() -> PoolOptions {
        PoolOptions {
            size: DEFAULT_SIZE,
            max_size: DEFAULT_MAX_SIZE,
            layout: DEFAULT_LAYOUT.to_string(),
            mode: Mode::Auto,
            force: false,
        }
    }
}

impl PoolOptions {
    /// Options with a layout name.
    pub fn layout(layout: &str) -> PoolOptions {
        PoolOptions { layout: layout.to_string(), ..PoolOptions::default() }
    }

    /// Sets the size of a new pool.
    pub fn with_size(mut self, size: u64) -> PoolOptions {
        self.size = size;
        self
    }

    /// Sets the address space reserved for growth.
    pub fn with_max_size(mut self, max_size: u64) -> PoolOptions {
        self.max_size = max_size;
        self
    }

    /// Sets the domain choice of an [`AutoDomain`] pool.
    pub fn with_mode(mut self, mode: Mode) -> PoolOptions {
        self.mode = mode;
        self
    }

    /// Uses the chosen domain even where it is not durable.
    pub fn forced(mut self) -> PoolOptions {
        self.force = true;
        self
    }
}

/// A domain that can back a pool file: it decides whether it is durable on the mapping.
pub trait FileDomain: Domain + Sized {
    /// The domain for a file mapped as `mapping`, or why it does not fit.
    fn for_mapping(mapping: MappingKind, opts: &PoolOptions, path: &Path) -> Result<Self>;
}

impl FileDomain for Cpu {
    fn for_mapping(mapping: MappingKind, opts: &PoolOptions, path: &Path) -> Result<Cpu> {
        if mapping == MappingKind::File && !opts.force {
            return Err(PoolError::DomainMismatch {
                path: path.to_path_buf(),
                domain: "cpu".into(),
                mapping: mapping.to_string(),
                suggest: "the msync domain",
            });
        }
        Ok(Cpu::detect())
    }
}

impl FileDomain for Msync {
    fn for_mapping(_: MappingKind, _: &PoolOptions, _: &Path) -> Result<Msync> {
        Ok(Msync::new())
    }
}

impl FileDomain for Volatile {
    fn for_mapping(_: MappingKind, _: &PoolOptions, _: &Path) -> Result<Volatile> {
        Ok(Volatile)
    }
}

impl FileDomain for AutoDomain {
    fn for_mapping(mapping: MappingKind, opts: &PoolOptions, path: &Path) -> Result<AutoDomain> {
        Ok(match (opts.mode, mapping) {
            // A FAMS pool commits at sync: no flushing on the way.
            (Mode::Auto, MappingKind::Fams) | (Mode::Volatile, _) => AutoDomain::Volatile(Volatile),
            (Mode::Auto, MappingKind::File) | (Mode::Msync, _) => AutoDomain::Msync(Msync::new()),
            (Mode::Auto, _) | (Mode::Cpu, _) => AutoDomain::Cpu(Cpu::for_mapping(mapping, opts, path)?),
        })
    }
}

/// A mapped pool.
///
/// # Poisoning
///
/// The first failed persist (a fence, a header update, a sync) poisons the pool for good: from
/// then on every accessor that reads or writes the pool's bytes — [`read`](Pool::read),
/// [`read_into`](Pool::read_into), [`load_u64`](Pool::load_u64), [`root`](Pool::root),
/// [`image`](Pool::image), the writes, [`flush`](Pool::flush), [`fence`](Pool::fence),
/// [`sync`](Pool::sync), [`grow`](Pool::grow) — returns [`PoolError::Poisoned`]. Reads are
/// refused too because the memory may hold data whose persist failed (a commit's meta word
/// stored, its fence failed): after a failed persist nothing may return data that is not
/// durable. The poison is set before the failing call returns, so a structure that releases a
/// lock or a version after the error publishes the poison with it. Only reopening the pool
/// (reading back what the medium holds) makes it usable again.
pub struct Pool<D: Domain> {
    /// For a FAMS pool: the commit machinery (dropped before the region it tracks).
    fams: Option<Mutex<crate::fams::Committer<crate::fams::FileStorage>>>,
    region: Region,
    domain: D,
    /// The open file; holds the exclusive lock. `None` for in-memory pools.
    file: Option<File>,
    path: PathBuf,
    fixed: FixedHeader,
    /// The current header state; the lock serialises state updates.
    state: Mutex<StateSlot>,
    was_clean: bool,
    poison: OnceLock<String>,
    /// A FAMS pool's writer gate: writers share it, a sync takes it alone (see
    /// [`Pool::enter_writer`]).
    gate: RwLock<()>,
    open: bool,
}

thread_local! {
    /// The writer gates this thread is inside (by address): entering one again is free, and a
    /// sync from inside one is refused instead of waiting for itself.
    static GATES_HELD: RefCell<Vec<usize>> = const { RefCell::new(Vec::new()) };
}

/// A writer's pass through a FAMS pool's gate ([`Pool::enter_writer`]); leaving is dropping it.
#[derive(Debug)]
#[must_use = "the writer leaves the gate when this is dropped"]
pub struct WriterGuard<'a> {
    shared: Option<RwLockReadGuard<'a, ()>>,
    gate: usize,
}

impl Drop for WriterGuard<'_> {
    fn drop(&mut self) {
        if self.shared.is_some() {
            GATES_HELD.with(|held| held.borrow_mut().retain(|&g| g != self.gate));
        }
    }
}

impl<D: Domain> std::fmt::Debug for Pool<D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("path", &self.path)
            .field("layout", &self.fixed.layout_name())
            .field("size", &self.size())
            .field("domain", &self.domain.kind())
            .field("mapping", &self.region.kind())
            .finish()
    }
}

fn now_unix() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn new_uuid() -> [u8; 16] {
    let mut uuid = [0u8; 16];
    if rustix::rand::getrandom(&mut uuid, rustix::rand::GetRandomFlags::empty()).is_err() {
        let mut rng = fastrand::Rng::new();
        uuid.iter_mut().for_each(|b| *b = rng.u8(..));
    }
    uuid[6] = (uuid[6] & 0x0f) | 0x40; // version 4
    uuid[8] = (uuid[8] & 0x3f) | 0x80; // RFC 4122 variant
    uuid
}

fn page_round(size: u64) -> u64 {
    size.next_multiple_of(rustix::param::page_size() as u64)
}

fn lock_exclusive(file: &File, path: &Path) -> Result<()> {
    rustix::fs::flock(file, rustix::fs::FlockOperation::NonBlockingLockExclusive).map_err(|e| {
        if e == rustix::io::Errno::WOULDBLOCK {
            PoolError::Locked { path: path.to_path_buf() }
        } else {
            PoolError::io(path, "lock", e.into())
        }
    })
}

/// Gives `file` real blocks for `offset..offset + len`, so a store into the mapping can never
/// fault for want of space (it would be SIGBUS, not an error).
fn allocate(file: &File, path: &Path, offset: u64, len: u64) -> Result<()> {
    match rustix::fs::fallocate(file, rustix::fs::FallocateFlags::empty(), offset, len) {
        Ok(()) => Ok(()),
        Err(e) if e == rustix::io::Errno::NOSPC || e == rustix::io::Errno::DQUOT => {
            Err(PoolError::NoSpace { path: path.to_path_buf(), op: "allocate", bytes: len })
        }
        // Without fallocate, at least make the file long enough (never shorter).
        Err(e) if e == rustix::io::Errno::OPNOTSUPP => {
            let file_len = file.metadata().map_err(|e| PoolError::io(path, "stat", e))?.len();
            if file_len >= offset + len {
                return Ok(());
            }
            file.set_len(offset + len).map_err(|e| PoolError::io(path, "extend", e))
        }
        Err(e) => Err(PoolError::io(path, "allocate", e.into())),
    }
}

/// Checks the options for a new pool; returns its size, rounded up to whole pages.
fn validate_options(opts: &PoolOptions) -> Result<u64> {
    header::validate_layout(&opts.layout)?;
    if opts.size < MIN_POOL_SIZE {
        return Err(PoolError::TooSmall { requested: opts.size, minimum: MIN_POOL_SIZE });
    }
    Ok(page_round(opts.size))
}

/// [`validate_options`] for a new pool file at `path`, which must not exist yet.
fn validate_new(path: &Path, opts: &PoolOptions) -> Result<u64> {
    let size = validate_options(opts)?;
    if path.symlink_metadata().is_ok() {
        return Err(PoolError::AlreadyExists { path: path.to_path_buf() });
    }
    Ok(size)
}

fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(|e| PoolError::io(dir, "fsync directory", e))
}

/// Renames `from` to `to` unless `to` exists, atomically.
fn rename_no_replace(from: &Path, to: &Path) -> Result<()> {
    use rustix::fs::{renameat_with, RenameFlags, CWD};
    match renameat_with(CWD, from, CWD, to, RenameFlags::NOREPLACE) {
        Ok(()) => Ok(()),
        Err(e) if e == rustix::io::Errno::EXIST => Err(PoolError::AlreadyExists { path: to.to_path_buf() }),
        // File systems without RENAME_NOREPLACE: a hard link also refuses to replace.
        Err(e) if e == rustix::io::Errno::INVAL || e == rustix::io::Errno::NOSYS => {
            std::fs::hard_link(from, to).map_err(|e| PoolError::io(to, "link", e))?;
            std::fs::remove_file(from).map_err(|e| PoolError::io(from, "remove", e))
        }
        Err(e) => Err(PoolError::io(to, "rename", e.into())),
    }
}

impl<D: FileDomain> Pool<D> {
    /// Creates a pool file at `path`. The file appears under its name only once it is complete
    /// and durable (it is built under a temporary name and renamed), and `path` must not exist.
    pub fn create(path: impl AsRef<Path>, opts: &PoolOptions) -> Result<Pool<D>> {
        Pool::create_with(path, opts, |_| Ok::<(), PoolError>(()))
    }

    /// [`Pool::create`], with `init` run on the new pool before it is published at `path`: a
    /// crash at any point leaves either no pool there or one that `init` finished (what a
    /// structure lays out in a new pool — a heap — is then never missing from it).
    pub fn create_with<E: From<PoolError>>(
        path: impl AsRef<Path>,
        opts: &PoolOptions,
        init: impl FnOnce(&Pool<D>) -> std::result::Result<(), E>,
    ) -> std::result::Result<Pool<D>, E> {
        let path = path.as_ref();
        let size = validate_new(path, opts)?;
        let dir = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let name = path.file_name().ok_or_else(|| PoolError::Io {
            path: path.to_path_buf(),
            op: "create",
            source: std::io::Error::other("the path has no file name"),
        })?;
        let tmp = dir.join(format!(
            ".{}.{}.{:x}.tmp",
            name.to_string_lossy(),
            std::process::id(),
            fastrand::u64(..)
        ));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&tmp)
            .map_err(|e| PoolError::io(path, "create", e))?;
        let built = (|| {
            lock_exclusive(&file, path)?;
            allocate(&file, path, 0, size)?;
            let reserved = page_round(opts.max_size.max(size));
            let region =
                Region::map_file(&file, size, reserved).map_err(|e| PoolError::io(path, "mmap", e))?;
            let domain = D::for_mapping(region.kind(), opts, path)?;
            let pool = Pool::format(region, domain, Some(file), path, &opts.layout)?;
            init(&pool)?;
            // Everything `init` wrote, and the header, durable before the name appears.
            if let Some(file) = &pool.file {
                file.sync_all().map_err(|e| PoolError::io(path, "fsync", e))?;
            }
            rename_no_replace(&tmp, path)?;
            sync_dir(&dir)?;
            Ok(pool)
        })();
        if built.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        built
    }

    /// Opens an existing pool for reading and writing, taking its exclusive lock. Every check
    /// of the header runs before anything is written. The file's blocks are then allocated, as
    /// at creation: a sparse copy of a pool has holes, and a store into a hole of a full file
    /// system would be SIGBUS, not an error (a full one fails the open with `NoSpace`).
    pub fn open(path: impl AsRef<Path>, opts: &PoolOptions) -> Result<Pool<D>> {
        let path = path.as_ref();
        Pool::open_mapped(path, opts, |mapping| D::for_mapping(mapping, opts, path))
    }
}

impl<D: Domain> Pool<D> {
    /// Opens an existing pool file with a domain the caller chose, whatever the mapping turns
    /// out to be (for benchmarks and experiments: no durability check is made).
    pub fn open_with_domain(path: impl AsRef<Path>, opts: &PoolOptions, domain: D) -> Result<Pool<D>> {
        Pool::open_mapped(path.as_ref(), opts, |_| Ok(domain))
    }

    fn open_mapped(
        path: &Path,
        opts: &PoolOptions,
        domain_for: impl FnOnce(MappingKind) -> Result<D>,
    ) -> Result<Pool<D>> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|e| PoolError::io(path, "open", e))?;
        lock_exclusive(&file, path)?;
        let header = read_header(&file, path)?;
        check_layout(&header, &opts.layout, path)?;
        refuse_fams(&header, path)?;
        allocate(&file, path, 0, header.state.size)?;
        let reserved = page_round(opts.max_size.max(header.state.size));
        let region = Region::map_file(&file, header.state.size, reserved)
            .map_err(|e| PoolError::io(path, "mmap", e))?;
        let domain = domain_for(region.kind())?;
        Pool::start(region, domain, Some(file), path, header)
    }
}

impl<D: FileDomain> Pool<D> {
    /// Creates a FAMS pool: its contents live in private memory and reach the file only at
    /// [`Pool::sync`], atomically, through a journal beside the file (`PATH.journal`). Every
    /// structure runs on it unchanged, without flushes (choose [`Volatile`], or
    /// [`AutoDomain`] which picks it).
    pub fn create_fams(path: impl AsRef<Path>, opts: &PoolOptions) -> Result<Pool<D>> {
        Pool::create_fams_with(path, opts, |_| Ok::<(), PoolError>(()))
    }

    /// [`Pool::create_fams`], with `init` run on the new pool before its first sync: what `init`
    /// lays out is in the pool's first committed state.
    pub fn create_fams_with<E: From<PoolError>>(
        path: impl AsRef<Path>,
        opts: &PoolOptions,
        init: impl FnOnce(&Pool<D>) -> std::result::Result<(), E>,
    ) -> std::result::Result<Pool<D>, E> {
        let path = path.as_ref();
        let size = validate_new(path, opts)?;
        let storage =
            crate::fams::FileStorage::open(path, true).map_err(|e| PoolError::io(path, "create", e))?;
        let made = (|| {
            use crate::fams::Storage;
            storage.set_len(crate::fams::Role::Data, size).map_err(|e| PoolError::io(path, "extend", e))?;
            storage.sync(crate::fams::Role::Data).map_err(|e| PoolError::io(path, "fsync", e))?;
            let (mut region, committer) =
                crate::fams::Committer::open(storage, page_round(opts.max_size.max(size)))
                    .map_err(PoolError::from)?;
            region.mark_fams();
            let domain = D::for_mapping(MappingKind::Fams, opts, path)?;
            let mut pool = Pool::format_with(region, domain, None, path, &opts.layout, INCOMPAT_FAMS)?;
            pool.fams = Some(Mutex::new(committer));
            init(&pool)?;
            pool.sync()?;
            Ok(pool)
        })();
        if made.is_err() {
            let _ = std::fs::remove_file(path);
            let _ = std::fs::remove_file(crate::fams::journal_path(path));
        }
        made
    }

    /// Opens a FAMS pool, first completing a sync that a crash interrupted after its journal was
    /// durable. The header is checked first — as that journal would leave it, read without
    /// writing — so a file that is not a FAMS pool gets an error before a journal is created or
    /// replayed into it.
    pub fn open_fams(path: impl AsRef<Path>, opts: &PoolOptions) -> Result<Pool<D>> {
        let path = path.as_ref();
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|e| PoolError::io(path, "open", e))?;
        lock_exclusive(&file, path)?;
        let mut head = vec![0u8; HEADER_BYTES];
        let len = crate::fams::peek_recovered(&file, &crate::fams::journal_path(path), &mut head)?;
        let header = header::parse(path, &head[..HEADER_BYTES.min(len as usize)], len)?;
        check_layout(&header, &opts.layout, path)?;
        if header.fixed.incompat_flags & INCOMPAT_FAMS == 0 {
            return Err(PoolError::FamsMode {
                path: path.to_path_buf(),
                what: "not a FAMS pool: open it without FAMS mode",
            });
        }
        let storage = crate::fams::FileStorage::with_data(file, path, false)
            .map_err(|e| PoolError::io(path, "open journal", e))?;
        // The replay leaves exactly the header checked above.
        let (mut region, committer) = crate::fams::Committer::open(storage, opts.max_size)?;
        region.mark_fams();
        let domain = D::for_mapping(MappingKind::Fams, opts, path)?;
        let mut pool = Pool::start(region, domain, None, path, header)?;
        pool.fams = Some(Mutex::new(committer));
        Ok(pool)
    }
}

impl Pool<Volatile> {
    /// Opens a pool file copy-on-write, to inspect it: recovery and every other store change
    /// only this process's memory, never the file. Refused while another process has the pool
    /// open for writing.
    pub fn open_private(path: impl AsRef<Path>, opts: &PoolOptions) -> Result<Pool<Volatile>> {
        let path = path.as_ref();
        let file = File::open(path).map_err(|e| PoolError::io(path, "open", e))?;
        rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockShared).map_err(|e| {
            if e == rustix::io::Errno::WOULDBLOCK {
                PoolError::Locked { path: path.to_path_buf() }
            } else {
                PoolError::io(path, "lock", e.into())
            }
        })?;
        let header = read_header(&file, path)?;
        check_layout(&header, &opts.layout, path)?;
        refuse_fams(&header, path)?;
        let reserved = page_round(opts.max_size.max(header.state.size));
        let region = Region::map_file_private(&file, header.state.size, reserved)
            .map_err(|e| PoolError::io(path, "mmap", e))?;
        Pool::start(region, Volatile, Some(file), path, header)
    }
}

/// Reads and validates the header of an open pool file.
pub(crate) fn read_header(file: &File, path: &Path) -> Result<Header> {
    let file_len = file.metadata().map_err(|e| PoolError::io(path, "stat", e))?.len();
    let mut bytes = vec![0u8; HEADER_BYTES.min(file_len as usize)];
    file.read_exact_at(&mut bytes, 0).map_err(|e| PoolError::io(path, "read header", e))?;
    header::parse(path, &bytes, file_len)
}

fn refuse_fams(header: &Header, path: &Path) -> Result<()> {
    if header.fixed.incompat_flags & INCOMPAT_FAMS != 0 {
        return Err(PoolError::FamsMode {
            path: path.to_path_buf(),
            what: "a FAMS pool (committed by failure-atomic msync): open it in FAMS mode (--fams)",
        });
    }
    Ok(())
}

fn check_layout(header: &Header, expected: &str, path: &Path) -> Result<()> {
    let found = header.fixed.layout_name();
    if found != expected {
        return Err(PoolError::WrongLayout {
            path: path.to_path_buf(),
            expected: expected.to_string(),
            found,
        });
    }
    Ok(())
}

impl<D: Domain> Pool<D> {
    /// Creates a pool in anonymous memory with `domain` (for the simulator and for tests).
    pub fn create_in_memory(opts: &PoolOptions, domain: D) -> Result<Pool<D>> {
        let size = validate_options(opts)?;
        let path = Path::new("<memory>");
        let region = Region::anonymous(size, page_round(opts.max_size.max(size)))
            .map_err(|e| PoolError::io(path, "mmap", e))?;
        Pool::format(region, domain, None, path, &opts.layout)
    }

    /// Opens a pool from a memory image (a crash image of the simulator, or a copy of a pool).
    pub fn open_image(image: &[u8], opts: &PoolOptions, domain: D) -> Result<Pool<D>> {
        let path = Path::new("<image>");
        let header = header::parse(path, image, image.len() as u64)?;
        check_layout(&header, &opts.layout, path)?;
        // Like a file, the pool is as long as its header says (the image may be longer).
        let len = header.state.size;
        let region = Region::anonymous(len, page_round(opts.max_size.max(len)))
            .map_err(|e| PoolError::io(path, "mmap", e))?;
        // SAFETY: the region was just mapped with `len` writable bytes, `len <= image.len()`
        // (checked by `parse`), and it is not shared yet.
        unsafe { std::ptr::copy_nonoverlapping(image.as_ptr(), region.base(), len as usize) };
        Pool::start(region, domain, None, path, header)
    }

    /// Writes a fresh header into a new mapping.
    fn format(region: Region, domain: D, file: Option<File>, path: &Path, layout: &str) -> Result<Pool<D>> {
        Pool::format_with(region, domain, file, path, layout, 0)
    }

    fn format_with(
        region: Region,
        domain: D,
        file: Option<File>,
        path: &Path,
        layout: &str,
        incompat: u64,
    ) -> Result<Pool<D>> {
        let mut fixed = FixedHeader::new(new_uuid(), layout, now_unix());
        fixed.incompat_flags = incompat;
        fixed.checksum = fixed.compute_checksum();
        let state = StateSlot { seq: 1, size: region.len(), ..StateSlot::zeroed() }.sealed(fixed.checksum);
        let pool = Pool::assemble(region, domain, file, path, Header { fixed, state }, true);
        pool.write_header_bytes(0, bytemuck::bytes_of(&fixed));
        pool.write_header_bytes(SLOT_OFFSETS[1], bytemuck::bytes_of(&state));
        pool.persist_header(0, HEADER_BYTES as u64)?;
        Ok(pool)
    }

    /// Takes over a validated pool and marks it as in use (not cleanly shut down).
    fn start(region: Region, domain: D, file: Option<File>, path: &Path, header: Header) -> Result<Pool<D>> {
        let was_clean = header.state.clean_shutdown == 1;
        let pool = Pool::assemble(region, domain, file, path, header, was_clean);
        pool.update_state(|s| s.clean_shutdown = 0)?;
        Ok(pool)
    }

    fn assemble(
        region: Region,
        domain: D,
        file: Option<File>,
        path: &Path,
        header: Header,
        was_clean: bool,
    ) -> Pool<D> {
        // SAFETY: the region stays mapped for as long as the pool (and so the domain) lives.
        unsafe { domain.attach(region.base(), region.len() as usize) };
        Pool {
            fams: None,
            region,
            domain,
            file,
            path: path.to_path_buf(),
            fixed: header.fixed,
            state: Mutex::new(header.state),
            was_clean,
            poison: OnceLock::new(),
            gate: RwLock::new(()),
            open: true,
        }
    }

    fn lock_state(&self) -> MutexGuard<'_, StateSlot> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Writes a new header state failure-atomically (see [`header`]).
    fn update_state(&self, change: impl FnOnce(&mut StateSlot)) -> Result<()> {
        let mut current = self.lock_state();
        self.update_state_locked(&mut current, change)
    }

    fn update_state_locked(
        &self,
        current: &mut StateSlot,
        change: impl FnOnce(&mut StateSlot),
    ) -> Result<()> {
        self.check_poison()?;
        let mut next = *current;
        change(&mut next);
        next.seq = current.seq + 1;
        let next = next.sealed(self.fixed.checksum);
        let offset = SLOT_OFFSETS[(next.seq % 2) as usize];
        // One copy's words may persist in any order, so the slot's `seq` — which names it the
        // newest — is stored after the rest: a slot showing the new `seq` holds the whole update,
        // and a torn one keeps the slot's old `seq` and fails its checksum. (With `seq` inside
        // the copy, a torn update's words plus the same `seq` rewritten by the next run's
        // update could form a valid slot of an update that never completed.)
        let bytes = bytemuck::bytes_of(&next);
        self.write_header_bytes(offset + 8, &bytes[8..]);
        self.write_header_bytes(offset, &bytes[..8]);
        self.persist_header(offset, 64)?;
        *current = next;
        Ok(())
    }

    fn write_header_bytes(&self, offset: u64, bytes: &[u8]) {
        debug_assert!(offset + bytes.len() as u64 <= HEADER_SIZE);
        // SAFETY: the header lies inside every pool mapping (size >= MIN_POOL_SIZE), and header
        // writes are serialised by the state lock (or happen before the pool is shared).
        unsafe { self.domain.write(self.region.base().add(offset as usize), bytes) };
    }

    #[track_caller]
    fn persist_header(&self, offset: u64, len: u64) -> Result<()> {
        // SAFETY: the header range lies inside the mapping.
        let flushed = unsafe { self.domain.persist(self.region.base().add(offset as usize), len as usize) };
        self.note_persist(flushed)
    }

    fn note_persist(&self, result: Result<(), crate::persist::PersistError>) -> Result<()> {
        result.map_err(|e| {
            let _ = self.poison.set(e.to_string());
            PoolError::Persist(e)
        })
    }

    /// Marks the pool cleanly shut down and releases it. Everything written before is durable
    /// when this returns `Ok` (for file pools the whole mapping is synced first).
    pub fn close(mut self) -> Result<()> {
        self.open = false;
        self.shutdown()
    }

    fn shutdown(&self) -> Result<()> {
        self.check_poison()?;
        self.sync()?;
        self.update_state(|s| s.clean_shutdown = 1)?;
        self.sync()
    }

    /// Makes everything written so far durable: for a FAMS pool, the atomic commit of every
    /// change since the previous sync; for a file pool, an `msync` of the whole mapping; for an
    /// in-memory pool, nothing. A failure poisons the pool.
    ///
    /// For a FAMS pool the commit is the state at one point between writers: it waits for the
    /// heap's transactions and the maps' operations in flight on other threads to finish, and
    /// holds new ones back until it is done (the writer gate, [`Pool::enter_writer`]). Called
    /// from inside a writer on this thread it would wait for itself, so it returns
    /// [`PoolError::SyncInsideWriter`].
    pub fn sync(&self) -> Result<()> {
        self.check_poison()?;
        let synced = match &self.fams {
            Some(committer) => {
                if self.inside_gate() {
                    return Err(PoolError::SyncInsideWriter);
                }
                // Every writer in flight finishes first, and none starts until the commit is
                // done: the commit is the state at one point between operations.
                let _alone = self.gate.write().unwrap_or_else(|e| e.into_inner());
                let mut committer = committer.lock().unwrap_or_else(|e| e.into_inner());
                committer.sync(&self.region).map(drop).map_err(PoolError::from)
            }
            None => self.region.sync_all().map_err(|e| PoolError::io(&self.path, "msync", e)),
        };
        if let Err(e) = &synced {
            let _ = self.poison.set(e.to_string());
        }
        synced
    }

    /// Enters the pool as a writer. On a FAMS pool, [`sync`](Pool::sync) waits until every
    /// writer inside has left and holds new ones back until its commit is done, so a commit
    /// never captures an operation half done on another thread. The heap's transactions and
    /// reservations and the maps' writes enter by themselves; code that writes into the pool
    /// directly (`write_bytes`, `store_u64`, ...) and needs several writes to be committed
    /// together enters around them. Re-entrant on one thread; on other pools it costs nothing.
    /// A writer must not wait for another thread's writer to start (a sync waiting between
    /// them would hold that one back: a deadlock).
    ///
    /// ```
    /// # use nvhtm::{Pool, PoolOptions, Volatile};
    /// # fn main() -> Result<(), nvhtm::PoolError> {
    /// # let dir = std::env::temp_dir().join(format!("nvhtm-gate-doc-{}", std::process::id()));
    /// # std::fs::create_dir_all(&dir).unwrap();
    /// # let path = dir.join("gate.pool");
    /// let pool = Pool::<Volatile>::create_fams(&path, &PoolOptions::layout("doc"))?;
    /// {
    ///     let _writer = pool.enter_writer();
    ///     pool.write_bytes(4096, b"two writes ")?;
    ///     pool.write_bytes(4107, b"committed together")?;
    ///     // A sync from inside the gate would wait for itself: it is refused.
    ///     assert!(pool.sync().is_err());
    /// }
    /// pool.sync()?;
    /// # drop(pool); std::fs::remove_dir_all(&dir).unwrap();
    /// # Ok(()) }
    /// ```
    pub fn enter_writer(&self) -> WriterGuard<'_> {
        let gate = &self.gate as *const RwLock<()> as usize;
        if self.fams.is_none() || self.inside_gate() {
            return WriterGuard { shared: None, gate };
        }
        let shared = self.gate.read().unwrap_or_else(|e| e.into_inner());
        GATES_HELD.with(|held| held.borrow_mut().push(gate));
        WriterGuard { shared: Some(shared), gate }
    }

    fn inside_gate(&self) -> bool {
        let gate = &self.gate as *const RwLock<()> as usize;
        GATES_HELD.with(|held| held.borrow().contains(&gate))
    }

    /// Whether the pool is committed by failure-atomic msync.
    pub fn is_fams(&self) -> bool {
        self.fams.is_some()
    }

    /// The file this pool maps (`<memory>` or `<image>` for anonymous pools).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The pool's size in bytes.
    pub fn size(&self) -> u64 {
        self.region.len()
    }

    /// The first offset available to users (everything before is the header).
    pub fn data_start(&self) -> u64 {
        HEADER_SIZE
    }

    /// The application layout name.
    pub fn layout(&self) -> String {
        self.fixed.layout_name()
    }

    /// The pool's UUID.
    pub fn uuid(&self) -> [u8; 16] {
        self.fixed.uuid
    }

    /// The persistence domain.
    pub fn domain(&self) -> &D {
        &self.domain
    }

    /// What the mapping turned out to be.
    pub fn mapping(&self) -> MappingKind {
        self.region.kind()
    }

    /// Whether the previous user of the pool shut it down cleanly (`false` after a crash).
    pub fn was_clean(&self) -> bool {
        self.was_clean
    }

    /// The header and mapping facts, as `nvhtm info` shows them.
    pub fn info(&self) -> PoolInfo {
        let state = *self.lock_state();
        let (filesystem, file_size) = match &self.file {
            Some(file) => (info::filesystem_name(file), file.metadata().map_or(self.size(), |m| m.len())),
            None => ("memory".to_string(), self.size()),
        };
        let dax = self.mapping() == MappingKind::Dax;
        PoolInfo::from_parts(
            &self.path,
            &self.fixed,
            &state,
            file_size,
            filesystem,
            dax,
            true,
            self.domain.kind(),
        )
    }

    /// A copy of the pool's bytes.
    pub fn image(&self) -> Result<Vec<u8>> {
        self.check_poison()?;
        Ok(self.region.to_vec())
    }

    /// The root object, if one was set.
    pub fn root<T: Pod>(&self) -> Result<Option<PPtr<T>>> {
        self.check_poison()?;
        let state = *self.lock_state();
        if state.root_offset == 0 {
            return Ok(None);
        }
        let requested = std::mem::size_of::<T>() as u64;
        if state.root_size != requested {
            return Err(PoolError::RootSize { stored: state.root_size, requested });
        }
        Ok(Some(PPtr::new(state.root_offset)))
    }

    /// Makes `root` the root object, failure-atomically (one header state update).
    pub fn set_root<T: Pod>(&self, root: PPtr<T>) -> Result<()> {
        let size = std::mem::size_of::<T>() as u64;
        self.user_range(root.offset(), size)?;
        self.update_state(|s| {
            s.root_offset = root.offset();
            s.root_size = size;
        })
    }

    /// Grows the pool to `new_size` bytes in place: the file is extended (with real blocks),
    /// the new part mapped into the reserved address range, then the header updated. A crash
    /// at any point leaves either the old or the new size. The pool has grown when its header
    /// says so: a retry after a failure finishes what the failed grow left undone. For a FAMS
    /// pool, new pages that cannot be tracked poison the pool (no sync could commit them).
    pub fn grow(&self, new_size: u64) -> Result<()> {
        let mut state = self.lock_state();
        let new_size = page_round(new_size);
        // The header's size, not the mapping's: a grow that failed after mapping more left the
        // mapping longer than the header.
        let old = state.size;
        if new_size <= old {
            return Ok(());
        }
        if new_size > self.region.reserved() {
            return Err(PoolError::GrowthLimit { requested: new_size, limit: self.region.reserved() });
        }
        if self.file.is_some() && self.region.is_private() {
            return Err(PoolError::ReadOnly { path: self.path.clone() });
        }
        self.check_poison()?;
        if let Some(committer) = &self.fams {
            // The file grows at the next sync, with the rest of the commit.
            let mut committer = committer.lock().unwrap_or_else(|e| e.into_inner());
            if let Err(e) = committer.grow(&self.region, new_size) {
                if let Some(why) = committer.poisoned() {
                    let _ = self.poison.set(why.to_string());
                }
                return Err(e.into());
            }
        } else {
            if let Some(file) = &self.file {
                allocate(file, &self.path, old, new_size - old)?;
                file.sync_all().map_err(|e| PoolError::io(&self.path, "fsync", e))?;
            }
            if new_size > self.region.len() {
                self.region
                    .grow(self.file.as_ref(), new_size)
                    .map_err(|e| PoolError::io(&self.path, "mmap", e))?;
            }
        }
        // SAFETY: the grown region stays mapped for the pool's lifetime.
        unsafe { self.domain.attach(self.region.base(), self.region.len() as usize) };
        self.update_state_locked(&mut state, |s| s.size = new_size)
    }

    /// Poisons the pool (see [`Pool`]): for a structure whose protocol stopped half way for
    /// another reason than a failed persist (a panic), so that only reopening — and recovery —
    /// judges what is on media.
    pub(crate) fn poison(&self, why: String) {
        let _ = self.poison.set(why);
    }

    /// Refuses access to a poisoned pool (see [`Pool`]).
    fn check_poison(&self) -> Result<()> {
        match self.poison.get() {
            Some(why) => Err(PoolError::Poisoned(why.clone())),
            None => Ok(()),
        }
    }

    fn range(&self, offset: u64, len: u64, start: u64) -> Result<*mut u8> {
        let size = self.region.len();
        match offset.checked_add(len) {
            Some(end) if offset >= start && end <= size => {
                // SAFETY: offset <= size, so the result stays inside the mapping.
                Ok(unsafe { self.region.base().add(offset as usize) })
            }
            _ => Err(PoolError::OutOfBounds { offset, len, start, size }),
        }
    }

    /// A pointer to `offset..offset + len` if it lies in user space (not the header).
    fn user_range(&self, offset: u64, len: u64) -> Result<*mut u8> {
        self.range(offset, len, HEADER_SIZE)
    }

    fn word(&self, offset: u64, start: u64) -> Result<*const AtomicU64> {
        if offset % 8 != 0 {
            return Err(PoolError::Misaligned { offset });
        }
        Ok(self.range(offset, 8, start)?.cast())
    }

    /// Reads a plain-data value (anywhere in the pool, the header included).
    pub fn read<T: Pod>(&self, offset: u64) -> Result<T> {
        self.check_poison()?;
        let ptr = self.range(offset, std::mem::size_of::<T>() as u64, 0)?;
        // SAFETY: the range is inside the mapping; T is Pod, so any bytes are a valid T.
        Ok(unsafe { std::ptr::read_unaligned(ptr.cast::<T>()) })
    }

    /// Whether `offset..offset + len` lies inside the pool.
    pub fn contains(&self, offset: u64, len: u64) -> bool {
        self.range(offset, len, 0).is_ok()
    }

    /// Whether the `expected.len()` bytes at `offset` equal `expected` (compared in 64-byte
    /// pieces: nothing is allocated).
    pub fn bytes_eq(&self, offset: u64, expected: &[u8]) -> Result<bool> {
        self.check_poison()?;
        let ptr = self.range(offset, expected.len() as u64, 0)?;
        let mut piece = [0u8; 64];
        for (i, want) in expected.chunks(64).enumerate() {
            // SAFETY: the range is inside the mapping and covers every piece; `piece` is a
            // distinct local buffer at least as long as `want`.
            unsafe { std::ptr::copy_nonoverlapping(ptr.add(i * 64), piece.as_mut_ptr(), want.len()) };
            if piece[..want.len()] != *want {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Hints that `offset..offset + len` will be read soon: one prefetch per cache line, so
    /// that several lines' misses overlap. Changes nothing; an out-of-range hint is ignored.
    pub fn prefetch(&self, offset: u64, len: u64) {
        #[cfg(target_arch = "x86_64")]
        if let Ok(ptr) = self.range(offset, len, 0) {
            use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
            for line in crate::persist::lines(ptr, len as usize) {
                // SAFETY: a prefetch is a hint: it never faults and changes no memory (SSE is
                // part of every x86-64 CPU).
                unsafe { _mm_prefetch::<_MM_HINT_T0>(line as *const i8) };
            }
        }
    }

    /// Loads `N` consecutive aligned words at `offset` (relaxed, one bounds check).
    pub fn load_words<const N: usize>(&self, offset: u64) -> Result<[u64; N]> {
        self.check_poison()?;
        let first = self.word(offset, 0)?;
        self.range(offset, 8 * N as u64, 0)?;
        // SAFETY: the N words are aligned (the first is) and inside the mapping (checked).
        Ok(std::array::from_fn(|i| unsafe { (*first.add(i)).load(Ordering::Relaxed) }))
    }

    /// Reads `buf.len()` bytes at `offset`.
    pub fn read_into(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.check_poison()?;
        let ptr = self.range(offset, buf.len() as u64, 0)?;
        // SAFETY: the range is inside the mapping and `buf` is a distinct live slice.
        unsafe { std::ptr::copy_nonoverlapping(ptr, buf.as_mut_ptr(), buf.len()) };
        Ok(())
    }

    /// Reads the object `ptr` points to.
    pub fn get<T: Pod>(&self, ptr: PPtr<T>) -> Result<T> {
        self.read(ptr.offset())
    }

    /// Stores `bytes` at `offset` with ordinary stores (not yet durable).
    pub fn write_bytes(&self, offset: u64, bytes: &[u8]) -> Result<()> {
        self.check_poison()?;
        let ptr = self.user_range(offset, bytes.len() as u64)?;
        // SAFETY: the range is in user space of the mapping.
        unsafe { self.domain.write(ptr, bytes) };
        Ok(())
    }

    /// Stores a plain-data value at `offset` (not yet durable).
    pub fn write<T: Pod>(&self, offset: u64, value: &T) -> Result<()> {
        self.write_bytes(offset, bytemuck::bytes_of(value))
    }

    /// Stores the object `ptr` points to (not yet durable).
    pub fn set<T: Pod>(&self, ptr: PPtr<T>, value: &T) -> Result<()> {
        self.write(ptr.offset(), value)
    }

    /// Stores `bytes` so they are durable at the next [`fence`](Pool::fence) without a flush.
    #[track_caller]
    pub fn write_persistent(&self, offset: u64, bytes: &[u8]) -> Result<()> {
        self.check_poison()?;
        let ptr = self.user_range(offset, bytes.len() as u64)?;
        // SAFETY: the range is in user space of the mapping.
        unsafe { self.domain.write_persistent(ptr, bytes) };
        Ok(())
    }

    /// Atomically loads the aligned 8-byte word at `offset`.
    pub fn load_u64(&self, offset: u64, order: Ordering) -> Result<u64> {
        self.check_poison()?;
        let word = self.word(offset, 0)?;
        // SAFETY: the word is aligned and inside the mapping.
        Ok(unsafe { (*word).load(order) })
    }

    /// Atomically stores the aligned 8-byte word at `offset`: the failure-atomic unit.
    pub fn store_u64(&self, offset: u64, value: u64, order: Ordering) -> Result<()> {
        self.check_poison()?;
        let word = self.word(offset, HEADER_SIZE)?;
        // SAFETY: the word is aligned and in user space.
        unsafe { self.domain.store_u64(word, value, order) };
        Ok(())
    }

    /// Atomic compare-and-exchange of the word at `offset`; the inner result is the previous
    /// value, `Ok` when it was `current` and is now `new`.
    pub fn compare_exchange_u64(
        &self,
        offset: u64,
        current: u64,
        new: u64,
        order: Ordering,
    ) -> Result<Result<u64, u64>> {
        self.check_poison()?;
        let word = self.word(offset, HEADER_SIZE)?;
        // SAFETY: the word is aligned and in user space.
        Ok(unsafe { self.domain.compare_exchange_u64(word, current, new, order) })
    }

    /// Starts writing back `offset..offset + len`.
    #[track_caller]
    pub fn flush(&self, offset: u64, len: u64) -> Result<()> {
        self.check_poison()?;
        let ptr = self.range(offset, len, 0)?;
        // SAFETY: the range is inside the mapping.
        unsafe { self.domain.flush(ptr, len as usize) };
        Ok(())
    }

    /// Waits for this thread's write-backs; a failure poisons the pool.
    #[track_caller]
    pub fn fence(&self) -> Result<()> {
        self.check_poison()?;
        let fenced = self.domain.fence();
        self.note_persist(fenced)
    }

    /// Makes `offset..offset + len` durable (flush, then fence).
    #[track_caller]
    pub fn persist(&self, offset: u64, len: u64) -> Result<()> {
        self.check_poison()?;
        let ptr = self.range(offset, len, 0)?;
        // SAFETY: the range is inside the mapping.
        let persisted = unsafe { self.domain.persist(ptr, len as usize) };
        self.note_persist(persisted)
    }

    /// Makes the object `ptr` points to durable.
    #[track_caller]
    pub fn persist_ptr<T>(&self, ptr: PPtr<T>) -> Result<()> {
        self.persist(ptr.offset(), std::mem::size_of::<T>() as u64)
    }
}

impl<D: Domain> Drop for Pool<D> {
    fn drop(&mut self) {
        if self.open {
            // Dropping is a clean close; an error here leaves the flag unset, which only means
            // the next open treats the pool as crashed.
            let _ = self.shutdown();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// New pages of a FAMS pool that cannot be tracked poison the pool: no write may land where
    /// no sync would see it, and a retried grow must not report them grown.
    #[test]
    fn a_fams_grow_whose_pages_cannot_be_tracked_poisons_the_pool() {
        let dir = tempfile::tempdir().unwrap();
        let opts = PoolOptions::layout("test").with_size(1 << 20).with_max_size(4 << 20);
        let pool = Pool::<Volatile>::create_fams(dir.path().join("f.pool"), &opts).unwrap();
        crate::fams::FAIL_NEXT_GROW.set(true);
        let err = pool.grow(2 << 20).unwrap_err();
        assert!(err.to_string().starts_with("track failed"), "{err}");
        let written = pool.write_bytes(1 << 20, b"unseen");
        assert!(matches!(written, Err(PoolError::Poisoned(_))), "{written:?}");
        let retried = pool.grow(2 << 20);
        assert!(matches!(retried, Err(PoolError::Poisoned(_))), "{retried:?}");
        assert!(matches!(pool.sync(), Err(PoolError::Poisoned(_))));
        assert_eq!(pool.info().size, 1 << 20, "the header still has the old size");
    }
}
