//! A process's own root filesystem (`ExecRequest::root`): a pod's
//! container runs on its own disk, which the host attaches to one of the
//! VM's empty drives once the VM runs (the VMM's `attachdisk`).
//!
//! The host's answer comes before the guest has seen the disk: the VMM
//! raises a configuration change interrupt, and Linux's virtio_blk
//! re-reads the capacity from a work queue. So the first request naming
//! a device waits, for at most [`MEDIUM_TIMEOUT`], until sysfs gives the
//! device sectors; then mounts its ext4 filesystem under [`ROOTS_DIR`],
//! with /dev, /dev/shm, /dev/pts, /proc and /sys inside, and the pod's resolv.conf
//! over its own (when the pod has nameservers), once for every request
//! naming it (the container's first process and its execs). Each process
//! enters it in the child, before it drops to its user ([`enter`]): a
//! mount namespace of its own, chrooted there, its working directory
//! looked up there.
//!
//! [`release`] undoes it all when the host asks (a pod's container is
//! deleted): it ends the processes in the root, syncs the filesystem and
//! unmounts what [`mounted`] mounted, innermost first, so the host can
//! empty the drive (the VMM's `detachdisk`) and fill it again later. That
//! order matters: ext4 left mounted on a drive that is filled again would
//! write the old filesystem's metadata onto the new disk.
use std::collections::BTreeSet;
use std::ffi::CStr;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use crate::check;
use crate::mounts::MountPoint;
use crate::mounts::{self, MountError};
use crate::network::{GUEST_RESOLV_CONF, RESOLV_CONF};

/// Where each device's root filesystem is mounted, in a directory named
/// after the device (`/run/kiln/roots/vdb`).
pub const ROOTS_DIR: &str = "/run/kiln/roots";

/// How long a request waits for its device to have sectors: the host has
/// attached the disk before it sends the request, so only the guest
/// kernel's work queue stands between them.
pub const MEDIUM_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a release waits for the processes it killed to be gone: a
/// SIGKILL'ed process lets go of its root as it exits, unless it sleeps
/// uninterruptibly in the kernel (I/O on the very disk).
pub const END_TIMEOUT: Duration = Duration::from_secs(5);

/// How often the device's size (or a release's survivors) is looked at
/// meanwhile.
const POLL_INTERVAL: Duration = Duration::from_millis(20);

/// Where sysfs lists the block devices, each with its `size` (in 512-byte
/// sectors) and `ro`.
const SYS_BLOCK: &str = "/sys/class/block";

/// The devices whose root filesystems are mounted.
static MOUNTED: Mutex<BTreeSet<String>> = Mutex::new(BTreeSet::new());

/// Why a process's root could not be made ready.
#[derive(Debug, thiserror::Error)]
pub enum RootError {
    /// `root` is not a device path.
    #[error("root {0:?}: expected a block device path /dev/NAME")]
    BadPath(String),
    /// sysfs has no such block device.
    #[error("root {device}: no such block device ({path} is missing)")]
    NoDevice {
        /// The request's `root`.
        device: String,
        /// The sysfs file looked at.
        path: PathBuf,
    },
    /// A sysfs attribute of the device could not be read.
    #[error("root {device}: cannot read {path}")]
    Read {
        /// The request's `root`.
        device: String,
        /// The sysfs file.
        path: PathBuf,
        /// What the system said.
        #[source]
        source: io::Error,
    },
    /// A sysfs attribute that is not the number it should be.
    #[error("root {device}: {path} holds {text:?}, expected a number")]
    NotANumber {
        /// The request's `root`.
        device: String,
        /// The sysfs file.
        path: PathBuf,
        /// What it holds.
        text: String,
    },
    /// The device stayed empty: no disk was attached to its drive.
    #[error(
        "root {device}: no sectors after {} s, expected a disk attached to its drive",
        waited.as_secs()
    )]
    NoMedium {
        /// The request's `root`.
        device: String,
        /// How long the request waited.
        waited: Duration,
    },
    /// The root filesystem, or a kernel filesystem inside it, could not be
    /// mounted.
    #[error("root {device}")]
    Mount {
        /// The request's `root`.
        device: String,
        /// What could not be mounted.
        #[source]
        source: MountError,
    },
}

