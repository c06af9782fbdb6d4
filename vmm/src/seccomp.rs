//! Seccomp filters, one allow-list per kind of VMM thread.
//!
//! Each thread installs its filter itself, once its setup is done (files
//! opened, guest memory mapped, vCPU registers set): from then on it may
//! only make the system calls its steady state needs, and any other call
//! kills the whole VMM process. Every entry says which code path makes the
//! call; a new call in that path needs a new entry here, with its reason.

use std::collections::BTreeMap;
use std::fmt;

use seccompiler::{
    BackendError, BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition,
    SeccompFilter, SeccompRule, TargetArch,
};

/// The kinds of threads a VMM process runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ThreadKind {
    /// The event loop: device backends (block I/O, console input), vCPU
    /// kicks and the VM's end.
    Vmm,
    /// A vCPU's run loop, including the PIO/MMIO device emulation it
    /// performs on exits.
    Vcpu,
    /// The control API of a detached instance's VMM process: it parses
    /// requests from the socket, updates the instance record and signals
    /// the VM process.
    Api,
}

impl fmt::Display for ThreadKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ThreadKind::Vmm => "VMM",
            ThreadKind::Vcpu => "vCPU",
            ThreadKind::Api => "API",
        })
    }
}

/// Errors from building or installing a filter.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    /// The allow-list does not compile (a bug in this module).
    #[error("cannot build the {kind} thread's seccomp filter")]
    Build {
        kind: ThreadKind,
        #[source]
        source: BackendError,
    },
    /// The kernel refused the filter.
    #[error("cannot install the {kind} thread's seccomp filter")]
    Install {
        kind: ThreadKind,
        #[source]
        source: seccompiler::Error,
    },
}

/// `KVM_RUN`: `_IO(KVMIO, 0x80)` (linux/kvm.h).
const KVM_RUN: u64 =
    vmm_sys_util::ioctl::ioctl_expr(vmm_sys_util::ioctl::_IOC_NONE, kvm_bindings::KVMIO, 0x80, 0)
        as u64;

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
        }
        .map_err(build)?,
    );
    let rules: BTreeMap<i64, Vec<SeccompRule>> = rules.into_iter().collect();
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::KillProcess,
        SeccompAction::Allow,
        TargetArch::x86_64,
    )
    .map_err(build)?;
    BpfProgram::try_from(filter).map_err(build)
}

/// Installs the filter for `kind` on the calling thread (only: other
/// threads install their own). Irreversible.
pub fn install(kind: ThreadKind) -> Result<(), SeccompError> {
    let program = filter(kind)?;
    seccompiler::apply_filter(&program).map_err(|source| SeccompError::Install { kind, source })
}

/// Calls every thread makes.
fn common_rules() -> Result<Rules, BackendError> {
    Ok(vec![
        // Device mutexes shared between vCPU threads and the event loop,
        // std's thread parking and join.
        allow(libc::SYS_futex),
        // stderr warnings; on the vCPU thread also serial output to stdout
        // and eventfd signals (serial and virtio interrupts, i8042 reset,
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
        allow(libc::SYS_madvise),
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
        // (`OwnedFd::drop` with debug assertions): fcntl(F_GETFD) only.
        (libc::SYS_fcntl, vec![arg_equals(1, libc::F_GETFD as u64)?]),
    ])
}

/// The event loop thread.
fn vmm_rules() -> Result<Rules, BackendError> {
    Ok(vec![
        // The event loop (event-manager) waits for its fds ...
        allow(libc::SYS_epoll_wait),
        // ... and SerialInput (un)registers stdin on end of input and when
        // the UART's receive FIFO is full.
        allow(libc::SYS_epoll_ctl),
        // Eventfds (queue notifications, reset, FIFO drained) and stdin.
        allow(libc::SYS_read),
        // virtio-blk: reads and writes at the request's sector, FLUSH.
        allow(libc::SYS_pread64),
        allow(libc::SYS_pwrite64),
        allow(libc::SYS_fdatasync),
        // ... and DISCARD on a volume: punching holes in its overlay.
        allow(libc::SYS_fallocate),
        // Kicking a vCPU out of KVM_RUN: pthread_kill is tgkill on
        // getpid() and the vCPU's tid.
        allow(libc::SYS_tgkill),
        allow(libc::SYS_getpid),
        // ... and waiting a millisecond between kicks (std's sleep).
        allow(libc::SYS_clock_nanosleep),
        // RawTerminal's Drop restores the host terminal's mode: glibc's
        // tcsetattr(TCSANOW) reads the current mode (TCGETS), then sets it
        // (TCSETS). No other ioctl.
        (
            libc::SYS_ioctl,
            vec![arg_equals(1, libc::TCGETS)?, arg_equals(1, libc::TCSETS)?],
        ),
        // The VMM exits with the guest's status.
        allow(libc::SYS_exit_group),
    ])
}

/// A vCPU thread. Its registers are set before the filter is installed,
/// so KVM_RUN is its only ioctl.
fn vcpu_rules() -> Result<Rules, BackendError> {
    Ok(vec![
        // The run loop entering the guest.
        (libc::SYS_ioctl, vec![arg_equals(1, KVM_RUN)?]),
        // Returning from the handler of the signal that kicks the vCPU out
        // of KVM_RUN.
        allow(libc::SYS_rt_sigreturn),
        // Thread teardown: glibc madvises the dead stack away (see the
        // common rules), then the thread makes its last call.
        allow(libc::SYS_exit),
    ])
}

/// The API thread of an instance's VMM process.
fn api_rules() -> Result<Rules, BackendError> {
    Ok(vec![
        // A connection per request, its read timeout ...
        allow(libc::SYS_accept4),
        allow(libc::SYS_setsockopt),
        // ... the request and the answer (std's socket reads and writes
        // are recv and send).
        allow(libc::SYS_recvfrom),
        allow(libc::SYS_sendto),
        // Instance::update: the record lock (created if missing), the
        // record read whole (sized with statx first), the new record
        // staged under a random name, synced, renamed over the old one,
        // and its directory synced; a stage that fails is unlinked.
        allow(libc::SYS_openat),
        allow(libc::SYS_flock),
        allow(libc::SYS_statx),
        allow(libc::SYS_read),
        allow(libc::SYS_fsync),
        allow(libc::SYS_renameat),
        allow(libc::SYS_unlinkat),
        // stop, reboot, pause and resume signal the VM process.
        allow(libc::SYS_kill),
        // Thread teardown (glibc madvises the stack away, see the common
        // rules), should the thread ever end.
        allow(libc::SYS_exit),
    ])
}

fn allow(syscall: i64) -> (i64, Vec<SeccompRule>) {
    (syscall, Vec::new())
}

/// Matches when argument `index` equals `value` (compared as 32 bits: the
/// ioctl request numbers and the values used here all fit).
fn arg_equals(index: u8, value: u64) -> Result<SeccompRule, BackendError> {
    let condition = SeccompCondition::new(index, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, value)?;
    SeccompRule::new(vec![condition])
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
        for kind in [ThreadKind::Vmm, ThreadKind::Vcpu, ThreadKind::Api] {
            let program = filter(kind).unwrap();
            assert!(!program.is_empty(), "{kind} filter is empty");
        }
    }

    #[test]
    fn kvm_run_is_the_documented_number() {
        assert_eq!(KVM_RUN, 0xae80);
    }

    #[test]
    fn each_syscall_appears_once_per_kind() {
        for (kind, rules) in [
            (ThreadKind::Vmm, vmm_rules()),
            (ThreadKind::Vcpu, vcpu_rules()),
            (ThreadKind::Api, api_rules()),
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
