//! The heap layer's error type.

use crate::pool::PoolError;

/// Errors of the heap, its allocator and its transactions.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HeapError {
    /// The pool layer failed (I/O, bounds, poisoned pool, ...).
    #[error(transparent)]
    Pool(#[from] PoolError),
    /// The pool holds no heap, or not one this build understands.
    #[error("the pool holds no nvhtm heap: {0}")]
    NotAHeap(String),
    /// The heap's metadata is inconsistent.
    #[error("corrupt heap: {0}")]
    Corrupt(String),
    /// No space is left and the pool could not grow.
    #[error("out of space: cannot allocate {requested} bytes ({why})")]
    OutOfSpace {
        /// Bytes asked for.
        requested: u64,
        /// Why the pool could not grow.
        why: String,
    },
    /// `free` of something that is not an allocated block.
    #[error("invalid free of offset {offset:#x}: {why}")]
    InvalidFree {
        /// The offset given.
        offset: u64,
        /// What is wrong with it.
        why: &'static str,
    },
    /// A store through [`Heap::pool`](crate::Heap::pool) outside the blocks the heap handed
    /// out: it would overwrite the heap's metadata or another block.
    #[error("cannot write {len} bytes at {offset:#x} through the heap's pool: {why}")]
    NotWritable {
        /// The offset given.
        offset: u64,
        /// The length given.
        len: u64,
        /// What lies there.
        why: &'static str,
    },
    /// A transaction snapshotted more than its lane's undo log holds.
    #[error("transaction undo log full: {needed} bytes needed, {capacity} available per lane")]
    UndoLogFull {
        /// Bytes the log would need.
        needed: u64,
        /// Bytes a lane's undo log holds.
        capacity: u64,
    },
    /// A transaction allocated, freed or stored more words than the redo log holds.
    #[error("transaction redo log full: {needed} words needed, {capacity} available")]
    RedoLogFull {
        /// Entries the log would need.
        needed: usize,
        /// Entries a lane's redo log holds.
        capacity: usize,
    },
    /// A write outside the pool's user space, or a misaligned word.
    #[error("invalid range {offset:#x}+{len}: {why}")]
    InvalidRange {
        /// Offset given.
        offset: u64,
        /// Length given.
        len: u64,
        /// What is wrong.
        why: &'static str,
    },
    /// The stored root object has another size than the type asked for.
    #[error("root object is {stored} bytes, but the type asked for is {requested} bytes")]
    RootSize {
        /// Size in the heap header.
        stored: u64,
        /// Size of the type.
        requested: u64,
    },
}

impl From<crate::persist::PersistError> for HeapError {
    fn from(e: crate::persist::PersistError) -> HeapError {
        HeapError::Pool(PoolError::Persist(e))
    }
}

/// The heap layer's result.
pub type Result<T, E = HeapError> = std::result::Result<T, E>;
