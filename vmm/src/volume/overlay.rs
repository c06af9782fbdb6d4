//! A volume's writable layer: a sparse file of fixed-size blocks and a
//! persistent allocation bitmap saying which blocks it holds.
//!
//! ```text
//! offset 0              header (one block, little endian, written once)
//!                         0  magic         b"KILNOVL\0"
//!                         8  version       u32 = 1
//!                        12  block_size    u32 = 4096
//!                        16  capacity      u64, bytes of the volume
//!                        24  base_id       32 bytes, the base image's content id
//!                        56  bitmap_offset u64 = block_size
//!                        64  data_offset   u64, block-aligned, after the bitmap
//! bitmap_offset         one bit per block, bit (n % 8) of byte n / 8 set
//!                       when the overlay holds block n
//! data_offset + n * bs  block n (a hole until written: the file is sparse)
//! ```
//!
//! Crash safety follows the block-device contract: a write is durable only
//! once a flush has completed. A flush first makes the data durable
//! (fdatasync), then writes the bitmap bytes that changed and makes them
//! durable too, so a bit on disk never claims a block whose data might
//! not be there. A crash before a flush loses the writes since the last
//! one: their bits are not on disk, and reads fall back to what the block
//! held at that flush.
use std::collections::BTreeSet;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::{durable, flock};

/// The first bytes of every overlay file.
const MAGIC: [u8; 8] = *b"KILNOVL\0";
/// The format version this code reads and writes.
const VERSION: u32 = 1;
/// The unit of allocation: the guest's page and ext4's block size, so one
/// filesystem block never straddles two overlay blocks.
pub const BLOCK_SIZE: u64 = 4096;
/// Bitmap bytes written back together: a dirty bit costs one such page.
const BITMAP_PAGE: usize = 4096;

/// What can go wrong with an overlay file. Each names the file.
#[derive(Debug, thiserror::Error)]
pub enum OverlayError {
    /// Creating, locking, reading, writing or syncing the file failed.
    #[error("cannot read or write the overlay {path}")]
    Io {
        /// The overlay file.
        path: PathBuf,
        /// Why the file operation failed.
        #[source]
        source: io::Error,
    },
    /// The file is too short for a header or does not start with the
    /// overlay magic.
    #[error("{path} is not a Kiln overlay (bad magic)")]
    BadMagic {
        /// The file.
        path: PathBuf,
    },
    /// The header's format version is not the one this code reads.
    #[error("{path}: overlay format version {found}, this Kiln reads version {VERSION}")]
    Version {
        /// The overlay file.
        path: PathBuf,
        /// The version in its header.
        found: u32,
    },
    /// The header's layout fields disagree with each other or with the
    /// file's length.
    #[error("{path}: corrupt overlay header: {what}")]
    Header {
        /// The overlay file.
        path: PathBuf,
        /// Which fields disagree, and their values.
        what: String,
    },
    /// Another open file holds the overlay's lock: two writers would
    /// corrupt it.
    #[error("{path} is in use by another Kiln process (is the instance running?)")]
    InUse {
        /// The overlay file.
        path: PathBuf,
    },
    /// The overlay records another base image's content id: its blocks
    /// are differences from that image, meaningless on this one.
    #[error(
        "{path} was made on top of another image (base {found}), not this one ({expected}): refusing to mix them"
    )]
    WrongBase {
        /// The overlay file.
        path: PathBuf,
        /// The opened image's content id, in hex.
        expected: String,
        /// The content id in the overlay's header, in hex.
        found: String,
    },
}

/// The writable layer of one volume.
#[derive(Debug)]
pub struct Overlay {
    path: PathBuf,
    file: File,
    capacity: u64,
    data_offset: u64,
    bitmap_offset: u64,
    /// The allocation bitmap as the volume sees it now.
    bitmap: Vec<u8>,
    /// Bitmap pages changed since the last flush.
    dirty_pages: BTreeSet<usize>,
    /// Cleared only by tests that play a crash.
    flush_on_drop: bool,
}

/// The fixed fields of the header.
struct Header {
    capacity: u64,
    base_id: [u8; 32],
    data_offset: u64,
}

impl Header {
    const LEN: usize = 72;

    fn encode(&self) -> Vec<u8> {
        let mut bytes = Vec::with_capacity(BLOCK_SIZE as usize);
        bytes.extend(MAGIC);
        bytes.extend(VERSION.to_le_bytes());
        bytes.extend((BLOCK_SIZE as u32).to_le_bytes());
        bytes.extend(self.capacity.to_le_bytes());
        bytes.extend(self.base_id);
        bytes.extend(BLOCK_SIZE.to_le_bytes());
        bytes.extend(self.data_offset.to_le_bytes());
        bytes.resize(BLOCK_SIZE as usize, 0);
        bytes
    }
}

