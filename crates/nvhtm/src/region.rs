//! The address range a pool (or a FAMS file) lives in.
//!
//! A pool reserves its maximum size of address space up front (`PROT_NONE`, no memory behind
//! it) and maps the file over the start of the reservation. Growing maps more of the file into
//! the same reservation, so the base address never moves and nothing is copied: pointers
//! computed from offsets stay valid while the pool is open.

use std::fs::File;
use std::io;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};

use rustix::mm::{MapFlags, MprotectFlags, ProtFlags};

/// What the pool's memory turned out to be when it was mapped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum MappingKind {
    /// A DAX mapping with `MAP_SYNC`: CPU caches are the only volatile layer.
    Dax,
    /// A file in tmpfs (`/dev/shm`): memory that emulates persistent memory (survives process
    /// crashes, not power loss).
    Tmpfs,
    /// An ordinary file through the page cache: needs `msync` for durability.
    File,
    /// Anonymous memory (in-memory and simulated pools).
    Memory,
    /// Private memory committed to the file by failure-atomic msync.
    Fams,
}

impl std::fmt::Display for MappingKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            MappingKind::Dax => "DAX (MAP_SYNC)",
            MappingKind::Tmpfs => "tmpfs",
            MappingKind::File => "page-cache file",
            MappingKind::Memory => "anonymous memory",
            MappingKind::Fams => "private memory committed by sync (FAMS)",
        })
    }
}

/// A reserved address range with a pool mapped over its start.
pub(crate) struct Region {
    base: NonNull<u8>,
    reserved: u64,
    len: AtomicU64,
    kind: MappingKind,
    file_flags: MapFlags,
    /// Whether dropping the Region unmaps its reservation (`false`: borrowed from an
    /// [`ImageSlot`](crate::pool::ImageSlot), which keeps the mapping for its own life).
    owned: bool,
}

// SAFETY: a Region is a raw mapping that does not move while it lives; sharing its address
// across threads is what a pool is for. Synchronising access to the bytes is the job of the
// structures built on it (locks, atomics, the persistence protocol).
unsafe impl Send for Region {}
// SAFETY: as above.
unsafe impl Sync for Region {}

const RW: ProtFlags = ProtFlags::READ.union(ProtFlags::WRITE);

fn reserve(reserved: u64) -> io::Result<NonNull<u8>> {
    // SAFETY: a null hint lets the kernel choose a fresh range; PROT_NONE memory cannot be
    // touched, so nothing can observe it before we map over it.
    let ptr = unsafe {
        rustix::mm::mmap_anonymous(
            std::ptr::null_mut(),
            reserved as usize,
            ProtFlags::empty(),
            MapFlags::PRIVATE | MapFlags::NORESERVE,
        )
    }?;
    NonNull::new(ptr.cast()).ok_or_else(|| io::Error::other("mmap returned null"))
}

impl Region {
    /// Maps `len` bytes of `file` at the start of a fresh reservation of `reserved` bytes,
    /// with `MAP_SYNC` where the file system supports it (DAX).
    pub fn map_file(file: &File, len: u64, reserved: u64) -> io::Result<Region> {
        let base = reserve(reserved)?;
        let mut region = Region {
            base,
            reserved,
            len: AtomicU64::new(0),
            kind: MappingKind::File,
            file_flags: MapFlags::SHARED_VALIDATE | MapFlags::SYNC,
            owned: true,
        };
        match region.map_file_range(file, 0, len) {
            Ok(()) => region.kind = MappingKind::Dax,
            Err(e)
                if e.raw_os_error() == Some(rustix::io::Errno::OPNOTSUPP.raw_os_error())
                    || e.raw_os_error() == Some(rustix::io::Errno::INVAL.raw_os_error()) =>
            {
                region.file_flags = MapFlags::SHARED;
                region.map_file_range(file, 0, len)?;
                let fs = rustix::fs::fstatfs(file)?;
                if fs.f_type as u64 == u64::from(linux_magic::TMPFS) {
                    region.kind = MappingKind::Tmpfs;
                }
            }
            Err(e) => return Err(e),
        }
        region.len.store(len, Ordering::Release);
        Ok(region)
    }

    /// Maps `len` bytes of `file` copy-on-write: stores change only this process's memory,
    /// never the file.
    pub fn map_file_private(file: &File, len: u64, reserved: u64) -> io::Result<Region> {
        let base = reserve(reserved)?;
        let fs = rustix::fs::fstatfs(file)?;
        let kind = if fs.f_type as u64 == u64::from(linux_magic::TMPFS) {
            MappingKind::Tmpfs
        } else {
            MappingKind::File
        };
        let region = Region {
            base,
            reserved,
            len: AtomicU64::new(0),
            kind,
            file_flags: MapFlags::PRIVATE,
            owned: true,
        };
        region.map_file_range(file, 0, len)?;
        region.len.store(len, Ordering::Release);
        Ok(region)
    }

