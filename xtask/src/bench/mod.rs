//! Benchmarks, each measured against a peer in the same run.
//!
//! - `cargo xtask bench build` ([`build`]): `kiln build` of recipes/hello,
//!   cold and cached, and the image's size against the same raw ext4
//!   compressed whole with `zstd -19`.
//! - `cargo xtask bench boot` ([`boot`]): boot latency and VMM memory of
//!   `kiln run` against QEMU's microvm machine, same kernel and image.
//! - `cargo xtask bench disk` ([`disk`]): guest read throughput from a
//!   root volume on the compressed image against the same filesystem as a
//!   raw file, same VMM, same run.
//! - `cargo xtask bench snapshot` ([`snapshot`]): latency of `kiln snapshot
//!   restore` against a cold `kiln run`, same image and guest size, and
//!   the cost and size of `kiln snapshot create`.
//! - `cargo xtask bench fn` ([`function`]): latency of `kiln fn invoke` (a
//!   clone of the function's template) against the same handler run by a
//!   cold `kiln run`, clones per second, and the memory of an idle clone.
//! - `cargo xtask bench net` ([`net`]): HTTP latency and download
//!   throughput of the web image on Kiln's virtio-net against QEMU's, both
//!   over a tap on kiln0.
//!
//! - `cargo xtask bench vmm` ([`vmm`]): `kiln bench vmm`, the VMM's own
//!   cost with the stub guest on this host's own KVM (never nested),
//!   report checked and plot drawn; `cargo xtask test` runs a short one.
//!
//! The VM benchmarks run their guest side (`bench-guest`) where KVM is: on
//! a host without hardware KVM, inside the nested harness, where only
//! ratios mean anything; the reports say which.
use std::fs;
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde::Serialize;
use serde::de::DeserializeOwned;

pub use kiln_bench::stats::Stats;
use kiln_bench::timing::{Watchdog, millis};

use crate::{harness, sh};

mod boot;
mod build;
mod disk;
mod function;
mod net;
mod snapshot;
mod startup;
mod vmm;

pub use boot::{boot, guest as boot_guest};
pub use build::{build, guest as build_guest};
pub use disk::{disk, disk_host, guest as disk_guest};
pub use function::{function, guest as function_guest};
pub use net::{guest as net_guest, net};
pub use snapshot::{guest as snapshot_guest, snapshot};
pub use startup::{check as check_report, guest as startup_guest, startup};
pub use vmm::{ci as vmm_ci, vmm};

/// The guest side prints its report as one line after this.
const JSON_PREFIX: &str = "KILN-BENCH-JSON ";

/// The environment variable `name`, which the harness sets for the guest side.
fn env(name: &str) -> Result<String> {
    std::env::var(name).with_context(|| format!("{name} is not set"))
}

/// The percentiles of `samples` (at least one: every benchmark times
/// `--runs` of at least 2).
fn stats(samples: &[f64]) -> Result<Stats> {
    Stats::of(samples).context("no samples to take percentiles of")
}

/// A fresh `$KILN_HOME` under `work` for a guest-side benchmark, whose
/// image store is the harness's (`images`).
fn kiln_home(images: &std::path::Path, work: &std::path::Path) -> Result<PathBuf> {
    let home = work.join("home");
    let _ = fs::remove_dir_all(work);
    fs::create_dir_all(&home)?;
    std::os::unix::fs::symlink(images, home.join("images"))?;
    Ok(home)
}

/// `kiln` with a home of its own, for the guest side of a benchmark
/// (`kiln_bench`'s, which terminates the instances it started when
/// dropped). Each benchmark adds the runs it times in an `impl Kiln` of
/// its own.
struct Kiln(kiln_bench::kiln::Kiln);

impl Kiln {
    fn new(bin: String, home: PathBuf) -> Self {
        Kiln(kiln_bench::kiln::Kiln::new(bin, home))
    }
}

