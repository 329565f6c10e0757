//! Appends and group commit.
//!
//! An appender copies its record to the tail under the writer's mutex (cached stores, no
//! flush) and then waits until a commit covers it. One thread at a time leads a commit: it
//! takes every range written so far, writes them back and fences once (on a FAMS pool: one
//! sync). The others wait on a condition variable and all wake when it ends: those it covered
//! return, and the first that it did not leads the next commit, for everything written
//! meanwhile. So one fence or one msync serves every record that arrived while the previous
//! one ran.

use std::sync::atomic::Ordering;

use super::core::{lock, new_segment, FirstAppend, LogCore, Seg, Writer};
use super::layout::*;
use super::{LogError, Result};
use crate::heap::Heap;
use crate::persist::Domain;

/// Commits shorter than this are waited for by spinning, longer ones by sleeping.
const SPIN_FOR: std::time::Duration = std::time::Duration::from_micros(20);

impl LogCore {
    /// Appends one record and returns its LSN once it is durable.
    pub(crate) fn append<D: Domain>(&self, heap: &Heap<D>, payload: &[u8]) -> Result<u64> {
        let (lsn, end) = self.write(heap, payload)?;
        self.commit(heap, end)?;
        Ok(lsn)
    }

    /// Copies one record to the tail; returns its LSN and the LSN after it. Durable only
    /// after a [`commit`](LogCore::commit) up to that end.
    pub(crate) fn write<D: Domain>(&self, heap: &Heap<D>, payload: &[u8]) -> Result<(u64, u64)> {
        self.write_parts(heap, &[payload]).map(|(lsn, end, _)| (lsn, end))
    }

    /// [`write`](LogCore::write) of the payload made of `parts`, back to back (no copy to
    /// join them); also returns the record's pool offset.
    pub(crate) fn write_parts<D: Domain>(&self, heap: &Heap<D>, parts: &[&[u8]]) -> Result<(u64, u64, u64)> {
        let len: usize = parts.iter().map(|p| p.len()).sum();
        if len > MAX_RECORD {
            return Err(LogError::TooLarge { len, max: MAX_RECORD });
        }
        self.check_failed()?;
        let pool = heap.raw_pool();
        let _gate = pool.enter_writer();
        let mut w = lock(&self.writer);
        let size = record_size(len);
        let fresh = w.first == FirstAppend::NewSegment;
        if fresh || w.tail + size > w.seg.end() {
            self.switch(heap, &mut w, size)?;
        } else if w.first == FirstAppend::ClearMark {
            // The next crash must not take this run's tail segment for a cleanly closed one.
            pool.store_u64(self.root + ROOT_CLOSED, 0, Ordering::Release)?;
            pool.persist(self.root + ROOT_CLOSED, 8)?;
            w.first = FirstAppend::Done;
        }
        debug_assert_eq!(w.first, FirstAppend::Done);
        let lsn = w.tail;
        let at = w.seg.at(lsn);
        let mut small = [0u8; 256];
        if size as usize <= small.len() {
            // A small record is assembled on the stack (its check hashed in one pass) and
            // copied in one store sequence.
            let start = RECORD_HEADER as usize;
            let mut to = start;
            for part in parts {
                small[to..to + part.len()].copy_from_slice(part);
                to += part.len();
            }
            let header = record_header(lsn, w.seg.tag, &[&small[start..to]]);
            small[..start].copy_from_slice(&header);
            pool.write_bytes(at, &small[..size as usize])?;
        } else {
            pool.write_bytes(at, &record_header(lsn, w.seg.tag, parts))?;
            let mut to = at + RECORD_HEADER;
            for part in parts {
                pool.write_bytes(to, part)?;
                to += part.len() as u64;
            }
            let pad = (size - RECORD_HEADER) as usize - len;
            if pad > 0 {
                pool.write_bytes(to, &[0u8; 8][..pad])?;
            }
        }
        match w.pending.last_mut() {
            Some((start, len)) if *start + *len == at => *len += size,
            _ => w.pending.push((at, size)),
        }
        w.tail += size;
        self.written.store(w.tail, Ordering::Release);
        self.appends.fetch_add(1, Ordering::Relaxed);
        Ok((lsn, w.tail, at))
    }

    /// Returns once every record before `end` is durable, making a batch durable itself if no
    /// other thread is doing so.
    pub(crate) fn commit<D: Domain>(&self, heap: &Heap<D>, end: u64) -> Result<()> {
        loop {
            if self.durable.load(Ordering::Acquire) >= end {
                return Ok(());
            }
            self.check_failed()?;
            // Wait while another thread leads a commit; all waiters wake together when it
            // ends, and the first not covered by it leads the next, for everything written.
            // Where commits are short (a fence on memory), spin through one first: sleeping
            // and waking cost more than the commit itself.
            self.spin_while_leading(end);
            let mut state = lock(&self.leading);
            while state.leading && self.durable.load(Ordering::Acquire) < end && self.failed.get().is_none() {
                state.waiters += 1;
                state = self.commit_done.wait(state).unwrap_or_else(|e| e.into_inner());
                state.waiters -= 1;
            }
            if self.durable.load(Ordering::Acquire) >= end {
                return Ok(());
            }
            self.check_failed()?;
            state.leading = true;
            self.leader_active.store(true, Ordering::Release);
            drop(state);
            let started = std::time::Instant::now();
            let done = self.lead_commit(heap);
            self.last_commit_ns.store(started.elapsed().as_nanos() as u64, Ordering::Relaxed);
            let mut state = lock(&self.leading);
            state.leading = false;
            self.leader_active.store(false, Ordering::Release);
            // A wake-up is a system call: none when nobody waits (one writer).
            let wake = state.waiters > 0;
            drop(state);
            if wake {
                self.commit_done.notify_all();
            }
            done?;
        }
    }

