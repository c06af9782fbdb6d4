//! A jail per VM process, after Firecracker's jailer (src/jailer): the
//! supervisor prepares it, and the forked child enters it just before it
//! execs `kiln __vm`, so the VM process never runs outside it.
//!
//! - New mount, IPC and UTS namespaces (unshare(2)), and a PID namespace
//!   whose init the VM process is (the supervisor's spawning thread
//!   unshares CLONE_NEWPID around the spawn: [`PidNamespace`]).
//! - A root of its own: a small tmpfs on `<instance>/jail`, holding only
//!   `/dev/kvm` (a fresh node owned by the jail's uid) and bind mounts of
//!   what the VM definition names, at the same paths as on the host (so
//!   the definition, and the paths in its control requests, hold inside):
//!   the kernel and images read-only, a snapshot to restore read-only, and
//!   the instance's directory (its overlays, vsock socket, hibernation and
//!   snapshot exchange) writable. pivot_root(2) into it and the old root
//!   unmounted: nothing else of the host is visible.
//! - An unprivileged uid and gid leased for the VM process's life from
//!   `KILN_JAIL_UIDS` ([`uid`]: no two live jails share one), the jails'
//!   shared group as its one supplementary group, every
//!   capability dropped from the bounding set, `no_new_privs`, and
//!   RLIMIT_NOFILE as Firecracker's jailer sets it.
//! - A cgroup v2 group ([`cgroup`]) where the host has one.
//!
//! The tap comes open from the supervisor (`--tap-fd`), so neither
//! `/dev/net/tun` nor CAP_NET_ADMIN is needed inside.
pub mod cgroup;
pub mod uid;

use std::ffi::{CStr, CString};
use std::fs;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::{Arc, Once};

use kiln_vmm::config::{Boot, CacheAccess, DiskSource, VmConfig};
use rustix::fs::{FileType, Gid, Mode, Uid};
use rustix::mount::{MountFlags, MountPropagationFlags, UnmountFlags};
use rustix::thread::{LinkNameSpaceType, UnshareFlags};

pub use cgroup::{Cgroup, CgroupError, Limits};
/// The uids (and gids, the same numbers) jails take theirs from, as
/// `FIRST-LAST`.
pub use kiln_builder::uids::UIDS_ENV;
use kiln_builder::uids::{DEFAULT_UIDS, LeaseError};
pub use uid::{UidLease, UidRange};

/// Turns the jail on (`1`, the default) or off (`0`, for debugging only)
/// for every VM process a supervisor or a function's server with it in
/// its environment starts (`kiln --no-jail` sets it to `0`).
pub const JAIL_ENV: &str = "KILN_JAIL";
/// RLIMIT_NOFILE in the jail: Firecracker's jailer default (`--resource-limit
/// no-file`, 2048). The file size limit it leaves unset unless asked, and
/// so does Kiln: a VM's memory file is as large as its guest's RAM.
const OPEN_FILES: u64 = 2048;
/// The jail's root, inside the instance's directory.
const ROOT_DIR: &str = "jail";
/// The directory of the instance where a jailed VM writes a snapshot, for
/// the supervisor to move into the snapshot's directory.
const EXCHANGE_DIR: &str = "snapshot-out";
/// What the VM process reads to check the host's virtualization before it
/// opens KVM (`kiln_vmm::host::detect`), read-only where the host has it:
/// the CPU's flags, and the PVM module's directory.
const HOST_FACTS: [&str; 2] = ["/proc/cpuinfo", "/sys/module/kvm_pvm"];
/// /dev/kvm's node (Documentation/admin-guide/devices.txt: misc 232).
const KVM_DEVICE: &str = "/dev/kvm";
/// The jail root's tmpfs: it only holds directories, empty mount points
/// and the /dev/kvm node.
const ROOT_TMPFS_OPTIONS: &CStr = c"size=1m,mode=0755";

/// Where the jail's warnings go (that it is off, unavailable, or without
/// a cgroup), each said once per process: stderr for Kiln's own commands
/// ([`warn_on_stderr`]), the log for the containerd shim, whose stderr
/// containerd makes /dev/null.
pub type Warn = fn(&str);

/// Says a warning of the jail's on stderr, as Kiln's commands do.
pub fn warn_on_stderr(line: &str) {
    eprintln!("kiln: {line}");
}

/// Whether the VM processes of this supervisor are jailed, and how.
#[derive(Clone, Debug)]
pub struct JailSettings {
    /// Where each VM process's uid comes from.
    pub uids: UidRange,
    /// Where the uids' leases are taken ([`uid::LEASES_DIR`]).
    pub leases: PathBuf,
    /// Where the jail's warnings go.
    pub warn: Warn,
}

impl JailSettings {
    /// The settings `KILN_JAIL` and `KILN_JAIL_UIDS` give: none when the
    /// jail is switched off.
    pub fn from_env() -> Result<Option<JailSettings>, JailError> {
        Self::from_values(
            std::env::var(JAIL_ENV).ok().as_deref(),
            std::env::var(UIDS_ENV).ok().as_deref(),
        )
    }

    /// The settings the VM processes this process starts are jailed
    /// with ([`JailSettings::from_env`]); none when the jail is switched
    /// off or this host cannot jail ([`unavailable`]), which is said on
    /// stderr, once per process.
    pub fn for_vm_processes() -> Result<Option<JailSettings>, JailError> {
        Self::warning_to(warn_on_stderr)
    }

