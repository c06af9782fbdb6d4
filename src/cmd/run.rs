//! `kiln run`: boot an image (or raw disks) in a new microVM: in a jailed
//! VM process whose console is this terminal (in this process with
//! `--no-jail`), as an instance supervised from this process (`--name`),
//! or detached in a VMM process of its own (`--detach`).
use std::io;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{ExitCode, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use guest_init::config::percent_encoded;
use kiln_builder::store::Store;
use kiln_control::definition::{self, DEFAULT_CID, GUEST_CIDS, RunOptions};
use kiln_control::image_test::VmChild;
use kiln_control::instance::lifecycle::{self, LifecycleError};
use kiln_control::instance::supervisor::{self, Console, VmProcess};
use kiln_control::instance::types::{self, InstanceType};
use kiln_control::instance::{Network, Registry, Spec};
use kiln_control::jail::JailSettings;
use kiln_control::network::proxy::PortMap;
use kiln_vmm::builder;
use kiln_vmm::config::{DiskConfig, DiskSource, VmConfig, VsockConfig};
use kiln_vmm::machine::VMM_ERROR_STATUS;

use crate::assets::{Asset, kiln_home};

/// How long `kiln run --detach` waits for the instance to run.
const LAUNCH_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(clap::Args)]
pub struct Args {
    /// The image to boot, NAME:VERSION from the local store. The root disk
    /// is the compressed image itself, with a copy-on-write overlay for the
    /// guest's writes: kept with --name, dropped at exit without.
    image: Option<String>,
    /// Keep the root volume as instance NAME: the next `kiln run --name
    /// NAME` (or `kiln start NAME`) boots it again with its writes.
    #[arg(long)]
    name: Option<String>,
    /// Run in a VMM process of its own and return its instance id; manage
    /// it with `kiln ps`, `stop`, `start`, `reboot`, `terminate`, `logs`.
    #[arg(long, short = 'd')]
    detach: bool,
    /// The instance type (`kiln types`); default k1.nano.
    #[arg(long = "type", value_name = "TYPE", conflicts_with_all = ["vcpus", "memory"])]
    instance_type: Option<String>,
    /// A file the guest finds at /run/kiln/user-data; run once at first
    /// boot when it starts with `#!`.
    #[arg(long, value_name = "FILE")]
    user_data: Option<PathBuf>,
    /// Attach an empty instance-store disk of this many MiB (the last
    /// /dev/vd*), erased when the VM ends.
    #[arg(long, value_name = "MIB")]
    scratch: Option<u64>,
    /// Decompressed image chunks kept in memory per volume, in MiB.
    #[arg(long, value_name = "MIB", default_value_t = definition::DEFAULT_CACHE_MIB)]
    cache: u64,
    /// The guest kernel (an uncompressed vmlinux); default: the installed one.
    #[arg(long)]
    kernel: Option<PathBuf>,
    /// A raw disk image; without an IMAGE the first is the root filesystem
    /// (/dev/vda). Append `,ro` to attach a disk read-only. Repeatable.
    /// With neither, `--kernel` boots alone (the stub guest: docs/stub-guest.md).
    #[arg(long = "disk", value_name = "PATH[,ro]")]
    disks: Vec<String>,
    /// Attach the root disk read-only.
    #[arg(long)]
    read_only: bool,
    /// Give the guest a virtio-vsock device whose host side is the unix
    /// socket PATH (connect, write `CONNECT <port>\n`, read `OK <host
    /// port>\n`, then the stream is the guest port's); its CID is 3
    /// unless `,cid=N`. Instances always have one, at
    /// instances/<id>/vsock.sock.
    #[arg(long, value_name = "PATH[,cid=N]", conflicts_with_all = ["name", "detach"])]
    vsock: Option<String>,
    /// The instance's network: `bridge`, a NIC on the kiln0 bridge with an
    /// address of its own (the default for instances: --detach, --name),
    /// or `none`. A plain run has no NIC.
    #[arg(long, value_enum, value_name = "MODE")]
    network: Option<NetworkMode>,
    /// Publish the guest's TCP port GUEST_PORT on the host's 127.0.0.1 as
    /// HOST_PORT (a bare PORT is both) while the instance runs. Repeatable.
    #[arg(long = "publish", short = 'p', value_name = "HOST_PORT:GUEST_PORT")]
    ports: Vec<PortMap>,
    /// Number of vCPUs (instead of a --type).
    #[arg(long)]
    vcpus: Option<u8>,
    /// Guest memory in MiB (instead of a --type).
    #[arg(long)]
    memory: Option<u32>,
    /// Words appended to the kernel command line (e.g. kiln.entrypoint=/bin/sh).
    #[arg(long, default_value = "", allow_hyphen_values = true)]
    cmdline: String,
    /// After `--`: the command, replacing the image's (its Cmd, or its
    /// recipe's `args`) after its entrypoint, as `docker run IMAGE CMD…`
    /// does. An image with no entrypoint of its own runs CMD itself.
    #[arg(last = true, value_name = "CMD")]
    command: Vec<String>,
    /// Set a variable in the entrypoint's environment. Repeatable.
    #[arg(long = "env", short = 'e', value_name = "KEY=VALUE")]
    env: Vec<String>,
    /// The entrypoint's working directory, absolute.
    #[arg(long, short = 'w', value_name = "DIR")]
    workdir: Option<String>,
    /// Run the entrypoint as USER[:GROUP] (names from the image's
    /// /etc/passwd and /etc/group, or numbers).
    #[arg(long, short = 'u', value_name = "USER[:GROUP]")]
    user: Option<String>,
    /// Print the time from `kiln run` starting to guest-init running
    /// (`boot-to-init: N us` on stderr, as soon as guest-init reports).
    #[arg(long)]
    timing: bool,
    /// Run without seccomp filters (debugging only).
    #[arg(long)]
    no_seccomp: bool,
}

