//! The report of a seccomp violation. A filter's default action traps
//! (`SECCOMP_RET_TRAP`): the kernel stops the forbidden call and sends
//! SIGSYS to the thread that made it, whose handler here writes one line
//! naming the thread kind and the call to stderr (the console log, for an
//! instance), then ends the process with [`VIOLATION_STATUS`], which the
//! control plane records as the stop reason.
//!
//! The handler runs in the middle of whatever the thread was doing, with
//! its filter still on: it may only make async-signal-safe calls that
//! every filter allows (`write` and `exit_group`), so the line is built in
//! a stack buffer, without allocating or locking.
use std::cell::Cell;
use std::io;

use crate::seccomp::ThreadKind;

/// The exit status of a process that made a forbidden system call:
/// 128 + SIGSYS, as a shell reports a process killed by SIGSYS.
pub const VIOLATION_STATUS: u8 = 128 + libc::SIGSYS as u8;

/// `si_code` of a SIGSYS sent by seccomp (linux/siginfo.h `SYS_SECCOMP`).
const SYS_SECCOMP: libc::c_int = 1;

thread_local! {
    /// The kind of filter the current thread installed. Constant-initialised
    /// and without a destructor, so reading it is a plain thread-local load:
    /// safe in a signal handler.
    static KIND: Cell<Option<ThreadKind>> = const { Cell::new(None) };
}

/// The head of a `siginfo_t` for SIGSYS (asm-generic/siginfo.h's
/// `_sigsys` member), which the libc crate does not expose.
#[repr(C)]
struct SigsysInfo {
    signo: libc::c_int,
    errno: libc::c_int,
    code: libc::c_int,
    call_addr: *mut libc::c_void,
    syscall: libc::c_int,
    arch: libc::c_uint,
}

