//! `kiln images [--format json]`: list the local store (as JSON, each
//! image's whole manifest).
use std::process::ExitCode;

use kiln_builder::store::{Manifest, Store};

use crate::assets::kiln_home;
use crate::cmd::format::Output;

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    output: Output,
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let images = Store::new(&kiln_home()).list()?;
    if args.output.json(&images)? {
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{:<20} {:<12} {:<14} {:>10} {:<24} {:<10} CREATED",
        "NAME", "VERSION", "DIGEST", "SIZE", "PARENT", "TESTS"
    );
    for m in images {
        let digest = m.digest.strip_prefix("sha256:").unwrap_or(&m.digest);
        println!(
            "{:<20} {:<12} {:<14} {:>10} {:<24} {:<10} {}",
            m.name,
            m.version,
            &digest[..12.min(digest.len())],
            format!("{:.1}M", m.file_size as f64 / (1024.0 * 1024.0)),
            m.parent.as_deref().unwrap_or("-"),
            tests(&m),
            m.created
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// The TESTS column: how many passed when the image was built,
/// `untested` when they were skipped, `-` for an image with none.
fn tests(m: &Manifest) -> String {
    match &m.test_results {
        _ if m.tests.is_empty() => "-".to_string(),
        Some(results) => format!("{} passed", results.len()),
        None => "untested".to_string(),
    }
}
