//! The on-media pool header: a checksummed fixed part and two alternating state slots.
//!
//! ```text
//! offset  size  field
//! 0       8     magic "NVHTMPL\0"
//! 8       4     format_version (1)
//! 12      4     header_size (4096)
//! 16      16    uuid
//! 32      64    layout name, NUL padded
//! 96      8     created (unix seconds)
//! 104     8     incompat_flags (bit 0: FAMS pool; an unknown bit is a feature this build lacks)
//! 112     136   reserved (0)
//! 248     8     checksum: xxh3-64 of bytes 0..248
//! 256     64    state slot 0  } seq, size, root_offset, root_size, clean_shutdown,
//! 320     64    state slot 1  } 2 reserved words, checksum (xxh3 seeded by the fixed checksum)
//! 384..4096     reserved; user space starts at 4096
//! ```
//!
//! The mutable fields (size, root, clean-shutdown flag) change failure-atomically: a new state is
//! written with `seq + 1` into the slot not holding the current one and persisted; opening picks
//! the valid slot with the highest `seq`. A torn slot fails its checksum and the other is used.

use bytemuck::{Pod, Zeroable};
use std::path::Path;
use xxhash_rust::xxh3::{xxh3_64, xxh3_64_with_seed};

use super::error::{PoolError, Result};

/// First bytes of every pool file.
pub const MAGIC: [u8; 8] = *b"NVHTMPL\0";
/// The format version this build writes and reads.
pub const FORMAT_VERSION: u32 = 1;
/// Bytes reserved for the header; user data starts here.
pub const HEADER_SIZE: u64 = 4096;
/// The smallest pool.
pub const MIN_POOL_SIZE: u64 = 64 * 1024;
/// Incompatible feature: the pool is committed by failure-atomic msync (it has a journal and
/// must be opened in FAMS mode).
pub const INCOMPAT_FAMS: u64 = 1;
/// The incompatible features this build knows.
const KNOWN_INCOMPAT: u64 = INCOMPAT_FAMS;

/// Longest layout name, in bytes.
pub const MAX_LAYOUT_LEN: usize = 63;

/// Offsets of the two state slots.
pub(crate) const SLOT_OFFSETS: [u64; 2] = [256, 320];
/// Bytes of the header that describe the pool (fixed part and both slots).
pub(crate) const HEADER_BYTES: usize = 384;

/// The fixed part of the header, written once at creation.
#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
pub(crate) struct FixedHeader {
    pub magic: [u8; 8],
    pub format_version: u32,
    pub header_size: u32,
    pub uuid: [u8; 16],
    pub layout: [u8; 64],
    pub created_unix: u64,
    pub incompat_flags: u64,
    pub reserved: [u64; 17],
    pub checksum: u64,
}

/// The mutable part of the header; one of two slots.
#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable, Debug, PartialEq, Eq)]
pub(crate) struct StateSlot {
    pub seq: u64,
    pub size: u64,
    pub root_offset: u64,
    pub root_size: u64,
    pub clean_shutdown: u64,
    pub reserved: [u64; 2],
    pub checksum: u64,
}

const _: () = assert!(std::mem::size_of::<FixedHeader>() == 256);
const _: () = assert!(std::mem::size_of::<StateSlot>() == 64);

impl FixedHeader {
    pub fn new(uuid: [u8; 16], layout: &str, created_unix: u64) -> FixedHeader {
        let mut header = FixedHeader::zeroed();
        header.magic = MAGIC;
        header.format_version = FORMAT_VERSION;
        header.header_size = HEADER_SIZE as u32;
        header.uuid = uuid;
        header.layout[..layout.len()].copy_from_slice(layout.as_bytes());
        header.created_unix = created_unix;
        header.checksum = header.compute_checksum();
        header
    }

    pub fn compute_checksum(&self) -> u64 {
        xxh3_64(&bytemuck::bytes_of(self)[..248])
    }

    pub fn layout_name(&self) -> String {
        let end = self.layout.iter().position(|&b| b == 0).unwrap_or(self.layout.len());
        String::from_utf8_lossy(&self.layout[..end]).into_owned()
    }
}

impl StateSlot {
    /// Seals the slot: its checksum is bound to this pool's fixed header.
    pub fn sealed(mut self, fixed_checksum: u64) -> StateSlot {
        self.checksum = self.compute_checksum(fixed_checksum);
        self
    }

    fn compute_checksum(&self, fixed_checksum: u64) -> u64 {
        xxh3_64_with_seed(&bytemuck::bytes_of(self)[..56], fixed_checksum)
    }

    fn is_valid(&self, fixed_checksum: u64) -> bool {
        self.seq != 0 && self.checksum == self.compute_checksum(fixed_checksum)
    }
}

/// A validated header.
#[derive(Clone, Copy)]
pub(crate) struct Header {
    pub fixed: FixedHeader,
    pub state: StateSlot,
}

/// Checks that `name` can be stored as a layout name.
pub(crate) fn validate_layout(name: &str) -> Result<()> {
    let why = if name.is_empty() {
        Some("it is empty")
    } else if name.len() > MAX_LAYOUT_LEN {
        Some("it is longer than 63 bytes")
    } else if !name.bytes().all(|b| b.is_ascii_graphic()) {
        Some("only printable ASCII without spaces is allowed")
    } else {
        None
    };
    match why {
        Some(why) => Err(PoolError::InvalidLayout { name: name.to_string(), why }),
        None => Ok(()),
    }
}

