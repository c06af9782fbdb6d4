//! Confining a host `[[build]]` step (docs/security.md, "Build steps"):
//! it runs in a mount namespace of its own where every host mount is
//! read-only but two writable directories (the recipe's and `$DESTDIR`),
//! /tmp is a fresh tmpfs, HOME a throwaway overlay (tools keep caches
//! there, and pyenv's shims rehash after a `pip install`: their writes go
//! with the step), and, when the step names a `user`, with that UID and
//! GID instead of root's.
//!
//! The namespace is set up in the forked child before exec, where only
//! async-signal-safe work is allowed: [`Confinement::new`] prepares every
//! path (and allocates) in the parent, [`Confinement::enter`] makes
//! system calls on them and nothing else.
use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use rustix::fs::{CWD, Mode};
use rustix::mount::{MountFlags, MountPropagationFlags, MoveMountFlags, OpenTreeFlags};

/// A directory the step may write, and where it is mounted again.
#[derive(Debug)]
struct Writable {
    /// Its canonical path, the same inside the namespace as outside.
    path: CString,
    /// Its ancestors below `/` and itself, from the top down: made as
    /// mount points where the fresh /tmp hides them.
    mount_point: Vec<CString>,
}

/// An overlay that makes a directory writable for the step only: its
/// upper layer is in the step's fresh /tmp.
#[derive(Debug)]
struct Throwaway {
    /// The directory, as the lower layer and the mount point.
    path: CString,
    /// The overlay's mount options, naming the directory and [`LAYERS`].
    options: CString,
}

/// Where a [`Throwaway`]'s layers go, made in this order: their parent,
/// the upper layer and the overlay's work directory.
const LAYERS: [&std::ffi::CStr; 3] = [
    c"/tmp/.kiln-home",
    c"/tmp/.kiln-home/upper",
    c"/tmp/.kiln-home/work",
];

/// What a host step's child process does to confine itself before exec.
#[derive(Debug)]
pub struct Confinement {
    /// The step's working directory (the recipe's) and `$DESTDIR`.
    writable: [Writable; 2],
    /// HOME as a throwaway overlay, unless it is `/` or a path an
    /// overlay's options cannot name (then it stays read-only).
    home: Option<Throwaway>,
    /// The UID and GID it runs as; `None`: root.
    user: Option<(u32, u32)>,
}

impl Confinement {
    /// The confinement of a step working in `workdir` and installing into
    /// `destdir` (both made writable), with `home` as a throwaway overlay,
    /// as `user` (or root).
    pub fn new(
        workdir: &Path,
        destdir: &Path,
        home: Option<&Path>,
        user: Option<(u32, u32)>,
    ) -> io::Result<Self> {
        Ok(Self {
            writable: [Writable::new(workdir)?, Writable::new(destdir)?],
            home: home.map(Throwaway::new).transpose()?.flatten(),
            user,
        })
    }

    /// Confines the calling process (a forked child about to exec): a
    /// new mount namespace, private so nothing propagates back to the
    /// host; clones of the writable directories taken while they are
    /// still writable; every mount read-only (recursively, in one call);
    /// a fresh tmpfs on /tmp; HOME's overlay; the clones mounted back at
    /// their paths (inside HOME too, if that is where they are);
    /// the working directory entered again (the old one is the read-only
    /// mount below); then the user's IDs, last, as they drop the
    /// capabilities the mounts need.
    pub fn enter(&self) -> io::Result<()> {
        // SAFETY: unshare(2) with CLONE_NEWNS only changes this process's
        // mount namespace; the child is single-threaded after fork.
        check(unsafe { libc::unshare(libc::CLONE_NEWNS) })?;
        let private = MountPropagationFlags::REC | MountPropagationFlags::PRIVATE;
        rustix::mount::mount_change(c"/", private)?;
        let [work, dest] = &self.writable;
        let clones = [work.clone_tree()?, dest.clone_tree()?];
        set_mount_attr(c"/", libc::MOUNT_ATTR_RDONLY, true)?;
        let tmpfs_flags = MountFlags::NOSUID | MountFlags::NODEV;
        rustix::mount::mount(c"tmpfs", c"/tmp", c"tmpfs", tmpfs_flags, c"mode=1777")?;
        if let Some(home) = &self.home {
            home.mount()?;
        }
        for (writable, clone) in self.writable.iter().zip(clones) {
            writable.make_mount_point()?;
            let from_fd = MoveMountFlags::MOVE_MOUNT_F_EMPTY_PATH;
            rustix::mount::move_mount(clone, c"", CWD, writable.path.as_c_str(), from_fd)?;
        }
        rustix::process::chdir(work.path.as_c_str())?;
        if let Some((uid, gid)) = self.user {
            drop_to(uid, gid)?;
        }
        Ok(())
    }
}

