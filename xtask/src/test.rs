//! `cargo xtask test`: everything CI runs, in order, stopping at the first
//! failure: formatting, clippy (warnings are errors), the unit and
//! integration tests, a short `kiln bench vmm` with the stub guest, then
//! the end-to-end scenarios that boot real VMs.
use std::process::Command;

use anyhow::{Context, Result};

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

pub fn run() -> Result<()> {
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
