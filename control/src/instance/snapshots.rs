//! An instance's part of a snapshot directory: beside the VM's own files
//! (`state`, `memory`, `root.overlay`, written by the VM process, see
//! [`kiln_vmm::snapshot`]) it holds what a new instance restored from it needs:
//! the launch spec (`instance.json`) and the user-data.
//!
//! A snapshot is written into a staging directory beside its final place
//! and renamed whole once complete, so a directory at the final path is
//! always a whole snapshot.
use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};

use tempfile::TempDir;

use super::{Instance, InstanceError, Spec};
use kiln_vmm::snapshot::{self, ROOT_OVERLAY_FILE, SnapshotError};
use kiln_vmm::{durable, flock};

/// The instance's launch spec inside a snapshot.
pub const SPEC_FILE: &str = "instance.json";
/// The instance's user-data inside a snapshot.
pub const USER_DATA_FILE: &str = "user-data";

/// What can go wrong with an instance's snapshot files.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotsError {
    /// A file of the snapshot could not be read, written or renamed.
    #[error("{path}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// What the call on it said.
        #[source]
        source: io::Error,
    },
    /// The snapshot's directory is there already: snapshots never
    /// overwrite one another.
    #[error("{0}: already exists; a snapshot goes into a new directory")]
    Exists(PathBuf),
    /// The snapshot's `instance.json` is not JSON of a [`Spec`].
    #[error("{path}: not an instance snapshot")]
    Spec {
        /// The spec file.
        path: PathBuf,
        /// Why it does not parse.
        #[source]
        source: serde_json::Error,
    },
    /// The VM's part of the snapshot is damaged or missing.
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    /// The instance's own files could not be had.
    #[error(transparent)]
    Instance(#[from] InstanceError),
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> SnapshotsError + '_ {
    move |source| SnapshotsError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Where a snapshot is written before it is renamed whole: a directory
/// beside its final place, locked (flock) for as long as the command
/// writing it lives. A command killed half-way cannot remove its staging
/// directory; the lock, gone with it, tells the next [`stage`] beside it
/// that the directory is a leftover to remove, not another's work.
pub struct Staging {
    dir: TempDir,
    _lock: File,
}

impl Staging {
    /// The staging directory.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

/// What staging directories are named after the snapshot's own name:
/// `.NAME.partial-XXXXXX`, hidden, beside it.
const STAGING_MARK: &str = ".partial-";
/// The random characters after [`STAGING_MARK`].
const STAGING_RANDOM: usize = 6;

/// An empty staging directory beside `dir`, which must not exist yet,
/// once the leftovers of killed snapshots beside it are removed.
pub fn stage(dir: &Path) -> Result<Staging, SnapshotsError> {
    if dir.exists() {
        return Err(SnapshotsError::Exists(dir.to_path_buf()));
    }
    let absolute = std::path::absolute(dir).map_err(io_err(dir))?;
    let parent = absolute.parent().unwrap_or(Path::new("/"));
    let name = absolute
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    // Held (on the parent directory itself) until the new staging
    // directory is locked: another snapshot beside it, removing
    // leftovers meanwhile, would take it for one.
    let beside = File::open(parent).map_err(io_err(parent))?;
    flock::lock_exclusive(&beside, true).map_err(io_err(parent))?;
    remove_leftovers(parent)?;
    let dir = tempfile::Builder::new()
        .prefix(&format!(".{name}{STAGING_MARK}"))
        .rand_bytes(STAGING_RANDOM)
        .tempdir_in(parent)
        .map_err(io_err(parent))?;
    let lock = File::open(dir.path()).map_err(io_err(dir.path()))?;
    flock::lock_exclusive(&lock, false).map_err(io_err(dir.path()))?;
    Ok(Staging { dir, _lock: lock })
}

/// Removes the staging directories in `parent` that no live command
/// holds.
fn remove_leftovers(parent: &Path) -> Result<(), SnapshotsError> {
    for entry in fs::read_dir(parent).map_err(io_err(parent))? {
        let path = entry.map_err(io_err(parent))?.path();
        let staging = path.file_name().is_some_and(|n| {
            let n = n.to_string_lossy();
            n.rsplit_once(STAGING_MARK)
                .is_some_and(|(head, tail)| head.starts_with('.') && tail.len() == STAGING_RANDOM)
        });
        if !staging || !path.is_dir() {
            continue;
        }
        let free = File::open(&path).and_then(|d| flock::lock_exclusive(&d, false));
        match free {
            Ok(true) => fs::remove_dir_all(&path).map_err(io_err(&path))?,
            Ok(false) => {}
            // Removed meanwhile by its own command.
            Err(err) if err.kind() == io::ErrorKind::NotFound => {}
            Err(err) => return Err(io_err(&path)(err)),
        }
    }
    Ok(())
}

/// Adds the instance's files to the VM's snapshot in `staging` and moves
/// it, whole, to `dir`.
pub fn finish(instance: &Instance, staging: Staging, dir: &Path) -> Result<(), SnapshotsError> {
    let spec_path = staging.path().join(SPEC_FILE);
    // The guest knows its address: an instance restored from the snapshot
    // must have the same one.
    let spec = Spec {
        private_ip: instance.record.address,
        ..instance.record.spec.clone()
    };
    let json = serde_json::to_vec_pretty(&spec).expect("a spec serializes");
    write_synced(&spec_path, &json)?;
    if let Some(data) = instance.user_data() {
        let bytes = fs::read(&data).map_err(io_err(&data))?;
        write_synced(&staging.path().join(USER_DATA_FILE), &bytes)?;
    }
    let staged = staging.dir.keep();
    File::open(&staged)
        .and_then(|d| d.sync_all())
        .map_err(io_err(&staged))?;
    durable::rename_dir(&staged, dir).map_err(io_err(dir))
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<(), SnapshotsError> {
    fs::write(path, bytes)
        .and_then(|()| File::open(path)?.sync_all())
        .map_err(io_err(path))
}

/// The spec (named `name` if given) and user-data of the snapshot in
/// `dir`, once its state and memory files have been checked whole.
pub fn read(dir: &Path, name: Option<String>) -> Result<(Spec, Option<Vec<u8>>), SnapshotsError> {
    snapshot::load(dir)?;
    let spec_path = dir.join(SPEC_FILE);
    let bytes = fs::read(&spec_path).map_err(io_err(&spec_path))?;
    let mut spec: Spec = serde_json::from_slice(&bytes).map_err(|source| SnapshotsError::Spec {
        path: spec_path.clone(),
        source,
    })?;
    spec.name = name;
    let data_path = dir.join(USER_DATA_FILE);
    let user_data = match fs::read(&data_path) {
        Ok(data) => Some(data),
        Err(err) if err.kind() == io::ErrorKind::NotFound => None,
        Err(err) => return Err(io_err(&data_path)(err)),
    };
    Ok((spec, user_data))
}

/// Gives `instance` its own copy of the snapshot's root volume writes.
pub fn copy_root(dir: &Path, instance: &Instance) -> Result<(), SnapshotsError> {
    let source = dir.join(ROOT_OVERLAY_FILE);
    let from = File::open(&source).map_err(io_err(&source))?;
    let target = instance.root_overlay();
    let to = File::create(&target).map_err(io_err(&target))?;
    durable::copy_sparse(&from, &to)
        .and_then(|_| to.sync_all())
        .map_err(io_err(&target))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A killed snapshot's staging directory (no lock on it) goes at the
    /// next snapshot beside it; a live one's stays, and so do the user's
    /// own directories.
    #[test]
    fn staging_removes_only_unheld_leftovers() {
        let parent = tempfile::tempdir().unwrap();
        let live = stage(&parent.path().join("one")).unwrap();
        let killed = parent.path().join(".two.partial-a1B2c3");
        fs::create_dir(&killed).unwrap();
        fs::write(killed.join("memory"), b"half").unwrap();
        let users = parent.path().join(".notes.partial-old");
        fs::create_dir(&users).unwrap();

        let next = stage(&parent.path().join("three")).unwrap();
        assert!(
            !killed.exists(),
            "the killed snapshot's leftover is removed"
        );
        assert!(live.path().is_dir(), "a live snapshot's staging stays");
        assert!(next.path().is_dir());
        assert!(users.is_dir(), "not a staging directory's name");
    }

    /// Snapshots staged beside one another at once never take each
    /// other's fresh staging directory for a leftover.
    #[test]
    fn concurrent_stagings_all_stay() {
        let parent = tempfile::tempdir().unwrap();
        let stagings: Vec<Staging> = std::thread::scope(|scope| {
            let threads: Vec<_> = (0..16)
                .map(|n| {
                    let dir = parent.path().join(format!("s{n}"));
                    scope.spawn(move || stage(&dir).unwrap())
                })
                .collect();
            threads.into_iter().map(|t| t.join().unwrap()).collect()
        });
        assert!(stagings.iter().all(|s| s.path().is_dir()));
    }
}
