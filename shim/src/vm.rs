//! A container's VM: its definition (the root disk with an overlay of its
//! own, a vsock device for guest-init's exec port, the spec's size, and
//! the kernel command line that makes guest-init a container's PID 1) and
//! its VMM process, this binary again as `containerd-shim-kiln-v2 __vm`.
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::sync::mpsc;
use std::thread::{self, JoinHandle};
use std::time::Instant;

use guest_init::exec::CONTAINER_CMDLINE_FLAG;
use kiln_vmm::config::{Boot, ConfigError, DiskConfig, DiskSource, VmConfig, VsockConfig};
use kiln_vmm::machine::VMM_ERROR_STATUS;
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
    /// The VMM process cannot be started.
    #[error("cannot start the VMM process (console {console})")]
    Spawn {
        /// Where its console was to go.
        console: PathBuf,
        /// What the system said.
        #[source]
        source: io::Error,
    },
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

    fn definition(&self) -> PathBuf {
        self.dir.join("vm.json")
    }
}

/// The VM of `container`: `kernel` booting `image` (with an overlay made
/// in `files`), written to its definition file.
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
            source: DiskSource::Volume {
                image: image.to_path_buf(),
                overlay: Some(overlay),
                cache_bytes: CACHE_BYTES,
                hydration: None,
            },
            read_only: false,
            ephemeral: false,
        }],
        vcpus: container.vcpus,
        memory_mib: container.memory_mib,
        extra_cmdline: words.join(" "),
        seccomp: true,
        vsock: Some(VsockConfig {
            cid: GUEST_CID,
            socket: files.vsock(),
        }),
        net: None,
        announce_boot: false,
    };
    config.save(&files.definition())?;
    Ok(config)
}

/// A container's VMM process, and the thread that started it and waits
/// for it. The VMM ends with the thread that started it (the parent-death
/// signal follows the thread, not the process), so that thread lives as
/// long as the VMM, never a request's.
pub struct VmProcess {
    pid: u32,
    waiter: Option<JoinHandle<()>>,
}

impl VmProcess {
    /// Starts the VMM process of the definition in `files`, its console
    /// into the console file; it ends when this process does.
    pub fn spawn(files: &Files) -> Result<VmProcess, VmError> {
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
            .arg(files.definition())
            .arg(std::process::id().to_string())
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(spawn_err)?)
            .stderr(log);
        let (started, pid) = mpsc::channel();
        let waiter = thread::Builder::new()
            .name("vmm".into())
            .spawn(move || match command.spawn() {
                Ok(mut child) => {
                    let _ = started.send(Ok(child.id()));
                    let _ = child.wait();
                }
                Err(err) => {
                    let _ = started.send(Err(err));
                }
            })
            .map_err(spawn_err)?;
        let pid = pid
            .recv()
            .unwrap_or_else(|_| Err(io::Error::other("the VMM's thread ended")))
            .map_err(spawn_err)?;
        Ok(VmProcess {
            pid,
            waiter: Some(waiter),
        })
    }

    /// The VMM's pid.
    pub fn pid(&self) -> u32 {
        self.pid
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

/// The VMM process (`__vm DEFINITION SHIM_PID`): tied to the shim's life,
/// runs the VM to its end, exits with its status.
pub fn run_vmm(args: &[String]) -> ExitCode {
    let started = Instant::now();
    let [definition, shim] = args else {
        eprintln!("{VM_SUBCOMMAND}: expected DEFINITION SHIM_PID, got {args:?}");
        return ExitCode::from(VMM_ERROR_STATUS);
    };
    let ran = (|| -> Result<u8, Box<dyn std::error::Error>> {
        kiln_vmm::supervised::end_with(shim.parse()?)?;
        let config = VmConfig::load(Path::new(definition))?;
        Ok(kiln_vmm::builder::run(&config, started, None, None)?.exit_status)
    })();
    ExitCode::from(ran.unwrap_or_else(|err| {
        eprintln!(
            "containerd-shim-kiln-v2: {}",
            kiln_vmm::report::one_line(&*err)
        );
        VMM_ERROR_STATUS
    }))
}
