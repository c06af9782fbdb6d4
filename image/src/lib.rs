//! Kiln's compressed image format: a raw filesystem cut into chunks where
//! its content says (content-defined chunking, FastCDC), the chunks
//! compressed with zstd a few together in independent frames, so a reader
//! can serve any byte range by decompressing only the frames it touches.
//! Because chunk boundaries follow the content, a child image (a parent's
//! filesystem with a few files added) cuts most of its bytes into the
//! parent's very chunks, and takes those from the parent's file instead of
//! storing them again.
//!
//! ```text
//! offset 0     header (64 bytes, little endian)
//!                0  magic        b"KILNIMG\0"
//!                8  version      u32 = 2
//!               12  frame_max    u32, the most raw bytes a frame holds
//!               16  raw_size     u64, bytes of the raw filesystem
//!               24  chunk_count  u32
//!               28  layer_count  u32
//!               32  index_offset u64, where the index starts
//!               40  index_sha256 first 24 bytes of the SHA-256 of the
//!                                index and the layer table
//! offset 64    zstd frames, back to back, each of one or more chunks
//! index_offset the index: per chunk, in raw order, 64 bytes:
//!                0  raw_offset   u64, where the chunk starts in the filesystem
//!                8  raw_len      u32
//!               12  layer        u32: 0 a frame of this file, k one of the
//!                                k-th layer's, 0xffffffff all zeros (no frame)
//!               16  frame_offset u64, of its frame in that file
//!               24  frame_len    u32
//!               28  within       u32, where the chunk starts in the
//!                                frame's decompressed bytes
//!               32  sha256       32 bytes, of the chunk's raw data
//! then         the layer table: per layer, the SHA-256 of another image
//!              file (a parent's) whose frames the index names; the file
//!              is `<hex>.kiln` in this file's directory
//! ```
//!
//! A reader finds a chunk by offset with a binary search of the index.
//! The header's checksum catches a damaged index or layer table; each
//! chunk's checksum catches a damaged chunk (in this file or a layer's)
//! when it is read, so a reader returns an error, never wrong data. The
//! image's identity (its digest) is the SHA-256 of the whole file; its
//! content id ([`Reader::content_id`]) is that of the chunks' places and
//! checksums alone, the same for the same raw bytes however stored.
#![warn(missing_docs)]
mod format;
pub mod hydrate;
mod writer;

pub use writer::{Compression, Parent, write, write_child, write_with};

use std::collections::HashSet;
use std::fs::File;
use std::io::{self, Read, Write};
use std::num::NonZeroUsize;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use lru::LruCache;
use sha2::{Digest, Sha256};

use format::{HEADER_SIZE, Header, IndexEntry, ZERO_LAYER};

/// The first bytes of every image file.
pub const MAGIC: [u8; 8] = *b"KILNIMG\0";
/// The format version this code reads and writes: 2 since chunks are cut
/// by content and may be a parent's (version 1 had fixed 128 KiB chunks,
/// each its own frame, all in the one file).
pub const VERSION: u32 = 2;
/// The frame size images are written with: the most raw bytes compressed
/// together in one zstd frame (a frame closes before the chunk that would
/// take it past this; named when each chunk was its own frame), and so
/// the chunks' sizes ([`ChunkSizes::for_frame`]: 4, 16 and 64 KiB). Large
/// enough to compress as well as the 128 KiB chunks of version 1 did,
/// small enough that a 4 KiB random read decompresses little (measured in
/// `cargo xtask bench`).
pub const DEFAULT_CHUNK_SIZE: u32 = 128 * 1024;
/// Decompressed chunks a [`CachedReader`] keeps unless told otherwise:
/// 512 of the largest chunks, enough for a small image's whole working set.
pub const DEFAULT_CACHE_BYTES: u64 = 32 << 20;
/// Decompressed frames a [`Reader`] keeps, so that reading a frame's
/// chunks one after the other decompresses it once: one per thread that
/// reads an image at a time (a VM's, up to 8 prefetch workers), and more.
const FRAME_CACHE: usize = 16;
/// Buffers of frames the cache let go that a [`Reader`] keeps for the
/// next frames: a fresh one of 128 KiB is a fresh mapping on glibc, and
/// its page faults cost a tenth of a cold fill's CPU (measured with perf
/// on `kiln image hydrate`).
const SPARE_FRAMES: usize = 8;