    /// [`JailSettings::for_vm_processes`], its warnings said through `warn`.
    pub fn warning_to(warn: Warn) -> Result<Option<JailSettings>, JailError> {
        let Some(settings) = Self::from_env()? else {
            warn_off(warn);
            return Ok(None);
        };
        match unavailable() {
            None => Ok(Some(JailSettings { warn, ..settings })),
            Some(why) => {
                static SAID: Once = Once::new();
                SAID.call_once(|| {
                    warn(&format!(
                        "WARNING: the jail is unavailable ({why}): VM processes run unjailed"
                    ));
                });
                Ok(None)
            }
        }
    }

    fn from_values(
        switch: Option<&str>,
        uids: Option<&str>,
    ) -> Result<Option<JailSettings>, JailError> {
        match switch {
            Some("0") => return Ok(None),
            None | Some("1") => {}
            Some(other) => return Err(JailError::Switch(other.to_string())),
        }
        let uids = match uids {
            None => DEFAULT_UIDS,
            Some(text) => {
                UidRange::parse(text).ok_or_else(|| LeaseError::Range(text.to_string()))?
            }
        };
        Ok(Some(JailSettings {
            uids,
            leases: PathBuf::from(uid::LEASES_DIR),
            warn: warn_on_stderr,
        }))
    }
}

/// Says through `warn`, once per process, that VM processes run
/// unjailed by request (`--no-jail`, `KILN_JAIL=0`): for debugging only.
pub fn warn_off(warn: Warn) {
    static SAID: Once = Once::new();
    SAID.call_once(|| {
        warn(&format!(
            "WARNING: the jail is off ({JAIL_ENV}=0): VM processes run as root in the host's namespaces (debugging only)"
        ));
    });
}

/// Why a jail cannot be set up.
#[derive(Debug, thiserror::Error)]
pub enum JailError {
    /// `KILN_JAIL` is neither on nor off.
    #[error("${JAIL_ENV}={0:?}: expected 1 (jail every VM process) or 0")]
    Switch(String),
    /// The jail's uid cannot be leased: a bad `KILN_JAIL_UIDS`, or every
    /// id of the range held by a live VM process.
    #[error(transparent)]
    Lease(#[from] LeaseError),
    /// A file or directory of the jail could not be made or handed over.
    #[error("cannot {what} {path} for the jail")]
    Io {
        /// The step, as a verb phrase.
        what: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// What the system said.
        #[source]
        source: io::Error,
    },
    /// A path holds a NUL byte, which no system call takes.
    #[error("{0}: a path with a NUL byte cannot be mounted")]
    Nul(PathBuf),
}

fn io_err<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> JailError + 'a {
    move |source| JailError::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

/// How a VM process is jailed, as its instance's record shows it
/// (`kiln ps --json`, the API's `GET /instance`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct JailInfo {
    /// The uid and gid it runs as.
    pub uid: u32,
    /// Its cgroup's limits; none where the host has no cgroup v2.
    pub limits: Option<Limits>,
}

/// A bind mount into the jail, at the source's own path under its root.
#[derive(Debug)]
struct Bind {
    source: CString,
    target: CString,
    dir: bool,
    writable: bool,
}

/// A VM process's jail, prepared in the supervisor: every path and value
/// the child needs is made here, so that what runs between fork and exec
/// ([`Jail::enter`]) only makes system calls and never allocates (which
/// is not async-signal-safe).
#[derive(Debug)]
pub struct Jail {
    root: CString,
    /// Directories to make under the root, parents first.
    dirs: Vec<CString>,
    binds: Vec<Bind>,
    kvm: (CString, u64),
    /// The uid (and gid) it runs as, held until the jail is removed.
    uid: UidLease,
    /// The jails' shared group ([`UidRange::shared_group`]).
    group: u32,
    /// Files to delete once the VM process has ended.
    ephemeral: Vec<PathBuf>,
    /// The jail's group, where the host has cgroup v2.
    cgroup: Option<Cgroup>,
}

/// Where a jailed instance's VM process writes what the supervisor moves
/// elsewhere: a snapshot's files.
pub fn exchange_dir(instance_dir: &Path) -> PathBuf {
    instance_dir.join(EXCHANGE_DIR)
}

