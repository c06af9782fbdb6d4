//! x86_64: what the Linux 64-bit boot protocol expects to find when a vCPU
//! starts at the kernel's entry point, and how Kiln builds it.
pub mod boot_params;
pub mod cpuid;
pub mod gdt;
pub mod layout;
pub mod mptable;
pub mod msr;
pub mod paging;
pub mod regs;
