//! `kiln doctor` (being written; see issue 2).
use std::process::ExitCode;

#[derive(clap::Args)]
pub struct Args {}

pub fn run(_args: Args) -> anyhow::Result<ExitCode> {
    anyhow::bail!("kiln doctor is not written yet")
}