impl Jail {
    /// Prepares the jail of the instance `id` (directory `instance_dir`)
    /// for the VM `config` defines, with the group `cgroup` if the host
    /// has one: hands the instance's directory and the files in it the VM
    /// opens to its uid, shares the others with the jails' group, and
    /// lists what the root holds. `config` changes as a jail needs: its
    /// volumes only read the host-wide hydration cache, which this process
    /// fills ([`read_only_caches`]), and its ephemeral files are deleted by
    /// the jail when the VM process ends (they lie outside the jail's
    /// writable directory, so the VM process cannot delete them once
    /// opened).
    pub fn prepare(
        settings: &JailSettings,
        id: &str,
        instance_dir: &Path,
        config: &mut VmConfig,
        cgroup: Option<Cgroup>,
    ) -> Result<Jail, JailError> {
        let ephemeral = take_ephemeral(config);
        let caches = read_only_caches(settings, config);
        let lease = settings.uids.lease(&settings.leases, id)?;
        let uid = lease.uid();
        let root = instance_dir.join(ROOT_DIR);
        make_dir(&root)?;
        let exchange = exchange_dir(instance_dir);
        // What a VM process killed half-way left there (a snapshot's
        // files, owned by its uid) is garbage, and would stop the next VM
        // process, under another uid, writing there.
        crate::fresh_dir(&exchange).map_err(io_err("make anew", &exchange))?;
        let mut files = vm_files(config);
        files.extend(caches.into_iter().map(|cache| (cache, false)));
        let own = files
            .iter()
            .map(|(path, _)| path.as_path())
            .filter(|path| path.starts_with(instance_dir));
        let owned = [instance_dir, exchange.as_path()].into_iter().chain(own);
        let owner = (Some(Uid::from_raw(uid)), Some(Gid::from_raw(uid)));
        for path in owned {
            hand_over(path, owner)?;
        }
        // Only the owner reaches in: a snapshot or hibernation is private.
        for dir in [instance_dir, exchange.as_path()] {
            fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
                .map_err(io_err("restrict", dir))?;
        }
        let mut jail = Jail {
            root: c_path(&root)?,
            dirs: Vec::new(),
            binds: Vec::new(),
            kvm: (c_path(&root.join("dev/kvm"))?, kvm_device()?),
            uid: lease,
            group: settings.uids.shared_group(),
            cgroup,
            ephemeral,
        };
        jail.add_dir(&root, Path::new("/dev"))?;
        jail.bind(&root, instance_dir, true)?;
        for program in program_files()? {
            jail.bind(&root, &program, false)?;
        }
        for fact in HOST_FACTS.iter().map(Path::new).filter(|f| f.exists()) {
            jail.bind(&root, fact, false)?;
        }
        for (path, writable) in files {
            if !path.starts_with(instance_dir) {
                jail.access().share(&path, writable)?;
                jail.bind(&root, &path, writable)?;
            }
        }
        Ok(jail)
    }

    /// The uid (and gid) the VM process runs as.
    pub fn uid(&self) -> u32 {
        self.uid.uid()
    }

    /// How files reach the VM process: what [`Jail::hand_over`] and
    /// [`Access::share`] do, kept apart from the jail (which goes to the
    /// thread that waits for its VM process), for files made once the VM
    /// runs (a pod member's root disk, in the directory bound into it).
    pub fn access(&self) -> Access {
        Access {
            uid: self.uid(),
            group: self.group,
        }
    }

    /// Gives `path`, which the supervisor wrote for the VM process (its
    /// definition), to the jail's uid.
    pub fn hand_over(&self, path: &Path) -> Result<(), JailError> {
        self.access().hand_over(path)
    }

    /// What the instance's record shows of the jail.
    pub fn info(&self) -> JailInfo {
        JailInfo {
            uid: self.uid(),
            limits: self.cgroup.as_ref().map(Cgroup::limits),
        }
    }

    /// The jail of the VM process `id` (an instance's, or a function
    /// clone's), whose files are in `dir`, for `config`: [`Jail::prepare`]
    /// with a cgroup where the host has cgroup v2; where not, that is
    /// said once and the jail goes on without one.
    pub fn create(
        settings: &JailSettings,
        id: &str,
        dir: &Path,
        config: &mut VmConfig,
    ) -> Result<Jail, JailError> {
        let limits = Limits::for_vm(config.vcpus, config.memory_mib);
        let cgroup = Cgroup::create(id, &limits)
            .inspect_err(|err| {
                static SAID: Once = Once::new();
                SAID.call_once(|| {
                    (settings.warn)(&format!(
                        "jailed without a cgroup: {}",
                        kiln_vmm::report::one_line(err)
                    ));
                });
            })
            .ok();
        // The group goes with a jail that cannot be prepared: no VM
        // process will ever end in it and take it away.
        match Jail::prepare(settings, id, dir, config, None) {
            Ok(jail) => Ok(Jail { cgroup, ..jail }),
            Err(err) => {
                if let Some(cgroup) = cgroup {
                    cgroup.remove();
                }
                Err(err)
            }
        }
    }

    /// Has `command` enter the jail in its child, between fork and exec.
    /// Spawn it with [`spawn`], which gives it its PID namespace.
    pub fn confine(self: &Arc<Jail>, command: &mut Command) {
        // Its root holds no path to a benchmark's trace file.
        kiln_vmm::trace::pass_to(command);
        let jail = self.clone();
        // SAFETY: Jail::enter makes system calls only, on what was
        // prepared before the fork: nothing it does allocates or takes a
        // lock another thread of this process could hold.
        unsafe { command.pre_exec(move || jail.enter()) };
    }

    /// Ends the jail once its VM process has: its group and its
    /// ephemeral files go, and its uid's lease ends.
    pub fn remove(self) {
        if let Some(cgroup) = self.cgroup {
            cgroup.remove();
        }
        for file in &self.ephemeral {
            let _ = fs::remove_file(file);
        }
    }

    /// Lists `path` (absolute, on the host) for a bind mount at the same
    /// path under the root, with its parent directories.
    fn bind(&mut self, root: &Path, path: &Path, writable: bool) -> Result<(), JailError> {
        let absolute = std::path::absolute(path).map_err(io_err("find", path))?;
        let dir = fs::metadata(&absolute)
            .map_err(io_err("find", &absolute))?
            .is_dir();
        // A directory's mount point is made with its parents; a file's is
        // made empty where it binds.
        let made = if dir {
            Some(absolute.as_path())
        } else {
            absolute.parent()
        };
        if let Some(made) = made {
            self.add_dir(root, made)?;
        }
        self.binds.push(Bind {
            source: c_path(&absolute)?,
            target: c_path(&under(root, &absolute))?,
            dir,
            writable,
        });
        Ok(())
    }

