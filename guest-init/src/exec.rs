//! The exec protocol: another process in a running guest (`kiln exec`,
//! and the containerd shim's Exec), as `docker exec` runs one.
//!
//! The host connects to guest vsock port [`EXEC_PORT`], where guest-init
//! listens while the entrypoint runs (`guest_init::exec_server`). Both
//! sides then write [`Frame`]s: a kind byte, a little-endian u32 length,
//! that many bytes. The host's first frame is [`Frame::Request`]; then it
//! sends stdin ([`Frame::Stdin`], [`Frame::StdinEnd`]), terminal sizes
//! ([`Frame::Resize`]) and signals for the process ([`Frame::Signal`]).
//! The guest sends the process's output
//! ([`Frame::Stdout`], [`Frame::Stderr`]; a terminal's is all stdout) and
//! ends with [`Frame::Exit`], or [`Frame::Refused`] when nothing could be
//! started, and closes the stream.
//!
//! A connection whose first frame is [`Frame::Release`] runs nothing: it
//! asks guest-init to give back a process's own root (a pod's container
//! is deleted, and its drive is to be emptied). guest-init ends every
//! process in that root, unmounts it, and answers [`Frame::Exit`]`(0)`, or
//! [`Frame::Refused`] with why not; then the host may detach the drive.
use std::collections::BTreeMap;
use std::io::{self, Read, Write};

use serde::{Deserialize, Serialize};

/// The guest vsock port guest-init takes exec requests on.
pub const EXEC_PORT: u32 = 5001;

/// On the kernel command line of a container's VM (the containerd
/// shim's): guest-init starts no entrypoint and serves this port until
/// told to stop; the shim runs each of the container's processes, the
/// first one too, through it.
pub const CONTAINER_CMDLINE_FLAG: &str = "kiln.container=1";

/// The status of a [`Frame::Refused`] answering a [`Frame::Release`]: the
/// root was not released.
pub const RELEASE_REFUSED_STATUS: u8 = 1;

/// The largest frame either side accepts: a request is small, and output
/// is sent in pieces well below this.
pub const MAX_FRAME: u32 = 1 << 20;

/// What to run: the argv, and what to change from the entrypoint's
/// environment, working directory and user.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExecRequest {
    /// The program (absolute, or found in PATH) and its arguments.
    pub argv: Vec<String>,
    /// Variables added to (or replacing) the entrypoint's environment.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// The working directory; default the entrypoint's.
    #[serde(default)]
    pub workdir: Option<String>,
    /// `USER[:GROUP]`, resolved in the guest's /etc/passwd and /etc/group;
    /// default the entrypoint's user.
    #[serde(default)]
    pub user: Option<String>,
    /// The supplementary groups, in place of those the user's lookup
    /// gives: an OCI spec's `process.user.additionalGids`, which its
    /// maker (containerd) has resolved already.
    #[serde(default)]
    pub groups: Option<Vec<u32>>,
    /// A pseudo-terminal of this size for the process's stdio; `None`:
    /// pipes, stdout and stderr apart.
    #[serde(default)]
    pub tty: Option<WindowSize>,
    /// Whether the host sends stdin; without it the process's stdin is
    /// /dev/null (pipes) or a terminal nobody types into.
    #[serde(default)]
    pub stdin: bool,
    /// A block device (e.g. `/dev/vdb`, a pod's container's disk filled
    /// after boot) whose ext4 filesystem is this process's root: it runs
    /// chrooted there, in a mount namespace of its own, with its user,
    /// PATH and working directory looked up in that root. The device is
    /// mounted once, under `/run/kiln/roots/<name>`, and shared by every
    /// request naming it. `None`: the guest's own root.
    #[serde(default)]
    pub root: Option<String>,
    /// Host files to mount in that root before the process starts: a
    /// container's bind mounts, copied ([`CopiedMount`]). Only a
    /// container's first process carries them; its later ones (execs)
    /// find them mounted.
    #[serde(default)]
    pub mounts: Vec<CopiedMount>,
}

/// The most bytes of file contents a request's [`CopiedMount`]s carry in
/// all: with the JSON that spells each byte as a number (up to four
/// characters), the request stays within [`MAX_FRAME`].
pub const MAX_COPIED_BYTES: u64 = 192 * 1024;
/// The most files, directories and links a request's mounts hold in all.
pub const MAX_COPIED_ENTRIES: usize = 1024;

/// A bind mount of a container's spec, whose host file or directory the
/// VM cannot see: its contents travel with the request, guest-init writes
/// them into memory (under /run/kiln/mounts) and bind-mounts that over
/// `destination` in the process's root, as Kata Containers copies a
/// pod's files into its VM when no filesystem is shared. A copy is made
/// once; mounts with the same `source_key` (a pod's emptyDir, bound into
/// two of its containers) share it, so one container's writes are the
/// other's reads. Nothing is written back to the host.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CopiedMount {
    /// Where it is mounted: an absolute path in the process's root.
    pub destination: String,
    /// Names the host source, the same for every mount of it (a digest
    /// of its path: letters and digits only).
    pub source_key: String,
    /// Mounted read-only (`ro` among the spec's options).
    pub read_only: bool,
    /// The source itself first (path ""), a file or a directory; then,
    /// for a directory, everything under it, each parent before what it
    /// holds.
    pub entries: Vec<CopiedEntry>,
}

