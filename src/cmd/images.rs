//! `kiln images [--format json]`: list the local store (as JSON, each
//! image's whole manifest).
use std::process::ExitCode;

use kiln_builder::store::{Manifest, Store};
use kiln_image::hydrate::CacheFiles;

use crate::assets::kiln_home;
use crate::cmd::format::Output;

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    output: Output,
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let store = Store::new(&kiln_home());
    let images = store.list()?;
    if args.output.json(&images)? {
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{:<20} {:<12} {:<14} {:>10} {:>9} {:<24} {:<10} CREATED",
        "NAME", "VERSION", "DIGEST", "SIZE", "HYDRATED", "PARENT", "TESTS"
    );
    for m in images {
        let digest = m.digest.strip_prefix("sha256:").unwrap_or(&m.digest);
        println!(
            "{:<20} {:<12} {:<14} {:>10} {:>9} {:<24} {:<10} {}",
            m.name,
            m.version,
            &digest[..12.min(digest.len())],
            format!("{:.1}M", m.file_size as f64 / (1024.0 * 1024.0)),
            hydrated(&store, &m),
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

/// The HYDRATED column: how much of the raw filesystem the image's
/// hydration cache holds, in percent; `?` when the image cannot be read
/// (`kiln image flatten` says why).
fn hydrated(store: &Store, m: &Manifest) -> String {
    let held = store.find(&m.reference()).ok().and_then(|image| {
        let reader = kiln_image::Reader::open(&image.image_path).ok()?;
        let cache = CacheFiles::new(&store.cache_dir(), &reader.content_id());
        let bytes = cache.hydrated_bytes(&reader).ok()?;
        Some(bytes * 100 / reader.raw_size().max(1))
    });
    held.map_or_else(|| "?".to_string(), |percent| format!("{percent}%"))
}
