//! A process's own root filesystem (`ExecRequest::root`): a pod's
//! container runs on its own disk, which the host attaches to one of the
//! VM's empty drives once the VM runs (the VMM's `attachdisk`).
//!
//! The host's answer comes before the guest has seen the disk: the VMM
//! raises a configuration change interrupt, and Linux's virtio_blk
//! re-reads the capacity from a work queue. So the first request naming
//! a device waits, for at most [`MEDIUM_TIMEOUT`], until sysfs gives the
//! device sectors; then mounts its ext4 filesystem under [`ROOTS_DIR`],
//! with /dev, /dev/pts, /proc and /sys inside, once for every request
//! naming it (the container's first process and its execs). Each process
//! enters it in the child, before it drops to its user ([`enter`]): a
//! mount namespace of its own, chrooted there, its working directory
//! looked up there.
use std::collections::BTreeSet;
use std::ffi::CStr;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use crate::mounts::{self, MountError};

/// Where each device's root filesystem is mounted, in a directory named
/// after the device (`/run/kiln/roots/vdb`).
pub const ROOTS_DIR: &str = "/run/kiln/roots";

/// How long a request waits for its device to have sectors: the host has
/// attached the disk before it sends the request, so only the guest
/// kernel's work queue stands between them.
pub const MEDIUM_TIMEOUT: Duration = Duration::from_secs(10);

/// How often the device's size is looked at meanwhile.
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
    mounts::mount_kernel_filesystems(target)
}

/// In a child between fork and exec, still root: a mount namespace of its
/// own (its mounts private, so none it makes reaches the guest's), `root`
/// as its root directory, and `workdir` (inside it) as its working
/// directory. Only system calls: async-signal-safe.
pub fn enter(root: &CStr, workdir: &CStr) -> io::Result<()> {
    let check = |rc: libc::c_int| {
        if rc == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    };
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
