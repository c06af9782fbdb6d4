//! The device against virtio-queue's mock rings (the guest) and real unix
//! sockets (the host), driven through an event loop as the VMM drives it.
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use event_manager::{EventManager, SubscriberOps};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::RawDescriptor;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use super::super::{GuestMemoryMmap, Interrupt, VirtioDevice};
use super::connection::BUF_ALLOC;
use super::device::{EVENT, RX, TX};
use super::packet::*;
use super::*;
use crate::devices::lock;
use crate::devices::persist::Persist;
use crate::devices::virtio::test_chain::memory;

const CID: u64 = 42;
/// virtio-queue's mock lays the used ring over the avail ring's second
/// half: each test makes fewer than half of this many buffers available
/// per ring.
const MOCK_QUEUE_SIZE: u16 = 64;
const QUEUE_ADDRS: [u64; 3] = [0x0, 0x1000, 0x2000];
/// Receive buffers: one descriptor each, as Linux ≥ 6.2 posts them.
const RX_BUFFERS: u64 = 0x1_0000;
const RX_BUFFER_SPACING: u64 = 0x1100;
const RX_BUFFER_SIZE: u32 = (HEADER_SIZE + 4096) as u32;
const TX_BUFFERS: u64 = 0x6_0000;
const TX_BUFFER_SPACING: u64 = 0x1000;
const EVENT_BUFFER: u64 = 0xf_0000;
const GUEST_PORT: u32 = 5000;
/// What the guest's driver advertises for each connection.
const GUEST_BUF_ALLOC: u32 = 256 * 1024;

/// The guest's side: its three rings and what it has read off them.
struct Guest<'a> {
    mem: &'a GuestMemoryMmap,
    queues: Vec<MockSplitQueue<'a, GuestMemoryMmap>>,
    /// Descriptors used so far in each ring's table.
    next_desc: [u16; 3],
    /// Used entries read so far from each ring.
    seen: [u16; 3],
    device: Arc<Mutex<Vsock>>,
    event_loop: EventManager<Arc<Mutex<Vsock>>>,
    interrupt: Arc<Interrupt>,
    _dir: tempfile::TempDir,
    socket: PathBuf,
}

fn device(dir: &Path) -> Vsock {
    Vsock::new(&VsockConfig {
        cid: CID,
        socket: dir.join("v.sock"),
    })
    .unwrap()
}

/// A running device, with `rx` receive buffers posted.
fn guest(mem: &GuestMemoryMmap, rx: u16) -> Guest<'_> {
    guest_with(mem, rx, |_| {})
}

fn guest_with(mem: &GuestMemoryMmap, rx: u16, before: impl FnOnce(&mut Vsock)) -> Guest<'_> {
    let dir = tempfile::tempdir().unwrap();
    let mut vsock = device(dir.path());
    before(&mut vsock);
    let socket = vsock.socket().to_path_buf();
    let queues: Vec<_> = QUEUE_ADDRS
        .iter()
        .map(|&addr| MockSplitQueue::create(mem, GuestAddress(addr), MOCK_QUEUE_SIZE))
        .collect();
    let interrupt = Arc::new(Interrupt::new(EventFd::new(EFD_NONBLOCK).unwrap()));
    vsock
        .activate(
            1 << VIRTIO_F_VERSION_1,
            mem.clone(),
            queues.iter().map(|q| q.create_queue().unwrap()).collect(),
            interrupt.clone(),
        )
        .unwrap();
    let device = Arc::new(Mutex::new(vsock));
    let mut event_loop = EventManager::<Arc<Mutex<Vsock>>>::new().unwrap();
    event_loop.add_subscriber(device.clone());
    let mut guest = Guest {
        mem,
        queues,
        next_desc: [0; 3],
        seen: [0; 3],
        device,
        event_loop,
        interrupt,
        _dir: dir,
        socket,
    };
    guest.give_rx(rx);
    guest.pump();
    guest
}

