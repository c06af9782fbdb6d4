//! Volumes: a compressed Kiln image served as a disk, with an optional
//! copy-on-write [`Overlay`] that takes the writes.
//!
//! Reads prefer the overlay and fall back to the image, whose chunks are
//! decompressed on demand and verified against the image's index, then
//! kept either in the image's host-wide hydration cache
//! ([`kiln_image::hydrate`], shared by every VM of the image) or, without
//! one, in a bounded LRU cache of this process. The image file is never
//! written: any number of volumes share one image.
//!
//! A volume with a hydration cache may start prefetch workers
//! ([`Volume::start_prefetch`]) that fill the cache in the background:
//! the readahead of sequential reads, and the image's boot working set
//! ([`working_set`]), which the first such volume of an image records.
//! A jailed VM's volume only reads the cache ([`CacheAccess::Read`]): the
//! process that started it fills it ([`background`]).
pub mod background;
mod overlay;
mod prefetch;
pub mod working_set;

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use kiln_image::hydrate::{HydrateError, Hydrated};
use kiln_image::{CachedReader, ImageError, Reader};

pub use overlay::{BLOCK_SIZE, Overlay, OverlayError};
use prefetch::Prefetchers;
use working_set::Recorder;

/// Bytes a volume moves per step when it copies itself out.
const FLATTEN_STEP: usize = 1 << 20;

/// What can go wrong with a volume.
#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    /// The base image cannot be opened or a chunk of it read.
    #[error(transparent)]
    Image(#[from] ImageError),
    /// The image's hydration cache cannot be opened, read or filled.
    #[error(transparent)]
    Cache(#[from] HydrateError),
    /// The overlay cannot be created, opened, read or written.
    #[error(transparent)]
    Overlay(#[from] OverlayError),
    /// The overlay was made for a volume of another size.
    #[error(
        "{overlay}: the overlay is for a {found}-byte volume, the image holds {expected} bytes"
    )]
    Capacity {
        /// The overlay file.
        overlay: PathBuf,
        /// The image's size in bytes.
        expected: u64,
        /// The size the overlay's header records.
        found: u64,
    },
    /// A write or discard reached a volume opened without an overlay.
    #[error("the volume has no overlay: it is read-only")]
    ReadOnly,
    /// An access runs past the end of the volume.
    #[error("{len} bytes at {offset} are outside the {capacity}-byte volume")]
    OutOfRange {
        /// The access's first byte.
        offset: u64,
        /// Its length in bytes.
        len: u64,
        /// The volume's size in bytes.
        capacity: u64,
    },
    /// Reading the overlay's or the hydration cache's bytes failed.
    #[error("cannot read {path} at offset {offset}")]
    Read {
        /// The overlay or the hydration cache file.
        path: PathBuf,
        /// Where in the file the read started.
        offset: u64,
        /// What the system said.
        #[source]
        source: std::io::Error,
    },
    /// Writing the flattened volume to its destination failed.
    #[error("cannot write the flattened volume")]
    Output(#[source] std::io::Error),
    /// A prefetch worker's thread could not be made.
    #[error("cannot start the hydration cache's prefetch workers for {image}")]
    Prefetch {
        /// The volume's image.
        image: PathBuf,
        /// What the system said.
        #[source]
        source: std::io::Error,
    },
}

/// What a volume's process does with its image's hydration cache.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CacheAccess {
    /// Fills it, as its reads need and in the background, and records the
    /// image's boot working set: a process every VM of the image trusts.
    #[default]
    Fill,
    /// Reads what is there and decompresses the rest in memory, writing
    /// nothing: a jailed VM process, whose writes the image's other VMs
    /// must not trust; the process that started it fills the cache
    /// ([`background`]).
    Read,
}

/// Where a piece of a read is (see [`Volume::read_with`]): the overlay,
/// the image's hydration cache, zeros, or a chunk in memory.
pub use kiln_image::hydrate::Piece;

/// Where the image's decompressed chunks are kept.
#[derive(Debug)]
enum Base {
    /// In this process's bounded LRU cache.
    Memory(Box<CachedReader>),
    /// In the host-wide hydration cache, shared with the volume's prefetch
    /// workers.
    Host(Arc<Hydrated>),
}

impl Base {
    fn reader(&self) -> &Reader {
        match self {
            Base::Memory(cached) => cached.reader(),
            Base::Host(hydrated) => hydrated.reader(),
        }
    }

