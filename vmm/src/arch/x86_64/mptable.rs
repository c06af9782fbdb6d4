//! The Intel MultiProcessor table (MP spec 1.4, chapter 4). Without ACPI
//! this is how Linux (CONFIG_X86_MPPARSE) finds the vCPUs, the IOAPIC and
//! how ISA interrupts are wired.
//!
//! Layout at EBDA_START: the 16-byte floating pointer, then the
//! configuration table: header, one processor entry per vCPU, the ISA bus,
//! the IOAPIC, an I/O interrupt entry per IOAPIC pin, and the LINT0/LINT1
//! local interrupt entries.
use vm_memory::{Bytes, GuestAddress, GuestMemory, GuestMemoryError};

use super::layout::{APIC_START, CONVENTIONAL_MEMORY_END, EBDA_START, IOAPIC_START, IRQ_MAX};
use crate::devices::ioapic::IOAPIC_VERSION;

// Entry types and sizes (MP spec §4.3, Table 4-3).
const ENTRY_PROCESSOR: u8 = 0;
const ENTRY_BUS: u8 = 1;
const ENTRY_IOAPIC: u8 = 2;
const ENTRY_IO_INTERRUPT: u8 = 3;
const ENTRY_LOCAL_INTERRUPT: u8 = 4;
const PROCESSOR_ENTRY_SIZE: usize = 20;
const SMALL_ENTRY_SIZE: usize = 8;
const FLOATING_POINTER_SIZE: usize = 16;
const HEADER_SIZE: usize = 44;

/// Spec revision 1.4.
const SPEC_REVISION: u8 = 4;
/// A local APIC version of the integrated (xAPIC) kind.
const APIC_VERSION: u8 = 0x14;
/// Processor flags: bit 0 enabled, bit 1 bootstrap processor (§4.3.1).
const CPU_ENABLED: u8 = 1;
const CPU_BOOTSTRAP: u8 = 2;
/// CPU signature (family 6) and feature flags (FPU, APIC) as in §4.3.1.
const CPU_SIGNATURE: u32 = 0x600;
const CPU_FEATURES: u32 = (1 << 0) | (1 << 9);
/// Interrupt types (§4.3.4): vectored, NMI, ExtINT.
const INT_VECTORED: u8 = 0;
const INT_NMI: u8 = 1;
const INT_EXTINT: u8 = 3;
/// Destination "all local APICs" for a local interrupt entry.
const ALL_LOCAL_APICS: u8 = 0xff;

/// Room in the EBDA for the whole structure: 1 KiB below 640 KiB.
const MAX_SIZE: usize = (CONVENTIONAL_MEMORY_END - EBDA_START) as usize;

