//! Function mode with a Lambda runtime, end to end on the build host: the
//! host's session over a unix socket instead of vsock (a build host has no
//! vsock peer), the Runtime API on a free loopback port, and
//! recipes/python-echo/runtime.py (a SnapStart-aware runtime on Python's
//! standard library) as the entrypoint.
//!
//! Restores reseed the kernel's random pool (RNDADDENTROPY needs
//! CAP_SYS_ADMIN, so this runs as root; mixing in bytes never lowers the
//! host's entropy) and leave the hostname alone. The serving loop runs on
//! a thread for the rest of the test process; the last event times out,
//! which kills the runtime's process group, so nothing outlives the test.
use std::io::{BufRead, BufReader, Write};
use std::os::fd::OwnedFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;

use guest_init::config::RunConfig;
use guest_init::function::{
    Event, EventStatus, InitPhase, SEED_BYTES, SessionReply, SessionRequest,
};
use guest_init::function_runtime::serve_on;
use guest_init::runtime_api::Server;
use guest_init::supervisor::Signals;

fn runtime_config() -> RunConfig {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../recipes/python-echo/runtime.py");
    let json = serde_json::json!({
        "entrypoint": ["python3", script],
        "env": { "PATH": "/usr/bin:/bin", "AWS_LAMBDA_FUNCTION_NAME": "echo" },
    });
    serde_json::from_value(json).unwrap()
}

struct Host(BufReader<UnixStream>);

impl Host {
    fn ask(&mut self, request: &SessionRequest) -> SessionReply {
        let mut line = serde_json::to_vec(request).unwrap();
        line.push(b'\n');
        self.0.get_mut().write_all(&line).unwrap();
        let mut answer = String::new();
        self.0.read_line(&mut answer).unwrap();
        serde_json::from_str(&answer).unwrap_or_else(|err| panic!("{answer:?}: {err}"))
    }
}

fn event(id: &str, payload: &str, timeout_ms: u64) -> SessionRequest {
    SessionRequest::Event(Event {
        request_id: id.into(),
        payload: payload.into(),
        timeout_ms,
        function_arn: "arn:aws:lambda:us-east-1:000000000000:function:echo".into(),
        trace_id: "Root=1-00000000-000000000000000000000000;Sampled=0".into(),
        client_context: None,
        cognito_identity: None,
    })
}

fn result(reply: SessionReply) -> guest_init::function::EventResult {
    match reply {
        SessionReply::Result(result) => result,
        other => panic!("not a result: {other:?}"),
    }
}

#[test]
fn a_runtime_initializes_once_is_restored_and_serves_events_until_it_times_out() {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(unsafe { libc::geteuid() }, 0, "reseeding needs root");
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("session.sock");
    let listener = UnixListener::bind(&socket).unwrap();
    listener.set_nonblocking(true).unwrap();
    let api = Server::bind_to("127.0.0.1:0".parse().unwrap()).unwrap();
    let config = runtime_config();
    std::thread::spawn(move || {
        let signals = Signals::block().unwrap();
        let listener = OwnedFd::from(listener);
        serve_on(&config, &signals, &listener, api).unwrap();
    });
    let mut host = Host(BufReader::new(UnixStream::connect(&socket).unwrap()));

    let init = host.ask(&SessionRequest::WaitInit { timeout_ms: 30_000 });
    let SessionReply::InitDone { phase, init_us } = init else {
        panic!("init: {init:?}");
    };
    assert_eq!(phase, InitPhase::RestoreNext);
    assert!(init_us > 0);

    // An event before the restore waits for the runtime's invocation/next,
    // which comes only after restore/next is released: restore first.
    let restore = SessionRequest::Restore {
        seed: "5a".repeat(SEED_BYTES),
        hostname: None,
    };
    assert_eq!(host.ask(&restore), SessionReply::Restored);
    let bad_seed = SessionRequest::Restore {
        seed: "zz".into(),
        hostname: None,
    };
    assert!(matches!(host.ask(&bad_seed), SessionReply::Refused { .. }));

    let first = result(host.ask(&event("r-1", r#"{"n":1}"#, 10_000)));
    assert_eq!(first.status, EventStatus::Response, "{first:?}");
    let body: serde_json::Value = serde_json::from_str(&first.body).unwrap();
    assert_eq!(body["echo"]["n"], 1);
    assert_eq!(body["request_id"], "r-1");
    assert_eq!(
        (body["count"].as_i64(), body["after_restore"].as_i64()),
        (Some(1), Some(1))
    );
    assert!(first.log.contains("event r-1"), "{:?}", first.log);

    // Warm: the same runtime, its state kept.
    let second = result(host.ask(&event("r-2", "{}", 10_000)));
    let body: serde_json::Value = serde_json::from_str(&second.body).unwrap();
    assert_eq!(
        (body["count"].as_i64(), body["before_snapshot"].as_i64()),
        (Some(2), Some(1))
    );

    let failed = result(host.ask(&event("r-3", r#"{"fail":true}"#, 10_000)));
    assert_eq!(failed.status, EventStatus::Error);
    assert_eq!(failed.error_type.as_deref(), Some("Unhandled"));
    assert!(failed.body.contains("asked to fail"), "{}", failed.body);

    let slow = result(host.ask(&event("r-4", r#"{"sleep":60}"#, 300)));
    assert_eq!(slow.status, EventStatus::Timeout);
    assert!(
        slow.body.contains("Task timed out after 0.30 seconds"),
        "{}",
        slow.body
    );
    let after = host.ask(&event("r-5", "{}", 1000));
    let SessionReply::Refused { error } = after else {
        panic!("an event after a timeout: {after:?}");
    };
    assert!(error.contains("serves no more events"), "{error}");
}
