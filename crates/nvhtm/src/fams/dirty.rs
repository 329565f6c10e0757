//! Finding the pages written since the last sync.
//!
//! - **userfaultfd asynchronous write-protect + `PAGEMAP_SCAN`** (Linux 6.7+): the region is
//!   registered write-protected; a write to a protected page is resolved by the kernel itself
//!   (no fault reaches us) and marks the page written. One `PAGEMAP_SCAN` ioctl returns the
//!   written ranges and protects them again atomically. Cost: the scan walks page tables
//!   (measured per GiB by `nvhtm bench fams`), and the first write to each page after a sync
//!   takes a minor fault.
//! - **Page checksums** (fallback): an xxh3 hash per page, recomputed at every sync. Cost: reading
//!   every page of the region at every sync, O(size), but no fault on writes.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use xxhash_rust::xxh3::xxh3_64;

/// How dirty pages are found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TrackerKind {
    /// userfaultfd asynchronous write-protect with the `PAGEMAP_SCAN` ioctl.
    UffdPagemapScan,
    /// A checksum per page, compared at every sync.
    Checksums,
}

impl std::fmt::Display for TrackerKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            TrackerKind::UffdPagemapScan => "userfaultfd write-protect + PAGEMAP_SCAN",
            TrackerKind::Checksums => "page checksums",
        })
    }
}

// Kernel ABI (include/uapi/linux/userfaultfd.h and fs.h).
const UFFD_API: u64 = 0xAA;
const UFFD_FEATURE_WP_UNPOPULATED: u64 = 1 << 13;
const UFFD_FEATURE_WP_ASYNC: u64 = 1 << 15;
const UFFDIO_REGISTER_MODE_WP: u64 = 1 << 1;
const UFFDIO_WRITEPROTECT_MODE_WP: u64 = 1 << 0;
const UFFDIO_API: libc::c_ulong = 0xC018_AA3F;
const UFFDIO_REGISTER: libc::c_ulong = 0xC020_AA00;
const UFFDIO_WRITEPROTECT: libc::c_ulong = 0xC018_AA06;
const PAGEMAP_SCAN: libc::c_ulong = 0xC060_6610;
const PM_SCAN_WP_MATCHING: u64 = 1 << 0;
const PM_SCAN_CHECK_WPASYNC: u64 = 1 << 1;
const PAGE_IS_WRITTEN: u64 = 1 << 1;

#[repr(C)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}

#[repr(C)]
struct UffdioRange {
    start: u64,
    len: u64,
}

#[repr(C)]
struct UffdioRegister {
    range: UffdioRange,
    mode: u64,
    ioctls: u64,
}

#[repr(C)]
struct UffdioWriteprotect {
    range: UffdioRange,
    mode: u64,
}

