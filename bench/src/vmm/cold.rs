//! Cold runs of the stub: exec → its first write (`InitStarted`) → the
//! process's exit, Kiln's, QEMU's and Firecracker's by turns, each timed to its `wait4`,
//! which also gives its CPU time and peak RSS.
use std::path::Path;
use std::process::Command;

use crate::kiln::Kiln;
use crate::qemu::{CPU_HOST_PVM, DEBUG_EXIT_STATUS, InitPort, Microvm, QEMU};
use crate::timing::{Exited, millis, printed, run_to_exit};
use crate::{BenchError, Plan, Progress, paired};

use super::report::Cold;
use super::{VmmConfig, firecracker};

/// Kiln's command, as the report names it.
const KILN_COMMAND: &str = "kiln run --kernel STUB (exit mode: InitStarted, then an i8042 reset)";
/// QEMU's.
const QEMU_COMMAND: &str = "qemu-system-x86_64 -M microvm -kernel STUB (PVH entry; an \
                            isa-debug-exit on port 0x440 ends it at InitStarted)";

/// The cold series of every VMM that took part.
pub struct Colds {
    /// Kiln's.
    pub kiln: Cold,
    /// QEMU microvm's, when `config.qemu`.
    pub qemu: Option<Cold>,
    /// Firecracker's, when `config.firecracker` names it.
    pub firecracker: Option<Cold>,
}

/// One VMM's cold runs: what the progress bar and the report call them,
/// and one run.
struct Side<'a> {
    label: &'a str,
    command: &'a str,
    run: &'a (dyn Fn(usize) -> Result<Exited, BenchError> + Sync),
}

/// Kiln's cold runs, and by turns with them QEMU's when `config.qemu` and
/// Firecracker's when `config.firecracker` names it.
pub fn run(
    config: &VmmConfig,
    kiln: &Kiln,
    work: &Path,
    progress: &dyn Progress,
) -> Result<Colds, BenchError> {
    let kiln_run = |i: usize| kiln_cold(config, kiln, work, i);
    let qemu_run = |i: usize| qemu_cold(config, work, i);
    let kiln = Side {
        label: "cold (kiln)",
        command: KILN_COMMAND,
        run: &kiln_run,
    };
    let qemu = config.qemu.then_some(Side {
        label: "cold (qemu)",
        command: QEMU_COMMAND,
        run: &qemu_run,
    });
    let firecracker = config
        .firecracker
        .as_deref()
        .map(|binary| firecracker::ColdBoot::write(config, binary, work))
        .transpose()?;
    let firecracker_run = firecracker
        .as_ref()
        .map(|boot| move |i: usize| boot.run(config, work, i));
    let firecracker = firecracker_run.as_ref().map(|run| Side {
        label: "cold (firecracker)",
        command: firecracker::COLD_COMMAND,
        run,
    });
    let plan = config.plan();
    Ok(match (qemu, firecracker) {
        (None, None) => {
            let [kiln] = by_turns(plan, progress, [&kiln])?;
            Colds {
                kiln,
                qemu: None,
                firecracker: None,
            }
        }
        (Some(qemu), None) => {
            let [kiln, qemu] = by_turns(plan, progress, [&kiln, &qemu])?;
            Colds {
                kiln,
                qemu: Some(qemu),
                firecracker: None,
            }
        }
        (None, Some(fc)) => {
            let [kiln, fc] = by_turns(plan, progress, [&kiln, &fc])?;
            Colds {
                kiln,
                qemu: None,
                firecracker: Some(fc),
            }
        }
        (Some(qemu), Some(fc)) => {
            let [kiln, qemu, fc] = by_turns(plan, progress, [&kiln, &qemu, &fc])?;
            Colds {
                kiln,
                qemu: Some(qemu),
                firecracker: Some(fc),
            }
        }
    })
}

/// `sides`' runs by turns ([`paired`]), each made into its [`Cold`].
fn by_turns<const N: usize>(
    plan: Plan,
    progress: &dyn Progress,
    sides: [&Side<'_>; N],
) -> Result<[Cold; N], BenchError> {
    let mut runs = paired(plan, sides.map(|s| s.label), progress, sides.map(|s| s.run))?;
    Ok(std::array::from_fn(|i| {
        cold(sides[i].command, std::mem::take(&mut runs[i].0))
    }))
}

fn cold(command: &str, runs: Vec<Exited>) -> Cold {
    Cold::new(
        command,
        runs.iter().map(|r| millis(r.wall)).collect(),
        runs.iter().map(|r| millis(r.cpu)).collect(),
        runs.iter().map(|r| r.max_rss_kib).collect(),
    )
}

/// One `kiln run --kernel STUB`, which must exit 0.
fn kiln_cold(config: &VmmConfig, kiln: &Kiln, work: &Path, i: usize) -> Result<Exited, BenchError> {
    let mut cmd = kiln.command();
    cmd.arg("run").arg("--kernel").arg(&config.stub).args([
        "--memory",
        &config.memory_mib.to_string(),
        "--vcpus",
        "1",
    ]);
    ended_with(
        cmd,
        "kiln run --kernel STUB",
        &work.join(format!("cold-kiln-{i}.out")),
        0,
        config,
    )
}

/// One QEMU microvm boot of the stub, which must end at its first write.
fn qemu_cold(config: &VmmConfig, work: &Path, i: usize) -> Result<Exited, BenchError> {
    let cmd = stub_microvm(config, "", InitPort::ExitOnWrite).command(Path::new(QEMU));
    let out = work.join(format!("cold-qemu-{i}.out"));
    ended_with(
        cmd,
        "qemu-system-x86_64 -M microvm -kernel STUB",
        &out,
        DEBUG_EXIT_STATUS,
        config,
    )
}

/// QEMU microvm with the stub, no disk, its console on stdout.
pub(super) fn stub_microvm(config: &VmmConfig, cmdline: &str, init_port: InitPort) -> Microvm {
    Microvm {
        kernel: config.stub.clone(),
        rootfs: None,
        cpu: CPU_HOST_PVM,
        memory_mib: config.memory_mib,
        vcpus: 1,
        throwaway_writes: false,
        extra_cmdline: cmdline.into(),
        console: None,
        init_port,
    }
}

/// `cmd` run to its end ([`run_to_exit`]), which must be exit status `code`.
fn ended_with(
    cmd: Command,
    what: &str,
    out: &Path,
    code: i32,
    config: &VmmConfig,
) -> Result<Exited, BenchError> {
    let exited = run_to_exit(cmd, what, out, config.limit)?;
    if exited.code != Some(code) {
        return Err(wrong_end(
            what,
            &exited,
            &format!("exit status {code}"),
            out,
        ));
    }
    Ok(exited)
}

/// A run that `exited` otherwise than `expected`, with what it printed
/// into `out`.
pub(super) fn wrong_end(what: &str, exited: &Exited, expected: &str, out: &Path) -> BenchError {
    BenchError::Failed {
        what: what.to_string(),
        status: format!("{:?}, expected {expected}", exited.code),
        printed: printed(out),
    }
}
