//! `kiln types`: the instance types `kiln run --type` takes.
use std::process::ExitCode;

use kiln_control::instance::types::{CATALOG, DEFAULT};

#[derive(clap::Args)]
pub struct Args {}

pub fn run(_args: Args) -> anyhow::Result<ExitCode> {
    for t in CATALOG {
        let default = if t.name == DEFAULT { "  (default)" } else { "" };
        println!("{t}{default}");
    }
    Ok(ExitCode::SUCCESS)
}
