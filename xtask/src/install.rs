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

/// `cargo xtask install-cli`: the `kiln` command on PATH, with its shell
/// completions and man pages. `cargo install --path .` puts the binary in
/// `$CARGO_HOME/bin` (`~/.cargo/bin`, which rustup adds to PATH), built
/// in the workspace's target directory, statically linked as the
/// benchmarks' and tests' `kiln` is (`harness::build_kiln`), so a release
/// build already made is reused. The completions and pages come from the installed binary
/// (`kiln __generate`) and go where the tools look: bash-completion's
/// and fish's per-user directories, a zsh `site-functions` directory to
/// add to `fpath`, and `$CARGO_HOME/share/man`, which man-db finds next
/// to `$CARGO_HOME/bin` on PATH.
pub fn install_cli() -> Result<()> {
    let root = crate::sh::workspace_root();
    let target =
        std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| root.join("target"), PathBuf::from);
    crate::sh::run(
        std::process::Command::new(env!("CARGO"))
            .current_dir(root)
            .args(["install", "--quiet", "--locked", "--path", "."])
            .args(["--target", crate::init::TARGET])
            .arg("--target-dir")
            .arg(&target)
            .env("RUSTFLAGS", crate::init::STATIC_RUSTFLAGS),
    )?;
    let home = PathBuf::from(std::env::var_os("HOME").context("HOME is not set")?);
    // Where `cargo install` puts it: the first of these that is set.
    let install_root = ["CARGO_INSTALL_ROOT", "CARGO_HOME"]
        .iter()
        .find_map(std::env::var_os)
        .map_or_else(|| home.join(".cargo"), PathBuf::from);
    let kiln = install_root.join("bin/kiln");
    // Made afresh each time: a page of a removed command must not linger.
    let generated = target.join("kiln-cli");
    if generated.exists() {
        fs::remove_dir_all(&generated)
            .with_context(|| format!("cannot remove {}", generated.display()))?;
    }
    crate::sh::run(
        std::process::Command::new(&kiln)
            .arg("__generate")
            .arg(&generated),
    )?;
    let data = xdg(&home, "XDG_DATA_HOME", ".local/share");
    let config = xdg(&home, "XDG_CONFIG_HOME", ".config");
    let completions = generated.join("completions");
    for (file, to) in [
        ("kiln.bash", data.join("bash-completion/completions/kiln")),
        ("_kiln", data.join("zsh/site-functions/_kiln")),
        ("kiln.fish", config.join("fish/completions/kiln.fish")),
    ] {
        publish(&completions.join(file), &to)?;
    }
    // Next to the binary's bin/, where man-db's PATH-derived search looks.
    let man1 = install_root.join("share/man/man1");
    for page in fs::read_dir(generated.join("man"))? {
        let page = page?.path();
        publish(
            &page,
            &man1.join(page.file_name().context("a page has a name")?),
        )?;
    }
    eprintln!(
        "xtask: installed {} (~/.cargo/bin is on PATH where rustup installed Rust), its completions (bash, fish; zsh: add {} to fpath) and man pages (`man kiln`)",
        kiln.display(),
        data.join("zsh/site-functions").display()
    );
    Ok(())
}

/// An XDG base directory: the variable's value when it is set and
/// absolute (the spec ignores a relative one), else `~/default`.
fn xdg(home: &Path, variable: &str, default: &str) -> PathBuf {
    std::env::var_os(variable)
        .map(PathBuf::from)
        .filter(|dir| dir.is_absolute())
        .unwrap_or_else(|| home.join(default))
}
