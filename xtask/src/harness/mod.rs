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
mod host_steps;
mod initramfs;
mod results;

use host_steps::HostLink;
pub use results::Summary;

/// What the harness needs on the host; python3-pip is the pip with which
/// recipes/python-lambda's `[[build]]` step installs its pinned wheels
/// from PyPI, and python3-boto3 the client of the host step
/// tests/vm/host/boto3-invoke.
pub const PACKAGES: &[&str] = &[
    "qemu-system-x86",
    "linux-image-cloud-amd64",
    "busybox-static",
    "e2fsprogs",
    "cpio",
    // nft: the instances' tap filters (control/src/network/filter.rs).
    "nftables",
    "python3-pip",
    "python3-boto3",
    // tests/vm/containerd.sh: containerd and ctr run containers with
    // containerd-shim-kiln-v2 (runc is containerd's default runtime).
    "containerd",
    "runc",
    // tests/vm/cri.sh: the CNI plugins that give a CRI pod its network
    // namespace, and protoc, which kiln-cri-client's k8s-cri runs to
    // generate the CRI's gRPC code.
    "containernetworking-plugins",
    "protobuf-compiler",
    // tests/vm/containerd-net.sh: ip and tc make a pod's network namespace.
    "iproute2",
];
/// Files in tests/vm/ that are not scenarios.
const NOT_SCENARIOS: [&str; 3] = ["run", "lib", "store-faults"];
/// Booting L1 under TCG and loading the modules.
const L1_BOOT_ALLOWANCE: Duration = Duration::from_secs(180);
/// Per scenario; TCG runs nested guests far slower than hardware.
const SCENARIO_ALLOWANCE: Duration = Duration::from_secs(300);
/// tests/vm/run.sh's own limit on one scenario (`KILN_SCENARIO_TIMEOUT`):
/// a live test machine prints a line at least this often.
const SCENARIO_TIMEOUT: Duration = Duration::from_secs(600);
/// Silence past this means the test machine itself has stopped (its
/// clock with it, so run.sh's timeout never fires), not a scenario.
const SILENCE_LIMIT: Duration = Duration::from_secs(SCENARIO_TIMEOUT.as_secs() + 60);
/// How often a stopped test machine is replaced in one vm-test run.
const MAX_RESTARTS: u32 = 1;

/// What the test machine runs: a shell command line, with the binaries
/// and images of [`Prepared`] in the environment (KILN, KILN_KERNEL,
/// KILN_INIT, KILN_ASSETS, KILN_IMAGES, KILN_WORKSPACE, QEMU, WORK_ROOT, and XTASK for the
/// benchmark runner and report checks). The harness prints `KILN-DONE` after it.
pub struct Job {
    /// Words of the command; `{tests}` and `{xtask}` stand for where the
    /// scenarios and the xtask binary are on the test machine.
    pub command: Vec<String>,
    /// How long the job may take, on top of booting L1.
    pub allowance: Duration,
    /// How long it may print nothing before its machine counts as
    /// stopped ([`SILENCE_LIMIT`] for the scenarios; `None` for jobs that
    /// are quiet by design, such as benchmarks writing to files).
    pub silence_limit: Option<Duration>,
    /// L1's vCPUs. One for the scenarios: CI runs them beside other
    /// work, and `idle=poll` (below) keeps every vCPU of L1 busy. The
    /// build benchmark takes two, as many as this host has cores, since
    /// its goal is a build's time on a 2-core machine and a build
    /// compresses on every CPU.
    pub l1_vcpus: u32,
}

/// What every job needs, built on the host.
pub struct Prepared {
    kernel: PathBuf,
    guest_init: PathBuf,
    assets: PathBuf,
    /// The image store (`$KILN_HOME/images`) the recipes were built into.
    images: PathBuf,
    /// Whether a scenario builds recipes/debian: that recipe has VM steps,
    /// so it is built where the scenario runs, from its parent image
    /// (`debian-base`, built here into [`Prepared::images`]).
    debian: bool,
    kiln: PathBuf,
    out: PathBuf,
}

/// The scenario that builds recipes/debian, for which [`prepare`] makes
/// the Debian base and its image.
pub const DEBIAN_SCENARIO: &str = "build-debian";

