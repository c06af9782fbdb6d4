//! A vCPU's architectural state, as a snapshot carries it: everything KVM
//! keeps for the vCPU that the guest could notice losing.
//!
//! Saving happens on the vCPU's own thread while it is parked outside
//! KVM_RUN (after an immediate-exit KVM_RUN has completed any pending port
//! I/O or MMIO, see [`super::vcpu`]). Restoring happens on a fresh vCPU
//! before its thread starts, in the order KVM's dependencies need (the
//! order Firecracker and Cloud Hypervisor use too):
//! CPUID first (it decides which MSRs and XSAVE features exist), then MP
//! state, registers, XSAVE/XCRs, debug registers, the LAPIC (before the
//! MSRs: IA32_TSC_DEADLINE only sticks once the LAPIC timer is in
//! TSC-deadline mode), the MSRs (IA32_TSC before IA32_TSC_DEADLINE, as KVM's
//! own index list orders them), and the pending events last.
use kvm_bindings::{
    CpuId, Msrs, kvm_cpuid_entry2, kvm_debugregs, kvm_lapic_state, kvm_mp_state, kvm_msr_entry,
    kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave,
};
use kvm_ioctls::{Kvm, VcpuFd};
use serde::{Deserialize, Serialize};

/// IA32_TIME_STAMP_COUNTER and IA32_TSC_DEADLINE (Intel SDM Vol. 4,
/// Table 2-2).
const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_TSC_DEADLINE: u32 = 0x6e0;
/// The LAPIC's LVT timer register (Intel SDM Vol. 3A, Table 11-1) and its
/// fields (Figure 11-8): the mask (bit 16) and the timer mode (bits 18:17),
/// where 0b10 is TSC-deadline mode.
const APIC_LVTT: usize = 0x320;
const APIC_LVT_MASKED: u32 = 1 << 16;
const APIC_LVTT_MODE_SHIFT: u32 = 17;
const APIC_LVTT_MODE_MASK: u32 = 0b11;
const APIC_LVTT_TSC_DEADLINE: u32 = 0b10;

/// KVM_GET_MSRS / KVM_SET_MSRS take at most this many entries at once
/// (`KVM_MAX_MSR_ENTRIES` in kvm-bindings).
const MSR_BATCH: usize = kvm_bindings::KVM_MAX_MSR_ENTRIES;

/// Errors from reading or writing a vCPU's state.
#[derive(Debug, thiserror::Error)]
pub enum VcpuStateError {
    /// A vCPU ioctl failed.
    #[error("vCPU {index}: {what} failed")]
    Kvm {
        /// The vCPU's index.
        index: u8,
        /// The ioctl, e.g. "KVM_GET_REGS".
        what: &'static str,
        /// The error KVM returned.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// KVM_GET_MSRS or KVM_SET_MSRS stopped short of the whole batch.
    #[error("vCPU {index}: KVM took {set} of {count} MSRs; it refused MSR {msr:#x}")]
    MsrRefused {
        /// The vCPU's index.
        index: u8,
        /// How many MSRs the batch held.
        count: usize,
        /// How many KVM read or wrote before it stopped.
        set: usize,
        /// The MSR it stopped at.
        msr: u32,
    },
    /// The guest's TSC frequency cannot be kept on this host: its clocks
    /// would run fast or slow.
    #[error(
        "vCPU {index}: the snapshot's TSC runs at {saved} kHz, this host's at {host} kHz, and KVM cannot scale it"
    )]
    TscFrequency {
        /// The vCPU's index.
        index: u8,
        /// The frequency the guest calibrated against, in kHz.
        saved: u32,
        /// This host's TSC frequency, in kHz.
        host: u32,
    },
    /// An MSR or CPUID list has more entries than KVM's ioctls carry.
    #[error("vCPU {index}: cannot build an MSR or CPUID list")]
    Fam {
        /// The vCPU's index.
        index: u8,
        /// Why the list could not be built.
        #[source]
        source: vmm_sys_util::fam::Error,
    },
}