    /// Lists `dir` and its ancestors to be made under the root.
    fn add_dir(&mut self, root: &Path, dir: &Path) -> Result<(), JailError> {
        let mut made = PathBuf::new();
        for part in dir.components() {
            made.push(part);
            let target = c_path(&under(root, &made))?;
            if !self.dirs.contains(&target) {
                self.dirs.push(target);
            }
        }
        Ok(())
    }

    /// Enters the jail: the calling process (the forked child, about to
    /// exec the VM process, inside its new PID namespace) gets its own
    /// mount, IPC and UTS namespaces and root, joins the group, and drops
    /// to the jail's uid with no capabilities and no way to regain any,
    /// holding its uid's lease across the exec.
    /// System calls only: this runs between fork and exec.
    pub fn enter(&self) -> io::Result<()> {
        // SAFETY: no CLONE_FILES among the flags: the descriptor table,
        // which unshare_unsafe warns about, stays as it is.
        unsafe {
            rustix::thread::unshare_unsafe(
                UnshareFlags::NEWNS | UnshareFlags::NEWIPC | UnshareFlags::NEWUTS,
            )
        }?;
        // Nothing mounted here propagates back to the host.
        rustix::mount::mount_change(
            c"/",
            MountPropagationFlags::REC | MountPropagationFlags::PRIVATE,
        )?;
        self.build_root()?;
        rustix::process::chdir(self.root.as_c_str())?;
        enter_root()?;
        rustix::process::chdir(c"/")?;
        if let Some(cgroup) = &self.cgroup {
            cgroup.join()?;
        }
        block_stop_signals()?;
        self.uid.keep_across_exec()?;
        self.drop_privileges()
    }

    /// Mounts the root's tmpfs, makes its directories and /dev/kvm, and
    /// bind-mounts what the VM needs.
    fn build_root(&self) -> io::Result<()> {
        // The supervisor's umask (077) would leave the root's directories
        // untraversable by the jail's uid; the VM process sets its own.
        rustix::process::umask(Mode::from_raw_mode(0o022));
        rustix::mount::mount(
            c"tmpfs",
            self.root.as_c_str(),
            c"tmpfs",
            MountFlags::NOSUID,
            ROOT_TMPFS_OPTIONS,
        )?;
        for dir in &self.dirs {
            match rustix::fs::mkdir(dir.as_c_str(), Mode::from_raw_mode(0o755)) {
                Err(rustix::io::Errno::EXIST) | Ok(()) => {}
                Err(err) => return Err(err.into()),
            }
        }
        let (kvm, device) = &self.kvm;
        rustix::fs::mknodat(
            rustix::fs::CWD,
            kvm.as_c_str(),
            FileType::CharacterDevice,
            Mode::from_raw_mode(0o600),
            *device,
        )?;
        let id = self.uid();
        rustix::fs::chown(
            kvm.as_c_str(),
            Some(Uid::from_raw(id)),
            Some(Gid::from_raw(id)),
        )?;
        for bind in &self.binds {
            if !bind.dir {
                rustix::fs::mknodat(
                    rustix::fs::CWD,
                    bind.target.as_c_str(),
                    FileType::RegularFile,
                    Mode::from_raw_mode(0o600),
                    0,
                )?;
            }
            rustix::mount::mount_bind(bind.source.as_c_str(), bind.target.as_c_str())?;
            let mut flags = MountFlags::BIND | MountFlags::NOSUID | MountFlags::NODEV;
            if !bind.writable {
                flags |= MountFlags::RDONLY;
            }
            rustix::mount::mount_remount(bind.target.as_c_str(), flags, c"")?;
        }
        Ok(())
    }

    /// The jail's rlimits, then its uid and gid with no groups, no
    /// capabilities (the bounding set emptied; the others go with the uid
    /// change), and no_new_privs.
    fn drop_privileges(&self) -> io::Result<()> {
        let open_files = rustix::process::Rlimit {
            current: Some(OPEN_FILES),
            maximum: Some(OPEN_FILES),
        };
        rustix::process::setrlimit(rustix::process::Resource::Nofile, open_files)?;
        drop_bounding_set()?;
        let (uid, gid) = (Uid::from_raw(self.uid()), Gid::from_raw(self.uid()));
        rustix::thread::set_thread_groups(&[Gid::from_raw(self.group)])?;
        rustix::thread::set_thread_res_gid(gid, gid, gid)?;
        rustix::thread::set_thread_res_uid(uid, uid, uid)?;
        rustix::thread::set_no_new_privs(true)?;
        // Set after the uid change, which clears it; the supervisor is
        // alive here (it waits for this exec), so none is missed.
        rustix::process::set_parent_process_death_signal(Some(rustix::process::Signal::TERM))?;
        Ok(())
    }
}

/// Makes the current directory (the jail's root, a mount) the root.
/// pivot_root(".", "."): the old root is stacked under the new one and
/// unmounted at once (pivot_root(2), NOTES). An initramfs root (rootfs)
/// cannot be pivoted away from (EINVAL): there the new root is moved
/// over "/" and chrooted into, as switch_root does; the old root stays
/// mounted beneath, out of reach of a process that may not chroot.
fn enter_root() -> io::Result<()> {
    match rustix::process::pivot_root(c".", c".") {
        Ok(()) => Ok(rustix::mount::unmount(c".", UnmountFlags::DETACH)?),
        Err(rustix::io::Errno::INVAL) => {
            rustix::mount::mount_move(c".", c"/")?;
            Ok(rustix::process::chroot(c".")?)
        }
        Err(err) => Err(err.into()),
    }
}

