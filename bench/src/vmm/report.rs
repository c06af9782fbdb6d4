//! What `kiln bench vmm --json FILE` writes: every sample, their
//! percentiles, the goals' keys at the top level (as issue 19 names them),
//! the breakdowns; [`VmmReport::check`] is the schema's rules beyond what
//! serde checks, [`VmmReport::table`] what the command prints.
use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use super::breakdown;
use super::stop::STOP_AGE;
use crate::plot::{self, Line, PlotError};
use crate::report::{Environment, close};
use crate::stats::{Stats, nearest_rank, sorted};

/// Bumped whenever a field changes meaning or goes away.
pub const SCHEMA_VERSION: u32 = 1;

/// One `kiln bench vmm` run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmmReport {
    /// [`SCHEMA_VERSION`] of the code that wrote it.
    pub schema_version: u32,
    /// The version of the `kiln` that measured.
    pub kiln_version: String,
    /// The host; its label says native KVM and the stub guest.
    pub environment: Environment,
    /// Guest memory of every VM, in MiB.
    pub memory_mib: u32,
    /// Timed runs of each cold and restore series, and clones per
    /// concurrency.
    pub runs: usize,
    /// Untimed runs before each series.
    pub warmup_runs: usize,
    /// Kiln's cold runs.
    pub kiln: Cold,
    /// QEMU microvm's cold runs, when it took part.
    pub qemu: Option<Cold>,
    /// Kiln's cold wall-time p50 over QEMU's (goal: at most 0.25).
    pub cold_wall_ratio: Option<f64>,
    /// Firecracker's cold runs, when the user named a binary
    /// (`--peer firecracker=PATH`); absent from reports written before
    /// Firecracker could take part.
    #[serde(default)]
    pub firecracker: Option<Cold>,
    /// Kiln's cold wall-time p50 over Firecracker's, when it took part.
    #[serde(default)]
    pub cold_wall_ratio_firecracker: Option<f64>,
    /// Kiln's cold CPU time p50 (goal: at most 3 ms).
    pub cold_cpu_ms_p50: f64,
    /// Kiln's stop, SIGTERM of a beating stub's VM to its process's exit,
    /// p50; 0 in a report written before the stop series.
    #[serde(default)]
    pub stop_ms_p50: f64,
    /// The same, p99.
    #[serde(default)]
    pub stop_ms_p99: f64,
    /// Kiln's stop p50 over QEMU's, when QEMU took part.
    #[serde(default)]
    pub stop_ratio: Option<f64>,
    /// Kiln's stops; without samples in a report written before the stop
    /// series (which [`VmmReport::check`] then says).
    #[serde(default = "Latency::unmeasured")]
    pub stop: Latency,
    /// QEMU microvm's stops, when it took part; absent from reports
    /// written before the stop series.
    #[serde(default)]
    pub qemu_stop: Option<Latency>,
    /// `kiln snapshot restore` to the first heartbeat, p50 (goal: at most 5 ms).
    pub restore_ms_p50: f64,
    /// The same, p99 (goal: at most 15 ms).
    pub restore_ms_p99: f64,
    /// A `kiln __vm` restore (the VM process alone) to the first heartbeat, p50.
    pub vm_restore_ms_p50: f64,
    /// The same, p99.
    pub vm_restore_ms_p99: f64,
    /// `kiln snapshot restore`'s runs.
    pub restore: Latency,
    /// The VM process's restores.
    pub vm_restore: Latency,
    /// QEMU's `-incoming` restores, or why there are none.
    pub qemu_restore: PeerRestore,
    /// Firecracker's snapshot loads, or why there are none, when the user
    /// named a binary; absent from reports written before Firecracker
    /// could take part.
    #[serde(default)]
    pub firecracker_restore: Option<PeerRestore>,
    /// Which restore the clones are, and why.
    pub clone_path: String,
    /// Clones per second at the best concurrency (goal: at least 200).
    pub clones_per_s: f64,
    /// The concurrency that gave [`Self::clones_per_s`].
    pub clone_concurrency: usize,
    /// The clones, per concurrency.
    pub clones: Vec<Clones>,
    /// The VM process's resident memory without guest RAM, p50 over the
    /// clones at concurrency 1, in MiB (goal: at most 3).
    pub vmm_rss_mib: f64,
    /// Where `kiln snapshot restore`'s milliseconds go (p50 per stage).
    pub breakdown: Vec<Stage>,
    /// Where the VM process's restore's milliseconds go.
    pub vm_breakdown: Vec<Stage>,
    /// Each goal of issue 19, and whether this run met it.
    pub goals: Vec<Goal>,
}

/// One VMM's cold runs: exec to the stub's first write to the process's
/// exit, with what `wait4` accounted.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Cold {
    /// What ran.
    pub command: String,
    /// Wall time p50, exec to `wait4`.
    pub cold_wall_ms_p50: f64,
    /// Wall time p99.
    pub cold_wall_ms_p99: f64,
    /// User plus system CPU time p50.
    pub cold_cpu_ms_p50: f64,
    /// CPU time p99.
    pub cold_cpu_ms_p99: f64,
    /// Peak resident set size (`ru_maxrss`) p50, in MiB.
    pub cold_max_rss_mib_p50: f64,
    /// Every run's wall time.
    pub wall_ms: Vec<f64>,
    /// Every run's CPU time.
    pub cpu_ms: Vec<f64>,
    /// Every run's peak RSS, in KiB.
    pub max_rss_kib: Vec<u64>,
}

