//! Advisory whole-file locks (flock(2)). The kernel drops one when the
//! last descriptor of its open file closes, so a killed holder never
//! leaves a lock behind.
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

/// Takes the exclusive lock on `file`, waiting for its holder when
/// `wait`; `Ok(false)` when not waiting and another open file holds it.
pub fn lock_exclusive(file: &File, wait: bool) -> io::Result<bool> {
    let operation = if wait {
        libc::LOCK_EX
    } else {
        libc::LOCK_EX | libc::LOCK_NB
    };
    // SAFETY: flock only reads its integer arguments; the descriptor is
    // open for the lifetime of `file`.
    if unsafe { libc::flock(file.as_raw_fd(), operation) } == 0 {
        return Ok(true);
    }
    match io::Error::last_os_error() {
        err if err.raw_os_error() == Some(libc::EWOULDBLOCK) => Ok(false),
        err => Err(err),
    }
}
