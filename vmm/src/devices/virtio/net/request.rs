//! The frames on virtio-net's queues (§5.1.6): each starts with a
//! `virtio_net_hdr_v1`; a transmit chain's device-readable buffers hold
//! one, read here from guest memory. No I/O and no device state: where a
//! frame goes is the device's business.
use virtio_queue::DescriptorChain;
use vm_memory::Bytes;

use super::super::GuestMemoryMmap;

/// `struct virtio_net_hdr_v1` (§5.1.6): flags, gso_type, hdr_len,
/// gso_size, csum_start, csum_offset, num_buffers. With VERSION_1 it
/// always has `num_buffers`, mergeable buffers or not.
pub const NET_HDR_LEN: usize = 12;
/// Offset of `num_buffers` in the header.
pub(super) const NUM_BUFFERS_OFFSET: usize = 10;
/// The largest frame either way: the header, a 64 KiB TSO/GSO segment
/// (its IP length field's limit), and an Ethernet header with a VLAN tag.
pub(super) const MAX_FRAME_LEN: usize = NET_HDR_LEN + 65535 + 18;

/// Reads a transmit chain's frame, header first, into `frame` (cleared
/// first, so one buffer serves every chain); returns whether the chain
/// holds one: device-readable buffers only, all in guest memory, at
/// least a header and at most `MAX_FRAME_LEN` bytes in all.
pub(super) fn read_tx_frame(
    mem: &GuestMemoryMmap,
    chain: DescriptorChain<&GuestMemoryMmap>,
    frame: &mut Vec<u8>,
) -> bool {
    frame.clear();
    for desc in chain {
        let len = desc.len() as usize;
        if desc.is_write_only() || frame.len() + len > MAX_FRAME_LEN {
            return false;
        }
        let start = frame.len();
        frame.resize(start + len, 0);
        if mem.read_slice(&mut frame[start..], desc.addr()).is_err() {
            return false;
        }
    }
    frame.len() >= NET_HDR_LEN
}

#[cfg(test)]
mod tests {
    use vm_memory::GuestAddress;

    use super::*;
    use crate::devices::virtio::test_chain::{Buf, memory, pop_chain};

    const BUFFERS: u64 = 0x1_0000;

    /// Reads the frame of the chain of (address, length, device-writable)
    /// buffers, as the device pops it from its transmit queue.
    fn read(mem: &GuestMemoryMmap, bufs: &[(u64, u32, bool)], frame: &mut Vec<u8>) -> bool {
        let bufs: Vec<Buf> = bufs.iter().map(|&(a, l, w)| Buf(a, l, w)).collect();
        read_tx_frame(mem, pop_chain(mem, &bufs), frame)
    }

    #[test]
    fn a_frame_is_its_buffers_in_order() {
        let mem = memory();
        let header = [0x11u8; NET_HDR_LEN];
        let body: Vec<u8> = (0..100u8).collect();
        mem.write_slice(&header, GuestAddress(BUFFERS)).unwrap();
        mem.write_slice(&body, GuestAddress(BUFFERS + 0x1000))
            .unwrap();
        // What a previous chain left in the buffer does not stay.
        let mut frame = vec![0xee; 7];
        let bufs = [
            (BUFFERS, NET_HDR_LEN as u32, false),
            (BUFFERS + 0x1000, 100, false),
        ];
        assert!(read(&mem, &bufs, &mut frame));
        assert_eq!(frame[..NET_HDR_LEN], header);
        assert_eq!(frame[NET_HDR_LEN..], body[..]);
    }

    #[test]
    fn a_frame_may_be_as_long_as_the_largest_and_no_longer() {
        let mem = memory();
        let mut frame = Vec::new();
        let largest = [(BUFFERS, MAX_FRAME_LEN as u32, false)];
        assert!(read(&mem, &largest, &mut frame));
        assert_eq!(frame.len(), MAX_FRAME_LEN);
        let longer = [
            (BUFFERS, MAX_FRAME_LEN as u32, false),
            (BUFFERS + 0x2_0000, 1, false),
        ];
        assert!(!read(&mem, &longer, &mut frame));
    }

    #[test]
    fn malformed_chains_hold_no_frame() {
        let mem = memory();
        let mut frame = Vec::new();
        let hdr = NET_HDR_LEN as u32;
        // Shorter than a header.
        assert!(!read(&mem, &[(BUFFERS, hdr - 1, false)], &mut frame));
        // A buffer for the device to write.
        assert!(!read(
            &mem,
            &[(BUFFERS, hdr, false), (BUFFERS + 0x1000, 60, true)],
            &mut frame
        ));
        // A buffer outside guest memory.
        assert!(!read(
            &mem,
            &[(BUFFERS, hdr, false), (0xf_fff0, 60, false)],
            &mut frame
        ));
    }
}
