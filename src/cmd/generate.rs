//! `kiln __generate DIR` (hidden): shell completions and man pages made
//! from the command line's own definition, so they never drift from it.
//! `cargo xtask install-cli` runs it and puts the files where shells and
//! `man` look.
//!
//! DIR gets `completions/kiln.bash`, `completions/_kiln` (zsh),
//! `completions/kiln.fish`, and `man/kiln.1` with a page per subcommand
//! (`kiln-run.1`, `kiln-image-import.1`, ...).
use std::fs;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap_complete::Shell;

#[derive(clap::Args)]
pub struct Args {
    /// Where to write `completions/` and `man/`.
    dir: PathBuf,
}

pub fn run(args: Args, mut cli: clap::Command) -> anyhow::Result<ExitCode> {
    let completions = created(&args.dir.join("completions"))?;
    for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
        clap_complete::generate_to(shell, &mut cli, "kiln", &completions).with_context(|| {
            format!(
                "cannot write {shell} completions in {}",
                completions.display()
            )
        })?;
    }
    let man = created(&args.dir.join("man"))?;
    // Built, each subcommand knows its page's name (`kiln-image-import`).
    cli.build();
    man_pages(&cli, &man)
        .with_context(|| format!("cannot write man pages in {}", man.display()))?;
    Ok(ExitCode::SUCCESS)
}

/// A page for `command` and each of its subcommands, but the hidden ones
/// and clap's `help` (which every page's OPTIONS cover).
fn man_pages(command: &clap::Command, dir: &Path) -> std::io::Result<()> {
    for sub in command.get_subcommands() {
        if !sub.is_hide_set() && sub.get_name() != "help" {
            man_pages(sub, dir)?;
        }
    }
    clap_mangen::Man::new(command.clone()).generate_to(dir)?;
    Ok(())
}

fn created(dir: &Path) -> anyhow::Result<PathBuf> {
    fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    Ok(dir.to_path_buf())
}