/// One model-specific register.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MsrValue {
    /// The MSR's number (ECX of RDMSR/WRMSR).
    pub index: u32,
    /// Its 64-bit value.
    pub data: u64,
}

/// Everything a vCPU needs to go on where it stopped.
#[derive(Debug, Serialize, Deserialize)]
pub struct VcpuState {
    /// The vCPU's index, which is also its APIC id.
    pub index: u8,
    /// The CPUID the guest saw (and checked its features against).
    pub cpuid: Vec<kvm_cpuid_entry2>,
    /// The guest TSC's frequency, in kHz.
    pub tsc_khz: u32,
    /// The MSRs of [`savable_msrs`], with their values.
    pub msrs: Vec<MsrValue>,
    /// General-purpose registers, RIP and RFLAGS.
    pub regs: kvm_regs,
    /// Segment, control and descriptor-table registers, and EFER.
    pub sregs: kvm_sregs,
    /// The x87, SSE and AVX state, in the XSAVE layout.
    pub xsave: kvm_xsave,
    /// The extended control registers (XCR0: which XSAVE features are on).
    pub xcrs: kvm_xcrs,
    /// DR0-DR3, DR6 and DR7.
    pub debug_regs: kvm_debugregs,
    /// The local APIC's register page, including its timer.
    pub lapic: kvm_lapic_state,
    /// Running, halted, or waiting for INIT/SIPI.
    pub mp_state: kvm_mp_state,
    /// Pending exceptions, interrupts and NMIs, and the interrupt shadow.
    pub events: kvm_vcpu_events,
}

