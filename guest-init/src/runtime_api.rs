//! The HTTP side of AWS Lambda's Runtime API (`2018-06-01`), as guest-init
//! serves it to the function's runtime on [`RUNTIME_API_ADDRESS`].
//!
//! [`Server`] owns the listener and the runtime's connections, all
//! non-blocking, and is driven from guest-init's single-threaded `poll`
//! loop (`function_runtime`): [`Server::poll_fds`] says what to wait for,
//! [`Server::service`] reads, parses and hands back each complete request
//! as a [`Call`] with its [`Route`]; the loop answers a call at once
//! ([`Server::reply`]) or later (`invocation/next` and `restore/next` are
//! long polls, parked until there is something to say). Requests on one
//! connection are taken one at a time (HTTP/1.1 keep-alive, no
//! pipelining past a parked call).
//!
//! Nothing the runtime sends can end PID 1: a malformed request, an
//! unknown path or a wrong method gets Lambda's JSON error answer
//! (`{"errorMessage":…,"errorType":…}`) and, when the stream cannot be
//! resynchronised, the connection is closed. A body is read only with a
//! `Content-Length` (chunked bodies are refused with 411); one over
//! [`RESPONSE_MAX`] is read and dropped, and the call is handed on as
//! [`Route::TooLarge`] so that the invocation becomes a function error.
use std::collections::BTreeMap;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;

use crate::function::{RESPONSE_MAX, RUNTIME_API_ADDRESS};

/// The prefix of every Runtime API path.
pub const PREFIX: &str = "/2018-06-01/runtime/";
/// The longest request head (request line and headers) accepted.
pub const HEAD_MAX: usize = 64 * 1024;
/// The most headers one request may have.
const HEADERS_MAX: usize = 64;

/// What a runtime asked for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Route {
    /// `GET invocation/next`: wait for the next event.
    Next,
    /// `GET restore/next`: wait until this environment is restored.
    RestoreNext,
    /// `POST invocation/{id}/response`.
    Response(String),
    /// `POST invocation/{id}/error`.
    Error(String),
    /// `POST init/error`.
    InitError,
    /// `POST restore/error`: an after-restore hook failed.
    RestoreError,
    /// A `POST` whose body was over [`RESPONSE_MAX`] (already answered 413,
    /// its body dropped): for `invocation/{id}/response`, the id.
    TooLarge(Option<String>),
}

/// A Runtime API error answer: status and Lambda's error body.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApiError {
    /// The HTTP status.
    pub status: u16,
    /// `errorType` of the body.
    pub error_type: &'static str,
    /// `errorMessage` of the body.
    pub message: String,
}

impl ApiError {
    /// An error answer of `status`, `error_type` and `message`.
    pub fn new(status: u16, error_type: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            error_type,
            message: message.into(),
        }
    }

    /// The JSON body Lambda answers errors with.
    pub fn body(&self) -> Vec<u8> {
        error_body(&self.message, self.error_type)
    }
}

/// Lambda's error shape, `{"errorMessage":…,"errorType":…}`.
pub fn error_body(message: &str, error_type: &str) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "errorMessage": message,
        "errorType": error_type,
    }))
    .expect("a JSON object serializes")
}

/// The route of `method` and `path`, or the error answer for it.
pub fn route(method: &str, path: &str) -> Result<Route, ApiError> {
    let not_found = || ApiError::new(404, "NotFound", format!("no such path: {path}"));
    let rest = path.strip_prefix(PREFIX).ok_or_else(not_found)?;
    let parts: Vec<&str> = rest.split('/').collect();
    let (route, expected) = match parts.as_slice() {
        ["invocation", "next"] => (Route::Next, "GET"),
        ["restore", "next"] => (Route::RestoreNext, "GET"),
        ["init", "error"] => (Route::InitError, "POST"),
        ["restore", "error"] => (Route::RestoreError, "POST"),
        ["invocation", id, "response"] if !id.is_empty() => {
            (Route::Response(id.to_string()), "POST")
        }
        ["invocation", id, "error"] if !id.is_empty() => (Route::Error(id.to_string()), "POST"),
        _ => return Err(not_found()),
    };
    if method != expected {
        return Err(ApiError::new(
            405,
            "MethodNotAllowed",
            format!("{method} {path}: expected {expected}"),
        ));
    }
    Ok(route)
}

