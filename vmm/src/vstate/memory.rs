//! Guest RAM: anonymous private mappings, split around the 32-bit MMIO gap.
//!
//! A snapshot keeps guest RAM in a *memory file*: one flat image of the
//! regions in guest-physical order, back to back, so a region starts in the
//! file at the sum of the lengths of the regions before it. With the layout
//! [`create`] makes, that is RAM below the MMIO gap at offset 0 and RAM above
//! 4 GiB right after it; the file's length is the guest's RAM size. All-zero
//! pages are holes, so the file takes the space of the pages the guest used.
use std::fs::File;
use std::io;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use vm_memory::mmap::{FromRangesError, MmapRegionBuilder};
use vm_memory::{FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryRegion, GuestRegionMmap};

use crate::arch::x86_64::layout::{MMIO_GAP_END, MMIO_GAP_START};
use crate::devices::virtio::GuestMemoryMmap;
use crate::snapshot::working_set::WorkingSet;

/// The unit a memory file is saved in: whole zero pages become holes. The
/// x86 base page size (Intel SDM Vol. 3A §4.3), so a guest page is either
/// all saved or a hole.
pub const PAGE_SIZE: usize = 4096;

/// What an all-zero page is compared against (slice equality is a `memcmp`,
/// the fastest scan measured, in debug builds as well as release ones).
static ZERO_PAGE: [u8; PAGE_SIZE] = [0; PAGE_SIZE];

/// Errors from creating, saving or mapping guest memory.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// The anonymous mappings for guest RAM cannot be made.
    #[error("cannot map {mib} MiB of guest memory")]
    Map {
        /// The guest's RAM, in MiB.
        mib: u32,
        /// Why the mapping failed.
        #[source]
        source: FromRangesError,
    },
    /// Sizing, writing or syncing the memory file failed.
    #[error("cannot write guest memory to the memory file")]
    WriteFile {
        /// Why the write failed.
        #[source]
        source: io::Error,
    },
    /// The memory file to restore from cannot be opened or sized.
    #[error("cannot open guest memory file {}", path.display())]
    OpenFile {
        /// The memory file.
        path: PathBuf,
        /// Why it cannot be opened.
        #[source]
        source: io::Error,
    },
    /// The memory file is not exactly the guest's RAM size.
    #[error(
        "guest memory file {} is {found} bytes, expected {expected} for a {mib} MiB guest",
        path.display()
    )]
    FileSize {
        /// The memory file.
        path: PathBuf,
        /// The guest's RAM, in MiB.
        mib: u32,
        /// The guest's RAM, in bytes.
        expected: u64,
        /// The file's length.
        found: u64,
    },
    /// The memory file cannot be mapped copy-on-write as guest RAM.
    #[error("cannot map guest memory file {} as {mib} MiB of guest memory", path.display())]
    MapFile {
        /// The memory file.
        path: PathBuf,
        /// The guest's RAM, in MiB.
        mib: u32,
        /// Why the mapping failed.
        #[source]
        source: FromRangesError,
    },
}

/// What [`save_sparse`] wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MemoryFileStats {
    /// The file's length: the guest's RAM size.
    pub total_bytes: u64,
    /// Bytes of the pages that hold data, the only ones written.
    pub written_bytes: u64,
    /// All-zero pages, left as holes.
    pub skipped_pages: u64,
}

/// `mib` MiB of zeroed guest RAM: below the MMIO gap, the rest above 4 GiB.
pub fn create(mib: u32) -> Result<GuestMemoryMmap, MemoryError> {
    GuestMemoryMmap::from_ranges(&ram_ranges(mib))
        .map_err(|source| MemoryError::Map { mib, source })
}

