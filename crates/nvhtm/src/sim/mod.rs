//! The crash simulator: a persistence domain that records every store, write-back and fence,
//! and a replay engine that builds every post-crash memory image the Px86 model allows.
//!
//! The model (Raad et al.'s Px86, as the architecture brief states it):
//! - stores reach the cache in program order; a dirty 64-byte line may be written back at any
//!   time, so after a crash each line holds *some prefix* of the stores made to it since it
//!   was last known persistent, independently of other lines;
//! - aligned 8-byte stores are failure-atomic, wider ones are split into 8-byte pieces; the
//!   pieces of one [`Domain::write`] call (a `memcpy`, which promises no order) may persist in
//!   any order among themselves: within a line they form a *group*, any subset of which may
//!   persist once the line's earlier stores have, while later stores need the whole group;
//! - `clwb`/`clflushopt` mark the line's stores so far as flushed, and a later `sfence` — or a
//!   locked instruction (`compare_exchange_u64`, a `SeqCst` store) — makes them persistent;
//!   `clflush` persists them at once (it is ordered with later stores);
//! - non-temporal stores (the body of a [`Domain::write_persistent`] of 256 bytes or more, as
//!   the `Cpu` domain streams it) are neither persistent nor ordered until the thread's next
//!   fence: each of them may or may not have persisted, under every flush instruction.
//!
//! [`Sim`] records; [`CrashTest`] replays a [`Recording`] and runs a check (recovery plus an
//! oracle) on each image, crashing just before every fence, every `clflush` and every locked
//! instruction that persists something, and at the end.

mod crash;
pub mod litmus;

pub(crate) use crash::log_images;
pub use crash::{
    CrashContext, CrashFailure, CrashPointKind, CrashReport, CrashTest, ImageDelta, ImageId, MutationReport,
    SiteOutcome,
};

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::persist::{self, Domain, DomainKind, FlushInstr, PersistError, Site, CACHE_LINE};

/// One recorded event. Offsets are from the start of the simulated region.
#[derive(Debug, Clone)]
pub(crate) enum Event {
    /// A store of `len` bytes inside one aligned 8-byte word, made by write call `call`: the
    /// pieces of one call may persist in any order among themselves.
    Store { offset: u64, len: u8, bytes: [u8; 8], call: u32 },
    /// A non-temporal store of one aligned 8-byte word by thread `thread`: neither persistent
    /// nor ordered until that thread's next fence or locked instruction.
    NtStore { offset: u64, bytes: [u8; 8], thread: u32 },
    /// A write-back of the line at `line` (a line-aligned offset) by thread `thread`.
    Flush { line: u64, instr: FlushInstr, site: Site, thread: u32 },
    /// An `sfence` by thread `thread`: it orders only that thread's write-backs.
    Fence { site: Site, thread: u32 },
    /// A locked instruction (compare-and-exchange, `SeqCst` store) by thread `thread`: like a
    /// fence for that thread's earlier write-backs and non-temporal stores (Intel SDM: `clwb`
    /// and `clflushopt` are ordered with locked read-modify-write instructions, which also
    /// drain the write-combining buffers). Not a site: it cannot be switched off.
    Locked { thread: u32 },
    /// A point in the workload's history (for the oracle).
    Mark(u64),
    /// The region grew to `len` bytes (new bytes are zero and persistent).
    Grow { len: usize },
}

/// What a workload did, from the moment recording started.
#[derive(Debug, Clone)]
pub struct Recording {
    pub(crate) initial: Vec<u8>,
    pub(crate) events: Vec<Event>,
    /// Bytes written back as a unit that keeps a prefix of its stores: 64 (a cache line) or
    /// 512 (a disk sector, for the file model).
    pub(crate) unit: u64,
}

impl Default for Recording {
    fn default() -> Recording {
        Recording { initial: Vec::new(), events: Vec::new(), unit: CACHE_LINE as u64 }
    }
}

impl Recording {
    /// The number of fences recorded (each is a crash point, plus one at the end).
    pub fn fences(&self) -> usize {
        self.events.iter().filter(|e| matches!(e, Event::Fence { .. })).count()
    }

    /// The number of stores (8-byte pieces) recorded.
    pub fn stores(&self) -> usize {
        self.events.iter().filter(|e| matches!(e, Event::Store { .. })).count()
    }
}

