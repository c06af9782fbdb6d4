//! The one place that wires a VM together: memory, kernel, boot
//! structures, devices on their buses, vCPU threads, seccomp, and the event
//! loop that runs until the VM ends.
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kvm_bindings::KVM_MAX_CPUID_ENTRIES;
use kvm_ioctls::Kvm;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use crate::arch::x86_64::boot_params::{BootParams, BootParamsError};
use crate::arch::x86_64::gdt::BOOT_GDT;
use crate::arch::x86_64::layout::{
    BOOT_GDT_START, BOOT_IDT_START, CMDLINE_MAX_SIZE, CMDLINE_START, IRQ_MAX, IRQ_VIRTIO_FIRST,
    VIRTIO_MMIO_START,
};
use crate::arch::x86_64::{mptable, paging};
use crate::config::{Boot, DiskConfig, DiskSource, NetConfig, VmConfig, VsockConfig};
use crate::devices::bus::{Bus, BusError};
use crate::devices::i8042::{I8042, I8042_PORT, I8042_PORT_LEN};
use crate::devices::init_port::{INIT_PORT_LEN, InitPort, InitReport};
use crate::devices::lock;
use crate::devices::serial::{
    COM1_IRQ, COM1_PORT, RawTerminal, SERIAL_PORT_LEN, Serial, SerialError, SerialInput,
    SerialSnapshot,
};
use crate::devices::virtio::GuestMemoryMmap;
use crate::devices::virtio::block::{Block, BlockError};
use crate::devices::virtio::mmio::{MMIO_REGION_SIZE, MmioError, MmioTransport, TransportState};
use crate::devices::virtio::net::Net;
use crate::devices::virtio::net::bridge::{self, BridgeError};
use crate::devices::virtio::net::tap::TapError;
use crate::devices::virtio::vsock::{Vsock, VsockError};
use crate::event_loop::{EventLoop, EventLoopError, LoopEvent, StopSignals, VmEnd, VmEndSignal};
use crate::host::{self, HostVirt};
use crate::loader::{self, LoaderError};
use crate::rpc::{
    AfterSnapshot, ControlListener, ControlReplier, ControlReply, ControlRequest, SnapshotStats,
};
use crate::seccomp::{self, SeccompError, ThreadKind};
use crate::snapshot::{
    self, LoadedSnapshot, MEMORY_FILE, MachineState, NetState, ROOT_OVERLAY_FILE, STATE_FILE,
    SnapshotError,
};
use crate::vstate::memory::{self, MemoryError};
use crate::vstate::vcpu::{Vcpu, VcpuContext, VcpuError, Vcpus};
use crate::vstate::vm::{Vm, VmError};

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

