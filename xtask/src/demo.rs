//! `cargo xtask demo`: the README's first command. Installs what is needed,
//! builds the guest kernel and guest-init, builds recipes/hello with
//! `kiln build`, and boots it from the store with `kiln run hello:1.0.0`
//! (directly on hardware KVM, in the nested harness elsewhere), showing the
//! guest's console. Then it installs the `kiln` command on PATH, with its
//! completions and man pages (`cargo xtask install-cli`), so that the
//! README's next commands work as typed.
use std::time::Duration;

use anyhow::{Result, bail};

use crate::harness::{self, Job};

/// recipes/hello's program prints this.
const GREETING: &str = "Hello from a Kiln microVM!";

pub fn run() -> Result<()> {
    let prepared = harness::prepare(false)?;
    let job = Job {
        command: [
            "export KILN_HOME=$WORK_ROOT/demo; mkdir -p $KILN_HOME; ln -sfn $KILN_IMAGES $KILN_HOME/images;",
            "$KILN run hello:1.0.0 --timing </dev/null;",
            "echo \"kiln run exited with status $?\"",
        ]
        .map(String::from)
        .to_vec(),
        allowance: Duration::from_secs(120),
        silence_limit: None,
        l1_vcpus: 1,
    };
    let (lines, _) = harness::run_job(&prepared, &job)?;
    if !lines.iter().any(|line| line.contains(GREETING)) {
        bail!("the guest never printed {GREETING:?}: see target/vm-test/console.log");
    }
    crate::install::install_cli()?;
    eprintln!(
        "xtask: demo done: `kiln build` made recipes/hello, `kiln run` booted it; `kiln` is on PATH now (try `kiln images`)"
    );
    Ok(())
}
