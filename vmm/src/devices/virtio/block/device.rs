//! The virtio-blk device: its features and configuration space,
//! activation and reset, and the I/O each request does on the disk.
use std::io;
use std::mem::offset_of;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX,
    VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP,
    VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT, virtio_blk_config,
};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;
use virtio_queue::{Queue, QueueState, QueueT};
use vm_memory::{Address, Bytes, GuestMemoryBackend};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use super::super::{
    ActivateError, GuestMemoryMmap, Interrupt, VirtioDevice, fixed_queues, ignore_config_write,
    next_chain, read_config_space,
};
use super::backend::{Backend, TransferError};
use super::request::{Request, le_u32, le_u64};
use crate::logger::{error_limited, warn_limited};
use crate::report::one_line;
use crate::volume::{self, CacheAccess, Volume, VolumeError};

/// How the log names this device.
const DEVICE: &str = "virtio-blk";

/// Size of the request queue.
pub const QUEUE_SIZE: u16 = 256;

/// The unit of `capacity` and of request sectors, whatever the disk's
/// block size (§5.2.4).
pub const SECTOR_SIZE: u64 = 512;

/// Data buffers per request: a chain holds at most `QUEUE_SIZE` descriptors
/// (no indirect descriptors are offered), two of them the header and status.
const SEG_MAX: u32 = QUEUE_SIZE as u32 - 2;
/// `struct virtio_blk_config` (§5.2.4) up to `discard_sector_alignment`,
/// the last field of a feature this device offers; fields of features it
/// does not offer read as zero.
const CONFIG_SIZE: usize = offset_of!(virtio_blk_config, max_write_zeroes_sectors);

/// `struct virtio_blk_discard_write_zeroes` (§5.2.6): le64 sector, le32
/// num_sectors, le32 flags.
const DISCARD_SEGMENT_SIZE: u32 = 16;
/// Ranges per DISCARD request: Linux merges adjacent ranges itself.
const MAX_DISCARD_SEG: u32 = 1;
/// Sectors per discarded range: 2 GiB, far more than one request needs.
const MAX_DISCARD_SECTORS: u32 = 1 << 22;
/// Discards free whole overlay blocks; the guest aligns ranges to this.
const DISCARD_SECTOR_ALIGNMENT: u32 = (volume::BLOCK_SIZE / SECTOR_SIZE) as u32;

/// Errors from opening a disk image.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    /// The image could not be opened.
    #[error("cannot open disk image {path}")]
    Open {
        /// The image's path.
        path: PathBuf,
        /// What the system said.
        #[source]
        source: io::Error,
    },
    /// The image and overlay of a volume could not be opened.
    #[error(transparent)]
    Volume(#[from] VolumeError),
    /// virtio-blk counts in 512-byte sectors; a partial sector is unreachable.
    #[error("disk image {path} is {size} bytes, not a multiple of {SECTOR_SIZE}-byte sectors")]
    PartialSector {
        /// The image's path.
        path: PathBuf,
        /// Its size in bytes.
        size: u64,
    },
    /// The queue's eventfd could not be created.
    #[error("cannot create the request queue's eventfd")]
    EventFd(#[source] io::Error),
    /// The disk's completed writes could not be made durable.
    #[error("cannot flush disk {path}")]
    Flush {
        /// The disk's image path.
        path: PathBuf,
        /// Why the writes could not be synced.
        #[source]
        source: TransferError,
    },
}

/// Why a disk cannot fill a drive ([`Block::attach`]).
#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    /// The drive was not built empty, or has been filled already.
    #[error("the drive holds {path}: expected an empty drive")]
    Occupied {
        /// The disk it holds.
        path: PathBuf,
    },
    /// The source to attach is itself [`DiskSource::Empty`].
    #[error("the source is empty: expected a raw image or a volume to attach")]
    EmptySource,
    /// A volume without an overlay in a drive the guest may write: the
    /// driver would see a writable disk whose every write fails.
    #[error(
        "volume {image} has no overlay: the drive is writable (read_only false), expected an overlay"
    )]
    NoOverlay {
        /// The volume's image.
        image: PathBuf,
    },
    /// A hydration cache's prefetch workers are threads, and the VMM
    /// thread, under its seccomp filter once the VM runs, starts none.
    #[error(
        "volume {image}: hydration {dir}: a disk attached to a running VM reads its image through memory only, expected hydration null"
    )]
    Hydration {
        /// The volume's image.
        image: PathBuf,
        /// The hydration cache's directory asked for.
        dir: PathBuf,
    },
    /// The disk cannot be opened.
    #[error(transparent)]
    Open(#[from] BlockError),
}

/// Why a drive cannot be emptied ([`Block::detach`]).
#[derive(Debug, thiserror::Error)]
pub enum DetachError {
    /// The drive was built with its disk: it is in the VM's definition,
    /// not a pod's slot.
    #[error("the drive holds {path} since boot: expected a drive slot (built empty)")]
    NotASlot {
        /// The disk it holds.
        path: PathBuf,
    },
    /// The slot holds no disk.
    #[error("the drive is empty: expected a slot filled by attachdisk")]
    AlreadyEmpty,
    /// The disk's writes could not be made durable; it stays in the drive.
    #[error(transparent)]
    Flush(#[from] BlockError),
}

/// A request's outcome: the status byte and how many data bytes the device
/// wrote into the chain's buffers.
struct Completion {
    status: u32,
    written: u32,
}

impl Completion {
    const fn status(status: u32) -> Self {
        Self { status, written: 0 }
    }
}

/// The disk: its storage and what the driver may do with it.
pub(super) struct Disk {
    pub(super) backend: Backend,
    /// Size in sectors.
    capacity: u64,
    /// GET_ID's answer, at most 20 bytes.
    id: Vec<u8>,
    /// The file named in messages about this disk.
    pub(super) path: PathBuf,
}

impl Disk {
    fn execute(&mut self, mem: &GuestMemoryMmap, request: &Request) -> Completion {
        match request.kind {
            VIRTIO_BLK_T_IN => self.transfer(mem, request, true),
            VIRTIO_BLK_T_OUT if self.backend.read_only() => Completion::status(VIRTIO_BLK_S_IOERR),
            VIRTIO_BLK_T_OUT => self.transfer(mem, request, false),
            VIRTIO_BLK_T_FLUSH => {
                let flushed = self.backend.flush().map(|()| 0);
                self.report(flushed, "flush")
            }
            VIRTIO_BLK_T_GET_ID => write_id(mem, request, &self.id),
            VIRTIO_BLK_T_DISCARD if self.backend.discards() => self.discard(mem, request),
            _ => Completion::status(VIRTIO_BLK_S_UNSUPP),
        }
    }

    /// Whether `len` bytes from `sector` are whole sectors inside the disk.
    fn in_range(&self, sector: u64, len: u64) -> bool {
        len.is_multiple_of(SECTOR_SIZE)
            && sector
                .checked_add(len / SECTOR_SIZE)
                .is_some_and(|end| end <= self.capacity)
    }

