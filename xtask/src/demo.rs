//! `cargo xtask demo`: the README's first command. Installs what is needed,
//! builds the guest kernel and guest-init, makes the hello image, and boots
//! it with `kiln run` (directly on hardware KVM, in the nested harness
//! elsewhere), showing the guest's console.
use std::time::Duration;

use anyhow::{Result, bail};

use crate::harness::{self, Job};

/// The hello image's entrypoint prints this.
const GREETING: &str = "hello from kiln guest-init";

pub fn run() -> Result<()> {
    let prepared = harness::prepare()?;
    let job = Job {
        command: [
            "$KILN run --kernel $KILN_KERNEL --disk $KILN_ASSETS/hello.ext4 --read-only --timing </dev/null;",
            "echo \"kiln run exited with status $?\"",
        ]
        .map(String::from)
        .to_vec(),
        allowance: Duration::from_secs(120),
    };
    let (lines, _) = harness::run_job(&prepared, &job)?;
    if !lines.iter().any(|line| line.contains(GREETING)) {
        bail!("the guest never printed {GREETING:?}: see target/vm-test/console.log");
    }
    eprintln!(
        "xtask: demo done: `kiln run` booted the hello image and guest-init ran its entrypoint"
    );
    Ok(())
}