impl Cold {
    /// From the runs' samples (not empty).
    pub fn new(command: &str, wall_ms: Vec<f64>, cpu_ms: Vec<f64>, max_rss_kib: Vec<u64>) -> Cold {
        let rss_mib: Vec<f64> = max_rss_kib.iter().map(|&k| k as f64 / 1024.0).collect();
        Cold {
            command: command.to_string(),
            cold_wall_ms_p50: p(&wall_ms, 0.5),
            cold_wall_ms_p99: p(&wall_ms, 0.99),
            cold_cpu_ms_p50: p(&cpu_ms, 0.5),
            cold_cpu_ms_p99: p(&cpu_ms, 0.99),
            cold_max_rss_mib_p50: p(&rss_mib, 0.5),
            wall_ms,
            cpu_ms,
            max_rss_kib,
        }
    }
}

/// The clones at the concurrency that made the most per second: the
/// report's "clones_per_s". None when no concurrency was measured.
pub fn fastest(clones: &[Clones]) -> Option<&Clones> {
    clones
        .iter()
        .max_by(|a, b| a.clones_per_s.total_cmp(&b.clones_per_s))
}

/// `kiln`'s cold wall-time p50 over `peer`'s, when the peer took part.
pub fn wall_ratio(kiln: &Cold, peer: Option<&Cold>) -> Option<f64> {
    peer.map(|peer| kiln.cold_wall_ms_p50 / peer.cold_wall_ms_p50)
}

/// `kiln`'s p50 over `peer`'s, when the peer took part.
pub fn p50_ratio(kiln: &Latency, peer: Option<&Latency>) -> Option<f64> {
    peer.map(|peer| kiln.ms.p50 / peer.ms.p50)
}

/// Whether the ratio recorded is the one expected: both absent, or both
/// there and equal but for rounding.
fn same_ratio(recorded: Option<f64>, expected: Option<f64>) -> bool {
    match (recorded, expected) {
        (Some(a), Some(b)) => close(a, b),
        (a, b) => a == b,
    }
}

/// The nearest-rank percentile `q` of `samples`; NaN when empty (which
/// [`VmmReport::check`] refuses).
fn p(samples: &[f64], q: f64) -> f64 {
    nearest_rank(&sorted(samples), q).unwrap_or(f64::NAN)
}

/// A positive, finite number.
fn positive(x: f64) -> bool {
    x.is_finite() && x > 0.0
}

/// Timed runs of one kind: what the timer starts and stops on, every
/// sample and their percentiles.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Latency {
    /// What the timer starts on.
    pub timer_starts: String,
    /// What the timer stops on.
    pub timer_stops: String,
    /// Each run's latency, in the order the runs finished.
    pub samples_ms: Vec<f64>,
    /// Their percentiles.
    pub ms: Stats,
}

impl Latency {
    /// From `samples_ms` (not empty) and the timer's `(start, stop)`.
    pub fn new(timer: (&str, &str), samples_ms: Vec<f64>) -> Option<Latency> {
        Some(Latency {
            timer_starts: timer.0.to_string(),
            timer_stops: timer.1.to_string(),
            ms: Stats::of(&samples_ms)?,
            samples_ms,
        })
    }

    /// A series a report was written without (one from before the series
    /// existed): no timer, no samples, zeros for percentiles, all of which
    /// [`VmmReport::check`] refuses.
    fn unmeasured() -> Latency {
        Latency {
            timer_starts: String::new(),
            timer_stops: String::new(),
            samples_ms: Vec::new(),
            ms: Stats {
                min: 0.0,
                p50: 0.0,
                p90: 0.0,
                p99: 0.0,
                max: 0.0,
            },
        }
    }
}

/// A peer's restore (QEMU's of a migration stream, Firecracker's of its
/// snapshot), or why it was not measured.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum PeerRestore {
    /// Measured.
    Measured(Latency),
    /// Not measured, and why.
    Unavailable(String),
}

/// The clones at one concurrency.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Clones {
    /// Clones in flight at once.
    pub concurrency: usize,
    /// Clones per second of the phase's wall time.
    pub clones_per_s: f64,
    /// The phase's wall time: first spawn to last teardown.
    pub wall_s: f64,
    /// Each clone's spawn to first heartbeat.
    pub latency: Latency,
    /// The VM process's VmRSS at its first heartbeat, p50, in KiB.
    pub rss_kib_p50: u64,
    /// The same without the guest memory's resident pages, p50, in KiB.
    pub vmm_rss_kib_p50: u64,
    /// Of that, the anonymous pages, p50, in KiB: the VM process's own;
    /// the rest are file pages shared with every `kiln` process.
    pub vmm_anon_kib_p50: u64,
}

/// One stage of a restore: from the previous stage's timestamp to its own.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Stage {
    /// What happens in it.
    pub stage: String,
    /// The process it ends in.
    pub process: String,
    /// Its length, p50 over the runs, in ms.
    pub ms_p50: f64,
    /// Its end since the spawn, p50 over the runs, in ms.
    pub at_ms_p50: f64,
}

