//! The VMM process of a detached instance. It lives as long as the
//! instance runs: it owns the instance's VMM lock and its API socket, runs
//! the VM itself as a child process (`kiln run --instance ID`, which has
//! KVM and the seccomp filters), copies the child's console from a pipe
//! into `console.log` (rotated at a size, [`super::console`]) and feeds it
//! `console.in`, and keeps the record's state true.
//!
//! Running the VM in a child is what makes reboot possible: a VM process
//! cannot build a fresh VM once its seccomp filter is in place, so a reboot
//! ends the child (its disks flush as it stops) and starts another, in the
//! same VMM process, with the same ids and the same root volume.
use std::fs;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use std::{io, thread};

use serde::Deserialize;

use super::console::{CONSOLE_LOG_LIMIT, ConsoleLogError, RotatingLog, copy_into};
use super::{FileLock, Instance, InstanceError, State, Verb, state::transition};
use crate::api::{self, ActionBody, Request, Response};
use crate::network::proxy::{Proxy, ProxyError, ProxyHandle};
use kiln_vmm::devices::lock;
use kiln_vmm::rpc::{self, AfterSnapshot, ControlClient, ControlReply, ControlRequest};
use kiln_vmm::seccomp::{self, ThreadKind};

/// How long the API waits for the VM process to pause or resume.
const CONTROL_TIMEOUT: Duration = Duration::from_secs(30);
/// How long it waits for a snapshot: RAM is written whole (less its zero
/// pages), which takes a while for a large guest on a slow disk.
pub const SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(600);

/// What the supervisor should do when the VM process ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Wanted {
    /// Nothing was asked: the guest ended by itself, so the instance stops.
    Nothing,
    Stop,
    Reboot,
    /// The VM has written its hibernation snapshot and is ending.
    Hibernate,
}

/// The VM process and what is wanted of it, under one lock so a request
/// never misses a process that is just starting.
struct Control {
    child: Option<u32>,
    /// The VM process's control channel.
    channel: Option<ControlClient>,
    wanted: Wanted,
}

/// How the VMM starts one VM process.
pub struct VmStart<'a> {
    /// The VM process's end of the control channel (to be inherited).
    pub control_fd: i32,
    /// A snapshot to restore instead of booting, and whether the restore
    /// consumes it (a hibernation).
    pub restore: Option<(&'a Path, bool)>,
}

struct Shared {
    instance: Mutex<Instance>,
    control: Mutex<Control>,
}

