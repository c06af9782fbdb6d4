use virtio_bindings::virtio_ring::VRING_DESC_F_WRITE;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::mock::MockSplitQueue;
use vm_memory::GuestAddress;

use super::*;

const BUFFERS: u64 = 0x1_0000;
const BUFFER_STRIDE: u64 = 0x1_0000;

fn memory() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x40_0000)]).unwrap()
}

/// A receive queue holding `count` single-buffer chains of `len` bytes,
/// as Linux posts them with mergeable buffers.
fn receive_queue<'a>(
    mem: &'a GuestMemoryMmap,
    count: u16,
    len: u32,
) -> (MockSplitQueue<'a, GuestMemoryMmap>, Active) {
    let queue = MockSplitQueue::new(mem, 16);
    let descriptors: Vec<RawDescriptor> = (0..count)
        .map(|i| {
            let addr = BUFFERS + u64::from(i) * BUFFER_STRIDE;
            RawDescriptor::from(Descriptor::new(addr, len, VRING_DESC_F_WRITE as u16, 0))
        })
        .collect();
    queue.build_multiple_desc_chains(&descriptors).unwrap();
    let tx = MockSplitQueue::create(mem, GuestAddress(0x30_0000), 16);
    let active = Active {
        mem: mem.clone(),
        queues: [queue.create_queue().unwrap(), tx.create_queue().unwrap()],
        interrupt: Arc::new(Interrupt::new(EventFd::new(EFD_NONBLOCK).unwrap())),
        mergeable: true,
    };
    (queue, active)
}

/// A frame of `len` bytes (header included) with a recognisable body.
fn frame(len: usize) -> Vec<u8> {
    let mut frame: Vec<u8> = (0..len).map(|i| (i % 253) as u8).collect();
    frame[..NET_HDR_LEN].fill(0);
    frame
}

fn used(queue: &MockSplitQueue<'_, GuestMemoryMmap>) -> Vec<(u32, u32)> {
    let count = queue.used().idx().load();
    (0..count)
        .map(|i| {
            let entry = queue.used().ring().ref_at(i.into()).unwrap().load();
            (entry.id(), entry.len())
        })
        .collect()
}

fn guest_bytes(mem: &GuestMemoryMmap, buffer: u64, len: usize) -> Vec<u8> {
    let mut bytes = vec![0; len];
    mem.read_slice(&mut bytes, GuestAddress(BUFFERS + buffer * BUFFER_STRIDE))
        .unwrap();
    bytes
}

#[test]
fn a_small_frame_takes_one_buffer_and_says_so() {
    let mem = memory();
    let (queue, mut active) = receive_queue(&mem, 4, 4096);
    let mut sent = frame(100);
    assert!(matches!(
        deliver(&mut active, &mut sent),
        Delivery::Delivered
    ));
    assert_eq!(used(&queue), [(0, 100)]);
    let got = guest_bytes(&mem, 0, 100);
    assert_eq!(u16::from_le_bytes([got[10], got[11]]), 1, "num_buffers");
    assert_eq!(got[NET_HDR_LEN..], sent[NET_HDR_LEN..]);
}

#[test]
fn a_large_frame_spans_mergeable_buffers_in_order() {
    let mem = memory();
    let (queue, mut active) = receive_queue(&mem, 8, 4096);
    let mut sent = frame(10_000);
    assert!(matches!(
        deliver(&mut active, &mut sent),
        Delivery::Delivered
    ));
    // Chains are numbered by their head descriptor: one descriptor each.
    assert_eq!(used(&queue), [(0, 4096), (1, 4096), (2, 1808)]);
    let mut got = guest_bytes(&mem, 0, 4096);
    got.extend(guest_bytes(&mem, 1, 4096));
    got.extend(guest_bytes(&mem, 2, 1808));
    assert_eq!(u16::from_le_bytes([got[10], got[11]]), 3, "num_buffers");
    assert_eq!(got[NET_HDR_LEN..], sent[NET_HDR_LEN..]);
}

#[test]
fn a_frame_waits_for_buffers_without_using_any() {
    let mem = memory();
    let (queue, mut active) = receive_queue(&mem, 2, 4096);
    let mut big = frame(10_000);
    assert!(matches!(deliver(&mut active, &mut big), Delivery::NoRoom));
    assert!(used(&queue).is_empty());
    // The buffers it looked at are still there for a frame that fits.
    let mut small = frame(60);
    assert!(matches!(
        deliver(&mut active, &mut small),
        Delivery::Delivered
    ));
    assert_eq!(used(&queue), [(0, 60)]);
}

#[test]
fn without_mergeable_buffers_a_frame_too_big_for_one_is_dropped() {
    let mem = memory();
    let (queue, mut active) = receive_queue(&mem, 4, 1526);
    active.mergeable = false;
    let mut big = frame(4000);
    assert!(matches!(deliver(&mut active, &mut big), Delivery::Dropped));
    // The buffer goes back empty, so the ring keeps moving.
    assert_eq!(used(&queue), [(0, 0)]);
    let mut fits = frame(1526);
    assert!(matches!(
        deliver(&mut active, &mut fits),
        Delivery::Delivered
    ));
    assert_eq!(used(&queue)[1], (1, 1526));
}

#[test]
fn tap_offloads_follow_the_guests_receive_features() {
    let bit = |f: u32| 1u64 << f;
    assert_eq!(tap_offload(0), 0);
    // TSO without checksum offload cannot be honoured.
    assert_eq!(tap_offload(bit(VIRTIO_NET_F_GUEST_TSO4)), 0);
    assert_eq!(tap_offload(bit(VIRTIO_NET_F_GUEST_CSUM)), libc::TUN_F_CSUM);
    assert_eq!(
        tap_offload(offered_features()),
        libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6
    );
}

#[test]
fn offered_features_are_version_1_with_mac_and_mergeable_buffers() {
    let features = offered_features();
    for feature in [VIRTIO_F_VERSION_1, VIRTIO_NET_F_MAC, VIRTIO_NET_F_MRG_RXBUF] {
        assert_ne!(features & (1 << feature), 0, "feature {feature}");
    }
    // No control queue, no multiqueue: two queues are all there is.
    assert_eq!(
        features & (1 << virtio_bindings::virtio_net::VIRTIO_NET_F_CTRL_VQ),
        0
    );
}
