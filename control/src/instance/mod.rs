//! Instances: live instantiations of images, each with an id, an optional
//! name, a type, a state and a root volume that outlives its VMs.
//!
//! The registry is plain files, one directory per instance under
//! `$KILN_HOME/instances/<id>/`:
//!
//! | file           | what                                                        |
//! |----------------|-------------------------------------------------------------|
//! | `instance.json`| the [`Record`], always replaced whole (temp, fsync, rename) |
//! | `record.lock`  | flock'd around every read-modify-write of the record        |
//! | `ops.lock`     | flock'd by a CLI verb for its whole run: verbs serialize    |
//! | `vmm.lock`     | held by the instance's VMM process for its whole life       |
//! | `root.overlay` | the root volume's copy-on-write layer                       |
//! | `user-data`    | as given at launch                                          |
//! | `console.log`  | the serial console of a detached instance (`console`)       |
//! | `console.log.1`| its previous 8 MiB, once it has rotated                     |
//! | `console.in`   | a FIFO: its serial input, which `kiln attach` writes        |
//! | `api.sock`     | the VMM's control API (HTTP/1.1 + JSON, `docs/api.md`)      |
//! | `vm.json`      | the definition of its current VM, for the VM process        |
//! | `vsock.sock`   | the guest's vsock ports, reached with `CONNECT <port>\n`     |
//! | `hibernate/`   | a hibernated instance's snapshot (RAM and state)            |
//!
//! `instances/.addresses.lock` serializes address allocation: a new
//! instance on the bridge takes the lowest address no other instance that
//! is not terminated holds, and its record is in place before the lock
//! goes, so concurrent launches never share one.
//!
//! A VMM that dies without saying so is found by its free `vmm.lock`: the
//! record then shows `stopped` with the reason.
mod actions;
pub mod console;
pub mod exec;
pub mod lifecycle;
pub mod snapshots;
pub mod state;
pub mod supervisor;
pub mod types;

use std::collections::BTreeSet;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read};
use std::net::Ipv4Addr;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::jail::JailInfo;
use crate::network::address::{AddressError, Subnet};
use crate::network::proxy::PortMap;
use kiln_vmm::{durable, flock};
pub use state::{Refused, State, Verb};

const RECORD_FILE: &str = "instance.json";
const RECORD_LOCK: &str = "record.lock";
const OPS_LOCK: &str = "ops.lock";
const VMM_LOCK: &str = "vmm.lock";
const ROOT_OVERLAY_FILE: &str = "root.overlay";
const USER_DATA_FILE: &str = "user-data";
const CONSOLE_FILE: &str = "console.log";
const CONSOLE_ROTATED: &str = "console.log.1";
const CONSOLE_INPUT: &str = "console.in";
const API_SOCKET: &str = "api.sock";
const VSOCK_SOCKET: &str = "vsock.sock";
/// In the registry's root: held while an address is chosen and recorded.
const ADDRESS_LOCK: &str = ".addresses.lock";
/// The snapshot of a hibernated instance, and where it is staged.
const HIBERNATION_DIR: &str = "hibernate";
const HIBERNATION_STAGING: &str = ".hibernate-new";
/// Longest instance name: it shows in listings.
const NAME_MAX: usize = 64;
/// What a new instance's directory is named after while it is made, a
/// scratch directory ([`durable::scratch_dir`]) renamed into place whole.
const STAGING_NAME: &str = "new";
/// Random bytes in an id (`i-` and twice as many hex digits).
const ID_BYTES: usize = 8;
/// How long a terminated instance stays in the registry (`kiln ps -a`
/// lists it, `kiln logs` reads its console), as EC2 keeps a terminated
/// instance visible for about an hour. After that the next process that
/// reads its record removes its directory: the registry, which every
/// lookup by name reads whole, does not grow with every instance ever run.
pub const TERMINATED_KEPT: Duration = Duration::from_secs(60 * 60);

