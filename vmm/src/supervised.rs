//! A VM process started by a supervisor (an instance's VMM process) ends
//! with it, instead of running on unsupervised with nobody to keep the
//! instance's record true or to serve its API.
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::process::Command;

/// Arranges for SIGTERM (the VM stops and its disks flush) when the
/// supervisor, `supervisor_pid`, ends. Fails when it is already gone.
pub fn end_with(supervisor_pid: u32) -> io::Result<()> {
    // SAFETY: PR_SET_PDEATHSIG takes a signal number and no pointers.
    if unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // Checked after the prctl: a parent that died before it would not
    // have sent the signal. A jailed VM process is the init of its own
    // PID namespace, where its parent has no pid (getppid is 0): its jail
    // set the same signal before exec, while the supervisor was waiting
    // for that exec, so none was missed.
    // SAFETY: getppid has no arguments and cannot fail.
    let parent = unsafe { libc::getppid() } as u32;
    if parent != supervisor_pid && parent != 0 {
        return Err(io::Error::other(
            "its supervisor (the instance's VMM process) is gone",
        ));
    }
    Ok(())
}

/// Has `command`'s child (a VM process) inherit `fd`, which stays
/// close-on-exec in this process, so that no other child of it gets it.
/// `fd` must stay open until the spawn has returned.
pub fn inherit(command: &mut Command, fd: BorrowedFd<'_>) {
    let fd: RawFd = fd.as_raw_fd();
    // SAFETY: the closure makes one fcntl call, which is
    // async-signal-safe, and allocates nothing, as what runs between fork
    // and exec must not; the caller keeps `fd` open until the spawn has
    // returned.
    unsafe { command.pre_exec(move || keep_open_across_exec(fd)) };
}

/// Takes ownership of descriptor `fd`, which a parent passed down
/// ([`inherit`]), and closes it on exec again, so this process's own
/// children get it only when given it. A number that is not an open
/// descriptor is an error (EBADF), and nothing is owned.
///
/// # Safety
/// If `fd` is open, nothing else in this process may own it: the result
/// closes it when dropped.
pub unsafe fn adopt(fd: RawFd) -> io::Result<OwnedFd> {
    set_close_on_exec(fd, true)?;
    // SAFETY: `fd` is open (its flags were just set) and, by the caller's
    // guarantee, unowned.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Clears `fd`'s close-on-exec flag.
fn keep_open_across_exec(fd: RawFd) -> io::Result<()> {
    set_close_on_exec(fd, false)
}

/// Sets or clears `fd`'s close-on-exec flag. Only a system call: a child
/// between fork and exec may call it.
fn set_close_on_exec(fd: RawFd, close: bool) -> io::Result<()> {
    let flags = if close { libc::FD_CLOEXEC } else { 0 };
    // SAFETY: F_SETFD takes an int and touches no memory of ours; a
    // number that is not an open descriptor is an error (EBADF), not
    // undefined behaviour.
    if unsafe { libc::fcntl(fd, libc::F_SETFD, flags) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Seek};
    use std::os::fd::AsFd;

    fn write_to(fd: RawFd, text: &str) -> Command {
        let mut command = Command::new("sh");
        command.arg("-c").arg(format!("echo {text} >&{fd}"));
        command
    }

    #[test]
    fn only_the_child_given_a_descriptor_inherits_it() {
        let mut file = tempfile::tempfile().unwrap();
        let fd = file.as_raw_fd();
        let mut given = write_to(fd, "through");
        inherit(&mut given, file.as_fd());
        assert!(given.status().unwrap().success());
        let not_given = write_to(fd, "leaked").status().unwrap();
        assert!(!not_given.success(), "the descriptor stays close-on-exec");
        let mut written = String::new();
        file.rewind().unwrap();
        file.read_to_string(&mut written).unwrap();
        assert_eq!(written, "through\n");
    }

    #[test]
    fn an_adopted_descriptor_is_closed_on_exec_again_and_a_closed_one_is_refused() {
        let file = tempfile::tempfile().unwrap();
        let fd = std::os::fd::IntoRawFd::into_raw_fd(file);
        keep_open_across_exec(fd).unwrap();
        // SAFETY: `fd` is open, and its File gave up owning it above.
        let adopted = unsafe { adopt(fd) }.unwrap();
        let not_given = write_to(adopted.as_raw_fd(), "leaked").status().unwrap();
        assert!(!not_given.success(), "close-on-exec again");
        drop(adopted);
        // SAFETY: nothing owns `fd` now: it is closed, which adopt refuses.
        let refused = unsafe { adopt(fd) }.unwrap_err();
        assert_eq!(refused.raw_os_error(), Some(libc::EBADF));
    }
}
