//! The pool header's crash workload and oracle: root, size and clean-flag updates.

use super::with_pool;
use crate::pool::MIN_POOL_SIZE;
use crate::sim::{CrashContext, CrashTest, MutationReport, Recording, Sim};
use crate::{PPtr, Pool, PoolOptions};

/// The pool options of the header workload (the smallest pool, growing up to 1 MiB).
///
/// ```
/// assert_eq!(nvhtm::mutation::pool::opts().max_size, 1 << 20);
/// ```
pub fn opts() -> PoolOptions {
    PoolOptions::layout("test").with_size(MIN_POOL_SIZE).with_max_size(1 << 20)
}

/// Records header updates on a new pool: updates 1 to 4 set the root to `4096 * k` (mark
/// `k`: update `k` done), update 5 grows the pool to 256 KiB.
///
/// ```
/// let recording = nvhtm::mutation::pool::record_header_updates();
/// assert!(recording.fences() >= 5);
/// ```
pub fn record_header_updates() -> Recording {
    let sim = Sim::new();
    let pool = Pool::create_in_memory(&opts(), sim.clone()).unwrap();
    sim.restart_recording().unwrap();
    for k in 1..=4u64 {
        pool.set_root(PPtr::<[u64; 4]>::new(4096 * k)).unwrap();
        sim.mark(k);
    }
    pool.grow(256 << 10).unwrap();
    sim.mark(5);
    sim.recording()
}

/// The oracle of [`record_header_updates`]: the pool opens as some state the run went through,
/// never a mix, and never loses a completed update.
///
/// ```
/// use nvhtm::mutation::pool::{check_header, record_header_updates};
/// use nvhtm::sim::CrashTest;
/// CrashTest::default().run(&record_header_updates(), check_header).assert_passed();
/// ```
///
/// Each image opens in this thread's [`ImageSlot`](crate::pool::ImageSlot), which restores only the lines that differ
/// from the previous image (the header lines, mostly) instead of mapping and copying a new pool.
pub fn check_header(sim: &Sim, image: &[u8], ctx: &CrashContext) -> Result<(), String> {
    with_pool(sim, image, ctx, &opts(), |pool| judge_header(&pool, ctx))
}

fn judge_header(pool: &Pool<Sim>, ctx: &CrashContext) -> Result<(), String> {
    let done = ctx.marks.len() as u64;
    let root = pool.root::<[u64; 4]>().map_err(|e| e.to_string())?.map_or(0, |p| p.offset() / 4096);
    let allowed_roots = match done {
        0 => vec![0, 1],
        4 | 5 => vec![4],
        d => vec![d, d + 1],
    };
    if !allowed_roots.contains(&root) {
        return Err(format!("{done} updates done, but the root is update {root}'s"));
    }
    let size = pool.size();
    if done == 5 && size != 256 << 10 || done < 4 && size != MIN_POOL_SIZE {
        return Err(format!("{done} updates done, but the size is {size}"));
    }
    Ok(())
}

/// The `pool-header` suite: header updates crashed at every point, and crashed again while the
/// opening of each image writes the header (depth 1).
pub(super) fn header_suite() -> MutationReport {
    CrashTest { recovery_depth: 1, ..CrashTest::default() }
        .mutation_run(&record_header_updates(), check_header)
}
