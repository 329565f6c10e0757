//! Making a pool: creating and opening pool files (shared, copy-on-write, FAMS), pools in
//! memory and from crash images, and the header checks that run before anything is written.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock, RwLock};

use bytemuck::Zeroable;

use super::backing::{Backing, Fams, Memory, PrivateFile, SharedFile};
use super::header::{
    self, FixedHeader, Header, StateSlot, HEADER_BYTES, INCOMPAT_FAMS, MIN_POOL_SIZE, SLOT_OFFSETS,
};
use super::{FileDomain, MappingKind, Pool, PoolError, PoolOptions, Result};
use crate::fams::{journal_path, Committer, FileStorage, Role, SimStorage, Storage};
use crate::persist::{Domain, Volatile};
use crate::region::Region;

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

pub(super) fn page_round(size: u64) -> u64 {
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
pub(super) fn allocate(file: &File, path: &Path, offset: u64, len: u64) -> Result<()> {
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

/// Whether `file` may have a hole before `len` (a sparse copy). On tmpfs the block count is
/// exact — pages only, no metadata blocks — and `SEEK_HOLE` walks every page (4.5 ms for
/// 128 MiB, as slow as `fallocate`); elsewhere `SEEK_HOLE` reads the extent tree. A file
/// system that cannot tell counts as sparse: the caller then allocates, which is correct, only
/// slower (`fallocate` walks every block even when all are there).
fn has_hole(file: &File, len: u64) -> bool {
    let on_tmpfs = rustix::fs::fstatfs(file)
        .is_ok_and(|fs| fs.f_type as u64 == u64::from(crate::region::linux_magic::TMPFS));
    if on_tmpfs {
        return rustix::fs::fstat(file).map_or(true, |st| (st.st_blocks as u64).saturating_mul(512) < len);
    }
    rustix::fs::seek(file, rustix::fs::SeekFrom::Hole(0)).map_or(true, |first| first < len)
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

/// The directory of `path`, and a fresh name in it under which a new pool is built before it is
/// renamed to `path`.
fn temporary_name(path: &Path) -> Result<(PathBuf, PathBuf)> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = path.file_name().ok_or_else(|| PoolError::Io {
        path: path.to_path_buf(),
        op: "create",
        source: std::io::Error::other("the path has no file name"),
    })?;
    let tmp =
        dir.join(format!(".{}.{}.{:x}.tmp", name.to_string_lossy(), std::process::id(), fastrand::u64(..)));
    Ok((dir, tmp))
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
        let (dir, tmp) = temporary_name(path)?;
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
            let backing = SharedFile { file, path: path.to_path_buf() };
            let pool = Pool::format(region, domain, Box::new(backing), path, &opts.layout, 0)?;
            init(&pool)?;
            // Everything `init` wrote, and the header, durable before the name appears.
            if let Some(file) = pool.backing.file() {
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
        if has_hole(&file, header.state.size) {
            allocate(&file, path, 0, header.state.size)?;
        }
        let reserved = page_round(opts.max_size.max(header.state.size));
        let region = Region::map_file(&file, header.state.size, reserved)
            .map_err(|e| PoolError::io(path, "mmap", e))?;
        let domain = domain_for(region.kind())?;
        Pool::start(region, domain, Box::new(SharedFile { file, path: path.to_path_buf() }), path, header)
    }
}

impl<D: FileDomain> Pool<D> {
    /// Creates a FAMS pool: its contents live in private memory and reach the file only at
    /// [`Pool::sync`], atomically, through a journal beside the file (`PATH.journal`). Every
    /// structure runs on it unchanged, without flushes (choose [`Volatile`], or
    /// [`AutoDomain`](crate::AutoDomain) which picks it).
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
        validate_new(path, opts)?;
        let (dir, tmp) = temporary_name(path)?;
        let (journal, tmp_journal) = (journal_path(path), journal_path(&tmp));
        // A journal without its data file is what a deleted pool left: it must never be
        // replayed into this one.
        match std::fs::remove_file(&journal) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(PoolError::io(&journal, "remove a leftover journal", e).into())
            }
            _ => {}
        }
        let mut journal_placed = false;
        let made = (|| -> std::result::Result<Pool<D>, E> {
            let storage = FileStorage::open(&tmp, true).map_err(|e| PoolError::io(path, "create", e))?;
            let domain = D::for_mapping(MappingKind::Fams, opts, path)?;
            // Formatted, `init` run and committed by the first sync: durable under the
            // temporary names. The journal takes its name first; the data file's rename then
            // publishes the pool. A crash between them leaves a retired journal and no pool.
            let pool = Pool::format_fams(storage, opts, domain, path, init)?;
            rename_no_replace(&tmp_journal, &journal)?;
            journal_placed = true;
            rename_no_replace(&tmp, path)?;
            sync_dir(&dir)?;
            Ok(pool)
        })();
        if made.is_err() {
            let _ = std::fs::remove_file(&tmp);
            let _ = std::fs::remove_file(if journal_placed { &journal } else { &tmp_journal });
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
        let len = crate::fams::peek_recovered(&file, &journal_path(path), &mut head)?;
        let header = fams_header(&head, len, opts, path)?;
        let storage =
            FileStorage::with_data(file, path, false).map_err(|e| PoolError::io(path, "open journal", e))?;
        let domain = D::for_mapping(MappingKind::Fams, opts, path)?;
        Pool::start_fams(storage, opts, domain, path, header)
    }
}

