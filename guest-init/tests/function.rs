//! Function mode's connection handling with real handlers, over a
//! UnixStream pair instead of vsock (a build host has no vsock peer to
//! connect from): `handle_connection` takes any `Read + Write` stream.
//!
//! Handlers reseed the kernel's random pool first (RNDADDENTROPY and
//! RNDRESEEDCRNG need CAP_SYS_ADMIN, so this runs as root; mixing in bytes
//! never lowers the host's entropy). The reaper reaps every child of this
//! process, so the cases run one at a time, under one lock.
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use guest_init::config::RunConfig;
use guest_init::function::FUNCTION_PORT;
use guest_init::function::{Invocation, Outcome, SEED_BYTES};
use guest_init::function_mode::{OUTPUT_MAX, handle_connection, listen, serve};
use guest_init::supervisor::Signals;

static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn require_root() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(euid, 0, "reseeding the random pool needs root: run as root");
}

/// Sends `request` (one line) to a connection served with `config`'s
/// entrypoint as the handler and returns the answer line.
fn exchange(config: &RunConfig, request: &str) -> String {
    let _one = ONE_AT_A_TIME
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let signals = Signals::block().unwrap().fd().unwrap();
    let (mut host, mut guest) = UnixStream::pair().unwrap();
    // The host's side is another thread, so that neither a large request
    // nor a large answer can fill the socket's buffer and stall.
    let request = format!("{request}\n");
    let reader = std::thread::spawn(move || {
        host.write_all(request.as_bytes()).unwrap();
        let mut line = String::new();
        BufReader::new(&mut host).read_line(&mut line).unwrap();
        let mut rest = Vec::new();
        host.read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty(), "one answer line, then the end");
        line
    });
    assert_eq!(handle_connection(&mut guest, config, &signals), None);
    drop(guest);
    let line = reader.join().unwrap();
    assert!(line.ends_with('\n'), "{line:?}");
    line
}

