//! The heap's allocator and transactions, without crashes: allocation of every size, reuse,
//! growth, errors, rollback on error and panic, the root object, concurrency.

use std::collections::BTreeSet;

use nvhtm::heap::{HeapError, CHUNK, MAX_SMALL};
use nvhtm::persist::thread_stats;
use nvhtm::{AutoDomain, Heap, Msync, PPtr, Pool, PoolError, PoolOptions, Volatile};

mod common;
use common::FailingFence;

fn opts(size: u64) -> PoolOptions {
    PoolOptions::layout("heap-test").with_size(size).with_max_size(64 << 20)
}

fn heap(size: u64) -> Heap<Volatile> {
    Heap::create_in_memory(&opts(size), Volatile).unwrap()
}

#[test]
fn blocks_of_every_size_are_distinct_aligned_and_reused_after_free() {
    let heap = heap(4 << 20);
    let sizes = [1u64, 8, 16, 17, 64, 100, 1000, 4096, MAX_SMALL, MAX_SMALL + 1, 200_000];
    let mut blocks = Vec::new();
    for &size in &sizes {
        for _ in 0..3 {
            let at = heap.transaction(|tx| tx.alloc_bytes(size)).unwrap();
            assert_eq!(at % 16, 0, "size {size}");
            assert!(heap.usable_size(at).unwrap() >= size);
            blocks.push((at, heap.usable_size(at).unwrap()));
        }
    }
    let mut sorted = blocks.clone();
    sorted.sort();
    for pair in sorted.windows(2) {
        assert!(pair[0].0 + pair[0].1 <= pair[1].0, "blocks overlap: {pair:?}");
    }
    let report = heap.check(&mut |_, _| {});
    assert!(report.is_consistent(), "{report:?}");
    assert_eq!(report.small_blocks + report.large_blocks, blocks.len() as u64);

    let (first, _) = blocks[0];
    heap.transaction(|tx| tx.free(first)).unwrap();
    let again = heap.transaction(|tx| tx.alloc_bytes(1)).unwrap();
    assert_eq!(again, first, "a freed block is handed out again");
    for (at, _) in &blocks[1..] {
        heap.transaction(|tx| tx.free(*at)).unwrap();
    }
    heap.transaction(|tx| tx.free(again)).unwrap();
    let report = heap.check(&mut |_, _| {});
    assert_eq!(report.small_blocks + report.large_blocks, 0, "{report:?}");
}

#[test]
fn bad_frees_are_refused_with_a_reason() {
    let heap = heap(1 << 20);
    let at = heap.transaction(|tx| tx.alloc_bytes(100)).unwrap();
    let err = heap.transaction(|tx| tx.free(at + 16)).unwrap_err();
    assert!(err.to_string().contains("not the start of a block"), "{err}");
    heap.transaction(|tx| tx.free(at)).unwrap();
    let err = heap.transaction(|tx| tx.free(at)).unwrap_err();
    assert!(err.to_string().contains("not allocated (double free?)"), "{err}");
    let err = heap.transaction(|tx| tx.free(4096)).unwrap_err();
    assert!(err.to_string().contains("outside the heap's chunks"), "{err}");
    let err = heap
        .transaction(|tx| {
            let b = tx.alloc_bytes(10)?;
            tx.redo_store(b + 4, 1)
        })
        .unwrap_err();
    assert!(matches!(err, HeapError::InvalidRange { .. }), "{err}");
}

#[test]
fn an_error_or_a_panic_rolls_everything_back() {
    let heap = heap(1 << 20);
    let root = heap.root::<[u64; 4]>().unwrap();
    heap.transaction(|tx| tx.write(root, &[1, 2, 3, 4])).unwrap();
    let allocated = |heap: &Heap<Volatile>| {
        let report = heap.check(&mut |_, _| {});
        assert!(report.is_consistent(), "{report:?}");
        (report.small_blocks, report.large_blocks)
    };
    let before = allocated(&heap);

    let result: Result<(), HeapError> = heap.transaction(|tx| {
        tx.write(root, &[9, 9, 9, 9])?;
        let block = tx.alloc(&[7u64; 8])?;
        tx.write(root, &[block.offset(), 0, 0, 0])?;
        Err(HeapError::Corrupt("the caller changed its mind".into()))
    });
    assert!(result.is_err());
    assert_eq!(heap.get(root).unwrap(), [1, 2, 3, 4]);
    assert_eq!(allocated(&heap), before, "the allocation was rolled back");

    let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let _: Result<(), HeapError> = heap.transaction(|tx| {
            tx.write(root, &[5, 5, 5, 5])?;
            tx.alloc_bytes(50_000)?;
            panic!("boom");
        });
    }));
    assert!(panicked.is_err());
    assert_eq!(heap.get(root).unwrap(), [1, 2, 3, 4]);
    assert_eq!(allocated(&heap), before);
}