/// Why a root was not released.
#[derive(Debug, thiserror::Error)]
pub enum ReleaseError {
    /// `root` is not a device path.
    #[error(transparent)]
    Root(#[from] RootError),
    /// No request has mounted this device (or it was released already).
    #[error("root {device}: not a root filesystem guest-init has mounted")]
    NotMounted {
        /// The device named.
        device: String,
    },
    /// The mounted root could not be looked at, or synced.
    #[error("root {device}: {path}")]
    Io {
        /// The device named.
        device: String,
        /// The file looked at.
        path: PathBuf,
        /// What the system said.
        #[source]
        source: io::Error,
    },
    /// Processes in the root outlived their SIGKILL.
    #[error(
        "root {device}: processes {pids:?} still run there {} s after SIGKILL",
        waited.as_secs()
    )]
    Survivors {
        /// The device named.
        device: String,
        /// Their pids.
        pids: Vec<libc::pid_t>,
        /// How long the release waited.
        waited: Duration,
    },
    /// A mount could not be undone (its errno is the cause: EBUSY while
    /// something outside the root still uses it).
    #[error("root {device}: cannot unmount {path}")]
    Unmount {
        /// The device named.
        device: String,
        /// The mount point.
        path: PathBuf,
        /// What umount2 said.
        #[source]
        source: io::Error,
    },
}

/// The device's name in /dev and sysfs: `vdb` for `/dev/vdb`.
pub fn device_name(device: &str) -> Result<&str, RootError> {
    match device.strip_prefix("/dev/") {
        Some(name) if !name.is_empty() && !name.contains('/') && name != "." && name != ".." => {
            Ok(name)
        }
        _ => Err(RootError::BadPath(device.to_string())),
    }
}

/// The directory holding `device`'s root filesystem, mounted on the first
/// request that names it, once the device has sectors.
pub fn mounted(device: &str) -> Result<PathBuf, RootError> {
    let name = device_name(device)?;
    let sysfs = Path::new(SYS_BLOCK).join(name);
    wait_for_medium(&sysfs, device, MEDIUM_TIMEOUT)?;
    let target = Path::new(ROOTS_DIR).join(name);
    let mut mounted = MOUNTED.lock().unwrap_or_else(PoisonError::into_inner);
    if !mounted.contains(name) {
        let read_only = read_number(&sysfs.join("ro"), device)? != 0;
        mount_root(device, &target, read_only).map_err(|source| RootError::Mount {
            device: device.to_string(),
            source,
        })?;
        mounted.insert(name.to_string());
    }
    Ok(target)
}

/// Gives back `device`'s root filesystem: ends every process whose root
/// it is (SIGKILL, until none is left), syncs it and unmounts everything
/// mounted at or under it, innermost first. Requests naming the device
/// wait meanwhile; once released, the next one mounts the device again,
/// whatever disk its drive then holds.
pub fn release(device: &str) -> Result<(), ReleaseError> {
    let name = device_name(device)?;
    let mut mounted = MOUNTED.lock().unwrap_or_else(PoisonError::into_inner);
    if !mounted.contains(name) {
        return Err(ReleaseError::NotMounted {
            device: device.to_string(),
        });
    }
    let target = Path::new(ROOTS_DIR).join(name);
    end_processes_in(&target, device, END_TIMEOUT)?;
    unmount_all(&target, device)?;
    mounted.remove(name);
    Ok(())
}