    /// IN (`to_guest`) or OUT: whole sectors within the disk.
    fn transfer(&mut self, mem: &GuestMemoryMmap, request: &Request, to_guest: bool) -> Completion {
        let Some(len) = request
            .data_len(to_guest)
            .filter(|&len| self.in_range(request.sector, len))
        else {
            return Completion::status(VIRTIO_BLK_S_IOERR);
        };
        let moved = self.move_data(mem, request, to_guest);
        // `len` fits: virtio-queue ends a chain before it exceeds u32::MAX
        // bytes (§2.7.5.2 forbids longer ones).
        let written = if to_guest {
            u32::try_from(len).unwrap_or(u32::MAX)
        } else {
            0
        };
        let what = if to_guest { "read" } else { "write" };
        self.report(moved.map(|()| written), what)
    }

    /// Moves a request's data, its sectors already checked to be inside
    /// the disk. Every buffer is checked to lie in guest memory before the
    /// disk is touched, so a bad buffer fails the request with nothing
    /// read or written, and no host work done for it.
    fn move_data(
        &mut self,
        mem: &GuestMemoryMmap,
        request: &Request,
        to_guest: bool,
    ) -> Result<(), TransferError> {
        if let Some(d) = request
            .data
            .iter()
            .find(|d| !mem.check_range(d.addr(), d.len() as usize))
        {
            return Err(TransferError::GuestMemory {
                addr: d.addr().0,
                len: d.len(),
            });
        }
        let mut offset = request.sector * SECTOR_SIZE;
        for d in &request.data {
            self.backend
                .transfer(mem, d.addr(), offset, d.len(), to_guest)?;
            offset += u64::from(d.len());
        }
        Ok(())
    }

    /// DISCARD (§5.2.6): each data segment is one range to give back; flags
    /// other than zero (UNMAP belongs to WRITE_ZEROES) are unsupported.
    /// More segments than the `max_discard_seg` offered is an I/O error,
    /// checked before anything is read, so the buffers' claimed length
    /// costs the host nothing.
    fn discard(&mut self, mem: &GuestMemoryMmap, request: &Request) -> Completion {
        let len: u64 = request.data.iter().map(|d| u64::from(d.len())).sum();
        if len > u64::from(MAX_DISCARD_SEG * DISCARD_SEGMENT_SIZE) {
            return Completion::status(VIRTIO_BLK_S_IOERR);
        }
        let mut ranges = Vec::new();
        for d in &request.data {
            if d.is_write_only() || d.len() % DISCARD_SEGMENT_SIZE != 0 {
                return Completion::status(VIRTIO_BLK_S_IOERR);
            }
            for at in (0..d.len()).step_by(DISCARD_SEGMENT_SIZE as usize) {
                let mut segment = [0u8; DISCARD_SEGMENT_SIZE as usize];
                let read = d
                    .addr()
                    .checked_add(u64::from(at))
                    .and_then(|addr| mem.read_slice(&mut segment, addr).ok());
                if read.is_none() {
                    return Completion::status(VIRTIO_BLK_S_IOERR);
                }
                let sector = le_u64(&segment, 0);
                let sectors = u64::from(le_u32(&segment, 8));
                if le_u32(&segment, 12) != 0 {
                    return Completion::status(VIRTIO_BLK_S_UNSUPP);
                }
                if !self.in_range(sector, sectors * SECTOR_SIZE) {
                    return Completion::status(VIRTIO_BLK_S_IOERR);
                }
                ranges.push((sector * SECTOR_SIZE, sectors * SECTOR_SIZE));
            }
        }
        let done = ranges
            .into_iter()
            .try_for_each(|(offset, len)| self.backend.discard(offset, len));
        self.report(done.map(|()| 0), "discard")
    }

    /// The completion of a request that moved `Ok(bytes written to the
    /// guest)`, or failed: then the guest gets an I/O error and the log
    /// says why (a damaged image chunk, a host I/O error), never wrong data.
    fn report(&self, result: Result<u32, TransferError>, what: &str) -> Completion {
        match result {
            Ok(written) => Completion {
                status: VIRTIO_BLK_S_OK,
                written,
            },
            Err(err) => {
                let id = String::from_utf8_lossy(&self.id);
                error_limited!("virtio-blk {id}: {what} failed: {}", one_line(&err));
                Completion::status(VIRTIO_BLK_S_IOERR)
            }
        }
    }
}

/// GET_ID: the serial string, up to 20 bytes, NUL-padded when shorter (§5.2.6.1).
fn write_id(mem: &GuestMemoryMmap, request: &Request, id: &[u8]) -> Completion {
    if request
        .data_len(true)
        .is_none_or(|len| len < u64::from(VIRTIO_BLK_ID_BYTES))
    {
        return Completion::status(VIRTIO_BLK_S_IOERR);
    }
    let mut padded = [0u8; VIRTIO_BLK_ID_BYTES as usize];
    padded[..id.len()].copy_from_slice(id);
    let mut rest = &padded[..];
    for d in &request.data {
        let (chunk, tail) = rest.split_at(rest.len().min(d.len() as usize));
        if mem.write_slice(chunk, d.addr()).is_err() {
            return Completion::status(VIRTIO_BLK_S_IOERR);
        }
        rest = tail;
    }
    Completion {
        status: VIRTIO_BLK_S_OK,
        written: VIRTIO_BLK_ID_BYTES,
    }
}

/// What the device holds between activation and reset.
struct Active {
    mem: GuestMemoryMmap,
    queue: Queue,
    interrupt: Arc<Interrupt>,
}

/// Where a disk's sectors come from.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DiskSource {
    /// A raw disk image file.
    Raw(PathBuf),
    /// A Kiln image and the overlay that takes its writes; without an
    /// overlay, or attached read-only, the disk is read-only.
    Volume {
        /// The image file, never written.
        image: PathBuf,
        /// The overlay file that holds the guest's writes, if it may write.
        overlay: Option<PathBuf>,
        /// Bound on the decompressed chunks kept in memory.
        cache_bytes: u64,
        /// The directory of the host-wide hydration caches, where the
        /// image's decompressed chunks are kept for every VM of the host
        /// instead of in memory (`kiln_image::hydrate`); `None` for the
        /// in-memory cache alone.
        #[serde(default)]
        hydration: Option<PathBuf>,
        /// Whether the VM process fills the hydration cache or only reads
        /// it (a jailed one: `kiln_vmm::volume::background`).
        #[serde(default)]
        hydration_access: CacheAccess,
    },
    /// No medium: a drive of capacity 0, a pod's spare slot, until
    /// `ControlRequest::AttachDisk` fills it with a container's root disk
    /// (Firecracker-containerd's stub drives). Whether the guest may write
    /// the disk it will hold is the slot's `read_only`, fixed at boot:
    /// VIRTIO_BLK_F_RO is negotiated once, when the driver probes.
    Empty,
}