    fn read_exact_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), VolumeError> {
        match self {
            Base::Memory(cached) => Ok(cached.read_exact_at(offset, buf)?),
            Base::Host(hydrated) => Ok(hydrated.read_exact_at(offset, buf)?),
        }
    }

    /// The image's `len` bytes at `offset`, piece by piece, to `sink`.
    fn read_with<E: From<VolumeError>>(
        &self,
        offset: u64,
        len: usize,
        sink: &mut impl FnMut(Piece<'_>) -> Result<(), E>,
    ) -> Result<(), E> {
        match self {
            Base::Memory(cached) => {
                let reader = cached.reader();
                let (mut at, end) = (offset, offset + len as u64);
                while at < end {
                    let n = reader.chunk_at(at);
                    let chunk = cached.chunk(n).map_err(VolumeError::from)?;
                    let within = (at - reader.chunk_offset(n)) as usize;
                    let n = (chunk.len() - within).min((end - at) as usize);
                    sink(Piece::Bytes(&chunk[within..within + n]))?;
                    at += n as u64;
                }
                Ok(())
            }
            Base::Host(hydrated) => {
                let read = hydrated
                    .read_with(offset, len, |piece| sink(piece).map_err(Sunk))
                    .map_err(|Sunk(err)| err);
                if let Some(err) = hydrated.take_fill_error() {
                    log::warn!(
                        "{}: reading the image's chunks from memory instead",
                        crate::report::one_line(&err)
                    );
                }
                read
            }
        }
    }
}

/// A sink's error, or a hydration cache's made into one: the error type
/// [`Hydrated::read_with`] needs.
struct Sunk<E>(E);

impl<E: From<VolumeError>> From<HydrateError> for Sunk<E> {
    fn from(err: HydrateError) -> Self {
        Sunk(E::from(err.into()))
    }
}

/// A disk made of an image and, when writable, an overlay.
#[derive(Debug)]
pub struct Volume {
    base: Base,
    overlay: Option<Overlay>,
    /// The workers filling the hydration cache, once started.
    prefetchers: Option<Prefetchers>,
    /// The image's chunks this volume read, when it is the first to
    /// record the image's boot working set.
    recorder: Mutex<Option<Recorder>>,
}

impl Volume {
    /// The image at `image`, with the existing overlay at `overlay` (or
    /// read-only without one); `cache_bytes` bounds the decompressed
    /// chunks kept in memory.
    pub fn open(
        image: &Path,
        overlay: Option<&Path>,
        cache_bytes: u64,
    ) -> Result<Self, VolumeError> {
        Self::open_on(image, overlay, |reader| {
            Ok(Base::Memory(Box::new(CachedReader::new(
                reader,
                cache_bytes,
            ))))
        })
    }

    /// Like [`Volume::open`], with the image's chunks kept in its
    /// host-wide hydration cache in `cache_dir` (made if need be, when
    /// `access` fills it), which every volume of the image on this host
    /// shares. A cache that cannot be opened (a read-only or full disk, or
    /// one not made yet that this volume may only read) is worked around,
    /// with a warning: the chunks are then kept in memory, `cache_bytes`
    /// of them.
    pub fn open_hydrated(
        image: &Path,
        overlay: Option<&Path>,
        (cache_dir, access): (&Path, CacheAccess),
        cache_bytes: u64,
    ) -> Result<Self, VolumeError> {
        Self::open_on(image, overlay, |reader| {
            let path = reader.path().to_path_buf();
            let opened = match access {
                CacheAccess::Fill => Hydrated::open(reader, cache_dir),
                CacheAccess::Read => Hydrated::open_read_only(reader, cache_dir),
            };
            match opened {
                Ok(hydrated) => Ok(Base::Host(Arc::new(hydrated))),
                Err(err @ HydrateError::Io { .. }) => {
                    log::warn!(
                        "{}: reading the image's chunks from memory instead",
                        crate::report::one_line(&err)
                    );
                    let reader = Reader::open(&path)?;
                    Ok(Base::Memory(Box::new(CachedReader::new(
                        reader,
                        cache_bytes,
                    ))))
                }
                Err(err) => Err(err.into()),
            }
        })
    }

    fn open_on(
        image: &Path,
        overlay: Option<&Path>,
        base: impl FnOnce(Reader) -> Result<Base, VolumeError>,
    ) -> Result<Self, VolumeError> {
        let reader = Reader::open(image)?;
        let overlay = overlay
            .map(|path| Overlay::open(path, reader.content_id()))
            .transpose()?;
        Self::assemble(base(reader)?, overlay)
    }

    /// The image at `image` with a new, empty overlay at `overlay`.
    pub fn create(image: &Path, overlay: &Path, cache_bytes: u64) -> Result<Self, VolumeError> {
        let reader = Reader::open(image)?;
        let overlay = Overlay::create(overlay, reader.raw_size(), reader.content_id())?;
        Self::assemble(
            Base::Memory(Box::new(CachedReader::new(reader, cache_bytes))),
            Some(overlay),
        )
    }

