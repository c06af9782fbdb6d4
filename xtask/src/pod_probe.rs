//! `xtask pod-probe` (used by vm-test pod-disk): the VMM and guest-init
//! half of a pod, without containerd. It boots a container VM (`kiln
//! __vm`, with a control channel, as the shim's) whose second
//! disk is an empty drive, fills the drive with `attachdisk`, and runs
//! processes through guest-init's exec port with and without
//! `root: /dev/vdb`, then gives the drive back (guest-init's release of
//! the root, then `detachdisk`) and fills it again with another disk,
//! printing one line per step for the scenario to check.
use std::os::fd::{AsFd, AsRawFd};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode};
use std::time::Duration;

use anyhow::Context;
use guest_init::exec::{CONTAINER_CMDLINE_FLAG, ExecRequest, WindowSize};
use kiln_control::instance::exec::{ExecError, Session, release_root};
use kiln_vmm::config::{Boot, CacheAccess, DiskConfig, DiskSource, VmConfig, VsockConfig};
use kiln_vmm::report::one_line;
use kiln_vmm::rpc::{self, AfterSnapshot, ControlClient, ControlRequest};
use kiln_vmm::volume::Volume;

/// The attached volume's cache of decompressed chunks.
const CACHE_BYTES: u64 = 32 << 20;

/// How long the VM process has to answer a control request.
const CONTROL_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(clap::Args)]
pub struct Args {
    /// The `kiln` binary, whose `__vm` runs the VM.
    #[arg(long)]
    kiln: PathBuf,
    /// The guest kernel.
    #[arg(long)]
    kernel: PathBuf,
    /// The VM's root disk, a raw ext4 image with guest-init, read-only.
    #[arg(long)]
    root: PathBuf,
    /// The Kiln image attached to the writable empty drive, as a volume
    /// whose overlay is made in `dir` (as the shim attaches a container's
    /// root).
    #[arg(long)]
    volume: PathBuf,
    /// Where the VM definition and the vsock socket go.
    #[arg(long)]
    dir: PathBuf,
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let socket = args.dir.join("vsock.sock");
    let definition = args.dir.join("vm.json");
    pod_vm(&args, &socket).save(&definition)?;
    let (mut control, theirs) = rpc::channel()?;
    let mut command = Command::new(&args.kiln);
    command
        .arg("__vm")
        .arg("--config")
        .arg(&definition)
        .arg("--control-fd")
        .arg(theirs.as_raw_fd().to_string())
        .arg("--supervisor")
        .arg(std::process::id().to_string());
    kiln_vmm::supervised::inherit(&mut command, theirs.as_fd());
    let mut vm = command.spawn().context("cannot start the VM process")?;
    drop(theirs);
    let volumes = [
        container_volume(&args.volume, &args.dir.join("first.overlay"))?,
        container_volume(&args.volume, &args.dir.join("second.overlay"))?,
    ];
    let probed = probe(&mut control, &socket, &volumes, &args.root);
    stop(&mut vm);
    probed?;
    Ok(ExitCode::SUCCESS)
}

/// `image` with a fresh overlay, made at `overlay`.
fn container_volume(image: &Path, overlay: &Path) -> anyhow::Result<DiskSource> {
    Volume::create(image, overlay, CACHE_BYTES)?;
    Ok(DiskSource::Volume {
        image: image.to_path_buf(),
        overlay: Some(overlay.to_path_buf()),
        cache_bytes: CACHE_BYTES,
        hydration: None,
        hydration_access: CacheAccess::Fill,
    })
}

/// A container VM with its root disk and two empty drives, the second
/// read-only.
fn pod_vm(args: &Args, socket: &Path) -> VmConfig {
    let disk = |source, read_only| DiskConfig {
        source,
        read_only,
        ephemeral: false,
    };
    VmConfig {
        boot: Boot::Kernel(args.kernel.clone()),
        disks: vec![
            disk(DiskSource::Raw(args.root.clone()), true),
            disk(DiskSource::Empty, false),
            disk(DiskSource::Empty, true),
        ],
        vcpus: 1,
        memory_mib: 256,
        extra_cmdline: CONTAINER_CMDLINE_FLAG.to_string(),
        seccomp: true,
        vsock: Some(VsockConfig {
            cid: 3,
            socket: socket.to_path_buf(),
        }),
        net: None,
        announce_boot: false,
    }
}

