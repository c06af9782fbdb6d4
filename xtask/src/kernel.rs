//! `cargo xtask kernel`: the microVM guest kernel, built from Debian's
//! `linux-source-6.1` with the options in `kernel/microvm.fragment`, cached
//! outside the work tree by the hash of the options and the source version.
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};
use sha2::{Digest, Sha256};

use crate::{apt, install, sh};

const SOURCE_PACKAGE: &str = "linux-source-6.1";
const SOURCE_TARBALL: &str = "/usr/src/linux-source-6.1.tar.xz";
/// What building the kernel needs.
pub const BUILD_PACKAGES: &[&str] = &[
    SOURCE_PACKAGE,
    "build-essential",
    "flex",
    "bison",
    "bc",
    "libelf-dev",
    "libssl-dev",
    "xz-utils",
];

/// One line of the fragment: enable (`-e NAME`) or disable (`-d NAME`).
#[derive(Debug, PartialEq, Eq)]
struct ConfigOption {
    enable: bool,
    name: String,
}

/// Builds (or finds in the cache) the guest kernel, installs it as Kiln's
/// default kernel, and returns the cached vmlinux path.
pub fn build() -> Result<PathBuf> {
    let fragment_path = sh::workspace_root().join("kernel/microvm.fragment");
    let fragment = fs::read_to_string(&fragment_path)
        .with_context(|| format!("cannot read {}", fragment_path.display()))?;
    let options = parse_fragment(&fragment, &fragment_path)?;
    apt::ensure(BUILD_PACKAGES)?;
    let key = cache_key(&fragment, &apt::version(SOURCE_PACKAGE)?);
    let cached = cache_dir("kernel")?.join(&key);
    let vmlinux = cached.join("vmlinux");
    if vmlinux.is_file() {
        eprintln!("xtask: kernel cache hit ({key})");
    } else {
        build_into(&cached, &options)?;
    }
    install::publish(&vmlinux, &install::kiln_home().join("kernel/vmlinux"))?;
    Ok(vmlinux)
}

fn parse_fragment(text: &str, path: &Path) -> Result<Vec<ConfigOption>> {
    let mut options = Vec::new();
    for (index, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (enable, name) = match line.split_once(' ') {
            Some(("-e", name)) => (true, name.trim()),
            Some(("-d", name)) => (false, name.trim()),
            _ => bail!(
                "{}:{}: expected `-e NAME` or `-d NAME`, found `{line}`",
                path.display(),
                index + 1
            ),
        };
        options.push(ConfigOption {
            enable,
            name: name.to_string(),
        });
    }
    Ok(options)
}

fn cache_key(fragment: &str, source_version: &str) -> String {
    let digest = Sha256::new()
        .chain_update(fragment.as_bytes())
        .chain_update(b"\0")
        .chain_update(source_version.as_bytes())
        .finalize();
    digest.iter().take(8).map(|b| format!("{b:02x}")).collect()
}

/// `$XDG_CACHE_HOME/kiln/<what>`, or `~/.cache/kiln/<what>`: where xtask
/// keeps what it makes once per host (the kernel, the Debian base).
pub fn cache_dir(what: &str) -> Result<PathBuf> {
    let base = match std::env::var_os("XDG_CACHE_HOME") {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir),
        _ => PathBuf::from(std::env::var_os("HOME").context("HOME is not set")?).join(".cache"),
    };
    Ok(base.join("kiln").join(what))
}

