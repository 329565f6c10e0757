//! The durable queue on real pools: producers and consumers on threads (every item delivered
//! exactly once, each producer's order kept), the bound, reopening files after a clean close,
//! a FAMS pool whose file holds every acknowledged operation when it returns, and a `kill -9`
//! loop: a child process enqueues and dequeues on a pool file and prints each acknowledged
//! operation; the parent kills it at random points, reopens the pool and checks every
//! acknowledgement against what recovery found.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};

use nvhtm::queue::{Queue, QueueError, QueueOptions};
use nvhtm::{AutoDomain, Cpu, Domain, Heap, Msync, Pool, PoolOptions};

fn opts() -> PoolOptions {
    PoolOptions::layout("queue").with_size(8 << 20).with_max_size(256 << 20)
}

fn shm() -> tempfile::TempDir {
    tempfile::Builder::new().prefix("nvhtm-queue-").tempdir_in("/dev/shm").unwrap()
}

fn small() -> QueueOptions {
    QueueOptions { segment_size: 4096, capacity: None }
}

fn assert_clean<D: Domain>(queue: &Queue<D>) {
    let report = queue.check().unwrap();
    assert!(report.is_clean(), "{report:?}");
}

/// Two producers and two consumers on threads: every item is delivered exactly once, and the
/// items of each producer come out in the order it enqueued them (ids grow with it).
fn producers_and_consumers<D: Domain>(queue: &Queue<D>, per_producer: u32) {
    let taken = std::sync::Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for p in 0..2u32 {
            s.spawn(move || {
                for i in 0..per_producer {
                    queue.enqueue(format!("p{p} {i:06}").as_bytes()).unwrap();
                }
            });
        }
        for c in 0..2u32 {
            let taken = &taken;
            s.spawn(move || {
                let mut mine: Vec<(u64, Vec<u8>)> = Vec::new();
                let mut idle = 0u64;
                while taken.lock().unwrap().len() + mine.len() < 2 * per_producer as usize {
                    match queue.dequeue(c).unwrap() {
                        Some(item) => {
                            // A consumer's own dequeues come out in FIFO (id) order.
                            assert!(mine.last().is_none_or(|last| last.0 < item.0));
                            mine.push(item);
                        }
                        None => idle += 1,
                    }
                    if mine.len() % 64 == 0 || idle % 1024 == 1023 {
                        taken.lock().unwrap().append(&mut mine);
                    }
                }
                taken.lock().unwrap().append(&mut mine);
            });
        }
    });
    let mut taken = taken.into_inner().unwrap();
    taken.sort();
    let ids: HashSet<u64> = taken.iter().map(|(id, _)| *id).collect();
    assert_eq!(ids.len(), taken.len(), "an item delivered twice");
    let mut next = [0u32; 2];
    for (_, bytes) in &taken {
        let text = String::from_utf8(bytes.clone()).unwrap();
        let (p, i) = text[1..].split_once(' ').unwrap();
        let p: usize = p.parse().unwrap();
        assert_eq!(i.parse::<u32>().unwrap(), next[p], "producer {p}'s order");
        next[p] += 1;
    }
    assert_eq!(next, [per_producer; 2], "every item delivered");
    assert!(queue.is_empty());
}

#[test]
fn two_producers_and_two_consumers_deliver_every_item_once_in_order() {
    let dir = shm();
    let queue =
        Queue::open_with(Heap::<Cpu>::create(dir.path().join("q"), &opts()).unwrap(), small()).unwrap();
    producers_and_consumers(&queue, 3000);
    let stats = queue.stats();
    println!("{stats:?}");
    assert!(stats.compactions > 0, "{stats:?}");
    assert!(stats.log.commits <= stats.log.appends, "{stats:?}");
    assert_clean(&queue);
    queue.close().unwrap();
}

#[test]
fn a_bounded_queue_says_it_is_full() {
    let dir = shm();
    let heap = Heap::<Cpu>::create(dir.path().join("q"), &opts()).unwrap();
    let queue = Queue::open_with(heap, QueueOptions { capacity: Some(100), ..small() }).unwrap();
    for i in 0..100u32 {
        queue.enqueue(&i.to_le_bytes()).unwrap();
    }
    let err = queue.enqueue(b"one too many").unwrap_err();
    assert!(matches!(err, QueueError::Full { capacity: 100 }), "{err}");
    assert_eq!(queue.len(), 100);
    assert_eq!(queue.dequeue(0).unwrap().unwrap().1, 0u32.to_le_bytes());
    queue.enqueue(b"fits again").unwrap();
    queue.close().unwrap();
    let queue = Queue::open(Heap::<Cpu>::open(dir.path().join("q"), &opts()).unwrap()).unwrap();
    assert_eq!(queue.capacity(), Some(100));
    assert!(matches!(queue.enqueue(b"x"), Err(QueueError::Full { .. })));
}