/// Blocks SIGTERM and SIGINT, the stop signals, across the exec (a
/// blocked signal stays blocked through execve). The VM process reads
/// them from a signalfd with the handler left at its default; as a PID
/// namespace's init it would have such a signal discarded unless blocked
/// (pid_namespaces(7); a blocked signal is never ignored), and it only
/// blocks them itself once it builds its event loop: a stop asked in
/// between would be lost.
fn block_stop_signals() -> io::Result<()> {
    // SAFETY: sigset_t is plain data; sigemptyset initializes it below.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid sigset_t to write.
    unsafe { libc::sigemptyset(&mut set) };
    for signal in [libc::SIGTERM, libc::SIGINT] {
        // SAFETY: `set` is an initialized sigset_t; the signals are valid.
        unsafe { libc::sigaddset(&mut set, signal) };
    }
    // SAFETY: `set` is initialized; no old mask is asked for.
    let rc = unsafe { libc::sigprocmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Empties the capability bounding set, capability by capability until
/// the kernel knows no more (EINVAL past CAP_LAST_CAP).
fn drop_bounding_set() -> io::Result<()> {
    for cap in 0.. {
        // SAFETY: PR_CAPBSET_DROP takes a capability number and no pointers.
        if unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) } != 0 {
            let err = io::Error::last_os_error();
            return match err.raw_os_error() {
                Some(libc::EINVAL) if cap > 0 => Ok(()),
                _ => Err(err),
            };
        }
    }
    Ok(())
}

/// Takes the ephemeral marks off `config`'s disks ([`Jail::prepare`]);
/// returns the files to delete.
fn take_ephemeral(config: &mut VmConfig) -> Vec<PathBuf> {
    let mut ephemeral = Vec::new();
    for disk in &mut config.disks {
        let file = match &disk.source {
            DiskSource::Raw(path) => Some(path.clone()),
            DiskSource::Volume { overlay, .. } => overlay.clone(),
            DiskSource::Empty => None,
        };
        if std::mem::take(&mut disk.ephemeral) {
            ephemeral.extend(file);
        }
    }
    ephemeral
}

/// Has `config`'s volumes read their images' host-wide hydration caches
/// without writing them, and starts filling each here, in the background
/// ([`kiln_vmm::volume::background`]): a cache is shared by every VM of
/// its image, each jailed under a uid of its own, and what one VM process
/// wrote there the others would read as verified. Returns the caches'
/// files, for the jail to bind read-only. A cache that cannot be opened
/// here is said, and its volume keeps its chunks in memory.
fn read_only_caches(settings: &JailSettings, config: &mut VmConfig) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for disk in &mut config.disks {
        let DiskSource::Volume {
            image,
            hydration,
            hydration_access,
            ..
        } = &mut disk.source
        else {
            continue;
        };
        let Some(dir) = hydration.clone() else {
            continue;
        };
        match kiln_vmm::volume::background::start(image, &dir) {
            Ok(cache) => {
                *hydration_access = CacheAccess::Read;
                files.extend([cache.raw, cache.present]);
            }
            Err(err) => {
                (settings.warn)(&format!(
                    "{}: the jailed VM keeps the image's chunks in memory",
                    kiln_vmm::report::one_line(&err)
                ));
                *hydration = None;
            }
        }
    }
    files
}

/// The files `config` has the VM process open, and whether it writes them.
fn vm_files(config: &VmConfig) -> Vec<(PathBuf, bool)> {
    let mut files = match &config.boot {
        Boot::Kernel(kernel) => vec![(kernel.clone(), false)],
        // A consumed snapshot (a hibernation, in the instance's directory)
        // is deleted once restored; its files, written by an earlier VM
        // process, are handed over too, in case its uid was another.
        Boot::Snapshot { dir, consume: true } => {
            let files = snapshot_files(dir).into_iter();
            let all = std::iter::once(dir.clone()).chain(files.map(|(file, _)| file));
            all.map(|path| (path, true)).collect()
        }
        // Another's snapshot, file by file: its directory is private to
        // the user (mode 700).
        Boot::Snapshot {
            dir,
            consume: false,
        } => snapshot_files(dir),
    };
    for disk in &config.disks {
        match &disk.source {
            DiskSource::Raw(path) => files.push((path.clone(), !disk.read_only)),
            DiskSource::Volume { image, overlay, .. } => {
                files.push((image.clone(), false));
                // A child image reads its parents' chunks from their files
                // beside it. One whose layer table cannot be read is left
                // to the VM process, whose open of the image says why.
                let layers = kiln_image::layer_files(image).unwrap_or_default();
                files.extend(layers.into_iter().map(|layer| (layer, false)));
                files.extend(overlay.iter().map(|o| (o.clone(), !disk.read_only)));
            }
            // A spare drive: what fills it later is opened through the
            // VM's directory, which is bound into the jail.
            DiskSource::Empty => {}
        }
    }
    files
}

/// What exec'ing `kiln __vm` inside the jail needs, read-only: the files
/// this process (the same `kiln` binary) runs on, as /proc/self/maps
/// lists them (the binary, its program interpreter and shared libraries,
/// at their real paths, where the interpreter's default search finds
/// them without /etc/ld.so.cache), and the interpreter's path as the
/// binary names it (PT_INTERP, often a symlink such as
/// /lib64/ld-linux-x86-64.so.2).
fn program_files() -> Result<Vec<PathBuf>, JailError> {
    let maps_path = Path::new("/proc/self/maps");
    let maps = fs::read_to_string(maps_path).map_err(io_err("read", maps_path))?;
    let mut files: Vec<PathBuf> = Vec::new();
    for path in maps.lines().filter_map(mapped_file) {
        if !files.iter().any(|f| f == path) {
            files.push(path.to_path_buf());
        }
    }
    let exe = Path::new("/proc/self/exe");
    let interpreter =
        elf_interpreter(exe).map_err(io_err("read the program interpreter of", exe))?;
    files.extend(interpreter.filter(|i| !files.contains(i)));
    Ok(files)
}

