//! The seccomp filters are enforced: a thread under its filter survives the
//! calls its steady state makes and kills the process with SIGSYS on any
//! other. Each test runs itself again as a child process (selected by an
//! environment variable), where a thread installs the real filter.

use std::fs::File;
use std::io::Write;
use std::os::fd::OwnedFd;
use std::os::unix::fs::FileExt;
use std::sync::mpsc::RecvTimeoutError;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use event_manager::{EventManager, SubscriberOps};
use kiln_vmm::config::CacheAccess;
use kiln_vmm::devices::serial::{Serial, SerialInput};
use kiln_vmm::devices::virtio::block::{Block, DiskSource};
use kiln_vmm::devices::virtio::mmio::MmioTransport;
use kiln_vmm::seccomp::ThreadKind;
use kiln_vmm::trace::{self, TRACE_ENV};
use kiln_vmm::volume::Volume;
use kiln_vmm::vstate::memory;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};
use vmm_sys_util::signal::{Killable, SIGRTMIN, register_signal_handler};

#[path = "support/filtered.rs"]
mod filtered;
use filtered::*;

/// The signal that kicks a vCPU thread out of KVM_RUN, with a handler that
/// only interrupts the call in progress.
fn kick_signal() -> libc::c_int {
    extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}
    register_signal_handler(SIGRTMIN(), on_kick).unwrap();
    SIGRTMIN()
}

/// A thread that holds `lock` for a while, so that whoever else takes it
/// waits on a futex.
fn hold_lock(lock: &Arc<Mutex<u64>>) -> JoinHandle<()> {
    let lock = lock.clone();
    let (locked_tx, locked_rx) = std::sync::mpsc::channel();
    let holder = std::thread::spawn(move || {
        let _held = lock.lock().unwrap();
        locked_tx.send(()).unwrap();
        std::thread::sleep(Duration::from_millis(100));
    });
    locked_rx.recv().unwrap();
    holder
}

/// A call no VMM thread makes.
fn open_socket() {
    // SAFETY: socket(2) has no memory-safety preconditions.
    unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
}

#[test]
fn vcpu_thread_survives_its_steady_state_kicks_and_teardown() {
    let Some(output) = in_child_or_run("vcpu_thread_survives_its_steady_state_kicks_and_teardown")
    else {
        let kick = kick_signal();
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let device = Arc::new(Mutex::new(0u64));
        let holder = hold_lock(&device);
        let vcpu = spawn_filtered(ThreadKind::Vcpu, {
            let device = device.clone();
            move || {
                // Waits on the futex, where the kick interrupts it.
                *device.lock().unwrap() += 1;
                irq.write(1).unwrap();
                // A large allocation is mmap'ed and munmap'ed by malloc.
                let buffer = vec![1u8; 4 << 20];
                assert_eq!(buffer.iter().map(|&b| u64::from(b)).sum::<u64>(), 4 << 20);
                let _ = Instant::now();
                say_survived();
            }
        });
        std::thread::sleep(Duration::from_millis(20));
        vcpu.kill(kick).unwrap();
        holder.join().unwrap();
        vcpu.join().unwrap();
        return;
    };
    assert_survived(&output);
}

#[test]
fn trace_marks_pass_every_vmm_filter() {
    let trace = |test_pid: u32| std::env::temp_dir().join(format!("kiln-trace-{test_pid}"));
    let Some(output) = in_child_or_run("trace_marks_pass_every_vmm_filter") else {
        // SAFETY: this child runs this one test alone (--test-threads=1),
        // before it starts any thread that could read the environment.
        unsafe { std::env::set_var(TRACE_ENV, trace(std::os::unix::process::parent_id())) };
        // Opened before any filter, as `main` does.
        trace::init();
        on_filtered_thread(ThreadKind::Vcpu, || trace::mark("vCPU"));
        on_filtered_thread(ThreadKind::Vmm, || {
            trace::mark("VMM");
            say_survived();
            // The VMM thread ends the process; it never ends alone.
            std::process::exit(0);
        });
        return;
    };
    let file = trace(std::process::id());
    let lines = std::fs::read_to_string(&file).unwrap_or_default();
    let _ = std::fs::remove_file(&file);
    assert_survived(&output);
    let stages: Vec<&str> = lines.lines().filter_map(|l| l.split(' ').next()).collect();
    assert_eq!(stages, ["vCPU", "VMM"], "{lines}");
}

#[test]
fn vcpu_thread_dies_on_a_forbidden_syscall() {
    let Some(output) = in_child_or_run("vcpu_thread_dies_on_a_forbidden_syscall") else {
        on_filtered_thread(ThreadKind::Vcpu, || {
            open_socket();
            say_survived();
        });
        return;
    };
    assert_reported(&output, ThreadKind::Vcpu, libc::SYS_socket);
}

