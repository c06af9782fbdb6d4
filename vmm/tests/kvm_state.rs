//! Save/restore round trips of the KVM state a snapshot carries, against
//! the real /dev/kvm (no guest runs: a vCPU set up for boot is saved,
//! restored into a fresh VM and saved again, and both saves must agree).
//! Needs an openable /dev/kvm: hardware KVM, or PVM, whose ioctl API is
//! complete.
use kiln_vmm::vstate::memory;
use kiln_vmm::vstate::vcpu::Vcpu;
use kiln_vmm::vstate::vcpu_state::VcpuState;
use kiln_vmm::vstate::vm::{Vm, VmState, supported_cpuid};
use kvm_ioctls::Kvm;

fn kvm() -> Kvm {
    Kvm::new().expect("these tests need an openable /dev/kvm")
}

#[test]
fn vm_state_survives_a_round_trip() {
    let kvm = kvm();
    let mem = memory::create(16).unwrap();
    let vm = Vm::new(&kvm, &mem).unwrap();
    let saved = vm.save_state().unwrap();
    let json = serde_json::to_string(&saved).unwrap();
    let restored: VmState = serde_json::from_str(&json).unwrap();

    let fresh = Vm::new(&kvm, &memory::create(16).unwrap()).unwrap();
    fresh.restore_state(&restored).unwrap();
    let again = fresh.save_state().unwrap();
    // The guest's time went on between the two saves, by little.
    let elapsed = again.clock.clock - saved.clock.clock;
    assert!(elapsed < 5_000_000_000, "the clock went {elapsed} ns ahead");
}

#[test]
fn vcpu_state_survives_a_round_trip() {
    let kvm = kvm();
    let mem = memory::create(16).unwrap();
    let vm = Vm::new(&kvm, &mem).unwrap();
    let entry = 0x100_0000;
    let supported = supported_cpuid(&kvm).unwrap();
    let vcpu = Vcpu::boot(&kvm, &vm, &supported, 0, 1, entry, 0x9000).unwrap();
    let saved = vcpu.save().unwrap();
    assert_eq!(saved.regs.rip, entry);
    assert!(!saved.msrs.is_empty());
    let json = serde_json::to_string(&saved).unwrap();
    let restored: VcpuState = serde_json::from_str(&json).unwrap();

    let fresh_vm = Vm::new(&kvm, &memory::create(16).unwrap()).unwrap();
    let fresh = Vcpu::restore(&kvm, &fresh_vm, &restored).unwrap();
    let again = fresh.save().unwrap();
    assert_eq!(again.regs.rip, saved.regs.rip);
    assert_eq!(again.sregs.cr3, saved.sregs.cr3);
    assert_eq!(again.sregs.cr0, saved.sregs.cr0);
    assert_eq!(again.cpuid.len(), saved.cpuid.len());
    // Every MSR comes back, with its value (the TSC has moved on).
    let tsc = 0x10;
    for (a, b) in again.msrs.iter().zip(&saved.msrs) {
        assert_eq!(a.index, b.index);
        if a.index != tsc {
            assert_eq!(a.data, b.data, "MSR {:#x}", a.index);
        }
    }
    assert_eq!(again.msrs.len(), saved.msrs.len());
    assert_eq!(
        serde_json::to_value(again.lapic).unwrap(),
        serde_json::to_value(saved.lapic).unwrap()
    );
}
