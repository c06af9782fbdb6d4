//! Writing an image: the raw filesystem cut into chunks by content
//! (FastCDC), each chunk hashed, and those neither all zeros, nor already
//! written, nor held by the parent, gathered into frames of up to the
//! frame size. A batch of frames is compressed in parallel, each as an
//! independent zstd frame, while the next batch is cut and hashed, and
//! the frames written in order. A frame
//! depends only on its chunks and the level, never on the thread that made
//! it, so the file is byte-identical whatever the thread count: the same
//! raw filesystem (and parent) gives the same digest.
use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::fs::File;
use std::io::{self, BufReader, BufWriter, Seek, SeekFrom, Write};
use std::path::Path;

use fastcdc::v2020::StreamCDC;
use sha2::{Digest, Sha256};

use crate::format::{HEADER_SIZE, Header, IndexEntry, ZERO_LAYER, encode_tail};
use crate::{ChunkSizes, ImageError, ImageInfo, Reader, file_digest, io_err};

/// zstd level for images up to [`LARGE_IMAGE`]: written once and read
/// many times, they get zstd's best ratio, which costs little at their size.
const SMALL_IMAGE_LEVEL: i32 = 19;
/// zstd level above [`LARGE_IMAGE`]: level 19 compresses a Debian minbase
/// root's 128 KiB chunks 2.4 times slower than 15, for a file 1.7 % smaller
/// (README, "Build benchmark"); level 12 is 8 % larger than 19, over the
/// 5 % a faster level may cost.
const LARGE_IMAGE_LEVEL: i32 = 15;
/// zstd level of the chunks a child of more than [`LARGE_IMAGE`] stores,
/// those its parent lacks: on a Debian child's (a step's files, and the
/// ext4 metadata a new tree lays out anew) level 13 made 3.8 % more bytes
/// than 19 and ran 7 times as fast, 1.7 times as fast as 15; level 12
/// made 6.2 % more, over the 5 % (README, "The Debian recipe and
/// compression"). The parent's shared chunks are not compressed again, so
/// the whole image grows by less than that.
const LARGE_CHILD_LEVEL: i32 = 13;
/// Raw size from which an image is large.
const LARGE_IMAGE: u64 = 64 << 20;
/// Frames each thread compresses per batch: enough to amortize starting
/// the threads, few enough that a batch is a few MiB of memory.
const FRAMES_PER_THREAD: usize = 16;

/// How an image is compressed: what [`write`] picks for the raw size and
/// host, or what a measurement asks for ([`write_with`]). Neither changes
/// how the file is read; the level changes its bytes, the thread count
/// never does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Compression {
    /// The zstd level of every frame.
    pub level: i32,
    /// Threads compressing a batch of frames at once.
    pub threads: usize,
}

impl Compression {
    /// [`write`]'s choice for a raw filesystem of `raw_size` bytes: level
    /// 19 up to [`LARGE_IMAGE`], 15 above, on every CPU of the host.
    pub fn for_size(raw_size: u64) -> Self {
        Self::by_size(raw_size, LARGE_IMAGE_LEVEL)
    }

    /// [`write_child`]'s choice for a child of `raw_size` bytes of raw
    /// filesystem: as [`Compression::for_size`], but level 13 above
    /// [`LARGE_IMAGE`].
    pub fn for_child(raw_size: u64) -> Self {
        Self::by_size(raw_size, LARGE_CHILD_LEVEL)
    }

    /// Level 19 up to [`LARGE_IMAGE`] and `large_level` above, on every
    /// CPU of the host.
    fn by_size(raw_size: u64, large_level: i32) -> Self {
        Self {
            level: if raw_size > LARGE_IMAGE {
                large_level
            } else {
                SMALL_IMAGE_LEVEL
            },
            threads: std::thread::available_parallelism().map_or(1, usize::from),
        }
    }
}

