//! `kiln rm NAME:VERSION`: remove an image that no other image starts from
//! and no instance's root volume is built on.
use std::process::ExitCode;

use anyhow::bail;
use kiln_builder::store::Store;
use kiln_control::instance::{Registry, State};

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
    let removed = Store::new(&home).remove(&args.image)?;
    println!("removed {}", removed.reference());
    Ok(ExitCode::SUCCESS)
}