#[test]
fn vcpu_thread_dies_on_an_ioctl_other_than_kvm_run() {
    let Some(output) = in_child_or_run("vcpu_thread_dies_on_an_ioctl_other_than_kvm_run") else {
        on_filtered_thread(ThreadKind::Vcpu, || {
            let mut termios = std::mem::MaybeUninit::<libc::termios>::uninit();
            // SAFETY: TCGETS writes at most one termios into the buffer.
            unsafe { libc::ioctl(0, libc::TCGETS, termios.as_mut_ptr()) };
            say_survived();
        });
        return;
    };
    assert_reported(&output, ThreadKind::Vcpu, libc::SYS_ioctl);
}

#[test]
fn vcpu_thread_dies_on_executable_memory() {
    let Some(output) = in_child_or_run("vcpu_thread_dies_on_executable_memory") else {
        on_filtered_thread(ThreadKind::Vcpu, || {
            // SAFETY: an anonymous private mapping at an address the kernel
            // picks aliases nothing.
            unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    4096,
                    libc::PROT_READ | libc::PROT_EXEC,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                )
            };
            say_survived();
        });
        return;
    };
    assert_reported(&output, ThreadKind::Vcpu, libc::SYS_mmap);
}

#[test]
fn vmm_thread_survives_its_event_loop_and_block_io_then_exits() {
    let Some(output) =
        in_child_or_run("vmm_thread_survives_its_event_loop_and_block_io_then_exits")
    else {
        // The console's input at end of file: the event loop reads it and
        // unregisters it.
        let serial = Serial::new(
            EventFd::new(EFD_NONBLOCK).unwrap(),
            Box::new(std::io::sink()),
        );
        let (input, _) = std::io::pipe().unwrap();
        let input = SerialInput::new(
            Arc::new(Mutex::new(serial)),
            File::from(OwnedFd::from(input)),
        );
        let mut event_loop = EventManager::<SerialInput>::new().unwrap();
        event_loop.add_subscriber(input.unwrap());
        let evt = EventFd::new(EFD_NONBLOCK).unwrap();
        let image: File = tempfile::tempfile().unwrap();
        // A volume: a compressed image with an overlay, opened before the
        // filter is installed, as the VMM opens its disks.
        let dir = tempfile::tempdir().unwrap();
        let raw = dir.path().join("raw");
        std::fs::write(&raw, vec![3u8; 256 * 1024]).unwrap();
        let image_file = dir.path().join("image.kiln");
        kiln_image::write(&raw, &image_file, 64 * 1024).unwrap();
        let mut volume =
            Volume::create(&image_file, &dir.path().join("root.overlay"), 1 << 20).unwrap();
        let kick = kick_signal();
        let vcpu = std::thread::spawn(|| std::thread::sleep(Duration::from_millis(100)));
        let (_controller, terminal) = open_pty();
        let mut termios = std::mem::MaybeUninit::<libc::termios>::uninit();
        // SAFETY: `terminal` is open and tcgetattr fills the whole struct.
        let ret = unsafe { libc::tcgetattr(terminal, termios.as_mut_ptr()) };
        assert_eq!(ret, 0);
        // SAFETY: tcgetattr succeeded.
        let termios = unsafe { termios.assume_init() };
        on_filtered_thread(ThreadKind::Vmm, move || {
            // Restoring the host terminal's mode at the end of the VM.
            // SAFETY: `terminal` is open; tcsetattr only reads `termios`.
            let ret = unsafe { libc::tcsetattr(terminal, libc::TCSANOW, &termios) };
            assert_eq!(ret, 0);
            // Kicking a vCPU out of KVM_RUN.
            vcpu.kill(kick).unwrap();
            evt.write(1).unwrap();
            assert_eq!(evt.read().unwrap(), 1);
            assert_eq!(event_loop.run_with_timeout(0).unwrap(), 1);
            image.write_all_at(&[7; 512], 512).unwrap();
            let mut sector = [0; 512];
            image.read_exact_at(&mut sector, 512).unwrap();
            assert_eq!(sector, [7; 512]);
            image.sync_data().unwrap();
            drop(image);
            // Volume I/O: decompressing chunks, copy-up, discard, flush.
            let mut block = [0u8; 4096];
            volume.read(0, &mut block).unwrap();
            volume.write(512, &[9; 512]).unwrap();
            volume.write(64 * 1024, &[9; 8192]).unwrap();
            volume.discard(64 * 1024, 8192).unwrap();
            volume.flush().unwrap();
            drop(volume);
            say_survived();
            // The VMM ends the process with the guest's status.
            std::process::exit(0);
        });
        return;
    };
    assert_survived(&output);
}

