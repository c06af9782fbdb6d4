//! `kiln fn serve` for a `runtime-api` function: the Invoke API
//! ([`super::invoke_api`]) on the TCP listener and on the function's
//! socket (`functions/<name>/serve.sock`, through which `kiln fn invoke`
//! and `kiln fn ls` reach a running serve), answered by a warm
//! [`Pool`]. Each connection gets a thread; an `Event` invocation runs on
//! its connection's thread after the 202.
use std::io::{self, Read, Write};
use std::net::TcpListener;
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use guest_init::function::{EventResult, EventStatus};
use kiln_vmm::report::one_line;

use super::invoke_api::{self, Backend, PoolStatus, STATUS_PATH};
use super::pool::Pool;
use super::{FunctionError, Functions, Mode, io_err};

/// The socket a running serve listens on, in the function's directory.
const SOCKET: &str = "serve.sock";
/// How often the accept loop looks at the stop flag and expires idle
/// environments.
const TICK: Duration = Duration::from_millis(250);
/// How long a client may take to send its request.
const READ_TIMEOUT: Duration = Duration::from_secs(30);

/// How `kiln fn serve` keeps environments.
#[derive(Clone, Copy, Debug)]
pub struct ServeOptions {
    /// The most environments at once.
    pub max_concurrency: usize,
    /// How long an idle environment stays warm.
    pub keep_warm: Duration,
    /// Stop after this many connections on the TCP listener.
    pub max_requests: Option<usize>,
}

impl Functions {
    /// Where `name`'s running serve listens, if one runs.
    pub fn serve_socket(&self, name: &str) -> PathBuf {
        self.dir(name).join(SOCKET)
    }

    /// Serves `name` (a `runtime-api` function) on `listener` and its
    /// socket until `stop` is set (or `max_requests` were served), then
    /// kills every environment.
    pub fn serve_runtime(
        &self,
        name: &str,
        listener: &TcpListener,
        options: ServeOptions,
        stop: &AtomicBool,
    ) -> Result<(), FunctionError> {
        let config = self.get(name)?;
        if config.mode != Mode::RuntimeApi {
            return Err(FunctionError::NotRuntimeApi(name.to_string()));
        }
        let template = self.template(name)?;
        let path = self.serve_socket(name);
        let local = bind_socket(&path)?;
        listener.set_nonblocking(true).map_err(io_err(&path))?;
        let pool = Pool::new(template, config, options.max_concurrency, options.keep_warm);
        let served = AtomicUsize::new(0);
        std::thread::scope(|scope| {
            let mut last_expiry = Instant::now();
            while !stop.load(Ordering::SeqCst)
                && options
                    .max_requests
                    .is_none_or(|max| served.load(Ordering::SeqCst) < max)
            {
                let (tcp, unix) = wait_for_connections(listener, &local);
                if tcp && let Ok((stream, _)) = listener.accept() {
                    served.fetch_add(1, Ordering::SeqCst);
                    let pool = &pool;
                    scope.spawn(move || connection(pool, stream));
                }
                if unix && let Ok((stream, _)) = local.accept() {
                    let pool = &pool;
                    scope.spawn(move || connection(pool, stream));
                }
                if last_expiry.elapsed() >= TICK {
                    pool.expire();
                    last_expiry = Instant::now();
                }
            }
        });
        log::info!("fn serve {name}: stopping, killing the environments");
        pool.shutdown();
        let _ = std::fs::remove_file(&path);
        Ok(())
    }

    /// `kiln fn invoke` through a running serve of `name`: `None` when
    /// none runs.
    pub fn invoke_served(&self, name: &str, payload: &str) -> Option<io::Result<EventResult>> {
        let mut stream = UnixStream::connect(self.serve_socket(name)).ok()?;
        Some(ask_served(&mut stream, name, payload))
    }

    /// The warm and busy environments of `name`'s running serve, if one
    /// runs.
    pub fn served_status(&self, name: &str) -> Option<PoolStatus> {
        let mut stream = UnixStream::connect(self.serve_socket(name)).ok()?;
        let request = format!("GET {STATUS_PATH} HTTP/1.1\r\nHost: kiln\r\n\r\n");
        let (_, _, body) = exchange(&mut stream, request.as_bytes()).ok()?;
        serde_json::from_slice(&body).ok()
    }
}