/// The image a child is written against: each chunk of the child that the
/// parent (or one of the parent's own layers) holds is taken from there,
/// not stored again.
#[derive(Clone, Copy, Debug)]
pub struct Parent<'a> {
    /// The parent image, open.
    pub reader: &'a Reader,
    /// SHA-256 of the parent's file: how the child's layer table names it.
    pub digest: [u8; 32],
}

/// Compresses the raw filesystem `raw` into the image file `out`, in
/// frames of up to `frame_size` raw bytes (its chunks
/// [`ChunkSizes::for_frame`]), as [`Compression::for_size`] says.
/// `out` is written in place: callers write to a temporary path and rename.
pub fn write(raw: &Path, out: &Path, frame_size: u32) -> Result<ImageInfo, ImageError> {
    let raw_size = std::fs::metadata(raw).map_err(io_err(raw))?.len();
    write_with(raw, out, frame_size, Compression::for_size(raw_size), None)
}

/// [`write`], storing only the chunks `parent` does not hold, compressed
/// as [`Compression::for_child`] says: the image then needs the files
/// [`ImageInfo::layers`] names beside it.
pub fn write_child(
    raw: &Path,
    out: &Path,
    frame_size: u32,
    parent: Parent<'_>,
) -> Result<ImageInfo, ImageError> {
    let raw_size = std::fs::metadata(raw).map_err(io_err(raw))?.len();
    let compression = Compression::for_child(raw_size);
    write_with(raw, out, frame_size, compression, Some(parent))
}

/// [`write`] or [`write_child`] with the level and threads of `compression`.
pub fn write_with(
    raw: &Path,
    out: &Path,
    frame_size: u32,
    compression: Compression,
    parent: Option<Parent<'_>>,
) -> Result<ImageInfo, ImageError> {
    let input = File::open(raw).map_err(io_err(raw))?;
    let raw_size = input.metadata().map_err(io_err(raw))?.len();
    let file = File::create(out).map_err(io_err(out))?;
    let mut frames = Frames::new(&file, frame_size, compression);
    frames.skip_header().map_err(io_err(out))?;
    let (mut known, candidates) = parent.map(known_in).unwrap_or_default();
    let sizes = ChunkSizes::for_frame(frame_size);
    let chunker = StreamCDC::new(
        BufReader::new(input),
        sizes.min as usize,
        sizes.avg as usize,
        sizes.max as usize,
    );
    let mut chunks = Vec::new();
    let mut zeros = ZeroChunks::new(sizes.max as usize);
    for chunk in chunker {
        let chunk = chunk.map_err(|err| io_err(raw)(err.into()))?;
        let (sha256, place) = match zeros.digest(&chunk.data) {
            Some(sha256) => (sha256, Place::Zero),
            None => {
                let sha256: [u8; 32] = Sha256::digest(&chunk.data).into();
                let place = match known.entry(sha256) {
                    Entry::Occupied(known) => *known.get(),
                    Entry::Vacant(new) => {
                        *new.insert(frames.add(&chunk.data).map_err(io_err(out))?)
                    }
                };
                (sha256, place)
            }
        };
        chunks.push((chunk.offset, chunk.length as u32, sha256, place));
    }
    frames.finish().map_err(io_err(out))?;
    let (index, layers) = frames.index(&chunks, &candidates);
    let tail = encode_tail(&index, &layers);
    let header = Header {
        frame_max: frames.frame_max,
        raw_size,
        chunk_count: index.len() as u32,
        layer_count: layers.len() as u32,
        index_offset: frames.offset,
    };
    let file_size = frames.offset + tail.len() as u64;
    frames
        .end(&header.encode(&tail), &tail)
        .map_err(io_err(out))?;
    Ok(ImageInfo {
        raw_size,
        file_size,
        chunk_count: index.len() as u32,
        digest: file_digest(out)?,
        layers,
    })
}