/// What can go wrong with the registry.
#[derive(Debug, thiserror::Error)]
pub enum InstanceError {
    /// A new instance's directory could not be made.
    #[error(transparent)]
    Scratch(#[from] durable::ScratchError),
    /// A file of the registry could not be read, written or locked.
    #[error("{path}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// What the call on it said.
        #[source]
        source: io::Error,
    },
    /// `instance.json` is not JSON of a [`Record`].
    #[error("{path}: not an instance record")]
    Record {
        /// The record file.
        path: PathBuf,
        /// Why it does not parse.
        #[source]
        source: serde_json::Error,
    },
    /// A name that could be mistaken for an id or a path, or is too long
    /// to list.
    #[error(
        "instance name {0:?}: expected 1 to {NAME_MAX} letters, digits, '-', '_' or '.', not starting with 'i-' or '.'"
    )]
    BadName(String),
    /// No instance has that id, and no live one that name.
    #[error("no instance {0:?} (`kiln ps -a` lists them)")]
    NotFound(String),
    /// A live instance has the name already.
    #[error("the name {name:?} is taken by instance {id}")]
    NameTaken {
        /// The name asked for.
        name: String,
        /// The instance that has it.
        id: String,
    },
    /// Another verb holds the instance's verb lock.
    #[error("instance {id}: another kiln command is working on it; try again when it is done")]
    Busy {
        /// The instance.
        id: String,
    },
    /// The instance's state does not allow the verb.
    #[error(transparent)]
    Refused(#[from] Refused),
    /// No address on the bridge could be had for a new instance.
    #[error(transparent)]
    Address(#[from] AddressError),
}

/// What an instance is made of, as it was launched.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Spec {
    /// What commands may call it instead of its id, unique among the
    /// instances that are not terminated.
    pub name: Option<String>,
    /// The image, as NAME:VERSION.
    pub image: String,
    /// A catalog type's name, or "custom" for explicit sizes.
    pub instance_type: String,
    /// The VM's vCPUs, at every boot.
    pub vcpus: u8,
    /// The VM's memory, at every boot.
    pub memory_mib: u32,
    /// Words appended to the kernel command line.
    pub cmdline: String,
    /// Records from before networking had none.
    #[serde(default)]
    pub network: Network,
    /// The address the instance must have (a restored snapshot's guest
    /// knows its own); any free one when `None`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub private_ip: Option<Ipv4Addr>,
    /// Guest TCP ports published on the host's 127.0.0.1 while it runs.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<PortMap>,
}

/// An instance's network.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Network {
    /// No NIC.
    #[default]
    None,
    /// A NIC on the Kiln bridge with an address of its subnet.
    Bridge,
    /// A NIC on a tap of its own, on no bridge, without an address: for
    /// an instance restored from a snapshot whose guest's address another
    /// instance holds (the guest keeps its NIC; nothing reaches it).
    Isolated,
}

/// An instance: what it is and where it is in its life.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// `i-` and 16 hex digits: unique for ever, and the directory's name.
    pub id: String,
    /// How it was launched.
    #[serde(flatten)]
    pub spec: Spec,
    /// Where it is in its life.
    pub state: State,
    /// Why it reached its state, when that is news (an exit status, a crash).
    pub reason: Option<String>,
    /// Seconds since the epoch.
    pub launched_at: u64,
    /// When the current VM booted (milliseconds since the epoch).
    pub booted_at_ms: Option<u64>,
    /// VMs booted so far (reboots and starts count).
    pub boots: u32,
    /// The VMM process, while one lives.
    pub vmm_pid: Option<u32>,
    /// Its vCPUs are paused (`kiln pause`); only while it runs.
    pub paused: bool,
    /// Its address on the bridge, from launch until terminated.
    #[serde(default)]
    pub address: Option<Ipv4Addr>,
    /// How its VM process is jailed, while one runs jailed.
    #[serde(default)]
    pub jail: Option<JailInfo>,
    /// When it was terminated (seconds since the epoch). Records written
    /// before this field have none: their file's modification time, the
    /// termination's own write, stands in.
    #[serde(default)]
    pub terminated_at: Option<u64>,
}

