//! Restores of a beating stub, to its first heartbeat after the restore:
//! through `kiln snapshot restore` (a detached instance of the smallest
//! image the store takes, the stub as its kernel), and through a VM
//! process alone (`kiln __vm` with a definition whose boot is a snapshot
//! of a diskless stub VM), which the clones are too.
use std::collections::HashSet;
use std::ffi::OsString;
use std::fs;
use std::io::{BufRead, BufReader, Read};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use kiln_builder::build::Built;
use kiln_builder::store::Store;
use kiln_control::instance::Registry;
use kiln_vmm::config::{Boot, VmConfig};
use kiln_vmm::rpc::{
    self, AfterSnapshot, ControlClient, ControlError, ControlReply, ControlRequest,
};
use kiln_vmm::trace::{self, TRACE_ENV};

use crate::kiln::Kiln;
use crate::restore::{new_instance, timed_restore};
use crate::timing::{Event, Stream, Then, Watchdog, millis, signal, time_to_and};
use crate::{BenchError, Plan, Progress, io_err, series};

use super::VmmConfig;
use super::breakdown::{self, Milestone, Run};
use super::report::{Clones, Latency, Stage};

/// What the stub writes on COM1 each heartbeat.
pub(super) const HEARTBEAT: &str = "beat";
/// The kernel command line word that makes the stub beat.
pub(super) const BEAT_CMDLINE: &str = "kiln.stub=beat";
/// How often a console log is looked at for the heartbeat.
const POLL: Duration = Duration::from_micros(200);

/// `kiln snapshot restore`'s timer.
pub const TIMER: (&str, &str) = (
    "exec of `kiln snapshot restore SNAPSHOT --name NAME --network none`",
    "the first heartbeat in the new instance's console.log (polled every 0.2 ms)",
);
/// The VM process's timer.
pub const VM_TIMER: (&str, &str) = (
    "exec of `kiln __vm --config FILE` whose boot is the snapshot",
    "the first heartbeat line on its stdout (its COM1)",
);
/// What the clones are, for the report.
pub const CLONE_PATH: &str = "vm-process: each clone is `kiln __vm` restoring the diskless \
    stub's snapshot to its first heartbeat, then SIGKILL, its exit waited for by a thread of \
    its own (as a function's clone ends); the instance path (the restore above) runs three \
    processes and the registry per clone";

/// The recipe of the stub's image: an instance needs an image for its root
/// volume, which the stub never reads. Its /sbin/init is the stub's own
/// file, so that the benchmark needs no guest-init: no guest runs it.
const RECIPE: &str = r#"# kiln bench vmm: the stub guest's instances' root volume, never read.
free = "1M"

[image]
name = "bench-stub"
version = "1.0.0"
description = "The smallest image: the root volume of `kiln bench vmm`'s stub instances"

[run]
entrypoint = ["/sbin/init"]
"#;
/// The image's NAME:VERSION.
const IMAGE: &str = "bench-stub:1.0.0";
/// The beating instance whose snapshot is restored.
const SOURCE: &str = "bench-beat";

/// Builds the stub's image, runs a beating stub instance, snapshots it
/// and terminates it (all untimed); returns the snapshot's directory.
pub fn instance_snapshot(
    config: &VmmConfig,
    kiln: &Kiln,
    work: &Path,
    progress: &dyn Progress,
) -> Result<PathBuf, BenchError> {
    progress.step("building the stub's image");
    let recipe = work.join("stub-image/recipe.toml");
    let dir = recipe.parent().expect("a file in a directory");
    fs::create_dir_all(dir).map_err(io_err(dir))?;
    fs::write(&recipe, RECIPE).map_err(io_err(&recipe))?;
    let build_err = |source| BenchError::Build {
        recipe: recipe.clone(),
        source: Box::new(source),
    };
    // The recipe has no tests: a staged image is published as it is.
    let store = Store::new(kiln.home());
    match kiln_builder::build::build(&recipe, &store, &config.stub, false, None, &mut |_| {})
        .map_err(build_err)?
    {
        Built::Cached(_) => {}
        Built::Staged(staged) => {
            staged.publish(Some(Vec::new())).map_err(build_err)?;
        }
    }
    progress.step("starting a beating stub instance");
    let memory = config.memory_mib.to_string();
    kiln.output(&[
        "run",
        IMAGE,
        "--detach",
        "--name",
        SOURCE,
        "--network",
        "none",
        "--cmdline",
        BEAT_CMDLINE,
        "--memory",
        &memory,
        "--vcpus",
        "1",
    ])?;
    kiln.track(SOURCE);
    let registry = Registry::new(kiln.home());
    let console = registry
        .find(SOURCE)
        .map_err(|source| BenchError::Instance {
            name: SOURCE.into(),
            source,
        })?
        .console_log();
    let started = Instant::now();
    while !beaten(&console) {
        if started.elapsed() > config.limit {
            return Err(BenchError::NoHeartbeat {
                what: format!("instance {SOURCE}"),
                limit: config.limit,
                printed: fs::read_to_string(&console).unwrap_or_default(),
            });
        }
        std::thread::sleep(POLL);
    }
    progress.step("snapshotting it");
    let snapshot = work.join("instance-snapshot");
    kiln.output(&["snapshot", "create", SOURCE, &snapshot.to_string_lossy()])?;
    kiln.terminate(SOURCE)?;
    Ok(snapshot)
}