    /// Zeroed anonymous memory: `len` usable bytes in a reservation of `reserved`.
    pub fn anonymous(len: u64, reserved: u64) -> io::Result<Region> {
        let base = reserve(reserved)?;
        let region = Region {
            base,
            reserved,
            len: AtomicU64::new(0),
            kind: MappingKind::Memory,
            file_flags: MapFlags::empty(),
            owned: true,
        };
        region.protect(0, len)?;
        region.len.store(len, Ordering::Release);
        Ok(region)
    }

    /// A view of anonymous memory another Region owns: `len` usable bytes at `base`, growth
    /// allowed up to `reserved`. Dropping it leaves the mapping alone.
    ///
    /// # Safety
    /// `base..base + reserved` is a private anonymous reservation (as [`Region::anonymous`]
    /// makes) whose first `len` bytes are readable and writable; it stays mapped, and nothing
    /// else reads or writes it, for as long as the returned Region lives.
    pub unsafe fn borrowed(base: NonNull<u8>, len: u64, reserved: u64) -> Region {
        Region {
            base,
            reserved,
            len: AtomicU64::new(len),
            kind: MappingKind::Memory,
            file_flags: MapFlags::empty(),
            owned: false,
        }
    }

    fn map_file_range(&self, file: &File, from: u64, to: u64) -> io::Result<()> {
        // SAFETY: from..to lies inside our reservation (callers check against `reserved`), which
        // only this Region owns; MAP_FIXED replaces our own PROT_NONE pages there.
        unsafe {
            rustix::mm::mmap(
                self.base.as_ptr().add(from as usize).cast(),
                (to - from) as usize,
                RW,
                self.file_flags | MapFlags::FIXED,
                file,
                from,
            )
        }?;
        Ok(())
    }

    fn protect(&self, from: u64, to: u64) -> io::Result<()> {
        let start = self.base.as_ptr().wrapping_add(from as usize).cast();
        let len = (to - from) as usize;
        // SAFETY: from..to lies inside our private anonymous reservation; making it writable
        // exposes zeroed pages that nothing else references.
        unsafe { rustix::mm::mprotect(start, len, MprotectFlags::READ | MprotectFlags::WRITE) }?;
        // Fault the pages in with one call rather than one fault per page (in-memory pools are
        // small and are filled at once). Only a hint: older kernels lack it.
        // SAFETY: the range is our own, now writable, mapping; populating does not change it.
        let _ = unsafe { rustix::mm::madvise(start, len, rustix::mm::Advice::LinuxPopulateWrite) };
        Ok(())
    }

    /// Makes `new_len` bytes usable (the file must already be that long). The base stays put.
    pub fn grow(&self, file: Option<&File>, new_len: u64) -> io::Result<()> {
        let old = self.len();
        assert!(new_len <= self.reserved && new_len >= old, "grow within the reservation");
        match file {
            Some(file) => self.map_file_range(file, old, new_len)?,
            None => self.protect(old, new_len)?,
        }
        self.len.store(new_len, Ordering::Release);
        Ok(())
    }

    #[inline]
    pub fn base(&self) -> *mut u8 {
        self.base.as_ptr()
    }

    #[inline]
    pub fn base_nonnull(&self) -> NonNull<u8> {
        self.base
    }

    #[inline]
    pub fn len(&self) -> u64 {
        self.len.load(Ordering::Acquire)
    }

    pub fn reserved(&self) -> u64 {
        self.reserved
    }

    pub fn kind(&self) -> MappingKind {
        self.kind
    }

    /// A copy of the mapped bytes.
    pub fn to_vec(&self) -> Vec<u8> {
        // SAFETY: base..base+len is mapped readable for the Region's lifetime.
        unsafe { std::slice::from_raw_parts(self.base(), self.len() as usize) }.to_vec()
    }

    /// Marks anonymous memory as the working copy of a FAMS file.
    pub fn mark_fams(&mut self) {
        self.kind = MappingKind::Fams;
    }

    /// Writes the whole mapping back to the file it maps (`msync`, synchronous).
    pub fn msync(&self) -> io::Result<()> {
        // SAFETY: base..base+len is our live mapping; msync does not touch its contents.
        unsafe { rustix::mm::msync(self.base().cast(), self.len() as usize, rustix::mm::MsyncFlags::SYNC) }?;
        Ok(())
    }
}

impl Drop for Region {
    fn drop(&mut self) {
        if !self.owned {
            return;
        }
        // SAFETY: the reservation is ours alone and nothing can use it after drop (every pointer
        // into it is derived from a &Region borrow). An munmap error cannot be acted on here.
        let _ = unsafe { rustix::mm::munmap(self.base().cast(), self.reserved as usize) };
    }
}

/// File-system magic numbers from `statfs(2)`.
pub(crate) mod linux_magic {
    pub const TMPFS: u32 = 0x0102_1994;
    pub const XFS: u32 = 0x5846_5342;
    pub const EXT4: u32 = 0xef53;
    pub const BTRFS: u32 = 0x9123_683e;

    /// A short name for a file system type.
    pub fn name(magic: u64) -> String {
        match magic as u32 {
            TMPFS => "tmpfs".into(),
            XFS => "xfs".into(),
            EXT4 => "ext4".into(),
            BTRFS => "btrfs".into(),
            0x794c_7630 => "overlayfs".into(),
            other => format!("{other:#x}"),
        }
    }
}