/// A request's head, parsed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Head {
    /// `GET`, `POST`…
    pub method: String,
    /// The request target, query string included.
    pub path: String,
    /// Header names lower-cased, values as sent (invalid UTF-8 replaced).
    pub headers: BTreeMap<String, String>,
    /// The head's length in bytes, up to and including its blank line.
    pub len: usize,
    /// The body's length, from `Content-Length` (0 without one).
    pub body_len: usize,
}

/// The head at the start of `buf`: `None` while it is incomplete, an error
/// answer when it is not HTTP/1.x, too long, or has a body of unknown
/// length.
pub fn parse_head(buf: &[u8]) -> Result<Option<Head>, ApiError> {
    let bad = |message: String| ApiError::new(400, "InvalidRequest", message);
    let mut headers = [httparse::EMPTY_HEADER; HEADERS_MAX];
    let mut request = httparse::Request::new(&mut headers);
    let len = match request.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) if buf.len() > HEAD_MAX => {
            return Err(bad(format!("request head longer than {HEAD_MAX} bytes")));
        }
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(err) => return Err(bad(format!("malformed HTTP request: {err}"))),
    };
    let headers: BTreeMap<String, String> = request
        .headers
        .iter()
        .map(|h| {
            let value = String::from_utf8_lossy(h.value).trim().to_string();
            (h.name.to_ascii_lowercase(), value)
        })
        .collect();
    if headers.contains_key("transfer-encoding") {
        return Err(ApiError::new(
            411,
            "LengthRequired",
            "Transfer-Encoding: expected a body with Content-Length",
        ));
    }
    let body_len = match headers.get("content-length") {
        None => 0,
        Some(value) => value
            .parse()
            .map_err(|_| bad(format!("Content-Length {value:?}: expected a number")))?,
    };
    Ok(Some(Head {
        method: request.method.unwrap_or_default().to_string(),
        path: request.path.unwrap_or_default().to_string(),
        headers,
        len,
        body_len,
    }))
}

/// An HTTP/1.1 response: status line, `headers`, `Content-Length`, body.
pub fn response(status: u16, headers: &[(&str, &str)], body: &[u8]) -> Vec<u8> {
    let reason = match status {
        200 => "OK",
        202 => "Accepted",
        400 => "Bad Request",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        411 => "Length Required",
        413 => "Payload Too Large",
        _ => "Error",
    };
    let mut out = format!("HTTP/1.1 {status} {reason}\r\n");
    for (name, value) in headers {
        out += &format!("{name}: {value}\r\n");
    }
    out += &format!("Content-Length: {}\r\n\r\n", body.len());
    [out.into_bytes(), body.to_vec()].concat()
}

/// The answer to an accepted `POST` (Lambda's `202 {"status":"OK"}`).
pub fn accepted() -> Vec<u8> {
    response(
        202,
        &[("Content-Type", "application/json")],
        br#"{"status":"OK"}"#,
    )
}

/// The answer carrying `err`.
pub fn error_response(err: &ApiError) -> Vec<u8> {
    response(
        err.status,
        &[("Content-Type", "application/json")],
        &err.body(),
    )
}

/// Identifies one of the runtime's connections while it is open.
pub type ConnId = u64;

/// One complete request from the runtime, to be answered with
/// [`Server::reply`] (now, or later for a long poll).
#[derive(Debug)]
pub struct Call {
    /// The connection to answer on.
    pub conn: ConnId,
    /// What it asks for.
    pub route: Route,
    /// Its headers (names lower-cased).
    pub headers: BTreeMap<String, String>,
    /// Its body.
    pub body: Vec<u8>,
}

