//! The task service containerd calls (task API v2, `shim.proto`): a
//! container alone, or a pod's containers ([`crate::pod`]), run in one VM.
//! Create makes the root disk and boots the VM (guest-init serving its
//! exec port, no entrypoint); Start runs the container's process through
//! that port, as every Exec'd process is run, with containerd's stdio
//! FIFOs bridged to the stream. The process's end ends the VM; Delete
//! removes everything the container had. A pod member's Create instead
//! fills an empty drive of its sandbox's VM with its root disk, and its
//! processes run chrooted into it; its end ends only its processes.
use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread;

use containerd_shim::api;
use containerd_shim::event::Event;
use containerd_shim::protos::events::task::{
    TaskCreate, TaskDelete, TaskExecAdded, TaskExecStarted, TaskExit, TaskIO, TaskStart,
};
use containerd_shim::protos::protobuf::well_known_types::timestamp::Timestamp;
use containerd_shim::protos::protobuf::{MessageDyn, MessageField};
use containerd_shim::protos::ttrpc::{self, Code};
use containerd_shim::publisher::RemotePublisher;
use containerd_shim::{ExitSignal, TtrpcContext, TtrpcResult};
use guest_init::exec::{ExecRequest, WindowSize};
use kiln_control::instance::exec::{ExecError, Input, Session, release_root};
use kiln_vmm::report::one_line;

use crate::network::{NetError, PodNetwork};
use crate::pod::{self, PodError, Role, Slots};
use crate::rootfs::{self, MountSpec, Rootfs, RootfsError};
use crate::spec::{self, SpecError};
use crate::vm::{self, Files, VmError, VmProcess};
use crate::{Assets, container_dir};

/// The status of a process that never got one: its stream broke (the VM
/// ended under it), as a shell reports a process it lost.
const STATUS_LOST: u32 = 255;

/// Why a task request failed; each becomes a ttrpc status with
/// [`one_line`] as its message, which `ctr` shows.
#[derive(Debug, thiserror::Error)]
pub enum TaskError {
    /// The bundle's spec cannot be run.
    #[error("container {id}")]
    Spec {
        /// The container.
        id: String,
        /// What is wrong with it.
        #[source]
        source: SpecError,
    },
    /// The root disk cannot be made.
    #[error("container {id}")]
    Rootfs {
        /// The container.
        id: String,
        /// Why.
        #[source]
        source: RootfsError,
    },
    /// The VM cannot be defined or started, or take a member's disk.
    #[error("container {id}")]
    Vm {
        /// The container.
        id: String,
        /// Why.
        #[source]
        source: VmError,
    },
    /// The VM's NIC cannot be connected to the pod's network, or what
    /// connected it cannot be removed.
    #[error("container {id}")]
    Network {
        /// The container.
        id: String,
        /// Why.
        #[source]
        source: NetError,
    },
    /// The container cannot join its pod.
    #[error("container {id}")]
    Pod {
        /// The container.
        id: String,
        /// Why.
        #[source]
        source: PodError,
    },
    /// A process could not be started in the VM.
    #[error("container {id}: process {exec_id:?} (console {console})")]
    Exec {
        /// The container.
        id: String,
        /// The process ("" for the container's own).
        exec_id: String,
        /// The VM's console, which says why a VM did not come up.
        console: PathBuf,
        /// Why (boxed: it is large, and rare).
        #[source]
        source: Box<ExecError>,
    },
    /// A pod member's root could not be given back in the guest.
    #[error("container {id}: cannot release its root {device} in the pod's VM")]
    Release {
        /// The container.
        id: String,
        /// Its root's block device in the guest.
        device: String,
        /// Why (boxed: it is large, and rare).
        #[source]
        source: Box<ExecError>,
    },
    /// A stdio path that is not a FIFO path (a log URI).
    #[error("container {id}: stdio {uri:?}: expected a FIFO path (log URIs are not supported)")]
    StdioUri {
        /// The container.
        id: String,
        /// What was given.
        uri: String,
    },
    /// The container's directory cannot be made or removed.
    #[error("container {id}: {path}")]
    Files {
        /// The container.
        id: String,
        /// The directory.
        path: PathBuf,
        /// What the file system said.
        #[source]
        source: io::Error,
    },
    /// A request names a container or process this shim does not have.
    #[error("no container {id:?} process {exec_id:?} in this shim")]
    NotFound {
        /// The container asked for.
        id: String,
        /// The process asked for.
        exec_id: String,
    },
    /// A request that the process's state does not allow.
    #[error("container {id} process {exec_id:?}: {problem}")]
    State {
        /// The container.
        id: String,
        /// The process.
        exec_id: String,
        /// What is wrong.
        problem: &'static str,
    },
}

