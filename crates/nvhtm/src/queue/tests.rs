use super::*;
use crate::log::Log;
use crate::periodic::{PeriodicMap, PeriodicOptions};
use crate::{PoolOptions, StrictMap, Volatile};

fn heap() -> Heap<Volatile> {
    Heap::create_in_memory(
        &PoolOptions::layout("queue-test").with_size(4 << 20).with_max_size(64 << 20),
        Volatile,
    )
    .unwrap()
}

fn small(capacity: Option<u64>) -> Queue<Volatile> {
    Queue::open_with(heap(), QueueOptions { segment_size: 512, capacity }).unwrap()
}

/// Reopens a queue from a copy of its pool, as after a crash (nothing closed).
fn crash_copy(queue: &Queue<Volatile>) -> Queue<Volatile> {
    let image = queue.heap().pool().image().unwrap();
    Queue::open(Heap::open_image(&image, &PoolOptions::layout("queue-test"), Volatile).unwrap()).unwrap()
}

fn item(i: u32) -> Vec<u8> {
    let mut v = format!("item {i}").into_bytes();
    v.resize(8 + (i % 50) as usize, b'.');
    v
}

fn assert_clean(queue: &Queue<Volatile>) {
    let report = queue.check().unwrap();
    assert!(report.is_clean(), "{report:?}");
    let heap = queue.heap().stats().unwrap();
    let segments = queue.stats().log.segments as u64;
    assert_eq!(heap.small_blocks + heap.large_blocks, segments + 1, "{heap:?}: only the log and the root");
}

#[test]
fn items_come_out_in_order_across_segments_and_a_crash() {
    let queue = small(None);
    let ids: Vec<u64> = (0..100).map(|i| queue.enqueue(&item(i)).unwrap()).collect();
    assert!(ids.windows(2).all(|w| w[0] < w[1]));
    assert!(queue.stats().log.segments > 5);
    for (i, &id) in ids.iter().enumerate().take(30) {
        assert_eq!(queue.dequeue(i as u32 % 3).unwrap(), Some((id, item(i as u32))));
    }
    let reopened = crash_copy(&queue);
    assert_eq!(reopened.len(), 70);
    assert_eq!(reopened.peek().unwrap(), Some((ids[30], item(30))));
    assert_eq!(reopened.last_dequeued(2).unwrap(), Some((ids[29], item(29))));
    assert_eq!(reopened.last_dequeued(0).unwrap(), Some((ids[27], item(27))));
    assert_eq!(reopened.last_dequeued(9).unwrap(), None);
    let contents = reopened.contents().unwrap();
    assert_eq!(contents.iter().map(|(id, _)| *id).collect::<Vec<_>>(), ids[30..]);
    assert_clean(&reopened);
    for (i, &id) in ids.iter().enumerate().skip(30) {
        assert_eq!(reopened.dequeue(0).unwrap(), Some((id, item(i as u32))));
    }
    assert_eq!(reopened.dequeue(0).unwrap(), None);
    assert_clean(&reopened);
}

#[test]
fn compaction_keeps_the_log_short_and_the_last_dequeues_through_truncations() {
    let queue = small(None);
    // Consumer 7 dequeues once, early; its record is truncated many times over.
    let first = queue.enqueue(b"early").unwrap();
    assert_eq!(queue.dequeue(7).unwrap(), Some((first, b"early".to_vec())));
    let mut most_segments = 0;
    for i in 0..2000u32 {
        queue.enqueue(&item(i)).unwrap();
        queue.enqueue(&item(i + 1)).unwrap();
        queue.dequeue(i % 2).unwrap().unwrap();
        queue.dequeue(i % 2).unwrap().unwrap();
        most_segments = most_segments.max(queue.stats().log.segments);
    }
    let stats = queue.stats();
    assert!(stats.compactions > 100, "{stats:?}");
    assert_eq!(stats.compaction_failures, 0);
    assert!(most_segments <= 3, "the log grew to {most_segments} segments");
    assert!(stats.log.head > 100_000, "{stats:?}");
    assert_clean(&queue);
    let reopened = crash_copy(&queue);
    assert_eq!(reopened.last_dequeued(7).unwrap(), Some((first, b"early".to_vec())));
    assert!(reopened.is_empty());
    assert_clean(&reopened);
    // A queue that keeps items compacts up to its front only.
    let head = reopened.stats().log.head;
    for i in 0..201 {
        reopened.enqueue(&item(i)).unwrap();
    }
    for _ in 0..150 {
        reopened.dequeue(1).unwrap();
    }
    let front = reopened.peek().unwrap().unwrap().0;
    let now = reopened.stats().log.head;
    assert!(head < now && now <= front, "{head} {now} {front}");
    assert_clean(&reopened);
    assert_eq!(crash_copy(&reopened).len(), 51);
}

#[test]
fn a_bounded_queue_refuses_items_beyond_its_capacity_and_keeps_the_bound() {
    let queue = small(Some(3));
    queue.enqueue_batch(&[b"a".as_slice(), b"b"]).unwrap();
    let err = queue.enqueue_batch(&[b"c".as_slice(), b"d"]).unwrap_err();
    assert!(matches!(err, QueueError::Full { capacity: 3 }), "{err}");
    assert_eq!(err.to_string(), "the queue is full (3 items)");
    queue.enqueue(b"c").unwrap();
    assert!(matches!(queue.enqueue(b"d"), Err(QueueError::Full { .. })));
    queue.dequeue(0).unwrap();
    queue.enqueue(b"d").unwrap();
    let reopened = crash_copy(&queue);
    assert_eq!(reopened.capacity(), Some(3));
    assert!(matches!(reopened.enqueue(b"e"), Err(QueueError::Full { .. })));
    assert_eq!(reopened.contents().unwrap().len(), 3);
}

