//! A transport's part of a snapshot: its registers and the queues of the
//! device behind it, as the driver configured them and as far as the
//! running device had got in each. This is all of a virtio-blk or
//! virtio-vsock device's state (the devices keep none of their own).
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use virtio_bindings::virtio_config::{VIRTIO_CONFIG_S_DRIVER_OK, VIRTIO_CONFIG_S_NEEDS_RESET};
use virtio_queue::{Queue, QueueState};

use super::{MmioError, MmioTransport};
use crate::devices::lock;
use crate::devices::persist::Persist;
use crate::devices::virtio::{GuestMemoryMmap, VirtioDevice};

/// A virtqueue's configuration and ring positions (virtio-queue's own
/// state, given serde's shape here).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(remote = "QueueState")]
struct SavedQueue {
    max_size: u16,
    next_avail: u16,
    next_used: u16,
    event_idx_enabled: bool,
    size: u16,
    ready: bool,
    desc_table: u64,
    avail_ring: u64,
    used_ring: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct QueueSnapshot(#[serde(with = "SavedQueue")] QueueState);

/// A transport and its device's queues, as a snapshot stores them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransportState {
    /// What the device was, to check the restored one is the same.
    device_type: u32,
    device_features: u64,
    status: u32,
    driver_features: u64,
    queue_select: u32,
    device_features_select: u32,
    driver_features_select: u32,
    interrupt_status: u32,
    /// The driver's configuration of each queue.
    queues: Vec<QueueSnapshot>,
    /// Where the running device stood in each queue; empty unless the
    /// driver had set DRIVER_OK.
    device_queues: Vec<QueueSnapshot>,
}

impl Persist for MmioTransport {
    type State = TransportState;
    /// Guest memory and the device the restored transport drives.
    type ConstructorArgs = (GuestMemoryMmap, Arc<Mutex<dyn VirtioDevice>>);
    type Error = MmioError;

    /// The transport's registers and its device's queues, for a snapshot
    /// (with the vCPUs paused, so the driver changes nothing meanwhile).
    fn save(&self) -> TransportState {
        let device = lock(&self.device);
        let snapshot = |queue: &Queue| QueueSnapshot(queue.state());
        TransportState {
            device_type: device.device_type(),
            device_features: device.features(),
            status: self.status(),
            driver_features: self.driver_features,
            queue_select: self.queue_select,
            device_features_select: self.device_features_select,
            driver_features_select: self.driver_features_select,
            interrupt_status: self.interrupt.status(),
            queues: self.queues.iter().map(snapshot).collect(),
            device_queues: device
                .queue_states()
                .into_iter()
                .map(QueueSnapshot)
                .collect(),
        }
    }

    /// A transport for `device` that goes on from `saved`: same
    /// registers, and a device that was running is running again, at the
    /// ring positions it had reached.
    fn restore(
        (mem, device): (GuestMemoryMmap, Arc<Mutex<dyn VirtioDevice>>),
        saved: &TransportState,
    ) -> Result<Self, MmioError> {
        let mut transport = Self::new(mem, device)?;
        transport.check_same_device(saved)?;
        transport.queues = restore_queues(&saved.queues)?;
        transport.status = saved.status;
        transport.driver_features = saved.driver_features;
        transport.queue_select = saved.queue_select;
        transport.device_features_select = saved.device_features_select;
        transport.driver_features_select = saved.driver_features_select;
        transport
            .interrupt
            .restore(saved.interrupt_status)
            .map_err(|source| MmioError::EventFd {
                what: "raise the restored virtio-mmio interrupt",
                source,
            })?;
        let running = saved.status & (VIRTIO_CONFIG_S_DRIVER_OK | VIRTIO_CONFIG_S_NEEDS_RESET)
            == VIRTIO_CONFIG_S_DRIVER_OK;
        if running {
            lock(&transport.device)
                .activate(
                    transport.driver_features,
                    transport.mem.clone(),
                    restore_queues(&saved.device_queues)?,
                    transport.interrupt.clone(),
                )
                .map_err(MmioError::Activate)?;
        }
        Ok(transport)
    }
}

impl MmioTransport {
    fn check_same_device(&self, saved: &TransportState) -> Result<(), MmioError> {
        let device = lock(&self.device);
        let pairs = [
            (
                "type",
                saved.device_type.into(),
                device.device_type().into(),
            ),
            ("features", saved.device_features, device.features()),
            (
                "queue count",
                saved.queues.len() as u64,
                self.queues.len() as u64,
            ),
        ];
        match pairs.into_iter().find(|(_, saved, found)| saved != found) {
            Some((what, saved, found)) => Err(MmioError::Mismatch { what, saved, found }),
            None => Ok(()),
        }
    }
}

/// Saved queues made into queues again, each validated by virtio-queue.
fn restore_queues(saved: &[QueueSnapshot]) -> Result<Vec<Queue>, MmioError> {
    saved
        .iter()
        .enumerate()
        .map(|(index, queue)| {
            Queue::try_from(queue.0).map_err(|cause| MmioError::SavedQueue { index, cause })
        })
        .collect()
}