/// Why a VM could not be booted or run.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    #[error(
        "this host has PVM, not hardware KVM: stock Linux guests cannot boot under it (see `kiln doctor`)"
    )]
    Pvm,
    #[error("no usable KVM: {0} (see `kiln doctor`)")]
    NoKvm(String),
    #[error("cannot open /dev/kvm: {0}")]
    OpenKvm(kvm_ioctls::Error),
    #[error("--vcpus {requested}: expected 1 to {max} on this host")]
    Vcpus { requested: u8, max: usize },
    #[error("no root disk: give at least one --disk")]
    NoDisk,
    #[error("{count} disks: at most {max} fit on the interrupt lines")]
    TooManyDisks { count: usize, max: usize },
    #[error("the kernel command line is {len} bytes; the limit is {max}")]
    Cmdline { len: usize, max: usize },
    #[error("disk {path}: {source}")]
    Disk { path: PathBuf, source: BlockError },
    #[error("disk {path}: {source}")]
    DiskDevice { path: PathBuf, source: MmioError },
    #[error("cannot remove the ephemeral disk file {path}: {source}")]
    Ephemeral {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Vsock(#[from] VsockError),
    #[error("vsock device: {0}")]
    VsockDevice(MmioError),
    #[error(transparent)]
    Tap(#[from] TapError),
    #[error(transparent)]
    Bridge(#[from] BridgeError),
    #[error("network device: {0}")]
    NetDevice(MmioError),
    #[error("cannot write the boot structures: {0}")]
    BootMemory(vm_memory::GuestMemoryError),
    #[error("cannot create an eventfd: {0}")]
    EventFd(std::io::Error),
    #[error("cannot take SIGTERM and SIGINT: {0}")]
    Signals(std::io::Error),
    #[error("snapshot {dir}: it has {saved} {what}, this VM {given}")]
    SnapshotShape {
        dir: PathBuf,
        what: &'static str,
        saved: usize,
        given: usize,
    },
    #[error("cannot delete the resumed snapshot {path}: {source}")]
    Consume {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the guest failed: {0}")]
    Guest(String),
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    #[error(transparent)]
    Memory(#[from] MemoryError),
    #[error(transparent)]
    Vm(#[from] VmError),
    #[error(transparent)]
    Loader(#[from] LoaderError),
    #[error(transparent)]
    BootParams(#[from] BootParamsError),
    #[error(transparent)]
    Mptable(#[from] mptable::MptableError),
    #[error(transparent)]
    Bus(#[from] BusError),
    #[error(transparent)]
    Serial(#[from] SerialError),
    #[error(transparent)]
    Mmio(#[from] MmioError),
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    #[error(transparent)]
    EventLoop(#[from] EventLoopError),
    #[error(transparent)]
    Seccomp(#[from] SeccompError),
}

/// Boots (or restores) the VM described by `config` and runs it to its
/// end, carrying out the requests that arrive on `control`. `started` is
/// when the caller began (the boot timer's zero).
pub fn run(
    config: &VmConfig,
    started: Instant,
    control: Option<ControlListener>,
) -> Result<VmOutcome, VmmError> {
    let kvm = open_kvm(config)?;
    let start = match &config.boot {
        Boot::Kernel(kernel) => Start::Kernel(kernel),
        Boot::Snapshot { dir, consume } => Start::Snapshot {
            snapshot: Box::new(load_snapshot(&kvm, dir, config)?),
            consume: *consume,
        },
    };
    let machine = match &start {
        Start::Snapshot { snapshot, .. } => Some(&snapshot.machine),
        Start::Kernel(_) => None,
    };
    let (mem, vm) = memory_and_vm(&kvm, &start, config)?;

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
    let legacy = legacy_devices(
        &vm,
        &mut event_loop,
        &end,
        &report,
        machine.map(|m| &m.serial),
    )?;
    let saved_disks = machine.map(|m| m.disks.as_slice());
    let mut slots = VirtioSlots::new(config)?;
    let disks = virtio_disks(
        &vm,
        &mem,
        &mut event_loop,
        &mut slots,
        &config.disks,
        saved_disks,
    )?;
    let vsock = virtio_vsock(
        &vm,
        &mem,
        &mut event_loop,
        &mut slots,
        config.vsock.as_ref(),
        machine.map(|m| m.vsock.as_ref()),
    )?;
    let net = virtio_net(
        &vm,
        &mem,
        &mut event_loop,
        &mut slots,
        config.net.as_ref(),
        machine.and_then(|m| m.net.as_ref()),
    )?;
    let (cmdline, vcpus) = match &start {
        Start::Kernel(kernel) => boot_vcpus(&kvm, &vm, &mem, kernel, config, &disks, &slots)?,
        Start::Snapshot { snapshot, consume } => restore_vcpus(&kvm, &vm, snapshot, *consume)?,
    };
    let memory_mib = machine.map_or(config.memory_mib, |m| m.memory_mib);

    // Raw mode before the guest prints; restored when this returns.
    let _terminal = RawTerminal::enable_if_tty()?;
    let stop = Arc::new(AtomicBool::new(false));
    let context = VcpuContext {
        pio: Arc::new(legacy.pio),
        mmio: Arc::new(slots.mmio),
        end: end.clone(),
        stop: stop.clone(),
        seccomp: config.seccomp,
    };
    let handles = vcpus
        .into_iter()
        .map(|vcpu| vcpu.spawn(context.clone()))
        .collect::<Result<Vec<_>, _>>()?;
    let mut machine = Machine {
        mem,
        vm,
        vcpus: Vcpus::new(handles, stop),
        serial: legacy.serial,
        transports: disks.transports,
        blocks: disks.blocks,
        vsock,
        net,
        end: end.clone(),
        cmdline,
        memory_mib,
        paused: false,
    };
    // Every thread exists and every file is open: from here on, only the
    // event loop's system calls.
    let ran = if config.seccomp {
        seccomp::install(ThreadKind::Vmm).map_err(VmmError::from)
    } else {
        Ok(())
    }
    .and_then(|()| serve(&mut event_loop, &mut machine, replier.as_ref()));
    machine.vcpus.stop();
    ran?;
    let exit_status = match end.reason() {
        VmEnd::Reset | VmEnd::Shutdown => report.exit_status().unwrap_or(0),
        VmEnd::Stop => report.exit_status().unwrap_or(STOPPED_STATUS),
        VmEnd::Error(reason) => return Err(VmmError::Guest(reason)),
    };
    Ok(VmOutcome {
        exit_status,
        boot_to_init: report.init_started().map(|at| at.duration_since(started)),
    })
}

/// KVM, checked to be hardware KVM that can run `config`'s vCPUs and disks.
fn open_kvm(config: &VmConfig) -> Result<Kvm, VmmError> {
    match host::detect() {
        HostVirt::HardwareKvm(_) => {}
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
    if config.disks.is_empty() {
        return Err(VmmError::NoDisk);
    }
    Ok(kvm)
}

/// The snapshot in `dir`, checked whole, of the shape `config` describes,
/// and taken on a CPU like this host's.
fn load_snapshot(kvm: &Kvm, dir: &Path, config: &VmConfig) -> Result<LoadedSnapshot, VmmError> {
    let snapshot = snapshot::load(dir)?;
    let machine = &snapshot.machine;
    let shape = |what, saved: usize, given: usize| {
        (saved != given).then(|| VmmError::SnapshotShape {
            dir: dir.to_path_buf(),
            what,
            saved,
            given,
        })
    };
    let mismatch = shape("vCPUs", machine.vcpus.len(), config.vcpus.into())
        .or_else(|| {
            shape(
                "MiB of memory",
                machine.memory_mib as usize,
                config.memory_mib as usize,
            )
        })
        .or_else(|| shape("disks", machine.disks.len(), config.disks.len()))
        .or_else(|| {
            // A guest that had a vsock device needs one (on any CID: it
            // re-reads it); one that had none gets none (see virtio_vsock).
            let given = usize::from(config.vsock.is_some());
            shape("vsock devices", usize::from(machine.vsock.is_some()), given)
                .filter(|_| machine.vsock.is_some())
        })
        .or_else(|| {
            // The guest's driver holds the NIC it had: it needs one again.
            shape(
                "network devices",
                usize::from(machine.net.is_some()),
                usize::from(config.net.is_some()),
            )
        });
    if let Some(err) = mismatch {
        return Err(err);
    }
    let supported = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(|source| VmError::Kvm {
            what: "KVM_GET_SUPPORTED_CPUID",
            source,
        })?;
    snapshot::check_cpu(&dir.join(STATE_FILE), &machine.vcpus[0].cpuid, &supported)?;
    Ok(snapshot)
}

/// Where a VM starts: [`Boot`], with the snapshot read and checked.
enum Start<'a> {
    Kernel(&'a Path),
    Snapshot {
        snapshot: Box<LoadedSnapshot>,
        consume: bool,
    },
}

/// Guest memory and the VM on it: fresh, or the snapshot's memory mapped
/// copy-on-write with its interrupt controllers, PIT and clock.
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
            let vm = Vm::new(kvm, &mem)?;
            vm.restore_state(&machine.vm)?;
            Ok((mem, vm))
        }
    }
}

/// A fresh boot: the kernel, the command line and boot structures in
/// memory, and vCPUs at the kernel's entry. Returns the command line.
fn boot_vcpus(
    kvm: &Kvm,
    vm: &Vm,
    mem: &GuestMemoryMmap,
    kernel: &Path,
    config: &VmConfig,
    disks: &VirtioDisks,
    slots: &VirtioSlots,
) -> Result<(String, Vec<Vcpu>), VmmError> {
    let entry = loader::load_kernel(mem, kernel)?;
    let cmdline = kernel_cmdline(config, disks.root_discards, &slots.params)?;
    let cr3 = write_boot_structures(mem, &cmdline, config)?;
    let vcpus = (0..config.vcpus)
        .map(|index| Vcpu::boot(kvm, vm, index, config.vcpus, entry, cr3))
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

/// Runs the event loop until the VM ends, carrying out control requests
/// as they come.
fn serve(
    event_loop: &mut EventLoop,
    machine: &mut Machine,
    replier: Option<&ControlReplier>,
) -> Result<(), VmmError> {
    loop {
        let request = match event_loop.run()? {
            LoopEvent::End => return Ok(()),
            LoopEvent::Control(request) => request,
        };
        let reply = machine.carry_out(request);
        if let Some(replier) = replier
            && let Err(err) = replier.send(&reply)
        {
            eprintln!("kiln: control: cannot answer: {err}");
        }
    }
}

/// A running VM's parts, as control requests need them.
struct Machine {
    mem: GuestMemoryMmap,
    vm: Vm,
    vcpus: Vcpus,
    serial: Arc<Mutex<Serial>>,
    transports: Vec<Arc<Mutex<MmioTransport>>>,
    blocks: Vec<Arc<Mutex<Block>>>,
    /// The vsock device's transport, after the disks'.
    vsock: Option<Arc<Mutex<MmioTransport>>>,
    /// The NIC, last.
    net: Option<NetDevice>,
    end: Arc<VmEndSignal>,
    cmdline: String,
    memory_mib: u32,
    /// Whether the VMM process has paused the vCPUs.
    paused: bool,
}

impl Machine {
    fn carry_out(&mut self, request: ControlRequest) -> ControlReply {
        let done = match request {
            ControlRequest::Pause => self.set_paused(true).map(|()| None),
            ControlRequest::Resume if !self.paused => Err("the VM is not paused".to_string()),
            ControlRequest::Resume => self.set_paused(false).map(|()| None),
            ControlRequest::Snapshot {
                dir,
                copy_root,
                then,
            } => self.snapshot(&dir, copy_root, then).map(Some),
        };
        match done {
            Ok(snapshot) => ControlReply {
                error: None,
                snapshot,
            },
            Err(error) => ControlReply {
                error: Some(error),
                snapshot: None,
            },
        }
    }

    fn set_paused(&mut self, paused: bool) -> Result<(), String> {
        let changed = if paused {
            self.vcpus.pause()
        } else {
            self.vcpus.resume()
        };
        changed.map_err(|err| err.to_string())?;
        self.paused = paused;
        Ok(())
    }

    /// Pauses the VM (unless it is paused), writes a snapshot into `dir`,
    /// and goes on or ends as `then` says.
    fn snapshot(
        &mut self,
        dir: &Path,
        copy_root: bool,
        then: AfterSnapshot,
    ) -> Result<SnapshotStats, String> {
        let begun = Instant::now();
        let was_paused = self.paused;
        self.set_paused(true)?;
        let paused_at = Instant::now();
        let written = self.write_snapshot(dir, copy_root);
        match then {
            AfterSnapshot::Continue if !was_paused => self.set_paused(false)?,
            AfterSnapshot::Continue => {}
            // The VM stays paused and ends: the snapshot is where it goes on.
            AfterSnapshot::Stop if written.is_ok() => self.end.signal(VmEnd::Stop),
            AfterSnapshot::Stop => self.set_paused(was_paused)?,
        }
        let mut stats = written.map_err(|err| err.to_string())?;
        stats.paused_us = paused_at.elapsed().as_micros() as u64;
        stats.total_us = begun.elapsed().as_micros() as u64;
        Ok(stats)
    }

    /// The snapshot's files, with the vCPUs parked: memory, the root
    /// disk's writes if asked, then the state file, whose presence says
    /// the rest is whole.
    fn write_snapshot(&self, dir: &Path, copy_root: bool) -> Result<SnapshotStats, SnapshotError> {
        let io_err = |path: PathBuf| move |source| SnapshotError::Io { path, source };
        let vcpus = self.vcpus.save()?;
        let vm = self.vm.save_state()?;
        let serial = lock(&self.serial).save();
        let disks = self.transports.iter().map(|t| lock(t).save()).collect();
        let vsock = self.vsock.as_ref().map(|t| lock(t).save());
        let net = self.net.as_ref().map(|nic| NetState {
            mac: nic.mac,
            transport: lock(&nic.transport).save(),
        });
        for block in &self.blocks {
            lock(block).flush()?;
        }
        let memory_path = dir.join(MEMORY_FILE);
        let memory_file = File::create(&memory_path).map_err(io_err(memory_path.clone()))?;
        let memory = memory::save_sparse(&self.mem, &memory_file)?;
        let root_bytes = match (copy_root, self.blocks.first()) {
            (true, Some(root)) => {
                let path = dir.join(ROOT_OVERLAY_FILE);
                lock(root)
                    .copy_writes_to(&path)
                    .map_err(io_err(path.clone()))?
            }
            _ => 0,
        };
        let state = MachineState {
            memory_mib: self.memory_mib,
            cmdline: self.cmdline.clone(),
            vm,
            vcpus,
            serial,
            disks,
            vsock,
            net,
        };
        let state_path = dir.join(STATE_FILE);
        snapshot::write_state(&state_path, &state)?;
        let state_bytes = std::fs::metadata(&state_path)
            .map_err(io_err(state_path.clone()))?
            .len();
        Ok(SnapshotStats {
            memory_bytes: memory.total_bytes,
            memory_written: memory.written_bytes,
            state_bytes,
            root_bytes,
            ..SnapshotStats::default()
        })
    }
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
    vm: &Vm,
    event_loop: &mut EventLoop,
    end: &VmEndSignal,
    report: &Arc<InitReport>,
    saved: Option<&SerialSnapshot>,
) -> Result<LegacyDevices, VmmError> {
    let mut pio = Bus::new();
    let serial_irq = EventFd::new(0).map_err(VmmError::EventFd)?;
    vm.register_irqfd(&serial_irq, COM1_IRQ)?;
    let out = Box::new(std::io::stdout());
    let serial = match saved {
        Some(saved) => Serial::restore(serial_irq, out, saved)?,
        None => Serial::new(serial_irq, out),
    };
    let serial = Arc::new(Mutex::new(serial));
    event_loop.add(Arc::new(Mutex::new(SerialInput::stdin(serial.clone())?)));
    pio.insert(serial.clone(), COM1_PORT.into(), SERIAL_PORT_LEN)?;
    let reset = end.trigger().map_err(VmmError::EventFd)?;
    pio.insert(
        Arc::new(Mutex::new(I8042::new(reset))),
        I8042_PORT.into(),
        I8042_PORT_LEN,
    )?;
    let init_port = InitPort::new(report.clone());
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
        vm.register_irqfd(transport.interrupt_event(), irq)?;
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

/// One virtio-mmio block device per disk, each in a slot of its own;
/// restored from `saved` (in the same order) when the VM goes on from a
/// snapshot.
fn virtio_disks(
    vm: &Vm,
    mem: &GuestMemoryMmap,
    event_loop: &mut EventLoop,
    slots: &mut VirtioSlots,
    disks: &[DiskConfig],
    saved: Option<&[TransportState]>,
) -> Result<VirtioDisks, VmmError> {
    let mut devices = VirtioDisks {
        transports: Vec::new(),
        blocks: Vec::new(),
        root_discards: false,
    };
    for (index, disk) in disks.iter().enumerate() {
        let block = open_disk(disk)?;
        if index == 0 {
            devices.root_discards = block.discards();
        }
        let block = Arc::new(Mutex::new(block));
        let transport = match saved.and_then(|saved| saved.get(index)) {
            Some(state) => MmioTransport::restore(mem.clone(), block.clone(), state),
            None => MmioTransport::new(mem.clone(), block.clone()),
        }
        .map_err(|source| VmmError::DiskDevice {
            path: disk.source.path().to_path_buf(),
            source,
        })?;
        let transport = slots.attach(vm, transport)?;
        event_loop.add(block.clone());
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
fn virtio_vsock(
    vm: &Vm,
    mem: &GuestMemoryMmap,
    event_loop: &mut EventLoop,
    slots: &mut VirtioSlots,
    config: Option<&VsockConfig>,
    saved: Option<Option<&TransportState>>,
) -> Result<Option<Arc<Mutex<MmioTransport>>>, VmmError> {
    let Some(config) = config else {
        return Ok(None);
    };
    if saved == Some(None) {
        eprintln!(
            "kiln: the snapshot's guest has no vsock device: {} is not served",
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
        Some(state) => MmioTransport::restore(mem.clone(), vsock.clone(), state),
        None => MmioTransport::new(mem.clone(), vsock.clone()),
    }
    .map_err(VmmError::VsockDevice)?;
    let transport = slots.attach(vm, transport)?;
    event_loop.add(vsock);
    Ok(Some(transport))
}

/// A VM's NIC: its transport, and the MAC its guest knows.
struct NetDevice {
    transport: Arc<Mutex<MmioTransport>>,
    mac: [u8; 6],
}

/// The NIC, in the slot after the others: its tap created (and joined to
/// its bridge) here, before seccomp. Restored from `saved`, it keeps the
/// MAC the guest knows.
fn virtio_net(
    vm: &Vm,
    mem: &GuestMemoryMmap,
    event_loop: &mut EventLoop,
    slots: &mut VirtioSlots,
    config: Option<&NetConfig>,
    saved: Option<&NetState>,
) -> Result<Option<NetDevice>, VmmError> {
    let Some(config) = config else {
        return Ok(None);
    };
    let mut config = config.clone();
    if let Some(saved) = saved {
        config.mac = saved.mac;
    }
    let net = Net::new(&config)?;
    if let Some(bridge) = &config.bridge {
        bridge::attach(bridge, net.tap().name())?;
    }
    let net = Arc::new(Mutex::new(net));
    let transport = match saved {
        Some(saved) => MmioTransport::restore(mem.clone(), net.clone(), &saved.transport),
        None => MmioTransport::new(mem.clone(), net.clone()),
    }
    .map_err(VmmError::NetDevice)?;
    let transport = slots.attach(vm, transport)?;
    event_loop.add(net);
    Ok(Some(NetDevice {
        transport,
        mac: config.mac,
    }))
}

/// Opens a disk's block device; an ephemeral disk's file goes at once.
fn open_disk(disk: &DiskConfig) -> Result<Block, VmmError> {
    let block = Block::new(&disk.source, disk.read_only).map_err(|source| VmmError::Disk {
        path: disk.source.path().to_path_buf(),
        source,
    })?;
    let file = match &disk.source {
        DiskSource::Raw(path) => Some(path),
        DiskSource::Volume { overlay, .. } => overlay.as_ref(),
    };
    if let Some(path) = file.filter(|_| disk.ephemeral) {
        std::fs::remove_file(path).map_err(|source| VmmError::Ephemeral {
            path: path.clone(),
            source,
        })?;
    }
    Ok(block)
}

fn kernel_cmdline(
    config: &VmConfig,
    root_discards: bool,
    devices: &[String],
) -> Result<String, VmmError> {
    let root = &config.disks[0];
    let mut words: Vec<&str> = BASE_CMDLINE.to_vec();
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
