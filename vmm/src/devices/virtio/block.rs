//! virtio-blk (virtio 1.2 §5.2) backed by a raw disk image.
//!
//! One request queue. Each request is a descriptor chain: a device-readable
//! header (type, sector), data buffers, and a device-writable status byte
//! (§5.2.6). Reads and writes go to the image with pread/pwrite straight
//! into and out of guest memory; FLUSH is an fdatasync that completes before
//! the request is reported used.

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_ID_BYTES,
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::bitmap::BitmapSlice;
use vm_memory::{Bytes, ReadVolatile, VolatileMemoryError, VolatileSlice, WriteVolatile};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use super::{ActivateError, GuestMemoryMmap, Interrupt, VirtioDevice};

/// Size of the request queue.
pub const QUEUE_SIZE: u16 = 256;

/// The unit of `capacity` and of request sectors, whatever the disk's
/// block size (§5.2.4).
pub const SECTOR_SIZE: u64 = 512;

/// Data buffers per request: a chain holds at most `QUEUE_SIZE` descriptors
/// (no indirect descriptors are offered), two of them the header and status.
const SEG_MAX: u32 = QUEUE_SIZE as u32 - 2;

/// `struct virtio_blk_outhdr`: le32 type, le32 reserved, le64 sector (§5.2.6).
const HEADER_SIZE: u32 = 16;
const HEADER_TYPE_OFFSET: usize = 0;
const HEADER_SECTOR_OFFSET: usize = 8;

/// `struct virtio_blk_config` up to `seg_max` (§5.2.4): le64 capacity,
/// le32 size_max (feature not offered: zero), le32 seg_max.
const CONFIG_SIZE: usize = 16;
const CONFIG_CAPACITY_OFFSET: usize = 0;
const CONFIG_SEG_MAX_OFFSET: usize = 12;

