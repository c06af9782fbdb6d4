//! `cargo xtask test`: everything CI runs, in order, stopping at the first
//! failure: formatting, clippy (warnings are errors), the unit and
//! integration tests, a short `kiln bench vmm` with the stub guest, then
//! the end-to-end scenarios that boot real VMs.
use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::{apt, bench, harness, kernel, sh, stub};

/// The unit and integration tests read real host programs: busybox-static
/// (a static stand-in for guest-init), Debian's python3 and its
/// extension modules (ELF closure), zstd (the size baseline), boto3 (a
/// real Lambda client against `kiln fn serve`'s Invoke API).
const TEST_PACKAGES: &[&str] = &[
    "busybox-static",
    "python3",
    "python3-boto3",
    "zstd",
    "e2fsprogs",
];

/// Free space a whole run needs where the workspace is: a fresh clone
/// grew by 7.3 GiB in CI (debug and release builds, the images and the
/// nested harness's disks under `target/`), plus a margin for the kernel
/// and Debian caches under `~/.cache/kiln` on a first run.
const FREE_SPACE_NEEDED: u64 = 10 << 30;

pub fn run() -> Result<()> {
    check_free_space(sh::workspace_root(), FREE_SPACE_NEEDED)?;
    // Everything up front: on a fresh machine the unit tests already need
    // what vm-test would otherwise install later.
    apt::ensure(
        &[
            TEST_PACKAGES,
            harness::PACKAGES,
            kernel::BUILD_PACKAGES,
            stub::BUILD_PACKAGES,
        ]
        .concat(),
    )?;
    let cargo = |args: &[&str]| -> Result<()> {
        eprintln!("xtask: == cargo {}", args.join(" "));
        sh::run(
            Command::new(env!("CARGO"))
                .current_dir(sh::workspace_root())
                .args(args),
        )
    };
    cargo(&["fmt", "--all", "--", "--check"])
        .context("formatting differs: run `cargo fmt --all`")?;
    cargo(&[
        "clippy",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ])?;
    cargo(&["test", "--workspace"])?;
    // The VMM's own cost with the stub guest, natively on this host's KVM
    // (PVM included), a few runs: the benchmark works, its report is sound.
    eprintln!("xtask: == kiln bench vmm (short, on this host's own KVM)");
    bench::vmm_ci(&harness::build_kiln()?, &stub::build()?)?;
    // The tests that need the guest kernel or the hostile stub guest
    // (tests/hostile_guest.rs) are ignored by a plain `cargo test`; here
    // they run, with the kernel built (or found in its cache).
    let kernel = kernel::build()?;
    let hostile = stub::build_hostile()?;
    eprintln!(
        "xtask: == cargo test (the ignored tests, with the guest kernel and the hostile stub)"
    );
    sh::run(
        Command::new(env!("CARGO"))
            .current_dir(sh::workspace_root())
            .args(["test", "--workspace", "--", "--ignored"])
            .env("KILN_KERNEL", &kernel)
            .env("KILN_HOSTILE_STUB", &hostile),
    )?;
    eprintln!("xtask: == vm-test (all scenarios)");
    harness::vm_test(&[]).map(drop)
}

/// Refuses to start on a filesystem too full to finish: the linker, the
/// image builder and the nested VMs would otherwise fail midway with
/// errors that do not say why (a linker's SIGBUS on a full disk).
fn check_free_space(root: &Path, needed: u64) -> Result<()> {
    let stat = rustix::fs::statvfs(root)
        .with_context(|| format!("cannot read the free space of {}", root.display()))?;
    let free = stat.f_bavail.saturating_mul(stat.f_frsize);
    if free < needed {
        bail!(
            "only {:.1} GiB free on the filesystem of {}; a full test run needs about {} GiB: free some space (`cargo clean` drops old build output)",
            free as f64 / f64::from(1 << 30),
            root.display(),
            needed >> 30
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_filesystem_without_the_space_needed_is_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        check_free_space(dir.path(), 0).unwrap();
        let err = check_free_space(dir.path(), u64::MAX)
            .unwrap_err()
            .to_string();
        assert!(err.contains(&dir.path().display().to_string()), "{err}");
        assert!(err.contains("GiB free"), "{err}");
    }
}
