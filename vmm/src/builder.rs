//! The one place that wires a VM together: memory, kernel, boot
//! structures, devices on their buses, vCPU threads, seccomp, and the event
//! loop that runs until the VM ends.
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

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
use crate::devices::bus::{Bus, BusError};
use crate::devices::i8042::{I8042, I8042_PORT, I8042_PORT_LEN};
use crate::devices::init_port::{INIT_PORT_LEN, InitPort, InitReport};
use crate::devices::serial::{
    COM1_IRQ, COM1_PORT, RawTerminal, SERIAL_PORT_LEN, Serial, SerialError, SerialInput,
};
use crate::devices::virtio::GuestMemoryMmap;
pub use crate::devices::virtio::block::DiskSource;
use crate::devices::virtio::block::{Block, BlockError};
use crate::devices::virtio::mmio::{MMIO_REGION_SIZE, MmioError, MmioTransport};
use crate::event_loop::{EventLoop, EventLoopError, StopSignals, VmEnd, VmEndSignal};
use crate::host::{self, HostVirt};
use crate::loader::{self, LoaderError};
use crate::seccomp::{self, SeccompError, ThreadKind};
use crate::vstate::memory::{self, MemoryError};
use crate::vstate::vcpu::{self, Vcpu, VcpuContext, VcpuError};
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

/// A disk the guest sees as a virtio block device (/dev/vda, vdb, …).
#[derive(Clone, Debug)]
pub struct DiskConfig {
    pub source: DiskSource,
    pub read_only: bool,
    /// The VMM deletes the disk's file (a raw image, or a volume's
    /// overlay) as soon as it has opened it: the data lives exactly as
    /// long as the VM, and goes even when the VMM is killed.
    pub ephemeral: bool,
}