impl Record {
    /// Whether this record, read from `path`, is of an instance
    /// terminated more than [`TERMINATED_KEPT`] ago.
    fn terminated_long_ago(&self, path: &Path) -> bool {
        if self.state != State::Terminated {
            return false;
        }
        let terminated = match self.terminated_at {
            Some(secs) => UNIX_EPOCH + Duration::from_secs(secs),
            None => match fs::metadata(path).and_then(|m| m.modified()) {
                Ok(modified) => modified,
                Err(_) => return false,
            },
        };
        SystemTime::now()
            .duration_since(terminated)
            .is_ok_and(|age| age > TERMINATED_KEPT)
    }

    /// The record as its file holds it.
    fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec_pretty(self).expect("a record serializes")
    }

    /// No VM runs any more, for `reason`; the VMM's traces go with it.
    fn stop(&mut self, reason: String) {
        self.state = State::Stopped;
        self.reason = Some(reason);
        self.vmm_pid = None;
        self.booted_at_ms = None;
        self.paused = false;
        self.jail = None;
    }
}

/// An instance's directory and its record as last read.
#[derive(Clone, Debug)]
pub struct Instance {
    dir: PathBuf,
    /// The record as last read or written by this process: another
    /// process may have changed it since ([`Registry::reread`]).
    pub record: Record,
}

/// The instances of one `$KILN_HOME`.
#[derive(Clone, Debug)]
pub struct Registry {
    root: PathBuf,
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> InstanceError + '_ {
    move |source| InstanceError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn check_name(name: &str) -> Result<(), InstanceError> {
    let allowed = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.');
    let valid = !name.is_empty()
        && name.len() <= NAME_MAX
        && !name.starts_with('.')
        && !name.starts_with("i-")
        && name.chars().all(allowed);
    if !valid {
        return Err(InstanceError::BadName(name.to_string()));
    }
    Ok(())
}

/// Whether `key` has an id's form: `i-` and 16 lowercase hex digits.
fn is_id(key: &str) -> bool {
    key.strip_prefix("i-").is_some_and(|hex| {
        hex.len() == 2 * ID_BYTES && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    })
}

/// Removes the directory of an instance terminated more than
/// [`TERMINATED_KEPT`] ago. Another process may be removing it too (gone
/// is no error); one that cannot be removed is said once here and stays,
/// unlisted.
fn forget_expired(dir: &Path) {
    match fs::remove_dir_all(dir) {
        Ok(()) => {}
        Err(err) if err.kind() == io::ErrorKind::NotFound => {}
        Err(err) => log::warn!(
            "cannot remove {}, terminated over an hour ago: {err}",
            dir.display()
        ),
    }
}

/// A fresh id: `i-` and 16 hex digits from the kernel's random source.
fn new_id() -> Result<String, InstanceError> {
    let path = Path::new("/dev/urandom");
    let mut bytes = [0u8; ID_BYTES];
    File::open(path)
        .and_then(|mut f| f.read_exact(&mut bytes))
        .map_err(io_err(path))?;
    Ok(format!(
        "i-{}",
        bytes.iter().map(|b| format!("{b:02x}")).collect::<String>()
    ))
}

/// The wall clock in milliseconds since the epoch, as records keep time
/// (0 if the clock is before the epoch).
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// An flock held until dropped.
#[derive(Debug)]
pub struct FileLock {
    file: File,
}

impl FileLock {
    /// Takes the exclusive lock on `path` (creating the file); `None` when
    /// another process holds it.
    fn try_take(path: &Path) -> Result<Option<FileLock>, InstanceError> {
        Self::lock(path, false)
    }

    /// Takes the exclusive lock on `path`, waiting for its holder.
    fn take(path: &Path) -> Result<FileLock, InstanceError> {
        Self::lock(path, true)?.ok_or_else(|| {
            io_err(path)(io::Error::other(
                "a blocking flock returned without the lock",
            ))
        })
    }

    fn lock(path: &Path, wait: bool) -> Result<Option<FileLock>, InstanceError> {
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .map_err(io_err(path))?;
        let locked = flock::lock_exclusive(&file, wait).map_err(io_err(path))?;
        Ok(locked.then_some(FileLock { file }))
    }
}

impl FileLock {
    /// Lets a child process inherit this lock: the descriptor stays open
    /// across exec (the lock belongs to the open file, which both then
    /// share). Returns the descriptor's number for the child to adopt.
    pub fn inheritable_fd(&self) -> io::Result<i32> {
        inheritable(self.file.as_fd())
    }

