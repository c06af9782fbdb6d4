//! Emulated devices. A device never sees a KVM file descriptor: it is handed
//! guest memory and an interrupt `EventFd` (the IOAPIC, where its routes
//! go: [`ioapic::MsiRouter`]), and is reached through a [`bus::Bus`].
pub mod bus;
pub mod i8042;
pub mod init_port;
pub mod ioapic;
pub mod persist;
pub mod serial;
pub mod virtio;

use std::sync::{Mutex, MutexGuard};

use vmm_sys_util::eventfd::EventFd;

/// Locks a device shared with the event loop, recovering from a poisoned
/// lock like [`bus::Bus`] does: a device's state is a set of registers that
/// stays consistent between accesses, and the panic that poisoned it has
/// already ended the thread that caused it.
pub fn lock<T: ?Sized>(device: &Mutex<T>) -> MutexGuard<'_, T> {
    device
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The vm-superio `Trigger` behind the legacy devices: writing the `EventFd`
/// raises the IRQ line it is registered for as an irqfd (serial) or wakes
/// the VMM (i8042 reset).
pub struct EventFdTrigger(EventFd);

impl EventFdTrigger {
    /// Wraps `evt`; the VMM keeps a clone registered with KVM or its event loop.
    pub fn new(evt: EventFd) -> Self {
        Self(evt)
    }
}

impl vm_superio::Trigger for EventFdTrigger {
    type E = std::io::Error;

    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}
