//! A bundle's `config.json` (OCI runtime spec, `config.md`) as Kiln runs
//! it: the container's process becomes an exec request to guest-init, the
//! hostname a kernel command line word, and `linux.resources` the VM's
//! vCPUs and memory.
//!
//! Honoured: `process.args`, `env`, `cwd`, `user.uid`/`gid`/
//! `additionalGids`, `terminal` and `consoleSize`; `hostname`;
//! `linux.resources.memory.limit` and `cpu.quota`/`period`; the CRI pod
//! annotations ([`crate::pod`]); the network namespace's path and the
//! mount at /etc/resolv.conf (the pod's network and DNS,
//! [`crate::network`]); the other bind mounts, copied into the guest
//! ([`crate::binds`]). The VM is the isolation boundary, so the spec's
//! other namespaces, cgroups paths, seccomp profile, capabilities and
//! rlimits are not read.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use guest_init::exec::{ExecRequest, WindowSize};
use oci_spec::runtime::{Linux, LinuxNamespaceType, LinuxResources, Process, Spec};

use crate::binds::{self, BindError};
use crate::pod::{PodError, Role};

/// vCPUs of a VM whose spec sets no CPU quota.
pub const DEFAULT_VCPUS: u8 = 1;
/// Memory of a VM whose spec sets no memory limit, in MiB.
pub const DEFAULT_MEMORY_MIB: u32 = 256;
/// The least memory a container VM boots with: the kernel and guest-init
/// need about 40 MiB of it.
pub const MIN_MEMORY_MIB: u32 = 64;
/// The CFS period the runtime spec implies when `cpu.period` is absent
/// (the kernel's default, 100 ms).
const DEFAULT_CPU_PERIOD_US: u64 = 100_000;
/// Where CRI bind-mounts the pod's resolv.conf (the cluster's DNS).
const RESOLV_CONF: &str = "/etc/resolv.conf";
/// A terminal's size until containerd's first ResizePty.
const DEFAULT_TERMINAL: WindowSize = WindowSize { rows: 24, cols: 80 };

/// What the shim takes from a bundle.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Container {
    /// The container's process, as guest-init runs it.
    pub process: ExecRequest,
    /// The guest's hostname (empty: guest-init's default).
    pub hostname: String,
    /// The vCPUs its CPU quota buys; `None` without a quota.
    pub cpu_limit: Option<u8>,
    /// Its memory limit in MiB; `None` without one.
    pub memory_limit_mib: Option<u32>,
    /// Whether it runs alone or in a pod, and there as what.
    pub role: Role,
    /// The network namespace the container joins (`linux.namespaces`,
    /// type network, with a path: the pod's, which CNI set up), whose
    /// interface the VM's NIC takes over ([`crate::network`]); none
    /// without one, and then the VM has no NIC.
    pub netns: Option<PathBuf>,
    /// The host file the spec mounts at /etc/resolv.conf (CRI's, the
    /// pod's DNS), whose nameservers the guest gets with its NIC; the one
    /// mount read, since guest-init makes the guest's own mounts.
    pub resolv_conf: Option<PathBuf>,
}

impl Container {
    /// Its VM's vCPUs: its CPU limit's, else [`DEFAULT_VCPUS`].
    pub fn vcpus(&self) -> u8 {
        self.cpu_limit.unwrap_or(DEFAULT_VCPUS)
    }

    /// Its VM's memory in MiB: its limit, else [`DEFAULT_MEMORY_MIB`].
    pub fn memory_mib(&self) -> u32 {
        self.memory_limit_mib.unwrap_or(DEFAULT_MEMORY_MIB)
    }
}

/// The host's capacity, which a container's resources may not exceed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Host {
    /// Online CPUs.
    pub cpus: u32,
    /// Physical memory in MiB.
    pub memory_mib: u64,
}

