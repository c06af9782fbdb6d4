//! Seccomp filters, one allow-list per kind of VMM thread.
//!
//! Each thread installs its filter itself, once its setup is done (files
//! opened, guest memory mapped, vCPU registers set): from then on it may
//! only make the system calls its steady state needs, and any other call
//! traps: [`crate::sigsys`] reports it and ends the whole process. Every
//! entry says which code path makes the call; a new call in that path
//! needs a new entry here, with its reason. Calls that take a selector
//! (an ioctl request, a futex op, a signal, socket flags) are allowed for
//! the selectors listed only.

use std::collections::BTreeMap;
use std::fmt;

use vmm_sys_util::ioctl::{_IOC_NONE, _IOC_READ, _IOC_WRITE, ioctl_expr};

use kvm_bindings::{
    kvm_clock_data, kvm_debugregs, kvm_irq_routing, kvm_lapic_state, kvm_mp_state, kvm_msrs,
    kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave,
};
use seccompiler::{
    BackendError, BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition,
    SeccompFilter, SeccompRule, TargetArch,
};

use crate::sigsys;
use crate::vstate::vcpu;

/// The kinds of threads a VMM process runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ThreadKind {
    /// The event loop: device backends (block I/O, console input, vsock
    /// host connections), vCPU kicks and the VM's end.
    Vmm,
    /// A vCPU's run loop, including the PIO/MMIO device emulation it
    /// performs on exits.
    Vcpu,
    /// The API socket of an instance's VMM process: it reads each request,
    /// parses it, hands it to the actions thread and writes the answer back.
    /// It touches no file and signals no process.
    Api,
    /// The actions thread of an instance's VMM process: it carries out what
    /// the API thread parsed (the record's updates, the VM process's
    /// signals and control requests, a snapshot's or hibernation's files).
    Actions,
    /// The main thread of an instance's VMM process, once its helper
    /// threads run: it waits for each VM process, copies its console into
    /// the log and keeps the record's state. (Its unfiltered launcher
    /// thread starts and tears down the VM processes.)
    Supervisor,
    /// The proxy of an instance's published ports (`network::proxy`):
    /// its event loop over the listeners on 127.0.0.1 and, per client, a
    /// connection to the guest.
    Proxy,
    /// A worker that fills a volume's hydration cache in the background
    /// (`volume::prefetch`): it decompresses and verifies queued chunks and
    /// writes them into the host-wide cache.
    Hydrate,
}

impl ThreadKind {
    /// How reports and errors name the kind: "VMM", "vCPU", "API",
    /// "actions", "supervisor", "proxy", "hydrate".
    pub fn name(self) -> &'static str {
        match self {
            ThreadKind::Vmm => "VMM",
            ThreadKind::Vcpu => "vCPU",
            ThreadKind::Api => "API",
            ThreadKind::Actions => "actions",
            ThreadKind::Supervisor => "supervisor",
            ThreadKind::Proxy => "proxy",
            ThreadKind::Hydrate => "hydrate",
        }
    }
}

impl fmt::Display for ThreadKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Errors from building or installing a filter.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    /// The allow-list does not compile (a bug in this module).
    #[error("cannot build the {kind} thread's seccomp filter")]
    Build {
        /// The thread kind whose allow-list failed.
        kind: ThreadKind,
        /// What seccompiler refused.
        #[source]
        source: BackendError,
    },
    /// The SIGSYS handler that reports a forbidden call cannot be installed.
    #[error("cannot install the SIGSYS handler for the {kind} thread")]
    Handler {
        /// The thread kind about to install its filter.
        kind: ThreadKind,
        /// Why sigaction failed.
        #[source]
        source: std::io::Error,
    },
    /// The kernel refused the filter.
    #[error("cannot install the {kind} thread's seccomp filter")]
    Install {
        /// The thread kind whose filter was refused.
        kind: ThreadKind,
        /// Why the kernel refused it.
        #[source]
        source: seccompiler::Error,
    },
}

/// A KVM ioctl's request number (linux/kvm.h's `_IO`, `_IOR`, `_IOWR`):
/// direction, KVMIO, `nr` and the size of the argument `T`.
const fn kvm_ioctl<T>(direction: u32, nr: u32) -> u64 {
    let size = if direction == _IOC_NONE {
        0
    } else {
        std::mem::size_of::<T>() as u32
    };
    ioctl_expr(direction, kvm_bindings::KVMIO, nr, size) as u64
}

