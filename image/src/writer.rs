//! Writing an image: the raw filesystem read a batch of chunks at a time,
//! the batch's chunks compressed (and hashed) in parallel, each as an
//! independent zstd frame, and the frames written in chunk order. A
//! frame depends only on its chunk and the level, never on the thread
//! that made it, so the file is byte-identical whatever the thread count:
//! the same raw filesystem gives the same digest.
use std::fs::File;
use std::io::{self, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::Path;

use sha2::{Digest, Sha256};

use crate::{
    HEADER_SIZE, ImageError, ImageInfo, IndexEntry, encode_header, encode_index, file_digest,
    io_err,
};

/// zstd level for images up to [`LARGE_IMAGE`]: written once and read
/// many times, they get zstd's best ratio, which costs little at their size.
const SMALL_IMAGE_LEVEL: i32 = 19;
/// zstd level above [`LARGE_IMAGE`]: level 19 compresses a Debian minbase
/// root's 128 KiB chunks 2.4 times slower than 15, for a file 1.7 % smaller
/// (README, "Build benchmark"); level 12 is 8 % larger than 19, over the
/// 5 % a faster level may cost.
const LARGE_IMAGE_LEVEL: i32 = 15;
/// Raw size from which an image is large.
const LARGE_IMAGE: u64 = 64 << 20;
/// Chunks each thread compresses per batch: enough to amortize starting
/// the threads, few enough that a batch is a few MiB of memory.
const CHUNKS_PER_THREAD: usize = 16;

/// How an image is compressed: what [`write`] picks for the raw size and
/// host, or what a measurement asks for ([`write_with`]). Neither changes
/// how the file is read; the level changes its bytes, the thread count
/// never does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Compression {
    /// The zstd level of every chunk's frame.
    pub level: i32,
    /// Threads compressing a batch of chunks at once.
    pub threads: usize,
}

impl Compression {
    /// [`write`]'s choice for a raw filesystem of `raw_size` bytes: level
    /// 19 up to [`LARGE_IMAGE`], 15 above, on every CPU of the host.
    pub fn for_size(raw_size: u64) -> Self {
        Self {
            level: if raw_size > LARGE_IMAGE {
                LARGE_IMAGE_LEVEL
            } else {
                SMALL_IMAGE_LEVEL
            },
            threads: std::thread::available_parallelism().map_or(1, usize::from),
        }
    }
}

/// A chunk's zstd frame and its raw data's SHA-256.
struct Compressed {
    frame: Vec<u8>,
    sha256: [u8; 32],
}

/// Compresses the raw filesystem `raw` into the image file `out`, as
/// [`Compression::for_size`] says. `out` is written in place: callers
/// write to a temporary path and rename.
pub fn write(raw: &Path, out: &Path, chunk_size: u32) -> Result<ImageInfo, ImageError> {
    let raw_size = std::fs::metadata(raw).map_err(io_err(raw))?.len();
    write_with(raw, out, chunk_size, Compression::for_size(raw_size))
}

/// [`write`] with the level and threads of `compression`.
pub fn write_with(
    raw: &Path,
    out: &Path,
    chunk_size: u32,
    compression: Compression,
) -> Result<ImageInfo, ImageError> {
    let Compression { level, threads } = compression;
    let mut input = File::open(raw).map_err(io_err(raw))?;
    let raw_size = input.metadata().map_err(io_err(raw))?.len();
    let file = File::create(out).map_err(io_err(out))?;
    let mut writer = BufWriter::new(&file);
    writer
        .write_all(&[0; HEADER_SIZE as usize])
        .map_err(io_err(out))?;
    let mut offset = HEADER_SIZE;
    let mut index = Vec::new();
    loop {
        let batch =
            read_batch(&mut input, chunk_size, threads * CHUNKS_PER_THREAD).map_err(io_err(raw))?;
        if batch.is_empty() {
            break;
        }
        for chunk in compress_batch(&batch, level, threads).map_err(io_err(out))? {
            writer.write_all(&chunk.frame).map_err(io_err(out))?;
            index.push(IndexEntry {
                offset,
                length: chunk.frame.len() as u32,
                sha256: chunk.sha256,
            });
            offset += chunk.frame.len() as u64;
        }
    }
    let index_bytes = encode_index(&index);
    writer.write_all(&index_bytes).map_err(io_err(out))?;
    let header = encode_header(
        chunk_size,
        raw_size,
        index.len() as u32,
        offset,
        &index_bytes,
    );
    writer.seek(SeekFrom::Start(0)).map_err(io_err(out))?;
    writer.write_all(&header).map_err(io_err(out))?;
    writer.flush().map_err(io_err(out))?;
    drop(writer);
    file.sync_all().map_err(io_err(out))?;
    Ok(ImageInfo {
        raw_size,
        file_size: offset + index_bytes.len() as u64,
        chunk_size,
        chunk_count: index.len() as u32,
        digest: file_digest(out)?,
    })
}

/// Up to `count` chunks of `input`, each `chunk_size` bytes but the last
/// of the file; none at its end.
fn read_batch(input: &mut impl Read, chunk_size: u32, count: usize) -> io::Result<Vec<Vec<u8>>> {
    let mut batch = Vec::with_capacity(count);
    while batch.len() < count {
        let mut chunk = vec![0u8; chunk_size as usize];
        let filled = read_full(input, &mut chunk)?;
        if filled == 0 {
            break;
        }
        chunk.truncate(filled);
        batch.push(chunk);
    }
    Ok(batch)
}

/// Compresses `batch` with `threads` threads, each taking a contiguous
/// run of its chunks; returns them in the batch's order.
fn compress_batch(batch: &[Vec<u8>], level: i32, threads: usize) -> io::Result<Vec<Compressed>> {
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

/// Compresses and hashes `chunks` in order, with one zstd context.
fn compress_run(chunks: &[Vec<u8>], level: i32) -> io::Result<Vec<Compressed>> {
    let mut compressor = zstd::bulk::Compressor::new(level)?;
    chunks
        .iter()
        .map(|data| {
            Ok(Compressed {
                frame: compressor.compress(data)?,
                sha256: Sha256::digest(data).into(),
            })
        })
        .collect()
}

fn read_full(input: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match input.read(&mut buf[filled..])? {
            0 => break,
            n => filled += n,
        }
    }
    Ok(filled)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Reader;

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
        let raw = raw_file(dir.path(), 37 * 4096 + 123);
        let bytes = |threads: usize| {
            let out = dir.path().join(format!("image-{threads}"));
            let compression = Compression { level: 19, threads };
            let info = write_with(&raw, &out, 4096, compression).unwrap();
            assert_eq!(info.chunk_count, 38);
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
}