/// The bounds of the content-defined chunker (FastCDC 2020), in bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChunkSizes {
    /// No cut before this many bytes.
    pub min: u32,
    /// The size cut points aim for.
    pub avg: u32,
    /// A cut at this many bytes at the latest (runs of zeros become
    /// chunks this long).
    pub max: u32,
}

impl ChunkSizes {
    /// The chunks of frames of `frame_size` bytes: a 32nd, an 8th and half
    /// of it (within what FastCDC takes). For 128 KiB frames, 4/16/64 KiB:
    /// chunks this small let a one-file child of `recipes/python` share
    /// all but 6 % of its parent's stored bytes (docs/recipes.md, "Images
    /// that share their parent's chunks": 32 KiB chunks left 12.5 %,
    /// 128 KiB 31 %), and a frame of several keeps the compression of a
    /// larger unit.
    pub fn for_frame(frame_size: u32) -> Self {
        ChunkSizes {
            min: (frame_size / 32).max(64),
            avg: (frame_size / 8).max(256),
            max: (frame_size / 2).max(1024),
        }
    }
}

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
    #[error(
        "{path}: image format version {found}, this Kiln reads version {VERSION}: build it again (`kiln build` replaces it; a committed image: `kiln rm` it and commit again)"
    )]
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
    /// A frame names another image file (a parent's, whose chunks this
    /// image shares) that is not beside it.
    #[error("{path} takes chunks from {layer}, which is missing")]
    MissingLayer {
        /// The image.
        path: PathBuf,
        /// The file it needs, named by its SHA-256.
        layer: PathBuf,
        /// What the system said.
        #[source]
        source: io::Error,
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
    /// Its frame decompressed to fewer bytes than hold it.
    #[error("its frame is {len} bytes, too short to hold it")]
    Short {
        /// The decompressed frame's length.
        len: usize,
    },
    /// It decompressed, but to other bytes than were written.
    #[error("checksum mismatch")]
    Checksum,
}

/// The sizes of a written image.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageInfo {
    /// Bytes of the raw filesystem the image holds.
    pub raw_size: u64,
    /// Bytes of the image file itself (header, its own frames, index and
    /// layer table): what storing it costs beside its parents.
    pub file_size: u64,
    /// Number of chunks, and so of index entries.
    pub chunk_count: u32,
    /// SHA-256 of the whole image file, hex.
    pub digest: String,
    /// The other image files (SHA-256s) whose frames it takes chunks from:
    /// they must sit beside it, as [`layer_path`] names them.
    pub layers: Vec<[u8; 32]>,
}

/// How an image's chunks are stored, in bytes of frames.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stored {
    /// The image file's own size.
    pub own: u64,
    /// Frames in other image files (its parents') that it reads.
    pub shared: u64,
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

/// The 32 bytes a 64-digit hex SHA-256 (as [`ImageInfo::digest`] and the
/// store's manifests hold it, without their `sha256:`) spells; `None` for
/// anything else.
pub fn digest_from_hex(hex: &str) -> Option<[u8; 32]> {
    if hex.len() != 64 || !hex.is_ascii() {
        return None;
    }
    let mut digest = [0u8; 32];
    for (byte, pair) in digest.iter_mut().zip(hex.as_bytes().chunks(2)) {
        *byte = u8::from_str_radix(std::str::from_utf8(pair).ok()?, 16).ok()?;
    }
    Some(digest)
}

