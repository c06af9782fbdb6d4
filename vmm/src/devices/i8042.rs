//! The i8042 PS/2 controller, reduced to what a microVM needs: the CPU reset
//! line. Linux's `reboot=k` path (`native_machine_emergency_restart`) polls
//! the status port until the input buffer is empty (`kb_wait`) and writes
//! the pulse-reset command 0xFE to port 0x64; vm-superio's `I8042Device`
//! answers status reads with 0 (both buffers empty) and turns the command
//! into a write to the reset `EventFd`, which ends the VM.

use vm_superio::I8042Device;
use vmm_sys_util::eventfd::EventFd;

use super::EventFdTrigger;
use super::bus::BusDevice;
use crate::logger::error_limited;

/// First I/O port of the controller: the data port (IBM PC/AT I/O map).
pub const I8042_PORT: u16 = 0x60;
/// Ports 0x60 (data) through 0x64 (command/status) inclusive.
pub const I8042_PORT_LEN: u64 = 5;

/// The i8042 controller on the port I/O bus.
pub struct I8042 {
    controller: I8042Device<EventFdTrigger>,
}

impl I8042 {
    /// A controller that writes `reset` when the guest pulses the reset line.
    pub fn new(reset: EventFd) -> Self {
        Self {
            controller: I8042Device::new(EventFdTrigger::new(reset)),
        }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        // The controller's registers are 8 bits wide; wider reads see an
        // unclaimed upper part, as on the ISA bus.
        data.fill(0xff);
        if let ([byte, ..], Ok(offset)) = (data, u8::try_from(offset)) {
            *byte = self.controller.read(offset);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let (&[value], Ok(offset)) = (data, u8::try_from(offset)) else {
            return;
        };
        if let Err(err) = self.controller.write(offset, value) {
            error_limited!("i8042: cannot signal the CPU reset: {err}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Offset of the command/status port (0x64) from [`I8042_PORT`].
    const COMMAND_OFFSET: u64 = 4;
    /// i8042 command: pulse the CPU reset line.
    const CMD_RESET_CPU: u8 = 0xfe;
    /// Status register: input buffer full (the guest must wait).
    const STATUS_INPUT_FULL: u8 = 0x02;

    fn controller() -> (I8042, EventFd) {
        let reset = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        (I8042::new(reset.try_clone().unwrap()), reset)
    }

    #[test]
    fn reset_command_writes_the_reset_event() {
        let (mut i8042, reset) = controller();
        // kb_wait: the status port must report an empty input buffer.
        let mut status = [0xff];
        i8042.read(COMMAND_OFFSET, &mut status);
        assert_eq!(status[0] & STATUS_INPUT_FULL, 0);

        i8042.write(COMMAND_OFFSET, &[CMD_RESET_CPU]);
        assert_eq!(reset.read().unwrap(), 1);
    }

    #[test]
    fn other_writes_do_not_reset() {
        let (mut i8042, reset) = controller();
        i8042.write(0, &[CMD_RESET_CPU]);
        i8042.write(COMMAND_OFFSET, &[0xaa]);
        i8042.write(COMMAND_OFFSET, &[CMD_RESET_CPU, 0]);
        assert!(reset.read().is_err(), "no reset was requested");
    }
}
