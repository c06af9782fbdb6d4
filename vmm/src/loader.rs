//! Loading an uncompressed `vmlinux` ELF into guest memory.
//!
//! The Linux 64-bit boot protocol enters the kernel at its ELF entry point
//! (`startup_64`), so no decompressor or real-mode setup code runs: each
//! PT_LOAD segment goes to its physical address (`p_paddr`).
use std::fs;
use std::path::{Path, PathBuf};

use goblin::elf::{Elf, header, program_header::PT_LOAD};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use crate::devices::virtio::GuestMemoryMmap;

use crate::arch::x86_64::layout::HIMEM_START;

/// Why a kernel could not be loaded. Each names the file.
#[derive(Debug, thiserror::Error)]
pub enum LoaderError {
    /// The kernel file could not be read at all.
    #[error("cannot read the kernel {path}")]
    Read {
        /// The kernel file.
        path: PathBuf,
        /// Why reading it failed.
        #[source]
        source: std::io::Error,
    },
    /// The file does not parse as ELF; most often it is a compressed
    /// bzImage, which Kiln does not boot.
    #[error("{path} is not an ELF file (expected an uncompressed vmlinux, not a bzImage)")]
    NotElf {
        /// The kernel file.
        path: PathBuf,
        /// What the ELF parser refused.
        #[source]
        source: goblin::error::Error,
    },
    /// The file is ELF, but not an x86-64 executable the 64-bit boot
    /// protocol can enter.
    #[error(
        "{path} is not a 64-bit x86 executable (class {class}, machine {machine}, type {kind})"
    )]
    WrongKind {
        /// The kernel file.
        path: PathBuf,
        /// `e_ident[EI_CLASS]` (2 is ELFCLASS64).
        class: u8,
        /// `e_machine` (62 is EM_X86_64).
        machine: u16,
        /// `e_type` (2 is ET_EXEC).
        kind: u16,
    },
    /// A PT_LOAD segment's file bytes run past the end of the file.
    #[error("{path} is truncated: a segment needs bytes up to offset {needed}, the file has {len}")]
    Truncated {
        /// The kernel file.
        path: PathBuf,
        /// The file offset the segment's data ends at.
        needed: u64,
        /// The file's length in bytes.
        len: u64,
    },
    /// A segment's physical range is not all guest RAM.
    #[error(
        "{path}: a segment at {start:#x}+{size:#x} does not fit in guest memory of {mem_size} MiB; give the VM more memory"
    )]
    OutsideMemory {
        /// The kernel file.
        path: PathBuf,
        /// The segment's guest-physical start (`p_paddr`).
        start: u64,
        /// The segment's size in memory (`p_memsz`).
        size: u64,
        /// The guest's memory, in MiB.
        mem_size: u64,
    },
    /// A segment would land on the zero page, page tables or MP table the
    /// VMM places below 1 MiB.
    #[error(
        "{path}: a segment at {start:#x} would overwrite the boot structures below {HIMEM_START:#x}"
    )]
    LowSegment {
        /// The kernel file.
        path: PathBuf,
        /// The segment's guest-physical start (`p_paddr`).
        start: u64,
    },
    /// The ELF has no PT_LOAD segment, so there is nothing to run.
    #[error("{path} has no loadable segments")]
    NoSegments {
        /// The kernel file.
        path: PathBuf,
    },
}

/// Loads `path` into `mem`; returns the kernel's 64-bit entry point.
pub fn load_kernel(mem: &GuestMemoryMmap, path: &Path) -> Result<u64, LoaderError> {
    let bytes = fs::read(path).map_err(|source| LoaderError::Read {
        path: path.into(),
        source,
    })?;
    load_elf(mem, &bytes, path)
}

fn load_elf(mem: &GuestMemoryMmap, bytes: &[u8], path: &Path) -> Result<u64, LoaderError> {
    let path_buf = || path.to_path_buf();
    let elf = Elf::parse(bytes).map_err(|source| LoaderError::NotElf {
        path: path_buf(),
        source,
    })?;
    let class = elf.header.e_ident[header::EI_CLASS];
    if class != header::ELFCLASS64
        || elf.header.e_machine != header::EM_X86_64
        || elf.header.e_type != header::ET_EXEC
    {
        return Err(LoaderError::WrongKind {
            path: path_buf(),
            class,
            machine: elf.header.e_machine,
            kind: elf.header.e_type,
        });
    }
    let mem_size: u64 = mem.iter().map(|region| region.len()).sum();
    let mut loaded = 0;
    for segment in elf.program_headers.iter().filter(|ph| ph.p_type == PT_LOAD) {
        let data_end = segment.p_offset.saturating_add(segment.p_filesz);
        if data_end > bytes.len() as u64 {
            return Err(LoaderError::Truncated {
                path: path_buf(),
                needed: data_end,
                len: bytes.len() as u64,
            });
        }
        let start = segment.p_paddr;
        if start < HIMEM_START {
            return Err(LoaderError::LowSegment {
                path: path_buf(),
                start,
            });
        }
        let outside = || LoaderError::OutsideMemory {
            path: path_buf(),
            start,
            size: segment.p_memsz,
            mem_size: mem_size >> 20,
        };
        let last = start
            .checked_add(segment.p_memsz.max(1) - 1)
            .ok_or_else(outside)?;
        if !mem.address_in_range(GuestAddress(last)) {
            return Err(outside());
        }
        let data = &bytes[segment.p_offset as usize..data_end as usize];
        // The rest of p_memsz (.bss) is already zero: guest memory starts zeroed.
        mem.write_slice(data, GuestAddress(start))
            .map_err(|_| outside())?;
        loaded += 1;
    }
    if loaded == 0 {
        return Err(LoaderError::NoSegments { path: path_buf() });
    }
    Ok(elf.entry)
}

