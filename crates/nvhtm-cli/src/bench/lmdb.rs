//! LMDB through heed, the peer of `nvhtm bench log` (with the `lmdb` feature): one write
//! transaction per put, LMDB's default durability (its commit syncs the data and meta pages).

use std::path::Path;

use heed::types::Bytes;
use heed::{Database, EnvOpenOptions};
use nvhtm::persist::PersistStats;

/// Puts `keys` (each thread its share) with `value`, one committed write transaction each,
/// timed by `timed`; returns what `timed` measured.
pub(super) fn puts(
    path: &Path,
    threads: usize,
    keys: &[[u8; 8]],
    value: &[u8],
    timed: impl FnOnce(usize, u64, &(dyn Fn(usize, u64) + Sync)) -> (f64, PersistStats),
) -> Result<(f64, PersistStats), Box<dyn std::error::Error>> {
    std::fs::create_dir_all(path)?;
    // SAFETY: a new directory of this process's own; no other environment is opened on it.
    let env = unsafe { EnvOpenOptions::new().map_size(1 << 30).max_dbs(1).open(path)? };
    let mut wtxn = env.write_txn()?;
    let db: Database<Bytes, Bytes> = env.create_database(&mut wtxn, None)?;
    wtxn.commit()?;
    let measured = timed(threads, keys.len() as u64, &|_, i| {
        let mut wtxn = env.write_txn().expect("write transaction");
        db.put(&mut wtxn, &keys[i as usize], value).expect("put");
        wtxn.commit().expect("commit");
    });
    drop(env);
    std::fs::remove_dir_all(path)?;
    Ok(measured)
}