/// `--network`'s values.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum NetworkMode {
    Bridge,
    None,
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    // The boot timer's zero: as close to process start as `run` gets.
    let started = Instant::now();
    if args.detach {
        return detach(&args);
    }
    if args.no_seccomp {
        eprintln!(
            "kiln: WARNING: --no-seccomp: the VMM runs WITHOUT its seccomp filters (debugging only)"
        );
    }
    let ran = match &args.name {
        Some(name) => foreground_instance(name, &args),
        None => plain_run(&args, started),
    };
    // A VMM error has its own exit status, as `docker run` uses 125:
    // distinct from any status a guest's entrypoint reports.
    Ok(ran.unwrap_or_else(|err| {
        eprintln!("kiln: {err:#}");
        ExitCode::from(VMM_ERROR_STATUS)
    }))
}

/// A VM of no instance: in a jailed VM process, or in this process when
/// the jail is off.
fn plain_run(args: &Args, started: Instant) -> anyhow::Result<ExitCode> {
    if args.network == Some(NetworkMode::Bridge) || !args.ports.is_empty() {
        bail!(
            "--network bridge and -p are for instances (--detach or --name): an address belongs to an instance in the registry"
        );
    }
    let vsock = args.vsock.as_deref().map(parse_vsock).transpose()?;
    let (_, vcpus, memory_mib) = size(args)?;
    // Every path in the definition is absolute: a jailed VM process's
    // working directory is its root's.
    let home = std::path::absolute(kiln_home()).context("cannot find the Kiln home")?;
    let store = Store::new(&home);
    let config = definition::for_plain_run(
        &store,
        args.image.as_deref(),
        &run_options(args)?,
        (vcpus, memory_mib),
        vsock,
    )?;
    match JailSettings::for_vm_processes()? {
        Some(jail) => jailed_run(&store, config, &jail),
        None => in_process(args, &config, started),
    }
}

/// The VM, in this process (`--no-jail`).
fn in_process(args: &Args, config: &VmConfig, started: Instant) -> anyhow::Result<ExitCode> {
    let outcome = builder::run(config, started, None, None)?;
    // With --timing the VMM printed `boot-to-init: N us` the moment
    // guest-init reported.
    if args.timing && outcome.boot_to_init.is_none() {
        eprintln!("boot-to-init: guest-init never reported");
    }
    Ok(ExitCode::from(outcome.exit_status))
}

