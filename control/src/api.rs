//! The control API of an instance's VMM: HTTP/1.1 with JSON bodies on a
//! unix socket, one request per connection (like Firecracker's API, whose
//! clients are `curl --unix-socket` and the `kiln` CLI). `docs/api.md`
//! documents the routes.
//!
//! Requests are parsed with `httparse`; a request that is malformed, too
//! large, or asks for something the instance's state does not allow gets a
//! 4xx answer with a JSON error, never a crash.
use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use kiln_vmm::report::one_line;
use serde::{Deserialize, Serialize};

/// Headers plus body a request may have: the API's bodies are tiny.
const MAX_REQUEST: usize = 16 * 1024;
/// Headers a request or an answer may have: the CLI and `curl` send a
/// handful; more is a client that is not speaking this API.
const MAX_HEADERS: usize = 32;
/// How long either side waits for the other before giving up.
const IO_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a client has to send its whole request, however it trickles
/// it in. Requests are served one at a time, so a client that sends one
/// byte now and then would otherwise hold the API (or a function URL)
/// forever. The CLI writes its whole request (at most [`MAX_REQUEST`]
/// bytes) in one `write_all`, which takes microseconds; 5 s leaves room
/// for a loaded host or a slow `curl`, and is well within the 30 s
/// ([`IO_TIMEOUT`]) the CLI's own calls wait for an answer, so a stalled
/// client delays them without failing them.
const REQUEST_DEADLINE: Duration = Duration::from_secs(5);

/// A parsed request.
#[derive(Debug, PartialEq, Eq)]
pub struct Request {
    /// The HTTP method as sent (`GET`, `PUT`, ...), which routes match on.
    pub method: String,
    /// The request target as sent, query included (`/actions`).
    pub path: String,
    /// The body, exactly `Content-Length` bytes (empty without one).
    pub body: Vec<u8>,
}

/// A response: a status and a JSON body (or none).
#[derive(Debug, PartialEq)]
pub struct Response {
    /// The HTTP status code.
    pub status: u16,
    /// The JSON body; `None` sends no body (a 204).
    pub body: Option<serde_json::Value>,
}

/// The body of `PUT /actions`.
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ActionBody {
    /// What to do: `stop`, `reboot`, `pause`, `resume` or `hibernate`
    /// (`docs/api.md`).
    pub action: String,
}

impl Response {
    /// A `status` answer with `body` serialized as its JSON body.
    pub fn json(status: u16, body: impl Serialize) -> Self {
        Response {
            status,
            body: Some(serde_json::to_value(body).unwrap_or(serde_json::Value::Null)),
        }
    }

    /// A 204 answer: the request was carried out and there is nothing
    /// to say.
    pub fn no_content() -> Self {
        Response {
            status: 204,
            body: None,
        }
    }

    /// A 4xx/5xx answer: `{"error": message}`.
    pub fn error(status: u16, message: impl Into<String>) -> Self {
        Response::json(status, serde_json::json!({ "error": message.into() }))
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        204 => "No Content",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        409 => "Conflict",
        413 => "Content Too Large",
        502 => "Bad Gateway",
        _ => "Internal Server Error",
    }
}

/// Why a request could not even be parsed; it is answered with
/// [`Malformed::status`] and the error's line.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum Malformed {
    /// The request line or a header is not HTTP/1.1.
    #[error("malformed request")]
    Syntax(#[source] httparse::Error),
    /// The `Content-Length` header is not a decimal number.
    #[error("Content-Length is not a number")]
    ContentLength,
    /// The body announced would take the request past [`MAX_REQUEST`].
    #[error(
        "Content-Length {content_length}: expected at most {} bytes after a {head_len}-byte head (requests are limited to {MAX_REQUEST} bytes)",
        MAX_REQUEST.saturating_sub(*head_len)
    )]
    TooLarge {
        /// The length the header announced.
        content_length: usize,
        /// The length of the request line and headers.
        head_len: usize,
    },
}

impl Malformed {
    /// The HTTP status the request is answered with.
    pub fn status(&self) -> u16 {
        match self {
            Malformed::Syntax(_) | Malformed::ContentLength => 400,
            Malformed::TooLarge { .. } => 413,
        }
    }
}