fn seed() -> String {
    let mut bytes = [0u8; SEED_BYTES];
    std::fs::File::open("/dev/urandom")
        .unwrap()
        .read_exact(&mut bytes)
        .unwrap();
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn invoke(script: &str, payload: &str, timeout_ms: u64) -> Outcome {
    let config = RunConfig::new(vec!["/bin/sh".into(), "-c".into(), script.into()]);
    invoke_with(&config, payload, timeout_ms, &seed())
}

fn invoke_with(config: &RunConfig, payload: &str, timeout_ms: u64, seed: &str) -> Outcome {
    let invocation = Invocation {
        payload: payload.into(),
        timeout_ms,
        seed: seed.into(),
        // The tests run on the host: its hostname stays.
        hostname: None,
    };
    let answer = exchange(config, &serde_json::to_string(&invocation).unwrap());
    serde_json::from_str(&answer).unwrap()
}

#[test]
fn a_ping_is_answered_with_a_pong() {
    let config = RunConfig::new(vec!["/nonexistent".into()]);
    assert_eq!(exchange(&config, r#"{"ping": true}"#), "{\"pong\":true}\n");
}

#[test]
fn the_handler_gets_the_payload_on_stdin_and_its_output_comes_back() {
    require_root();
    let outcome = invoke("cat; echo done >&2; exit 3", "{\"a\":1}", 5000);
    assert_eq!(outcome.stdout, "{\"a\":1}");
    assert_eq!(outcome.stderr, "done\n");
    assert_eq!((outcome.status, outcome.timed_out), (3, false));
    assert_eq!(outcome.error, None);
    assert!(outcome.duration_us > 0);
}

#[test]
fn the_handler_runs_with_the_configured_env_and_workdir_in_its_own_group() {
    require_root();
    let mut config = RunConfig::new(vec![
        "/bin/sh".into(),
        "-c".into(),
        "echo $GREETING $(pwd); cut -d' ' -f5 /proc/$$/stat; echo $$".into(),
    ]);
    config.env.insert("GREETING".into(), "hi".into());
    config.workdir = "/tmp".into();
    let outcome = invoke_with(&config, "", 5000, &seed());
    let lines: Vec<&str> = outcome.stdout.lines().collect();
    assert_eq!(lines.first(), Some(&"hi /tmp"), "{outcome:?}");
    // Its own process group: the group id is its pid.
    assert_eq!(lines[1], lines[2], "{outcome:?}");
}

#[test]
fn a_handler_past_its_timeout_is_killed_with_its_group() {
    require_root();
    let started = Instant::now();
    // The background sleep holds stdout open: only killing the group ends it.
    let outcome = invoke("sleep 10 & sleep 10", "", 300);
    assert!(started.elapsed() < Duration::from_secs(5), "{outcome:?}");
    assert!(outcome.timed_out, "{outcome:?}");
    assert_eq!(outcome.status, 128 + libc::SIGKILL);
    assert!(outcome.duration_us >= 300_000, "{outcome:?}");
    assert_eq!(outcome.error, None);
}

#[test]
fn what_a_handler_leaves_behind_does_not_hold_the_answer() {
    require_root();
    let started = Instant::now();
    let outcome = invoke("sleep 10 & echo started", "", 20_000);
    assert!(started.elapsed() < Duration::from_secs(5), "{outcome:?}");
    assert_eq!((outcome.stdout.as_str(), outcome.status), ("started\n", 0));
    assert!(!outcome.timed_out);
}

#[test]
fn output_is_capped_and_a_large_payload_need_not_be_read() {
    require_root();
    let outcome = invoke("head -c 1500000 /dev/zero | tr '\\0' x", "", 10_000);
    assert_eq!(outcome.stdout.len(), OUTPUT_MAX);
    assert!(
        outcome
            .stderr
            .contains("guest-init: stdout truncated to 1048576 bytes (451424 dropped)"),
        "{}",
        outcome.stderr
    );
    // More than a pipe holds, to a handler that never reads it.
    let outcome = invoke("echo ignored", &"p".repeat(1 << 20), 10_000);
    assert_eq!((outcome.stdout.as_str(), outcome.status), ("ignored\n", 0));
    let outcome = invoke("wc -c", &"p".repeat(3 << 20), 10_000);
    assert_eq!(outcome.stdout.trim(), (3 << 20).to_string());
}

#[test]
fn bad_requests_and_missing_handlers_are_errors_not_runs() {
    require_root();
    let config = RunConfig::new(vec!["/bin/sh".into(), "-c".into(), "echo ran".into()]);
    let outcome = invoke_with(&config, "", 1000, "not hex");
    assert!(outcome.error.unwrap().contains("seed"));
    assert_eq!(outcome.stdout, "");
    let answer = exchange(&config, r#"{"payload": 1}"#);
    let outcome: Outcome = serde_json::from_str(&answer).unwrap();
    assert!(
        outcome
            .error
            .unwrap()
            .contains("not an invocation or a ping")
    );
    assert_ne!(outcome.status, 0);
    let missing = RunConfig::new(vec!["/nonexistent/handler".into()]);
    let outcome = invoke_with(&missing, "", 1000, &seed());
    assert_eq!(outcome.status, 127);
    assert!(outcome.error.unwrap().contains("/nonexistent/handler"));
}

#[test]
fn serve_listens_on_the_vsock_port_until_sigterm() {
    let _one = ONE_AT_A_TIME
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let (tid_tx, tid_rx) = std::sync::mpsc::channel();
    let server = std::thread::spawn(move || {
        let signals = Signals::block().unwrap();
        // SAFETY: gettid has no preconditions.
        tid_tx.send(unsafe { libc::gettid() }).unwrap();
        serve(&RunConfig::new(vec!["/bin/true".into()]), &signals)
    });
    let tid = tid_rx.recv().unwrap();
    // To the server's thread only, where it is blocked: as to PID 1.
    let pid = std::process::id() as libc::pid_t;
    // SAFETY: tgkill takes no pointers; `tid` is a live thread of ours.
    let sent = unsafe { libc::tgkill(pid, tid, libc::SIGTERM) };
    assert_eq!(sent, 0);
    // Ok only once it listened (it said it is ready) and took the signal
    // in its loop; an early signal waits, blocked, for that loop.
    let served = server.join().unwrap();
    assert!(
        matches!(served, Ok(status) if status == 128 + libc::SIGTERM as u8),
        "{served:?}: this test needs AF_VSOCK (the vsock module) and port {FUNCTION_PORT} free"
    );
    // It closed its listener on the way out.
    listen(FUNCTION_PORT).expect("the port is free again");
}