/// Where the image `image` finds the layer (other image file) whose
/// SHA-256 is `digest`: `<hex>.kiln` beside it.
pub fn layer_path(image: &Path, digest: &[u8; 32]) -> PathBuf {
    image.with_file_name(format!("{}.kiln", hex(digest)))
}

/// The other image files `image` takes frames from (its layers), without
/// opening them or reading its index: what a process that reads the image
/// must be able to open beside it (a jailed VM's mounts, say).
pub fn layer_files(image: &Path) -> Result<Vec<PathBuf>, ImageError> {
    let (own, header, _) = Layer::open(image)?;
    let table =
        header.index_offset + u64::from(header.chunk_count) * format::INDEX_ENTRY_SIZE as u64;
    let mut bytes = vec![0u8; header.layer_count as usize * format::LAYER_ENTRY_SIZE];
    own.file
        .read_exact_at(&mut bytes, table)
        .map_err(io_err(image))?;
    let digests = bytes.chunks_exact(format::LAYER_ENTRY_SIZE);
    Ok(digests
        .map(|d| layer_path(image, d.try_into().expect("32 bytes")))
        .collect())
}

/// An image file a reader takes frames from: the image's own (layer 0)
/// or one of its layer table's.
#[derive(Debug)]
struct Layer {
    path: PathBuf,
    file: File,
    /// The most raw bytes one of its frames holds.
    frame_max: u32,
}

impl Layer {
    /// Opens `path` and checks its header; returns it with the bytes its
    /// frames may occupy.
    fn open(path: &Path) -> Result<(Layer, Header, [u8; 24]), ImageError> {
        let file = File::open(path).map_err(io_err(path))?;
        let file_size = file.metadata().map_err(io_err(path))?.len();
        let mut header = [0u8; HEADER_SIZE as usize];
        file.read_exact_at(&mut header, 0)
            .map_err(|err| match err.kind() {
                io::ErrorKind::UnexpectedEof => ImageError::BadMagic { path: path.into() },
                _ => io_err(path)(err),
            })?;
        let (header, checksum) = Header::decode(path, &header, file_size)?;
        let layer = Layer {
            path: path.into(),
            file,
            frame_max: header.frame_max,
        };
        Ok((layer, header, checksum))
    }
}

/// Decompressed frames by layer number and offset in that layer's file.
type FrameCache = LruCache<(u32, u64), Arc<Vec<u8>>>;

/// Random access to an image's raw bytes.
pub struct Reader {
    /// Layer 0 is the image's own file, then its layer table's in order.
    layers: Vec<Layer>,
    layer_digests: Vec<[u8; 32]>,
    raw_size: u64,
    index: Vec<IndexEntry>,
    content_id: [u8; 32],
    /// Frames decompressed lately, by layer and offset (not yet checked:
    /// each chunk taken from one is).
    frames: Mutex<FrameCache>,
    /// zstd contexts, reused: setting one up per frame costs a third of the
    /// decompression time (measured on 128 KiB frames). One per thread
    /// decompressing at the same time, made when first needed.
    decompressors: Pool<zstd::bulk::Decompressor<'static>>,
    /// Frame buffers to reuse, at most [`SPARE_FRAMES`].
    spare_frames: Pool<Vec<u8>>,
}

/// Objects kept for reuse: each taken by one thread, given back after.
struct Pool<T> {
    kept: Mutex<Vec<T>>,
    /// How many it keeps at most; more given back are dropped.
    most: usize,
}

impl<T> Pool<T> {
    fn new(most: usize) -> Self {
        Pool {
            kept: Mutex::new(Vec::new()),
            most,
        }
    }

    /// A kept object, if there is one.
    fn take(&self) -> Option<T> {
        self.kept().pop()
    }

    /// Keeps `item` for the next [`Pool::take`], unless the pool is full.
    fn give_back(&self, item: T) {
        let mut kept = self.kept();
        if kept.len() < self.most {
            kept.push(item);
        }
    }

