//! The virtio-net device: its features and configuration space,
//! activation and reset, and the moving of frames between its queues and
//! the tap.
use std::io::ErrorKind;
use std::sync::Arc;

use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ids::VIRTIO_ID_NET;
use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_GUEST_TSO6,
    VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6, VIRTIO_NET_F_MAC, VIRTIO_NET_F_MRG_RXBUF,
};
use virtio_queue::{Queue, QueueOwnedT, QueueState, QueueT};
use vm_memory::Bytes;
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use super::super::{
    ActivateError, GuestMemoryMmap, Interrupt, VirtioDevice, fixed_queues, ignore_config_write,
    next_chain, read_config_space,
};
use super::request::{MAX_FRAME_LEN, NET_HDR_LEN, NUM_BUFFERS_OFFSET, read_tx_frame};
use super::tap::{Tap, TapError};
use crate::logger::{error_limited, warn_limited};
use crate::report::one_line;

/// How the log names this device.
const DEVICE: &str = "virtio-net";

/// Size of each queue.
pub const QUEUE_SIZE: u16 = 256;
pub(super) const RX: usize = 0;
pub(super) const TX: usize = 1;
/// The MAC is the whole configuration space the device offers.
const CONFIG_LEN: usize = 6;

/// The guest's NIC, as `VmConfig` describes it. The supervisor creates
/// the tap and attaches it to the bridge, in the host's namespaces; the
/// VM process is handed the open tap (`kiln __vm --tap-fd N`) and checks
/// it is the one named here.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct NetConfig {
    /// The tap's name (it exists while the VM process holds it open).
    pub tap: String,
    /// The NIC's MAC address, which the guest reads from the
    /// configuration space (§5.1.4).
    pub mac: [u8; 6],
    /// The bridge the supervisor attaches the tap to, which must exist;
    /// none leaves the tap on no bridge.
    pub bridge: Option<String>,
}

/// What the device holds between activation and reset.
pub(super) struct Active {
    mem: GuestMemoryMmap,
    queues: [Queue; 2],
    interrupt: Arc<Interrupt>,
    mergeable: bool,
}

/// A virtio network device.
pub struct Net {
    pub(super) tap: Tap,
    pub(super) mac: [u8; 6],
    pub(super) queue_evts: [EventFd; 2],
    pub(super) active: Option<Active>,
    /// A frame read from the tap that did not fit the receive queue yet.
    rx_frame: Vec<u8>,
    pub(super) rx_len: usize,
    /// Whether the loop watches the tap (not while a frame waits for room).
    pub(super) tap_watched: bool,
    /// The `TUN_F_*` offloads to set on the tap: activation runs on a vCPU
    /// thread, whose seccomp filter has no tap ioctl, so the event loop
    /// sets them.
    offload_due: Option<u32>,
    tx_frame: Vec<u8>,
}

impl Net {
    /// A device whose host end is `tap` (made with a [`NET_HDR_LEN`]-byte
    /// header), with the MAC address `mac`.
    pub fn new(tap: Tap, mac: [u8; 6]) -> Result<Self, TapError> {
        let evt = || {
            EventFd::new(EFD_NONBLOCK).map_err(|source| TapError::EventFd {
                name: tap.name().to_string(),
                source,
            })
        };
        Ok(Self {
            queue_evts: [evt()?, evt()?],
            tap,
            mac,
            active: None,
            rx_frame: vec![0; MAX_FRAME_LEN],
            rx_len: 0,
            tap_watched: false,
            offload_due: None,
            tx_frame: Vec::with_capacity(MAX_FRAME_LEN),
        })
    }

    /// The tap that is the NIC's host end.
    pub fn tap(&self) -> &Tap {
        &self.tap
    }

    /// The MAC address the guest sees.
    pub fn mac(&self) -> [u8; 6] {
        self.mac
    }

    /// Moves frames from the tap to the guest until either has none left;
    /// interrupts the driver once if any arrived.
    pub(super) fn receive(&mut self) {
        let Some(active) = &mut self.active else {
            return;
        };
        let mut delivered = false;
        loop {
            if self.rx_len == 0 {
                match self.tap.read_frame(&mut self.rx_frame) {
                    Ok(len) if len >= NET_HDR_LEN => self.rx_len = len,
                    // A frame shorter than its header is no frame.
                    Ok(_) => continue,
                    Err(err) if err.kind() == ErrorKind::WouldBlock => break,
                    Err(err) if err.kind() == ErrorKind::Interrupted => continue,
                    Err(err) => {
                        error_limited!("virtio-net: cannot read the tap: {err}");
                        break;
                    }
                }
            }
            match deliver(active, &mut self.rx_frame[..self.rx_len]) {
                Delivery::Delivered => {
                    delivered = true;
                    self.rx_len = 0;
                }
                Delivery::Dropped => self.rx_len = 0,
                Delivery::NoRoom => break,
            }
        }
        if delivered {
            signal(active);
        }
    }

