//! The guest-init <-> VMM protocol: one 32-bit I/O port.
//!
//! guest-init (running as root in the guest) gains access to the port with
//! `ioperm(2)` and writes 32-bit values to it with `out`. Each write is one
//! event: the top byte says which, the low 24 bits carry its payload.
//!
//! | event            | value                         | meaning                                   |
//! |------------------|-------------------------------|-------------------------------------------|
//! | `INIT_STARTED`   | `0x0100_0000`                 | PID 1 is running (the boot timer)         |
//! | `ENTRYPOINT_EXIT`| `0x0200_0000 \| status`        | the entrypoint ended with `status` (0-255) |
//!
//! `status` follows the shell convention: the exit code, or 128 + signal
//! number when the entrypoint was killed by a signal. After `ENTRYPOINT_EXIT`
//! guest-init reboots the guest; the VMM treats the reset as the end of the VM
//! and exits with `status`.
//!
//! Port 0x440 lies in a range the PC/AT I/O map leaves unassigned (nothing in
//! a microVM, QEMU's microvm machine included, decodes it). guest-init
//! writes it only when the kernel command line carries
//! [`VMM_CMDLINE_FLAG`], so a guest started any other way never touches it.

/// The kernel command-line parameter Kiln's VMM always passes. guest-init
/// writes [`INIT_PORT`] only when it sees it: under another VMM, or as the
/// PID 1 of a namespace on a host (as its tests run it), it never touches
/// I/O ports.
pub const VMM_CMDLINE_FLAG: &str = "kiln.vmm=1";

/// The I/O port guest-init writes its events to.
pub const INIT_PORT: u16 = 0x440;

/// Width of every write to [`INIT_PORT`], in bytes.
pub const INIT_PORT_WIDTH: usize = 4;

const EVENT_SHIFT: u32 = 24;
const PAYLOAD_MASK: u32 = (1 << EVENT_SHIFT) - 1;

const CODE_INIT_STARTED: u32 = 0x01;
const CODE_ENTRYPOINT_EXIT: u32 = 0x02;

/// One event guest-init reports to the VMM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InitEvent {
    /// guest-init has started as PID 1; the VMM stops its boot timer here.
    InitStarted,
    /// The entrypoint exited with this status (0-255, shell convention).
    EntrypointExit(u8),
}

impl InitEvent {
    /// The 32-bit value guest-init writes to [`INIT_PORT`].
    pub const fn encode(self) -> u32 {
        match self {
            InitEvent::InitStarted => CODE_INIT_STARTED << EVENT_SHIFT,
            InitEvent::EntrypointExit(status) => {
                (CODE_ENTRYPOINT_EXIT << EVENT_SHIFT) | status as u32
            }
        }
    }

    /// Decodes a value written to [`INIT_PORT`]; `None` for a value this
    /// protocol does not define (the VMM logs and ignores it).
    pub const fn decode(value: u32) -> Option<Self> {
        let payload = value & PAYLOAD_MASK;
        match value >> EVENT_SHIFT {
            CODE_INIT_STARTED if payload == 0 => Some(InitEvent::InitStarted),
            CODE_ENTRYPOINT_EXIT if payload <= u8::MAX as u32 => {
                Some(InitEvent::EntrypointExit(payload as u8))
            }
            _ => None,
        }
    }
}

/// The first bytes of the user-data disk: a read-only virtio disk that
/// carries an instance's user-data, named to guest-init by
/// `kiln.user-data=/dev/vdX`. The disk holds a 16-byte header (this magic
/// and the data's length, le64), the data, and zeros to a whole sector.
pub const USER_DATA_MAGIC: [u8; 8] = *b"KILNUD\0\x01";
/// Bytes of the user-data disk's header.
pub const USER_DATA_HEADER_LEN: usize = 16;

/// The user-data disk's header for `len` bytes of data.
pub fn user_data_header(len: u64) -> [u8; USER_DATA_HEADER_LEN] {
    let mut header = [0u8; USER_DATA_HEADER_LEN];
    header[..8].copy_from_slice(&USER_DATA_MAGIC);
    header[8..].copy_from_slice(&len.to_le_bytes());
    header
}

/// The data length a user-data disk header announces, if it is one.
pub fn parse_user_data_header(header: &[u8; USER_DATA_HEADER_LEN]) -> Option<u64> {
    (header[..8] == USER_DATA_MAGIC).then(|| {
        let mut len = [0u8; 8];
        len.copy_from_slice(&header[8..]);
        u64::from_le_bytes(len)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_event_round_trips() {
        let events = [InitEvent::InitStarted]
            .into_iter()
            .chain((0..=u8::MAX).map(InitEvent::EntrypointExit));
        for event in events {
            assert_eq!(InitEvent::decode(event.encode()), Some(event));
        }
    }

    #[test]
    fn values_are_the_documented_ones() {
        assert_eq!(InitEvent::InitStarted.encode(), 0x0100_0000);
        assert_eq!(InitEvent::EntrypointExit(7).encode(), 0x0200_0007);
    }

    #[test]
    fn unknown_values_are_rejected() {
        assert_eq!(InitEvent::decode(0), None);
        assert_eq!(InitEvent::decode(0x0100_0001), None);
        assert_eq!(InitEvent::decode(0x0200_0100), None);
        assert_eq!(InitEvent::decode(0xff00_0000), None);
    }

    #[test]
    fn user_data_headers_round_trip_and_reject_other_disks() {
        let header = user_data_header(1234);
        assert_eq!(parse_user_data_header(&header), Some(1234));
        let mut other = header;
        other[0] = b'X';
        assert_eq!(parse_user_data_header(&other), None);
    }
}
