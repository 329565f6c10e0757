//! Litmus protocols: small persistence protocols, correct and deliberately broken, that show
//! what the simulator catches. Each publishes [`OPS`] records: it writes a payload, then a commit
//! record naming it; the oracle demands that every completed publish survives and that a commit
//! record never names a payload that did not persist.
//!
//! The undo-log pair ([`undo_log_recording`], [`undo_log_check`]) shows crashes *during
//! recovery*: its broken recovery passes when recovery runs to the end and fails only when
//! recovery itself crashes.

use std::sync::atomic::Ordering;

use super::{CrashContext, Recording, Sim};
use crate::persist::{Domain, FlushInstr};
use crate::pool::{Pool, PoolError, PoolOptions, HEADER_SIZE, MIN_POOL_SIZE};

/// Layout name of litmus pools.
pub const LAYOUT: &str = "litmus";
/// Publishes per run.
pub const OPS: u64 = 3;

/// Payload of publish `i` (1-based): three words in a line of their own.
fn payload_offset(i: u64) -> u64 {
    HEADER_SIZE + (i - 1) * 64
}
/// The commit record: one line of its own.
const COMMIT: u64 = HEADER_SIZE + 1024;
/// Large payloads (streamed with non-temporal stores): [`BIG`] bytes each, from here.
const BIG_AT: u64 = HEADER_SIZE + 2048;
/// Bytes of a large payload: enough for the `Cpu` domain to stream it.
const BIG: u64 = 320;
/// Self-validating records, one line each: three payload words, then the record's index.
const RECORDS: u64 = HEADER_SIZE + 8192;

fn big_offset(i: u64) -> u64 {
    BIG_AT + (i - 1) * 512
}

fn big_payload(i: u64) -> Vec<u8> {
    (0..BIG).map(|b| (i * 37 + b) as u8 | 1).collect()
}

fn record_offset(i: u64) -> u64 {
    RECORDS + (i - 1) * 64
}

fn payload(i: u64) -> [u64; 3] {
    [i * 10 + 1, i * 10 + 2, i * 10 + 3]
}

fn checksum(words: &[u64; 3]) -> u64 {
    words.iter().fold(0xcbf2_9ce4_8422_2325, |h, w| (h ^ w).wrapping_mul(0x1000_0000_01b3))
}

fn opts() -> PoolOptions {
    PoolOptions::layout(LAYOUT).with_size(MIN_POOL_SIZE).with_max_size(MIN_POOL_SIZE)
}

/// A publish protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// Payload persisted (flush + fence), then the 8-byte commit word stored and persisted.
    PersistThenPublish,
    /// The commit word is persisted before the payload.
    PublishBeforePersist,
    /// The payload is flushed but not fenced before the commit word is stored.
    MissingFence,
    /// The payload is fenced but never flushed.
    MissingFlush,
    /// Payload persisted first, but the commit record is 16 bytes (index and checksum) written
    /// as one store: it may tear at the 8-byte boundary.
    WideCommit,
    /// `clflush` instead of `clwb`, no fence between payload and commit: correct, because
    /// `clflush` is ordered with later stores.
    ClflushOrdered,
    /// Payload written with non-temporal stores, fenced, then committed.
    NonTemporal,
    /// Payload written with non-temporal stores and committed without a fence.
    NonTemporalNoFence,
    /// `clflush`: payload and commit word stored, the commit word's line flushed first, then
    /// the payload's, one fence at the end. Broken: a crash between the two `clflush`es has the
    /// commit without its payload (a crash point a model that crashes only at fences misses).
    ClflushCommitFirst,
    /// A 320-byte payload written with `write_persistent` (the `Cpu` domain streams it with
    /// non-temporal stores) under `clflush`, committed without a fence. Broken: non-temporal
    /// stores are not ordered by `clflush`, only by the next fence.
    NonTemporalClflushNoFence,
    /// As [`NonTemporalClflushNoFence`](Protocol::NonTemporalClflushNoFence), with a fence
    /// before the commit: correct.
    NonTemporalClflushFenced,
    /// Payload flushed (`clwb`), then the commit word set by a compare-and-exchange with no
    /// fence between: correct, because a locked instruction orders earlier `clwb`s like a
    /// fence (Intel SDM).
    CasPublish,
    /// Payload flushed, then the commit word stored with `Release` ordering (a plain `mov`)
    /// without a fence: broken.
    ReleasePublish,
    /// Each publish writes its own line as one 32-byte write: three payload words, then the
    /// record's index, which says the record is valid. Broken: the words of one copy persist
    /// in any order, so the index may persist without the payload.
    RecordInOneWrite,
    /// As [`RecordInOneWrite`](Protocol::RecordInOneWrite), but the index is stored after the
    /// payload by a separate 8-byte store in the same line, one flush and fence for both:
    /// correct, because the stores to one line persist in program order.
    RecordThenIndexWord,
}

