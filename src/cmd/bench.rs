//! `kiln bench [cold|restore|clone|all]`: startup latency (`kiln_bench`),
//! a table, and optionally JSON and an SVG of the CDFs; `kiln bench vmm`:
//! the VMM's own cost with the stub guest (`kiln_bench::vmm`), the same way.
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use indicatif::{ProgressBar, ProgressStyle};
use kiln_bench::vmm::VmmConfig;
use kiln_bench::{self as bench, Config, Peer, Progress, Scenario};

use crate::assets::{Asset, kiln_home};

#[derive(Clone, Copy, clap::ValueEnum)]
pub enum Which {
    /// `kiln run` to guest-init's boot-timer write.
    Cold,
    /// `kiln snapshot restore` to the restored guest answering.
    Restore,
    /// `kiln fn invoke` (a snapshot clone) to the first response byte.
    Clone,
    /// All three.
    All,
}

#[derive(Clone, Copy, clap::ValueEnum)]
pub enum PeerArg {
    /// QEMU's microvm machine, same kernel and root filesystem (cold boots).
    Qemu,
}

#[derive(clap::Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct Args {
    #[command(subcommand)]
    vmm: Option<VmmCommand>,
    #[command(flatten)]
    startup: StartupArgs,
}

#[derive(clap::Subcommand)]
enum VmmCommand {
    /// The VMM's own cost, natively, with the stub guest for a kernel:
    /// cold start, snapshot restore, clones/s and where a restore's time goes.
    Vmm(VmmArgs),
}

#[derive(clap::Args)]
struct VmmArgs {
    /// Timed runs per series (cold and restore, per VMM), and clones per concurrency.
    #[arg(long, default_value_t = 30)]
    runs: usize,
    /// Untimed runs before each series.
    #[arg(long, default_value_t = 1)]
    warmup: usize,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 128)]
    memory: u32,
    /// The concurrencies the clones run at.
    #[arg(long, value_delimiter = ',', default_value = "1,2,4,8")]
    concurrency: Vec<usize>,
    /// Leave QEMU out (it is timed by default: cold boots, stops and `-incoming` restores).
    #[arg(long)]
    no_qemu: bool,
    /// Also time a Firecracker binary of your own (cold boots of the stub).
    #[arg(long, value_name = "firecracker=PATH", value_parser = bench::vmm::firecracker::peer_binary)]
    peer: Option<PathBuf>,
    /// Seconds one run may take before it is killed and the benchmark fails.
    #[arg(long, default_value_t = 60)]
    limit: u64,
    /// Write the report (every sample, percentiles, breakdowns, goals) as JSON.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
    /// Draw the latency CDFs as an SVG.
    #[arg(long, value_name = "FILE.svg")]
    plot: Option<PathBuf>,
}

#[derive(clap::Args)]
struct StartupArgs {
    #[arg(value_enum, default_value = "all")]
    which: Which,
    /// NAME:VERSION from the local store, booted, restored and cloned.
    #[arg(long, default_value = "hello:1.0.0")]
    image: String,
    /// The clone scenario's handler (default: the image's entrypoint).
    #[arg(long)]
    handler: Option<String>,
    /// Timed runs per scenario (and per VMM).
    #[arg(long, default_value_t = 20)]
    runs: usize,
    /// Runs in flight at once.
    #[arg(long, default_value_t = 1)]
    concurrency: usize,
    /// Untimed runs before the timed ones, per scenario and VMM.
    #[arg(long, default_value_t = 1)]
    warmup: usize,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 128)]
    memory: u32,
    /// Also time this VMM, same kernel and root filesystem, and print the ratio.
    #[arg(long, value_enum)]
    peer: Option<PeerArg>,
    /// Seconds one run may take before it is killed and the benchmark fails.
    #[arg(long, default_value_t = 120)]
    limit: u64,
    /// Write the report (every sample, percentiles, ratios) as JSON.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
    /// Draw the latency CDFs as an SVG.
    #[arg(long, value_name = "FILE.svg")]
    plot: Option<PathBuf>,
}

/// indicatif's bar on stderr (hidden when stderr is not a terminal): a
/// bar for a series' runs, a spinner for a set-up step.
struct Bar(ProgressBar);