/// The header of a FAMS pool as recovery will leave it (`head`, `len`), checked. The file is
/// loaded whole into memory, so a length past both the pool's size and the options' maximum
/// (a file grown by someone else, or a journal naming a huge length) is refused before it is.
fn fams_header(head: &[u8], len: u64, opts: &PoolOptions, path: &Path) -> Result<Header> {
    let header = header::parse(path, &head[..HEADER_BYTES.min(len as usize)], len)?;
    check_layout(&header, &opts.layout, path)?;
    if header.fixed.incompat_flags & INCOMPAT_FAMS == 0 {
        return Err(PoolError::FamsMode {
            path: path.to_path_buf(),
            what: "not a FAMS pool: open it without FAMS mode",
        });
    }
    let limit = page_round(header.state.size.max(opts.max_size));
    if len > limit {
        return Err(PoolError::Corrupt {
            path: path.to_path_buf(),
            what: format!(
                "the FAMS file is {len} bytes once its journal is applied, past the pool's {} bytes \
                 and the {}-byte maximum size of these options",
                header.state.size, opts.max_size
            ),
        });
    }
    Ok(header)
}

impl<D: Domain> Pool<D> {
    /// Creates a FAMS pool on any [`Storage`] — files that must be empty — with `domain`
    /// (FAMS pools need no flushes: [`Volatile`]), `init` run before the first sync. With
    /// [`SimStorage`] this is how crash suites run over FAMS pools.
    ///
    /// ```
    /// use nvhtm::fams::SimStorage;
    /// use nvhtm::{Pool, PoolOptions, Volatile};
    /// # fn main() -> Result<(), nvhtm::PoolError> {
    /// let storage = SimStorage::new();
    /// let opts = PoolOptions::layout("doc").with_size(1 << 20);
    /// let pool = Pool::create_fams_on(storage.clone(), &opts, Volatile, |_| Ok::<(), nvhtm::PoolError>(()))?;
    /// pool.write_bytes(4096, b"committed")?;
    /// pool.sync()?;
    /// drop(pool);
    /// let reopened = Pool::open_fams_on(storage, &opts, Volatile)?;
    /// assert!(reopened.bytes_eq(4096, b"committed")?);
    /// # Ok(()) }
    /// ```
    pub fn create_fams_on<S: Storage + 'static, E: From<PoolError>>(
        storage: S,
        opts: &PoolOptions,
        domain: D,
        init: impl FnOnce(&Pool<D>) -> std::result::Result<(), E>,
    ) -> std::result::Result<Pool<D>, E> {
        let path = Path::new("<storage>");
        let len = storage.len(Role::Data).map_err(|e| PoolError::io(path, "stat", e))?;
        if len != 0 {
            return Err(PoolError::AlreadyExists { path: path.to_path_buf() }.into());
        }
        Pool::format_fams(storage, opts, domain, path, init)
    }

    /// Opens a FAMS pool on any [`Storage`] (see [`Pool::create_fams_on`]), recovering as
    /// [`Pool::open_fams`] does: the header, as a complete journal would leave it, is checked
    /// before anything is written.
    pub fn open_fams_on<S: Storage + 'static>(storage: S, opts: &PoolOptions, domain: D) -> Result<Pool<D>> {
        Pool::open_fams_storage(storage, opts, domain, Path::new("<storage>"))
    }

    fn open_fams_storage<S: Storage + 'static>(
        storage: S,
        opts: &PoolOptions,
        domain: D,
        path: &Path,
    ) -> Result<Pool<D>> {
        let mut head = vec![0u8; HEADER_BYTES];
        let len = crate::fams::peek_storage(&storage, &mut head)?;
        let header = fams_header(&head, len, opts, path)?;
        Pool::start_fams(storage, opts, domain, path, header)
    }

    fn format_fams<S: Storage + 'static, E: From<PoolError>>(
        storage: S,
        opts: &PoolOptions,
        domain: D,
        path: &Path,
        init: impl FnOnce(&Pool<D>) -> std::result::Result<(), E>,
    ) -> std::result::Result<Pool<D>, E> {
        let size = validate_options(opts)?;
        // No sync of the new length: until the first commit below is durable the files hold no
        // pool either way (open refuses them), and that commit's journal names the length and
        // its application syncs the data file (the `fams-create` mutation suite found the sync
        // that stood here needed by no crash state).
        storage.set_len(Role::Data, size).map_err(|e| PoolError::io(path, "extend", e))?;
        let (mut region, committer) =
            Committer::open(storage, page_round(opts.max_size.max(size))).map_err(PoolError::from)?;
        region.mark_fams();
        let backing = Box::new(Fams { committer: Mutex::new(committer) });
        let pool = Pool::format(region, domain, backing, path, &opts.layout, INCOMPAT_FAMS)?;
        init(&pool)?;
        pool.sync()?;
        Ok(pool)
    }

    /// Replays the journal (leaving exactly `header`, checked by the caller) and takes over.
    fn start_fams<S: Storage + 'static>(
        storage: S,
        opts: &PoolOptions,
        domain: D,
        path: &Path,
        header: Header,
    ) -> Result<Pool<D>> {
        let (mut region, committer) = Committer::open(storage, opts.max_size)?;
        region.mark_fams();
        Pool::start(region, domain, Box::new(Fams { committer: Mutex::new(committer) }), path, header)
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
        Pool::start(region, Volatile, Box::new(PrivateFile { file, path: path.to_path_buf() }), path, header)
    }
}

