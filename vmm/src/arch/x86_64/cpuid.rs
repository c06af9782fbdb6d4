//! The CPUID a vCPU sees: KVM's supported set, made consistent with the
//! VM's topology (N vCPUs: one socket, one thread per core) and stripped of
//! host details that would leak or not survive a move to another host.
use kvm_bindings::{CpuId, kvm_cpuid_entry2};

/// Leaf 1 ECX bit 3: MONITOR/MWAIT (a guest idling in MWAIT keeps a host
/// core busy; HLT lets KVM schedule it out).
const LEAF1_ECX_MONITOR: u32 = 1 << 3;
/// Leaf 1 ECX bit 24: the LAPIC timer's TSC-deadline mode, which KVM
/// emulates wherever KVM_CAP_TSC_DEADLINE_TIMER is (a required capability:
/// `vstate::vm`), though older kernels leave the bit to the VMM to set.
const LEAF1_ECX_TSC_DEADLINE: u32 = 1 << 24;
/// Leaf 1 ECX bit 31: "running under a hypervisor" (Linux then looks at
/// the KVM leaves 0x4000_0000+ for kvmclock and paravirt features).
const LEAF1_ECX_HYPERVISOR: u32 = 1 << 31;
/// Leaf 6 EAX bit 2: ARAT, the APIC timer keeps running in deep C-states,
/// as KVM's emulated one always does. With TSC-deadline, it is what tells
/// Linux it needs no PIT (`apic_needs_pit`): the VM has none.
const LEAF6_EAX_ARAT: u32 = 1 << 2;
/// Leaf 1 EDX bit 28: HTT, more than one logical processor per package.
const LEAF1_EDX_HTT: u32 = 1 << 28;
/// Leaf 1 ECX bits Kiln sets or clears whatever the host's KVM reports:
/// a snapshot's restore asks the host for none of them.
pub const LEAF1_ECX_KILN_BITS: u32 =
    LEAF1_ECX_HYPERVISOR | LEAF1_ECX_TSC_DEADLINE | LEAF1_ECX_MONITOR;
/// Leaf 1 EDX bits that follow the vCPU count, not the host.
pub const LEAF1_EDX_KILN_BITS: u32 = LEAF1_EDX_HTT;
/// CLFLUSH line size in 8-byte units (64 bytes).
const CLFLUSH_LINE_SIZE: u32 = 8;

/// Leaf 0xb level types (Intel SDM Vol. 2A, CPUID leaf 0BH).
const LEVEL_TYPE_SMT: u32 = 1;
const LEVEL_TYPE_CORE: u32 = 2;

/// Rewrites `cpuid` for vCPU `index` of `count`.
pub fn normalize(cpuid: &mut CpuId, index: u8, count: u8) {
    for entry in cpuid.as_mut_slice() {
        normalize_entry(entry, u32::from(index), u32::from(count));
    }
}

fn normalize_entry(entry: &mut kvm_cpuid_entry2, apic_id: u32, count: u32) {
    match entry.function {
        0x1 => {
            entry.ecx =
                (entry.ecx | LEAF1_ECX_HYPERVISOR | LEAF1_ECX_TSC_DEADLINE) & !LEAF1_ECX_MONITOR;
            // Brand index stays; CLFLUSH size, logical count and APIC id are ours.
            entry.ebx =
                (apic_id << 24) | (count << 16) | (CLFLUSH_LINE_SIZE << 8) | (entry.ebx & 0xff);
            entry.edx = if count > 1 {
                entry.edx | LEAF1_EDX_HTT
            } else {
                entry.edx & !LEAF1_EDX_HTT
            };
        }
        0x4 => {
            // Deterministic cache parameters: EAX[31:26] cores per package - 1,
            // EAX[25:14] threads sharing this cache - 1 (all vCPUs share L3).
            let level = (entry.eax >> 5) & 0x7;
            let sharing = if level >= 3 { count - 1 } else { 0 };
            entry.eax = (entry.eax & 0x3fff) | ((count - 1) << 26) | (sharing << 14);
        }
        // Thermal and power management, and the PMU: host hardware the
        // guest does not get, and that differs between hosts; but the
        // LAPIC timer is KVM's own, and always running.
        0x6 => (entry.eax, entry.ebx, entry.ecx, entry.edx) = (LEAF6_EAX_ARAT, 0, 0, 0),
        0xa => (entry.eax, entry.ebx, entry.ecx, entry.edx) = (0, 0, 0, 0),
        0xb => {
            // Extended topology: level 0 SMT (1 thread per core), level 1
            // cores (`count` of them); EDX is the x2APIC id.
            (entry.eax, entry.ebx, entry.ecx) = match entry.index {
                0 => (0, 1, LEVEL_TYPE_SMT << 8),
                1 => (bits_for(count), count, 1 | (LEVEL_TYPE_CORE << 8)),
                level => (0, 0, level),
            };
            entry.edx = apic_id;
        }
        0x8000_0008 => {
            // AMD: ECX[7:0] cores per package - 1, ECX[15:12] APIC id bits.
            entry.ecx = (entry.ecx & !0xf0ff) | (count - 1) | (bits_for(count) << 12);
        }
        0x8000_001e => {
            // AMD extended APIC id, compute unit (core) id, node id.
            (entry.eax, entry.ebx, entry.ecx) = (apic_id, apic_id, 0);
        }
        _ => {}
    }
}

