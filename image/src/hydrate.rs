//! The host-wide hydration cache of an image: its chunks decompressed and
//! verified once per host, then read by every VM of the image with a plain
//! `pread`.
//!
//! A cache is two files in the cache directory, named by the image's
//! content id (the SHA-256 of its chunks' places and checksums,
//! [`Reader::content_id`]):
//!
//! ```text
//! <id>.raw      the raw filesystem at its own offsets, sparse: a chunk is
//!               there once hydrated, a hole before
//! <id>.present  header (64 bytes, little endian)
//!                 0  magic       b"KILNHYD\0"
//!                 8  version     u32 = 2
//!                12  reserved    u32 = 0
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
//! Sharing: a filler claims the chunks it fills, in this process (a
//! chunk being filled is marked so, and a thread that needs it waits for
//! it) and host-wide, with an exclusive OFD lock (`fcntl(F_OFD_SETLKW)`)
//! on the chunks' bytes of `<id>.present`, taken in ascending order so
//! that fillers never deadlock. Under the locks it reads those bytes
//! again and decompresses only the chunks still absent, so two processes
//! (VMs, `kiln image hydrate`) never write the same chunk or decompress it
//! twice, and fills of different chunks run in parallel, in one process
//! or many. Opening a cache locks all of `<id>.present` while it checks
//! it. Reads of present chunks take no lock: a chunk's data never changes
//! once its byte says it is there.
//!
//! Readers that write nothing: a process whose writes the image's other
//! VMs must not trust (a jailed VM process, under a uid of its own) opens
//! the cache with [`Hydrated::open_read_only`]. It reads what is there,
//! decompresses what is not in memory, and never writes either file; a
//! trusted process (its supervisor) fills the cache meanwhile.
//!
//! Prefetch: threads that run [`Hydrated::serve_prefetch`] fill queued
//! chunks in the background: the chunks after a sequential read (the
//! readahead window) and any list a caller queues (a boot's working set).
//! A read never waits for chunks beyond the ones it needs; those it needs
//! that a worker is filling it waits for, the others it fills itself,
//! while the workers take the rest of its chunks in parallel.
//!
//! Damage: a chunk is written only after its checksum matched, so a
//! damaged image chunk never enters the cache. Opening a cache checks it
//! under the lock: a `.present` file of another image, size or version
//! starts the cache over; a present byte whose chunk is (partly) a hole in
//! `<id>.raw` (punched, or past the end of a truncated file) is cleared, so
//! the chunk is filled again, never served. Bytes changed inside the data
//! without changing its allocation are not detected: the cache is trusted
//! like the store that holds the image.
use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::{self, IoSlice};
use std::ops::{Range, RangeInclusive};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};

use crate::{ImageError, Reader, SharedChunk, hex};

const MAGIC: [u8; 8] = *b"KILNHYD\0";
/// A decompressed chunk's data; `None` when it is all zeros.
type Chunk = Option<SharedChunk>;
/// 2 since images cut chunks by content (the ids of version 1's images
/// are never seen again).
const VERSION: u32 = 2;
const HEADER_LEN: usize = 64;
/// Chunks a sequential read queues for the prefetch workers beyond the
/// ones it needs: 4 MiB of the default frame size's average chunks
/// ([`crate::ChunkSizes::for_frame`]), so that the workers
/// decompress ahead of a guest streaming a file while it reads what they
/// filled.
const READAHEAD_CHUNKS: u32 = 256;
/// Chunks a prefetch worker fills at once (continued to the end of the
/// last one's frame): one lock and one fdatasync per 512 KiB of
/// average-sized chunks.
const PREFETCH_BATCH: usize = 32;
/// Chunks per fill of [`Hydrated::hydrate_all`] (`kiln image hydrate`):
/// each fill is one fdatasync and one update of `.present`, and VMs
/// filling the same cache wait for at most one fill.
pub const HYDRATE_BATCH: usize = 64;
/// A chunk's state in `.present`.
const ABSENT: u8 = 0;
const DATA: u8 = 1;
const ZERO: u8 = 2;
/// A chunk's state in this process only, never on disk: a thread of this
/// process is filling it, and others that need it wait
/// ([`Hydrated::wait_filled`]).
const FILLING: u8 = 3;

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

