//! The host-wide hydration cache of an image: its chunks decompressed and
//! verified once per host, then read by every VM of the image with a plain
//! `pread`.
//!
//! A cache is two files in the cache directory, named by the image's
//! content id (the SHA-256 of its index, [`Reader::content_id`]):
//!
//! ```text
//! <id>.raw      the raw filesystem at its own offsets, sparse: a chunk is
//!               there once hydrated, a hole before
//! <id>.present  header (64 bytes, little endian)
//!                 0  magic       b"KILNHYD\0"
//!                 8  version     u32 = 1
//!                12  chunk_size  u32
//!                16  raw_size    u64
//!                24  chunk_count u32
//!                28  reserved    u32 = 0
//!                32  content_id  32 bytes
//!               then one byte per chunk: 0 absent, 1 in <id>.raw,
//!               2 all zeros (never written: reads as zeros)
//! ```
//!
//! Crash safety: a fill writes its chunks' data, makes it durable
//! (fdatasync), and only then writes their bytes in `<id>.present`, so a
//! byte that survives a crash never claims data that did not. A lost byte
//! only means the chunk is filled again.
//!
//! Sharing: every process that fills the cache (VMs, `kiln image
//! hydrate`) takes the exclusive `flock` of `<id>.raw` for the fill, reads
//! the present bytes again under it and decompresses only the chunks still
//! absent, so two processes never write the same chunk or decompress it
//! twice. Fills of one image are serialized host-wide; each is short (the
//! chunks one request or one batch needs) and a waiter then finds the
//! chunks it wanted already there. Reads of present chunks take no lock:
//! a chunk's data never changes once its byte says it is there.
//!
//! Damage: a chunk is written only after its checksum matched, so a
//! damaged image chunk never enters the cache. Opening a cache checks it
//! under the lock: a `.present` file of another image, size or version
//! starts the cache over; a present byte whose chunk is (partly) a hole in
//! `<id>.raw` (punched, or past the end of a truncated file) is cleared, so
//! the chunk is filled again, never served. Bytes changed inside the data
//! without changing its allocation are not detected: the cache is trusted
//! like the store that holds the image.
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use crate::{ImageError, Reader, hex};

const MAGIC: [u8; 8] = *b"KILNHYD\0";
const VERSION: u32 = 1;
const HEADER_LEN: usize = 64;
/// Chunks a sequential read that misses fills beyond the ones it needs:
/// 1 MiB of default-sized chunks, so that a guest reading a file 128 KiB
/// at a time pays one fill (one lock, one fdatasync) per 1 MiB, not per
/// chunk.
const READAHEAD_CHUNKS: u32 = 8;
/// A chunk's state in `.present`.
const ABSENT: u8 = 0;
const DATA: u8 = 1;
const ZERO: u8 = 2;

/// What can go wrong with a hydration cache.
#[derive(Debug, thiserror::Error)]
pub enum HydrateError {
    /// Creating, locking, reading, writing or syncing a cache file failed.
    #[error("cannot read or write the hydration cache {path}")]
    Io {
        /// The cache file or directory.
        path: PathBuf,
        /// What the system said.
        #[source]
        source: io::Error,
    },
    /// The image underneath failed (a damaged chunk, which is then not
    /// cached, or a read past its end).
    #[error(transparent)]
    Image(#[from] ImageError),
}

/// The two files of an image's cache.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CacheFiles {
    /// The decompressed chunks, at their offsets in the raw filesystem.
    pub raw: PathBuf,
    /// Which chunks `raw` holds.
    pub present: PathBuf,
}

impl CacheFiles {
    /// The cache files in `dir` of the image whose content id is `id`.
    pub fn new(dir: &Path, id: &[u8; 32]) -> Self {
        let name = hex(id);
        CacheFiles {
            raw: dir.join(format!("{name}.raw")),
            present: dir.join(format!("{name}.present")),
        }
    }

