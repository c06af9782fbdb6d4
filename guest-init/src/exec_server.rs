//! guest-init's side of the exec protocol (`guest_init::exec`): while the
//! entrypoint runs, a thread listens on vsock port [`EXEC_PORT`] and runs
//! each request's process in a session thread of its own: the
//! entrypoint's configuration with the request's changes (argv, env,
//! working directory, user: `guest_init::user`), stdio through pipes or
//! a pseudo-terminal, the status last.
//!
//! PID 1's reaper (`supervisor::reap_all`) reaps every child, these too:
//! it hands an exec'd process's status over through [`Children`], whose
//! lock a session holds while it spawns. So the reaper never reaps a child
//! before the table knows it, nor one whose exec failed while std's spawn
//! still waits for it.
use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Stdio};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::{self, JoinHandle};

use crate::config::RunConfig;
use crate::exec::{EXEC_PORT, ExecRequest, Frame, RELEASE_REFUSED_STATUS, WindowSize};
use crate::{binds, function_mode, roots, supervisor, user};

/// How much output one frame carries at most.
const CHUNK: usize = 32 * 1024;

/// Exec'd processes by pid, with their status once reaped.
pub struct Children(BTreeMap<libc::pid_t, Option<u8>>);

static CHILDREN: Mutex<Children> = Mutex::new(Children(BTreeMap::new()));
static EXITED: Condvar = Condvar::new();

/// The table, locked: the reaper holds it while it reaps.
pub fn children() -> MutexGuard<'static, Children> {
    CHILDREN.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Children {
    /// Records a reaped child's status if it is an exec'd process; says
    /// whether it was.
    pub fn reaped(&mut self, pid: libc::pid_t, status: u8) -> bool {
        match self.0.get_mut(&pid) {
            Some(slot) => {
                *slot = Some(status);
                EXITED.notify_all();
                true
            }
            None => false,
        }
    }
}

/// Sends `signal` to exec'd process `pid` unless it has been reaped (its
/// pid may be another process's by then). The reaper holds the table's
/// lock while it reaps, so the pid cannot be reaped meanwhile.
fn send_signal(pid: libc::pid_t, signal: libc::c_int) {
    let table = children();
    if let Some(None) = table.0.get(&pid) {
        // SAFETY: kill takes no pointers; a bad signal number fails with
        // EINVAL and changes nothing.
        unsafe { libc::kill(pid, signal) };
    }
}

/// Waits for exec'd process `pid` to be reaped, and forgets it.
fn wait_for(pid: libc::pid_t) -> u8 {
    let mut table = children();
    loop {
        if let Some(Some(status)) = table.0.get(&pid) {
            let status = *status;
            table.0.remove(&pid);
            return status;
        }
        table = EXITED.wait(table).unwrap_or_else(PoisonError::into_inner);
    }
}

/// Starts the exec listener on [`EXEC_PORT`], serving sessions in
/// threads of their own with `config` (the entrypoint's, resolved) as
/// every process's base. The guest may have no vsock device: then this
/// fails, and exec is not offered.
pub fn start(config: RunConfig) -> io::Result<()> {
    let listener = function_mode::listen(EXEC_PORT)?;
    thread::Builder::new().name("exec".into()).spawn(move || {
        loop {
            match accept(&listener) {
                Ok(stream) => {
                    let config = config.clone();
                    let spawned = thread::Builder::new()
                        .name("exec-session".into())
                        .spawn(move || session(stream, &config, Path::new("/")));
                    if let Err(err) = spawned {
                        eprintln!("guest-init: exec: cannot start a session: {err}");
                    }
                }
                Err(err) => {
                    eprintln!("guest-init: exec: accept failed: {err}");
                    thread::sleep(std::time::Duration::from_secs(1));
                }
            }
        }
    })?;
    Ok(())
}