/// Errors from opening a disk image.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    /// The image could not be opened.
    #[error("cannot open disk image {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The image's size could not be determined.
    #[error("cannot determine the size of disk image {path}")]
    Size {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// virtio-blk counts in 512-byte sectors; a partial sector is unreachable.
    #[error("disk image {path} is {size} bytes, not a multiple of {SECTOR_SIZE}-byte sectors")]
    PartialSector { path: PathBuf, size: u64 },
    /// The queue's eventfd could not be created.
    #[error("cannot create the queue eventfd of disk {path}")]
    EventFd {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// Why a request chain cannot even be answered with a status (§5.2.6:
/// without a readable header and a writable status byte there is nothing to
/// answer). Such chains go back to the driver with nothing written.
#[derive(Debug, thiserror::Error)]
enum ChainError {
    #[error("the chain has no device-readable header of {HEADER_SIZE} bytes")]
    Header,
    #[error("the chain has no device-writable status byte")]
    Status,
    #[error("the header cannot be read from guest memory")]
    HeaderMemory,
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

/// A request as parsed from its chain.
struct Request {
    kind: u32,
    sector: u64,
    data: Vec<Descriptor>,
    status: Descriptor,
}

impl Request {
    fn parse(
        mem: &GuestMemoryMmap,
        chain: DescriptorChain<&GuestMemoryMmap>,
    ) -> Result<Self, ChainError> {
        let mut descriptors: Vec<Descriptor> = chain.collect();
        let status = descriptors
            .pop()
            .filter(|d| d.is_write_only() && d.len() >= 1)
            .ok_or(ChainError::Status)?;
        if descriptors.is_empty() {
            return Err(ChainError::Header);
        }
        let header = descriptors.remove(0);
        if header.is_write_only() || header.len() < HEADER_SIZE {
            return Err(ChainError::Header);
        }
        let mut raw = [0u8; HEADER_SIZE as usize];
        mem.read_slice(&mut raw, header.addr())
            .map_err(|_| ChainError::HeaderMemory)?;
        Ok(Self {
            kind: le_u32(&raw, HEADER_TYPE_OFFSET),
            sector: le_u64(&raw, HEADER_SECTOR_OFFSET),
            data: descriptors,
            status,
        })
    }

    /// Total length of the data buffers, if they all go in the direction
    /// the request needs.
    fn data_len(&self, device_writes: bool) -> Option<u64> {
        self.data
            .iter()
            .all(|d| d.is_write_only() == device_writes)
            .then(|| self.data.iter().map(|d| u64::from(d.len())).sum())
    }
}

/// The disk image.
struct Disk {
    file: File,
    read_only: bool,
    /// Size in sectors.
    capacity: u64,
}

impl Disk {
    fn execute(&self, mem: &GuestMemoryMmap, request: &Request, id: &[u8]) -> Completion {
        match request.kind {
            VIRTIO_BLK_T_IN => self.transfer(mem, request, true),
            VIRTIO_BLK_T_OUT if self.read_only => Completion::status(VIRTIO_BLK_S_IOERR),
            VIRTIO_BLK_T_OUT => self.transfer(mem, request, false),
            VIRTIO_BLK_T_FLUSH => match self.file.sync_data() {
                Ok(()) => Completion::status(VIRTIO_BLK_S_OK),
                Err(_) => Completion::status(VIRTIO_BLK_S_IOERR),
            },
            VIRTIO_BLK_T_GET_ID => write_id(mem, request, id),
            _ => Completion::status(VIRTIO_BLK_S_UNSUPP),
        }
    }

    /// IN (`to_guest`) or OUT: whole sectors within the disk.
    fn transfer(&self, mem: &GuestMemoryMmap, request: &Request, to_guest: bool) -> Completion {
        let in_range = request.data_len(to_guest).filter(|&len| {
            len % SECTOR_SIZE == 0
                && request
                    .sector
                    .checked_add(len / SECTOR_SIZE)
                    .is_some_and(|end| end <= self.capacity)
        });
        let Some(len) = in_range else {
            return Completion::status(VIRTIO_BLK_S_IOERR);
        };
        let mut file = FileAt {
            file: &self.file,
            offset: request.sector * SECTOR_SIZE,
        };
        let moved = request.data.iter().try_for_each(|d| {
            let count = d.len() as usize;
            if to_guest {
                mem.read_exact_volatile_from(d.addr(), &mut file, count)
            } else {
                mem.write_all_volatile_to(d.addr(), &mut file, count)
            }
        });
        match moved {
            // `len` fits: virtio-queue ends a chain before it exceeds
            // u32::MAX bytes (§2.7.5.2 forbids longer ones).
            Ok(()) if to_guest => Completion {
                status: VIRTIO_BLK_S_OK,
                written: u32::try_from(len).unwrap_or(u32::MAX),
            },
            Ok(()) => Completion::status(VIRTIO_BLK_S_OK),
            Err(_) => Completion::status(VIRTIO_BLK_S_IOERR),
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

/// What the device holds between activation and reset.
struct Active {
    mem: GuestMemoryMmap,
    queue: Queue,
    interrupt: Arc<Interrupt>,
}

/// A virtio block device.
pub struct Block {
    disk: Disk,
    /// GET_ID's answer: the image's file name, at most 20 bytes.
    id: Vec<u8>,
    features: u64,
    config: [u8; CONFIG_SIZE],
    queue_evts: [EventFd; 1],
    active: Option<Active>,
}

impl Block {
    /// A block device for the image at `path`, which the guest may not
    /// write when `read_only`.
    pub fn new(path: &Path, read_only: bool) -> Result<Self, BlockError> {
        let mut file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(path)
            .map_err(|source| BlockError::Open {
                path: path.to_path_buf(),
                source,
            })?;
        // Seeking to the end also sizes block devices, whose metadata says 0.
        let size = file
            .seek(SeekFrom::End(0))
            .map_err(|source| BlockError::Size {
                path: path.to_path_buf(),
                source,
            })?;
        if size % SECTOR_SIZE != 0 {
            return Err(BlockError::PartialSector {
                path: path.to_path_buf(),
                size,
            });
        }
        let queue_evt = EventFd::new(EFD_NONBLOCK).map_err(|source| BlockError::EventFd {
            path: path.to_path_buf(),
            source,
        })?;
        let capacity = size / SECTOR_SIZE;
        Ok(Self {
            disk: Disk {
                file,
                read_only,
                capacity,
            },
            id: serial_id(path),
            features: offered_features(read_only),
            config: config_space(capacity),
            queue_evts: [queue_evt],
            active: None,
        })
    }

    /// Serves every request the driver has made available, then interrupts
    /// the driver once if any was completed.
    fn process_queue(&mut self) {
        let Some(active) = &mut self.active else {
            return;
        };
        let mem = &active.mem;
        let mut completed = false;
        while let Some(chain) = active.queue.pop_descriptor_chain(mem) {
            let head = chain.head_index();
            let written = match Request::parse(mem, chain) {
                Ok(request) => complete(mem, &self.disk, &self.id, &request),
                Err(err) => {
                    eprintln!("kiln: virtio-blk: dropping request {head}: {err}");
                    0
                }
            };
            if let Err(err) = active.queue.add_used(mem, head, written) {
                eprintln!("kiln: virtio-blk: cannot return request {head}: {err}");
                break;
            }
            completed = true;
        }
        if completed && let Err(err) = active.interrupt.signal_used_queue() {
            eprintln!("kiln: virtio-blk: cannot interrupt the driver: {err}");
        }
    }
}

/// Executes `request` and writes its status byte; returns the used length
/// (every byte the device wrote into the chain, status included).
fn complete(mem: &GuestMemoryMmap, disk: &Disk, id: &[u8], request: &Request) -> u32 {
    let completion = disk.execute(mem, request, id);
    // The status values are all below 256 (§5.2.6).
    let status = completion.status as u8;
    match mem.write_obj(status, request.status.addr()) {
        Ok(()) => completion.written.saturating_add(1),
        // The driver pointed the status outside its memory: it gets the
        // data, and no status to read.
        Err(_) => completion.written,
    }
}

fn offered_features(read_only: bool) -> u64 {
    let ro = if read_only { 1 << VIRTIO_BLK_F_RO } else { 0 };
    (1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_BLK_F_FLUSH) | (1 << VIRTIO_BLK_F_SEG_MAX) | ro
}

fn config_space(capacity: u64) -> [u8; CONFIG_SIZE] {
    let mut config = [0u8; CONFIG_SIZE];
    config[CONFIG_CAPACITY_OFFSET..][..8].copy_from_slice(&capacity.to_le_bytes());
    config[CONFIG_SEG_MAX_OFFSET..][..4].copy_from_slice(&SEG_MAX.to_le_bytes());
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

fn le_u32(bytes: &[u8], offset: usize) -> u32 {
    let mut raw = [0u8; 4];
    raw.copy_from_slice(&bytes[offset..offset + 4]);
    u32::from_le_bytes(raw)
}

fn le_u64(bytes: &[u8], offset: usize) -> u64 {
    let mut raw = [0u8; 8];
    raw.copy_from_slice(&bytes[offset..offset + 8]);
    u64::from_le_bytes(raw)
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
        // Bytes past the fields this device defines read as zero.
        data.fill(0);
        let start = usize::try_from(offset)
            .unwrap_or(usize::MAX)
            .min(CONFIG_SIZE);
        let available = &self.config[start..];
        let len = available.len().min(data.len());
        data[..len].copy_from_slice(&available[..len]);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // Only `writeback` is writable, and only with VIRTIO_BLK_F_CONFIG_WCE,
        // which this device does not offer.
        eprintln!(
            "kiln: virtio-blk: ignoring a {}-byte write to read-only config offset {offset:#x}",
            data.len()
        );
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
        let [queue] =
            <[Queue; 1]>::try_from(queues).map_err(|queues| ActivateError::QueueCount {
                expected: 1,
                found: queues.len(),
            })?;
        self.active = Some(Active {
            mem,
            queue,
            interrupt,
        });
        // Requests made available before activation were notified then, and
        // ignored. Serve them from the event loop: activation runs on a vCPU
        // thread, whose seccomp filter rightly has no file I/O.
        if let Err(err) = self.queue_evts[0].write(1) {
            eprintln!("kiln: virtio-blk: cannot wake the request queue: {err}");
        }
        Ok(())
    }

    fn reset(&mut self) {
        self.active = None;
    }
}

impl MutEventSubscriber for Block {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(err) = ops.add(Events::new(&self.queue_evts[0], EventSet::IN)) {
            eprintln!("kiln: virtio-blk: cannot watch the request queue: {err}");
        }
    }

    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        // The count only says "at least one notification"; the ring says what.
        let _ = self.queue_evts[0].read();
        self.process_queue();
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use tempfile::NamedTempFile;
    use virtio_bindings::virtio_mmio::VIRTIO_MMIO_INT_VRING;
    use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use virtio_queue::desc::RawDescriptor;
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::GuestAddress;

    use super::*;

    const HEADER: u64 = 0x1_0000;
    const DATA: u64 = 0x2_0000;
    const STATUS: u64 = 0x9_0000;
    const DISK_SECTORS: u64 = 16;
    /// What the status byte holds before the device answers.
    const UNTOUCHED: u8 = 0xee;
    const UNKNOWN_REQUEST: u32 = 99;

    /// One buffer of a request chain: guest address, length, device-writable.
    #[derive(Clone, Copy)]
    struct Buf(u64, u32, bool);

    const HEADER_BUF: Buf = Buf(HEADER, HEADER_SIZE, false);
    const STATUS_BUF: Buf = Buf(STATUS, 1, true);

    fn memory() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap()
    }

    /// Disk byte `i` is distinct within each sector and between sectors.
    fn disk_pattern() -> Vec<u8> {
        (0..DISK_SECTORS * SECTOR_SIZE)
            .map(|i| (i % 251) as u8 ^ (i / SECTOR_SIZE) as u8)
            .collect()
    }

    fn disk(read_only: bool) -> (NamedTempFile, Block) {
        let mut file = NamedTempFile::new().unwrap();
        file.write_all(&disk_pattern()).unwrap();
        let block = Block::new(file.path(), read_only).unwrap();
        (file, block)
    }

    fn write_header(mem: &GuestMemoryMmap, kind: u32, sector: u64) {
        let mut raw = [0u8; HEADER_SIZE as usize];
        raw[HEADER_TYPE_OFFSET..][..4].copy_from_slice(&kind.to_le_bytes());
        raw[HEADER_SECTOR_OFFSET..][..8].copy_from_slice(&sector.to_le_bytes());
        mem.write_slice(&raw, GuestAddress(HEADER)).unwrap();
    }

    /// The chain's descriptors, linked in order.
    fn chain(bufs: &[Buf]) -> Vec<RawDescriptor> {
        let last = bufs.len() - 1;
        bufs.iter()
            .enumerate()
            .map(|(i, &Buf(addr, len, writable))| {
                let mut flags = if writable { VRING_DESC_F_WRITE } else { 0 };
                if i < last {
                    flags |= VRING_DESC_F_NEXT;
                }
                RawDescriptor::from(Descriptor::new(addr, len, flags as u16, i as u16 + 1))
            })
            .collect()
    }

    /// Submits one chain, lets the device serve it, and returns the status
    /// byte and the used length.
    fn submit(block: &mut Block, mem: &GuestMemoryMmap, bufs: &[Buf]) -> (u8, u32) {
        mem.write_obj(UNTOUCHED, GuestAddress(STATUS)).unwrap();
        let queue = MockSplitQueue::new(mem, 16);
        queue.add_desc_chains(&chain(bufs), 0).unwrap();
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
            let mut block = Block::new(path, true).unwrap();
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
        let err = Block::new(file.path(), false).err().unwrap();
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
        let err = Block::new(&dir.path().join("missing.img"), true)
            .err()
            .unwrap();
        assert!(matches!(err, BlockError::Open { .. }), "{err}");
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
