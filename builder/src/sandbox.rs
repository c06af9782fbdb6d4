//! A sandbox for a host tool that parses one file a guest wrote: e2fsck,
//! replaying the journal of a build VM's disk or of the volume `kiln
//! commit` reads (docs/security.md, "e2fsck"). A guest controls every
//! byte of such a filesystem, and e2fsck's parser is big C: run as root,
//! a bug there would be root on the host. In the sandbox the tool
//!
//! - runs as an unprivileged uid and gid leased from `$KILN_JAIL_UIDS`
//!   ([`crate::uids`]: no live VM process or other sandbox has it), with
//!   no supplementary groups, no capabilities (the bounding set emptied
//!   too) and no_new_privs;
//! - has mount, network (a `lo` that is down, and nothing else), IPC, UTS
//!   and cgroup namespaces of its own;
//! - sees a root of its own, a small read-only tmpfs holding the host's
//!   program directories ([`PROGRAM_DIRS`]) read-only, `/dev/null`, an
//!   empty `/etc/mtab` and the one file, read-write, at [`FILE`]: no
//!   /proc, /sys, /dev, /etc, /home, /run or /tmp of the host;
//! - may write no further than the file's size, use [`CPU_SECONDS`] of
//!   CPU time and [`ADDRESS_SPACE`] bytes of memory, dump no core, open
//!   [`OPEN_FILES`] files, and start no second process (its uid is its
//!   own, so RLIMIT_NPROC = 1 counts it alone);
//! - is refused (EPERM, by a seccomp filter) the system calls of
//!   [`REFUSED_CALLS`]: large parts of the kernel an unprivileged process
//!   may still reach, which e2fsck never uses.
//!
//! The file is mounted in from a descriptor the parent opened, so no path
//! the tool names leads elsewhere. The tool opens it by path as its
//! unprivileged uid, so for the run the file is root's, in the sandbox's
//! group, read-write for the group and nothing for others
//! ([`Sandbox::finish`] gives its owner, group and mode back): a group
//! member cannot change a file's mode, owner or ACL, as its owner could
//! (even one whose uid the sandbox's happens to be: a VM process's, leased
//! again since it ended).
//!
//! Without root there is no sandbox to make (no mounts, no uid change):
//! the tool then runs as the caller, who is no more privileged than it
//! needs, with the same rlimits (but RLIMIT_NPROC), the filter and
//! no_new_privs, and a warning says so once per process.
//!
//! As with [`crate::confine`], everything is prepared in the parent and
//! the forked child only makes system calls ([`Confined::enter`]).
use std::collections::BTreeMap;
use std::ffi::{CStr, CString};
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Arc, Once};

use rustix::fs::{CWD, FileType, Gid, Mode, Uid};
use rustix::mount::{MountFlags, MountPropagationFlags, MoveMountFlags, OpenTreeFlags};
use rustix::process::{Resource, Rlimit, Signal};
use rustix::thread::{CapabilitySet, CapabilitySets};
use seccompiler::{BpfProgram, SeccompAction, SeccompFilter, TargetArch};

use crate::uids::{LEASES_DIR, LeaseError, UidLease, UidRange};