/// Bytes of bitmap for a volume of `capacity` bytes.
fn bitmap_len(capacity: u64) -> usize {
    capacity.div_ceil(BLOCK_SIZE).div_ceil(8) as usize
}

/// Where block data starts: the first block boundary after the bitmap.
fn data_offset(capacity: u64) -> u64 {
    BLOCK_SIZE + (bitmap_len(capacity) as u64).next_multiple_of(BLOCK_SIZE)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl Overlay {
    /// Creates an empty overlay at `path` for a volume of `capacity` bytes
    /// on the base image `base_id`. The file appears whole or not at all:
    /// it is written under a temporary name, synced and renamed.
    pub fn create(path: &Path, capacity: u64, base_id: [u8; 32]) -> Result<Self, OverlayError> {
        let io_err = |source| OverlayError::Io {
            path: path.to_path_buf(),
            source,
        };
        let staged = durable::stage(path).map_err(io_err)?;
        let header = Header {
            capacity,
            base_id,
            data_offset: data_offset(capacity),
        };
        let file = staged.as_file();
        file.write_all_at(&header.encode(), 0).map_err(io_err)?;
        // Sized once, sparse: unwritten blocks and bitmap bytes are holes.
        file.set_len(header.data_offset + capacity.next_multiple_of(BLOCK_SIZE))
            .map_err(io_err)?;
        durable::persist(staged, path).map_err(io_err)?;
        Self::open(path, base_id)
    }

    /// Opens the overlay at `path`, which must have been made on the base
    /// image `base_id`, and holds it: one process at a time uses an overlay
    /// (the lock goes with the file descriptor).
    pub fn open(path: &Path, base_id: [u8; 32]) -> Result<Self, OverlayError> {
        let io_err = |source| OverlayError::Io {
            path: path.to_path_buf(),
            source,
        };
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(io_err)?;
        if !flock::lock_exclusive(&file, false).map_err(io_err)? {
            return Err(OverlayError::InUse {
                path: path.to_path_buf(),
            });
        }
        let header = read_header(&file, path)?;
        if header.base_id != base_id {
            return Err(OverlayError::WrongBase {
                path: path.to_path_buf(),
                expected: hex(&base_id),
                found: hex(&header.base_id),
            });
        }
        let mut bitmap = vec![0u8; bitmap_len(header.capacity)];
        file.read_exact_at(&mut bitmap, BLOCK_SIZE)
            .map_err(io_err)?;
        Ok(Overlay {
            path: path.to_path_buf(),
            file,
            capacity: header.capacity,
            data_offset: header.data_offset,
            bitmap_offset: BLOCK_SIZE,
            bitmap,
            dirty_pages: BTreeSet::new(),
            flush_on_drop: true,
        })
    }

    /// The volume's size in bytes.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// The open overlay file (header, bitmap and blocks).
    pub fn file(&self) -> &File {
        &self.file
    }

    /// The overlay file's path, for error messages.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether the overlay holds block `n`.
    pub fn holds(&self, n: u64) -> bool {
        self.bitmap[(n / 8) as usize] & (1 << (n % 8)) != 0
    }

    fn set(&mut self, n: u64, held: bool) {
        let byte = (n / 8) as usize;
        let bit = 1 << (n % 8);
        let old = self.bitmap[byte];
        self.bitmap[byte] = if held { old | bit } else { old & !bit };
        if self.bitmap[byte] != old {
            self.dirty_pages.insert(byte / BITMAP_PAGE);
        }
    }

    /// Where the `len` bytes at `offset` into the volume are in the
    /// overlay's file; the caller knows the blocks are held.
    pub fn piece(&self, offset: u64, len: usize) -> super::Piece<'_> {
        super::Piece::File {
            path: &self.path,
            file: &self.file,
            offset: self.data_offset + offset,
            len,
        }
    }

    /// Writes whole blocks starting at block `first` and marks them held.
    pub fn write_blocks(&mut self, first: u64, data: &[u8]) -> Result<(), OverlayError> {
        debug_assert_eq!(data.len() as u64 % BLOCK_SIZE, 0);
        self.write_in_held(first * BLOCK_SIZE, data)?;
        for n in first..first + data.len() as u64 / BLOCK_SIZE {
            self.set(n, true);
        }
        Ok(())
    }

    /// Writes bytes at `offset` into blocks the overlay already holds.
    pub fn write_in_held(&mut self, offset: u64, data: &[u8]) -> Result<(), OverlayError> {
        self.file
            .write_all_at(data, self.data_offset + offset)
            .map_err(|source| self.io_err(source))
    }

    /// Gives `count` blocks from block `first` back: the volume reads them
    /// from its base again, and the file's space for them is freed.
    pub fn release(&mut self, first: u64, count: u64) -> Result<(), OverlayError> {
        for n in first..first + count {
            self.set(n, false);
        }
        let (offset, len) = (self.data_offset + first * BLOCK_SIZE, count * BLOCK_SIZE);
        // SAFETY: fallocate only reads its integer arguments; the descriptor
        // is open for the lifetime of `self.file`.
        let punched = unsafe {
            libc::fallocate(
                self.file.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                offset as libc::off_t,
                len as libc::off_t,
            )
        };
        if punched != 0 {
            return Err(self.io_err(io::Error::last_os_error()));
        }
        Ok(())
    }

    /// Makes every completed write durable: data first, then the bitmap
    /// that points at it (see the module's comment on crash safety).
    pub fn flush(&mut self) -> Result<(), OverlayError> {
        self.file
            .sync_data()
            .map_err(|source| self.io_err(source))?;
        if self.dirty_pages.is_empty() {
            return Ok(());
        }
        for page in std::mem::take(&mut self.dirty_pages) {
            let start = page * BITMAP_PAGE;
            let end = (start + BITMAP_PAGE).min(self.bitmap.len());
            self.file
                .write_all_at(&self.bitmap[start..end], self.bitmap_offset + start as u64)
                .map_err(|source| self.io_err(source))?;
        }
        self.file.sync_data().map_err(|source| self.io_err(source))
    }

    /// Closes the overlay as a killed process would: without a flush.
    #[cfg(test)]
    pub fn crash(mut self) {
        self.flush_on_drop = false;
    }

    fn io_err(&self, source: io::Error) -> OverlayError {
        OverlayError::Io {
            path: self.path.clone(),
            source,
        }
    }
}