/// Recognises all-zero chunks and gives their SHA-256 (the index keeps
/// one for every chunk). A filesystem's free space is most of an image's
/// zero chunks, and a run of zeros has no content-defined boundary, so
/// nearly all of them are cut at the largest size: each length is hashed
/// once, not each chunk.
struct ZeroChunks {
    zeros: Vec<u8>,
    digests: HashMap<usize, [u8; 32]>,
}

impl ZeroChunks {
    fn new(max_len: usize) -> Self {
        ZeroChunks {
            zeros: vec![0; max_len],
            digests: HashMap::new(),
        }
    }

    /// The SHA-256 of `data` if it is all zeros (and no longer than the
    /// largest chunk); `None` otherwise.
    fn digest(&mut self, data: &[u8]) -> Option<[u8; 32]> {
        // A slice comparison is one memcmp, which is vectorised.
        if self.zeros.get(..data.len())? != data {
            return None;
        }
        let digest = self.digests.entry(data.len());
        Some(*digest.or_insert_with(|| Sha256::digest(data).into()))
    }
}

/// Where a chunk's bytes are stored, as the writer knows it.
#[derive(Clone, Copy, Debug)]
enum Place {
    /// All zeros: no frame.
    Zero,
    /// In a frame of a layer: `layer` counts from 1 in the candidate
    /// layers ([`known_in`]).
    Layer {
        layer: u32,
        frame_offset: u64,
        frame_len: u32,
        within: u32,
    },
    /// In this file's frame number `frame`.
    Own { frame: u32, within: u32 },
}

/// The chunks `parent` holds, by checksum, and the layers they are in:
/// the parent's own file first, then its layer table's.
fn known_in(parent: Parent<'_>) -> (HashMap<[u8; 32], Place>, Vec<[u8; 32]>) {
    let reader = parent.reader;
    let mut candidates = vec![parent.digest];
    candidates.extend(&reader.layer_digests);
    let mut known = HashMap::new();
    for e in reader.index.iter().filter(|e| e.layer != ZERO_LAYER) {
        known.entry(e.sha256).or_insert(Place::Layer {
            layer: e.layer + 1,
            frame_offset: e.frame_offset,
            frame_len: e.frame_len,
            within: e.within,
        });
    }
    (known, candidates)
}

/// The image's own frames as they are made: chunks gathered into a frame
/// until it holds the frame size, frames compressed a batch at a time and
/// written after the header. A full batch is compressed on threads of its
/// own while the caller goes on cutting and hashing chunks for the next
/// (both are CPU work: a build on two CPUs would otherwise leave one idle
/// while it hashes), and written, in order, when the next batch is full.
struct Frames<'f> {
    writer: BufWriter<&'f File>,
    file: &'f File,
    frame_size: usize,
    compression: Compression,
    /// The frame being gathered.
    pending: Vec<u8>,
    /// Gathered frames waiting to be compressed.
    batch: Vec<Vec<u8>>,
    /// The batch being compressed.
    compressing: Option<CompressedBatch>,
    /// Frames closed so far (written, being compressed or in the batch):
    /// the number of the frame being gathered.
    closed: u32,
    /// Each written frame's offset and length, in order.
    written: Vec<(u64, u32)>,
    /// Where the next frame goes.
    offset: u64,
    /// The most raw bytes a frame holds.
    frame_max: u32,
}

impl<'f> Frames<'f> {
    fn new(file: &'f File, frame_size: u32, compression: Compression) -> Self {
        Frames {
            writer: BufWriter::new(file),
            file,
            frame_size: frame_size as usize,
            compression,
            pending: Vec::new(),
            batch: Vec::new(),
            compressing: None,
            closed: 0,
            written: Vec::new(),
            offset: HEADER_SIZE,
            frame_max: 1,
        }
    }

    /// Leaves room for the header, written last.
    fn skip_header(&mut self) -> io::Result<()> {
        self.writer.write_all(&[0; HEADER_SIZE as usize])
    }

