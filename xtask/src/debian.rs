//! The Debian 12 minbase root recipes/debian-base imports: `mmdebstrap
//! --variant=minbase bookworm` from the host's apt mirror, as a tar,
//! cached by its arguments and linked at `target/debian-base.tar`, where
//! the recipe's `base = "tar:../../target/debian-base.tar"` finds it. The
//! image that recipe makes is recipes/debian's parent.
use std::fs;
use std::os::unix::fs::symlink;
use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context, Result};
use sha2::{Digest, Sha256};

use crate::{apt, kernel, sh};

/// Debian 12, from the mirror the host's own apt uses
/// (/etc/apt/sources.list.d/debian.sources).
const SUITE: &str = "bookworm";
const MIRROR: &str = "http://deb.debian.org/debian";
/// What mmdebstrap is asked for besides the suite and mirror: Priority
/// required packages plus apt (minbase), as a tar made as root, without
/// manuals, documentation and translations (a third of the root, which
/// every image would carry and compress).
const OPTIONS: &[&str] = &[
    "--variant=minbase",
    "--mode=root",
    "--format=tar",
    "--dpkgopt=path-exclude=/usr/share/man/*",
    "--dpkgopt=path-exclude=/usr/share/doc/*",
    "--dpkgopt=path-include=/usr/share/doc/*/copyright",
    "--dpkgopt=path-exclude=/usr/share/locale/*",
    "--dpkgopt=path-exclude=/usr/share/info/*",
];
/// mmdebstrap's clock (2026-01-01T00:00:00Z, Kiln's image time): the
/// times it records (files, dpkg's and apt's logs) are the same on every
/// run, so the same package versions give the same tar.
const SOURCE_DATE_EPOCH: &str = "1767225600";
/// Where recipes/debian-base finds the base, relative to the workspace.
const BASE_LINK: &str = "target/debian-base.tar";

/// Makes the base (or finds it in the cache), links it at [`BASE_LINK`]
/// and returns the cached tar's path.
pub fn base() -> Result<PathBuf> {
    apt::ensure(&["mmdebstrap"])?;
    let key = cache_key();
    let dir = kernel::cache_dir("debian")?;
    let cached = dir.join(format!("{SUITE}-minbase-{key}.tar"));
    if cached.is_file() {
        eprintln!("xtask: Debian base cache hit ({key})");
    } else {
        fs::create_dir_all(&dir)?;
        let partial = cached.with_extension("tar.partial");
        sh::run(
            Command::new("mmdebstrap")
                .arg("--quiet")
                .args(OPTIONS)
                .args([SUITE])
                .arg(&partial)
                .arg(MIRROR)
                .env("SOURCE_DATE_EPOCH", SOURCE_DATE_EPOCH),
        )?;
        fs::rename(&partial, &cached)
            .with_context(|| format!("cannot publish {}", cached.display()))?;
    }
    let link = sh::workspace_root().join(BASE_LINK);
    let _ = fs::remove_file(&link);
    symlink(&cached, &link).with_context(|| format!("cannot link {}", link.display()))?;
    Ok(cached)
}

/// The cache key: mmdebstrap's arguments and clock. The mirror's package
/// versions are not in it: a point release is picked up by removing the
/// cache entry.
fn cache_key() -> String {
    let mut hasher = Sha256::new();
    for word in OPTIONS.iter().chain(&[SUITE, MIRROR, SOURCE_DATE_EPOCH]) {
        hasher.update(word.as_bytes());
        hasher.update(b"\0");
    }
    let digest = hasher.finalize();
    digest.iter().take(8).map(|b| format!("{b:02x}")).collect()
}