/// The next connection, waiting as long as it takes (the listener is
/// non-blocking: poll first).
fn accept(listener: &OwnedFd) -> io::Result<UnixStream> {
    let mut fds = [libc::pollfd {
        fd: listener.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    }];
    loop {
        // SAFETY: `fds` is a valid array of one pollfd for the call.
        if unsafe { libc::poll(fds.as_mut_ptr(), 1, -1) } >= 0 {
            break;
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
    let null = std::ptr::null_mut();
    // SAFETY: null address pointers are allowed (the peer's address is not
    // asked for).
    let fd = unsafe { libc::accept4(listener.as_raw_fd(), null, null.cast(), libc::SOCK_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor that nothing else owns.
    Ok(UnixStream::from(unsafe { OwnedFd::from_raw_fd(fd) }))
}

/// Why a request started nothing: the status and the reason the host gets.
struct Refusal(u8, String);

impl Refusal {
    /// A refusal with the status of a process that cannot run, for `err`.
    fn not_executable(err: &(dyn std::error::Error + 'static)) -> Refusal {
        Refusal(supervisor::STATUS_NOT_EXECUTABLE, crate::one_line(err))
    }
}

/// Serves one exec connection to its end: the request, the process's
/// stdio, its status (or why it never started). Users are looked up under
/// `root` (the guest's `/`).
pub fn session(stream: UnixStream, base: &RunConfig, root: &Path) {
    let writer = match stream.try_clone() {
        Ok(writer) => Arc::new(Mutex::new(writer)),
        Err(err) => return eprintln!("guest-init: exec: {err}"),
    };
    let last = match run(stream, base, root, &writer) {
        Ok(status) => Frame::Exit(status),
        Err(Refusal(status, reason)) => Frame::Refused { status, reason },
    };
    // The host may be gone already: nothing to tell then.
    let _ = last.write_to(&mut *lock(&writer));
}

fn lock(writer: &Mutex<UnixStream>) -> MutexGuard<'_, UnixStream> {
    writer.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Runs the session's request to its end, or the release sent in its
/// place.
fn run(
    mut stream: UnixStream,
    base: &RunConfig,
    root: &Path,
    writer: &Arc<Mutex<UnixStream>>,
) -> Result<u8, Refusal> {
    let request = match opening(&mut stream)? {
        Opening::Request(request) => request,
        Opening::Release(device) => return release(&device),
    };
    let launched = launch(&request, base, root)?;
    serve(stream, launched, writer)
}

/// What a session's first frame asks for.
enum Opening {
    Request(ExecRequest),
    Release(String),
}

/// Reads the session's first frame: a request, or a release in its place.
fn opening(stream: &mut UnixStream) -> Result<Opening, Refusal> {
    match Frame::read_from(stream) {
        Ok(Some(Frame::Request(request))) => Ok(Opening::Request(request)),
        Ok(Some(Frame::Release(device))) => Ok(Opening::Release(device)),
        Ok(_) => Err(Refusal(
            supervisor::STATUS_NOT_EXECUTABLE,
            "expected a request first".into(),
        )),
        Err(err) => Err(Refusal::not_executable(&err)),
    }
}

/// A request's process, started, with its terminal under `-t`.
struct Launched {
    child: Child,
    pid: libc::pid_t,
    terminal: Option<Terminal>,
}

/// Readies the request's surroundings (its own root mounted, its copied
/// mounts installed, its configuration, its terminal) and starts its
/// process in them.
fn launch(request: &ExecRequest, base: &RunConfig, root: &Path) -> Result<Launched, Refusal> {
    let own_root = request
        .root
        .as_deref()
        .map(roots::mounted)
        .transpose()
        .map_err(|err| Refusal::not_executable(&err))?;
    let in_root = own_root.as_deref().unwrap_or(root);
    binds::install(&request.mounts, in_root, Path::new(binds::COPIES_DIR))
        .map_err(|err| Refusal::not_executable(&err))?;
    let config = prepared(request, base, in_root)?;
    let terminal = request
        .tty
        .map(|size| Terminal::open(size, own_root.as_deref().unwrap_or(Path::new("/"))))
        .transpose()?;
    let (child, pid) = spawn(&config, request, terminal.as_ref(), own_root.as_deref())?;
    Ok(Launched {
        child,
        pid,
        terminal,
    })
}

/// Pumps the process's stdio between it and the host until it is
/// reaped, and returns its status.
fn serve(
    stream: UnixStream,
    launched: Launched,
    writer: &Arc<Mutex<UnixStream>>,
) -> Result<u8, Refusal> {
    let Launched {
        mut child,
        pid,
        terminal,
    } = launched;
    let pumps = match &terminal {
        Some(terminal) => Pumps::terminal(terminal, writer)?,
        None => Pumps::pipes(&mut child, writer),
    };
    let resize = terminal.as_ref().map(Terminal::reader).transpose()?;
    // Ends with the host's stream; never joined (the host closes it after
    // the status).
    thread::spawn(move || pump_in(stream, pid, pumps.input, resize));
    let status = wait_for(pid);
    drop(terminal);
    for output in pumps.outputs {
        let _ = output.join();
    }
    Ok(status)
}

/// The host's side of a process's stdio.
struct Pumps {
    /// The threads copying its output to the host, running already.
    outputs: Vec<JoinHandle<()>>,
    /// Where the host's stdin goes, if anywhere.
    input: Option<Box<dyn Write + Send>>,
}

impl Pumps {
    /// The terminal's output to the host as stdout, the host's stdin to
    /// the terminal.
    fn terminal(terminal: &Terminal, writer: &Arc<Mutex<UnixStream>>) -> Result<Pumps, Refusal> {
        let outputs = vec![pump_out(terminal.reader()?, writer.clone(), Frame::Stdout)];
        Ok(Pumps {
            outputs,
            input: Some(Box::new(terminal.reader()?)),
        })
    }

    /// The child's stdout and stderr pipes to the host, the host's stdin
    /// to its stdin pipe (if it has one).
    fn pipes(child: &mut Child, writer: &Arc<Mutex<UnixStream>>) -> Pumps {
        let stdout = child
            .stdout
            .take()
            .map(|out| pump_out(out, writer.clone(), Frame::Stdout));
        let stderr = child
            .stderr
            .take()
            .map(|err| pump_out(err, writer.clone(), Frame::Stderr));
        Pumps {
            outputs: stdout.into_iter().chain(stderr).collect(),
            input: child
                .stdin
                .take()
                .map(|stdin| Box::new(stdin) as Box<dyn Write + Send>),
        }
    }
}

/// A release in the place of a request: `device`'s root is given back
/// (status 0), or why not.
fn release(device: &str) -> Result<u8, Refusal> {
    roots::release(device)
        .map(|()| 0)
        .map_err(|err| Refusal(RELEASE_REFUSED_STATUS, crate::one_line(&err)))
}

/// The entrypoint's configuration with the request's changes, its user
/// resolved under `root`: the guest's `/`, or the request's own root
/// mounted there, where the working directory is `/` unless the request
/// names one, and must exist.
fn prepared(request: &ExecRequest, base: &RunConfig, root: &Path) -> Result<RunConfig, Refusal> {
    let refuse = |reason: String| Refusal(supervisor::STATUS_NOT_EXECUTABLE, reason);
    let mut config = base.clone();
    config.entrypoint = request.argv.clone();
    config.cmd.clear();
    config.env.extend(request.env.clone());
    match (&request.workdir, &request.root) {
        (Some(dir), _) => config.workdir = dir.clone(),
        (None, Some(_)) => config.workdir = "/".into(),
        (None, None) => {}
    }
    config
        .validate()
        .map_err(|err| refuse(crate::one_line(&err)))?;
    if let Some(device) = &request.root
        && !root.join(config.workdir.trim_start_matches('/')).is_dir()
    {
        return Err(refuse(format!(
            "workdir {}: expected a directory in root {device}",
            config.workdir
        )));
    }
    if let Some(spec) = &request.user {
        config.user = Some(spec.clone());
        // HOME is the new user's, unless the request sets it.
        if !request.env.contains_key("HOME") {
            config.env.remove("HOME");
        }
        let identity = user::resolve(&config, root).map_err(|err| refuse(crate::one_line(&err)))?;
        user::apply(&mut config, identity);
    }
    if let Some(groups) = &request.groups {
        config.groups = groups.clone();
    }
    Ok(config)
}

/// Starts the process, in `own_root` if the request has one, on the
/// terminal's far end or on pipes, and enters it in the table before the
/// reaper can see it end.
fn spawn(
    config: &RunConfig,
    request: &ExecRequest,
    terminal: Option<&Terminal>,
    own_root: Option<&Path>,
) -> Result<(Child, libc::pid_t), Refusal> {
    let failed = |err: io::Error| {
        Refusal(
            supervisor::spawn_failure_status(&err),
            format!("cannot start {}: {err}", config.entrypoint[0]),
        )
    };
    let mut command = match own_root {
        Some(root) => supervisor::command_in(config, root).map_err(failed)?,
        None => supervisor::command(config),
    };
    match terminal {
        Some(terminal) => {
            command
                .stdin(terminal.far_end().map_err(failed)?)
                .stdout(terminal.far_end().map_err(failed)?)
                .stderr(terminal.far_end().map_err(failed)?);
            // SAFETY: runs in the child between fork and exec; setsid and
            // ioctl are async-signal-safe and take no memory of ours.
            unsafe { command.pre_exec(take_terminal) };
        }
        None => {
            let stdin = if request.stdin {
                Stdio::piped()
            } else {
                Stdio::null()
            };
            command
                .stdin(stdin)
                .stdout(Stdio::piped())
                .stderr(Stdio::piped());
        }
    }
    let mut table = children();
    let child = command.spawn().map_err(failed)?;
    let pid = child.id() as libc::pid_t;
    table.0.insert(pid, None);
    Ok((child, pid))
}

/// In the child: a session of its own, with stdin (the terminal's far
/// end) as its controlling terminal.
fn take_terminal() -> io::Result<()> {
    // SAFETY: setsid takes no arguments.
    if unsafe { libc::setsid() } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: TIOCSCTTY takes an int argument (0: do not steal).
    if unsafe { libc::ioctl(0, libc::TIOCSCTTY, 0) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Copies `source` to the host as frames made by `frame`, until it ends
/// (a terminal's near end reports EIO once the far end is closed).
fn pump_out(
    mut source: impl Read + Send + 'static,
    writer: Arc<Mutex<UnixStream>>,
    frame: fn(Vec<u8>) -> Frame,
) -> JoinHandle<()> {
    thread::spawn(move || {
        let mut buf = vec![0u8; CHUNK];
        loop {
            match source.read(&mut buf) {
                Ok(0) => return,
                Ok(n) => {
                    if frame(buf[..n].to_vec())
                        .write_to(&mut *lock(&writer))
                        .is_err()
                    {
                        return;
                    }
                }
                Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return,
            }
        }
    })
}

/// Applies the host's frames: stdin to `input` (closed at
/// [`Frame::StdinEnd`]), sizes to the terminal `resize`, signals to the
/// process `pid`.
fn pump_in(
    mut stream: UnixStream,
    pid: libc::pid_t,
    mut input: Option<Box<dyn Write + Send>>,
    resize: Option<File>,
) {
    while let Ok(Some(frame)) = Frame::read_from(&mut stream) {
        match frame {
            Frame::Stdin(bytes) => {
                if let Some(sink) = &mut input
                    && sink.write_all(&bytes).and_then(|()| sink.flush()).is_err()
                {
                    input = None;
                }
            }
            Frame::StdinEnd => input = None,
            Frame::Resize(size) => {
                if let Some(terminal) = &resize {
                    // A failed resize leaves the old size: nothing to stop for.
                    let _ = set_size(terminal, size);
                }
            }
            Frame::Signal(signal) => send_signal(pid, signal),
            _ => return,
        }
    }
}

/// A pseudo-terminal: its near end (the master) stays here.
struct Terminal {
    near: File,
}

impl Terminal {
    /// A new pseudo-terminal of `size`, from `root`'s /dev/ptmx (which
    /// needs devpts at /dev/pts beside it: see `mounts::KERNEL_FILESYSTEMS`;
    /// the far end is opened through TIOCGPTPEER, so its /dev/pts/N name
    /// is never looked up here). A process with its own root gets one of
    /// its root's devpts, where it finds its terminal's name.
    fn open(size: WindowSize, root: &Path) -> Result<Terminal, Refusal> {
        let ptmx = root.join("dev/ptmx");
        let refuse = |err: io::Error| {
            Refusal(
                supervisor::STATUS_NOT_EXECUTABLE,
                format!(
                    "no pseudo-terminal for -t in the guest ({}): {err}",
                    ptmx.display()
                ),
            )
        };
        let near = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NOCTTY)
            .open(&ptmx)
            .map_err(refuse)?;
        let unlock: libc::c_int = 0;
        // SAFETY: TIOCSPTLCK reads one int, which lives across the call.
        if unsafe { libc::ioctl(near.as_raw_fd(), libc::TIOCSPTLCK, &unlock) } < 0 {
            return Err(refuse(io::Error::last_os_error()));
        }
        set_size(&near, size).map_err(refuse)?;
        Ok(Terminal { near })
    }

    /// A new descriptor of the far end (the process's stdio).
    fn far_end(&self) -> io::Result<OwnedFd> {
        let flags = libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC;
        // SAFETY: TIOCGPTPEER takes the open flags as its argument.
        let fd = unsafe { libc::ioctl(self.near.as_raw_fd(), libc::TIOCGPTPEER, flags) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a fresh descriptor that nothing else owns.
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    }

    /// Another handle on the near end.
    fn reader(&self) -> Result<File, Refusal> {
        self.near.try_clone().map_err(|err| {
            Refusal(
                supervisor::STATUS_NOT_EXECUTABLE,
                format!("pseudo-terminal: {err}"),
            )
        })
    }
}

fn set_size(terminal: &File, size: WindowSize) -> io::Result<()> {
    let winsize = libc::winsize {
        ws_row: size.rows,
        ws_col: size.cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads one winsize, which lives across the call.
    if unsafe { libc::ioctl(terminal.as_raw_fd(), libc::TIOCSWINSZ, &winsize) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    /// Runs `request` through a session (over a socket pair), sends it
    /// `input` (then the end of stdin), and returns what the host gets
    /// back: stdout, stderr, the last frame. The test reaps in the place
    /// of PID 1.
    fn exec(request: ExecRequest, input: &[Frame], root: &Path) -> (Vec<u8>, Vec<u8>, Frame) {
        let (mut host, guest) = UnixStream::pair().unwrap();
        let mut base = RunConfig::new(vec!["/bin/false".into()]);
        base.env.insert("FROM_BASE".into(), "yes".into());
        let root = root.to_path_buf();
        let session = thread::spawn(move || session(guest, &base, &root));
        // As PID 1's reaper does, with the table locked, but only the
        // table's own children: `waitpid(-1)` here would reap other tests'
        // processes (and another test's reaper this one's).
        let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let reaper = {
            let done = done.clone();
            thread::spawn(move || {
                while !done.load(std::sync::atomic::Ordering::Acquire) {
                    let mut table = children();
                    let pending: Vec<_> = table
                        .0
                        .iter()
                        .filter(|(_, s)| s.is_none())
                        .map(|(&p, _)| p)
                        .collect();
                    for pid in pending {
                        let mut raw = 0;
                        // SAFETY: `raw` is a valid out-pointer for the status.
                        if unsafe { libc::waitpid(pid, &mut raw, libc::WNOHANG) } == pid {
                            table.reaped(pid, supervisor::status_of(raw));
                        }
                    }
                    drop(table);
                    thread::sleep(std::time::Duration::from_millis(5));
                }
            })
        };
        Frame::Request(request).write_to(&mut host).unwrap();
        // A refused request's session may be gone before its stdin is.
        let stdin_sent = input
            .iter()
            .chain([&Frame::StdinEnd])
            .try_for_each(|frame| frame.write_to(&mut host));
        if let Err(err) = stdin_sent {
            assert_eq!(err.kind(), io::ErrorKind::BrokenPipe, "{err}");
        }
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let last = loop {
            match Frame::read_from(&mut host).unwrap().unwrap() {
                Frame::Stdout(bytes) => out.extend(bytes),
                Frame::Stderr(bytes) => err.extend(bytes),
                last => break last,
            }
        };
        session.join().unwrap();
        done.store(true, std::sync::atomic::Ordering::Release);
        reaper.join().unwrap();
        (out, err, last)
    }

    fn request(argv: &[&str]) -> ExecRequest {
        ExecRequest {
            argv: argv.iter().map(|a| a.to_string()).collect(),
            env: BTreeMap::from([("ADDED".into(), "1".into())]),
            workdir: Some("/tmp".into()),
            user: None,
            groups: None,
            tty: None,
            stdin: true,
            root: None,
            mounts: Vec::new(),
        }
    }

    #[test]
    fn stdio_environment_and_status_go_through_the_session() {
        let script =
            "read line; echo \"got $line in $(pwd) $FROM_BASE$ADDED\"; echo oops >&2; exit 5";
        let (out, err, last) = exec(
            request(&["/bin/sh", "-c", script]),
            &[Frame::Stdin(b"hello\n".to_vec())],
            Path::new("/"),
        );
        assert_eq!(String::from_utf8(out).unwrap(), "got hello in /tmp yes1\n");
        assert_eq!(err, b"oops\n");
        assert_eq!(last, Frame::Exit(5));
    }

    #[test]
    fn a_terminal_is_the_process_controlling_tty() {
        let mut req = request(&["/bin/sh", "-c", "test -t 0 && stty size"]);
        req.tty = Some(WindowSize {
            rows: 33,
            cols: 101,
        });
        let (out, _, last) = exec(req, &[], Path::new("/"));
        assert_eq!(last, Frame::Exit(0), "{}", String::from_utf8_lossy(&out));
        assert!(String::from_utf8_lossy(&out).contains("33 101"), "{out:?}");
    }

    #[test]
    fn a_signal_frame_reaches_the_process() {
        let (_, _, last) = exec(
            request(&["/bin/sleep", "30"]),
            &[Frame::Signal(libc::SIGTERM)],
            Path::new("/"),
        );
        assert_eq!(last, Frame::Exit(128 + libc::SIGTERM as u8));
    }

    #[test]
    fn requested_groups_replace_the_users() {
        let mut req = request(&["/bin/sh", "-c", "id -G"]);
        req.groups = Some(vec![0, 29]);
        let (out, _, last) = exec(req, &[], Path::new("/"));
        assert_eq!(last, Frame::Exit(0));
        assert_eq!(String::from_utf8_lossy(&out), "0 29\n");
    }

    #[test]
    fn what_cannot_start_is_refused_with_the_shells_status() {
        let (_, _, last) = exec(request(&["/no/such/program"]), &[], Path::new("/"));
        assert!(
            matches!(&last, Frame::Refused { status: 127, reason } if reason.contains("/no/such/program")),
            "{last:?}"
        );
        let empty = tempfile::tempdir().unwrap();
        let mut req = request(&["/bin/true"]);
        req.user = Some("nobody-here".into());
        let (_, _, last) = exec(req, &[], empty.path());
        assert!(
            matches!(&last, Frame::Refused { status: 126, reason } if reason.contains("nobody-here")),
            "{last:?}"
        );
    }

    /// A root filesystem of busybox's shell, a program only it has, and
    /// a user only its /etc/passwd knows; traversable by that user.
    ///
    /// The two executables are written by a child process: a file this
    /// threaded test process held open for writing could still be open in
    /// a sibling test's forked child when we exec it (ETXTBSY).
    fn busybox_root() -> tempfile::TempDir {
        use std::os::unix::fs::{PermissionsExt, symlink};
        let root = tempfile::tempdir().unwrap();
        let dir = root.path();
        for sub in ["bin", "etc", "srv"] {
            std::fs::create_dir(dir.join(sub)).unwrap();
        }
        let write_executables = r#"cp /bin/busybox "$1/bin/busybox" &&
            printf '#!/bin/sh\necho "$(id -u) in $PWD"\n' > "$1/bin/only-in-this-root" &&
            chmod 755 "$1/bin/only-in-this-root""#;
        let status = std::process::Command::new("/bin/sh")
            .args(["-c", write_executables, "sh"])
            .arg(dir)
            .status()
            .unwrap();
        assert!(status.success());
        symlink("busybox", dir.join("bin/sh")).unwrap();
        std::fs::write(dir.join("etc/passwd"), "app:x:4321:4321::/srv:/bin/sh\n").unwrap();
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        root
    }

    #[test]
    fn a_process_with_its_own_root_runs_there_as_that_roots_user() {
        let root = busybox_root();
        let mut req = request(&["only-in-this-root"]);
        req.root = Some("/dev/vdb".into());
        req.workdir = None;
        req.user = Some("app".into());
        req.env.insert("PATH".into(), "/bin".into());
        let base = RunConfig::new(vec!["/bin/false".into()]);
        let Ok(config) = prepared(&req, &base, root.path()) else {
            panic!("refused")
        };
        assert_eq!((config.uid, config.workdir.as_str()), (4321, "/"));
        assert_eq!(config.env["HOME"], "/srv");
        let out = supervisor::command_in(&config, root.path())
            .unwrap()
            .output()
            .unwrap();
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            "4321 in /\n",
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        req.workdir = Some("/srv".into());
        let config = prepared(&req, &base, root.path()).ok().unwrap();
        let out = supervisor::command_in(&config, root.path())
            .unwrap()
            .output()
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout), "4321 in /srv\n");
        req.workdir = Some("/nowhere".into());
        let Err(Refusal(status, reason)) = prepared(&req, &base, root.path()) else {
            panic!("a missing workdir was accepted")
        };
        assert_eq!(
            (status, reason.as_str()),
            (
                126,
                "workdir /nowhere: expected a directory in root /dev/vdb"
            )
        );
    }

    #[test]
    fn a_release_of_a_root_never_mounted_is_refused_by_name() {
        let (mut host, guest) = UnixStream::pair().unwrap();
        let base = RunConfig::new(vec!["/bin/false".into()]);
        let session = thread::spawn(move || session(guest, &base, Path::new("/")));
        Frame::Release("/dev/vdq".into())
            .write_to(&mut host)
            .unwrap();
        assert_eq!(
            Frame::read_from(&mut host).unwrap(),
            Some(Frame::Refused {
                status: RELEASE_REFUSED_STATUS,
                reason: "root /dev/vdq: not a root filesystem guest-init has mounted".into()
            })
        );
        assert_eq!(Frame::read_from(&mut host).unwrap(), None);
        session.join().unwrap();
    }

    #[test]
    fn a_root_that_is_not_a_device_is_refused_by_value() {
        let mut req = request(&["/bin/true"]);
        req.root = Some("vdb".into());
        let (_, _, last) = exec(req, &[], Path::new("/"));
        assert_eq!(
            last,
            Frame::Refused {
                status: 126,
                reason: "root \"vdb\": expected a block device path /dev/NAME".into()
            }
        );
    }
}