/// SIGKILLs every process whose root directory is `root`, the root of a
/// filesystem of its own, until none is left, for at most `timeout`.
/// A killed process lets go of its root as it exits, before it is reaped
/// (PID 1's reaper reaps it, and a session waiting for it sends its host
/// the status).
fn end_processes_in(root: &Path, device: &str, timeout: Duration) -> Result<(), ReleaseError> {
    let filesystem = std::fs::metadata(root)
        .map_err(io_error(device, root))?
        .dev();
    let started = Instant::now();
    loop {
        let inside = processes_rooted_on(filesystem).map_err(io_error(device, PROC))?;
        if inside.is_empty() {
            return Ok(());
        }
        if started.elapsed() >= timeout {
            return Err(ReleaseError::Survivors {
                device: device.to_string(),
                pids: inside,
                waited: started.elapsed(),
            });
        }
        for &pid in &inside {
            // SAFETY: kill takes no pointers. The pid was read just now,
            // and only a process that ended and was reaped since could
            // have handed its pid on: the kernel hands out pids in order
            // (pid_max at least 32768), so it is not another's so soon.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        std::thread::sleep(POLL_INTERVAL);
    }
}

/// Where the kernel lists processes, each with its root directory.
const PROC: &str = "/proc";

/// The processes whose root directory lies on filesystem `dev` (a
/// process that has just exited has none, and is not listed).
fn processes_rooted_on(dev: u64) -> io::Result<Vec<libc::pid_t>> {
    let mut pids = Vec::new();
    for entry in std::fs::read_dir(PROC)? {
        let entry = entry?;
        let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse().ok()) else {
            continue;
        };
        if std::fs::metadata(entry.path().join("root")).is_ok_and(|m| m.dev() == dev) {
            pids.push(pid);
        }
    }
    Ok(pids)
}

/// Syncs the filesystem mounted on `root`, then unmounts it and every
/// mount under it, the last mounted first.
fn unmount_all(root: &Path, device: &str) -> Result<(), ReleaseError> {
    let mountinfo = std::fs::read_to_string(MOUNTINFO).map_err(io_error(device, MOUNTINFO))?;
    sync_filesystem(root).map_err(io_error(device, root))?;
    for place in mounts::mounts_under(&mountinfo, root).iter().rev() {
        mounts::unmount(place).map_err(|source| ReleaseError::Unmount {
            device: device.to_string(),
            path: place.clone(),
            source,
        })?;
    }
    Ok(())
}

/// A release's I/O error about `path`, for `map_err`.
fn io_error(device: &str, path: impl AsRef<Path>) -> impl FnOnce(io::Error) -> ReleaseError {
    let (device, path) = (device.to_string(), path.as_ref().to_path_buf());
    move |source| ReleaseError::Io {
        device,
        path,
        source,
    }
}

/// This process's mounts.
const MOUNTINFO: &str = "/proc/self/mountinfo";

/// syncfs(2) of the filesystem holding `path`: its writes reach the disk
/// now, and an unmount that fails leaves none behind in memory.
fn sync_filesystem(path: &Path) -> io::Result<()> {
    let dir = std::fs::File::open(path)?;
    // SAFETY: syncfs takes an open descriptor, which `dir` keeps open.
    check(unsafe { libc::syncfs(dir.as_raw_fd()) })
}

/// Waits until the block device whose sysfs directory is `sysfs` has
/// sectors, for at most `timeout`.
pub fn wait_for_medium(sysfs: &Path, device: &str, timeout: Duration) -> Result<(), RootError> {
    let started = Instant::now();
    let size = sysfs.join("size");
    while read_number(&size, device)? == 0 {
        if started.elapsed() >= timeout {
            return Err(RootError::NoMedium {
                device: device.to_string(),
                waited: started.elapsed(),
            });
        }
        std::thread::sleep(POLL_INTERVAL);
    }
    Ok(())
}