impl Protocol {
    /// Every protocol.
    pub const ALL: [Protocol; 15] = [
        Protocol::PersistThenPublish,
        Protocol::PublishBeforePersist,
        Protocol::MissingFence,
        Protocol::MissingFlush,
        Protocol::WideCommit,
        Protocol::ClflushOrdered,
        Protocol::NonTemporal,
        Protocol::NonTemporalNoFence,
        Protocol::ClflushCommitFirst,
        Protocol::NonTemporalClflushNoFence,
        Protocol::NonTemporalClflushFenced,
        Protocol::CasPublish,
        Protocol::ReleasePublish,
        Protocol::RecordInOneWrite,
        Protocol::RecordThenIndexWord,
    ];

    /// Whether the protocol is crash consistent.
    pub fn is_correct(self) -> bool {
        matches!(
            self,
            Protocol::PersistThenPublish
                | Protocol::ClflushOrdered
                | Protocol::NonTemporal
                | Protocol::NonTemporalClflushFenced
                | Protocol::CasPublish
                | Protocol::RecordThenIndexWord
        )
    }

    /// The write-back instruction the protocol is meant for.
    pub fn instr(self) -> FlushInstr {
        match self {
            Protocol::ClflushOrdered
            | Protocol::ClflushCommitFirst
            | Protocol::NonTemporalClflushNoFence
            | Protocol::NonTemporalClflushFenced => FlushInstr::Clflush,
            _ => FlushInstr::Clwb,
        }
    }

    /// Publishes [`OPS`] records into `pool`, calling `completed(i)` after each.
    pub fn run<D: Domain>(self, pool: &Pool<D>, mut completed: impl FnMut(u64)) -> Result<(), PoolError> {
        for i in 1..=OPS {
            let at = payload_offset(i);
            let data = bytemuck::cast::<[u64; 3], [u8; 24]>(payload(i));
            match self {
                Protocol::PersistThenPublish => {
                    pool.write_bytes(at, &data)?;
                    pool.persist(at, 24)?;
                    pool.store_u64(COMMIT, i, Ordering::Release)?;
                    pool.persist(COMMIT, 8)?;
                }
                Protocol::PublishBeforePersist => {
                    pool.store_u64(COMMIT, i, Ordering::Release)?;
                    pool.persist(COMMIT, 8)?;
                    pool.write_bytes(at, &data)?;
                    pool.persist(at, 24)?;
                }
                Protocol::MissingFence | Protocol::ClflushOrdered => {
                    pool.write_bytes(at, &data)?;
                    pool.flush(at, 24)?;
                    pool.store_u64(COMMIT, i, Ordering::Release)?;
                    pool.persist(COMMIT, 8)?;
                }
                Protocol::MissingFlush => {
                    pool.write_bytes(at, &data)?;
                    pool.fence()?;
                    pool.store_u64(COMMIT, i, Ordering::Release)?;
                    pool.persist(COMMIT, 8)?;
                }
                Protocol::WideCommit => {
                    pool.write_bytes(at, &data)?;
                    pool.persist(at, 24)?;
                    let record: [u64; 2] = [i, checksum(&payload(i))];
                    pool.write_bytes(COMMIT, bytemuck::bytes_of(&record))?;
                    pool.persist(COMMIT, 16)?;
                }
                Protocol::NonTemporal => {
                    pool.write_persistent(at, &data)?;
                    pool.fence()?;
                    pool.store_u64(COMMIT, i, Ordering::Release)?;
                    pool.persist(COMMIT, 8)?;
                }
                Protocol::NonTemporalNoFence => {
                    pool.write_persistent(at, &data)?;
                    pool.store_u64(COMMIT, i, Ordering::Release)?;
                    pool.persist(COMMIT, 8)?;
                }
                Protocol::ClflushCommitFirst => {
                    pool.write_bytes(at, &data)?;
                    pool.store_u64(COMMIT, i, Ordering::Release)?;
                    pool.flush(COMMIT, 8)?;
                    pool.flush(at, 24)?;
                    pool.fence()?;
                }
                Protocol::NonTemporalClflushNoFence | Protocol::NonTemporalClflushFenced => {
                    pool.write_persistent(big_offset(i), &big_payload(i))?;
                    if self == Protocol::NonTemporalClflushFenced {
                        pool.fence()?;
                    }
                    pool.store_u64(COMMIT, i, Ordering::Release)?;
                    pool.persist(COMMIT, 8)?;
                }
                Protocol::CasPublish => {
                    pool.write_bytes(at, &data)?;
                    pool.flush(at, 24)?;
                    let swapped = pool.compare_exchange_u64(COMMIT, i - 1, i, Ordering::AcqRel)?;
                    debug_assert_eq!(swapped, Ok(i - 1), "one thread owns the commit word");
                    pool.persist(COMMIT, 8)?;
                }
                Protocol::ReleasePublish => {
                    pool.write_bytes(at, &data)?;
                    pool.flush(at, 24)?;
                    pool.store_u64(COMMIT, i, Ordering::Release)?;
                    pool.persist(COMMIT, 8)?;
                }
                Protocol::RecordInOneWrite => {
                    let p = payload(i);
                    let record: [u64; 4] = [p[0], p[1], p[2], i];
                    pool.write_bytes(record_offset(i), bytemuck::bytes_of(&record))?;
                    pool.persist(record_offset(i), 32)?;
                }
                Protocol::RecordThenIndexWord => {
                    pool.write_bytes(record_offset(i), &data)?;
                    pool.store_u64(record_offset(i) + 24, i, Ordering::Release)?;
                    pool.persist(record_offset(i), 32)?;
                }
            }
            completed(i);
        }
        Ok(())
    }

