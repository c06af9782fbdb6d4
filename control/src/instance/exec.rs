//! `kiln exec`: another process in a running instance, as `docker exec`
//! runs one, through guest-init's exec server on the instance's vsock
//! (`guest_init::exec` is the protocol). [`Session`] is the whole host
//! side, for the CLI and for any other caller (the containerd shim's
//! Exec): start it with a request, feed it stdin and terminal sizes
//! through its [`Input`], and collect the output and the status with
//! [`Session::wait`]. [`release_root`] gives a pod container's root back
//! (its processes ended, its mounts undone) before its drive is emptied.
use std::io::{self, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use guest_init::exec::{EXEC_PORT, ExecRequest, Frame, FrameError, WindowSize};

use super::{Instance, State};
use crate::functions::vsock;

/// How long guest-init's exec port may take to answer: it listens from
/// the moment the entrypoint starts, so only a VM still booting waits.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

/// Why an exec did not run to a status.
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    /// The instance has no running VM to run a process in.
    #[error("instance {instance} is {state}: exec needs a running VM (`kiln start {instance}`)")]
    NotRunning {
        /// The instance's name or id.
        instance: String,
        /// Its state.
        state: State,
    },
    /// guest-init's exec port did not answer.
    #[error("instance {instance}: cannot reach guest-init's exec port")]
    Connect {
        /// The instance's name or id.
        instance: String,
        /// Why the vsock connection failed.
        #[source]
        source: io::Error,
    },
    /// The stream broke, or carried what the protocol does not.
    #[error("instance {instance}: exec")]
    Stream {
        /// The instance's name or id.
        instance: String,
        /// What went wrong on the stream.
        #[source]
        source: FrameError,
    },
    /// guest-init started nothing: the program, the user or the request
    /// was refused.
    #[error("instance {instance}: {reason}")]
    Refused {
        /// The instance's name or id.
        instance: String,
        /// The status a shell would give (126 or 127).
        status: u8,
        /// guest-init's reason.
        reason: String,
    },
    /// The stream ended before the process's status came.
    #[error(
        "instance {instance}: the exec stream ended before the process's status (did the VM stop?)"
    )]
    Ended {
        /// The instance's name or id.
        instance: String,
    },
}

/// A process running in an instance.
pub struct Session {
    instance: String,
    stream: UnixStream,
    input: Input,
}

/// The host's half of a session's stream, for another thread: stdin and
/// terminal sizes. Clones write to the same stream.
#[derive(Clone)]
pub struct Input(Arc<Mutex<UnixStream>>);

impl Input {
    /// Sends bytes for the process's stdin.
    pub fn stdin(&self, bytes: &[u8]) -> io::Result<()> {
        self.send(Frame::Stdin(bytes.to_vec()))
    }

    /// Closes the process's stdin.
    pub fn stdin_end(&self) -> io::Result<()> {
        self.send(Frame::StdinEnd)
    }

    /// Gives the process's terminal a new size.
    pub fn resize(&self, size: WindowSize) -> io::Result<()> {
        self.send(Frame::Resize(size))
    }

    /// Sends the process a signal (`kill`'s number).
    pub fn signal(&self, signal: i32) -> io::Result<()> {
        self.send(Frame::Signal(signal))
    }

    fn send(&self, frame: Frame) -> io::Result<()> {
        frame.write_to(&mut *self.0.lock().unwrap_or_else(PoisonError::into_inner))
    }
}

impl Session {
    /// Starts `request` in `instance`, which must be running.
    pub fn start(instance: &Instance, request: &ExecRequest) -> Result<Session, ExecError> {
        let label = instance.label().to_string();
        if instance.record.state != State::Running {
            return Err(ExecError::NotRunning {
                instance: label,
                state: instance.record.state,
            });
        }
        Session::connect(label, &instance.vsock_socket(), request)
    }