/// Whether the console log `file` shows a heartbeat.
fn beaten(file: &Path) -> bool {
    fs::read_to_string(file).is_ok_and(|text| text.contains(HEARTBEAT))
}

/// `kiln snapshot restore` of `snapshot`, one at a time, each to its
/// first heartbeat, then terminated (untimed); with the breakdown of
/// where the time went.
pub fn instance_restores(
    config: &VmmConfig,
    kiln: &Kiln,
    snapshot: &Path,
    progress: &dyn Progress,
) -> Result<(Latency, Vec<Stage>), BenchError> {
    let run = |i: usize| {
        let name = format!("restore-{i}");
        let trace = snapshot.with_file_name(format!("trace-restore-{i}"));
        let mut cmd = kiln.command();
        cmd.args(["snapshot", "restore"])
            .arg(snapshot)
            .args(["--name", &name, "--network", "none"])
            .env(TRACE_ENV, &trace);
        let what = format!("kiln snapshot restore --name {name}");
        let limit = config.limit;
        let ((elapsed, beat_ns), spawned_ns) = timed_restore(
            kiln,
            cmd,
            &what,
            &name,
            limit,
            |known, restoring, started| {
                heartbeat_of_new(kiln, &name, known, restoring, started, limit)
            },
            |(), printed| BenchError::NoHeartbeat {
                what: what.clone(),
                limit,
                printed,
            },
        )?;
        kiln.terminate(&name)?;
        let run = Run::read(&trace, spawned_ns, beat_ns)?;
        Ok((millis(elapsed), run))
    };
    let (runs, _) = series(
        config.plan(),
        "restore (kiln snapshot restore)",
        progress,
        &run,
    )?;
    latency_and_breakdown(TIMER, &breakdown::instance_path(), runs)
}

/// Looks for the new instance `name` (its directory not among `known`),
/// then reads its console log until a heartbeat: its time since
/// `started`, and the clock's (for the trace). Fails at `limit`, or once
/// `restoring` (the `kiln` command) has failed.
fn heartbeat_of_new(
    kiln: &Kiln,
    name: &str,
    mut known: HashSet<OsString>,
    restoring: &mut Child,
    started: Instant,
    limit: Duration,
) -> Result<(Duration, u64), ()> {
    let registry = Registry::new(kiln.home());
    let mut console = None;
    while started.elapsed() < limit {
        if console.is_none() {
            console = new_instance(kiln, &registry, &mut known, name).map(|i| i.console_log());
        }
        if console.as_deref().is_some_and(beaten) {
            return Ok((started.elapsed(), trace::monotonic_ns()));
        }
        if let Ok(Some(status)) = restoring.try_wait()
            && !status.success()
        {
            break;
        }
        std::thread::sleep(POLL);
    }
    Err(())
}

/// The runs' latencies under `timer`, and their stages along `path`.
fn latency_and_breakdown(
    timer: (&str, &str),
    path: &[Milestone],
    runs: Vec<(f64, Run)>,
) -> Result<(Latency, Vec<Stage>), BenchError> {
    let (samples, traces): (Vec<f64>, Vec<Run>) = runs.into_iter().unzip();
    let runs = samples.len();
    let latency = Latency::new(timer, samples).ok_or(BenchError::Runs(runs))?;
    Ok((latency, breakdown::stages(path, &traces)))
}