/// Bits needed to number `count` items (x86 topology shifts): ceil(log2).
fn bits_for(count: u32) -> u32 {
    u32::BITS - count.saturating_sub(1).leading_zeros()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leaf(function: u32, index: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            eax: 0xffff_ffff,
            ebx: 0xffff_ffff,
            ecx: 0xffff_ffff,
            edx: 0xffff_ffff,
            ..Default::default()
        }
    }

    fn normalized(entries: &[kvm_cpuid_entry2], index: u8, count: u8) -> Vec<kvm_cpuid_entry2> {
        let mut cpuid = CpuId::from_entries(entries).unwrap();
        normalize(&mut cpuid, index, count);
        cpuid.as_slice().to_vec()
    }

    #[test]
    fn leaf_1_carries_apic_id_count_and_hypervisor_bit() {
        let out = normalized(&[leaf(1, 0)], 1, 2);
        assert_eq!(out[0].ebx >> 24, 1);
        assert_eq!((out[0].ebx >> 16) & 0xff, 2);
        assert_ne!(out[0].ecx & LEAF1_ECX_HYPERVISOR, 0);
        assert_eq!(out[0].ecx & LEAF1_ECX_MONITOR, 0);
        assert_ne!(out[0].edx & LEAF1_EDX_HTT, 0);
        assert_eq!(normalized(&[leaf(1, 0)], 0, 1)[0].edx & LEAF1_EDX_HTT, 0);
    }

    #[test]
    fn the_lapic_timer_needs_no_pit() {
        let bare = kvm_cpuid_entry2 {
            function: 1,
            ..Default::default()
        };
        let out = normalized(&[bare], 0, 1);
        assert_ne!(out[0].ecx & LEAF1_ECX_TSC_DEADLINE, 0);
    }

    #[test]
    fn topology_leaves_describe_n_single_thread_cores() {
        let out = normalized(&[leaf(0xb, 0), leaf(0xb, 1), leaf(0xb, 2)], 3, 4);
        assert_eq!(
            (out[0].eax, out[0].ebx, out[0].ecx, out[0].edx),
            (0, 1, 0x100, 3)
        );
        assert_eq!(
            (out[1].eax, out[1].ebx, out[1].ecx, out[1].edx),
            (2, 4, 0x201, 3)
        );
        assert_eq!((out[2].ebx, out[2].ecx & 0xff00), (0, 0));
        let amd = normalized(&[leaf(0x8000_0008, 0), leaf(0x8000_001e, 0)], 2, 4);
        assert_eq!((amd[0].ecx & 0xff, (amd[0].ecx >> 12) & 0xf), (3, 2));
        assert_eq!((amd[1].eax, amd[1].ebx, amd[1].ecx), (2, 2, 0));
    }

    #[test]
    fn host_power_and_pmu_leaves_are_hidden_but_arat() {
        let out = normalized(&[leaf(6, 0), leaf(0xa, 0)], 0, 1);
        assert_eq!(
            (out[0].eax, out[0].ebx, out[0].ecx, out[0].edx),
            (LEAF6_EAX_ARAT, 0, 0, 0)
        );
        assert_eq!(
            (out[1].eax, out[1].ebx, out[1].ecx, out[1].edx),
            (0, 0, 0, 0)
        );
    }

    #[test]
    fn cache_leaf_shares_l3_across_vcpus() {
        let mut l1 = leaf(4, 0);
        l1.eax = 1 << 5; // level 1
        let mut l3 = leaf(4, 3);
        l3.eax = 3 << 5;
        let out = normalized(&[l1, l3], 0, 2);
        assert_eq!((out[0].eax >> 26, (out[0].eax >> 14) & 0xfff), (1, 0));
        assert_eq!((out[1].eax >> 26, (out[1].eax >> 14) & 0xfff), (1, 1));
    }

    #[test]
    fn bit_counts() {
        assert_eq!([1, 2, 3, 4, 5, 8, 9].map(bits_for), [0, 1, 2, 2, 3, 3, 4]);
    }
}
