//! The persistent heap: a crash-consistent allocator over a pool, a root object, and
//! failure-atomic transactions.
//!
//! - **Allocation**: small blocks (16 B to 8 KiB, 32 size classes) come from runs — one chunk
//!   of 64 KiB per run, a bitmap at its start — owned by the lane (thread) that uses them, so
//!   threads rarely share a lock; larger blocks take whole chunks. Allocation state is the run
//!   bitmaps and the chunk heads, changed only through a lane's redo log, so a crash at any point
//!   leaves every block either allocated (and linked) or free: no leak, no double allocation.
//!   When no chunk is free the pool grows.
//! - **Reserve / publish**: [`Heap::reserve`] takes a block in DRAM only; [`Heap::publish`]
//!   marks reserved blocks allocated *and* stores the words that link them in one redo-logged
//!   commit. [`Tx::redo_store`] gives structures the same multi-word atomic store.
//! - **Transactions**: [`Heap::transaction`] snapshots ranges into the lane's undo log before
//!   they change, allocates and frees inside, and commits atomically; an error, a panic or a crash
//!   rolls everything back.
//! - **Recovery** at open replays or rolls back each lane (bounded by the lanes' size); the
//!   allocator is rebuilt from the chunk heads and run bitmaps (bounded by the number of chunks,
//!   not of objects) on the first allocation or free, so a large pool is readable at once.
//!
//! See `docs/design.md` §5 for the protocol and its correctness argument.

mod check;
mod error;
mod lane;
mod layout;
mod space;
mod tx;
mod view;

pub use check::{CheckReport, ClassUsage};
pub use error::{HeapError, Result};
pub use lane::LaneRecovery;
pub use layout::{CHUNK, CLASSES, MAX_SMALL};
pub(crate) use tx::dirty_lines;
pub use tx::Tx;
pub use view::HeapPool;

use std::cell::Cell;
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

use bytemuck::Pod;

use crate::persist::Domain;
use crate::pool::{FileDomain, ImageSlot, PPtr, Pool, PoolOptions};
use lane::LaneLog;
use layout::chunk::{self, Head};
use layout::{HeapHeader, RunGeometry, HEAP_MAGIC, HEAP_OFFSET, HEAP_VERSION};
use space::{Chunks, Run};

/// Redo log entries: (offset, 8-byte value).
type RedoWords = Vec<(u64, u64)>;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Armed across a lane's commit protocol: dropped by a panic there, it poisons the pool. The
/// lane is then half way through its steps on media and DRAM (run bitmaps, the chunk mirror,
/// the lane's generation) may disagree with it; only reopening, and recovery, can judge. Without
/// it the lane's next operation would reuse the interrupted one's generation.
struct PoisonOnPanic<'a, D: Domain>(&'a Pool<D>);

impl<D: Domain> Drop for PoisonOnPanic<'_, D> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0.poison("a panic interrupted a heap commit; reopen the pool to recover".into());
        }
    }
}

/// How to lay out a new heap.
#[derive(Debug, Clone)]
pub struct HeapOptions {
    /// Lanes (concurrent transactions), including the heap's own. Default: by pool size,
    /// from 3 to 17.
    pub lanes: Option<u32>,
    /// Bytes per lane (redo log, then undo log). Default 16 KiB.
    pub lane_size: u64,
}

impl Default for HeapOptions {
    fn default() -> HeapOptions {
        HeapOptions { lanes: None, lane_size: layout::DEFAULT_LANE_SIZE }
    }
}

/// A lane in use: its persistent log and the volatile state of its owner.
#[derive(Debug)]
pub(crate) struct LaneSlot {
    log: LaneLog,
    gen: u64,
    current: [Option<u32>; CLASSES.len()],
}

/// A block reserved in DRAM only: publish it (or allocate it inside a transaction) to make it
/// allocated, or cancel it. Dropping it without either keeps it out of use until the heap is
/// reopened (it is never allocated on media).
#[derive(Debug)]
#[must_use = "publish or cancel a reservation"]
pub struct Reservation {
    offset: u64,
    size: u64,
    kind: Block,
}

impl Reservation {
    /// Offset of the reserved block in the pool.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// Usable bytes of the block (at least what was asked for).
    pub fn size(&self) -> u64 {
        self.size
    }
}

/// Where a block lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Block {
    Small { chunk: u32, index: u64 },
    Large { chunk: u32, chunks: u32 },
}

