//! Function mode with a Lambda runtime: the entrypoint is started once, at
//! boot, with Lambda's environment and `AWS_LAMBDA_RUNTIME_API`, and
//! guest-init serves it the Runtime API ([`crate::runtime_api`]) while it
//! serves the host `crate::function`'s session protocol on vsock.
//!
//! One `poll` loop, one thread (PID 1 keeps a single reaper), watches the
//! blocked signals, the vsock listener and session, the runtime's log pipe
//! (stdout and stderr together, copied to the console and kept for the
//! log tail) and the Runtime API's sockets. The environment goes through
//! Lambda's phases:
//! - init: from the runtime's start until it first waits in `restore/next`
//!   or `invocation/next` (init done: the host snapshots now), or posts
//!   `init/error`, or exits (init failed);
//! - restore: a clone's `restore` request reseeds the kernel's random pool
//!   and sets the clone's hostname, and only then answers `restore/next`;
//! - invoke: an `event` is handed to the parked `invocation/next` (or the
//!   next one); the runtime's `response` or `error` post ends it. Past its
//!   deadline the runtime's process group is killed and the environment
//!   serves no more (the host replaces it), as when the runtime exits.
//!
//! The host sends one request and waits for its answer before the next;
//! lines sent meanwhile wait in the session's buffer.
use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::process::Stdio;
use std::time::{Duration, Instant};

use crate::config::RunConfig;
use crate::function::{
    Event, EventResult, EventStatus, FUNCTION_PORT, InitPhase, LOG_TAIL, Ping, Pong, SessionReply,
    SessionRequest,
};
use crate::function_mode::{
    REQUEST_MAX, ServeError, accept, become_clone, kill_group, listen, poll, pollfd,
};
use crate::runtime_api::{self, ApiError, Call, ConnId, Route, Server};
use crate::supervisor::{self, SignalFd, Signals};

/// The last bytes of a stream.
#[derive(Debug, Default)]
pub struct Tail(VecDeque<u8>);

impl Tail {
    /// Keeps the last [`LOG_TAIL`] bytes of what was pushed so far.
    pub fn push(&mut self, bytes: &[u8]) {
        let bytes = &bytes[bytes.len().saturating_sub(LOG_TAIL)..];
        let over = (self.0.len() + bytes.len()).saturating_sub(LOG_TAIL);
        self.0.drain(..over);
        self.0.extend(bytes);
    }

    /// What it holds (invalid UTF-8 replaced), emptying it.
    pub fn take(&mut self) -> String {
        let bytes: Vec<u8> = self.0.drain(..).collect();
        String::from_utf8_lossy(&bytes).into_owned()
    }
}

/// How the runtime's init stands.
#[derive(Debug)]
enum Init {
    Running,
    Done(SessionReply),
    Failed(SessionReply),
}

/// A long poll the runtime waits in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Parked {
    Next(ConnId),
    Restore(ConnId),
}

/// The event the runtime has now.
struct Current {
    event: Event,
    delivered: Instant,
    deadline: Instant,
}

/// What the host waits for an answer to.
enum Awaited {
    Init { deadline: Instant },
    Event,
}

/// The runtime process.
struct Runtime {
    /// Its pid, which is also its process group's id; 0 if it could not
    /// be started.
    pid: libc::pid_t,
    log: Option<std::fs::File>,
}

impl Runtime {
    /// Signals the runtime's whole process group, if it was started (a
    /// group id of 0 would be guest-init's own group).
    fn kill(&self, sig: libc::c_int) {
        if self.pid > 0 {
            kill_group(self.pid, sig);
        }
    }
}

/// The whole environment's state.
struct Environment {
    api: Server,
    runtime: Runtime,
    started: Instant,
    init: Init,
    parked: Option<Parked>,
    restored: bool,
    pending: Option<Event>,
    current: Option<Current>,
    /// Why the runtime serves no more events.
    gone: Option<String>,
    log: Tail,
    session: Option<Session>,
    awaited: Option<Awaited>,
}

/// The host's stream and the unread part of its lines.
struct Session {
    stream: UnixStream,
    input: Vec<u8>,
}

/// Starts the runtime and serves it and the host until SIGTERM or SIGINT
/// arrives; returns 128 + that signal. An error only if there is nothing
/// to serve on.
pub fn serve(config: &RunConfig, signals: &Signals) -> Result<u8, ServeError> {
    let listener = listen(FUNCTION_PORT).map_err(ServeError::Listen)?;
    let api = Server::bind().map_err(ServeError::RuntimeApi)?;
    serve_on(config, signals, &listener, api)
}