/// The VM, in a jailed `kiln __vm` child on this terminal (its stdin,
/// stdout and stderr this process's), whose jail and definition are in
/// a scratch directory of `store`. Its exit status is this run's: the
/// guest's, or [`VMM_ERROR_STATUS`] when the VM process failed (it says
/// why itself). A stop signal sent to this process alone (SIGTERM,
/// SIGINT, as from `timeout` or `kill`) is passed on to the VM process,
/// which stops its guest as an unjailed run does; with `--timing`, the
/// VM process times the boot from its own start.
fn jailed_run(
    store: &Store,
    mut config: VmConfig,
    jail: &JailSettings,
) -> anyhow::Result<ExitCode> {
    let scratch = store.scratch_dir()?;
    let _link = match &mut config.vsock {
        Some(vsock) => Some(VsockLink::new(vsock, scratch.path())?),
        None => None,
    };
    let kiln = std::env::current_exe().context("cannot find the kiln binary")?;
    // Handled from now on, before the VM process can stop, so that this
    // process outlives it and removes its jail.
    let stops = signal_hook::iterator::Signals::new(STOP_SIGNALS)
        .context("cannot catch the stop signals")?;
    let mut vm = VmChild::start(&kiln, scratch.path(), config, Some(jail), |command| {
        command.stdin(Stdio::inherit());
        Ok(())
    })?;
    let status = wait_passing_on_stops(vm.child(), stops)?;
    Ok(ExitCode::from(shell_status(status)))
}

/// The signals that stop a plain run's VM.
const STOP_SIGNALS: [i32; 2] = [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT];

/// Waits for `child`, sending it SIGTERM for each of `stops` that
/// arrives meanwhile (through a pidfd: never to another process that
/// reuses its pid).
fn wait_passing_on_stops(
    child: &mut std::process::Child,
    mut stops: signal_hook::iterator::Signals,
) -> anyhow::Result<ExitStatus> {
    use rustix::process::{Pid, PidfdFlags, Signal, pidfd_open, pidfd_send_signal};
    let pidfd = pidfd_open(Pid::from_child(child), PidfdFlags::empty())
        .context("cannot open a pidfd for the VM process")?;
    let handle = stops.handle();
    let passer = std::thread::spawn(move || {
        for _ in stops.forever() {
            let _ = pidfd_send_signal(&pidfd, Signal::TERM);
        }
    });
    let status = child.wait().context("cannot wait for the VM process");
    handle.close();
    let _ = passer.join();
    status
}

/// The `--vsock PATH` of a jailed run: the VM process listens in its
/// jail's writable directory (the only one it may write), and PATH is a
/// symbolic link to that socket, which connecting follows, for the run's
/// life.
struct VsockLink {
    path: PathBuf,
}

impl VsockLink {
    /// Moves `vsock`'s socket into `dir` and links its path to it. What
    /// is at the path already is replaced only if it is a socket or a link
    /// that nothing answers on (a run's that ended), as an unjailed VM
    /// does with a stale socket.
    fn new(vsock: &mut VsockConfig, dir: &Path) -> anyhow::Result<VsockLink> {
        let path = std::mem::replace(&mut vsock.socket, dir.join("vsock.sock"));
        match std::fs::symlink_metadata(&path) {
            Ok(meta) if meta.file_type().is_socket() || meta.is_symlink() => {
                if UnixStream::connect(&path).is_ok() {
                    bail!(
                        "--vsock {}: a running VM is listening there",
                        path.display()
                    );
                }
                std::fs::remove_file(&path).with_context(|| {
                    format!("--vsock {}: cannot remove the stale socket", path.display())
                })?;
            }
            Ok(_) => bail!(
                "--vsock {}: expected a socket's path, and another kind of file is there",
                path.display()
            ),
            Err(err) if err.kind() == io::ErrorKind::NotFound => {}
            Err(err) => {
                return Err(err).with_context(|| format!("--vsock {}", path.display()));
            }
        }
        std::os::unix::fs::symlink(&vsock.socket, &path).with_context(|| {
            format!(
                "--vsock {}: cannot link it to the jailed VM's socket",
                path.display()
            )
        })?;
        Ok(VsockLink { path })
    }
}