/// `KVM_RUN`: `_IO(KVMIO, 0x80)` (linux/kvm.h).
const KVM_RUN: u64 = kvm_ioctl::<()>(_IOC_NONE, 0x80);

/// The vCPU ioctls a snapshot reads a parked vCPU's state with
/// (`vstate::vcpu_state`), each from linux/kvm.h.
const KVM_VCPU_SAVE_IOCTLS: [u64; 10] = [
    kvm_ioctl::<kvm_regs>(_IOC_READ, 0x81),  // KVM_GET_REGS
    kvm_ioctl::<kvm_sregs>(_IOC_READ, 0x83), // KVM_GET_SREGS
    kvm_ioctl::<kvm_msrs>(_IOC_READ | _IOC_WRITE, 0x88), // KVM_GET_MSRS
    kvm_ioctl::<kvm_lapic_state>(_IOC_READ, 0x8e), // KVM_GET_LAPIC
    kvm_ioctl::<kvm_mp_state>(_IOC_READ, 0x98), // KVM_GET_MP_STATE
    kvm_ioctl::<kvm_vcpu_events>(_IOC_READ, 0x9f), // KVM_GET_VCPU_EVENTS
    kvm_ioctl::<kvm_debugregs>(_IOC_READ, 0xa1), // KVM_GET_DEBUGREGS
    kvm_ioctl::<()>(_IOC_NONE, 0xa3),        // KVM_GET_TSC_KHZ
    kvm_ioctl::<kvm_xsave>(_IOC_READ, 0xa4), // KVM_GET_XSAVE
    kvm_ioctl::<kvm_xcrs>(_IOC_READ, 0xa6),  // KVM_GET_XCRS
];

/// The VM ioctl a snapshot reads the VM's state with (`vstate::vm`):
/// KVM_GET_CLOCK.
const KVM_GET_CLOCK: u64 = kvm_ioctl::<kvm_clock_data>(_IOC_READ, 0x7c);

/// The VM ioctl the IOAPIC routes its pins with (`devices::ioapic`):
/// KVM_SET_GSI_ROUTING, `_IOW(KVMIO, 0x6a, struct kvm_irq_routing)`.
const KVM_SET_GSI_ROUTING: u64 = kvm_ioctl::<kvm_irq_routing>(_IOC_WRITE, 0x6a);

type Rules = Vec<(i64, Vec<SeccompRule>)>;

/// The compiled filter for threads of `kind`.
pub fn filter(kind: ThreadKind) -> Result<BpfProgram, SeccompError> {
    let build = |source| SeccompError::Build { kind, source };
    let mut rules = common_rules().map_err(build)?;
    rules.extend(
        match kind {
            ThreadKind::Vmm => vmm_rules(),
            ThreadKind::Vcpu => vcpu_rules(),
            ThreadKind::Api => api_rules(),
            ThreadKind::Actions => actions_rules(),
            ThreadKind::Supervisor => supervisor_rules(),
            ThreadKind::Proxy => proxy_rules(),
            ThreadKind::Hydrate => hydrate_rules(),
        }
        .map_err(build)?,
    );
    let rules: BTreeMap<i64, Vec<SeccompRule>> = rules.into_iter().collect();
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::Trap,
        SeccompAction::Allow,
        TargetArch::x86_64,
    )
    .map_err(build)?;
    BpfProgram::try_from(filter).map_err(build)
}

/// A test hook for end-to-end tests (`tests/vm/run-seccomp.sh`): the
/// first thread of the kind this variable names ([`ThreadKind::name`]) to
/// install its filter then makes one call no filter allows,
/// `socket(AF_UNIX)`, so that the test sees the report reach the console
/// log and the instance's stop reason, as a real violation's would.
pub const PROBE_ENV: &str = "KILN_SECCOMP_PROBE";