#[test]
fn items_too_large_are_refused_and_large_ones_get_segments_of_their_own() {
    let queue = small(None);
    let big = vec![9u8; 5000];
    let id = queue.enqueue(&big).unwrap();
    assert_eq!(queue.dequeue(0).unwrap(), Some((id, big.clone())));
    assert_eq!(crash_copy(&queue).last_dequeued(0).unwrap(), Some((id, big)));
    let err = queue.enqueue(&vec![0u8; MAX_ITEM + 1]).unwrap_err();
    assert!(matches!(err, QueueError::TooLarge { .. }), "{err}");
}

#[test]
fn other_structures_refuse_a_queue_pool_and_the_queue_refuses_theirs() {
    let queue = small(None);
    queue.enqueue(b"x").unwrap();
    let image = queue.heap().pool().image().unwrap();
    let open = || Heap::open_image(&image, &PoolOptions::layout("queue-test"), Volatile).unwrap();
    assert!(matches!(Log::open(open()), Err(LogError::NotALog(_))));
    assert!(matches!(StrictMap::open(open()), Err(crate::MapError::NotAMap(_))));
    assert!(matches!(PeriodicMap::open(open(), PeriodicOptions::manual()), Err(crate::MapError::NotAMap(_))));
    assert!(crate::any_map::MapKind::of(&open()).is_err());

    let log = Log::open(heap()).unwrap();
    log.append(b"r").unwrap();
    let image = log.heap().pool().image().unwrap();
    let heap = Heap::open_image(&image, &PoolOptions::layout("queue-test"), Volatile).unwrap();
    let err = Queue::open(heap).unwrap_err();
    assert!(matches!(err, QueueError::NotAQueue(_)), "{err}");
    let map = StrictMap::open(self::heap()).unwrap();
    let image = map.heap().pool().image().unwrap();
    let heap = Heap::open_image(&image, &PoolOptions::layout("queue-test"), Volatile).unwrap();
    assert!(matches!(Queue::open(heap), Err(QueueError::NotAQueue(_))));
    // A root of the queue's size that holds something else.
    let heap = self::heap();
    let root = heap.root::<[u64; 16]>().unwrap();
    heap.transaction(|tx| tx.write(root, &[7u64; 16])).unwrap();
    let err = Queue::open(heap).unwrap_err();
    assert!(err.to_string().contains("0x0000000000000007"), "{err}");
}

#[test]
fn records_that_break_the_protocol_are_a_clear_error_not_a_panic() {
    let broken = |record: &[u8]| {
        let queue = small(None);
        let a = queue.enqueue(b"a").unwrap();
        queue.enqueue(b"b").unwrap();
        // A well-checked log record the queue would never write.
        let mut bytes = record.to_vec();
        if bytes.len() > 5 {
            bytes[5..13].copy_from_slice(&(a + 8).to_le_bytes());
        }
        queue.log.append(&queue.heap, &bytes).unwrap();
        let image = queue.heap().pool().image().unwrap();
        Queue::open(Heap::open_image(&image, &PoolOptions::layout("queue-test"), Volatile).unwrap())
            .unwrap_err()
            .to_string()
    };
    let mut record = Vec::new();
    layout::deq(&mut record, 0, 0, b"a");
    let err = broken(&record);
    assert!(err.starts_with("corrupt queue") && err.contains("while the front is"), "{err}");
    assert!(broken(&[9, 9]).contains("a record of kind 9"));
    assert!(broken(&[]).contains("cut short"));
}

#[test]
fn concurrent_producers_and_consumers_deliver_each_item_once_in_order() {
    let queue = Queue::open_with(heap(), QueueOptions { segment_size: 4096, capacity: None }).unwrap();
    let per_producer = 1500u32;
    let taken = Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for p in 0..2u32 {
            let queue = &queue;
            s.spawn(move || {
                for i in 0..per_producer {
                    queue.enqueue(&[p.to_le_bytes(), i.to_le_bytes()].concat()).unwrap();
                }
            });
        }
        for c in 0..2u32 {
            let (queue, taken) = (&queue, &taken);
            s.spawn(move || {
                let mut mine = Vec::new();
                while mine.len() < per_producer as usize {
                    if let Some(got) = queue.dequeue(c).unwrap() {
                        mine.push(got);
                    }
                }
                taken.lock().unwrap().extend(mine);
            });
        }
    });
    let mut taken = taken.into_inner().unwrap();
    taken.sort();
    let mut next = [0u32; 2];
    for (_, bytes) in &taken {
        let p = u32::from_le_bytes(bytes[..4].try_into().unwrap()) as usize;
        assert_eq!(u32::from_le_bytes(bytes[4..].try_into().unwrap()), next[p], "ids in FIFO order");
        next[p] += 1;
    }
    assert_eq!(next, [per_producer; 2]);
    assert!(queue.is_empty());
    let stats = queue.stats();
    assert!(stats.log.commits <= stats.log.appends, "{stats:?}");
    assert_clean(&queue);
}
