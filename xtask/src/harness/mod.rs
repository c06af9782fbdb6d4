//! `cargo xtask vm-test`: end-to-end scenarios that boot real VMs.
//!
//! On a host with hardware KVM the scenarios run directly. Elsewhere (a PVM
//! host, where a Linux guest cannot boot) they run inside an "L1" Linux
//! under QEMU's software CPU with nested SVM, whose /dev/kvm is real: see
//! shared/guest-kernel/NOTES.md. Either way `tests/vm/run.sh` runs them and
//! every check prints one `KILN-TEST` line on the console.
use std::fs::{self, File};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::{apt, init, kernel, sh};

mod assets;
mod initramfs;
mod results;

pub use results::Summary;

const PACKAGES: &[&str] = &[
    "qemu-system-x86",
    "linux-image-cloud-amd64",
    "busybox-static",
    "e2fsprogs",
    "cpio",
];
/// Files in tests/vm/ that are not scenarios.
const NOT_SCENARIOS: [&str; 2] = ["run", "lib"];
/// Booting L1 under TCG and loading the modules.
const L1_BOOT_ALLOWANCE: Duration = Duration::from_secs(180);
/// Per scenario; TCG runs nested guests far slower than hardware.
const SCENARIO_ALLOWANCE: Duration = Duration::from_secs(300);

/// Runs the named scenarios (all when none are named) and returns what they
/// reported; fails unless every check passed and the run finished.
pub fn run(selected: &[String]) -> Result<Summary> {
    apt::ensure(PACKAGES)?;
    let scenarios = select(selected)?;
    let kernel = kernel::build()?;
    let guest_init = init::build()?;
    let out = sh::workspace_root().join("target/vm-test");
    let assets = assets::build(&out.join("assets"), &guest_init)?;
    let kiln = build_kiln()?;
    let host = kiln_vmm::host::detect();
    let log = out.join("console.log");
    let deadline = L1_BOOT_ALLOWANCE + SCENARIO_ALLOWANCE * scenarios.len() as u32;
    let mut command = if host.can_boot_linux() {
        eprintln!(
            "xtask: hardware KVM: running {} scenario(s) directly",
            scenarios.len()
        );
        direct(&kiln, &kernel, &guest_init, &assets, &scenarios, &out)
    } else {
        eprintln!(
            "xtask: {host}\nxtask: running {} scenario(s) in nested KVM under QEMU TCG",
            scenarios.len()
        );
        let payload = initramfs::Payload {
            kiln: &kiln,
            kernel: &kernel,
            guest_init: &guest_init,
            assets: &assets,
            scenarios: &scenarios,
            l1_version: &l1_kernel()?.1,
        };
        nested(&payload, &out)?
    };
    let summary = stream(&mut command, &log, deadline)?;
    for (name, reason) in &summary.failed {
        eprintln!("xtask: FAILED {name}: {reason}");
    }
    if !summary.done {
        eprintln!(
            "xtask: the run did not finish (no KILN-DONE); console log: {}",
            log.display()
        );
    }
    println!("{}", summary.closing_line());
    if !summary.success() {
        bail!("vm-test failed: {}", summary.closing_line());
    }
    Ok(summary)
}

/// The scenario names: the ones asked for (checked), or every tests/vm/*.sh.
fn select(selected: &[String]) -> Result<Vec<String>> {
    let dir = sh::workspace_root().join("tests/vm");
    let mut all: Vec<String> = fs::read_dir(&dir)
        .with_context(|| format!("cannot list {}", dir.display()))?
        .filter_map(|entry| {
            let name = entry.ok()?.file_name().into_string().ok()?;
            let stem = name.strip_suffix(".sh")?.to_string();
            (!NOT_SCENARIOS.contains(&stem.as_str())).then_some(stem)
        })
        .collect();
    all.sort();
    if selected.is_empty() {
        return Ok(all);
    }
    if let Some(unknown) = selected.iter().find(|name| !all.contains(name)) {
        bail!(
            "no scenario named {unknown:?}; the scenarios are: {}",
            all.join(", ")
        );
    }
    Ok(selected.to_vec())
}

