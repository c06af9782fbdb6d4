//! The VMM thread's event loop (event-manager), and how a VM ends.
//!
//! A VM ends when a vCPU sees the guest reset or shut down, when a vCPU
//! fails, or when the guest resets through the i8042 controller. All of
//! them write one EventFd; the loop runs until it fires.
use std::fs::File;
use std::io::{self, Read};
use std::os::fd::FromRawFd;
use std::sync::{Arc, Mutex};

use event_manager::{EventManager, EventOps, Events, MutEventSubscriber, SubscriberOps};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};
use vmm_sys_util::signal::{self, block_signal, create_sigset};

use crate::devices::lock;
use crate::rpc::{ControlListener, ControlRequest};

/// Why a VM ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VmEnd {
    /// The guest reset the machine (reboot, triple fault, i8042 reset).
    Reset,
    /// The guest asked KVM for a shutdown.
    Shutdown,
    /// A vCPU could not go on; the text says why.
    Error(String),
    /// The VMM's owner asked it to stop (SIGTERM or SIGINT).
    Stop,
}

/// The "VM has ended" signal shared by vCPUs, devices and the loop.
pub struct VmEndSignal {
    evt: EventFd,
    reason: Mutex<Option<VmEnd>>,
}

impl VmEndSignal {
    /// A signal not yet given, to be shared by the vCPU threads, the
    /// devices and the loop (hence the `Arc`).
    pub fn new() -> std::io::Result<Arc<Self>> {
        Ok(Arc::new(VmEndSignal {
            evt: EventFd::new(EFD_NONBLOCK)?,
            reason: Mutex::new(None),
        }))
    }

    /// Records `end` (the first reason wins) and wakes the loop.
    pub fn signal(&self, end: VmEnd) {
        lock(&self.reason).get_or_insert(end);
        // A full counter (2^64 - 1 writes) is the only failure: already signalled.
        let _ = self.evt.write(1);
    }

    /// An EventFd that ends the VM when written, for devices that only
    /// know EventFds (the i8042 reset line). It means [`VmEnd::Reset`].
    pub fn trigger(&self) -> std::io::Result<EventFd> {
        self.evt.try_clone()
    }

    /// Why the VM ended; a bare trigger means a reset.
    pub fn reason(&self) -> VmEnd {
        lock(&self.reason).clone().unwrap_or(VmEnd::Reset)
    }
}

/// Watches the end signal from inside the event loop.
struct EndWatcher {
    end: Arc<VmEndSignal>,
    ended: bool,
}

impl MutEventSubscriber for EndWatcher {
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let _ = self.end.evt.read();
        self.ended = true;
    }

    fn init(&mut self, ops: &mut EventOps) {
        // Registration happens before seccomp and cannot fail for a fresh
        // eventfd; if it did, the VM could never end, so say so.
        ops.add(Events::new(&self.end.evt, EventSet::IN))
            .expect("cannot watch the VM end eventfd");
    }
}

/// SIGTERM and SIGINT, read from a signalfd: how `kiln stop` (or any
/// owner) asks a VMM to stop. Blocked in every thread, so none dies of
/// them; the VM then ends like any other, and its disks flush as they
/// close, which a default-action death would skip.
pub struct StopSignals {
    fd: File,
    end: Arc<VmEndSignal>,
}

