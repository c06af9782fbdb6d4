//! A container's VM: its definition (the root disk with an overlay of its
//! own, a vsock device for guest-init's exec port, the spec's size, and
//! the kernel command line that makes guest-init a container's PID 1) and
//! its VMM process, this binary again as `containerd-shim-kiln-v2 __vm`,
//! jailed as Kiln's own VM processes are (`kiln_control::jail`) unless
//! the jail is switched off (`KILN_JAIL=0` in the shim's environment).
//! The shim holds a control channel to it ([`kiln_vmm::rpc`]), on which
//! a pod's VM takes its members' root disks ([`VmProcess::attach`]).
use std::fs::{self, File};
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::{Arc, mpsc};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use guest_init::exec::CONTAINER_CMDLINE_FLAG;
use kiln_control::jail::{self, Access, Jail, JailError, JailSettings};
use kiln_vmm::config::{
    Boot, CacheAccess, ConfigError, DiskConfig, DiskSource, VmConfig, VsockConfig,
};
use kiln_vmm::devices::virtio::net::tap::Tap;
use kiln_vmm::machine::VMM_ERROR_STATUS;
use kiln_vmm::report::one_line;
use kiln_vmm::rpc::{self, ControlClient, ControlError, ControlListener, ControlRequest};
use kiln_vmm::supervised;
use kiln_vmm::volume::{Volume, VolumeError};

use crate::rootfs::INIT_PATH;
use crate::spec::Container;

/// The hidden first argument that makes this binary a VMM process.
pub const VM_SUBCOMMAND: &str = "__vm";
/// The lowest CID a guest may have (virtio 1.2 §5.10.4). Each container
/// VM has a vsock device of its own, reached through its own socket, so
/// all may share it.
const GUEST_CID: u64 = 3;
/// Decompressed image chunks kept in memory per VM.
const CACHE_BYTES: u64 = 32 << 20;
/// How long the VM process may take to attach a disk (it opens two files)
/// or detach one (it flushes and closes them), between its events.
const DRIVE_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a VM cannot be defined or started.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// The guest kernel is not where it is looked for.
    #[error("no guest kernel at {0} (set KILN_KERNEL, or install one with `cargo xtask kernel`)")]
    NoKernel(PathBuf),
    /// The root disk's overlay cannot be created.
    #[error(transparent)]
    Overlay(#[from] VolumeError),
    /// The definition cannot be written.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The VMM process's jail cannot be set up.
    #[error(transparent)]
    Jail(#[from] JailError),
    /// The VMM process was handed a tap without a NIC to take it, or has
    /// a NIC and no tap.
    #[error(
        "{definition}: TAP_FD {fd:?}: expected a tap's descriptor exactly when the VM has a NIC"
    )]
    TapFd {
        /// The VM's definition.
        definition: PathBuf,
        /// The descriptor argument, if any.
        fd: Option<String>,
    },
    /// The VMM process cannot be started.
    #[error("cannot start the VMM process (console {console})")]
    Spawn {
        /// Where its console was to go.
        console: PathBuf,
        /// What the system said.
        #[source]
        source: io::Error,
    },
    /// The control channel to the VMM process cannot be made.
    #[error(transparent)]
    Control(#[from] ControlError),
    /// A member's root disk cannot be made ready for the VM process.
    #[error("cannot prepare {path} for the VM process")]
    Prepare {
        /// The file or directory.
        path: PathBuf,
        /// What the file system said.
        #[source]
        source: io::Error,
    },
    /// The VM process did not attach or detach a disk.
    #[error("the VM process did not {op} disk {index}")]
    Drive {
        /// "attach" or "detach".
        op: &'static str,
        /// The disk's index in the VM's definition.
        index: usize,
        /// Why.
        #[source]
        source: DriveError,
    },
}

