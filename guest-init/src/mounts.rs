//! The filesystems every guest expects, mounted by PID 1.
use std::ffi::CString;
use std::io;

/// (source/type, target, flags). devtmpfs first: the console lives there.
const MOUNTS: [(&str, &str, libc::c_ulong); 5] = [
    ("devtmpfs", "/dev", libc::MS_NOSUID),
    (
        "proc",
        "/proc",
        libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
    ),
    (
        "sysfs",
        "/sys",
        libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
    ),
    ("tmpfs", "/tmp", libc::MS_NOSUID | libc::MS_NODEV),
    ("tmpfs", "/run", libc::MS_NOSUID | libc::MS_NODEV),
];

/// Mounts /dev, /proc, /sys, /tmp and /run, creating the mount points.
/// A filesystem already mounted there (the kernel's devtmpfs automount)
/// is fine.
pub fn mount_all() -> io::Result<()> {
    for (fstype, target, flags) in MOUNTS {
        std::fs::create_dir_all(target)
            .map_err(|err| io::Error::new(err.kind(), format!("cannot create {target}: {err}")))?;
        mount(fstype, target, flags)
            .or_else(|err| {
                if err.raw_os_error() == Some(libc::EBUSY) {
                    Ok(())
                } else {
                    Err(err)
                }
            })
            .map_err(|err| {
                io::Error::new(
                    err.kind(),
                    format!("cannot mount {fstype} on {target}: {err}"),
                )
            })?;
    }
    Ok(())
}

fn mount(fstype: &str, target: &str, flags: libc::c_ulong) -> io::Result<()> {
    let source = CString::new(fstype)?;
    let target = CString::new(target)?;
    // SAFETY: all pointers are valid NUL-terminated strings that outlive
    // the call; a null `data` means no filesystem options.
    let rc = unsafe {
        libc::mount(
            source.as_ptr(),
            target.as_ptr(),
            source.as_ptr(),
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
    let root = CString::new("/")?;
    // SAFETY: `root` is a valid NUL-terminated path; a remount takes no
    // source, type or data.
    let rc = unsafe {
        libc::mount(
            std::ptr::null(),
            root.as_ptr(),
            std::ptr::null(),
            libc::MS_REMOUNT | libc::MS_RDONLY,
            std::ptr::null(),
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}
