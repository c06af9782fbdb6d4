//! Identity page tables for the first 1 GiB, as the 64-bit boot protocol
//! requires ("the range with setup_header.init_size from start address of
//! loaded kernel and zero page and command line buffer get ident mapping").
use vm_memory::{Bytes, GuestAddress, GuestMemory};

use super::layout::{PDE_START, PDPTE_START, PML4_START};

/// Present + writable (SDM Vol. 3A §4.5, Table 4-15 ff.).
const PRESENT_WRITABLE: u64 = 0x3;
/// Present + writable + PS (a 2 MiB page in a PD entry).
const PRESENT_WRITABLE_HUGE: u64 = 0x83;
const HUGE_PAGE_SIZE: u64 = 2 << 20;
const ENTRIES_PER_TABLE: u64 = 512;

/// Writes PML4 → PDPT → PD with 512 2-MiB pages; returns CR3.
pub fn write_identity_map<M: GuestMemory>(mem: &M) -> Result<u64, vm_memory::GuestMemoryError> {
    mem.write_obj(PDPTE_START | PRESENT_WRITABLE, GuestAddress(PML4_START))?;
    mem.write_obj(PDE_START | PRESENT_WRITABLE, GuestAddress(PDPTE_START))?;
    for index in 0..ENTRIES_PER_TABLE {
        let entry = (index * HUGE_PAGE_SIZE) | PRESENT_WRITABLE_HUGE;
        mem.write_obj(entry, GuestAddress(PDE_START + index * 8))?;
    }
    Ok(PML4_START)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryMmap;

    #[test]
    fn maps_the_first_gigabyte_one_to_one() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        assert_eq!(write_identity_map(&mem).unwrap(), PML4_START);
        let read = |addr: u64| mem.read_obj::<u64>(GuestAddress(addr)).unwrap();
        assert_eq!(read(PML4_START), PDPTE_START | 3);
        assert_eq!(read(PDPTE_START), PDE_START | 3);
        assert_eq!(read(PDE_START), 0x83);
        assert_eq!(read(PDE_START + 8 * 511), (511 << 21) | 0x83);
    }
}
