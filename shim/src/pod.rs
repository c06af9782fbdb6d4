//! Pods: one VM per Kubernetes pod, as Kata Containers runs them, with
//! Firecracker-containerd's spare drives. containerd's CRI plugin creates
//! a pod's sandbox container first, then each of its containers, marking
//! every bundle with two annotations ([`CONTAINER_TYPE`], [`SANDBOX_ID`]).
//! `start` hands a pod's containers to the sandbox's shim (as the Go
//! runc-v2 shim groups them by the sandbox id); there the sandbox's VM is
//! made with [`SLOTS`] empty drives, and each later container ("member")
//! fills one with its own root disk and runs in the VM chrooted into it.
use std::collections::HashMap;
use std::path::PathBuf;

use kiln_vmm::config::{DiskConfig, DiskSource};

use crate::spec::Container;

/// The annotation saying what a container is to its pod: [`SANDBOX`] or
/// [`MEMBER`] (containerd's `pkg/cri/annotations.ContainerType`).
pub const CONTAINER_TYPE: &str = "io.kubernetes.cri.container-type";
/// The annotation naming the pod's sandbox container, on the sandbox
/// (itself) and on each of its containers (`annotations.SandboxID`).
pub const SANDBOX_ID: &str = "io.kubernetes.cri.sandbox-id";
/// [`CONTAINER_TYPE`] of a pod's sandbox container.
pub const SANDBOX: &str = "sandbox";
/// [`CONTAINER_TYPE`] of a container in a pod.
pub const MEMBER: &str = "container";
/// The empty drives a pod's VM is made with, after its own root disk:
/// the containers it can hold at once (a member's Delete gives its drive
/// back); eight covers a pod of a few containers, and each empty drive
/// costs one virtio-mmio device.
pub const SLOTS: usize = 8;

/// What a container is, by its bundle's annotations.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Role {
    /// No pod annotations (`ctr run`): a VM of its own, as it always was.
    Alone,
    /// A pod's sandbox: its VM is the pod's, made with [`SLOTS`] empty
    /// drives. (Its own [`SANDBOX_ID`] names itself, as CRI sets it.)
    Sandbox,
    /// A container of the pod whose sandbox is `sandbox`: it runs in that
    /// VM, on a root disk of its own.
    Member {
        /// The sandbox container's id.
        sandbox: String,
    },
}

/// Why a container's pod annotations or its place in a pod are refused.
#[derive(Debug, thiserror::Error)]
pub enum PodError {
    /// [`CONTAINER_TYPE`] has a value other than the two CRI sets.
    #[error("annotation {CONTAINER_TYPE} {0:?}: expected {SANDBOX:?} or {MEMBER:?}")]
    Type(String),
    /// A pod's container without the id of its sandbox.
    #[error(
        "annotation {CONTAINER_TYPE} {MEMBER:?} without {SANDBOX_ID}: expected the pod's sandbox id"
    )]
    NoSandboxId,
    /// [`SANDBOX_ID`] without [`CONTAINER_TYPE`].
    #[error("annotation {SANDBOX_ID} without {CONTAINER_TYPE}: expected both, as CRI sets them")]
    NoType,
    /// A member whose sandbox is not in this shim.
    #[error(
        "pod sandbox {0:?} is not in this shim: expected the pod's sandbox container to be created first"
    )]
    NoSandbox(String),
    /// A member of a container that is not a pod's sandbox.
    #[error("container {0:?} is not a pod sandbox: expected {CONTAINER_TYPE} {SANDBOX:?} on it")]
    NotASandbox(String),
    /// Every empty drive of the pod's VM has been filled.
    #[error(
        "pod sandbox {0:?} holds {SLOTS} containers: a pod's VM holds at most {SLOTS} at once (delete one first)"
    )]
    Full(String),
    /// A member asks for more than the pod's VM has, which it shares.
    #[error("{what} {asked}: expected at most the pod's VM's {has} (its sandbox's)")]
    Bigger {
        /// What is asked for.
        what: &'static str,
        /// The member's.
        asked: u32,
        /// The VM's.
        has: u32,
    },
    /// A member names a hostname other than its pod's, which it shares.
    #[error("hostname {asked:?}: expected the pod's {has:?} (its sandbox's)")]
    Hostname {
        /// The member's.
        asked: String,
        /// The VM's.
        has: String,
    },
    /// A member in a network namespace other than its pod's: the VM has
    /// one NIC, its sandbox's, which its members share.
    #[error(
        "network namespace {}: expected the pod's {} (its sandbox's) or {}",
        shown(.asked), shown(.has), .task.display()
    )]
    Netns {
        /// The member's.
        asked: Option<PathBuf>,
        /// The VM's.
        has: Option<PathBuf>,
        /// The sandbox task's, as CRI names it ([`task_netns`]).
        task: PathBuf,
    },
}

