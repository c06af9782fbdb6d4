//! The virtio-vsock device: its features and configuration space,
//! activation and reset, the listening socket, and the moving of packets
//! between its queues and the host connections.
use std::collections::{BTreeMap, VecDeque};
use std::fs;
use std::io::{self, ErrorKind, Write};
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ids::VIRTIO_ID_VSOCK;
use virtio_queue::{Queue, QueueState, QueueT};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use super::super::{
    ActivateError, GuestMemoryMmap, Interrupt, VirtioDevice, fixed_queues, ignore_config_write,
    next_chain, read_config_space,
};
use super::connection::Connection;
use super::packet::{
    self, HEADER_SIZE, Header, MAX_PAYLOAD, VIRTIO_VSOCK_EVENT_SIZE,
    VIRTIO_VSOCK_EVENT_TRANSPORT_RESET, VIRTIO_VSOCK_OP_REQUEST, VIRTIO_VSOCK_OP_RST,
    VIRTIO_VSOCK_TYPE_STREAM, VSOCK_HOST_CID, VSOCK_MAX_GUEST_CID, VSOCK_MIN_GUEST_CID,
    read_packet,
};
use super::persist::TransportReset;
use crate::logger::{error_limited, warn_limited};
use crate::report::one_line;

/// How the log names this device.
const DEVICE: &str = "virtio-vsock";

/// Size of each of the three queues.
pub const QUEUE_SIZE: u16 = 256;
pub(super) const RX: usize = 0;
pub(super) const TX: usize = 1;
pub(super) const EVENT: usize = 2;
/// Host ports the device hands out, as Firecracker's: far from any port
/// a guest service would listen on.
pub(super) const LOCAL_PORT_FIRST: u32 = 1 << 30;
const LOCAL_PORT_LAST: u32 = (1 << 31) - 1;
/// Host connections at once; more are closed as they come.
pub const MAX_CONNECTIONS: usize = 64;
/// RSTs waiting for receive buffers; the tx queue is left alone (the
/// guest waits) while this many are pending.
const MAX_PENDING_RESETS: usize = 256;

/// A VM's vsock device, as `VmConfig` describes it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct VsockConfig {
    /// The guest's CID: at least 3 (§5.10.4), at most 2^32 - 2.
    pub cid: u64,
    /// The unix socket host processes connect to (`CONNECT <port>\n`).
    pub socket: PathBuf,
}

/// Errors from creating the device.
#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    /// The configured CID is reserved (§5.10.4) or out of range.
    #[error("vsock CID {0}: expected {VSOCK_MIN_GUEST_CID} to {VSOCK_MAX_GUEST_CID}")]
    Cid(u64),
    /// A live listener holds the socket path: another VM, most likely.
    #[error("vsock socket {0}: something else is listening there")]
    InUse(PathBuf),
    /// Something other than a socket is at the path; it is left alone.
    #[error("vsock socket {0}: the path exists and is not a socket")]
    NotASocket(PathBuf),
    /// The socket could not be inspected, removed, bound or set up.
    #[error("cannot set up the vsock socket {path}")]
    Socket {
        /// The socket's path.
        path: PathBuf,
        /// What the system said.
        #[source]
        source: io::Error,
    },
    /// The queues' eventfds could not be created.
    #[error("cannot create the vsock queue eventfds")]
    EventFd(#[source] io::Error),
}

/// What the device holds between activation and reset.
pub(super) struct Active {
    mem: GuestMemoryMmap,
    queues: [Queue; 3],
    pub(super) interrupt: Arc<Interrupt>,
}

/// A virtio socket device.
pub struct Vsock {
    pub(super) cid: u64,
    pub(super) path: PathBuf,
    pub(super) listener: UnixListener,
    pub(super) queue_evts: [EventFd; 3],
    pub(super) active: Option<Active>,
    pub(super) connections: BTreeMap<u32, Connection>,
    /// RSTs for the guest, in order.
    pub(super) resets: VecDeque<Header>,
    next_port: u32,
    /// The local port served last, so connections take turns.
    last_served: u32,
    /// Where a restored device stands with its TRANSPORT_RESET.
    pub(super) transport_reset: TransportReset,
    /// The driver reset the device: every connection goes at the next event.
    pub(super) teardown: bool,
}