impl Guest<'_> {
    /// Posts `count` receive buffers and notifies the queue.
    fn give_rx(&mut self, count: u16) {
        for _ in 0..count {
            let index = self.next_desc[RX];
            let addr = RX_BUFFERS + u64::from(index) * RX_BUFFER_SPACING;
            let desc = Descriptor::new(addr, RX_BUFFER_SIZE, VRING_DESC_F_WRITE as u16, 0);
            self.queues[RX]
                .add_desc_chains(&[RawDescriptor::from(desc)], index)
                .unwrap();
            self.next_desc[RX] += 1;
        }
        lock(&self.device).queue_evts[RX].write(1).unwrap();
    }

    /// Sends one packet, header and payload in separate descriptors as
    /// Linux's driver does, and notifies the tx queue.
    fn send_raw(&mut self, bytes: &[u8], split_at: Option<usize>) {
        let index = self.next_desc[TX];
        let addr = TX_BUFFERS + u64::from(index) * TX_BUFFER_SPACING;
        self.mem.write_slice(bytes, GuestAddress(addr)).unwrap();
        let descs: Vec<RawDescriptor> = match split_at {
            Some(at) if at < bytes.len() => vec![
                Descriptor::new(addr, at as u32, VRING_DESC_F_NEXT as u16, index + 1).into(),
                Descriptor::new(addr + at as u64, (bytes.len() - at) as u32, 0, 0).into(),
            ],
            _ => vec![Descriptor::new(addr, bytes.len() as u32, 0, 0).into()],
        };
        self.next_desc[TX] += descs.len() as u16;
        self.queues[TX].add_desc_chains(&descs, index).unwrap();
        lock(&self.device).queue_evts[TX].write(1).unwrap();
        self.pump();
    }

    fn send(&mut self, header: Header, payload: &[u8]) {
        let mut bytes = header.to_bytes().to_vec();
        bytes.extend_from_slice(payload);
        self.send_raw(&bytes, Some(HEADER_SIZE));
    }

    /// A packet of `op` from the guest's port to the host's `host_port`.
    fn packet(op: u16, host_port: u32, len: u32, fwd_cnt: u32) -> Header {
        Header {
            src_cid: CID,
            dst_cid: VSOCK_HOST_CID,
            src_port: GUEST_PORT,
            dst_port: host_port,
            len,
            kind: VIRTIO_VSOCK_TYPE_STREAM,
            op,
            flags: 0,
            buf_alloc: GUEST_BUF_ALLOC,
            fwd_cnt,
        }
    }

    /// Runs the event loop until nothing more happens.
    fn pump(&mut self) {
        while self.event_loop.run_with_timeout(30).unwrap() > 0 {}
    }

    /// The packets the device has put in the rx ring since last asked.
    fn received(&mut self) -> Vec<(Header, Vec<u8>)> {
        let used = self.queues[RX].used();
        let idx = used.idx().load();
        let mut packets = Vec::new();
        while self.seen[RX] != idx {
            let entry = used
                .ring()
                .ref_at(usize::from(self.seen[RX] % MOCK_QUEUE_SIZE))
                .unwrap()
                .load();
            self.seen[RX] += 1;
            let addr = RX_BUFFERS + u64::from(entry.id()) * RX_BUFFER_SPACING;
            let mut raw = vec![0u8; entry.len() as usize];
            self.mem.read_slice(&mut raw, GuestAddress(addr)).unwrap();
            let header = Header::parse(raw[..HEADER_SIZE].try_into().unwrap());
            assert_eq!(header.len as usize, raw.len() - HEADER_SIZE, "{header:?}");
            packets.push((header, raw[HEADER_SIZE..].to_vec()));
        }
        packets
    }

    /// The one packet the device sent since last asked.
    fn received_one(&mut self) -> (Header, Vec<u8>) {
        let mut packets = self.received();
        assert_eq!(packets.len(), 1, "{packets:?}");
        packets.remove(0)
    }

    /// How many tx buffers the device has returned.
    fn tx_used(&self) -> u16 {
        self.queues[TX].used().idx().load()
    }

    /// A host connection to the guest port, through `CONNECT`; returns
    /// the stream (before the guest answers) and the REQUEST's host port.
    fn host_connect(&mut self) -> (UnixStream, u32) {
        let mut host = UnixStream::connect(&self.socket).unwrap();
        host.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        host.write_all(format!("CONNECT {GUEST_PORT}\n").as_bytes())
            .unwrap();
        self.pump();
        let (request, payload) = self.received_one();
        assert_eq!(request.op, VIRTIO_VSOCK_OP_REQUEST);
        assert_eq!(
            (request.src_cid, request.dst_cid, request.dst_port),
            (VSOCK_HOST_CID, CID, GUEST_PORT)
        );
        assert_eq!(request.kind, VIRTIO_VSOCK_TYPE_STREAM);
        assert_eq!(request.buf_alloc, BUF_ALLOC);
        assert!(request.src_port >= 1 << 30, "{request:?}");
        assert!(payload.is_empty());
        (host, request.src_port)
    }

    /// A connection the guest accepted with `buf_alloc` of credit; the
    /// host has read the `OK` line.
    fn established(&mut self, buf_alloc: u32) -> (UnixStream, u32) {
        let (mut host, port) = self.host_connect();
        let mut response = Self::packet(VIRTIO_VSOCK_OP_RESPONSE, port, 0, 0);
        response.buf_alloc = buf_alloc;
        self.send(response, &[]);
        assert_eq!(read_line(&mut host), format!("OK {port}\n"));
        (host, port)
    }
}

