//! The VMM end of the guest-init protocol (`guest_init::protocol`): guest-init
//! writes 32-bit events to one I/O port; this device records them for the
//! VMM, which reads the boot time and the entrypoint's exit status.

use std::sync::{Arc, OnceLock};
use std::time::Instant;

use guest_init::protocol::{INIT_PORT_WIDTH, InitEvent};

use super::bus::BusDevice;

pub use guest_init::protocol::INIT_PORT;

/// Length of the port range on the bus.
pub const INIT_PORT_LEN: u64 = INIT_PORT_WIDTH as u64;

/// What guest-init has reported so far; shared between the port (written on
/// vCPU threads) and the VMM, which reads it when the VM ends.
#[derive(Debug, Default)]
pub struct InitReport {
    started: OnceLock<Instant>,
    exit_status: OnceLock<u8>,
    /// When set, the boot timer's zero: the first InitStarted is printed
    /// on stderr (`boot-to-init: N us`) the moment it arrives.
    announce_from: Option<Instant>,
}

/// What [`InitReport::announcing`] prints, followed by the microseconds.
pub const BOOT_TO_INIT_PREFIX: &str = "boot-to-init: ";

impl InitReport {
    /// An empty report.
    pub fn new() -> Arc<Self> {
        Arc::default()
    }

    /// An empty report that prints `boot-to-init: N us` on stderr as soon
    /// as guest-init reports that it runs, N counted from `zero`: a
    /// benchmark reading stderr sees the boot timer stop while the guest
    /// goes on.
    pub fn announcing(zero: Instant) -> Arc<Self> {
        Arc::new(InitReport {
            announce_from: Some(zero),
            ..InitReport::default()
        })
    }

    /// When guest-init first reported that it runs as PID 1.
    pub fn init_started(&self) -> Option<Instant> {
        self.started.get().copied()
    }

    /// The entrypoint's exit status, once guest-init has reported it.
    pub fn exit_status(&self) -> Option<u8> {
        self.exit_status.get().copied()
    }

    fn record(&self, event: InitEvent) {
        match event {
            // The first report is the boot time; a repeat is later by definition.
            InitEvent::InitStarted => {
                let now = Instant::now();
                if self.started.set(now).is_ok()
                    && let Some(zero) = self.announce_from
                {
                    eprintln!(
                        "{BOOT_TO_INIT_PREFIX}{} us",
                        now.duration_since(zero).as_micros()
                    );
                }
            }
            // guest-init reboots right after the exit report, so a second
            // one cannot describe the entrypoint any better than the first.
            InitEvent::EntrypointExit(status) => {
                self.exit_status.get_or_init(|| status);
            }
        }
    }
}

/// The guest-init port on the port I/O bus.
pub struct InitPort {
    report: Arc<InitReport>,
    /// Set after the first malformed access, which is logged; later ones are
    /// ignored silently so that a confused guest cannot flood the log.
    warned: bool,
}

impl InitPort {
    /// A port that records events into `report`.
    pub fn new(report: Arc<InitReport>) -> Self {
        Self {
            report,
            warned: false,
        }
    }

    fn warn_once(&mut self, what: std::fmt::Arguments<'_>) {
        if !self.warned {
            self.warned = true;
            log::warn!("init port: ignoring {what} (further ones are ignored silently)");
        }
    }
}

impl BusDevice for InitPort {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        // Write-only port: reads see an unclaimed bus.
        data.fill(0xff);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Ok(bytes) = <[u8; INIT_PORT_WIDTH]>::try_from(data) else {
            return self.warn_once(format_args!(
                "a {}-byte write at offset {offset}; guest-init writes {INIT_PORT_WIDTH} bytes",
                data.len()
            ));
        };
        if offset != 0 {
            return self.warn_once(format_args!("a write at offset {offset}"));
        }
        let value = u32::from_le_bytes(bytes);
        match InitEvent::decode(value) {
            Some(event) => self.report.record(event),
            None => self.warn_once(format_args!("the undefined event {value:#010x}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn port() -> (InitPort, Arc<InitReport>) {
        let report = InitReport::new();
        (InitPort::new(report.clone()), report)
    }

    fn send(port: &mut InitPort, event: InitEvent) {
        port.write(0, &event.encode().to_le_bytes());
    }

    #[test]
    fn records_the_first_start_and_the_exit_status() {
        let (mut port, report) = port();
        assert_eq!(report.init_started(), None);
        assert_eq!(report.exit_status(), None);

        let before = Instant::now();
        send(&mut port, InitEvent::InitStarted);
        let started = report.init_started().unwrap();
        assert!(started >= before);
        send(&mut port, InitEvent::InitStarted);
        assert_eq!(report.init_started(), Some(started));

        send(&mut port, InitEvent::EntrypointExit(3));
        assert_eq!(report.exit_status(), Some(3));
    }

    #[test]
    fn ignores_wrong_widths_offsets_and_undefined_values() {
        let (mut port, report) = port();
        let started = InitEvent::InitStarted.encode().to_le_bytes();
        port.write(0, &started[..2]);
        port.write(0, &[1]);
        port.write(1, &started);
        port.write(0, &0xff00_0000u32.to_le_bytes());
        assert!(port.warned);
        assert_eq!(report.init_started(), None);
        assert_eq!(report.exit_status(), None);

        let mut data = [0; 4];
        port.read(0, &mut data);
        assert_eq!(data, [0xff; 4]);
    }
}
