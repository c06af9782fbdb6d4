//! `kiln __vmm ID --lock-fd N` (hidden): the VMM process of a detached
//! instance, started by `kiln run --detach` and `kiln start`, which hand it
//! the instance's VMM lock as descriptor N: the instance's supervisor, with
//! its console in the console log.
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use kiln_builder::store::Store;
use kiln_control::definition::RunOptions;
use kiln_control::instance::supervisor::{self, Console, VmProcess};
use kiln_control::instance::{FileLock, Registry};

use crate::assets::{Asset, kiln_home};

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
    /// The inherited write end of the launcher's pipe, closed once the
    /// instance runs.
    #[arg(long)]
    started_fd: Option<i32>,
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    // SAFETY: the parent passed this descriptor for this purpose, and
    // nothing else in this process uses it.
    let lock = unsafe { FileLock::adopt(args.lock_fd) }.context("the inherited VMM lock")?;
    // SAFETY: as the lock's, this descriptor was passed for this purpose.
    let started = args
        .started_fd
        .map(|fd| unsafe { kiln_vmm::supervised::adopt(fd) })
        .transpose()
        .context("the inherited start pipe")?;
    let home = kiln_home();
    let instance = Registry::new(&home).find(&args.instance)?;
    let vm = VmProcess {
        kiln: std::env::current_exe().context("cannot find the kiln binary")?,
        store: Store::new(&home),
        options: RunOptions::new(Asset::Kernel.path()),
        console: Console::Log,
    };
    supervisor::run(instance, lock, args.restore, &vm, started)?;
    Ok(ExitCode::SUCCESS)
}