impl DiskSource {
    /// The file named in messages about this disk; none for an empty drive.
    pub fn path(&self) -> Option<&Path> {
        match self {
            DiskSource::Raw(path) => Some(path),
            DiskSource::Volume { image, .. } => Some(image),
            DiskSource::Empty => None,
        }
    }
}

/// A virtio block device.
pub struct Block {
    pub(super) disk: Disk,
    /// Built as an empty drive (a pod's slot), whether filled since or not.
    slot: bool,
    features: u64,
    config: [u8; CONFIG_SIZE],
    pub(super) queue_evts: [EventFd; 1],
    active: Option<Active>,
}

impl Block {
    /// A block device for `source`, which the guest may not write when
    /// `read_only`.
    pub fn new(source: &DiskSource, read_only: bool) -> Result<Self, BlockError> {
        let (backend, size) = open(source, read_only)?;
        let queue_evt = EventFd::new(EFD_NONBLOCK).map_err(BlockError::EventFd)?;
        let path = source.path().map(Path::to_path_buf).unwrap_or_default();
        let capacity = size / SECTOR_SIZE;
        let discards = backend.discards();
        Ok(Self {
            features: offered_features(backend.read_only(), discards),
            config: config_space(capacity, discards),
            disk: Disk {
                backend,
                capacity,
                id: serial_id(&path),
                path,
            },
            slot: matches!(source, DiskSource::Empty),
            queue_evts: [queue_evt],
            active: None,
        })
    }

    /// Whether this drive was built empty, to be filled while the VM runs
    /// (a pod's slot): its disk is not in the VM's definition, so a
    /// snapshot could not be restored with it.
    pub fn is_slot(&self) -> bool {
        self.slot
    }

    /// Fills this empty drive with `source`, opened as the drive's
    /// `read_only` says, and sets its capacity in the configuration space.
    /// The transport then tells the driver
    /// ([`MmioTransport::config_changed`](super::super::mmio::MmioTransport::config_changed)).
    /// The drive offered no DISCARD when the driver probed it, so the
    /// disk it holds gets none.
    pub fn attach(&mut self, source: &DiskSource) -> Result<(), AttachError> {
        if !matches!(self.disk.backend, Backend::Empty { .. }) {
            return Err(AttachError::Occupied {
                path: self.disk.path.clone(),
            });
        }
        let read_only = self.disk.backend.read_only();
        match source {
            DiskSource::Empty => return Err(AttachError::EmptySource),
            DiskSource::Volume {
                image,
                hydration: Some(dir),
                ..
            } => {
                return Err(AttachError::Hydration {
                    image: image.clone(),
                    dir: dir.clone(),
                });
            }
            DiskSource::Volume {
                image,
                overlay: None,
                ..
            } if !read_only => {
                return Err(AttachError::NoOverlay {
                    image: image.clone(),
                });
            }
            DiskSource::Raw(_) | DiskSource::Volume { .. } => {}
        }
        let (backend, size) = open(source, read_only)?;
        let path = source.path().map(Path::to_path_buf).unwrap_or_default();
        self.disk.capacity = size / SECTOR_SIZE;
        self.config = config_space(self.disk.capacity, false);
        self.disk.backend = backend;
        self.disk.id = serial_id(&path);
        self.disk.path = path;
        Ok(())
    }

    /// Empties this filled slot, undoing [`Block::attach`]: makes the
    /// disk's writes durable, then closes its files (a volume's overlay,
    /// and with it the overlay's lock) and sets the capacity to 0. From
    /// then on every request fails with VIRTIO_BLK_S_IOERR, and the slot
    /// takes another disk. The transport then tells the driver, as for an
    /// attach. The guest must have let go of the disk first (unmounted
    /// it): a filesystem still mounted on the drive would write its
    /// metadata onto whatever disk fills the slot next.
    pub fn detach(&mut self) -> Result<(), DetachError> {
        if !self.slot {
            return Err(DetachError::NotASlot {
                path: self.disk.path.clone(),
            });
        }
        if matches!(self.disk.backend, Backend::Empty { .. }) {
            return Err(DetachError::AlreadyEmpty);
        }
        self.flush()?;
        let read_only = self.disk.backend.read_only();
        self.disk.backend = Backend::Empty { read_only };
        self.disk.capacity = 0;
        self.config = config_space(0, false);
        self.disk.path = PathBuf::new();
        self.disk.id = serial_id(&self.disk.path);
        Ok(())
    }

    /// Whether the guest may discard (trim) blocks of this disk.
    pub fn discards(&self) -> bool {
        self.disk.backend.discards()
    }

    /// Starts the background fill of the disk's hydration cache, if it
    /// reads through one (see [`Backend::start_prefetch`]); its threads go
    /// under their seccomp filter when `seccomp`.
    pub fn start_prefetch(&mut self, seccomp: bool) -> Result<(), BlockError> {
        Ok(self.disk.backend.start_prefetch(seccomp)?)
    }

    /// Serves every request the driver has made available, then interrupts
    /// the driver once if any was completed.
    pub(super) fn process_queue(&mut self) {
        let Some(active) = &mut self.active else {
            return;
        };
        let mem = &active.mem;
        let mut completed = false;
        while let Some(chain) = next_chain(DEVICE, &mut active.queue, mem, &active.interrupt) {
            let head = chain.head_index();
            let written = match Request::parse(mem, chain) {
                Ok(request) => complete(mem, &mut self.disk, &request),
                Err(err) => {
                    warn_limited!("virtio-blk: dropping request {head}: {}", one_line(&err));
                    0
                }
            };
            if let Err(err) = active.queue.add_used(mem, head, written) {
                warn_limited!("virtio-blk: cannot return request {head}: {err}");
                break;
            }
            completed = true;
        }
        if completed && let Err(err) = active.interrupt.signal_used_queue() {
            error_limited!("virtio-blk: cannot interrupt the driver: {err}");
        }
    }
}

/// Opens `source` as a disk the guest may not write when `read_only`;
/// returns its storage and its size in bytes, a whole number of sectors.
fn open(source: &DiskSource, read_only: bool) -> Result<(Backend, u64), BlockError> {
    let (backend, size) = match source {
        DiskSource::Raw(path) => {
            Backend::raw(path, read_only).map_err(|source| BlockError::Open {
                path: path.clone(),
                source,
            })?
        }
        DiskSource::Volume {
            image,
            overlay,
            cache_bytes,
            hydration,
            hydration_access,
        } => {
            let overlay = overlay.as_deref().filter(|_| !read_only);
            let volume = match hydration {
                Some(dir) => {
                    let cache = (dir.as_path(), *hydration_access);
                    Volume::open_hydrated(image, overlay, cache, *cache_bytes)?
                }
                None => Volume::open(image, overlay, *cache_bytes)?,
            };
            let size = volume.capacity();
            (Backend::volume(volume), size)
        }
        DiskSource::Empty => (Backend::Empty { read_only }, 0),
    };
    if size % SECTOR_SIZE != 0 {
        return Err(BlockError::PartialSector {
            path: source.path().map(Path::to_path_buf).unwrap_or_default(),
            size,
        });
    }
    Ok((backend, size))
}

