//! The log's state in DRAM over its bytes in the pool: the segment chain, the recovery scan,
//! reads, and truncation. Appends and group commit are in `append.rs`.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, OnceLock, RwLock};

use super::layout::*;
use super::{LogError, Result};
use crate::heap::{Heap, Tx};
use crate::persist::Domain;

/// One segment, as the chain knows it.
#[derive(Debug, Clone, Copy)]
pub(super) struct Seg {
    pub offset: u64,
    pub start_lsn: u64,
    pub capacity: u64,
    pub tag: u32,
}

impl Seg {
    /// The pool offset of the byte at `lsn` (which lies in this segment).
    pub fn at(&self, lsn: u64) -> u64 {
        debug_assert!(lsn >= self.start_lsn && lsn <= self.start_lsn + self.capacity);
        self.offset + SEGMENT_HEADER + (lsn - self.start_lsn)
    }

    pub fn end(&self) -> u64 {
        self.start_lsn + self.capacity
    }
}

/// The live segments, head first; the last is the tail segment.
#[derive(Debug)]
pub(super) struct Chain {
    pub segs: Vec<Seg>,
    pub head_lsn: u64,
}

impl Chain {
    /// The index of the segment holding `lsn` (the last one starting at or before it).
    fn find(&self, lsn: u64) -> usize {
        self.segs.partition_point(|s| s.start_lsn <= lsn).saturating_sub(1)
    }

    /// Where the records of segment `i` end, given the durable tail.
    fn end_of(&self, i: usize, durable: u64) -> u64 {
        self.segs.get(i + 1).map_or(durable, |next| next.start_lsn)
    }
}

/// The writer's position, under its mutex.
#[derive(Debug)]
pub(super) struct Writer {
    /// The LSN the next record gets.
    pub tail: u64,
    /// The tail segment.
    pub seg: Seg,
    /// What the first append of this run must do first.
    pub first: FirstAppend,
    /// Pool ranges written and not yet taken by a commit (contiguous ones merged).
    pub pending: Vec<(u64, u64)>,
}

/// The group commit's state (under its mutex).
#[derive(Debug, Default)]
pub(super) struct Leading {
    pub leading: bool,
    pub waiters: u32,
}

/// The first append of a run after opening.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum FirstAppend {
    /// Already done.
    Done,
    /// Clear the closed mark (the log was closed cleanly at the tail found).
    ClearMark,
    /// Start a new segment: the tail segment may hold a crashed run's records past the tail.
    NewSegment,
}

/// A log: its root in the pool and its DRAM state. The heap is passed in, so a log can live
/// inside another structure (the queue, the hybrid map) as well as on its own.
#[derive(Debug)]
pub(crate) struct LogCore {
    pub(super) root: u64,
    pub(crate) segment_size: u64,
    pub(super) chain: RwLock<Chain>,
    pub(super) writer: Mutex<Writer>,
    /// Every record below this LSN is durable; readers see no further.
    pub(super) durable: AtomicU64,
    /// The end of the records written (durable or not).
    pub(super) written: AtomicU64,
    /// The chain's head LSN, readable without its lock (set with it).
    pub(super) head: AtomicU64,
    /// Whether a thread is leading a commit, and how many wait for it to end
    /// (`commit_done`).
    pub(super) leading: Mutex<Leading>,
    pub(super) commit_done: Condvar,
    /// `leading.leading`, readable without the lock (for spinning waiters).
    pub(super) leader_active: AtomicBool,
    /// How long the last commit took (decides whether waiters spin or sleep).
    pub(super) last_commit_ns: AtomicU64,
    /// The leader's batch of ranges (a buffer swapped with the writer's, so neither allocates
    /// once warm).
    pub(super) committer: Mutex<Vec<(u64, u64)>>,
    /// Set when a commit failed: the log refuses further appends.
    pub(super) failed: OnceLock<String>,
    /// Held by a truncation: their transactions move the head in order.
    pub(super) truncator: Mutex<()>,
    pub(crate) appends: AtomicU64,
    pub(crate) commits: AtomicU64,
}

pub(super) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn corrupt(what: String) -> LogError {
    LogError::Corrupt(what)
}