/// One goal, and how this run did.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Goal {
    /// The report's key.
    pub key: String,
    /// "<= 0.25", ">= 200".
    pub goal: String,
    /// This run's value; `None` when it could not be measured.
    pub value: Option<f64>,
    /// Whether the value meets the goal.
    pub met: bool,
}

impl Goal {
    /// `key`'s `value` against at most `limit`.
    pub fn at_most(key: &str, limit: f64, value: Option<f64>) -> Goal {
        Goal {
            key: key.into(),
            goal: format!("<= {limit}"),
            met: value.is_some_and(|v| v <= limit),
            value,
        }
    }

    /// `key`'s `value` against at least `floor`.
    pub fn at_least(key: &str, floor: f64, value: Option<f64>) -> Goal {
        Goal {
            key: key.into(),
            goal: format!(">= {floor}"),
            met: value.is_some_and(|v| v >= floor),
            value,
        }
    }
}

impl VmmReport {
    /// The goals of issue 19 against this report's numbers.
    pub fn goals(&self) -> Vec<Goal> {
        vec![
            Goal::at_most("cold_wall_ratio", 0.25, self.cold_wall_ratio),
            Goal::at_most("cold_cpu_ms_p50", 3.0, Some(self.cold_cpu_ms_p50)),
            Goal::at_most("restore_ms_p50", 5.0, Some(self.restore_ms_p50)),
            Goal::at_most("restore_ms_p99", 15.0, Some(self.restore_ms_p99)),
            Goal::at_least("clones_per_s", 200.0, Some(self.clones_per_s)),
            Goal::at_most("vmm_rss_mib", 3.0, Some(self.vmm_rss_mib)),
        ]
    }

    /// The peers' cold series, each with its VMM's name.
    fn peer_colds(&self) -> impl Iterator<Item = (&'static str, &Cold)> {
        let qemu = self.qemu.iter().map(|c| ("qemu", c));
        qemu.chain(self.firecracker.iter().map(|c| ("firecracker", c)))
    }

    /// Kiln's cold series and the peers', each with its VMM's name.
    fn colds(&self) -> impl Iterator<Item = (&'static str, &Cold)> {
        std::iter::once(("kiln", &self.kiln)).chain(self.peer_colds())
    }

    /// Kiln's stops and QEMU's, each with its VMM's name.
    fn stops(&self) -> impl Iterator<Item = (&'static str, &Latency)> {
        let qemu = self.qemu_stop.iter().map(|l| ("qemu", l));
        std::iter::once(("kiln", &self.stop)).chain(qemu)
    }

    /// The peers' restores, measured or not, each with what it was.
    fn peer_restores(&self) -> impl Iterator<Item = (&'static str, &PeerRestore)> {
        let firecracker = self.firecracker_restore.iter();
        std::iter::once(("qemu -incoming", &self.qemu_restore))
            .chain(firecracker.map(|r| ("firecracker /snapshot/load", r)))
    }

    /// The peers' measured restores.
    fn measured_restores(&self) -> impl Iterator<Item = (&'static str, &Latency)> {
        self.peer_restores().filter_map(|(what, r)| match r {
            PeerRestore::Measured(latency) => Some((what, latency)),
            PeerRestore::Unavailable(_) => None,
        })
    }

