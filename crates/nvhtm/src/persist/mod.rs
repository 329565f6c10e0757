//! Persistence domains: the one narrow way every write to persistent memory is made and made
//! durable.
//!
//! A [`Domain`] performs stores into a mapped region, writes cache lines back, and orders them
//! with fences. Structures are generic over the domain, so the code that ships is the code the
//! crash simulator ([`crate::sim::Sim`]) proves:
//!
//! | domain | durable after | use it for |
//! |---|---|---|
//! | [`Cpu`] | `clwb`/`clflushopt`/`clflush` + `sfence` | DAX mappings of PMem/CXL, `/dev/shm` emulation |
//! | [`Msync`] | `msync(MS_SYNC)` of the covering pages | ordinary files on any file system |
//! | [`Volatile`] | never (no flushing at all) | baselines, FAMS pools (sync is the commit) |
//! | [`crate::sim::Sim`] | what the Px86 model allows | crash tests |
//!
//! Every flush and fence is attributed to the source location that asked for it (a [`Site`],
//! via `#[track_caller]`), so the simulator can switch a single site off: the hook for
//! persistence mutation testing.

mod auto;
mod counters;
mod cpu;
mod msync;
mod volatile;

pub use auto::AutoDomain;
pub(crate) use counters::{
    add_bytes as counters_add_bytes, add_fence as counters_add_fence, add_lines as counters_add_lines,
};
pub use counters::{global_stats, thread_stats, PersistStats};
pub(crate) use cpu::NT_THRESHOLD;
pub use cpu::{Cpu, FlushInstr};
pub use msync::Msync;
pub use volatile::Volatile;

use std::fmt;
use std::panic::Location;
use std::sync::atomic::{AtomicU64, Ordering};

/// Size of the unit the hardware writes back: one cache line.
pub const CACHE_LINE: usize = 64;

/// Which family a domain belongs to (for reports and for checking it fits a mapping).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DomainKind {
    /// Cache-line write-back instructions.
    Cpu,
    /// `msync` of the covering pages.
    Msync,
    /// No durability at all.
    Volatile,
    /// The crash simulator.
    Sim,
}

impl fmt::Display for DomainKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DomainKind::Cpu => "cpu",
            DomainKind::Msync => "msync",
            DomainKind::Volatile => "volatile",
            DomainKind::Sim => "sim",
        })
    }
}

/// A flush or fence call site: the source location that asked for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Site {
    /// Source file.
    pub file: &'static str,
    /// Line in the file.
    pub line: u32,
    /// Column in the line.
    pub column: u32,
}

impl Site {
    /// The site of the caller of the innermost `#[track_caller]` function.
    #[track_caller]
    pub fn caller() -> Site {
        Site::from(Location::caller())
    }
}

impl From<&'static Location<'static>> for Site {
    fn from(loc: &'static Location<'static>) -> Site {
        Site { file: loc.file(), line: loc.line(), column: loc.column() }
    }
}

impl fmt::Display for Site {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}", self.file, self.line, self.column)
    }
}

/// Making data durable failed. The data written since the last successful fence may or may not
/// be durable; the pool that saw this refuses further writes until it is reopened.
#[derive(Debug, thiserror::Error)]
#[error("{op} failed at {site}: {source}")]
pub struct PersistError {
    /// The system call that failed.
    pub op: &'static str,
    /// Where the fence was asked for.
    pub site: Site,
    /// What the kernel said.
    #[source]
    pub source: std::io::Error,
}