    /// Adds `data` to the frame being gathered, closing it first if
    /// `data` would take it past the frame size; where `data` will be.
    fn add(&mut self, data: &[u8]) -> io::Result<Place> {
        if self.pending.len() + data.len() > self.frame_size {
            self.close()?;
        }
        let place = Place::Own {
            frame: self.closed,
            within: self.pending.len() as u32,
        };
        self.pending.extend_from_slice(data);
        Ok(place)
    }

    /// Closes the frame being gathered; compresses the batch once full.
    fn close(&mut self) -> io::Result<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        self.frame_max = self.frame_max.max(self.pending.len() as u32);
        self.batch.push(std::mem::take(&mut self.pending));
        self.closed += 1;
        if self.batch.len() >= self.compression.threads * FRAMES_PER_THREAD {
            self.flush()?;
        }
        Ok(())
    }

    /// Writes the batch compressed before, then starts compressing this one.
    fn flush(&mut self) -> io::Result<()> {
        self.write_compressed()?;
        let Compression { level, threads } = self.compression;
        let batch = std::mem::take(&mut self.batch);
        self.compressing = Some(std::thread::spawn(move || {
            compress_batch(&batch, level, threads)
        }));
        Ok(())
    }

    /// Waits for the batch being compressed, if any, and writes it.
    fn write_compressed(&mut self) -> io::Result<()> {
        let Some(compressing) = self.compressing.take() else {
            return Ok(());
        };
        let compressed = compressing
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))?;
        for frame in compressed {
            self.writer.write_all(&frame)?;
            self.written.push((self.offset, frame.len() as u32));
            self.offset += frame.len() as u64;
        }
        Ok(())
    }

    /// Writes what is left of the frames.
    fn finish(&mut self) -> io::Result<()> {
        self.close()?;
        self.flush()?;
        self.write_compressed()
    }

    /// The index of `chunks`, and the layer table: the `candidates` that
    /// some chunk is in, in their order.
    fn index(
        &self,
        chunks: &[(u64, u32, [u8; 32], Place)],
        candidates: &[[u8; 32]],
    ) -> (Vec<IndexEntry>, Vec<[u8; 32]>) {
        let mut used = vec![false; candidates.len() + 1];
        for (.., place) in chunks {
            if let Place::Layer { layer, .. } = place {
                used[*layer as usize] = true;
            }
        }
        // A used candidate's number in the table: one more than the used
        // ones before it.
        let numbers: Vec<u32> = used
            .iter()
            .scan(0, |n, &u| {
                *n += u32::from(u);
                Some(*n)
            })
            .collect();
        let layers = (candidates.iter().enumerate())
            .filter(|(k, _)| used[k + 1])
            .map(|(_, digest)| *digest)
            .collect();
        let index = chunks
            .iter()
            .map(|&(raw_offset, raw_len, sha256, place)| {
                let (layer, frame_offset, frame_len, within) = match place {
                    Place::Zero => (ZERO_LAYER, 0, 0, 0),
                    Place::Layer {
                        layer,
                        frame_offset,
                        frame_len,
                        within,
                    } => (numbers[layer as usize], frame_offset, frame_len, within),
                    Place::Own { frame, within } => {
                        let (offset, len) = self.written[frame as usize];
                        (0, offset, len, within)
                    }
                };
                IndexEntry {
                    raw_offset,
                    raw_len,
                    layer,
                    frame_offset,
                    frame_len,
                    within,
                    sha256,
                }
            })
            .collect();
        (index, layers)
    }

    /// Writes the index and layer table (`tail`), then `header` at the
    /// start, and makes the file durable.
    fn end(mut self, header: &[u8], tail: &[u8]) -> io::Result<()> {
        self.writer.write_all(tail)?;
        self.writer.seek(SeekFrom::Start(0))?;
        self.writer.write_all(header)?;
        self.writer.flush()?;
        drop(self.writer);
        self.file.sync_all()
    }
}

/// A batch of frames being compressed: its frames, compressed, in order.
type CompressedBatch = std::thread::JoinHandle<io::Result<Vec<Vec<u8>>>>;

