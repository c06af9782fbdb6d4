//! The IOAPIC against the real /dev/kvm: a pin the guest unmasks becomes
//! an MSI route in KVM, and its line's irqfd then reaches the local APIC
//! (no guest runs: the interrupt is read back from the vCPU's LAPIC IRR).
//! Needs an openable /dev/kvm: hardware KVM, or PVM, whose ioctl API is
//! complete.
use kiln_vmm::devices::bus::BusDevice;
use kiln_vmm::devices::ioapic::{Ioapic, MsiRoute, MsiRouter};
use kiln_vmm::vstate::memory;
use kiln_vmm::vstate::vm::Vm;
use kvm_ioctls::{Kvm, VcpuFd};
use vmm_sys_util::eventfd::EventFd;

/// The LAPIC's registers (Intel SDM Vol. 3A Table 11-1): the spurious
/// interrupt vector register, whose bit 8 software-enables the APIC, and
/// the interrupt request register's eight 32-bit words, 16 bytes apart.
const APIC_SPIV: usize = 0xf0;
const APIC_SOFTWARE_ENABLE: u32 = 1 << 8;
const APIC_IRR: usize = 0x200;

/// COM1's pin, and the vector the test's guest gives it.
const PIN: u32 = 4;
const VECTOR: u8 = 0x31;

fn lapic_word(vcpu: &VcpuFd, offset: usize) -> u32 {
    let lapic = vcpu.get_lapic().unwrap();
    let bytes: Vec<u8> = lapic.regs[offset..offset + 4]
        .iter()
        .map(|&b| b as u8)
        .collect();
    u32::from_le_bytes(bytes.try_into().unwrap())
}

/// vCPU 0 with its LAPIC software-enabled, so that it accepts fixed
/// interrupts, as a guest's kernel enables it.
fn enabled_vcpu(vm: &Vm) -> VcpuFd {
    let vcpu = vm.fd().create_vcpu(0).unwrap();
    let mut lapic = vcpu.get_lapic().unwrap();
    let spiv = lapic_word(&vcpu, APIC_SPIV) | APIC_SOFTWARE_ENABLE;
    for (i, byte) in spiv.to_le_bytes().into_iter().enumerate() {
        lapic.regs[APIC_SPIV + i] = byte as _;
    }
    vcpu.set_lapic(&lapic).unwrap();
    vcpu
}

fn requested(vcpu: &VcpuFd, vector: u8) -> bool {
    let word = lapic_word(vcpu, APIC_IRR + usize::from(vector / 32) * 0x10);
    word & (1 << (vector % 32)) != 0
}

/// Writes one of the chip's registers as a guest does: IOREGSEL, then IOWIN.
fn program(chip: &mut Ioapic, register: u8, value: u32) {
    chip.write(0x00, &u32::from(register).to_le_bytes());
    chip.write(0x10, &value.to_le_bytes());
}

#[test]
fn an_unmasked_pin_delivers_its_lines_edges_to_the_lapic() {
    let kvm = Kvm::new().expect("this test needs an openable /dev/kvm");
    let vm = Vm::new(&kvm, &memory::create(16).unwrap()).unwrap();
    let vcpu = enabled_vcpu(&vm);
    let line = EventFd::new(0).unwrap();
    vm.register_irqfd(&line, PIN).unwrap();
    let mut chip = Ioapic::new(1, Box::new(vm.gsi_routing()));

    // Masked, as after reset: the edge is lost.
    line.write(1).unwrap();
    assert!(!requested(&vcpu, VECTOR));

    // Destination APIC 0, physical, fixed, unmasked: high half, then low.
    let entry = 0x10 + 2 * PIN as u8;
    program(&mut chip, entry + 1, 0);
    program(&mut chip, entry, u32::from(VECTOR));
    line.write(1).unwrap();
    assert!(requested(&vcpu, VECTOR), "the pin's MSI did not arrive");
}

#[test]
fn routes_set_after_the_vm_is_gone_go_nowhere() {
    let kvm = Kvm::new().expect("this test needs an openable /dev/kvm");
    let vm = Vm::new(&kvm, &memory::create(16).unwrap()).unwrap();
    let routing = vm.gsi_routing();
    let route = MsiRoute {
        gsi: PIN,
        address: 0xfee0_0000,
        data: u32::from(VECTOR),
    };
    routing.set_routes(&[route]).unwrap();
    // KVM checks what it is given: a GSI past its table is refused.
    let beyond = MsiRoute {
        gsi: 1 << 20,
        ..route
    };
    assert!(routing.set_routes(&[beyond]).is_err());
    drop(vm);
    routing.set_routes(&[route]).unwrap();
}