impl Drop for Overlay {
    /// A VMM that ends cleanly keeps every write it completed.
    fn drop(&mut self) {
        if !self.flush_on_drop {
            return;
        }
        if let Err(err) = self.flush() {
            log::error!("{}", crate::report::one_line(&err));
        }
    }
}

fn read_header(file: &File, path: &Path) -> Result<Header, OverlayError> {
    let mut raw = [0u8; Header::LEN];
    file.read_exact_at(&mut raw, 0)
        .map_err(|err| match err.kind() {
            io::ErrorKind::UnexpectedEof => OverlayError::BadMagic {
                path: path.to_path_buf(),
            },
            _ => OverlayError::Io {
                path: path.to_path_buf(),
                source: err,
            },
        })?;
    if raw[..8] != MAGIC {
        return Err(OverlayError::BadMagic {
            path: path.to_path_buf(),
        });
    }
    let u32_at = |at: usize| u32::from_le_bytes(raw[at..at + 4].try_into().expect("4 bytes"));
    let u64_at = |at: usize| u64::from_le_bytes(raw[at..at + 8].try_into().expect("8 bytes"));
    if u32_at(8) != VERSION {
        return Err(OverlayError::Version {
            path: path.to_path_buf(),
            found: u32_at(8),
        });
    }
    let header = Header {
        capacity: u64_at(16),
        base_id: raw[24..56].try_into().expect("32 bytes"),
        data_offset: u64_at(64),
    };
    let bad = |what: String| OverlayError::Header {
        path: path.to_path_buf(),
        what,
    };
    if u64::from(u32_at(12)) != BLOCK_SIZE || u64_at(56) != BLOCK_SIZE {
        return Err(bad(format!(
            "block size {} / bitmap at {}, expected {BLOCK_SIZE}",
            u32_at(12),
            u64_at(56)
        )));
    }
    if header.data_offset != data_offset(header.capacity) {
        return Err(bad(format!(
            "data at {} does not follow the bitmap of a {}-byte volume",
            header.data_offset, header.capacity
        )));
    }
    let file_len = file
        .metadata()
        .map_err(|source| OverlayError::Io {
            path: path.to_path_buf(),
            source,
        })?
        .len();
    if file_len < header.data_offset + header.capacity {
        return Err(bad(format!(
            "{file_len} bytes cannot hold a {}-byte volume: truncated?",
            header.capacity
        )));
    }
    Ok(header)
}
