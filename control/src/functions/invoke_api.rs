//! Lambda's Invoke API (`POST /2015-03-31/functions/{FunctionName}/invocations`),
//! as `kiln fn serve` answers it, so that boto3, the AWS CLI and the SDKs
//! can invoke a Kiln function by pointing their endpoint at it.
//!
//! Served: `X-Amz-Invocation-Type` `RequestResponse` (200 with the
//! response, or with the runtime's error JSON and `X-Amz-Function-Error:
//! Unhandled`), `Event` (202; it runs after the answer) and `DryRun`
//! (204); `X-Amz-Log-Type: Tail` (`X-Amz-Log-Result`: the base64 of the
//! invocation's last 4 KB of log); `X-Amz-Executed-Version: $LATEST`. A
//! function other than the one served is a 404 `ResourceNotFoundException`
//! in Lambda's error shape (`X-Amzn-ErrorType` and `{"Type":"User",
//! "message":…}`). Requests are not authenticated: SigV4 signatures are
//! not checked (the listener binds loopback unless told otherwise).
//! `GET /kiln/status` says how many environments are warm and busy (what
//! `kiln fn ls` shows).
use std::collections::BTreeMap;
use std::io::{self, Read, Write};

use guest_init::function::{EventResult, EventStatus, RESPONSE_MAX};
use serde::{Deserialize, Serialize};

use super::runtime::function_arn;
use kiln_vmm::report::one_line;

/// The Invoke API's path prefix and suffix around the function's name.
const PATH_PREFIX: &str = "/2015-03-31/functions/";
const PATH_SUFFIX: &str = "/invocations";
/// The status path `kiln fn ls` asks.
pub const STATUS_PATH: &str = "/kiln/status";
/// The longest request head accepted.
const HEAD_MAX: usize = 64 * 1024;

/// What a function's serve has now.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolStatus {
    /// Environments waiting in `invocation/next` for an event.
    pub warm: usize,
    /// Environments running an event (or being restored for one).
    pub busy: usize,
}

/// What answers the invocations: the warm pool, or a test's fake.
pub trait Backend: Sync {
    /// The function served.
    fn name(&self) -> &str;
    /// Runs one event and waits for its end.
    fn invoke(&self, input: &Input) -> Result<EventResult, super::FunctionError>;
    /// The environments now.
    fn status(&self) -> PoolStatus;
}

/// What an invocation hands the runtime.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Input {
    /// The event.
    pub payload: String,
    /// The client context (JSON; `X-Amz-Client-Context` decoded from
    /// base64), passed on as `Lambda-Runtime-Client-Context`.
    pub client_context: Option<String>,
}

/// One HTTP request.
#[derive(Debug, Default)]
pub struct Request {
    /// The method.
    pub method: String,
    /// The target, query string included.
    pub path: String,
    /// Header names lower-cased.
    pub headers: BTreeMap<String, String>,
    /// The body (`Content-Length` bytes).
    pub body: Vec<u8>,
}