    fn kept(&self) -> std::sync::MutexGuard<'_, Vec<T>> {
        self.kept.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl std::fmt::Debug for Reader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reader")
            .field("path", &self.path())
            .field("raw_size", &self.raw_size)
            .field("chunks", &self.index.len())
            .field("layers", &self.layer_digests.len())
            .finish_non_exhaustive()
    }
}

impl Reader {
    /// Opens `path` and the layers it names, and checks their headers and
    /// the index.
    pub fn open(path: &Path) -> Result<Self, ImageError> {
        let (own, header, checksum) = Layer::open(path)?;
        let mut tail = vec![0u8; header.tail_len().expect("checked by decode") as usize];
        own.file
            .read_exact_at(&mut tail, header.index_offset)
            .map_err(io_err(path))?;
        format::check_tail(path, &tail, &checksum)?;
        let (index, layer_digests) = format::decode_tail(&header, &tail);
        let mut data = vec![(HEADER_SIZE..header.index_offset, header.frame_max)];
        let mut layers = vec![own];
        for digest in &layer_digests {
            let layer_file = layer_path(path, digest);
            let (layer, layer_header, _) = match Layer::open(&layer_file) {
                Err(ImageError::Io { source, .. }) => {
                    return Err(ImageError::MissingLayer {
                        path: path.into(),
                        layer: layer_file,
                        source,
                    });
                }
                opened => opened?,
            };
            data.push((
                HEADER_SIZE..layer_header.index_offset,
                layer_header.frame_max,
            ));
            layers.push(layer);
        }
        format::check_index(path, &header, &index, &data)?;
        Ok(Reader {
            layers,
            layer_digests,
            raw_size: header.raw_size,
            content_id: format::content_id(header.raw_size, &index),
            index,
            frames: Mutex::new(LruCache::new(
                NonZeroUsize::new(FRAME_CACHE).expect("not zero"),
            )),
            // One context per thread decompressing at once: no bound needed.
            decompressors: Pool::new(usize::MAX),
            spare_frames: Pool::new(SPARE_FRAMES),
        })
    }

    /// The image's content id: the SHA-256 of its chunks' places and
    /// checksums. Two images share it only if they hold the same raw bytes
    /// cut the same way, whichever files their frames are in.
    pub fn content_id(&self) -> [u8; 32] {
        self.content_id
    }

    /// The file this reader reads.
    pub fn path(&self) -> &Path {
        &self.layers[0].path
    }

    /// The other image files it takes frames from, beside it.
    pub fn layer_paths(&self) -> impl Iterator<Item = &Path> {
        self.layers[1..].iter().map(|l| l.path.as_path())
    }

    /// Size of the raw filesystem.
    pub fn raw_size(&self) -> u64 {
        self.raw_size
    }

    /// Number of chunks.
    pub fn chunk_count(&self) -> u32 {
        self.index.len() as u32
    }

    /// Where chunk `n`, which must exist, starts in the raw filesystem.
    pub fn chunk_offset(&self, n: u32) -> u64 {
        self.index[n as usize].raw_offset
    }

    /// Raw bytes of chunk `n`, which must exist.
    pub fn chunk_len(&self, n: u32) -> usize {
        self.index[n as usize].raw_len as usize
    }

    /// The chunk that holds raw byte `offset` (the last chunk's number
    /// past the end, and 0 for an empty image).
    pub fn chunk_at(&self, offset: u64) -> u32 {
        let n = self.index.partition_point(|e| e.raw_range().end <= offset);
        n.min(self.index.len().saturating_sub(1)) as u32
    }

    /// The chunks that hold raw bytes `offset..offset + len` (`len` > 0).
    pub fn chunks_of(&self, offset: u64, len: u64) -> std::ops::RangeInclusive<u32> {
        self.chunk_at(offset)..=self.chunk_at(offset + len.max(1) - 1)
    }

