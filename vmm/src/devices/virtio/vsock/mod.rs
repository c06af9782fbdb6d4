//! virtio-vsock (virtio 1.2 §5.10, "Socket Device"), with a host side on
//! a unix socket in the manner of Firecracker's vsock.
//!
//! Three queues (§5.10.2): rx (device → driver packets), tx (driver →
//! device packets) and event (§5.10.6.7). The configuration space is the
//! guest's CID, le64 (§5.10.4). Only stream sockets
//! (VIRTIO_VSOCK_TYPE_STREAM) exist, so no feature beyond
//! VIRTIO_F_VERSION_1 is offered (§5.10.3).
//!
//! The host reaches a guest port through the unix socket `PATH` the
//! device listens on ([`VsockConfig::socket`]):
//!
//! 1. the host connects to `PATH` and writes `CONNECT <port>\n`;
//! 2. the device sends the guest a REQUEST from host CID 2 and a fresh
//!    host port (from 2^30 up) to guest port `<port>`;
//! 3. when the guest answers RESPONSE, the device writes `OK <host
//!    port>\n` on the host's connection; if the guest answers RST (nobody
//!    listens), the connection is closed without a word;
//! 4. then bytes flow both ways as RW packets under the guest's credit
//!    (§5.10.6.3); the host closing its connection is a SHUTDOWN to the
//!    guest, and the guest's SHUTDOWN or RST closes the host connection.
//!
//! A REQUEST stays pending while the guest's driver has not started:
//! connecting before the guest has booted waits for it. There is no
//! connect timeout: the host applies its own.
//!
//! Connections the guest initiates are refused with an RST, whatever the
//! port (Firecracker would forward them to `PATH_<port>`; Kiln needs only
//! host-initiated streams so far).
//!
//! The device is an event-loop subscriber: it watches its queues'
//! eventfds, the listening socket and each host connection, all
//! non-blocking; each connection buffers at most 64 KiB for the host
//! (`BUF_ALLOC`) and 64 KiB for the guest (`STAGE_CAPACITY`),
//! and reads its host socket only while the guest has credit.
//!
//! Snapshots: connections do not survive one. A restored device starts
//! with none on a fresh listening socket and tells the driver through
//! VIRTIO_VSOCK_EVENT_TRANSPORT_RESET, upon which the guest drops its
//! connections and re-reads its CID, which may be a new one. Host
//! connections made meanwhile wait until the guest has handled the event
//! (it notifies the event queue as it gives the buffer back).
//!
//! The parts, laid out as Firecracker lays out its devices: `packet`
//! decodes a packet (a tx chain read from guest memory; no I/O, no device
//! state); `device` is the device (features, configuration space,
//! activation) and the moving of packets between its queues and the
//! `connection`s; `event_handler` wires the queues, the listening socket
//! and each host connection to the event loop; `persist` is a restored
//! device's TRANSPORT_RESET.
mod connection;
mod device;
mod event_handler;
pub mod packet;
mod persist;

pub use device::{MAX_CONNECTIONS, QUEUE_SIZE, Vsock, VsockConfig, VsockError};

/// Fuzz entry point (`fuzz/`, and the corpus replay CI runs): reads one
/// packet off the transmit chain `data` describes (see
/// `devices::virtio::fuzzing`), as the device does before it routes it.
#[cfg(any(test, feature = "fuzzing"))]
pub fn fuzz_tx_packet(data: &[u8]) {
    super::fuzzing::with_chain(data, |mem, chain| {
        if let Ok((header, payload)) = packet::read_packet(mem, chain) {
            assert_eq!(
                payload.len(),
                if header.op == packet::VIRTIO_VSOCK_OP_RW {
                    header.len as usize
                } else {
                    0
                }
            );
        }
    });
}

#[cfg(test)]
mod tests;
