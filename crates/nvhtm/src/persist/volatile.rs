//! The `Volatile` domain: stores only, no write-back, no fences.

use std::sync::atomic::{AtomicU64, Ordering};

use super::{cas_plain, copy_plain, store_plain, Domain, DomainKind, PersistError};

/// No durability at all: for baselines (what persistence costs) and for FAMS pools, whose
/// commit point is `sync()` rather than per-store write-back.
#[derive(Debug, Clone, Copy, Default)]
pub struct Volatile;

impl Domain for Volatile {
    fn kind(&self) -> DomainKind {
        DomainKind::Volatile
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

    #[inline]
    unsafe fn flush(&self, _addr: *const u8, _len: usize) {}

    #[inline]
    fn fence(&self) -> Result<(), PersistError> {
        Ok(())
    }
}
