//! Kiln's compressed image format: a raw filesystem cut into fixed-size
//! chunks, each compressed with zstd on its own, so a reader can serve any
//! byte range by decompressing only the chunks it touches.
//!
//! ```text
//! offset 0     header (64 bytes, little endian)
//!                0  magic        b"KILNIMG\0"
//!                8  version      u32 = 1
//!               12  chunk_size   u32, bytes of raw data per chunk (the last may be shorter)
//!               16  raw_size     u64, bytes of the raw filesystem
//!               24  chunk_count  u32
//!               28  reserved     u32 = 0
//!               32  index_offset u64, where the index starts
//!               40  index_sha256 first 24 bytes of the SHA-256 of the index
//! offset 64    the chunks' zstd frames, back to back
//! index_offset the index: per chunk, 48 bytes:
//!                0  offset       u64, of its zstd frame in the file
//!                8  length       u32, of its zstd frame
//!               12  reserved     u32 = 0
//!               16  sha256       32 bytes, of the chunk's raw data
//! ```
//!
//! The header's index checksum catches a damaged index; each chunk's
//! checksum catches a damaged chunk when it is read, so a reader returns an
//! error, never wrong data. The image's identity (its digest) is the SHA-256
//! of the whole file.
#![warn(missing_docs)]
pub mod hydrate;
mod writer;

pub use writer::{Compression, write, write_with};

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex};

use lru::LruCache;

use sha2::{Digest, Sha256};

/// The first bytes of every image file.
pub const MAGIC: [u8; 8] = *b"KILNIMG\0";
/// The format version this code reads and writes.
pub const VERSION: u32 = 1;
/// Raw bytes per chunk: large enough to compress well, small enough that a
/// 4 KiB random read decompresses little (measured in `cargo xtask bench`).
pub const DEFAULT_CHUNK_SIZE: u32 = 128 * 1024;
/// Decompressed chunks a [`CachedReader`] keeps unless told otherwise:
/// 256 default-sized chunks, enough for a small image's whole working set.
pub const DEFAULT_CACHE_BYTES: u64 = 32 << 20;
const HEADER_SIZE: u64 = 64;
const INDEX_ENTRY_SIZE: usize = 48;
const INDEX_CHECKSUM_LEN: usize = 24;
/// Chunk sizes a reader accepts (a corrupt header must not make it
/// allocate gigabytes).
const CHUNK_SIZE_RANGE: std::ops::RangeInclusive<u32> = 4096..=(16 << 20);

/// What can go wrong with an image file. Each names the file.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// Reading or writing the file failed.
    #[error("cannot read or write {path}")]
    Io {
        /// The image, or the raw filesystem being compressed.
        path: PathBuf,
        /// What the system said.
        #[source]
        source: io::Error,
    },
    /// The file does not start with [`MAGIC`] (or is shorter than a
    /// header): it is something else.
    #[error("{path} is not a Kiln image (bad magic)")]
    BadMagic {
        /// The file.
        path: PathBuf,
    },
    /// The file is an image of a format version this code does not read.
    #[error("{path}: image format version {found}, this Kiln reads version {VERSION}")]
    Version {
        /// The image.
        path: PathBuf,
        /// The version its header holds.
        found: u32,
    },
    /// A header field contradicts the others or the file's size.
    #[error("{path}: corrupt header: {what}")]
    Header {
        /// The image.
        path: PathBuf,
        /// Which field, and why it cannot be right.
        what: String,
    },
    /// The index's SHA-256 is not the one the header records.
    #[error("{path}: the index does not match its checksum (the file is damaged)")]
    IndexChecksum {
        /// The image.
        path: PathBuf,
    },
    /// A chunk does not decompress to the bytes its index entry promises.
    #[error("{path}: chunk {chunk} is damaged")]
    Chunk {
        /// The image.
        path: PathBuf,
        /// The chunk's number.
        chunk: u32,
        /// What is wrong with it.
        #[source]
        source: ChunkDamage,
    },
    /// A read asked for bytes beyond the raw filesystem's end.
    #[error("{path}: read of {len} bytes at {offset} is past the end ({size} bytes)")]
    OutOfRange {
        /// The image.
        path: PathBuf,
        /// Where the read started, in the raw filesystem.
        offset: u64,
        /// How many bytes it asked for.
        len: usize,
        /// The raw filesystem's size.
        size: u64,
    },
}