/// Parses one complete request from `bytes`; `Ok(None)` asks for more.
pub fn parse_request(bytes: &[u8]) -> Result<Option<Request>, Malformed> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut parsed = httparse::Request::new(&mut headers);
    let head_len = match parsed.parse(bytes) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(err) => return Err(Malformed::Syntax(err)),
    };
    let content_length = match parsed
        .headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case("content-length"))
    {
        None => 0,
        Some(h) => std::str::from_utf8(h.value)
            .ok()
            .and_then(|v| v.trim().parse::<usize>().ok())
            .ok_or(Malformed::ContentLength)?,
    };
    // Checked: a Content-Length near usize::MAX would wrap the sum to a
    // small number and the slice below would panic.
    let Some(total) = head_len
        .checked_add(content_length)
        .filter(|&total| total <= MAX_REQUEST)
    else {
        return Err(Malformed::TooLarge {
            content_length,
            head_len,
        });
    };
    let Some(body) = bytes.get(head_len..total) else {
        return Ok(None);
    };
    Ok(Some(Request {
        method: parsed.method.unwrap_or_default().to_string(),
        path: parsed.path.unwrap_or_default().to_string(),
        body: body.to_vec(),
    }))
}

/// A connection a request arrives on: the instance API's unix socket, or
/// a function URL's TCP socket. Beyond reading and writing, [`serve_one`]
/// sets its timeouts, which bound how long a client can hold the server.
pub trait Connection: Read + Write {
    /// How long a read may wait; `None` waits for ever.
    fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()>;
    /// How long a write may wait; `None` waits for ever.
    fn set_write_timeout(&self, timeout: Option<Duration>) -> io::Result<()>;
}

impl Connection for UnixStream {
    fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        UnixStream::set_read_timeout(self, timeout)
    }
    fn set_write_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        UnixStream::set_write_timeout(self, timeout)
    }
}

impl Connection for std::net::TcpStream {
    fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        std::net::TcpStream::set_read_timeout(self, timeout)
    }
    fn set_write_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        std::net::TcpStream::set_write_timeout(self, timeout)
    }
}

/// Reads one request from `stream`, has `handle` answer it and writes the
/// answer back. A request that has not arrived whole within
/// [`REQUEST_DEADLINE`] is answered 408 and not handled.
pub fn serve_one(
    stream: impl Connection,
    handle: impl FnOnce(Request) -> Response,
) -> io::Result<()> {
    serve_one_within(stream, REQUEST_DEADLINE, handle)
}

/// [`serve_one`] with the whole-request deadline as a parameter, so tests
/// need not wait seconds.
fn serve_one_within(
    mut stream: impl Connection,
    deadline: Duration,
    handle: impl FnOnce(Request) -> Response,
) -> io::Result<()> {
    let started = Instant::now();
    let mut bytes = Vec::new();
    let mut chunk = [0u8; 4096];
    let response = loop {
        match parse_request(&bytes) {
            Ok(Some(request)) => break handle(request),
            Err(malformed) => break Response::error(malformed.status(), one_line(&malformed)),
            Ok(None) if bytes.len() > MAX_REQUEST => {
                break Response::error(413, format!("requests are limited to {MAX_REQUEST} bytes"));
            }
            Ok(None) => {}
        }
        // Each read waits only for what is left of the deadline, so the
        // deadline holds however slowly the bytes come.
        let left = deadline.saturating_sub(started.elapsed());
        if left.is_zero() {
            break Response::error(
                408,
                format!(
                    "the request did not arrive whole within {} ms ({} bytes came)",
                    deadline.as_millis(),
                    bytes.len()
                ),
            );
        }
        stream.set_read_timeout(Some(left))?;
        match stream.read(&mut chunk) {
            Ok(0) => return Ok(()),
            Ok(n) => bytes.extend_from_slice(&chunk[..n]),
            // The timeout: the loop's check answers it.
            Err(err)
                if matches!(
                    err.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) => {}
            Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
            Err(err) => return Err(err),
        }
    };
    // A client that never reads must not hold the server either, once an
    // answer outgrows the socket's buffer: the answer gets the same time.
    stream.set_write_timeout(Some(deadline))?;
    stream.write_all(&encode_response(&response))
}

