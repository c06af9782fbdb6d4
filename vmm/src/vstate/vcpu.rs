//! vCPUs: boot-time configuration, and a thread per vCPU running KVM_RUN
//! and forwarding port I/O and MMIO exits to the buses.
use std::os::unix::thread::JoinHandleExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender, TryRecvError};
use std::sync::{Arc, Once};
use std::thread::JoinHandle;
use std::time::Duration;

use kvm_bindings::{CpuId, KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN, kvm_lapic_state};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd};
use vmm_sys_util::signal::{SIGRTMIN, register_signal_handler};

use super::vcpu_state::{self, VcpuState, VcpuStateError};
use super::vm::Vm;
use crate::arch::x86_64::{cpuid, msr, regs};
use crate::devices::bus::Bus;
use crate::event_loop::{VmEnd, VmEndSignal};
use crate::report::one_line;
use crate::seccomp::{self, ThreadKind};
use crate::trace;

/// LAPIC register offsets (Intel SDM Vol. 3A Table 11-1): LVT LINT0/LINT1.
const APIC_LVT_LINT0: usize = 0x350;
const APIC_LVT_LINT1: usize = 0x360;
/// LVT delivery modes (bits 10:8): ExtINT (the 8259 PIC's output on LINT0,
/// as on a PC) and NMI (LINT1).
const APIC_MODE_EXTINT: u32 = 0x7;
const APIC_MODE_NMI: u32 = 0x4;

/// How long to wait for a vCPU thread before kicking it again.
const KICK_INTERVAL: Duration = Duration::from_millis(1);

/// The signal that kicks a vCPU thread out of KVM_RUN.
pub(crate) fn kick_signal() -> i32 {
    SIGRTMIN()
}