/// Installs packages and builds the kernel, guest-init, images and `kiln`;
/// with `debian`, the Debian base and the image of it recipes/debian
/// starts from too.
pub fn prepare(debian: bool) -> Result<Prepared> {
    apt::ensure(PACKAGES)?;
    let kernel = kernel::build()?;
    let guest_init = init::build()?;
    let out = sh::workspace_root().join("target/vm-test");
    let kiln = build_kiln()?;
    let assets = assets::build(&out.join("assets"), &guest_init)?;
    let kiln_home = out.join("kiln-home");
    assets::build_recipes(&kiln, &guest_init, &kiln_home)?;
    if debian {
        crate::debian::base()?;
        assets::build_debian_base(&kiln, &guest_init, &kiln_home)?;
    }
    Ok(Prepared {
        kernel,
        guest_init,
        assets,
        images: kiln_home.join("images"),
        debian,
        kiln,
        out,
    })
}

/// Runs `job` on hardware KVM directly, or inside L1 elsewhere, streaming
/// its console; returns the console's lines and the parsed result lines.
pub fn run_job(prepared: &Prepared, job: &Job) -> Result<(Vec<String>, Summary)> {
    let host = kiln_vmm::host::detect();
    let log = prepared.out.join("console.log");
    // Host steps run on this host only when the scenarios do not.
    let (mut command, host_link) = if host.can_boot_linux() {
        eprintln!("xtask: hardware KVM: running directly");
        (direct(prepared, job)?, None)
    } else {
        eprintln!("xtask: {host}\nxtask: running in nested KVM under QEMU TCG");
        let link = HostLink::new()?;
        (nested(prepared, job, &link)?, Some(link))
    };
    let deadline = L1_BOOT_ALLOWANCE + job.allowance;
    stream(
        &mut command,
        &log,
        deadline,
        job.silence_limit,
        host_link.as_ref(),
    )
}

/// `cargo xtask vm-test`: runs the named scenarios (all when none are
/// named); fails unless every check passed and the run finished.
pub fn vm_test(selected: &[String]) -> Result<Summary> {
    let mut remaining = select(selected)?;
    let prepared = prepare(remaining.iter().any(|s| s == DEBIAN_SCENARIO))?;
    let mut summary = Summary::default();
    for restart in 0..=MAX_RESTARTS {
        let mut command = fault_seed()?;
        command.extend(["sh".to_string(), "{tests}/run.sh".to_string()]);
        command.extend(remaining.iter().cloned());
        let job = Job {
            command,
            allowance: SCENARIO_ALLOWANCE * remaining.len() as u32,
            silence_limit: Some(SILENCE_LIMIT),
            l1_vcpus: 1,
        };
        let (lines, run) = run_job(&prepared, &job)?;
        let stalled_in = run.stalled.then(|| current_scenario(&lines)).flatten();
        let Some(stalled_in) = stalled_in.filter(|_| restart < MAX_RESTARTS) else {
            summary.absorb(run);
            break;
        };
        // Every check of the scenario runs again, whole, in a fresh L1:
        // what it reported before the stop is dropped, not counted twice.
        eprintln!(
            "xtask: the test machine printed nothing for {SILENCE_LIMIT:?} in scenario {stalled_in} \
             (its clock stopped: see `nested`); starting a new one from {stalled_in}"
        );
        summary.absorb(run.without_scenario(&stalled_in));
        let at = remaining.iter().position(|s| *s == stalled_in).unwrap_or(0);
        remaining.drain(..at);
    }
    for (name, reason) in &summary.failed {
        eprintln!("xtask: FAILED {name}: {reason}");
    }
    if !summary.done {
        eprintln!(
            "xtask: the run did not finish (no KILN-DONE); console log: {}",
            prepared.out.join("console.log").display()
        );
    }
    println!("{}", summary.closing_line());
    if !summary.success() {
        bail!("vm-test failed: {}", summary.closing_line());
    }
    Ok(summary)
}

/// `env KILN_FAULT_SEED=N`, when this host has it set, for the job's
/// command line: the fault scenarios' kill points replayed (tests/vm/lib.sh,
/// `fault_seed`), nested too, where L1 does not inherit this environment.
fn fault_seed() -> Result<Vec<String>> {
    let Ok(seed) = std::env::var("KILN_FAULT_SEED") else {
        return Ok(Vec::new());
    };
    if seed.is_empty() || !seed.bytes().all(|b| b.is_ascii_digit()) {
        bail!("KILN_FAULT_SEED={seed:?}: expected a number, a seed a fault scenario printed");
    }
    Ok(vec!["env".to_string(), format!("KILN_FAULT_SEED={seed}")])
}