/// Why a chunk was refused: the cause of [`ImageError::Chunk`].
#[derive(Debug, thiserror::Error)]
pub enum ChunkDamage {
    /// The index has no entry of that number.
    #[error("no such chunk")]
    NoSuchChunk,
    /// zstd could not decompress the frame.
    #[error("its zstd frame does not decompress")]
    Frame(#[source] io::Error),
    /// It decompressed, but to other bytes than were written.
    #[error("checksum mismatch")]
    Checksum,
}

/// One chunk's place in the file and its raw data's checksum.
#[derive(Clone, Debug, PartialEq, Eq)]
struct IndexEntry {
    offset: u64,
    length: u32,
    sha256: [u8; 32],
}

/// The sizes of a written image.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageInfo {
    /// Bytes of the raw filesystem the image holds.
    pub raw_size: u64,
    /// Bytes of the image file itself (header, frames and index).
    pub file_size: u64,
    /// Raw bytes per chunk (the last chunk may hold fewer).
    pub chunk_size: u32,
    /// Number of chunks, and so of index entries.
    pub chunk_count: u32,
    /// SHA-256 of the whole image file, hex.
    pub digest: String,
}

/// Wraps an I/O error with the file it concerns.
fn io_err(path: &Path) -> impl FnOnce(io::Error) -> ImageError + '_ {
    move |source| ImageError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// SHA-256 of a whole file, hex.
pub fn file_digest(path: &Path) -> Result<String, ImageError> {
    let mut file = File::open(path).map_err(io_err(path))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        match file.read(&mut buf).map_err(io_err(path))? {
            0 => return Ok(hex(&hasher.finalize())),
            n => hasher.update(&buf[..n]),
        }
    }
}

/// Lower-case hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn encode_index(index: &[IndexEntry]) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(index.len() * INDEX_ENTRY_SIZE);
    for entry in index {
        bytes.extend(entry.offset.to_le_bytes());
        bytes.extend(entry.length.to_le_bytes());
        bytes.extend(0u32.to_le_bytes());
        bytes.extend(entry.sha256);
    }
    bytes
}

fn encode_header(
    chunk_size: u32,
    raw_size: u64,
    chunk_count: u32,
    index_offset: u64,
    index: &[u8],
) -> Vec<u8> {
    let mut header = Vec::with_capacity(HEADER_SIZE as usize);
    header.extend(MAGIC);
    header.extend(VERSION.to_le_bytes());
    header.extend(chunk_size.to_le_bytes());
    header.extend(raw_size.to_le_bytes());
    header.extend(chunk_count.to_le_bytes());
    header.extend(0u32.to_le_bytes());
    header.extend(index_offset.to_le_bytes());
    header.extend(&Sha256::digest(index)[..INDEX_CHECKSUM_LEN]);
    header
}

/// Random access to an image's raw bytes.
pub struct Reader {
    path: PathBuf,
    file: File,
    chunk_size: u32,
    raw_size: u64,
    index: Vec<IndexEntry>,
    index_digest: [u8; 32],
    /// SHA-256 of a chunk of zeros, full-sized and as long as the last
    /// chunk: such chunks need no decompression to be known.
    zero_digests: [[u8; 32]; 2],
    /// zstd contexts, reused: setting one up per chunk costs a third of the
    /// decompression time (measured on 128 KiB chunks). One per thread
    /// decompressing at the same time, made when first needed.
    decompressors: Mutex<Vec<zstd::bulk::Decompressor<'static>>>,
}

impl std::fmt::Debug for Reader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reader")
            .field("path", &self.path)
            .field("chunk_size", &self.chunk_size)
            .field("raw_size", &self.raw_size)
            .field("chunks", &self.index.len())
            .finish_non_exhaustive()
    }
}