/// Errors from creating or configuring a vCPU.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    /// A vCPU ioctl failed.
    #[error("vCPU {index}: {what} failed")]
    Kvm {
        /// The vCPU's index.
        index: u8,
        /// The ioctl, e.g. "KVM_SET_CPUID2".
        what: &'static str,
        /// The error KVM returned.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// The OS would not start the vCPU's thread.
    #[error("cannot start the vCPU {index} thread")]
    Spawn {
        /// The vCPU's index.
        index: u8,
        /// Why the thread did not start.
        #[source]
        source: std::io::Error,
    },
    /// The handler that lets a kick interrupt KVM_RUN cannot be installed;
    /// without it a vCPU could never be paused or stopped.
    #[error("cannot install the vCPU kick signal handler")]
    KickHandler(#[source] vmm_sys_util::errno::Error),
    /// The vCPU's thread has ended, so it cannot answer a request.
    #[error("vCPU {index} has ended")]
    Gone {
        /// The vCPU's index.
        index: u8,
    },
    /// A state was asked of a vCPU that was not parked first.
    #[error("vCPU {index} was asked for its state while running")]
    NotParked {
        /// The vCPU's index.
        index: u8,
    },
    /// The vCPU's state cannot be read or written.
    #[error(transparent)]
    State(#[from] VcpuStateError),
}

/// One vCPU, configured and ready to run.
pub struct Vcpu {
    index: u8,
    fd: VcpuFd,
    /// What KVM_SET_CPUID2 was given, for snapshots.
    cpuid: CpuId,
    /// The MSRs a snapshot saves ([`vcpu_state::savable_msrs`]).
    msrs: Vec<u32>,
}

/// What a vCPU thread shares with the rest of the VMM.
#[derive(Clone)]
pub struct VcpuContext {
    /// The port I/O bus that IN/OUT exits go to.
    pub pio: Arc<Bus>,
    /// The MMIO bus that exits on unmapped guest-physical addresses go to.
    pub mmio: Arc<Bus>,
    /// Where the thread says the VM has ended, and why.
    pub end: Arc<VmEndSignal>,
    /// Set when the VMM stops the vCPUs; the thread checks it between
    /// KVM_RUN calls.
    pub stop: Arc<AtomicBool>,
    /// Whether the thread installs its seccomp filter before it runs the
    /// guest (off only for debugging: `kiln run --no-seccomp`).
    pub seccomp: bool,
}

/// What the VMM asks of a running vCPU thread.
enum Request {
    /// Leave KVM_RUN, with every exit completed, and wait.
    Pause,
    /// (Paused) read the vCPU's state.
    Save,
    /// (Paused) run the guest again.
    Resume,
}

/// A vCPU thread's answer to a [`Request`].
enum Reply {
    Paused,
    Saved(Box<Result<VcpuState, VcpuStateError>>),
    Resumed,
}

impl Vcpu {
    /// Creates vCPU `index` of `count` for a fresh boot and sets its CPUID
    /// (what KVM `supported`, normalized for this vCPU), MSRs, FPU and
    /// LAPIC; vCPU 0 (the bootstrap processor) also gets the registers for
    /// the kernel's entry. The others wait for the guest's INIT/SIPI, which
    /// the in-kernel LAPIC handles and which resets their registers anyway.
    pub fn boot(
        kvm: &Kvm,
        vm: &Vm,
        supported: &CpuId,
        index: u8,
        count: u8,
        entry: u64,
        cr3: u64,
    ) -> Result<Self, VcpuError> {
        let mut cpuid = supported.clone();
        cpuid::normalize(&mut cpuid, index, count);
        let vcpu = Self::create(kvm, vm, index, cpuid)?;
        let fd = &vcpu.fd;
        fd.set_msrs(&msr::boot_msrs())
            .map_err(kvm_err(index, "KVM_SET_MSRS"))?;
        fd.set_fpu(&regs::boot_fpu())
            .map_err(kvm_err(index, "KVM_SET_FPU"))?;
        let mut lapic = fd.get_lapic().map_err(kvm_err(index, "KVM_GET_LAPIC"))?;
        set_lvt_mode(&mut lapic, APIC_LVT_LINT0, APIC_MODE_EXTINT);
        set_lvt_mode(&mut lapic, APIC_LVT_LINT1, APIC_MODE_NMI);
        fd.set_lapic(&lapic)
            .map_err(kvm_err(index, "KVM_SET_LAPIC"))?;
        if index == 0 {
            let sregs = fd.get_sregs().map_err(kvm_err(index, "KVM_GET_SREGS"))?;
            fd.set_sregs(&regs::boot_sregs(sregs, cr3))
                .map_err(kvm_err(index, "KVM_SET_SREGS"))?;
            fd.set_regs(&regs::boot_regs(entry))
                .map_err(kvm_err(index, "KVM_SET_REGS"))?;
        }
        Ok(vcpu)
    }

    /// Creates a vCPU that goes on from `state`, as saved by a snapshot.
    pub fn restore(kvm: &Kvm, vm: &Vm, state: &VcpuState) -> Result<Self, VcpuError> {
        let vcpu = Self::create(kvm, vm, state.index, state.cpuid()?)?;
        state.restore(&vcpu.fd)?;
        Ok(vcpu)
    }

    fn create(kvm: &Kvm, vm: &Vm, index: u8, cpuid: CpuId) -> Result<Self, VcpuError> {
        let fd = vm
            .fd()
            .create_vcpu(u64::from(index))
            .map_err(kvm_err(index, "KVM_CREATE_VCPU"))?;
        fd.set_cpuid2(&cpuid)
            .map_err(kvm_err(index, "KVM_SET_CPUID2"))?;
        let msrs = vcpu_state::savable_msrs(kvm, &fd, index)?;
        Ok(Vcpu {
            index,
            fd,
            cpuid,
            msrs,
        })
    }

    /// The vCPU's state, read before its thread starts (what a parked
    /// vCPU thread reads for a snapshot).
    pub fn save(&self) -> Result<VcpuState, VcpuStateError> {
        VcpuState::save(&self.fd, self.index, &self.cpuid, &self.msrs)
    }

    /// Starts the vCPU's thread `kiln-vcpu<N>`.
    pub fn spawn(self, context: VcpuContext) -> Result<VcpuHandle, VcpuError> {
        install_kick_handler()?;
        let index = self.index;
        let (requests, inbox) = mpsc::channel();
        let (outbox, replies) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name(format!("kiln-vcpu{index}"))
            .spawn(move || self.run(&context, &inbox, &outbox))
            .map_err(|source| VcpuError::Spawn { index, source })?;
        Ok(VcpuHandle {
            index,
            thread,
            requests,
            replies,
        })
    }

    fn run(mut self, context: &VcpuContext, inbox: &Receiver<Request>, outbox: &Sender<Reply>) {
        if context.seccomp
            && let Err(err) = seccomp::install(ThreadKind::Vcpu)
        {
            context.end.signal(VmEnd::Error(one_line(&err)));
            return;
        }
        // The first KVM_RUN is where a boot or restore's VMM work ends.
        let mut entered = false;
        while !context.stop.load(Ordering::Acquire) {
            match inbox.try_recv() {
                Ok(Request::Pause) => {
                    if !self.park(inbox, outbox) {
                        return;
                    }
                    continue;
                }
                // Save and Resume only mean something while parked.
                Ok(Request::Save | Request::Resume) | Err(TryRecvError::Empty) => {}
                Err(TryRecvError::Disconnected) => return,
            }
            if !entered {
                entered = true;
                trace::mark("kvm-run");
            }
            let end = match self.fd.run() {
                Ok(exit) => handle_exit(exit, context),
                // A kick (EINTR) or a transient condition: look at `stop` again.
                Err(err) if matches!(err.errno(), libc::EINTR | libc::EAGAIN) => None,
                Err(source) => Some(VmEnd::Error(one_line(&VcpuError::Kvm {
                    index: self.index,
                    what: "KVM_RUN",
                    source,
                }))),
            };
            if let Some(end) = end {
                context.end.signal(end);
                return;
            }
        }
    }

    /// Parks the vCPU outside the guest until resumed; false when the VMM
    /// has gone (the VM is ending).
    fn park(&mut self, inbox: &Receiver<Request>, outbox: &Sender<Reply>) -> bool {
        // KVM completes a port I/O or MMIO read only when KVM_RUN is next
        // entered (api.rst, "KVM_RUN"); with immediate_exit set it does so
        // and returns EINTR without running the guest, so the state saved
        // next is consistent.
        self.fd.set_kvm_immediate_exit(1);
        if let Err(err) = self.fd.run()
            && err.errno() != libc::EINTR
        {
            log::error!(
                "vCPU {}: completing the last exit failed: {err}",
                self.index
            );
        }
        self.fd.set_kvm_immediate_exit(0);
        let mut reply = Reply::Paused;
        loop {
            if outbox.send(reply).is_err() {
                return false;
            }
            reply = match inbox.recv() {
                Ok(Request::Pause) => Reply::Paused,
                Ok(Request::Save) => Reply::Saved(Box::new(self.save())),
                Ok(Request::Resume) => return outbox.send(Reply::Resumed).is_ok(),
                Err(_) => return false,
            };
        }
    }
}

fn kvm_err(index: u8, what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VcpuError {
    move |source| VcpuError::Kvm {
        index,
        what,
        source,
    }
}

/// A running vCPU thread and the way to talk to it.
pub struct VcpuHandle {
    index: u8,
    thread: JoinHandle<()>,
    requests: Sender<Request>,
    replies: Receiver<Reply>,
}

/// Interrupts `thread`'s KVM_RUN (or the next one it enters).
fn kick(thread: &JoinHandle<()>) {
    // SAFETY: every caller holds the thread's handle unjoined, so its
    // pthread_t is valid; the kick signal has a handler that does nothing.
    unsafe { libc::pthread_kill(thread.as_pthread_t(), kick_signal()) };
}

impl VcpuHandle {
    /// Sends `request` and waits for the answer, kicking the thread out of
    /// KVM_RUN until it answers (a kick can land just before the thread
    /// enters KVM_RUN, and is then lost).
    fn ask(&self, request: Request) -> Result<Reply, VcpuError> {
        let gone = VcpuError::Gone { index: self.index };
        if self.requests.send(request).is_err() {
            return Err(gone);
        }
        loop {
            kick(&self.thread);
            match self.replies.recv_timeout(KICK_INTERVAL) {
                Ok(reply) => return Ok(reply),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return Err(gone),
            }
        }
    }
}

/// The vCPU threads of one VM.
pub struct Vcpus {
    handles: Vec<VcpuHandle>,
    stop: Arc<AtomicBool>,
}

impl Vcpus {
    /// The VM's running vCPU threads, with the flag [`stop`](Self::stop)
    /// sets (the one in their [`VcpuContext`]).
    pub fn new(handles: Vec<VcpuHandle>, stop: Arc<AtomicBool>) -> Self {
        Vcpus { handles, stop }
    }

    /// Parks every vCPU outside the guest.
    pub fn pause(&self) -> Result<(), VcpuError> {
        for handle in &self.handles {
            handle.ask(Request::Pause)?;
        }
        Ok(())
    }

    /// Lets every parked vCPU run the guest again.
    pub fn resume(&self) -> Result<(), VcpuError> {
        for handle in &self.handles {
            handle.ask(Request::Resume)?;
        }
        Ok(())
    }

    /// The state of every (parked) vCPU, in index order.
    pub fn save(&self) -> Result<Vec<VcpuState>, VcpuError> {
        self.handles
            .iter()
            .map(|handle| match handle.ask(Request::Save)? {
                Reply::Saved(state) => Ok((*state)?),
                Reply::Paused | Reply::Resumed => Err(VcpuError::NotParked {
                    index: handle.index,
                }),
            })
            .collect()
    }

    /// Stops the threads: sets `stop`, closes their request channels (a
    /// parked thread then ends), and kicks each thread until it has left
    /// KVM_RUN and ended. Kicking again covers the window in which a thread
    /// had checked `stop` but not yet entered KVM_RUN. A thread's end drops
    /// its side of the reply channel, which ends the wait at once: a thread
    /// that has already left (the guest ended the VM) costs no wait at all.
    pub fn stop(self) {
        self.stop.store(true, Ordering::Release);
        for handle in self.handles {
            drop(handle.requests);
            loop {
                kick(&handle.thread);
                // A reply still on its way is of no use any more.
                if let Err(RecvTimeoutError::Disconnected) =
                    handle.replies.recv_timeout(KICK_INTERVAL)
                {
                    break;
                }
            }
            // A vCPU thread does not panic; if one did, its message is printed.
            let _ = handle.thread.join();
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
