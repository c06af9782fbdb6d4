//! virtio-blk (virtio 1.2 §5.2) backed by a raw disk image or a volume
//! (a compressed Kiln image with a copy-on-write overlay).
//!
//! One request queue. Each request is a descriptor chain: a device-readable
//! header (type, sector), data buffers, and a device-writable status byte
//! (§5.2.6). A raw image is read and written with pread/pwrite straight
//! into and out of guest memory; a volume decompresses the chunks a read
//! touches, moving the data through a small reused buffer, so a
//! descriptor's claimed length (up to 4 GiB) costs the host no memory. A
//! request's sectors and every buffer's guest range are checked before the
//! disk is touched. FLUSH completes only once the data is durable, and DISCARD
//! (offered by writable volumes) frees overlay blocks. A failed transfer,
//! such as a read of a damaged image chunk, is logged and answered with an
//! I/O error, never with wrong data.
//!
//! The parts, laid out as Firecracker lays out its devices: `request`
//! parses a chain from guest memory into a typed request (no I/O, no
//! device state); `device` is the device (features, configuration space,
//! activation) and the I/O of each request, on a `backend`;
//! `event_handler` wires the queue to the event loop; `persist` is what a
//! snapshot needs of the device.
mod backend;
mod device;
mod event_handler;
mod persist;
mod request;

pub use backend::TransferError;
pub use device::{AttachError, Block, BlockError, DiskSource, QUEUE_SIZE, SECTOR_SIZE};

/// Fuzz entry point (`fuzz/`, and the corpus replay CI runs): parses the
/// chain `data` describes (see `devices::virtio::fuzzing`) as a request,
/// and sizes its data both ways, as the device does on a notification.
#[cfg(any(test, feature = "fuzzing"))]
pub fn fuzz_request(data: &[u8]) {
    super::fuzzing::with_chain(data, |mem, chain| {
        if let Ok(request) = request::Request::parse(mem, chain) {
            let _ = (request.data_len(true), request.data_len(false));
        }
    });
}