/// [`serve`] with the host's sessions taken from `listener` (any
/// non-blocking listening stream socket: tests use a unix one) and the
/// Runtime API served by `api`.
pub fn serve_on(
    config: &RunConfig,
    signals: &Signals,
    listener: &OwnedFd,
    api: Server,
) -> Result<u8, ServeError> {
    let signals = signals.fd().map_err(ServeError::Signals)?;
    let address = api.local_addr().map_err(ServeError::RuntimeApi)?;
    let started = Instant::now();
    let mut env = Environment {
        api,
        runtime: Runtime { pid: 0, log: None },
        started,
        init: Init::Running,
        parked: None,
        restored: false,
        pending: None,
        current: None,
        gone: None,
        log: Tail::default(),
        session: None,
        awaited: None,
    };
    match start_runtime(config, &address.to_string()) {
        Ok(runtime) => env.runtime = runtime,
        Err(err) => {
            let message = format!("cannot start {}: {err}", config.entrypoint[0]);
            env.fail_init(message);
        }
    }
    eprintln!(
        "guest-init: function runtime served on {address}; ready on vsock port {FUNCTION_PORT}"
    );
    loop {
        if let Some(sig) = env.round(&signals, listener) {
            env.runtime.kill(sig);
            return Ok(128 + sig as u8);
        }
    }
}

/// The runtime: the entrypoint in its own process group, with
/// `AWS_LAMBDA_RUNTIME_API` set to `api`, stdout and stderr on one pipe.
fn start_runtime(config: &RunConfig, api: &str) -> io::Result<Runtime> {
    let mut fds = [0; 2];
    // SAFETY: `fds` is a writable array of two descriptors.
    let rc = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: pipe2 made this descriptor, which nothing else owns.
    let read = unsafe { OwnedFd::from_raw_fd(fds[0]) };
    // SAFETY: likewise.
    let write = unsafe { OwnedFd::from_raw_fd(fds[1]) };
    // SAFETY: fcntl on our own pipe end; O_NONBLOCK is the only flag set.
    unsafe { libc::fcntl(read.as_raw_fd(), libc::F_SETFL, libc::O_NONBLOCK) };
    let mut command = supervisor::command(config);
    command
        .env("AWS_LAMBDA_RUNTIME_API", api)
        .process_group(0)
        .stdin(Stdio::null())
        .stdout(Stdio::from(write.try_clone()?))
        .stderr(Stdio::from(write));
    let child = command.spawn()?;
    Ok(Runtime {
        pid: child.id() as libc::pid_t,
        log: Some(read.into()),
    })
}

impl Environment {
    /// One `poll` and what it found; SIGTERM or SIGINT if one arrived.
    fn round(&mut self, signals: &SignalFd, listener: &OwnedFd) -> Option<libc::c_int> {
        let session_fd = self.session.as_ref().map_or(-1, |s| s.stream.as_raw_fd());
        // Lines are not read while the host waits for an answer.
        let session_events = if self.awaited.is_none() {
            libc::POLLIN
        } else {
            0
        };
        let log_fd = self.runtime.log.as_ref().map_or(-1, AsRawFd::as_raw_fd);
        let mut fds = vec![
            pollfd(signals.as_raw_fd(), libc::POLLIN),
            pollfd(listener.as_raw_fd(), libc::POLLIN),
            pollfd(session_fd, session_events),
            pollfd(log_fd, libc::POLLIN),
        ];
        fds.extend(self.api.poll_fds());
        let timeout = crate::function_mode::poll_timeout(self.next_deadline(), Instant::now());
        if poll(&mut fds, timeout).is_err() {
            return None;
        }
        if fds[0].revents != 0 {
            match signals.take() {
                Some(sig @ (libc::SIGTERM | libc::SIGINT)) => return Some(sig),
                _ => self.reap(),
            }
        }
        if fds[3].revents != 0 {
            self.read_log();
        }
        if fds[1].revents != 0 {
            self.accept_session(listener);
        }
        let (calls, closed) = self.api.service(&fds[4..]);
        if let Some(Parked::Next(conn) | Parked::Restore(conn)) = self.parked
            && closed.contains(&conn)
        {
            self.parked = None;
        }
        for call in calls {
            self.on_call(call);
        }
        if fds[2].revents != 0 {
            self.read_session();
        }
        self.check_deadlines();
        self.serve_session();
        None
    }

    fn next_deadline(&self) -> Option<Instant> {
        let init = match &self.awaited {
            Some(Awaited::Init { deadline }) => Some(*deadline),
            _ => None,
        };
        let event = self.current.as_ref().map(|c| c.deadline);
        init.into_iter().chain(event).min()
    }

