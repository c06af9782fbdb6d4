//! The KVM VM: capabilities, the split irqchip and its MSI routes, guest
//! memory slots, irqfds and ioeventfds.
//!
//! The local APICs are KVM's; the IOAPIC is the VMM's
//! ([`crate::devices::ioapic`], which says why), and there is no 8259.
//!
//! No 8254 PIT, as on QEMU's microvm with `pit=off` (the peer `kiln
//! bench` runs) and on Cloud Hypervisor: KVM's PIT hangs on its in-kernel
//! PIC, which a split irqchip has none of. A Linux guest whose CPUID shows
//! the TSC-deadline timer and ARAT, and whose TSC frequency kvmclock
//! tells, never needs the PIT (arch/x86/kernel/apic/apic.c,
//! `apic_needs_pit`); [`crate::arch::x86_64::cpuid`] shows both. KVM's
//! in-kernel PIT costs even unused: it starts in reinject mode, which on
//! AMD inhibits AVIC for the whole VM, and its teardown waits for SRCU
//! grace periods (unregistering its ack and mask notifiers, the second
//! never expedited). On this project's hosts, closing a VM that has lived
//! 20 to 50 ms took 14.6 ms with a PIT and 0.5 to 1 ms without; every
//! instance stop and clone teardown paid it.
use std::io;
use std::sync::{Arc, Weak};

use kvm_bindings::{
    CpuId, KVM_CAP_SPLIT_IRQCHIP, KVM_IRQ_ROUTING_MSI, KVM_MAX_CPUID_ENTRIES, KvmIrqRouting,
    kvm_clock_data, kvm_enable_cap, kvm_irq_routing_msi, kvm_userspace_memory_region,
};
use kvm_ioctls::{Cap, IoEventAddress, Kvm, VmFd};
use serde::{Deserialize, Serialize};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use crate::arch::x86_64::layout::KVM_TSS_ADDRESS;
use crate::devices::ioapic::{IOAPIC_PINS, MsiRoute, MsiRouter};
use crate::devices::virtio::GuestMemoryMmap;

/// The KVM API version every kernel since 2.6.22 reports.
const KVM_API_VERSION: i32 = 12;

/// What Kiln needs from KVM, named for the error message.
const REQUIRED_CAPS: [(Cap, &str); 8] = [
    (Cap::SplitIrqchip, "KVM_CAP_SPLIT_IRQCHIP"),
    (Cap::IrqRouting, "KVM_CAP_IRQ_ROUTING"),
    (Cap::Ioeventfd, "KVM_CAP_IOEVENTFD"),
    (Cap::Irqfd, "KVM_CAP_IRQFD"),
    (Cap::UserMemory, "KVM_CAP_USER_MEMORY"),
    (Cap::SetTssAddr, "KVM_CAP_SET_TSS_ADDR"),
    // The guest's timer, in place of a PIT (see the module's comment).
    (Cap::TscDeadlineTimer, "KVM_CAP_TSC_DEADLINE_TIMER"),
    (Cap::ImmediateExit, "KVM_CAP_IMMEDIATE_EXIT"),
];

/// Errors from setting up the VM.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// /dev/kvm reports an API version other than the stable one.
    #[error("KVM API version {0}, expected {KVM_API_VERSION}")]
    ApiVersion(i32),
    /// The host's KVM lacks a capability Kiln relies on (named as in the
    /// KVM API documentation, e.g. "KVM_CAP_IRQFD").
    #[error("KVM lacks {0}, which Kiln needs")]
    MissingCap(&'static str),
    /// A VM ioctl failed.
    #[error("{what} failed")]
    Kvm {
        /// The ioctl, e.g. "KVM_CREATE_VM".
        what: &'static str,
        /// The error KVM returned.
        #[source]
        source: kvm_ioctls::Error,
    },
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::Kvm { what, source }
}

/// The capabilities Kiln needs that this host's KVM lacks, when /dev/kvm
/// opens (for `kiln doctor`).
pub fn missing_caps_here() -> Option<Vec<&'static str>> {
    let kvm = Kvm::new().ok()?;
    Some(missing_caps(&kvm).collect())
}

/// The capabilities Kiln needs that `kvm` lacks, named as in the KVM API
/// documentation.
fn missing_caps(kvm: &Kvm) -> impl Iterator<Item = &'static str> {
    REQUIRED_CAPS
        .iter()
        .filter(|(cap, _)| !kvm.check_extension(*cap))
        .map(|(_, name)| *name)
}

/// What this host's KVM can show a guest (KVM_GET_SUPPORTED_CPUID). Ask
/// it once per VM: KVM answers by executing CPUID for every leaf it
/// reports, and on a host that is itself a VM (as this project's PVM hosts
/// and most cloud machines are) each CPUID exits to the hypervisor below,
/// 0.38 ms a call on this project's hosts (measured).
pub fn supported_cpuid(kvm: &Kvm) -> Result<CpuId, VmError> {
    kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))
}

/// The VM-wide state a snapshot carries: kvmclock (the vCPUs' state,
/// local APICs included, is separate, and the IOAPIC is a device's).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VmState {
    /// kvmclock's guest time, without the host-time flags (see
    /// [`Vm::save_state`]).
    pub clock: kvm_clock_data,
}

