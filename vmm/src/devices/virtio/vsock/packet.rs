//! The packets of virtio-vsock (virtio 1.2 §5.10.6): a fixed
//! little-endian header, `struct virtio_vsock_hdr`, then `len` bytes of
//! payload (RW packets only).
//!
//! virtio-bindings has no vsock definitions but the device ID
//! (`virtio_ids::VIRTIO_ID_VSOCK`, 19, §5.10.1), so the constants are
//! here, each named as in the spec (and in Linux's
//! `uapi/linux/virtio_vsock.h`).
//!
//! `read_packet` reads one packet off a tx chain in guest memory: no I/O
//! and no device state, what a packet does is the device's business.
use std::io::Read;

use super::super::GuestMemoryMmap;

/// The host's CID: the address of the VMM's side of every connection
/// (§5.10.4: CIDs 0, 1 and 2 are reserved; 2 is the host, as
/// `VMADDR_CID_HOST` in Linux's `uapi/linux/vm_sockets.h`).
pub const VSOCK_HOST_CID: u64 = 2;
/// The lowest CID a guest may have (§5.10.4).
pub const VSOCK_MIN_GUEST_CID: u64 = 3;
/// The highest: `guest_cid` is 64 bits on the wire but "only the lower 32
/// bits are used" (§5.10.4), and 0xffffffff is `VMADDR_CID_ANY`.
pub const VSOCK_MAX_GUEST_CID: u64 = u32::MAX as u64 - 1;

/// `type` of a stream socket (§5.10.6.5: "VIRTIO_VSOCK_TYPE_STREAM 1").
pub const VIRTIO_VSOCK_TYPE_STREAM: u16 = 1;

/// `op` values (§5.10.6: "enum { VIRTIO_VSOCK_OP_INVALID = 0, ... }").
pub const VIRTIO_VSOCK_OP_INVALID: u16 = 0;
/// Connect.
pub const VIRTIO_VSOCK_OP_REQUEST: u16 = 1;
/// Accept a REQUEST: the connection is established.
pub const VIRTIO_VSOCK_OP_RESPONSE: u16 = 2;
/// Refuse a REQUEST, or end a connection at once.
pub const VIRTIO_VSOCK_OP_RST: u16 = 3;
/// Stop receiving or sending, as `flags` says (the SHUTDOWN flags below).
pub const VIRTIO_VSOCK_OP_SHUTDOWN: u16 = 4;
/// Send payload.
pub const VIRTIO_VSOCK_OP_RW: u16 = 5;
/// Tell the peer our credit info.
pub const VIRTIO_VSOCK_OP_CREDIT_UPDATE: u16 = 6;
/// Request the peer to send the credit info to us.
pub const VIRTIO_VSOCK_OP_CREDIT_REQUEST: u16 = 7;

/// SHUTDOWN `flags` (§5.10.6.5.2): the sender will receive no more data ...
pub const VIRTIO_VSOCK_SHUTDOWN_F_RECEIVE: u32 = 1;
/// ... and will send no more data.
pub const VIRTIO_VSOCK_SHUTDOWN_F_SEND: u32 = 2;
/// Both: the sender closes the connection.
pub const VIRTIO_VSOCK_SHUTDOWN_F_BOTH: u32 =
    VIRTIO_VSOCK_SHUTDOWN_F_RECEIVE | VIRTIO_VSOCK_SHUTDOWN_F_SEND;

/// The event queue's one event (§5.10.6.7: "VIRTIO_VSOCK_EVENT_TRANSPORT_RESET 0"):
/// the driver drops every connection and re-reads `guest_cid`.
pub const VIRTIO_VSOCK_EVENT_TRANSPORT_RESET: u32 = 0;
/// `struct virtio_vsock_event { le32 id; }` (§5.10.6.7).
pub const VIRTIO_VSOCK_EVENT_SIZE: usize = 4;

