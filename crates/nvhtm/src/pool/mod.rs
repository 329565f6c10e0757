//! Pool files: a file mapped into memory with a checksummed header, a root object, typed offset
//! pointers, growth in place, and an exclusive lock against a second writer.
//!
//! Every store into the pool goes through the pool's persistence [`Domain`]; the pool's accessors
//! bounds-check offsets, keep the header out of reach of user writes, and refuse every read and
//! write after a failed flush ([`PoolError::Poisoned`]).

mod access;
mod backing;
mod error;
mod header;
mod info;
mod open;
mod pptr;
mod slot;

pub use crate::region::MappingKind;
pub use error::{PoolError, Result};
pub use header::{FORMAT_VERSION, HEADER_SIZE, INCOMPAT_FAMS, MAX_LAYOUT_LEN, MIN_POOL_SIZE};
pub use info::PoolInfo;
pub use pptr::PPtr;
pub use slot::ImageSlot;

use std::cell::RefCell;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, RwLock, RwLockReadGuard};

use bytemuck::Pod;

use crate::persist::{AutoDomain, Cpu, Domain, Msync, Volatile};
use crate::region::Region;
use backing::Backing;
use header::{FixedHeader, StateSlot, SLOT_OFFSETS};
use open::page_round;
pub(crate) use open::read_header;

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
    /// What the memory reaches the medium through (dropped before the region: a FAMS
    /// backing tracks it).
    backing: Box<dyn Backing>,
    region: Region,
    domain: D,
    path: PathBuf,
    fixed: FixedHeader,
    /// The current header state; the lock serialises state updates.
    state: Mutex<StateSlot>,
    was_clean: bool,
    poison: OnceLock<String>,
    /// The writer gate of a pool whose sync commits a snapshot (FAMS): writers share it, a
    /// sync takes it alone (see [`Pool::enter_writer`]).
    gate: RwLock<()>,
    open: bool,
    /// The lines stored to, for a pool opened in an [`ImageSlot`] (which restores them for
    /// the next image).
    written: Option<Arc<slot::LineSet>>,
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

impl<D: Domain> Pool<D> {
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
        self.note_written(offset, bytes.len() as u64);
        // SAFETY: the header lies inside every pool mapping (size >= MIN_POOL_SIZE), and header
        // writes are serialised by the state lock (or happen before the pool is shared).
        unsafe { self.domain.write(self.region.base().add(offset as usize), bytes) };
    }

    /// Notes a store to `offset..offset + len` where a slot wants to know of it.
    #[inline]
    fn note_written(&self, offset: u64, len: u64) {
        if let Some(written) = &self.written {
            written.mark(offset, len);
        }
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
        // Where a sync commits a snapshot, every writer in flight finishes first and none
        // starts until the commit is done: the commit is the state at one point between
        // operations.
        let _alone = if self.backing.commits_snapshots() {
            if self.inside_gate() {
                return Err(PoolError::SyncInsideWriter);
            }
            Some(self.gate.write().unwrap_or_else(|e| e.into_inner()))
        } else {
            None
        };
        let synced = self.backing.sync(&self.region);
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
        if !self.backing.commits_snapshots() || self.inside_gate() {
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
        self.fixed.incompat_flags & INCOMPAT_FAMS != 0
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
        let (filesystem, file_size) = match self.backing.file() {
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
        self.check_poison()?;
        if let Err(e) = self.backing.grow(&self.region, old, new_size) {
            if let Some(why) = self.backing.poisoned() {
                let _ = self.poison.set(why);
            }
            return Err(e);
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
    pub(super) fn check_poison(&self) -> Result<()> {
        match self.poison.get() {
            Some(why) => Err(PoolError::Poisoned(why.clone())),
            None => Ok(()),
        }
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
