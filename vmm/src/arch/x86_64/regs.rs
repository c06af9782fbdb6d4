//! A vCPU's registers at the kernel's 64-bit entry point
//! (Documentation/arch/x86/boot.rst, "64-bit BOOT PROTOCOL"): long mode
//! with paging, flat segments from the boot GDT, interrupts off,
//! RSI = the zero page.
use kvm_bindings::{kvm_fpu, kvm_regs, kvm_sregs};

use super::gdt::{self, BOOT_GDT};
use super::layout::{BOOT_GDT_START, BOOT_IDT_START, BOOT_STACK_POINTER, ZERO_PAGE_START};

/// CR0.PE: protected mode (SDM Vol. 3A §2.5).
const X86_CR0_PE: u64 = 1 << 0;
/// CR0.PG: paging.
const X86_CR0_PG: u64 = 1 << 31;
/// CR4.PAE: physical address extension, required by long mode.
const X86_CR4_PAE: u64 = 1 << 5;
/// EFER.LME: long mode enable (SDM Vol. 3A §2.2.1).
const EFER_LME: u64 = 1 << 8;
/// EFER.LMA: long mode active.
const EFER_LMA: u64 = 1 << 10;
/// RFLAGS bit 1 is reserved and always set.
const RFLAGS_RESERVED: u64 = 1 << 1;

/// x87 control word at reset (FNINIT): all exceptions masked, 64-bit precision.
const FPU_CONTROL_WORD: u16 = 0x37f;
/// MXCSR at reset: all SSE exceptions masked.
const MXCSR_DEFAULT: u32 = 0x1f80;

/// General registers: entry point, stack, zero page.
pub fn boot_regs(entry: u64) -> kvm_regs {
    kvm_regs {
        rflags: RFLAGS_RESERVED,
        rip: entry,
        rsp: BOOT_STACK_POINTER,
        rbp: BOOT_STACK_POINTER,
        rsi: ZERO_PAGE_START,
        ..Default::default()
    }
}

/// Segment and control registers, starting from KVM's current ones (which
/// carry the APIC base and other state we keep).
pub fn boot_sregs(mut sregs: kvm_sregs, cr3: u64) -> kvm_sregs {
    let code = gdt::segment(gdt::CODE_INDEX);
    let data = gdt::segment(gdt::DATA_INDEX);
    sregs.cs = code;
    (sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss) = (data, data, data, data, data);
    sregs.tr = gdt::segment(gdt::TSS_INDEX);
    sregs.gdt.base = BOOT_GDT_START;
    sregs.gdt.limit = (std::mem::size_of_val(&BOOT_GDT) - 1) as u16;
    sregs.idt.base = BOOT_IDT_START;
    sregs.idt.limit = (std::mem::size_of::<u64>() - 1) as u16;
    sregs.cr0 |= X86_CR0_PE | X86_CR0_PG;
    sregs.cr3 = cr3;
    sregs.cr4 |= X86_CR4_PAE;
    sregs.efer |= EFER_LME | EFER_LMA;
    sregs
}

/// The FPU as FNINIT and a reset MXCSR leave it.
pub fn boot_fpu() -> kvm_fpu {
    kvm_fpu {
        fcw: FPU_CONTROL_WORD,
        mxcsr: MXCSR_DEFAULT,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_mode_with_paging_and_flat_segments() {
        let sregs = boot_sregs(kvm_sregs::default(), 0x9000);
        assert_eq!(
            sregs.cr0 & (X86_CR0_PE | X86_CR0_PG),
            X86_CR0_PE | X86_CR0_PG
        );
        assert_eq!(sregs.efer & (EFER_LME | EFER_LMA), EFER_LME | EFER_LMA);
        assert_ne!(sregs.cr4 & X86_CR4_PAE, 0);
        assert_eq!(
            (sregs.cr3, sregs.cs.selector, sregs.ss.selector),
            (0x9000, 0x08, 0x10)
        );
        assert_eq!((sregs.gdt.base, sregs.gdt.limit), (BOOT_GDT_START, 31));
    }

    #[test]
    fn entry_registers_follow_the_boot_protocol() {
        let regs = boot_regs(0x100_0000);
        assert_eq!(
            (regs.rip, regs.rsi, regs.rflags),
            (0x100_0000, ZERO_PAGE_START, 2)
        );
        assert_eq!(boot_fpu().mxcsr, 0x1f80);
    }
}
