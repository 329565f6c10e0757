//! Pool files: round trips, growth, the root object, the lock, every bad-input error (with the
//! file left untouched), and crash atomicity of header updates under the simulator.

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;

mod common;

use common::FailingFence;
use nvhtm::persist::{thread_stats, Domain, DomainKind};
use nvhtm::pool::{MappingKind, PoolInfo, MIN_POOL_SIZE};
use nvhtm::{AutoDomain, Cpu, Msync, PPtr, Pool, PoolError, PoolOptions, Volatile};
use tempfile::TempDir;

/// A directory on an ordinary (page-cache) file system.
fn disk_dir() -> TempDir {
    tempfile::Builder::new().prefix("nvhtm-pool-").tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap()
}

/// A directory on tmpfs, which emulates persistent memory.
fn shm_dir() -> TempDir {
    tempfile::Builder::new().prefix("nvhtm-pool-").tempdir_in("/dev/shm").unwrap()
}

fn opts() -> PoolOptions {
    PoolOptions::layout("test").with_size(1 << 20)
}

fn create(dir: &TempDir) -> PathBuf {
    let path = dir.path().join("p.pool");
    Pool::<AutoDomain>::create(&path, &opts()).unwrap().close().unwrap();
    path
}

/// Asserts that opening `path` fails with `expected` and leaves the file byte-for-byte as is.
fn assert_open_fails(path: &Path, opts: &PoolOptions, expected: impl Fn(&PoolError) -> bool) -> String {
    let before = std::fs::read(path).unwrap();
    let err = Pool::<AutoDomain>::open(path, opts).expect_err("open must fail");
    assert!(expected(&err), "unexpected error: {err:?}");
    assert_eq!(std::fs::read(path).unwrap(), before, "a failed open changed the file");
    err.to_string()
}

fn patch(path: &Path, offset: usize, bytes: &[u8]) {
    let mut data = std::fs::read(path).unwrap();
    data[offset..offset + bytes.len()].copy_from_slice(bytes);
    std::fs::write(path, data).unwrap();
}

#[test]
fn create_close_open_round_trip_on_tmpfs_and_disk() {
    for (dir, mapping, domain) in
        [(shm_dir(), MappingKind::Tmpfs, DomainKind::Cpu), (disk_dir(), MappingKind::File, DomainKind::Msync)]
    {
        let path = dir.path().join("p.pool");
        let pool = Pool::<AutoDomain>::create(&path, &opts()).unwrap();
        assert_eq!(pool.mapping(), mapping);
        assert_eq!(pool.domain().kind(), domain);
        assert_eq!(pool.size(), 1 << 20);
        assert!(pool.info().in_use);
        pool.write_bytes(8192, b"survives").unwrap();
        pool.persist(8192, 8).unwrap();
        let uuid = pool.uuid();
        pool.close().unwrap();

        let info = PoolInfo::read(&path).unwrap();
        assert_eq!(info.layout, "test");
        assert!(info.clean_shutdown);
        assert!(!info.in_use);
        assert!(!info.dax);
        assert_eq!(info.size, 1 << 20);

        let pool = Pool::<AutoDomain>::open(&path, &opts()).unwrap();
        assert!(pool.was_clean());
        assert_eq!(pool.uuid(), uuid);
        let mut buf = [0u8; 8];
        pool.read_into(8192, &mut buf).unwrap();
        assert_eq!(&buf, b"survives");
        assert!(!PoolInfo::read(&path).unwrap().clean_shutdown, "an open pool is not clean");
    }
}

#[test]
fn an_image_taken_while_open_reopens_as_not_clean() {
    let dir = shm_dir();
    let path = create(&dir);
    let pool = Pool::<AutoDomain>::open(&path, &opts()).unwrap();
    pool.write_bytes(4096, &[7; 100]).unwrap();
    pool.persist(4096, 100).unwrap();
    let crashed = Pool::open_image(&pool.image().unwrap(), &opts(), Volatile).unwrap();
    assert!(!crashed.was_clean());
    assert_eq!(crashed.read::<[u8; 100]>(4096).unwrap(), [7; 100]);
}