/// One file, directory or symbolic link of a [`CopiedMount`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CopiedEntry {
    /// Its path under the source: names joined by `/`, none empty, `.`
    /// or `..`; "" for the source itself.
    pub path: String,
    /// What it is, with what it holds.
    pub kind: CopiedKind,
    /// Its permission bits (and set-id and sticky bits).
    pub mode: u32,
    /// Its owner.
    pub uid: u32,
    /// Its group.
    pub gid: u32,
}

/// What a [`CopiedEntry`] is.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CopiedKind {
    /// A directory.
    Dir,
    /// A regular file and its bytes.
    File(Vec<u8>),
    /// A symbolic link and its target, as the host has it.
    Symlink(String),
}

/// A terminal's size, in characters.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WindowSize {
    /// Rows.
    pub rows: u16,
    /// Columns.
    pub cols: u16,
}

/// One message of the exec protocol.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Frame {
    /// Host → guest, first: what to run.
    Request(ExecRequest),
    /// Host → guest, first, in the place of a request: release the root
    /// filesystem of this block device (`/dev/vdb`), which a request's
    /// `root` had mounted. Every process still running in it is killed
    /// (SIGKILL) and gone before its mounts are undone, innermost first;
    /// the answer is `Exit(0)`, or `Refused` (status
    /// [`RELEASE_REFUSED_STATUS`]) when the device is not a mounted root
    /// or an unmount failed.
    Release(String),
    /// Host → guest: bytes for the process's stdin.
    Stdin(Vec<u8>),
    /// Host → guest: the host's stdin ended; the process's is closed.
    StdinEnd,
    /// Host → guest: the terminal's new size.
    Resize(WindowSize),
    /// Host → guest: a signal for the process (`kill`'s number), as the
    /// containerd shim's Kill sends one.
    Signal(i32),
    /// Guest → host: bytes the process wrote to stdout (or the terminal).
    Stdout(Vec<u8>),
    /// Guest → host: bytes the process wrote to stderr.
    Stderr(Vec<u8>),
    /// Guest → host, last: the process's status (its exit code, or 128 +
    /// the signal that killed it).
    Exit(u8),
    /// Guest → host, last: why nothing was started (a bad request, an
    /// unknown user, a program that is not there), with the status a shell
    /// would give (126 or 127).
    Refused {
        /// The status `kiln exec` exits with.
        status: u8,
        /// One line for a person.
        reason: String,
    },
}

