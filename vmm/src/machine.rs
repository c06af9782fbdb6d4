//! A built VM, running: [`Machine`] owns its memory, its KVM VM, its vCPU
//! threads, its devices and its event loop, puts the VMM thread under its
//! seccomp filter, and carries out the control channel's requests between
//! events until the VM ends. [`crate::builder`] makes one; snapshots of it
//! are [`crate::persist`]'s.
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::builder::VmmError;
use crate::config::DiskSource;
use crate::devices::init_port::InitReport;
use crate::devices::ioapic::Ioapic;
use crate::devices::lock;
use crate::devices::serial::{RawTerminal, Serial};
use crate::devices::virtio::GuestMemoryMmap;
use crate::devices::virtio::block::{AttachError, Block, DetachError};
use crate::devices::virtio::mmio::MmioTransport;
use crate::devices::virtio::net::Net;
use crate::event_loop::{EventLoop, LoopEvent, VmEnd, VmEndSignal};
use crate::rpc::{ControlReplier, ControlReply, ControlRequest};
use crate::seccomp::{self, ThreadKind};
use crate::snapshot::SnapshotError;
use crate::vstate::vcpu::{VcpuError, Vcpus};
use crate::vstate::vm::Vm;

/// `kiln run`'s exit status for a VMM error, as `docker run` uses 125:
/// distinct from any status a guest's entrypoint reports.
pub const VMM_ERROR_STATUS: u8 = 125;

/// The exit status of a VM stopped from the host before the guest
/// reported one: 128 + SIGTERM, as a shell reports a terminated process.
pub const STOPPED_STATUS: u8 = 128 + 15;

/// How a VM ended.
#[derive(Debug)]
pub struct VmOutcome {
    /// The entrypoint's status as guest-init reported it; 0 when the guest
    /// reset without a report.
    pub exit_status: u8,
    /// From `started` to guest-init's InitStarted report.
    pub boot_to_init: Option<Duration>,
}

/// The devices of a machine, as a snapshot needs them: each in the
/// order of its slot.
pub(crate) struct Devices {
    /// The IOAPIC, which routes every device's interrupt line.
    pub(crate) ioapic: Arc<Mutex<Ioapic>>,
    /// COM1, the console.
    pub(crate) serial: Arc<Mutex<Serial>>,
    /// The block devices' transports, /dev/vda first.
    pub(crate) transports: Vec<Arc<Mutex<MmioTransport>>>,
    /// The block devices behind them, to flush and copy.
    pub(crate) blocks: Vec<Arc<Mutex<Block>>>,
    /// The vsock device's transport, after the disks'.
    pub(crate) vsock: Option<Arc<Mutex<MmioTransport>>>,
    /// The NIC, last.
    pub(crate) net: Option<NetDevice>,
}

impl Devices {
    /// Fills empty drive `index` with `source` and tells the driver.
    fn attach_disk(&self, index: usize, source: &DiskSource) -> Result<(), RequestError> {
        self.change_disk("attachdisk", index, |block| {
            block
                .attach(source)
                .map_err(|source| RequestError::Attach { index, source })
        })
    }

    /// Empties filled slot `index` and tells the driver.
    fn detach_disk(&self, index: usize) -> Result<(), RequestError> {
        self.change_disk("detachdisk", index, |block| {
            block
                .detach()
                .map_err(|source| RequestError::Detach { index, source })
        })
    }

    /// Changes the disk in drive `index` with `change`, then raises the
    /// configuration change interrupt. The transport stays locked
    /// meanwhile (then the device: a vCPU's order), so the driver sees
    /// the new capacity only with the new generation.
    fn change_disk(
        &self,
        op: &'static str,
        index: usize,
        change: impl FnOnce(&mut Block) -> Result<(), RequestError>,
    ) -> Result<(), RequestError> {
        let (Some(transport), Some(block)) = (self.transports.get(index), self.blocks.get(index))
        else {
            return Err(RequestError::NoSuchDisk {
                op,
                index,
                disks: self.blocks.len(),
            });
        };
        let mut transport = lock(transport);
        change(&mut lock(block))?;
        transport
            .config_changed()
            .map_err(|source| RequestError::ConfigInterrupt { op, index, source })
    }
}

/// A VM's NIC: the device and its transport.
pub(crate) struct NetDevice {
    pub(crate) net: Arc<Mutex<Net>>,
    pub(crate) transport: Arc<Mutex<MmioTransport>>,
}

/// A VM, built and ready to run.
pub struct Machine {
    pub(crate) mem: GuestMemoryMmap,
    pub(crate) vm: Vm,
    pub(crate) vcpus: Vcpus,
    pub(crate) devices: Devices,
    pub(crate) end: Arc<VmEndSignal>,
    /// The kernel command line the guest booted with.
    pub(crate) cmdline: String,
    pub(crate) memory_mib: u32,
    /// Whether the control channel has paused the vCPUs.
    pub(crate) paused: bool,
    pub(crate) event_loop: EventLoop,
    /// Where the control channel's answers go, if the VM has one.
    pub(crate) replier: Option<ControlReplier>,
    /// What guest-init has reported.
    pub(crate) report: Arc<InitReport>,
    /// The boot timer's zero.
    pub(crate) started: Instant,
    /// Whether the VMM thread goes under its seccomp filter.
    pub(crate) seccomp: bool,
    /// The terminal in raw mode while the VM runs, if stdin is one.
    pub(crate) _terminal: Option<RawTerminal>,
}

