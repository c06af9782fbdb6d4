//! The console's part of a snapshot: the UART's registers and receive
//! FIFO. Its host side (stdin, the output writer, the interrupt eventfd)
//! is the restoring VM's own.
use std::io::Write;

use serde::{Deserialize, Serialize};
use vm_superio::serial::SerialState;
use vmm_sys_util::eventfd::EventFd;

use super::{DrainNotifier, Serial, SerialError, Uart};
use crate::devices::EventFdTrigger;
use crate::devices::persist::Persist;

/// The UART's registers and receive FIFO as a snapshot stores them
/// (vm-superio's own state, given serde's shape here).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(remote = "SerialState")]
struct SavedUart {
    baud_divisor_low: u8,
    baud_divisor_high: u8,
    interrupt_enable: u8,
    interrupt_identification: u8,
    line_control: u8,
    line_status: u8,
    modem_control: u8,
    modem_status: u8,
    scratch: u8,
    in_buffer: Vec<u8>,
}

/// The serial console's part of a snapshot.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialSnapshot(#[serde(with = "SavedUart")] SerialState);

impl Persist for Serial {
    type State = SerialSnapshot;
    /// The interrupt line's eventfd and where the guest's output goes.
    type ConstructorArgs = (EventFd, Box<dyn Write + Send>);
    type Error = SerialError;

    fn save(&self) -> SerialSnapshot {
        SerialSnapshot(self.uart.state())
    }

    /// A UART that goes on from `saved`; an interrupt that was pending then
    /// is raised again.
    fn restore(
        (interrupt, out): (EventFd, Box<dyn Write + Send>),
        saved: &SerialSnapshot,
    ) -> Result<Self, SerialError> {
        let trigger = EventFdTrigger::new(interrupt);
        let uart = Uart::from_state(&saved.0, trigger, DrainNotifier::default(), out)
            .map_err(SerialError::Restore)?;
        Ok(Self {
            uart,
            warned: false,
        })
    }
}