impl LogCore {
    /// Lays out a new log at `root` (64 zeroed bytes the caller allocated) inside `tx`.
    pub(crate) fn format<D: Domain>(tx: &mut Tx<'_, D>, root: u64, segment_size: u64) -> Result<()> {
        let segment_size = segment_size.max(MIN_SEGMENT_SIZE).next_multiple_of(8);
        let first = new_segment(tx, 0, segment_size)?;
        let r = LogRoot {
            magic: LOG_MAGIC,
            segment_size,
            head_segment: first,
            head_lsn: 0,
            tail_segment: first,
            // A new segment's tag is new: nothing past LSN 0 can check.
            closed: 1,
            to_free: 0,
            spare: 0,
        };
        tx.write_bytes(root, bytemuck::bytes_of(&r))?;
        Ok(())
    }

    /// Opens the log at `root`: finishes a truncation's frees if a crash interrupted them,
    /// walks the chain and scans the tail segment for the tail.
    pub(crate) fn open<D: Domain>(heap: &Heap<D>, root: u64) -> Result<LogCore> {
        let pool = heap.raw_pool();
        let r: LogRoot = pool.read(root)?;
        if r.magic != LOG_MAGIC {
            return Err(LogError::NotALog(format!("the log root starts with {:#018x}", r.magic)));
        }
        if r.segment_size < MIN_SEGMENT_SIZE || r.segment_size > MAX_RECORD as u64 * 2 {
            return Err(corrupt(format!("segment size {}", r.segment_size)));
        }
        if r.to_free != 0 {
            finish_frees(heap, root, r.head_segment)?;
        }
        let segs = walk(heap, &r)?;
        let tail_seg = *segs.last().expect("a chain has a segment");
        if tail_seg.offset != r.tail_segment {
            return Err(corrupt(format!(
                "the chain ends at {:#x}, the root names {:#x} as the tail segment",
                tail_seg.offset, r.tail_segment
            )));
        }
        let tail = scan(heap, &tail_seg)?;
        if r.head_lsn < segs[0].start_lsn || r.head_lsn > tail {
            return Err(corrupt(format!(
                "head LSN {} outside the records {}..{tail}",
                r.head_lsn, segs[0].start_lsn
            )));
        }
        let first = if r.closed == tail + 1 { FirstAppend::ClearMark } else { FirstAppend::NewSegment };
        Ok(LogCore {
            root,
            segment_size: r.segment_size,
            chain: RwLock::new(Chain { segs, head_lsn: r.head_lsn }),
            writer: Mutex::new(Writer { tail, seg: tail_seg, first, pending: Vec::new() }),
            durable: AtomicU64::new(tail),
            written: AtomicU64::new(tail),
            head: AtomicU64::new(r.head_lsn),
            leading: Mutex::new(Leading::default()),
            commit_done: Condvar::new(),
            leader_active: AtomicBool::new(false),
            last_commit_ns: AtomicU64::new(0),
            committer: Mutex::new(Vec::new()),
            failed: OnceLock::new(),
            truncator: Mutex::new(()),
            appends: AtomicU64::new(0),
            commits: AtomicU64::new(0),
        })
    }

    /// The first live LSN.
    pub(crate) fn head(&self) -> u64 {
        self.head.load(Ordering::Acquire)
    }

    /// The end of the durable records: the LSN the next record after them gets.
    pub(crate) fn tail(&self) -> u64 {
        self.durable.load(Ordering::Acquire)
    }

    /// The end of the records written, durable or not.
    pub(crate) fn written(&self) -> u64 {
        self.written.load(Ordering::Acquire)
    }

    /// The bytes of records from the head to the written end.
    pub(crate) fn bytes(&self) -> u64 {
        self.written() - self.head()
    }

    /// Where the head segment's records end (the next segment's start, or the durable tail).
    pub(crate) fn head_segment_end(&self) -> u64 {
        let chain = self.chain.read().unwrap_or_else(|e| e.into_inner());
        chain.end_of(0, self.tail())
    }

    /// Calls `visit(lsn, pool offset, payload)` for every durable record from the head, in
    /// order, walking the segments directly (for a replay at open, when nothing else runs).
    pub(crate) fn for_each_record<D: Domain>(
        &self,
        heap: &Heap<D>,
        mut visit: impl FnMut(u64, u64, &[u8]) -> Result<()>,
    ) -> Result<()> {
        let chain = self.chain.read().unwrap_or_else(|e| e.into_inner());
        let durable = self.tail();
        let mut buf = Vec::new();
        let mut lsn = chain.head_lsn;
        for i in chain.find(lsn)..chain.segs.len() {
            let seg = chain.segs[i];
            let end = chain.end_of(i, durable);
            lsn = lsn.max(seg.start_lsn);
            while lsn < end {
                let Some(next) = read_record(heap, &seg, lsn, end, &mut buf)? else {
                    return Err(corrupt(format!(
                        "no record checks at LSN {lsn}, before the end {end} of its segment"
                    )));
                };
                visit(lsn, seg.at(lsn), &buf)?;
                lsn = next;
            }
        }
        Ok(())
    }

