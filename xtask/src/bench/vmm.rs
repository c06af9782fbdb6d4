//! `cargo xtask bench vmm [--runs N]`, and `cargo xtask test`'s short run
//! of it: `kiln bench vmm`, the stub guest on this host's own KVM (PVM
//! included), never nested, so it stays cheap (CI's run well under a
//! minute). Its report is read back (unknown fields refused), checked
//! (`VmmReport::check`, and every goal's key a positive number), and its
//! plot drawn again from it, into `target/bench/NAME.{json,svg}`.
use std::fs;
use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result, bail};
use kiln_bench::vmm::report::VmmReport;

use crate::sh;

/// `kiln bench vmm`'s arguments in CI: 3 runs each, clones 1 and 2 at a time.
const SHORT_RUN: &[&str] = &["--runs", "3", "--warmup", "1", "--concurrency", "1,2"];

/// The top-level keys issue 19 names; each must be a positive number.
const KEYS: &[&str] = &[
    "cold_wall_ratio",
    "cold_cpu_ms_p50",
    "restore_ms_p50",
    "restore_ms_p99",
    "vm_restore_ms_p50",
    "vm_restore_ms_p99",
    "clones_per_s",
    "vmm_rss_mib",
];

/// `cargo xtask bench vmm`: `runs` runs per series, into `target/bench/vmm.*`.
pub fn vmm(runs: usize) -> Result<()> {
    // QEMU microvm, the peer of every series.
    crate::apt::ensure(&["qemu-system-x86"])?;
    let runs = runs.to_string();
    run(
        "vmm",
        &crate::harness::build_kiln()?,
        &crate::stub::build()?,
        &["--runs", &runs],
    )
}

/// CI's short run with `kiln` and the stub `stub`, into
/// `target/bench/vmm-ci.*`; skipped on a host without KVM.
pub fn ci(kiln: &Path, stub: &Path) -> Result<()> {
    if let kiln_vmm::host::HostVirt::Unavailable { reason } = kiln_vmm::host::detect() {
        eprintln!("xtask: kiln bench vmm skipped: this host has no KVM ({reason})");
        return Ok(());
    }
    run("vmm-ci", kiln, stub, SHORT_RUN)
}

/// `kiln bench vmm ARGS` with `kiln` and `stub`, into `target/bench/NAME.*`.
fn run(name: &str, kiln: &Path, stub: &Path, args: &[&str]) -> Result<()> {
    let out = sh::workspace_root().join("target/bench");
    fs::create_dir_all(&out).with_context(|| format!("cannot create {}", out.display()))?;
    let (json, svg) = (
        out.join(format!("{name}.json")),
        out.join(format!("{name}.svg")),
    );
    sh::run(
        Command::new(kiln)
            .env("KILN_STUB", stub)
            .args(["bench", "vmm"])
            .args(args)
            .arg("--json")
            .arg(&json)
            .arg("--plot")
            .arg(&svg),
    )?;
    check(&json, &svg)
}

/// Reads the report `json` back, checks it, and draws its plot into `svg`.
fn check(json: &Path, svg: &Path) -> Result<()> {
    let text =
        fs::read_to_string(json).with_context(|| format!("cannot read {}", json.display()))?;
    let report: VmmReport = serde_json::from_str(&text)
        .with_context(|| format!("{}: not a kiln bench vmm report", json.display()))?;
    let value: serde_json::Value = serde_json::from_str(&text)?;
    let mut problems = report.check();
    for key in KEYS {
        match value[key].as_f64() {
            Some(number) if number.is_finite() && number > 0.0 => {}
            _ => problems.push(format!("{key} is {}, not a positive number", value[key])),
        }
    }
    if !problems.is_empty() {
        bail!("{}: {}", json.display(), problems.join("; "));
    }
    let plot = report.svg().context("cannot draw the plot")?;
    fs::write(svg, plot).with_context(|| format!("cannot write {}", svg.display()))?;
    println!("{}: sound; plot in {}", json.display(), svg.display());
    Ok(())
}