impl TaskError {
    fn code(&self) -> Code {
        match self {
            TaskError::Spec { .. } | TaskError::StdioUri { .. } => Code::INVALID_ARGUMENT,
            TaskError::Rootfs {
                source: RootfsError::None | RootfsError::Many(_) | RootfsError::UnsupportedType(_),
                ..
            } => Code::INVALID_ARGUMENT,
            TaskError::Pod {
                source: PodError::Bigger { .. } | PodError::Hostname { .. } | PodError::Netns { .. },
                ..
            } => Code::INVALID_ARGUMENT,
            TaskError::Network {
                source:
                    NetError::Open { .. }
                    | NetError::Enter { .. }
                    | NetError::NoInterface { .. }
                    | NetError::Several { .. }
                    | NetError::NoMac { .. }
                    | NetError::Addresses { .. }
                    | NetError::ResolvConf { .. },
                ..
            } => Code::INVALID_ARGUMENT,
            TaskError::NotFound { .. } => Code::NOT_FOUND,
            TaskError::State { .. } | TaskError::Pod { .. } => Code::FAILED_PRECONDITION,
            _ => Code::UNKNOWN,
        }
    }
}

impl From<TaskError> for ttrpc::Error {
    fn from(err: TaskError) -> Self {
        log::error!("{}", one_line(&err));
        ttrpc::Error::RpcStatus(ttrpc::get_status(err.code(), one_line(&err)))
    }
}

/// containerd's stdio paths for one process: FIFOs, or empty for none.
#[derive(Clone, Debug, Default)]
struct Stdio {
    stdin: String,
    stdout: String,
    stderr: String,
    terminal: bool,
}

impl Stdio {
    fn checked(self, id: &str) -> Result<Stdio, TaskError> {
        for uri in [&self.stdin, &self.stdout, &self.stderr] {
            if uri.contains("://") {
                return Err(TaskError::StdioUri {
                    id: id.to_string(),
                    uri: uri.clone(),
                });
            }
        }
        Ok(self)
    }
}

/// A process's end: its status and when, once it has one.
#[derive(Default)]
struct Exit {
    status: Mutex<Option<(u32, Timestamp)>>,
    ended: Condvar,
}

impl Exit {
    fn get(&self) -> Option<(u32, Timestamp)> {
        lock(&self.status).clone()
    }

    fn set(&self, status: u32) {
        *lock(&self.status) = Some((status, Timestamp::now()));
        self.ended.notify_all();
    }