/// A queue on a file pool (the `Msync` domain: each commit an msync) reopens after a clean
/// close with its items, its consumers' last dequeues and its log short.
#[test]
fn a_queue_on_a_file_reopens_after_close() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let path = dir.path().join("q.pool");
    let queue = Queue::open_with(Heap::<Msync>::create(&path, &opts()).unwrap(), small()).unwrap();
    let mut ids = Vec::new();
    for i in 0..300u32 {
        ids.push(queue.enqueue(format!("item {i}").as_bytes()).unwrap());
    }
    for (i, &id) in ids.iter().enumerate().take(250) {
        assert_eq!(queue.dequeue(i as u32 % 2).unwrap(), Some((id, format!("item {i}").into_bytes())));
    }
    assert!(queue.stats().compactions > 0);
    queue.close().unwrap();
    let queue = Queue::open(Heap::<Msync>::open(&path, &opts()).unwrap()).unwrap();
    assert_eq!(queue.len(), 50);
    assert_eq!(queue.peek().unwrap(), Some((ids[250], b"item 250".to_vec())));
    assert_eq!(queue.last_dequeued(1).unwrap(), Some((ids[249], b"item 249".to_vec())));
    assert_eq!(queue.last_dequeued(0).unwrap(), Some((ids[248], b"item 248".to_vec())));
    // Compacted up to the front item's segment.
    assert!(queue.stats().log.head > 0 && queue.stats().log.head <= ids[250], "{:?}", queue.stats());
    assert_clean(&queue);
    // The maps and the log refuse it.
    queue.close().unwrap();
    let heap = Heap::<Msync>::open(&path, &opts()).unwrap();
    assert!(nvhtm::StrictMap::open(heap).is_err());
    let heap = Heap::<Msync>::open(&path, &opts()).unwrap();
    assert!(nvhtm::log::Log::open(heap).is_err());
}

/// On a FAMS pool a commit is a FAMS sync: when an operation returns, the pool file itself
/// (read back as a crash would leave it) holds it.
#[test]
fn a_queue_on_a_fams_pool_commits_each_acknowledged_operation_to_the_file() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let path = dir.path().join("q.fams");
    let heap = Heap::<AutoDomain>::create_fams(&path, &opts()).unwrap();
    assert!(heap.pool().is_fams());
    let queue = Queue::open_with(heap, small()).unwrap();
    let committed = || {
        let image = std::fs::read(&path).unwrap();
        Queue::open(Heap::open_image(&image, &opts(), nvhtm::Volatile).unwrap()).unwrap()
    };
    let mut ids = Vec::new();
    for i in 0..40u32 {
        ids.push(queue.enqueue(format!("item {i}").as_bytes()).unwrap());
        if i % 3 == 2 {
            let (id, _) = queue.dequeue(7).unwrap().unwrap();
            let file = committed();
            assert_eq!(file.last_dequeued(7).unwrap().map(|l| l.0), Some(id));
            assert_eq!(file.contents().unwrap().last().map(|l| l.0), Some(ids[i as usize]));
            assert_eq!(file.len(), queue.len());
        }
    }
    while queue.dequeue(7).unwrap().is_some() {}
    producers_and_consumers(&queue, 300);
    queue.close().unwrap();
    let queue =
        Queue::open(Heap::load(Pool::<AutoDomain>::open_fams(&path, &opts()).unwrap()).unwrap()).unwrap();
    assert!(queue.is_empty());
    assert_clean(&queue);
}

// ---------------------------------------------------------------------------------------------
// kill -9

const CHILD: &str = "NVHTM_QUEUE_KILL_CHILD";
const PRODUCERS: u32 = 2;
const CONSUMERS: u32 = 2;