/// A sysfs attribute holding one number.
fn read_number(path: &Path, device: &str) -> Result<u64, RootError> {
    let text = std::fs::read_to_string(path).map_err(|source| match source.kind() {
        io::ErrorKind::NotFound => RootError::NoDevice {
            device: device.to_string(),
            path: path.to_path_buf(),
        },
        _ => RootError::Read {
            device: device.to_string(),
            path: path.to_path_buf(),
            source,
        },
    })?;
    text.trim().parse().map_err(|_| RootError::NotANumber {
        device: device.to_string(),
        path: path.to_path_buf(),
        text,
    })
}

/// Mounts `device`'s ext4 filesystem on `target` (read-only if the drive
/// is), then the kernel's filesystems inside it.
fn mount_root(device: &str, target: &Path, read_only: bool) -> Result<(), MountError> {
    std::fs::create_dir_all(target).map_err(|source| MountError::Create {
        path: target.to_path_buf(),
        source,
    })?;
    let flags = if read_only { libc::MS_RDONLY } else { 0 };
    mounts::mount(device, target, "ext4", flags).map_err(|source| MountError::Mount {
        what: device.to_string(),
        target: target.to_path_buf(),
        source,
    })?;
    mounts::mount_kernel_filesystems(target)?;
    share_pod_dns(device, target);
    Ok(())
}

/// Gives the root at `target` the pod's resolv.conf, which guest-init
/// wrote when the command line named nameservers: bind-mounted over the
/// root's own, as CRI mounts the sandbox's file into each container.
/// Without it the container keeps its image's file, which the console is
/// told; that is no reason to refuse the container.
fn share_pod_dns(device: &str, target: &Path) {
    let kept = Path::new(GUEST_RESOLV_CONF);
    if !kept.exists() {
        return;
    }
    if let Err(err) = mounts::bind_into(kept, target, RESOLV_CONF, MountPoint::File, false) {
        eprintln!(
            "guest-init: root {device}: cannot mount {GUEST_RESOLV_CONF} on its {RESOLV_CONF} ({err}): it keeps its image's nameservers"
        );
    }
}

