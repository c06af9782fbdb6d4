//! Timing a child process to an event in its output, and a watchdog so
//! that a VM which never gets there fails the run instead of hanging it.
use std::io::{BufRead, BufReader, Read};
use std::process::{Child, ChildStdout, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::BenchError;

/// Sends `SIGKILL` to process `pid` unless [`finish`](Self::finish) comes
/// within `limit`.
pub struct Watchdog {
    finished: mpsc::Sender<()>,
    thread: JoinHandle<bool>,
}

impl Watchdog {
    /// Watches the child `pid`, which must not be reaped before
    /// [`finish`](Self::finish): until then the pid is still its own.
    pub fn start(pid: u32, limit: Duration) -> Watchdog {
        let (finished, watch) = mpsc::channel::<()>();
        let thread = std::thread::spawn(move || {
            let expired = watch.recv_timeout(limit) == Err(mpsc::RecvTimeoutError::Timeout);
            if expired {
                signal(pid, libc::SIGKILL);
            }
            expired
        });
        Watchdog { finished, thread }
    }

    /// Call before reaping the child; true when it was killed.
    pub fn finish(self) -> bool {
        let _ = self.finished.send(());
        self.thread.join().unwrap_or(true)
    }
}

/// Sends `signal` to the unreaped child `pid`.
pub fn signal(pid: u32, signal: i32) {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return;
    };
    // SAFETY: kill(2) touches no memory of ours; the pid is an unreaped
    // child's, so it names no other process.
    unsafe {
        libc::kill(pid, signal);
    }
}

/// A child whose stdout (its serial console, for a VMM) is read here,
/// under a [`Watchdog`].
pub struct Watched {
    /// The child, to be reaped after [`Watchdog::finish`].
    pub child: Child,
    /// Kills it past the limit.
    pub watchdog: Watchdog,
    /// Its stdout.
    pub stdout: BufReader<ChildStdout>,
}

/// Spawns `cmd` with stdin from /dev/null and stdout piped (stderr as
/// `cmd` says), watched for `limit`.
pub fn spawn_watched(mut cmd: Command, what: &str, limit: Duration) -> Result<Watched, BenchError> {
    cmd.stdin(Stdio::null()).stdout(Stdio::piped());
    let mut child = cmd.spawn().map_err(|source| BenchError::Spawn {
        what: what.into(),
        source,
    })?;
    let watchdog = Watchdog::start(child.id(), limit);
    let stdout = BufReader::new(child.stdout.take().expect("piped"));
    Ok(Watched {
        child,
        watchdog,
        stdout,
    })
}

/// Which output of the child the event shows in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stream {
    /// The child's standard output.
    Stdout,
    /// The child's standard error.
    Stderr,
}

/// What happens to the child once the event has been seen.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Then {
    /// It is stopped with `SIGTERM`: a VM that would run on.
    Terminate,
    /// It is killed (`SIGKILL`) and its exit is waited for by a thread of
    /// its own, as a function's clone ends
    /// (`kiln_control::functions::clone_vm`): the run is over at once,
    /// without waiting for KVM to tear the VM down.
    Kill,
    /// It runs to its end, which must be a success.
    Succeed,
}

/// The event: the first line starting with a prefix, or the first byte.
#[derive(Clone, Copy, Debug)]
pub enum Event<'a> {
    /// A whole line that starts with this prefix (`kiln run --timing`'s
    /// `boot-to-init:`).
    LineStarting(&'a str),
    /// Any byte at all (the first of a function's response, or of QEMU's
    /// debug console).
    FirstByte,
}

/// A timed run of one child.
#[derive(Debug)]
pub struct Timed {
    /// From just before the spawn to the event.
    pub elapsed: Duration,
    /// Everything the child printed, stdout then stderr.
    pub printed: String,
}

