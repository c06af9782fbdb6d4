//! One stream between a host process (a unix-socket connection to the
//! VMM) and a guest port, with virtio-vsock's credit-based flow control
//! (virtio 1.2 §5.10.6.3) in both directions.
//!
//! Host → guest: bytes are read from the host socket only as far as the
//! guest has credit for them (its `buf_alloc` minus what is in flight),
//! and at most [`STAGE_CAPACITY`] at a time; they wait in `staged` for
//! receive buffers. Guest → host: the device advertises [`BUF_ALLOC`]
//! bytes of buffer; what the host socket does not take at once waits in
//! `to_host`, and a guest that sends past its credit is reset.
use std::io::{self, ErrorKind};
use std::net::Shutdown;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;

use vmm_sys_util::epoll::EventSet;

use super::packet::{
    Header, VIRTIO_VSOCK_OP_CREDIT_REQUEST, VIRTIO_VSOCK_OP_CREDIT_UPDATE, VIRTIO_VSOCK_OP_REQUEST,
    VIRTIO_VSOCK_OP_RESPONSE, VIRTIO_VSOCK_OP_RW, VIRTIO_VSOCK_OP_SHUTDOWN,
    VIRTIO_VSOCK_SHUTDOWN_F_BOTH, VIRTIO_VSOCK_SHUTDOWN_F_RECEIVE, VIRTIO_VSOCK_SHUTDOWN_F_SEND,
    VIRTIO_VSOCK_TYPE_STREAM, VSOCK_HOST_CID,
};
use crate::logger::warn_limited;

/// The receive buffer the device advertises per connection (`buf_alloc`):
/// the most guest bytes it holds for a host that does not read.
pub const BUF_ALLOC: u32 = 64 * 1024;
/// The most host bytes read ahead of the guest's receive buffers.
pub const STAGE_CAPACITY: usize = 64 * 1024;
/// Once the host has consumed this many bytes the guest does not know
/// about yet, a CREDIT_UPDATE tells it (so its view of the free space
/// never falls below half of [`BUF_ALLOC`] for long).
const CREDIT_UPDATE_THRESHOLD: u32 = BUF_ALLOC / 2;
/// `CONNECT <port>\n` is at most 19 bytes; a longer line is not one.
const CONNECT_LINE_MAX: usize = 32;

/// Where a connection stands.
#[derive(Debug, PartialEq, Eq)]
pub enum State {
    /// Accepted; the host has not sent its whole `CONNECT <port>\n` yet.
    AwaitingConnect(Vec<u8>),
    /// The REQUEST to the guest port waits for a receive buffer.
    RequestDue,
    /// The REQUEST went out; the guest answers RESPONSE or RST.
    RequestSent,
    /// The guest accepted: data flows.
    Established,
}

/// What to do with a connection after an event.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// It goes on.
    Keep,
    /// Forget it quietly (the guest knows nothing of it, or knows it is over).
    Drop,
    /// Forget it and send the guest an RST.
    Reset,
}

/// A host stream and its vsock connection.
pub struct Connection {
    /// The host process's end of the connection, non-blocking.
    pub stream: UnixStream,
    /// The host side's port: the source port of every packet to the guest.
    pub local_port: u32,
    /// The guest's port, once the host has named it.
    pub peer_port: u32,
    /// Where the connection stands in its handshake and life.
    pub state: State,
    /// Host bytes read, waiting for the guest's receive buffers.
    staged: Vec<u8>,
    /// The host will send no more (read returned 0).
    host_eof: bool,
    /// The host socket is gone for writing too (EPOLLHUP/EPOLLERR): it
    /// is watched no more, and what it still holds is read as credit allows.
    pub host_hup: bool,
    /// The socket may have data (cleared by EAGAIN).
    readable: bool,
    /// The socket may take data (cleared by EAGAIN).
    writable: bool,
    /// Payload bytes sent to the guest (wrapping, §5.10.6.3 `tx_cnt`).
    tx_cnt: u32,
    /// The guest's receive buffer and what it has consumed of it.
    peer_buf_alloc: u32,
    peer_fwd_cnt: u32,
    /// A CREDIT_REQUEST went out since the guest last had credit.
    credit_requested: bool,
    /// Bytes for the host socket: the `OK` line, then guest payload.
    to_host: Vec<u8>,
    /// How many leading bytes of `to_host` are Kiln's (the `OK` line),
    /// not the guest's, so not counted in `fwd_cnt`.
    own_bytes: usize,
    /// Guest bytes written to the host socket (wrapping `fwd_cnt`).
    fwd_cnt: u32,
    /// The `fwd_cnt` the guest last heard of.
    fwd_cnt_sent: u32,
    /// The guest asked for, or needs, our credit information.
    credit_update_due: bool,
    /// SHUTDOWN flags the guest sent.
    guest_shutdown: u32,
    /// SHUTDOWN flags sent to the guest.
    shutdown_sent: u32,
    /// The host socket's write side is shut (the guest's SEND shutdown).
    host_write_shut: bool,
    /// Something was wrong enough to reset the connection.
    reset_due: bool,
    /// The guest sent an RST: the connection is over.
    guest_reset: bool,
    /// The events the socket is registered for, if it is registered.
    pub registered: Option<EventSet>,
}