/// The steps, each printed as `STEP: …` for the scenario to check.
fn probe(
    control: &mut ControlClient,
    socket: &Path,
    [volume, next]: &[DiskSource; 2],
    root: &Path,
) -> anyhow::Result<()> {
    writable_drive(control, socket, volume)?;
    read_only_drive(control, socket, root)?;
    give_back_and_refill(control, socket, next)?;
    let snapshot = ControlRequest::Snapshot {
        dir: socket.with_file_name("snapshot"),
        copy_root: false,
        then: AfterSnapshot::Continue,
    };
    println!("snapshot: {}", call(control, &snapshot)?);
    Ok(())
}

/// Drive 1 (/dev/vdb): empty, filled with `volume`, refusals, and
/// processes in its root and beside it.
fn writable_drive(
    control: &mut ControlClient,
    socket: &Path,
    volume: &DiskSource,
) -> anyhow::Result<()> {
    let vdb = Some("/dev/vdb");
    println!(
        "empty: {}",
        exec(socket, "cat /sys/class/block/vdb/size", None)
    );
    let fill = |index| ControlRequest::AttachDisk {
        index,
        source: volume.clone(),
    };
    println!("attach: {}", call(control, &fill(1))?);
    println!("attach-again: {}", call(control, &fill(1))?);
    println!("attach-past-the-disks: {}", call(control, &fill(5))?);
    let mounted = "grep ' / / ' /proc/self/mountinfo | grep -o 'ext4 /dev/vd.'";
    let first =
        format!("{mounted}; pwd; echo pod > /pod-marker; ls /proc/self/fd >/dev/null && echo proc");
    println!("in-root: {}", exec(socket, &first, vdb));
    println!("in-root-again: {}", exec(socket, "cat /pod-marker", vdb));
    let guest =
        "cat /sys/class/block/vdb/size; ls /run/kiln/roots; test -e /pod-marker || echo no-marker";
    println!("guest-root: {}", exec(socket, guest, None));
    let mut on_terminal = request("tty", vdb);
    on_terminal.tty = Some(WindowSize { rows: 24, cols: 80 });
    println!("terminal-in-root: {}", run_request(socket, &on_terminal));
    println!("no-such-root: {}", exec(socket, "true", Some("/dev/vdq")));
    Ok(())
}

/// Drive 2 (/dev/vdc, read-only), filled with the VM's own root image,
/// clean and never written.
fn read_only_drive(control: &mut ControlClient, socket: &Path, root: &Path) -> anyhow::Result<()> {
    let fill = ControlRequest::AttachDisk {
        index: 2,
        source: DiskSource::Raw(root.to_path_buf()),
    };
    println!("attach-read-only: {}", call(control, &fill)?);
    let script = "cat /sys/class/block/vdc/ro; touch /x 2>/dev/null || echo cannot-write";
    println!(
        "in-read-only-root: {}",
        exec(socket, script, Some("/dev/vdc"))
    );
    Ok(())
}

