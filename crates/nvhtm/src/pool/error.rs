//! The pool layer's error type.

use std::io;
use std::path::{Path, PathBuf};

use crate::persist::PersistError;

/// Everything that can go wrong creating, opening or using a pool. Each variant names what is
/// wrong; none of the open-time errors writes anything to the file.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PoolError {
    /// A system call failed for a reason without a more specific variant.
    #[error("{path}: {op} failed: {source}")]
    Io {
        /// The pool file.
        path: PathBuf,
        /// What was being done.
        op: &'static str,
        /// What the kernel said.
        #[source]
        source: io::Error,
    },
    /// The pool file does not exist.
    #[error("{path}: no such file")]
    NotFound {
        /// The pool file.
        path: PathBuf,
    },
    /// The file exists but may not be opened or created as asked.
    #[error("{path}: permission denied ({op})")]
    PermissionDenied {
        /// The pool file.
        path: PathBuf,
        /// What was refused.
        op: &'static str,
    },
    /// `create` was asked for a path that already exists.
    #[error("{path}: already exists (remove it first or open it)")]
    AlreadyExists {
        /// The pool file.
        path: PathBuf,
    },
    /// The file does not start with the pool magic.
    #[error("{path}: not an nvhtm pool (magic is {found}, expected \"NVHTMPL\")")]
    NotAPool {
        /// The file.
        path: PathBuf,
        /// The first bytes, escaped.
        found: String,
    },
    /// The pool was written by a newer nvhtm.
    #[error(
        "{path}: pool format version {found} is newer than this build supports ({supported}); upgrade nvhtm"
    )]
    NewerVersion {
        /// The pool file.
        path: PathBuf,
        /// Version in the header.
        found: u32,
        /// Newest version this build reads.
        supported: u32,
    },
    /// The pool's format version is not one this build reads.
    #[error("{path}: pool format version {found} is not supported (this build reads version {supported})")]
    UnsupportedVersion {
        /// The pool file.
        path: PathBuf,
        /// Version in the header.
        found: u32,
        /// Version this build reads.
        supported: u32,
    },
    /// The pool belongs to another application layout.
    #[error("{path}: pool layout is \"{found}\", expected \"{expected}\"")]
    WrongLayout {
        /// The pool file.
        path: PathBuf,
        /// Layout asked for.
        expected: String,
        /// Layout in the header.
        found: String,
    },
    /// The fixed part of the header does not match its checksum.
    #[error("{path}: header checksum mismatch (stored {stored:#018x}, computed {computed:#018x}): the header is corrupt")]
    HeaderChecksum {
        /// The pool file.
        path: PathBuf,
        /// Checksum in the header.
        stored: u64,
        /// Checksum of the bytes.
        computed: u64,
    },
    /// The header is structurally wrong in a way the checksum cannot explain.
    #[error("{path}: corrupt pool header: {what}")]
    Corrupt {
        /// The pool file.
        path: PathBuf,
        /// What is wrong.
        what: String,
    },
    /// The file is shorter than the header says the pool is.
    #[error("{path}: truncated: the pool needs {expected} bytes but the file has {actual}")]
    Truncated {
        /// The pool file.
        path: PathBuf,
        /// Bytes the pool needs.
        expected: u64,
        /// Bytes the file has.
        actual: u64,
    },
    /// Another process (or another handle in this one) has the pool open for writing.
    #[error("{path}: locked: another process has this pool open")]
    Locked {
        /// The pool file.
        path: PathBuf,
    },
    /// The requested pool size is below the minimum.
    #[error("pool size {requested} bytes is too small: the minimum is {minimum} bytes")]
    TooSmall {
        /// Size asked for.
        requested: u64,
        /// Smallest pool.
        minimum: u64,
    },
    /// The pool cannot grow past the address space reserved when it was mapped.
    #[error("pool cannot grow to {requested} bytes: {limit} bytes of address space are reserved (reopen with a larger max size)")]
    GrowthLimit {
        /// Size asked for.
        requested: u64,
        /// Reserved bytes.
        limit: u64,
    },
    /// The file system is full.
    #[error("{path}: no space left on device to {op} {bytes} bytes")]
    NoSpace {
        /// The pool file.
        path: PathBuf,
        /// What was being done.
        op: &'static str,
        /// Bytes asked for.
        bytes: u64,
    },
    /// The layout name is unusable.
    #[error("invalid layout name {name:?}: {why}")]
    InvalidLayout {
        /// The name given.
        name: String,
        /// Why it is refused.
        why: &'static str,
    },
    /// The chosen persistence domain does not make writes durable on this mapping.
    #[error("{path}: the {domain} domain is not durable on a {mapping} mapping; use {suggest}, or force it")]
    DomainMismatch {
        /// The pool file.
        path: PathBuf,
        /// Domain asked for.
        domain: String,
        /// What the mapping is.
        mapping: String,
        /// A domain that would be durable.
        suggest: &'static str,
    },
    /// An offset and length outside the pool (or inside its header, for writes).
    #[error("range {offset:#x}+{len} is outside the pool's usable space {start:#x}..{size:#x}")]
    OutOfBounds {
        /// Offset given.
        offset: u64,
        /// Length given.
        len: u64,
        /// First usable offset.
        start: u64,
        /// Pool size.
        size: u64,
    },
    /// An atomic access at an offset that is not 8-byte aligned.
    #[error("offset {offset:#x} is not 8-byte aligned")]
    Misaligned {
        /// Offset given.
        offset: u64,
    },
    /// The pool was opened copy-on-write (to inspect it) and cannot grow.
    #[error("{path}: opened read-only (copy-on-write, for inspection): it cannot grow")]
    ReadOnly {
        /// The pool file.
        path: PathBuf,
    },
    /// A FAMS pool opened without FAMS, or the other way round.
    #[error("{path}: {what}")]
    FamsMode {
        /// The pool file.
        path: PathBuf,
        /// Which way round.
        what: &'static str,
    },
    /// The failure-atomic msync layer failed.
    #[error(transparent)]
    Fams(#[from] crate::fams::FamsError),
    /// The stored root object has another size than the type asked for.
    #[error("root object is {stored} bytes, but the type asked for is {requested} bytes")]
    RootSize {
        /// Size in the header.
        stored: u64,
        /// Size of the type.
        requested: u64,
    },
    /// A FAMS pool's `sync` was called by a thread inside a write operation of that pool (a
    /// heap transaction's body, or with a [`WriterGuard`](super::WriterGuard) held): the commit
    /// would wait for that operation to finish.
    #[error("sync called inside a write operation of the same FAMS pool (it would wait for itself)")]
    SyncInsideWriter,
    /// A flush or sync failed earlier: the pool may have lost writes, and its memory may hold
    /// data that is not durable, so it refuses every read and write until it is reopened.
    #[error("the pool refuses reads and writes until it is reopened: an earlier flush failed ({0})")]
    Poisoned(String),
    /// A flush or sync failed just now.
    #[error(transparent)]
    Persist(#[from] PersistError),
}

impl PoolError {
    /// Maps an I/O error of `op` on `path` to the most specific variant.
    pub(crate) fn io(path: &Path, op: &'static str, err: io::Error) -> PoolError {
        use rustix::io::Errno;
        let path = path.to_path_buf();
        let is = |errno: Errno| err.raw_os_error() == Some(errno.raw_os_error());
        if is(Errno::NOENT) {
            PoolError::NotFound { path }
        } else if is(Errno::ACCESS) || is(Errno::PERM) || is(Errno::ROFS) {
            PoolError::PermissionDenied { path, op }
        } else if is(Errno::EXIST) {
            PoolError::AlreadyExists { path }
        } else if is(Errno::NOSPC) || is(Errno::DQUOT) {
            PoolError::NoSpace { path, op, bytes: 0 }
        } else {
            PoolError::Io { path, op, source: err }
        }
    }
}

/// The pool layer's result.
pub type Result<T, E = PoolError> = std::result::Result<T, E>;