impl Connection {
    /// A connection just accepted from a host process on `local_port`,
    /// waiting for its `CONNECT <port>` line.
    pub fn new(stream: UnixStream, local_port: u32) -> Self {
        Self {
            stream,
            local_port,
            peer_port: 0,
            state: State::AwaitingConnect(Vec::new()),
            staged: Vec::new(),
            host_eof: false,
            host_hup: false,
            readable: true,
            writable: true,
            tx_cnt: 0,
            peer_buf_alloc: 0,
            peer_fwd_cnt: 0,
            credit_requested: false,
            to_host: Vec::new(),
            own_bytes: 0,
            fwd_cnt: 0,
            fwd_cnt_sent: 0,
            credit_update_due: false,
            guest_shutdown: 0,
            shutdown_sent: 0,
            host_write_shut: false,
            reset_due: false,
            guest_reset: false,
            registered: None,
        }
    }

    /// The epoll readiness of the host socket.
    pub fn on_ready(&mut self, events: EventSet) {
        if events.intersects(EventSet::IN | EventSet::HANG_UP | EventSet::ERROR) {
            self.readable = true;
        }
        if events.contains(EventSet::OUT) {
            self.writable = true;
        }
        if events.intersects(EventSet::HANG_UP | EventSet::ERROR) {
            self.host_hup = true;
        }
    }

