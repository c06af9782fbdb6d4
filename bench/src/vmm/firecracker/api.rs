//! Firecracker's HTTP API on its unix socket, as the restore needs it:
//! a few JSON requests, each answered before the next is sent.
//! Hand-written over `UnixStream` rather than taken from a crate: one
//! request shape (a method, a path, a JSON body; an empty success or a
//! JSON fault back), and this crate has no async runtime for hyper's.
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// How long one request may take to be answered.
const TIMEOUT: Duration = Duration::from_secs(10);

/// A request to the API that did not succeed.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The socket never accepted a connection within the limit.
    #[error("cannot connect to Firecracker's API socket {socket}")]
    Connect {
        /// The socket.
        socket: PathBuf,
        /// The last try's error.
        #[source]
        source: std::io::Error,
    },
    /// The request could not be sent, or its answer read.
    #[error("{request}: no answer")]
    Io {
        /// Its method and path.
        request: String,
        /// What the system said.
        #[source]
        source: std::io::Error,
    },
    /// The answer is not HTTP/1.1 with a status and a Content-Length.
    #[error("{request}: a malformed answer: {head:?}")]
    Malformed {
        /// The request's method and path.
        request: String,
        /// The answer's head, as read.
        head: String,
    },
    /// Firecracker refused the request.
    #[error("{request}: HTTP {status}: {body}")]
    Refused {
        /// The request's method and path.
        request: String,
        /// The answer's status code.
        status: u16,
        /// Its body: Firecracker's `fault_message`.
        body: String,
    },
}

/// A connection to a Firecracker's API.
pub struct Api(BufReader<UnixStream>);

impl Api {
    /// Connects to `socket`, retrying while Firecracker, just spawned,
    /// has yet to create it, for up to `limit`.
    pub fn connect(socket: &Path, limit: Duration) -> Result<Api, ApiError> {
        let started = Instant::now();
        let connect_err = |source| ApiError::Connect {
            socket: socket.to_path_buf(),
            source,
        };
        let stream = loop {
            match UnixStream::connect(socket) {
                Ok(stream) => break stream,
                Err(err) if started.elapsed() > limit => return Err(connect_err(err)),
                Err(_) => std::thread::sleep(Duration::from_micros(200)),
            }
        };
        stream
            .set_read_timeout(Some(TIMEOUT))
            .map_err(connect_err)?;
        Ok(Api(BufReader::new(stream)))
    }

    /// `method path` with the JSON `body`, which must succeed (2xx).
    pub fn call(
        &mut self,
        method: &str,
        path: &str,
        body: &serde_json::Value,
    ) -> Result<(), ApiError> {
        let request = format!("{method} {path}");
        let body = body.to_string();
        let io = |source| ApiError::Io {
            request: request.clone(),
            source,
        };
        let head = format!(
            "{request} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n\
             Accept: application/json\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        let stream = self.0.get_mut();
        stream.write_all(head.as_bytes()).map_err(io)?;
        stream.write_all(body.as_bytes()).map_err(io)?;
        let (status, body) = self.answer().map_err(|err| match err {
            Answer::Io(source) => io(source),
            Answer::Malformed(head) => ApiError::Malformed {
                request: request.clone(),
                head,
            },
        })?;
        if !(200..300).contains(&status) {
            return Err(ApiError::Refused {
                request,
                status,
                body,
            });
        }
        Ok(())
    }

    /// The next answer's status code and body.
    fn answer(&mut self) -> Result<(u16, String), Answer> {
        let mut head = String::new();
        loop {
            let from = head.len();
            if self.0.read_line(&mut head).map_err(Answer::Io)? == 0 {
                return Err(Answer::Malformed(head));
            }
            if head[from..].trim_end().is_empty() {
                break;
            }
        }
        let Some((status, length)) = parse_head(&head) else {
            return Err(Answer::Malformed(head));
        };
        let mut body = vec![0; length];
        self.0.read_exact(&mut body).map_err(Answer::Io)?;
        Ok((status, String::from_utf8_lossy(&body).into_owned()))
    }
}

/// Why an answer could not be read.
enum Answer {
    Io(std::io::Error),
    Malformed(String),
}

/// The status code and Content-Length (0 when absent, as in Firecracker's
/// 204s) of an answer's `head`, status line and headers.
fn parse_head(head: &str) -> Option<(u16, usize)> {
    let mut lines = head.lines();
    let status = lines
        .next()?
        .strip_prefix("HTTP/1.1 ")?
        .get(..3)?
        .parse()
        .ok()?;
    let mut length = 0;
    for line in lines {
        if let Some((name, value)) = line.split_once(':')
            && name.trim().eq_ignore_ascii_case("content-length")
        {
            length = value.trim().parse().ok()?;
        }
    }
    Some((status, length))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_head_gives_its_status_and_length() {
        assert_eq!(
            parse_head("HTTP/1.1 204 \r\nServer: Firecracker API\r\n\r\n"),
            Some((204, 0))
        );
        assert_eq!(
            parse_head("HTTP/1.1 400 \r\ncontent-length: 42\r\n\r\n"),
            Some((400, 42))
        );
        assert_eq!(parse_head("SSH-2.0\r\n\r\n"), None);
        assert_eq!(
            parse_head("HTTP/1.1 200 \r\nContent-Length: x\r\n\r\n"),
            None
        );
    }

    #[test]
    fn a_refusal_says_the_request_status_and_fault() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("api.sock");
        let listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
        let server = std::thread::spawn(move || {
            let (stream, _) = listener.accept().unwrap();
            let mut stream = BufReader::new(stream);
            let mut line = String::new();
            while stream.read_line(&mut line).unwrap() > 0 && !line.ends_with("\r\n\r\n") {}
            let mut body = [0; 2];
            stream.read_exact(&mut body).unwrap();
            let fault = r#"{"fault_message":"no"}"#;
            let answer = format!(
                "HTTP/1.1 400 \r\nContent-Length: {}\r\n\r\n{fault}",
                fault.len()
            );
            stream.get_mut().write_all(answer.as_bytes()).unwrap();
            line
        });
        let mut api = Api::connect(&socket, Duration::from_secs(1)).unwrap();
        let err = api
            .call("PUT", "/snapshot/load", &serde_json::json!({}))
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            r#"PUT /snapshot/load: HTTP 400: {"fault_message":"no"}"#
        );
        let request = server.join().unwrap();
        assert!(
            request.starts_with("PUT /snapshot/load HTTP/1.1\r\n"),
            "{request}"
        );
        assert!(request.contains("Content-Length: 2\r\n"), "{request}");
    }
}
