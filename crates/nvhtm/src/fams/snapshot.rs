//! The reflink-snapshot variant of failure-atomic msync (as GDBM ships it): the working file is
//! mapped shared and changed in place; each [`SnapshotFile::sync`] clones it (`FICLONE`, a
//! copy-on-write reflink: no data is copied) into the older of two snapshot files, whose
//! validity is marked by its permission bits only after the clone is durable. Opening restores
//! the working file from the newest valid snapshot. Needs a file system with reflinks (XFS,
//! Btrfs); elsewhere [`SnapshotFile::create`] says so.
//!
//! Protocol for a sync into snapshot `i` (the other one, `j`, holds the previous sync):
//! 1. `chmod i 0600` (invalid: no group-read bit) and `fsync i` — from now on a crash recovers
//!    from `j`;
//! 2. `FICLONE i ← working` (the kernel writes back the working file's dirty pages first);
//! 3. the generation (one more than `j`'s) in the extended attribute `user.nvhtm.generation`,
//!    and `fsync i`;
//! 4. `chmod i 0640` (valid: group-read bit set) and `fsync i` — the commit point: `i` is valid
//!    and has the highest generation.
//!
//! A crash before step 4 is durable leaves `j` the newest valid snapshot (the previous state);
//! after, `i` (this state). Generations, not modification times, order the snapshots (times are
//! coarse and clocks step); the owner keeps read and write permission throughout, so reopening
//! needs no privilege.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use super::{FamsError, Result};
use crate::region::Region;

const VALID: u32 = 0o640;
const INVALID: u32 = 0o600;
const VALID_MARK: u32 = 0o040;
const GENERATION: &str = "user.nvhtm.generation";

fn io(op: &'static str) -> impl FnOnce(std::io::Error) -> FamsError {
    move |source| FamsError::Io { op, source }
}

/// The paths of the two snapshots of `path`.
pub fn snapshot_paths(path: &Path) -> [PathBuf; 2] {
    [0, 1].map(|i| {
        let mut name = path.file_name().unwrap_or_default().to_os_string();
        name.push(format!(".snap{i}"));
        path.with_file_name(name)
    })
}

/// A working file committed by reflink snapshots.
pub struct SnapshotFile {
    working: File,
    snapshots: [File; 2],
    paths: [PathBuf; 2],
    region: Region,
    /// The snapshot the next sync overwrites (the older one).
    next: usize,
    /// The generation of the newest valid snapshot.
    generation: u64,
    poison: Option<String>,
}

impl std::fmt::Debug for SnapshotFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SnapshotFile")
            .field("len", &self.region.len())
            .field("next", &self.next)
            .finish_non_exhaustive()
    }
}

fn clone_into(dest: &File, src: &File) -> Result<()> {
    rustix::fs::ioctl_ficlone(dest, src).map_err(|e| {
        let e = std::io::Error::from(e);
        if matches!(
            e.raw_os_error(),
            Some(libc::EOPNOTSUPP) | Some(libc::EXDEV) | Some(libc::EINVAL) | Some(libc::ENOTTY)
        ) {
            FamsError::Io {
                op: "clone (FICLONE): this file system has no reflinks; use the journaled FAMS",
                source: e,
            }
        } else {
            FamsError::Io { op: "clone (FICLONE)", source: e }
        }
    })
}

fn set_mode(file: &File, mode: u32) -> Result<()> {
    file.set_permissions(std::fs::Permissions::from_mode(mode)).map_err(io("chmod snapshot"))?;
    file.sync_all().map_err(io("fsync snapshot"))
}

fn generation(file: &File) -> u64 {
    let mut buf = [0u8; 8];
    match rustix::fs::fgetxattr(file, GENERATION, &mut buf[..]) {
        Ok(8) => u64::from_le_bytes(buf),
        _ => 0,
    }
}

fn set_generation(file: &File, generation: u64) -> Result<()> {
    rustix::fs::fsetxattr(file, GENERATION, &generation.to_le_bytes(), rustix::fs::XattrFlags::empty())
        .map_err(|e| FamsError::Io { op: "set snapshot generation (xattr)", source: e.into() })
}

fn sync_dir(path: &Path) -> Result<()> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    File::open(dir).and_then(|d| d.sync_all()).map_err(io("fsync directory"))
}

