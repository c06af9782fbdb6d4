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
}
