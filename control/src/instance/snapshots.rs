//! An instance's part of a snapshot directory: beside the VM's own files
//! (`state`, `memory`, `root.overlay`, written by the VM process, see
//! [`kiln_vmm::snapshot`]) it holds what a new instance restored from it needs:
//! the launch spec (`instance.json`) and the user-data.
//!
//! A snapshot is written into a staging directory beside its final place
//! and renamed whole once complete, so a directory at the final path is
//! always a whole snapshot.
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use super::{Instance, InstanceError, Spec};
use kiln_vmm::durable::{self, ScratchDir, ScratchError};
use kiln_vmm::snapshot::{self, ROOT_OVERLAY_FILE, SnapshotError};

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
    /// The staging directory could not be made.
    #[error(transparent)]
    Scratch(#[from] ScratchError),
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

/// An empty staging directory beside `dir`, which must not exist yet,
/// once the leftovers of killed snapshots beside it are removed: where a
/// snapshot is written before it is renamed whole, locked for as long as
/// the command writing it lives ([`durable::scratch_dir`]).
pub fn stage(dir: &Path) -> Result<ScratchDir, SnapshotsError> {
    if dir.exists() {
        return Err(SnapshotsError::Exists(dir.to_path_buf()));
    }
    let absolute = std::path::absolute(dir).map_err(io_err(dir))?;
    let parent = absolute.parent().unwrap_or(Path::new("/"));
    let name = absolute
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    Ok(durable::scratch_dir(parent, &name)?)
}

/// Adds the instance's files to the VM's snapshot in `staging` and moves
/// it, whole, to `dir`.
pub fn finish(instance: &Instance, staging: ScratchDir, dir: &Path) -> Result<(), SnapshotsError> {
    let spec_path = staging.path().join(SPEC_FILE);
    // The guest knows its address: an instance restored from the snapshot
    // must have the same one.
    let spec = Spec {
        private_ip: instance.record.address,
        ..instance.record.spec.clone()
    };
    let json = serde_json::to_vec_pretty(&spec).expect("a spec serializes");
    staging
        .write_file(SPEC_FILE, &json)
        .map_err(io_err(&spec_path))?;
    if let Some(data) = instance.user_data() {
        let bytes = fs::read(&data).map_err(io_err(&data))?;
        staging
            .write_file(USER_DATA_FILE, &bytes)
            .map_err(io_err(&staging.path().join(USER_DATA_FILE)))?;
    }
    staging.rename_to(dir).map_err(io_err(dir))
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

/// `dir` as an absolute path, for processes with other working
/// directories (or other roots, bound to the path) to find it by.
pub fn absolute(dir: &Path) -> Result<PathBuf, SnapshotsError> {
    std::path::absolute(dir).map_err(io_err(dir))
}

/// The snapshot in `dir`'s root volume writes, which an instance restored
/// from it starts with a copy of.
pub fn root_overlay(dir: &Path) -> PathBuf {
    dir.join(ROOT_OVERLAY_FILE)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A snapshot is staged beside its place, hidden and named after it
    /// (so that the next snapshot there removes it should this one be
    /// killed), and never over an existing directory.
    #[test]
    fn staging_is_beside_and_never_over_a_snapshot() {
        let parent = tempfile::tempdir().unwrap();
        let dir = parent.path().join("one");
        let staging = stage(&dir).unwrap();
        assert_eq!(staging.path().parent(), Some(parent.path()));
        let name = staging.path().file_name().unwrap().to_string_lossy();
        assert!(name.starts_with(".one.partial-"), "{name}");
        staging.rename_to(&dir).unwrap();
        assert!(matches!(stage(&dir), Err(SnapshotsError::Exists(_))));
    }
}