/// The file a /proc/self/maps line maps (its sixth field, an absolute
/// path), unless it is gone from the file system.
fn mapped_file(line: &str) -> Option<&Path> {
    let path = line.split_whitespace().nth(5)?;
    (path.starts_with('/') && !line.ends_with("(deleted)")).then(|| Path::new(path))
}

/// The ELF64 file `path`'s program interpreter (its PT_INTERP segment,
/// System V gABI "Program Header"), if it has one.
fn elf_interpreter(path: &Path) -> io::Result<Option<PathBuf>> {
    use std::os::unix::fs::FileExt;
    /// gABI: the program header's type of the interpreter's path.
    const PT_INTERP: u32 = 3;
    let file = fs::File::open(path)?;
    let mut header = [0u8; 64];
    file.read_exact_at(&mut header, 0)?;
    let word = |at: usize| u64::from_le_bytes(header[at..at + 8].try_into().unwrap_or_default());
    let half = |at: usize| u16::from_le_bytes([header[at], header[at + 1]]);
    // e_phoff at 0x20, e_phentsize at 0x36, e_phnum at 0x38 (ELF64).
    let (table, entry, count) = (word(0x20), u64::from(half(0x36)), half(0x38));
    for index in 0..u64::from(count) {
        let mut program = [0u8; 56];
        file.read_exact_at(&mut program, table + index * entry)?;
        let field =
            |at: usize| u64::from_le_bytes(program[at..at + 8].try_into().unwrap_or_default());
        if u32::from_le_bytes([program[0], program[1], program[2], program[3]]) == PT_INTERP {
            // p_offset at 0x08, p_filesz at 0x20; the path ends in NUL.
            let mut name = vec![0u8; usize::try_from(field(0x20)).unwrap_or(0)];
            file.read_exact_at(&mut name, field(0x08))?;
            let name = name.split(|&b| b == 0).next().unwrap_or_default();
            return Ok(Some(PathBuf::from(std::ffi::OsStr::from_bytes(name))));
        }
    }
    Ok(None)
}

/// The regular files of the snapshot `dir`, read-only; the directory
/// itself when it cannot be listed (the VM process then says what is
/// missing).
fn snapshot_files(dir: &Path) -> Vec<(PathBuf, bool)> {
    let Ok(entries) = fs::read_dir(dir) else {
        return vec![(dir.to_path_buf(), false)];
    };
    entries
        .flatten()
        .filter(|entry| entry.file_type().is_ok_and(|t| t.is_file()))
        .map(|entry| (entry.path(), false))
        .collect()
}

/// `path` (absolute) under `root`.
fn under(root: &Path, path: &Path) -> PathBuf {
    root.join(path.strip_prefix("/").unwrap_or(path))
}

fn c_path(path: &Path) -> Result<CString, JailError> {
    CString::new(path.as_os_str().as_bytes()).map_err(|_| JailError::Nul(path.to_path_buf()))
}

fn make_dir(dir: &Path) -> Result<(), JailError> {
    match fs::create_dir(dir) {
        Err(err) if err.kind() != io::ErrorKind::AlreadyExists => Err(io_err("create", dir)(err)),
        _ => Ok(()),
    }
}

/// /dev/kvm's device number, for the jail's own node.
fn kvm_device() -> Result<u64, JailError> {
    let path = Path::new(KVM_DEVICE);
    Ok(fs::metadata(path).map_err(io_err("find", path))?.rdev())
}

/// What lets a jail's VM process open a file made for it: its uid, for
/// files it owns, and the jails' shared group, for the host's files it
/// reads. Copied out of a [`Jail`] ([`Jail::access`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Access {
    uid: u32,
    group: u32,
}

impl Access {
    /// Gives `path` (a file, or a directory alone) to the jail's uid, as
    /// the VM process's own.
    pub fn hand_over(&self, path: &Path) -> Result<(), JailError> {
        let owner = (Some(Uid::from_raw(self.uid)), Some(Gid::from_raw(self.uid)));
        hand_over(path, owner)
    }

    /// Lets every jail read (and, `writable`, write) `path`, a file of
    /// the host that the VM opens (the kernel, an image, a snapshot's
    /// file): its group becomes the jails' shared group, with read (and
    /// write) for it; its owner and other bits stay. Kiln's files are
    /// private to their user (mode 600), which no jail's uid is.
    pub fn share(&self, path: &Path, writable: bool) -> Result<(), JailError> {
        let meta = fs::metadata(path).map_err(io_err("share", path))?;
        if meta.is_dir() {
            return Ok(());
        }
        rustix::fs::chown(path, None, Some(Gid::from_raw(self.group)))
            .map_err(|err| io_err("share", path)(err.into()))?;
        let group = if writable { 0o060 } else { 0o040 };
        let mode = meta.permissions().mode() | group;
        fs::set_permissions(path, fs::Permissions::from_mode(mode)).map_err(io_err("share", path))
    }
}

