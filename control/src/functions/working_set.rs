//! Which pages of the template's memory a clone touched: the record a
//! template's later clones map ahead at restore (REAP, Ustiugov et al.,
//! ASPLOS '21; the record and its use: `kiln_vmm::snapshot::working_set`).
//!
//! A clone's guest memory is a private mapping of the template's memory
//! file, so a page the guest has touched is one its VM process has in its
//! page tables: a page-cache page if the guest only read it, its own copy
//! if it wrote it. This reads that off `/proc/PID/pagemap` from outside,
//! after the clone's first event: the VM process (jailed, under seccomp)
//! is neither asked nor changed. Reading another process's pagemap needs
//! the right to trace it, which the invoking user has over its own
//! clones (root over jailed ones); the page frame numbers, which need
//! more, are not used.
//!
//! The record is a superset: a read fault also maps the page-cache pages
//! around it that are there already (the kernel's fault-around), and a
//! page-cache page may have been read ahead. Mapping a few more pages
//! ahead costs little; the record is only ever a hint.
use std::fs::{self, File};
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;

use kiln_vmm::snapshot::working_set::WorkingSet;
use kiln_vmm::vstate::memory::PAGE_SIZE;

/// `/proc/PID/pagemap`: one little-endian u64 per virtual page
/// (Documentation/admin-guide/mm/pagemap.rst).
const PAGEMAP_ENTRY: u64 = 8;
/// Bit 63 of an entry: the page is present in RAM.
const PAGEMAP_PRESENT: u64 = 1 << 63;
/// Bit 62 of an entry: the page is swapped out (touched all the same).
const PAGEMAP_SWAPPED: u64 = 1 << 62;
/// The memory file's pages, and the pagemap's: the host's base page.
const PAGE: u64 = PAGE_SIZE as u64;

/// One mapping of `/proc/PID/maps`: its addresses and the offset in its
/// file where it starts.
#[derive(Debug, PartialEq, Eq)]
struct FileMapping {
    start: u64,
    end: u64,
    offset: u64,
}

/// The pages of `memory` (a template's memory file) that process `pid`
/// has mapped: the working set of the clone whose VM process it is.
///
/// The VM process is the one a hostile guest attacks first, so what its
/// maps say is bounded here: only the part of a mapping that lies within
/// the file is read, and no more entries in all than the file has pages
/// twice over (a VM process maps each part of the file once), so that a
/// subverted one cannot make this read gigabytes. The worst it can do is
/// a record of every page.
pub fn of_process(pid: u32, memory: &Path) -> io::Result<WorkingSet> {
    let file = fs::metadata(memory)?;
    let maps = fs::read_to_string(format!("/proc/{pid}/maps"))?;
    let pagemap = File::open(format!("/proc/{pid}/pagemap"))?;
    let file_pages = file.len() / PAGE;
    let mut set = WorkingSet::new(file_pages);
    let mut budget = 2 * file_pages;
    for mapping in mappings_of(&maps, (file.dev(), file.ino())) {
        let first = mapping.offset / PAGE;
        let pages = (mapping.end.saturating_sub(mapping.start) / PAGE)
            .min(file_pages.saturating_sub(first))
            .min(budget);
        budget -= pages;
        let mut entries = vec![0u8; (pages * PAGEMAP_ENTRY) as usize];
        pagemap.read_exact_at(&mut entries, mapping.start / PAGE * PAGEMAP_ENTRY)?;
        let touched = entries
            .chunks_exact(PAGEMAP_ENTRY as usize)
            .map(|entry| u64::from_le_bytes(entry.try_into().expect("8 bytes")))
            .enumerate()
            .filter(|(_, entry)| entry & (PAGEMAP_PRESENT | PAGEMAP_SWAPPED) != 0);
        for (index, _) in touched {
            set.insert(first + index as u64);
        }
    }
    Ok(set)
}

