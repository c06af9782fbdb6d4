//! The virtio MMIO transport, modern interface (virtio 1.2 §4.2.2 "MMIO
//! Device Register Layout", Version 2).
//!
//! The driver discovers the device through read-only identification
//! registers, walks the device status through ACKNOWLEDGE, DRIVER,
//! FEATURES_OK and DRIVER_OK (§2.1, §3.1.1), negotiates features through
//! 32-bit select windows, and describes each queue's rings before marking it
//! ready. On DRIVER_OK the transport hands the device its queues. Queue
//! notifications normally never reach this code: the VMM registers each
//! queue's `EventFd` with KVM as an ioeventfd on QueueNotify.

use std::sync::{Arc, Mutex};

use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FAILED, VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET,
    VIRTIO_F_VERSION_1,
};
use virtio_bindings::virtio_mmio::{
    VIRTIO_MMIO_CONFIG, VIRTIO_MMIO_CONFIG_GENERATION, VIRTIO_MMIO_DEVICE_FEATURES,
    VIRTIO_MMIO_DEVICE_FEATURES_SEL, VIRTIO_MMIO_DEVICE_ID, VIRTIO_MMIO_DRIVER_FEATURES,
    VIRTIO_MMIO_DRIVER_FEATURES_SEL, VIRTIO_MMIO_INTERRUPT_ACK, VIRTIO_MMIO_INTERRUPT_STATUS,
    VIRTIO_MMIO_MAGIC_VALUE, VIRTIO_MMIO_QUEUE_AVAIL_HIGH, VIRTIO_MMIO_QUEUE_AVAIL_LOW,
    VIRTIO_MMIO_QUEUE_DESC_HIGH, VIRTIO_MMIO_QUEUE_DESC_LOW, VIRTIO_MMIO_QUEUE_NOTIFY,
    VIRTIO_MMIO_QUEUE_NUM, VIRTIO_MMIO_QUEUE_NUM_MAX, VIRTIO_MMIO_QUEUE_READY,
    VIRTIO_MMIO_QUEUE_SEL, VIRTIO_MMIO_QUEUE_USED_HIGH, VIRTIO_MMIO_QUEUE_USED_LOW,
    VIRTIO_MMIO_SHM_LEN_HIGH, VIRTIO_MMIO_SHM_LEN_LOW, VIRTIO_MMIO_STATUS, VIRTIO_MMIO_VENDOR_ID,
    VIRTIO_MMIO_VERSION,
};
use virtio_queue::{Queue, QueueT};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

mod persist;

pub use persist::TransportState;

use super::{ActivateError, GuestMemoryMmap, Interrupt, VirtioDevice};
use crate::devices::bus::BusDevice;
use crate::devices::lock;
use crate::logger::{error_limited, warn_limited};
use crate::report::one_line;

/// Size of one device's MMIO window: the registers up to 0x100, then the
/// device configuration space.
pub const MMIO_REGION_SIZE: u64 = 0x1000;

/// MagicValue: "virt" in little-endian (§4.2.2).
const MAGIC_VALUE: u32 = 0x7472_6976;
/// Version of the modern (non-legacy) MMIO interface (§4.2.2).
const MMIO_VERSION: u32 = 2;
/// VendorID: any value; "KILN" in little-endian.
const VENDOR_ID: u32 = u32::from_le_bytes(*b"KILN");
/// Every register is 32 bits wide and must be accessed as such (§4.2.2).
const REGISTER_WIDTH: usize = 4;

/// The status bits the driver sets, in the order it must set them (§3.1.1).
const STATUS_STEPS: [u32; 4] = [
    VIRTIO_CONFIG_S_ACKNOWLEDGE,
    VIRTIO_CONFIG_S_DRIVER,
    VIRTIO_CONFIG_S_FEATURES_OK,
    VIRTIO_CONFIG_S_DRIVER_OK,
];