/// One connection's state.
struct Conn {
    stream: TcpStream,
    input: Vec<u8>,
    output: Vec<u8>,
    /// A call handed out and not yet answered: no other request is read.
    waiting: bool,
    /// Bytes of an oversized body still to drop, and the call to hand out
    /// once they are.
    dropping: Option<(usize, Route)>,
    /// Close once `output` is written (the stream cannot be trusted).
    closing: bool,
    /// The request being read was told `100 Continue` already.
    continued: bool,
    eof: bool,
}

/// The Runtime API's listener and connections.
pub struct Server {
    listener: TcpListener,
    conns: BTreeMap<ConnId, Conn>,
    next_id: ConnId,
}

impl Server {
    /// Listens on [`RUNTIME_API_ADDRESS`].
    pub fn bind() -> io::Result<Server> {
        let address = RUNTIME_API_ADDRESS
            .parse()
            .expect("RUNTIME_API_ADDRESS is an IP address and port");
        Server::bind_to(address)
    }

    /// Listens on `address` (tests take a free port). An address, not a
    /// name: resolving one would link the C library's resolver into PID 1.
    pub fn bind_to(address: SocketAddr) -> io::Result<Server> {
        let listener = TcpListener::bind(address)?;
        listener.set_nonblocking(true)?;
        Ok(Server {
            listener,
            conns: BTreeMap::new(),
            next_id: 0,
        })
    }

    /// The address it listens on.
    pub fn local_addr(&self) -> io::Result<std::net::SocketAddr> {
        self.listener.local_addr()
    }

    /// The descriptors to poll, with their events: the listener's first.
    pub fn poll_fds(&self) -> Vec<libc::pollfd> {
        let mut fds = vec![pollfd(self.listener.as_raw_fd(), libc::POLLIN)];
        for conn in self.conns.values() {
            let mut events = 0;
            if !conn.waiting && !conn.eof {
                events |= libc::POLLIN;
            }
            if !conn.output.is_empty() {
                events |= libc::POLLOUT;
            }
            fds.push(pollfd(conn.stream.as_raw_fd(), events));
        }
        fds
    }

    /// Accepts, reads and writes what `poll` found ready (`ready` as
    /// [`Self::poll_fds`] made it, after the poll); returns the calls now
    /// complete, and the connections that closed (a parked call on one of
    /// them will never be answered).
    pub fn service(&mut self, ready: &[libc::pollfd]) -> (Vec<Call>, Vec<ConnId>) {
        let ready_fds: Vec<_> = ready
            .iter()
            .filter(|fd| fd.revents != 0)
            .map(|fd| fd.fd)
            .collect();
        if ready_fds.contains(&self.listener.as_raw_fd()) {
            self.accept_all();
        }
        let mut calls = Vec::new();
        let mut closed = Vec::new();
        for (&id, conn) in &mut self.conns {
            if ready_fds.contains(&conn.stream.as_raw_fd()) {
                conn.flush();
                conn.fill();
            }
            while let Some(call) = conn.next_call(id) {
                calls.push(call);
            }
            if conn.done() {
                closed.push(id);
            }
        }
        for id in &closed {
            self.conns.remove(id);
        }
        (calls, closed)
    }

    /// Answers `conn`'s call with the bytes of a whole response; its next
    /// request may then be read. (A [`Route::TooLarge`] call was answered
    /// already and takes no reply.) An answer to a connection that closed is
    /// dropped.
    pub fn reply(&mut self, conn: ConnId, answer: Vec<u8>) {
        if let Some(open) = self.conns.get_mut(&conn) {
            open.waiting = false;
            open.output.extend_from_slice(&answer);
            open.flush();
        }
    }

    fn accept_all(&mut self) {
        loop {
            match self.listener.accept() {
                Ok((stream, _)) => {
                    if stream.set_nonblocking(true).is_err() {
                        continue;
                    }
                    self.conns.insert(
                        self.next_id,
                        Conn {
                            stream,
                            input: Vec::new(),
                            output: Vec::new(),
                            waiting: false,
                            dropping: None,
                            closing: false,
                            continued: false,
                            eof: false,
                        },
                    );
                    self.next_id += 1;
                }
                Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
                // WouldBlock once all are taken; anything else (EMFILE…)
                // leaves the rest in the backlog for the next round.
                Err(_) => return,
            }
        }
    }
}