fn escape(bytes: &[u8]) -> String {
    format!("\"{}\"", bytes.escape_ascii())
}

/// Validates the first bytes of a pool (`bytes`, at most [`HEADER_BYTES`] are read) of a file
/// of `file_len` bytes. Checks run from the most basic (is this a pool at all?) to the most
/// specific, so the error names the first thing wrong.
pub(crate) fn parse(path: &Path, bytes: &[u8], file_len: u64) -> Result<Header> {
    let path_buf = || path.to_path_buf();
    if bytes.len() < MAGIC.len() || bytes[..MAGIC.len()] != MAGIC {
        let shown = &bytes[..bytes.len().min(MAGIC.len())];
        return Err(PoolError::NotAPool { path: path_buf(), found: escape(shown) });
    }
    if file_len < HEADER_SIZE || bytes.len() < HEADER_BYTES {
        return Err(PoolError::Truncated { path: path_buf(), expected: HEADER_SIZE, actual: file_len });
    }
    let fixed: FixedHeader = bytemuck::pod_read_unaligned(&bytes[..256]);
    let computed = fixed.compute_checksum();
    if computed != fixed.checksum {
        return Err(PoolError::HeaderChecksum { path: path_buf(), stored: fixed.checksum, computed });
    }
    if fixed.format_version > FORMAT_VERSION {
        return Err(PoolError::NewerVersion {
            path: path_buf(),
            found: fixed.format_version,
            supported: FORMAT_VERSION,
        });
    }
    if fixed.format_version != FORMAT_VERSION {
        return Err(PoolError::UnsupportedVersion {
            path: path_buf(),
            found: fixed.format_version,
            supported: FORMAT_VERSION,
        });
    }
    let corrupt = |what: String| PoolError::Corrupt { path: path_buf(), what };
    if u64::from(fixed.header_size) != HEADER_SIZE {
        return Err(corrupt(format!("header size is {}, expected {HEADER_SIZE}", fixed.header_size)));
    }
    if fixed.incompat_flags & !KNOWN_INCOMPAT != 0 {
        return Err(corrupt(format!(
            "unknown incompatible features {:#x} (written by a newer nvhtm?)",
            fixed.incompat_flags
        )));
    }
    let slots = SLOT_OFFSETS.map(|off| {
        let off = off as usize;
        bytemuck::pod_read_unaligned::<StateSlot>(&bytes[off..off + 64])
    });
    let state = slots
        .into_iter()
        .filter(|slot| slot.is_valid(fixed.checksum))
        .max_by_key(|slot| slot.seq)
        .ok_or_else(|| corrupt("neither header state slot is valid".to_string()))?;
    let page = rustix::param::page_size() as u64;
    if state.size < MIN_POOL_SIZE || state.size % page != 0 {
        return Err(corrupt(format!("pool size {} is not a valid size", state.size)));
    }
    if file_len < state.size {
        return Err(PoolError::Truncated { path: path_buf(), expected: state.size, actual: file_len });
    }
    if state.root_offset != 0 {
        let end = state.root_offset.checked_add(state.root_size);
        if state.root_offset < HEADER_SIZE || end.is_none_or(|end| end > state.size) {
            return Err(corrupt(format!(
                "root object {:#x}+{} lies outside the pool",
                state.root_offset, state.root_size
            )));
        }
    }
    Ok(Header { fixed, state })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(size: u64) -> Vec<u8> {
        let fixed = FixedHeader::new([7; 16], "test", 1);
        let slot = StateSlot { seq: 1, size, ..StateSlot::zeroed() }.sealed(fixed.checksum);
        let mut bytes = vec![0u8; HEADER_BYTES];
        bytes[..256].copy_from_slice(bytemuck::bytes_of(&fixed));
        bytes[256..320].copy_from_slice(bytemuck::bytes_of(&slot));
        bytes
    }

    #[test]
    fn newest_valid_slot_wins_and_a_torn_one_is_ignored() {
        let mut bytes = image(MIN_POOL_SIZE);
        let fixed: FixedHeader = bytemuck::pod_read_unaligned(&bytes[..256]);
        let newer =
            StateSlot { seq: 2, size: 2 * MIN_POOL_SIZE, ..StateSlot::zeroed() }.sealed(fixed.checksum);
        bytes[320..384].copy_from_slice(bytemuck::bytes_of(&newer));
        let p = Path::new("p");
        assert_eq!(parse(p, &bytes, 2 * MIN_POOL_SIZE).unwrap().state.seq, 2);
        bytes[330] ^= 1; // tear slot 1
        assert_eq!(parse(p, &bytes, 2 * MIN_POOL_SIZE).unwrap().state.seq, 1);
    }

    #[test]
    fn layout_names_are_checked() {
        assert!(validate_layout("kv-store_1.0").is_ok());
        for bad in ["", "has space", "é", &"x".repeat(64)] {
            assert!(matches!(validate_layout(bad), Err(PoolError::InvalidLayout { .. })), "{bad:?}");
        }
    }
}
