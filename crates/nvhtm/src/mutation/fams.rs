//! FAMS's crash workload and oracle over the simulated storage, and its mutation suite: every
//! `fdatasync`/`fsync` site of the commit and of recovery switched off in turn.
//!
//! The file model ([`SimStorage`]) loses, at a crash, every write not synced (per 512-byte
//! sector, any prefix of a sector's writes), length changes not synced, and the journal itself
//! while its directory entry is not durable. The suite crashes a first run of writes, a growth
//! and syncs at every storage call, recovers each state, follows one in four with a second run
//! (its recovery's calls included) and crashes that at every call too — so the syncs that only
//! matter across two runs (recovery's clobbering of a torn journal) are needed by some state.

use std::collections::BTreeSet;
use std::sync::Mutex;

use crate::fams::{digest, FamsFile, FileCrashReport, Role, SimStorage, Storage};
use crate::persist::Site;
use crate::sim::{CrashFailure, CrashPointKind, CrashReport, ImageId, MutationReport, SiteOutcome};
use crate::{Pool, PoolOptions, Volatile};

/// The page size the workload assumes (the tracker's granularity on x86-64 Linux).
pub const PAGE: u64 = 4096;

/// Simulated files: a data file of `pages` zero pages, durable, with no journal yet (its
/// directory entry will be durable only once the first sync has synced the directory).
///
/// ```
/// use nvhtm::fams::{Role, Storage};
/// let storage = nvhtm::mutation::fams::fresh(4);
/// assert_eq!(storage.len(Role::Data).unwrap(), 4 * 4096);
/// ```
pub fn fresh(pages: u64) -> SimStorage {
    let sim = SimStorage::new();
    sim.set_len(Role::Data, pages * PAGE).unwrap();
    sim.sync(Role::Data).unwrap();
    sim.restart_trace();
    sim
}

/// Random writes and syncs on a [`FamsFile`] over `sim` (growing it half way); returns the
/// digest of the contents after each acknowledged sync (index 0: before any), marking each.
///
/// ```
/// let storage = nvhtm::mutation::fams::fresh(8);
/// let states = nvhtm::mutation::fams::workload(&storage, 1, 3);
/// assert_eq!(states.len(), 4);
/// ```
pub fn workload(sim: &SimStorage, seed: u64, syncs: u64) -> Vec<u64> {
    let mut file = FamsFile::open_storage(sim.clone(), 64 * PAGE).unwrap();
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut states = vec![digest(&file.to_vec())];
    for k in 1..=syncs {
        for _ in 0..rng.usize(1..6) {
            let offset = rng.u64(..file.len() - 600);
            let byte = rng.u8(..);
            file.write(offset, &vec![byte; rng.usize(1..600)]).unwrap();
        }
        if k == syncs / 2 {
            file.grow(file.len() + 4 * PAGE).unwrap();
            let end = file.len() - 10;
            file.write(end, b"grown file").unwrap();
        }
        file.sync().unwrap();
        states.push(digest(&file.to_vec()));
        sim.mark(k);
    }
    states
}

/// Opens the crash state (`data`, `journal`) as [`FamsFile::open_storage`] would after a crash
/// and checks that it holds the state of the last acknowledged sync or of the one in flight;
/// returns the storage it recovered, with `disabled` switched off in it too.
///
/// ```
/// let storage = nvhtm::mutation::fams::fresh(8);
/// let states = nvhtm::mutation::fams::workload(&storage, 1, 2);
/// let report = storage.crash_test(8, 1, |d, j, m| nvhtm::mutation::fams::check(&states, d, j, m, None).map(drop));
/// assert!(report.failures.is_empty(), "{:?}", report.failures);
/// ```
pub fn check(
    states: &[u64],
    data: &[u8],
    journal: &[u8],
    marks: &[u64],
    disabled: Option<Site>,
) -> Result<SimStorage, String> {
    let done = marks.len();
    let storage = SimStorage::from_image(data.to_vec(), journal.to_vec());
    if let Some(site) = disabled {
        storage.disable_sync(site);
    }
    let file = FamsFile::open_storage(storage.clone(), 64 * PAGE).map_err(|e| e.to_string())?;
    let found = digest(&file.to_vec());
    let allowed = &states[done..(done + 2).min(states.len())];
    if !allowed.contains(&found) {
        return Err(format!("after {done} acknowledged syncs the file is in none of the allowed states"));
    }
    Ok(storage)
}

/// The seed of the suite's first-run workload and of its crash sampling.
const SEED: u64 = 31;