/// Where the file appears in the sandbox.
pub const FILE: &str = "/image";
/// The directories of the host's root that hold programs and their
/// libraries: bound read-only into the sandbox where they are
/// directories, made again where they are symbolic links (`/bin ->
/// usr/bin` on a merged-/usr host), left out where the host has none.
pub const PROGRAM_DIRS: [&str; 7] = ["usr", "bin", "sbin", "lib", "lib32", "lib64", "libx32"];
/// The tool's `$PATH`: the program directories' usual places.
const PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// RLIMIT_CPU: a journal replay takes seconds of CPU time (more under
/// nested emulation); a tool looping on a crafted image is stopped here.
pub const CPU_SECONDS: u64 = 600;
/// RLIMIT_AS: e2fsck's tables are sized by the filesystem's geometry,
/// which the guest wrote; replaying a small image's journal keeps about
/// 3 MiB resident.
pub const ADDRESS_SPACE: u64 = 1 << 30;
/// RLIMIT_NOFILE: the tool, its libraries and /dev/null.
pub const OPEN_FILES: u64 = 64;
/// The system calls the sandbox refuses, each with why: kernel surface an
/// unprivileged process keeps, which e2fsck does not need. Refused with
/// EPERM rather than a kill, so that a library trying one falls back.
pub const REFUSED_CALLS: [i64; 14] = [
    // Sockets: the namespaces cannot take a protocol family's code
    // (netlink, AF_ALG's crypto) away, and the tool needs no socket, not
    // even a local one.
    libc::SYS_socket,
    libc::SYS_socketpair,
    // New namespaces: a user namespace of its own would give it every
    // capability over new mount and network namespaces, the usual first
    // step of a kernel exploit from an unprivileged process (a child is
    // refused anyway: RLIMIT_NPROC).
    libc::SYS_unshare,
    libc::SYS_setns,
    // BPF programs: the verifier and the JIT.
    libc::SYS_bpf,
    // Stalls the kernel at a page fault of the caller's choosing,
    // mid-copy: an exploit's timing tool.
    libc::SYS_userfaultfd,
    // Performance counters: a large driver, and a side channel.
    libc::SYS_perf_event_open,
    // io_uring: a second system call interface, with a history of bugs.
    libc::SYS_io_uring_setup,
    libc::SYS_io_uring_enter,
    libc::SYS_io_uring_register,
    // The kernel's keyrings: no key is the tool's business.
    libc::SYS_keyctl,
    libc::SYS_add_key,
    libc::SYS_request_key,
    // Tracing: it has no other process to trace.
    libc::SYS_ptrace,
];
/// Where the sandbox's root is built before the tool moves into it: in
/// the tool's own mount namespace, over the host's /tmp, which it hides.
const ROOT: &CStr = c"/tmp";
/// The root's tmpfs: it only holds directories, symbolic links, mount
/// points and the empty `/etc/mtab`.
const ROOT_TMPFS_OPTIONS: &CStr = c"size=64k,mode=0755";
/// What e2fsck reads to see whether the file is a mounted filesystem's
/// device (there is no /proc/mounts in the sandbox): empty, nothing is.
const MTAB: &str = "etc/mtab";
/// The device e2fsck opens on its standard streams when they are closed.
const DEV_NULL: &str = "dev/null";