impl Drop for VsockLink {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// `--name NAME` without `--detach`: this process is the instance's VMM,
/// in the foreground, its VMs children on this terminal.
fn foreground_instance(name: &str, args: &Args) -> anyhow::Result<ExitCode> {
    // Checked before the instance is claimed: a bad flag leaves it as it was.
    let options = run_options(args)?;
    let home = kiln_home();
    let (registry, store) = (Registry::new(&home), Store::new(&home));
    let claimed = lifecycle::claim(&registry, name, args.image.as_deref())?;
    let (instance, vmm) = match claimed {
        Some(claimed) => claimed,
        None => {
            let Some(image) = &args.image else {
                return Err(LifecycleError::NoImage(name.to_string()).into());
            };
            // A foreground run's --cmdline is for that run only.
            let spec = new_spec(args, image, String::new())?;
            lifecycle::create(&registry, &store, spec, read_user_data(args)?.as_deref())?
        }
    };
    let vm = VmProcess {
        kiln: std::env::current_exe().context("cannot find the kiln binary")?,
        store,
        options,
        console: Console::Terminal,
    };
    let status = supervisor::run(instance, vmm, None, &vm, None)?;
    Ok(ExitCode::from(shell_status(status)))
}

/// A child's exit status as a shell reports it: its code, or 128 + the
/// signal that killed it.
fn shell_status(status: std::process::ExitStatus) -> u8 {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => code as u8,
        (None, Some(signal)) => 128 + signal as u8,
        (None, None) => VMM_ERROR_STATUS,
    }
}

/// `--detach`: a new instance in a VMM process of its own.
fn detach(args: &Args) -> anyhow::Result<ExitCode> {
    let Some(image) = &args.image else {
        bail!(
            "--detach launches a new instance from an IMAGE (restart a stopped one with `kiln start`)"
        );
    };
    if !args.disks.is_empty() || args.scratch.is_some() || args.read_only {
        bail!(
            "--detach takes an IMAGE only: --disk, --scratch and --read-only are for foreground runs"
        );
    }
    // A detached instance boots with these words every time.
    let spec = new_spec(args, image, cmdline(args)?)?;
    let home = kiln_home();
    lifecycle::preflight(&Store::new(&home), &spec)?;
    let user_data = read_user_data(args)?;
    let kiln = std::env::current_exe().context("cannot find the kiln binary")?;
    let registry = Registry::new(&home);
    let instance = lifecycle::launch(&registry, spec, user_data.as_deref(), &kiln, LAUNCH_TIMEOUT)?;
    println!("{}", instance.record.id);
    crate::cmd::lifecycle::running_or_why(&instance)?;
    Ok(ExitCode::SUCCESS)
}

/// A new instance of `image`, named and sized by the command line.
fn new_spec(args: &Args, image: &str, cmdline: String) -> anyhow::Result<Spec> {
    let (instance_type, vcpus, memory_mib) = size(args)?;
    let network = match args.network {
        Some(NetworkMode::None) => Network::None,
        Some(NetworkMode::Bridge) | None => Network::Bridge,
    };
    Ok(Spec {
        name: args.name.clone(),
        image: image.to_string(),
        instance_type,
        vcpus,
        memory_mib,
        cmdline,
        network,
        private_ip: None,
        ports: args.ports.clone(),
    })
}

/// The instance type's name, vCPUs and memory: a catalog type, or
/// explicit sizes ("custom") over the default type's.
fn size(args: &Args) -> anyhow::Result<(String, u8, u32)> {
    if args.vcpus.is_none() && args.memory.is_none() {
        let name = args.instance_type.as_deref().unwrap_or(types::DEFAULT);
        let t = InstanceType::find(name)?;
        return Ok((t.name.to_string(), t.vcpus, t.memory_mib));
    }
    let default = InstanceType::find(types::DEFAULT)?;
    Ok((
        "custom".into(),
        args.vcpus.unwrap_or(default.vcpus),
        args.memory.unwrap_or(default.memory_mib),
    ))
}

/// What this run adds to its VM's definition.
fn run_options(args: &Args) -> anyhow::Result<RunOptions> {
    Ok(RunOptions {
        kernel: kernel(args)?,
        disks: args
            .disks
            .iter()
            .map(|spec| parse_disk(spec))
            .collect::<anyhow::Result<_>>()?,
        read_only: args.read_only,
        scratch_mib: args.scratch,
        cache_mib: args.cache,
        cmdline: cmdline(args)?,
        timing: args.timing,
        seccomp: !args.no_seccomp,
    })
}