fn kvm_err(index: u8, what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VcpuStateError {
    move |source| VcpuStateError::Kvm {
        index,
        what,
        source,
    }
}

/// The MSRs of vCPU `fd` worth saving: KVM's list of the MSRs it saves and
/// restores itself (KVM_GET_MSR_INDEX_LIST), less those this vCPU cannot
/// read (the list covers every CPU model KVM knows; the CPUID set here
/// decides which exist). Probed once, before the seccomp filter, so a
/// snapshot reads them all in one ioctl per batch.
pub fn savable_msrs(kvm: &Kvm, fd: &VcpuFd, index: u8) -> Result<Vec<u32>, VcpuStateError> {
    let listed = kvm
        .get_msr_index_list()
        .map_err(kvm_err(index, "KVM_GET_MSR_INDEX_LIST"))?;
    let mut readable = Vec::new();
    let mut pending: &[u32] = listed.as_slice();
    while !pending.is_empty() {
        let batch = &pending[..pending.len().min(MSR_BATCH)];
        let mut msrs = msr_list(index, batch.iter().map(|&msr| (msr, 0)))?;
        // KVM stops at the first MSR it cannot read and says how many it read.
        let read = fd
            .get_msrs(&mut msrs)
            .map_err(kvm_err(index, "KVM_GET_MSRS"))?;
        readable.extend_from_slice(&batch[..read]);
        // Skip the one that failed, if any, and go on after it.
        let consumed = if read < batch.len() { read + 1 } else { read };
        pending = &pending[consumed..];
    }
    Ok(readable)
}

/// Keeps a timer interrupt that the snapshot would lose.
///
/// When a TSC-deadline timer expires, KVM clears IA32_TSC_DEADLINE at
/// once but moves the interrupt into the LAPIC's IRR only at the vCPU's
/// next entry. If that happens while the vCPU is parked for the snapshot,
/// neither KVM_GET_LAPIC nor KVM_GET_MSRS shows the interrupt: the
/// restored guest, idle with its tick stopped, waits for a timer that
/// will never fire. An unmasked LVT timer in TSC-deadline mode with a
/// deadline of 0 is that case (Linux masks the LVT when it stops the
/// timer), so the deadline becomes the saved TSC: the timer fires as soon
/// as the restored vCPU runs. If the interrupt had already reached the
/// IRR, the guest sees one spurious tick, which its clockevents code takes
/// in stride. Firecracker works around the same loss the same way.
fn rearm_lost_deadline(msrs: &mut [MsrValue], lapic: &kvm_lapic_state) {
    let lvtt = lapic_register(lapic, APIC_LVTT);
    let deadline_mode =
        (lvtt >> APIC_LVTT_MODE_SHIFT) & APIC_LVTT_MODE_MASK == APIC_LVTT_TSC_DEADLINE;
    if !deadline_mode || lvtt & APIC_LVT_MASKED != 0 {
        return;
    }
    let Some(tsc) = msrs
        .iter()
        .find(|m| m.index == MSR_IA32_TSC)
        .map(|m| m.data)
    else {
        return;
    };
    if let Some(deadline) = msrs
        .iter_mut()
        .find(|m| m.index == MSR_IA32_TSC_DEADLINE && m.data == 0)
    {
        deadline.data = tsc;
    }
}

/// A 32-bit LAPIC register at `offset` of the register page.
fn lapic_register(lapic: &kvm_lapic_state, offset: usize) -> u32 {
    let mut bytes = [0u8; 4];
    for (byte, &reg) in bytes.iter_mut().zip(&lapic.regs[offset..offset + 4]) {
        // KVM declares the page as `c_char`s: the same bits as a byte.
        *byte = reg as u8;
    }
    u32::from_le_bytes(bytes)
}

fn msr_list(index: u8, entries: impl Iterator<Item = (u32, u64)>) -> Result<Msrs, VcpuStateError> {
    let entries: Vec<kvm_msr_entry> = entries
        .map(|(index, data)| kvm_msr_entry {
            index,
            data,
            ..Default::default()
        })
        .collect();
    Msrs::from_entries(&entries).map_err(|source| VcpuStateError::Fam { index, source })
}

impl VcpuState {
    /// Reads the state of the parked vCPU `fd`.
    pub fn save(
        fd: &VcpuFd,
        index: u8,
        cpuid: &CpuId,
        msr_indices: &[u32],
    ) -> Result<Self, VcpuStateError> {
        let err = |what| kvm_err(index, what);
        let mut msrs = Vec::with_capacity(msr_indices.len());
        for batch in msr_indices.chunks(MSR_BATCH) {
            let mut list = msr_list(index, batch.iter().map(|&msr| (msr, 0)))?;
            let read = fd.get_msrs(&mut list).map_err(err("KVM_GET_MSRS"))?;
            if read != batch.len() {
                return Err(VcpuStateError::MsrRefused {
                    index,
                    count: batch.len(),
                    set: read,
                    msr: batch[read],
                });
            }
            msrs.extend(list.as_slice().iter().map(|e| MsrValue {
                index: e.index,
                data: e.data,
            }));
        }
        let lapic = fd.get_lapic().map_err(err("KVM_GET_LAPIC"))?;
        rearm_lost_deadline(&mut msrs, &lapic);
        Ok(VcpuState {
            index,
            cpuid: cpuid.as_slice().to_vec(),
            tsc_khz: fd.get_tsc_khz().map_err(err("KVM_GET_TSC_KHZ"))?,
            msrs,
            regs: fd.get_regs().map_err(err("KVM_GET_REGS"))?,
            sregs: fd.get_sregs().map_err(err("KVM_GET_SREGS"))?,
            xsave: fd.get_xsave().map_err(err("KVM_GET_XSAVE"))?,
            xcrs: fd.get_xcrs().map_err(err("KVM_GET_XCRS"))?,
            debug_regs: fd.get_debug_regs().map_err(err("KVM_GET_DEBUGREGS"))?,
            lapic,
            mp_state: fd.get_mp_state().map_err(err("KVM_GET_MP_STATE"))?,
            events: fd.get_vcpu_events().map_err(err("KVM_GET_VCPU_EVENTS"))?,
        })
    }

    /// The saved CPUID, as KVM takes it.
    pub fn cpuid(&self) -> Result<CpuId, VcpuStateError> {
        CpuId::from_entries(&self.cpuid).map_err(|source| VcpuStateError::Fam {
            index: self.index,
            source,
        })
    }

    /// Writes the state into the fresh, not yet run vCPU `fd` (whose
    /// CPUID is already [`cpuid`](Self::cpuid)).
    pub fn restore(&self, fd: &VcpuFd) -> Result<(), VcpuStateError> {
        let index = self.index;
        let err = |what| kvm_err(index, what);
        // The guest calibrated its clocks against this frequency: keep it
        // (KVM accepts a rate within 250 ppm of the host's unscaled).
        let host = fd.get_tsc_khz().map_err(err("KVM_GET_TSC_KHZ"))?;
        if host != self.tsc_khz && fd.set_tsc_khz(self.tsc_khz).is_err() {
            return Err(VcpuStateError::TscFrequency {
                index,
                saved: self.tsc_khz,
                host,
            });
        }
        fd.set_mp_state(self.mp_state)
            .map_err(err("KVM_SET_MP_STATE"))?;
        fd.set_regs(&self.regs).map_err(err("KVM_SET_REGS"))?;
        fd.set_sregs(&self.sregs).map_err(err("KVM_SET_SREGS"))?;
        // SAFETY: `self.xsave` is a whole `kvm_xsave` (4 KiB), the size
        // KVM_SET_XSAVE reads; it was filled by KVM_GET_XSAVE, which never
        // writes more, so no larger (KVM_CAP_XSAVE2) layout is involved.
        unsafe { fd.set_xsave(&self.xsave) }.map_err(err("KVM_SET_XSAVE"))?;
        fd.set_xcrs(&self.xcrs).map_err(err("KVM_SET_XCRS"))?;
        fd.set_debug_regs(&self.debug_regs)
            .map_err(err("KVM_SET_DEBUGREGS"))?;
        fd.set_lapic(&self.lapic).map_err(err("KVM_SET_LAPIC"))?;
        for batch in self.msrs.chunks(MSR_BATCH) {
            let list = msr_list(index, batch.iter().map(|m| (m.index, m.data)))?;
            let set = fd.set_msrs(&list).map_err(err("KVM_SET_MSRS"))?;
            if set != batch.len() {
                return Err(VcpuStateError::MsrRefused {
                    index,
                    count: batch.len(),
                    set,
                    msr: batch[set].index,
                });
            }
        }
        fd.set_vcpu_events(&self.events)
            .map_err(err("KVM_SET_VCPU_EVENTS"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lapic_with_timer(lvtt: u32) -> kvm_lapic_state {
        let mut lapic = kvm_lapic_state::default();
        for (reg, byte) in lapic.regs[APIC_LVTT..APIC_LVTT + 4]
            .iter_mut()
            .zip(lvtt.to_le_bytes())
        {
            *reg = byte as _;
        }
        lapic
    }

    fn msrs(deadline: u64) -> Vec<MsrValue> {
        vec![
            MsrValue {
                index: MSR_IA32_TSC,
                data: 1_000_000,
            },
            MsrValue {
                index: MSR_IA32_TSC_DEADLINE,
                data: deadline,
            },
        ]
    }

    const DEADLINE_MODE: u32 = (APIC_LVTT_TSC_DEADLINE << APIC_LVTT_MODE_SHIFT) | 0xec;

    #[test]
    fn a_deadline_lost_while_parked_fires_on_restore() {
        let mut saved = msrs(0);
        rearm_lost_deadline(&mut saved, &lapic_with_timer(DEADLINE_MODE));
        assert_eq!(saved[1].data, 1_000_000);
    }

    #[test]
    fn armed_stopped_or_other_mode_timers_are_left_alone() {
        for (lvtt, deadline) in [
            // Armed: the deadline is kept.
            (DEADLINE_MODE, 2_000_000),
            // Stopped by the guest: masked.
            (DEADLINE_MODE | APIC_LVT_MASKED, 0),
            // One-shot mode (0b00) counts with TMICT, not the MSR.
            (0xec, 0),
        ] {
            let mut saved = msrs(deadline);
            rearm_lost_deadline(&mut saved, &lapic_with_timer(lvtt));
            assert_eq!(saved, msrs(deadline), "LVTT {lvtt:#x}");
        }
    }
}