#[test]
fn create_refuses_existing_files_small_sizes_and_bad_layouts() {
    let dir = disk_dir();
    let path = create(&dir);
    let err = Pool::<AutoDomain>::create(&path, &opts()).unwrap_err();
    assert!(matches!(err, PoolError::AlreadyExists { .. }), "{err}");
    let err = Pool::<AutoDomain>::create(dir.path().join("small"), &opts().with_size(4096)).unwrap_err();
    assert_eq!(err.to_string(), "pool size 4096 bytes is too small: the minimum is 65536 bytes");
    let err = Pool::<AutoDomain>::create(dir.path().join("l"), &PoolOptions::layout("a b")).unwrap_err();
    assert!(matches!(err, PoolError::InvalidLayout { .. }), "{err}");
    // Nothing but the one pool was left behind, temporary files included.
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
}

/// A sparse copy of a pool (`cp --sparse=always`) has holes where the pool had zeros; a store
/// into a hole of a full file system would be SIGBUS, not an error. Opening allocates them.
#[test]
fn open_allocates_the_blocks_of_a_sparse_copy() {
    use std::os::unix::fs::MetadataExt;
    let dir = disk_dir();
    let path = create(&dir);
    let copy = dir.path().join("sparse.pool");
    let copied = std::process::Command::new("cp").arg("--sparse=always").arg(&path).arg(&copy).status();
    assert!(copied.unwrap().success());
    let allocated = || std::fs::metadata(&copy).unwrap().blocks() * 512;
    let size = std::fs::metadata(&copy).unwrap().len();
    assert!(allocated() < size, "the copy is sparse: {} of {size} bytes allocated", allocated());
    let pool = Pool::<AutoDomain>::open(&copy, &opts()).unwrap();
    assert!(allocated() >= size, "after open, {} of {size} bytes are allocated", allocated());
    pool.close().unwrap();
}