#[test]
fn vmm_thread_survives_filling_and_only_reading_a_hydration_cache() {
    let name = "vmm_thread_survives_filling_and_only_reading_a_hydration_cache";
    let Some(output) = in_child_or_run(name) else {
        let dir = tempfile::tempdir().unwrap();
        let raw = dir.path().join("raw");
        let data: Vec<u8> = (0..256 * 1024).map(|i| (i % 251) as u8).collect();
        std::fs::write(&raw, &data).unwrap();
        let image_file = dir.path().join("image.kiln");
        kiln_image::write(&raw, &image_file, 64 * 1024).unwrap();
        // Opened (and the cache checked) before the filter, as the VMM
        // opens its disks; the filler's first, which makes the cache.
        let cache = dir.path().join("cache");
        let open = |access| Volume::open_hydrated(&image_file, None, (&cache, access), 1 << 20);
        let filler = open(CacheAccess::Fill).unwrap();
        let reader = open(CacheAccess::Read).unwrap();
        on_filtered_thread(ThreadKind::Vmm, move || {
            // A jailed VM's read of chunks not there yet (from memory, the
            // cache's bytes looked at again), a read that fills two chunks
            // under the cache's lock, then both served from the cache file.
            let mut buf = vec![0u8; 100 * 1024];
            for volume in [&reader, &filler, &filler, &reader] {
                volume.read(10, &mut buf).unwrap();
                assert_eq!(buf, data[10..10 + buf.len()]);
            }
            say_survived();
            std::process::exit(0);
        });
        return;
    };
    assert_survived(&output);
}

/// A volume in `dir` over a 256 KiB image (its raw form kept as `raw`),
/// with an overlay.
fn writable_volume(dir: &std::path::Path) -> DiskSource {
    let raw = dir.join("raw");
    std::fs::write(&raw, vec![3u8; 256 * 1024]).unwrap();
    let image = dir.join("image.kiln");
    kiln_image::write(&raw, &image, 64 * 1024).unwrap();
    let overlay = dir.join("root.overlay");
    drop(Volume::create(&image, &overlay, 1 << 20).unwrap());
    DiskSource::Volume {
        image,
        overlay: Some(overlay),
        cache_bytes: 1 << 20,
        hydration: None,
        hydration_access: CacheAccess::Fill,
    }
}

#[test]
fn vmm_thread_survives_writing_a_snapshot() {
    let Some(output) = in_child_or_run("vmm_thread_survives_writing_a_snapshot") else {
        let dir = tempfile::tempdir().unwrap();
        let mut block = Block::new(&writable_volume(dir.path()), false).unwrap();
        let mem = memory::create(16).unwrap();
        mem.write_slice(b"guest data", GuestAddress(0x10_0000))
            .unwrap();
        let snapshot = dir.path().join("snapshot");
        std::fs::create_dir(&snapshot).unwrap();
        on_filtered_thread(ThreadKind::Vmm, move || {
            // What `Machine::write_snapshot` does once the vCPUs are parked.
            block.flush().unwrap();
            let memory_file = File::create(snapshot.join("memory")).unwrap();
            memory::save_sparse(&mem, &memory_file).unwrap();
            block
                .copy_writes_to(&snapshot.join("root.overlay"))
                .unwrap();
            kiln_vmm::snapshot::write_state(&snapshot.join("state"), &"state").unwrap();
            std::fs::metadata(snapshot.join("state")).unwrap();
            say_survived();
            std::process::exit(0);
        });
        return;
    };
    assert_survived(&output);
}

#[test]
fn vmm_thread_survives_attaching_disks_to_empty_drives() {
    let Some(output) = in_child_or_run("vmm_thread_survives_attaching_disks_to_empty_drives")
    else {
        let dir = tempfile::tempdir().unwrap();
        let volume = writable_volume(dir.path());
        let raw = dir.path().join("raw");
        let mem = memory::create(16).unwrap();
        let drives: Vec<_> = [false, true]
            .map(|read_only| {
                let block = Arc::new(Mutex::new(
                    Block::new(&DiskSource::Empty, read_only).unwrap(),
                ));
                let transport = MmioTransport::new(mem.clone(), block.clone()).unwrap();
                (block, transport)
            })
            .into();
        on_filtered_thread(ThreadKind::Vmm, move || {
            // What `attachdisk` does, once the VM runs: a volume, and a
            // raw image (read-only), each then announced to the driver.
            for ((block, mut transport), source) in
                drives.into_iter().zip([volume, DiskSource::Raw(raw)])
            {
                block.lock().unwrap().attach(&source).unwrap();
                transport.config_changed().unwrap();
            }
            say_survived();
            std::process::exit(0);
        });
        return;
    };
    assert_survived(&output);
}