    /// Copies what the runtime wrote to the console and the log tail.
    fn read_log(&mut self) {
        let Some(pipe) = &mut self.runtime.log else {
            return;
        };
        let mut chunk = [0u8; 16 * 1024];
        loop {
            match pipe.read(&mut chunk) {
                Ok(0) => return self.runtime.log = None,
                Ok(n) => {
                    self.log.push(&chunk[..n]);
                    let _ = io::stderr().write_all(&chunk[..n]);
                }
                Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => return,
                Err(_) => return self.runtime.log = None,
            }
        }
    }

    /// Reaps children; the runtime's end ends its init or its event.
    fn reap(&mut self) {
        let Some(status) = supervisor::reap_all(self.runtime.pid) else {
            return;
        };
        self.read_log();
        let why = format!("the runtime exited with status {status}");
        eprintln!("guest-init: {why}");
        if matches!(self.init, Init::Running) {
            self.fail_init(format!("{why} during init"));
        }
        if self.current.is_some() {
            let body = runtime_api::error_body(&why, "Runtime.ExitError");
            self.finish(EventStatus::Exited, body, Some("Runtime.ExitError".into()));
        }
        // An event still waiting for the runtime's `invocation/next` will
        // never be taken: the host hears so now, not at its timeout.
        if self.pending.take().is_some() && matches!(self.awaited, Some(Awaited::Event)) {
            self.awaited = None;
            self.refuse(format!("this environment serves no more events: {why}"));
        }
        self.gone = Some(why);
    }

    fn fail_init(&mut self, message: String) {
        eprintln!("guest-init: function init failed: {message}");
        self.init = Init::Failed(SessionReply::InitError {
            message,
            log: self.log.take(),
        });
    }

    /// Answers (or parks) one Runtime API call.
    fn on_call(&mut self, call: Call) {
        let conn = call.conn;
        let answer = match call.route {
            Route::Next => {
                if let Some(current) = &self.current {
                    let message = format!(
                        "the runtime asked for the next event without answering {}",
                        current.event.request_id
                    );
                    let body = runtime_api::error_body(&message, "Runtime.NoResponse");
                    self.finish(EventStatus::Error, body, Some("Runtime.NoResponse".into()));
                }
                self.init_done(InitPhase::InvocationNext);
                self.parked = Some(Parked::Next(conn));
                self.deliver();
                return;
            }
            Route::RestoreNext => {
                self.init_done(InitPhase::RestoreNext);
                if self.restored {
                    Ok(runtime_api::response(200, &[], b""))
                } else {
                    self.parked = Some(Parked::Restore(conn));
                    return;
                }
            }
            Route::Response(id) => self
                .answer_event(&id, EventStatus::Response, call.body, None)
                .map(|()| runtime_api::accepted()),
            Route::Error(id) => {
                let error_type = call
                    .headers
                    .get("lambda-runtime-function-error-type")
                    .cloned()
                    .or_else(|| Some("Unhandled".into()));
                self.answer_event(&id, EventStatus::Error, call.body, error_type)
                    .map(|()| runtime_api::accepted())
            }
            Route::InitError => self.init_error(&call).map(|()| runtime_api::accepted()),
            Route::RestoreError => {
                let why = format!(
                    "the runtime posted restore/error: {}",
                    String::from_utf8_lossy(&call.body)
                );
                eprintln!("guest-init: {why}");
                self.gone = Some(why);
                Ok(runtime_api::accepted())
            }
            Route::TooLarge(id) => {
                if let Some(id) = id {
                    let body = runtime_api::error_body(
                        "the response is larger than Lambda's 6 MB limit",
                        "Function.ResponseSizeTooLarge",
                    );
                    let error_type = Some("Function.ResponseSizeTooLarge".into());
                    // A stale id was told 413 already; nothing more to say.
                    let _ = self.answer_event(&id, EventStatus::Error, body, error_type);
                }
                return;
            }
        };
        let answer = answer.unwrap_or_else(|err| runtime_api::error_response(&err));
        self.api.reply(conn, answer);
    }

    fn init_done(&mut self, phase: InitPhase) {
        if matches!(self.init, Init::Running) {
            let init_us = micros(self.started.elapsed());
            eprintln!("guest-init: function init done in {init_us} us (waiting in {phase:?})");
            self.init = Init::Done(SessionReply::InitDone { phase, init_us });
        }
    }