    /// The live segments.
    pub(crate) fn segments(&self) -> usize {
        self.chain.read().unwrap_or_else(|e| e.into_inner()).segs.len()
    }

    /// Reads the record at `lsn` into `buf` (replacing its contents); returns the next LSN,
    /// or `None` at the tail.
    pub(crate) fn read_into<D: Domain>(
        &self,
        heap: &Heap<D>,
        lsn: u64,
        buf: &mut Vec<u8>,
    ) -> Result<Option<u64>> {
        Ok(self.read_at(heap, lsn, buf)?.map(|(next, _)| next))
    }

    /// [`read_into`](LogCore::read_into), also returning the record's pool offset.
    pub(crate) fn read_at<D: Domain>(
        &self,
        heap: &Heap<D>,
        lsn: u64,
        buf: &mut Vec<u8>,
    ) -> Result<Option<(u64, u64)>> {
        let chain = self.chain.read().unwrap_or_else(|e| e.into_inner());
        let durable = self.tail();
        if lsn < chain.head_lsn {
            return Err(LogError::Truncated { lsn, head: chain.head_lsn });
        }
        if lsn == durable {
            return Ok(None);
        }
        let not_a_record = || LogError::NotARecord { lsn, head: chain.head_lsn, tail: durable };
        if lsn > durable || lsn % 8 != 0 {
            return Err(not_a_record());
        }
        let i = chain.find(lsn);
        let seg = chain.segs[i];
        let end = chain.end_of(i, durable);
        match read_record(heap, &seg, lsn, end, buf)? {
            Some(next) => Ok(Some((next, seg.at(lsn)))),
            None => Err(not_a_record()),
        }
    }

    /// Reads the record at `lsn`, which a [`write`](LogCore::write) returned, into `buf`,
    /// whether or not a commit has made it durable yet; returns the next LSN. For a structure
    /// that orders its records under a lock of its own and reads one back (the queue's
    /// dequeue copies an item whose enqueue may still be committing): the caller must not
    /// hand what it read out before a commit covers it.
    pub(crate) fn read_written<D: Domain>(&self, heap: &Heap<D>, lsn: u64, buf: &mut Vec<u8>) -> Result<u64> {
        // The writer's mutex first, alone: `write` takes the chain's lock under it.
        let written = lock(&self.writer).tail;
        let chain = self.chain.read().unwrap_or_else(|e| e.into_inner());
        if lsn < chain.head_lsn {
            return Err(LogError::Truncated { lsn, head: chain.head_lsn });
        }
        let not_a_record = || LogError::NotARecord { lsn, head: chain.head_lsn, tail: written };
        if lsn >= written || lsn % 8 != 0 {
            return Err(not_a_record());
        }
        let i = chain.find(lsn);
        let end = chain.end_of(i, written);
        read_record(heap, &chain.segs[i], lsn, end, buf)?.ok_or_else(not_a_record)
    }

    /// The start LSN of the second live segment (`None` while there is one): a truncation to
    /// it or past it frees a segment.
    pub(crate) fn second_segment_start(&self) -> Option<u64> {
        self.chain.read().unwrap_or_else(|e| e.into_inner()).segs.get(1).map(|s| s.start_lsn)
    }

    /// Counts (see [`Log::stats`](super::Log::stats)).
    pub(crate) fn stats(&self) -> super::LogStats {
        super::LogStats {
            head: self.head(),
            tail: self.tail(),
            segments: self.segments(),
            appends: self.appends.load(Ordering::Relaxed),
            commits: self.commits.load(Ordering::Relaxed),
        }
    }