/// Why the VM process did not attach or detach a disk.
#[derive(Debug, thiserror::Error)]
pub enum DriveError {
    /// The request or its answer did not get through.
    #[error(transparent)]
    Channel(#[from] ControlError),
    /// The VM process answered with a refusal, which it words itself.
    #[error("refused: {0}")]
    Refused(String),
}

/// The files of one container's VM, in its own directory.
pub struct Files {
    dir: PathBuf,
}

impl Files {
    /// The files under `dir`.
    pub fn new(dir: PathBuf) -> Self {
        Files { dir }
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// guest-init's vsock ports, reached with `CONNECT <port>\n`.
    pub fn vsock(&self) -> PathBuf {
        self.dir.join("vsock.sock")
    }

    /// The guest's serial console: the kernel's and guest-init's words.
    pub fn console(&self) -> PathBuf {
        self.dir.join("console.log")
    }

    fn overlay(&self) -> PathBuf {
        self.dir.join("root.overlay")
    }

    /// The directory of pod member `name` (its container directory's
    /// name): inside this one, which the VM process's jail binds at the
    /// same path, so a file made there later reaches the VM process.
    pub fn member(&self, name: &str) -> PathBuf {
        self.dir.join("members").join(name)
    }

    fn definition(&self) -> PathBuf {
        self.dir.join("vm.json")
    }

    /// The name of the VM's jail: its cgroup's (`/sys/fs/cgroup/kiln/`
    /// and this) and its uid lease's key. The directory's name, a digest
    /// of the namespace and the container's id (unique per container,
    /// safe as a path), after a prefix that sets it apart from Kiln's own
    /// instances' ids.
    pub fn jail_id(&self) -> String {
        let name = self.dir.file_name().unwrap_or_default();
        format!("containerd-{}", name.to_string_lossy())
    }
}

/// The VM of `container`: `kernel` booting `image` (with an overlay made
/// in `files`); [`VmProcess::spawn`] writes it to its definition file.
pub fn define(
    container: &Container,
    kernel: &Path,
    image: &Path,
    files: &Files,
) -> Result<VmConfig, VmError> {
    if !kernel.is_file() {
        return Err(VmError::NoKernel(kernel.to_path_buf()));
    }
    let overlay = files.overlay();
    Volume::create(image, &overlay, CACHE_BYTES)?;
    let mut words = vec![
        format!("init={INIT_PATH}"),
        CONTAINER_CMDLINE_FLAG.to_string(),
    ];
    if !container.hostname.is_empty() {
        words.push(format!("kiln.hostname={}", container.hostname));
    }
    let config = VmConfig {
        boot: Boot::Kernel(kernel.to_path_buf()),
        disks: vec![DiskConfig {
            source: root_disk(image, overlay),
            read_only: false,
            ephemeral: false,
        }],
        vcpus: container.vcpus(),
        memory_mib: container.memory_mib(),
        extra_cmdline: words.join(" "),
        seccomp: true,
        vsock: Some(VsockConfig {
            cid: GUEST_CID,
            socket: files.vsock(),
        }),
        net: None,
        announce_boot: false,
    };
    Ok(config)
}

/// A container's root disk: `image` with the copy-on-write `overlay`.
fn root_disk(image: &Path, overlay: PathBuf) -> DiskSource {
    DiskSource::Volume {
        image: image.to_path_buf(),
        overlay: Some(overlay),
        cache_bytes: CACHE_BYTES,
        hydration: None,
        hydration_access: CacheAccess::Fill,
    }
}

/// A container's VMM process, the thread that started it and waits for
/// it, and the control channel to it. The VMM ends with the thread that
/// started it (the parent-death signal follows the thread, not the
/// process), so that thread lives as long as the VMM, never a request's.
pub struct VmProcess {
    pid: u32,
    waiter: Option<JoinHandle<()>>,
    control: ControlClient,
    /// How files made later reach it; `None` when it is not jailed.
    access: Option<Access>,
}

impl VmProcess {
    /// Starts the VMM process of `config`, the VM whose files are in
    /// `files`, jailed unless the jail is switched off, its console into
    /// the console file; it ends when this process does. The NIC's `tap`,
    /// if `config` has one, is handed to it open, and goes with it.
    pub fn spawn(
        files: &Files,
        mut config: VmConfig,
        tap: Option<Tap>,
    ) -> Result<VmProcess, VmError> {
        let jail = Jailed::create(files, &mut config)?;
        let access = jail.0.as_ref().map(|jail| jail.access());
        let definition = files.definition();
        config.save(&definition)?;
        jail.hand_over(&definition)?;
        let (control, vm_end) = rpc::channel()?;
        let console = files.console();
        let spawn_err = |source| VmError::Spawn {
            console: console.clone(),
            source,
        };
        let log = File::create(&console).map_err(spawn_err)?;
        let exe = std::env::current_exe().map_err(spawn_err)?;
        let mut command = Command::new(exe);
        command
            .arg(VM_SUBCOMMAND)
            .arg(definition)
            .arg(std::process::id().to_string())
            .arg(vm_end.as_raw_fd().to_string())
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(spawn_err)?)
            .stderr(log);
        supervised::inherit(&mut command, vm_end.as_fd());
        let tap = tap.map(OwnedFd::from);
        if let Some(tap) = &tap {
            command.arg(tap.as_raw_fd().to_string());
            supervised::inherit(&mut command, tap.as_fd());
        }
        let (started, pid) = mpsc::channel();
        let waiter = thread::Builder::new()
            .name("vmm".into())
            .spawn(move || {
                let spawned = jail.spawn(command);
                // The VM process has its own copies now, or never will.
                drop(vm_end);
                drop(tap);
                match spawned {
                    Ok(mut child) => {
                        let _ = started.send(Ok(child.id()));
                        let _ = child.wait();
                    }
                    Err(err) => {
                        let _ = started.send(Err(err));
                    }
                }
                // The jail ends with its VM process.
                drop(jail);
            })
            .map_err(spawn_err)?;
        let pid = pid
            .recv()
            .unwrap_or_else(|_| Err(io::Error::other("the VMM's thread ended")))
            .map_err(spawn_err)?;
        Ok(VmProcess {
            pid,
            waiter: Some(waiter),
            control,
            access,
        })
    }