/// The child: opens the queue in `path` and runs producers and consumers until killed,
/// printing each acknowledged operation as one line: `@ E id item` (enqueued), `@ D consumer
/// id item` (dequeued).
/// The producers stop after 100 000 items each and the consumers once they are done and the
/// queue is empty (long after the parent kills the child; a child whose parent died also dies,
/// at its next line, of the broken pipe).
fn child(path: &str, round: &str) {
    use std::sync::atomic::{AtomicU32, Ordering};
    let queue = Queue::open(Heap::<Cpu>::open(path, &opts()).unwrap()).unwrap();
    let producing = AtomicU32::new(PRODUCERS);
    std::thread::scope(|s| {
        for p in 0..PRODUCERS {
            let (queue, producing) = (&queue, &producing);
            s.spawn(move || {
                for seq in 0..100_000u32 {
                    let item = format!("r{round}-p{p}-{seq:06}");
                    let id = queue.enqueue(item.as_bytes()).unwrap();
                    println!("@ E {id} {item}");
                }
                producing.fetch_sub(1, Ordering::Release);
            });
        }
        for c in 0..CONSUMERS {
            let (queue, producing) = (&queue, &producing);
            s.spawn(move || loop {
                let done = producing.load(Ordering::Acquire) == 0;
                match queue.dequeue(c).unwrap() {
                    Some((id, item)) => println!("@ D {c} {id} {}", String::from_utf8(item).unwrap()),
                    None if done => break,
                    None => {}
                }
            });
        }
    });
}

/// The queue as the parent last found it.
#[derive(Debug, Default)]
struct Seen {
    items: Vec<(u64, String)>,
    last: BTreeMap<u32, (u64, String)>,
}

fn reopen(path: &Path) -> (Seen, nvhtm::queue::QueueStats) {
    let queue = Queue::open(Heap::<Cpu>::open(path, &opts()).unwrap()).unwrap();
    assert_clean(&queue);
    let text = |b: Vec<u8>| String::from_utf8(b).unwrap();
    let items = queue.contents().unwrap().into_iter().map(|(id, b)| (id, text(b))).collect();
    let mut last = BTreeMap::new();
    for c in 0..CONSUMERS {
        if let Some((id, b)) = queue.last_dequeued(c).unwrap() {
            last.insert(c, (id, text(b)));
        }
    }
    let stats = queue.stats();
    queue.close().unwrap();
    (Seen { items, last }, stats)
}

/// Checks what recovery found after round `round` against what the queue held before it and
/// the operations the child acknowledged; `delivered` holds every id handed to a consumer so
/// far (acknowledged, or learnt from `last_dequeued` after a crash).
fn verify(round: u32, before: &Seen, lines: &[String], after: &Seen, delivered: &mut HashSet<u64>) {
    let mut known: HashMap<u64, String> = before.items.iter().cloned().collect();
    let mut acked_last: BTreeMap<u32, (u64, String)> = before.last.clone();
    let mut dequeued = HashSet::new();
    let mut next_seq = [0u32; PRODUCERS as usize];
    for line in lines {
        let fields: Vec<&str> = line.split(' ').collect();
        match fields[..] {
            ["@", "E", id, item] => {
                known.insert(id.parse().unwrap(), item.to_string());
                let p: usize = item.split('-').nth(1).unwrap()[1..].parse().unwrap();
                next_seq[p] += 1;
            }
            ["@", "D", c, id, item] => {
                let (c, id): (u32, u64) = (c.parse().unwrap(), id.parse().unwrap());
                assert!(delivered.insert(id), "round {round}: item {id} delivered twice");
                assert!(dequeued.insert(id));
                acked_last.insert(c, (id, item.to_string()));
            }
            _ => panic!("round {round}: a line the child never prints: {line:?}"),
        }
    }
    // The queue: ids grow from the front; every item known is the one enqueued; at most one
    // unacknowledged item per producer (its enqueue in flight), the next it would have
    // acknowledged; no acknowledged dequeue's item.
    assert!(after.items.windows(2).all(|w| w[0].0 < w[1].0), "round {round}: ids out of order");
    let mut unacked = 0;
    for (id, item) in &after.items {
        assert!(!dequeued.contains(id), "round {round}: item {id} came back after its dequeue");
        match known.get(id) {
            Some(expected) => assert_eq!(item, expected, "round {round}: item {id}"),
            None => {
                unacked += 1;
                let p: usize = item.split('-').nth(1).unwrap()[1..].parse().unwrap();
                assert_eq!(*item, format!("r{round}-p{p}-{:06}", next_seq[p]), "round {round}: invented");
            }
        }
    }
    assert!(unacked <= PRODUCERS, "round {round}: {unacked} unacknowledged items");
    // Each consumer's last dequeue: the last acknowledged, or the one in flight (newer, not
    // acknowledged, its item gone).
    let mut in_flight = HashSet::new();
    for c in 0..CONSUMERS {
        let found = after.last.get(&c);
        let acked = acked_last.get(&c);
        if found == acked {
            continue;
        }
        let (id, item) = found.unwrap_or_else(|| panic!("round {round}: consumer {c} lost {acked:?}"));
        assert!(acked.is_none_or(|a| a.0 < *id), "round {round}: consumer {c}: {found:?} before {acked:?}");
        assert!(!dequeued.contains(id), "round {round}: consumer {c}'s last {id} was another's");
        assert!(after.items.iter().all(|(i, _)| i != id), "round {round}: {id} both taken and queued");
        if let Some(expected) = known.get(id) {
            assert_eq!(item, expected);
        }
        assert!(delivered.insert(*id), "round {round}: item {id} delivered twice");
        in_flight.insert(*id);
    }
    // Nothing lost: every item known is queued, or was taken by a dequeue.
    for id in known.keys() {
        let queued = after.items.iter().any(|(i, _)| i == id);
        assert!(
            queued || dequeued.contains(id) || in_flight.contains(id),
            "round {round}: item {id} ({}) lost",
            known[id]
        );
    }
    // FIFO: whatever was taken was before whatever is left.
    if let Some((front, _)) = after.items.first() {
        assert!(
            dequeued.iter().chain(&in_flight).all(|id| id < front),
            "round {round}: taken past the front"
        );
    }
}