/// Gives `path` to `owner` (a directory alone, not what it holds: the
/// instance's record and logs stay root's).
fn hand_over(path: &Path, owner: (Option<Uid>, Option<Gid>)) -> Result<(), JailError> {
    rustix::fs::chown(path, owner.0, owner.1).map_err(|err| io_err("hand over", path)(err.into()))
}

/// The PID namespace the next child of the calling thread is made in:
/// a fresh one, whose init the child is. unshare(CLONE_NEWPID) changes
/// where the thread's children go, not the thread itself, and is refused
/// once it differs from the thread's own; so the thread goes back to its
/// own first (setns), which also undoes it after the spawn.
pub struct PidNamespace {
    own: OwnedFd,
}

impl PidNamespace {
    /// Children of the calling thread go into a fresh PID namespace until
    /// the result is dropped.
    pub fn for_next_child() -> io::Result<PidNamespace> {
        let own: OwnedFd = fs::File::open("/proc/self/ns/pid")?.into();
        rustix::thread::move_into_link_name_space(own.as_fd(), Some(LinkNameSpaceType::ProcessID))?;
        // SAFETY: CLONE_NEWPID only: the descriptor table is untouched.
        unsafe { rustix::thread::unshare_unsafe(UnshareFlags::NEWPID) }?;
        Ok(PidNamespace { own })
    }
}

impl Drop for PidNamespace {
    fn drop(&mut self) {
        let _ = rustix::thread::move_into_link_name_space(
            self.own.as_fd(),
            Some(LinkNameSpaceType::ProcessID),
        );
    }
}

/// Spawns `command`, in a fresh PID namespace whose init it is when it
/// is `jailed` ([`Jail::confine`]).
pub fn spawn(command: &mut Command, jailed: bool) -> io::Result<Child> {
    let _pid_namespace = jailed.then(PidNamespace::for_next_child).transpose()?;
    command.spawn()
}