/// Why a control request was not carried out.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    /// `resume` of a VM that runs.
    #[error("the VM is not paused")]
    NotPaused,
    /// The vCPU threads did not park or go on.
    #[error(transparent)]
    Vcpus(#[from] VcpuError),
    /// `attachdisk` or `detachdisk` of a drive the VM does not have.
    #[error("{op}: disk {index}: the VM has {disks} disk(s), expected an index below")]
    NoSuchDisk {
        /// The request's name.
        op: &'static str,
        /// The drive asked for.
        index: usize,
        /// How many the VM has.
        disks: usize,
    },
    /// `attachdisk` of a drive that cannot take the disk.
    #[error("attachdisk: disk {index}")]
    Attach {
        /// The drive asked for.
        index: usize,
        /// Why it cannot.
        #[source]
        source: AttachError,
    },
    /// `detachdisk` of a drive that cannot be emptied.
    #[error("detachdisk: disk {index}")]
    Detach {
        /// The drive asked for.
        index: usize,
        /// Why it cannot.
        #[source]
        source: DetachError,
    },
    /// The drive's disk changed, but the driver could not be told.
    #[error("{op}: disk {index}: cannot raise the configuration change interrupt")]
    ConfigInterrupt {
        /// The request's name.
        op: &'static str,
        /// The drive.
        index: usize,
        /// What the eventfd said.
        #[source]
        source: std::io::Error,
    },
    /// A snapshot of a pod's VM: a drive slot, empty or filled since boot.
    #[error(
        "snapshot: disk {index} is a drive slot (a pod's, filled after boot or empty): a pod's VM is not snapshotted"
    )]
    SnapshotOfSlot {
        /// The first slot's position in the VM's disks.
        index: usize,
    },
    /// The snapshot could not be written.
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
}

impl Machine {
    /// Runs the VM to its end: every thread exists and every file is open,
    /// so the VMM thread goes under its seccomp filter and from then on
    /// makes only the event loop's system calls.
    pub fn run(mut self) -> Result<VmOutcome, VmmError> {
        let ran = if self.seccomp {
            seccomp::install(ThreadKind::Vmm).map_err(VmmError::from)
        } else {
            Ok(())
        }
        .and_then(|()| self.serve());
        self.vcpus.stop();
        ran?;
        let report = &self.report;
        let exit_status = match self.end.reason() {
            VmEnd::Reset | VmEnd::Shutdown => report.exit_status().unwrap_or(0),
            VmEnd::Stop => report.exit_status().unwrap_or(STOPPED_STATUS),
            VmEnd::Error(reason) => return Err(VmmError::Guest(reason)),
        };
        Ok(VmOutcome {
            exit_status,
            boot_to_init: report
                .init_started()
                .map(|at| at.duration_since(self.started)),
        })
    }

    /// Runs the event loop until the VM ends, carrying out control
    /// requests as they come.
    fn serve(&mut self) -> Result<(), VmmError> {
        loop {
            let request = match self.event_loop.run()? {
                LoopEvent::End => return Ok(()),
                LoopEvent::Control(request) => request,
            };
            let reply = self.carry_out(request);
            if let Some(replier) = &self.replier
                && let Err(err) = replier.send(&reply)
            {
                log::error!("control: cannot answer: {err}");
            }
        }
    }

    fn carry_out(&mut self, request: ControlRequest) -> ControlReply {
        let done = match request {
            ControlRequest::Pause => self.set_paused(true).map(|()| None),
            ControlRequest::Resume if !self.paused => Err(RequestError::NotPaused),
            ControlRequest::Resume => self.set_paused(false).map(|()| None),
            ControlRequest::Snapshot {
                dir,
                copy_root,
                then,
            } => self.snapshot(&dir, copy_root, then).map(Some),
            ControlRequest::AttachDisk { index, source } => {
                self.devices.attach_disk(index, &source).map(|()| None)
            }
            ControlRequest::DetachDisk { index } => self.devices.detach_disk(index).map(|()| None),
        };
        match done {
            Ok(snapshot) => ControlReply {
                error: None,
                snapshot,
            },
            Err(err) => ControlReply::failed(&err),
        }
    }

