//! The filesystems every guest expects, mounted by PID 1.
use std::ffi::CString;
use std::io;

/// (source/type, target, flags, errors that are fine besides EBUSY).
/// devtmpfs first: the console lives there. devpts next: opening
/// /dev/ptmx needs it at /dev/pts (the kernel finds its devpts instance
/// by looking up `pts` beside the ptmx node, fs/devpts/inode.c,
/// devpts_ptmx_path, and fails with ENOENT without it); a kernel without
/// pseudo-terminals has no devpts (ENODEV), and `kiln exec -t` is then
/// refused with its reason.
const MOUNTS: [(&str, &str, libc::c_ulong, &[i32]); 6] = [
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
    ("tmpfs", "/tmp", libc::MS_NOSUID | libc::MS_NODEV, &[]),
    ("tmpfs", "/run", libc::MS_NOSUID | libc::MS_NODEV, &[]),
];

/// Mounts /dev, /dev/pts, /proc, /sys, /tmp and /run, creating the mount
/// points. A filesystem already mounted there (the kernel's devtmpfs
/// automount) is fine.
pub fn mount_all() -> io::Result<()> {
    for (fstype, target, flags, also_fine) in MOUNTS {
        mount_at(fstype, target, flags, also_fine)?;
    }
    Ok(())
}

/// Mounts `fstype` on `target`, creating it. One already there is fine,
/// and so are the errors `also_fine`.
fn mount_at(fstype: &str, target: &str, flags: libc::c_ulong, also_fine: &[i32]) -> io::Result<()> {
    std::fs::create_dir_all(target)
        .map_err(|err| io::Error::new(err.kind(), format!("cannot create {target}: {err}")))?;
    match mount(fstype, target, flags) {
        Err(err)
            if !err
                .raw_os_error()
                .is_some_and(|errno| errno == libc::EBUSY || also_fine.contains(&errno)) =>
        {
            Err(io::Error::new(
                err.kind(),
                format!("cannot mount {fstype} on {target}: {err}"),
            ))
        }
        _ => Ok(()),
    }
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
