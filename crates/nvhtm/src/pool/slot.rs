//! A reusable mapping for opening crash images as pools: [`ImageSlot`] and
//! [`Pool::open_image_in`].

use std::cell::RefCell;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use super::backing::SlotMemory;
use super::header;
use super::open::{check_layout, page_round};
use super::{Pool, PoolError, PoolOptions, Result};
use crate::persist::Domain;
use crate::region::Region;
use crate::sim::ImageDelta;

const LINE: u64 = 64;

/// One bit per 64-byte line: the lines a pool opened in a slot stored to, and the lines a
/// hint says the next image changes.
pub(crate) struct LineSet {
    bits: Box<[AtomicU64]>,
}

impl LineSet {
    fn new(lines: u64) -> LineSet {
        LineSet { bits: (0..lines.div_ceil(64)).map(|_| AtomicU64::new(0)).collect() }
    }

    fn lines(&self) -> u64 {
        self.bits.len() as u64 * 64
    }

    /// Marks the lines of `offset..offset + len` (those past the set's end are not tracked:
    /// the slot copies everything past the image it holds anyway).
    #[inline]
    pub(crate) fn mark(&self, offset: u64, len: u64) {
        if len == 0 {
            return;
        }
        let last = ((offset + len - 1) / LINE).min(self.lines().saturating_sub(1));
        let mut line = offset / LINE;
        while line <= last {
            self.bits[(line / 64) as usize].fetch_or(1 << (line % 64), Ordering::Relaxed);
            line += 1;
        }
    }
}

/// What a slot holds: bytes `0..len` equal the image it last restored (`source`, `seq`: the
/// delta it was given, if any), except in the lines marked in `stale`.
#[derive(Debug, Clone, Copy)]
struct Held {
    len: u64,
    source: Option<(u64, u64)>,
}

/// A mapping kept for opening image after image as a pool ([`Pool::open_image_in`]), so that
/// each open costs the bytes that differ from what the slot already holds instead of a fresh
/// mapping, its page faults and a copy of the whole image (≈ 0.37 ms for 1 MiB).
///
/// The slot restores its memory to each new image. It knows which lines the previous pool
/// stored to (every store into a pool goes through the pool's accessors, which tell the slot);
/// which lines the new image differs from the previous one in it learns from a
/// [`hint`](ImageSlot::hint) — the [`ImageDelta`] a [`CrashTest`](crate::sim::CrashTest) gives
/// each check in its [`CrashContext`](crate::sim::CrashContext). Without a hint (or with one
/// that is not relative to the image the slot holds) the image is copied whole, which is still
/// cheaper than [`Pool::open_image`]'s fresh mapping. In debug builds every open checks that
/// the slot's bytes equal the image's.
///
/// A pool is as long as its header says; a pool whose header declares more than the slot
/// has mapped gets a larger mapping (the slot maps more of its reservation, or replaces it
/// with a larger reservation when `opts.max_size` asks for more address space than it has), and
/// such a pool grows in the slot as an in-memory pool does (its new bytes are zero).
///
/// ```
/// use std::cell::RefCell;
/// use std::sync::atomic::Ordering;
/// use nvhtm::pool::ImageSlot;
/// use nvhtm::sim::{CrashTest, Sim};
/// use nvhtm::{Pool, PoolOptions};
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let opts = PoolOptions::layout("slot").with_size(64 << 10).with_max_size(64 << 10);
/// let sim = Sim::new();
/// let pool = Pool::create_in_memory(&opts, sim.clone())?;
/// sim.restart_recording()?;
/// for i in 1..=3 {
///     pool.store_u64(4096, i, Ordering::Release)?;
///     pool.persist(4096, 8)?;
/// }
/// // One slot for every image: each open copies only what changed since the last one.
/// let slot = RefCell::new(ImageSlot::new());
/// let report = CrashTest::default().run(&sim.recording(), |sim, image, ctx| {
///     let mut slot = slot.borrow_mut();
///     slot.hint(&ctx.delta);
///     Pool::open_image_in(&mut slot, image, &opts, sim.clone(), |pool| {
///         let n = pool.load_u64(4096, Ordering::Acquire).map_err(|e| e.to_string())?;
///         pool.store_u64(4096, 99, Ordering::Release).map_err(|e| e.to_string())?; // restored next time
///         if n > 3 { Err(format!("counter {n}")) } else { Ok(()) }
///     })
///     .map_err(|e| e.to_string())?
/// });
/// report.assert_passed();
/// # Ok(()) }
/// ```
pub struct ImageSlot {
    region: Option<Region>,
    stale: Arc<LineSet>,
    held: Option<Held>,
    /// The delta of the next image, when it is relative to the one held.
    hinted: Option<(u64, u64)>,
    trusted: bool,
    whole_copies: u64,
    lines_copied: u64,
    abandoned: u64,
}