    /// Drops every record before `before` (a record's LSN or the tail): frees the segments
    /// wholly before it. Durable when it returns.
    pub(crate) fn truncate<D: Domain>(&self, heap: &Heap<D>, before: u64) -> Result<()> {
        self.check_failed()?;
        let _alone = lock(&self.truncator);
        let (freed, new_head) = {
            let mut chain = self.chain.write().unwrap_or_else(|e| e.into_inner());
            if before <= chain.head_lsn {
                return Ok(());
            }
            let durable = self.tail();
            if before != durable {
                let not_a_record = LogError::NotARecord { lsn: before, head: chain.head_lsn, tail: durable };
                if before > durable || before % 8 != 0 {
                    return Err(not_a_record);
                }
                let i = chain.find(before);
                let end = chain.end_of(i, durable);
                if read_record(heap, &chain.segs[i], before, end, &mut Vec::new())?.is_none() {
                    return Err(not_a_record);
                }
            }
            // The segments wholly before `before` (the tail segment is never among them).
            let keep = chain.find(before).min(chain.segs.len() - 1);
            chain.head_lsn = before;
            self.head.store(before, Ordering::Release);
            let freed: Vec<Seg> = chain.segs.drain(..keep).collect();
            (freed, chain.segs[0].offset)
        };
        // Readers no longer reach the freed segments. One transaction moves the head and frees
        // the first of them; the rest (linked, the last to the new head) are named by the
        // root's to-free word until later transactions free them, so the truncation is atomic
        // and a crash leaks nothing (opening finishes the frees).
        let mut batches = freed.chunks(FREES_PER_TX);
        let first = batches.next().unwrap_or(&[]);
        heap.transaction(|tx| {
            if !first.is_empty() {
                tx.redo_store(self.root + ROOT_HEAD_SEGMENT, new_head)?;
            }
            tx.redo_store(self.root + ROOT_HEAD_LSN, before)?;
            free_batch(tx, self.root, first, new_head)
        })?;
        for batch in batches {
            heap.transaction(|tx| free_batch(tx, self.root, batch, new_head))?;
        }
        Ok(())
    }

    /// Reads every record from the head to the tail; where the next append would go on in
    /// the tail segment, looks for a record that checks at any position past the tail (one
    /// that a later append could make reachable).
    pub(crate) fn check<D: Domain>(&self, heap: &Heap<D>) -> Result<super::LogCheck> {
        let mut report = super::LogCheck::default();
        let mut buf = Vec::new();
        let mut lsn = self.head();
        loop {
            match self.read_into(heap, lsn, &mut buf) {
                Ok(Some(next)) => {
                    report.records += 1;
                    report.bytes += buf.len() as u64;
                    lsn = next;
                }
                Ok(None) => break,
                Err(e) => {
                    report.problems.push(format!("reading LSN {lsn}: {e}"));
                    break;
                }
            }
        }
        let w = lock(&self.writer);
        if w.first == FirstAppend::ClearMark {
            let stale = (w.tail + 8..w.seg.end())
                .step_by(8)
                .find(|&at| matches!(read_record(heap, &w.seg, at, w.seg.end(), &mut buf), Ok(Some(_))));
            if let Some(at) = stale {
                report.problems.push(format!(
                    "a record checks at LSN {at}, past the tail {}, in the segment the next append writes to",
                    w.tail
                ));
            }
        }
        Ok(report)
    }

    pub(super) fn check_failed(&self) -> Result<()> {
        match self.failed.get() {
            Some(why) => Err(LogError::Failed(why.clone())),
            None => Ok(()),
        }
    }
}

/// The most segments one transaction frees (the redo log holds 126 words).
const FREES_PER_TX: usize = 64;

/// Frees `batch` (consecutive segments) and names the segment after it as still to free,
/// unless that is `head`.
fn free_batch<D: Domain>(tx: &mut Tx<'_, D>, root: u64, batch: &[Seg], head: u64) -> Result<()> {
    let Some(last) = batch.last() else { return Ok(()) };
    let after = tx.heap().raw_pool().load_u64(last.offset + SEGMENT_NEXT, Ordering::Acquire)?;
    for seg in batch {
        tx.free(seg.offset)?;
    }
    tx.redo_store(root + ROOT_TO_FREE, if after == head { 0 } else { after })?;
    Ok(())
}

/// Finishes the frees of a truncation a crash interrupted.
pub(super) fn finish_frees<D: Domain>(heap: &Heap<D>, root: u64, head: u64) -> Result<()> {
    let pool = heap.raw_pool();
    let most = pool.size() / (SEGMENT_HEADER + MIN_SEGMENT_SIZE) + 1;
    let mut chain = Vec::new();
    let mut offset = pool.load_u64(root + ROOT_TO_FREE, Ordering::Acquire)?;
    while offset != 0 && offset != head {
        chain.push(read_segment(heap, offset)?);
        if chain.len() as u64 > most {
            return Err(corrupt("the segments to free form a cycle".into()));
        }
        offset = pool.load_u64(offset + SEGMENT_NEXT, Ordering::Acquire)?;
    }
    if offset != head {
        return Err(corrupt(format!("the segments to free do not lead to the head segment {head:#x}")));
    }
    for batch in chain.chunks(FREES_PER_TX) {
        heap.transaction(|tx| free_batch(tx, root, batch, head))?;
    }
    Ok(())
}

