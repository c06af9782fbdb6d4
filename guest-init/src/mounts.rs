//! The filesystems every guest expects, mounted by PID 1; and the kernel's
//! filesystems inside a process's own root (`guest_init::roots`).
use std::ffi::{CStr, CString, OsString};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};

use crate::check;

/// A filesystem PID 1 mounts: (type, where, flags, errors that are fine
/// besides EBUSY).
type Mount = (&'static str, &'static str, libc::c_ulong, &'static [i32]);

/// The kernel's filesystems, which a root of its own needs too.
/// devtmpfs first: the console lives there. /dev/shm next, POSIX shared
/// memory's (shm_open(3)), as Docker gives every container. devpts next: opening
/// /dev/ptmx needs it at /dev/pts (the kernel finds its devpts instance
/// by looking up `pts` beside the ptmx node, fs/devpts/inode.c,
/// devpts_ptmx_path, and fails with ENOENT without it); a kernel without
/// pseudo-terminals has no devpts (ENODEV), and `kiln exec -t` is then
/// refused with its reason.
const KERNEL_FILESYSTEMS: [Mount; 5] = [
    ("devtmpfs", "/dev", libc::MS_NOSUID, &[]),
    ("tmpfs", "/dev/shm", libc::MS_NOSUID | libc::MS_NODEV, &[]),
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

/// Mounts /dev, /dev/shm, /dev/pts, /proc, /sys, /tmp and /run, creating the mount
/// points. A filesystem already mounted there (the kernel's devtmpfs
/// automount) is fine.
pub fn mount_all() -> Result<(), MountError> {
    KERNEL_FILESYSTEMS
        .iter()
        .chain(&SCRATCH)
        .try_for_each(|mount| mount_under(Path::new("/"), mount))
}

/// Mounts /dev, /dev/shm, /dev/pts, /proc and /sys inside `root` (a process's own
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
    check(rc)
}

/// What a bind mount's target is, and is made as when missing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MountPoint {
    /// A file (an empty one is made).
    File,
    /// A directory.
    Dir,
}

/// Bind-mounts `source` (a path of the guest's) over `destination` (an
/// absolute path) inside `root`, found as the root's own processes would
/// find it: a symlink on the way resolves inside `root`, never out of it
/// (openat2's RESOLVE_IN_ROOT), and the mount is made on what was found,
/// through its descriptor. What is missing of `destination` is made, its
/// directories and the `point` itself, as runc makes a bind mount's
/// target (in a read-only root that fails with EROFS). `read_only`
/// remounts the bind read-only.
pub fn bind_into(
    source: &Path,
    root: &Path,
    destination: &str,
    point: MountPoint,
    read_only: bool,
) -> io::Result<()> {
    let root = std::fs::File::open(root)?;
    let relative = destination.trim_start_matches('/');
    let target = match open_in_root(&root, relative, libc::O_PATH) {
        Err(err) if err.kind() == io::ErrorKind::NotFound => {
            make_in_root(&root, relative, point)?;
            open_in_root(&root, relative, libc::O_PATH)?
        }
        found => found?,
    };
    let source = source.to_str().ok_or(io::ErrorKind::InvalidInput)?;
    mount(source, &fd_path(&target), "", libc::MS_BIND)?;
    if read_only {
        // The bind's own root, which now covers the descriptor's file.
        let bound = open_in_root(&root, relative, libc::O_PATH)?;
        let flags = libc::MS_REMOUNT | libc::MS_BIND | libc::MS_RDONLY;
        change_mount(
            &CString::new(fd_path(&bound).into_os_string().into_vec())?,
            flags,
        )?;
    }
    Ok(())
}

/// The magic link through which a descriptor's file is named.
fn fd_path(fd: &OwnedFd) -> PathBuf {
    PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()))
}