    fn init_error(&mut self, call: &Call) -> Result<(), ApiError> {
        if !matches!(self.init, Init::Running) {
            return Err(ApiError::new(
                403,
                "InvalidStateTransition",
                "init/error: the init phase is over",
            ));
        }
        let error_type = call.headers.get("lambda-runtime-function-error-type");
        let body = String::from_utf8_lossy(&call.body);
        let message = match error_type {
            Some(kind) => format!("the runtime posted init/error ({kind}): {body}"),
            None => format!("the runtime posted init/error: {body}"),
        };
        self.read_log();
        self.fail_init(message);
        Ok(())
    }

    /// The runtime's answer to event `id`.
    fn answer_event(
        &mut self,
        id: &str,
        status: EventStatus,
        body: Vec<u8>,
        error_type: Option<String>,
    ) -> Result<(), ApiError> {
        if self
            .current
            .as_ref()
            .is_none_or(|c| c.event.request_id != id)
        {
            return Err(ApiError::new(
                400,
                "InvalidRequestID",
                format!("no event with request id {id:?} is being served"),
            ));
        }
        self.read_log();
        self.finish(status, body, error_type);
        Ok(())
    }

    /// Ends the current event and answers the host with `status`.
    fn finish(&mut self, status: EventStatus, body: Vec<u8>, error_type: Option<String>) {
        let Some(current) = self.current.take() else {
            return;
        };
        let result = EventResult {
            request_id: current.event.request_id,
            status,
            body: String::from_utf8_lossy(&body).into_owned(),
            error_type,
            log: self.log.take(),
            duration_us: micros(current.delivered.elapsed()),
        };
        if matches!(self.awaited, Some(Awaited::Event)) {
            self.awaited = None;
            self.send(&SessionReply::Result(result));
        }
    }

    /// Hands the pending event to a parked `invocation/next`.
    fn deliver(&mut self) {
        let Some(Parked::Next(conn)) = self.parked else {
            return;
        };
        let Some(event) = self.pending.take() else {
            return;
        };
        self.parked = None;
        let now = Instant::now();
        let timeout = Duration::from_millis(event.timeout_ms);
        let deadline_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .saturating_add(timeout)
            .as_millis()
            .to_string();
        let mut headers = vec![
            ("Content-Type", "application/json"),
            ("Lambda-Runtime-Aws-Request-Id", event.request_id.as_str()),
            ("Lambda-Runtime-Deadline-Ms", deadline_ms.as_str()),
            (
                "Lambda-Runtime-Invoked-Function-Arn",
                event.function_arn.as_str(),
            ),
            ("Lambda-Runtime-Trace-Id", event.trace_id.as_str()),
        ];
        if let Some(context) = &event.client_context {
            headers.push(("Lambda-Runtime-Client-Context", context));
        }
        if let Some(identity) = &event.cognito_identity {
            headers.push(("Lambda-Runtime-Cognito-Identity", identity));
        }
        let answer = runtime_api::response(200, &headers, event.payload.as_bytes());
        self.api.reply(conn, answer);
        self.log.take();
        self.current = Some(Current {
            event,
            delivered: now,
            deadline: now.checked_add(timeout).unwrap_or(now),
        });
    }

    /// An init wait or an event past its deadline.
    fn check_deadlines(&mut self) {
        let now = Instant::now();
        if let Some(Awaited::Init { deadline }) = self.awaited
            && now >= deadline
            && matches!(self.init, Init::Running)
        {
            let waited = deadline.duration_since(self.started);
            self.read_log();
            self.fail_init(format!(
                "the runtime did not reach invocation/next or restore/next within {waited:?}"
            ));
        }
        if let Some(current) = &self.current
            && now >= current.deadline
        {
            let limit = current.deadline - current.delivered;
            let message = format!("Task timed out after {:.2} seconds", limit.as_secs_f64());
            self.runtime.kill(libc::SIGKILL);
            self.read_log();
            let body = runtime_api::error_body(&message, "Sandbox.Timedout");
            self.finish(EventStatus::Timeout, body, Some("Sandbox.Timedout".into()));
            self.gone = Some(message);
        }
    }

    /// Takes a new host connection; it replaces the old one (a template's
    /// session does not survive into its clones).
    fn accept_session(&mut self, listener: &OwnedFd) {
        match accept(listener) {
            Ok(stream) => {
                self.session = Some(Session {
                    stream,
                    input: Vec::new(),
                });
                self.awaited = None;
            }
            Err(err) if err.kind() == io::ErrorKind::WouldBlock => {}
            Err(err) => eprintln!("guest-init: function session: cannot accept: {err}"),
        }
    }

