//! The guest physical memory map, in one place.
//!
//! ```text
//! 0x0000_0500  GDT (4 entries), then the IDT (one null entry)
//! 0x0000_7000  zero page (boot_params)
//! 0x0000_8ff0  initial stack pointer (grows down, below the page tables)
//! 0x0000_9000  PML4, PDPT, PD: identity map of the first 1 GiB
//! 0x0002_0000  kernel command line
//! 0x0009_fc00  EBDA: MP floating pointer and configuration table
//! 0x0010_0000  high memory: the kernel loads at 16 MiB (its ELF p_paddr)
//! 0xd000_0000  32-bit MMIO gap: virtio-mmio devices, IOAPIC, LAPIC
//! 0x1_0000_0000  RAM above 4 GiB, when the VM has more than fits below the gap
//! ```

use crate::devices::ioapic::IOAPIC_PINS;

/// The boot GDT. Low memory that the kernel overwrites later.
pub const BOOT_GDT_START: u64 = 0x500;
/// The boot IDT: one null entry, so an early exception triple-faults.
pub const BOOT_IDT_START: u64 = 0x520;
/// The zero page ("boot_params", Documentation/arch/x86/zero-page.rst).
pub const ZERO_PAGE_START: u64 = 0x7000;
/// RSP at entry: the 64-bit boot protocol needs a usable stack.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// The page-map level-4 table; the PDPT and the PD follow, one page each.
pub const PML4_START: u64 = 0x9000;
/// Page directory pointer table.
pub const PDPTE_START: u64 = 0xa000;
/// Page directory: 512 2-MiB pages identity-map the first 1 GiB.
pub const PDE_START: u64 = 0xb000;
/// The kernel command line.
pub const CMDLINE_START: u64 = 0x20000;
/// x86's COMMAND_LINE_SIZE (arch/x86/include/asm/setup.h), NUL included.
pub const CMDLINE_MAX_SIZE: usize = 2048;
/// The extended BIOS data area: the last KiB of conventional memory, where
/// Linux looks for the MP floating pointer (MP spec 1.4 §4).
pub const EBDA_START: u64 = 0x9fc00;
/// 640 KiB: the end of conventional memory, where the legacy hole begins.
pub const CONVENTIONAL_MEMORY_END: u64 = 0xa0000;
/// First byte above the legacy (ISA) hole.
pub const HIMEM_START: u64 = 0x10_0000;

/// Start of the 32-bit MMIO gap below 4 GiB (3.25 GiB): no RAM there.
pub const MMIO_GAP_START: u64 = 0xd000_0000;
/// End of the 32-bit MMIO gap.
pub const MMIO_GAP_END: u64 = 1 << 32;
/// virtio-mmio devices, one 4 KiB region each, from the gap's start.
pub const VIRTIO_MMIO_START: u64 = MMIO_GAP_START;
/// The IOAPIC's default MMIO base (Intel 82093AA datasheet §3).
pub const IOAPIC_START: u64 = 0xfec0_0000;
/// The local APIC's default MMIO base (Intel SDM Vol. 3A §11.4.1).
pub const APIC_START: u64 = 0xfee0_0000;
/// Three pages KVM needs for the TSS on Intel (KVM_SET_TSS_ADDR), placed
/// at the top of the gap where nothing else lives, as QEMU and Firecracker do.
pub const KVM_TSS_ADDRESS: u64 = 0xfffb_d000;

/// IOAPIC pins 0-15 are the legacy ISA IRQs (4: COM1); virtio devices take
/// the pins from 5 on, skipping none of the ones we emulate.
pub const IRQ_VIRTIO_FIRST: u32 = 5;
/// The last IOAPIC pin.
pub const IRQ_MAX: u32 = IOAPIC_PINS as u32 - 1;