/// Reads one request from `stream`; an error for a malformed, oversized
/// or truncated one.
pub fn read_request(stream: &mut impl Read) -> io::Result<Request> {
    let invalid = |what: String| io::Error::new(io::ErrorKind::InvalidData, what);
    let mut buf = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    let (head_len, mut request) = loop {
        let n = stream.read(&mut chunk)?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the client closed the connection before a whole request",
            ));
        }
        buf.extend_from_slice(&chunk[..n]);
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut parsed = httparse::Request::new(&mut headers);
        match parsed.parse(&buf) {
            Ok(httparse::Status::Complete(len)) => {
                let request = Request {
                    method: parsed.method.unwrap_or_default().to_string(),
                    path: parsed.path.unwrap_or_default().to_string(),
                    headers: parsed
                        .headers
                        .iter()
                        .map(|h| {
                            let value = String::from_utf8_lossy(h.value).trim().to_string();
                            (h.name.to_ascii_lowercase(), value)
                        })
                        .collect(),
                    body: Vec::new(),
                };
                break (len, request);
            }
            Ok(httparse::Status::Partial) if buf.len() > HEAD_MAX => {
                return Err(invalid(format!("request head over {HEAD_MAX} bytes")));
            }
            Ok(httparse::Status::Partial) => {}
            Err(err) => return Err(invalid(format!("malformed HTTP request: {err}"))),
        }
    };
    let length = match request.headers.get("content-length") {
        None => 0,
        Some(value) => value
            .parse::<usize>()
            .map_err(|_| invalid(format!("Content-Length {value:?}: expected a number")))?,
    };
    if length > RESPONSE_MAX {
        return Err(invalid(format!(
            "Content-Length {length}: the most a payload may be is {RESPONSE_MAX}"
        )));
    }
    let mut body = buf.split_off(head_len);
    body.truncate(length);
    let missing = length - body.len();
    stream.take(missing as u64).read_to_end(&mut body)?;
    if body.len() < length {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "the client closed the connection before the whole body",
        ));
    }
    request.body = body;
    Ok(request)
}