/// A diskless stub VM's snapshot, and the definition that restores it.
pub struct VmSnapshot {
    /// The snapshot's directory.
    pub dir: PathBuf,
    /// The VM definition whose boot is the snapshot.
    pub definition: PathBuf,
}

/// A diskless VM process booting the stub with `kiln.stub=beat`,
/// snapshotted at its first heartbeat (and ended by the snapshot).
pub fn vm_snapshot(
    config: &VmmConfig,
    kiln: &Kiln,
    work: &Path,
    progress: &dyn Progress,
) -> Result<VmSnapshot, BenchError> {
    progress.step("snapshotting a beating stub VM process");
    let mut vm = beating_stub(config);
    let boot = work.join("vm-boot.json");
    vm.save(&boot)?;
    let dir = work.join("vm-snapshot");
    fs::create_dir(&dir).map_err(io_err(&dir))?;
    snapshot_at_heartbeat(kiln, &boot, &dir, config.limit)?
        .check("kiln __vm (the stub, beating)", config.limit)?;
    vm.boot = Boot::Snapshot {
        dir: dir.clone(),
        consume: false,
    };
    let definition = work.join("vm-restore.json");
    vm.save(&definition)?;
    Ok(VmSnapshot { dir, definition })
}

/// The definition of a diskless VM booting the stub, beating.
fn beating_stub(config: &VmmConfig) -> VmConfig {
    VmConfig {
        boot: Boot::Kernel(config.stub.clone()),
        disks: Vec::new(),
        vcpus: 1,
        memory_mib: config.memory_mib,
        extra_cmdline: BEAT_CMDLINE.into(),
        seccomp: true,
        vsock: None,
        net: None,
        announce_boot: false,
    }
}

/// How a VM process asked for a snapshot at its first heartbeat ended.
struct SnapshotRun {
    /// Its exit, or why it could not be waited for.
    status: std::io::Result<ExitStatus>,
    /// Whether the watchdog killed it.
    killed: bool,
    /// The snapshot request's reply; `None` when it never beat.
    reply: Option<Result<ControlReply, ControlError>>,
    /// Its stderr.
    printed: String,
}

/// A VM process booting the definition `boot`, asked at its first
/// heartbeat to snapshot into `dir` and stop; waited for to its end,
/// killed past `limit`.
fn snapshot_at_heartbeat(
    kiln: &Kiln,
    boot: &Path,
    dir: &Path,
    limit: Duration,
) -> Result<SnapshotRun, BenchError> {
    let (mut child, mut control) = spawn_vm(kiln, boot, None)?;
    let watchdog = Watchdog::start(child.id(), limit);
    let mut stdout = BufReader::new(child.stdout.take().expect("piped"));
    let beat = first_heartbeat(&mut stdout);
    // The console goes on until the snapshot ends the VM: drained meanwhile.
    let drain = std::thread::spawn(move || std::io::copy(&mut stdout, &mut std::io::sink()));
    let request = ControlRequest::Snapshot {
        dir: dir.to_path_buf(),
        copy_root: false,
        then: AfterSnapshot::Stop,
    };
    let reply = beat.then(|| control.call(&request, limit));
    if !matches!(&reply, Some(Ok(r)) if r.error.is_none()) {
        // Snapshotted, the VM ends by itself; otherwise it is ended here.
        signal(child.id(), libc::SIGTERM);
    }
    let status = child.wait();
    let killed = watchdog.finish();
    let _ = drain.join();
    let printed = read_all(child.stderr.take());
    Ok(SnapshotRun {
        status,
        killed,
        reply,
        printed,
    })
}

