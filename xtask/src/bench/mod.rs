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

pub use startup::check as check_report;
pub use vmm::ci as vmm_ci;

#[derive(clap::Subcommand)]
pub enum Bench {
    /// `kiln build` of recipes/hello (cold, cached, size against ext4 + zstd -19); the Debian
    /// root's compression by level and threads; recipes/debian's cold build, nested.
    Build {
        /// Cached rebuilds to time.
        #[arg(long, default_value_t = 10)]
        runs: usize,
    },
    /// Boot latency and VMM memory of `kiln run` against QEMU microvm.
    Boot {
        /// Timed boots per VMM (after one warm-up each).
        #[arg(long, default_value_t = 10)]
        runs: usize,
    },
    /// Guest read throughput from the compressed image against a raw file.
    Disk {
        /// Timed runs per backend and access pattern (after one warm-up each).
        #[arg(long, default_value_t = 5)]
        runs: usize,
        /// Only the host side (the volume and the hydration cache on this
        /// host's CPU, no VM), into target/bench/disk-host.json.
        #[arg(long)]
        host_only: bool,
    },
    /// Restore latency of `kiln snapshot restore` against a cold boot, and snapshot size.
    Snapshot {
        /// Timed cold boots and restores per guest size.
        #[arg(long, default_value_t = 5)]
        runs: usize,
    },
    /// Invoke latency of a function clone against a cold boot, clones per second, idle clone memory.
    Fn {
        /// Timed cold-boot and clone invocations.
        #[arg(long, default_value_t = 5)]
        runs: usize,
    },
    /// HTTP latency and throughput of the web image on Kiln against QEMU, both over a tap.
    Net {
        /// Rounds of 10 short requests and one 16 MiB download per target.
        #[arg(long, default_value_t = 5)]
        runs: usize,
    },
    /// `kiln bench vmm`: the VMM's own cost with the stub guest, on this host's own KVM.
    Vmm {
        /// Timed runs per series, and clones per concurrency.
        #[arg(long, default_value_t = 30)]
        runs: usize,
    },
    /// `kiln bench all --peer qemu` where KVM is (nested, labelled as emulation, without it).
    Startup {
        /// Timed runs per scenario and VMM (after one warm-up each).
        #[arg(long, default_value_t = 10)]
        runs: usize,
    },
}

/// What `bench-guest` measures.
#[derive(Clone, Copy, clap::ValueEnum)]
pub enum GuestBench {
    Build,
    Boot,
    Disk,
    Snapshot,
    Fn,
    Net,
    Startup,
}

/// `cargo xtask bench BENCH`: the host side of `bench`.
pub fn run(bench: Bench) -> Result<()> {
    match bench {
        Bench::Build { runs } => build::build(runs),
        Bench::Boot { runs } => boot::boot(runs),
        Bench::Disk {
            runs,
            host_only: false,
        } => disk::disk(runs),
        Bench::Disk {
            runs,
            host_only: true,
        } => disk::disk_host(runs),
        Bench::Snapshot { runs } => snapshot::snapshot(runs),
        Bench::Fn { runs } => function::function(runs),
        Bench::Net { runs } => net::net(runs),
        Bench::Vmm { runs } => vmm::vmm(runs),
        Bench::Startup { runs } => startup::startup(runs),
    }
}

/// `cargo xtask bench-guest KIND --runs RUNS`: the guest side of `kind`,
/// where KVM is (started by [`run_guest`]).
pub fn guest(kind: GuestBench, runs: usize) -> Result<()> {
    match kind {
        // A single cold build of recipes/debian, with nothing to repeat:
        // `bench build` starts it with `--runs 1`, which it ignores.
        GuestBench::Build => build::guest(),
        GuestBench::Boot => boot::guest(runs),
        GuestBench::Disk => disk::guest(runs),
        GuestBench::Snapshot => snapshot::guest(runs),
        GuestBench::Fn => function::guest(runs),
        GuestBench::Net => net::guest(runs),
        GuestBench::Startup => startup::guest(runs),
    }
}

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