    /// Starts `request` in the VM whose vsock device listens on `socket`
    /// (any Kiln VM with one, such as a container's), named `label` in
    /// errors; waits for guest-init's exec port while the VM boots.
    pub fn connect(
        label: String,
        socket: &Path,
        request: &ExecRequest,
    ) -> Result<Session, ExecError> {
        Session::open(label, socket, Frame::Request(request.clone()))
    }

    /// Connects to guest-init's exec port through `socket` and sends
    /// `first`.
    fn open(label: String, socket: &Path, first: Frame) -> Result<Session, ExecError> {
        let connect_err = |source| ExecError::Connect {
            instance: label.clone(),
            source,
        };
        let stream = vsock::connect(socket, EXEC_PORT, CONNECT_TIMEOUT).map_err(connect_err)?;
        Session::over(label.clone(), stream, first).map_err(connect_err)
    }

    /// A session on `stream`, once its first frame (a request, or a
    /// release) is sent.
    fn over(instance: String, stream: UnixStream, first: Frame) -> io::Result<Session> {
        let input = Input(Arc::new(Mutex::new(stream.try_clone()?)));
        input.send(first)?;
        Ok(Session {
            instance,
            stream,
            input,
        })
    }

    /// Where stdin and terminal sizes go.
    pub fn input(&self) -> Input {
        self.input.clone()
    }

    /// Copies the process's output to `stdout` and `stderr` until it
    /// ends; returns its status.
    pub fn wait(mut self, stdout: &mut dyn Write, stderr: &mut dyn Write) -> Result<u8, ExecError> {
        loop {
            let frame = Frame::read_from(&mut self.stream).map_err(|source| ExecError::Stream {
                instance: self.instance.clone(),
                source,
            })?;
            // A reader gone (`| head`) does not stop the process: its
            // output is dropped, as a closed pipe would drop it.
            match frame {
                Some(Frame::Stdout(bytes)) => {
                    let _ = stdout.write_all(&bytes).and_then(|()| stdout.flush());
                }
                Some(Frame::Stderr(bytes)) => {
                    let _ = stderr.write_all(&bytes).and_then(|()| stderr.flush());
                }
                Some(Frame::Exit(status)) => return Ok(status),
                Some(Frame::Refused { status, reason }) => {
                    return Err(ExecError::Refused {
                        instance: self.instance,
                        status,
                        reason,
                    });
                }
                Some(_) => {
                    return Err(ExecError::Stream {
                        instance: self.instance,
                        source: FrameError::Malformed("host-bound"),
                    });
                }
                None => {
                    return Err(ExecError::Ended {
                        instance: self.instance,
                    });
                }
            }
        }
    }
}

/// Gives back the root filesystem of block device `device` (`/dev/vdb`)
/// in the VM whose vsock device listens on `socket`, named `label` in
/// errors: guest-init kills every process still running in it and
/// unmounts it ([`Frame::Release`]). A pod's container's Delete calls
/// this before the VMM empties the container's drive (`detachdisk`),
/// never after: a filesystem still mounted on a drive that is filled
/// again would write onto the new disk. guest-init's refusal (not a root
/// it mounted, an unmount that failed) is [`ExecError::Refused`].
pub fn release_root(label: String, socket: &Path, device: &str) -> Result<(), ExecError> {
    released(Session::open(
        label,
        socket,
        Frame::Release(device.to_string()),
    )?)
}