#[test]
fn vmm_and_vcpu_threads_survive_their_request_channels() {
    let Some(output) = in_child_or_run("vmm_and_vcpu_threads_survive_their_request_channels")
    else {
        // The pause/save/resume requests and replies between the event
        // loop and a vCPU thread, busy enough that std's channels back off.
        let (requests, inbox) = std::sync::mpsc::channel::<u32>();
        let (outbox, replies) = std::sync::mpsc::channel::<u32>();
        let vcpu = spawn_filtered(ThreadKind::Vcpu, move || {
            while let Ok(n) = inbox.recv() {
                outbox.send(n).unwrap();
            }
            // The vCPU thread's end, as when the VM stops.
        });
        // The control channel: a request from the instance's VMM, answered.
        let (mut client, theirs) = kiln_vmm::rpc::channel().unwrap();
        // SAFETY: `theirs` is an open socket handed over whole.
        let listener = unsafe {
            kiln_vmm::rpc::ControlListener::adopt(std::os::fd::IntoRawFd::into_raw_fd(theirs))
        };
        let pending = listener.pending();
        let replier = listener.replier().unwrap();
        let asker = std::thread::spawn(move || {
            client
                .call(
                    &kiln_vmm::rpc::ControlRequest::Pause,
                    Duration::from_secs(5),
                )
                .unwrap()
        });
        let mut event_loop = EventManager::<kiln_vmm::rpc::ControlListener>::new().unwrap();
        event_loop.add_subscriber(listener);
        on_filtered_thread(ThreadKind::Vmm, move || {
            event_loop.run_with_timeout(5000).unwrap();
            assert!(pending.lock().unwrap().take().is_some());
            replier
                .send(&kiln_vmm::rpc::ControlReply::default())
                .unwrap();
            assert_eq!(
                asker.join().unwrap(),
                kiln_vmm::rpc::ControlReply::default()
            );
            for n in 0..20_000 {
                requests.send(n).unwrap();
                let reply = replies.recv_timeout(Duration::from_secs(5)).unwrap();
                assert_eq!(reply, n);
            }
            // Stopping it, as `Vcpus::stop` does: its end closes the replies.
            drop(requests);
            while let Ok(_) | Err(RecvTimeoutError::Timeout) =
                replies.recv_timeout(Duration::from_millis(1))
            {}
            vcpu.join().unwrap();
            say_survived();
            std::process::exit(0);
        });
        return;
    };
    assert_survived(&output);
}

/// The guest's side of a vsock device in the tests: its three rings in
/// guest memory, as virtio-queue's mocks lay them out.
mod vsock_guest {
    use kiln_vmm::devices::virtio::GuestMemoryMmap;
    use kiln_vmm::devices::virtio::vsock::packet::{HEADER_SIZE, Header};
    use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use virtio_queue::desc::RawDescriptor;
    use virtio_queue::desc::split::Descriptor;
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Bytes, GuestAddress};

    pub const RX: usize = 0;
    pub const TX: usize = 1;
    /// virtio-queue's mock lays the used ring out over the avail ring's
    /// second half: only the first half of a ring is usable.
    const SIZE: u16 = 64;
    const RX_POSTED: u16 = 8;
    const RX_BUFFERS: u64 = 0x1_0000;
    const RX_BUFFER: u32 = 0x1000;
    const TX_BUFFERS: u64 = 0x4_0000;

    pub struct Rings<'a> {
        pub mem: &'a GuestMemoryMmap,
        pub queues: Vec<MockSplitQueue<'a, GuestMemoryMmap>>,
        next_tx: u16,
        seen_rx: u16,
    }

    impl<'a> Rings<'a> {
        /// Three rings, with `RX_POSTED` receive buffers posted.
        pub fn new(mem: &'a GuestMemoryMmap) -> Self {
            let queues: Vec<_> = [0x0, 0x1000, 0x2000]
                .into_iter()
                .map(|addr| MockSplitQueue::create(mem, GuestAddress(addr), SIZE))
                .collect();
            for index in 0..RX_POSTED {
                let addr = RX_BUFFERS + u64::from(index) * u64::from(RX_BUFFER);
                let desc = Descriptor::new(addr, RX_BUFFER, VRING_DESC_F_WRITE as u16, 0);
                queues[RX]
                    .add_desc_chains(&[RawDescriptor::from(desc)], index)
                    .unwrap();
            }
            Rings {
                mem,
                queues,
                next_tx: 0,
                seen_rx: 0,
            }
        }

        /// Makes a packet available on the tx ring.
        pub fn send(&mut self, header: Header, payload: &[u8]) {
            let index = self.next_tx;
            let addr = TX_BUFFERS + u64::from(index) * 0x1000;
            self.mem
                .write_slice(&header.to_bytes(), GuestAddress(addr))
                .unwrap();
            self.mem
                .write_slice(payload, GuestAddress(addr + HEADER_SIZE as u64))
                .unwrap();
            let mut descs = vec![RawDescriptor::from(Descriptor::new(
                addr,
                HEADER_SIZE as u32,
                if payload.is_empty() {
                    0
                } else {
                    VRING_DESC_F_NEXT as u16
                },
                index + 1,
            ))];
            if !payload.is_empty() {
                descs.push(RawDescriptor::from(Descriptor::new(
                    addr + HEADER_SIZE as u64,
                    payload.len() as u32,
                    0,
                    0,
                )));
            }
            self.next_tx += descs.len() as u16;
            self.queues[TX].add_desc_chains(&descs, index).unwrap();
        }

        /// The next packet the device puts on the rx ring, running the
        /// event loop until it does.
        pub fn next<S: event_manager::MutEventSubscriber>(
            &mut self,
            event_loop: &mut event_manager::EventManager<S>,
        ) -> (Header, Vec<u8>) {
            loop {
                if let Some(packet) = self.receive() {
                    return packet;
                }
                event_loop.run_with_timeout(5000).unwrap();
            }
        }

        /// The next packet the device put on the rx ring, if any.
        pub fn receive(&mut self) -> Option<(Header, Vec<u8>)> {
            let used = self.queues[RX].used();
            if used.idx().load() == self.seen_rx {
                return None;
            }
            let entry = used
                .ring()
                .ref_at(usize::from(self.seen_rx % SIZE))
                .unwrap()
                .load();
            self.seen_rx += 1;
            let addr = RX_BUFFERS + u64::from(entry.id()) * u64::from(RX_BUFFER);
            let mut raw = vec![0u8; entry.len() as usize];
            self.mem.read_slice(&mut raw, GuestAddress(addr)).unwrap();
            let header = Header::parse(raw[..HEADER_SIZE].try_into().unwrap());
            Some((header, raw[HEADER_SIZE..].to_vec()))
        }
    }
}