/// Installs the filter for `kind` on the calling thread (only: other
/// threads install their own). Irreversible. From then on a forbidden
/// call is reported and ends the process ([`crate::sigsys`]).
pub fn install(kind: ThreadKind) -> Result<(), SeccompError> {
    sigsys::arm(kind).map_err(|source| SeccompError::Handler { kind, source })?;
    // Read before the filter: the environment is read under a lock.
    let probe = std::env::var_os(PROBE_ENV).is_some_and(|named| named == kind.name());
    let apply = |program: &BpfProgram| {
        seccompiler::apply_filter(program).map_err(|source| SeccompError::Install { kind, source })
    };
    if matches!(
        kind,
        ThreadKind::Proxy | ThreadKind::Vcpu | ThreadKind::Hydrate
    ) {
        apply(&opens_refused(kind)?)?;
    }
    apply(&filter(kind)?)?;
    if probe {
        // SAFETY: socket(2) takes integers only; the filter traps it.
        unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0) };
    }
    Ok(())
}

/// A filter stacked on the allow-list of the threads that open no files
/// (proxy, vCPU, hydrate): `openat` fails with EACCES. The kernel runs every filter and takes the strictest answer,
/// so `openat`, allowed by the list, is refused here, and anything else
/// is the list's to decide.
///
/// glibc's free() opens /proc/sys/vm/overcommit_memory once per process
/// (`check_may_shrink_heap`), from whichever thread first shrinks a
/// malloc arena; the proxy frees connection buffers all the time, and a
/// vCPU thread frees what a snapshot's state read allocated. Failing
/// the open makes glibc assume no strict overcommit and release pages
/// with madvise as usual, where a kill would end the VMM process.
fn opens_refused(kind: ThreadKind) -> Result<BpfProgram, SeccompError> {
    let build = |source| SeccompError::Build { kind, source };
    let filter = SeccompFilter::new(
        BTreeMap::from([(libc::SYS_openat, Vec::new())]),
        SeccompAction::Allow,
        SeccompAction::Errno(libc::EACCES as u32),
        TargetArch::x86_64,
    )
    .map_err(build)?;
    BpfProgram::try_from(filter).map_err(build)
}

/// Calls every thread makes.
fn common_rules() -> Result<Rules, BackendError> {
    Ok(vec![
        // Device mutexes shared between vCPU threads and the event loop,
        // std's thread parking and join: only the operations in FUTEX_OPS.
        (libc::SYS_futex, arg_in(1, FUTEX_OPS)?),
        // The channels between the event loop and the vCPU threads (pause,
        // snapshot, resume): std's mpsc backs off with sched_yield before
        // it parks.
        allow(libc::SYS_sched_yield),
        // A timed wait (a futex with a timeout, as a channel's
        // recv_timeout makes) that a stop and continue interrupted
        // (SIGSTOP then SIGCONT, or a debugger attaching): the kernel
        // resumes it through restart_syscall, which re-enters only the
        // interrupted call, with its own arguments.
        allow(libc::SYS_restart_syscall),
        // stderr warnings; on the vCPU thread also serial output to stdout
        // (a pipe to the VMM process, which keeps the console log, for an
        // instance; a terminal or file for `kiln run`: the same call either
        // way) and eventfd signals (serial and virtio interrupts, i8042 reset,
        // virtio-mmio notifications that bypassed the ioeventfd).
        allow(libc::SYS_write),
        // Instant::now (InitStarted's timestamp); normally served by the
        // vDSO, the syscall is its fallback.
        allow(libc::SYS_clock_gettime),
        // malloc: large blocks are mmap'ed and given back with munmap,
        // non-main arenas grow with mprotect, the main arena with brk, and
        // free() returns pages with madvise(MADV_DONTNEED). Never
        // executable memory.
        (libc::SYS_mmap, vec![not_executable(2)?]),
        (libc::SYS_mprotect, vec![not_executable(2)?]),
        allow(libc::SYS_munmap),
        allow(libc::SYS_brk),
        (
            libc::SYS_madvise,
            vec![arg_equals(2, libc::MADV_DONTNEED as u64)?],
        ),
        // glibc's pthread_kill (the VMM kicking a vCPU) and thread exit
        // block signals around their critical sections.
        allow(libc::SYS_rt_sigprocmask),
        // std removes a thread's alternate signal stack (and munmaps it)
        // when the thread ends, and the main thread's in process::exit.
        allow(libc::SYS_sigaltstack),
        // Dropping what a thread owns at its end: eventfds, the image file
        // (VMM), the vCPU fd (vCPU thread).
        allow(libc::SYS_close),
        // std checks that a descriptor is open before closing it
        // (`OwnedFd::drop` with debug assertions): fcntl(F_GETFD). glibc's
        // fdopendir checks a directory's access mode (F_GETFL) and marks it
        // close-on-exec (F_SETFD) when remove_dir_all reads it: the actions
        // thread clearing a hibernation's staging or leftover (a trap there
        // once killed every later hibernation; no filtered thread may exec,
        // so F_SETFD opens nothing). And the hydration cache's per-chunk locks, taken
        // and released by the threads that fill it (VMM, hydrate;
        // `kiln_image::hydrate`): OFD record locks, which no other thread
        // holds a file to take.
        (
            libc::SYS_fcntl,
            arg_in(
                1,
                [
                    libc::F_GETFD,
                    libc::F_GETFL,
                    libc::F_SETFD,
                    libc::F_OFD_SETLKW,
                    libc::F_OFD_SETLK,
                ]
                .map(|cmd| cmd as u64),
            )?,
        ),
        // The VMM exits with the guest's status; the SIGSYS handler ends
        // the process after its report of a forbidden call, from whichever
        // thread made it.
        allow(libc::SYS_exit_group),
    ])
}

