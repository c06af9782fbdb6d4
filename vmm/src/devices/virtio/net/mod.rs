//! virtio-net (virtio 1.2 §5.1, "Network Device") over a tap device.
//!
//! Two queues (§5.1.2): receiveq (frames for the guest) and transmitq
//! (frames from it); no control queue, no multiqueue. Every frame on
//! either queue starts with a 12-byte `virtio_net_hdr_v1` (§5.1.6), and
//! the tap is opened with a header of the same size, so the header goes
//! between guest and host stack as it is: the guest's checksum and TSO
//! offloads (CSUM, HOST_TSO4/6) reach the host's stack unsplit, and the
//! host hands the guest unsplit, uncheckummed frames exactly when the
//! driver took GUEST_CSUM and GUEST_TSO4/6 (`TUNSETOFFLOAD`, set from the
//! acked features).
//!
//! Receive uses mergeable buffers (VIRTIO_NET_F_MRG_RXBUF, §5.1.6.3.2):
//! Linux then posts page-sized buffers instead of 64 KiB ones per slot
//! (what big frames without MRG_RXBUF need), and a frame spans as many
//! as it needs, their count in the header's `num_buffers`. A frame that
//! finds too few buffers waits, and the tap is not read until the driver
//! adds more: the tap's own queue then holds (and eventually drops)
//! frames, as a NIC's ring does.
//!
//! The configuration space is the MAC (VIRTIO_NET_F_MAC, §5.1.4); without
//! VIRTIO_NET_F_STATUS the link is always up. The fast path has no rate
//! limiter: each event moves every frame there is room for.
pub mod tap;

use std::io::ErrorKind;
use std::sync::Arc;

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ids::VIRTIO_ID_NET;
use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_GUEST_TSO6,
    VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6, VIRTIO_NET_F_MAC, VIRTIO_NET_F_MRG_RXBUF,
};
use virtio_queue::{Queue, QueueOwnedT, QueueState, QueueT};
use vm_memory::Bytes;
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use super::{
    ActivateError, GuestMemoryMmap, Interrupt, VirtioDevice, fixed_queues, ignore_config_write,
    read_config_space,
};
use tap::{Tap, TapError};

/// Size of each queue.
pub const QUEUE_SIZE: u16 = 256;
const RX: usize = 0;
const TX: usize = 1;
/// Event-loop token of the tap (the queues' are their indices).
const TAP_TOKEN: u32 = 2;
/// `struct virtio_net_hdr_v1` (§5.1.6): flags, gso_type, hdr_len,
/// gso_size, csum_start, csum_offset, num_buffers. With VERSION_1 it
/// always has `num_buffers`, mergeable buffers or not.
pub const NET_HDR_LEN: usize = 12;
/// Offset of `num_buffers` in the header.
const NUM_BUFFERS_OFFSET: usize = 10;
/// The largest frame either way: the header, a 64 KiB TSO/GSO segment
/// (its IP length field's limit), and an Ethernet header with a VLAN tag.
const MAX_FRAME_LEN: usize = NET_HDR_LEN + 65535 + 18;
/// The MAC is the whole configuration space the device offers.
const CONFIG_LEN: usize = 6;

/// The guest's NIC, as `VmConfig` describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetConfig {
    /// The tap to create (it exists while the VM does).
    pub tap: String,
    pub mac: [u8; 6],
    /// A bridge to attach the tap to, which must exist.
    pub bridge: Option<String>,
}

/// What the device holds between activation and reset.
struct Active {
    mem: GuestMemoryMmap,
    queues: [Queue; 2],
    interrupt: Arc<Interrupt>,
    mergeable: bool,
}

/// A virtio network device.
pub struct Net {
    tap: Tap,
    mac: [u8; 6],
    queue_evts: [EventFd; 2],
    active: Option<Active>,
    /// A frame read from the tap that did not fit the receive queue yet.
    rx_frame: Vec<u8>,
    rx_len: usize,
    /// Whether the loop watches the tap (not while a frame waits for room).
    tap_watched: bool,
    /// The `TUN_F_*` offloads to set on the tap: activation runs on a vCPU
    /// thread, whose seccomp filter has no tap ioctl, so the event loop
    /// sets them.
    offload_due: Option<u32>,
    tx_frame: Vec<u8>,
}

impl Net {
    /// A device whose host end is the tap `config.tap`.
    pub fn new(config: &NetConfig) -> Result<Self, TapError> {
        let tap = Tap::create(&config.tap, NET_HDR_LEN)?;
        let evt = || {
            EventFd::new(EFD_NONBLOCK).map_err(|source| TapError::Ioctl {
                name: config.tap.clone(),
                what: "an eventfd for its queues",
                source,
            })
        };
        Ok(Self {
            tap,
            mac: config.mac,
            queue_evts: [evt()?, evt()?],
            active: None,
            rx_frame: vec![0; MAX_FRAME_LEN],
            rx_len: 0,
            tap_watched: false,
            offload_due: None,
            tx_frame: Vec::with_capacity(MAX_FRAME_LEN),
        })
    }