impl Writable {
    fn new(dir: &Path) -> io::Result<Self> {
        let path = dir.canonicalize()?;
        let c_string = |p: &Path| CString::new(p.as_os_str().as_bytes()).map_err(io::Error::from);
        let mut mount_point: Vec<CString> = (path.ancestors())
            .filter(|p| p.parent().is_some())
            .map(c_string)
            .collect::<io::Result<_>>()?;
        mount_point.reverse();
        Ok(Self {
            path: c_string(&path)?,
            mount_point,
        })
    }

    /// A detached copy of the mount at the directory, rooted there.
    fn clone_tree(&self) -> io::Result<rustix::fd::OwnedFd> {
        let flags = OpenTreeFlags::OPEN_TREE_CLONE | OpenTreeFlags::OPEN_TREE_CLOEXEC;
        Ok(rustix::mount::open_tree(CWD, self.path.as_c_str(), flags)?)
    }

    /// Makes the directories down to the mount point that the fresh /tmp
    /// hides; elsewhere they exist (mkdir says so before it would say
    /// read-only).
    fn make_mount_point(&self) -> io::Result<()> {
        for dir in &self.mount_point {
            match rustix::fs::mkdir(dir.as_c_str(), Mode::from_raw_mode(0o755)) {
                Ok(()) | Err(rustix::io::Errno::EXIST) => {}
                Err(errno) => return Err(errno.into()),
            }
        }
        Ok(())
    }
}

impl Throwaway {
    /// The overlay for `dir`, or `None` for `/` (which the step's own
    /// mounts are below), a directory that does not exist, and a path
    /// with a comma, colon or backslash (which overlay options would split
    /// or unescape).
    fn new(dir: &Path) -> io::Result<Option<Self>> {
        let Ok(dir) = dir.canonicalize() else {
            return Ok(None);
        };
        let text = dir.as_os_str().as_bytes();
        if dir == Path::new("/") || text.iter().any(|b| b",:\\".contains(b)) {
            return Ok(None);
        }
        let [_, upper, work] = LAYERS.map(|layer| layer.to_string_lossy());
        let mut options = b"lowerdir=".to_vec();
        options.extend_from_slice(text);
        options.extend_from_slice(format!(",upperdir={upper},workdir={work}").as_bytes());
        Ok(Some(Self {
            path: CString::new(text)?,
            options: CString::new(options)?,
        }))
    }

    /// Makes the layers' directories and mounts the overlay.
    fn mount(&self) -> io::Result<()> {
        for dir in LAYERS {
            rustix::fs::mkdir(dir, Mode::from_raw_mode(0o700))?;
        }
        let (path, options) = (self.path.as_c_str(), self.options.as_c_str());
        rustix::mount::mount(c"overlay", path, c"overlay", MountFlags::empty(), options)?;
        Ok(())
    }
}

/// Sets the mount attributes `attr_set` (`MOUNT_ATTR_*`) on the mount at
/// `path`, and on every mount below it when `recursive`: mount_setattr(2)
/// (Linux 5.12), which rustix does not wrap.
pub(crate) fn set_mount_attr(
    path: &std::ffi::CStr,
    attr_set: u64,
    recursive: bool,
) -> io::Result<()> {
    let attr = libc::mount_attr {
        attr_set,
        attr_clr: 0,
        propagation: 0,
        userns_fd: 0,
    };
    // SAFETY: `path` is a NUL-terminated string and `attr` a mount_attr
    // whose size is passed with it; both outlive the call, which only
    // reads them and changes mounts in this process's own namespace.
    let result = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            libc::AT_FDCWD,
            path.as_ptr(),
            if recursive {
                libc::AT_RECURSIVE as libc::c_uint
            } else {
                0
            },
            &attr as *const libc::mount_attr,
            size_of::<libc::mount_attr>(),
        )
    };
    check(result as libc::c_int)
}

/// Gives up root for `uid` and `gid`, with no supplementary groups.
/// The forked child is single-threaded, so each call changes its only
/// thread's credentials.
pub(crate) fn drop_to(uid: u32, gid: u32) -> io::Result<()> {
    // SAFETY: setgroups(2) with a count of 0 reads no list.
    check(unsafe { libc::setgroups(0, std::ptr::null()) })?;
    // SAFETY: setgid(2) takes a plain integer and touches no memory.
    check(unsafe { libc::setgid(gid) })?;
    // SAFETY: setuid(2) takes a plain integer and touches no memory.
    check(unsafe { libc::setuid(uid) })
}

/// `Ok` for a libc call's success, the thread's errno for its -1.
pub(crate) fn check(result: libc::c_int) -> io::Result<()> {
    if result == -1 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