#[test]
fn vmm_thread_survives_serving_a_vsock_host_connection() {
    use kiln_vmm::devices::virtio::vsock::packet::*;
    use kiln_vmm::devices::virtio::vsock::{Vsock, VsockConfig};
    use kiln_vmm::devices::virtio::{GuestMemoryMmap, Interrupt, VirtioDevice};
    use std::io::{BufRead, BufReader, Read};
    use std::os::unix::net::UnixStream;

    let Some(output) = in_child_or_run("vmm_thread_survives_serving_a_vsock_host_connection")
    else {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("vsock.sock");
        // Bound (and listening) before the filter, as the builder does.
        let vsock = Vsock::new(&VsockConfig {
            cid: 3,
            socket: socket.clone(),
        })
        .unwrap();
        let mem: &'static GuestMemoryMmap = Box::leak(Box::new(
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap(),
        ));
        let interrupt = Arc::new(Interrupt::new(EventFd::new(EFD_NONBLOCK).unwrap()));
        let tx_evt = vsock.queue_events()[vsock_guest::TX].try_clone().unwrap();
        let device = Arc::new(Mutex::new(vsock));
        let mut event_loop = EventManager::<Arc<Mutex<Vsock>>>::new().unwrap();
        event_loop.add_subscriber(device.clone());
        // The host process: unfiltered, on a thread started before the filter.
        let host = std::thread::spawn(move || {
            let mut stream = UnixStream::connect(&socket).unwrap();
            stream.write_all(b"CONNECT 5000\n").unwrap();
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut ok = String::new();
            reader.read_line(&mut ok).unwrap();
            assert!(ok.starts_with("OK "), "{ok:?}");
            stream.write_all(b"ping").unwrap();
            let mut rest = Vec::new();
            reader.read_to_end(&mut rest).unwrap();
            assert_eq!(rest, b"pong");
            // Dropping the stream closes it: the guest hears SHUTDOWN.
        });
        on_filtered_thread(ThreadKind::Vmm, move || {
            // The driver sets up its rings and the device starts (on a
            // vCPU thread in a VM; activation only stores and signals).
            let mut rings = vsock_guest::Rings::new(mem);
            let queues = rings.queues.iter().map(|q| q.create_queue().unwrap());
            device
                .lock()
                .unwrap()
                .activate(0, mem.clone(), queues.collect(), interrupt)
                .unwrap();
            let (request, _) = rings.next(&mut event_loop);
            assert_eq!(request.op, VIRTIO_VSOCK_OP_REQUEST);
            let reply = |op, len| Header {
                src_cid: 3,
                dst_cid: VSOCK_HOST_CID,
                src_port: request.dst_port,
                dst_port: request.src_port,
                len,
                kind: VIRTIO_VSOCK_TYPE_STREAM,
                op,
                flags: 0,
                buf_alloc: 1 << 16,
                fwd_cnt: 0,
            };
            rings.send(reply(VIRTIO_VSOCK_OP_RESPONSE, 0), &[]);
            tx_evt.write(1).unwrap();
            let mut ping = Vec::new();
            while ping.len() < 4 {
                event_loop.run_with_timeout(5000).unwrap();
                while let Some((header, payload)) = rings.receive() {
                    assert_eq!(header.op, VIRTIO_VSOCK_OP_RW);
                    ping.extend(payload);
                }
            }
            assert_eq!(ping, b"ping");
            rings.send(reply(VIRTIO_VSOCK_OP_RW, 4), b"pong");
            // The guest sends no more: the host's socket is shut for writing.
            let mut shutdown = reply(VIRTIO_VSOCK_OP_SHUTDOWN, 0);
            shutdown.flags = VIRTIO_VSOCK_SHUTDOWN_F_SEND;
            rings.send(shutdown, &[]);
            tx_evt.write(1).unwrap();
            let (shutdown, _) = rings.next(&mut event_loop);
            assert_eq!(shutdown.op, VIRTIO_VSOCK_OP_SHUTDOWN);
            host.join().unwrap();
            say_survived();
            std::process::exit(0);
        });
        return;
    };
    assert_survived(&output);
}