impl std::ops::Deref for Kiln {
    type Target = kiln_bench::kiln::Kiln;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

/// Where the benchmark ran, for the reports.
fn environment() -> String {
    if kiln_vmm::host::detect().can_boot_linux() {
        "hardware KVM".into()
    } else {
        "nested KVM under QEMU TCG (PVM host): only ratios mean anything".into()
    }
}

/// Runs `xtask bench-guest KIND --runs RUNS` where KVM is and returns the
/// report it printed.
fn run_guest<R: DeserializeOwned>(kind: &str, runs: usize, allowance: Duration) -> Result<R> {
    run_guest_with(kind, runs, allowance, L1::default())
}

/// What a benchmark needs of L1 beyond the scenarios' default.
#[derive(Clone, Copy, Debug)]
struct L1 {
    /// The Debian base image in L1's store.
    debian_base: bool,
    vcpus: u32,
}

impl Default for L1 {
    fn default() -> Self {
        Self {
            debian_base: false,
            vcpus: 1,
        }
    }
}

/// [`run_guest`] on an L1 such as `l1`.
fn run_guest_with<R: DeserializeOwned>(
    kind: &str,
    runs: usize,
    allowance: Duration,
    l1: L1,
) -> Result<R> {
    let prepared = harness::prepare(l1.debian_base)?;
    let job = harness::Job {
        command: ["{xtask}", "bench-guest", kind, "--runs", &runs.to_string()]
            .map(String::from)
            .to_vec(),
        allowance,
        silence_limit: None,
        l1_vcpus: l1.vcpus,
    };
    let (lines, _) = harness::run_job(&prepared, &job)?;
    let json = lines
        .iter()
        .find_map(|line| line.split_once(JSON_PREFIX).map(|(_, json)| json))
        .context("the benchmark printed no result (see target/vm-test/console.log)")?;
    serde_json::from_str(json.trim()).context("unreadable benchmark result")
}

/// Prints the guest side's report for [`run_guest`].
fn print_report(report: &impl Serialize) -> Result<()> {
    println!("{JSON_PREFIX}{}", serde_json::to_string(report)?);
    Ok(())
}

/// Writes `target/bench/NAME.json`; returns its path.
fn save(name: &str, report: &impl Serialize) -> Result<PathBuf> {
    let out = sh::workspace_root().join(format!("target/bench/{name}.json"));
    fs::create_dir_all(out.parent().expect("has a parent"))?;
    fs::write(&out, serde_json::to_string_pretty(report)?)?;
    Ok(out)
}

/// One timed boot.
struct Boot {
    init: Duration,
    total: Duration,
    output: Vec<String>,
}

/// Runs `cmd` (a VM) to its end, timing its first output line holding
/// `marker`; a VM still running after `limit` is killed and the run fails
/// with what it printed, rather than hanging the benchmark.
fn time_boot(mut cmd: Command, marker: &str, limit: Duration) -> Result<Boot> {
    let started = Instant::now();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot start {}", sh::describe(&cmd)))?;
    let pid = child.id();
    let watchdog = Watchdog::start(pid, limit);
    let stderr = child.stderr.take().expect("piped");
    let errors = std::thread::spawn(move || {
        BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
            .collect::<Vec<_>>()
    });
    let mut init = None;
    let mut output = Vec::new();
    for line in BufReader::new(child.stdout.take().expect("piped")).lines() {
        let line = line?;
        if init.is_none() && line.contains(marker) {
            init = Some(started.elapsed());
        }
        output.push(line);
    }
    let killed = watchdog.finish();
    child.wait()?;
    let total = started.elapsed();
    output.extend(errors.join().expect("the stderr reader does not panic"));
    if killed {
        bail!(
            "{} was still running after {limit:?} and was killed; it printed: {}",
            sh::describe(&cmd),
            output.join(" | ")
        );
    }
    let init = init.with_context(|| {
        format!(
            "{} never printed {marker:?}: {}",
            sh::describe(&cmd),
            output.join(" | ")
        )
    })?;
    Ok(Boot {
        init,
        total,
        output,
    })
}