/// Errors from writing the MP table.
#[derive(Debug, thiserror::Error)]
pub enum MptableError {
    /// Too many vCPUs for the space in the EBDA.
    #[error("{0} vCPUs do not fit in the MP table (at most {max})", max = max_vcpus())]
    TooManyVcpus(u8),
    /// Guest memory does not cover the EBDA.
    #[error("cannot write the MP table")]
    Write(#[from] GuestMemoryError),
}

/// The most vCPUs whose entries fit in [`MAX_SIZE`].
pub const fn max_vcpus() -> usize {
    let fixed =
        FLOATING_POINTER_SIZE + HEADER_SIZE + SMALL_ENTRY_SIZE * (2 + IRQ_MAX as usize + 1 + 2);
    (MAX_SIZE - fixed) / PROCESSOR_ENTRY_SIZE
}

/// Writes the MP floating pointer and table for `vcpus` CPUs at EBDA_START.
pub fn write<M: GuestMemory>(mem: &M, vcpus: u8) -> Result<(), MptableError> {
    let bytes = build(vcpus)?;
    mem.write_slice(&bytes, GuestAddress(EBDA_START))?;
    Ok(())
}

/// The IOAPIC's APIC ID: the vCPUs have IDs 0 to `vcpus - 1`, the IOAPIC
/// the next.
pub const fn ioapic_id(vcpus: u8) -> u8 {
    vcpus
}

fn build(vcpus: u8) -> Result<Vec<u8>, MptableError> {
    if vcpus == 0 || usize::from(vcpus) > max_vcpus() {
        return Err(MptableError::TooManyVcpus(vcpus));
    }
    let ioapic_id = ioapic_id(vcpus);
    let mut entries = Vec::new();
    for cpu in 0..vcpus {
        let flags = CPU_ENABLED | if cpu == 0 { CPU_BOOTSTRAP } else { 0 };
        entries.extend([ENTRY_PROCESSOR, cpu, APIC_VERSION, flags]);
        entries.extend(CPU_SIGNATURE.to_le_bytes());
        entries.extend(CPU_FEATURES.to_le_bytes());
        entries.extend([0; 8]);
    }
    entries.extend([ENTRY_BUS, 0]);
    entries.extend(b"ISA   ");
    entries.extend([ENTRY_IOAPIC, ioapic_id, IOAPIC_VERSION, 1]);
    entries.extend((IOAPIC_START as u32).to_le_bytes());
    // ISA IRQ n arrives on IOAPIC pin n, with the bus's default polarity
    // and trigger (flags 0: "conforms to the bus").
    for irq in 0..=IRQ_MAX as u8 {
        entries.extend([
            ENTRY_IO_INTERRUPT,
            INT_VECTORED,
            0,
            0,
            0,
            irq,
            ioapic_id,
            irq,
        ]);
    }
    entries.extend([ENTRY_LOCAL_INTERRUPT, INT_EXTINT, 0, 0, 0, 0, 0, 0]);
    entries.extend([
        ENTRY_LOCAL_INTERRUPT,
        INT_NMI,
        0,
        0,
        0,
        0,
        ALL_LOCAL_APICS,
        1,
    ]);
    let entry_count = u16::from(vcpus) + 1 + 1 + (IRQ_MAX as u16 + 1) + 2;

    let table_start = EBDA_START as u32 + FLOATING_POINTER_SIZE as u32;
    let mut table = Vec::with_capacity(HEADER_SIZE + entries.len());
    table.extend(b"PCMP");
    table.extend(((HEADER_SIZE + entries.len()) as u16).to_le_bytes());
    table.extend([SPEC_REVISION, 0]); // checksum filled in below
    table.extend(b"KILN    "); // OEM id, 8 bytes
    table.extend(b"MICROVM     "); // product id, 12 bytes
    table.extend(0u32.to_le_bytes()); // no OEM table
    table.extend(0u16.to_le_bytes());
    table.extend(entry_count.to_le_bytes());
    table.extend((APIC_START as u32).to_le_bytes());
    table.extend([0; 4]); // no extended table
    table.extend(entries);
    table[7] = checksum(&table);

    let mut bytes = Vec::with_capacity(FLOATING_POINTER_SIZE + table.len());
    bytes.extend(b"_MP_");
    bytes.extend(table_start.to_le_bytes());
    bytes.extend([1, SPEC_REVISION, 0]); // length in 16-byte units; checksum below
    bytes.extend([0; 5]); // feature byte 1 = 0: a configuration table is present
    bytes[10] = checksum(&bytes);
    bytes.extend(table);
    Ok(bytes)
}

/// The byte that makes `bytes` sum to zero (mod 256).
fn checksum(bytes: &[u8]) -> u8 {
    0u8.wrapping_sub(bytes.iter().fold(0u8, |sum, b| sum.wrapping_add(*b)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sums_to_zero(bytes: &[u8]) -> bool {
        bytes.iter().fold(0u8, |sum, b| sum.wrapping_add(*b)) == 0
    }

    #[test]
    fn signatures_checksums_and_lengths() {
        for vcpus in [1, 2, 8] {
            let bytes = build(vcpus).unwrap();
            assert_eq!(&bytes[..4], b"_MP_");
            assert!(sums_to_zero(&bytes[..16]));
            let table = &bytes[16..];
            assert_eq!(&table[..4], b"PCMP");
            assert_eq!(
                usize::from(u16::from_le_bytes([table[4], table[5]])),
                table.len()
            );
            assert!(sums_to_zero(table));
            assert!(bytes.len() <= MAX_SIZE);
        }
    }

    #[test]
    fn one_processor_entry_per_vcpu_and_only_cpu_0_boots() {
        let bytes = build(3).unwrap();
        let entries = &bytes[16 + HEADER_SIZE..];
        let count = u16::from_le_bytes([bytes[16 + 34], bytes[16 + 35]]);
        assert_eq!(count, 3 + 2 + 24 + 2);
        for cpu in 0..3 {
            let entry = &entries[cpu * PROCESSOR_ENTRY_SIZE..];
            assert_eq!((entry[0], entry[1]), (ENTRY_PROCESSOR, cpu as u8));
            assert_eq!(entry[3] & CPU_BOOTSTRAP != 0, cpu == 0);
        }
        assert_eq!(entries[3 * PROCESSOR_ENTRY_SIZE], ENTRY_BUS);
    }

    #[test]
    fn vcpu_counts_are_bounded() {
        assert!(matches!(build(0), Err(MptableError::TooManyVcpus(0))));
        assert!(build(max_vcpus() as u8).is_ok());
        assert!(build(max_vcpus() as u8 + 1).is_err());
    }
}