impl SnapshotFile {
    /// Creates a working file of `len` bytes (zeros) and its two snapshots, and takes the first
    /// snapshot. Fails clearly where the file system has no reflinks.
    pub fn create(path: impl AsRef<Path>, len: u64) -> Result<SnapshotFile> {
        let path = path.as_ref();
        let page = rustix::param::page_size() as u64;
        if len == 0 || len % page != 0 {
            return Err(FamsError::BadSize(len));
        }
        let working =
            OpenOptions::new().read(true).write(true).create_new(true).open(path).map_err(io("create"))?;
        working.set_len(len).map_err(io("extend"))?;
        let paths = snapshot_paths(path);
        let mut snapshots = Vec::new();
        for p in &paths {
            let f = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open(p)
                .map_err(io("create snapshot"))?;
            set_mode(&f, INVALID)?;
            snapshots.push(f);
        }
        working.sync_all().map_err(io("fsync"))?;
        sync_dir(path)?;
        let snapshots: [File; 2] = snapshots.try_into().map_err(|_| FamsError::BadSize(len))?;
        let mut file = SnapshotFile::assemble(working, snapshots, paths, len)?;
        file.sync()?;
        Ok(file)
    }

    /// Opens a working file, first restoring it from its newest valid snapshot (whatever a
    /// crash left in the working file itself is discarded).
    pub fn open(path: impl AsRef<Path>) -> Result<SnapshotFile> {
        let path = path.as_ref();
        let working = OpenOptions::new().read(true).write(true).open(path).map_err(io("open"))?;
        rustix::fs::flock(&working, rustix::fs::FlockOperation::NonBlockingLockExclusive)
            .map_err(|e| FamsError::Io { op: "lock", source: e.into() })?;
        let paths = snapshot_paths(path);
        let mut snapshots = Vec::new();
        for p in &paths {
            snapshots.push(OpenOptions::new().read(true).write(true).open(p).map_err(io("open snapshot"))?);
        }
        let snapshots: [File; 2] = snapshots.try_into().map_err(|_| FamsError::BadSize(0))?;
        let mut newest: Option<(usize, u64)> = None;
        for (i, s) in snapshots.iter().enumerate() {
            let mode = s.metadata().map_err(io("stat snapshot"))?.permissions().mode();
            if mode & VALID_MARK != 0 {
                let g = generation(s);
                if newest.is_none_or(|(_, best)| g > best) {
                    newest = Some((i, g));
                }
            }
        }
        let Some((valid, newest_generation)) = newest else {
            return Err(FamsError::Io {
                op: "restore",
                source: std::io::Error::other("no valid snapshot: the file was never synced"),
            });
        };
        clone_into(&working, &snapshots[valid])?;
        working.sync_all().map_err(io("fsync"))?;
        let len = working.metadata().map_err(io("stat"))?.len();
        let mut file = SnapshotFile::assemble(working, snapshots, paths, len)?;
        file.next = 1 - valid;
        file.generation = newest_generation;
        Ok(file)
    }

    fn assemble(working: File, snapshots: [File; 2], paths: [PathBuf; 2], len: u64) -> Result<SnapshotFile> {
        let region = Region::map_file(&working, len, len).map_err(io("mmap"))?;
        Ok(SnapshotFile { working, snapshots, paths, region, next: 0, generation: 0, poison: None })
    }

    super::contents_accessors!();

    /// The snapshot files.
    pub fn snapshot_paths(&self) -> &[PathBuf; 2] {
        &self.paths
    }

    /// Commits the working file's current contents as the newest snapshot (see the module
    /// docs); a failure poisons the handle.
    pub fn sync(&mut self) -> Result<()> {
        if let Some(why) = &self.poison {
            return Err(FamsError::Poisoned(why.clone()));
        }
        let i = self.next;
        let generation = self.generation + 1;
        let result = (|| {
            set_mode(&self.snapshots[i], INVALID)?;
            clone_into(&self.snapshots[i], &self.working)?;
            set_generation(&self.snapshots[i], generation)?;
            self.snapshots[i].sync_all().map_err(io("fsync snapshot"))?;
            set_mode(&self.snapshots[i], VALID)
        })();
        match &result {
            Ok(()) => {
                self.next = 1 - i;
                self.generation = generation;
            }
            Err(e) => self.poison = Some(e.to_string()),
        }
        result
    }
}