/// Counts of the heap's state, from its volatile mirror.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct HeapStats {
    /// Chunks in the heap.
    pub chunks: u32,
    /// Chunks free (not in a run, not in a large block).
    pub free_chunks: u32,
    /// Runs of small blocks.
    pub runs: u32,
    /// Small blocks allocated or reserved.
    pub small_blocks: u64,
    /// Large blocks allocated.
    pub large_blocks: u64,
}

/// The persistent heap over a pool.
pub struct Heap<D: Domain> {
    pool: Pool<D>,
    header: HeapHeader,
    lanes: Vec<Mutex<LaneSlot>>,
    chunks: Mutex<Chunks>,
    runs: RwLock<Vec<Option<Arc<Mutex<Run>>>>>,
    /// Per class: runs that may have free blocks and that no lane owns.
    classes: Vec<Mutex<Vec<u32>>>,
    root_lock: Mutex<()>,
    recovery: Vec<LaneRecovery>,
    /// Whether the allocator's DRAM state was rebuilt from media. Opening recovers the lanes
    /// only; the chunk scan waits for the first allocation or free, so reading a large pool
    /// starts at once.
    scanned: std::sync::atomic::AtomicBool,
    scan_lock: Mutex<()>,
}

impl<D: Domain> std::fmt::Debug for Heap<D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Heap")
            .field("pool", &self.pool)
            .field("lanes", &self.lanes.len())
            .finish_non_exhaustive()
    }
}

impl<D: FileDomain> Heap<D> {
    /// Creates a pool file holding an empty heap. Crash-atomic: the heap is laid out before the
    /// pool appears at `path`.
    pub fn create(path: impl AsRef<Path>, opts: &PoolOptions) -> Result<Heap<D>> {
        Heap::load(Pool::create_with(path, opts, |pool| Heap::lay_out(pool, &HeapOptions::default()))?)
    }

    /// Creates a FAMS pool holding an empty heap, laid out in the pool's first committed state.
    pub fn create_fams(path: impl AsRef<Path>, opts: &PoolOptions) -> Result<Heap<D>> {
        Heap::load(Pool::create_fams_with(path, opts, |pool| Heap::lay_out(pool, &HeapOptions::default()))?)
    }

    /// Opens a pool file's heap, recovering whatever was in flight.
    pub fn open(path: impl AsRef<Path>, opts: &PoolOptions) -> Result<Heap<D>> {
        Heap::load(Pool::open(path, opts)?)
    }
}

impl Heap<crate::persist::Volatile> {
    /// Opens a pool file's heap copy-on-write ([`Pool::open_private`]): recovery runs in this
    /// process's memory only, so the file is inspected exactly as a crash left it.
    pub fn open_private(
        path: impl AsRef<Path>,
        opts: &PoolOptions,
    ) -> Result<Heap<crate::persist::Volatile>> {
        Heap::load(Pool::open_private(path, opts)?)
    }

    /// The heap of a FAMS pool as it will be once opened (a complete journal applied), in this
    /// process's memory only: the files are not written (for inspection).
    pub fn open_fams_private(
        path: impl AsRef<Path>,
        opts: &PoolOptions,
    ) -> Result<Heap<crate::persist::Volatile>> {
        Heap::load(Pool::open_fams_private(path, opts)?)
    }
}

impl<D: Domain> Heap<D> {
    /// Creates an in-memory pool holding an empty heap (for the simulator and tests).
    pub fn create_in_memory(opts: &PoolOptions, domain: D) -> Result<Heap<D>> {
        Heap::format(Pool::create_in_memory(opts, domain)?, &HeapOptions::default())
    }

    /// Opens the heap in a pool image (a crash image of the simulator).
    pub fn open_image(image: &[u8], opts: &PoolOptions, domain: D) -> Result<Heap<D>> {
        Heap::load(Pool::open_image(image, opts, domain)?)
    }

    /// [`Heap::open_image`] in a reusable mapping ([`Pool::open_image_in`]): recovers the heap
    /// in `image` inside `slot` and hands it to `f`, which should drop it before returning.
    ///
    /// ```
    /// use nvhtm::pool::ImageSlot;
    /// use nvhtm::{Heap, PoolOptions, Volatile};
    /// let opts = PoolOptions::layout("slot-heap").with_size(512 << 10);
    /// let image = Heap::create_in_memory(&opts, Volatile).unwrap().pool().image().unwrap();
    /// let mut slot = ImageSlot::new();
    /// for _ in 0..3 {
    ///     let stats = Heap::open_image_in(&mut slot, &image, &opts, Volatile, |heap| heap.stats().unwrap());
    ///     assert!(stats.unwrap().free_chunks > 0);
    /// }
    /// ```
    pub fn open_image_in<R>(
        slot: &mut ImageSlot,
        image: &[u8],
        opts: &PoolOptions,
        domain: D,
        f: impl FnOnce(Heap<D>) -> R,
    ) -> Result<R> {
        Pool::open_image_in(slot, image, opts, domain, |pool| Heap::load(pool).map(f))?
    }

