//! The verbs of the instance lifecycle, as the CLI runs them: each checks
//! the state table first, holds the instance's verb lock while it works,
//! and waits until the instance has reached the state it asked for.
use std::fs::OpenOptions;
use std::os::fd::AsFd;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::state::transition;
use super::{
    FileLock, Instance, InstanceError, Network, Registry, Spec, State, Verb, now_ms, snapshots,
    supervisor,
};
use crate::api;
use crate::network::proxy::{Proxy, ProxyError};
use crate::network::{self, NetworkError};
use kiln_builder::store::{Store, StoreError};
use kiln_vmm::rpc::SnapshotStats;

/// How often a waiting verb looks at the record again.
const POLL: Duration = Duration::from_millis(50);
/// The hidden `kiln` subcommand that runs an instance's VMM.
pub const VMM_SUBCOMMAND: &str = "__vmm";

/// What can go wrong with a verb.
#[derive(Debug, thiserror::Error)]
pub enum LifecycleError {
    /// The record cannot be read or written, or the state table refuses.
    #[error(transparent)]
    Instance(#[from] InstanceError),
    /// The instance's API did not answer.
    #[error(transparent)]
    Api(#[from] api::ClientError),
    /// The instance's VMM answered with a refusal.
    #[error("instance {id}: the VMM refused: {message}")]
    Refused {
        /// The instance.
        id: String,
        /// The VMM's words.
        message: String,
    },
    /// The instance's VMM process cannot be started.
    #[error("instance {id}: cannot start its VMM")]
    Spawn {
        /// The instance.
        id: String,
        /// What the system said.
        #[source]
        source: std::io::Error,
    },
    /// A snapshot cannot be staged, read or kept.
    #[error(transparent)]
    Snapshot(#[from] snapshots::SnapshotsError),
    /// A new instance's image is not in the store.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A new instance's bridge cannot be set up.
    #[error(transparent)]
    Network(#[from] NetworkError),
    /// A new instance's published port cannot be bound.
    #[error(transparent)]
    Proxy(#[from] ProxyError),
    /// Ports published by an instance with no address to publish.
    #[error("-p publishes a port of the guest's address: it needs --network bridge")]
    PortsNeedBridge,
    /// A foreground run of an instance that does not exist, with no image.
    #[error("no instance named {0:?}: give an IMAGE to launch it")]
    NoImage(String),
    /// A foreground run of an instance with another image than its own.
    #[error("instance {name:?} runs {runs}, not {asked}: its root volume belongs to that image")]
    OtherImage {
        /// The instance.
        name: String,
        /// Its image.
        runs: String,
        /// The image the run asked for.
        asked: String,
    },
    /// A foreground run of an instance another VMM process runs.
    #[error("instance {0:?} is running in another VMM process")]
    Busy(String),
    /// The instance did not reach the state the verb waits for.
    #[error("instance {id}: still {state} after {waited:?}: {expected}")]
    Timeout {
        /// The instance.
        id: String,
        /// The state it is still in.
        state: State,
        /// How long the verb waited.
        waited: Duration,
        /// What did not happen.
        expected: &'static str,
    },
}

/// What a new instance's VMM would fail on, checked before the instance
/// exists: its image is in the store, its bridge can be set up
/// (permission, the bridge module), and its published ports can be bound.
pub fn preflight(store: &Store, spec: &Spec) -> Result<(), LifecycleError> {
    store.find(&spec.image)?;
    if spec.network == Network::Bridge {
        network::prepare_bridge()?;
    } else if !spec.ports.is_empty() {
        return Err(LifecycleError::PortsNeedBridge);
    }
    // Bound and let go: the instance's VMM binds them for good.
    drop(Proxy::bind(&spec.ports)?);
    Ok(())
}

/// A new instance for this process to supervise in the foreground
/// (`kiln run --name`), checked by [`preflight`] first.
pub fn create(
    registry: &Registry,
    store: &Store,
    spec: Spec,
    user_data: Option<&[u8]>,
) -> Result<(Instance, FileLock), LifecycleError> {
    preflight(store, &spec)?;
    Ok(registry.create(spec, user_data, None)?)
}

/// The existing instance `name` (of `image`, when given), claimed with
/// its VMM lock for this process to supervise in the foreground, and
/// moved on as `kiln start` would; `None` when there is no such instance.
pub fn claim(
    registry: &Registry,
    name: &str,
    image: Option<&str>,
) -> Result<Option<(Instance, FileLock)>, LifecycleError> {
    let mut instance = match registry.find(name) {
        Ok(instance) => instance,
        Err(InstanceError::NotFound(_)) => return Ok(None),
        Err(err) => return Err(err.into()),
    };
    if let Some(image) = image
        && image != instance.record.spec.image
    {
        return Err(LifecycleError::OtherImage {
            name: name.to_string(),
            runs: instance.record.spec.image.clone(),
            asked: image.to_string(),
        });
    }
    let vmm = instance
        .claim_vmm()?
        .ok_or_else(|| LifecycleError::Busy(name.to_string()))?;
    instance.update(|r| {
        r.state = transition(r.state, Verb::Start)?;
        Ok(())
    })?;
    Ok(Some((instance, vmm)))
}

/// Launches a new instance in its own VMM process; returns once it runs
/// (or has already stopped, which its record then explains).
pub fn launch(
    registry: &Registry,
    spec: Spec,
    user_data: Option<&[u8]>,
    kiln: &Path,
    timeout: Duration,
) -> Result<Instance, LifecycleError> {
    let (instance, vmm) = registry.create(spec, user_data, None)?;
    let started = spawn_vmm(&instance, &vmm, kiln, None)?;
    drop(vmm);
    started.wait(timeout);
    wait(&instance, timeout, "running", |r| r.state != State::Pending)
}

/// `kiln snapshot create`: the running instance writes a snapshot of
/// itself, with its root volume's writes, its launch spec and user-data,
/// into the new directory `dir` (staged beside it and renamed whole), and
/// goes on running.
pub fn snapshot(instance: &Instance, dir: &Path) -> Result<SnapshotStats, LifecycleError> {
    let _verb = instance.lock_for_verb()?;
    transition(instance.record.state, Verb::Snapshot).map_err(InstanceError::from)?;
    let staging = snapshots::stage(dir)?;
    let body = serde_json::json!({ "dir": staging.path() });
    let answer = api::call_waiting(
        &instance.api_socket(),
        "PUT",
        "/snapshot",
        Some(&body),
        supervisor::SNAPSHOT_TIMEOUT,
    )?;
    let stats = refused_unless_ok(instance, &answer)?;
    snapshots::finish(instance, staging, dir)?;
    Ok(serde_json::from_value(stats.unwrap_or_default()).unwrap_or_default())
}

/// `kiln snapshot restore`: a new instance that goes on from the snapshot
/// in `dir`, with a copy of its root volume, in its own VMM process.
/// The snapshot is checked whole first: a damaged one starts nothing.
/// A guest on the bridge keeps its address, which must be free, unless
/// `isolate`d: then its NIC is on no bridge and it has no address.
pub fn restore(
    registry: &Registry,
    dir: &Path,
    name: Option<String>,
    isolate: bool,
    kiln: &Path,
    timeout: Duration,
) -> Result<Instance, LifecycleError> {
    let (mut spec, user_data) = snapshots::read(dir, name)?;
    // The VMM process and the VM process (a jailed one in a root of its
    // own) are given the snapshot's path, which must not depend on this
    // process's working directory.
    let dir = &snapshots::absolute(dir)?;
    if isolate && spec.network != Network::None {
        spec.network = Network::Isolated;
        spec.private_ip = None;
    }
    let root = snapshots::root_overlay(dir);
    let (instance, vmm) = registry.create(spec, user_data.as_deref(), Some(&root))?;
    let started = spawn_vmm(&instance, &vmm, kiln, Some(dir))?;
    drop(vmm);
    started.wait(timeout);
    wait(&instance, timeout, "running", |r| r.state != State::Pending)
}

/// `kiln start`: a stopped instance gets a new VMM process.
pub fn start(
    mut instance: Instance,
    kiln: &Path,
    timeout: Duration,
) -> Result<Instance, LifecycleError> {
    let _verb = instance.lock_for_verb()?;
    transition(instance.record.state, Verb::Start).map_err(InstanceError::from)?;
    let vmm = instance
        .claim_vmm()?
        .ok_or_else(|| LifecycleError::Refused {
            id: instance.record.id.clone(),
            message: "its VMM process is still alive".into(),
        })?;
    instance.update(|r| {
        transition(r.state, Verb::Start)?;
        r.state = State::Pending;
        r.reason = None;
        Ok(())
    })?;
    let started = spawn_vmm(&instance, &vmm, kiln, None)?;
    drop(vmm);
    started.wait(timeout);
    wait(&instance, timeout, "running", |r| r.state != State::Pending)
}

/// Starts `kiln __vmm ID`, handing it the VMM lock and the write end of a
/// pipe it closes once the instance has left `pending` (so the caller
/// waits for that, not for a poll interval), in a process group of its
/// own so that the terminal's signals do not reach it. With `restore`,
/// its first VM goes on from that snapshot.
fn spawn_vmm(
    instance: &Instance,
    vmm: &FileLock,
    kiln: &Path,
    restore: Option<&Path>,
) -> Result<Started, LifecycleError> {
    let spawn_err = |source| LifecycleError::Spawn {
        id: instance.record.id.clone(),
        source,
    };
    let fd = vmm.inheritable_fd().map_err(spawn_err)?;
    let (started, notice) = std::io::pipe().map_err(spawn_err)?;
    let notice_fd = super::inheritable(notice.as_fd()).map_err(spawn_err)?;
    // The VMM's own complaints go to the console log, where `kiln logs`
    // shows them next to the guest's.
    let log = OpenOptions::new()
        .create(true)
        .append(true)
        .open(instance.console_log())
        .map_err(spawn_err)?;
    kiln_vmm::trace::mark("vmm-spawn");
    let mut command = Command::new(kiln);
    command.args([
        VMM_SUBCOMMAND,
        &instance.record.id,
        "--lock-fd",
        &fd.to_string(),
        "--started-fd",
        &notice_fd.to_string(),
    ]);
    if let Some(dir) = restore {
        command.arg("--restore").arg(dir);
    }
    command
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .process_group(0)
        .spawn()
        .map_err(spawn_err)?;
    // Only the VMM process holds the write end now: its close is the word.
    drop(notice);
    Ok(Started(started))
}

/// The read end of the pipe a new VMM process closes once its instance
/// has left `pending` (or it has ended).
struct Started(std::io::PipeReader);

impl Started {
    /// Waits for the word, at most `timeout`; the record says the rest.
    fn wait(self, timeout: Duration) {
        let Started(mut pipe) = self;
        // End of file (or an error) is the word: nothing is ever written.
        crate::deadline::within(timeout, move || {
            let _ = std::io::Read::read(&mut pipe, &mut [0u8; 1]);
        });
    }
}

/// `kiln stop [--hibernate]`: the VM ends (its disks flushed; with
/// `hibernate` its RAM and state saved first) and the VMM exits.
pub fn stop(
    instance: &Instance,
    hibernate: bool,
    timeout: Duration,
) -> Result<Instance, LifecycleError> {
    let _verb = instance.lock_for_verb()?;
    let (verb, name) = if hibernate {
        (Verb::Hibernate, "hibernate")
    } else {
        (Verb::Stop, "stop")
    };
    transition(instance.record.state, verb).map_err(InstanceError::from)?;
    action(instance, name)?;
    wait_for_vmm_exit(instance, timeout)
}

/// `kiln reboot`: a new VM in the same VMM, with the same root volume.
pub fn reboot(instance: &Instance, timeout: Duration) -> Result<Instance, LifecycleError> {
    let _verb = instance.lock_for_verb()?;
    transition(instance.record.state, Verb::Reboot).map_err(InstanceError::from)?;
    let boots = instance.record.boots;
    action(instance, "reboot")?;
    wait(instance, timeout, "rebooted", |r| {
        r.boots > boots || r.state != State::Running
    })
}

/// `kiln pause` / `kiln resume`.
pub fn pause(instance: &Instance, paused: bool) -> Result<(), LifecycleError> {
    let _verb = instance.lock_for_verb()?;
    let verb = if paused { Verb::Pause } else { Verb::Resume };
    transition(instance.record.state, verb).map_err(InstanceError::from)?;
    action(instance, if paused { "pause" } else { "resume" })
}

/// `kiln terminate`: stops the instance if it runs, then deletes its
/// volumes; the record stays, `terminated`.
pub fn terminate(mut instance: Instance, timeout: Duration) -> Result<Instance, LifecycleError> {
    let _verb = instance.lock_for_verb()?;
    transition(instance.record.state, Verb::Terminate).map_err(InstanceError::from)?;
    if instance.record.state.has_vmm() {
        action(&instance, "stop")?;
        instance = wait_for_vmm_exit(&instance, timeout)?;
    }
    // A supervisor killed with -9 left its tap's filter: removed here, as
    // its address goes (one already gone is no error).
    crate::network::close_tap(&instance.record.id, instance.record.address);
    instance.update(|r| {
        transition(r.state, Verb::Terminate)?;
        r.state = State::Terminated;
        r.reason = Some("terminated on request".into());
        r.terminated_at = Some(now_ms() / 1000);
        // Its address is free for the next launch.
        r.address = None;
        Ok(())
    })?;
    instance.delete_volumes()?;
    Ok(instance)
}

/// `PUT /actions` on the instance's VMM. A hibernation's answer waits
/// for the VM's RAM to be written.
fn action(instance: &Instance, name: &str) -> Result<(), LifecycleError> {
    let body = serde_json::json!({ "action": name });
    let answer = api::call_waiting(
        &instance.api_socket(),
        "PUT",
        "/actions",
        Some(&body),
        supervisor::SNAPSHOT_TIMEOUT,
    )?;
    refused_unless_ok(instance, &answer).map(|_| ())
}

/// The body of a 2xx answer; any other is the VMM's refusal.
fn refused_unless_ok(
    instance: &Instance,
    answer: &api::Response,
) -> Result<Option<serde_json::Value>, LifecycleError> {
    if answer.status / 100 == 2 {
        return Ok(answer.body.clone());
    }
    let message = answer
        .body
        .as_ref()
        .and_then(|b| b["error"].as_str().map(String::from))
        .unwrap_or_else(|| format!("HTTP status {}", answer.status));
    Err(LifecycleError::Refused {
        id: instance.record.id.clone(),
        message,
    })
}

/// Waits until the instance's VMM process has exited.
fn wait_for_vmm_exit(instance: &Instance, timeout: Duration) -> Result<Instance, LifecycleError> {
    if !instance.wait_vmm_gone(timeout) {
        return Err(LifecycleError::Timeout {
            id: instance.record.id.clone(),
            state: State::Stopping,
            waited: timeout,
            expected: "its VMM has not exited",
        });
    }
    Ok(Registry::reread(instance)?)
}

/// Reads the record until `done` holds, for at most `timeout`.
fn wait(
    instance: &Instance,
    timeout: Duration,
    expected: &'static str,
    done: impl Fn(&super::Record) -> bool,
) -> Result<Instance, LifecycleError> {
    let started = Instant::now();
    loop {
        let now = Registry::reread(instance)?;
        if done(&now.record) {
            return Ok(now);
        }
        if started.elapsed() > timeout {
            return Err(LifecycleError::Timeout {
                id: now.record.id.clone(),
                state: now.record.state,
                waited: timeout,
                expected,
            });
        }
        std::thread::sleep(POLL);
    }
}
