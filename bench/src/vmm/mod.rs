//! `kiln bench vmm`: the VMM's own cost, measured natively with the stub
//! guest (docs/stub-guest.md) in place of a kernel, so that no guest
//! boot, emulated or not, is in any number. It runs wherever `/dev/kvm`
//! opens: on hardware KVM, and on a PVM host, where the stub's few
//! instructions run natively (the benchmark's Kiln processes get
//! `KILN_ALLOW_PVM=1`).
//!
//! - [`cold`]: exec → the stub's first write → process exit, Kiln's
//!   `kiln run --kernel STUB` and QEMU microvm's by turns, with CPU time
//!   and peak RSS from `wait4`; and Firecracker's when the user names a
//!   binary ([`firecracker`]).
//! - [`stop`]: a beating stub's VM, [`stop::STOP_AGE`] past its first
//!   heartbeat, from SIGTERM to its process's exit, Kiln's `kiln run` and
//!   QEMU microvm's by turns.
//! - [`restore`]: a snapshot of a beating stub restored to its first
//!   heartbeat, through `kiln snapshot restore` (a detached instance: the
//!   `kiln` command, the registry, the instance's VMM process, its VM
//!   process) and through a VM process alone (`kiln __vm`, the lean
//!   path); and the clones, VM-process restores at several concurrencies.
//! - [`peer`]: QEMU's restore of a migration stream, `-incoming`; and
//!   Firecracker's of its snapshot, `PUT /snapshot/load`, when asked for.
//! - [`breakdown`]: where a restore's milliseconds go, from the stage
//!   timestamps Kiln's processes append to `KILN_TRACE`.
//!
//! Everything runs in a Kiln home of its own with a store of its own
//! (the stub's image is built there), removed at the end.
pub mod breakdown;
pub mod cold;
pub mod firecracker;
pub mod peer;
pub mod report;
pub mod restore;
pub mod stop;

use std::path::{Path, PathBuf};
use std::time::Duration;

use kiln_vmm::host::{self, ALLOW_PVM_ENV, HostVirt};

use crate::kiln::Kiln;
use crate::report::Environment;
use crate::{BenchError, Plan, Progress, Workspace, environment};
use cold::Colds;
use report::{Clones, Latency, PeerRestore, Stage, VmmReport};
use stop::Stops;

/// What to measure.
#[derive(Clone, Debug)]
pub struct VmmConfig {
    /// Timed runs per cold, stop and restore series, and clones per
    /// concurrency.
    pub runs: usize,
    /// Untimed runs before each series.
    pub warmup: usize,
    /// Guest memory of every VM, in MiB.
    pub memory_mib: u32,
    /// The concurrencies the clones run at.
    pub concurrencies: Vec<usize>,
    /// Time QEMU microvm too (cold, stop, and its `-incoming` restore).
    pub qemu: bool,
    /// A Firecracker binary to time too ([`firecracker`]); the user's own,
    /// since the benchmark neither builds nor ships one.
    pub firecracker: Option<PathBuf>,
    /// The `kiln` binary the runs exec.
    pub kiln: PathBuf,
    /// The user's `KILN_HOME`, under which the benchmark's own home goes.
    pub home: PathBuf,
    /// The stub guest.
    pub stub: PathBuf,
    /// How long one run may take before it is killed and the benchmark fails.
    pub limit: Duration,
}

impl VmmConfig {
    /// One at a time, as the cold, stop and restore series run.
    fn plan(&self) -> Plan {
        Plan {
            runs: self.runs,
            warmup: self.warmup,
            concurrency: 1,
        }
    }
}

/// The label of this benchmark's numbers on `host`.
fn label(host: &HostVirt) -> String {
    let kvm = match host {
        HostVirt::Pvm => "native KVM on a PVM host (kvm_pvm: the stub's instructions run natively)",
        _ => "native hardware KVM",
    };
    format!(
        "{kvm}, stub guest: no guest kernel, so these are the VMM's own costs (process, \
         KVM set-up, memory, devices, snapshot restore), not a Linux guest's boot"
    )
}

/// Runs the benchmark described by `config`.
pub fn run(config: &VmmConfig, progress: &dyn Progress) -> Result<VmmReport, BenchError> {
    let host = checked_host(config)?;
    let mut environment = environment(&host);
    environment.label = label(&host);
    let work = Workspace::isolated(&config.home)?;
    let kiln = Kiln::new(&config.kiln, work.home())
        .with_kernel(&config.stub)
        .with_env(ALLOW_PVM_ENV, "1");
    let measured = measure(config, &kiln, work.path(), progress)?;
    drop(kiln);
    work.remove()?;
    Ok(measured.into_report(config, environment))
}