fn read_line(host: &mut UnixStream) -> String {
    let mut line = Vec::new();
    let mut byte = [0u8];
    while line.last() != Some(&b'\n') {
        assert_eq!(host.read(&mut byte).unwrap(), 1, "EOF after {line:?}");
        line.push(byte[0]);
    }
    String::from_utf8(line).unwrap()
}

fn read_exactly(host: &mut UnixStream, len: usize) -> Vec<u8> {
    let mut data = vec![0u8; len];
    host.read_exact(&mut data).unwrap();
    data
}

#[test]
fn the_guests_response_to_a_host_connect_is_ok_and_its_port() {
    let mem = memory();
    let mut guest = guest(&mem, 4);
    let (mut host, port) = guest.host_connect();
    guest.send(Guest::packet(VIRTIO_VSOCK_OP_RESPONSE, port, 0, 0), &[]);
    assert_eq!(read_line(&mut host), format!("OK {port}\n"));
    assert_eq!(guest.tx_used(), 1);
    // The driver was interrupted for its used buffers.
    assert!(guest.interrupt.event().read().unwrap() > 0);
    // A second connection gets another host port.
    let (_second, other) = guest.host_connect();
    assert_ne!(other, port);
}

#[test]
fn bytes_flow_both_ways_in_rw_packets() {
    let mem = memory();
    let mut guest = guest(&mem, 8);
    let (mut host, port) = guest.established(GUEST_BUF_ALLOC);
    host.write_all(b"{\"ping\":true}\n").unwrap();
    guest.pump();
    let (rw, payload) = guest.received_one();
    assert_eq!(rw.op, VIRTIO_VSOCK_OP_RW);
    assert_eq!((rw.src_port, rw.dst_port), (port, GUEST_PORT));
    assert_eq!(payload, b"{\"ping\":true}\n");

    guest.send(
        Guest::packet(VIRTIO_VSOCK_OP_RW, port, 14, 0),
        b"{\"pong\":true}\n",
    );
    assert_eq!(read_line(&mut host), "{\"pong\":true}\n");
    // The next packet to the guest says the host consumed those bytes.
    host.write_all(b"x").unwrap();
    guest.pump();
    let (rw, payload) = guest.received_one();
    assert_eq!((rw.fwd_cnt, payload.as_slice()), (14, &b"x"[..]));

    // Bytes written right behind the CONNECT line reach the guest too.
    let mut early = UnixStream::connect(&guest.socket).unwrap();
    early
        .write_all(format!("CONNECT {GUEST_PORT}\nearly").as_bytes())
        .unwrap();
    guest.pump();
    let (request, _) = guest.received_one();
    guest.send(
        Guest::packet(VIRTIO_VSOCK_OP_RESPONSE, request.src_port, 0, 0),
        &[],
    );
    let (rw, payload) = guest.received_one();
    assert_eq!(
        (rw.op, payload.as_slice()),
        (VIRTIO_VSOCK_OP_RW, &b"early"[..])
    );
}

