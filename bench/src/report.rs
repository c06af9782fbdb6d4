//! What `kiln bench --json FILE` writes: every timed run's latency per
//! scenario and VMM, their percentiles and throughput, and the ratios
//! against the peer; [`Report::check`] is the schema's rules beyond
//! what serde checks.
use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use crate::Scenario;
use crate::stats::Stats;

/// Bumped whenever a field changes meaning or goes away.
pub const SCHEMA_VERSION: u32 = 1;

/// One `kiln bench` run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Report {
    /// [`SCHEMA_VERSION`] of the code that wrote it.
    pub schema_version: u32,
    /// The version of the `kiln` that measured.
    pub kiln_version: String,
    /// The host the numbers were measured on.
    pub environment: Environment,
    /// NAME:VERSION booted, restored and cloned.
    pub image: String,
    /// The clone scenario's handler.
    pub handler: String,
    /// Guest memory of every VM, in MiB.
    pub memory_mib: u32,
    /// Timed runs per scenario and VMM.
    pub runs: usize,
    /// Runs in flight at once.
    pub concurrency: usize,
    /// Untimed runs before the timed ones, per scenario and VMM.
    pub warmup_runs: usize,
    /// One per scenario and VMM that ran.
    pub series: Vec<Series>,
    /// Kiln against the peer, per scenario the peer ran.
    pub ratios: Vec<Ratio>,
}

/// Where the numbers were measured.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Environment {
    /// `kiln doctor`'s verdict on this host's KVM.
    pub kvm: String,
    /// The CPU's hypervisor signature (CPUID leaf 0x40000000) when this
    /// host is itself a guest: "KVMKVMKVM", "TCGTCGTCGTCG", …
    pub hypervisor: Option<String>,
    /// True when the host's CPU is emulated (QEMU TCG, as in `cargo
    /// xtask bench startup` on a host without hardware KVM): absolute
    /// numbers are then far slower than on hardware, and only the ratios
    /// against the peer in the same run mean anything.
    pub emulated: bool,
    /// Online CPUs.
    pub cpus: usize,
    /// The 1-minute load average when the benchmark started.
    pub load_average: Option<f64>,
    /// One sentence for the tables and plots.
    pub label: String,
}

/// One VMM's timed runs of one scenario.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Series {
    /// What was timed.
    pub scenario: Scenario,
    /// Which VMM ran it.
    pub vmm: Vmm,
    /// What the timer starts on.
    pub timer_starts: String,
    /// What the timer stops on.
    pub timer_stops: String,
    /// Each timed run's latency, in the order the runs finished.
    pub samples_ms: Vec<f64>,
    /// The samples' percentiles.
    pub latency_ms: Stats,
    /// From the first timed run's start to the last one's end; for two
    /// series whose runs alternate, the sum of this one's runs' own times.
    pub wall_s: f64,
    /// Timed runs per second of `wall_s`.
    pub throughput_per_s: f64,
}

/// The VMM a series ran on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Vmm {
    /// Kiln's own VMM.
    Kiln,
    /// QEMU's `microvm` machine, the peer.
    Qemu,
}

impl std::fmt::Display for Vmm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Vmm::Kiln => "kiln",
            Vmm::Qemu => "qemu",
        })
    }
}

/// Kiln's p50 over the peer's, same scenario, same run: below 1, Kiln
/// is faster.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Ratio {
    /// The scenario both ran.
    pub scenario: Scenario,
    /// The VMM Kiln is compared with.
    pub peer: Vmm,
    /// Kiln's median latency.
    pub kiln_p50_ms: f64,
    /// The peer's median latency.
    pub peer_p50_ms: f64,
    /// `kiln_p50_ms / peer_p50_ms`.
    pub ratio: f64,
}

impl Series {
    /// From the samples (not empty) and the timed phase's wall time.
    pub fn new(
        scenario: Scenario,
        vmm: Vmm,
        timer: (&str, &str),
        samples_ms: Vec<f64>,
        wall_s: f64,
    ) -> Option<Series> {
        let latency_ms = Stats::of(&samples_ms)?;
        Some(Series {
            scenario,
            vmm,
            timer_starts: timer.0.to_string(),
            timer_stops: timer.1.to_string(),
            throughput_per_s: samples_ms.len() as f64 / wall_s,
            samples_ms,
            latency_ms,
            wall_s,
        })
    }