/// The event loop thread.
fn vmm_rules() -> Result<Rules, BackendError> {
    Ok(vec![
        // The event loop (event-manager) waits for its fds ...
        allow(libc::SYS_epoll_wait),
        // ... and SerialInput (un)registers stdin on end of input and when
        // the UART's receive FIFO is full; virtio-vsock (un)registers its
        // host connections and changes what it waits for on each.
        allow(libc::SYS_epoll_ctl),
        // Eventfds (queue notifications, reset, FIFO drained), stdin, and
        // frames from virtio-net's tap (frames to it are writes).
        allow(libc::SYS_read),
        // virtio-blk: reads and writes at the request's sector, FLUSH.
        allow(libc::SYS_pread64),
        allow(libc::SYS_pwrite64),
        allow(libc::SYS_fdatasync),
        // A read that fills its image's hydration cache itself writes a
        // run of chunks from their frames in one call (see hydrate_rules).
        allow(libc::SYS_pwritev),
        // ... and DISCARD on a volume: punching holes in its overlay.
        allow(libc::SYS_fallocate),
        // Kicking a vCPU out of KVM_RUN: pthread_kill is tgkill on
        // getpid() and the vCPU's tid, with the kick signal; and a panic
        // that aborts raises SIGABRT at its own thread, which must end the
        // process as SIGABRT rather than as a seccomp report. Another
        // process's threads are never signalled.
        (
            libc::SYS_tgkill,
            [vcpu::kick_signal(), libc::SIGABRT]
                .into_iter()
                .map(|signal| args_equal(&[(0, own_pid()), (2, signal as u64)]))
                .collect::<Result<_, _>>()?,
        ),
        allow(libc::SYS_getpid),
        // RawTerminal's Drop restores the host terminal's mode: glibc's
        // tcsetattr(TCSANOW) reads the current mode (TCGETS), then sets it
        // (TCSETS). A snapshot reads the VM's clock. virtio-net sets its
        // tap's offloads (TUNSETOFFLOAD) to what the driver acked, once it
        // activates. No other ioctl.
        (
            libc::SYS_ioctl,
            arg_in(
                1,
                [
                    libc::TCGETS,
                    libc::TCSETS,
                    libc::TUNSETOFFLOAD,
                    KVM_GET_CLOCK,
                ],
            )?,
        ),
        // The control channel from the instance's VMM: a request read and
        // its answer written (std's socket reads and writes are recv and
        // send); virtio-vsock's host connections, read with recv and
        // written with send (MSG_DONTWAIT, MSG_NOSIGNAL).
        allow(libc::SYS_recvfrom),
        allow(libc::SYS_sendto),
        // virtio-vsock: host connections accepted on its listening
        // socket (bound before the filter), non-blocking ...
        (libc::SYS_accept4, vec![arg_equals(3, NONBLOCKING_ACCEPT)?]),
        // ... and a host connection's write side shut when the guest
        // shuts its sending side (the host reads end-of-file).
        allow(libc::SYS_shutdown),
        // A snapshot's files (the control channel's requests): the memory
        // file and the root volume's copy are created, sized, written with
        // pwrite64 (above), synced; the copy finds the overlay's data with
        // lseek(SEEK_DATA/SEEK_HOLE); the state file is staged under a
        // random name, synced, renamed into place (renameat), and its
        // directory synced; a stage that fails is unlinked; sizes are read
        // with statx.
        allow(libc::SYS_openat),
        allow(libc::SYS_ftruncate),
        allow(libc::SYS_fsync),
        allow(libc::SYS_lseek),
        allow(libc::SYS_renameat),
        allow(libc::SYS_unlinkat),
        allow(libc::SYS_statx),
        // A disk attached to an empty drive (the control channel's
        // `attachdisk`, a pod's container's root): its files are opened
        // (openat, above) and a raw image sized with lseek (above) as at
        // boot, and a volume's overlay is locked as at boot, exclusively
        // and without waiting, so no two VMs ever write one overlay.
        (
            libc::SYS_flock,
            vec![arg_equals(1, (libc::LOCK_EX | libc::LOCK_NB) as u64)?],
        ),
    ])
}

