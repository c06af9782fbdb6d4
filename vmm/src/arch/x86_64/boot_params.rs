//! The zero page ("struct boot_params") a 64-bit Linux kernel reads at
//! entry. Booting the ELF vmlinux directly, there is no bzImage setup
//! header to copy, so the VMM fills in the few fields the kernel needs.
//! Offsets are from Documentation/arch/x86/zero-page.rst and boot.rst.
use vm_memory::{Bytes, GuestAddress, GuestMemory, GuestMemoryError};

use super::layout::{
    CMDLINE_START, EBDA_START, HIMEM_START, MMIO_GAP_END, MMIO_GAP_START, ZERO_PAGE_START,
};

const ZERO_PAGE_SIZE: usize = 4096;

// struct boot_params offsets (zero-page.rst).
const E820_ENTRIES: usize = 0x1e8;
const E820_TABLE: usize = 0x2d0;
const E820_MAX_ENTRIES: usize = 128;
const E820_ENTRY_SIZE: usize = 20;

// struct setup_header offsets, from the start of the zero page (boot.rst).
const HDR_BOOT_FLAG: usize = 0x1fe;
const HDR_HEADER: usize = 0x202;
const HDR_TYPE_OF_LOADER: usize = 0x210;
const HDR_LOADFLAGS: usize = 0x211;
const HDR_CMD_LINE_PTR: usize = 0x228;
const HDR_KERNEL_ALIGNMENT: usize = 0x230;
const HDR_CMDLINE_SIZE: usize = 0x238;

/// boot_flag: 0xAA55, as in a boot sector.
const BOOT_FLAG_MAGIC: u16 = 0xaa55;
/// header: "HdrS".
const HEADER_MAGIC: u32 = 0x5372_6448;
/// type_of_loader 0xff: "undefined" boot loader (boot.rst).
const LOADER_UNDEFINED: u8 = 0xff;
/// loadflags LOADED_HIGH: the protected-mode kernel is at 0x100000 or above.
const LOADED_HIGH: u8 = 0x01;
/// The kernel's default physical alignment (CONFIG_PHYSICAL_ALIGN).
const KERNEL_ALIGNMENT: u32 = 0x0100_0000;

/// e820 type 1: usable RAM (ACPI spec, Table 15-312 "Address Range Types").
const E820_RAM: u32 = 1;

/// Errors from writing the zero page.
#[derive(Debug, thiserror::Error)]
pub enum BootParamsError {
    /// More memory ranges than the e820 table holds.
    #[error("the e820 map needs {0} entries; the zero page holds {E820_MAX_ENTRIES}")]
    TooManyRanges(usize),
    /// The zero page does not fit in guest memory.
    #[error("cannot write the zero page")]
    Write(#[from] GuestMemoryError),
}

/// A zero page under construction.
pub struct BootParams {
    bytes: [u8; ZERO_PAGE_SIZE],
}

impl BootParams {
    /// A zero page for a kernel with `cmdline_len` bytes of command line
    /// (NUL excluded) at CMDLINE_START, and `mem_size` bytes of RAM.
    pub fn new(cmdline_len: usize, mem_size: u64) -> Result<Self, BootParamsError> {
        let mut params = BootParams {
            bytes: [0; ZERO_PAGE_SIZE],
        };
        params.put(HDR_BOOT_FLAG, &BOOT_FLAG_MAGIC.to_le_bytes());
        params.put(HDR_HEADER, &HEADER_MAGIC.to_le_bytes());
        params.put(HDR_TYPE_OF_LOADER, &[LOADER_UNDEFINED]);
        params.put(HDR_LOADFLAGS, &[LOADED_HIGH]);
        params.put(HDR_CMD_LINE_PTR, &(CMDLINE_START as u32).to_le_bytes());
        params.put(HDR_CMDLINE_SIZE, &(cmdline_len as u32).to_le_bytes());
        params.put(HDR_KERNEL_ALIGNMENT, &KERNEL_ALIGNMENT.to_le_bytes());
        params.set_e820(&ram_ranges(mem_size))?;
        Ok(params)
    }

    fn put(&mut self, offset: usize, value: &[u8]) {
        self.bytes[offset..offset + value.len()].copy_from_slice(value);
    }

    fn set_e820(&mut self, ranges: &[(u64, u64)]) -> Result<(), BootParamsError> {
        if ranges.len() > E820_MAX_ENTRIES {
            return Err(BootParamsError::TooManyRanges(ranges.len()));
        }
        for (index, &(start, size)) in ranges.iter().enumerate() {
            let entry = E820_TABLE + index * E820_ENTRY_SIZE;
            self.put(entry, &start.to_le_bytes());
            self.put(entry + 8, &size.to_le_bytes());
            self.put(entry + 16, &E820_RAM.to_le_bytes());
        }
        self.put(E820_ENTRIES, &[ranges.len() as u8]);
        Ok(())
    }

    /// Writes the zero page at ZERO_PAGE_START.
    pub fn write_to<M: GuestMemory>(&self, mem: &M) -> Result<(), BootParamsError> {
        mem.write_slice(&self.bytes, GuestAddress(ZERO_PAGE_START))?;
        Ok(())
    }
}

/// The RAM ranges (start, size) of a guest with `mem_size` bytes: below
/// the EBDA, from 1 MiB to the MMIO gap, and above 4 GiB for the rest.
/// Everything else (EBDA, legacy hole, the gap) is not RAM to the guest.
pub fn ram_ranges(mem_size: u64) -> Vec<(u64, u64)> {
    let mut ranges = vec![(0, EBDA_START)];
    let below_gap = mem_size.min(MMIO_GAP_START);
    if below_gap > HIMEM_START {
        ranges.push((HIMEM_START, below_gap - HIMEM_START));
    }
    if mem_size > MMIO_GAP_START {
        ranges.push((MMIO_GAP_END, mem_size - MMIO_GAP_START));
    }
    ranges
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read_u32(params: &BootParams, offset: usize) -> u32 {
        u32::from_le_bytes(params.bytes[offset..offset + 4].try_into().unwrap())
    }

    #[test]
    fn header_fields_sit_at_their_documented_offsets() {
        let params = BootParams::new(42, 128 << 20).unwrap();
        assert_eq!(&params.bytes[0x1fe..0x200], &[0x55, 0xaa]);
        assert_eq!(&params.bytes[0x202..0x206], b"HdrS");
        assert_eq!(params.bytes[0x210], 0xff);
        assert_eq!(read_u32(&params, 0x228), CMDLINE_START as u32);
        assert_eq!(read_u32(&params, 0x238), 42);
        assert_eq!(read_u32(&params, 0x230), 0x0100_0000);
    }

    #[test]
    fn e820_lists_low_and_high_ram() {
        let params = BootParams::new(0, 128 << 20).unwrap();
        assert_eq!(params.bytes[E820_ENTRIES], 2);
        let second = E820_TABLE + E820_ENTRY_SIZE;
        assert_eq!(
            u64::from_le_bytes(params.bytes[second..second + 8].try_into().unwrap()),
            HIMEM_START
        );
        assert_eq!(read_u32(&params, second + 16), E820_RAM);
    }

    #[test]
    fn memory_beyond_the_gap_moves_above_4_gib() {
        let four_gib = 4u64 << 30;
        assert_eq!(
            ram_ranges(four_gib),
            vec![
                (0, EBDA_START),
                (HIMEM_START, MMIO_GAP_START - HIMEM_START),
                (MMIO_GAP_END, four_gib - MMIO_GAP_START),
            ]
        );
    }
}