#[test]
fn the_undo_log_has_a_limit_and_exceeding_it_aborts_cleanly() {
    let heap = heap(1 << 20);
    let big = heap.transaction(|tx| tx.alloc_bytes(60_000)).unwrap();
    let err = heap.transaction(|tx| tx.write_bytes(big, &vec![1u8; 50_000])).unwrap_err();
    assert!(matches!(err, HeapError::UndoLogFull { .. }), "{err}");
    assert!(err.to_string().starts_with("transaction undo log full"));
    let mut buf = vec![9u8; 50_000];
    heap.pool().read_into(big, &mut buf).unwrap();
    assert!(buf.iter().all(|&b| b == 0), "nothing of the failed write remains");
}

#[test]
fn the_pool_grows_when_the_heap_is_full_and_says_when_it_cannot() {
    let small = PoolOptions::layout("heap-test").with_size(1 << 20).with_max_size(3 << 20);
    let heap = Heap::create_in_memory(&small, Volatile).unwrap();
    let start = heap.pool().size();
    let mut blocks = Vec::new();
    let err = loop {
        match heap.transaction(|tx| tx.alloc_bytes(CHUNK / 2)) {
            Ok(at) => blocks.push(at),
            Err(e) => break e,
        }
    };
    assert!(heap.pool().size() > start, "the pool grew");
    assert!(matches!(err, HeapError::OutOfSpace { .. }), "{err}");
    assert!(err.to_string().contains("pool cannot grow"), "{err}");
    let report = heap.check(&mut |_, _| {});
    assert!(report.is_consistent());
    assert_eq!(report.large_blocks, blocks.len() as u64);
    for at in blocks {
        heap.transaction(|tx| tx.free(at)).unwrap();
    }
    assert_eq!(heap.check(&mut |_, _| {}).free_chunks, heap.check(&mut |_, _| {}).chunks);
}

#[test]
fn the_root_and_the_data_survive_reopening_a_file_pool() {
    let dir = tempfile::tempdir_in("/dev/shm").unwrap();
    let path = dir.path().join("heap.pool");
    let o = opts(2 << 20);
    {
        let heap = Heap::<AutoDomain>::create(&path, &o).unwrap();
        let root = heap.root::<[u64; 2]>().unwrap();
        heap.transaction(|tx| {
            let text = tx.alloc_bytes(11)?;
            tx.write_bytes(text, b"hello world")?;
            tx.write(root, &[text, 11])
        })
        .unwrap();
        heap.close().unwrap();
    }
    let heap = Heap::<AutoDomain>::open(&path, &o).unwrap();
    let [text, len] = heap.get(heap.root::<[u64; 2]>().unwrap()).unwrap();
    let mut buf = vec![0u8; len as usize];
    heap.pool().read_into(text, &mut buf).unwrap();
    assert_eq!(&buf, b"hello world");
    assert!(heap.recovery().iter().all(|r| *r == nvhtm::heap::LaneRecovery::Idle));
    let err = heap.root::<u64>().unwrap_err();
    assert_eq!(err.to_string(), "root object is 16 bytes, but the type asked for is 8 bytes");
}

#[test]
fn reserve_and_publish_link_a_block_atomically() {
    let heap = heap(1 << 20);
    let root = heap.root::<[u64; 2]>().unwrap();
    let r = heap.reserve(100).unwrap();
    heap.pool().write_bytes(r.offset(), &[5u8; 100]).unwrap();
    let at = r.offset();
    heap.publish(vec![r], &[(root.offset(), at), (root.offset() + 8, 100)]).unwrap();
    assert_eq!(heap.get(root).unwrap(), [at, 100]);
    assert_eq!(heap.check(&mut |_, _| {}).small_blocks, 2, "root and the published block");
    let cancelled = heap.reserve(100).unwrap();
    let offset = cancelled.offset();
    heap.cancel(cancelled);
    assert_eq!(heap.reserve(100).unwrap().offset(), offset, "a cancelled reservation is reused");
    heap.free_from(root.offset()).unwrap();
    assert_eq!(heap.get(root).unwrap()[0], 0);
    assert_eq!(heap.check(&mut |_, _| {}).small_blocks, 1);
}

