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
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

use virtio_bindings::virtio_mmio::{VIRTIO_MMIO_INT_CONFIG, VIRTIO_MMIO_INT_VRING};
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueState, QueueT};
use vmm_sys_util::eventfd::EventFd;

use crate::logger::{error_limited, warn_limited};
use crate::report::one_line;

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

/// How a driver broke a queue's split-ring rules (virtio 1.2 §2.7) so that
/// nothing it offers on that queue can be trusted any more: the device
/// stops serving it and asks for a reset ([`refuse_queue`]).
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    /// The available ring cannot be read, or its index is more than the
    /// queue size ahead of the device's: each ring entry is one chain, so
    /// a driver never has more available than the queue holds.
    #[error("the available ring of a queue of {size} is unusable")]
    AvailRing {
        /// The queue's size.
        size: u16,
        /// What virtio-queue found wrong.
        #[source]
        cause: virtio_queue::Error,
    },
    /// A chain that breaks off before a descriptor without NEXT: its
    /// `next` fields loop or name a descriptor past the table, or its
    /// lengths add up past 4 GiB, where virtio-queue stops reading it
    /// (§2.7.5.2: no chain holds more than 4 GiB, "this implies that
    /// loops in the descriptor chain are forbidden").
    #[error(
        "descriptor chain {head} does not end: it loops, leaves the table of {size} descriptors or holds more than 4 GiB"
    )]
    Unterminated {
        /// The chain's head descriptor.
        head: u16,
        /// The queue's size.
        size: u16,
    },
}

/// The next chain the driver made available on `queue`, for a device's
/// serving loop: `None` when there is none, when the driver broke the
/// queue ([`QueueError`]: the device is refused, see [`refuse_queue`]), and
/// for every queue of a device that needs a reset. `device` names the
/// device in the log.
pub fn next_chain<'m>(
    device: &str,
    queue: &mut Queue,
    mem: &'m GuestMemoryMmap,
    interrupt: &Interrupt,
) -> Option<DescriptorChain<&'m GuestMemoryMmap>> {
    if interrupt.needs_reset() {
        return None;
    }
    pop_chain(queue, mem).unwrap_or_else(|err| {
        refuse_queue(device, interrupt, &err);
        None
    })
}

/// Takes the next chain the driver made available on `queue`: `Ok(None)`
/// when there is none (or the driver never set the queue up), an error
/// when the ring or the chain breaks the rules. Unlike virtio-queue's
/// `pop_descriptor_chain`, which logs a broken ring on every call,
/// unlimited, and then reports an empty one, the caller learns of it and
/// can stop serving the queue.
fn pop_chain<'m>(
    queue: &mut Queue,
    mem: &'m GuestMemoryMmap,
) -> Result<Option<DescriptorChain<&'m GuestMemoryMmap>>, QueueError> {
    let size = queue.size();
    let chain = match queue.iter(mem) {
        Ok(mut available) => available.next(),
        Err(virtio_queue::Error::QueueNotReady) => None,
        Err(cause) => return Err(QueueError::AvailRing { size, cause }),
    };
    let Some(chain) = chain else {
        return Ok(None);
    };
    // virtio-queue stops a chain after `size` descriptors, at a `next`
    // past the table and past 4 GiB: a last descriptor that still names
    // a next one means it stopped the chain.
    if chain.clone().last().is_some_and(|d| d.has_next()) {
        return Err(QueueError::Unterminated {
            head: chain.head_index(),
            size,
        });
    }
    Ok(Some(chain))
}