    /// Lays out an empty heap in a new pool (one with no root object yet).
    pub fn format(pool: Pool<D>, opts: &HeapOptions) -> Result<Heap<D>> {
        Heap::lay_out(&pool, opts)?;
        Heap::load(pool)
    }

    /// Writes an empty heap's header and lanes into a new pool and makes it the pool's root.
    fn lay_out(pool: &Pool<D>, opts: &HeapOptions) -> Result<()> {
        if pool.info().root_offset != 0 {
            return Err(HeapError::NotAHeap(
                "the pool already has a root object; a heap needs a new pool".into(),
            ));
        }
        let lanes = opts.lanes.unwrap_or_else(|| (pool.size() / (256 << 10)).clamp(2, 16) as u32 + 1);
        if lanes < 2 || opts.lane_size < layout::UNDO_START + 1024 || opts.lane_size % 64 != 0 {
            return Err(HeapError::NotAHeap(format!(
                "unusable heap geometry: {lanes} lanes of {} bytes",
                opts.lane_size
            )));
        }
        let lanes_offset = HEAP_OFFSET + 4096;
        let chunks_offset = (lanes_offset + u64::from(lanes) * opts.lane_size).next_multiple_of(4096);
        let needed = chunks_offset + CHUNK;
        if pool.size() < needed {
            pool.grow(needed)?;
        }
        let mut header = HeapHeader {
            magic: HEAP_MAGIC,
            version: HEAP_VERSION,
            lanes,
            lane_size: opts.lane_size,
            lanes_offset,
            chunks_offset,
            reserved: [0; 2],
            checksum: 0,
        };
        header.checksum = header.compute_checksum();
        pool.write(HEAP_OFFSET, &header)?;
        pool.write(layout::ROOT_WORD, &[0u64, 0u64])?;
        pool.persist(HEAP_OFFSET, 80)?;
        pool.set_root(PPtr::<HeapHeader>::new(HEAP_OFFSET)).map_err(HeapError::from)
    }

    /// Takes over a pool holding a heap: recovers every lane, then rebuilds the allocator from
    /// the chunk heads and run bitmaps.
    pub fn load(pool: Pool<D>) -> Result<Heap<D>> {
        match pool.root::<HeapHeader>() {
            Ok(Some(root)) if root.offset() == HEAP_OFFSET => {}
            _ => return Err(HeapError::NotAHeap("its root object is not a heap header".into())),
        }
        let header: HeapHeader = pool.read(HEAP_OFFSET)?;
        if header.magic != HEAP_MAGIC {
            return Err(HeapError::NotAHeap(format!(
                "bad heap magic {:?}",
                header.magic.escape_ascii().to_string()
            )));
        }
        if header.checksum != header.compute_checksum() {
            return Err(HeapError::Corrupt("heap header checksum mismatch".into()));
        }
        if header.version != HEAP_VERSION {
            return Err(HeapError::NotAHeap(format!(
                "heap format version {} (this build reads {HEAP_VERSION})",
                header.version
            )));
        }
        let lanes_end = header.lanes_offset + u64::from(header.lanes) * header.lane_size;
        if header.lanes < 2 || lanes_end > header.chunks_offset || header.chunks_offset > pool.size() {
            return Err(HeapError::Corrupt("heap geometry does not fit the pool".into()));
        }
        let mut lanes = Vec::with_capacity(header.lanes as usize);
        let mut recovery = Vec::with_capacity(header.lanes as usize);
        for i in 0..u64::from(header.lanes) {
            let log = LaneLog { base: header.lanes_offset + i * header.lane_size, size: header.lane_size };
            let (gen, outcome) = log.recover(&pool)?;
            recovery.push(outcome);
            lanes.push(Mutex::new(LaneSlot { log, gen, current: [None; CLASSES.len()] }));
        }
        // Every lane's retirement past its leftovers is durable before any lane is used.
        pool.fence()?;
        let heap = Heap {
            pool,
            header,
            lanes,
            chunks: Mutex::new(Chunks::default()),
            runs: RwLock::new(Vec::new()),
            classes: (0..CLASSES.len()).map(|_| Mutex::new(Vec::new())).collect(),
            root_lock: Mutex::new(()),
            recovery,
            scanned: std::sync::atomic::AtomicBool::new(false),
            scan_lock: Mutex::new(()),
        };
        Ok(heap)
    }