/// Writes guest RAM (from [`create`] or [`map_private`]) to `file` as a
/// memory file (see the module doc), replacing whatever it held, and syncs it.
///
/// Requirement: nothing writes guest memory until this returns, so the vCPUs
/// are paused and no device touches the queues' buffers. The scan reads RAM
/// as plain bytes, which a concurrent write would make a data race.
///
/// `file` must not be the file `mem` was mapped from by [`map_private`]:
/// emptying it would take the pages the guest has not written from under
/// the mapping. A new snapshot goes to a new file.
pub fn save_sparse(mem: &GuestMemoryMmap, file: &File) -> Result<MemoryFileStats, MemoryError> {
    let write_error = |source| MemoryError::WriteFile { source };
    let total_bytes: u64 = mem.iter().map(|region| region.len()).sum();
    // Truncating first turns every old page into a hole, so pages skipped
    // below read back as zeros even when `file` held an older image.
    file.set_len(0).map_err(write_error)?;
    file.set_len(total_bytes).map_err(write_error)?;
    let mut stats = MemoryFileStats {
        total_bytes,
        ..MemoryFileStats::default()
    };
    let offsets = file_offsets(mem.iter().map(|region| region.len()));
    for (region, file_offset) in mem.iter().zip(offsets) {
        // SAFETY: `as_ptr()` is the start of the region's host mapping, which
        // is `len()` bytes long (one mapping, so at most isize::MAX), readable
        // (regions of `create` and `map_private` are PROT_READ|PROT_WRITE) and
        // stays mapped while `mem` is borrowed, which bounds the slice's
        // lifetime. Any byte value is a valid u8. Nothing writes the memory
        // while the slice lives: that is this function's documented
        // requirement on its caller (vCPUs paused, devices quiet).
        let bytes = unsafe { std::slice::from_raw_parts(region.as_ptr(), region.len() as usize) };
        save_region(bytes, file, file_offset, &mut stats).map_err(write_error)?;
    }
    file.sync_all().map_err(write_error)?;
    Ok(stats)
}

/// `mib` MiB of guest RAM laid out as [`create`] does, each region a
/// copy-on-write private mapping of the memory file at `path`: the guest
/// reads saved pages on demand and its writes never reach the file.
///
/// The file must stay unchanged while the memory lives: pages the guest has
/// not written yet are read from it.
pub fn map_private(path: &Path, mib: u32) -> Result<GuestMemoryMmap, MemoryError> {
    let file = Arc::new(open_memory_file(path, mib)?);
    let map_error = |source| MemoryError::MapFile {
        path: path.to_owned(),
        mib,
        source,
    };
    let ranges = ram_ranges(mib);
    let offsets = file_offsets(ranges.iter().map(|&(_, len)| len as u64));
    let regions = ranges
        .iter()
        .zip(offsets)
        .map(|(&(addr, len), offset)| map_file_region(&file, offset, addr, len))
        .collect::<Result<Vec<_>, _>>()
        .map_err(map_error)?;
    GuestMemoryMmap::from_regions(regions).map_err(|err| map_error(err.into()))
}

/// Maps the pages of `working_set` (pages of the memory file `mem` was
/// mapped from by [`map_private`]) into this process's page tables ahead
/// of the guest, read-only and shared with the page cache
/// (`MADV_POPULATE_READ`, Linux 5.14): the guest's first touch of each
/// then costs KVM no host page fault. Nothing is copied: a page the guest
/// writes is still copied then, and an idle clone shares the pages with
/// every other. Returns the bytes mapped.
pub fn prefetch(mem: &GuestMemoryMmap, working_set: &WorkingSet) -> io::Result<u64> {
    let page = PAGE_SIZE as u64;
    let regions = mem.iter().zip(file_offsets(mem.iter().map(|r| r.len())));
    let runs: Vec<_> = working_set.runs().collect();
    let mut mapped = 0;
    for (region, region_offset) in regions {
        let region_end = region_offset + region.len();
        for run in &runs {
            let (start, end) = (
                (run.start * page).max(region_offset),
                (run.end * page).min(region_end),
            );
            if start >= end {
                continue;
            }
            let addr = region.as_ptr() as usize + (start - region_offset) as usize;
            // SAFETY: [addr, addr + len) lies inside the region's mapping
            // (clamped to it above), which `mem` keeps mapped for the call;
            // MADV_POPULATE_READ only faults pages in, as a read would, and
            // changes no byte of the mapping.
            let rc = unsafe {
                libc::madvise(
                    addr as *mut libc::c_void,
                    (end - start) as usize,
                    libc::MADV_POPULATE_READ,
                )
            };
            if rc != 0 {
                return Err(io::Error::last_os_error());
            }
            mapped += end - start;
        }
    }
    Ok(mapped)
}

