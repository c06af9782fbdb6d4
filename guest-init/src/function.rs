//! The function invocation protocol: how the host asks guest-init, in
//! function mode, to run the function's handler once.
//!
//! The host reaches guest-init over virtio-vsock: guest-init listens on
//! [`FUNCTION_PORT`] of the guest's CID; the host connects through the
//! VMM's unix socket the way Firecracker's vsock does (`CONNECT <port>\n`,
//! answered `OK <host port>\n`), then writes one [`Invocation`] as a JSON
//! line. guest-init runs the handler with the payload on stdin and answers
//! with one [`Outcome`] JSON line, then closes the stream. A [`Ping`]
//! line instead (`{"ping":true}`) is answered `{"pong":true}` at once: the
//! host uses it to know the function is ready.
//!
//! Function mode is on when the kernel command line has
//! [`FUNCTION_CMDLINE_FLAG`]; the handler is the run configuration's
//! entrypoint (with its env and workdir), run afresh for every invocation.
//!
//! With [`RUNTIME_API_CMDLINE_FLAG`] instead, the entrypoint is a Lambda
//! runtime, started once at boot: guest-init serves it AWS Lambda's
//! Runtime API (`2018-06-01`) on [`RUNTIME_API_ADDRESS`], and the host
//! drives that environment through a session: one vsock stream carrying
//! any number of [`SessionRequest`] lines, each answered by one
//! [`SessionReply`] line, in order. `wait_init` answers once the runtime
//! waits in `restore/next` or `invocation/next` (its init is done: the
//! moment to snapshot); a clone's first request is `restore` (fresh seed
//! and hostname, then `restore/next` is released); each `event` is handed
//! to the runtime's `invocation/next` and answered with what the runtime
//! posted. A ping is answered on any stream, in either mode.
use serde::{Deserialize, Serialize};

/// The guest vsock port guest-init listens on in function mode.
pub const FUNCTION_PORT: u32 = 5000;

/// The kernel command-line word that turns function mode on.
pub const FUNCTION_CMDLINE_FLAG: &str = "kiln.function=1";

/// The kernel command-line word that turns function mode on with a Lambda
/// runtime as the entrypoint, served the Runtime API.
pub const RUNTIME_API_CMDLINE_FLAG: &str = "kiln.function=runtime-api";

/// Where guest-init serves the Runtime API in the guest: the value of the
/// runtime's `AWS_LAMBDA_RUNTIME_API`.
pub const RUNTIME_API_ADDRESS: &str = "127.0.0.1:9001";

/// The largest response a runtime may post (Lambda's synchronous payload
/// limit, 6 MB); a larger one is a function error.
pub const RESPONSE_MAX: usize = 6 * 1024 * 1024;

/// How much of the end of an invocation's log a [`EventResult`] carries
/// (what Lambda's `X-Amz-Log-Result` holds: the last 4 KB).
pub const LOG_TAIL: usize = 4096;

/// Bytes of fresh host randomness each invocation carries (as hex).
pub const SEED_BYTES: usize = 32;

/// One call of the handler.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Invocation {
    /// Written to the handler's stdin, then stdin is closed.
    pub payload: String,
    /// The handler (its whole process group) is killed after this long.
    pub timeout_ms: u64,
    /// [`SEED_BYTES`] of host randomness, hex: guest-init mixes them into
    /// the kernel's random pool and forces a reseed before the handler
    /// runs, so VMs cloned from one snapshot never share random state.
    pub seed: String,
    /// The hostname the guest takes before the handler runs (a clone's
    /// own, not its template's); none keeps the current one.
    #[serde(default)]
    pub hostname: Option<String>,
}

/// What one call of the handler did.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Outcome {
    /// Shell convention: the exit code, or 128 + the signal that killed it.
    pub status: i32,
    /// What the handler wrote on its stdout (invalid UTF-8 replaced), at
    /// most `function_mode::OUTPUT_MAX` bytes of it.
    pub stdout: String,
    /// What it wrote on its stderr, likewise capped, with a line from
    /// guest-init at the end for each stream it cut short.
    pub stderr: String,
    /// The handler ran out of time and was killed.
    pub timed_out: bool,
    /// From the invocation's arrival to the handler's end, in microseconds.
    pub duration_us: u64,
    /// Why guest-init could not run the handler at all (a bad request, a
    /// handler that does not exist), with its causes on one line; `None`
    /// when it ran.
    pub error: Option<String>,
}

/// The readiness probe.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Ping {
    /// Always true: the line `{"ping":true}`.
    pub ping: bool,
}

/// The answer to a [`Ping`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Pong {
    /// Always true: the line `{"pong":true}`.
    pub pong: bool,
}

/// One request of a Runtime API session, externally tagged:
/// `{"wait_init":{…}}`, `{"restore":{…}}` or `{"event":{…}}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum SessionRequest {
    /// Answer once the runtime's init is done or has failed.
    WaitInit {
        /// Init has failed if the runtime is not waiting for work this
        /// long after it started.
        timeout_ms: u64,
    },
    /// This environment is a clone just restored: reseed the kernel's
    /// random pool, take the hostname, then release `restore/next`.
    Restore {
        /// [`SEED_BYTES`] of host randomness, hex (see
        /// [`Invocation::seed`]).
        seed: String,
        /// The clone's own hostname; none keeps the current one.
        hostname: Option<String>,
    },
    /// Hand this event to the runtime's `invocation/next`.
    Event(Event),
}