    fn chunk_count(&self) -> u32 {
        ((self.pool.size() - self.header.chunks_offset) / CHUNK) as u32
    }

    fn chunk_offset(&self, chunk: u32) -> u64 {
        self.header.chunks_offset + u64::from(chunk) * CHUNK
    }

    fn bitmap_word_offset(&self, chunk: u32, word: u64) -> u64 {
        self.chunk_offset(chunk) + 64 + word * 8
    }

    /// Reads chunk `chunk`'s head.
    fn head(&self, chunk: u32) -> Result<Head> {
        let word = self.pool.load_u64(self.chunk_offset(chunk), Ordering::Acquire)?;
        chunk::decode(word)
            .ok_or_else(|| HeapError::Corrupt(format!("chunk {chunk} has an invalid head {word:#018x}")))
    }

    /// Reads a run's bitmap, checking that no bit lies past its last block.
    fn bitmap(&self, chunk: u32, geo: &RunGeometry) -> Result<Vec<u64>> {
        let mut words = vec![0u64; geo.words as usize];
        self.pool.read_into(self.bitmap_word_offset(chunk, 0), bytemuck::cast_slice_mut(&mut words))?;
        let tail_bits = geo.blocks % 64;
        if tail_bits != 0 && words[words.len() - 1] >> tail_bits != 0 {
            return Err(HeapError::Corrupt(format!("run in chunk {chunk} marks blocks past its end")));
        }
        Ok(words)
    }

    /// Rebuilds the allocator's DRAM state on first need.
    fn ensure_scanned(&self) -> Result<()> {
        if self.scanned.load(Ordering::Acquire) {
            return Ok(());
        }
        let _one_scanner = lock(&self.scan_lock);
        if !self.scanned.load(Ordering::Acquire) {
            self.scan()?;
            self.scanned.store(true, Ordering::Release);
        }
        Ok(())
    }

    /// Rebuilds the volatile allocator state from media: O(chunks).
    fn scan(&self) -> Result<()> {
        let count = self.chunk_count();
        let mut chunks = lock(&self.chunks);
        let mut runs = self.runs.write().unwrap_or_else(|e| e.into_inner());
        *chunks = Chunks { count, ..Chunks::default() };
        runs.clear();
        runs.resize(count as usize, None);
        let mut c = 0;
        while c < count {
            let head = self.head(c)?;
            if u64::from(c) + u64::from(head.len()) > u64::from(count) {
                return Err(HeapError::Corrupt(format!(
                    "chunk {c}: {head:?} runs past the heap's {count} chunks"
                )));
            }
            chunks.mirror.insert(c, head);
            match head {
                Head::Free(n) => chunks.give_back(c, n),
                Head::Large(_) => {}
                Head::Run(class) => {
                    let run = Run::new(class, self.bitmap(c, &RunGeometry::of(class))?);
                    let listed = run.available > 0;
                    runs[c as usize] = Some(Arc::new(Mutex::new(Run { listed, ..run })));
                    if listed {
                        lock(&self.classes[class]).push(c);
                    }
                }
            }
            c += head.len();
        }
        Ok(())
    }

