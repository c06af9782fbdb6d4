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
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::sync::OnceLock;

/// The environment variable that names the trace file.
pub const TRACE_ENV: &str = "KILN_TRACE";

/// The trace file and this process's pid (taken once: a vCPU thread's
/// filter does not allow `getpid`).
static TRACE: OnceLock<Option<(File, u32)>> = OnceLock::new();

/// Opens the trace file if [`TRACE_ENV`] names one; call it once, in
/// `main`, before any thread installs its seccomp filter. A file that
/// cannot be opened turns tracing off with a warning: it never stops the
/// command.
pub fn init() {
    TRACE.get_or_init(|| {
        let path = std::env::var_os(TRACE_ENV).filter(|p| !p.is_empty())?;
        match OpenOptions::new().append(true).create(true).open(&path) {
            Ok(file) => Some((file, std::process::id())),
            Err(err) => {
                log::warn!(
                    "{TRACE_ENV}={}: cannot open: {}",
                    path.display(),
                    crate::report::one_line(&err)
                );
                None
            }
        }
    });
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