/// Spawns `cmd` and times it from just before the spawn (the process's
/// exec) to `event` on `stream`; then, `then`. The run fails when the
/// child ends without the event, fails when it should succeed, or is
/// still running after `limit` (it is killed).
pub fn time_to(
    cmd: Command,
    what: &str,
    stream: Stream,
    event: Event<'_>,
    then: Then,
    limit: Duration,
) -> Result<Timed, BenchError> {
    time_to_and(cmd, what, stream, event, then, limit, |_| {})
}

/// [`time_to`], calling `at_event` with the child's pid once the event
/// has been seen and its time taken, before `then` (to look at the
/// running child: its memory, say).
pub fn time_to_and(
    cmd: Command,
    what: &str,
    stream: Stream,
    event: Event<'_>,
    then: Then,
    limit: Duration,
    at_event: impl FnOnce(u32),
) -> Result<Timed, BenchError> {
    let timing = Timing {
        what,
        stream,
        event,
        then,
        limit,
    };
    let mut running = timing.spawn(cmd)?;
    let elapsed = running.wait_for(event);
    if let Some(elapsed) = elapsed {
        let pid = running.child.id();
        at_event(pid);
        match then {
            Then::Terminate => signal(pid, libc::SIGTERM),
            Then::Kill => return Ok(running.kill(elapsed)),
            Then::Succeed => {}
        }
    }
    let ended = running.end(stream);
    timing.verdict(ended, elapsed)
}

/// What [`time_to_and`] was asked: its arguments but the command and
/// the callback.
struct Timing<'a> {
    what: &'a str,
    stream: Stream,
    event: Event<'a>,
    then: Then,
    limit: Duration,
}

/// A child spawned by [`Timing::spawn`], its clock running.
struct Running {
    /// Just before the spawn: the timer's zero.
    started: Instant,
    child: Child,
    watchdog: Watchdog,
    /// The stream the event shows in.
    watched: BufReader<Pipe>,
    /// What has been read of `watched`.
    seen: Vec<u8>,
    /// Reads the other stream to its end.
    other: JoinHandle<Vec<u8>>,
}

/// How a timed child ended.
struct Ended {
    /// Its exit, or why it could not be waited for.
    status: std::io::Result<ExitStatus>,
    /// Whether the watchdog killed it.
    killed: bool,
    /// Everything it printed, stdout then stderr.
    printed: String,
}

impl Timing<'_> {
    /// Spawns `cmd`, its stdin /dev/null, its stdout and stderr piped,
    /// with the clock started just before and the watchdog just after.
    fn spawn(&self, mut cmd: Command) -> Result<Running, BenchError> {
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let started = Instant::now();
        let mut child = cmd.spawn().map_err(|source| self.cannot_start(source))?;
        let watchdog = Watchdog::start(child.id(), self.limit);
        let (watched, other) = pipes(&mut child, self.stream);
        let other = std::thread::spawn(move || read_all(other));
        Ok(Running {
            started,
            child,
            watchdog,
            watched: BufReader::new(watched),
            seen: Vec::new(),
            other,
        })
    }

    /// The run's result: its time to the event (`elapsed`), unless the
    /// child could not be waited for, was killed at the limit, ended
    /// without the event, or failed when it should have succeeded.
    fn verdict(&self, ended: Ended, elapsed: Option<Duration>) -> Result<Timed, BenchError> {
        let Ended {
            status,
            killed,
            printed,
        } = ended;
        let status = status.map_err(|source| self.cannot_start(source))?;
        if killed {
            return Err(BenchError::Timeout {
                what: self.what.to_string(),
                limit: self.limit,
                printed,
            });
        }
        let Some(elapsed) = elapsed else {
            return Err(BenchError::NoEvent {
                what: self.what.to_string(),
                event: describe(self.event),
                status: status_text(status),
                printed,
            });
        };
        if self.then == Then::Succeed && !status.success() {
            return Err(BenchError::Failed {
                what: self.what.to_string(),
                status: status_text(status),
                printed,
            });
        }
        Ok(Timed { elapsed, printed })
    }

    /// The child could not be spawned, or waited for.
    fn cannot_start(&self, source: std::io::Error) -> BenchError {
        BenchError::Spawn {
            what: self.what.to_string(),
            source,
        }
    }
}