/// Threads to fill a cache with on this host: two per core, because each
/// waits for its fill's write and fdatasync while the other decompresses.
pub fn fillers() -> usize {
    2 * std::thread::available_parallelism().map_or(1, usize::from)
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
    /// Signalled when chunks stop being [`FILLING`].
    filled: Condvar,
    /// Whether this process fills the cache; if not, it only reads what
    /// the filler wrote ([`Hydrated::open_read_only`]).
    fills: bool,
    /// The chunks the prefetch workers are to fill.
    queue: Mutex<Queue>,
    /// Signalled when chunks are queued or the workers are told to stop.
    queued: Condvar,
    /// `None` until a fill fails for want of the cache's files; then the
    /// error, until [`Hydrated::take_fill_error`] takes it (later ones are
    /// not kept: one report is enough).
    fill_error: Mutex<Option<Option<HydrateError>>>,
    /// Where the last read ended: a read that starts there is sequential.
    last_end: AtomicU64,
    /// The chunk after the last one the readahead queued.
    ahead_end: AtomicU32,
}

/// The chunks queued for the prefetch workers ([`Hydrated::serve_prefetch`]).
#[derive(Debug, Default)]
struct Queue {
    /// Most urgent first: a read's own chunks, its readahead, then lists
    /// such as a boot's working set.
    chunks: VecDeque<u32>,
    /// Threads serving the queue; with none, reads queue nothing.
    workers: usize,
    /// Set by [`Hydrated::stop_prefetch`]: the workers return.
    stopped: bool,
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
        let cache = Hydrated::new(reader, files, (raw, present), true);
        let states = {
            // All of `.present`: no fill runs while the cache is checked.
            let _lock = RecordLocks::take(&cache.present, [(0, 0)])
                .map_err(io_err(&cache.files.present))?;
            cache.check()?
        };
        *cache.states() = states;
        Ok(cache)
    }

    /// The cache of `reader`'s image in `dir` for a process that only
    /// reads it: one whose writes the image's other VMs must not trust (a
    /// jailed VM process, whose cache another, trusted, process fills:
    /// `kiln_vmm::volume::background`). Its files must exist, opened by
    /// that filler first. A chunk they do not hold is decompressed in
    /// memory, and every read that needs one looks again whether the
    /// filler has written it since. A chunk whose byte says data over a
    /// hole of the raw file is never served, as with [`Hydrated::open`];
    /// but nothing is repaired.
    pub fn open_read_only(reader: Reader, dir: &Path) -> Result<Self, HydrateError> {
        let files = CacheFiles::new(dir, &reader.content_id());
        let open = |path: &Path| File::open(path).map_err(io_err(path));
        let (raw, present) = (open(&files.raw)?, open(&files.present)?);
        let cache = Hydrated::new(reader, files, (raw, present), false);
        let found =
            read_states(&cache.present, &cache.reader).map_err(io_err(&cache.files.present))?;
        let mut states = found.unwrap_or_else(|| vec![ABSENT; cache.reader.chunk_count() as usize]);
        cache.clear_holes(&mut states)?;
        *cache.states() = states;
        Ok(cache)
    }

    /// A cache whose chunks are all absent until their states are read.
    fn new(reader: Reader, files: CacheFiles, (raw, present): (File, File), fills: bool) -> Self {
        Hydrated {
            states: Mutex::new(Vec::new()),
            filled: Condvar::new(),
            fills,
            queue: Mutex::new(Queue::default()),
            queued: Condvar::new(),
            fill_error: Mutex::new(None),
            last_end: AtomicU64::new(u64::MAX),
            ahead_end: AtomicU32::new(0),
            reader,
            files,
            raw,
            present,
        }
    }

    /// Whether this process fills the cache (else it only reads it).
    pub fn fills(&self) -> bool {
        self.fills
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

    fn states(&self) -> MutexGuard<'_, Vec<u8>> {
        self.states.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn queue(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
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
            for n in self.reader.chunks_of(hole, data - hole) {
                if states[n as usize] == DATA {
                    states[n as usize] = ABSENT;
                    cleared = true;
                }
            }
            at = data;
        }
        Ok(cleared)
    }

    /// Makes sure chunks `chunks` are in the cache: those still absent
    /// are claimed, decompressed and verified, written, made durable, then
    /// marked present; those another thread of this process is filling are
    /// waited for.
    pub fn fill(&self, chunks: &[u32]) -> Result<(), HydrateError> {
        let filled = self.fill_claimed(&self.claim(chunks));
        self.wait_filled(chunks);
        filled
    }

    /// Marks [`FILLING`] the chunks of `chunks` this process holds as
    /// absent, and returns them, ascending: this thread fills them.
    fn claim(&self, chunks: &[u32]) -> Vec<u32> {
        let mut states = self.states();
        let mut claimed: Vec<u32> = chunks
            .iter()
            .copied()
            .filter(|&n| states[n as usize] == ABSENT)
            .collect();
        claimed.sort_unstable();
        claimed.dedup();
        for &n in &claimed {
            states[n as usize] = FILLING;
        }
        claimed
    }

    /// Waits until no chunk of `chunks` is being filled by another thread.
    fn wait_filled(&self, chunks: &[u32]) {
        let mut states = self.states();
        while chunks.iter().any(|&n| states[n as usize] == FILLING) {
            states = self.filled.wait(states).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Fills the chunks `claimed` (ascending, claimed by this thread) and
    /// gives up the claim on each, whether it is in the cache then or not.
    fn fill_claimed(&self, claimed: &[u32]) -> Result<(), HydrateError> {
        if claimed.is_empty() {
            return Ok(());
        }
        let mut settled = vec![ABSENT; claimed.len()];
        let filled = if self.fills {
            self.fill_locked(claimed, &mut settled)
        } else {
            self.look_again(claimed, &mut settled)
        };
        let mut states = self.states();
        for (&n, &state) in claimed.iter().zip(&settled) {
            states[n as usize] = state;
        }
        drop(states);
        self.filled.notify_all();
        filled
    }

    /// Under the host-wide locks of the chunks `claimed`: each is found
    /// filled by another process, or decompressed, written, made durable
    /// and only then marked present; `settled` gets their states.
    fn fill_locked(&self, claimed: &[u32], settled: &mut [u8]) -> Result<(), HydrateError> {
        let present_err = || io_err(&self.files.present);
        let ranges = runs(claimed).map(|run| {
            let first = HEADER_LEN as u64 + u64::from(claimed[run.start]);
            (first, run.len() as u64)
        });
        let _locks = RecordLocks::take(&self.present, ranges).map_err(present_err())?;
        let on_disk = read_states(&self.present, &self.reader).map_err(present_err())?;
        let mut missing = Vec::new();
        for (i, &n) in claimed.iter().enumerate() {
            match on_disk.as_ref().map(|states| states[n as usize]) {
                Some(state @ (DATA | ZERO)) => settled[i] = state,
                _ => missing.push(n),
            }
        }
        let mut first_error = None;
        let mut decompressed = Vec::new();
        for &n in &missing {
            match self.chunk_data(n) {
                Ok(data) => decompressed.push((n, data)),
                Err(err) => {
                    first_error.get_or_insert(err);
                }
            }
        }
        let new = self.write_runs(decompressed, &mut first_error);
        if new.iter().any(|&(_, state)| state == DATA) {
            self.raw.sync_data().map_err(io_err(&self.files.raw))?;
        }
        let chunks: Vec<u32> = new.iter().map(|&(n, _)| n).collect();
        for run in runs(&chunks) {
            let bytes: Vec<u8> = new[run.clone()].iter().map(|&(_, state)| state).collect();
            let at = HEADER_LEN as u64 + u64::from(chunks[run.start]);
            self.present
                .write_all_at(&bytes, at)
                .map_err(present_err())?;
        }
        for (n, state) in new {
            let i = claimed.binary_search(&n).expect("a claimed chunk");
            settled[i] = state;
        }
        first_error.map_or(Ok(()), Err)
    }

    /// For a process that only reads the cache: which chunks of `claimed`
    /// (ascending) the filler has written since this process last looked;
    /// `settled` gets their states. No lock is needed: a chunk's byte is
    /// written once its data is durable, and never changes after.
    fn look_again(&self, claimed: &[u32], settled: &mut [u8]) -> Result<(), HydrateError> {
        for run in runs(claimed) {
            let mut bytes = vec![ABSENT; run.len()];
            let at = HEADER_LEN as u64 + u64::from(claimed[run.start]);
            self.present
                .read_exact_at(&mut bytes, at)
                .map_err(io_err(&self.files.present))?;
            for (state, byte) in settled[run].iter_mut().zip(bytes) {
                if matches!(byte, DATA | ZERO) {
                    *state = byte;
                }
            }
        }
        Ok(())
    }

    /// Chunk `n`'s data, unless it is all zeros.
    fn chunk_data(&self, n: u32) -> Result<Chunk, HydrateError> {
        if self.reader.is_zero_chunk(n) {
            return Ok(None);
        }
        let data = self.reader.shared_chunk(n)?;
        Ok(data.iter().any(|&b| b != 0).then_some(data))
    }

    /// Writes the data of `decompressed` (ascending chunks) into the raw
    /// file, each run of adjacent chunks with one `pwritev` straight from
    /// the decompressed frames: the page cache then holds it in large
    /// folios, which later reads copy out about 1.6 times faster than the
    /// small ones that one write per chunk (16 KiB on average) makes
    /// (measured on this host's ext4, kernel 6.18).
    /// Each chunk's new state, in order, but those of a run that could not
    /// be written, whose error goes to `first_error`.
    fn write_runs(
        &self,
        decompressed: Vec<(u32, Chunk)>,
        first_error: &mut Option<HydrateError>,
    ) -> Vec<(u32, u8)> {
        let mut new = Vec::with_capacity(decompressed.len());
        let mut data = Vec::new();
        for (n, chunk) in decompressed {
            match chunk {
                Some(bytes) => data.push((n, bytes)),
                None => new.push((n, ZERO)),
            }
        }
        let chunks: Vec<u32> = data.iter().map(|&(n, _)| n).collect();
        for run in runs(&chunks) {
            let mut slices: Vec<IoSlice<'_>> = data[run.clone()]
                .iter()
                .map(|(_, b)| IoSlice::new(b))
                .collect();
            let at = self.reader.chunk_offset(chunks[run.start]);
            match write_all_vectored_at(&self.raw, &mut slices, at) {
                Ok(()) => new.extend(chunks[run].iter().map(|&n| (n, DATA))),
                Err(err) => {
                    first_error.get_or_insert(io_err(&self.files.raw)(err));
                }
            }
        }
        new.sort_unstable_by_key(|&(n, _)| n);
        new
    }

    /// Fills the cache with every chunk on `workers` threads, each filling
    /// `batch` chunks at a time (rounded up to a frame's end), and tells
    /// `progress` the raw bytes held after each fill. Whole fills run in
    /// parallel, not the chunks of one: a filler waits for its write and
    /// fdatasync while the others decompress.
    pub fn hydrate_all(
        &self,
        batch: usize,
        workers: usize,
        progress: &mut dyn FnMut(u64),
    ) -> Result<(), HydrateError> {
        let batches = self.batches(0..self.reader.chunk_count(), batch);
        let next = AtomicUsize::new(0);
        let (done, fills) = std::sync::mpsc::channel();
        std::thread::scope(|scope| {
            for _ in 0..workers.max(1) {
                let (done, next, batches) = (done.clone(), &next, &batches);
                scope.spawn(move || {
                    while let Some(chunks) = batches.get(next.fetch_add(1, Ordering::Relaxed)) {
                        if done.send(self.fill(chunks)).is_err() {
                            break;
                        }
                    }
                });
            }
            drop(done);
            let mut first_error = None;
            for filled in fills {
                match filled {
                    Ok(()) => progress(self.hydrated_bytes()),
                    Err(err) => {
                        // No filler takes another batch.
                        next.store(batches.len(), Ordering::Relaxed);
                        first_error.get_or_insert(err);
                    }
                }
            }
            first_error.map_or(Ok(()), Err)
        })
    }

    /// Fills every chunk on the calling thread, [`HYDRATE_BATCH`] at a
    /// time: those of `first` (a boot's working set, say) first, then the
    /// rest in order; stops at the first error. For a filler that makes no
    /// threads (one under a seccomp filter).
    pub fn hydrate_all_here(&self, first: &[u32]) -> Result<(), HydrateError> {
        let count = self.reader.chunk_count();
        let first: Vec<u32> = first.iter().copied().filter(|&n| n < count).collect();
        let rest = self.batches(0..count, HYDRATE_BATCH);
        for batch in first
            .chunks(HYDRATE_BATCH)
            .chain(rest.iter().map(Vec::as_slice))
        {
            self.fill(batch)?;
        }
        Ok(())
    }

    /// `chunks` cut into batches of `size` chunks, each one continued to
    /// the end of its last chunk's frame, so that no two fillers
    /// decompress the same frame.
    fn batches(&self, chunks: Range<u32>, size: usize) -> Vec<Vec<u32>> {
        let mut batches: Vec<Vec<u32>> = Vec::new();
        for n in chunks {
            match batches.last_mut() {
                Some(batch) if batch.len() < size || self.in_last_frame(batch, n) => batch.push(n),
                _ => batches.push(vec![n]),
            }
        }
        batches
    }

    /// Whether chunk `n` lies in the frame of `batch`'s last chunk.
    fn in_last_frame(&self, batch: &[u32], n: u32) -> bool {
        batch
            .last()
            .is_some_and(|&last| self.reader.same_frame(last, n))
    }

    /// Serves the `len` bytes at `offset`: fills the chunks they touch that
    /// are absent (and, for a read that goes on from where the last one
    /// ended, queues the [`READAHEAD_CHUNKS`] after them for the prefetch
    /// workers), then hands `sink` where each piece is, in order, so the
    /// caller reads them where it wants them (guest memory) with no copy.
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
        let chunks = self.reader.chunks_of(offset, len as u64);
        if self.last_end.swap(end, Ordering::Relaxed) == offset {
            self.read_ahead(*chunks.end());
        }
        self.fill_needed(chunks).map_err(E::from)?;
        let state = |n: u32| self.states()[n as usize];
        let chunk_end = |n: u32| self.reader.chunk_offset(n) + self.reader.chunk_len(n) as u64;
        let mut at = offset;
        while at < end {
            let mut n = self.reader.chunk_at(at);
            let kind = state(n);
            let mut run_end = chunk_end(n).min(end);
            if !matches!(kind, DATA | ZERO) {
                let data = self.reader.shared_chunk(n).map_err(HydrateError::from)?;
                let within = (at - self.reader.chunk_offset(n)) as usize;
                sink(Piece::Bytes(
                    &data[within..within + (run_end - at) as usize],
                ))?;
                at = run_end;
                continue;
            }
            // A run of chunks in the same state is one piece.
            while run_end < end && state(n + 1) == kind {
                n += 1;
                run_end = chunk_end(n).min(end);
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

    /// Makes sure the chunks `needed` are in the cache, or known not to
    /// fit: this thread fills the first absent one while the others are
    /// queued first for the prefetch workers, then, in one fill, those no
    /// worker took meanwhile, then waits for the workers' ones. A chunk the
    /// cache cannot take is left absent (and served from memory), the
    /// cache's error kept for [`Hydrated::take_fill_error`].
    fn fill_needed(&self, needed: RangeInclusive<u32>) -> Result<(), HydrateError> {
        let absent: Vec<u32> = {
            let states = self.states();
            needed.filter(|&n| states[n as usize] == ABSENT).collect()
        };
        if absent.is_empty() {
            // The warm path: nothing to claim, queue or wait for.
            return Ok(());
        }
        let (first, rest) = absent.split_at(absent.len().min(1));
        self.queue_first(rest.iter().copied());
        for part in [first, rest] {
            match self.fill_claimed(&self.claim(part)) {
                Err(err @ HydrateError::Io { .. }) => self.keep_fill_error(err),
                filled => filled?,
            }
        }
        self.wait_filled(&absent);
        Ok(())
    }

    /// Queues for the workers the [`READAHEAD_CHUNKS`] after chunk `last`
    /// of a sequential read, but those an earlier read of the same stream
    /// queued already.
    fn read_ahead(&self, last: u32) {
        let end = last
            .saturating_add(1 + READAHEAD_CHUNKS)
            .min(self.reader.chunk_count());
        let window = last + 1..end;
        let queued = self.ahead_end.swap(end, Ordering::Relaxed);
        let from = if window.contains(&queued) {
            queued
        } else {
            window.start
        };
        self.queue_first(from..end);
    }

    /// Queues `chunks` ahead of everything queued, in their order; nothing
    /// when no worker serves the queue (nor a wakeup when there are none).
    fn queue_first(&self, chunks: impl DoubleEndedIterator<Item = u32>) {
        let mut chunks = chunks.rev().peekable();
        if chunks.peek().is_none() {
            return;
        }
        let mut queue = self.queue();
        if queue.workers == 0 {
            return;
        }
        for n in chunks {
            queue.chunks.push_front(n);
        }
        // Chunks queued twice (a read's readahead, then the boot's list)
        // are skipped when taken; the queue never needs more than one
        // entry per chunk.
        queue.chunks.truncate(self.reader.chunk_count() as usize);
        drop(queue);
        self.queued.notify_all();
    }

    /// Queues `chunks` (those that exist) for the prefetch workers, after
    /// the chunks queued already: a list the image's readers are expected
    /// to need, such as the chunks its first boot read.
    pub fn prefetch(&self, chunks: impl IntoIterator<Item = u32>) {
        let count = self.reader.chunk_count();
        let mut queue = self.queue();
        queue
            .chunks
            .extend(chunks.into_iter().filter(|&n| n < count));
        drop(queue);
        self.queued.notify_all();
    }

    /// Fills queued chunks on the calling thread, about [`PREFETCH_BATCH`]
    /// at a time, until [`Hydrated::stop_prefetch`]. A chunk the cache
    /// cannot take is reported as a read's would be
    /// ([`Hydrated::take_fill_error`]); a damaged one is left absent, for
    /// the read that needs it to fail on. Its system calls are a fill's:
    /// futex, pread64, pwritev, pwrite64, fdatasync, and fcntl's OFD
    /// locks.
    pub fn serve_prefetch(&self) {
        self.queue().workers += 1;
        while let Some(batch) = self.next_batch() {
            if let Err(err @ HydrateError::Io { .. }) = self.fill_claimed(&batch) {
                self.keep_fill_error(err);
            }
        }
        self.queue().workers -= 1;
    }

    /// Waits for queued chunks and claims up to [`PREFETCH_BATCH`] of
    /// them, and those after them in the last one's frame (which another
    /// worker would decompress again), skipping those present or being
    /// filled; `None` once stopped.
    fn next_batch(&self) -> Option<Vec<u32>> {
        let mut queue = self.queue();
        loop {
            if queue.stopped {
                return None;
            }
            let mut batch = Vec::with_capacity(PREFETCH_BATCH);
            while let Some(&n) = queue.chunks.front()
                && (batch.len() < PREFETCH_BATCH || self.in_last_frame(&batch, n))
            {
                queue.chunks.pop_front();
                batch.extend(self.claim(&[n]));
            }
            if !batch.is_empty() {
                batch.sort_unstable();
                return Some(batch);
            }
            queue = self.queued.wait(queue).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Makes every [`Hydrated::serve_prefetch`] return once its current
    /// batch is filled; the chunks still queued are dropped.
    pub fn stop_prefetch(&self) {
        let mut queue = self.queue();
        queue.stopped = true;
        queue.chunks.clear();
        drop(queue);
        self.queued.notify_all();
    }

    /// Keeps `err`, a failure to fill the cache, unless one was kept (or
    /// taken) before.
    fn keep_fill_error(&self, err: HydrateError) {
        self.fill_error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_or_insert(Some(err));
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
    bytes.extend(0u32.to_le_bytes());
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

/// All of `slices` written to `file` at `offset`, with as few pwritev(2)
/// calls as the kernel allows (std's `write_all_at` takes one buffer, and
/// has no vectored form).
fn write_all_vectored_at(
    file: &File,
    mut slices: &mut [IoSlice<'_>],
    mut offset: u64,
) -> io::Result<()> {
    while !slices.is_empty() {
        // More than UIO_MAXIOV buffers fail with EINVAL.
        let at_most = slices.len().min(libc::UIO_MAXIOV as usize);
        match rustix::io::pwritev(file, &slices[..at_most], offset) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(written) => {
                offset += written as u64;
                IoSlice::advance_slices(&mut slices, written);
            }
            Err(rustix::io::Errno::INTR) => {}
            Err(err) => return Err(err.into()),
        }
    }
    Ok(())
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

/// The index ranges of the runs of consecutive numbers in `sorted`.
fn runs(sorted: &[u32]) -> impl Iterator<Item = Range<usize>> + '_ {
    let mut start = 0;
    std::iter::from_fn(move || {
        if start == sorted.len() {
            return None;
        }
        let mut end = start + 1;
        while end < sorted.len() && sorted[end] == sorted[end - 1] + 1 {
            end += 1;
        }
        let run = start..end;
        start = end;
        Some(run)
    })
}

/// Exclusive OFD record locks (fcntl(2) `F_OFD_SETLKW`) on byte ranges of
/// a file, released when dropped, or by the kernel with the last
/// descriptor of the open file (the process dies). They belong to the
/// open file: other open files of it, in this process or another,
/// conflict; threads sharing this one do not (they claim chunks in memory
/// first).
struct RecordLocks<'a> {
    file: &'a File,
    /// (start, length) of each range held; a length of 0 is to the end.
    ranges: Vec<(u64, u64)>,
}

impl<'a> RecordLocks<'a> {
    /// Locks each range in turn, waiting for each: callers give them in
    /// ascending order, so that no two lockers wait for each other.
    fn take(file: &'a File, ranges: impl IntoIterator<Item = (u64, u64)>) -> io::Result<Self> {
        let mut locks = RecordLocks {
            file,
            ranges: Vec::new(),
        };
        for (start, len) in ranges {
            record_lock(file, libc::F_OFD_SETLKW, libc::F_WRLCK, start, len)?;
            locks.ranges.push((start, len));
        }
        Ok(locks)
    }
}

impl Drop for RecordLocks<'_> {
    fn drop(&mut self) {
        for &(start, len) in &self.ranges {
            // Unlocking a range this open file holds cannot fail but for a
            // bad descriptor, which `File` rules out.
            let _ = record_lock(self.file, libc::F_OFD_SETLK, libc::F_UNLCK, start, len);
        }
    }
}

/// One fcntl(2) OFD lock command `cmd` of type `kind` on `len` bytes of
/// `file` at `start`, retried when a signal interrupts a wait.
fn record_lock(
    file: &File,
    cmd: libc::c_int,
    kind: libc::c_int,
    start: u64,
    len: u64,
) -> io::Result<()> {
    // SAFETY: struct flock is plain integers, for which zero is valid; an
    // OFD lock needs l_pid 0.
    let mut lock: libc::flock = unsafe { std::mem::zeroed() };
    lock.l_type = kind as libc::c_short;
    lock.l_whence = libc::SEEK_SET as libc::c_short;
    lock.l_start = start as libc::off_t;
    lock.l_len = len as libc::off_t;
    loop {
        // SAFETY: fcntl reads `lock`, a valid struct flock that outlives
        // the call; the descriptor is open for the lifetime of `file`.
        if unsafe { libc::fcntl(file.as_raw_fd(), cmd, &mut lock) } == 0 {
            return Ok(());
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}

#[cfg(test)]
mod tests;
