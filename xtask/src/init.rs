//! `cargo xtask init`: guest-init as a static binary, installed where
//! `kiln build` finds it.
use std::fs;
use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::{install, sh};

/// The target static programs are built for: naming it keeps
/// [`STATIC_RUSTFLAGS`] off build scripts and proc-macros, which stay
/// dynamic (a proc-macro cannot be built with `+crt-static`).
pub const TARGET: &str = "x86_64-unknown-linux-gnu";
/// What links a program statically.
pub const STATIC_RUSTFLAGS: &str = "-C target-feature=+crt-static";
const PROFILE: &str = "guest-init";
/// The size the project promises for guest-init: 1.2 MiB (issue 2).
const SIZE_GOAL: u64 = 12 * 1024 * 1024 / 10;

/// `cargo build ARGS` for [`TARGET`], statically linked.
pub fn build_static(args: &[&str]) -> Result<()> {
    sh::run(
        Command::new(env!("CARGO"))
            .current_dir(sh::workspace_root())
            .args(["build", "--quiet", "--target", TARGET])
            .args(args)
            .env("RUSTFLAGS", STATIC_RUSTFLAGS),
    )
}

/// Builds the static guest-init, checks it, installs it and returns its path.
pub fn build() -> Result<PathBuf> {
    let root = sh::workspace_root();
    build_static(&["-p", "guest-init", "--profile", PROFILE])?;
    let binary = root
        .join("target")
        .join(TARGET)
        .join(PROFILE)
        .join("guest-init");
    let bytes = fs::read(&binary).with_context(|| format!("cannot read {}", binary.display()))?;
    ensure_static(&bytes).with_context(|| binary.display().to_string())?;
    let size = bytes.len() as u64;
    let verdict = if size <= SIZE_GOAL { "within" } else { "OVER" };
    eprintln!("xtask: guest-init is {size} bytes ({verdict} the {SIZE_GOAL}-byte goal)");
    install::publish(&binary, &install::kiln_home().join("guest-init"))?;
    Ok(binary)
}

/// A static binary has no program interpreter (PT_INTERP): it must run as
/// PID 1 of an image that has no dynamic loader.
fn ensure_static(bytes: &[u8]) -> Result<()> {
    let elf = goblin::elf::Elf::parse(bytes).context("not an ELF file")?;
    if let Some(interp) = elf.interpreter {
        bail!("guest-init is dynamically linked (interpreter {interp}); expected a static binary");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dynamic_binaries_are_refused() {
        // This test binary itself is dynamically linked.
        let me = fs::read(std::env::current_exe().unwrap()).unwrap();
        let err = ensure_static(&me).unwrap_err().to_string();
        assert!(err.contains("dynamically linked"), "{err}");
        assert!(ensure_static(b"not an elf").is_err());
    }
}