    /// Spins while a commit is being led and `end` is not yet durable, if commits are short
    /// (the last took under [`SPIN_FOR`]), for at most twice that long.
    fn spin_while_leading(&self, end: u64) {
        let last = self.last_commit_ns.load(Ordering::Relaxed);
        if last >= SPIN_FOR.as_nanos() as u64 {
            return;
        }
        let started = std::time::Instant::now();
        let limit = std::time::Duration::from_nanos(2 * last + 1000);
        let mut spins = 0u32;
        while self.leader_active.load(Ordering::Acquire) && self.durable.load(Ordering::Acquire) < end {
            // Yield rather than spin hard: with more threads than cores the leader may need
            // this core to finish.
            std::thread::yield_now();
            spins += 1;
            if spins % 16 == 0 && started.elapsed() > limit {
                return;
            }
        }
    }

    /// Makes everything written so far durable (the leader of a group commit).
    fn lead_commit<D: Domain>(&self, heap: &Heap<D>) -> Result<()> {
        let mut ranges = lock(&self.committer);
        let upto = {
            let mut w = lock(&self.writer);
            ranges.clear();
            std::mem::swap(&mut *ranges, &mut w.pending);
            w.tail
        };
        let pool = heap.raw_pool();
        let done = (|| {
            if pool.is_fams() {
                return pool.sync();
            }
            for &(start, len) in ranges.iter() {
                pool.flush(start, len)?;
            }
            pool.fence()
        })();
        if let Err(e) = done {
            let _ = self.failed.set(e.to_string());
            return Err(e.into());
        }
        self.commits.fetch_add(1, Ordering::Relaxed);
        self.durable.fetch_max(upto, Ordering::AcqRel);
        Ok(())
    }

    /// Starts a new tail segment with room for a record of `size` bytes. Everything written
    /// to the old one is made durable in the same transaction: a crash after it scans only
    /// the new segment and trusts the old one to its end.
    fn switch<D: Domain>(&self, heap: &Heap<D>, w: &mut Writer, size: u64) -> Result<()> {
        let capacity = self.segment_size.max(size);
        let old = w.seg;
        let tail = w.tail;
        // The records a commit in flight may have taken but not yet fenced are written back
        // again here, by this thread, before the commit point.
        let unflushed = self.durable.load(Ordering::Acquire).max(old.start_lsn);
        let clear_mark = w.first != FirstAppend::Done;
        let offset = heap.transaction(|tx| {
            if tail > unflushed {
                tx.flush_on_commit(old.at(unflushed), tail - unflushed)?;
            }
            let offset = new_segment(tx, tail, capacity)?;
            tx.redo_store(old.offset + SEGMENT_NEXT, offset)?;
            tx.redo_store(self.root + ROOT_TAIL_SEGMENT, offset)?;
            if clear_mark {
                tx.redo_store(self.root + ROOT_CLOSED, 0)?;
            }
            Ok::<_, LogError>(offset)
        })?;
        let seg =
            Seg { offset, start_lsn: tail, capacity, tag: super::core::read_segment(heap, offset)?.tag };
        self.chain.write().unwrap_or_else(|e| e.into_inner()).segs.push(seg);
        w.seg = seg;
        w.first = FirstAppend::Done;
        if !heap.raw_pool().is_fams() {
            self.durable.fetch_max(tail, Ordering::AcqRel);
        }
        Ok(())
    }

    /// Commits everything written and marks the log closed at its tail, so the next run may
    /// append to the same segment. A run that never appended writes nothing: the mark stands
    /// as it was (after a crash, the tail segment may hold the crashed run's records past the
    /// tail, and the next run must still start a new one).
    pub(crate) fn close<D: Domain>(&self, heap: &Heap<D>) -> Result<()> {
        let (tail, first) = {
            let w = lock(&self.writer);
            (w.tail, w.first)
        };
        self.commit(heap, tail)?;
        if first != FirstAppend::Done {
            return Ok(());
        }
        // No fence of its own: the mark is only a hint that saves the next run a segment (a
        // mark that is lost makes it start one), and closing the heap makes it durable.
        heap.raw_pool().store_u64(self.root + ROOT_CLOSED, tail + 1, Ordering::Release)?;
        Ok(())
    }
}