    /// Adopts the lock a parent passed down as descriptor `fd`, and closes
    /// it on exec again, so this process's own children do not hold it.
    ///
    /// # Safety
    /// `fd` must be an open descriptor that nothing else in this process
    /// owns: the lock closes it when dropped.
    pub unsafe fn adopt(fd: i32) -> io::Result<FileLock> {
        // SAFETY: the caller's guarantee, passed on.
        let fd = unsafe { kiln_vmm::supervised::adopt(fd) }?;
        Ok(FileLock {
            file: File::from(fd),
        })
    }
}

/// Lets a child process inherit `fd`: clears close-on-exec, so it stays
/// open across exec. Returns its number, for the child to adopt
/// (`kiln_vmm::supervised::adopt`).
pub(crate) fn inheritable(fd: BorrowedFd<'_>) -> io::Result<i32> {
    rustix::io::fcntl_setfd(fd, rustix::io::FdFlags::empty())?;
    Ok(fd.as_raw_fd())
}

impl Registry {
    /// The registry of `home` (`$KILN_HOME`).
    pub fn new(home: &Path) -> Self {
        Registry {
            root: home.join("instances"),
        }
    }

    /// Records a new instance of `spec` (with its user-data, and its root
    /// volume's writes copied from `root_overlay`, a snapshot's, when
    /// given), `pending`, and returns it with its VMM lock:
    /// the caller is its VMM, or hands the lock to the process that will be
    /// ([`FileLock::inheritable_fd`]), so no moment exists in which a
    /// pending instance has no VMM.
    pub fn create(
        &self,
        spec: Spec,
        user_data: Option<&[u8]>,
        root_overlay: Option<&Path>,
    ) -> Result<(Instance, FileLock), InstanceError> {
        if let Some(name) = &spec.name {
            check_name(name)?;
            if let Some(other) = self.by_name(name)? {
                return Err(InstanceError::NameTaken {
                    name: name.clone(),
                    id: other.record.id,
                });
            }
        }
        // The directory is made under a temporary name and renamed into
        // place whole, its files in it: a process killed half-way leaves
        // no instance behind, nor one with half its root volume.
        fs::create_dir_all(&self.root).map_err(io_err(&self.root))?;
        // Held until the record is in place: the next allocation sees it.
        let (_addresses, address) = match spec.network {
            Network::Bridge => {
                let lock = FileLock::take(&self.root.join(ADDRESS_LOCK))?;
                (Some(lock), Some(self.allocate_address(spec.private_ip)?))
            }
            Network::None | Network::Isolated => (None, None),
        };
        // Locked while this command lives: a command killed half-way
        // leaves it for the next one here to remove.
        let staging = durable::scratch_dir(&self.root, STAGING_NAME)?;
        let vmm = FileLock::take(&staging.path().join(VMM_LOCK))?;
        let in_staging = |name: &str| staging.path().join(name);
        if let Some(data) = user_data {
            staging
                .write_file(USER_DATA_FILE, data)
                .map_err(io_err(&in_staging(USER_DATA_FILE)))?;
        }
        if let Some(from) = root_overlay {
            staging
                .copy_file(ROOT_OVERLAY_FILE, from)
                .map_err(io_err(&in_staging(ROOT_OVERLAY_FILE)))?;
        }
        let mut instance = Instance {
            dir: staging.path().to_path_buf(),
            record: Record {
                id: new_id()?,
                spec,
                state: State::Pending,
                reason: None,
                launched_at: now_ms() / 1000,
                booted_at_ms: None,
                boots: 0,
                vmm_pid: None,
                paused: false,
                address,
                jail: None,
                terminated_at: None,
            },
        };
        staging
            .write_file(RECORD_FILE, &instance.record.to_json())
            .map_err(io_err(&in_staging(RECORD_FILE)))?;
        let dir = self.root.join(&instance.record.id);
        staging.rename_to(&dir).map_err(io_err(&dir))?;
        instance.dir = dir;
        Ok((instance, vmm))
    }