/// Drive 1 given back while a process still runs in its root (guest-init
/// releases the root, then the VMM empties the drive: never the other
/// way round), refusals, and the drive filled again with `next`.
fn give_back_and_refill(
    control: &mut ControlClient,
    socket: &Path,
    next: &DiskSource,
) -> anyhow::Result<()> {
    let vdb = Some("/dev/vdb");
    let sleeper = {
        let socket = socket.to_path_buf();
        std::thread::spawn(move || exec(&socket, "touch /sleeping; exec sleep 1000", vdb))
    };
    let started = exec_until(
        socket,
        "test -e /sleeping && echo sleeping",
        vdb,
        "sleeping",
    );
    println!("sleeper-started: {started}");
    println!("release: {}", release(socket, "/dev/vdb"));
    let ended = sleeper
        .join()
        .map_err(|_| anyhow::anyhow!("the sleeper's thread panicked"))?;
    println!("sleeper: {ended}");
    println!("release-again: {}", release(socket, "/dev/vdb"));
    println!(
        "unmounted: {}",
        exec(socket, "grep -c /run/kiln/roots/vdb /proc/mounts", None)
    );
    let detach = |index| ControlRequest::DetachDisk { index };
    println!("detach: {}", call(control, &detach(1))?);
    println!("detach-again: {}", call(control, &detach(1))?);
    println!("detach-boot-disk: {}", call(control, &detach(0))?);
    let size = "cat /sys/class/block/vdb/size";
    println!("detached: {}", exec_until(socket, size, None, "out=\"0\""));
    let refill = ControlRequest::AttachDisk {
        index: 1,
        source: next.clone(),
    };
    println!("reattach: {}", call(control, &refill)?);
    let script = "test -e /pod-marker || echo no-marker; test -x /bin/busybox && echo busybox";
    println!("refilled: {}", exec(socket, script, vdb));
    Ok(())
}

/// Releases `device`'s root in the guest; returns `ok` or the refusal.
fn release(socket: &Path, device: &str) -> String {
    match release_root("pod".into(), socket, device) {
        Ok(()) => "ok".to_string(),
        Err(err) => format!("error {:?}", one_line(&err)),
    }
}

/// Runs `script` (as [`exec`]) until its line contains `want`, for at
/// most five seconds: what it waits for happens in the guest on its own
/// time (a process starting, the kernel re-reading a capacity). Returns
/// the last line.
fn exec_until(socket: &Path, script: &str, root: Option<&str>, want: &str) -> String {
    let mut line = exec(socket, script, root);
    for _ in 0..50 {
        if line.contains(want) {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
        line = exec(socket, script, root);
    }
    line
}

/// Sends `request`; returns `ok` or the VM process's error.
fn call(control: &mut ControlClient, request: &ControlRequest) -> anyhow::Result<String> {
    let reply = control.call(request, CONTROL_TIMEOUT)?;
    Ok(reply
        .error
        .map_or_else(|| "ok".to_string(), |error| format!("error {error:?}")))
}

/// Runs `script` with busybox's sh in the guest, in `root` if given;
/// returns its status and output on one line.
fn exec(socket: &Path, script: &str, root: Option<&str>) -> String {
    run_request(socket, &request(script, root))
}

/// The request that runs `script` in `root` (if given), on pipes.
fn request(script: &str, root: Option<&str>) -> ExecRequest {
    ExecRequest {
        argv: vec!["/bin/sh".into(), "-c".into(), script.into()],
        env: [("PATH".to_string(), "/bin".to_string())].into(),
        workdir: None,
        user: None,
        groups: None,
        tty: None,
        stdin: false,
        root: root.map(String::from),
        mounts: Vec::new(),
    }
}

/// Runs `request`; returns its status and output on one line.
fn run_request(socket: &Path, request: &ExecRequest) -> String {
    let ran = Session::connect("pod".into(), socket, request).and_then(|session| {
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let status = session.wait(&mut out, &mut err)?;
        Ok((status, out, err))
    });
    match ran {
        Ok((status, out, err)) => format!(
            "status={status} out={:?} err={:?}",
            String::from_utf8_lossy(&out).trim(),
            String::from_utf8_lossy(&err).trim()
        ),
        Err(ExecError::Refused { status, reason, .. }) => {
            format!("refused status={status} reason={reason:?}")
        }
        Err(err) => format!("failed: {}", one_line(&err)),
    }
}

/// Ends the VM process (SIGTERM, as `kiln stop`) and waits for it.
fn stop(vm: &mut Child) {
    let pid = rustix::process::Pid::from_child(vm);
    let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
    let _ = vm.wait();
}
