//! What `nvhtm info` reports about a pool, read without opening it for writing.

use std::fs::File;
use std::path::{Path, PathBuf};

use super::error::{PoolError, Result};
use super::header::{FixedHeader, StateSlot};
use crate::persist::DomainKind;
use crate::region::linux_magic;

/// The facts about a pool: its header, its file and whether it is in use.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct PoolInfo {
    /// The pool file.
    pub path: PathBuf,
    /// Application layout name.
    pub layout: String,
    /// On-media format version.
    pub format_version: u32,
    /// The pool's UUID.
    pub uuid: String,
    /// Pool size in bytes (from the header).
    pub size: u64,
    /// File size in bytes (at least the pool size).
    pub file_size: u64,
    /// Offset of the root object (0: none).
    pub root_offset: u64,
    /// Size of the root object.
    pub root_size: u64,
    /// Whether the last user closed the pool cleanly.
    pub clean_shutdown: bool,
    /// Creation time, seconds since the Unix epoch.
    pub created_unix: u64,
    /// Sequence number of the current header state.
    pub state_seq: u64,
    /// File system the pool lives on.
    pub filesystem: String,
    /// Whether the file can be mapped with `MAP_SYNC` (DAX: cache flushes are durable).
    pub dax: bool,
    /// Whether a process holds the pool open.
    pub in_use: bool,
    /// Whether the pool is committed by failure-atomic msync (opened in FAMS mode).
    pub fams: bool,
    /// The persistence domain: the one in use for an open pool, otherwise the one opening it in
    /// `Mode::Auto` picks (`cpu` on DAX and tmpfs, `msync` on other files).
    pub domain: DomainKind,
}

fn format_uuid(u: &[u8; 16]) -> String {
    let hex: String = u.iter().map(|b| format!("{b:02x}")).collect();
    format!("{}-{}-{}-{}-{}", &hex[..8], &hex[8..12], &hex[12..16], &hex[16..20], &hex[20..])
}

pub(crate) fn filesystem_name(file: &File) -> String {
    rustix::fs::fstatfs(file).map_or_else(|_| "unknown".to_string(), |fs| linux_magic::name(fs.f_type as u64))
}

/// Whether `file` supports `MAP_SYNC` (a DAX file system on persistent memory).
fn supports_map_sync(file: &File) -> bool {
    use rustix::mm::{MapFlags, ProtFlags};
    let page = rustix::param::page_size();
    // SAFETY: a fresh read-only mapping chosen by the kernel; it is unmapped at once and never
    // read, so no access can fault.
    unsafe {
        match rustix::mm::mmap(
            std::ptr::null_mut(),
            page,
            ProtFlags::READ,
            MapFlags::SHARED_VALIDATE | MapFlags::SYNC,
            file,
            0,
        ) {
            Ok(ptr) => {
                let _ = rustix::mm::munmap(ptr, page);
                true
            }
            Err(_) => false,
        }
    }
}

impl PoolInfo {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn from_parts(
        path: &Path,
        fixed: &FixedHeader,
        state: &StateSlot,
        file_size: u64,
        filesystem: String,
        dax: bool,
        in_use: bool,
        domain: DomainKind,
    ) -> PoolInfo {
        PoolInfo {
            path: path.to_path_buf(),
            layout: fixed.layout_name(),
            format_version: fixed.format_version,
            uuid: format_uuid(&fixed.uuid),
            size: state.size,
            file_size,
            root_offset: state.root_offset,
            root_size: state.root_size,
            clean_shutdown: state.clean_shutdown == 1,
            created_unix: fixed.created_unix,
            state_seq: state.seq,
            filesystem,
            dax,
            in_use,
            fams: fixed.incompat_flags & super::header::INCOMPAT_FAMS != 0,
            domain,
        }
    }

    /// Reads a pool's header without locking or writing it; any layout is accepted.
    pub fn read(path: impl AsRef<Path>) -> Result<PoolInfo> {
        let path = path.as_ref();
        let file = File::open(path).map_err(|e| PoolError::io(path, "open", e))?;
        let header = super::read_header(&file, path)?;
        let file_size = file.metadata().map_err(|e| PoolError::io(path, "stat", e))?.len();
        let in_use = match rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockShared) {
            Ok(()) => {
                let _ = rustix::fs::flock(&file, rustix::fs::FlockOperation::Unlock);
                false
            }
            Err(_) => true,
        };
        let filesystem = filesystem_name(&file);
        let dax = supports_map_sync(&file);
        let fams = header.fixed.incompat_flags & super::header::INCOMPAT_FAMS != 0;
        let domain = if fams {
            DomainKind::Volatile
        } else if dax || filesystem == "tmpfs" {
            DomainKind::Cpu
        } else {
            DomainKind::Msync
        };
        Ok(PoolInfo::from_parts(
            path,
            &header.fixed,
            &header.state,
            file_size,
            filesystem,
            dax,
            in_use,
            domain,
        ))
    }
}