/// The kernel command line's extra words: `--cmdline`, then the run
/// configuration's overrides from CMD, -e, -w and -u, which guest-init
/// reads (`guest_init::config`). The command and the user are
/// percent-encoded, so any word survives; a variable or directory with a
/// double quote or a control character cannot be passed this way and is
/// refused.
fn cmdline(args: &Args) -> anyhow::Result<String> {
    let mut words = vec![args.cmdline.clone()];
    if !args.command.is_empty() {
        let encoded: Vec<String> = args.command.iter().map(|w| percent_encoded(w)).collect();
        words.push(format!("kiln.cmd=\"{}\"", encoded.join(" ")));
    }
    for pair in &args.env {
        match pair.split_once('=') {
            Some((key, _)) if !key.is_empty() && !key.contains([' ', '"']) => {}
            _ => bail!("-e {pair:?}: expected KEY=VALUE, KEY without spaces or quotes"),
        }
        words.push(format!("kiln.env=\"{}\"", quotable("-e", pair)?));
    }
    if let Some(dir) = &args.workdir {
        if !dir.starts_with('/') {
            bail!("-w {dir:?}: expected an absolute path");
        }
        words.push(format!("kiln.workdir=\"{}\"", quotable("-w", dir)?));
    }
    if let Some(user) = &args.user {
        if user.is_empty() || user.split(':').count() > 2 {
            bail!("-u {user:?}: expected USER[:GROUP]");
        }
        words.push(format!("kiln.user={}", percent_encoded(user)));
    }
    Ok(words.join(" ").trim().to_string())
}

/// `value` if it can stand between double quotes on the kernel command
/// line (no quote, no control character).
fn quotable<'v>(flag: &str, value: &'v str) -> anyhow::Result<&'v str> {
    if value.contains(|c: char| c == '"' || c.is_control()) {
        bail!("{flag} {value:?}: a double quote or control character cannot reach the guest");
    }
    Ok(value)
}

/// `PATH` or `PATH,cid=N`.
fn parse_vsock(spec: &str) -> anyhow::Result<VsockConfig> {
    let (path, cid) = match spec.rsplit_once(",cid=") {
        Some((path, cid)) => {
            let cid = cid
                .parse()
                .with_context(|| format!("--vsock {spec}: cid {cid:?} is not a number"))?;
            (path, cid)
        }
        None => (spec, DEFAULT_CID),
    };
    if !(DEFAULT_CID..DEFAULT_CID + GUEST_CIDS).contains(&cid) {
        bail!(
            "--vsock {spec}: cid {cid}: expected {DEFAULT_CID} to {}",
            DEFAULT_CID + GUEST_CIDS - 1
        );
    }
    if path.is_empty() {
        bail!("--vsock {spec}: expected a socket path");
    }
    Ok(VsockConfig {
        cid,
        socket: PathBuf::from(path),
    })
}

/// The guest kernel to boot: --kernel, or the installed one.
fn kernel(args: &Args) -> anyhow::Result<PathBuf> {
    let kernel = args.kernel.clone().unwrap_or_else(|| Asset::Kernel.path());
    if !kernel.is_file() {
        bail!(
            "no guest kernel at {} (pass --kernel, set {}, or run `{}`)",
            kernel.display(),
            Asset::Kernel.env_var(),
            Asset::Kernel.xtask()
        );
    }
    std::path::absolute(&kernel).with_context(|| format!("--kernel {}", kernel.display()))
}

fn read_user_data(args: &Args) -> anyhow::Result<Option<Vec<u8>>> {
    args.user_data
        .as_ref()
        .map(|path| std::fs::read(path).with_context(|| format!("--user-data {}", path.display())))
        .transpose()
}