/// Why a bundle's spec cannot be run.
#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    /// `config.json` is missing or is not an OCI runtime spec.
    #[error("cannot read the runtime spec {path}")]
    Load {
        /// The bundle's config.json.
        path: PathBuf,
        /// Why it does not load.
        #[source]
        source: oci_spec::OciSpecError,
    },
    /// The pod annotations are not CRI's.
    #[error(transparent)]
    Pod(#[from] PodError),
    /// A mount the VM cannot have.
    #[error(transparent)]
    Bind(#[from] BindError),
    /// An exec's process spec is not JSON of an OCI process.
    #[error("the exec's process spec is not an OCI process")]
    ExecProcess(#[source] serde_json::Error),
    /// The spec has no `process`, or one without `args`.
    #[error("the runtime spec has no process.args: expected the container's command")]
    NoArgs,
    /// A `process.env` entry without `=`.
    #[error("process.env entry {0:?}: expected KEY=VALUE")]
    Env(String),
    /// `hostname` is not one the kernel command line can carry.
    #[error("hostname {0:?}: expected up to 64 letters, digits, '-' and '.'")]
    Hostname(String),
    /// A network namespace's path is not absolute.
    #[error("linux.namespaces network path {0:?}: expected an absolute path")]
    Netns(PathBuf),
    /// `process.cwd` is not absolute.
    #[error("process.cwd {0:?}: expected an absolute path")]
    Cwd(String),
    /// `linux.resources.memory.limit` outside what a VM on this host can have.
    #[error(
        "linux.resources.memory.limit {limit}: expected {MIN_MEMORY_MIB} MiB to this host's {host_mib} MiB (in bytes)"
    )]
    Memory {
        /// The limit, in bytes.
        limit: i64,
        /// The host's memory in MiB.
        host_mib: u64,
    },
    /// `linux.resources.cpu` asks for more CPUs than the host has, or a
    /// zero period.
    #[error(
        "linux.resources.cpu quota {quota} / period {period}: expected 1 to this host's {host_cpus} CPUs"
    )]
    Cpu {
        /// The CFS quota, in microseconds.
        quota: i64,
        /// The CFS period, in microseconds.
        period: u64,
        /// The host's online CPUs.
        host_cpus: u32,
    },
}

/// Loads `bundle/config.json` and checks it against `host`.
pub fn load(bundle: &Path, host: Host) -> Result<Container, SpecError> {
    let spec = read(bundle)?;
    let process = spec.process().as_ref().ok_or(SpecError::NoArgs)?;
    let resources = spec.linux().as_ref().and_then(|l| l.resources().as_ref());
    let mut process = request(process)?;
    process.mounts = binds::copied(spec.mounts().as_deref().unwrap_or_default())?;
    Ok(Container {
        process,
        hostname: hostname(spec.hostname().clone().unwrap_or_default())?,
        cpu_limit: cpu_limit(resources, host)?,
        memory_limit_mib: memory_limit_mib(resources, host)?,
        role: Role::of(spec.annotations().as_ref())?,
        netns: netns(spec.linux().as_ref())?,
        resolv_conf: spec
            .mounts()
            .iter()
            .flatten()
            .find(|mount| mount.destination() == Path::new(RESOLV_CONF))
            .and_then(|mount| mount.source().clone()),
    })
}

/// The role of the container of `bundle` (its `config.json`'s pod
/// annotations), which is all `start` needs of it.
pub fn role(bundle: &Path) -> Result<Role, SpecError> {
    Ok(Role::of(read(bundle)?.annotations().as_ref())?)
}

/// The network namespace whose interface the VM of `bundle`'s container
/// took, if any: a lone container's or a sandbox's; a pod member's VM is
/// its sandbox's, so it took none (CRI names a member's namespace as its
/// sandbox task's, `/proc/PID/ns/net`, which is not the pod's here). All
/// `shim delete` needs of the spec, to clear what a shim that died left
/// there ([`crate::network::PodNetwork::clear_left`]).
pub fn joined_netns(bundle: &Path) -> Result<Option<PathBuf>, SpecError> {
    let spec = read(bundle)?;
    match Role::of(spec.annotations().as_ref())? {
        Role::Member { .. } => Ok(None),
        Role::Alone | Role::Sandbox => netns(spec.linux().as_ref()),
    }
}

/// `bundle/config.json`.
fn read(bundle: &Path) -> Result<Spec, SpecError> {
    let path = bundle.join("config.json");
    Spec::load(&path).map_err(|source| SpecError::Load { path, source })
}

/// The path of the network namespace to join, if the spec names one. A
/// network namespace without a path (`ctr run`'s default) asks for a new,
/// empty one: a VM is that already, with no NIC.
fn netns(linux: Option<&Linux>) -> Result<Option<PathBuf>, SpecError> {
    let namespaces = linux.and_then(|l| l.namespaces().as_ref());
    let path = namespaces
        .into_iter()
        .flatten()
        .filter(|ns| ns.typ() == LinuxNamespaceType::Network)
        .find_map(|ns| ns.path().clone());
    match path {
        Some(path) if !path.is_absolute() => Err(SpecError::Netns(path)),
        path => Ok(path),
    }
}

/// A hostname the guest gets on its kernel command line (RFC 1123
/// characters: nothing that could end the word or start another).
fn hostname(name: String) -> Result<String, SpecError> {
    let valid = name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.');
    if valid {
        Ok(name)
    } else {
        Err(SpecError::Hostname(name))
    }
}