    /// The pool the heap lives in, as its users may touch it: stores only inside allocated or
    /// reserved blocks (see [`HeapPool`]).
    pub fn pool(&self) -> HeapPool<'_, D> {
        HeapPool::new(self)
    }

    /// The pool with every store allowed, for the crate's own structures built on the heap.
    pub(crate) fn raw_pool(&self) -> &Pool<D> {
        &self.pool
    }

    /// What recovery did to each lane when the heap was opened.
    pub fn recovery(&self) -> &[LaneRecovery] {
        &self.recovery
    }

    /// Reads the object `ptr` points to.
    pub fn get<T: Pod>(&self, ptr: PPtr<T>) -> Result<T> {
        Ok(self.pool.get(ptr)?)
    }

    /// The root object: a zeroed `T` allocated on first use, from which all live data should be
    /// reachable.
    pub fn root<T: Pod>(&self) -> Result<PPtr<T>> {
        let _only_one_creator = lock(&self.root_lock);
        let requested = std::mem::size_of::<T>() as u64;
        let root = self.pool.load_u64(layout::ROOT_WORD, Ordering::Acquire)?;
        if root != 0 {
            let stored = self.pool.load_u64(layout::ROOT_SIZE_WORD, Ordering::Acquire)?;
            if stored != requested {
                return Err(HeapError::RootSize { stored, requested });
            }
            return Ok(PPtr::new(root));
        }
        self.transaction(|tx| {
            let at = tx.alloc_bytes(requested.max(1))?;
            tx.push_word(layout::ROOT_WORD, at);
            tx.push_word(layout::ROOT_SIZE_WORD, requested);
            Ok(PPtr::new(at))
        })
    }

    /// The root object's offset and size, if the heap has one yet (unlike [`root`](Heap::root),
    /// creates nothing).
    ///
    /// ```
    /// use nvhtm::{Heap, PoolOptions, Volatile};
    /// let heap = Heap::create_in_memory(&PoolOptions::layout("doc").with_size(4 << 20), Volatile)?;
    /// assert_eq!(heap.existing_root()?, None);
    /// let root = heap.root::<[u64; 2]>()?;
    /// assert_eq!(heap.existing_root()?, Some((root.offset(), 16)));
    /// # Ok::<(), nvhtm::HeapError>(())
    /// ```
    pub fn existing_root(&self) -> Result<Option<(u64, u64)>> {
        let root = self.pool.load_u64(layout::ROOT_WORD, Ordering::Acquire)?;
        if root == 0 {
            return Ok(None);
        }
        Ok(Some((root, self.pool.load_u64(layout::ROOT_SIZE_WORD, Ordering::Acquire)?)))
    }

    /// Runs `body` as a failure-atomic transaction: everything it changed through the [`Tx`]
    /// becomes durable together when it returns `Ok`; on `Err`, a panic or a crash, none of it
    /// does.
    pub fn transaction<R, E: From<HeapError>>(
        &self,
        body: impl FnOnce(&mut Tx<'_, D>) -> Result<R, E>,
    ) -> Result<R, E> {
        let _writer = self.pool.enter_writer();
        let mut tx = Tx::begin(self, self.lane());
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| body(&mut tx))) {
            Ok(Ok(value)) => {
                tx.commit()?;
                Ok(value)
            }
            Ok(Err(e)) => {
                tx.abort()?;
                Err(e)
            }
            Err(panic) => {
                let _ = tx.abort();
                std::panic::resume_unwind(panic)
            }
        }
    }

    /// Reserves a block of at least `size` bytes in DRAM only (no persistent change).
    pub fn reserve(&self, size: u64) -> Result<Reservation> {
        // A reservation may create a run or merge chunks on media.
        let _writer = self.pool.enter_writer();
        let mut lane = self.lane();
        self.reserve_in(&mut lane, size)
    }

    /// Gives a reservation back.
    pub fn cancel(&self, reservation: Reservation) {
        self.release(reservation.kind);
    }

    /// Makes reserved blocks allocated and stores `words` (offset, value), failure-atomically
    /// in one redo-logged commit. The blocks' contents (their whole usable size) are made durable
    /// first.
    pub fn publish(&self, reservations: Vec<Reservation>, words: &[(u64, u64)]) -> Result<()> {
        self.transaction(|tx| {
            for r in reservations {
                tx.adopt(r);
            }
            for &(offset, value) in words {
                tx.redo_store(offset, value)?;
            }
            Ok(())
        })
    }

    /// Allocates a block of `size` bytes, fills it with `init`, and stores its offset in the
    /// word at `link`, failure-atomically. Returns the block's offset.
    pub fn alloc_into(&self, link: u64, size: u64, init: impl FnOnce(&mut [u8])) -> Result<u64> {
        let reservation = self.reserve(size)?;
        let mut content = vec![0u8; size as usize];
        init(&mut content);
        let offset = reservation.offset;
        if let Err(e) = self.pool.write_bytes(offset, &content) {
            self.cancel(reservation);
            return Err(e.into());
        }
        self.publish(vec![reservation], &[(link, offset)])?;
        Ok(offset)
    }

    /// Frees the block whose offset is in the word at `link` and clears the word,
    /// failure-atomically.
    pub fn free_from(&self, link: u64) -> Result<()> {
        self.transaction(|tx| {
            let offset = tx.heap().pool.load_u64(link, Ordering::Acquire)?;
            tx.free(offset)?;
            tx.redo_store(link, 0)
        })
    }

    /// Usable bytes of the allocated block at `offset`.
    pub fn usable_size(&self, offset: u64) -> Result<u64> {
        self.ensure_scanned()?;
        Ok(match self.locate(offset)? {
            Block::Small { chunk, .. } => {
                let run = self.run(chunk).ok_or(HeapError::InvalidFree { offset, why: "not a block" })?;
                let block = lock(&run).geo.block; // the guard must end before `run`
                block
            }
            Block::Large { chunks, .. } => u64::from(chunks) * CHUNK - 64,
        })
    }

    /// Counts from the allocator's volatile state.
    pub fn stats(&self) -> Result<HeapStats> {
        self.ensure_scanned()?;
        let chunks = lock(&self.chunks);
        let runs = self.runs.read().unwrap_or_else(|e| e.into_inner());
        let mut stats = HeapStats {
            chunks: chunks.count,
            free_chunks: chunks.free.values().sum(),
            ..HeapStats::default()
        };
        for run in runs.iter().flatten() {
            let run = lock(run);
            stats.runs += 1;
            stats.small_blocks += run.geo.blocks - run.available;
        }
        stats.large_blocks = chunks.mirror.values().filter(|h| matches!(h, Head::Large(_))).count() as u64;
        Ok(stats)
    }

    /// Closes the heap and its pool (a clean shutdown).
    pub fn close(self) -> Result<()> {
        Ok(self.pool.close()?)
    }

    fn run(&self, chunk: u32) -> Option<Arc<Mutex<Run>>> {
        self.runs.read().unwrap_or_else(|e| e.into_inner()).get(chunk as usize).cloned().flatten()
    }

    /// A user lane for this thread: the one it used last if free, else the next free one, else
    /// wait for its own. A thread's first search starts at the first user lane, not at a random
    /// one: which lane a workload uses (and so which size-class runs it continues, and how many
    /// fences it issues) is then the same in every run of a single-threaded recording, so a
    /// crash test's failure reproduces from its seed.
    fn lane(&self) -> MutexGuard<'_, LaneSlot> {
        thread_local! {
            static HINT: Cell<usize> = const { Cell::new(0) };
        }
        let user = self.lanes.len() - 1;
        let start = HINT.with(Cell::get) % user;
        for i in 0..user {
            let index = 1 + (start + i) % user;
            if let Ok(guard) = self.lanes[index].try_lock() {
                HINT.with(|h| h.set(index - 1));
                return guard;
            }
        }
        lock(&self.lanes[1 + start])
    }

    /// Runs a redo-only operation on `lane`: commit, apply, retire (three fences).
    fn redo_op(&self, lane: &mut LaneSlot, entries: &[(u64, u64)]) -> Result<()> {
        let _armed = PoisonOnPanic(&self.pool);
        let gen = lane.gen + 1;
        lane.log.debug_assert_unused(&self.pool, gen);
        lane.log.activate(&self.pool, gen)?;
        lane.log.write_redo(&self.pool, gen, entries)?;
        self.pool.fence()?;
        LaneLog::apply(&self.pool, entries)?;
        self.pool.fence()?;
        lane.log.retire(&self.pool, gen)?;
        self.pool.fence()?;
        lane.gen = gen;
        Ok(())
    }

    /// Takes `k` free chunks, growing the pool when none are free.
    fn take_chunks(&self, chunks: &mut Chunks, k: u32, requested: u64) -> Result<u32> {
        if let Some(start) = chunks.take(k) {
            return Ok(start);
        }
        let doubled = chunks.count + k.max(chunks.count);
        let exact = chunks.count + k;
        let mut last_error = None;
        for target in [doubled, exact] {
            let size = self.chunk_offset(target);
            match self.pool.grow(size) {
                Ok(()) => {
                    let count = self.chunk_count();
                    chunks.extend(count);
                    self.runs.write().unwrap_or_else(|e| e.into_inner()).resize(count as usize, None);
                    if let Some(start) = chunks.take(k) {
                        return Ok(start);
                    }
                }
                Err(e) => last_error = Some(e.to_string()),
            }
        }
        Err(HeapError::OutOfSpace { requested, why: last_error.unwrap_or_else(|| "the pool is full".into()) })
    }

    /// Turns a free chunk into an empty run of `class`, persistently, on the heap's own lane.
    fn create_run(&self, class: usize) -> Result<u32> {
        let mut chunks = lock(&self.chunks);
        let chunk = self.take_chunks(&mut chunks, 1, u64::from(CLASSES[class]))?;
        let geo = RunGeometry::of(class);
        let made = (|| -> Result<Vec<(u32, Head)>> {
            // The bitmap must read empty before the head says "run"; the head word itself is
            // written only by the redo log (it may head a free element now).
            let start = self.chunk_offset(chunk) + 64;
            self.pool.write_bytes(start, &vec![0u8; (geo.data - 64) as usize])?;
            self.pool.persist(start, geo.data - 64)?;
            let writes = chunks.carve(chunk, 1, Head::Run(class)).map_err(HeapError::Corrupt)?;
            let entries: Vec<(u64, u64)> =
                writes.iter().map(|&(c, h)| (self.chunk_offset(c), chunk::encode(h))).collect();
            self.redo_op(&mut lock(&self.lanes[0]), &entries)?;
            Ok(writes)
        })();
        match made {
            Ok(writes) => {
                chunks.install(chunk, 1, &writes);
                let run = Run { owned: true, ..Run::new(class, vec![0; geo.words as usize]) };
                self.runs.write().unwrap_or_else(|e| e.into_inner())[chunk as usize] =
                    Some(Arc::new(Mutex::new(run)));
                Ok(chunk)
            }
            Err(e) => {
                chunks.give_back(chunk, 1);
                Err(e)
            }
        }
    }

    /// Reserves a block of `size` bytes for the owner of `lane`.
    fn reserve_in(&self, lane: &mut LaneSlot, size: u64) -> Result<Reservation> {
        self.ensure_scanned()?;
        let Some(class) = layout::class_for(size) else {
            return self.reserve_large(size);
        };
        loop {
            if let Some(chunk) = lane.current[class] {
                if let Some(run) = self.run(chunk) {
                    let mut run = lock(&run);
                    if let Some(index) = run.reserve() {
                        return Ok(Reservation {
                            offset: self.chunk_offset(chunk) + run.geo.data + index * run.geo.block,
                            size: run.geo.block,
                            kind: Block::Small { chunk, index },
                        });
                    }
                    run.owned = false;
                }
                lane.current[class] = None;
            }
            let next = lock(&self.classes[class]).pop();
            match next {
                Some(chunk) => {
                    if let Some(run) = self.run(chunk) {
                        let mut run = lock(&run);
                        run.listed = false;
                        if run.available > 0 && !run.owned {
                            run.owned = true;
                            lane.current[class] = Some(chunk);
                        }
                    }
                }
                None => lane.current[class] = Some(self.create_run(class)?),
            }
        }
    }

    /// Reserves whole chunks for a large block. The block's bytes cover the heads of the chunks
    /// after its first; so that writing into the reserved block cannot damage the persistent
    /// partition before it is committed, the chunks are first made one free element on media
    /// (on the heap's own lane) unless they already are.
    fn reserve_large(&self, size: u64) -> Result<Reservation> {
        let k = u32::try_from((size + 64).div_ceil(CHUNK)).map_err(|_| HeapError::OutOfSpace {
            requested: size,
            why: "larger than a heap can hold".into(),
        })?;
        let mut chunks = lock(&self.chunks);
        let chunk = self.take_chunks(&mut chunks, k, size)?;
        if chunks.mirror.get(&chunk) != Some(&Head::Free(k)) {
            let merged = (|| -> Result<Vec<(u32, Head)>> {
                let writes = chunks.carve(chunk, k, Head::Free(k)).map_err(HeapError::Corrupt)?;
                let entries: Vec<(u64, u64)> =
                    writes.iter().map(|&(c, h)| (self.chunk_offset(c), chunk::encode(h))).collect();
                self.redo_op(&mut lock(&self.lanes[0]), &entries)?;
                Ok(writes)
            })();
            match merged {
                Ok(writes) => chunks.install(chunk, k, &writes),
                Err(e) => {
                    chunks.give_back(chunk, k);
                    return Err(e);
                }
            }
        }
        Ok(Reservation {
            offset: self.chunk_offset(chunk) + 64,
            size: u64::from(k) * CHUNK - 64,
            kind: Block::Large { chunk, chunks: k },
        })
    }

    /// Makes a block available again in DRAM (a cancelled reservation, or a committed free).
    fn release(&self, block: Block) {
        match block {
            Block::Small { chunk, index } => {
                if let Some(run) = self.run(chunk) {
                    let mut run = lock(&run);
                    run.release(index);
                    if !run.listed && !run.owned {
                        run.listed = true;
                        lock(&self.classes[run.class]).push(chunk);
                    }
                }
            }
            Block::Large { chunk, chunks } => lock(&self.chunks).give_back(chunk, chunks),
        }
    }

    /// Which block `offset` is the start of.
    fn locate(&self, offset: u64) -> Result<Block> {
        let invalid = |why| HeapError::InvalidFree { offset, why };
        if offset < self.header.chunks_offset + 64 || offset >= self.pool.size() {
            return Err(invalid("outside the heap's chunks"));
        }
        let chunk = ((offset - self.header.chunks_offset) / CHUNK) as u32;
        let within = offset - self.chunk_offset(chunk);
        if let Some(run) = self.run(chunk) {
            let geo = lock(&run).geo;
            if within < geo.data
                || (within - geo.data) % geo.block != 0
                || (within - geo.data) / geo.block >= geo.blocks
            {
                return Err(invalid("not the start of a block"));
            }
            return Ok(Block::Small { chunk, index: (within - geo.data) / geo.block });
        }
        match lock(&self.chunks).mirror.get(&chunk) {
            Some(&Head::Large(chunks)) if within == 64 => Ok(Block::Large { chunk, chunks }),
            _ => Err(invalid("not an allocated block")),
        }
    }

    /// Validates a free of `offset` and marks it pending.
    fn mark_free(&self, offset: u64) -> Result<Block> {
        self.ensure_scanned()?;
        let block = self.locate(offset)?;
        let invalid = |why| HeapError::InvalidFree { offset, why };
        match block {
            Block::Small { chunk, index } => {
                let run = self.run(chunk).ok_or(invalid("not a block"))?;
                let mut run = lock(&run);
                let (w, bit) = ((index / 64) as usize, 1u64 << (index % 64));
                let word = self.pool.load_u64(self.bitmap_word_offset(chunk, w as u64), Ordering::Acquire)?;
                if word & bit == 0 {
                    return Err(invalid("the block is not allocated (double free?)"));
                }
                if run.freeing[w] & bit != 0 {
                    return Err(invalid("the block is already being freed"));
                }
                run.freeing[w] |= bit;
            }
            Block::Large { chunk, .. } => {
                if !lock(&self.chunks).freeing.insert(chunk) {
                    return Err(invalid("the block is already being freed"));
                }
            }
        }
        Ok(block)
    }

    /// Forgets a pending free (the transaction aborted).
    fn unmark_free(&self, block: Block) {
        match block {
            Block::Small { chunk, index } => {
                if let Some(run) = self.run(chunk) {
                    lock(&run).freeing[(index / 64) as usize] &= !(1 << (index % 64));
                }
            }
            Block::Large { chunk, .. } => {
                lock(&self.chunks).freeing.remove(&chunk);
            }
        }
    }

    /// The redo entries that make `allocs` allocated and `frees` free, given the locks held,
    /// and the chunk heads to record in the mirror once they are committed. Changes nothing.
    fn allocation_entries(
        &self,
        chunks: Option<&Chunks>,
        runs: &BTreeMap<u32, MutexGuard<'_, Run>>,
        allocs: &[Block],
        frees: &[Block],
    ) -> Result<(RedoWords, Vec<(u32, Head)>)> {
        let mut words: BTreeMap<(u32, u64), (u64, u64)> = BTreeMap::new();
        let mut entries = Vec::new();
        let mut large = Vec::new();
        for (block, allocate) in allocs.iter().map(|b| (b, true)).chain(frees.iter().map(|b| (b, false))) {
            match *block {
                Block::Small { chunk, index } => {
                    let (set, clear) = words.entry((chunk, index / 64)).or_default();
                    *(if allocate { set } else { clear }) |= 1 << (index % 64);
                }
                Block::Large { chunk, chunks } => large.push((chunk, chunks, allocate)),
            }
        }
        for ((chunk, w), (set, clear)) in words {
            debug_assert!(runs.contains_key(&chunk));
            let at = self.bitmap_word_offset(chunk, w);
            let word = self.pool.load_u64(at, Ordering::Acquire)?;
            entries.push((at, (word | set) & !clear));
        }
        let mut heads = Vec::new();
        if let Some(chunks) = chunks {
            for (chunk, k, allocate) in large {
                let head = if allocate { Head::Large(k) } else { Head::Free(k) };
                // Reservation made the chunks exactly one free element.
                if allocate && chunks.mirror.get(&chunk) != Some(&Head::Free(k)) {
                    return Err(HeapError::Corrupt(format!(
                        "reserved chunks {chunk}+{k} are not one free element"
                    )));
                }
                entries.push((self.chunk_offset(chunk), chunk::encode(head)));
                heads.push((chunk, head));
            }
        }
        Ok((entries, heads))
    }
}