/// The guest-physical ranges of `mib` MiB of RAM, in address order: up to
/// the MMIO gap, then the rest from 4 GiB.
fn ram_ranges(mib: u32) -> Vec<(GuestAddress, usize)> {
    let size = u64::from(mib) << 20;
    let mut ranges = vec![(GuestAddress(0), size.min(MMIO_GAP_START) as usize)];
    if size > MMIO_GAP_START {
        ranges.push((GuestAddress(MMIO_GAP_END), (size - MMIO_GAP_START) as usize));
    }
    ranges
}

/// Where regions of these lengths start in a memory file: each right after
/// the one before it.
fn file_offsets(lens: impl Iterator<Item = u64>) -> impl Iterator<Item = u64> {
    lens.scan(0, |next, len| {
        let offset = *next;
        *next += len;
        Some(offset)
    })
}

/// Writes the non-zero pages of one region, one `pwrite` per run of them.
fn save_region(
    bytes: &[u8],
    file: &File,
    file_offset: u64,
    stats: &mut MemoryFileStats,
) -> io::Result<()> {
    let mut written_pages = 0;
    for run in nonzero_runs(bytes) {
        file.write_all_at(&bytes[run.clone()], file_offset + run.start as u64)?;
        stats.written_bytes += run.len() as u64;
        written_pages += run.len().div_ceil(PAGE_SIZE) as u64;
    }
    stats.skipped_pages += bytes.len().div_ceil(PAGE_SIZE) as u64 - written_pages;
    Ok(())
}

/// The byte ranges of the maximal runs of pages in `bytes` that are not all
/// zero, in order: what [`save_sparse`] writes of a region (the rest become
/// holes). A last page shorter than [`PAGE_SIZE`] counts as a page.
///
/// Public for the `zero_scan` benchmark, which measures how fast this scan
/// goes over guest RAM that is almost all zero, the common case of a
/// snapshot (`cargo bench -p kiln-vmm --bench zero_scan`).
pub fn nonzero_runs(bytes: &[u8]) -> impl Iterator<Item = Range<usize>> + '_ {
    let mut pages = bytes.chunks(PAGE_SIZE).enumerate();
    std::iter::from_fn(move || {
        let (first, _) = pages.find(|(_, page)| !is_zero(page))?;
        // `take_while` also consumes the zero page that ends the run, which
        // is right: it belongs to no run.
        let following = pages
            .by_ref()
            .take_while(|(_, page)| !is_zero(page))
            .count();
        let start = first * PAGE_SIZE;
        let end = bytes.len().min(start + (1 + following) * PAGE_SIZE);
        Some(start..end)
    })
}

fn is_zero(page: &[u8]) -> bool {
    page == &ZERO_PAGE[..page.len()]
}

/// Opens a memory file read-only (a private mapping needs no more) and checks
/// that it holds exactly `mib` MiB.
fn open_memory_file(path: &Path, mib: u32) -> Result<File, MemoryError> {
    let open_error = |source| MemoryError::OpenFile {
        path: path.to_owned(),
        source,
    };
    let file = File::open(path).map_err(open_error)?;
    let found = file.metadata().map_err(open_error)?.len();
    let expected = u64::from(mib) << 20;
    if found != expected {
        return Err(MemoryError::FileSize {
            path: path.to_owned(),
            mib,
            expected,
            found,
        });
    }
    Ok(file)
}

