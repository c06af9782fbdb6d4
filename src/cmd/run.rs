//! `kiln run`: boot an image (or raw disks) in a new microVM: in this
//! process, or detached in a VMM process of its own (`--detach`).
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use kiln_builder::store::Store;
use kiln_control::instance::supervisor;
use kiln_control::instance::types::{self, InstanceType};
use kiln_control::instance::{
    FileLock, Instance, InstanceError, Network, Registry, Spec, Verb, lifecycle, state,
};
use kiln_control::network;
use kiln_control::network::proxy::{PortMap, Proxy};
use kiln_vmm::builder::{
    self, Boot, DiskConfig, DiskSource, NetConfig, VMM_ERROR_STATUS, VmConfig, VsockConfig,
};
use kiln_vmm::rpc::ControlListener;
use kiln_vmm::volume::Volume;

use crate::assets::{Asset, kiln_home};

/// How long `kiln run --detach` waits for the instance to run.
const LAUNCH_TIMEOUT: Duration = Duration::from_secs(60);
/// Name prefixes of the temporary disk files in `$KILN_HOME/tmp`: the
/// instance-store disk, an unnamed run's overlay, the user-data disk.
const SCRATCH_FILE: &str = "scratch-";
const EPHEMERAL_OVERLAY: &str = "overlay-";
const USER_DATA_DISK: &str = "user-data-";

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
    /// Boot the VM of a registered instance (what an instance's VMM runs).
    #[arg(long, hide = true, conflicts_with_all = ["image", "name", "detach"])]
    instance: Option<String>,
    /// Attach an empty instance-store disk of this many MiB (the last
    /// /dev/vd*), erased when the VM ends.
    #[arg(long, value_name = "MIB")]
    scratch: Option<u64>,
    /// Decompressed image chunks kept in memory per volume, in MiB.
    #[arg(long, value_name = "MIB", default_value_t = 32)]
    cache: u64,
    /// The guest kernel (an uncompressed vmlinux); default: the installed one.
    #[arg(long)]
    kernel: Option<PathBuf>,
    /// A raw disk image; without an IMAGE the first is the root filesystem
    /// (/dev/vda). Append `,ro` to attach a disk read-only. Repeatable.
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
    #[arg(long, value_name = "PATH[,cid=N]", conflicts_with_all = ["instance", "name", "detach"])]
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
    /// Print the time from `kiln run` starting to guest-init running
    /// (`boot-to-init: N us` on stderr, as soon as guest-init reports).
    #[arg(long)]
    timing: bool,
    /// Run without seccomp filters (debugging only).
    #[arg(long)]
    no_seccomp: bool,
    /// Go on from the snapshot in DIR instead of booting (what an
    /// instance's VMM runs for `kiln start` after a hibernation, and for
    /// `kiln snapshot restore`).
    #[arg(long, hide = true, value_name = "DIR", requires = "instance")]
    restore: Option<PathBuf>,
    /// Delete the --restore snapshot once restored (a hibernation).
    #[arg(long, hide = true, requires = "restore")]
    consume: bool,
    /// The inherited control channel from the instance's VMM.
    #[arg(long, hide = true, requires = "instance")]
    control_fd: Option<i32>,
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
    if let (Some(name), None) = (&args.name, &args.instance) {
        return foreground_instance(name, &args);
    }
    // Temporary disks (an unnamed run's overlay, scratch and user-data
    // disks) are `ephemeral`: the VMM deletes their files once open, so
    // nothing is left to clean up afterwards (under seccomp, it could not).
    let config = match vm_config(&args) {
        Ok(config) => config,
        Err(err) => {
            eprintln!("kiln: {err:#}");
            return Ok(ExitCode::from(VMM_ERROR_STATUS));
        }
    };
    if args.no_seccomp {
        eprintln!(
            "kiln: WARNING: --no-seccomp: the VMM runs WITHOUT its seccomp filters (debugging only)"
        );
    }
    // SAFETY: the instance's VMM passed this descriptor, its end of the
    // control channel, for this purpose; nothing else here uses it.
    let control = args
        .control_fd
        .map(|fd| unsafe { ControlListener::adopt(fd) });
    match builder::run(&config, started, control) {
        Ok(outcome) => {
            // With --timing the VMM printed `boot-to-init: N us` the
            // moment guest-init reported.
            if args.timing && outcome.boot_to_init.is_none() {
                eprintln!("boot-to-init: guest-init never reported");
            }
            Ok(ExitCode::from(outcome.exit_status))
        }
        Err(err) => {
            eprintln!("kiln: {err}");
            Ok(ExitCode::from(VMM_ERROR_STATUS))
        }
    }
}

