//! `kiln run -p HOST_PORT:GUEST_PORT`: a guest's TCP port published on the
//! host's 127.0.0.1 by a userspace proxy, so the host's firewall is left
//! alone.
//!
//! [`Proxy::bind`] binds every listener up front, so that a port in use is
//! an error before the instance starts. [`Proxy::spawn`] then serves them
//! on one thread: an event loop (event-manager, level-triggered epoll) over
//! non-blocking sockets. Each accepted connection gets a non-blocking
//! connect to the guest's port; once it is up, bytes flow both ways through
//! a buffer of [`BUFFER_SIZE`] per direction. A socket is watched for
//! reading only while its buffer has room and for writing only while bytes
//! wait, so the loop sleeps whenever no byte can move. An end of file one
//! way becomes a `shutdown(SHUT_WR)` the other way once the buffer is
//! drained; a connection ends when both ways are shut or either socket
//! fails, and a guest that refuses the connect closes the client's. At most
//! [`MAX_CONNECTIONS`] connections run at once; more are closed as they
//! come.
//!
//! What goes wrong is logged, never more often than a client could make
//! the log grow at its pace: conditions of the proxy itself once per
//! episode, failed connects to the guest (one per refused connection)
//! at most once a second, with a count of those held back.

use std::fmt;
use std::io::{self, ErrorKind, Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddrV4, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::str::FromStr;
use std::sync::{Arc, mpsc};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use event_manager::{
    EventManager, EventOps, EventSet, Events, MutEventSubscriber, SubscriberId, SubscriberOps,
};
use serde::{Deserialize, Serialize};
use vmm_sys_util::eventfd::{EFD_CLOEXEC, EFD_NONBLOCK, EventFd};
use vmm_sys_util::timerfd::TimerFd;

use kiln_vmm::report::one_line;
use kiln_vmm::seccomp::{self, SeccompError, ThreadKind};

/// Bytes a connection buffers per direction: what it has read from one
/// side and not yet written to the other.
pub const BUFFER_SIZE: usize = 64 * 1024;
/// Connections at once (two descriptors and two buffers each); more are
/// closed as they are accepted.
pub const MAX_CONNECTIONS: usize = 1024;
/// How long accepting pauses after an accept fails for want of resources
/// (descriptors, memory): the pending connection keeps the listener
/// readable, and a level-triggered loop would otherwise spin on it.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// The shortest time between two log lines of a kind a client can cause
/// at will: a line a second says what happens without flooding the log.
const WARNING_INTERVAL: Duration = Duration::from_secs(1);

/// Event-loop tokens: a connection's two sockets are `2 * slot + side`,
/// listener `i` is `LISTENER_TOKEN + i`, and two fds of the loop's own.
const LISTENER_TOKEN: u32 = 1 << 31;
const BACKOFF_TOKEN: u32 = u32::MAX - 1;
const STOP_TOKEN: u32 = u32::MAX;

/// The two sockets of a connection, as indices.
const CLIENT: usize = 0;
const GUEST: usize = 1;
const SIDES: [usize; 2] = [CLIENT, GUEST];

/// One published port: connections to `host` on 127.0.0.1 reach the
/// guest's `guest`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortMap {
    /// The port on the host's 127.0.0.1; 0 until bound lets the kernel
    /// pick one.
    pub host: u16,
    /// The guest's port, on its address on the bridge.
    pub guest: u16,
}

impl FromStr for PortMap {
    type Err = ProxyError;

    /// `HOST:GUEST`, or a bare `PORT` for the same port on both sides (as
    /// docker takes it).
    fn from_str(value: &str) -> Result<Self, ProxyError> {
        let (host, guest) = value.split_once(':').unwrap_or((value, value));
        match (parse_port(host), parse_port(guest)) {
            (Some(host), Some(guest)) => Ok(PortMap { host, guest }),
            _ => Err(ProxyError::PortMap(value.to_string())),
        }
    }
}

/// A port number from 1 to 65535, digits only (`u16::from_str` would also
/// take a sign).
fn parse_port(text: &str) -> Option<u16> {
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse().ok().filter(|&port| port != 0)
}

impl fmt::Display for PortMap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.host, self.guest)
    }
}

