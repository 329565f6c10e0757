//! A domain chosen at run time from what the pool's mapping turned out to be.

use std::sync::atomic::{AtomicU64, Ordering};

use super::{Cpu, Domain, DomainKind, Msync, PersistError, Volatile};

/// One of the production domains, picked when a pool is opened (see
/// [`crate::pool::Mode::Auto`]): `Cpu` on DAX and `/dev/shm`, `Msync` on ordinary files.
#[derive(Debug, Clone)]
pub enum AutoDomain {
    /// Cache-line write-back.
    Cpu(Cpu),
    /// Page sync.
    Msync(Msync),
    /// No durability.
    Volatile(Volatile),
}

macro_rules! dispatch {
    ($self:ident, $d:ident => $e:expr) => {
        match $self {
            AutoDomain::Cpu($d) => $e,
            AutoDomain::Msync($d) => $e,
            AutoDomain::Volatile($d) => $e,
        }
    };
}

impl Domain for AutoDomain {
    fn kind(&self) -> DomainKind {
        dispatch!(self, d => d.kind())
    }

    #[inline]
    unsafe fn write(&self, dst: *mut u8, src: &[u8]) {
        // SAFETY: forwarded caller contract.
        dispatch!(self, d => unsafe { d.write(dst, src) })
    }

    #[inline]
    #[track_caller]
    unsafe fn write_persistent(&self, dst: *mut u8, src: &[u8]) {
        // SAFETY: forwarded caller contract.
        dispatch!(self, d => unsafe { d.write_persistent(dst, src) })
    }

    #[inline]
    unsafe fn store_u64(&self, dst: *const AtomicU64, value: u64, order: Ordering) {
        // SAFETY: forwarded caller contract.
        dispatch!(self, d => unsafe { d.store_u64(dst, value, order) })
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
        dispatch!(self, d => unsafe { d.compare_exchange_u64(dst, current, new, order) })
    }

    #[inline]
    #[track_caller]
    unsafe fn flush(&self, addr: *const u8, len: usize) {
        // SAFETY: forwarded caller contract.
        dispatch!(self, d => unsafe { d.flush(addr, len) })
    }

    #[inline]
    #[track_caller]
    fn fence(&self) -> Result<(), PersistError> {
        dispatch!(self, d => d.fence())
    }
}