impl Vsock {
    /// A device for the guest `config.cid`, listening on `config.socket`
    /// (a stale socket there is replaced; a live one is refused).
    pub fn new(config: &VsockConfig) -> Result<Self, VsockError> {
        if !(VSOCK_MIN_GUEST_CID..=VSOCK_MAX_GUEST_CID).contains(&config.cid) {
            return Err(VsockError::Cid(config.cid));
        }
        let listener = listen(&config.socket)?;
        let evt = || EventFd::new(EFD_NONBLOCK).map_err(VsockError::EventFd);
        Ok(Self {
            cid: config.cid,
            path: config.socket.clone(),
            listener,
            queue_evts: [evt()?, evt()?, evt()?],
            active: None,
            connections: BTreeMap::new(),
            resets: VecDeque::new(),
            next_port: LOCAL_PORT_FIRST,
            last_served: 0,
            transport_reset: TransportReset::Done,
            teardown: false,
        })
    }

    /// The socket host processes connect to.
    pub fn socket(&self) -> &Path {
        &self.path
    }
    /// Accepts every pending host connection.
    pub(super) fn accept(&mut self) {
        loop {
            // SAFETY: accept4 with null address pointers only returns a
            // new descriptor (or -1); the listener is open.
            let fd = unsafe {
                libc::accept4(
                    self.listener.as_raw_fd(),
                    std::ptr::null_mut(),
                    std::ptr::null_mut(),
                    libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                )
            };
            if fd < 0 {
                let err = io::Error::last_os_error();
                match err.kind() {
                    ErrorKind::WouldBlock => return,
                    ErrorKind::Interrupted | ErrorKind::ConnectionAborted => continue,
                    _ => {
                        error_limited!("virtio-vsock: cannot accept a host connection: {err}");
                        return;
                    }
                }
            }
            // SAFETY: accept4 returned a new descriptor that nothing else owns.
            let stream = unsafe { UnixStream::from_raw_fd(fd) };
            if self.connections.len() >= MAX_CONNECTIONS {
                warn_limited!(
                    "virtio-vsock: {MAX_CONNECTIONS} host connections already: closing a new one"
                );
                continue;
            }
            let port = self.allocate_port();
            self.connections.insert(port, Connection::new(stream, port));
        }
    }

    /// A host port no connection uses.
    fn allocate_port(&mut self) -> u32 {
        loop {
            let port = self.next_port;
            self.next_port = if port >= LOCAL_PORT_LAST {
                LOCAL_PORT_FIRST
            } else {
                port + 1
            };
            if !self.connections.contains_key(&port) {
                return port;
            }
        }
    }
    /// Serves the driver's packets; returns whether any was used.
    pub(super) fn process_tx(&mut self) -> bool {
        let Some(active) = &mut self.active else {
            return false;
        };
        let mem = &active.mem;
        let mut used = false;
        while self.resets.len() < MAX_PENDING_RESETS {
            let Some(chain) = next_chain(DEVICE, &mut active.queues[TX], mem, &active.interrupt)
            else {
                break;
            };
            let head = chain.head_index();
            let packet = read_packet(mem, chain);
            if let Err(err) = active.queues[TX].add_used(mem, head, 0) {
                warn_limited!("virtio-vsock: cannot return tx buffer {head}: {err}");
                break;
            }
            used = true;
            match packet {
                Ok((header, payload)) => {
                    dispatch(
                        self.cid,
                        &mut self.connections,
                        &mut self.resets,
                        &header,
                        &payload,
                    );
                }
                Err(err) => warn_limited!(
                    "virtio-vsock: dropping tx packet {head}: {}",
                    one_line(&err)
                ),
            }
        }
        used
    }