#[repr(C)]
struct PmScanArg {
    size: u64,
    flags: u64,
    start: u64,
    end: u64,
    walk_end: u64,
    vec: u64,
    vec_len: u64,
    max_pages: u64,
    category_inverted: u64,
    category_mask: u64,
    category_anyof_mask: u64,
    return_mask: u64,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct PageRegion {
    start: u64,
    end: u64,
    categories: u64,
}

/// # Safety
/// `arg` points to the structure `request` expects, live for the call.
unsafe fn ioctl<T>(fd: &impl AsRawFd, request: libc::c_ulong, arg: &mut T) -> io::Result<libc::c_int> {
    // SAFETY: guaranteed by the caller.
    let ret = unsafe { libc::ioctl(fd.as_raw_fd(), request, arg as *mut T) };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

#[cfg(test)]
thread_local! {
    /// Makes this thread's next [`Tracker::grow`] fail, as a refused registration would (the
    /// kernel gives no way to make one fail on demand).
    pub(crate) static FAIL_NEXT_GROW: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Tracks writes to one region of this process's memory.
pub(crate) struct Tracker {
    base: usize,
    len: usize,
    page: usize,
    method: Method,
}

enum Method {
    Uffd { uffd: OwnedFd, pagemap: File },
    Checksums(Vec<u64>),
}

impl Tracker {
    /// Starts tracking `base..base + len` (page aligned, private anonymous memory), with
    /// userfaultfd when the kernel allows, else checksums.
    ///
    /// # Safety
    /// The range stays mapped for the tracker's lifetime and is not used by another tracker.
    pub unsafe fn new(base: *mut u8, len: usize) -> Tracker {
        let page = rustix::param::page_size();
        // SAFETY: forwarded contract.
        let method = match unsafe { Self::uffd(base as usize, len) } {
            Ok(method) => method,
            // SAFETY: forwarded contract.
            Err(_) => Method::Checksums(unsafe { checksums(base as usize, len, page) }),
        };
        Tracker { base: base as usize, len, page, method }
    }

    /// # Safety
    /// As for [`Tracker::new`].
    unsafe fn uffd(base: usize, len: usize) -> io::Result<Method> {
        // SAFETY: a plain system call; it returns a new descriptor we take ownership of.
        let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC | libc::O_NONBLOCK) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a fresh descriptor owned by nobody else.
        let uffd = unsafe { OwnedFd::from_raw_fd(fd as libc::c_int) };
        let mut api = UffdioApi {
            api: UFFD_API,
            features: UFFD_FEATURE_WP_ASYNC | UFFD_FEATURE_WP_UNPOPULATED,
            ioctls: 0,
        };
        // SAFETY: UFFDIO_API takes a uffdio_api.
        unsafe { ioctl(&uffd, UFFDIO_API, &mut api) }?;
        let pagemap = File::open("/proc/self/pagemap")?;
        let method = Method::Uffd { uffd, pagemap };
        // SAFETY: forwarded contract.
        unsafe { register(&method, base, len) }?;
        Ok(method)
    }

    /// What this tracker uses.
    pub fn kind(&self) -> TrackerKind {
        match self.method {
            Method::Uffd { .. } => TrackerKind::UffdPagemapScan,
            Method::Checksums(_) => TrackerKind::Checksums,
        }
    }

    /// Extends tracking to a grown region (`base` unchanged).
    ///
    /// # Safety
    /// `base..base + new_len` is mapped (private anonymous) for the tracker's lifetime.
    pub unsafe fn grow(&mut self, new_len: usize) -> io::Result<()> {
        if new_len <= self.len {
            return Ok(());
        }
        #[cfg(test)]
        if FAIL_NEXT_GROW.take() {
            return Err(io::Error::from_raw_os_error(libc::ENOMEM));
        }
        let (start, extra) = (self.base + self.len, new_len - self.len);
        match &mut self.method {
            // SAFETY: forwarded contract; the new range is not registered yet.
            Method::Uffd { .. } => unsafe { register(&self.method, start, extra) }?,
            // New pages are zero: their checksums are those of zero pages, so writes show.
            Method::Checksums(sums) => {
                let zero = xxh3_64(&vec![0u8; self.page]);
                sums.resize(new_len / self.page, zero);
            }
        }
        self.len = new_len;
        Ok(())
    }

    /// The pages (indices from `base`) written since the previous call, and re-arms tracking.
    pub fn take_dirty(&mut self) -> io::Result<Vec<u64>> {
        let (base, len, page) = (self.base, self.len, self.page);
        match &mut self.method {
            Method::Uffd { pagemap, .. } => {
                let mut dirty = Vec::new();
                let mut regions = vec![PageRegion::default(); 512];
                let mut start = base as u64;
                let end = (base + len) as u64;
                while start < end {
                    let mut arg = PmScanArg {
                        size: std::mem::size_of::<PmScanArg>() as u64,
                        flags: PM_SCAN_WP_MATCHING | PM_SCAN_CHECK_WPASYNC,
                        start,
                        end,
                        walk_end: 0,
                        vec: regions.as_mut_ptr() as u64,
                        vec_len: regions.len() as u64,
                        max_pages: 0,
                        category_inverted: 0,
                        category_mask: PAGE_IS_WRITTEN,
                        category_anyof_mask: 0,
                        return_mask: PAGE_IS_WRITTEN,
                    };
                    // SAFETY: PAGEMAP_SCAN takes a pm_scan_arg whose `vec` points to `vec_len`
                    // page_region entries; `regions` lives across the call.
                    let filled = unsafe { ioctl(pagemap, PAGEMAP_SCAN, &mut arg) }? as usize;
                    for r in &regions[..filled] {
                        dirty.extend(
                            (r.start - base as u64) / page as u64..(r.end - base as u64) / page as u64,
                        );
                    }
                    if arg.walk_end <= start {
                        break;
                    }
                    start = arg.walk_end;
                }
                Ok(dirty)
            }
            Method::Checksums(sums) => {
                let mut dirty = Vec::new();
                for (i, sum) in sums.iter_mut().enumerate() {
                    // SAFETY: page i lies inside the tracked, mapped region.
                    let bytes = unsafe { std::slice::from_raw_parts((base + i * page) as *const u8, page) };
                    let now = xxh3_64(bytes);
                    if now != *sum {
                        *sum = now;
                        dirty.push(i as u64);
                    }
                }
                Ok(dirty)
            }
        }
    }
}

/// Registers `start..start + len` with the userfaultfd and write-protects it.
///
/// # Safety
/// The range is mapped private anonymous memory.
unsafe fn register(method: &Method, start: usize, len: usize) -> io::Result<()> {
    let Method::Uffd { uffd, .. } = method else { return Ok(()) };
    let range = || UffdioRange { start: start as u64, len: len as u64 };
    let mut reg = UffdioRegister { range: range(), mode: UFFDIO_REGISTER_MODE_WP, ioctls: 0 };
    // SAFETY: UFFDIO_REGISTER takes a uffdio_register; the range is ours (caller's contract).
    unsafe { ioctl(uffd, UFFDIO_REGISTER, &mut reg) }?;
    let mut wp = UffdioWriteprotect { range: range(), mode: UFFDIO_WRITEPROTECT_MODE_WP };
    // SAFETY: UFFDIO_WRITEPROTECT takes a uffdio_writeprotect over the registered range.
    unsafe { ioctl(uffd, UFFDIO_WRITEPROTECT, &mut wp) }?;
    Ok(())
}

/// # Safety
/// `base..base + len` is mapped and readable.
unsafe fn checksums(base: usize, len: usize, page: usize) -> Vec<u64> {
    (0..len / page)
        .map(|i| {
            // SAFETY: guaranteed by the caller.
            xxh3_64(unsafe { std::slice::from_raw_parts((base + i * page) as *const u8, page) })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn region(len: usize) -> *mut u8 {
        // SAFETY: a fresh private anonymous mapping chosen by the kernel.
        unsafe {
            rustix::mm::mmap_anonymous(
                std::ptr::null_mut(),
                len,
                rustix::mm::ProtFlags::READ | rustix::mm::ProtFlags::WRITE,
                rustix::mm::MapFlags::PRIVATE,
            )
        }
        .expect("mmap")
        .cast()
    }

    fn check(mut tracker: Tracker, base: *mut u8) {
        let page = rustix::param::page_size();
        assert_eq!(tracker.take_dirty().unwrap(), Vec::<u64>::new(), "{:?}", tracker.kind());
        // SAFETY: offsets inside the 64-page region.
        unsafe {
            *base.add(3 * page + 10) = 1;
            *base.add(3 * page + 20) = 2;
            *base.add(40 * page) = 3;
        }
        assert_eq!(tracker.take_dirty().unwrap(), vec![3, 40], "{:?}", tracker.kind());
        assert_eq!(tracker.take_dirty().unwrap(), Vec::<u64>::new());
        // SAFETY: inside the region.
        unsafe { *base.add(3 * page) = 9 };
        assert_eq!(tracker.take_dirty().unwrap(), vec![3], "re-armed after a scan");
    }

    #[test]
    fn the_kernel_tracker_reports_exactly_the_written_pages() {
        let page = rustix::param::page_size();
        let base = region(64 * page);
        // SAFETY: the region is mapped for the rest of the test.
        let tracker = unsafe { Tracker::new(base, 64 * page) };
        println!("tracker: {}", tracker.kind());
        check(tracker, base);
    }

    #[test]
    fn the_checksum_tracker_reports_exactly_the_written_pages() {
        let page = rustix::param::page_size();
        let base = region(64 * page);
        // SAFETY: the region is mapped for the rest of the test.
        let sums = unsafe { checksums(base as usize, 64 * page, page) };
        check(Tracker { base: base as usize, len: 64 * page, page, method: Method::Checksums(sums) }, base);
    }
}
