//! `kiln build RECIPE`: build an image into the local store.
use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::bail;
use kiln_builder::build;
use kiln_builder::store::Store;

use crate::assets::{Asset, kiln_home};

#[derive(clap::Args)]
pub struct Args {
    /// A recipe file, or a directory holding recipe.toml.
    recipe: PathBuf,
    /// The guest-init binary to place at /sbin/init (default: the installed one).
    #[arg(long)]
    init: Option<PathBuf>,
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let init = args.init.unwrap_or_else(|| Asset::GuestInit.path());
    if !init.is_file() {
        bail!(
            "no guest-init at {} (pass --init, set {}, or run `{}`)",
            init.display(),
            Asset::GuestInit.env_var(),
            Asset::GuestInit.xtask()
        );
    }
    let store = Store::new(&kiln_home());
    // Progress on a terminal only: piped output stays the one result line.
    let tty = std::io::stderr().is_terminal();
    let mut progress = |step: &str| {
        if tty {
            eprintln!("kiln: {step}…");
        }
    };
    let built = build::build(&args.recipe, &store, &init, &mut progress)?;
    let m = &built.manifest;
    let digest = m.digest.strip_prefix("sha256:").unwrap_or(&m.digest);
    let short = &digest[..12.min(digest.len())];
    if built.cached {
        println!("{} is up to date (cached, {}…)", m.reference(), short);
    } else {
        println!(
            "built {} {}… ({:.1} MiB, {:.1} MiB raw)",
            m.reference(),
            short,
            mib(m.file_size),
            mib(m.raw_size)
        );
    }
    if !m.tests.is_empty() {
        eprintln!(
            "kiln: {} [[test]] command(s) recorded but not run: running tests inside the booted image comes with `kiln run IMAGE`",
            m.tests.len()
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}
