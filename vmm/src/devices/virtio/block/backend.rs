//! Where a block device's sectors live: a raw file, or a [`Volume`] (a
//! compressed image with a copy-on-write overlay).
use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use vm_memory::bitmap::BitmapSlice;
use vm_memory::{
    Bytes, GuestAddress, GuestMemoryError, ReadVolatile, VolatileMemoryError, VolatileSlice,
    WriteVolatile,
};

use super::super::GuestMemoryMmap;
use crate::volume::{Volume, VolumeError};

/// Why a request's data could not be moved; the device logs it and answers
/// the request with VIRTIO_BLK_S_IOERR.
#[derive(Debug, thiserror::Error)]
pub enum TransferError {
    #[error("{path}: {source}")]
    File { path: PathBuf, source: io::Error },
    #[error(transparent)]
    Volume(#[from] VolumeError),
    #[error("the driver's buffer at {0:#x} is not in guest memory")]
    GuestMemory(u64),
    #[error("the driver's buffer: {0}")]
    Guest(String),
}

/// A disk's storage.
#[derive(Debug)]
pub enum Backend {
    /// A raw disk image, read and written in place.
    Raw {
        path: PathBuf,
        file: File,
        read_only: bool,
    },
    /// A compressed image, with an overlay when writable.
    Volume(Box<Volume>),
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

    pub fn read_only(&self) -> bool {
        match self {
            Backend::Raw { read_only, .. } => *read_only,
            Backend::Volume(volume) => !volume.writable(),
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
            Backend::Raw { .. } => None,
            Backend::Volume(volume) => volume.overlay_file(),
        }
    }

    /// Whether DISCARD frees anything: only an overlay gives space back.
    pub fn discards(&self) -> bool {
        matches!(self, Backend::Volume(volume) if volume.writable())
    }

    /// Moves `len` bytes between the disk at `offset` and guest memory at
    /// `addr`: into the guest (a read) when `to_guest`, else out of it.
    pub fn transfer(
        &mut self,
        mem: &GuestMemoryMmap,
        addr: GuestAddress,
        offset: u64,
        len: usize,
        to_guest: bool,
    ) -> Result<(), TransferError> {
        let guest_memory = |_| TransferError::GuestMemory(addr.0);
        match self {
            Backend::Raw { path, file, .. } => {
                let mut disk = FileAt { file, offset };
                let moved = if to_guest {
                    mem.read_exact_volatile_from(addr, &mut disk, len)
                } else {
                    mem.write_all_volatile_to(addr, &mut disk, len)
                };
                moved.map_err(|err| file_error(path, err))
            }
            Backend::Volume(volume) if to_guest => {
                let mut data = vec![0u8; len];
                volume.read(offset, &mut data)?;
                mem.write_slice(&data, addr).map_err(guest_memory)
            }
            Backend::Volume(volume) => {
                let mut data = vec![0u8; len];
                mem.read_slice(&mut data, addr).map_err(guest_memory)?;
                Ok(volume.write(offset, &data)?)
            }
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
            Backend::Volume(volume) => Ok(volume.flush()?),
        }
    }

    /// Gives the bytes in the range back (see [`Backend::discards`]).
    pub fn discard(&mut self, offset: u64, len: u64) -> Result<(), TransferError> {
        match self {
            Backend::Raw { .. } => Ok(()),
            Backend::Volume(volume) => Ok(volume.discard(offset, len)?),
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
        other => TransferError::Guest(other.to_string()),
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
