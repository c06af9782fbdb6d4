//! `kiln commit INSTANCE NAME:VERSION`: a new image from a stopped
//! instance's root volume, with the instance's image as its parent
//! (EC2's "create image").
use std::process::ExitCode;

use kiln_builder::store::Store;
use kiln_control::commit;
use kiln_control::instance::Registry;

use crate::assets::kiln_home;

#[derive(clap::Args)]
pub struct Args {
    /// The instance's id or name; it must be stopped.
    instance: String,
    /// The new image, as NAME:VERSION.
    image: String,
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let home = kiln_home();
    let instance = Registry::new(&home).find(&args.instance)?;
    let m = commit::commit(&Store::new(&home), &instance, &args.image)?;
    let digest = m.digest.strip_prefix("sha256:").unwrap_or(&m.digest);
    println!(
        "committed {} {}… ({:.1} MiB, {:.1} MiB raw), parent {}",
        m.reference(),
        &digest[..12.min(digest.len())],
        mib(m.file_size),
        mib(m.raw_size),
        m.parent.as_deref().unwrap_or("-")
    );
    Ok(ExitCode::SUCCESS)
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}