    /// The latency series the plot draws, labelled.
    fn lines(&self) -> Vec<Line<'_>> {
        let mut lines: Vec<Line<'_>> = (self.colds())
            .map(|(vmm, cold)| (format!("cold ({vmm})"), cold.wall_ms.as_slice()))
            .collect();
        for (vmm, stop) in self.stops() {
            lines.push((format!("stop ({vmm})"), &stop.samples_ms));
        }
        lines.push((
            "restore (kiln snapshot restore)".into(),
            &self.restore.samples_ms,
        ));
        lines.push(("restore (kiln __vm)".into(), &self.vm_restore.samples_ms));
        for (what, peer) in self.measured_restores() {
            lines.push((format!("restore ({what})"), &peer.samples_ms));
        }
        for c in &self.clones {
            let label = format!("clone (kiln __vm, {} at a time)", c.concurrency);
            lines.push((label, &c.latency.samples_ms));
        }
        lines
    }

    /// The SVG of every latency series' CDF.
    pub fn svg(&self) -> Result<String, PlotError> {
        let mut subtitle = vec![format!(
            "stub guest, {} MiB, {} runs per line; cold kiln/qemu p50 = {}{}; restore p50 \
             {:.1} ms (instance), {:.1} ms (VM process); {:.0} clones/s",
            self.memory_mib,
            self.runs,
            self.cold_wall_ratio
                .map_or("-".into(), |r| format!("{r:.2}")),
            self.cold_wall_ratio_firecracker
                .map_or(String::new(), |r| format!(", kiln/firecracker {r:.2}")),
            self.restore_ms_p50,
            self.vm_restore_ms_p50,
            self.clones_per_s
        )];
        subtitle.extend(plot::wrap(&self.environment.label));
        plot::cdf_svg(
            "kiln bench vmm: the VMM's own cost, CDF per series",
            &subtitle,
            &self.lines(),
        )
    }

    /// What is wrong with this report, none when it is sound: every
    /// series has `runs` positive finite samples whose percentiles are the
    /// ones recorded, the top-level keys are those series' percentiles,
    /// and the goals are this report's.
    pub fn check(&self) -> Vec<String> {
        let mut problems = Vec::new();
        problems.extend(self.schema_problem());
        problems.extend(self.sample_problems());
        problems.extend(self.percentile_problems());
        problems.extend(self.cold_problems());
        problems.extend(self.key_problems());
        problems.extend(self.ratio_problems());
        problems.extend(self.stop_problems());
        problems.extend(self.clone_problems());
        problems.extend(self.breakdown_problems());
        problems.extend(self.goals_problem());
        problems
    }

    /// A report of another schema, whose fields may mean something else.
    fn schema_problem(&self) -> Option<String> {
        (self.schema_version != SCHEMA_VERSION).then(|| {
            format!(
                "schema_version {}, expected {SCHEMA_VERSION}",
                self.schema_version
            )
        })
    }

    /// Every plotted series has `runs` samples, each a positive time.
    fn sample_problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        for (label, samples) in self.lines() {
            if samples.len() != self.runs {
                problems.push(format!(
                    "{label}: {} samples, expected {}",
                    samples.len(),
                    self.runs
                ));
            }
            if let Some(bad) = samples.iter().find(|&&ms| !positive(ms)) {
                problems.push(format!(
                    "{label}: the sample {bad} ms is not a positive time"
                ));
            }
        }
        problems
    }

    /// Every restore's and clone's recorded percentiles are its samples'.
    fn percentile_problems(&self) -> Vec<String> {
        let mut latencies = vec![("restore", &self.restore), ("vm_restore", &self.vm_restore)];
        latencies.extend(self.clones.iter().map(|c| ("clone", &c.latency)));
        latencies.extend(self.measured_restores());
        latencies.push(("stop", &self.stop));
        latencies.extend(self.qemu_stop.iter().map(|l| ("qemu_stop", l)));
        latencies
            .into_iter()
            .filter(|(_, latency)| Stats::of(&latency.samples_ms).as_ref() != Some(&latency.ms))
            .map(|(label, _)| format!("{label}: ms are not the samples' percentiles"))
            .collect()
    }

    /// Every cold series' percentiles are its samples', which are positive.
    fn cold_problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        for (_, cold) in self.colds() {
            let again = Cold::new(
                &cold.command,
                cold.wall_ms.clone(),
                cold.cpu_ms.clone(),
                cold.max_rss_kib.clone(),
            );
            if &again != cold {
                problems.push(format!(
                    "{}: the percentiles are not the samples'",
                    cold.command
                ));
            }
            if cold
                .cpu_ms
                .iter()
                .chain(&cold.wall_ms)
                .any(|&ms| !positive(ms))
                || cold.max_rss_kib.contains(&0)
            {
                problems.push(format!("{}: a time or RSS is not positive", cold.command));
            }
        }
        problems
    }

    /// The top-level keys are their series' percentiles.
    fn key_problems(&self) -> Vec<String> {
        let keys = [
            (
                "cold_cpu_ms_p50",
                self.cold_cpu_ms_p50,
                self.kiln.cold_cpu_ms_p50,
            ),
            ("restore_ms_p50", self.restore_ms_p50, self.restore.ms.p50),
            ("restore_ms_p99", self.restore_ms_p99, self.restore.ms.p99),
            (
                "vm_restore_ms_p50",
                self.vm_restore_ms_p50,
                self.vm_restore.ms.p50,
            ),
            (
                "vm_restore_ms_p99",
                self.vm_restore_ms_p99,
                self.vm_restore.ms.p99,
            ),
            ("stop_ms_p50", self.stop_ms_p50, self.stop.ms.p50),
            ("stop_ms_p99", self.stop_ms_p99, self.stop.ms.p99),
        ];
        keys.into_iter()
            .filter(|&(_, value, expected)| value != expected)
            .map(|(key, value, expected)| format!("{key} {value} is not its series' ({expected})"))
            .collect()
    }

    /// Each ratio (cold wall time, stop) is Kiln's p50 over its peer's,
    /// and absent when the peer is.
    fn ratio_problems(&self) -> Vec<String> {
        let ratios = [
            (
                "cold_wall_ratio",
                self.cold_wall_ratio,
                wall_ratio(&self.kiln, self.qemu.as_ref()),
            ),
            (
                "cold_wall_ratio_firecracker",
                self.cold_wall_ratio_firecracker,
                wall_ratio(&self.kiln, self.firecracker.as_ref()),
            ),
            (
                "stop_ratio",
                self.stop_ratio,
                p50_ratio(&self.stop, self.qemu_stop.as_ref()),
            ),
        ];
        ratios
            .into_iter()
            .filter(|&(_, value, expected)| !same_ratio(value, expected))
            .map(|(key, value, expected)| format!("{key} {value:?}, expected {expected:?}"))
            .collect()
    }

    /// QEMU's stops are there when its cold runs are (both are
    /// `--no-qemu`'s), and each stop series' p50 and p99 are positive
    /// times, the p50 no more than the p99.
    fn stop_problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        match (&self.qemu, &self.qemu_stop) {
            (Some(_), None) => {
                problems.push("qemu_stop is missing, though QEMU ran the cold series".into());
            }
            (None, Some(_)) => {
                problems.push("qemu_stop is there, though QEMU ran no cold series".into());
            }
            _ => {}
        }
        for (vmm, stop) in self.stops() {
            let (p50, p99) = (stop.ms.p50, stop.ms.p99);
            if !(positive(p50) && positive(p99)) {
                problems.push(format!(
                    "stop ({vmm}): p50 {p50} ms and p99 {p99} ms are not both positive times"
                ));
            } else if p50 > p99 {
                problems.push(format!("stop ({vmm}): p50 {p50} ms is above p99 {p99} ms"));
            }
        }
        problems
    }

    /// The recorded clone rate is the best concurrency's, and every clone
    /// rate and RSS is positive.
    fn clone_problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        match fastest(&self.clones) {
            Some(best)
                if best.clones_per_s == self.clones_per_s
                    && best.concurrency == self.clone_concurrency => {}
            _ => problems.push("clones_per_s is not the best concurrency's".into()),
        }
        if self
            .clones
            .iter()
            .any(|c| !positive(c.clones_per_s) || c.rss_kib_p50 == 0)
        {
            problems.push("a concurrency's clones/s or RSS is not positive".into());
        }
        if !positive(self.vmm_rss_mib) {
            problems.push(format!("vmm_rss_mib {} is not positive", self.vmm_rss_mib));
        }
        problems
    }

    /// Each breakdown has every stage of its path, none of negative length.
    fn breakdown_problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        for (what, stages, path) in [
            ("breakdown", &self.breakdown, breakdown::instance_path()),
            ("vm_breakdown", &self.vm_breakdown, breakdown::vm_path()),
        ] {
            if stages
                .iter()
                .any(|s| !(s.ms_p50.is_finite() && s.ms_p50 >= 0.0))
            {
                problems.push(format!("{what}: a stage of no positive length"));
            }
            // Every process traces, a jailed VM process too (through the
            // descriptor its supervisor passes): a stage no run passed is a
            // trace point lost.
            if stages.len() != path.len() {
                problems.push(format!(
                    "{what}: {} of its {} stages traced",
                    stages.len(),
                    path.len()
                ));
            }
        }
        problems
    }

    /// The recorded goals are the ones this report's numbers give.
    fn goals_problem(&self) -> Option<String> {
        (self.goals != self.goals()).then(|| "the goals are not this report's numbers".into())
    }

    /// The tables `kiln bench vmm` prints.
    pub fn table(&self) -> String {
        let header = format!(
            "{} runs per series after {} warm-up; {} MiB guests; {}\n",
            self.runs, self.warmup_runs, self.memory_mib, self.environment.label
        );
        [
            header,
            self.cold_table(),
            self.stop_table(),
            self.restore_table(),
            self.clone_table(),
            self.breakdown_tables(),
            self.goals_table(),
        ]
        .concat()
    }

    /// Each VMM's cold run percentiles, then Kiln's ratio to Firecracker.
    fn cold_table(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "\n| cold: exec to exit | wall p50 ms | wall p99 ms | CPU p50 ms | CPU p99 ms | peak RSS p50 MiB |"
        );
        let _ = writeln!(out, "|---|---|---|---|---|---|");
        for (vmm, c) in self.colds() {
            let _ = writeln!(
                out,
                "| {vmm} | {:.2} | {:.2} | {:.2} | {:.2} | {:.1} |",
                c.cold_wall_ms_p50,
                c.cold_wall_ms_p99,
                c.cold_cpu_ms_p50,
                c.cold_cpu_ms_p99,
                c.cold_max_rss_mib_p50
            );
        }
        if let Some(ratio) = self.cold_wall_ratio_firecracker {
            let _ = writeln!(
                out,
                "cold_wall_ratio_firecracker (kiln/firecracker wall p50): {ratio:.2}"
            );
        }
        out
    }

    /// Each VMM's stop percentiles, then Kiln's ratio to QEMU.
    fn stop_table(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "\n| stop: SIGTERM of a beating stub {} ms old to process exit | p50 ms | p99 ms |",
            STOP_AGE.as_millis()
        );
        let _ = writeln!(out, "|---|---|---|");
        for (vmm, stop) in self.stops() {
            let _ = writeln!(out, "| {vmm} | {:.2} | {:.2} |", stop.ms.p50, stop.ms.p99);
        }
        if let Some(ratio) = self.stop_ratio {
            let _ = writeln!(out, "stop_ratio (kiln/qemu p50): {ratio:.2}");
        }
        out
    }

    /// Each measured restore's percentiles, then why a peer's was not measured.
    fn restore_table(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "\n| restore to first heartbeat | min ms | p50 ms | p90 ms | p99 ms | max ms |"
        );
        let _ = writeln!(out, "|---|---|---|---|---|---|");
        let mut restores = vec![
            ("kiln snapshot restore", &self.restore),
            ("kiln __vm (VM process)", &self.vm_restore),
        ];
        restores.extend(self.measured_restores());
        for (what, l) in restores {
            let [min, p50, p90, p99, max] = l.ms.values();
            let _ = writeln!(
                out,
                "| {what} | {min:.2} | {p50:.2} | {p90:.2} | {p99:.2} | {max:.2} |"
            );
        }
        for (what, restore) in self.peer_restores() {
            if let PeerRestore::Unavailable(why) = restore {
                let _ = writeln!(out, "{what}: not measured: {why}");
            }
        }
        out
    }

    /// The clone path, and each concurrency's rate, latency and memory.
    fn clone_table(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "\nclones: {}", self.clone_path);
        let _ = writeln!(
            out,
            "| clones at a time | clones/s | p50 ms | p99 ms | VmRSS p50 KiB | without guest RAM | of which anonymous |"
        );
        let _ = writeln!(out, "|---|---|---|---|---|---|---|");
        for c in &self.clones {
            let _ = writeln!(
                out,
                "| {} | {:.1} | {:.2} | {:.2} | {} | {} | {} |",
                c.concurrency,
                c.clones_per_s,
                c.latency.ms.p50,
                c.latency.ms.p99,
                c.rss_kib_p50,
                c.vmm_rss_kib_p50,
                c.vmm_anon_kib_p50
            );
        }
        out
    }

    /// Each restore's stages: how long, in which process, and when it ended.
    fn breakdown_tables(&self) -> String {
        let mut out = String::new();
        for (what, stages) in [
            ("kiln snapshot restore", &self.breakdown),
            ("kiln __vm restore", &self.vm_breakdown),
        ] {
            let _ = writeln!(
                out,
                "\n| breakdown: {what} | ends in | ms p50 | at ms p50 |"
            );
            let _ = writeln!(out, "|---|---|---|---|");
            for s in stages {
                let _ = writeln!(
                    out,
                    "| {} | {} | {:.3} | {:.3} |",
                    s.stage, s.process, s.ms_p50, s.at_ms_p50
                );
            }
        }
        out
    }

    /// Each goal, its target, this run's value and whether it was met.
    fn goals_table(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "\n| goal | target | this run | met |");
        let _ = writeln!(out, "|---|---|---|---|");
        for g in &self.goals {
            let value = g.value.map_or("-".into(), |v| format!("{v:.2}"));
            let _ = writeln!(
                out,
                "| {} | {} | {value} | {} |",
                g.key,
                g.goal,
                if g.met { "yes" } else { "no" }
            );
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn latency(samples: &[f64]) -> Latency {
        Latency::new(("exec", "heartbeat"), samples.to_vec()).unwrap()
    }

    fn report() -> VmmReport {
        let kiln = Cold::new(
            "kiln",
            vec![9.0, 8.0, 25.0],
            vec![4.0, 3.9, 4.1],
            vec![5000; 3],
        );
        let qemu = Cold::new(
            "qemu",
            vec![40.0, 39.0, 44.0],
            vec![28.0; 3],
            vec![34000; 3],
        );
        let clones = |concurrency, clones_per_s| Clones {
            concurrency,
            clones_per_s,
            wall_s: 3.0 / clones_per_s,
            latency: latency(&[3.7, 3.8, 7.3]),
            rss_kib_p50: 4976,
            vmm_rss_kib_p50: 4952,
            vmm_anon_kib_p50: 544,
        };
        // Every stage of a path, each 1 ms long.
        let traced = |path: Vec<breakdown::Milestone>| -> Vec<Stage> {
            (path.iter().enumerate())
                .map(|(i, &(_, _, what))| Stage {
                    stage: what.into(),
                    process: "VM process".into(),
                    ms_p50: 1.0,
                    at_ms_p50: (i + 1) as f64,
                })
                .collect()
        };
        let mut report = VmmReport {
            schema_version: SCHEMA_VERSION,
            kiln_version: "0.1.0".into(),
            environment: Environment {
                kvm: "PVM".into(),
                hypervisor: Some("KVMKVMKVM".into()),
                emulated: false,
                cpus: 2,
                load_average: Some(2.0),
                label: "native KVM on a PVM host, stub guest".into(),
            },
            memory_mib: 128,
            runs: 3,
            warmup_runs: 1,
            cold_wall_ratio: Some(9.0 / 40.0),
            cold_cpu_ms_p50: 4.0,
            stop_ms_p50: 5.0,
            stop_ms_p99: 6.0,
            stop_ratio: Some(5.0 / 20.0),
            stop: latency(&[5.0, 4.0, 6.0]),
            qemu_stop: Some(latency(&[20.0, 18.0, 25.0])),
            restore_ms_p50: 10.4,
            restore_ms_p99: 14.6,
            vm_restore_ms_p50: 3.6,
            vm_restore_ms_p99: 3.9,
            restore: latency(&[10.4, 9.4, 14.6]),
            vm_restore: latency(&[3.6, 3.3, 3.9]),
            qemu_restore: PeerRestore::Measured(latency(&[41.0, 36.5, 51.2])),
            firecracker_restore: None,
            clone_path: "vm-process".into(),
            clones_per_s: 240.0,
            clone_concurrency: 8,
            clones: vec![clones(1, 50.0), clones(8, 240.0)],
            vmm_rss_mib: 4952.0 / 1024.0,
            breakdown: traced(breakdown::instance_path()),
            vm_breakdown: traced(breakdown::vm_path()),
            kiln,
            qemu: Some(qemu),
            firecracker: None,
            cold_wall_ratio_firecracker: None,
            goals: Vec::new(),
        };
        report.goals = report.goals();
        report
    }

    #[test]
    fn a_sound_report_survives_a_json_round_trip() {
        for report in [report(), with_firecracker()] {
            assert!(report.check().is_empty(), "{:?}", report.check());
            let json = serde_json::to_string_pretty(&report).unwrap();
            let back: VmmReport = serde_json::from_str(&json).unwrap();
            assert!(back.check().is_empty(), "{:?}", back.check());
            assert_eq!(back, report);
            let value: serde_json::Value = serde_json::from_str(&json).unwrap();
            for key in [
                "cold_wall_ratio",
                "restore_ms_p50",
                "restore_ms_p99",
                "clones_per_s",
                "stop_ms_p50",
                "stop_ms_p99",
                "stop_ratio",
            ] {
                assert!(value[key].as_f64().unwrap() > 0.0, "{key}");
            }
            assert_eq!(value["kiln"]["cold_wall_ms_p50"], 9.0);
        }
    }

    /// [`report`] with Firecracker's cold runs.
    fn with_firecracker() -> VmmReport {
        let mut r = report();
        let firecracker = Cold::new(
            "firecracker",
            vec![12.0, 11.0, 15.0],
            vec![6.0; 3],
            vec![9000; 3],
        );
        r.cold_wall_ratio_firecracker = wall_ratio(&r.kiln, Some(&firecracker));
        r.firecracker = Some(firecracker);
        r.firecracker_restore = Some(PeerRestore::Measured(latency(&[6.5, 6.1, 7.2])));
        r
    }

    #[test]
    fn firecracker_is_in_the_table_and_the_plot() {
        let r = with_firecracker();
        assert_eq!(r.cold_wall_ratio_firecracker, Some(9.0 / 12.0));
        let table = r.table();
        for row in [
            "| firecracker | 12.00 | 15.00 | 6.00 | 6.00 | 8.8 |",
            "cold_wall_ratio_firecracker (kiln/firecracker wall p50): 0.75",
            "| firecracker /snapshot/load | 6.10 | 6.50 | 7.20 | 7.20 | 7.20 |",
        ] {
            assert!(table.contains(row), "no {row:?} in:\n{table}");
        }
        let svg = r.svg().unwrap();
        assert!(svg.contains("cold (firecracker)"));
        assert!(svg.contains("restore (firecracker /snapshot/load)"));
    }

    #[test]
    fn an_unmeasured_firecracker_restore_says_why() {
        let mut r = with_firecracker();
        r.firecracker_restore = Some(PeerRestore::Unavailable("HTTP 400".into()));
        assert!(r.check().is_empty(), "{:?}", r.check());
        let table = r.table();
        assert!(
            table.contains("firecracker /snapshot/load: not measured: HTTP 400"),
            "{table}"
        );
    }

    #[test]
    fn a_report_without_firecracker_says_nothing_of_it() {
        let r = report();
        assert!(!r.table().contains("firecracker"), "{}", r.table());
        assert!(!r.svg().unwrap().contains("firecracker"));
    }

    #[test]
    fn a_report_from_before_firecracker_still_reads() {
        let mut value = serde_json::to_value(report()).unwrap();
        let fields = value.as_object_mut().unwrap();
        fields.remove("firecracker");
        fields.remove("cold_wall_ratio_firecracker");
        fields.remove("firecracker_restore");
        let back: VmmReport = serde_json::from_value(value).unwrap();
        assert_eq!(back, report());
    }

    #[test]
    fn a_report_from_before_the_stop_series_reads_and_is_said_to_lack_it() {
        let mut value = serde_json::to_value(report()).unwrap();
        let fields = value.as_object_mut().unwrap();
        for key in [
            "stop_ms_p50",
            "stop_ms_p99",
            "stop_ratio",
            "stop",
            "qemu_stop",
        ] {
            fields.remove(key);
        }
        let back: VmmReport = serde_json::from_value(value).unwrap();
        assert_eq!(back.stop, Latency::unmeasured());
        assert_eq!(back.qemu_stop, None);
        let problems = back.check().join("\n");
        for expected in [
            "stop (kiln): 0 samples, expected 3",
            "stop (kiln): p50 0 ms and p99 0 ms are not both positive times",
            "qemu_stop is missing, though QEMU ran the cold series",
        ] {
            assert!(
                problems.contains(expected),
                "no {expected:?} in:\n{problems}"
            );
        }
    }

    /// A change that breaks a sound report.
    type Breaking = fn(&mut VmmReport);

    /// [`report`] broken by `breaking`: what `check` says of it.
    fn problems_of(breaking: Breaking) -> String {
        let mut r = report();
        breaking(&mut r);
        r.check().join("\n")
    }

    #[test]
    fn a_broken_stop_is_said() {
        let cases: [(Breaking, &str); 7] = [
            (
                |r| r.stop.ms.p50 = 7.0,
                "stop (kiln): p50 7 ms is above p99 6 ms",
            ),
            (
                |r| r.qemu_stop.as_mut().unwrap().ms.p99 = f64::NAN,
                "stop (qemu): p50 20 ms and p99 NaN ms are not both positive times",
            ),
            (
                |r| r.stop.samples_ms[1] = 0.0,
                "stop (kiln): the sample 0 ms is not a positive time",
            ),
            (
                |r| {
                    r.stop.samples_ms.pop();
                },
                "stop: ms are not the samples' percentiles",
            ),
            (
                |r| r.stop_ms_p99 = 9.0,
                "stop_ms_p99 9 is not its series' (6)",
            ),
            (
                |r| r.stop_ratio = Some(0.5),
                "stop_ratio Some(0.5), expected Some(0.25)",
            ),
            (
                |r| r.qemu_stop = None,
                "qemu_stop is missing, though QEMU ran the cold series",
            ),
        ];
        for (breaking, expected) in cases {
            let problems = problems_of(breaking);
            assert!(
                problems.contains(expected),
                "no {expected:?} in:\n{problems}"
            );
        }
        assert!(
            problems_of(|r| r.qemu_stop = None).contains("stop_ratio Some(0.25), expected None")
        );
    }

    #[test]
    fn without_qemu_the_stop_table_has_kiln_alone() {
        let mut r = report();
        r.qemu = None;
        r.cold_wall_ratio = None;
        r.qemu_restore = PeerRestore::Unavailable("not asked for (--no-qemu)".into());
        r.qemu_stop = None;
        r.stop_ratio = None;
        r.goals = r.goals();
        assert!(r.check().is_empty(), "{:?}", r.check());
        let table = r.table();
        assert!(table.contains("| kiln | 5.00 | 6.00 |"), "{table}");
        assert!(!table.contains("| qemu |"), "{table}");
        assert!(!table.contains("stop_ratio"), "{table}");
    }

    #[test]
    fn a_wrong_firecracker_series_is_said() {
        let mut r = with_firecracker();
        r.cold_wall_ratio_firecracker = Some(0.1);
        r.firecracker.as_mut().unwrap().wall_ms.pop();
        if let Some(PeerRestore::Measured(l)) = &mut r.firecracker_restore {
            l.samples_ms[0] = 1.0;
        }
        let problems = r.check().join("\n");
        for expected in [
            "cold (firecracker): 2 samples, expected 3",
            "firecracker: the percentiles are not the samples'",
            "firecracker /snapshot/load: ms are not the samples' percentiles",
            "cold_wall_ratio_firecracker Some(0.1), expected",
        ] {
            assert!(
                problems.contains(expected),
                "no {expected:?} in:\n{problems}"
            );
        }
        r.firecracker = None;
        assert!(
            r.check()
                .contains(&"cold_wall_ratio_firecracker Some(0.1), expected None".into())
        );
    }

    #[test]
    fn the_goals_say_which_are_met() {
        let met: Vec<(String, bool)> = report().goals.into_iter().map(|g| (g.key, g.met)).collect();
        assert_eq!(
            met,
            [
                ("cold_wall_ratio".into(), true),
                ("cold_cpu_ms_p50".into(), false),
                ("restore_ms_p50".into(), false),
                ("restore_ms_p99".into(), true),
                ("clones_per_s".into(), true),
                ("vmm_rss_mib".into(), false),
            ]
        );
    }

    #[test]
    fn what_is_wrong_is_said() {
        let mut r = report();
        r.restore.samples_ms.pop();
        r.restore_ms_p99 = 1.0;
        r.clones_per_s = 50.0;
        r.kiln.cpu_ms[0] = -1.0;
        r.vm_breakdown.clear();
        let problems = r.check().join("\n");
        for expected in [
            "restore (kiln snapshot restore): 2 samples, expected 3",
            "restore: ms are not the samples' percentiles",
            "restore_ms_p99 1 is not its series' (14.6)",
            "clones_per_s is not the best concurrency's",
            "kiln: the percentiles are not the samples'",
            "vm_breakdown: 0 of its 9 stages traced",
            "the goals are not this report's numbers",
        ] {
            assert!(
                problems.contains(expected),
                "no {expected:?} in:\n{problems}"
            );
        }
    }

    #[test]
    fn the_tables_and_the_plot_have_every_series() {
        let r = report();
        let table = r.table();
        assert!(
            table.contains("| kiln | 9.00 | 25.00 | 4.00 | 4.10 | 4.9 |"),
            "{table}"
        );
        assert!(
            table.contains("| qemu -incoming | 36.50 | 41.00 |"),
            "{table}"
        );
        assert!(
            table.contains("| 8 | 240.0 | 3.80 | 7.30 | 4976 | 4952 | 544 |"),
            "{table}"
        );
        assert!(
            table.contains("| cold_cpu_ms_p50 | <= 3 | 4.00 | no |"),
            "{table}"
        );
        for row in [
            "| stop: SIGTERM of a beating stub 50 ms old to process exit | p50 ms | p99 ms |",
            "| kiln | 5.00 | 6.00 |",
            "| qemu | 20.00 | 25.00 |",
            "stop_ratio (kiln/qemu p50): 0.25",
        ] {
            assert!(table.contains(row), "no {row:?} in:\n{table}");
        }
        let svg = r.svg().unwrap();
        for label in [
            "cold (qemu)",
            "stop (kiln)",
            "stop (qemu)",
            "restore (kiln __vm)",
            "clone (kiln __vm, 8 at a time)",
        ] {
            assert!(svg.contains(label), "no {label:?}");
        }
    }
}
