//! A Lambda runtime that ends after its restore, before it takes an
//! event: the host's event is refused at once with the runtime's end,
//! instead of waiting for the event's timeout.
//!
//! Its own `main` (`harness = false`): the serving loop reaps through a
//! signalfd, which sees SIGCHLD only if no thread of the process takes it
//! first, as PID 1's threads never do. So `main` blocks the signals before
//! any thread starts (threads inherit the mask), serves on the main
//! thread, and checks the host side on another; a watchdog ends a hang.
use std::io::{BufRead, BufReader, Write};
use std::os::fd::OwnedFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::process::exit;
use std::time::{Duration, Instant};

use guest_init::config::RunConfig;
use guest_init::function::{Event, SEED_BYTES, SessionReply, SessionRequest};
use guest_init::function_runtime::serve_on;
use guest_init::runtime_api::Server;
use guest_init::supervisor::Signals;

const NAME: &str = "an_event_for_a_runtime_that_ended_after_its_restore_is_refused_at_once";

/// A runtime that waits in `restore/next`, then exits once restored.
const RESTORE_THEN_EXIT: &str = "import os, urllib.request\n\
    api = os.environ['AWS_LAMBDA_RUNTIME_API']\n\
    urllib.request.urlopen(f'http://{api}/2018-06-01/runtime/restore/next').read()\n";

/// How long the whole check may take before it counts as hung.
const WATCHDOG: Duration = Duration::from_secs(60);

fn main() {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(unsafe { libc::geteuid() }, 0, "reseeding needs root");
    let signals = Signals::block().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("session.sock");
    let listener = UnixListener::bind(&socket).unwrap();
    listener.set_nonblocking(true).unwrap();
    let api = Server::bind_to("127.0.0.1:0".parse().unwrap()).unwrap();
    let config: RunConfig = serde_json::from_value(serde_json::json!({
        "entrypoint": ["python3", "-c", RESTORE_THEN_EXIT],
        "env": { "PATH": "/usr/bin:/bin" },
    }))
    .unwrap();
    std::thread::spawn(|| {
        std::thread::sleep(WATCHDOG);
        eprintln!("test {NAME} ... FAILED: no answer within {WATCHDOG:?}");
        exit(1);
    });
    let host = std::thread::spawn(move || check_the_refusal(&socket));
    std::thread::spawn(move || {
        let passed = host.join().is_ok();
        println!("test {NAME} ... {}", if passed { "ok" } else { "FAILED" });
        exit(if passed { 0 } else { 1 });
    });
    serve_on(&config, &signals, &OwnedFd::from(listener), api).unwrap();
}

fn check_the_refusal(socket: &Path) {
    let mut host = BufReader::new(UnixStream::connect(socket).unwrap());
    let init = ask(&mut host, &SessionRequest::WaitInit { timeout_ms: 30_000 });
    assert!(matches!(init, SessionReply::InitDone { .. }), "{init:?}");
    let restore = SessionRequest::Restore {
        seed: "5a".repeat(SEED_BYTES),
        hostname: None,
    };
    assert_eq!(ask(&mut host, &restore), SessionReply::Restored);
    let asked = Instant::now();
    let event = SessionRequest::Event(Event {
        request_id: "r-1".into(),
        payload: "{}".into(),
        timeout_ms: 600_000,
        function_arn: "arn:aws:lambda:us-east-1:000000000000:function:gone".into(),
        trace_id: "Root=1-00000000-000000000000000000000000;Sampled=0".into(),
        client_context: None,
        cognito_identity: None,
    });
    let reply = ask(&mut host, &event);
    let SessionReply::Refused { error } = reply else {
        panic!("an event for an ended runtime: {reply:?}");
    };
    assert!(
        error.contains("the runtime exited with status 0"),
        "{error}"
    );
    assert!(asked.elapsed() < Duration::from_secs(30), "refused at once");
}

fn ask(host: &mut BufReader<UnixStream>, request: &SessionRequest) -> SessionReply {
    let mut line = serde_json::to_vec(request).unwrap();
    line.push(b'\n');
    host.get_mut().write_all(&line).unwrap();
    let mut answer = String::new();
    host.read_line(&mut answer).unwrap();
    serde_json::from_str(&answer).unwrap_or_else(|err| panic!("{answer:?}: {err}"))
}