/// The mappings in `maps` (the text of `/proc/PID/maps`) of the file
/// whose device and inode numbers are `file`. The file is matched by
/// number, not by path: in a jail it is mapped under another name.
fn mappings_of(maps: &str, (dev, ino): (u64, u64)) -> Vec<FileMapping> {
    // "start-end perms offset major:minor inode path", numbers in hex but
    // the inode.
    let parse = |line: &str| -> Option<(FileMapping, u64, u64)> {
        let mut fields = line.split_ascii_whitespace();
        let (start, end) = fields.next()?.split_once('-')?;
        let offset = fields.nth(1)?;
        let (major, minor) = fields.next()?.split_once(':')?;
        let inode = fields.next()?.parse().ok()?;
        let hex = |text| u64::from_str_radix(text, 16).ok();
        let mapping = FileMapping {
            start: hex(start)?,
            end: hex(end)?,
            offset: hex(offset)?,
        };
        let device = libc::makedev(hex(major)? as u32, hex(minor)? as u32);
        Some((mapping, device, inode))
    };
    maps.lines()
        .filter_map(parse)
        .filter(|&(_, device, inode)| (device, inode) == (dev, ino))
        .map(|(mapping, _, _)| mapping)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    /// A private mapping of `len` bytes of `file` from `offset`, as a VM
    /// process maps its memory file; the caller unmaps it.
    fn map_private(file: &File, len: usize, prot: libc::c_int, offset: u64) -> *mut u8 {
        // SAFETY: a fresh mapping of an open file, at an address the
        // kernel picks; it aliases nothing, and the caller unmaps it.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                prot,
                libc::MAP_PRIVATE,
                std::os::fd::AsRawFd::as_raw_fd(file),
                offset as libc::off_t,
            )
        };
        assert_ne!(addr, libc::MAP_FAILED);
        addr.cast()
    }

    #[test]
    fn mappings_are_found_by_device_and_inode() {
        let maps = "\
7f0000000000-7f0000400000 rw-p 00000000 fd:01 1234 /jail/snapshot/memory\n\
7f0000400000-7f0000500000 rw-p 00000000 00:00 0 \n\
7f1000000000-7f1000100000 rw-p 00200000 fd:01 1234 /jail/snapshot/memory\n\
7f2000000000-7f2000001000 r--p 00000000 fd:01 1235 /other\n\
not a line\n";
        let found = mappings_of(maps, (libc::makedev(0xfd, 1), 1234));
        assert_eq!(
            found,
            [
                FileMapping {
                    start: 0x7f00_0000_0000,
                    end: 0x7f00_0040_0000,
                    offset: 0
                },
                FileMapping {
                    start: 0x7f10_0000_0000,
                    end: 0x7f10_0010_0000,
                    offset: 0x20_0000
                },
            ]
        );
    }

    /// A mapping may run past its file's end (touching that part would
    /// fault): only the file's pages are recorded, and reading it is no
    /// error.
    #[test]
    fn a_mapping_longer_than_its_file_is_read_to_the_files_end() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("memory");
        let file = File::create(&path).unwrap();
        file.set_len(4 * PAGE).unwrap();
        let file = File::open(&path).unwrap();
        // Longer than the file: allowed, only its first pages are touched.
        let len = 1 << 30;
        let addr = map_private(&file, len, libc::PROT_READ, 0);
        // SAFETY: page 2 lies inside the file and the readable mapping.
        let byte = unsafe { addr.wrapping_add(2 * PAGE as usize).read_volatile() };
        let set = of_process(std::process::id(), &path);
        // SAFETY: the mapping made above, no longer used.
        assert_eq!(unsafe { libc::munmap(addr.cast(), len) }, 0);
        assert_eq!(byte, 0);
        // Page 2, and maybe its neighbours (read ahead, then mapped by
        // fault-around), but nothing past the file's 4 pages.
        let runs: Vec<_> = set.unwrap().runs().collect();
        assert!(runs.iter().any(|run| run.contains(&2)), "{runs:?}");
        assert!(runs.iter().all(|run| run.end <= 4), "{runs:?}");
    }

    /// This process maps a file privately, as a VM process maps a memory
    /// file, touches some of its pages (reads one, writes another) and
    /// finds exactly those, at their file offsets.
    #[test]
    fn the_pages_a_process_touched_are_its_working_set() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("memory");
        let file = File::create(&path).unwrap();
        file.set_len(64 * PAGE).unwrap();
        file.write_all_at(&[1; PAGE as usize], 40 * PAGE).unwrap();
        let file = File::open(&path).unwrap();
        // From page 32 on.
        let len = 32 * PAGE as usize;
        let base = map_private(&file, len, libc::PROT_READ | libc::PROT_WRITE, 32 * PAGE);
        // Only page 40 is in the page cache (written above), so the read
        // fault maps no neighbours around it (fault-around maps only
        // cached pages), and a write fault copies just its page.
        let (read, written) = (8 * PAGE as usize, 20 * PAGE as usize);
        // SAFETY: the offset is inside the mapping, which is readable;
        // volatile, so that the access happens.
        let byte = unsafe { base.wrapping_add(read).read_volatile() };
        assert_eq!(byte, 1);
        // SAFETY: the offset is inside the mapping, which is writable.
        unsafe { base.wrapping_add(written).write_volatile(7) };
        let set = of_process(std::process::id(), &path).unwrap();
        // SAFETY: the mapping made above, no longer used.
        assert_eq!(unsafe { libc::munmap(base.cast(), len) }, 0);
        assert_eq!(set.runs().collect::<Vec<_>>(), [40..41, 52..53]);
    }
}