    /// An address for a new instance: `wanted` if it is free, else the
    /// lowest free one. Addresses of terminated instances are free.
    fn allocate_address(&self, wanted: Option<Ipv4Addr>) -> Result<Ipv4Addr, InstanceError> {
        let subnet = Subnet::from_env()?;
        let holders: Vec<(Ipv4Addr, String)> = self
            .list()?
            .into_iter()
            .filter(|i| i.record.state != State::Terminated)
            .filter_map(|i| Some((i.record.address?, i.record.id)))
            .collect();
        let Some(address) = wanted else {
            let taken: BTreeSet<Ipv4Addr> = holders.into_iter().map(|(a, _)| a).collect();
            return Ok(subnet.allocate(&taken)?);
        };
        if !subnet.contains(address) {
            return Err(AddressError::Outside { address, subnet }.into());
        }
        match holders.into_iter().find(|(held, _)| *held == address) {
            Some((_, holder)) => Err(AddressError::Taken { address, holder }.into()),
            None => Ok(address),
        }
    }

    /// The instance with id `key`, or the live one named `key`.
    pub fn find(&self, key: &str) -> Result<Instance, InstanceError> {
        let found = if key.starts_with("i-") {
            // Names never start so (`check_name`); anything but an id's
            // form is no instance, never a path out of the registry.
            if !is_id(key) {
                return Err(InstanceError::NotFound(key.to_string()));
            }
            Self::read(&self.root.join(key))?
        } else {
            self.by_name(key)?
        };
        found.ok_or_else(|| InstanceError::NotFound(key.to_string()))
    }

    /// The instance named `name` that is not terminated.
    fn by_name(&self, name: &str) -> Result<Option<Instance>, InstanceError> {
        Ok(self.list()?.into_iter().find(|i| {
            i.record.spec.name.as_deref() == Some(name) && i.record.state != State::Terminated
        }))
    }

    /// Every instance, oldest first, with VMMs that died shown stopped.
    pub fn list(&self) -> Result<Vec<Instance>, InstanceError> {
        let entries = match fs::read_dir(&self.root) {
            Ok(entries) => entries,
            Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(err) => return Err(io_err(&self.root)(err)),
        };
        let mut instances = Vec::new();
        for entry in entries {
            let entry = entry.map_err(io_err(&self.root))?;
            if entry.file_name().to_string_lossy().starts_with("i-")
                && let Some(instance) = Self::read(&entry.path())?
            {
                instances.push(instance);
            }
        }
        instances.sort_by(|a, b| {
            (a.record.launched_at, &a.record.id).cmp(&(b.record.launched_at, &b.record.id))
        });
        Ok(instances)
    }

    /// `instance`'s record as it is now.
    pub fn reread(instance: &Instance) -> Result<Instance, InstanceError> {
        Self::read(instance.dir())?
            .ok_or_else(|| InstanceError::NotFound(instance.record.id.clone()))
    }

    /// The record in `dir`, if there is one, reconciled with its VMM.
    fn read(dir: &Path) -> Result<Option<Instance>, InstanceError> {
        let path = dir.join(RECORD_FILE);
        let bytes = match fs::read(&path) {
            Ok(bytes) => bytes,
            Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(err) => return Err(io_err(&path)(err)),
        };
        let record: Record =
            serde_json::from_slice(&bytes).map_err(|source| InstanceError::Record {
                path: path.clone(),
                source,
            })?;
        if record.terminated_long_ago(&path) {
            forget_expired(dir);
            return Ok(None);
        }
        let mut instance = Instance {
            dir: dir.to_path_buf(),
            record,
        };
        instance.reconcile()?;
        Ok(Some(instance))
    }
}

impl Instance {
    fn path(&self, file: &str) -> PathBuf {
        self.dir.join(file)
    }

    /// The instance's directory, `$KILN_HOME/instances/<id>/`.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The root volume's copy-on-write layer over the image; absent
    /// before the first boot and once terminated.
    pub fn root_overlay(&self) -> PathBuf {
        self.path(ROOT_OVERLAY_FILE)
    }

    /// Where a hibernation's snapshot is kept.
    pub fn hibernation_path(&self) -> PathBuf {
        self.path(HIBERNATION_DIR)
    }