/// What can go wrong running an instance.
#[derive(Debug, thiserror::Error)]
pub enum SupervisorError {
    #[error(transparent)]
    Instance(#[from] InstanceError),
    #[error("{what}: {source}")]
    Io { what: String, source: io::Error },
    #[error(transparent)]
    Control(#[from] rpc::ControlError),
    #[error(transparent)]
    Proxy(#[from] ProxyError),
    #[error(transparent)]
    Console(#[from] ConsoleLogError),
}

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> SupervisorError {
    let what = what.into();
    move |source| SupervisorError::Io { what, source }
}

/// Runs `instance` until it stops, holding its VMM lock `_vmm`;
/// `vm_command` makes the command of one VM process. The first VM goes on
/// from the instance's hibernation if it has one, else from `restore` (a
/// snapshot it was launched from) if given, else it boots.
pub fn run(
    instance: Instance,
    _vmm: FileLock,
    restore: Option<PathBuf>,
    vm_command: impl Fn(VmStart<'_>) -> Command,
) -> Result<(), SupervisorError> {
    let socket = instance.api_socket();
    let mut console = RotatingLog::open(
        &instance.console_log(),
        &instance.console_log_rotated(),
        CONSOLE_LOG_LIMIT,
    )?;
    // SAFETY: descriptor 2 is open for the whole life of the process:
    // std opens /dev/null on it at startup if it came closed, and nothing
    // here closes it.
    let stderr = unsafe { BorrowedFd::borrow_raw(libc::STDERR_FILENO) };
    // This process's own messages go to the live log too, after rotations.
    console
        .carry(stderr)
        .map_err(io_err("cannot check where stderr goes"))?;
    let _ = fs::remove_file(&socket);
    let listener = UnixListener::bind(&socket)
        .map_err(io_err(format!("cannot listen on {}", socket.display())))?;
    let shared = Arc::new(Shared {
        instance: Mutex::new(instance),
        control: Mutex::new(Control {
            child: None,
            channel: None,
            wanted: Wanted::Nothing,
        }),
    });
    // Published ports serve for the whole life of this VMM process,
    // across reboots; a port that cannot be bound stops the instance.
    // (The record's lock is let go before the match: its error arm takes it.)
    let published = publish_ports(&lock(&shared.instance));
    let _proxy = match published {
        Ok(proxy) => proxy,
        Err(err) => {
            lock(&shared.instance).mark_stopped(err.to_string())?;
            return Err(err);
        }
    };
    let hibernation = lock(&shared.instance).hibernation();
    let mut first = hibernation
        .map(|dir| (dir, true))
        .or(restore.map(|dir| (dir, false)));
    let api_shared = shared.clone();
    thread::spawn(move || serve(&listener, &api_shared));
    let reason = loop {
        let restore = first.take();
        lock(&shared.instance).mark_running(restore.is_some())?;
        // The VM process writes its console (and its own messages) into a
        // pipe, which this thread copies into the log, rotating it.
        let (console_out, vm_console) = io::pipe().map_err(io_err("console pipe"))?;
        let vm_messages = vm_console.try_clone().map_err(io_err("console pipe"))?;
        let input = lock(&shared.instance)
            .console_input_reader()
            .map_err(io_err("cannot open the console input"))?;
        let (client, vm_end) = rpc::channel()?;
        let control_fd = inheritable(&vm_end).map_err(io_err("control channel"))?;
        let start = VmStart {
            control_fd,
            restore: restore
                .as_ref()
                .map(|(dir, consume)| (dir.as_path(), *consume)),
        };
        // The command, and with it our copies of the pipe's write end, is
        // dropped once the child is spawned: the copy below ends when the
        // VM process does.
        let mut child = vm_command(start)
            .stdin(input)
            .stdout(vm_console)
            .stderr(vm_messages)
            .spawn()
            .map_err(io_err("cannot start the VM process"))?;
        // Only the VM process keeps its end open.
        drop(vm_end);
        {
            let mut control = lock(&shared.control);
            control.child = Some(child.id());
            control.channel = Some(client);
            if control.wanted != Wanted::Nothing {
                end_vm(child.id());
            }
        }
        copy_into(console_out, &mut console);
        let status = child
            .wait()
            .map_err(io_err("cannot wait for the VM process"))?;
        let wanted = {
            let mut control = lock(&shared.control);
            control.child = None;
            control.channel = None;
            std::mem::replace(&mut control.wanted, Wanted::Nothing)
        };
        match wanted {
            Wanted::Reboot => continue,
            Wanted::Stop => break "stopped on request".to_string(),
            Wanted::Hibernate => {
                break "hibernated on request: RAM saved, `kiln start` resumes it".to_string();
            }
            Wanted::Nothing => break describe(status),
        }
    };
    lock(&shared.instance).mark_stopped(reason)?;
    let _ = fs::remove_file(&socket);
    Ok(())
}

/// Starts the proxy of the instance's published ports, to its address
/// on the bridge, under the proxy thread's seccomp filter; `None` when it
/// publishes none. The VMM process may then hold two descriptors per
/// proxied connection: its soft descriptor limit goes up to the hard one.
pub fn publish_ports(instance: &Instance) -> Result<Option<ProxyHandle>, SupervisorError> {
    let record = &instance.record;
    let (Some(address), false) = (record.address, record.spec.ports.is_empty()) else {
        return Ok(None);
    };
    raise_descriptor_limit().map_err(io_err("cannot raise the descriptor limit"))?;
    let proxy = Proxy::bind(&record.spec.ports)?;
    Ok(Some(proxy.spawn(address, true)?))
}

fn raise_descriptor_limit() -> io::Result<()> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes the struct passed by reference.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(io::Error::last_os_error());
    }
    limit.rlim_cur = limit.rlim_max;
    // SAFETY: setrlimit only reads the struct passed by reference.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Lets a child inherit `fd` (clears close-on-exec); returns its number.
fn inheritable(fd: &OwnedFd) -> io::Result<i32> {
    let raw = fd.as_raw_fd();
    // SAFETY: F_SETFD only changes the descriptor's flags; `fd` is open.
    if unsafe { libc::fcntl(raw, libc::F_SETFD, 0) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(raw)
}

/// Why the VM process ended, for the record.
pub fn describe(status: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    let vmm_error = i32::from(kiln_vmm::builder::VMM_ERROR_STATUS);
    match (status.code(), status.signal()) {
        (Some(code), _) if code == vmm_error => {
            "the VMM failed (exit status 125; see the console log)".into()
        }
        (Some(code), _) => guest_exit_reason(code),
        (None, Some(signal)) => format!("the VM process was killed by signal {signal}"),
        (None, None) => format!("the VM process ended ({status})"),
    }
}

/// For the VM process: dies (SIGTERM, so its disks flush) when the VMM
/// process that started it does, instead of running on unsupervised.
/// Fails when that VMM, `vmm_pid`, is already gone.
pub fn end_with_vmm(vmm_pid: u32) -> io::Result<()> {
    // SAFETY: PR_SET_PDEATHSIG takes a signal number and no pointers.
    if unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // Checked after the prctl: a parent that died before it would not
    // have sent the signal.
    // SAFETY: getppid has no arguments and cannot fail.
    if unsafe { libc::getppid() } as u32 != vmm_pid {
        return Err(io::Error::other("the instance's VMM process is gone"));
    }
    Ok(())
}

/// The record's reason for a VM whose guest ended with `status`.
fn guest_exit_reason(status: i32) -> String {
    format!("the guest shut down (entrypoint exit status {status})")
}

/// Asks the VM process to end: SIGTERM (it stops the VM and flushes its
/// disks), then SIGCONT in case it was paused, so it can act on it.
fn end_vm(pid: u32) {
    signal(pid, libc::SIGTERM);
    signal(pid, libc::SIGCONT);
}

fn signal(pid: u32, signal: libc::c_int) {
    // SAFETY: kill only reads its integer arguments. The pid is our own
    // child's and is not reaped while the control lock names it.
    unsafe { libc::kill(pid as libc::pid_t, signal) };
}

/// Answers API requests, one connection at a time, until the process
/// ends; under the API thread's seccomp filter, since requests come from
/// outside. (The supervisor's main thread stays unfiltered: it starts VM
/// processes, which must not inherit a filter.)
fn serve(listener: &UnixListener, shared: &Shared) {
    if let Err(err) = seccomp::install(ThreadKind::Api) {
        eprintln!("kiln: api: not serving: {err}");
        return;
    }
    for stream in listener.incoming().flatten() {
        if let Err(err) = api::serve_one(stream, |request| route(shared, request)) {
            eprintln!("kiln: api: {err}");
        }
    }
}

fn route(shared: &Shared, request: Request) -> Response {
    match (request.method.as_str(), request.path.as_str()) {
        ("GET", "/instance") => Response::json(200, &lock(&shared.instance).record),
        ("PUT", "/actions") => match serde_json::from_slice::<ActionBody>(&request.body) {
            Ok(body) => act(shared, &body.action),
            Err(err) => Response::error(400, format!("expected {{\"action\": NAME}}: {err}")),
        },
        ("PUT", "/snapshot") => match serde_json::from_slice::<SnapshotBody>(&request.body) {
            Ok(body) => snapshot(shared, &body.dir),
            Err(err) => Response::error(400, format!("expected {{\"dir\": PATH}}: {err}")),
        },
        (_, "/instance" | "/actions" | "/snapshot") => {
            Response::error(405, "method not allowed here")
        }
        (_, path) => Response::error(404, format!("no route {path}")),
    }
}

/// The body of `PUT /snapshot`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SnapshotBody {
    /// An existing, empty directory, as an absolute path.
    dir: PathBuf,
}

/// What the API can ask of a running instance.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Action {
    Stop,
    Reboot,
    Pause,
    Resume,
    Hibernate,
}

impl Action {
    fn parse(name: &str) -> Option<Action> {
        Some(match name {
            "stop" => Action::Stop,
            "reboot" => Action::Reboot,
            "pause" => Action::Pause,
            "resume" => Action::Resume,
            "hibernate" => Action::Hibernate,
            _ => return None,
        })
    }

    fn verb(self) -> Verb {
        match self {
            Action::Stop => Verb::Stop,
            Action::Reboot => Verb::Reboot,
            Action::Pause => Verb::Pause,
            Action::Resume => Verb::Resume,
            Action::Hibernate => Verb::Hibernate,
        }
    }
}

/// Carries out one action, if the instance's state allows it.
fn act(shared: &Shared, name: &str) -> Response {
    let Some(action) = Action::parse(name) else {
        return Response::error(
            400,
            format!("unknown action {name:?}: expected stop, reboot, pause, resume or hibernate"),
        );
    };
    let mut instance = lock(&shared.instance);
    let record = &instance.record;
    if let Err(refused) = transition(record.state, action.verb()) {
        return Response::error(409, refused.to_string());
    }
    match (action, record.paused) {
        (Action::Pause, true) => return Response::error(409, "the instance is already paused"),
        (Action::Resume, false) => return Response::error(409, "the instance is not paused"),
        _ => {}
    }
    let mut control = lock(&shared.control);
    let changed = match action {
        Action::Stop | Action::Reboot => {
            let stop = action == Action::Stop;
            control.wanted = if stop { Wanted::Stop } else { Wanted::Reboot };
            if let Some(pid) = control.child {
                end_vm(pid);
            }
            instance
                .update(|r| {
                    if stop {
                        r.state = State::Stopping;
                    }
                    Ok(())
                })
                .map_err(|err| err.to_string())
        }
        Action::Pause | Action::Resume => {
            let paused = action == Action::Pause;
            let request = if paused {
                ControlRequest::Pause
            } else {
                ControlRequest::Resume
            };
            ask(&mut control, &request, CONTROL_TIMEOUT).and_then(|_| {
                instance
                    .update(|r| {
                        r.paused = paused;
                        Ok(())
                    })
                    .map_err(|err| err.to_string())
            })
        }
        Action::Hibernate => hibernate(&mut instance, &mut control),
    };
    match changed {
        Ok(()) => Response::no_content(),
        Err(err) => Response::error(500, err),
    }
}

/// Sends `request` to the VM process; its refusal or silence is the error.
fn ask(
    control: &mut Control,
    request: &ControlRequest,
    timeout: Duration,
) -> Result<ControlReply, String> {
    let channel = control
        .channel
        .as_mut()
        .ok_or("the instance has no VM process at the moment")?;
    let reply = channel
        .call(request, timeout)
        .map_err(|err| err.to_string())?;
    match &reply.error {
        Some(error) => Err(format!("the VM process refused: {error}")),
        None => Ok(reply),
    }
}

/// Stop-hibernate: the VM writes its RAM and state into the instance's
/// hibernation directory (staged, then renamed whole) and ends; the next
/// `kiln start` resumes it. Its root volume is the instance's own, flushed.
fn hibernate(instance: &mut Instance, control: &mut Control) -> Result<(), String> {
    let staging = instance.hibernation_staging();
    let failed = |what: &str, err: io::Error| format!("{what} {}: {err}", staging.display());
    match fs::remove_dir_all(&staging) {
        Err(err) if err.kind() != io::ErrorKind::NotFound => {
            return Err(failed("cannot clear", err));
        }
        _ => {}
    }
    fs::create_dir(&staging).map_err(|err| failed("cannot create", err))?;
    let request = ControlRequest::Snapshot {
        dir: staging.clone(),
        copy_root: false,
        then: AfterSnapshot::Stop,
    };
    if let Err(err) = ask(control, &request, SNAPSHOT_TIMEOUT) {
        let _ = fs::remove_dir_all(&staging);
        return Err(err);
    }
    // The VM is ending now, whatever follows: say why, once it has.
    control.wanted = Wanted::Stop;
    kiln_vmm::durable::rename_dir(&staging, &instance.hibernation_path())
        .map_err(|err| failed("cannot keep the hibernation in", err))?;
    control.wanted = Wanted::Hibernate;
    instance
        .update(|r| {
            r.state = State::Stopping;
            Ok(())
        })
        .map_err(|err| err.to_string())
}

/// `PUT /snapshot`: the running VM writes a snapshot of itself, with a copy
/// of its root volume's writes, into `dir`, and goes on.
fn snapshot(shared: &Shared, dir: &Path) -> Response {
    if !dir.is_absolute() {
        return Response::error(400, format!("{}: expected an absolute path", dir.display()));
    }
    let instance = lock(&shared.instance);
    if let Err(refused) = transition(instance.record.state, Verb::Snapshot) {
        return Response::error(409, refused.to_string());
    }
    let request = ControlRequest::Snapshot {
        dir: dir.to_path_buf(),
        copy_root: true,
        then: AfterSnapshot::Continue,
    };
    match ask(&mut lock(&shared.control), &request, SNAPSHOT_TIMEOUT) {
        Ok(reply) => Response::json(200, reply.snapshot.unwrap_or_default()),
        Err(err) => Response::error(500, err),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::instance::Registry;
    use crate::instance::tests::spec;

    #[test]
    fn the_vm_process_console_goes_through_the_rotating_log() {
        let home = tempfile::tempdir().unwrap();
        let registry = Registry::new(home.path());
        let (instance, vmm) = registry.create(spec(None), None).unwrap();
        let id = instance.record.id.clone();
        let limit = CONSOLE_LOG_LIMIT.get();
        // A VM process whose console passes the limit, then complains on
        // stderr and ends as a guest exiting 3 would.
        let script = format!("head -c {} /dev/zero; echo done >&2; exit 3", limit + 10);
        run(instance, vmm, None, |_| {
            let mut command = Command::new("sh");
            command.args(["-c", &script]);
            command
        })
        .unwrap();
        let instance = registry.find(&id).unwrap();
        assert_eq!(
            instance.record.reason.as_deref(),
            Some("the guest shut down (entrypoint exit status 3)")
        );
        assert_eq!(
            fs::metadata(instance.console_log_rotated()).unwrap().len(),
            limit
        );
        assert_eq!(
            fs::read(instance.console_log()).unwrap(),
            b"\0\0\0\0\0\0\0\0\0\0done\n"
        );
    }
}
