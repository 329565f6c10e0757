//! What backs a pool: one trait for how the pool's memory reaches its medium, with one
//! implementation per kind of memory.
//!
//! | backing          | memory                                   | `sync`                         | `grow`                              |
//! |------------------|------------------------------------------|--------------------------------|-------------------------------------|
//! | [`SharedFile`]   | the file mapped shared (DAX, tmpfs, page cache) | `msync` of the mapping  | allocate blocks, `fsync`, map more  |
//! | [`PrivateFile`]  | the file mapped copy-on-write (inspection) | nothing reaches the file     | refused (read-only)                 |
//! | [`Memory`]       | anonymous memory (tests, crash images)   | nothing                        | make more of the reservation usable |
//! | [`Fams`]         | private memory tracked page by page      | the atomic commit (journal)    | track the new pages; the file grows at the next sync |
//!
//! The pool keeps the mapping ([`Region`]) itself — every access goes straight to it — and asks
//! its backing only what differs between media. In the spirit of redb's `StorageBackend`: the
//! pool has no branch on what backs it, and FAMS over simulated storage
//! ([`SimStorage`](crate::fams::SimStorage)) is a pool like any other, so the crash suites run
//! over FAMS pools too.

use std::fs::File;
use std::path::PathBuf;
use std::sync::Mutex;

use super::error::{PoolError, Result};
use crate::fams::{Committer, Storage};
use crate::region::Region;

/// How a pool's memory reaches its medium.
pub(crate) trait Backing: Send + Sync {
    /// Makes every store into `region` so far durable (where the medium can hold it).
    fn sync(&self, region: &Region) -> Result<()>;

    /// Makes `region` `new_len` bytes long, backed so that a store into the new part can
    /// neither fault nor be lost to a later sync. `old` is the length the header records (the
    /// mapping may already be longer after a failed grow). The header is updated by the caller.
    fn grow(&self, region: &Region, old: u64, new_len: u64) -> Result<()>;

    /// Whether a sync commits a snapshot of the whole pool at once, so that writers must be
    /// held back while it runs (the pool's writer gate).
    fn commits_snapshots(&self) -> bool {
        false
    }

    /// Why the backing refuses to go on after a failure, if one poisoned it.
    fn poisoned(&self) -> Option<String> {
        None
    }

    /// The open file, if the pool maps one directly.
    fn file(&self) -> Option<&File> {
        None
    }
}

/// A file mapped shared: stores reach the file through the mapping.
pub(crate) struct SharedFile {
    /// Holds the pool's exclusive lock.
    pub file: File,
    pub path: PathBuf,
}

impl Backing for SharedFile {
    fn sync(&self, region: &Region) -> Result<()> {
        region.msync().map_err(|e| PoolError::io(&self.path, "msync", e))
    }

    fn grow(&self, region: &Region, old: u64, new_len: u64) -> Result<()> {
        super::open::allocate(&self.file, &self.path, old, new_len - old)?;
        self.file.sync_all().map_err(|e| PoolError::io(&self.path, "fsync", e))?;
        if new_len > region.len() {
            region.grow(Some(&self.file), new_len).map_err(|e| PoolError::io(&self.path, "mmap", e))?;
        }
        Ok(())
    }

    fn file(&self) -> Option<&File> {
        Some(&self.file)
    }
}

/// A file mapped copy-on-write, to inspect it: stores change only this process's memory.
pub(crate) struct PrivateFile {
    /// Holds a shared lock (no writer may open the file meanwhile).
    pub file: File,
    pub path: PathBuf,
}

impl Backing for PrivateFile {
    fn sync(&self, _: &Region) -> Result<()> {
        Ok(()) // nothing written here ever reaches the file
    }

    fn grow(&self, _: &Region, _: u64, _: u64) -> Result<()> {
        Err(PoolError::ReadOnly { path: self.path.clone() })
    }

    fn file(&self) -> Option<&File> {
        Some(&self.file)
    }
}

/// Anonymous memory: nothing to make durable.
pub(crate) struct Memory;

impl Backing for Memory {
    fn sync(&self, _: &Region) -> Result<()> {
        Ok(())
    }

    fn grow(&self, region: &Region, _: u64, new_len: u64) -> Result<()> {
        if new_len > region.len() {
            region
                .grow(None, new_len)
                .map_err(|e| PoolError::io(std::path::Path::new("<memory>"), "mmap", e))?;
        }
        Ok(())
    }
}

/// Anonymous memory an [`ImageSlot`](super::ImageSlot) lends: like [`Memory`], but the slot's
/// bytes past the pool's end hold whatever an earlier image left there, so growing zeroes the
/// new part (a grown pool's new bytes are zero, as in a fresh mapping).
pub(crate) struct SlotMemory;

impl Backing for SlotMemory {
    fn sync(&self, _: &Region) -> Result<()> {
        Ok(())
    }

    fn grow(&self, region: &Region, _: u64, new_len: u64) -> Result<()> {
        let before = region.len();
        if new_len > before {
            region
                .grow(None, new_len)
                .map_err(|e| PoolError::io(std::path::Path::new("<image>"), "mmap", e))?;
            // SAFETY: the region now has `new_len` writable bytes; the new part is not yet part
            // of the pool (the header still has the old size), so nothing reads it meanwhile.
            unsafe {
                std::ptr::write_bytes(region.base().add(before as usize), 0, (new_len - before) as usize)
            };
        }
        Ok(())
    }
}

/// Private memory committed to storage by failure-atomic msync (see [`crate::fams`]).
pub(crate) struct Fams<S: Storage> {
    pub committer: Mutex<Committer<S>>,
}

impl<S: Storage> Fams<S> {
    fn committer(&self) -> std::sync::MutexGuard<'_, Committer<S>> {
        self.committer.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl<S: Storage> Backing for Fams<S> {
    fn sync(&self, region: &Region) -> Result<()> {
        self.committer().sync(region).map(drop).map_err(PoolError::from)
    }

    fn grow(&self, region: &Region, _: u64, new_len: u64) -> Result<()> {
        // The file grows at the next sync, with the rest of the commit.
        self.committer().grow(region, new_len).map_err(PoolError::from)
    }

    fn commits_snapshots(&self) -> bool {
        true
    }

    fn poisoned(&self) -> Option<String> {
        self.committer().poisoned().map(str::to_string)
    }
}
