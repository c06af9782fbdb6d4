//! A restore's memory working set (REAP, Ustiugov et al., ASPLOS '21):
//! the pages of a snapshot's memory file that a restored guest touched
//! while it served its first request, kept in the snapshot's directory
//! ([`WORKING_SET_FILE`]). A later restore of the snapshot maps them
//! ahead ([`crate::vstate::memory::prefetch`]), so that the guest's first
//! touch of each finds it in the VMM's page tables instead of taking a
//! host page fault inside its own (a nested one, under nested
//! virtualization).
//!
//! Who records it is up to the restorer (a function's first clone:
//! `kiln_control::functions`); this module only keeps the record.
//!
//! ```text
//! offset 0   header (24 bytes, little endian)
//!              0  magic       b"KILNMWS\0"
//!              8  version     u32 = 1
//!             12  reserved    u32 = 0
//!             16  page_count  u64, pages of the memory file
//! offset 24  a bitmap of page_count bits, ceil(page_count / 8) bytes:
//!            bit i of byte i / 8 (least significant first) is page i
//! ```
//!
//! The file is written whole or not at all (temp file, fsync, rename:
//! [`crate::durable`]). A record whose page count is not the memory
//! file's is refused: it is of another snapshot.
use std::io;
use std::ops::Range;
use std::path::{Path, PathBuf};

use crate::durable;

/// The record, in a snapshot's directory.
pub const WORKING_SET_FILE: &str = "memory.ws";
const MAGIC: [u8; 8] = *b"KILNMWS\0";
const VERSION: u32 = 1;
const HEADER_LEN: usize = 24;

/// What can go wrong with a memory working-set record. Each names the file.
#[derive(Debug, thiserror::Error)]
pub enum WorkingSetError {
    /// Reading or writing the record failed.
    #[error("cannot read or write the memory working set {path}")]
    Io {
        /// The record.
        path: PathBuf,
        /// What the system said.
        #[source]
        source: io::Error,
    },
    /// The file does not start with the record's magic and version.
    #[error("{path} is not a version {VERSION} memory working set")]
    NotARecord {
        /// The file.
        path: PathBuf,
    },
    /// The record is of a memory file of another size, or its bitmap is
    /// not as long as its page count says.
    #[error("{path}: a record of {found} pages in {len} bytes, expected {expected} pages")]
    Size {
        /// The record.
        path: PathBuf,
        /// The page count its header holds.
        found: u64,
        /// The file's length.
        len: usize,
        /// The memory file's pages.
        expected: u64,
    },
}

/// Pages of one memory file, each touched or not.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WorkingSet {
    bitmap: Vec<u8>,
    page_count: u64,
}

impl WorkingSet {
    /// No page of a memory file of `page_count` pages.
    pub fn new(page_count: u64) -> Self {
        WorkingSet {
            bitmap: vec![0; page_count.div_ceil(8) as usize],
            page_count,
        }
    }

    /// Adds `page` (ignored past the file's end).
    pub fn insert(&mut self, page: u64) {
        if page < self.page_count {
            self.bitmap[(page / 8) as usize] |= 1 << (page % 8);
        }
    }

    fn contains(&self, page: u64) -> bool {
        self.bitmap[(page / 8) as usize] & (1 << (page % 8)) != 0
    }

