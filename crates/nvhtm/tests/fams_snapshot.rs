//! The reflink-snapshot variant of FAMS on a real XFS file system, loop-mounted by the test
//! (as root, with xfsprogs installed — `.ci/run` installs it; elsewhere the test says it was
//! skipped and why).

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use std::process::Command;

use nvhtm::fams::{snapshot_paths, SnapshotFile};

/// A loop-mounted XFS (with reflinks) in a temporary directory, unmounted on drop. Tests hold
/// a lock while they use one: concurrent loop-device setup can race.
struct Xfs {
    mount: PathBuf,
    _dir: tempfile::TempDir,
    _one_at_a_time: std::sync::MutexGuard<'static, ()>,
}

static LOOP_DEVICES: std::sync::Mutex<()> = std::sync::Mutex::new(());

impl Drop for Xfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.mount).status();
    }
}

fn xfs() -> Option<Xfs> {
    let root = rustix::process::geteuid().is_root();
    let tools = Command::new("mkfs.xfs").arg("-V").output().is_ok_and(|o| o.status.success());
    if !root || !tools {
        println!("skipped: needs root and mkfs.xfs (root: {root}, mkfs.xfs: {tools})");
        return None;
    }
    let guard = LOOP_DEVICES.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let image = dir.path().join("xfs.img");
    let mount = dir.path().join("mnt");
    std::fs::create_dir(&mount).unwrap();
    std::fs::File::create(&image).unwrap().set_len(320 << 20).unwrap();
    let mkfs = Command::new("mkfs.xfs").args(["-q", "-f", "-m", "reflink=1"]).arg(&image).status().unwrap();
    assert!(mkfs.success(), "mkfs.xfs failed");
    let mounted = Command::new("mount").args(["-o", "loop"]).arg(&image).arg(&mount).output().unwrap();
    assert!(mounted.status.success(), "mount -o loop failed: {}", String::from_utf8_lossy(&mounted.stderr));
    Some(Xfs { mount, _dir: dir, _one_at_a_time: guard })
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[test]
fn snapshots_commit_atomically_and_restore_on_open() {
    let Some(fs) = xfs() else { return };
    let path = fs.mount.join("data");
    let mut file = SnapshotFile::create(&path, 1 << 20).unwrap();
    file.write(100, b"first sync").unwrap();
    file.sync().unwrap();
    file.write(100, b"second syn").unwrap();
    file.write(5000, b"also second").unwrap();
    file.sync().unwrap();
    file.write(100, b"NOT SYNCED").unwrap();
    drop(file); // a crash: the working file holds unsynced changes
    let file = SnapshotFile::open(&path).unwrap();
    let bytes = file.to_vec();
    assert_eq!(&bytes[100..110], b"second syn", "restored from the newest valid snapshot");
    assert_eq!(&bytes[5000..5011], b"also second");
    let modes: Vec<u32> = snapshot_paths(&path).iter().map(|p| mode(p)).collect();
    assert!(modes.iter().all(|&m| m == 0o640), "both snapshots valid after two syncs: {modes:?}");
}

#[test]
fn a_snapshot_caught_mid_sync_is_ignored() {
    let Some(fs) = xfs() else { return };
    let path = fs.mount.join("data");
    let mut file = SnapshotFile::create(&path, 1 << 20).unwrap();
    file.write(0, b"state one").unwrap();
    file.sync().unwrap();
    file.write(0, b"state two").unwrap();
    file.sync().unwrap();
    drop(file);
    // create synced zeros into .snap0 (generation 1); then "state one" went to .snap1 (2) and
    // "state two" to .snap0 (3), right after each other: the generation, not the coarse
    // modification time, says which is newer.
    let [snap0, snap1] = snapshot_paths(&path);
    let reopened = SnapshotFile::open(&path).unwrap();
    assert_eq!(&reopened.to_vec()[..9], b"state two", "the higher generation wins");
    drop(reopened);
    // A crash after step 1 of the next sync into .snap0: the older valid snapshot is restored.
    std::fs::set_permissions(&snap0, std::fs::Permissions::from_mode(0o600)).unwrap();
    let file = SnapshotFile::open(&path).unwrap();
    assert_eq!(&file.to_vec()[..9], b"state one", "the newer snapshot was invalid: the older one wins");
    drop(file);
    std::fs::set_permissions(&snap1, std::fs::Permissions::from_mode(0o600)).unwrap();
    let err = SnapshotFile::open(&path).unwrap_err();
    assert!(err.to_string().contains("no valid snapshot"), "{err}");
}

#[test]
fn a_file_system_without_reflinks_is_named() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let fs = String::from_utf8(
        Command::new("stat").args(["-f", "-c", "%T"]).arg(dir.path()).output().unwrap().stdout,
    )
    .unwrap();
    if fs.contains("xfs") || fs.contains("btrfs") {
        println!("skipped: the target directory is on {fs}, which has reflinks");
        return;
    }
    let err = SnapshotFile::create(dir.path().join("data"), 1 << 20).unwrap_err();
    assert!(err.to_string().contains("this file system has no reflinks"), "{err}");
}
