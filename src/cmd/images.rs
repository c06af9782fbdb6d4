//! `kiln images`: list the local store.
use std::process::ExitCode;

use kiln_builder::store::Store;

use crate::assets::kiln_home;

#[derive(clap::Args)]
pub struct Args {}

pub fn run(_args: Args) -> anyhow::Result<ExitCode> {
    let images = Store::new(&kiln_home()).list()?;
    println!(
        "{:<20} {:<12} {:<14} {:>10} {:<24} CREATED",
        "NAME", "VERSION", "DIGEST", "SIZE", "PARENT"
    );
    for m in images {
        let digest = m.digest.strip_prefix("sha256:").unwrap_or(&m.digest);
        println!(
            "{:<20} {:<12} {:<14} {:>10} {:<24} {}",
            m.name,
            m.version,
            &digest[..12.min(digest.len())],
            format!("{:.1}M", m.file_size as f64 / (1024.0 * 1024.0)),
            m.parent.as_deref().unwrap_or("-"),
            m.created
        );
    }
    Ok(ExitCode::SUCCESS)
}
