//! A walk of the heap's persistent metadata: every chunk in exactly one element, runs whose
//! bitmaps fit, lanes idle, a root that is an allocated block.

use std::sync::atomic::Ordering;

use super::layout::chunk::Head;
use super::layout::{RunGeometry, CHUNK, CLASSES, ROOT_WORD};
use super::{Block, Heap};
use crate::persist::Domain;

/// Usage of one size class.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct ClassUsage {
    /// Block size of the class.
    pub block_size: u64,
    /// Runs of the class.
    pub runs: u64,
    /// Blocks in those runs.
    pub blocks: u64,
    /// Blocks allocated.
    pub allocated: u64,
}

/// What [`Heap::check`] found.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct CheckReport {
    /// Pool size in bytes.
    pub pool_size: u64,
    /// Offset of chunk 0 in the pool.
    pub chunks_offset: u64,
    /// Chunks in the heap.
    pub chunks: u64,
    /// Chunks in free elements.
    pub free_chunks: u64,
    /// Allocated large blocks.
    pub large_blocks: u64,
    /// Chunks they span.
    pub large_chunks: u64,
    /// Allocated small blocks.
    pub small_blocks: u64,
    /// Bytes of allocated small blocks.
    pub small_bytes: u64,
    /// Per size class, for classes with runs.
    pub classes: Vec<ClassUsage>,
    /// Lanes in the heap.
    pub lanes: u64,
    /// Lanes whose log is not retired.
    pub busy_lanes: u64,
    /// Everything inconsistent; empty for a sound heap.
    pub problems: Vec<String>,
}

impl CheckReport {
    /// Whether the heap is consistent.
    pub fn is_consistent(&self) -> bool {
        self.problems.is_empty()
    }
}

impl<D: Domain> Heap<D> {
    /// Walks the persistent metadata, calling `progress(done, total)` as chunks are checked.
    /// It reads only; the heap must not be changing (open it exclusively).
    pub fn check(&self, progress: &mut dyn FnMut(u64, u64)) -> CheckReport {
        let count = u64::from(self.chunk_count());
        let mut report = CheckReport {
            pool_size: self.pool.size(),
            chunks_offset: self.header.chunks_offset,
            chunks: count,
            lanes: self.lanes.len() as u64,
            classes: CLASSES
                .iter()
                .map(|&c| ClassUsage { block_size: u64::from(c), ..ClassUsage::default() })
                .collect(),
            ..CheckReport::default()
        };
        for lane in &self.lanes {
            let lane = super::lock(lane);
            match lane.log.state(&self.pool) {
                Ok((_, true)) => {
                    report.busy_lanes += 1;
                    report.problems.push(format!("lane at {:#x} has an unretired operation", lane.log.base));
                }
                Ok(_) => {}
                Err(e) => report.problems.push(format!("lane at {:#x}: {e}", lane.log.base)),
            }
        }
        let mut c = 0u64;
        while c < count {
            let head = match self.head(c as u32) {
                Ok(head) => head,
                Err(e) => {
                    report.problems.push(e.to_string());
                    break;
                }
            };
            let len = u64::from(head.len());
            if c + len > count {
                report.problems.push(format!("chunk {c}: {head:?} runs past the heap's {count} chunks"));
                break;
            }
            match head {
                Head::Free(n) => report.free_chunks += u64::from(n),
                Head::Large(n) => {
                    report.large_blocks += 1;
                    report.large_chunks += u64::from(n);
                }
                Head::Run(class) => {
                    let geo = RunGeometry::of(class);
                    let usage = &mut report.classes[class];
                    usage.runs += 1;
                    usage.blocks += geo.blocks;
                    match self.bitmap(c as u32, &geo) {
                        Ok(words) => {
                            let allocated: u64 = words.iter().map(|w| u64::from(w.count_ones())).sum();
                            usage.allocated += allocated;
                            report.small_blocks += allocated;
                            report.small_bytes += allocated * geo.block;
                        }
                        Err(e) => report.problems.push(e.to_string()),
                    }
                }
            }
            c += len;
            if c % 1024 < len || c >= count {
                progress(c.min(count), count);
            }
        }
        report.classes.retain(|usage| usage.runs > 0);
        if !report.problems.is_empty() {
            return report;
        }
        if let Err(e) = self.ensure_scanned() {
            report.problems.push(e.to_string());
            return report;
        }
        match self.pool.load_u64(ROOT_WORD, Ordering::Acquire) {
            Ok(0) => {}
            Ok(root) => match self.locate(root) {
                Ok(Block::Small { chunk, index }) => {
                    let at = self.bitmap_word_offset(chunk, index / 64);
                    let allocated =
                        self.pool.load_u64(at, Ordering::Acquire).is_ok_and(|w| w & (1 << (index % 64)) != 0);
                    if !allocated {
                        report.problems.push(format!("the root {root:#x} is not an allocated block"));
                    }
                }
                Ok(Block::Large { .. }) => {}
                Err(_) => report.problems.push(format!("the root {root:#x} is not the start of a block")),
            },
            Err(e) => report.problems.push(e.to_string()),
        }
        debug_assert!(report.chunks * CHUNK <= report.pool_size);
        report
    }
}
