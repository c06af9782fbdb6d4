//! `kiln snapshot create INSTANCE DIR` and `kiln snapshot restore DIR`:
//! a running instance saved whole (RAM, vCPUs, devices, root volume) into
//! a new directory, and new instances that go on from it.
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use kiln_control::instance::lifecycle::LifecycleError;
use kiln_control::instance::{InstanceError, Registry, lifecycle};
use kiln_control::network::address::AddressError;

use crate::assets::kiln_home;

/// `--network none`, the only value: a restored guest's address is its own.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum Isolate {
    None,
}

#[derive(clap::Subcommand)]
pub enum Command {
    /// Save a running instance into DIR (a new directory); it keeps running.
    Create {
        /// The instance's id or name.
        instance: String,
        /// Where the snapshot goes; must not exist yet.
        dir: PathBuf,
    },
    /// Start a new instance from the snapshot in DIR, in its own VMM process.
    Restore {
        dir: PathBuf,
        /// The new instance's name.
        #[arg(long)]
        name: Option<String>,
        /// The guest keeps the address it had, which must be free; with
        /// `none` its NIC is on no bridge (for a second instance from one
        /// snapshot, or while the original lives).
        #[arg(long, value_name = "none")]
        network: Option<Isolate>,
        /// Seconds to wait for it to run.
        #[arg(long, default_value_t = 60)]
        timeout: u64,
    },
}

pub fn run(command: Command) -> anyhow::Result<ExitCode> {
    let registry = Registry::new(&kiln_home());
    match command {
        Command::Create { instance, dir } => {
            let instance = registry.find(&instance)?;
            let stats = lifecycle::snapshot(&instance, &dir)?;
            println!(
                "{} snapshot in {}: paused {:.1} ms, memory {} of {} MiB written, root volume {:.1} MiB",
                instance.record.id,
                dir.display(),
                stats.paused_us as f64 / 1000.0,
                stats.memory_written >> 20,
                stats.memory_bytes >> 20,
                stats.root_bytes as f64 / f64::from(1 << 20),
            );
        }
        Command::Restore {
            dir,
            name,
            network,
            timeout,
        } => {
            let kiln = std::env::current_exe().context("cannot find the kiln binary")?;
            let timeout = Duration::from_secs(timeout);
            let isolate = network.is_some();
            let instance = lifecycle::restore(&registry, &dir, name, isolate, &kiln, timeout)
                .map_err(|err| match err {
                    LifecycleError::Instance(InstanceError::Address(AddressError::Taken {
                        ..
                    })) => anyhow::Error::new(err).context(format!(
                        "cannot restore {}: its guest keeps its address (restore with --network none to leave it unreachable)",
                        dir.display()
                    )),
                    err => err.into(),
                })?;
            println!("{}", instance.record.id);
            crate::cmd::lifecycle::running_or_why(&instance)?;
        }
    }
    Ok(ExitCode::SUCCESS)
}