    /// Hands the driver what is owed it, as far as its receive buffers
    /// go; returns whether any was used.
    pub(super) fn process_rx(&mut self) -> bool {
        let Some(active) = &mut self.active else {
            return false;
        };
        let mem = &active.mem;
        let requests_allowed = self.transport_reset == TransportReset::Done;
        let mut used = false;
        loop {
            let next = self.resets.front().map(|_| None).or_else(|| {
                next_connection(&self.connections, self.last_served, requests_allowed)
                    .map(|(port, op)| Some((port, op)))
            });
            let Some(source) = next else {
                return used;
            };
            let Some(chain) = next_chain(DEVICE, &mut active.queues[RX], mem, &active.interrupt)
            else {
                return used;
            };
            let head = chain.head_index();
            let mut writer = match chain.writer(mem) {
                Ok(writer) => writer,
                Err(err) => {
                    warn_limited!("virtio-vsock: dropping rx buffer {head}: {err}");
                    used |= active.queues[RX].add_used(mem, head, 0).is_ok();
                    continue;
                }
            };
            let room = writer.available_bytes();
            if room < HEADER_SIZE {
                warn_limited!(
                    "virtio-vsock: dropping rx buffer {head}: {room} bytes, less than a header"
                );
                used |= active.queues[RX].add_used(mem, head, 0).is_ok();
                continue;
            }
            let (header, payload) = match source {
                None => (self.resets.pop_front().unwrap_or_default(), Vec::new()),
                Some((port, op)) => {
                    self.last_served = port;
                    let room = (room - HEADER_SIZE).min(MAX_PAYLOAD as usize);
                    match self.connections.get_mut(&port) {
                        Some(connection) => connection.take_packet(op, self.cid, room),
                        None => (Header::default(), Vec::new()),
                    }
                }
            };
            let written = writer
                .write_all(&header.to_bytes())
                .and_then(|()| writer.write_all(&payload));
            if let Err(err) = written {
                warn_limited!("virtio-vsock: cannot write rx buffer {head}: {err}");
            }
            let len = writer.bytes_written() as u32;
            if let Err(err) = active.queues[RX].add_used(mem, head, len) {
                warn_limited!("virtio-vsock: cannot return rx buffer {head}: {err}");
                return used;
            }
            used = true;
        }
    }

    /// Sends the TRANSPORT_RESET event if one is owed; returns whether a
    /// buffer was used.
    pub(super) fn process_event(&mut self) -> bool {
        let Some(active) = &mut self.active else {
            return false;
        };
        if self.transport_reset != TransportReset::Due {
            return false;
        }
        let mem = &active.mem;
        let Some(chain) = next_chain(DEVICE, &mut active.queues[EVENT], mem, &active.interrupt)
        else {
            return false;
        };
        let head = chain.head_index();
        let event = VIRTIO_VSOCK_EVENT_TRANSPORT_RESET.to_le_bytes();
        let len = match chain.writer(mem) {
            Ok(mut writer) if writer.available_bytes() >= VIRTIO_VSOCK_EVENT_SIZE => {
                match writer.write_all(&event) {
                    Ok(()) => {
                        self.transport_reset = TransportReset::Delivered;
                        VIRTIO_VSOCK_EVENT_SIZE as u32
                    }
                    Err(err) => {
                        warn_limited!("virtio-vsock: cannot write event buffer {head}: {err}");
                        0
                    }
                }
            }
            Ok(_) => {
                warn_limited!("virtio-vsock: dropping event buffer {head}: too small");
                0
            }
            Err(err) => {
                warn_limited!("virtio-vsock: dropping event buffer {head}: {err}");
                0
            }
        };
        if let Err(err) = active.queues[EVENT].add_used(mem, head, len) {
            warn_limited!("virtio-vsock: cannot return event buffer {head}: {err}");
        }
        true
    }
}

/// The next connection with something for the guest, after `last` in
/// port order (round robin), and what it is.
fn next_connection(
    connections: &BTreeMap<u32, Connection>,
    last: u32,
    requests_allowed: bool,
) -> Option<(u32, u16)> {
    let pick = |(&port, connection): (&u32, &Connection)| {
        connection.next_op(requests_allowed).map(|op| (port, op))
    };
    connections
        .range(last.saturating_add(1)..)
        .find_map(pick)
        .or_else(|| connections.range(..=last).find_map(pick))
}