fn encode_response(response: &Response) -> Vec<u8> {
    let body = response
        .body
        .as_ref()
        .map(|b| serde_json::to_vec(b).unwrap_or_default())
        .unwrap_or_default();
    let mut out = format!(
        "HTTP/1.1 {} {}\r\nConnection: close\r\nContent-Length: {}\r\n",
        response.status,
        reason(response.status),
        body.len()
    );
    if response.body.is_some() {
        out.push_str("Content-Type: application/json\r\n");
    }
    out.push_str("\r\n");
    let mut bytes = out.into_bytes();
    bytes.extend(body);
    bytes
}

/// Errors of the client side.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The socket could not be connected to, written or read: no VMM
    /// serves it (the instance is not running), or it stopped answering.
    #[error("cannot reach the instance's VMM at {path}")]
    Connect {
        /// The API socket.
        path: String,
        /// What the socket call said.
        #[source]
        source: io::Error,
    },
    /// The connection ended before a whole answer's head had come.
    #[error("the VMM's answer is cut short")]
    CutShort,
    /// The answer is not an HTTP/1.1 response.
    #[error("the VMM's answer is not HTTP")]
    NotHttp(#[source] httparse::Error),
    /// The answer's body is not JSON.
    #[error("the VMM's answer's body is not JSON")]
    NotJson(#[source] serde_json::Error),
}

/// Sends one request to the API at `socket`; returns the status and body.
pub fn call(
    socket: &Path,
    method: &str,
    path: &str,
    body: Option<&serde_json::Value>,
) -> Result<Response, ClientError> {
    call_waiting(socket, method, path, body, IO_TIMEOUT)
}

/// [`call`], waiting up to `timeout` for the answer (a snapshot takes a while).
pub fn call_waiting(
    socket: &Path,
    method: &str,
    path: &str,
    body: Option<&serde_json::Value>,
    timeout: Duration,
) -> Result<Response, ClientError> {
    let connect_err = |source| ClientError::Connect {
        path: socket.display().to_string(),
        source,
    };
    let mut stream = UnixStream::connect(socket).map_err(connect_err)?;
    stream
        .set_read_timeout(Some(timeout))
        .map_err(connect_err)?;
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).map_err(connect_err)?;
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).map_err(connect_err)?;
    parse_response(&answer)
}

fn parse_response(bytes: &[u8]) -> Result<Response, ClientError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut parsed = httparse::Response::new(&mut headers);
    let head_len = match parsed.parse(bytes) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Err(ClientError::CutShort),
        Err(err) => return Err(ClientError::NotHttp(err)),
    };
    let status = parsed.code.unwrap_or(0);
    let body = &bytes[head_len..];
    let body = if body.is_empty() {
        None
    } else {
        Some(serde_json::from_slice(body).map_err(ClientError::NotJson)?)
    };
    Ok(Response { status, body })
}

#[cfg(test)]
mod tests {
    use std::os::unix::net::UnixListener;

    use super::*;

    #[test]
    fn requests_parse_whole_or_ask_for_more() {
        let full = b"PUT /actions HTTP/1.1\r\nContent-Length: 19\r\n\r\n{\"action\":\"pause\"}x";
        let request = parse_request(&full[..]).unwrap().unwrap();
        assert_eq!(request.method, "PUT");
        assert_eq!(request.path, "/actions");
        assert_eq!(request.body, b"{\"action\":\"pause\"}x");
        assert_eq!(parse_request(&full[..30]), Ok(None));
        assert_eq!(parse_request(&full[..full.len() - 1]), Ok(None));
        assert_eq!(
            parse_request(b"\x00\x01 nonsense\r\n\r\n")
                .unwrap_err()
                .status(),
            400
        );
        let huge = format!("PUT / HTTP/1.1\r\nContent-Length: {}\r\n\r\n", MAX_REQUEST);
        assert_eq!(parse_request(huge.as_bytes()).unwrap_err().status(), 413);
        let bad = b"GET / HTTP/1.1\r\nContent-Length: lots\r\n\r\n";
        assert_eq!(parse_request(bad).unwrap_err().status(), 400);
    }

