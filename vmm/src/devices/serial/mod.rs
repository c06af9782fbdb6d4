//! The console: a 16550A UART (vm-superio) on COM1, its host side (stdin in,
//! any writer out) and the host terminal's raw mode.
//!
//! Output: every byte the guest writes to the transmit register goes
//! straight to the writer and is flushed, so nothing sits in a buffer when
//! the VM ends. Input: [`SerialInput`] reads host stdin when it is readable
//! and queues at most what the UART's receive FIFO can hold; when the FIFO is
//! full it stops watching stdin until the guest has drained the FIFO, so a
//! busy host never spins and no byte is dropped.

use std::fs::File;
use std::io::{self, IsTerminal, Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use vm_superio::serial::{Error as UartError, SerialEvents};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

mod persist;

pub use persist::SerialSnapshot;

use super::bus::BusDevice;
use super::{EventFdTrigger, lock};
use crate::report::one_line;

/// COM1's I/O base (IBM PC/AT I/O map); Linux's `console=ttyS0` finds it there.
pub const COM1_PORT: u16 = 0x3f8;
/// The UART's eight registers.
pub const SERIAL_PORT_LEN: u64 = 8;
/// COM1's ISA interrupt line.
pub const COM1_IRQ: u32 = 4;

/// Receive FIFO depth of the 16550A that vm-superio models; stdin is read in
/// chunks of at most this size.
const FIFO_DEPTH: usize = 64;

/// Errors from the console's host side.
#[derive(Debug, thiserror::Error)]
pub enum SerialError {
    /// stdin could not be duplicated for the event loop.
    #[error("cannot duplicate stdin for the serial console")]
    DupStdin(#[source] io::Error),
    /// The FIFO-drained notification could not be created.
    #[error("cannot create the serial input's eventfd")]
    EventFd(#[source] io::Error),
    /// The UART already feeds from another input.
    #[error("the serial console already has an input")]
    InputAttached,
    /// The terminal's mode could not be read or changed.
    #[error("cannot switch the terminal on stdin to raw mode")]
    Termios(#[source] io::Error),
    /// A saved UART state that the 16550A cannot hold (an overfull FIFO)
    /// or whose pending interrupt cannot be raised.
    #[error("cannot restore the serial console's state")]
    Restore(#[source] UartError<io::Error>),
}

/// Tells [`SerialInput`] that the guest has emptied the receive FIFO, but
/// only when it is waiting for that (the guest drains the FIFO after every
/// burst of input, and an eventfd write per burst would be wasted).
#[derive(Default)]
pub(super) struct DrainNotifier {
    armed: AtomicBool,
    evt: OnceLock<EventFd>,
}

impl SerialEvents for DrainNotifier {
    fn buffer_read(&self) {}
    fn out_byte(&self) {}
    fn tx_lost_byte(&self) {}
    fn in_buffer_empty(&self) {
        if self.armed.swap(false, Ordering::AcqRel)
            && let Some(evt) = self.evt.get()
            && let Err(err) = evt.write(1)
        {
            log::error!("serial: cannot wake the input reader: {err}");
        }
    }
}

pub(super) type Uart = vm_superio::Serial<EventFdTrigger, DrainNotifier, Box<dyn Write + Send>>;

/// The COM1 UART on the port I/O bus.
pub struct Serial {
    uart: Uart,
    /// Set after the first failed output or interrupt, which is logged once.
    warned: bool,
}

impl Serial {
    /// A UART that raises its interrupt by writing `interrupt` and sends the
    /// guest's output to `out`.
    pub fn new(interrupt: EventFd, out: Box<dyn Write + Send>) -> Self {
        let uart = Uart::with_events(
            EventFdTrigger::new(interrupt),
            DrainNotifier::default(),
            out,
        );
        Self {
            uart,
            warned: false,
        }
    }

    fn warn_once(&mut self, err: UartError<io::Error>) {
        if !self.warned {
            self.warned = true;
            log::error!(
                "serial: {} (further errors are not reported)",
                one_line(&err)
            );
        }
    }
}

impl BusDevice for Serial {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        // The UART's registers are 8 bits wide; Linux only uses `inb`.
        data.fill(0xff);
        if let ([byte], Ok(offset)) = (data, u8::try_from(offset)) {
            *byte = self.uart.read(offset);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let (&[value], Ok(offset)) = (data, u8::try_from(offset))
            && let Err(err) = self.uart.write(offset, value)
        {
            self.warn_once(err);
        }
    }
}

/// Where the input reader stands with its input.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum InputState {
    /// The input is registered with the event loop.
    Reading,
    /// The FIFO was full: the input is unregistered until the guest drains it.
    Paused,
    /// End of input, or an input that cannot be polled: nothing more to read.
    Closed,
}

/// Feeds host input into the UART's receive FIFO from the event loop.
pub struct SerialInput {
    serial: Arc<Mutex<Serial>>,
    input: File,
    drained: EventFd,
    state: InputState,
}

impl SerialInput {
    /// A reader of the VMM's stdin.
    pub fn stdin(serial: Arc<Mutex<Serial>>) -> Result<Self, SerialError> {
        let stdin = io::stdin()
            .as_fd()
            .try_clone_to_owned()
            .map_err(SerialError::DupStdin)?;
        Self::new(serial, File::from(stdin))
    }

    /// A reader of `input`, which must be pollable (a pipe, socket or
    /// terminal) for anything to reach the guest. A UART has one input.
    pub fn new(serial: Arc<Mutex<Serial>>, input: File) -> Result<Self, SerialError> {
        let drained = EventFd::new(EFD_NONBLOCK).map_err(SerialError::EventFd)?;
        let notifier_evt = drained.try_clone().map_err(SerialError::EventFd)?;
        lock(&serial)
            .uart
            .events()
            .evt
            .set(notifier_evt)
            .map_err(|_| SerialError::InputAttached)?;
        Ok(Self {
            serial,
            input,
            drained,
            state: InputState::Reading,
        })
    }

    /// Reads one chunk of input into the FIFO, or pauses when it is full.
    fn forward_input(&mut self, events: EventSet, ops: &mut EventOps) {
        let capacity = {
            let serial = lock(&self.serial);
            let capacity = serial.uart.fifo_capacity();
            if capacity == 0 {
                // Armed under the lock: the guest cannot drain the FIFO
                // between this check and the arming, so the wake-up is not lost.
                serial.uart.events().armed.store(true, Ordering::Release);
            }
            capacity.min(FIFO_DEPTH)
        };
        if capacity == 0 {
            return self.unregister(ops, InputState::Paused);
        }
        if !events.contains(EventSet::IN) {
            // Hang-up or error with nothing left to read.
            return self.unregister(ops, InputState::Closed);
        }
        let mut buf = [0u8; FIFO_DEPTH];
        match self.input.read(&mut buf[..capacity]) {
            Ok(0) => self.unregister(ops, InputState::Closed),
            Ok(len) => {
                let mut serial = lock(&self.serial);
                // Only this reader fills the FIFO, so the capacity seen above still holds.
                if let Err(err) = serial.uart.enqueue_raw_bytes(&buf[..len]) {
                    serial.warn_once(err);
                }
            }
            Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
            Err(err) => {
                log::error!("serial: stopped reading input: {err}");
                self.unregister(ops, InputState::Closed);
            }
        }
    }

    fn unregister(&mut self, ops: &mut EventOps, state: InputState) {
        if let Err(err) = ops.remove(Events::empty(&self.input)) {
            log::error!("serial: cannot stop watching input: {err}");
        }
        self.state = state;
    }

    fn resume(&mut self, ops: &mut EventOps) {
        // The eventfd only says "drained at least once"; its count is irrelevant.
        let _ = self.drained.read();
        if self.state == InputState::Paused {
            self.register_input(ops);
        }
    }

    fn register_input(&mut self, ops: &mut EventOps) {
        self.state = match ops.add(Events::new(&self.input, EventSet::IN)) {
            Ok(()) => InputState::Reading,
            // epoll refuses regular files and /dev/null: there is no input
            // to wait for, which is what `kiln run < /dev/null` means.
            Err(event_manager::Error::Epoll(err)) if err.errno() == libc::EPERM => {
                InputState::Closed
            }
            Err(err) => {
                log::error!("serial: cannot watch input: {err}");
                InputState::Closed
            }
        };
    }
}

impl MutEventSubscriber for SerialInput {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(err) = ops.add(Events::new(&self.drained, EventSet::IN)) {
            log::error!("serial: cannot watch the input FIFO: {err}");
        }
        self.register_input(ops);
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        if events.fd() == self.drained.as_raw_fd() {
            self.resume(ops);
        } else if events.fd() == self.input.as_raw_fd() && self.state == InputState::Reading {
            self.forward_input(events.event_set(), ops);
        }
    }
}

/// The host terminal in raw mode for as long as this value lives: no line
/// editing, no echo (the guest echoes), and ^C/^Z go to the guest, as on a
/// serial line. The saved mode is restored on drop.
pub struct RawTerminal {
    tty: OwnedFd,
    saved: libc::termios,
}

impl RawTerminal {
    /// Puts stdin in raw mode when it is a terminal; `None` otherwise.
    pub fn enable_if_tty() -> Result<Option<Self>, SerialError> {
        Self::enable_on(io::stdin().as_fd())
    }

    fn enable_on(fd: BorrowedFd<'_>) -> Result<Option<Self>, SerialError> {
        if !fd.is_terminal() {
            return Ok(None);
        }
        let saved = get_termios(fd)?;
        let mut raw = saved;
        raw.c_lflag &= !(libc::ICANON | libc::ECHO | libc::ISIG);
        set_termios(fd, &raw)?;
        // Keep our own descriptor: the terminal must be restored even if
        // the caller's fd is closed first.
        let tty = fd.try_clone_to_owned().map_err(SerialError::Termios)?;
        Ok(Some(Self { tty, saved }))
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        if let Err(err) = set_termios(self.tty.as_fd(), &self.saved) {
            log::error!("cannot restore the terminal mode: {}", one_line(&err));
        }
    }
}

fn get_termios(fd: BorrowedFd<'_>) -> Result<libc::termios, SerialError> {
    let mut termios = std::mem::MaybeUninit::<libc::termios>::uninit();
    // SAFETY: `fd` is a valid open descriptor and `termios` points to
    // writable memory of the size tcgetattr fills.
    let ret = unsafe { libc::tcgetattr(fd.as_raw_fd(), termios.as_mut_ptr()) };
    if ret != 0 {
        return Err(SerialError::Termios(io::Error::last_os_error()));
    }
    // SAFETY: tcgetattr succeeded, so it initialized the whole struct.
    Ok(unsafe { termios.assume_init() })
}

fn set_termios(fd: BorrowedFd<'_>, termios: &libc::termios) -> Result<(), SerialError> {
    // SAFETY: `fd` is a valid open descriptor and `termios` a valid struct
    // that tcsetattr only reads.
    let ret = unsafe { libc::tcsetattr(fd.as_raw_fd(), libc::TCSANOW, termios) };
    if ret != 0 {
        return Err(SerialError::Termios(io::Error::last_os_error()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use crate::devices::persist::Persist;
    use std::io::Write as _;
    use std::os::fd::FromRawFd;
    use std::time::Duration;

    use event_manager::{EventManager, SubscriberOps};

    use super::*;

    // 16550A register offsets and bits (PC16550D data sheet, "Register Summary").
    const DATA: u64 = 0;
    const IER: u64 = 1;
    const LSR: u64 = 5;
    const IER_RX_DATA: u8 = 0x01;
    const LSR_DATA_READY: u8 = 0x01;

    /// A writer the test can inspect while the UART owns it.
    #[derive(Clone, Default)]
    struct SharedBuf(Arc<Mutex<Vec<u8>>>);

    impl Write for SharedBuf {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn serial() -> (Arc<Mutex<Serial>>, EventFd, SharedBuf) {
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let out = SharedBuf::default();
        let serial = Serial::new(irq.try_clone().unwrap(), Box::new(out.clone()));
        (Arc::new(Mutex::new(serial)), irq, out)
    }

    fn read_reg(serial: &Mutex<Serial>, offset: u64) -> u8 {
        let mut data = [0];
        serial.lock().unwrap().read(offset, &mut data);
        data[0]
    }

    /// Everything the guest can read from the receive FIFO right now.
    fn drain_fifo(serial: &Mutex<Serial>) -> Vec<u8> {
        let mut bytes = Vec::new();
        while read_reg(serial, LSR) & LSR_DATA_READY != 0 {
            bytes.push(read_reg(serial, DATA));
        }
        bytes
    }

    fn pipe() -> (File, File) {
        let (read, write) = std::io::pipe().unwrap();
        (
            File::from(OwnedFd::from(read)),
            File::from(OwnedFd::from(write)),
        )
    }

    fn event_loop_with_input(
        serial: &Arc<Mutex<Serial>>,
        input: File,
    ) -> EventManager<SerialInput> {
        let mut manager = EventManager::new().unwrap();
        manager.add_subscriber(SerialInput::new(serial.clone(), input).unwrap());
        manager
    }

    fn run_once(manager: &mut EventManager<SerialInput>) -> usize {
        manager.run_with_timeout(100).unwrap()
    }

    #[test]
    fn guest_output_reaches_the_writer() {
        let (serial, _irq, out) = serial();
        for byte in b"ok\n" {
            serial.lock().unwrap().write(DATA, &[*byte]);
        }
        assert_eq!(out.0.lock().unwrap().as_slice(), b"ok\n");
    }

    #[test]
    fn a_restored_uart_has_its_registers_fifo_and_pending_interrupt() {
        let (serial, _irq, _out) = serial();
        serial.lock().unwrap().write(IER, &[IER_RX_DATA]);
        serial
            .lock()
            .unwrap()
            .uart
            .enqueue_raw_bytes(b"ab")
            .unwrap();
        let saved = serial.lock().unwrap().save();
        let json = serde_json::to_string(&saved).unwrap();
        let saved: SerialSnapshot = serde_json::from_str(&json).unwrap();

        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let restored = Serial::restore((irq.try_clone().unwrap(), Box::new(io::sink())), &saved);
        let restored = Arc::new(Mutex::new(restored.unwrap()));
        // The received data was waiting with its interrupt enabled: raised again.
        assert_eq!(irq.read().unwrap(), 1);
        let mut ier = [0];
        restored.lock().unwrap().read(IER, &mut ier);
        assert_eq!(ier, [IER_RX_DATA]);
        assert_eq!(drain_fifo(&restored), b"ab");
    }

    #[test]
    fn wide_accesses_are_ignored() {
        let (serial, _irq, out) = serial();
        serial.lock().unwrap().write(DATA, b"xy");
        assert!(out.0.lock().unwrap().is_empty());
        let mut data = [0; 2];
        serial.lock().unwrap().read(LSR, &mut data);
        assert_eq!(data, [0xff; 2]);
    }

    #[test]
    fn input_reaches_the_guest_and_raises_the_interrupt() {
        let (serial, irq, _out) = serial();
        serial.lock().unwrap().write(IER, &[IER_RX_DATA]);
        let (read, mut write) = pipe();
        let mut manager = event_loop_with_input(&serial, read);

        write.write_all(b"hi").unwrap();
        assert_eq!(run_once(&mut manager), 1);
        assert_eq!(irq.read().unwrap(), 1);
        assert_eq!(drain_fifo(&serial), b"hi");
    }

    #[test]
    fn a_full_fifo_pauses_input_until_the_guest_drains_it() {
        let (serial, _irq, _out) = serial();
        let (read, mut write) = pipe();
        let mut manager = event_loop_with_input(&serial, read);
        let input: Vec<u8> = (0..=u8::MAX).cycle().take(FIFO_DEPTH + 10).collect();
        write.write_all(&input).unwrap();

        run_once(&mut manager); // fills the FIFO
        run_once(&mut manager); // finds it full: pauses
        assert_eq!(
            run_once(&mut manager),
            0,
            "paused input must not wake the loop"
        );

        let mut received = drain_fifo(&serial);
        assert_eq!(received.len(), FIFO_DEPTH);
        run_once(&mut manager); // the drain notification resumes reading
        run_once(&mut manager); // the rest of the input
        received.extend(drain_fifo(&serial));
        assert_eq!(received, input);
    }

    #[test]
    fn a_uart_takes_one_input() {
        let (serial, _irq, _out) = serial();
        let (first, _) = pipe();
        let (second, _) = pipe();
        SerialInput::new(serial.clone(), first).unwrap();
        assert!(matches!(
            SerialInput::new(serial, second),
            Err(SerialError::InputAttached)
        ));
    }

    #[test]
    fn end_of_input_unregisters_it() {
        let (serial, _irq, _out) = serial();
        let (read, write) = pipe();
        let mut manager = event_loop_with_input(&serial, read);
        drop(write);
        assert_eq!(run_once(&mut manager), 1);
        // A closed pipe stays readable forever; it must not wake the loop again.
        assert_eq!(run_once(&mut manager), 0);
    }

    #[test]
    fn unpollable_input_is_treated_as_empty() {
        let (serial, _irq, _out) = serial();
        let null = File::open("/dev/null").unwrap();
        let mut manager = event_loop_with_input(&serial, null);
        let started = std::time::Instant::now();
        assert_eq!(run_once(&mut manager), 0);
        assert!(started.elapsed() >= Duration::from_millis(90));
    }

    #[test]
    fn raw_mode_is_set_on_a_terminal_and_restored_on_drop() {
        let (_controller, tty) = open_pty();
        let before = get_termios(tty.as_fd()).unwrap();
        assert_ne!(before.c_lflag & libc::ICANON, 0);

        let raw = RawTerminal::enable_on(tty.as_fd()).unwrap().unwrap();
        let during = get_termios(tty.as_fd()).unwrap();
        assert_eq!(during.c_lflag & (libc::ICANON | libc::ECHO | libc::ISIG), 0);
        drop(raw);
        assert_eq!(get_termios(tty.as_fd()).unwrap().c_lflag, before.c_lflag);
    }

    #[test]
    fn raw_mode_is_not_applied_to_a_pipe() {
        let (read, _write) = pipe();
        assert!(RawTerminal::enable_on(read.as_fd()).unwrap().is_none());
    }

    /// A pseudo-terminal pair: (controller, terminal).
    fn open_pty() -> (OwnedFd, OwnedFd) {
        let (mut controller, mut tty) = (-1, -1);
        // SAFETY: openpty writes two descriptors into the given integers;
        // the name, termios and window size pointers may be null.
        let ret = unsafe {
            libc::openpty(
                &mut controller,
                &mut tty,
                std::ptr::null_mut(),
                std::ptr::null(),
                std::ptr::null(),
            )
        };
        assert_eq!(ret, 0, "openpty: {}", io::Error::last_os_error());
        // SAFETY: openpty succeeded: both descriptors are open and ours.
        let controller = unsafe { OwnedFd::from_raw_fd(controller) };
        // SAFETY: as above.
        let tty = unsafe { OwnedFd::from_raw_fd(tty) };
        (controller, tty)
    }
}
