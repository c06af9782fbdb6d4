//! Where a block device's sectors live: a raw file, or a [`Volume`] (a
//! compressed image with a copy-on-write overlay).
use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use vm_memory::bitmap::BitmapSlice;
use vm_memory::{
    Address, Bytes, GuestAddress, GuestMemoryError, ReadVolatile, VolatileMemoryError,
    VolatileSlice, WriteVolatile,
};

use super::super::GuestMemoryMmap;
use crate::volume::{BLOCK_SIZE, Piece, Volume, VolumeError, working_set};

/// The most a volume write holds in host memory at once: the guest's
/// buffer is moved through a buffer of this size, reused, whatever length
/// the driver's descriptor claims (up to 4 GiB). Reads need none: the
/// overlay's and the hydration cache's bytes are read with pread straight
/// into guest memory, and a chunk decompressed in memory is copied there
/// from where it is cached; a raw image needs none either way. It is a
/// whole number of overlay blocks, so a write's pieces split none.
const BOUNCE_SIZE: usize = 128 * 1024;
const _: () = assert!((BOUNCE_SIZE as u64).is_multiple_of(BLOCK_SIZE));

/// Zeros that a read of an all-zero chunk copies into guest memory: a
/// default-sized chunk's worth, so a chunk takes one copy (it lives in
/// .bss and costs the binary nothing).
static ZEROS: [u8; ZEROS_LEN] = [0; ZEROS_LEN];
const ZEROS_LEN: usize = kiln_image::DEFAULT_CHUNK_SIZE as usize;

