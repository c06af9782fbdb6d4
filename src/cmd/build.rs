//! `kiln build RECIPE`: build an image (its `in = "vm"` steps in a VM
//! booted from the image being built), run its tests (each in a VM booted
//! from the built image), and publish it into the local store only if
//! they all pass.
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use anyhow::bail;
use kiln_builder::build::{self, Built, Staged};
use kiln_builder::recipe::{self, Recipe, StepPlace};
use kiln_builder::store::{Manifest, Store, TestResult};
use kiln_control::image_build::BuildVmRunner;
use kiln_control::image_test::TestRunner;

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
    let build_vm = build_vm_runner(&recipe, &args.recipe, &store)?;
    let runner = tests_runner(&recipe, &args.recipe, &store, args.skip_tests)?;
    let mut progress = progress_printer(args.progress);
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
        None => recipe.tests.is_empty().then(Vec::new),
    };
    publish(staged, results)?;
    Ok(ExitCode::SUCCESS)
}

/// The VM runner for the recipe's `in = "vm"` steps, if it has any;
/// fails if this host cannot boot one.
fn build_vm_runner(
    recipe: &Recipe,
    path: &Path,
    store: &Store,
) -> anyhow::Result<Option<BuildVmRunner>> {
    let vm_steps = (recipe.builds.iter())
        .filter(|step| matches!(step.place, StepPlace::Vm { .. }))
        .count();
    if vm_steps == 0 {
        return Ok(None);
    }
    let which = format!(
        "the {vm_steps} `in = \"vm\"` build step(s) of {}",
        path.display()
    );
    let advice = ". Run the build where KVM works (build steps cannot be skipped)";
    Ok(Some(BuildVmRunner {
        vms: image::test_runner(store.clone(), &which, advice)?,
        echo: |label, line| eprintln!("kiln: {label} | {line}"),
    }))
}

/// The runner for the recipe's tests, unless they are skipped or there
/// are none; fails if this host cannot boot a VM.
fn tests_runner(
    recipe: &Recipe,
    path: &Path,
    store: &Store,
    skip_tests: bool,
) -> anyhow::Result<Option<TestRunner>> {
    let tests = recipe.tests.len();
    if skip_tests || tests == 0 {
        return Ok(None);
    }
    let which = format!("the {tests} [[test]](s) of {}", path.display());
    let advice =
        ". Run the build where KVM works, or pass --skip-tests to publish the image untested";
    Ok(Some(image::test_runner(store.clone(), &which, advice)?))
}

/// Prints each build phase with the seconds since now, on a terminal or
/// when `asked`: piped output stays the one result line.
fn progress_printer(asked: bool) -> impl FnMut(&str) {
    let shown = asked || std::io::stderr().is_terminal();
    let started = Instant::now();
    move |step: &str| {
        if shown {
            eprintln!("kiln: [{:.1} s] {step}…", started.elapsed().as_secs_f64());
        }
    }
}

/// Publishes the staged image with its test results (`None`: untested)
/// and prints the result line.
fn publish(staged: Staged, results: Option<Vec<TestResult>>) -> anyhow::Result<()> {
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
    Ok(())
}

/// Runs the staged image's tests; fails, and so drops the image unpublished,
/// unless all of them pass.
fn run_tests(
    runner: &TestRunner,
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