/// openat2(2) of `path` under `root` with `flags`, resolved as if `root`
/// were `/`, no magic link (/proc/…/fd) followed.
fn open_in_root(root: &std::fs::File, path: &str, flags: libc::c_int) -> io::Result<OwnedFd> {
    let path = CString::new(path)?;
    // SAFETY: open_how is plain old data, all zeroes valid (no mode).
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = (flags | libc::O_CLOEXEC) as u64;
    how.resolve = libc::RESOLVE_IN_ROOT | libc::RESOLVE_NO_MAGICLINKS;
    // SAFETY: `path` is a valid NUL-terminated string and `how` a valid
    // open_how whose size is passed; both outlive the call. `root` is an
    // open descriptor.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            root.as_raw_fd(),
            path.as_ptr(),
            &how as *const libc::open_how,
            std::mem::size_of::<libc::open_how>(),
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: openat2 returned a new descriptor, owned by nothing else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// Makes `path` under `root` as `point`, and the directories before it
/// that are missing, each by its one name in its parent (found inside
/// the root). Nothing already there is followed or replaced: a dangling
/// symlink in the way fails with EEXIST.
fn make_in_root(root: &std::fs::File, path: &str, point: MountPoint) -> io::Result<()> {
    let names: Vec<&str> = path.split('/').filter(|n| !n.is_empty()).collect();
    let Some((last, parents)) = names.split_last() else {
        return Err(io::ErrorKind::AlreadyExists.into());
    };
    let mut parent = root.try_clone()?;
    let mut so_far = String::new();
    for name in parents {
        so_far.push_str(name);
        let dir = match open_in_root(root, &so_far, libc::O_RDONLY | libc::O_DIRECTORY) {
            Err(err) if err.kind() == io::ErrorKind::NotFound => {
                make_at(&parent, name, MountPoint::Dir)?;
                open_in_root(root, &so_far, libc::O_RDONLY | libc::O_DIRECTORY)?
            }
            found => found?,
        };
        parent = std::fs::File::from(dir);
        so_far.push('/');
    }
    make_at(&parent, last, point)
}

/// Makes `name` in the directory `parent` as `point`: a directory, or an
/// empty file (never through a link, never over anything).
fn make_at(parent: &std::fs::File, name: &str, point: MountPoint) -> io::Result<()> {
    let name = CString::new(name)?;
    if point == MountPoint::Dir {
        // SAFETY: `name` is a valid NUL-terminated string of one path
        // component, and `parent` an open directory.
        return check(unsafe { libc::mkdirat(parent.as_raw_fd(), name.as_ptr(), 0o755) });
    }
    let flags = libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW | libc::O_CLOEXEC;
    // SAFETY: `name` is a valid NUL-terminated string and `parent` an open
    // directory; the mode is an int, as openat's variadic argument takes.
    let fd = unsafe {
        libc::openat(
            parent.as_raw_fd(),
            name.as_ptr(),
            flags,
            0o644 as libc::c_uint,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: openat returned a new descriptor; it is closed here.
    drop(unsafe { OwnedFd::from_raw_fd(fd) });
    Ok(())
}

/// umount2(2) of the filesystem mounted on `target`, without flags: it
/// fails with EBUSY while anything still uses it, rather than detaching
/// it lazily and leaving the disk in use.
pub fn unmount(target: &Path) -> io::Result<()> {
    let target = CString::new(target.as_os_str().as_bytes())?;
    // SAFETY: `target` is a valid NUL-terminated path that outlives the call.
    check(unsafe { libc::umount2(target.as_ptr(), 0) })
}

/// The mount points in `mountinfo` (the text of /proc/self/mountinfo) at
/// or under `root`, in the order they were mounted: a mount on top of
/// another comes after it. Its fifth field is the mount point, with
/// space, tab, newline and backslash escaped in octal (proc(5)).
pub fn mounts_under(mountinfo: &str, root: &Path) -> Vec<PathBuf> {
    mountinfo
        .lines()
        .filter_map(|line| line.split(' ').nth(4))
        .map(unescape_octal)
        .filter(|place| place.starts_with(root))
        .collect()
}

/// A mountinfo field with its `\NNN` octal escapes undone.
fn unescape_octal(field: &str) -> PathBuf {
    let mut out = Vec::with_capacity(field.len());
    let bytes = field.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let escaped = bytes.get(i + 1..i + 4).and_then(|digits| {
            let digits = std::str::from_utf8(digits).ok()?;
            u8::from_str_radix(digits, 8).ok()
        });
        match (bytes[i], escaped) {
            (b'\\', Some(byte)) => {
                out.push(byte);
                i += 4;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    PathBuf::from(OsString::from_vec(out))
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
    check(rc)
}

/// Runs `body` on a thread of its own in a mount namespace of its own,
/// whose mounts reach no other thread and end with it: a test's mounts.
#[cfg(test)]
pub(crate) fn in_own_mount_namespace(body: impl FnOnce() + Send + 'static) {
    std::thread::spawn(|| {
        // SAFETY: unshare takes flags only; it moves only this thread.
        check(unsafe { libc::unshare(libc::CLONE_NEWNS) }).unwrap();
        change_mount(c"/", libc::MS_REC | libc::MS_PRIVATE).unwrap();
        body();
    })
    .join()
    .unwrap();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bind_target_is_found_inside_the_root_and_made_when_missing() {
        let source = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(source.path(), "nameserver 10.96.0.10\n").unwrap();
        let source = source.path().to_path_buf();
        let bare = tempfile::tempdir().unwrap();
        let with_file = tempfile::tempdir().unwrap();
        std::fs::create_dir(with_file.path().join("etc")).unwrap();
        std::fs::write(with_file.path().join("etc/resolv.conf"), "image's\n").unwrap();
        // A link that, followed from the guest's root, would lead to the
        // source itself: inside the root it leads nowhere.
        let linked = tempfile::tempdir().unwrap();
        std::fs::create_dir(linked.path().join("etc")).unwrap();
        std::os::unix::fs::symlink(&source, linked.path().join("etc/resolv.conf")).unwrap();
        let dir_source = tempfile::tempdir().unwrap();
        std::fs::write(dir_source.path().join("app.conf"), "x = 1\n").unwrap();
        let dir_source = dir_source.keep();
        let roots = [bare.path(), with_file.path(), linked.path()].map(Path::to_path_buf);
        in_own_mount_namespace(move || {
            for root in &roots[..2] {
                bind_into(&source, root, "/etc/resolv.conf", MountPoint::File, false).unwrap();
                let seen = std::fs::read_to_string(root.join("etc/resolv.conf")).unwrap();
                assert_eq!(seen, "nameserver 10.96.0.10\n", "{root:?}");
            }
            let err = bind_into(
                &source,
                &roots[2],
                "/etc/resolv.conf",
                MountPoint::File,
                false,
            )
            .unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::AlreadyExists, "{err}");
            // A directory, deep in a root that lacks its parents, read-only.
            bind_into(
                &dir_source,
                &roots[0],
                "/srv/app/config",
                MountPoint::Dir,
                true,
            )
            .unwrap();
            let conf = roots[0].join("srv/app/config/app.conf");
            assert_eq!(std::fs::read_to_string(&conf).unwrap(), "x = 1\n");
            let err = std::fs::write(&conf, "x = 2\n").unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::ReadOnlyFilesystem);
        });
        // Unmounted with the namespace: what each root holds on its own.
        assert_eq!(
            std::fs::read(bare.path().join("etc/resolv.conf")).unwrap(),
            b""
        );
        assert!(bare.path().join("srv/app/config").is_dir());
        let kept = std::fs::read_to_string(with_file.path().join("etc/resolv.conf")).unwrap();
        assert_eq!(kept, "image's\n");
    }

    #[test]
    fn the_mounts_under_a_root_are_listed_in_mount_order_unescaped() {
        let mountinfo = "\
22 1 254:0 / / rw,relatime - ext4 /dev/vda rw
30 22 254:16 / /run/kiln/roots/vdb rw,relatime - ext4 /dev/vdb rw
31 30 0:5 / /run/kiln/roots/vdb/dev rw,nosuid - devtmpfs devtmpfs rw
32 31 0:24 / /run/kiln/roots/vdb/dev/pts rw - devpts devpts rw
33 22 254:32 / /run/kiln/roots/vdbb rw - ext4 /dev/vdbb rw
34 30 0:6 / /run/kiln/roots/vdb/my\\040dir rw - tmpfs tmpfs rw
";
        assert_eq!(
            mounts_under(mountinfo, Path::new("/run/kiln/roots/vdb")),
            [
                "/run/kiln/roots/vdb",
                "/run/kiln/roots/vdb/dev",
                "/run/kiln/roots/vdb/dev/pts",
                "/run/kiln/roots/vdb/my dir",
            ]
            .map(PathBuf::from)
        );
    }
}