    /// Whether chunks `a` and `b`, which must exist, are decompressed
    /// together: they lie in the same zstd frame of the same layer.
    pub fn same_frame(&self, a: u32, b: u32) -> bool {
        let (a, b) = (&self.index[a as usize], &self.index[b as usize]);
        (a.layer, a.frame_offset) == (b.layer, b.frame_offset)
    }

    /// Whether chunk `n` holds only zeros, by its index entry alone (no
    /// decompression): ext4 images are mostly free space.
    pub fn is_zero_chunk(&self, n: u32) -> bool {
        self.index
            .get(n as usize)
            .is_some_and(|e| e.layer == ZERO_LAYER)
    }

    /// What storing the image costs: its own file, and the frames of its
    /// layers that it reads.
    pub fn stored(&self) -> Result<Stored, ImageError> {
        let own = self.layers[0]
            .file
            .metadata()
            .map_err(io_err(self.path()))?;
        let mut frames = HashSet::new();
        let shared = self
            .index
            .iter()
            .filter(|e| e.layer != 0 && e.layer != ZERO_LAYER)
            .filter(|e| frames.insert((e.layer, e.frame_offset)))
            .map(|e| u64::from(e.frame_len))
            .sum();
        Ok(Stored {
            own: own.len(),
            shared,
        })
    }

    /// The raw data of chunk `n`, decompressed and verified.
    pub fn chunk(&self, n: u32) -> Result<Vec<u8>, ImageError> {
        if self.is_zero_chunk(n) {
            return Ok(vec![0; self.chunk_len(n)]);
        }
        Ok(self.shared_chunk(n)?.to_vec())
    }

    /// The raw data of chunk `n`, decompressed and verified, where it lies
    /// in its decompressed frame: no copy of it is made.
    pub fn shared_chunk(&self, n: u32) -> Result<SharedChunk, ImageError> {
        let damaged = |source| ImageError::Chunk {
            path: self.path().into(),
            chunk: n,
            source,
        };
        let entry = self
            .index
            .get(n as usize)
            .ok_or_else(|| damaged(ChunkDamage::NoSuchChunk))?;
        if entry.layer == ZERO_LAYER {
            let len = entry.raw_len as usize;
            return Ok(SharedChunk {
                frame: Arc::new(vec![0; len]),
                range: 0..len,
            });
        }
        let frame = self.frame(entry).map_err(|err| match err {
            FrameError::Io(err) => err,
            FrameError::Damaged(err) => damaged(ChunkDamage::Frame(err)),
        })?;
        let range = entry.within as usize..(entry.within + entry.raw_len) as usize;
        let data = frame
            .get(range.clone())
            .ok_or_else(|| damaged(ChunkDamage::Short { len: frame.len() }))?;
        if Sha256::digest(data)[..] != entry.sha256 {
            return Err(damaged(ChunkDamage::Checksum));
        }
        Ok(SharedChunk { frame, range })
    }

    /// The decompressed frame `entry` names, from the frame cache or its
    /// file.
    fn frame(&self, entry: &IndexEntry) -> Result<Arc<Vec<u8>>, FrameError> {
        let key = (entry.layer, entry.frame_offset);
        if let Some(frame) = self.frame_cache().get(&key) {
            return Ok(frame.clone());
        }
        let layer = &self.layers[entry.layer as usize];
        let mut compressed = vec![0u8; entry.frame_len as usize];
        layer
            .file
            .read_exact_at(&mut compressed, entry.frame_offset)
            .map_err(|err| FrameError::Io(io_err(&layer.path)(err)))?;
        // Capacity only: zstd writes the frame into it and sets its length,
        // so the buffer is never zeroed first.
        let mut frame = self.spare_frames.take().unwrap_or_default();
        frame.reserve(layer.frame_max as usize);
        self.with_decompressor(|d| d.decompress_to_buffer(&compressed, &mut frame))
            .map_err(|err| FrameError::Io(io_err(&layer.path)(err)))?
            .map_err(FrameError::Damaged)?;
        let frame = Arc::new(frame);
        let evicted = self.frame_cache().push(key, frame.clone());
        // A frame no one holds any more lends its buffer to the next one.
        if let Some((_, old)) = evicted
            && let Ok(mut buffer) = Arc::try_unwrap(old)
        {
            buffer.clear();
            self.spare_frames.give_back(buffer);
        }
        Ok(frame)
    }

