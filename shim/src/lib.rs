//! `containerd-shim-kiln-v2`: containerd's runtime v2 shim (task API v2,
//! served with the `containerd-shim` crate 0.11, which containerd 1.6 and
//! 1.7 speak) running each container as a Kiln microVM. containerd finds
//! it on PATH by the runtime name `io.containerd.kiln.v2`.
//!
//! One shim process per container, or per pod, as runc's shim: `start`
//! re-executes this binary as the shim daemon, which serves the task
//! service ([`task`]) until containerd shuts it down; a pod's containers
//! are handed to its sandbox's daemon ([`pod`]). The container's (or
//! pod's) VM is a child of the daemon (this binary again, as
//! [`vm::VM_SUBCOMMAND`]), and ends with it.
#![warn(missing_docs)]

pub mod binds;
pub mod network;
pub mod pod;
pub mod rootfs;
pub mod spec;
pub mod task;
pub mod vm;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use containerd_shim::publisher::RemotePublisher;
use containerd_shim::{Config, DeleteResponse, ExitSignal, Flags, StartOpts};
use kiln_vmm::report::one_line;
use sha2::{Digest, Sha256};

use crate::network::PodNetwork;

/// The runtime name containerd knows the shim by.
pub const RUNTIME_ID: &str = "io.containerd.kiln.v2";

/// What the shim needs from outside: the guest kernel, guest-init, and
/// where root disk images are cached. Found as `kiln` finds them: an
/// environment variable, else `$KILN_HOME` (containerd's environment).
#[derive(Clone, Debug)]
pub struct Assets {
    /// The guest kernel (`KILN_KERNEL`, or `$KILN_HOME/kernel/vmlinux`).
    pub kernel: PathBuf,
    /// guest-init (`KILN_GUEST_INIT`, or `$KILN_HOME/guest-init`).
    pub guest_init: PathBuf,
    /// Root disk images by parent chain (`$KILN_HOME/containers/rootfs`).
    pub cache: PathBuf,
}

impl Assets {
    /// The assets of this environment.
    pub fn from_env() -> Self {
        let home = kiln_builder::store::default_home();
        let named = |var: &str, default: PathBuf| {
            std::env::var_os(var)
                .filter(|path| !path.is_empty())
                .map_or(default, PathBuf::from)
        };
        Assets {
            kernel: named("KILN_KERNEL", home.join("kernel/vmlinux")),
            guest_init: named("KILN_GUEST_INIT", home.join("guest-init")),
            cache: home.join("containers/rootfs"),
        }
    }
}

/// The directory of container `id` of `namespace`: its VM's definition,
/// overlay, console and vsock socket. Named by a digest, so that a unix
/// socket path in it stays short whatever the id (CRI's are 64 digits).
pub fn container_dir(namespace: &str, id: &str) -> PathBuf {
    let digest = Sha256::digest(format!("{namespace}/{id}"));
    kiln_builder::store::default_home()
        .join("containers")
        .join(kiln_image::hex(&digest[..8]))
}

/// The shim: what containerd starts, deletes and talks to.
pub struct Shim {
    namespace: String,
    id: String,
    exit: Arc<ExitSignal>,
}

impl containerd_shim::Shim for Shim {
    type T = task::Tasks;

    fn new(_runtime_id: &str, args: &Flags, _config: &mut Config) -> Self {
        Shim {
            namespace: args.namespace.clone(),
            id: args.id.clone(),
            exit: Arc::default(),
        }
    }

    /// One shim daemon per container, or per pod: its socket is named by
    /// the container's id, or by its pod's sandbox's, whose daemon (which
    /// `spawn` finds serving that socket) then serves it. containerd runs
    /// `start` in the container's bundle.
    fn start_shim(&mut self, opts: StartOpts) -> containerd_shim::Result<String> {
        let role = spec::role(Path::new("."))
            .map_err(|err| containerd_shim::Error::InvalidArgument(one_line(&err)))?;
        let grouping = role.grouping(&opts.id).to_string();
        let (_pid, address) = containerd_shim::spawn(opts, &grouping, Vec::new())?;
        containerd_shim::util::write_address(&address)?;
        Ok(address)
    }

    /// After a shim daemon died: its VM dies with it (its parent-death
    /// signal; what is left of it is killed with its jail's cgroup, which
    /// goes); its files go, and so does the qdisc it left in the pod's
    /// network namespace (containerd runs this in the bundle, whose spec
    /// names it). What could not be removed is the error, which containerd
    /// logs.
    fn delete_shim(&mut self) -> containerd_shim::Result<DeleteResponse> {
        let dir = container_dir(&self.namespace, &self.id);
        let jail = vm::Files::new(dir.clone()).jail_id();
        let cgroup = kiln_control::jail::cgroup::remove_left(&jail).map_err(|err| one_line(&err));
        let files = match std::fs::remove_dir_all(&dir) {
            Err(err) if err.kind() != std::io::ErrorKind::NotFound => Err(format!(
                "cannot remove {}: {}",
                dir.display(),
                one_line(&err)
            )),
            _ => Ok(()),
        };
        let network = spec::joined_netns(Path::new("."))
            .map_err(|err| one_line(&err))
            .and_then(|netns| match netns {
                Some(netns) => PodNetwork::clear_left(&netns).map_err(|err| one_line(&err)),
                None => Ok(()),
            });
        cgroup
            .and(files)
            .and(network)
            .map_err(containerd_shim::Error::Other)?;
        Ok(DeleteResponse {
            // As runc's shim: the task was killed with its shim.
            exit_status: 128 + libc::SIGKILL as u32,
            exited_at: containerd_shim::protos::protobuf::MessageField::some(
                containerd_shim::protos::protobuf::well_known_types::timestamp::Timestamp::now(),
            ),
            ..Default::default()
        })
    }

    fn wait(&mut self) {
        self.exit.wait();
    }

    fn create_task_service(&self, publisher: RemotePublisher) -> Self::T {
        task::Tasks::new(
            self.namespace.clone(),
            Assets::from_env(),
            publisher,
            self.exit.clone(),
        )
    }
}