/// One run of the two-run test with `disabled` switched off everywhere: the report of the
/// first run's crashes (a second run's failure fails its first-run state), the states the
/// second runs checked, and every sync site seen.
fn two_runs(disabled: Option<Site>) -> (FileCrashReport, u64, BTreeSet<Site>) {
    let storage = fresh(8);
    if let Some(site) = disabled {
        storage.disable_sync(site);
    }
    let states = workload(&storage, SEED, 6);
    let sites = Mutex::new(storage.sync_sites());
    let mut nested = 0;
    let report = storage.crash_test(16, SEED, |data, journal, marks| {
        let recovered = check(&states, data, journal, marks, disabled)?;
        let followed = (digest(data) ^ digest(journal) ^ marks.len() as u64) % 4 == 0;
        let result = if followed {
            let second = workload(&recovered, 32 + marks.len() as u64, 4);
            let inner = recovered.crash_test(8, 1, |d, j, m| check(&second, d, j, m, disabled).map(drop));
            nested += inner.images_checked;
            inner.failures.first().map_or(Ok(()), |f| Err(format!("second run: {f}")))
        } else {
            Ok(())
        };
        sites.lock().unwrap_or_else(|e| e.into_inner()).extend(recovered.sync_sites());
        result
    });
    (report, nested, sites.into_inner().unwrap_or_else(|e| e.into_inner()))
}

/// The options of the `fams-create` suite's pool.
fn create_opts() -> PoolOptions {
    PoolOptions::layout("fams-create").with_size(64 * PAGE).with_max_size(128 * PAGE)
}

/// What `init` lays out in the `fams-create` suite's pool.
const LAID_OUT: &[u8] = b"laid out by init";

/// Creates a FAMS pool over empty simulated files (`init` writing [`LAID_OUT`]), marks its
/// return, and crashes the creation at every storage call: before the mark, the files may hold
/// no pool yet (it refuses to open) or the new one; after it, the new one. Returns the report
/// and the sync sites seen.
fn create_run(disabled: Option<Site>) -> (FileCrashReport, BTreeSet<Site>) {
    let storage = SimStorage::new();
    if let Some(site) = disabled {
        storage.disable_sync(site);
    }
    storage.restart_trace();
    let pool = Pool::create_fams_on(storage.clone(), &create_opts(), Volatile, |pool| {
        pool.write_bytes(8192, LAID_OUT)
    })
    .expect("create_fams_on");
    storage.mark(0);
    let report = storage.crash_test(16, SEED, |data, journal, marks| {
        let crashed = SimStorage::from_image(data.to_vec(), journal.to_vec());
        match Pool::open_fams_on(crashed, &create_opts(), Volatile) {
            Ok(pool) => {
                let mut bytes = [0u8; LAID_OUT.len()];
                pool.read_into(8192, &mut bytes).map_err(|e| e.to_string())?;
                if bytes != LAID_OUT {
                    return Err("the pool opens without what init laid out".into());
                }
                Ok(())
            }
            Err(_) if marks.is_empty() => Ok(()),
            Err(e) => Err(format!("the creation returned, but the pool does not open: {e}")),
        }
    });
    drop(pool);
    (report, storage.sync_sites())
}

/// The mutation suite `fams-create`: [`Pool::create_fams_on`] crashed at every storage call,
/// the baseline then one run per sync site switched off.
pub fn create_suite() -> MutationReport {
    let (report, sites) = create_run(None);
    let baseline = as_crash_report(&report, 0, sites);
    let outcomes = baseline
        .sites
        .iter()
        .map(|&site| {
            let (mutant, _) = create_run(Some(site));
            SiteOutcome {
                site,
                caught: !mutant.failures.is_empty(),
                images_checked: mutant.images_checked,
                failure: mutant.failures.first().cloned(),
            }
        })
        .collect();
    MutationReport { baseline, sites: outcomes }
}

/// A storage crash's report in the simulator's terms (the crash point and the call it came
/// before are in each failure's message).
fn as_crash_report(report: &FileCrashReport, nested: u64, sites: BTreeSet<Site>) -> CrashReport {
    let failures = report
        .failures
        .iter()
        .map(|message| CrashFailure {
            message: message.clone(),
            path: vec![ImageId { point: report.crash_points as usize, choice: Vec::new() }],
            fence: None,
            kind: CrashPointKind::End,
            lines: Vec::new(),
            marks: 0,
            seed: SEED,
        })
        .collect();
    CrashReport {
        crash_points: report.crash_points,
        images_checked: report.images_checked,
        recovery_images_checked: nested,
        sites,
        failures,
        ..CrashReport::default()
    }
}

/// The mutation suite `fams-file-two-runs`: the baseline, then one run per sync site with it
/// switched off; a site is caught when some crash state is then rejected.
pub fn two_runs_suite() -> MutationReport {
    let (report, nested, sites) = two_runs(None);
    let baseline = as_crash_report(&report, nested, sites);
    let outcomes = baseline
        .sites
        .iter()
        .map(|&site| {
            let (mutant, nested, _) = two_runs(Some(site));
            SiteOutcome {
                site,
                caught: !mutant.failures.is_empty(),
                images_checked: mutant.images_checked + nested,
                failure: mutant.failures.first().cloned(),
            }
        })
        .collect();
    MutationReport { baseline, sites: outcomes }
}