    /// The VMM's pid.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Makes `image` ready for the VM process as a pod member's root
    /// disk in `dir` (a [`Files::member`] directory): the image linked in
    /// (or copied, across file systems) unless it is there already, an
    /// overlay of its own beside it, all given to the VM process's jail.
    /// Returns the disk to attach.
    pub fn member_disk(&self, image: &Path, dir: &Path) -> Result<DiskSource, VmError> {
        let prepare_err = |path: &Path| {
            let path = path.to_path_buf();
            move |source| VmError::Prepare { path, source }
        };
        fs::create_dir_all(dir).map_err(prepare_err(dir))?;
        let linked = dir.join("rootfs.kiln");
        if !image.starts_with(dir) {
            fs::hard_link(image, &linked)
                .or_else(|err| match err.raw_os_error() {
                    Some(libc::EXDEV) => fs::copy(image, &linked).map(drop),
                    _ => Err(err),
                })
                .map_err(prepare_err(&linked))?;
        }
        let overlay = dir.join("root.overlay");
        Volume::create(&linked, &overlay, CACHE_BYTES)?;
        if let Some(access) = &self.access {
            for owned in [dir.parent().unwrap_or(dir), dir, &overlay] {
                access.hand_over(owned)?;
            }
            access.share(&linked, false)?;
        }
        Ok(root_disk(&linked, overlay))
    }

    /// Has the VM process fill the empty drive `index` with `source`;
    /// returns once the guest has been told of its new capacity.
    pub fn attach(&mut self, index: usize, source: DiskSource) -> Result<(), VmError> {
        self.drive(
            "attach",
            index,
            ControlRequest::AttachDisk { index, source },
        )
    }

    /// Has the VM process empty the drive `index` again (its root released
    /// in the guest first: [`kiln_control::instance::exec::release_root`]);
    /// returns once the guest has been told its capacity is 0.
    pub fn detach(&mut self, index: usize) -> Result<(), VmError> {
        self.drive("detach", index, ControlRequest::DetachDisk { index })
    }

    /// Sends `request`, which `op`s drive `index`, and takes its answer.
    fn drive(
        &mut self,
        op: &'static str,
        index: usize,
        request: ControlRequest,
    ) -> Result<(), VmError> {
        let drive_err = |source| VmError::Drive { op, index, source };
        let reply = self
            .control
            .call(&request, DRIVE_TIMEOUT)
            .map_err(|err| drive_err(err.into()))?;
        match reply.error {
            Some(reason) => Err(drive_err(DriveError::Refused(reason))),
            None => Ok(()),
        }
    }

    /// Whether the VMM has ended (and been reaped).
    pub fn ended(&self) -> bool {
        self.waiter.as_ref().is_none_or(JoinHandle::is_finished)
    }

    /// Ends the VMM if it still runs, and waits until it has.
    pub fn stop(&mut self) {
        let Some(waiter) = self.waiter.take() else {
            return;
        };
        // Until its waiter has reaped it, the pid is still the VMM's.
        if !waiter.is_finished() {
            // SAFETY: kill takes no pointers; the pid is our unreaped child.
            unsafe { libc::kill(self.pid as libc::pid_t, libc::SIGKILL) };
        }
        let _ = waiter.join();
    }
}

/// A container VM's jail, if it has one: removed (its cgroup, its uid's
/// lease) when dropped, which is once its VM process has ended or when
/// none was started.
struct Jailed(Option<Arc<Jail>>);

impl Jailed {
    /// The jail of the VM whose files are in `files`, named by
    /// [`Files::jail_id`], with the group of `config`'s vCPUs and memory
    /// where the host has cgroup v2; `config` changes as a jail needs
    /// ([`Jail::prepare`]). None when the jail is off or this host cannot
    /// jail ([`JailSettings::warning_to`]).
    fn create(files: &Files, config: &mut VmConfig) -> Result<Jailed, JailError> {
        let Some(settings) = JailSettings::warning_to(warn_in_log)? else {
            return Ok(Jailed(None));
        };
        let id = files.jail_id();
        let jail = Jail::create(&settings, &id, files.dir(), config)?;
        log::info!("{id}: the VM process is jailed as uid {}", jail.uid());
        Ok(Jailed(Some(Arc::new(jail))))
    }

