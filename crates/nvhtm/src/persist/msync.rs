//! The `Msync` domain: durability by `msync(MS_SYNC)` of the pages that were flushed.

use std::cell::RefCell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};

use super::{cas_plain, copy_plain, counters, store_plain, Domain, DomainKind, PersistError, Site};

/// The identity of one `Msync` domain, shared by its clones.
#[derive(Debug)]
struct Owner;

/// The page ranges one domain's flushes on this thread recorded since its last fence here.
struct Pending {
    /// The domain. While this `Weak` lives, its allocation is not reused, so the address it
    /// points to identifies the domain; once the domain is dropped, its ranges are discarded.
    owner: Weak<Owner>,
    /// `[start, end)` addresses.
    ranges: Vec<(usize, usize)>,
}

thread_local! {
    /// This thread's pending ranges, per domain (one entry per domain it flushed for).
    static PENDING: RefCell<Vec<Pending>> = const { RefCell::new(Vec::new()) };
}

/// Durability on ordinary files: `flush` records the covering pages, `fence` syncs every page
/// this thread recorded *for this domain* with as few `msync` calls as the ranges allow
/// (adjacent and overlapping ranges are merged), so several flushes followed by one fence are
/// one batched sync.
///
/// Pending ranges belong to the thread and the domain (each pool has its own): one pool's
/// fence never syncs another pool's ranges, so ranges left behind by a pool that was dropped
/// (its mapping gone) cannot fail an innocent pool's fence. Clones are the same domain.
#[derive(Debug, Clone)]
pub struct Msync {
    page: usize,
    owner: Arc<Owner>,
}

impl Msync {
    /// A new domain for mappings with the system page size.
    pub fn new() -> Msync {
        Msync { page: rustix::param::page_size(), owner: Arc::new(Owner) }
    }

    /// Whether `pending` holds this domain's ranges.
    fn owns(&self, pending: &Pending) -> bool {
        pending.owner.as_ptr() == Arc::as_ptr(&self.owner)
    }

    /// This domain's ranges in a thread's list, added on first use (discarding then the ranges
    /// of domains dropped since: their mappings are gone, there is nothing left to sync).
    fn ranges<'a>(&self, list: &'a mut Vec<Pending>) -> &'a mut Vec<(usize, usize)> {
        let at = match list.iter().position(|p| self.owns(p)) {
            Some(at) => at,
            None => {
                list.retain(|p| p.owner.strong_count() > 0);
                list.push(Pending { owner: Arc::downgrade(&self.owner), ranges: Vec::new() });
                list.len() - 1
            }
        };
        &mut list[at].ranges
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
        PENDING.with(|p| self.ranges(&mut p.borrow_mut()).push((start, end)));
        counters::add_lines(super::line_count(addr, len));
    }

    #[track_caller]
    fn fence(&self) -> Result<(), PersistError> {
        let site = Site::caller();
        let mut ranges = PENDING.with(|p| {
            let mut list = p.borrow_mut();
            list.iter_mut().find(|p| self.owns(p)).map(|p| std::mem::take(&mut p.ranges)).unwrap_or_default()
        });
        coalesce(&mut ranges);
        counters::add_fence();
        for (start, end) in ranges {
            counters::add_syncs(1);
            // SAFETY: the range was recorded by this domain's `flush`, whose caller promised it
            // lies inside a live mapping (the pool's, which lives as long as its domain); msync
            // neither reads nor writes the memory itself.
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

    #[test]
    fn a_dropped_domains_ranges_are_discarded_not_kept_or_synced() {
        let buf = [0u8; 64];
        let gone = Msync::new();
        // SAFETY: `buf` is live memory; nothing is synced.
        unsafe { gone.flush(buf.as_ptr(), buf.len()) };
        drop(gone);
        let live = Msync::new();
        // SAFETY: as above.
        unsafe { live.flush(buf.as_ptr(), buf.len()) };
        let owners = PENDING.with(|p| p.borrow().iter().map(|p| live.owns(p)).collect::<Vec<_>>());
        assert_eq!(owners, vec![true], "only the live domain's ranges remain");
        PENDING.with(|p| p.borrow_mut().clear());
    }
}
