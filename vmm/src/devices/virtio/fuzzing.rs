//! Descriptor chains made from a fuzzer's bytes, for the device parsers'
//! fuzz entry points (`fuzz/`, and the corpus replay that CI runs). The
//! bytes are what a hostile driver controls: the whole descriptor table
//! (addresses, lengths, flags and `next` links, loops and indirect tables
//! included), which descriptor heads the chain, and the guest memory the
//! descriptors point into.
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};

use super::GuestMemoryMmap;

/// The guest memory's size, from address 0: room for the queue's rings
/// at its start and [`PAYLOAD`] after them.
const MEMORY_SIZE: usize = 0x10_0000;
/// The queue's size, and so its descriptor table's length.
const QUEUE_SIZE: u16 = 16;
/// One descriptor in the table: le64 addr, le32 len, le16 flags, le16
/// next (virtio 1.2 §2.7.5).
const DESCRIPTOR_SIZE: usize = 16;
/// Where the bytes after the table and the head index go in guest memory.
pub const PAYLOAD: u64 = 0x1_0000;

/// Lays `data` out as the descriptor table (its first 256 bytes), the
/// head's index (the next byte) and guest memory from [`PAYLOAD`] (the
/// rest), posts the chain on a mock queue and hands it to `parse` as the
/// device would get it. Input too short for a table is zero-filled.
pub(crate) fn with_chain(
    data: &[u8],
    parse: impl FnOnce(&GuestMemoryMmap, DescriptorChain<&GuestMemoryMmap>),
) {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEMORY_SIZE)])
        .expect("a 1 MiB anonymous mapping");
    let queue = MockSplitQueue::new(&mem, QUEUE_SIZE);
    let table_len = usize::from(QUEUE_SIZE) * DESCRIPTOR_SIZE;
    let (table, rest) = data.split_at(data.len().min(table_len));
    mem.write_slice(table, queue.desc_table_addr())
        .expect("the table lies in guest memory");
    let (head, payload) = rest.split_first().unwrap_or((&0, &[]));
    let room = MEMORY_SIZE - PAYLOAD as usize;
    mem.write_slice(&payload[..payload.len().min(room)], GuestAddress(PAYLOAD))
        .expect("the payload lies in guest memory");
    let avail = queue.avail();
    avail
        .ring()
        .ref_at(0)
        .expect("the ring has QUEUE_SIZE entries")
        .store(u16::from(*head) % QUEUE_SIZE);
    avail.idx().store(1);
    let mut queue: Queue = queue.create_queue().expect("a valid mock queue");
    if let Some(chain) = queue.pop_descriptor_chain(&mem) {
        parse(&mem, chain);
    }
}