    /// "cold (kiln)".
    pub fn label(&self) -> String {
        format!("{} ({})", self.scenario, self.vmm)
    }
}

impl Ratio {
    /// Kiln's series against the peer's.
    pub fn of(kiln: &Series, peer: &Series) -> Ratio {
        Ratio {
            scenario: kiln.scenario,
            peer: peer.vmm,
            kiln_p50_ms: kiln.latency_ms.p50,
            peer_p50_ms: peer.latency_ms.p50,
            ratio: kiln.latency_ms.p50 / peer.latency_ms.p50,
        }
    }
}

/// How far two computations of the same value may differ (f64 sums,
/// and serde_json's float parsing, which may be one ULP off).
const SLACK: f64 = 1e-6;

/// `a` and `b` are the same value, but for rounding.
pub(crate) fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= SLACK * a.abs().max(b.abs()).max(1.0)
}

impl Ratio {
    /// The same ratio as `other`, but for rounding.
    fn matches(&self, other: &Ratio) -> bool {
        self.scenario == other.scenario
            && self.peer == other.peer
            && close(self.kiln_p50_ms, other.kiln_p50_ms)
            && close(self.peer_p50_ms, other.peer_p50_ms)
            && close(self.ratio, other.ratio)
    }
}

impl Report {
    /// Kiln's series of `scenario`, if it ran.
    pub fn series(&self, scenario: Scenario, vmm: Vmm) -> Option<&Series> {
        self.series
            .iter()
            .find(|s| s.scenario == scenario && s.vmm == vmm)
    }

    /// What is wrong with this report, none when it is sound: every
    /// scenario of `expected` ran on Kiln, each series holds `runs`
    /// positive finite samples whose percentiles and throughput are the
    /// ones recorded, and every peer series has its ratio.
    pub fn check(&self, expected: &[Scenario]) -> Vec<String> {
        let mut problems = Vec::new();
        if self.schema_version != SCHEMA_VERSION {
            problems.push(format!(
                "schema_version {}, expected {SCHEMA_VERSION}",
                self.schema_version
            ));
        }
        if self.runs == 0 || self.concurrency == 0 {
            problems.push(format!(
                "runs {} and concurrency {}: expected at least 1",
                self.runs, self.concurrency
            ));
        }
        for &scenario in expected {
            if self.series(scenario, Vmm::Kiln).is_none() {
                problems.push(format!("no kiln series for the {scenario} scenario"));
            }
        }
        for series in &self.series {
            problems.extend(
                series
                    .problems(self.runs)
                    .into_iter()
                    .map(|p| format!("{}: {p}", series.label())),
            );
            if series.vmm != Vmm::Kiln {
                let ratio = self
                    .ratios
                    .iter()
                    .find(|r| r.scenario == series.scenario && r.peer == series.vmm);
                let kiln = self.series(series.scenario, Vmm::Kiln);
                match (ratio, kiln) {
                    (Some(ratio), Some(kiln)) if !ratio.matches(&Ratio::of(kiln, series)) => {
                        problems.push(format!("{}: the ratio is not p50 over p50", series.label()))
                    }
                    (Some(_), Some(_)) => {}
                    _ => problems.push(format!("{}: no ratio against kiln", series.label())),
                }
            }
        }
        problems
    }

    /// The table `kiln bench` prints.
    pub fn table(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "{} runs per series, {} at a time, after {} warm-up; {} MiB guests; {}",
            self.runs, self.concurrency, self.warmup_runs, self.memory_mib, self.environment.label
        );
        let _ = writeln!(
            out,
            "| scenario | vmm | min ms | p50 ms | p90 ms | p99 ms | max ms | runs/s |"
        );
        let _ = writeln!(out, "|---|---|---|---|---|---|---|---|");
        for s in &self.series {
            let [min, p50, p90, p99, max] = s.latency_ms.values();
            let _ = writeln!(
                out,
                "| {} | {} | {min:.1} | {p50:.1} | {p90:.1} | {p99:.1} | {max:.1} | {:.2} |",
                s.scenario, s.vmm, s.throughput_per_s
            );
        }
        for r in &self.ratios {
            let _ = writeln!(
                out,
                "{}: kiln / {} p50 = {:.1} / {:.1} ms = {:.2}{}",
                r.scenario,
                r.peer,
                r.kiln_p50_ms,
                r.peer_p50_ms,
                r.ratio,
                if r.ratio < 1.0 { " (kiln faster)" } else { "" }
            );
        }
        out
    }
}