/// A release's answer on `session`: `Exit(0)` once released.
fn released(session: Session) -> Result<(), ExecError> {
    let instance = session.instance.clone();
    match session.wait(&mut io::sink(), &mut io::sink())? {
        0 => Ok(()),
        _ => Err(ExecError::Stream {
            instance,
            source: FrameError::Malformed("release answer"),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request() -> ExecRequest {
        ExecRequest {
            argv: vec!["/bin/sh".into()],
            env: Default::default(),
            workdir: None,
            user: None,
            groups: None,
            tty: None,
            stdin: true,
            root: None,
            mounts: Vec::new(),
        }
    }

    /// A fake guest-init: collects the host's frames up to StdinEnd, then
    /// answers with `answer`.
    fn session_answered_with(answer: Vec<Frame>) -> (Session, std::thread::JoinHandle<Vec<Frame>>) {
        let (host, mut guest) = UnixStream::pair().unwrap();
        let session = Session::over("web".into(), host, Frame::Request(request())).unwrap();
        let fake = std::thread::spawn(move || {
            let mut got = Vec::new();
            while let Some(frame) = Frame::read_from(&mut guest).unwrap() {
                let end = frame == Frame::StdinEnd;
                got.push(frame);
                if end {
                    break;
                }
            }
            for frame in answer {
                frame.write_to(&mut guest).unwrap();
            }
            got
        });
        (session, fake)
    }

    #[test]
    fn output_goes_to_its_stream_and_the_status_comes_last() {
        let (session, fake) = session_answered_with(vec![
            Frame::Stdout(b"out".to_vec()),
            Frame::Stderr(b"err".to_vec()),
            Frame::Exit(3),
        ]);
        let input = session.input();
        input.stdin(b"typed").unwrap();
        input.resize(WindowSize { rows: 1, cols: 2 }).unwrap();
        input.signal(15).unwrap();
        input.stdin_end().unwrap();
        let (mut out, mut err) = (Vec::new(), Vec::new());
        assert_eq!(session.wait(&mut out, &mut err).unwrap(), 3);
        assert_eq!((&out[..], &err[..]), (&b"out"[..], &b"err"[..]));
        assert_eq!(
            fake.join().unwrap(),
            [
                Frame::Request(request()),
                Frame::Stdin(b"typed".to_vec()),
                Frame::Resize(WindowSize { rows: 1, cols: 2 }),
                Frame::Signal(15),
                Frame::StdinEnd
            ]
        );
    }

    #[test]
    fn a_refusal_or_an_early_end_is_an_error_naming_the_instance() {
        let (session, _fake) = session_answered_with(vec![Frame::Refused {
            status: 127,
            reason: "cannot start nosuch: No such file or directory".into(),
        }]);
        session.input().stdin_end().unwrap();
        let err = session.wait(&mut Vec::new(), &mut Vec::new()).unwrap_err();
        assert!(matches!(err, ExecError::Refused { status: 127, .. }));
        assert!(
            err.to_string()
                .starts_with("instance web: cannot start nosuch"),
            "{err}"
        );
        let (session, _fake) = session_answered_with(Vec::new());
        session.input().stdin_end().unwrap();
        let err = session.wait(&mut Vec::new(), &mut Vec::new()).unwrap_err();
        assert!(
            err.to_string()
                .contains("ended before the process's status"),
            "{err}"
        );
    }

    /// A fake guest-init answering a release with `answer`; returns what
    /// the host asked, and what `released` made of the answer.
    fn release_answered_with(answer: Frame) -> (Option<Frame>, Result<(), ExecError>) {
        let (host, mut guest) = UnixStream::pair().unwrap();
        let fake = std::thread::spawn(move || {
            let asked = Frame::read_from(&mut guest).unwrap();
            answer.write_to(&mut guest).unwrap();
            asked
        });
        let session = Session::over("pod".into(), host, Frame::Release("/dev/vdb".into())).unwrap();
        let result = released(session);
        (fake.join().unwrap(), result)
    }

    #[test]
    fn a_release_names_the_device_and_is_done_at_exit_zero() {
        let (asked, result) = release_answered_with(Frame::Exit(0));
        assert_eq!(asked, Some(Frame::Release("/dev/vdb".into())));
        result.unwrap();
        let (_, result) = release_answered_with(Frame::Refused {
            status: guest_init::exec::RELEASE_REFUSED_STATUS,
            reason: "root /dev/vdb: not a root filesystem guest-init has mounted".into(),
        });
        let err = result.unwrap_err();
        assert_eq!(
            err.to_string(),
            "instance pod: root /dev/vdb: not a root filesystem guest-init has mounted"
        );
        let (_, result) = release_answered_with(Frame::Exit(9));
        let err = result.unwrap_err();
        assert!(
            kiln_vmm::report::one_line(&err).contains("malformed release answer"),
            "{err}"
        );
    }
}