impl Bar {
    fn new() -> Bar {
        let bar = ProgressBar::new(0);
        bar.enable_steady_tick(Duration::from_millis(200));
        Bar(bar)
    }
}

impl Progress for Bar {
    fn series(&self, label: &str, runs: usize) {
        self.0.set_style(
            ProgressStyle::with_template("{spinner} {msg:16} [{bar:30}] {pos}/{len} {elapsed}")
                .expect("a valid template")
                .progress_chars("=> "),
        );
        self.0.set_length(runs as u64);
        self.0.set_position(0);
        self.0.set_message(label.to_string());
    }
    fn ran(&self) {
        self.0.inc(1);
    }
    fn step(&self, what: &str) {
        self.0.set_style(
            ProgressStyle::with_template("{spinner} {msg} {elapsed}").expect("a valid template"),
        );
        self.0.set_message(what.to_string());
    }
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    match args.vmm {
        Some(VmmCommand::Vmm(vmm)) => run_vmm(vmm),
        None => run_startup(args.startup),
    }
}

fn run_startup(args: StartupArgs) -> anyhow::Result<ExitCode> {
    let scenarios = match args.which {
        Which::Cold => vec![Scenario::Cold],
        Which::Restore => vec![Scenario::Restore],
        Which::Clone => vec![Scenario::Clone],
        Which::All => Scenario::ALL.to_vec(),
    };
    let config = Config {
        scenarios: scenarios.clone(),
        image: args.image,
        handler: args.handler,
        memory_mib: args.memory,
        runs: args.runs,
        concurrency: args.concurrency,
        warmup: args.warmup,
        peer: args.peer.map(|PeerArg::Qemu| Peer::Qemu),
        kiln: std::env::current_exe().context("cannot find the kiln binary")?,
        home: kiln_home(),
        kernel: Asset::Kernel.path(),
        limit: Duration::from_secs(args.limit),
    };
    let bar = Bar::new();
    let report = bench::run(&config, &bar);
    bar.0.finish_and_clear();
    let report = report?;
    let problems = report.check(&scenarios);
    if !problems.is_empty() {
        anyhow::bail!("the report is not sound: {}", problems.join("; "));
    }
    print!("{}", report.table());
    write_outputs(
        || serde_json::to_string_pretty(&report),
        args.json.as_deref(),
        args.plot.as_deref(),
        || bench::plot::svg(&report),
    )
}

fn run_vmm(args: VmmArgs) -> anyhow::Result<ExitCode> {
    let config = VmmConfig {
        runs: args.runs,
        warmup: args.warmup,
        memory_mib: args.memory,
        concurrencies: args.concurrency,
        qemu: !args.no_qemu,
        firecracker: args.peer,
        kiln: std::env::current_exe().context("cannot find the kiln binary")?,
        home: kiln_home(),
        stub: Asset::Stub.path(),
        limit: Duration::from_secs(args.limit),
    };
    let bar = Bar::new();
    let report = bench::vmm::run(&config, &bar);
    bar.0.finish_and_clear();
    let report = report?;
    let problems = report.check();
    if !problems.is_empty() {
        anyhow::bail!("the report is not sound: {}", problems.join("; "));
    }
    print!("{}", report.table());
    write_outputs(
        || serde_json::to_string_pretty(&report),
        args.json.as_deref(),
        args.plot.as_deref(),
        || report.svg(),
    )
}

/// The report (as `to_json` writes it) into `json`, its plot (as `svg`
/// draws it) into `plot`.
fn write_outputs(
    to_json: impl FnOnce() -> serde_json::Result<String>,
    json: Option<&Path>,
    plot: Option<&Path>,
    svg: impl FnOnce() -> Result<String, bench::plot::PlotError>,
) -> anyhow::Result<ExitCode> {
    if let Some(path) = json {
        let json = to_json()?;
        std::fs::write(path, json + "\n")
            .with_context(|| format!("--json {}: cannot write", path.display()))?;
        eprintln!("kiln: wrote {}", path.display());
    }
    if let Some(path) = plot {
        let svg = svg().map_err(bench::BenchError::Plot)?;
        std::fs::write(path, svg)
            .with_context(|| format!("--plot {}: cannot write", path.display()))?;
        eprintln!("kiln: wrote {}", path.display());
    }
    Ok(ExitCode::SUCCESS)
}