    fn read_session(&mut self) {
        let Some(session) = &mut self.session else {
            return;
        };
        let mut chunk = [0u8; 64 * 1024];
        match session.stream.read(&mut chunk) {
            Ok(0) => self.end_session(),
            Ok(n) => {
                session.input.extend_from_slice(&chunk[..n]);
                if session.input.len() > REQUEST_MAX && !session.input.contains(&b'\n') {
                    eprintln!("guest-init: function session: a line over {REQUEST_MAX} bytes");
                    self.end_session();
                }
            }
            Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => self.end_session(),
        }
    }

    fn end_session(&mut self) {
        self.session = None;
        self.awaited = None;
    }

    /// Serves the session's next line, unless the host awaits an answer.
    fn serve_session(&mut self) {
        while self.awaited.is_none() {
            let Some(session) = &mut self.session else {
                return;
            };
            let Some(end) = session.input.iter().position(|&b| b == b'\n') else {
                return;
            };
            let line: Vec<u8> = session.input.drain(..=end).collect();
            self.on_line(&line[..end]);
        }
        self.answer_init();
    }

    fn on_line(&mut self, line: &[u8]) {
        if serde_json::from_slice::<Ping>(line).is_ok() {
            return self.send(&Pong { pong: true });
        }
        let request = match serde_json::from_slice::<SessionRequest>(line) {
            Ok(request) => request,
            Err(err) => return self.refuse(format!("not a session request: {err}")),
        };
        match request {
            SessionRequest::WaitInit { timeout_ms } => {
                let deadline = self.started + Duration::from_millis(timeout_ms);
                self.awaited = Some(Awaited::Init { deadline });
                self.answer_init();
            }
            SessionRequest::Restore { seed, hostname } => self.restore(&seed, hostname.as_deref()),
            SessionRequest::Event(event) => self.take_event(event),
        }
    }

    /// Answers a waiting `wait_init` once init has ended.
    fn answer_init(&mut self) {
        if !matches!(self.awaited, Some(Awaited::Init { .. })) {
            return;
        }
        let reply = match &self.init {
            Init::Running => return,
            Init::Done(reply) | Init::Failed(reply) => reply.clone(),
        };
        self.awaited = None;
        self.send(&reply);
    }

    fn restore(&mut self, seed: &str, hostname: Option<&str>) {
        if !matches!(self.init, Init::Done(_)) {
            return self.refuse("restore: the runtime's init is not done".into());
        }
        if let Err(refusal) = become_clone(seed, hostname) {
            return self.refuse(crate::one_line(&refusal));
        }
        self.restored = true;
        if let Some(Parked::Restore(conn)) = self.parked {
            self.parked = None;
            self.api.reply(conn, runtime_api::response(200, &[], b""));
        }
        self.send(&SessionReply::Restored);
    }

    fn take_event(&mut self, event: Event) {
        if let Some(why) = &self.gone {
            return self.refuse(format!("this environment serves no more events: {why}"));
        }
        if !matches!(self.init, Init::Done(_)) {
            return self.refuse("event: the runtime's init is not done".into());
        }
        if let Some(current) = &self.current {
            let busy = format!("event: busy with {}", current.event.request_id);
            return self.refuse(busy);
        }
        self.pending = Some(event);
        self.awaited = Some(Awaited::Event);
        self.deliver();
    }

    fn refuse(&mut self, error: String) {
        self.send(&SessionReply::Refused { error });
    }

    /// Writes one answer line; a host that is gone loses its session.
    fn send(&mut self, reply: &impl serde::Serialize) {
        let Some(session) = &mut self.session else {
            return;
        };
        let mut line = serde_json::to_vec(reply).expect("a reply serializes");
        line.push(b'\n');
        if let Err(err) = session.stream.write_all(&line) {
            eprintln!("guest-init: function session: cannot answer: {err}");
            self.end_session();
        }
    }
}

fn micros(duration: Duration) -> u64 {
    u64::try_from(duration.as_micros()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_log_tail_keeps_the_last_bytes() {
        let mut tail = Tail::default();
        tail.push(b"abc");
        assert_eq!(tail.take(), "abc");
        assert_eq!(tail.take(), "");
        tail.push(&vec![b'x'; LOG_TAIL]);
        tail.push(b"end");
        let kept = tail.take();
        assert_eq!(kept.len(), LOG_TAIL);
        assert!(kept.ends_with("xend"));
        tail.push(&[vec![b'y'; LOG_TAIL], b"z".to_vec()].concat());
        assert_eq!(tail.take().len(), LOG_TAIL);
    }
}