impl std::fmt::Debug for ImageSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ImageSlot")
            .field("held", &self.held.map(|h| h.len))
            .field("whole_copies", &self.whole_copies)
            .field("lines_copied", &self.lines_copied)
            .finish_non_exhaustive()
    }
}

impl Default for ImageSlot {
    fn default() -> ImageSlot {
        ImageSlot::new()
    }
}

impl ImageSlot {
    /// An empty slot: its mapping is made at the first open.
    pub fn new() -> ImageSlot {
        ImageSlot {
            region: None,
            stale: Arc::new(LineSet::new(0)),
            held: None,
            hinted: None,
            trusted: false,
            whole_copies: 0,
            lines_copied: 0,
            abandoned: 0,
        }
    }

    /// Runs `f` with this thread's slot, [hinted](ImageSlot::hint) with `delta`: the usual way
    /// for a crash check to open its image (`delta` is its
    /// [`CrashContext::delta`](crate::sim::CrashContext::delta)). A call nested inside another
    /// gets a fresh slot.
    ///
    /// ```
    /// use nvhtm::pool::ImageSlot;
    /// use nvhtm::sim::{CrashTest, Sim};
    /// use nvhtm::{Heap, PoolOptions};
    /// let opts = PoolOptions::layout("local-slot").with_size(512 << 10);
    /// let sim = Sim::new();
    /// let heap = Heap::create_in_memory(&opts, sim.clone()).unwrap();
    /// sim.restart_recording().unwrap();
    /// heap.transaction(|tx| tx.alloc_bytes(100).map(drop)).unwrap();
    /// let report = CrashTest::default().run(&sim.recording(), |sim, image, ctx| {
    ///     ImageSlot::with_local(&ctx.delta, |slot| {
    ///         Heap::open_image_in(slot, image, &opts, sim.clone(), |heap| heap.check(&mut |_, _| {}).is_consistent())
    ///     })
    ///     .map_err(|e| e.to_string())?
    ///     .then_some(())
    ///     .ok_or_else(|| "inconsistent".to_string())
    /// });
    /// report.assert_passed();
    /// ```
    pub fn with_local<R>(delta: &ImageDelta, f: impl FnOnce(&mut ImageSlot) -> R) -> R {
        thread_local! {
            static LOCAL: RefCell<ImageSlot> = RefCell::new(ImageSlot::new());
        }
        LOCAL.with(|local| match local.try_borrow_mut() {
            Ok(mut slot) => {
                slot.hint(delta);
                f(&mut slot)
            }
            Err(_) => f(&mut ImageSlot::new()),
        })
    }

    /// Tells the slot where the next image it opens differs from the previous one (the
    /// [`CrashContext::delta`](crate::sim::CrashContext::delta) of the check about to open
    /// it). The hint counts only when it follows on the image the slot holds (the delta of the
    /// next image of the same replay); otherwise the next open copies the image whole. The
    /// caller promises the next image is the one the delta describes.
    pub fn hint(&mut self, delta: &ImageDelta) {
        self.hinted = Some((delta.source, delta.seq));
        let follows =
            delta.seq > 0 && self.held.is_some_and(|held| held.source == Some((delta.source, delta.seq - 1)));
        self.trusted = follows && !delta.whole;
        if self.trusted {
            for &unit in &delta.units {
                self.stale.mark(unit, delta.unit);
            }
        }
    }

    /// How many opens copied the image whole (no usable hint, or a new mapping).
    pub fn whole_copies(&self) -> u64 {
        self.whole_copies
    }

    /// How many 64-byte lines opens restored one by one.
    pub fn lines_copied(&self) -> u64 {
        self.lines_copied
    }

    /// How many mappings the slot gave up to pools that outlived their open.
    pub fn abandoned(&self) -> u64 {
        self.abandoned
    }

    /// Gives up the mapping to a pool that outlived its open: leaked, so that it stays valid
    /// for that pool, and replaced at the next open.
    fn abandon_mapping(&mut self) {
        if let Some(region) = self.region.take() {
            std::mem::forget(region);
        }
        self.held = None;
        self.stale = Arc::new(LineSet::new(0));
        self.abandoned += 1;
    }

