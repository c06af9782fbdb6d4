//! `cargo xtask bench startup`: `kiln bench all --peer qemu`, the
//! product's startup benchmark, where KVM is: directly on hardware KVM,
//! else inside the nested harness, where every number is labelled as
//! measured under emulation. Writes `target/bench/startup.json` and the
//! CDF plot `target/bench/startup.svg` (the README's is a copy of one).
//!
//! `cargo xtask bench-check FILE` checks a `kiln bench --json` report:
//! it parses (unknown fields are refused) and every scenario is there
//! with sound numbers (`Report::check`); the vm-test scenario `bench`
//! runs it inside L1.
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use kiln_bench::report::{Report, Vmm};
use kiln_bench::{Scenario, plot};

use super::{env, kiln_home, print_report, run_guest, save};
use crate::sh;

/// Per run (or set-up step: `kiln fn create`) under nested TCG, generously.
const PER_STEP: Duration = Duration::from_secs(60);
/// Where the harness ran, when it nested the run.
const NESTED: &str = "KVM nested in a QEMU TCG guest, on a host without hardware KVM";

/// Host side: runs the guest side where KVM is, labels, checks, writes
/// the JSON and the SVG, prints the table.
pub fn startup(runs: usize) -> Result<()> {
    if runs < 2 {
        bail!("--runs {runs}: at least 2");
    }
    // Per scenario and VMM: a warm-up and the runs; plus the function's creation.
    let steps = 4 * (runs as u32 + 1) + 4;
    let load = fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let load = load
        .split_whitespace()
        .next()
        .unwrap_or("unknown")
        .to_string();
    let mut report: Report = run_guest("startup", runs, PER_STEP * steps)?;
    if !kiln_vmm::host::detect().can_boot_linux() {
        // L1's load average is in the report; the host's is said here.
        report
            .environment
            .mark_emulated(&format!("{NESTED}, its 1-minute load average {load}"));
    }
    let problems = problems(&report, true);
    if !problems.is_empty() {
        bail!(
            "the benchmark's report is not sound: {}",
            problems.join("; ")
        );
    }
    let out = save("startup", &report)?;
    let svg = out.with_extension("svg");
    fs::write(&svg, plot::svg(&report).map_err(anyhow::Error::msg)?)
        .with_context(|| format!("cannot write {}", svg.display()))?;
    print!("{}", report.table());
    println!("{}\n{}", out.display(), svg.display());
    Ok(())
}

/// Guest side (where KVM is): `kiln bench all --peer qemu` in a Kiln home
/// whose store is the harness's; prints its report as one JSON line.
pub fn guest(runs: usize) -> Result<()> {
    let (kiln, kernel, images, work) = (
        env("KILN")?,
        env("KILN_KERNEL")?,
        PathBuf::from(env("KILN_IMAGES")?),
        PathBuf::from(env("WORK_ROOT")?).join("bench-startup"),
    );
    let home = kiln_home(&images, &work)?;
    let json = work.join("startup.json");
    // L1's console is a terminal: stderr (the progress bar) goes to a
    // file, shown when the benchmark fails.
    let errors = work.join("startup.err");
    let stderr =
        fs::File::create(&errors).with_context(|| format!("cannot create {}", errors.display()))?;
    let runs = runs.to_string();
    let ran = sh::run(
        Command::new(&kiln)
            .env("KILN_HOME", &home)
            .env("KILN_KERNEL", &kernel)
            .args(["bench", "all", "--peer", "qemu", "--runs", &runs])
            .arg("--json")
            .arg(&json)
            .stderr(stderr),
    );
    if let Err(err) = ran {
        let printed = fs::read_to_string(&errors).unwrap_or_default();
        bail!("{err:#}: {}", printed.trim());
    }
    print_report(&read(&json)?)
}

/// `cargo xtask bench-check FILE [--peer] [--plot OUT.svg]`: fails
/// listing what is wrong; draws the report's plot (again) into `plot`.
pub fn check(file: &Path, peer: bool, plot_to: Option<&Path>) -> Result<()> {
    let report = read(file)?;
    let problems = problems(&report, peer);
    if !problems.is_empty() {
        bail!("{}: {}", file.display(), problems.join("; "));
    }
    if let Some(out) = plot_to {
        fs::write(out, plot::svg(&report).map_err(anyhow::Error::msg)?)
            .with_context(|| format!("cannot write {}", out.display()))?;
    }
    println!(
        "{}: {} series, {} runs each, sound",
        file.display(),
        report.series.len(),
        report.runs
    );
    Ok(())
}

fn read(file: &Path) -> Result<Report> {
    let text =
        fs::read_to_string(file).with_context(|| format!("cannot read {}", file.display()))?;
    serde_json::from_str(&text)
        .with_context(|| format!("{}: not a kiln bench report", file.display()))
}

/// [`Report::check`] for every scenario, and with `peer`, QEMU's cold series.
fn problems(report: &Report, peer: bool) -> Vec<String> {
    let mut problems = report.check(&Scenario::ALL);
    if peer && report.series(Scenario::Cold, Vmm::Qemu).is_none() {
        problems.push("no qemu series for the cold scenario".into());
    }
    problems
}