    /// The oracle: with `completed` publishes acknowledged, the commit record names one of
    /// them or the one in flight, and the payload it names is whole.
    pub fn check<D: Domain>(self, pool: &Pool<D>, completed: u64) -> Result<(), String> {
        if matches!(self, Protocol::RecordInOneWrite | Protocol::RecordThenIndexWord) {
            return Self::check_records(pool, completed);
        }
        let committed = pool.read::<u64>(COMMIT).map_err(|e| e.to_string())?;
        if committed < completed {
            return Err(format!("publish {completed} completed, but the commit word says {committed}"));
        }
        if committed > completed + 1 {
            return Err(format!("commit word {committed} is ahead of the history ({completed} completed)"));
        }
        if committed == 0 {
            return Ok(());
        }
        if matches!(self, Protocol::NonTemporalClflushNoFence | Protocol::NonTemporalClflushFenced) {
            let mut found = vec![0u8; BIG as usize];
            pool.read_into(big_offset(committed), &mut found).map_err(|e| e.to_string())?;
            if found != big_payload(committed) {
                let lost = found.iter().zip(big_payload(committed)).filter(|(a, b)| **a != *b).count();
                return Err(format!(
                    "publish {committed} is committed but {lost} bytes of its payload are missing"
                ));
            }
            return Ok(());
        }
        let found: [u64; 3] = pool.read(payload_offset(committed)).map_err(|e| e.to_string())?;
        if self == Protocol::WideCommit {
            let sum = pool.read::<u64>(COMMIT + 8).map_err(|e| e.to_string())?;
            if sum != checksum(&found) {
                return Err(format!("commit record ({committed}, {sum:#x}) is torn: its checksum does not match payload {found:?}"));
            }
        }
        if found != payload(committed) {
            return Err(format!("publish {committed} is committed but its payload is {found:?}"));
        }
        Ok(())
    }