#[test]
fn persistence_work_per_operation_is_small_and_counted() {
    let heap = Heap::create_in_memory(&opts(1 << 20), nvhtm::Cpu::detect()).unwrap();
    let root = heap.root::<[u64; 8]>().unwrap();
    heap.transaction(|tx| tx.alloc_bytes(64)).unwrap(); // warm the run up
    let before = thread_stats();
    heap.transaction(|tx| {
        let b = tx.alloc_bytes(64)?;
        tx.write(root, &[b, 0, 0, 0, 0, 0, 0, 0])
    })
    .unwrap();
    let alloc_and_link = thread_stats() - before;
    let before = thread_stats();
    heap.transaction(|tx| tx.write(root, &[1, 2, 3, 4, 5, 6, 7, 8])).unwrap();
    let update = thread_stats() - before;
    println!("alloc+link tx: {alloc_and_link:?}; one-range update tx: {update:?}");
    assert_eq!(alloc_and_link.fences, 5, "snapshot, data, commit, apply, retire");
    assert_eq!(update.fences, 3, "snapshot, data, commit: no redo entries, no apply, no retire fence");
    assert!(alloc_and_link.lines_flushed <= 10, "{alloc_and_link:?}");
}

#[test]
fn threads_allocate_and_free_concurrently_without_overlap() {
    let heap = heap(4 << 20);
    let all: Vec<Vec<(u64, u64)>> = std::thread::scope(|s| {
        let workers: Vec<_> = (0..4u64)
            .map(|t| {
                let heap = &heap;
                s.spawn(move || {
                    let mut rng = fastrand::Rng::with_seed(t);
                    let mut mine: Vec<(u64, u64)> = Vec::new();
                    for _ in 0..400 {
                        if mine.len() > 20 && rng.bool() {
                            let (at, _) = mine.swap_remove(rng.usize(..mine.len()));
                            heap.transaction(|tx| tx.free(at)).unwrap();
                        } else {
                            let size = rng.u64(1..3000);
                            let at = heap.transaction(|tx| tx.alloc_bytes(size)).unwrap();
                            heap.pool().write_bytes(at, &vec![t as u8; size as usize]).unwrap();
                            mine.push((at, size));
                        }
                    }
                    mine
                })
            })
            .collect();
        workers.into_iter().map(|w| w.join().unwrap()).collect()
    });
    let mut seen = BTreeSet::new();
    for (t, blocks) in all.iter().enumerate() {
        for &(at, size) in blocks {
            assert!(seen.insert(at), "block {at:#x} handed out twice");
            let mut buf = vec![0u8; size as usize];
            heap.pool().read_into(at, &mut buf).unwrap();
            assert!(buf.iter().all(|&b| b == t as u8), "block {at:#x} of thread {t} was overwritten");
        }
    }
    let report = heap.check(&mut |_, _| {});
    assert!(report.is_consistent(), "{report:?}");
    assert_eq!(report.small_blocks, seen.len() as u64);
}

#[test]
fn typed_links_survive_in_transactions() {
    #[repr(C)]
    #[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable, Debug, PartialEq)]
    struct Node {
        value: u64,
        next: PPtr<Node>,
    }
    let heap = heap(1 << 20);
    let head = heap.root::<PPtr<Node>>().unwrap();
    for value in 1..=5 {
        heap.transaction(|tx| {
            let next = tx.read(head)?;
            let node = tx.alloc(&Node { value, next })?;
            tx.write(head, &node)
        })
        .unwrap();
    }
    let mut values = Vec::new();
    let mut at = heap.get(head).unwrap();
    while !at.is_null() {
        let node = heap.get(at).unwrap();
        values.push(node.value);
        at = node.next;
    }
    assert_eq!(values, vec![5, 4, 3, 2, 1]);
}

#[test]
fn a_transaction_too_big_for_the_redo_log_aborts_cleanly() {
    let heap = heap(1 << 20);
    let root = heap.root::<[u64; 200]>().unwrap();
    let before = heap.check(&mut |_, _| {});
    let err = heap
        .transaction(|tx| {
            tx.write(PPtr::<u64>::new(root.offset()), &7)?; // an undo-logged change
            let block = tx.alloc_bytes(64)?;
            for i in 1..200u64 {
                tx.redo_store(root.offset() + 8 * i, block)?;
            }
            Ok::<_, HeapError>(())
        })
        .unwrap_err();
    assert!(matches!(err, HeapError::RedoLogFull { .. }), "{err}");
    assert_eq!(heap.get(root).unwrap(), [0u64; 200], "the undo-logged write was rolled back");
    assert_eq!(heap.check(&mut |_, _| {}).small_blocks, before.small_blocks, "the allocation was given back");
    // The lane is usable again.
    heap.transaction(|tx| tx.write(PPtr::<u64>::new(root.offset()), &9)).unwrap();
    assert_eq!(heap.get(root).unwrap()[0], 9);
}

