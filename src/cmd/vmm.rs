//! `kiln __vmm ID --lock-fd N` (hidden): the VMM process of a detached
//! instance, started by `kiln run --detach` and `kiln start`, which hand it
//! the instance's VMM lock as descriptor N. Its VMs run as
//! `kiln run --instance ID` children.
use std::path::PathBuf;
use std::process::{Command, ExitCode};

use anyhow::Context;
use kiln_control::instance::{FileLock, Registry, supervisor};

use crate::assets::kiln_home;

#[derive(clap::Args)]
pub struct Args {
    /// The instance's id.
    instance: String,
    /// The inherited descriptor that holds the instance's VMM lock.
    #[arg(long)]
    lock_fd: i32,
    /// The snapshot its first VM goes on from (`kiln snapshot restore`).
    #[arg(long)]
    restore: Option<PathBuf>,
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    // SAFETY: the parent passed this descriptor for this purpose, and
    // nothing else in this process uses it.
    let lock = unsafe { FileLock::adopt(args.lock_fd) }.context("the inherited VMM lock")?;
    let instance = Registry::new(&kiln_home()).find(&args.instance)?;
    let kiln = std::env::current_exe().context("cannot find the kiln binary")?;
    let id = instance.record.id.clone();
    supervisor::run(instance, lock, args.restore, |start| {
        let mut vm = Command::new(&kiln);
        vm.args(["run", "--instance", &id, "--control-fd"])
            .arg(start.control_fd.to_string());
        if let Some((dir, consume)) = start.restore {
            vm.arg("--restore").arg(dir);
            vm.args(consume.then_some("--consume"));
        }
        vm
    })?;
    Ok(ExitCode::SUCCESS)
}