    /// Gives `path`, written for the VM process, to the jail's uid.
    fn hand_over(&self, path: &Path) -> Result<(), JailError> {
        self.0.as_ref().map_or(Ok(()), |jail| jail.hand_over(path))
    }

    /// Spawns `command` in the jail, or as it is without one. The
    /// command, which holds the jail too (its pre_exec), goes with the
    /// spawn, so that dropping `self` removes the jail.
    fn spawn(&self, mut command: Command) -> io::Result<Child> {
        if let Some(jail) = &self.0 {
            jail.confine(&mut command);
        }
        jail::spawn(&mut command, self.0.is_some())
    }
}

impl Drop for Jailed {
    fn drop(&mut self) {
        if let Some(jail) = self.0.take().and_then(Arc::into_inner) {
            jail.remove();
        }
    }
}

/// Says the jail's warnings (off, unavailable, without a cgroup) in the
/// shim's log, which containerd copies into its own: containerd gives a
/// shim daemon /dev/null for stderr.
fn warn_in_log(line: &str) {
    log::warn!("{line}");
}

/// The NIC's tap, handed down as descriptor `fd`: there must be one
/// exactly when `config` (from `definition`) has a NIC, and it must be the
/// tap the NIC names.
fn inherited_tap(
    fd: Option<&String>,
    config: &VmConfig,
    definition: &str,
) -> Result<Option<Tap>, Box<dyn std::error::Error>> {
    match (fd, &config.net) {
        (None, None) => Ok(None),
        // SAFETY: the shim handed this descriptor down, the NIC's tap, for
        // this purpose ([`inherit`]); nothing else here uses it.
        (Some(fd), Some(nic)) => Ok(Some(unsafe { Tap::adopt(fd.parse()?, &nic.tap) }?)),
        _ => Err(VmError::TapFd {
            definition: definition.into(),
            fd: fd.cloned(),
        }
        .into()),
    }
}

/// The VMM process (`__vm DEFINITION SHIM_PID CONTROL_FD [TAP_FD]`): tied
/// to the shim's life, runs the VM to its end, exits with its status.
pub fn run_vmm(args: &[String]) -> ExitCode {
    let started = Instant::now();
    let (definition, shim, control, tap_fd) = match args {
        [definition, shim, control] => (definition, shim, control, None),
        [definition, shim, control, tap_fd] => (definition, shim, control, Some(tap_fd)),
        _ => {
            eprintln!(
                "{VM_SUBCOMMAND}: expected DEFINITION SHIM_PID CONTROL_FD [TAP_FD], got {args:?}"
            );
            return ExitCode::from(VMM_ERROR_STATUS);
        }
    };
    let ran = (|| -> Result<u8, Box<dyn std::error::Error>> {
        let fd: RawFd = control.parse()?;
        // SAFETY: the shim passed this descriptor, its VM end of the
        // control channel, for this purpose ([`inherit`]); nothing else
        // here uses it.
        let control = unsafe { ControlListener::adopt(fd) };
        kiln_vmm::supervised::end_with(shim.parse()?)?;
        let config = VmConfig::load(Path::new(definition))?;
        let tap = inherited_tap(tap_fd, &config, definition)?;
        Ok(kiln_vmm::builder::run(&config, started, Some(control), tap)?.exit_status)
    })();
    ExitCode::from(ran.unwrap_or_else(|err| {
        eprintln!("containerd-shim-kiln-v2: {}", one_line(&*err));
        VMM_ERROR_STATUS
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::container_dir;

    #[test]
    fn a_jail_is_named_per_container_apart_from_kilns_instances() {
        let name = Files::new(container_dir("default", "web")).jail_id();
        let digest = name.strip_prefix("containerd-").unwrap_or_default();
        assert_eq!(digest.len(), 16, "{name}");
        assert!(digest.bytes().all(|b| b.is_ascii_hexdigit()), "{name}");
        // The same container keeps its name; the same id in another
        // namespace is another container, with a jail of its own.
        assert_eq!(Files::new(container_dir("default", "web")).jail_id(), name);
        assert_ne!(Files::new(container_dir("k8s.io", "web")).jail_id(), name);
    }
}