/// A hook run by a thread about to record a fence (see [`Sim::before_fence`]).
type FenceHook = Arc<dyn Fn(Site) + Send + Sync>;

#[derive(Default)]
struct State {
    /// Base address and length of the simulated region, once attached.
    region: Option<(usize, usize)>,
    recording: Recording,
    /// The number of write calls recorded (the id of the next one).
    calls: u32,
    hook: Option<FenceHook>,
}

/// The simulator's persistence domain. Cheap to clone: clones share one recording.
#[derive(Clone)]
pub struct Sim {
    state: Arc<Mutex<State>>,
    instr: FlushInstr,
    /// The unit that keeps a prefix of its stores after a crash.
    unit: u64,
    /// Flushes cover whole blocks of this size (a page for the file model).
    flush_align: u64,
    /// `false`: behave like a plain domain and record nothing (checks nobody will crash).
    record: bool,
}

impl std::fmt::Debug for Sim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sim").field("instr", &self.instr).finish_non_exhaustive()
    }
}

impl Default for Sim {
    fn default() -> Sim {
        Sim::new()
    }
}

impl Sim {
    /// A simulator whose flushes behave like `clwb` (persistent at the next fence).
    pub fn new() -> Sim {
        Sim::with_instr(FlushInstr::Clwb)
    }

    /// A simulator whose flushes behave like `instr`.
    pub fn with_instr(instr: FlushInstr) -> Sim {
        Sim {
            state: Arc::default(),
            instr,
            unit: CACHE_LINE as u64,
            flush_align: CACHE_LINE as u64,
            record: true,
        }
    }

    /// A simulator of the file model, for code that persists with `msync` (the `Msync`
    /// domain): unsynced data reaches the file page by page at any time and tears at 512-byte
    /// sectors (each sector keeps a prefix of its stores); a flush covers whole pages and the
    /// fence that follows makes them durable.
    pub fn file_model() -> Sim {
        let page = rustix::param::page_size() as u64;
        Sim { unit: 512, flush_align: page, ..Sim::new() }
    }