/// Everything needed to boot one VM.
#[derive(Clone, Debug)]
pub struct VmConfig {
    /// An uncompressed vmlinux ELF.
    pub kernel: PathBuf,
    /// The first is the root filesystem.
    pub disks: Vec<DiskConfig>,
    pub vcpus: u8,
    pub memory_mib: u32,
    /// Appended to Kiln's kernel command line.
    pub extra_cmdline: String,
    /// Off only for debugging (`kiln run --no-seccomp`).
    pub seccomp: bool,
}

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
    TooManyDisks { count: usize, max: u32 },
    #[error("the kernel command line is {len} bytes; the limit is {max}")]
    Cmdline { len: usize, max: usize },
    #[error("disk {path}: {source}")]
    Disk { path: PathBuf, source: BlockError },
    #[error("cannot remove the ephemeral disk file {path}: {source}")]
    Ephemeral {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write the boot structures: {0}")]
    BootMemory(vm_memory::GuestMemoryError),
    #[error("cannot create an eventfd: {0}")]
    EventFd(std::io::Error),
    #[error("cannot take SIGTERM and SIGINT: {0}")]
    Signals(std::io::Error),
    #[error("the guest failed: {0}")]
    Guest(String),
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

/// Boots the VM described by `config` and runs it to its end. `started`
/// is when the caller began (the boot timer's zero).
pub fn run(config: &VmConfig, started: Instant) -> Result<VmOutcome, VmmError> {
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
    let mem = memory::create(config.memory_mib)?;
    let vm = Vm::new(&kvm, &mem)?;
    let entry = loader::load_kernel(&mem, &config.kernel)?;

    let end = VmEndSignal::new().map_err(VmmError::EventFd)?;
    let report = InitReport::new();
    let mut event_loop = EventLoop::new(end.clone())?;
    let stop_signals = StopSignals::new(end.clone()).map_err(VmmError::Signals)?;
    event_loop.add(Arc::new(Mutex::new(stop_signals)));
    let pio = legacy_devices(&vm, &mut event_loop, &end, &report)?;
    let disks = virtio_disks(&vm, &mem, &mut event_loop, &config.disks)?;
    let cmdline = kernel_cmdline(config, &disks)?;
    let cr3 = write_boot_structures(&mem, &cmdline, config)?;

    // Raw mode before the guest prints; restored when this returns.
    let _terminal = RawTerminal::enable_if_tty()?;
    let stop = Arc::new(AtomicBool::new(false));
    let context = VcpuContext {
        pio: Arc::new(pio),
        mmio: Arc::new(disks.mmio),
        end: end.clone(),
        stop: stop.clone(),
        seccomp: config.seccomp,
    };
    let mut threads = Vec::new();
    for index in 0..config.vcpus {
        let vcpu = Vcpu::new(&kvm, &vm, index, config.vcpus, entry, cr3)?;
        threads.push(vcpu.spawn(context.clone())?);
    }
    // Every thread exists and every file is open: from here on, only the
    // event loop's system calls.
    let ran = if config.seccomp {
        seccomp::install(ThreadKind::Vmm).map_err(VmmError::from)
    } else {
        Ok(())
    }
    .and_then(|()| event_loop.run_until_end().map_err(VmmError::from));
    vcpu::stop_all(&stop, threads);
    ran?;
    match end.reason() {
        VmEnd::Reset | VmEnd::Shutdown => Ok(VmOutcome {
            exit_status: report.exit_status().unwrap_or(0),
            boot_to_init: report.init_started().map(|at| at.duration_since(started)),
        }),
        VmEnd::Stop => Ok(VmOutcome {
            exit_status: report.exit_status().unwrap_or(STOPPED_STATUS),
            boot_to_init: report.init_started().map(|at| at.duration_since(started)),
        }),
        VmEnd::Error(reason) => Err(VmmError::Guest(reason)),
    }
}

/// COM1, the i8042 (its reset line ends the VM) and the guest-init port.
fn legacy_devices(
    vm: &Vm,
    event_loop: &mut EventLoop,
    end: &VmEndSignal,
    report: &Arc<InitReport>,
) -> Result<Bus, VmmError> {
    let mut pio = Bus::new();
    let serial_irq = EventFd::new(0).map_err(VmmError::EventFd)?;
    vm.register_irqfd(&serial_irq, COM1_IRQ)?;
    let serial = Arc::new(Mutex::new(Serial::new(
        serial_irq,
        Box::new(std::io::stdout()),
    )));
    event_loop.add(Arc::new(Mutex::new(SerialInput::stdin(serial.clone())?)));
    pio.insert(serial, COM1_PORT.into(), SERIAL_PORT_LEN)?;
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
    Ok(pio)
}

/// The virtio disks as the kernel command line needs them.
struct VirtioDisks {
    mmio: Bus,
    /// The `virtio_mmio.device=` parameters through which the guest finds them.
    params: Vec<String>,
    /// Whether the root disk's device offers DISCARD.
    root_discards: bool,
}

/// One virtio-mmio block device per disk, each with its own 4 KiB region
/// and interrupt line.
fn virtio_disks(
    vm: &Vm,
    mem: &GuestMemoryMmap,
    event_loop: &mut EventLoop,
    disks: &[DiskConfig],
) -> Result<VirtioDisks, VmmError> {
    let max = IRQ_MAX - IRQ_VIRTIO_FIRST + 1;
    if disks.len() > max as usize {
        return Err(VmmError::TooManyDisks {
            count: disks.len(),
            max,
        });
    }
    let mut mmio = Bus::new();
    let mut params = Vec::new();
    let mut root_discards = false;
    for ((disk, base), irq) in disks
        .iter()
        .zip((0..).map(|i| VIRTIO_MMIO_START + i * MMIO_REGION_SIZE))
        .zip(IRQ_VIRTIO_FIRST..)
    {
        let block = Block::new(&disk.source, disk.read_only).map_err(|source| VmmError::Disk {
            path: disk.source.path().to_path_buf(),
            source,
        })?;
        if disk.ephemeral {
            let path = match &disk.source {
                DiskSource::Raw(path) => Some(path),
                DiskSource::Volume { overlay, .. } => overlay.as_ref(),
            };
            if let Some(path) = path {
                std::fs::remove_file(path).map_err(|source| VmmError::Ephemeral {
                    path: path.clone(),
                    source,
                })?;
            }
        }
        if params.is_empty() {
            root_discards = block.discards();
        }
        let block = Arc::new(Mutex::new(block));
        let transport = MmioTransport::new(mem.clone(), block.clone())?;
        for (queue, evt) in transport.queue_events().iter().enumerate() {
            vm.register_ioevent(evt, base + VIRTIO_MMIO_QUEUE_NOTIFY, queue as u32)?;
        }
        vm.register_irqfd(transport.interrupt_event(), irq)?;
        event_loop.add(block);
        mmio.insert(Arc::new(Mutex::new(transport)), base, MMIO_REGION_SIZE)?;
        params.push(format!("virtio_mmio.device=4K@{base:#x}:{irq}"));
    }
    Ok(VirtioDisks {
        mmio,
        params,
        root_discards,
    })
}

fn kernel_cmdline(config: &VmConfig, disks: &VirtioDisks) -> Result<String, VmmError> {
    let root = &config.disks[0];
    let mut words: Vec<&str> = BASE_CMDLINE.to_vec();
    words.push(if root.read_only {
        "root=/dev/vda ro"
    } else {
        "root=/dev/vda rw"
    });
    if disks.root_discards {
        // ext4 trims blocks as files are deleted, so a volume's overlay
        // shrinks back instead of only growing.
        words.push("rootflags=discard");
    }
    words.extend(disks.params.iter().map(String::as_str));
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
            kernel: "vmlinux".into(),
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
        }
    }

    /// What `virtio_disks` reports, without a VM.
    fn disks(params: &[&str], root_discards: bool) -> VirtioDisks {
        VirtioDisks {
            mmio: Bus::new(),
            params: params.iter().map(|p| p.to_string()).collect(),
            root_discards,
        }
    }

    #[test]
    fn command_line_has_the_root_the_devices_and_the_users_words_last() {
        let params = ["virtio_mmio.device=4K@0xd0000000:5"];
        let line = kernel_cmdline(
            &config(&[("root.ext4", true)], " kiln.entrypoint=/x "),
            &disks(&params, false),
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
        let rw = kernel_cmdline(&writable, &disks(&[], false)).unwrap();
        assert!(rw.ends_with("root=/dev/vda rw"), "{rw}");
        // A root device that offers DISCARD (a writable volume) is trimmed.
        let trims = kernel_cmdline(&writable, &disks(&[], true)).unwrap();
        assert!(
            trims.ends_with("root=/dev/vda rw rootflags=discard"),
            "{trims}"
        );
    }

    #[test]
    fn an_overlong_command_line_is_refused() {
        let long = "x".repeat(CMDLINE_MAX_SIZE);
        assert!(matches!(
            kernel_cmdline(&config(&[("r", false)], &long), &disks(&[], false)),
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