/// One region of guest RAM at `addr`, mapped copy-on-write from `file` at
/// `offset`. MAP_NORESERVE as for anonymous guest RAM: pages the guest never
/// writes cost no swap reservation.
fn map_file_region(
    file: &Arc<File>,
    offset: u64,
    addr: GuestAddress,
    len: usize,
) -> Result<GuestRegionMmap, FromRangesError> {
    let region = MmapRegionBuilder::new(len)
        .with_file_offset(FileOffset::from_arc(Arc::clone(file), offset))
        .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
        .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_NORESERVE)
        .build()?;
    GuestRegionMmap::new(region, addr).ok_or(FromRangesError::InvalidGuestRegion)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;
    use vm_memory::Bytes;

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

    /// Guest addresses and the byte written to the page at each: one lone
    /// page, a run of three, and the last page of the region below the gap.
    fn patterns(mib: u32) -> Vec<(u64, u8)> {
        let below_gap_end = (u64::from(mib) << 20).min(MMIO_GAP_START);
        let mut pages = vec![(0, 0x11), (5 << 12, 0x22), (6 << 12, 0x33), (7 << 12, 0x44)];
        pages.push((below_gap_end - PAGE_SIZE as u64, 0x55));
        if u64::from(mib) << 20 > MMIO_GAP_START {
            pages.push((MMIO_GAP_END + (3 << 12), 0x66));
        }
        pages
    }

    fn write_patterns(mem: &GuestMemoryMmap, patterns: &[(u64, u8)]) {
        for &(addr, byte) in patterns {
            // Bytes at both ends of the page, so a scan that stops early or
            // late misses one.
            mem.write_obj(byte, GuestAddress(addr)).unwrap();
            mem.write_obj(byte, GuestAddress(addr + PAGE_SIZE as u64 - 1))
                .unwrap();
        }
    }

    fn page(mem: &GuestMemoryMmap, addr: u64) -> Vec<u8> {
        let mut page = vec![0; PAGE_SIZE];
        mem.read_slice(&mut page, GuestAddress(addr)).unwrap();
        page
    }

    fn saved(mib: u32) -> (GuestMemoryMmap, tempfile::NamedTempFile, MemoryFileStats) {
        let mem = create(mib).unwrap();
        write_patterns(&mem, &patterns(mib));
        let file = tempfile::NamedTempFile::new().unwrap();
        let stats = save_sparse(&mem, file.as_file()).unwrap();
        (mem, file, stats)
    }

    #[test]
    fn save_writes_only_nonzero_pages_in_runs() {
        let (_, file, stats) = saved(64);
        let total_pages = (64 << 20) / PAGE_SIZE as u64;
        assert_eq!(
            stats,
            MemoryFileStats {
                total_bytes: 64 << 20,
                written_bytes: 5 * PAGE_SIZE as u64,
                skipped_pages: total_pages - 5,
            }
        );
        let metadata = file.as_file().metadata().unwrap();
        assert_eq!(metadata.len(), 64 << 20);
        assert!(
            metadata.blocks() * 512 < 1 << 20,
            "{} blocks",
            metadata.blocks()
        );
    }

    #[test]
    fn nonzero_runs_are_maximal_and_cover_a_partial_last_page() {
        let mut bytes = vec![0u8; 6 * PAGE_SIZE + 100];
        for page in [1, 2, 4] {
            bytes[page * PAGE_SIZE + 7] = 1;
        }
        bytes[6 * PAGE_SIZE + 99] = 1;
        let runs: Vec<_> = nonzero_runs(&bytes).collect();
        let page = |n: usize| n * PAGE_SIZE;
        assert_eq!(
            runs,
            [page(1)..page(3), page(4)..page(5), page(6)..bytes.len()]
        );
    }

    #[test]
    fn a_saved_image_maps_back_with_the_same_contents() {
        let (mem, file, _) = saved(64);
        let restored = map_private(file.path(), 64).unwrap();
        let regions: Vec<_> = restored.iter().map(|r| (r.start_addr(), r.len())).collect();
        let created: Vec<_> = mem.iter().map(|r| (r.start_addr(), r.len())).collect();
        assert_eq!(regions, created);
        let mut original = vec![0; 64 << 20];
        let mut copy = vec![0; 64 << 20];
        mem.read_slice(&mut original, GuestAddress(0)).unwrap();
        restored.read_slice(&mut copy, GuestAddress(0)).unwrap();
        assert!(original == copy);
    }

    /// Whether this process has the page at `addr` in its page tables
    /// (`/proc/self/pagemap`, bit 63).
    fn mapped(addr: usize) -> bool {
        use std::os::unix::fs::FileExt;
        let pagemap = File::open("/proc/self/pagemap").unwrap();
        let mut entry = [0u8; 8];
        let at = (addr / PAGE_SIZE * 8) as u64;
        pagemap.read_exact_at(&mut entry, at).unwrap();
        u64::from_le_bytes(entry) & (1 << 63) != 0
    }

    /// The working set's pages are in the page tables before the guest
    /// touches them, with their bytes the file's; pages far from them are
    /// not. (Near ones may be: a read fault also maps the page-cache pages
    /// around it, up to 64 KiB, the kernel's fault-around.)
    #[test]
    fn a_working_set_is_mapped_ahead() {
        let (mem, file, _) = saved(64);
        let restored = map_private(file.path(), 64).unwrap();
        let mut set = WorkingSet::new(64 << 20 >> 12);
        for page in [1, 5, 6, 200] {
            set.insert(page);
        }
        let mapped_bytes = prefetch(&restored, &set).unwrap();
        assert_eq!(mapped_bytes, 4 * PAGE_SIZE as u64);
        let base = restored.iter().next().unwrap().as_ptr() as usize;
        let pages: Vec<_> = [1, 5, 6, 200, 100, 3000]
            .map(|p| mapped(base + p * PAGE_SIZE))
            .to_vec();
        assert_eq!(pages, [true, true, true, true, false, false]);
        let (mut original, mut copy) = (vec![0; 8 * PAGE_SIZE], vec![0; 8 * PAGE_SIZE]);
        mem.read_slice(&mut original, GuestAddress(0)).unwrap();
        restored.read_slice(&mut copy, GuestAddress(0)).unwrap();
        assert!(original == copy);
    }

    #[test]
    fn guest_writes_to_mapped_memory_never_reach_the_file() {
        let (_, file, _) = saved(64);
        let before = std::fs::read(file.path()).unwrap();
        let restored = map_private(file.path(), 64).unwrap();
        restored.write_obj(0xffu8, GuestAddress(5 << 12)).unwrap();
        restored.write_obj(0xffu8, GuestAddress(9 << 12)).unwrap();
        assert_eq!(
            restored.read_obj::<u8>(GuestAddress(5 << 12)).unwrap(),
            0xff
        );
        drop(restored);
        assert!(std::fs::read(file.path()).unwrap() == before);
    }

    #[test]
    fn saving_over_an_older_image_leaves_no_stale_pages() {
        let (_, file, _) = saved(64);
        save_sparse(&create(64).unwrap(), file.as_file()).unwrap();
        let restored = map_private(file.path(), 64).unwrap();
        assert_eq!(page(&restored, 5 << 12), vec![0; PAGE_SIZE]);
    }

    #[test]
    fn a_guest_above_4_gib_saves_sparsely_and_maps_back() {
        let mib = 4096 + 64;
        let (mem, file, stats) = saved(mib);
        assert_eq!(stats.total_bytes, u64::from(mib) << 20);
        assert_eq!(stats.written_bytes, 6 * PAGE_SIZE as u64);
        let metadata = file.as_file().metadata().unwrap();
        assert!(
            metadata.blocks() * 512 < 1 << 20,
            "{} blocks",
            metadata.blocks()
        );
        let restored = map_private(file.path(), mib).unwrap();
        assert_eq!(restored.num_regions(), 2);
        // Reading all of it would fill the page cache with the holes; the
        // pattern pages and their zero neighbours show the layout is right.
        for (addr, _) in patterns(mib) {
            for addr in [
                addr.saturating_sub(PAGE_SIZE as u64),
                addr,
                addr + PAGE_SIZE as u64,
            ] {
                if restored.address_in_range(GuestAddress(addr)) {
                    assert_eq!(page(&restored, addr), page(&mem, addr), "page at {addr:#x}");
                }
            }
        }
    }

    #[test]
    fn a_file_of_the_wrong_size_is_refused() {
        let file = tempfile::NamedTempFile::new().unwrap();
        file.as_file().set_len(32 << 20).unwrap();
        let err = map_private(file.path(), 64).unwrap_err();
        assert!(matches!(
            err,
            MemoryError::FileSize { expected, found, .. } if expected == 64 << 20 && found == 32 << 20
        ));
        let message = err.to_string();
        assert!(
            message.contains(&file.path().display().to_string()),
            "{message}"
        );
        assert!(
            message.contains("33554432 bytes, expected 67108864"),
            "{message}"
        );
    }

    #[test]
    fn a_missing_file_is_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("memory");
        let err = map_private(&path, 64).unwrap_err();
        assert!(matches!(err, MemoryError::OpenFile { .. }));
        assert!(err.to_string().contains(&path.display().to_string()));
    }

    /// A guest's worth of zeros is scanned to its very end: a lone byte in
    /// the last page of 128 MiB is found, and nothing else. (How fast this
    /// goes is the `zero_scan` benchmark's business.)
    #[test]
    fn a_lone_byte_at_the_end_of_128_mib_is_its_only_run() {
        let mut bytes = vec![0u8; 128 << 20];
        *bytes.last_mut().unwrap() = 1;
        let runs: Vec<_> = nonzero_runs(&bytes).collect();
        assert_eq!(runs, vec![bytes.len() - PAGE_SIZE..bytes.len()]);
    }
}
