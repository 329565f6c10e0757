//! Typed offset pointers into a pool.

use std::fmt;
use std::marker::PhantomData;

use bytemuck::{Pod, Zeroable};

/// A typed pointer into a pool, stored as the offset from the pool's start. Valid across runs
/// and address spaces; offset 0 (inside the header) is null.
#[repr(transparent)]
pub struct PPtr<T> {
    offset: u64,
    _type: PhantomData<fn() -> T>,
}

impl<T> PPtr<T> {
    /// The null pointer.
    pub const fn null() -> PPtr<T> {
        PPtr::new(0)
    }

    /// A pointer to the object at `offset`.
    pub const fn new(offset: u64) -> PPtr<T> {
        PPtr { offset, _type: PhantomData }
    }

    /// The offset from the start of the pool.
    pub const fn offset(self) -> u64 {
        self.offset
    }

    /// Whether this is the null pointer.
    pub const fn is_null(self) -> bool {
        self.offset == 0
    }

    /// The same address as another type.
    pub const fn cast<U>(self) -> PPtr<U> {
        PPtr::new(self.offset)
    }
}

impl<T> Clone for PPtr<T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for PPtr<T> {}
impl<T> PartialEq for PPtr<T> {
    fn eq(&self, other: &Self) -> bool {
        self.offset == other.offset
    }
}
impl<T> Eq for PPtr<T> {}
impl<T> std::hash::Hash for PPtr<T> {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.offset.hash(state)
    }
}
impl<T> fmt::Debug for PPtr<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PPtr<{}>({:#x})", std::any::type_name::<T>(), self.offset)
    }
}

// SAFETY: PPtr is a transparent u64 (PhantomData is zero-sized), so all-zero bits are valid.
unsafe impl<T: 'static> Zeroable for PPtr<T> {}
// SAFETY: PPtr is a transparent u64: no padding, every bit pattern valid, no interior pointer
// into the process (it is an offset), so it may live in persistent memory.
unsafe impl<T: 'static> Pod for PPtr<T> {}
