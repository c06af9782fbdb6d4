//! `kiln bench`: startup-latency scenarios against a peer VMM, their
//! statistics, JSON report and SVG plot: the numbers users compare
//! microVMMs by. A crate of its own, on top of `kiln_vmm` (whose
//! instances, vsock and volumes it reads), so that the VMM does not link
//! the plotting.
//!
//! Three scenarios, each timed from the exec of a `kiln` command (the
//! benchmark spawns it; the process's start is the timer's zero) to an
//! event that shows the guest running:
//!
//! - [`Scenario::Cold`] ([`cold`]): `kiln run IMAGE --timing` to the
//!   `boot-to-init:` line the VMM prints the moment guest-init's
//!   boot-timer write (the guest-init port, `InitStarted`) traps to it.
//!   The peer, QEMU's microvm machine ([`qemu`]) with the same kernel and
//!   root filesystem, is timed to the same write: an `isa-debugcon` on
//!   the same port passes its first byte to QEMU's stdout.
//! - [`Scenario::Restore`] ([`restore`]): `kiln snapshot restore` of a
//!   snapshot of a booted guest to that guest's guest-init answering a
//!   ping on its vsock port.
//! - [`Scenario::Clone`] ([`clone`]): `kiln fn invoke` (a clone of the
//!   function's template snapshot runs the handler) to the first byte of
//!   the response on its stdout.
//!
//! Every series runs [`Config::warmup`] untimed runs, then
//! [`Config::runs`] timed ones, [`Config::concurrency`] at a time (one at
//! a time, Kiln's and the peer's cold runs alternate); [`report`] holds
//! the JSON, [`stats`] the percentiles, [`plot`] the SVG.
//! Everything runs in a Kiln home of its own (the user's images linked
//! in), removed at the end: no instance or function is left behind.
//!
//! [`vmm`] is `kiln bench vmm`: the VMM's own cost, natively, with the
//! stub guest in place of a kernel (cold start against QEMU, restores,
//! clones per second, and where a restore's time goes), on the same
//! timing, statistics and plot code.
#![warn(missing_docs)]
pub mod clone;
pub mod cold;
pub mod kiln;
pub mod plot;
pub mod qemu;
pub mod report;
pub mod restore;
pub mod stats;
pub mod timing;
pub mod vmm;

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use kiln_builder::store::{Store, StoreError, StoredImage};
use kiln_vmm::host::{self, HostVirt};
use serde::{Deserialize, Serialize};

use kiln::Kiln;
use report::{Environment, Ratio, Report, Series, Vmm};

/// One kind of startup the benchmark times.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scenario {
    /// A boot from the image to guest-init's first instruction ([`cold`]).
    Cold,
    /// A snapshot restore to the guest answering a ping ([`restore`]).
    Restore,
    /// A function invocation in a fresh clone to its first response byte
    /// ([`clone`]).
    Clone,
}

impl Scenario {
    /// Every scenario, in the order a benchmark runs them when none is
    /// named.
    pub const ALL: [Scenario; 3] = [Scenario::Cold, Scenario::Restore, Scenario::Clone];
}

impl fmt::Display for Scenario {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Scenario::Cold => "cold",
            Scenario::Restore => "restore",
            Scenario::Clone => "clone",
        })
    }
}

/// The VMM Kiln is compared with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Peer {
    /// QEMU's `microvm` machine, booting the same kernel and root
    /// filesystem ([`qemu`]); it takes part in the cold scenario only.
    Qemu,
}

