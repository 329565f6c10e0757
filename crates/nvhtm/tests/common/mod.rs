//! Test helpers shared by several test files.
// Each test crate that includes this module uses only part of it.
#![allow(dead_code)]

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use nvhtm::persist::{Domain, DomainKind, PersistError, Site};
use nvhtm::Volatile;

/// A domain whose fences fail on demand, like an msync that returned EIO. Clones share the
/// setting; by default every fence succeeds.
#[derive(Clone)]
pub struct FailingFence {
    /// Fences that still succeed; `u64::MAX`: all of them.
    fences_left: Arc<AtomicU64>,
    /// Fences before one that panics (once); `u64::MAX`: none.
    fences_before_panic: Arc<AtomicU64>,
}

impl Default for FailingFence {
    fn default() -> FailingFence {
        FailingFence {
            fences_left: Arc::new(AtomicU64::new(u64::MAX)),
            fences_before_panic: Arc::new(AtomicU64::new(u64::MAX)),
        }
    }
}

/// Counts down `n` (`u64::MAX`: never); `None` once it reached zero.
fn count_down(n: u64) -> Option<u64> {
    match n {
        u64::MAX => Some(n),
        0 => None,
        n => Some(n - 1),
    }
}

impl FailingFence {
    /// Lets `n` more fences succeed, then fails every later one.
    pub fn fail_after(&self, n: u64) {
        self.fences_left.store(n, Ordering::SeqCst);
    }

    /// Lets `n` more fences succeed, then panics in the next one (once): a bug striking in the
    /// middle of a protocol.
    pub fn panic_after(&self, n: u64) {
        self.fences_before_panic.store(n, Ordering::SeqCst);
    }

    /// Fences succeed again (the device recovered).
    pub fn recover(&self) {
        self.fences_left.store(u64::MAX, Ordering::SeqCst);
    }
}

impl Domain for FailingFence {
    fn kind(&self) -> DomainKind {
        DomainKind::Msync
    }
    unsafe fn write(&self, dst: *mut u8, src: &[u8]) {
        // SAFETY: forwarded caller contract.
        unsafe { Volatile.write(dst, src) }
    }
    unsafe fn store_u64(&self, dst: *const AtomicU64, value: u64, order: Ordering) {
        // SAFETY: forwarded caller contract.
        unsafe { Volatile.store_u64(dst, value, order) }
    }
    unsafe fn compare_exchange_u64(
        &self,
        d: *const AtomicU64,
        c: u64,
        n: u64,
        o: Ordering,
    ) -> Result<u64, u64> {
        // SAFETY: forwarded caller contract.
        unsafe { Volatile.compare_exchange_u64(d, c, n, o) }
    }
    unsafe fn flush(&self, _: *const u8, _: usize) {}
    #[track_caller]
    fn fence(&self) -> Result<(), PersistError> {
        if self.fences_before_panic.fetch_update(Ordering::SeqCst, Ordering::SeqCst, count_down).is_err() {
            self.fences_before_panic.store(u64::MAX, Ordering::SeqCst);
            panic!("injected panic in a fence");
        }
        match self.fences_left.fetch_update(Ordering::SeqCst, Ordering::SeqCst, count_down) {
            Ok(_) => Ok(()),
            Err(_) => Err(PersistError {
                op: "msync",
                site: Site::caller(),
                source: std::io::Error::from_raw_os_error(5),
            }),
        }
    }
}

/// A linearizability check on one register, for either map: three threads increment a
/// counter with compare-and-swap while two readers watch it. Linearizable operations lose no
/// increment (the final value is the number of successful swaps) and no reader sees the
/// counter go backwards.
pub fn compare_and_swap_is_linearizable<D: Domain>(map: &nvhtm::AnyMap<D>) {
    let read = |map: &nvhtm::AnyMap<D>| -> Vec<u8> { map.get(b"counter").unwrap().unwrap() };
    map.upsert(b"counter", &0u64.to_le_bytes()).unwrap();
    let per_thread = 2000u64;
    std::thread::scope(|s| {
        for _ in 0..3 {
            s.spawn(|| {
                let mut done = 0;
                while done < per_thread {
                    let current = read(map);
                    let next = (u64::from_le_bytes(current.clone().try_into().unwrap()) + 1).to_le_bytes();
                    if map.compare_and_swap(b"counter", Some(&current), Some(&next)).unwrap().is_ok() {
                        done += 1;
                    }
                }
            });
        }
        for _ in 0..2 {
            s.spawn(|| {
                let mut last = 0u64;
                for _ in 0..5000 {
                    let now = u64::from_le_bytes(read(map).try_into().unwrap());
                    assert!(now >= last, "the counter went back from {last} to {now}");
                    last = now;
                }
            });
        }
    });
    let end = u64::from_le_bytes(read(map).try_into().unwrap());
    assert_eq!(end, 3 * per_thread, "increments were lost");
}