/// The scenario a run was in when it ended: its last `KILN-SCENARIO` line.
fn current_scenario(lines: &[String]) -> Option<String> {
    const MARKER: &str = "KILN-SCENARIO ";
    lines.iter().rev().find_map(|line| {
        let at = line.find(MARKER)?;
        Some(line[at + MARKER.len()..].trim_end().to_string())
    })
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

/// `cargo build --release` of `kiln` and the programs the scenarios run
/// beside it, statically linked (`+crt-static`, as guest-init is); returns
/// `kiln`. Every VM start execs `kiln` two or three times (the command,
/// an instance's supervisor, the VM process), and a static binary skips
/// the dynamic loader: on this host about 0.4 ms of CPU and 0.6 ms of
/// wall time less a start, and 1 MiB less resident (libc, libm, ld.so).
pub fn build_kiln() -> Result<PathBuf> {
    // kiln-cri-client's k8s-cri runs protoc in its build script.
    apt::ensure(&["protobuf-compiler"])?;
    init::build_static(&[
        "--release",
        "-p",
        "kiln",
        // containerd-shim-kiln-v2, beside kiln (tests/vm/containerd.sh).
        "-p",
        "kiln-shim",
        // The CRI client of tests/vm/cri.sh.
        "-p",
        "kiln-cri-client",
    ])?;
    let release = sh::workspace_root().join("target").join(init::TARGET);
    Ok(release.join("release/kiln"))
}

/// The job on this host's own KVM.
fn direct(prepared: &Prepared, job: &Job) -> Result<Command> {
    let tests = sh::workspace_root().join("tests/vm");
    let xtask = std::env::current_exe().context("cannot find the xtask binary")?;
    let words = expand(
        &job.command,
        &tests.display().to_string(),
        &xtask.display().to_string(),
    );
    let (serve_port, port) = host_steps::direct_environment();
    let mut command = Command::new("sh");
    command
        .env(serve_port, port)
        .arg("-c")
        .arg(format!("{}; echo KILN-DONE", words.join(" ")))
        .env("KILN", &prepared.kiln)
        .env("KILN_KERNEL", &prepared.kernel)
        .env("KILN_INIT", &prepared.guest_init)
        .env("KILN_ASSETS", &prepared.assets)
        .env("KILN_IMAGES", &prepared.images)
        .env("KILN_WORKSPACE", sh::workspace_root())
        .env("QEMU", "qemu-system-x86_64")
        .env("XTASK", &xtask)
        .env("WORK_ROOT", prepared.out.join("work"));
    Ok(command)
}

/// Replaces the `{tests}` and `{xtask}` placeholders of a job's words.
fn expand(words: &[String], tests: &str, xtask: &str) -> Vec<String> {
    words
        .iter()
        .map(|w| w.replace("{tests}", tests).replace("{xtask}", xtask))
        .collect()
}

/// The job inside L1: QEMU TCG with nested SVM, booting the packed
/// initramfs, whose /init runs it; `link` is its NIC's way to this host.
fn nested(prepared: &Prepared, job: &Job, link: &HostLink) -> Result<Command> {
    let archive = prepared.out.join("l1.cpio");
    let started = Instant::now();
    let xtask = std::env::current_exe().context("cannot find the xtask binary")?;
    let payload = initramfs::Payload {
        kiln: &prepared.kiln,
        xtask: &xtask,
        kernel: &prepared.kernel,
        guest_init: &prepared.guest_init,
        assets: &prepared.assets,
        images: &prepared.images,
        debian_recipe: prepared.debian,
        job: &expand(&job.command, initramfs::TESTS_DIR, initramfs::XTASK_PATH).join(" "),
        host_link_env: &host_steps::l1_environment(),
        l1_version: &l1_kernel()?.1,
    };
    initramfs::pack(&prepared.out.join("l1-root"), &archive, &payload)?;
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
            &job.l1_vcpus.to_string(),
        ])
        .args([
            "-nographic",
            "-nodefaults",
            "-serial",
            "stdio",
            "-no-reboot",
        ])
        .args(link.qemu_args())
        .arg("-kernel")
        .arg(vmlinuz)
        .arg("-initrd")
        .arg(archive)
        // idle=poll: L1 never halts. Under TCG with nested SVM, L1 sometimes
        // stayed halted for good (QEMU asleep, L1's own timers never
        // waking it: a lost wakeup), in long disk benchmarks and once in
        // volume-crash; an L1 that polls cannot sleep through its timer.
        // nohz=off highres=off: L1 still lost its timer now and then as
        // nested guests started (no line for minutes, even from `sleep
        // 30` loops; twice in three full runs): a one-shot timer
        // interrupt lost is never re-armed, so every sleeper sleeps for
        // good. A periodic tick from the local APIC in periodic mode
        // comes again after a lost one.
        .args([
            "-append",
            "console=ttyS0 panic=-1 quiet idle=poll nohz=off highres=off",
        ]);
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

