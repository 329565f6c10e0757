//! Epochs in DRAM: which epoch is current, which operations still run in an epoch, and what
//! each epoch dirtied and retired.
//!
//! An operation *enters* the current epoch by announcing it in a slot (one per concurrent
//! thread, each on its own cache line) and re-checking that the epoch did not move meanwhile;
//! the persister moves the epoch forward and then waits until no slot announces the old one
//! (sequentially consistent on both sides, so an operation either sees the new epoch or is
//! seen by the wait). An operation therefore never spans an epoch boundary, and everything it
//! recorded in its slot's log is there when the persister collects the old epoch.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};

/// Slots: more than the threads that run operations at once (a thread finding every slot
/// busy waits for one).
const SLOTS: usize = 64;

/// What one epoch's operations left for the persister: the ranges to write back, and the
/// blocks that left their buckets (reusable once the epoch after is durable).
#[derive(Debug, Default)]
pub(super) struct EpochLog {
    pub epoch: u64,
    pub dirty: Vec<(u64, u64)>,
    pub retired: Vec<u64>,
}

#[repr(align(64))]
#[derive(Debug, Default)]
struct Slot {
    /// The epoch the operation in this slot runs in; 0 when free.
    active: AtomicU64,
    /// Logs of the epochs not yet collected, oldest first.
    logs: Mutex<Vec<EpochLog>>,
}

#[derive(Debug)]
pub(super) struct Epochs {
    current: AtomicU64,
    slots: Box<[Slot]>,
    /// Whether an operation entered since the last advance (the persister skips idle periods).
    busy: AtomicU64,
}

thread_local! {
    /// The slot this thread used last (any map): tried first.
    static PREFERRED: std::cell::Cell<usize> = const { std::cell::Cell::new(usize::MAX) };
}

impl Epochs {
    pub fn new(current: u64) -> Epochs {
        Epochs {
            current: AtomicU64::new(current),
            slots: (0..SLOTS).map(|_| Slot::default()).collect(),
            busy: 0.into(),
        }
    }

    pub fn current(&self) -> u64 {
        self.current.load(Ordering::SeqCst)
    }

    /// Enters the current epoch; the guard leaves it.
    pub fn enter(&self) -> Guard<'_> {
        let mut at = PREFERRED.with(|p| p.get());
        if at >= SLOTS {
            at = fastrand::usize(..SLOTS);
        }
        let mut tries = 0usize;
        loop {
            let epoch = self.current();
            let slot = &self.slots[at];
            if slot.active.compare_exchange(0, epoch, Ordering::SeqCst, Ordering::Relaxed).is_ok() {
                if self.current() == epoch {
                    PREFERRED.with(|p| p.set(at));
                    if self.busy.load(Ordering::Relaxed) == 0 {
                        self.busy.store(1, Ordering::Relaxed);
                    }
                    return Guard { epochs: self, slot: at, epoch };
                }
                // The epoch moved between the read and the announcement: announce the new one.
                slot.active.store(0, Ordering::SeqCst);
                continue;
            }
            at = (at + 1) % SLOTS;
            tries += 1;
            if tries % SLOTS == 0 {
                std::thread::yield_now();
            }
        }
    }

    /// Makes `next` the current epoch (the persister only, one step at a time).
    pub fn set_current(&self, next: u64) {
        debug_assert_eq!(next, self.current() + 1, "epochs advance one at a time");
        self.current.store(next, Ordering::SeqCst);
    }

    /// Whether an operation entered since the last call.
    pub fn take_busy(&self) -> bool {
        self.busy.swap(0, Ordering::Relaxed) != 0
    }

    /// Waits until no operation runs in `epoch` or before.
    pub fn drain(&self, epoch: u64) {
        for slot in self.slots.iter() {
            let mut spins = 0u32;
            loop {
                let active = slot.active.load(Ordering::SeqCst);
                if active == 0 || active > epoch {
                    break;
                }
                spins += 1;
                if spins > 64 {
                    std::thread::yield_now();
                } else {
                    std::hint::spin_loop();
                }
            }
        }
    }

    /// Takes every log of `epoch` and earlier (after [`drain`](Epochs::drain)ing it).
    pub fn collect(&self, epoch: u64) -> EpochLog {
        let mut all = EpochLog { epoch, ..EpochLog::default() };
        for slot in self.slots.iter() {
            let mut logs = lock(&slot.logs);
            let keep = logs.iter().position(|l| l.epoch > epoch).unwrap_or(logs.len());
            for log in logs.drain(..keep) {
                all.dirty.extend(log.dirty);
                all.retired.extend(log.retired);
            }
        }
        all
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// An operation running in an epoch: the epoch cannot complete while this lives.
#[derive(Debug)]
pub(super) struct Guard<'a> {
    epochs: &'a Epochs,
    slot: usize,
    epoch: u64,
}

impl Guard<'_> {
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// This epoch's log in this slot.
    pub fn log(&self) -> LogRef<'_> {
        let mut logs = lock(&self.epochs.slots[self.slot].logs);
        if logs.last().is_none_or(|l| l.epoch != self.epoch) {
            logs.push(EpochLog { epoch: self.epoch, ..EpochLog::default() });
        }
        LogRef(logs)
    }
}

/// The guard's epoch log, locked.
pub(super) struct LogRef<'a>(MutexGuard<'a, Vec<EpochLog>>);

impl LogRef<'_> {
    pub fn dirty(&mut self, offset: u64, len: u64) {
        self.0.last_mut().unwrap().dirty.push((offset, len));
    }

    pub fn retire(&mut self, block: u64) {
        self.0.last_mut().unwrap().retired.push(block);
    }
}

impl Drop for Guard<'_> {
    fn drop(&mut self) {
        self.epochs.slots[self.slot].active.store(0, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_operation_holds_its_epoch_until_it_ends() {
        let epochs = Epochs::new(3);
        let guard = epochs.enter();
        assert_eq!(guard.epoch(), 3);
        guard.log().dirty(64, 8);
        guard.log().retire(4096);
        epochs.set_current(4);
        let drained = std::sync::atomic::AtomicBool::new(false);
        std::thread::scope(|s| {
            s.spawn(|| {
                epochs.drain(3);
                drained.store(true, Ordering::SeqCst);
            });
            // The drain cannot finish while the guard lives.
            assert!(!drained.load(Ordering::SeqCst));
            drop(guard);
        });
        assert!(drained.load(Ordering::SeqCst));
        assert_eq!(epochs.enter().epoch(), 4);
        let log = epochs.collect(3);
        assert_eq!((log.dirty, log.retired), (vec![(64, 8)], vec![4096]));
        assert!(epochs.collect(3).dirty.is_empty());
    }
}