/// A vCPU thread. Its registers are set before the filter is installed,
/// so it only enters the guest and, parked for a snapshot, reads its state.
fn vcpu_rules() -> Result<Rules, BackendError> {
    Ok(vec![
        // The run loop entering the guest; a snapshot's KVM_GET_* calls;
        // the guest programming the IOAPIC (an MMIO exit served on this
        // thread), whose unmasked pins become KVM's MSI routes.
        (
            libc::SYS_ioctl,
            arg_in(
                1,
                [KVM_RUN, KVM_SET_GSI_ROUTING]
                    .into_iter()
                    .chain(KVM_VCPU_SAVE_IOCTLS),
            )?,
        ),
        // Returning from the handler of the signal that kicks the vCPU out
        // of KVM_RUN.
        allow(libc::SYS_rt_sigreturn),
        // glibc's free() opening /proc/sys/vm/overcommit_memory: allowed
        // here only to be refused with EACCES by the filter stacked on
        // this one (`opens_refused`), so no file can be opened.
        allow(libc::SYS_openat),
        // Thread teardown: glibc madvises the dead stack away (see the
        // common rules), then the thread makes its last call.
        allow(libc::SYS_exit),
    ])
}

/// The API thread of an instance's VMM process: the socket only. What a
/// request asks for is carried out by the actions thread.
fn api_rules() -> Result<Rules, BackendError> {
    Ok(vec![
        // A connection per request (std's accept: close-on-exec), its read
        // and write timeouts ...
        (
            libc::SYS_accept4,
            vec![arg_equals(3, libc::SOCK_CLOEXEC as u64)?],
        ),
        (
            libc::SYS_setsockopt,
            [libc::SO_RCVTIMEO, libc::SO_SNDTIMEO]
                .into_iter()
                .map(|option| args_equal(&[(1, libc::SOL_SOCKET as u64), (2, option as u64)]))
                .collect::<Result<_, _>>()?,
        ),
        // ... the request and the answer (std's socket reads and writes
        // are recv and send).
        allow(libc::SYS_recvfrom),
        allow(libc::SYS_sendto),
        // Thread teardown (glibc madvises the stack away, see the common
        // rules), should the thread ever end.
        allow(libc::SYS_exit),
    ])
}