/// Compresses `batch` with `threads` threads, each taking a contiguous
/// run of its frames; returns them in the batch's order.
fn compress_batch(batch: &[Vec<u8>], level: i32, threads: usize) -> io::Result<Vec<Vec<u8>>> {
    if batch.is_empty() {
        return Ok(Vec::new());
    }
    let per_thread = batch.len().div_ceil(threads);
    std::thread::scope(|scope| {
        let runs: Vec<_> = batch
            .chunks(per_thread)
            .map(|run| scope.spawn(move || compress_run(run, level)))
            .collect();
        let mut compressed = Vec::with_capacity(batch.len());
        for run in runs {
            let run = run
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
            compressed.extend(run?);
        }
        Ok(compressed)
    })
}

/// Compresses `frames` in order, with one zstd context.
fn compress_run(frames: &[Vec<u8>], level: i32) -> io::Result<Vec<Vec<u8>>> {
    let mut compressor = zstd::bulk::Compressor::new(level)?;
    frames
        .iter()
        .map(|data| compressor.compress(data))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Reader;

    #[test]
    fn zero_chunks_get_the_digest_of_their_zeros_and_nothing_else_does() {
        let mut zeros = ZeroChunks::new(64);
        for len in [64, 17, 64] {
            let expected: [u8; 32] = Sha256::digest(vec![0; len]).into();
            assert_eq!(zeros.digest(&vec![0; len]), Some(expected));
        }
        assert_eq!(zeros.digests.len(), 2, "each length hashed once");
        let mut last_byte_set = vec![0; 64];
        last_byte_set[63] = 1;
        assert_eq!(zeros.digest(&last_byte_set), None);
        assert_eq!(zeros.digest(&[0; 65]), None, "longer than any chunk");
    }

    /// Compressible, varied data: text-like runs with a counter in them.
    fn raw_file(dir: &Path, len: usize) -> std::path::PathBuf {
        let data: Vec<u8> = (0..len)
            .map(|i| b"kiln image chunk "[i % 17] ^ ((i / 4096) as u8))
            .collect();
        let path = dir.join("raw");
        std::fs::write(&path, &data).unwrap();
        path
    }

    /// The thread count changes how chunks are shared out, never a byte of
    /// the file (a batch boundary and a short last chunk included).
    #[test]
    fn the_file_is_the_same_whatever_the_thread_count() {
        let dir = tempfile::tempdir().unwrap();
        let raw = raw_file(dir.path(), (1 << 20) + 123);
        let bytes = |threads: usize| {
            let out = dir.path().join(format!("image-{threads}"));
            let compression = Compression { level: 19, threads };
            write_with(&raw, &out, 4096, compression, None).unwrap();
            std::fs::read(&out).unwrap()
        };
        let one = bytes(1);
        assert_eq!(one, bytes(2));
        assert_eq!(one, bytes(3));
        let out = dir.path().join("image-3");
        let reader = Reader::open(&out).unwrap();
        let mut flat = Vec::new();
        reader.flatten_to(&mut flat).unwrap();
        assert_eq!(flat, std::fs::read(&raw).unwrap());
    }

    #[test]
    fn large_images_get_the_faster_level() {
        let level = |size| Compression::for_size(size).level;
        assert_eq!(level(LARGE_IMAGE), SMALL_IMAGE_LEVEL);
        assert_eq!(level(LARGE_IMAGE + 1), LARGE_IMAGE_LEVEL);
    }

    #[test]
    fn children_of_large_images_get_a_faster_level_still() {
        let child = |size| Compression::for_child(size);
        assert_eq!(child(LARGE_IMAGE).level, SMALL_IMAGE_LEVEL);
        assert_eq!(child(LARGE_IMAGE + 1).level, LARGE_CHILD_LEVEL);
        let threads = Compression::for_size(LARGE_IMAGE).threads;
        assert_eq!(child(LARGE_IMAGE + 1).threads, threads);
    }
}