/// The network namespace of the sandbox's task `pid`, as containerd's CRI
/// names it in every other container of the pod (`WithPodNamespaces`:
/// `/proc/PID/ns/net`, the sandbox's own process's namespace under runc).
/// Here that process is the pod's VM process, which is not in the pod's
/// namespace; the name stands for the sandbox's, whose NIC the VM has.
fn task_netns(pid: u32) -> PathBuf {
    PathBuf::from(format!("/proc/{pid}/ns/net"))
}

/// A spec's network namespace path as an error names it.
fn shown(netns: &Option<PathBuf>) -> String {
    match netns {
        Some(path) => format!("{path:?}"),
        None => "none".to_string(),
    }
}

impl Role {
    /// The role `annotations` (a bundle's, if it has any) give.
    pub fn of(annotations: Option<&HashMap<String, String>>) -> Result<Role, PodError> {
        let get = |key| annotations.and_then(|all| all.get(key));
        match (get(CONTAINER_TYPE).map(String::as_str), get(SANDBOX_ID)) {
            (None, None) => Ok(Role::Alone),
            (None, Some(_)) => Err(PodError::NoType),
            (Some(SANDBOX), _) => Ok(Role::Sandbox),
            (Some(MEMBER), Some(sandbox)) => Ok(Role::Member {
                sandbox: sandbox.clone(),
            }),
            (Some(MEMBER), None) => Err(PodError::NoSandboxId),
            (Some(other), _) => Err(PodError::Type(other.to_string())),
        }
    }

    /// The shim daemon that serves container `id`: its sandbox's for a
    /// member, else its own (the `grouping` of `containerd_shim::spawn`).
    pub fn grouping<'a>(&'a self, id: &'a str) -> &'a str {
        match self {
            Role::Member { sandbox } => sandbox,
            Role::Alone | Role::Sandbox => id,
        }
    }
}

/// The empty drives of a pod's VM, by their index in the VM's definition
/// (1 to [`SLOTS`]; the sandbox's root disk is 0): free, or taken by a
/// member until its Delete gives it back.
#[derive(Debug)]
pub struct Slots {
    taken: [bool; SLOTS],
}

impl Default for Slots {
    fn default() -> Self {
        Slots {
            taken: [false; SLOTS],
        }
    }
}

impl Slots {
    /// The lowest free drive for a member of `sandbox`. A drive whose
    /// attach failed is never given back (the attach may have left it in
    /// any state).
    pub fn take(&mut self, sandbox: &str) -> Result<usize, PodError> {
        let free = self.taken.iter().position(|taken| !taken);
        let free = free.ok_or_else(|| PodError::Full(sandbox.to_string()))?;
        self.taken[free] = true;
        Ok(free + 1)
    }

    /// Drive `index` is empty again: its member's root was released in
    /// the guest and the drive detached.
    pub fn give_back(&mut self, index: usize) {
        if let Some(taken) = index.checked_sub(1).and_then(|i| self.taken.get_mut(i)) {
            *taken = false;
        }
    }
}

/// A pod VM's empty drives, to follow its sandbox's root disk in its
/// definition: writable, so that a member's root can be written.
pub fn empty_drives() -> impl Iterator<Item = DiskConfig> {
    std::iter::repeat_n(
        DiskConfig {
            source: DiskSource::Empty,
            read_only: false,
            ephemeral: false,
        },
        SLOTS,
    )
}