    /// Where a hibernation's snapshot is written before it is renamed whole.
    pub fn hibernation_staging(&self) -> PathBuf {
        self.path(HIBERNATION_STAGING)
    }

    /// The hibernation the instance resumes from at its next start, if any.
    pub fn hibernation(&self) -> Option<PathBuf> {
        Some(self.hibernation_path())
            .filter(|dir| dir.join(kiln_vmm::snapshot::STATE_FILE).exists())
    }

    /// The user-data it was launched with, if any: guest-init reads it
    /// from a disk of its own at every boot.
    pub fn user_data(&self) -> Option<PathBuf> {
        Some(self.path(USER_DATA_FILE)).filter(|p| p.exists())
    }

    /// The serial console of a detached instance, and its VMM's own
    /// messages (see [`console`]).
    pub fn console_log(&self) -> PathBuf {
        self.path(CONSOLE_FILE)
    }

    /// Where `console.log` goes when it rotates (see [`console`]).
    pub fn console_log_rotated(&self) -> PathBuf {
        self.path(CONSOLE_ROTATED)
    }

    /// The VMM's control API socket ([`crate::api`]), while it runs.
    pub fn api_socket(&self) -> PathBuf {
        self.path(API_SOCKET)
    }

    /// The VM's vsock device's host side (Firecracker's convention).
    pub fn vsock_socket(&self) -> PathBuf {
        self.path(VSOCK_SOCKET)
    }