/// A VM with its local APICs and memory.
pub struct Vm {
    /// Shared only weakly, with the IOAPIC's [`GsiRouting`].
    fd: Arc<VmFd>,
}

impl Vm {
    /// Checks KVM, then creates a VM with `mem` as its RAM.
    pub fn new(kvm: &Kvm, mem: &GuestMemoryMmap) -> Result<Self, VmError> {
        let version = kvm.get_api_version();
        if version != KVM_API_VERSION {
            return Err(VmError::ApiVersion(version));
        }
        if let Some(name) = missing_caps(kvm).next() {
            return Err(VmError::MissingCap(name));
        }
        let fd = kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?;
        for (slot, region) in mem.iter().enumerate() {
            let region = kvm_userspace_memory_region {
                slot: slot as u32,
                flags: 0,
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: region.as_ptr() as u64,
            };
            // SAFETY: the region describes a live mapping owned by `mem`,
            // which outlives the VM (the builder drops the VM first).
            unsafe { fd.set_user_memory_region(region) }
                .map_err(kvm_err("KVM_SET_USER_MEMORY_REGION"))?;
        }
        // The TSS pages must be set before the first vCPU runs (Intel VMX
        // needs them for real-mode emulation).
        fd.set_tss_address(KVM_TSS_ADDRESS as usize)
            .map_err(kvm_err("KVM_SET_TSS_ADDR"))?;
        // The local APICs in the kernel, the IOAPIC in the VMM, its pins
        // KVM's first GSIs; before any vCPU, as KVM requires.
        let split_irqchip = kvm_enable_cap {
            cap: KVM_CAP_SPLIT_IRQCHIP,
            args: [IOAPIC_PINS as u64, 0, 0, 0],
            ..Default::default()
        };
        fd.enable_cap(&split_irqchip)
            .map_err(kvm_err("KVM_ENABLE_CAP(KVM_CAP_SPLIT_IRQCHIP)"))?;
        Ok(Vm { fd: Arc::new(fd) })
    }

    /// Where the IOAPIC sets its pins' routes.
    pub fn gsi_routing(&self) -> GsiRouting {
        GsiRouting(Arc::downgrade(&self.fd))
    }

    /// The VM's file descriptor, for creating vCPUs.
    pub fn fd(&self) -> &VmFd {
        &self.fd
    }

    /// Reads the clock (vCPUs paused).
    pub fn save_state(&self) -> Result<VmState, VmError> {
        let mut clock = self.fd.get_clock().map_err(kvm_err("KVM_GET_CLOCK"))?;
        // KVM_GET_CLOCK reports whether the clock is stable and with which
        // host time it was read; KVM_SET_CLOCK takes none of that back but
        // KVM_CLOCK_REALTIME, which would advance the guest's clock by the
        // time the snapshot lay on disk. The guest goes on from the instant
        // it was saved instead, as a suspended machine does.
        clock.flags = 0;
        Ok(VmState { clock })
    }

    /// Writes a saved state into this fresh VM, before its vCPUs exist.
    pub fn restore_state(&self, state: &VmState) -> Result<(), VmError> {
        self.fd
            .set_clock(&state.clock)
            .map_err(kvm_err("KVM_SET_CLOCK"))
    }

    /// Writing `evt` raises interrupt line `gsi`: KVM sends the MSI the
    /// IOAPIC routed the line's pin to, if it is unmasked.
    pub fn register_irqfd(&self, evt: &EventFd, gsi: u32) -> Result<(), VmError> {
        self.fd
            .register_irqfd(evt, gsi)
            .map_err(kvm_err("KVM_IRQFD"))
    }

    /// A 4-byte guest write of `datamatch` at MMIO `addr` signals `evt`
    /// in the kernel, without an exit to the VMM.
    pub fn register_ioevent(
        &self,
        evt: &EventFd,
        addr: u64,
        datamatch: u32,
    ) -> Result<(), VmError> {
        self.fd
            .register_ioevent(evt, &IoEventAddress::Mmio(addr), datamatch)
            .map_err(kvm_err("KVM_IOEVENTFD"))
    }
}

/// KVM's GSI routing table, which the IOAPIC fills with its pins' MSIs.
/// It holds the VM weakly: the VM's descriptor closes with the [`Vm`],
/// before the guest memory its slots point into is unmapped, and a route
/// set after that (by no one: the vCPUs have stopped) goes nowhere.
pub struct GsiRouting(Weak<VmFd>);

impl MsiRouter for GsiRouting {
    /// KVM_SET_GSI_ROUTING with `routes`, replacing every route.
    fn set_routes(&self, routes: &[MsiRoute]) -> io::Result<()> {
        let Some(fd) = self.0.upgrade() else {
            return Ok(());
        };
        let mut table = KvmIrqRouting::new(routes.len())
            .map_err(|_| io::Error::from(io::ErrorKind::OutOfMemory))?;
        for (entry, route) in table.as_mut_slice().iter_mut().zip(routes) {
            entry.gsi = route.gsi;
            entry.type_ = KVM_IRQ_ROUTING_MSI;
            entry.u.msi = kvm_irq_routing_msi {
                address_lo: route.address,
                data: route.data,
                ..Default::default()
            };
        }
        fd.set_gsi_routing(&table)
            .map_err(|err| io::Error::from_raw_os_error(err.errno()))
    }
}
