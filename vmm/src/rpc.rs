//! The control channel from an instance's VMM process to its VM process:
//! one request at a time, as a JSON line on a socketpair whose VM end the
//! VM process inherits (`kiln __vm --control-fd N`), answered
//! by one JSON line.
//!
//! Signals served a VM process well for "stop", but pausing the vCPUs
//! inside the VMM, taking a snapshot and filling a pod's empty drive need
//! an answer (done, or why not) and arguments (where to write the
//! snapshot, which disk goes in which drive), so they travel here. The VM
//! process reads requests in its event loop and carries them out between
//! events, with the whole machine at hand ([`crate::builder`]).
use std::error::Error;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use serde::{Deserialize, Serialize};

use crate::config::DiskSource;
use crate::devices::lock;
use crate::report::one_line;

/// The longest request line the VM process accepts.
const MAX_LINE: usize = 64 * 1024;

/// What an instance's VMM asks of its VM process.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "lowercase", deny_unknown_fields)]
pub enum ControlRequest {
    /// Park the vCPUs outside the guest.
    Pause,
    /// Let parked vCPUs run again.
    Resume,
    /// Write a snapshot into the existing, empty directory `dir`.
    Snapshot {
        /// The directory, which the VMM process has created empty.
        dir: PathBuf,
        /// Copy the root disk's writes (its overlay) into the snapshot, so
        /// it can be restored anywhere; a hibernation keeps the instance's
        /// own root volume instead.
        copy_root: bool,
        /// Whether the VM goes on or ends once the snapshot is written.
        then: AfterSnapshot,
    },
    /// Fill an empty drive ([`DiskSource::Empty`]) with a disk: a pod's
    /// container's root, added after the VM booted. Answered once the
    /// device holds the disk and has told the driver its new capacity
    /// (a configuration change interrupt); the guest's kernel re-reads it
    /// from a work queue, so the disk may look empty to the guest for a
    /// moment longer.
    AttachDisk {
        /// The drive's position in `VmConfig::disks` (the guest's
        /// `/dev/vd<a + index>`); it must be empty.
        index: usize,
        /// The disk, opened at this path as the host sees it; not
        /// [`DiskSource::Empty`].
        source: DiskSource,
    },
}

/// What the VM does once its snapshot is written.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AfterSnapshot {
    /// Go on as before (a paused VM stays paused).
    Continue,
    /// End: the snapshot holds the VM now (stop-hibernate).
    Stop,
}

/// The VM process's answer.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ControlReply {
    /// Why the request failed; `None` when it was carried out.
    pub error: Option<String>,
    /// What a snapshot request wrote.
    pub snapshot: Option<SnapshotStats>,
}

impl ControlReply {
    /// The answer to a request that failed because of `err`, which the
    /// VMM process shows as it is: the error and its causes on one line.
    pub fn failed(err: &(dyn Error + 'static)) -> Self {
        ControlReply {
            error: Some(one_line(err)),
            snapshot: None,
        }
    }
}

/// What taking a snapshot cost.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotStats {
    /// From the request to the vCPUs running again (or the VM ending).
    pub total_us: u64,
    /// How long the guest was paused for it.
    pub paused_us: u64,
    /// Guest memory's size, in bytes.
    pub memory_bytes: u64,
    /// The part of guest memory that was not zero, and so was written to
    /// the memory file (the rest is a hole).
    pub memory_written: u64,
    /// The state file's size, in bytes.
    pub state_bytes: u64,
    /// The root overlay's bytes copied, when asked for.
    pub root_bytes: u64,
}