/// The actions thread of an instance's VMM process.
fn actions_rules() -> Result<Rules, BackendError> {
    let mut rules = record_rules();
    rules.extend([
        // The control channel to the VM process: the request sent, the
        // wait for its answer bounded (SO_RCVTIMEO), the answer read (std's
        // socket reads and writes are recv and send).
        (
            libc::SYS_setsockopt,
            vec![args_equal(&[
                (1, libc::SOL_SOCKET as u64),
                (2, libc::SO_RCVTIMEO as u64),
            ])?],
        ),
        allow(libc::SYS_recvfrom),
        allow(libc::SYS_sendto),
        // A hibernation: its staging directory is cleared (remove_dir_all
        // lists it and unlinks each entry, then itself, relative to the
        // directory's descriptor: unlinkat), made, and renamed into place
        // whole; a jailed snapshot's files are listed in the exchange
        // directory and renamed into the asked-for one.
        allow(libc::SYS_unlinkat),
        allow(libc::SYS_mkdir),
        allow(libc::SYS_getdents64),
        allow(libc::SYS_newfstatat),
        allow(libc::SYS_rename),
        // stop and reboot end the VM process: SIGTERM, then SIGCONT in case
        // it was paused, through its pidfd (`supervisor::end_vm`), so that
        // no other process can be signalled.
        (
            libc::SYS_pidfd_send_signal,
            arg_in(
                1,
                [libc::SIGTERM, libc::SIGCONT].map(|signal| signal as u64),
            )?,
        ),
        // Thread teardown (glibc madvises the stack away, see the common
        // rules), should the thread ever end.
        allow(libc::SYS_exit),
    ]);
    Ok(rules)
}

/// The main thread of an instance's VMM process, from the moment its
/// launcher, API and proxy threads run. It never ends alone: the process
/// ends with it (exit_group, a common call).
fn supervisor_rules() -> Result<Rules, BackendError> {
    let mut rules = record_rules();
    rules.extend([
        // The VM process's end (std's Child::wait is wait4).
        allow(libc::SYS_wait4),
        // The console log at its size limit: renamed to console.log.1 (a
        // fresh one is opened, above), and this process's stderr pointed
        // at the fresh one.
        allow(libc::SYS_rename),
        allow(libc::SYS_dup2),
    ]);
    Ok(rules)
}

/// What writing an instance's record takes (`Instance::update`), on the
/// supervisor's main and actions threads.
fn record_rules() -> Rules {
    vec![
        // The record lock, created if missing, and taken ...
        allow(libc::SYS_openat),
        allow(libc::SYS_flock),
        // ... the record read whole, sized first (on the main thread, the
        // VM's console too, a pipe) ...
        allow(libc::SYS_statx),
        allow(libc::SYS_read),
        // ... the new record staged under a random name, synced, renamed
        // over the old one, and its directory synced ...
        allow(libc::SYS_fsync),
        allow(libc::SYS_renameat),
        // ... and a stage that fails unlinked (std's remove_file is
        // unlink), as is the API socket when the supervisor ends.
        allow(libc::SYS_unlink),
    ]
}

/// The proxy thread of an instance's VMM process. Its listeners are bound
/// and registered before the filter; what it makes afterwards is sockets.
fn proxy_rules() -> Result<Rules, BackendError> {
    Ok(vec![
        // The event loop (event-manager) waits for the listeners, the
        // connections' sockets, its stop eventfd and accept timer ...
        allow(libc::SYS_epoll_wait),
        // ... and follows what each socket waits for: registered when
        // accepted or connected, modified as buffers fill and drain,
        // removed before it closes.
        allow(libc::SYS_epoll_ctl),
        // The stop eventfd and the accept timer, once they fire.
        allow(libc::SYS_read),
        // Clients, accepted non-blocking and close-on-exec ...
        (libc::SYS_accept4, vec![arg_equals(3, NONBLOCKING_ACCEPT)?]),
        // ... each with a socket of its own to the guest: IPv4 TCP only,
        // non-blocking and close-on-exec ...
        (
            libc::SYS_socket,
            vec![args_equal(&[
                (0, libc::AF_INET as u64),
                (
                    1,
                    (libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC) as u64,
                ),
                (2, 0),
            ])?],
        ),
        // ... connected non-blocking ...
        allow(libc::SYS_connect),
        // ... whose outcome is SO_ERROR, once the socket turns writable.
        (
            libc::SYS_getsockopt,
            vec![args_equal(&[
                (1, libc::SOL_SOCKET as u64),
                (2, libc::SO_ERROR as u64),
            ])?],
        ),
        // TCP_NODELAY on both sockets of a connection, and no other option.
        (
            libc::SYS_setsockopt,
            vec![args_equal(&[
                (1, libc::IPPROTO_TCP as u64),
                (2, libc::TCP_NODELAY as u64),
            ])?],
        ),
        // The bytes both ways (std's socket reads and writes are recv and
        // send) ...
        allow(libc::SYS_recvfrom),
        allow(libc::SYS_sendto),
        // ... and an end of file one way passed on as SHUT_WR the other.
        allow(libc::SYS_shutdown),
        // Accepting pauses a moment when an accept fails for want of
        // descriptors or memory: the accept timer is armed.
        allow(libc::SYS_timerfd_settime),
        // glibc's free() opening /proc/sys/vm/overcommit_memory: allowed
        // here only to be refused with EACCES by the filter stacked on
        // this one (`opens_refused`), so no file can be opened.
        allow(libc::SYS_openat),
        // The thread ends when its handle is dropped (glibc madvises the
        // stack away, see the common rules).
        allow(libc::SYS_exit),
    ])
}