    /// Sends every frame the driver has queued to the tap.
    pub(super) fn transmit(&mut self) {
        let Some(active) = &mut self.active else {
            return;
        };
        let mem = &active.mem;
        let mut sent = false;
        while let Some(chain) = next_chain(DEVICE, &mut active.queues[TX], mem, &active.interrupt) {
            let head = chain.head_index();
            if !read_tx_frame(mem, chain, &mut self.tx_frame) {
                warn_limited!("virtio-net: dropping malformed transmit chain {head}");
            } else if let Err(err) = self.tap.write_frame(&self.tx_frame) {
                // As a NIC would, the frame is lost and the guest's stack
                // retransmits what matters.
                if err.kind() != ErrorKind::WouldBlock {
                    warn_limited!("virtio-net: cannot write to the tap: {err}");
                }
            }
            if let Err(err) = active.queues[TX].add_used(mem, head, 0) {
                warn_limited!("virtio-net: cannot return transmit chain {head}: {err}");
                break;
            }
            sent = true;
        }
        if sent {
            signal(active);
        }
    }

    pub(super) fn apply_offload(&mut self) {
        if let Some(flags) = self.offload_due.take()
            && let Err(err) = self.tap.set_offload(flags)
        {
            error_limited!("virtio-net: {}", one_line(&err));
        }
    }
}

/// What became of a received frame.
enum Delivery {
    Delivered,
    /// The frame can never fit (or the ring is broken): it is lost.
    Dropped,
    /// Not enough buffers now: the frame waits for more.
    NoRoom,
}

/// Writes `frame` (header first) into the receive queue: one buffer, or
/// as many as it needs with mergeable buffers.
fn deliver(active: &mut Active, frame: &mut [u8]) -> Delivery {
    let mem = &active.mem;
    let queue = &mut active.queues[RX];
    // The chains the frame goes into, each with its writable buffers.
    let mut chains: Vec<(u16, Vec<(vm_memory::GuestAddress, usize)>)> = Vec::new();
    let mut room = 0;
    while room < frame.len() {
        let Some(chain) = next_chain(DEVICE, queue, mem, &active.interrupt) else {
            break;
        };
        let buffers: Vec<_> = chain
            .clone()
            .filter(|desc| desc.is_write_only())
            .map(|desc| (desc.addr(), desc.len() as usize))
            .collect();
        room += buffers.iter().map(|(_, len)| len).sum::<usize>();
        chains.push((chain.head_index(), buffers));
        if !active.mergeable {
            break;
        }
    }
    if room < frame.len() {
        // Too few buffers: give them back and wait, unless the ring could
        // never hold the frame (every slot taken, or one buffer without
        // mergeable buffers), which drops it.
        let hopeless = !active.mergeable || chains.len() >= usize::from(queue.size());
        if hopeless {
            warn_limited!(
                "virtio-net: dropping a {}-byte frame: the receive buffers hold {room}",
                frame.len()
            );
            return_unused(active, &chains);
            return Delivery::Dropped;
        }
        for _ in &chains {
            queue.go_to_previous_position();
        }
        return Delivery::NoRoom;
    }
    let count = u16::try_from(chains.len()).unwrap_or(u16::MAX);
    frame[NUM_BUFFERS_OFFSET..NUM_BUFFERS_OFFSET + 2].copy_from_slice(&count.to_le_bytes());
    let mut rest: &[u8] = frame;
    let mut used = Vec::with_capacity(chains.len());
    for (head, buffers) in &chains {
        let mut written = 0;
        for &(addr, len) in buffers {
            let n = len.min(rest.len());
            if mem.write_slice(&rest[..n], addr).is_err() {
                warn_limited!("virtio-net: receive buffer {head} is outside guest memory");
                return_unused(active, &chains);
                return Delivery::Dropped;
            }
            rest = &rest[n..];
            written += n;
        }
        used.push((*head, written as u32));
    }
    // Only whole frames become visible: the used entries go in once every
    // byte and the header's count are written.
    for (head, len) in used {
        if let Err(err) = active.queues[RX].add_used(&active.mem, head, len) {
            warn_limited!("virtio-net: cannot return receive chain {head}: {err}");
            return Delivery::Dropped;
        }
    }
    Delivery::Delivered
}

/// Returns chains taken for a frame that was dropped, empty.
fn return_unused(active: &mut Active, chains: &[(u16, Vec<(vm_memory::GuestAddress, usize)>)]) {
    for (head, _) in chains {
        if let Err(err) = active.queues[RX].add_used(&active.mem, *head, 0) {
            warn_limited!("virtio-net: cannot return receive chain {head}: {err}");
        }
    }
}