/// Why a request's data could not be moved; the device logs it and answers
/// the request with VIRTIO_BLK_S_IOERR.
#[derive(Debug, thiserror::Error)]
pub enum TransferError {
    /// Reading, writing or syncing a raw image failed on the host.
    #[error("disk image {path}")]
    File {
        /// The image's path.
        path: PathBuf,
        /// What the system said.
        #[source]
        source: io::Error,
    },
    /// A volume's image or overlay failed (a damaged chunk, a host I/O
    /// error).
    #[error(transparent)]
    Volume(#[from] VolumeError),
    /// The driver named a buffer that is not all in guest memory.
    #[error("the driver's buffer of {len} bytes at {addr:#x}: expected it in guest memory")]
    GuestMemory {
        /// The buffer's guest physical address.
        addr: u64,
        /// Its length in bytes.
        len: u32,
    },
    /// The drive is empty: even a request of no sectors has nothing to
    /// move to or from.
    #[error("the drive has no medium")]
    NoMedium,
    /// Guest memory refused the access for another reason.
    #[error("the driver's buffer")]
    Guest(#[source] GuestMemoryError),
}

/// A disk's storage.
#[derive(Debug)]
pub enum Backend {
    /// A raw disk image, read and written in place.
    Raw {
        /// The image's path, for messages.
        path: PathBuf,
        /// The open image.
        file: File,
        /// Whether the guest may only read it (opened without write access).
        read_only: bool,
    },
    /// A compressed image, with an overlay when writable.
    Volume {
        /// The image and its overlay.
        volume: Box<Volume>,
        /// [`BOUNCE_SIZE`] bytes that guest data passes through.
        bounce: Vec<u8>,
    },
    /// No medium (a pod's spare drive): capacity 0, so no request reaches
    /// a sector of it.
    Empty {
        /// Whether the guest may only read what the drive will hold.
        read_only: bool,
    },
}

impl Backend {
    /// The raw disk image at `path`; returns it and its size.
    pub fn raw(path: &Path, read_only: bool) -> io::Result<(Self, u64)> {
        let mut file = OpenOptions::new().read(true).write(!read_only).open(path)?;
        // Seeking to the end also sizes block devices, whose metadata says 0.
        let size = file.seek(SeekFrom::End(0))?;
        let backend = Backend::Raw {
            path: path.to_path_buf(),
            file,
            read_only,
        };
        Ok((backend, size))
    }

    /// `volume` as a disk's storage.
    pub fn volume(volume: Volume) -> Self {
        Backend::Volume {
            volume: Box::new(volume),
            bounce: vec![0; BOUNCE_SIZE],
        }
    }

    /// Whether the guest may only read this disk (VIRTIO_BLK_F_RO).
    pub fn read_only(&self) -> bool {
        match self {
            Backend::Raw { read_only, .. } | Backend::Empty { read_only } => *read_only,
            Backend::Volume { volume, .. } => !volume.writable(),
        }
    }

    /// The file that holds the guest's writes: a writable raw image, or a
    /// volume's overlay.
    pub fn writes_file(&self) -> Option<&File> {
        match self {
            Backend::Raw {
                file,
                read_only: false,
                ..
            } => Some(file),
            Backend::Raw { .. } | Backend::Empty { .. } => None,
            Backend::Volume { volume, .. } => volume.overlay_file(),
        }
    }

    /// Starts the workers that fill a volume's hydration cache in the
    /// background: its readahead, and the image's boot working set, kept
    /// beside the image ([`working_set::path`]), which this volume records
    /// if it is the first. Nothing for a raw file or a volume without a
    /// hydration cache.
    pub fn start_prefetch(&mut self, seccomp: bool) -> Result<(), VolumeError> {
        match self {
            Backend::Volume { volume, .. } => {
                let record = working_set::path(volume.image_path());
                volume.start_prefetch(seccomp, Some(&record))
            }
            Backend::Raw { .. } | Backend::Empty { .. } => Ok(()),
        }
    }

    /// Whether DISCARD frees anything: only an overlay gives space back.
    pub fn discards(&self) -> bool {
        matches!(self, Backend::Volume { volume, .. } if volume.writable())
    }

    /// Moves `len` bytes between the disk at `offset` and guest memory at
    /// `addr`: into the guest (a read) when `to_guest`, else out of it.
    /// The caller has checked that both ranges exist; host memory used is
    /// at most [`BOUNCE_SIZE`], whatever `len`.
    pub fn transfer(
        &mut self,
        mem: &GuestMemoryMmap,
        addr: GuestAddress,
        offset: u64,
        len: u32,
        to_guest: bool,
    ) -> Result<(), TransferError> {
        let guest_memory = || TransferError::GuestMemory { addr: addr.0, len };
        match self {
            Backend::Raw { path, file, .. } => {
                let mut disk = FileAt { file, offset };
                let moved = if to_guest {
                    mem.read_exact_volatile_from(addr, &mut disk, len as usize)
                } else {
                    mem.write_all_volatile_to(addr, &mut disk, len as usize)
                };
                moved.map_err(|err| file_error(path, err))
            }
            Backend::Volume { volume, .. } if to_guest => {
                let mut guest = addr;
                volume.read_with(offset, len as usize, &mut |piece| {
                    let moved = piece_to_guest(mem, guest, piece, &guest_memory)?;
                    guest = guest.checked_add(moved as u64).ok_or_else(guest_memory)?;
                    Ok::<_, TransferError>(())
                })
            }
            Backend::Volume { volume, bounce } => {
                let mut done = 0u64;
                while done < u64::from(len) {
                    let at = offset + done;
                    // Pieces end on multiples of BOUNCE_SIZE on the disk, so
                    // none splits an overlay block.
                    let to_boundary = BOUNCE_SIZE as u64 - at % BOUNCE_SIZE as u64;
                    let piece = to_boundary.min(u64::from(len) - done) as usize;
                    let data = &mut bounce[..piece];
                    let guest = addr.checked_add(done).ok_or_else(guest_memory)?;
                    mem.read_slice(data, guest).map_err(|_| guest_memory())?;
                    volume.write(at, data)?;
                    done += piece as u64;
                }
                Ok(())
            }
            Backend::Empty { .. } => Err(TransferError::NoMedium),
        }
    }

    /// Makes every completed write durable.
    pub fn flush(&mut self) -> Result<(), TransferError> {
        match self {
            Backend::Raw { path, file, .. } => {
                file.sync_data().map_err(|source| TransferError::File {
                    path: path.clone(),
                    source,
                })
            }
            Backend::Volume { volume, .. } => Ok(volume.flush()?),
            Backend::Empty { .. } => Ok(()),
        }
    }

    /// Gives the bytes in the range back (see [`Backend::discards`]).
    pub fn discard(&mut self, offset: u64, len: u64) -> Result<(), TransferError> {
        match self {
            Backend::Raw { .. } | Backend::Empty { .. } => Ok(()),
            Backend::Volume { volume, .. } => Ok(volume.discard(offset, len)?),
        }
    }
}

/// Moves one piece of a volume read into guest memory at `guest`, with
/// pread straight into it for a file's bytes; returns the bytes moved.
/// `guest_memory` is the error for a buffer outside guest memory.
fn piece_to_guest(
    mem: &GuestMemoryMmap,
    guest: GuestAddress,
    piece: Piece<'_>,
    guest_memory: &dyn Fn() -> TransferError,
) -> Result<usize, TransferError> {
    match piece {
        Piece::File {
            path,
            file,
            offset,
            len,
        } => {
            let mut disk = FileAt { file, offset };
            mem.read_exact_volatile_from(guest, &mut disk, len)
                .map_err(|err| file_error(path, err))?;
            Ok(len)
        }
        Piece::Zero { len } => {
            let mut done = 0;
            while done < len {
                let n = (len - done).min(ZEROS.len());
                let at = guest.checked_add(done as u64).ok_or_else(guest_memory)?;
                mem.write_slice(&ZEROS[..n], at)
                    .map_err(|_| guest_memory())?;
                done += n;
            }
            Ok(len)
        }
        Piece::Bytes(bytes) => {
            mem.write_slice(bytes, guest).map_err(|_| guest_memory())?;
            Ok(bytes.len())
        }
    }
}

/// A raw file transfer's error: the file's, or the guest buffer's.
fn file_error(path: &Path, err: GuestMemoryError) -> TransferError {
    match err {
        GuestMemoryError::IOError(source) => TransferError::File {
            path: path.to_path_buf(),
            source,
        },
        other => TransferError::Guest(other),
    }
}
/// The file at a moving position, read and written with pread/pwrite so
/// that requests never depend on (or disturb) a shared file offset.
struct FileAt<'a> {
    file: &'a File,
    offset: u64,
}

impl FileAt<'_> {
    fn advance(&mut self, result: isize) -> Result<usize, VolatileMemoryError> {
        let done = usize::try_from(result)
            .map_err(|_| VolatileMemoryError::IOError(io::Error::last_os_error()))?;
        self.offset += done as u64;
        Ok(done)
    }