/// What to measure.
#[derive(Clone, Debug)]
pub struct Config {
    /// The scenarios to time, each a series of its own.
    pub scenarios: Vec<Scenario>,
    /// NAME:VERSION from the store of `home`.
    pub image: String,
    /// The clone scenario's handler; default: the image's entrypoint.
    pub handler: Option<String>,
    /// Guest memory of every VM, Kiln's and the peer's, in MiB.
    pub memory_mib: u32,
    /// Timed runs per scenario and VMM (at least 1).
    pub runs: usize,
    /// Timed runs in flight at once (at least 1); the cold scenario
    /// against a peer runs one at a time whatever this says.
    pub concurrency: usize,
    /// Untimed runs before the timed ones, per scenario and VMM: they
    /// warm the page cache and the image's chunk cache.
    pub warmup: usize,
    /// The VMM to compare with; `None` times Kiln alone.
    pub peer: Option<Peer>,
    /// The `kiln` binary the runs exec.
    pub kiln: PathBuf,
    /// The user's `KILN_HOME`, whose images are booted.
    pub home: PathBuf,
    /// The guest kernel (`kiln run`'s, and the peer's).
    pub kernel: PathBuf,
    /// How long one run may take before it is killed and the benchmark fails.
    pub limit: Duration,
}

/// Why the benchmark could not run or a run failed.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// The host has no hardware KVM: numbers taken here would measure an
    /// emulator, so the benchmark refuses to run outside the harness.
    #[error(
        "kiln bench boots VMs and needs hardware KVM; this host has {0}. Without it, \
         `cargo xtask bench startup` runs the benchmark inside the nested harness, where \
         every number is measured under emulation"
    )]
    NoHardwareKvm(HostVirt),
    /// [`Config::runs`] is 0, or a series came back without samples.
    #[error("--runs {0}: expected at least 1")]
    Runs(usize),
    /// [`Config::concurrency`] is 0.
    #[error("--concurrency {0}: expected at least 1")]
    Concurrency(usize),
    /// [`Config::scenarios`] is empty.
    #[error("no scenario to run")]
    NoScenario,
    /// [`Config::kernel`] is not a file.
    #[error(
        "the guest kernel {0} does not exist (`cargo xtask kernel` installs one; or set KILN_KERNEL)"
    )]
    NoKernel(PathBuf),
    /// The image is not in the store, or the store cannot be read.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The clone scenario needs a handler and neither `--handler` nor the
    /// image gives one.
    #[error("image {0} has no entrypoint to serve as the clone scenario's handler: give --handler")]
    NoHandler(String),
    /// A command could not be started, or waited for.
    #[error("cannot start {what}")]
    Spawn {
        /// The command line, as a person would type it.
        what: String,
        /// What the system said.
        #[source]
        source: std::io::Error,
    },
    /// A run took longer than [`Config::limit`].
    #[error("{what} was still running after {limit:?} and was killed; it printed: {printed}")]
    Timeout {
        /// The command line.
        what: String,
        /// The limit it ran past.
        limit: Duration,
        /// The end of its output, stdout and stderr.
        printed: String,
    },
    /// A run ended before the event that stops its timer.
    #[error("{what} ended ({status}) without {event}; it printed: {printed}")]
    NoEvent {
        /// The command line.
        what: String,
        /// The event it never showed.
        event: String,
        /// How it ended.
        status: String,
        /// The end of its output (and of the peer's console).
        printed: String,
    },
    /// A command the benchmark needs (setup, teardown or a run) did not
    /// succeed.
    #[error("{what} failed ({status}); it printed: {printed}")]
    Failed {
        /// The command line.
        what: String,
        /// How it ended.
        status: String,
        /// Its output, stdout and stderr.
        printed: String,
    },
    /// A restored guest never answered a ping within the limit.
    #[error("{what}: no answer to a ping within {limit:?}; it printed: {printed}")]
    NoAnswer {
        /// The restore's command line.
        what: String,
        /// The limit.
        limit: Duration,
        /// The restore command's output.
        printed: String,
        /// Why the last try failed.
        #[source]
        last: restore::NoPong,
    },
    /// A file the benchmark writes or reads could not be.
    #[error("cannot read or write {path}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What the system said.
        #[source]
        source: std::io::Error,
    },
    /// The image could not be made into the raw root filesystem the peer
    /// boots from.
    #[error("cannot flatten {image} into the peer's root filesystem")]
    Flatten {
        /// NAME:VERSION of the image.
        image: String,
        /// Why: the image does not open, or the file cannot be written.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The SVG plot could not be drawn.
    #[error("cannot draw the plot")]
    Plot(#[source] plot::PlotError),
    /// `kiln bench vmm` needs `/dev/kvm` (hardware KVM or PVM).
    #[error("kiln bench vmm boots the stub guest on KVM; this host has {0}")]
    NoKvm(HostVirt),
    /// The stub guest is not a file.
    #[error("the stub guest {0} does not exist (`cargo xtask stub` installs it; or set KILN_STUB)")]
    NoStub(PathBuf),
    /// The stub instances' image could not be built.
    #[error("cannot build the stub's image from {recipe}")]
    Build {
        /// The recipe the benchmark wrote.
        recipe: PathBuf,
        /// Why.
        #[source]
        source: Box<kiln_builder::build::BuildError>,
    },
    /// An instance the benchmark started cannot be found in its registry.
    #[error("instance {name}")]
    Instance {
        /// Its name.
        name: String,
        /// Why.
        #[source]
        source: kiln_control::instance::InstanceError,
    },
    /// A stub guest never beat within the limit.
    #[error("{what}: no heartbeat within {limit:?}; it printed: {printed}")]
    NoHeartbeat {
        /// The command or instance.
        what: String,
        /// The limit.
        limit: Duration,
        /// Its output, or its console.
        printed: String,
    },
    /// A VM definition could not be written.
    #[error(transparent)]
    VmConfig(#[from] kiln_vmm::config::ConfigError),
    /// A request to a Firecracker's API failed.
    #[error("{what}")]
    Firecracker {
        /// The Firecracker run.
        what: String,
        /// The request, and why.
        #[source]
        source: vmm::firecracker::api::ApiError,
    },
    /// The control channel to a VM process failed.
    #[error("{what}")]
    Control {
        /// What was asked of it.
        what: String,
        /// Why.
        #[source]
        source: kiln_vmm::rpc::ControlError,
    },
}

pub(crate) fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> BenchError + '_ {
    move |source| BenchError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Told how far the benchmark has got (a progress bar).
pub trait Progress: Sync {
    /// A series starts: `runs` runs (warm-ups included) to come.
    fn series(&self, label: &str, runs: usize);
    /// One run of it is done.
    fn ran(&self);
    /// Untimed set-up work, said in a few words.
    fn step(&self, what: &str);
}

/// A [`Progress`] that shows nothing.
pub struct Quiet;

impl Progress for Quiet {
    fn series(&self, _: &str, _: usize) {}
    fn ran(&self) {}
    fn step(&self, _: &str) {}
}

/// Runs the benchmark described by `config`.
pub fn run(config: &Config, progress: &dyn Progress) -> Result<Report, BenchError> {
    let host = checked_host(config)?;
    let image = Store::new(&config.home).find(&config.image)?;
    let handler = handler(config, &image)?;
    let environment = environment(&host);
    let work = Workspace::new(&config.home)?;
    let kiln = Kiln::new(&config.kiln, work.home()).with_kernel(&config.kernel);
    let (series, ratios) = measure(config, &kiln, &image, &handler, work.path(), progress)?;
    drop(kiln);
    work.remove()?;
    Ok(Report {
        schema_version: report::SCHEMA_VERSION,
        kiln_version: env!("CARGO_PKG_VERSION").to_string(),
        environment,
        image: config.image.clone(),
        handler,
        memory_mib: config.memory_mib,
        runs: config.runs,
        concurrency: config.concurrency,
        warmup_runs: config.warmup,
        series,
        ratios,
    })
}

/// The host to measure on, after checking that `config` has runs, a
/// concurrency and scenarios, that the host can boot Linux on hardware
/// KVM and that the kernel is a file.
fn checked_host(config: &Config) -> Result<HostVirt, BenchError> {
    if config.runs == 0 {
        return Err(BenchError::Runs(config.runs));
    }
    if config.concurrency == 0 {
        return Err(BenchError::Concurrency(config.concurrency));
    }
    if config.scenarios.is_empty() {
        return Err(BenchError::NoScenario);
    }
    let host = host::detect();
    if !host.can_boot_linux() {
        return Err(BenchError::NoHardwareKvm(host));
    }
    if !config.kernel.is_file() {
        return Err(BenchError::NoKernel(config.kernel.clone()));
    }
    Ok(host)
}

/// The clone scenario's handler: `config`'s, or else `image`'s entrypoint.
fn handler(config: &Config, image: &StoredImage) -> Result<String, BenchError> {
    match &config.handler {
        Some(handler) => Ok(handler.clone()),
        None if image.manifest.entrypoint.is_empty() => {
            Err(BenchError::NoHandler(config.image.clone()))
        }
        None => Ok(image.manifest.entrypoint.join(" ")),
    }
}

/// Each scenario asked for, once and in [`Scenario`]'s order: their
/// series, and Kiln's ratios to the peer. The restore and clone
/// scenarios share one function, created (untimed) before the first.
fn measure(
    config: &Config,
    kiln: &Kiln,
    image: &StoredImage,
    handler: &str,
    work: &Path,
    progress: &dyn Progress,
) -> Result<(Vec<Series>, Vec<Ratio>), BenchError> {
    let mut series = Vec::new();
    let mut ratios = Vec::new();
    let mut scenarios = config.scenarios.clone();
    scenarios.sort();
    scenarios.dedup();
    let mut function = None;
    for scenario in scenarios {
        match scenario {
            Scenario::Cold if config.peer == Some(Peer::Qemu) => {
                let [kiln_series, peer] = cold::with_qemu(config, kiln, image, work, progress)?;
                ratios.push(Ratio::of(&kiln_series, &peer));
                series.push(kiln_series);
                series.push(peer);
            }
            Scenario::Cold => series.push(cold::kiln(config, kiln, progress)?),
            Scenario::Restore | Scenario::Clone => {
                if function.is_none() {
                    function = Some(clone::create(config, kiln, handler, progress)?);
                }
                let function = function.as_ref().expect("created just now");
                series.push(match scenario {
                    Scenario::Restore => restore::kiln(config, kiln, function, progress)?,
                    _ => clone::kiln(config, kiln, function, progress)?,
                });
            }
        }
    }
    Ok((series, ratios))
}

/// `$KILN_HOME/bench/run-PID/`: the benchmark's own Kiln home (`home/`,
/// the user's images linked in) and scratch files; removed afterwards,
/// also when a run fails.
pub(crate) struct Workspace {
    dir: PathBuf,
    removed: bool,
}

impl Workspace {
    /// A workspace whose home boots the user's images.
    fn new(user_home: &Path) -> Result<Workspace, BenchError> {
        let work = Workspace::isolated(user_home)?;
        let images = user_home.join("images");
        let link = work.home().join("images");
        std::os::unix::fs::symlink(&images, &link).map_err(io_err(&link))?;
        Ok(work)
    }

    /// A workspace whose home has a store of its own (empty).
    fn isolated(user_home: &Path) -> Result<Workspace, BenchError> {
        let dir = user_home
            .join("bench")
            .join(format!("run-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let home = dir.join("home");
        std::fs::create_dir_all(&home).map_err(io_err(&home))?;
        Ok(Workspace {
            dir,
            removed: false,
        })
    }

    fn path(&self) -> &Path {
        &self.dir
    }

    fn home(&self) -> PathBuf {
        self.dir.join("home")
    }

    fn remove(mut self) -> Result<(), BenchError> {
        self.removed = true;
        std::fs::remove_dir_all(&self.dir).map_err(io_err(&self.dir))?;
        self.remove_parent_if_empty();
        Ok(())
    }

    /// `$KILN_HOME/bench/`, unless another run is using it.
    fn remove_parent_if_empty(&self) {
        if let Some(parent) = self.dir.parent() {
            let _ = std::fs::remove_dir(parent);
        }
    }
}

impl Drop for Workspace {
    fn drop(&mut self) {
        if !self.removed {
            let _ = std::fs::remove_dir_all(&self.dir);
            self.remove_parent_if_empty();
        }
    }
}

/// How a series runs: `warmup` untimed runs, then `runs` timed ones,
/// `concurrency` at a time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Plan {
    /// Timed runs (at least 1).
    pub runs: usize,
    /// Untimed runs first.
    pub warmup: usize,
    /// Timed runs in flight at once (at least 1).
    pub concurrency: usize,
}

impl Config {
    pub(crate) fn plan(&self) -> Plan {
        Plan {
            runs: self.runs,
            warmup: self.warmup,
            concurrency: self.concurrency,
        }
    }
}

/// One series, as `config` plans it. `run(i)` does run `i` (warm-ups
/// come after the timed indices) and returns its latency in ms. The
/// first failure stops the series. Returns the samples and the timed
/// phase's wall time in seconds.
fn series<T: Send>(
    config: Plan,
    label: &str,
    progress: &dyn Progress,
    run: &(dyn Fn(usize) -> Result<T, BenchError> + Sync),
) -> Result<(Vec<T>, f64), BenchError> {
    progress.series(label, config.warmup + config.runs);
    for i in 0..config.warmup {
        run(config.runs + i)?;
        progress.ran();
    }
    let next = AtomicUsize::new(0);
    let failed = AtomicBool::new(false);
    let samples = Mutex::new(Vec::with_capacity(config.runs));
    let first_error = Mutex::new(None);
    let started = Instant::now();
    std::thread::scope(|scope| {
        for _ in 0..config.concurrency.min(config.runs) {
            scope.spawn(|| {
                loop {
                    let i = next.fetch_add(1, Ordering::SeqCst);
                    if i >= config.runs || failed.load(Ordering::SeqCst) {
                        return;
                    }
                    match run(i) {
                        Ok(ms) => {
                            samples.lock().unwrap_or_else(|p| p.into_inner()).push(ms);
                            progress.ran();
                        }
                        Err(err) => {
                            failed.store(true, Ordering::SeqCst);
                            first_error
                                .lock()
                                .unwrap_or_else(|p| p.into_inner())
                                .get_or_insert(err);
                            return;
                        }
                    }
                }
            });
        }
    });
    let wall_s = started.elapsed().as_secs_f64();
    if let Some(err) = first_error.into_inner().unwrap_or_else(|p| p.into_inner()) {
        return Err(err);
    }
    let samples = samples.into_inner().unwrap_or_else(|p| p.into_inner());
    Ok((samples, wall_s))
}

/// Kiln's and the peers' runs of one scenario, one series per side
/// (`runs[0]` is Kiln's, as in [`series`]), each series' samples and wall
/// time. With one run at a time the sides take turns (warm-ups, then
/// kiln, peer, other peer, kiln, …) so that a change in the host's load
/// falls on all alike, and each wall time is the sum of that series' own
/// runs, teardown included; with more at a time, one series runs after
/// the other.
fn paired<T: Send, const N: usize>(
    config: Plan,
    labels: [&str; N],
    progress: &dyn Progress,
    runs: [&(dyn Fn(usize) -> Result<T, BenchError> + Sync); N],
) -> Result<[(Vec<T>, f64); N], BenchError> {
    let mut out: [(Vec<T>, f64); N] = std::array::from_fn(|_| (Vec::new(), 0.0));
    if config.concurrency > 1 {
        for ((side, label), run) in out.iter_mut().zip(labels).zip(runs) {
            *side = series(config, label, progress, run)?;
        }
        return Ok(out);
    }
    progress.series(&labels.join(" + "), N * (config.warmup + config.runs));
    let order = (0..config.warmup)
        .map(|i| (config.runs + i, false))
        .chain((0..config.runs).map(|i| (i, true)));
    for (i, timed) in order {
        for (side, run) in out.iter_mut().zip(runs) {
            let started = Instant::now();
            let ms = run(i)?;
            if timed {
                side.0.push(ms);
                side.1 += started.elapsed().as_secs_f64();
            }
            progress.ran();
        }
    }
    Ok(out)
}

/// [`series`], made into a [`Series`].
fn timed_series(
    config: &Config,
    scenario: Scenario,
    vmm: Vmm,
    timer: (&str, &str),
    progress: &dyn Progress,
    run: &(dyn Fn(usize) -> Result<f64, BenchError> + Sync),
) -> Result<Series, BenchError> {
    let label = format!("{scenario} ({vmm})");
    let (samples, wall_s) = series(config.plan(), &label, progress, run)?;
    Ok(Series::new(scenario, vmm, timer, samples, wall_s).expect("runs >= 1 were checked"))
}

/// The QEMU TCG hypervisor signature: a CPU emulated instruction by
/// instruction.
const TCG_SIGNATURE: &str = "TCGTCGTCGTCG";

/// Where the benchmark runs.
pub fn environment(host: &HostVirt) -> Environment {
    let hypervisor = hypervisor_signature();
    let emulated = hypervisor.as_deref() == Some(TCG_SIGNATURE);
    let label = if emulated {
        emulation_label("KVM nested in a QEMU TCG guest")
    } else {
        match &hypervisor {
            Some(hv) => format!("nested KVM inside a {hv} guest"),
            None => "hardware KVM".into(),
        }
    };
    let load_average = std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next()?.parse().ok());
    Environment {
        kvm: host.to_string(),
        hypervisor,
        emulated,
        cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
        load_average,
        label,
    }
}

/// The label of numbers measured under emulation, `how` being where.
pub fn emulation_label(how: &str) -> String {
    format!(
        "MEASURED UNDER EMULATION ({how}): absolute times are far slower than on hardware; \
         only ratios against the peer in the same run mean anything"
    )
}

impl Environment {
    /// Marks the numbers as measured under emulation, `how` being where
    /// (for a harness that knows it nested the run under emulation).
    pub fn mark_emulated(&mut self, how: &str) {
        self.emulated = true;
        self.label = emulation_label(how);
    }
}

/// CPUID leaf 0x40000000's vendor signature, when the CPU says it runs
/// under a hypervisor (CPUID.1:ECX bit 31).
fn hypervisor_signature() -> Option<String> {
    use std::arch::x86_64::__cpuid;
    let features = __cpuid(1);
    if features.ecx & (1 << 31) == 0 {
        return None;
    }
    let leaf = __cpuid(0x4000_0000);
    let bytes: Vec<u8> = [leaf.ebx, leaf.ecx, leaf.edx]
        .iter()
        .flat_map(|r| r.to_le_bytes())
        .take_while(|&b| b != 0)
        .collect();
    let signature = String::from_utf8_lossy(&bytes).trim().to_string();
    Some(if signature.is_empty() {
        "unnamed hypervisor".into()
    } else {
        signature
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scenarios_are_named_as_on_the_command_line() {
        let names: Vec<String> = Scenario::ALL.iter().map(ToString::to_string).collect();
        assert_eq!(names, ["cold", "restore", "clone"]);
        assert_eq!(
            serde_json::to_string(&Scenario::Clone).unwrap(),
            "\"clone\""
        );
    }

    #[test]
    fn the_emulation_label_says_so() {
        let mut env = environment(&HostVirt::Pvm);
        env.mark_emulated("nested KVM under QEMU TCG");
        assert!(env.emulated);
        assert!(
            env.label
                .starts_with("MEASURED UNDER EMULATION (nested KVM under QEMU TCG)")
        );
        assert!(env.kvm.contains("PVM"));
    }

    #[test]
    fn a_host_without_hardware_kvm_is_told_so() {
        let message = BenchError::NoHardwareKvm(HostVirt::Pvm).to_string();
        assert!(message.contains("needs hardware KVM"), "{message}");
        assert!(message.contains("cargo xtask bench startup"), "{message}");
    }

    fn config() -> Config {
        Config {
            scenarios: vec![Scenario::Cold],
            image: "hello:1.0.0".into(),
            handler: None,
            memory_mib: 128,
            runs: 5,
            concurrency: 2,
            warmup: 1,
            peer: None,
            kiln: "kiln".into(),
            home: "/nonexistent".into(),
            kernel: "/nonexistent".into(),
            limit: Duration::from_secs(1),
        }
    }

    #[test]
    fn a_series_runs_the_warm_ups_then_every_timed_run_once() {
        let done = Mutex::new(Vec::new());
        let (samples, wall_s) = series(config().plan(), "x", &Quiet, &|i| {
            done.lock().unwrap().push(i);
            Ok(i as f64 + 1.0)
        })
        .unwrap();
        let mut done = done.into_inner().unwrap();
        assert_eq!(done[0], 5, "the warm-up comes first");
        done.sort();
        assert_eq!(done, [0, 1, 2, 3, 4, 5]);
        let mut samples = samples;
        samples.sort_by(f64::total_cmp);
        assert_eq!(samples, [1.0, 2.0, 3.0, 4.0, 5.0]);
        assert!(wall_s > 0.0);
    }

    /// A side whose runs are logged into `done` as `{name}{i}` and give `ms`.
    fn logged<'a>(
        done: &'a Mutex<Vec<String>>,
        name: &'a str,
        ms: f64,
    ) -> impl Fn(usize) -> Result<f64, BenchError> + Sync + 'a {
        move |i| {
            done.lock().unwrap().push(format!("{name}{i}"));
            Ok(ms)
        }
    }

    fn one_at_a_time() -> Config {
        Config {
            concurrency: 1,
            runs: 3,
            ..config()
        }
    }

    #[test]
    fn paired_runs_alternate_one_at_a_time() {
        let done = Mutex::new(Vec::new());
        let (kiln, peer) = (logged(&done, "k", 10.0), logged(&done, "q", 20.0));
        let [(k, k_wall), (q, q_wall)] =
            paired(one_at_a_time().plan(), ["k", "q"], &Quiet, [&kiln, &peer]).unwrap();
        assert_eq!(
            done.lock().unwrap().clone(),
            ["k3", "q3", "k0", "q0", "k1", "q1", "k2", "q2"]
        );
        assert_eq!((k, q), (vec![10.0; 3], vec![20.0; 3]));
        assert!(k_wall > 0.0 && q_wall > 0.0);
    }

    #[test]
    fn three_sides_take_turns_in_their_order() {
        let done = Mutex::new(Vec::new());
        let sides = [
            logged(&done, "k", 10.0),
            logged(&done, "q", 20.0),
            logged(&done, "f", 30.0),
        ];
        let [k, q, f] = paired(
            one_at_a_time().plan(),
            ["k", "q", "f"],
            &Quiet,
            [&sides[0], &sides[1], &sides[2]],
        )
        .unwrap();
        assert_eq!(
            done.lock().unwrap().clone(),
            [
                "k3", "q3", "f3", "k0", "q0", "f0", "k1", "q1", "f1", "k2", "q2", "f2"
            ]
        );
        assert_eq!(
            [k.0, q.0, f.0],
            [vec![10.0; 3], vec![20.0; 3], vec![30.0; 3]]
        );
    }

    #[test]
    fn paired_sides_run_one_after_the_other_when_concurrent() {
        let done = Mutex::new(Vec::new());
        let config = Config {
            concurrency: 2,
            runs: 2,
            warmup: 0,
            ..config()
        };
        let (kiln, peer) = (logged(&done, "k", 10.0), logged(&done, "q", 20.0));
        paired(config.plan(), ["k", "q"], &Quiet, [&kiln, &peer]).unwrap();
        let done = done.lock().unwrap().clone();
        assert!(done[..2].iter().all(|r| r.starts_with('k')), "{done:?}");
        assert!(done[2..].iter().all(|r| r.starts_with('q')), "{done:?}");
    }

    #[test]
    fn a_failed_run_fails_the_series() {
        let err = series(config().plan(), "x", &Quiet, &|i| {
            if i == 2 {
                Err(BenchError::Runs(0))
            } else {
                Ok(1.0)
            }
        })
        .unwrap_err();
        assert!(matches!(err, BenchError::Runs(0)));
    }
}