/// Runs `command`, echoing its output to stderr and `log`, parsing the
/// result lines and starting the host steps they ask `host_link` for;
/// kills it at `deadline`, or after `silence_limit` with no line (then
/// the summary says it `stalled`).
fn stream(
    command: &mut Command,
    log: &Path,
    deadline: Duration,
    silence_limit: Option<Duration>,
    host_link: Option<&HostLink>,
) -> Result<(Vec<String>, Summary)> {
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .with_context(|| format!("cannot start {}", sh::describe(command)))?;
    let pid = child.id();
    // A message per line, and a disconnect at the end.
    let (line_seen, watch) = mpsc::channel::<()>();
    let started = Instant::now();
    let watchdog = std::thread::spawn(move || {
        let stalled = loop {
            let left = deadline.saturating_sub(started.elapsed());
            let wait = silence_limit.map_or(left, |silence| silence.min(left));
            match watch.recv_timeout(wait) {
                Ok(()) => continue,
                Err(mpsc::RecvTimeoutError::Disconnected) => return false,
                // Stalled when the silence ran out before the deadline.
                Err(mpsc::RecvTimeoutError::Timeout) => break wait < left,
            }
        };
        if stalled {
            eprintln!("xtask: no line for {silence_limit:?}: killing the run");
        } else {
            eprintln!("xtask: no result after {deadline:?}: killing the run");
        }
        // Killing by pid is safe here: the child is not reaped before the
        // channel is dropped, so the pid cannot have been reused.
        let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
        stalled
    });
    let mut log = File::create(log).with_context(|| format!("cannot create {}", log.display()))?;
    let mut summary = Summary::default();
    let mut lines = Vec::new();
    let stdout = child.stdout.take().expect("stdout is piped");
    for line in BufReader::new(stdout).split(b'\n') {
        let line = String::from_utf8_lossy(&line?).into_owned();
        eprintln!("{line}");
        writeln!(log, "{line}")?;
        summary.take_line(&line);
        if let Some(link) = host_link {
            link.take_line(&line);
        }
        lines.push(line);
        let _ = line_seen.send(());
    }
    drop(line_seen);
    summary.stalled = watchdog.join().expect("the watchdog does not panic");
    child.wait()?;
    Ok((lines, summary))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn quiet_after_one_line() -> Command {
        let mut command = Command::new("sh");
        // `exec`: the killed pid is the one holding the pipe.
        command.args(["-c", "echo 'KILN-SCENARIO quiet'; exec sleep 30"]);
        command
    }

    #[test]
    fn a_silent_run_is_killed_as_stalled_in_its_scenario() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("console.log");
        let limit = Some(Duration::from_millis(500));
        let (lines, summary) = stream(
            &mut quiet_after_one_line(),
            &log,
            Duration::from_secs(60),
            limit,
            None,
        )
        .unwrap();
        assert!(summary.stalled && !summary.done);
        assert_eq!(current_scenario(&lines).as_deref(), Some("quiet"));
    }

    #[test]
    fn a_run_past_its_deadline_is_killed_but_not_stalled() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("console.log");
        let deadline = Duration::from_millis(500);
        let (_, summary) = stream(&mut quiet_after_one_line(), &log, deadline, None, None).unwrap();
        assert!(!summary.stalled && !summary.done);
    }
}