/// Allocates a segment starting at `start_lsn` with room for `capacity` bytes of records and
/// a new tag, inside `tx`; returns its offset.
pub(super) fn new_segment<D: Domain>(tx: &mut Tx<'_, D>, start_lsn: u64, capacity: u64) -> Result<u64> {
    let offset = tx.alloc_uninit(SEGMENT_HEADER + capacity)?;
    let header = SegmentHeader {
        magic: SEGMENT_MAGIC,
        start_lsn,
        capacity,
        next: 0,
        tag: fastrand::u32(1..),
        spare_tag: 0,
        spare: [0; 3],
    };
    tx.write_bytes(offset, bytemuck::bytes_of(&header))?;
    Ok(offset)
}

/// Reads a segment header at `offset`, checking it lies in an allocated block of the pool.
pub(super) fn read_segment<D: Domain>(heap: &Heap<D>, offset: u64) -> Result<Seg> {
    let pool = heap.raw_pool();
    if offset % 8 != 0 || !pool.contains(offset, SEGMENT_HEADER) {
        return Err(corrupt(format!("segment offset {offset:#x} outside the pool")));
    }
    let h: SegmentHeader = pool.read(offset)?;
    if h.magic != SEGMENT_MAGIC {
        return Err(corrupt(format!("segment at {offset:#x} starts with {:#018x}", h.magic)));
    }
    let usable = heap.usable_size(offset).map_err(|e| corrupt(format!("segment at {offset:#x}: {e}")))?;
    if h.capacity % 8 != 0 || h.capacity < MIN_SEGMENT_SIZE || h.capacity + SEGMENT_HEADER > usable {
        return Err(corrupt(format!(
            "segment at {offset:#x}: capacity {} in a block of {usable}",
            h.capacity
        )));
    }
    if h.tag == 0 || h.start_lsn % 8 != 0 {
        return Err(corrupt(format!("segment at {offset:#x}: tag {}, start {}", h.tag, h.start_lsn)));
    }
    Ok(Seg { offset, start_lsn: h.start_lsn, capacity: h.capacity, tag: h.tag })
}

/// The chain from the head segment, checked: LSNs never go back, no segment overflows into
/// the next, no cycle.
fn walk<D: Domain>(heap: &Heap<D>, r: &LogRoot) -> Result<Vec<Seg>> {
    let pool = heap.raw_pool();
    let most = pool.size() / (SEGMENT_HEADER + MIN_SEGMENT_SIZE) + 1;
    let mut segs: Vec<Seg> = Vec::new();
    let mut offset = r.head_segment;
    loop {
        let seg = read_segment(heap, offset)?;
        if let Some(prev) = segs.last() {
            if seg.start_lsn < prev.start_lsn || seg.start_lsn > prev.end() {
                return Err(corrupt(format!(
                    "segment at {offset:#x} starts at LSN {}, after one holding {}..{}",
                    seg.start_lsn,
                    prev.start_lsn,
                    prev.end()
                )));
            }
        }
        segs.push(seg);
        if segs.len() as u64 > most {
            return Err(corrupt("the segment chain has a cycle".into()));
        }
        offset = pool.load_u64(offset + SEGMENT_NEXT, Ordering::Acquire)?;
        if offset == 0 {
            return Ok(segs);
        }
    }
}

/// The tail: the LSN of the first record of the tail segment that does not check.
fn scan<D: Domain>(heap: &Heap<D>, seg: &Seg) -> Result<u64> {
    let mut buf = Vec::new();
    let mut lsn = seg.start_lsn;
    while let Some(next) = read_record(heap, seg, lsn, seg.end(), &mut buf)? {
        lsn = next;
    }
    Ok(lsn)
}

/// The record at `lsn` of `seg` if one checks there and ends by `end`; its payload in `buf`.
fn read_record<D: Domain>(
    heap: &Heap<D>,
    seg: &Seg,
    lsn: u64,
    end: u64,
    buf: &mut Vec<u8>,
) -> Result<Option<u64>> {
    if lsn + RECORD_HEADER > end {
        return Ok(None);
    }
    let pool = heap.raw_pool();
    let at = seg.at(lsn);
    let (len, tag, stored) = parse_header(pool.read::<[u8; 16]>(at)?);
    let next = lsn + record_size(len);
    if tag != seg.tag || len > MAX_RECORD || next > end {
        return Ok(None);
    }
    buf.resize(len, 0);
    pool.read_into(at + RECORD_HEADER, buf)?;
    Ok((check(lsn, tag, buf) == stored).then_some(next))
}
