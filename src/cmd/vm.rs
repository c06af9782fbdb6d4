//! `kiln __vm --config FILE` (hidden): one VM process, as an instance's
//! supervisor starts it: the VM definition it wrote, the control channel
//! it handed down, the NIC's tap it made and attached (`--tap-fd`), and its
//! pid, whose end ends this VM too. Config → VM → run, and nothing else. An image's test VM (`kiln_control::image_test`)
//! is one too, with no control channel: it runs to its end or is killed.
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{Context, bail};
use kiln_vmm::builder;
use kiln_vmm::config::VmConfig;
use kiln_vmm::devices::virtio::net::tap::Tap;
use kiln_vmm::machine::VMM_ERROR_STATUS;
use kiln_vmm::rpc::ControlListener;
use kiln_vmm::supervised;

#[derive(clap::Args, Debug, PartialEq, Eq)]
pub struct Args {
    /// The VM definition, as the supervisor wrote it.
    #[arg(long)]
    config: PathBuf,
    /// The inherited descriptor of this VM's end of the control channel
    /// (none: nothing controls this VM while it runs).
    #[arg(long)]
    control_fd: Option<i32>,
    /// The inherited descriptor of the NIC's tap, which the supervisor
    /// created and attached to the bridge: needed exactly when the VM
    /// definition has a NIC.
    #[arg(long)]
    tap_fd: Option<i32>,
    /// The supervisor's pid: this VM ends when it does.
    #[arg(long)]
    supervisor: u32,
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    // The boot timer's zero.
    let started = Instant::now();
    kiln_vmm::trace::mark("vm");
    // A VMM error has its own exit status, which the supervisor records.
    Ok(run_vm(&args, started).unwrap_or_else(|err| {
        eprintln!("kiln: {err:#}");
        ExitCode::from(VMM_ERROR_STATUS)
    }))
}

fn run_vm(args: &Args, started: Instant) -> anyhow::Result<ExitCode> {
    let control = args.control_fd.map(|fd| {
        // SAFETY: the supervisor passed this descriptor, its end of the
        // control channel, for this purpose; nothing else here uses it.
        unsafe { ControlListener::adopt(fd) }
    });
    supervised::end_with(args.supervisor).context("cannot tie this VM to its supervisor")?;
    let config = VmConfig::load(&args.config)?;
    let tap = inherited_tap(args.tap_fd, &config)?;
    let outcome = builder::run(&config, started, control, tap)?;
    Ok(ExitCode::from(outcome.exit_status))
}

/// The NIC's tap, passed as descriptor `fd`: there must be one exactly
/// when `config` has a NIC, and it must be the tap the NIC names.
fn inherited_tap(fd: Option<i32>, config: &VmConfig) -> anyhow::Result<Option<Tap>> {
    match (fd, &config.net) {
        (None, None) => Ok(None),
        // SAFETY: the supervisor passed this descriptor, the NIC's tap,
        // for this purpose; nothing else here uses it.
        (Some(fd), Some(nic)) => Ok(Some(unsafe { Tap::adopt(fd, &nic.tap) }?)),
        (None, Some(nic)) => bail!(
            "the VM definition's NIC is on tap {}: expected its descriptor (--tap-fd)",
            nic.tap
        ),
        (Some(fd), None) => bail!("--tap-fd {fd}: the VM definition has no NIC to take it"),
    }
}