/// Executes `request` and writes its status byte; returns the used length
/// (every byte the device wrote into the chain, status included).
fn complete(mem: &GuestMemoryMmap, disk: &mut Disk, request: &Request) -> u32 {
    let completion = disk.execute(mem, request);
    // The status values are all below 256 (§5.2.6).
    let status = completion.status as u8;
    match mem.write_obj(status, request.status.addr()) {
        Ok(()) => completion.written.saturating_add(1),
        // The driver pointed the status outside its memory: it gets the
        // data, and no status to read.
        Err(_) => completion.written,
    }
}

fn offered_features(read_only: bool, discards: bool) -> u64 {
    let ro = if read_only { 1 << VIRTIO_BLK_F_RO } else { 0 };
    let discard = if discards {
        1 << VIRTIO_BLK_F_DISCARD
    } else {
        0
    };
    (1 << VIRTIO_F_VERSION_1)
        | (1 << VIRTIO_BLK_F_FLUSH)
        | (1 << VIRTIO_BLK_F_SEG_MAX)
        | ro
        | discard
}

fn config_space(capacity: u64, discards: bool) -> [u8; CONFIG_SIZE] {
    let mut config = [0u8; CONFIG_SIZE];
    let mut put =
        |offset: usize, bytes: &[u8]| config[offset..][..bytes.len()].copy_from_slice(bytes);
    put(
        offset_of!(virtio_blk_config, capacity),
        &capacity.to_le_bytes(),
    );
    put(
        offset_of!(virtio_blk_config, seg_max),
        &SEG_MAX.to_le_bytes(),
    );
    if discards {
        put(
            offset_of!(virtio_blk_config, max_discard_sectors),
            &MAX_DISCARD_SECTORS.to_le_bytes(),
        );
        put(
            offset_of!(virtio_blk_config, max_discard_seg),
            &MAX_DISCARD_SEG.to_le_bytes(),
        );
        put(
            offset_of!(virtio_blk_config, discard_sector_alignment),
            &DISCARD_SECTOR_ALIGNMENT.to_le_bytes(),
        );
    }
    config
}