/// The persistence domain: every store to persistent memory, and every write-back and ordering
/// of it, goes through one of these.
///
/// The raw-pointer methods are `unsafe`: callers (the pool, which bounds-checks offsets) promise
/// the addresses lie inside a live mapping. Loads do not go through the domain.
pub trait Domain: Send + Sync + 'static {
    /// Which family this domain belongs to.
    fn kind(&self) -> DomainKind;

    /// Told by the pool which region it maps (again after growth). Only the simulator needs it.
    ///
    /// # Safety
    /// `base..base + len` must stay mapped and readable while the domain is used with it.
    unsafe fn attach(&self, _base: *mut u8, _len: usize) {}

    /// Copies `src` to `dst` with ordinary (cached) stores.
    ///
    /// # Safety
    /// `dst..dst + src.len()` must be valid for writes, and no other thread may access it
    /// non-atomically at the same time.
    unsafe fn write(&self, dst: *mut u8, src: &[u8]);

    /// Copies `src` to `dst` so that it is persistent at the next [`fence`](Domain::fence)
    /// without a flush (non-temporal stores for large ranges).
    ///
    /// # Safety
    /// As for [`write`](Domain::write).
    #[track_caller]
    unsafe fn write_persistent(&self, dst: *mut u8, src: &[u8]) {
        // SAFETY: the caller upholds write's and flush's contract for this range.
        unsafe {
            self.write(dst, src);
            self.flush(dst, src.len());
        }
    }

    /// Atomically stores an aligned 8-byte word: the unit that is failure-atomic.
    ///
    /// # Safety
    /// `dst` must be 8-byte aligned and valid for writes.
    unsafe fn store_u64(&self, dst: *const AtomicU64, value: u64, order: Ordering);

    /// Atomic compare-and-exchange of an aligned 8-byte word.
    ///
    /// # Safety
    /// As for [`store_u64`](Domain::store_u64).
    unsafe fn compare_exchange_u64(
        &self,
        dst: *const AtomicU64,
        current: u64,
        new: u64,
        order: Ordering,
    ) -> Result<u64, u64>;

    /// Starts writing back every cache line of `addr..addr + len`; durable after the next
    /// [`fence`](Domain::fence) (immediately for `clflush`).
    ///
    /// # Safety
    /// The range must lie inside a live mapping.
    #[track_caller]
    unsafe fn flush(&self, addr: *const u8, len: usize);

    /// Waits until every write-back started by this thread is durable, and orders it before
    /// the stores that follow.
    #[track_caller]
    fn fence(&self) -> Result<(), PersistError>;

    /// `flush` then `fence`: the range is durable when this returns `Ok`.
    ///
    /// # Safety
    /// As for [`flush`](Domain::flush).
    #[track_caller]
    unsafe fn persist(&self, addr: *const u8, len: usize) -> Result<(), PersistError> {
        // SAFETY: the caller upholds flush's contract.
        unsafe { self.flush(addr, len) };
        self.fence()
    }
}

/// The cache lines covering `addr..addr + len`, as line-aligned addresses.
pub(crate) fn lines(addr: *const u8, len: usize) -> impl Iterator<Item = usize> {
    let start = addr as usize & !(CACHE_LINE - 1);
    let end = if len == 0 { start } else { addr as usize + len };
    (start..end).step_by(CACHE_LINE)
}

/// The number of cache lines covering `addr..addr + len`.
pub(crate) fn line_count(addr: *const u8, len: usize) -> u64 {
    if len == 0 {
        return 0;
    }
    let first = addr as usize / CACHE_LINE;
    let last = (addr as usize + len - 1) / CACHE_LINE;
    (last - first + 1) as u64
}

/// Plain copy used by the backends whose stores need no special instruction.
///
/// # Safety
/// `dst..dst + src.len()` is valid for writes and does not overlap `src`.
pub(crate) unsafe fn copy_plain(dst: *mut u8, src: &[u8]) {
    // SAFETY: guaranteed by the caller; `src` is a live slice, so the ranges cannot overlap
    // a region the caller has exclusive write access to.
    unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), dst, src.len()) };
    counters::add_bytes(src.len() as u64);
}

/// Plain atomic store used by the backends whose stores need no special instruction.
///
/// # Safety
/// `dst` is aligned and valid.
pub(crate) unsafe fn store_plain(dst: *const AtomicU64, value: u64, order: Ordering) {
    // SAFETY: guaranteed by the caller.
    unsafe { (*dst).store(value, order) };
    counters::add_bytes(8);
}

/// Plain compare-exchange used by the backends whose stores need no special instruction.
///
/// # Safety
/// `dst` is aligned and valid.
pub(crate) unsafe fn cas_plain(
    dst: *const AtomicU64,
    current: u64,
    new: u64,
    order: Ordering,
) -> Result<u64, u64> {
    // SAFETY: guaranteed by the caller.
    let result = unsafe { (*dst).compare_exchange(current, new, order, Ordering::Acquire) };
    if result.is_ok() {
        counters::add_bytes(8);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_arithmetic_covers_partial_lines() {
        let p = 60 as *const u8;
        assert_eq!(line_count(p, 8), 2);
        assert_eq!(lines(p, 8).collect::<Vec<_>>(), vec![0, 64]);
        assert_eq!(line_count(p, 0), 0);
        assert_eq!(lines(p, 0).count(), 0);
        assert_eq!(line_count(128 as *const u8, 64), 1);
    }
}
