//! A virtio-blk request as the driver puts it on the queue (§5.2.6): the
//! chain's device-readable header (type, sector), its data buffers, and
//! its device-writable status byte, parsed from guest memory. No I/O and
//! no device state: what a request does is the device's business.
use virtio_queue::DescriptorChain;
use virtio_queue::desc::split::Descriptor;
use vm_memory::Bytes;

use super::super::GuestMemoryMmap;

/// `struct virtio_blk_outhdr`: le32 type, le32 reserved, le64 sector (§5.2.6).
pub(super) const HEADER_SIZE: u32 = 16;
pub(super) const HEADER_TYPE_OFFSET: usize = 0;
pub(super) const HEADER_SECTOR_OFFSET: usize = 8;

/// Why a request chain cannot even be answered with a status (§5.2.6:
/// without a readable header and a writable status byte there is nothing to
/// answer). Such chains go back to the driver with nothing written.
#[derive(Debug, thiserror::Error)]
pub(super) enum ChainError {
    /// The chain does not start with a whole readable header.
    #[error("the chain has no device-readable header of {HEADER_SIZE} bytes")]
    Header,
    /// The chain does not end with a writable byte for the status.
    #[error("the chain has no device-writable status byte")]
    Status,
    /// The header's buffer is not in guest memory.
    #[error("the header cannot be read from guest memory")]
    HeaderMemory,
}

/// A request as parsed from its chain.
pub(super) struct Request {
    pub(super) kind: u32,
    pub(super) sector: u64,
    pub(super) data: Vec<Descriptor>,
    pub(super) status: Descriptor,
}

impl Request {
    pub(super) fn parse(
        mem: &GuestMemoryMmap,
        chain: DescriptorChain<&GuestMemoryMmap>,
    ) -> Result<Self, ChainError> {
        let mut descriptors: Vec<Descriptor> = chain.collect();
        let status = descriptors
            .pop()
            .filter(|d| d.is_write_only() && d.len() >= 1)
            .ok_or(ChainError::Status)?;
        if descriptors.is_empty() {
            return Err(ChainError::Header);
        }
        let header = descriptors.remove(0);
        if header.is_write_only() || header.len() < HEADER_SIZE {
            return Err(ChainError::Header);
        }
        let mut raw = [0u8; HEADER_SIZE as usize];
        mem.read_slice(&mut raw, header.addr())
            .map_err(|_| ChainError::HeaderMemory)?;
        Ok(Self {
            kind: le_u32(&raw, HEADER_TYPE_OFFSET),
            sector: le_u64(&raw, HEADER_SECTOR_OFFSET),
            data: descriptors,
            status,
        })
    }

    /// Total length of the data buffers, if they all go in the direction
    /// the request needs.
    pub(super) fn data_len(&self, device_writes: bool) -> Option<u64> {
        self.data
            .iter()
            .all(|d| d.is_write_only() == device_writes)
            .then(|| self.data.iter().map(|d| u64::from(d.len())).sum())
    }
}

pub(super) fn le_u32(bytes: &[u8], offset: usize) -> u32 {
    let mut raw = [0u8; 4];
    raw.copy_from_slice(&bytes[offset..offset + 4]);
    u32::from_le_bytes(raw)
}

pub(super) fn le_u64(bytes: &[u8], offset: usize) -> u64 {
    let mut raw = [0u8; 8];
    raw.copy_from_slice(&bytes[offset..offset + 8]);
    u64::from_le_bytes(raw)
}

#[cfg(test)]
pub(super) mod tests {
    use virtio_bindings::virtio_blk::{VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT};
    use vm_memory::GuestAddress;

    use super::*;
    use crate::devices::virtio::test_chain::{Buf, memory, pop_chain};

    pub(crate) const HEADER: u64 = 0x1_0000;
    pub(crate) const DATA: u64 = 0x2_0000;
    pub(crate) const STATUS: u64 = 0x9_0000;

    pub(crate) const HEADER_BUF: Buf = Buf(HEADER, HEADER_SIZE, false);
    pub(crate) const STATUS_BUF: Buf = Buf(STATUS, 1, true);