/// An HTTP/1.1 response, the connection closed after it.
pub fn response(status: u16, headers: &[(&str, String)], body: &[u8]) -> Vec<u8> {
    let reason = match status {
        200 => "OK",
        202 => "Accepted",
        204 => "No Content",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        413 => "Request Entity Too Large",
        _ => "Error",
    };
    let mut head = format!("HTTP/1.1 {status} {reason}\r\n");
    for (name, value) in headers {
        head += &format!("{name}: {value}\r\n");
    }
    head += &format!(
        "Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    [head.into_bytes(), body.to_vec()].concat()
}

/// Lambda's error answer: `X-Amzn-ErrorType` and `{"Type":…,"message":…}`.
fn error(status: u16, error_type: &str, kind: &str, message: &str) -> Vec<u8> {
    let body = serde_json::json!({ "Type": kind, "message": message });
    response(
        status,
        &[
            ("Content-Type", "application/json".into()),
            ("X-Amzn-ErrorType", error_type.into()),
        ],
        body.to_string().as_bytes(),
    )
}

/// The function a path names (its name, or its ARN, percent-encoded or
/// not), with the qualifier it asks for (in the ARN or `?Qualifier=`).
fn function_of(path: &str) -> Option<(String, Option<String>)> {
    let (path, query) = path.split_once('?').unwrap_or((path, ""));
    let name = path.strip_prefix(PATH_PREFIX)?.strip_suffix(PATH_SUFFIX)?;
    let name = percent_decode(name)?;
    let from_query = match query
        .split('&')
        .find_map(|pair| pair.strip_prefix("Qualifier="))
    {
        Some(encoded) => Some(percent_decode(encoded)?),
        None => None,
    };
    // arn:aws:lambda:REGION:ACCOUNT:function:NAME[:QUALIFIER]
    let (name, qualifier) = match name.split(':').collect::<Vec<_>>().as_slice() {
        [name] => (name.to_string(), None),
        [name, qualifier] => (name.to_string(), Some(qualifier.to_string())),
        ["arn", _, "lambda", _, _, "function", name] => (name.to_string(), None),
        ["arn", _, "lambda", _, _, "function", name, qualifier] => {
            (name.to_string(), Some(qualifier.to_string()))
        }
        _ => return None,
    };
    Some((name, qualifier.or(from_query)))
}

/// `%XX` decoded; `None` for a broken escape or bytes that are not UTF-8.
fn percent_decode(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// Standard base64 with padding (RFC 4648 §4), for `X-Amz-Log-Result`.
pub fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for group in bytes.chunks(3) {
        let n = group
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, &b)| n | u32::from(b) << (16 - 8 * i));
        for i in 0..4 {
            if i <= group.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// [`base64`] decoded; `None` for text that is not padded base64.
pub fn base64_decode(text: &str) -> Option<Vec<u8>> {
    let value = |c: u8| match c {
        b'A'..=b'Z' => Some(c - b'A'),
        b'a'..=b'z' => Some(c - b'a' + 26),
        b'0'..=b'9' => Some(c - b'0' + 52),
        b'+' => Some(62),
        b'/' => Some(63),
        _ => None,
    };
    if !text.len().is_multiple_of(4) {
        return None;
    }
    let mut out = Vec::with_capacity(text.len() / 4 * 3);
    for group in text.as_bytes().chunks(4) {
        let padding = group.iter().rev().take_while(|&&c| c == b'=').count();
        if padding > 2 {
            return None;
        }
        let mut n = 0u32;
        for &c in &group[..4 - padding] {
            n = n << 6 | u32::from(value(c)?);
        }
        n <<= 6 * padding as u32;
        out.extend_from_slice(&n.to_be_bytes()[1..4 - padding]);
    }
    Some(out)
}

/// What to do with a request: the answer to write, and the payload of an
/// `Event` invocation to run after it.
pub struct Answer {
    /// The whole HTTP response.
    pub bytes: Vec<u8>,
    /// An asynchronous invocation's input.
    pub run_after: Option<Input>,
}

impl From<Vec<u8>> for Answer {
    fn from(bytes: Vec<u8>) -> Self {
        Answer {
            bytes,
            run_after: None,
        }
    }
}

/// Answers one request for `backend`'s function.
pub fn answer(backend: &dyn Backend, request: Request) -> Answer {
    if request.path.split('?').next() == Some(STATUS_PATH) && request.method == "GET" {
        let status = serde_json::to_vec(&backend.status()).expect("a status serializes");
        return response(200, &[("Content-Type", "application/json".into())], &status).into();
    }
    let Some((name, qualifier)) = function_of(&request.path) else {
        let message = format!("no such path: {} {}", request.method, request.path);
        return error(404, "UnknownOperationException", "User", &message).into();
    };
    if request.method != "POST" {
        let message = format!("{} {}: expected POST", request.method, request.path);
        return error(405, "InvalidRequestException", "User", &message).into();
    }
    // Kiln keeps one version of a function: $LATEST.
    if name != backend.name() || qualifier.as_deref().is_some_and(|q| q != "$LATEST") {
        let arn = function_arn(&name);
        let message = match qualifier {
            Some(qualifier) => format!("Function not found: {arn}:{qualifier}"),
            None => format!("Function not found: {arn}"),
        };
        return error(404, "ResourceNotFoundException", "User", &message).into();
    }
    let input = match input_of(&request) {
        Ok(input) => input,
        Err(message) => {
            return error(400, "InvalidRequestContentException", "User", message).into();
        }
    };
    let header = |name: &str| request.headers.get(name).map(String::as_str);
    match header("x-amz-invocation-type").unwrap_or("RequestResponse") {
        "RequestResponse" => {
            invoked(backend, &input, header("x-amz-log-type") == Some("Tail")).into()
        }
        "Event" => Answer {
            bytes: response(202, &[version()], b""),
            run_after: Some(input),
        },
        "DryRun" => response(204, &[version()], b"").into(),
        other => {
            let message = format!(
                "X-Amz-Invocation-Type {other:?}: expected RequestResponse, Event or DryRun"
            );
            error(400, "InvalidParameterValueException", "User", &message).into()
        }
    }
}

/// The payload (UTF-8) and the client context (base64 of UTF-8).
fn input_of(request: &Request) -> Result<Input, &'static str> {
    let payload = String::from_utf8(request.body.clone())
        .map_err(|_| "Could not parse request body into json: the payload is not UTF-8")?;
    let client_context = match request.headers.get("x-amz-client-context") {
        None => None,
        Some(encoded) => Some(
            base64_decode(encoded)
                .and_then(|bytes| String::from_utf8(bytes).ok())
                .ok_or("X-Amz-Client-Context: expected the base64 of a JSON object")?,
        ),
    };
    Ok(Input {
        payload,
        client_context,
    })
}

fn version() -> (&'static str, String) {
    ("X-Amz-Executed-Version", "$LATEST".into())
}

/// A synchronous invocation's answer.
fn invoked(backend: &dyn Backend, input: &Input, tail: bool) -> Vec<u8> {
    let result = match backend.invoke(input) {
        Ok(result) => result,
        Err(err) => {
            let message = one_line(&err);
            log::warn!("fn serve {}: {message}", backend.name());
            return error(500, "ServiceException", "Service", &message);
        }
    };
    let mut headers = vec![
        ("Content-Type", "application/json".to_string()),
        version(),
        ("X-Amz-Request-Id", result.request_id.clone()),
        ("X-Amzn-RequestId", result.request_id.clone()),
    ];
    if result.status != EventStatus::Response {
        headers.push(("X-Amz-Function-Error", "Unhandled".into()));
    }
    if tail {
        headers.push(("X-Amz-Log-Result", base64(result.log.as_bytes())));
    }
    response(200, &headers, result.body.as_bytes())
}

/// Reads one request from `stream`, answers it and returns the `Event`
/// input to run after, if any. A request that cannot be read gets a 400.
pub fn serve_connection(
    backend: &dyn Backend,
    stream: &mut (impl Read + Write),
) -> io::Result<Option<Input>> {
    let answer = match read_request(stream) {
        Ok(request) => answer(backend, request),
        Err(err) if err.kind() == io::ErrorKind::InvalidData => {
            let message = one_line(&err);
            error(400, "InvalidRequestContentException", "User", &message).into()
        }
        Err(err) => return Err(err),
    };
    stream.write_all(&answer.bytes)?;
    stream.flush()?;
    Ok(answer.run_after)
}

#[cfg(test)]
mod tests {
    use std::net::TcpListener;
    use std::sync::Mutex;

    use super::*;
    use crate::functions::FunctionError;

    #[test]
    fn base64_is_rfc_4648() {
        for (plain, encoded) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64(plain.as_bytes()), encoded, "{plain}");
        }
        assert_eq!(base64(&[0xff, 0xfe, 0xfd]), "//79");
        for plain in ["", "f", "fo", "foo", "foob", "fooba", "foobar"] {
            let encoded = base64(plain.as_bytes());
            assert_eq!(
                base64_decode(&encoded).unwrap(),
                plain.as_bytes(),
                "{encoded}"
            );
        }
        for bad in ["Zg=", "Z===", "Zm9!", "A"] {
            assert_eq!(base64_decode(bad), None, "{bad}");
        }
    }

    #[test]
    fn functions_are_named_by_name_or_arn() {
        let path = |name: &str| format!("{PATH_PREFIX}{name}{PATH_SUFFIX}");
        let named = |name: &str, qualifier: Option<&str>| {
            Some((name.to_string(), qualifier.map(str::to_string)))
        };
        assert_eq!(function_of(&path("echo")), named("echo", None));
        let arn = "arn%3Aaws%3Alambda%3Aus-east-1%3A000000000000%3Afunction%3Aecho";
        assert_eq!(function_of(&path(arn)), named("echo", None));
        let qualified = "arn:aws:lambda:us-east-1:1:function:echo:$LATEST";
        assert_eq!(
            function_of(&path(qualified)),
            named("echo", Some("$LATEST"))
        );
        assert_eq!(
            function_of(&format!("{}?Qualifier=%24LATEST", path("echo"))),
            named("echo", Some("$LATEST"))
        );
        assert_eq!(function_of(&path("echo:7")), named("echo", Some("7")));
        assert_eq!(function_of(&path("bad%zz")), None);
        assert_eq!(function_of("/2015-03-31/functions/echo"), None);
    }

    /// Answers `{"fail":…}` with an error, anything else with itself.
    struct Fake {
        seen: Mutex<Vec<Input>>,
    }

    impl Backend for Fake {
        fn name(&self) -> &str {
            "echo"
        }

        fn invoke(&self, input: &Input) -> Result<EventResult, FunctionError> {
            let payload = input.payload.as_str();
            self.seen.lock().unwrap().push(input.clone());
            let failed = payload.contains("fail");
            Ok(EventResult {
                request_id: "r-1".into(),
                status: if failed {
                    EventStatus::Error
                } else {
                    EventStatus::Response
                },
                body: if failed {
                    r#"{"errorMessage":"asked to fail","errorType":"ValueError"}"#.into()
                } else {
                    payload.into()
                },
                error_type: failed.then(|| "Unhandled".into()),
                log: "handler ran\n".into(),
                duration_us: 1,
            })
        }

        fn status(&self) -> PoolStatus {
            PoolStatus { warm: 2, busy: 1 }
        }
    }

    fn ask(fake: &Fake, request: &str) -> (String, Option<Input>) {
        let mut stream = Duplex(io::Cursor::new(request.as_bytes().to_vec()), Vec::new());
        let after = serve_connection(fake, &mut stream).unwrap();
        (String::from_utf8(stream.1).unwrap(), after)
    }

    /// A request to read, and what was written.
    struct Duplex(io::Cursor<Vec<u8>>, Vec<u8>);

    impl Read for Duplex {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            self.0.read(buf)
        }
    }

    impl Write for Duplex {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.1.write(buf)
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn post(name: &str, headers: &str, body: &str) -> String {
        format!(
            "POST {PATH_PREFIX}{name}{PATH_SUFFIX} HTTP/1.1\r\n{headers}Content-Length: {}\r\n\r\n{body}",
            body.len()
        )
    }

    #[test]
    fn invocation_types_log_tails_errors_and_unknown_functions() {
        let fake = Fake {
            seen: Mutex::new(Vec::new()),
        };
        let (ok, after) = ask(&fake, &post("echo", "", "{\"a\":1}"));
        assert!(ok.starts_with("HTTP/1.1 200 OK\r\n"), "{ok}");
        assert!(ok.contains("X-Amz-Executed-Version: $LATEST\r\n"), "{ok}");
        assert!(ok.ends_with("\r\n\r\n{\"a\":1}"), "{ok}");
        assert!(!ok.contains("X-Amz-Function-Error"), "{ok}");
        assert_eq!(after, None);

        let (tail, _) = ask(&fake, &post("echo", "X-Amz-Log-Type: Tail\r\n", "{}"));
        assert!(tail.contains(&format!(
            "X-Amz-Log-Result: {}\r\n",
            base64(b"handler ran\n")
        )));

        let (failed, _) = ask(&fake, &post("echo", "", "{\"fail\":1}"));
        assert!(failed.starts_with("HTTP/1.1 200 OK\r\n"), "{failed}");
        assert!(
            failed.contains("X-Amz-Function-Error: Unhandled\r\n"),
            "{failed}"
        );
        assert!(failed.contains("asked to fail"), "{failed}");

        let (event, after) = ask(
            &fake,
            &post("echo", "X-Amz-Invocation-Type: Event\r\n", "{\"e\":1}"),
        );
        assert!(event.starts_with("HTTP/1.1 202 Accepted\r\n"), "{event}");
        assert_eq!(
            after.map(|input| input.payload).as_deref(),
            Some("{\"e\":1}")
        );
        let (dry, after) = ask(
            &fake,
            &post("echo", "X-Amz-Invocation-Type: DryRun\r\n", "{}"),
        );
        assert!(dry.starts_with("HTTP/1.1 204 No Content\r\n"), "{dry}");
        assert_eq!(after, None);
        let (bad, _) = ask(
            &fake,
            &post("echo", "X-Amz-Invocation-Type: Sometimes\r\n", "{}"),
        );
        assert!(bad.contains("InvalidParameterValueException"), "{bad}");

        let context = base64(br#"{"custom":{"a":1}}"#);
        let header = format!("X-Amz-Client-Context: {context}\r\n");
        ask(&fake, &post("echo", &header, "{}"));
        let seen = fake.seen.lock().unwrap().pop().unwrap();
        assert_eq!(
            seen.client_context.as_deref(),
            Some(r#"{"custom":{"a":1}}"#)
        );
        let (bad, _) = ask(&fake, &post("echo", "X-Amz-Client-Context: !!\r\n", "{}"));
        assert!(bad.contains("InvalidRequestContentException"), "{bad}");
        let (version, _) = ask(&fake, &post("echo:7", "", "{}"));
        assert!(
            version.contains(
                "Function not found: arn:aws:lambda:us-east-1:000000000000:function:echo:7"
            ),
            "{version}"
        );

        let (missing, _) = ask(&fake, &post("nope", "", "{}"));
        assert!(
            missing.starts_with("HTTP/1.1 404 Not Found\r\n"),
            "{missing}"
        );
        assert!(missing.contains("X-Amzn-ErrorType: ResourceNotFoundException\r\n"));
        assert!(missing.contains(r#""message":"Function not found: arn:aws:lambda:us-east-1:000000000000:function:nope""#), "{missing}");
        // Three synchronous invocations reached the backend, no more.
        assert_eq!(fake.seen.lock().unwrap().len(), 3);

        let (status, _) = ask(&fake, "GET /kiln/status HTTP/1.1\r\n\r\n");
        assert!(status.ends_with(r#"{"warm":2,"busy":1}"#), "{status}");
        let (garbage, _) = ask(&fake, "\x01\x02\r\n\r\n");
        assert!(garbage.starts_with("HTTP/1.1 400"), "{garbage}");
    }

    /// boto3 (when this machine has it: Debian's python3-boto3, which
    /// `cargo xtask` installs for CI) against the Invoke API: what real
    /// clients send and expect.
    #[test]
    fn boto3_invokes_through_it() {
        let probe = std::process::Command::new("python3")
            .args(["-c", "import boto3"])
            .status();
        assert!(
            probe.is_ok_and(|s| s.success()),
            "this test needs python3 with boto3 (Debian: python3-boto3)"
        );
        let fake = Fake {
            seen: Mutex::new(Vec::new()),
        };
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let script = format!(
            r#"
import base64, boto3, json
c = boto3.client("lambda", endpoint_url="http://127.0.0.1:{port}", region_name="us-east-1",
                 aws_access_key_id="x", aws_secret_access_key="x")
r = c.invoke(FunctionName="echo", Payload=json.dumps({{"n": 1}}), LogType="Tail")
assert r["StatusCode"] == 200, r
assert json.loads(r["Payload"].read()) == {{"n": 1}}
assert base64.b64decode(r["LogResult"]) == b"handler ran\n", r
assert r["ExecutedVersion"] == "$LATEST", r
assert "FunctionError" not in r, r
r = c.invoke(FunctionName="echo", Payload=b'{{"fail": 1}}')
assert r["FunctionError"] == "Unhandled", r
assert json.loads(r["Payload"].read())["errorMessage"] == "asked to fail"
assert c.invoke(FunctionName="echo", InvocationType="Event", Payload=b"{{}}")["StatusCode"] == 202
assert c.invoke(FunctionName="echo", InvocationType="DryRun")["StatusCode"] == 204
try:
    c.invoke(FunctionName="nope", Payload=b"{{}}")
    raise SystemExit("no error for an unknown function")
except c.exceptions.ResourceNotFoundException as e:
    assert "nope" in str(e), e
print("boto3 ok")
"#
        );
        // Five requests, each answered (so botocore retries none). The
        // thread is left to the test process's end if the client fails.
        std::thread::spawn(move || {
            for _ in 0..5 {
                let (mut stream, _) = listener.accept().unwrap();
                serve_connection(&fake, &mut stream).unwrap();
            }
        });
        let client = std::process::Command::new("python3")
            .args(["-c", &script])
            .output()
            .unwrap();
        let out = String::from_utf8_lossy(&client.stdout);
        let err = String::from_utf8_lossy(&client.stderr);
        assert!(out.contains("boto3 ok"), "stdout: {out}\nstderr: {err}");
    }
}
