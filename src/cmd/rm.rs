//! `kiln rm NAME:VERSION`: remove an image that no other image starts from.
use std::process::ExitCode;

use kiln_builder::store::Store;

use crate::assets::kiln_home;

#[derive(clap::Args)]
pub struct Args {
    /// The image, as NAME:VERSION.
    image: String,
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let removed = Store::new(&kiln_home()).remove(&args.image)?;
    println!("removed {}", removed.reference());
    Ok(ExitCode::SUCCESS)
}
