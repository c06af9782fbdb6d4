//! `kiln rm NAME:VERSION`: remove an image that no instance's root volume
//! is built on, with its hydration cache. The files it shares with other
//! images (a parent's chunks, or its own file that children share) stay
//! until the last image that uses them goes; it says what was freed.
use std::process::ExitCode;

use anyhow::bail;
use kiln_builder::store::Store;
use kiln_control::instance::{Registry, State};
use kiln_image::hydrate::CacheFiles;

use crate::assets::kiln_home;

#[derive(clap::Args)]
pub struct Args {
    /// The image, as NAME:VERSION.
    image: String,
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let home = kiln_home();
    let users: Vec<String> = Registry::new(&home)
        .list()?
        .into_iter()
        .filter(|i| i.record.spec.image == args.image && i.record.state != State::Terminated)
        .map(|i| i.label().to_string())
        .collect();
    if !users.is_empty() {
        bail!(
            "cannot remove {}: the root volumes of instance(s) {} are built on it",
            args.image,
            users.join(", ")
        );
    }
    let store = Store::new(&home);
    // The cache is named by the image's content id, read before the image
    // goes. An image whose index is too damaged to give it is removed all
    // the same; a cache filled before the damage then stays behind in
    // $KILN_HOME/cache.
    let cache = kiln_image::Reader::open(&store.find(&args.image)?.image_path)
        .ok()
        .map(|reader| CacheFiles::new(&store.cache_dir(), &reader.content_id()));
    let (removed, freed) = store.remove(&args.image)?;
    if let Some(cache) = cache {
        cache.remove()?;
    }
    println!(
        "removed {} ({:.1} MiB of the store freed)",
        removed.reference(),
        freed as f64 / (1024.0 * 1024.0)
    );
    Ok(ExitCode::SUCCESS)
}
