//! `cargo xtask test`: everything CI runs, in order, stopping at the first
//! failure: formatting, clippy (warnings are errors), the unit and
//! integration tests, then the end-to-end scenarios that boot real VMs.
use std::process::Command;

use anyhow::{Context, Result};

use crate::{harness, sh};

pub fn run() -> Result<()> {
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
    eprintln!("xtask: == vm-test (all scenarios)");
    harness::vm_test(&[]).map(drop)
}