impl SnapshotRun {
    /// `Ok` once the snapshot is taken; else `what`'s error: the VM
    /// process could not be waited for, ran past `limit`, never beat, or
    /// the request failed.
    fn check(self, what: &str, limit: Duration) -> Result<(), BenchError> {
        let printed = self.printed;
        self.status.map_err(|source| BenchError::Spawn {
            what: what.into(),
            source,
        })?;
        let reply = match (self.killed, self.reply) {
            (true, _) => {
                return Err(BenchError::Timeout {
                    what: what.into(),
                    limit,
                    printed,
                });
            }
            (false, None) => {
                return Err(BenchError::NoHeartbeat {
                    what: what.into(),
                    limit,
                    printed,
                });
            }
            (false, Some(reply)) => reply.map_err(|source| BenchError::Control {
                what: format!("{what}: snapshot"),
                source,
            })?,
        };
        match reply.error {
            Some(error) => Err(BenchError::Failed {
                what: format!("{what}: snapshot"),
                status: error,
                printed,
            }),
            None => Ok(()),
        }
    }
}

/// Reads lines until a heartbeat; false at the end of the output.
pub(super) fn first_heartbeat(out: &mut impl BufRead) -> bool {
    let mut line = String::new();
    loop {
        line.clear();
        match out.read_line(&mut line) {
            Ok(0) | Err(_) => return false,
            Ok(_) if line.starts_with(HEARTBEAT) => return true,
            Ok(_) => {}
        }
    }
}

fn read_all(pipe: Option<impl Read>) -> String {
    let mut text = String::new();
    if let Some(mut pipe) = pipe {
        let _ = pipe.read_to_string(&mut text);
    }
    text.trim().to_string()
}

/// `kiln __vm --config DEFINITION`, its stdout and stderr piped, this
/// process its supervisor, with a new control channel (its client
/// returned); `KILN_TRACE=trace` if given.
fn spawn_vm(
    kiln: &Kiln,
    definition: &Path,
    trace: Option<&Path>,
) -> Result<(Child, ControlClient), BenchError> {
    let (client, vm_end) = rpc::channel().map_err(|source| BenchError::Control {
        what: "kiln __vm: the control channel".into(),
        source,
    })?;
    let mut cmd = vm_command(kiln, definition, &vm_end, trace);
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| BenchError::Spawn {
            what: "kiln __vm".into(),
            source,
        })?;
    Ok((child, client))
}