impl Reader {
    /// Opens and checks the header and index of `path`.
    pub fn open(path: &Path) -> Result<Self, ImageError> {
        let io_err = |source| ImageError::Io {
            path: path.into(),
            source,
        };
        let file = File::open(path).map_err(io_err)?;
        let file_size = file.metadata().map_err(io_err)?.len();
        let mut header = [0u8; HEADER_SIZE as usize];
        file.read_exact_at(&mut header, 0)
            .map_err(|err| match err.kind() {
                io::ErrorKind::UnexpectedEof => ImageError::BadMagic { path: path.into() },
                _ => io_err(err),
            })?;
        if header[..8] != MAGIC {
            return Err(ImageError::BadMagic { path: path.into() });
        }
        let u32_at =
            |at: usize| u32::from_le_bytes(header[at..at + 4].try_into().expect("4 bytes"));
        let u64_at =
            |at: usize| u64::from_le_bytes(header[at..at + 8].try_into().expect("8 bytes"));
        let version = u32_at(8);
        if version != VERSION {
            return Err(ImageError::Version {
                path: path.into(),
                found: version,
            });
        }
        let (chunk_size, raw_size, chunk_count, index_offset) =
            (u32_at(12), u64_at(16), u32_at(24), u64_at(32));
        let bad = |what: String| ImageError::Header {
            path: path.into(),
            what,
        };
        if !CHUNK_SIZE_RANGE.contains(&chunk_size) {
            return Err(bad(format!("chunk size {chunk_size}")));
        }
        if raw_size.div_ceil(u64::from(chunk_size)) != u64::from(chunk_count) {
            return Err(bad(format!(
                "{chunk_count} chunks cannot hold {raw_size} bytes"
            )));
        }
        let index_len = chunk_count as usize * INDEX_ENTRY_SIZE;
        if index_offset.checked_add(index_len as u64) != Some(file_size) {
            return Err(bad(format!(
                "the index ({index_len} bytes at {index_offset}) does not end the file ({file_size} bytes): truncated?"
            )));
        }
        let mut index_bytes = vec![0u8; index_len];
        file.read_exact_at(&mut index_bytes, index_offset)
            .map_err(io_err)?;
        let index_digest: [u8; 32] = Sha256::digest(&index_bytes).into();
        if index_digest[..INDEX_CHECKSUM_LEN] != header[40..40 + INDEX_CHECKSUM_LEN] {
            return Err(ImageError::IndexChecksum { path: path.into() });
        }
        let index: Vec<IndexEntry> = index_bytes
            .chunks_exact(INDEX_ENTRY_SIZE)
            .map(|e| IndexEntry {
                offset: u64::from_le_bytes(e[..8].try_into().expect("8 bytes")),
                length: u32::from_le_bytes(e[8..12].try_into().expect("4 bytes")),
                sha256: e[16..48].try_into().expect("32 bytes"),
            })
            .collect();
        // A reader allocates a chunk's frame before reading it: an entry
        // must say a size a chunk's frame can have, within the data.
        let frame_max = zstd::zstd_safe::compress_bound(chunk_size as usize) as u64;
        if let Some((n, e)) = index.iter().enumerate().find(|(_, e)| {
            u64::from(e.length) > frame_max
                || e.offset < HEADER_SIZE
                || e.offset.saturating_add(u64::from(e.length)) > index_offset
        }) {
            return Err(bad(format!(
                "chunk {n}'s frame ({} bytes at {}) is not within the data (bytes {HEADER_SIZE} to {index_offset}, at most {frame_max} a frame)",
                e.length, e.offset
            )));
        }
        let last_len = raw_size - u64::from(chunk_count.saturating_sub(1)) * u64::from(chunk_size);
        let zero_digest = |len: u64| Sha256::digest(vec![0u8; len as usize]).into();
        Ok(Reader {
            path: path.into(),
            file,
            chunk_size,
            raw_size,
            index,
            index_digest,
            zero_digests: [zero_digest(u64::from(chunk_size)), zero_digest(last_len)],
            decompressors: Mutex::new(Vec::new()),
        })
    }

