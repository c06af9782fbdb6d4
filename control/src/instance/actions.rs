//! The instance API's side of the supervisor: requests from `api.sock`
//! (`docs/api.md`) become actions on the instance's VM process (signals
//! for stop and reboot, control requests for pause, resume and snapshots)
//! and changes to its record, each allowed only by the state table. The
//! API thread parses each request; the actions thread carries it out.
use std::fs;
use std::io;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::{Arc, mpsc};
use std::thread;
use std::time::Duration;

use kiln_vmm::devices::lock;
use kiln_vmm::report::one_line;
use kiln_vmm::rpc::{self, AfterSnapshot, ControlReply, ControlRequest};
use kiln_vmm::seccomp::{self, ThreadKind};
use serde::Deserialize;

use super::state::transition;
use super::supervisor::{Control, Shared, Wanted, end_vm};
use super::{Instance, InstanceError, State, Verb};
use crate::api::{self, ActionBody, Request, Response};

/// How long the API waits for the VM process to pause or resume.
const CONTROL_TIMEOUT: Duration = Duration::from_secs(30);
/// How long it waits for a snapshot: RAM is written whole (less its zero
/// pages), which takes a while for a large guest on a slow disk.
pub const SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(600);

/// Why an action on the VM process failed.
#[derive(Debug, thiserror::Error)]
enum ActionError {
    #[error("the instance has no VM process at the moment")]
    NoVm,
    #[error("the VM process did not answer")]
    Channel(#[source] rpc::ControlError),
    /// The VM process's own words, from its reply.
    #[error("the VM process refused: {0}")]
    Refused(String),
    #[error("cannot {what} {path}")]
    Files {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Record(#[from] InstanceError),
}

/// A request the API thread has parsed, for the actions thread to carry
/// out, with the channel its answer goes back on.
type Order = (Command, mpsc::SyncSender<Response>);

/// What a well-formed request asks for.
#[derive(Debug)]
enum Command {
    /// `GET /instance`: the record.
    Describe,
    /// `PUT /actions`.
    Act(Action),
    /// `PUT /snapshot`, into this absolute directory.
    Snapshot(PathBuf),
}

/// Serves the instance's API from `listener` until the process ends, on
/// two threads under filters of their own, as Firecracker's API thread
/// hands its requests to the VMM thread: the API thread reads and parses
/// requests from outside and has no file or signal calls; the actions
/// thread carries them out, one at a time. (Neither may start a process:
/// the launcher thread of [`super::supervisor`] does.)
pub(super) fn spawn(listener: UnixListener, shared: &Arc<Shared>) {
    let (orders, inbox) = mpsc::channel::<Order>();
    let api_shared = shared.clone();
    thread::spawn(move || serve(&listener, &api_shared, &orders));
    let shared = shared.clone();
    thread::spawn(move || carry_out(&inbox, &shared));
}

/// The API thread: answers requests, one connection at a time.
fn serve(listener: &UnixListener, shared: &Shared, orders: &mpsc::Sender<Order>) {
    if let Err(err) = seccomp::install(ThreadKind::Api) {
        log::error!("api: not serving: {}", one_line(&err));
        return;
    }
    for stream in listener.incoming().flatten() {
        let _answering = lock(&shared.answering);
        let answer = |request| match parse(request) {
            Ok(command) => forward(orders, command),
            Err(refused) => refused,
        };
        if let Err(err) = api::serve_one(stream, answer) {
            log::warn!("api: {}", one_line(&err));
        }
    }
}

/// Hands `command` to the actions thread and waits for its answer.
fn forward(orders: &mpsc::Sender<Order>, command: Command) -> Response {
    let (answer, answered) = mpsc::sync_channel(1);
    if orders.send((command, answer)).is_err() {
        return Response::error(
            500,
            "the actions thread is not running (see the console log)",
        );
    }
    answered
        .recv()
        .unwrap_or_else(|_| Response::error(500, "the actions thread ended without an answer"))
}

/// The actions thread: carries out each command the API thread parsed.
fn carry_out(inbox: &mpsc::Receiver<Order>, shared: &Shared) {
    if let Err(err) = seccomp::install(ThreadKind::Actions) {
        log::error!("api: not acting: {}", one_line(&err));
        return;
    }
    for (command, answer) in inbox {
        let _ = answer.send(execute(shared, command));
    }
}

/// The command `request` makes, or the answer that refuses it.
fn parse(request: Request) -> Result<Command, Response> {
    let body = |expected: &str| {
        let expected = expected.to_string();
        move |err: serde_json::Error| Response::error(400, format!("expected {expected}: {err}"))
    };
    match (request.method.as_str(), request.path.as_str()) {
        ("GET", "/instance") => Ok(Command::Describe),
        ("PUT", "/actions") => {
            let body: ActionBody =
                serde_json::from_slice(&request.body).map_err(body("{\"action\": NAME}"))?;
            Action::parse(&body.action).map(Command::Act)
        }
        ("PUT", "/snapshot") => {
            let body: SnapshotBody =
                serde_json::from_slice(&request.body).map_err(body("{\"dir\": PATH}"))?;
            if !body.dir.is_absolute() {
                let dir = body.dir.display();
                return Err(Response::error(
                    400,
                    format!("{dir}: expected an absolute path"),
                ));
            }
            Ok(Command::Snapshot(body.dir))
        }
        (_, "/instance" | "/actions" | "/snapshot") => {
            Err(Response::error(405, "method not allowed here"))
        }
        (_, path) => Err(Response::error(404, format!("no route {path}"))),
    }
}

/// Carries out `command` on the actions thread; its answer.
fn execute(shared: &Shared, command: Command) -> Response {
    match command {
        Command::Describe => Response::json(200, &lock(&shared.instance).record),
        Command::Act(action) => act(shared, action),
        Command::Snapshot(dir) => snapshot(shared, &dir),
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
    /// The action `name`, or the answer that refuses it.
    fn parse(name: &str) -> Result<Action, Response> {
        Ok(match name {
            "stop" => Action::Stop,
            "reboot" => Action::Reboot,
            "pause" => Action::Pause,
            "resume" => Action::Resume,
            "hibernate" => Action::Hibernate,
            _ => {
                return Err(Response::error(
                    400,
                    format!(
                        "unknown action {name:?}: expected stop, reboot, pause, resume or hibernate"
                    ),
                ));
            }
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
fn act(shared: &Shared, action: Action) -> Response {
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
            if let Some(pidfd) = &control.child {
                end_vm(pidfd);
            }
            instance
                .update(|r| {
                    if stop {
                        r.state = State::Stopping;
                    }
                    Ok(())
                })
                .map_err(ActionError::from)
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
                    .map_err(ActionError::from)
            })
        }
        Action::Hibernate => hibernate(&mut instance, &mut control, shared.jailed),
    };
    match changed {
        Ok(()) => Response::no_content(),
        Err(err) => Response::error(500, one_line(&err)),
    }
}

/// Sends `request` to the VM process; its refusal or silence is the error.
fn ask(
    control: &mut Control,
    request: &ControlRequest,
    timeout: Duration,
) -> Result<ControlReply, ActionError> {
    let channel = control.channel.as_mut().ok_or(ActionError::NoVm)?;
    let reply = channel
        .call(request, timeout)
        .map_err(ActionError::Channel)?;
    match reply.error {
        Some(error) => Err(ActionError::Refused(error)),
        None => Ok(reply),
    }
}

/// Stop-hibernate: the VM writes its RAM and state into the instance's
/// hibernation directory (staged, then renamed whole) and ends; the next
/// `kiln start` resumes it. Its root volume is the instance's own, flushed.
/// A jailed VM writes into the instance's exchange directory, which its
/// jail made its own (and the next VM process's jail makes anew).
fn hibernate(
    instance: &mut Instance,
    control: &mut Control,
    jailed: bool,
) -> Result<(), ActionError> {
    let staging = if jailed {
        crate::jail::exchange_dir(instance.dir())
    } else {
        instance.hibernation_staging()
    };
    let failed = |what, source| ActionError::Files {
        what,
        path: staging.clone(),
        source,
    };
    if !jailed {
        crate::fresh_dir(&staging).map_err(|err| failed("make anew", err))?;
    }
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
        .map_err(|err| failed("keep the hibernation in", err))?;
    control.wanted = Wanted::Hibernate;
    instance.update(|r| {
        r.state = State::Stopping;
        Ok(())
    })?;
    Ok(())
}

/// `PUT /snapshot`: the running VM writes a snapshot of itself, with a copy
/// of its root volume's writes, into `dir`, and goes on. A jailed VM sees
/// only its instance's directory: it writes into the exchange directory
/// there, whose files are then moved into `dir` (on the same filesystem).
fn snapshot(shared: &Shared, dir: &Path) -> Response {
    let instance = lock(&shared.instance);
    if let Err(refused) = transition(instance.record.state, Verb::Snapshot) {
        return Response::error(409, refused.to_string());
    }
    let exchange = shared
        .jailed
        .then(|| crate::jail::exchange_dir(instance.dir()));
    let request = ControlRequest::Snapshot {
        dir: exchange.clone().unwrap_or_else(|| dir.to_path_buf()),
        copy_root: true,
        then: AfterSnapshot::Continue,
    };
    let written = ask(&mut lock(&shared.control), &request, SNAPSHOT_TIMEOUT);
    let moved = match &exchange {
        Some(exchange) => move_entries(exchange, dir),
        None => Ok(()),
    };
    match written.and_then(|reply| moved.map(|()| reply)) {
        Ok(reply) => Response::json(200, reply.snapshot.unwrap_or_default()),
        Err(err) => Response::error(500, one_line(&err)),
    }
}

/// Moves every entry of `from` into `to` (renamed: same filesystem),
/// leaving `from` empty for the next snapshot.
fn move_entries(from: &Path, to: &Path) -> Result<(), ActionError> {
    let failed = |what, path: &Path| {
        let path = path.to_path_buf();
        move |source| ActionError::Files { what, path, source }
    };
    for entry in fs::read_dir(from).map_err(failed("list", from))? {
        let entry = entry.map_err(failed("list", from))?;
        let target = to.join(entry.file_name());
        fs::rename(entry.path(), &target)
            .map_err(failed("move the snapshot's file to", &target))?;
    }
    Ok(())
}
