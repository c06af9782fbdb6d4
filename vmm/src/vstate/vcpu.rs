//! vCPUs: boot-time configuration, and a thread per vCPU running KVM_RUN
//! and forwarding port I/O and MMIO exits to the buses.
use std::os::unix::thread::JoinHandleExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Once};
use std::thread::JoinHandle;
use std::time::Duration;

use kvm_bindings::{
    KVM_MAX_CPUID_ENTRIES, KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN, kvm_lapic_state,
};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd};
use vmm_sys_util::signal::{SIGRTMIN, register_signal_handler};

use super::vm::Vm;
use crate::arch::x86_64::{cpuid, msr, regs};
use crate::devices::bus::Bus;
use crate::event_loop::{VmEnd, VmEndSignal};
use crate::seccomp::{self, ThreadKind};

/// LAPIC register offsets (Intel SDM Vol. 3A Table 11-1): LVT LINT0/LINT1.
const APIC_LVT_LINT0: usize = 0x350;
const APIC_LVT_LINT1: usize = 0x360;
/// LVT delivery modes (bits 10:8): ExtINT (the 8259 PIC's output on LINT0,
/// as on a PC) and NMI (LINT1).
const APIC_MODE_EXTINT: u32 = 0x7;
const APIC_MODE_NMI: u32 = 0x4;

/// The signal that kicks a vCPU thread out of KVM_RUN.
fn kick_signal() -> i32 {
    SIGRTMIN()
}

/// Errors from creating or configuring a vCPU.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    #[error("vCPU {index}: {what} failed: {source}")]
    Kvm {
        index: u8,
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("cannot start the vCPU {index} thread: {source}")]
    Spawn { index: u8, source: std::io::Error },
    #[error("cannot install the vCPU kick signal handler: {0}")]
    KickHandler(vmm_sys_util::errno::Error),
}

/// One vCPU, configured and ready to run.
pub struct Vcpu {
    index: u8,
    fd: VcpuFd,
}

/// What a vCPU thread shares with the rest of the VMM.
#[derive(Clone)]
pub struct VcpuContext {
    pub pio: Arc<Bus>,
    pub mmio: Arc<Bus>,
    pub end: Arc<VmEndSignal>,
    pub stop: Arc<AtomicBool>,
    pub seccomp: bool,
}

impl Vcpu {
    /// Creates vCPU `index` of `count` and sets its CPUID, MSRs, FPU and
    /// LAPIC; vCPU 0 (the bootstrap processor) also gets the registers for
    /// the kernel's entry. The others wait for the guest's INIT/SIPI, which
    /// the in-kernel LAPIC handles and which resets their registers anyway.
    pub fn new(
        kvm: &Kvm,
        vm: &Vm,
        index: u8,
        count: u8,
        entry: u64,
        cr3: u64,
    ) -> Result<Self, VcpuError> {
        let err = |what| {
            move |source| VcpuError::Kvm {
                index,
                what,
                source,
            }
        };
        let fd = vm
            .fd()
            .create_vcpu(u64::from(index))
            .map_err(err("KVM_CREATE_VCPU"))?;
        let mut cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(err("KVM_GET_SUPPORTED_CPUID"))?;
        cpuid::normalize(&mut cpuid, index, count);
        fd.set_cpuid2(&cpuid).map_err(err("KVM_SET_CPUID2"))?;
        fd.set_msrs(&msr::boot_msrs())
            .map_err(err("KVM_SET_MSRS"))?;
        fd.set_fpu(&regs::boot_fpu()).map_err(err("KVM_SET_FPU"))?;
        let mut lapic = fd.get_lapic().map_err(err("KVM_GET_LAPIC"))?;
        set_lvt_mode(&mut lapic, APIC_LVT_LINT0, APIC_MODE_EXTINT);
        set_lvt_mode(&mut lapic, APIC_LVT_LINT1, APIC_MODE_NMI);
        fd.set_lapic(&lapic).map_err(err("KVM_SET_LAPIC"))?;
        if index == 0 {
            let sregs = fd.get_sregs().map_err(err("KVM_GET_SREGS"))?;
            fd.set_sregs(&regs::boot_sregs(sregs, cr3))
                .map_err(err("KVM_SET_SREGS"))?;
            fd.set_regs(&regs::boot_regs(entry))
                .map_err(err("KVM_SET_REGS"))?;
        }
        Ok(Vcpu { index, fd })
    }

    /// Starts the vCPU's thread `kiln-vcpu<N>`.
    pub fn spawn(self, context: VcpuContext) -> Result<JoinHandle<()>, VcpuError> {
        install_kick_handler()?;
        let index = self.index;
        std::thread::Builder::new()
            .name(format!("kiln-vcpu{index}"))
            .spawn(move || self.run(context))
            .map_err(|source| VcpuError::Spawn { index, source })
    }

    fn run(self, context: VcpuContext) {
        if context.seccomp
            && let Err(err) = seccomp::install(ThreadKind::Vcpu)
        {
            context.end.signal(VmEnd::Error(err.to_string()));
            return;
        }
        let mut fd = self.fd;
        while !context.stop.load(Ordering::Acquire) {
            let end = match fd.run() {
                Ok(exit) => handle_exit(exit, &context),
                // A kick (EINTR) or a transient condition: look at `stop` again.
                Err(err) if matches!(err.errno(), libc::EINTR | libc::EAGAIN) => None,
                Err(err) => Some(VmEnd::Error(format!(
                    "vCPU {}: KVM_RUN failed: {err}",
                    self.index
                ))),
            };
            if let Some(end) = end {
                context.end.signal(end);
                return;
            }
        }
    }
}