/// A packet socket on the interface `name`, as a host-side peer that
/// sends frames to the tap's guest and sees the frames it sends.
fn packet_socket(name: &str) -> OwnedFd {
    use std::os::fd::FromRawFd;
    let all = (libc::ETH_P_ALL as u16).to_be();
    // SAFETY: socket(2) has no memory-safety preconditions.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, i32::from(all)) };
    assert!(fd >= 0, "{}", std::io::Error::last_os_error());
    // SAFETY: `fd` is a fresh descriptor nothing else owns.
    let socket = unsafe { OwnedFd::from_raw_fd(fd) };
    let ifname = std::ffi::CString::new(name).unwrap();
    // SAFETY: `ifname` is a NUL-terminated string that outlives the call.
    let index = unsafe { libc::if_nametoindex(ifname.as_ptr()) };
    assert_ne!(index, 0, "no interface {name}");
    // SAFETY: sockaddr_ll is plain old data; all zeroes is valid.
    let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    addr.sll_family = libc::AF_PACKET as u16;
    addr.sll_protocol = all;
    addr.sll_ifindex = index as i32;
    // SAFETY: `addr` is a sockaddr_ll of the length given.
    let rc = unsafe {
        libc::bind(
            fd,
            (&addr as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        )
    };
    assert_eq!(rc, 0, "{}", std::io::Error::last_os_error());
    socket
}

/// Whether `frame` arrives on the packet socket within 5 s (among the
/// IPv6 chatter of an interface coming up).
fn host_sees(socket: &OwnedFd, frame: &[u8]) -> bool {
    use std::os::fd::AsRawFd;
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut buf = [0u8; 2048];
    while Instant::now() < deadline {
        // SAFETY: the buffer is valid for its length.
        let len = unsafe {
            libc::recv(
                socket.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_DONTWAIT,
            )
        };
        if len < 0 {
            std::thread::sleep(Duration::from_millis(10));
        } else if buf[..len as usize] == *frame {
            return true;
        }
    }
    false
}

/// An Ethernet frame of Kiln's test ethertype (IEEE 802 local
/// experimental) from `src`, with `body`.
fn test_frame(src: u8, body: &[u8]) -> Vec<u8> {
    let mut frame = vec![
        0x02, 0x6b, 0, 0, 0, 0x02, 0x02, 0x6b, 0, 0, 0, src, 0x88, 0xb5,
    ];
    frame.extend_from_slice(body);
    frame
}

/// virtio-net on the VMM thread: a frame from the guest reaches the host
/// through the tap, one from the host reaches the guest's receive ring,
/// and the offloads are set, all under the filter. Needs root (a tap and
/// a packet socket); CI runs as root.
#[test]
fn vmm_thread_survives_moving_frames_through_a_tap() {
    use kiln_vmm::devices::virtio::net::tap::Tap;
    use kiln_vmm::devices::virtio::net::{NET_HDR_LEN, Net};
    use kiln_vmm::devices::virtio::{GuestMemoryMmap, Interrupt, VirtioDevice};
    use std::os::fd::AsRawFd;
    use virtio_bindings::virtio_ring::VRING_DESC_F_WRITE;
    use virtio_queue::desc::RawDescriptor;
    use virtio_queue::desc::split::Descriptor;
    use virtio_queue::mock::MockSplitQueue;

    let Some(output) = in_child_or_run("vmm_thread_survives_moving_frames_through_a_tap") else {
        let tap = format!("kt-seccomp{}", std::process::id() % 10000);
        let net = Net::new(
            Tap::create(&tap, NET_HDR_LEN).expect("a tap (run as root)"),
            [0x02, 0x6b, 0, 0, 0, 2],
        )
        .unwrap();
        kiln_vmm::devices::virtio::net::bridge::link_up(&tap).unwrap();
        let host = packet_socket(&tap);
        let mem: &'static GuestMemoryMmap = Box::leak(Box::new(
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap(),
        ));
        let interrupt = Arc::new(Interrupt::new(EventFd::new(EFD_NONBLOCK).unwrap()));
        let device = Arc::new(Mutex::new(net));
        let mut event_loop = EventManager::<Arc<Mutex<Net>>>::new().unwrap();
        event_loop.add_subscriber(device.clone());
        on_filtered_thread(ThreadKind::Vmm, move || {
            // The driver's rings: receive buffers posted, one frame queued.
            let rx = MockSplitQueue::create(mem, GuestAddress(0), 16);
            let tx = MockSplitQueue::create(mem, GuestAddress(0x1000), 16);
            for index in 0..8u16 {
                let addr = 0x1_0000 + u64::from(index) * 0x1000;
                let desc = Descriptor::new(addr, 0x1000, VRING_DESC_F_WRITE as u16, 0);
                rx.add_desc_chains(&[RawDescriptor::from(desc)], index)
                    .unwrap();
            }
            let outgoing = test_frame(2, b"from the guest");
            let mut chain = vec![0u8; NET_HDR_LEN];
            chain.extend_from_slice(&outgoing);
            mem.write_slice(&chain, GuestAddress(0x8_0000)).unwrap();
            let desc = Descriptor::new(0x8_0000, chain.len() as u32, 0, 0);
            tx.add_desc_chains(&[RawDescriptor::from(desc)], 0).unwrap();
            let queues = vec![rx.create_queue().unwrap(), tx.create_queue().unwrap()];
            // With GUEST_CSUM and TSO4 acked: the offloads get set.
            let acked = 1 << 32 | 1 << 15 | 1 << 1 | 1 << 7;
            device
                .lock()
                .unwrap()
                .activate(acked, mem.clone(), queues, interrupt)
                .unwrap();
            // Activation wakes the transmit queue: the frame goes out.
            event_loop.run_with_timeout(5000).unwrap();
            assert_eq!(tx.used().idx().load(), 1, "the frame was not sent");
            assert!(
                host_sees(&host, &outgoing),
                "the guest's frame never reached the host"
            );
            let incoming = test_frame(9, b"from the host");
            // SAFETY: the buffer is valid for its length.
            let sent = unsafe {
                libc::send(
                    host.as_raw_fd(),
                    incoming.as_ptr().cast(),
                    incoming.len(),
                    0,
                )
            };
            assert_eq!(sent, incoming.len() as isize);
            let deadline = Instant::now() + Duration::from_secs(5);
            let found = loop {
                event_loop.run_with_timeout(100).unwrap();
                let used = rx.used().idx().load();
                let hit = (0..used).find(|&i| {
                    let entry = rx.used().ring().ref_at(i.into()).unwrap().load();
                    let mut got = vec![0u8; entry.len() as usize];
                    let addr = 0x1_0000 + u64::from(entry.id()) * 0x1000;
                    mem.read_slice(&mut got, GuestAddress(addr)).unwrap();
                    got[NET_HDR_LEN..] == incoming[..]
                });
                if hit.is_some() || Instant::now() > deadline {
                    break hit;
                }
            };
            assert!(found.is_some(), "the host's frame never reached the guest");
            say_survived();
            std::process::exit(0);
        });
        return;
    };
    assert_survived(&output);
}

