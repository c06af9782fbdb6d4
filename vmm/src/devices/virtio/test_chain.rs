//! Test support: one descriptor chain in a mock guest memory, as a
//! driver would post it, for the devices' parser and device tests.
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::RawDescriptor;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::GuestAddress;

use super::GuestMemoryMmap;

/// A 1 MiB guest memory from address 0.
pub(crate) fn memory() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap()
}

/// One buffer of a chain: guest address, length, device-writable.
#[derive(Clone, Copy)]
pub(crate) struct Buf(pub u64, pub u32, pub bool);

/// The chain's descriptors, linked in order (descriptor `i` is at table
/// index `i + 1`, as `MockSplitQueue::add_desc_chains` places them).
pub(crate) fn descriptors(bufs: &[Buf]) -> Vec<RawDescriptor> {
    let last = bufs.len() - 1;
    bufs.iter()
        .enumerate()
        .map(|(i, &Buf(addr, len, writable))| {
            let mut flags = if writable { VRING_DESC_F_WRITE } else { 0 };
            if i < last {
                flags |= VRING_DESC_F_NEXT;
            }
            RawDescriptor::from(Descriptor::new(addr, len, flags as u16, i as u16 + 1))
        })
        .collect()
}

/// Posts `bufs` as one chain on a mock queue and pops it as the device
/// would.
pub(crate) fn pop_chain<'m>(
    mem: &'m GuestMemoryMmap,
    bufs: &[Buf],
) -> DescriptorChain<&'m GuestMemoryMmap> {
    let queue = MockSplitQueue::new(mem, 16);
    queue.add_desc_chains(&descriptors(bufs), 0).unwrap();
    let mut queue: Queue = queue.create_queue().unwrap();
    queue.pop_descriptor_chain(mem).unwrap()
}