    /// The oracle of the self-validating records: every completed record is valid, none past
    /// the one in flight is, and a valid record's payload is whole.
    fn check_records<D: Domain>(pool: &Pool<D>, completed: u64) -> Result<(), String> {
        for i in 1..=OPS {
            let record: [u64; 4] = pool.read(record_offset(i)).map_err(|e| e.to_string())?;
            let valid = record[3] == i;
            if i <= completed && !valid {
                return Err(format!("record {i} completed, but its index word is {}", record[3]));
            }
            if valid && i > completed + 1 {
                return Err(format!("record {i} is valid, ahead of the history ({completed} completed)"));
            }
            if valid && record[..3] != payload(i) {
                return Err(format!("record {i} is valid but its payload is {:?}", &record[..3]));
            }
        }
        Ok(())
    }

    /// Records the protocol on a fresh simulated pool (recording starts after the pool is
    /// created and durable), marking each completed publish.
    pub fn record(self) -> Recording {
        let sim = Sim::with_instr(self.instr());
        let pool = Pool::create_in_memory(&opts(), sim.clone()).expect("create a simulated pool");
        sim.restart_recording().expect("a new pool is durable");
        self.run(&pool, |i| sim.mark(i)).expect("run the protocol");
        let recording = sim.recording();
        drop(pool);
        recording
    }

    /// Recovery plus oracle for one crash image.
    pub fn check_image(self, sim: &Sim, image: &[u8], ctx: &CrashContext) -> Result<(), String> {
        let pool = Pool::open_image(image, &opts(), sim.clone()).map_err(|e| e.to_string())?;
        self.check(&pool, ctx.marks.len() as u64)
    }
}

/// Offsets of the undo-log example: a two-word value, its undo copy and the "log valid" flag.
const VALUE: u64 = HEADER_SIZE;
const UNDO: u64 = HEADER_SIZE + 64;
const FLAG: u64 = HEADER_SIZE + 128;

/// Records [`OPS`] failure-atomic updates of a two-word value through an undo log: save the old
/// value, persist, set the flag, persist, write the new value, persist, clear the flag, persist.
pub fn undo_log_recording() -> Recording {
    let sim = Sim::new();
    let pool = Pool::create_in_memory(&opts(), sim.clone()).expect("create a simulated pool");
    sim.restart_recording().expect("a new pool is durable");
    let step = |i: u64| -> Result<(), PoolError> {
        let old: [u64; 2] = pool.read(VALUE)?;
        pool.write(UNDO, &old)?;
        pool.persist(UNDO, 16)?;
        pool.store_u64(FLAG, 1, Ordering::Release)?;
        pool.persist(FLAG, 8)?;
        pool.write(VALUE, &[i, i])?;
        pool.persist(VALUE, 16)?;
        pool.store_u64(FLAG, 0, Ordering::Release)?;
        pool.persist(FLAG, 8)
    };
    for i in 1..=OPS {
        step(i).expect("update");
        sim.mark(i);
    }
    let recording = sim.recording();
    drop(pool);
    recording
}

/// Recovers an undo-log image and checks that the value is whole and no older than the last
/// completed update. `correct_recovery: false` clears the flag *before* restoring the value, so
/// a crash during recovery can leave a torn value with no log to repair it.
pub fn undo_log_check(
    sim: &Sim,
    image: &[u8],
    ctx: &CrashContext,
    correct_recovery: bool,
) -> Result<(), String> {
    let pool = Pool::open_image(image, &opts(), sim.clone()).map_err(|e| e.to_string())?;
    let recover = || -> Result<(), PoolError> {
        if pool.load_u64(FLAG, Ordering::Acquire)? == 1 {
            let undo: [u64; 2] = pool.read(UNDO)?;
            if correct_recovery {
                pool.write(VALUE, &undo)?;
                pool.persist(VALUE, 16)?;
                pool.store_u64(FLAG, 0, Ordering::Release)?;
                pool.persist(FLAG, 8)?;
            } else {
                pool.store_u64(FLAG, 0, Ordering::Release)?;
                pool.persist(FLAG, 8)?;
                pool.write(VALUE, &undo)?;
                pool.persist(VALUE, 16)?;
            }
        }
        Ok(())
    };
    recover().map_err(|e| e.to_string())?;
    let value: [u64; 2] = pool.read(VALUE).map_err(|e| e.to_string())?;
    let completed = ctx.marks.len() as u64;
    if value[0] != value[1] {
        return Err(format!("value is torn after recovery: {value:?}"));
    }
    if value[0] < completed || value[0] > completed + 1 {
        return Err(format!("value {} after recovery, but {completed} updates completed", value[0]));
    }
    Ok(())
}