/// Errors from creating a transport.
#[derive(Debug, thiserror::Error)]
pub enum MmioError {
    /// An eventfd could not be created, duplicated or written.
    #[error("cannot {what} eventfd")]
    EventFd {
        /// What with which eventfd, e.g. "create the virtio-mmio interrupt".
        what: &'static str,
        /// What the system said.
        #[source]
        source: std::io::Error,
    },
    /// The device declared a queue size virtio-queue cannot model (§2.7: a
    /// power of two up to 32768).
    #[error("virtio device type {device_type}: invalid maximum size {size} for queue {index}")]
    QueueSize {
        /// The device's type (virtio 1.2 §5).
        device_type: u32,
        /// The queue's index.
        index: usize,
        /// The size it declared.
        size: u16,
    },
    /// A saved transport does not fit the device it is restored onto.
    #[error("the saved virtio device {what}: saved {saved:#x}, this device {found:#x}")]
    Mismatch {
        /// What differs: the device type, its features or its number of
        /// queues.
        what: &'static str,
        /// The saved value.
        saved: u64,
        /// This device's value.
        found: u64,
    },
    /// A saved queue that virtio-queue refuses (§2.7's rules).
    #[error("saved queue {index} is invalid")]
    SavedQueue {
        /// The queue's index.
        index: usize,
        /// Which of virtio-queue's rules it breaks.
        #[source]
        cause: virtio_queue::Error,
    },
    /// A saved, running device that refused its queues again.
    #[error("the restored device refused activation")]
    Activate(#[source] ActivateError),
}

/// Why DRIVER_OK did not start the device. Only ever logged, as one line
/// ([`one_line`]).
#[derive(Debug, thiserror::Error)]
enum ActivationError {
    #[error("queue {index} is ready but its rings lie outside guest memory or are misaligned")]
    QueueRings { index: usize },
    #[error("queue {index} is misconfigured")]
    QueueConfig {
        index: usize,
        #[source]
        cause: virtio_queue::Error,
    },
    #[error("the device refused activation")]
    Device(#[source] ActivateError),
}

/// One virtio device behind the MMIO register layout.
pub struct MmioTransport {
    device: Arc<Mutex<dyn VirtioDevice>>,
    mem: GuestMemoryMmap,
    interrupt: Arc<Interrupt>,
    queue_evts: Vec<EventFd>,
    /// The driver's queue configuration; the device gets copies on activation.
    queues: Vec<Queue>,
    queue_select: u32,
    device_features_select: u32,
    driver_features_select: u32,
    driver_features: u64,
    status: u32,
    /// ConfigGeneration (§4.2.2): changes with every change of the
    /// device's configuration space, so that a driver reading a field of
    /// more than 32 bits in pieces can tell it changed meanwhile (§2.5.1).
    config_generation: u32,
}

impl MmioTransport {
    /// A transport for `device`, whose queues will live in `mem`.
    pub fn new(
        mem: GuestMemoryMmap,
        device: Arc<Mutex<dyn VirtioDevice>>,
    ) -> Result<Self, MmioError> {
        let eventfd_error = |what| move |source| MmioError::EventFd { what, source };
        let irq = EventFd::new(EFD_NONBLOCK)
            .map_err(eventfd_error("create the virtio-mmio interrupt"))?;
        let (queue_evts, queues) = {
            let device = lock(&device);
            let queue_evts = device
                .queue_events()
                .iter()
                .map(EventFd::try_clone)
                .collect::<Result<Vec<_>, _>>()
                .map_err(eventfd_error("duplicate a virtio-mmio queue"))?;
            let queues = device
                .queue_max_sizes()
                .iter()
                .enumerate()
                .map(|(index, &size)| {
                    Queue::new(size).map_err(|_| MmioError::QueueSize {
                        device_type: device.device_type(),
                        index,
                        size,
                    })
                })
                .collect::<Result<Vec<_>, _>>()?;
            (queue_evts, queues)
        };
        Ok(Self {
            device,
            mem,
            interrupt: Arc::new(Interrupt::new(irq)),
            queue_evts,
            queues,
            queue_select: 0,
            device_features_select: 0,
            driver_features_select: 0,
            driver_features: 0,
            status: 0,
            config_generation: 0,
        })
    }

    /// Queue index → the `EventFd` to register as an ioeventfd at
    /// `base + VIRTIO_MMIO_QUEUE_NOTIFY` with the queue index as datamatch.
    pub fn queue_events(&self) -> &[EventFd] {
        &self.queue_evts
    }

    /// The `EventFd` to register as the irqfd of the device's interrupt line.
    pub fn interrupt_event(&self) -> &EventFd {
        self.interrupt.event()
    }

    /// The device's configuration space has just changed (a disk filled
    /// an empty drive): a new ConfigGeneration, and a configuration
    /// change interrupt (VIRTIO_MMIO_INT_CONFIG, §2.1.2 and §4.2.2) for
    /// the driver to read it again. The caller changes the configuration
    /// with this transport locked, as a vCPU holds it for every register
    /// access, so the driver never reads the new configuration with the
    /// old generation. Before DRIVER_OK the driver reads the
    /// configuration as it probes; Linux keeps an interrupt that comes
    /// meanwhile until the probe is done.
    pub fn config_changed(&mut self) -> std::io::Result<()> {
        self.config_generation = self.config_generation.wrapping_add(1);
        self.interrupt.signal_config_change()
    }

    /// The device status register: the driver's steps, and
    /// DEVICE_NEEDS_RESET if the transport or the device has set it.
    fn status(&self) -> u32 {
        if self.interrupt.needs_reset() {
            self.status | VIRTIO_CONFIG_S_NEEDS_RESET
        } else {
            self.status
        }
    }

    fn read_register(&self, register: u32) -> u32 {
        match register {
            VIRTIO_MMIO_MAGIC_VALUE => MAGIC_VALUE,
            VIRTIO_MMIO_VERSION => MMIO_VERSION,
            VIRTIO_MMIO_DEVICE_ID => lock(&self.device).device_type(),
            VIRTIO_MMIO_VENDOR_ID => VENDOR_ID,
            VIRTIO_MMIO_DEVICE_FEATURES => {
                feature_window(lock(&self.device).features(), self.device_features_select)
            }
            VIRTIO_MMIO_QUEUE_NUM_MAX => self.selected_queue().map_or(0, |q| q.max_size().into()),
            VIRTIO_MMIO_QUEUE_READY => self.selected_queue().map_or(0, |q| q.ready().into()),
            VIRTIO_MMIO_INTERRUPT_STATUS => self.interrupt.status(),
            VIRTIO_MMIO_STATUS => self.status(),
            VIRTIO_MMIO_CONFIG_GENERATION => self.config_generation,
            // No shared memory regions: a non-existent region has length -1.
            VIRTIO_MMIO_SHM_LEN_LOW | VIRTIO_MMIO_SHM_LEN_HIGH => u32::MAX,
            // Write-only and reserved registers read as zero.
            _ => 0,
        }
    }