impl Pool<Volatile> {
    /// Opens a FAMS pool to inspect it: both files are read into this process's memory, a
    /// complete journal is applied there, and neither file is ever written (a sync commits
    /// to the copy only).
    pub fn open_fams_private(path: impl AsRef<Path>, opts: &PoolOptions) -> Result<Pool<Volatile>> {
        let path = path.as_ref();
        let data = std::fs::read(path).map_err(|e| PoolError::io(path, "read", e))?;
        let journal = match std::fs::read(journal_path(path)) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(PoolError::io(path, "read journal", e)),
        };
        Pool::open_fams_storage(SimStorage::from_image(data, journal), opts, Volatile, path)
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

pub(super) fn check_layout(header: &Header, expected: &str, path: &Path) -> Result<()> {
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
        Pool::format(region, domain, Box::new(Memory), path, &opts.layout, 0)
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
        Pool::start(region, domain, Box::new(Memory), path, header)
    }

    /// Writes a fresh header into a new mapping.
    fn format(
        region: Region,
        domain: D,
        backing: Box<dyn Backing>,
        path: &Path,
        layout: &str,
        incompat: u64,
    ) -> Result<Pool<D>> {
        let mut fixed = FixedHeader::new(new_uuid(), layout, now_unix());
        fixed.incompat_flags = incompat;
        fixed.checksum = fixed.compute_checksum();
        let state = StateSlot { seq: 1, size: region.len(), ..StateSlot::zeroed() }.sealed(fixed.checksum);
        let pool = Pool::assemble(region, domain, backing, path, Header { fixed, state }, true);
        pool.write_header_bytes(0, bytemuck::bytes_of(&fixed));
        pool.write_header_bytes(SLOT_OFFSETS[1], bytemuck::bytes_of(&state));
        pool.persist_header(0, HEADER_BYTES as u64)?;
        Ok(pool)
    }

    /// Takes over a validated pool and marks it as in use (not cleanly shut down).
    fn start(
        region: Region,
        domain: D,
        backing: Box<dyn Backing>,
        path: &Path,
        header: Header,
    ) -> Result<Pool<D>> {
        let was_clean = header.state.clean_shutdown == 1;
        let pool = Pool::assemble(region, domain, backing, path, header, was_clean);
        pool.update_state(|s| s.clean_shutdown = 0)?;
        Ok(pool)
    }

    pub(super) fn assemble(
        region: Region,
        domain: D,
        backing: Box<dyn Backing>,
        path: &Path,
        header: Header,
        was_clean: bool,
    ) -> Pool<D> {
        // SAFETY: the region stays mapped for as long as the pool (and so the domain) lives.
        unsafe { domain.attach(region.base(), region.len() as usize) };
        Pool {
            backing,
            region,
            domain,
            path: path.to_path_buf(),
            fixed: header.fixed,
            state: Mutex::new(header.state),
            was_clean,
            poison: OnceLock::new(),
            gate: RwLock::new(()),
            open: true,
            written: None,
        }
    }
}