    fn assemble(base: Base, overlay: Option<Overlay>) -> Result<Self, VolumeError> {
        let raw_size = base.reader().raw_size();
        if let Some(overlay) = &overlay
            && overlay.capacity() != raw_size
        {
            return Err(VolumeError::Capacity {
                overlay: overlay.path().to_path_buf(),
                expected: raw_size,
                found: overlay.capacity(),
            });
        }
        Ok(Volume {
            base,
            overlay,
            prefetchers: None,
            recorder: Mutex::new(None),
        })
    }

    /// Starts the workers that fill the hydration cache in the background
    /// (each under its seccomp filter first when `seccomp`), so that
    /// sequential reads are read ahead. With `working_set` (see
    /// [`working_set::path`]), the record there is queued for them, or,
    /// when there is none (or a bad one, which is logged), this volume's
    /// reads of the image are recorded there, written when it goes.
    /// Nothing for a volume without a hydration cache or one it only reads.
    pub fn start_prefetch(
        &mut self,
        seccomp: bool,
        working_set: Option<&Path>,
    ) -> Result<(), VolumeError> {
        let Base::Host(cache) = &self.base else {
            return Ok(());
        };
        if !cache.fills() {
            // Its filler is another process's thread.
            return Ok(());
        }
        let reader = cache.reader();
        let (id, count) = (reader.content_id(), reader.chunk_count());
        if let Some(path) = working_set {
            match working_set::read(path, &id, count) {
                Ok(Some(chunks)) => cache.prefetch(chunks),
                found => {
                    if let Err(err) = found {
                        log::warn!("{}: recording it again", crate::report::one_line(&err));
                    }
                    let recorder = Recorder::new(path.to_path_buf(), id, count);
                    *self.recorder.get_mut().unwrap_or_else(|p| p.into_inner()) = Some(recorder);
                }
            }
        }
        let workers =
            Prefetchers::start(cache.clone(), seccomp).map_err(|source| VolumeError::Prefetch {
                image: reader.path().to_path_buf(),
                source,
            })?;
        self.prefetchers = Some(workers);
        Ok(())
    }

    /// Notes in the working set being recorded, if any, that a read of
    /// `len` bytes at `offset` reached the image.
    fn record(&self, offset: u64, len: usize) {
        let mut recorder = self.recorder.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(recorder) = recorder.as_mut() {
            recorder.record(self.base.reader().chunks_of(offset, len as u64));
        }
    }

    /// Size in bytes.
    pub fn capacity(&self) -> u64 {
        self.base.reader().raw_size()
    }

    /// Whether the volume takes writes (it has an overlay).
    pub fn writable(&self) -> bool {
        self.overlay.is_some()
    }

    /// The image file underneath.
    pub fn image_path(&self) -> &Path {
        self.base.reader().path()
    }

    fn held(&self, block: u64) -> bool {
        self.overlay.as_ref().is_some_and(|o| o.holds(block))
    }

    fn check_range(&self, offset: u64, len: usize) -> Result<(), VolumeError> {
        let end = offset.checked_add(len as u64);
        if end.is_none_or(|end| end > self.capacity()) {
            return Err(VolumeError::OutOfRange {
                offset,
                len: len as u64,
                capacity: self.capacity(),
            });
        }
        Ok(())
    }