/// The serial number GET_ID reports: the image's file name, cut to 20 bytes.
fn serial_id(path: &Path) -> Vec<u8> {
    let name = path
        .file_name()
        .map(|n| n.as_encoded_bytes())
        .unwrap_or_default();
    name[..name.len().min(VIRTIO_BLK_ID_BYTES as usize)].to_vec()
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn queue_events(&self) -> &[EventFd] {
        &self.queue_evts
    }

    fn features(&self) -> u64 {
        self.features
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_space(&self.config, offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // Only `writeback` is writable, and only with VIRTIO_BLK_F_CONFIG_WCE,
        // which this device does not offer.
        ignore_config_write("virtio-blk", offset, data);
    }

    fn activate(
        &mut self,
        _acked_features: u64,
        mem: GuestMemoryMmap,
        queues: Vec<Queue>,
        interrupt: Arc<Interrupt>,
    ) -> Result<(), ActivateError> {
        // No offered feature changes how requests are served: FLUSH and
        // SEG_MAX are honoured whether or not the driver uses them.
        let [queue] = fixed_queues(queues)?;
        self.active = Some(Active {
            mem,
            queue,
            interrupt,
        });
        // Requests made available before activation were notified then, and
        // ignored. Serve them from the event loop: activation runs on a vCPU
        // thread, whose seccomp filter rightly has no file I/O.
        if let Err(err) = self.queue_evts[0].write(1) {
            error_limited!("virtio-blk: cannot wake the request queue: {err}");
        }
        Ok(())
    }

    fn reset(&mut self) {
        self.active = None;
    }

    fn queue_states(&self) -> Vec<QueueState> {
        self.active
            .iter()
            .map(|active| active.queue.state())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use tempfile::NamedTempFile;
    use virtio_bindings::virtio_mmio::VIRTIO_MMIO_INT_VRING;
    use virtio_bindings::virtio_ring::VRING_DESC_F_WRITE;
    use virtio_queue::desc::split::Descriptor;
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::GuestAddress;

    use super::super::request::HEADER_SIZE;
    use super::super::request::tests::{
        DATA, HEADER, HEADER_BUF, STATUS, STATUS_BUF, write_header,
    };
    use super::*;
    use crate::devices::virtio::test_chain::{Buf, descriptors, memory};

    const DISK_SECTORS: u64 = 16;
    /// What the status byte holds before the device answers.
    const UNTOUCHED: u8 = 0xee;
    const UNKNOWN_REQUEST: u32 = 99;

    /// Disk byte `i` is distinct within each sector and between sectors.
    fn disk_pattern() -> Vec<u8> {
        (0..DISK_SECTORS * SECTOR_SIZE)
            .map(|i| (i % 251) as u8 ^ (i / SECTOR_SIZE) as u8)
            .collect()
    }

    fn disk(read_only: bool) -> (NamedTempFile, Block) {
        let mut file = NamedTempFile::new().unwrap();
        file.write_all(&disk_pattern()).unwrap();
        let block = Block::new(&DiskSource::Raw(file.path().into()), read_only).unwrap();
        (file, block)
    }

    /// Submits one chain, lets the device serve it, and returns the status
    /// byte and the used length.
    fn submit(block: &mut Block, mem: &GuestMemoryMmap, bufs: &[Buf]) -> (u8, u32) {
        mem.write_obj(UNTOUCHED, GuestAddress(STATUS)).unwrap();
        let queue = MockSplitQueue::new(mem, 16);
        queue.add_desc_chains(&descriptors(bufs), 0).unwrap();
        let interrupt = Arc::new(Interrupt::new(EventFd::new(EFD_NONBLOCK).unwrap()));
        let queues = vec![queue.create_queue().unwrap()];
        block
            .activate(0, mem.clone(), queues, interrupt.clone())
            .unwrap();
        // Activation leaves the requests to the event loop.
        assert_eq!(queue.used().idx().load(), 0);
        assert_eq!(block.queue_events()[0].read().unwrap(), 1);
        block.process_queue();
        block.reset();

        assert_eq!(queue.used().idx().load(), 1, "the request was not returned");
        assert_eq!(interrupt.status(), VIRTIO_MMIO_INT_VRING);
        assert_eq!(interrupt.event().read().unwrap(), 1);
        let used = queue.used().ring().ref_at(0).unwrap().load();
        assert_eq!(used.id(), 0);
        (mem.read_obj(GuestAddress(STATUS)).unwrap(), used.len())
    }

    fn status(value: u32) -> u8 {
        value as u8
    }

    fn read_guest(mem: &GuestMemoryMmap, addr: u64, len: usize) -> Vec<u8> {
        let mut data = vec![0; len];
        mem.read_slice(&mut data, GuestAddress(addr)).unwrap();
        data
    }

    #[test]
    fn read_copies_the_sectors_into_guest_memory() {
        let (_file, mut block) = disk(false);
        let mem = memory();
        write_header(&mem, VIRTIO_BLK_T_IN, 2);
        let bufs = [HEADER_BUF, Buf(DATA, 1024, true), STATUS_BUF];
        assert_eq!(
            submit(&mut block, &mem, &bufs),
            (status(VIRTIO_BLK_S_OK), 1025)
        );
        assert_eq!(read_guest(&mem, DATA, 1024), disk_pattern()[1024..2048]);
    }

    #[test]
    fn write_then_read_round_trips_across_buffers() {
        let (file, mut block) = disk(false);
        let mem = memory();
        let payload: Vec<u8> = (0..1024u32).map(|i| (i * 7) as u8).collect();
        mem.write_slice(&payload[..512], GuestAddress(DATA))
            .unwrap();
        mem.write_slice(&payload[512..], GuestAddress(DATA + 0x1000))
            .unwrap();
        write_header(&mem, VIRTIO_BLK_T_OUT, 3);
        let bufs = [
            HEADER_BUF,
            Buf(DATA, 512, false),
            Buf(DATA + 0x1000, 512, false),
            STATUS_BUF,
        ];
        assert_eq!(
            submit(&mut block, &mem, &bufs),
            (status(VIRTIO_BLK_S_OK), 1)
        );

        let on_disk = std::fs::read(file.path()).unwrap();
        assert_eq!(on_disk[3 * 512..5 * 512], payload[..]);
        assert_eq!(on_disk[..3 * 512], disk_pattern()[..3 * 512]);
        assert_eq!(on_disk[5 * 512..], disk_pattern()[5 * 512..]);

        write_header(&mem, VIRTIO_BLK_T_IN, 3);
        let bufs = [HEADER_BUF, Buf(0x5_0000, 1024, true), STATUS_BUF];
        assert_eq!(
            submit(&mut block, &mem, &bufs),
            (status(VIRTIO_BLK_S_OK), 1025)
        );
        assert_eq!(read_guest(&mem, 0x5_0000, 1024), payload);
    }

    #[test]
    fn flush_succeeds() {
        let (_file, mut block) = disk(false);
        let mem = memory();
        write_header(&mem, VIRTIO_BLK_T_FLUSH, 0);
        let bufs = [HEADER_BUF, STATUS_BUF];
        assert_eq!(
            submit(&mut block, &mem, &bufs),
            (status(VIRTIO_BLK_S_OK), 1)
        );
    }

    #[test]
    fn requests_outside_the_disk_or_of_partial_sectors_fail() {
        let (_file, mut block) = disk(false);
        let mem = memory();
        let cases = [
            (DISK_SECTORS - 1, 1024),
            (DISK_SECTORS, 512),
            (u64::MAX, 512),
            (0, 100),
        ];
        for (sector, len) in cases {
            for kind in [VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT] {
                write_header(&mem, kind, sector);
                let bufs = [
                    HEADER_BUF,
                    Buf(DATA, len, kind == VIRTIO_BLK_T_IN),
                    STATUS_BUF,
                ];
                assert_eq!(
                    submit(&mut block, &mem, &bufs),
                    (status(VIRTIO_BLK_S_IOERR), 1),
                    "type {kind}, sector {sector}, {len} bytes"
                );
            }
        }
        // The last sector itself is reachable.
        write_header(&mem, VIRTIO_BLK_T_IN, DISK_SECTORS - 1);
        let bufs = [HEADER_BUF, Buf(DATA, 512, true), STATUS_BUF];
        assert_eq!(submit(&mut block, &mem, &bufs).0, status(VIRTIO_BLK_S_OK));
    }

    #[test]
    fn data_buffers_in_the_wrong_direction_fail() {
        let (_file, mut block) = disk(false);
        let mem = memory();
        write_header(&mem, VIRTIO_BLK_T_IN, 0);
        let bufs = [HEADER_BUF, Buf(DATA, 512, false), STATUS_BUF];
        assert_eq!(
            submit(&mut block, &mem, &bufs),
            (status(VIRTIO_BLK_S_IOERR), 1)
        );
    }

    #[test]
    fn a_read_only_disk_refuses_writes() {
        let (file, mut block) = disk(true);
        assert_ne!(block.features() & (1 << VIRTIO_BLK_F_RO), 0);
        let mem = memory();
        write_header(&mem, VIRTIO_BLK_T_OUT, 0);
        let bufs = [HEADER_BUF, Buf(DATA, 512, false), STATUS_BUF];
        assert_eq!(
            submit(&mut block, &mem, &bufs),
            (status(VIRTIO_BLK_S_IOERR), 1)
        );
        assert_eq!(std::fs::read(file.path()).unwrap(), disk_pattern());

        write_header(&mem, VIRTIO_BLK_T_IN, 0);
        let bufs = [HEADER_BUF, Buf(DATA, 512, true), STATUS_BUF];
        assert_eq!(submit(&mut block, &mem, &bufs).0, status(VIRTIO_BLK_S_OK));
    }

    #[test]
    fn unknown_request_types_are_unsupported() {
        let (_file, mut block) = disk(false);
        let mem = memory();
        write_header(&mem, UNKNOWN_REQUEST, 0);
        let bufs = [HEADER_BUF, Buf(DATA, 512, true), STATUS_BUF];
        assert_eq!(
            submit(&mut block, &mem, &bufs),
            (status(VIRTIO_BLK_S_UNSUPP), 1)
        );
    }

    #[test]
    fn get_id_reports_the_file_name() {
        let dir = tempfile::tempdir().unwrap();
        let short = dir.path().join("root.ext4");
        let long = dir.path().join("a-very-long-image-name-indeed.ext4");
        let mem = memory();
        for (path, id) in [
            (&short, &b"root.ext4\0\0\0\0\0\0\0\0\0\0\0"[..]),
            (&long, &b"a-very-long-image-na"[..]),
        ] {
            std::fs::write(path, [0u8; 512]).unwrap();
            let mut block = Block::new(&DiskSource::Raw(path.clone()), true).unwrap();
            mem.write_slice(&[0xaa; 32], GuestAddress(DATA)).unwrap();
            write_header(&mem, VIRTIO_BLK_T_GET_ID, 0);
            let bufs = [HEADER_BUF, Buf(DATA, 20, true), STATUS_BUF];
            assert_eq!(
                submit(&mut block, &mem, &bufs),
                (status(VIRTIO_BLK_S_OK), 21)
            );
            assert_eq!(read_guest(&mem, DATA, 20), id);
        }
    }

    #[test]
    fn malformed_chains_are_returned_unanswered() {
        let (_file, mut block) = disk(false);
        let mem = memory();
        write_header(&mem, VIRTIO_BLK_T_IN, 0);
        let malformed: [&[Buf]; 5] = [
            // No header.
            &[STATUS_BUF],
            // Header the device could write.
            &[Buf(HEADER, HEADER_SIZE, true), STATUS_BUF],
            // Header too short.
            &[Buf(HEADER, 8, false), STATUS_BUF],
            // No device-writable status.
            &[HEADER_BUF, Buf(DATA, 512, true), Buf(STATUS, 1, false)],
            // Header outside guest memory.
            &[Buf(0x4000_0000, HEADER_SIZE, false), STATUS_BUF],
        ];
        for bufs in malformed {
            assert_eq!(submit(&mut block, &mem, bufs), (UNTOUCHED, 0));
        }
    }

    #[test]
    fn config_space_holds_capacity_and_seg_max() {
        let (_file, block) = disk(false);
        let mut config = [0xffu8; 24];
        block.read_config(0, &mut config);
        assert_eq!(config[..8], DISK_SECTORS.to_le_bytes());
        assert_eq!(config[12..16], SEG_MAX.to_le_bytes());
        assert_eq!(config[16..], [0; 8]);
        let mut capacity_high = [0xffu8; 4];
        block.read_config(4, &mut capacity_high);
        assert_eq!(capacity_high, [0; 4]);
    }

    #[test]
    fn images_of_partial_sectors_are_rejected_by_name() {
        let mut file = NamedTempFile::new().unwrap();
        file.write_all(&[0; 1000]).unwrap();
        let err = Block::new(&DiskSource::Raw(file.path().into()), false)
            .err()
            .unwrap();
        let message = err.to_string();
        assert!(matches!(err, BlockError::PartialSector { size: 1000, .. }));
        assert!(
            message.contains(&file.path().display().to_string()),
            "{message}"
        );
    }

    #[test]
    fn a_missing_image_is_an_open_error() {
        let dir = tempfile::tempdir().unwrap();
        let err = Block::new(&DiskSource::Raw(dir.path().join("missing.img")), true)
            .err()
            .unwrap();
        assert!(matches!(err, BlockError::Open { .. }), "{err}");
    }

    #[test]
    fn an_empty_drive_has_no_sectors_and_keeps_its_read_only() {
        let mut block = Block::new(&DiskSource::Empty, false).unwrap();
        assert!(block.is_slot());
        let mut capacity = [0xffu8; 8];
        block.read_config(0, &mut capacity);
        assert_eq!(capacity, [0; 8]);
        let mem = memory();
        write_header(&mem, VIRTIO_BLK_T_IN, 0);
        let bufs = [HEADER_BUF, Buf(DATA, 512, true), STATUS_BUF];
        assert_eq!(
            submit(&mut block, &mem, &bufs),
            (status(VIRTIO_BLK_S_IOERR), 1)
        );
        write_header(&mem, VIRTIO_BLK_T_FLUSH, 0);
        assert_eq!(
            submit(&mut block, &mem, &[HEADER_BUF, STATUS_BUF]),
            (status(VIRTIO_BLK_S_OK), 1)
        );
        assert_eq!(block.features() & (1 << VIRTIO_BLK_F_RO), 0);
        let read_only = Block::new(&DiskSource::Empty, true).unwrap();
        assert_ne!(read_only.features() & (1 << VIRTIO_BLK_F_RO), 0);
        let (_file, full) = disk(false);
        assert!(!full.is_slot());
    }

    #[test]
    fn an_attached_raw_image_is_the_drives_disk_from_then_on() {
        let mut block = Block::new(&DiskSource::Empty, false).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("pod-root.img");
        std::fs::write(&image, disk_pattern()).unwrap();
        block.attach(&DiskSource::Raw(image.clone())).unwrap();
        let mut capacity = [0u8; 8];
        block.read_config(0, &mut capacity);
        assert_eq!(u64::from_le_bytes(capacity), DISK_SECTORS);
        assert!(block.is_slot(), "a filled slot is still a slot");
        let mem = memory();
        write_header(&mem, VIRTIO_BLK_T_OUT, 3);
        mem.write_slice(&[7u8; 512], GuestAddress(DATA)).unwrap();
        let bufs = [HEADER_BUF, Buf(DATA, 512, false), STATUS_BUF];
        assert_eq!(
            submit(&mut block, &mem, &bufs),
            (status(VIRTIO_BLK_S_OK), 1)
        );
        assert_eq!(std::fs::read(&image).unwrap()[3 * 512..4 * 512], [7u8; 512]);
        write_header(&mem, VIRTIO_BLK_T_GET_ID, 0);
        let bufs = [HEADER_BUF, Buf(DATA, 20, true), STATUS_BUF];
        submit(&mut block, &mem, &bufs);
        assert_eq!(read_guest(&mem, DATA, 12), b"pod-root.img");
        let err = block.attach(&DiskSource::Raw(image.clone())).unwrap_err();
        assert!(matches!(err, AttachError::Occupied { .. }), "{err}");
        assert!(err.to_string().contains("pod-root.img"), "{err}");
    }

    #[test]
    fn what_cannot_fill_a_drive_is_refused_by_value() {
        let dir = tempfile::tempdir().unwrap();
        let (_file, mut full) = disk(false);
        let err = full.attach(&DiskSource::Empty).unwrap_err();
        assert!(matches!(err, AttachError::Occupied { .. }), "{err}");
        let mut block = Block::new(&DiskSource::Empty, false).unwrap();
        let err = block.attach(&DiskSource::Empty).unwrap_err();
        assert!(matches!(err, AttachError::EmptySource), "{err}");
        let image = dir.path().join("image.kiln");
        let without_overlay = DiskSource::Volume {
            image: image.clone(),
            overlay: None,
            cache_bytes: 1 << 20,
            hydration: None,
            hydration_access: CacheAccess::Fill,
        };
        let err = block.attach(&without_overlay).unwrap_err();
        assert!(matches!(err, AttachError::NoOverlay { .. }), "{err}");
        let hydrated = DiskSource::Volume {
            image: image.clone(),
            overlay: Some(dir.path().join("root.overlay")),
            cache_bytes: 1 << 20,
            hydration: Some("/var/cache/kiln".into()),
            hydration_access: CacheAccess::Fill,
        };
        let err = block.attach(&hydrated).unwrap_err();
        assert!(err.to_string().contains("/var/cache/kiln"), "{err}");
        let err = block
            .attach(&DiskSource::Raw(dir.path().join("missing.img")))
            .unwrap_err();
        assert!(
            matches!(err, AttachError::Open(BlockError::Open { .. })),
            "{err}"
        );
        // Refused, the drive is still empty and takes a disk.
        std::fs::write(dir.path().join("d.img"), [0u8; 1024]).unwrap();
        block
            .attach(&DiskSource::Raw(dir.path().join("d.img")))
            .unwrap();
    }

    #[test]
    fn a_detached_slot_has_no_sectors_and_takes_another_disk() {
        let dir = tempfile::tempdir().unwrap();
        let mut block = Block::new(&DiskSource::Empty, false).unwrap();
        let first = dir.path().join("first.img");
        std::fs::write(&first, disk_pattern()).unwrap();
        block.attach(&DiskSource::Raw(first)).unwrap();
        block.detach().unwrap();
        let mut capacity = [0xffu8; 8];
        block.read_config(0, &mut capacity);
        assert_eq!(capacity, [0; 8]);
        let mem = memory();
        write_header(&mem, VIRTIO_BLK_T_IN, 0);
        let read = [HEADER_BUF, Buf(DATA, 512, true), STATUS_BUF];
        assert_eq!(
            submit(&mut block, &mem, &read),
            (status(VIRTIO_BLK_S_IOERR), 1)
        );
        assert_eq!(block.features() & (1 << VIRTIO_BLK_F_RO), 0);

        let second = dir.path().join("second.img");
        std::fs::write(&second, [0x42u8; 1024]).unwrap();
        block.attach(&DiskSource::Raw(second)).unwrap();
        block.read_config(0, &mut capacity);
        assert_eq!(u64::from_le_bytes(capacity), 2);
        write_header(&mem, VIRTIO_BLK_T_IN, 1);
        assert_eq!(submit(&mut block, &mem, &read).0, status(VIRTIO_BLK_S_OK));
        assert_eq!(read_guest(&mem, DATA, 512), [0x42u8; 512]);
        write_header(&mem, VIRTIO_BLK_T_GET_ID, 0);
        let id = [HEADER_BUF, Buf(DATA, 20, true), STATUS_BUF];
        submit(&mut block, &mem, &id);
        assert_eq!(read_guest(&mem, DATA, 11), b"second.img\0");
    }

    #[test]
    fn a_detached_volume_keeps_its_writes_and_lets_go_of_its_overlay() {
        let dir = tempfile::tempdir().unwrap();
        let source = volume_source(dir.path(), false);
        let mut block = Block::new(&DiskSource::Empty, false).unwrap();
        block.attach(&source).unwrap();
        let mem = memory();
        mem.write_slice(&[0x5a; 4096], GuestAddress(DATA)).unwrap();
        write_header(&mem, VIRTIO_BLK_T_OUT, 8);
        let out = [HEADER_BUF, Buf(DATA, 4096, false), STATUS_BUF];
        assert_eq!(submit(&mut block, &mem, &out).0, status(VIRTIO_BLK_S_OK));
        block.detach().unwrap();
        // The overlay's lock went with its file: the volume opens again
        // (as another VM's would), with the write in it.
        block.attach(&source).unwrap();
        mem.write_slice(&[0; 512], GuestAddress(DATA)).unwrap();
        write_header(&mem, VIRTIO_BLK_T_IN, 8);
        let read = [HEADER_BUF, Buf(DATA, 512, true), STATUS_BUF];
        assert_eq!(submit(&mut block, &mem, &read).0, status(VIRTIO_BLK_S_OK));
        assert_eq!(read_guest(&mem, DATA, 512), [0x5a; 512]);
    }

    #[test]
    fn only_a_filled_slot_is_detached() {
        let (_file, mut full) = disk(false);
        let err = full.detach().unwrap_err();
        assert!(matches!(err, DetachError::NotASlot { .. }), "{err}");
        assert!(err.to_string().contains("expected a drive slot"), "{err}");
        let mut capacity = [0u8; 8];
        full.read_config(0, &mut capacity);
        assert_eq!(u64::from_le_bytes(capacity), DISK_SECTORS);
        let mut empty = Block::new(&DiskSource::Empty, true).unwrap();
        let err = empty.detach().unwrap_err();
        assert!(matches!(err, DetachError::AlreadyEmpty), "{err}");
    }

    /// A volume over an image of `disk_pattern()` (chunks of 4 sectors'
    /// worth of overlay blocks), with an overlay unless `read_only`.
    fn volume(dir: &Path, read_only: bool) -> Block {
        Block::new(&volume_source(dir, read_only), read_only).unwrap()
    }

    /// The source of [`volume`]'s block, its files made.
    fn volume_source(dir: &Path, read_only: bool) -> DiskSource {
        let raw = dir.join("raw");
        std::fs::write(&raw, disk_pattern()).unwrap();
        let image = dir.join("image.kiln");
        kiln_image::write(&raw, &image, 4096).unwrap();
        let overlay = dir.join("root.overlay");
        if !read_only {
            drop(Volume::create(&image, &overlay, 1 << 20).unwrap());
        }
        DiskSource::Volume {
            image,
            overlay: Some(overlay),
            cache_bytes: 1 << 20,
            hydration: None,
            hydration_access: CacheAccess::Fill,
        }
    }

    fn write_discard_segment(mem: &GuestMemoryMmap, sector: u64, sectors: u32, flags: u32) {
        let mut raw = [0u8; DISCARD_SEGMENT_SIZE as usize];
        raw[..8].copy_from_slice(&sector.to_le_bytes());
        raw[8..12].copy_from_slice(&sectors.to_le_bytes());
        raw[12..].copy_from_slice(&flags.to_le_bytes());
        mem.write_slice(&raw, GuestAddress(DATA)).unwrap();
    }

    #[test]
    fn a_volume_serves_reads_writes_and_discards() {
        let dir = tempfile::tempdir().unwrap();
        let mut block = volume(dir.path(), false);
        assert!(block.discards());
        assert_ne!(block.features() & (1 << VIRTIO_BLK_F_DISCARD), 0);
        let mut alignment = [0u8; 4];
        block.read_config(
            offset_of!(virtio_blk_config, discard_sector_alignment) as u64,
            &mut alignment,
        );
        assert_eq!(u32::from_le_bytes(alignment), 8);
        let mem = memory();
        mem.write_slice(&[0x77; 4096], GuestAddress(DATA)).unwrap();
        write_header(&mem, VIRTIO_BLK_T_OUT, 8);
        let out = [HEADER_BUF, Buf(DATA, 4096, false), STATUS_BUF];
        assert_eq!(submit(&mut block, &mem, &out).0, status(VIRTIO_BLK_S_OK));
        write_header(&mem, VIRTIO_BLK_T_IN, 7);
        let read = [HEADER_BUF, Buf(0x5_0000, 1024, true), STATUS_BUF];
        assert_eq!(submit(&mut block, &mem, &read).0, status(VIRTIO_BLK_S_OK));
        let mut expected = disk_pattern()[7 * 512..8 * 512].to_vec();
        expected.extend([0x77; 512]);
        assert_eq!(read_guest(&mem, 0x5_0000, 1024), expected);

        // Discarding the written block: it reads as the image again.
        write_discard_segment(&mem, 8, 8, 0);
        write_header(&mem, VIRTIO_BLK_T_DISCARD, 0);
        let discard = [
            HEADER_BUF,
            Buf(DATA, DISCARD_SEGMENT_SIZE, false),
            STATUS_BUF,
        ];
        assert_eq!(
            submit(&mut block, &mem, &discard).0,
            status(VIRTIO_BLK_S_OK)
        );
        write_header(&mem, VIRTIO_BLK_T_IN, 8);
        let read = [HEADER_BUF, Buf(0x5_0000, 512, true), STATUS_BUF];
        assert_eq!(submit(&mut block, &mem, &read).0, status(VIRTIO_BLK_S_OK));
        assert_eq!(
            read_guest(&mem, 0x5_0000, 512),
            disk_pattern()[8 * 512..9 * 512]
        );

        // Flags are for WRITE_ZEROES; ranges must lie inside the disk.
        write_discard_segment(&mem, 0, 8, 1);
        write_header(&mem, VIRTIO_BLK_T_DISCARD, 0);
        assert_eq!(
            submit(&mut block, &mem, &discard).0,
            status(VIRTIO_BLK_S_UNSUPP)
        );
        write_discard_segment(&mem, DISK_SECTORS - 4, 8, 0);
        assert_eq!(
            submit(&mut block, &mem, &discard).0,
            status(VIRTIO_BLK_S_IOERR)
        );
    }

    #[test]
    fn a_read_only_volume_offers_no_discard_and_refuses_writes() {
        let dir = tempfile::tempdir().unwrap();
        let mut block = volume(dir.path(), true);
        assert_eq!(block.features() & (1 << VIRTIO_BLK_F_DISCARD), 0);
        assert_ne!(block.features() & (1 << VIRTIO_BLK_F_RO), 0);
        let mem = memory();
        write_header(&mem, VIRTIO_BLK_T_DISCARD, 0);
        let bufs = [
            HEADER_BUF,
            Buf(DATA, DISCARD_SEGMENT_SIZE, false),
            STATUS_BUF,
        ];
        assert_eq!(
            submit(&mut block, &mem, &bufs).0,
            status(VIRTIO_BLK_S_UNSUPP)
        );
        write_header(&mem, VIRTIO_BLK_T_OUT, 0);
        let bufs = [HEADER_BUF, Buf(DATA, 512, false), STATUS_BUF];
        assert_eq!(
            submit(&mut block, &mem, &bufs).0,
            status(VIRTIO_BLK_S_IOERR)
        );
    }

    #[test]
    fn a_damaged_chunk_is_an_io_error_not_wrong_data() {
        let dir = tempfile::tempdir().unwrap();
        let mut block = volume(dir.path(), true);
        let image = dir.path().join("image.kiln");
        let mut bytes = std::fs::read(&image).unwrap();
        // The first chunk's frame follows the 64-byte header.
        bytes[70] ^= 0x10;
        std::fs::write(&image, bytes).unwrap();
        let mem = memory();
        mem.write_slice(&[0xcc; 512], GuestAddress(DATA)).unwrap();
        write_header(&mem, VIRTIO_BLK_T_IN, 0);
        let bufs = [HEADER_BUF, Buf(DATA, 512, true), STATUS_BUF];
        assert_eq!(
            submit(&mut block, &mem, &bufs),
            (status(VIRTIO_BLK_S_IOERR), 1)
        );
        assert_eq!(read_guest(&mem, DATA, 512), [0xcc; 512]);
        // The next chunk is intact.
        write_header(&mem, VIRTIO_BLK_T_IN, 8);
        assert_eq!(submit(&mut block, &mem, &bufs).0, status(VIRTIO_BLK_S_OK));
        assert_eq!(read_guest(&mem, DATA, 512), disk_pattern()[4096..4608]);
    }

    #[test]
    fn a_buffer_outside_guest_memory_fails_the_request_with_nothing_written() {
        let (file, mut block) = disk(false);
        let mem = memory();
        mem.write_slice(&[0x55; 512], GuestAddress(DATA)).unwrap();
        write_header(&mem, VIRTIO_BLK_T_OUT, 0);
        // The first buffer is fine; the second is past the end of memory.
        let bufs = [
            HEADER_BUF,
            Buf(DATA, 512, false),
            Buf(0xf_ff00, 512, false),
            STATUS_BUF,
        ];
        assert_eq!(
            submit(&mut block, &mem, &bufs),
            (status(VIRTIO_BLK_S_IOERR), 1)
        );
        assert_eq!(std::fs::read(file.path()).unwrap(), disk_pattern());
    }

    #[test]
    fn a_volume_checks_guest_memory_before_reading_the_disk() {
        let dir = tempfile::tempdir().unwrap();
        let mut block = volume(dir.path(), true);
        // Every chunk of the image is damaged: reading any of them fails.
        let image = dir.path().join("image.kiln");
        let mut bytes = std::fs::read(&image).unwrap();
        bytes[70] ^= 0x10;
        std::fs::write(&image, bytes).unwrap();
        let mem = memory();
        let whole_disk = (DISK_SECTORS * SECTOR_SIZE) as u32;
        let request = Request {
            kind: VIRTIO_BLK_T_IN,
            sector: 0,
            // Its claimed length runs past the end of guest memory.
            data: vec![Descriptor::new(
                0xf_f000,
                whole_disk,
                VRING_DESC_F_WRITE as u16,
                0,
            )],
            status: Descriptor::new(STATUS, 1, VRING_DESC_F_WRITE as u16, 0),
        };
        let err = block.disk.move_data(&mem, &request, true).unwrap_err();
        assert!(
            matches!(err, TransferError::GuestMemory { addr: 0xf_f000, len } if len == whole_disk),
            "{err}"
        );
    }

    #[test]
    fn discards_beyond_the_offered_segments_are_refused_unread() {
        let dir = tempfile::tempdir().unwrap();
        let mut block = volume(dir.path(), false);
        let mem = memory();
        write_header(&mem, VIRTIO_BLK_T_DISCARD, 0);
        // Two valid segments where one is offered (max_discard_seg) ...
        write_discard_segment(&mem, 0, 8, 0);
        mem.write_slice(&read_guest(&mem, DATA, 16), GuestAddress(DATA + 16))
            .unwrap();
        let two = [
            HEADER_BUF,
            Buf(DATA, 2 * DISCARD_SEGMENT_SIZE, false),
            STATUS_BUF,
        ];
        assert_eq!(submit(&mut block, &mem, &two).0, status(VIRTIO_BLK_S_IOERR));
        // ... and a buffer claiming almost 4 GiB of segments (as much as
        // a chain may hold with its header and status).
        let huge = [HEADER_BUF, Buf(DATA, u32::MAX - 31, false), STATUS_BUF];
        assert_eq!(
            submit(&mut block, &mem, &huge).0,
            status(VIRTIO_BLK_S_IOERR)
        );
    }

    #[test]
    fn activation_needs_exactly_one_queue() {
        let (_file, mut block) = disk(false);
        let interrupt = Arc::new(Interrupt::new(EventFd::new(EFD_NONBLOCK).unwrap()));
        let err = block.activate(0, memory(), Vec::new(), interrupt).err();
        assert!(matches!(
            err,
            Some(ActivateError::QueueCount {
                expected: 1,
                found: 0
            })
        ));
    }
}