/// Errors from parsing, binding and starting the proxy.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// A `-p` value that is not one or two port numbers.
    #[error("-p {0}: expected HOST_PORT:GUEST_PORT, ports 1-65535")]
    PortMap(String),
    /// Two maps publish the same host port.
    #[error("host port {} is published twice ({first} and {second})", .first.host)]
    Duplicate {
        /// The first map with the host port.
        first: PortMap,
        /// The later one.
        second: PortMap,
    },
    /// Something else listens on the host port.
    #[error("port {} on 127.0.0.1 is already in use (published as {map})", .map.host)]
    InUse {
        /// The map whose host port is taken.
        map: PortMap,
    },
    /// The host port is below `net.ipv4.ip_unprivileged_port_start` and
    /// this process lacks CAP_NET_BIND_SERVICE.
    #[error(
        "port {} on 127.0.0.1 is privileged and this process may not bind it \
         (published as {map}): pick a host port from 1024 up",
        .map.host
    )]
    Privileged {
        /// The map whose host port is privileged.
        map: PortMap,
    },
    /// Binding or setting up the listener failed otherwise.
    #[error("cannot listen on port {} on 127.0.0.1 (published as {map})", .map.host)]
    Bind {
        /// The map being bound.
        map: PortMap,
        /// What the socket call said.
        #[source]
        source: io::Error,
    },
    /// The descriptors the event loop is stopped and resumed with could
    /// not be made.
    #[error("cannot create the proxy's eventfd or timerfd")]
    Fd(#[source] io::Error),
    /// The epoll instance could not be made or a descriptor added to it.
    #[error("cannot set up the proxy's event loop")]
    EventLoop(#[source] event_manager::Error),
    /// The thread could not be spawned.
    #[error("cannot start the proxy thread")]
    Thread(#[source] io::Error),
    /// The thread died before saying whether its filter is in place.
    #[error("the proxy thread ended during its setup")]
    ThreadEnded,
    /// The thread's seccomp filter could not be installed.
    #[error(transparent)]
    Seccomp(#[from] SeccompError),
}

/// The listeners of every published port, bound and not yet served.
#[derive(Debug)]
pub struct Proxy {
    listeners: Vec<(TcpListener, PortMap)>,
    max_connections: usize,
}

impl Proxy {
    /// Binds a listener on 127.0.0.1 for each of `ports`, refusing host
    /// ports listed twice. A host port of 0 lets the kernel pick one
    /// (see [`Proxy::ports`]).
    pub fn bind(ports: &[PortMap]) -> Result<Proxy, ProxyError> {
        refuse_duplicates(ports)?;
        let listeners = ports
            .iter()
            .map(|&map| listen(map))
            .collect::<Result<_, ProxyError>>()?;
        Ok(Proxy {
            listeners,
            max_connections: MAX_CONNECTIONS,
        })
    }

    /// The published ports, each host port as bound.
    pub fn ports(&self) -> Vec<PortMap> {
        self.listeners.iter().map(|&(_, map)| map).collect()
    }

    /// Serves the listeners on a new thread, connecting to `guest`'s
    /// ports, until the handle is dropped. With `seccomp`, the thread runs
    /// under [`ThreadKind::Proxy`]'s filter, installed once its event
    /// loop is set up.
    pub fn spawn(self, guest: Ipv4Addr, seccomp: bool) -> Result<ProxyHandle, ProxyError> {
        let stop = Arc::new(EventFd::new(EFD_NONBLOCK | EFD_CLOEXEC).map_err(ProxyError::Fd)?);
        let proxy_loop = ProxyLoop::new(self, guest, stop.clone())?;
        let mut manager = EventManager::new().map_err(ProxyError::EventLoop)?;
        let id = manager.add_subscriber(proxy_loop);
        let subscriber = manager.subscriber_mut(id).map_err(ProxyError::EventLoop)?;
        if let Some(err) = subscriber.setup_error.take() {
            return Err(ProxyError::EventLoop(err));
        }
        let (ready_tx, ready_rx) = mpsc::sync_channel(1);
        let thread = thread::Builder::new()
            .name("kiln-proxy".into())
            .spawn(move || serve(manager, id, seccomp, ready_tx))
            .map_err(ProxyError::Thread)?;
        let ready = ready_rx.recv();
        let handle = ProxyHandle {
            stop,
            thread: Some(thread),
        };
        match ready {
            Ok(Ok(())) => Ok(handle),
            Ok(Err(err)) => Err(err.into()),
            Err(mpsc::RecvError) => Err(ProxyError::ThreadEnded),
        }
    }
}

/// The proxy thread, running; dropping this stops it and closes every
/// listener and connection.
#[derive(Debug)]
pub struct ProxyHandle {
    stop: Arc<EventFd>,
    thread: Option<JoinHandle<()>>,
}

impl Drop for ProxyHandle {
    fn drop(&mut self) {
        // Only a full counter fails, and that is a stop already asked for.
        let _ = self.stop.write(1);
        if let Some(thread) = self.thread.take() {
            // A panic in the proxy thread has already been reported on stderr.
            let _ = thread.join();
        }
    }
}

fn refuse_duplicates(ports: &[PortMap]) -> Result<(), ProxyError> {
    for (index, &second) in ports.iter().enumerate() {
        let same_host = |first: &&PortMap| first.host == second.host && second.host != 0;
        if let Some(&first) = ports[..index].iter().find(same_host) {
            return Err(ProxyError::Duplicate { first, second });
        }
    }
    Ok(())
}

/// A non-blocking listener on 127.0.0.1 for `map`, and `map` with the
/// host port it got. std sets SO_REUSEADDR (so a restarted instance
/// rebinds while its old connections linger in TIME_WAIT) and opens the
/// socket close-on-exec (the VMM process starts VM processes, which must
/// not hold the port).
fn listen(map: PortMap) -> Result<(TcpListener, PortMap), ProxyError> {
    let listener =
        TcpListener::bind((Ipv4Addr::LOCALHOST, map.host)).map_err(|source| {
            match source.kind() {
                ErrorKind::AddrInUse => ProxyError::InUse { map },
                ErrorKind::PermissionDenied => ProxyError::Privileged { map },
                _ => ProxyError::Bind { map, source },
            }
        })?;
    let bind_err = |source| ProxyError::Bind { map, source };
    listener.set_nonblocking(true).map_err(bind_err)?;
    let host = listener.local_addr().map_err(bind_err)?.port();
    Ok((listener, PortMap { host, ..map }))
}

/// The proxy thread: the filter, then the loop until the stop eventfd
/// fires or the loop fails.
fn serve(
    mut manager: EventManager<ProxyLoop>,
    id: SubscriberId,
    seccomp: bool,
    ready: mpsc::SyncSender<Result<(), SeccompError>>,
) {
    if seccomp && let Err(err) = seccomp::install(ThreadKind::Proxy) {
        let _ = ready.send(Err(err));
        return;
    }
    // The receiver waits for this answer: it cannot be gone.
    let _ = ready.send(Ok(()));
    loop {
        if let Err(err) = manager.run() {
            log::error!("proxy: stopping: the event loop failed: {}", one_line(&err));
            return;
        }
        if manager.subscriber_mut(id).is_ok_and(|proxy| proxy.stopped) {
            return;
        }
    }
}

/// The proxy's event-loop subscriber: listeners, connections, and the
/// fds that stop it and resume accepting.
struct ProxyLoop {
    listeners: Vec<(TcpListener, PortMap)>,
    guest: Ipv4Addr,
    stop: Arc<EventFd>,
    stopped: bool,
    /// Connection `slot`'s sockets are tokens `2 * slot` and `2 * slot + 1`.
    slots: Vec<Option<Connection>>,
    max_connections: usize,
    /// Armed while accepting is paused after a failed accept.
    backoff: TimerFd,
    accepting: bool,
    /// The cap, or a failing accept, has been reported and not left
    /// since: one warning per episode, not one per connection or retry.
    cap_reported: bool,
    accept_failure_reported: bool,
    /// Connects to the guest that failed: one per client connection to a
    /// port the guest does not serve, so logged at most once a second.
    connect_failures: RateLimit,
    /// A registration that failed in `init`, for `spawn` to return.
    setup_error: Option<event_manager::Error>,
}

impl ProxyLoop {
    fn new(proxy: Proxy, guest: Ipv4Addr, stop: Arc<EventFd>) -> Result<Self, ProxyError> {
        Ok(ProxyLoop {
            listeners: proxy.listeners,
            guest,
            stop,
            stopped: false,
            slots: Vec::new(),
            max_connections: proxy.max_connections,
            backoff: TimerFd::new()
                .map_err(|err| ProxyError::Fd(io::Error::from_raw_os_error(err.errno())))?,
            accepting: true,
            cap_reported: false,
            accept_failure_reported: false,
            connect_failures: RateLimit::new(WARNING_INTERVAL),
            setup_error: None,
        })
    }

    /// Accepts every pending connection on listener `index`.
    fn accept(&mut self, index: usize, ops: &mut EventOps) {
        let map = self.listeners[index].1;
        let guest = SocketAddrV4::new(self.guest, map.guest);
        loop {
            let client = match accept_nonblocking(&self.listeners[index].0) {
                Ok(client) => client,
                Err(err) if err.kind() == ErrorKind::WouldBlock => return,
                Err(err) if is_retryable_accept(&err) => continue,
                Err(err) => {
                    if !self.accept_failure_reported {
                        log::warn!(
                            "proxy: cannot accept on port {}, pausing: {}",
                            map.host,
                            one_line(&err)
                        );
                        self.accept_failure_reported = true;
                    }
                    return self.pause_accepting(ops);
                }
            };
            self.accept_failure_reported = false;
            let Some(slot) = self.free_slot() else {
                // Dropping `client` closes it.
                if !self.cap_reported {
                    log::warn!(
                        "proxy: {} connections already: closing new ones",
                        self.max_connections
                    );
                    self.cap_reported = true;
                }
                continue;
            };
            match Connection::open(client, guest) {
                Ok(connection) => {
                    self.slots[slot] = Some(connection);
                    self.settle(slot, ops);
                }
                Err(err) => self.report_connect_failure(guest, &err),
            }
        }
    }

    /// Logs that a connect to `guest` failed, unless one was logged less
    /// than [`WARNING_INTERVAL`] ago; the next line logged counts those
    /// held back.
    fn report_connect_failure(&mut self, guest: SocketAddrV4, err: &io::Error) {
        let Some(held_back) = self.connect_failures.admit(Instant::now()) else {
            return;
        };
        let held_back = match held_back {
            0 => String::new(),
            count => format!(" ({count} more since the last such line)"),
        };
        log::warn!(
            "proxy: cannot connect to {guest}: {}{held_back}",
            one_line(err)
        );
    }

    /// A slot for a new connection, if under the cap.
    fn free_slot(&mut self) -> Option<usize> {
        if let Some(slot) = self.slots.iter().position(Option::is_none) {
            return Some(slot);
        }
        if self.slots.len() >= self.max_connections {
            return None;
        }
        self.slots.push(None);
        Some(self.slots.len() - 1)
    }

    /// Stops watching the listeners for `ACCEPT_BACKOFF`.
    fn pause_accepting(&mut self, ops: &mut EventOps) {
        if let Err(err) = self.backoff.reset(ACCEPT_BACKOFF, None) {
            // Without the timer accepting could never resume: carry on
            // accepting, spinning until resources come back.
            log::warn!("proxy: cannot arm the accept timer: {}", one_line(&err));
            return;
        }
        self.set_accepting(false, ops);
    }

    fn set_accepting(&mut self, accepting: bool, ops: &mut EventOps) {
        self.accepting = accepting;
        let set = if accepting {
            EventSet::IN
        } else {
            EventSet::empty()
        };
        for (index, (listener, map)) in self.listeners.iter().enumerate() {
            let token = LISTENER_TOKEN + index as u32;
            if let Err(err) = ops.modify(Events::with_data(listener, token, set)) {
                log::warn!("proxy: cannot watch port {}: {}", map.host, one_line(&err));
            }
        }
    }

    /// Acts on readiness of one of connection `slot`'s sockets.
    fn on_socket(&mut self, token: u32, events: &Events, ops: &mut EventOps) {
        let (slot, side) = ((token / 2) as usize, (token % 2) as usize);
        let Some(connection) = self.slots.get_mut(slot).and_then(Option::as_mut) else {
            return;
        };
        let refused = connection.on_ready(side, events.event_set());
        let guest = connection.guest;
        if let Some(err) = refused {
            self.report_connect_failure(guest, &err);
        }
        self.settle(slot, ops);
    }

    /// Brings connection `slot`'s registrations in line with what it waits
    /// for, or ends it (its sockets leave epoll before they close).
    fn settle(&mut self, slot: usize, ops: &mut EventOps) {
        let Some(connection) = self.slots[slot].as_mut() else {
            return;
        };
        if !connection.finished() {
            for side in SIDES {
                if let Err(err) = watch(ops, connection, slot, side) {
                    log::warn!(
                        "proxy: cannot watch a connection's socket: {}",
                        one_line(&err)
                    );
                    connection.failed = true;
                }
            }
        }
        if connection.finished() {
            for side in SIDES {
                unwatch(ops, connection, slot, side);
            }
            self.slots[slot] = None;
            self.cap_reported = false;
        }
    }
}

impl MutEventSubscriber for ProxyLoop {
    fn init(&mut self, ops: &mut EventOps) {
        let mut add = |events| {
            if let Err(err) = ops.add(events) {
                self.setup_error.get_or_insert(err);
            }
        };
        add(Events::with_data(&*self.stop, STOP_TOKEN, EventSet::IN));
        add(Events::with_data(
            &self.backoff,
            BACKOFF_TOKEN,
            EventSet::IN,
        ));
        for (index, (listener, _)) in self.listeners.iter().enumerate() {
            add(Events::with_data(
                listener,
                LISTENER_TOKEN + index as u32,
                EventSet::IN,
            ));
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        match events.data() {
            // Both fds are readable here, so their reads do not block, and
            // what they read (counts) does not matter.
            STOP_TOKEN => {
                let _ = self.stop.read();
                self.stopped = true;
            }
            BACKOFF_TOKEN => {
                let _ = self.backoff.wait();
                self.set_accepting(true, ops);
            }
            token if token >= LISTENER_TOKEN => {
                if self.accepting {
                    self.accept((token - LISTENER_TOKEN) as usize, ops);
                }
            }
            token => self.on_socket(token, &events, ops),
        }
    }
}

/// Accept errors that concern one connection only (it was reset while
/// queued, or a signal came): the next one may well succeed.
fn is_retryable_accept(err: &io::Error) -> bool {
    matches!(
        err.kind(),
        ErrorKind::Interrupted | ErrorKind::ConnectionAborted
    )
}

/// Registers, updates or removes `connection`'s socket on `side` for what
/// it waits for.
fn watch(
    ops: &mut EventOps,
    connection: &mut Connection,
    slot: usize,
    side: usize,
) -> Result<(), event_manager::Error> {
    let (registered, wanted) = (connection.registered[side], connection.interest(side));
    if registered == wanted {
        return Ok(());
    }
    let events = |set| Events::with_data(&connection.sockets[side], token(slot, side), set);
    match (registered, wanted) {
        (None, Some(set)) => ops.add(events(set))?,
        (Some(_), Some(set)) => ops.modify(events(set))?,
        (Some(set), None) => ops.remove(events(set))?,
        (None, None) => {}
    }
    connection.registered[side] = wanted;
    Ok(())
}

/// Takes `connection`'s socket on `side` out of epoll, before it closes.
fn unwatch(ops: &mut EventOps, connection: &mut Connection, slot: usize, side: usize) {
    if let Some(set) = connection.registered[side].take() {
        let events = Events::with_data(&connection.sockets[side], token(slot, side), set);
        if let Err(err) = ops.remove(events) {
            log::warn!(
                "proxy: cannot unwatch a connection's socket: {}",
                one_line(&err)
            );
        }
    }
}

fn token(slot: usize, side: usize) -> u32 {
    (2 * slot + side) as u32
}

/// A client's connection and the proxy's connection to the guest for it.
struct Connection {
    /// `sockets[CLIENT]`, accepted; `sockets[GUEST]`, connected to the guest.
    sockets: [TcpStream; 2],
    /// `flows[CLIENT]` carries the client's bytes to the guest,
    /// `flows[GUEST]` the guest's to the client.
    flows: [Flow; 2],
    guest: SocketAddrV4,
    /// The connect to the guest has not completed yet.
    connecting: bool,
    /// The socket reported HANG_UP: its peer has shut writing and we have
    /// shut it for writing. Epoll reports that whatever the interest, so
    /// the socket leaves epoll; what is left to read is read at once.
    hung_up: [bool; 2],
    /// What each socket is registered for in epoll, if it is.
    registered: [Option<EventSet>; 2],
    /// A socket failed: the connection ends.
    failed: bool,
}

impl Connection {
    /// `client`'s connection, with a connect to `guest` under way.
    fn open(client: TcpStream, guest: SocketAddrV4) -> io::Result<Connection> {
        let (server, connected) = connect_nonblocking(guest)?;
        // The proxy writes what it has as soon as it has it; Nagle's
        // algorithm would hold back small writes for a delayed ACK.
        client.set_nodelay(true)?;
        server.set_nodelay(true)?;
        Ok(Connection {
            sockets: [client, server],
            flows: [Flow::new(), Flow::new()],
            guest,
            connecting: !connected,
            hung_up: [false; 2],
            registered: [None; 2],
            failed: false,
        })
    }

    /// Moves what `events` on `side` let move; returns why the connect to
    /// the guest failed, if this was its end, for the loop to report.
    fn on_ready(&mut self, side: usize, events: EventSet) -> Option<io::Error> {
        let mut refused = None;
        if self.connecting && side == GUEST {
            refused = self.finish_connect(events);
        } else if events.contains(EventSet::ERROR) {
            // A reset: nothing more can be read or written either way.
            self.failed = true;
        } else if events.contains(EventSet::HANG_UP) {
            self.hung_up[side] = true;
        }
        // Resets and broken pipes end the connection, and are no news.
        if !self.failed && self.pump().is_err() {
            self.failed = true;
        }
        refused
    }

    /// The guest socket's first event: connected, or the connect's error
    /// (the connection has then failed).
    fn finish_connect(&mut self, events: EventSet) -> Option<io::Error> {
        let err = match self.sockets[GUEST].take_error() {
            Ok(None) if !events.intersects(EventSet::ERROR | EventSet::HANG_UP) => {
                self.connecting = false;
                return None;
            }
            Ok(None) => io::Error::new(ErrorKind::ConnectionAborted, "hung up"),
            Ok(Some(err)) | Err(err) => err,
        };
        self.failed = true;
        Some(err)
    }

    /// Moves what can move both ways without blocking.
    fn pump(&mut self) -> io::Result<()> {
        if self.connecting {
            return Ok(());
        }
        loop {
            let mut moved = false;
            for side in SIDES {
                let (source, sink) = (&self.sockets[side], &self.sockets[1 - side]);
                moved |= self.flows[side].step(source, sink)?;
            }
            // A hung-up socket is out of epoll: nothing would wake us for
            // the bytes still queued on it, so read on while they move.
            let unread = |side: usize| self.hung_up[side] && self.flows[side].wants_read();
            if !(moved && SIDES.into_iter().any(unread)) {
                return Ok(());
            }
        }
    }

    fn finished(&self) -> bool {
        self.failed || self.flows.iter().all(|flow| flow.shut)
    }

    /// What the socket on `side` waits for; None keeps it out of epoll.
    fn interest(&self, side: usize) -> Option<EventSet> {
        if self.hung_up[side] {
            return None;
        }
        if self.connecting {
            // The client stays registered (for nothing) so that a reset
            // still shows as an error; its bytes wait in the kernel.
            return Some(if side == GUEST {
                EventSet::OUT
            } else {
                EventSet::empty()
            });
        }
        let mut set = EventSet::empty();
        if self.flows[side].wants_read() {
            set |= EventSet::IN;
        }
        if self.flows[1 - side].wants_write() {
            set |= EventSet::OUT;
        }
        Some(set)
    }
}

/// One direction of a connection: bytes read from a source socket wait in
/// a buffer to be written to the sink, the other socket.
struct Flow {
    buffer: Buffer,
    /// The source reached its end of file.
    ended: bool,
    /// The sink has been shut for writing, after the end of file.
    shut: bool,
}

impl Flow {
    fn new() -> Self {
        Flow {
            buffer: Buffer::new(),
            ended: false,
            shut: false,
        }
    }

    fn wants_read(&self) -> bool {
        !self.ended && self.buffer.has_room()
    }

    fn wants_write(&self) -> bool {
        !self.buffer.is_empty()
    }

    /// One read and one write, each if it can be made, then the sink's
    /// shutdown once the source has ended and the buffer is drained.
    /// Returns whether anything moved; errors end the connection.
    fn step(&mut self, source: &TcpStream, sink: &TcpStream) -> io::Result<bool> {
        let mut moved = false;
        if self.wants_read() {
            match self.buffer.fill_from(source) {
                Ok(read) => {
                    self.ended = read == 0;
                    moved = true;
                }
                Err(err) if is_transient(&err) => {}
                Err(err) => return Err(err),
            }
        }
        if self.wants_write() {
            match self.buffer.drain_into(sink) {
                Ok(written) => moved |= written > 0,
                Err(err) if is_transient(&err) => {}
                Err(err) => return Err(err),
            }
        }
        if self.ended && self.buffer.is_empty() && !self.shut {
            sink.shutdown(Shutdown::Write)?;
            self.shut = true;
        }
        Ok(moved)
    }
}

/// Bytes read and not yet written, at most [`BUFFER_SIZE`].
struct Buffer {
    bytes: Box<[u8]>,
    /// The bytes waiting are `bytes[start..end]`.
    start: usize,
    end: usize,
}

impl Buffer {
    fn new() -> Self {
        Buffer {
            bytes: vec![0; BUFFER_SIZE].into_boxed_slice(),
            start: 0,
            end: 0,
        }
    }

    fn is_empty(&self) -> bool {
        self.start == self.end
    }

    fn has_room(&self) -> bool {
        self.end - self.start < self.bytes.len()
    }

    /// Reads what fits from `source` (0 is its end of file); only called
    /// while the buffer has room.
    fn fill_from(&mut self, mut source: &TcpStream) -> io::Result<usize> {
        if self.end == self.bytes.len() {
            // Reads go at the end: move the waiting bytes to the front.
            self.bytes.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        let read = source.read(&mut self.bytes[self.end..])?;
        self.end += read;
        Ok(read)
    }

    /// Writes what `sink` takes of the waiting bytes.
    fn drain_into(&mut self, mut sink: &TcpStream) -> io::Result<usize> {
        let written = sink.write(&self.bytes[self.start..self.end])?;
        self.start += written;
        if self.start == self.end {
            (self.start, self.end) = (0, 0);
        }
        Ok(written)
    }
}

/// Errors that only mean "not now" on a non-blocking socket.
fn is_transient(err: &io::Error) -> bool {
    matches!(err.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted)
}

/// A pending connection on `listener`, as a non-blocking, close-on-exec
/// socket (std's accept would leave it blocking).
fn accept_nonblocking(listener: &TcpListener) -> io::Result<TcpStream> {
    // SAFETY: accept4 with null address pointers only returns a new
    // descriptor (or -1); the listener is open.
    let fd = unsafe {
        libc::accept4(
            listener.as_raw_fd(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
        )
    };
    // SAFETY: a descriptor from accept4 is new and nothing else owns it.
    new_socket(fd).map(|fd| unsafe { TcpStream::from_raw_fd(fd) })
}

/// A non-blocking, close-on-exec TCP socket connecting to `addr`, and
/// whether the connect has already completed (it normally goes on in the
/// background: the socket turns writable once it is done).
fn connect_nonblocking(addr: SocketAddrV4) -> io::Result<(TcpStream, bool)> {
    let flags = libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC;
    // SAFETY: socket(2) takes integers only and returns a new descriptor or -1.
    let fd = new_socket(unsafe { libc::socket(libc::AF_INET, flags, 0) })?;
    // SAFETY: `fd` is a new descriptor that nothing else owns.
    let stream = unsafe { TcpStream::from_raw_fd(fd) };
    let sockaddr = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: addr.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(*addr.ip()).to_be(),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: the address is an initialized sockaddr_in, of the size given,
    // that connect only reads.
    let ret = unsafe {
        libc::connect(
            fd,
            (&raw const sockaddr).cast(),
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        )
    };
    if ret == 0 {
        return Ok((stream, true));
    }
    let err = io::Error::last_os_error();
    match err.raw_os_error() {
        // An interrupted connect also goes on in the background.
        Some(libc::EINPROGRESS | libc::EINTR) => Ok((stream, false)),
        _ => Err(err),
    }
}

/// `fd`, or the error a -1 from the call that made it stands for.
fn new_socket(fd: RawFd) -> io::Result<RawFd> {
    if fd < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(fd)
    }
}

/// At most one line per interval of one kind of log line: a kind a client
/// can cause at will must not let it grow the log at its pace.
struct RateLimit {
    interval: Duration,
    /// When the last line was let through.
    last: Option<Instant>,
    /// Lines held back since then.
    held_back: u64,
}

impl RateLimit {
    fn new(interval: Duration) -> Self {
        RateLimit {
            interval,
            last: None,
            held_back: 0,
        }
    }

    /// Whether a line may be logged at `now`: `Some` with how many were
    /// held back since the last one, or `None` when this one is held back
    /// too (less than the interval has passed since the last).
    fn admit(&mut self, now: Instant) -> Option<u64> {
        if self
            .last
            .is_some_and(|last| now.saturating_duration_since(last) < self.interval)
        {
            self.held_back += 1;
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.held_back))
    }
}

#[cfg(test)]
mod tests;