    /// Fills `buf` from `offset`: each run of blocks from wherever it
    /// lives now, the overlay or the image.
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), VolumeError> {
        let mut done = 0;
        self.read_with(offset, buf.len(), &mut |piece| {
            let len = match piece {
                Piece::File {
                    path,
                    file,
                    offset,
                    len,
                } => {
                    read_file(path, file, offset, &mut buf[done..done + len])?;
                    len
                }
                Piece::Zero { len } => {
                    buf[done..done + len].fill(0);
                    len
                }
                Piece::Bytes(bytes) => {
                    buf[done..done + bytes.len()].copy_from_slice(bytes);
                    bytes.len()
                }
            };
            done += len;
            Ok::<_, VolumeError>(())
        })
    }

    /// Hands `sink` the `len` bytes at `offset`, in order, as pieces of
    /// files, zeros or memory, so that it moves them where they go (guest
    /// memory) itself: a read from the overlay or the hydration cache is
    /// then one `pread` into the destination, with no copy in between.
    pub fn read_with<E: From<VolumeError>>(
        &self,
        offset: u64,
        len: usize,
        sink: &mut impl FnMut(Piece<'_>) -> Result<(), E>,
    ) -> Result<(), E> {
        self.check_range(offset, len)?;
        let end = offset + len as u64;
        let mut at = offset;
        while at < end {
            let block = at / BLOCK_SIZE;
            let held = self.held(block);
            let mut next = block + 1;
            while next * BLOCK_SIZE < end && self.held(next) == held {
                next += 1;
            }
            let run_end = (next * BLOCK_SIZE).min(end);
            let run = (run_end - at) as usize;
            match &self.overlay {
                Some(overlay) if held => sink(overlay.piece(at, run))?,
                _ => {
                    self.record(at, run);
                    self.base.read_with(at, run, sink)?
                }
            }
            at = run_end;
        }
        Ok(())
    }

    /// Writes `data` at `offset` into the overlay. Whole blocks go
    /// straight in; a partial block the overlay does not hold yet is first
    /// copied up from the image.
    pub fn write(&mut self, offset: u64, data: &[u8]) -> Result<(), VolumeError> {
        self.check_range(offset, data.len())?;
        if self.overlay.is_none() {
            return Err(VolumeError::ReadOnly);
        }
        let end = offset + data.len() as u64;
        let mut at = offset;
        while at < end {
            let block = at / BLOCK_SIZE;
            let block_start = block * BLOCK_SIZE;
            let rest = &data[(at - offset) as usize..];
            if at == block_start && end - at >= BLOCK_SIZE {
                let whole = ((end - at) / BLOCK_SIZE * BLOCK_SIZE) as usize;
                self.overlay_mut()?.write_blocks(block, &rest[..whole])?;
                at += whole as u64;
                continue;
            }
            let piece_end = end.min(block_start + BLOCK_SIZE);
            let piece = &rest[..(piece_end - at) as usize];
            if self.held(block) {
                self.overlay_mut()?.write_in_held(at, piece)?;
            } else {
                let mut whole = self.copy_up(block)?;
                let within = (at - block_start) as usize;
                whole[within..within + piece.len()].copy_from_slice(piece);
                self.overlay_mut()?.write_blocks(block, &whole)?;
            }
            at = piece_end;
        }
        Ok(())
    }

    /// Block `block` as the image holds it, zero-padded to a whole block
    /// (the volume's last block may be short).
    fn copy_up(&self, block: u64) -> Result<Vec<u8>, VolumeError> {
        let start = block * BLOCK_SIZE;
        let mut whole = vec![0u8; BLOCK_SIZE as usize];
        let len = (self.capacity() - start).min(BLOCK_SIZE) as usize;
        self.base.read_exact_at(start, &mut whole[..len])?;
        Ok(whole)
    }

    fn overlay_mut(&mut self) -> Result<&mut Overlay, VolumeError> {
        self.overlay.as_mut().ok_or(VolumeError::ReadOnly)
    }

    /// The overlay's file, which holds every write (none when read-only).
    pub fn overlay_file(&self) -> Option<&std::fs::File> {
        self.overlay.as_ref().map(Overlay::file)
    }

    /// Makes every completed write durable.
    pub fn flush(&mut self) -> Result<(), VolumeError> {
        match &mut self.overlay {
            Some(overlay) => Ok(overlay.flush()?),
            None => Ok(()),
        }
    }

    /// Frees the overlay's copy of every whole block inside the range;
    /// those blocks read as the image holds them again (after a discard a
    /// block's content is unspecified, virtio 1.2 §5.2.6.2).
    pub fn discard(&mut self, offset: u64, len: u64) -> Result<(), VolumeError> {
        self.check_range(offset, usize::try_from(len).unwrap_or(usize::MAX))?;
        let first = offset.div_ceil(BLOCK_SIZE);
        let end = (offset + len) / BLOCK_SIZE;
        if end > first {
            self.overlay_mut()?.release(first, end - first)?;
        }
        Ok(())
    }

    /// The image's hydration cache, when the volume reads through one.
    pub fn hydrated(&self) -> Option<&Hydrated> {
        match &self.base {
            Base::Host(hydrated) => Some(hydrated),
            Base::Memory(_) => None,
        }
    }

    /// Ends the volume as a killed process would: without a flush.
    #[cfg(test)]
    fn crash(self) {
        if let Some(overlay) = self.overlay {
            overlay.crash();
        }
    }

    /// Writes the whole volume, as the guest sees it, to `out`.
    pub fn flatten_to(&self, out: &mut impl Write) -> Result<(), VolumeError> {
        let mut buf = vec![0u8; FLATTEN_STEP];
        let mut at = 0;
        while at < self.capacity() {
            let len = (self.capacity() - at).min(FLATTEN_STEP as u64) as usize;
            self.read(at, &mut buf[..len])?;
            out.write_all(&buf[..len]).map_err(VolumeError::Output)?;
            at += len as u64;
        }
        Ok(())
    }
}

/// Fills `buf` from `file` at `offset`: an overlay's or a hydration
/// cache's bytes, which the volume's checks say are there.
fn read_file(path: &Path, file: &File, offset: u64, buf: &mut [u8]) -> Result<(), VolumeError> {
    use std::os::unix::fs::FileExt;
    file.read_exact_at(buf, offset)
        .map_err(|source| VolumeError::Read {
            path: path.to_path_buf(),
            offset,
            source,
        })
}

#[cfg(test)]
mod tests;
