//! A cgroup v2 per jailed VM process (Documentation/admin-guide/cgroup-v2.rst):
//! `/sys/fs/cgroup/kiln/<instance id>`, with the `cpu`, `memory` and
//! `pids` controllers enabled down to it, so a guest that drives its VMM
//! hard cannot take more than its vCPUs' worth of CPU, its memory and a
//! bounded VMM allowance, or a fork bomb's worth of threads. The VM
//! process joins it between fork and exec ([`Cgroup::join`]); the
//! supervisor removes it once the process has ended.
use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

/// Where the cgroup v2 hierarchy is mounted.
const CGROUP_ROOT: &str = "/sys/fs/cgroup";
/// The group under the root that holds every instance's group.
const KILN_GROUP: &str = "kiln";
/// The controllers a jail's group needs, as `cgroup.subtree_control` takes them.
const CONTROLLERS: &str = "+cpu +memory +pids";
/// cgroup-v2.rst, "cpu.max": the period the quota is given per, in µs
/// (the kernel's default, 100 ms).
const CPU_PERIOD_US: u64 = 100_000;
/// What the VM process needs beyond guest memory: its own heap, the
/// devices' buffers, the page cache of a snapshot being written. Its
/// peak (`memory.peak`) measured jailed in the e2e suite (tests/vm/jail.sh)
/// stays well under this.
pub const VMM_ALLOWANCE_MIB: u64 = 128;
/// Threads beyond one per vCPU: the VMM thread and the ones std and the
/// devices start, with room to spare.
const PIDS_ALLOWANCE: u64 = 16;
/// How long [`remove_left`] waits for the kernel to empty a killed group.
const EMPTY_WAIT: Duration = Duration::from_secs(5);

/// A jailed VM process's limits, as written to its group and shown in
/// its instance's record (`kiln ps`, `GET /`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Limits {
    /// `cpu.max`'s quota: CPU time per [`CPU_PERIOD_US`], one period per vCPU.
    pub cpu_quota_us: u64,
    /// `cpu.max`'s period in µs.
    pub cpu_period_us: u64,
    /// `memory.max` in bytes: guest memory and [`VMM_ALLOWANCE_MIB`].
    pub memory_max: u64,
    /// `pids.max`: the vCPUs' threads and [`PIDS_ALLOWANCE`].
    pub pids_max: u64,
}

impl Limits {
    /// The limits of a VM of `vcpus` vCPUs and `memory_mib` MiB.
    pub fn for_vm(vcpus: u8, memory_mib: u32) -> Limits {
        Limits {
            cpu_quota_us: u64::from(vcpus) * CPU_PERIOD_US,
            cpu_period_us: CPU_PERIOD_US,
            memory_max: (u64::from(memory_mib) + VMM_ALLOWANCE_MIB) << 20,
            pids_max: u64::from(vcpus) + PIDS_ALLOWANCE,
        }
    }

    /// The files of a group and what each is set to.
    fn files(&self) -> [(&'static str, String); 3] {
        [
            (
                "cpu.max",
                format!("{} {}", self.cpu_quota_us, self.cpu_period_us),
            ),
            ("memory.max", self.memory_max.to_string()),
            ("pids.max", self.pids_max.to_string()),
        ]
    }
}

/// Why a jail's group cannot be made.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    /// No cgroup v2 hierarchy here (a v1 or hybrid host, or none mounted).
    #[error("no cgroup v2 hierarchy: cannot read {path}")]
    NoHierarchy {
        /// The hierarchy's list of controllers.
        path: PathBuf,
        /// What the system said.
        #[source]
        source: io::Error,
    },
    /// The hierarchy lacks controllers a jail's group needs.
    #[error("cgroup v2 at {CGROUP_ROOT} lacks the controllers {0} (expected cpu, memory and pids)")]
    Missing(String),
    /// A file of the hierarchy could not be made or written (it is not
    /// delegated to this process, most often).
    #[error("cannot {what} {path}")]
    Io {
        /// The step, as a verb phrase.
        what: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// What the system said.
        #[source]
        source: io::Error,
    },
}

fn io_err<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> CgroupError + 'a {
    move |source| CgroupError::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

/// An instance's group, made and limited, with its `cgroup.procs` open
/// for the VM process to join.
#[derive(Debug)]
pub struct Cgroup {
    dir: PathBuf,
    procs: OwnedFd,
    limits: Limits,
}

impl Cgroup {
    /// Makes (or takes over, left by a crash) the group of the instance
    /// `id`, with `limits`.
    pub fn create(id: &str, limits: &Limits) -> Result<Cgroup, CgroupError> {
        let root = Path::new(CGROUP_ROOT);
        check_controllers(root)?;
        let kiln = root.join(KILN_GROUP);
        enable_controllers(root)?;
        make_dir(&kiln)?;
        enable_controllers(&kiln)?;
        let dir = kiln.join(id);
        make_dir(&dir)?;
        for (name, value) in limits.files() {
            write(&dir.join(name), &value)?;
        }
        let procs_path = dir.join("cgroup.procs");
        let procs = OpenOptions::new()
            .write(true)
            .open(&procs_path)
            .map_err(io_err("open", &procs_path))?;
        Ok(Cgroup {
            dir,
            procs: procs.into(),
            limits: *limits,
        })
    }