    /// A simulator that records nothing: stores are plain stores. For checks whose recovery
    /// will not be crashed.
    pub fn passive() -> Sim {
        Sim { record: false, ..Sim::new() }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records a point in the workload's history: the oracle sees every mark made before the
    /// crash point it checks (typically "operation N completed").
    pub fn mark(&self, value: u64) {
        if !self.record {
            return;
        }
        self.lock().recording.events.push(Event::Mark(value));
    }

    /// Runs `hook(site)` on every thread about to record a fence, before the fence is recorded
    /// (replacing any earlier hook; [`clear_fence_hook`](Sim::clear_fence_hook) removes it). For
    /// building two-thread interleavings deterministically: a hook may run another thread's
    /// work to its end at an exact point of this thread's (mind the locks this thread holds).
    ///
    /// ```
    /// use std::sync::atomic::{AtomicUsize, Ordering};
    /// use std::sync::Arc;
    /// use nvhtm::{Pool, PoolOptions, Sim};
    /// let sim = Sim::new();
    /// let pool = Pool::create_in_memory(&PoolOptions::layout("hook").with_size(64 << 10), sim.clone()).unwrap();
    /// let fences = Arc::new(AtomicUsize::new(0));
    /// let seen = fences.clone();
    /// sim.before_fence(move |_site| {
    ///     seen.fetch_add(1, Ordering::Relaxed);
    /// });
    /// pool.persist(4096, 8).unwrap();
    /// sim.clear_fence_hook();
    /// pool.persist(4096, 8).unwrap();
    /// assert_eq!(fences.load(Ordering::Relaxed), 1);
    /// ```
    pub fn before_fence(&self, hook: impl Fn(Site) + Send + Sync + 'static) {
        self.lock().hook = Some(Arc::new(hook));
    }

    /// Removes the hook set by [`before_fence`](Sim::before_fence).
    pub fn clear_fence_hook(&self) {
        self.lock().hook = None;
    }

    /// The number of events recorded so far.
    pub fn events(&self) -> usize {
        self.lock().recording.events.len()
    }

    /// A copy of what was recorded so far.
    pub fn recording(&self) -> Recording {
        self.lock().recording.clone()
    }

    /// Forgets the events so far and takes the region's current contents as the persistent
    /// starting state. Fails, recording nothing, if some store is not yet persistent (the
    /// starting state would not be one the hardware guarantees).
    pub fn restart_recording(&self) -> Result<(), String> {
        let mut state = self.lock();
        let Some((base, len)) = state.region else {
            return Err("the simulator is not attached to a region yet".into());
        };
        let pending = crash::unpersisted_lines(&state.recording);
        if !pending.is_empty() {
            return Err(format!("lines at offsets {pending:#x?} hold stores that are not persistent yet"));
        }
        // SAFETY: base..base+len is the region the pool attached, mapped for the pool's life.
        let initial = unsafe { snapshot(base, len) };
        state.recording = Recording { initial, events: Vec::new(), unit: self.unit };
        Ok(())
    }

    fn offset_of(state: &State, addr: usize, len: usize) -> u64 {
        let (base, size) = state.region.expect("the Sim domain is used before a pool attached it");
        assert!(
            addr >= base && addr + len <= base + size,
            "store at {addr:#x}+{len} is outside the simulated region {base:#x}+{size}"
        );
        (addr - base) as u64
    }

    /// Records `bytes` stored at region offset `offset` by one write call, split into
    /// 8-byte-word pieces.
    fn record_store(state: &mut State, offset: u64, bytes: &[u8]) {
        let call = state.calls;
        state.calls = state.calls.wrapping_add(1);
        let mut at = 0usize;
        while at < bytes.len() {
            let off = offset + at as u64;
            let room = 8 - (off % 8) as usize;
            let n = room.min(bytes.len() - at);
            let mut piece = [0u8; 8];
            piece[..n].copy_from_slice(&bytes[at..at + n]);
            state.recording.events.push(Event::Store { offset: off, len: n as u8, bytes: piece, call });
            at += n;
        }
    }
}

/// A small id for the calling thread (fences order only their own thread's write-backs).
fn thread_id() -> u32 {
    use std::sync::atomic::AtomicU32;
    static NEXT: AtomicU32 = AtomicU32::new(0);
    thread_local! {
        static ID: u32 = NEXT.fetch_add(1, Ordering::Relaxed);
    }
    ID.with(|id| *id)
}

/// # Safety
/// `base..base + len` is mapped and readable.
unsafe fn snapshot(base: usize, len: usize) -> Vec<u8> {
    // SAFETY: guaranteed by the caller.
    unsafe { std::slice::from_raw_parts(base as *const u8, len) }.to_vec()
}

impl Domain for Sim {
    fn kind(&self) -> DomainKind {
        DomainKind::Sim
    }

    /// The first region attached is the one simulated; later calls with the same base tell of
    /// growth. A simulator follows one region.
    unsafe fn attach(&self, base: *mut u8, len: usize) {
        if !self.record {
            return;
        }
        let mut state = self.lock();
        match state.region {
            None => {
                state.region = Some((base as usize, len));
                // SAFETY: the caller guarantees base..base+len is mapped.
                state.recording.initial = unsafe { snapshot(base as usize, len) };
                state.recording.unit = self.unit;
            }
            Some((b, old)) => {
                assert_eq!(b, base as usize, "a Sim domain follows a single region");
                if len > old {
                    state.region = Some((b, len));
                    state.recording.events.push(Event::Grow { len });
                }
            }
        }
    }