/// Acts on one packet from the guest.
fn dispatch(
    cid: u64,
    connections: &mut BTreeMap<u32, Connection>,
    resets: &mut VecDeque<Header>,
    header: &Header,
    payload: &[u8],
) {
    if header.src_cid != cid {
        // A driver that has not yet re-read its CID after a restore.
        warn_limited!(
            "virtio-vsock: dropping a {} packet from CID {}: the guest is CID {cid}",
            packet::op_name(header.op),
            header.src_cid
        );
        return;
    }
    if header.op == VIRTIO_VSOCK_OP_RST {
        // Never answered (§5.10.6.5: an RST ends the exchange). The
        // host's socket closes once the connection leaves the event loop.
        if let Some(connection) = connections
            .get_mut(&header.dst_port)
            .filter(|c| c.peer_port == header.src_port && header.dst_cid == VSOCK_HOST_CID)
        {
            connection.reset_by_guest();
        }
        return;
    }
    let reset = || Header {
        src_cid: header.dst_cid,
        dst_cid: header.src_cid,
        src_port: header.dst_port,
        dst_port: header.src_port,
        kind: VIRTIO_VSOCK_TYPE_STREAM,
        op: VIRTIO_VSOCK_OP_RST,
        ..Header::default()
    };
    let connection = connections
        .get_mut(&header.dst_port)
        .filter(|c| c.peer_port == header.src_port);
    match connection {
        Some(connection)
            if header.dst_cid == VSOCK_HOST_CID
                && header.kind == VIRTIO_VSOCK_TYPE_STREAM
                && header.op != VIRTIO_VSOCK_OP_REQUEST =>
        {
            connection.on_guest_packet(header, payload)
        }
        // Guest-initiated connections (REQUEST), packets for connections
        // that do not exist (any more), to other CIDs or of other socket
        // types: refused.
        _ => resets.push_back(reset()),
    }
}

/// The listening socket at `path`, non-blocking; a stale socket file
/// (nobody accepts on it) is removed first.
fn listen(path: &Path) -> Result<UnixListener, VsockError> {
    let socket_err = |source| VsockError::Socket {
        path: path.to_path_buf(),
        source,
    };
    match fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            if UnixStream::connect(path).is_ok() {
                return Err(VsockError::InUse(path.to_path_buf()));
            }
            fs::remove_file(path).map_err(socket_err)?;
        }
        Ok(_) => return Err(VsockError::NotASocket(path.to_path_buf())),
        Err(err) if err.kind() == ErrorKind::NotFound => {}
        Err(err) => return Err(socket_err(err)),
    }
    let listener = UnixListener::bind(path).map_err(socket_err)?;
    listener.set_nonblocking(true).map_err(socket_err)?;
    Ok(listener)
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_VSOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE; 3]
    }

    fn queue_events(&self) -> &[EventFd] {
        &self.queue_evts
    }

    fn features(&self) -> u64 {
        1 << VIRTIO_F_VERSION_1
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // `struct virtio_vsock_config { le64 guest_cid; }` (§5.10.4);
        // bytes past it read as zero.
        read_config_space(&self.cid.to_le_bytes(), offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // §5.10.4: the configuration space is read-only.
        ignore_config_write("virtio-vsock", offset, data);
    }

    fn activate(
        &mut self,
        _acked_features: u64,
        mem: GuestMemoryMmap,
        queues: Vec<Queue>,
        interrupt: Arc<Interrupt>,
    ) -> Result<(), ActivateError> {
        let queues = fixed_queues(queues)?;
        self.active = Some(Active {
            mem,
            queues,
            interrupt,
        });
        // Serve what waits from the event loop: activation runs on a vCPU
        // thread, whose seccomp filter has no socket calls.
        if let Err(err) = self.queue_evts[RX].write(1) {
            error_limited!("virtio-vsock: cannot wake the device: {err}");
        }
        Ok(())
    }

    fn reset(&mut self) {
        self.transport_reset = TransportReset::Done;
        // A driver that never started the device knows of no connection:
        // the host's early ones wait for the driver that is about to
        // start it (Linux resets each device before probing it).
        if self.active.take().is_none() {
            return;
        }
        // The connections' sockets leave the event loop on its thread.
        self.teardown = true;
        if let Err(err) = self.queue_evts[RX].write(1) {
            error_limited!("virtio-vsock: cannot wake the device: {err}");
        }
    }

    fn queue_states(&self) -> Vec<QueueState> {
        self.active
            .iter()
            .flat_map(|active| active.queues.iter().map(Queue::state))
            .collect()
    }
}
