//! `kiln build RECIPE`: build an image (its `in = "vm"` steps in a VM
//! booted from the image being built), run its tests (each in a VM booted
//! from the built image), and publish it into the local store only if
//! they all pass.
use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::bail;
use kiln_builder::build::{self, Built, Staged};
use kiln_builder::recipe::{self, StepPlace};
use kiln_builder::store::{Manifest, Store, TestResult};
use kiln_control::image_build::BuildVmRunner;

use super::image;
use crate::assets::kiln_home;

#[derive(clap::Args)]
pub struct Args {
    /// A recipe file, or a directory holding recipe.toml.
    recipe: PathBuf,
    /// The guest-init binary to place at /sbin/init (default: the installed one).
    #[arg(long)]
    init: Option<PathBuf>,
    /// Publish without running the recipe's [[test]]s (the image is then
    /// marked untested): for hosts where VMs cannot boot.
    #[arg(long)]
    skip_tests: bool,
    /// Print each phase with the seconds since the build began, also when
    /// stderr is not a terminal (for logs and `cargo xtask bench build`).
    #[arg(long)]
    progress: bool,
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let init = image::guest_init(args.init)?;
    let store = Store::new(&kiln_home());
    // Before building: a build whose VM steps or tests cannot run here
    // says so now.
    let recipe = recipe::load(&args.recipe)?;
    let vm_steps = (recipe.builds.iter())
        .filter(|step| matches!(step.place, StepPlace::Vm { .. }))
        .count();
    let build_vm = if vm_steps == 0 {
        None
    } else {
        let which = format!(
            "the {vm_steps} `in = \"vm\"` build step(s) of {}",
            args.recipe.display()
        );
        let advice = ". Run the build where KVM works (build steps cannot be skipped)";
        Some(BuildVmRunner {
            vms: image::test_runner(store.clone(), &which, advice)?,
            echo: |label, line| eprintln!("kiln: {label} | {line}"),
        })
    };
    let tests = recipe.tests.len();
    let runner = if args.skip_tests || tests == 0 {
        None
    } else {
        let which = format!("the {tests} [[test]](s) of {}", args.recipe.display());
        let advice =
            ". Run the build where KVM works, or pass --skip-tests to publish the image untested";
        Some(image::test_runner(store.clone(), &which, advice)?)
    };
    // Progress on a terminal, or when asked: piped output stays the one
    // result line.
    let shown = args.progress || std::io::stderr().is_terminal();
    let started = Instant::now();
    let mut progress = |step: &str| {
        if shown {
            eprintln!("kiln: [{:.1} s] {step}…", started.elapsed().as_secs_f64());
        }
    };
    let built = build::build(
        &args.recipe,
        &store,
        &init,
        args.skip_tests,
        build_vm.as_ref().map(|vm| vm as &dyn build::BuildVm),
        &mut progress,
    )?;
    let staged = match built {
        Built::Cached(m) => {
            println!("{} is up to date (cached, {}…)", m.reference(), short(&m));
            return Ok(ExitCode::SUCCESS);
        }
        Built::Staged(staged) => staged,
    };
    let results = match &runner {
        Some(runner) => Some(run_tests(runner, &staged, &mut progress)?),
        None => (tests == 0).then(Vec::new),
    };
    let tested = match &results {
        Some(results) if !results.is_empty() => format!("; {} test(s) passed", results.len()),
        Some(_) => String::new(),
        None => "; untested (--skip-tests)".to_string(),
    };
    let m = staged.publish(results)?;
    println!(
        "built {} {}… ({:.1} MiB, {:.1} MiB raw){tested}",
        m.reference(),
        short(&m),
        mib(m.file_size),
        mib(m.raw_size)
    );
    Ok(ExitCode::SUCCESS)
}

/// Runs the staged image's tests; fails, and so drops the image unpublished,
/// unless all of them pass.
fn run_tests(
    runner: &kiln_control::image_test::TestRunner,
    staged: &Staged,
    progress: &mut dyn FnMut(&str),
) -> anyhow::Result<Vec<TestResult>> {
    let tests = &staged.manifest().tests;
    progress(&format!("running {} test(s), each in a VM", tests.len()));
    let runs = runner.run_all(&staged.image_path(), tests, &mut |test, run| {
        eprintln!("kiln: test {}", image::describe(test, run));
    })?;
    let failed = runs.iter().filter(|run| !run.result.passed).count();
    if failed > 0 {
        bail!(
            "{}: {failed} of {} test(s) failed; nothing was published",
            staged.manifest().reference(),
            runs.len()
        );
    }
    Ok(runs.into_iter().map(|run| run.result).collect())
}

/// The first 12 hex digits of the image's digest.
fn short(m: &Manifest) -> &str {
    let digest = m.digest.strip_prefix("sha256:").unwrap_or(&m.digest);
    &digest[..12.min(digest.len())]
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}