/// Why a frame could not be read.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The stream failed or ended inside a frame.
    #[error("exec stream")]
    Io(#[from] io::Error),
    /// The frame's kind byte is not one the protocol has.
    #[error("exec stream: unknown frame kind {0}")]
    Kind(u8),
    /// The frame is longer than [`MAX_FRAME`].
    #[error("exec stream: a frame of {0} bytes, over the limit of {MAX_FRAME}")]
    TooLong(u32),
    /// A frame's payload is not what its kind holds.
    #[error("exec stream: a malformed {0} frame")]
    Malformed(&'static str),
}

const REQUEST: u8 = 1;
const STDIN: u8 = 2;
const STDIN_END: u8 = 3;
const RESIZE: u8 = 4;
const STDOUT: u8 = 5;
const STDERR: u8 = 6;
const EXIT: u8 = 7;
const REFUSED: u8 = 8;
const SIGNAL: u8 = 9;
const RELEASE: u8 = 10;

impl Frame {
    /// Writes the frame whole, then flushes.
    pub fn write_to(&self, out: &mut impl Write) -> io::Result<()> {
        let (kind, payload): (u8, Vec<u8>) = match self {
            Frame::Request(request) => (REQUEST, serde_json::to_vec(request)?),
            Frame::Release(device) => (RELEASE, device.as_bytes().to_vec()),
            Frame::Stdin(bytes) => (STDIN, bytes.clone()),
            Frame::StdinEnd => (STDIN_END, Vec::new()),
            Frame::Resize(size) => (
                RESIZE,
                [size.rows.to_le_bytes(), size.cols.to_le_bytes()].concat(),
            ),
            Frame::Signal(signal) => (SIGNAL, signal.to_le_bytes().to_vec()),
            Frame::Stdout(bytes) => (STDOUT, bytes.clone()),
            Frame::Stderr(bytes) => (STDERR, bytes.clone()),
            Frame::Exit(status) => (EXIT, vec![*status]),
            Frame::Refused { status, reason } => {
                (REFUSED, [&[*status][..], reason.as_bytes()].concat())
            }
        };
        let mut frame = Vec::with_capacity(5 + payload.len());
        frame.push(kind);
        frame.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        frame.extend_from_slice(&payload);
        out.write_all(&frame)?;
        out.flush()
    }

    /// The next frame; `None` when the stream ends between frames.
    pub fn read_from(input: &mut impl Read) -> Result<Option<Frame>, FrameError> {
        let mut header = [0u8; 5];
        match input.read(&mut header[..1])? {
            0 => return Ok(None),
            _ => input.read_exact(&mut header[1..])?,
        }
        let len = u32::from_le_bytes(header[1..].try_into().expect("4 bytes"));
        if len > MAX_FRAME {
            return Err(FrameError::TooLong(len));
        }
        let mut payload = vec![0u8; len as usize];
        input.read_exact(&mut payload)?;
        Ok(Some(match header[0] {
            REQUEST => Frame::Request(
                serde_json::from_slice(&payload).map_err(|_| FrameError::Malformed("request"))?,
            ),
            RELEASE => Frame::Release(
                String::from_utf8(payload).map_err(|_| FrameError::Malformed("release"))?,
            ),
            STDIN => Frame::Stdin(payload),
            STDIN_END => Frame::StdinEnd,
            RESIZE => match payload[..] {
                [r0, r1, c0, c1] => Frame::Resize(WindowSize {
                    rows: u16::from_le_bytes([r0, r1]),
                    cols: u16::from_le_bytes([c0, c1]),
                }),
                _ => return Err(FrameError::Malformed("resize")),
            },
            SIGNAL => Frame::Signal(i32::from_le_bytes(
                payload[..]
                    .try_into()
                    .map_err(|_| FrameError::Malformed("signal"))?,
            )),
            STDOUT => Frame::Stdout(payload),
            STDERR => Frame::Stderr(payload),
            EXIT => match payload[..] {
                [status] => Frame::Exit(status),
                _ => return Err(FrameError::Malformed("exit")),
            },
            REFUSED => match payload.split_first() {
                Some((&status, reason)) => Frame::Refused {
                    status,
                    reason: String::from_utf8_lossy(reason).into_owned(),
                },
                None => return Err(FrameError::Malformed("refused")),
            },
            kind => return Err(FrameError::Kind(kind)),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_frame_round_trips() {
        let frames = [
            Frame::Request(ExecRequest {
                argv: vec!["/bin/sh".into(), "-c".into(), "id".into()],
                env: BTreeMap::from([("A".into(), "b c".into())]),
                workdir: Some("/srv".into()),
                user: Some("app:wheel".into()),
                groups: Some(vec![10, 29]),
                tty: Some(WindowSize { rows: 24, cols: 80 }),
                stdin: true,
                root: Some("/dev/vdb".into()),
                mounts: Vec::new(),
            }),
            Frame::Release("/dev/vdb".into()),
            Frame::Stdin(b"input".to_vec()),
            Frame::StdinEnd,
            Frame::Resize(WindowSize {
                rows: 50,
                cols: 132,
            }),
            Frame::Signal(15),
            Frame::Stdout(vec![0, 1, 2]),
            Frame::Stderr(Vec::new()),
            Frame::Exit(137),
            Frame::Refused {
                status: 127,
                reason: "no such program".into(),
            },
        ];
        let mut wire = Vec::new();
        for frame in &frames {
            frame.write_to(&mut wire).unwrap();
        }
        let mut input = &wire[..];
        for frame in frames {
            assert_eq!(Frame::read_from(&mut input).unwrap(), Some(frame));
        }
        assert_eq!(Frame::read_from(&mut input).unwrap(), None);
    }

    #[test]
    fn a_request_without_a_root_runs_in_the_guests_own() {
        let request: ExecRequest = serde_json::from_str(r#"{"argv":["/bin/true"]}"#).unwrap();
        assert_eq!(request.root, None);
        let request: ExecRequest =
            serde_json::from_str(r#"{"argv":["/bin/true"],"root":"/dev/vdc"}"#).unwrap();
        assert_eq!(request.root.as_deref(), Some("/dev/vdc"));
    }

    #[test]
    fn bad_frames_are_errors() {
        let cases: [(&[u8], &str); 6] = [
            (&[99, 0, 0, 0, 0], "kind 99"),
            (&[9, 1, 0, 0, 0, 15], "malformed signal"),
            (&[5, 0, 0, 0, 1], "over the limit"),
            (&[4, 1, 0, 0, 0, 7], "malformed resize"),
            (&[5, 4, 0, 0, 0, 1], "exec stream"),
            (&[10, 1, 0, 0, 0, 0xff], "malformed release"),
        ];
        for (bytes, want) in cases {
            let err = Frame::read_from(&mut &bytes[..]).unwrap_err().to_string();
            assert!(err.contains(want), "{bytes:?}: {err}");
        }
    }
}