impl Running {
    /// Reads until `event`: its time since the spawn, `None` when the
    /// watched stream ended first.
    fn wait_for(&mut self, event: Event<'_>) -> Option<Duration> {
        wait_for(&mut self.watched, &mut self.seen, event, self.started)
    }

    /// [`Then::Kill`]: the child is killed and reaped by a thread of its
    /// own; the run is over at once, with what was seen up to the event.
    fn kill(self, elapsed: Duration) -> Timed {
        let Running {
            mut child,
            watchdog,
            seen,
            other,
            ..
        } = self;
        signal(child.id(), libc::SIGKILL);
        // Killed, it is under no limit any more.
        watchdog.finish();
        std::thread::spawn(move || (child.wait(), other.join()));
        let printed = String::from_utf8_lossy(&seen).trim().to_string();
        Timed { elapsed, printed }
    }

    /// Reads `watched` (`stream`) to its end and reaps the child.
    fn end(mut self, stream: Stream) -> Ended {
        let _ = self.watched.read_to_end(&mut self.seen);
        let status = self.child.wait();
        let killed = self.watchdog.finish();
        let other = self.other.join().unwrap_or_default();
        let printed = match stream {
            Stream::Stdout => [self.seen, other],
            Stream::Stderr => [other, self.seen],
        }
        .map(|bytes| String::from_utf8_lossy(&bytes).trim().to_string())
        .join(" | ");
        Ended {
            status,
            killed,
            printed,
        }
    }
}

type Pipe = Box<dyn Read + Send>;

/// The watched pipe and the other one.
fn pipes(child: &mut Child, stream: Stream) -> (Pipe, Pipe) {
    let stdout: Pipe = match child.stdout.take() {
        Some(out) => Box::new(out),
        None => Box::new(std::io::empty()),
    };
    let stderr: Pipe = match child.stderr.take() {
        Some(err) => Box::new(err),
        None => Box::new(std::io::empty()),
    };
    match stream {
        Stream::Stdout => (stdout, stderr),
        Stream::Stderr => (stderr, stdout),
    }
}

fn read_all(mut pipe: Pipe) -> Vec<u8> {
    let mut bytes = Vec::new();
    let _ = pipe.read_to_end(&mut bytes);
    bytes
}

/// Reads until `event`, keeping what was read in `seen`; the time since
/// `started` when it came, `None` at the end of the stream.
fn wait_for(
    pipe: &mut impl BufRead,
    seen: &mut Vec<u8>,
    event: Event<'_>,
    started: Instant,
) -> Option<Duration> {
    match event {
        Event::FirstByte => {
            let mut byte = [0u8];
            match pipe.read(&mut byte) {
                Ok(1) => {
                    let at = started.elapsed();
                    seen.push(byte[0]);
                    Some(at)
                }
                _ => None,
            }
        }
        Event::LineStarting(prefix) => loop {
            let from = seen.len();
            match pipe.read_until(b'\n', seen) {
                Ok(0) | Err(_) => return None,
                Ok(_) if seen[from..].starts_with(prefix.as_bytes()) => {
                    return Some(started.elapsed());
                }
                Ok(_) => {}
            }
        },
    }
}

fn describe(event: Event<'_>) -> String {
    match event {
        Event::LineStarting(prefix) => format!("a line starting {prefix:?}"),
        Event::FirstByte => "any output".into(),
    }
}

fn status_text(status: ExitStatus) -> String {
    status.to_string()
}

/// A child run to its end, with what the kernel accounted to it.
#[derive(Clone, Copy, Debug)]
pub struct Exited {
    /// From just before the spawn to its exit ([`run_to_exit`]), or
    /// from the `started` [`wait_to_exit`] was given.
    pub wall: Duration,
    /// User plus system CPU time (`wait4`'s rusage).
    pub cpu: Duration,
    /// Peak resident set size, in KiB (`ru_maxrss`).
    pub max_rss_kib: u64,
    /// Its exit code; `None` when a signal ended it.
    pub code: Option<i32>,
}