#[test]
fn vmm_thread_dies_on_a_forbidden_syscall() {
    let Some(output) = in_child_or_run("vmm_thread_dies_on_a_forbidden_syscall") else {
        on_filtered_thread(ThreadKind::Vmm, || {
            open_socket();
            say_survived();
        });
        return;
    };
    assert_reported(&output, ThreadKind::Vmm, libc::SYS_socket);
}

#[test]
fn the_probe_makes_the_named_kind_of_thread_report_a_forbidden_call() {
    let test = "the_probe_makes_the_named_kind_of_thread_report_a_forbidden_call";
    let Some(output) = in_child_or_run(test) else {
        // SAFETY: this child runs this one test alone (--test-threads=1),
        // before it starts any thread that could read the environment.
        unsafe { std::env::set_var(kiln_vmm::seccomp::PROBE_ENV, "vCPU") };
        // Another kind's thread goes through its filter and ends.
        on_filtered_thread(ThreadKind::Proxy, || {});
        on_filtered_thread(ThreadKind::Vcpu, say_survived);
        return;
    };
    assert_reported(&output, ThreadKind::Vcpu, libc::SYS_socket);
}

#[test]
fn a_futex_operation_other_than_wait_and_wake_is_reported() {
    let Some(output) = in_child_or_run("a_futex_operation_other_than_wait_and_wake_is_reported")
    else {
        on_filtered_thread(ThreadKind::Vcpu, || {
            let word = 0u32;
            // SAFETY: FUTEX_CMP_REQUEUE_PRIVATE on a live word, requeueing
            // onto the same word, with a value that does not match: it
            // would fail with EAGAIN and touch nothing.
            unsafe {
                libc::syscall(
                    libc::SYS_futex,
                    &word,
                    libc::FUTEX_CMP_REQUEUE | libc::FUTEX_PRIVATE_FLAG,
                    1,
                    1,
                    &word,
                    1,
                )
            };
            say_survived();
        });
        return;
    };
    assert_reported(&output, ThreadKind::Vcpu, libc::SYS_futex);
}

#[test]
fn madvise_other_than_dontneed_is_reported() {
    let Some(output) = in_child_or_run("madvise_other_than_dontneed_is_reported") else {
        let page = vec![0u8; 8192];
        let aligned = (page.as_ptr() as usize).next_multiple_of(4096);
        on_filtered_thread(ThreadKind::Vmm, move || {
            // SAFETY: MADV_WILLNEED on a page of a live allocation only
            // hints at read-ahead; it changes no contents.
            unsafe { libc::madvise(aligned as *mut libc::c_void, 4096, libc::MADV_WILLNEED) };
            drop(page);
            say_survived();
        });
        return;
    };
    assert_reported(&output, ThreadKind::Vmm, libc::SYS_madvise);
}

