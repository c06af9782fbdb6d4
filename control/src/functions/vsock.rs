//! The host's end of a vsock stream to a guest port, through the VMM's
//! unix socket (the Firecracker convention the vsock device serves):
//! connect, write `CONNECT <port>\n`, read `OK <host port>\n`; the bytes
//! that follow are the guest's.
use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// How often a refused or not-yet-there connection is tried again.
const RETRY: Duration = Duration::from_millis(5);
/// How long the first attempt waits for the VMM's answer to CONNECT: the
/// guest answers a connection request at once when something listens.
/// An unanswered attempt is given up and the next one waits twice as
/// long, up to [`ANSWER_TIMEOUT`], so a lost answer costs a retry rather
/// than the whole timeout. (Lost answers were how restored guests once
/// answered their first REQUEST with the template's CID, which the device
/// dropped; the device now holds REQUESTs until the guest has handled its
/// transport reset, see `devices::virtio::vsock`. Waiting the whole
/// [`ANSWER_TIMEOUT`] first had cost every clone 2 s, `kiln bench`.)
const FIRST_ANSWER_TIMEOUT: Duration = Duration::from_millis(50);
/// The longest one attempt waits for the answer.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(2);

/// Why [`connect`] gave up: the last attempt's error, as the cause of one
/// that names the port and the socket. [`connect`] returns it inside an
/// `io::Error` of the last attempt's kind, whose `source` is that attempt's
/// error.
#[derive(Debug, thiserror::Error)]
#[error("vsock port {port} through {}", socket.display())]
pub struct ConnectError {
    /// The guest port.
    pub port: u32,
    /// The VMM's vsock socket.
    pub socket: PathBuf,
    /// Why the last attempt failed.
    #[source]
    pub source: io::Error,
}

/// A stream to guest `port` through the VMM socket at `socket`, retried
/// until `timeout`: the socket appears as the VM starts, and the guest's
/// listener a little later. The error, once `timeout` has passed, is a
/// [`ConnectError`] (print it with `kiln_vmm::report::one_line`).
pub fn connect(socket: &Path, port: u32, timeout: Duration) -> io::Result<UnixStream> {
    let started = Instant::now();
    let mut answer_timeout = FIRST_ANSWER_TIMEOUT;
    loop {
        match connect_once(socket, port, answer_timeout) {
            Ok(stream) => return Ok(stream),
            Err(err) if started.elapsed() >= timeout => {
                let kind = err.kind();
                let given_up = ConnectError {
                    port,
                    socket: socket.to_path_buf(),
                    source: err,
                };
                return Err(io::Error::new(kind, given_up));
            }
            Err(err) if unanswered(&err) => {
                answer_timeout = (answer_timeout * 2).min(ANSWER_TIMEOUT);
            }
            Err(_) => std::thread::sleep(RETRY),
        }
    }
}

/// The VMM took the CONNECT but no answer came in time.
fn unanswered(err: &io::Error) -> bool {
    matches!(
        err.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

fn connect_once(socket: &Path, port: u32, answer_timeout: Duration) -> io::Result<UnixStream> {
    let mut stream = UnixStream::connect(socket)?;
    stream.set_read_timeout(Some(answer_timeout))?;
    stream.write_all(format!("CONNECT {port}\n").as_bytes())?;
    // Byte by byte: what follows the answer's newline is the guest's.
    let mut answer = Vec::new();
    let mut byte = [0u8];
    while answer.last() != Some(&b'\n') {
        if stream.read(&mut byte)? == 0 {
            return Err(io::Error::new(
                io::ErrorKind::ConnectionRefused,
                "the VMM closed the connection: nothing listens on that guest port yet",
            ));
        }
        answer.push(byte[0]);
        if answer.len() > 64 {
            return Err(io::Error::other("the VMM's answer to CONNECT is too long"));
        }
    }
    match std::str::from_utf8(&answer) {
        Ok(line) if line.starts_with("OK ") => {
            stream.set_read_timeout(None)?;
            Ok(stream)
        }
        _ => Err(io::Error::other(format!(
            "the VMM answered CONNECT with {:?}",
            String::from_utf8_lossy(&answer)
        ))),
    }
}

#[cfg(test)]
mod tests {
    use std::io::BufRead;
    use std::os::unix::net::UnixListener;

    use super::*;

    /// A fake VMM socket that refuses the first connection, then accepts.
    fn fake_vmm(path: &Path) -> std::thread::JoinHandle<String> {
        let listener = UnixListener::bind(path).unwrap();
        std::thread::spawn(move || {
            drop(listener.accept().unwrap());
            let (stream, _) = listener.accept().unwrap();
            let mut reader = io::BufReader::new(stream);
            let mut request = String::new();
            reader.read_line(&mut request).unwrap();
            reader
                .get_mut()
                .write_all(b"OK 1073741824\nguest bytes")
                .unwrap();
            request
        })
    }

    #[test]
    fn connect_says_which_port_and_hands_over_the_guests_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vsock.sock");
        let vmm = fake_vmm(&path);
        let mut stream = connect(&path, 5000, Duration::from_secs(5)).unwrap();
        let mut rest = String::new();
        stream.read_to_string(&mut rest).unwrap();
        assert_eq!(rest, "guest bytes");
        assert_eq!(vmm.join().unwrap(), "CONNECT 5000\n");
    }

    #[test]
    fn an_unanswered_connect_is_given_up_soon_and_tried_again() {
        use std::sync::Arc;
        use std::sync::atomic::{AtomicBool, Ordering};

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vsock.sock");
        let listener = UnixListener::bind(&path).unwrap();
        listener.set_nonblocking(true).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let vmm = std::thread::spawn(move || {
            // The first CONNECT is taken and never answered (a restored
            // guest's answer dropped), its connection kept open; every
            // later one is answered (a loaded test machine may make the
            // client give one up before the answer reaches it).
            let mut held = Vec::new();
            while !stopped.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((mut stream, _)) => {
                        if !held.is_empty() {
                            let _ = stream.write_all(b"OK 1073741825\n");
                        }
                        held.push(stream);
                    }
                    Err(err) if err.kind() == io::ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(1));
                    }
                    Err(err) => panic!("accept: {err}"),
                }
            }
            held.len()
        });
        let started = Instant::now();
        connect(&path, 5000, Duration::from_secs(10)).unwrap();
        let took = started.elapsed();
        stop.store(true, Ordering::SeqCst);
        assert!(
            vmm.join().unwrap() >= 2,
            "the silent CONNECT was not tried again"
        );
        assert!(took < Duration::from_millis(1500), "waited {took:?}");
    }

    #[test]
    fn no_vmm_socket_is_an_error_naming_it_after_the_timeout() {
        let err = connect(
            Path::new("/nonexistent/vsock.sock"),
            52,
            Duration::from_millis(20),
        )
        .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
        let line = kiln_vmm::report::one_line(&err);
        assert!(
            line.starts_with("vsock port 52 through /nonexistent/vsock.sock: "),
            "{line}"
        );
    }
}