/// A hydration worker (`volume::prefetch`): a fill of the image's
/// host-wide cache (`kiln_image::hydrate`), and nothing else. Its per-chunk
/// locks are fcntl's (the common rules).
fn hydrate_rules() -> Result<Rules, BackendError> {
    Ok(vec![
        // A chunk's frame read from the image; the cache's `.present`
        // bytes read again under the chunks' locks.
        allow(libc::SYS_pread64),
        // A run of chunks' data into the cache's raw file, in one call
        // from the frames that hold them; then their state bytes.
        allow(libc::SYS_pwritev),
        allow(libc::SYS_pwrite64),
        // The data made durable before its state byte says it is there.
        allow(libc::SYS_fdatasync),
        // glibc's free() opening /proc/sys/vm/overcommit_memory: allowed
        // here only to be refused with EACCES by the filter stacked on
        // this one (`opens_refused`), so no file can be opened.
        allow(libc::SYS_openat),
        // The thread ends when the volume goes (glibc madvises the stack
        // away, see the common rules).
        allow(libc::SYS_exit),
    ])
}

/// The futex operations (argument 1) any thread may make; the others
/// (requeueing, priority inheritance, `FUTEX_WAKE_OP`, ...) no code here
/// uses.
const FUTEX_OPS: [u64; 4] = [
    // std's Mutex, Condvar and thread parking wait (with an absolute
    // CLOCK_MONOTONIC deadline when there is one) ...
    (libc::FUTEX_WAIT_BITSET | libc::FUTEX_PRIVATE_FLAG) as u64,
    // ... and wake; glibc's internal locks (malloc arenas) wake too ...
    (libc::FUTEX_WAKE | libc::FUTEX_PRIVATE_FLAG) as u64,
    // ... and wait without a bitset.
    (libc::FUTEX_WAIT | libc::FUTEX_PRIVATE_FLAG) as u64,
    // pthread_join (std's JoinHandle::join) waits on the thread's tid,
    // which the kernel clears and wakes (shared) when the thread ends.
    (libc::FUTEX_WAIT_BITSET | libc::FUTEX_CLOCK_REALTIME) as u64,
];

/// `accept4`'s flags (argument 3) for the sockets served from an event
/// loop: non-blocking and close-on-exec.
const NONBLOCKING_ACCEPT: u64 = (libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC) as u64;

/// This process's id, the thread group a tgkill may target.
fn own_pid() -> u64 {
    std::process::id().into()
}

fn allow(syscall: i64) -> (i64, Vec<SeccompRule>) {
    (syscall, Vec::new())
}

/// Matches when argument `index` equals `value` (compared as 32 bits: the
/// ioctl request numbers and the values used here all fit).
fn arg_equals(index: u8, value: u64) -> Result<SeccompRule, BackendError> {
    args_equal(&[(index, value)])
}

/// One rule per value: matches when argument `index` equals any of
/// `values` (as 32 bits).
fn arg_in(
    index: u8,
    values: impl IntoIterator<Item = u64>,
) -> Result<Vec<SeccompRule>, BackendError> {
    values
        .into_iter()
        .map(|value| arg_equals(index, value))
        .collect()
}

/// Matches when each argument `index` equals its `value` (as 32 bits).
fn args_equal(args: &[(u8, u64)]) -> Result<SeccompRule, BackendError> {
    let conditions = args
        .iter()
        .map(|&(index, value)| {
            SeccompCondition::new(index, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, value)
        })
        .collect::<Result<_, _>>()?;
    SeccompRule::new(conditions)
}