#[test]
fn the_host_gets_no_more_than_the_guests_credit_until_it_grows() {
    let mem = memory();
    let mut guest = guest(&mem, 12);
    let (mut host, port) = guest.established(10);
    host.write_all(&[7u8; 100]).unwrap();
    guest.pump();
    let packets = guest.received();
    let data: usize = packets
        .iter()
        .filter(|(h, _)| h.op == VIRTIO_VSOCK_OP_RW)
        .map(|(_, p)| p.len())
        .sum();
    assert_eq!(data, 10, "{packets:?}");
    // Out of credit with data waiting, the device asks for the guest's.
    assert_eq!(packets.last().unwrap().0.op, VIRTIO_VSOCK_OP_CREDIT_REQUEST);

    // An answer that still leaves no room is not asked about again.
    let mut stalled = Guest::packet(VIRTIO_VSOCK_OP_CREDIT_UPDATE, port, 0, 0);
    stalled.buf_alloc = 10;
    guest.send(stalled, &[]);
    assert!(guest.received().is_empty());

    // The guest consumed the 10 bytes and has room for 30 more.
    let mut update = Guest::packet(VIRTIO_VSOCK_OP_CREDIT_UPDATE, port, 0, 10);
    update.buf_alloc = 30;
    guest.send(update, &[]);
    let packets = guest.received();
    let data: usize = packets.iter().map(|(_, p)| p.len()).sum();
    assert_eq!(data, 30, "{packets:?}");

    // The rest comes once the guest has room for all of it.
    let mut update = Guest::packet(VIRTIO_VSOCK_OP_CREDIT_UPDATE, port, 0, 40);
    update.buf_alloc = GUEST_BUF_ALLOC;
    guest.send(update, &[]);
    let data: usize = guest.received().iter().map(|(_, p)| p.len()).sum();
    assert_eq!(data, 60);
}

#[test]
fn the_host_closing_is_a_shutdown_to_the_guest() {
    let mem = memory();
    let mut guest = guest(&mem, 8);
    // A half close: the host sends no more, but still reads.
    let (host, port) = guest.established(GUEST_BUF_ALLOC);
    host.shutdown(std::net::Shutdown::Write).unwrap();
    guest.pump();
    let (shutdown, _) = guest.received_one();
    assert_eq!(shutdown.op, VIRTIO_VSOCK_OP_SHUTDOWN);
    assert_eq!(shutdown.flags, VIRTIO_VSOCK_SHUTDOWN_F_SEND);
    guest.send(Guest::packet(VIRTIO_VSOCK_OP_RW, port, 3, 0), b"out");
    let mut host = host;
    assert_eq!(read_exactly(&mut host, 3), b"out");

    // A full close: data already written still reaches the guest, then
    // a SHUTDOWN of both directions.
    let (mut host, port) = guest.established(GUEST_BUF_ALLOC);
    host.write_all(b"last words").unwrap();
    drop(host);
    guest.pump();
    let packets = guest.received();
    assert_eq!(packets.len(), 2, "{packets:?}");
    assert_eq!(packets[0].1, b"last words");
    assert_eq!(packets[1].0.op, VIRTIO_VSOCK_OP_SHUTDOWN);
    assert_eq!(packets[1].0.flags, VIRTIO_VSOCK_SHUTDOWN_F_BOTH);
    assert_eq!(packets[1].0.src_port, port);
    // The guest's RST in answer is not answered.
    guest.send(Guest::packet(VIRTIO_VSOCK_OP_RST, port, 0, 0), &[]);
    assert!(guest.received().is_empty());
    assert!(!lock(&guest.device).connections.contains_key(&port));
}

#[test]
fn the_guests_rst_closes_the_host_socket() {
    let mem = memory();
    let mut guest = guest(&mem, 4);
    let (mut host, port) = guest.established(GUEST_BUF_ALLOC);
    guest.send(Guest::packet(VIRTIO_VSOCK_OP_RST, port, 0, 0), &[]);
    let mut byte = [0u8];
    assert_eq!(host.read(&mut byte).unwrap(), 0);
    assert!(guest.received().is_empty());

    // An RST instead of a RESPONSE (nothing listens there): the host's
    // connection closes without an OK.
    let (mut host, port) = guest.host_connect();
    guest.send(Guest::packet(VIRTIO_VSOCK_OP_RST, port, 0, 0), &[]);
    let mut answer = Vec::new();
    host.read_to_end(&mut answer).unwrap();
    assert!(answer.is_empty(), "{answer:?}");
}

#[test]
fn the_guest_closing_reaches_the_host_after_its_data() {
    let mem = memory();
    let mut guest = guest(&mem, 4);
    let (mut host, port) = guest.established(GUEST_BUF_ALLOC);
    guest.send(Guest::packet(VIRTIO_VSOCK_OP_RW, port, 8, 0), b"outcome\n");
    let mut shutdown = Guest::packet(VIRTIO_VSOCK_OP_SHUTDOWN, port, 0, 0);
    shutdown.flags = VIRTIO_VSOCK_SHUTDOWN_F_BOTH;
    guest.send(shutdown, &[]);
    let mut rest = String::new();
    host.read_to_string(&mut rest).unwrap();
    assert_eq!(rest, "outcome\n");
    let (rst, _) = guest.received_one();
    assert_eq!(
        (rst.op, rst.src_port, rst.dst_port),
        (VIRTIO_VSOCK_OP_RST, port, GUEST_PORT)
    );
}

