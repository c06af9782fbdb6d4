//! `kiln inspect NAME:VERSION [--files [PATH]] [--format json]`: an
//! image's manifest (JSON either way: its exposed ports, labels and run
//! command among the fields), or the files inside it, read from the
//! compressed image itself (`ls -l`-like lines, or a JSON array).
use std::process::ExitCode;

use kiln_builder::ext4;
use kiln_builder::store::Store;
use kiln_image::{CachedReader, DEFAULT_CACHE_BYTES, Reader};

use crate::assets::kiln_home;
use crate::cmd::format::Output;

#[derive(clap::Args)]
pub struct Args {
    /// The image, as NAME:VERSION.
    image: String,
    /// List the files inside the image (below PATH, default /).
    #[arg(long, value_name = "PATH", num_args = 0..=1, default_missing_value = "/")]
    files: Option<String>,
    #[command(flatten)]
    output: Output,
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let image = Store::new(&kiln_home()).find(&args.image)?;
    let Some(under) = args.files else {
        println!("{}", serde_json::to_string_pretty(&image.manifest)?);
        return Ok(ExitCode::SUCCESS);
    };
    let reader = CachedReader::new(Reader::open(&image.image_path)?, DEFAULT_CACHE_BYTES);
    let entries = ext4::list(reader, &under)?;
    if args.output.json(&entries)? {
        return Ok(ExitCode::SUCCESS);
    }
    for e in entries {
        let link = e.target.map(|t| format!(" -> {t}")).unwrap_or_default();
        println!(
            "{}{:04o} {:>5}:{:<5} {:>10} {}{}",
            e.kind, e.mode, e.uid, e.gid, e.size, e.path, link
        );
    }
    Ok(ExitCode::SUCCESS)
}