/// Errors on the channel.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// The socketpair cannot be created.
    #[error("cannot create the control channel")]
    Create(#[source] io::Error),
    /// Sending the request or reading the answer failed, or timed out.
    #[error("the VM process did not answer")]
    Io(#[from] io::Error),
    /// The VM process closed its end before it answered.
    #[error("the VM process gave no answer (it has ended)")]
    Closed,
    /// The answer line is not a [`ControlReply`].
    #[error("the VM process answered nonsense")]
    Garbled(#[source] serde_json::Error),
}

/// A request line that does not parse: the VM process says so in its reply.
#[derive(Debug, thiserror::Error)]
#[error("not a control request")]
struct NotARequest(#[source] serde_json::Error);

/// The VMM process's end: sends requests and waits for answers.
pub struct ControlClient {
    stream: BufReader<UnixStream>,
}

/// A new channel: the client end, and the end for the VM process to
/// inherit (its descriptor number goes on the VM process's command line).
pub fn channel() -> Result<(ControlClient, OwnedFd), ControlError> {
    let (ours, theirs) = UnixStream::pair().map_err(ControlError::Create)?;
    Ok((
        ControlClient {
            stream: BufReader::new(ours),
        },
        OwnedFd::from(theirs),
    ))
}

impl ControlClient {
    /// The raw socket (tests write to it directly).
    #[cfg(test)]
    pub(crate) fn into_stream(self) -> UnixStream {
        self.stream.into_inner()
    }

    /// Sends `request` and waits up to `timeout` for its answer.
    pub fn call(
        &mut self,
        request: &ControlRequest,
        timeout: Duration,
    ) -> Result<ControlReply, ControlError> {
        let mut line = serde_json::to_vec(request).expect("a request serializes");
        line.push(b'\n');
        self.stream.get_mut().write_all(&line)?;
        self.stream.get_ref().set_read_timeout(Some(timeout))?;
        let mut answer = String::new();
        if self.stream.read_line(&mut answer)? == 0 {
            return Err(ControlError::Closed);
        }
        serde_json::from_str(&answer).map_err(ControlError::Garbled)
    }
}

/// The VM process's end, in its event loop: parses each request line and
/// leaves it for the loop's owner to carry out ([`crate::event_loop`]).
/// The VMM process sends a request only once the last one is answered,
/// so a read never holds a second request back in the buffer.
pub struct ControlListener {
    stream: BufReader<UnixStream>,
    pending: Arc<Mutex<Option<ControlRequest>>>,
}

impl ControlListener {
    /// Adopts the inherited descriptor `fd`.
    ///
    /// # Safety
    /// `fd` must be an open socket descriptor that nothing else in this
    /// process owns.
    pub unsafe fn adopt(fd: i32) -> Self {
        // SAFETY: the caller guarantees `fd` is an open, unowned socket.
        let stream = unsafe { UnixStream::from_raw_fd(fd) };
        ControlListener {
            stream: BufReader::new(stream),
            pending: Arc::default(),
        }
    }

    /// Where the listener leaves a request it has read.
    pub fn pending(&self) -> Arc<Mutex<Option<ControlRequest>>> {
        self.pending.clone()
    }

    /// A handle to answer requests on.
    pub fn replier(&self) -> io::Result<ControlReplier> {
        Ok(ControlReplier(self.stream.get_ref().try_clone()?))
    }

    fn read_request(&mut self) -> io::Result<Option<ControlRequest>> {
        let mut line = Vec::new();
        let read = (&mut self.stream)
            .take(MAX_LINE as u64)
            .read_until(b'\n', &mut line)?;
        if read == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        match serde_json::from_slice(&line) {
            Ok(request) => Ok(Some(request)),
            Err(err) => {
                let reply = ControlReply::failed(&NotARequest(err));
                ControlReplier(self.stream.get_ref().try_clone()?).send(&reply)?;
                Ok(None)
            }
        }
    }
}

impl MutEventSubscriber for ControlListener {
    fn process(&mut self, _events: Events, ops: &mut EventOps) {
        match self.read_request() {
            Ok(Some(request)) => *lock(&self.pending) = Some(request),
            Ok(None) => {}
            // The VMM process is gone or broke the channel: no more requests
            // (the VM itself ends with its VMM, see [`crate::supervised::end_with`]).
            Err(err) => {
                if err.kind() != io::ErrorKind::UnexpectedEof {
                    log::error!("control: stopped reading requests: {err}");
                }
                let _ = ops.remove(Events::empty(self.stream.get_ref()));
            }
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(err) = ops.add(Events::new(self.stream.get_ref(), EventSet::IN)) {
            log::error!("control: cannot watch the control channel: {err}");
        }
    }
}

/// Sends answers back to the VMM process.
pub struct ControlReplier(UnixStream);

impl ControlReplier {
    /// Writes `reply` as one JSON line: the answer to the request the
    /// loop's owner last took from [`ControlListener::pending`].
    pub fn send(&self, reply: &ControlReply) -> io::Result<()> {
        let mut line = serde_json::to_vec(reply).expect("a reply serializes");
        line.push(b'\n');
        (&self.0).write_all(&line)
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::IntoRawFd;

    use event_manager::{EventManager, SubscriberOps};

    use super::*;

    fn listener_and_client() -> (
        EventManager<ControlListener>,
        Arc<Mutex<Option<ControlRequest>>>,
        ControlReplier,
        ControlClient,
    ) {
        let (client, theirs) = channel().unwrap();
        // SAFETY: `theirs` is an open socket, handed over whole.
        let listener = unsafe { ControlListener::adopt(theirs.into_raw_fd()) };
        let pending = listener.pending();
        let replier = listener.replier().unwrap();
        let mut manager = EventManager::new().unwrap();
        manager.add_subscriber(listener);
        (manager, pending, replier, client)
    }

    #[test]
    fn a_request_reaches_the_loop_and_its_answer_the_client() {
        let (mut manager, pending, replier, mut client) = listener_and_client();
        let request = ControlRequest::Snapshot {
            dir: "/snap".into(),
            copy_root: true,
            then: AfterSnapshot::Continue,
        };
        let asked = request.clone();
        let asker = std::thread::spawn(move || client.call(&asked, Duration::from_secs(5)));
        assert_eq!(manager.run_with_timeout(5000).unwrap(), 1);
        assert_eq!(pending.lock().unwrap().take(), Some(request));
        let reply = ControlReply {
            error: None,
            snapshot: Some(SnapshotStats {
                memory_bytes: 1 << 27,
                ..SnapshotStats::default()
            }),
        };
        replier.send(&reply).unwrap();
        assert_eq!(asker.join().unwrap().unwrap(), reply);
    }

    #[test]
    fn an_attach_request_has_the_wire_form_of_the_pod_contract() {
        let request = ControlRequest::AttachDisk {
            index: 1,
            source: DiskSource::Raw("/pods/a/root.img".into()),
        };
        let json = serde_json::to_value(&request).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"op": "attachdisk", "index": 1, "source": {"raw": "/pods/a/root.img"}})
        );
        assert_eq!(
            serde_json::from_value::<ControlRequest>(json).unwrap(),
            request
        );
        let empty = r#"{"op":"attachdisk","index":2,"source":"empty"}"#;
        assert_eq!(
            serde_json::from_str::<ControlRequest>(empty).unwrap(),
            ControlRequest::AttachDisk {
                index: 2,
                source: DiskSource::Empty
            }
        );
    }

    #[test]
    fn garbage_is_answered_with_an_error_and_nothing_is_carried_out() {
        let (mut manager, pending, _replier, client) = listener_and_client();
        let mut stream = client.stream;
        stream
            .get_mut()
            .write_all(b"{\"op\":\"explode\"}\n")
            .unwrap();
        manager.run_with_timeout(5000).unwrap();
        assert_eq!(*pending.lock().unwrap(), None);
        let mut answer = String::new();
        stream.read_line(&mut answer).unwrap();
        let reply: ControlReply = serde_json::from_str(&answer).unwrap();
        assert!(reply.error.unwrap().contains("not a control request"));
    }

    #[test]
    fn a_vm_process_that_has_gone_is_an_error_not_a_hang() {
        let (manager, _pending, replier, mut client) = listener_and_client();
        drop((manager, replier));
        let err = client
            .call(&ControlRequest::Pause, Duration::from_secs(5))
            .unwrap_err();
        assert!(
            matches!(err, ControlError::Closed | ControlError::Io(_)),
            "{err}"
        );
    }
}
