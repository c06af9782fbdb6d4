//! The filesystems every guest expects, mounted by PID 1; and the kernel's
//! filesystems inside a process's own root (`guest_init::roots`).
use std::ffi::{CStr, CString};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// A filesystem PID 1 mounts: (type, where, flags, errors that are fine
/// besides EBUSY).
type Mount = (&'static str, &'static str, libc::c_ulong, &'static [i32]);

/// The kernel's filesystems, which a root of its own needs too.
/// devtmpfs first: the console lives there. devpts next: opening
/// /dev/ptmx needs it at /dev/pts (the kernel finds its devpts instance
/// by looking up `pts` beside the ptmx node, fs/devpts/inode.c,
/// devpts_ptmx_path, and fails with ENOENT without it); a kernel without
/// pseudo-terminals has no devpts (ENODEV), and `kiln exec -t` is then
/// refused with its reason.
const KERNEL_FILESYSTEMS: [Mount; 4] = [
    ("devtmpfs", "/dev", libc::MS_NOSUID, &[]),
    (
        "devpts",
        "/dev/pts",
        libc::MS_NOSUID | libc::MS_NOEXEC,
        &[libc::ENODEV],
    ),
    (
        "proc",
        "/proc",
        libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
        &[],
    ),
    (
        "sysfs",
        "/sys",
        libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
        &[],
    ),
];

/// The guest's scratch space, in memory.
const SCRATCH: [Mount; 2] = [
    ("tmpfs", "/tmp", libc::MS_NOSUID | libc::MS_NODEV, &[]),
    ("tmpfs", "/run", libc::MS_NOSUID | libc::MS_NODEV, &[]),
];

/// Why a filesystem could not be mounted.
#[derive(Debug, thiserror::Error)]
pub enum MountError {
    /// The mount point could not be made.
    #[error("cannot create {path}")]
    Create {
        /// The mount point.
        path: PathBuf,
        /// What the system said.
        #[source]
        source: io::Error,
    },
    /// mount(2) refused.
    #[error("cannot mount {what} on {target}")]
    Mount {
        /// The filesystem type, or the device, mounted.
        what: String,
        /// The mount point.
        target: PathBuf,
        /// What the system said.
        #[source]
        source: io::Error,
    },
}

/// Mounts /dev, /dev/pts, /proc, /sys, /tmp and /run, creating the mount
/// points. A filesystem already mounted there (the kernel's devtmpfs
/// automount) is fine.
pub fn mount_all() -> Result<(), MountError> {
    KERNEL_FILESYSTEMS
        .iter()
        .chain(&SCRATCH)
        .try_for_each(|mount| mount_under(Path::new("/"), mount))
}

/// Mounts /dev, /dev/pts, /proc and /sys inside `root` (a process's own
/// root filesystem), creating the mount points.
pub fn mount_kernel_filesystems(root: &Path) -> Result<(), MountError> {
    KERNEL_FILESYSTEMS
        .iter()
        .try_for_each(|mount| mount_under(root, mount))
}

/// Mounts `fstype` on its place under `root`, creating it. One already
/// there is fine, and so are the errors the entry allows.
fn mount_under(root: &Path, &(fstype, place, flags, also_fine): &Mount) -> Result<(), MountError> {
    let target = root.join(place.trim_start_matches('/'));
    std::fs::create_dir_all(&target).map_err(|source| MountError::Create {
        path: target.clone(),
        source,
    })?;
    match mount(fstype, &target, fstype, flags) {
        Err(source)
            if !source
                .raw_os_error()
                .is_some_and(|errno| errno == libc::EBUSY || also_fine.contains(&errno)) =>
        {
            Err(MountError::Mount {
                what: fstype.to_string(),
                target,
                source,
            })
        }
        _ => Ok(()),
    }
}

/// mount(2) of `source` (a device, or a pseudo filesystem's name) on
/// `target` as `fstype`, without filesystem options.
pub fn mount(source: &str, target: &Path, fstype: &str, flags: libc::c_ulong) -> io::Result<()> {
    let source = CString::new(source)?;
    let target = CString::new(target.as_os_str().as_bytes())?;
    let fstype = CString::new(fstype)?;
    // SAFETY: all pointers are valid NUL-terminated strings that outlive
    // the call; a null `data` means no filesystem options.
    let rc = unsafe {
        libc::mount(
            source.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            flags,
            std::ptr::null(),
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Remounts the root filesystem read-only: its superblock goes read-only,
/// so ext4 flushes and closes its journal and the next mount needs no
/// recovery (a read-only next boot could not replay it).
pub fn remount_root_read_only() -> io::Result<()> {
    change_mount(c"/", libc::MS_REMOUNT | libc::MS_RDONLY)
}

/// mount(2) that changes the mount at `target` (a remount, a propagation
/// type) as `flags` say. Only the system call: a child between fork and
/// exec may make it.
pub fn change_mount(target: &CStr, flags: libc::c_ulong) -> io::Result<()> {
    // SAFETY: `target` is a valid NUL-terminated path; a change of a mount
    // takes no source, type or data.
    let rc = unsafe {
        libc::mount(
            std::ptr::null(),
            target.as_ptr(),
            std::ptr::null(),
            flags,
            std::ptr::null(),
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}