    unsafe fn write(&self, dst: *mut u8, src: &[u8]) {
        if !self.record {
            // SAFETY: forwarded caller contract.
            return unsafe { persist::copy_plain(dst, src) };
        }
        let mut state = self.lock();
        let offset = Sim::offset_of(&state, dst as usize, src.len());
        // SAFETY: the caller guarantees dst..dst+len is writable; the lock orders the store
        // with its record.
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), dst, src.len()) };
        Sim::record_store(&mut state, offset, src);
        drop(state);
        persist::counters_add_bytes(src.len() as u64);
    }

    /// As the `Cpu` domain does it: a copy of 256 bytes or more streams its
    /// aligned 8-byte words with non-temporal stores (recorded as such: neither persistent nor
    /// ordered until this thread's next fence), and the unaligned head and tail go through the
    /// cache and are flushed with the domain's instruction; a shorter copy is a write plus a
    /// flush. The file model has no non-temporal stores (the `Msync` domain writes and flushes).
    #[track_caller]
    unsafe fn write_persistent(&self, dst: *mut u8, src: &[u8]) {
        if !self.record || self.unit != CACHE_LINE as u64 || src.len() < persist::NT_THRESHOLD {
            // SAFETY: forwarded caller contract.
            unsafe {
                self.write(dst, src);
                self.flush(dst, src.len());
            }
            return;
        }
        let head = dst.align_offset(8).min(src.len());
        let body = (src.len() - head) & !7;
        // SAFETY: the head and tail lie inside dst..dst+len (caller's contract).
        unsafe {
            self.write(dst, &src[..head]);
            self.flush(dst, head);
        }
        {
            let thread = thread_id();
            let mut state = self.lock();
            // SAFETY: dst+head.. is inside the caller's range.
            let start = Sim::offset_of(&state, unsafe { dst.add(head) } as usize, body);
            // SAFETY: the body lies inside dst..dst+len (caller's contract); the lock orders the
            // stores with their records.
            unsafe { std::ptr::copy_nonoverlapping(src[head..].as_ptr(), dst.add(head), body) };
            for (i, chunk) in src[head..head + body].chunks_exact(8).enumerate() {
                let mut bytes = [0u8; 8];
                bytes.copy_from_slice(chunk);
                state.recording.events.push(Event::NtStore { offset: start + 8 * i as u64, bytes, thread });
            }
        }
        persist::counters_add_bytes(body as u64);
        // SAFETY: as for the head.
        unsafe {
            let tail = dst.add(head + body);
            self.write(tail, &src[head + body..]);
            self.flush(tail, src.len() - head - body);
        }
    }

    unsafe fn store_u64(&self, dst: *const AtomicU64, value: u64, order: Ordering) {
        if !self.record {
            // SAFETY: forwarded caller contract.
            return unsafe { persist::store_plain(dst, value, order) };
        }
        let mut state = self.lock();
        let offset = Sim::offset_of(&state, dst as usize, 8);
        // SAFETY: the caller guarantees dst is aligned and valid.
        unsafe { (*dst).store(value, order) };
        if order == Ordering::SeqCst {
            // A SeqCst store is an `xchg` on x86: a locked instruction.
            state.recording.events.push(Event::Locked { thread: thread_id() });
        }
        Sim::record_store(&mut state, offset, &value.to_ne_bytes());
        drop(state);
        persist::counters_add_bytes(8);
    }

    unsafe fn compare_exchange_u64(
        &self,
        dst: *const AtomicU64,
        current: u64,
        new: u64,
        order: Ordering,
    ) -> Result<u64, u64> {
        if !self.record {
            // SAFETY: forwarded caller contract.
            return unsafe { persist::cas_plain(dst, current, new, order) };
        }
        let mut state = self.lock();
        let offset = Sim::offset_of(&state, dst as usize, 8);
        // SAFETY: the caller guarantees dst is aligned and valid.
        let result = unsafe { (*dst).compare_exchange(current, new, order, Ordering::Acquire) };
        // `lock cmpxchg` is a locked instruction whether or not it succeeds.
        state.recording.events.push(Event::Locked { thread: thread_id() });
        if result.is_ok() {
            Sim::record_store(&mut state, offset, &new.to_ne_bytes());
        }
        result
    }

    #[track_caller]
    unsafe fn flush(&self, addr: *const u8, len: usize) {
        if !self.record {
            return;
        }
        if len == 0 {
            // As on the CPU: a zero-length range covers no line.
            return;
        }
        let site = Site::caller();
        let thread = thread_id();
        let mut state = self.lock();
        let offset = Sim::offset_of(&state, addr as usize, len);
        let start = offset - offset % self.flush_align;
        let end = (offset + len as u64).next_multiple_of(self.flush_align);
        for unit in (start..end).step_by(self.unit as usize) {
            state.recording.events.push(Event::Flush { line: unit, instr: self.instr, site, thread });
        }
        drop(state);
        persist::counters_add_lines(persist::line_count(offset as *const u8, len));
    }

    #[track_caller]
    fn fence(&self) -> Result<(), PersistError> {
        if self.record {
            let site = Site::caller();
            let thread = thread_id();
            // Without the lock held: the hook may run other threads' recorded work.
            let hook = self.lock().hook.clone();
            if let Some(hook) = hook {
                hook(site);
            }
            self.lock().recording.events.push(Event::Fence { site, thread });
        }
        persist::counters_add_fence();
        Ok(())
    }
}