/// The host to measure on, after checking that `config` has runs and
/// concurrencies (none of them 0), that the host has `/dev/kvm` and that
/// the stub is a file.
fn checked_host(config: &VmmConfig) -> Result<HostVirt, BenchError> {
    if config.runs == 0 {
        return Err(BenchError::Runs(config.runs));
    }
    if let Some(&bad) = config.concurrencies.iter().find(|&&c| c == 0) {
        return Err(BenchError::Concurrency(bad));
    }
    if config.concurrencies.is_empty() {
        return Err(BenchError::Concurrency(0));
    }
    let host = host::detect();
    if let HostVirt::Unavailable { .. } = host {
        return Err(BenchError::NoKvm(host));
    }
    if !config.stub.is_file() {
        return Err(BenchError::NoStub(config.stub.clone()));
    }
    Ok(host)
}

/// What every series measured, before it makes up the report.
struct Measured {
    cold: Colds,
    stops: Stops,
    /// `kiln snapshot restore`'s.
    restores: Latency,
    /// Where their time went.
    breakdown: Vec<Stage>,
    /// The VM process's (`kiln __vm`) restores.
    vm_restores: Latency,
    /// Where their time went.
    vm_breakdown: Vec<Stage>,
    /// Per concurrency, in `config.concurrencies`' order.
    clones: Vec<Clones>,
    qemu_restore: PeerRestore,
    firecracker_restore: Option<PeerRestore>,
}

/// Every series, one after the other: the cold starts, the stops, the
/// instance's restores, the VM process's restores, the clones at each concurrency,
/// then the peers' restores.
fn measure(
    config: &VmmConfig,
    kiln: &Kiln,
    work: &Path,
    progress: &dyn Progress,
) -> Result<Measured, BenchError> {
    let cold = cold::run(config, kiln, work, progress)?;
    let stops = stop::run(config, kiln, work, progress)?;
    let snapshot = restore::instance_snapshot(config, kiln, work, progress)?;
    let (restores, breakdown) = restore::instance_restores(config, kiln, &snapshot, progress)?;
    let vm = restore::vm_snapshot(config, kiln, work, progress)?;
    let (vm_restores, vm_breakdown) = restore::vm_restores(config, kiln, &vm, progress)?;
    let clones = config
        .concurrencies
        .iter()
        .map(|&c| restore::clones(config, kiln, &vm, c, progress))
        .collect::<Result<Vec<_>, _>>()?;
    let qemu_restore = if config.qemu {
        peer::restores(config, work, progress)
    } else {
        PeerRestore::Unavailable("not asked for (--no-qemu)".into())
    };
    let firecracker_restore = config
        .firecracker
        .as_deref()
        .map(|binary| firecracker::restores(config, binary, work, progress));
    Ok(Measured {
        cold,
        stops,
        restores,
        breakdown,
        vm_restores,
        vm_breakdown,
        clones,
        qemu_restore,
        firecracker_restore,
    })
}

impl Measured {
    /// The report of these measurements, with the goals' keys and the
    /// goals judged.
    fn into_report(self, config: &VmmConfig, environment: Environment) -> VmmReport {
        let cold = self.cold;
        let stops = self.stops;
        let best = report::fastest(&self.clones).expect("at least one concurrency");
        let mut report = VmmReport {
            schema_version: report::SCHEMA_VERSION,
            kiln_version: env!("CARGO_PKG_VERSION").to_string(),
            environment,
            memory_mib: config.memory_mib,
            runs: config.runs,
            warmup_runs: config.warmup,
            cold_wall_ratio: report::wall_ratio(&cold.kiln, cold.qemu.as_ref()),
            cold_wall_ratio_firecracker: report::wall_ratio(&cold.kiln, cold.firecracker.as_ref()),
            cold_cpu_ms_p50: cold.kiln.cold_cpu_ms_p50,
            kiln: cold.kiln,
            qemu: cold.qemu,
            firecracker: cold.firecracker,
            stop_ms_p50: stops.kiln.ms.p50,
            stop_ms_p99: stops.kiln.ms.p99,
            stop_ratio: report::p50_ratio(&stops.kiln, stops.qemu.as_ref()),
            stop: stops.kiln,
            qemu_stop: stops.qemu,
            restore_ms_p50: self.restores.ms.p50,
            restore_ms_p99: self.restores.ms.p99,
            vm_restore_ms_p50: self.vm_restores.ms.p50,
            vm_restore_ms_p99: self.vm_restores.ms.p99,
            restore: self.restores,
            vm_restore: self.vm_restores,
            qemu_restore: self.qemu_restore,
            firecracker_restore: self.firecracker_restore,
            clone_path: restore::CLONE_PATH.into(),
            clones_per_s: best.clones_per_s,
            clone_concurrency: best.concurrency,
            vmm_rss_mib: at_lowest_concurrency(&self.clones).vmm_rss_kib_p50 as f64 / 1024.0,
            clones: self.clones,
            breakdown: self.breakdown,
            vm_breakdown: self.vm_breakdown,
            goals: Vec::new(),
        };
        report.goals = report.goals();
        report
    }
}

/// The clones at the lowest concurrency (1 unless not asked for), whose
/// memory the report gives as the VMM's.
fn at_lowest_concurrency(clones: &[Clones]) -> &Clones {
    clones
        .iter()
        .min_by_key(|c| c.concurrency)
        .expect("at least one")
}