    /// The image's content identity, cheap to get: the SHA-256 of its
    /// index, which holds every chunk's checksum and the layout. Two images
    /// share it only if they hold the same raw bytes in the same chunking.
    pub fn content_id(&self) -> [u8; 32] {
        self.index_digest
    }

    /// The file this reader reads.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Size of the raw filesystem.
    pub fn raw_size(&self) -> u64 {
        self.raw_size
    }

    /// Number of chunks.
    pub fn chunk_count(&self) -> u32 {
        self.index.len() as u32
    }

    /// Raw bytes per chunk (the last may hold fewer: see [`Reader::chunk_len`]).
    pub fn chunk_size(&self) -> u32 {
        self.chunk_size
    }

    /// Raw bytes of chunk `n`, which must exist.
    pub fn chunk_len(&self, n: u32) -> usize {
        let start = u64::from(n) * u64::from(self.chunk_size);
        (self.raw_size - start).min(u64::from(self.chunk_size)) as usize
    }

    /// Whether chunk `n` holds only zeros, by its index entry alone (no
    /// decompression): ext4 images are mostly free space.
    pub fn is_zero_chunk(&self, n: u32) -> bool {
        let digest = if n + 1 == self.chunk_count() {
            &self.zero_digests[1]
        } else {
            &self.zero_digests[0]
        };
        self.index
            .get(n as usize)
            .is_some_and(|e| &e.sha256 == digest)
    }

    /// The raw data of chunk `n`, decompressed and verified.
    pub fn chunk(&self, n: u32) -> Result<Vec<u8>, ImageError> {
        let damaged = |source| ImageError::Chunk {
            path: self.path.clone(),
            chunk: n,
            source,
        };
        let entry = self
            .index
            .get(n as usize)
            .ok_or_else(|| damaged(ChunkDamage::NoSuchChunk))?;
        let expected_len = self.chunk_len(n) as u64;
        let mut frame = vec![0u8; entry.length as usize];
        self.file
            .read_exact_at(&mut frame, entry.offset)
            .map_err(|source| ImageError::Io {
                path: self.path.clone(),
                source,
            })?;
        let mut data = vec![0u8; expected_len as usize];
        let len = self
            .with_decompressor(|d| d.decompress_to_buffer(&frame, &mut data))
            .map_err(|source| ImageError::Io {
                path: self.path.clone(),
                source,
            })?
            .map_err(|err| damaged(ChunkDamage::Frame(err)))?;
        if len as u64 != expected_len || Sha256::digest(&data)[..] != entry.sha256 {
            return Err(damaged(ChunkDamage::Checksum));
        }
        Ok(data)
    }

    /// Runs `f` with a zstd context of the pool (a new one if every one is
    /// in use), and puts it back after.
    fn with_decompressor<T>(
        &self,
        f: impl FnOnce(&mut zstd::bulk::Decompressor<'static>) -> T,
    ) -> io::Result<T> {
        let pool = || {
            self.decompressors
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
        };
        let pooled = pool().pop();
        let mut decompressor = match pooled {
            Some(decompressor) => decompressor,
            None => zstd::bulk::Decompressor::new()?,
        };
        let result = f(&mut decompressor);
        pool().push(decompressor);
        Ok(result)
    }

    /// Writes the whole raw filesystem to `out` (every chunk verified).
    pub fn flatten_to(&self, out: &mut impl Write) -> Result<(), ImageError> {
        for n in 0..self.chunk_count() {
            out.write_all(&self.chunk(n)?)
                .map_err(|source| ImageError::Io {
                    path: self.path.clone(),
                    source,
                })?;
        }
        Ok(())
    }
}

/// Random access to an image's raw bytes through a bounded cache of
/// decompressed chunks, least recently used evicted first: a block device or
/// an ext4 reader makes many small reads close together, and each chunk
/// decompresses (and is verified) once while it stays in the cache.
#[derive(Debug)]
pub struct CachedReader {
    reader: Reader,
    cache: Mutex<LruCache<u32, Arc<Vec<u8>>>>,
}

impl CachedReader {
    /// A cache of up to `cache_bytes` of decompressed chunks (at least one).
    pub fn new(reader: Reader, cache_bytes: u64) -> Self {
        let chunks = (cache_bytes / u64::from(reader.chunk_size)).max(1);
        let chunks = NonZeroUsize::new(usize::try_from(chunks).unwrap_or(usize::MAX))
            .unwrap_or(NonZeroUsize::MIN);
        CachedReader {
            reader,
            cache: Mutex::new(LruCache::new(chunks)),
        }
    }