    fn frame_cache(&self) -> std::sync::MutexGuard<'_, FrameCache> {
        self.frames.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs `f` with a zstd context of the pool (a new one if every one is
    /// in use), and puts it back after.
    fn with_decompressor<T>(
        &self,
        f: impl FnOnce(&mut zstd::bulk::Decompressor<'static>) -> T,
    ) -> io::Result<T> {
        let mut decompressor = match self.decompressors.take() {
            Some(decompressor) => decompressor,
            None => zstd::bulk::Decompressor::new()?,
        };
        let result = f(&mut decompressor);
        self.decompressors.give_back(decompressor);
        Ok(result)
    }

    /// Writes the whole raw filesystem to `out` (every chunk verified).
    pub fn flatten_to(&self, out: &mut impl Write) -> Result<(), ImageError> {
        for n in 0..self.chunk_count() {
            out.write_all(&self.chunk(n)?)
                .map_err(io_err(self.path()))?;
        }
        Ok(())
    }
}

/// A verified chunk's bytes inside the decompressed frame that holds them
/// (shared with the reader's frame cache).
#[derive(Clone, Debug)]
pub struct SharedChunk {
    frame: Arc<Vec<u8>>,
    range: std::ops::Range<usize>,
}

impl std::ops::Deref for SharedChunk {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        &self.frame[self.range.clone()]
    }
}

/// Why a frame could not be had: its file failed, or zstd refused it.
enum FrameError {
    Io(ImageError),
    Damaged(io::Error),
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
        let largest = (0..reader.chunk_count()).map(|n| reader.chunk_len(n)).max();
        let chunks = (cache_bytes / largest.unwrap_or(1) as u64).max(1);
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
                path: self.reader.path().into(),
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
        let mut done = 0;
        while done < buf.len() {
            let at = offset + done as u64;
            if at >= self.reader.raw_size {
                break;
            }
            let n = self.reader.chunk_at(at);
            let data = self.chunk(n)?;
            let within = (at - self.reader.chunk_offset(n)) as usize;
            let len = (data.len() - within).min(buf.len() - done);
            buf[done..done + len].copy_from_slice(&data[within..within + len]);
            done += len;
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

    /// The image file's index entries, and where the index starts.
    fn index_of(bytes: &[u8]) -> (Vec<IndexEntry>, usize) {
        let header: [u8; 64] = bytes[..64].try_into().unwrap();
        let (header, _) = Header::decode(Path::new("x"), &header, bytes.len() as u64).unwrap();
        let at = header.index_offset as usize;
        (format::decode_tail(&header, &bytes[at..]).0, at)
    }

    /// `bytes` with index entry `n` changed by `change`, and a header whose
    /// checksum matches: only the reader's checks of the entry can tell.
    fn with_entry(bytes: &[u8], n: usize, change: impl Fn(&mut IndexEntry)) -> Vec<u8> {
        let header: [u8; 64] = bytes[..64].try_into().unwrap();
        let (header, _) = Header::decode(Path::new("x"), &header, bytes.len() as u64).unwrap();
        let at = header.index_offset as usize;
        let (mut index, layers) = format::decode_tail(&header, &bytes[at..]);
        change(&mut index[n]);
        let tail = format::encode_tail(&index, &layers);
        let mut changed = bytes[..at].to_vec();
        changed[..64].copy_from_slice(&header.encode(&tail));
        changed.extend(tail);
        changed
    }

    #[test]
    fn an_index_entry_outside_the_data_is_refused_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let (raw, _) = raw_file(dir.path(), 100_000);
        let out = dir.path().join("image.kiln");
        write(&raw, &out, 4096 * 16).unwrap();
        let bytes = std::fs::read(&out).unwrap();
        let (index, _) = index_of(&bytes);
        let n = index.iter().position(|e| e.layer == 0).unwrap();
        let changes: [&dyn Fn(&mut IndexEntry); 4] = [
            // 4 GiB would be allocated before reading.
            &|e| e.frame_len = u32::MAX,
            &|e| e.frame_offset = 1 << 62,
            &|e| e.layer = 3,
            &|e| e.within = u32::MAX - 10,
        ];
        for change in changes {
            let path = dir.path().join("tampered.kiln");
            std::fs::write(&path, with_entry(&bytes, n, change)).unwrap();
            let err = Reader::open(&path).expect_err("refused").to_string();
            assert!(err.contains(&format!("chunk {n}: ")), "{err}");
        }
        let path = dir.path().join("gap.kiln");
        std::fs::write(&path, with_entry(&bytes, 1, |e| e.raw_offset += 1)).unwrap();
        let err = Reader::open(&path).expect_err("refused").to_string();
        assert!(err.contains("do not follow the chunk before"), "{err}");
    }