    /// The limits the group was given.
    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// Moves the calling process into the group. Called between fork
    /// and exec: one write(2), no allocation ("0" is the writer itself,
    /// cgroup-v2.rst "cgroup.procs").
    pub fn join(&self) -> io::Result<()> {
        rustix::io::write(self.procs.as_fd(), b"0")?;
        Ok(())
    }

    /// Removes the group once its process has ended (a group with a
    /// process in it cannot be removed: then it stays, and the next VM
    /// process of the instance takes it over).
    pub fn remove(self) {
        let _ = fs::remove_dir(&self.dir);
    }
}

/// Whether `root` is a cgroup v2 hierarchy with the controllers a jail needs.
fn check_controllers(root: &Path) -> Result<(), CgroupError> {
    let listed = root.join("cgroup.controllers");
    let have = fs::read_to_string(&listed).map_err(|source| CgroupError::NoHierarchy {
        path: listed.clone(),
        source,
    })?;
    let missing: Vec<&str> = ["cpu", "memory", "pids"]
        .into_iter()
        .filter(|c| !have.split_whitespace().any(|h| h == *c))
        .collect();
    if missing.is_empty() {
        Ok(())
    } else {
        Err(CgroupError::Missing(missing.join(", ")))
    }
}

fn enable_controllers(group: &Path) -> Result<(), CgroupError> {
    write(&group.join("cgroup.subtree_control"), CONTROLLERS)
}

fn make_dir(dir: &Path) -> Result<(), CgroupError> {
    match fs::create_dir(dir) {
        Err(err) if err.kind() != io::ErrorKind::AlreadyExists => Err(io_err("create", dir)(err)),
        _ => Ok(()),
    }
}

/// Writes `value` to a cgroup file in one write, as the kernel parses it.
fn write(path: &Path, value: &str) -> Result<(), CgroupError> {
    OpenOptions::new()
        .write(true)
        .open(path)
        .and_then(|mut file| file.write_all(value.as_bytes()))
        .map_err(io_err("write", path))
}

/// Removes the group of the VM process `id` whose starter ended before
/// it could ([`Cgroup::remove`]), leaving it running for the moment its
/// parent-death signal takes: whatever still runs in the group is killed
/// (cgroup-v2.rst, "cgroup.kill"), and the group goes once the kernel has
/// emptied it. Nothing to do when there is no such group.
pub fn remove_left(id: &str) -> Result<(), CgroupError> {
    let dir = Path::new(CGROUP_ROOT).join(KILN_GROUP).join(id);
    if !dir.is_dir() {
        return Ok(());
    }
    write(&dir.join("cgroup.kill"), "1")?;
    let deadline = Instant::now() + EMPTY_WAIT;
    loop {
        match fs::remove_dir(&dir) {
            Err(err) if err.raw_os_error() == Some(libc::EBUSY) && Instant::now() < deadline => {
                thread::sleep(Duration::from_millis(10));
            }
            removed => return removed.map_err(io_err("remove", &dir)),
        }
    }
}

/// Why a jail's group cannot be had here, for `kiln doctor`.
pub fn unavailable() -> Option<String> {
    check_controllers(Path::new(CGROUP_ROOT))
        .err()
        .map(|err| kiln_vmm::report::one_line(&err))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_follow_the_vm_size() {
        let limits = Limits::for_vm(2, 256);
        assert_eq!(
            limits
                .files()
                .map(|(name, value)| format!("{name}={value}")),
            [
                "cpu.max=200000 100000".to_string(),
                format!("memory.max={}", (256 + VMM_ALLOWANCE_MIB) << 20),
                "pids.max=18".to_string(),
            ]
        );
    }

    #[test]
    fn no_group_left_is_nothing_to_remove() {
        remove_left("test-no-such-vm-process").unwrap();
    }

    #[test]
    fn a_hierarchy_without_a_controller_is_unavailable() {
        let dir = tempfile::tempdir().unwrap();
        let err = check_controllers(dir.path()).unwrap_err();
        assert!(matches!(err, CgroupError::NoHierarchy { .. }), "{err}");
        fs::write(dir.path().join("cgroup.controllers"), "cpu pids io\n").unwrap();
        let err = check_controllers(dir.path()).unwrap_err();
        assert!(
            matches!(&err, CgroupError::Missing(m) if m == "memory"),
            "{err}"
        );
        fs::write(
            dir.path().join("cgroup.controllers"),
            "cpuset cpu io memory pids\n",
        )
        .unwrap();
        check_controllers(dir.path()).unwrap();
    }
}