/// The function's socket, a stale one (left by a serve that was killed)
/// replaced; a live one is an error.
fn bind_socket(path: &Path) -> Result<UnixListener, FunctionError> {
    if UnixStream::connect(path).is_ok() {
        return Err(FunctionError::AlreadyServed(path.to_path_buf()));
    }
    let _ = std::fs::remove_file(path);
    let listener = UnixListener::bind(path).map_err(io_err(path))?;
    listener.set_nonblocking(true).map_err(io_err(path))?;
    Ok(listener)
}

/// Waits up to [`TICK`] for a connection; says which listener has one.
fn wait_for_connections(tcp: &TcpListener, unix: &UnixListener) -> (bool, bool) {
    let mut fds = [tcp.as_raw_fd(), unix.as_raw_fd()].map(|fd| libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    });
    // SAFETY: the pointer and length describe `fds`, which lives across
    // the call; the kernel writes only their `revents`.
    let ready = unsafe { libc::poll(fds.as_mut_ptr(), 2, TICK.as_millis() as libc::c_int) };
    if ready <= 0 {
        return (false, false);
    }
    (fds[0].revents != 0, fds[1].revents != 0)
}

/// Serves one connection, then runs its `Event` invocation if it was one.
fn connection<S: Read + Write + Timeouts>(pool: &Pool, mut stream: S) {
    if let Err(err) = stream.timeouts() {
        return log::warn!("fn serve: {}", one_line(&err));
    }
    match invoke_api::serve_connection(pool, &mut stream) {
        Ok(Some(input)) => {
            drop(stream);
            if let Err(err) = pool.invoke(&input) {
                log::warn!("fn serve: an Event invocation: {}", one_line(&err));
            }
        }
        Ok(None) => {}
        Err(err) => log::warn!("fn serve: cannot answer a request: {}", one_line(&err)),
    }
}

/// Blocking I/O with a read timeout, on either kind of stream.
trait Timeouts {
    fn timeouts(&self) -> io::Result<()>;
}

impl Timeouts for std::net::TcpStream {
    fn timeouts(&self) -> io::Result<()> {
        self.set_nonblocking(false)?;
        self.set_read_timeout(Some(READ_TIMEOUT))
    }
}

impl Timeouts for UnixStream {
    fn timeouts(&self) -> io::Result<()> {
        self.set_nonblocking(false)?;
        self.set_read_timeout(Some(READ_TIMEOUT))
    }
}

/// One invocation through a serve's socket, its log asked for.
fn ask_served(stream: &mut UnixStream, name: &str, payload: &str) -> io::Result<EventResult> {
    let request = format!(
        "POST /2015-03-31/functions/{name}/invocations HTTP/1.1\r\nHost: kiln\r\n\
         X-Amz-Log-Type: Tail\r\nContent-Length: {}\r\n\r\n{payload}",
        payload.len()
    );
    let (status, headers, body) = exchange(stream, request.as_bytes())?;
    let header = |name: &str| {
        headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.clone())
    };
    let body = String::from_utf8_lossy(&body).into_owned();
    if status != 200 {
        return Err(io::Error::other(format!(
            "the serve answered {status}: {body}"
        )));
    }
    let error_type = header("X-Amz-Function-Error");
    Ok(EventResult {
        request_id: header("X-Amz-Request-Id").unwrap_or_default(),
        status: if error_type.is_some() {
            EventStatus::Error
        } else {
            EventStatus::Response
        },
        body,
        error_type,
        log: header("X-Amz-Log-Result")
            .and_then(|b64| invoke_api::base64_decode(&b64))
            .map(|log| String::from_utf8_lossy(&log).into_owned())
            .unwrap_or_default(),
        duration_us: 0,
    })
}

/// An HTTP answer: status, headers (name, value), body.
type Answer = (u16, Vec<(String, String)>, Vec<u8>);

/// Writes `request` and reads the whole answer (the serve closes the
/// connection after it).
fn exchange(stream: &mut UnixStream, request: &[u8]) -> io::Result<Answer> {
    stream.write_all(request)?;
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer)?;
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut response = httparse::Response::new(&mut headers);
    let len = match response.parse(&answer) {
        Ok(httparse::Status::Complete(len)) => len,
        _ => return Err(io::Error::other("the serve's answer is not HTTP")),
    };
    let headers = response
        .headers
        .iter()
        .map(|h| {
            let value = String::from_utf8_lossy(h.value).into_owned();
            (h.name.to_string(), value)
        })
        .collect();
    Ok((response.code.unwrap_or(0), headers, answer.split_off(len)))
}