/// The exec request of an exec's process spec (ExecProcessRequest.spec:
/// JSON of an OCI process).
pub fn exec_request(json: &[u8]) -> Result<ExecRequest, SpecError> {
    let process: Process = serde_json::from_slice(json).map_err(SpecError::ExecProcess)?;
    request(&process)
}

/// The process as guest-init runs it: its own argv, environment, working
/// directory and identity (numbers, which containerd has resolved).
fn request(process: &Process) -> Result<ExecRequest, SpecError> {
    let argv = process.args().clone().unwrap_or_default();
    if argv.is_empty() {
        return Err(SpecError::NoArgs);
    }
    let env = process
        .env()
        .iter()
        .flatten()
        .map(|pair| match pair.split_once('=') {
            Some((key, value)) if !key.is_empty() => Ok((key.to_string(), value.to_string())),
            _ => Err(SpecError::Env(pair.clone())),
        })
        .collect::<Result<BTreeMap<_, _>, _>>()?;
    let cwd = process.cwd().to_string_lossy().into_owned();
    if !cwd.starts_with('/') {
        return Err(SpecError::Cwd(cwd));
    }
    let user = process.user();
    let tty = process.terminal().unwrap_or(false).then(|| {
        process
            .console_size()
            .as_ref()
            .map_or(DEFAULT_TERMINAL, |size| WindowSize {
                rows: u16::try_from(size.height()).unwrap_or(u16::MAX),
                cols: u16::try_from(size.width()).unwrap_or(u16::MAX),
            })
    });
    Ok(ExecRequest {
        argv,
        env,
        workdir: Some(cwd),
        user: Some(format!("{}:{}", user.uid(), user.gid())),
        groups: user.additional_gids().clone(),
        tty,
        // containerd always hands a stdin path to a process that has one;
        // whether it does is the shim's to see (`Stdio::stdin`).
        stdin: false,
        // A pod member's root disk, which only the task service knows.
        root: None,
        // The container's, which `load` adds; an exec's finds them.
        mounts: Vec::new(),
    })
}

/// vCPUs from the CFS quota and period: as many CPUs as the quota buys,
/// rounded up; none without a quota (absent or -1).
fn cpu_limit(resources: Option<&LinuxResources>, host: Host) -> Result<Option<u8>, SpecError> {
    let cpu = resources.and_then(|r| r.cpu().as_ref());
    let Some(quota) = cpu.and_then(|c| c.quota()).filter(|&q| q >= 0) else {
        return Ok(None);
    };
    let period = cpu
        .and_then(|c| c.period())
        .unwrap_or(DEFAULT_CPU_PERIOD_US);
    let err = SpecError::Cpu {
        quota,
        period,
        host_cpus: host.cpus,
    };
    if period == 0 {
        return Err(err);
    }
    let cpus = (quota as u64).div_ceil(period).max(1);
    match u8::try_from(cpus) {
        Ok(cpus) if u32::from(cpus) <= host.cpus => Ok(Some(cpus)),
        _ => Err(err),
    }
}

/// Memory from the limit in bytes, rounded up to whole MiB; none
/// without a limit (absent or -1).
fn memory_limit_mib(
    resources: Option<&LinuxResources>,
    host: Host,
) -> Result<Option<u32>, SpecError> {
    let memory = resources.and_then(|r| r.memory().as_ref());
    let Some(limit) = memory.and_then(|m| m.limit()).filter(|&l| l != -1) else {
        return Ok(None);
    };
    let mib = u64::try_from(limit).map(|bytes| bytes.div_ceil(1 << 20));
    match mib {
        Ok(mib) if (u64::from(MIN_MEMORY_MIB)..=host.memory_mib).contains(&mib) => {
            Ok(Some(u32::try_from(mib).unwrap_or(u32::MAX)))
        }
        _ => Err(SpecError::Memory {
            limit,
            host_mib: host.memory_mib,
        }),
    }
}