/// What a device does when its driver broke a queue: says so (rate
/// limited: a driver can repeat it at will) and sets DEVICE_NEEDS_RESET
/// (§2.1.2). The device then serves nothing until the driver resets it
/// (see [`Interrupt::needs_reset`]).
fn refuse_queue(device: &str, interrupt: &Interrupt, err: &QueueError) {
    warn_limited!(
        "{device}: the driver broke a queue; the device needs a reset: {}",
        one_line(err)
    );
    if let Err(err) = interrupt.signal_needs_reset() {
        error_limited!("{device}: cannot tell the driver the device needs a reset: {err}");
    }
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
/// KVM as an irqfd for the device's IRQ line; and DEVICE_NEEDS_RESET,
/// which the device sets from the event loop and the transport shows in
/// its status register.
#[derive(Debug)]
pub struct Interrupt {
    status: AtomicU32,
    needs_reset: AtomicBool,
    evt: EventFd,
}

impl Interrupt {
    /// A quiet interrupt that raises its line by writing `evt`.
    pub fn new(evt: EventFd) -> Self {
        Self {
            status: AtomicU32::new(0),
            needs_reset: AtomicBool::new(false),
            evt,
        }
    }

    /// The device cannot go on until the driver resets it (§2.1.2): the
    /// transport's status shows DEVICE_NEEDS_RESET, and the driver gets a
    /// configuration change interrupt to look at it.
    pub fn signal_needs_reset(&self) -> io::Result<()> {
        self.needs_reset.store(true, Ordering::Release);
        self.signal_config_change()
    }

    /// Whether the device has asked for a reset since the last one: a
    /// device that has serves nothing more.
    pub fn needs_reset(&self) -> bool {
        self.needs_reset.load(Ordering::Acquire)
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

    /// Clears every cause and DEVICE_NEEDS_RESET, as a device reset does.
    fn clear(&self) {
        self.status.store(0, Ordering::Release);
        self.needs_reset.store(false, Ordering::Release);
    }

    /// The irqfd.
    pub fn event(&self) -> &EventFd {
        &self.evt
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use virtio_queue::desc::RawDescriptor;
    use virtio_queue::desc::split::Descriptor;
    use virtio_queue::mock::MockSplitQueue;
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    const NEXT: u16 = VRING_DESC_F_NEXT as u16;
    const WRITE: u16 = VRING_DESC_F_WRITE as u16;

    /// A mock queue of 16 in `mem` holding `descs` (table index = position).
    fn queue_with(mem: &GuestMemoryMmap, descs: &[(u64, u32, u16, u16)]) -> Queue {
        let mock = MockSplitQueue::new(mem, 16);
        let raw: Vec<_> = descs
            .iter()
            .map(|&(addr, len, flags, next)| {
                RawDescriptor::from(Descriptor::new(addr, len, flags, next))
            })
            .collect();
        mock.add_desc_chains(&raw, 0).unwrap();
        mock.create_queue().unwrap()
    }

    fn interrupt() -> Interrupt {
        Interrupt::new(EventFd::new(EFD_NONBLOCK).unwrap())
    }

    /// The chain is refused, the device asks for a reset (status and a
    /// configuration interrupt), and serves nothing more.
    fn assert_refused(mem: &GuestMemoryMmap, mut queue: Queue, interrupt: &Interrupt) {
        assert!(next_chain("test", &mut queue, mem, interrupt).is_none());
        assert!(interrupt.needs_reset());
        assert_eq!(interrupt.status(), VIRTIO_MMIO_INT_CONFIG);
        assert_eq!(interrupt.event().read().unwrap(), 1);
        let mut good = queue_with(mem, &[(0x1000, 16, 0, 0)]);
        assert!(next_chain("test", &mut good, mem, interrupt).is_none());
    }

    #[test]
    fn a_well_formed_chain_is_served() {
        let mem = test_chain::memory();
        let mut queue = queue_with(&mem, &[(0x1000, 16, NEXT, 1), (0x2000, 1, WRITE, 0)]);
        let interrupt = interrupt();
        let chain = next_chain("test", &mut queue, &mem, &interrupt).unwrap();
        assert_eq!(chain.count(), 2);
        assert!(!interrupt.needs_reset());
    }

    #[test]
    fn a_chain_that_loops_back_to_its_head_needs_a_reset() {
        let mem = test_chain::memory();
        let looping = [(0x1000, 16, NEXT, 1), (0x2000, 512, NEXT | WRITE, 0)];
        let mut queue = queue_with(&mem, &looping);
        let err = pop_chain(&mut queue, &mem).unwrap_err();
        assert!(
            matches!(err, QueueError::Unterminated { head: 0, size: 16 }),
            "{err}"
        );
        assert_refused(&mem, queue_with(&mem, &looping), &interrupt());
    }

    #[test]
    fn a_next_past_the_table_needs_a_reset() {
        let mem = test_chain::memory();
        let queue = queue_with(&mem, &[(0x1000, 16, NEXT, 16)]);
        assert_refused(&mem, queue, &interrupt());
    }

    #[test]
    fn a_chain_whose_lengths_wrap_needs_a_reset() {
        let mem = test_chain::memory();
        let wrapping = [
            (0x1000, 16, NEXT, 1),
            (0xffff_ffff_ffff_ff00, u32::MAX, NEXT | WRITE, 2),
            (0x2000, 1, WRITE, 0),
        ];
        assert_refused(&mem, queue_with(&mem, &wrapping), &interrupt());
    }

    #[test]
    fn an_available_index_past_the_queue_size_needs_a_reset() {
        let mem = test_chain::memory();
        let mock = MockSplitQueue::new(&mem, 16);
        mock.avail().idx().store(0x8000);
        let mut queue: Queue = mock.create_queue().unwrap();
        let err = pop_chain(&mut queue, &mem).unwrap_err();
        assert!(
            matches!(err, QueueError::AvailRing { size: 16, .. }),
            "{err}"
        );
        assert_refused(&mem, mock.create_queue().unwrap(), &interrupt());
    }

    #[test]
    fn a_queue_the_driver_left_unready_is_empty_not_broken() {
        let mem = test_chain::memory();
        let mut queue = queue_with(&mem, &[(0x1000, 16, 0, 0)]);
        queue.set_ready(false);
        let interrupt = interrupt();
        assert!(next_chain("test", &mut queue, &mem, &interrupt).is_none());
        assert!(!interrupt.needs_reset());
    }

    #[test]
    fn a_reset_clears_the_request_for_one() {
        let interrupt = interrupt();
        interrupt.signal_needs_reset().unwrap();
        interrupt.clear();
        assert!(!interrupt.needs_reset());
        assert_eq!(interrupt.status(), 0);
    }

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