#[test]
fn alloc_into_links_a_filled_block_and_stats_count_it() {
    let heap = heap(1 << 20);
    let root = heap.root::<[u64; 2]>().unwrap();
    let before = heap.stats().unwrap();
    let at = heap.alloc_into(root.offset(), 300, |bytes| bytes.fill(0x5a)).unwrap();
    assert_eq!(heap.get(root).unwrap()[0], at, "the link word holds the block");
    assert_eq!(heap.pool().read::<[u8; 300]>(at).unwrap(), [0x5a; 300]);
    assert!(heap.usable_size(at).unwrap() >= 300);
    let after = heap.stats().unwrap();
    assert_eq!(after.small_blocks, before.small_blocks + 1, "{before:?} -> {after:?}");
    heap.free_from(root.offset()).unwrap();
    assert_eq!(heap.stats().unwrap().small_blocks, before.small_blocks);
}

/// A panic inside the commit protocol (here: in one of its fences) poisons the pool — the lane is
/// half way through its steps, so no later operation may run on it, or it would reuse the
/// interrupted one's generation — and reopening recovers all or nothing. A panic earlier, in the
/// transaction's body (a snapshot's fence), aborts cleanly and leaves the heap usable.
#[test]
fn a_panic_inside_a_commit_poisons_the_pool_and_reopening_recovers() {
    let dir = tempfile::tempdir_in("/dev/shm").unwrap();
    let opts = opts(1 << 20);
    let (mut poisoned, mut clean) = (0, 0);
    for fence in 0..12 {
        let path = dir.path().join(format!("p{fence}.pool"));
        Heap::<Msync>::create(&path, &opts).unwrap().close().unwrap();
        let domain = FailingFence::default();
        let heap = Heap::load(Pool::open_with_domain(&path, &opts, domain.clone()).unwrap()).unwrap();
        let root = heap.root::<[u64; 2]>().unwrap();
        heap.transaction(|tx| {
            let block = tx.alloc(&7u64)?;
            tx.write(root, &[block.offset(), 1])
        })
        .unwrap();
        let [old_block, _] = heap.get(root).unwrap();
        domain.panic_after(fence);
        let replace = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            heap.transaction(|tx| {
                tx.free(old_block)?;
                let block = tx.alloc(&8u64)?;
                tx.write(root, &[block.offset(), 2])
            })
        }));
        if replace.is_ok() {
            domain.panic_after(u64::MAX);
            assert!(fence >= 5, "the body has a fence and the commit four: all of them were hit");
            break;
        }
        let after = heap.get(root);
        if matches!(after, Err(HeapError::Pool(PoolError::Poisoned(_)))) {
            poisoned += 1;
            let write = heap.transaction(|tx| tx.write(root, &[0, 3]));
            assert!(matches!(write, Err(HeapError::Pool(PoolError::Poisoned(_)))), "{write:?}");
        } else {
            // The body's snapshot fence panicked: aborted, nothing changed, still usable.
            clean += 1;
            assert_eq!(after.unwrap(), [old_block, 1]);
        }
        drop(heap);
        let heap = Heap::<Msync>::open(&path, &opts).unwrap();
        let [block, version] = heap.get(root).unwrap();
        assert!(version == 1 && block == old_block || version == 2, "fence {fence}: {version}");
        assert_eq!(heap.get(PPtr::<u64>::new(block)).unwrap(), [7, 7, 8][version as usize]);
        let report = heap.check(&mut |_, _| {});
        assert!(report.is_consistent(), "fence {fence}: {:?}", report.problems);
        assert_eq!(report.small_blocks + report.large_blocks, 2, "root + the linked block");
        heap.transaction(|tx| tx.write(root, &[block, 9])).unwrap();
        assert_eq!(heap.get(root).unwrap(), [block, 9]);
    }
    assert!(poisoned >= 3 && clean >= 1, "{poisoned} poisoned, {clean} clean");
}