impl Conn {
    /// Reads what is there; the peer's end or an error ends the input.
    fn fill(&mut self) {
        let mut chunk = [0u8; 64 * 1024];
        loop {
            match self.stream.read(&mut chunk) {
                Ok(0) => return self.eof = true,
                Ok(n) => self.take(&chunk[..n]),
                Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => return,
                Err(_) => return self.eof = true,
            }
            if self.waiting {
                return;
            }
        }
    }

    /// Takes read bytes: dropped while an oversized body is being
    /// skipped, else kept.
    fn take(&mut self, bytes: &[u8]) {
        if let Some((left, _)) = &mut self.dropping {
            let skip = (*left).min(bytes.len());
            *left -= skip;
            self.input.extend_from_slice(&bytes[skip..]);
        } else {
            self.input.extend_from_slice(bytes);
        }
    }

    /// Writes what of the output the socket takes now.
    fn flush(&mut self) {
        while !self.output.is_empty() {
            match self.stream.write(&self.output) {
                Ok(0) => return self.eof = true,
                Ok(n) => drop(self.output.drain(..n)),
                Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => return,
                Err(_) => {
                    self.output.clear();
                    return self.eof = true;
                }
            }
        }
    }

    /// Nothing more will come from or go to this connection.
    fn done(&self) -> bool {
        (self.eof || self.closing) && self.output.is_empty() && !self.waiting
            || self.eof && self.waiting
    }

    /// The next complete call in the input, if any; a request that cannot
    /// be served is answered here.
    fn next_call(&mut self, id: ConnId) -> Option<Call> {
        if self.waiting || self.closing {
            return None;
        }
        if let Some((left, _)) = &self.dropping {
            if *left > 0 {
                return None;
            }
            let (_, route) = self.dropping.take().expect("checked above");
            return Some(self.hand_out(id, route, BTreeMap::new(), Vec::new()));
        }
        let head = self.whole_head()?;
        let routed = route(&head.method, head.path.split('?').next().unwrap_or(""));
        if head.body_len > RESPONSE_MAX {
            self.refuse_too_large(&head, routed);
            return self.next_call(id);
        }
        if self.input.len() < head.len + head.body_len {
            self.ask_for_body(&head);
            return None;
        }
        self.continued = false;
        let body = self.input[head.len..head.len + head.body_len].to_vec();
        self.input.drain(..head.len + head.body_len);
        match routed {
            Ok(route) => Some(self.hand_out(id, route, head.headers, body)),
            Err(err) => {
                // The request was whole: the connection stays usable.
                self.send(&error_response(&err));
                self.next_call(id)
            }
        }
    }

    /// The head at the start of the input once it is whole; one that is
    /// not HTTP we can serve is answered, and the connection closed.
    fn whole_head(&mut self) -> Option<Head> {
        match parse_head(&self.input) {
            Ok(head) => head,
            Err(err) => {
                self.closing = true;
                self.send(&error_response(&err));
                None
            }
        }
    }

    /// Answers 413 to a body over [`RESPONSE_MAX`] and starts dropping it;
    /// its call ([`Route::TooLarge`]) is handed out once it is all dropped.
    fn refuse_too_large(&mut self, head: &Head, routed: Result<Route, ApiError>) {
        let err = ApiError::new(
            413,
            "RequestEntityTooLarge",
            format!(
                "the body is {} bytes; the most a runtime may post is {RESPONSE_MAX}",
                head.body_len
            ),
        );
        self.output.extend_from_slice(&error_response(&err));
        let id_of = match routed {
            Ok(Route::Response(request_id)) => Some(request_id),
            _ => None,
        };
        let body_here = (self.input.len() - head.len).min(head.body_len);
        self.input.drain(..head.len + body_here);
        self.dropping = Some((head.body_len - body_here, Route::TooLarge(id_of)));
        self.flush();
    }

    /// Tells a client that expects it to go ahead and send the body, once
    /// per request.
    fn ask_for_body(&mut self, head: &Head) {
        // curl asks before sending a large body, and waits a second
        // for the go-ahead otherwise.
        if !self.continued && head.headers.get("expect").map(String::as_str) == Some("100-continue")
        {
            self.continued = true;
            self.send(b"HTTP/1.1 100 Continue\r\n\r\n");
        }
    }

