//! Stage timestamps for the benchmarks: with `KILN_TRACE=FILE` in its
//! environment, each Kiln process appends one line per stage it passes,
//! `STAGE PID MONOTONIC_NS`, to FILE, so that `kiln bench vmm` can tell
//! where a restore's milliseconds go across the processes it takes (the
//! `kiln` command, the instance's VMM process, the VM process) on one
//! clock. Unset, every [`mark`] is a load and a branch.
//!
//! The file is opened by [`init`], in `main` before any seccomp filter;
//! after that a mark is one `clock_gettime` (vDSO) and one `write(2)` of
//! the whole line to an `O_APPEND` descriptor, calls every thread's filter
//! allows, and atomic, so lines from processes and threads never interleave.
//!
//! A jailed VM process cannot open the file by name (its root holds no
//! such path, and its uid may not write the file): the process that starts
//! it passes its own descriptor instead ([`pass_to`], [`TRACE_FD_ENV`]).
//! Its PID in its lines is then its PID in its own PID namespace, 1.
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::process::Command;
use std::sync::OnceLock;

/// The environment variable that names the trace file.
pub const TRACE_ENV: &str = "KILN_TRACE";
/// The environment variable through which a parent hands its child the
/// trace file as an open descriptor: its number.
pub const TRACE_FD_ENV: &str = "KILN_TRACE_FD";

/// The trace file and this process's pid (taken once: a vCPU thread's
/// filter does not allow `getpid`).
static TRACE: OnceLock<Option<(File, u32)>> = OnceLock::new();

/// Takes the trace file a parent passed ([`TRACE_FD_ENV`]), or opens the
/// one [`TRACE_ENV`] names; call it once, in `main`, before any thread
/// installs its seccomp filter. A file that cannot be opened turns
/// tracing off with a warning: it never stops the command.
pub fn init() {
    TRACE.get_or_init(|| {
        let file = inherited().or_else(opened)?;
        Some((file, std::process::id()))
    });
}

/// The descriptor a parent passed in [`TRACE_FD_ENV`], closed on exec
/// again (this process's own children get it only through [`pass_to`]);
/// `None` without one, or if it is not open.
fn inherited() -> Option<File> {
    let fd: RawFd = std::env::var(TRACE_FD_ENV).ok()?.parse().ok()?;
    // Never standard input, output or error: those are the command's.
    if fd <= 2 {
        return None;
    }
    // SAFETY: the parent left the descriptor open across exec for this
    // use alone ([`pass_to`]): nothing else in this process owns it. A
    // number that is not open is refused.
    let fd = unsafe { crate::supervised::adopt(fd) }.ok()?;
    Some(File::from(fd))
}

/// The file [`TRACE_ENV`] names, opened for appending.
fn opened() -> Option<File> {
    let path = std::env::var_os(TRACE_ENV).filter(|p| !p.is_empty())?;
    match OpenOptions::new().append(true).create(true).open(&path) {
        Ok(file) => Some(file),
        Err(err) => {
            log::warn!(
                "{TRACE_ENV}={}: cannot open: {}",
                path.display(),
                crate::report::one_line(&err)
            );
            None
        }
    }
}

/// Has `command`'s child write its marks to this process's trace file,
/// through the descriptor, if tracing is on: for a child that cannot open
/// the file by name (a jailed VM process).
pub fn pass_to(command: &mut Command) {
    let Some(Some((file, _))) = TRACE.get() else {
        return;
    };
    let fd = file.as_fd();
    command.env(TRACE_FD_ENV, fd.as_raw_fd().to_string());
    // The file is open for this process's whole life (the static `TRACE`).
    crate::supervised::inherit(command, fd);
}

/// Records that this process has reached `stage` (a word), if tracing is on.
pub fn mark(stage: &str) {
    if let Some(Some((file, pid))) = TRACE.get() {
        let line = format!("{stage} {pid} {}\n", monotonic_ns());
        // A lost line only leaves a gap in the benchmark's table.
        let _ = (&*file).write_all(line.as_bytes());
    }
}

/// `CLOCK_MONOTONIC` in nanoseconds: the clock of every trace line, which
/// the benchmark reads too to put its own events on the same axis.
pub fn monotonic_ns() -> u64 {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec passed by reference, and
    // CLOCK_MONOTONIC exists on every Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
    now.tv_sec as u64 * 1_000_000_000 + now.tv_nsec as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_monotonic_clock_goes_forward() {
        let a = monotonic_ns();
        let b = monotonic_ns();
        assert!(a > 0 && b >= a);
    }
}
