//! `kiln`: the command line. Argument parsing and output only; each
//! subcommand calls into `kiln_builder` or `kiln_vmm`.
use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod assets;
mod cmd;

#[derive(Parser)]
#[command(
    name = "kiln",
    version,
    about = "Build microVM images from recipes and boot them on KVM"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Tell what virtualization this host has and whether Kiln can boot VMs here.
    Doctor(cmd::doctor::Args),
    /// Boot an image (or raw disks) in a new microVM.
    Run(cmd::run::Args),
    /// Build an image from a recipe into the local store.
    Build(cmd::build::Args),
    /// List the images in the local store.
    Images(cmd::images::Args),
    /// Show an image's manifest, or the files inside it.
    Inspect(cmd::inspect::Args),
    /// Remove an image from the local store.
    Rm(cmd::rm::Args),
    /// Work with images and instances' root volumes.
    #[command(subcommand)]
    Image(cmd::image::Command),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Doctor(args) => cmd::doctor::run(args),
        Command::Run(args) => cmd::run::run(args),
        Command::Build(args) => cmd::build::run(args),
        Command::Images(args) => cmd::images::run(args),
        Command::Inspect(args) => cmd::inspect::run(args),
        Command::Rm(args) => cmd::rm::run(args),
        Command::Image(command) => cmd::image::run(command),
    };
    match result {
        Ok(code) => code,
        Err(err) => {
            eprintln!("kiln: {err:#}");
            ExitCode::FAILURE
        }
    }
}
