//! Files that appear whole or not at all: written under a temporary name
//! in their final directory, synced, renamed into place, and the directory
//! synced so the rename itself survives a crash.
use std::fs::File;
use std::io;
use std::path::Path;

use tempfile::NamedTempFile;

/// A temporary file next to where `path` will be.
pub fn stage(path: &Path) -> io::Result<NamedTempFile> {
    NamedTempFile::new_in(parent(path))
}

/// Makes `staged` durable and renames it to `path`.
pub fn persist(staged: NamedTempFile, path: &Path) -> io::Result<()> {
    staged.as_file().sync_all()?;
    staged.persist(path).map_err(|err| err.error)?;
    File::open(parent(path))?.sync_all()
}

fn parent(path: &Path) -> &Path {
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    }
}