    /// The image underneath.
    pub fn reader(&self) -> &Reader {
        &self.reader
    }

    /// Chunk `n`, from the cache or decompressed and verified.
    pub fn chunk(&self, n: u32) -> Result<Arc<Vec<u8>>, ImageError> {
        let mut cache = self
            .cache
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(data) = cache.get(&n) {
            return Ok(data.clone());
        }
        let data = Arc::new(self.reader.chunk(n)?);
        cache.put(n, data.clone());
        Ok(data)
    }

    /// Fills `buf` with the raw bytes at `offset`, which must lie inside
    /// the image.
    pub fn read_exact_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), ImageError> {
        let end = offset.checked_add(buf.len() as u64);
        if end.is_none_or(|end| end > self.reader.raw_size) {
            return Err(ImageError::OutOfRange {
                path: self.reader.path.clone(),
                offset,
                len: buf.len(),
                size: self.reader.raw_size,
            });
        }
        self.copy_out(offset, buf).map(|_| ())
    }

    /// Copies from `offset` until `buf` is full or the image ends; returns
    /// the bytes copied.
    fn copy_out(&self, offset: u64, buf: &mut [u8]) -> Result<usize, ImageError> {
        let chunk_size = u64::from(self.reader.chunk_size);
        let mut done = 0;
        while done < buf.len() {
            let at = offset + done as u64;
            if at >= self.reader.raw_size {
                break;
            }
            let data = self.chunk((at / chunk_size) as u32)?;
            let within = (at % chunk_size) as usize;
            let n = (data.len() - within).min(buf.len() - done);
            buf[done..done + n].copy_from_slice(&data[within..within + n]);
            done += n;
        }
        Ok(done)
    }
}

impl positioned_io::ReadAt for CachedReader {
    /// Fills as much of `buf` as the image holds, across chunk boundaries
    /// (a short read only at the end of the raw bytes).
    fn read_at(&self, pos: u64, buf: &mut [u8]) -> io::Result<usize> {
        self.copy_out(pos, buf).map_err(io::Error::other)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A raw "filesystem" of `len` bytes: compressible runs and noise.
    fn raw_file(dir: &Path, len: usize) -> (PathBuf, Vec<u8>) {
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let data: Vec<u8> = (0..len)
            .map(|i| {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                if (i / 5000) % 2 == 0 { 0 } else { seed as u8 }
            })
            .collect();
        let path = dir.join("raw.ext4");
        std::fs::write(&path, &data).unwrap();
        (path, data)
    }

    #[test]
    fn an_index_entry_outside_the_data_is_refused_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let (raw, _) = raw_file(dir.path(), 100_000);
        let out = dir.path().join("image.kiln");
        let info = write(&raw, &out, 4096 * 16).unwrap();
        let bytes = std::fs::read(&out).unwrap();
        let index_offset = bytes.len() - info.chunk_count as usize * INDEX_ENTRY_SIZE;
        // Chunk 1's frame length: 4 GiB would be allocated before reading.
        for (field, value) in [(8, u32::MAX as u64), (0, 1u64 << 62)] {
            let mut tampered = bytes.clone();
            let entry = index_offset + INDEX_ENTRY_SIZE;
            let width = if field == 8 { 4 } else { 8 };
            tampered[entry + field..entry + field + width]
                .copy_from_slice(&value.to_le_bytes()[..width]);
            // A consistent index checksum: only the bounds check can tell.
            let header = encode_header(
                4096 * 16,
                info.raw_size,
                info.chunk_count,
                index_offset as u64,
                &tampered[index_offset..],
            );
            tampered[..header.len()].copy_from_slice(&header);
            let path = dir.path().join("tampered.kiln");
            std::fs::write(&path, &tampered).unwrap();
            let err = Reader::open(&path).expect_err("refused");
            assert!(err.to_string().contains("chunk 1's frame"), "{err}");
        }
    }