impl Series {
    fn problems(&self, runs: usize) -> Vec<String> {
        let mut problems = Vec::new();
        if self.samples_ms.len() != runs {
            problems.push(format!(
                "{} samples, expected {runs}",
                self.samples_ms.len()
            ));
        }
        if let Some(bad) = self
            .samples_ms
            .iter()
            .find(|&&ms| !ms.is_finite() || ms <= 0.0)
        {
            problems.push(format!("the sample {bad} ms is not a positive latency"));
        }
        if Stats::of(&self.samples_ms).as_ref() != Some(&self.latency_ms) {
            problems.push("latency_ms are not the samples' percentiles".into());
        }
        let values = self.latency_ms.values();
        if values.windows(2).any(|w| w[0] > w[1]) {
            problems.push(format!("latency_ms out of order: {values:?}"));
        }
        if !(self.wall_s.is_finite() && self.wall_s > 0.0) {
            problems.push(format!("wall_s {} is not a positive time", self.wall_s));
        } else {
            let expected = self.samples_ms.len() as f64 / self.wall_s;
            if !close(self.throughput_per_s, expected) {
                problems.push(format!(
                    "throughput_per_s {} is not runs / wall_s ({expected})",
                    self.throughput_per_s
                ));
            }
            // Runs overlap at most `concurrency` deep, so the slowest cannot
            // outlast the whole phase.
            if self.latency_ms.max > self.wall_s * 1000.0 * (1.0 + SLACK) {
                problems.push(format!(
                    "a run of {} ms outlasted the phase's {} s",
                    self.latency_ms.max, self.wall_s
                ));
            }
        }
        if self.timer_starts.is_empty() || self.timer_stops.is_empty() {
            problems.push("the timer's start or stop is not said".into());
        }
        problems
    }
}

/// Reports for the tests of this module and of [`crate::plot`].
#[cfg(test)]
pub(crate) mod fixtures {
    use super::*;

    /// A series of `samples` over 2 s, timer "exec" to "report".
    pub fn series(scenario: Scenario, vmm: Vmm, samples: &[f64]) -> Series {
        Series::new(scenario, vmm, ("exec", "report"), samples.to_vec(), 2.0).unwrap()
    }