/// `struct virtio_vsock_hdr` (§5.10.6), packed:
/// le64 src_cid, le64 dst_cid, le32 src_port, le32 dst_port, le32 len,
/// le16 type, le16 op, le32 flags, le32 buf_alloc, le32 fwd_cnt.
pub const HEADER_SIZE: usize = 44;
const SRC_CID: usize = 0;
const DST_CID: usize = 8;
const SRC_PORT: usize = 16;
const DST_PORT: usize = 20;
const LEN: usize = 24;
const TYPE: usize = 28;
const OP: usize = 30;
const FLAGS: usize = 32;
const BUF_ALLOC: usize = 36;
const FWD_CNT: usize = 40;

/// The largest payload the device accepts in one packet: Linux's driver
/// never sends more (`VIRTIO_VSOCK_MAX_PKT_BUF_SIZE`, 64 KiB).
pub const MAX_PAYLOAD: u32 = 64 * 1024;

/// A packet header, decoded.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Header {
    /// The sender's CID.
    pub src_cid: u64,
    /// The receiver's CID.
    pub dst_cid: u64,
    /// The sender's port.
    pub src_port: u32,
    /// The receiver's port.
    pub dst_port: u32,
    /// Payload bytes following the header.
    pub len: u32,
    /// The socket type (`type` in the spec, a keyword here): only
    /// [`VIRTIO_VSOCK_TYPE_STREAM`] is served.
    pub kind: u16,
    /// What the packet does: one of the `VIRTIO_VSOCK_OP_*` values.
    pub op: u16,
    /// SHUTDOWN's `VIRTIO_VSOCK_SHUTDOWN_F_*` bits; zero otherwise.
    pub flags: u32,
    /// The sender's receive buffer for this connection, in bytes
    /// (§5.10.6.3 "Buffer Space Management") ...
    pub buf_alloc: u32,
    /// ... and the bytes it has consumed from it so far (wrapping).
    pub fwd_cnt: u32,
}

impl Header {
    /// Decodes the 44 header bytes.
    pub fn parse(raw: &[u8; HEADER_SIZE]) -> Self {
        let u16_at = |at: usize| u16::from_le_bytes([raw[at], raw[at + 1]]);
        let u32_at = |at: usize| {
            u32::from_le_bytes(raw[at..at + 4].try_into().expect("4 bytes in the header"))
        };
        let u64_at = |at: usize| {
            u64::from_le_bytes(raw[at..at + 8].try_into().expect("8 bytes in the header"))
        };
        Self {
            src_cid: u64_at(SRC_CID),
            dst_cid: u64_at(DST_CID),
            src_port: u32_at(SRC_PORT),
            dst_port: u32_at(DST_PORT),
            len: u32_at(LEN),
            kind: u16_at(TYPE),
            op: u16_at(OP),
            flags: u32_at(FLAGS),
            buf_alloc: u32_at(BUF_ALLOC),
            fwd_cnt: u32_at(FWD_CNT),
        }
    }

    /// Encodes the header as it goes on the wire.
    pub fn to_bytes(&self) -> [u8; HEADER_SIZE] {
        let mut raw = [0u8; HEADER_SIZE];
        let mut put = |at: usize, bytes: &[u8]| raw[at..at + bytes.len()].copy_from_slice(bytes);
        put(SRC_CID, &self.src_cid.to_le_bytes());
        put(DST_CID, &self.dst_cid.to_le_bytes());
        put(SRC_PORT, &self.src_port.to_le_bytes());
        put(DST_PORT, &self.dst_port.to_le_bytes());
        put(LEN, &self.len.to_le_bytes());
        put(TYPE, &self.kind.to_le_bytes());
        put(OP, &self.op.to_le_bytes());
        put(FLAGS, &self.flags.to_le_bytes());
        put(BUF_ALLOC, &self.buf_alloc.to_le_bytes());
        put(FWD_CNT, &self.fwd_cnt.to_le_bytes());
        raw
    }
}