/// This machine's CPUs and memory.
pub fn this_host() -> Host {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get() as u32);
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let kib = meminfo
        .lines()
        .find_map(|line| line.strip_prefix("MemTotal:"))
        .and_then(|rest| {
            rest.trim()
                .trim_end_matches("kB")
                .trim()
                .parse::<u64>()
                .ok()
        })
        .unwrap_or(0);
    Host {
        cpus,
        memory_mib: kib / 1024,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_vmm::report::one_line;

    const HOST: Host = Host {
        cpus: 4,
        memory_mib: 8192,
    };

    fn bundle(config: serde_json::Value) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("config.json"), config.to_string()).unwrap();
        dir
    }

    fn spec(process: serde_json::Value, linux: serde_json::Value) -> serde_json::Value {
        serde_json::json!({
            "ociVersion": "1.0.2",
            "process": process,
            "root": {"path": "rootfs"},
            "hostname": "web",
            "linux": linux,
        })
    }

    fn process() -> serde_json::Value {
        serde_json::json!({
            "args": ["/bin/sh", "-c", "echo hi"],
            "env": ["PATH=/bin", "GREETING=a=b"],
            "cwd": "/srv",
            "user": {"uid": 1000, "gid": 29, "additionalGids": [10]},
            "terminal": true,
            "consoleSize": {"height": 50, "width": 132},
        })
    }

    #[test]
    fn the_pod_annotations_give_the_role_at_start_and_at_create() {
        let mut config = spec(process(), serde_json::json!({}));
        let dir = bundle(config.clone());
        assert_eq!(role(dir.path()).unwrap(), Role::Alone);
        assert_eq!(load(dir.path(), HOST).unwrap().role, Role::Alone);
        config["annotations"] = serde_json::json!({
            "io.kubernetes.cri.container-type": "container",
            "io.kubernetes.cri.sandbox-id": "pod1",
        });
        let dir = bundle(config.clone());
        let member = Role::Member {
            sandbox: "pod1".into(),
        };
        assert_eq!(role(dir.path()).unwrap(), member);
        assert_eq!(load(dir.path(), HOST).unwrap().role, member);
        config["annotations"]["io.kubernetes.cri.container-type"] = "pod".into();
        let err = one_line(&role(bundle(config).path()).unwrap_err());
        assert_eq!(
            err,
            "annotation io.kubernetes.cri.container-type \"pod\": expected \"sandbox\" or \"container\""
        );
    }

    #[test]
    fn the_process_hostname_and_resources_become_the_request_and_the_vm() {
        let linux = serde_json::json!({"resources": {
            "memory": {"limit": 512i64 << 20},
            "cpu": {"quota": 150_000, "period": 100_000},
        }});
        let dir = bundle(spec(process(), linux));
        let container = load(dir.path(), HOST).unwrap();
        assert_eq!((container.vcpus(), container.memory_mib()), (2, 512));
        assert_eq!(container.hostname, "web");
        let request = container.process;
        assert_eq!(request.argv, ["/bin/sh", "-c", "echo hi"]);
        assert_eq!(request.env["GREETING"], "a=b");
        assert_eq!(request.workdir.as_deref(), Some("/srv"));
        assert_eq!(request.user.as_deref(), Some("1000:29"));
        assert_eq!(request.groups, Some(vec![10]));
        assert_eq!(
            request.tty,
            Some(WindowSize {
                rows: 50,
                cols: 132
            })
        );
    }

    #[test]
    fn no_resources_give_the_defaults() {
        let dir = bundle(spec(process(), serde_json::json!({})));
        let container = load(dir.path(), HOST).unwrap();
        assert_eq!(
            (container.vcpus(), container.memory_mib()),
            (DEFAULT_VCPUS, DEFAULT_MEMORY_MIB)
        );
        let unlimited = serde_json::json!({"resources": {
            "memory": {"limit": -1}, "cpu": {"quota": -1}}});
        let dir = bundle(spec(process(), unlimited));
        assert_eq!(load(dir.path(), HOST).unwrap().vcpus(), DEFAULT_VCPUS);
    }

    #[test]
    fn absurd_resources_are_refused_by_field_and_value() {
        let cases = [
            (
                serde_json::json!({"memory": {"limit": 1i64 << 50}}),
                "linux.resources.memory.limit 1125899906842624: expected 64 MiB to this host's 8192 MiB",
            ),
            (
                serde_json::json!({"memory": {"limit": 4096}}),
                "linux.resources.memory.limit 4096",
            ),
            (
                serde_json::json!({"cpu": {"quota": 800_000, "period": 100_000}}),
                "cpu quota 800000 / period 100000: expected 1 to this host's 4 CPUs",
            ),
            (
                serde_json::json!({"cpu": {"quota": 1, "period": 0}}),
                "period 0",
            ),
        ];
        for (resources, want) in cases {
            let dir = bundle(spec(process(), serde_json::json!({"resources": resources})));
            let err = one_line(&load(dir.path(), HOST).unwrap_err());
            assert!(err.contains(want), "{err}");
        }
    }

    #[test]
    fn a_bad_process_or_a_missing_spec_is_named() {
        let mut no_args = process();
        no_args["args"] = serde_json::json!([]);
        let mut bad_env = process();
        bad_env["env"] = serde_json::json!(["NOEQUALS"]);
        let mut relative = process();
        relative["cwd"] = "srv".into();
        let dir = bundle(serde_json::json!({
            "ociVersion": "1.0.2", "process": process(), "root": {"path": "rootfs"},
            "hostname": "web kiln.entrypoint=/evil"}));
        let err = one_line(&load(dir.path(), HOST).unwrap_err());
        assert!(
            err.starts_with("hostname \"web kiln.entrypoint=/evil\""),
            "{err}"
        );
        for (process, want) in [
            (no_args, "no process.args"),
            (
                bad_env,
                "process.env entry \"NOEQUALS\": expected KEY=VALUE",
            ),
            (relative, "process.cwd \"srv\": expected an absolute path"),
        ] {
            let dir = bundle(spec(process, serde_json::json!({})));
            let err = one_line(&load(dir.path(), HOST).unwrap_err());
            assert!(err.contains(want), "{err}");
        }
        let empty = tempfile::tempdir().unwrap();
        let err = one_line(&load(empty.path(), HOST).unwrap_err());
        assert!(err.starts_with("cannot read the runtime spec"), "{err}");
        assert!(err.contains("config.json"), "{err}");
    }

    #[test]
    fn a_network_namespace_with_a_path_is_joined_and_one_without_is_not() {
        let namespaces = |list: serde_json::Value| {
            let dir = bundle(spec(process(), serde_json::json!({"namespaces": list})));
            load(dir.path(), HOST).map(|c| c.netns)
        };
        let pod = serde_json::json!([
            {"type": "pid"},
            {"type": "network", "path": "/var/run/netns/cni-1234"},
        ]);
        assert_eq!(
            namespaces(pod).unwrap(),
            Some(PathBuf::from("/var/run/netns/cni-1234"))
        );
        let fresh =
            serde_json::json!([{"type": "network"}, {"type": "ipc", "path": "/proc/1/ns/ipc"}]);
        assert_eq!(namespaces(fresh).unwrap(), None);
        let dir = bundle(spec(process(), serde_json::json!({})));
        let container = load(dir.path(), HOST).unwrap();
        assert_eq!((container.netns, container.resolv_conf), (None, None));
        // What `shim delete` clears: a sandbox's namespace, not a member's.
        let mut config = spec(
            process(),
            serde_json::json!({"namespaces": [
                {"type": "network", "path": "/proc/42/ns/net"},
            ]}),
        );
        config["annotations"] = serde_json::json!({
            crate::pod::CONTAINER_TYPE: crate::pod::MEMBER,
            crate::pod::SANDBOX_ID: "pod1",
        });
        assert_eq!(joined_netns(bundle(config.clone()).path()).unwrap(), None);
        config["annotations"][crate::pod::CONTAINER_TYPE] = crate::pod::SANDBOX.into();
        assert_eq!(
            joined_netns(bundle(config).path()).unwrap(),
            Some(PathBuf::from("/proc/42/ns/net"))
        );
        let relative = serde_json::json!([{"type": "network", "path": "netns/pod"}]);
        let err = one_line(&namespaces(relative).unwrap_err());
        assert_eq!(
            err,
            "linux.namespaces network path \"netns/pod\": expected an absolute path"
        );
    }

    #[test]
    fn the_pods_resolv_conf_is_read_and_the_other_binds_copied() {
        let pod = tempfile::tempdir().unwrap();
        let hosts = pod.path().join("hosts");
        std::fs::write(&hosts, "10.88.0.5 web\n").unwrap();
        let mut config = spec(process(), serde_json::json!({}));
        config["mounts"] = serde_json::json!([
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/etc/hosts", "type": "bind", "source": hosts},
            {"destination": "/etc/resolv.conf", "type": "bind", "source": "/pod/resolv.conf"},
        ]);
        let dir = bundle(config);
        let container = load(dir.path(), HOST).unwrap();
        assert_eq!(
            container.resolv_conf,
            Some(PathBuf::from("/pod/resolv.conf"))
        );
        let copied: Vec<&str> = container
            .process
            .mounts
            .iter()
            .map(|m| m.destination.as_str())
            .collect();
        assert_eq!(copied, ["/etc/hosts"]);
    }

    #[test]
    fn an_exec_spec_is_a_process_of_its_own() {
        let mut exec = process();
        exec["terminal"] = false.into();
        let request = exec_request(exec.to_string().as_bytes()).unwrap();
        assert_eq!(request.tty, None);
        assert_eq!(request.argv[0], "/bin/sh");
        let err = one_line(&exec_request(b"[]").unwrap_err());
        assert!(
            err.starts_with("the exec's process spec is not an OCI process"),
            "{err}"
        );
    }
}