/// Why VM processes cannot be jailed here, for `kiln doctor`: the jail
/// needs root (namespaces, mounts, the uid change) and /dev/kvm. A host
/// without cgroup v2 is jailed without a group ([`cgroup::unavailable`]).
pub fn unavailable() -> Option<String> {
    if !rustix::process::geteuid().is_root() {
        return Some(
            "this process is not root (namespaces, mounts and the uid change need it)".into(),
        );
    }
    if let Err(err) = kvm_device() {
        return Some(kiln_vmm::report::one_line(&err));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_switch_and_the_range_are_checked() {
        // Off ignores the range; on is the default.
        assert!(
            JailSettings::from_values(Some("0"), Some("junk"))
                .unwrap()
                .is_none()
        );
        let on = JailSettings::from_values(None, None).unwrap().unwrap();
        assert_eq!(on.uids, DEFAULT_UIDS);
        assert_eq!(on.leases, Path::new(uid::LEASES_DIR));
        let explicit = JailSettings::from_values(Some("1"), None).unwrap().unwrap();
        assert_eq!((explicit.uids, explicit.leases), (on.uids, on.leases));
        let ranged = JailSettings::from_values(Some("1"), Some("5000-5009")).unwrap();
        assert_eq!(
            ranged.unwrap().uids,
            UidRange {
                first: 5000,
                count: 10
            }
        );
        let err = JailSettings::from_values(Some("yes"), None).unwrap_err();
        assert_eq!(
            err.to_string(),
            "$KILN_JAIL=\"yes\": expected 1 (jail every VM process) or 0"
        );
        for bad in ["0-10", "10-5", "10-10", "10", "a-b"] {
            let err = JailSettings::from_values(Some("1"), Some(bad)).unwrap_err();
            assert!(
                matches!(&err, JailError::Lease(LeaseError::Range(text)) if text == bad),
                "{err}"
            );
        }
    }

    #[test]
    fn the_program_and_its_interpreter_are_found() {
        let files = program_files().unwrap();
        let exe = fs::read_link("/proc/self/exe").unwrap();
        assert!(files.contains(&exe), "{files:?}");
        let interpreter = elf_interpreter(&exe)
            .unwrap()
            .expect("a dynamic test binary");
        assert!(files.contains(&interpreter), "{files:?}");
        assert_eq!(
            mapped_file("7f00-7f01 r-xp 00000000 08:01 12 /usr/lib/libc.so.6"),
            Some(Path::new("/usr/lib/libc.so.6"))
        );
        assert_eq!(mapped_file("7f00-7f01 rw-p 00000000 00:00 0 [heap]"), None);
        assert_eq!(
            mapped_file("7f00-7f01 r-xp 0 08:01 12 /tmp/x (deleted)"),
            None
        );
    }

    /// A 1-vCPU, 128 MiB VM booting `kernel` with `disks`.
    fn small_vm(kernel: &Path, disks: Vec<kiln_vmm::config::DiskConfig>) -> VmConfig {
        VmConfig {
            boot: Boot::Kernel(kernel.to_path_buf()),
            disks,
            vcpus: 1,
            memory_mib: 128,
            extra_cmdline: String::new(),
            seccomp: true,
            vsock: None,
            net: None,
            announce_boot: false,
        }
    }

    /// Jails with ten uids from `first`, their leases in `home`.
    fn settings(home: &Path, first: u32, warn: Warn) -> JailSettings {
        JailSettings {
            uids: UidRange { first, count: 10 },
            leases: home.join("leases"),
            warn,
        }
    }

    #[test]
    fn the_root_lists_the_vm_files_at_their_host_paths() {
        let home = tempfile::tempdir().unwrap();
        let instance = home.path().join("instances/i-1");
        fs::create_dir_all(&instance).unwrap();
        let kernel = home.path().join("vmlinux");
        let image = home.path().join("images/hello.kiln");
        fs::create_dir_all(image.parent().unwrap()).unwrap();
        for file in [&kernel, &image, &instance.join("root.overlay")] {
            fs::write(file, b"").unwrap();
        }
        let disk = kiln_vmm::config::DiskConfig {
            source: DiskSource::Volume {
                image: image.clone(),
                overlay: Some(instance.join("root.overlay")),
                cache_bytes: 0,
                hydration: None,
                hydration_access: CacheAccess::Fill,
            },
            read_only: false,
            ephemeral: false,
        };
        let mut config = small_vm(&kernel, vec![disk]);
        let settings = settings(home.path(), 5000, warn_on_stderr);
        // What a VM process killed half-way through a snapshot left.
        fs::create_dir_all(exchange_dir(&instance)).unwrap();
        fs::write(exchange_dir(&instance).join("memory"), b"half").unwrap();
        let jail = Jail::prepare(&settings, "i-1", &instance, &mut config, None).unwrap();
        let root = instance.join(ROOT_DIR);
        let programs = program_files().unwrap();
        let listed: Vec<(PathBuf, bool)> = jail
            .binds
            .iter()
            .map(|b| (PathBuf::from(b.target.to_str().unwrap()), b.writable))
            .filter(|(target, _)| {
                let host_paths = programs.iter().map(PathBuf::as_path);
                let mut others = host_paths.chain(HOST_FACTS.iter().map(Path::new));
                !others.any(|p| *target == under(&root, p))
            })
            .collect();
        assert_eq!(
            listed,
            [
                (under(&root, &instance), true),
                (under(&root, &kernel), false),
                (under(&root, &image), false)
            ]
        );
        // Parents come before their children.
        let dirs: Vec<&str> = jail.dirs.iter().map(|d| d.to_str().unwrap()).collect();
        let images = under(&root, image.parent().unwrap());
        let position = |p: &Path| dirs.iter().position(|d| Path::new(d) == p).unwrap();
        assert!(position(images.parent().unwrap()) < position(&images));
        let owner = fs::metadata(instance.join("root.overlay")).unwrap().uid();
        assert_eq!(owner, jail.uid());
        assert!(fs::metadata(exchange_dir(&instance)).unwrap().is_dir());
        assert!(!exchange_dir(&instance).join("memory").exists());
    }

    /// A jailed VM reads its image's hydration cache and never writes it:
    /// the cache's files are bound read-only, and this process fills it;
    /// a cache that cannot be opened leaves the volume to memory, said.
    #[test]
    fn a_jailed_volume_reads_the_cache_this_process_fills() {
        let home = tempfile::tempdir().unwrap();
        let instance = home.path().join("instances/i-2");
        fs::create_dir_all(&instance).unwrap();
        let raw = home.path().join("raw");
        let bytes: Vec<u8> = (0..256 * 1024u32).map(|n| (n * 7 / 3) as u8).collect();
        fs::write(&raw, &bytes).unwrap();
        let image = home.path().join("images/app.kiln");
        fs::create_dir_all(image.parent().unwrap()).unwrap();
        kiln_image::write(&raw, &image, 64 * 1024).unwrap();
        let cache_dir = home.path().join("cache");
        let volume = |image: &Path| kiln_vmm::config::DiskConfig {
            source: DiskSource::Volume {
                image: image.to_path_buf(),
                overlay: None,
                cache_bytes: 0,
                hydration: Some(cache_dir.clone()),
                hydration_access: CacheAccess::Fill,
            },
            read_only: true,
            ephemeral: false,
        };
        let not_an_image = home.path().join("images/empty.kiln");
        fs::write(&not_an_image, b"").unwrap();
        let mut config = small_vm(&raw, vec![volume(&image), volume(&not_an_image)]);
        static WARNED: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());
        let warn = |line: &str| WARNED.lock().unwrap().push(line.to_string());
        let settings = settings(home.path(), 5100, warn);
        let jail = Jail::prepare(&settings, "i-2", &instance, &mut config, None).unwrap();
        let access = |n: usize| match &config.disks[n].source {
            DiskSource::Volume {
                hydration,
                hydration_access,
                ..
            } => (hydration.is_some(), *hydration_access),
            other => panic!("{other:?}"),
        };
        assert_eq!(access(0), (true, CacheAccess::Read));
        assert_eq!(access(1), (false, CacheAccess::Fill));
        let warned = WARNED.lock().unwrap().clone();
        assert!(
            warned.len() == 1 && warned[0].contains("empty.kiln"),
            "{warned:?}"
        );
        let reader = kiln_image::Reader::open(&image).unwrap();
        let files = kiln_image::hydrate::CacheFiles::new(&cache_dir, &reader.content_id());
        let root = instance.join(ROOT_DIR);
        for file in [&files.raw, &files.present] {
            let bind = jail
                .binds
                .iter()
                .find(|b| Path::new(b.target.to_str().unwrap()) == under(&root, file));
            assert!(
                bind.is_some_and(|b| !b.writable),
                "{file:?} bound read-only"
            );
            let meta = fs::metadata(file).unwrap();
            assert_eq!((meta.gid(), meta.mode() & 0o070), (jail.group, 0o040));
        }
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while files.hydrated_bytes(&reader).unwrap() < bytes.len() as u64 {
            assert!(
                std::time::Instant::now() < deadline,
                "the cache stays unfilled"
            );
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }
}