    fn write_register(&mut self, register: u32, value: u32) {
        match register {
            VIRTIO_MMIO_DEVICE_FEATURES_SEL => self.device_features_select = value,
            VIRTIO_MMIO_DRIVER_FEATURES_SEL => self.driver_features_select = value,
            VIRTIO_MMIO_DRIVER_FEATURES => self.write_driver_features(value),
            VIRTIO_MMIO_QUEUE_SEL => self.queue_select = value,
            VIRTIO_MMIO_QUEUE_NUM => self.configure_queue(register, |queue| {
                let size = u16::try_from(value).unwrap_or(0);
                if queue.try_set_size(size).is_err() {
                    warn_limited!("virtio-mmio: invalid queue size {value}");
                }
            }),
            VIRTIO_MMIO_QUEUE_READY => self.configure_queue(register, |q| q.set_ready(value == 1)),
            VIRTIO_MMIO_QUEUE_DESC_LOW => {
                self.configure_queue(register, |q| q.set_desc_table_address(Some(value), None))
            }
            VIRTIO_MMIO_QUEUE_DESC_HIGH => {
                self.configure_queue(register, |q| q.set_desc_table_address(None, Some(value)))
            }
            VIRTIO_MMIO_QUEUE_AVAIL_LOW => {
                self.configure_queue(register, |q| q.set_avail_ring_address(Some(value), None))
            }
            VIRTIO_MMIO_QUEUE_AVAIL_HIGH => {
                self.configure_queue(register, |q| q.set_avail_ring_address(None, Some(value)))
            }
            VIRTIO_MMIO_QUEUE_USED_LOW => {
                self.configure_queue(register, |q| q.set_used_ring_address(Some(value), None))
            }
            VIRTIO_MMIO_QUEUE_USED_HIGH => {
                self.configure_queue(register, |q| q.set_used_ring_address(None, Some(value)))
            }
            VIRTIO_MMIO_QUEUE_NOTIFY => self.notify(value),
            VIRTIO_MMIO_INTERRUPT_ACK => self.interrupt.acknowledge(value),
            VIRTIO_MMIO_STATUS => self.write_status(value),
            _ => {
                warn_limited!("virtio-mmio: write of {value:#x} to register {register:#x} ignored")
            }
        }
    }

    fn write_driver_features(&mut self, value: u32) {
        // §2.2.2: features are negotiated between DRIVER and FEATURES_OK.
        if self.status != VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER {
            return warn_limited!(
                "virtio-mmio: driver features written in status {:#x}",
                self.status
            );
        }
        let shift = match self.driver_features_select {
            0 => 0,
            1 => 32,
            select => {
                return warn_limited!(
                    "virtio-mmio: driver features window {select} does not exist"
                );
            }
        };
        let offered = lock(&self.device).features();
        let window = u64::from(u32::MAX) << shift;
        let accepted = (u64::from(value) << shift) & offered;
        if accepted != u64::from(value) << shift {
            warn_limited!(
                "virtio-mmio: driver accepted features {value:#x} in window {} that were not offered",
                self.driver_features_select
            );
        }
        self.driver_features = (self.driver_features & !window) | accepted;
    }

    fn selected_queue(&self) -> Option<&Queue> {
        self.queues.get(self.queue_select as usize)
    }

    /// Applies a write to a register of the selected queue.
    fn configure_queue(&mut self, register: u32, apply: impl FnOnce(&mut Queue)) {
        // §4.2.3.2: queues are configured after FEATURES_OK, before DRIVER_OK.
        let configuring = self.status & (VIRTIO_CONFIG_S_FEATURES_OK | VIRTIO_CONFIG_S_DRIVER_OK)
            == VIRTIO_CONFIG_S_FEATURES_OK;
        let select = self.queue_select;
        match self.queues.get_mut(select as usize) {
            Some(queue) if configuring => apply(queue),
            _ => warn_limited!(
                "virtio-mmio: queue {select} register {register:#x} written in status {:#x}",
                self.status
            ),
        }
    }

    /// A notification that reached the bus because no ioeventfd caught it.
    fn notify(&self, queue: u32) {
        match self.queue_evts.get(queue as usize) {
            Some(evt) => {
                if let Err(err) = evt.write(1) {
                    error_limited!(
                        "virtio-mmio: cannot forward the notification of queue {queue}: {err}"
                    );
                }
            }
            None => warn_limited!("virtio-mmio: notification of non-existent queue {queue}"),
        }
    }

    fn write_status(&mut self, value: u32) {
        if value == 0 {
            return self.reset();
        }
        if value & VIRTIO_CONFIG_S_FAILED != 0 {
            // §2.1.1: the driver gave up; it will reset the device.
            self.status |= VIRTIO_CONFIG_S_FAILED;
            return;
        }
        // NEEDS_RESET is the device's bit; the driver echoes it back.
        let driver_bits = self.status & !VIRTIO_CONFIG_S_NEEDS_RESET;
        let value = value & !VIRTIO_CONFIG_S_NEEDS_RESET;
        if value == driver_bits {
            return;
        }
        let next = STATUS_STEPS
            .into_iter()
            .find(|step| driver_bits & step == 0);
        match next {
            Some(step)
                if value == driver_bits | step && self.status & VIRTIO_CONFIG_S_FAILED == 0 =>
            {
                self.enter_status(step)
            }
            _ => warn_limited!(
                "virtio-mmio: status change {:#x} -> {value:#x} is not a step of device initialization",
                self.status
            ),
        }
    }

