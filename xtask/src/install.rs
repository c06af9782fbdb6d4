//! Installing what xtask builds where the `kiln` CLI looks for it:
//! `$KILN_HOME` (default `~/.local/share/kiln`).
use std::fs::{self, File};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

/// `$KILN_HOME`: the same rule as the `kiln` CLI's.
pub fn kiln_home() -> PathBuf {
    kiln_builder::store::default_home()
}

/// Copies `from` to `to` through a temporary file, fsync and rename, so a
/// reader never sees a half-written file.
pub fn publish(from: &Path, to: &Path) -> Result<()> {
    let dir = to.parent().context("install target has no parent")?;
    fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let temp = dir.join(format!(".{}.tmp-{}", file_name(to), std::process::id()));
    fs::copy(from, &temp)
        .with_context(|| format!("cannot copy {} to {}", from.display(), temp.display()))?;
    File::open(&temp)?.sync_all()?;
    fs::rename(&temp, to).with_context(|| format!("cannot install {}", to.display()))?;
    sync_dir(dir)
}

/// fsyncs a directory so a rename inside it is durable.
pub fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)?
        .sync_all()
        .with_context(|| format!("cannot sync {}", dir.display()))
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}