/// Spawns `cmd` (stdin from /dev/null, stdout and stderr into `output`)
/// and waits for its end with `wait4`, whose rusage `std` does not give;
/// killed (and a [`BenchError::Timeout`]) past `limit`. Any exit status
/// is returned: what counts as success is the caller's to say.
pub fn run_to_exit(
    mut cmd: Command,
    what: &str,
    output: &std::path::Path,
    limit: Duration,
) -> Result<Exited, BenchError> {
    let io = |source| BenchError::Io {
        path: output.to_path_buf(),
        source,
    };
    let out = std::fs::File::create(output).map_err(io)?;
    let err = out.try_clone().map_err(io)?;
    cmd.stdin(Stdio::null()).stdout(out).stderr(err);
    let spawn_err = |source| BenchError::Spawn {
        what: what.to_string(),
        source,
    };
    let started = Instant::now();
    // The Child is never waited for by std: `reap` does it.
    let pid = cmd.spawn().map_err(spawn_err)?.id();
    let watchdog = Watchdog::start(pid, limit);
    wait_to_exit(pid, watchdog, started, what, limit, output)
}

/// What a run printed into the file `output`, trimmed; nothing when it
/// cannot be read.
pub fn printed(output: &std::path::Path) -> String {
    std::fs::read_to_string(output)
        .unwrap_or_default()
        .trim()
        .to_string()
}

/// Waits for the end of the child `pid`, which `watchdog` watches and
/// nothing has reaped, then reaps it with `wait4`: its [`Exited`], whose
/// wall time runs from `started` to the end. A [`BenchError::Timeout`]
/// (with what it wrote into `output`) when the watchdog killed it; any
/// exit status is returned, as [`run_to_exit`] does.
pub fn wait_to_exit(
    pid: u32,
    watchdog: Watchdog,
    started: Instant,
    what: &str,
    limit: Duration,
    output: &std::path::Path,
) -> Result<Exited, BenchError> {
    let ended = wait_exited(pid);
    let wall = started.elapsed();
    let killed = watchdog.finish();
    let (status, usage) = ended
        .and_then(|()| reap(pid))
        .map_err(|source| BenchError::Spawn {
            what: what.to_string(),
            source,
        })?;
    if killed {
        return Err(BenchError::Timeout {
            what: what.to_string(),
            limit,
            printed: printed(output),
        });
    }
    let time = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    Ok(Exited {
        wall,
        cpu: time(usage.ru_utime) + time(usage.ru_stime),
        max_rss_kib: usage.ru_maxrss as u64,
        code: libc::WIFEXITED(status).then(|| libc::WEXITSTATUS(status)),
    })
}

/// Waits until child `pid` has ended, leaving it unreaped (`WNOWAIT`): its
/// pid stays its own for the watchdog until [`reap`].
fn wait_exited(pid: u32) -> std::io::Result<()> {
    loop {
        // SAFETY: an all-zero siginfo_t is a valid value of the plain C
        // struct, which waitid only writes.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: waitid writes only the siginfo_t passed by reference.
        let r = unsafe { libc::waitid(libc::P_PID, pid, &mut info, libc::WEXITED | libc::WNOWAIT) };
        match r {
            0 => return Ok(()),
            _ if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted => {}
            _ => return Err(std::io::Error::last_os_error()),
        }
    }
}

/// Reaps the ended child `pid`: its wait status and resource usage.
fn reap(pid: u32) -> std::io::Result<(i32, libc::rusage)> {
    let mut status = 0;
    // SAFETY: an all-zero rusage is a valid value of the plain C struct,
    // which wait4 only writes.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: wait4 writes only the status and rusage passed by reference;
    // `pid` is our ended, unreaped child.
    let r = unsafe { libc::wait4(pid as libc::pid_t, &mut status, 0, &mut usage) };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok((status, usage))
}