/// In a child between fork and exec, still root: a mount namespace of its
/// own (its mounts private, so none it makes reaches the guest's), `root`
/// as its root directory, and `workdir` (inside it) as its working
/// directory. Only system calls: async-signal-safe.
pub fn enter(root: &CStr, workdir: &CStr) -> io::Result<()> {
    // SAFETY: unshare takes flags only.
    check(unsafe { libc::unshare(libc::CLONE_NEWNS) })?;
    mounts::change_mount(c"/", libc::MS_REC | libc::MS_PRIVATE)?;
    // SAFETY: `root` is a valid NUL-terminated path.
    check(unsafe { libc::chroot(root.as_ptr()) })?;
    // SAFETY: `workdir` is a valid NUL-terminated path.
    check(unsafe { libc::chdir(workdir.as_ptr()) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_device_path_names_a_root() {
        assert_eq!(device_name("/dev/vdb").unwrap(), "vdb");
        for bad in [
            "vdb",
            "/dev/",
            "/dev/../etc",
            "/dev/mapper/x",
            "/tmp/vdb",
            "",
        ] {
            let err = device_name(bad).unwrap_err();
            assert_eq!(
                err.to_string(),
                format!("root {bad:?}: expected a block device path /dev/NAME")
            );
        }
    }

    /// A tmpfs mounted on `name` in a new temporary directory, standing
    /// in for a device's root filesystem.
    fn tmpfs_root(name: &str) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join(name);
        std::fs::create_dir(&root).unwrap();
        mounts::mount("tmpfs", &root, "tmpfs", 0).unwrap();
        (dir, root)
    }

    #[test]
    fn a_release_ends_the_processes_in_the_root_then_unmounts_it_innermost_first() {
        use std::os::unix::process::CommandExt;
        let (_dir, root) = tmpfs_root("vdb");
        mounts::mount_kernel_filesystems(&root).unwrap();
        std::fs::create_dir(root.join("bin")).unwrap();
        std::fs::copy("/bin/busybox", root.join("bin/busybox")).unwrap();
        let root_c = std::ffi::CString::new(root.as_os_str().as_encoded_bytes()).unwrap();
        let mut command = std::process::Command::new("/bin/busybox");
        command.args(["sleep", "1000"]);
        // SAFETY: `enter` makes only system calls (async-signal-safe).
        unsafe { command.pre_exec(move || enter(&root_c, c"/")) };
        let mut sleeper = command.spawn().unwrap();
        let filesystem = std::fs::metadata(&root).unwrap().dev();
        let started = Instant::now();
        while processes_rooted_on(filesystem).unwrap().is_empty() {
            assert!(started.elapsed() < Duration::from_secs(5), "never entered");
            std::thread::sleep(POLL_INTERVAL);
        }

        end_processes_in(&root, "/dev/vdb", Duration::from_secs(5)).unwrap();
        unmount_all(&root, "/dev/vdb").unwrap();
        let status = sleeper.wait().unwrap();
        assert_eq!(
            std::os::unix::process::ExitStatusExt::signal(&status),
            Some(libc::SIGKILL)
        );
        let mountinfo = std::fs::read_to_string(MOUNTINFO).unwrap();
        assert_eq!(mounts::mounts_under(&mountinfo, &root), [] as [PathBuf; 0]);
        assert!(!root.join("bin").exists(), "the tmpfs is still there");
    }

    #[test]
    fn a_busy_root_is_refused_with_its_errno_and_an_unknown_one_by_name() {
        let (_dir, root) = tmpfs_root("vdc");
        let busy = std::fs::File::create(root.join("open")).unwrap();
        let err = unmount_all(&root, "/dev/vdc").unwrap_err();
        assert_eq!(
            crate::one_line(&err),
            format!(
                "root /dev/vdc: cannot unmount {}: Device or resource busy (os error 16)",
                root.display()
            )
        );
        drop(busy);
        unmount_all(&root, "/dev/vdc").unwrap();
        let err = release("/dev/vdz").unwrap_err();
        assert_eq!(
            err.to_string(),
            "root /dev/vdz: not a root filesystem guest-init has mounted"
        );
        let err = release("vdz").unwrap_err();
        assert!(
            matches!(err, ReleaseError::Root(RootError::BadPath(_))),
            "{err}"
        );
    }

    #[test]
    fn a_device_is_waited_for_until_it_has_sectors() {
        let sysfs = tempfile::tempdir().unwrap();
        let size = sysfs.path().join("size");
        std::fs::write(&size, "0\n").unwrap();
        let filler = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            std::fs::write(&size, "2048\n").unwrap();
        });
        let started = Instant::now();
        wait_for_medium(sysfs.path(), "/dev/vdb", Duration::from_secs(10)).unwrap();
        assert!(started.elapsed() >= Duration::from_millis(100));
        filler.join().unwrap();
    }

    #[test]
    fn a_device_that_stays_empty_or_is_not_there_is_an_error_by_name() {
        let sysfs = tempfile::tempdir().unwrap();
        let err = wait_for_medium(sysfs.path(), "/dev/vdz", Duration::ZERO).unwrap_err();
        assert!(matches!(err, RootError::NoDevice { .. }), "{err}");
        assert!(
            err.to_string()
                .starts_with("root /dev/vdz: no such block device")
        );
        std::fs::write(sysfs.path().join("size"), "0\n").unwrap();
        let started = Instant::now();
        let err = wait_for_medium(sysfs.path(), "/dev/vdc", Duration::from_millis(60)).unwrap_err();
        assert!(started.elapsed() >= Duration::from_millis(60));
        assert_eq!(
            err.to_string(),
            "root /dev/vdc: no sectors after 0 s, expected a disk attached to its drive"
        );
        std::fs::write(sysfs.path().join("size"), "lots\n").unwrap();
        let err = wait_for_medium(sysfs.path(), "/dev/vdc", Duration::ZERO).unwrap_err();
        assert!(
            err.to_string()
                .contains("holds \"lots\\n\", expected a number"),
            "{err}"
        );
    }
}