    /// Deletes both files; a file that is not there is no error.
    pub fn remove(&self) -> Result<(), HydrateError> {
        for path in [&self.present, &self.raw] {
            match std::fs::remove_file(path) {
                Err(err) if err.kind() != io::ErrorKind::NotFound => {
                    return Err(io_err(path)(err));
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// Raw bytes of `reader`'s image the cache says it holds, read without
    /// a lock or a check (for a listing): 0 when there is no cache or it is
    /// of another image.
    pub fn hydrated_bytes(&self, reader: &Reader) -> Result<u64, HydrateError> {
        let file = match File::open(&self.present) {
            Ok(file) => file,
            Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(0),
            Err(err) => return Err(io_err(&self.present)(err)),
        };
        let states = read_states(&file, reader).map_err(io_err(&self.present))?;
        Ok(states.map_or(0, |states| held_bytes(reader, &states)))
    }
}

/// Raw bytes of the chunks `states` marks present.
fn held_bytes(reader: &Reader, states: &[u8]) -> u64 {
    (0..reader.chunk_count())
        .filter(|&n| matches!(states[n as usize], DATA | ZERO))
        .map(|n| reader.chunk_len(n) as u64)
        .sum()
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> HydrateError + '_ {
    move |source| HydrateError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Where a piece of a read comes from (see [`Hydrated::read_with`]; a
/// volume's reads, `kiln_vmm::volume`, come in the same pieces).
#[derive(Debug)]
pub enum Piece<'a> {
    /// `len` bytes of `file` at `offset`: the cache's raw file (or a
    /// volume's overlay).
    File {
        /// The file's path, for messages.
        path: &'a Path,
        /// The file that holds them.
        file: &'a File,
        /// Where the bytes are in it.
        offset: u64,
        /// How many.
        len: usize,
    },
    /// `len` zero bytes.
    Zero {
        /// How many.
        len: usize,
    },
    /// Bytes decompressed in memory: a chunk the cache could not take (or
    /// one a volume without a cache decompressed).
    Bytes(&'a [u8]),
}

/// An image read through its host-wide hydration cache.
#[derive(Debug)]
pub struct Hydrated {
    reader: Reader,
    files: CacheFiles,
    raw: File,
    present: File,
    /// Each chunk's state as this process last saw it; a present chunk
    /// stays present, so only absent ones are looked up again.
    states: Mutex<Vec<u8>>,
    /// `None` until a fill fails for want of the cache's files; then the
    /// error, until [`Hydrated::take_fill_error`] takes it (later ones are
    /// not kept: one report is enough).
    fill_error: Mutex<Option<Option<HydrateError>>>,
    /// Where the last read ended: a read that starts there is sequential.
    last_end: AtomicU64,
}

impl Hydrated {
    /// The cache of `reader`'s image in `dir` (made if need be), checked
    /// and repaired (see the module's comment on damage).
    pub fn open(reader: Reader, dir: &Path) -> Result<Self, HydrateError> {
        std::fs::create_dir_all(dir).map_err(io_err(dir))?;
        let files = CacheFiles::new(dir, &reader.content_id());
        let open = |path: &Path| {
            OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(path)
                .map_err(io_err(path))
        };
        let (raw, present) = (open(&files.raw)?, open(&files.present)?);
        let cache = Hydrated {
            states: Mutex::new(Vec::new()),
            fill_error: Mutex::new(None),
            last_end: AtomicU64::new(u64::MAX),
            reader,
            files,
            raw,
            present,
        };
        let states = {
            let _lock = cache.lock()?;
            cache.check()?
        };
        *cache.states.lock().unwrap_or_else(|p| p.into_inner()) = states;
        Ok(cache)
    }

    /// The image underneath.
    pub fn reader(&self) -> &Reader {
        &self.reader
    }

    /// The cache's files.
    pub fn files(&self) -> &CacheFiles {
        &self.files
    }

    /// Raw bytes of the image the cache holds now.
    pub fn hydrated_bytes(&self) -> u64 {
        held_bytes(&self.reader, &self.states())
    }

    fn states(&self) -> std::sync::MutexGuard<'_, Vec<u8>> {
        self.states.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes the cache's lock, held until the guard drops.
    fn lock(&self) -> Result<FileLock<'_>, HydrateError> {
        FileLock::exclusive(&self.raw).map_err(io_err(&self.files.raw))
    }

    /// Under the lock: the present states, after starting over a cache of
    /// another image and clearing chunks whose data is not all there.
    fn check(&self) -> Result<Vec<u8>, HydrateError> {
        let raw_size = self.reader.raw_size();
        let raw_err = io_err(&self.files.raw);
        let found =
            read_states(&self.present, &self.reader).map_err(io_err(&self.files.present))?;
        let fresh = found.is_none();
        let mut states = found.unwrap_or_else(|| vec![ABSENT; self.reader.chunk_count() as usize]);
        if fresh {
            // Whatever the raw file held belongs to no valid record.
            self.raw.set_len(0).map_err(io_err(&self.files.raw))?;
        }
        let len = self.raw.metadata().map_err(io_err(&self.files.raw))?.len();
        if len != raw_size {
            // Sized whole and sparse; a truncated file's lost tail becomes a
            // hole, found below.
            self.raw.set_len(raw_size).map_err(raw_err)?;
        }
        let cleared = self.clear_holes(&mut states)?;
        if fresh || cleared {
            let mut bytes = header(&self.reader);
            bytes.extend(&states);
            let present_err = io_err(&self.files.present);
            self.present
                .write_all_at(&bytes, 0)
                .and_then(|()| self.present.set_len(bytes.len() as u64))
                .and_then(|()| self.present.sync_data())
                .map_err(present_err)?;
        }
        Ok(states)
    }

    /// Marks absent every chunk held as data that overlaps a hole of the
    /// raw file; returns whether any was.
    fn clear_holes(&self, states: &mut [u8]) -> Result<bool, HydrateError> {
        let raw_size = self.reader.raw_size();
        let chunk_size = u64::from(self.reader.chunk_size());
        let mut cleared = false;
        let mut at = 0;
        while at < raw_size {
            let hole = seek(&self.raw, at, libc::SEEK_HOLE).map_err(io_err(&self.files.raw))?;
            if hole >= raw_size {
                break;
            }
            let data = seek(&self.raw, hole, libc::SEEK_DATA)
                .map_err(io_err(&self.files.raw))?
                .min(raw_size);
            for n in hole / chunk_size..data.div_ceil(chunk_size) {
                if states[n as usize] == DATA {
                    states[n as usize] = ABSENT;
                    cleared = true;
                }
            }
            at = data;
        }
        Ok(cleared)
    }

    /// Makes sure chunks `chunks` are in the cache: under the lock, those
    /// still absent are decompressed and verified on `workers` threads,
    /// written, made durable, then marked present.
    pub fn fill(&self, chunks: &[u32], workers: usize) -> Result<(), HydrateError> {
        let _lock = self.lock()?;
        let on_disk =
            read_states(&self.present, &self.reader).map_err(io_err(&self.files.present))?;
        let mut states = self.states();
        if let Some(on_disk) = on_disk {
            // Another process may have filled some since this one looked.
            for (mine, theirs) in states.iter_mut().zip(on_disk) {
                if *mine == ABSENT && matches!(theirs, DATA | ZERO) {
                    *mine = theirs;
                }
            }
        }
        let missing: Vec<u32> = chunks
            .iter()
            .copied()
            .filter(|&n| states[n as usize] == ABSENT)
            .collect();
        if missing.is_empty() {
            return Ok(());
        }
        let filled = self.decompress_all(&missing, workers);
        let mut first_error = None;
        let mut changed = Vec::new();
        for (n, result) in missing.iter().zip(filled) {
            match result {
                Ok(state) => changed.push((*n, state)),
                Err(err) => {
                    first_error.get_or_insert(err);
                }
            }
        }
        if changed.iter().any(|&(_, state)| state == DATA) {
            self.raw.sync_data().map_err(io_err(&self.files.raw))?;
        }
        for &(n, state) in &changed {
            states[n as usize] = state;
        }
        if let (Some(lo), Some(hi)) = (
            changed.iter().map(|c| c.0).min(),
            changed.iter().map(|c| c.0).max(),
        ) {
            let (lo, hi) = (lo as usize, hi as usize);
            self.present
                .write_all_at(&states[lo..=hi], (HEADER_LEN + lo) as u64)
                .map_err(io_err(&self.files.present))?;
        }
        first_error.map_or(Ok(()), Err)
    }

    /// Decompresses and writes each chunk of `chunks` on up to `workers`
    /// threads; each chunk's new state or error, in order.
    fn decompress_all(&self, chunks: &[u32], workers: usize) -> Vec<Result<u8, HydrateError>> {
        let workers = workers.clamp(1, chunks.len());
        if workers == 1 {
            return chunks.iter().map(|&n| self.write_chunk(n)).collect();
        }
        let next = AtomicUsize::new(0);
        let results = Mutex::new(Vec::with_capacity(chunks.len()));
        std::thread::scope(|scope| {
            for _ in 0..workers {
                scope.spawn(|| {
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let Some(&n) = chunks.get(i) else { break };
                        let result = self.write_chunk(n);
                        results
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .push((i, result));
                    }
                });
            }
        });
        let mut results = results.into_inner().unwrap_or_else(|p| p.into_inner());
        results.sort_unstable_by_key(|(i, _)| *i);
        results.into_iter().map(|(_, result)| result).collect()
    }

    /// Chunk `n` into the raw file, unless it is all zeros; its new state.
    fn write_chunk(&self, n: u32) -> Result<u8, HydrateError> {
        if self.reader.is_zero_chunk(n) {
            return Ok(ZERO);
        }
        let data = self.reader.chunk(n)?;
        if data.iter().all(|&b| b == 0) {
            return Ok(ZERO);
        }
        let offset = u64::from(n) * u64::from(self.reader.chunk_size());
        self.raw
            .write_all_at(&data, offset)
            .map_err(io_err(&self.files.raw))?;
        Ok(DATA)
    }

    /// Fills the cache with every chunk, `batch` chunks per fill on
    /// `workers` threads, telling `progress` the raw bytes held after each.
    pub fn hydrate_all(
        &self,
        batch: u32,
        workers: usize,
        progress: &mut dyn FnMut(u64),
    ) -> Result<(), HydrateError> {
        let count = self.reader.chunk_count();
        let mut first = 0;
        while first < count {
            let end = first.saturating_add(batch.max(1)).min(count);
            self.fill(&(first..end).collect::<Vec<_>>(), workers)?;
            progress(self.hydrated_bytes());
            first = end;
        }
        Ok(())
    }

    /// Serves the `len` bytes at `offset`: fills the chunks they touch that
    /// are absent (and, for a read that goes on from where the last one
    /// ended, the [`READAHEAD_CHUNKS`] after them), then hands `sink` where
    /// each piece is, in order, so the caller reads them where it wants
    /// them (guest memory) with no copy.
    pub fn read_with<E: From<HydrateError>>(
        &self,
        offset: u64,
        len: usize,
        mut sink: impl FnMut(Piece<'_>) -> Result<(), E>,
    ) -> Result<(), E> {
        let size = self.reader.raw_size();
        let end = offset.checked_add(len as u64).filter(|&end| end <= size);
        let Some(end) = end else {
            return Err(HydrateError::from(ImageError::OutOfRange {
                path: self.reader.path().to_path_buf(),
                offset,
                len,
                size,
            })
            .into());
        };
        if len == 0 {
            return Ok(());
        }
        let chunk_size = u64::from(self.reader.chunk_size());
        let chunks = (offset / chunk_size) as u32..=((end - 1) / chunk_size) as u32;
        let state = |n: u64| self.states()[n as usize];
        let sequential = self.last_end.swap(end, Ordering::Relaxed) == offset;
        if chunks.clone().any(|n| state(n.into()) == ABSENT) {
            let last = *chunks.end();
            let ahead = if sequential {
                last + 1..(last + 1 + READAHEAD_CHUNKS).min(self.reader.chunk_count())
            } else {
                0..0
            };
            let missing: Vec<u32> = chunks
                .chain(ahead)
                .filter(|&n| state(n.into()) == ABSENT)
                .collect();
            match self.fill(&missing, 1) {
                // The cache speeds reads up and must not fail them: what
                // it cannot take (its disk is full, say) is served from
                // memory below.
                Err(err @ HydrateError::Io { .. }) => {
                    self.fill_error
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .get_or_insert(Some(err));
                }
                filled => filled.map_err(E::from)?,
            }
        }
        let mut at = offset;
        while at < end {
            let n = at / chunk_size;
            let kind = state(n);
            let mut run_end = ((n + 1) * chunk_size).min(end);
            if kind == ABSENT {
                let data = self.reader.chunk(n as u32).map_err(HydrateError::from)?;
                let within = (at - n * chunk_size) as usize;
                sink(Piece::Bytes(
                    &data[within..within + (run_end - at) as usize],
                ))?;
                at = run_end;
                continue;
            }
            // A run of chunks in the same state is one piece.
            while run_end < end && state(run_end / chunk_size) == kind {
                run_end = (run_end + chunk_size).min(end);
            }
            let len = (run_end - at) as usize;
            sink(match kind {
                ZERO => Piece::Zero { len },
                _ => Piece::File {
                    path: &self.files.raw,
                    file: &self.raw,
                    offset: at,
                    len,
                },
            })?;
            at = run_end;
        }
        Ok(())
    }

    /// The first failure to fill the cache since the cache was opened,
    /// once: reads went on from memory (see [`Hydrated::read_with`]), and
    /// the caller says so where a person will see it.
    pub fn take_fill_error(&self) -> Option<HydrateError> {
        self.fill_error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_mut()
            .and_then(Option::take)
    }

    /// Fills `buf` with the raw bytes at `offset`, which must lie inside
    /// the image.
    pub fn read_exact_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), HydrateError> {
        let mut done = 0;
        self.read_with(offset, buf.len(), |piece| {
            match piece {
                Piece::File {
                    file, offset, len, ..
                } => {
                    let read = file.read_exact_at(&mut buf[done..done + len], offset);
                    read.map_err(io_err(&self.files.raw))?;
                    done += len;
                }
                Piece::Zero { len } => {
                    buf[done..done + len].fill(0);
                    done += len;
                }
                Piece::Bytes(bytes) => {
                    buf[done..done + bytes.len()].copy_from_slice(bytes);
                    done += bytes.len();
                }
            }
            Ok::<_, HydrateError>(())
        })
    }
}

/// The `.present` header for `reader`'s image.
fn header(reader: &Reader) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(HEADER_LEN + reader.chunk_count() as usize);
    bytes.extend(MAGIC);
    bytes.extend(VERSION.to_le_bytes());
    bytes.extend(reader.chunk_size().to_le_bytes());
    bytes.extend(reader.raw_size().to_le_bytes());
    bytes.extend(reader.chunk_count().to_le_bytes());
    bytes.extend(0u32.to_le_bytes());
    bytes.extend(reader.content_id());
    bytes
}

/// The chunk states `file` holds for `reader`'s image, an unknown state
/// read as absent; `None` when the file is not a whole record of this
/// image (empty, of another image, or short).
fn read_states(file: &File, reader: &Reader) -> io::Result<Option<Vec<u8>>> {
    let expected = header(reader);
    let mut bytes = vec![0u8; HEADER_LEN + reader.chunk_count() as usize];
    match file.read_exact_at(&mut bytes, 0) {
        Err(err) if err.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(err) => return Err(err),
        Ok(()) => {}
    }
    if bytes[..HEADER_LEN] != expected[..] {
        return Ok(None);
    }
    let mut states = bytes.split_off(HEADER_LEN);
    for state in &mut states {
        if !matches!(*state, DATA | ZERO) {
            *state = ABSENT;
        }
    }
    Ok(Some(states))
}

/// lseek(2) with SEEK_HOLE or SEEK_DATA; past the last data, SEEK_DATA's
/// ENXIO is the file's end (`u64::MAX`, clamped by the caller).
fn seek(file: &File, from: u64, whence: libc::c_int) -> io::Result<u64> {
    // SAFETY: lseek only reads its integer arguments; the descriptor is
    // open for the lifetime of `file`.
    let at = unsafe { libc::lseek(file.as_raw_fd(), from as libc::off_t, whence) };
    if at >= 0 {
        return Ok(at as u64);
    }
    match io::Error::last_os_error() {
        err if err.raw_os_error() == Some(libc::ENXIO) => Ok(u64::MAX),
        err => Err(err),
    }
}

/// An exclusive flock(2), released when dropped (or when the process
/// dies: the kernel drops it with the last descriptor of the open file).
struct FileLock<'a>(&'a File);

impl<'a> FileLock<'a> {
    fn exclusive(file: &'a File) -> io::Result<Self> {
        // SAFETY: flock only reads its integer arguments; the descriptor
        // is open for the lifetime of `file`.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(FileLock(file))
    }
}

impl Drop for FileLock<'_> {
    fn drop(&mut self) {
        // SAFETY: as in `exclusive`. Unlocking an flock held by this open
        // file cannot fail but for a bad descriptor, which `File` rules out.
        unsafe { libc::flock(self.0.as_raw_fd(), libc::LOCK_UN) };
    }
}

#[cfg(test)]
mod tests;