#[test]
fn malformed_packets_are_dropped_unanswered() {
    let mem = memory();
    let mut guest = guest(&mem, 4);
    let (mut host, port) = guest.established(GUEST_BUF_ALLOC);
    // Shorter than a header.
    guest.send_raw(&[0u8; 20], None);
    // A length beyond the buffer.
    guest.send(Guest::packet(VIRTIO_VSOCK_OP_RW, port, 100, 0), b"short");
    // An unknown op.
    guest.send(Guest::packet(99, port, 0, 0), &[]);
    // A payload longer than any packet may carry.
    guest.send(
        Guest::packet(VIRTIO_VSOCK_OP_RW, port, MAX_PAYLOAD + 1, 0),
        &[],
    );
    assert_eq!(guest.tx_used(), 5, "every buffer goes back to the driver");
    assert!(guest.received().is_empty());
    // The connection is untouched.
    guest.send(Guest::packet(VIRTIO_VSOCK_OP_RW, port, 2, 0), b"ok");
    assert_eq!(read_exactly(&mut host, 2), b"ok");
}

#[test]
fn a_guest_request_is_refused_with_an_rst() {
    let mem = memory();
    let mut guest = guest(&mem, 4);
    let mut request = Guest::packet(VIRTIO_VSOCK_OP_REQUEST, 1234, 0, 0);
    request.src_port = 40_000;
    guest.send(request, &[]);
    let (rst, payload) = guest.received_one();
    assert_eq!(rst.op, VIRTIO_VSOCK_OP_RST);
    assert_eq!(
        (rst.src_cid, rst.src_port, rst.dst_cid, rst.dst_port),
        (VSOCK_HOST_CID, 1234, CID, 40_000)
    );
    assert!(payload.is_empty());
    // So is a packet for a connection that does not exist.
    guest.send(Guest::packet(VIRTIO_VSOCK_OP_RW, 77, 1, 0), b"?");
    assert_eq!(guest.received_one().0.op, VIRTIO_VSOCK_OP_RST);
}

#[test]
fn host_connections_wait_for_the_drivers_buffers() {
    let mem = memory();
    let mut guest = guest(&mem, 0);
    let mut host = UnixStream::connect(&guest.socket).unwrap();
    host.write_all(b"CONNECT 5000\n").unwrap();
    guest.pump();
    assert!(guest.received().is_empty());
    guest.give_rx(1);
    guest.pump();
    assert_eq!(guest.received_one().0.op, VIRTIO_VSOCK_OP_REQUEST);
    // A line that is not a CONNECT closes the host's connection.
    let mut bad = UnixStream::connect(&guest.socket).unwrap();
    bad.write_all(b"HELLO\n").unwrap();
    guest.pump();
    let mut answer = Vec::new();
    bad.read_to_end(&mut answer).unwrap();
    assert!(answer.is_empty());
}

#[test]
fn a_restored_device_sends_requests_once_the_transport_reset_is_handled() {
    let mem = memory();
    let mut guest = guest_with(&mem, 4, Vsock::schedule_transport_reset);
    let mut host = UnixStream::connect(&guest.socket).unwrap();
    host.write_all(b"CONNECT 5000\n").unwrap();
    guest.pump();
    assert!(guest.received().is_empty(), "no REQUEST before the event");
    mem.write_obj(0xffff_ffffu32, GuestAddress(EVENT_BUFFER))
        .unwrap();
    let desc = Descriptor::new(EVENT_BUFFER, 4, VRING_DESC_F_WRITE as u16, 0);
    guest.queues[EVENT]
        .add_desc_chains(&[RawDescriptor::from(desc)], 0)
        .unwrap();
    lock(&guest.device).queue_evts[EVENT].write(1).unwrap();
    guest.pump();
    let used = guest.queues[EVENT].used();
    assert_eq!(used.idx().load(), 1);
    assert_eq!(used.ring().ref_at(0).unwrap().load().len(), 4);
    assert_eq!(
        mem.read_obj::<u32>(GuestAddress(EVENT_BUFFER)).unwrap(),
        VIRTIO_VSOCK_EVENT_TRANSPORT_RESET
    );
    // Delivered is not handled: the guest would answer with its old CID,
    // and its handling would reset the new connection.
    guest.pump();
    assert!(
        guest.received().is_empty(),
        "no REQUEST before it is handled"
    );
    // The guest handles the event, gives the buffer back and notifies.
    guest.queues[EVENT]
        .add_desc_chains(&[RawDescriptor::from(desc)], 1)
        .unwrap();
    lock(&guest.device).queue_evts[EVENT].write(1).unwrap();
    guest.pump();
    assert_eq!(guest.received_one().0.op, VIRTIO_VSOCK_OP_REQUEST);
}