/// Makes a forbidden call on this thread report itself as a `kind`
/// thread's; installs the process-wide SIGSYS handler (again: it is the
/// same one). Called before the thread's filter, which forbids
/// `rt_sigaction`.
pub fn arm(kind: ThreadKind) -> io::Result<()> {
    KIND.set(Some(kind));
    // SAFETY: an all-zero sigaction is a valid "no flags, empty mask" value.
    let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
    action.sa_sigaction = on_sigsys as *const () as libc::sighandler_t;
    action.sa_flags = libc::SA_SIGINFO;
    // SAFETY: `action` is a valid sigaction whose handler has the
    // SA_SIGINFO signature and only makes async-signal-safe calls.
    if unsafe { libc::sigaction(libc::SIGSYS, &action, std::ptr::null_mut()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

extern "C" fn on_sigsys(_: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo to an SA_SIGINFO handler,
    // and for SIGSYS its union holds the `_sigsys` member SigsysInfo lays out.
    let info = unsafe { &*info.cast::<SigsysInfo>() };
    let mut line = Line::default();
    let thread = KIND.get().map_or("unfiltered", ThreadKind::name);
    if info.code == SYS_SECCOMP {
        line.push(b"seccomp: ");
        line.push(thread.as_bytes());
        line.push(b" thread made forbidden syscall ");
        line.push_decimal(info.syscall.unsigned_abs());
        line.push(b" (");
        line.push(syscall_name(i64::from(info.syscall)).as_bytes());
        line.push(b")\n");
    } else {
        line.push(b"seccomp: ");
        line.push(thread.as_bytes());
        line.push(b" thread received SIGSYS from outside seccomp\n");
    }
    let bytes = line.as_bytes();
    // SAFETY: write(2) reads `bytes.len()` bytes from a live stack buffer.
    unsafe { libc::write(libc::STDERR_FILENO, bytes.as_ptr().cast(), bytes.len()) };
    // SAFETY: _exit ends the process without running any user-space code
    // (no destructors, no atexit handlers, nothing that could allocate).
    unsafe { libc::_exit(i32::from(VIOLATION_STATUS)) }
}

/// A line built on the stack; what does not fit is cut.
struct Line {
    buffer: [u8; 128],
    len: usize,
}

impl Default for Line {
    fn default() -> Self {
        Line {
            buffer: [0; 128],
            len: 0,
        }
    }
}

impl Line {
    fn push(&mut self, bytes: &[u8]) {
        let n = bytes.len().min(self.buffer.len() - self.len);
        self.buffer[self.len..self.len + n].copy_from_slice(&bytes[..n]);
        self.len += n;
    }

    fn push_decimal(&mut self, mut value: u32) {
        let mut digits = [0u8; 10];
        let mut start = digits.len();
        loop {
            start -= 1;
            digits[start] = b'0' + (value % 10) as u8;
            value /= 10;
            if value == 0 {
                break;
            }
        }
        self.push(&digits[start..]);
    }

    fn as_bytes(&self) -> &[u8] {
        &self.buffer[..self.len]
    }
}

/// Pairs each `libc::SYS_*` constant with its name.
macro_rules! syscall_names {
    ($($name:ident),* $(,)?) => {
        &[$((libc::$name, stringify!($name))),*]
    };
}

/// The calls named in reports: those some filter allows (one may be
/// refused for its arguments) and those an escaped guest or a new code
/// path would reach for first. Others are reported by number only.
const SYSCALL_NAMES: &[(i64, &str)] = syscall_names![
    SYS_accept,
    SYS_accept4,
    SYS_bind,
    SYS_brk,
    SYS_chmod,
    SYS_chown,
    SYS_clock_gettime,
    SYS_clock_nanosleep,
    SYS_clone,
    SYS_clone3,
    SYS_close,
    SYS_connect,
    SYS_dup,
    SYS_dup2,
    SYS_dup3,
    SYS_epoll_create1,
    SYS_epoll_ctl,
    SYS_epoll_wait,
    SYS_eventfd2,
    SYS_execve,
    SYS_execveat,
    SYS_exit,
    SYS_exit_group,
    SYS_fallocate,
    SYS_fchmod,
    SYS_fchown,
    SYS_fcntl,
    SYS_fdatasync,
    SYS_flock,
    SYS_fork,
    SYS_fstat,
    SYS_fsync,
    SYS_ftruncate,
    SYS_futex,
    SYS_getdents64,
    SYS_getpid,
    SYS_getsockopt,
    SYS_gettid,
    SYS_ioctl,
    SYS_kill,
    SYS_listen,
    SYS_lseek,
    SYS_madvise,
    SYS_memfd_create,
    SYS_mkdir,
    SYS_mkdirat,
    SYS_mmap,
    SYS_mount,
    SYS_mprotect,
    SYS_mremap,
    SYS_munmap,
    SYS_newfstatat,
    SYS_open,
    SYS_openat,
    SYS_pidfd_open,
    SYS_pidfd_send_signal,
    SYS_pipe2,
    SYS_pread64,
    SYS_prctl,
    SYS_ptrace,
    SYS_pwrite64,
    SYS_pwritev,
    SYS_read,
    SYS_recvfrom,
    SYS_recvmsg,
    SYS_rename,
    SYS_renameat,
    SYS_renameat2,
    SYS_rt_sigaction,
    SYS_rt_sigprocmask,
    SYS_rt_sigreturn,
    SYS_sched_yield,
    SYS_seccomp,
    SYS_sendmsg,
    SYS_sendto,
    SYS_setsockopt,
    SYS_setuid,
    SYS_shutdown,
    SYS_sigaltstack,
    SYS_socket,
    SYS_statx,
    SYS_symlink,
    SYS_tgkill,
    SYS_timerfd_settime,
    SYS_tkill,
    SYS_truncate,
    SYS_unlink,
    SYS_unlinkat,
    SYS_vfork,
    SYS_wait4,
    SYS_write,
    SYS_writev,
];

/// The name of system call `nr` without its `SYS_` prefix, or "unnamed"
/// for one outside the table.
pub fn syscall_name(nr: i64) -> &'static str {
    SYSCALL_NAMES
        .iter()
        .find(|&&(number, _)| number == nr)
        .map_or("unnamed", |&(_, name)| &name[4..])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_calls_by_their_number() {
        assert_eq!(syscall_name(libc::SYS_socket), "socket");
        assert_eq!(syscall_name(libc::SYS_openat), "openat");
        assert_eq!(syscall_name(-1), "unnamed");
    }

    #[test]
    fn line_holds_decimals_and_cuts_what_does_not_fit() {
        let mut line = Line::default();
        line.push(b"n=");
        for value in [0, 7, 41, u32::MAX] {
            line.push_decimal(value);
            line.push(b" ");
        }
        assert_eq!(line.as_bytes(), b"n=0 7 41 4294967295 ");
        line.push(&[b'x'; 200]);
        assert_eq!(line.as_bytes().len(), 128);
    }
}
