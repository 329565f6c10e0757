//! nvhtm: the persistent-memory style of programming in Rust.
//!
//! Durable data lives in ordinary in-memory data structures inside a mapped [`pool::Pool`],
//! made durable through a [`persist::Domain`]: cache-line write-back on persistent memory,
//! `msync` on ordinary files, nothing at all for baselines, or the crash simulator
//! ([`sim::Sim`]) that proves each structure survives every crash the hardware allows.

#![warn(missing_docs)]

pub mod any_map;
mod choices;
pub mod fams;
pub mod heap;
pub mod hybrid;
pub mod log;
pub mod map;
pub mod mutation;
pub mod periodic;
pub mod persist;
pub mod pool;
pub mod queue;
mod region;
pub mod sim;

pub use any_map::{AnyMap, MapKind};
pub use heap::{Heap, HeapError, Tx};
pub use map::{MapError, StrictMap, TypedMap};
pub use periodic::{PeriodicMap, PeriodicOptions};
pub use persist::{AutoDomain, Cpu, Domain, Msync, Volatile};
pub use pool::{PPtr, Pool, PoolError, PoolOptions};
pub use sim::{CrashTest, Sim};

/// The README's code snippets, run as doc-tests.
#[cfg(doctest)]
#[doc = include_str!("../../../README.md")]
struct ReadmeDoctests;
