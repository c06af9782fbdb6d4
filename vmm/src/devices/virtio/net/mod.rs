//! virtio-net (virtio 1.2 §5.1, "Network Device") over a tap device.
//!
//! Two queues (§5.1.2): receiveq (frames for the guest) and transmitq
//! (frames from it); no control queue, no multiqueue. Every frame on
//! either queue starts with a 12-byte `virtio_net_hdr_v1` (§5.1.6), and
//! the tap is opened with a header of the same size, so the header goes
//! between guest and host stack as it is: the guest's checksum and TSO
//! offloads (CSUM, HOST_TSO4/6) reach the host's stack unsplit, and the
//! host hands the guest unsplit, uncheckummed frames exactly when the
//! driver took GUEST_CSUM and GUEST_TSO4/6 (`TUNSETOFFLOAD`, set from the
//! acked features).
//!
//! Receive uses mergeable buffers (VIRTIO_NET_F_MRG_RXBUF, §5.1.6.3.2):
//! Linux then posts page-sized buffers instead of 64 KiB ones per slot
//! (what big frames without MRG_RXBUF need), and a frame spans as many
//! as it needs, their count in the header's `num_buffers`. A frame that
//! finds too few buffers waits, and the tap is not read until the driver
//! adds more: the tap's own queue then holds (and eventually drops)
//! frames, as a NIC's ring does.
//!
//! The configuration space is the MAC (VIRTIO_NET_F_MAC, §5.1.4); without
//! VIRTIO_NET_F_STATUS the link is always up. The fast path has no rate
//! limiter: each event moves every frame there is room for.
//!
//! The parts, laid out as Firecracker lays out its devices: `request`
//! reads a transmit chain from guest memory into a frame (no I/O, no
//! device state); `device` is the device (features, configuration space,
//! activation) and the moving of frames between the queues and the
//! [`tap`]; `event_handler` wires the queues and the tap to the event
//! loop; `persist` is what a snapshot keeps of it (its MAC; the rest is
//! its transport's).
pub mod bridge;
mod device;
mod event_handler;
mod persist;
mod request;
pub mod tap;

pub use device::{Net, NetConfig, QUEUE_SIZE};
pub use persist::NetDeviceState;
pub use request::NET_HDR_LEN;

/// Fuzz entry point (`fuzz/`, and the corpus replay CI runs): reads the
/// transmit chain `data` describes (see `devices::virtio::fuzzing`) into
/// a frame, as the device does before it writes the frame to its tap.
#[cfg(any(test, feature = "fuzzing"))]
pub fn fuzz_tx_frame(data: &[u8]) {
    super::fuzzing::with_chain(data, |mem, chain| {
        let mut frame = Vec::new();
        if request::read_tx_frame(mem, chain, &mut frame) {
            assert!(frame.len() >= NET_HDR_LEN && frame.len() <= request::MAX_FRAME_LEN);
        }
    });
}