impl StopSignals {
    /// Blocks the signals in the calling thread, and so in the threads it
    /// spawns afterwards: create this before the vCPU threads.
    pub fn new(end: Arc<VmEndSignal>) -> io::Result<Self> {
        let signals = [libc::SIGTERM, libc::SIGINT];
        for signal in signals {
            match block_signal(signal) {
                // A jailed VM process comes with them blocked: its jail
                // blocks them across the exec, as its PID namespace's
                // init would have them discarded otherwise.
                Ok(()) | Err(signal::Error::SignalAlreadyBlocked(_)) => {}
                Err(err) => return Err(io::Error::other(err.to_string())),
            }
        }
        let mask =
            create_sigset(&signals).map_err(|err| io::Error::from_raw_os_error(err.errno()))?;
        // SAFETY: -1 asks for a new descriptor; `mask` is initialized.
        let fd = unsafe { libc::signalfd(-1, &mask, libc::SFD_NONBLOCK | libc::SFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: signalfd returned a new descriptor that nothing else owns.
        let fd = unsafe { File::from_raw_fd(fd) };
        Ok(StopSignals { fd, end })
    }
}

impl MutEventSubscriber for StopSignals {
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let mut info = [0u8; std::mem::size_of::<libc::signalfd_siginfo>()];
        if (&self.fd).read(&mut info).is_ok() {
            self.end.signal(VmEnd::Stop);
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(err) = ops.add(Events::new(&self.fd, EventSet::IN)) {
            log::error!("cannot watch for stop signals: {err}");
        }
    }
}

/// Subscribers are device backends shared with vCPU threads.
pub type Subscriber = Arc<Mutex<dyn MutEventSubscriber + Send>>;

/// The event loop of one VM.
pub struct EventLoop {
    manager: EventManager<Subscriber>,
    watcher: Arc<Mutex<EndWatcher>>,
    /// Where the control channel's listener leaves a request, if the VM
    /// has a control channel.
    control: Option<Arc<Mutex<Option<ControlRequest>>>>,
}

/// Why [`EventLoop::run`] returned.
#[derive(Debug, PartialEq, Eq)]
pub enum LoopEvent {
    /// The VM has ended.
    End,
    /// The VMM process asks for something; the loop goes on afterwards.
    Control(ControlRequest),
}

/// Errors from the event loop.
#[derive(Debug, thiserror::Error)]
pub enum EventLoopError {
    /// The epoll instance behind the loop cannot be created.
    #[error("cannot create the event loop")]
    Create(#[source] event_manager::Error),
    /// Waiting for or dispatching events failed.
    #[error("the event loop failed")]
    Run(#[source] event_manager::Error),
}

impl EventLoop {
    /// A loop that returns [`LoopEvent::End`] once `end` is signalled.
    pub fn new(end: Arc<VmEndSignal>) -> Result<Self, EventLoopError> {
        let mut manager: EventManager<Subscriber> =
            EventManager::new().map_err(EventLoopError::Create)?;
        let watcher = Arc::new(Mutex::new(EndWatcher { end, ended: false }));
        manager.add_subscriber(watcher.clone());
        Ok(EventLoop {
            manager,
            watcher,
            control: None,
        })
    }

    /// Serves the control channel: its requests make [`run`](Self::run) return.
    pub fn add_control(&mut self, listener: ControlListener) {
        self.control = Some(listener.pending());
        self.manager.add_subscriber(Arc::new(Mutex::new(listener)));
    }

    /// Adds a device backend; its `init` registers its fds.
    pub fn add(&mut self, subscriber: Subscriber) {
        self.manager.add_subscriber(subscriber);
    }

    /// Dispatches events until the VM ends or a control request arrives.
    pub fn run(&mut self) -> Result<LoopEvent, EventLoopError> {
        loop {
            if lock(&self.watcher).ended {
                return Ok(LoopEvent::End);
            }
            if let Some(request) = self.control.as_ref().and_then(|c| lock(c).take()) {
                return Ok(LoopEvent::Control(request));
            }
            self.manager.run().map_err(EventLoopError::Run)?;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_reason_wins_and_a_bare_trigger_means_reset() {
        let end = VmEndSignal::new().unwrap();
        assert_eq!(end.reason(), VmEnd::Reset);
        end.signal(VmEnd::Shutdown);
        end.signal(VmEnd::Error("late".into()));
        assert_eq!(end.reason(), VmEnd::Shutdown);
    }

    #[test]
    fn a_control_request_makes_the_loop_return_it() {
        use crate::rpc::{self, ControlListener};
        use std::io::Write;
        use std::os::fd::IntoRawFd;
        let end = VmEndSignal::new().unwrap();
        let mut event_loop = EventLoop::new(end.clone()).unwrap();
        let (client, theirs) = rpc::channel().unwrap();
        // SAFETY: `theirs` is an open socket, handed over whole.
        event_loop.add_control(unsafe { ControlListener::adopt(theirs.into_raw_fd()) });
        // The client's end, written raw: what ControlClient::call sends.
        let mut stream = client.into_stream();
        stream.write_all(b"{\"op\":\"pause\"}\n").unwrap();
        assert_eq!(
            event_loop.run().unwrap(),
            LoopEvent::Control(ControlRequest::Pause)
        );
        end.signal(VmEnd::Stop);
        assert_eq!(event_loop.run().unwrap(), LoopEvent::End);
    }

    #[test]
    fn the_loop_returns_once_the_trigger_fires() {
        let end = VmEndSignal::new().unwrap();
        let mut event_loop = EventLoop::new(end.clone()).unwrap();
        end.trigger().unwrap().write(1).unwrap();
        assert_eq!(event_loop.run().unwrap(), LoopEvent::End);
        assert_eq!(end.reason(), VmEnd::Reset);
    }
}