    /// The maximal runs of pages in the set, in order.
    pub fn runs(&self) -> impl Iterator<Item = Range<u64>> + '_ {
        let mut page = 0;
        std::iter::from_fn(move || {
            let start = (page..self.page_count).find(|&p| self.contains(p))?;
            let end = (start..self.page_count)
                .find(|&p| !self.contains(p))
                .unwrap_or(self.page_count);
            page = end;
            Some(start..end)
        })
    }

    fn encode(&self) -> Vec<u8> {
        let mut bytes = Vec::with_capacity(HEADER_LEN + self.bitmap.len());
        bytes.extend(MAGIC);
        bytes.extend(VERSION.to_le_bytes());
        bytes.extend(0u32.to_le_bytes());
        bytes.extend(self.page_count.to_le_bytes());
        bytes.extend(&self.bitmap);
        bytes
    }

    fn decode(path: &Path, bytes: &[u8], expected: u64) -> Result<Self, WorkingSetError> {
        let path = || path.to_path_buf();
        if bytes.len() < HEADER_LEN || bytes[..8] != MAGIC || bytes[8..12] != VERSION.to_le_bytes()
        {
            return Err(WorkingSetError::NotARecord { path: path() });
        }
        let found = u64::from_le_bytes(bytes[16..24].try_into().expect("8 bytes"));
        let bitmap = &bytes[HEADER_LEN..];
        if found != expected || bitmap.len() as u64 != found.div_ceil(8) {
            return Err(WorkingSetError::Size {
                path: path(),
                found,
                len: bytes.len(),
                expected,
            });
        }
        Ok(WorkingSet {
            bitmap: bitmap.to_vec(),
            page_count: found,
        })
    }

    /// The record at `path` of a memory file of `page_count` pages;
    /// `None` when there is none.
    pub fn read(path: &Path, page_count: u64) -> Result<Option<Self>, WorkingSetError> {
        match std::fs::read(path) {
            Ok(bytes) => Self::decode(path, &bytes, page_count).map(Some),
            Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(WorkingSetError::Io {
                path: path.to_path_buf(),
                source,
            }),
        }
    }

    /// Writes the record at `path`, durably: whole or not at all.
    pub fn write(&self, path: &Path) -> Result<(), WorkingSetError> {
        let io_err = |source| WorkingSetError::Io {
            path: path.to_path_buf(),
            source,
        };
        durable::write(path, &self.encode()).map_err(io_err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(page_count: u64, pages: &[u64]) -> WorkingSet {
        let mut set = WorkingSet::new(page_count);
        for &page in pages {
            set.insert(page);
        }
        set
    }

    #[test]
    fn runs_are_the_maximal_runs_of_pages_in_order() {
        let set = set(20, &[0, 1, 2, 7, 9, 10, 19, 25]);
        assert_eq!(set.runs().collect::<Vec<_>>(), [0..3, 7..8, 9..11, 19..20]);
        let pages: u64 = set.runs().map(|run| run.end - run.start).sum();
        assert_eq!(pages, 7, "page 25 is past the end");
        assert!(WorkingSet::new(9).runs().next().is_none());
        assert!(WorkingSet::new(9).bitmap.iter().all(|&byte| byte == 0));
    }

    #[test]
    fn a_record_reads_back_as_written() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(WORKING_SET_FILE);
        assert_eq!(WorkingSet::read(&path, 13).unwrap(), None);
        let written = set(13, &[3, 4, 12]);
        written.write(&path).unwrap();
        assert_eq!(WorkingSet::read(&path, 13).unwrap(), Some(written));
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 24 + 2);
    }

    #[test]
    fn a_record_of_another_size_or_not_a_record_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(WORKING_SET_FILE);
        set(16, &[1]).write(&path).unwrap();
        let err = WorkingSet::read(&path, 32).unwrap_err().to_string();
        assert_eq!(
            err,
            format!(
                "{}: a record of 16 pages in 26 bytes, expected 32 pages",
                path.display()
            )
        );
        let mut bytes = std::fs::read(&path).unwrap();
        bytes.pop();
        std::fs::write(&path, &bytes).unwrap();
        let err = WorkingSet::read(&path, 16).unwrap_err();
        assert!(
            matches!(err, WorkingSetError::Size { len: 25, .. }),
            "{err}"
        );
        std::fs::write(&path, b"KILNWS\0\0 not this record").unwrap();
        let err = WorkingSet::read(&path, 16).unwrap_err();
        assert!(matches!(err, WorkingSetError::NotARecord { .. }), "{err}");
    }
}