#[test]
fn config_space_is_the_cid_and_the_device_is_a_socket_device() {
    let dir = tempfile::tempdir().unwrap();
    let vsock = device(dir.path());
    let mut cid = [0xffu8; 8];
    vsock.read_config(0, &mut cid);
    assert_eq!(u64::from_le_bytes(cid), CID);
    let mut high = [0xffu8; 8];
    vsock.read_config(4, &mut high);
    assert_eq!(high, [0; 8]);
    assert_eq!(vsock.device_type(), 19);
    assert_eq!(vsock.features(), 1 << VIRTIO_F_VERSION_1);
    assert_eq!(vsock.queue_max_sizes().len(), 3);
}

#[test]
fn a_snapshotted_transport_restores_onto_a_new_cid() {
    use crate::devices::bus::BusDevice;
    use crate::devices::virtio::mmio::MmioTransport;
    use virtio_bindings::virtio_mmio::VIRTIO_MMIO_CONFIG;

    let mem = memory();
    let guest = guest(&mem, 1);
    let dir = tempfile::tempdir().unwrap();
    let old = MmioTransport::new(mem.clone(), guest.device.clone()).unwrap();
    let saved = old.save();
    let restored = Vsock::new(&VsockConfig {
        cid: 7,
        socket: dir.path().join("new.sock"),
    })
    .unwrap();
    let mut transport =
        MmioTransport::restore((mem.clone(), Arc::new(Mutex::new(restored))), &saved).unwrap();
    let mut cid = [0u8; 8];
    transport.read(VIRTIO_MMIO_CONFIG.into(), &mut cid);
    assert_eq!(u64::from_le_bytes(cid), 7);
}

#[test]
fn a_stale_socket_is_replaced_and_a_live_one_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("v.sock");
    drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
    let config = VsockConfig {
        cid: CID,
        socket: path.clone(),
    };
    let live = Vsock::new(&config).unwrap();
    assert!(matches!(Vsock::new(&config), Err(VsockError::InUse(_))));
    drop(live);
    std::fs::write(dir.path().join("file"), b"").unwrap();
    let file = VsockConfig {
        cid: CID,
        socket: dir.path().join("file"),
    };
    assert!(matches!(Vsock::new(&file), Err(VsockError::NotASocket(_))));
    let host_cid = VsockConfig { cid: 2, ..config };
    assert!(matches!(Vsock::new(&host_cid), Err(VsockError::Cid(2))));
}

#[test]
fn a_driver_reset_closes_every_host_connection() {
    let mem = memory();
    let mut guest = guest(&mem, 4);
    let (mut host, _) = guest.established(GUEST_BUF_ALLOC);
    lock(&guest.device).reset();
    guest.pump();
    let mut rest = Vec::new();
    host.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty());
    assert!(lock(&guest.device).connections.is_empty());
}

#[test]
fn a_host_connection_made_before_the_driver_starts_survives_its_first_reset() {
    let mem = memory();
    let mut guest = guest(&mem, 0);
    lock(&guest.device).reset();
    guest.pump();
    // The host connects, bytes right behind its line, while no driver runs.
    let mut host = UnixStream::connect(&guest.socket).unwrap();
    host.write_all(b"CONNECT 5000\nearly").unwrap();
    guest.pump();
    // The driver resets the device before it sets it up, then starts it.
    lock(&guest.device).reset();
    guest.pump();
    let queues = guest
        .queues
        .iter()
        .map(|q| q.create_queue().unwrap())
        .collect();
    lock(&guest.device)
        .activate(
            1 << VIRTIO_F_VERSION_1,
            mem.clone(),
            queues,
            guest.interrupt.clone(),
        )
        .unwrap();
    guest.give_rx(1);
    guest.pump();
    let (request, _) = guest.received_one();
    assert_eq!(request.op, VIRTIO_VSOCK_OP_REQUEST);
}