    /// Bytes the guest can take now (§5.10.6.3: `peer_buf_alloc -
    /// (tx_cnt - peer_fwd_cnt)`; a guest that shrank its buffer below
    /// what is in flight has none).
    pub fn peer_credit(&self) -> u32 {
        let in_flight = self.tx_cnt.wrapping_sub(self.peer_fwd_cnt);
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    /// Whether the guest still takes data from the host.
    fn guest_receives(&self) -> bool {
        self.guest_shutdown & VIRTIO_VSOCK_SHUTDOWN_F_RECEIVE == 0
    }

    /// How many more host bytes may be read now: no more than the guest
    /// has credit for, nor than [`STAGE_CAPACITY`].
    fn read_allowance(&self) -> usize {
        if self.state != State::Established || self.host_eof || !self.guest_receives() {
            return 0;
        }
        let credit = usize::try_from(self.peer_credit()).unwrap_or(usize::MAX);
        credit.min(STAGE_CAPACITY).saturating_sub(self.staged.len())
    }

    /// The events to watch the host socket for; `None`: not at all.
    pub fn interest(&self) -> Option<EventSet> {
        if self.host_hup {
            return None;
        }
        let mut events = EventSet::empty();
        let reading = match self.state {
            State::AwaitingConnect(_) => !self.host_eof,
            _ => self.read_allowance() > 0,
        };
        if reading {
            events |= EventSet::IN;
        }
        if !self.to_host.is_empty() {
            events |= EventSet::OUT;
        }
        Some(events)
    }

    /// Moves bytes between the host socket and the buffers, as far as
    /// the socket, the credit and the buffers allow.
    pub fn host_io(&mut self) {
        self.flush_to_host();
        match &self.state {
            State::AwaitingConnect(_) => self.read_connect_line(),
            State::Established => self.read_host(),
            State::RequestDue | State::RequestSent => {}
        }
    }

    fn read_connect_line(&mut self) {
        let State::AwaitingConnect(line) = &mut self.state else {
            return;
        };
        if !self.readable || self.host_eof {
            return;
        }
        let mut buf = [0u8; CONNECT_LINE_MAX];
        let room = CONNECT_LINE_MAX - line.len();
        match recv(&self.stream, &mut buf[..room]) {
            Ok(0) => self.host_eof = true,
            Ok(n) => line.extend_from_slice(&buf[..n]),
            Err(err) if err.kind() == ErrorKind::WouldBlock => self.readable = false,
            Err(_) => self.host_eof = true,
        }
        let Some(end) = line.iter().position(|&b| b == b'\n') else {
            if line.len() >= CONNECT_LINE_MAX {
                warn_limited!(
                    "virtio-vsock: host connection {}: expected `CONNECT <port>\\n`",
                    self.local_port
                );
                self.host_eof = true;
            }
            return;
        };
        let rest = line.split_off(end + 1);
        match parse_connect(&line[..end]) {
            Some(port) => {
                self.peer_port = port;
                // Bytes the host sent right behind its CONNECT line go to
                // the guest once it accepts.
                self.staged = rest;
                self.state = State::RequestDue;
            }
            None => {
                warn_limited!(
                    "virtio-vsock: host connection {}: expected `CONNECT <port>\\n`, got {:?}",
                    self.local_port,
                    String::from_utf8_lossy(&line[..end])
                );
                self.host_eof = true;
            }
        }
    }

    fn read_host(&mut self) {
        while self.readable {
            let allowance = self.read_allowance();
            if allowance == 0 {
                return;
            }
            let start = self.staged.len();
            self.staged.resize(start + allowance, 0);
            let read = recv(&self.stream, &mut self.staged[start..]);
            self.staged.truncate(start + *read.as_ref().unwrap_or(&0));
            match read {
                Ok(0) => self.host_eof = true,
                Ok(_) => {}
                Err(err) if err.kind() == ErrorKind::WouldBlock => self.readable = false,
                Err(err) if err.kind() == ErrorKind::Interrupted => {}
                Err(_) => {
                    self.host_eof = true;
                    self.host_hup = true;
                }
            }
        }
    }

    fn flush_to_host(&mut self) {
        while self.writable && !self.to_host.is_empty() && !self.host_hup {
            match send(&self.stream, &self.to_host) {
                Ok(n) => {
                    self.to_host.drain(..n);
                    let own = n.min(self.own_bytes);
                    self.own_bytes -= own;
                    self.fwd_cnt = self.fwd_cnt.wrapping_add((n - own) as u32);
                }
                Err(err) if err.kind() == ErrorKind::WouldBlock => self.writable = false,
                Err(err) if err.kind() == ErrorKind::Interrupted => {}
                Err(_) => {
                    // The host is gone for writing (EPIPE, ECONNRESET).
                    self.host_hup = true;
                }
            }
        }
        if self.fwd_cnt.wrapping_sub(self.fwd_cnt_sent) >= CREDIT_UPDATE_THRESHOLD {
            self.credit_update_due = true;
        }
        let guest_done_sending = self.guest_shutdown & VIRTIO_VSOCK_SHUTDOWN_F_SEND != 0;
        if guest_done_sending && self.to_host.is_empty() && !self.host_write_shut {
            // The host reads end-of-file where the guest stopped sending.
            self.host_write_shut = true;
            let _ = self.stream.shutdown(Shutdown::Write);
        }
    }

    /// A packet from the guest for this connection (not an RST, which
    /// ends it).
    pub fn on_guest_packet(&mut self, header: &Header, payload: &[u8]) {
        // Every packet carries the sender's credit information (§5.10.6.3).
        self.peer_buf_alloc = header.buf_alloc;
        self.peer_fwd_cnt = header.fwd_cnt;
        // One CREDIT_REQUEST per stall: asking again while the guest
        // still has no room would only make it answer again.
        if self.peer_credit() > 0 {
            self.credit_requested = false;
        }
        match (header.op, &self.state) {
            (VIRTIO_VSOCK_OP_RESPONSE, State::RequestSent) => {
                self.state = State::Established;
                let ok = format!("OK {}\n", self.local_port).into_bytes();
                self.own_bytes = ok.len();
                self.to_host.splice(0..0, ok);
            }
            (VIRTIO_VSOCK_OP_RW, State::Established) => {
                let held = self.to_host.len() - self.own_bytes;
                if self.guest_shutdown & VIRTIO_VSOCK_SHUTDOWN_F_SEND != 0 {
                    warn_limited!(
                        "virtio-vsock: connection {}: the guest sent data after its SEND shutdown",
                        self.local_port
                    );
                    self.reset_due = true;
                } else if held + payload.len() > BUF_ALLOC as usize {
                    warn_limited!(
                        "virtio-vsock: connection {}: the guest sent past its credit ({} bytes held, {} more)",
                        self.local_port,
                        held,
                        payload.len()
                    );
                    self.reset_due = true;
                } else {
                    self.to_host.extend_from_slice(payload);
                }
            }
            (VIRTIO_VSOCK_OP_SHUTDOWN, State::Established) => {
                self.guest_shutdown |= header.flags & VIRTIO_VSOCK_SHUTDOWN_F_BOTH;
                if !self.guest_receives() {
                    self.staged.clear();
                }
            }
            (VIRTIO_VSOCK_OP_CREDIT_UPDATE, _) => {}
            (VIRTIO_VSOCK_OP_CREDIT_REQUEST, _) => self.credit_update_due = true,
            (op, state) => {
                warn_limited!(
                    "virtio-vsock: connection {}: unexpected {} from the guest in state {state:?}",
                    self.local_port,
                    super::packet::op_name(op)
                );
                self.reset_due = true;
            }
        }
    }

    /// What the connection sends the guest next, if anything: the op.
    /// REQUESTs wait while `requests_allowed` is false.
    pub fn next_op(&self, requests_allowed: bool) -> Option<u16> {
        match self.state {
            State::RequestDue if requests_allowed => return Some(VIRTIO_VSOCK_OP_REQUEST),
            State::Established => {}
            _ => return None,
        }
        if !self.staged.is_empty() && self.peer_credit() > 0 {
            return Some(VIRTIO_VSOCK_OP_RW);
        }
        // Host bytes wait (staged, or in a socket not yet read dry) and
        // the guest has no room: ask it how much it has (§5.10.6.3).
        let host_has_more = !self.staged.is_empty() || (self.readable && !self.host_eof);
        if host_has_more
            && self.guest_receives()
            && self.peer_credit() == 0
            && !self.credit_requested
        {
            return Some(VIRTIO_VSOCK_OP_CREDIT_REQUEST);
        }
        if self.credit_update_due {
            return Some(VIRTIO_VSOCK_OP_CREDIT_UPDATE);
        }
        if self.host_eof && self.staged.is_empty() && self.shutdown_sent == 0 {
            return Some(VIRTIO_VSOCK_OP_SHUTDOWN);
        }
        None
    }

    /// The packet for `op` (from [`next_op`](Self::next_op)) to the guest
    /// at `guest_cid`, with at most `room` payload bytes.
    pub fn take_packet(&mut self, op: u16, guest_cid: u64, room: usize) -> (Header, Vec<u8>) {
        let mut payload = Vec::new();
        let mut flags = 0;
        match op {
            VIRTIO_VSOCK_OP_REQUEST => self.state = State::RequestSent,
            VIRTIO_VSOCK_OP_RW => {
                let credit = usize::try_from(self.peer_credit()).unwrap_or(usize::MAX);
                let len = self.staged.len().min(credit).min(room);
                payload = self.staged.drain(..len).collect();
                self.tx_cnt = self.tx_cnt.wrapping_add(len as u32);
            }
            VIRTIO_VSOCK_OP_CREDIT_REQUEST => self.credit_requested = true,
            VIRTIO_VSOCK_OP_SHUTDOWN => {
                // The host sends no more; if its socket is gone it takes
                // nothing more either.
                flags = VIRTIO_VSOCK_SHUTDOWN_F_SEND;
                if self.host_hup {
                    flags |= VIRTIO_VSOCK_SHUTDOWN_F_RECEIVE;
                }
                self.shutdown_sent = flags;
            }
            _ => {}
        }
        // Every packet tells the guest our credit.
        self.credit_update_due = false;
        self.fwd_cnt_sent = self.fwd_cnt;
        let header = Header {
            src_cid: VSOCK_HOST_CID,
            dst_cid: guest_cid,
            src_port: self.local_port,
            dst_port: self.peer_port,
            len: payload.len() as u32,
            kind: VIRTIO_VSOCK_TYPE_STREAM,
            op,
            flags,
            buf_alloc: BUF_ALLOC,
            fwd_cnt: self.fwd_cnt,
        };
        (header, payload)
    }

    /// The guest's RST: refused (to a REQUEST) or aborted.
    pub fn reset_by_guest(&mut self) {
        self.guest_reset = true;
    }

    /// Whether the connection goes on, after whatever just happened.
    pub fn verdict(&self) -> Verdict {
        if self.guest_reset {
            return Verdict::Drop;
        }
        if self.reset_due {
            return Verdict::Reset;
        }
        let host_gone = self.host_eof || self.host_hup;
        match self.state {
            State::AwaitingConnect(_) | State::RequestDue if host_gone => Verdict::Drop,
            // The guest may accept a connection nobody waits for any more.
            State::RequestSent if host_gone => Verdict::Reset,
            State::Established => {
                let guest_closed = self.guest_shutdown == VIRTIO_VSOCK_SHUTDOWN_F_BOTH;
                if self.shutdown_sent == VIRTIO_VSOCK_SHUTDOWN_F_BOTH {
                    // The guest knows; it answers with an RST, to no one.
                    Verdict::Drop
                } else if guest_closed && (self.to_host.is_empty() || self.host_hup) {
                    // All the guest sent reached the host: the RST
                    // completes the guest's close, and closing the socket
                    // gives the host its end-of-file.
                    Verdict::Reset
                } else if self.host_hup && !self.to_host.is_empty() {
                    Verdict::Reset
                } else {
                    Verdict::Keep
                }
            }
            _ => Verdict::Keep,
        }
    }
}

/// The port of a `CONNECT <port>` line (a trailing `\r` allowed).
fn parse_connect(line: &[u8]) -> Option<u32> {
    let line = std::str::from_utf8(line).ok()?.trim_end_matches('\r');
    let port = line.strip_prefix("CONNECT ")?;
    port.trim().parse().ok()
}

/// A non-blocking read from the host socket (recv(2): `recvfrom`).
fn recv(stream: &UnixStream, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: `buf` is valid for writes of `buf.len()` bytes and the
    // socket is open for the life of `stream`.
    let n = unsafe {
        libc::recv(
            stream.as_raw_fd(),
            buf.as_mut_ptr().cast(),
            buf.len(),
            libc::MSG_DONTWAIT,
        )
    };
    usize::try_from(n).map_err(|_| io::Error::last_os_error())
}

/// A non-blocking write to the host socket (send(2): `sendto`), without
/// SIGPIPE when the host has gone.
fn send(stream: &UnixStream, buf: &[u8]) -> io::Result<usize> {
    // SAFETY: `buf` is valid for reads of `buf.len()` bytes and the
    // socket is open for the life of `stream`.
    let n = unsafe {
        libc::send(
            stream.as_raw_fd(),
            buf.as_ptr().cast(),
            buf.len(),
            libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
        )
    };
    usize::try_from(n).map_err(|_| io::Error::last_os_error())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_guest_sending_past_the_devices_buffer_is_reset() {
        let (stream, _host) = UnixStream::pair().unwrap();
        let mut connection = Connection::new(stream, 1 << 30);
        connection.state = State::Established;
        connection.peer_port = 5000;
        // The host socket takes nothing: every byte stays in the device.
        connection.writable = false;
        let rw = |len: u32| Header {
            op: VIRTIO_VSOCK_OP_RW,
            len,
            ..Header::default()
        };
        let half = vec![0u8; BUF_ALLOC as usize / 2];
        connection.on_guest_packet(&rw(half.len() as u32), &half);
        connection.on_guest_packet(&rw(half.len() as u32), &half);
        connection.host_io();
        assert_eq!(connection.verdict(), Verdict::Keep);
        assert_eq!(connection.to_host.len(), BUF_ALLOC as usize);
        connection.on_guest_packet(&rw(1), &[1]);
        assert_eq!(connection.verdict(), Verdict::Reset);
    }

    #[test]
    fn connect_lines_parse_strictly() {
        assert_eq!(parse_connect(b"CONNECT 5000"), Some(5000));
        assert_eq!(parse_connect(b"CONNECT 5000\r"), Some(5000));
        assert_eq!(parse_connect(b"CONNECT"), None);
        assert_eq!(parse_connect(b"connect 5000"), None);
        assert_eq!(parse_connect(b"CONNECT 99999999999"), None);
        assert_eq!(parse_connect(b"CONNECT x"), None);
    }
}
