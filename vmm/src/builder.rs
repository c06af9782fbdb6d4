//! The one place that wires a VM together: memory, kernel, boot
//! structures, devices on their buses and vCPU threads, fresh or from a
//! snapshot. [`build`] returns the [`Machine`] that owns them all, which
//! then runs ([`crate::machine`]) until the VM ends.
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use kvm_ioctls::Kvm;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use crate::arch::x86_64::boot_params::{BootParams, BootParamsError};
use crate::arch::x86_64::gdt::BOOT_GDT;
use crate::arch::x86_64::layout::{
    BOOT_GDT_START, BOOT_IDT_START, CMDLINE_MAX_SIZE, CMDLINE_START, IOAPIC_START, IRQ_MAX,
    IRQ_VIRTIO_FIRST, VIRTIO_MMIO_START,
};
use crate::arch::x86_64::{mptable, paging};
use crate::config::{Boot, DiskConfig, DiskSource, NetConfig, VmConfig, VsockConfig};
use crate::devices::bus::{Bus, BusError};
use crate::devices::i8042::{I8042, I8042_PORT, I8042_PORT_LEN};
use crate::devices::init_port::{INIT_PORT_LEN, InitPort, InitReport};
use crate::devices::ioapic::{IOAPIC_MMIO_SIZE, Ioapic, IoapicError, IoapicState};
use crate::devices::persist::Persist;
use crate::devices::serial::{
    COM1_IRQ, COM1_PORT, RawTerminal, SERIAL_PORT_LEN, Serial, SerialError, SerialInput,
    SerialSnapshot,
};
use crate::devices::virtio::GuestMemoryMmap;
use crate::devices::virtio::block::{Block, BlockError};
use crate::devices::virtio::mmio::{MMIO_REGION_SIZE, MmioError, MmioTransport, TransportState};
use crate::devices::virtio::net::Net;
use crate::devices::virtio::net::tap::{Tap, TapError};
use crate::devices::virtio::vsock::{Vsock, VsockError};
use crate::event_loop::{EventLoop, EventLoopError, StopSignals, VmEndSignal};
use crate::host::{self, HostVirt};
use crate::loader::{self, LoaderError};
use crate::machine::{Devices, Machine, NetDevice, VmOutcome};
use crate::persist;
use crate::rpc::{ControlListener, ControlReplier};
use crate::seccomp::SeccompError;
use crate::snapshot::working_set::{WORKING_SET_FILE, WorkingSet};
use crate::snapshot::{LoadedSnapshot, MachineState, NetState, SnapshotError};
use crate::trace;
use crate::vstate::memory::{self, MemoryError};
use crate::vstate::vcpu::{Vcpu, VcpuContext, VcpuError, Vcpus};
use crate::vstate::vm::{Vm, VmError, supported_cpuid};

/// virtio-mmio's queue notification register (virtio 1.2 §4.2.2).
const VIRTIO_MMIO_QUEUE_NOTIFY: u64 = 0x50;

/// Kiln's part of the kernel command line; each word has its reason.
const BASE_CMDLINE: &[&str] = &[
    // The console is the 8250 UART at COM1.
    "console=ttyS0",
    // Reboot through the i8042 reset line the VMM emulates: the VM ends at
    // once (the default tries ACPI first, which the guest lacks).
    "reboot=k",
    // A panicking guest reboots, and so ends, instead of hanging.
    "panic=-1",
    // Each console byte is a VM exit: keep boot messages out of the way
    // (add `loglevel=7` with --cmdline to see them).
    "quiet",
    // Tells guest-init that Kiln's VMM listens on the guest-init port.
    guest_init::protocol::VMM_CMDLINE_FLAG,
];