fn build_kiln() -> Result<PathBuf> {
    let root = sh::workspace_root();
    sh::run(Command::new(env!("CARGO")).current_dir(root).args([
        "build",
        "--quiet",
        "--release",
        "-p",
        "kiln",
    ]))?;
    Ok(root.join("target/release/kiln"))
}

/// The scenarios on this host's own KVM.
fn direct(
    kiln: &Path,
    kernel: &Path,
    init: &Path,
    assets: &Path,
    scenarios: &[String],
    out: &Path,
) -> Command {
    let mut command = Command::new("sh");
    command
        .arg(sh::workspace_root().join("tests/vm/run.sh"))
        .args(scenarios)
        .env("KILN", kiln)
        .env("KILN_KERNEL", kernel)
        .env("KILN_INIT", init)
        .env("KILN_ASSETS", assets)
        .env("QEMU", "qemu-system-x86_64")
        .env("WORK_ROOT", out.join("work"));
    command
}

/// The scenarios inside L1: QEMU TCG with nested SVM, booting the packed
/// initramfs, whose /init runs them.
fn nested(payload: &initramfs::Payload, out: &Path) -> Result<Command> {
    let archive = out.join("l1.cpio");
    let started = Instant::now();
    initramfs::pack(&out.join("l1-root"), &archive, payload)?;
    let size = fs::metadata(&archive)?.len();
    eprintln!(
        "xtask: L1 initramfs {} MiB, packed in {:.1?}",
        size >> 20,
        started.elapsed()
    );
    let (vmlinuz, _) = l1_kernel()?;
    let mut command = Command::new("qemu-system-x86_64");
    command
        .args([
            "-accel",
            "tcg",
            "-cpu",
            "EPYC,+svm,+npt",
            "-m",
            "3072",
            "-smp",
            "1",
        ])
        .args([
            "-nographic",
            "-nodefaults",
            "-serial",
            "stdio",
            "-no-reboot",
        ])
        .arg("-kernel")
        .arg(vmlinuz)
        .arg("-initrd")
        .arg(archive)
        .args(["-append", "console=ttyS0 panic=-1 quiet"]);
    Ok(command)
}

/// The newest Debian cloud kernel in /boot and its version.
fn l1_kernel() -> Result<(PathBuf, String)> {
    let mut found: Vec<String> = fs::read_dir("/boot")?
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter_map(|name| Some(name.strip_prefix("vmlinuz-")?.to_string()))
        .filter(|version| version.ends_with("-cloud-amd64"))
        .collect();
    found.sort();
    let version = found
        .pop()
        .context("no /boot/vmlinuz-*-cloud-amd64: apt-get install linux-image-cloud-amd64")?;
    Ok((PathBuf::from(format!("/boot/vmlinuz-{version}")), version))
}

/// Runs `command`, echoing its output to stderr and `log` and parsing the
/// result lines; kills it at `deadline`.
fn stream(command: &mut Command, log: &Path, deadline: Duration) -> Result<Summary> {
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .with_context(|| format!("cannot start {}", sh::describe(command)))?;
    let pid = child.id();
    let (finished, watch) = mpsc::channel::<()>();
    let watchdog = std::thread::spawn(move || {
        if watch.recv_timeout(deadline) == Err(mpsc::RecvTimeoutError::Timeout) {
            eprintln!("xtask: no result after {deadline:?}: killing the run");
            // Killing by pid is safe here: the child is not reaped before
            // `finished` is sent, so the pid cannot have been reused.
            let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
        }
    });
    let mut log = File::create(log).with_context(|| format!("cannot create {}", log.display()))?;
    let mut summary = Summary::default();
    let stdout = child.stdout.take().expect("stdout is piped");
    for line in BufReader::new(stdout).split(b'\n') {
        let line = String::from_utf8_lossy(&line?).into_owned();
        eprintln!("{line}");
        writeln!(log, "{line}")?;
        summary.take_line(&line);
    }
    let _ = finished.send(());
    watchdog.join().expect("the watchdog does not panic");
    child.wait()?;
    Ok(summary)
}
