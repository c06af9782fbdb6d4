//! A VM process started by a supervisor (an instance's VMM process) ends
//! with it, instead of running on unsupervised with nobody to keep the
//! instance's record true or to serve its API.
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
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

/// Clears `fd`'s close-on-exec flag.
fn keep_open_across_exec(fd: RawFd) -> io::Result<()> {
    // SAFETY: F_SETFD takes an int and touches no memory of ours; a
    // closed `fd` is an error, not undefined behaviour.
    if unsafe { libc::fcntl(fd, libc::F_SETFD, 0) } < 0 {
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
}