    /// The read end of the console input FIFO, for a VM process's stdin
    /// (made on first use). Opened for writing too, so the VM never reads
    /// end-of-file when an attached client leaves.
    pub fn console_input_reader(&self) -> io::Result<File> {
        let path = self.path(CONSOLE_INPUT);
        if !path.exists() {
            let c_path = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
                .map_err(io::Error::other)?;
            // SAFETY: `c_path` is a NUL-terminated path that outlives the call.
            if unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) } != 0 {
                return Err(io::Error::last_os_error());
            }
        }
        OpenOptions::new().read(true).write(true).open(path)
    }

    /// The write end of the console input FIFO; fails (ENXIO) when no VMM
    /// has the read end open.
    pub fn console_input_writer(&self) -> io::Result<File> {
        use std::os::unix::fs::OpenOptionsExt;
        let file = OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(self.path(CONSOLE_INPUT))?;
        // Opened without blocking (a FIFO without a reader would block);
        // written with blocking, so a full pipe waits instead of failing.
        // SAFETY: F_SETFL only changes the status flags of `file`'s descriptor.
        if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_SETFL, 0) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(file)
    }

    /// The name if it has one, else the id: how messages call it.
    pub fn label(&self) -> &str {
        self.record.spec.name.as_deref().unwrap_or(&self.record.id)
    }

    fn write(&self) -> Result<(), InstanceError> {
        let path = self.path(RECORD_FILE);
        durable::write(&path, &self.record.to_json()).map_err(io_err(&path))
    }

    /// Reads the record again, changes it with `change` and writes it, all
    /// under the record lock, so concurrent writers never lose an update.
    pub fn update<T>(
        &mut self,
        change: impl FnOnce(&mut Record) -> Result<T, InstanceError>,
    ) -> Result<T, InstanceError> {
        let _lock = FileLock::take(&self.path(RECORD_LOCK))?;
        let path = self.path(RECORD_FILE);
        let bytes = fs::read(&path).map_err(io_err(&path))?;
        self.record = serde_json::from_slice(&bytes).map_err(|source| InstanceError::Record {
            path: path.clone(),
            source,
        })?;
        let result = change(&mut self.record)?;
        self.write()?;
        Ok(result)
    }

    /// Takes the instance for one CLI verb; a second verb on the same
    /// instance meanwhile is refused as busy rather than interleaved.
    pub fn lock_for_verb(&self) -> Result<FileLock, InstanceError> {
        FileLock::try_take(&self.path(OPS_LOCK))?.ok_or_else(|| InstanceError::Busy {
            id: self.record.id.clone(),
        })
    }

    /// Claims the VMM role for this process; `None` when a VMM lives.
    pub fn claim_vmm(&self) -> Result<Option<FileLock>, InstanceError> {
        FileLock::try_take(&self.path(VMM_LOCK))
    }

    /// Whether a VMM process holds this instance.
    pub fn vmm_alive(&self) -> Result<bool, InstanceError> {
        Ok(self.claim_vmm()?.is_none())
    }

    /// Waits until no VMM process holds this instance, at most `timeout`;
    /// whether none does. The kernel wakes the wait the moment the VMM's
    /// lock goes (a blocking flock on a thread), so there is no polling
    /// delay. After a timeout the thread goes on waiting, and lets the
    /// lock go the moment it gets it: nobody is there to hand it to.
    pub fn wait_vmm_gone(&self, timeout: Duration) -> bool {
        let path = self.path(VMM_LOCK);
        crate::deadline::within(timeout, move || FileLock::take(&path).is_ok()).unwrap_or(false)
    }

    /// A record that says a VMM runs when none does is corrected: the
    /// VMM died without saying so.
    fn reconcile(&mut self) -> Result<(), InstanceError> {
        if !self.record.state.has_vmm() || self.vmm_alive()? {
            return Ok(());
        }
        // Re-checked under the record lock: the VMM may have just ended
        // and written its own reason.
        self.update(|r| {
            if r.state.has_vmm() {
                r.stop("the VMM process ended without stopping the instance".into());
            }
            Ok(())
        })
    }

    /// Records that this process's VM for the instance is booting now,
    /// or, when `resumed`, going on from its hibernation (not a boot).
    pub fn mark_running(
        &mut self,
        resumed: bool,
        jail: Option<JailInfo>,
    ) -> Result<(), InstanceError> {
        self.update(|r| {
            r.jail = jail;
            r.state = State::Running;
            r.vmm_pid = Some(std::process::id());
            r.booted_at_ms = Some(now_ms());
            r.boots += u32::from(!resumed);
            r.paused = false;
            r.reason = None;
            Ok(())
        })
    }

    /// Records that the instance's VMM has ended its VMs, and why.
    pub fn mark_stopped(&mut self, reason: String) -> Result<(), InstanceError> {
        self.update(|r| {
            r.stop(reason);
            Ok(())
        })
    }

    /// Deletes a terminated instance's directory, its record included:
    /// for instances nobody will look back at (function clones).
    pub fn forget(self) -> Result<(), InstanceError> {
        if self.record.state != State::Terminated {
            return Err(InstanceError::Refused(Refused {
                verb: Verb::Terminate,
                state: self.record.state,
                why: "only a terminated instance is forgotten",
            }));
        }
        fs::remove_dir_all(&self.dir).map_err(io_err(&self.dir))
    }

    /// Deletes what a terminated instance no longer has: its volumes,
    /// user-data, console and socket. The record stays.
    pub fn delete_volumes(&self) -> Result<(), InstanceError> {
        for file in [
            ROOT_OVERLAY_FILE,
            USER_DATA_FILE,
            CONSOLE_FILE,
            CONSOLE_ROTATED,
            CONSOLE_INPUT,
            API_SOCKET,
            VSOCK_SOCKET,
        ] {
            remove_if_present(&self.path(file), |p| fs::remove_file(p))?;
        }
        for dir in [HIBERNATION_DIR, HIBERNATION_STAGING] {
            remove_if_present(&self.path(dir), |p| fs::remove_dir_all(p))?;
        }
        Ok(())
    }
}

fn remove_if_present(
    path: &Path,
    remove: impl FnOnce(&Path) -> io::Result<()>,
) -> Result<(), InstanceError> {
    match remove(path) {
        Err(err) if err.kind() != io::ErrorKind::NotFound => Err(io_err(path)(err)),
        _ => Ok(()),
    }
}

/// The contents of a user-data disk for `data` (the header guest-init
/// checks, the data, zeros to a whole sector).
pub fn user_data_disk(data: &[u8]) -> Vec<u8> {
    use guest_init::protocol::user_data_header;
    let mut disk = user_data_header(data.len() as u64).to_vec();
    disk.extend_from_slice(data);
    disk.resize(disk.len().next_multiple_of(512), 0);
    disk
}

#[cfg(test)]
pub(crate) mod tests;
