//! A container's bind mounts, copied from the host (`ExecRequest::mounts`,
//! made by the containerd shim's `binds`): each copy is written once into
//! memory, under [`COPIES_DIR`], named by its source's key, and
//! bind-mounted over its destination in the process's root before the
//! process starts. Mounts of one source share its copy, so a pod's
//! emptyDir is one directory for all the containers that mount it.
//!
//! A copy is written beside its place and renamed there when whole, so a
//! request that fails half-way leaves none for the next to take.
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};

use crate::exec::{CopiedEntry, CopiedKind, CopiedMount};
use crate::mounts::{self, MountPoint};

/// Where the copies are kept: /run, the guest's tmpfs.
pub const COPIES_DIR: &str = "/run/kiln/mounts";

/// Held while a copy is looked for and written: two containers' first
/// processes, started at once, must not both write one source's copy.
static COPYING: Mutex<()> = Mutex::new(());

/// Why a container's mounts could not be made.
#[derive(Debug, thiserror::Error)]
pub enum BindError {
    /// A destination that is not absolute, or a source key that is not
    /// a plain name.
    #[error(
        "mount {destination}: expected an absolute destination and a key of letters and digits"
    )]
    BadMount {
        /// The mount's destination.
        destination: String,
    },
    /// An entry's path would leave the copy, or comes before its parent.
    #[error("mount {destination}: entry {path:?} is not a path under its source")]
    BadEntry {
        /// The mount's destination.
        destination: String,
        /// The entry's path.
        path: String,
    },
    /// The copy could not be written.
    #[error("mount {destination}: cannot write its copy at {path}")]
    Write {
        /// The mount's destination.
        destination: String,
        /// The file being written.
        path: PathBuf,
        /// What the system said.
        #[source]
        source: io::Error,
    },
    /// The copy could not be mounted in the root.
    #[error("mount {destination}: cannot bind its copy there")]
    Bind {
        /// The mount's destination.
        destination: String,
        /// What the system said.
        #[source]
        source: io::Error,
    },
}

/// Makes each of `mounts` in `root`, in order (a later one may be under
/// an earlier one), writing the copies it does not find in `copies` (the
/// guest's [`COPIES_DIR`]).
pub fn install(mounts: &[CopiedMount], root: &Path, copies: &Path) -> Result<(), BindError> {
    for mount in mounts {
        let copy = copied(mount, copies)?;
        let point = match mount.entries.first().map(|e| &e.kind) {
            Some(CopiedKind::Dir) => MountPoint::Dir,
            _ => MountPoint::File,
        };
        mounts::bind_into(&copy, root, &mount.destination, point, mount.read_only).map_err(
            |source| BindError::Bind {
                destination: mount.destination.clone(),
                source,
            },
        )?;
    }
    Ok(())
}

/// The copy of `mount`'s source in `copies`: the one already written, or
/// a new one.
fn copied(mount: &CopiedMount, copies: &Path) -> Result<PathBuf, BindError> {
    let plain = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric());
    if !mount.destination.starts_with('/') || !plain(&mount.source_key) {
        return Err(BindError::BadMount {
            destination: mount.destination.clone(),
        });
    }
    let _copying = COPYING.lock().unwrap_or_else(PoisonError::into_inner);
    let place = copies.join(&mount.source_key);
    if place.symlink_metadata().is_ok() {
        return Ok(place);
    }
    // A copy being written; removed unless it is whole.
    let partial = copies.join(format!(".{}.partial", mount.source_key));
    let written = std::fs::create_dir_all(copies)
        .map_err(write_error(mount, copies))
        .and_then(|()| write_entries(mount, &partial))
        .and_then(|()| std::fs::rename(&partial, &place).map_err(write_error(mount, &place)));
    if written.is_err() {
        let _ = std::fs::remove_dir_all(&partial);
        let _ = std::fs::remove_file(&partial);
    }
    written.map(|()| place)
}

/// Writes `mount`'s entries at `top` (its first entry, the source, is
/// `top` itself).
fn write_entries(mount: &CopiedMount, top: &Path) -> Result<(), BindError> {
    let mut dirs = Vec::new();
    for (index, entry) in mount.entries.iter().enumerate() {
        let path = entry_path(mount, top, index, entry)?;
        write_entry(entry, &path).map_err(write_error(mount, &path))?;
        if entry.kind == CopiedKind::Dir {
            dirs.push((path, entry.mode));
        }
    }
    // Directories get their modes last: one without write permission
    // (a Secret's, 0555) must still take its files first.
    for (path, mode) in dirs.into_iter().rev() {
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode))
            .map_err(write_error(mount, &path))?;
    }
    Ok(())
}

/// Where entry `index` goes: `top` for the first, which must be the
/// source itself (path ""), and under it for the others, whose names
/// must be plain and whose parent must have come before (a directory).
fn entry_path(
    mount: &CopiedMount,
    top: &Path,
    index: usize,
    entry: &CopiedEntry,
) -> Result<PathBuf, BindError> {
    let bad = || BindError::BadEntry {
        destination: mount.destination.clone(),
        path: entry.path.clone(),
    };
    if index == 0 {
        return if entry.path.is_empty() {
            Ok(top.to_path_buf())
        } else {
            Err(bad())
        };
    }
    if entry
        .path
        .split('/')
        .any(|n| n.is_empty() || n == "." || n == "..")
    {
        return Err(bad());
    }
    let parent = entry.path.rsplit_once('/').map_or("", |(parent, _)| parent);
    let parent_is_dir = mount.entries[..index]
        .iter()
        .any(|e| e.path == parent && e.kind == CopiedKind::Dir);
    if !parent_is_dir {
        return Err(bad());
    }
    Ok(top.join(&entry.path))
}