/// Creation is crash-atomic: the heap is laid out before the pool is published, so a failure
/// (or a crash) while laying it out leaves no pool at the path — never a pool without a heap,
/// which a later `create` would refuse as existing and `open` as not a heap.
#[test]
fn a_heap_that_cannot_be_laid_out_leaves_no_pool_behind() {
    let dir = tempfile::tempdir_in("/dev/shm").unwrap();
    let path = dir.path().join("small.pool");
    // 64 KiB cannot hold the heap's lanes and first chunk, and may not grow.
    let tiny = PoolOptions::layout("heap-test").with_size(64 << 10).with_max_size(64 << 10);
    let err = Heap::<Msync>::create(&path, &tiny).unwrap_err();
    assert!(matches!(err, HeapError::Pool(PoolError::GrowthLimit { .. })), "{err}");
    assert!(!path.exists(), "a pool without a heap was left at the path");
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0, "nothing left behind");
    let heap = Heap::<Msync>::create(&path, &opts(1 << 20)).unwrap();
    assert!(heap.root::<u64>().is_ok());
    let fams = dir.path().join("small-fams.pool");
    let err = Heap::<Msync>::create_fams(&fams, &tiny).unwrap_err();
    assert!(matches!(err, HeapError::Pool(PoolError::GrowthLimit { .. })), "{err}");
    assert!(!fams.exists() && !nvhtm::fams::journal_path(&fams).exists());
}

/// The heap's pool takes stores only inside blocks it handed out (allocated or reserved): the
/// pool header, the heap header, the lanes, chunk heads, run bitmaps, free blocks and the
/// bytes past a block are refused, and nothing is written.
#[test]
fn the_heaps_pool_writes_only_inside_blocks() {
    let heap = heap(4 << 20);
    let pool = heap.pool();
    let small = heap.transaction(|tx| tx.alloc_bytes(100)).unwrap();
    let small_size = heap.usable_size(small).unwrap();
    let large = heap.transaction(|tx| tx.alloc_bytes(3 * CHUNK)).unwrap();
    let large_size = heap.usable_size(large).unwrap();
    let reserved_small = heap.reserve(40).unwrap();
    let reserved_large = heap.reserve(2 * CHUNK).unwrap();
    for (at, len) in [
        (small, small_size),
        (large, large_size),
        (reserved_small.offset(), reserved_small.size()),
        (reserved_large.offset(), reserved_large.size()),
    ] {
        pool.write_bytes(at, &vec![7u8; len as usize]).unwrap();
        pool.store_u64(at + len - 8, 9, std::sync::atomic::Ordering::Release).unwrap();
        assert_eq!(pool.load_u64(at + len - 8, std::sync::atomic::Ordering::Acquire).unwrap(), 9);
    }
    let before = pool.image().unwrap();
    let run_head = small - small % CHUNK; // the run's chunk: head word, then bitmap
    let freed = heap.transaction(|tx| tx.alloc_bytes(100)).unwrap();
    heap.transaction(|tx| tx.free(freed)).unwrap();
    let before_freed = pool.image().unwrap();
    assert_eq!(before.len(), before_freed.len());
    let refused = [
        (0, 8, "pool header"),
        (pool.data_start(), 8, "heap header"),
        (pool.data_start() + 4096, 8, "a lane"),
        (run_head, 8, "a run's head"),
        (run_head + 64, 8, "a run's bitmap"),
        (large - 64, 8, "a large block's head"),
        (small + small_size - 4, 8, "across a small block's end"),
        (large + large_size - 8, 16, "past a large block's end"),
        (freed, 8, "a freed block"),
        (pool.size() - 8, 16, "past the pool"),
    ];
    for (at, len, what) in refused {
        let err = pool.write_bytes(at, &vec![0xAB; len]).unwrap_err();
        assert!(matches!(err, HeapError::NotWritable { .. }), "{what}: {err}");
    }
    for at in [pool.data_start() + 4096, run_head, run_head + 64, large - 64, freed] {
        let word = pool.store_u64(at, 1, std::sync::atomic::Ordering::Release);
        assert!(matches!(word, Err(HeapError::NotWritable { .. })), "{at:#x}: {word:?}");
        let cas = pool.compare_exchange_u64(at, 0, 1, std::sync::atomic::Ordering::AcqRel);
        assert!(matches!(cas, Err(HeapError::NotWritable { .. })), "{at:#x}: {cas:?}");
    }
    assert!(pool.image().unwrap() == before_freed, "a refused store changed the pool");
    heap.cancel(reserved_small);
    heap.cancel(reserved_large);
    let report = heap.check(&mut |_, _| {});
    assert!(report.is_consistent(), "{report:?}");
}
