//! Virtio devices (virtio 1.2) and their MMIO transport.
//!
//! A device implements [`VirtioDevice`]; [`mmio::MmioTransport`] exposes it
//! to the guest through the register layout of virtio 1.2 §4.2.2 and hands
//! it guest memory, its queues and an [`Interrupt`] once the driver has set
//! DRIVER_OK. The device then serves its queues from the event loop, woken by
//! its queue `EventFd`s, which the VMM registers with KVM as ioeventfds.

pub mod block;
#[cfg(any(test, feature = "fuzzing"))]
mod fuzzing;
pub mod mmio;
pub mod net;
#[cfg(test)]
pub(crate) mod test_chain;
pub mod vsock;

use std::io;
use std::sync::atomic::{AtomicU32, Ordering};

use virtio_bindings::virtio_mmio::{VIRTIO_MMIO_INT_CONFIG, VIRTIO_MMIO_INT_VRING};
use virtio_queue::{Queue, QueueState};
use vmm_sys_util::eventfd::EventFd;

use crate::logger::warn_limited;

/// Guest memory as devices see it.
pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<()>;

/// Errors a device reports when the driver activates it.
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    /// The transport handed over a different number of queues than the device has.
    #[error("the device has {expected} queue(s), the driver set up {found}")]
    QueueCount {
        /// The device's number of queues.
        expected: usize,
        /// The number handed over.
        found: usize,
    },
}

/// The queues the transport hands a device with exactly `N` of them.
pub fn fixed_queues<const N: usize>(queues: Vec<Queue>) -> Result<[Queue; N], ActivateError> {
    <[Queue; N]>::try_from(queues).map_err(|queues| ActivateError::QueueCount {
        expected: N,
        found: queues.len(),
    })
}

/// Reads `data.len()` bytes of the configuration space `config` at
/// `offset`; bytes past the fields the device defines read as zero.
pub fn read_config_space(config: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    let start = usize::try_from(offset)
        .unwrap_or(usize::MAX)
        .min(config.len());
    let available = &config[start..];
    let len = available.len().min(data.len());
    data[..len].copy_from_slice(&available[..len]);
}

/// What a device whose configuration space is read-only does with a
/// driver's write to it: says so, and ignores it.
pub fn ignore_config_write(device: &str, offset: u64, data: &[u8]) {
    warn_limited!(
        "{device}: ignoring a {}-byte write to read-only config offset {offset:#x}",
        data.len()
    );
}

/// A virtio device, independent of the transport that exposes it.
pub trait VirtioDevice: Send {
    /// The device ID (virtio 1.2 §5 "Device Types"), e.g. 2 for block.
    fn device_type(&self) -> u32;
    /// The maximum size of each queue; its length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// The `EventFd` the driver's notification of each queue writes
    /// (same order as [`queue_max_sizes`](Self::queue_max_sizes)).
    fn queue_events(&self) -> &[EventFd];
    /// The feature bits the device offers.
    fn features(&self) -> u64;
    /// Reads device configuration space at `offset`.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes device configuration space at `offset`.
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// Starts the device with the features the driver accepted and the queues it set up.
    fn activate(
        &mut self,
        acked_features: u64,
        mem: GuestMemoryMmap,
        queues: Vec<Queue>,
        interrupt: std::sync::Arc<Interrupt>,
    ) -> Result<(), ActivateError>;
    /// Stops the device and forgets the queues and memory it was activated with.
    fn reset(&mut self);
    /// Where the running device stands in each of its queues, for a
    /// snapshot; empty when it has not been activated.
    fn queue_states(&self) -> Vec<QueueState>;
}

/// The interrupt of one virtio device: the InterruptStatus bits of its
/// transport (virtio 1.2 §4.2.2) and the `EventFd` the VMM registers with
/// KVM as an irqfd for the device's IRQ line.
#[derive(Debug)]
pub struct Interrupt {
    status: AtomicU32,
    evt: EventFd,
}

impl Interrupt {
    /// A quiet interrupt that raises its line by writing `evt`.
    pub fn new(evt: EventFd) -> Self {
        Self {
            status: AtomicU32::new(0),
            evt,
        }
    }

    /// The device has put buffers in a used ring.
    pub fn signal_used_queue(&self) -> io::Result<()> {
        self.signal(VIRTIO_MMIO_INT_VRING)
    }

    /// The device's configuration space has changed, or it needs a reset.
    pub fn signal_config_change(&self) -> io::Result<()> {
        self.signal(VIRTIO_MMIO_INT_CONFIG)
    }

    fn signal(&self, bit: u32) -> io::Result<()> {
        self.status.fetch_or(bit, Ordering::AcqRel);
        self.evt.write(1)
    }

    /// The pending causes (InterruptStatus).
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::Acquire)
    }

    /// Clears the causes the driver has handled (InterruptACK).
    pub fn acknowledge(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::AcqRel);
    }

    /// Sets the pending causes a snapshot saved, and raises the line again
    /// if there are any: the guest may not have seen it before the
    /// snapshot (see `IrqLines` in the builder). A driver that had seen it
    /// handles the causes again and finds no new used buffers.
    fn restore(&self, bits: u32) -> io::Result<()> {
        self.status.store(bits, Ordering::Release);
        if bits == 0 {
            return Ok(());
        }
        self.evt.write(1)
    }

    /// Clears every cause, as a device reset does.
    fn clear(&self) {
        self.status.store(0, Ordering::Release);
    }

    /// The irqfd.
    pub fn event(&self) -> &EventFd {
        &self.evt
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    #[test]
    fn a_restored_pending_interrupt_raises_its_line_again_and_a_quiet_one_does_not() {
        let interrupt = Interrupt::new(EventFd::new(EFD_NONBLOCK).unwrap());
        interrupt.restore(0).unwrap();
        assert!(interrupt.event().read().is_err(), "a quiet line stays low");
        interrupt.restore(VIRTIO_MMIO_INT_VRING).unwrap();
        assert_eq!(interrupt.event().read().unwrap(), 1);
        assert_eq!(interrupt.status(), VIRTIO_MMIO_INT_VRING);
    }
}
