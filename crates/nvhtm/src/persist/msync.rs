//! The `Msync` domain: durability by `msync(MS_SYNC)` of the pages that were flushed.

use std::cell::RefCell;
use std::sync::atomic::{AtomicU64, Ordering};

use super::{cas_plain, copy_plain, counters, store_plain, Domain, DomainKind, PersistError, Site};

thread_local! {
    /// Page ranges this thread flushed since its last fence: `[start, end)` addresses.
    static PENDING: RefCell<Vec<(usize, usize)>> = const { RefCell::new(Vec::new()) };
}

/// Durability on ordinary files: `flush` records the covering pages, `fence` syncs every page
/// this thread recorded with as few `msync` calls as the ranges allow (adjacent and overlapping
/// ranges are merged), so several flushes followed by one fence are one batched sync.
#[derive(Debug, Clone, Copy)]
pub struct Msync {
    page: usize,
}

impl Msync {
    /// A domain for mappings with the system page size.
    pub fn new() -> Msync {
        Msync { page: rustix::param::page_size() }
    }
}

impl Default for Msync {
    fn default() -> Msync {
        Msync::new()
    }
}

/// Sorts and merges overlapping or touching ranges.
fn coalesce(ranges: &mut Vec<(usize, usize)>) {
    ranges.sort_unstable();
    let mut merged: Vec<(usize, usize)> = Vec::with_capacity(ranges.len());
    for &(start, end) in ranges.iter() {
        match merged.last_mut() {
            Some(last) if start <= last.1 => last.1 = last.1.max(end),
            _ => merged.push((start, end)),
        }
    }
    *ranges = merged;
}

impl Domain for Msync {
    fn kind(&self) -> DomainKind {
        DomainKind::Msync
    }

    #[inline]
    unsafe fn write(&self, dst: *mut u8, src: &[u8]) {
        // SAFETY: forwarded caller contract.
        unsafe { copy_plain(dst, src) }
    }

    #[inline]
    unsafe fn store_u64(&self, dst: *const AtomicU64, value: u64, order: Ordering) {
        // SAFETY: forwarded caller contract.
        unsafe { store_plain(dst, value, order) }
    }

    #[inline]
    unsafe fn compare_exchange_u64(
        &self,
        dst: *const AtomicU64,
        current: u64,
        new: u64,
        order: Ordering,
    ) -> Result<u64, u64> {
        // SAFETY: forwarded caller contract.
        unsafe { cas_plain(dst, current, new, order) }
    }

    #[track_caller]
    unsafe fn flush(&self, addr: *const u8, len: usize) {
        if len == 0 {
            return;
        }
        let start = addr as usize & !(self.page - 1);
        let end = (addr as usize + len).next_multiple_of(self.page);
        PENDING.with(|p| p.borrow_mut().push((start, end)));
        counters::add_lines(super::line_count(addr, len));
    }

    #[track_caller]
    fn fence(&self) -> Result<(), PersistError> {
        let site = Site::caller();
        let mut ranges = PENDING.with(|p| std::mem::take(&mut *p.borrow_mut()));
        coalesce(&mut ranges);
        counters::add_fence();
        for (start, end) in ranges {
            counters::add_syncs(1);
            // SAFETY: the range was recorded by `flush`, whose caller promised it lies inside a
            // live mapping; msync neither reads nor writes the memory itself.
            unsafe { rustix::mm::msync(start as *mut _, end - start, rustix::mm::MsyncFlags::SYNC) }
                .map_err(|e| PersistError { op: "msync", site, source: e.into() })?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn coalesces_overlapping_and_adjacent_ranges() {
        let mut r = vec![(8192, 12288), (0, 4096), (4096, 8192), (20480, 24576), (0, 4096)];
        coalesce(&mut r);
        assert_eq!(r, vec![(0, 12288), (20480, 24576)]);
    }
}