/// The guest's device of the VM's disk `index`: the disks are virtio-mmio
/// devices probed in the definition's order, and Linux's virtio_blk
/// names them vda, vdb, … as it probes them.
pub fn device(index: usize) -> String {
    let letter = u8::try_from(index).map_or('?', |i| char::from(b'a' + i));
    format!("/dev/vd{letter}")
}

/// Checks that `member` fits the pod's VM, which was made to `sandbox`'s
/// spec: the VM's vCPUs, memory, hostname and NIC are the whole pod's, so
/// a member's limits may be no more than they are (and are refused
/// otherwise, rather than promised what the VM does not have); a member
/// without a limit has the VM's. CRI gives a member its sandbox's network
/// namespace, by its path or as its task's (the VM process `pid`'s,
/// [`task_netns`]), which the VM's NIC joined already; any other is
/// refused, since the member would get the pod's network, not that one.
pub fn fits(member: &Container, sandbox: &Container, pid: u32) -> Result<(), PodError> {
    let bigger = |what, asked: Option<u32>, has: u32| match asked {
        Some(asked) if asked > has => Err(PodError::Bigger { what, asked, has }),
        _ => Ok(()),
    };
    bigger(
        "vCPUs (linux.resources.cpu)",
        member.cpu_limit.map(u32::from),
        sandbox.vcpus().into(),
    )?;
    bigger(
        "MiB of memory (linux.resources.memory.limit)",
        member.memory_limit_mib,
        sandbox.memory_mib(),
    )?;
    if !member.hostname.is_empty() && member.hostname != sandbox.hostname {
        return Err(PodError::Hostname {
            asked: member.hostname.clone(),
            has: sandbox.hostname.clone(),
        });
    }
    let task = task_netns(pid);
    if member.netns != sandbox.netns && member.netns.as_ref() != Some(&task) {
        return Err(PodError::Netns {
            asked: member.netns.clone(),
            has: sandbox.netns.clone(),
            task,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_vmm::report::one_line;

    fn annotations(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn cri_annotations_make_a_sandbox_and_its_members() {
        assert_eq!(Role::of(None).unwrap(), Role::Alone);
        assert_eq!(Role::of(Some(&annotations(&[]))).unwrap(), Role::Alone);
        let sandbox = annotations(&[(CONTAINER_TYPE, "sandbox"), (SANDBOX_ID, "pod1")]);
        assert_eq!(Role::of(Some(&sandbox)).unwrap(), Role::Sandbox);
        assert_eq!(Role::Sandbox.grouping("pod1"), "pod1");
        let member = annotations(&[(CONTAINER_TYPE, "container"), (SANDBOX_ID, "pod1")]);
        let role = Role::of(Some(&member)).unwrap();
        assert_eq!(
            role,
            Role::Member {
                sandbox: "pod1".into()
            }
        );
        assert_eq!(role.grouping("web"), "pod1");
        assert_eq!(Role::Alone.grouping("web"), "web");
    }

    #[test]
    fn half_or_unknown_pod_annotations_are_refused_by_name() {
        let cases = [
            (
                annotations(&[(CONTAINER_TYPE, "podlet"), (SANDBOX_ID, "p")]),
                "annotation io.kubernetes.cri.container-type \"podlet\": expected \"sandbox\" or \"container\"",
            ),
            (
                annotations(&[(CONTAINER_TYPE, "container")]),
                "annotation io.kubernetes.cri.container-type \"container\" without io.kubernetes.cri.sandbox-id: expected the pod's sandbox id",
            ),
            (
                annotations(&[(SANDBOX_ID, "p")]),
                "annotation io.kubernetes.cri.sandbox-id without io.kubernetes.cri.container-type: expected both, as CRI sets them",
            ),
        ];
        for (given, said) in cases {
            assert_eq!(one_line(&Role::of(Some(&given)).unwrap_err()), said);
        }
    }

    #[test]
    fn a_pod_fills_its_slots_once_each_refuses_one_more_and_reuses_one_given_back() {
        let mut slots = Slots::default();
        let taken: Vec<usize> = (0..SLOTS).map(|_| slots.take("pod1").unwrap()).collect();
        assert_eq!(taken, (1..=SLOTS).collect::<Vec<_>>());
        assert_eq!(
            one_line(&slots.take("pod1").unwrap_err()),
            "pod sandbox \"pod1\" holds 8 containers: a pod's VM holds at most 8 at once (delete one first)"
        );
        slots.give_back(3);
        assert_eq!(slots.take("pod1").unwrap(), 3);
        // The root disk's index and indexes past the drives are no slot's.
        slots.give_back(0);
        slots.give_back(SLOTS + 1);
        assert!(slots.take("pod1").is_err());
    }

    #[test]
    fn a_pods_vm_has_its_slots_as_writable_empty_drives() {
        let drives: Vec<DiskConfig> = empty_drives().collect();
        assert_eq!(drives.len(), SLOTS);
        for drive in drives {
            assert_eq!(drive.source, DiskSource::Empty);
            assert!(!drive.read_only && !drive.ephemeral);
        }
    }

    #[test]
    fn disks_are_named_in_definition_order() {
        assert_eq!(device(0), "/dev/vda");
        assert_eq!(device(1), "/dev/vdb");
        assert_eq!(device(SLOTS), "/dev/vdi");
    }

    fn container(vcpus: Option<u8>, memory_mib: Option<u32>, hostname: &str) -> Container {
        Container {
            process: crate::spec::exec_request(
                br#"{"args": ["/bin/true"], "cwd": "/", "user": {"uid": 0, "gid": 0}}"#,
            )
            .unwrap(),
            hostname: hostname.into(),
            cpu_limit: vcpus,
            memory_limit_mib: memory_mib,
            role: Role::Alone,
            netns: None,
            resolv_conf: None,
        }
    }

    #[test]
    fn a_member_may_ask_for_no_more_than_its_pods_vm() {
        let vm = container(Some(2), Some(128), "pod");
        assert!(fits(&container(Some(2), Some(128), "pod"), &vm, 7).is_ok());
        assert!(fits(&container(Some(1), Some(64), ""), &vm, 7).is_ok());
        // No limit: the VM's, whatever it is (not the 256 MiB default).
        assert!(fits(&container(None, None, "pod"), &vm, 7).is_ok());
        assert_eq!(
            one_line(&fits(&container(Some(3), None, ""), &vm, 7).unwrap_err()),
            "vCPUs (linux.resources.cpu) 3: expected at most the pod's VM's 2 (its sandbox's)"
        );
        assert_eq!(
            one_line(&fits(&container(None, Some(512), ""), &vm, 7).unwrap_err()),
            "MiB of memory (linux.resources.memory.limit) 512: expected at most the pod's VM's 128 (its sandbox's)"
        );
        assert_eq!(
            one_line(&fits(&container(None, None, "web"), &vm, 7).unwrap_err()),
            "hostname \"web\": expected the pod's \"pod\" (its sandbox's)"
        );
    }

    #[test]
    fn a_member_shares_its_pods_network_namespace_or_is_refused() {
        let in_netns = |path: Option<&str>| Container {
            netns: path.map(PathBuf::from),
            ..container(None, None, "")
        };
        let vm = in_netns(Some("/var/run/netns/cni-1"));
        assert!(fits(&in_netns(Some("/var/run/netns/cni-1")), &vm, 7).is_ok());
        // CRI's name for it: the sandbox task's (the VM process's).
        assert!(fits(&in_netns(Some("/proc/7/ns/net")), &vm, 7).is_ok());
        assert!(fits(&in_netns(Some("/proc/7/ns/net")), &in_netns(None), 7).is_ok());
        assert_eq!(
            one_line(&fits(&in_netns(Some("/var/run/netns/cni-2")), &vm, 7).unwrap_err()),
            "network namespace \"/var/run/netns/cni-2\": expected the pod's \"/var/run/netns/cni-1\" (its sandbox's) or /proc/7/ns/net"
        );
        assert_eq!(
            one_line(&fits(&in_netns(None), &vm, 7).unwrap_err()),
            "network namespace none: expected the pod's \"/var/run/netns/cni-1\" (its sandbox's) or /proc/7/ns/net"
        );
    }
}