/// The name of an `op`, for log lines.
pub fn op_name(op: u16) -> &'static str {
    match op {
        VIRTIO_VSOCK_OP_INVALID => "INVALID",
        VIRTIO_VSOCK_OP_REQUEST => "REQUEST",
        VIRTIO_VSOCK_OP_RESPONSE => "RESPONSE",
        VIRTIO_VSOCK_OP_RST => "RST",
        VIRTIO_VSOCK_OP_SHUTDOWN => "SHUTDOWN",
        VIRTIO_VSOCK_OP_RW => "RW",
        VIRTIO_VSOCK_OP_CREDIT_UPDATE => "CREDIT_UPDATE",
        VIRTIO_VSOCK_OP_CREDIT_REQUEST => "CREDIT_REQUEST",
        _ => "unknown",
    }
}

/// Why a tx chain holds no packet the device can act on: each is the
/// guest driver's doing, so the device drops the chain and says why.
#[derive(Debug, thiserror::Error)]
pub(super) enum PacketError {
    /// The descriptors point outside guest memory.
    #[error("the chain's buffers are not in guest memory")]
    Chain(#[source] virtio_queue::Error),
    /// Copying the header or payload out of the buffers failed.
    #[error("the chain cannot be read")]
    Read(#[source] std::io::Error),
    /// The buffers hold fewer bytes than a header.
    #[error("{0} bytes, less than a header")]
    Short(usize),
    /// `op` is none of §5.10.6's.
    #[error("unknown op {0}")]
    UnknownOp(u16),
    /// `len` is more than any packet may carry ([`MAX_PAYLOAD`]).
    #[error("a payload of {0} bytes, more than {MAX_PAYLOAD}")]
    TooLong(u32),
    /// `len` is more than the buffers hold after the header.
    #[error("len {len} but {available} payload bytes in the buffer")]
    Truncated { len: usize, available: usize },
}

/// Reads one packet off a tx chain: the header, then `len` bytes of
/// payload for RW packets.
pub(super) fn read_packet(
    mem: &GuestMemoryMmap,
    chain: virtio_queue::DescriptorChain<&GuestMemoryMmap>,
) -> Result<(Header, Vec<u8>), PacketError> {
    let mut reader = chain.reader(mem).map_err(PacketError::Chain)?;
    let available = reader.available_bytes();
    if available < HEADER_SIZE {
        return Err(PacketError::Short(available));
    }
    let mut raw = [0u8; HEADER_SIZE];
    reader.read_exact(&mut raw).map_err(PacketError::Read)?;
    let header = Header::parse(&raw);
    let known = matches!(
        header.op,
        VIRTIO_VSOCK_OP_REQUEST
            | VIRTIO_VSOCK_OP_RESPONSE
            | VIRTIO_VSOCK_OP_RST
            | VIRTIO_VSOCK_OP_SHUTDOWN
            | VIRTIO_VSOCK_OP_RW
            | VIRTIO_VSOCK_OP_CREDIT_UPDATE
            | VIRTIO_VSOCK_OP_CREDIT_REQUEST
    );
    if !known {
        return Err(PacketError::UnknownOp(header.op));
    }
    if header.op != VIRTIO_VSOCK_OP_RW {
        return Ok((header, Vec::new()));
    }
    if header.len > MAX_PAYLOAD {
        return Err(PacketError::TooLong(header.len));
    }
    let len = header.len as usize;
    let available = reader.available_bytes();
    if available < len {
        return Err(PacketError::Truncated { len, available });
    }
    let mut payload = vec![0u8; len];
    reader.read_exact(&mut payload).map_err(PacketError::Read)?;
    Ok((header, payload))
}

#[cfg(test)]
mod tests {
    use vm_memory::{Bytes, GuestAddress};

    use super::*;
    use crate::devices::virtio::test_chain::{Buf, memory, pop_chain};

    const BUFFERS: u64 = 0x1_0000;

    /// Writes each part in a device-readable buffer of its own, posts
    /// them as one chain on a mock tx queue, and reads the packet off the
    /// chain the device pops.
    fn read(mem: &GuestMemoryMmap, parts: &[&[u8]]) -> Result<(Header, Vec<u8>), PacketError> {
        let bufs: Vec<Buf> = parts
            .iter()
            .enumerate()
            .map(|(i, part)| {
                let addr = BUFFERS + i as u64 * 0x1_0000;
                mem.write_slice(part, GuestAddress(addr)).unwrap();
                Buf(addr, part.len() as u32, false)
            })
            .collect();
        read_packet(mem, pop_chain(mem, &bufs))
    }

    fn header(op: u16, len: u32) -> Header {
        Header {
            src_cid: 3,
            dst_cid: VSOCK_HOST_CID,
            src_port: 5000,
            dst_port: 1 << 30,
            len,
            kind: VIRTIO_VSOCK_TYPE_STREAM,
            op,
            ..Header::default()
        }
    }

    #[test]
    fn an_rw_packet_is_its_header_and_len_bytes_of_payload() {
        let mem = memory();
        let sent = header(VIRTIO_VSOCK_OP_RW, 5);
        // Header and payload in buffers of their own, as Linux sends them.
        let (got, payload) = read(&mem, &[&sent.to_bytes(), b"hello"]).unwrap();
        assert_eq!((got, payload.as_slice()), (sent, &b"hello"[..]));
        // Or in one buffer; bytes past `len` are not the payload.
        let mut bytes = sent.to_bytes().to_vec();
        bytes.extend_from_slice(b"hello, and more");
        let (got, payload) = read(&mem, &[&bytes]).unwrap();
        assert_eq!((got, payload.as_slice()), (sent, &b"hello"[..]));
    }

    #[test]
    fn packets_other_than_rw_carry_no_payload() {
        let mem = memory();
        let sent = header(VIRTIO_VSOCK_OP_RESPONSE, 5);
        let (got, payload) = read(&mem, &[&sent.to_bytes(), b"hello"]).unwrap();
        assert_eq!(got, sent);
        assert!(payload.is_empty());
    }

    #[test]
    fn malformed_packets_are_refused() {
        let mem = memory();
        // Shorter than a header.
        assert!(matches!(
            read(&mem, &[&[0u8; HEADER_SIZE - 1]]),
            Err(PacketError::Short(len)) if len == HEADER_SIZE - 1
        ));
        // An unknown op.
        assert!(matches!(
            read(&mem, &[&header(VIRTIO_VSOCK_OP_INVALID, 0).to_bytes()]),
            Err(PacketError::UnknownOp(VIRTIO_VSOCK_OP_INVALID))
        ));
        assert!(matches!(
            read(&mem, &[&header(99, 0).to_bytes()]),
            Err(PacketError::UnknownOp(99))
        ));
        // A payload longer than any packet may carry, even if it is there.
        let too_long = header(VIRTIO_VSOCK_OP_RW, MAX_PAYLOAD + 1);
        let payload = vec![0u8; MAX_PAYLOAD as usize + 1];
        assert!(matches!(
            read(&mem, &[&too_long.to_bytes(), &payload]),
            Err(PacketError::TooLong(len)) if len == MAX_PAYLOAD + 1
        ));
        // A len beyond the buffers.
        let short = header(VIRTIO_VSOCK_OP_RW, 100);
        assert!(matches!(
            read(&mem, &[&short.to_bytes(), b"short"]),
            Err(PacketError::Truncated {
                len: 100,
                available: 5
            })
        ));
    }

    #[test]
    fn a_header_round_trips_at_the_spec_offsets() {
        let header = Header {
            src_cid: 0x0102_0304_0506_0708,
            dst_cid: VSOCK_HOST_CID,
            src_port: 5000,
            dst_port: 1 << 30,
            len: 17,
            kind: VIRTIO_VSOCK_TYPE_STREAM,
            op: VIRTIO_VSOCK_OP_RW,
            flags: VIRTIO_VSOCK_SHUTDOWN_F_SEND,
            buf_alloc: 262_144,
            fwd_cnt: 0xdead_beef,
        };
        let raw = header.to_bytes();
        assert_eq!(raw[..8], 0x0102_0304_0506_0708u64.to_le_bytes());
        assert_eq!(raw[16..20], 5000u32.to_le_bytes());
        assert_eq!(raw[28..30], [1, 0]);
        assert_eq!(raw[30..32], [5, 0]);
        assert_eq!(raw[40..44], 0xdead_beefu32.to_le_bytes());
        assert_eq!(Header::parse(&raw), header);
    }
}