/// `PATH` or `PATH,ro`; the file must exist.
fn parse_disk(spec: &str) -> anyhow::Result<DiskConfig> {
    let (path, read_only) = match spec.rsplit_once(',') {
        Some((path, "ro")) => (path, true),
        Some((path, "rw")) => (path, false),
        Some((_, option)) => bail!("--disk {spec}: unknown option {option:?} (expected ro or rw)"),
        None => (spec, false),
    };
    let path = Path::new(path);
    std::fs::metadata(path).with_context(|| format!("--disk {}", path.display()))?;
    let path = std::path::absolute(path).with_context(|| format!("--disk {}", path.display()))?;
    Ok(DiskConfig {
        source: DiskSource::Raw(path),
        read_only,
        ephemeral: false,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use guest_init::config::RunConfig;

    #[test]
    fn disk_specs_parse_and_name_their_problem() {
        let file = std::env::current_exe().unwrap();
        let shown = file.display().to_string();
        assert!(parse_disk(&format!("{shown},ro")).unwrap().read_only);
        assert!(!parse_disk(&shown).unwrap().read_only);
        let err = parse_disk(&format!("{shown},fast"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("\"fast\""), "{err}");
        let err = format!("{:#}", parse_disk("/no/such/disk.img").unwrap_err());
        assert!(err.contains("/no/such/disk.img"), "{err}");
    }

    #[test]
    fn overrides_become_words_guest_init_reads_back() {
        use clap::Parser;
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            run: Args,
        }
        let parse = |line: &[&str]| {
            Cli::try_parse_from(["run"].iter().chain(line)).map(|cli| cmdline(&cli.run))
        };
        let words = parse(&[
            "img:1.0.0",
            "--cmdline",
            "quiet",
            "-e",
            "A=b c",
            "-w",
            "/srv",
            "-u",
            "app:wheel",
            "--",
            "sh",
            "-c",
            "echo \"50%\"",
        ])
        .unwrap()
        .unwrap();
        let file = br#"{"entrypoint": ["/entry"], "cmd": ["default"]}"#;
        let config = RunConfig::resolve(Some(file), &words).unwrap();
        assert_eq!(config.entrypoint, ["/entry", "sh", "-c", "echo \"50%\""]);
        assert_eq!(config.env["A"], "b c");
        assert_eq!(config.workdir, "/srv");
        assert_eq!(config.user.as_deref(), Some("app:wheel"));
        assert!(words.starts_with("quiet "), "{words}");
        for bad in [
            &["i", "-e", "NOVALUE"][..],
            &["i", "-e", "A=\"q\""],
            &["i", "-w", "rel"],
            &["i", "-u", "a:b:c"],
        ] {
            let err = parse(bad).unwrap().unwrap_err().to_string();
            assert!(err.contains(&bad[2][..2]), "{bad:?}: {err}");
        }
    }

    /// A jailed run's `--vsock PATH` is a link to the socket in the
    /// jail's directory while the run lasts: a stale socket or link at
    /// PATH is replaced, a live one or another kind of file refused.
    #[test]
    fn a_jailed_runs_vsock_path_links_into_the_jail() {
        let dir = tempfile::tempdir().unwrap();
        let (jail, path) = (dir.path().join("jail"), dir.path().join("v.sock"));
        std::fs::create_dir(&jail).unwrap();
        let link = |path: &Path| {
            let mut vsock = parse_vsock(path.to_str().unwrap()).unwrap();
            VsockLink::new(&mut vsock, &jail).map(|link| (link, vsock.socket))
        };
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
        let (stale_replaced, socket) = link(&path).unwrap();
        assert_eq!(socket, jail.join("vsock.sock"));
        assert_eq!(std::fs::read_link(&path).unwrap(), socket);
        let live = std::os::unix::net::UnixListener::bind(&socket).unwrap();
        let err = link(&path).err().unwrap().to_string();
        assert!(
            err.ends_with("v.sock: a running VM is listening there"),
            "{err}"
        );
        drop((stale_replaced, live));
        assert!(
            std::fs::symlink_metadata(&path).is_err(),
            "the link is left"
        );
        std::fs::write(&path, b"").unwrap();
        let err = link(&path).err().unwrap().to_string();
        assert!(err.contains("expected a socket's path"), "{err}");
    }

    #[test]
    fn vsock_specs_parse_with_a_default_cid() {
        let plain = parse_vsock("/tmp/v.sock").unwrap();
        assert_eq!((plain.cid, plain.socket), (3, PathBuf::from("/tmp/v.sock")));
        assert_eq!(parse_vsock("/tmp/v.sock,cid=42").unwrap().cid, 42);
        for bad in ["/tmp/v.sock,cid=2", "/tmp/v.sock,cid=x", ",cid=5"] {
            assert!(parse_vsock(bad).is_err(), "{bad}");
        }
        assert!(parse_vsock(&format!("/v,cid={}", (1u64 << 32) - 1)).is_err());
        assert!(parse_vsock(&format!("/v,cid={}", (1u64 << 32) - 2)).is_ok());
    }
}