#[test]
fn open_rejects_a_file_that_is_not_a_pool() {
    let dir = disk_dir();
    let path = dir.path().join("text");
    std::fs::write(&path, b"hello, this is not a pool at all".repeat(4096)).unwrap();
    let msg = assert_open_fails(&path, &opts(), |e| matches!(e, PoolError::NotAPool { .. }));
    assert!(msg.contains(r#"magic is "hello, t""#), "{msg}");
    std::fs::write(&path, b"").unwrap();
    assert_open_fails(&path, &opts(), |e| matches!(e, PoolError::NotAPool { .. }));
}

#[test]
fn open_rejects_a_wrong_layout() {
    let dir = disk_dir();
    let path = create(&dir);
    let msg = assert_open_fails(&path, &PoolOptions::layout("other"), |e| {
        matches!(e, PoolError::WrongLayout { .. })
    });
    assert!(msg.ends_with(r#"pool layout is "test", expected "other""#), "{msg}");
}

#[test]
fn open_rejects_a_newer_format_version() {
    let dir = disk_dir();
    let path = create(&dir);
    // Version 2 with a valid checksum: a pool from a newer nvhtm, not a corrupt one.
    let mut header = std::fs::read(&path).unwrap()[..256].to_vec();
    header[8..12].copy_from_slice(&2u32.to_ne_bytes());
    let sum = xxhash_rust::xxh3::xxh3_64(&header[..248]);
    header[248..256].copy_from_slice(&sum.to_ne_bytes());
    patch(&path, 0, &header);
    let msg = assert_open_fails(&path, &opts(), |e| {
        matches!(e, PoolError::NewerVersion { found: 2, supported: 1, .. })
    });
    assert!(msg.contains("pool format version 2 is newer than this build supports (1)"), "{msg}");
}

#[test]
fn open_rejects_truncated_files() {
    let dir = disk_dir();
    let path = create(&dir);
    let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    file.set_len(300 << 10).unwrap();
    let msg = assert_open_fails(&path, &opts(), |e| {
        matches!(e, PoolError::Truncated { expected: 1048576, actual: 307200, .. })
    });
    assert!(msg.ends_with("truncated: the pool needs 1048576 bytes but the file has 307200"), "{msg}");
    file.set_len(100).unwrap();
    assert_open_fails(&path, &opts(), |e| {
        matches!(e, PoolError::Truncated { expected: 4096, actual: 100, .. })
    });
}

#[test]
fn open_rejects_a_corrupt_header() {
    let dir = disk_dir();
    let path = create(&dir);
    patch(&path, 40, b"X"); // inside the layout name
    let msg = assert_open_fails(&path, &opts(), |e| matches!(e, PoolError::HeaderChecksum { .. }));
    assert!(msg.contains("header checksum mismatch"), "{msg}");

    let path = dir.path().join("slots.pool");
    Pool::<AutoDomain>::create(&path, &opts()).unwrap().close().unwrap();
    patch(&path, 256, &[0xff; 128]); // both state slots
    let msg = assert_open_fails(&path, &opts(), |e| matches!(e, PoolError::Corrupt { .. }));
    assert!(msg.ends_with("corrupt pool header: neither header state slot is valid"), "{msg}");
}

#[test]
fn a_second_writer_is_locked_out() {
    let dir = shm_dir();
    let path = create(&dir);
    let first = Pool::<AutoDomain>::open(&path, &opts()).unwrap();
    let msg = assert_open_fails(&path, &opts(), |e| matches!(e, PoolError::Locked { .. }));
    assert!(msg.ends_with("locked: another process has this pool open"), "{msg}");
    assert!(PoolInfo::read(&path).unwrap().in_use);
    drop(first);
    Pool::<AutoDomain>::open(&path, &opts()).unwrap();
}

#[test]
fn missing_files_are_named() {
    let dir = disk_dir();
    let err = Pool::<AutoDomain>::open(dir.path().join("nope"), &opts()).unwrap_err();
    assert!(matches!(err, PoolError::NotFound { .. }), "{err}");
    assert!(err.to_string().ends_with("nope: no such file"));
}

#[test]
fn the_cpu_domain_is_refused_on_page_cache_files_unless_forced() {
    let dir = disk_dir();
    let path = create(&dir);
    let err = Pool::<Cpu>::open(&path, &opts()).unwrap_err();
    assert!(matches!(err, PoolError::DomainMismatch { .. }), "{err}");
    assert!(err.to_string().contains("the cpu domain is not durable on a page-cache file mapping"));
    Pool::<Cpu>::open(&path, &opts().forced()).unwrap();
    let shm = shm_dir();
    Pool::<Cpu>::open(create(&shm), &opts()).unwrap();
}

#[test]
fn the_root_object_survives_reopening() {
    #[repr(C)]
    #[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable, Debug, PartialEq)]
    struct Root {
        count: u64,
        next: PPtr<Root>,
    }
    let dir = shm_dir();
    let path = create(&dir);
    let pool = Pool::<AutoDomain>::open(&path, &opts()).unwrap();
    assert_eq!(pool.root::<Root>().unwrap(), None);
    let root = PPtr::<Root>::new(8192);
    pool.set(root, &Root { count: 42, next: PPtr::null() }).unwrap();
    pool.persist_ptr(root).unwrap();
    pool.set_root(root).unwrap();
    pool.close().unwrap();

    let pool = Pool::<AutoDomain>::open(&path, &opts()).unwrap();
    let root = pool.root::<Root>().unwrap().expect("root set");
    assert_eq!(pool.get(root).unwrap(), Root { count: 42, next: PPtr::null() });
    let err = pool.root::<u64>().unwrap_err();
    assert_eq!(err.to_string(), "root object is 16 bytes, but the type asked for is 8 bytes");
    let err = pool.set_root(PPtr::<Root>::new(1 << 20)).unwrap_err();
    assert!(matches!(err, PoolError::OutOfBounds { .. }), "{err}");
}

#[test]
fn pools_grow_in_place_and_stop_at_the_reservation() {
    for dir in [shm_dir(), disk_dir()] {
        let path = dir.path().join("g.pool");
        let small = PoolOptions::layout("test").with_size(MIN_POOL_SIZE).with_max_size(4 << 20);
        let pool = Pool::<AutoDomain>::create(&path, &small).unwrap();
        let base = pool.read::<u64>(0).unwrap();
        pool.grow(3 << 20).unwrap();
        assert_eq!(pool.size(), 3 << 20);
        pool.write_bytes((3 << 20) - 8, b"the end!").unwrap();
        pool.persist((3 << 20) - 8, 8).unwrap();
        assert_eq!(pool.read::<u64>(0).unwrap(), base);
        let err = pool.grow(5 << 20).unwrap_err();
        assert_eq!(
            err.to_string(),
            "pool cannot grow to 5242880 bytes: 4194304 bytes of address space are reserved \
             (reopen with a larger max size)"
        );
        pool.close().unwrap();
        let pool = Pool::<AutoDomain>::open(&path, &small).unwrap();
        assert_eq!(pool.size(), 3 << 20);
        assert_eq!(&pool.read::<[u8; 8]>((3 << 20) - 8).unwrap(), b"the end!");
    }
}

/// A grow whose header update failed left the mapping grown and the header at the old size: a
/// retry must not take the grown mapping for a finished grow and report success.
#[test]
fn a_retried_grow_is_not_done_until_the_header_says_so() {
    let domain = FailingFence::default();
    let pool = Pool::create_in_memory(&opts().with_max_size(4 << 20), domain.clone()).unwrap();
    domain.fail_after(0);
    let err = pool.grow(2 << 20).unwrap_err();
    assert!(matches!(err, PoolError::Persist(_)), "{err}");
    domain.recover();
    let retried = pool.grow(2 << 20);
    assert!(matches!(retried, Err(PoolError::Poisoned(_))), "{retried:?}");
    assert_eq!(pool.info().size, 1 << 20, "the header still has the old size");
}

#[test]
fn accessors_check_bounds_alignment_and_protect_the_header() {
    let pool = Pool::create_in_memory(&opts(), Volatile).unwrap();
    let err = pool.write_bytes(100, b"x").unwrap_err();
    assert_eq!(err.to_string(), "range 0x64+1 is outside the pool's usable space 0x1000..0x100000");
    assert!(matches!(pool.read::<u64>((1 << 20) - 4), Err(PoolError::OutOfBounds { .. })));
    assert!(matches!(pool.read::<u64>(u64::MAX - 2), Err(PoolError::OutOfBounds { .. })));
    assert!(matches!(
        pool.store_u64(4097, 1, Ordering::Relaxed),
        Err(PoolError::Misaligned { offset: 4097 })
    ));
    assert_eq!(pool.compare_exchange_u64(4096, 0, 5, Ordering::AcqRel).unwrap(), Ok(0));
    assert_eq!(pool.compare_exchange_u64(4096, 0, 6, Ordering::AcqRel).unwrap(), Err(5));
    assert_eq!(pool.load_u64(4096, Ordering::Acquire).unwrap(), 5);
}

#[test]
fn a_failed_flush_poisons_the_pool() {
    let domain = FailingFence::default();
    let pool = Pool::create_in_memory(&opts(), domain.clone()).unwrap();
    pool.write_bytes(8192, b"data").unwrap();
    domain.fail_after(0);
    let err = pool.persist(8192, 4).unwrap_err();
    assert!(matches!(err, PoolError::Persist(_)), "{err}");
    assert!(err.to_string().starts_with("msync failed at crates/nvhtm/tests/pool.rs:"), "{err}");
    // Every later access is refused, even after the device recovers, until the pool is
    // reopened: reads too, since the memory holds bytes whose persist failed.
    domain.recover();
    assert!(matches!(pool.read::<[u8; 4]>(8192), Err(PoolError::Poisoned(_))));
    assert!(matches!(pool.read_into(8192, &mut [0; 4]), Err(PoolError::Poisoned(_))));
    assert!(matches!(pool.load_u64(8192, Ordering::Acquire), Err(PoolError::Poisoned(_))));
    assert!(matches!(pool.load_words::<2>(8192), Err(PoolError::Poisoned(_))));
    assert!(matches!(pool.bytes_eq(8192, b"data"), Err(PoolError::Poisoned(_))));
    assert!(matches!(pool.root::<u64>(), Err(PoolError::Poisoned(_))));
    assert!(matches!(pool.image(), Err(PoolError::Poisoned(_))));
    assert!(matches!(pool.fence(), Err(PoolError::Poisoned(_))), "no fence vouches for the pool");
    let err = pool.write_bytes(8192, b"more").unwrap_err();
    assert!(matches!(err, PoolError::Poisoned(_)), "{err}");
    assert!(err
        .to_string()
        .starts_with("the pool refuses reads and writes until it is reopened: an earlier flush failed"));
    assert!(matches!(pool.store_u64(8192, 1, Ordering::Relaxed), Err(PoolError::Poisoned(_))));
    assert!(matches!(pool.set_root(PPtr::<u64>::new(8192)), Err(PoolError::Poisoned(_))));
    assert!(matches!(pool.close(), Err(PoolError::Poisoned(_))), "a poisoned pool is not marked clean");

    // Opening writes the header, so a failing device fails the open too.
    let image = Pool::create_in_memory(&opts(), Volatile).unwrap().image().unwrap();
    let failing = FailingFence::default();
    failing.fail_after(0);
    let err = Pool::open_image(&image, &opts(), failing).unwrap_err();
    assert!(matches!(err, PoolError::Persist(_)), "{err}");
}

#[test]
fn the_msync_domain_syncs_pages_and_batches_ranges() {
    let dir = disk_dir();
    let path = dir.path().join("m.pool");
    let pool = Pool::<Msync>::create(&path, &opts()).unwrap();
    let before = thread_stats();
    for i in 0..4u64 {
        pool.write_bytes(8192 + i * 100, &[1; 100]).unwrap();
        pool.flush(8192 + i * 100, 100).unwrap();
    }
    pool.write_bytes(65536, &[2; 10]).unwrap();
    pool.flush(65536, 10).unwrap();
    pool.fence().unwrap();
    let used = thread_stats() - before;
    assert_eq!(used.fences, 1);
    assert_eq!(used.syncs, 2, "four flushes in one page and one in another: two msyncs");
    assert_eq!(used.bytes_written, 410);
}

/// A thread's pending msync ranges belong to the pool that flushed them: a range left behind
/// by a pool dropped on another thread (so never fenced by this one) is not synced by this
/// thread's next fence in another pool, which would fail on the unmapped memory and poison it.
#[test]
fn an_msync_fence_syncs_only_its_own_pools_ranges() {
    let dir = disk_dir();
    let a = std::sync::Arc::new(Pool::<Msync>::create(dir.path().join("a.pool"), &opts()).unwrap());
    let b = Pool::<Msync>::create(dir.path().join("b.pool"), &opts()).unwrap();
    let (flushed, wait_flushed) = std::sync::mpsc::channel();
    let (dropped, wait_dropped) = std::sync::mpsc::channel();
    let a_there = a.clone();
    let worker = std::thread::spawn(move || {
        a_there.write_bytes(8192, b"pending").unwrap();
        a_there.flush(8192, 7).unwrap();
        drop(a_there);
        flushed.send(()).unwrap();
        wait_dropped.recv().unwrap();
        b.write_bytes(8192, b"b's data").unwrap();
        (b.persist(8192, 8), b)
    });
    wait_flushed.recv().unwrap();
    drop(a); // the last handle: A closes and unmaps on this thread
    dropped.send(()).unwrap();
    let (persisted, b) = worker.join().unwrap();
    persisted.expect("B's fence syncs B's ranges only");
    b.write_bytes(8192, b"more").expect("B is not poisoned");
    b.close().unwrap();
}

/// Header updates (root, size, clean flag) are failure-atomic: a crash at any point of a run
/// that moves the root back and forth and grows the pool opens as some state the run went
/// through, never a mix, and never loses a completed update. Crashes during the opening
/// (which writes the header) are explored too.
#[test]
fn header_updates_are_crash_atomic() {
    // The `pool-header` mutation suite's workload and oracle.
    let report = nvhtm::mutation::suite("pool-header").unwrap().run();
    println!("header updates: {report}");
    report.baseline.assert_passed();
    assert!(report.baseline.recovery_images_checked > 0);
    assert!(!report.sites.is_empty());
    assert!(report.missed().is_empty(), "{report}");
}
