//! Function mode: guest-init serves `crate::function`'s protocol instead
//! of running the entrypoint once.
//!
//! [`serve`] listens on AF_VSOCK port [`FUNCTION_PORT`] (any CID) and takes
//! connections one at a time, in a `poll` that also watches the blocked
//! signals ([`SignalFd`]): SIGCHLD reaps orphans, SIGTERM or SIGINT ends
//! function mode so PID 1 shuts the guest down as after an entrypoint.
//! Invocations are served sequentially, on purpose: PID 1 stays a single
//! thread with a single reaper (so no wait can take a handler's status
//! from another), a handler has the guest to itself as in Lambda, and Kiln
//! runs each invocation in a fresh clone anyway; a second connection waits
//! in the listen backlog.
//!
//! [`handle_connection`] takes any `Read + Write` stream: one request line
//! (at most [`REQUEST_MAX`] bytes, within [`REQUEST_TIMEOUT`] on vsock), one
//! answer line, then the stream is closed. For an [`Invocation`] it mixes
//! the seed into the kernel's random pool and forces a CRNG reseed, starts
//! the handler (the entrypoint, as `supervisor::command` starts it) in its
//! own process group with the payload on its stdin, captures at most
//! [`OUTPUT_MAX`] bytes of each of stdout and stderr, SIGKILLs the group
//! at the timeout, and reaps it with `supervisor::reap_all`. Whatever the
//! handler leaves in its group when it exits is killed too.
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::process::{Child, ChildStderr, ChildStdin, ChildStdout, Stdio};
use std::time::{Duration, Instant};

use crate::config::RunConfig;
use crate::function::{
    FUNCTION_CMDLINE_FLAG, FUNCTION_PORT, Invocation, Outcome, Ping, Pong,
    RUNTIME_API_CMDLINE_FLAG, SEED_BYTES,
};
use crate::supervisor::{self, STATUS_NOT_EXECUTABLE, SignalFd, Signals};

/// The longest request line accepted (Lambda's payload limit is 6 MB).
pub const REQUEST_MAX: usize = 8 << 20;
/// How much of each of the handler's stdout and stderr is kept.
pub const OUTPUT_MAX: usize = 1 << 20;
/// How long a vsock peer may take to send its request (or to take each
/// part of the answer).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

// From linux/random.h (libc does not have them).
/// `_IOW('R', 0x03, int[2])`: add entropy (CAP_SYS_ADMIN).
const RNDADDENTROPY: libc::c_ulong = 0x4008_5203;
/// `_IO('R', 0x07)`: reseed the CRNG now (Linux 4.17+, CAP_SYS_ADMIN).
const RNDRESEEDCRNG: libc::c_ulong = 0x5207;