    /// Makes the slot's first `len` bytes equal `image[..len]`, in a reservation of at least
    /// `reserved` bytes.
    fn restore(&mut self, image: &[u8], len: u64, reserved: u64) -> std::io::Result<()> {
        let trusted = std::mem::take(&mut self.trusted);
        let source = self.hinted.take();
        let held = self.held.take();
        let mapped = page_round(len);
        let (region, fresh) = match self.region.take() {
            Some(region) if region.reserved() >= reserved => (region, held.is_none()),
            old => {
                drop(old);
                (Region::anonymous(mapped, reserved)?, true)
            }
        };
        if region.len() < mapped {
            region.grow(None, mapped)?;
        }
        let lines = len.div_ceil(LINE);
        let mut stale = std::mem::replace(&mut self.stale, Arc::new(LineSet::new(0)));
        let mut resized = false;
        if Arc::get_mut(&mut stale).is_none() || stale.lines() < lines {
            stale = Arc::new(LineSet::new(lines.max(stale.lines())));
            resized = true;
        }
        // SAFETY: the region has at least `mapped >= len` writable bytes and no pool uses it
        // (the slot is borrowed mutably, and every pool it lent was dropped before).
        let memory = unsafe { std::slice::from_raw_parts_mut(region.base(), len as usize) };
        let image = &image[..len as usize];
        match held {
            Some(held) if trusted && !fresh && !resized => {
                let common = held.len.min(len);
                for (w, word) in stale.bits.iter().enumerate() {
                    let mut bits = word.swap(0, Ordering::Relaxed);
                    while bits != 0 {
                        let line = w as u64 * 64 + u64::from(bits.trailing_zeros());
                        bits &= bits - 1;
                        let start = line * LINE;
                        if start < common {
                            let range = start as usize..(start + LINE).min(common) as usize;
                            memory[range.clone()].copy_from_slice(&image[range]);
                            self.lines_copied += 1;
                        }
                    }
                }
                if len > common {
                    memory[common as usize..].copy_from_slice(&image[common as usize..]);
                }
            }
            _ => {
                memory.copy_from_slice(image);
                stale.bits.iter().for_each(|w| w.store(0, Ordering::Relaxed));
                self.whole_copies += 1;
            }
        }
        debug_assert!(memory == image, "the slot's bytes differ from the image after a restore");
        self.stale = stale;
        self.region = Some(region);
        self.held = Some(Held { len, source });
        Ok(())
    }
}