fn signal(active: &Active) {
    if let Err(err) = active.interrupt.signal_used_queue() {
        error_limited!("virtio-net: cannot interrupt the driver: {err}");
    }
}

/// The features offered: the header's offloads both ways, mergeable
/// receive buffers, and the MAC.
fn offered_features() -> u64 {
    [
        VIRTIO_F_VERSION_1,
        VIRTIO_NET_F_MAC,
        VIRTIO_NET_F_MRG_RXBUF,
        VIRTIO_NET_F_CSUM,
        VIRTIO_NET_F_HOST_TSO4,
        VIRTIO_NET_F_HOST_TSO6,
        VIRTIO_NET_F_GUEST_CSUM,
        VIRTIO_NET_F_GUEST_TSO4,
        VIRTIO_NET_F_GUEST_TSO6,
    ]
    .into_iter()
    .fold(0, |bits, feature| bits | 1 << feature)
}

/// The tap offloads (`TUN_F_*`) the driver's acked features allow: what
/// the guest takes unchecksummed or unsegmented.
fn tap_offload(acked: u64) -> u32 {
    let has = |feature: u32| acked & (1 << feature) != 0;
    if !has(VIRTIO_NET_F_GUEST_CSUM) {
        // Segmentation offload needs checksum offload (§5.1.3.1).
        return 0;
    }
    let mut flags = libc::TUN_F_CSUM;
    if has(VIRTIO_NET_F_GUEST_TSO4) {
        flags |= libc::TUN_F_TSO4;
    }
    if has(VIRTIO_NET_F_GUEST_TSO6) {
        flags |= libc::TUN_F_TSO6;
    }
    flags
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_NET
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE; 2]
    }

    fn queue_events(&self) -> &[EventFd] {
        &self.queue_evts
    }

    fn features(&self) -> u64 {
        offered_features()
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_space(&self.mac[..CONFIG_LEN], offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // The MAC is writable only with VIRTIO_NET_F_CTRL_MAC_ADDR's
        // legacy path, which is not offered (§5.1.4.2).
        ignore_config_write("virtio-net", offset, data);
    }

    fn activate(
        &mut self,
        acked_features: u64,
        mem: GuestMemoryMmap,
        queues: Vec<Queue>,
        interrupt: Arc<Interrupt>,
    ) -> Result<(), ActivateError> {
        let queues = fixed_queues(queues)?;
        self.active = Some(Active {
            mem,
            queues,
            interrupt,
            mergeable: acked_features & (1 << VIRTIO_NET_F_MRG_RXBUF) != 0,
        });
        self.offload_due = Some(tap_offload(acked_features));
        // The event loop sets the offloads, starts watching the tap and
        // sends what the driver queued before activation.
        if let Err(err) = self.queue_evts[TX].write(1) {
            error_limited!("virtio-net: cannot wake the transmit queue: {err}");
        }
        Ok(())
    }

    fn reset(&mut self) {
        self.active = None;
        self.rx_len = 0;
    }

    fn queue_states(&self) -> Vec<QueueState> {
        self.active
            .iter()
            .flat_map(|active| active.queues.iter().map(Queue::state))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
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
        let active = active(mem, &queue);
        (queue, active)
    }

    /// A running device whose receive queue is `rx`.
    fn active(mem: &GuestMemoryMmap, rx: &MockSplitQueue<'_, GuestMemoryMmap>) -> Active {
        let tx = MockSplitQueue::create(mem, GuestAddress(0x30_0000), 16);
        Active {
            mem: mem.clone(),
            queues: [rx.create_queue().unwrap(), tx.create_queue().unwrap()],
            interrupt: Arc::new(Interrupt::new(EventFd::new(EFD_NONBLOCK).unwrap())),
            mergeable: true,
        }
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
    fn a_receive_chain_that_loops_needs_a_reset_and_takes_no_frame() {
        let mem = memory();
        let queue = MockSplitQueue::new(&mem, 16);
        let flags = (VRING_DESC_F_WRITE | VRING_DESC_F_NEXT) as u16;
        let looping = Descriptor::new(BUFFERS, 4096, flags, 0);
        queue
            .add_desc_chains(&[RawDescriptor::from(looping)], 0)
            .unwrap();
        let mut active = active(&mem, &queue);
        let mut sent = frame(100);
        assert!(!matches!(
            deliver(&mut active, &mut sent),
            Delivery::Delivered
        ));
        assert!(active.interrupt.needs_reset());
        assert!(used(&queue).is_empty());
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
}