/// Why function mode could not start serving.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The blocked signals could not be taken as a descriptor to poll.
    #[error("cannot take signals")]
    Signals(#[source] io::Error),
    /// The vsock listener could not be set up (no vsock device, or the
    /// port is taken).
    #[error("cannot listen on vsock port {FUNCTION_PORT}")]
    Listen(#[source] io::Error),
    /// The Runtime API's listener could not be set up (no loopback, or
    /// the port is taken).
    #[error("cannot listen on {}", crate::function::RUNTIME_API_ADDRESS)]
    RuntimeApi(#[source] io::Error),
}

/// Why a connection's request was answered with an error instead of a
/// run of the handler: the [`Outcome::error`] it gets, through
/// [`crate::one_line`].
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    /// The peer closed the stream without sending a byte.
    #[error("no request before the end of the stream")]
    NoRequest,
    /// The stream failed, or the peer sent too slowly.
    #[error("cannot read the request")]
    Read(#[source] io::Error),
    /// The request line is longer than the limit.
    #[error("the request is longer than {max} bytes")]
    TooLong {
        /// The limit, in bytes.
        max: usize,
    },
    /// The line is JSON of neither a [`Ping`] nor an [`Invocation`].
    #[error("not an invocation or a ping")]
    NotARequest(#[source] serde_json::Error),
    /// The invocation's seed is not [`SEED_BYTES`] of hex.
    #[error("seed: expected {} hex digits", 2 * SEED_BYTES)]
    Seed,
    /// The kernel refused the seed (guest-init lacks CAP_SYS_ADMIN, or the
    /// ioctls are missing).
    #[error("cannot reseed the kernel's random pool")]
    Reseed(#[source] io::Error),
    /// The invocation's hostname could not be set.
    #[error("cannot set the hostname {name:?}")]
    Hostname {
        /// The hostname asked for.
        name: String,
        /// What the kernel said.
        #[source]
        source: io::Error,
    },
    /// The handler could not be started.
    #[error("cannot start {program}")]
    Spawn {
        /// The entrypoint's program.
        program: String,
        /// Why it did not start.
        #[source]
        source: io::Error,
    },
}

/// Which function mode the kernel command line turns on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// [`FUNCTION_CMDLINE_FLAG`]: the entrypoint is a handler, run afresh
    /// for each invocation ([`serve`]).
    Handler,
    /// [`RUNTIME_API_CMDLINE_FLAG`]: the entrypoint is a Lambda runtime,
    /// started once and served the Runtime API
    /// ([`crate::function_runtime::serve`]).
    RuntimeApi,
}

/// The function mode the kernel command line turns on, if any.
pub fn enabled(cmdline: &str) -> Option<Mode> {
    cmdline.split_whitespace().find_map(|word| match word {
        FUNCTION_CMDLINE_FLAG => Some(Mode::Handler),
        RUNTIME_API_CMDLINE_FLAG => Some(Mode::RuntimeApi),
        _ => None,
    })
}

/// Serves invocations until SIGTERM or SIGINT arrives and returns 128 +
/// that signal; an error only if there is nothing to serve on.
pub fn serve(config: &RunConfig, signals: &Signals) -> Result<u8, ServeError> {
    let signals = signals.fd().map_err(ServeError::Signals)?;
    let listener = listen(FUNCTION_PORT).map_err(ServeError::Listen)?;
    eprintln!("guest-init: function ready on vsock port {FUNCTION_PORT}");
    loop {
        let mut fds = [
            pollfd(signals.as_raw_fd(), libc::POLLIN),
            pollfd(listener.as_raw_fd(), libc::POLLIN),
        ];
        let accepted = poll(&mut fds, -1).and_then(|()| {
            if fds[0].revents != 0 {
                match signals.take() {
                    Some(sig @ (libc::SIGTERM | libc::SIGINT)) => return Ok(Some(sig)),
                    _ => {
                        supervisor::reap_all(0);
                    }
                }
            }
            if fds[1].revents == 0 {
                return Ok(None);
            }
            let mut stream = accept(&listener)?;
            Ok(handle_connection(&mut stream, config, &signals))
        });
        match accepted {
            Ok(Some(sig)) => return Ok(128 + sig as u8),
            Ok(None) => {}
            Err(err) if err.kind() == io::ErrorKind::WouldBlock => {}
            Err(err) => {
                eprintln!("guest-init: function mode: {err}; retrying");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

/// One request, as [`parse_request`] finds it.
#[derive(Debug, PartialEq, Eq)]
pub enum Request {
    /// A [`Ping`]: is guest-init serving? Answered with a [`Pong`].
    Ping,
    /// Run the handler once.
    Invoke(Invocation),
}

/// Answers one connection: reads a request line, answers one line. Returns
/// SIGTERM or SIGINT if one arrived while a handler ran (it was passed on
/// to the handler's group; the answer was still sent).
pub fn handle_connection(
    stream: &mut (impl Read + Write),
    config: &RunConfig,
    signals: &SignalFd,
) -> Option<libc::c_int> {
    let request = read_request(stream, REQUEST_MAX);
    let start = Instant::now();
    let (answer, stop) = match request.and_then(|line| parse_request(&line)) {
        Ok(Request::Ping) => (serde_json::to_vec(&Pong { pong: true }), None),
        Ok(Request::Invoke(invocation)) => {
            let (outcome, stop) = invoke(&invocation, config, signals, start);
            (serde_json::to_vec(&outcome), stop)
        }
        Err(refusal) => (
            serde_json::to_vec(&refused(&refusal, STATUS_NOT_EXECUTABLE, start)),
            None,
        ),
    };
    let mut line = answer.unwrap_or_default();
    line.push(b'\n');
    if let Err(err) = stream.write_all(&line).and_then(|()| stream.flush()) {
        eprintln!("guest-init: function mode: cannot answer: {err}");
    }
    stop
}

/// Reads up to the first newline (or the end of the stream).
pub fn read_request(stream: &mut impl Read, max: usize) -> Result<Vec<u8>, Refusal> {
    let mut line = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    loop {
        let n = match stream.read(&mut chunk) {
            Ok(0) if line.is_empty() => return Err(Refusal::NoRequest),
            Ok(0) => break,
            Ok(n) => n,
            Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
            Err(err) => return Err(Refusal::Read(err)),
        };
        let end = chunk[..n].iter().position(|&b| b == b'\n');
        line.extend_from_slice(&chunk[..end.unwrap_or(n)]);
        if line.len() > max {
            return Err(Refusal::TooLong { max });
        }
        if end.is_some() {
            break;
        }
    }
    Ok(line)
}

/// A ping or an invocation, or why the line is neither.
pub fn parse_request(line: &[u8]) -> Result<Request, Refusal> {
    if serde_json::from_slice::<Ping>(line).is_ok() {
        return Ok(Request::Ping);
    }
    serde_json::from_slice(line)
        .map(Request::Invoke)
        .map_err(Refusal::NotARequest)
}

/// The seed's bytes: exactly [`SEED_BYTES`] of hex, either case.
pub fn decode_seed(hex: &str) -> Result<[u8; SEED_BYTES], Refusal> {
    if hex.len() != 2 * SEED_BYTES {
        return Err(Refusal::Seed);
    }
    let mut seed = [0u8; SEED_BYTES];
    for (byte, pair) in seed.iter_mut().zip(hex.as_bytes().chunks(2)) {
        let digit = |c: u8| (c as char).to_digit(16).ok_or(Refusal::Seed);
        *byte = (digit(pair[0])? * 16 + digit(pair[1])?) as u8;
    }
    Ok(seed)
}

/// The `timeout` argument of `poll(2)` for a wait until `deadline`: -1
/// without one, else the milliseconds left, rounded up (a wake-up before
/// the deadline would only poll again) and clamped to `c_int`.
pub fn poll_timeout(deadline: Option<Instant>, now: Instant) -> libc::c_int {
    deadline.map_or(-1, |deadline| {
        let left = deadline.saturating_duration_since(now).as_micros();
        libc::c_int::try_from(left.div_ceil(1000)).unwrap_or(libc::c_int::MAX)
    })
}

/// At most `max` bytes of a stream, and how many more were dropped.
#[derive(Debug, Default)]
pub struct Capture {
    /// The first bytes, at most `max` of them.
    pub data: Vec<u8>,
    /// How many bytes came after those and were not kept.
    pub dropped: u64,
    /// The most `data` holds.
    pub max: usize,
}

impl Capture {
    /// An empty capture that keeps at most `max` bytes.
    pub fn new(max: usize) -> Self {
        Capture {
            max,
            ..Capture::default()
        }
    }

    /// Keeps what of `bytes` fits and counts the rest as dropped.
    pub fn push(&mut self, bytes: &[u8]) {
        let keep = bytes.len().min(self.max.saturating_sub(self.data.len()));
        self.data.extend_from_slice(&bytes[..keep]);
        self.dropped += (bytes.len() - keep) as u64;
    }
}

/// The outcome's stdout and stderr: the captured bytes (invalid UTF-8
/// replaced), with a line at the end of stderr for each stream truncated.
pub fn output_text(stdout: &Capture, stderr: &Capture) -> (String, String) {
    let mut err = String::from_utf8_lossy(&stderr.data).into_owned();
    for (name, capture) in [("stdout", stdout), ("stderr", stderr)] {
        if capture.dropped > 0 {
            if !err.is_empty() && !err.ends_with('\n') {
                err.push('\n');
            }
            err += &format!(
                "guest-init: {name} truncated to {} bytes ({} dropped)\n",
                capture.max, capture.dropped
            );
        }
    }
    (String::from_utf8_lossy(&stdout.data).into_owned(), err)
}

fn refused(refusal: &Refusal, status: u8, start: Instant) -> Outcome {
    Outcome {
        status: status.into(),
        error: Some(crate::one_line(refusal)),
        duration_us: micros_since(start),
        ..Outcome::default()
    }
}

fn micros_since(start: Instant) -> u64 {
    u64::try_from(start.elapsed().as_micros()).unwrap_or(u64::MAX)
}

/// What makes a restored clone a machine of its own: `seed` (hex) mixed
/// into the kernel's random pool with a forced reseed, and its own
/// `hostname` when given.
pub fn become_clone(seed: &str, hostname: Option<&str>) -> Result<(), Refusal> {
    let seed = decode_seed(seed)?;
    reseed(&seed).map_err(Refusal::Reseed)?;
    match hostname {
        Some(name) => crate::network::set_hostname(name).map_err(|source| Refusal::Hostname {
            name: name.to_string(),
            source,
        }),
        None => Ok(()),
    }
}

/// Reseeds, runs the handler once and says what it did.
fn invoke(
    invocation: &Invocation,
    config: &RunConfig,
    signals: &SignalFd,
    start: Instant,
) -> (Outcome, Option<libc::c_int>) {
    if let Err(refusal) = become_clone(&invocation.seed, invocation.hostname.as_deref()) {
        return (refused(&refusal, STATUS_NOT_EXECUTABLE, start), None);
    }
    let child = match spawn_handler(config, start) {
        Ok(child) => child,
        Err(outcome) => return (outcome, None),
    };
    let mut run = HandlerRun::new(child, invocation);
    let status = run.wait(signals);
    run.finish(status, start)
}

/// Starts the handler in its own process group with piped stdio, or the
/// outcome that says why it could not start.
fn spawn_handler(config: &RunConfig, start: Instant) -> Result<Child, Outcome> {
    let mut command = supervisor::command(config);
    command
        .process_group(0)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    command.spawn().map_err(|source| {
        let status = supervisor::spawn_failure_status(&source);
        let refusal = Refusal::Spawn {
            program: config.entrypoint[0].clone(),
            source,
        };
        refused(&refusal, status, start)
    })
}

/// A descriptor readable once the process `pid` has exited, without a
/// SIGCHLD (which a test's other threads could take); `None` before Linux
/// 5.3, where SIGCHLD on the signal descriptor is the wake-up.
fn open_pidfd(pid: libc::pid_t) -> Option<OwnedFd> {
    // SAFETY: pidfd_open takes no pointers.
    let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    // SAFETY: a non-negative result is a fresh descriptor nothing else owns.
    (pidfd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(pidfd as RawFd) })
}

/// Makes our own pipe end `fd` non-blocking.
fn set_nonblocking(fd: RawFd) {
    // SAFETY: fcntl on our own pipe end; O_NONBLOCK is the only flag
    // F_SETFL changes here (the access mode is ignored).
    unsafe { libc::fcntl(fd, libc::F_SETFL, libc::O_NONBLOCK) };
}

/// A running handler, as the poll loop sees it: its payload still to
/// feed, its output captured so far, its deadline and the stop signal.
struct HandlerRun<'a> {
    /// The handler's pid, also its process group's id.
    pid: libc::pid_t,
    pidfd: Option<OwnedFd>,
    /// The handler's stdin until the payload is written (none for an
    /// empty payload).
    stdin: Option<ChildStdin>,
    stdout: Option<ChildStdout>,
    stderr: Option<ChildStderr>,
    payload: &'a [u8],
    /// How much of `payload` is written.
    written: usize,
    out: Capture,
    err: Capture,
    deadline: Option<Instant>,
    timed_out: bool,
    /// The SIGTERM or SIGINT passed on to the handler's group, if any.
    stop: Option<libc::c_int>,
}

impl<'a> HandlerRun<'a> {
    /// Takes the spawned handler's pipes (non-blocking) and starts its
    /// timeout.
    fn new(mut child: Child, invocation: &'a Invocation) -> Self {
        let pid = child.id() as libc::pid_t;
        let pidfd = open_pidfd(pid);
        let stdin = child
            .stdin
            .take()
            .filter(|_| !invocation.payload.is_empty());
        let stdout = child.stdout.take();
        let stderr = child.stderr.take();
        for fd in [raw(&stdin), raw(&stdout), raw(&stderr)]
            .into_iter()
            .filter(|&fd| fd >= 0)
        {
            set_nonblocking(fd);
        }
        HandlerRun {
            pid,
            pidfd,
            stdin,
            stdout,
            stderr,
            payload: invocation.payload.as_bytes(),
            written: 0,
            out: Capture::new(OUTPUT_MAX),
            err: Capture::new(OUTPUT_MAX),
            deadline: Instant::now().checked_add(Duration::from_millis(invocation.timeout_ms)),
            timed_out: false,
            stop: None,
        }
    }

    /// Feeds stdin and drains stdout and stderr until the handler is
    /// reaped; its exit status.
    fn wait(&mut self, signals: &SignalFd) -> u8 {
        loop {
            if let Some(status) = supervisor::reap_all(self.pid) {
                return status;
            }
            let wait = self.enforce_deadline(Instant::now());
            // The pidfd is polled only to wake up: the next turn reaps.
            let mut fds = [
                pollfd(signals.as_raw_fd(), libc::POLLIN),
                pollfd(raw(&self.pidfd), libc::POLLIN),
                pollfd(raw(&self.stdin), libc::POLLOUT),
                pollfd(raw(&self.stdout), libc::POLLIN),
                pollfd(raw(&self.stderr), libc::POLLIN),
            ];
            if poll(&mut fds, wait).is_err() {
                continue;
            }
            if fds[0].revents != 0 {
                self.pass_on_stop(signals);
            }
            if fds[2].revents != 0 {
                self.feed_stdin();
            }
            if fds[3].revents != 0 {
                fill(&mut self.stdout, &mut self.out);
            }
            if fds[4].revents != 0 {
                fill(&mut self.stderr, &mut self.err);
            }
        }
    }

    /// SIGKILLs the group once the deadline has passed; the `poll` timeout
    /// for now (none after the kill: only the handler's exit is left).
    fn enforce_deadline(&mut self, now: Instant) -> libc::c_int {
        if !self.timed_out && self.deadline.is_some_and(|deadline| now >= deadline) {
            kill_group(self.pid, libc::SIGKILL);
            self.timed_out = true;
        }
        if self.timed_out {
            -1
        } else {
            poll_timeout(self.deadline, now)
        }
    }

    /// Takes a pending signal; SIGTERM or SIGINT is passed on to the
    /// handler's group and remembered.
    fn pass_on_stop(&mut self, signals: &SignalFd) {
        if let Some(sig @ (libc::SIGTERM | libc::SIGINT)) = signals.take() {
            kill_group(self.pid, sig);
            self.stop = Some(sig);
        }
    }

    /// Writes what of the payload the pipe takes; closes stdin once all of
    /// it is written.
    fn feed_stdin(&mut self) {
        let Some(pipe) = &mut self.stdin else { return };
        match pipe.write(&self.payload[self.written..]) {
            Ok(n) => self.written += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            // EPIPE: the handler does not read its stdin.
            Err(_) => self.written = self.payload.len(),
        }
        if self.written == self.payload.len() {
            self.stdin = None;
        }
    }

    /// Kills what the reaped handler left, drains its pipes and says what
    /// it did, with the stop signal passed on (if any).
    fn finish(mut self, status: u8, start: Instant) -> (Outcome, Option<libc::c_int>) {
        // The handler is reaped; what it left in its group still holds its
        // group id (a process group's id is not reused while it has members),
        // so this reaches only those.
        kill_group(self.pid, libc::SIGKILL);
        while fill(&mut self.stdout, &mut self.out) {}
        while fill(&mut self.stderr, &mut self.err) {}
        let status = if self.timed_out {
            128 + libc::SIGKILL as u8
        } else {
            status
        };
        let (stdout, stderr) = output_text(&self.out, &self.err);
        let outcome = Outcome {
            status: status.into(),
            stdout,
            stderr,
            timed_out: self.timed_out,
            duration_us: micros_since(start),
            error: None,
        };
        (outcome, self.stop)
    }
}

/// Reads once from a non-blocking pipe into `capture`; true if it gave
/// data. At its end (or on an error) the pipe is closed and dropped.
fn fill(pipe: &mut Option<impl Read>, capture: &mut Capture) -> bool {
    let Some(open) = pipe else { return false };
    let mut chunk = [0u8; 16 * 1024];
    match open.read(&mut chunk) {
        Ok(n) if n > 0 => {
            capture.push(&chunk[..n]);
            return true;
        }
        Err(err)
            if matches!(
                err.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
            ) =>
        {
            return false;
        }
        _ => *pipe = None,
    }
    false
}

fn raw(fd: &Option<impl AsRawFd>) -> RawFd {
    fd.as_ref().map_or(-1, AsRawFd::as_raw_fd)
}

pub(crate) fn kill_group(pgid: libc::pid_t, sig: libc::c_int) {
    // SAFETY: kill takes no pointers; a group that is gone makes it fail
    // harmlessly with ESRCH.
    unsafe { libc::kill(-pgid, sig) };
}

pub(crate) fn pollfd(fd: RawFd, events: libc::c_short) -> libc::pollfd {
    libc::pollfd {
        fd,
        events,
        revents: 0,
    }
}

pub(crate) fn poll(fds: &mut [libc::pollfd], timeout: libc::c_int) -> io::Result<()> {
    // SAFETY: the pointer and length describe `fds`, which lives across the
    // call; the kernel writes only their `revents`.
    check(unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout) })
}

fn check(rc: libc::c_int) -> io::Result<()> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// struct rand_pool_info, with its flexible `__u32 buf[]` as bytes.
#[repr(C)]
struct RandPoolInfo {
    entropy_count: libc::c_int,
    buf_size: libc::c_int,
    buf: [u8; SEED_BYTES],
}

/// Mixes `seed` into the kernel's pool (credited: it is the host's fresh
/// randomness) and makes the CRNG reseed from it now, so that clones of
/// one snapshot part ways before the handler draws any randomness.
fn reseed(seed: &[u8; SEED_BYTES]) -> io::Result<()> {
    let urandom = File::open("/dev/urandom")?;
    let info = RandPoolInfo {
        entropy_count: (SEED_BYTES * 8) as libc::c_int,
        buf_size: SEED_BYTES as libc::c_int,
        buf: *seed,
    };
    // SAFETY: RNDADDENTROPY reads a rand_pool_info and `buf_size` bytes of
    // buffer after its header: `info` is that, and lives across the call.
    check(unsafe { libc::ioctl(urandom.as_raw_fd(), RNDADDENTROPY, &info) })?;
    // SAFETY: RNDRESEEDCRNG takes no argument.
    check(unsafe { libc::ioctl(urandom.as_raw_fd(), RNDRESEEDCRNG) })
}

/// A non-blocking AF_VSOCK stream socket listening on `port` of any CID.
pub fn listen(port: u32) -> io::Result<OwnedFd> {
    let kind = libc::SOCK_STREAM | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK;
    // SAFETY: socket takes no pointers.
    let fd = unsafe { libc::socket(libc::AF_VSOCK, kind, 0) };
    check(fd)?;
    // SAFETY: `fd` is a fresh descriptor that nothing else owns.
    let socket = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: sockaddr_vm is plain data; all zeroes is a valid value.
    let mut addr: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
    addr.svm_family = libc::AF_VSOCK as libc::sa_family_t;
    addr.svm_port = port;
    addr.svm_cid = libc::VMADDR_CID_ANY;
    let len = std::mem::size_of_val(&addr) as libc::socklen_t;
    // SAFETY: the pointer and length describe `addr`, which lives across
    // the call and which the kernel only reads.
    check(unsafe { libc::bind(fd, (&raw const addr).cast(), len) })?;
    // SAFETY: listen takes no pointers.
    check(unsafe { libc::listen(fd, 16) })?;
    Ok(socket)
}

/// The next connection, blocking, with [`REQUEST_TIMEOUT`] on its reads
/// and writes. It is handed on as a `UnixStream`: its methods here (read,
/// write, SO_RCVTIMEO/SO_SNDTIMEO) are those of any stream socket.
pub(crate) fn accept(listener: &OwnedFd) -> io::Result<UnixStream> {
    let null = std::ptr::null_mut();
    // SAFETY: null address pointers are allowed (the peer's address is not
    // asked for).
    let fd = unsafe { libc::accept4(listener.as_raw_fd(), null, null.cast(), libc::SOCK_CLOEXEC) };
    check(fd)?;
    // SAFETY: `fd` is a fresh descriptor that nothing else owns.
    let stream = UnixStream::from(unsafe { OwnedFd::from_raw_fd(fd) });
    stream.set_read_timeout(Some(REQUEST_TIMEOUT))?;
    stream.set_write_timeout(Some(REQUEST_TIMEOUT))?;
    Ok(stream)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_flag_is_one_word_of_the_command_line() {
        let mode = |cmdline| enabled(cmdline);
        assert_eq!(
            mode("console=ttyS0 kiln.vmm=1 kiln.function=1 quiet\n"),
            Some(Mode::Handler)
        );
        assert_eq!(
            mode("kiln.vmm=1 kiln.function=runtime-api"),
            Some(Mode::RuntimeApi)
        );
        assert_eq!(mode("console=ttyS0 kiln.vmm=1"), None);
        assert_eq!(mode("kiln.function=10 kiln.function=0"), None);
    }

    #[test]
    fn seeds_are_exactly_32_bytes_of_hex() {
        let seed = decode_seed(&"0fA0".repeat(SEED_BYTES / 2)).unwrap();
        assert_eq!(&seed[..4], &[0x0f, 0xa0, 0x0f, 0xa0]);
        for bad in [
            String::new(),
            "00".repeat(SEED_BYTES - 1),
            "00".repeat(SEED_BYTES + 1),
            format!("{}zz", "00".repeat(SEED_BYTES - 1)),
            format!("{}+1", "00".repeat(SEED_BYTES - 1)),
            format!("{}é", "0".repeat(2 * SEED_BYTES - 2)),
        ] {
            let err = decode_seed(&bad).unwrap_err().to_string();
            assert!(err.contains("64 hex digits"), "{bad:?}: {err}");
        }
    }

    #[test]
    fn requests_are_pings_or_invocations() {
        assert!(matches!(
            parse_request(br#"{"ping":true}"#),
            Ok(Request::Ping)
        ));
        let line = br#"{"payload":"hi","timeout_ms":5,"seed":"ab"} "#;
        let Ok(Request::Invoke(invocation)) = parse_request(line) else {
            panic!("not an invocation");
        };
        assert_eq!(
            (invocation.payload.as_str(), invocation.timeout_ms),
            ("hi", 5)
        );
        for bad in [
            &br#"{"payload":"hi"}"#[..],
            b"{",
            b"",
            br#"{"ping":true,"x":1}"#,
        ] {
            let err = parse_request(bad).unwrap_err().to_string();
            assert!(err.starts_with("not an invocation or a ping"), "{err}");
        }
    }

    #[test]
    fn a_request_is_one_line_within_the_limit() {
        let read = |bytes: &[u8], max| read_request(&mut &*bytes, max);
        assert_eq!(read(b"{}\nrest", 10).unwrap(), b"{}");
        assert_eq!(read(b"{} at the end", 20).unwrap(), b"{} at the end");
        assert_eq!(read(b"0123456789\n", 10).unwrap(), b"0123456789");
        assert!(
            read(b"0123456789A\n", 10)
                .unwrap_err()
                .to_string()
                .contains("longer than 10")
        );
        assert!(
            read(b"", 10)
                .unwrap_err()
                .to_string()
                .contains("no request")
        );
        // Longer than one read, with the newline in a later chunk.
        let long = [vec![b'x'; 40_000], b"\ny".to_vec()].concat();
        assert_eq!(read(&long, REQUEST_MAX).unwrap().len(), 40_000);
        assert!(read(&long, 39_999).is_err());
    }

    #[test]
    fn output_is_capped_and_truncation_is_said_on_stderr() {
        let mut out = Capture::new(4);
        out.push(b"abc");
        out.push(b"def");
        out.push(b"g");
        assert_eq!((out.data.as_slice(), out.dropped), (&b"abcd"[..], 3));
        let mut err = Capture::new(4);
        err.push(b"oops");
        let (stdout, stderr) = output_text(&out, &err);
        assert_eq!(stdout, "abcd");
        assert_eq!(
            stderr,
            "oops\nguest-init: stdout truncated to 4 bytes (3 dropped)\n"
        );
        let fine = Capture::new(4);
        assert_eq!(output_text(&fine, &fine), (String::new(), String::new()));
        let mut bad = Capture::new(8);
        bad.push(&[b'a', 0xff]);
        assert_eq!(output_text(&bad, &fine).0, "a\u{fffd}");
    }

    #[test]
    fn poll_waits_round_up_to_the_deadline_and_clamp() {
        let now = Instant::now();
        assert_eq!(poll_timeout(None, now), -1);
        assert_eq!(poll_timeout(Some(now), now), 0);
        assert_eq!(poll_timeout(Some(now + Duration::from_micros(1)), now), 1);
        assert_eq!(
            poll_timeout(Some(now + Duration::from_millis(1500)), now),
            1500
        );
        assert_eq!(poll_timeout(Some(now), now + Duration::from_secs(1)), 0);
        let far = now + Duration::from_secs(100 * 86_400 * 365);
        assert_eq!(poll_timeout(Some(far), now), libc::c_int::MAX);
        // The largest timeout is a deadline too (or none: never a panic).
        let latest = now.checked_add(Duration::from_millis(u64::MAX));
        assert!(poll_timeout(latest, now) == libc::c_int::MAX || latest.is_none());
    }
}