    fn file_offset(&self) -> Result<libc::off_t, VolatileMemoryError> {
        libc::off_t::try_from(self.offset).map_err(|_| {
            VolatileMemoryError::IOError(io::Error::from_raw_os_error(libc::EOVERFLOW))
        })
    }
}

impl ReadVolatile for FileAt<'_> {
    fn read_volatile<B: BitmapSlice>(
        &mut self,
        buf: &mut VolatileSlice<B>,
    ) -> Result<usize, VolatileMemoryError> {
        let offset = self.file_offset()?;
        let guard = buf.ptr_guard_mut();
        // SAFETY: the file descriptor is open for the lifetime of `self.file`
        // and `guard` points to `buf.len()` bytes of writable guest memory,
        // which the VolatileSlice guarantees stays mapped while it lives.
        let read = unsafe {
            libc::pread(
                self.file.as_raw_fd(),
                guard.as_ptr().cast(),
                buf.len(),
                offset,
            )
        };
        let read = self.advance(read)?;
        buf.bitmap().mark_dirty(0, read);
        Ok(read)
    }
}

impl WriteVolatile for FileAt<'_> {
    fn write_volatile<B: BitmapSlice>(
        &mut self,
        buf: &VolatileSlice<B>,
    ) -> Result<usize, VolatileMemoryError> {
        let offset = self.file_offset()?;
        let guard = buf.ptr_guard();
        // SAFETY: the file descriptor is open for the lifetime of `self.file`
        // and `guard` points to `buf.len()` readable bytes of guest memory,
        // which the VolatileSlice guarantees stays mapped while it lives.
        let written = unsafe {
            libc::pwrite(
                self.file.as_raw_fd(),
                guard.as_ptr().cast(),
                buf.len(),
                offset,
            )
        };
        self.advance(written)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::volume::CacheAccess;

    /// 640 KiB, five pieces' worth, each byte telling its offset apart.
    const DISK_BYTES: usize = 5 * BOUNCE_SIZE;

    /// Where [`pattern`] holds a 64 KiB chunk of zeros.
    const ZERO_CHUNK: usize = 4 * BOUNCE_SIZE;

    fn pattern(len: usize) -> Vec<u8> {
        let zeros = ZERO_CHUNK..ZERO_CHUNK + 64 * 1024;
        (0..len)
            .map(|i| {
                if zeros.contains(&i) {
                    0
                } else {
                    (i % 251) as u8 ^ (i >> 12) as u8
                }
            })
            .collect()
    }

    #[test]
    fn a_volume_moves_long_buffers_through_a_bounded_buffer() {
        moves_long_buffers(false);
    }

    #[test]
    fn a_hydrated_volume_reads_straight_into_guest_memory() {
        moves_long_buffers(true);
    }

    /// Writes and reads back a long buffer through a volume, whose chunks
    /// are kept in a hydration cache when `hydrated`; then reads a run of
    /// data, zeros, data from the image.
    fn moves_long_buffers(hydrated: bool) {
        let dir = tempfile::tempdir().unwrap();
        let raw = dir.path().join("raw");
        std::fs::write(&raw, pattern(DISK_BYTES)).unwrap();
        let image = dir.path().join("image.kiln");
        kiln_image::write(&raw, &image, 64 * 1024).unwrap();
        let overlay = dir.path().join("root.overlay");
        drop(Volume::create(&image, &overlay, 1 << 20).unwrap());
        let volume = if hydrated {
            let cache = dir.path().join("cache");
            Volume::open_hydrated(&image, Some(&overlay), (&cache, CacheAccess::Fill), 1 << 20)
                .unwrap()
        } else {
            Volume::open(&image, Some(&overlay), 1 << 20).unwrap()
        };
        assert_eq!(volume.hydrated().is_some(), hydrated);
        let mut backend = Backend::volume(volume);
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();

        // Neither end on a piece or block boundary, spanning three pieces.
        let (offset, len) = (3 * 512, 2 * BOUNCE_SIZE + 5 * 512);
        let written: Vec<u8> = (0..len).map(|i| (i * 7 % 256) as u8).collect();
        mem.write_slice(&written, GuestAddress(0x1_0000)).unwrap();
        backend
            .transfer(&mem, GuestAddress(0x1_0000), offset, len as u32, false)
            .unwrap();
        // Read back with a sector of the image on either side.
        let (back_offset, back_len) = (offset - 512, len + 1024);
        backend
            .transfer(
                &mem,
                GuestAddress(0x6_0000),
                back_offset,
                back_len as u32,
                true,
            )
            .unwrap();
        let mut read = vec![0u8; back_len];
        mem.read_slice(&mut read, GuestAddress(0x6_0000)).unwrap();
        let image_bytes = pattern(DISK_BYTES);
        let mut expected = image_bytes[back_offset as usize..offset as usize].to_vec();
        expected.extend(&written);
        let end = offset as usize + len;
        expected.extend(&image_bytes[end..end + 512]);
        assert_eq!(read, expected);

        let (around, around_len) = (ZERO_CHUNK as u64 - 4096, 64 * 1024 + 8192);
        backend
            .transfer(&mem, GuestAddress(0x6_0000), around, around_len, true)
            .unwrap();
        let mut read = vec![1u8; around_len as usize];
        mem.read_slice(&mut read, GuestAddress(0x6_0000)).unwrap();
        let around = around as usize;
        assert_eq!(read, image_bytes[around..around + read.len()]);

        let Backend::Volume { bounce, .. } = &backend else {
            unreachable!("made as a volume")
        };
        assert_eq!(
            bounce.len(),
            BOUNCE_SIZE,
            "the buffer grew with the request"
        );
    }
}