/// Why a VM could not be booted or run.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    /// `/dev/kvm` is PVM: a stock kernel's privileged instructions would
    /// be emulated, which Kiln refuses (`kiln doctor` explains).
    #[error(
        "this host has PVM, not hardware KVM: stock Linux guests cannot boot under it (see `kiln doctor`)"
    )]
    Pvm,
    /// No KVM at all, and why (`kiln doctor`'s words).
    #[error("no usable KVM: {0} (see `kiln doctor`)")]
    NoKvm(String),
    /// `/dev/kvm` exists but cannot be opened.
    #[error("cannot open /dev/kvm")]
    OpenKvm(#[source] kvm_ioctls::Error),
    /// More vCPUs than KVM or the MP table allow, or none.
    #[error("--vcpus {requested}: expected 1 to {max} on this host")]
    Vcpus {
        /// What was asked for.
        requested: u8,
        /// The most this host and the MP table take.
        max: usize,
    },
    /// More virtio devices than interrupt lines.
    #[error("{count} disks: at most {max} fit on the interrupt lines")]
    TooManyDisks {
        /// The disks asked for.
        count: usize,
        /// The most that fit beside the VM's other devices.
        max: usize,
    },
    /// The kernel command line does not fit the kernel's buffer.
    #[error("the kernel command line is {len} bytes; the limit is {max}")]
    Cmdline {
        /// Its length.
        len: usize,
        /// The longest the kernel takes (less the terminating NUL).
        max: usize,
    },
    /// A disk's file cannot back a block device.
    #[error("disk {index} of the VM definition")]
    Disk {
        /// Its position in [`VmConfig::disks`].
        index: usize,
        /// Why.
        #[source]
        source: BlockError,
    },
    /// A disk's transport cannot be made or restored.
    #[error("disk {index} of the VM definition")]
    DiskDevice {
        /// Its position in [`VmConfig::disks`].
        index: usize,
        /// Why.
        #[source]
        source: MmioError,
    },
    /// The first disk, which the kernel mounts as the root filesystem,
    /// is an empty drive.
    #[error(
        "disk 0 of the VM definition is the root filesystem: expected a disk, not an empty drive"
    )]
    EmptyRoot,
    /// An empty drive marked ephemeral: it has no file to delete, and the
    /// disk attached to it later is the attacher's to delete.
    #[error("disk {index} of the VM definition is empty and ephemeral: expected ephemeral false")]
    EphemeralEmpty {
        /// Its position in [`VmConfig::disks`].
        index: usize,
    },
    /// An ephemeral disk's file cannot be unlinked once open.
    #[error("cannot remove the ephemeral disk file {path}")]
    Ephemeral {
        /// The file.
        path: PathBuf,
        /// What the file system said.
        #[source]
        source: std::io::Error,
    },
    /// The vsock device cannot be made (its CID or its socket).
    #[error(transparent)]
    Vsock(#[from] VsockError),
    /// The vsock device's transport cannot be made or restored.
    #[error("vsock device")]
    VsockDevice(#[source] MmioError),
    /// The NIC's device cannot be made around its tap.
    #[error(transparent)]
    Tap(#[from] TapError),
    /// A NIC came without its tap, or a tap without a NIC.
    #[error(
        "the VM definition's NIC (tap {nic:?}) and the taps passed ({passed}) do not match: expected one tap exactly when there is a NIC"
    )]
    TapMismatch {
        /// The tap the definition's NIC names, if it has one.
        nic: Option<String>,
        /// How many taps were passed.
        passed: usize,
    },
    /// The NIC's transport cannot be made or restored.
    #[error("network device")]
    NetDevice(#[source] MmioError),
    /// The command line, boot parameters or tables do not fit in memory.
    #[error("cannot write the boot structures")]
    BootMemory(#[source] vm_memory::GuestMemoryError),
    /// The kernel gave no eventfd.
    #[error("cannot create an eventfd")]
    EventFd(#[source] std::io::Error),
    /// The stop signals' handlers cannot be installed.
    #[error("cannot take SIGTERM and SIGINT")]
    Signals(#[source] std::io::Error),
    /// A snapshot of another shape than the VM asked for.
    #[error("snapshot {dir}: it has {saved} {what}, this VM {given}")]
    SnapshotShape {
        /// The snapshot.
        dir: PathBuf,
        /// What differs ("vCPUs", "disks", …).
        what: &'static str,
        /// How many the snapshot has.
        saved: usize,
        /// How many this VM has.
        given: usize,
    },
    /// A restore onto an empty drive: a snapshot's guest had every disk
    /// it knows filled (a pod's VM, with drive slots, is never
    /// snapshotted), and its driver would find the disk gone.
    #[error(
        "snapshot {dir}: disk {index} of the VM definition is empty, expected the disk the snapshot's guest had"
    )]
    SnapshotOntoSlot {
        /// The snapshot.
        dir: PathBuf,
        /// The empty drive's position in [`VmConfig::disks`].
        index: usize,
    },
    /// A hibernation, restored, cannot be deleted.
    #[error("cannot delete the resumed snapshot {path}")]
    Consume {
        /// The snapshot.
        path: PathBuf,
        /// What the file system said.
        #[source]
        source: std::io::Error,
    },
    /// The VM ended on an error of a vCPU (a KVM exit Kiln cannot serve).
    #[error("the guest failed: {0}")]
    Guest(String),
    /// The snapshot cannot be read or restored.
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    /// Guest memory cannot be made or mapped.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// A KVM VM-level call failed.
    #[error(transparent)]
    Vm(#[from] VmError),
    /// The kernel cannot be loaded.
    #[error(transparent)]
    Loader(#[from] LoaderError),
    /// The zero page cannot be written.
    #[error(transparent)]
    BootParams(#[from] BootParamsError),
    /// The MP table cannot be written.
    #[error(transparent)]
    Mptable(#[from] mptable::MptableError),
    /// Two devices claim one address range.
    #[error(transparent)]
    Bus(#[from] BusError),
    /// The console cannot be set up.
    #[error(transparent)]
    Serial(#[from] SerialError),
    /// The saved IOAPIC cannot be restored.
    #[error(transparent)]
    Ioapic(#[from] IoapicError),
    /// A virtio transport cannot be made.
    #[error(transparent)]
    Mmio(#[from] MmioError),
    /// A vCPU cannot be made, restored or started.
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    /// The event loop failed.
    #[error(transparent)]
    EventLoop(#[from] EventLoopError),
    /// The VMM thread's seccomp filter cannot be installed.
    #[error(transparent)]
    Seccomp(#[from] SeccompError),
}

/// Boots (or restores) the VM described by `config` and runs it to its
/// end, carrying out the requests that arrive on `control`. `started` is
/// when the caller began (the boot timer's zero); `tap` is the NIC's tap,
/// opened by the caller's supervisor, exactly when `config` has a NIC.
pub fn run(
    config: &VmConfig,
    started: Instant,
    control: Option<ControlListener>,
    tap: Option<Tap>,
) -> Result<VmOutcome, VmmError> {
    build(config, started, control, tap)?.run()
}

/// Builds the VM `config` describes, fresh or from its snapshot, with
/// every device on its bus and every vCPU thread started (parked until
/// [`Machine::run`]), and returns the machine that owns it all. `tap` is
/// the NIC's, given exactly when `config` has a NIC.
pub fn build(
    config: &VmConfig,
    started: Instant,
    control: Option<ControlListener>,
    tap: Option<Tap>,
) -> Result<Machine, VmmError> {
    let kvm = open_kvm(config)?;
    trace::mark("kvm-opened");
    let start = Start::read(&kvm, config)?;
    trace::mark("snapshot-read");
    let saved = start.saved();
    let (mem, vm) = memory_and_vm(&kvm, &start, config)?;
    trace::mark("memory-mapped");

    let mut events = Events::new(config, started, control)?;
    let mut made = make_devices(&vm, &mem, &mut events, config, saved, tap)?;
    trace::mark("devices-made");
    let (cmdline, vcpus) = set_vcpus(&kvm, &vm, &mem, &start, config, &mut made)?;
    trace::mark("vcpus-set");

    // Raw mode before the guest prints; restored when the machine goes.
    let terminal = RawTerminal::enable_if_tty()?;
    let vcpus = spawn_vcpus(
        vcpus,
        made.pio,
        made.slots.mmio,
        &events.end,
        config.seccomp,
    )?;
    trace::mark("vcpus-started");
    Ok(Machine {
        mem,
        vm,
        vcpus,
        devices: made.devices,
        end: events.end,
        cmdline,
        memory_mib: saved.map_or(config.memory_mib, |m| m.memory_mib),
        paused: false,
        event_loop: events.event_loop,
        replier: events.replier,
        report: events.report,
        started,
        seccomp: config.seccomp,
        _terminal: terminal,
    })
}

/// KVM, checked to be hardware KVM (or PVM, opted into for the stub
/// guest: [`host::pvm_allowed`]) that can run `config`'s vCPUs. A VM may
/// have no disk: the kernel command line then names no root.
fn open_kvm(config: &VmConfig) -> Result<Kvm, VmmError> {
    match host::detect() {
        HostVirt::HardwareKvm(_) => {}
        HostVirt::Pvm if host::pvm_allowed() => {}
        HostVirt::Pvm => return Err(VmmError::Pvm),
        HostVirt::Unavailable { reason } => return Err(VmmError::NoKvm(reason)),
    }
    let kvm = Kvm::new().map_err(VmmError::OpenKvm)?;
    let max = kvm.get_max_vcpus().min(mptable::max_vcpus());
    if config.vcpus == 0 || usize::from(config.vcpus) > max {
        return Err(VmmError::Vcpus {
            requested: config.vcpus,
            max,
        });
    }
    Ok(kvm)
}

/// Where a VM starts: [`Boot`], with the snapshot read and checked.
enum Start<'a> {
    Kernel(&'a Path),
    Snapshot {
        snapshot: Box<LoadedSnapshot>,
        consume: bool,
    },
}

impl<'a> Start<'a> {
    /// Where `config` boots from: its kernel, or its snapshot, read and
    /// checked against `config` and this host.
    fn read(kvm: &Kvm, config: &'a VmConfig) -> Result<Self, VmmError> {
        Ok(match &config.boot {
            Boot::Kernel(kernel) => Start::Kernel(kernel),
            Boot::Snapshot { dir, consume } => Start::Snapshot {
                snapshot: Box::new(persist::load_snapshot(kvm, dir, config)?),
                consume: *consume,
            },
        })
    }

    /// The snapshot's machine, which the VM goes on from, if any.
    fn saved(&self) -> Option<&MachineState> {
        match self {
            Start::Snapshot { snapshot, .. } => Some(&snapshot.machine),
            Start::Kernel(_) => None,
        }
    }
}

/// Guest memory and the VM on it: fresh, or the snapshot's memory mapped
/// copy-on-write with its interrupt controllers and clock.
fn memory_and_vm(
    kvm: &Kvm,
    start: &Start<'_>,
    config: &VmConfig,
) -> Result<(GuestMemoryMmap, Vm), VmmError> {
    match start {
        Start::Kernel(_) => {
            let mem = memory::create(config.memory_mib)?;
            let vm = Vm::new(kvm, &mem)?;
            Ok((mem, vm))
        }
        Start::Snapshot { snapshot, .. } => {
            let machine = &snapshot.machine;
            let mem = memory::map_private(&snapshot.memory_file(), machine.memory_mib)?;
            prefetch_working_set(snapshot, &mem, machine.memory_mib);
            let vm = Vm::new(kvm, &mem)?;
            vm.restore_state(&machine.vm)?;
            Ok((mem, vm))
        }
    }
}

/// Maps the pages the snapshot's working set lists ahead of the guest
/// (REAP: [`crate::snapshot::working_set`]), when it has one. A record that
/// cannot be read or used costs only the head start: a warning, and the
/// guest faults its pages in as it would without one.
fn prefetch_working_set(snapshot: &LoadedSnapshot, mem: &GuestMemoryMmap, memory_mib: u32) {
    let path = snapshot.dir.join(WORKING_SET_FILE);
    let pages = (u64::from(memory_mib) << 20) / memory::PAGE_SIZE as u64;
    let prefetched = match WorkingSet::read(&path, pages) {
        Ok(None) => return,
        Ok(Some(set)) => memory::prefetch(mem, &set)
            .map_err(|err| format!("cannot map {}'s pages ahead: {err}", path.display())),
        Err(err) => Err(crate::report::one_line(&err)),
    };
    match prefetched {
        Ok(bytes) => log::info!("mapped {} KiB of the working set ahead", bytes >> 10),
        Err(why) => log::warn!("{why}; the restored guest faults its pages in itself"),
    }
}

/// The VMM thread's side of the VM: the signal that the VM ended, what
/// guest-init reports, and the event loop that waits on the end, the stop
/// signals, the control channel and the devices.
struct Events {
    end: Arc<VmEndSignal>,
    report: Arc<InitReport>,
    event_loop: EventLoop,
    /// Where the control channel's answers go, if the VM has one.
    replier: Option<ControlReplier>,
}

impl Events {
    /// The event loop with SIGTERM and SIGINT, and `control` if given, in
    /// it. The report announces the boot (timed from `started`) when
    /// `config` asks.
    fn new(
        config: &VmConfig,
        started: Instant,
        control: Option<ControlListener>,
    ) -> Result<Self, VmmError> {
        let end = VmEndSignal::new().map_err(VmmError::EventFd)?;
        let report = if config.announce_boot {
            InitReport::announcing(started)
        } else {
            InitReport::new()
        };
        let mut event_loop = EventLoop::new(end.clone())?;
        let stop_signals = StopSignals::new(end.clone()).map_err(VmmError::Signals)?;
        event_loop.add(Arc::new(Mutex::new(stop_signals)));
        let replier = control
            .map(|listener| {
                let replier = listener.replier().map_err(VmmError::EventFd)?;
                event_loop.add_control(listener);
                Ok::<_, VmmError>(replier)
            })
            .transpose()?;
        Ok(Self {
            end,
            report,
            event_loop,
            replier,
        })
    }
}

/// The devices, made and on their buses.
struct MadeDevices {
    /// What the machine keeps of them.
    devices: Devices,
    /// The legacy devices' port I/O bus.
    pio: Bus,
    /// The virtio devices' slots: their MMIO bus, the command line's
    /// parameters and every interrupt line.
    slots: VirtioSlots,
    /// Whether the root disk's device offers DISCARD.
    root_discards: bool,
}

/// The IOAPIC and the legacy devices, then a virtio slot each for the
/// disks, the vsock device and the NIC (around `tap`), in that order;
/// restored from `saved` when the VM goes on from a snapshot.
fn make_devices(
    vm: &Vm,
    mem: &GuestMemoryMmap,
    events: &mut Events,
    config: &VmConfig,
    saved: Option<&MachineState>,
    tap: Option<Tap>,
) -> Result<MadeDevices, VmmError> {
    let mut slots = VirtioSlots::new(config)?;
    let ioapic = ioapic(vm, config.vcpus, saved.map(|m| &m.ioapic))?;
    slots
        .mmio
        .insert(ioapic.clone(), IOAPIC_START, IOAPIC_MMIO_SIZE)?;
    let legacy = legacy_devices(&mut slots.irqs, events, saved.map(|m| &m.serial))?;
    let mut virtio = VirtioWiring {
        vm,
        mem,
        event_loop: &mut events.event_loop,
        slots: &mut slots,
    };
    let disks = virtio.disks(
        &config.disks,
        saved.map(|m| m.disks.as_slice()),
        config.seccomp,
    )?;
    let vsock = virtio.vsock(config.vsock.as_ref(), saved.map(|m| m.vsock.as_ref()))?;
    let net = virtio.net(
        (config.net.as_ref(), tap),
        saved.and_then(|m| m.net.as_ref()),
    )?;
    Ok(MadeDevices {
        devices: Devices {
            ioapic,
            serial: legacy.serial,
            transports: disks.transports,
            blocks: disks.blocks,
            vsock,
            net,
        },
        pio: legacy.pio,
        slots,
        root_discards: disks.root_discards,
    })
}

/// The vCPUs, at the kernel's entry or going on from the snapshot, and
/// then the devices' interrupt lines (not before: [`IrqLines`]). Returns
/// the command line the guest boots, or booted, with.
fn set_vcpus(
    kvm: &Kvm,
    vm: &Vm,
    mem: &GuestMemoryMmap,
    start: &Start<'_>,
    config: &VmConfig,
    made: &mut MadeDevices,
) -> Result<(String, Vec<Vcpu>), VmmError> {
    let (cmdline, vcpus) = match start {
        Start::Kernel(kernel) => boot_vcpus(kvm, vm, mem, kernel, config, made)?,
        Start::Snapshot { snapshot, consume } => restore_vcpus(kvm, vm, snapshot, *consume)?,
    };
    std::mem::take(&mut made.slots.irqs).connect(vm)?;
    Ok((cmdline, vcpus))
}

/// A fresh boot: the kernel, the command line and boot structures in
/// memory, and vCPUs at the kernel's entry, all shown what this host's KVM
/// supports, asked once ([`supported_cpuid`]). Returns the command line.
fn boot_vcpus(
    kvm: &Kvm,
    vm: &Vm,
    mem: &GuestMemoryMmap,
    kernel: &Path,
    config: &VmConfig,
    made: &MadeDevices,
) -> Result<(String, Vec<Vcpu>), VmmError> {
    let entry = loader::load_kernel(mem, kernel)?;
    let cmdline = kernel_cmdline(config, made.root_discards, &made.slots.params)?;
    let cr3 = write_boot_structures(mem, &cmdline, config)?;
    let supported = supported_cpuid(kvm)?;
    let count = config.vcpus;
    let vcpus = (0..count)
        .map(|index| Vcpu::boot(kvm, vm, &supported, index, count, entry, cr3))
        .collect::<Result<Vec<_>, _>>()?;
    Ok((cmdline, vcpus))
}

/// vCPUs that go on from `snapshot`, which is deleted if `consume`d.
/// Returns the command line the snapshot's guest booted with.
fn restore_vcpus(
    kvm: &Kvm,
    vm: &Vm,
    snapshot: &LoadedSnapshot,
    consume: bool,
) -> Result<(String, Vec<Vcpu>), VmmError> {
    let vcpus = snapshot
        .machine
        .vcpus
        .iter()
        .map(|state| Vcpu::restore(kvm, vm, state))
        .collect::<Result<Vec<_>, _>>()?;
    if consume {
        std::fs::remove_dir_all(&snapshot.dir).map_err(|source| VmmError::Consume {
            path: snapshot.dir.clone(),
            source,
        })?;
    }
    Ok((snapshot.machine.cmdline.clone(), vcpus))
}

/// A thread for each vCPU (under its seccomp filter when `seccomp`), its
/// exits going to the `pio` and `mmio` buses, parked until
/// [`Machine::run`].
fn spawn_vcpus(
    vcpus: Vec<Vcpu>,
    pio: Bus,
    mmio: Bus,
    end: &Arc<VmEndSignal>,
    seccomp: bool,
) -> Result<Vcpus, VmmError> {
    let stop = Arc::new(AtomicBool::new(false));
    let context = VcpuContext {
        pio: Arc::new(pio),
        mmio: Arc::new(mmio),
        end: end.clone(),
        stop: stop.clone(),
        seccomp,
    };
    let handles = vcpus
        .into_iter()
        .map(|vcpu| vcpu.spawn(context.clone()))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Vcpus::new(handles, stop))
}

/// The IOAPIC of a VM of `vcpus` vCPUs (with the MP table's ID), every
/// pin masked, or as `saved` had it, its pins routed in KVM again.
fn ioapic(vm: &Vm, vcpus: u8, saved: Option<&IoapicState>) -> Result<Arc<Mutex<Ioapic>>, VmmError> {
    let router = Box::new(vm.gsi_routing());
    let chip = match saved {
        Some(saved) => Ioapic::restore(router, saved)?,
        None => Ioapic::new(mptable::ioapic_id(vcpus), router),
    };
    Ok(Arc::new(Mutex::new(chip)))
}

/// The legacy devices on the port I/O bus, and the console among them.
struct LegacyDevices {
    pio: Bus,
    serial: Arc<Mutex<Serial>>,
}

/// COM1 (from `saved` when restoring), the i8042 (its reset line ends the
/// VM) and the guest-init port. The i8042 and the guest-init port keep no
/// state a snapshot needs: the guest has no i8042 driver (Kiln's kernel
/// only pulses its reset line), and guest-init's reports are events, not
/// state.
fn legacy_devices(
    irqs: &mut IrqLines,
    events: &mut Events,
    saved: Option<&SerialSnapshot>,
) -> Result<LegacyDevices, VmmError> {
    let mut pio = Bus::new();
    let serial_irq = EventFd::new(0).map_err(VmmError::EventFd)?;
    irqs.add(&serial_irq, COM1_IRQ)?;
    let out = Box::new(std::io::stdout());
    let serial = match saved {
        Some(saved) => Serial::restore((serial_irq, out), saved)?,
        None => Serial::new(serial_irq, out),
    };
    let serial = Arc::new(Mutex::new(serial));
    let input = SerialInput::stdin(serial.clone())?;
    events.event_loop.add(Arc::new(Mutex::new(input)));
    pio.insert(serial.clone(), COM1_PORT.into(), SERIAL_PORT_LEN)?;
    let reset = events.end.trigger().map_err(VmmError::EventFd)?;
    pio.insert(
        Arc::new(Mutex::new(I8042::new(reset))),
        I8042_PORT.into(),
        I8042_PORT_LEN,
    )?;
    let init_port = InitPort::new(events.report.clone());
    pio.insert(
        Arc::new(Mutex::new(init_port)),
        guest_init::protocol::INIT_PORT.into(),
        INIT_PORT_LEN,
    )?;
    Ok(LegacyDevices { pio, serial })
}

/// The virtio-mmio slots: one 4 KiB region and one interrupt line per
/// device, handed out in order (the disks, the vsock device, the NIC), so a
/// device's slot is the same at every boot and restore of the VM.
struct VirtioSlots {
    mmio: Bus,
    /// The `virtio_mmio.device=` parameters through which the guest finds them.
    params: Vec<String>,
    /// Every device's interrupt line (the UART's too), to be connected
    /// once the vCPUs are set.
    irqs: IrqLines,
}

/// Device interrupt lines waiting to become KVM irqfds.
///
/// They are connected only once the vCPUs exist and hold their saved
/// LAPIC state. A restored device raises again an interrupt that was
/// pending when the snapshot was taken (the UART's, a virtio transport's
/// InterruptStatus): one the guest may never have seen, since KVM may
/// inject an irqfd's edge from a work queue that can still be pending when
/// the vCPUs park and their LAPICs are read. KVM injects a count that is
/// already on an eventfd as the irqfd is assigned; raised into a VM
/// without vCPUs, its MSI would reach no LAPIC, and KVM_SET_LAPIC would
/// overwrite it anyway. A lost UART interrupt leaves
/// the guest's 8250 driver waiting forever to send more: a silent guest.
#[derive(Default)]
struct IrqLines(Vec<(EventFd, u32)>);

impl IrqLines {
    /// Line `gsi` is to be raised by writing `evt`.
    fn add(&mut self, evt: &EventFd, gsi: u32) -> Result<(), VmmError> {
        let evt = evt.try_clone().map_err(VmmError::EventFd)?;
        self.0.push((evt, gsi));
        Ok(())
    }

    /// Registers every line with KVM (which keeps its own reference to
    /// each eventfd).
    fn connect(self, vm: &Vm) -> Result<(), VmmError> {
        for (evt, gsi) in &self.0 {
            vm.register_irqfd(evt, *gsi)?;
        }
        Ok(())
    }
}

impl VirtioSlots {
    /// Slots for `config`'s devices, which must fit the interrupt lines.
    fn new(config: &VmConfig) -> Result<Self, VmmError> {
        let max = (IRQ_MAX - IRQ_VIRTIO_FIRST + 1) as usize;
        let others = usize::from(config.vsock.is_some()) + usize::from(config.net.is_some());
        if config.disks.len() + others > max {
            return Err(VmmError::TooManyDisks {
                count: config.disks.len(),
                max: max - others,
            });
        }
        Ok(Self {
            mmio: Bus::new(),
            params: Vec::new(),
            irqs: IrqLines::default(),
        })
    }

    /// Slot `index`'s MMIO region base and interrupt line.
    fn slot(index: usize) -> (u64, u32) {
        (
            VIRTIO_MMIO_START + index as u64 * MMIO_REGION_SIZE,
            IRQ_VIRTIO_FIRST + index as u32,
        )
    }

    /// Puts `transport` in the next slot: its queue notifications become
    /// ioeventfds, its interrupt an irqfd, and the guest learns of it from
    /// the command line.
    fn attach(
        &mut self,
        vm: &Vm,
        transport: MmioTransport,
    ) -> Result<Arc<Mutex<MmioTransport>>, VmmError> {
        let (base, irq) = Self::slot(self.params.len());
        for (queue, evt) in transport.queue_events().iter().enumerate() {
            vm.register_ioevent(evt, base + VIRTIO_MMIO_QUEUE_NOTIFY, queue as u32)?;
        }
        self.irqs.add(transport.interrupt_event(), irq)?;
        let transport = Arc::new(Mutex::new(transport));
        self.mmio
            .insert(transport.clone(), base, MMIO_REGION_SIZE)?;
        self.params
            .push(format!("virtio_mmio.device=4K@{base:#x}:{irq}"));
        Ok(transport)
    }
}

/// The virtio disks, and what the kernel command line needs of them.
struct VirtioDisks {
    transports: Vec<Arc<Mutex<MmioTransport>>>,
    blocks: Vec<Arc<Mutex<Block>>>,
    /// Whether the root disk's device offers DISCARD.
    root_discards: bool,
}

/// What a virtio device is wired into: guest memory for its queues, the
/// VM for its ioeventfds, the next of the slots, and the event loop that
/// serves it.
struct VirtioWiring<'a> {
    vm: &'a Vm,
    mem: &'a GuestMemoryMmap,
    event_loop: &'a mut EventLoop,
    slots: &'a mut VirtioSlots,
}

impl VirtioWiring<'_> {
    /// One virtio-mmio block device per disk, each in a slot of its own;
    /// restored from `saved` (in the same order) when the VM goes on from a
    /// snapshot. Their prefetch workers go under seccomp when `seccomp`.
    fn disks(
        &mut self,
        disks: &[DiskConfig],
        saved: Option<&[TransportState]>,
        seccomp: bool,
    ) -> Result<VirtioDisks, VmmError> {
        let mut devices = VirtioDisks {
            transports: Vec::new(),
            blocks: Vec::new(),
            root_discards: false,
        };
        for (index, disk) in disks.iter().enumerate() {
            let block = open_disk(index, disk, seccomp)?;
            if index == 0 {
                devices.root_discards = block.discards();
            }
            let block = Arc::new(Mutex::new(block));
            let transport = match saved.and_then(|saved| saved.get(index)) {
                Some(state) => MmioTransport::restore((self.mem.clone(), block.clone()), state),
                None => MmioTransport::new(self.mem.clone(), block.clone()),
            }
            .map_err(|source| VmmError::DiskDevice { index, source })?;
            let transport = self.slots.attach(self.vm, transport)?;
            self.event_loop.add(block.clone());
            devices.transports.push(transport);
            devices.blocks.push(block);
        }
        Ok(devices)
    }

    /// The vsock device, in the slot after the disks, listening on its
    /// socket from here on (before seccomp). `saved` is `None` on a fresh
    /// boot and the snapshot's transport otherwise: a restored device has no
    /// connections, and tells the guest with a transport reset event. A
    /// snapshot of a guest that had no vsock device gets none.
    fn vsock(
        &mut self,
        config: Option<&VsockConfig>,
        saved: Option<Option<&TransportState>>,
    ) -> Result<Option<Arc<Mutex<MmioTransport>>>, VmmError> {
        let Some(config) = config else {
            return Ok(None);
        };
        if saved == Some(None) {
            log::warn!(
                "the snapshot's guest has no vsock device: {} is not served",
                config.socket.display()
            );
            return Ok(None);
        }
        let mut vsock = Vsock::new(config)?;
        if saved.is_some() {
            vsock.schedule_transport_reset();
        }
        let vsock = Arc::new(Mutex::new(vsock));
        let transport = match saved.flatten() {
            Some(state) => MmioTransport::restore((self.mem.clone(), vsock.clone()), state),
            None => MmioTransport::new(self.mem.clone(), vsock.clone()),
        }
        .map_err(VmmError::VsockDevice)?;
        let transport = self.slots.attach(self.vm, transport)?;
        self.event_loop.add(vsock);
        Ok(Some(transport))
    }

    /// The NIC, in the slot after the others, around its tap (created and
    /// joined to its bridge by the supervisor). Restored from `saved`, it
    /// keeps the MAC the guest knows.
    fn net(
        &mut self,
        nic: (Option<&NetConfig>, Option<Tap>),
        saved: Option<&NetState>,
    ) -> Result<Option<NetDevice>, VmmError> {
        let (config, tap) = match nic {
            (None, None) => return Ok(None),
            (Some(config), Some(tap)) => (config, tap),
            (config, tap) => {
                return Err(VmmError::TapMismatch {
                    nic: config.map(|config| config.tap.clone()),
                    passed: usize::from(tap.is_some()),
                });
            }
        };
        let net = match saved {
            Some(saved) => Net::restore(tap, &saved.device)?,
            None => Net::new(tap, config.mac)?,
        };
        let net = Arc::new(Mutex::new(net));
        let transport = match saved {
            Some(saved) => {
                MmioTransport::restore((self.mem.clone(), net.clone()), &saved.transport)
            }
            None => MmioTransport::new(self.mem.clone(), net.clone()),
        }
        .map_err(VmmError::NetDevice)?;
        let transport = self.slots.attach(self.vm, transport)?;
        self.event_loop.add(net.clone());
        Ok(Some(NetDevice { net, transport }))
    }
}

/// Opens a disk's block device, with its hydration cache's prefetch
/// workers (under their seccomp filter when `seccomp`); an ephemeral
/// disk's file goes at once. `index` is its place in the definition.
fn open_disk(index: usize, disk: &DiskConfig, seccomp: bool) -> Result<Block, VmmError> {
    if index == 0 && disk.source == DiskSource::Empty {
        return Err(VmmError::EmptyRoot);
    }
    let disk_error = |source| VmmError::Disk { index, source };
    let mut block = Block::new(&disk.source, disk.read_only).map_err(disk_error)?;
    block.start_prefetch(seccomp).map_err(disk_error)?;
    let file = match &disk.source {
        DiskSource::Raw(path) => Some(path),
        DiskSource::Volume { overlay, .. } => overlay.as_ref(),
        DiskSource::Empty if disk.ephemeral => return Err(VmmError::EphemeralEmpty { index }),
        DiskSource::Empty => None,
    };
    if let Some(path) = file.filter(|_| disk.ephemeral) {
        std::fs::remove_file(path).map_err(|source| VmmError::Ephemeral {
            path: path.clone(),
            source,
        })?;
    }
    Ok(block)
}

/// Kiln's words, the root disk's (if any), the devices', then the user's.
fn kernel_cmdline(
    config: &VmConfig,
    root_discards: bool,
    devices: &[String],
) -> Result<String, VmmError> {
    let mut words: Vec<&str> = BASE_CMDLINE.to_vec();
    // The first disk is the root filesystem; a VM without disks (the stub
    // guest, which needs none) is told of no root.
    if let Some(root) = config.disks.first() {
        words.push(if root.read_only {
            "root=/dev/vda ro"
        } else {
            "root=/dev/vda rw"
        });
        if root_discards {
            // ext4 trims blocks as files are deleted, so a volume's overlay
            // shrinks back instead of only growing.
            words.push("rootflags=discard");
        }
    }
    words.extend(devices.iter().map(String::as_str));
    words.push(config.extra_cmdline.trim());
    let cmdline = words.join(" ").trim_end().to_string();
    // The kernel's buffer holds the terminating NUL too.
    if cmdline.len() >= CMDLINE_MAX_SIZE {
        return Err(VmmError::Cmdline {
            len: cmdline.len(),
            max: CMDLINE_MAX_SIZE - 1,
        });
    }
    Ok(cmdline)
}

/// Command line, zero page, MP table, GDT/IDT and page tables; returns CR3.
fn write_boot_structures(
    mem: &GuestMemoryMmap,
    cmdline: &str,
    config: &VmConfig,
) -> Result<u64, VmmError> {
    let mut bytes = cmdline.as_bytes().to_vec();
    bytes.push(0);
    mem.write_slice(&bytes, GuestAddress(CMDLINE_START))
        .map_err(VmmError::BootMemory)?;
    BootParams::new(cmdline.len(), u64::from(config.memory_mib) << 20)?.write_to(mem)?;
    mptable::write(mem, config.vcpus)?;
    for (index, entry) in BOOT_GDT.iter().enumerate() {
        mem.write_obj(*entry, GuestAddress(BOOT_GDT_START + index as u64 * 8))
            .map_err(VmmError::BootMemory)?;
    }
    mem.write_obj(0u64, GuestAddress(BOOT_IDT_START))
        .map_err(VmmError::BootMemory)?;
    paging::write_identity_map(mem).map_err(VmmError::BootMemory)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(disks: &[(&str, bool)], extra: &str) -> VmConfig {
        VmConfig {
            boot: Boot::Kernel("vmlinux".into()),
            disks: disks
                .iter()
                .map(|(p, ro)| DiskConfig {
                    source: DiskSource::Raw(p.into()),
                    read_only: *ro,
                    ephemeral: false,
                })
                .collect(),
            vcpus: 1,
            memory_mib: 128,
            extra_cmdline: extra.into(),
            seccomp: true,
            vsock: None,
            net: None,
            announce_boot: false,
        }
    }

    /// The slots' parameters, as `VirtioSlots` reports them.
    fn params(params: &[&str]) -> Vec<String> {
        params.iter().map(|p| p.to_string()).collect()
    }

    #[test]
    fn command_line_has_the_root_the_devices_and_the_users_words_last() {
        let params = ["virtio_mmio.device=4K@0xd0000000:5"];
        let line = kernel_cmdline(
            &config(&[("root.ext4", true)], " kiln.entrypoint=/x "),
            false,
            &self::params(&params),
        )
        .unwrap();
        assert!(
            line.starts_with("console=ttyS0 reboot=k panic=-1 quiet kiln.vmm=1 root=/dev/vda ro"),
            "{line}"
        );
        assert!(
            line.ends_with("virtio_mmio.device=4K@0xd0000000:5 kiln.entrypoint=/x"),
            "{line}"
        );
        let writable = config(&[("root.ext4", false)], "");
        let rw = kernel_cmdline(&writable, false, &[]).unwrap();
        assert!(rw.ends_with("root=/dev/vda rw"), "{rw}");
        // A root device that offers DISCARD (a writable volume) is trimmed.
        let trims = kernel_cmdline(&writable, true, &[]).unwrap();
        assert!(
            trims.ends_with("root=/dev/vda rw rootflags=discard"),
            "{trims}"
        );
    }

    #[test]
    fn a_vm_without_disks_is_told_of_no_root() {
        let line = kernel_cmdline(&config(&[], "kiln.stub=beat"), false, &[]).unwrap();
        assert_eq!(
            line,
            "console=ttyS0 reboot=k panic=-1 quiet kiln.vmm=1 kiln.stub=beat"
        );
    }

    #[test]
    fn devices_take_consecutive_slots_and_the_vsock_one_counts() {
        assert_eq!(VirtioSlots::slot(0), (0xd000_0000, 5));
        // Two disks, then the vsock device.
        assert_eq!(VirtioSlots::slot(2), (0xd000_2000, 7));
        let mut full = config(&[("r", false); 19], "");
        assert!(VirtioSlots::new(&full).is_ok());
        full.vsock = Some(VsockConfig {
            cid: 3,
            socket: "v.sock".into(),
        });
        assert!(matches!(
            VirtioSlots::new(&full),
            Err(VmmError::TooManyDisks { count: 19, max: 18 })
        ));
    }

    #[test]
    fn an_empty_drive_is_a_slot_but_never_the_root_nor_ephemeral() {
        let slot = |ephemeral| DiskConfig {
            source: DiskSource::Empty,
            read_only: false,
            ephemeral,
        };
        assert!(open_disk(1, &slot(false), false).unwrap().is_slot());
        assert!(matches!(
            open_disk(0, &slot(false), false),
            Err(VmmError::EmptyRoot)
        ));
        let err = open_disk(2, &slot(true), false).err().unwrap();
        assert_eq!(
            crate::report::one_line(&err),
            "disk 2 of the VM definition is empty and ephemeral: expected ephemeral false"
        );
    }

    #[test]
    fn an_overlong_command_line_is_refused() {
        let long = "x".repeat(CMDLINE_MAX_SIZE);
        assert!(matches!(
            kernel_cmdline(&config(&[("r", false)], &long), false, &[]),
            Err(VmmError::Cmdline { .. })
        ));
    }

    #[test]
    fn boot_structures_fit_the_smallest_guest() {
        let mem = memory::create(16).unwrap();
        let cr3 =
            write_boot_structures(&mem, "console=ttyS0", &config(&[("r", false)], "")).unwrap();
        assert_eq!(cr3, crate::arch::x86_64::layout::PML4_START);
        let mut signature = [0u8; 4];
        mem.read_slice(
            &mut signature,
            GuestAddress(crate::arch::x86_64::layout::EBDA_START),
        )
        .unwrap();
        assert_eq!(&signature, b"_MP_");
    }
}