/// `--name NAME` without `--detach`: this process is the instance's VMM,
/// in the foreground, and its VM a child (`kiln run --instance ID`, on this
/// terminal), as a detached VMM's would be: the record is kept true from
/// here, outside the VM process's seccomp filters.
fn foreground_instance(name: &str, args: &Args) -> anyhow::Result<ExitCode> {
    let home = kiln_home();
    let prepared = named_instance(&Registry::new(&home), &Store::new(&home), name, args);
    let (mut instance, _vmm) = match prepared {
        Ok(prepared) => prepared,
        Err(err) => {
            eprintln!("kiln: {err:#}");
            return Ok(ExitCode::from(VMM_ERROR_STATUS));
        }
    };
    // This process is the VMM: it serves the published ports.
    let _proxy = match supervisor::publish_ports(&instance) {
        Ok(proxy) => proxy,
        Err(err) => {
            instance.mark_stopped(err.to_string())?;
            return Err(err.into());
        }
    };
    instance.mark_running(false)?;
    let kiln = std::env::current_exe().context("cannot find the kiln binary")?;
    let mut vm = Command::new(kiln);
    vm.args(["run", "--instance", &instance.record.id, "--cache"])
        .arg(args.cache.to_string())
        .args(["--cmdline", &args.cmdline]);
    vm.args(
        args.kernel
            .iter()
            .flat_map(|k| [OsStr::new("--kernel"), k.as_os_str()]),
    );
    vm.args(args.disks.iter().flat_map(|d| ["--disk", d.as_str()]));
    if let Some(mib) = args.scratch {
        vm.args(["--scratch", &mib.to_string()]);
    }
    vm.args(args.timing.then_some("--timing"));
    vm.args(args.no_seccomp.then_some("--no-seccomp"));
    let status = vm.status();
    let (reason, code) = match &status {
        Ok(status) => (supervisor::describe(*status), shell_status(*status)),
        Err(err) => (
            format!("cannot start the VM process: {err}"),
            VMM_ERROR_STATUS,
        ),
    };
    instance.mark_stopped(reason)?;
    status.context("cannot start the VM process")?;
    Ok(ExitCode::from(code))
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
    let store = Store::new(&kiln_home());
    store.find(image)?;
    // A detached instance boots with these words every time.
    let spec = new_spec(args, image, args.cmdline.clone())?;
    preflight(&spec)?;
    let user_data = read_user_data(args)?;
    let kiln = std::env::current_exe().context("cannot find the kiln binary")?;
    let registry = Registry::new(&kiln_home());
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

/// What a new instance's VMM would fail on, checked before the instance
/// exists: the bridge can be set up (permission, the bridge module).
fn preflight(spec: &Spec) -> anyhow::Result<()> {
    if spec.network == Network::Bridge {
        network::prepare_bridge()?;
    } else if !spec.ports.is_empty() {
        bail!("-p publishes a port of the guest's address: it needs --network bridge");
    }
    // Bound and let go: the instance's VMM binds them for good.
    drop(Proxy::bind(&spec.ports)?);
    Ok(())
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

fn vm_config(args: &Args) -> anyhow::Result<VmConfig> {
    let boot = match &args.restore {
        Some(dir) => Boot::Snapshot {
            dir: dir.clone(),
            consume: args.consume,
        },
        None => Boot::Kernel(kernel(args)?),
    };
    let home = kiln_home();
    let store = Store::new(&home);
    let registry = Registry::new(&home);
    let (_, mut vcpus, mut memory_mib) = size(args)?;
    let mut cmdline = args.cmdline.clone();
    let mut disks = Vec::new();
    let mut vsock = args.vsock.as_deref().map(parse_vsock).transpose()?;
    let mut net = None;
    if let Some(id) = &args.instance {
        // The VM of an instance whose VMM process is our parent.
        let found = registry.find(id)?;
        let vmm = found
            .record
            .vmm_pid
            .context("the instance has no VMM process")?;
        supervisor::end_with_vmm(vmm).context("the VM process of an instance")?;
        (vcpus, memory_mib) = (found.record.spec.vcpus, found.record.spec.memory_mib);
        cmdline = format!("{} {}", found.record.spec.cmdline, args.cmdline);
        instance_disks(&store, &found, args, &mut cmdline, &mut disks)?;
        net = instance_nic(&found, &mut cmdline)?;
        vsock = Some(VsockConfig {
            cid: instance_cid(&found.record.id),
            socket: found.vsock_socket(),
        });
    } else if let Some(image) = &args.image {
        disks.push(ephemeral_root(&store, image, args)?);
    }
    let networked = args.network == Some(NetworkMode::Bridge) || !args.ports.is_empty();
    if networked && args.instance.is_none() {
        bail!(
            "--network bridge and -p are for instances (--detach or --name): an address belongs to an instance in the registry"
        );
    }
    for spec in &args.disks {
        disks.push(parse_disk(spec)?);
    }
    let Some(root) = disks.first_mut() else {
        bail!("nothing to boot: give an IMAGE, --name of an instance, or --disk");
    };
    root.read_only |= args.read_only;
    if let Some(mib) = args.scratch {
        disks.push(scratch_disk(&store, mib)?);
    }
    Ok(VmConfig {
        boot,
        disks,
        vcpus,
        memory_mib,
        extra_cmdline: cmdline,
        seccomp: !args.no_seccomp,
        vsock,
        net,
        announce_boot: args.timing,
    })
}

/// The NIC of an instance with an address (its words added to `cmdline`
/// for guest-init), on the bridge, which is made ready.
fn instance_nic(instance: &Instance, cmdline: &mut String) -> anyhow::Result<Option<NetConfig>> {
    let record = &instance.record;
    match (record.spec.network, record.address) {
        (Network::Bridge, Some(address)) => {
            let (config, words) = network::guest_nic(&record.id, address)?;
            *cmdline = format!("{} {cmdline}", words.join(" "));
            Ok(Some(config))
        }
        (Network::Isolated, _) => Ok(Some(network::isolated_nic(&record.id))),
        _ => Ok(None),
    }
}

/// The CID of a plain run's guest without `,cid=N`: the lowest a guest
/// may have (virtio 1.2 §5.10.4).
const DEFAULT_CID: u64 = 3;
/// Guest CIDs run from 3 to 2^32 - 2: 2^32 - 4 of them.
const GUEST_CIDS: u64 = (1 << 32) - 4;

/// An instance's vsock CID, the same at every boot: 3 + the id's 64-bit
/// value (`i-` and 16 hex digits) mod 2^32 - 4, so any CID a guest may
/// have (3 to 2^32 - 2, virtio 1.2 §5.10.4), and distinct instances
/// (clones of one snapshot too) almost surely differ. An id of another
/// shape is hashed (FNV-1a) instead.
fn instance_cid(id: &str) -> u64 {
    let value = id
        .strip_prefix("i-")
        .and_then(|hex| u64::from_str_radix(hex, 16).ok())
        .unwrap_or_else(|| {
            id.bytes().fold(0xcbf2_9ce4_8422_2325, |hash, byte| {
                (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3)
            })
        });
    DEFAULT_CID + value % GUEST_CIDS
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
    Ok(kernel)
}

/// An instance's disks and what its guest learns about itself: its root
/// volume (the image and the instance's overlay, made on first boot), its
/// user-data disk, and the metadata guest-init publishes under /run/kiln.
fn instance_disks(
    store: &Store,
    instance: &Instance,
    args: &Args,
    cmdline: &mut String,
    disks: &mut Vec<DiskConfig>,
) -> anyhow::Result<()> {
    let record = &instance.record;
    let image = store.find(&record.spec.image)?.image_path;
    let overlay = instance.root_overlay();
    let cache_bytes = args.cache << 20;
    if !overlay.exists() {
        Volume::create(&image, &overlay, cache_bytes)?;
    }
    disks.push(DiskConfig {
        source: DiskSource::Volume {
            image,
            overlay: Some(overlay),
            cache_bytes,
        },
        read_only: false,
        ephemeral: false,
    });
    let mut words = vec![
        format!("kiln.hostname={}", instance.label()),
        format!("kiln.meta.instance-id={}", record.id),
        format!("kiln.meta.instance-type={}", record.spec.instance_type),
        format!("kiln.meta.image={}", record.spec.image),
    ];
    words.extend(
        record
            .spec
            .name
            .iter()
            .map(|name| format!("kiln.meta.name={name}")),
    );
    if let Some(data) = instance.user_data() {
        disks.push(user_data_disk(store, &data)?);
        // The second disk: /dev/vdb.
        words.push("kiln.user-data=/dev/vdb".to_string());
    }
    *cmdline = format!("{} {cmdline}", words.join(" "));
    Ok(())
}

/// The instance `name` for a foreground run, with its VMM lock: an
/// existing stopped one, or a new one from the IMAGE.
fn named_instance(
    registry: &Registry,
    store: &Store,
    name: &str,
    args: &Args,
) -> anyhow::Result<(Instance, FileLock)> {
    let mut instance = match registry.find(name) {
        Ok(instance) => instance,
        Err(InstanceError::NotFound(_)) => {
            let Some(image) = &args.image else {
                bail!("no instance named {name:?}: give an IMAGE to launch it");
            };
            store.find(image)?;
            // A foreground run's --cmdline is for that run only.
            let spec = new_spec(args, image, String::new())?;
            preflight(&spec)?;
            return Ok(registry.create(spec, read_user_data(args)?.as_deref())?);
        }
        Err(err) => return Err(err.into()),
    };
    if let Some(image) = &args.image
        && *image != instance.record.spec.image
    {
        bail!(
            "instance {name:?} runs {}, not {image}: its root volume belongs to that image",
            instance.record.spec.image
        );
    }
    let vmm = instance
        .claim_vmm()?
        .with_context(|| format!("instance {name:?} is running in another VMM process"))?;
    instance.update(|r| {
        r.state = state::transition(r.state, Verb::Start)?;
        Ok(())
    })?;
    Ok((instance, vmm))
}

fn read_user_data(args: &Args) -> anyhow::Result<Option<Vec<u8>>> {
    args.user_data
        .as_ref()
        .map(|path| std::fs::read(path).with_context(|| format!("--user-data {}", path.display())))
        .transpose()
}

/// A root volume that lives as long as this VM: the image with a
/// temporary overlay, or the bare image when read-only.
fn ephemeral_root(store: &Store, image: &str, args: &Args) -> anyhow::Result<DiskConfig> {
    let image = store.find(image)?.image_path;
    let cache_bytes = args.cache << 20;
    let overlay = if args.read_only {
        None
    } else {
        let overlay = store.scratch_file(EPHEMERAL_OVERLAY)?;
        Volume::create(&image, &overlay, cache_bytes)?;
        Some(overlay)
    };
    Ok(DiskConfig {
        source: DiskSource::Volume {
            image,
            overlay,
            cache_bytes,
        },
        read_only: args.read_only,
        ephemeral: true,
    })
}

/// The user-data disk: the file in guest-init's user-data format
/// ([`kiln_control::instance::user_data_disk`]), read-only.
fn user_data_disk(store: &Store, data: &Path) -> anyhow::Result<DiskConfig> {
    let bytes = std::fs::read(data).with_context(|| format!("cannot read {}", data.display()))?;
    let path = store.scratch_file(USER_DATA_DISK)?;
    std::fs::write(&path, kiln_control::instance::user_data_disk(&bytes))
        .with_context(|| format!("cannot write {}", path.display()))?;
    Ok(DiskConfig {
        source: DiskSource::Raw(path),
        read_only: true,
        ephemeral: true,
    })
}

/// An empty, sparse raw disk of `mib` MiB.
fn scratch_disk(store: &Store, mib: u64) -> anyhow::Result<DiskConfig> {
    if mib == 0 {
        bail!("--scratch 0: expected a size in MiB of at least 1");
    }
    let path = store.scratch_file(SCRATCH_FILE)?;
    std::fs::File::create(&path)
        .and_then(|file| file.set_len(mib << 20))
        .with_context(|| format!("cannot create the scratch disk {}", path.display()))?;
    Ok(DiskConfig {
        source: DiskSource::Raw(path),
        read_only: false,
        ephemeral: true,
    })
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
    Ok(DiskConfig {
        source: DiskSource::Raw(path.to_path_buf()),
        read_only,
        ephemeral: false,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn instance_cids_are_guest_cids_derived_from_the_id() {
        assert_eq!(instance_cid("i-0000000000000000"), 3);
        assert_eq!(instance_cid("i-0000000000000007"), 10);
        assert_eq!(
            instance_cid("i-ffffffffffffffff"),
            3 + u64::MAX % GUEST_CIDS
        );
        assert_ne!(
            instance_cid("i-0123456789abcdef"),
            instance_cid("i-0123456789abcdee")
        );
        for id in ["i-ffffffffffffffff", "web", "i-not-hex"] {
            let cid = instance_cid(id);
            assert!((3..=(1 << 32) - 2).contains(&cid), "{id}: {cid}");
        }
    }
}
