//! `cargo xtask …`: Kiln's developer tasks.
use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod apt;
mod demo;
mod harness;
mod init;
mod install;
mod kernel;
mod sh;
mod test;

#[derive(Parser)]
#[command(name = "cargo xtask", about = "Kiln's developer tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Build (or fetch from the cache) the guest kernel and install it; prints its path last.
    Kernel,
    /// Build the static guest-init and install it; prints its path last.
    Init,
    /// Run end-to-end scenarios (tests/vm/<name>.sh) that boot real VMs.
    VmTest {
        /// Scenario names; all when none are given.
        scenarios: Vec<String>,
    },
    /// Format check, clippy, unit tests, then every vm-test scenario (what CI runs).
    Test,
    /// Set up a fresh machine and boot a guest: the README's first command.
    Demo,
}

fn main() -> ExitCode {
    let result = match Cli::parse().task {
        Task::Kernel => kernel::build().map(|path| println!("{}", path.display())),
        Task::Init => init::build().map(|path| println!("{}", path.display())),
        Task::VmTest { scenarios } => harness::run(&scenarios).map(drop),
        Task::Test => test::run(),
        Task::Demo => demo::run(),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("xtask: {err:#}");
            ExitCode::FAILURE
        }
    }
}
