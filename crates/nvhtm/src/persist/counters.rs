//! Counters of persistence work: lines flushed, fences, bytes written, sync calls.
//!
//! Each thread counts into its own block (no shared cache line on the hot path); a snapshot sums
//! the blocks. Tests read their own thread's counts, benchmarks the global ones.

use std::ops::Sub;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// A snapshot of persistence work done.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct PersistStats {
    /// Cache lines asked to be written back.
    pub lines_flushed: u64,
    /// Fences (`sfence`, or a batch of msyncs).
    pub fences: u64,
    /// Bytes stored into persistent memory.
    pub bytes_written: u64,
    /// `msync`/`fsync` system calls made.
    pub syncs: u64,
}

impl Sub for PersistStats {
    type Output = PersistStats;
    fn sub(self, rhs: PersistStats) -> PersistStats {
        PersistStats {
            lines_flushed: self.lines_flushed - rhs.lines_flushed,
            fences: self.fences - rhs.fences,
            bytes_written: self.bytes_written - rhs.bytes_written,
            syncs: self.syncs - rhs.syncs,
        }
    }
}

#[derive(Default)]
struct Block {
    lines_flushed: AtomicU64,
    fences: AtomicU64,
    bytes_written: AtomicU64,
    syncs: AtomicU64,
}

impl Block {
    fn snapshot(&self) -> PersistStats {
        PersistStats {
            lines_flushed: self.lines_flushed.load(Ordering::Relaxed),
            fences: self.fences.load(Ordering::Relaxed),
            bytes_written: self.bytes_written.load(Ordering::Relaxed),
            syncs: self.syncs.load(Ordering::Relaxed),
        }
    }
}

static BLOCKS: Mutex<Vec<Arc<Block>>> = Mutex::new(Vec::new());

thread_local! {
    static MINE: Arc<Block> = {
        let block = Arc::new(Block::default());
        BLOCKS.lock().unwrap_or_else(|e| e.into_inner()).push(Arc::clone(&block));
        block
    };
}

/// Only the owning thread writes its block, so a load and a store (no locked instruction) is
/// enough; readers on other threads see a recent value.
fn bump(field: impl Fn(&Block) -> &AtomicU64, n: u64) {
    MINE.with(|block| {
        let counter = field(block);
        counter.store(counter.load(Ordering::Relaxed) + n, Ordering::Relaxed);
    });
}

pub(crate) fn add_lines(n: u64) {
    bump(|b| &b.lines_flushed, n);
}

pub(crate) fn add_fence() {
    bump(|b| &b.fences, 1);
}

pub(crate) fn add_bytes(n: u64) {
    bump(|b| &b.bytes_written, n);
}

pub(crate) fn add_syncs(n: u64) {
    bump(|b| &b.syncs, n);
}

/// The work done so far by the calling thread.
pub fn thread_stats() -> PersistStats {
    MINE.with(|block| block.snapshot())
}

/// The work done so far by every thread of the process.
pub fn global_stats() -> PersistStats {
    let blocks = BLOCKS.lock().unwrap_or_else(|e| e.into_inner());
    blocks.iter().map(|b| b.snapshot()).fold(PersistStats::default(), |acc, s| PersistStats {
        lines_flushed: acc.lines_flushed + s.lines_flushed,
        fences: acc.fences + s.fences,
        bytes_written: acc.bytes_written + s.bytes_written,
        syncs: acc.syncs + s.syncs,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thread_counts_are_private_and_summed_globally() {
        let before = thread_stats();
        add_lines(3);
        add_fence();
        add_bytes(100);
        assert_eq!(
            thread_stats() - before,
            PersistStats { lines_flushed: 3, fences: 1, bytes_written: 100, syncs: 0 }
        );
        let other = std::thread::spawn(|| {
            let before = thread_stats();
            add_syncs(2);
            thread_stats() - before
        })
        .join()
        .unwrap();
        assert_eq!(other.syncs, 2);
        assert_eq!(other.lines_flushed, 0);
        assert!(global_stats().syncs >= 2);
    }
}