/// Writes one entry at `path`, owned as on the host, then a file's mode
/// (after the owner: a change of owner clears the set-id bits); a
/// directory's mode waits for [`write_entries`].
fn write_entry(entry: &CopiedEntry, path: &Path) -> io::Result<()> {
    let file = match &entry.kind {
        CopiedKind::Dir => {
            std::fs::create_dir(path)?;
            None
        }
        CopiedKind::File(bytes) => {
            let mut file = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path)?;
            file.write_all(bytes)?;
            Some(file)
        }
        CopiedKind::Symlink(target) => {
            std::os::unix::fs::symlink(target, path)?;
            None
        }
    };
    // The entry itself, never what a link points to.
    std::os::unix::fs::lchown(path, Some(entry.uid), Some(entry.gid))?;
    match file {
        Some(file) => file.set_permissions(std::fs::Permissions::from_mode(entry.mode)),
        None => Ok(()),
    }
}

fn write_error(mount: &CopiedMount, path: &Path) -> impl FnOnce(io::Error) -> BindError {
    let (destination, path) = (mount.destination.clone(), path.to_path_buf());
    move |source| BindError::Write {
        destination,
        path,
        source,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mounts::in_own_mount_namespace;

    fn entry(path: &str, kind: CopiedKind, mode: u32) -> CopiedEntry {
        CopiedEntry {
            path: path.into(),
            kind,
            mode,
            uid: 0,
            gid: 0,
        }
    }

    fn config_map(destination: &str, key: &str, read_only: bool) -> CopiedMount {
        CopiedMount {
            destination: destination.into(),
            source_key: key.into(),
            read_only,
            entries: vec![
                entry("", CopiedKind::Dir, 0o555),
                entry("..data", CopiedKind::Dir, 0o755),
                entry(
                    "..data/app.conf",
                    CopiedKind::File(b"level = debug\n".to_vec()),
                    0o640,
                ),
                entry(
                    "app.conf",
                    CopiedKind::Symlink("..data/app.conf".into()),
                    0o777,
                ),
                CopiedEntry {
                    uid: 1000,
                    gid: 2000,
                    ..entry("tool", CopiedKind::File(b"#!/bin/sh\n".to_vec()), 0o4750)
                },
            ],
        }
    }

    #[test]
    fn a_copy_is_written_once_mounted_where_asked_and_shared_by_its_source() {
        let (root, other, copies) = (
            tempfile::tempdir().unwrap(),
            tempfile::tempdir().unwrap(),
            tempfile::tempdir().unwrap(),
        );
        let paths = [root.path(), other.path(), copies.path()].map(Path::to_path_buf);
        in_own_mount_namespace(move || {
            let [root, other, copies] = &paths;
            install(&[config_map("/etc/app", "ab12", true)], root, copies).unwrap();
            let conf = root.join("etc/app/app.conf");
            assert_eq!(std::fs::read_to_string(&conf).unwrap(), "level = debug\n");
            let mode = std::fs::metadata(&conf).unwrap().permissions().mode();
            assert_eq!(mode & 0o7777, 0o640);
            // Owned as on the host, its set-uid bit kept past the chown.
            use std::os::unix::fs::MetadataExt;
            let tool = std::fs::metadata(root.join("etc/app/tool")).unwrap();
            assert_eq!(
                (tool.uid(), tool.gid(), tool.mode() & 0o7777),
                (1000, 2000, 0o4750)
            );
            let top = std::fs::metadata(root.join("etc/app"))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(top & 0o7777, 0o555);
            assert!(std::fs::write(&conf, "no").is_err(), "mounted read-only");
            // The same source in another root, writable: one copy, whose
            // changes the first root sees.
            install(&[config_map("/shared", "ab12", false)], other, copies).unwrap();
            std::fs::write(other.join("shared/..data/app.conf"), "level = info\n").unwrap();
            assert_eq!(std::fs::read_to_string(&conf).unwrap(), "level = info\n");
            let names: Vec<_> = std::fs::read_dir(copies)
                .unwrap()
                .map(|e| e.unwrap().file_name())
                .collect();
            assert_eq!(names, ["ab12"]);
        });
    }

    #[test]
    fn entries_that_would_leave_their_copy_are_refused_and_leave_none() {
        let copies = tempfile::tempdir().unwrap();
        let bad_paths = [
            vec![entry("x", CopiedKind::Dir, 0o755)],
            vec![
                entry("", CopiedKind::Dir, 0o755),
                entry("../escape", CopiedKind::Dir, 0o755),
            ],
            vec![
                entry("", CopiedKind::Dir, 0o755),
                entry("a//b", CopiedKind::Dir, 0o755),
            ],
            vec![
                entry("", CopiedKind::Dir, 0o755),
                entry("missing/b", CopiedKind::Dir, 0o755),
            ],
            vec![
                entry("", CopiedKind::Dir, 0o755),
                entry("f", CopiedKind::File(Vec::new()), 0o644),
                entry("f/g", CopiedKind::File(Vec::new()), 0o644),
            ],
        ];
        for entries in bad_paths {
            let mount = CopiedMount {
                destination: "/data".into(),
                source_key: "cd34".into(),
                read_only: false,
                entries,
            };
            let err = copied(&mount, copies.path()).unwrap_err();
            assert!(matches!(err, BindError::BadEntry { .. }), "{err}");
        }
        for (destination, key) in [("data", "cd34"), ("/data", "../x"), ("/data", "")] {
            let mut mount = config_map(destination, key, false);
            mount.source_key = key.into();
            let err = copied(&mount, copies.path()).unwrap_err();
            assert!(matches!(err, BindError::BadMount { .. }), "{err}");
        }
        assert_eq!(std::fs::read_dir(copies.path()).unwrap().count(), 0);
    }
}
