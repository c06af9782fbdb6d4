//! Guest RAM: anonymous private mappings, split around the 32-bit MMIO gap.
use vm_memory::GuestAddress;

use crate::arch::x86_64::layout::{MMIO_GAP_END, MMIO_GAP_START};
use crate::devices::virtio::GuestMemoryMmap;

/// Errors from creating guest memory.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("cannot map {mib} MiB of guest memory: {source}")]
    Map {
        mib: u32,
        source: vm_memory::mmap::FromRangesError,
    },
}

/// `mib` MiB of zeroed guest RAM: below the MMIO gap, the rest above 4 GiB.
pub fn create(mib: u32) -> Result<GuestMemoryMmap, MemoryError> {
    let size = u64::from(mib) << 20;
    let mut ranges = vec![(GuestAddress(0), size.min(MMIO_GAP_START) as usize)];
    if size > MMIO_GAP_START {
        ranges.push((GuestAddress(MMIO_GAP_END), (size - MMIO_GAP_START) as usize));
    }
    GuestMemoryMmap::from_ranges(&ranges).map_err(|source| MemoryError::Map { mib, source })
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

    #[test]
    fn small_guests_get_one_region_large_ones_skip_the_gap() {
        assert_eq!(create(128).unwrap().num_regions(), 1);
        let large = create(4096).unwrap();
        let regions: Vec<(u64, u64)> = large.iter().map(|r| (r.start_addr().0, r.len())).collect();
        assert_eq!(
            regions,
            [
                (0, MMIO_GAP_START),
                (MMIO_GAP_END, (4u64 << 30) - MMIO_GAP_START)
            ]
        );
    }
}