    pub fn tap(&self) -> &Tap {
        &self.tap
    }

    pub fn mac(&self) -> [u8; 6] {
        self.mac
    }

    /// Moves frames from the tap to the guest until either has none left;
    /// interrupts the driver once if any arrived.
    fn receive(&mut self) {
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
                        warn(format_args!("cannot read the tap: {err}"));
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
    fn transmit(&mut self) {
        let Some(active) = &mut self.active else {
            return;
        };
        let mem = &active.mem;
        let mut sent = false;
        while let Some(chain) = active.queues[TX].pop_descriptor_chain(mem) {
            let head = chain.head_index();
            self.tx_frame.clear();
            let mut readable = true;
            for desc in chain {
                let len = desc.len() as usize;
                if desc.is_write_only() || self.tx_frame.len() + len > MAX_FRAME_LEN {
                    readable = false;
                    break;
                }
                let start = self.tx_frame.len();
                self.tx_frame.resize(start + len, 0);
                if mem
                    .read_slice(&mut self.tx_frame[start..], desc.addr())
                    .is_err()
                {
                    readable = false;
                    break;
                }
            }
            if !readable || self.tx_frame.len() < NET_HDR_LEN {
                warn(format_args!("dropping malformed transmit chain {head}"));
            } else if let Err(err) = self.tap.write_frame(&self.tx_frame) {
                // As a NIC would, the frame is lost and the guest's stack
                // retransmits what matters.
                if err.kind() != ErrorKind::WouldBlock {
                    warn(format_args!("cannot write to the tap: {err}"));
                }
            }
            if let Err(err) = active.queues[TX].add_used(mem, head, 0) {
                warn(format_args!("cannot return transmit chain {head}: {err}"));
                break;
            }
            sent = true;
        }
        if sent {
            signal(active);
        }
    }

    /// Watches the tap exactly while received frames can go somewhere.
    fn watch_tap(&mut self, ops: &mut EventOps) {
        let wanted = self.active.is_some() && self.rx_len == 0;
        if wanted == self.tap_watched {
            return;
        }
        let events = Events::with_data_raw(self.tap.fd(), TAP_TOKEN, EventSet::IN);
        let changed = if wanted {
            ops.add(events)
        } else {
            ops.remove(events)
        };
        match changed {
            Ok(()) => self.tap_watched = wanted,
            Err(err) => warn(format_args!("cannot change the tap's watch: {err:?}")),
        }
    }

    fn apply_offload(&mut self) {
        if let Some(flags) = self.offload_due.take()
            && let Err(err) = self.tap.set_offload(flags)
        {
            warn(format_args!("{err}"));
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
        let Some(chain) = queue.pop_descriptor_chain(mem) else {
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
            warn(format_args!(
                "dropping a {}-byte frame: the receive buffers hold {room}",
                frame.len()
            ));
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
                warn(format_args!(
                    "receive buffer {head} is outside guest memory"
                ));
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
            warn(format_args!("cannot return receive chain {head}: {err}"));
            return Delivery::Dropped;
        }
    }
    Delivery::Delivered
}

/// Returns chains taken for a frame that was dropped, empty.
fn return_unused(active: &mut Active, chains: &[(u16, Vec<(vm_memory::GuestAddress, usize)>)]) {
    for (head, _) in chains {
        if let Err(err) = active.queues[RX].add_used(&active.mem, *head, 0) {
            warn(format_args!("cannot return receive chain {head}: {err}"));
        }
    }
}

fn signal(active: &Active) {
    if let Err(err) = active.interrupt.signal_used_queue() {
        warn(format_args!("cannot interrupt the driver: {err}"));
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
            warn(format_args!("cannot wake the transmit queue: {err}"));
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

impl MutEventSubscriber for Net {
    fn init(&mut self, ops: &mut EventOps) {
        for (token, evt) in self.queue_evts.iter().enumerate() {
            if let Err(err) = ops.add(Events::with_data(evt, token as u32, EventSet::IN)) {
                warn(format_args!("cannot watch queue {token}: {err:?}"));
            }
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        self.apply_offload();
        match events.data() {
            token @ (0 | 1) => {
                // The count only says "at least one notification".
                let _ = self.queue_evts[token as usize].read();
                if token as usize == TX {
                    self.transmit();
                }
                // New receive buffers, or a just-activated device: a
                // waiting frame may fit now.
                self.receive();
            }
            TAP_TOKEN => self.receive(),
            _ => {}
        }
        self.watch_tap(ops);
    }
}

fn warn(what: std::fmt::Arguments<'_>) {
    eprintln!("kiln: virtio-net: {what}");
}

#[cfg(test)]
mod tests;