    #[test]
    fn round_trip_and_random_reads() {
        let dir = tempfile::tempdir().unwrap();
        let (raw, data) = raw_file(dir.path(), 300_000);
        let out = dir.path().join("image.kiln");
        let info = write(&raw, &out, 4096 * 16).unwrap();
        assert_eq!((info.raw_size, info.chunk_count), (300_000, 5));
        assert_eq!(info.digest, file_digest(&out).unwrap());
        let reader = CachedReader::new(Reader::open(&out).unwrap(), 2 * 65_536);
        for (offset, len) in [(0, 10), (65_530, 20), (131_000, 140_000), (299_990, 10)] {
            let mut buf = vec![0; len];
            reader.read_exact_at(offset, &mut buf).unwrap();
            assert_eq!(buf, &data[offset as usize..offset as usize + len]);
        }
        let mut flat = Vec::new();
        reader.reader().flatten_to(&mut flat).unwrap();
        assert_eq!(flat, data);
        let mut buf = [0; 11];
        assert!(matches!(
            reader.read_exact_at(299_990, &mut buf),
            Err(ImageError::OutOfRange { .. })
        ));
    }

    #[test]
    fn same_input_same_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let (raw, _) = raw_file(dir.path(), 100_000);
        let a = write(&raw, &dir.path().join("a"), DEFAULT_CHUNK_SIZE).unwrap();
        let b = write(&raw, &dir.path().join("b"), DEFAULT_CHUNK_SIZE).unwrap();
        assert_eq!(a.digest, b.digest);
    }

    #[test]
    fn damage_is_detected_never_returned() {
        let dir = tempfile::tempdir().unwrap();
        let (raw, _) = raw_file(dir.path(), 200_000);
        let out = dir.path().join("image.kiln");
        write(&raw, &out, 65_536).unwrap();
        let pristine = std::fs::read(&out).unwrap();
        let with = |mutate: &dyn Fn(&mut Vec<u8>)| {
            let mut bytes = pristine.clone();
            mutate(&mut bytes);
            let path = dir.path().join("damaged.kiln");
            std::fs::write(&path, bytes).unwrap();
            path
        };
        // A flipped byte inside the second chunk's frame.
        let damaged = with(&|b| b[HEADER_SIZE as usize + 2000] ^= 0x40);
        let reader = Reader::open(&damaged).unwrap();
        let errors = (0..reader.chunk_count())
            .filter(|n| reader.chunk(*n).is_err())
            .count();
        assert_eq!(errors, 1, "exactly the damaged chunk fails");
        assert!(matches!(
            Reader::open(&with(&|b| b[0] = b'X')),
            Err(ImageError::BadMagic { .. })
        ));
        assert!(matches!(
            Reader::open(&with(&|b| b[8] = 9)),
            Err(ImageError::Version { found: 9, .. })
        ));
        assert!(matches!(
            Reader::open(&with(&|b| b.truncate(b.len() - 1))),
            Err(ImageError::Header { .. })
        ));
        let index_byte = pristine.len() - 3;
        assert!(matches!(
            Reader::open(&with(&|b| b[index_byte] ^= 1)),
            Err(ImageError::IndexChecksum { .. })
        ));
        assert!(matches!(
            Reader::open(&with(&|b| b.truncate(10))),
            Err(ImageError::BadMagic { .. })
        ));
        let err = Reader::open(&with(&|b| b[0] = b'X'))
            .unwrap_err()
            .to_string();
        assert!(err.contains("damaged.kiln"), "{err}");
    }
}
