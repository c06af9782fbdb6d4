//! `cargo xtask demo`: the README's first command. Installs what is needed,
//! builds the guest kernel and guest-init, and boots a guest, showing its
//! console.
use anyhow::Result;

use crate::harness;

/// The scenario the demo runs.
const DEMO_SCENARIO: &str = "qemu-boot";

pub fn run() -> Result<()> {
    harness::run(&[DEMO_SCENARIO.to_string()]).map(drop)
}