    #[test]
    fn a_content_length_that_would_wrap_is_refused_not_a_panic() {
        let wrapping = format!("PUT / HTTP/1.1\r\nContent-Length: {}\r\n\r\n", usize::MAX);
        let refused = parse_request(wrapping.as_bytes()).unwrap_err();
        assert_eq!(refused.status(), 413);
        let message = one_line(&refused);
        assert!(message.contains(&usize::MAX.to_string()), "{message}");
        // One byte over is refused too (`head` is as long as its head: the
        // length has five digits either way).
        let head = "PUT / HTTP/1.1\r\nContent-Length: 99999\r\n\r\n";
        let over = format!(
            "PUT / HTTP/1.1\r\nContent-Length: {}\r\n\r\n",
            MAX_REQUEST - head.len() + 1
        );
        assert_eq!(parse_request(over.as_bytes()).unwrap_err().status(), 413);
    }

    #[test]
    fn a_trickling_client_is_answered_408_at_the_deadline() {
        use std::sync::Arc;
        use std::sync::atomic::{AtomicBool, Ordering};

        let (server, mut client) = UnixStream::pair().unwrap();
        let mut writer = client.try_clone().unwrap();
        let done = Arc::new(AtomicBool::new(false));
        let trickling = done.clone();
        // A request that would be valid, were its header ever finished:
        // one byte every 10 ms, far slower than the deadline allows.
        let trickle = std::thread::spawn(move || {
            let start = b"GET /instance HTTP/1.1\r\nX-Slow: ".iter();
            for byte in start.chain(std::iter::repeat(&b'a')) {
                if trickling.load(Ordering::Relaxed) || writer.write_all(&[*byte]).is_err() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        });
        let deadline = Duration::from_millis(200);
        let started = Instant::now();
        serve_one_within(server, deadline, |_| {
            unreachable!("an unfinished request is not handled")
        })
        .unwrap();
        let took = started.elapsed();
        done.store(true, Ordering::Relaxed);
        assert!(took >= deadline, "answered after {took:?}");
        assert!(took < Duration::from_secs(2), "answered after {took:?}");
        let mut answer = Vec::new();
        client.read_to_end(&mut answer).unwrap();
        let response = parse_response(&answer).unwrap();
        assert_eq!(response.status, 408);
        assert!(
            response.body.unwrap()["error"]
                .as_str()
                .unwrap()
                .contains("200 ms")
        );
        trickle.join().unwrap();
    }

    #[test]
    fn a_call_round_trips_over_a_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("api.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let server = std::thread::spawn(move || {
            let (stream, _) = listener.accept().unwrap();
            serve_one(stream, |request| {
                Response::json(
                    200,
                    serde_json::json!({ "path": request.path, "len": request.body.len() }),
                )
            })
            .unwrap();
            let (stream, _) = listener.accept().unwrap();
            serve_one(stream, |_| Response::no_content()).unwrap();
        });
        let body = serde_json::json!({ "action": "pause" });
        let answer = call(&path, "PUT", "/actions", Some(&body)).unwrap();
        assert_eq!(answer.status, 200);
        assert_eq!(answer.body.unwrap()["path"], "/actions");
        assert_eq!(
            call(&path, "GET", "/", None).unwrap(),
            Response::no_content()
        );
        server.join().unwrap();
    }

    #[test]
    fn garbage_on_the_socket_gets_a_json_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("api.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let server = std::thread::spawn(move || {
            let (stream, _) = listener.accept().unwrap();
            serve_one(stream, |_| {
                unreachable!("a malformed request is not handled")
            })
            .unwrap();
        });
        let mut client = UnixStream::connect(&path).unwrap();
        client.write_all(b"\x16\x03\x01 not http\r\n\r\n").unwrap();
        let mut answer = Vec::new();
        client.read_to_end(&mut answer).unwrap();
        let response = parse_response(&answer).unwrap();
        assert_eq!(response.status, 400);
        assert!(
            response.body.unwrap()["error"]
                .as_str()
                .unwrap()
                .contains("malformed")
        );
        server.join().unwrap();
    }
}