#[test]
fn tgkill_with_a_signal_other_than_the_kick_is_reported() {
    let Some(output) = in_child_or_run("tgkill_with_a_signal_other_than_the_kick_is_reported")
    else {
        // This process's main thread (whose tid is the pid), asked before
        // the filter, which has no getpid.
        let pid = std::process::id() as libc::pid_t;
        on_filtered_thread(ThreadKind::Vmm, move || {
            // SAFETY: tgkill only reads its integer arguments; had it been
            // let through, SIGURG is ignored by default.
            unsafe { libc::syscall(libc::SYS_tgkill, pid, pid, libc::SIGURG) };
            say_survived();
        });
        return;
    };
    assert_reported(&output, ThreadKind::Vmm, libc::SYS_tgkill);
}

/// A pseudo-terminal pair: (controller, terminal). Both stay open for the
/// life of the child process.
fn open_pty() -> (libc::c_int, libc::c_int) {
    let (mut controller, mut terminal) = (-1, -1);
    // SAFETY: openpty writes two descriptors into the given integers; the
    // name, termios and window size pointers may be null.
    let ret = unsafe {
        libc::openpty(
            &mut controller,
            &mut terminal,
            std::ptr::null_mut(),
            std::ptr::null(),
            std::ptr::null(),
        )
    };
    assert_eq!(ret, 0, "openpty: {}", std::io::Error::last_os_error());
    (controller, terminal)
}

#[test]
fn proxy_and_vcpu_threads_get_eacces_from_any_open() {
    let Some(output) = in_child_or_run("proxy_and_vcpu_threads_get_eacces_from_any_open") else {
        for kind in [ThreadKind::Proxy, ThreadKind::Vcpu] {
            on_filtered_thread(kind, || {
                // What glibc's free() opens when it first shrinks an arena.
                let err = File::open("/proc/sys/vm/overcommit_memory").unwrap_err();
                assert_eq!(err.raw_os_error(), Some(libc::EACCES));
            });
        }
        say_survived();
        return;
    };
    assert_survived(&output);
}

#[test]
fn actions_thread_survives_a_hibernations_files() {
    let test = "actions_thread_survives_a_hibernations_files";
    let Some(output) = in_child_or_run(test) else {
        let dir = tempfile::tempdir().unwrap();
        let staging = dir.path().join("hibernate.partial");
        std::fs::create_dir(&staging).unwrap();
        std::fs::write(staging.join("memory"), b"left by a killed VM process").unwrap();
        on_filtered_thread(ThreadKind::Actions, move || {
            // glibc's fdopendir asks fcntl(F_GETFL) of the directory.
            std::fs::remove_dir_all(&staging).unwrap();
            std::fs::create_dir(&staging).unwrap();
            std::fs::write(staging.join("state"), b"written by the VM process").unwrap();
            // A jailed snapshot's files moved out of the exchange directory,
            // then the hibernation kept whole.
            let taken = dir.path().join("snapshot");
            std::fs::create_dir(&taken).unwrap();
            for entry in std::fs::read_dir(&staging).unwrap() {
                let entry = entry.unwrap();
                std::fs::rename(entry.path(), taken.join(entry.file_name())).unwrap();
            }
            kiln_vmm::durable::rename_dir(&taken, &dir.path().join("hibernate")).unwrap();
            say_survived();
        });
        return;
    };
    assert_survived(&output);
}

#[test]
fn a_timed_wait_survives_a_stop_and_continue() {
    let test = "a_timed_wait_survives_a_stop_and_continue";
    let Some(output) = in_child_or_run(test) else {
        // Never sent on: the wait runs to its timeout, unless the stop
        // and continue below kill the thread in the middle of it.
        let (_word, wait) = std::sync::mpsc::channel::<()>();
        let waiter = spawn_filtered(ThreadKind::Vmm, move || {
            assert_eq!(
                wait.recv_timeout(Duration::from_millis(500)),
                Err(RecvTimeoutError::Timeout)
            );
            // The VMM thread ends with its process, never alone.
            say_survived();
            std::process::exit(0);
        });
        // The thread in its wait; then the whole process stopped and
        // continued from outside, as `kill -STOP` and `kill -CONT` (or a
        // debugger attaching) do: the kernel resumes the interrupted
        // futex wait through restart_syscall.
        std::thread::sleep(Duration::from_millis(100));
        let pid = std::process::id();
        let stopped = std::process::Command::new("sh")
            .arg("-c")
            .arg(format!("kill -STOP {pid}; sleep 0.05; kill -CONT {pid}"))
            .status()
            .unwrap();
        assert!(stopped.success());
        waiter.join().unwrap();
        return;
    };
    assert_survived(&output);
}
