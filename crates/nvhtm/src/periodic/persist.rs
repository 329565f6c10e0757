//! The epoch boundary: write back what an epoch dirtied, then record it durable; `sync`; the
//! persister thread.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use super::*;

impl<D: Domain> Inner<D> {
    /// Ends the current epoch `e`: makes `e + 1` current, waits until no operation runs in `e`,
    /// writes back every range the operations of `e` (and any earlier, uncollected) dirtied
    /// and fences, then persists `e` as the durable epoch. Blocks that left their buckets in
    /// `e - 1` become reusable (`e` is durable: no crash needs them, and every reader that
    /// could have seen them ran in `e` or before). Returns the epoch made durable.
    pub(super) fn advance(&self) -> Result<u64> {
        let _one = lock(&self.advancing);
        let e = self.epochs.current();
        self.epochs.set_current(e + 1);
        self.epochs.drain(e);
        let mut log = self.epochs.collect(e);
        let pool = self.heap.raw_pool();
        // A bucket written many times in the epoch logged its line each time: each line is
        // written back once.
        for (offset, len) in crate::heap::dirty_lines(&mut log.dirty) {
            pool.flush(offset, len)?;
        }
        if !log.dirty.is_empty() {
            pool.fence()?; // site: epoch-write-back
        }
        debug_assert!(self.durable.load(Ordering::SeqCst) < e, "epoch {e} made durable twice");
        pool.store_u64(self.root + ROOT_DURABLE, e, Ordering::Release)?;
        pool.flush(self.root + ROOT_DURABLE, 8)?;
        pool.fence()?; // site: epoch-durable
        if pool.is_fams() {
            pool.sync()?;
        }
        self.durable.store(e, Ordering::SeqCst);
        let mut pending = lock(&self.pending);
        let ready = pending.iter().take_while(|(epoch, _)| *epoch < e).count();
        for (_, blocks) in pending.drain(..ready) {
            for block in blocks {
                self.arena.free(block)?;
            }
        }
        if !log.retired.is_empty() {
            pending.push((e, log.retired));
        }
        Ok(e)
    }

    /// Blocks until every operation that completed before the call is durable.
    pub(super) fn sync(&self) -> Result<()> {
        let target = self.epochs.current();
        while self.durable.load(Ordering::SeqCst) < target {
            self.advance()?;
        }
        Ok(())
    }
}

impl<D: Domain> PeriodicMap<D> {
    /// Ends the current epoch now (what the persister thread does each period): waits for its
    /// operations, writes back what they dirtied, and records it durable. Returns that epoch.
    pub fn advance(&self) -> Result<u64> {
        self.inner.advance()
    }

    /// Blocks until every operation that completed before the call is durable (at most two
    /// epoch advances; none when the persister has got there already).
    pub fn sync(&self) -> Result<()> {
        self.inner.sync()
    }

    /// The current epoch and the last durable one.
    pub fn epochs(&self) -> (u64, u64) {
        (self.inner.epochs.current(), self.inner.durable.load(Ordering::SeqCst))
    }
}

/// The persister thread: advances the epoch every period in which an operation ran.
pub(super) struct Persister {
    stop: Arc<(Mutex<bool>, Condvar)>,
    thread: JoinHandle<Result<()>>,
}

impl Persister {
    pub fn start<D: Domain>(inner: Arc<Inner<D>>, period: Duration) -> Persister {
        let stop = Arc::new((Mutex::new(false), Condvar::new()));
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name("nvhtm-persister".into())
            .spawn(move || {
                // The thread's persistence counters now, not at its first fence (an
                // allocation in the middle of whatever the map's users are doing).
                let _ = crate::persist::thread_stats();
                let (stopped, wake) = &*flag;
                let mut stopped = lock(stopped);
                loop {
                    stopped = wake.wait_timeout(stopped, period).unwrap_or_else(|e| e.into_inner()).0;
                    if *stopped {
                        return inner.sync();
                    }
                    if inner.epochs.take_busy() {
                        drop(stopped);
                        inner.advance()?;
                        stopped = lock(&flag.0);
                    }
                }
            })
            .expect("spawning the persister thread");
        Persister { stop, thread }
    }

    /// Stops the thread after a last sync; its error, if any advance failed.
    pub fn stop(self) -> Result<()> {
        *lock(&self.stop.0) = true;
        self.stop.1.notify_all();
        self.thread.join().unwrap_or_else(|_| Err(MapError::Corrupt("the persister panicked".into())))
    }
}
