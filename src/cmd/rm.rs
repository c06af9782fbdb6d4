//! `kiln rm NAME:VERSION`: remove an image that no other image starts from
//! and no instance's root volume is built on.
use std::process::ExitCode;

use anyhow::bail;
use kiln_builder::store::Store;
use kiln_vmm::instance::Instance;

use crate::assets::kiln_home;

#[derive(clap::Args)]
pub struct Args {
    /// The image, as NAME:VERSION.
    image: String,
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let home = kiln_home();
    let users: Vec<String> = Instance::list(&home)?
        .into_iter()
        .filter(|i| i.record.image == args.image)
        .map(|i| i.record.name)
        .collect();
    if !users.is_empty() {
        bail!(
            "cannot remove {}: the root volumes of instance(s) {} are built on it",
            args.image,
            users.join(", ")
        );
    }
    let removed = Store::new(&home).remove(&args.image)?;
    println!("removed {}", removed.reference());
    Ok(ExitCode::SUCCESS)
}
