//! `kiln types [--format json]`: the instance types `kiln run --type`
//! takes.
use std::process::ExitCode;

use kiln_control::instance::types::{CATALOG, DEFAULT, InstanceType};

use crate::cmd::format::Output;

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    output: Output,
}

/// A type as JSON: the catalog's entry, and whether it is the default.
#[derive(serde::Serialize)]
struct Row {
    #[serde(flatten)]
    instance_type: InstanceType,
    default: bool,
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let rows: Vec<Row> = CATALOG
        .iter()
        .map(|&t| Row {
            instance_type: t,
            default: t.name == DEFAULT,
        })
        .collect();
    if args.output.json(&rows)? {
        return Ok(ExitCode::SUCCESS);
    }
    for t in CATALOG {
        let default = if t.name == DEFAULT { "  (default)" } else { "" };
        println!("{t}{default}");
    }
    Ok(ExitCode::SUCCESS)
}