    fn enter_status(&mut self, step: u32) {
        match step {
            VIRTIO_CONFIG_S_FEATURES_OK
                if self.driver_features & (1 << VIRTIO_F_VERSION_1) == 0 =>
            {
                // §3.1.1: leaving FEATURES_OK unset tells the driver the
                // features are unacceptable; this device has no legacy interface.
                warn_limited!("virtio-mmio: driver did not accept VIRTIO_F_VERSION_1");
            }
            VIRTIO_CONFIG_S_DRIVER_OK => {
                self.status |= step;
                self.activate();
            }
            _ => self.status |= step,
        }
    }

    fn activate(&mut self) {
        if let Err(reason) = self.try_activate() {
            warn_limited!(
                "virtio-mmio: cannot activate the device: {}",
                one_line(&reason)
            );
            // §2.1.2: tell the driver the device needs a reset.
            self.status |= VIRTIO_CONFIG_S_NEEDS_RESET;
            if let Err(err) = self.interrupt.signal_config_change() {
                error_limited!("virtio-mmio: cannot signal the failure: {err}");
            }
        }
    }

    fn try_activate(&mut self) -> Result<(), ActivationError> {
        let mut queues = Vec::with_capacity(self.queues.len());
        for (index, queue) in self.queues.iter().enumerate() {
            if queue.ready() && !queue.is_valid(&self.mem) {
                return Err(ActivationError::QueueRings { index });
            }
            let copy = Queue::try_from(queue.state())
                .map_err(|cause| ActivationError::QueueConfig { index, cause })?;
            queues.push(copy);
        }
        lock(&self.device)
            .activate(
                self.driver_features,
                self.mem.clone(),
                queues,
                self.interrupt.clone(),
            )
            .map_err(ActivationError::Device)
    }

    /// Device reset (§2.4): back to the state right after power-on.
    fn reset(&mut self) {
        lock(&self.device).reset();
        self.queues.iter_mut().for_each(QueueT::reset);
        self.interrupt.clear();
        self.queue_select = 0;
        self.device_features_select = 0;
        self.driver_features_select = 0;
        self.driver_features = 0;
        self.status = 0;
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let config = u64::from(VIRTIO_MMIO_CONFIG);
        if offset >= config {
            return lock(&self.device).read_config(offset - config, data);
        }
        match (
            u32::try_from(offset),
            <&mut [u8; REGISTER_WIDTH]>::try_from(&mut *data),
        ) {
            (Ok(register), Ok(bytes)) => *bytes = self.read_register(register).to_le_bytes(),
            _ => {
                warn_limited!(
                    "virtio-mmio: {}-byte read of register {offset:#x}",
                    data.len()
                );
                data.fill(0);
            }
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let config = u64::from(VIRTIO_MMIO_CONFIG);
        if offset >= config {
            return lock(&self.device).write_config(offset - config, data);
        }
        match (
            u32::try_from(offset),
            <[u8; REGISTER_WIDTH]>::try_from(data),
        ) {
            (Ok(register), Ok(bytes)) => self.write_register(register, u32::from_le_bytes(bytes)),
            _ => warn_limited!(
                "virtio-mmio: {}-byte write to register {offset:#x}",
                data.len()
            ),
        }
    }
}

/// The 32 feature bits of `features` visible through window `select`.
fn feature_window(features: u64, select: u32) -> u32 {
    match select {
        0 => features as u32,
        1 => (features >> 32) as u32,
        _ => 0,
    }
}

#[cfg(test)]
mod tests {
    use crate::devices::persist::Persist;
    use std::io::Write as _;

    use event_manager::{EventManager, SubscriberOps};
    use virtio_bindings::virtio_blk::{VIRTIO_BLK_S_OK, VIRTIO_BLK_T_FLUSH};
    use virtio_bindings::virtio_mmio::{VIRTIO_MMIO_INT_CONFIG, VIRTIO_MMIO_INT_VRING};
    use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use virtio_queue::desc::RawDescriptor;
    use virtio_queue::desc::split::Descriptor;
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Bytes, GuestAddress};

    use super::*;
    use crate::devices::virtio::block::{Block, DiskSource, QUEUE_SIZE};

    const ACK: u32 = VIRTIO_CONFIG_S_ACKNOWLEDGE;
    const DRIVER: u32 = VIRTIO_CONFIG_S_DRIVER;
    const FEATURES_OK: u32 = VIRTIO_CONFIG_S_FEATURES_OK;
    const DRIVER_OK: u32 = VIRTIO_CONFIG_S_DRIVER_OK;
    const NEEDS_RESET: u32 = VIRTIO_CONFIG_S_NEEDS_RESET;
    const MOCK_QUEUE_SIZE: u16 = 16;
    const DISK_SECTORS: u64 = 8;
    const HEADER: u64 = 0x1_0000;
    const STATUS: u64 = 0x2_0000;

    struct Fixture {
        _image: tempfile::NamedTempFile,
        mem: GuestMemoryMmap,
        block: Arc<Mutex<Block>>,
        transport: MmioTransport,
    }

    fn fixture() -> Fixture {
        let mut image = tempfile::NamedTempFile::new().unwrap();
        image.write_all(&[0; DISK_SECTORS as usize * 512]).unwrap();
        let block = Arc::new(Mutex::new(
            Block::new(&DiskSource::Raw(image.path().into()), false).unwrap(),
        ));
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let transport = MmioTransport::new(mem.clone(), block.clone()).unwrap();
        Fixture {
            _image: image,
            mem,
            block,
            transport,
        }
    }

    fn read(transport: &mut MmioTransport, register: u32) -> u32 {
        let mut data = [0u8; 4];
        transport.read(register.into(), &mut data);
        u32::from_le_bytes(data)
    }

    fn write(transport: &mut MmioTransport, register: u32, value: u32) {
        transport.write(register.into(), &value.to_le_bytes());
    }