impl<D: Domain> Pool<D> {
    /// [`Pool::open_image`] in a reusable mapping: opens `image` as a pool in `slot`'s memory
    /// and hands it to `f`, which owns it (to build a heap or a map on it) and is expected to
    /// drop it before returning. Per image the slot copies only the lines that differ from what
    /// it holds — those the previous pool stored to, and those the slot's
    /// [`hint`](ImageSlot::hint) names — or the whole image when it has no usable hint. See
    /// [`ImageSlot`].
    ///
    /// A pool that outlives `f` (returned in `R`, or leaked) keeps the slot's memory: the slot
    /// then gives that mapping up for good — it is never unmapped or reused — and maps anew at
    /// its next open.
    pub fn open_image_in<R>(
        slot: &mut ImageSlot,
        image: &[u8],
        opts: &PoolOptions,
        domain: D,
        f: impl FnOnce(Pool<D>) -> R,
    ) -> Result<R> {
        let path = Path::new("<image>");
        let header = header::parse(path, image, image.len() as u64)
            .and_then(|header| check_layout(&header, &opts.layout, path).map(|()| header));
        let header = match header {
            Ok(header) => header,
            Err(e) => {
                // The hint was for this image: it must not carry over to the next.
                slot.trusted = false;
                slot.hinted = None;
                return Err(e);
            }
        };
        let len = header.state.size;
        let reserved = page_round(opts.max_size.max(len));
        slot.restore(image, len, reserved).map_err(|e| PoolError::io(path, "mmap", e))?;
        let Some(region) = &slot.region else {
            return Err(PoolError::io(path, "mmap", std::io::Error::other("the slot has no mapping")));
        };
        // SAFETY: the slot's reservation (of at least `reserved` bytes) is private anonymous
        // memory with `len` writable bytes; it stays mapped while the slot lives, and the slot
        // is borrowed mutably until the pool is dropped below, so nothing else touches it.
        let region = unsafe { Region::borrowed(region.base_nonnull(), len, reserved) };
        let was_clean = header.state.clean_shutdown == 1;
        let mut pool = Pool::assemble(region, domain, Box::new(SlotMemory), path, header, was_clean);
        pool.written = Some(slot.stale.clone());
        pool.update_state(|s| s.clean_shutdown = 0)?;
        let result = f(pool);
        // Every pool opened in the slot holds a clone of `stale`: another holder now is a pool
        // that outlived `f`, still using the mapping.
        if Arc::strong_count(&slot.stale) > 1 {
            slot.abandon_mapping();
        }
        Ok(result)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::persist::Volatile;
    use std::sync::atomic::Ordering;

    fn opts(size: u64) -> PoolOptions {
        PoolOptions::layout("slot").with_size(size).with_max_size(4 << 20)
    }

    fn image(size: u64, fill: u8) -> Vec<u8> {
        let pool = Pool::create_in_memory(&opts(size), Volatile).unwrap();
        for at in (4096..size).step_by(4096) {
            pool.write_bytes(at, &[fill; 100]).unwrap();
        }
        pool.image().unwrap()
    }

    /// What a slot pool holds right after opening `image`: exactly what `open_image` gives.
    fn opened(slot: &mut ImageSlot, image: &[u8], scribble: bool) -> Vec<u8> {
        Pool::open_image_in(slot, image, &opts(64 << 10), Volatile, |pool| {
            let bytes = pool.image().unwrap();
            if scribble {
                pool.write_bytes(8192, &[0xee; 300]).unwrap();
                pool.store_u64(pool.size() - 8, 7, Ordering::Release).unwrap();
                pool.grow(pool.size() + (64 << 10)).unwrap();
                pool.write_bytes(pool.size() - 100, &[0xdd; 100]).unwrap();
            }
            bytes
        })
        .unwrap()
    }

    fn expected(image: &[u8]) -> Vec<u8> {
        Pool::open_image(image, &opts(64 << 10), Volatile).unwrap().image().unwrap()
    }

    #[test]
    fn each_open_sees_exactly_its_image_whatever_the_previous_pool_wrote() {
        let a = image(128 << 10, 1);
        let b = image(64 << 10, 2);
        let c = image(256 << 10, 3);
        let mut slot = ImageSlot::new();
        for img in [&a, &b, &c, &a, &c, &b, &b] {
            assert_eq!(opened(&mut slot, img, true), expected(img));
        }
    }

    #[test]
    fn a_trusted_hint_restores_only_the_changed_lines() {
        let a = image(128 << 10, 1);
        let mut b = a.clone();
        b[70_000] ^= 0xff;
        let mut slot = ImageSlot::new();
        let delta = |seq, units: Vec<u64>| ImageDelta { source: 77, seq, units, unit: 64, whole: seq == 0 };
        slot.hint(&delta(0, vec![]));
        assert_eq!(opened(&mut slot, &a, true), expected(&a));
        assert_eq!(slot.whole_copies(), 1);
        slot.hint(&delta(1, vec![70_000 / 64 * 64]));
        assert_eq!(opened(&mut slot, &b, true), expected(&b));
        assert_eq!(slot.whole_copies(), 1, "the second open restores lines only");
        assert!(slot.lines_copied() < 32, "{} lines", slot.lines_copied());
        // A delta that does not follow on the held image is not trusted.
        slot.hint(&delta(5, vec![]));
        assert_eq!(opened(&mut slot, &a, false), expected(&a));
        assert_eq!(slot.whole_copies(), 2);
    }

    #[test]
    fn a_pool_that_outlives_its_open_keeps_its_memory() {
        let a = image(64 << 10, 5);
        let b = image(64 << 10, 6);
        let mut slot = ImageSlot::new();
        let kept = Pool::open_image_in(&mut slot, &a, &opts(64 << 10), Volatile, |pool| pool).unwrap();
        assert_eq!(slot.abandoned(), 1);
        // The next open maps anew: it neither sees nor disturbs the escaped pool.
        assert_eq!(opened(&mut slot, &b, true), expected(&b));
        drop(slot);
        assert_eq!(kept.image().unwrap(), expected(&a));
    }

    #[test]
    fn a_pool_larger_than_the_slot_reservation_gets_a_new_one() {
        let mut slot = ImageSlot::new();
        let small = image(64 << 10, 4);
        assert_eq!(opened(&mut slot, &small, true), expected(&small));
        let big_opts = PoolOptions::layout("slot").with_size(64 << 10).with_max_size(16 << 20);
        let grown = Pool::open_image_in(&mut slot, &small, &big_opts, Volatile, |pool| {
            pool.grow(8 << 20).unwrap();
            pool.image().unwrap()
        })
        .unwrap();
        assert_eq!(grown.len(), 8 << 20);
        assert!(grown[64 << 10..].iter().all(|&b| b == 0));
        assert_eq!(opened(&mut slot, &small, false), expected(&small));
    }
}
