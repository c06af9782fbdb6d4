//! The cold scenario: a fresh VM booted from the image, to guest-init's
//! boot-timer write; on Kiln and on the peer.
use std::path::Path;
use std::process::Command;

use kiln_builder::store::StoredImage;
use kiln_vmm::devices::init_port::BOOT_TO_INIT_PREFIX;

use crate::kiln::Kiln;
use crate::qemu::{CPU_HOST, InitPort, Microvm, QEMU};
use crate::report::{Series, Vmm};
use crate::timing::{Event, Stream, Then, millis, time_to};
use crate::{BenchError, Config, Progress, Scenario, paired, timed_series};

/// Kiln's timer.
pub const KILN_TIMER: (&str, &str) = (
    "exec of `kiln run IMAGE --timing`",
    "its `boot-to-init:` line on stderr, printed when guest-init's boot-timer write traps to the VMM",
);
/// The peer's timer.
pub const QEMU_TIMER: (&str, &str) = (
    "exec of qemu-system-x86_64 -M microvm (same kernel, same root filesystem, flattened)",
    "the first byte on its stdout: guest-init's boot-timer write to an isa-debugcon on the same port",
);

/// `kiln run IMAGE --timing`, foreground, to the boot timer; the VM is
/// then stopped (SIGTERM), whatever its entrypoint would do next.
pub fn kiln(config: &Config, kiln: &Kiln, progress: &dyn Progress) -> Result<Series, BenchError> {
    let run = |_: usize| kiln_run(config, kiln);
    timed_series(
        config,
        Scenario::Cold,
        Vmm::Kiln,
        KILN_TIMER,
        progress,
        &run,
    )
}

/// Kiln's series and QEMU microvm's, run by turns ([`crate::paired`]):
/// QEMU on the image's filesystem, flattened once (untimed) into `work`,
/// to the same boot-timer write; QEMU is then stopped (SIGTERM).
pub fn with_qemu(
    config: &Config,
    kiln: &Kiln,
    image: &StoredImage,
    work: &Path,
    progress: &dyn Progress,
) -> Result<[Series; 2], BenchError> {
    progress.step(&format!("flattening {} for QEMU", config.image));
    let rootfs = work.join("peer-root.ext4");
    flatten(image, &config.image, &rootfs)?;
    let kiln_runs = |_: usize| kiln_run(config, kiln);
    let qemu_runs = |i: usize| qemu_run(config, &rootfs, work, i);
    let [(kiln_samples, kiln_wall), (qemu_samples, qemu_wall)] = paired(
        config.plan(),
        ["cold (kiln)", "cold (qemu)"],
        progress,
        [&kiln_runs, &qemu_runs],
    )?;
    let made = |vmm, timer, samples, wall| {
        Series::new(Scenario::Cold, vmm, timer, samples, wall).ok_or(BenchError::Runs(config.runs))
    };
    Ok([
        made(Vmm::Kiln, KILN_TIMER, kiln_samples, kiln_wall)?,
        made(Vmm::Qemu, QEMU_TIMER, qemu_samples, qemu_wall)?,
    ])
}

/// One `kiln run IMAGE --timing`; its latency in ms.
fn kiln_run(config: &Config, kiln: &Kiln) -> Result<f64, BenchError> {
    let mut cmd = kiln.command();
    cmd.args(["run", &config.image, "--timing"]).args([
        "--memory",
        &config.memory_mib.to_string(),
        "--vcpus",
        "1",
    ]);
    let timed = time_to(
        cmd,
        &format!("kiln run {}", config.image),
        Stream::Stderr,
        Event::LineStarting(BOOT_TO_INIT_PREFIX),
        Then::Terminate,
        config.limit,
    )?;
    Ok(millis(timed.elapsed))
}

/// QEMU run `i` on `rootfs`; its latency in ms.
fn qemu_run(config: &Config, rootfs: &Path, work: &Path, i: usize) -> Result<f64, BenchError> {
    let console = work.join(format!("peer-console-{i}.log"));
    let vm = Microvm {
        kernel: config.kernel.clone(),
        rootfs: Some(rootfs.to_path_buf()),
        cpu: CPU_HOST,
        memory_mib: config.memory_mib,
        vcpus: 1,
        throwaway_writes: true,
        extra_cmdline: String::new(),
        console: Some(console.clone()),
        init_port: InitPort::BootTimerOnStdout,
    };
    let mut cmd: Command = vm.command(Path::new(QEMU));
    // snapshot=on's temporary overlay: in the workspace, not /var/tmp.
    cmd.env("TMPDIR", work);
    let timed = time_to(
        cmd,
        &format!("{QEMU} -M microvm"),
        Stream::Stdout,
        Event::FirstByte,
        Then::Terminate,
        config.limit,
    )
    .map_err(|err| with_console(err, &console))?;
    Ok(millis(timed.elapsed))
}

/// The image's raw filesystem in `out`.
fn flatten(image: &StoredImage, name: &str, out: &Path) -> Result<(), BenchError> {
    let failed = |source: Box<dyn std::error::Error + Send + Sync>| BenchError::Flatten {
        image: name.to_string(),
        source,
    };
    let volume =
        kiln_vmm::volume::Volume::open(&image.image_path, None, kiln_image::DEFAULT_CACHE_BYTES)
            .map_err(|err| failed(err.into()))?;
    kiln_control::commit::flatten_to_file(&volume, out).map_err(|err| failed(err.into()))
}

/// A failed peer run's error, with the end of its console.
fn with_console(err: BenchError, console: &Path) -> BenchError {
    let Ok(text) = std::fs::read_to_string(console) else {
        return err;
    };
    let tail: Vec<&str> = text.lines().rev().take(8).collect();
    let tail: Vec<&str> = tail.into_iter().rev().collect();
    match err {
        BenchError::NoEvent {
            what,
            event,
            status,
            printed,
        } => BenchError::NoEvent {
            what,
            event,
            status,
            printed: format!("{printed}; its console: {}", tail.join(" | ")),
        },
        other => other,
    }
}