    /// A report of 3 runs holding `series` and `ratios`.
    pub fn report(series: Vec<Series>, ratios: Vec<Ratio>) -> Report {
        Report {
            schema_version: SCHEMA_VERSION,
            kiln_version: "0.1.0".into(),
            environment: Environment {
                kvm: "hardware KVM (AMD-V): Kiln boots VMs here".into(),
                hypervisor: Some("TCGTCGTCGTCG".into()),
                emulated: true,
                cpus: 2,
                load_average: Some(0.05),
                label: "measured under emulation".into(),
            },
            image: "hello:1.0.0".into(),
            handler: "/bin/hello".into(),
            memory_mib: 128,
            runs: 3,
            concurrency: 1,
            warmup_runs: 1,
            series,
            ratios,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::fixtures::series;
    use super::*;

    fn report() -> Report {
        let kiln = series(Scenario::Cold, Vmm::Kiln, &[100.0, 120.0, 110.0]);
        let qemu = series(Scenario::Cold, Vmm::Qemu, &[200.0, 260.0, 220.0]);
        let ratios = vec![Ratio::of(&kiln, &qemu)];
        fixtures::report(
            vec![
                kiln,
                qemu,
                series(Scenario::Restore, Vmm::Kiln, &[30.0, 20.0, 25.0]),
                series(Scenario::Clone, Vmm::Kiln, &[50.0, 40.0, 45.0]),
            ],
            ratios,
        )
    }

    #[test]
    fn a_report_survives_a_json_round_trip() {
        let report = report();
        let json = serde_json::to_string_pretty(&report).unwrap();
        let back: Report = serde_json::from_str(&json).unwrap();
        assert_eq!(back, report);
        assert!(
            back.check(&Scenario::ALL).is_empty(),
            "{:?}",
            back.check(&Scenario::ALL)
        );
    }

    #[test]
    fn the_schema_is_as_documented() {
        let json = serde_json::to_value(report()).unwrap();
        let keys = |v: &serde_json::Value| {
            let mut keys: Vec<String> = v.as_object().unwrap().keys().cloned().collect();
            keys.sort();
            keys
        };
        assert_eq!(
            keys(&json),
            [
                "concurrency",
                "environment",
                "handler",
                "image",
                "kiln_version",
                "memory_mib",
                "ratios",
                "runs",
                "schema_version",
                "series",
                "warmup_runs"
            ]
        );
        assert_eq!(
            keys(&json["environment"]),
            [
                "cpus",
                "emulated",
                "hypervisor",
                "kvm",
                "label",
                "load_average"
            ]
        );
        let series = &json["series"][0];
        assert_eq!(
            keys(series),
            [
                "latency_ms",
                "samples_ms",
                "scenario",
                "throughput_per_s",
                "timer_starts",
                "timer_stops",
                "vmm",
                "wall_s"
            ]
        );
        assert_eq!(
            keys(&series["latency_ms"]),
            ["max", "min", "p50", "p90", "p99"]
        );
        assert_eq!(series["scenario"], "cold");
        assert_eq!(json["series"][1]["vmm"], "qemu");
        assert_eq!(series["latency_ms"]["p50"], 110.0);
        assert_eq!(series["throughput_per_s"], 1.5);
        assert_eq!(
            keys(&json["ratios"][0]),
            ["kiln_p50_ms", "peer", "peer_p50_ms", "ratio", "scenario"]
        );
        assert_eq!(json["ratios"][0]["ratio"], 0.5);
    }

    #[test]
    fn unknown_fields_and_scenarios_are_refused() {
        let mut json = serde_json::to_value(report()).unwrap();
        json["series"][0]["scenario"] = "warm".into();
        assert!(serde_json::from_value::<Report>(json.clone()).is_err());
        let mut json = serde_json::to_value(report()).unwrap();
        json["extra"] = 1.into();
        assert!(serde_json::from_value::<Report>(json).is_err());
    }

    #[test]
    fn the_check_finds_what_is_wrong() {
        let mut r = report();
        r.series.retain(|s| s.scenario != Scenario::Clone);
        r.series[0].samples_ms[1] = -4.0;
        r.series[1].latency_ms.p50 = 1.0;
        r.series[2].samples_ms.pop();
        r.series[2].throughput_per_s = 99.0;
        r.ratios[0].ratio = 2.0;
        r.schema_version = 0;
        let problems = r.check(&Scenario::ALL).join("\n");
        for expected in [
            "schema_version 0",
            "no kiln series for the clone scenario",
            "cold (kiln): the sample -4 ms is not a positive latency",
            "cold (kiln): latency_ms are not the samples' percentiles",
            "cold (qemu): latency_ms are not the samples' percentiles",
            "cold (qemu): the ratio is not p50 over p50",
            "restore (kiln): 2 samples, expected 3",
            "restore (kiln): throughput_per_s 99 is not runs / wall_s",
        ] {
            assert!(
                problems.contains(expected),
                "no {expected:?} in:\n{problems}"
            );
        }
        // serde_json may parse a float one ULP off: still the ratio.
        let mut r = report();
        r.ratios[0].ratio = f64::from_bits(r.ratios[0].ratio.to_bits() + 1);
        assert!(r.check(&Scenario::ALL).is_empty());
        let mut r = report();
        r.ratios.clear();
        assert_eq!(
            r.check(&[Scenario::Cold]),
            ["cold (qemu): no ratio against kiln"]
        );
        let mut r = report();
        r.series[3].wall_s = 0.01;
        r.series[3].throughput_per_s = 300.0;
        assert_eq!(
            r.check(&[]),
            ["clone (kiln): a run of 50 ms outlasted the phase's 0.01 s"]
        );
    }

    #[test]
    fn the_table_has_a_row_per_series_and_the_ratio() {
        let table = report().table();
        assert!(table.contains("| cold | kiln | 100.0 | 110.0 | 120.0 | 120.0 | 120.0 | 1.50 |"));
        assert!(table.contains("| cold | qemu | 200.0 | 220.0 |"));
        assert!(table.contains("cold: kiln / qemu p50 = 110.0 / 220.0 ms = 0.50 (kiln faster)"));
        assert!(table.contains("measured under emulation"));
    }
}