    /// Status steps up to FEATURES_OK, accepting VIRTIO_F_VERSION_1 only.
    fn negotiate(transport: &mut MmioTransport) {
        write(transport, VIRTIO_MMIO_STATUS, ACK);
        write(transport, VIRTIO_MMIO_STATUS, ACK | DRIVER);
        write(transport, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
        write(
            transport,
            VIRTIO_MMIO_DRIVER_FEATURES,
            1 << (VIRTIO_F_VERSION_1 - 32),
        );
        write(transport, VIRTIO_MMIO_STATUS, ACK | DRIVER | FEATURES_OK);
        assert_eq!(
            read(transport, VIRTIO_MMIO_STATUS),
            ACK | DRIVER | FEATURES_OK
        );
    }

    /// Points queue 0 at `queue`'s rings and marks it ready.
    fn set_up_queue(transport: &mut MmioTransport, queue: &MockSplitQueue<'_, GuestMemoryMmap>) {
        let split = |addr: GuestAddress| (addr.0 as u32, (addr.0 >> 32) as u32);
        write(transport, VIRTIO_MMIO_QUEUE_SEL, 0);
        write(transport, VIRTIO_MMIO_QUEUE_NUM, MOCK_QUEUE_SIZE.into());
        for (addr, low, high) in [
            (
                queue.desc_table_addr(),
                VIRTIO_MMIO_QUEUE_DESC_LOW,
                VIRTIO_MMIO_QUEUE_DESC_HIGH,
            ),
            (
                queue.avail_addr(),
                VIRTIO_MMIO_QUEUE_AVAIL_LOW,
                VIRTIO_MMIO_QUEUE_AVAIL_HIGH,
            ),
            (
                queue.used_addr(),
                VIRTIO_MMIO_QUEUE_USED_LOW,
                VIRTIO_MMIO_QUEUE_USED_HIGH,
            ),
        ] {
            let (addr_low, addr_high) = split(addr);
            write(transport, low, addr_low);
            write(transport, high, addr_high);
        }
        write(transport, VIRTIO_MMIO_QUEUE_READY, 1);
        assert_eq!(read(transport, VIRTIO_MMIO_QUEUE_READY), 1);
    }

    /// Queue 0 on `queue`'s rings, then DRIVER_OK: the device runs.
    fn start_device(transport: &mut MmioTransport, queue: &MockSplitQueue<'_, GuestMemoryMmap>) {
        set_up_queue(transport, queue);
        write(
            transport,
            VIRTIO_MMIO_STATUS,
            ACK | DRIVER | FEATURES_OK | DRIVER_OK,
        );
    }

    /// Makes a FLUSH request available on `queue`.
    fn add_flush_request(mem: &GuestMemoryMmap, queue: &MockSplitQueue<'_, GuestMemoryMmap>) {
        let mut header = [0u8; 16];
        header[..4].copy_from_slice(&VIRTIO_BLK_T_FLUSH.to_le_bytes());
        mem.write_slice(&header, GuestAddress(HEADER)).unwrap();
        mem.write_obj(0xeeu8, GuestAddress(STATUS)).unwrap();
        let chain = [
            Descriptor::new(HEADER, 16, VRING_DESC_F_NEXT as u16, 1),
            Descriptor::new(STATUS, 1, VRING_DESC_F_WRITE as u16, 0),
        ];
        queue
            .add_desc_chains(&chain.map(RawDescriptor::from), 0)
            .unwrap();
    }

    #[test]
    fn identification_registers() {
        let Fixture { mut transport, .. } = fixture();
        assert_eq!(read(&mut transport, VIRTIO_MMIO_MAGIC_VALUE), 0x7472_6976);
        assert_eq!(read(&mut transport, VIRTIO_MMIO_VERSION), 2);
        assert_eq!(read(&mut transport, VIRTIO_MMIO_DEVICE_ID), 2);
        assert_eq!(read(&mut transport, VIRTIO_MMIO_VENDOR_ID), VENDOR_ID);
        assert_eq!(
            read(&mut transport, VIRTIO_MMIO_QUEUE_NUM_MAX),
            u32::from(QUEUE_SIZE)
        );
        write(&mut transport, VIRTIO_MMIO_QUEUE_SEL, 1);
        assert_eq!(read(&mut transport, VIRTIO_MMIO_QUEUE_NUM_MAX), 0);
        assert_eq!(read(&mut transport, VIRTIO_MMIO_SHM_LEN_LOW), u32::MAX);
    }

    #[test]
    fn config_space_is_the_devices() {
        let Fixture { mut transport, .. } = fixture();
        let mut capacity = [0u8; 8];
        transport.read(VIRTIO_MMIO_CONFIG.into(), &mut capacity);
        assert_eq!(u64::from_le_bytes(capacity), DISK_SECTORS);
    }

    #[test]
    fn registers_need_32_bit_accesses() {
        let Fixture { mut transport, .. } = fixture();
        let mut narrow = [0xffu8; 2];
        transport.read(VIRTIO_MMIO_MAGIC_VALUE.into(), &mut narrow);
        assert_eq!(narrow, [0, 0]);
        transport.write(VIRTIO_MMIO_STATUS.into(), &[ACK as u8]);
        assert_eq!(read(&mut transport, VIRTIO_MMIO_STATUS), 0);
    }

    #[test]
    fn features_are_negotiated_through_windows() {
        let Fixture { mut transport, .. } = fixture();
        let offered = lock(&transport.device).features();
        write(&mut transport, VIRTIO_MMIO_DEVICE_FEATURES_SEL, 0);
        let low = read(&mut transport, VIRTIO_MMIO_DEVICE_FEATURES);
        write(&mut transport, VIRTIO_MMIO_DEVICE_FEATURES_SEL, 1);
        let high = read(&mut transport, VIRTIO_MMIO_DEVICE_FEATURES);
        assert_eq!(u64::from(high) << 32 | u64::from(low), offered);
        assert_eq!(high, 1 << (VIRTIO_F_VERSION_1 - 32));
        write(&mut transport, VIRTIO_MMIO_DEVICE_FEATURES_SEL, 2);
        assert_eq!(read(&mut transport, VIRTIO_MMIO_DEVICE_FEATURES), 0);

        // Features written before DRIVER are ignored; unoffered ones dropped.
        write(&mut transport, VIRTIO_MMIO_DRIVER_FEATURES, u32::MAX);
        assert_eq!(transport.driver_features, 0);
        write(&mut transport, VIRTIO_MMIO_STATUS, ACK);
        write(&mut transport, VIRTIO_MMIO_STATUS, ACK | DRIVER);
        write(&mut transport, VIRTIO_MMIO_DRIVER_FEATURES, u32::MAX);
        assert_eq!(transport.driver_features, u64::from(low));

        // Without VERSION_1 the device refuses FEATURES_OK ...
        write(
            &mut transport,
            VIRTIO_MMIO_STATUS,
            ACK | DRIVER | FEATURES_OK,
        );
        assert_eq!(read(&mut transport, VIRTIO_MMIO_STATUS), ACK | DRIVER);
        // ... and accepts it with VERSION_1.
        write(&mut transport, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
        write(&mut transport, VIRTIO_MMIO_DRIVER_FEATURES, u32::MAX);
        assert_eq!(transport.driver_features, offered);
        write(
            &mut transport,
            VIRTIO_MMIO_STATUS,
            ACK | DRIVER | FEATURES_OK,
        );
        assert_eq!(
            read(&mut transport, VIRTIO_MMIO_STATUS),
            ACK | DRIVER | FEATURES_OK
        );
    }

    #[test]
    fn status_steps_must_come_in_order() {
        let Fixture { mut transport, .. } = fixture();
        write(&mut transport, VIRTIO_MMIO_STATUS, ACK | DRIVER);
        assert_eq!(read(&mut transport, VIRTIO_MMIO_STATUS), 0);
        write(&mut transport, VIRTIO_MMIO_STATUS, ACK);
        write(&mut transport, VIRTIO_MMIO_STATUS, ACK | DRIVER_OK);
        assert_eq!(read(&mut transport, VIRTIO_MMIO_STATUS), ACK);
        write(
            &mut transport,
            VIRTIO_MMIO_STATUS,
            ACK | VIRTIO_CONFIG_S_FAILED,
        );
        assert_eq!(
            read(&mut transport, VIRTIO_MMIO_STATUS),
            ACK | VIRTIO_CONFIG_S_FAILED
        );
        // A failed device only leaves that state through a reset.
        write(
            &mut transport,
            VIRTIO_MMIO_STATUS,
            ACK | DRIVER | VIRTIO_CONFIG_S_FAILED,
        );
        write(&mut transport, VIRTIO_MMIO_STATUS, ACK | DRIVER);
        assert_eq!(
            read(&mut transport, VIRTIO_MMIO_STATUS),
            ACK | VIRTIO_CONFIG_S_FAILED
        );
        write(&mut transport, VIRTIO_MMIO_STATUS, 0);
        assert_eq!(read(&mut transport, VIRTIO_MMIO_STATUS), 0);
    }

    #[test]
    fn queues_are_configured_only_between_features_ok_and_driver_ok() {
        let Fixture { mut transport, .. } = fixture();
        write(&mut transport, VIRTIO_MMIO_QUEUE_READY, 1);
        assert_eq!(read(&mut transport, VIRTIO_MMIO_QUEUE_READY), 0);
        negotiate(&mut transport);
        write(&mut transport, VIRTIO_MMIO_QUEUE_NUM, 100);
        assert_eq!(transport.queues[0].size(), QUEUE_SIZE, "not a power of two");
        write(&mut transport, VIRTIO_MMIO_QUEUE_NUM, 64);
        assert_eq!(transport.queues[0].size(), 64);
        write(&mut transport, VIRTIO_MMIO_QUEUE_DESC_LOW, 0x1000);
        write(&mut transport, VIRTIO_MMIO_QUEUE_DESC_HIGH, 0x2);
        assert_eq!(transport.queues[0].desc_table(), 0x2_0000_1000);
        write(&mut transport, VIRTIO_MMIO_QUEUE_READY, 1);
        assert_eq!(read(&mut transport, VIRTIO_MMIO_QUEUE_READY), 1);
    }

    /// A transport whose driver negotiated features, with the block device
    /// in an event loop: ready for a queue and DRIVER_OK.
    fn driver_ok_fixture() -> (
        MmioTransport,
        GuestMemoryMmap,
        EventManager<Arc<Mutex<Block>>>,
    ) {
        let Fixture {
            mut transport,
            mem,
            block,
            ..
        } = fixture();
        let mut event_loop = EventManager::<Arc<Mutex<Block>>>::new().unwrap();
        event_loop.add_subscriber(block);
        negotiate(&mut transport);
        (transport, mem, event_loop)
    }

    #[test]
    fn a_notified_request_is_served_and_interrupts() {
        let (mut transport, mem, mut event_loop) = driver_ok_fixture();
        let queue = MockSplitQueue::new(&mem, MOCK_QUEUE_SIZE);
        start_device(&mut transport, &queue);
        assert_eq!(
            read(&mut transport, VIRTIO_MMIO_STATUS) & DRIVER_OK,
            DRIVER_OK
        );

        // What KVM's ioeventfd does on the guest's QueueNotify write.
        add_flush_request(&mem, &queue);
        transport.queue_events()[0].write(1).unwrap();
        assert_eq!(event_loop.run_with_timeout(1000).unwrap(), 1);
        assert_eq!(queue.used().idx().load(), 1);
        assert_eq!(
            mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap(),
            VIRTIO_BLK_S_OK as u8
        );

        acknowledge_interrupt(&mut transport, VIRTIO_MMIO_INT_VRING);

        // A notification that reaches the bus (no ioeventfd) works too.
        add_flush_request(&mem, &queue);
        write(&mut transport, VIRTIO_MMIO_QUEUE_NOTIFY, 0);
        assert_eq!(event_loop.run_with_timeout(1000).unwrap(), 1);
        assert_eq!(queue.used().idx().load(), 2);
    }

    /// The line was raised for `cause` alone, which the driver then
    /// acknowledges, as Linux's interrupt handler does.
    fn acknowledge_interrupt(transport: &mut MmioTransport, cause: u32) {
        assert_eq!(transport.interrupt_event().read().unwrap(), 1);
        assert_eq!(read(transport, VIRTIO_MMIO_INTERRUPT_STATUS), cause);
        write(transport, VIRTIO_MMIO_INTERRUPT_ACK, cause);
        assert_eq!(read(transport, VIRTIO_MMIO_INTERRUPT_STATUS), 0);
    }

    /// The configuration space's 64-bit capacity, read as Linux reads it:
    /// in two 32-bit halves, between two reads of ConfigGeneration.
    fn capacity(transport: &mut MmioTransport) -> (u64, u32) {
        let generation = read(transport, VIRTIO_MMIO_CONFIG_GENERATION);
        let low = read(transport, VIRTIO_MMIO_CONFIG);
        let high = read(transport, VIRTIO_MMIO_CONFIG + 4);
        assert_eq!(read(transport, VIRTIO_MMIO_CONFIG_GENERATION), generation);
        (u64::from(high) << 32 | u64::from(low), generation)
    }

    #[test]
    fn a_disk_attached_to_a_running_empty_drive_changes_its_config_and_interrupts() {
        let block = Arc::new(Mutex::new(Block::new(&DiskSource::Empty, false).unwrap()));
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let mut transport = MmioTransport::new(mem.clone(), block.clone()).unwrap();
        let mut event_loop = EventManager::<Arc<Mutex<Block>>>::new().unwrap();
        event_loop.add_subscriber(block.clone());
        negotiate(&mut transport);
        let queue = MockSplitQueue::new(&mem, MOCK_QUEUE_SIZE);
        start_device(&mut transport, &queue);
        assert_eq!(capacity(&mut transport), (0, 0));
        assert_eq!(read(&mut transport, VIRTIO_MMIO_INTERRUPT_STATUS), 0);

        let image = tempfile::NamedTempFile::new().unwrap();
        image.as_file().set_len(DISK_SECTORS * 512).unwrap();
        lock(&block)
            .attach(&DiskSource::Raw(image.path().into()))
            .unwrap();
        transport.config_changed().unwrap();

        assert_eq!(capacity(&mut transport), (DISK_SECTORS, 1));
        acknowledge_interrupt(&mut transport, VIRTIO_MMIO_INT_CONFIG);
        // The running queue now reaches the disk.
        add_flush_request(&mem, &queue);
        transport.queue_events()[0].write(1).unwrap();
        assert_eq!(event_loop.run_with_timeout(1000).unwrap(), 1);
        assert_eq!(
            mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap(),
            VIRTIO_BLK_S_OK as u8
        );
    }

    #[test]
    fn a_broken_ring_shows_needs_reset_until_the_driver_resets_the_device() {
        let (mut transport, mem, mut event_loop) = driver_ok_fixture();
        let queue = MockSplitQueue::new(&mem, MOCK_QUEUE_SIZE);
        start_device(&mut transport, &queue);
        // More buffers available than the queue holds (§2.7.13.3).
        queue.avail().idx().store(MOCK_QUEUE_SIZE + 1);
        transport.queue_events()[0].write(1).unwrap();
        assert_eq!(event_loop.run_with_timeout(1000).unwrap(), 1);
        let status = read(&mut transport, VIRTIO_MMIO_STATUS);
        assert_eq!(status, ACK | DRIVER | FEATURES_OK | DRIVER_OK | NEEDS_RESET);
        assert_eq!(
            read(&mut transport, VIRTIO_MMIO_INTERRUPT_STATUS),
            VIRTIO_MMIO_INT_CONFIG
        );
        assert_eq!(queue.used().idx().load(), 0);

        // The driver resets the device and sets it up again: it serves.
        write(&mut transport, VIRTIO_MMIO_STATUS, 0);
        assert_eq!(read(&mut transport, VIRTIO_MMIO_STATUS), 0);
        let queue = MockSplitQueue::new(&mem, MOCK_QUEUE_SIZE);
        negotiate(&mut transport);
        start_device(&mut transport, &queue);
        add_flush_request(&mem, &queue);
        transport.queue_events()[0].write(1).unwrap();
        assert_eq!(event_loop.run_with_timeout(1000).unwrap(), 1);
        assert_eq!(queue.used().idx().load(), 1);
    }

    #[test]
    fn a_restored_transport_goes_on_where_the_saved_one_stood() {
        let (mut transport, mem, mut event_loop) = driver_ok_fixture();
        let queue = MockSplitQueue::new(&mem, MOCK_QUEUE_SIZE);
        start_device(&mut transport, &queue);
        add_flush_request(&mem, &queue);
        transport.queue_events()[0].write(1).unwrap();
        event_loop.run_with_timeout(1000).unwrap();
        assert_eq!(queue.used().idx().load(), 1);
        // A request the driver made available just before the snapshot.
        add_flush_request(&mem, &queue);
        let saved = transport.save();
        let json = serde_json::to_string(&saved).unwrap();
        let saved: TransportState = serde_json::from_str(&json).unwrap();

        let image = tempfile::NamedTempFile::new().unwrap();
        image.as_file().set_len(DISK_SECTORS * 512).unwrap();
        let source = DiskSource::Raw(image.path().into());
        let block = Arc::new(Mutex::new(Block::new(&source, false).unwrap()));
        let mut restored = MmioTransport::restore((mem.clone(), block.clone()), &saved).unwrap();
        assert_eq!(restored.save(), saved);
        assert_eq!(
            read(&mut restored, VIRTIO_MMIO_INTERRUPT_STATUS),
            VIRTIO_MMIO_INT_VRING
        );
        // The restored device serves the pending request, and only that one.
        let mut event_loop = EventManager::<Arc<Mutex<Block>>>::new().unwrap();
        event_loop.add_subscriber(block);
        event_loop.run_with_timeout(1000).unwrap();
        assert_eq!(queue.used().idx().load(), 2);

        // A device with other features (read-only) is not the one saved.
        let read_only = Arc::new(Mutex::new(Block::new(&source, true).unwrap()));
        assert!(matches!(
            MmioTransport::restore((mem, read_only), &saved),
            Err(MmioError::Mismatch {
                what: "features",
                ..
            })
        ));
    }

    #[test]
    fn reset_returns_to_power_on_state() {
        let (mut transport, mem, mut event_loop) = driver_ok_fixture();
        let queue = MockSplitQueue::new(&mem, MOCK_QUEUE_SIZE);
        start_device(&mut transport, &queue);
        transport.interrupt.signal_config_change().unwrap();

        write(&mut transport, VIRTIO_MMIO_STATUS, 0);
        assert_eq!(read(&mut transport, VIRTIO_MMIO_STATUS), 0);
        assert_eq!(read(&mut transport, VIRTIO_MMIO_QUEUE_READY), 0);
        assert_eq!(transport.driver_features, 0);
        assert_eq!(transport.queues[0].size(), QUEUE_SIZE);
        assert_eq!(read(&mut transport, VIRTIO_MMIO_INTERRUPT_STATUS), 0);

        // The reset device no longer serves the old rings.
        add_flush_request(&mem, &queue);
        transport.queue_events()[0].write(1).unwrap();
        assert_eq!(event_loop.run_with_timeout(1000).unwrap(), 1);
        assert_eq!(queue.used().idx().load(), 0);
    }

    #[test]
    fn an_invalid_queue_fails_activation() {
        let Fixture {
            mut transport, mem, ..
        } = fixture();
        let queue = MockSplitQueue::new(&mem, MOCK_QUEUE_SIZE);
        negotiate(&mut transport);
        set_up_queue(&mut transport, &queue);
        // Move the used ring past the end of guest memory.
        write(&mut transport, VIRTIO_MMIO_QUEUE_USED_HIGH, 1);
        write(
            &mut transport,
            VIRTIO_MMIO_STATUS,
            ACK | DRIVER | FEATURES_OK | DRIVER_OK,
        );

        let status = read(&mut transport, VIRTIO_MMIO_STATUS);
        assert_eq!(
            status & VIRTIO_CONFIG_S_NEEDS_RESET,
            VIRTIO_CONFIG_S_NEEDS_RESET
        );
        assert_eq!(
            read(&mut transport, VIRTIO_MMIO_INTERRUPT_STATUS),
            VIRTIO_MMIO_INT_CONFIG
        );
        assert_eq!(transport.interrupt_event().read().unwrap(), 1);
    }

    /// A device whose only queue has a size virtio-queue cannot model.
    struct OddQueueDevice;

    impl VirtioDevice for OddQueueDevice {
        fn device_type(&self) -> u32 {
            2
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &[100]
        }
        fn queue_events(&self) -> &[EventFd] {
            &[]
        }
        fn features(&self) -> u64 {
            1 << VIRTIO_F_VERSION_1
        }
        fn read_config(&self, _: u64, _: &mut [u8]) {}
        fn write_config(&mut self, _: u64, _: &[u8]) {}
        fn activate(
            &mut self,
            _: u64,
            _: GuestMemoryMmap,
            _: Vec<Queue>,
            _: Arc<Interrupt>,
        ) -> Result<(), ActivateError> {
            Ok(())
        }
        fn reset(&mut self) {}
        fn queue_states(&self) -> Vec<virtio_queue::QueueState> {
            Vec::new()
        }
    }

    #[test]
    fn queue_sizes_must_be_powers_of_two() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x1000)]).unwrap();
        let err = MmioTransport::new(mem, Arc::new(Mutex::new(OddQueueDevice)))
            .err()
            .unwrap();
        assert!(matches!(
            err,
            MmioError::QueueSize {
                device_type: 2,
                index: 0,
                size: 100
            }
        ));
    }
}
