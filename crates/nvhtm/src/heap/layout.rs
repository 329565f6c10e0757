//! On-media layout of the heap: header, lanes, chunks, runs, size classes.
//!
//! ```text
//! pool offset
//! 4096            heap header (one page): magic, version, lane geometry, chunk area, root
//! lanes_offset    lane 0 (the heap's own), lane 1 .. lane N-1, each lane_size bytes:
//!                   +0     state word: gen << 1 | active            (own line)
//!                   +64    redo header: gen, count, checksum          (own line)
//!                   +128   redo entries: REDO_CAP × (offset u64, value u64)
//!                   +REDO_END .. lane_size: undo entries
//!                          (gen, offset, len, checksum, data padded to 8)
//! chunks_offset   chunk 0, chunk 1, ...: CHUNK bytes each; the first line of a chunk that
//!                 heads an element holds its header word:
//!                   0                      never used: one free chunk
//!                   FREE  | MAGIC | n<<32  n free chunks
//!                   LARGE | MAGIC | n<<32  one allocated block over n chunks (data at +64)
//!                   RUN   | MAGIC | c<<8   a run of size class c: bitmap, then blocks
//! ```
//!
//! The chunk area is a partition: following the lengths of the heads from chunk 0 visits every
//! element once; chunks covered by an element are never interpreted.

use bytemuck::{Pod, Zeroable};

use crate::pool::HEADER_SIZE;

/// Heap header magic.
pub const HEAP_MAGIC: [u8; 8] = *b"NVHEAP01";
/// Heap format version.
pub const HEAP_VERSION: u32 = 1;
/// Where the heap header lives.
pub const HEAP_OFFSET: u64 = HEADER_SIZE;
/// Bytes per chunk.
pub const CHUNK: u64 = 64 * 1024;
/// Redo entries per lane.
pub const REDO_CAP: usize = 126;
/// Offset of the redo header in a lane.
pub const REDO_HEADER: u64 = 64;
/// Offset of the first redo entry in a lane.
pub const REDO_ENTRIES: u64 = 128;
/// Offset of the undo area in a lane.
pub const UNDO_START: u64 = REDO_ENTRIES + REDO_CAP as u64 * 16;
/// Bytes of an undo entry's header.
pub const UNDO_ENTRY_HEADER: u64 = 32;
/// Default lane size.
pub const DEFAULT_LANE_SIZE: u64 = 16 * 1024;

/// Offset of the root pointer word in the heap header.
pub const ROOT_WORD: u64 = HEAP_OFFSET + 64;
/// Offset of the root size word in the heap header.
pub const ROOT_SIZE_WORD: u64 = HEAP_OFFSET + 72;

/// The fixed part of the heap header (checksummed; the root words follow at +64).
#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable, Debug)]
pub struct HeapHeader {
    pub magic: [u8; 8],
    pub version: u32,
    pub lanes: u32,
    pub lane_size: u64,
    pub lanes_offset: u64,
    pub chunks_offset: u64,
    pub reserved: [u64; 2],
    pub checksum: u64,
}

const _: () = assert!(std::mem::size_of::<HeapHeader>() == 64);

impl HeapHeader {
    pub fn compute_checksum(&self) -> u64 {
        xxhash_rust::xxh3::xxh3_64(&bytemuck::bytes_of(self)[..56])
    }
}

/// Size classes of small blocks (bytes). Larger blocks take whole chunks.
pub const CLASSES: [u32; 32] = [
    16, 32, 48, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320, 384, 448, 512, 640, 768, 896, 1024, 1280,
    1536, 1792, 2048, 2560, 3072, 3584, 4096, 5120, 6144, 7168, 8192,
];

/// The largest small block.
pub const MAX_SMALL: u64 = 8192;

/// The smallest class that holds `size` bytes.
pub fn class_for(size: u64) -> Option<usize> {
    CLASSES.iter().position(|&c| u64::from(c) >= size.max(1))
}

/// Geometry of a run of one class inside a chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RunGeometry {
    /// Block size.
    pub block: u64,
    /// Blocks in the run.
    pub blocks: u64,
    /// Bitmap words (8 bytes each), starting at chunk + 64.
    pub words: u64,
    /// Offset of the first block from the chunk start.
    pub data: u64,
}

impl RunGeometry {
    pub fn of(class: usize) -> RunGeometry {
        let block = u64::from(CLASSES[class]);
        let mut blocks = (CHUNK - 64) / block;
        loop {
            let words = blocks.div_ceil(64);
            let data = (64 + words * 8).next_multiple_of(64);
            if data + blocks * block <= CHUNK {
                return RunGeometry { block, blocks, words, data };
            }
            blocks -= 1;
        }
    }
}

/// Chunk header words.
pub mod chunk {
    const MAGIC: u64 = 0xC4A5 << 16;
    const KIND_MASK: u64 = 0xff;
    const FREE: u64 = 1;
    const LARGE: u64 = 2;
    const RUN: u64 = 3;

    /// What a chunk header word says.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum Head {
        /// `n` free chunks (`n == 1` for a never-used, zero header).
        Free(u32),
        /// One allocated block spanning `n` chunks.
        Large(u32),
        /// A run of size class `c`.
        Run(usize),
    }

    pub fn encode(head: Head) -> u64 {
        match head {
            Head::Free(n) => FREE | MAGIC | u64::from(n) << 32,
            Head::Large(n) => LARGE | MAGIC | u64::from(n) << 32,
            Head::Run(c) => RUN | MAGIC | (c as u64) << 8,
        }
    }

    pub fn decode(word: u64) -> Option<Head> {
        if word == 0 {
            return Some(Head::Free(1));
        }
        if word & (0xffff << 16) != MAGIC {
            return None;
        }
        let n = (word >> 32) as u32;
        match word & KIND_MASK {
            FREE if n > 0 => Some(Head::Free(n)),
            LARGE if n > 0 => Some(Head::Large(n)),
            RUN if n == 0 && ((word >> 8) & 0xff) < super::CLASSES.len() as u64 => {
                Some(Head::Run(((word >> 8) & 0xff) as usize))
            }
            _ => None,
        }
    }

    impl Head {
        /// Chunks the element spans.
        pub fn len(self) -> u32 {
            match self {
                Head::Free(n) | Head::Large(n) => n,
                Head::Run(_) => 1,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::chunk::{decode, encode, Head};
    use super::*;

    #[test]
    fn every_class_fits_its_run() {
        for class in 0..CLASSES.len() {
            let g = RunGeometry::of(class);
            assert!(g.blocks >= 7, "class {class}: {g:?}");
            assert!(g.data + g.blocks * g.block <= CHUNK);
            assert!(g.words * 64 >= g.blocks);
        }
        assert_eq!(class_for(1), Some(0));
        assert_eq!(class_for(16), Some(0));
        assert_eq!(class_for(17), Some(1));
        assert_eq!(class_for(8192), Some(31));
        assert_eq!(class_for(8193), None);
    }

    #[test]
    fn chunk_heads_round_trip_and_garbage_is_rejected() {
        for head in [Head::Free(1), Head::Free(70000), Head::Large(3), Head::Run(31)] {
            assert_eq!(decode(encode(head)), Some(head));
        }
        assert_eq!(decode(0), Some(Head::Free(1)));
        assert_eq!(decode(0xdead_beef), None);
        assert_eq!(decode(encode(Head::Large(3)) & !(0xffu64 << 32)), None, "a large element of 0 chunks");
    }
}