/// The command of a VM process with `vm_end` as its control channel,
/// which it inherits (in the child only: other threads' children must
/// not get it).
fn vm_command(kiln: &Kiln, definition: &Path, vm_end: &OwnedFd, trace: Option<&Path>) -> Command {
    let fd = vm_end.as_raw_fd();
    let mut cmd = kiln.command();
    cmd.arg("__vm")
        .arg("--config")
        .arg(definition)
        .args(["--control-fd", &fd.to_string()])
        .args(["--supervisor", &std::process::id().to_string()]);
    if let Some(trace) = trace {
        cmd.env(TRACE_ENV, trace);
    }
    let inherit = move || {
        // SAFETY: F_SETFD only changes the flags of a descriptor this
        // process keeps open until after the spawn.
        if unsafe { libc::fcntl(fd, libc::F_SETFD, 0) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    };
    // SAFETY: between fork and exec `inherit` makes one fcntl call, which
    // is async-signal-safe, and allocates nothing.
    unsafe { cmd.pre_exec(inherit) };
    cmd
}

/// One VM-process restore, to its first heartbeat.
struct Restored {
    ms: f64,
    /// Its memory at the heartbeat.
    memory: Memory,
    /// Its trace, when it was traced.
    run: Option<Run>,
}

/// A VM process restoring `vm`, timed to its first heartbeat, then ended
/// as `then` says; traced into `trace` if given.
fn restore_vm(
    config: &VmmConfig,
    kiln: &Kiln,
    vm: &VmSnapshot,
    trace: Option<&Path>,
    then: Then,
) -> Result<Restored, BenchError> {
    let (_client, vm_end) = rpc::channel().map_err(|source| BenchError::Control {
        what: "kiln __vm: the control channel".into(),
        source,
    })?;
    let cmd = vm_command(kiln, &vm.definition, &vm_end, trace);
    let mut memory_at_beat = Memory::default();
    let mut beat_ns = 0;
    let spawned_ns = trace::monotonic_ns();
    let timed = time_to_and(
        cmd,
        "kiln __vm (restore)",
        Stream::Stdout,
        Event::LineStarting(HEARTBEAT),
        then,
        config.limit,
        |pid| {
            beat_ns = trace::monotonic_ns();
            memory_at_beat = memory(pid, &vm.dir);
        },
    )?;
    drop(vm_end);
    let run = trace
        .map(|trace| Run::read(trace, spawned_ns, beat_ns))
        .transpose()?;
    Ok(Restored {
        ms: millis(timed.elapsed),
        memory: memory_at_beat,
        run,
    })
}

/// VM-process restores of `vm`, one at a time, with their breakdown.
pub fn vm_restores(
    config: &VmmConfig,
    kiln: &Kiln,
    vm: &VmSnapshot,
    progress: &dyn Progress,
) -> Result<(Latency, Vec<Stage>), BenchError> {
    let run = |i: usize| {
        let trace = vm.dir.with_file_name(format!("trace-vm-{i}"));
        // Each run ends before the next begins: the restores never
        // overlap another's teardown.
        let restored = restore_vm(config, kiln, vm, Some(&trace), Then::Terminate)?;
        Ok((restored.ms, restored.run.unwrap_or_default()))
    };
    let (runs, _) = series(config.plan(), "restore (kiln __vm)", progress, &run)?;
    latency_and_breakdown(VM_TIMER, &breakdown::vm_path(), runs)
}

/// `config.runs` clones (VM-process restores of `vm`), `concurrency` at a
/// time, after `config.warmup` untimed ones; each is killed at its
/// heartbeat and its teardown left to a thread of its own, as a
/// function's clone is.
pub fn clones(
    config: &VmmConfig,
    kiln: &Kiln,
    vm: &VmSnapshot,
    concurrency: usize,
    progress: &dyn Progress,
) -> Result<Clones, BenchError> {
    let plan = Plan {
        concurrency,
        ..config.plan()
    };
    let run = |_: usize| {
        let restored = restore_vm(config, kiln, vm, None, Then::Kill)?;
        Ok((restored.ms, restored.memory))
    };
    let label = format!("clones, {concurrency} at a time");
    let (runs, wall_s) = series(plan, &label, progress, &run)?;
    let (samples, memory): (Vec<f64>, Vec<Memory>) = runs.into_iter().unzip();
    let median = |of: fn(&Memory) -> u64| {
        let mut values: Vec<u64> = memory.iter().map(of).collect();
        values.sort_unstable();
        values[(values.len() - 1) / 2]
    };
    Ok(Clones {
        concurrency,
        clones_per_s: samples.len() as f64 / wall_s,
        wall_s,
        latency: Latency::new(VM_TIMER, samples).ok_or(BenchError::Runs(config.runs))?,
        rss_kib_p50: median(|m| m.rss),
        vmm_rss_kib_p50: median(|m| m.vmm_rss),
        vmm_anon_kib_p50: median(|m| m.vmm_anon),
    })
}

/// A VM process's memory at its first heartbeat, in KiB.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Memory {
    /// Its resident set (VmRSS): every mapping's `Rss`.
    pub rss: u64,
    /// The same without the guest memory (its mappings of the snapshot's
    /// memory file).
    pub vmm_rss: u64,
    /// Of that, the anonymous pages (heap, stacks, KVM's run structures):
    /// what this VM process alone holds; the rest is file pages (the
    /// `kiln` binary, libc) shared with every other `kiln` process.
    pub vmm_anon: u64,
}

/// Process `pid`'s [`Memory`]; zeros when /proc cannot be read. The
/// guest memory is any mapping of a file in `snapshot`.
fn memory(pid: u32, snapshot: &Path) -> Memory {
    let Ok(smaps) = fs::read_to_string(format!("/proc/{pid}/smaps")) else {
        return Memory::default();
    };
    let mut memory = Memory::default();
    let mut in_guest = false;
    for line in smaps.lines() {
        let mut words = line.split_whitespace();
        let (Some(first), Some(second)) = (words.next(), words.next()) else {
            continue;
        };
        let kib = || second.parse::<u64>().unwrap_or(0);
        match first {
            "Rss:" => {
                memory.rss += kib();
                if !in_guest {
                    memory.vmm_rss += kib();
                }
            }
            "Anonymous:" if !in_guest => memory.vmm_anon += kib(),
            // A mapping's header: its address range first, its path last.
            range if range.contains('-') && !range.ends_with(':') => {
                in_guest = line
                    .split_whitespace()
                    .nth(5)
                    .is_some_and(|path| Path::new(path).starts_with(snapshot));
            }
            _ => {}
        }
    }
    memory
}