    /// Queues `bytes` for the peer and writes what the socket takes now.
    fn send(&mut self, bytes: &[u8]) {
        self.output.extend_from_slice(bytes);
        self.flush();
    }

    fn hand_out(
        &mut self,
        id: ConnId,
        route: Route,
        headers: BTreeMap<String, String>,
        body: Vec<u8>,
    ) -> Call {
        // An oversized body has had its answer (413) already.
        self.waiting = !matches!(route, Route::TooLarge(_));
        Call {
            conn: id,
            route,
            headers,
            body,
        }
    }
}

fn pollfd(fd: std::os::fd::RawFd, events: libc::c_short) -> libc::pollfd {
    libc::pollfd {
        fd,
        events,
        revents: 0,
    }
}

#[cfg(test)]
mod tests {
    use std::io::BufRead;
    use std::time::Duration;

    use super::*;

    #[test]
    fn routes_are_lambdas_paths_and_methods() {
        let p = |rest: &str| format!("{PREFIX}{rest}");
        assert_eq!(route("GET", &p("invocation/next")), Ok(Route::Next));
        assert_eq!(route("GET", &p("restore/next")), Ok(Route::RestoreNext));
        assert_eq!(
            route("POST", &p("invocation/abc-1/response")),
            Ok(Route::Response("abc-1".into()))
        );
        assert_eq!(
            route("POST", &p("invocation/abc-1/error")),
            Ok(Route::Error("abc-1".into()))
        );
        assert_eq!(route("POST", &p("init/error")), Ok(Route::InitError));
        assert_eq!(route("POST", &p("restore/error")), Ok(Route::RestoreError));
        assert_eq!(
            route("POST", &p("invocation/next")).unwrap_err().status,
            405
        );
        for missing in [
            "/2018-06-01/runtime/invocation//response".to_string(),
            "/2020-01-01/runtime/invocation/next".to_string(),
            p("invocation/a/b/response"),
            p(""),
        ] {
            assert_eq!(route("GET", &missing).unwrap_err().status, 404, "{missing}");
        }
    }

    #[test]
    fn heads_are_whole_http_with_a_known_body_length() {
        let head = parse_head(b"POST /x HTTP/1.1\r\nContent-Length: 3\r\nX-A: b\r\n\r\nabc")
            .unwrap()
            .unwrap();
        assert_eq!((head.method.as_str(), head.path.as_str()), ("POST", "/x"));
        assert_eq!((head.len, head.body_len), (47, 3));
        assert_eq!(head.headers["x-a"], "b");
        assert_eq!(parse_head(b"GET /x HTTP/1.1\r\nHost: a\r\n").unwrap(), None);
        assert_eq!(
            parse_head(b"\x00\x01 nonsense\r\n\r\n").unwrap_err().status,
            400
        );
        let chunked = b"POST /x HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n";
        assert_eq!(parse_head(chunked).unwrap_err().status, 411);
        let bad_length = b"POST /x HTTP/1.1\r\nContent-Length: -1\r\n\r\n";
        let err = parse_head(bad_length).unwrap_err();
        assert!(err.message.contains("\"-1\""), "{err:?}");
        let endless = [b"GET /x HTTP/1.1\r\nX: ".as_slice(), &[b'a'; HEAD_MAX]].concat();
        assert_eq!(parse_head(&endless).unwrap_err().status, 400);
    }

    #[test]
    fn errors_have_lambdas_shape() {
        let body = ApiError::new(400, "InvalidRequestID", "no such id").body();
        let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(json["errorType"], "InvalidRequestID");
        assert_eq!(json["errorMessage"], "no such id");
        let text = String::from_utf8(response(202, &[("A", "b")], b"{}")).unwrap();
        assert_eq!(
            text,
            "HTTP/1.1 202 Accepted\r\nA: b\r\nContent-Length: 2\r\n\r\n{}"
        );
    }