/// Forwards one exit; `Some` when it ends the VM.
fn handle_exit(exit: VcpuExit, context: &VcpuContext) -> Option<VmEnd> {
    match exit {
        VcpuExit::IoIn(port, data) => read_or_float(&context.pio, u64::from(port), data),
        VcpuExit::IoOut(port, data) => {
            context.pio.write(u64::from(port), data);
        }
        VcpuExit::MmioRead(addr, data) => read_or_float(&context.mmio, addr, data),
        VcpuExit::MmioWrite(addr, data) => {
            context.mmio.write(addr, data);
        }
        // A triple fault: the PC resets.
        VcpuExit::Shutdown => return Some(VmEnd::Reset),
        // HLT exits only without an in-kernel LAPIC, i.e. never here; a
        // guest that halts with interrupts off has stopped for good.
        VcpuExit::Hlt => return Some(VmEnd::Shutdown),
        VcpuExit::SystemEvent(KVM_SYSTEM_EVENT_RESET, _) => return Some(VmEnd::Reset),
        VcpuExit::SystemEvent(KVM_SYSTEM_EVENT_SHUTDOWN, _) => return Some(VmEnd::Shutdown),
        VcpuExit::FailEntry(reason, cpu) => {
            return Some(VmEnd::Error(format!(
                "KVM could not enter the guest on CPU {cpu} (hardware entry failure reason {reason:#x})"
            )));
        }
        VcpuExit::InternalError => {
            return Some(VmEnd::Error(
                "KVM internal error (instruction emulation failed)".into(),
            ));
        }
        other => return Some(VmEnd::Error(format!("unexpected vCPU exit: {other:?}"))),
    }
    None
}

/// An unclaimed read sees a floating bus: all ones.
fn read_or_float(bus: &Bus, addr: u64, data: &mut [u8]) {
    if !bus.read(addr, data) {
        data.fill(0xff);
    }
}

fn set_lvt_mode(lapic: &mut kvm_lapic_state, offset: usize, mode: u32) {
    let bytes: &mut [u8] = bytemuck_regs(lapic);
    let mut value = u32::from_le_bytes(bytes[offset..offset + 4].try_into().expect("4 bytes"));
    value = (value & !(0x7 << 8)) | (mode << 8);
    bytes[offset..offset + 4].copy_from_slice(&value.to_le_bytes());
}

/// The LAPIC register page as bytes (KVM declares it as `c_char`s).
fn bytemuck_regs(lapic: &mut kvm_lapic_state) -> &mut [u8] {
    let regs = &mut lapic.regs;
    // SAFETY: `c_char` and `u8` have the same size and alignment, and every
    // bit pattern is valid for both; the slice borrows `lapic` mutably.
    unsafe { std::slice::from_raw_parts_mut(regs.as_mut_ptr().cast::<u8>(), regs.len()) }
}

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // Nothing to do: delivering the signal makes KVM_RUN return EINTR.
}

fn install_kick_handler() -> Result<(), VcpuError> {
    static INSTALL: Once = Once::new();
    let mut result = Ok(());
    INSTALL.call_once(|| {
        result = register_signal_handler(kick_signal(), on_kick).map_err(VcpuError::KickHandler)
    });
    result
}

/// Stops vCPU threads: sets `stop`, then kicks each thread until it has
/// left KVM_RUN and ended. Kicking again covers the window in which a
/// thread had checked `stop` but not yet entered KVM_RUN.
pub fn stop_all(stop: &AtomicBool, threads: Vec<JoinHandle<()>>) {
    const KICK_INTERVAL: Duration = Duration::from_millis(1);
    stop.store(true, Ordering::Release);
    for thread in threads {
        while !thread.is_finished() {
            // SAFETY: the thread has not been joined, so its pthread_t is
            // valid; the kick signal has a handler that does nothing.
            unsafe { libc::pthread_kill(thread.as_pthread_t(), kick_signal()) };
            std::thread::sleep(KICK_INTERVAL);
        }
        // A vCPU thread does not panic; if one did, its message is printed.
        let _ = thread.join();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lint_modes_are_written_in_bits_10_to_8() {
        let mut lapic = kvm_lapic_state::default();
        // Old mode 0b101 (INIT) in bits 10:8, and bit 12 (delivery status), which must survive.
        bytemuck_regs(&mut lapic)[APIC_LVT_LINT0 + 1] = 0x15;
        set_lvt_mode(&mut lapic, APIC_LVT_LINT0, APIC_MODE_EXTINT);
        set_lvt_mode(&mut lapic, APIC_LVT_LINT1, APIC_MODE_NMI);
        let regs = bytemuck_regs(&mut lapic);
        assert_eq!(
            u32::from_le_bytes(regs[0x350..0x354].try_into().unwrap()),
            0x1700
        );
        assert_eq!(
            u32::from_le_bytes(regs[0x360..0x364].try_into().unwrap()),
            0x0400
        );
    }
}
