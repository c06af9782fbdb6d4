//! `kiln image flatten IMAGE|INSTANCE OUT.ext4`: the raw filesystem of an
//! image, or of an instance's root volume with its writes, for fsck,
//! mounting or export. `kiln image test IMAGE`: its recipe's tests, run
//! again on the stored image. `kiln image import FILE [NAME:VERSION]`: a
//! container image archive into the store, as `docker load` does.
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, bail};
use kiln_builder::build;
use kiln_builder::recipe::TestCommand;
use kiln_builder::store::Store;
use kiln_control::commit;
use kiln_control::image_test::{TestRun, TestRunner};
use kiln_control::instance::Registry;
use kiln_control::jail::JailSettings;
use kiln_image::DEFAULT_CACHE_BYTES;
use kiln_image::hydrate::{HYDRATE_BATCH, Hydrated, fillers};
use kiln_vmm::host;
use kiln_vmm::volume::Volume;

use crate::assets::{Asset, kiln_home};

/// How much of a failed test's output is shown.
const FAILED_OUTPUT_LINES: usize = 20;

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
    /// Run a stored image's tests (its recipe's [[test]]s), each in a VM of
    /// its own; exits 0 only if all pass.
    Test {
        /// NAME:VERSION of a stored image.
        image: String,
    },
    /// Fill the image's host-wide hydration cache ahead of its VMs: every
    /// chunk decompressed and verified once, so that they read it at raw
    /// speed.
    Hydrate {
        /// NAME:VERSION of a stored image.
        image: String,
    },
    /// Store a container image archive (`docker save` output or an OCI
    /// image layout tar) as an image, with no recipe: its layers, and its
    /// Entrypoint, Cmd, Env, WorkingDir and User as the run configuration.
    Import {
        /// The archive.
        file: PathBuf,
        /// The new image's NAME:VERSION; default: the archive's own name
        /// and tag (RepoTags, or the OCI index's annotations), when the tag
        /// is a version.
        #[arg(value_name = "NAME:VERSION")]
        reference: Option<String>,
        /// The guest-init binary to place at /sbin/init (default: the
        /// installed one).
        #[arg(long)]
        init: Option<PathBuf>,
    },
}

pub fn run(command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::Flatten { source, out } => flatten(&source, &out),
        Command::Test { image } => test(&image),
        Command::Hydrate { image } => hydrate(&image),
        Command::Import {
            file,
            reference,
            init,
        } => import(&file, reference.as_deref(), init),
    }
}

/// The guest-init binary images get: `flag` (`--init`), or the installed
/// one; it must exist.
pub fn guest_init(flag: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    let init = flag.unwrap_or_else(|| Asset::GuestInit.path());
    if !init.is_file() {
        bail!(
            "no guest-init at {} (pass --init, set {}, or run `{}`)",
            init.display(),
            Asset::GuestInit.env_var(),
            Asset::GuestInit.xtask()
        );
    }
    Ok(init)
}

fn import(file: &Path, reference: Option<&str>, init: Option<PathBuf>) -> anyhow::Result<ExitCode> {
    let init = guest_init(init)?;
    let store = Store::new(&kiln_home());
    let tty = std::io::stderr().is_terminal();
    let mut progress = |step: &str| {
        if tty {
            eprintln!("kiln: {step}…");
        }
    };
    let manifest = build::import(&store, file, reference, &init, &mut progress)?;
    println!(
        "imported {} (runs {:?})",
        manifest.reference(),
        manifest.entrypoint.join(" ")
    );
    Ok(ExitCode::SUCCESS)
}

fn test(reference: &str) -> anyhow::Result<ExitCode> {
    let store = Store::new(&kiln_home());
    let image = store.find(reference)?;
    let tests = &image.manifest.tests;
    if tests.is_empty() {
        println!("{reference} has no tests");
        return Ok(ExitCode::SUCCESS);
    }
    let runner = test_runner(store, &format!("{reference}'s tests"), "")?;
    let runs = runner.run_all(&image.image_path, tests, &mut |test, run| {
        println!("{}", describe(test, run));
    })?;
    let failed = runs.iter().filter(|run| !run.result.passed).count();
    println!(
        "{reference}: {} passed, {failed} failed",
        runs.len() - failed
    );
    Ok(if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// What runs the tests' VMs, once this host is known to boot them and
/// the kernel is there. A refusal says `tests` (which tests) boot the
/// image, then why this host cannot, then `advice`.
pub fn test_runner(store: Store, tests: &str, advice: &str) -> anyhow::Result<TestRunner> {
    let virt = host::detect();
    if !virt.can_boot_linux() {
        bail!("{tests} boot the image in a VM, and this host cannot boot one: {virt}{advice}");
    }
    let kernel = Asset::Kernel.path();
    if !kernel.is_file() {
        bail!(
            "{tests} boot the image, and there is no guest kernel at {} (run `{}`, or set {})",
            kernel.display(),
            Asset::Kernel.xtask(),
            Asset::Kernel.env_var()
        );
    }
    Ok(TestRunner {
        kiln: std::env::current_exe().context("cannot find the kiln binary")?,
        kernel,
        store,
        jail: JailSettings::for_vm_processes()?,
    })
}

/// One line for a test that ran, `PASS` or `FAIL` with why; a failure
/// then has the last lines of its output, indented.
pub fn describe(test: &TestCommand, run: &TestRun) -> String {
    let seconds = run.result.duration_ms as f64 / 1000.0;
    let Some(why) = run.failure(test) else {
        return format!("PASS {} ({seconds:.1} s)", test.run);
    };
    let mut text = format!(
        "FAIL {} ({seconds:.1} s): {why}; its output ends:",
        test.run
    );
    for line in run.last_lines(FAILED_OUTPUT_LINES) {
        text.push_str("\n    ");
        text.push_str(line);
    }
    text
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

fn hydrate(reference: &str) -> anyhow::Result<ExitCode> {
    let store = Store::new(&kiln_home());
    let image = store.find(reference)?;
    let reader = kiln_image::Reader::open(&image.image_path)?;
    let cache = Hydrated::open(reader, &store.cache_dir())?;
    let total = cache.reader().raw_size();
    let bar = indicatif::ProgressBar::new(total).with_style(
        indicatif::ProgressStyle::with_template(
            "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} {elapsed}",
        )
        .expect("a valid template")
        .progress_chars("=> "),
    );
    bar.set_message(reference.to_string());
    let before = cache.hydrated_bytes();
    bar.set_position(before);
    let started = std::time::Instant::now();
    cache.hydrate_all(HYDRATE_BATCH, fillers(), &mut |held| bar.set_position(held))?;
    bar.finish_and_clear();
    eprintln!(
        "kiln: {reference} hydrated: {} MiB of raw filesystem ({} MiB were already) in {:.1} s, in {}",
        total >> 20,
        before >> 20,
        started.elapsed().as_secs_f64(),
        cache.files().raw.display()
    );
    Ok(ExitCode::SUCCESS)
}