    /// Writes a request header of `kind` at `sector` at [`HEADER`].
    pub(crate) fn write_header(mem: &GuestMemoryMmap, kind: u32, sector: u64) {
        let mut raw = [0u8; HEADER_SIZE as usize];
        raw[HEADER_TYPE_OFFSET..][..4].copy_from_slice(&kind.to_le_bytes());
        raw[HEADER_SECTOR_OFFSET..][..8].copy_from_slice(&sector.to_le_bytes());
        mem.write_slice(&raw, GuestAddress(HEADER)).unwrap();
    }

    /// Parses the chain of `bufs` the device pops.
    fn parse(mem: &GuestMemoryMmap, bufs: &[Buf]) -> Result<Request, ChainError> {
        Request::parse(mem, pop_chain(mem, bufs))
    }

    #[test]
    fn a_chain_parses_into_its_header_data_and_status() {
        let mem = memory();
        write_header(&mem, VIRTIO_BLK_T_IN, 0x0102_0304_0506_0708);
        let bufs = [
            HEADER_BUF,
            Buf(DATA, 512, true),
            Buf(DATA + 0x1000, 1024, true),
            STATUS_BUF,
        ];
        let request = parse(&mem, &bufs).unwrap();
        assert_eq!(request.kind, VIRTIO_BLK_T_IN);
        assert_eq!(request.sector, 0x0102_0304_0506_0708);
        let data: Vec<_> = request
            .data
            .iter()
            .map(|d| (d.addr().0, d.len(), d.is_write_only()))
            .collect();
        assert_eq!(data, [(DATA, 512, true), (DATA + 0x1000, 1024, true)]);
        assert_eq!((request.status.addr().0, request.status.len()), (STATUS, 1));
        assert_eq!(request.data_len(true), Some(1536));
        // The buffers go the wrong way for a request that reads them.
        assert_eq!(request.data_len(false), None);
    }

    #[test]
    fn a_chain_without_data_has_none() {
        let mem = memory();
        write_header(&mem, VIRTIO_BLK_T_OUT, 3);
        let request = parse(&mem, &[HEADER_BUF, STATUS_BUF]).unwrap();
        assert_eq!((request.kind, request.sector), (VIRTIO_BLK_T_OUT, 3));
        assert!(request.data.is_empty());
        assert_eq!(request.data_len(false), Some(0));
        assert_eq!(request.data_len(true), Some(0));
    }

    #[test]
    fn chains_without_a_readable_header_or_a_writable_status_are_refused() {
        let mem = memory();
        write_header(&mem, VIRTIO_BLK_T_IN, 0);
        let header = |bufs: &[Buf]| matches!(parse(&mem, bufs), Err(ChainError::Header));
        let status = |bufs: &[Buf]| matches!(parse(&mem, bufs), Err(ChainError::Status));
        // No header.
        assert!(header(&[STATUS_BUF]));
        // A header the device could write.
        assert!(header(&[Buf(HEADER, HEADER_SIZE, true), STATUS_BUF]));
        // A header too short.
        assert!(header(&[Buf(HEADER, HEADER_SIZE - 1, false), STATUS_BUF]));
        // A status the device cannot write, or of no byte.
        assert!(status(&[
            HEADER_BUF,
            Buf(DATA, 512, true),
            Buf(STATUS, 1, false)
        ]));
        assert!(status(&[HEADER_BUF, Buf(STATUS, 0, true)]));
        // A header outside guest memory.
        assert!(matches!(
            parse(&mem, &[Buf(0x4000_0000, HEADER_SIZE, false), STATUS_BUF]),
            Err(ChainError::HeaderMemory)
        ));
    }

    #[test]
    fn little_endian_fields_are_read_at_their_offsets() {
        let bytes = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10];
        assert_eq!(le_u32(&bytes, 1), 0x0504_0302);
        assert_eq!(le_u64(&bytes, 2), 0x0a09_0807_0605_0403);
    }
}