/// Configures and builds in a scratch tree, verifies the options, then
/// publishes vmlinux and .config to `cached` with one rename.
fn build_into(cached: &Path, options: &[ConfigOption]) -> Result<()> {
    let parent = cached.parent().expect("cache entries have a parent");
    let scratch = parent.join(format!("build-{}", std::process::id()));
    let _ = fs::remove_dir_all(&scratch);
    fs::create_dir_all(&scratch)?;
    eprintln!(
        "xtask: building the guest kernel in {} (a few minutes)",
        scratch.display()
    );
    sh::run(
        Command::new("tar")
            .args(["xf", SOURCE_TARBALL, "--strip-components=1", "-C"])
            .arg(&scratch),
    )?;
    let make = |target: &str| -> Result<()> {
        sh::run(
            Command::new("make")
                .current_dir(&scratch)
                .args(["ARCH=x86_64", target]),
        )
    };
    make("tinyconfig")?;
    let mut config = Command::new("./scripts/config");
    for option in options {
        config
            .arg(if option.enable { "-e" } else { "-d" })
            .arg(&option.name);
    }
    sh::run(config.current_dir(&scratch))?;
    make("olddefconfig")?;
    let dot_config = fs::read_to_string(scratch.join(".config"))?;
    verify(&dot_config, options)?;
    let jobs = format!(
        "-j{}",
        std::thread::available_parallelism().map_or(2, |n| n.get())
    );
    sh::run(
        Command::new("make")
            .current_dir(&scratch)
            .args(["ARCH=x86_64", &jobs, "vmlinux"]),
    )?;

    let staging = parent.join(format!("publish-{}", std::process::id()));
    fs::create_dir_all(&staging)?;
    fs::copy(scratch.join("vmlinux"), staging.join("vmlinux"))?;
    fs::write(staging.join("config"), dot_config)?;
    install::sync_dir(&staging)?;
    fs::rename(&staging, cached)
        .with_context(|| format!("cannot publish the kernel to {}", cached.display()))?;
    fs::remove_dir_all(&scratch)?;
    Ok(())
}

/// Fails naming every option that did not end up as requested.
fn verify(dot_config: &str, options: &[ConfigOption]) -> Result<()> {
    let wrong: Vec<String> = options
        .iter()
        .filter(|option| {
            let enabled = dot_config
                .lines()
                .any(|l| l == format!("CONFIG_{}=y", option.name));
            enabled != option.enable
        })
        .map(|option| {
            let want = if option.enable { "enabled" } else { "disabled" };
            format!("CONFIG_{} (wanted {want})", option.name)
        })
        .collect();
    if !wrong.is_empty() {
        bail!(
            "kernel options did not stick after olddefconfig: {}",
            wrong.join(", ")
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fragment_lines_parse_and_bad_lines_name_the_place() {
        let path = Path::new("frag");
        let options = parse_fragment("# c\n-e VIRTIO\n\n-d PCI\n", path).unwrap();
        assert_eq!(
            options,
            vec![
                ConfigOption {
                    enable: true,
                    name: "VIRTIO".into()
                },
                ConfigOption {
                    enable: false,
                    name: "PCI".into()
                },
            ]
        );
        let err = parse_fragment("-e A\n+x B\n", path)
            .unwrap_err()
            .to_string();
        assert!(err.contains("frag:2"), "{err}");
    }

    #[test]
    fn verify_names_options_that_did_not_stick() {
        let options = parse_fragment("-e VIRTIO\n-d PCI\n-e EXT4_FS\n", Path::new("f")).unwrap();
        let config = "CONFIG_VIRTIO=y\nCONFIG_PCI=y\n# CONFIG_EXT4_FS is not set\n";
        let err = verify(config, &options).unwrap_err().to_string();
        assert!(err.contains("CONFIG_PCI (wanted disabled)"), "{err}");
        assert!(err.contains("CONFIG_EXT4_FS (wanted enabled)"), "{err}");
        assert!(!err.contains("CONFIG_VIRTIO"), "{err}");
        verify("CONFIG_VIRTIO=y\nCONFIG_EXT4_FS=y\n", &options).unwrap();
    }

    #[test]
    fn cache_key_changes_with_options_and_source() {
        assert_ne!(cache_key("-e A", "1"), cache_key("-e B", "1"));
        assert_ne!(cache_key("-e A", "1"), cache_key("-e A", "2"));
        assert_eq!(cache_key("-e A", "1").len(), 16);
    }
}