#[cfg(test)]
mod tests {
    use super::*;

    const LOAD_ADDR: u64 = 0x100_0000;

    /// A minimal ELF64 x86_64 executable with one PT_LOAD of `payload` at
    /// LOAD_ADDR and entry LOAD_ADDR.
    fn tiny_elf(payload: &[u8]) -> Vec<u8> {
        let mut elf = vec![0u8; 64 + 56];
        elf[..4].copy_from_slice(b"\x7fELF");
        (elf[4], elf[5], elf[6]) = (2, 1, 1); // 64-bit, little endian, version 1
        elf[16..18].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
        elf[18..20].copy_from_slice(&62u16.to_le_bytes()); // EM_X86_64
        elf[20..24].copy_from_slice(&1u32.to_le_bytes());
        elf[24..32].copy_from_slice(&LOAD_ADDR.to_le_bytes()); // e_entry
        elf[32..40].copy_from_slice(&64u64.to_le_bytes()); // e_phoff
        elf[52..54].copy_from_slice(&64u16.to_le_bytes()); // e_ehsize
        elf[54..56].copy_from_slice(&56u16.to_le_bytes()); // e_phentsize
        elf[56..58].copy_from_slice(&1u16.to_le_bytes()); // e_phnum
        let ph = &mut elf[64..];
        ph[..4].copy_from_slice(&1u32.to_le_bytes()); // PT_LOAD
        ph[8..16].copy_from_slice(&120u64.to_le_bytes()); // p_offset
        ph[16..24].copy_from_slice(&LOAD_ADDR.to_le_bytes()); // p_vaddr
        ph[24..32].copy_from_slice(&LOAD_ADDR.to_le_bytes()); // p_paddr
        ph[32..40].copy_from_slice(&(payload.len() as u64).to_le_bytes()); // p_filesz
        ph[40..48].copy_from_slice(&(payload.len() as u64 + 16).to_le_bytes()); // p_memsz
        elf.extend_from_slice(payload);
        elf
    }

    fn memory(mib: usize) -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), mib << 20)]).unwrap()
    }

    #[test]
    fn loads_segments_at_their_physical_address() {
        let mem = memory(32);
        let entry = load_elf(&mem, &tiny_elf(b"kernel!"), Path::new("k")).unwrap();
        assert_eq!(entry, LOAD_ADDR);
        let mut back = [0u8; 7];
        mem.read_slice(&mut back, GuestAddress(LOAD_ADDR)).unwrap();
        assert_eq!(&back, b"kernel!");
    }

    #[test]
    fn refuses_bad_kernels_with_the_reason() {
        let mem = memory(32);
        let path = Path::new("vmlinux");
        let err = |bytes: &[u8]| load_elf(&mem, bytes, path).unwrap_err();
        assert!(matches!(
            err(b"MZ not an elf at all"),
            LoaderError::NotElf { .. }
        ));
        let mut wrong_arch = tiny_elf(b"x");
        wrong_arch[18] = 183; // EM_AARCH64
        assert!(matches!(
            err(&wrong_arch),
            LoaderError::WrongKind { machine: 183, .. }
        ));
        let whole = tiny_elf(b"0123456789");
        assert!(matches!(
            err(&whole[..whole.len() - 3]),
            LoaderError::Truncated { .. }
        ));
        assert!(matches!(
            load_elf(&memory(8), &whole, path),
            Err(LoaderError::OutsideMemory { .. })
        ));
        assert!(err(&wrong_arch).to_string().contains("vmlinux"));
    }

    /// Needs the guest kernel, which `cargo xtask test` builds first and
    /// names in `KILN_KERNEL` when it runs the ignored tests.
    #[test]
    #[ignore = "needs the guest kernel in KILN_KERNEL (cargo xtask test runs it)"]
    fn loads_the_real_guest_kernel() {
        let path = PathBuf::from(
            std::env::var_os("KILN_KERNEL").expect("KILN_KERNEL names the guest kernel"),
        );
        let entry = load_kernel(&memory(64), &path).unwrap();
        assert_eq!(entry, LOAD_ADDR, "the microVM kernel enters at 16 MiB");
        assert!(matches!(
            load_kernel(&memory(8), &path),
            Err(LoaderError::OutsideMemory { .. })
        ));
    }
}