/// kill -9 at random points, eight times: every acknowledged enqueue is in the queue or was
/// dequeued, no acknowledged dequeue's item comes back, each item is delivered once, and
/// `last_dequeued` tells each consumer what its interrupted dequeue took.
#[test]
fn acknowledged_operations_survive_kill_9() {
    if let Ok(path) = std::env::var(CHILD) {
        child(&path, &std::env::var("NVHTM_QUEUE_ROUND").unwrap());
        return;
    }
    let dir = shm();
    let path = dir.path().join("q");
    Queue::open_with(Heap::<Cpu>::create(&path, &opts()).unwrap(), small()).unwrap().close().unwrap();
    let mut rng = fastrand::Rng::with_seed(0x9);
    let mut seen = Seen::default();
    let mut delivered = HashSet::new();
    let (mut acked, mut recovered_in_flight) = (0, 0);
    for round in 0..8u32 {
        // Kill after this many acknowledgements (0: while the child opens and recovers).
        let kill_after = if round == 3 { 0 } else { rng.usize(1..600) };
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "acknowledged_operations_survive_kill_9", "--nocapture", "--test-threads=1"])
            .env(CHILD, &path)
            .env("NVHTM_QUEUE_ROUND", round.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let mut lines = Vec::new();
        let mut killed = false;
        loop {
            if lines.len() >= kill_after && !killed {
                child.kill().unwrap();
                killed = true;
            }
            let mut line = String::new();
            if out.read_line(&mut line).unwrap() == 0 {
                break;
            }
            // A line cut by the kill was never acknowledged. (The test harness's own
            // "test NAME ... " may precede the first acknowledgement on its line.)
            if let (Some(line), Some(at)) = (line.strip_suffix('\n'), line.find("@ ")) {
                lines.push(line[at..].to_string());
            }
        }
        let status = child.wait().unwrap();
        assert!(killed && !status.success(), "round {round}: the child ended by itself: {status}");
        let (after, stats) = reopen(&path);
        let before_in_flight = delivered.len();
        verify(round, &seen, &lines, &after, &mut delivered);
        let taken_in_flight =
            delivered.len() - before_in_flight - lines.iter().filter(|l| l.starts_with("@ D")).count();
        println!(
            "round {round}: killed after {} acknowledgements ({kill_after} asked), {} items queued, \
             {taken_in_flight} interrupted dequeues found taken, log {} segments",
            lines.len(),
            after.items.len(),
            stats.log.segments
        );
        acked += lines.len();
        recovered_in_flight += taken_in_flight;
        seen = after;
    }
    println!("{acked} acknowledged operations checked, {recovered_in_flight} interrupted dequeues recovered");
    assert!(acked > 1000, "{acked}");
}