    /// Parks the vCPUs outside the guest, or lets them go on.
    pub(crate) fn set_paused(&mut self, paused: bool) -> Result<(), RequestError> {
        if paused {
            self.vcpus.pause()?;
        } else {
            self.vcpus.resume()?;
        }
        self.paused = paused;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use vmm_sys_util::eventfd::EventFd;

    use super::*;
    use crate::devices::bus::BusDevice;
    use crate::devices::virtio::VirtioDevice;
    use crate::report::one_line;
    use crate::vstate::memory;

    /// A root disk of one sector, then an empty drive.
    fn pod_devices(dir: &std::path::Path) -> Devices {
        let mem = memory::create(16).unwrap();
        let root = dir.join("root.img");
        std::fs::write(&root, [0u8; 512]).unwrap();
        let blocks: Vec<_> = [DiskSource::Raw(root), DiskSource::Empty]
            .iter()
            .map(|source| Arc::new(Mutex::new(Block::new(source, false).unwrap())))
            .collect();
        let transports = blocks
            .iter()
            .map(|b| {
                Arc::new(Mutex::new(
                    MmioTransport::new(mem.clone(), b.clone()).unwrap(),
                ))
            })
            .collect();
        Devices {
            ioapic: Arc::new(Mutex::new(Ioapic::unrouted())),
            serial: Arc::new(Mutex::new(Serial::new(
                EventFd::new(0).unwrap(),
                Box::new(std::io::sink()),
            ))),
            transports,
            blocks,
            vsock: None,
            net: None,
        }
    }

    #[test]
    fn attachdisk_fills_an_empty_drive_and_refuses_any_other_by_value() {
        let dir = tempfile::tempdir().unwrap();
        let devices = pod_devices(dir.path());
        let container = DiskSource::Raw(dir.path().join("container.img"));
        std::fs::write(dir.path().join("container.img"), [0u8; 4096]).unwrap();
        let err = devices.attach_disk(2, &container).unwrap_err();
        assert_eq!(
            one_line(&err),
            "attachdisk: disk 2: the VM has 2 disk(s), expected an index below"
        );
        let err = devices.attach_disk(0, &container).unwrap_err();
        assert!(
            one_line(&err).starts_with("attachdisk: disk 0: the drive holds ")
                && one_line(&err).ends_with("root.img: expected an empty drive"),
            "{}",
            one_line(&err)
        );
        let err = devices.attach_disk(1, &DiskSource::Empty).unwrap_err();
        assert!(
            one_line(&err).contains("disk 1: the source is empty"),
            "{}",
            one_line(&err)
        );

        devices.attach_disk(1, &container).unwrap();
        assert_eq!(generation(&devices, 1), 1);
        let interrupts = lock(&devices.transports[1]).interrupt_event().read();
        assert_eq!(interrupts.unwrap(), 1);
        let err = devices.attach_disk(1, &container).unwrap_err();
        assert!(
            one_line(&err).contains("expected an empty drive"),
            "{}",
            one_line(&err)
        );
        // The filled slot still makes the VM one a snapshot refuses.
        assert_eq!(devices.first_slot(), Some(1));
    }

    fn generation(devices: &Devices, index: usize) -> u32 {
        let mut generation = [0u8; 4];
        let register = u64::from(virtio_bindings::virtio_mmio::VIRTIO_MMIO_CONFIG_GENERATION);
        lock(&devices.transports[index]).read(register, &mut generation);
        u32::from_le_bytes(generation)
    }

    #[test]
    fn detachdisk_empties_a_filled_slot_and_tells_the_driver() {
        let dir = tempfile::tempdir().unwrap();
        let devices = pod_devices(dir.path());
        let err = devices.detach_disk(1).unwrap_err();
        assert_eq!(
            one_line(&err),
            "detachdisk: disk 1: the drive is empty: expected a slot filled by attachdisk"
        );
        let err = devices.detach_disk(0).unwrap_err();
        assert!(
            one_line(&err).starts_with("detachdisk: disk 0: the drive holds ")
                && one_line(&err).ends_with("expected a drive slot (built empty)"),
            "{}",
            one_line(&err)
        );
        let err = devices.detach_disk(5).unwrap_err();
        assert_eq!(
            one_line(&err),
            "detachdisk: disk 5: the VM has 2 disk(s), expected an index below"
        );
        assert_eq!(generation(&devices, 1), 0, "a refusal changes nothing");

        let container = dir.path().join("container.img");
        std::fs::write(&container, [0u8; 4096]).unwrap();
        devices.attach_disk(1, &DiskSource::Raw(container)).unwrap();
        devices.detach_disk(1).unwrap();
        assert_eq!(generation(&devices, 1), 2);
        let transport = lock(&devices.transports[1]);
        // Both changes were signalled; the eventfd counts them.
        assert_eq!(transport.interrupt_event().read().unwrap(), 2);
        drop(transport);
        let mut capacity = [0xffu8; 8];
        lock(&devices.blocks[1]).read_config(0, &mut capacity);
        assert_eq!(capacity, [0; 8]);

        let next = dir.path().join("next.img");
        std::fs::write(&next, [0u8; 1024]).unwrap();
        devices.attach_disk(1, &DiskSource::Raw(next)).unwrap();
        assert_eq!(generation(&devices, 1), 3);
    }
}