/// Matches when the `prot` argument at `index` does not ask for PROT_EXEC.
fn not_executable(index: u8) -> Result<SeccompRule, BackendError> {
    let exec = libc::PROT_EXEC as u64;
    let condition = SeccompCondition::new(
        index,
        SeccompCmpArgLen::Dword,
        SeccompCmpOp::MaskedEq(exec),
        0,
    )?;
    SeccompRule::new(vec![condition])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_filters_compile() {
        for kind in [
            ThreadKind::Vmm,
            ThreadKind::Vcpu,
            ThreadKind::Api,
            ThreadKind::Actions,
            ThreadKind::Supervisor,
            ThreadKind::Proxy,
            ThreadKind::Hydrate,
        ] {
            let program = filter(kind).unwrap();
            assert!(!program.is_empty(), "{kind} filter is empty");
        }
    }

    /// Every entry of every allow-list has its reason: an entry follows a
    /// comment, or the end of an entry of the group a comment opened;
    /// never the list's opening bracket.
    #[test]
    fn every_entry_has_a_reason() {
        let source = include_str!("seccomp.rs");
        let lists = [
            "fn common_rules",
            "fn vmm_rules",
            "fn vcpu_rules",
            "fn api_rules",
            "fn actions_rules",
            "fn supervisor_rules",
            "fn record_rules",
            "fn proxy_rules",
            "fn hydrate_rules",
        ];
        for list in lists {
            let start = source.find(list).unwrap();
            let end = start + source[start..].find("\n}\n").unwrap();
            let (mut depth, mut previous, mut entries) = (None::<i32>, "", 0);
            for line in source[start..end].lines().map(str::trim) {
                let Some(level) = depth else {
                    if line.ends_with("vec![") || line.ends_with("extend([") {
                        (depth, previous) = (Some(0), line);
                    }
                    continue;
                };
                if line.starts_with("//") {
                    previous = line;
                    continue;
                }
                if level == 0 && line.starts_with(']') {
                    depth = None;
                    continue;
                }
                if level == 0 {
                    entries += 1;
                    assert!(
                        previous.starts_with("//") || previous.ends_with("),"),
                        "{list}: {line} has no reason above it"
                    );
                }
                let opened = line.matches(['(', '[']).count() as i32;
                let closed = line.matches([')', ']']).count() as i32;
                depth = Some(level + opened - closed);
                previous = line;
            }
            assert!(entries > 0, "{list}: no entries found");
        }
    }

    #[test]
    fn kvm_ioctls_are_the_documented_numbers() {
        assert_eq!(KVM_RUN, 0xae80);
        // From linux/kvm.h as compiled: KVM_GET_REGS, KVM_GET_MSRS,
        // KVM_GET_XSAVE, KVM_GET_TSC_KHZ, KVM_GET_CLOCK, KVM_SET_GSI_ROUTING.
        assert_eq!(KVM_VCPU_SAVE_IOCTLS[0], 0x8090_ae81);
        assert_eq!(KVM_VCPU_SAVE_IOCTLS[2], 0xc008_ae88);
        assert_eq!(KVM_VCPU_SAVE_IOCTLS[8], 0x9000_aea4);
        assert_eq!(KVM_VCPU_SAVE_IOCTLS[7], 0xaea3);
        assert_eq!(KVM_GET_CLOCK, 0x8030_ae7c);
        assert_eq!(KVM_SET_GSI_ROUTING, 0x4008_ae6a);
    }

    #[test]
    fn each_syscall_appears_once_per_kind() {
        for (kind, rules) in [
            (ThreadKind::Vmm, vmm_rules()),
            (ThreadKind::Vcpu, vcpu_rules()),
            (ThreadKind::Api, api_rules()),
            (ThreadKind::Actions, actions_rules()),
            (ThreadKind::Supervisor, supervisor_rules()),
            (ThreadKind::Proxy, proxy_rules()),
            (ThreadKind::Hydrate, hydrate_rules()),
        ] {
            let mut all: Vec<i64> = common_rules()
                .unwrap()
                .into_iter()
                .map(|(nr, _)| nr)
                .collect();
            all.extend(rules.unwrap().into_iter().map(|(nr, _)| nr));
            let count = all.len();
            all.sort_unstable();
            all.dedup();
            assert_eq!(all.len(), count, "{kind} rules list a syscall twice");
        }
    }
}