    /// Runs the server until `until` says the calls so far are enough.
    fn drive(server: &mut Server, mut until: impl FnMut(&mut Server, Vec<Call>) -> bool) {
        for _ in 0..1000 {
            let mut fds = server.poll_fds();
            // SAFETY: the pointer and length describe `fds`, which lives
            // across the call.
            unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, 10) };
            let (calls, _) = server.service(&fds);
            if until(server, calls) {
                return;
            }
        }
        panic!("the server never got there");
    }

    fn read_answer(reader: &mut impl BufRead) -> (String, String) {
        let mut status = String::new();
        reader.read_line(&mut status).unwrap();
        let mut length = 0;
        loop {
            let mut line = String::new();
            reader.read_line(&mut line).unwrap();
            if line == "\r\n" {
                break;
            }
            if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length: ") {
                length = v.trim().parse().unwrap();
            }
        }
        let mut body = vec![0; length];
        reader.read_exact(&mut body).unwrap();
        (status, String::from_utf8(body).unwrap())
    }

    #[test]
    fn a_long_poll_is_parked_then_answered_and_bad_requests_keep_pid_1_up() {
        let mut server = Server::bind_to("127.0.0.1:0".parse().unwrap()).unwrap();
        let address = server.local_addr().unwrap();
        let client = std::thread::spawn(move || {
            let stream = TcpStream::connect(address).unwrap();
            stream
                .set_read_timeout(Some(Duration::from_secs(10)))
                .unwrap();
            let mut reader = io::BufReader::new(stream.try_clone().unwrap());
            let mut writer = stream;
            writer
                .write_all(b"GET /2018-06-01/runtime/nope HTTP/1.1\r\n\r\n")
                .unwrap();
            let (status, body) = read_answer(&mut reader);
            assert!(status.starts_with("HTTP/1.1 404"), "{status}");
            assert!(body.contains("NotFound"), "{body}");
            writer
                .write_all(b"GET /2018-06-01/runtime/invocation/next HTTP/1.1\r\n\r\n")
                .unwrap();
            let (status, body) = read_answer(&mut reader);
            assert!(status.starts_with("HTTP/1.1 200"), "{status}");
            assert_eq!(body, "{\"event\":1}");
            let big = RESPONSE_MAX + 1;
            let head = format!(
                "POST /2018-06-01/runtime/invocation/r1/response HTTP/1.1\r\nContent-Length: {big}\r\n\r\n"
            );
            writer.write_all(head.as_bytes()).unwrap();
            writer.write_all(&vec![b'x'; big]).unwrap();
            let (status, _) = read_answer(&mut reader);
            assert!(status.starts_with("HTTP/1.1 413"), "{status}");
            // A body announced with Expect is asked for.
            writer
                .write_all(b"POST /2018-06-01/runtime/invocation/r1/error HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n")
                .unwrap();
            let mut line = String::new();
            reader.read_line(&mut line).unwrap();
            assert_eq!(line, "HTTP/1.1 100 Continue\r\n");
            reader.read_line(&mut line).unwrap();
            writer.write_all(b"{}").unwrap();
            let (status, _) = read_answer(&mut reader);
            assert!(status.starts_with("HTTP/1.1 202"), "{status}");
            // Still in step after the dropped body.
            writer
                .write_all(
                    b"POST /2018-06-01/runtime/init/error HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}",
                )
                .unwrap();
            let (status, _) = read_answer(&mut reader);
            assert!(status.starts_with("HTTP/1.1 202"), "{status}");
        });
        let mut seen = Vec::new();
        drive(&mut server, |server, calls| {
            for call in calls {
                seen.push(call.route.clone());
                let answer = match call.route {
                    Route::Next => response(200, &[], b"{\"event\":1}"),
                    Route::TooLarge(_) => continue,
                    _ => accepted(),
                };
                server.reply(call.conn, answer);
            }
            seen.len() == 4
        });
        client.join().unwrap();
        assert_eq!(
            seen,
            [
                Route::Next,
                Route::TooLarge(Some("r1".into())),
                Route::Error("r1".into()),
                Route::InitError
            ]
        );
    }
}