/// Why a sandbox could not be made or its file given back.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    /// The file could not be opened, or its owner and mode read.
    #[error("cannot open {path} for a sandboxed tool")]
    Open {
        /// The file.
        path: PathBuf,
        /// What the system said.
        #[source]
        source: io::Error,
    },
    /// No uid could be leased for the sandbox.
    #[error("no uid for the sandbox")]
    Lease(#[from] LeaseError),
    /// The file's owner, group or mode could not be lent to the sandbox
    /// or given back.
    #[error("cannot {what} the owner, group and mode of {path}")]
    Lend {
        /// `lend` or `give back`.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// What the system said.
        #[source]
        source: io::Error,
    },
    /// The program is in none of the directories of the sandbox's
    /// `$PATH`.
    #[error("no {program} in {PATH}")]
    NoProgram {
        /// The program.
        program: &'static str,
        /// The host's answer for the last directory looked in.
        #[source]
        source: io::Error,
    },
    /// The program could not be started in its sandbox (the sandbox could
    /// not be entered, or the program not executed).
    #[error("cannot start {program} on {} in its sandbox", path.display())]
    Start {
        /// The program.
        program: PathBuf,
        /// The file.
        path: PathBuf,
        /// What the system said.
        #[source]
        source: io::Error,
    },
    /// The seccomp filter of [`REFUSED_CALLS`] could not be compiled.
    #[error("cannot compile the sandbox's seccomp filter")]
    Filter(#[from] seccompiler::BackendError),
    /// A path holds a NUL byte, which no system call takes.
    #[error("{0}: a path with a NUL byte cannot be mounted")]
    Nul(PathBuf),
}

/// A file lent to a sandboxed tool, until [`Sandbox::finish`].
#[derive(Debug)]
pub struct Sandbox {
    path: PathBuf,
    /// What the child does before exec.
    confined: Arc<Confined>,
    /// The file's owner, group and mode before they were lent; `None`
    /// when not root (nothing was lent).
    lent: Option<Ownership>,
    /// The uid the tool runs as, held until the sandbox is finished.
    lease: Option<UidLease>,
    /// Open for the whole run: the sandbox mounts it from this descriptor.
    file: File,
}

/// A file's owner, group and permission bits.
#[derive(Clone, Copy, Debug)]
struct Ownership {
    uid: u32,
    gid: u32,
    mode: u32,
}

/// What the forked child does to confine itself: system calls on values
/// prepared in the parent.
#[derive(Debug)]
struct Confined {
    /// The file's size: how far the tool may write (RLIMIT_FSIZE).
    size: u64,
    /// The sandbox, when root; `None`: only the rlimits, the filter and
    /// no_new_privs.
    root: Option<Root>,
    /// [`REFUSED_CALLS`], compiled.
    filter: BpfProgram,
}

/// The sandbox's root and the uid it runs as.
#[derive(Debug)]
struct Root {
    uid: u32,
    /// The open file, mounted at [`FILE`].
    file: RawFd,
    /// [`FILE`], [`MTAB`] and [`DEV_NULL`] under [`ROOT`].
    image: CString,
    mtab: CString,
    dev_null: CString,
    /// `etc` and `dev` under [`ROOT`].
    dirs: [CString; 2],
    programs: Vec<ProgramDir>,
}

/// One of [`PROGRAM_DIRS`] as the host has it.
#[derive(Debug)]
enum ProgramDir {
    /// A directory, bound read-only from its path to the same path under
    /// [`ROOT`].
    Bind { source: CString, target: CString },
    /// A symbolic link, made again under [`ROOT`] with its target.
    Link { target: CString, link: CString },
}

impl Sandbox {
    /// Prepares a sandbox for a tool working on `path`, read-write: opens
    /// it, and when root leases a uid and lends it the file's group.
    pub fn new(path: &Path) -> Result<Sandbox, SandboxError> {
        let open_err = |source| SandboxError::Open {
            path: path.into(),
            source,
        };
        let file = File::options()
            .read(true)
            .write(true)
            .open(path)
            .map_err(open_err)?;
        let meta = file.metadata().map_err(open_err)?;
        let size = meta.len();
        if !rustix::process::geteuid().is_root() {
            let confined = Arc::new(Confined {
                size,
                root: None,
                filter: filter()?,
            });
            return Ok(Sandbox {
                path: path.into(),
                confined,
                lent: None,
                lease: None,
                file,
            });
        }
        let lease = UidRange::from_env()?.lease(Path::new(LEASES_DIR), "sandbox")?;
        let root = Root::new(lease.uid(), file.as_raw_fd())?;
        let sandbox = Sandbox {
            path: path.into(),
            confined: Arc::new(Confined {
                size,
                root: Some(root),
                filter: filter()?,
            }),
            lent: Some(Ownership {
                uid: meta.uid(),
                gid: meta.gid(),
                mode: meta.mode() & 0o7777,
            }),
            lease: Some(lease),
            file,
        };
        let lent = Ownership {
            uid: 0,
            gid: sandbox.uid(),
            mode: (meta.mode() & 0o700) | 0o060,
        };
        sandbox.set_ownership("lend", lent)?;
        Ok(sandbox)
    }

    /// The uid the tool runs as.
    pub fn uid(&self) -> u32 {
        self.lease
            .as_ref()
            .map_or_else(|| rustix::process::geteuid().as_raw(), UidLease::uid)
    }

    /// The file's path as the tool sees it: [`FILE`], or the host path
    /// when not root.
    pub fn path(&self) -> &Path {
        match self.lent {
            Some(_) => Path::new(FILE),
            None => &self.path,
        }
    }

    /// `program`, found in the sandbox's `$PATH` (the program
    /// directories it sees are the host's), to run in the sandbox with
    /// [`Sandbox::output`]. Its environment holds `$PATH` and what the
    /// caller adds; nothing of the caller's own.
    pub fn command(&self, program: &'static str) -> Result<Command, SandboxError> {
        if self.lent.is_none() {
            warn_unsandboxed(program);
        }
        let mut command = Command::new(find_program(program)?);
        command.env_clear().env("PATH", PATH);
        let confined = Arc::clone(&self.confined);
        // SAFETY: `Confined::enter` only makes system calls (no
        // allocation, no locks) on values made before the fork, so it is
        // sound between fork and exec.
        unsafe { command.pre_exec(move || confined.enter()) };
        Ok(command)
    }

    /// Runs `command` (made by [`Sandbox::command`]) to its end, its
    /// output collected.
    pub fn output(&self, command: &mut Command) -> Result<Output, SandboxError> {
        command.output().map_err(|source| SandboxError::Start {
            program: command.get_program().into(),
            path: self.path.clone(),
            source,
        })
    }

    /// Gives the file's group and mode back, once the tool has ended, and
    /// the uid's lease with them.
    pub fn finish(mut self) -> Result<(), SandboxError> {
        self.give_back()
    }

    fn give_back(&mut self) -> Result<(), SandboxError> {
        match self.lent.take() {
            Some(ownership) => self.set_ownership("give back", ownership),
            None => Ok(()),
        }
    }

    /// Sets the file's owner and group, then its mode: chown(2) clears
    /// the setuid and setgid bits, and the mode set after it has the bits
    /// wanted.
    fn set_ownership(&self, what: &'static str, to: Ownership) -> Result<(), SandboxError> {
        let fd = self.file.as_fd();
        let (uid, gid) = (Uid::from_raw(to.uid), Gid::from_raw(to.gid));
        rustix::fs::fchown(fd, Some(uid), Some(gid))
            .and_then(|()| rustix::fs::fchmod(fd, Mode::from_raw_mode(to.mode)))
            .map_err(|source| SandboxError::Lend {
                what,
                path: self.path.clone(),
                source: source.into(),
            })
    }
}

/// A sandbox left unfinished (its caller returned early or panicked)
/// still gives the file back; what could go wrong then was said by
/// [`Sandbox::finish`] where it was called.
impl Drop for Sandbox {
    fn drop(&mut self) {
        let _ = self.give_back();
    }
}

/// The first executable file named `program` in [`PATH`]'s directories.
fn find_program(program: &'static str) -> Result<PathBuf, SandboxError> {
    let mut last = io::Error::from(io::ErrorKind::NotFound);
    for dir in PATH.split(':') {
        let path = Path::new(dir).join(program);
        match path.metadata() {
            Ok(meta) if meta.is_file() && meta.permissions().mode() & 0o111 != 0 => {
                return Ok(path);
            }
            Ok(_) => {}
            Err(err) => last = err,
        }
    }
    Err(SandboxError::NoProgram {
        program,
        source: last,
    })
}

/// Says on stderr, once per process, that `program` runs as the caller.
fn warn_unsandboxed(program: &str) {
    static SAID: Once = Once::new();
    SAID.call_once(|| {
        eprintln!(
            "kiln: WARNING: not root: {program} runs without its sandbox, as the calling user (docs/security.md, \"e2fsck\")"
        );
    });
}

impl Root {
    fn new(uid: u32, file: RawFd) -> Result<Root, SandboxError> {
        let programs = PROGRAM_DIRS.iter().map(|dir| ProgramDir::new(dir));
        Ok(Root {
            uid,
            file,
            image: under_root(FILE)?,
            mtab: under_root(MTAB)?,
            dev_null: under_root(DEV_NULL)?,
            dirs: [under_root("etc")?, under_root("dev")?],
            programs: programs
                .filter_map(Result::transpose)
                .collect::<Result<_, _>>()?,
        })
    }

    /// Namespaces of its own, then the root: a read-only tmpfs with the
    /// program directories, `/dev/null`, the empty mtab and the file,
    /// moved over `/` and chrooted into (as switch_root does, which also
    /// works where `/` is an initramfs that pivot_root(2) refuses); the
    /// host's root stays beneath, out of reach of a process that may not
    /// chroot.
    fn enter(&self) -> io::Result<()> {
        // Cloned first: a mount of the host's namespace, which the file's
        // is, can only be cloned from within it; the clone, detached, can
        // then be mounted in the new one.
        // SAFETY: `file` is the sandbox's open file, alive in the parent
        // and so in this forked child until exec.
        let file = unsafe { BorrowedFd::borrow_raw(self.file) };
        let flags = OpenTreeFlags::OPEN_TREE_CLONE
            | OpenTreeFlags::OPEN_TREE_CLOEXEC
            | OpenTreeFlags::AT_EMPTY_PATH;
        let image = rustix::mount::open_tree(file, c"", flags)?;
        let namespaces = libc::CLONE_NEWNS
            | libc::CLONE_NEWNET
            | libc::CLONE_NEWIPC
            | libc::CLONE_NEWUTS
            | libc::CLONE_NEWCGROUP;
        // SAFETY: unshare(2) takes flags and no pointers; none of them is
        // CLONE_FILES, so the descriptor table stays as it is.
        crate::confine::check(unsafe { libc::unshare(namespaces) })?;
        let private = MountPropagationFlags::REC | MountPropagationFlags::PRIVATE;
        rustix::mount::mount_change(c"/", private)?;
        rustix::process::umask(Mode::from_raw_mode(0o022));
        let no_exec = MountFlags::NOSUID | MountFlags::NODEV | MountFlags::NOEXEC;
        rustix::mount::mount(c"tmpfs", ROOT, c"tmpfs", no_exec, ROOT_TMPFS_OPTIONS)?;
        for dir in &self.dirs {
            rustix::fs::mkdir(dir.as_c_str(), Mode::from_raw_mode(0o755))?;
        }
        for program in &self.programs {
            program.make()?;
        }
        make_file(&self.mtab, 0o644)?;
        make_file(&self.dev_null, 0o666)?;
        rustix::mount::mount_bind(c"/dev/null", self.dev_null.as_c_str())?;
        make_file(&self.image, 0o600)?;
        let from_fd = MoveMountFlags::MOVE_MOUNT_F_EMPTY_PATH;
        rustix::mount::move_mount(image, c"", CWD, self.image.as_c_str(), from_fd)?;
        let attrs = [
            (
                self.dev_null.as_c_str(),
                libc::MOUNT_ATTR_NOSUID | libc::MOUNT_ATTR_NOEXEC,
            ),
            (self.image.as_c_str(), NO_EXEC_ATTRS),
            (ROOT, NO_EXEC_ATTRS | libc::MOUNT_ATTR_RDONLY),
        ];
        for (path, attr) in attrs {
            crate::confine::set_mount_attr(path, attr, false)?;
        }
        rustix::process::chdir(ROOT)?;
        rustix::mount::mount_move(c".", c"/")?;
        rustix::process::chroot(c".")?;
        Ok(rustix::process::chdir(c"/")?)
    }

    /// Empties the bounding set (while CAP_SETPCAP is still held), takes
    /// the uid and gid with no groups, which clears the effective,
    /// permitted and ambient sets, and clears the inheritable set.
    fn drop_privileges(&self) -> io::Result<()> {
        for capability in CapabilitySet::all().iter() {
            match rustix::thread::remove_capability_from_bounding_set(capability) {
                // A capability this kernel does not know.
                Ok(()) | Err(rustix::io::Errno::INVAL) => {}
                Err(err) => return Err(err.into()),
            }
        }
        // Counted alone (the uid is leased to this sandbox): no fork.
        set_limit(Resource::Nproc, 1)?;
        crate::confine::drop_to(self.uid, self.uid)?;
        let none = CapabilitySet::empty();
        rustix::thread::set_capabilities(
            None,
            CapabilitySets {
                effective: none,
                permitted: none,
                inheritable: none,
            },
        )?;
        Ok(())
    }
}

/// The attributes of the sandbox's writable mounts: nothing there runs,
/// and no device node or setuid bit there means anything.
const NO_EXEC_ATTRS: u64 =
    libc::MOUNT_ATTR_NOSUID | libc::MOUNT_ATTR_NODEV | libc::MOUNT_ATTR_NOEXEC;

impl ProgramDir {
    /// The host's `/dir`, if it has one.
    fn new(dir: &str) -> Result<Option<ProgramDir>, SandboxError> {
        let host = Path::new("/").join(dir);
        let Ok(meta) = host.symlink_metadata() else {
            return Ok(None);
        };
        if !meta.is_symlink() {
            let (source, target) = (c_path(&host)?, under_root(dir)?);
            return Ok(Some(ProgramDir::Bind { source, target }));
        }
        let target = host.read_link().map_err(|source| SandboxError::Open {
            path: host.clone(),
            source,
        })?;
        let (target, link) = (c_path(&target)?, under_root(dir)?);
        Ok(Some(ProgramDir::Link { target, link }))
    }

    fn make(&self) -> io::Result<()> {
        match self {
            ProgramDir::Bind { source, target } => {
                rustix::fs::mkdir(target.as_c_str(), Mode::from_raw_mode(0o755))?;
                rustix::mount::mount_bind_recursive(source.as_c_str(), target.as_c_str())?;
                let read_only =
                    libc::MOUNT_ATTR_RDONLY | libc::MOUNT_ATTR_NOSUID | libc::MOUNT_ATTR_NODEV;
                crate::confine::set_mount_attr(target, read_only, true)
            }
            ProgramDir::Link { target, link } => Ok(rustix::fs::symlinkat(
                target.as_c_str(),
                CWD,
                link.as_c_str(),
            )?),
        }
    }
}

impl Confined {
    /// Confines the calling process, a forked child about to exec the
    /// tool: the sandbox when root, then the rlimits, no_new_privs, the
    /// parent-death signal (a uid change clears it; the parent is alive
    /// here, waiting for the exec), and the filter last, as it refuses
    /// nothing the steps before make.
    fn enter(&self) -> io::Result<()> {
        if let Some(root) = &self.root {
            root.enter()?;
        }
        set_limit(Resource::Fsize, self.size)?;
        set_limit(Resource::Cpu, CPU_SECONDS)?;
        set_limit(Resource::As, ADDRESS_SPACE)?;
        set_limit(Resource::Nofile, OPEN_FILES)?;
        set_limit(Resource::Core, 0)?;
        if let Some(root) = &self.root {
            root.drop_privileges()?;
        }
        rustix::thread::set_no_new_privs(true)?;
        rustix::process::set_parent_process_death_signal(Some(Signal::KILL))?;
        seccompiler::apply_filter(&self.filter).map_err(|err| match err {
            seccompiler::Error::Prctl(err) | seccompiler::Error::Seccomp(err) => err,
            _ => io::Error::from(io::ErrorKind::InvalidInput),
        })
    }
}

/// [`REFUSED_CALLS`] as a filter that allows every other call.
fn filter() -> Result<BpfProgram, SandboxError> {
    let rules = REFUSED_CALLS.map(|call| (call, Vec::new()));
    let filter = SeccompFilter::new(
        BTreeMap::from_iter(rules),
        SeccompAction::Allow,
        SeccompAction::Errno(libc::EPERM as u32),
        TargetArch::x86_64,
    )?;
    Ok(BpfProgram::try_from(filter)?)
}

/// `path` (relative to `/`) under [`ROOT`].
fn under_root(path: &str) -> Result<CString, SandboxError> {
    c_path(&Path::new(ROOT.to_str().expect("ASCII")).join(path.trim_start_matches('/')))
}

fn c_path(path: &Path) -> Result<CString, SandboxError> {
    CString::new(path.as_os_str().as_bytes()).map_err(|_| SandboxError::Nul(path.into()))
}

/// Sets the soft and hard limits of `resource` to `value`.
fn set_limit(resource: Resource, value: u64) -> io::Result<()> {
    let limit = Rlimit {
        current: Some(value),
        maximum: Some(value),
    };
    Ok(rustix::process::setrlimit(resource, limit)?)
}

/// Makes the empty regular file `path` with `mode`.
fn make_file(path: &CStr, mode: u32) -> io::Result<()> {
    let mode = Mode::from_raw_mode(mode);
    Ok(rustix::fs::mknodat(
        CWD,
        path,
        FileType::RegularFile,
        mode,
        0,
    )?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::io::Write;
    use std::process::Stdio;

    /// The rest of the line of `text` that starts with `name`, trimmed.
    fn field<'a>(text: &'a str, name: &str) -> &'a str {
        let line = text.lines().find(|l| l.starts_with(name)).unwrap();
        line[name.len()..].trim()
    }

    /// A shell in the sandbox, stopped at a `read` (a builtin) while the
    /// test looks at it from outside through /proc; then it writes into
    /// its file with builtins and tries to start a program, which it may
    /// not.
    #[test]
    fn the_tool_runs_unprivileged_and_alone_with_its_file() {
        assert!(
            rustix::process::geteuid().is_root(),
            "only root can make the sandbox: run the tests as root"
        );
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("file");
        fs::write(&path, "0123456789").unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        // Owned by another uid, as a stopped VM process's files are.
        rustix::fs::chown(&path, Some(Uid::from_raw(4242)), None).unwrap();
        let group = fs::metadata(&path).unwrap().gid();
        let sandbox = Sandbox::new(&path).unwrap();
        let uid = sandbox.uid();
        assert_ne!(uid, 0);
        let lent = fs::metadata(&path).unwrap();
        assert_eq!(
            (lent.uid(), lent.gid(), lent.mode() & 0o7777),
            (0, uid, 0o660)
        );
        let script = r#"read go; exec 3<>"$0"; printf probe >&3; /bin/true"#;
        let mut child = sandbox
            .command("sh")
            .unwrap()
            .args(["-c", script])
            .arg(sandbox.path())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let proc = PathBuf::from(format!("/proc/{}", child.id()));
        let status = fs::read_to_string(proc.join("status")).unwrap();
        let ids = format!("{uid}\t{uid}\t{uid}\t{uid}");
        let no_caps = "0000000000000000";
        for (name, value) in [
            ("Uid:", ids.as_str()),
            ("Gid:", &ids),
            ("Groups:", ""),
            ("NoNewPrivs:", "1"),
            ("Seccomp:", "2"),
            ("CapInh:", no_caps),
            ("CapPrm:", no_caps),
            ("CapEff:", no_caps),
            ("CapBnd:", no_caps),
            ("CapAmb:", no_caps),
        ] {
            assert_eq!(field(&status, name), value, "{name}");
        }
        let limits = fs::read_to_string(proc.join("limits")).unwrap();
        for (name, value) in [
            ("Max file size", 10),
            ("Max processes", 1),
            ("Max cpu time", CPU_SECONDS),
            ("Max address space", ADDRESS_SPACE),
            ("Max open files", OPEN_FILES),
            ("Max core file size", 0),
        ] {
            let soft_and_hard: Vec<&str> =
                field(&limits, name).split_whitespace().take(2).collect();
            assert_eq!(
                soft_and_hard,
                [value.to_string(), value.to_string()],
                "{name}"
            );
        }
        for ns in ["mnt", "net", "ipc", "uts", "cgroup"] {
            let theirs = fs::read_link(proc.join("ns").join(ns)).unwrap();
            assert_ne!(
                theirs,
                fs::read_link(format!("/proc/self/ns/{ns}")).unwrap()
            );
        }
        let net = fs::read_to_string(proc.join("net/dev")).unwrap();
        let interfaces: Vec<&str> = net
            .lines()
            .skip(2)
            .filter_map(|l| l.split(':').next())
            .map(str::trim)
            .collect();
        assert_eq!(interfaces, ["lo"]);
        let seen: Vec<String> = fs::read_dir(proc.join("root"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        let allowed = |name: &String| {
            PROGRAM_DIRS.contains(&name.as_str())
                || ["dev", "etc", "image"].contains(&name.as_str())
        };
        assert!(
            seen.iter().all(allowed) && seen.contains(&"image".into()),
            "{seen:?}"
        );

        child.stdin.take().unwrap().write_all(b"go\n").unwrap();
        let output = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains("Cannot fork"), "{output:?}");
        sandbox.finish().unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"probe56789");
        let back = fs::metadata(&path).unwrap();
        assert_eq!(
            (back.uid(), back.gid(), back.mode() & 0o7777),
            (4242, group, 0o644)
        );
    }

    /// A sandbox for an empty file in a directory of its own (removed
    /// when the first is dropped).
    fn sandbox_on_an_empty_file() -> (tempfile::TempDir, Sandbox) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("file");
        fs::write(&path, "").unwrap();
        let sandbox = Sandbox::new(&path).unwrap();
        (dir, sandbox)
    }

    /// A local socket, which the uid and namespaces would allow (and
    /// connect(2) then fail with ENOENT), is refused by the filter.
    #[test]
    fn the_filter_refuses_a_socket() {
        let (_dir, sandbox) = sandbox_on_an_empty_file();
        let mut logger = sandbox.command("logger").unwrap();
        logger.args(["--socket-errors=on", "-u", "/nowhere", "probe"]);
        let output = sandbox.output(&mut logger).unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            stderr.contains("socket /nowhere: Operation not permitted"),
            "{output:?}"
        );
        sandbox.finish().unwrap();
    }

    #[test]
    fn a_program_not_on_the_path_is_named() {
        let (_dir, sandbox) = sandbox_on_an_empty_file();
        let err = sandbox.command("kiln-no-such-tool").unwrap_err();
        assert_eq!(err.to_string(), format!("no kiln-no-such-tool in {PATH}"));
    }
}
