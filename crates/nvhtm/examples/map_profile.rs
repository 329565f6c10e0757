//! A fixed workload on the strict map for instruction-count profiles (callgrind):
//!
//! ```text
//! cargo build --release -p nvhtm --example map_profile
//! valgrind --tool=callgrind --collect-atstart=no --toggle-collect='*measured*' \
//!     target/release/examples/map_profile cpu hit 100000
//! ```
//!
//! Arguments: the domain (`volatile` or `cpu`, a pool file in /dev/shm), the measured operation
//! (`insert`: `n` new keys into an empty map; `hit`, `miss`, `update`, `delete`: `n` of them
//! on a map pre-filled with `n` keys), and `n`. Only the function `measured` runs the measured
//! operations, so callgrind's toggle counts them alone: divide its instruction count by `n`.

use std::hint::black_box;

use nvhtm::persist::Domain;
use nvhtm::pool::PoolOptions;
use nvhtm::{Cpu, Heap, StrictMap, TypedMap, Volatile};

fn key(i: u64) -> u64 {
    // splitmix64: distinct keys, uniformly spread.
    let mut z = i.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[inline(never)]
fn measured<D: Domain>(map: &TypedMap<u64, u64, D>, op: &str, keys: &[u64]) -> u64 {
    let mut n = 0u64;
    for k in keys {
        n += match op {
            "insert" => u64::from(map.insert(k, k).unwrap()),
            "hit" | "miss" => u64::from(map.get(k).unwrap().is_some()),
            "update" => u64::from(!map.upsert(k, &(k + 1)).unwrap()),
            "delete" => u64::from(map.remove(k).unwrap()),
            _ => panic!("unknown operation {op}"),
        };
    }
    black_box(n)
}

fn run<D: Domain>(heap: Heap<D>, op: &str, n: u64) {
    let map: TypedMap<u64, u64, D> = TypedMap::new(StrictMap::open_with_seed(heap, 7).unwrap());
    if op != "insert" {
        for i in 0..n {
            map.insert(&key(i), &i).unwrap();
        }
    }
    let keys: Vec<u64> = (0..n).map(|i| if op == "miss" { key(i + n) } else { key(i) }).collect();
    let start = std::time::Instant::now();
    let done = measured(&map, op, &keys);
    let ns = start.elapsed().as_nanos() as f64 / n as f64;
    let expected = if op == "miss" { 0 } else { n };
    assert_eq!(done, expected, "{op}");
    println!("{op}: {n} operations, {ns:.0} ns each (wall clock: noisy, unlike instruction counts)");
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let [_, domain, op, n] = &args[..] else {
        panic!("usage: map_profile volatile|cpu insert|hit|miss|update|delete N");
    };
    let n: u64 = n.parse().unwrap();
    // A small reservation: valgrind cannot map the default 64 GiB one.
    let opts = PoolOptions::layout("profile").with_size(64 << 20).with_max_size(1 << 30);
    let path = std::path::PathBuf::from(format!("/dev/shm/nvhtm-map-profile-{}", std::process::id()));
    let _ = std::fs::remove_file(&path);
    match domain.as_str() {
        "volatile" => run(Heap::<Volatile>::create(&path, &opts).unwrap(), op, n),
        "cpu" => run(Heap::<Cpu>::create(&path, &opts).unwrap(), op, n),
        _ => panic!("unknown domain {domain}"),
    }
    let _ = std::fs::remove_file(&path);
}
