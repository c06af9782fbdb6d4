//! `kiln image flatten IMAGE|INSTANCE OUT.ext4`: the raw filesystem of an
//! image, or of an instance's root volume with its writes, for fsck,
//! mounting or export.
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use kiln_builder::store::Store;
use kiln_control::commit;
use kiln_control::instance::Registry;
use kiln_image::DEFAULT_CACHE_BYTES;
use kiln_vmm::volume::Volume;

use crate::assets::kiln_home;

#[derive(clap::Subcommand)]
pub enum Command {
    /// Write the raw filesystem of an image (NAME:VERSION) or of an
    /// instance's root volume (its name) to a file.
    Flatten {
        /// NAME:VERSION of a stored image, or an instance's id or name.
        source: String,
        /// The raw ext4 file to write (replaced whole, never half-written).
        out: PathBuf,
    },
}

pub fn run(command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::Flatten { source, out } => flatten(&source, &out),
    }
}

fn flatten(source: &str, out: &Path) -> anyhow::Result<ExitCode> {
    let home = kiln_home();
    let store = Store::new(&home);
    let volume = if source.contains(':') {
        Volume::open(&store.find(source)?.image_path, None, DEFAULT_CACHE_BYTES)?
    } else {
        let instance = Registry::new(&home).find(source).with_context(|| {
            format!("{source:?} is neither NAME:VERSION of an image nor an instance")
        })?;
        commit::root_volume(&store, &instance)?
    };
    commit::flatten_to_file(&volume, out)?;
    eprintln!(
        "kiln: wrote {} ({} bytes)",
        out.display(),
        volume.capacity()
    );
    Ok(ExitCode::SUCCESS)
}
