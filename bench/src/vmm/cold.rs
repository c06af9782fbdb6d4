//! Cold runs of the stub: exec → its first write (`InitStarted`) → the
//! process's exit, Kiln's and QEMU's by turns, each timed to its `wait4`,
//! which also gives its CPU time and peak RSS.
use std::path::Path;
use std::process::Command;

use crate::kiln::Kiln;
use crate::qemu::{CPU_HOST_PVM, DEBUG_EXIT_STATUS, InitPort, Microvm, QEMU};
use crate::timing::{Exited, millis, run_to_exit};
use crate::{BenchError, Progress, paired, series};

use super::VmmConfig;
use super::report::Cold;

/// Kiln's command, as the report names it.
const KILN_COMMAND: &str = "kiln run --kernel STUB (exit mode: InitStarted, then an i8042 reset)";
/// QEMU's.
const QEMU_COMMAND: &str = "qemu-system-x86_64 -M microvm -kernel STUB (PVH entry; an \
                            isa-debug-exit on port 0x440 ends it at InitStarted)";

/// Kiln's cold runs, and QEMU's (by turns with them) when `config.qemu`.
pub fn run(
    config: &VmmConfig,
    kiln: &Kiln,
    work: &Path,
    progress: &dyn Progress,
) -> Result<(Cold, Option<Cold>), BenchError> {
    let kiln_run = |i: usize| kiln_cold(config, kiln, work, i);
    if !config.qemu {
        let (runs, _) = series(config.plan(), "cold (kiln)", progress, &kiln_run)?;
        return Ok((cold(KILN_COMMAND, runs), None));
    }
    let qemu_run = |i: usize| qemu_cold(config, work, i);
    let [(kiln_runs, _), (qemu_runs, _)] = paired(
        config.plan(),
        ["cold (kiln)", "cold (qemu)"],
        progress,
        [&kiln_run, &qemu_run],
    )?;
    Ok((
        cold(KILN_COMMAND, kiln_runs),
        Some(cold(QEMU_COMMAND, qemu_runs)),
    ))
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
        return Err(BenchError::Failed {
            what: what.to_string(),
            status: format!("{:?}, expected exit status {code}", exited.code),
            printed: std::fs::read_to_string(out)
                .unwrap_or_default()
                .trim()
                .to_string(),
        });
    }
    Ok(exited)
}