    #[test]
    fn round_trip_and_random_reads() {
        let dir = tempfile::tempdir().unwrap();
        let (raw, data) = raw_file(dir.path(), 300_000);
        let out = dir.path().join("image.kiln");
        let info = write(&raw, &out, 4096 * 16).unwrap();
        assert_eq!(info.raw_size, 300_000);
        assert_eq!(info.digest, file_digest(&out).unwrap());
        let reader = CachedReader::new(Reader::open(&out).unwrap(), 2 * 65_536);
        assert_eq!(reader.reader().chunk_count(), info.chunk_count);
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

    /// Frames decompressed into the buffers of frames the cache let go
    /// hold their own bytes, not the old frame's.
    #[test]
    fn reused_frame_buffers_hold_the_new_frame() {
        let dir = tempfile::tempdir().unwrap();
        let (raw, data) = raw_file(dir.path(), 2_000_000);
        let out = dir.path().join("image.kiln");
        write(&raw, &out, 4096 * 4).unwrap();
        let reader = Reader::open(&out).unwrap();
        let frames: HashSet<_> = reader.index.iter().map(|e| e.frame_offset).collect();
        assert!(frames.len() > FRAME_CACHE + SPARE_FRAMES, "too few frames");
        // Backwards, then forwards: every read past the first 16 frames
        // evicts one, and from then on frames land in spare buffers.
        let chunks = (0..reader.chunk_count())
            .rev()
            .chain(0..reader.chunk_count());
        for n in chunks {
            let offset = reader.chunk_offset(n) as usize;
            let expected = &data[offset..offset + reader.chunk_len(n)];
            assert_eq!(&reader.chunk(n).unwrap()[..], expected, "chunk {n}");
        }
        assert!(reader.spare_frames.take().is_some(), "no buffer was kept");
    }

    /// Chunks are found by offset: every byte's chunk holds it, and the
    /// chunks tile the filesystem in order.
    #[test]
    fn offsets_find_their_chunks() {
        let dir = tempfile::tempdir().unwrap();
        let (raw, _) = raw_file(dir.path(), 200_000);
        let out = dir.path().join("image.kiln");
        write(&raw, &out, DEFAULT_CHUNK_SIZE).unwrap();
        let reader = Reader::open(&out).unwrap();
        assert!(reader.chunk_count() > 1, "cut by content");
        let mut end = 0;
        for n in 0..reader.chunk_count() {
            let (at, len) = (reader.chunk_offset(n), reader.chunk_len(n) as u64);
            assert_eq!(at, end);
            for offset in [at, at + len / 2, at + len - 1] {
                assert_eq!(reader.chunk_at(offset), n);
            }
            end = at + len;
        }
        assert_eq!(end, 200_000);
        assert_eq!(reader.chunks_of(0, 200_000), 0..=reader.chunk_count() - 1);
    }

    /// A child with bytes inserted near its start (as adding a file to an
    /// ext4 built from a tree shifts what follows) stores only the chunks
    /// around the change, takes the rest from the parent's file beside it,
    /// and reads back whole.
    #[test]
    fn a_child_stores_only_what_its_parent_lacks() {
        let dir = tempfile::tempdir().unwrap();
        let (raw, data) = raw_file(dir.path(), 2_000_000);
        let parent_path = dir.path().join("parent.kiln");
        let parent_info = write(&raw, &parent_path, DEFAULT_CHUNK_SIZE).unwrap();
        let mut child_data = data[..300_000].to_vec();
        child_data.extend(b"a new file's bytes, one block of them".repeat(110));
        child_data.extend(&data[300_000..]);
        let child_raw = dir.path().join("child.raw");
        std::fs::write(&child_raw, &child_data).unwrap();
        let parent = Reader::open(&parent_path).unwrap();
        let digest = |info: &ImageInfo| digest_from_hex(&info.digest).unwrap();
        let parent_digest = digest(&parent_info);
        let child_path = dir.path().join("child.kiln");
        let parent_ref = Parent {
            reader: &parent,
            digest: parent_digest,
        };
        let info = write_child(&child_raw, &child_path, DEFAULT_CHUNK_SIZE, parent_ref).unwrap();
        assert_eq!(info.layers, [parent_digest]);
        assert!(
            info.file_size * 5 < parent_info.file_size,
            "child {} bytes, parent {}",
            info.file_size,
            parent_info.file_size
        );
        // Beside it, under the name its layer table gives.
        let missing = Reader::open(&child_path).unwrap_err();
        assert!(
            matches!(missing, ImageError::MissingLayer { .. }),
            "{missing}"
        );
        let beside = layer_path(&child_path, &parent_digest);
        assert_eq!(
            layer_files(&child_path).unwrap(),
            std::slice::from_ref(&beside)
        );
        std::fs::hard_link(&parent_path, beside).unwrap();
        let child = Reader::open(&child_path).unwrap();
        let stored = child.stored().unwrap();
        assert_eq!(stored.own, info.file_size);
        assert!(stored.shared > stored.own, "{stored:?}");
        let mut flat = Vec::new();
        child.flatten_to(&mut flat).unwrap();
        assert!(flat == child_data, "the child reads back");

        // A grandchild takes the parent's chunks from the parent's file
        // too, not through the child.
        let grandchild_path = dir.path().join("grandchild.kiln");
        let child_ref = Parent {
            reader: &child,
            digest: digest(&info),
        };
        let grand =
            write_child(&child_raw, &grandchild_path, DEFAULT_CHUNK_SIZE, child_ref).unwrap();
        assert_eq!(grand.layers, [digest(&info), parent_digest]);
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
        // A flipped byte of the second frame.
        let (index, _) = index_of(&pristine);
        let second = index.iter().find(|e| e.frame_offset > HEADER_SIZE).unwrap();
        // Its zstd magic number: the frame does not decompress at all.
        let at = second.frame_offset as usize;
        let damaged = with(&|b| b[at] ^= 0x40);
        let reader = Reader::open(&damaged).unwrap();
        let failed = (0..reader.chunk_count()).filter(|n| reader.chunk(*n).is_err());
        let in_frame = index
            .iter()
            .filter(|e| e.frame_offset == second.frame_offset);
        assert_eq!(
            failed.count(),
            in_frame.count(),
            "exactly the damaged frame's chunks fail"
        );
        assert!(matches!(
            Reader::open(&with(&|b| b[0] = b'X')),
            Err(ImageError::BadMagic { .. })
        ));
        let old = Reader::open(&with(&|b| b[8] = 1)).unwrap_err();
        assert!(matches!(old, ImageError::Version { found: 1, .. }));
        assert!(old.to_string().contains("build it again"), "{old}");
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
