//! `kiln images [--format json]`: list the local store (as JSON, each
//! image's whole manifest). OWN is what an image's own file stores,
//! SHARED what it reads from its parents' files (chunks it shares with
//! them, stored once).
use std::process::ExitCode;

use kiln_builder::store::{Manifest, Store};
use kiln_image::Reader;
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
        "{:<20} {:<12} {:<14} {:>8} {:>8} {:>9} {:<24} {:<10} CREATED",
        "NAME", "VERSION", "DIGEST", "OWN", "SHARED", "HYDRATED", "PARENT", "TESTS"
    );
    for m in images {
        let digest = m.digest.strip_prefix("sha256:").unwrap_or(&m.digest);
        // `?` where the image cannot be read (`kiln image flatten` says why).
        let reader = (store.find(&m.reference()).ok())
            .and_then(|image| Reader::open(&image.image_path).ok());
        let shared = (reader.as_ref().and_then(|r| r.stored().ok()))
            .map_or_else(|| "?".to_string(), |stored| mib(stored.shared));
        let hydrated = reader.map_or_else(|| "?".to_string(), |r| hydrated(&store, &r));
        println!(
            "{:<20} {:<12} {:<14} {:>8} {:>8} {:>9} {:<24} {:<10} {}",
            m.name,
            m.version,
            &digest[..12.min(digest.len())],
            mib(m.file_size),
            shared,
            hydrated,
            m.parent.as_deref().unwrap_or("-"),
            tests(&m),
            m.created
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// `bytes` in MiB, one decimal.
fn mib(bytes: u64) -> String {
    format!("{:.1}M", bytes as f64 / (1024.0 * 1024.0))
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
/// hydration cache holds, in percent; `?` when the cache cannot be read.
fn hydrated(store: &Store, reader: &Reader) -> String {
    let cache = CacheFiles::new(&store.cache_dir(), &reader.content_id());
    let held = (cache.hydrated_bytes(reader).ok()).map(|b| b * 100 / reader.raw_size().max(1));
    held.map_or_else(|| "?".to_string(), |percent| format!("{percent}%"))
}