/// One invocation as the runtime receives it: the body and the
/// `Lambda-Runtime-*` headers of its `invocation/next` answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Event {
    /// `Lambda-Runtime-Aws-Request-Id`: the id the runtime posts its
    /// response or error under.
    pub request_id: String,
    /// The event, as the body (JSON, as Lambda's clients send it).
    pub payload: String,
    /// The invocation's time limit: `Lambda-Runtime-Deadline-Ms` is
    /// delivery time plus this; guest-init ends the runtime past it.
    pub timeout_ms: u64,
    /// `Lambda-Runtime-Invoked-Function-Arn`.
    pub function_arn: String,
    /// `Lambda-Runtime-Trace-Id`.
    pub trace_id: String,
    /// `Lambda-Runtime-Client-Context`, sent only when present.
    #[serde(default)]
    pub client_context: Option<String>,
    /// `Lambda-Runtime-Cognito-Identity`, sent only when present.
    #[serde(default)]
    pub cognito_identity: Option<String>,
}

/// Where the runtime was waiting when its init was judged done.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InitPhase {
    /// `GET restore/next`: a SnapStart-aware runtime, its before-snapshot
    /// hooks run.
    RestoreNext,
    /// `GET invocation/next`: a runtime that knows no SnapStart.
    InvocationNext,
}

/// How an event ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventStatus {
    /// The runtime posted `invocation/{id}/response`.
    Response,
    /// The runtime posted `invocation/{id}/error`, or its response was
    /// larger than [`RESPONSE_MAX`]: the body is the error JSON.
    Error,
    /// The time limit passed; the runtime was killed, and this
    /// environment serves no more events.
    Timeout,
    /// The runtime exited before it answered; this environment serves no
    /// more events.
    Exited,
}

/// What the runtime made of one [`Event`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventResult {
    /// The event's request id.
    pub request_id: String,
    /// How it ended.
    pub status: EventStatus,
    /// The response (invalid UTF-8 replaced), or the error JSON (Lambda's
    /// `{"errorMessage":…,"errorType":…}` shape).
    pub body: String,
    /// The error's type (the runtime's `Lambda-Runtime-Function-Error-Type`
    /// header, or guest-init's own for a timeout, an exit or a too large
    /// response); none for a response.
    pub error_type: Option<String>,
    /// The last [`LOG_TAIL`] bytes the runtime wrote (stdout and stderr,
    /// in order) while it had this event.
    pub log: String,
    /// From the event's delivery to its end, in microseconds.
    pub duration_us: u64,
}

/// The answer to one [`SessionRequest`], externally tagged like it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum SessionReply {
    /// The runtime's init is done: it waits in `phase`.
    InitDone {
        /// Where it waits.
        phase: InitPhase,
        /// From the runtime's start to that wait, in microseconds.
        init_us: u64,
    },
    /// The runtime's init failed: it posted `init/error`, exited, or did
    /// not finish in time.
    InitError {
        /// What failed, with the runtime's own error when it posted one.
        message: String,
        /// The last [`LOG_TAIL`] bytes the runtime wrote.
        log: String,
    },
    /// The `restore` is done: reseeded, renamed, `restore/next` released.
    Restored,
    /// An event's end.
    Result(EventResult),
    /// The request could not be served (a bad line, a bad seed, an event
    /// for an environment whose runtime is gone), with its causes on one
    /// line.
    Refused {
        /// Why.
        error: String,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_invocation_is_one_json_object_and_strangers_are_refused() {
        let invocation = Invocation {
            payload: "{\"a\":1}".into(),
            timeout_ms: 3000,
            seed: "00".repeat(SEED_BYTES),
            hostname: Some("i-0123456789abcdef".into()),
        };
        let line = serde_json::to_string(&invocation).unwrap();
        assert!(!line.contains('\n'));
        assert_eq!(
            serde_json::from_str::<Invocation>(&line).unwrap(),
            invocation
        );
        assert!(serde_json::from_str::<Invocation>(r#"{"ping":true}"#).is_err());
        assert!(serde_json::from_str::<Ping>(r#"{"ping":true}"#).is_ok());
    }

    #[test]
    fn session_lines_are_externally_tagged() {
        let line = r#"{"wait_init":{"timeout_ms":5}}"#;
        assert_eq!(
            serde_json::from_str::<SessionRequest>(line).unwrap(),
            SessionRequest::WaitInit { timeout_ms: 5 }
        );
        let restored = serde_json::to_string(&SessionReply::Restored).unwrap();
        assert_eq!(restored, r#""restored""#);
        let done = SessionReply::InitDone {
            phase: InitPhase::RestoreNext,
            init_us: 7,
        };
        assert_eq!(
            serde_json::to_string(&done).unwrap(),
            r#"{"init_done":{"phase":"restore_next","init_us":7}}"#
        );
        assert!(serde_json::from_str::<SessionRequest>(r#"{"ping":true}"#).is_err());
    }
}