/// Milliseconds, as the reports count.
pub fn millis(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `sh -c SCRIPT`, timed to `event` on `stream`, within 20 s.
    fn sh(script: &str, stream: Stream, event: Event<'_>, then: Then) -> Result<Timed, BenchError> {
        let mut cmd = Command::new("sh");
        cmd.args(["-c", script]);
        time_to(
            cmd,
            "the script",
            stream,
            event,
            then,
            Duration::from_secs(20),
        )
    }

    #[test]
    fn a_line_on_stderr_stops_the_timer_and_the_rest_is_kept() {
        let script =
            "echo out; echo noise >&2; sleep 0.2; echo 'boot-to-init: 5 us' >&2; echo after >&2";
        let prefix = Event::LineStarting("boot-to-init: ");
        let timed = sh(script, Stream::Stderr, prefix, Then::Succeed).unwrap();
        assert!(timed.elapsed >= Duration::from_millis(200), "{timed:?}");
        assert_eq!(timed.printed, "out | noise\nboot-to-init: 5 us\nafter");
    }

    #[test]
    fn the_first_byte_on_stdout_stops_the_timer_then_the_child_is_terminated() {
        let started = Instant::now();
        let script = "sleep 0.1; printf x; exec sleep 30";
        let timed = sh(script, Stream::Stdout, Event::FirstByte, Then::Terminate).unwrap();
        assert!(timed.elapsed >= Duration::from_millis(100));
        let took = started.elapsed();
        assert!(took < Duration::from_secs(10), "not terminated: {took:?}");
        assert_eq!(timed.printed, "x | ");
    }

    #[test]
    fn a_killed_child_is_done_with_at_once() {
        let started = Instant::now();
        let script = "printf x; exec sleep 30";
        let timed = sh(script, Stream::Stdout, Event::FirstByte, Then::Kill).unwrap();
        let took = started.elapsed();
        assert!(took < Duration::from_secs(10), "not killed: {took:?}");
        assert_eq!(timed.printed, "x");
    }

    #[test]
    fn no_event_is_an_error_naming_what_was_looked_for() {
        let ready = Event::LineStarting("ready");
        let err = sh("echo hello; exit 3", Stream::Stdout, ready, Then::Succeed)
            .unwrap_err()
            .to_string();
        assert!(err.contains("the script"), "{err}");
        assert!(err.contains("\"ready\""), "{err}");
        assert!(err.contains("hello"), "{err}");
    }

    #[test]
    fn a_failure_after_the_event_fails_the_run() {
        let err = sh(
            "printf x; exit 4",
            Stream::Stdout,
            Event::FirstByte,
            Then::Succeed,
        );
        assert!(matches!(err, Err(BenchError::Failed { .. })), "{err:?}");
    }

    #[test]
    fn a_child_run_to_its_end_has_its_cpu_time_and_memory() {
        let out = tempfile::NamedTempFile::new().unwrap();
        let mut cmd = Command::new("sh");
        // Busy for a while in the shell itself, then a status of its own.
        cmd.args([
            "-c",
            "i=0; while [ $i -lt 20000 ]; do i=$((i+1)); done; echo done; exit 3",
        ]);
        let exited = run_to_exit(cmd, "sh", out.path(), Duration::from_secs(20)).unwrap();
        assert_eq!(exited.code, Some(3));
        assert!(exited.cpu > Duration::ZERO, "{exited:?}");
        assert!(exited.wall >= exited.cpu / 2, "{exited:?}");
        assert!(exited.max_rss_kib > 0, "{exited:?}");
        assert_eq!(std::fs::read_to_string(out.path()).unwrap(), "done\n");
    }

    #[test]
    fn a_child_over_its_limit_is_killed() {
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "exec sleep 30"]);
        let limit = Duration::from_millis(200);
        let err = time_to(
            cmd,
            "sleeper",
            Stream::Stdout,
            Event::FirstByte,
            Then::Succeed,
            limit,
        );
        assert!(matches!(err, Err(BenchError::Timeout { .. })), "{err:?}");
    }
}