    fn wait(&self) -> (u32, Timestamp) {
        let mut status = lock(&self.status);
        loop {
            if let Some(exit) = status.clone() {
                return exit;
            }
            status = self
                .ended
                .wait(status)
                .unwrap_or_else(PoisonError::into_inner);
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The container's own process or an exec'd one.
struct Process {
    request: ExecRequest,
    stdio: Stdio,
    /// Where stdin, sizes and signals go, once started.
    input: Option<Input>,
    exit: Arc<Exit>,
}

impl Process {
    fn new(mut request: ExecRequest, stdio: Stdio) -> Self {
        request.stdin = !stdio.stdin.is_empty();
        Process {
            request,
            stdio,
            input: None,
            exit: Arc::default(),
        }
    }

    fn status(&self) -> api::Status {
        match (&self.input, self.exit.get()) {
            (_, Some(_)) => api::Status::STOPPED,
            (Some(_), None) => api::Status::RUNNING,
            (None, None) => api::Status::CREATED,
        }
    }
}

/// A VM of this shim: a container's alone, or a pod's (its sandbox's,
/// which its members share).
struct Vm {
    files: Files,
    /// Its VMM process's pid: every container's task pid.
    pid: u32,
    /// The spec it was made to (a pod's is its sandbox's).
    spec: spec::Container,
    process: Mutex<VmProcess>,
    /// A pod's empty drives.
    slots: Mutex<Slots>,
    /// Its NIC's connection to the pod's network, if the spec names one;
    /// taken to disconnect it once the VM has stopped.
    network: Mutex<Option<PodNetwork>>,
}

/// A pod member's root disk in its sandbox's VM.
struct Member {
    /// Its files, inside the VM's directory.
    dir: PathBuf,
    /// The VM's drive its root disk fills.
    index: usize,
    /// The guest's block device, which its processes have as their root.
    device: String,
}

/// A container of this shim.
struct Container {
    id: String,
    bundle: String,
    vm: Arc<Vm>,
    /// `None` for the VM's own container (alone, or a pod's sandbox),
    /// whose process's end ends the VM.
    member: Option<Member>,
    main: Process,
    execs: HashMap<String, Process>,
}

impl Container {
    fn pid(&self) -> u32 {
        self.vm.pid
    }

    fn process(&mut self, exec_id: &str) -> Result<&mut Process, TaskError> {
        if exec_id.is_empty() {
            return Ok(&mut self.main);
        }
        self.execs
            .get_mut(exec_id)
            .ok_or_else(|| TaskError::NotFound {
                id: self.id.clone(),
                exec_id: exec_id.to_string(),
            })
    }

    /// Ends the VM (if it still runs) and waits for its process.
    fn stop_vm(&mut self) {
        lock(&self.vm.process).stop();
    }
}

/// The task service.
#[derive(Clone)]
pub struct Tasks {
    inner: Arc<Inner>,
}

struct Inner {
    namespace: String,
    assets: Assets,
    publisher: RemotePublisher,
    exit: Arc<ExitSignal>,
    containers: Mutex<HashMap<String, Container>>,
}

impl Tasks {
    /// The service of a shim in `namespace`, publishing events through
    /// `publisher`, ending the shim through `exit`.
    pub fn new(
        namespace: String,
        assets: Assets,
        publisher: RemotePublisher,
        exit: Arc<ExitSignal>,
    ) -> Self {
        Tasks {
            inner: Arc::new(Inner {
                namespace,
                assets,
                publisher,
                exit,
                containers: Mutex::default(),
            }),
        }
    }

    fn publish(&self, event: impl Event + 'static) {
        let topic = event.topic();
        let event: Box<dyn MessageDyn> = Box::new(event);
        if let Err(err) = self.inner.publisher.publish(
            containerd_shim::Context::default(),
            &topic,
            &self.inner.namespace,
            event,
        ) {
            log::error!("cannot publish {topic}: {}", one_line(&err));
        }
    }

    /// The container `id`, locked.
    fn with<T>(
        &self,
        id: &str,
        exec_id: &str,
        f: impl FnOnce(&mut Container) -> Result<T, TaskError>,
    ) -> Result<T, TaskError> {
        match lock(&self.inner.containers).get_mut(id) {
            Some(container) => f(container),
            None => Err(TaskError::NotFound {
                id: id.to_string(),
                exec_id: exec_id.to_string(),
            }),
        }
    }

    /// Creates the container: boots its VM, or (a pod member) fills an
    /// empty drive of its sandbox's; nothing is left of it when it fails.
    fn create(&self, req: &api::CreateTaskRequest) -> Result<u32, TaskError> {
        let id = req.id.clone();
        let stdio = Stdio {
            stdin: req.stdin.clone(),
            stdout: req.stdout.clone(),
            stderr: req.stderr.clone(),
            terminal: req.terminal,
        }
        .checked(&id)?;
        if lock(&self.inner.containers).contains_key(&id) {
            return Err(TaskError::State {
                id,
                exec_id: String::new(),
                problem: "already exists in this shim",
            });
        }
        let spec = spec::load(Path::new(&req.bundle), spec::this_host()).map_err(|source| {
            TaskError::Spec {
                id: id.clone(),
                source,
            }
        })?;
        let mut request = spec.process.clone();
        let (vm, member) = match &spec.role {
            Role::Member { sandbox } => {
                let (vm, member) = self.join(req, &spec, sandbox)?;
                (vm, Some(member))
            }
            Role::Alone | Role::Sandbox => (Arc::new(self.boot(req, spec)?), None),
        };
        request.root = member.as_ref().map(|m| m.device.clone());
        let container = Container {
            id: id.clone(),
            bundle: req.bundle.clone(),
            vm,
            member,
            main: Process::new(request, stdio),
            execs: HashMap::new(),
        };
        let pid = container.pid();
        lock(&self.inner.containers).insert(id, container);
        Ok(pid)
    }

    /// Makes the root disk of the container `req` creates, defines and
    /// boots its VM (a sandbox's with [`pod::SLOTS`] empty drives), in
    /// the container's own directory, which goes if it fails.
    fn boot(&self, req: &api::CreateTaskRequest, spec: spec::Container) -> Result<Vm, TaskError> {
        let dir = container_dir(&self.inner.namespace, &req.id);
        let files = Files::new(dir.clone());
        let files_err = |source| TaskError::Files {
            id: req.id.clone(),
            path: dir.clone(),
            source,
        };
        fs::create_dir_all(&dir).map_err(files_err)?;
        match self.spawn(req, &spec, &files) {
            Ok((process, network)) => Ok(Vm {
                files,
                pid: process.pid(),
                spec,
                process: Mutex::new(process),
                slots: Mutex::default(),
                network: Mutex::new(network),
            }),
            Err(err) => {
                fs::remove_dir_all(&dir).map_err(files_err)?;
                Err(err)
            }
        }
    }

    /// Starts the VM of `spec`, with its NIC joined to the spec's network
    /// namespace if it names one (disconnected again if the VM does not
    /// start).
    fn spawn(
        &self,
        req: &api::CreateTaskRequest,
        spec: &spec::Container,
        files: &Files,
    ) -> Result<(VmProcess, Option<PodNetwork>), TaskError> {
        let vm_err = |source| TaskError::Vm {
            id: req.id.clone(),
            source,
        };
        let assets = &self.inner.assets;
        if !assets.kernel.is_file() {
            return Err(vm_err(VmError::NoKernel(assets.kernel.clone())));
        }
        let image = self.root_image(req, files.dir())?;
        let net_err = |source| TaskError::Network {
            id: req.id.clone(),
            source,
        };
        let resolv_conf = spec.resolv_conf.as_deref();
        let network = spec
            .netns
            .as_deref()
            .map(|netns| PodNetwork::connect(netns, resolv_conf));
        let (network, tap) = network.transpose().map_err(net_err)?.unzip();
        let vmm = vm::define(spec, &assets.kernel, &image, files).and_then(|mut config| {
            if spec.role == Role::Sandbox {
                config.disks.extend(pod::empty_drives());
            }
            if let Some(network) = &network {
                network.attach(&mut config);
            }
            VmProcess::spawn(files, config, tap)
        });
        match vmm {
            Ok(vmm) => Ok((vmm, network)),
            Err(err) => {
                if let Some(Err(left)) = network.map(PodNetwork::disconnect) {
                    log::error!("{}", one_line(&net_err(left)));
                }
                Err(vm_err(err))
            }
        }
    }

    /// The root disk image of the container `req` creates, made (when it
    /// is not cached) in `work`.
    fn root_image(&self, req: &api::CreateTaskRequest, work: &Path) -> Result<PathBuf, TaskError> {
        let mounts: Vec<MountSpec> = req
            .rootfs
            .iter()
            .map(|m| MountSpec {
                kind: m.type_.clone(),
                source: m.source.clone(),
                options: m.options.clone(),
            })
            .collect();
        let rootfs_err = |source| TaskError::Rootfs {
            id: req.id.clone(),
            source,
        };
        let rootfs = Rootfs::parse(&mounts).map_err(rootfs_err)?;
        let assets = &self.inner.assets;
        rootfs::image(&rootfs, &assets.guest_init, &assets.cache, work).map_err(rootfs_err)
    }

    /// Joins the member `req` creates to the VM of its pod's `sandbox`:
    /// its root disk fills the next empty drive. Its files, in the VM's
    /// directory, go if it fails.
    fn join(
        &self,
        req: &api::CreateTaskRequest,
        spec: &spec::Container,
        sandbox: &str,
    ) -> Result<(Arc<Vm>, Member), TaskError> {
        let pod_err = |source| TaskError::Pod {
            id: req.id.clone(),
            source,
        };
        let vm = match lock(&self.inner.containers).get(sandbox) {
            Some(owner) if owner.member.is_none() && owner.vm.spec.role == Role::Sandbox => {
                owner.vm.clone()
            }
            Some(_) => return Err(pod_err(PodError::NotASandbox(sandbox.to_string()))),
            None => return Err(pod_err(PodError::NoSandbox(sandbox.to_string()))),
        };
        pod::fits(spec, &vm.spec, vm.pid).map_err(pod_err)?;
        let index = lock(&vm.slots).take(sandbox).map_err(pod_err)?;
        let name = container_dir(&self.inner.namespace, &req.id);
        let dir = vm
            .files
            .member(&name.file_name().unwrap_or_default().to_string_lossy());
        if let Err(err) = self.fill(req, &vm, &dir, index) {
            let _ = fs::remove_dir_all(&dir);
            return Err(err);
        }
        let member = Member {
            dir,
            index,
            device: pod::device(index),
        };
        log::info!("{}: root disk {} in pod {sandbox}", req.id, member.device);
        Ok((vm, member))
    }

    /// Makes the root disk of the member `req` creates in `dir` and has
    /// the VM attach it as its disk `index`.
    fn fill(
        &self,
        req: &api::CreateTaskRequest,
        vm: &Vm,
        dir: &Path,
        index: usize,
    ) -> Result<(), TaskError> {
        let vm_err = |source| TaskError::Vm {
            id: req.id.clone(),
            source,
        };
        fs::create_dir_all(dir).map_err(|source| TaskError::Files {
            id: req.id.clone(),
            path: dir.to_path_buf(),
            source,
        })?;
        let image = self.root_image(req, dir)?;
        let mut process = lock(&vm.process);
        let disk = process.member_disk(&image, dir).map_err(vm_err)?;
        process.attach(index, disk).map_err(vm_err)
    }

    /// Connects the process to guest-init's exec port (waiting while the
    /// VM boots) and bridges its stdio; a thread collects its status.
    fn start(&self, id: &str, exec_id: &str) -> Result<u32, TaskError> {
        let (vsock, console, request, stdio, exit, pid) = self.with(id, exec_id, |c| {
            let pid = c.pid();
            let (vsock, console) = (c.vm.files.vsock(), c.vm.files.console());
            let process = c.process(exec_id)?;
            if process.status() != api::Status::CREATED {
                return Err(TaskError::State {
                    id: id.to_string(),
                    exec_id: exec_id.to_string(),
                    problem: "already started",
                });
            }
            let p = &*process;
            Ok((
                vsock,
                console,
                p.request.clone(),
                p.stdio.clone(),
                p.exit.clone(),
                pid,
            ))
        })?;
        let session = Session::connect(id.to_string(), &vsock, &request).map_err(|source| {
            TaskError::Exec {
                id: id.to_string(),
                exec_id: exec_id.to_string(),
                console,
                source: Box::new(source),
            }
        })?;
        let input = session.input();
        self.with(id, exec_id, |c| {
            c.process(exec_id)?.input = Some(input.clone());
            Ok(())
        })?;
        feed_stdin(&stdio.stdin, input);
        let tasks = self.clone();
        let (id, exec_id) = (id.to_string(), exec_id.to_string());
        thread::spawn(move || {
            let status = run_to_end(session, &stdio);
            tasks.ended(&id, &exec_id, pid, status, &exit);
        });
        Ok(pid)
    }

    /// A process's end: the VM's own container's ends the VM (a pod
    /// member's does not); the exit is published, then waiters are told.
    fn ended(&self, id: &str, exec_id: &str, pid: u32, status: u32, exit: &Exit) {
        if exec_id.is_empty() {
            let _ = self.with(id, exec_id, |c| {
                if c.member.is_none() {
                    c.stop_vm();
                }
                Ok(())
            });
        }
        exit.set(status);
        let exited_at = exit.get().map(|(_, at)| at);
        self.publish(TaskExit {
            container_id: id.to_string(),
            id: if exec_id.is_empty() { id } else { exec_id }.to_string(),
            pid,
            exit_status: status,
            exited_at: MessageField::from_option(exited_at),
            ..Default::default()
        });
    }

    fn kill(&self, req: &api::KillRequest) -> Result<(), TaskError> {
        let signal = req.signal as i32;
        let never_started = self.with(&req.id, &req.exec_id, |c| {
            let ids: Vec<String> = if req.all && req.exec_id.is_empty() {
                c.execs.keys().cloned().chain([String::new()]).collect()
            } else {
                vec![req.exec_id.clone()]
            };
            for exec_id in ids {
                let process = c.process(&exec_id)?;
                match (&process.input, process.exit.get()) {
                    (_, Some(_)) if !req.all => {
                        return Err(TaskError::NotFound {
                            id: req.id.clone(),
                            exec_id,
                        });
                    }
                    (Some(input), None) => {
                        // The stream may be ending with the process: its
                        // end comes through the session all the same.
                        let _ = input.signal(signal);
                    }
                    // Never started: it ends now (and with it the VM, if
                    // the VM is its own).
                    (None, None) if exec_id.is_empty() => {
                        return Ok(Some((c.pid(), c.main.exit.clone())));
                    }
                    _ => {}
                }
            }
            Ok(None)
        })?;
        if let Some((pid, exit)) = never_started {
            self.ended(&req.id, "", pid, 128 + req.signal, &exit);
        }
        Ok(())
    }

    /// Deletes a process that is not running; the container's own takes
    /// the container with it: a member's files, or the VM and all its
    /// files (a pod's members' too, whose processes end with it).
    fn delete(&self, req: &api::DeleteRequest) -> Result<api::DeleteResponse, TaskError> {
        let (id, exec_id) = (&req.id, &req.exec_id);
        let mut containers = lock(&self.inner.containers);
        let container = containers.get_mut(id).ok_or_else(|| TaskError::NotFound {
            id: id.clone(),
            exec_id: exec_id.clone(),
        })?;
        let pid = container.pid();
        if container.process(exec_id)?.status() == api::Status::RUNNING {
            return Err(TaskError::State {
                id: id.clone(),
                exec_id: exec_id.clone(),
                problem: "still running: kill it first",
            });
        }
        let (exit_status, exited_at) = container.process(exec_id)?.exit.get().unzip();
        if !exec_id.is_empty() {
            container.execs.remove(exec_id);
        } else {
            let dir = match &container.member {
                Some(member) => {
                    give_back(id, &container.vm, member)?;
                    member.dir.clone()
                }
                None => {
                    container.stop_vm();
                    let network = lock(&container.vm.network).take();
                    if let Some(network) = network {
                        network.disconnect().map_err(|source| TaskError::Network {
                            id: id.clone(),
                            source,
                        })?;
                    }
                    container.vm.files.dir().to_path_buf()
                }
            };
            match fs::remove_dir_all(&dir) {
                // A member's goes with its pod's VM, which may have gone first.
                Err(err) if err.kind() != io::ErrorKind::NotFound => {
                    return Err(TaskError::Files {
                        id: id.clone(),
                        path: dir,
                        source: err,
                    });
                }
                _ => {}
            }
            containers.remove(id);
            drop(containers);
            self.publish(TaskDelete {
                container_id: id.clone(),
                pid,
                exit_status: exit_status.unwrap_or(0),
                exited_at: MessageField::from_option(exited_at.clone()),
                ..Default::default()
            });
        }
        Ok(api::DeleteResponse {
            pid,
            exit_status: exit_status.unwrap_or(0),
            exited_at: MessageField::from_option(exited_at),
            ..Default::default()
        })
    }

    fn exec(&self, req: &api::ExecProcessRequest) -> Result<(), TaskError> {
        let stdio = Stdio {
            stdin: req.stdin.clone(),
            stdout: req.stdout.clone(),
            stderr: req.stderr.clone(),
            terminal: req.terminal,
        }
        .checked(&req.id)?;
        let json = req.spec.as_ref().map(|any| &any.value[..]).unwrap_or(b"");
        let mut request = spec::exec_request(json).map_err(|source| TaskError::Spec {
            id: req.id.clone(),
            source,
        })?;
        self.with(&req.id, &req.exec_id, |c| {
            request.root = c.member.as_ref().map(|m| m.device.clone());
            if c.execs.contains_key(&req.exec_id) || req.exec_id.is_empty() {
                return Err(TaskError::State {
                    id: req.id.clone(),
                    exec_id: req.exec_id.clone(),
                    problem: "an exec id must be new and not empty",
                });
            }
            c.execs
                .insert(req.exec_id.clone(), Process::new(request, stdio));
            Ok(())
        })
    }

    fn state(&self, req: &api::StateRequest) -> Result<api::StateResponse, TaskError> {
        self.with(&req.id, &req.exec_id, |c| {
            let (pid, bundle) = (c.pid(), c.bundle.clone());
            let process = c.process(&req.exec_id)?;
            let (exit_status, exited_at) = process.exit.get().unzip();
            Ok(api::StateResponse {
                id: req.id.clone(),
                bundle,
                pid,
                status: process.status().into(),
                stdin: process.stdio.stdin.clone(),
                stdout: process.stdio.stdout.clone(),
                stderr: process.stdio.stderr.clone(),
                terminal: process.stdio.terminal,
                exit_status: exit_status.unwrap_or(0),
                exited_at: MessageField::from_option(exited_at),
                exec_id: req.exec_id.clone(),
                ..Default::default()
            })
        })
    }

    fn input(&self, id: &str, exec_id: &str) -> Result<Input, TaskError> {
        self.with(id, exec_id, |c| {
            c.process(exec_id)?
                .input
                .clone()
                .ok_or_else(|| TaskError::State {
                    id: id.to_string(),
                    exec_id: exec_id.to_string(),
                    problem: "not started",
                })
        })
    }
}

/// Gives `member`'s drive back to its pod's VM, if that still runs: its
/// root released in the guest (its processes ended, its filesystem
/// unmounted), then the drive emptied, never the other way round (a
/// filesystem still mounted would write onto the next member's disk).
/// The drive is free for another member only once both are done.
fn give_back(id: &str, vm: &Vm, member: &Member) -> Result<(), TaskError> {
    let mut process = lock(&vm.process);
    if process.ended() {
        return Ok(());
    }
    release_root(id.to_string(), &vm.files.vsock(), &member.device).map_err(|source| {
        TaskError::Release {
            id: id.to_string(),
            device: member.device.clone(),
            source: Box::new(source),
        }
    })?;
    process
        .detach(member.index)
        .map_err(|source| TaskError::Vm {
            id: id.to_string(),
            source,
        })?;
    lock(&vm.slots).give_back(member.index);
    Ok(())
}

/// Copies the stdin FIFO (if any) to the process, then ends its stdin.
fn feed_stdin(path: &str, input: Input) {
    if path.is_empty() {
        let _ = input.stdin_end();
        return;
    }
    let path = path.to_string();
    thread::spawn(move || {
        // Blocks until containerd's side is open: it is, or comes.
        if let Ok(mut fifo) = File::open(&path) {
            let mut buf = vec![0u8; 32 * 1024];
            while let Ok(n @ 1..) = fifo.read(&mut buf) {
                if input.stdin(&buf[..n]).is_err() {
                    return;
                }
            }
        }
        let _ = input.stdin_end();
    });
}

/// The process's output to its FIFOs until it ends; its status. A
/// refusal (nothing started) is said on its stderr with the shell's
/// status, as a shell says it.
fn run_to_end(session: Session, stdio: &Stdio) -> u32 {
    let mut stdout = open_output(&stdio.stdout);
    let mut stderr = open_output(&stdio.stderr);
    match session.wait(&mut stdout, &mut stderr) {
        Ok(status) => u32::from(status),
        Err(ExecError::Refused { status, reason, .. }) => {
            let _ = writeln!(stderr, "containerd-shim-kiln-v2: {reason}");
            u32::from(status)
        }
        Err(err) => {
            log::error!("{}", one_line(&err));
            STATUS_LOST
        }
    }
}

/// containerd's FIFO for an output, or a sink when there is none or
/// nobody reads it (opening a FIFO without a reader would block for ever).
fn open_output(path: &str) -> Box<dyn Write + Send> {
    if path.is_empty() {
        return Box::new(io::sink());
    }
    let opened = OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .and_then(|fifo| {
            set_blocking(&fifo)?;
            Ok(fifo)
        });
    match opened {
        Ok(fifo) => Box::new(fifo),
        Err(err) => {
            log::warn!("output {path}: {err}; dropped");
            Box::new(io::sink())
        }
    }
}

fn set_blocking(file: &File) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let fd = file.as_raw_fd();
    // SAFETY: F_GETFL takes no argument and reads nothing of ours.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: F_SETFL takes the flags as an int argument.
    if unsafe { libc::fcntl(fd, libc::F_SETFL, flags & !libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

impl containerd_shim::Task for Tasks {
    fn create(
        &self,
        _ctx: &TtrpcContext,
        req: api::CreateTaskRequest,
    ) -> TtrpcResult<api::CreateTaskResponse> {
        let pid = Tasks::create(self, &req)?;
        self.publish(TaskCreate {
            container_id: req.id.clone(),
            bundle: req.bundle.clone(),
            rootfs: req.rootfs.clone(),
            io: MessageField::some(TaskIO {
                stdin: req.stdin.clone(),
                stdout: req.stdout.clone(),
                stderr: req.stderr.clone(),
                terminal: req.terminal,
                ..Default::default()
            }),
            pid,
            ..Default::default()
        });
        Ok(api::CreateTaskResponse {
            pid,
            ..Default::default()
        })
    }

    fn start(
        &self,
        _ctx: &TtrpcContext,
        req: api::StartRequest,
    ) -> TtrpcResult<api::StartResponse> {
        let pid = Tasks::start(self, &req.id, &req.exec_id)?;
        if req.exec_id.is_empty() {
            self.publish(TaskStart {
                container_id: req.id.clone(),
                pid,
                ..Default::default()
            });
        } else {
            self.publish(TaskExecStarted {
                container_id: req.id.clone(),
                exec_id: req.exec_id.clone(),
                pid,
                ..Default::default()
            });
        }
        Ok(api::StartResponse {
            pid,
            ..Default::default()
        })
    }

    fn wait(&self, _ctx: &TtrpcContext, req: api::WaitRequest) -> TtrpcResult<api::WaitResponse> {
        let exit = self.with(&req.id, &req.exec_id, |c| {
            Ok(c.process(&req.exec_id)?.exit.clone())
        })?;
        let (exit_status, exited_at) = exit.wait();
        Ok(api::WaitResponse {
            exit_status,
            exited_at: MessageField::some(exited_at),
            ..Default::default()
        })
    }

    fn kill(&self, _ctx: &TtrpcContext, req: api::KillRequest) -> TtrpcResult<api::Empty> {
        Tasks::kill(self, &req)?;
        Ok(api::Empty::default())
    }

    fn delete(
        &self,
        _ctx: &TtrpcContext,
        req: api::DeleteRequest,
    ) -> TtrpcResult<api::DeleteResponse> {
        Ok(Tasks::delete(self, &req)?)
    }

    fn exec(&self, _ctx: &TtrpcContext, req: api::ExecProcessRequest) -> TtrpcResult<api::Empty> {
        Tasks::exec(self, &req)?;
        self.publish(TaskExecAdded {
            container_id: req.id.clone(),
            exec_id: req.exec_id.clone(),
            ..Default::default()
        });
        Ok(api::Empty::default())
    }

    fn resize_pty(
        &self,
        _ctx: &TtrpcContext,
        req: api::ResizePtyRequest,
    ) -> TtrpcResult<api::Empty> {
        let size = WindowSize {
            rows: u16::try_from(req.height).unwrap_or(u16::MAX),
            cols: u16::try_from(req.width).unwrap_or(u16::MAX),
        };
        // A process that ended meanwhile has no terminal to size.
        let _ = self.input(&req.id, &req.exec_id)?.resize(size);
        Ok(api::Empty::default())
    }

    fn close_io(&self, _ctx: &TtrpcContext, req: api::CloseIORequest) -> TtrpcResult<api::Empty> {
        if req.stdin {
            let _ = self.input(&req.id, &req.exec_id)?.stdin_end();
        }
        Ok(api::Empty::default())
    }

    fn state(
        &self,
        _ctx: &TtrpcContext,
        req: api::StateRequest,
    ) -> TtrpcResult<api::StateResponse> {
        Ok(Tasks::state(self, &req)?)
    }

    fn pids(&self, _ctx: &TtrpcContext, req: api::PidsRequest) -> TtrpcResult<api::PidsResponse> {
        let pid = self.with(&req.id, "", |c| Ok(c.pid()))?;
        Ok(api::PidsResponse {
            processes: vec![containerd_shim::protos::types::task::ProcessInfo {
                pid,
                ..Default::default()
            }],
            ..Default::default()
        })
    }

    fn connect(
        &self,
        _ctx: &TtrpcContext,
        req: api::ConnectRequest,
    ) -> TtrpcResult<api::ConnectResponse> {
        let task_pid = self.with(&req.id, "", |c| Ok(c.pid())).unwrap_or(0);
        Ok(api::ConnectResponse {
            shim_pid: std::process::id(),
            task_pid,
            version: env!("CARGO_PKG_VERSION").to_string(),
            ..Default::default()
        })
    }

    fn shutdown(&self, _ctx: &TtrpcContext, _req: api::ShutdownRequest) -> TtrpcResult<api::Empty> {
        // containerd asks after every Delete; a shim with a container
        // still to delete stays.
        if lock(&self.inner.containers).is_empty() {
            self.inner.exit.signal();
        }
        Ok(api::Empty::default())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request() -> ExecRequest {
        spec::exec_request(br#"{"args": ["/bin/true"], "cwd": "/", "user": {"uid": 0, "gid": 0}}"#)
            .unwrap()
    }

    #[test]
    fn a_log_uri_for_stdio_is_refused_by_value() {
        let stdio = Stdio {
            stdout: "binary:///usr/bin/logger?a=b".into(),
            ..Stdio::default()
        };
        let err = stdio.checked("web").unwrap_err();
        assert_eq!(err.code(), Code::INVALID_ARGUMENT);
        assert_eq!(
            one_line(&err),
            "container web: stdio \"binary:///usr/bin/logger?a=b\": expected a FIFO path (log URIs are not supported)"
        );
        let fifos = Stdio {
            stdin: "/run/fifo/in".into(),
            ..Stdio::default()
        };
        assert!(fifos.checked("web").is_ok());
    }

    #[test]
    fn a_process_is_created_until_its_exit_and_stdin_follows_its_fifo() {
        let with_stdin = Stdio {
            stdin: "/run/fifo/in".into(),
            ..Stdio::default()
        };
        let process = Process::new(request(), with_stdin);
        assert!(process.request.stdin);
        assert_eq!(process.status(), api::Status::CREATED);
        let exit = process.exit.clone();
        let waiter = thread::spawn(move || exit.wait().0);
        process.exit.set(137);
        assert_eq!(waiter.join().unwrap(), 137);
        assert_eq!(process.status(), api::Status::STOPPED);
        assert!(!Process::new(request(), Stdio::default()).request.stdin);
    }
}
