//! `kiln inspect NAME:VERSION [--files [PATH]]`: an image's manifest, or
//! the files inside it, read from the compressed image itself.
use std::process::ExitCode;

use kiln_builder::ext4;
use kiln_builder::store::Store;
use kiln_image::{CachedReader, DEFAULT_CACHE_BYTES, Reader};

use crate::assets::kiln_home;

#[derive(clap::Args)]
pub struct Args {
    /// The image, as NAME:VERSION.
    image: String,
    /// List the files inside the image (below PATH, default /).
    #[arg(long, value_name = "PATH", num_args = 0..=1, default_missing_value = "/")]
    files: Option<String>,
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let image = Store::new(&kiln_home()).find(&args.image)?;
    let Some(under) = args.files else {
        println!("{}", serde_json::to_string_pretty(&image.manifest)?);
        return Ok(ExitCode::SUCCESS);
    };
    let reader = CachedReader::new(Reader::open(&image.image_path)?, DEFAULT_CACHE_BYTES);
    for e in ext4::list(reader, &under)? {
        let link = e.target.map(|t| format!(" -> {t}")).unwrap_or_default();
        println!(
            "{}{:04o} {:>5}:{:<5} {:>10} {}{}",
            e.kind, e.mode, e.uid, e.gid, e.size, e.path, link
        );
    }
    Ok(ExitCode::SUCCESS)
}
